//! The clients: concurrent etcd-API clients, each pinned to one member (as in Jepsen), doing
//! reads (linearizable and serializable), writes with unique values, deletes, compare-and-set
//! transactions, lease sessions (grant, put with the lease, keepalive, revoke or abandon) and,
//! against quorate, fenced lock sessions guarding a counter; one watcher per member. Every
//! operation is recorded with monotonic times and its outcome, unknown when it timed out or
//! failed in a way that does not say whether it happened.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quorate_api_grpc::pb::etcdserverpb as pb;
use quorate_api_grpc::pb::mvccpb::event::EventType;
use quorate_api_grpc::pb::v3lockpb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::check::lease_expiry::{Deletion, LeaseAnswer, Revoke};
use crate::check::leases::AfterRevoke;
use crate::check::locks::Accepted;
use crate::check::primaries::Win;
use crate::check::revisions::Acked;
use crate::check::watch::Change;
use crate::history::{Input, Op, Output};

/// How long a client waits for any one answer before calling the outcome unknown.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Register keys live this long before the clients move to fresh ones, so each key's history
/// stays small enough to check exhaustively (Jepsen's independent keys).
const KEY_GENERATION: Duration = Duration::from_secs(8);
const KEYS_PER_GENERATION: u64 = 5;
const LEASE_TTL_S: i64 = 3;
pub const LOCK_NAME: &str = "drill/lock";
pub const COUNTER_KEY: &str = "drill/counter";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Failed,
    Unknown,
}

/// Every operation, for the per-phase counts and the liveness figures.
#[derive(Clone, Debug, Serialize)]
pub struct OpStat {
    pub kind: &'static str,
    pub client: u32,
    pub invoke_ms: u64,
    pub complete_ms: u64,
    pub outcome: Outcome,
}

#[derive(Default)]
pub struct Recorded {
    pub register: Vec<Op>,
    pub stats: Vec<OpStat>,
    pub acked: Vec<Acked>,
    pub lease_reads: Vec<AfterRevoke>,
    /// Keys attached to leases that were revoked or left to expire: gone by the end.
    pub lease_keys: Vec<(String, i64)>,
    pub lock_accepted: Vec<Accepted>,
    pub lock_refused: u64,
    pub lock_unknown: u64,
    pub register_keys: BTreeSet<String>,
    /// Per watcher (member slot), what each watch response delivered.
    pub watches: Vec<(usize, i64, Vec<Vec<Change>>)>,
    /// Every answer to a lease grant or keep-alive, with when it arrived and the TTL promised.
    pub lease_answers: Vec<LeaseAnswer>,
    /// Every revoke a client invoked.
    pub lease_revokes: Vec<Revoke>,
    /// Keys of leases seen deleted by the lease watchers.
    pub lease_deletions: Vec<Deletion>,
    /// The primary election's winning Txns.
    pub primary_wins: Vec<Win>,
    /// The primaries' fenced writes: accepted, refused (compare failed), unknown.
    pub primary_work: [u64; 3],
    /// What went wrong in `quorum-loss` recoveries (a refused plan, a dropped member not
    /// fenced, the survivors' term moved by one): each is an anomaly.
    pub recovery_failures: Vec<String>,
    /// `quorum-loss` recoveries carried out.
    pub recoveries: usize,
}

pub struct Recorder {
    pub start: Instant,
    pub rec: Mutex<Recorded>,
    /// Set while a fault needs the cluster quiet (`quorum-loss`): every writer waits before its
    /// next operation (watchers go on).
    pub hold: std::sync::atomic::AtomicBool,
    /// Writers between `wait_while_held` and the end of their operation (`Busy`).
    pub busy: std::sync::atomic::AtomicUsize,
}

