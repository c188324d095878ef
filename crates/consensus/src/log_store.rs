//! The durable Raft log, vote and commit index, on raft-engine (ADR 0011).
//!
//! raft-engine is TiKV's write-ahead log for Raft: appends go to preallocated files, one
//! fdatasync per batch, every batch checksummed, a torn or corrupt tail cut on open, files
//! below the last snapshot deleted. This module is the only code that sees it.
//!
//! Every change goes through one writer thread in order. The writer drains whatever is queued,
//! writes it as one raft-engine batch and syncs before it acknowledges any of it, so concurrent
//! proposals share one fsync (group commit). Raft's own task never waits on the disk for
//! appends, and timers never share a thread with fsync (etcd #13527: a disk stall that blocked
//! the ticker produced two leaders).
//!
//! The newest entries are also kept decoded in memory (at most `CACHE_BYTES`, and always every
//! entry not yet written), so replication reads rarely touch the disk; older ones are read back
//! from raft-engine.
//!
//! A data directory of an older version keeps its log in `raft.redb`; it is migrated on first
//! open (`migrate`).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};
use protobuf::well_known_types::BytesValue;
use raft_engine::{Engine, LogBatch, MessageExt, ReadableSize, RecoveryMode};

use crate::types::{Entry, LogId, TypeConfig, Vote};

/// The log's directory inside a data directory.
pub const ENGINE_DIR: &str = "raft-engine";
/// Where a migration writes before it renames the result to `ENGINE_DIR`.
const MIGRATING_DIR: &str = "raft-engine.migrating";
/// The log of data directories written before ADR 0011.
pub const LEGACY_FILE: &str = "raft.redb";

/// The one Raft group (raft-engine's "region") this engine holds.
const GROUP: u64 = 1;
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";
/// The cluster's incarnation (`crate::incarnation`); absent means 1.
const KEY_INCARNATION: &[u8] = b"incarnation";
/// The recovery plan that raised it, if one did (JSON).
const KEY_RECOVERY_PLAN: &[u8] = b"recovery_plan";
/// The fingerprint of the `raft.redb` a migration copied (`legacy_fingerprint`).
const KEY_MIGRATED_FROM: &[u8] = b"migrated_from";
/// Entries from this index on are void: the log was truncated there and nothing has been
/// appended since (raft-engine drops a tail only when an append overwrites it).
const KEY_TRUNCATED_FROM: &[u8] = b"truncated_from";

/// Decoded entries kept in memory beyond those not yet written.
const CACHE_BYTES: usize = 16 << 20;

/// raft-engine's file size: a purge can delete a file once every entry in it is below the
/// snapshot.
const ENGINE_FILE_BYTES: u64 = 16 << 20;
/// Files are deleted once the log's files exceed this (raft-engine's `purge-threshold`).
const ENGINE_PURGE_BYTES: u64 = 64 << 20;

/// Most queued operations the writer folds into one batch.
const WRITE_BATCH_OPS_MAX: usize = 4096;

/// How often the (unawaited) commit index is written: adding it to every commit cost a fifth of
/// each small commit's time with redb (ADR 0007).
const COMMITTED_WRITE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// An entry as raft-engine stores it: a protobuf `BytesValue` of the index (8 bytes,
/// little-endian) and the entry's bincode encoding.
struct Stored;

impl MessageExt for Stored {
    type Entry = BytesValue;

    fn index(e: &BytesValue) -> u64 {
        e.value.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()))
    }
}

fn stored(e: &Entry) -> io::Result<BytesValue> {
    let mut value = e.index().to_le_bytes().to_vec();
    bincode::serialize_into(&mut value, e).map_err(io_err)?;
    Ok(BytesValue { value, ..Default::default() })
}

fn unstored(v: &BytesValue) -> io::Result<Entry> {
    let entry: Entry = decode(v.value.get(8..).unwrap_or_default())?;
    if entry.index() != Stored::index(v) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "log entry and its index disagree: storage is corrupt"));
    }
    Ok(entry)
}

/// A decoded entry kept in memory.
struct Cached {
    entry: Entry,
    /// Its size as stored, for the cache's budget.
    size: usize,
    /// raft-engine holds it: it may leave the cache.
    written: bool,
}

#[derive(Default)]
struct Mem {
    /// A contiguous tail of the log, decoded, holding at least every entry not yet written.
    cache: BTreeMap<u64, Cached>,
    cache_bytes: usize,
    /// Raised by every truncation and purge: a read from raft-engine that spans one is redone.
    generation: u64,
    /// The last entry's id, or the purge point when there is none after it.
    last: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
    incarnation: u64,
    recovery_plan: Option<crate::recovery::RecoveryPlan>,
}

impl Mem {
    fn insert(&mut self, entry: Entry, size: usize, written: bool) {
        self.last = Some(entry.log_id());
        self.cache_bytes += size;
        if let Some(old) = self.cache.insert(entry.index(), Cached { entry, size, written }) {
            self.cache_bytes -= old.size;
        }
    }

    /// Drop cached entries from `from` on.
    fn drop_from(&mut self, from: u64) {
        for (_, c) in self.cache.split_off(&from) {
            self.cache_bytes -= c.size;
        }
    }

    /// Drop cached entries up to `upto`, inclusive.
    fn drop_upto(&mut self, upto: u64) {
        let keep = self.cache.split_off(&(upto.saturating_add(1)));
        for (_, c) in std::mem::replace(&mut self.cache, keep) {
            self.cache_bytes -= c.size;
        }
    }

    /// Mark the entry `id` written, if the cache still holds that entry (not one that replaced
    /// it after a truncation).
    fn mark_written(&mut self, id: &LogId) {
        if let Some(c) = self.cache.get_mut(&id.index()).filter(|c| c.entry.log_id() == *id) {
            c.written = true;
        }
    }

    /// Evict the oldest written entries while the cache is over its budget. The cache stays a
    /// contiguous tail: it stops at the first entry not yet written.
    fn evict(&mut self) {
        while self.cache_bytes > CACHE_BYTES {
            match self.cache.first_entry() {
                Some(first) if first.get().written => {
                    self.cache_bytes -= first.remove().size;
                }
                _ => break,
            }
        }
    }
}

