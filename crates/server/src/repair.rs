//! `POST /v1/registry/repair`: what `quorate ctl audit --repair --yes` asks of the leader.
//! Each action names an instance by key and the `mod_revision` the audit saw: `deregister` (a
//! ghost) or `mark-passing` (a zombie its check marked critical). The leader carries them out
//! through the registry's own rules: every write is term-fenced and conditional on the
//! instance being unchanged since the audit, and the deregistrations of each zone go through
//! the eviction brake together: when removing them would be a storm (more than the brake's
//! threshold of the zone), none of that zone's is done, and the answer says why.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use quorate_kv::{Command, RangeRequest};
use quorate_registry::{Health, Instance, Kind, Verdict, REGISTRY_PREFIX};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::http::HttpState;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Deregister,
    MarkPassing,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RepairAction {
    pub key: String,
    pub mod_revision: i64,
    pub action: Action,
}

#[derive(Debug, Deserialize)]
pub struct RepairRequest {
    pub actions: Vec<RepairAction>,
    /// The audit's `--health-path`: the leader probes an instance without a check there too.
    #[serde(default)]
    pub health_path: Option<String>,
}

/// A health path fit for a request line: absolute, short, visible ASCII without spaces.
fn valid_health_path(p: &str) -> bool {
    p.starts_with('/') && p.len() <= 256 && p.bytes().all(|b| b.is_ascii_graphic())
}

/// What the leader probes to confirm a ghost before deregistering it: the instance's own check,
/// else `health_path` over HTTP on its address, else a TCP connect. Built from the registered
/// instance only, never from what the request names (no probing of arbitrary addresses).
pub fn confirm_spec(i: &Instance, health_path: Option<&str>) -> quorate_registry::CheckSpec {
    let host = if i.address.contains(':') { format!("[{}]", i.address) } else { i.address.clone() };
    let mut spec = i.check.clone().unwrap_or_else(|| quorate_registry::CheckSpec {
        http: health_path.map(|p| format!("http://{host}:{}{p}", i.port)),
        tcp: health_path.is_none().then(|| format!("{host}:{}", i.port)),
        interval_s: 10,
        timeout_s: 2,
        failures_before_critical: 1,
        successes_before_passing: 1,
        deregister_critical_after_s: None,
    });
    spec.timeout_s = spec.timeout_s.clamp(1, 5);
    spec
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Done,
    /// The instance changed (or went) since the audit read it: nothing done.
    Changed,
    /// The eviction brake holds the zone: nothing of it removed.
    Held,
    /// Not a repair the registry's rules allow.
    Refused,
    /// The write failed (leadership lost, timeout).
    Failed,
}

#[derive(Clone, Debug, Serialize)]
pub struct RepairResult {
    pub key: String,
    pub action: Action,
    pub outcome: Outcome,
    pub detail: String,
}

/// What can be done, before the brake and the writes: the pure half. `current` holds the
/// registry as the leader has it now (key -> (instance, mod_revision)).
pub fn precheck(a: &RepairAction, current: &HashMap<String, (Instance, i64)>) -> Result<Instance, (Outcome, String)> {
    let Some((instance, rev)) = current.get(&a.key) else {
        return Err((Outcome::Changed, "no longer registered".into()));
    };
    if *rev != a.mod_revision {
        return Err((
            Outcome::Changed,
            format!("changed since the audit (revision {rev}, audit saw {})", a.mod_revision),
        ));
    }
    match a.action {
        Action::Deregister if instance.kind == Kind::Persistent => Err((
            Outcome::Refused,
            "persistent: it lives until its owner deregisters it (its active check marks it critical)".into(),
        )),
        Action::Deregister => Ok(instance.clone()),
        Action::MarkPassing if instance.suspect => Err((
            Outcome::Refused,
            "suspect (its lease expired while the brake held): its own heartbeat or re-registration brings it back"
                .into(),
        )),
        Action::MarkPassing if instance.health != Health::Critical => {
            Err((Outcome::Refused, format!("not critical (registered {:?})", instance.health).to_lowercase()))
        }
        // Critical without an active check of the members' own: its owner said so (Eureka
        // OUT_OF_SERVICE or DOWN, Consul check fail). A probe answering does not overrule that.
        Action::MarkPassing if instance.check.is_none() => Err((
            Outcome::Refused,
            "its owner marked it critical (no active check of the members' own): not overridden".into(),
        )),
        Action::MarkPassing => Ok(instance.clone()),
    }
}

/// At most this many actions per request: each is one Raft write, made in turn.
pub const ACTIONS_MAX: usize = 1000;

