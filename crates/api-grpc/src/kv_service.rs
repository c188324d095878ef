//! etcd's KV service: Range, Put, DeleteRange, Txn, Compact.

use std::sync::Arc;

use prost::Message;
use quorate_kv::{Command, CommandResponse, Fence};
use tonic::{Request, Response, Status};

use crate::convert;
use crate::pb::etcdserverpb as pb;
use crate::status::{consensus_status, kv_status, registry_read_only, ERR_BAD_FENCE, ERR_REQUEST_TOO_LARGE};
use crate::Ctx;

pub struct KvService {
    pub ctx: Arc<Ctx>,
}

/// gRPC metadata that guards a write with a lock or election key (ADR 0004).
pub const FENCE_HEADER: &str = "quorate-fence";

/// The fence a request carries, if any.
pub fn fence_of(meta: &tonic::metadata::MetadataMap) -> Result<Option<Fence>, Status> {
    let Some(v) = meta.get(FENCE_HEADER) else { return Ok(None) };
    let s = v.to_str().map_err(|_| Status::invalid_argument(ERR_BAD_FENCE))?;
    Fence::parse(s).map(Some).ok_or_else(|| Status::invalid_argument(ERR_BAD_FENCE))
}

impl KvService {
    /// Replicate a command, guarded by `fence` if given; returns its result and the revision
    /// after it.
    async fn write(
        &self,
        user: Option<String>,
        cmd: Command,
        fence: Option<Fence>,
        size: usize,
    ) -> Result<(CommandResponse, pb::ResponseHeader), Status> {
        if size > self.ctx.max_request_bytes {
            return Err(Status::invalid_argument(ERR_REQUEST_TOO_LARGE));
        }
        if let Some(refused) = quorate_registry::first_registry_write(&cmd) {
            return Err(registry_read_only(&refused));
        }
        self.ctx.refuse_learner()?;
        let cmd = self.ctx.as_user(user, cmd.fenced(fence))?;
        let resp = self.ctx.member.write(cmd).await.map_err(consensus_status)?;
        let header = self.ctx.header_at(resp.revision);
        let result = resp.kv_result().map_err(kv_status)?;
        Ok((result, header))
    }
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn range(&self, req: Request<pb::RangeRequest>) -> Result<Response<pb::RangeResponse>, Status> {
        let user = self.ctx.caller(&req)?;
        let req = req.into_inner();
        if req.key.is_empty() {
            return Err(kv_status(quorate_kv::KvError::EmptyKey));
        }
        if !req.serializable {
            self.ctx.refuse_learner()?;
            if !self.ctx.unsafe_local_reads {
                self.ctx.member.linearize().await.map_err(consensus_status)?;
            }
        }
        // Checked after the read index: against the auth store as of the read, so a revocation
        // committed before it is seen.
        self.ctx.permit_read(user.as_deref(), &req.key, &req.range_end)?;
        let range = convert::range_in(req);
        // In pages: a Range over the whole keyspace must not hold the store while it reads.
        // The header is made here, not in the slow lane: it reads Raft's state, whose lock the
        // Raft core takes.
        let out = |result, rev| (convert::range_out(result, Default::default()), rev);
        let (mut resp, rev) = crate::paged::range(&self.ctx.member, &range, out).await.map_err(kv_status)?;
        resp.header = Some(self.ctx.header_at(rev));
        Ok(Response::new(resp))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let fence = fence_of(req.metadata())?;
        let user = self.ctx.caller(&req)?;
        let req = req.into_inner();
        let size = req.encoded_len();
        match self.write(user, Command::Put(convert::put_in(req)), fence, size).await? {
            (CommandResponse::Put(p), h) => Ok(Response::new(convert::put_out(p, h))),
            other => Err(Status::internal(format!("unexpected put result {other:?}"))),
        }
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let fence = fence_of(req.metadata())?;
        let user = self.ctx.caller(&req)?;
        let req = req.into_inner();
        let size = req.encoded_len();
        match self.write(user, Command::DeleteRange(convert::delete_in(req)), fence, size).await? {
            (CommandResponse::DeleteRange(d), h) => Ok(Response::new(convert::delete_out(d, h))),
            other => Err(Status::internal(format!("unexpected delete result {other:?}"))),
        }
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let fence = fence_of(req.metadata())?;
        let user = self.ctx.caller(&req)?;
        let req = req.into_inner();
        let size = req.encoded_len();
        if convert::has_empty_op(&req) {
            return Err(kv_status(quorate_kv::KvError::KeyNotFound));
        }
        let txn = convert::txn_in(req);
        // etcd's checks before anything runs or reaches the log: op budget, keys, overlapping
        // writes. One pass over the request, whatever its nesting.
        quorate_kv::check_txn_request(&txn, self.ctx.max_txn_ops, &mut 0).map_err(kv_status)?;
        // A Txn that writes nothing is a linearizable read, as in etcd: no log entry. A fenced
        // one goes through the log, so the fence is checked where it is applied.
        if !quorate_kv::txn_writes(&txn) && fence.is_none() {
            self.ctx.refuse_learner()?;
            self.ctx.member.linearize().await.map_err(consensus_status)?;
            // Every compare and every read of both branches, as for a write.
            self.ctx.authorize(|s| s.authorize_txn(user.as_deref(), &txn))?;
            // Branches chosen under the lock; then each Range read in pages at the Txn's
            // revision, so a Txn of 128 whole-keyspace Ranges does not hold the store either.
            let path = self.ctx.member.read(|s| s.read_only_txn_path(&txn));
            let (path, rev) = path.expect("checked read-only").map_err(kv_status)?;
            let mut ranges = Vec::new();
            for r in quorate_kv::read_only_txn_ranges(&txn, &path, rev) {
                ranges.push(crate::paged::range(&self.ctx.member, &r, |resp, _| resp).await.map_err(kv_status)?);
            }
            let result = quorate_kv::read_only_txn_response(&txn, &path, ranges);
            return Ok(Response::new(convert::txn_out(result, &self.ctx.header_at(rev))));
        }
        match self.write(user, Command::Txn(txn), fence, size).await? {
            (CommandResponse::Txn(t), h) => Ok(Response::new(convert::txn_out(t, &h))),
            other => Err(Status::internal(format!("unexpected txn result {other:?}"))),
        }
    }

    async fn compact(&self, req: Request<pb::CompactionRequest>) -> Result<Response<pb::CompactionResponse>, Status> {
        let user = self.ctx.caller(&req)?;
        let req = req.into_inner();
        let cmd = Command::Compact { revision: req.revision, physical: req.physical };
        let (_, h) = self.write(user, cmd, None, 0).await?;
        Ok(Response::new(pb::CompactionResponse { header: Some(h) }))
    }
}
