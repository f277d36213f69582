#!/usr/bin/env bash
# Capture overhead benchmark: what tracing costs a real server, and what the agent costs.
#
#   1. nginx + wrk on loopback, untraced vs traced (agent in standalone mode, tracing every
#      process), alternated in one run: throughput and p99 ratios (target >= 0.97).
#   2. The same with the agent running but nginx not selected (--select-cgroup of an empty
#      cgroup): the cost of the filter alone (target >= 0.99).
#   3. Agent CPU (user + kernel, from /proc) and RSS at a fixed request rate, normalised to
#      millicores per 10 000 req/s (target <= 25), RSS (target <= 30 MiB); plus the run time
#      of the eBPF programs themselves (kernel.bpf_stats_enabled), which the kernel charges
#      to the traced processes (nginx, the load generator), not to the agent.
#
# Prints a table and writes it, with the command, date and machine, to
# bench/results/capture.md. Run as root. Knobs (environment):
#   BENCH_ROUNDS=7        rounds; each runs untraced, traced-all and traced-filtered once,
#                         in an order that rotates per round
#   BENCH_DURATION=3      seconds per wrk run
#   BENCH_CONNECTIONS=16  wrk connections (one wrk thread, one nginx worker)
#   BENCH_RATE=5000       req/s for the agent CPU/RSS measurement
#   BENCH_RATE_SECONDS=10 seconds of it
#   BENCH_SKIP_BUILD=1    use the release binaries already built
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ROUNDS=${BENCH_ROUNDS:-7}
DURATION=${BENCH_DURATION:-3}
CONNECTIONS=${BENCH_CONNECTIONS:-16}
RATE=${BENCH_RATE:-5000}
RATE_SECONDS=${BENCH_RATE_SECONDS:-10}

say() { printf '\033[1;34m[bench]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[bench] error:\033[0m %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: the agent loads eBPF programs (sudo -E $0)"

scripts/setup.sh
if [ "${BENCH_SKIP_BUILD:-0}" = "0" ]; then
    say "building release binaries"
    cargo build --release --locked -p trazor-node-agent -p trazor-collector -p trazor-e2e >&2
fi
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
for binary in trazor-node-agent trazor-collector trazor-sample-client; do
    [ -x "$BIN/$binary" ] || die "$BIN/$binary missing: build it (cargo build --release)"
done

RUN=$(mktemp -d /tmp/trazor-bench.XXXXXX)
chmod 755 "$RUN"
CGROUP2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
[ -n "$CGROUP2" ] || die "no cgroup2 mount: the filter benchmark needs one"
EMPTY_CGROUP="$CGROUP2/trazor-bench-empty-$$"
NGINX_PID="" COLLECTOR_PID="" AGENT_PID=""
STATS_BEFORE=$(sysctl -n kernel.bpf_stats_enabled)

cleanup() {
    [ -n "$AGENT_PID" ] && kill -INT "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
    [ -n "$NGINX_PID" ] && kill -QUIT "$NGINX_PID" 2>/dev/null && wait "$NGINX_PID" 2>/dev/null
    [ -n "$COLLECTOR_PID" ] && kill "$COLLECTOR_PID" 2>/dev/null && wait "$COLLECTOR_PID" 2>/dev/null
    sysctl -q -w kernel.bpf_stats_enabled="$STATS_BEFORE" >/dev/null 2>&1 || true
    rmdir "$EMPTY_CGROUP" 2>/dev/null || true
    rm -rf "$RUN"
}
trap cleanup EXIT

free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 30000))
        ss -Htln "sport = :$port" | grep -q . || { echo "$port"; return; }
    done
}

# --- nginx: one worker, sendfile, a small static file (per-request cost dominates) -------
NGINX_PORT=$(free_port)
mkdir -p "$RUN/html"
head -c 1024 /dev/zero | tr '\0' 'x' > "$RUN/html/index.html"
chmod -R a+rX "$RUN/html"
cat > "$RUN/nginx.conf" <<CONF
daemon off;
master_process on;
worker_processes 1;
pid $RUN/nginx.pid;
error_log $RUN/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    client_body_temp_path $RUN/body;
    proxy_temp_path $RUN/proxy;
    fastcgi_temp_path $RUN/fastcgi;
    uwsgi_temp_path $RUN/uwsgi;
    scgi_temp_path $RUN/scgi;
    server { listen 127.0.0.1:$NGINX_PORT; root $RUN/html; }
}
CONF
nginx -c "$RUN/nginx.conf" -p "$RUN" &
NGINX_PID=$!
URL="http://127.0.0.1:$NGINX_PORT/index.html"
for _ in $(seq 100); do curl -fsS -o /dev/null "$URL" 2>/dev/null && break; sleep 0.1; done
curl -fsS -o /dev/null "$URL" || die "nginx did not come up (see $RUN/nginx-error.log)"

