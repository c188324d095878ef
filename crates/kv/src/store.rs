//! The MVCC store: every key's history since the last compaction, the lease table, and the
//! rules of etcd's Put, DeleteRange, Txn, Compact and lease commands.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::auth::{AuthError, AuthStore, PermType};
use crate::lease::{Lease, LEASE_MAX_TTL_S};
use crate::txn_check::{check_key, check_put_shape, check_txn_writes};
use crate::types::*;
use crate::KvError;

mod paged;
pub use paged::{
    read_only_txn_ranges, read_only_txn_response, EventScan, HashScan, RangeScan, SnapshotScan, READ_PAGE_KEYS,
};

/// One version of a key: the value written at `(rev, sub)`, or a tombstone (`kv: None`).
#[derive(Clone, Debug)]
struct Rec {
    rev: i64,
    sub: u32,
    kv: Option<Arc<KeyValue>>,
}

/// What applying one command did: the revision after it, its result, and the events that
/// watchers must see (all of one revision, in order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub revision: i64,
    pub result: Result<CommandResponse, KvError>,
    pub events: Vec<Event>,
    /// Steps the command took: request nodes checked and run, and keys visited by its
    /// compares, ranges and deletes. Tests bound it; nothing else reads it.
    pub work_steps: u64,
}

#[derive(Default, Clone, Debug)]
pub struct Store {
    keys: BTreeMap<Key, Vec<Rec>>,
    revision: i64,
    compact_revision: i64,
    leases: BTreeMap<i64, Lease>,
    alarms: BTreeSet<(u64, AlarmType)>,
    /// Approximate bytes held by every version of every key and by the lease table (what the
    /// quota measures).
    bytes: u64,
    /// Users, roles and whether auth is on (ADR 0010). Not part of `StoreSnapshot` (snapshots
    /// carry it beside the image) nor of `hash_kv` (etcd hashes the keyspace only).
    auth: AuthStore,
}

/// What `bytes_in_use` (the quota's measure, etcdctl's DB size) counts is what the store holds
/// on the heap (tests/memory_accounting.rs compares the two): for a key, its own copy and its
/// slot in the map (the key's and the history's headers, in nodes about half full); for each
/// version, its `Rec` and, unless it is a tombstone, its shared `KeyValue` with a copy of the key
/// and the value. Versions, not a history's capacity: the count must be the same on every
/// member that applied the same log, however each grew or restored its histories.
const KEY_SLOT_BYTES: u64 = 92;
const REC_BYTES: u64 = std::mem::size_of::<Rec>() as u64;
const KEY_VALUE_BYTES: u64 = 16 + std::mem::size_of::<KeyValue>() as u64;

fn key_bytes(key: &[u8]) -> u64 {
    key.len() as u64 + KEY_SLOT_BYTES
}

fn version_bytes(kv: Option<&KeyValue>) -> u64 {
    REC_BYTES + kv.map_or(0, |kv| KEY_VALUE_BYTES + (kv.key.len() + kv.value.len()) as u64)
}

/// Leases are held too, and counted the same way: a lease's slot in the table (its `Lease` and
/// id, in nodes about two-thirds full), and for each key bound to it, its entry in the lease's
/// key set (a header and a copy of the key). Without them a client granting leases in a loop
/// grew a member without bound under any quota.
const LEASE_SLOT_BYTES: u64 = 112;
const LEASE_KEY_SLOT_BYTES: u64 = 40;

fn lease_key_bytes(key: &[u8]) -> u64 {
    key.len() as u64 + LEASE_KEY_SLOT_BYTES
}

fn lease_bytes(lease: &Lease) -> u64 {
    LEASE_SLOT_BYTES + lease.keys.iter().map(|k| lease_key_bytes(k)).sum::<u64>()
}

/// Write state of the command being applied: all its changes share `revision + 1`.
struct WriteCtx {
    sub: u32,
    events: Vec<Event>,
    /// See `Applied::work_steps`.
    steps: u64,
}

