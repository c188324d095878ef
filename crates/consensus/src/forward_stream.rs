//! Forwarding over one long-lived stream per peer (issue 15, ADR 0007).
//!
//! A request that only the leader may serve (a write, a read index, a keep-alive) reaches it
//! from a follower as one frame on a bidirectional gRPC stream, not as a call of its own: a
//! unary call costs a HEADERS, a DATA and an empty END_STREAM write through hyper's body task,
//! about 0.3 ms per forwarded write on this machine. Replies are matched to requests by id, so
//! any number may be in flight, and are answered as they finish.
//!
//! The stream must never be what keeps a follower from its leader:
//! - it is opened on a connection of its own, and its setup (TCP, TLS, the peer's answer
//!   headers) is bounded by `SETUP_TIMEOUT`; a setup that fails or hangs fails its waiting
//!   requests at once, and the next request opens a new stream;
//! - a request that times out while nothing at all was heard on the stream since it was sent
//!   marks the stream stale (a peer that hangs, a connection that silently died): the next
//!   request opens a new one, on a new connection. A request that is merely slow (a write
//!   waiting for its commit) leaves a stream that still answers others (the prober's round
//!   trip every second) alone;
//! - a stream that is replaced is half-closed once its last caller is done; the peer answers
//!   what it holds and ends it.
//!
//! Frames (`ForwardFrames` in peer.proto): a request is its id (8 bytes) and how long its caller
//! waits (4 bytes, milliseconds; both little-endian) then the request; a reply is the id,
//! one status byte (0 for an answer, else the gRPC code of a refusal) then the answer or the
//! refusal's message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

use crate::pb::Frame;

/// How long opening a stream may take: connecting (and the TLS handshake) plus the peer's
/// answer headers.
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Requests one stream has the receiver serve at once; past it the receiver stops reading the
/// stream until one is answered, and HTTP/2 flow control holds the sender back.
pub(crate) const IN_FLIGHT_MAX: usize = 4096;

/// How long a replaced stream waits, silent, for answers still owed before it is dropped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a forwarded request got no answer.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No answer within the caller's timeout: the request may or may not have been served.
    Timeout,
    /// The request never reached the peer (the stream could not be opened, or had ended).
    Unsent,
    /// The stream ended after the request may have reached the peer: it may have been served.
    Lost,
    /// The peer refused the request (another incarnation, an unknown sender).
    Refused(tonic::Status),
    /// The peer runs a build without forwarding streams (a rolling upgrade): the request was
    /// not served; send it as a call of its own.
    Unsupported,
}

type Answer = Result<Vec<u8>, tonic::Status>;

/// How a stream ended, for the requests still waiting on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The peer refused to open it: nothing sent on it was served.
    Refused { unsupported: bool },
    /// Its setup timed out, or it ended once open: what was sent may have been served.
    Lost,
}

#[derive(Default)]
struct Waiters {
    ended: Option<End>,
    waiting: HashMap<u64, oneshot::Sender<Result<Answer, End>>>,
}

/// Requests forwarded to one peer over one stream.
pub(crate) struct ForwardStream {
    requests: mpsc::UnboundedSender<Frame>,
    waiters: Arc<Mutex<Waiters>>,
    next_id: AtomicU64,
    /// Frames received on the stream so far.
    heard: Arc<AtomicU64>,
    /// A request timed out with nothing heard since it was sent.
    stale: AtomicBool,
}

/// Removes a waiter whose caller gave up (timed out, or its future was dropped): its frame is
/// then not sent if it has not gone yet, and a late answer is dropped.
struct Waiting<'a> {
    waiters: &'a Mutex<Waiters>,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.waiters.lock().unwrap().waiting.remove(&self.id);
    }
}

