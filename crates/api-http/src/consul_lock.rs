//! Consul locks (`PUT /v1/kv/<key>?acquire=<session>`, `?release=<session>`) and what becomes
//! of them when their session ends, as Consul defines it.
//!
//! **Who holds a key.** A held key has a lock record `/quorate/consul/locks/<key>`, attached to
//! the holding session's lease, whose value names the session and its lock delay. It exists
//! exactly while the lock is held, so when a session ends (its TTL lapses, or it is
//! destroyed) the lease takes every lock record with it, in the same revision as the session
//! record itself: every lock is released at once, with no background work. That is Consul's
//! `Behavior: release` (the default): the key and its value stay. With `Behavior: delete` the
//! key itself is attached to the session's lease as well and goes with it.
//! `/quorate/consul/lockindex/<key>` (no lease) counts acquisitions (Consul's `LockIndex`); it
//! changes at every acquisition, which is how an acquisition knows, when it is applied, that
//! nobody took the lock and lost it since the handler looked.
//!
//! **Lock delay** (Consul's, after Chubby): when a session ends, the locks it held cannot be
//! acquired by anyone for that session's `LockDelay` (default 15 s), so that a holder that
//! lost its session without knowing it has time to notice before someone else acts. An
//! explicit `?release` has no delay. As in Consul, the delay lives in memory on each member:
//! a tracker reads the events the member applies and, for every lock record deleted in the
//! same revision as its session's record, refuses that key until the member's monotonic
//! clock passes the delay, counted from when the member applied the end (never earlier than
//! the leader's decision). An acquisition first waits until the tracker has seen everything
//! the member had applied when the request was linearized, so it cannot slip in between an
//! end and its delay. If the tracker ever misses events (its queue overflowed, or the state
//! was replaced by a snapshot) it refuses every acquisition on this member for the longest
//! delay, `LOCK_DELAY_MAX`. Like Consul, a member that restarts forgets the delays.
//!
//! This module never writes the user's key anywhere but where Consul KV put it, and never
//! decides a session's life: that is its lease's.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use quorate_consensus::{Applied, Member};
use quorate_kv::{
    Command, Compare, CompareResult, CompareTarget, Event, EventKind, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::warn;

use crate::{Api, ApiError};

/// Where lock records live: `<LOCK_PREFIX><key>`.
pub(crate) const LOCK_PREFIX: &str = "/quorate/consul/locks/";
/// Where acquisition counters live: `<LOCK_INDEX_PREFIX><key>`.
const LOCK_INDEX_PREFIX: &str = "/quorate/consul/lockindex/";
/// Consul's largest lock delay (`MaxLockDelay`): what a member that lost track refuses for.
pub(crate) const LOCK_DELAY_MAX: Duration = Duration::from_secs(60);
/// How long an acquisition waits for the tracker to see what the member applied.
const TRACKER_CATCH_UP_MAX: Duration = Duration::from_secs(2);
/// The most keys held in delay at once; past it every acquisition waits out the longest delay.
const DELAYED_KEYS_MAX: usize = 100_000;

/// A lock record's value.
pub(crate) fn lock_record(session: &str, lock_delay: Duration) -> Vec<u8> {
    serde_json::to_vec(&json!({"Session": session, "LockDelay": lock_delay.as_nanos() as u64})).expect("json")
}

fn lock_key(key: &[u8]) -> Vec<u8> {
    [LOCK_PREFIX.as_bytes(), key].concat()
}

fn lock_index_key(key: &[u8]) -> Vec<u8> {
    [LOCK_INDEX_PREFIX.as_bytes(), key].concat()
}

/// The session records and lock records an applied batch deleted: for each lock whose session
/// ended in the same batch, the user's key and the delay it must now wait. Pure.
pub(crate) fn ended_locks(events: &[Event], session_prefix: &str) -> Vec<(Vec<u8>, Duration)> {
    let deleted = |e: &&Event| e.kind == EventKind::Delete;
    let ended: HashSet<&[u8]> =
        events.iter().filter(deleted).filter_map(|e| e.kv.key.strip_prefix(session_prefix.as_bytes())).collect();
    if ended.is_empty() {
        return Vec::new();
    }
    events
        .iter()
        .filter(deleted)
        .filter_map(|e| {
            let key = e.kv.key.strip_prefix(LOCK_PREFIX.as_bytes())?;
            let record: Value = serde_json::from_slice(&e.prev_kv.as_ref()?.value).ok()?;
            let session = record["Session"].as_str()?;
            ended.contains(session.as_bytes()).then(|| {
                let delay = Duration::from_nanos(record["LockDelay"].as_u64().unwrap_or(0));
                (key.to_vec(), delay.min(LOCK_DELAY_MAX))
            })
        })
        .collect()
}

/// Keys in their lock delay, and a delay over every key after a gap in what was seen. Pure:
/// every decision takes `now`.
#[derive(Default)]
pub(crate) struct DelayTable {
    until: HashMap<Vec<u8>, Instant>,
    all_until: Option<Instant>,
}

impl DelayTable {
    pub(crate) fn delay(&mut self, key: Vec<u8>, now: Instant, delay: Duration) {
        if delay.is_zero() {
            return;
        }
        self.until.retain(|_, until| *until > now);
        if self.until.len() >= DELAYED_KEYS_MAX {
            self.delay_all(now);
            return;
        }
        let until = now + delay;
        let slot = self.until.entry(key).or_insert(until);
        *slot = (*slot).max(until);
    }

    pub(crate) fn delay_all(&mut self, now: Instant) {
        self.all_until = Some(now + LOCK_DELAY_MAX);
    }

    /// Whether `key` may not be acquired at `now`.
    pub(crate) fn refuses(&self, key: &[u8], now: Instant) -> bool {
        self.all_until.is_some_and(|u| u > now) || self.until.get(key).is_some_and(|u| *u > now)
    }
}

/// One member's lock delays, kept by a task that follows what the member applies.
pub(crate) struct LockDelays {
    table: Mutex<DelayTable>,
    /// The highest revision whose events the tracker has taken into account.
    seen_revision: AtomicI64,
    seen: Notify,
}

impl LockDelays {
    /// Whether `key` may not be acquired now, once the tracker has seen `revision` (if it
    /// cannot catch up in time, it refuses: safe, and the client retries).
    async fn refuses(&self, key: &[u8], revision: i64) -> bool {
        let deadline = Instant::now() + TRACKER_CATCH_UP_MAX;
        loop {
            let seen = self.seen.notified();
            if self.seen_revision.load(Ordering::Acquire) >= revision {
                break;
            }
            if tokio::time::timeout_at(deadline, seen).await.is_err() {
                warn!(revision, "lock delay tracker behind; acquisition refused");
                return true;
            }
        }
        self.table.lock().expect("lock delays").refuses(key, Instant::now())
    }
}

/// The lock delays of `api`'s member, and the task that keeps them (started on first use,
/// which `consul_kv::router` makes the member's start).
pub(crate) fn delays(api: &Api) -> Option<Arc<LockDelays>> {
    static BY_MEMBER: OnceLock<Mutex<HashMap<u64, Weak<LockDelays>>>> = OnceLock::new();
    let id = api.member.status().id;
    let mut all = BY_MEMBER.get_or_init(Default::default).lock().expect("lock delays registry");
    if let Some(d) = all.get(&id).and_then(Weak::upgrade) {
        return Some(d);
    }
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let d = Arc::new(LockDelays { table: Default::default(), seen_revision: AtomicI64::new(0), seen: Notify::new() });
    let events = api.member.subscribe();
    d.seen_revision.store(api.member.read(|s| s.revision()), Ordering::Release);
    runtime.spawn(track(api.member.clone(), events, d.clone()));
    all.insert(id, Arc::downgrade(&d));
    Some(d)
}

async fn track(member: Member, mut events: tokio::sync::broadcast::Receiver<Applied>, delays: Arc<LockDelays>) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let revision = match events.recv().await {
            Ok(Applied::Events { revision, events }) => {
                let ended = ended_locks(&events, crate::consul_kv::SESSION_PREFIX);
                if !ended.is_empty() {
                    let now = Instant::now();
                    let mut table = delays.table.lock().expect("lock delays");
                    for (key, delay) in ended {
                        table.delay(key, now, delay);
                    }
                }
                revision
            }
            Ok(Applied::Reset { revision }) => {
                warn!(revision, "state replaced by a snapshot: every Consul lock in its longest lock delay");
                delays.table.lock().expect("lock delays").delay_all(Instant::now());
                revision
            }
            Err(RecvError::Lagged(missed)) => {
                warn!(missed, "lock delay tracker fell behind: every Consul lock in its longest lock delay");
                delays.table.lock().expect("lock delays").delay_all(Instant::now());
                member.read(|s| s.revision())
            }
            Err(RecvError::Closed) => return,
        };
        delays.seen_revision.fetch_max(revision, Ordering::AcqRel);
        delays.seen.notify_waiters();
    }
}

