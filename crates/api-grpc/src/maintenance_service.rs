//! etcd's Cluster and Maintenance services: what `member list`, `endpoint status`,
//! `endpoint hashkv` and `check perf` need.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use quorate_kv::{AlarmType, Command};
use tonic::{Request, Response, Status};

use crate::pb::etcdserverpb as pb;
use crate::status::{consensus_status, kv_status};
use crate::{Ctx, ETCD_API_VERSION};

pub struct ClusterService {
    pub ctx: Arc<Ctx>,
}

pub struct MaintenanceService {
    pub ctx: Arc<Ctx>,
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("quorate does not implement {what} yet"))
}

/// How long `MemberList` waits to catch up with the leader before asking the leader instead.
const MEMBER_LIST_CATCH_UP: std::time::Duration = std::time::Duration::from_millis(500);

/// quorate records one peer URL per member.
fn one_peer_url(urls: Vec<String>) -> Result<String, Status> {
    match <[String; 1]>::try_from(urls) {
        Ok([url]) => Ok(url),
        Err(_) => Err(consensus_status(quorate_consensus::ConsensusError::BadPeerUrls)),
    }
}

impl ClusterService {
    /// The member list once this member has applied everything committed so far, so that it
    /// reflects a change that just finished at the leader.
    async fn settled_member_list(&self) -> Result<Vec<pb::Member>, Status> {
        self.listed(true).await
    }

    /// `Member::settled_members` in etcd's message.
    async fn listed(&self, linearizable: bool) -> Result<Vec<pb::Member>, Status> {
        let members = self.ctx.member.settled_members(linearizable, MEMBER_LIST_CATCH_UP).await;
        Ok(to_pb(members.map_err(consensus_status)?))
    }

    fn member_list(&self) -> Vec<pb::Member> {
        to_pb(self.ctx.member.members())
    }
}

fn to_pb(members: Vec<quorate_consensus::MemberInfo>) -> Vec<pb::Member> {
    members
        .into_iter()
        .map(|m| pb::Member {
            id: m.id,
            name: m.name,
            peer_ur_ls: m.peer_urls,
            client_ur_ls: m.client_urls,
            is_learner: m.is_learner,
        })
        .collect()
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn member_add(&self, req: Request<pb::MemberAddRequest>) -> Result<Response<pb::MemberAddResponse>, Status> {
        self.ctx.admin(&req)?;
        let req = req.into_inner();
        let url = one_peer_url(req.peer_ur_ls)?;
        let member = &self.ctx.member;
        let id = member.add_member(url, req.is_learner).await.map_err(consensus_status)?;
        let members = self.settled_member_list().await?;
        let added = members.iter().find(|m| m.id == id).cloned();
        Ok(Response::new(pb::MemberAddResponse { header: Some(self.ctx.header()), member: added, members }))
    }
    async fn member_remove(
        &self,
        req: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        self.ctx.admin(&req)?;
        let id = req.into_inner().id;
        self.ctx.member.remove_member(id).await.map_err(consensus_status)?;
        let members = if id == self.ctx.member.id() {
            // This member is out: it receives no more of the log to settle on.
            self.member_list().into_iter().filter(|m| m.id != id).collect()
        } else {
            self.settled_member_list().await?
        };
        Ok(Response::new(pb::MemberRemoveResponse { header: Some(self.ctx.header()), members }))
    }
    async fn member_update(
        &self,
        req: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        self.ctx.admin(&req)?;
        let req = req.into_inner();
        let url = one_peer_url(req.peer_ur_ls)?;
        self.ctx.member.update_member(req.id, url).await.map_err(consensus_status)?;
        let members = self.settled_member_list().await?;
        Ok(Response::new(pb::MemberUpdateResponse { header: Some(self.ctx.header()), members }))
    }
    async fn member_list(
        &self,
        req: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        // Linearizable whether asked or not (etcd 3.5's answer): a recovery that reads the list
        // to decide its next step must not be shown a member already removed. Without a
        // leader, a request that did not ask for it is served the local view (etcd 3.4's).
        let members = self.listed(req.into_inner().linearizable).await?;
        Ok(Response::new(pb::MemberListResponse { header: Some(self.ctx.header()), members }))
    }
    async fn member_promote(
        &self,
        req: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        self.ctx.admin(&req)?;
        let id = req.into_inner().id;
        self.ctx.member.promote_member(id).await.map_err(consensus_status)?;
        let members = self.settled_member_list().await?;
        Ok(Response::new(pb::MemberPromoteResponse { header: Some(self.ctx.header()), members }))
    }
}

