//! `quorate ctl audit`: the registry against reality. Reads the registry at one revision from
//! every member (each answers from its own state, so a member whose view differs is found),
//! then probes every instance's own health endpoint from this host, a few times, with bounded
//! concurrency and timeouts, and judges each instance: `agrees`, `ghost` (registered healthy,
//! dead), `zombie` (registered critical or suspect, answering) or `flapping`.
//!
//! Judging is pure (`judge_instance`, `compare_views`) and table-tested; reading and probing
//! are the IO around it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use quorate_api_grpc::pb::etcdserverpb as pb;
use quorate_registry::{Health, Instance};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::collect::{bounded, dial, member_list};
use crate::Options;

/// What `ctl audit` takes beyond the global flags.
#[derive(Clone, Debug)]
pub struct AuditOptions {
    pub namespace: Option<String>,
    pub service: Option<String>,
    /// Probe instances without an HTTP check over HTTP at this path (else over TCP).
    pub health_path: Option<String>,
    /// Probes per instance (at least 1); mixed answers are `flapping`.
    pub probes: u32,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    /// Instances probed at once.
    pub concurrency: usize,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            namespace: None,
            service: None,
            health_path: None,
            probes: 3,
            probe_interval: Duration::from_millis(300),
            probe_timeout: Duration::from_secs(2),
            concurrency: 32,
        }
    }
}

/// The verdict on one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceVerdict {
    /// The registry says what the instance does: healthy and answering, or marked down and dead.
    Agrees,
    /// Registered as healthy (or warning) and dead: traffic is sent to nothing.
    Ghost,
    /// Registered as critical (or held suspect) and answering: traffic is kept from a live one.
    Zombie,
    /// Answered some probes and not others.
    Flapping,
    /// Nothing to probe: no check, and no port (a Consul service registered without one).
    Unprobeable,
}

/// The registry's word on an instance and what the probes found: the pure core.
pub fn judge_instance(instance: &Instance, probes: &[bool]) -> InstanceVerdict {
    if probes.is_empty() {
        return InstanceVerdict::Unprobeable;
    }
    let alive = probes.iter().filter(|p| **p).count();
    if alive > 0 && alive < probes.len() {
        return InstanceVerdict::Flapping;
    }
    let answering = alive > 0;
    let registered_up = instance.health != Health::Critical && !instance.suspect;
    match (registered_up, answering) {
        (true, true) | (false, false) => InstanceVerdict::Agrees,
        (true, false) => InstanceVerdict::Ghost,
        (false, true) => InstanceVerdict::Zombie,
    }
}

/// One member's view of the registry at the audit's revision: key -> value.
pub type View = BTreeMap<Vec<u8>, Vec<u8>>;

/// Members whose view differs from the view most members hold, each with how many keys differ
/// (present on one side only, or with other values). Ties go to the first view listed.
pub fn compare_views(views: &[(String, View)]) -> Vec<(String, usize)> {
    let Some(reference) = views.iter().max_by_key(|(_, v)| views.iter().filter(|(_, w)| w == v).count()) else {
        return Vec::new();
    };
    let reference = &reference.1;
    views
        .iter()
        .filter(|(_, v)| v != reference)
        .map(|(name, v)| {
            let only_or_changed = v.iter().filter(|(k, val)| reference.get(*k) != Some(*val)).count();
            let missing = reference.keys().filter(|k| !v.contains_key(*k)).count();
            (name.clone(), only_or_changed + missing)
        })
        .collect()
}

