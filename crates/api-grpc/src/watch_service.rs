//! etcd's Watch service: many watchers per bidirectional stream, replay from MVCC history,
//! then live events from the apply loop.
//!
//! Each watcher remembers the next revision it needs. Live batches at or after it are sent and
//! advance it; anything that could leave a gap (this stream lagging behind the apply loop, or a
//! snapshot replacing the state) is repaired by replaying history from that revision. So events
//! arrive in order, one revision per response, without gaps or duplicates, and a slow client
//! costs at most `WATCH_STREAM_QUEUED_MAX` responses of memory plus the shared broadcast.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use quorate_consensus::Applied;
use quorate_kv::{Event, EventKind, KeyRange, KvError};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::event_out;
use crate::pb::etcdserverpb as pb;
use crate::Ctx;

/// Revisions one response of a replay carries at most (etcd's `watchBatchMaxRevs`), and the key
/// and value bytes past which a batch is sent early; a revision is never split.
const REPLAY_BATCH_REVS_MAX: usize = 1000;
const REPLAY_BATCH_BYTES_MAX: usize = 1 << 20;

/// Responses queued for one stream before the stream stops reading live events.
pub const WATCH_STREAM_QUEUED_MAX: usize = 256;
/// etcd's default interval for `progress_notify` watchers.
pub const PROGRESS_NOTIFY_INTERVAL: Duration = Duration::from_secs(600);