pub async fn repair(State(s): State<Arc<HttpState>>, Json(req): Json<RepairRequest>) -> impl IntoResponse {
    if req.actions.len() > ACTIONS_MAX {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            Json(json!({"error": format!("{} actions; at most {ACTIONS_MAX} per request", req.actions.len())})),
        );
    }
    if let Some(a) = req.actions.iter().find(|a| !a.key.starts_with(REGISTRY_PREFIX)) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("{:?} is not a registry instance key (under {REGISTRY_PREFIX})", a.key)})),
        );
    }
    if let Some(p) = req.health_path.as_deref().filter(|p| !valid_health_path(p)) {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"error": format!("health_path {p:?}: an absolute path of at most 256 visible ASCII characters")}),
            ),
        );
    }
    if req.actions.is_empty() {
        return (StatusCode::OK, Json(json!({"term": s.member().status().term, "results": []})));
    }
    let member = s.member();
    let status = member.status();
    if status.state != "leader" {
        let leader = status.leader.map(|l| format!("{l:x}"));
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "not leader: repairs are made by the leader", "leader": leader})),
        );
    }
    let term = status.term;
    let brake = s.brake();
    if let Err(e) = brake.take_over(member, term).await {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": format!("cannot take over the brake: {e}")})));
    }

    // The registry as the leader has it now, read and decoded off the runtime's workers.
    let reader = member.clone();
    let read = tokio::task::spawn_blocking(move || {
        let prefix = REGISTRY_PREFIX.as_bytes().to_vec();
        let all = RangeRequest { range_end: quorate_kv::prefix_end(&prefix), key: prefix, ..Default::default() };
        let kvs = reader.read(|store| store.range(&all).map(|r| r.kvs).unwrap_or_default());
        let mut current = HashMap::new();
        let mut zone_totals: BTreeMap<String, usize> = BTreeMap::new();
        for kv in kvs {
            if let Ok(i) = serde_json::from_slice::<Instance>(&kv.value) {
                *zone_totals.entry(i.zone.clone()).or_default() += 1;
                current.insert(String::from_utf8_lossy(&kv.key).into_owned(), (i, kv.mod_revision));
            }
        }
        (current, zone_totals)
    })
    .await;
    let Ok((current, zone_totals)) = read else {
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": "reading the registry failed"})));
    };

    let mut results = Vec::new();
    let mut ready = Vec::new();
    for a in req.actions {
        match precheck(&a, &current) {
            Ok(instance) => ready.push((a, instance)),
            Err((outcome, detail)) => results.push(RepairResult { key: a.key, action: a.action, outcome, detail }),
        }
    }
    // One outside vantage point is not enough to remove an instance: the leader probes each
    // ghost itself (from its --probe-source-ip), and one that answers it is kept.
    let source = s.probe_source();
    let confirms = ready.iter().map(|(a, i)| {
        let spec = (a.action == Action::Deregister).then(|| confirm_spec(i, req.health_path.as_deref()));
        async move {
            match spec {
                Some(spec) => match crate::prober::not_allowed(&spec).await {
                    Some(why) => Some((Err(why), spec)),
                    None => Some((Ok(crate::prober::probe(&spec, source).await), spec)),
                },
                None => None,
            }
        }
    });
    let confirmed = futures::future::join_all(confirms).await;
    let mut still = Vec::new();
    for ((a, i), c) in ready.into_iter().zip(confirmed) {
        match c {
            Some((Err(why), _)) => results.push(RepairResult {
                key: a.key,
                action: a.action,
                outcome: Outcome::Refused,
                detail: format!("the leader may not probe it ({why}): not confirmed dead"),
            }),
            Some((Ok(health), spec)) if health != Health::Critical => {
                let target = spec.http.or(spec.tcp.map(|t| format!("tcp://{t}"))).unwrap_or_default();
                results.push(RepairResult {
                    key: a.key,
                    action: a.action,
                    outcome: Outcome::Refused,
                    detail: format!(
                        "the leader reaches it ({target} answers {health:?}): not dead from the cluster's side"
                    )
                    .replace("Passing", "passing")
                    .replace("Warning", "warning"),
                });
            }
            _ => still.push((a, i)),
        }
    }
    let ready = still;
    // The brake judges each zone's removals together: a storm is refused whole.
    let mut removals: BTreeMap<String, usize> = BTreeMap::new();
    for (a, i) in &ready {
        if a.action == Action::Deregister {
            *removals.entry(i.zone.clone()).or_default() += 1;
        }
    }
    let now = std::time::Instant::now();
    let mut held: BTreeMap<String, String> = BTreeMap::new();
    for (zone, n) in &removals {
        let total = zone_totals.get(zone).copied().unwrap_or(*n);
        match brake.with(term, |b| b.judge_repair(zone, *n, total, now)) {
            Some(Verdict::Evict) => {}
            Some(Verdict::Hold { reason }) => {
                held.insert(zone.clone(), reason);
            }
            None => {
                held.insert(zone.clone(), "leadership changed during the repair".into());
            }
        }
    }

    for (a, instance) in ready {
        if let Some(reason) = held.get(&instance.zone).filter(|_| a.action == Action::Deregister) {
            results.push(RepairResult {
                key: a.key,
                action: a.action,
                outcome: Outcome::Held,
                detail: format!("eviction brake: {reason}"),
            });
            continue;
        }
        let txn = match a.action {
            Action::Deregister => quorate_registry::delete_if_unchanged(a.key.as_bytes(), a.mod_revision),
            Action::MarkPassing => {
                let passing = Instance { health: Health::Passing, brake_hold: None, ..instance };
                quorate_registry::replace_if_unchanged(a.key.as_bytes(), a.mod_revision, &passing)
            }
        };
        let cmd = Command::TermFenced { term, cmd: Box::new(Command::Txn(txn)) };
        let (outcome, detail) = match member.write(cmd).await {
            Ok(r) => match r.result {
                Some(Ok(quorate_kv::CommandResponse::Txn(t))) if t.succeeded => (Outcome::Done, String::new()),
                Some(Ok(_)) => (Outcome::Changed, "changed while the repair ran".into()),
                // A term-fenced write refused: leadership moved on since the repair began.
                Some(Err(e)) => (Outcome::Failed, format!("refused: {e} (leadership changed? audit again)")),
                None => (Outcome::Failed, "no answer from the state machine".into()),
            },
            Err(e) => (Outcome::Failed, e.to_string()),
        };
        if outcome == Outcome::Done {
            tracing::info!(key = %a.key, action = ?a.action, "registry repaired (ctl audit --repair)");
        }
        results.push(RepairResult { key: a.key, action: a.action, outcome, detail });
    }
    (StatusCode::OK, Json(json!({"term": term, "results": results})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(health: Health, suspect: bool) -> Instance {
        let mut i: Instance = serde_json::from_value(serde_json::json!({
            "namespace": "default", "service": "web", "id": "w1", "address": "127.0.0.1", "port": 8080,
            "zone": "z1", "weight": 100, "tags": [], "meta": {}, "kind": "ephemeral", "health": "passing",
            "heartbeat_interval_s": 5, "ttl_s": 15, "lease": 0
        }))
        .unwrap();
        i.health = health;
        i.suspect = suspect;
        i
    }

    fn checked(mut i: Instance) -> Instance {
        i.check = Some(serde_json::from_value(serde_json::json!({"http": "http://127.0.0.1:8080/health"})).unwrap());
        i
    }

    #[test]
    fn the_leader_confirms_with_the_instances_own_check_or_its_address_never_a_requested_url() {
        let i = instance(Health::Passing, false);
        let tcp = confirm_spec(&i, None);
        assert_eq!((tcp.tcp.as_deref(), tcp.http.as_deref()), (Some("127.0.0.1:8080"), None));
        let http = confirm_spec(&i, Some("/health"));
        assert_eq!(http.http.as_deref(), Some("http://127.0.0.1:8080/health"));
        let own = confirm_spec(&checked(Instance { ..i.clone() }), Some("/other"));
        assert_eq!(own.http.as_deref(), Some("http://127.0.0.1:8080/health"), "its own check wins");
        assert!(valid_health_path("/health") && valid_health_path("/a/b?c=d"));
        for bad in ["health", "/a b", "/a\r\nX-Injected: 1", &format!("/{}", "a".repeat(300))] {
            assert!(!valid_health_path(bad), "{bad:?}");
        }
    }

    #[test]
    fn only_an_unchanged_instance_is_repaired_and_only_a_critical_one_re_marked() {
        let current: HashMap<String, (Instance, i64)> = [
            ("k-passing".to_string(), (instance(Health::Passing, false), 5)),
            ("k-critical".to_string(), (checked(instance(Health::Critical, false)), 6)),
            ("k-owner-down".to_string(), (instance(Health::Critical, false), 8)),
            ("k-persistent".to_string(), (Instance { kind: Kind::Persistent, ..instance(Health::Passing, false) }, 9)),
            ("k-suspect".to_string(), (instance(Health::Passing, true), 7)),
        ]
        .into();
        let act = |key: &str, rev: i64, action: Action| RepairAction { key: key.into(), mod_revision: rev, action };
        assert!(precheck(&act("k-passing", 5, Action::Deregister), &current).is_ok());
        assert_eq!(precheck(&act("k-passing", 4, Action::Deregister), &current).unwrap_err().0, Outcome::Changed);
        assert_eq!(precheck(&act("gone", 1, Action::Deregister), &current).unwrap_err().0, Outcome::Changed);
        assert!(precheck(&act("k-critical", 6, Action::MarkPassing), &current).is_ok());
        assert_eq!(precheck(&act("k-passing", 5, Action::MarkPassing), &current).unwrap_err().0, Outcome::Refused);
        assert_eq!(precheck(&act("k-suspect", 7, Action::MarkPassing), &current).unwrap_err().0, Outcome::Refused);
        assert_eq!(precheck(&act("k-owner-down", 8, Action::MarkPassing), &current).unwrap_err().0, Outcome::Refused);
        assert_eq!(precheck(&act("k-persistent", 9, Action::Deregister), &current).unwrap_err().0, Outcome::Refused);
    }
}
