//! Consensus for quorate: the only crate that imports openraft.
//!
//! It owns the Raft member (type config, durable log and state machine on redb, peer
//! transport), forwarding of leader-only requests from followers, linearizable reads by
//! ReadIndex (never by leader lease), and the leader's lease clock. It must never serve a
//! linearizable read without a ReadIndex round, and never let anything but the current,
//! quorum-connected leader decide a side effect.

pub mod backup;
mod campaign;
mod diagnostics;
mod error;
pub mod failpoint;
pub mod flight;
mod forward_stream;
pub mod incarnation;
pub mod isolation;
mod lease;
mod log_store;
mod membership;
pub mod metrics;
mod network;
mod observe;
pub mod passwords;
pub mod recovery;
mod state_machine;
mod status_watch;
mod types;
mod votes;

pub mod pb {
    tonic::include_proto!("quorate.peer");
}

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::rt::{Instant as _, WatchReceiver as _};
use openraft::{ReadPolicy, ServerState, SnapshotPolicy};
use quorate_kv::{Command, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tracing::{info, warn};

pub use error::ConsensusError;

/// Whether a data directory holds a member's Raft log (of this version or an older one).
pub fn has_raft_log(data_dir: &std::path::Path) -> bool {
    log_store::exists(data_dir)
}

/// Bytes a data directory's database files take on disk (the Raft log, the state file and the
/// snapshot image), as etcd's `db` file size.
pub fn data_files_bytes(data_dir: &std::path::Path) -> u64 {
    let images = std::fs::read_dir(data_dir.join(state_machine::IMAGES_DIR)).into_iter().flatten().flatten();
    log_store::disk_bytes(data_dir)
        + std::fs::metadata(data_dir.join("state.redb")).map_or(0, |m| m.len())
        + images.map(|f| f.metadata().map_or(0, |m| m.len())).sum::<u64>()
}
pub use flight::{Event as FlightEvent, Record as FlightRecord, Recorder as FlightRecorder};
pub use isolation::Isolation;
pub use lease::core::ANSWER_WINDOW as LEASE_ANSWER_WINDOW;
pub use lease::plant_early_lease_expiry;
pub use membership::learner_ready;
pub use metrics::ConsensusMetrics;
pub use network::{
    channel_to, peer_tls, set_peer_tls, set_snapshot_chunk_bytes, vote_frame, PeerService, PEER_MESSAGE_BYTES_MAX,
};
pub use state_machine::{Applied, ApplyObserver, PublishedMember};
pub use types::{MemberNode, NodeId, Request, Response, TypeConfig};

pub use diagnostics::MemberDiagnostics;
use lease::LeaseClock;
use log_store::LogStore;
use network::{decode, encode, NetworkFactory};
use state_machine::{Shared, StateMachine};
use types::Raft;

/// How many times a keep-alive whose renewal committed too late to be promised is renewed again
/// before the client is told to retry.
const KEEPALIVE_LATE_RETRIES_MAX: usize = 3;

/// How far behind the leader's log a member may be and still be handed leadership.
pub const TRANSFER_LAG_ENTRIES_MAX: u64 = 128;

/// A write's cost, admitted under the quota until it is applied (dropped).
struct QuotaAdmitted {
    admitted: Arc<std::sync::atomic::AtomicU64>,
    cost: u64,
}

impl Drop for QuotaAdmitted {
    fn drop(&mut self) {
        self.admitted.fetch_sub(self.cost, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Everything a member needs to start.
#[derive(Clone, Debug)]
pub struct MemberConfig {
    pub id: NodeId,
    pub name: String,
    pub data_dir: PathBuf,
    pub peer_url: String,
    pub client_urls: Vec<String>,
    /// The bootstrap membership (`--initial-cluster`), used only when `new_cluster`.
    pub initial_members: BTreeMap<NodeId, MemberNode>,
    pub new_cluster: bool,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_ms: u64,
    /// Entries between snapshots; the log before a snapshot is purged.
    pub snapshot_entries: u64,
    /// `--quota-backend-bytes`: a write that would grow the keyspace past it is refused here,
    /// before it reaches the log (0: no quota).
    pub quota_bytes: u64,
    /// The cluster's id, as every response header carries it.
    pub cluster_id: u64,
    /// A member joining an existing cluster starts at the incarnation its peers told it.
    pub join_incarnation: Option<u64>,
}

/// A member's view of consensus, as `Status` and `ctl status` report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: NodeId,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub state: &'static str,
    pub last_log_index: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub is_learner: bool,
}

/// One member of the cluster as `MemberList` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: NodeId,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

#[derive(Serialize, Deserialize)]
enum ForwardReq {
    Write(Request),
    ReadIndex,
    KeepAlive(i64),
    TimeToLive(i64),
    LeaseTable,
    /// Any member's own lease marks (a new leader tightens its deadlines with them).
    LeaseMarks,
    Change(membership::Change),
    /// Which member has which peer URL (a joining member looks itself up).
    Members,
    /// The member list as the leader has it (`MemberList` on a member that could not catch up).
    MemberList,
    /// The leader tells a member it has been removed.
    Removed(NodeId),
    /// A call for the application layer on the receiving member (see `AppHandler`).
    App {
        method: String,
        payload: Vec<u8>,
    },
    /// A round trip that touches nothing: the peer prober's (etcd's `/raft/probing`).
    Probe,
}

impl ForwardReq {
    /// Where its kind is in `metrics::FORWARDED_KINDS` (the `kind` label of
    /// `quorate_server_forwarded_requests_total`).
    fn kind_index(&self) -> usize {
        match self {
            ForwardReq::Write(_) => 0,
            ForwardReq::ReadIndex => 1,
            ForwardReq::KeepAlive(_) => 2,
            ForwardReq::TimeToLive(_) => 3,
            ForwardReq::LeaseTable => 4,
            ForwardReq::LeaseMarks => 5,
            ForwardReq::Change(_) => 6,
            ForwardReq::Members => 7,
            ForwardReq::MemberList => 8,
            ForwardReq::Removed(_) => 9,
            ForwardReq::App { .. } => 10,
            ForwardReq::Probe => 11,
        }
    }
}

#[derive(Serialize, Deserialize)]
enum ForwardResp {
    Written(Response),
    ReadIndex(u64),
    Lease(Option<i64>),
    /// The leader's judgement of every lease as (id, set_at, remaining ms).
    LeaseTable(Vec<(i64, u64, i64)>),
    LeaseMarks(Vec<(i64, u64, i64)>),
    Changed(Option<NodeId>),
    /// The cluster id and every member's (id, peer URL).
    Members(u64, Vec<(NodeId, String)>),
    MemberList(Vec<MemberInfo>),
    App(Result<Vec<u8>, String>),
    Err(ConsensusError),
    /// A keep-alive's answer: the TTL promised, and the milliseconds from the request's arrival
    /// at the leader to the end of the window in which the promise may reach the client;
    /// `None` when the lease does not exist.
    KeepAlive(Option<(i64, u64)>),
    /// The prober's answer: the answering member's wall clock, in microseconds since the Unix
    /// epoch (for the clock offset operators see; nothing in consensus reads it).
    Probe(i64),
}

struct Inner {
    cfg: MemberConfig,
    raft: Raft,
    shared: Arc<Shared>,
    log: LogStore,
    clock: Arc<LeaseClock>,
    /// One forwarding stream per peer URL, opened on first use and replaced once spent
    /// (`forward_stream`).
    forwards: Mutex<HashMap<String, Arc<forward_stream::ForwardStream>>>,
    /// Peers (by URL) whose build has no forwarding streams (a rolling upgrade), and until when
    /// requests to them go as calls of their own before a stream is tried again.
    unary_until: Mutex<HashMap<String, (std::time::Instant, pb::peer_client::PeerClient<tonic::transport::Channel>)>>,
    /// A NOSPACE alarm is being proposed (`raise_no_space`).
    raising_no_space: std::sync::atomic::AtomicBool,
    /// Bytes of writes admitted under the quota and not yet applied (`admit_to_quota`).
    quota_admitted: Arc<std::sync::atomic::AtomicU64>,
    /// When a leader was last heard, and pre-votes sent (`campaign`).
    campaign: Arc<campaign::Signals>,
    /// Set once the cluster has removed this member.
    removed: tokio::sync::watch::Sender<bool>,
    /// When a follower last got an answer from the leader (lease-table sync, once a second).
    last_leader_contact: Mutex<Option<tokio::time::Instant>>,
    app_handler: Mutex<Option<Arc<dyn AppHandler>>>,
    metrics: ConsensusMetrics,
    /// Held by the leader from an isolation's quorum check to its commit (`crate::isolation`),
    /// and while a recovery plan is applied (`crate::recovery`).
    isolating: tokio::sync::Mutex<()>,
    /// Set once every other member has been probed once (answered, refused or timed out): a
    /// member a recovery dropped learns it from those refusals before it serves any client.
    probed: tokio::sync::watch::Sender<bool>,
}

/// Answers application calls from other members (`Member::call_member`).
pub trait AppHandler: Send + Sync + 'static {
    fn call(&self, method: String, payload: Vec<u8>) -> futures::future::BoxFuture<'static, Result<Vec<u8>, String>>;
}

/// This member's wall clock in microseconds since the Unix epoch (shown to people only).
fn wall_clock_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// How often each member times a round trip to every other member (etcd probes every few
/// seconds too).
const PEER_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// How long requests to a peer without forwarding streams (an older build, in a rolling
/// upgrade) go as calls of their own before a stream is tried again.
const UNARY_FORWARD_RETRY: Duration = Duration::from_secs(60);

/// Forwards `req` as a call of its own, to a peer whose build has no forwarding streams.
async fn send_forward_unary(
    mut client: pb::peer_client::PeerClient<tonic::transport::Channel>,
    req: &ForwardReq,
    timeout: Duration,
) -> Result<ForwardResp, ConsensusError> {
    let mut request = tonic::Request::new(pb::Frame { data: encode(req) });
    request.set_timeout(timeout);
    incarnation::stamp(&mut request);
    let reply = client.forward(request).await.map_err(|s| match s.code() {
        // The leader this member knows of cannot be reached: as far as clients here can tell,
        // there is no leader.
        tonic::Code::Unavailable if forward_stream::never_connected(&s) => ConsensusError::NoLeader,
        // A call's transport failing after it was sent: it may have been served.
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown => {
            incarnation::note(&s);
            ConsensusError::Timeout
        }
        _ => forward_refused(&s),
    })?;
    decode(&reply.into_inner().data).map_err(ConsensusError::Unavailable)
}

/// What a forwarded request's error status means here, by call or by stream alike.
fn forward_refused(status: &tonic::Status) -> ConsensusError {
    incarnation::note(status);
    match status.code() {
        // Past its deadline it may still have been served: not a refusal.
        tonic::Code::DeadlineExceeded => ConsensusError::Timeout,
        // The leader this member knows of cannot be reached: as far as clients here can tell,
        // there is no leader.
        tonic::Code::Unavailable => ConsensusError::NoLeader,
        _ => ConsensusError::Unavailable(status.message().to_string()),
    }
}

/// A running member. Cheap to clone.
#[derive(Clone)]
pub struct Member {
    inner: Arc<Inner>,
}

impl Member {
    /// Open the data directory, start Raft, and bootstrap the cluster if this is a new one.
    /// Returns the member and the peer service the caller must serve on its peer listener.
    pub async fn start(cfg: MemberConfig) -> Result<(Member, PeerService), String> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| format!("create {}: {e}", cfg.data_dir.display()))?;
        let log = LogStore::open(&cfg.data_dir).map_err(|e| {
            format!("open raft log in {}: {e} (is another member using this data directory?)", cfg.data_dir.display())
        })?;
        if let Some(n) = cfg.join_incarnation.filter(|n| *n > 1 && log.is_fresh()) {
            info!(incarnation = n, "joining a recovered cluster: starting at its incarnation");
            log.set_incarnation(n).await.map_err(|e| format!("write incarnation: {e}"))?;
        }
        incarnation::set(log.incarnation());
        let survivors = log.recovery_plan().map_or_else(Vec::new, |p| p.voters);
        incarnation::set_identity(cfg.id, survivors);
        let grace = Duration::from_millis(cfg.election_timeout_ms);
        let mut sm =
            StateMachine::open(&cfg.data_dir.join("state.redb"), grace).map_err(|e| format!("open state: {e}"))?;
        let shared = sm.shared.clone();
        incarnation::on_fence(shared.serving.clone());
        let flight_dir = cfg.data_dir.join("flight");
        let flight =
            flight::Recorder::open(&flight_dir, cfg.id, &cfg.name, flight::SEGMENT_BYTES_MAX).unwrap_or_else(|e| {
                warn!(error = %e, dir = %flight_dir.display(), "flight recorder off: cannot open its ring");
                flight::Recorder::off(cfg.id)
            });
        sm.flight = flight.clone();
        let metrics = ConsensusMetrics {
            flight,
            wal_fsync_seconds: log.stats.fsync_seconds.0.clone(),
            backend_commit_seconds: sm.commit_seconds.clone(),
            fencing_refusals: sm.fencing_refusals.clone(),
            ..ConsensusMetrics::default()
        };
        let raft_cfg = openraft::Config {
            cluster_name: "quorate".into(),
            heartbeat_interval: cfg.heartbeat_interval_ms,
            election_timeout_min: cfg.election_timeout_ms,
            // openraft keeps a follower loyal to its leader for `election_timeout_max` after the
            // last heartbeat (leader stickiness), and a refused candidate waits a whole new
            // timeout. A narrow randomisation band keeps failover near two election timeouts.
            election_timeout_max: cfg.election_timeout_ms * 5 / 4,
            enable_pre_vote: Some(true),
            // The state machine is rebuilt from snapshot + log on start, and the commit index
            // is persisted lazily: a restarted leader must win a fresh election, never resume.
            enable_leader_restore: Some(false),
            // Replicate entries as soon as they are handed to the log writer, so the leader's
            // fsync and the followers' run in parallel. The leader still counts itself towards
            // a quorum only once its own write is durable.
            broadcast_submitted_on_append: Some(true),
            // A member whose log's tail was torn or corrupt comes back with a shorter log than
            // it had acknowledged (ADR 0011). The leader must replicate to it again from where
            // it really is, not stop: without this openraft treats the shorter log as a bug
            // (t31_wal_tails caught a leader's core panicking on it).
            allow_log_reversion: Some(true),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_entries),
            max_in_snapshot_log_to_keep: cfg.snapshot_entries / 5,
            replication_lag_threshold: cfg.snapshot_entries * 2,
            install_snapshot_timeout: cfg.election_timeout_ms.max(1000) * 10,
            ..Default::default()
        };
        let raft_cfg = Arc::new(raft_cfg.validate().map_err(|e| format!("raft config: {e}"))?);
        let leader_lease = Duration::from_millis(raft_cfg.election_timeout_max);
        let campaign = Arc::new(campaign::Signals::default());
        let network = NetworkFactory {
            stall_timeout: Duration::from_millis(cfg.election_timeout_ms),
            metrics: metrics.clone(),
            campaign: campaign.clone(),
        };
        let raft =
            Raft::new(cfg.id, raft_cfg, network, log.clone(), sm).await.map_err(|e| format!("start raft: {e}"))?;
        // Watched from before the bootstrap: `initialize` may elect this member at once, and a
        // watcher started after that would take the won election for history.
        tokio::spawn(observe::watch(raft.clone(), cfg.id, metrics.clone()));
        if cfg.new_cluster && !raft.is_initialized().await.map_err(|e| e.to_string())? {
            info!(members = cfg.initial_members.len(), "bootstrapping a new cluster");
            if let Err(e) = raft.initialize(cfg.initial_members.clone()).await {
                // Another member may have initialized us first; that is fine.
                warn!(error = %e, "initialize");
            }
        }
        let clock = LeaseClock::new(grace);
        let member = Member {
            inner: Arc::new(Inner {
                cfg,
                raft: raft.clone(),
                shared: shared.clone(),
                log,
                clock: clock.clone(),
                forwards: Mutex::new(HashMap::new()),
                unary_until: Mutex::new(HashMap::new()),
                raising_no_space: Default::default(),
                quota_admitted: Default::default(),
                campaign: campaign.clone(),
                removed: tokio::sync::watch::channel(false).0,
                last_leader_contact: Mutex::new(None),
                app_handler: Mutex::new(None),
                metrics,
                isolating: tokio::sync::Mutex::new(()),
                probed: tokio::sync::watch::Sender::new(false),
            }),
        };
        tokio::spawn(clock.run(raft.clone(), shared, member.metrics().clone()));
        tokio::spawn(member.clone().publish_self());
        tokio::spawn(member.clone().sync_lease_table());
        tokio::spawn(member.clone().tighten_leases_on_election());
        tokio::spawn(member.clone().promote_caught_up());
        tokio::spawn(member.clone().probe_peers());
        tokio::spawn(member.clone().track_freshness());
        tokio::spawn(member.clone().stop_campaigning_when_fenced());
        tokio::spawn(member.clone().campaign_promptly(leader_lease));
        let service = PeerService {
            id: member.id(),
            raft,
            forward: Arc::new(member.clone()),
            metrics: member.metrics().clone(),
            campaign,
            stall_warning: Duration::from_millis(member.inner.cfg.election_timeout_ms / 2),
        };
        Ok((member, service))
    }

    /// One election timeout.
    pub(crate) fn election_timeout(&self) -> Duration {
        Duration::from_millis(self.inner.cfg.election_timeout_ms)
    }

    pub fn id(&self) -> NodeId {
        self.inner.cfg.id
    }

    pub fn cluster_id(&self) -> u64 {
        self.inner.cfg.cluster_id
    }

    /// Announce our client URLs through the log until it sticks (etcd's publish).
    async fn publish_self(self) {
        let cfg = &self.inner.cfg;
        let req = Request::PublishMember { id: cfg.id, name: cfg.name.clone(), client_urls: cfg.client_urls.clone() };
        loop {
            if self.is_published() {
                return;
            }
            match self.propose(req.clone()).await {
                Ok(_) => {
                    info!(name = %cfg.name, "published member attributes");
                    return;
                }
                Err(ConsensusError::Stopped(_)) => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Wait until this member's client URLs are in the replicated member list, as etcd does
    /// before it serves clients.
    ///
    /// And until every other member has been probed once: a member that a recovery dropped
    /// (restarted on its old data, perhaps with enough old members to elect a leader among
    /// them) learns it from the newer members' refusals before it serves anyone.
    pub async fn wait_published(&self) {
        let _ = self.inner.probed.subscribe().wait_for(|p| *p).await;
        while !self.is_published() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the replicated member list holds this member's current name and client URLs.
    fn is_published(&self) -> bool {
        let cfg = &self.inner.cfg;
        let members = self.inner.shared.members.read().unwrap();
        members.get(&cfg.id).is_some_and(|m| m.client_urls == cfg.client_urls && m.name == cfg.name)
    }

    /// On followers: copy the leader's lease deadlines once a second, so that if this member
    /// is elected it expires leases when the previous leader would have, not later.
    async fn sync_lease_table(self) {
        let mut tick = tokio::time::interval(lease::LEASE_SYNC_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let m = self.inner.raft.metrics().borrow_watched().clone();
            if m.running_state.is_err() {
                return;
            }
            if m.state == ServerState::Leader || m.current_leader.is_none() {
                continue;
            }
            let Some(leader) = self.leader_node() else { continue };
            let asked_at = tokio::time::Instant::now();
            let timeout = Duration::from_millis(self.inner.cfg.election_timeout_ms.max(100));
            let Ok(ForwardResp::LeaseTable(table)) = self.forward(&leader, &ForwardReq::LeaseTable, timeout).await
            else {
                continue;
            };
            *self.inner.last_leader_contact.lock().unwrap() = Some(asked_at);
            // A new contact is news for freshness too (`track_freshness` sees Raft's changes).
            let _ = self.staleness_ms();
            // Counted from when the answer arrived, after the leader read its clock: the copy
            // stays an upper bound on the leader's deadline. Only for the decisions we hold: a
            // table read before a renewal we already applied would shorten its promise.
            let arrived = tokio::time::Instant::now();
            self.inner.shared.leases.lock().unwrap().adopt_leader_table(&table, arrived);
        }
    }

    /// On a newly elected leader: tighten lease deadlines from the other members.
    ///
    /// A member that restarted replayed its log "now", so its marks count whole TTLs from the
    /// restart; if it wins the next election before it has copied a leader's table, abandoned
    /// leases would outlive TTL + election timeout by as long as it was down. Every member's
    /// mark is an upper bound on the deadline decided at the mark's log index, so for each
    /// lease where a peer holds the same index, the earliest of those bounds is still an upper
    /// bound: never early, and as tight as the best-informed member.
    async fn tighten_leases_on_election(self) {
        // Server metrics change with the role, leader, vote and membership only; the full
        // metrics change on every write, and watching them cost every member a wake-up and a
        // copy of the metrics per write.
        let mut server = self.inner.raft.server_metrics();
        let mut tightened_term = 0;
        loop {
            let (leading, term) = {
                let s = server.borrow_watched();
                (s.state == ServerState::Leader, s.vote.leader_id().term)
            };
            if leading && term != tightened_term {
                tightened_term = term;
                let m = self.inner.raft.metrics().borrow_watched().clone();
                if m.running_state.is_err() {
                    return;
                }
                self.tighten_leases(&m).await;
            }
            if server.changed().await.is_err() {
                return;
            }
        }
    }

    async fn tighten_leases(&self, m: &openraft::RaftMetrics<TypeConfig>) {
        // Wait (briefly) until everything committed before our election is applied here, so
        // our marks name the newest grant or checkpoint of each lease.
        let timeout = Duration::from_millis(self.inner.cfg.election_timeout_ms.max(100));
        let want = m.last_log_index.unwrap_or(0);
        let wait = self.inner.raft.wait(Some(timeout));
        if wait.applied_index_at_least(Some(want), "lease tightening").await.is_err() {
            return;
        }
        let peers: Vec<MemberNode> = m
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != self.id())
            .map(|(_, n)| n.clone())
            .collect();
        let asks = peers.iter().map(|p| self.forward(p, &ForwardReq::LeaseMarks, timeout));
        let answers = futures::future::join_all(asks).await;
        let arrived = tokio::time::Instant::now();
        let mut core = self.inner.shared.leases.lock().unwrap();
        let mut tightened = 0usize;
        for answer in answers {
            let Ok(ForwardResp::LeaseMarks(theirs)) = answer else { continue };
            tightened += core.tighten(&theirs, arrived);
        }
        if tightened > 0 {
            info!(term = m.current_term, leases = tightened, "tightened lease deadlines from peers");
        }
    }

    /// This member's own lease marks as (id, set_at, remaining ms from now).
    fn lease_marks(&self) -> Vec<(i64, u64, i64)> {
        self.inner.shared.leases.lock().unwrap().table(tokio::time::Instant::now())
    }

    /// What this member measures on its consensus paths, for `/metrics`.
    pub fn metrics(&self) -> &ConsensusMetrics {
        &self.inner.metrics
    }

    /// This member's flight recorder (`flight`): record an event, read the ring.
    pub fn flight(&self) -> &flight::Recorder {
        &self.inner.metrics.flight
    }

    /// The leader as etcd's `etcd_server_has_leader` means it: one this member has heard from
    /// lately. openraft keeps naming the last leader while a follower pre-votes (the term does
    /// not move), so a member cut off from its leader would otherwise report one forever. On
    /// the leader: a quorum acknowledged it lately (etcd's leader steps down otherwise, with
    /// CheckQuorum). On a follower: the leader answered its once-a-second lease-table sync.
    pub fn live_leader(&self) -> Option<NodeId> {
        let window = Duration::from_millis(self.inner.cfg.election_timeout_ms) + 2 * lease::LEASE_SYNC_INTERVAL;
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow_watched();
        let leader = m.current_leader?;
        if m.state == ServerState::Leader {
            let alone = m.membership_config.membership().voter_ids().count() == 1;
            let acked = m.last_quorum_acked.as_ref().is_some_and(|t| t.elapsed() <= window);
            return (alone || acked).then_some(leader);
        }
        let contact = *self.inner.last_leader_contact.lock().unwrap();
        contact.filter(|t| t.elapsed() <= window).map(|_| leader)
    }

    /// (durable log commits, log entries written) since start: entries per commit is the
    /// group-commit factor.
    pub fn log_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.inner.log.stats;
        (s.durable_commits.load(Relaxed), s.entries.load(Relaxed))
    }

    /// Failpoint for drills: stall every log fsync by `ms` milliseconds.
    pub fn set_fsync_delay_ms(&self, ms: u64) {
        self.inner.log.set_fsync_delay_ms(ms);
    }

    // ---- writes ----

    /// Replicate a command and return what applying it produced. Forwarded to the leader when
    /// this member does not lead.
    pub async fn write(&self, cmd: Command) -> Result<Response, ConsensusError> {
        self.propose(Request::Kv(cmd)).await
    }

    /// etcd's quota check, on the leader: a command that may add data is refused with NOSPACE
    /// when the keyspace, with what is admitted but not yet applied, would outgrow
    /// `--quota-backend-bytes`, and the leader's NOSPACE alarm is raised (through Raft, once),
    /// after which every member refuses such writes until it is disarmed. The keyspace then
    /// holds at most the quota (plus, after a change of leader, what the old one had admitted).
    /// The guard keeps the command's cost admitted until it is applied here.
    fn admit_to_quota(&self, req: &Request) -> Result<Option<QuotaAdmitted>, Response> {
        use std::sync::atomic::Ordering;
        let quota = self.inner.cfg.quota_bytes;
        let Request::Kv(cmd) = req else { return Ok(None) };
        if quota == 0 {
            return Ok(None);
        }
        let me = self.id();
        let (cost, in_use, revision, raised) = self.read(|s| {
            let raised = s.alarms().contains(&(me, quorate_kv::AlarmType::NoSpace));
            (s.quota_cost(cmd), s.bytes_in_use(), s.revision(), raised)
        });
        let Some(cost) = cost else { return Ok(None) };
        let admitted = self.inner.quota_admitted.clone();
        let before = admitted.fetch_add(cost, Ordering::AcqRel);
        let guard = QuotaAdmitted { admitted, cost };
        if in_use.saturating_add(before).saturating_add(cost) <= quota {
            return Ok(Some(guard));
        }
        drop(guard);
        // Refused on what is admitted too, but alarmed only on what is applied: admitted writes
        // may yet fail (a compare, a fence), and the alarm stays until an operator disarms it.
        if !raised && in_use.saturating_add(cost) > quota {
            self.raise_no_space(format!(
                "{in_use} bytes in use, {before} admitted and a write of {cost} more, over the quota of {quota}"
            ));
        }
        Err(Response { revision, result: Some(Err(quorate_kv::KvError::NoSpace)) })
    }

    /// Raise this member's NOSPACE alarm through Raft, in the background; one attempt at a time.
    pub fn raise_no_space(&self, detail: String) {
        use std::sync::atomic::Ordering;
        if self.inner.raising_no_space.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(detail = %detail, "database space exceeded: raising NOSPACE alarm");
        self.flight().record(flight::Event::Alarm { alarm: "NOSPACE".into(), raised: true, detail });
        let me = self.clone();
        tokio::spawn(async move {
            let alarm = Command::Alarm { activate: true, member: me.id(), alarm: quorate_kv::AlarmType::NoSpace };
            if let Err(e) = me.propose(Request::Kv(alarm)).await {
                tracing::warn!(error = %e, "could not raise NOSPACE alarm");
            }
            me.inner.raising_no_space.store(false, Ordering::Release);
        });
    }

    async fn propose(&self, req: Request) -> Result<Response, ConsensusError> {
        let _pending = metrics::PendingGuard::new(&self.inner.metrics.proposals_pending);
        let result = self.propose_counted(req).await;
        if result.is_err() {
            self.inner.metrics.proposals_failed.inc();
        }
        result
    }

    async fn propose_counted(&self, req: Request) -> Result<Response, ConsensusError> {
        // Decide where the request goes before handing it over, so it is never copied.
        if self.is_leader() {
            let _admitted = match self.admit_to_quota(&req) {
                Ok(admitted) => admitted,
                Err(refused) => return Ok(refused),
            };
            return match self.inner.raft.client_write(req).await {
                Ok(r) => Ok(r.data),
                // Leadership moved between the check and the append; nothing was appended.
                Err(e) if e.forward_to_leader().is_some() => Err(ConsensusError::Unavailable("leader changed".into())),
                Err(e) => Err(raft_err(e)),
            };
        }
        let leader = self.leader_node().ok_or(ConsensusError::NoLeader)?;
        match self.forward(&leader, &ForwardReq::Write(req), network::FORWARD_TIMEOUT).await? {
            ForwardResp::Written(r) => Ok(r),
            ForwardResp::Err(e) => Err(e),
            _ => Err(ConsensusError::Unavailable("unexpected forward reply".into())),
        }
    }

    /// Whether this member is a learner (it receives the log but does not vote).
    pub fn is_learner(&self) -> bool {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow_watched();
        let membership = m.membership_config.membership();
        membership.get_node(&self.inner.cfg.id).is_some() && !membership.voter_ids().any(|v| v == self.inner.cfg.id)
    }

    fn is_leader(&self) -> bool {
        self.inner.raft.metrics().borrow_watched().state == ServerState::Leader
    }

    async fn forward(
        &self,
        leader: &MemberNode,
        req: &ForwardReq,
        timeout: Duration,
    ) -> Result<ForwardResp, ConsensusError> {
        self.inner.metrics.forwarded_by_kind.inc(req.kind_index());
        self.send_forward(leader, req, timeout).await
    }

    /// Every `PEER_PROBE_INTERVAL`, time a round trip to each other member over the peer
    /// channel, as etcd's prober does: `etcd_network_peer_round_trip_time_seconds{To}`. The
    /// probe is answered without touching Raft or the disk, so it measures the network and the
    /// peer's responsiveness alone; a probe that fails counts as a send failure to that peer.
    async fn probe_peers(self) {
        let mut tick = tokio::time::interval(PEER_PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let timeout = Duration::from_millis(self.inner.cfg.election_timeout_ms.max(100));
        loop {
            tick.tick().await;
            if *self.inner.removed.borrow() {
                // Nothing more to learn: let whoever waits for the first round go on.
                self.inner.probed.send_replace(true);
                return;
            }
            let peers: Vec<(NodeId, MemberNode)> = {
                let m = self.inner.raft.metrics().borrow_watched().clone();
                if m.running_state.is_err() {
                    self.inner.probed.send_replace(true);
                    return;
                }
                let membership = m.membership_config.membership();
                membership.nodes().filter(|(id, _)| **id != self.id()).map(|(id, n)| (*id, n.clone())).collect()
            };
            let probes = peers.into_iter().map(|(id, node)| {
                let me = self.clone();
                async move {
                    let (sent, sent_wall_us) = (std::time::Instant::now(), wall_clock_us());
                    let answer = me.send_forward(&node, &ForwardReq::Probe, timeout).await;
                    let rtt = sent.elapsed();
                    let to = metrics::to_peer(id);
                    // Every peer has a failures series from its first probe, zero included.
                    let failures = me.inner.metrics.peer_sent_failures.get_or_create(&to);
                    match answer {
                        Ok(ForwardResp::Probe(peer_wall_us)) => {
                            me.inner.metrics.peer_rtt_seconds.get_or_create(&to).observe(rtt.as_secs_f64());
                            // The peer read its clock somewhere in the round trip: the middle
                            // is the best guess, within half the round trip.
                            let midpoint_us = sent_wall_us + rtt.as_micros() as i64 / 2;
                            let offset_s = (peer_wall_us - midpoint_us) as f64 / 1e6;
                            me.inner.metrics.peer_clock_offset_seconds.get_or_create(&to).set(offset_s);
                        }
                        _ => {
                            failures.inc();
                        }
                    }
                }
            });
            futures::future::join_all(probes).await;
            self.inner.probed.send_replace(true);
        }
    }

    async fn send_forward(
        &self,
        leader: &MemberNode,
        req: &ForwardReq,
        timeout: Duration,
    ) -> Result<ForwardResp, ConsensusError> {
        let url = &leader.peer_url;
        let unary = self
            .inner
            .unary_until
            .lock()
            .unwrap()
            .get(url)
            .and_then(|(until, client)| (std::time::Instant::now() < *until).then(|| client.clone()));
        if let Some(client) = unary {
            return send_forward_unary(client, req, timeout).await;
        }
        let stream = {
            let mut forwards = self.inner.forwards.lock().unwrap();
            match forwards.get(url) {
                Some(s) if !s.is_spent() => s.clone(),
                _ => {
                    let ch = network::channel_to(url).map_err(ConsensusError::Unavailable)?;
                    let s = forward_stream::ForwardStream::open(ch);
                    forwards.insert(url.clone(), s.clone());
                    s
                }
            }
        };
        use forward_stream::Failure;
        match stream.call(&encode(req), timeout).await {
            Ok(reply) => decode(&reply).map_err(ConsensusError::Unavailable),
            // Not answered in time, or the stream ended after the request may have reached the
            // leader: it may have been served, so the caller must not take it as refused.
            Err(Failure::Timeout | Failure::Lost) => Err(ConsensusError::Timeout),
            // The member this one forwards to cannot be reached: as far as clients here can
            // tell, there is no leader.
            Err(Failure::Unsent) => Err(ConsensusError::NoLeader),
            Err(Failure::Refused(status)) => Err(forward_refused(&status)),
            // A peer of an older build (a rolling upgrade): nothing was served; send it as a
            // call of its own, and keep doing so for a while.
            Err(Failure::Unsupported) => {
                tracing::info!(peer = %url, "the peer does not take forwarding streams; forwarding with one call per request");
                let client = network::new_client(network::channel_to(url).map_err(ConsensusError::Unavailable)?);
                let until = std::time::Instant::now() + UNARY_FORWARD_RETRY;
                self.inner.unary_until.lock().unwrap().insert(url.clone(), (until, client.clone()));
                send_forward_unary(client, req, timeout).await
            }
        }
    }

    /// Forward an idempotent request to whoever leads now, retrying across leader changes
    /// with a per-attempt timeout of one election timeout, so a paused or dead leader costs one
    /// attempt rather than the whole request.
    async fn forward_idempotent(&self, req: ForwardReq) -> Result<ForwardResp, ConsensusError> {
        self.forward_idempotent_timed(req).await.map(|(resp, _)| resp)
    }

    /// As `forward_idempotent`, with when the attempt that was answered began.
    async fn forward_idempotent_timed(
        &self,
        req: ForwardReq,
    ) -> Result<(ForwardResp, tokio::time::Instant), ConsensusError> {
        let attempt_timeout = Duration::from_millis(self.inner.cfg.election_timeout_ms.max(100));
        let deadline = tokio::time::Instant::now() + network::FORWARD_TIMEOUT;
        let mut last = ConsensusError::NoLeader;
        while tokio::time::Instant::now() < deadline {
            if let Some(leader) = self.leader_node() {
                let began = tokio::time::Instant::now();
                match self.forward(&leader, &req, attempt_timeout).await {
                    Ok(ForwardResp::Err(e @ (ConsensusError::NotLeader | ConsensusError::NoLeader))) => last = e,
                    Ok(resp) => return Ok((resp, began)),
                    Err(e @ (ConsensusError::Timeout | ConsensusError::NoLeader | ConsensusError::Unavailable(_))) => {
                        last = e
                    }
                    Err(e) => return Err(e),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(last)
    }

    fn leader_node(&self) -> Option<MemberNode> {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow_watched();
        let leader = m.current_leader?;
        m.membership_config.membership().get_node(&leader).cloned()
    }

    // ---- reads ----

    /// Make the next local read linearizable: a ReadIndex round at the leader, then wait until
    /// this member has applied up to that index.
    pub async fn linearize(&self) -> Result<(), ConsensusError> {
        let raft = &self.inner.raft;
        match raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(_) => Ok(()),
            Err(e) => {
                if e.forward_to_leader().is_none() {
                    return Err(raft_err(e));
                }
                let index = match self.forward_idempotent(ForwardReq::ReadIndex).await? {
                    ForwardResp::ReadIndex(i) => i,
                    ForwardResp::Err(e) => return Err(e),
                    _ => return Err(ConsensusError::Unavailable("unexpected forward reply".into())),
                };
                raft.wait(Some(network::FORWARD_TIMEOUT))
                    .applied_index_at_least(Some(index), "read index")
                    .await
                    .map_err(|_| ConsensusError::Timeout)?;
                Ok(())
            }
        }
    }

    /// Read the local state. Call `linearize` first unless a serializable read was asked for.
    pub fn read<R>(&self, f: impl FnOnce(&Store) -> R) -> R {
        f(&self.inner.shared.store.read().unwrap())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Applied> {
        self.inner.shared.events.subscribe()
    }

    /// Keep `observer` up to date with the state from now on (`ApplyObserver`): it is reset from
    /// the current state, then told of every applied change. One per member; false if one is
    /// installed already.
    pub fn set_apply_observer(&self, observer: Arc<dyn ApplyObserver>) -> bool {
        self.inner.shared.set_observer(observer)
    }

    // ---- leases ----

    /// Renew a lease; `None` when it does not exist or its expiry is already proposed.
    /// Forwarded to the leader, which logs the renewal before it answers (ADR 0008). The answer
    /// is given only while it can still reach the client inside the leader's window; past it,
    /// the client is told to retry rather than promised a deadline no future leader holds.
    pub async fn lease_keepalive(&self, id: i64) -> Result<Option<i64>, ConsensusError> {
        // A renewal that committed too late to be promised is renewed again, a few times: the
        // next one usually commits in time (a slow moment, or the first call after an election).
        let mut late = ConsensusError::from(lease::Refused::TooLate);
        for _ in 0..KEEPALIVE_LATE_RETRIES_MAX {
            match self.lease_keepalive_once(id).await {
                Err(e @ ConsensusError::LeaseAnswerLate) => late = e,
                other => return other,
            }
        }
        Err(late)
    }

    async fn lease_keepalive_once(&self, id: i64) -> Result<Option<i64>, ConsensusError> {
        if self.is_leader() {
            let clock = &self.inner.clock;
            return match clock.keepalive(&self.inner.raft, &self.inner.shared, id).await? {
                Some(r) if tokio::time::Instant::now() <= r.valid_until => Ok(Some(r.ttl_s)),
                Some(_) => Err(lease::Refused::TooLate.into()),
                None => Ok(None),
            };
        }
        match self.forward_idempotent_timed(ForwardReq::KeepAlive(id)).await? {
            // The leader's budget runs from the request's arrival there to the end of its
            // window; this attempt began before that arrival, so if its round trip fits in the
            // budget, this answer reaches the client inside the window.
            (ForwardResp::KeepAlive(Some((ttl_s, budget_ms))), began) => {
                match began.elapsed().as_millis() as u64 <= budget_ms {
                    true => Ok(Some(ttl_s)),
                    false => Err(lease::Refused::TooLate.into()),
                }
            }
            (ForwardResp::KeepAlive(None), _) => Ok(None),
            (ForwardResp::Err(e), _) => Err(e),
            _ => Err(ConsensusError::Unavailable("unexpected forward reply".into())),
        }
    }

    /// Remaining seconds of a lease as the leader sees it; `None` when it does not exist.
    pub async fn lease_remaining_s(&self, id: i64) -> Result<Option<i64>, ConsensusError> {
        self.lease_call(ForwardReq::TimeToLive(id)).await
    }

    async fn lease_call(&self, req: ForwardReq) -> Result<Option<i64>, ConsensusError> {
        if self.is_leader() {
            return self.serve_lease(&req);
        }
        match self.forward_idempotent(req).await? {
            ForwardResp::Lease(v) => Ok(v),
            ForwardResp::Err(e) => Err(e),
            _ => Err(ConsensusError::Unavailable("unexpected forward reply".into())),
        }
    }

    fn serve_lease(&self, req: &ForwardReq) -> Result<Option<i64>, ConsensusError> {
        let (raft, shared, clock) = (&self.inner.raft, &self.inner.shared, &self.inner.clock);
        match req {
            ForwardReq::TimeToLive(id) => clock.remaining_s(raft, shared, *id),
            _ => {
                unreachable!("serve_lease only takes time-to-live")
            }
        }
    }

    async fn serve_forward(&self, req: ForwardReq) -> ForwardResp {
        let raft = &self.inner.raft;
        match req {
            // Checked before the quota, so a member that just stepped down says so instead of
            // refusing (or alarming) on its own view.
            ForwardReq::Write(_) if !self.is_leader() => ForwardResp::Err(ConsensusError::NotLeader),
            ForwardReq::Write(r) => match self.admit_to_quota(&r) {
                Err(refused) => ForwardResp::Written(refused),
                Ok(_admitted) => match raft.client_write(r).await {
                    Ok(resp) => ForwardResp::Written(resp.data),
                    Err(e) if e.forward_to_leader().is_some() => ForwardResp::Err(ConsensusError::NotLeader),
                    Err(e) => ForwardResp::Err(raft_err(e)),
                },
            },
            ForwardReq::ReadIndex => match raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
                Ok(read) => ForwardResp::ReadIndex(read.index()),
                Err(e) if e.forward_to_leader().is_some() => ForwardResp::Err(ConsensusError::NotLeader),
                Err(e) => ForwardResp::Err(raft_err(e)),
            },
            ForwardReq::LeaseTable => match self.inner.clock.table(raft, &self.inner.shared) {
                Ok(t) => ForwardResp::LeaseTable(t),
                Err(e) => ForwardResp::Err(e),
            },
            ForwardReq::LeaseMarks => ForwardResp::LeaseMarks(self.lease_marks()),
            ForwardReq::KeepAlive(id) => {
                // The budget is counted from the request's arrival here: the asking member's
                // round trip contains our whole part, so it compares its round trip with it.
                let arrived = tokio::time::Instant::now();
                match self.inner.clock.keepalive(raft, &self.inner.shared, id).await {
                    Ok(r) => ForwardResp::KeepAlive(r.map(|r| {
                        let budget = r.valid_until.saturating_duration_since(arrived);
                        (r.ttl_s, budget.as_millis() as u64)
                    })),
                    Err(e) => ForwardResp::Err(e),
                }
            }
            lease @ ForwardReq::TimeToLive(_) => match self.serve_lease(&lease) {
                Ok(v) => ForwardResp::Lease(v),
                Err(e) => ForwardResp::Err(e),
            },
            ForwardReq::Change(c) => match self.apply_change(c).await {
                Ok(id) => ForwardResp::Changed(id),
                Err(e) => ForwardResp::Err(e),
            },
            // A joining member takes its id from this answer: answer only from a log that holds
            // every committed change. A member that lags (just restarted, cut off) could still
            // list a removed member under the joiner's peer URL, and the joiner would take the
            // removed member's identity (the drill caught this).
            ForwardReq::Members => match self.linearize().await {
                Ok(()) => ForwardResp::Members(self.inner.cfg.cluster_id, self.peer_urls()),
                Err(e) => ForwardResp::Err(e),
            },
            ForwardReq::MemberList => match self.linearize().await {
                Ok(()) => ForwardResp::MemberList(self.members()),
                Err(e) => ForwardResp::Err(e),
            },
            ForwardReq::Removed(id) => {
                if id == self.id() {
                    self.mark_removed();
                }
                ForwardResp::Changed(None)
            }
            ForwardReq::App { method, payload } => {
                let handler = self.inner.app_handler.lock().unwrap().clone();
                match handler {
                    Some(h) => ForwardResp::App(h.call(method, payload).await),
                    None => ForwardResp::App(Err("no application handler on this member".into())),
                }
            }
            ForwardReq::Probe => ForwardResp::Probe(wall_clock_us()),
        }
    }

    /// Install what answers `call_member` requests arriving at this member.
    pub fn set_app_handler(&self, handler: Arc<dyn AppHandler>) {
        *self.inner.app_handler.lock().unwrap() = Some(handler);
    }

    /// Call `method` on member `id` over the peer channel (for the application layer: a
    /// health probe from another vantage point, for instance).
    pub async fn call_member(
        &self,
        id: NodeId,
        method: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ConsensusError> {
        let node = {
            let metrics = self.inner.raft.metrics();
            let m = metrics.borrow_watched();
            m.membership_config.membership().get_node(&id).cloned()
        };
        let node = node.ok_or(ConsensusError::MemberNotFound)?;
        let req = ForwardReq::App { method: method.to_string(), payload };
        match self.forward(&node, &req, timeout).await? {
            ForwardResp::App(Ok(bytes)) => Ok(bytes),
            ForwardResp::App(Err(e)) => Err(ConsensusError::Unavailable(e)),
            _ => Err(ConsensusError::Unavailable("unexpected reply".into())),
        }
    }

    // ---- status ----

    /// How old this member's data may be, in milliseconds, for answers served without a
    /// ReadIndex: the time since it last held everything the leader had committed. That is its
    /// last confirmation from the leader (on the leader, from a quorum) while it had applied
    /// all it knew to be committed; a member that has fallen behind in applying keeps counting
    /// from the last moment it was caught up. `None` when it cannot tell (it never heard from a
    /// leader, or it has been behind since it started).
    pub fn staleness_ms(&self) -> Option<u64> {
        let m = self.inner.raft.metrics().borrow_watched().clone();
        let (contact_age, committed) = if m.state == ServerState::Leader {
            (m.last_quorum_acked.as_ref().map(|t| t.elapsed()), m.local_committed.as_ref())
        } else {
            let contact = *self.inner.last_leader_contact.lock().unwrap();
            (contact.map(|t| t.elapsed()), m.cluster_committed.as_ref().or(m.local_committed.as_ref()))
        };
        let applied = m.last_applied.as_ref().map_or(0, |l| l.index);
        let caught_up = applied >= committed.map_or(0, |l| l.index);
        let member = Arc::as_ptr(&self.inner) as usize;
        let now = tokio::time::Instant::now();
        let fresh = fresh_as_of(member, contact_age.and_then(|age| now.checked_sub(age)), caught_up);
        fresh.map(|t| now.saturating_duration_since(t).as_millis() as u64)
    }

    /// Record, at every change of Raft's metrics (each commit, apply and leader contact), whether
    /// this member's data is as new as the leader's commit (`fresh_as_of`). Freshness recorded
    /// only when a stale read asked for it left a member that was behind at every such read, but
    /// caught up in between, answering "unknown" (t81 saw it under a slow follower's fsyncs).
    async fn track_freshness(self) {
        let mut metrics = self.inner.raft.metrics();
        while metrics.changed().await.is_ok() {
            let _ = self.staleness_ms();
        }
    }

    /// Once fenced (a recovery dropped this member), stop campaigning: it serves nothing, and
    /// its elections could only disturb the old members it still reaches.
    async fn stop_campaigning_when_fenced(self) {
        let mut serving = self.serving_changes();
        while incarnation::fenced().is_none() {
            if serving.changed().await.is_err() {
                return;
            }
        }
        warn!("fenced: elections off until this member is wiped and added again");
        self.inner.raft.runtime_config().elect(false);
    }

    /// The current Raft term, cheaply (every response header carries it).
    pub fn term(&self) -> u64 {
        self.inner.raft.metrics().borrow_watched().current_term
    }

    pub fn status(&self) -> RaftStatus {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow_watched();
        let is_learner = !m.membership_config.membership().voter_ids().any(|v| v == self.inner.cfg.id);
        RaftStatus {
            id: self.inner.cfg.id,
            term: m.current_term,
            leader: m.current_leader,
            state: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            },
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: m.cluster_committed.as_ref().or(m.local_committed.as_ref()).map(|l| l.index).unwrap_or(0),
            applied_index: m.last_applied.as_ref().map(|l| l.index).unwrap_or(0),
            is_learner,
        }
    }

    pub fn members(&self) -> Vec<MemberInfo> {
        let m = self.inner.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let published = self.inner.shared.members.read().unwrap();
        let isolated = self.inner.shared.isolated.read().unwrap();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| {
                // A member added as a voter shows as one while it catches up as a learner; an
                // isolated one shows as the learner it is (or is about to be).
                let p = published.get(id);
                MemberInfo {
                    id: *id,
                    name: p.map(|p| p.name.clone()).unwrap_or_else(|| node.name.clone()),
                    peer_urls: vec![node.peer_url.clone()],
                    client_urls: p.map(|p| p.client_urls.clone()).unwrap_or_default(),
                    is_learner: !voters.contains(id) && (!node.promote || isolated.contains_key(id)),
                }
            })
            .collect()
    }

    /// Hand leadership to `target`, a voter that has replicated everything this leader has.
    /// Waits until `target` leads (or one attempt's worth of election timeouts has passed).
    pub async fn transfer_leader(&self, target: NodeId) -> Result<(), ConsensusError> {
        let raft = &self.inner.raft;
        {
            let metrics = raft.metrics();
            let m = metrics.borrow_watched();
            if m.state != ServerState::Leader {
                return Err(ConsensusError::NotLeader);
            }
            if target == self.inner.cfg.id {
                return Ok(());
            }
            if !m.membership_config.membership().voter_ids().any(|v| v == target) {
                return Err(ConsensusError::BadTransferee);
            }
            if self.inner.shared.isolated.read().unwrap().contains_key(&target) {
                return Err(ConsensusError::BadTransferee);
            }
            let last = m.last_log_index.unwrap_or(0);
            let matched =
                m.replication.as_ref().and_then(|r| r.get(&target).cloned().flatten()).map(|l| l.index).unwrap_or(0);
            // A transferee far behind would stall the cluster while it catches up (etcd refuses
            // the same way); a few in-flight entries are fine.
            if last.saturating_sub(matched) > TRANSFER_LAG_ENTRIES_MAX {
                return Err(ConsensusError::BadTransferee);
            }
        }
        info!(to = %format!("{target:x}"), "transferring leadership");
        raft.trigger().transfer_leader(target).await.map_err(|e| ConsensusError::Stopped(e.to_string()))?;
        let timeout = Duration::from_millis(self.inner.cfg.election_timeout_ms * 5);
        raft.wait(Some(timeout))
            .metrics(|m| m.current_leader == Some(target), "leader transferred")
            .await
            .map_err(|_| ConsensusError::Timeout)?;
        Ok(())
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.inner.raft.shutdown().await {
            warn!(error = %e, "raft shutdown");
        }
    }
}

impl network::ForwardHandler for Member {
    fn handle(
        &self,
        req: Vec<u8>,
        refused: Option<tonic::Status>,
    ) -> futures::future::BoxFuture<'static, Result<Vec<u8>, tonic::Status>> {
        let me = self.clone();
        Box::pin(async move {
            let resp = match decode::<ForwardReq>(&req) {
                Ok(ForwardReq::Members) => me.serve_forward(ForwardReq::Members).await,
                Ok(_) if refused.is_some() => return Err(refused.expect("checked")),
                // A fenced member (dropped by a recovery) commits nothing for anyone.
                Ok(ForwardReq::Probe) => me.serve_forward(ForwardReq::Probe).await,
                Ok(_) if incarnation::fenced().is_some() => {
                    ForwardResp::Err(ConsensusError::Fenced(incarnation::fenced().unwrap_or_default()))
                }
                Ok(req) => me.serve_forward(req).await,
                Err(e) => ForwardResp::Err(ConsensusError::Unavailable(e)),
            };
            Ok(encode(&resp))
        })
    }
}

pub(crate) fn raft_err<E: std::fmt::Display>(e: openraft::errors::RaftError<TypeConfig, E>) -> ConsensusError {
    use openraft::errors::RaftError;
    match e {
        RaftError::APIError(e) => {
            let msg = e.to_string();
            if msg.contains("quorum") || msg.contains("Quorum") {
                ConsensusError::NoLeader
            } else {
                ConsensusError::Unavailable(msg)
            }
        }
        RaftError::Fatal(f) => ConsensusError::Stopped(f.to_string()),
    }
}

/// A member id derived from its name and peer URL, as stable as etcd's.
pub fn member_id(name: &str, peer_url: &str) -> NodeId {
    stable_id(&[name, peer_url]).max(1)
}

/// FNV-1a over the parts, separated by NUL: ids that every member derives alike from the
/// same configuration (member ids, cluster ids).
pub fn stable_id(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.iter().enumerate() {
        let sep: &[u8] = if i == 0 { &[] } else { &[0] };
        for b in sep.iter().chain(part.as_bytes()) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Per member (by the address of its shared state), the last moment its data was known to be as
/// new as what the leader had committed. `staleness_ms` remembers it so that a member that
/// falls behind in applying keeps counting from then; kept here rather than in the member's
/// state so that staleness stays in these two functions.
static FRESH_AS_OF: Mutex<BTreeMap<usize, tokio::time::Instant>> = Mutex::new(BTreeMap::new());

/// When `member`'s data was last as new as the leader's commit: `contact` (the leader's, or a
/// quorum's, last confirmation) if it has applied all it knows to be committed (`caught_up`),
/// else the last such moment remembered.
fn fresh_as_of(member: usize, contact: Option<tokio::time::Instant>, caught_up: bool) -> Option<tokio::time::Instant> {
    let mut fresh = FRESH_AS_OF.lock().unwrap();
    match contact.filter(|_| caught_up) {
        Some(at) => {
            let t = fresh.entry(member).or_insert(at);
            *t = (*t).max(at);
            Some(*t)
        }
        None if caught_up => None,
        None => fresh.get(&member).copied(),
    }
}

#[cfg(test)]
mod staleness_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_member_that_falls_behind_counts_from_when_it_was_last_caught_up() {
        let member = usize::MAX - 7; // no real member's address
        let t0 = tokio::time::Instant::now();
        let s = Duration::from_secs;
        assert_eq!(fresh_as_of(member, None, true), None, "never heard from a leader");
        assert_eq!(fresh_as_of(member, Some(t0), false), None, "behind since it started");
        assert_eq!(fresh_as_of(member, Some(t0), true), Some(t0), "caught up: as new as the last contact");
        assert_eq!(fresh_as_of(member, Some(t0 + s(5)), true), Some(t0 + s(5)));
        // Behind: fresh contacts with the leader do not make its data any newer.
        assert_eq!(fresh_as_of(member, Some(t0 + s(9)), false), Some(t0 + s(5)));
        assert_eq!(fresh_as_of(member, None, false), Some(t0 + s(5)));
        // Caught up again.
        assert_eq!(fresh_as_of(member, Some(t0 + s(12)), true), Some(t0 + s(12)));
    }
}
