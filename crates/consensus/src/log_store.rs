//! The durable Raft log, vote and commit index, in a redb file.
//!
//! Every change goes through one writer thread in order. The writer drains whatever is queued,
//! writes it in one redb transaction and commits with immediate durability (fsync) before it
//! acknowledges any of it, so concurrent proposals share one fsync (group commit). Raft's own
//! task never waits on the disk for appends, and timers never share a thread with fsync
//! (etcd #13527: a disk stall that blocked the ticker produced two leaders).
//!
//! Entries are also kept in memory between the last purge and the tip, so reads never touch the
//! disk; snapshots bound how many there are.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::types::{Entry, LogId, TypeConfig, Vote};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const META_VOTE: &str = "vote";
const META_COMMITTED: &str = "committed";
const META_PURGED: &str = "last_purged";
/// The cluster's incarnation (`crate::incarnation`); absent means 1.
const META_INCARNATION: &str = "incarnation";
/// The id of the recovery plan that raised it, if one did.
const META_RECOVERY_PLAN: &str = "recovery_plan";

/// redb's page cache for the log. Entries are also held in memory, so reads rarely need it;
/// redb's default (1 GiB) would dominate a member's footprint.
const LOG_CACHE_BYTES: usize = 16 << 20;

/// Most queued operations the writer folds into one transaction.
const WRITE_BATCH_OPS_MAX: usize = 4096;

/// How often the (unawaited) commit index is written: adding it to every commit cost a fifth of
/// each small commit's time (ADR 0007).
const COMMITTED_WRITE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Default)]
struct Mem {
    entries: BTreeMap<u64, Entry>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
    incarnation: u64,
    recovery_plan: Option<crate::recovery::RecoveryPlan>,
}

enum Op {
    Append(Vec<(u64, Vec<u8>)>, IOFlushed<TypeConfig>),
    TruncateFrom(u64),
    Purge {
        upto: u64,
        log_id: Vec<u8>,
    },
    Meta {
        key: &'static str,
        value: Vec<u8>,
        done: Option<tokio::sync::oneshot::Sender<io::Result<()>>>,
    },
    /// A recovery's writes (`crate::recovery`), in one durable transaction: an entry appended,
    /// and meta values.
    Recovery {
        entry: Option<(u64, Vec<u8>)>,
        meta: Vec<(&'static str, Vec<u8>)>,
        done: tokio::sync::oneshot::Sender<io::Result<()>>,
    },
}

/// The newest commit index not yet written, as (log index, encoded value), handed to the writer
/// without waking it: it is advisory and written at most every `COMMITTED_WRITE_INTERVAL`, so a
/// queue message per commit would wake the writer thread once per write for nothing (ADR 0007).
type PendingCommitted = Arc<Mutex<Option<(u64, Vec<u8>)>>>;

/// The highest log index on disk once `ops` are written after a log whose highest was `last`
/// (entries or the purge point, whichever is higher).
fn last_index_after(mut last: u64, ops: &[Op]) -> u64 {
    for op in ops {
        match op {
            Op::Append(entries, _) => last = entries.last().map_or(last, |(i, _)| *i),
            Op::TruncateFrom(from) => last = last.min(from.saturating_sub(1)),
            Op::Purge { upto, .. } => last = last.max(*upto),
            Op::Meta { .. } => {}
            Op::Recovery { entry, .. } => last = entry.as_ref().map_or(last, |(i, _)| *i),
        }
    }
    last
}

/// What the writer thread has done, for metrics and for checking group commit.
#[derive(Default)]
pub struct LogStats {
    /// How long each commit's fsync took (etcd's WAL fsync).
    pub fsync_seconds: crate::metrics::FsyncHistogram,
    /// redb transactions committed with fsync.
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

impl LogStore {
    pub fn open(path: &Path) -> io::Result<Self> {
        let db = Database::builder().set_cache_size(LOG_CACHE_BYTES).create(path).map_err(io_err)?;
        let mut mem = Mem::default();
        {
            let w = db.begin_write().map_err(io_err)?;
            w.open_table(LOG).map_err(io_err)?;
            w.open_table(META).map_err(io_err)?;
            w.commit().map_err(io_err)?;
        }
        {
            let r = db.begin_read().map_err(io_err)?;
            let meta = r.open_table(META).map_err(io_err)?;
            if let Some(v) = meta.get(META_VOTE).map_err(io_err)? {
                mem.vote = Some(decode(v.value())?);
            }
            if let Some(v) = meta.get(META_COMMITTED).map_err(io_err)? {
                mem.committed = decode(v.value())?;
            }
            if let Some(v) = meta.get(META_PURGED).map_err(io_err)? {
                mem.last_purged = Some(decode(v.value())?);
            }
            mem.incarnation = match meta.get(META_INCARNATION).map_err(io_err)? {
                Some(v) => decode(v.value())?,
                None => 1,
            };
            if let Some(v) = meta.get(META_RECOVERY_PLAN).map_err(io_err)? {
                let json: String = decode(v.value())?;
                mem.recovery_plan = Some(serde_json::from_str(&json).map_err(io_err)?);
            }
            let log = r.open_table(LOG).map_err(io_err)?;
            for item in log.iter().map_err(io_err)? {
                let (k, v) = item.map_err(io_err)?;
                let entry: Entry = decode(v.value())?;
                assert_eq!(k.value(), entry.index(), "log key and entry index disagree: storage is corrupt");
                mem.entries.insert(k.value(), entry);
            }
        }
        let (tx, rx) = mpsc::channel();
        let fsync_delay = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let delay = fsync_delay.clone();
        let stats = Arc::new(LogStats::default());
        let writer_stats = stats.clone();
        let committed = PendingCommitted::default();
        let writer_committed = committed.clone();
        let last = mem.entries.keys().next_back().copied().max(mem.last_purged.map(|l| l.index())).unwrap_or(0);
        std::thread::Builder::new()
            .name("quorate-log-writer".into())
            .spawn(move || writer(db, rx, last, writer_committed, delay, writer_stats))?;
        Ok(LogStore { stats, mem: Arc::new(Mutex::new(mem)), tx, committed, fsync_delay })
    }