enum Op {
    /// Entries' ids (to mark them written in the cache) and their stored form, in order.
    Append(Vec<LogId>, Vec<BytesValue>, IOFlushed<TypeConfig>),
    TruncateFrom(u64),
    Purge {
        upto: u64,
        log_id: Vec<u8>,
    },
    Meta {
        key: &'static [u8],
        value: Vec<u8>,
        done: Option<tokio::sync::oneshot::Sender<io::Result<()>>>,
    },
    /// A recovery's writes (`crate::recovery`), in one durable batch: an entry appended, and
    /// meta values.
    Recovery {
        entry: Option<BytesValue>,
        meta: Vec<(&'static [u8], Vec<u8>)>,
        done: tokio::sync::oneshot::Sender<io::Result<()>>,
    },
}

/// The newest commit index not yet written, handed to the writer without waking it: it is
/// advisory and written at most every `COMMITTED_WRITE_INTERVAL`, so a queue message per commit
/// would wake the writer thread once per write for nothing (ADR 0007).
/// A commit index to write: (log index, encoded value, how many ops had been queued when it was
/// set).
type Pending = (u64, Vec<u8>, u64);

#[derive(Clone, Default)]
struct PendingCommitted {
    value: Arc<Mutex<Option<Pending>>>,
    /// Ops queued to the writer so far. The index is written only with a batch that includes
    /// every op queued before it was set: those ops put its entry on disk, and a truncation
    /// among them may have replaced what the same index held before (a commit index written
    /// with the old entry still on disk would name an entry never committed).
    queued: Arc<std::sync::atomic::AtomicU64>,
}

/// The highest log index on disk once `ops` are written after a log whose highest was `last`
/// (entries or the purge point, whichever is higher).
fn last_index_after(mut last: u64, ops: &[Op]) -> u64 {
    for op in ops {
        match op {
            Op::Append(ids, ..) => last = ids.last().map_or(last, |id| id.index()),
            Op::TruncateFrom(from) => last = last.min(from.saturating_sub(1)),
            Op::Purge { upto, .. } => last = last.max(*upto),
            Op::Meta { .. } => {}
            Op::Recovery { entry, .. } => last = entry.as_ref().map_or(last, Stored::index),
        }
    }
    last
}

/// Whether a commit index set when `queued` ops had been queued may be written with a batch
/// that leaves `batch_last` as the highest index on disk, `handled` ops having been received:
/// its entry must be on disk, and every op queued before it (a truncation that replaced what
/// the same index held before, say) must be in this batch or an earlier one.
fn commit_is_covered(index: u64, queued: u64, batch_last: u64, handled: u64) -> bool {
    index <= batch_last && queued <= handled
}

/// What the writer thread has done, for metrics and for checking group commit.
#[derive(Default)]
pub struct LogStats {
    /// How long each commit's fsync took (etcd's WAL fsync).
    pub fsync_seconds: crate::metrics::FsyncHistogram,
    /// Batches written with fsync.
    pub durable_commits: std::sync::atomic::AtomicU64,
    /// Log entries made durable.
    pub entries: std::sync::atomic::AtomicU64,
    /// The last `FSYNC_SAMPLES_MAX` fsyncs (when each ended, microseconds it took), for `ctl
    /// status`: the same measurements as `fsync_seconds`, so the two agree.
    pub recent_commit_us: Mutex<std::collections::VecDeque<(std::time::Instant, u64)>>,
}

/// Batch commit times kept for the fsync p99 that `ctl status` shows.
pub const FSYNC_SAMPLES_MAX: usize = 256;

impl LogStats {
    /// One commit's fsync (the slow-disk failpoint's stall included), timed once and fed to
    /// both the histogram and the recent samples.
    fn record_fsync(&self, took: std::time::Duration) {
        self.fsync_seconds.0.observe(took.as_secs_f64());
        let mut recent = self.recent_commit_us.lock().unwrap();
        if recent.len() == FSYNC_SAMPLES_MAX {
            recent.pop_front();
        }
        recent.push_back((std::time::Instant::now(), took.as_micros() as u64));
    }
}

#[derive(Clone)]
pub struct LogStore {
    pub stats: Arc<LogStats>,
    engine: Arc<Engine>,
    mem: Arc<Mutex<Mem>>,
    tx: mpsc::Sender<Op>,
    committed: PendingCommitted,
    /// Artificial delay before each fsync: the drill's slow-disk failpoint. Zero in production.
    fsync_delay: Arc<std::sync::atomic::AtomicU64>,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn encode<T: serde::Serialize>(v: &T) -> io::Result<Vec<u8>> {
    bincode::serialize(v).map_err(io_err)
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> io::Result<T> {
    bincode::deserialize(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

fn engine_config(dir: &Path) -> raft_engine::Config {
    raft_engine::Config {
        dir: dir.display().to_string(),
        // A torn or corrupt last batch is cut on open; anywhere else it stops the open.
        recovery_mode: RecoveryMode::TolerateTailCorruption,
        recovery_threads: 2,
        // Entries are small and written one batch per fsync: compressing them would only add
        // CPU to the write path.
        batch_compression_threshold: ReadableSize(0),
        target_file_size: ReadableSize(ENGINE_FILE_BYTES),
        purge_threshold: ReadableSize(ENGINE_PURGE_BYTES),
        ..Default::default()
    }
}

/// Open (or create) raft-engine in `dir`, with `dir` and its parent synced: raft-engine does
/// not sync the directory entries of a new log, and its first file holds the vote.
fn open_engine(dir: &Path) -> io::Result<Engine> {
    let engine = Engine::open(engine_config(dir)).map_err(|e| io_err(format!("open {}: {e}", dir.display())))?;
    sync_dir(dir)?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(engine)
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// What identifies the `raft.redb` a migration copied: its length and modification time.
fn legacy_fingerprint(legacy: &Path) -> io::Result<Vec<u8>> {
    let m = std::fs::metadata(legacy)?;
    let modified = m.modified()?.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    encode(&(m.len(), modified.as_nanos() as u64))
}

/// Whether `data_dir` holds a Raft log (of this version or an older one).
pub fn exists(data_dir: &Path) -> bool {
    data_dir.join(ENGINE_DIR).exists() || data_dir.join(LEGACY_FILE).exists()
}

/// Bytes the Raft log takes on disk.
pub fn disk_bytes(data_dir: &Path) -> u64 {
    let files = std::fs::read_dir(data_dir.join(ENGINE_DIR)).into_iter().flatten().flatten();
    files.filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum::<u64>()
        + std::fs::metadata(data_dir.join(LEGACY_FILE)).map_or(0, |m| m.len())
}

fn get_key(engine: &Engine, key: &[u8]) -> Option<Vec<u8>> {
    engine.get(GROUP, key)
}

/// Read entries `[from, to)` back from raft-engine.
fn read_engine(engine: &Engine, from: u64, to: u64) -> io::Result<Vec<Entry>> {
    if from >= to {
        return Ok(Vec::new());
    }
    let mut stored = Vec::with_capacity((to - from) as usize);
    engine.fetch_entries_to::<Stored>(GROUP, from, to, None, &mut stored).map_err(io_err)?;
    stored.iter().map(unstored).collect()
}

impl LogStore {
    /// Open (or create) the log of the data directory `data_dir`, migrating a log of an older
    /// version first.
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        migrate(data_dir)?;
        let engine = Arc::new(open_engine(&data_dir.join(ENGINE_DIR))?);
        let mut mem = Mem { incarnation: 1, ..Default::default() };
        if let Some(v) = get_key(&engine, KEY_VOTE) {
            mem.vote = Some(decode(&v)?);
        }
        if let Some(v) = get_key(&engine, KEY_COMMITTED) {
            mem.committed = decode(&v)?;
        }
        if let Some(v) = get_key(&engine, KEY_PURGED) {
            mem.last_purged = Some(decode(&v)?);
        }
        if let Some(v) = get_key(&engine, KEY_INCARNATION) {
            mem.incarnation = decode(&v)?;
        }
        if let Some(v) = get_key(&engine, KEY_RECOVERY_PLAN) {
            let json: String = decode(&v)?;
            mem.recovery_plan = Some(serde_json::from_str(&json).map_err(io_err)?);
        }
        let void_from: Option<u64> = get_key(&engine, KEY_TRUNCATED_FROM).map(|v| decode(&v)).transpose()?;
        let (tail, cut) = load_tail(&engine, mem.committed.map_or(0, |c| c.index()), void_from)?;
        for (entry, size) in tail {
            mem.insert(entry, size, true);
        }
        if mem.last.is_none() {
            mem.last = mem.last_purged;
        }
        let mut writer_meta = BTreeMap::new();
        for key in [
            KEY_VOTE,
            KEY_COMMITTED,
            KEY_PURGED,
            KEY_INCARNATION,
            KEY_RECOVERY_PLAN,
            KEY_TRUNCATED_FROM,
            KEY_MIGRATED_FROM,
        ] {
            if let Some(v) = get_key(&engine, key) {
                writer_meta.insert(key, v);
            }
        }
        if let Some(from) = cut {
            let mut batch = LogBatch::default();
            let value = encode(&from)?;
            batch.put(GROUP, KEY_TRUNCATED_FROM.to_vec(), value.clone()).map_err(io_err)?;
            writer_meta.insert(KEY_TRUNCATED_FROM, value);
            // The commit index never names an entry the log no longer holds.
            if mem.committed.is_some_and(|c| c.index() >= from) {
                mem.committed = mem.last;
                let value = encode(&mem.committed)?;
                batch.put(GROUP, KEY_COMMITTED.to_vec(), value.clone()).map_err(io_err)?;
                writer_meta.insert(KEY_COMMITTED, value);
            }
            engine.write(&mut batch, true).map_err(io_err)?;
        }
        let (tx, rx) = mpsc::channel();
        let fsync_delay = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stats = Arc::new(LogStats::default());
        let committed = PendingCommitted::default();
        let mem = Arc::new(Mutex::new(mem));
        let writer = Writer {
            engine: engine.clone(),
            mem: mem.clone(),
            committed: committed.clone(),
            fsync_delay: fsync_delay.clone(),
            stats: stats.clone(),
            meta: writer_meta,
        };
        let last = {
            let m = mem.lock().unwrap();
            m.last.map_or(0, |l| l.index())
        };
        std::thread::Builder::new().name("quorate-log-writer".into()).spawn(move || writer.run(rx, last))?;
        Ok(LogStore { stats, engine, mem, tx, committed, fsync_delay })
    }

    /// A log for a restored data directory: empty, purged up to `upto` (the restored snapshot),
    /// with that as its commit index.
    pub fn write_restored(data_dir: &Path, upto: LogId) -> io::Result<()> {
        let engine = open_engine(&data_dir.join(ENGINE_DIR))?;
        let mut batch = LogBatch::default();
        batch.put(GROUP, KEY_PURGED.to_vec(), encode(&upto)?).map_err(io_err)?;
        batch.put(GROUP, KEY_COMMITTED.to_vec(), encode(&Some(upto))?).map_err(io_err)?;
        engine.write(&mut batch, true).map_err(io_err)?;
        Ok(())
    }

    /// The cluster's incarnation as this log store holds it (1 unless a recovery raised it).
    pub fn incarnation(&self) -> u64 {
        self.mem.lock().unwrap().incarnation
    }

    /// The recovery plan that set the incarnation, if one did (stored as JSON).
    pub fn recovery_plan(&self) -> Option<crate::recovery::RecoveryPlan> {
        self.mem.lock().unwrap().recovery_plan.clone()
    }

    /// Nothing was ever written here: no vote, no entry, nothing purged.
    pub fn is_fresh(&self) -> bool {
        let mem = self.mem.lock().unwrap();
        mem.vote.is_none() && mem.last.is_none()
    }

    /// The last log id, the vote and the commit index, as stored.
    pub(crate) fn state(&self) -> (Option<LogId>, Option<Vote>, Option<LogId>) {
        let mem = self.mem.lock().unwrap();
        (mem.last, mem.vote, mem.committed)
    }

    /// The entries from `from` on.
    pub(crate) fn entries_from(&self, from: u64) -> io::Result<Vec<Entry>> {
        self.read(from, u64::MAX)
    }

    /// Entries `[from, to)` that the log holds: older ones from raft-engine, the rest from the
    /// cache.
    fn read(&self, from: u64, to: u64) -> io::Result<Vec<Entry>> {
        // A truncation (then an append over it) may reach raft-engine while entries are read
        // from it outside the lock: the read is then done again on the new log.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let generation = self.mem.lock().unwrap().generation;
            let read = self.read_once(from, to);
            if self.mem.lock().unwrap().generation == generation || attempts == 5 {
                return read;
            }
        }
    }

    fn read_once(&self, from: u64, to: u64) -> io::Result<Vec<Entry>> {
        let (disk_to, mut cached) = {
            let mem = self.mem.lock().unwrap();
            let first = mem.last_purged.map_or(0, |p| p.index() + 1);
            // raft-engine's first entry: below it (or with none) the cache holds everything.
            let first = first.max(self.engine.first_index(GROUP).unwrap_or(0));
            let from = from.max(first);
            let end = to.min(mem.last.map_or(0, |l| l.index() + 1));
            if from >= end {
                return Ok(Vec::new());
            }
            let cache_first = mem.cache.keys().next().copied().unwrap_or(end).clamp(from, end);
            let cached: Vec<Entry> = mem.cache.range(cache_first..end).map(|(_, c)| c.entry.clone()).collect();
            ((from, cache_first), cached)
        };
        // Entries below the cache were written before they were evicted, and the engine holds
        // them until a purge, which openraft does not run over entries it is reading, or until
        // a truncation, which `read` watches for.
        let mut entries = read_engine(&self.engine, disk_to.0, disk_to.1)?;
        entries.append(&mut cached);
        Ok(entries)
    }

    /// Durably write a recovery (`crate::recovery`): `entry` appended after the last one, `vote`
    /// saved, the incarnation and the plan id set. Only while Raft is stopped.
    pub(crate) async fn write_recovery(
        &self,
        entry: Option<Entry>,
        vote: Option<Vote>,
        plan: &crate::recovery::RecoveryPlan,
    ) -> io::Result<()> {
        let json = serde_json::to_string(plan).map_err(io_err)?;
        let mut meta = vec![(KEY_INCARNATION, encode(&plan.incarnation)?), (KEY_RECOVERY_PLAN, encode(&json)?)];
        if let Some(v) = &vote {
            meta.push((KEY_VOTE, encode(v)?));
        }
        let encoded = match &entry {
            Some(e) => Some(stored(e)?),
            None => None,
        };
        let size = encoded.as_ref().map_or(0, |v| v.value.len());
        let (done, wait) = tokio::sync::oneshot::channel();
        self.send(Op::Recovery { entry: encoded, meta, done })?;
        wait.await.map_err(|_| io_err("log writer thread has stopped"))??;
        let mut mem = self.mem.lock().unwrap();
        if let Some(e) = entry {
            mem.insert(e, size, true);
        }
        if vote.is_some() {
            mem.vote = vote;
        }
        mem.incarnation = plan.incarnation;
        mem.recovery_plan = Some(plan.clone());
        Ok(())
    }

    /// A member joining a recovered cluster starts at the cluster's incarnation.
    pub(crate) async fn set_incarnation(&self, incarnation: u64) -> io::Result<()> {
        self.put_meta(KEY_INCARNATION, encode(&incarnation)?).await?;
        self.mem.lock().unwrap().incarnation = incarnation;
        Ok(())
    }

    /// Failpoint for fault drills: stall every fsync by `ms` milliseconds.
    pub fn set_fsync_delay_ms(&self, ms: u64) {
        self.fsync_delay.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn send(&self, op: Op) -> io::Result<()> {
        self.committed.queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.tx.send(op).map_err(|_| io_err("log writer thread has stopped"))
    }

    async fn put_meta(&self, key: &'static [u8], value: Vec<u8>) -> io::Result<()> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.send(Op::Meta { key, value, done: Some(done) })?;
        wait.await.map_err(|_| io_err("log writer thread has stopped"))?
    }
}

/// A write (and its sync) at least this slow is logged.
const SLOW_WRITE: std::time::Duration = std::time::Duration::from_millis(300);

/// The writer thread: the only code that writes to raft-engine once the log is open.
struct Writer {
    engine: Arc<Engine>,
    mem: Arc<Mutex<Mem>>,
    committed: PendingCommitted,
    fsync_delay: Arc<std::sync::atomic::AtomicU64>,
    stats: Arc<LogStats>,
    /// Every key's newest value, written again with each purge so that no old file stays
    /// alive only for a key last written there.
    meta: BTreeMap<&'static [u8], Vec<u8>>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Op>, mut last: u64) {
        // Ops received so far, against `PendingCommitted::queued`.
        let mut handled = 0u64;
        // The commit index rides along with a durable batch at most every
        // `COMMITTED_WRITE_INTERVAL`, or is written on its own when the log is idle: after a
        // crash a lower commit index only means re-applying more of the log once a leader
        // commits again. It is never written ahead of the entries it names: `last` is the
        // highest index on disk.
        let mut committed_written = std::time::Instant::now();
        loop {
            let mut ops = Vec::new();
            match rx.recv_timeout(COMMITTED_WRITE_INTERVAL) {
                Ok(op) => ops.push(op),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            while ops.len() < WRITE_BATCH_OPS_MAX {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            handled += ops.len() as u64;
            let batch_last = last_index_after(last, &ops);
            let due = ops.is_empty() || committed_written.elapsed() >= COMMITTED_WRITE_INTERVAL;
            let pending = self.committed.value.lock().unwrap().take();
            match pending {
                Some((index, value, queued)) if due && commit_is_covered(index, queued, batch_last, handled) => {
                    ops.insert(0, Op::Meta { key: KEY_COMMITTED, value, done: None });
                    committed_written = std::time::Instant::now();
                }
                // Not yet: hand it back unless a newer one has arrived meanwhile.
                Some(held) => {
                    self.committed.value.lock().unwrap().get_or_insert(held);
                }
                None => {}
            }
            if ops.is_empty() {
                continue;
            }
            let purged = ops.iter().any(|op| matches!(op, Op::Purge { .. }));
            // raft-engine panics where a write or sync fails: that must stop the member too.
            let began = std::time::Instant::now();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.write_batch(&ops)))
                .unwrap_or_else(|_| Err("raft-engine panicked while writing".into()));
            if began.elapsed() >= SLOW_WRITE {
                let ms = began.elapsed().as_millis() as u64;
                tracing::warn!(ms, ops = ops.len(), "a raft log write and its sync took this long");
            }
            last = batch_last;
            if result.is_ok() {
                use std::sync::atomic::Ordering::Relaxed;
                self.stats.durable_commits.fetch_add(1, Relaxed);
                let entries: usize =
                    ops.iter().map(|op| if let Op::Append(ids, ..) = op { ids.len() } else { 0 }).sum();
                self.stats.entries.fetch_add(entries as u64, Relaxed);
                self.written(&ops);
            }
            for op in ops {
                let r = result.as_ref().map(|_| ()).map_err(io_err);
                match op {
                    Op::Append(_, _, cb) => cb.io_completed(r),
                    Op::Meta { done: Some(done), .. } | Op::Recovery { done, .. } => {
                        let _ = done.send(r);
                    }
                    _ => {}
                }
            }
            if let Err(e) = result {
                // A write that cannot be made durable must stop the member, not just this
                // thread: continuing would serve a state whose log is not on disk.
                tracing::error!(error = %e, "raft log write failed; stopping the member");
                std::process::abort();
            }
            if purged {
                let engine = &self.engine;
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.purge_expired_files())) {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "deleting raft log files below the snapshot failed"),
                    Err(_) => {
                        tracing::error!("raft-engine panicked while deleting files; stopping the member");
                        std::process::abort();
                    }
                }
            }
        }
    }

