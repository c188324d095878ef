//! Active health checks (ADR 0005): the leader probes every instance that has a check, on the
//! check's interval. A result that would make an instance critical is first confirmed by
//! another member's probe (`call_member("probe")`) when one answers: one vantage point's
//! network trouble never marks a healthy instance critical. Status changes are written
//! term-fenced and compared against the record's mod revision.
//!
//! Every change that downgrades or removes an instance (marking it critical, deregistering it
//! after `deregister_critical_after`) goes through the eviction brake, with the number of the
//! zone's instances failing their checks right now: a whole zone failing at once is held
//! (kept as it was, served, flagged `brake_hold`), not taken out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use quorate_consensus::{AppHandler, Member};
use quorate_kv::{Command, RangeRequest};
use quorate_registry::{http_outcome, step, CheckChange, CheckSpec, CheckState, Health, Instance, Step, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::brake_state::SharedBrake;
use crate::registry_view::RegistryView;

/// How often the leader looks for checks that are due.
const PROBE_TICK: Duration = Duration::from_millis(200);
/// Most probes in flight at once.
const PROBES_IN_FLIGHT_MAX: usize = 64;
/// The peer-call method another member answers with its own probe.
pub const PROBE_METHOD: &str = "probe";

type KindCounters = prometheus_client::metrics::family::Family<
    Vec<(&'static str, &'static str)>,
    prometheus_client::metrics::counter::Counter,
>;

/// What this member's checks saw as leader: every probe's result, and how each failure that
/// another member was asked to confirm ended. Every label set is made once, here.
#[derive(Clone)]
pub struct CheckMetrics {
    /// By `result`: passing, warning, critical.
    pub results: KindCounters,
    /// By `outcome`: confirmed (the other member failed too), refuted (it reached the
    /// instance: kept), unanswered (no other member answered: marked critical).
    pub confirmations: KindCounters,
    result: [prometheus_client::metrics::counter::Counter; 3],
    confirmed: prometheus_client::metrics::counter::Counter,
    refuted: prometheus_client::metrics::counter::Counter,
    unanswered: prometheus_client::metrics::counter::Counter,
}

impl Default for CheckMetrics {
    fn default() -> Self {
        let (results, confirmations) = (KindCounters::default(), KindCounters::default());
        let result = ["passing", "warning", "critical"].map(|r| results.get_or_create(&vec![("result", r)]).clone());
        let outcome = |o| confirmations.get_or_create(&vec![("outcome", o)]).clone();
        let (confirmed, refuted, unanswered) = (outcome("confirmed"), outcome("refuted"), outcome("unanswered"));
        CheckMetrics { results, confirmations, result, confirmed, refuted, unanswered }
    }
}

impl CheckMetrics {
    fn result(&self, h: Health) {
        let i = match h {
            Health::Passing => 0,
            Health::Warning => 1,
            Health::Critical => 2,
        };
        self.result[i].inc();
    }
}

/// Probe `spec` once, from `source` if given.
pub async fn probe(spec: &CheckSpec, source: Option<IpAddr>) -> Health {
    let timeout = Duration::from_secs(spec.timeout_s);
    match tokio::time::timeout(timeout, probe_inner(spec, source)).await {
        Ok(h) => h,
        Err(_) => Health::Critical,
    }
}

async fn connect(addr: &str, source: Option<IpAddr>) -> std::io::Result<tokio::net::TcpStream> {
    let target = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{addr} resolves to nothing")))?;
    // Checked on the address resolved now, not the name registered: a name may point anywhere.
    if let Err(why) = crate::cidr::check(target.ip()) {
        tracing::warn!(%addr, %why, "health check not probed: its target is not allowed");
        return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, why));
    }
    let socket = if target.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    if let Some(ip) = source {
        socket.bind((ip, 0).into())?;
    }
    socket.connect(target).await
}