/// Bytes the member's data files take on disk.
fn db_size(ctx: &Ctx) -> i64 {
    quorate_consensus::data_files_bytes(&ctx.data_dir) as i64
}

fn alarm_out(a: AlarmType) -> pb::AlarmType {
    match a {
        AlarmType::NoSpace => pb::AlarmType::Nospace,
        AlarmType::Corrupt => pb::AlarmType::Corrupt,
    }
}

fn alarm_name(a: AlarmType) -> &'static str {
    match a {
        AlarmType::NoSpace => "NOSPACE",
        AlarmType::Corrupt => "CORRUPT",
    }
}

/// The response metadata of Maintenance.Status that names the member's HTTP address.
pub const HTTP_ADDR_METADATA: &str = "quorate-http-addr";

/// Bytes per `SnapshotResponse` message: under the size the codec encodes off the runtime's
/// worker, so each chunk is a plain copy on the runtime (etcd sends 32 KiB).
const SNAPSHOT_CHUNK_BYTES: usize = crate::codec::ENCODE_OFF_WORKER_BYTES / 2;

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<pb::AlarmRequest>) -> Result<Response<pb::AlarmResponse>, Status> {
        let user = self.ctx.admin(&req)?;
        let req = req.into_inner();
        let action =
            pb::alarm_request::AlarmAction::try_from(req.action).unwrap_or(pb::alarm_request::AlarmAction::Get);
        let alarm = match pb::AlarmType::try_from(req.alarm).unwrap_or(pb::AlarmType::None) {
            pb::AlarmType::Nospace => Some(AlarmType::NoSpace),
            pb::AlarmType::Corrupt => Some(AlarmType::Corrupt),
            pb::AlarmType::None => None,
        };
        let (alarms, header) = match (action, alarm) {
            (pb::alarm_request::AlarmAction::Get, _) => {
                self.ctx.member.linearize().await.map_err(consensus_status)?;
                (self.ctx.member.read(|s| s.alarms()), self.ctx.header())
            }
            (_, None) => return Err(Status::invalid_argument("etcdserver: alarm type is not provided")),
            (action, Some(alarm)) => {
                let activate = action == pb::alarm_request::AlarmAction::Activate;
                let resp = self
                    .ctx
                    .member
                    .write(self.ctx.as_user(user, Command::Alarm { activate, member: req.member_id, alarm })?)
                    .await
                    .map_err(consensus_status)?;
                if !activate {
                    tracing::warn!(member = %format!("{:x}", req.member_id), ?alarm, "alarm disarmed");
                }
                let detail = format!("by a client, for member {:x}", req.member_id);
                let name = alarm_name(alarm).to_string();
                let event = quorate_consensus::FlightEvent::Alarm { alarm: name, raised: activate, detail };
                self.ctx.member.flight().record(event);
                // etcd answers with the alarm that was acted on.
                (vec![(req.member_id, alarm)], self.ctx.header_at(resp.revision))
            }
        };
        let alarms = alarms
            .into_iter()
            .filter(|(m, _)| action != pb::alarm_request::AlarmAction::Get || req.member_id == 0 || *m == req.member_id)
            .map(|(member_id, a)| pb::AlarmMember { member_id, alarm: alarm_out(a) as i32 })
            .collect();
        Ok(Response::new(pb::AlarmResponse { header: Some(header), alarms }))
    }

    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let st = self.ctx.member.status();
        let size = db_size(&self.ctx);
        let (in_use, alarms) = self.ctx.member.read(|s| (s.bytes_in_use() as i64, s.alarms()));
        let mut errors: Vec<String> =
            alarms.iter().map(|(m, a)| format!("memberID:{} alarm:{}", m, alarm_name(*a))).collect();
        // Status is the one RPC an isolated member answers (so that `etcdctl endpoint status`
        // and `quorate ctl status` show why it refuses everything else).
        if let Some(isolation) = self.ctx.member.isolation() {
            errors.push(isolation.describe());
        }
        let mut resp = Response::new(pb::StatusResponse {
            header: Some(self.ctx.header()),
            version: ETCD_API_VERSION.into(),
            db_size: size,
            leader: st.leader.unwrap_or(0),
            raft_index: st.commit_index,
            raft_term: st.term,
            raft_applied_index: st.applied_index,
            errors,
            db_size_in_use: in_use,
            is_learner: st.is_learner,
            storage_version: String::new(),
            db_size_quota: 0,
            downgrade_info: None,
        });
        if let Some(addr) = self.ctx.http_addr.as_deref().and_then(|a| a.parse().ok()) {
            resp.metadata_mut().insert(HTTP_ADDR_METADATA, addr);
        }
        Ok(resp)
    }

    /// redb reuses freed pages itself; there is nothing to defragment. Answering success keeps
    /// `etcdctl defrag` and `check perf` working.
    async fn defragment(
        &self,
        req: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        self.ctx.admin(&req)?;
        Ok(Response::new(pb::DefragmentResponse { header: Some(self.ctx.header()) }))
    }

    async fn hash(&self, req: Request<pb::HashRequest>) -> Result<Response<pb::HashResponse>, Status> {
        self.ctx.admin(&req)?;
        let (hash, _, _) = crate::paged::hash_kv(&self.ctx.member, 0).await.map_err(kv_status)?;
        Ok(Response::new(pb::HashResponse { header: Some(self.ctx.header()), hash }))
    }

    async fn hash_kv(&self, req: Request<pb::HashKvRequest>) -> Result<Response<pb::HashKvResponse>, Status> {
        self.ctx.admin(&req)?;
        let rev = req.into_inner().revision;
        // In pages: hashing the whole keyspace must not hold the store while it reads.
        let (hash, hash_revision, compact_revision) =
            crate::paged::hash_kv(&self.ctx.member, rev).await.map_err(kv_status)?;
        Ok(Response::new(pb::HashKvResponse { header: Some(self.ctx.header()), hash, compact_revision, hash_revision }))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(&self, req: Request<pb::SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        self.ctx.admin(&req)?;
        // The image is taken at one revision (copied in pages, so apply never waits for more
        // than one), encoded off the runtime's threads, then streamed.
        let (file, revision) = crate::paged::snapshot_file(&self.ctx.member).await.map_err(crate::kv_status)?;
        let header = self.ctx.header_at(revision);
        let total = file.len();
        let chunks: Vec<Result<pb::SnapshotResponse, Status>> = file
            .chunks(SNAPSHOT_CHUNK_BYTES)
            .scan(0usize, |sent, chunk| {
                *sent += chunk.len();
                Some(Ok(pb::SnapshotResponse {
                    header: Some(header),
                    remaining_bytes: (total - *sent) as u64,
                    blob: chunk.to_vec(),
                    version: crate::ETCD_API_VERSION.to_string(),
                }))
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn move_leader(
        &self,
        req: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        self.ctx.admin(&req)?;
        let target = req.into_inner().target_id;
        match self.ctx.member.transfer_leader(target).await {
            Ok(()) => Ok(Response::new(pb::MoveLeaderResponse { header: Some(self.ctx.header()) })),
            // MoveLeader must be sent to the leader itself, as with etcd.
            Err(quorate_consensus::ConsensusError::NotLeader) => {
                Err(Status::failed_precondition("etcdserver: not leader"))
            }
            Err(e) => Err(consensus_status(e)),
        }
    }

    async fn downgrade(&self, _: Request<pb::DowngradeRequest>) -> Result<Response<pb::DowngradeResponse>, Status> {
        Err(unimplemented("Downgrade"))
    }
}
