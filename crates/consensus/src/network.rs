//! Peer transport: openraft's RPCs over gRPC (tonic, HTTP/2), one lazily connected channel per
//! peer. Payloads are bincode; both ends always run the same build.

use std::future::Future;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

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
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::pb::peer_client::PeerClient;
use crate::pb::Frame;
use crate::types::{MemberNode, NodeId, SnapshotMeta, TypeConfig, Vote};

/// Largest peer message, in bytes: a whole snapshot travels in one frame.
pub const PEER_MESSAGE_BYTES_MAX: usize = 1 << 30;

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

/// Builds a channel to a peer's URL. Connection happens on first use and is retried by tonic.
pub fn channel_to(peer_url: &str) -> Result<Channel, String> {
    let ep = Endpoint::from_shared(peer_url.to_string()).map_err(|e| format!("bad peer url {peer_url}: {e}"))?;
    Ok(ep
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

#[derive(Clone)]
pub struct NetworkFactory {
    /// How long outstanding pipelined appends may go unanswered before the follower is
    /// reported unreachable: one election timeout, not openraft's per-RPC heartbeat TTL, which a
    /// loaded follower's fsync can exceed without anything being wrong.
    pub stall_timeout: Duration,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &MemberNode) -> Self::Network {
        PeerNetwork {
            target,
            url: node.peer_url.clone(),
            client: channel_to(&node.peer_url).ok().map(new_client),
            stall_timeout: self.stall_timeout,
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
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    PreVote,
    Snapshot,
    TransferLeader,
}

impl PeerNetwork {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
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
            Rpc::Snapshot => client.snapshot(request).await,
            Rpc::TransferLeader => client.transfer_leader(request).await,
        };
        let frame = reply.map_err(|s| match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                RPCError::Unreachable(Unreachable::from_string(format!("member {:x}: {}", self.target, s.message())))
            }
            _ => RPCError::Network(NetworkError::from_string(format!("member {:x}: {}", self.target, s.message()))),
        })?;
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
            let unreachable = move |what: String| {
                RPCError::Unreachable(Unreachable::from_string(format!("member {target:x}: {what}")))
            };
            let Some(client) = self.client.as_mut() else {
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
                        // openraft retries a failed stream setup at once, without its backoff: pace
                        // it here, or an unreachable peer (a member added but not yet started) costs
                        // a busy loop and a flood of log lines.
                        tokio::time::sleep(STREAM_SETUP_RETRY_DELAY).await;
                        return Err(unreachable(status.message().to_string()));
                    }
                    Err(_) => return Err(unreachable("stream setup timed out".into())),
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
            Ok(Box::pin(stream) as BoxStream<'s, _>)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Rpc::Vote, &rpc, option.soft_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Rpc::PreVote, &rpc, option.soft_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: openraft::alias::SnapshotOf<TypeConfig, Self::SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let req = (vote, snapshot.meta, snapshot.snapshot.into_inner());
        // A snapshot can be large: allow it far longer than a heartbeat.
        let timeout = option.hard_ttl().max(Duration::from_secs(60));
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            res = self.call(Rpc::Snapshot, &req, timeout) => Ok(res?),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Rpc::TransferLeader, &req, option.soft_ttl()).await
    }
}

/// gRPC metadata naming the member a Raft message is for: a member refuses messages meant for
/// another, so a peer URL that points at the wrong process cannot make it vote or append.
const TO_HEADER: &str = "quorate-to";

fn addressed<T>(mut req: tonic::Request<T>, target: NodeId) -> tonic::Request<T> {
    req.metadata_mut().insert(TO_HEADER, format!("{target:x}").parse().expect("hex is valid metadata"));
    req
}

/// Receives a forwarded client request at the member that believes it leads.
pub trait ForwardHandler: Send + Sync + 'static {
    fn handle(&self, req: Vec<u8>) -> futures::future::BoxFuture<'static, Vec<u8>>;
}

