//! The seed's primary election (issue 11), as a workload: a few candidates, each pinned to one
//! member, loop: grant a short lease, `Txn If(CreateRevision(drill/primary) == 0)
//! Then(Put(drill/primary, me, lease))`. The winner keeps its lease alive every TTL/3 and does
//! fenced work (`Txn If(CreateRevision(drill/primary) == its create revision) Then
//! Put(drill/primary-work)`), until it resigns (revokes) or, more often, abandons: it stops
//! renewing without revoking, as a crashed primary would, so its lease must expire before
//! anyone else can win. Losers revoke their unused lease and retry after a short sleep.
//!
//! Everything the checkers need is recorded: every grant and keep-alive answer with its arrival
//! time and TTL, every revoke invoked, every winning Txn. A losing Txn also reads the key (its
//! failure branch), so a later win is a read-side observation for the lease-expiry checker: the
//! key of the holder last seen was gone by the time the win's answer arrived. The module never judges anything
//! itself (`check::primaries` and `check::lease_expiry` do).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quorate_api_grpc::pb::etcdserverpb as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

use crate::check::lease_expiry::Deletion;
use crate::check::primaries::Win;
use crate::workload::{channel, rev_of, timed, Outcome, Recorder, OP_TIMEOUT};

pub const PRIMARY_KEY: &str = "drill/primary";
pub const PRIMARY_WORK_KEY: &str = "drill/primary-work";
/// The seed's pattern uses a few seconds; short, so that abandoned primaries turn over often.
pub const PRIMARY_TTL_S: i64 = 3;
pub const CANDIDATES: usize = 3;
/// Candidates' client ids start here, apart from the register clients'.
pub const CANDIDATE_ID_BASE: u32 = 1000;
/// How long a primary serves before it resigns or abandons.
const SERVE_MS: Range<u64> = 2_000..9_000;
/// A loser's sleep before it tries again.
const RETRY_MS: Range<u64> = 200..600;
/// After an unknown answer, wait this long (the member may be gone).
const UNKNOWN_RETRY_MS: u64 = 300;
/// How often a stopped-or-not check interrupts a wait.
const STOP_POLL: Duration = Duration::from_millis(100);

struct Candidate {
    id: u32,
    rec: Arc<Recorder>,
    kv: pb::kv_client::KvClient<Channel>,
    lease: pb::lease_client::LeaseClient<Channel>,
    rng: StdRng,
    work_n: u64,
    /// The lease of the holder this candidate's last losing Txn saw on the key.
    holder_seen: Option<i64>,
}

/// Run candidate `index` against the member at `url` until `stop`.
pub async fn run_candidate(index: usize, url: String, seed: u64, rec: Arc<Recorder>, stop: Arc<AtomicBool>) {
    let id = CANDIDATE_ID_BASE + index as u32;
    let ch = channel(&url);
    let mut c = Candidate {
        id,
        rec,
        kv: pb::kv_client::KvClient::new(ch.clone()),
        lease: pb::lease_client::LeaseClient::new(ch),
        rng: StdRng::seed_from_u64(seed ^ u64::from(id).wrapping_mul(0xd6e8_feb8_6659_fd93)),
        work_n: 0,
        holder_seen: None,
    };
    while !stop.load(Ordering::Relaxed) {
        // Not kept over the campaign: it holds a primary's serving loop, which waits on its own.
        drop(c.rec.wait_while_held().await);
        let pause_ms = c.campaign(&stop).await;
        sleep_unless_stopped(Duration::from_millis(pause_ms), &stop).await;
    }
}

async fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        tokio::time::sleep(STOP_POLL.min(until.saturating_duration_since(Instant::now()))).await;
    }
}

fn create_revision_is(revision: i64) -> pb::Compare {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    pb::Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: PRIMARY_KEY.into(),
        range_end: vec![],
        target_union: Some(TargetUnion::CreateRevision(revision)),
    }
}

fn put_op(key: &str, value: String, lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.into(),
            value: value.into_bytes(),
            lease,
            ..Default::default()
        })),
    }
}

