//! Peer transport: openraft's RPCs over gRPC (tonic, HTTP/2), one lazily connected channel per
//! peer. Payloads are bincode; both ends always run the same build.
//!
//! A snapshot travels as a stream of bounded chunks (`SnapshotStream`), never as one message:
//! a state larger than the largest peer message must still reach a new or lagging member. The
//! receiver assembles it in a buffer no larger than the length the header announced, installs
//! it only once the length and the SHA-256 match, and drops it on any error or stall.

use std::future::Future;
use std::io::Cursor;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::StreamAppendResult;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::OptionalSend;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint};

use crate::pb::peer_client::PeerClient;
use crate::pb::Frame;
use crate::types::{MemberNode, NodeId, SnapshotMeta, TypeConfig, Vote};

/// Largest peer message, in bytes. Snapshots travel in chunks of `SNAPSHOT_CHUNK_BYTES`, so
/// this bounds AppendEntries batches and forwarded requests, not the state.
pub const PEER_MESSAGE_BYTES_MAX: usize = 1 << 30;

/// Bytes of snapshot image in one peer frame.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// Largest snapshot image a member accepts, in bytes: the receive buffer is at most this big.
/// Far above any backend quota a member holding its state in memory can run with.
pub const SNAPSHOT_BYTES_MAX: u64 = 64 << 30;

/// How long a receiver waits for the next frame of a snapshot before dropping the transfer.
const SNAPSHOT_FRAME_WAIT: Duration = Duration::from_secs(30);

/// Shortest time a sender waits for the receiver to take the next chunk, and then for its answer
/// after the last one (installing a large image takes a while).
const SNAPSHOT_STALL_MIN: Duration = Duration::from_secs(10);
const SNAPSHOT_INSTALL_WAIT_MIN: Duration = Duration::from_secs(60);

/// How often a sender checks a snapshot transfer's progress.
const SNAPSHOT_WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// The chunk size in use: `SNAPSHOT_CHUNK_BYTES` unless a drill set another (0: the default).
static SNAPSHOT_CHUNK_BYTES_SET: AtomicUsize = AtomicUsize::new(0);

/// DRILL/TEST ONLY (`--drill-snapshot-chunk-bytes`): send snapshots in chunks of `bytes`, so a
/// small state crosses as many chunks. Set once at start, before the member runs.
pub fn set_snapshot_chunk_bytes(bytes: usize) {
    SNAPSHOT_CHUNK_BYTES_SET.store(bytes, Ordering::Relaxed);
}

fn snapshot_chunk_bytes() -> usize {
    match SNAPSHOT_CHUNK_BYTES_SET.load(Ordering::Relaxed) {
        0 => SNAPSHOT_CHUNK_BYTES,
        n => n,
    }
}

/// Pause after a failed append-stream setup before reporting it (see `stream_append`).
const STREAM_SETUP_RETRY_DELAY: Duration = Duration::from_millis(100);

/// How long one forwarded client request may take at the leader.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("peer messages always serialize")
}

pub(crate) fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    bincode::deserialize(b).map_err(|e| format!("undecodable peer frame: {e}"))
}

/// How long a peer connection over TLS may take to set up (TCP and the handshake).
const TLS_CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

/// Peer TLS (`https://` peer URLs), set once at start: one member runs per process.
struct PeerTls {
    connector: Arc<quorate_tls::Connector>,
    /// `--peer-client-cert-auth`: a message must come over a connection whose certificate
    /// names the member it says it is from (when this member knows that member).
    check_identity: bool,
}

static PEER_TLS: std::sync::OnceLock<PeerTls> = std::sync::OnceLock::new();

/// Dial every peer over TLS with `connector` (this member's peer URLs are `https://`); with
/// `check_identity`, a message is believed only from a connection whose certificate names its
/// sender. Set once, before the member starts.
pub fn set_peer_tls(connector: Arc<quorate_tls::Connector>, check_identity: bool) {
    let _ = PEER_TLS.set(PeerTls { connector, check_identity });
}

/// Whether this member speaks TLS to its peers (its peer URLs are `https://`).
pub fn peer_tls() -> bool {
    PEER_TLS.get().is_some()
}

/// The body of a Raft vote request (`Peer/Vote`) from `candidate` at `term`: what a stranger on
/// the peer port would send to take the cluster over (tests of the port's gate build it here).
pub fn vote_frame(candidate: NodeId, term: u64) -> Frame {
    Frame { data: encode(&VoteRequest::<TypeConfig>::new(Vote::new(term, candidate), None)) }
}

/// Builds a channel to a peer's URL. Connection happens on first use and is retried by tonic.
/// A member whose peers speak TLS dials only `https://` URLs, and a plaintext one only
/// `http://`: a peer URL of the other kind is an error, never a downgrade.
pub fn channel_to(peer_url: &str) -> Result<Channel, String> {
    let ep = Endpoint::from_shared(peer_url.to_string()).map_err(|e| format!("bad peer url {peer_url}: {e}"))?;
    let ep = ep
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    let https = peer_url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    match (https, PEER_TLS.get()) {
        // TCP and the handshake within the connect timeout: 2-3 round trips, not one.
        (true, Some(tls)) => Ok(quorate_tls::channel(&ep.connect_timeout(TLS_CONNECT_TIMEOUT), tls.connector.clone())),
        (false, None) => Ok(ep.connect_lazy()),
        (true, None) => {
            Err(format!("peer URL {peer_url} is https:// but this member has no peer TLS (--peer-cert-file)"))
        }
        (false, Some(_)) => Err(format!("peer URL {peer_url} is not https:// and this member speaks TLS to its peers")),
    }
}

