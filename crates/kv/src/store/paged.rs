//! Long reads in pages: a Range over the whole keyspace, a watch's replay from revision 1 and
//! HashKV each visit every key. The caller holds the store's lock for one page at a time and
//! releases it between pages, so apply (and everything waiting on it) never queues behind a
//! read for longer than one page.
//!
//! Reading in pages is sound because the store is MVCC: a read at a fixed revision sees the
//! same versions whatever was applied after it, as long as no compaction passes that revision
//! between two pages. Each step checks that and refuses with `Compacted` if one did; a read of
//! the latest revision can then start again.
//!
//! A scan never copies a value while the lock is held: it keeps the store's shared
//! `Arc<KeyValue>`s, and `finish` (run without the lock) copies what it returns.

use std::ops::Bound::{self, Excluded, Included, Unbounded};
use std::sync::Arc;

use super::{tombstone, Fnv32, Rec, Store};
use crate::types::*;
use crate::{KvError, Lease};

/// Keys one page visits, by default: small enough that a page takes well under a
/// millisecond, large enough that paging costs little.
pub const READ_PAGE_KEYS: usize = 1024;

/// Where a paged read stopped: `None` before the first page, else the last key visited.
#[derive(Clone, Debug, Default)]
struct Cursor {
    after: Option<Key>,
    done: bool,
}