fn cmp(key: Vec<u8>, result: CompareResult, target: CompareTarget) -> Compare {
    Compare { result, target, key, range_end: vec![] }
}

fn put(key: Vec<u8>, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp::Put(PutRequest { key, value, lease, ..Default::default() })
}

/// What an acquisition needs to know about its session.
pub(crate) struct Holder<'a> {
    pub id: &'a str,
    pub lease: i64,
    pub delete: bool,
    pub lock_delay: Duration,
}

/// The transaction that acquires `key` for `holder`, or `None` when it must be refused now
/// (held by another session, or in its lock delay). Reads this member's state, which the
/// caller has linearized; the transaction re-checks what it read when it is applied.
pub(crate) async fn acquire_txn(api: &Api, key: &[u8], value: &[u8], holder: &Holder<'_>) -> Option<TxnRequest> {
    let (revision, held_by, index) = api.member.read(|s| {
        let get = |k: Vec<u8>| s.range(&RangeRequest { key: k, ..Default::default() }).ok()?.kvs.into_iter().next();
        (s.revision(), get(lock_key(key)).map(|kv| kv.lease), get(lock_index_key(key)))
    });
    let user_lease = if holder.delete { holder.lease } else { 0 };
    let user_put = put(key.to_vec(), value.to_vec(), user_lease);
    match held_by {
        // Held already: only the value changes (no new LockIndex), while it still is.
        Some(lease) if lease == holder.lease => Some(TxnRequest {
            compare: vec![cmp(lock_key(key), CompareResult::Equal, CompareTarget::Lease(holder.lease))],
            success: vec![user_put],
            failure: vec![],
        }),
        Some(_) => None,
        None => {
            if let Some(delays) = delays(api) {
                if delays.refuses(key, revision).await {
                    return None;
                }
            }
            let (index_mod, lock_index) = match &index {
                Some(kv) => (kv.mod_revision, String::from_utf8_lossy(&kv.value).parse::<u64>().unwrap_or(0)),
                None => (0, 0),
            };
            Some(TxnRequest {
                compare: vec![
                    cmp(lock_key(key), CompareResult::Equal, CompareTarget::Create(0)),
                    cmp(lock_index_key(key), CompareResult::Equal, CompareTarget::Mod(index_mod)),
                ],
                success: vec![
                    user_put,
                    put(lock_key(key), lock_record(holder.id, holder.lock_delay), holder.lease),
                    put(lock_index_key(key), (lock_index + 1).to_string().into_bytes(), 0),
                ],
                failure: vec![],
            })
        }
    }
}