#[derive(Clone)]
pub struct NetworkFactory {
    /// How long outstanding pipelined appends may go unanswered before the follower is
    /// reported unreachable: one election timeout, not openraft's per-RPC heartbeat TTL, which a
    /// loaded follower's fsync can exceed without anything being wrong.
    pub stall_timeout: Duration,
    /// Send failures are counted here, by peer.
    pub metrics: crate::metrics::ConsensusMetrics,
    /// Pre-votes sent are counted here (`campaign`).
    pub(crate) campaign: Arc<crate::campaign::Signals>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &MemberNode) -> Self::Network {
        PeerNetwork {
            target,
            url: node.peer_url.clone(),
            client: channel_to(&node.peer_url)
                .inspect_err(|e| tracing::warn!(peer = %format!("{target:x}"), error = %e, "cannot dial this peer"))
                .ok()
                .map(new_client),
            stall_timeout: self.stall_timeout,
            sent_failures: self.metrics.peer_sent_failures.get_or_create(&crate::metrics::to_peer(target)).clone(),
            metrics: self.metrics.clone(),
            campaign: self.campaign.clone(),
        }
    }
}

pub(crate) fn new_client(ch: Channel) -> PeerClient<Channel> {
    PeerClient::new(ch)
        .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX)
}

pub struct PeerNetwork {
    target: NodeId,
    url: String,
    client: Option<PeerClient<Channel>>,
    stall_timeout: Duration,
    /// etcd's `etcd_network_peer_sent_failures_total{To=target}`.
    sent_failures: prometheus_client::metrics::counter::Counter,
    /// Where (pre-)votes sent and their answers are recorded (`crate::votes`).
    metrics: crate::metrics::ConsensusMetrics,
    campaign: Arc<crate::campaign::Signals>,
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    PreVote,
    TransferLeader,
}

impl PeerNetwork {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let result = self.call_uncounted(rpc, req, timeout).await;
        if result.is_err() {
            self.sent_failures.inc();
        }
        result
    }

    async fn call_uncounted<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let Some(client) = self.client.as_mut() else {
            return Err(RPCError::Unreachable(Unreachable::from_string(format!("bad peer url {}", self.url))));
        };
        let mut request = addressed(tonic::Request::new(Frame { data: encode(req) }), self.target);
        request.set_timeout(timeout);
        let reply = match rpc {
            Rpc::Append => client.append(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::PreVote => client.pre_vote(request).await,
            Rpc::TransferLeader => client.transfer_leader(request).await,
        };
        let frame = reply.inspect_err(crate::incarnation::note).map_err(|s| match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                RPCError::Unreachable(Unreachable::from_string(format!("member {:x}: {}", self.target, s.message())))
            }
            _ => RPCError::Network(NetworkError::from_string(format!("member {:x}: {}", self.target, s.message()))),
        })?;
        crate::incarnation::check_answer(frame.metadata())
            .map_err(|e| RPCError::Unreachable(Unreachable::from_string(format!("member {:x}: {e}", self.target))))?;
        let res: Result<Resp, String> =
            decode(&frame.into_inner().data).map_err(|e| RPCError::Network(NetworkError::from_string(e)))?;
        res.map_err(|e| RPCError::Unreachable(Unreachable::from_string(e)))
    }
}