/// The `host:port` a check connects to.
fn target_addr(spec: &CheckSpec) -> Option<String> {
    if let Some(addr) = &spec.tcp {
        return Some(addr.clone());
    }
    let url = spec.http.as_deref()?.strip_prefix("http://")?;
    let authority = url.split('/').next().unwrap_or(url);
    Some(if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") })
}

/// Why this member may not probe `spec` (`--check-allowed-cidrs`), if it may not: a check it
/// cannot probe proves nothing about the instance (a repair must not take it for dead).
pub async fn not_allowed(spec: &CheckSpec) -> Option<String> {
    let addr = target_addr(spec)?;
    let ip = tokio::net::lookup_host(&addr).await.ok()?.next()?.ip();
    crate::cidr::check(ip).err()
}

async fn probe_inner(spec: &CheckSpec, source: Option<IpAddr>) -> Health {
    if let Some(addr) = &spec.tcp {
        return match connect(addr, source).await {
            Ok(_) => Health::Passing,
            Err(_) => Health::Critical,
        };
    }
    let Some(url) = spec.http.as_deref().and_then(|u| u.strip_prefix("http://")) else { return Health::Critical };
    let (authority, path) = match url.find('/') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, "/"),
    };
    let Some(addr) = target_addr(spec) else { return Health::Critical };
    let Ok(mut conn) = connect(&addr, source).await else { return Health::Critical };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: quorate-health-check\r\nConnection: close\r\n\r\n"
    );
    if conn.write_all(request.as_bytes()).await.is_err() {
        return Health::Critical;
    }
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match conn.read(&mut head[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    // "HTTP/1.1 200 ..."
    let status = std::str::from_utf8(&head[..n]).ok().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok());
    status.map(http_outcome).unwrap_or(Health::Critical)
}

/// Answers other members' requests to probe from here.
pub struct ProbeHandler {
    pub source: Option<IpAddr>,
}

impl AppHandler for ProbeHandler {
    fn call(&self, method: String, payload: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        let source = self.source;
        Box::pin(async move {
            if method != PROBE_METHOD {
                return Err(format!("unknown method {method:?}"));
            }
            let spec: CheckSpec = serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
            let h = probe(&spec, source).await;
            Ok(serde_json::to_vec(&h).expect("health serializes"))
        })
    }
}

struct Tracked {
    state: CheckState,
    next_due: Instant,
    /// Another member reached it when this one failed to: not counted as failing in its zone.
    alive_elsewhere: bool,
}

/// Ask the other members (up to two) to probe; `true` if one of them sees the instance alive.
async fn another_vantage_disagrees(member: &Member, spec: &CheckSpec) -> Option<bool> {
    let me = member.id();
    let others: Vec<u64> =
        member.members().into_iter().filter(|m| m.id != me && !m.is_learner).map(|m| m.id).take(2).collect();
    let payload = serde_json::to_vec(spec).expect("checks serialize");
    let timeout = Duration::from_secs(spec.timeout_s + 1);
    let mut answered = false;
    for id in others {
        if let Ok(bytes) = member.call_member(id, PROBE_METHOD, payload.clone(), timeout).await {
            answered = true;
            if serde_json::from_slice::<Health>(&bytes).is_ok_and(|h| h != Health::Critical) {
                return Some(true);
            }
        }
    }
    answered.then_some(false)
}

/// Per zone: (instances with an active check, those failing it now and not critical yet).
type ZoneChecks = HashMap<String, (usize, usize)>;

