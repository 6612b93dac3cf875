#!/bin/sh
# Stand-in sources for every workspace crate, written next to the real manifests.
#
# The Dockerfile copies only Cargo.toml, Cargo.lock and the crates' manifests, runs
# this, and builds: that compiles every dependency into a layer which is rebuilt only
# when a manifest or the lock file changes, not on every source edit. Each crate gets
# an empty library, an empty `main`, and an empty file for each declared bench (cargo
# refuses a manifest whose [[bench]] file is missing).
set -eu
for manifest in crates/*/Cargo.toml; do
  dir=${manifest%/Cargo.toml}
  mkdir -p "$dir/src"
  : >"$dir/src/lib.rs"
  echo 'fn main() {}' >"$dir/src/main.rs"
  benches=$(awk '/^\[\[bench\]\]/ { in_bench = 1; next }
                 /^\[/ { in_bench = 0 }
                 in_bench && /^name *=/ { gsub(/^name *= *"|".*$/, ""); print }' "$manifest")
  for bench in $benches; do
    mkdir -p "$dir/benches"
    echo 'fn main() {}' >"$dir/benches/$bench.rs"
  done
done
