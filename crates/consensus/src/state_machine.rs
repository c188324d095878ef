//! The replicated state machine: the pure `quorate_kv::Store` behind a lock, applied from the
//! Raft log, snapshotted into a redb file, and observed by watchers and the lease clock.
//!
//! The state itself lives in memory; what makes it durable is the Raft log plus the last
//! snapshot. On start openraft restores the snapshot and re-applies the committed log after it.

use std::collections::BTreeMap;
use std::io::{self, Cursor};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use quorate_kv::{Command, CommandResponse, Event, LogPosition, Store, StoreSnapshot};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::lease::LeaseCore;
use crate::types::{LogId, Request, Response, SnapshotMeta, StoredMembership, TypeConfig};

const SNAP: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

/// Snapshot images live in files in this directory beside `state.redb`; the SNAP table names the
/// current one (`IMAGE_KEY`) with the snapshot's meta, in one commit. Images were once a redb
/// value (`LEGACY_IMAGE_KEY`): writing 40 MB into redb held two more copies of it in memory,
/// about 60 MB at the peak of a build with 100k keys. Such a directory is read as it is, and its
/// next snapshot moves to a file.
pub(crate) const IMAGES_DIR: &str = "snapshots";
const IMAGE_KEY: &str = "image-file";
const LEGACY_IMAGE_KEY: &str = "data";

/// Written in the old image's place when the image is a file. A binary from before image files
/// reads this as its snapshot, cannot decode it and stops, instead of seeing no snapshot and
/// starting empty over a log purged up to it.
const DOWNGRADE_MARKER: &[u8] =
    b"quorate: this snapshot's image is a file in snapshots/; a binary older than that cannot read it";

/// The current image, opened: its file, or (written by an older version) its bytes.
enum StoredImage {
    File { file: ImageFile, path: std::path::PathBuf, open: std::fs::File },
    InTable(Vec<u8>),
}

/// Which file holds the current image, and what it must read as.
#[derive(Debug, Serialize, Deserialize)]
struct ImageFile {
    name: String,
    len: u64,
    crc32: u32,
}

/// redb's page cache for the snapshot file, which is written and read whole and rarely.
const SNAPSHOT_CACHE_BYTES: usize = 8 << 20;

/// Capacity of the broadcast that carries applied events to watchers. A watcher that falls
/// further behind than this is resynchronised from MVCC history instead of buffering more.
pub const WATCH_EVENTS_QUEUED_MAX: usize = 4096;

/// What a member announced about itself through the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedMember {
    pub name: String,
    pub client_urls: Vec<String>,
}

/// Changes applied at one revision, delivered to watchers.
#[derive(Clone, Debug)]
pub enum Applied {
    Events {
        revision: i64,
        events: Arc<Vec<Event>>,
    },
    /// The state was replaced by a snapshot: watchers must catch up from history.
    Reset {
        revision: i64,
    },
}

#[derive(Deserialize)]
struct SmSnapshot {
    store: StoreSnapshot,
    members: BTreeMap<u64, PublishedMember>,
}

/// Serialises like `SmSnapshot`, borrowing the live state instead of copying it.
#[derive(Serialize)]
struct SmSnapshotRef<'a, S: Serialize> {
    store: S,
    members: &'a BTreeMap<u64, PublishedMember>,
}

/// State added to snapshots after their first format: appended after the `SmSnapshot` image,
/// then its length (u64, little-endian) and `EXTRAS_MAGIC`. bincode 1.x decodes positionally
/// and allows trailing bytes, so an older member decodes the image and ignores what follows,
/// and a snapshot without the trailer (an older member's) decodes with empty extras. Fields are
/// only ever appended here, each with a default, behind a new magic when the shape changes.
#[derive(Default, Serialize, Deserialize)]
struct Extras {
    isolated: BTreeMap<u64, crate::isolation::Isolation>,
    /// Users, roles and whether auth is on (ADR 0010); since `EXTRAS_MAGIC` version 2.
    auth: quorate_kv::auth::AuthStore,
}

/// The extras of version 1 (before auth).
#[derive(Deserialize)]
struct ExtrasV1 {
    isolated: BTreeMap<u64, crate::isolation::Isolation>,
}

/// Ends a snapshot that carries `Extras`. 0xfe never occurs in UTF-8 and the bytes before it
/// are not a plausible length, so no older image (which ends in a string or a count) ends so.
/// The sixth byte is the extras' version.
const EXTRAS_MAGIC: [u8; 8] = [0xfe, b'q', b'x', b't', 0xfe, 0x02, 0x00, 0xfe];
const EXTRAS_MAGIC_V1: [u8; 8] = [0xfe, b'q', b'x', b't', 0xfe, 0x01, 0x00, 0xfe];

/// The whole snapshot: the image, then the extras trailer.
fn encode_snapshot<S: Serialize>(image: &SmSnapshotRef<'_, S>, extras: &Extras) -> io::Result<Vec<u8>> {
    // Sized first (a pass that only counts): a growing buffer would hold up to twice the
    // image while it doubles, on every member at once.
    let extra = bincode::serialize(extras).map_err(io_err)?;
    let image_bytes = bincode::serialized_size(image).map_err(io_err)? as usize;
    let mut data = Vec::with_capacity(image_bytes + extra.len() + 8 + EXTRAS_MAGIC.len());
    bincode::serialize_into(&mut data, image).map_err(io_err)?;
    data.extend_from_slice(&extra);
    data.extend_from_slice(&(extra.len() as u64).to_le_bytes());
    data.extend_from_slice(&EXTRAS_MAGIC);
    Ok(data)
}

