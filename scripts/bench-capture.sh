#!/usr/bin/env bash
# Capture overhead benchmark: what tracing costs a real server, and what the agent costs.
#
#   1. nginx saturated by wrk on loopback for the whole run, while trazor-bench-overhead
#      switches the eBPF programs between modes every slot: detached (untraced), an empty
#      program on the same tracepoints (floor: what the mechanism alone costs),
#      attached with nginx's cgroup selected (traced: target >= 0.97 of untraced
#      throughput), attached with another cgroup selected (the filter alone: target >= 0.99), and
#      attached tracing every process (traced-all, reported). nginx's own request counter
#      (stub_status) gives each slot's throughput; each cycle's ratio to the same cycle's
#      untraced slot cancels the slow swings of a shared machine, and the median over the
#      cycles is the figure. nginx's CPU time per request (its cgroup) is reported next
#      to it, and the p99 latency of a probe request sent every millisecond on a
#      connection of its own through the same saturated nginx, per mode.
#   2. The per-call cost of the attached programs for a process that is not traced: a
#      write/read loop over a socket pair, attached vs detached, alternated the same way.
#      In the same alternation, stand-in programs that repeat one operation of the traced
#      path (a clock read, a read of the call's user buffer, a hash lookup) price each
#      operation on this machine; a traced nginx request makes 2 + 3 + 4 of them, which
#      gives the least the traced path can cost here, next to the 0.97 target's budget.
#   3. Agent CPU (user + kernel, from /proc) and RSS at a fixed request rate, normalised to
#      millicores per 10 000 req/s (target <= 25), RSS (target <= 30 MiB); plus the run time
#      of the eBPF program itself (kernel.bpf_stats_enabled), which the kernel charges to
#      the traced processes (nginx, the load generator), not to the agent.
#   4. Kernel time per traced request on each side (trazor-bench-kernel): a client and a
#      server process, each in a cgroup of its own, one receive and one send per request on
#      each side, at BENCH_KERNEL_RATE req/s (a new path each request, so each is parsed
#      and hashed); the programs' run_time_ns / run_cnt with the server selected, the client
#      selected, and neither (the filter's cost per call for a process outside the
#      selection), and of an empty program (what the run statistics add to each call).
#      Also each program's size.
#   5. nginx throughput with the agent process absent vs present, as a user compares it:
#      wrk alone, then with `trazor-node-agent` started (standalone: every process traced),
#      alternated BENCH_AGENT_CYCLES times, BENCH_AGENT_SECONDS of wrk each.
#
# Prints a table and writes it, with the command, date and machine, to
# bench/results/capture.md. Run as root. Knobs (environment):
#   BENCH_CYCLES=150      cycles of the mode alternation (each runs every mode once)
#   BENCH_SLOT_MS=100     measured length of a slot; BENCH_SETTLE_MS=20 before it
#   BENCH_CONNECTIONS=16  wrk connections (one wrk thread, one nginx worker)
#   BENCH_RATE=5000       req/s for the agent CPU/RSS measurement
#   BENCH_RATE_SECONDS=10 seconds of it
#   BENCH_KERNEL_CYCLES=30 BENCH_KERNEL_RATE=5000  part 4's cycles and request rate
#   BENCH_AGENT_CYCLES=8 BENCH_AGENT_SECONDS=3     part 5's cycles and wrk seconds per run
#   BENCH_SKIP_BUILD=1    use the release binaries already built
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CYCLES=${BENCH_CYCLES:-150}
SLOT_MS=${BENCH_SLOT_MS:-100}
SETTLE_MS=${BENCH_SETTLE_MS:-20}
CONNECTIONS=${BENCH_CONNECTIONS:-16}
RATE=${BENCH_RATE:-5000}
RATE_SECONDS=${BENCH_RATE_SECONDS:-10}
KERNEL_CYCLES=${BENCH_KERNEL_CYCLES:-30}
KERNEL_RATE=${BENCH_KERNEL_RATE:-5000}
AGENT_CYCLES=${BENCH_AGENT_CYCLES:-8}
AGENT_SECONDS=${BENCH_AGENT_SECONDS:-3}

