//! `quorate bench`: closed-loop load over the etcd v3 gRPC API. It speaks only the public
//! protocol, so the same run measures quorate and etcd alike.

pub mod registry;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use quorate_api_grpc::pb::etcdserverpb as pb;
use rand::Rng;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Op {
    /// Put of a random key in the key space.
    Put,
    /// Linearizable single-key Range.
    Get,
    /// Serializable single-key Range.
    GetSerializable,
    /// Txn: compare mod revision, then put.
    Txn,
    /// LeaseGrant followed by a Put attached to it (one op = both).
    LeasePut,
    /// One keep-alive round trip on a client's open stream, over a pool of leases large enough
    /// that one lease is rarely renewed twice within a second (as real clients renew).
    KeepAlive,
}

impl std::str::FromStr for Op {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Op> {
        Ok(match s {
            "put" => Op::Put,
            "get" => Op::Get,
            "get-s" | "get-serializable" => Op::GetSerializable,
            "txn" => Op::Txn,
            "lease-put" => Op::LeasePut,
            "keepalive" | "keep-alive" => Op::KeepAlive,
            other => bail!("unknown op {other:?} (put, get, get-s, txn, lease-put, keepalive)"),
        })
    }
}

/// A long read repeated by one more client while the measured clients run: what issue 11 calls a
/// client that "stalls writes by reading". It reads from the first endpoint (the leader, as
/// `scripts/bench.sh` orders them), where a stalled apply or heartbeat costs the most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reader {
    /// No reader: the idle baseline.
    None,
    /// A linearizable Range over the whole keyspace.
    Range,
    /// A watch of the whole keyspace from revision 1, read until it has replayed the history.
    Watch,
    /// `Maintenance.Snapshot`, every chunk.
    Snapshot,
    /// `Maintenance.HashKV` of the latest revision.
    HashKv,
    /// No request at all: one thread of pure computation at normal priority, beside the
    /// members. The control for the others: what any client that costs this machine one core
    /// (decoding 30 MB, the kernel copying it over loopback) does to write latency on two
    /// cores, whatever the server does.
    Burn,
    /// Not a reader: another client flooding the first endpoint with puts on 16 streams, as fast
    /// as it is answered, from another source address (127.0.0.2 toward an IPv4 loopback or
    /// `localhost` endpoint; elsewhere, from wherever the system picks), so
    /// that a per-client rate limit sees two clients. Its "long reads" are its requests refused
    /// with "too many requests". Measures whether a client over its rate costs the others.
    Flood,
}

impl std::str::FromStr for Reader {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Reader> {
        Ok(match s {
            "none" => Reader::None,
            "range" => Reader::Range,
            "watch" => Reader::Watch,
            "snapshot" => Reader::Snapshot,
            "hashkv" | "hash-kv" => Reader::HashKv,
            "burn" => Reader::Burn,
            "flood" => Reader::Flood,
            other => bail!("unknown reader {other:?} (none, range, watch, snapshot, hashkv, burn, flood)"),
        })
    }
}

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub endpoints: Vec<String>,
    pub ops: Vec<Op>,
    pub clients: Vec<usize>,
    pub duration: Duration,
    pub keys: u64,
    pub value_bytes: usize,
    /// gRPC connections shared by the clients (at most one per client).
    pub conns: usize,
    /// Each (op, clients) pair runs once per reader.
    pub readers: Vec<Reader>,
    /// Run the reader at the lowest CPU priority (nice 19): on a machine that also runs the
    /// members, what is left of a reader on another host, whose decoding costs the members
    /// nothing.
    pub reader_niced: bool,
    /// Every key the load touches starts with this (`bench/` by default).
    pub key_prefix: String,
    /// For `https://` endpoints: the CA their certificates chain to, and this client's
    /// certificate (etcdctl's `--cacert`, `--cert`, `--key`).
    pub tls: Option<std::sync::Arc<quorate_tls::Connector>>,
    /// Each measured client sends this many requests a second, on a fixed schedule, instead of
    /// the next as soon as the last is answered (`None`): a well-behaved client's latency, not
    /// the most a closed loop can push.
    pub pace: Option<f64>,
}

/// The key prefix `quorate bench` writes under.
pub const KEY_PREFIX: &str = "bench/";

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub op: Op,
    pub clients: usize,
    pub reader: Reader,
    /// Long reads the reader finished during the run (0 without one).
    pub reads: u64,
    pub ops: u64,
    pub errors: u64,
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

