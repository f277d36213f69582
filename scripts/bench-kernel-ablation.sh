#!/usr/bin/env bash
# Where the kernel time of a traced request goes: part 4 of scripts/bench-capture.sh
# (trazor-bench-kernel) on seven builds of the programs, each skipping one more part of the
# work, alternated in rotating orders so that the host's drift falls on all of them:
#
#   L0  the programs as they are
#   L1  no counting: the request ends (second clock read) but nothing is handed to user
#       space (no record in the REQUESTS ring, no announcement or exemplar event)
#   L2  and no status line read on the response (taken as 200)
#   L3  and no request head read on the request (its start is taken, nothing parsed)
#   L4  and nothing after the connection lookup: the filter, the syscall's registers and
#       the connection lookup are all that is left
#   L5  and no connection lookup: the filter and the syscall's registers
#   L6  and nothing after the filter (the process's cgroup and its slot)
#
# The differences between neighbours price each part in place (caches as cold as at the
# request rate), which the hot-loop prices of bench-capture.sh's part 2 cannot. The skips
# are behind a condition the programs cannot know to be true, so the verifier and the JIT
# see the same code as in L0 (the sizes printed show it). Each level is a patch of HEAD's
# programs, built and run by scripts/bench-kernel-variants.sh (L0 is HEAD itself); the
# working tree is not touched. Run as root. Knobs:
#   ABLATION_CYCLES=12 ABLATION_RATE=5000 ABLATION_ROUNDS=4
# Prints the builds' table, then what each part costs, to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
CYCLES=${ABLATION_CYCLES:-12}
RATE=${ABLATION_RATE:-5000}
ROUNDS=${ABLATION_ROUNDS:-4}

die() { printf '\033[1;31m[ablation] error:\033[0m %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root: the benchmark loads eBPF programs"
WORK=$(mktemp -d /tmp/trazor-ablation.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ORIGINAL=node-agent-ebpf/src/main.rs
git diff --quiet HEAD -- "$ORIGINAL" ||
    die "$ORIGINAL differs from HEAD: the levels are patches of HEAD's programs"

for level in 1 2 3 4 5 6; do
    PATCHED="$WORK/main.rs"
    python3 - "$level" "$ORIGINAL" "$PATCHED" <<'PATCH'
import sys
level, original, target = int(sys.argv[1]), sys.argv[2], sys.argv[3]
text = open(original).read()
SKIP = "settings.window_nanos != 1"  # always true while tracing: a window is never 1 ns

def patch(old, new):
    global text
    if text.count(old) != 1:
        sys.exit(f"L{level}: the code to patch changed, update this script:\n{old}")
    text = text.replace(old, new)

if level >= 1:
    patch("    let latency = end - start;\n",
          f"    let latency = end - start;\n    if {SKIP} {{\n        return Ok(());\n    }}\n")
if level >= 2:
    patch("    let Some(status) = parse_status(&read_status_line(user_data(buffer)?)?) else {",
          f"    let Some(status) = (if {SKIP} {{ Some(200u16) }} else "
          "{ parse_status(&read_status_line(user_data(buffer)?)?) }) else {")
    patch("    match parse_status(&read_status_line(data)?) {",
          f"    match (if {SKIP} {{ Some(200u16) }} else {{ parse_status(&read_status_line(data)?) }}) {{")
if level >= 3:
    started = (f"if {SKIP} {{\n"
               "            let start = now();\n"
               "            unsafe {\n"
               "                (*connection).request_start_nanos = start;\n"
               "                (*connection).batch_start_nanos = start;\n"
               "            }\n"
               "            return Ok(());\n"
               "        }\n        ")
    patch("        if let Some(head) = RequestHead::read(data)? {",
          "        " + started + "if let Some(head) = RequestHead::read(data)? {")
    patch("            if let Some(head) = RequestHead::read(user_data(buffer)?)? {",
          "            " + started.replace("\n        ", "\n            ").rstrip() + "\n"
          "            if let Some(head) = RequestHead::read(user_data(buffer)?)? {")
if level >= 4:
    for direction in ("Server", "Client"):
        patch(f"            Direction::{direction},\n        );\n    }};\n",
              f"            Direction::{direction},\n        );\n    }};\n"
              f"    if {SKIP} {{\n        let _ = connection;\n        return Ok(());\n    }}\n")
if level >= 5:
    for comment in ("served", "made"):
        patch("    let Some(connection) = CONNECTIONS.get_ptr_mut(socket) else {\n"
              f"        // A connection is {comment} from its first request line.\n",
              f"    if {SKIP} {{\n        let _ = buffer;\n        return Ok(());\n    }}\n"
              "    let Some(connection) = CONNECTIONS.get_ptr_mut(socket) else {\n"
              f"        // A connection is {comment} from its first request line.\n")
if level >= 6:
    for call in ("on_receive(&settings, process, ctx.arg::<u64>(0), i64::from(returned))",
                 "on_send(&settings, process, ctx.arg::<u64>(0), i64::from(written))"):
        patch(f"        let _ = {call};\n",
              f"        if {SKIP} {{\n            return 0;\n        }}\n        let _ = {call};\n")
open(target, "w").write(text)
PATCH
    # A unified diff that `git apply` takes (exit status 1: the files differ).
    diff -u --label "a/$ORIGINAL" --label "b/$ORIGINAL" "$ORIGINAL" "$PATCHED" \
        >"$WORK/L$level.patch" || true
    [ -s "$WORK/L$level.patch" ] || die "L$level changed nothing"
done

VARIANT_ROUNDS=$ROUNDS VARIANT_CYCLES=$CYCLES VARIANT_RATE=$RATE VARIANT_ABLATION=1 \
    VARIANT_FIGURES="$WORK/figures" scripts/bench-kernel-variants.sh "$WORK"/L{1,2,3,4,5,6}.patch
python3 - "$WORK/figures" <<'TABLE'
import statistics, sys
from collections import defaultdict
values = defaultdict(list)
for line in open(sys.argv[1]):
    name, _, figure, value = line.split()
    values[("L0" if name == "head" else name, figure)].append(int(value))
median = lambda level, name: statistics.median(values[(level, name)])
print()
print("What each part costs per request (difference of the medians of neighbouring builds):")
print()
print("| part | server side ns | client side ns |")
print("|---|---|---|")
parts = [("counting: the request's record in the REQUESTS ring, events", "L0", "L1"),
         ("reading and parsing the status line", "L1", "L2"),
         ("reading, comparing and hashing the request head", "L2", "L3"),
         ("the two clock reads and the request's bookkeeping", "L3", "L4"),
         ("the connection lookup (CONNECTIONS, on both calls)", "L4", "L5"),
         ("the syscall's saved registers (on both calls)", "L5", "L6")]
for label, a, b in parts:
    print(f"| {label} | {median(a, 'server_side_ns_per_request') - median(b, 'server_side_ns_per_request'):.0f} "
          f"| {median(a, 'client_side_ns_per_request') - median(b, 'client_side_ns_per_request'):.0f} |")
print(f"| what is left (L6): the filter on both calls and the statistics' own clock reads "
      f"| {median('L6', 'server_side_ns_per_request'):.0f} | {median('L6', 'client_side_ns_per_request'):.0f} |")
TABLE
