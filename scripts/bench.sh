#!/usr/bin/env bash
# Benchmark a 3-member quorate cluster against a 3-member etcd 3.4 cluster on this machine, in
# the same run, with the same load generator (`quorate bench`).
#
# Both clusters run side by side, idle while the other is measured, and every (op, clients)
# pair is run BENCH_ROUNDS times alternately against each (quorate first in odd rounds, etcd
# first in even ones). The table gives the median of the rounds, so a passing disturbance on a
# small shared machine moves one round, not the result.
#
# Usage: scripts/bench.sh [seconds-per-run]   (needs Debian's etcd-server for the baseline)
# Env:   BENCH_ROUNDS (default 3), BENCH_OUT (default target/bench), BENCH_OPS (default: every op;
#        empty: none), BENCH_READERS (default none: e.g. "range watch snapshot hashkv" adds a
#        table of 1-client put latency while one more client repeats each long read on the
#        leader, against the same run without one: issue 11's "no client stalls writes by reading"),
#        BENCH_READER_NICE (1: the reading client runs at nice 19, as if on another host),
#        BENCH_BIN (a quorate binary already built, for load generator and members alike; skips
#        the build: to measure while the tree is being edited),
#        BENCH_BASELINE_BIN (a quorate binary run in etcd's place, on etcd's ports: the
#        "etcd" columns are then that build, for a same-run before/after of a change),
#        BENCH_SERVER_BIN (the quorate binary the members run, default the one built here: to
#        measure an older build with today's load generator),
#        BENCH_TLS=1 (the cost of TLS: the "quorate" columns are quorate with mutual TLS on the
#        client and peer ports, the "etcd" columns the same build in plaintext; certificates
#        made here with openssl)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
ROUNDS=${BENCH_ROUNDS:-3}
if [ -z "${BENCH_BIN:-}" ]; then
  cargo build --release -p quorate