impl WriteCtx {
    fn new() -> Self {
        WriteCtx { sub: 0, events: Vec::new(), steps: 0 }
    }
}

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    /// The revision of the last change. etcd starts at 1 for an empty store.
    pub fn revision(&self) -> i64 {
        self.revision.max(1)
    }

    pub fn compact_revision(&self) -> i64 {
        self.compact_revision
    }

    pub fn lease(&self, id: i64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Approximate bytes of the keyspace, its history and the leases: etcd's "db size in use".
    pub fn bytes_in_use(&self) -> u64 {
        self.bytes
    }

    pub fn alarms(&self) -> Vec<(u64, AlarmType)> {
        self.alarms.iter().copied().collect()
    }

    pub fn auth(&self) -> &AuthStore {
        &self.auth
    }

    /// Replace the auth store (a snapshot's, installed beside its image).
    pub fn set_auth(&mut self, auth: AuthStore) {
        self.auth = auth;
    }

    /// May `user` (`None`: nobody authenticated) have `cmd` applied? etcd's rules (ADR 0010):
    /// writes need write permission on every key they may touch (a Txn's ops in both branches,
    /// whichever runs, nested Txns too), `prev_kv` and a Txn's compares and reads need read,
    /// revoking a lease needs write on every key attached to it, granting or renewing one needs
    /// an authenticated user, and everything else (compaction, alarms, auth changes, the
    /// leader's lease decisions) needs the root role. Anything goes with auth off.
    pub fn authorize(&self, user: Option<&str>, cmd: &Command) -> Result<(), AuthError> {
        let a = &self.auth;
        if !a.enabled() {
            return Ok(());
        }
        match cmd {
            Command::Put(p) => authorize_write(a, user, &p.key, &[], p.prev_kv),
            Command::DeleteRange(d) => authorize_write(a, user, &d.key, &d.range_end, d.prev_kv),
            Command::Txn(t) => self.authorize_txn(user, t),
            Command::Fenced { fence, cmd } => {
                a.check(user, &fence.key, &[], PermType::Read)?;
                self.authorize(user, cmd)
            }
            Command::TermFenced { cmd, .. } | Command::Authorized { cmd, .. } => self.authorize(user, cmd),
            // Compaction changes no key's current value: any user (etcd checks none).
            Command::LeaseGrant { .. } | Command::LeaseRenew { .. } | Command::Compact { .. } => a.check_user(user),
            Command::LeaseRevoke { id } => {
                a.check_user(user)?;
                match self.leases.get(id) {
                    Some(l) => l.keys.iter().try_for_each(|k| a.check(user, k, &[], PermType::Write)),
                    None => Ok(()),
                }
            }
            Command::Alarm { .. }
            | Command::Auth(_)
            | Command::LeaseExpire { .. }
            | Command::LeaseExpireAt { .. }
            | Command::LeaseCheckpoint(_) => a.check_admin(user),
        }
    }

    /// `authorize` for a Txn (a read-only one too, which is never logged).
    pub fn authorize_txn(&self, user: Option<&str>, t: &TxnRequest) -> Result<(), AuthError> {
        let a = &self.auth;
        for c in &t.compare {
            a.check(user, &c.key, &c.range_end, PermType::Read)?;
        }
        for op in t.success.iter().chain(&t.failure) {
            match op {
                RequestOp::Range(r) => a.check(user, &r.key, &r.range_end, PermType::Read)?,
                RequestOp::Put(p) => authorize_write(a, user, &p.key, &[], p.prev_kv)?,
                RequestOp::DeleteRange(d) => authorize_write(a, user, &d.key, &d.range_end, d.prev_kv)?,
                RequestOp::Txn(inner) => self.authorize_txn(user, inner)?,
            }
        }
        Ok(())
    }

    fn no_space(&self) -> bool {
        self.alarms.iter().any(|(_, a)| *a == AlarmType::NoSpace)
    }

    /// Apply one command. Errors leave the store unchanged.
    pub fn apply(&mut self, cmd: &Command, pos: LogPosition) -> Applied {
        let mut w = WriteCtx::new();
        let result = self.exec(cmd, pos, &mut w);
        if !w.events.is_empty() {
            self.revision = self.revision() + 1;
        }
        debug_assert!(w.events.iter().all(|e| e.revision() == self.revision));
        Applied { revision: self.revision(), result, events: w.events, work_steps: w.steps }
    }

    fn exec(&mut self, cmd: &Command, pos: LogPosition, w: &mut WriteCtx) -> Result<CommandResponse, KvError> {
        match cmd {
            Command::Authorized { user, cmd } => {
                self.authorize(user.as_deref(), cmd).map_err(KvError::from)?;
                self.exec(cmd, pos, w)
            }
            Command::Auth(c) => {
                self.auth.apply(c)?;
                Ok(CommandResponse::Auth { revision: self.auth.revision() })
            }
            Command::Fenced { fence, cmd } => self.check_fence(fence, cmd).and_then(|()| self.exec(cmd, pos, w)),
            Command::TermFenced { term, .. } if *term != pos.term => Ok(CommandResponse::StaleTerm),
            Command::TermFenced { cmd, .. } => self.exec(cmd, pos, w),
            Command::Put(_) | Command::LeaseGrant { .. } if self.no_space() => Err(KvError::NoSpace),
            Command::Txn(t) if self.no_space() && txn_has_put(t) => Err(KvError::NoSpace),
            Command::Alarm { activate, member, alarm } => {
                if *activate {
                    self.alarms.insert((*member, *alarm));
                } else {
                    self.alarms.remove(&(*member, *alarm));
                }
                Ok(CommandResponse::Alarm { alarms: self.alarms() })
            }
            Command::Put(p) => self.check_put(p).map(|()| CommandResponse::Put(self.put(p, w))),
            Command::DeleteRange(d) => {
                check_key(&d.key).map(|()| CommandResponse::DeleteRange(self.delete_range(d, w)))
            }
            Command::Txn(t) => self.apply_txn(t, w).map(CommandResponse::Txn),
            Command::Compact { revision, .. } => self.compact(*revision).map(|()| CommandResponse::Compact),
            Command::LeaseGrant { id, ttl_s } => self.lease_grant(*id, *ttl_s, pos),
            Command::LeaseRevoke { id } => match self.leases.contains_key(id) {
                true => {
                    self.revoke(*id, w);
                    Ok(CommandResponse::LeaseRevoke)
                }
                false => Err(KvError::LeaseNotFound { id: *id }),
            },
            Command::LeaseExpire { ids, term } => {
                if *term != pos.term {
                    Ok(CommandResponse::LeaseExpire { expired: Vec::new(), stale_term: true })
                } else {
                    let mut expired = Vec::new();
                    for id in ids {
                        if self.leases.contains_key(id) {
                            self.revoke(*id, w);
                            expired.push(*id);
                        }
                    }
                    Ok(CommandResponse::LeaseExpire { expired, stale_term: false })
                }
            }
            Command::LeaseExpireAt { term, .. } if *term != pos.term => {
                Ok(CommandResponse::LeaseExpire { expired: Vec::new(), stale_term: true })
            }
            Command::LeaseExpireAt { leases, .. } => {
                let mut expired = Vec::new();
                for (id, set_at) in leases {
                    if self.leases.get(id).is_some_and(|l| l.set_at == *set_at) {
                        self.revoke(*id, w);
                        expired.push(*id);
                    }
                }
                Ok(CommandResponse::LeaseExpire { expired, stale_term: false })
            }
            Command::LeaseRenew { ids } => {
                let mut renewed = Vec::new();
                for id in ids {
                    if let Some(l) = self.leases.get_mut(id) {
                        l.remaining_ms = None;
                        l.set_at = pos.index;
                        renewed.push(*id);
                    }
                }
                Ok(CommandResponse::LeaseRenew { renewed })
            }
            Command::LeaseCheckpoint(cps) => {
                for cp in cps {
                    if let Some(l) = self.leases.get_mut(&cp.id) {
                        l.remaining_ms = Some(cp.remaining_ms.max(0));
                        l.set_at = pos.index;
                    }
                }
                Ok(CommandResponse::LeaseCheckpoint)
            }
        }
    }

    // ---- reads ----

    /// Range at `req.revision` (0 = current), with etcd's filters, sort, limit and count.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, KvError> {
        let rev = self.read_revision(req.revision)?;
        Ok(self.range_at(req, rev, &mut 0))
    }

    fn read_revision(&self, requested: i64) -> Result<i64, KvError> {
        let current = self.revision();
        if requested <= 0 {
            return Ok(current);
        }
        if requested > current {
            return Err(KvError::FutureRevision { requested, current });
        }
        if requested < self.compact_revision {
            return Err(KvError::Compacted { requested, compacted: self.compact_revision });
        }
        Ok(requested)
    }

    /// The range as of `rev`; adds the keys it visits to `steps`.
    fn range_at(&self, req: &RangeRequest, rev: i64, steps: &mut u64) -> RangeResponse {
        let mut scan = RangeScan::at(req, rev);
        self.range_step_counted(req, &mut scan, usize::MAX, steps).expect("rev was checked against compaction");
        scan.finish(req)
    }

    /// Live values in the range as of `rev`, in key order; adds every key visited to `steps`.
    fn live_at<'a>(
        &'a self,
        key: &'a [u8],
        range_end: &'a [u8],
        rev: i64,
        steps: &'a mut u64,
    ) -> impl Iterator<Item = &'a KeyValue> + 'a {
        self.history_in(key, range_end).inspect(|_| *steps += 1).filter_map(move |(_, recs)| version_at(recs, rev))
    }

    fn history_in<'a>(
        &'a self,
        key: &'a [u8],
        range_end: &'a [u8],
    ) -> Box<dyn Iterator<Item = (&'a Key, &'a Vec<Rec>)> + 'a> {
        use std::ops::Bound::*;
        match KeyRange::new(key, range_end) {
            KeyRange::Single(k) => Box::new(self.keys.get_key_value(k).into_iter()),
            KeyRange::FromKey(k) => Box::new(self.keys.range::<[u8], _>((Included(k), Unbounded))),
            KeyRange::Between(s, e) if s < e => Box::new(self.keys.range::<[u8], _>((Included(s), Excluded(e)))),
            KeyRange::Between(..) => Box::new(std::iter::empty()),
        }
    }

    /// Every event in `[key, range_end)` with revision `>= start_rev`, ordered by revision and
    /// by position inside its revision: what a watch replays before going live.
    pub fn events_since(&self, key: &[u8], range_end: &[u8], start_rev: i64) -> Result<Vec<Event>, KvError> {
        let mut scan = EventScan::new(self, key, range_end, start_rev)?;
        self.events_step(&mut scan, usize::MAX)?;
        Ok(scan.finish())
    }

    /// A hash of every version of every key in `(compact_revision, rev]` plus the compacted
    /// base, identical on every member at the same revision (etcd's HashKV in spirit).
    pub fn hash_kv(&self, rev: i64) -> Result<u32, KvError> {
        let mut scan = HashScan::new(self, rev)?;
        self.hash_step(&mut scan, usize::MAX)?;
        Ok(scan.finish())
    }

    /// Evaluate a Txn that writes nothing, without the log: compares and ranges at the current
    /// revision. `None` if the Txn has a write in either branch (it must be replicated).
    pub fn read_only_txn(&self, t: &TxnRequest) -> Option<Result<TxnResponse, KvError>> {
        if txn_writes(t) {
            return None;
        }
        let mut steps = 0;
        let mut path = Vec::new();
        Some(self.choose_txn_path(t, &mut path, &mut steps).map(|()| self.eval_read_txn(t, &path, &mut 0)))
    }

    fn eval_read_txn(&self, t: &TxnRequest, path: &[bool], next: &mut usize) -> TxnResponse {
        let succeeded = path[*next];
        *next += 1;
        let ops = if succeeded { &t.success } else { &t.failure };
        let responses = ops
            .iter()
            .map(|op| match op {
                RequestOp::Range(r) => {
                    let at = if r.revision > 0 { r.revision } else { self.revision() };
                    ResponseOp::Range(self.range_at(r, at, &mut 0))
                }
                RequestOp::Txn(inner) => ResponseOp::Txn(self.eval_read_txn(inner, path, next)),
                RequestOp::Put(_) | RequestOp::DeleteRange(_) => unreachable!("read-only txn has no writes"),
            })
            .collect();
        TxnResponse { succeeded, responses }
    }

    // ---- validation (runs before any mutation, so an error changes nothing) ----

    fn check_put(&self, p: &PutRequest) -> Result<(), KvError> {
        check_put_shape(p)?;
        if (p.ignore_value || p.ignore_lease) && self.current(&p.key).is_none() {
            return Err(KvError::KeyNotFound);
        }
        if p.lease != 0 && !self.leases.contains_key(&p.lease) {
            return Err(KvError::LeaseNotFound { id: p.lease });
        }
        Ok(())
    }

    /// Choose the branch of the Txn and of every nested Txn that runs, all against the state
    /// before the Txn (as etcd's `compareToPath` does), and check the chosen ops. `path` gets
    /// one decision per Txn that runs, in the order `txn` runs them. Each node is visited once.
    fn choose_txn_path(&self, t: &TxnRequest, path: &mut Vec<bool>, steps: &mut u64) -> Result<(), KvError> {
        *steps += 1;
        let succeeded = self.compares_hold(&t.compare, steps);
        path.push(succeeded);
        // Puts are checked against the state at the start of the Txn, as etcd does; a Txn's
        // writes never touch the same key twice, so no earlier op can change the answer.
        for op in if succeeded { &t.success } else { &t.failure } {
            *steps += 1;
            match op {
                RequestOp::Put(p) => self.check_put(p)?,
                RequestOp::DeleteRange(d) => check_key(&d.key)?,
                RequestOp::Range(r) => {
                    check_key(&r.key)?;
                    self.read_revision(r.revision)?;
                }
                RequestOp::Txn(inner) => self.choose_txn_path(inner, path, steps)?,
            }
        }
        Ok(())
    }

    fn compares_hold(&self, cmps: &[Compare], steps: &mut u64) -> bool {
        cmps.iter().all(|c| {
            *steps += 1;
            self.compare_holds(c, steps)
        })
    }

    /// Whether every key in the compare's range satisfies it (an absent key compares as a zero
    /// `KeyValue`, except on its value). Stops at the first key that fails.
    fn compare_holds(&self, c: &Compare, steps: &mut u64) -> bool {
        let rev = self.revision();
        let mut seen = false;
        for kv in self.live_at(&c.key, &c.range_end, rev, steps) {
            seen = true;
            if !compare_kv(c, kv) {
                return false;
            }
        }
        seen || (!matches!(c.target, CompareTarget::Value(_)) && compare_kv(c, &KeyValue::default()))
    }

    // ---- writes ----

    /// A fence holds while its key exists with the token as its create revision.
    fn check_fence(&self, fence: &Fence, cmd: &Command) -> Result<(), KvError> {
        if !matches!(cmd, Command::Put(_) | Command::DeleteRange(_) | Command::Txn(_)) {
            return Err(KvError::FenceNotAllowed);
        }
        match self.current(&fence.key) {
            Some(kv) if kv.create_revision == fence.revision => Ok(()),
            _ => Err(KvError::FenceRejected {
                key: String::from_utf8_lossy(&fence.key).into_owned(),
                revision: fence.revision,
            }),
        }
    }

    fn current(&self, key: &[u8]) -> Option<&KeyValue> {
        self.keys.get(key).and_then(|recs| recs.last()).and_then(|r| r.kv.as_deref())
    }

    fn current_shared(&self, key: &[u8]) -> Option<Arc<KeyValue>> {
        self.keys.get(key).and_then(|recs| recs.last()).and_then(|r| r.kv.clone())
    }

    fn put(&mut self, p: &PutRequest, w: &mut WriteCtx) -> PutResponse {
        let rev = self.revision() + 1;
        let prev = self.current_shared(&p.key);
        let value =
            if p.ignore_value { prev.as_ref().map(|kv| kv.value.clone()).unwrap_or_default() } else { p.value.clone() };
        let lease = if p.ignore_lease { prev.as_ref().map(|kv| kv.lease).unwrap_or(0) } else { p.lease };
        let (create_revision, version) = match &prev {
            Some(kv) => (kv.create_revision, kv.version + 1),
            None => (rev, 1),
        };
        let kv = Arc::new(KeyValue { key: p.key.clone(), create_revision, mod_revision: rev, version, value, lease });
        if let Some(old) = prev.as_ref().map(|kv| kv.lease).filter(|l| *l != 0 && *l != lease) {
            self.unbind(old, &p.key);
        }
        if lease != 0 {
            if let Some(l) = self.leases.get_mut(&lease) {
                if l.keys.insert(p.key.clone()) {
                    self.bytes += lease_key_bytes(&p.key);
                }
            }
        }
        self.push_version(&p.key, Rec { rev, sub: w.sub, kv: Some(kv.clone()) });
        w.sub += 1;
        w.events.push(Event { kind: EventKind::Put, kv, prev_kv: prev.clone() });
        PutResponse { prev_kv: prev.filter(|_| p.prev_kv).map(|kv| (*kv).clone()) }
    }

    /// Add a version to `key`'s history, and its bytes to `bytes_in_use`. A new key's history
    /// has room for exactly one: most keys are written once, and a `Vec`'s first push reserves
    /// four (72 bytes more a key).
    fn push_version(&mut self, key: &[u8], rec: Rec) {
        if !self.keys.contains_key(key) {
            self.keys.insert(key.to_vec(), Vec::with_capacity(1));
            self.bytes += key_bytes(key);
        }
        self.bytes += version_bytes(rec.kv.as_deref());
        self.keys.get_mut(key).expect("inserted above").push(rec);
    }

    fn delete_range(&mut self, d: &DeleteRangeRequest, w: &mut WriteCtx) -> DeleteRangeResponse {
        let rev = self.revision() + 1;
        let victims: Vec<Arc<KeyValue>> = self
            .history_in(&d.key, &d.range_end)
            .inspect(|_| w.steps += 1)
            .filter_map(|(_, recs)| recs.last().and_then(|r| r.kv.clone()))
            .collect();
        let deleted = victims.len() as i64;
        let prev_kvs = if d.prev_kv { victims.iter().map(|kv| (**kv).clone()).collect() } else { Vec::new() };
        for kv in victims {
            self.delete_key(kv, rev, w);
        }
        DeleteRangeResponse { deleted, prev_kvs }
    }

    /// Take `key` out of lease `id`'s key set, and its bytes out of `bytes_in_use`.
    fn unbind(&mut self, id: i64, key: &[u8]) {
        if let Some(l) = self.leases.get_mut(&id) {
            if l.keys.remove(key) {
                self.free(lease_key_bytes(key));
            }
        }
    }

    fn free(&mut self, bytes: u64) {
        debug_assert!(self.bytes >= bytes, "freeing {bytes} of {} counted", self.bytes);
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    fn delete_key(&mut self, kv: Arc<KeyValue>, rev: i64, w: &mut WriteCtx) {
        if kv.lease != 0 {
            self.unbind(kv.lease, &kv.key);
        }
        self.push_version(&kv.key, Rec { rev, sub: w.sub, kv: None });
        w.sub += 1;
        let tomb = Arc::new(tombstone(&kv.key, rev));
        w.events.push(Event { kind: EventKind::Delete, kv: tomb, prev_kv: Some(kv) });
    }

    /// Check a Txn's write set, choose its branches, check the chosen ops, then run them: each
    /// step one pass over the request, so a Txn costs time linear in its size (plus the keys
    /// its compares, ranges and deletes visit). Errors leave the store unchanged.
    fn apply_txn(&mut self, t: &TxnRequest, w: &mut WriteCtx) -> Result<TxnResponse, KvError> {
        check_txn_writes(t, &mut w.steps)?;
        let mut path = Vec::new();
        self.choose_txn_path(t, &mut path, &mut w.steps)?;
        let mut next = 0;
        let resp = self.txn(t, &path, &mut next, w);
        debug_assert_eq!(next, path.len());
        Ok(resp)
    }

    /// Run the branches `path` chose, taking one decision per Txn from `next` on.
    fn txn(&mut self, t: &TxnRequest, path: &[bool], next: &mut usize, w: &mut WriteCtx) -> TxnResponse {
        let succeeded = path[*next];
        *next += 1;
        let ops = if succeeded { &t.success } else { &t.failure };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            w.steps += 1;
            let resp = match op {
                RequestOp::Range(r) => {
                    // Reads inside a Txn see the Txn's own earlier writes.
                    let rev = if w.events.is_empty() { self.revision() } else { self.revision() + 1 };
                    let at = if r.revision > 0 { r.revision } else { rev };
                    ResponseOp::Range(self.range_at(r, at, &mut w.steps))
                }
                RequestOp::Put(p) => ResponseOp::Put(self.put(p, w)),
                RequestOp::DeleteRange(d) => ResponseOp::DeleteRange(self.delete_range(d, w)),
                RequestOp::Txn(inner) => ResponseOp::Txn(self.txn(inner, path, next, w)),
            };
            responses.push(resp);
        }
        TxnResponse { succeeded, responses }
    }

    fn compact(&mut self, rev: i64) -> Result<(), KvError> {
        if rev <= self.compact_revision {
            return Err(KvError::Compacted { requested: rev, compacted: self.compact_revision });
        }
        if rev > self.revision() {
            return Err(KvError::FutureRevision { requested: rev, current: self.revision() });
        }
        self.compact_revision = rev;
        self.keys.retain(|_, recs| {
            // Keep the newest version at or before `rev` (it is what a read at `rev` sees)
            // unless it is a tombstone, and everything after it.
            let keep_from = recs.partition_point(|r| r.rev <= rev).saturating_sub(1);
            recs.drain(..keep_from);
            if recs.first().is_some_and(|r| r.rev <= rev && r.kv.is_none()) {
                recs.remove(0);
            }
            // Give back the room of the versions compacted away (a key's history grows by
            // doubling and would otherwise keep its largest size for good).
            if recs.capacity() > 2 * recs.len() {
                recs.shrink_to_fit();
            }
            !recs.is_empty()
        });
        self.bytes = count_bytes(&self.keys, &self.leases);
        Ok(())
    }

    fn lease_grant(&mut self, id: i64, ttl_s: i64, pos: LogPosition) -> Result<CommandResponse, KvError> {
        if ttl_s > LEASE_MAX_TTL_S {
            return Err(KvError::LeaseTtlTooLarge { ttl_s });
        }
        let id = if id == 0 { self.choose_lease_id(pos) } else { id };
        if self.leases.contains_key(&id) {
            return Err(KvError::LeaseExists { id });
        }
        self.leases.insert(id, Lease { id, ttl_s, remaining_ms: None, set_at: pos.index, keys: BTreeSet::new() });
        self.bytes += LEASE_SLOT_BYTES;
        Ok(CommandResponse::LeaseGrant { id, ttl_s })
    }

    /// A positive id derived from the entry's log position, so every member picks the same.
    fn choose_lease_id(&self, pos: LogPosition) -> i64 {
        let mut seed = pos.index ^ pos.term.rotate_left(32);
        loop {
            seed = splitmix64(seed);
            let id = (seed >> 1) as i64;
            if id != 0 && !self.leases.contains_key(&id) {
                return id;
            }
        }
    }

    fn revoke(&mut self, id: i64, w: &mut WriteCtx) {
        let Some(lease) = self.leases.remove(&id) else { return };
        self.free(lease_bytes(&lease));
        let rev = self.revision() + 1;
        for key in &lease.keys {
            if let Some(kv) = self.current_shared(key) {
                debug_assert_eq!(kv.lease, id);
                self.delete_key(kv, rev, w);
            }
        }
    }

    // ---- snapshots ----

    pub fn to_snapshot(&self) -> StoreSnapshot {
        StoreSnapshot {
            revision: self.revision,
            compact_revision: self.compact_revision,
            keys: self
                .keys
                .iter()
                .map(|(k, recs)| (k.clone(), recs.iter().map(|r| (r.rev, r.sub, r.kv.as_deref().cloned())).collect()))
                .collect(),
            leases: self.leases.values().cloned().collect(),
            alarms: self.alarms(),
        }
    }

    /// A borrowed view that serialises exactly as `to_snapshot()` would, without copying the
    /// keyspace first (snapshots of a large store would otherwise hold it twice).
    pub fn snapshot_view(&self) -> impl Serialize + '_ {
        SnapshotView(self)
    }

    pub fn from_snapshot(s: StoreSnapshot) -> Self {
        let mut store = Store {
            revision: s.revision,
            compact_revision: s.compact_revision,
            keys: s
                .keys
                .into_iter()
                .map(|(k, recs)| {
                    // Not `collect`: it would reuse the decoded versions' larger buffer in place.
                    let mut history = Vec::with_capacity(recs.len());
                    history.extend(recs.into_iter().map(|(rev, sub, kv)| Rec { rev, sub, kv: kv.map(Arc::new) }));
                    (k, history)
                })
                .collect(),
            leases: s.leases.into_iter().map(|l| (l.id, l)).collect(),
            alarms: s.alarms.into_iter().collect(),
            bytes: 0,
            auth: AuthStore::default(),
        };
        store.bytes = count_bytes(&store.keys, &store.leases);
        store
    }
}