say() { printf '\033[1;34m[bench]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[bench] error:\033[0m %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: the agent loads eBPF programs (sudo -E $0)"

scripts/setup.sh
if [ "${BENCH_SKIP_BUILD:-0}" = "0" ]; then
    say "building release binaries"
    cargo build --release --locked -p trazor-node-agent -p trazor-collector -p trazor-e2e >&2
fi
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
for binary in trazor-node-agent trazor-bench-overhead trazor-bench-kernel trazor-count-instructions trazor-collector trazor-sample-client; do
    [ -x "$BIN/$binary" ] || die "$BIN/$binary missing: build it (cargo build --release)"
done

RUN=$(mktemp -d /tmp/trazor-bench.XXXXXX)
chmod 755 "$RUN"
CGROUP2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
[ -n "$CGROUP2" ] || die "no cgroup2 mount: the benchmark selects nginx by its cgroup"
SERVER_CGROUP="$CGROUP2/trazor-bench-server-$$"
CLIENT_CGROUP="$CGROUP2/trazor-bench-client-$$"
KERNEL_SERVER_CGROUP="$CGROUP2/trazor-bench-kernel-server-$$"
KERNEL_CLIENT_CGROUP="$CGROUP2/trazor-bench-kernel-client-$$"
NGINX_PID="" COLLECTOR_PID="" AGENT_PID="" WRK_PID=""
STATS_BEFORE=$(sysctl -n kernel.bpf_stats_enabled)

cleanup() {
    [ -n "$WRK_PID" ] && kill "$WRK_PID" 2>/dev/null && wait "$WRK_PID" 2>/dev/null
    [ -n "$AGENT_PID" ] && kill -INT "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
    [ -n "$NGINX_PID" ] && kill -QUIT "$NGINX_PID" 2>/dev/null && wait "$NGINX_PID" 2>/dev/null
    [ -n "$COLLECTOR_PID" ] && kill "$COLLECTOR_PID" 2>/dev/null && wait "$COLLECTOR_PID" 2>/dev/null
    sysctl -q -w kernel.bpf_stats_enabled="$STATS_BEFORE" >/dev/null 2>&1 || true
    sleep 0.2
    rmdir "$SERVER_CGROUP" "$CLIENT_CGROUP" "$KERNEL_SERVER_CGROUP" "$KERNEL_CLIENT_CGROUP" 2>/dev/null || true
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
mkdir -p "$RUN/html" "$SERVER_CGROUP" "$CLIENT_CGROUP" "$KERNEL_SERVER_CGROUP" "$KERNEL_CLIENT_CGROUP"
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
    keepalive_requests 1000000000;
    client_body_temp_path $RUN/body;
    proxy_temp_path $RUN/proxy;
    fastcgi_temp_path $RUN/fastcgi;
    uwsgi_temp_path $RUN/uwsgi;
    scgi_temp_path $RUN/scgi;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        root $RUN/html;
        location = /status { stub_status; }
    }
}
CONF
# Started inside its cgroup, so the master and worker are both in it from the start.
sh -c 'echo $$ > "$1/cgroup.procs" && exec nginx -c "$2/nginx.conf" -p "$2"' nginx "$SERVER_CGROUP" "$RUN" &
NGINX_PID=$!
URL="http://127.0.0.1:$NGINX_PORT/index.html"
for _ in $(seq 100); do curl -fsS -o /dev/null "$URL" 2>/dev/null && break; sleep 0.1; done
curl -fsS -o /dev/null "$URL" || die "nginx did not come up (see $RUN/nginx-error.log)"

# --- collector (for the agent in part 3) -------------------------------------------------
GRPC_PORT=$(free_port)
HTTP_PORT=$(free_port)
"$BIN/trazor-collector" --grpc-listen "127.0.0.1:$GRPC_PORT" --http-listen "127.0.0.1:$HTTP_PORT" \
    >"$RUN/collector.log" 2>&1 &
