//! Long reads in pages (`quorate_kv::RangeScan`, `EventScan`, `HashScan`): the store's lock is
//! held for one page at a time and the task yields between pages, so apply, heartbeats and
//! other clients' requests on the same runtime threads never wait behind a read of the whole
//! keyspace. A small read finishes in its first page, under one lock, as before.

use quorate_consensus::Member;
use quorate_kv::{
    Event, EventScan, HashScan, KvError, RangeRequest, RangeResponse, RangeScan, SnapshotScan, READ_PAGE_KEYS,
};

/// Times a read of the latest revision starts again when a compaction passes it mid-read
/// (a read at an explicit revision gets etcd's `compacted` instead).
const RESTARTS_MAX: usize = 3;

/// Results larger than this are finished (sorted, copied, converted by `out`) in the slow lane
/// (`lane`): copying 100k values would otherwise hold a runtime thread, and every Raft task
/// queued behind it, for as long, and compete with them for the CPUs.
const FINISH_INLINE_KVS_MAX: usize = 4 * READ_PAGE_KEYS;

/// A Range, given to `out` with the store's revision when it began (for the response header).
pub async fn range<T: Send + 'static>(
    member: &Member,
    req: &RangeRequest,
    out: impl FnOnce(RangeResponse, i64) -> T + Send + 'static,
) -> Result<T, KvError> {
    let mut restarts = 0;
    'again: loop {
        let (mut scan, header_rev) = member.read(|s| {
            let mut scan = RangeScan::new(s, req)?;
            s.range_step(req, &mut scan, READ_PAGE_KEYS)?;
            Ok::<_, KvError>((scan, s.revision()))
        })?;
        while !scan.is_done() {
            tokio::task::yield_now().await;
            match member.read(|s| s.range_step(req, &mut scan, READ_PAGE_KEYS)) {
                Ok(()) => {}
                Err(KvError::Compacted { .. }) if req.revision <= 0 && restarts < RESTARTS_MAX => {
                    restarts += 1;
                    continue 'again;
                }
                Err(e) => return Err(e),
            }
        }
        if scan.kvs_found() <= FINISH_INLINE_KVS_MAX {
            return Ok(out(scan.finish(req), header_rev));
        }
        let req = req.clone();
        return Ok(crate::lane::off_runtime(move || out(scan.finish(&req), header_rev)).await);
    }
}

/// A watch's replay: every event in `[key, range_end)` from `start_rev`, and the revision it
/// covers up to (live events follow from the next). `Compacted` if that history is gone, or
/// was compacted while the replay read it.
pub async fn events(
    member: &Member,
    key: &[u8],
    range_end: &[u8],
    start_rev: i64,
) -> Result<(Vec<Event>, i64), KvError> {
    let mut scan = member.read(|s| {
        let mut scan = EventScan::new(s, key, range_end, start_rev)?;
        s.events_step(&mut scan, READ_PAGE_KEYS)?;
        Ok::<_, KvError>(scan)
    })?;
    while !scan.is_done() {
        tokio::task::yield_now().await;
        member.read(|s| s.events_step(&mut scan, READ_PAGE_KEYS))?;
    }
    let upto = scan.upto();
    if !scan.is_large() {
        return Ok((scan.finish(), upto));
    }
    Ok((crate::lane::off_runtime(move || scan.finish()).await, upto))
}

/// HashKV at `rev` (0: current): the hash, the revision hashed and the compaction revision it
/// was taken at. Starts again if a compaction runs while it reads.
pub async fn hash_kv(member: &Member, rev: i64) -> Result<(u32, i64, i64), KvError> {
    let mut restarts = 0;
    'again: loop {
        let mut scan = member.read(|s| {
            let mut scan = HashScan::new(s, rev)?;
            s.hash_step(&mut scan, READ_PAGE_KEYS)?;
            Ok::<_, KvError>(scan)
        })?;
        loop {
            // Each page is hashed in the slow lane before the next is read: a page of versions
            // in memory at a time, and a caller that gives up stops the work between pages.
            scan = crate::lane::off_runtime(move || {
                scan.hash_pending();
                scan
            })
            .await;
            if scan.is_done() {
                break;
            }
            match member.read(|s| s.hash_step(&mut scan, READ_PAGE_KEYS)) {
                Ok(()) => {}
                Err(KvError::Compacted { .. }) if restarts < RESTARTS_MAX => {
                    restarts += 1;
                    continue 'again;
                }
                Err(e) => return Err(e),
            }
        }
        let (revision, compact_revision) = (scan.revision(), scan.compact_revision());
        return Ok((scan.finish(), revision, compact_revision));
    }
}

/// `Maintenance.Snapshot`'s image: a snapshot file (`backup` format) of the store at one
/// revision, and that revision. Copied page by page (versions are shared, not copied), then
/// encoded on a blocking thread; starts again if a compaction runs while it copies.
pub async fn snapshot_file(member: &Member) -> Result<(Vec<u8>, i64), KvError> {
    let mut restarts = 0;
    'again: loop {
        let mut scan = member.read(|s| {
            let mut scan = SnapshotScan::new(s);
            s.snapshot_step(&mut scan, READ_PAGE_KEYS).map(|()| scan)
        })?;
        while !scan.is_done() {
            tokio::task::yield_now().await;
            match member.read(|s| s.snapshot_step(&mut scan, READ_PAGE_KEYS)) {
                Ok(()) => {}
                Err(KvError::Compacted { .. }) if restarts < RESTARTS_MAX => {
                    restarts += 1;
                    continue 'again;
                }
                Err(e) => return Err(e),
            }
        }
        let revision = scan.revision();
        let file = crate::lane::off_runtime(move || quorate_consensus::backup::encode(&scan.finish())).await;
        return Ok((file, revision));
    }
}
