#!/usr/bin/env bash
# Kernel time per traced request of several builds of the programs, side by side: part 4 of
# scripts/bench-capture.sh (trazor-bench-kernel) on HEAD and on HEAD with each patch applied,
# alternated in rotating orders over several rounds so that the host's drift (±20 % over
# minutes on these VMs) falls on all of them alike. This is how a change to the programs is
# judged before it is kept, and how scripts/bench-kernel-ablation.sh prices each part.
#
#   scripts/bench-kernel-variants.sh bench/experiments/socket-storage.patch
#
# Each patch is a `git diff` against HEAD (any files: the programs, the common crate, the
# loader); the variant is named after its file. Builds go to temporary git worktrees; the
# working tree is not touched. Run as root. Knobs:
#   VARIANT_ROUNDS=6 VARIANT_CYCLES=12 VARIANT_RATE=5000
#   VARIANT_ABLATION=1   the builds skip work on purpose: do not require counted requests
#   VARIANT_FIGURES=file also keep every run's figures there ("variant round name value")
# Prints a table (medians over the rounds, each round in brackets) to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${VARIANT_ROUNDS:-6}
CYCLES=${VARIANT_CYCLES:-12}
RATE=${VARIANT_RATE:-5000}

say() { printf '\033[1;34m[variants]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[variants] error:\033[0m %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root: the benchmark loads eBPF programs"
[ $# -ge 1 ] || die "usage: $0 PATCH... (each a git diff against HEAD)"
for patch in "$@"; do [ -f "$patch" ] || die "no such patch: $patch"; done
scripts/setup.sh >&2

WORK=$(mktemp -d /tmp/trazor-variants.XXXXXX)
CGROUP2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
SERVER_CGROUP="$CGROUP2/trazor-variants-server-$$"
CLIENT_CGROUP="$CGROUP2/trazor-variants-client-$$"
cleanup() {
    rmdir "$SERVER_CGROUP" "$CLIENT_CGROUP" 2>/dev/null || true
    for tree in "$WORK"/tree-*; do
        [ -d "$tree" ] && git -C "$ROOT" worktree remove --force "$tree" 2>/dev/null
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$SERVER_CGROUP" "$CLIENT_CGROUP" "$WORK/bin"

# Each build in its own worktree (a path of its own): builds sharing one target directory
# but not one path never pick up each other's eBPF object.
build() {
    local name=$1 patch=${2:-}
    say "building $name"
    git worktree add --quiet --detach "$WORK/tree-$name" HEAD
    if [ -n "$patch" ]; then
        git -C "$WORK/tree-$name" apply "$(realpath "$patch")" ||
            die "$patch does not apply to HEAD"
    fi
    (cd "$WORK/tree-$name" && CARGO_TARGET_DIR="$ROOT/target/variants" \
        cargo build --release --locked --quiet -p trazor-node-agent --bin trazor-bench-kernel >&2)
    cp "$ROOT/target/variants/release/trazor-bench-kernel" "$WORK/bin/$name"
}
names=(head)
build head
for patch in "$@"; do
    name=$(basename "$patch" .patch)
    [[ " ${names[*]} " != *" $name "* ]] || die "two patches named $name"
    build "$name" "$patch"
    names+=("$name")
done

ablation=()
[ "${VARIANT_ABLATION:-0}" = 1 ] && ablation=(--ablation)
figures=${VARIANT_FIGURES:-$WORK/figures}
: >"$figures"
count=${#names[@]}
for round in $(seq 0 $((ROUNDS - 1))); do
    for i in $(seq 0 $((count - 1))); do
        # Rotating, and reversed every other round: each build runs early and late.
        if ((round % 2 == 0)); then
            name=${names[$(((i + round / 2) % count))]}
        else
            name=${names[$(((count - 1 - i + round / 2) % count))]}
        fi
        say "round $((round + 1))/$ROUNDS: $name"
        "$WORK/bin/$name" "${ablation[@]}" --server-cgroup "$SERVER_CGROUP" \
            --client-cgroup "$CLIENT_CGROUP" --cycles "$CYCLES" --rate "$RATE" 2>"$WORK/stderr" |
            awk -v name="$name" -v round="$round" \
                '$1 ~ /_ns_per_(request|call)$/ { print name, round, $1, $2 }
                 $1 == "program" && $2 ~ /^sock_(recv|send)_length$/ { print name, round, $2, $6 }' \
                >>"$figures" || die "$name failed: $(tail -3 "$WORK/stderr")"
        grep -q "^$name $round floor_ns_per_call" "$figures" ||
            die "$name printed no figures: $(tail -3 "$WORK/stderr")"
    done
done

python3 - "$figures" "$CYCLES" "$RATE" "${names[@]}" <<'TABLE'
import statistics, sys
from collections import defaultdict
figures, cycles, rate, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
values = defaultdict(dict)
for line in open(figures):
    name, round_, figure, value = line.split()
    values[(name, figure)][int(round_)] = int(value)
median = lambda name, figure: statistics.median(values[(name, figure)].values())
print(f"Kernel ns by build (trazor-bench-kernel, {cycles} cycles at {rate} req/s per run; "
      "median over the rounds, each round in brackets):")
print()
print("| build | server side ns per request | client side ns per request | filter ns per call | "
      "empty program ns per call | receive / send instructions |")
print("|---|---|---|---|---|---|")
figures_shown = ("server_side_ns_per_request", "client_side_ns_per_request",
                 "not_selected_ns_per_call", "floor_ns_per_call")
for name in names:
    cells = [f"{median(name, f):.0f} ({', '.join(str(v) for _, v in sorted(values[(name, f)].items()))})"
             for f in figures_shown]
    sizes = f"{values[(name, 'sock_recv_length')][0]} / {values[(name, 'sock_send_length')][0]}"
    print(f"| {name} | " + " | ".join(cells) + f" | {sizes} |")
print()
print("Against head, paired round by round (the builds of one round ran minutes apart):")
print()
print("| build | server side: median difference, rounds faster | client side | filter |")
print("|---|---|---|---|")
for name in names[1:]:
    cells = []
    for figure in figures_shown[:3]:
        rounds = sorted(set(values[(name, figure)]) & set(values[("head", figure)]))
        differences = [values[(name, figure)][r] - values[("head", figure)][r] for r in rounds]
        faster = sum(d < 0 for d in differences)
        cells.append(f"{statistics.median(differences):+.0f} ns, {faster} of {len(differences)}")
    print(f"| {name} | " + " | ".join(cells) + " |")
TABLE
