#!/usr/bin/env bash
# The scale-out rehearsal (docs/operations.md): builds the release binaries, then runs
# a whole fleet on loopback (Redis Cluster 3 masters + 3 replicas, RabbitMQ with quorum
# queues, Postgres, 3 gateways, 3 workers, analytics, the LLM simulator), drives load
# through every gateway, stops a gateway and a worker and kills a Redis master during
# the run, and prints a report. Exits 1 when clients saw errors, a profile cost more
# than one LLM call, or a job or event was lost.
#
#   scripts/rehearsal.sh [--seconds 60] [--clients 48] [--profiles 2000] [--hard] [--report FILE]
#   scripts/rehearsal.sh --backlog [--seconds 60] [--report FILE]   (misses 3x faster than workers)
#   scripts/rehearsal.sh --hostile [--seconds 60] [--report FILE]   (random profiles, user ids and
#                                   directives at full rate: memory and LLM calls it costs)
#
# Needs the servers scripts/test.sh installs (redis-server, rabbitmq-server, postgresql).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p api-gateway -p generator-worker -p analytics -p llm-sim -p rehearsal
exec target/release/scale-rehearsal --bin-dir target/release "$@"
