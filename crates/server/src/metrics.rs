//! The member's Prometheus metrics: etcd's names, types, labels and meaning where etcd has
//! the metric (so etcd-mixin's alerts and dashboards work unchanged), `quorate_*` for what only
//! quorate has, and the standard `process_*` set. Served at `/metrics` on every client URL, on
//! `--listen-http` and on every `--listen-metrics-urls` listener (docs/metrics.md).
//!
//! Values that a scrape can read (roles, indexes, sizes, registry states) are read at scrape
//! time; values that happen on hot paths (fsyncs, peer round trips, gRPC calls, proposals) are
//! counted there, by `quorate_consensus::metrics` and `crate::grpc_metrics`.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use quorate_consensus::Member;
use serde_json::json;

use crate::grpc_metrics::GrpcMetrics;
use crate::process_metrics::ProcessMetrics;

type Labels = Vec<(&'static str, String)>;

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub struct Metrics {
    member: Member,
    data_dir: PathBuf,
    registry: Registry,
    reaper: Arc<crate::reaper::ReaperStats>,
    /// Instances by state and brake-held instances by zone, kept as writes apply.
    registry_counts: Arc<crate::registry_counts::RegistryCounts>,
    pub grpc: GrpcMetrics,
    /// Heartbeats accepted, by dialect (counted by the HTTP API's handlers).
    pub heartbeats: quorate_api_http::Heartbeats,
    /// Active check results and confirmations (counted by the prober).
    pub checks: crate::prober::CheckMetrics,
    brake_releases: Family<Labels, Counter>,
    process: ProcessMetrics,
    // quorate_* (kept as they were before the etcd set)
    term: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    is_leader: Gauge,
    has_leader: Gauge,
    revision: Gauge,
    keys: Gauge,
    log_commits: Counter,
    log_entries: Counter,
    evicted: Counter,
    marked_suspect: Counter,
    brake_engaged_zones: Gauge,
    // quorate_* beyond etcd
    apply_lag: Gauge,
    instances: Family<Labels, Gauge>,
    brake_held: Family<Labels, Gauge>,
    brake_engaged: Family<Labels, Gauge>,
    brake_engaged_seconds: Family<Labels, Gauge>,
    // etcd_*
    etcd_has_leader: Gauge,
    etcd_is_leader: Gauge,
    etcd_is_learner: Gauge,
    etcd_proposals_committed: Gauge,
    etcd_proposals_applied: Gauge,
    etcd_db_total_size: Gauge,
    etcd_db_in_use: Gauge,
    etcd_keys: Gauge,
    etcd_current_revision: Gauge,
    etcd_server_id: Family<Labels, Gauge>,
}

impl Metrics {
    pub fn new(
        member: Member,
        data_dir: PathBuf,
        quota_backend_bytes: u64,
        reaper: Arc<crate::reaper::ReaperStats>,
        registry_counts: Arc<crate::registry_counts::RegistryCounts>,
    ) -> Self {
        let mut registry = Registry::default();
        let c = member.metrics().clone();
        let g = Gauge::default;
        let (term, commit_index, applied_index, is_leader, has_leader, revision, keys) =
            (g(), g(), g(), g(), g(), g(), g());
        let (log_commits, log_entries, evicted, marked_suspect) =
            (Counter::default(), Counter::default(), Counter::default(), Counter::default());
        let (brake_engaged_zones, apply_lag) = (g(), g());
        let (instances, brake_held) = (Family::<Labels, Gauge>::default(), Family::<Labels, Gauge>::default());
        let (brake_engaged, brake_engaged_seconds) =
            (Family::<Labels, Gauge>::default(), Family::<Labels, Gauge>::default());
        let heartbeats = quorate_api_http::Heartbeats::default();
        let checks = crate::prober::CheckMetrics::default();
        let brake_releases = Family::<Labels, Counter>::default();
        {
            let q = registry.sub_registry_with_prefix("quorate");
            q.register("storage_log_commits", "Durable (fsynced) commits of the Raft log", log_commits.clone());
            q.register("storage_log_entries", "Raft log entries made durable", log_entries.clone());
            q.register("raft_term", "Current Raft term", term.clone());
            q.register("raft_commit_index", "Highest log index known committed", commit_index.clone());
            q.register("raft_applied_index", "Highest log index applied to the state machine", applied_index.clone());
            q.register("raft_is_leader", "1 if this member is the leader", is_leader.clone());
            q.register("raft_has_leader", "1 if this member knows a leader", has_leader.clone());
            q.register("mvcc_revision", "Current MVCC revision", revision.clone());
            q.register("mvcc_keys", "Keys with history in the MVCC store", keys.clone());
            q.register(
                "registry_evictions",
                "Instances this member evicted as leader (lease expired)",
                evicted.clone(),
            );
            q.register(
                "registry_marked_suspect",
                "Instances this member marked suspect as leader while the eviction brake held",
                marked_suspect.clone(),
            );
            q.register(
                "registry_brake_engaged_zones",
                "Zones where the eviction brake holds now (leader only)",
                brake_engaged_zones.clone(),
            );
            q.register(
                "raft_apply_lag_entries",
                "Log entries committed but not yet applied on this member",
                apply_lag.clone(),
            );
            q.register(
                "raft_proposals_pending",
                "Proposals this member has in flight (etcd_server_proposals_pending under its own name)",
                c.proposals_pending.clone(),
            );
            q.register(
                "server_forwarded_requests",
                "Requests this member forwarded to the leader, by kind",
                c.forwarded.clone(),
            );
            q.register(
                "raft_elections_started",
                "Elections this member started (it became a candidate after a granted pre-vote)",
                c.elections_started.clone(),
            );
            q.register("raft_elections_won", "Elections this member won (it became leader)", c.elections_won.clone());
            q.register(
                "raft_elections_lost",
                "Elections this member started and did not win, by reason (another_leader, higher_term, vote_refused, no_quorum)",
                c.elections_lost.clone(),
            );
            q.register(
                "raft_pre_votes_refused",
                "Pre-votes this member refused as a voter, by reason (leader_alive, log_behind, higher_term, already_voted)",
                c.pre_votes_refused.clone(),
            );
            q.register(
                "flight_events_dropped",
                "Flight-recorder events dropped because the writer's queue was full",
                c.flight.dropped().clone(),
            );
            q.register(
                "lease_clock_promotions",
                "Times the lease clock started expiring leases here (quorum-connected leader; every lease got one election timeout of grace)",
                c.lease_clock_promotions.clone(),
            );
            q.register(
                "lease_clock_demotions",
                "Times the lease clock stopped here (no longer leader)",
                c.lease_clock_demotions.clone(),
            );
            q.register(
                "lease_clock_stalls",
                "Times the lease clock found this member had not run for a while (a pause); a leader gives every lease grace again",
                c.lease_clock_stalls.clone(),
            );
            q.register(
                "lease_expiry_suspended",
                "Times this leader suspended lease expiry because no quorum had answered it lately",
                c.lease_expiry_suspended.clone(),
            );
            q.register(
                "leases_expired",
                "Leases this member expired as leader, in committed expiry proposals",
                c.leases_expired.clone(),
            );
            q.register(
                "network_peer_clock_offset_seconds",
                "The peer's wall clock minus this member's, from the last probe (within half its round trip), by peer (To)",
                c.peer_clock_offset_seconds.clone(),
            );
            q.register(
                "fencing_refusals",
                "Applied commands fencing made no-ops: token (a fenced write whose lock is gone), stale_term (a deposed leader's eviction or lease expiry)",
                c.fencing_refusals.clone(),
            );
            q.register(
                "registry_brake_engaged",
                "1 while the eviction brake holds this zone (cause: lease for expiries, checks for failing checks), from the replicated brake state: the same on every member",
                brake_engaged.clone(),
            );
            q.register(
                "registry_brake_engaged_seconds",
                "How long the brake has held this zone, as of its last replicated checkpoint (once a second while held)",
                brake_engaged_seconds.clone(),
            );
            q.register(
                "registry_instances",
                "Registered instances by state (passing, warning, critical, suspect)",
                instances.clone(),
            );
            q.register(
                "registry_heartbeats",
                "Heartbeats this member accepted (each renewed an instance's lease), by dialect: native, consul (a TTL check's pass, warn or fail), eureka (renew)",
                heartbeats.family.clone(),
            );
            q.register(
                "registry_check_results",
                "Active health check probes this member ran as leader, by result: passing, warning, critical",
                checks.results.clone(),
            );
            q.register(
                "registry_check_confirmations",
                "Failing checks this leader asked another member to confirm, by outcome: confirmed, refuted (the other member reached the instance; kept), unanswered",
                checks.confirmations.clone(),
            );
            q.register(
                "registry_brake_releases",
                "Times the eviction brake let go of a zone it held, by zone, from the replicated brake state (every member counts each release)",
                brake_releases.clone(),
            );
            q.register(
                "registry_brake_held_instances",
                "Instances the eviction brake holds from eviction now, by zone",
                brake_held.clone(),
            );
        }
        let (etcd_has_leader, etcd_is_leader, etcd_is_learner) = (g(), g(), g());
        let (etcd_proposals_committed, etcd_proposals_applied) = (g(), g());
        let (etcd_db_total_size, etcd_db_in_use, etcd_keys, etcd_current_revision) = (g(), g(), g(), g());
        let etcd_server_id = Family::<Labels, Gauge>::default();
        let quota = g();
        quota.set(quota_backend_bytes as i64);
        let r = &mut registry;
        r.register(
            "etcd_server_has_leader",
            "Whether or not a leader exists. 1 is existence, 0 is not.",
            etcd_has_leader.clone(),
        );
        r.register(
            "etcd_server_is_leader",
            "Whether or not this member is a leader. 1 if is, 0 otherwise.",
            etcd_is_leader.clone(),
        );
        r.register(
            "etcd_server_is_learner",
            "Whether or not this member is a learner. 1 if is, 0 otherwise.",
            etcd_is_learner.clone(),
        );
        r.register("etcd_server_leader_changes_seen", "The number of leader changes seen.", c.leader_changes.clone());
        r.register(
            "etcd_server_proposals_committed_total",
            "The total number of consensus proposals committed.",
            etcd_proposals_committed.clone(),
        );
        r.register(
            "etcd_server_proposals_applied_total",
            "The total number of consensus proposals applied.",
            etcd_proposals_applied.clone(),
        );
        r.register(
            "etcd_server_proposals_pending",
            "The current number of pending proposals to commit.",
            c.proposals_pending.clone(),
        );
        r.register(
            "etcd_server_proposals_failed",
            "The total number of failed proposals seen.",
            c.proposals_failed.clone(),
        );
        r.register("etcd_server_quota_backend_bytes", "Current backend storage quota size in bytes.", quota);
        r.register(
            "etcd_server_id",
            "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.",
            etcd_server_id.clone(),
        );
        r.register(
            "etcd_disk_wal_fsync_duration_seconds",
            "The latency distributions of fsync called by WAL.",
            c.wal_fsync_seconds.clone(),
        );
        r.register(
            "etcd_disk_backend_commit_duration_seconds",
            "The latency distributions of commit called by backend.",
            c.backend_commit_seconds.clone(),
        );
        r.register(
            "etcd_network_peer_round_trip_time_seconds",
            "Round-Trip-Time histogram between peers",
            c.peer_rtt_seconds.clone(),
        );
        r.register(
            "etcd_network_peer_sent_failures",
            "The total number of send failures from peers.",
            c.peer_sent_failures.clone(),
        );
        r.register(
            "etcd_mvcc_db_total_size_in_bytes",
            "Total size of the underlying database physically allocated in bytes.",
            etcd_db_total_size.clone(),
        );
        r.register(
            "etcd_mvcc_db_total_size_in_use_in_bytes",
            "Total size of the underlying database logically in use in bytes.",
            etcd_db_in_use.clone(),
        );
        r.register("etcd_debugging_mvcc_keys_total", "Total number of keys.", etcd_keys.clone());
        r.register(
            "etcd_debugging_mvcc_current_revision",
            "The current revision of store.",
            etcd_current_revision.clone(),
        );
        let grpc = GrpcMetrics::default();
        grpc.register(r);
        let process = ProcessMetrics::default();
        process.register(r);
        Metrics {
            member,
            data_dir,
            registry,
            reaper,
            registry_counts,
            grpc,
            heartbeats,
            checks,
            brake_releases,
            process,
            term,
            commit_index,
            applied_index,
            is_leader,
            has_leader,
            revision,
            keys,
            log_commits,
            log_entries,
            evicted,
            marked_suspect,
            brake_engaged_zones,
            apply_lag,
            instances,
            brake_held,
            brake_engaged,
            brake_engaged_seconds,
            etcd_has_leader,
            etcd_is_leader,
            etcd_is_learner,
            etcd_proposals_committed,
            etcd_proposals_applied,
            etcd_db_total_size,
            etcd_db_in_use,
            etcd_keys,
            etcd_current_revision,
            etcd_server_id,
        }
    }

    /// Read what a scrape reads, then encode every metric in Prometheus text format.
    pub fn scrape(&self) -> Result<String, std::fmt::Error> {
        // One scrape at a time (three listeners serve /metrics, and HA Prometheus pairs scrape
        // together): the brake and held-instance families are cleared and refilled, and a scrape
        // encoding in between would miss their series and reset alerts' `for:` timers.
        static SCRAPING: Mutex<()> = Mutex::new(());
        let _one_at_a_time = SCRAPING.lock().unwrap_or_else(|e| e.into_inner());
        let st = self.member.status();
        self.term.set(st.term as i64);
        self.commit_index.set(st.commit_index as i64);
        self.applied_index.set(st.applied_index as i64);
        self.apply_lag.set(st.commit_index.saturating_sub(st.applied_index) as i64);
        let leading = st.leader == Some(st.id);
        self.is_leader.set(leading as i64);
        self.has_leader.set(st.leader.is_some() as i64);
        // etcd's meaning: a leader heard from lately (the quorate_raft_* pair is Raft's own view).
        let live = self.member.live_leader();
        self.etcd_is_leader.set((live == Some(st.id)) as i64);
        self.etcd_has_leader.set(live.is_some() as i64);
        self.etcd_is_learner.set(st.is_learner as i64);
        self.etcd_server_id.get_or_create(&vec![("server_id", format!("{:x}", st.id))]).set(1);
        // etcd sets these from the Raft log's commit and applied indexes too.
        self.etcd_proposals_committed.set(st.commit_index as i64);
        self.etcd_proposals_applied.set(st.applied_index as i64);
        let (rev, keys, in_use) = self.member.read(|store| (store.revision(), store.key_count(), store.bytes_in_use()));
        self.revision.set(rev);
        self.keys.set(keys as i64);
        self.etcd_current_revision.set(rev);
        self.etcd_keys.set(keys as i64);
        self.etcd_db_in_use.set(in_use as i64);
        self.etcd_db_total_size.set(self.db_files_bytes() as i64);
        let (commits, entries) = self.member.log_stats();
        catch_up(&self.log_commits, commits);
        catch_up(&self.log_entries, entries);
        catch_up(&self.evicted, self.reaper.evicted.load(Relaxed));
        catch_up(&self.marked_suspect, self.reaper.marked_suspect.load(Relaxed));
        self.brake_engaged_zones.set(self.reaper.brake_engaged_zones.load(Relaxed) as i64);
        self.count_instances();
        self.read_brake();
        self.process.refresh();
        let mut body = String::new();
        encode(&mut body, &self.registry)?;
        Ok(body)
    }

    /// Bytes the database files take on disk (the Raft log, the state file and the snapshot
    /// image), as etcd's `db` file size.
    fn db_files_bytes(&self) -> u64 {
        quorate_consensus::data_files_bytes(&self.data_dir)
    }

    /// Export the registry's instance counts, kept up to date as writes apply
    /// (`crate::registry_counts`): a scrape costs the same with ten instances or ten thousand.
    fn count_instances(&self) {
        let counts = self.registry_counts.get();
        // Every state is exported, zeros included, so a rate or a sum never loses a series.
        for (state, n) in crate::registry_counts::STATES.iter().zip(counts.by_state) {
            self.instances.get_or_create(&vec![("state", state.to_string())]).set(n);
        }
        self.brake_held.clear();
        for (zone, n) in counts.held {
            self.brake_held.get_or_create(&vec![("zone", zone)]).set(n);
        }
        for (zone, n) in counts.brake_releases {
            catch_up(&self.brake_releases.get_or_create(&vec![("zone", zone)]), n);
        }
    }
}

impl Metrics {
    /// Each zone the replicated brake state knows: held or not, and for how long.
    fn read_brake(&self) {
        let state = crate::brake_state::read_state(&self.member);
        self.brake_engaged.clear();
        self.brake_engaged_seconds.clear();
        for (zone, z) in state.zones {
            let cause = match &z.engaged {
                Some(e) if e.by_checks => "checks",
                _ => "lease",
            };
            let labels = vec![("zone", zone), ("cause", cause.to_string())];
            self.brake_engaged.get_or_create(&labels).set(z.engaged.is_some() as i64);
            let held_s = z.engaged.as_ref().map_or(0, |e| e.held_ms / 1000);
            self.brake_engaged_seconds.get_or_create(&labels).set(held_s as i64);
        }
    }
}

/// `/metrics` and `/health` alone: what the client port and `--listen-metrics-urls` serve.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new().route("/metrics", get(serve_metrics)).route("/health", get(serve_health)).with_state(metrics)
}