impl RaftNetworkV2<TypeConfig> for PeerNetwork {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Rpc::Append, &rpc, option.soft_ttl()).await
    }

    /// Pipelined AppendEntries over one bidirectional gRPC stream: the leader keeps sending
    /// while earlier batches are still being made durable at the follower. A follower that
    /// stops answering while requests are outstanding is reported unreachable after
    /// `stall_timeout`; an idle stream is left open.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>, RPCError<TypeConfig>>,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        use futures::StreamExt;
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        Box::pin(async move {
            let target = self.target;
            let failures = self.sent_failures.clone();
            let unreachable = move |what: String| {
                RPCError::Unreachable(Unreachable::from_string(format!("member {target:x}: {what}")))
            };
            let Some(client) = self.client.as_mut() else {
                failures.inc();
                return Err(unreachable(format!("bad peer url {}", self.url)));
            };
            let outstanding = Arc::new(AtomicUsize::new(0));
            let sent = outstanding.clone();
            let frames = input.map(move |req| {
                sent.fetch_add(1, SeqCst);
                Frame { data: encode(&req) }
            });
            let ttl = option.soft_ttl().max(self.stall_timeout);
            let inbound =
                match tokio::time::timeout(ttl, client.append_stream(addressed(tonic::Request::new(frames), target)))
                    .await
                {
                    Ok(Ok(resp)) => resp.into_inner(),
                    Ok(Err(status)) => {
                        crate::incarnation::note(&status);
                        // openraft retries a failed stream setup at once, without its backoff: pace
                        // it here, or an unreachable peer (a member added but not yet started) costs
                        // a busy loop and a flood of log lines.
                        tokio::time::sleep(STREAM_SETUP_RETRY_DELAY).await;
                        failures.inc();
                        return Err(unreachable(status.message().to_string()));
                    }
                    Err(_) => {
                        failures.inc();
                        return Err(unreachable("stream setup timed out".into()));
                    }
                };
            let stream = futures::stream::unfold(Some((inbound, outstanding)), move |state| async move {
                let (mut inbound, outstanding) = state?;
                loop {
                    let waited = tokio::time::timeout(ttl, inbound.message()).await;
                    let frame = match waited {
                        Err(_) if outstanding.load(SeqCst) == 0 => continue,
                        Err(_) => return Some((Err(unreachable("append stream stalled".into())), None)),
                        Ok(Err(status)) => return Some((Err(unreachable(status.message().to_string())), None)),
                        Ok(Ok(None)) => return None,
                        Ok(Ok(Some(frame))) => frame,
                    };
                    outstanding.fetch_sub(1, SeqCst);
                    let item: Result<StreamAppendResult<TypeConfig>, String> = match decode(&frame.data) {
                        Ok(r) => r,
                        Err(e) => return Some((Err(RPCError::Network(NetworkError::from_string(e))), None)),
                    };
                    return match item {
                        Ok(r) => Some((Ok(r), Some((inbound, outstanding)))),
                        Err(e) => Some((Err(unreachable(e)), None)),
                    };
                }
            });
            let stream = stream.inspect(move |item| {
                if item.is_err() {
                    failures.inc();
                }
            });
            Ok(Box::pin(stream) as BoxStream<'s, _>)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let result = self.call(Rpc::Vote, &rpc, option.soft_ttl()).await;
        crate::votes::record_sent(&self.metrics, self.target, false, &rpc, &result);
        result
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.campaign.pre_vote_sent();
        let result = self.call(Rpc::PreVote, &rpc, option.soft_ttl()).await;
        crate::votes::record_sent(&self.metrics, self.target, true, &rpc, &result);
        result
    }

    /// Streams the snapshot in chunks (`snapshot_frames`). A receiver that stops taking chunks
    /// for the install timeout, or does not answer within a minute of the last one, is reported
    /// unreachable, and the dropped stream tells it to discard what it has.
    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: openraft::alias::SnapshotOf<TypeConfig, Self::SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let target = self.target;
        let unreachable = move |what: String| Unreachable::from_string(format!("member {target:x}: {what}"));
        let Some(client) = self.client.as_mut() else {
            return Err(unreachable(format!("bad peer url {}", self.url)).into());
        };
        let image = snapshot.snapshot.into_inner();
        let (bytes, chunk) = (image.len(), snapshot_chunk_bytes());
        if bytes as u64 > SNAPSHOT_BYTES_MAX {
            // The receiver would refuse it after the header; do not start.
            return Err(unreachable(SnapshotRefused::TooLarge(bytes as u64).to_string()).into());
        }
        let progress = Arc::new(Mutex::new(Progress { at: Instant::now(), sent_all: false }));
        let frames = snapshot_frames(vote, snapshot.meta, image, chunk, progress.clone());
        let request = addressed(tonic::Request::new(futures::stream::iter(frames)), target);
        let stall = option.hard_ttl().max(SNAPSHOT_STALL_MIN);
        let install_wait = option.hard_ttl().max(SNAPSHOT_INSTALL_WAIT_MIN);
        tracing::info!(member = %format!("{target:x}"), bytes, chunk_bytes = chunk, "sending snapshot");
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            why = watch_transfer(&progress, stall, install_wait) => return Err(unreachable(why.into()).into()),
            reply = client.snapshot_stream(request) => reply,
        };
        // Every failure backs off (unreachable) rather than retrying at once: a refused image
        // (too large, damaged) would otherwise be sent again and again without a pause.
        let frame = reply
            .inspect_err(crate::incarnation::note)
            .map_err(|s| unreachable(format!("{:?}: {}", s.code(), s.message())))?;
        let res: Result<SnapshotResponse<TypeConfig>, String> =
            decode(&frame.into_inner().data).map_err(|e| StreamingError::Network(NetworkError::from_string(e)))?;
        res.map_err(|e| unreachable(e).into())
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Rpc::TransferLeader, &req, option.soft_ttl()).await
    }
}

/// Where a snapshot transfer stands, as its sender sees it.
struct Progress {
    /// When the receiver last took a frame.
    at: Instant,
    /// Every frame has been taken; the receiver is checking and installing.
    sent_all: bool,
}

/// Resolves only when a transfer stops moving: no frame taken for `stall`, or no answer
/// `install_wait` after the last frame. Checked every `SNAPSHOT_WATCH_INTERVAL`; the caller
/// drops it when the transfer ends.
async fn watch_transfer(progress: &Mutex<Progress>, stall: Duration, install_wait: Duration) -> &'static str {
    loop {
        tokio::time::sleep(SNAPSHOT_WATCH_INTERVAL).await;
        if let Some(why) = transfer_stopped(&progress.lock().unwrap(), Instant::now(), stall, install_wait) {
            return why;
        }
    }
}