    /// A log for a restored data directory: empty, purged up to `upto` (the restored snapshot),
    /// with that as its commit index.
    pub fn write_restored(path: &Path, upto: LogId) -> io::Result<()> {
        let db = Database::builder().set_cache_size(LOG_CACHE_BYTES).create(path).map_err(io_err)?;
        let mut w = db.begin_write().map_err(io_err)?;
        w.set_two_phase_commit(true);
        {
            w.open_table(LOG).map_err(io_err)?;
            let mut meta = w.open_table(META).map_err(io_err)?;
            meta.insert(META_PURGED, encode(&upto)?.as_slice()).map_err(io_err)?;
            meta.insert(META_COMMITTED, encode(&Some(upto))?.as_slice()).map_err(io_err)?;
        }
        w.commit().map_err(io_err)
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
        mem.vote.is_none() && mem.entries.is_empty() && mem.last_purged.is_none()
    }

    /// The last log id, the vote and the entries from `from` on, as stored.
    pub(crate) fn state(&self, from: u64) -> (Option<LogId>, Option<Vote>, Option<LogId>, Vec<Entry>) {
        let mem = self.mem.lock().unwrap();
        let last = mem.entries.values().next_back().map(|e| e.log_id()).or(mem.last_purged);
        (last, mem.vote, mem.committed, mem.entries.range(from..).map(|(_, e)| e.clone()).collect())
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
        let mut meta = vec![(META_INCARNATION, encode(&plan.incarnation)?), (META_RECOVERY_PLAN, encode(&json)?)];
        if let Some(v) = &vote {
            meta.push((META_VOTE, encode(v)?));
        }
        let encoded = match &entry {
            Some(e) => Some((e.index(), encode(e)?)),
            None => None,
        };
        let (done, wait) = tokio::sync::oneshot::channel();
        self.send(Op::Recovery { entry: encoded, meta, done })?;
        wait.await.map_err(|_| io_err("log writer thread has stopped"))??;
        let mut mem = self.mem.lock().unwrap();
        if let Some(e) = entry {
            mem.entries.insert(e.index(), e);
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
        self.put_meta(META_INCARNATION, encode(&incarnation)?).await?;
        self.mem.lock().unwrap().incarnation = incarnation;
        Ok(())
    }

    /// Failpoint for fault drills: stall every fsync by `ms` milliseconds.
    pub fn set_fsync_delay_ms(&self, ms: u64) {
        self.fsync_delay.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn send(&self, op: Op) -> io::Result<()> {
        self.tx.send(op).map_err(|_| io_err("log writer thread has stopped"))
    }

    async fn put_meta(&self, key: &'static str, value: Vec<u8>) -> io::Result<()> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.send(Op::Meta { key, value, done: Some(done) })?;
        wait.await.map_err(|_| io_err("log writer thread has stopped"))?
    }
}

fn writer(
    db: Database,
    rx: mpsc::Receiver<Op>,
    mut last: u64,
    committed: PendingCommitted,
    fsync_delay: Arc<std::sync::atomic::AtomicU64>,
    stats: Arc<LogStats>,
) {
    // The commit index rides along with a durable batch at most every
    // `COMMITTED_WRITE_INTERVAL`, or is written on its own when the log is idle: each write adds
    // pages to the commit it rides with, and after a crash a lower commit index only means
    // re-applying more of the log once a leader commits again. It is never written ahead of
    // the entries it names: `last` is the highest index on disk.
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
        let batch_last = last_index_after(last, &ops);
        let due = ops.is_empty() || committed_written.elapsed() >= COMMITTED_WRITE_INTERVAL;
        let pending = committed.lock().unwrap().take();
        match pending {
            Some((index, value)) if due && index <= batch_last => {
                ops.insert(0, Op::Meta { key: META_COMMITTED, value, done: None });
                committed_written = std::time::Instant::now();
            }
            // Not yet: hand it back unless a newer one has arrived meanwhile.
            Some(held) => {
                committed.lock().unwrap().get_or_insert(held);
            }
            None => {}
        }
        if ops.is_empty() {
            continue;
        }
        let result = write_batch(&db, &ops, &fsync_delay, &stats);
        last = batch_last;
        if result.is_ok() {
            use std::sync::atomic::Ordering::Relaxed;
            stats.durable_commits.fetch_add(1, Relaxed);
            let entries: usize = ops.iter().map(|op| if let Op::Append(e, _) = op { e.len() } else { 0 }).sum();
            stats.entries.fetch_add(entries as u64, Relaxed);
        }
        for op in ops {
            let r = result.as_ref().map(|_| ()).map_err(io_err);
            match op {
                Op::Append(_, cb) => cb.io_completed(r),
                Op::Meta { done: Some(done), .. } | Op::Recovery { done, .. } => {
                    let _ = done.send(r);
                }
                _ => {}
            }
        }
        if let Err(e) = result {
            // A write that cannot be made durable must stop the member, not just this thread:
            // continuing would serve a state whose log is not on disk.
            tracing::error!(error = %e, "raft log write failed; stopping the member");
            std::process::abort();
        }
    }
}

fn write_batch(
    db: &Database,
    ops: &[Op],
    fsync_delay: &std::sync::atomic::AtomicU64,
    stats: &LogStats,
) -> Result<(), String> {
    let mut w = db.begin_write().map_err(|e| e.to_string())?;
    w.set_two_phase_commit(true);
    {
        let mut log = w.open_table(LOG).map_err(|e| e.to_string())?;
        for op in ops {
            match op {
                Op::Append(entries, _) => {
                    for (i, bytes) in entries {
                        log.insert(*i, bytes.as_slice()).map_err(|e| e.to_string())?;
                    }
                }
                Op::TruncateFrom(from) => {
                    log.retain_in(*from.., |_, _| false).map_err(|e| e.to_string())?;
                }
                Op::Purge { upto, log_id } => {
                    let mut meta = w.open_table(META).map_err(|e| e.to_string())?;
                    meta.insert(META_PURGED, log_id.as_slice()).map_err(|e| e.to_string())?;
                    log.retain_in(..=*upto, |_, _| false).map_err(|e| e.to_string())?;
                }
                Op::Recovery { entry, meta: values, .. } => {
                    if let Some((i, bytes)) = entry {
                        log.insert(*i, bytes.as_slice()).map_err(|e| e.to_string())?;
                    }
                    let mut meta = w.open_table(META).map_err(|e| e.to_string())?;
                    for (key, value) in values {
                        meta.insert(*key, value.as_slice()).map_err(|e| e.to_string())?;
                    }
                }
                Op::Meta { key, value, .. } => {
                    // Opened per use: most batches are appends alone, and opening a table
                    // costs about a twentieth of a small commit's CPU.
                    let mut meta = w.open_table(META).map_err(|e| e.to_string())?;
                    meta.insert(*key, value.as_slice()).map_err(|e| e.to_string())?;
                }
            }
        }
    }
    // The failpoint's stall counts as fsync time: it stands for a slow disk.
    let started = std::time::Instant::now();
    let delay_ms = fsync_delay.load(std::sync::atomic::Ordering::Relaxed);
    if delay_ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
    }
    let committed = w.commit().map_err(|e| e.to_string());
    stats.record_fsync(started.elapsed());
    committed
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let mem = self.mem.lock().unwrap();
        Ok(mem.entries.range(range).map(|(_, e)| e.clone()).collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.mem.lock().unwrap().vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let mem = self.mem.lock().unwrap();
        let last = mem.entries.values().next_back().map(|e| e.log_id()).or_else(|| mem.last_purged);
        Ok(LogState { last_purged_log_id: mem.last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.put_meta(META_VOTE, encode(vote)?).await?;
        self.mem.lock().unwrap().vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not awaited for durability: after a crash, a lower committed index only means some
        // entries are re-applied from the log, which is always safe.
        let pending = (committed.map_or(0, |l| l.index()), encode(&committed)?);
        self.mem.lock().unwrap().committed = committed;
        *self.committed.lock().unwrap() = Some(pending);
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
        let mut encoded = Vec::new();
        {
            let mut mem = self.mem.lock().unwrap();
            for e in entries {
                encoded.push((e.index(), encode(&e)?));
                mem.entries.insert(e.index(), e);
            }
        }
        self.send(Op::Append(encoded, callback))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        self.mem.lock().unwrap().entries.split_off(&from);
        self.send(Op::TruncateFrom(from))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let upto = log_id.index();
        let encoded = encode(&log_id)?;
        {
            let mut mem = self.mem.lock().unwrap();
            mem.entries = mem.entries.split_off(&(upto + 1));
            mem.last_purged = Some(log_id);
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

    /// Reopen a log once the previous handle's writer thread has let go of the file.
    fn reopen(path: &Path) -> LogStore {
        for _ in 0..100 {
            if let Ok(log) = LogStore::open(path) {
                return log;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("the log file stayed locked");
    }

    #[tokio::test]
    async fn the_commit_index_reaches_disk_with_its_entries_once_the_log_is_idle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
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
        let mut log = LogStore::open(&dir.path().join("raft.redb")).unwrap();
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
        let append = |from: u64, to: u64| Op::Append((from..=to).map(|i| (i, Vec::new())).collect(), IOFlushed::noop());
        let purge = |upto: u64| Op::Purge { upto, log_id: Vec::new() };
        assert_eq!(last_index_after(0, &[]), 0);
        assert_eq!(last_index_after(0, &[append(1, 3)]), 3);
        assert_eq!(last_index_after(3, &[append(4, 4), Op::TruncateFrom(3)]), 2);
        assert_eq!(last_index_after(5, &[Op::TruncateFrom(9)]), 5, "truncating past the end changes nothing");
        assert_eq!(last_index_after(5, &[Op::TruncateFrom(3), append(3, 4)]), 4);
        assert_eq!(last_index_after(5, &[purge(5)]), 5, "a purged log keeps its purge point");
        assert_eq!(last_index_after(0, &[purge(7)]), 7, "a restored log starts at its snapshot");
    }

    #[tokio::test]
    async fn a_commit_index_ahead_of_the_log_waits_for_its_entries() {
        // Entries 1-5 written, the index names 8; with or without entries 6-8 following.
        async fn run(then_append: bool) -> Option<LogId> {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("raft.redb");
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
        let path = dir.path().join("raft.redb");
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
}