impl Store {
    /// Up to `keys_max` keys of `[key, range_end)` after `after` (from the start if `None`).
    fn page<'a>(
        &'a self,
        key: &'a [u8],
        range_end: &'a [u8],
        after: Option<&'a [u8]>,
        keys_max: usize,
    ) -> impl Iterator<Item = (&'a Key, &'a Vec<Rec>)> + 'a {
        let lower: Bound<&[u8]> = match after {
            Some(after) => Excluded(after),
            None => Included(key),
        };
        let iter: Box<dyn Iterator<Item = (&Key, &Vec<Rec>)>> = match KeyRange::new(key, range_end) {
            KeyRange::Single(k) if after.is_none() => Box::new(self.keys.get_key_value(k).into_iter()),
            KeyRange::Single(_) => Box::new(std::iter::empty()),
            KeyRange::FromKey(_) => Box::new(self.keys.range::<[u8], _>((lower, Unbounded))),
            KeyRange::Between(s, e) if s < e => Box::new(self.keys.range::<[u8], _>((lower, Excluded(e)))),
            KeyRange::Between(..) => Box::new(std::iter::empty()),
        };
        iter.take(keys_max)
    }

    /// The next page of a Range. `Compacted` if a compaction passed the scan's revision since
    /// it began (a read of the latest revision may start again).
    pub fn range_step(&self, req: &RangeRequest, scan: &mut RangeScan, keys_max: usize) -> Result<(), KvError> {
        self.range_step_counted(req, scan, keys_max, &mut 0)
    }

    pub(super) fn range_step_counted(
        &self,
        req: &RangeRequest,
        scan: &mut RangeScan,
        keys_max: usize,
        steps: &mut u64,
    ) -> Result<(), KvError> {
        if scan.rev < self.compact_revision {
            return Err(KvError::Compacted { requested: scan.rev, compacted: self.compact_revision });
        }
        let mut visited = 0;
        let mut last = None;
        let after = scan.cursor.after.take();
        for (k, recs) in self.page(&req.key, &req.range_end, after.as_deref(), keys_max) {
            visited += 1;
            last = Some(k);
            let Some(kv) = shared_version_at(recs, scan.rev) else { continue };
            scan.count += 1;
            if req.count_only || scan.kvs.len() >= scan.fetch_max {
                continue;
            }
            scan.kvs.push(kv.clone());
        }
        *steps += visited as u64;
        scan.cursor.done = visited < keys_max;
        scan.cursor.after = last.cloned().or(after);
        Ok(())
    }

    /// The next page of a watch's replay.
    pub fn events_step(&self, scan: &mut EventScan, keys_max: usize) -> Result<(), KvError> {
        if scan.start_rev < self.compact_revision {
            return Err(KvError::Compacted { requested: scan.start_rev, compacted: self.compact_revision });
        }
        let mut visited = 0;
        let mut last = None;
        let after = scan.cursor.after.take();
        for (k, recs) in self.page(&scan.key, &scan.range_end, after.as_deref(), keys_max) {
            visited += 1;
            last = Some(k);
            let first = recs.partition_point(|r| r.rev < scan.start_rev);
            let end = recs.partition_point(|r| r.rev <= scan.upto);
            for i in first..end {
                let prev = if i > 0 { recs[i - 1].kv.clone() } else { None };
                let r = &recs[i];
                let ev = match &r.kv {
                    Some(kv) => Event { kind: EventKind::Put, kv: kv.clone(), prev_kv: prev },
                    None => Event { kind: EventKind::Delete, kv: Arc::new(tombstone(k, r.rev)), prev_kv: prev },
                };
                scan.events.push((r.rev, r.sub, ev));
            }
        }
        scan.cursor.done = visited < keys_max;
        scan.cursor.after = last.cloned().or(after);
        Ok(())
    }

    /// The next page of HashKV. `Compacted` if a compaction ran since the scan began: the
    /// versions it hashed are no longer the ones a member would hash now, so start again.
    pub fn hash_step(&self, scan: &mut HashScan, keys_max: usize) -> Result<(), KvError> {
        // Shares the versions; the hashing, which reads every value, runs in `hash_pending`.
        self.versions_step(scan.rev, scan.compact_revision, &mut scan.cursor, keys_max, &mut scan.pending)
    }

    /// One page of every key's versions up to `rev` (shared, not copied): what HashKV and a
    /// snapshot both collect. `Compacted` if the compaction revision moved since the scan began.
    fn versions_step(
        &self,
        rev: i64,
        compact_revision: i64,
        cursor: &mut Cursor,
        keys_max: usize,
        out: &mut Vec<(Key, Vec<Rec>)>,
    ) -> Result<(), KvError> {
        if self.compact_revision != compact_revision {
            return Err(KvError::Compacted { requested: rev, compacted: self.compact_revision });
        }
        let mut visited = 0;
        let mut last = None;
        let after = cursor.after.take();
        for (k, recs) in self.page(&[0], &[0], after.as_deref(), keys_max) {
            visited += 1;
            last = Some(k);
            let upto = recs.partition_point(|r| r.rev <= rev);
            if upto > 0 {
                out.push((k.clone(), recs[..upto].to_vec()));
            }
        }
        cursor.done = visited < keys_max;
        cursor.after = last.cloned().or(after);
        Ok(())
    }
}

/// The newest version of a key at `rev`, shared with the store.
fn shared_version_at(recs: &[Rec], rev: i64) -> Option<&Arc<KeyValue>> {
    let n = recs.partition_point(|r| r.rev <= rev);
    if n == 0 {
        return None;
    }
    recs[n - 1].kv.as_ref()
}

/// A Range read page by page (`Store::range_step`), then `finish`ed without the lock.
#[derive(Debug)]
pub struct RangeScan {
    rev: i64,
    kvs: Vec<Arc<KeyValue>>,
    count: i64,
    /// Without a sort or filter, the scan keeps one past the limit (for `more`); the count
    /// still needs every key.
    fetch_max: usize,
    cursor: Cursor,
}

impl RangeScan {
    /// A scan of `req` at its revision (0: the store's current one), checked against `store`.
    pub fn new(store: &Store, req: &RangeRequest) -> Result<Self, KvError> {
        Ok(Self::at(req, store.read_revision(req.revision)?))
    }

