//! etcd's `v3lock` and `v3election` services, done on the server with fencing (ADR 0004).
//!
//! Both queue a key `name/<lease hex>` under the name and wait until every key created before
//! it is gone. The grant itself is a Raft transaction that checks the key still exists with
//! its create revision, so a lock whose lease expired while it waited is never granted (etcd
//! #11456). That create revision is the fencing token: responses carry it in the
//! `quorate-fence` metadata, ready to be copied onto guarded writes.

use std::sync::Arc;
use std::time::Duration;

use quorate_consensus::Applied;
use quorate_kv::auth::PermType;
use quorate_kv::{
    prefix_end, Command, CommandResponse, Compare, CompareResult, CompareTarget, KeyValue, PutRequest, RangeRequest,
    RequestOp, ResponseOp, SortOrder, SortTarget, TxnRequest,
};
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::kv_service::FENCE_HEADER;
use crate::pb::{v3electionpb as el, v3lockpb as lk};
use crate::status::{consensus_status, kv_status, ERR_REQUEST_TOO_LARGE};
use crate::Ctx;

/// How often a waiter re-reads the queue even without a wake-up (belt and braces).
const QUEUE_RECHECK: Duration = Duration::from_secs(1);

/// A queued key and its fencing token.
struct Ticket {
    key: Vec<u8>,
    token: i64,
    /// The value the key held when this campaign found it already queued.
    existing_value: Option<Vec<u8>>,
}

/// Deletes a queued key if the request is dropped (the client went away) before it was
/// granted, as etcd's client releases its key on failure.
struct ReleaseOnDrop {
    ctx: Arc<Ctx>,
    key: Option<Vec<u8>>,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let member = self.ctx.member.clone();
            tokio::spawn(async move {
                let cmd = Command::DeleteRange(quorate_kv::DeleteRangeRequest { key, ..Default::default() });
                let _ = member.write(cmd).await;
            });
        }
    }
}

fn queue_key(name: &[u8], lease: i64) -> (Vec<u8>, Vec<u8>) {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    let mut key = prefix.clone();
    key.extend_from_slice(format!("{lease:x}").as_bytes());
    (prefix, key)
}

/// With auth on, `want` on every key of lock or election `name` (`name/` and below). These
/// calls' writes are the member's own Txns, so they are checked here, at the door, only.
fn permit_name<T>(ctx: &Ctx, req: &Request<T>, name: &[u8], want: PermType) -> Result<(), Status> {
    let user = ctx.caller(req)?;
    let (prefix, _) = queue_key(name, 0);
    ctx.permit(|a| a.check(user.as_deref(), &prefix, &prefix_end(&prefix), want))
}

/// With auth on, `want` on one key (an unlock's, a leader's).
fn permit_key<T>(ctx: &Ctx, req: &Request<T>, key: &[u8], want: PermType) -> Result<(), Status> {
    let user = ctx.caller(req)?;
    ctx.permit(|a| a.check(user.as_deref(), key, &[], want))
}

fn create_rev_is(key: &[u8], rev: i64) -> Compare {
    Compare { result: CompareResult::Equal, target: CompareTarget::Create(rev), key: key.to_vec(), range_end: vec![] }
}

/// etcd's `--max-request-bytes` holds for lock and election requests too: each becomes a
/// proposal carrying its name and value.
fn refuse_too_large(ctx: &Ctx, req: &impl prost::Message) -> Result<(), Status> {
    match req.encoded_len() > ctx.max_request_bytes {
        true => Err(Status::invalid_argument(ERR_REQUEST_TOO_LARGE)),
        false => Ok(()),
    }
}

/// Every lock and election write. None may land in the registry's records (issue 11): a lock
/// or election named inside them is refused like a KV write there.
async fn txn(ctx: &Ctx, t: TxnRequest) -> Result<(quorate_kv::TxnResponse, i64), Status> {
    let cmd = Command::Txn(t);
    if let Some(refused) = quorate_registry::first_registry_write(&cmd) {
        return Err(crate::status::registry_read_only(&refused));
    }
    let resp = ctx.member.write(cmd).await.map_err(consensus_status)?;
    match resp.clone().kv_result().map_err(kv_status)? {
        CommandResponse::Txn(t) => Ok((t, resp.revision)),
        other => Err(Status::internal(format!("unexpected txn result {other:?}"))),
    }
}

