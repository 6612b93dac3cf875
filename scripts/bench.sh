#!/usr/bin/env bash
# Benchmarks on this machine, printed as figures.
#
#   scripts/bench.sh [seconds-per-round] [rounds]
#   BASELINE_GATEWAY=path/to/api-gateway scripts/bench.sh ...   (a build to compare with)
#
# 0. The embedded hit against the ceiling (`ceiling`: the same HTTP stack answering a
#    hit's body from memory), five alternating rounds, with the CPU microseconds each
#    spent a request; then both at a fixed 5,000 requests/s, five alternating rounds.
#    Each prints its medians (ratio of requests/s; p50 and p99 and their differences).
# 1. Cached-hit paths at concurrency 32, with `loadgen` (closed loop, keep-alive):
#    the ceiling, the bare HTTP floor (GET /healthz), an embedded gateway's hit, a distributed
#    gateway's hit served from L1, and one with L1 off (every hit read from Redis:
#    one key, whose concurrent reads share round trips, and 32 keys, one a
#    connection, which share none).
#    Each round measures them all back to back, so ratios between them hold on a
#    shared, noisy machine even when absolute figures move; each path's median ratio
#    to the ceiling in the same rounds is printed after them.
#    Then the embedded hit with 500 slowloris connections held against the same
#    gateway (each trickling a header a byte a second), beside one without them.
#    Then the embedded hit answered whole and streamed (Server-Sent Events), side by
#    side.
# 2. Key derivation: criterion, parse + validate + canonicalize + HMAC.
# 3. Redis memory per entry over 100,000 entries against the raw narrative size.
# 4. Misses through RabbitMQ workers: overhead over the LLM latency; worker jobs/s.
# 5. Analytics: event ingest into Postgres (store, and RabbitMQ -> analytics ->
#    Postgres); cached-hit throughput with analytics on and off: the gateway's share
#    (events published, nobody consuming) in alternating half-second turns with off,
#    beside a control (off against an identical twin, measured the same way), and
#    the whole pipeline on these cores (`BENCH_EVENT_FORMATS` adds publishers to
#    compare, see analytics_overhead.rs).
# 6. User misses before, during and after a 500-profile pre-warm.
# 7. workload-sim --quick: hit rate and cost by quantization step and pre-warm size.
# 8. Streaming: time to the first delta for the leader, a follower on the same and on
#    another gateway, and a hit, beside the whole answer without streaming.
# Needs redis-server, rabbitmq-server and postgresql (scripts/test.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-5}
rounds=${2:-3}

command -v redis-server >/dev/null || { echo "redis-server is missing: run scripts/test.sh first" >&2; exit 1; }
cargo build --release -q -p api-gateway -p llm-sim -p loadgen -p ceiling
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

sim_port=$(free_port)
LLM_SIM_BIND=127.0.0.1:$sim_port LLM_SIM_LATENCY_MS=50 RUST_LOG=warn target/release/llm-sim &
pids+=($!)
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" --logfile "$work/redis.log" &
pids+=($!)

gateway() { # name, binary, extra env...
  local port; port=$(free_port)
  env BIND_ADDR=127.0.0.1:$port LLM_BASE_URL=http://127.0.0.1:$sim_port/v1 LLM_API_KEY=sk-sim \
    CACHE_KEY_SECRET=bench-secret-0123456789 RUST_LOG=warn "${@:3}" "$2" &
  pids+=($!)
  printf -v "$1" '%s' "$port"
  printf -v "${1}_pid" '%s' "$!"
}
gateway embedded target/release/api-gateway
gateway with_l1 target/release/api-gateway REDIS_URL=redis://127.0.0.1:$redis_port
gateway l2_only target/release/api-gateway REDIS_URL=redis://127.0.0.1:$redis_port L1_TTL=0s
# Another build's gateways, measured in the same rounds (before/after a change).
baseline=${BASELINE_GATEWAY:-}
# shellcheck disable=SC2154 # embedded, with_l1 and l2_only are set by gateway()
ports=("$embedded" "$with_l1" "$l2_only")
if [ -n "$baseline" ]; then
  gateway base_embedded "$baseline"
  gateway base_with_l1 "$baseline" REDIS_URL=redis://127.0.0.1:$redis_port ENGINE_VERSION=narrative@0.0.1
  # shellcheck disable=SC2154 # set by gateway()
  ports+=("$base_embedded" "$base_with_l1")
fi

cat > "$work/profile.json" <<'JSON'
{"classification":"hybrid","hybrid":["Pleiades","Sirius"],
 "percentages":{"Pleiades":42.4,"Sirius":31.7,"Arcturus":15.2,"Lyra":10.7},
 "hdData":{"type":"Manifesting Generator","authority":"Sacral","profile":"3/5","definition":"Split",
   "centers":["Sacral","Throat","Root"],"channels":["34-20"],"gates":[34,20,5,15]},
 "userId":"bench-user"}