/// Whether a transfer has stopped moving at `now`, and why.
fn transfer_stopped(p: &Progress, now: Instant, stall: Duration, install_wait: Duration) -> Option<&'static str> {
    let idle = now.saturating_duration_since(p.at);
    match p.sent_all {
        false if idle > stall => Some("snapshot transfer stalled: no chunk taken"),
        true if idle > install_wait => Some("no answer after the whole snapshot was sent"),
        _ => None,
    }
}

/// The header frame of a snapshot transfer.
#[derive(Serialize, Deserialize)]
struct SnapshotHeader {
    vote: Vote,
    meta: SnapshotMeta,
    /// Length of the image that follows, in bytes.
    image_bytes: u64,
}

/// The frames that carry `image`: a header, the image in chunks of `chunk_bytes`, and its
/// SHA-256, hashed as the chunks are taken. Each frame taken is recorded in `progress`.
fn snapshot_frames(
    vote: Vote,
    meta: SnapshotMeta,
    image: Vec<u8>,
    chunk_bytes: usize,
    progress: Arc<Mutex<Progress>>,
) -> impl Iterator<Item = Frame> + Send + 'static {
    assert!(chunk_bytes > 0, "a snapshot chunk holds at least one byte");
    let header = encode(&SnapshotHeader { vote, meta, image_bytes: image.len() as u64 });
    let chunks = image.len().div_ceil(chunk_bytes);
    let mut hasher = Sha256::new();
    let mut frames_taken = 0usize;
    (0..chunks + 2).map(move |i| {
        let data = if i == 0 {
            header.clone()
        } else if i <= chunks {
            let chunk = &image[(i - 1) * chunk_bytes..(i * chunk_bytes).min(image.len())];
            hasher.update(chunk);
            chunk.to_vec()
        } else {
            std::mem::take(&mut hasher).finalize().to_vec()
        };
        frames_taken += 1;
        let mut p = progress.lock().unwrap();
        p.at = Instant::now();
        p.sent_all = frames_taken == chunks + 2;
        Frame { data }
    })
}

/// Why a received snapshot was dropped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum SnapshotRefused {
    #[error("snapshot of {0} bytes is larger than the most a member accepts ({SNAPSHOT_BYTES_MAX})")]
    TooLarge(u64),
    #[error("cannot hold a snapshot of {0} bytes in memory")]
    NoMemory(u64),
    #[error("empty snapshot chunk")]
    EmptyChunk,
    #[error("snapshot chunk overruns the announced length ({announced} bytes)")]
    Overrun { announced: u64 },
    #[error("snapshot ended after {received} of {announced} bytes")]
    Short { received: u64, announced: u64 },
    #[error("snapshot checksum does not match its {0} bytes")]
    Checksum(u64),
    #[error("snapshot checksum frame is malformed")]
    BadTrailer,
}

/// A snapshot being received: a buffer no longer than the header announced, filled chunk by
/// chunk and hashed as it fills. Dropping it discards the transfer.
struct SnapshotAssembly {
    announced: u64,
    image: Vec<u8>,
    hasher: Sha256,
    chunks: u64,
}

impl SnapshotAssembly {
    fn new(announced: u64) -> Result<Self, SnapshotRefused> {
        if announced > SNAPSHOT_BYTES_MAX {
            return Err(SnapshotRefused::TooLarge(announced));
        }
        let mut image = Vec::new();
        image.try_reserve_exact(announced as usize).map_err(|_| SnapshotRefused::NoMemory(announced))?;
        Ok(SnapshotAssembly { announced, image, hasher: Sha256::new(), chunks: 0 })
    }

    fn complete(&self) -> bool {
        self.image.len() as u64 == self.announced
    }

    fn push(&mut self, chunk: &[u8]) -> Result<(), SnapshotRefused> {
        if chunk.is_empty() {
            return Err(SnapshotRefused::EmptyChunk);
        }
        if (self.image.len() + chunk.len()) as u64 > self.announced {
            return Err(SnapshotRefused::Overrun { announced: self.announced });
        }
        self.hasher.update(chunk);
        self.image.extend_from_slice(chunk);
        self.chunks += 1;
        Ok(())
    }

    /// The image, once every byte arrived and `trailer` is its SHA-256.
    fn finish(self, trailer: &[u8]) -> Result<Vec<u8>, SnapshotRefused> {
        if !self.complete() {
            return Err(SnapshotRefused::Short { received: self.image.len() as u64, announced: self.announced });
        }
        if trailer.len() != 32 {
            return Err(SnapshotRefused::BadTrailer);
        }
        if self.hasher.finalize().as_slice() != trailer {
            return Err(SnapshotRefused::Checksum(self.announced));
        }
        Ok(self.image)
    }
}

/// Receive one snapshot transfer: the header, chunks up to the announced length, the checksum.
async fn receive_snapshot<S>(frames: &mut S) -> Result<(Vote, SnapshotMeta, Vec<u8>, u64), tonic::Status>
where
    S: futures::Stream<Item = Result<Frame, tonic::Status>> + Unpin,
{
    let header: SnapshotHeader = decode(&next_frame(frames).await?).map_err(bad_frame)?;
    let refused = |e: SnapshotRefused| tonic::Status::invalid_argument(e.to_string());
    let mut assembly = SnapshotAssembly::new(header.image_bytes).map_err(refused)?;
    // Every chunk adds at least one byte, so this ends after at most `image_bytes` frames.
    while !assembly.complete() {
        assembly.push(&next_frame(frames).await?).map_err(refused)?;
    }
    let chunks = assembly.chunks;
    let image = assembly.finish(&next_frame(frames).await?).map_err(refused)?;
    Ok((header.vote, header.meta, image, chunks))
}