/// OpenMetrics to a scraper that asks for it (Prometheus does), else Prometheus' classic text
/// format (0.0.4), as etcd serves: what `curl` and older tools read.
pub async fn serve_metrics(State(m): State<Arc<Metrics>>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    let openmetrics = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("application/openmetrics-text")));
    match m.scrape() {
        Ok(body) if openmetrics => (StatusCode::OK, [("content-type", OPENMETRICS_CONTENT_TYPE)], body),
        Ok(body) => (StatusCode::OK, [("content-type", TEXT_CONTENT_TYPE)], openmetrics_to_text(&body)),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, [("content-type", "text/plain")], e.to_string()),
    }
}

/// prometheus-client writes OpenMetrics, where a counter's family is named without `_total`
/// and the body ends with `# EOF`. The classic format names the family as its samples
/// (`# TYPE etcd_server_proposals_failed_total counter`) and has no `# EOF`.
fn openmetrics_to_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        om.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(om.len() + counters.len() * 16);
    for line in om.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE ", "# UNIT "].into_iter().find(|p| line.starts_with(p));
        match meta.and_then(|p| line[p.len()..].split_once(' ').map(|(name, rest)| (p, name, rest))) {
            Some((p, name, rest)) if counters.contains(name) => {
                out.push_str(&format!("{p}{name}_total {rest}\n"));
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

async fn serve_health(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    health(&m.member).await
}

/// Healthy means a leader is known and a linearizable read goes through, as etcd's /health.
pub async fn health(member: &Member) -> (StatusCode, Json<serde_json::Value>) {
    // A member that serves no client is not healthy for a load balancer's purpose.
    if let Some(e) = member.refusal() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"health": "false", "reason": e.to_string()})));
    }
    let result = tokio::time::timeout(std::time::Duration::from_secs(5), member.linearize()).await;
    match result {
        Ok(Ok(())) => (StatusCode::OK, Json(json!({"health": "true", "reason": ""}))),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"health": "false", "reason": e.to_string()}))),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"health": "false", "reason": "timed out"}))),
    }
}