JSON
for port in "${ports[@]}"; do
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
  curl -fs -H 'content-type: application/json' --data-binary @"$work/profile.json" "http://127.0.0.1:$port/narrative" >/dev/null
done

# 32 distinct profiles, one per connection: hits of distinct keys, which share no reads.
distinct=()
for i in $(seq 1 32); do
  printf '{"classification":"primary","primary":"Pleiades","percentages":{"Pleiades":%d,"Sirius":%d},%s}' \
    $((50 + i)) $((50 - i)) \
    '"hdData":{"type":"Generator","authority":"Sacral","profile":"1/3","definition":"Single","centers":["Sacral"],"channels":[],"gates":[5]}' \
    >"$work/distinct-$i.json"
  distinct+=(--body-file "$work/distinct-$i.json")
  for _ in 1 2; do
    curl -fs -H 'content-type: application/json' --data-binary @"$work/distinct-$i.json" "http://127.0.0.1:$l2_only/narrative" >/dev/null
  done
done

# The ceiling: the gateway's HTTP stack answering a hit's very body from memory.
curl -fs -H 'content-type: application/json' --data-binary @"$work/profile.json" "http://127.0.0.1:$embedded/narrative" >"$work/hit.json"
ceiling_port=$(free_port)
CEILING_BIND=127.0.0.1:$ceiling_port CEILING_BODY_FILE=$work/hit.json target/release/ceiling &
ceiling_pid=$!
pids+=("$ceiling_pid")
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$ceiling_port/healthz" >/dev/null && break; sleep 0.1; done

load() { # label, port, loadgen args...
  target/release/loadgen --addr "127.0.0.1:$2" --concurrency 32 --seconds "$seconds" --warmup 1 --label "$1" "${@:3}"
}
hit=(--path /narrative --body-file "$work/profile.json" --expect-header "x-cache: hit")
# Each path's requests/s over the ceiling's in the same round, median over rounds,
# from lines "round<i> <path>: requests=<n> rps=<n> ...".
summarize() {
  python3 - "$1" <<'PY'
import re, statistics, sys
rps = {}
for line in open(sys.argv[1]):
    m = re.match(r"round(\d+) (.+?): requests=\d+ rps=(\d+)", line)
    if m:
        rps.setdefault(m[2], {})[m[1]] = int(m[3])
ceiling = rps.pop("ceiling", {})
for path, by_round in rps.items():
    ratios = [n / ceiling[r] for r, n in by_round.items() if r in ceiling]
    if ratios:
        print(f"median {path} / ceiling: {statistics.median(ratios):.2f}"
              f" ({min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} rounds)")
PY
}
# The embedded hit's p50 and p99 against the ceiling's, from lines "fixed<i> <who>: ...".
summarize_latency() {
  python3 - "$1" <<'PY'
import re, statistics, sys
seen = {}
for line in open(sys.argv[1]):
    m = re.match(r"fixed(\d+) (\w+): .*p50_us=(\d+) p99_us=(\d+)", line)
    if m:
        seen.setdefault(m[2], {})[m[1]] = (int(m[3]), int(m[4]))
ceiling, embedded = seen.get("ceiling", {}), seen.get("embedded", {})
rounds = sorted(set(ceiling) & set(embedded))
if rounds:
    for i, name in enumerate(("p50", "p99")):
        c = statistics.median(ceiling[r][i] for r in rounds)
        e = statistics.median(embedded[r][i] for r in rounds)
        d = statistics.median(embedded[r][i] - ceiling[r][i] for r in rounds)
        print(f"median {name}: ceiling {c:.0f} us, embedded {e:.0f} us;"
              f" embedded minus ceiling, median of rounds: {d:+.0f} us")
PY
}

echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
echo "== embedded hit against the ceiling (same HTTP stack, static body), concurrency 32, ${seconds}s x 5 rounds; CPU us a request"
for round in 1 2 3 4 5; do
  for who in ceiling embedded; do
    # shellcheck disable=SC2154 # embedded_pid is set by gateway()
    if [ "$who" = ceiling ]; then port=$ceiling_port; pid=$ceiling_pid; else port=$embedded; pid=$embedded_pid; fi
    before=$(cpu_ticks "$pid")
    out=$(load "round$round $who" "$port" "${hit[@]}")
    after=$(cpu_ticks "$pid")
    # Every request it answered, the warm-up's too: the ticks cover the whole run.
    n=$(echo "$out" | sed -E 's/.* requests=([0-9]+) .* warmup_requests=([0-9]+).*/\1 \2/' | awk '{print $1 + $2}')
    echo "$out cpu_us_per_request=$(awk -v a="$after" -v b="$before" -v n="$n" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.1f", (a-b)*1000000/hz/n}')"
  done