async fn next_frame<S>(frames: &mut S) -> Result<Vec<u8>, tonic::Status>
where
    S: futures::Stream<Item = Result<Frame, tonic::Status>> + Unpin,
{
    use futures::StreamExt;
    match tokio::time::timeout(SNAPSHOT_FRAME_WAIT, frames.next()).await {
        Err(_) => Err(tonic::Status::deadline_exceeded("snapshot transfer stalled")),
        Ok(None) => Err(tonic::Status::cancelled("snapshot transfer ended early")),
        Ok(Some(frame)) => frame.map(|f| f.data),
    }
}

/// gRPC metadata naming the member a Raft message is for: a member refuses messages meant for
/// another, so a peer URL that points at the wrong process cannot make it vote or append.
const TO_HEADER: &str = "quorate-to";

fn addressed<T>(mut req: tonic::Request<T>, target: NodeId) -> tonic::Request<T> {
    req.metadata_mut().insert(TO_HEADER, format!("{target:x}").parse().expect("hex is valid metadata"));
    crate::incarnation::stamp(&mut req);
    req
}

/// Receives a forwarded client request at the member that believes it leads.
pub trait ForwardHandler: Send + Sync + 'static {
    /// `refused` is set when the sender is of another incarnation: only a joining member's
    /// lookup of its own id may then be answered (it learns the incarnation from the reply).
    fn handle(
        &self,
        req: Vec<u8>,
        refused: Option<tonic::Status>,
    ) -> futures::future::BoxFuture<'static, Result<Vec<u8>, tonic::Status>>;
}

/// The gRPC service every member runs on its peer URL.
pub struct PeerService {
    pub id: NodeId,
    pub raft: crate::types::Raft,
    pub forward: Arc<dyn ForwardHandler>,
    /// Where answered (pre-)votes are recorded and refused pre-votes counted.
    pub metrics: crate::metrics::ConsensusMetrics,
    /// Told when a leader's AppendEntries arrives (`campaign`).
    pub(crate) campaign: Arc<crate::campaign::Signals>,
    /// An append answered this long after it arrived is logged (half the leader's patience).
    pub(crate) stall_warning: Duration,
}

type Reply = Result<tonic::Response<Frame>, tonic::Status>;

fn reply<T: Serialize, E: std::fmt::Display>(r: Result<T, E>) -> Reply {
    let mut resp = tonic::Response::new(Frame { data: encode(&r.map_err(|e| e.to_string())) });
    crate::incarnation::stamp_response(&mut resp);
    Ok(resp)
}

fn bad_frame(e: String) -> tonic::Status {
    tonic::Status::invalid_argument(e)
}

impl PeerService {
    /// Record a pre-vote this member answered. A refusal its answer cannot explain (a live
    /// leader and a longer log both fit) is settled by asking Raft again with this member's own
    /// last log id, after the answer has gone: a pre-vote changes no state.
    fn record_pre_vote_answer(&self, rpc: VoteRequest<TypeConfig>, resp: openraft::raft::VoteResponse<TypeConfig>) {
        use crate::flight::Refusal;
        use crate::votes;
        if votes::granted(true, &rpc, &resp) {
            return votes::record_answered(&self.metrics, true, &rpc, &resp, None);
        }
        if !votes::ambiguous(&rpc, &resp) {
            return votes::record_answered(&self.metrics, true, &rpc, &resp, Some(votes::refusal(&rpc, &resp)));
        }
        let (raft, metrics) = (self.raft.clone(), self.metrics.clone());
        tokio::spawn(async move {
            let probe = raft.pre_vote(votes::with_log_of(&rpc, &resp)).await;
            let reason = match probe {
                Ok(r) if r.vote_granted => Refusal::LogBehind,
                _ => Refusal::LeaderAlive,
            };
            votes::record_answered(&metrics, true, &rpc, &resp, Some(reason));
        });
    }

    /// Under `--peer-client-cert-auth`, who a message is from: the connection must carry a
    /// certificate (of the peer CA: the handshake checked that), the message must say which
    /// member sent it (`quorate-from`), that member must be one this member knows, and the
    /// certificate must name it (its common name is the member's name, or a subject alternative
    /// name its peer URL's host). The one exception: a member that knows no member at all (it
    /// is joining) takes appends and snapshots from its first leader on the CA's word
    /// (`joining_ok`); a vote, a leadership transfer or a forwarded request from a stranger is
    /// refused everywhere. Returns the sender, when the check is on.
    fn check_sender<T>(&self, req: &tonic::Request<T>, joining_ok: bool) -> Result<Option<NodeId>, tonic::Status> {
        if !PEER_TLS.get().is_some_and(|t| t.check_identity) {
            return Ok(None);
        }
        let identity = req.extensions().get::<quorate_tls::ConnInfo>().and_then(|c| c.identity.clone());
        sender_is_member(
            &self.raft,
            self.id,
            identity.as_deref(),
            crate::incarnation::sender(req.metadata()),
            joining_ok,
        )
    }