/// Queue `key` (with `value`, attached to `lease`) unless it is queued already.
async fn enqueue(ctx: &Ctx, key: &[u8], lease: i64, value: &[u8]) -> Result<Ticket, Status> {
    let t = TxnRequest {
        compare: vec![create_rev_is(key, 0)],
        success: vec![RequestOp::Put(PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
            ..Default::default()
        })],
        failure: vec![RequestOp::Range(RangeRequest { key: key.to_vec(), ..Default::default() })],
    };
    let (resp, revision) = txn(ctx, t).await?;
    if resp.succeeded {
        return Ok(Ticket { key: key.to_vec(), token: revision, existing_value: None });
    }
    match resp.responses.into_iter().next() {
        Some(ResponseOp::Range(r)) if !r.kvs.is_empty() => {
            let kv = r.kvs.into_iter().next().expect("checked non-empty");
            Ok(Ticket { key: key.to_vec(), token: kv.create_revision, existing_value: Some(kv.value) })
        }
        _ => Err(Status::internal("queued key vanished between compare and read")),
    }
}

/// The newest key under `prefix` created before `token`, if any: the one to wait for.
fn predecessor(ctx: &Ctx, prefix: &[u8], token: i64) -> Result<Option<Vec<u8>>, Status> {
    let req = RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: SortOrder::Descend,
        sort_target: SortTarget::Create,
        keys_only: true,
        max_create_revision: token - 1,
        ..Default::default()
    };
    let r = ctx.member.read(|s| s.range(&req)).map_err(kv_status)?;
    Ok(r.kvs.into_iter().next().map(|kv| kv.key))
}

/// Wait until no key under `prefix` was created before `token`.
async fn wait_for_turn(ctx: &Ctx, prefix: &[u8], token: i64) -> Result<(), Status> {
    loop {
        // Subscribe before reading, so a delete between the read and the wait is not missed.
        let mut events = ctx.member.subscribe();
        ctx.member.linearize().await.map_err(consensus_status)?;
        let Some(waiting_on) = predecessor(ctx, prefix, token)? else { return Ok(()) };
        let deadline = tokio::time::Instant::now() + QUEUE_RECHECK;
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Ok(Applied::Events { events, .. })) => {
                    let gone = events.iter().any(|e| e.kind == quorate_kv::EventKind::Delete && e.kv.key == waiting_on);
                    if gone {
                        break;
                    }
                }
                Ok(Ok(Applied::Reset { .. })) | Ok(Err(broadcast::error::RecvError::Lagged(_))) | Err(_) => break,
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    return Err(Status::unavailable("etcdserver: server stopped"))
                }
            }
        }
    }
}

/// Grant `ticket` only if its key still exists with its token as create revision, decided
/// in the state machine. Returns the revision of the grant.
async fn grant(ctx: &Ctx, ticket: &Ticket, lease: i64) -> Result<i64, Status> {
    let t = TxnRequest { compare: vec![create_rev_is(&ticket.key, ticket.token)], success: vec![], failure: vec![] };
    let (resp, revision) = txn(ctx, t).await?;
    if resp.succeeded {
        return Ok(revision);
    }
    if ctx.member.read(|s| s.lease(lease).is_none()) {
        return Err(kv_status(quorate_kv::KvError::LeaseNotFound { id: lease }));
    }
    Err(Status::failed_precondition("quorate: the queued key was deleted before it was granted"))
}

/// Queue, wait, grant: the common path of Lock and Campaign.
async fn acquire(ctx: &Arc<Ctx>, name: &[u8], lease: i64, value: &[u8]) -> Result<(Ticket, i64), Status> {
    if name.is_empty() {
        return Err(kv_status(quorate_kv::KvError::EmptyKey));
    }
    let (prefix, key) = queue_key(name, lease);
    let ticket = enqueue(ctx, &key, lease, value).await?;
    let mut release = ReleaseOnDrop { ctx: ctx.clone(), key: Some(ticket.key.clone()) };
    let outcome = async {
        wait_for_turn(ctx, &prefix, ticket.token).await?;
        grant(ctx, &ticket, lease).await
    }
    .await;
    match outcome {
        Ok(revision) => {
            release.key = None;
            Ok((ticket, revision))
        }
        // `release` deletes the key on the way out, as etcd's client does on failure.
        Err(e) => Err(e),
    }
}

fn with_fence<T>(mut resp: Response<T>, key: &[u8], token: i64) -> Response<T> {
    if let Ok(v) = format!("{}@{token}", String::from_utf8_lossy(key)).parse() {
        resp.metadata_mut().insert(FENCE_HEADER, v);
    }
    resp
}

pub struct LockService {
    pub ctx: Arc<Ctx>,
}