done | tee "$work/ceiling-rounds.txt"
summarize "$work/ceiling-rounds.txt"
echo "== embedded hit against the ceiling at a fixed 5,000 requests/s, ${seconds}s x 5 alternating rounds"
for round in 1 2 3 4 5; do
  load "fixed$round ceiling" "$ceiling_port" "${hit[@]}" --rate 5000
  load "fixed$round embedded" "$embedded" "${hit[@]}" --rate 5000
done | tee "$work/fixed-rounds.txt"
summarize_latency "$work/fixed-rounds.txt"
echo "== cached-hit paths vs the ceiling and bare HTTP, concurrency 32, ${seconds}s x ${rounds} rounds"
for round in $(seq "$rounds"); do
  load "round$round ceiling" "$ceiling_port" "${hit[@]}"
  load "round$round baseline /healthz" "$embedded" --path /healthz
  load "round$round embedded hit" "$embedded" "${hit[@]}"
  load "round$round distributed hit (L1)" "$with_l1" "${hit[@]}"
  load "round$round distributed hit (L2 only)" "$l2_only" "${hit[@]}"
  load "round$round distributed hit (L2 only, 32 keys)" "$l2_only" --path /narrative "${distinct[@]}" --expect-header "x-cache: hit"
  if [ -n "$baseline" ]; then
    # shellcheck disable=SC2154 # set by gateway()
    load "round$round baseline build: embedded hit" "$base_embedded" "${hit[@]}"
    load "round$round baseline build: distributed hit (L1)" "$base_with_l1" "${hit[@]}"
  fi
done | tee "$work/path-rounds.txt"
summarize "$work/path-rounds.txt"
# Longer than HTTP_HEADER_TIMEOUT, so the server is seen closing the slow ones.
slow_seconds=$((seconds > 15 ? seconds : 15))
echo "== embedded hit with and without 500 slow connections (HTTP_HEADER_TIMEOUT 10s), ${slow_seconds}s x ${rounds} rounds"
for round in $(seq "$rounds"); do
  load "round$round embedded hit, no slow clients" "$embedded" "${hit[@]}" --seconds "$slow_seconds"
  load "round$round embedded hit, 500 slow clients" "$embedded" "${hit[@]}" --seconds "$slow_seconds" --slow 500
done
echo "== embedded hit, answered whole and streamed (Accept: text/event-stream), concurrency 32, ${seconds}s x ${rounds} rounds"
for round in $(seq "$rounds"); do
  load "round$round embedded hit, whole" "$embedded" "${hit[@]}"
  load "round$round embedded hit, streamed" "$embedded" "${hit[@]}" --header 'Accept: text/event-stream'
done
echo "== server time of hits (gateway histograms): share under 100 us / 250 us / 1 ms"
for name in embedded with_l1 l2_only; do
  port=${!name}
  curl -fs "http://127.0.0.1:$port/metrics" | awk -v name="$name" '
    /^narrative_request_duration_seconds_bucket\{outcome="hit",le="0.0001"\}/ { a=$2 }
    /^narrative_request_duration_seconds_bucket\{outcome="hit",le="0.00025"\}/ { b=$2 }
    /^narrative_request_duration_seconds_bucket\{outcome="hit",le="0.001"\}/ { c=$2 }
    /^narrative_request_duration_seconds_count\{outcome="hit"\}/ { n=$2 }
    END { printf "%s: hits=%d  <100us %.2f%%  <250us %.2f%%  <1ms %.3f%%\n", name, n, 100*a/n, 100*b/n, 100*c/n }'
done

echo "== key derivation (criterion)"
cargo bench -q -p cache-core --bench key_derivation -- --warm-up-time 1 --measurement-time 3 2>/dev/null | grep -E 'derive|time:'

echo "== redis memory per entry (100,000 entries)"
cargo bench -q -p api-gateway --bench redis_memory 2>/dev/null | grep -E 'compressed'

echo "== misses through RabbitMQ workers, and worker throughput (simulator 500 ms)"
cargo bench -q -p system-tests --bench queue_miss 2>/dev/null | grep -E 'round|prefetch'

echo "== analytics: event ingest into Postgres"
cargo bench -q -p analytics --bench ingest 2>/dev/null | grep -E 'machine|events_per_s'
echo "== analytics: cached-hit throughput, on vs off"
BENCH_SECONDS=$seconds BENCH_ROUNDS=$rounds cargo bench -q -p system-tests --bench analytics_overhead 2>/dev/null | grep -E 'round|ratios|stored|cpu per hit'
echo "== user misses beside a pre-warm"
cargo bench -q -p system-tests --bench prewarm_latency 2>/dev/null
echo "== workload simulator (quick)"
cargo run -q --release -p workload-sim -- --quick

echo "== streaming: time to the first delta for the leader, followers and a hit (simulator: first token 400 ms)"
cargo bench -q -p system-tests --bench stream_latency 2>/dev/null | grep -E 'leader|follower|hit|baseline'
