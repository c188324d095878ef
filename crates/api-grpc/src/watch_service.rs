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
/// and value bytes past which a batch is closed (a revision is never split): below the size
/// the codec hands to the slow lane, so a batch encodes on the runtime in tens of microseconds.
const REPLAY_BATCH_REVS_MAX: usize = 1000;
const REPLAY_BATCH_BYTES_MAX: usize = crate::codec::ENCODE_OFF_WORKER_BYTES / 2;
/// Batches converted per step of a replay (about 1 MiB at most): what a replay holds at once.
const REPLAY_BATCHES_PER_STEP: usize = 8;
/// Replays with up to this many events left are converted on the runtime.
const REPLAY_INLINE_EVENTS_MAX: usize = 1024;

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
        // The stream's user is who opened it (etcd's rule): each create is checked for it.
        let user = self.ctx.caller(&req)?;
        let (tx, rx) = mpsc::channel(WATCH_STREAM_QUEUED_MAX);
        let session = Session { ctx: self.ctx.clone(), user, tx, watchers: BTreeMap::new(), next_id: 0 };
        tokio::spawn(session.run(req.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Watcher {
    filter: Arc<Filter>,
    next_rev: i64,
    progress_notify: bool,
}

/// What a watcher is sent of an event.
struct Filter {
    key: Vec<u8>,
    range_end: Vec<u8>,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
}

impl Filter {
    fn wants(&self, e: &Event) -> bool {
        KeyRange::new(&self.key, &self.range_end).contains(&e.kv.key)
            && !(self.no_put && e.kind == EventKind::Put)
            && !(self.no_delete && e.kind == EventKind::Delete)
    }
}

/// Up to `REPLAY_BATCHES_PER_STEP` responses of a replay from `events[next..]`, and where the
/// next step starts.
fn next_batches(
    events: &[Event],
    mut next: usize,
    filter: &Filter,
) -> (Vec<(i64, Vec<crate::pb::mvccpb::Event>)>, usize) {
    let batches = std::iter::from_fn(|| next_batch(events, &mut next, filter)).take(REPLAY_BATCHES_PER_STEP).collect();
    (batches, next)
}

/// The next response of a replay, from `events[*next..]` (in revision order): (header
/// revision, events). It holds whole revisions only, at most `REPLAY_BATCH_REVS_MAX` of them,
/// and is closed once past `REPLAY_BATCH_BYTES_MAX` of keys, values and previous values; its
/// header is the revision of its last event (a client resuming from it misses nothing).
/// `None` once no wanted event is left.
fn next_batch(events: &[Event], next: &mut usize, filter: &Filter) -> Option<(i64, Vec<crate::pb::mvccpb::Event>)> {
    let (mut batch, mut bytes, mut revs, mut last_rev) = (Vec::new(), 0, 0, 0);
    while *next < events.len() {
        let i = *next;
        let rev = events[i].revision();
        let end = events[i..].iter().position(|e| e.revision() != rev).map_or(events.len(), |n| i + n);
        let before = batch.len();
        for e in events[i..end].iter().filter(|e| filter.wants(e)) {
            bytes += e.kv.key.len() + e.kv.value.len();
            if filter.prev_kv {
                bytes += e.prev_kv.as_ref().map_or(0, |p| p.key.len() + p.value.len());
            }
            batch.push(event_out(e, filter.prev_kv));
        }
        if batch.len() > before {
            (revs, last_rev) = (revs + 1, rev);
        }
        *next = end;
        if revs >= REPLAY_BATCH_REVS_MAX || bytes >= REPLAY_BATCH_BYTES_MAX {
            break;
        }
    }
    (!batch.is_empty()).then_some((last_rev, batch))
}

struct Session {
    ctx: Arc<Ctx>,
    user: Option<String>,
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
        // One client's stream must not hold more watchers than the member can follow for it.
        let max = self.ctx.max_watchers_per_stream;
        if self.watchers.len() >= max {
            let resp = pb::WatchResponse {
                created: true,
                canceled: true,
                cancel_reason: format!(
                    "etcdserver: too many watchers on this stream (--max-watchers-per-stream {max}): cancel some, or open another stream"
                ),
                ..self.response(id, current)
            };
            return self.send(resp).await;
        }
        // Read permission on every key the watch covers, as etcd: refused as etcd refuses it
        // (created and cancelled at once, watch id -1, the gRPC error as the reason).
        if let Err(e) = self.ctx.permit_read(self.user.as_deref(), &c.key, &c.range_end) {
            let resp = pb::WatchResponse {
                created: true,
                canceled: true,
                cancel_reason: format!("rpc error: code = {:?} desc = {}", e.code(), e.message()),
                ..self.response(-1, current)
            };
            return self.send(resp).await;
        }
        let filters = c.filters.clone();
        let filter = Filter {
            key: c.key,
            range_end: c.range_end,
            no_put: filters.contains(&(pb::watch_create_request::FilterType::Noput as i32)),
            no_delete: filters.contains(&(pb::watch_create_request::FilterType::Nodelete as i32)),
            prev_kv: c.prev_kv,
        };
        let mut w = Watcher {
            filter: Arc::new(filter),
            next_rev: if c.start_revision > 0 { c.start_revision } else { current + 1 },
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
        match crate::paged::events(&self.ctx.member, &w.filter.key, &w.filter.range_end, w.next_rev).await {
            Ok((events, current)) => {
                // Whole revisions, many to a response as etcd sends a replay (one response per
                // revision made a replay of 100k revisions 100k messages). Each batch is built
                // just before it is sent, so a replay holds one converted batch at a time (the
                // events themselves share the store's values).
                // A long replay is converted in the slow lane, a few batches at a time.
                let events = Arc::new(events);
                let mut next = 0;
                loop {
                    let (batches, after) = if events.len() - next <= REPLAY_INLINE_EVENTS_MAX {
                        next_batches(&events, next, &w.filter)
                    } else {
                        let (events, filter) = (events.clone(), w.filter.clone());
                        crate::lane::off_runtime(move || next_batches(&events, next, &filter)).await
                    };
                    if batches.is_empty() {
                        break;
                    }
                    for (rev, events) in batches {
                        self.send(pb::WatchResponse { events, ..self.response(id, rev) }).await?;
                    }
                    next = after;
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
        let f = &w.filter;
        let matching: Vec<_> = events.iter().filter(|e| f.wants(e)).map(|e| event_out(e, f.prev_kv)).collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use quorate_kv::KeyValue;

    fn ev(rev: i64, key: &str, value_bytes: usize) -> Event {
        let kv = KeyValue { key: key.into(), value: vec![b'v'; value_bytes], mod_revision: rev, ..Default::default() };
        Event { kind: EventKind::Put, kv: Arc::new(kv), prev_kv: None }
    }

    fn all(prefix: &str) -> Filter {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().unwrap() += 1;
        Filter { key: prefix.into(), range_end: end, no_put: false, no_delete: false, prev_kv: false }
    }

    fn replay_batches(events: &[Event], filter: &Filter) -> Vec<(i64, Vec<crate::pb::mvccpb::Event>)> {
        let mut next = 0;
        std::iter::from_fn(|| next_batch(events, &mut next, filter)).collect()
    }

    fn check(events: &[Event], batches: &[(i64, Vec<crate::pb::mvccpb::Event>)], filter: &Filter) {
        let flat: Vec<(i64, Vec<u8>)> = batches
            .iter()
            .flat_map(|(_, b)| b.iter().map(|e| e.kv.as_ref().map(|kv| (kv.mod_revision, kv.key.clone())).unwrap()))
            .collect();
        let wanted: Vec<(i64, Vec<u8>)> =
            events.iter().filter(|e| filter.wants(e)).map(|e| (e.revision(), e.kv.key.clone())).collect();
        assert_eq!(flat, wanted, "every wanted event once, in order");
        let mut last = 0;
        for (header, b) in batches {
            let revs: Vec<i64> = b.iter().map(|e| e.kv.as_ref().unwrap().mod_revision).collect();
            assert!(revs[0] > last, "revision {} split across two responses", revs[0]);
            assert_eq!(*header, *revs.last().unwrap(), "the header is the batch's last revision");
            last = *header;
            let distinct = revs.windows(2).filter(|w| w[0] != w[1]).count() + 1;
            assert!(distinct <= REPLAY_BATCH_REVS_MAX);
        }
    }

    #[test]
    fn batches_hold_whole_revisions_up_to_the_revision_and_byte_caps() {
        // 2500 revisions of one small event, with a revision of 7 events every 100.
        let mut events = Vec::new();
        for rev in 1..=2500 {
            let n = if rev % 100 == 0 { 7 } else { 1 };
            events.extend((0..n).map(|j| ev(rev, &format!("a/{j}"), 10)));
        }
        let f = all("a/");
        let batches = replay_batches(&events, &f);
        check(&events, &batches, &f);
        assert_eq!(batches.len(), 3, "1000 + 1000 + 500 revisions");

        // Large values: the byte cap closes batches early, never inside a revision.
        let big: Vec<Event> =
            (1..=100).flat_map(|rev| (0..3).map(move |j| ev(rev, &format!("a/{j}"), 20_000))).collect();
        let batches = replay_batches(&big, &f);
        check(&big, &batches, &f);
        assert!(batches.len() > 10, "{} batches of 60 kB revisions", batches.len());
        for (_, b) in &batches {
            let bytes: usize = b.iter().map(|e| e.kv.as_ref().unwrap().value.len()).sum();
            assert!(bytes < REPLAY_BATCH_BYTES_MAX + 60_001, "{bytes} bytes in one batch");
        }
    }

    #[test]
    fn previous_values_count_toward_a_batch_and_the_header_is_its_last_event() {
        // Deletes carry nothing of their own but a 60 kB previous value each.
        let deletes: Vec<Event> = (1..=100)
            .map(|rev| {
                let mut e = ev(rev, "a/x", 0);
                e.kind = EventKind::Delete;
                e.prev_kv = Some(ev(rev - 1, "a/x", 60_000).kv);
                e
            })
            .collect();
        let with_prev = Filter { prev_kv: true, ..all("a/") };
        let batches = replay_batches(&deletes, &with_prev);
        check(&deletes, &batches, &with_prev);
        assert!(batches.len() >= 30, "{} batches: previous values not counted", batches.len());
        // Without prev_kv they are small: one batch.
        assert_eq!(replay_batches(&deletes, &all("a/")).len(), 1);

        // The last revisions are filtered out: the header stays at the last event sent.
        let mut events: Vec<Event> = (1..=10).map(|rev| ev(rev, "a/x", 1)).collect();
        events.extend((11..=20).map(|rev| ev(rev, "b/x", 1)));
        assert_eq!(
            replay_batches(&events, &all("a/")),
            vec![(10, replay_batches(&events[..10], &all("a/"))[0].1.clone())]
        );
    }

    #[test]
    fn a_replay_in_steps_sends_the_same_batches_a_few_at_a_time() {
        let events: Vec<Event> = (1..=10_000).map(|rev| ev(rev, "a/x", 300)).collect();
        let f = all("a/");
        let (mut stepped, mut next, mut steps) = (Vec::new(), 0, 0);
        loop {
            let (batches, after) = next_batches(&events, next, &f);
            if batches.is_empty() {
                break;
            }
            assert!(batches.len() <= REPLAY_BATCHES_PER_STEP);
            stepped.extend(batches);
            (next, steps) = (after, steps + 1);
        }
        assert_eq!(stepped, replay_batches(&events, &f));
        assert!(steps > 1, "one step held the whole replay");
    }

    #[test]
    fn only_wanted_events_are_batched_and_empty_revisions_are_skipped() {
        let events: Vec<Event> = (1..=50).map(|rev| ev(rev, if rev % 2 == 0 { "a/x" } else { "b/x" }, 1)).collect();
        let f = all("a/");
        let batches = replay_batches(&events, &f);
        check(&events, &batches, &f);
        assert_eq!(batches.len(), 1);
        assert!(replay_batches(&events, &all("c/")).is_empty());
        let no_put = Filter { no_put: true, ..all("a/") };
        assert!(replay_batches(&events, &no_put).is_empty());
    }
}