impl ForwardStream {
    /// Opens a stream to the peer behind `ch` (a channel of its own: a new connection) in the
    /// background; requests sent before it is up wait in its queue, bounded by the setup
    /// timeout.
    pub(crate) fn open(ch: Channel) -> Arc<Self> {
        use futures::StreamExt;
        let (requests, queued) = mpsc::unbounded_channel::<Frame>();
        let waiters = Arc::new(Mutex::new(Waiters::default()));
        let heard = Arc::new(AtomicU64::new(0));
        let (replies_to, heard_at, still_wanted) = (waiters.clone(), heard.clone(), Arc::downgrade(&waiters));
        let mut client = crate::network::new_client(ch);
        tokio::spawn(async move {
            // A frame whose caller has given up by the time it would go out is not sent.
            let outbound = tokio_stream::wrappers::UnboundedReceiverStream::new(queued).filter(move |frame| {
                let wanted = frame_id(&frame.data).is_some_and(|id| {
                    still_wanted.upgrade().is_some_and(|w| w.lock().unwrap().waiting.contains_key(&id))
                });
                futures::future::ready(wanted)
            });
            let mut request = tonic::Request::new(outbound);
            crate::incarnation::stamp(&mut request);
            let opened = tokio::time::timeout(SETUP_TIMEOUT, client.forward_frames(request)).await;
            let end = match opened {
                Ok(Ok(response)) => {
                    receive(response.into_inner(), &replies_to, &heard_at).await;
                    End::Lost
                }
                // A build without these streams refuses before reading a frame. Any other error
                // (a reset, a GOAWAY) may come after frames went out and were served: the peer
                // refuses nothing when a stream opens, only frame by frame.
                Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                    tracing::debug!(error = %status.message(), "forwarding stream unsupported by the peer");
                    End::Refused { unsupported: true }
                }
                // The connection was never made (the peer is down): nothing went out.
                Ok(Err(status)) if never_connected(&status) => End::Refused { unsupported: false },
                Ok(Err(status)) => {
                    crate::incarnation::note(&status);
                    tracing::debug!(error = %status.message(), "forwarding stream failed to open");
                    End::Lost
                }
                Err(_) => {
                    tracing::debug!("forwarding stream setup timed out");
                    End::Lost
                }
            };
            // Whoever still waits learns how the stream ended.
            let mut w = replies_to.lock().unwrap();
            w.ended = Some(end);
            for (_, waiter) in w.waiting.drain() {
                let _ = waiter.send(Err(end));
            }
        });
        Arc::new(ForwardStream { requests, waiters, next_id: AtomicU64::new(0), heard, stale: AtomicBool::new(false) })
    }

    /// Whether the next request should go on a new stream.
    pub(crate) fn is_spent(&self) -> bool {
        self.stale.load(Ordering::Acquire) || self.waiters.lock().unwrap().ended.is_some()
    }

    /// Sends `body` and waits up to `timeout` for its answer. The peer gives up serving it at
    /// the same timeout, counted from when it arrives.
    pub(crate) async fn call(&self, body: &[u8], timeout: Duration) -> Result<Vec<u8>, Failure> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            // Registered under the lock the stream's end takes, so no waiter is left behind.
            let mut w = self.waiters.lock().unwrap();
            match w.ended {
                Some(End::Refused { unsupported: true }) => return Err(Failure::Unsupported),
                Some(_) => return Err(Failure::Unsent),
                None => {}
            }
            w.waiting.insert(id, tx);
        }
        let _waiting = Waiting { waiters: &self.waiters, id };
        let heard_before = self.heard.load(Ordering::Acquire);
        if self.requests.send(Frame { data: request_frame(id, timeout, body) }).is_err() {
            return Err(Failure::Unsent);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(Ok(reply)))) => Ok(reply),
            Ok(Ok(Ok(Err(status)))) => Err(Failure::Refused(status)),
            Ok(Ok(Err(End::Refused { unsupported: true }))) => Err(Failure::Unsupported),
            Ok(Ok(Err(End::Refused { .. }))) => Err(Failure::Unsent),
            Ok(Ok(Err(End::Lost))) | Ok(Err(_)) => Err(Failure::Lost),
            Err(_) => {
                if self.heard.load(Ordering::Acquire) == heard_before {
                    self.stale.store(true, Ordering::Release);
                }
                Err(Failure::Timeout)
            }
        }
    }
}