    fn put(&mut self, batch: &mut LogBatch, key: &'static [u8], value: Vec<u8>) -> Result<(), String> {
        batch.put(GROUP, key.to_vec(), value.clone()).map_err(|e| e.to_string())?;
        self.meta.insert(key, value);
        Ok(())
    }

    fn write_batch(&mut self, ops: &[Op]) -> Result<(), String> {
        let mut batch = LogBatch::default();
        let truncated_from = |meta: &BTreeMap<&[u8], Vec<u8>>| -> Option<u64> {
            meta.get(KEY_TRUNCATED_FROM).and_then(|v| decode(v).ok())
        };
        for op in ops {
            let appended: &[BytesValue] = match op {
                Op::Append(_, stored, _) => stored,
                Op::Recovery { entry: Some(e), .. } => std::slice::from_ref(e),
                _ => &[],
            };
            if let Some(first) = appended.first().map(Stored::index) {
                batch.add_entries::<Stored>(GROUP, appended).map_err(|e| e.to_string())?;
                // An append starts where a truncation left the log: raft-engine overwrites the
                // void tail, and the mark goes.
                if truncated_from(&self.meta).is_some_and(|from| first <= from) {
                    batch.delete(GROUP, KEY_TRUNCATED_FROM.to_vec());
                    self.meta.remove(KEY_TRUNCATED_FROM);
                }
            }
            match op {
                Op::Append(..) => {}
                Op::TruncateFrom(from) => {
                    let from = truncated_from(&self.meta).map_or(*from, |old| old.min(*from));
                    self.put(&mut batch, KEY_TRUNCATED_FROM, encode(&from).map_err(|e| e.to_string())?)?;
                }
                Op::Purge { upto, log_id } => {
                    batch.add_command(GROUP, raft_engine::Command::Compact { index: upto + 1 });
                    self.put(&mut batch, KEY_PURGED, log_id.clone())?;
                    // What was void below the purge point is gone; the rest stays void.
                    if truncated_from(&self.meta).is_some_and(|from| from <= upto + 1) {
                        self.put(&mut batch, KEY_TRUNCATED_FROM, encode(&(upto + 1)).map_err(|e| e.to_string())?)?;
                    }
                    for (key, value) in self.meta.clone() {
                        batch.put(GROUP, key.to_vec(), value).map_err(|e| e.to_string())?;
                    }
                }
                Op::Recovery { meta, .. } => {
                    for (key, value) in meta {
                        self.put(&mut batch, key, value.clone())?;
                    }
                }
                Op::Meta { key, value, .. } => self.put(&mut batch, key, value.clone())?,
            }
        }
        // The failpoint's stall counts as fsync time: it stands for a slow disk.
        let started = std::time::Instant::now();
        let delay_ms = self.fsync_delay.load(std::sync::atomic::Ordering::Relaxed);
        if delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        }
        let written = self.engine.write(&mut batch, true).map(|_| ()).map_err(|e| e.to_string());
        self.stats.record_fsync(started.elapsed());
        written
    }