#[derive(Clone, Debug, Serialize)]
pub struct AuditedInstance {
    pub namespace: String,
    pub service: String,
    pub id: String,
    pub address: String,
    pub zone: String,
    /// `ephemeral` (lives while heartbeats arrive) or `persistent` (until deregistered).
    pub kind: String,
    /// The members probe it themselves (its health comes from their check, not its owner).
    pub active_check: bool,
    /// Its registry key, and its mod revision when the audit read it (a repair acts only on an
    /// instance still at that revision).
    pub key: String,
    pub mod_revision: i64,
    /// passing, warning or critical; `suspect` when the brake holds it after its lease expired.
    pub registered: String,
    /// The user that registered it (with auth on; `-` otherwise).
    pub registered_by: String,
    /// What was probed: `http://…` or `tcp://host:port`.
    pub probe: String,
    /// Each probe's answer (true: alive).
    pub probes: Vec<bool>,
    /// The last probe's failure, if any.
    pub error: Option<String>,
    pub verdict: InstanceVerdict,
}

#[derive(Clone, Debug, Serialize)]
pub struct MemberAudit {
    pub name: String,
    pub endpoint: String,
    /// Its view matches the majority's at the audit's revision.
    pub agrees: bool,
    pub differing_keys: usize,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuditReport {
    /// The revision every member's view was read at.
    pub revision: i64,
    pub instances: Vec<AuditedInstance>,
    pub members: Vec<MemberAudit>,
    pub agrees: usize,
    pub ghosts: usize,
    pub zombies: usize,
    pub flapping: usize,
    pub unprobeable: usize,
    /// With `--repair`: what would be (or was) done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<RepairReport>,
}

/// One repair: deregister a ghost, or mark a zombie its check marked critical passing again.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PlannedRepair {
    pub key: String,
    pub mod_revision: i64,
    /// `deregister` or `mark-passing` (the leader's `/v1/registry/repair` actions).
    pub action: &'static str,
    pub instance: String,
    pub verdict: InstanceVerdict,
}

#[derive(Clone, Debug, Serialize)]
pub struct RepairReport {
    pub planned: Vec<PlannedRepair>,
    /// Instances the audit flagged that no repair can fix (flapping ones, suspect zombies), why.
    pub skipped: Vec<(String, String)>,
    /// The leader's answer, one result per action (`done`, `changed`, `held`, `refused`,
    /// `failed`); absent on a dry run.
    pub applied: Option<serde_json::Value>,
}

impl RepairReport {
    /// Applied, and every action done.
    pub fn complete(&self) -> bool {
        self.applied
            .as_ref()
            .and_then(|a| a["results"].as_array())
            .is_some_and(|r| r.len() == self.planned.len() && r.iter().all(|x| x["outcome"] == "done"))
    }
}

/// The repairs an audit calls for: the pure half of `--repair`.
pub fn plan_repairs(r: &AuditReport) -> RepairReport {
    let mut planned = Vec::new();
    let mut skipped = Vec::new();
    for i in &r.instances {
        let name = format!("{}/{}/{}", i.namespace, i.service, i.id);
        let action = match (i.verdict, i.registered.as_str()) {
            (InstanceVerdict::Agrees | InstanceVerdict::Unprobeable, _) => continue,
            (InstanceVerdict::Ghost, _) if i.kind == "persistent" => {
                skipped.push((name, "persistent: lives until its owner deregisters it".into()));
                continue;
            }
            (InstanceVerdict::Ghost, _) => "deregister",
            (InstanceVerdict::Zombie, "critical") if i.active_check => "mark-passing",
            (InstanceVerdict::Zombie, "critical") => {
                skipped.push((
                    name,
                    "its owner marked it critical (no active check of the members'): not overridden".into(),
                ));
                continue;
            }
            (InstanceVerdict::Zombie, _) => {
                skipped.push((name, "suspect: its own heartbeat or re-registration brings it back".into()));
                continue;
            }
            (InstanceVerdict::Flapping, _) => {
                skipped.push((name, "flapping: look at the instance before trusting either answer".into()));
                continue;
            }
        };
        planned.push(PlannedRepair {
            key: i.key.clone(),
            mod_revision: i.mod_revision,
            action,
            instance: name,
            verdict: i.verdict,
        });
    }
    RepairReport { planned, skipped, applied: None }
}