/// Split a snapshot into its image and its extras (empty for an older member's snapshot).
fn decode_snapshot(data: &[u8]) -> io::Result<(SmSnapshot, Extras)> {
    let bad = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
    let trailer = match (data.strip_suffix(&EXTRAS_MAGIC), data.strip_suffix(&EXTRAS_MAGIC_V1)) {
        (Some(rest), _) => Some((rest, 2)),
        (None, Some(rest)) => Some((rest, 1)),
        (None, None) => None,
    };
    let (image, extras) = match trailer {
        Some((rest, version)) if rest.len() >= 8 => {
            let (rest, len) = rest.split_at(rest.len() - 8);
            let len = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
            if len > rest.len() {
                return Err(bad(format!("snapshot extras of {len} bytes in a snapshot of {} bytes", data.len())));
            }
            let (image, extra) = rest.split_at(rest.len() - len);
            let extras = match version {
                1 => bincode::deserialize::<ExtrasV1>(extra)
                    .map(|v1| Extras { isolated: v1.isolated, ..Extras::default() })
                    .map_err(|e| bad(e.to_string()))?,
                _ => bincode::deserialize::<Extras>(extra).map_err(|e| bad(e.to_string()))?,
            };
            (image, extras)
        }
        // A tail that starts like the magic but is not it: a damaged or newer trailer, never
        // to be read as "no extras" (the records in it would be lost without a word).
        _ if data.len() >= 8 && data[data.len() - 8..].starts_with(&EXTRAS_MAGIC[..4]) => {
            return Err(bad("snapshot extras trailer damaged or of a newer format".into()));
        }
        _ => (data, Extras::default()),
    };
    Ok((bincode::deserialize(image).map_err(|e| bad(e.to_string()))?, extras))
}

pub struct Shared {
    pub store: RwLock<Store>,
    pub members: RwLock<BTreeMap<u64, PublishedMember>>,
    /// Members an operator isolated (`crate::isolation`), by id.
    pub isolated: RwLock<BTreeMap<u64, crate::isolation::Isolation>>,
    /// Bumped whenever whether this member may serve clients can have changed (an isolation
    /// applied or lifted, a snapshot installed, a removal, a fence): open client streams
    /// re-check then.
    pub serving: tokio::sync::watch::Sender<u64>,
    applied: RwLock<(Option<LogId>, StoredMembership)>,
    /// Every lease's deadline as this member knows it, and the leader's lease decisions
    /// (`crate::lease`). Taken after `store` whenever both are held.
    pub leases: Mutex<LeaseCore>,
    pub events: broadcast::Sender<Applied>,
    /// Told of every applied change under the store's write lock (`Member::set_apply_observer`).
    observer: std::sync::OnceLock<Arc<dyn ApplyObserver>>,
}

/// Keeps a summary of the state (counts, say) up to date as it changes, so that a reader of the
/// summary never scans the store. Both calls run under the store's write lock, in apply order,
/// so the summary always matches the store it describes: they must be quick and never block.
pub trait ApplyObserver: Send + Sync + 'static {
    /// The changes one applied command made (all of one revision, in order).
    fn applied(&self, events: &[Event]);
    /// The whole state is `store` now: the observer was just installed, or a snapshot replaced
    /// the state.
    fn reset(&self, store: &Store);
}

#[derive(Clone)]
pub struct StateMachine {
    pub shared: Arc<Shared>,
    db: Arc<Database>,
    /// Where the snapshot images are (`IMAGES_DIR`).
    images: Arc<std::path::PathBuf>,
    /// Held by a save from its decision to the removal of the images it replaced, and by a load
    /// from reading the name to reading the file: redb's transactions order the table, not the
    /// files (a build and an install run at once; a load must not find its file removed).
    images_lock: Arc<Mutex<()>>,
    /// Commits of the state file (snapshots stored), as etcd's backend commit.
    pub commit_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Applied entries that fencing turned into no-ops, by kind (`crate::metrics`).
    pub fencing_refusals: crate::metrics::KindCounters,
    /// Snapshots built and installed are recorded here (`crate::flight`).
    pub flight: crate::flight::Recorder,
}

/// A save's decision, taken inside its write transaction.
enum Decided {
    /// Nothing to write: the answer is this.
    Keep(Saved),
    /// The new image is written to this file; commit the table that names it.
    Commit { image: String },
}

/// What becomes of a snapshot offered for storage, given the stored one.
#[derive(Debug, PartialEq, Eq)]
enum SnapshotWrite {
    /// Nothing is stored, or the stored snapshot is older: write the offered one.
    Replace,
    /// The stored snapshot is at the same log position, so it holds the same state.
    AlreadyStored,
    /// The stored snapshot is newer (installed while a build was encoding): keep it.
    KeepNewer,
}

/// Decide a snapshot write from the stored snapshot's last log id (`None`: nothing stored) and
/// the offered one's. Pure, so the build/install interleaving is table-tested.
fn snapshot_write(stored: Option<Option<LogId>>, offered: Option<LogId>) -> SnapshotWrite {
    match stored {
        None => SnapshotWrite::Replace,
        Some(stored) if offered > stored => SnapshotWrite::Replace,
        Some(stored) if offered == stored => SnapshotWrite::AlreadyStored,
        Some(_) => SnapshotWrite::KeepNewer,
    }
}

/// The outcome of `StateMachine::save_snapshot`.
#[derive(Debug, PartialEq, Eq)]
enum Saved {
    Stored,
    AlreadyStored,
    KeptNewer { meta: SnapshotMeta, data: Vec<u8> },
}

/// Which fence, if any, turned an applied command into a no-op: `token` for a write whose
/// lock (fence key) is no longer held at its revision, `stale_term` for a side effect (an
/// eviction or a lease expiry) decided by a leader whose term has passed.
fn fencing_refusal(result: &Result<CommandResponse, quorate_kv::KvError>) -> Option<&'static str> {
    match result {
        Err(quorate_kv::KvError::FenceRejected { .. }) => Some("token"),
        Ok(CommandResponse::StaleTerm) | Ok(CommandResponse::LeaseExpire { stale_term: true, .. }) => {
            Some("stale_term")
        }
        _ => None,
    }
}