#[tonic::async_trait]
impl lk::lock_server::Lock for LockService {
    async fn lock(&self, req: Request<lk::LockRequest>) -> Result<Response<lk::LockResponse>, Status> {
        permit_name(&self.ctx, &req, &req.get_ref().name, PermType::ReadWrite)?;
        let req = req.into_inner();
        refuse_too_large(&self.ctx, &req)?;
        let (ticket, revision) = acquire(&self.ctx, &req.name, req.lease, b"").await?;
        let resp = lk::LockResponse { header: Some(self.ctx.header_at(revision)), key: ticket.key.clone() };
        Ok(with_fence(Response::new(resp), &ticket.key, ticket.token))
    }

    async fn unlock(&self, req: Request<lk::UnlockRequest>) -> Result<Response<lk::UnlockResponse>, Status> {
        permit_key(&self.ctx, &req, &req.get_ref().key, PermType::Write)?;
        let key = req.into_inner().key;
        if key.is_empty() {
            return Err(kv_status(quorate_kv::KvError::EmptyKey));
        }
        let cmd = Command::DeleteRange(quorate_kv::DeleteRangeRequest { key, ..Default::default() });
        if let Some(refused) = quorate_registry::first_registry_write(&cmd) {
            return Err(crate::status::registry_read_only(&refused));
        }
        let resp = self.ctx.member.write(cmd).await.map_err(consensus_status)?;
        resp.clone().kv_result().map_err(kv_status)?;
        Ok(Response::new(lk::UnlockResponse { header: Some(self.ctx.header_at(resp.revision)) }))
    }
}

pub struct ElectionService {
    pub ctx: Arc<Ctx>,
}

const ERR_NOT_LEADER: &str = "election: not leader";
const ERR_NO_LEADER: &str = "election: no leader";

/// The current leader of election `name`: the oldest key under its prefix.
fn leader_of(ctx: &Ctx, name: &[u8]) -> Result<(Option<KeyValue>, i64), Status> {
    let (prefix, _) = queue_key(name, 0);
    let req = RangeRequest {
        key: prefix.clone(),
        range_end: prefix_end(&prefix),
        limit: 1,
        sort_order: SortOrder::Ascend,
        sort_target: SortTarget::Create,
        ..Default::default()
    };
    let (r, rev) = ctx.member.read(|s| (s.range(&req), s.revision()));
    Ok((r.map_err(kv_status)?.kvs.into_iter().next(), rev))
}

type ObserveStream = tokio_stream::wrappers::ReceiverStream<Result<el::LeaderResponse, Status>>;

#[tonic::async_trait]
impl el::election_server::Election for ElectionService {
    async fn campaign(&self, req: Request<el::CampaignRequest>) -> Result<Response<el::CampaignResponse>, Status> {
        permit_name(&self.ctx, &req, &req.get_ref().name, PermType::ReadWrite)?;
        let req = req.into_inner();
        refuse_too_large(&self.ctx, &req)?;
        let (ticket, mut revision) = acquire(&self.ctx, &req.name, req.lease, &req.value).await?;
        if ticket.existing_value.as_ref().is_some_and(|v| *v != req.value) {
            revision = proclaim(&self.ctx, &ticket.key, ticket.token, req.lease, req.value).await?;
        }
        let leader = el::LeaderKey { name: req.name, key: ticket.key.clone(), rev: ticket.token, lease: req.lease };
        let resp = el::CampaignResponse { header: Some(self.ctx.header_at(revision)), leader: Some(leader) };
        Ok(with_fence(Response::new(resp), &ticket.key, ticket.token))
    }

    async fn proclaim(&self, req: Request<el::ProclaimRequest>) -> Result<Response<el::ProclaimResponse>, Status> {
        let key = req.get_ref().leader.as_ref().map(|l| l.key.clone()).unwrap_or_default();
        permit_key(&self.ctx, &req, &key, PermType::Write)?;
        let req = req.into_inner();
        refuse_too_large(&self.ctx, &req)?;
        let leader = req.leader.ok_or_else(|| Status::unknown(ERR_NOT_LEADER))?;
        let revision = proclaim(&self.ctx, &leader.key, leader.rev, leader.lease, req.value).await?;
        Ok(Response::new(el::ProclaimResponse { header: Some(self.ctx.header_at(revision)) }))
    }

    async fn leader(&self, req: Request<el::LeaderRequest>) -> Result<Response<el::LeaderResponse>, Status> {
        permit_name(&self.ctx, &req, &req.get_ref().name, PermType::Read)?;
        let name = req.into_inner().name;
        self.ctx.member.linearize().await.map_err(consensus_status)?;
        match leader_of(&self.ctx, &name)? {
            (Some(kv), rev) => Ok(Response::new(el::LeaderResponse {
                header: Some(self.ctx.header_at(rev)),
                kv: Some(convert::kv_out(kv)),
            })),
            (None, _) => Err(Status::unknown(ERR_NO_LEADER)),
        }
    }

    type ObserveStream = ObserveStream;

