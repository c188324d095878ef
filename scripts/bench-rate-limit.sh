#!/usr/bin/env bash
# The rate-limit benchmark (issue 14 §3): does a client over its rate cost another client?
# One member (release build); the measured client puts at 200/s on a fixed schedule
# (`quorate bench --pace 200`) from 127.0.0.1, beside: nothing (none), one core of pure
# computation (burn: the machine's share, the control), and another client flooding puts on 16
# streams as fast as it is answered from 127.0.0.2 (flood). With --rate-limit-rps 500 and without,
# alternating, ROUNDS rounds; prints each row and the medians of the measured client's p99.
# Usage: scripts/bench-rate-limit.sh [ROUNDS]   (default 3; about 35 s per run)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
BIN=${QUORATE_BIN:-target/release/quorate}
[ -x "$BIN" ] || cargo build --release -p quorate
OUT=$(mktemp -d)
trap 'kill "${PID:-}" 2>/dev/null || true; rm -rf "$OUT"' EXIT
run() {
  local label=$1; shift
  rm -rf "$OUT/d"
  "$BIN" server --name m1 --data-dir "$OUT/d" \
    --listen-client-urls http://127.0.0.1:24790 --advertise-client-urls http://127.0.0.1:24790 \
    --listen-peer-urls http://127.0.0.1:24800 --initial-advertise-peer-urls http://127.0.0.1:24800 \
    --initial-cluster m1=http://127.0.0.1:24800 --listen-http 127.0.0.1:24810 "$@" >"$OUT/$label.log" 2>&1 &
  PID=$!
  for _ in $(seq 50); do curl -sf http://127.0.0.1:24810/health >/dev/null 2>&1 && break; sleep 0.2; done
  "$BIN" bench --endpoints 127.0.0.1:24790 --ops put --clients 1 --pace 200 --seconds 10 \
    --readers none,burn,flood --json >"$OUT/$label.json"
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
}
for round in $(seq "$ROUNDS"); do
  run "limited-$round" --rate-limit-rps 500 --rate-limit-burst 500
  run "unlimited-$round"
done
python3 - "$OUT" <<'PY'
import json, statistics, sys, glob, os
out = sys.argv[1]
p99 = {}
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    mode = os.path.basename(f).rsplit("-", 1)[0]
    for r in json.load(open(f)):
        p99.setdefault((mode, r["reader"]), []).append(r["p99_ms"])
        print(f"{os.path.basename(f):22} {r['reader']:6} p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} max {r['max_ms']:.2f} "
              f"errors {r['errors']} flood refused {r['reads'] if r['reader'] == 'flood' else '-'}")
print()
for mode in ("limited", "unlimited"):
    base = statistics.median(p99[(mode, "none")])
    for reader in ("none", "burn", "flood"):
        m = statistics.median(p99[(mode, reader)])
        print(f"{mode:9} {reader:6} median p99 {m:.2f} ms  ({m / base:.2f}x alone)")
PY