impl Shared {
    /// Install the observer: it is reset from the state as it is now and then told of every
    /// change, with no change missed or counted twice: no write applies while the read lock is
    /// held, and applies tell the observer under the write lock. Only the first call installs;
    /// later ones return false.
    pub fn set_observer(&self, observer: Arc<dyn ApplyObserver>) -> bool {
        let store = self.store.read().unwrap();
        if self.observer.get().is_some() {
            return false;
        }
        observer.reset(&store);
        self.observer.set(observer).is_ok()
    }
}

/// Run `f` on a thread of its own, which exits when `f` returns. A snapshot build or install
/// allocates about four times the state (the copy, the encoding, redb's pages) and frees it at
/// once; mimalloc gives a thread's freed pages back to the system when that thread allocates
/// again or exits, so on a blocking-pool thread, idle afterwards, they stayed resident until
/// tokio retired it (or for good, if it kept being reused): with 100k keys, 118 MB more on every
/// member for seconds after each snapshot.
/// (A thread that cannot be started falls back to the blocking pool rather than fail the build
/// or install, which openraft would take for a storage failure. The thread is not joined at
/// shutdown: a save cut short is a redb transaction never committed.)
async fn on_own_thread<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = std::sync::Arc::new(std::sync::Mutex::new(Some((f, tx))));
    let run = {
        let job = job.clone();
        move || {
            if let Some((f, tx)) = job.lock().unwrap().take() {
                let _ = tx.send(f());
            }
        }
    };
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(run.clone()) {
        tracing::warn!(error = %e, thread = name, "could not start a thread: running on the blocking pool");
        tokio::task::spawn_blocking(run);
    }
    rx.await.map_err(|_| io_err(format!("the {name} thread panicked")))
}

/// The stored snapshot's position and membership, if a snapshot is stored.
fn stored_meta(t: &impl ReadableTable<&'static str, &'static [u8]>) -> io::Result<Option<SnapshotMeta>> {
    let Some(meta) = t.get("meta").map_err(io_err)? else { return Ok(None) };
    Ok(Some(bincode::deserialize(meta.value()).map_err(io_err)?))
}