struct SnapshotView<'a>(&'a Store);
struct KeysView<'a>(&'a BTreeMap<Key, Vec<Rec>>);
struct RecsView<'a>(&'a [Rec]);
struct LeasesView<'a>(&'a BTreeMap<i64, Lease>);

impl Serialize for SnapshotView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        // Field order and shapes must match `StoreSnapshot`.
        let mut st = s.serialize_struct("StoreSnapshot", 5)?;
        st.serialize_field("revision", &self.0.revision)?;
        st.serialize_field("compact_revision", &self.0.compact_revision)?;
        st.serialize_field("keys", &KeysView(&self.0.keys))?;
        st.serialize_field("leases", &LeasesView(&self.0.leases))?;
        st.serialize_field("alarms", &self.0.alarms)?;
        st.end()
    }
}

impl Serialize for KeysView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|(k, recs)| (k, RecsView(recs))))
    }
}

impl Serialize for RecsView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|r| (r.rev, r.sub, r.kv.as_deref())))
    }
}

impl Serialize for LeasesView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.values())
    }
}

fn count_bytes(keys: &BTreeMap<Key, Vec<Rec>>, leases: &BTreeMap<i64, Lease>) -> u64 {
    let keys: u64 = keys
        .iter()
        .map(|(k, recs)| key_bytes(k) + recs.iter().map(|r| version_bytes(r.kv.as_deref())).sum::<u64>())
        .sum();
    keys + leases.values().map(lease_bytes).sum::<u64>()
}