    /// After a batch is on disk: its entries may leave the cache.
    fn written(&self, ops: &[Op]) {
        let mut mem = self.mem.lock().unwrap();
        for op in ops {
            if let Op::Append(ids, ..) = op {
                for id in ids {
                    mem.mark_written(id);
                }
            }
        }
        mem.evict();
    }
}

/// The entries `load_tail` read back (each with its stored size), and where it cut the log.
type Tail = (Vec<(Entry, usize)>, Option<u64>);

/// Read the log's tail back on open: every entry after the commit index `committed`, and older
/// ones while they fit the cache. A payload that fails its checksum is a corrupt tail: the log
/// is cut before the lowest one (returned as the cut), as raft-engine cuts a torn batch.
fn load_tail(engine: &Engine, committed: u64, void_from: Option<u64>) -> io::Result<Tail> {
    const STEP: u64 = 256;
    let (Some(first), Some(last)) = (engine.first_index(GROUP), engine.last_index(GROUP)) else {
        return Ok((Vec::new(), None));
    };
    let end = (last + 1).min(void_from.unwrap_or(u64::MAX));
    let verify_from = first.max(committed + 1);
    let (mut tail, mut cut, mut bytes) = (Vec::new(), None, 0usize);
    let mut hi = end;
    while hi > first && (hi > verify_from || bytes < CACHE_BYTES) {
        let lo = hi.saturating_sub(STEP).max(first);
        let mut chunk = Vec::new();
        let read: io::Result<Vec<Entry>> = match engine.fetch_entries_to::<Stored>(GROUP, lo, hi, None, &mut chunk) {
            Ok(_) => chunk.iter().map(unstored).collect(),
            Err(e) => Err(io_err(e)),
        };
        match read {
            Ok(entries) => {
                for (entry, v) in entries.into_iter().zip(&chunk).rev() {
                    bytes += v.value.len();
                    tail.push((entry, v.value.len()));
                }
            }
            // One by one, from the top: the lowest entry that fails is where the log ends.
            Err(_) => {
                for i in (lo..hi).rev() {
                    match engine.get_entry::<Stored>(GROUP, i).map_err(io_err).and_then(|v| {
                        let v = v.ok_or_else(|| io_err(format!("log entry {i} is missing")))?;
                        Ok((unstored(&v)?, v.value.len()))
                    }) {
                        Ok((entry, size)) => {
                            bytes += size;
                            tail.push((entry, size));
                        }
                        // Below the commit index too: a lagging follower's last batch often
                        // carries the commit index that covers it. Such an entry is on a
                        // majority; the leader replicates it again (`allow_log_reversion`).
                        Err(e) => {
                            tracing::warn!(index = i, error = %e, "the raft log's tail is corrupt; cutting it there");
                            cut = Some(i);
                            tail.clear();
                            bytes = 0;
                        }
                    }
                }
            }
        }
        hi = lo;
    }
    tail.reverse();
    Ok((tail, cut))
}

