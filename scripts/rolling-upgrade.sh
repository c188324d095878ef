#!/usr/bin/env bash
# Usage: scripts/rolling-upgrade.sh OLD_BINARY NEW_BINARY (needs etcdctl; ports 46179-46381).
# Env: ROLL_ARGS, more server flags for every member (e.g. "--snapshot-count 200", so that
# snapshots are stored and sent by both versions during the upgrade).
# Exits non-zero if an acknowledged write is missing.
# Rolling upgrade: 3 members on OLD_BINARY, a writer putting keys throughout,
# each member stopped (SIGTERM) and restarted on NEW_BINARY in turn; then every key
# acknowledged is read back from every member.
set -u
OLD=${1:?usage: scripts/rolling-upgrade.sh OLD_BINARY NEW_BINARY}; NEW=${2:?usage: scripts/rolling-upgrade.sh OLD_BINARY NEW_BINARY}; D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT; touch $D/acked
IC="m1=http://127.0.0.1:46180,m2=http://127.0.0.1:46280,m3=http://127.0.0.1:46380"
declare -A PID
start() { local n=$1 bin=$2; $bin server --name m$n --data-dir $D/m$n --listen-client-urls http://127.0.0.1:46${n}79 --advertise-client-urls http://127.0.0.1:46${n}79 --listen-peer-urls http://127.0.0.1:46${n}80 --initial-advertise-peer-urls http://127.0.0.1:46${n}80 --initial-cluster $IC --listen-http 127.0.0.1:46${n}81 ${ROLL_ARGS:-} >> $D/m$n.log 2>&1 & PID[$n]=$!; }
for n in 1 2 3; do start $n $OLD; done
sleep 4
EPS=127.0.0.1:46179,127.0.0.1:46279,127.0.0.1:46379
( i=0; end=$((SECONDS+60)); while [ $SECONDS -lt $end ]; do i=$((i+1)); if ETCDCTL_API=3 timeout 5 etcdctl --endpoints $EPS --command-timeout=3s put roll/k$i v$i >/dev/null 2>&1; then echo k$i >> $D/acked; fi; done ) &
W=$!
sleep 5
for n in 1 2 3; do
  echo "upgrade m$n ($(wc -l < $D/acked) acked so far)"
  kill ${PID[$n]}; wait ${PID[$n]} 2>/dev/null
  start $n $NEW
  sleep 8
  grep -h "raft log migrated" $D/m$n.log | tail -1 | cut -c1-160
done
wait $W
echo "writer done: $(wc -l < $D/acked) acknowledged"
lost=0
for n in 1 2 3; do
  got=$(ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:46${n}79 get roll/ --prefix --keys-only --consistency=s | grep -c .)
  echo "m$n serializable count: $got"
done
for k in $(cat $D/acked); do v=$(ETCDCTL_API=3 etcdctl --endpoints $EPS get roll/$k --print-value-only); [ "$v" = "v${k#k}" ] || { lost=$((lost+1)); echo "lost $k"; }; done
echo "lost: $lost"
for n in 1 2 3; do kill ${PID[$n]}; done; wait 2>/dev/null
[ "$lost" = 0 ]