/// A writer's operation under way: counted in `Recorder::busy` until dropped.
pub struct Busy<'a>(&'a Recorder);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Recorder {
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            start: Instant::now(),
            rec: Mutex::default(),
            hold: Default::default(),
            busy: Default::default(),
        })
    }

    /// Wait while a fault holds the writers; the operation that follows is `Busy` until the
    /// guard is dropped, so a fault that holds them can wait for every one under way to end.
    pub async fn wait_while_held(&self) -> Busy<'_> {
        loop {
            self.busy.fetch_add(1, Ordering::SeqCst);
            if !self.hold.load(Ordering::SeqCst) {
                return Busy(self);
            }
            self.busy.fetch_sub(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub(crate) fn stat(&self, kind: &'static str, client: u32, invoke_ns: u64, outcome: Outcome) {
        let s = OpStat { kind, client, invoke_ms: invoke_ns / 1_000_000, complete_ms: self.now_ms(), outcome };
        self.rec.lock().unwrap().stats.push(s);
    }

    /// A grant or keep-alive answer for `lease` arrived now, promising `ttl_s` (0: not found).
    pub(crate) fn lease_answer(&self, client: u32, lease: i64, ttl_s: i64) {
        let a = LeaseAnswer { client, lease, at_ns: self.now_ns(), ttl_s };
        self.rec.lock().unwrap().lease_answers.push(a);
    }

    /// A revoke of `lease` is being invoked now (recorded whatever its outcome).
    pub(crate) fn revoke_invoked(&self, client: u32, lease: i64) {
        let r = Revoke { client, lease, invoke_ns: self.now_ns() };
        self.rec.lock().unwrap().lease_revokes.push(r);
    }
}

pub fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string())
        .expect("member URL")
        .connect_timeout(Duration::from_secs(1))
        .timeout(OP_TIMEOUT)
        .connect_lazy()
}

pub(crate) async fn timed<T, F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>>(
    f: F,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded("drill client timeout")),
    }
}

pub(crate) fn rev_of(h: &Option<pb::ResponseHeader>) -> i64 {
    h.as_ref().map_or(0, |h| h.revision)
}

pub struct ClientCfg {
    pub id: u32,
    pub url: String,
    pub seed: u64,
    pub locks: bool,
}

struct Client {
    cfg: ClientCfg,
    rec: Arc<Recorder>,
    kv: pb::kv_client::KvClient<Channel>,
    lease: pb::lease_client::LeaseClient<Channel>,
    lock: v3lockpb::lock_client::LockClient<Channel>,
    rng: StdRng,
    seq: u64,
    n: u64,
    last_read: HashMap<String, Option<String>>,
}