/// Hands each reply to its waiter until the stream ends, or, once the `ForwardStream` was
/// dropped (replaced), until it has been silent for `DRAIN_TIMEOUT`.
async fn receive(mut replies: tonic::Streaming<Frame>, waiters: &Arc<Mutex<Waiters>>, heard: &AtomicU64) {
    loop {
        let frame = match tokio::time::timeout(DRAIN_TIMEOUT, replies.message()).await {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => return,
            Ok(Err(status)) => {
                tracing::debug!(error = %status.message(), "forwarding stream ended");
                return;
            }
            // Silent: only this task still holds the waiters once the stream was dropped.
            Err(_) if Arc::strong_count(waiters) == 1 => return,
            Err(_) => continue,
        };
        heard.fetch_add(1, Ordering::Release);
        let Some((id, answer)) = split_reply(frame.data) else {
            tracing::warn!("forwarding stream: a reply frame shorter than its header; stream dropped");
            return;
        };
        let waiter = waiters.lock().unwrap().waiting.remove(&id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(Ok(answer));
        }
    }
}

/// Whether a call failed because its connection could not be made at all (refused, no route):
/// then nothing of it reached the peer. Read from the error's causes, down to the socket's.
pub(crate) fn never_connected(status: &tonic::Status) -> bool {
    use std::io::ErrorKind::{ConnectionRefused, HostUnreachable, NetworkUnreachable};
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.kind(), ConnectionRefused | HostUnreachable | NetworkUnreachable) {
                return true;
            }
        }
        cause = e.source();
    }
    false
}

/// A request frame: the id, how long the caller waits for it (ms, little-endian u32), the body.
pub(crate) fn request_frame(id: u64, timeout: Duration, body: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(12 + body.len());
    data.extend_from_slice(&id.to_le_bytes());
    data.extend_from_slice(&(timeout.as_millis().min(u32::MAX as u128) as u32).to_le_bytes());
    data.extend_from_slice(body);
    data
}

fn frame_id(data: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(data.get(..8)?.try_into().ok()?))
}

/// A request frame's id, timeout and body; `None` for a frame shorter than its header.
pub(crate) fn split_request(mut data: Vec<u8>) -> Option<(u64, Duration, Vec<u8>)> {
    let id = frame_id(&data)?;
    let ms = u32::from_le_bytes(data.get(8..12)?.try_into().ok()?);
    data.drain(..12);
    Some((id, Duration::from_millis(ms as u64), data))
}

pub(crate) fn reply_frame(id: u64, answer: &Answer) -> Vec<u8> {
    let (code, body) = match answer {
        Ok(body) => (0u8, body.as_slice()),
        Err(status) => (status.code() as i32 as u8, status.message().as_bytes()),
    };
    let mut data = Vec::with_capacity(9 + body.len());
    data.extend_from_slice(&id.to_le_bytes());
    data.push(code);
    data.extend_from_slice(body);
    data
}

