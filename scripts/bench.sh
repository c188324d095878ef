#!/usr/bin/env bash
# Benchmark a 3-member quorate cluster and a 3-member etcd 3.4 cluster on this machine, in the
# same run, with the same load generator (`quorate bench`), one cluster at a time.
# Usage: scripts/bench.sh [seconds-per-run]   (needs Debian's etcd-server for the baseline)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
cargo build --release -p quorate
BIN=$PWD/target/release/quorate
OUT=${BENCH_OUT:-$PWD/target/bench}
rm -rf "$OUT" && mkdir -p "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

rss_kb() { local t=0; for p in "$@"; do t=$((t + $(awk '/VmRSS/{print $2}' /proc/$p/status))); done; echo $((t / $#)); }

start_cluster() { # flavor
  local flavor=$1 ic="" i
  PIDS=()
  for i in 1 2 3; do ic="$ic,m$i=http://127.0.0.1:4${i}380"; done
  ic=${ic#,}
  for i in 1 2 3; do
    local common=(--name m$i --data-dir "$OUT/$flavor-m$i" --initial-cluster "$ic"
      --listen-client-urls http://127.0.0.1:4${i}379 --advertise-client-urls http://127.0.0.1:4${i}379
      --listen-peer-urls http://127.0.0.1:4${i}380 --initial-advertise-peer-urls http://127.0.0.1:4${i}380)
    if [ "$flavor" = quorate ]; then
      "$BIN" server "${common[@]}" --listen-http 127.0.0.1:4${i}500 >"$OUT/$flavor-m$i.log" 2>&1 &
    else
      etcd "${common[@]}" >"$OUT/$flavor-m$i.log" 2>&1 &
    fi
    PIDS+=($!)
  done
  for _ in $(seq 100); do
    ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:41379,127.0.0.1:42379,127.0.0.1:43379 endpoint health >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "$flavor cluster did not become healthy" >&2; exit 1
}

ALL=127.0.0.1:41379,127.0.0.1:42379,127.0.0.1:43379
run_flavor() {
  local flavor=$1
  echo "== $flavor"
  start_cluster $flavor
  sleep 2
  echo "rss_idle_kb=$(rss_kb "${PIDS[@]}")" | tee "$OUT/$flavor.rss"
  # The leader first: a 1-client run uses the first endpoint only, and whether that member
  # leads (quorate's bootstrap and etcd's election pick different ones) would otherwise decide
  # half the result. The 64-client runs spread their connections over all three either way.
  local leader
  leader=$(ETCDCTL_API=3 etcdctl --endpoints=$ALL endpoint status | awk -F', ' '$5 == "true" {print $1}')
  EPS=$leader; for ep in ${ALL//,/ }; do [ "$ep" = "$leader" ] || EPS="$EPS,$ep"; done
  echo "endpoints (leader first): $EPS"
  "$BIN" bench --endpoints $EPS --seconds "$SECS" --preload --json ${BENCH_ARGS:-} >"$OUT/$flavor.json"
  "$BIN" bench --endpoints $EPS --ops put --clients 64 --keys 100000 --seconds 1 --preload --json >/dev/null
  echo "rss_after_100k_puts_kb=$(rss_kb "${PIDS[@]}")" | tee -a "$OUT/$flavor.rss"
  cleanup
  PIDS=()
}
for flavor in quorate etcd; do run_flavor $flavor; done

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
q = json.load(open(f"{out}/quorate.json")); e = json.load(open(f"{out}/etcd.json"))
print("| op | clients | quorate ops/s | etcd ops/s | ratio | quorate p99 ms | etcd p99 ms |")
print("|---|---:|---:|---:|---:|---:|---:|")
for a, b in zip(q, e):
    ratio = a["ops_per_s"] / b["ops_per_s"] if b["ops_per_s"] else float("inf")
    print(f'| {a["op"]} | {a["clients"]} | {a["ops_per_s"]:.0f} | {b["ops_per_s"]:.0f} | {ratio:.2f}x | {a["p99_ms"]:.2f} | {b["p99_ms"]:.2f} |')
for f in ("quorate", "etcd"):
    print(f, open(f"{out}/{f}.rss").read().replace("\n", " "))
PY