COLLECTOR_PID=$!

# start_agent [extra flags...]: starts the agent and waits until its program is attached.
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

# Ids of the loaded programs on raw tracepoints named like ours (ours are the new ones once
# the agent has started; this bpftool cannot list the owning pids).
socket_programs() {
    bpftool -j prog show | jq -r '.[] | select(.type == "raw_tracepoint" and (.name | test("^(sock_(recv|send)_len|inet_sock_set|tcp_destroy_soc)"))) | .id' | sort
}

# --- 1. throughput, modes alternated every slot under constant load ---------------------
MODES=untraced,floor,traced,not-selected,traced-all
# wrk runs past the end of the alternation (switching modes attaches and detaches
# tracepoints and clears the connection table, so a slot takes longer than its length); it is stopped when the alternation
# ends, and a wrk that ended first fails the run.
WRK_SECONDS=$(( CYCLES * 5 * (SLOT_MS + SETTLE_MS + 500) / 1000 + 120 ))
say "nginx under wrk (-t1 -c$CONNECTIONS), $CYCLES cycles of $MODES, ${SLOT_MS} ms slots"
sh -c 'echo $$ > "$1/cgroup.procs" && exec wrk -t1 -c"$2" -d"$3s" "$4"' wrk \
    "$CLIENT_CGROUP" "$CONNECTIONS" "$WRK_SECONDS" "$URL" > "$RUN/wrk.out" &
WRK_PID=$!
sleep 1
THROUGHPUT=$("$BIN/trazor-bench-overhead" --status-addr "127.0.0.1:$NGINX_PORT" \
    --server-cgroup "$SERVER_CGROUP" --cpu-cgroups "$SERVER_CGROUP" \
    --modes "$MODES" --cycles "$CYCLES" --slot "${SLOT_MS}ms" --settle "${SETTLE_MS}ms" \
    --probe-path /index.html --probe-interval 1ms)
kill -0 "$WRK_PID" 2>/dev/null || die "wrk ended before the alternation did: raise WRK_SECONDS"
kill "$WRK_PID" 2>/dev/null; wait "$WRK_PID" 2>/dev/null || true
WRK_PID=""
echo "$THROUGHPUT" >&2
ratio_of() { awk -F'|' -v mode="$1" '$2 ~ "^ "mode" $" { split($4, v, " "); print v[1] }' <<<"$THROUGHPUT"; }
THR_TRACED=$(ratio_of traced)
THR_FILTER=$(ratio_of not-selected)
THR_ALL=$(ratio_of traced-all)
THR_FLOOR=$(ratio_of floor)
p99_of() { awk -F'|' -v mode="$1" '$2 ~ "^ "mode" $" { gsub(/ /, "", $8); print $8 }' <<<"$THROUGHPUT"; }
cpu_of() { awk -F'|' -v mode="$1" '$2 ~ "^ "mode" $" { print $5 + 0 }' <<<"$THROUGHPUT"; }
NGINX_NS_UNTRACED=$(cpu_of untraced)
P99_TRACED=$(p99_of traced)
P99_FILTER=$(p99_of not-selected)
[ -n "$THR_TRACED" ] && [ -n "$THR_FILTER" ] || die "could not read trazor-bench-overhead's table"

# --- 2. per-call cost for a process that is not traced -----------------------------------
say "per-call cost of the attached programs for an untraced process, and of each operation (socket write/read loop)"
SYSCALLS=$("$BIN/trazor-bench-overhead" --syscall-loop --status-addr unused \
    --server-cgroup "$SERVER_CGROUP" \
    --modes untraced,floor,not-selected,cost-clock-read,cost-user-read,cost-lookup \
    --cycles 60 --slot 150ms --settle 10ms)