    pub(super) fn at(req: &RangeRequest, rev: i64) -> Self {
        let filtered = req.min_mod_revision != 0
            || req.max_mod_revision != 0
            || req.min_create_revision != 0
            || req.max_create_revision != 0;
        let sorted = req.sort_order != SortOrder::None || req.sort_target != SortTarget::Key;
        let fetch_max = if req.limit > 0 && !filtered && !sorted { (req.limit + 1) as usize } else { usize::MAX };
        RangeScan { rev, kvs: Vec::new(), count: 0, fetch_max, cursor: Cursor::default() }
    }

    pub fn is_done(&self) -> bool {
        self.cursor.done
    }

    /// The revision the scan reads at.
    pub fn revision(&self) -> i64 {
        self.rev
    }

    /// Values found so far (what `finish` will filter, sort and copy).
    pub fn kvs_found(&self) -> usize {
        self.kvs.len()
    }

    /// Filter, sort, limit and copy out what the pages found (no store lock needed).
    pub fn finish(self, req: &RangeRequest) -> RangeResponse {
        let count = self.count;
        let mut kvs = self.kvs;
        kvs.retain(|kv| {
            (req.max_mod_revision == 0 || kv.mod_revision <= req.max_mod_revision)
                && (req.min_mod_revision == 0 || kv.mod_revision >= req.min_mod_revision)
                && (req.max_create_revision == 0 || kv.create_revision <= req.max_create_revision)
                && (req.min_create_revision == 0 || kv.create_revision >= req.min_create_revision)
        });
        let order = match (req.sort_order, req.sort_target) {
            (SortOrder::None, SortTarget::Key) => SortOrder::None,
            (SortOrder::None, _) => SortOrder::Ascend,
            (o, _) => o,
        };
        if order != SortOrder::None {
            kvs.sort_by(|a, b| {
                let ord = match req.sort_target {
                    SortTarget::Key => a.key.cmp(&b.key),
                    SortTarget::Version => a.version.cmp(&b.version),
                    SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                    SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                    SortTarget::Value => a.value.cmp(&b.value),
                };
                if order == SortOrder::Descend {
                    ord.reverse()
                } else {
                    ord
                }
            });
        }
        let mut more = false;
        if req.limit > 0 && kvs.len() > req.limit as usize {
            kvs.truncate(req.limit as usize);
            more = true;
        }
        let kvs = kvs
            .into_iter()
            .map(|kv| match req.keys_only {
                true => KeyValue { value: Vec::new(), key: kv.key.clone(), ..*kv },
                false => (*kv).clone(),
            })
            .collect();
        RangeResponse { kvs, more, count }
    }
}

/// A watch's replay page by page (`Store::events_step`): every event in `[key, range_end)`
/// from `start_rev` up to the revision current when the scan began.
#[derive(Debug)]
pub struct EventScan {
    key: Key,
    range_end: Key,
    start_rev: i64,
    upto: i64,
    events: Vec<(i64, u32, Event)>,
    cursor: Cursor,
}

impl EventScan {
    pub fn new(store: &Store, key: &[u8], range_end: &[u8], start_rev: i64) -> Result<Self, KvError> {
        if start_rev < store.compact_revision {
            return Err(KvError::Compacted { requested: start_rev, compacted: store.compact_revision });
        }
        Ok(EventScan {
            key: key.to_vec(),
            range_end: range_end.to_vec(),
            start_rev,
            upto: store.revision(),
            events: Vec::new(),
            cursor: Cursor::default(),
        })
    }

    pub fn is_done(&self) -> bool {
        self.cursor.done
    }

    /// The last revision the replay covers: live events follow from the next one.
    pub fn upto(&self) -> i64 {
        self.upto
    }

    /// Whether so many events were found that sorting them is worth a thread of its own.
    pub fn is_large(&self) -> bool {
        self.events.len() > 4 * READ_PAGE_KEYS
    }

    /// The events in revision order, and in order inside each revision.
    pub fn finish(self) -> Vec<Event> {
        let mut events = self.events;
        events.sort_by_key(|(rev, sub, _)| (*rev, *sub));
        events.into_iter().map(|(_, _, e)| e).collect()
    }
}