/// Run one client until `stop`.
pub async fn run_client(cfg: ClientCfg, rec: Arc<Recorder>, stop: Arc<AtomicBool>) {
    let ch = channel(&cfg.url);
    let mut c = Client {
        rng: StdRng::seed_from_u64(cfg.seed ^ u64::from(cfg.id).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        kv: pb::kv_client::KvClient::new(ch.clone()),
        lease: pb::lease_client::LeaseClient::new(ch.clone()),
        lock: v3lockpb::lock_client::LockClient::new(ch),
        cfg,
        rec,
        seq: 0,
        n: 0,
        last_read: HashMap::new(),
    };
    while !stop.load(Ordering::Relaxed) {
        let rec = c.rec.clone();
        let _busy = rec.wait_while_held().await;
        let roll = c.rng.random_range(0..100);
        let unknown = match roll {
            0..35 => c.register(Input::Read).await,
            35..45 => c.read_serializable().await,
            45..70 => {
                let v = c.value();
                c.register(Input::Write(v)).await
            }
            70..85 => {
                let key = c.key();
                let expected = c.last_read.get(&key).cloned().flatten();
                let v = c.value();
                c.register_at(key, Input::Cas { expected, new: v }).await
            }
            85..90 => c.register(Input::Delete).await,
            90..95 => c.lease_session().await,
            _ if c.cfg.locks => c.lock_session().await,
            _ => {
                let v = c.value();
                c.register(Input::Write(v)).await
            }
        };
        let pause = if unknown { 300 } else { c.rng.random_range(5..25) };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// A refusal a quorate member gives before anything reaches Raft (its client gate: removed,
/// isolated, fenced by a recovery): the operation certainly did not happen.
fn refused_at_the_door(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable
        && [
            "permanently removed from the cluster",
            "this member is isolated since",
            "this member belongs to incarnation",
        ]
        .iter()
        .any(|m| s.message().contains(m))
}

impl Client {
    fn key(&mut self) -> String {
        let generation = self.rec.start.elapsed().as_millis() as u64 / KEY_GENERATION.as_millis() as u64;
        format!("r{generation:05}-{}", self.rng.random_range(0..KEYS_PER_GENERATION))
    }

    fn value(&mut self) -> String {
        self.n += 1;
        format!("c{}-{}", self.cfg.id, self.n)
    }

    fn ack(&mut self, revision: i64, write: bool) {
        self.seq += 1;
        let a = Acked { client: self.cfg.id, seq: self.seq, revision, write };
        self.rec.rec.lock().unwrap().acked.push(a);
    }

    async fn register(&mut self, input: Input) -> bool {
        let key = self.key();
        self.register_at(key, input).await
    }

    /// One register operation, recorded for the linearizability checker. True when unknown.
    async fn register_at(&mut self, key: String, input: Input) -> bool {
        let invoke = self.rec.now_ns();
        let k = key.clone().into_bytes();
        let (kind, result): (&'static str, Result<(Output, i64, bool), tonic::Status>) = match &input {
            Input::Read => {
                let r = timed(self.kv.range(pb::RangeRequest { key: k, ..Default::default() })).await;
                let r = r.map(|r| {
                    let v = r.kvs.first().map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
                    (Output::Read(v), rev_of(&r.header), false)
                });
                ("get", r)
            }
            Input::Write(v) => {
                let req = pb::PutRequest { key: k, value: v.clone().into_bytes(), ..Default::default() };
                ("put", timed(self.kv.put(req)).await.map(|r| (Output::Done, rev_of(&r.header), true)))
            }
            Input::Delete => {
                let req = pb::DeleteRangeRequest { key: k, ..Default::default() };
                // Deleting an absent key changes nothing and takes no revision of its own.
                let r = timed(self.kv.delete_range(req)).await;
                ("delete", r.map(|r| (Output::Done, rev_of(&r.header), r.deleted > 0)))
            }
            Input::Cas { expected, new } => {
                use pb::compare::{CompareResult, CompareTarget, TargetUnion};
                let cmp = match expected {
                    Some(v) => pb::Compare {
                        result: CompareResult::Equal as i32,
                        target: CompareTarget::Value as i32,
                        key: k.clone(),
                        range_end: vec![],
                        target_union: Some(TargetUnion::Value(v.clone().into_bytes())),
                    },
                    None => pb::Compare {
                        result: CompareResult::Equal as i32,
                        target: CompareTarget::Create as i32,
                        key: k.clone(),
                        range_end: vec![],
                        target_union: Some(TargetUnion::CreateRevision(0)),
                    },
                };
                let put = pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                        key: k,
                        value: new.clone().into_bytes(),
                        ..Default::default()
                    })),
                };
                let req = pb::TxnRequest { compare: vec![cmp], success: vec![put], failure: vec![] };
                let r = timed(self.kv.txn(req)).await;
                ("cas", r.map(|r| (Output::Cas(r.succeeded), rev_of(&r.header), r.succeeded)))
            }
        };
        self.rec.rec.lock().unwrap().register_keys.insert(key.clone());
        match result {
            Ok((output, revision, wrote)) => {
                if let Output::Read(v) = &output {
                    self.last_read.insert(key.clone(), v.clone());
                }
                let op = Op {
                    client: self.cfg.id,
                    key,
                    invoke,
                    complete: Some(self.rec.now_ns()),
                    input,
                    output: Some(output),
                };
                self.rec.rec.lock().unwrap().register.push(op);
                self.ack(revision, wrote);
                self.rec.stat(kind, self.cfg.id, invoke, Outcome::Ok);
                false
            }
            Err(s) if input == Input::Read || refused_at_the_door(&s) => {
                self.rec.stat(kind, self.cfg.id, invoke, Outcome::Failed);
                false
            }
            Err(_) => {
                // It may have happened, at any time from now on.
                let op = Op { client: self.cfg.id, key, invoke, complete: None, input, output: None };
                self.rec.rec.lock().unwrap().register.push(op);
                self.rec.stat(kind, self.cfg.id, invoke, Outcome::Unknown);
                true
            }
        }
    }

    async fn read_serializable(&mut self) -> bool {
        let invoke = self.rec.now_ns();
        let key = self.key().into_bytes();
        let r = timed(self.kv.range(pb::RangeRequest { key, serializable: true, ..Default::default() })).await;
        let outcome = if r.is_ok() { Outcome::Ok } else { Outcome::Failed };
        self.rec.stat("get-serializable", self.cfg.id, invoke, outcome);
        false
    }

    /// Grant, put with the lease, keep it alive once, then revoke it (and read the key back)
    /// or abandon it to expire. Either way its key must be gone by the end.
    async fn lease_session(&mut self) -> bool {
        let invoke = self.rec.now_ns();
        let grant = timed(self.lease.lease_grant(pb::LeaseGrantRequest { ttl: LEASE_TTL_S, id: 0 })).await;
        let Ok(grant) = grant else {
            // An unknown grant without a key attached cannot leave anything behind.
            self.rec.stat("lease-grant", self.cfg.id, invoke, Outcome::Unknown);
            return true;
        };
        self.rec.stat("lease-grant", self.cfg.id, invoke, Outcome::Ok);
        self.rec.lease_answer(self.cfg.id, grant.id, grant.ttl);
        let id = grant.id;
        let key = format!("l/{}-{}", self.cfg.id, self.n);
        self.n += 1;
        let invoke = self.rec.now_ns();
        let put = pb::PutRequest {
            key: key.clone().into_bytes(),
            value: b"leased".to_vec(),
            lease: id,
            ..Default::default()
        };
        let put = timed(self.kv.put(put)).await;
        self.rec.rec.lock().unwrap().lease_keys.push((key.clone(), id));
        match put {
            Ok(r) => {
                self.ack(rev_of(&r.header), true);
                self.rec.stat("lease-put", self.cfg.id, invoke, Outcome::Ok);
            }
            Err(_) => {
                self.rec.stat("lease-put", self.cfg.id, invoke, Outcome::Unknown);
                return true;
            }
        }
        let invoke = self.rec.now_ns();
        let ka = futures::stream::iter([pb::LeaseKeepAliveRequest { id }]);
        let kept = tokio::time::timeout(OP_TIMEOUT, async {
            let mut s = self.lease.lease_keep_alive(ka).await?.into_inner();
            s.message().await
        })
        .await;
        let outcome = match kept {
            Ok(Ok(Some(answer))) => {
                self.rec.lease_answer(self.cfg.id, id, answer.ttl);
                Outcome::Ok
            }
            _ => Outcome::Failed,
        };
        self.rec.stat("lease-keepalive", self.cfg.id, invoke, outcome);
        if self.rng.random_range(0..3) == 0 {
            return false; // abandoned: it expires on its own
        }
        let invoke = self.rec.now_ns();
        self.rec.revoke_invoked(self.cfg.id, id);
        let revoke = timed(self.lease.lease_revoke(pb::LeaseRevokeRequest { id })).await;
        let Ok(revoke) = revoke else {
            self.rec.stat("lease-revoke", self.cfg.id, invoke, Outcome::Unknown);
            return true;
        };
        self.rec.stat("lease-revoke", self.cfg.id, invoke, Outcome::Ok);
        let revoked_at = rev_of(&revoke.header);
        let read = timed(self.kv.range(pb::RangeRequest { key: key.clone().into_bytes(), ..Default::default() })).await;
        if let Ok(r) = read {
            let check =
                AfterRevoke { key, lease: id, revoked_at, read_at: rev_of(&r.header), present: !r.kvs.is_empty() };
            self.rec.rec.lock().unwrap().lease_reads.push(check);
        }
        false
    }

    /// Take the lock with a short lease, sometimes stall past the lease (a paused holder),
    /// then do a fenced read-modify-write of the counter, and let go.
    async fn lock_session(&mut self) -> bool {
        let invoke = self.rec.now_ns();
        let Ok(grant) = timed(self.lease.lease_grant(pb::LeaseGrantRequest { ttl: LEASE_TTL_S, id: 0 })).await else {
            self.rec.stat("lock", self.cfg.id, invoke, Outcome::Unknown);
            return true;
        };
        self.rec.lease_answer(self.cfg.id, grant.id, grant.ttl);
        let req = v3lockpb::LockRequest { name: LOCK_NAME.as_bytes().to_vec(), lease: grant.id };
        let locked = tokio::time::timeout(Duration::from_secs(6), self.lock.lock(req)).await;
        let Ok(Ok(resp)) = locked else {
            self.rec.revoke_invoked(self.cfg.id, grant.id);
            let _ = timed(self.lease.lease_revoke(pb::LeaseRevokeRequest { id: grant.id })).await;
            self.rec.stat("lock", self.cfg.id, invoke, Outcome::Unknown);
            return true;
        };
        let fence = resp.metadata().get("quorate-fence").and_then(|v| v.to_str().ok()).map(str::to_string);
        let lock_key = resp.into_inner().key;
        self.rec.stat("lock", self.cfg.id, invoke, Outcome::Ok);
        let Some(fence) = fence else { return false };
        let token: i64 = fence.rsplit_once('@').and_then(|(_, r)| r.parse().ok()).unwrap_or(0);
        if self.rng.random_range(0..4) == 0 {
            // A paused holder: its lease runs out meanwhile, someone else may take the lock.
            tokio::time::sleep(Duration::from_millis(LEASE_TTL_S as u64 * 1000 + 1500)).await;
        }
        let invoke = self.rec.now_ns();
        let read = timed(self.kv.range(pb::RangeRequest { key: COUNTER_KEY.into(), ..Default::default() })).await;
        let current: i64 = match read {
            Ok(r) => r.kvs.first().and_then(|kv| String::from_utf8_lossy(&kv.value).parse().ok()).unwrap_or(0),
            Err(_) => return true,
        };
        let mut put = tonic::Request::new(pb::PutRequest {
            key: COUNTER_KEY.into(),
            value: (current + 1).to_string().into_bytes(),
            ..Default::default()
        });
        put.metadata_mut().insert("quorate-fence", fence.parse().expect("ascii fence"));
        let written = timed(self.kv.put(put)).await;
        let unknown = match written {
            Ok(r) => {
                let revision = rev_of(&r.header);
                self.ack(revision, true);
                self.rec.rec.lock().unwrap().lock_accepted.push(Accepted { token, revision });
                self.rec.stat("fenced-put", self.cfg.id, invoke, Outcome::Ok);
                false
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                self.rec.rec.lock().unwrap().lock_refused += 1;
                self.rec.stat("fenced-put", self.cfg.id, invoke, Outcome::Failed);
                false
            }
            Err(_) => {
                self.rec.rec.lock().unwrap().lock_unknown += 1;
                self.rec.stat("fenced-put", self.cfg.id, invoke, Outcome::Unknown);
                true
            }
        };
        let _ = timed(self.lock.unlock(v3lockpb::UnlockRequest { key: lock_key })).await;
        self.rec.revoke_invoked(self.cfg.id, grant.id);
        let _ = timed(self.lease.lease_revoke(pb::LeaseRevokeRequest { id: grant.id })).await;
        unknown
    }
}