    /// A Raft message is for this member, from the member its certificate names (the member the
    /// message itself speaks for: `leader`, its candidate or leader), and of this member's
    /// incarnation. Returns the sender, when the certificate check is on.
    fn check_addressee<T>(
        &self,
        req: &tonic::Request<T>,
        leader: Option<NodeId>,
        joining_ok: bool,
    ) -> Result<Option<NodeId>, tonic::Status> {
        let from = self.check_sender(req, joining_ok)?;
        if let (Some(from), Some(leader)) = (from, leader) {
            if from != leader {
                return Err(tonic::Status::permission_denied(format!(
                    "a message from member {from:x} speaks for member {leader:x}"
                )));
            }
        }
        crate::incarnation::check(req.metadata())?;
        let to = req.metadata().get(TO_HEADER).and_then(|v| v.to_str().ok());
        match to.map(|t| u64::from_str_radix(t, 16)) {
            Some(Ok(id)) if id == self.id => Ok(from),
            _ => Err(tonic::Status::failed_precondition(format!(
                "this is member {:x}; the message was addressed to {}",
                self.id,
                to.unwrap_or("nobody")
            ))),
        }
    }
}

/// `check_sender`'s rule, for a sender whose connection's certificate is `identity` and whose
/// message says it is `from` (a forwarding stream checks it again for every request).
fn sender_is_member(
    raft: &crate::types::Raft,
    me: NodeId,
    identity: Option<&quorate_tls::Identity>,
    from: Option<NodeId>,
    joining_ok: bool,
) -> Result<Option<NodeId>, tonic::Status> {
    use openraft::rt::WatchReceiver as _;
    let Some(identity) = identity else {
        return Err(tonic::Status::unauthenticated("peer messages need a client certificate of the peer CA"));
    };
    let Some(from) = from else {
        return Err(tonic::Status::unauthenticated("a peer message must say which member sent it"));
    };
    // Decided under the metrics' read guard: no copy of them per message.
    let metrics = raft.metrics();
    let metrics = metrics.borrow_watched();
    let membership = metrics.membership_config.membership();
    match membership.get_node(&from) {
        Some(node) if identity.names_member(&node.name, &node.peer_url) => Ok(Some(from)),
        Some(node) => Err(tonic::Status::permission_denied(format!(
            "the certificate (CN {:?}) does not name member {} ({from:x}, {})",
            identity.common_name.as_deref().unwrap_or(""),
            node.name,
            node.peer_url
        ))),
        None if joining_ok && membership.nodes().next().is_none() => Ok(Some(from)),
        None => Err(tonic::Status::permission_denied(format!(
            "member {from:x} is not a member of this cluster as member {me:x} knows it"
        ))),
    }
}

