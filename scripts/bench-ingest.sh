#!/usr/bin/env bash
# Collector ingest benchmark: windows per second per core through real gRPC decode, dedup
# and merge (target: 100 000). Prints the table and keeps it in bench/results/ingest.md.
#   scripts/bench-ingest.sh [trazor-bench-ingest flags, e.g. --windows-per-agent 50000]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release --locked -p trazor-collector --bin trazor-bench-ingest -- \
    --output bench/results/ingest.md "$@"