/// The transaction that releases `key` held by the session with lease `lease`: the lock record
/// goes, the key stays (detached from the session) with `value`.
pub(crate) fn release_txn(key: &[u8], value: &[u8], lease: i64) -> TxnRequest {
    TxnRequest {
        compare: vec![cmp(lock_key(key), CompareResult::Equal, CompareTarget::Lease(lease))],
        success: vec![
            put(key.to_vec(), value.to_vec(), 0),
            RequestOp::DeleteRange(quorate_kv::DeleteRangeRequest { key: lock_key(key), ..Default::default() }),
        ],
        failure: vec![],
    }
}

/// The deletes that go with deleting user keys `[key, range_end)`: their lock records (a
/// deleted key is no longer held; Consul deletes the lock with the key).
pub(crate) fn lock_records_of(key: &[u8], range_end: &[u8]) -> RequestOp {
    let end = if range_end.is_empty() {
        vec![]
    } else if range_end == [0] {
        quorate_kv::prefix_end(LOCK_PREFIX.as_bytes())
    } else {
        lock_key(range_end)
    };
    RequestOp::DeleteRange(quorate_kv::DeleteRangeRequest { key: lock_key(key), range_end: end, prev_kv: false })
}

/// Who holds each key in `[key, range_end)` and its LockIndex, read from `s`:
/// user key -> (session, lock index).
pub(crate) fn holders(s: &quorate_kv::Store, key: &[u8], range_end: &[u8]) -> HashMap<Vec<u8>, (Option<String>, u64)> {
    let ranges = |prefix: &str| {
        let end = if range_end.is_empty() {
            vec![]
        } else if range_end == [0] {
            quorate_kv::prefix_end(prefix.as_bytes())
        } else {
            [prefix.as_bytes(), range_end].concat()
        };
        RangeRequest { key: [prefix.as_bytes(), key].concat(), range_end: end, ..Default::default() }
    };
    let mut out: HashMap<Vec<u8>, (Option<String>, u64)> = HashMap::new();
    for kv in s.range(&ranges(LOCK_INDEX_PREFIX)).map(|r| r.kvs).unwrap_or_default() {
        let index = String::from_utf8_lossy(&kv.value).parse().unwrap_or(0);
        out.entry(kv.key[LOCK_INDEX_PREFIX.len()..].to_vec()).or_default().1 = index;
    }
    for kv in s.range(&ranges(LOCK_PREFIX)).map(|r| r.kvs).unwrap_or_default() {
        let record: Value = serde_json::from_slice(&kv.value).unwrap_or_default();
        let session = record["Session"].as_str().map(str::to_owned);
        out.entry(kv.key[LOCK_PREFIX.len()..].to_vec()).or_default().0 = session;
    }
    out
}