#[tonic::async_trait]
impl crate::pb::peer_server::Peer for PeerService {
    async fn append(&self, req: tonic::Request<Frame>) -> Reply {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&req.get_ref().data).map_err(bad_frame)?;
        self.check_addressee(&req, Some(rpc.vote.leader_id.node_id), true)?;
        if rpc.vote.is_committed() {
            self.campaign.heard();
        }
        reply(self.raft.append_entries(rpc).await)
    }

    type AppendStreamStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Frame, tonic::Status>> + Send>>;

    async fn append_stream(
        &self,
        req: tonic::Request<tonic::Streaming<Frame>>,
    ) -> Result<tonic::Response<Self::AppendStreamStream>, tonic::Status> {
        use futures::StreamExt;
        let from = self.check_addressee(&req, None, true)?;
        let heard = self.campaign.clone();
        // When each request still unanswered arrived, to report a slow answer: the leader gives
        // up on a stream that answers nothing for an election timeout.
        let arrivals = Arc::new(Mutex::new(std::collections::VecDeque::new()));
        let arrived = arrivals.clone();
        let slow = self.stall_warning;
        // The stream ends at the first frame that cannot be read, or that speaks for a leader
        // other than the member its certificate names: skipping one would misalign requests
        // and results.
        let requests = req
            .into_inner()
            .map(|f| f.ok().and_then(|f| decode::<AppendEntriesRequest<TypeConfig>>(&f.data).ok()))
            .map(move |r| r.filter(|r| from.is_none_or(|from| r.vote.leader_id.node_id == from)))
            .inspect(move |r| {
                if let Some(r) = r {
                    if r.vote.is_committed() {
                        heard.heard();
                    }
                    arrived.lock().unwrap().push_back((Instant::now(), r.entries.len()));
                }
            })
            .take_while(|r| futures::future::ready(r.is_some()))
            .map(|r| r.expect("take_while keeps only Some"));
        let results = self.raft.stream_append(requests).map(move |r| {
            let answered = arrivals.lock().unwrap().pop_front();
            if let Some((at, entries)) = answered.filter(|(at, _)| at.elapsed() >= slow) {
                let ms = at.elapsed().as_millis() as u64;
                tracing::warn!(ms, entries, "an append from the leader took this long to be made durable and answered");
            }
            Ok(Frame { data: encode(&r.map_err(|e| e.to_string())) })
        });
        Ok(tonic::Response::new(Box::pin(results)))
    }

    async fn vote(&self, req: tonic::Request<Frame>) -> Reply {
        let rpc: VoteRequest<TypeConfig> = decode(&req.get_ref().data).map_err(bad_frame)?;
        self.check_addressee(&req, Some(rpc.vote.leader_id.node_id), false)?;
        let result = self.raft.vote(rpc.clone()).await;
        if let Ok(resp) = &result {
            let reason = (!crate::votes::granted(false, &rpc, resp)).then(|| crate::votes::refusal(&rpc, resp));
            crate::votes::record_answered(&self.metrics, false, &rpc, resp, reason);
        }
        reply(result)
    }

    async fn pre_vote(&self, req: tonic::Request<Frame>) -> Reply {
        let rpc: VoteRequest<TypeConfig> = decode(&req.get_ref().data).map_err(bad_frame)?;
        self.check_addressee(&req, Some(rpc.vote.leader_id.node_id), false)?;
        let result = self.raft.pre_vote(rpc.clone()).await;
        if let Ok(resp) = &result {
            self.record_pre_vote_answer(rpc, resp.clone());
        }
        reply(result)
    }

    async fn snapshot_stream(&self, req: tonic::Request<tonic::Streaming<Frame>>) -> Reply {
        let from = self.check_addressee(&req, None, true)?;
        let mut frames = req.into_inner();
        let (vote, meta, image, chunks) = receive_snapshot(&mut frames).await.inspect_err(|e| {
            tracing::warn!(error = %e.message(), "snapshot transfer dropped");
        })?;
        if from.is_some_and(|from| from != vote.leader_id.node_id) {
            return Err(tonic::Status::permission_denied("a snapshot from one member speaking for another"));
        }
        tracing::info!(bytes = image.len(), chunks, "snapshot received");
        let snapshot =
            openraft::alias::SnapshotOf::<TypeConfig, Cursor<Vec<u8>>> { meta, snapshot: Cursor::new(image) };
        reply(self.raft.install_full_snapshot(vote, snapshot).await)
    }

    async fn transfer_leader(&self, req: tonic::Request<Frame>) -> Reply {
        let rpc: TransferLeaderRequest<TypeConfig> = decode(&req.get_ref().data).map_err(bad_frame)?;
        self.check_addressee(&req, Some(rpc.from_leader().leader_id.node_id), false)?;
        reply(self.raft.handle_transfer_leader(rpc).await)
    }

    async fn forward(&self, req: tonic::Request<Frame>) -> Reply {
        // A sender its certificate does not vouch for gets what one of another incarnation
        // gets: only a joining member's lookup of its own id is answered.
        let refused = self.check_sender(&req, false).err().or_else(|| crate::incarnation::check(req.metadata()).err());
        let data = self.forward.handle(req.into_inner().data, refused).await?;
        let mut resp = tonic::Response::new(Frame { data });
        crate::incarnation::stamp_response(&mut resp);
        Ok(resp)
    }

    type ForwardFramesStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Frame, tonic::Status>> + Send>>;

    /// Forwarded requests on one long-lived stream (`crate::forward_stream`): each is checked as a
    /// `Forward` call is (the sender against the membership as it is now; the incarnation is
    /// the process's, fixed while the stream lives), served concurrently, at most
    /// `IN_FLIGHT_MAX` at once, and answered as it finishes. The answers end once the caller has
    /// closed its side and every request has been answered.
    async fn forward_frames(
        &self,
        req: tonic::Request<tonic::Streaming<Frame>>,
    ) -> Result<tonic::Response<Self::ForwardFramesStream>, tonic::Status> {
        use crate::forward_stream::{reply_frame, split_request, IN_FLIGHT_MAX};
        let checking = PEER_TLS.get().is_some_and(|t| t.check_identity);
        let identity = req.extensions().get::<quorate_tls::ConnInfo>().and_then(|c| c.identity.clone());
        let from = crate::incarnation::sender(req.metadata());
        let stale = crate::incarnation::check(req.metadata()).err();
        let (raft, me, handler) = (self.raft.clone(), self.id, self.forward.clone());
        let mut requests = req.into_inner();
        // Bounded like the requests served: a caller that stops reading its answers stops
        // having requests read, rather than having answers pile up here.
        let (replies, out) = tokio::sync::mpsc::channel(IN_FLIGHT_MAX);
        let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_MAX));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else { break };
                let Ok(Some(frame)) = requests.message().await else { break };
                let Some((id, timeout, body)) = split_request(frame.data) else {
                    tracing::warn!("forwarding stream: a request frame shorter than its header; stream dropped");
                    break;
                };
                let refused = match checking {
                    true => sender_is_member(&raft, me, identity.as_deref(), from, false).err(),
                    false => None,
                }
                .or_else(|| stale.clone());
                let (handler, replies) = (handler.clone(), replies.clone());
                tokio::spawn(async move {
                    // Answered no later than its caller waits for it. The work itself runs to its
                    // end: some of it must not stop half way (a membership change is two steps
                    // driven from here), and the caller was told it may have been served.
                    let work = tokio::spawn(async move { handler.handle(body, refused).await });
                    let answer = match tokio::time::timeout(timeout, work).await {
                        Ok(Ok(answer)) => answer,
                        Ok(Err(e)) => Err(tonic::Status::internal(format!("the forwarded request failed: {e}"))),
                        Err(_) => Err(tonic::Status::deadline_exceeded("the forwarded request timed out")),
                    };
                    let _ = replies.send(Ok(Frame { data: reply_frame(id, &answer) })).await;
                    drop(permit);
                });
            }
        });
        let mut resp = tonic::Response::new(
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(out)) as Self::ForwardFramesStream
        );
        crate::incarnation::stamp_response(&mut resp);
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress() -> Arc<Mutex<Progress>> {
        Arc::new(Mutex::new(Progress { at: Instant::now(), sent_all: false }))
    }

    fn image(bytes: usize) -> Vec<u8> {
        (0..bytes).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn vote() -> Vote {
        Vote::new(1, 1)
    }

    fn frames(image: Vec<u8>, chunk_bytes: usize) -> Vec<Result<Frame, tonic::Status>> {
        snapshot_frames(vote(), SnapshotMeta::default(), image, chunk_bytes, progress()).map(Ok).collect()
    }

    async fn receive(frames: Vec<Result<Frame, tonic::Status>>) -> Result<(Vec<u8>, u64), tonic::Status> {
        let mut stream = futures::stream::iter(frames);
        receive_snapshot(&mut stream).await.map(|(_, _, image, chunks)| (image, chunks))
    }

    #[tokio::test]
    async fn a_snapshot_crosses_in_many_bounded_chunks_and_arrives_whole() {
        for (bytes, chunk) in [(100_000, 4096), (8192, 4096), (1, 4096), (0, 4096), (5000, 1)] {
            let sent = frames(image(bytes), chunk);
            assert_eq!(sent.len(), bytes.div_ceil(chunk) + 2, "header, chunks, checksum");
            let biggest = sent.iter().skip(1).map(|f| f.as_ref().unwrap().data.len()).max().unwrap();
            assert!(biggest <= chunk.max(32), "a frame of {biggest} bytes with chunks of {chunk}");
            let (got, chunks) = receive(sent).await.unwrap();
            assert_eq!(got, image(bytes));
            assert_eq!(chunks, bytes.div_ceil(chunk) as u64);
        }
    }

    #[tokio::test]
    async fn an_incomplete_or_damaged_snapshot_is_dropped() {
        let whole = frames(image(10_000), 1000);
        let n = whole.len();
        let cut = |keep: usize| whole.iter().take(keep).map(|f| Ok(f.as_ref().unwrap().clone())).collect::<Vec<_>>();

        let ended = receive(cut(n - 3)).await.unwrap_err();
        assert_eq!(ended.code(), tonic::Code::Cancelled, "{ended:?}");
        let no_trailer = receive(cut(n - 1)).await.unwrap_err();
        assert_eq!(no_trailer.code(), tonic::Code::Cancelled, "{no_trailer:?}");

        let mut flipped = cut(n);
        flipped[3].as_mut().unwrap().data[10] ^= 1;
        let damaged = receive(flipped).await.unwrap_err();
        assert!(damaged.message().contains("checksum"), "{damaged:?}");

        let mut broken = cut(n);
        broken[2] = Err(tonic::Status::unavailable("connection reset"));
        assert_eq!(receive(broken).await.unwrap_err().code(), tonic::Code::Unavailable);

        let mut long = cut(n);
        long[1].as_mut().unwrap().data.push(0);
        assert!(receive(long).await.unwrap_err().message().contains("overruns"));
    }

    #[test]
    fn the_receive_buffer_is_bounded_by_what_the_header_announced() {
        assert_eq!(
            SnapshotAssembly::new(SNAPSHOT_BYTES_MAX + 1).err(),
            Some(SnapshotRefused::TooLarge(SNAPSHOT_BYTES_MAX + 1))
        );
        let mut a = SnapshotAssembly::new(10).unwrap();
        assert_eq!(a.push(&[]), Err(SnapshotRefused::EmptyChunk));
        a.push(&[1; 6]).unwrap();
        assert_eq!(a.push(&[1; 5]), Err(SnapshotRefused::Overrun { announced: 10 }));
        assert_eq!(a.image.capacity(), 10);
        assert_eq!(a.finish(&[0; 32]), Err(SnapshotRefused::Short { received: 6, announced: 10 }));
    }

    #[test]
    fn a_sender_gives_up_on_a_transfer_that_stops_moving() {
        let t0 = Instant::now();
        let s = |n: u64| Duration::from_secs(n);
        let (stall, install) = (s(10), s(60));
        let sending = Progress { at: t0, sent_all: false };
        assert_eq!(transfer_stopped(&sending, t0 + s(10), stall, install), None);
        assert!(transfer_stopped(&sending, t0 + s(11), stall, install).unwrap().contains("stalled"));
        // After the last chunk the receiver checks and installs: only the install wait applies.
        let installing = Progress { at: t0, sent_all: true };
        assert_eq!(transfer_stopped(&installing, t0 + s(59), stall, install), None);
        assert!(transfer_stopped(&installing, t0 + s(61), stall, install).unwrap().contains("no answer"));
    }

    #[test]
    fn taking_the_last_frame_marks_the_transfer_sent() {
        let p = progress();
        let mut it = snapshot_frames(vote(), SnapshotMeta::default(), image(3000), 1000, p.clone());
        for _ in 0..4 {
            it.next().unwrap();
            assert!(!p.lock().unwrap().sent_all);
        }
        it.next().unwrap();
        assert!(p.lock().unwrap().sent_all);
        assert!(it.next().is_none());
    }
}