/// Send the plan to the leader, which carries it out through the registry's rules.
/// `health_path` is the audit's, so that the leader confirms each ghost with the same probe.
pub async fn apply_repairs(opts: &Options, plan: &mut RepairReport, health_path: Option<&str>) -> anyhow::Result<()> {
    if plan.planned.is_empty() {
        plan.applied = Some(serde_json::json!({"results": []}));
        return Ok(());
    }
    let view = crate::collect::collect(opts).await;
    let leader = view
        .members
        .iter()
        .find(|m| m.role.as_deref() == Some("leader") && m.http_addr.is_some())
        .ok_or_else(|| anyhow::anyhow!("no reachable leader to repair through"))?;
    let addr = leader.http_addr.clone().expect("checked");
    let actions: Vec<serde_json::Value> = plan
        .planned
        .iter()
        .map(|p| serde_json::json!({"key": p.key, "mod_revision": p.mod_revision, "action": p.action}))
        .collect();
    let body = serde_json::json!({ "actions": actions, "health_path": health_path }).to_string();
    let (code, reply) =
        crate::collect::http_post(opts, &addr, "/v1/registry/repair", &body, opts.command_timeout * 4).await?;
    let reply: serde_json::Value = serde_json::from_str(&reply)
        .map_err(|e| anyhow::anyhow!("leader {} answered {code}: {e}: {reply}", leader.name))?;
    if code != 200 {
        anyhow::bail!("leader {} refused the repair ({code}): {}", leader.name, reply["error"]);
    }
    plan.applied = Some(reply);
    Ok(())
}

impl AuditReport {
    /// Everything agrees: every instance, and every member that answered.
    pub fn clean(&self) -> bool {
        self.ghosts + self.zombies + self.flapping == 0 && self.members.iter().all(|m| m.agrees)
    }
}

fn registry_prefix(a: &AuditOptions) -> String {
    use quorate_registry::{namespace_prefix, service_prefix, DEFAULT_NAMESPACE, REGISTRY_PREFIX};
    match (&a.namespace, &a.service) {
        (Some(ns), Some(svc)) => service_prefix(ns, svc),
        (Some(ns), None) => namespace_prefix(ns),
        (None, Some(svc)) => service_prefix(DEFAULT_NAMESPACE, svc),
        (None, None) => REGISTRY_PREFIX.to_string(),
    }
}

fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Each key's mod revision, as one member read them.
type Revisions = BTreeMap<Vec<u8>, i64>;

async fn read_view(
    endpoint: &str,
    prefix: &[u8],
    revision: i64,
    opts: &Options,
) -> anyhow::Result<(View, Revisions, i64)> {
    let ch = bounded(opts.dial_timeout, dial(endpoint, opts)).await?;
    let mut kv = pb::kv_client::KvClient::new(ch).max_decoding_message_size(usize::MAX);
    let req = pb::RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        revision,
        serializable: revision != 0,
        ..Default::default()
    };
    // A member a little behind has not applied `revision` yet: give it a moment.
    let mut last = None;
    for _ in 0..10 {
        match bounded(opts.command_timeout, kv.range(req.clone())).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                let rev = resp.header.map_or(0, |h| h.revision);
                let revs = resp.kvs.iter().map(|kv| (kv.key.clone(), kv.mod_revision)).collect();
                return Ok((resp.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect(), revs, rev));
            }
            Err(e) if e.to_string().contains("future revision") => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no answer")))
}

/// What to probe for an instance: its HTTP check, its TCP check, `--health-path` over HTTP,
/// or its address over TCP.
fn probe_target(i: &Instance, health_path: Option<&str>) -> String {
    if let Some(c) = &i.check {
        if let Some(url) = &c.http {
            return url.clone();
        }
        if let Some(tcp) = &c.tcp {
            return format!("tcp://{tcp}");
        }
    }
    let host = if i.address.contains(':') { format!("[{}]", i.address) } else { i.address.clone() };
    match health_path {
        Some(p) => format!("http://{host}:{}{}{p}", i.port, if p.starts_with('/') { "" } else { "/" }),
        None => format!("tcp://{host}:{}", i.port),
    }
}