pub struct WatchService {
    pub ctx: Arc<Ctx>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::watch_server::Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<Streaming<pb::WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(WATCH_STREAM_QUEUED_MAX);
        let session = Session { ctx: self.ctx.clone(), tx, watchers: BTreeMap::new(), next_id: 0 };
        tokio::spawn(session.run(req.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Watcher {
    key: Vec<u8>,
    range_end: Vec<u8>,
    next_rev: i64,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    progress_notify: bool,
}

impl Watcher {
    fn wants(&self, e: &Event) -> bool {
        KeyRange::new(&self.key, &self.range_end).contains(&e.kv.key)
            && !(self.no_put && e.kind == EventKind::Put)
            && !(self.no_delete && e.kind == EventKind::Delete)
    }
}

struct Session {
    ctx: Arc<Ctx>,
    tx: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    watchers: BTreeMap<i64, Watcher>,
    next_id: i64,
}

/// The stream's client has gone away.
struct Gone;

impl Session {
    async fn run(mut self, mut input: Streaming<pb::WatchRequest>) {
        let mut live = self.ctx.member.subscribe();
        let mut progress = tokio::time::interval(PROGRESS_NOTIFY_INTERVAL);
        progress.tick().await;
        loop {
            let step = tokio::select! {
                req = input.next() => match req {
                    Some(Ok(req)) => self.on_request(req).await,
                    _ => return,
                },
                applied = live.recv() => match applied {
                    Ok(Applied::Events { revision, events }) => self.on_events(revision, &events).await,
                    Ok(Applied::Reset { .. }) | Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up_all().await,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = progress.tick() => self.notify_progress().await,
            };
            if step.is_err() {
                return;
            }
        }
    }

    async fn send(&self, resp: pb::WatchResponse) -> Result<(), Gone> {
        self.tx.send(Ok(resp)).await.map_err(|_| Gone)
    }

    fn response(&self, watch_id: i64, revision: i64) -> pb::WatchResponse {
        pb::WatchResponse { header: Some(self.ctx.header_at(revision)), watch_id, ..Default::default() }
    }

    async fn on_request(&mut self, req: pb::WatchRequest) -> Result<(), Gone> {
        use pb::watch_request::RequestUnion as U;
        match req.request_union {
            Some(U::CreateRequest(c)) => self.create(c).await,
            Some(U::CancelRequest(c)) => {
                if self.watchers.remove(&c.watch_id).is_some() {
                    let rev = self.ctx.member.read(|s| s.revision());
                    self.send(pb::WatchResponse { canceled: true, ..self.response(c.watch_id, rev) }).await?;
                }
                Ok(())
            }
            Some(U::ProgressRequest(_)) => {
                // Progress is only meaningful once every watcher has caught up to the store.
                let rev = self.ctx.member.read(|s| s.revision());
                self.send(self.response(-1, rev)).await
            }
            None => Ok(()),
        }
    }

    async fn create(&mut self, c: pb::WatchCreateRequest) -> Result<(), Gone> {
        let current = self.ctx.member.read(|s| s.revision());
        let id = if c.watch_id != 0 {
            if self.watchers.contains_key(&c.watch_id) {
                let resp = pb::WatchResponse {
                    created: true,
                    canceled: true,
                    cancel_reason: "mvcc: duplicate watch ID provided".into(),
                    ..self.response(c.watch_id, current)
                };
                return self.send(resp).await;
            }
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id
        };
        let filters = c.filters.clone();
        let mut w = Watcher {
            key: c.key,
            range_end: c.range_end,
            next_rev: if c.start_revision > 0 { c.start_revision } else { current + 1 },
            no_put: filters.contains(&(pb::watch_create_request::FilterType::Noput as i32)),
            no_delete: filters.contains(&(pb::watch_create_request::FilterType::Nodelete as i32)),
            prev_kv: c.prev_kv,
            progress_notify: c.progress_notify,
        };
        self.send(pb::WatchResponse { created: true, ..self.response(id, current) }).await?;
        if self.catch_up(id, &mut w).await? {
            self.watchers.insert(id, w);
        }
        Ok(())
    }

    /// Replay history from the watcher's next revision. Returns false if the watcher had to be
    /// cancelled because that history is compacted.
    async fn catch_up(&self, id: i64, w: &mut Watcher) -> Result<bool, Gone> {
        // In pages: a replay from revision 1 must not hold the store while it reads.
        match crate::paged::events(&self.ctx.member, &w.key, &w.range_end, w.next_rev).await {
            Ok((events, current)) => {
                // Whole revisions, many to a response as etcd sends a replay: one response per
                // revision made a replay of 100k revisions 100k messages to encode and send.
                let (mut batch, mut batch_bytes, mut batch_revs) = (Vec::new(), 0, 0);
                let mut i = 0;
                while i < events.len() {
                    let rev = events[i].revision();
                    let end =
                        events[i..].iter().position(|e| e.revision() != rev).map(|n| i + n).unwrap_or(events.len());
                    w.next_rev = rev + 1;
                    let before = batch.len();
                    for e in events[i..end].iter().filter(|e| w.wants(e)) {
                        batch_bytes += e.kv.key.len() + e.kv.value.len();
                        batch.push(event_out(e, w.prev_kv));
                    }
                    batch_revs += usize::from(batch.len() > before);
                    i = end;
                    let last = i == events.len();
                    if !batch.is_empty()
                        && (last || batch_revs >= REPLAY_BATCH_REVS_MAX || batch_bytes >= REPLAY_BATCH_BYTES_MAX)
                    {
                        // The header names the batch's last revision: a client resuming from it
                        // misses nothing.
                        let events = std::mem::take(&mut batch);
                        self.send(pb::WatchResponse { events, ..self.response(id, rev) }).await?;
                        (batch_bytes, batch_revs) = (0, 0);
                    }
                }
                w.next_rev = w.next_rev.max(current + 1);
                Ok(true)
            }
            Err(KvError::Compacted { compacted, .. }) => {
                let current = self.ctx.member.read(|s| s.revision());
                let resp = pb::WatchResponse {
                    canceled: true,
                    compact_revision: compacted,
                    cancel_reason: "etcdserver: mvcc: required revision has been compacted".into(),
                    ..self.response(id, current)
                };
                self.send(resp).await?;
                Ok(false)
            }
            Err(e) => unreachable!("events_since only fails with Compacted, got {e:?}"),
        }
    }

    async fn catch_up_all(&mut self) -> Result<(), Gone> {
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            let mut w = self.watchers.remove(&id).expect("id came from the map");
            if self.catch_up(id, &mut w).await? {
                self.watchers.insert(id, w);
            }
        }
        Ok(())
    }

    async fn on_events(&mut self, revision: i64, events: &[Event]) -> Result<(), Gone> {
        let mut watchers = std::mem::take(&mut self.watchers);
        let mut result = Ok(());
        for (id, w) in watchers.iter_mut() {
            if revision < w.next_rev {
                continue;
            }
            result = self.deliver(*id, w, revision, events).await;
            if result.is_err() {
                break;
            }
        }
        self.watchers = watchers;
        result
    }

    /// Send one revision's matching events to a watcher and advance it past that revision.
    async fn deliver(&self, id: i64, w: &mut Watcher, revision: i64, events: &[Event]) -> Result<(), Gone> {
        debug_assert!(revision >= w.next_rev);
        w.next_rev = revision + 1;
        let matching: Vec<_> = events.iter().filter(|e| w.wants(e)).map(|e| event_out(e, w.prev_kv)).collect();
        if matching.is_empty() {
            return Ok(());
        }
        self.send(pb::WatchResponse { events: matching, ..self.response(id, revision) }).await
    }

    async fn notify_progress(&self) -> Result<(), Gone> {
        let rev = self.ctx.member.read(|s| s.revision());
        for (id, w) in &self.watchers {
            if w.progress_notify {
                self.send(self.response(*id, rev.min(w.next_rev - 1))).await?;
            }
        }
        Ok(())
    }
}