async fn connect(
    endpoints: &[String],
    n: usize,
    tls: Option<&std::sync::Arc<quorate_tls::Connector>>,
) -> anyhow::Result<Vec<Channel>> {
    let mut chans = Vec::new();
    for i in 0..n {
        let ep = &endpoints[i % endpoints.len()];
        let url = if ep.contains("://") { ep.clone() } else { format!("http://{ep}") };
        let endpoint = Endpoint::from_shared(url.clone())?.tcp_nodelay(true);
        let ch = match (url.starts_with("https://"), tls) {
            (true, Some(tls)) => {
                quorate_tls::connect(&endpoint, tls.clone()).await.with_context(|| format!("connect {url}"))?
            }
            (true, None) => anyhow::bail!("{url} is https://: give --cacert"),
            (false, _) => endpoint.connect().await.with_context(|| format!("connect {url}"))?,
        };
        chans.push(ch);
    }
    Ok(chans)
}

fn key(prefix: &str, i: u64) -> Vec<u8> {
    format!("{prefix}{i:010}").into_bytes()
}

async fn one(op: Op, ch: &Channel, prefix: &str, keys: u64, value: &[u8]) -> Result<(), tonic::Status> {
    let k = key(prefix, rand::rng().random_range(0..keys));
    let mut kv = pb::kv_client::KvClient::new(ch.clone());
    match op {
        Op::Put => {
            kv.put(pb::PutRequest { key: k, value: value.to_vec(), ..Default::default() }).await?;
        }
        Op::Get | Op::GetSerializable => {
            kv.range(pb::RangeRequest { key: k, serializable: op == Op::GetSerializable, ..Default::default() })
                .await?;
        }
        Op::Txn => {
            let cmp = pb::Compare {
                result: pb::compare::CompareResult::Greater as i32,
                target: pb::compare::CompareTarget::Mod as i32,
                key: k.clone(),
                range_end: vec![],
                target_union: Some(pb::compare::TargetUnion::ModRevision(-1)),
            };
            let put = pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: k,
                    value: value.to_vec(),
                    ..Default::default()
                })),
            };
            kv.txn(pb::TxnRequest { compare: vec![cmp], success: vec![put.clone()], failure: vec![put] }).await?;
        }
        Op::LeasePut => {
            let mut lease = pb::lease_client::LeaseClient::new(ch.clone());
            let id = lease.lease_grant(pb::LeaseGrantRequest { ttl: 60, id: 0 }).await?.into_inner().id;
            kv.put(pb::PutRequest { key: k, value: value.to_vec(), lease: id, ..Default::default() }).await?;
        }
        Op::KeepAlive => unreachable!("keep-alives run on a client's own stream (`keepalive_client`)"),
    }
    Ok(())
}

/// Leases renewed by a keep-alive run, shared out among its clients.
const KEEPALIVE_LEASES: usize = 2048;
/// Their TTL: long enough to outlive the run, short enough not to pile up across runs.
const KEEPALIVE_TTL_S: i64 = 30;

/// One keep-alive client: grant its share of the pool, then renew its leases in turn on one
/// stream until stopped. Returns (latencies in µs, errors).
/// `ready` is passed once the leases are granted, so the grants are not timed.
async fn keepalive_client(
    ch: Channel,
    share: usize,
    ready: Arc<tokio::sync::Barrier>,
    stop: Arc<AtomicBool>,
) -> Result<(Vec<u32>, u64), tonic::Status> {
    let mut lease = pb::lease_client::LeaseClient::new(ch);
    let mut ids = Vec::with_capacity(share);
    let mut granted = Ok(());
    for _ in 0..share {
        match lease.lease_grant(pb::LeaseGrantRequest { ttl: KEEPALIVE_TTL_S, id: 0 }).await {
            Ok(r) => ids.push(r.into_inner().id),
            Err(e) => {
                granted = Err(e);
                break;
            }
        }
    }
    ready.wait().await;
    granted?;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::LeaseKeepAliveRequest>(1);
    let requests = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    // The first request goes out with the call: etcd answers the stream's headers only with its
    // first message, so the call would not return before a request was sent.
    let mut t = Instant::now();
    let _ = tx.send(pb::LeaseKeepAliveRequest { id: ids[0] }).await;
    let mut answers = lease.lease_keep_alive(requests).await?.into_inner();
    let (mut lat_us, mut errors) = (Vec::with_capacity(1 << 14), 0u64);
    for (n, id) in ids.iter().cycle().enumerate() {
        if n > 0 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            t = Instant::now();
            if tx.send(pb::LeaseKeepAliveRequest { id: *id }).await.is_err() {
                break;
            }
        }
        match answers.message().await {
            Ok(Some(a)) if a.ttl > 0 => lat_us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32),
            Ok(Some(_)) => errors += 1,
            // The stream ended or failed: every further renewal would fail too.
            _ => {
                errors += 1;
                break;
            }
        }
    }
    Ok((lat_us, errors))
}

