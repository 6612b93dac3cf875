#!/usr/bin/env bash
# Fuzzes the profile parser and canonicalizer with libFuzzer (cargo-fuzz, nightly).
#
#   scripts/fuzz.sh [seconds]     # default 600
#
# Starts from the small seed corpus in fuzz/seeds/profile (kept in the repo); what the
# fuzzer adds goes to target/fuzz-corpus (not kept). A finding is written to
# fuzz/artifacts/profile/ and makes this script fail. See docs/security.md.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz
mkdir -p target/fuzz-corpus
cd fuzz
cargo +nightly fuzz run profile ../target/fuzz-corpus seeds/profile -- \
  -max_total_time="$seconds" -max_len=4096 -print_final_stats=1