/// `acquire` as one operation: `Ok(true)` when `holder` holds `key` with `value` afterwards.
pub(crate) async fn acquire(api: &Api, key: &[u8], value: &[u8], holder: &Holder<'_>) -> Result<(bool, i64), ApiError> {
    let Some(txn) = acquire_txn(api, key, value, holder).await else {
        return Ok((false, api.member.read(|s| s.revision())));
    };
    let (resp, revision) = crate::ops::write_as_member(api, Command::Txn(txn)).await?;
    let took = matches!(resp, quorate_kv::CommandResponse::Txn(t) if t.succeeded);
    Ok((took, revision))
}

#[cfg(test)]
mod tests {
    use super::*;
    use quorate_kv::KeyValue;

    const SESSIONS: &str = "/quorate/consul/sessions/";

    fn delete(key: &str, prev_value: Option<Value>) -> Event {
        let prev = prev_value.map(|v| {
            Arc::new(KeyValue {
                key: key.as_bytes().to_vec(),
                value: serde_json::to_vec(&v).unwrap(),
                ..Default::default()
            })
        });
        Event {
            kind: EventKind::Delete,
            kv: Arc::new(KeyValue { key: key.as_bytes().to_vec(), ..Default::default() }),
            prev_kv: prev,
        }
    }

    #[test]
    fn locks_whose_session_ended_in_the_same_batch_are_delayed() {
        let record = |s: &str, ns: u64| Some(json!({"Session": s, "LockDelay": ns}));
        let events = vec![
            delete("/quorate/consul/sessions/s1", Some(json!({"ID": "s1"}))),
            delete("/quorate/consul/locks/app/leader", record("s1", 15_000_000_000)),
            delete("/quorate/consul/locks/app/other", record("s2", 15_000_000_000)),
            delete("/quorate/consul/locks/app/long", record("s1", 3_600_000_000_000)),
            delete("app/leader", None),
        ];
        let ended = ended_locks(&events, SESSIONS);
        assert_eq!(
            ended,
            vec![(b"app/leader".to_vec(), Duration::from_secs(15)), (b"app/long".to_vec(), LOCK_DELAY_MAX)],
            "s2's lock was released, not ended with its session; delays are capped"
        );
        // A release alone (no session record deleted) delays nothing.
        assert!(ended_locks(&events[1..], SESSIONS).is_empty());
    }

    #[test]
    fn a_delayed_key_is_refused_until_its_delay_passes() {
        let t0 = Instant::now();
        let mut table = DelayTable::default();
        table.delay(b"a".to_vec(), t0, Duration::from_secs(15));
        table.delay(b"zero".to_vec(), t0, Duration::ZERO);
        assert!(table.refuses(b"a", t0));
        assert!(table.refuses(b"a", t0 + Duration::from_millis(14_999)));
        assert!(!table.refuses(b"a", t0 + Duration::from_secs(15)));
        assert!(!table.refuses(b"b", t0));
        assert!(!table.refuses(b"zero", t0));
        // A shorter delay later never shortens a longer one.
        table.delay(b"a".to_vec(), t0 + Duration::from_secs(1), Duration::from_secs(1));
        assert!(table.refuses(b"a", t0 + Duration::from_secs(10)));
        // After a gap in the events every key waits the longest delay.
        table.delay_all(t0 + Duration::from_secs(20));
        assert!(table.refuses(b"b", t0 + Duration::from_secs(79)));
        assert!(!table.refuses(b"b", t0 + Duration::from_secs(80)));
    }

    #[test]
    fn lock_records_of_a_range_cover_the_same_keys() {
        let one = lock_records_of(b"a/b", b"");
        let prefix = lock_records_of(b"a/", b"a0");
        let all = lock_records_of(b"", b"\0");
        let range = |op: RequestOp| match op {
            RequestOp::DeleteRange(d) => (String::from_utf8_lossy(&d.key).into_owned(), d.range_end),
            _ => unreachable!(),
        };
        assert_eq!(range(one), ("/quorate/consul/locks/a/b".to_string(), vec![]));
        assert_eq!(range(prefix), ("/quorate/consul/locks/a/".to_string(), b"/quorate/consul/locks/a0".to_vec()));
        assert_eq!(range(all), ("/quorate/consul/locks/".to_string(), b"/quorate/consul/locks0".to_vec()));
    }
}