/// Fill the key space so reads find values.
pub async fn preload(cfg: &BenchConfig) -> anyhow::Result<()> {
    let chans = connect(&cfg.endpoints, cfg.conns.max(1), cfg.tls.as_ref()).await?;
    let value = vec![b'v'; cfg.value_bytes];
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..32 {
        let (ch, value, next, keys) = (chans[c % chans.len()].clone(), value.clone(), next.clone(), cfg.keys);
        let prefix = cfg.key_prefix.clone();
        tasks.push(tokio::spawn(async move {
            let mut kv = pb::kv_client::KvClient::new(ch);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return Ok::<(), tonic::Status>(());
                }
                kv.put(pb::PutRequest { key: key(&prefix, i), value: value.clone(), ..Default::default() }).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Repeats `reader`'s long read on its own connection until `stop`; returns how many finished.
/// A failed read ends the loop with the error: a reader that stops reading measures nothing.
async fn long_reads(ch: Channel, reader: Reader, stop: Arc<AtomicBool>) -> Result<u64, tonic::Status> {
    let mut kv = pb::kv_client::KvClient::new(ch.clone()).max_decoding_message_size(usize::MAX);
    let mut watch = pb::watch_client::WatchClient::new(ch.clone()).max_decoding_message_size(usize::MAX);
    let mut maint = pb::maintenance_client::MaintenanceClient::new(ch).max_decoding_message_size(usize::MAX);
    let all = || (vec![0u8], vec![0u8]);
    let mut reads = 0;
    while !stop.load(Ordering::Relaxed) {
        match reader {
            Reader::None => return Ok(0),
            Reader::Range => {
                let (key, range_end) = all();
                kv.range(pb::RangeRequest { key, range_end, ..Default::default() }).await?;
            }
            Reader::Watch => {
                let (key, range_end) = all();
                let upto = kv
                    .range(pb::RangeRequest {
                        key: key.clone(),
                        range_end: range_end.clone(),
                        count_only: true,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .header
                    .map_or(0, |h| h.revision);
                let create = pb::WatchRequest {
                    request_union: Some(pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
                        key,
                        range_end,
                        start_revision: 1,
                        ..Default::default()
                    })),
                };
                let mut events =
                    watch.watch(futures::stream::iter([create]).chain(futures::stream::pending())).await?.into_inner();
                // The replay is done once an event at (or after) the revision read above arrives.
                'replay: while let Some(resp) = events.message().await? {
                    if resp.canceled {
                        return Err(tonic::Status::aborted(format!("watch canceled: {}", resp.cancel_reason)));
                    }
                    if resp.events.iter().any(|e| e.kv.as_ref().is_some_and(|kv| kv.mod_revision >= upto)) {
                        break 'replay;
                    }
                }
            }
            Reader::Snapshot => {
                let mut chunks = maint.snapshot(pb::SnapshotRequest {}).await?.into_inner();
                while chunks.message().await?.is_some() {}
            }
            Reader::HashKv => {
                maint.hash_kv(pb::HashKvRequest { revision: 0 }).await?;
            }
            Reader::Burn => burn(Duration::from_millis(100)),
            Reader::Flood => unreachable!("the flood runs in `flood`"),
        }
        reads += 1;
    }
    Ok(reads)
}

/// Streams of the flooding client.
const FLOOD_STREAMS: usize = 16;

/// Puts on `FLOOD_STREAMS` streams from another source address until `stop`; how many were
/// refused with etcd's "too many requests" (anything else refused counts too: it is a flood).
async fn flood(
    endpoint: &str,
    prefix: &str,
    tls: Option<&Arc<quorate_tls::Connector>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<u64> {
    let url = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
    let mut ep = Endpoint::from_shared(url.clone())?.tcp_nodelay(true);
    let host = url.split("://").nth(1).and_then(|r| r.rsplit_once(':')).map(|(h, _)| h.to_string()).unwrap_or_default();
    if host == "localhost" || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback()) {
        ep = ep.local_address(Some("127.0.0.2".parse().expect("an address")));
    }
    let ch = match (url.starts_with("https://"), tls) {
        (true, Some(tls)) => quorate_tls::connect(&ep, tls.clone()).await?,
        (true, None) => bail!("{url} is https://: give --cacert"),
        (false, _) => ep.connect().await.with_context(|| format!("connect {url} from 127.0.0.2"))?,
    };
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..FLOOD_STREAMS {
        let (ch, stop, refused, key) = (ch.clone(), stop.clone(), refused.clone(), format!("{prefix}flood/{t}"));
        tasks.push(tokio::spawn(async move {
            let mut kv = pb::kv_client::KvClient::new(ch);
            while !stop.load(Ordering::Relaxed) {
                let put = pb::PutRequest { key: key.clone().into_bytes(), value: b"f".to_vec(), ..Default::default() };
                if kv.put(put).await.is_err() {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(refused.load(Ordering::Relaxed))
}

/// Computes for `d` without yielding: a "read" of the CPU-only reader.
fn burn(d: Duration) {
    let (t, mut x) = (Instant::now(), 0u64);
    while t.elapsed() < d {
        for i in 0..10_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
    }
}

pub async fn run_one(cfg: &BenchConfig, op: Op, clients: usize, reader: Reader) -> anyhow::Result<Row> {
    let chans = connect(&cfg.endpoints, cfg.conns.min(clients).max(1), cfg.tls.as_ref()).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let reading = match reader {
        Reader::None => None,
        // On a thread and runtime of its own, as another process would be: decoding a 30 MB
        // answer must not hold up the measured clients' tasks in this one.
        _ => {
            let (endpoint, stop, niced, tls) =
                (cfg.endpoints[0].clone(), stop.clone(), cfg.reader_niced, cfg.tls.clone());
            let prefix = cfg.key_prefix.clone();
            Some(std::thread::spawn(move || -> anyhow::Result<u64> {
                if niced {
                    quorate_api_grpc::lane::lower_this_thread();
                }
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async move {
                    if reader == Reader::Flood {
                        return flood(&endpoint, &prefix, tls.as_ref(), stop).await;
                    }
                    let ch = connect(&[endpoint], 1, tls.as_ref()).await?.remove(0);
                    Ok(long_reads(ch, reader, stop).await?)
                })
            }))
        }
    };
    let value = Arc::new(vec![b'v'; cfg.value_bytes]);
    let mut tasks = Vec::new();
    let ready = Arc::new(tokio::sync::Barrier::new(if op == Op::KeepAlive { clients + 1 } else { 1 }));
    for c in 0..clients {
        let (ch, stop, value, keys) = (chans[c % chans.len()].clone(), stop.clone(), value.clone(), cfg.keys);
        let prefix = cfg.key_prefix.clone();
        if op == Op::KeepAlive {
            let share = (KEEPALIVE_LEASES / clients).max(1);
            let ready = ready.clone();
            tasks.push(tokio::spawn(async move {
                keepalive_client(ch, share, ready, stop).await.unwrap_or((Vec::new(), 1))
            }));
            continue;
        }
        let pace = cfg.pace.filter(|p| *p > 0.0).map(|p| Duration::from_secs_f64(1.0 / p));
        tasks.push(tokio::spawn(async move {
            let mut lat_us: Vec<u32> = Vec::with_capacity(1 << 14);
            let mut errors = 0u64;
            let mut next = tokio::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if let Some(every) = pace {
                    // On schedule: a late answer does not push the next request back.
                    tokio::time::sleep_until(next).await;
                    next += every;
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                let t = Instant::now();
                match one(op, &ch, &prefix, keys, &value).await {
                    Ok(()) => lat_us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32),
                    Err(_) => errors += 1,
                }
            }
            (lat_us, errors)
        }));
    }
    ready.wait().await;
    let started = Instant::now();
    tokio::time::sleep(cfg.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let reads = match reading {
        None => 0,
        Some(t) => tokio::task::spawn_blocking(move || t.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the {reader:?} reader panicked"))?
            .with_context(|| format!("the {reader:?} reader failed"))?,
    };
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        all[i] as f64 / 1000.0
    };
    Ok(Row {
        op,
        clients,
        reader,
        reads,
        ops: all.len() as u64,
        errors,
        ops_per_s: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: all.last().map(|v| *v as f64 / 1000.0).unwrap_or(0.0),
    })
}

pub async fn run(cfg: &BenchConfig) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for op in &cfg.ops {
        for c in &cfg.clients {
            for reader in &cfg.readers {
                rows.push(run_one(cfg, *op, *c, *reader).await?);
            }
        }
    }
    Ok(rows)
}

pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| op | clients | reader | long reads | ops/s | p50 ms | p99 ms | max ms | errors |\n|---|---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {:?} | {} | {:?} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} |\n",
            r.op, r.clients, r.reader, r.reads, r.ops_per_s, r.p50_ms, r.p99_ms, r.max_ms, r.errors
        ));
    }
    s
}