/// Bring a counter up to a total counted elsewhere (counters only move forward: add what happened
/// since). Serialised: scrapes arrive on several listeners at once, and two that both read the
/// old value would both add the difference, leaving the counter above the total for good.
fn catch_up(counter: &prometheus_client::metrics::counter::Counter, total: u64) {
    catch_up_pausing(counter, total, || {})
}

/// `catch_up` with a pause between reading the counter and adding to it (tests widen the race).
fn catch_up_pausing(counter: &prometheus_client::metrics::counter::Counter, total: u64, pause: impl Fn()) {
    static CATCHING_UP: Mutex<()> = Mutex::new(());
    let _one_at_a_time = CATCHING_UP.lock().unwrap_or_else(|e| e.into_inner());
    let have = counter.get();
    pause();
    counter.inc_by(total.saturating_sub(have));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Concurrent scrapes bring a counter to the total, never past it.
    #[test]
    fn concurrent_catch_ups_never_overshoot_the_total() {
        // Two scrapes that both read the counter before either adds: the race, made certain.
        let counter = prometheus_client::metrics::counter::Counter::<u64>::default();
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| catch_up_pausing(&counter, 10, || std::thread::sleep(std::time::Duration::from_millis(50))));
            }
        });
        assert_eq!(counter.get(), 10);
        catch_up(&counter, 25);
        assert_eq!(counter.get(), 25);
    }

    #[test]
    fn classic_text_names_a_counter_family_as_its_samples_and_has_no_eof() {
        let om = "# HELP a_seen Things seen.\n# TYPE a_seen counter\na_seen_total 3\n\
                  # HELP b_total A gauge named like a counter.\n# TYPE b_total gauge\nb_total 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP a_seen_total Things seen.\n# TYPE a_seen_total counter\na_seen_total 3\n\
             # HELP b_total A gauge named like a counter.\n# TYPE b_total gauge\nb_total 1\n"
        );
    }
}
