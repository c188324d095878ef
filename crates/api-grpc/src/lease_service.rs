//! etcd's Lease service. Grants and revokes go through Raft; keepalives go to the leader's
//! lease clock and are never logged one by one.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use quorate_kv::{Command, CommandResponse};
use tonic::{Request, Response, Status, Streaming};

use crate::pb::etcdserverpb as pb;
use crate::status::{consensus_status, kv_status};
use crate::Ctx;

pub struct LeaseService {
    pub ctx: Arc<Ctx>,
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::lease_server::Lease for LeaseService {
    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let asked_at = std::time::Instant::now();
        let user = self.ctx.caller(&req)?;
        let req = req.into_inner();
        let ttl_s = req.ttl.max(self.ctx.min_lease_ttl_s);
        let cmd = self.ctx.as_user(user, Command::LeaseGrant { id: req.id, ttl_s })?;
        let resp = self.ctx.member.write(cmd).await.map_err(consensus_status)?;
        let revision = resp.revision;
        match resp.kv_result().map_err(kv_status)? {
            CommandResponse::LeaseGrant { id, ttl_s } => Ok(Response::new(pb::LeaseGrantResponse {
                header: Some(self.ctx.header_at(revision)),
                id,
                ttl: promised_ttl_s(ttl_s, asked_at.elapsed()),
                error: String::new(),
            })),
            other => Err(Status::internal(format!("unexpected grant result {other:?}"))),
        }
    }

    async fn lease_revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let user = self.ctx.caller(&req)?;
        let id = req.into_inner().id;
        let cmd = self.ctx.as_user(user, Command::LeaseRevoke { id })?;
        let resp = self.ctx.member.write(cmd).await.map_err(consensus_status)?;
        let revision = resp.revision;
        resp.kv_result().map_err(kv_status)?;
        Ok(Response::new(pb::LeaseRevokeResponse { header: Some(self.ctx.header_at(revision)) }))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        self.ctx.authenticated(&req)?;
        let ctx = self.ctx.clone();
        let input = req.into_inner();
        let out = input.then(move |r| {
            let ctx = ctx.clone();
            async move {
                let id = r?.id;
                // Unknown leases answer TTL 0, as etcd does; the client treats that as expired.
                let ttl = ctx.member.lease_keepalive(id).await.map_err(consensus_status)?.unwrap_or(0);
                Ok(pb::LeaseKeepAliveResponse { header: Some(ctx.header()), id, ttl })
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let user = self.ctx.authenticated(&req)?;
        let req = req.into_inner();
        let remaining = self.ctx.member.lease_remaining_s(req.id).await.map_err(consensus_status)?;
        // Granted TTL and keys come from the local store: bring it up to the leader's first, or
        // a lagging follower could call a just-granted lease expired.
        self.ctx.member.linearize().await.map_err(consensus_status)?;
        let lease = self.ctx.member.read(|s| s.lease(req.id).cloned());
        if let (true, Some(lease)) = (req.keys, &lease) {
            // Its keys are shown only to a user who may read every one of them.
            self.ctx.permit(|a| {
                lease.keys.iter().try_for_each(|k| a.check(user.as_deref(), k, &[], quorate_kv::auth::PermType::Read))
            })?;
        }
        let header = Some(self.ctx.header());
        let (Some(ttl), Some(lease)) = (remaining, lease) else {
            // etcd answers a missing lease with TTL -1 rather than an error.
            return Ok(Response::new(pb::LeaseTimeToLiveResponse {
                header,
                id: req.id,
                ttl: -1,
                granted_ttl: 0,
                keys: vec![],
            }));
        };
        Ok(Response::new(pb::LeaseTimeToLiveResponse {
            header,
            id: req.id,
            ttl,
            granted_ttl: lease.ttl_s,
            keys: if req.keys { lease.keys.into_iter().collect() } else { vec![] },
        }))
    }

    async fn lease_leases(
        &self,
        req: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        self.ctx.authenticated(&req)?;
        self.ctx.member.linearize().await.map_err(consensus_status)?;
        let leases = self.ctx.member.read(|s| s.leases().map(|l| pb::LeaseStatus { id: l.id }).collect());
        Ok(Response::new(pb::LeaseLeasesResponse { header: Some(self.ctx.header()), leases }))
    }
}

/// The TTL a grant's answer may promise after `elapsed` since the request arrived. Every member
/// counts the lease from when it applied the grant (after the request arrived) plus the TTL plus
/// a slack (ADR 0008); an answer that took longer than the keep-alive's answer window to leave
/// (a stalled member, a slow forward) promises that much less, so it never outlives the members'
/// deadlines, with the rest of the slack left for the last hop to the client.
fn promised_ttl_s(ttl_s: i64, elapsed: std::time::Duration) -> i64 {
    let late = elapsed.saturating_sub(quorate_consensus::LEASE_ANSWER_WINDOW);
    (ttl_s - late.as_millis().div_ceil(1000).min(i64::MAX as u128) as i64).max(0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::promised_ttl_s;

    #[test]
    fn a_grant_answered_late_promises_only_what_is_left() {
        let ms = Duration::from_millis;
        let slack = quorate_consensus::LEASE_ANSWER_WINDOW;
        assert_eq!(promised_ttl_s(10, ms(3)), 10);
        assert_eq!(promised_ttl_s(10, slack), 10);
        assert_eq!(promised_ttl_s(10, slack + ms(1)), 9);
        assert_eq!(promised_ttl_s(10, slack + ms(2_500)), 7);
        assert_eq!(promised_ttl_s(2, slack + ms(5_000)), 0);
    }
}