fi
BIN=${BENCH_BIN:-$PWD/target/release/quorate}
SERVER_BIN=${BENCH_SERVER_BIN:-$BIN}
OPS=${BENCH_OPS-put get get-s txn lease-put keepalive}
READERS=${BENCH_READERS:-}
OUT=${BENCH_OUT:-$PWD/target/bench}
rm -rf "$OUT" && mkdir -p "$OUT/runs"
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# Mean over the members of a /proc status field: VmRSS now, VmHWM the most it ever was.
status_kb() { local f=$1 t=0; shift; for p in "$@"; do t=$((t + $(awk -v f="$f:" '$1 == f {print $2}' /proc/$p/status))); done; echo $((t / $#)); }
rss_kb() { status_kb VmRSS "$@"; }

# Ports: quorate on 4{1,2,3}379/380, etcd on 5{1,2,3}379/380.
declare -A PORT=([quorate]=4 [etcd]=5) MEMBER_PIDS=() EPS=() SCHEME=([quorate]=http [etcd]=http)
declare -A CLIENT_TLS=([quorate]="" [etcd]="") SERVER_TLS=([quorate]="" [etcd]="")
if [ "${BENCH_TLS:-}" = 1 ]; then
  # One CA; one certificate for every member (SAN 127.0.0.1, server and client use) and one
  # for the load generator.
  T=$OUT/tls && mkdir -p "$T"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$T/ca.key" \
    -out "$T/ca.pem" -days 2 -subj /CN=bench-ca 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' >"$T/ext.cnf"
  for n in member client; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$T/$n.key" \
      -out "$T/$n.csr" -subj "/CN=$n" 2>/dev/null
    openssl x509 -req -in "$T/$n.csr" -CA "$T/ca.pem" -CAkey "$T/ca.key" -CAcreateserial \
      -out "$T/$n.pem" -days 2 -extfile "$T/ext.cnf" 2>/dev/null
  done
  SCHEME[quorate]=https
  CLIENT_TLS[quorate]="--cacert $T/ca.pem --cert $T/client.pem --key $T/client.key"
  SERVER_TLS[quorate]="--cert-file $T/member.pem --key-file $T/member.key --trusted-ca-file $T/ca.pem
    --client-cert-auth --peer-cert-file $T/member.pem --peer-key-file $T/member.key
    --peer-trusted-ca-file $T/ca.pem --peer-client-cert-auth"
  BENCH_BASELINE_BIN=$SERVER_BIN
fi
start_cluster() { # flavor
  local flavor=$1 p=${PORT[$1]} ic="" i pids=() s=${SCHEME[$1]}
  for i in 1 2 3; do ic="$ic,m$i=$s://127.0.0.1:$p${i}380"; done
  ic=${ic#,}
  for i in 1 2 3; do
    local common=(--name m$i --data-dir "$OUT/$flavor-m$i" --initial-cluster "$ic"
      --listen-client-urls $s://127.0.0.1:$p${i}379 --advertise-client-urls $s://127.0.0.1:$p${i}379
      --listen-peer-urls $s://127.0.0.1:$p${i}380 --initial-advertise-peer-urls $s://127.0.0.1:$p${i}380)
    if [ "$flavor" = quorate ]; then
      # shellcheck disable=SC2086
      "$SERVER_BIN" server "${common[@]}" --listen-http 127.0.0.1:$p${i}500 ${SERVER_TLS[$flavor]} \
        >"$OUT/$flavor-m$i.log" 2>&1 &
    elif [ -n "${BENCH_BASELINE_BIN:-}" ]; then
      "$BENCH_BASELINE_BIN" server "${common[@]}" --listen-http 127.0.0.1:$p${i}500 >"$OUT/$flavor-m$i.log" 2>&1 &
    else
      etcd "${common[@]}" >"$OUT/$flavor-m$i.log" 2>&1 &
    fi
    PIDS+=($!)
    pids+=($!)
  done
  MEMBER_PIDS[$flavor]="${pids[*]}"
  local all=$s://127.0.0.1:${p}1379,$s://127.0.0.1:${p}2379,$s://127.0.0.1:${p}3379
  local tls=${CLIENT_TLS[$flavor]}
  for _ in $(seq 100); do
    # shellcheck disable=SC2086
    ETCDCTL_API=3 etcdctl --endpoints=$all $tls endpoint health >/dev/null 2>&1 && break
    sleep 0.2
  done
  # shellcheck disable=SC2086
  ETCDCTL_API=3 etcdctl --endpoints=$all $tls endpoint health >/dev/null 2>&1 || {
    echo "$flavor cluster did not become healthy" >&2
    exit 1
  }
  # The leader first: a 1-client run uses the first endpoint only, and whether that member
  # leads (quorate's bootstrap and etcd's election pick different ones) would otherwise decide
  # half the result. The 64-client runs spread their connections over all three either way.
  local leader eps
  # shellcheck disable=SC2086
  leader=$(ETCDCTL_API=3 etcdctl --endpoints=$all $tls endpoint status | awk -F', ' '$5 == "true" {print $1}')
  eps=$leader
  for ep in ${all//,/ }; do [ "$ep" = "$leader" ] || eps="$eps,$ep"; done
  EPS[$flavor]=$eps
  echo "$flavor endpoints (leader first): $eps"
}

start_cluster quorate
start_cluster etcd
sleep 2
# RSS idle, then after 100k puts of 256-byte values (which also preload the keys the reads
# find), before any measured run: measured later, it would grow with however many writes each
# system managed in the runs.
for flavor in quorate etcd; do
  # shellcheck disable=SC2086
  echo "rss_idle_kb=$(rss_kb ${MEMBER_PIDS[$flavor]})" | tee "$OUT/$flavor.rss"
  # shellcheck disable=SC2086
  "$BIN" bench --endpoints "${EPS[$flavor]}" ${CLIENT_TLS[$flavor]} --ops put --clients 64 --keys 100000 --seconds 1 --preload >/dev/null
  # shellcheck disable=SC2086
  echo "rss_after_100k_puts_kb=$(rss_kb ${MEMBER_PIDS[$flavor]})" | tee -a "$OUT/$flavor.rss"
  # The 100k puts cross the default snapshot count (100 000), so a snapshot may be under way
  # when they end: the peak says what it cost, and the RSS a few seconds later what stays.
  # shellcheck disable=SC2086
  echo "rss_peak_kb=$(status_kb VmHWM ${MEMBER_PIDS[$flavor]})" | tee -a "$OUT/$flavor.rss"
  sleep 15
  # shellcheck disable=SC2086
  echo "rss_settled_kb=$(rss_kb ${MEMBER_PIDS[$flavor]})" | tee -a "$OUT/$flavor.rss"
done

run() { # flavor op clients round
  # shellcheck disable=SC2086
  "$BIN" bench --endpoints "${EPS[$1]}" ${CLIENT_TLS[$1]} --ops "$2" --clients "$3" --seconds "$SECS" --json \
    >"$OUT/runs/$1-$2-$3-$4.json"
}
for op in $OPS; do
  for clients in 1 64; do
    for round in $(seq "$ROUNDS"); do
      if [ $((round % 2)) = 1 ]; then order="quorate etcd"; else order="etcd quorate"; fi
      for flavor in $order; do run $flavor $op $clients $round; done
    done
    echo "done: $op x $clients"
  done
done
# Write latency under long reads: every round runs the idle baseline and each reader in turn.
if [ -n "$READERS" ]; then
  for round in $(seq "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then order="quorate etcd"; else order="etcd quorate"; fi
    for flavor in $order; do
      # shellcheck disable=SC2086
      "$BIN" bench --endpoints "${EPS[$flavor]}" ${CLIENT_TLS[$flavor]} --ops put --clients 1 --seconds "$SECS" --json \
        --readers "none,${READERS// /,}" ${BENCH_READER_NICE:+--readers-niced} >"$OUT/runs/$flavor-readers-$round.json"
    done
    echo "done: readers round $round"
  done
fi

if [ "${BENCH_TLS:-}" = 1 ]; then
  echo "TLS: the 'quorate' columns are quorate with mutual TLS (client and peer ports), the 'etcd' columns the same build in plaintext; ratio = TLS / plaintext"
elif [ -n "${BENCH_BASELINE_BIN:-}" ]; then
  echo "BASELINE: the 'etcd' columns below are quorate built as $BENCH_BASELINE_BIN, not etcd"
fi
python3 - "$OUT" "$ROUNDS" "$OPS" "$READERS" <<'PY'
import json, statistics, sys
out, rounds, ops = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
def rows(flavor, op, clients):
    return [json.load(open(f"{out}/runs/{flavor}-{op}-{clients}-{r}.json"))[0] for r in range(1, rounds + 1)]
print(f"median of {rounds} alternating rounds per row; ratio = quorate / etcd")
print("| op | clients | quorate ops/s | etcd ops/s | ratio | ratio per round | quorate p99 ms | etcd p99 ms |")
print("|---|---:|---:|---:|---:|---|---:|---:|")
for op in ops:
    for clients in (1, 64):
        q, e = rows("quorate", op, clients), rows("etcd", op, clients)
        qo = statistics.median(r["ops_per_s"] for r in q)
        eo = statistics.median(r["ops_per_s"] for r in e)
        per = " ".join(f'{a["ops_per_s"] / b["ops_per_s"]:.2f}' for a, b in zip(q, e))
        qp = statistics.median(r["p99_ms"] for r in q)
        ep = statistics.median(r["p99_ms"] for r in e)
        print(f'| {q[0]["op"]} | {clients} | {qo:.0f} | {eo:.0f} | {qo / eo:.2f}x | {per} | {qp:.2f} | {ep:.2f} |')
for f in ("quorate", "etcd"):
    print(f, open(f"{out}/{f}.rss").read().replace("\n", " "))
readers = sys.argv[4].split()
if readers:
    print(f"\nput, 1 client, while one more client repeats a long read on the leader (100k keys);")
    print(f"median of {rounds} rounds; 'x idle' = p99 under the reader / p99 without one, same round")
    print("| reader | quorate p99 ms | x idle | reads | etcd p99 ms | x idle | reads | quorate max ms | etcd max ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    runs = {f: [json.load(open(f"{out}/runs/{f}-readers-{r}.json")) for r in range(1, rounds + 1)] for f in ("quorate", "etcd")}
    for reader in ["none"] + readers:
        cells = []
        for f in ("quorate", "etcd"):
            rs = [next(x for x in run if x["reader"] == reader.replace("hashkv", "hash-kv")) for run in runs[f]]
            idle = [next(x for x in run if x["reader"] == "none") for run in runs[f]]
            p99 = statistics.median(r["p99_ms"] for r in rs)
            times = statistics.median(r["p99_ms"] / i["p99_ms"] for r, i in zip(rs, idle))
            reads = statistics.median(r["reads"] for r in rs)
            cells.append((p99, times, reads, statistics.median(r["max_ms"] for r in rs)))
        (qp, qx, qr, qm), (ep, ex, er, em) = cells
        print(f"| {reader} | {qp:.2f} | {qx:.2f}x | {qr:.0f} | {ep:.2f} | {ex:.2f}x | {er:.0f} | {qm:.1f} | {em:.1f} |")
PY