impl Candidate {
    /// One try at becoming primary, and the time served if it won. Returns how long to wait
    /// before the next try, in ms.
    async fn campaign(&mut self, stop: &AtomicBool) -> u64 {
        let invoke = self.rec.now_ns();
        let grant = timed(self.lease.lease_grant(pb::LeaseGrantRequest { ttl: PRIMARY_TTL_S, id: 0 })).await;
        let Ok(grant) = grant else {
            self.rec.stat("primary-grant", self.id, invoke, Outcome::Unknown);
            return UNKNOWN_RETRY_MS;
        };
        self.rec.stat("primary-grant", self.id, invoke, Outcome::Ok);
        self.rec.lease_answer(self.id, grant.id, grant.ttl);
        let lease = grant.id;
        let invoke = self.rec.now_ns();
        let req = pb::TxnRequest {
            compare: vec![create_revision_is(0)],
            success: vec![put_op(PRIMARY_KEY, format!("candidate-{}", self.id), lease)],
            failure: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                    key: PRIMARY_KEY.into(),
                    ..Default::default()
                })),
            }],
        };
        match timed(self.kv.txn(req)).await {
            Ok(r) if r.succeeded => {
                let win =
                    Win { candidate: self.id, lease, at_ns: self.rec.now_ns(), create_revision: rev_of(&r.header) };
                if let Some(gone) = self.holder_seen.take().filter(|&l| l != 0 && l != lease) {
                    // Only its lease's end (expiry or a revoke) removes the key.
                    let d = Deletion {
                        observer: format!("winning Txn of candidate {} (found the key absent)", self.id),
                        key: PRIMARY_KEY.into(),
                        lease: gone,
                        revision: 0,
                        at_ns: win.at_ns,
                    };
                    self.rec.rec.lock().unwrap().lease_deletions.push(d);
                }
                self.rec.rec.lock().unwrap().primary_wins.push(win);
                self.rec.stat("primary-txn", self.id, invoke, Outcome::Ok);
                self.serve(win, grant.ttl, stop).await
            }
            Ok(r) => {
                let held = r.responses.iter().find_map(|op| match &op.response {
                    Some(pb::response_op::Response::ResponseRange(range)) => range.kvs.first().map(|kv| kv.lease),
                    _ => None,
                });
                if let Some(held) = held {
                    self.holder_seen = Some(held);
                }
                self.rec.stat("primary-txn", self.id, invoke, Outcome::Ok);
                self.revoke(lease).await;
                self.rng.random_range(RETRY_MS)
            }
            Err(_) => {
                // It may have won without knowing: it does not believe it, and gives the key up.
                self.rec.stat("primary-txn", self.id, invoke, Outcome::Unknown);
                self.revoke(lease).await;
                UNKNOWN_RETRY_MS
            }
        }
    }

    /// Keep the lease alive every TTL/3 and do fenced work, until the time to serve is up,
    /// the lease is lost, or the drill stops.
    async fn serve(&mut self, win: Win, ttl_s: i64, stop: &AtomicBool) -> u64 {
        let serve_for = Duration::from_millis(self.rng.random_range(SERVE_MS));
        let abandon = self.rng.random_range(0..3) != 0;
        let started = Instant::now();
        let period = Duration::from_millis(ttl_s.max(1) as u64 * 1000 / 3);
        // The candidate's own view of its promise, as the checker computes it.
        let mut promised_until = Instant::now() + Duration::from_secs(ttl_s.max(0) as u64);
        loop {
            sleep_unless_stopped(period, stop).await;
            // A held primary behaves as a paused one: no renewal, no work.
            let rec = self.rec.clone();
            let _busy = rec.wait_while_held().await;
            if stop.load(Ordering::Relaxed) {
                self.revoke(win.lease).await;
                return 0;
            }
            if started.elapsed() >= serve_for {
                if abandon {
                    // A crashed primary: no revoke. Stay away until the lease must be gone.
                    return promised_until.saturating_duration_since(Instant::now()).as_millis() as u64 + 500;
                }
                self.revoke(win.lease).await;
                return self.rng.random_range(RETRY_MS);
            }
            match self.keep_alive(win.lease).await {
                Some(0) => return self.rng.random_range(RETRY_MS), // not found: no longer primary
                Some(ttl) => promised_until = Instant::now() + Duration::from_secs(ttl as u64),
                None => {}
            }
            if Instant::now() >= promised_until {
                return self.rng.random_range(RETRY_MS); // could not renew in time
            }
            if !self.work(win.create_revision).await {
                // Someone else's key, or none: give up the lease rather than hold it.
                self.revoke(win.lease).await;
                return self.rng.random_range(RETRY_MS);
            }
        }
    }

    /// One keep-alive on a fresh stream; the TTL answered, `None` when there was no answer.
    async fn keep_alive(&mut self, lease: i64) -> Option<i64> {
        let invoke = self.rec.now_ns();
        let req = futures::stream::iter([pb::LeaseKeepAliveRequest { id: lease }]);
        let answer = tokio::time::timeout(OP_TIMEOUT, async {
            let mut s = self.lease.lease_keep_alive(req).await?.into_inner();
            s.message().await
        })
        .await;
        match answer {
            Ok(Ok(Some(a))) => {
                self.rec.lease_answer(self.id, lease, a.ttl);
                self.rec.stat("primary-keepalive", self.id, invoke, Outcome::Ok);
                Some(a.ttl)
            }
            _ => {
                self.rec.stat("primary-keepalive", self.id, invoke, Outcome::Unknown);
                None
            }
        }
    }

    /// A fenced write; false when the fence refused it.
    async fn work(&mut self, create_revision: i64) -> bool {
        self.work_n += 1;
        let invoke = self.rec.now_ns();
        let req = pb::TxnRequest {
            compare: vec![create_revision_is(create_revision)],
            success: vec![put_op(PRIMARY_WORK_KEY, format!("candidate-{}-{}", self.id, self.work_n), 0)],
            failure: vec![],
        };
        let (slot, outcome, fenced_in) = match timed(self.kv.txn(req)).await {
            Ok(r) if r.succeeded => (0, Outcome::Ok, true),
            Ok(_) => (1, Outcome::Failed, false),
            Err(_) => (2, Outcome::Unknown, true),
        };
        self.rec.rec.lock().unwrap().primary_work[slot] += 1;
        self.rec.stat("primary-work", self.id, invoke, outcome);
        fenced_in
    }

    async fn revoke(&mut self, lease: i64) {
        let invoke = self.rec.now_ns();
        self.rec.revoke_invoked(self.id, lease);
        let r = timed(self.lease.lease_revoke(pb::LeaseRevokeRequest { id: lease })).await;
        let outcome = if r.is_ok() { Outcome::Ok } else { Outcome::Unknown };
        self.rec.stat("primary-revoke", self.id, invoke, outcome);
    }
}
