#!/usr/bin/env bash
# The Raft log store microbenchmark of ADR 0011: today's redb log, raft-log and raft-engine,
# each measured in fresh processes on this machine's disk, medians of alternating rounds.
#   scripts/bench-logstores.sh [ROUNDS]     (default 3; needs about 3 GiB free under target/)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
export CARGO_TARGET_DIR="$PWD/target"
cargo build --release --manifest-path bench/logstores/Cargo.toml
dir="$PWD/target/logstores-bench"
trap 'rm -rf "$dir"' EXIT
target/release/logstores all "$rounds" "$dir"