echo "$SYSCALLS" >&2
ns_of() { awk -F'|' -v mode="$1" '$2 ~ "^ "mode" $" { print $5 + 0 }' <<<"$SYSCALLS"; }
SYSCALL_NS_UNTRACED=$(ns_of untraced)
SYSCALL_NS_FILTER=$(ns_of not-selected)
SYSCALL_NS_FLOOR=$(ns_of floor)
SYSCALL_NS_ADDED=$(awk -v a="$SYSCALL_NS_FILTER" -v b="$SYSCALL_NS_UNTRACED" 'BEGIN { print a - b }')
# Each cost_* program repeats its operation COST_REPEATS times per call.
COST_REPEATS=$("$BIN/trazor-bench-overhead" --cost-repeats)
price_of() { awk -v a="$(ns_of "$1")" -v b="$SYSCALL_NS_FLOOR" -v n="$COST_REPEATS" 'BEGIN { printf "%.0f", (a - b) / n }'; }
PRICE_CLOCK=$(price_of cost-clock-read)
PRICE_USER_READ=$(price_of cost-user-read)
PRICE_LOOKUP=$(price_of cost-lookup)
# A traced nginx request (keep-alive): the request's receive reads its head (1 user read),
# the clock and its connection (1 lookup); the writev of the status line reads the iovec
# and the status line (2 user reads), the clock, its connection, series and bucket (3).
TRACED_FLOOR_NS=$((2 * PRICE_CLOCK + 3 * PRICE_USER_READ + 4 * PRICE_LOOKUP))
TRACED_FLOOR_PCT=$(awk -v a="$TRACED_FLOOR_NS" -v b="$NGINX_NS_UNTRACED" 'BEGIN { printf "%.1f", 100 * a / b }')
TARGET_BUDGET_NS=$(awk -v b="$NGINX_NS_UNTRACED" 'BEGIN { printf "%.0f", b * (1 / 0.97 - 1) }')