# --- collector -------------------------------------------------------------------------
GRPC_PORT=$(free_port)
HTTP_PORT=$(free_port)
"$BIN/trazor-collector" --grpc-listen "127.0.0.1:$GRPC_PORT" --http-listen "127.0.0.1:$HTTP_PORT" \
    >"$RUN/collector.log" 2>&1 &
COLLECTOR_PID=$!

mkdir "$EMPTY_CGROUP"

# start_agent [extra flags...]: starts the agent and waits until its programs are attached.
start_agent() {
    "$BIN/trazor-node-agent" --collector "http://127.0.0.1:$GRPC_PORT" --window 5s "$@" \
        >"$RUN/agent.log" 2>&1 &
    AGENT_PID=$!
    for _ in $(seq 300); do
        grep -q "eBPF programs attached" "$RUN/agent.log" && return 0
        kill -0 "$AGENT_PID" 2>/dev/null || break
        sleep 0.1
    done
    cat "$RUN/agent.log" >&2
    die "the agent did not start"
}

stop_agent() {
    kill -INT "$AGENT_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$AGENT_PID" 2>/dev/null || true
    wait "$AGENT_PID" 2>/dev/null || true
    AGENT_PID=""
}

# Ids of the loaded programs attached to syscall tracepoints (ours are the new ones once the
# agent has started; this bpftool cannot list the owning pids).
syscall_programs() {
    bpftool -j prog show | jq -r '.[] | select(.type == "tracepoint" and (.name | test("^sys_(enter|exit)_"))) | .id' | sort
}

# run_wrk MODE: one wrk run; appends "MODE req_per_s p99_ms" to $RUN/runs.
run_wrk() {
    local mode=$1 out
    out=$(wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "$URL")
    local rps p99
    rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
    p99=$(awk '$1 == "99%" { v = $2;
        if (v ~ /us$/) { sub(/us$/, "", v); v /= 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v) }
        else if (v ~ /s$/) { sub(/s$/, "", v); v *= 1000 }
        print v }' <<<"$out")
    [ -n "$rps" ] && [ -n "$p99" ] || die "could not read wrk's output: $out"
    echo "$mode $rps $p99" >> "$RUN/runs"
    say "$(printf '%-16s %10.0f req/s  p99 %7.3f ms' "$mode" "$rps" "$p99")"
}

run_mode() {
    case $1 in
        untraced) run_wrk untraced ;;
        traced-all) start_agent; run_wrk traced-all; stop_agent ;;
        traced-filtered) start_agent --select-cgroup "$EMPTY_CGROUP"; run_wrk traced-filtered; stop_agent ;;
    esac
}

say "warm-up"
wrk -t1 -c"$CONNECTIONS" -d1s "$URL" >/dev/null
: > "$RUN/runs"
modes=(untraced traced-all traced-filtered)
for round in $(seq "$ROUNDS"); do
    say "round $round/$ROUNDS"
    for i in 0 1 2; do
        run_mode "${modes[$(((round + i) % 3))]}"
    done
done

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
column_of() { awk -v mode="$1" -v col="$2" '$1 == mode { print $col }' "$RUN/runs"; }
declare -A RPS P99
for mode in "${modes[@]}"; do
    RPS[$mode]=$(column_of "$mode" 2 | median)
    P99[$mode]=$(column_of "$mode" 3 | median)
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
THR_ALL=$(ratio "${RPS[traced-all]}" "${RPS[untraced]}")
P99_ALL=$(ratio "${P99[traced-all]}" "${P99[untraced]}")
THR_FILTER=$(ratio "${RPS[traced-filtered]}" "${RPS[untraced]}")
P99_FILTER=$(ratio "${P99[traced-filtered]}" "${P99[untraced]}")