/// Which file holds the stored image, if it is in a file.
fn image_file(t: &impl ReadableTable<&'static str, &'static [u8]>) -> io::Result<Option<ImageFile>> {
    let Some(file) = t.get(IMAGE_KEY).map_err(io_err)? else { return Ok(None) };
    Ok(Some(bincode::deserialize(file.value()).map_err(io_err)?))
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl StateMachine {
    /// `grace` is one election timeout: what a new leader gives every lease (`LeaseCore`).
    pub fn open(path: &Path, grace: Duration) -> io::Result<Self> {
        let db = Database::builder().set_cache_size(SNAPSHOT_CACHE_BYTES).create(path).map_err(io_err)?;
        let w = db.begin_write().map_err(io_err)?;
        w.open_table(SNAP).map_err(io_err)?;
        w.commit().map_err(io_err)?;
        let (events, _) = broadcast::channel(WATCH_EVENTS_QUEUED_MAX);
        let shared = Shared {
            store: RwLock::new(Store::new()),
            members: RwLock::new(BTreeMap::new()),
            isolated: RwLock::new(BTreeMap::new()),
            serving: tokio::sync::watch::Sender::new(0),
            applied: RwLock::new((None, StoredMembership::default())),
            leases: Mutex::new(LeaseCore::new(grace)),
            events,
            observer: std::sync::OnceLock::new(),
        };
        let images = path.with_file_name(IMAGES_DIR);
        if !images.is_dir() {
            std::fs::create_dir_all(&images)?;
            if let Some(parent) = images.parent() {
                crate::log_store::sync_dir(parent)?;
            }
        }
        let sm = StateMachine {
            shared: Arc::new(shared),
            db: Arc::new(db),
            images: Arc::new(images),
            images_lock: Default::default(),
            commit_seconds: crate::metrics::disk_histogram(),
            fencing_refusals: Default::default(),
            flight: Default::default(),
        };
        // Files a crash left between writing an image and committing the table that names it. Not
        // when the named file is missing (a directory copied while it changed): then what is
        // left is kept for whoever repairs it, and loading the snapshot reports the missing file.
        let current = sm.current_image()?;
        if current.as_ref().is_none_or(|name| sm.images.join(name).exists()) {
            sm.remove_other_images(current.as_deref());
        }
        Ok(sm)
    }

    /// The name of the current image file, if the current snapshot has one.
    fn current_image(&self) -> io::Result<Option<String>> {
        let r = self.db.begin_read().map_err(io_err)?;
        Ok(image_file(&r.open_table(SNAP).map_err(io_err)?)?.map(|f| f.name))
    }

    fn load_snapshot(&self) -> io::Result<Option<(SnapshotMeta, Vec<u8>)>> {
        // The lock only from reading the name to opening the file (an open file outlives its
        // removal): a save holds it while it writes and syncs, and openraft asks for the current
        // snapshot in turn with applying entries.
        let (meta, image) = {
            let _images = self.images_lock.lock().unwrap();
            let r = self.db.begin_read().map_err(io_err)?;
            let t = r.open_table(SNAP).map_err(io_err)?;
            let Some(meta) = stored_meta(&t)? else { return Ok(None) };
            (meta, self.open_image(&t)?)
        };
        Ok(image.map(|image| self.read_image(image)).transpose()?.map(|data| (meta, data)))
    }

    /// The current image: the file the table names, checked against its length and CRC, or an
    /// image stored in the table by an older version.
    fn stored_image(&self, t: &impl ReadableTable<&'static str, &'static [u8]>) -> io::Result<Option<Vec<u8>>> {
        self.open_image(t)?.map(|image| self.read_image(image)).transpose()
    }

    fn open_image(&self, t: &impl ReadableTable<&'static str, &'static [u8]>) -> io::Result<Option<StoredImage>> {
        if let Some(file) = image_file(t)? {
            let path = self.images.join(&file.name);
            let open = std::fs::File::open(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("read snapshot image {}: {e}", path.display())))?;
            return Ok(Some(StoredImage::File { file, path, open }));
        }
        Ok(t.get(LEGACY_IMAGE_KEY).map_err(io_err)?.map(|d| StoredImage::InTable(d.value().to_vec())))
    }

    fn read_image(&self, image: StoredImage) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let (file, path, mut open) = match image {
            StoredImage::InTable(data) => return Ok(data),
            StoredImage::File { file, path, open } => (file, path, open),
        };
        let mut data = Vec::with_capacity(open.metadata().map_or(0, |m| m.len()) as usize);
        open.read_to_end(&mut data)
            .map_err(|e| io::Error::new(e.kind(), format!("read snapshot image {}: {e}", path.display())))?;
        let crc32 = crc32fast::hash(&data);
        if data.len() as u64 != file.len || crc32 != file.crc32 {
            return Err(io_err(format!(
                "snapshot image {} is damaged: {} bytes with CRC {crc32:08x}, expected {} bytes with CRC {:08x}",
                path.display(),
                data.len(),
                file.len,
                file.crc32
            )));
        }
        Ok(data)
    }

    /// Write `data` as a new image file (synced, and its directory too), named uniquely so it
    /// never replaces the file of the snapshot that is current until the table says otherwise.
    fn write_image(&self, meta: &SnapshotMeta, data: &[u8]) -> io::Result<ImageFile> {
        use std::io::Write;
        let (index, term) = meta.last_log_id.map_or((0, 0), |l| (l.index, l.leader_id.term));
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let name = format!("snapshot-{term:016x}-{index:016x}-{nanos:x}.image");
        let tmp = self.images.join(format!("{name}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, self.images.join(&name))?;
        crate::log_store::sync_dir(&self.images)?;
        Ok(ImageFile { name, len: data.len() as u64, crc32: crc32fast::hash(data) })
    }

    /// Remove every file in the images directory but the current image's (older images, and
    /// files of writes that a crash or a refused save left behind). Best effort.
    fn remove_other_images(&self, keep: Option<&str>) {
        let Ok(entries) = std::fs::read_dir(&*self.images) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if keep.is_some_and(|k| name.to_str() == Some(k)) {
                continue;
            }
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(error = %e, file = %entry.path().display(), "could not remove an old snapshot image");
            }
        }
    }

    /// The membership the stored snapshot holds (a stopped member's, for `ctl recover`).
    /// Read from the meta alone: a recovery does not need the image intact.
    pub(crate) fn stored_membership(&self) -> io::Result<Option<StoredMembership>> {
        let r = self.db.begin_read().map_err(io_err)?;
        Ok(stored_meta(&r.open_table(SNAP).map_err(io_err)?)?.map(|meta| meta.last_membership))
    }

    /// Store `store` as this state machine's snapshot at `meta` (a restored data directory).
    pub(crate) fn save_image(&self, meta: &SnapshotMeta, store: &Store) -> io::Result<()> {
        let members = BTreeMap::new();
        let extras = Extras { auth: store.auth().clone(), ..Extras::default() };
        let data = encode_snapshot(&SmSnapshotRef { store: store.snapshot_view(), members: &members }, &extras)?;
        match self.save_snapshot(meta, &data)? {
            Saved::Stored | Saved::AlreadyStored => Ok(()),
            Saved::KeptNewer { .. } => Err(io_err("the state file already holds a newer snapshot")),
        }
    }

    /// Store a snapshot unless the stored one is at least as new. The stored meta is read in
    /// the same write transaction as the write, so a build and an install that run at once
    /// (openraft spawns builds beside its state machine worker) are decided one after the other.
    fn save_snapshot(&self, meta: &SnapshotMeta, data: &[u8]) -> io::Result<Saved> {
        let encoded_meta = bincode::serialize(meta).map_err(io_err)?;
        // A build and an install that race are decided, their image files written and the
        // replaced ones removed, one after the other.
        let _images = self.images_lock.lock().unwrap();
        let mut w = self.db.begin_write().map_err(io_err)?;
        w.set_two_phase_commit(true);
        let started = std::time::Instant::now();
        let decided = {
            let mut t = w.open_table(SNAP).map_err(io_err)?;
            let stored = stored_meta(&t)?;
            match snapshot_write(stored.as_ref().map(|m| m.last_log_id), meta.last_log_id) {
                SnapshotWrite::Replace => {
                    // The file first, synced; then the table names it, in one commit with the meta.
                    // A crash between the two leaves the old snapshot current and a stray file.
                    let file = self.write_image(meta, data)?;
                    let name = file.name.clone();
                    t.insert(IMAGE_KEY, bincode::serialize(&file).map_err(io_err)?.as_slice()).map_err(io_err)?;
                    t.insert("meta", encoded_meta.as_slice()).map_err(io_err)?;
                    t.insert(LEGACY_IMAGE_KEY, DOWNGRADE_MARKER).map_err(io_err)?;
                    Decided::Commit { image: name }
                }
                SnapshotWrite::AlreadyStored => Decided::Keep(Saved::AlreadyStored),
                SnapshotWrite::KeepNewer => {
                    let stored = stored.expect("only a stored snapshot can be newer");
                    let data = self.stored_image(&t)?;
                    let data = data.ok_or_else(|| io_err("stored snapshot has a meta but no image"))?;
                    Decided::Keep(Saved::KeptNewer { meta: stored, data })
                }
            }
        };
        match decided {
            Decided::Keep(kept) => {
                w.abort().map_err(io_err)?;
                Ok(kept)
            }
            Decided::Commit { image: current } => {
                w.commit().map_err(io_err)?;
                self.commit_seconds.observe(started.elapsed().as_secs_f64());
                self.remove_other_images(Some(&current));
                Ok(Saved::Stored)
            }
        }
    }

    /// A build's first half: copy the state under the store lock (so the image and the applied
    /// position agree; values are shared, not copied) and encode it outside the lock.
    fn copy_for_snapshot(&self) -> io::Result<(SnapshotMeta, Vec<u8>)> {
        let (store, members, extras, meta) = {
            let store = self.shared.store.read().unwrap();
            let members = self.shared.members.read().unwrap().clone();
            let extras = Extras { isolated: self.shared.isolated.read().unwrap().clone(), auth: store.auth().clone() };
            let (last, membership) = self.shared.applied.read().unwrap().clone();
            (store.clone(), members, extras, SnapshotMeta { last_log_id: last, last_membership: membership })
        };
        let data = encode_snapshot(&SmSnapshotRef { store: store.snapshot_view(), members: &members }, &extras)?;
        Ok((meta, data))
    }

    /// A build's second half: store the image, and answer with the snapshot that is stored now.
    /// If a newer snapshot was installed since the copy, that one stays and is the answer:
    /// overwriting it would leave a snapshot older than the purged log, and the member could
    /// not restart. openraft ignores a built snapshot that is not newer than its own.
    fn store_built(&self, meta: SnapshotMeta, data: Vec<u8>) -> io::Result<(SnapshotMeta, Vec<u8>)> {
        match self.save_snapshot(&meta, &data)? {
            Saved::Stored | Saved::AlreadyStored => Ok((meta, data)),
            Saved::KeptNewer { meta: stored, data: stored_data } => {
                tracing::info!(
                    built_last_log_index = meta.last_log_id.map(|l| l.index),
                    stored_last_log_index = stored.last_log_id.map(|l| l.index),
                    "snapshot build skipped: a newer snapshot was installed meanwhile"
                );
                Ok((stored, stored_data))
            }
        }
    }

    fn apply_one(
        &self,
        store: &mut Store,
        log_id: &LogId,
        payload: &EntryPayload<Request, u64, crate::MemberNode>,
    ) -> Response {
        let pos = LogPosition { index: log_id.index, term: log_id.leader_id.term };
        match payload {
            EntryPayload::Blank => Response::empty(store.revision()),
            EntryPayload::Membership(m) => {
                self.shared.applied.write().unwrap().1 = StoredMembership::new(Some(*log_id), m.clone());
                Response::empty(store.revision())
            }
            EntryPayload::Normal(Request::PublishMember { id, name, client_urls }) => {
                let m = PublishedMember { name: name.clone(), client_urls: client_urls.clone() };
                self.shared.members.write().unwrap().insert(*id, m);
                Response::empty(store.revision())
            }
            EntryPayload::Normal(Request::Isolate { id, isolation }) => {
                // The leader checks the quorum before proposing; this is the last word, alike on
                // every member: an isolation that would leave no voter unisolated is void.
                let voters: Vec<u64> = self.shared.applied.read().unwrap().1.membership().voter_ids().collect();
                let mut isolated = self.shared.isolated.write().unwrap();
                if voters.iter().any(|v| v != id && !isolated.contains_key(v)) {
                    isolated.insert(*id, isolation.clone());
                    self.shared.serving.send_modify(|n| *n += 1);
                } else {
                    tracing::warn!(member = %format!("{id:x}"), "isolation void: it would leave no voter in service");
                }
                Response::empty(store.revision())
            }
            EntryPayload::Normal(Request::Unisolate { id }) => {
                self.shared.isolated.write().unwrap().remove(id);
                self.shared.serving.send_modify(|n| *n += 1);
                Response::empty(store.revision())
            }
            EntryPayload::Normal(Request::Kv(cmd)) => {
                // Drill only (`crate::failpoint`); off, it costs one atomic load.
                let diverged = crate::failpoint::diverge_put(cmd);
                let cmd = diverged.as_ref().unwrap_or(cmd);
                let applied = store.apply(cmd, pos);
                self.track_leases(store, cmd, &applied.result);
                if let Some(kind) = fencing_refusal(&applied.result) {
                    self.fencing_refusals.get_or_create(&vec![("kind", kind)]).inc();
                }
                if !applied.events.is_empty() {
                    if let Some(o) = self.shared.observer.get() {
                        o.applied(&applied.events);
                    }
                    // No receiver is fine: nobody is watching.
                    let _ = self
                        .shared
                        .events
                        .send(Applied::Events { revision: applied.revision, events: Arc::new(applied.events) });
                }
                Response { revision: applied.revision, result: Some(applied.result) }
            }
        }
    }

    /// Tell the lease core what this entry decided about leases, timed by this member's clock.
    fn track_leases(&self, store: &Store, cmd: &Command, result: &Result<CommandResponse, quorate_kv::KvError>) {
        let now = Instant::now();
        let mut core = self.shared.leases.lock().unwrap();
        let cmd = cmd.unwrapped();
        let applied = |core: &mut LeaseCore, id: i64, remaining_ms: Option<i64>| {
            if let Some(l) = store.lease(id) {
                core.applied_deadline(now, id, l.ttl_s, remaining_ms.unwrap_or(l.ttl_s.saturating_mul(1000)), l.set_at);
            }
        };
        match (cmd, result) {
            (_, Ok(CommandResponse::LeaseGrant { id, .. })) => applied(&mut core, *id, None),
            (_, Ok(CommandResponse::LeaseRenew { renewed })) if crate::lease::early_expiry_planted() => {
                for id in renewed {
                    core.renewed_keeping_deadline(*id, store.lease(*id).map_or(0, |l| l.set_at));
                }
            }
            (_, Ok(CommandResponse::LeaseRenew { renewed })) => {
                for id in renewed {
                    applied(&mut core, *id, None);
                }
            }
            (Command::LeaseCheckpoint(cps), _) => {
                for cp in cps {
                    applied(&mut core, cp.id, Some(cp.remaining_ms));
                }
            }
            (Command::LeaseRevoke { id }, Ok(_)) => core.removed(*id),
            (_, Ok(CommandResponse::LeaseExpire { expired, .. })) => {
                for id in expired {
                    core.removed(*id);
                }
            }
            _ => {}
        }
    }

    /// Rebuild the lease marks from the store, counting every remaining TTL from now.
    fn reset_lease_marks(&self, store: &Store) {
        let leases = store.leases().map(|l| (l.id, l.ttl_s, l.remaining_at_checkpoint_ms(), l.set_at));
        self.shared.leases.lock().unwrap().reset(Instant::now(), leases);
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(
        &mut self,
    ) -> Result<openraft::alias::SnapshotOf<TypeConfig, Self::SnapshotData>, io::Error> {
        let sm = self.clone();
        // All of it runs off the runtime's threads (with one worker per member, a copy of a large
        // state there would hold up heartbeats), on a thread of its own (`on_own_thread`). The
        // state is copied under the store lock, so the image and the applied position agree;
        // only the copy holds the lock (values are shared, not copied). Encoding under the lock stalled every apply, and so every write,
        // for as long as encoding took (the p99 of a put load was twice what it is without).
        let (meta, data) = on_own_thread("snapshot-build", move || {
            let (meta, data) = sm.copy_for_snapshot()?;
            sm.store_built(meta, data)
        })
        .await??;
        let (index, bytes) = (meta.last_log_id.map_or(0, |l| l.index), data.len() as u64);
        self.flight.record(crate::flight::Event::SnapshotBuilt { index, bytes });
        Ok(openraft::alias::SnapshotOf::<TypeConfig, Self::SnapshotData> { meta, snapshot: Cursor::new(data) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok(self.shared.applied.read().unwrap().clone())
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let resp = {
                let mut store = self.shared.store.write().unwrap();
                let resp = self.apply_one(&mut store, &entry.log_id, &entry.payload);
                self.shared.applied.write().unwrap().0 = Some(entry.log_id);
                resp
            };
            if let Some(r) = responder {
                r.send(resp);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Self::SnapshotData) -> Result<(), io::Error> {
        let data = snapshot.into_inner();
        let bytes = data.len() as u64;
        let (snap, extras) = decode_snapshot(&data)?;
        let sm = self.clone();
        let meta2 = meta.clone();
        let saved = on_own_thread("snapshot-save", move || sm.save_snapshot(&meta2, &data)).await??;
        if let Saved::KeptNewer { meta: stored, .. } = saved {
            // openraft installs only past its committed index, which no stored snapshot passes:
            // a newer one on disk means the state file and the log disagree.
            return Err(io_err(format!(
                "refusing to install snapshot at {:?}: the stored snapshot at {:?} is newer",
                meta.last_log_id, stored.last_log_id
            )));
        }
        let revision = {
            let mut store = self.shared.store.write().unwrap();
            *store = Store::from_snapshot(snap.store);
            store.set_auth(extras.auth);
            *self.shared.members.write().unwrap() = snap.members;
            *self.shared.isolated.write().unwrap() = extras.isolated;
            self.shared.serving.send_modify(|n| *n += 1);
            *self.shared.applied.write().unwrap() = (meta.last_log_id, meta.last_membership.clone());
            self.reset_lease_marks(&store);
            if let Some(o) = self.shared.observer.get() {
                o.reset(&store);
            }
            store.revision()
        };
        tracing::info!(revision, last_log_index = meta.last_log_id.map(|l| l.index).unwrap_or(0), "installed snapshot");
        let index = meta.last_log_id.map_or(0, |l| l.index);
        self.flight.record(crate::flight::Event::SnapshotInstalled { index, bytes });
        let _ = self.shared.events.send(Applied::Reset { revision });
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<openraft::alias::SnapshotOf<TypeConfig, Self::SnapshotData>>, io::Error> {
        let sm = self.clone();
        let loaded = tokio::task::spawn_blocking(move || sm.load_snapshot()).await.map_err(io_err)??;
        Ok(loaded.map(|(meta, data)| openraft::alias::SnapshotOf::<TypeConfig, Self::SnapshotData> {
            meta,
            snapshot: Cursor::new(data),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::vote::RaftLeaderIdExt;
    use quorate_kv::PutRequest;

    fn log_id(term: u64, index: u64) -> LogId {
        openraft::LogId::new(openraft::alias::LeaderIdOf::<TypeConfig>::new_committed(term, 1), index)
    }

    fn meta_at(last: LogId) -> SnapshotMeta {
        SnapshotMeta { last_log_id: Some(last), last_membership: StoredMembership::default() }
    }

    /// A snapshot image holding `puts` keys, at revision `puts + 1`.
    fn image(puts: u64) -> Vec<u8> {
        let mut store = Store::new();
        for i in 1..=puts {
            let put = PutRequest { key: format!("k{i}").into_bytes(), value: b"v".to_vec(), ..Default::default() };
            store.apply(&Command::Put(put), LogPosition { index: i, term: 1 });
        }
        let members = BTreeMap::new();
        let image = SmSnapshotRef { store: store.snapshot_view(), members: &members };
        encode_snapshot(&image, &Extras::default()).unwrap()
    }

    /// Snapshots written before the extras trailer still install, and an older member (which
    /// decodes `SmSnapshot` alone) still reads the image of one that has the trailer.
    #[test]
    fn snapshots_stay_readable_across_the_extras_trailer() {
        let mut store = Store::new();
        store.apply(
            &Command::Put(PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), ..Default::default() }),
            LogPosition { index: 1, term: 1 },
        );
        let members =
            BTreeMap::from([(7, PublishedMember { name: "m".into(), client_urls: vec!["http://x:1".into()] })]);
        let image = SmSnapshotRef { store: store.snapshot_view(), members: &members };
        let isolation = crate::isolation::Isolation { reason: "disk".into(), since_unix_ms: 5, by: "op".into() };
        let mut auth = quorate_kv::auth::AuthStore::default();
        auth.apply(&quorate_kv::auth::AuthCommand::RoleAdd { name: "app".into() }).unwrap();
        let extras = Extras { isolated: BTreeMap::from([(7, isolation.clone())]), auth: auth.clone() };

        let old = bincode::serialize(&image).unwrap();
        let (snap, got) = decode_snapshot(&old).unwrap();
        assert_eq!(snap.members, members);
        assert!(got.isolated.is_empty());

        let new = encode_snapshot(&image, &extras).unwrap();
        let (snap, got) = decode_snapshot(&new).unwrap();
        assert_eq!(snap.members, members);
        assert_eq!(Store::from_snapshot(snap.store).revision(), store.revision());
        assert_eq!(got.isolated[&7], isolation);
        assert_eq!(got.auth, auth, "the auth store rides in the trailer");
        // A trailer of version 1 (before auth) still reads, with no users or roles.
        let v1 = {
            #[derive(Serialize)]
            struct V1<'a> {
                isolated: &'a BTreeMap<u64, crate::isolation::Isolation>,
            }
            let mut data = bincode::serialize(&image).unwrap();
            let extra = bincode::serialize(&V1 { isolated: &extras.isolated }).unwrap();
            data.extend_from_slice(&extra);
            data.extend_from_slice(&(extra.len() as u64).to_le_bytes());
            data.extend_from_slice(&EXTRAS_MAGIC_V1);
            data
        };
        let (_, got) = decode_snapshot(&v1).unwrap();
        assert_eq!(got.isolated[&7], isolation);
        assert_eq!(got.auth, quorate_kv::auth::AuthStore::default());
        let older_reader: SmSnapshot = bincode::deserialize(&new).unwrap();
        assert_eq!(older_reader.members, members);

        let mut torn = new.clone();
        let at = torn.len() - 12;
        torn[at] = 0xff;
        assert!(decode_snapshot(&torn).is_err(), "a damaged extras length is an error, never a silent default");
        let mut newer = new.clone();
        let last = newer.len() - 1;
        newer[last] = 0xfd;
        assert!(decode_snapshot(&newer).is_err(), "a trailer of another version is an error too");
    }

    #[test]
    fn a_snapshot_replaces_only_an_older_one() {
        let (l5, l9, t2l5) = (Some(log_id(1, 5)), Some(log_id(1, 9)), Some(log_id(2, 5)));
        let table = [
            (None, l5, SnapshotWrite::Replace),
            (Some(None), l5, SnapshotWrite::Replace),
            (Some(l5), l9, SnapshotWrite::Replace),
            (Some(l5), t2l5, SnapshotWrite::Replace),
            (Some(l5), l5, SnapshotWrite::AlreadyStored),
            (Some(l9), l5, SnapshotWrite::KeepNewer),
            (Some(t2l5), l9, SnapshotWrite::KeepNewer),
            (Some(l5), None, SnapshotWrite::KeepNewer),
        ];
        for (stored, offered, want) in table {
            assert_eq!(snapshot_write(stored, offered), want, "stored {stored:?}, offered {offered:?}");
        }
    }

    /// openraft spawns a build beside its state machine worker, so an install from the leader
    /// can land between the build's copy of the state and the build's write.
    #[tokio::test]
    async fn a_build_never_overwrites_a_snapshot_installed_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let (old, new) = (log_id(1, 10), log_id(1, 20));
        {
            let mut sm = StateMachine::open(&path, Duration::ZERO).unwrap();
            sm.shared.applied.write().unwrap().0 = Some(old);
            let (built_meta, built_data) = sm.copy_for_snapshot().unwrap();
            assert_eq!(built_meta.last_log_id, Some(old));

            sm.install_snapshot(&meta_at(new), Cursor::new(image(3))).await.unwrap();
            let (answered, answered_data) = sm.store_built(built_meta, built_data).unwrap();
            assert_eq!(answered.last_log_id, Some(new), "the build answers with the stored, newer snapshot");
            assert_eq!(answered_data, image(3));

            let current = sm.get_current_snapshot().await.unwrap().expect("a snapshot is stored");
            assert_eq!(current.meta.last_log_id, Some(new));
            assert_eq!(sm.shared.applied.read().unwrap().0, Some(new));
        }
        let reopened = StateMachine::open(&path, Duration::ZERO).unwrap();
        let (meta, data) = reopened.load_snapshot().unwrap().expect("the snapshot survives a restart");
        assert_eq!(meta.last_log_id, Some(new));
        assert_eq!(data, image(3));
    }

    fn images_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join(IMAGES_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// A directory whose snapshot image is a redb value (written before images moved to files)
    /// loads as it is; its next snapshot goes to a file and the value is dropped.
    #[test]
    fn an_image_stored_in_the_table_by_an_older_version_still_loads_and_moves_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let sm = StateMachine::open(&path, Duration::ZERO).unwrap();
            let w = sm.db.begin_write().unwrap();
            {
                let mut t = w.open_table(SNAP).unwrap();
                t.insert("meta", bincode::serialize(&meta_at(log_id(1, 5))).unwrap().as_slice()).unwrap();
                t.insert(LEGACY_IMAGE_KEY, image(2).as_slice()).unwrap();
            }
            w.commit().unwrap();
        }
        let sm = StateMachine::open(&path, Duration::ZERO).unwrap();
        let (meta, data) = sm.load_snapshot().unwrap().expect("the old snapshot loads");
        assert_eq!((meta.last_log_id, data), (Some(log_id(1, 5)), image(2)));
        assert!(images_in(dir.path()).is_empty());

        assert_eq!(sm.save_snapshot(&meta_at(log_id(1, 9)), &image(4)).unwrap(), Saved::Stored);
        assert_eq!(images_in(dir.path()).len(), 1);
        let r = sm.db.begin_read().unwrap();
        let legacy = r.open_table(SNAP).unwrap().get(LEGACY_IMAGE_KEY).unwrap().unwrap().value().to_vec();
        assert_eq!(legacy, DOWNGRADE_MARKER, "the old image gives way to the marker");
        drop(r);
        // What an older binary would do with it: decode it as the image, and fail.
        assert!(decode_snapshot(&legacy).is_err());
        assert!(bincode::deserialize::<SmSnapshot>(&legacy).is_err());
        drop(sm);
        let (meta, data) = StateMachine::open(&path, Duration::ZERO).unwrap().load_snapshot().unwrap().unwrap();
        assert_eq!((meta.last_log_id, data), (Some(log_id(1, 9)), image(4)));
    }

    /// One image file stays: the current one. Older images go when a newer snapshot is stored,
    /// and files a crash left (written, never named by a commit) go when the state is opened.
    #[test]
    fn only_the_current_image_file_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let sm = StateMachine::open(&path, Duration::ZERO).unwrap();
        for (i, index) in [5, 9, 12].into_iter().enumerate() {
            assert_eq!(sm.save_snapshot(&meta_at(log_id(1, index)), &image(i as u64 + 1)).unwrap(), Saved::Stored);
            assert_eq!(images_in(dir.path()).len(), 1, "after the snapshot at {index}");
        }
        let current = images_in(dir.path());
        assert_eq!(
            sm.save_snapshot(&meta_at(log_id(1, 7)), &image(9)).unwrap(),
            Saved::KeptNewer { meta: meta_at(log_id(1, 12)), data: image(3) }
        );
        assert_eq!(images_in(dir.path()), current, "a refused save writes nothing");
        drop(sm);
        std::fs::write(dir.path().join(IMAGES_DIR).join("snapshot-crashed.image.tmp"), b"half").unwrap();
        std::fs::write(dir.path().join(IMAGES_DIR).join("snapshot-uncommitted.image"), image(1)).unwrap();
        let sm = StateMachine::open(&path, Duration::ZERO).unwrap();
        assert_eq!(images_in(dir.path()), current);
        assert_eq!(sm.load_snapshot().unwrap().unwrap().1, image(3));
        drop(sm);
        // The named file missing (a directory copied while it changed): nothing is removed, and
        // the load says which file is missing.
        std::fs::rename(
            dir.path().join(IMAGES_DIR).join(&current[0]),
            dir.path().join(IMAGES_DIR).join("copied.image"),
        )
        .unwrap();
        let sm = StateMachine::open(&path, Duration::ZERO).unwrap();
        assert_eq!(images_in(dir.path()), ["copied.image"]);
        assert!(sm.load_snapshot().unwrap_err().to_string().contains(&current[0]));
    }

    /// Saves racing each other (openraft's build beside an install) and loads racing them (a
    /// snapshot sent to a follower) never fail: no save removes a file another save is writing or
    /// has just committed, and no load finds the file it was told of gone.
    #[test]
    fn racing_saves_and_loads_never_lose_the_current_image() {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::open(&dir.path().join("state.redb"), Duration::ZERO).unwrap();
        let img = image(1);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let savers: Vec<_> = (0..3u64)
            .map(|t| {
                let (sm, img) = (sm.clone(), img.clone());
                std::thread::spawn(move || {
                    for i in 1..=150u64 {
                        sm.save_snapshot(&meta_at(log_id(1, i * 3 + t)), &img).expect("a save");
                    }
                })
            })
            .collect();
        let loader = {
            let (sm, done, img) = (sm.clone(), done.clone(), img.clone());
            std::thread::spawn(move || {
                let mut loads = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some((_, data)) = sm.load_snapshot().expect("a load") {
                        assert_eq!(data, img);
                        loads += 1;
                    }
                }
                loads
            })
        };
        for s in savers {
            s.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(loader.join().unwrap() > 0);
        assert_eq!(sm.load_snapshot().unwrap().unwrap().0.last_log_id, Some(log_id(1, 452)));
        assert_eq!(images_in(dir.path()).len(), 1);
    }

    /// A damaged image (a flipped byte, a truncated file, a missing file) is an error that names
    /// the file, never an image decoded from whatever is there.
    #[test]
    fn a_damaged_image_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let sm = StateMachine::open(&path, Duration::ZERO).unwrap();
        sm.save_snapshot(&meta_at(log_id(1, 5)), &image(3)).unwrap();
        drop(sm);
        let file = dir.path().join(IMAGES_DIR).join(&images_in(dir.path())[0]);
        let good = std::fs::read(&file).unwrap();
        let mut flipped = good.clone();
        flipped[good.len() / 2] ^= 0x01;
        for (what, bytes) in
            [("flipped", Some(flipped)), ("truncated", Some(good[..good.len() - 1].to_vec())), ("missing", None)]
        {
            match bytes {
                Some(b) => std::fs::write(&file, b).unwrap(),
                None => std::fs::remove_file(&file).unwrap(),
            }
            let sm = StateMachine::open(&path, Duration::ZERO).unwrap();
            let e = sm.load_snapshot().expect_err(what).to_string();
            assert!(e.contains(&file.display().to_string()), "{what}: {e}");
        }
    }

    #[tokio::test]
    async fn a_build_after_an_install_is_stored_and_an_older_install_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(&dir.path().join("state.redb"), Duration::ZERO).unwrap();
        sm.install_snapshot(&meta_at(log_id(1, 20)), Cursor::new(image(2))).await.unwrap();
        // Applied past the installed snapshot: the next build is newer and replaces it.
        sm.shared.applied.write().unwrap().0 = Some(log_id(1, 30));
        let built = sm.build_snapshot().await.unwrap();
        assert_eq!(built.meta.last_log_id, Some(log_id(1, 30)));
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id, Some(log_id(1, 30)));

        // A build at the stored position changes nothing.
        let again = sm.build_snapshot().await.unwrap();
        assert_eq!(again.meta.last_log_id, Some(log_id(1, 30)));

        let refused = sm.install_snapshot(&meta_at(log_id(1, 25)), Cursor::new(image(1))).await;
        assert!(refused.is_err(), "an install older than the stored snapshot is a storage inconsistency");
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id, Some(log_id(1, 30)));
    }
}