/// HashKV page by page (`Store::hash_step`).
pub struct HashScan {
    rev: i64,
    compact_revision: i64,
    hash: Fnv32,
    /// Versions collected under the lock and not hashed yet (`hash_pending`).
    pending: Vec<(Key, Vec<Rec>)>,
    cursor: Cursor,
}

impl HashScan {
    /// A hash at `rev` (0: the current revision).
    pub fn new(store: &Store, rev: i64) -> Result<Self, KvError> {
        let rev = store.read_revision(rev)?;
        Ok(HashScan {
            rev,
            compact_revision: store.compact_revision,
            hash: Fnv32::new(),
            pending: Vec::new(),
            cursor: Cursor::default(),
        })
    }

    pub fn is_done(&self) -> bool {
        self.cursor.done
    }

    pub fn revision(&self) -> i64 {
        self.rev
    }

    /// The compaction revision the hash was taken at.
    pub fn compact_revision(&self) -> i64 {
        self.compact_revision
    }

    /// Hash what the last steps collected (reads every value: run it without the lock), so a
    /// scan holds at most a page of versions at a time.
    pub fn hash_pending(&mut self) {
        let h = &mut self.hash;
        for (k, recs) in self.pending.drain(..) {
            for r in recs {
                h.write(&k);
                h.write(&r.rev.to_be_bytes());
                h.write(&r.sub.to_be_bytes());
                match &r.kv {
                    Some(kv) => {
                        h.write(&[1]);
                        h.write(&kv.value);
                        h.write(&kv.create_revision.to_be_bytes());
                        h.write(&kv.version.to_be_bytes());
                        h.write(&kv.lease.to_be_bytes());
                    }
                    None => h.write(&[0]),
                }
            }
        }
    }

    /// The hash of every version visited.
    pub fn finish(mut self) -> u32 {
        debug_assert!(self.cursor.done);
        self.hash_pending();
        self.hash.finish()
    }
}

/// `Maintenance.Snapshot`'s copy of the store, page by page (`Store::snapshot_step`): the store
/// as it was at the revision the scan began, without holding the lock for a whole-state copy.
///
/// Every change to a key appends a version at a new revision, so a key's versions up to that
/// revision are the same on every later page, as long as no compaction runs (then the scan
/// starts again). Leases and alarms change without a revision; they are copied when the scan
/// begins, under the same lock as the revision, and each lease's keys are rebuilt from the
/// copied versions (a key belongs to the lease its latest version names).
pub struct SnapshotScan {
    rev: i64,
    compact_revision: i64,
    leases: Vec<Lease>,
    alarms: Vec<(u64, AlarmType)>,
    auth: crate::auth::AuthStore,
    keys: Vec<(Key, Vec<Rec>)>,
    cursor: Cursor,
}

impl SnapshotScan {
    pub fn new(store: &Store) -> Self {
        let leases = (store.leases.values())
            .map(|l| Lease {
                id: l.id,
                ttl_s: l.ttl_s,
                remaining_ms: l.remaining_ms,
                set_at: l.set_at,
                keys: Default::default(),
            })
            .collect();
        SnapshotScan {
            rev: store.revision(),
            compact_revision: store.compact_revision,
            leases,
            alarms: store.alarms.iter().copied().collect(),
            auth: store.auth.clone(),
            keys: Vec::new(),
            cursor: Cursor::default(),
        }
    }

    pub fn is_done(&self) -> bool {
        self.cursor.done
    }

    pub fn revision(&self) -> i64 {
        self.rev
    }