/// Write on the keys, and read too when the previous values are asked for.
fn authorize_write(
    a: &AuthStore,
    user: Option<&str>,
    key: &[u8],
    range_end: &[u8],
    prev_kv: bool,
) -> Result<(), AuthError> {
    a.check(user, key, range_end, PermType::Write)?;
    if prev_kv {
        a.check(user, key, range_end, PermType::Read)?;
    }
    Ok(())
}

/// Whether a Txn writes in any branch, nested Txns included.
pub fn txn_writes(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).any(|op| match op {
        RequestOp::Put(_) | RequestOp::DeleteRange(_) => true,
        RequestOp::Txn(inner) => txn_writes(inner),
        RequestOp::Range(_) => false,
    })
}

impl Store {
    /// What a command may add to `bytes_in_use` at most (a new key, a new version, a lease or a
    /// key bound to one), if it may
    /// add anything: etcd's quota check refuses such a command before it reaches the log when
    /// the keyspace would outgrow the quota. `None` for commands that only read, delete or free
    /// (they stay allowed, so space can be reclaimed). A Txn costs its dearer branch; a put that
    /// keeps the previous value (`ignore_value`) costs that value.
    pub fn quota_cost(&self, cmd: &Command) -> Option<u64> {
        let put_cost = |p: &PutRequest| {
            let value =
                if p.ignore_value { self.current(&p.key).map_or(0, |kv| kv.value.len()) } else { p.value.len() };
            let bound = if p.lease != 0 && !p.ignore_lease { lease_key_bytes(&p.key) } else { 0 };
            key_bytes(&p.key) + REC_BYTES + KEY_VALUE_BYTES + (p.key.len() + value) as u64 + bound
        };
        fn txn_cost(t: &TxnRequest, put_cost: &dyn Fn(&PutRequest) -> u64) -> u64 {
            let branch = |ops: &[RequestOp]| -> u64 {
                ops.iter()
                    .map(|op| match op {
                        RequestOp::Put(p) => put_cost(p),
                        RequestOp::Txn(inner) => txn_cost(inner, put_cost),
                        _ => 0,
                    })
                    .sum()
            };
            branch(&t.success).max(branch(&t.failure))
        }
        match cmd {
            Command::Authorized { cmd, .. } | Command::Fenced { cmd, .. } | Command::TermFenced { cmd, .. } => {
                self.quota_cost(cmd)
            }
            Command::Put(p) => Some(put_cost(p)),
            Command::Txn(t) if txn_has_put(t) => Some(txn_cost(t, &put_cost)),
            Command::LeaseGrant { .. } => Some(LEASE_SLOT_BYTES),
            _ => None,
        }
    }
}