/// A watch on the register keys from `from`, and the sender that keeps its request stream
/// open (dropping it ends the watch).
pub async fn watch_registers(
    url: &str,
    from: i64,
) -> anyhow::Result<(tokio::sync::mpsc::Sender<pb::WatchRequest>, tonic::Streaming<pb::WatchResponse>)> {
    watch_range(url, b"r", b"s", from).await
}

/// A watch on [key, range_end) (an empty `range_end`: `key` alone) from `from`, and the sender
/// that keeps its request stream open (dropping it ends the watch).
pub async fn watch_range(
    url: &str,
    key: &[u8],
    range_end: &[u8],
    from: i64,
) -> anyhow::Result<(tokio::sync::mpsc::Sender<pb::WatchRequest>, tonic::Streaming<pb::WatchResponse>)> {
    let mut client = pb::watch_client::WatchClient::new(channel(url));
    let create = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
            key: key.to_vec(),
            range_end: range_end.to_vec(),
            start_revision: from,
            ..Default::default()
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(create).await?;
    let stream = tokio::time::timeout(OP_TIMEOUT, client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .map_err(|_| anyhow::anyhow!("watch did not start in time"))??;
    Ok((tx, stream.into_inner()))
}

/// What one watch response delivered, as (revision, key).
pub fn changes_of(w: &pb::WatchResponse) -> Vec<Change> {
    w.events
        .iter()
        .filter_map(|e| e.kv.as_ref())
        .map(|kv| (kv.mod_revision, String::from_utf8_lossy(&kv.key).into_owned()))
        .collect()
}

/// Watch the register keys from `start` on member `slot` until `stop`, resuming after every
/// broken stream from the revision after the last one seen.
pub async fn run_watcher(slot: usize, url: String, start: i64, rec: Arc<Recorder>, stop: Arc<AtomicBool>) {
    let mut deliveries: Vec<Vec<Change>> = Vec::new();
    let mut next = start;
    while !stop.load(Ordering::Relaxed) {
        let Ok((tx, mut resp)) = watch_registers(&url, next).await else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        loop {
            let msg = tokio::select! {
                m = resp.message() => m,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if stop.load(Ordering::Relaxed) { break; }
                    continue;
                }
            };
            match msg {
                Ok(Some(w)) if w.canceled => break,
                Ok(Some(w)) => {
                    let changes = changes_of(&w);
                    if let Some(last) = changes.last() {
                        next = last.0 + 1;
                    }
                    if !changes.is_empty() {
                        deliveries.push(changes);
                    }
                }
                _ => break,
            }
        }
        drop(tx);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    rec.rec.lock().unwrap().watches.push((slot, start, deliveries));
}

/// Watch the keys of leases, [key, range_end), on member `slot` from `start` until `stop`,
/// resuming after every broken stream from the revision after the last one seen, as
/// `run_watcher` does. Each PUT tells which lease the key carries now; each DELETE of a key
/// that carried one is recorded, with the time the event arrived, for the lease-expiry
/// checker (which sets aside the deletions a client asked for by revoking).
pub async fn run_lease_watcher(
    slot: usize,
    url: String,
    key: &'static str,
    range_end: &'static str,
    start: i64,
    rec: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) {
    let observer = format!("watcher on member slot {slot} ({key}{})", if range_end.is_empty() { "" } else { "*" });
    let mut carried: HashMap<Vec<u8>, i64> = HashMap::new();
    let mut next = start;
    while !stop.load(Ordering::Relaxed) {
        let Ok((tx, mut resp)) = watch_range(&url, key.as_bytes(), range_end.as_bytes(), next).await else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        loop {
            let msg = tokio::select! {
                m = resp.message() => m,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if stop.load(Ordering::Relaxed) { break; }
                    continue;
                }
            };
            let w = match msg {
                Ok(Some(w)) if !w.canceled => w,
                _ => break,
            };
            let at_ns = rec.now_ns();
            for e in &w.events {
                let Some(kv) = e.kv.as_ref() else { continue };
                next = next.max(kv.mod_revision + 1);
                if e.r#type == EventType::Delete as i32 {
                    if let Some(lease) = carried.remove(&kv.key).filter(|&l| l != 0) {
                        let d = Deletion {
                            observer: observer.clone(),
                            key: String::from_utf8_lossy(&kv.key).into_owned(),
                            lease,
                            revision: kv.mod_revision,
                            at_ns,
                        };
                        rec.rec.lock().unwrap().lease_deletions.push(d);
                    }
                } else {
                    carried.insert(kv.key.clone(), kv.lease);
                }
            }
        }
        drop(tx);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
