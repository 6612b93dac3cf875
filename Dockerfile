# syntax=docker/dockerfile:1
# One image with every narrative-cache binary: api-gateway (the default command),
# generator-worker, analytics, narrative-prewarm and llm-sim.
#
#   docker build -t narrative-cache:latest .
#
# CI runs this file's build stage without Docker (scripts/dockerfile-build.py), so the
# image's binaries are built by the same commands from the same lock file as the code
# the test suite runs (in release, where the tests use the test profile).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
ENV CARGO_TERM_COLOR=never
ARG PACKAGES="-p api-gateway -p generator-worker -p analytics -p prewarm-cli -p llm-sim"

# Dependencies first, from the manifests alone: this layer is reused until Cargo.toml,
# Cargo.lock or a crate's manifest changes.
COPY Cargo.toml Cargo.lock ./
COPY crates/analytics/Cargo.toml crates/analytics/
COPY crates/api-gateway/Cargo.toml crates/api-gateway/
COPY crates/cache-core/Cargo.toml crates/cache-core/
COPY crates/cache-redis/Cargo.toml crates/cache-redis/
COPY crates/ceiling/Cargo.toml crates/ceiling/
COPY crates/generator-worker/Cargo.toml crates/generator-worker/
COPY crates/llm-sim/Cargo.toml crates/llm-sim/
COPY crates/loadgen/Cargo.toml crates/loadgen/
COPY crates/narrative-fill/Cargo.toml crates/narrative-fill/
COPY crates/narrative-gen/Cargo.toml crates/narrative-gen/
COPY crates/narrative-queue/Cargo.toml crates/narrative-queue/
COPY crates/prewarm-cli/Cargo.toml crates/prewarm-cli/
COPY crates/rehearsal/Cargo.toml crates/rehearsal/
COPY crates/system-tests/Cargo.toml crates/system-tests/
COPY crates/test-kit/Cargo.toml crates/test-kit/
COPY crates/workload-sim/Cargo.toml crates/workload-sim/
COPY deploy/docker/stub-workspace.sh deploy/docker/
RUN deploy/docker/stub-workspace.sh && cargo build --release --locked $PACKAGES

# Then the sources. COPY keeps the files' old mtimes, which cargo would take as older
# than the stub build: touch them so every workspace crate is compiled for real.
COPY crates crates
COPY migrations migrations
RUN find crates -name '*.rs' -exec touch {} + \
 && cargo build --release --locked $PACKAGES \
 && mkdir -p dist \
 && cp target/release/api-gateway target/release/generator-worker target/release/analytics \
       target/release/narrative-prewarm target/release/llm-sim dist/

FROM debian:bookworm-slim AS runtime
# ca-certificates: the LLM client verifies a real provider's TLS certificate.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 narrative \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin narrative
COPY --from=build /src/dist/ /usr/local/bin/
COPY deploy/docker/healthcheck /usr/local/bin/healthcheck
USER 10001:10001
# Every binary binds 127.0.0.1 unless told otherwise; Compose and Kubernetes set
# BIND_ADDR=0.0.0.0:<port> for each service (gateway 8080, worker 9091, analytics
# 9092, llm-sim LLM_SIM_BIND 8090).
EXPOSE 8080 9091 9092 8090
STOPSIGNAL SIGTERM
CMD ["api-gateway"]
