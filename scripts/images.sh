#!/usr/bin/env bash
# Builds Trazor's four container images and writes one archive per image.
#
#   scripts/images.sh               build the static binaries, then the images and archives
#   scripts/images.sh --skip-build  use the binaries already in target/<arch>-unknown-linux-musl/release
#
# 1. One cargo invocation builds the five static (musl) release binaries.
# 2. buildah builds each component's Dockerfile FROM scratch (nothing is pulled), tagged
#    $TRAZOR_IMAGE_REGISTRY/<image>:<appVersion of charts/trazor/Chart.yaml>, so the chart's
#    defaults name them: trazor-operator, trazor-collector, trazor-node-agent, trazor-sample.
# 3. Each image is written to target/images/<image>.tar (docker-archive), which both
#    `kind load image-archive` and `ctr -n k8s.io images import` accept.
#
# Runs as root (buildah's store in /var/lib/containers; scripts/setup.sh installs buildah).
# Idempotent: the same binaries at the same commit give the same image IDs and archives
# (labels name the commit; file and image times are the commit's time). Only this script's
# own previous images are removed from buildah's store.
#
#   TRAZOR_IMAGE_REGISTRY   registry and repository prefix (default ghcr.io/trazor-dev)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1;34m[images]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[images] error:\033[0m %s\n' "$*" >&2; exit 1; }

skip_build=0
for arg in "$@"; do
    case "$arg" in
        --skip-build) skip_build=1 ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) die "unknown argument '$arg' (try --help)" ;;
    esac
done

# image | Dockerfile | binaries it holds (cargo package: binaries)
IMAGES=(
    "trazor-operator|operator/Dockerfile|trazor-operator"
    "trazor-collector|collector/Dockerfile|trazor-collector"
    "trazor-node-agent|node-agent/Dockerfile|trazor-node-agent"
    "trazor-sample|e2e/Dockerfile|trazor-sample-server trazor-sample-client"
)
CARGO_SELECTION=(
    -p trazor-operator --bin trazor-operator
    -p trazor-collector --bin trazor-collector
    -p trazor-node-agent --bin trazor-node-agent
    -p trazor-e2e --bin trazor-sample-server --bin trazor-sample-client
)

TARGET="$(uname -m)-unknown-linux-musl"
BIN_DIR="target/$TARGET/release"
ARCHIVE_DIR="target/images"
REGISTRY="${TRAZOR_IMAGE_REGISTRY:-ghcr.io/trazor-dev}"
VERSION=$(sed -n 's/^appVersion:[[:space:]]*"\{0,1\}\([^"[:space:]]*\)"\{0,1\}[[:space:]]*$/\1/p' charts/trazor/Chart.yaml)
[ -n "$VERSION" ] || die "no appVersion in charts/trazor/Chart.yaml: it is the images' tag"
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# The commit's time, not the clock's: rebuilding the same binaries gives the same images.
EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 0)
CREATED=$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)

[ "$(id -u)" -eq 0 ] || die "run as root (buildah here has no user namespaces): sudo -E $0"
command -v buildah >/dev/null || die "buildah not found: run scripts/setup.sh (Debian package buildah)"
command -v jq >/dev/null || die "jq not found: run scripts/setup.sh"
# No Dockerfile has a RUN step, so nothing is isolated today; should one come, chroot needs
# no user or network namespaces, which CI containers may lack (both work on this VM).
export BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"

# --- 1. static binaries ----------------------------------------------------------------
if [ "$skip_build" = 0 ]; then
    rustup target list --installed | grep -qx "$TARGET" \
        || die "Rust target $TARGET missing: run scripts/setup.sh (rustup target add $TARGET)"
    say "building the static release binaries ($TARGET; the first build takes several minutes)"
    started=$SECONDS
    cargo build --locked --release --target "$TARGET" "${CARGO_SELECTION[@]}" \
        || die "cargo could not build the static binaries (see above)"
    say "binaries built in $((SECONDS - started)) s"