/// One probe: a TCP connect, or an HTTP GET judged as the members' own HTTP checks judge it
/// (2xx passing, 429 warning: alive; anything else critical). Plain HTTP only.
async fn probe_once(target: &str, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        if let Some(addr) = target.strip_prefix("tcp://") {
            tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            return Ok(());
        }
        let rest = target.strip_prefix("http://").ok_or_else(|| format!("cannot probe {target}: plain http only"))?;
        let (addr, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: quorate-ctl-audit\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        // The status line may come in pieces: read until it is whole (or 1 KiB, or the end).
        let mut head = Vec::new();
        let mut chunk = [0u8; 256];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_string();
        let code: u16 = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("malformed HTTP reply")?;
        if quorate_registry::http_outcome(code) != Health::Critical {
            Ok(())
        } else {
            Err(format!("HTTP {code}"))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

async fn probe_instance(target: String, a: &AuditOptions) -> (Vec<bool>, Option<String>) {
    let mut results = Vec::new();
    let mut error = None;
    for n in 0..a.probes.max(1) {
        if n > 0 {
            tokio::time::sleep(a.probe_interval).await;
        }
        match probe_once(&target, a.probe_timeout).await {
            Ok(()) => results.push(true),
            Err(e) => {
                results.push(false);
                error = Some(e);
            }
        }
    }
    (results, error)
}

/// Read, probe and judge.
pub async fn audit(opts: &Options, a: &AuditOptions) -> anyhow::Result<AuditReport> {
    let prefix = registry_prefix(a);
    let members = member_list(opts).await.map_err(anyhow::Error::msg)?;
    // The revision: the latest, read linearizably through the first endpoint that answers.
    let mut revision = None;
    let mut errors = Vec::new();
    for e in &opts.endpoints {
        match read_view(e, prefix.as_bytes(), 0, opts).await {
            Ok((_, _, rev)) => {
                revision = Some(rev);
                break;
            }
            Err(err) => errors.push(format!("{e}: {err}")),
        }
    }
    let revision = revision.ok_or_else(|| anyhow::anyhow!("no endpoint answered a read: {}", errors.join("; ")))?;

    let reads = members.iter().filter(|m| !m.client_ur_ls.is_empty()).map(|m| {
        let endpoint = m.client_ur_ls[0].clone();
        let name = if m.name.is_empty() { format!("{:x}", m.id) } else { m.name.clone() };
        let prefix = prefix.clone();
        async move {
            let view = read_view(&endpoint, prefix.as_bytes(), revision, opts).await;
            (name, endpoint, view)
        }
    });
    let read = futures::future::join_all(reads).await;
    let views: Vec<(String, View)> =
        read.iter().filter_map(|(n, _, v)| v.as_ref().ok().map(|(v, _, _)| (n.clone(), v.clone()))).collect();
    let differing: BTreeMap<String, usize> = compare_views(&views).into_iter().collect();
    let mut member_audits: Vec<MemberAudit> = read
        .iter()
        .map(|(name, endpoint, v)| MemberAudit {
            name: name.clone(),
            endpoint: endpoint.clone(),
            agrees: v.is_ok() && !differing.contains_key(name),
            differing_keys: differing.get(name).copied().unwrap_or(0),
            error: v.as_ref().err().map(|e| e.to_string()),
        })
        .collect();
    member_audits.sort_by(|a, b| a.name.cmp(&b.name));
    // The instances as most members hold them.
    let (majority, revs) = read
        .iter()
        .find_map(|(n, _, v)| v.as_ref().ok().filter(|_| !differing.contains_key(n)).map(|(v, r, _)| (v, r)))
        .ok_or_else(|| anyhow::anyhow!("no member could be read at revision {revision}"))?;

    let instances: Vec<(String, i64, Instance)> = majority
        .iter()
        .filter_map(|(k, v)| {
            let i = serde_json::from_slice(v).ok()?;
            Some((String::from_utf8_lossy(k).into_owned(), revs.get(k).copied().unwrap_or(0), i))
        })
        .collect();
    let limit = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let probes = instances.into_iter().map(|(key, mod_revision, i)| {
        let limit = limit.clone();
        async move {
            let target = probe_target(&i, a.health_path.as_deref());
            let (probes, error) = if i.port == 0 && i.check.is_none() {
                (Vec::new(), Some("no port and no check: nothing to probe".to_string()))
            } else {
                let _permit = limit.acquire().await.expect("never closed");
                probe_instance(target.clone(), a).await
            };
            let verdict = judge_instance(&i, &probes);
            AuditedInstance {
                registered: if i.suspect { "suspect".into() } else { health_name(i.health).into() },
                registered_by: i.registered_by.clone().unwrap_or_else(|| "-".into()),
                namespace: i.namespace,
                service: i.service,
                id: i.id,
                address: format!("{}:{}", i.address, i.port),
                zone: i.zone,
                kind: format!("{:?}", i.kind).to_lowercase(),
                active_check: i.check.is_some(),
                key,
                mod_revision,
                probe: target,
                probes,
                error,
                verdict,
            }
        }
    });
    let instances = futures::future::join_all(probes).await;
    let count = |v: InstanceVerdict| instances.iter().filter(|i| i.verdict == v).count();
    Ok(AuditReport {
        repair: None,
        revision,
        agrees: count(InstanceVerdict::Agrees),
        ghosts: count(InstanceVerdict::Ghost),
        zombies: count(InstanceVerdict::Zombie),
        flapping: count(InstanceVerdict::Flapping),
        unprobeable: count(InstanceVerdict::Unprobeable),
        instances,
        members: member_audits,
    })
}

fn health_name(h: Health) -> &'static str {
    match h {
        Health::Passing => "passing",
        Health::Warning => "warning",
        Health::Critical => "critical",
    }
}

/// The table an operator reads.
pub fn render(r: &AuditReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "audit at revision {}: {} instances, {} agree, {} ghosts, {} zombies, {} flapping",
        r.revision,
        r.instances.len(),
        r.agrees,
        r.ghosts,
        r.zombies,
        r.flapping
    );
    let mut rows = vec![[
        "VERDICT",
        "NAMESPACE",
        "SERVICE",
        "INSTANCE",
        "ADDRESS",
        "ZONE",
        "REGISTERED",
        "BY",
        "PROBES",
        "DETAIL",
    ]
    .map(String::from)
    .to_vec()];
    for i in &r.instances {
        let probes: String = i.probes.iter().map(|p| if *p { '+' } else { '-' }).collect();
        rows.push(vec![
            format!("{:?}", i.verdict).to_lowercase(),
            i.namespace.clone(),
            i.service.clone(),
            i.id.clone(),
            i.address.clone(),
            i.zone.clone(),
            i.registered.clone(),
            i.registered_by.clone(),
            probes,
            format!("{}{}", i.probe, i.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    for row in rows.iter().filter(|_| !r.instances.is_empty()) {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    for m in &r.members {
        let what = match (&m.error, m.agrees) {
            (Some(e), _) => format!("unreadable: {e}"),
            (None, true) => "agrees".into(),
            (None, false) => format!("DISAGREES: {} keys differ from the majority's view", m.differing_keys),
        };
        let _ = writeln!(out, "member {} ({}): {what}", m.name, m.endpoint);
    }
    if let Some(rep) = &r.repair {
        match &rep.applied {
            None if rep.planned.is_empty() => {
                let _ = writeln!(out, "repair: nothing to repair");
            }
            None => {
                let _ = writeln!(out, "repair plan (dry run; add --yes to carry it out):");
                for p in &rep.planned {
                    let _ = writeln!(out, "  {} {} ({:?})", p.action, p.instance, p.verdict);
                }
            }
            Some(applied) => {
                let _ = writeln!(out, "repair carried out by the leader (term {}):", applied["term"]);
                for res in applied["results"].as_array().into_iter().flatten() {
                    let key = res["key"].as_str().unwrap_or_default();
                    let name = rep.planned.iter().find(|p| p.key == key).map_or(key, |p| p.instance.as_str());
                    let detail = res["detail"].as_str().filter(|d| !d.is_empty()).map(|d| format!(": {d}"));
                    let (outcome, action) =
                        (res["outcome"].as_str().unwrap_or("?"), res["action"].as_str().unwrap_or("?"));
                    let _ = writeln!(out, "  {outcome} {action} {name}{}", detail.unwrap_or_default());
                }
            }
        }
        for (name, why) in &rep.skipped {
            let _ = writeln!(out, "  not repaired: {name}: {why}");
        }
    }
    out
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

    #[test]
    fn each_instance_is_judged_by_what_it_is_registered_as_and_what_answers() {
        use InstanceVerdict::*;
        let cases = [
            (Health::Passing, false, vec![true, true, true], Agrees),
            (Health::Passing, false, vec![false, false, false], Ghost),
            (Health::Warning, false, vec![false], Ghost),
            (Health::Warning, false, vec![true], Agrees),
            (Health::Critical, false, vec![true, true], Zombie),
            (Health::Critical, false, vec![false, false], Agrees),
            (Health::Passing, true, vec![true, true], Zombie),
            (Health::Passing, true, vec![false], Agrees),
            (Health::Passing, false, vec![true, false, true], Flapping),
            (Health::Critical, false, vec![false, true], Flapping),
        ];
        for (health, suspect, probes, want) in cases {
            assert_eq!(
                judge_instance(&instance(health, suspect), &probes),
                want,
                "{health:?} suspect={suspect} {probes:?}"
            );
        }
    }

    #[test]
    fn the_member_whose_view_differs_from_the_majority_is_named() {
        let a: View = [(b"k1".to_vec(), b"v".to_vec()), (b"k2".to_vec(), b"v".to_vec())].into();
        let mut b = a.clone();
        b.insert(b"k2".to_vec(), b"other".to_vec());
        b.insert(b"k3".to_vec(), b"extra".to_vec());
        b.remove(b"k1".as_slice());
        let views = vec![("m1".to_string(), a.clone()), ("m2".to_string(), b), ("m3".to_string(), a.clone())];
        assert_eq!(compare_views(&views), vec![("m2".to_string(), 3)]);
        assert!(compare_views(&[("m1".into(), a.clone()), ("m2".into(), a)]).is_empty());
        assert!(compare_views(&[]).is_empty());
    }

    #[test]
    fn probe_targets_prefer_the_instances_own_check() {
        let mut i = instance(Health::Passing, false);
        assert_eq!(probe_target(&i, None), "tcp://127.0.0.1:8080");
        assert_eq!(probe_target(&i, Some("/health")), "http://127.0.0.1:8080/health");
        assert_eq!(probe_target(&i, Some("health")), "http://127.0.0.1:8080/health");
        i.address = "::1".into();
        assert_eq!(probe_target(&i, None), "tcp://[::1]:8080");
        i.check = Some(serde_json::from_value(serde_json::json!({"http": "http://10.0.0.1:9/ok"})).unwrap());
        assert_eq!(probe_target(&i, Some("/health")), "http://10.0.0.1:9/ok");
    }

    #[test]
    fn the_registry_prefix_follows_the_filters() {
        let mut a = AuditOptions::default();
        assert_eq!(registry_prefix(&a), "/quorate/registry/");
        a.service = Some("web".into());
        assert_eq!(registry_prefix(&a), "/quorate/registry/default/web/");
        a.namespace = Some("prod".into());
        assert_eq!(registry_prefix(&a), "/quorate/registry/prod/web/");
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
    }
}