fn split_reply(mut data: Vec<u8>) -> Option<(u64, Answer)> {
    let id = u64::from_le_bytes(data.get(..8)?.try_into().ok()?);
    let code = *data.get(8)?;
    data.drain(..9);
    let answer = match code {
        // A refusal's code 0 would be OK: a peer that sends it speaks nonsense.
        0 => Ok(data),
        code => Err(tonic::Status::new(tonic::Code::from(code as i32), String::from_utf8_lossy(&data).into_owned())),
    };
    Some((id, answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_request_id_and_a_refusal_its_code() {
        let second = Duration::from_secs(1);
        let frame = request_frame(0x0102_0304_0506_0708, second, b"body");
        assert_eq!(frame.len(), 16);
        assert_eq!(split_request(frame), Some((0x0102_0304_0506_0708, second, b"body".to_vec())));
        assert_eq!(split_request(request_frame(7, second, b"")), Some((7, second, Vec::new())));
        let huge = split_request(request_frame(7, Duration::from_secs(u64::MAX / 4), b"")).unwrap();
        assert_eq!(huge.1, Duration::from_millis(u32::MAX as u64), "an absurd timeout is capped");
        assert_eq!(split_request(vec![1, 2, 3]), None, "a frame shorter than an id is refused");
        assert_eq!(split_request(vec![0; 11]), None, "a frame shorter than its header is refused");

        let (id, answer) = split_reply(reply_frame(9, &Ok(b"yes".to_vec()))).unwrap();
        assert_eq!((id, answer.unwrap()), (9, b"yes".to_vec()));
        let refused = tonic::Status::failed_precondition("this member belongs to incarnation 1; …");
        let (id, answer) = split_reply(reply_frame(u64::MAX, &Err(refused))).unwrap();
        let status = answer.unwrap_err();
        assert_eq!((id, status.code()), (u64::MAX, tonic::Code::FailedPrecondition));
        assert_eq!(status.message(), "this member belongs to incarnation 1; …");
        assert!(split_reply(vec![0; 8]).is_none(), "a reply without its status byte is refused");
    }

    /// A peer that answers forwarded requests whose body is `fast` at once and holds every
    /// other one forever, on a real gRPC server on loopback.
    #[derive(Clone, Copy)]
    struct HoldingPeer {
        /// Answers streams as a build without them does (a rolling upgrade).
        old_build: bool,
    }

    const HOLDING: HoldingPeer = HoldingPeer { old_build: false };

    /// Frames with the body "abandoned" that reached a `HoldingPeer` (only one test sends them).
    static ABANDONED_SEEN: AtomicU64 = AtomicU64::new(0);

    type Reply = Result<tonic::Response<Frame>, tonic::Status>;
    type Frames = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Frame, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl crate::pb::peer_server::Peer for HoldingPeer {
        async fn append(&self, _: tonic::Request<Frame>) -> Reply {
            Err(tonic::Status::unimplemented(""))
        }
        type AppendStreamStream = Frames;
        async fn append_stream(
            &self,
            _: tonic::Request<tonic::Streaming<Frame>>,
        ) -> Result<tonic::Response<Frames>, tonic::Status> {
            Err(tonic::Status::unimplemented(""))
        }
        async fn vote(&self, _: tonic::Request<Frame>) -> Reply {
            Err(tonic::Status::unimplemented(""))
        }
        async fn pre_vote(&self, _: tonic::Request<Frame>) -> Reply {
            Err(tonic::Status::unimplemented(""))
        }
        async fn snapshot_stream(&self, _: tonic::Request<tonic::Streaming<Frame>>) -> Reply {
            Err(tonic::Status::unimplemented(""))
        }
        async fn transfer_leader(&self, _: tonic::Request<Frame>) -> Reply {
            Err(tonic::Status::unimplemented(""))
        }
        async fn forward(&self, _: tonic::Request<Frame>) -> Reply {
            Err(tonic::Status::unimplemented(""))
        }
        type ForwardFramesStream = Frames;
        async fn forward_frames(
            &self,
            req: tonic::Request<tonic::Streaming<Frame>>,
        ) -> Result<tonic::Response<Frames>, tonic::Status> {
            if self.old_build {
                return Err(tonic::Status::unimplemented("no forwarding streams in this build"));
            }
            let mut requests = req.into_inner();
            let (replies, out) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok(Some(frame)) = requests.message().await {
                    let (id, _, body) = split_request(frame.data).unwrap();
                    match body.as_slice() {
                        b"fast" => drop(replies.send(Ok(Frame { data: reply_frame(id, &Ok(body)) }))),
                        b"abandoned" => drop(ABANDONED_SEEN.fetch_add(1, Ordering::SeqCst)),
                        _ => held.push(id),
                    }
                }
            });
            Ok(tonic::Response::new(Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(out))))
        }
    }

    async fn serve(peer: HoldingPeer) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(crate::pb::peer_server::PeerServer::new(peer))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        url
    }

    fn open(url: &str) -> Arc<ForwardStream> {
        ForwardStream::open(crate::network::channel_to(url).unwrap())
    }

    #[tokio::test]
    async fn answers_come_back_to_their_callers_in_any_order() {
        let stream = open(&serve(HOLDING).await);
        let calls = (0..50).map(|_| stream.call(b"fast", Duration::from_secs(5)));
        for answer in futures::future::join_all(calls).await {
            assert_eq!(answer.unwrap(), b"fast");
        }
        assert!(!stream.is_spent());
    }

    /// A peer whose connection opens but never speaks HTTP/2 (a hung process): the setup is
    /// bounded, the request fails as unsent, and the stream is spent (the next one is new).
    #[tokio::test]
    async fn a_setup_that_hangs_fails_the_request_within_the_setup_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let _held = tokio::spawn(async move {
            let mut conns = Vec::new();
            loop {
                conns.push(listener.accept().await.unwrap());
            }
        });
        let stream = open(&url);
        let began = std::time::Instant::now();
        let answer = stream.call(b"fast", Duration::from_secs(30)).await;
        assert!(matches!(answer, Err(Failure::Lost)), "a setup that hung may have delivered it: {answer:?}");
        assert!(began.elapsed() < SETUP_TIMEOUT + Duration::from_secs(1), "{:?}", began.elapsed());
        assert!(stream.is_spent());
    }

    /// A request that times out while the stream carries nothing at all marks it spent; one
    /// that is merely slow while others are answered leaves it in use.
    #[tokio::test]
    async fn a_silent_stream_is_spent_by_a_timeout_and_a_slow_request_is_not() {
        let url = serve(HOLDING).await;
        let silent = open(&url);
        assert_eq!(silent.call(b"fast", Duration::from_secs(5)).await.unwrap(), b"fast");
        let answer = silent.call(b"held", Duration::from_millis(300)).await;
        assert!(matches!(answer, Err(Failure::Timeout)), "{answer:?}");
        assert!(silent.is_spent(), "nothing was heard while the request waited");

        let busy = open(&url);
        let slow = busy.call(b"held", Duration::from_millis(500));
        let others = async {
            for _ in 0..10 {
                assert_eq!(busy.call(b"fast", Duration::from_secs(5)).await.unwrap(), b"fast");
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        };
        let (answer, ()) = tokio::join!(slow, others);
        assert!(matches!(answer, Err(Failure::Timeout)), "{answer:?}");
        assert!(!busy.is_spent(), "the stream answered others while the slow request waited");
    }

    /// A peer that goes away (its process ends: the connection is reset) fails what waits on
    /// the stream at once, as unanswered, rather than at each caller's timeout.
    #[tokio::test]
    async fn a_peer_that_goes_away_fails_the_waiting_requests_at_once() {
        // The peer runs on a runtime of its own; dropping the runtime closes its sockets, as the
        // end of its process would.
        let peer = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        peer.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(crate::pb::peer_server::PeerServer::new(HOLDING))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        let stream = open(&url);
        assert_eq!(stream.call(b"fast", Duration::from_secs(5)).await.unwrap(), b"fast");
        let waiting = stream.call(b"held", Duration::from_secs(30));
        let began = std::time::Instant::now();
        let (answer, _) = tokio::join!(waiting, async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            peer.shutdown_background();
        });
        assert!(matches!(answer, Err(Failure::Lost)), "it reached the peer: {answer:?}");
        assert!(began.elapsed() < Duration::from_secs(5), "{:?}", began.elapsed());
        assert!(stream.is_spent());
    }

    /// A peer of an older build refuses the stream as unimplemented: its callers are told so
    /// (they then send each request as a call of its own), not that there is no leader.
    #[tokio::test]
    async fn a_peer_without_streams_is_told_apart_from_a_peer_gone() {
        let stream = open(&serve(HoldingPeer { old_build: true }).await);
        let first = stream.call(b"fast", Duration::from_secs(5)).await;
        assert!(matches!(first, Err(Failure::Unsupported)), "{first:?}");
        assert!(stream.is_spent());
        let next = stream.call(b"fast", Duration::from_secs(5)).await;
        assert!(matches!(next, Err(Failure::Unsupported)), "{next:?}");
    }

    /// A request whose caller gave up before it went out is not sent: the peer never serves a
    /// write nobody waits for.
    #[tokio::test]
    async fn a_request_given_up_before_it_went_out_is_never_sent() {
        let stream = open(&serve(HOLDING).await);
        // Sent and given up (dropped) within one poll, before this single-threaded runtime
        // lets the stream's task run: the frame is still queued when its caller is gone.
        use futures::FutureExt;
        assert!(stream.call(b"abandoned", Duration::from_secs(5)).now_or_never().is_none());
        // Frames go out in order: once a later one is answered, the given-up one would have
        // reached the peer before it.
        let answer = stream.call(b"fast", Duration::from_secs(5)).await;
        assert_eq!(answer.unwrap(), b"fast");
        assert_eq!(ABANDONED_SEEN.load(Ordering::SeqCst), 0, "the given-up request reached the peer");
    }
}