fn txn_has_put(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).any(|op| match op {
        RequestOp::Put(_) => true,
        RequestOp::Txn(inner) => txn_has_put(inner),
        _ => false,
    })
}

/// The serialisable form of a `Store`, used by Raft snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreSnapshot {
    pub revision: i64,
    pub compact_revision: i64,
    #[allow(clippy::type_complexity)]
    pub keys: Vec<(Key, Vec<(i64, u32, Option<KeyValue>)>)>,
    pub leases: Vec<Lease>,
    pub alarms: Vec<(u64, AlarmType)>,
}

fn version_at(recs: &[Rec], rev: i64) -> Option<&KeyValue> {
    let n = recs.partition_point(|r| r.rev <= rev);
    if n == 0 {
        return None;
    }
    recs[n - 1].kv.as_deref()
}

fn tombstone(key: &[u8], rev: i64) -> KeyValue {
    KeyValue { key: key.to_vec(), mod_revision: rev, ..Default::default() }
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    use std::cmp::Ordering;
    let ord: Ordering = match &c.target {
        CompareTarget::Value(v) => kv.value.as_slice().cmp(v.as_slice()),
        CompareTarget::Create(r) => kv.create_revision.cmp(r),
        CompareTarget::Mod(r) => kv.mod_revision.cmp(r),
        CompareTarget::Version(v) => kv.version.cmp(v),
        CompareTarget::Lease(l) => kv.lease.cmp(l),
    };
    match c.result {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

struct Fnv32(u32);

impl Fnv32 {
    fn new() -> Self {
        Fnv32(0x811c_9dc5)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u32;
            self.0 = self.0.wrapping_mul(0x0100_0193);
        }
    }
    fn finish(&self) -> u32 {
        self.0
    }
}

#[cfg(test)]
mod tests;
