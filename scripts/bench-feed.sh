#!/usr/bin/env bash
# Live feed fan-out benchmark: 1 000 WebSocket subscribers (plus one with a narrow filter)
# on a real collector process; publish-to-receipt latency p50/p99 per window (goal p99 <=
# 100 ms), collector memory per subscriber, CPU per 1 000 subscribers, and a subscriber
# that stops reading for 60 s. Prints the table and keeps it in bench/results/feed.md.
#   scripts/bench-feed.sh [trazor-bench-feed flags, e.g. --rate 200 --subscribers 500]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p trazor-collector --bin trazor-collector --bin trazor-bench-feed
# 1 000 sockets on each side: raise the soft open-files limit to the hard one.
ulimit -n "$(ulimit -Hn)"
target/release/trazor-bench-feed --collector target/release/trazor-collector \
    --output bench/results/feed.md "$@"
