#!/usr/bin/env bash
# Fuzzes the profile parser and canonicalizer with libFuzzer (cargo-fuzz, nightly), or
# the whole HTTP router with generated requests (proptest, stable).
#
#   scripts/fuzz.sh [seconds]     # libFuzzer on the parser; default 600 s
#   scripts/fuzz.sh http [cases]  # generated requests (methods, paths, queries, headers,
#                                 # bodies) through the real router in embedded mode;
#                                 # default 200000 cases, about 2.5 minutes on 2 cores
#                                 # (the test command runs 2000)
#
# Starts from the small seed corpus in fuzz/seeds/profile (kept in the repo); what the
# fuzzer adds goes to target/fuzz-corpus (not kept). A finding is written to
# fuzz/artifacts/profile/ and makes this script fail. See docs/security.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "http" ]; then
  HTTP_FUZZ_CASES=${2:-200000} exec cargo test -p api-gateway --test api -- \
    http_fuzz --nocapture
fi
seconds=${1:-600}
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz
mkdir -p target/fuzz-corpus
cd fuzz
cargo +nightly fuzz run profile ../target/fuzz-corpus seeds/profile -- \
  -max_total_time="$seconds" -max_len=4096 -print_final_stats=1