fi

for entry in "${IMAGES[@]}"; do
    IFS='|' read -r _ _ bins <<<"$entry"
    for bin in $bins; do
        path="$BIN_DIR/$bin"
        [ -x "$path" ] || die "$path missing: build it (drop --skip-build)"
        # FROM scratch has no loader and no libc: the binary must need neither.
        ldd_out=$(ldd "$path" 2>&1 || true)
        case "$ldd_out" in
            *"statically linked"* | *"not a dynamic executable"*) ;;
            *) die "$path is dynamically linked, it cannot run FROM scratch:"$'\n'"$ldd_out" ;;
        esac
        "$path" --help >/dev/null || die "$path --help failed: the binary does not run"
    done
done
say "binaries are static and run (ldd, --help)"

# --- 2. images, 3. archives --------------------------------------------------------------
mkdir -p "$ARCHIVE_DIR"
sizes=()
for entry in "${IMAGES[@]}"; do
    IFS='|' read -r image dockerfile _ <<<"$entry"
    ref="$REGISTRY/$image:$VERSION"
    previous=$(buildah images --noheading --no-trunc --format '{{.ID}}' "$ref" 2>/dev/null || true)
    say "building $ref ($dockerfile)"
    buildah build --quiet --pull=never --layers=false --identity-label=false --timestamp "$EPOCH" \
        --build-arg "TARGET=$TARGET" --build-arg "VERSION=$VERSION" \
        --build-arg "REVISION=$REVISION" --build-arg "CREATED=$CREATED" \
        -f "$dockerfile" -t "$ref" . >/dev/null \
        || die "buildah build of $image failed (see above)"
    id=$(buildah images --noheading --no-trunc --format '{{.ID}}' "$ref")
    # Our previous build of this tag, now untagged; nothing else in the store is touched.
    if [ -n "$previous" ] && [ "$previous" != "$id" ]; then
        buildah rmi "$previous" >/dev/null 2>&1 || true
    fi

    archive="$ARCHIVE_DIR/$image.tar"
    rm -f "$archive"
    buildah push --quiet "$ref" "docker-archive:$archive:$ref" >/dev/null \
        || die "could not write $archive"
    tags=$(tar -xOf "$archive" manifest.json | jq -r '.[].RepoTags[]?')
    [ "$tags" = "$ref" ] || die "$archive names '$tags', expected '$ref'"

    size=$(buildah images --noheading --format '{{.Size}}' "$ref")
    sizes+=("$(printf '%-46s %10s   %s (%s)' "$ref" "$size" "$archive" "$(du -h "$archive" | cut -f1)")")
done

# If containerd runs here, prove it imports every archive, into a namespace of our own.
# "Runs" means it answers: a socket file left behind by a stopped containerd does not.
if command -v ctr >/dev/null && timeout 10 ctr version >/dev/null 2>&1; then
    ns=trazor-images-check
    for entry in "${IMAGES[@]}"; do
        IFS='|' read -r image _ _ <<<"$entry"
        ctr -n "$ns" images import "$ARCHIVE_DIR/$image.tar" >/dev/null \
            || die "containerd refused $ARCHIVE_DIR/$image.tar (ctr images import)"
        ctr -n "$ns" images rm "$REGISTRY/$image:$VERSION" >/dev/null
    done
    # containerd's garbage collection empties the namespace shortly after the removal.
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        ctr namespaces rm "$ns" >/dev/null 2>&1 && break
        sleep 0.5
    done
    say "containerd imports and unpacks every archive (ctr images import)"
else
    say "no containerd running here: archives checked by their manifest.json only"
fi

say "images (uncompressed size) and archives:"
printf '  %s\n' "${sizes[@]}" >&2
say "load them: kind load image-archive $ARCHIVE_DIR/<image>.tar, or ctr -n k8s.io images import $ARCHIVE_DIR/<image>.tar"