pub async fn run(
    member: Member,
    source: Option<IpAddr>,
    brake: Arc<SharedBrake>,
    metrics: CheckMetrics,
    changes: Arc<crate::registry_counts::RegistryCounts>,
) {
    let mut tracked: HashMap<Vec<u8>, Tracked> = HashMap::new();
    // Since when (as this leader saw it) each critical instance with a deregister deadline
    // has been critical. A new leader starts counting afresh: it errs on keeping instances.
    let mut critical_since: HashMap<Vec<u8>, Instant> = HashMap::new();
    let mut view = RegistryView::new(changes);
    let mut zones: ZoneChecks = HashMap::new();
    let mut term = 0;
    let limit = Arc::new(tokio::sync::Semaphore::new(PROBES_IN_FLIGHT_MAX));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Vec<u8>, Health)>(PROBES_IN_FLIGHT_MAX);
    let mut tick = tokio::time::interval(PROBE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some((key, outcome)) = rx.recv() => {
                metrics.result(outcome);
                judge(&member, term, &mut tracked, &brake, &zones, key, outcome, &metrics).await;
                continue;
            }
        }
        let st = member.status();
        if st.leader != Some(st.id) {
            tracked.clear();
            critical_since.clear();
            continue;
        }
        if st.term != term {
            // A new leader starts counting afresh.
            term = st.term;
            tracked.clear();
            critical_since.clear();
        }
        if brake.take_over(&member, term).await.is_err() {
            continue;
        }
        let now = Instant::now();
        let records = view.records(&member);
        zones.clear();
        for r in records.iter().filter(|r| r.instance.check.is_some()) {
            let z = zones.entry(r.instance.zone.clone()).or_default();
            z.0 += 1;
            // Failing and not critical yet, or held by the brake (a held deregistration is).
            let probe_fails = tracked.get(&r.key).is_some_and(|t| t.state.failures > 0 && !t.alive_elsewhere);
            if (probe_fails && r.instance.health != Health::Critical) || r.instance.brake_hold.is_some() {
                z.1 += 1;
            }
        }
        brake.with(term, |b| {
            for (zone, (_, failing)) in &zones {
                b.observe_checks(zone, *failing, now.into_std());
            }
        });
        let due: Vec<(Vec<u8>, CheckSpec)> = records
            .iter()
            .filter_map(|r| {
                let (key, spec) = (r.key.clone(), r.instance.check.clone()?);
                let t = tracked.entry(key.clone()).or_insert(Tracked {
                    state: CheckState::default(),
                    next_due: now,
                    alive_elsewhere: false,
                });
                (t.next_due <= now).then(|| {
                    t.next_due = now + Duration::from_secs(spec.interval_s);
                    (key, spec)
                })
            })
            .collect();
        let critical: Vec<(Vec<u8>, Instance, i64)> = records
            .iter()
            .filter(|r| r.instance.health == Health::Critical && r.instance.check.is_some())
            .map(|r| (r.key.clone(), r.instance.clone(), r.mod_revision))
            .collect();
        deregister_long_critical(&member, term, &brake, &zones, &critical, &mut critical_since, now).await;
        for (key, spec) in due {
            let (tx, limit) = (tx.clone(), limit.clone());
            tokio::spawn(async move {
                let Ok(_permit) = limit.acquire().await else { return };
                let outcome = probe(&spec, source).await;
                let _ = tx.send((key, outcome)).await;
            });
        }
    }
}

/// Deregister instances that stayed critical past their check's deadline, through the brake:
/// many of one zone due at once are held (flagged), not removed.
async fn deregister_long_critical(
    member: &Member,
    term: u64,
    brake: &SharedBrake,
    zones: &ZoneChecks,
    instances: &[(Vec<u8>, Instance, i64)],
    since: &mut HashMap<Vec<u8>, Instant>,
    now: Instant,
) {
    let mut seen = std::collections::HashSet::new();
    let mut due = Vec::new();
    for (key, instance, mod_revision) in instances {
        let Some(after) = instance.check.as_ref().and_then(|c| c.deregister_critical_after_s) else { continue };
        if instance.health != Health::Critical {
            continue;
        }
        seen.insert(key.clone());
        let t = *since.entry(key.clone()).or_insert(now);
        if now.duration_since(t) >= Duration::from_secs(after) {
            due.push((key, instance, *mod_revision, after));
        }
    }
    since.retain(|k, _| seen.contains(k));
    let mut due_in_zone: HashMap<&str, usize> = HashMap::new();
    for (_, instance, _, _) in &due {
        *due_in_zone.entry(instance.zone.as_str()).or_default() += 1;
    }
    for (key, instance, mod_revision, after) in due {
        let zone = instance.zone.as_str();
        let total = zones.get(zone).map_or(0, |z| z.0);
        let Some(verdict) =
            brake.with(term, |b| b.judge_check(zone, CheckChange::Remove, due_in_zone[zone], total, now.into_std()))
        else {
            return;
        };
        let txn = match &verdict {
            Verdict::Evict => quorate_registry::delete_if_unchanged(key, mod_revision),
            Verdict::Hold { reason } if instance.brake_hold.as_ref() != Some(reason) => {
                let held = Instance { brake_hold: Some(reason.clone()), ..instance.clone() };
                quorate_registry::replace_if_unchanged(key, mod_revision, &held)
            }
            Verdict::Hold { .. } => continue,
        };
        if member.write(Command::TermFenced { term, cmd: Box::new(Command::Txn(txn)) }).await.is_ok() {
            match verdict {
                Verdict::Evict => {
                    info!(instance = %instance.id, after_s = after, "deregistered instance: critical past its deadline")
                }
                Verdict::Hold { reason } => {
                    info!(instance = %instance.id, %reason, "eviction brake holds a deregistration")
                }
            }
        }
    }
}