# --- agent CPU and RSS at a fixed rate -------------------------------------------------
say "agent CPU and RSS at $RATE req/s for ${RATE_SECONDS}s (tracing everything)"
programs_before=$(syscall_programs)
start_agent
sleep 1
OUR_PROGRAMS=$(comm -13 <(echo "$programs_before") <(syscall_programs) | paste -sd, -)
sysctl -q -w kernel.bpf_stats_enabled=1
# On-CPU time of every agent thread, user + kernel, in ns (schedstat: finer than ticks).
cpu_ns() { cat /proc/"$AGENT_PID"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%d", s }'; }
bpf_ns() {
    bpftool -j prog show | jq --arg ids "$OUR_PROGRAMS" \
        '($ids | split(",") | map(tonumber)) as $ours | [.[] | select(.id as $id | $ours | index($id)) | .run_time_ns // 0] | add // 0'
}
bpf_programs=$(awk -F, '{ print NF }' <<<"$OUR_PROGRAMS")
cpu_before=$(cpu_ns)
bpf_before=$(bpf_ns)
t_before=$(date +%s%N)
report=$("$BIN/trazor-sample-client" --target "127.0.0.1:$NGINX_PORT" --path /index.html \
    --rate "$RATE" --concurrency 8 --duration "${RATE_SECONDS}s")
t_after=$(date +%s%N)
cpu_after=$(cpu_ns)
bpf_after=$(bpf_ns)
RSS_KIB=$(awk '/^VmRSS:/ { print $2 }' "/proc/$AGENT_PID/status")
HWM_KIB=$(awk '/^VmHWM:/ { print $2 }' "/proc/$AGENT_PID/status")
sysctl -q -w kernel.bpf_stats_enabled="$STATS_BEFORE"
stop_agent
ACTUAL_RATE=$(jq -r '.rate' <<<"$report")
FAILURES=$(jq -r '.failures' <<<"$report")
[ "$FAILURES" = "0" ] || say "warning: $FAILURES requests failed during the fixed-rate run"
ELAPSED_S=$(awk -v a="$t_before" -v b="$t_after" 'BEGIN { print (b - a) / 1e9 }')
AGENT_MC=$(awk -v n=$((cpu_after - cpu_before)) -v s="$ELAPSED_S" -v r="$ACTUAL_RATE" \
    'BEGIN { printf "%.2f", (n / 1e9) / s * 1000 / (r / 10000) }')
BPF_MC=$(awk -v n=$((bpf_after - bpf_before)) -v s="$ELAPSED_S" -v r="$ACTUAL_RATE" \
    'BEGIN { printf "%.1f", (n / 1e9) / s * 1000 / (r / 10000) }')
RSS_MIB=$(awk -v k="$RSS_KIB" 'BEGIN { printf "%.1f", k / 1024 }')
HWM_MIB=$(awk -v k="$HWM_KIB" 'BEGIN { printf "%.1f", k / 1024 }')

# --- table -----------------------------------------------------------------------------
verdict() { awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN { ok = (op == ">=") ? v >= t : v <= t; print ok ? "PASS" : "FAIL" }'; }
TABLE=$(cat <<TABLE
| measurement | value | target | result |
|---|---|---|---|
| nginx throughput, traced-all / untraced (median req/s: ${RPS[traced-all]} / ${RPS[untraced]}) | $THR_ALL | >= 0.97 | $(verdict "$THR_ALL" ">=" 0.97) |
| nginx p99, traced-all / untraced (median ms: ${P99[traced-all]} / ${P99[untraced]}) | $P99_ALL | (reported) | - |
| nginx throughput, not selected / untraced (median req/s: ${RPS[traced-filtered]} / ${RPS[untraced]}) | $THR_FILTER | >= 0.99 | $(verdict "$THR_FILTER" ">=" 0.99) |
| nginx p99, not selected / untraced (median ms: ${P99[traced-filtered]} / ${P99[untraced]}) | $P99_FILTER | (reported) | - |
| agent CPU (user + kernel), millicores per 10 000 req/s (at $ACTUAL_RATE req/s) | $AGENT_MC | <= 25 | $(verdict "$AGENT_MC" "<=" 25) |
| eBPF programs' run time ($bpf_programs programs), millicores per 10 000 req/s, charged to the traced processes | $BPF_MC | (reported) | - |
| agent RSS at the end of the fixed-rate run, MiB | $RSS_MIB | <= 30 | $(verdict "$RSS_MIB" "<=" 30) |
| agent peak RSS since start (VmHWM: includes loading the eBPF object), MiB | $HWM_MIB | <= 30 | $(verdict "$HWM_MIB" "<=" 30) |
TABLE
)
RUNS=$(awk '{ printf "| %s | %.0f | %.3f |\n", $1, $2, $3 }' "$RUN/runs")
echo
echo "$TABLE"
echo

mkdir -p bench/results
{
    echo "# Capture benchmark"
    echo
    echo "Latest run of \`scripts/bench-capture.sh\` (BENCH_ROUNDS=$ROUNDS BENCH_DURATION=$DURATION"
    echo "BENCH_CONNECTIONS=$CONNECTIONS BENCH_RATE=$RATE BENCH_RATE_SECONDS=$RATE_SECONDS)."
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- machine: $(nproc) CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), kernel $(uname -r), $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "- load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews single runs; rounds alternate modes and medians are compared)"
    echo "- workload: nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), 1 worker, sendfile on, 1 KiB static file; wrk -t1 -c$CONNECTIONS -d${DURATION}s on loopback"
    echo "- traced-all: \`trazor-node-agent\` standalone (every process, server and client side, so wrk's requests are traced too); traced-filtered: \`--select-cgroup\` of an empty cgroup"
    echo "- agent CPU: on-CPU time (user + kernel) of all agent threads from /proc/PID/task/*/schedstat; eBPF run time: \`run_time_ns\` of the agent's programs with \`kernel.bpf_stats_enabled=1\`, fixed rate from \`trazor-sample-client --rate $RATE --concurrency 8\` (keep-alive)"
    echo
    echo "$TABLE"
    echo
    echo "Every wrk run, in order:"
    echo
    echo "| mode | req/s | p99 ms |"
    echo "|---|---|---|"
    echo "$RUNS"
} > bench/results/capture.md
say "written to bench/results/capture.md"