/// Copy a log of an older version (`raft.redb`) into raft-engine: written to
/// `MIGRATING_DIR`, synced, renamed to `ENGINE_DIR`, and only then is `raft.redb` removed, so a
/// crash at any point leaves one whole log to open.
fn migrate(data_dir: &Path) -> io::Result<()> {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
    const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
    let legacy = data_dir.join(LEGACY_FILE);
    let target = data_dir.join(ENGINE_DIR);
    if !legacy.exists() {
        return Ok(());
    }
    // One migration at a time (a member starting while `ctl recover` opens the directory).
    let lock = std::fs::File::open(data_dir)?;
    lock.try_lock().map_err(|_| io_err(format!("{} is in use by another process", data_dir.display())))?;
    if target.exists() {
        // The rename happened and the removal did not, if this is the file that was copied. A
        // raft.redb written since (an older quorate started on the migrated directory) holds
        // votes and entries the new log lacks: neither may be dropped silently.
        let copied = open_engine(&target)?.get(GROUP, KEY_MIGRATED_FROM);
        if copied.as_deref() == Some(legacy_fingerprint(&legacy)?.as_slice()) {
            return std::fs::remove_file(&legacy);
        }
        return Err(io_err(format!(
            "{} holds both {LEGACY_FILE} and {ENGINE_DIR}/, and {LEGACY_FILE} is not the log that was migrated \
             (was an older quorate started on this directory after the upgrade?); \
             keep the one to use: move {} away to go on with the migrated log",
            data_dir.display(),
            legacy.display()
        )));
    }
    let staging: PathBuf = data_dir.join(MIGRATING_DIR);
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    tracing::info!(from = %legacy.display(), to = %target.display(), "migrating the raft log to raft-engine (ADR 0011)");
    // Opened for writing once, to repair an unclean shutdown, then read-only: the file is not
    // touched after its fingerprint is taken.
    drop(redb::Database::open(&legacy).map_err(|e| io_err(format!("open {}: {e}", legacy.display())))?);
    let fingerprint = legacy_fingerprint(&legacy)?;
    let db = redb::ReadOnlyDatabase::open(&legacy).map_err(|e| io_err(format!("open {}: {e}", legacy.display())))?;
    let r = db.begin_read().map_err(io_err)?;
    let engine = open_engine(&staging)?;
    let mut batch = LogBatch::default();
    batch.put(GROUP, KEY_MIGRATED_FROM.to_vec(), fingerprint).map_err(io_err)?;
    let mut entries = 0u64;
    match r.open_table(META) {
        Ok(meta) => {
            for (old, new) in [
                ("vote", KEY_VOTE),
                ("committed", KEY_COMMITTED),
                ("last_purged", KEY_PURGED),
                ("incarnation", KEY_INCARNATION),
                ("recovery_plan", KEY_RECOVERY_PLAN),
            ] {
                if let Some(v) = meta.get(old).map_err(io_err)? {
                    batch.put(GROUP, new.to_vec(), v.value().to_vec()).map_err(io_err)?;
                }
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(io_err(e)),
    }
    match r.open_table(LOG) {
        Ok(log) => {
            let mut chunk = Vec::new();
            for item in log.iter().map_err(io_err)? {
                let (k, v) = item.map_err(io_err)?;
                let entry: Entry = decode(v.value())?;
                if entry.index() != k.value() {
                    return Err(io_err(format!("{}: log key and entry index disagree", legacy.display())));
                }
                chunk.push(stored(&entry)?);
                entries += 1;
                // Batches as small as live ones: a read decodes its entry's whole batch.
                if chunk.len() == 64 {
                    batch.add_entries::<Stored>(GROUP, &chunk).map_err(io_err)?;
                    engine.write(&mut batch, false).map_err(io_err)?;
                    chunk.clear();
                }
            }
            batch.add_entries::<Stored>(GROUP, &chunk).map_err(io_err)?;
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(io_err(e)),
    }
    engine.write(&mut batch, true).map_err(io_err)?;
    drop(engine);
    sync_dir(&staging)?;
    std::fs::rename(&staging, &target)?;
    sync_dir(data_dir)?;
    drop(r);
    drop(db);
    std::fs::remove_file(&legacy)?;
    tracing::info!(entries, "raft log migrated");
    Ok(())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let from = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        self.read(from, to)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.mem.lock().unwrap().vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let mem = self.mem.lock().unwrap();
        Ok(LogState { last_purged_log_id: mem.last_purged, last_log_id: mem.last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.put_meta(KEY_VOTE, encode(vote)?).await?;
        self.mem.lock().unwrap().vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not awaited for durability: after a crash, a lower committed index only means some
        // entries are re-applied from the log, which is always safe.
        let queued = self.committed.queued.load(std::sync::atomic::Ordering::SeqCst);
        let pending = (committed.map_or(0, |l| l.index()), encode(&committed)?, queued);
        self.mem.lock().unwrap().committed = committed;
        *self.committed.value.lock().unwrap() = Some(pending);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.mem.lock().unwrap().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Encoded before taking the lock that replication reads wait on.
        let entries: Vec<Entry> = entries.into_iter().collect();
        let encoded = entries.iter().map(stored).collect::<io::Result<Vec<_>>>()?;
        let ids = entries.iter().map(|e| e.log_id()).collect();
        {
            let mut mem = self.mem.lock().unwrap();
            for (e, v) in entries.into_iter().zip(&encoded) {
                mem.insert(e, v.value.len(), false);
            }
        }
        self.send(Op::Append(ids, encoded, callback))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        {
            let mut mem = self.mem.lock().unwrap();
            mem.drop_from(from);
            mem.generation += 1;
            mem.last = last_log_id.or(mem.last_purged);
        }
        self.send(Op::TruncateFrom(from))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let upto = log_id.index();
        let encoded = encode(&log_id)?;
        {
            let mut mem = self.mem.lock().unwrap();
            mem.drop_upto(upto);
            mem.generation += 1;
            mem.last_purged = Some(log_id);
            if mem.last.is_none_or(|l| l.index() <= upto) {
                mem.last = Some(log_id);
            }
        }
        self.send(Op::Purge { upto, log_id: encoded })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::vote::RaftLeaderIdExt;

    fn log_id(index: u64) -> LogId {
        openraft::LogId::new(openraft::alias::LeaderIdOf::<TypeConfig>::new_committed(1, 1), index)
    }

    /// Reopen a log once the previous handle's writer thread has let go of the directory.
    fn reopen(path: &Path) -> LogStore {
        let mut last = None;
        for _ in 0..100 {
            match LogStore::open(path) {
                Ok(log) => return log,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("the log stayed locked: {last:?}");
    }

    #[tokio::test]
    async fn the_commit_index_reaches_disk_with_its_entries_once_the_log_is_idle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        {
            let mut log = LogStore::open(&path).unwrap();
            let entries: Vec<Entry> = (1..=3).map(|i| Entry::new_blank(log_id(i))).collect();
            log.append(entries, IOFlushed::noop()).await.unwrap();
            // Not awaited by openraft: recorded without waking the writer, and written by it
            // within one interval of the log going idle.
            log.save_committed(Some(log_id(3))).await.unwrap();
            std::thread::sleep(COMMITTED_WRITE_INTERVAL * 3);
        }
        let mut log = reopen(&path);
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(3)));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(3)), "the entries the commit index names are on disk too");
    }

    /// `ctl status`'s fsync p99 and `etcd_disk_wal_fsync_duration_seconds` are taken over the
    /// same measurements: batches with many entries to insert (time spent before the fsync)
    /// leave the two sums equal, to the microsecond the samples are rounded to.
    #[tokio::test]
    async fn the_fsync_samples_and_the_fsync_histogram_time_the_same_thing() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogStore::open(dir.path()).unwrap();
        const BATCH: u64 = 3000;
        for batch in 0..3 {
            let entries: Vec<Entry> =
                (batch * BATCH + 1..=(batch + 1) * BATCH).map(|i| Entry::new_blank(log_id(i))).collect();
            log.append(entries, IOFlushed::noop()).await.unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while log.stats.entries.load(Relaxed) < (batch + 1) * BATCH {
                assert!(std::time::Instant::now() < deadline, "batch {batch} not durable");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        let samples: Vec<u64> = log.stats.recent_commit_us.lock().unwrap().iter().map(|(_, us)| *us).collect();
        // The histogram's count and sum, as a scrape reads them.
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("fsync", "", log.stats.fsync_seconds.0.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let value = |name: &str| -> f64 {
            text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap()
        };
        let (count, sum) = (value("fsync_count"), value("fsync_sum"));
        assert_eq!(count as usize, samples.len(), "one sample per fsync in both");
        let samples_s = samples.iter().sum::<u64>() as f64 / 1e6;
        let rounding_s = samples.len() as f64 * 1e-6;
        assert!(
            (sum - samples_s).abs() <= rounding_s + 1e-9,
            "histogram {sum} s, samples {samples_s} s over {} fsyncs",
            samples.len()
        );
    }

    #[test]
    fn the_last_index_on_disk_follows_appends_truncations_and_purges() {
        let append = |from: u64, to: u64| Op::Append((from..=to).map(log_id).collect(), Vec::new(), IOFlushed::noop());
        let purge = |upto: u64| Op::Purge { upto, log_id: Vec::new() };
        assert_eq!(last_index_after(0, &[]), 0);
        assert_eq!(last_index_after(0, &[append(1, 3)]), 3);
        assert_eq!(last_index_after(3, &[append(4, 4), Op::TruncateFrom(3)]), 2);
        assert_eq!(last_index_after(5, &[Op::TruncateFrom(9)]), 5, "truncating past the end changes nothing");
        assert_eq!(last_index_after(5, &[Op::TruncateFrom(3), append(3, 4)]), 4);
        assert_eq!(last_index_after(5, &[purge(5)]), 5, "a purged log keeps its purge point");
        assert_eq!(last_index_after(0, &[purge(7)]), 7, "a restored log starts at its snapshot");
    }

    #[test]
    fn a_commit_index_waits_for_every_op_queued_before_it() {
        // Entries 1-10 of term 1 on disk; truncate_after(6) and append(7-10, term 2) queued but
        // not yet drained when commit (term 2, 8) is set: index 8 is on disk, but not the entry
        // the commit names.
        assert!(!commit_is_covered(8, 12, 10, 10), "written with the term-1 entry 8 still on disk");
        assert!(commit_is_covered(8, 12, 10, 12), "written with the batch that replaces it");
        assert!(!commit_is_covered(11, 12, 10, 12), "its entry is not on disk");
    }

    #[tokio::test]
    async fn a_commit_index_ahead_of_the_log_waits_for_its_entries() {
        // Entries 1-5 written, the index names 8; with or without entries 6-8 following.
        async fn run(then_append: bool) -> Option<LogId> {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().to_path_buf();
            {
                let mut log = LogStore::open(&path).unwrap();
                let entries: Vec<Entry> = (1..=5).map(|i| Entry::new_blank(log_id(i))).collect();
                log.append(entries, IOFlushed::noop()).await.unwrap();
                log.save_committed(Some(log_id(8))).await.unwrap();
                std::thread::sleep(COMMITTED_WRITE_INTERVAL * 3);
                if then_append {
                    log.append([6, 7, 8].map(|i| Entry::new_blank(log_id(i))), IOFlushed::noop()).await.unwrap();
                    std::thread::sleep(COMMITTED_WRITE_INTERVAL * 3);
                }
            }
            reopen(&path).read_committed().await.unwrap()
        }
        assert_eq!(run(false).await, None, "entry 8 never reached the disk, so neither did its index");
        assert_eq!(run(true).await, Some(log_id(8)), "written once its entries are");
    }

    #[tokio::test]
    async fn a_commit_index_set_right_after_its_append_is_never_written_without_the_entry() {
        // Each round appends one entry and at once names it committed, as a follower does; the
        // writer may pick the index up at any moment. Whatever was on disk when the handle went
        // away, the commit index there never runs ahead of the log.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        {
            let mut log = LogStore::open(&path).unwrap();
            for i in 1..=300 {
                log.append([Entry::new_blank(log_id(i))], IOFlushed::noop()).await.unwrap();
                log.save_committed(Some(log_id(i))).await.unwrap();
                if i % 50 == 0 {
                    std::thread::sleep(COMMITTED_WRITE_INTERVAL + std::time::Duration::from_millis(10));
                }
            }
        }
        let mut log = reopen(&path);
        let committed = log.read_committed().await.unwrap().expect("an idle interval wrote the commit index");
        let last = log.get_log_state().await.unwrap().last_log_id.unwrap();
        assert!(committed.index >= 250, "written at the last idle pause, got {committed:?}");
        assert!(committed.index <= last.index, "commit index {committed:?} is ahead of the log's last entry {last:?}");
    }

    fn entry(index: u64, term: u64, body: &str) -> Entry {
        let leader = openraft::alias::LeaderIdOf::<TypeConfig>::new_committed(term, 1);
        let request = crate::types::Request::Kv(quorate_kv::Command::Put(quorate_kv::PutRequest {
            key: format!("k{index}").into_bytes(),
            value: body.as_bytes().to_vec(),
            ..Default::default()
        }));
        Entry::new_normal(openraft::LogId::new(leader, index), request)
    }

    /// Append and wait until the writer has made it durable.
    async fn append_durably(log: &mut LogStore, entries: Vec<Entry>) {
        use openraft::type_config::TypeConfigExt;
        let (tx, rx) = TypeConfig::oneshot();
        let cb = IOFlushed::signal(tx);
        log.append(entries, cb).await.unwrap();
        rx.await.unwrap().expect("the append is durable");
    }

    async fn all(log: &mut LogStore) -> Vec<Entry> {
        log.try_get_log_entries(..).await.unwrap()
    }

    async fn last(log: &mut LogStore) -> Option<LogId> {
        log.get_log_state().await.unwrap().last_log_id
    }

    /// Wait until the writer has handled everything queued so far (a durable meta write is
    /// queued behind it).
    async fn settle(log: &LogStore) {
        log.put_meta(b"settle", Vec::new()).await.unwrap();
    }

    #[tokio::test]
    async fn a_truncation_survives_a_restart_until_an_append_overwrites_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = LogStore::open(dir.path()).unwrap();
            append_durably(&mut log, (1..=10).map(|i| entry(i, 1, "old")).collect()).await;
            log.truncate_after(Some(log_id(6))).await.unwrap();
            settle(&log).await;
        }
        let mut log = reopen(dir.path());
        assert_eq!(last(&mut log).await.map(|l| l.index()), Some(6), "entries 7-10 stay gone after a restart");
        assert_eq!(all(&mut log).await.len(), 6);
        append_durably(&mut log, (7..=8).map(|i| entry(i, 2, "new")).collect()).await;
        drop(log);
        let mut log = reopen(dir.path());
        let entries = all(&mut log).await;
        assert_eq!(
            entries.iter().map(|e| (e.index(), e.log_id().leader_id.term)).collect::<Vec<_>>().last(),
            Some(&(8, 2))
        );
        assert_eq!(entries.len(), 8, "the new entries replaced the void tail: {entries:?}");
    }

    #[tokio::test]
    async fn entries_evicted_from_memory_are_read_back_from_disk_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogStore::open(dir.path()).unwrap();
        let body = "x".repeat(4096);
        // Past the cache's budget, so the oldest entries are read back from raft-engine.
        let n = (CACHE_BYTES / 4096) as u64 * 2;
        for chunk in (1..=n).collect::<Vec<_>>().chunks(64) {
            append_durably(&mut log, chunk.iter().map(|i| entry(*i, 1, &body)).collect()).await;
        }
        assert!(log.mem.lock().unwrap().cache.len() < n as usize, "the cache kept every entry");
        let entries = all(&mut log).await;
        assert_eq!(entries.iter().map(|e| e.index()).collect::<Vec<_>>(), (1..=n).collect::<Vec<_>>());
        let some = log.try_get_log_entries(5..8).await.unwrap();
        assert_eq!(some.iter().map(|e| e.index()).collect::<Vec<_>>(), vec![5, 6, 7]);
        assert_eq!(some[0], entry(5, 1, &body));
    }

    #[tokio::test]
    async fn a_purge_deletes_the_files_below_it_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let body = "y".repeat(8192);
        let n = 4 * ENGINE_PURGE_BYTES / 8192;
        {
            let mut log = LogStore::open(dir.path()).unwrap();
            log.save_vote(&Vote::new(3, 1)).await.unwrap();
            for chunk in (1..=n).collect::<Vec<_>>().chunks(256) {
                append_durably(&mut log, chunk.iter().map(|i| entry(*i, 1, &body)).collect()).await;
            }
            let before = disk_bytes(dir.path());
            log.purge(log_id(n - 10)).await.unwrap();
            settle(&log).await;
            // Files are deleted by the writer right after the purge's batch is on disk.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let mut after = disk_bytes(dir.path());
            while after >= before / 2 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
                after = disk_bytes(dir.path());
            }
            assert!(after < before / 2, "{before} bytes before the purge, {after} after");
        }
        let mut log = reopen(dir.path());
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(n - 10)));
        assert_eq!(state.last_log_id.map(|l| l.index()), Some(n));
        assert_eq!(all(&mut log).await.len(), 10);
        assert_eq!(
            log.read_vote().await.unwrap(),
            Some(Vote::new(3, 1)),
            "the vote outlived the file it was written in"
        );
    }

    /// The log's newest raft-engine file.
    fn last_file(dir: &Path) -> PathBuf {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(ENGINE_DIR))
            .unwrap()
            .map(|f| f.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "raftlog"))
            .collect();
        files.sort();
        files.pop().expect("a raft-engine file")
    }

    /// Entries 1-10 in batches of one, then 11-20 in one batch, the last record on disk; returns
    /// the file and offset where that record starts.
    async fn two_batches(dir: &Path) -> (PathBuf, u64) {
        let mut log = LogStore::open(dir).unwrap();
        for i in 1..=10 {
            append_durably(&mut log, vec![entry(i, 1, "first")]).await;
        }
        close(log);
        let (file, len) = (last_file(dir), written_len(&last_file(dir)));
        // The engine's lock goes a moment after its last handle (`reopen`).
        let mut log = reopen(dir);
        append_durably(&mut log, (11..=20).map(|i| entry(i, 1, "second")).collect()).await;
        // A lagging follower's last batch often comes with a commit index covering it.
        log.save_committed(Some(log_id(20))).await.unwrap();
        std::thread::sleep(COMMITTED_WRITE_INTERVAL * 3);
        close(log);
        // raft-engine may have started a new file on reopening.
        if last_file(dir) == file {
            (file, len)
        } else {
            (last_file(dir), 0)
        }
    }

    /// How much of a raft-engine file is written: it preallocates, and cuts the zeros when it
    /// closes the file, which may still be under way when `close` returns.
    fn written_len(file: &Path) -> u64 {
        std::fs::read(file).unwrap().iter().rposition(|b| *b != 0).map_or(0, |i| i as u64 + 1)
    }

    /// Drop the log and wait until raft-engine's last handle is gone (the writer thread lets go
    /// of it once it sees the queue closed). Its drop, which releases the directory's lock, may
    /// still be running when this returns: open the log again with `reopen`.
    fn close(log: LogStore) {
        let engine = Arc::downgrade(&log.engine);
        drop(log);
        while engine.upgrade().is_some() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Whatever happens to the last record, the log opens with entries 1-10 intact and either
    /// 11-20 intact too or none of them: never a damaged entry.
    async fn check_prefix(dir: &Path, what: &str) -> u64 {
        let mut log = reopen(dir);
        let entries = all(&mut log).await;
        let n = entries.len() as u64;
        assert!(n == 10 || n == 20, "{what}: {n} entries survived");
        for (i, e) in entries.iter().enumerate() {
            let i = i as u64 + 1;
            assert_eq!(*e, entry(i, 1, if i <= 10 { "first" } else { "second" }), "{what}: entry {i}");
        }
        assert_eq!(last(&mut log).await.map(|l| l.index()), Some(n));
        let committed = log.read_committed().await.unwrap().map_or(0, |c| c.index());
        assert!(committed <= n, "{what}: the commit index {committed} names an entry the log lost");
        // And it takes new entries after what survived.
        append_durably(&mut log, vec![entry(n + 1, 2, "after")]).await;
        close(log);
        let mut log = reopen(dir);
        assert_eq!(last(&mut log).await.map(|l| (l.index(), l.leader_id.term)), Some((n + 1, 2)), "{what}");
        n
    }

    #[tokio::test]
    async fn a_torn_or_corrupt_last_record_is_cut_never_read_as_data() {
        let template = tempfile::tempdir().unwrap();
        let (file, last_batch) = two_batches(template.path()).await;
        let len = written_len(&file);
        let mut rng = rand::rng();
        use rand::Rng;
        let mut cut = 0;
        for round in 0..24 {
            let dir = tempfile::tempdir().unwrap();
            copy_dir(template.path(), dir.path());
            let file = dir.path().join(file.strip_prefix(template.path()).unwrap());
            let at = rng.random_range(last_batch..len);
            let what = if round % 2 == 0 {
                std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(at).unwrap();
                format!("truncated at {at} of {len}")
            } else {
                let mut bytes = std::fs::read(&file).unwrap();
                bytes[at as usize] ^= 0x5a;
                std::fs::write(&file, bytes).unwrap();
                format!("byte {at} of {len} flipped")
            };
            if check_prefix(dir.path(), &what).await == 10 {
                cut += 1;
            }
        }
        assert!(cut > 0, "no round damaged the last record");
    }

    fn copy_dir(from: &Path, to: &Path) {
        for f in std::fs::read_dir(from).unwrap() {
            let f = f.unwrap();
            let target = to.join(f.file_name());
            if f.file_type().unwrap().is_dir() {
                std::fs::create_dir_all(&target).unwrap();
                copy_dir(&f.path(), &target);
            } else {
                std::fs::copy(f.path(), target).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn a_log_of_the_previous_version_is_migrated_on_first_open() {
        use redb::TableDefinition;
        const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
        const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
        let dir = tempfile::tempdir().unwrap();
        // Written as the redb log of the previous version wrote it.
        {
            let db = redb::Database::create(dir.path().join(LEGACY_FILE)).unwrap();
            let w = db.begin_write().unwrap();
            {
                let mut log = w.open_table(LOG).unwrap();
                for i in 4..=300 {
                    log.insert(i, encode(&entry(i, 2, "migrated")).unwrap().as_slice()).unwrap();
                }
                let mut meta = w.open_table(META).unwrap();
                meta.insert("vote", encode(&Vote::new(2, 1)).unwrap().as_slice()).unwrap();
                meta.insert("committed", encode(&Some(log_id(290))).unwrap().as_slice()).unwrap();
                meta.insert("last_purged", encode(&log_id(3)).unwrap().as_slice()).unwrap();
                meta.insert("incarnation", encode(&7u64).unwrap().as_slice()).unwrap();
            }
            w.commit().unwrap();
        }
        // Kept as the migration will fingerprint it: after a clean open and close.
        drop(redb::Database::open(dir.path().join(LEGACY_FILE)).unwrap());
        let backup = tempfile::NamedTempFile::new().unwrap();
        std::fs::copy(dir.path().join(LEGACY_FILE), backup.path()).unwrap();
        let mut log = LogStore::open(dir.path()).unwrap();
        assert!(!dir.path().join(LEGACY_FILE).exists(), "raft.redb is removed once migrated");
        assert!(!dir.path().join(MIGRATING_DIR).exists());
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(3)));
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(2, 1)));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(290)));
        assert_eq!(log.incarnation(), 7);
        let entries = all(&mut log).await;
        assert_eq!(entries.len(), 297);
        assert!(entries.iter().zip(4..).all(|(e, i)| *e == entry(i, 2, "migrated")));
        let fingerprint: (u64, u64) = decode(&log.engine.get(GROUP, KEY_MIGRATED_FROM).unwrap()).unwrap();
        close(log);
        // Opened again: nothing to migrate, the same log.
        let mut log = reopen(dir.path());
        assert_eq!(all(&mut log).await.len(), 297);
        close(log);

        // A crash between the rename and the removal leaves the copied raft.redb beside the new
        // log: it is removed on the next open.
        std::fs::copy(backup.path(), dir.path().join(LEGACY_FILE)).unwrap();
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(fingerprint.1);
        std::fs::File::options().write(true).open(dir.path().join(LEGACY_FILE)).unwrap().set_modified(mtime).unwrap();
        let mut log = reopen(dir.path());
        assert!(!dir.path().join(LEGACY_FILE).exists());
        assert_eq!(all(&mut log).await.len(), 297);
        close(log);

        // A raft.redb written since (an older binary started on the migrated directory) is
        // neither migrated over the new log nor deleted: the member refuses to start.
        redb::Database::create(dir.path().join(LEGACY_FILE)).unwrap();
        let refused = LogStore::open(dir.path()).err().expect("opened with two different logs");
        assert!(refused.to_string().contains("is not the log that was migrated"), "{refused}");
        assert!(dir.path().join(LEGACY_FILE).exists(), "the newer raft.redb was deleted");
    }

    #[tokio::test]
    async fn a_migration_cut_short_is_started_again() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = redb::Database::create(dir.path().join(LEGACY_FILE)).unwrap();
            let w = db.begin_write().unwrap();
            {
                let mut log = w.open_table(redb::TableDefinition::<u64, &[u8]>::new("log")).unwrap();
                log.insert(1, encode(&entry(1, 1, "one")).unwrap().as_slice()).unwrap();
            }
            w.commit().unwrap();
        }
        // A previous attempt died while writing its staging directory.
        std::fs::create_dir_all(dir.path().join(MIGRATING_DIR)).unwrap();
        std::fs::write(dir.path().join(MIGRATING_DIR).join("0000000000000001.raftlog"), b"half").unwrap();
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(all(&mut log).await, vec![entry(1, 1, "one")]);
    }
}
