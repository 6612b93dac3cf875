#!/usr/bin/env bash
# Benchmarks of the embedded gateway on this machine, printed as figures.
#
#   scripts/bench.sh [seconds-per-round] [rounds]
#
# 1. Cached-hit path: release gateway + llm-sim on loopback, one profile cached, then
#    `loadgen` at concurrency 32. Each round measures the bare HTTP floor (GET /healthz)
#    and the cached hit (POST /narrative) back to back, so the ratio between them holds
#    on a shared, noisy machine even when absolute figures move.
# 2. Key derivation: criterion, parse + validate + canonicalize + HMAC.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-5}
rounds=${2:-3}

cargo build --release -q -p api-gateway -p llm-sim -p loadgen
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sim_port=$(free_port); gw_port=$(free_port)
work=$(mktemp -d)
cleanup() { kill "${gw_pid:-}" "${sim_pid:-}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

LLM_SIM_BIND=127.0.0.1:$sim_port LLM_SIM_LATENCY_MS=50 RUST_LOG=warn target/release/llm-sim &
sim_pid=$!
BIND_ADDR=127.0.0.1:$gw_port LLM_BASE_URL=http://127.0.0.1:$sim_port/v1 LLM_API_KEY=sk-sim \
  CACHE_KEY_SECRET=bench-secret-0123456789 RUST_LOG=warn target/release/api-gateway &
gw_pid=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$gw_port/healthz" >/dev/null && break; sleep 0.1; done

cat > "$work/profile.json" <<'JSON'
{"classification":"hybrid","hybrid":["Pleiades","Sirius"],
 "percentages":{"Pleiades":42.4,"Sirius":31.7,"Arcturus":15.2,"Lyra":10.7},
 "hdData":{"type":"Manifesting Generator","authority":"Sacral","profile":"3/5","definition":"Split",
   "centers":["Sacral","Throat","Root"],"channels":["34-20"],"gates":[34,20,5,15]},
 "userId":"bench-user"}
JSON
curl -fs -H 'content-type: application/json' --data-binary @"$work/profile.json" "http://127.0.0.1:$gw_port/narrative" >/dev/null

echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== cached-hit path vs bare HTTP, concurrency 32, ${seconds}s x ${rounds} rounds"
for round in $(seq "$rounds"); do
  target/release/loadgen --addr "127.0.0.1:$gw_port" --path /healthz --concurrency 32 \
    --seconds "$seconds" --warmup 1 --label "round$round baseline /healthz"
  target/release/loadgen --addr "127.0.0.1:$gw_port" --path /narrative --body-file "$work/profile.json" \
    --concurrency 32 --seconds "$seconds" --warmup 1 --expect-header "x-cache: hit" --label "round$round cached-hit"
done
echo "== server-side latency of POST /narrative hits (gateway histogram, seconds)"
curl -fs "http://127.0.0.1:$gw_port/metrics" | grep -E '^narrative_request_duration_seconds_(bucket|count)\{outcome="hit"' | grep -E 'le="0.0001"|le="0.00025"|le="0.0005"|le="0.001"|count'

echo "== key derivation (criterion)"
cargo bench -q -p cache-core --bench key_derivation -- --warm-up-time 1 --measurement-time 3 2>/dev/null | grep -E 'derive|time:'