/// Apply one probe result: hysteresis, confirmation, the brake, and the term-fenced write.
#[allow(clippy::too_many_arguments)]
async fn judge(
    member: &Member,
    term: u64,
    tracked: &mut HashMap<Vec<u8>, Tracked>,
    brake: &SharedBrake,
    zones: &ZoneChecks,
    key: Vec<u8>,
    outcome: Health,
    metrics: &CheckMetrics,
) {
    let Some(t) = tracked.get_mut(&key) else { return };
    let current = member.read(|s| {
        let r = s.range(&RangeRequest { key: key.clone(), ..Default::default() }).ok()?;
        let kv = r.kvs.into_iter().next()?;
        let i: Instance = serde_json::from_slice(&kv.value).ok()?;
        Some((i, kv.mod_revision))
    });
    let Some((instance, mod_revision)) = current else { return };
    let Some(spec) = instance.check.clone() else { return };
    if outcome != Health::Critical {
        t.alive_elsewhere = false;
    }
    let new = match step(instance.health, &mut t.state, outcome, &spec) {
        // A check the brake held that passes again: the flag goes.
        Step::Stay if outcome != Health::Critical && instance.brake_hold.is_some() => instance.health,
        Step::Stay => return,
        Step::Become(h) => h,
        Step::Confirm => match another_vantage_disagrees(member, &spec).await {
            Some(true) => {
                metrics.refuted.inc();
                info!(instance = %instance.id, "probe failed here but another member reaches the instance: keeping it");
                if let Some(t) = tracked.get_mut(&key) {
                    t.alive_elsewhere = true;
                }
                return;
            }
            Some(false) => {
                metrics.confirmed.inc();
                Health::Critical
            }
            None => {
                metrics.unanswered.inc();
                Health::Critical
            }
        },
    };
    if let Some(t) = tracked.get_mut(&key) {
        t.alive_elsewhere = false;
    }
    let mut updated = Instance { health: new, brake_hold: None, ..instance.clone() };
    if new == Health::Critical {
        let (total, failing) = zones.get(&instance.zone).copied().unwrap_or((1, 1));
        let now = Instant::now().into_std();
        let Some(verdict) =
            brake.with(term, |b| b.judge_check(&instance.zone, CheckChange::MarkCritical, failing, total, now))
        else {
            return;
        };
        if let Verdict::Hold { reason } = verdict {
            if instance.brake_hold.as_ref() == Some(&reason) {
                return;
            }
            info!(instance = %instance.id, %reason, "eviction brake holds a check's critical status");
            updated = Instance { brake_hold: Some(reason), ..instance.clone() };
        }
    }
    let txn = quorate_registry::replace_if_unchanged(&key, mod_revision, &updated);
    match member.write(Command::TermFenced { term, cmd: Box::new(Command::Txn(txn)) }).await {
        Ok(_) => info!(instance = %instance.id, from = ?instance.health, to = ?new, "health check changed status"),
        Err(e) => warn!(instance = %instance.id, error = %e, "health status write failed"),
    }
}