    /// The store at the scan's revision (run without the lock: it rebuilds the indexes).
    pub fn finish(self) -> Store {
        debug_assert!(self.cursor.done);
        let mut leases: std::collections::BTreeMap<i64, Lease> = self.leases.into_iter().map(|l| (l.id, l)).collect();
        for (k, recs) in &self.keys {
            let Some(kv) = recs.last().and_then(|r| r.kv.as_ref()) else { continue };
            if let Some(lease) = leases.get_mut(&kv.lease) {
                lease.keys.insert(k.clone());
            }
        }
        let keys: std::collections::BTreeMap<Key, Vec<Rec>> = self.keys.into_iter().collect();
        let bytes = super::count_bytes(&keys, &leases);
        Store {
            keys,
            revision: self.rev,
            compact_revision: self.compact_revision,
            leases,
            alarms: self.alarms.into_iter().collect(),
            bytes,
            auth: self.auth,
        }
    }
}

impl Store {
    /// The next page of a snapshot's copy: shares the versions (no value is copied).
    /// `Compacted` if a compaction ran since the scan began.
    pub fn snapshot_step(&self, scan: &mut SnapshotScan, keys_max: usize) -> Result<(), KvError> {
        self.versions_step(scan.rev, scan.compact_revision, &mut scan.cursor, keys_max, &mut scan.keys)
    }
}

/// A read-only Txn in pages: its branches are chosen under the lock (`read_only_txn_path`),
/// then each Range it runs is read page by page at the Txn's revision (`read_only_txn_ranges`),
/// and the answer assembled without the lock (`read_only_txn_response`). The same answer as
/// `read_only_txn`, without holding the store for a Txn of 128 whole-keyspace Ranges.
impl Store {
    /// The branch each Txn that runs takes (see `txn_ranges`), and the revision the Txn reads
    /// at. `None` if the Txn writes.
    pub fn read_only_txn_path(&self, t: &TxnRequest) -> Option<Result<(Vec<bool>, i64), KvError>> {
        if super::txn_writes(t) {
            return None;
        }
        let mut path = Vec::new();
        Some(self.choose_txn_path(t, &mut path, &mut 0).map(|()| (path, self.revision())))
    }
}

/// The Ranges a read-only Txn runs along `path`, in the order it runs them, each at `rev` unless
/// it names a revision of its own.
pub fn read_only_txn_ranges(t: &TxnRequest, path: &[bool], rev: i64) -> Vec<RangeRequest> {
    fn walk(t: &TxnRequest, path: &[bool], next: &mut usize, rev: i64, out: &mut Vec<RangeRequest>) {
        let succeeded = path[*next];
        *next += 1;
        for op in if succeeded { &t.success } else { &t.failure } {
            match op {
                RequestOp::Range(r) => {
                    out.push(RangeRequest { revision: if r.revision > 0 { r.revision } else { rev }, ..r.clone() })
                }
                RequestOp::Txn(inner) => walk(inner, path, next, rev, out),
                RequestOp::Put(_) | RequestOp::DeleteRange(_) => unreachable!("read-only txn has no writes"),
            }
        }
    }
    let mut out = Vec::new();
    walk(t, path, &mut 0, rev, &mut out);
    out
}

/// A read-only Txn's answer from its `path` and the results of `read_only_txn_ranges`, in order.
pub fn read_only_txn_response(t: &TxnRequest, path: &[bool], ranges: Vec<RangeResponse>) -> TxnResponse {
    fn walk(
        t: &TxnRequest,
        path: &[bool],
        next: &mut usize,
        ranges: &mut std::vec::IntoIter<RangeResponse>,
    ) -> TxnResponse {
        let succeeded = path[*next];
        *next += 1;
        let responses = (if succeeded { &t.success } else { &t.failure })
            .iter()
            .map(|op| match op {
                RequestOp::Range(_) => ResponseOp::Range(ranges.next().expect("one result per range")),
                RequestOp::Txn(inner) => ResponseOp::Txn(walk(inner, path, next, ranges)),
                RequestOp::Put(_) | RequestOp::DeleteRange(_) => unreachable!("read-only txn has no writes"),
            })
            .collect();
        TxnResponse { succeeded, responses }
    }
    let mut ranges = ranges.into_iter();
    let resp = walk(t, path, &mut 0, &mut ranges);
    debug_assert!(ranges.next().is_none());
    resp
}