    async fn observe(&self, req: Request<el::LeaderRequest>) -> Result<Response<Self::ObserveStream>, Status> {
        permit_name(&self.ctx, &req, &req.get_ref().name, PermType::Read)?;
        let name = req.into_inner().name;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let ctx = self.ctx.clone();
        ctx.member.linearize().await.map_err(consensus_status)?;
        tokio::spawn(async move {
            if let Err(e) = observe(&ctx, &name, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(ObserveStream::new(rx)))
    }

    async fn resign(&self, req: Request<el::ResignRequest>) -> Result<Response<el::ResignResponse>, Status> {
        let key = req.get_ref().leader.as_ref().map(|l| l.key.clone()).unwrap_or_default();
        permit_key(&self.ctx, &req, &key, PermType::Write)?;
        let leader = req.into_inner().leader.ok_or_else(|| Status::unknown(ERR_NOT_LEADER))?;
        let t = TxnRequest {
            compare: vec![create_rev_is(&leader.key, leader.rev)],
            success: vec![RequestOp::DeleteRange(quorate_kv::DeleteRangeRequest {
                key: leader.key,
                ..Default::default()
            })],
            failure: vec![],
        };
        let (_, revision) = txn(&self.ctx, t).await?;
        Ok(Response::new(el::ResignResponse { header: Some(self.ctx.header_at(revision)) }))
    }
}

/// Set the leader's value, only while `key` is still the one created at `rev`.
async fn proclaim(ctx: &Ctx, key: &[u8], rev: i64, lease: i64, value: Vec<u8>) -> Result<i64, Status> {
    let t = TxnRequest {
        compare: vec![create_rev_is(key, rev)],
        success: vec![RequestOp::Put(PutRequest { key: key.to_vec(), value, lease, ..Default::default() })],
        failure: vec![],
    };
    let (resp, revision) = txn(ctx, t).await?;
    if !resp.succeeded {
        return Err(Status::unknown(ERR_NOT_LEADER));
    }
    Ok(revision)
}

/// Send the election's leader whenever it changes (a new key, or a new value of the same key),
/// replaying every applied revision in order so no leader in between is skipped.
async fn observe(
    ctx: &Ctx,
    name: &[u8],
    tx: &tokio::sync::mpsc::Sender<Result<el::LeaderResponse, Status>>,
) -> Result<(), Status> {
    let (prefix, _) = queue_key(name, 0);
    let mut last_sent: Option<(Vec<u8>, i64)> = None;
    'resync: loop {
        let mut events = ctx.member.subscribe();
        // Every queued key under the name, by create revision.
        let req = RangeRequest { key: prefix.clone(), range_end: prefix_end(&prefix), ..Default::default() };
        let (r, mut at) = ctx.member.read(|s| (s.range(&req), s.revision()));
        let mut queue: std::collections::BTreeMap<i64, KeyValue> =
            r.map_err(kv_status)?.kvs.into_iter().map(|kv| (kv.create_revision, kv)).collect();
        loop {
            if let Some(kv) = queue.values().next() {
                let id = (kv.key.clone(), kv.mod_revision);
                if last_sent.as_ref() != Some(&id) {
                    let resp =
                        el::LeaderResponse { header: Some(ctx.header_at(at)), kv: Some(convert::kv_out(kv.clone())) };
                    if tx.send(Ok(resp)).await.is_err() {
                        return Ok(());
                    }
                    last_sent = Some(id);
                }
            }
            let batch = tokio::select! {
                r = events.recv() => r,
                _ = tx.closed() => return Ok(()),
            };
            match batch {
                Ok(Applied::Events { revision, events }) if revision > at => {
                    at = revision;
                    for e in events.iter().filter(|e| e.kv.key.starts_with(&prefix)) {
                        match e.kind {
                            quorate_kv::EventKind::Put => {
                                queue.insert(e.kv.create_revision, (*e.kv).clone());
                            }
                            quorate_kv::EventKind::Delete => {
                                queue.retain(|_, kv| kv.key != e.kv.key);
                            }
                        }
                    }
                }
                Ok(Applied::Events { .. }) => {}
                Ok(Applied::Reset { .. }) | Err(broadcast::error::RecvError::Lagged(_)) => continue 'resync,
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(Status::unavailable("etcdserver: server stopped"))
                }
            }
        }
    }
}

pub fn lock_server(ctx: Arc<Ctx>) -> lk::lock_server::LockServer<LockService> {
    lk::lock_server::LockServer::new(LockService { ctx })
}

pub fn election_server(ctx: Arc<Ctx>) -> el::election_server::ElectionServer<ElectionService> {
    el::election_server::ElectionServer::new(ElectionService { ctx })
}
