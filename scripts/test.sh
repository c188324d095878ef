#!/usr/bin/env bash
# The one gate: installs what the tests need, then checks formatting, lints and runs every
# test (unit tests and black-box tests against real quorate and etcd processes).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# etcdctl and etcd 3.4 (real clients and a real etcd to compare against), protoc (the Rust
# etcd-client crate compiles its protos with it), iproute2/nftables for fault tests, curl (a
# real HTTPS client for the TLS tests), and libfaketime for the drill's wall-clock jumps.
need=()
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v etcd >/dev/null || need+=(etcd-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
command -v curl >/dev/null || need+=(curl)
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || [ -e /usr/lib/faketime/libfaketime.so.1 ] || need+=(faketime)
if [ ${#need[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
# promtool (and a real prometheus) from Debian's prometheus package, to check and unit-test
# deploy/prometheus/alerts.yml. Without recommends (no node exporter); the packaged service is
# not needed (the tests start their own on a free loopback port), so it is stopped if the
# install started it.
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/prometheus ]; then
    as_root /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  fi
fi

# Go's own pprof reader (`go tool pprof`, Debian's golang-go) reads the CPU profiles that
# `quorate server --enable-pprof` serves (t12_pprof). Without recommends (no C toolchain).
if ! command -v go >/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends golang-go >/dev/null
fi

# Real registry clients from PyPI (py-consul, py-eureka-client) in a virtualenv the tests use.
PY=target/py
if ! "$PY/bin/python" -c 'import consul, py_eureka_client' 2>/dev/null; then
  python3 -m venv "$PY" 2>/dev/null || {
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    python3 -m venv "$PY"
  }
  "$PY/bin/pip" install -q py-consul==1.8.0 py-eureka-client==0.13.3
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The black-box tests run the quorate binary built here.
cargo build -p quorate
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --profile ci
else
  cargo test --workspace
fi

# The short split-brain drill (issue 5): 3 members in network namespaces, every fault kind
# once (quorum-loss included: a majority lost for good and recovered), about 3 minutes; it must report zero anomalies (exit 0). Needs root, as CI runs.
# The report stays in target/drill-ci (report.md, report.json, the members' logs).
if [ "$(id -u)" -eq 0 ]; then
  target/debug/quorate drill --short --seed 1 --faults all,quorum-loss --out target/drill-ci
else
  echo "skipping the drill: it needs root (network namespaces)"
fi