# --- 3. agent CPU and RSS at a fixed rate ------------------------------------------------
say "agent CPU and RSS at $RATE req/s for ${RATE_SECONDS}s (tracing everything)"
programs_before=$(socket_programs)
start_agent
sleep 1
OUR_PROGRAMS=$(comm -13 <(echo "$programs_before") <(socket_programs) | paste -sd, -)
sysctl -q -w kernel.bpf_stats_enabled=1
# On-CPU time of every agent thread, user + kernel, in ns (schedstat: finer than ticks).
cpu_ns() { cat /proc/"$AGENT_PID"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%d", s }'; }
bpf_ns() {
    bpftool -j prog show | jq --arg ids "$OUR_PROGRAMS" \
        '($ids | split(",") | map(tonumber)) as $ours | [.[] | select(.id as $id | $ours | index($id)) | .run_time_ns // 0] | add // 0'
}
cpu_before=$(cpu_ns)
bpf_before=$(bpf_ns)
t_before=$(date +%s%N)
report=$("$BIN/trazor-sample-client" --target "127.0.0.1:$NGINX_PORT" --path /index.html \
    --rate "$RATE" --concurrency 8 --duration "${RATE_SECONDS}s")
t_after=$(date +%s%N)
cpu_after=$(cpu_ns)
bpf_after=$(bpf_ns)
# Mean run time per call of each of our programs (counted since the stats were enabled).
PER_CALL=$(bpftool -j prog show | jq -r --arg ids "$OUR_PROGRAMS" \
    '($ids | split(",") | map(tonumber)) as $ours | [.[] | select(.id as $id | $ours | index($id)) | select(.run_cnt // 0 > 0) | "\(.name) \(.run_time_ns / .run_cnt | floor) ns × \(.run_cnt)"] | join(", ")')
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
TOTAL_MC=$(awk -v a="$AGENT_MC" -v b="$BPF_MC" 'BEGIN { printf "%.1f", a + b }')

# --- 4. kernel time per traced request, each side ----------------------------------------
say "kernel time per traced request, server and client side ($KERNEL_CYCLES cycles at $KERNEL_RATE req/s)"
KERNEL=$("$BIN/trazor-bench-kernel" --server-cgroup "$KERNEL_SERVER_CGROUP" \
    --client-cgroup "$KERNEL_CLIENT_CGROUP" --cycles "$KERNEL_CYCLES" --rate "$KERNEL_RATE")
echo "$KERNEL" >&2
kernel_figure() { awk -v name="$1" '$1 == name { print $2 }' <<<"$KERNEL"; }
SERVER_SIDE_NS=$(kernel_figure server_side_ns_per_request)
CLIENT_SIDE_NS=$(kernel_figure client_side_ns_per_request)
FILTER_CALL_NS=$(kernel_figure not_selected_ns_per_call)
FLOOR_CALL_NS=$(kernel_figure floor_ns_per_call)
[ -n "$SERVER_SIDE_NS" ] && [ -n "$CLIENT_SIDE_NS" ] && [ -n "$FILTER_CALL_NS" ] \
    || die "could not read trazor-bench-kernel's figures"
KERNEL_MODES=$(grep '^|' <<<"$KERNEL")
PROGRAM_SIZES=$(awk '$1 == "program" && $2 != "floor" { printf "%s%s %s instructions (%s bytes), JIT %s bytes", sep, $2, $6, $4, $8; sep = "; " }' <<<"$KERNEL")

# --- 5. nginx throughput, agent process absent vs present --------------------------------
say "nginx throughput with the agent absent vs present ($AGENT_CYCLES cycles of ${AGENT_SECONDS}s wrk runs)"
wrk_rate() {
    sh -c 'echo $$ > "$1/cgroup.procs" && exec wrk -t1 -c"$2" -d"$3s" "$4"' wrk \
        "$CLIENT_CGROUP" "$CONNECTIONS" "$AGENT_SECONDS" "$URL" | awk '/^Requests\/sec:/ { print $2 }'
}
AGENT_RATIOS=()
for cycle in $(seq "$AGENT_CYCLES"); do
    # Alternate which comes first, so a drifting host favours neither.
    if [ $((cycle % 2)) -eq 1 ]; then
        absent=$(wrk_rate)
        start_agent
        present=$(wrk_rate)
        stop_agent
    else
        start_agent
        present=$(wrk_rate)
        stop_agent
        absent=$(wrk_rate)
    fi
    [ -n "$absent" ] && [ -n "$present" ] || die "wrk printed no rate"
    AGENT_RATIOS+=("$(awk -v a="$present" -v b="$absent" 'BEGIN { printf "%.4f", a / b }')")
    say "cycle $cycle: absent $absent req/s, present $present req/s"
done
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.4f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
THR_AGENT=$(median "${AGENT_RATIOS[@]}")
AGENT_RATIO_LIST=$(printf '%s ' "${AGENT_RATIOS[@]}")

# --- table -----------------------------------------------------------------------------
verdict() { awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN { ok = (op == ">=") ? v >= t : v <= t; print ok ? "PASS" : "FAIL" }'; }
say "instructions executed per path (trazor-count-instructions: the programs' bytecode, interpreted)"
INSTRUCTIONS=$("$BIN/trazor-count-instructions")
# The instructions of one step of its table ("d1", "a1", ...).
steps() {
    local step total=0
    for step in "$@"; do
        total=$((total + $(echo "$INSTRUCTIONS" |
            awk -F'|' -v step="$step" '$3 ~ "^ " step "\\." { gsub(/ /, "", $5); print $5; exit }')))
    done
    echo "$total"
}
INSTRUCTION_ROW="server side, keep-alive, a new path each request (receive + send): $(steps d1) + $(steps d2) = $(steps d1 d2); the same path again: $(steps d3 d4); client side: $(steps e3) + $(steps e4) = $(steps e3 e4); a new connection's first request: $(steps c1) + $(steps c2); a process outside the selection: $(steps a1) per call; a failed receive: $(steps b1)"

ISSUE_TABLE=$(cat <<TABLE
| figure | value | target | result |
|---|---|---|---|
| kernel time per traced request, server side (receive + send programs, run_time_ns / run_cnt, one receive and one send per request at $KERNEL_RATE req/s; part 4; of which the run statistics' own clock reads, an empty program's run time: 2 × $FLOOR_CALL_NS ns) | $SERVER_SIDE_NS ns | <= 500 ns | $(verdict "$SERVER_SIDE_NS" "<=" 500) |
| same, client side | $CLIENT_SIDE_NS ns | <= 500 ns | $(verdict "$CLIENT_SIDE_NS" "<=" 500) |
| kernel time per socket call of a process outside the selection (part 4, another cgroup selected; an empty program measures $FLOOR_CALL_NS ns) | $FILTER_CALL_NS ns | <= 60 ns | $(verdict "$FILTER_CALL_NS" "<=" 60) |
| total CPU per 10 000 req/s, agent ($AGENT_MC) + eBPF run time charged to the traced processes ($BPF_MC), both sides traced (part 3) | $TOTAL_MC mc | <= 10 mc | $(verdict "$TOTAL_MC" "<=" 10) |
| nginx throughput traced / untraced (part 1) | $THR_TRACED | >= 0.97 | $(verdict "$THR_TRACED" ">=" 0.97) |
| nginx throughput, agent process absent vs present (standalone agent, every process traced; median of $AGENT_CYCLES paired wrk runs: $AGENT_RATIO_LIST) | $THR_AGENT | >= 0.95 | $(verdict "$THR_AGENT" ">=" 0.95) |
| program sizes after the verifier (instructions = translated bytes / 8) | $PROGRAM_SIZES | (reported) | - |
| eBPF instructions executed per path (trazor-count-instructions: the object interpreted, each path checked in the maps; a helper call counts one; table below) | $INSTRUCTION_ROW | (reported) | - |
TABLE
)
TABLE=$(cat <<TABLE
| measurement | value | target | result |
|---|---|---|---|
| nginx throughput, traced / untraced (nginx's cgroup selected; median of $CYCLES paired cycles) | $THR_TRACED | >= 0.97 | $(verdict "$THR_TRACED" ">=" 0.97) |
| nginx throughput, not selected / untraced (programs attached, another cgroup selected) | $THR_FILTER | >= 0.99 | $(verdict "$THR_FILTER" ">=" 0.99) |
| nginx p99 latency, traced / untraced (a probe request every 1 ms on its own keep-alive connection, through the same saturated nginx; p99 of all measured slots of each mode) | $P99_TRACED | (reported) | - |
| nginx p99 latency, not selected / untraced | $P99_FILTER | (reported) | - |
| nginx throughput, traced-all / untraced (every process: nginx and wrk) | $THR_ALL | (reported) | - |
| nginx throughput, floor / untraced (an empty program on the same tracepoints: the mechanism alone) | $THR_FLOOR | (reported) | - |
| socket call cost for an untraced process, ns added per call (write/read loop over a socket pair: $SYSCALL_NS_UNTRACED ns detached, $SYSCALL_NS_FLOOR ns with the empty floor program, $SYSCALL_NS_FILTER ns with ours) | $SYSCALL_NS_ADDED | (reported) | - |
| least CPU the traced path can add to an nginx request here, ns: its operations at their prices in a hot loop (2 clock reads × $PRICE_CLOCK ns, 3 user-memory reads × $PRICE_USER_READ ns, 4 hash lookups × $PRICE_LOOKUP ns), = $TRACED_FLOOR_PCT % of nginx's untraced $NGINX_NS_UNTRACED ns per request; the 0.97 target allows $TARGET_BUDGET_NS ns | $TRACED_FLOOR_NS | (reported) | - |
| agent CPU (user + kernel), millicores per 10 000 req/s (at $ACTUAL_RATE req/s) | $AGENT_MC | <= 25 | $(verdict "$AGENT_MC" "<=" 25) |
| eBPF programs' run time, millicores per 10 000 req/s, charged to the traced processes (per call: $PER_CALL) | $BPF_MC | (reported) | - |
| agent RSS at the end of the fixed-rate run, MiB | $RSS_MIB | <= 30 | $(verdict "$RSS_MIB" "<=" 30) |
| agent peak RSS since start (VmHWM: includes loading the eBPF object), MiB | $HWM_MIB | <= 30 | $(verdict "$HWM_MIB" "<=" 30) |
TABLE
)
echo
echo "$ISSUE_TABLE"
echo
echo "$TABLE"
echo

mkdir -p bench/results
# The analysis under the generated part (its sections start with "## ") is written by hand,
# each section naming the commit its figures came from: kept, not overwritten.
ANALYSIS=""
if [ -f bench/results/capture.md ]; then
    ANALYSIS=$(awk '/^## / { keep = 1 } keep' bench/results/capture.md)
fi
{
    echo "# Capture benchmark"
    echo
    echo "Latest run of \`scripts/bench-capture.sh\` (BENCH_CYCLES=$CYCLES BENCH_SLOT_MS=$SLOT_MS"
    echo "BENCH_SETTLE_MS=$SETTLE_MS BENCH_CONNECTIONS=$CONNECTIONS BENCH_RATE=$RATE BENCH_RATE_SECONDS=$RATE_SECONDS)."
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- machine: $(nproc) CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), kernel $(uname -r), $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "- load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- workload: nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), 1 worker, sendfile on, 1 KiB static file, in its own cgroup; wrk -t1 -c$CONNECTIONS on loopback, in another, running through the whole alternation"
    echo "- modes, switched every slot by \`trazor-bench-overhead\` (one load of the programs, attach/detach and the cgroup selection changed in place): untraced = detached; floor = an empty program on the same tracepoints instead of ours; traced = nginx's cgroup selected (its connections, opened before, are adopted at their next request line); not-selected = attached, another cgroup selected (with nothing selected at all the agent detaches the programs); traced-all = every process (wrk's connections are adopted as client connections at their next request line, so both sides are traced)"
    echo "- throughput: nginx's stub_status request counter at each slot's start and end; ratio = a mode's slot / the same cycle's untraced slot, median over the cycles (25th-75th percentile in the detail below)"
    echo "- agent CPU: on-CPU time (user + kernel) of all agent threads from /proc/PID/task/*/schedstat; eBPF run time: \`run_time_ns\` of the agent's programs with \`kernel.bpf_stats_enabled=1\`, fixed rate from \`trazor-sample-client --rate $RATE --concurrency 8\` (keep-alive), agent tracing every process"
    echo
    echo "Issue 16's figures (kernel cost per traced request), side by side:"
    echo
    echo "$ISSUE_TABLE"
    echo
    echo "All figures:"
    echo
    echo "$TABLE"
    echo
    echo "Kernel time per request, per mode (part 4: trazor-bench-kernel, $KERNEL_CYCLES cycles at $KERNEL_RATE req/s; medians over the cycles):"
    echo
    echo "$KERNEL_MODES"
    echo
    echo "eBPF instructions executed per program call, by path (\`trazor-count-instructions\`; hardware counters are absent on this VM, so the kernel cannot count them):"
    echo
    echo "$INSTRUCTIONS"
    echo
    echo "Throughput and latency detail (CPU ns/request: nginx's cgroup; probe: one request per ms on its own keep-alive connection, p99 over every measured slot of the mode):"
    echo
    echo "$THROUGHPUT"
    echo
    echo "Per-call detail (write/read loop over a socket pair; \"req/s\" is syscalls/s, \"CPU ns/request\" is ns per syscall; cost-* modes: a stand-in program repeating one operation $COST_REPEATS times per call, priced as (its ns - floor's ns) / $COST_REPEATS):"
    echo
    echo "$SYSCALLS"
    if [ -n "$ANALYSIS" ]; then
        echo
        echo "$ANALYSIS"
    fi
} > bench/results/capture.md
say "written to bench/results/capture.md"