/// The gRPC service every member runs on its peer URL.
pub struct PeerService {
    pub id: NodeId,
    pub raft: crate::types::Raft,
    pub forward: Arc<dyn ForwardHandler>,
}

type Reply = Result<tonic::Response<Frame>, tonic::Status>;

fn reply<T: Serialize, E: std::fmt::Display>(r: Result<T, E>) -> Reply {
    Ok(tonic::Response::new(Frame { data: encode(&r.map_err(|e| e.to_string())) }))
}

fn bad_frame(e: String) -> tonic::Status {
    tonic::Status::invalid_argument(e)
}

impl PeerService {
    fn check_addressee<T>(&self, req: &tonic::Request<T>) -> Result<(), tonic::Status> {
        let to = req.metadata().get(TO_HEADER).and_then(|v| v.to_str().ok());
        match to.map(|t| u64::from_str_radix(t, 16)) {
            Some(Ok(id)) if id == self.id => Ok(()),
            _ => Err(tonic::Status::failed_precondition(format!(
                "this is member {:x}; the message was addressed to {}",
                self.id,
                to.unwrap_or("nobody")
            ))),
        }
    }
}

#[tonic::async_trait]
impl crate::pb::peer_server::Peer for PeerService {
    async fn append(&self, req: tonic::Request<Frame>) -> Reply {
        self.check_addressee(&req)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&req.into_inner().data).map_err(bad_frame)?;
        reply(self.raft.append_entries(rpc).await)
    }

    type AppendStreamStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Frame, tonic::Status>> + Send>>;

    async fn append_stream(
        &self,
        req: tonic::Request<tonic::Streaming<Frame>>,
    ) -> Result<tonic::Response<Self::AppendStreamStream>, tonic::Status> {
        use futures::StreamExt;
        self.check_addressee(&req)?;
        // The stream ends at the first frame that cannot be read: skipping one would misalign
        // requests and results.
        let requests = req
            .into_inner()
            .map(|f| f.ok().and_then(|f| decode::<AppendEntriesRequest<TypeConfig>>(&f.data).ok()))
            .take_while(|r| futures::future::ready(r.is_some()))
            .map(|r| r.expect("take_while keeps only Some"));
        let results =
            self.raft.stream_append(requests).map(|r| Ok(Frame { data: encode(&r.map_err(|e| e.to_string())) }));
        Ok(tonic::Response::new(Box::pin(results)))
    }

    async fn vote(&self, req: tonic::Request<Frame>) -> Reply {
        self.check_addressee(&req)?;
        let rpc: VoteRequest<TypeConfig> = decode(&req.into_inner().data).map_err(bad_frame)?;
        reply(self.raft.vote(rpc).await)
    }

    async fn pre_vote(&self, req: tonic::Request<Frame>) -> Reply {
        self.check_addressee(&req)?;
        let rpc: VoteRequest<TypeConfig> = decode(&req.into_inner().data).map_err(bad_frame)?;
        reply(self.raft.pre_vote(rpc).await)
    }

    async fn snapshot(&self, req: tonic::Request<Frame>) -> Reply {
        self.check_addressee(&req)?;
        let (vote, meta, data): (Vote, SnapshotMeta, Vec<u8>) = decode(&req.into_inner().data).map_err(bad_frame)?;
        let snapshot = openraft::alias::SnapshotOf::<TypeConfig, Cursor<Vec<u8>>> { meta, snapshot: Cursor::new(data) };
        reply(self.raft.install_full_snapshot(vote, snapshot).await)
    }

    async fn transfer_leader(&self, req: tonic::Request<Frame>) -> Reply {
        self.check_addressee(&req)?;
        let rpc: TransferLeaderRequest<TypeConfig> = decode(&req.into_inner().data).map_err(bad_frame)?;
        reply(self.raft.handle_transfer_leader(rpc).await)
    }

    async fn forward(&self, req: tonic::Request<Frame>) -> Reply {
        let data = self.forward.handle(req.into_inner().data).await;
        Ok(tonic::Response::new(Frame { data }))
    }
}
