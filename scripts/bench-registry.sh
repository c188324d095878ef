#!/usr/bin/env bash
# Benchmark the registry on a 3-member quorate cluster on this machine: registrations/s,
# discovery queries/s (consistent and stale), and each member's CPU while every instance
# heartbeats on its own schedule (default 10,000 instances every 5 s).
# Usage: scripts/bench-registry.sh [instances] [heartbeat-seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
HB_SECS=${2:-30}
cargo build --release -p quorate
BIN=$PWD/target/release/quorate
OUT=${BENCH_OUT:-$PWD/target/bench-registry}
rm -rf "$OUT" && mkdir -p "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
IC=m1=http://127.0.0.1:51380,m2=http://127.0.0.1:52380,m3=http://127.0.0.1:53380
for i in 1 2 3; do
  "$BIN" server --name m$i --data-dir "$OUT/m$i" --initial-cluster $IC \
    --listen-client-urls http://127.0.0.1:5${i}379 --listen-peer-urls http://127.0.0.1:5${i}380 \
    --listen-http 127.0.0.1:5${i}500 >"$OUT/m$i.log" 2>&1 &
  PIDS+=($!)
done
for _ in $(seq 100); do curl -sf 127.0.0.1:51500/health >/dev/null && break; sleep 0.2; done
ticks() { for p in "${PIDS[@]}"; do awk '{print $14+$15}' /proc/$p/stat; done; }
"$BIN" bench-registry --endpoints 127.0.0.1:51500,127.0.0.1:52500,127.0.0.1:53500 --instances "$N" \
  --heartbeat-seconds "$HB_SECS" > "$OUT/report.json" &
BENCH=$!
# CPU during the heartbeat phase only (it follows registration): skip its first 5 s ramp.
until grep -q "heartbeat phase" "$OUT/report.json" 2>/dev/null; do sleep 0.5; done
sleep 5
t0=($(ticks)); s0=$(date +%s.%N)
sleep $((HB_SECS - 10))
t1=($(ticks)); s1=$(date +%s.%N)
wait $BENCH
cat "$OUT/report.json"
hz=$(getconf CLK_TCK)
for i in 0 1 2; do
  python3 -c "print('m$((i+1)) CPU during heartbeats: %.1f%% of one core' % (100.0*(${t1[$i]}-${t0[$i]})/$hz/($s1-$s0)))"
done
