#!/usr/bin/env bash
# The demo, on this machine, no Kubernetes: a collector, the node agent in standalone mode
# (it traces every HTTP/1.x server on this host with eBPF), two sample services under load
# from wrk, and the live per-window latencies in this terminal. Ctrl-C stops everything.
#
#   TRAZOR_DEMO_WINDOW=5s      window length
#   TRAZOR_DEMO_DURATION=N     stop by itself after N seconds (used by the test suite)
#   TRAZOR_DEMO_HTTP_PORT=8080 / TRAZOR_DEMO_GRPC_PORT=50051  collector ports
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1;34m[demo]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[demo] error:\033[0m %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "the demo loads eBPF programs and needs root: run 'sudo scripts/demo.sh'"

WINDOW=${TRAZOR_DEMO_WINDOW:-5s}
DURATION=${TRAZOR_DEMO_DURATION:-}
HTTP_PORT=${TRAZOR_DEMO_HTTP_PORT:-8080}
GRPC_PORT=${TRAZOR_DEMO_GRPC_PORT:-50051}

scripts/setup.sh
say "building (the first build takes a few minutes)"
cargo build --locked -q -p trazor-collector -p trazor-node-agent -p trazor-e2e --bins
BIN=$PWD/target/debug
RUN=$PWD/target/demo
mkdir -p "$RUN"
# Named links, so the processes are called "checkout" and "inventory" (comm comes from the
# name that was executed).
ln -sf "$BIN/trazor-sample-server" "$RUN/checkout"
ln -sf "$BIN/trazor-sample-server" "$RUN/inventory"

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() { # file pattern what
    for _ in $(seq 100); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.2
    done
    die "$3 did not start; its log ($1):
$(tail -n 5 "$1")"
}

say "starting the collector (logs: $RUN/collector.log)"
"$BIN/trazor-collector" --grpc-listen "127.0.0.1:$GRPC_PORT" --http-listen "127.0.0.1:$HTTP_PORT" \
    >"$RUN/collector.log" 2>&1 &
pids+=($!)
wait_for "$RUN/collector.log" "collector serving" "the collector"

say "starting the node agent, standalone, window $WINDOW (logs: $RUN/agent.log)"
"$BIN/trazor-node-agent" --collector "http://127.0.0.1:$GRPC_PORT" --window "$WINDOW" \
    >"$RUN/agent.log" 2>&1 &
pids+=($!)
wait_for "$RUN/agent.log" "eBPF programs attached" "the node agent"

say "starting sample services: checkout (10 ms, 5 % at 80 ms, 1 % errors) and inventory (40 ms)"
"$RUN/checkout" --listen 127.0.0.1:18081 --delay 10ms --slow-fraction 0.05 --slow-delay 80ms \
    --error-rate 0.01 >"$RUN/checkout.log" 2>&1 &
pids+=($!)
"$RUN/inventory" --listen 127.0.0.1:18082 --delay 40ms >"$RUN/inventory.log" 2>&1 &
pids+=($!)
wait_for "$RUN/checkout.log" "listening" "checkout"
wait_for "$RUN/inventory.log" "listening" "inventory"

LOAD_SECONDS=${DURATION:-86400}
wrk -t1 -c4 -d"${LOAD_SECONDS}s" http://127.0.0.1:18081/ >"$RUN/wrk-checkout.log" 2>&1 &
pids+=($!)
wrk -t1 -c2 -d"${LOAD_SECONDS}s" http://127.0.0.1:18082/ >"$RUN/wrk-inventory.log" 2>&1 &
pids+=($!)

say "live feed:  ws://127.0.0.1:$HTTP_PORT/ws   dashboard: http://127.0.0.1:$HTTP_PORT/   (metrics: http://127.0.0.1:$HTTP_PORT/metrics)"
say "windows close every $WINDOW; the first appears within one window. Ctrl-C to stop."
if [ -n "$DURATION" ]; then
    timeout "$DURATION" "$BIN/trazor-watch" "ws://127.0.0.1:$HTTP_PORT/ws" || true
else
    "$BIN/trazor-watch" "ws://127.0.0.1:$HTTP_PORT/ws"
fi
