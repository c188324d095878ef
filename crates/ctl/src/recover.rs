//! `quorate ctl recover`: after losing a quorum for good, make the survivors a cluster again
//! (ADR 0009 §2). A dry run prints the plan; `--apply` has every survivor apply it: the running
//! ones over their `/v1/member/recover` (each restarts in place), the stopped ones (`--data-dir`)
//! written here. The cluster's incarnation is raised, which fences the dropped members.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use quorate_consensus::recovery::{self, RecoveryInfo, RecoveryPlan};
use serde::Serialize;

use crate::collect::{collect, http_get, http_post};
use crate::Options;

pub struct RecoverOptions {
    /// Data directories of stopped survivors.
    pub data_dirs: Vec<PathBuf>,
    pub apply: bool,
}

/// Where a survivor answers: a running member's HTTP address, or a stopped one's data directory.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    Http(String),
    DataDir(PathBuf),
}

#[derive(Serialize)]
pub struct Survivor {
    pub via: Via,
    pub info: RecoveryInfo,
    /// A stopped survivor's data directory, held open from the plan to the apply.
    #[serde(skip)]
    pub stopped: Option<recovery::Stopped>,
}

#[derive(Default, Serialize)]
pub struct RecoverReport {
    pub survivors: Vec<Survivor>,
    pub plan: Option<RecoveryPlan>,
    /// Why there is no plan.
    pub refused: Option<String>,
    /// With `--apply`: what each survivor said.
    pub applied: Vec<(String, String)>,
    /// With `--apply`: the leader of the recovered cluster, once one is elected.
    pub leader: Option<String>,
    pub error: Option<String>,
}

/// How long `--apply` waits for the recovered cluster to elect a leader.
const LEADER_WAIT: Duration = Duration::from_secs(30);

async fn gather(opts: &Options, r: &RecoverOptions) -> Result<Vec<Survivor>, String> {
    let mut survivors = Vec::new();
    let view = collect(opts).await;
    for m in view.members.iter().filter(|m| m.reachable) {
        let Some(addr) = &m.http_addr else { continue };
        let body = http_get(opts, addr, "/v1/member/recovery", opts.command_timeout)
            .await
            .map_err(|e| format!("{}: {addr}/v1/member/recovery: {e}", m.name))?;
        let info: RecoveryInfo = serde_json::from_str(&body).map_err(|e| format!("{addr}: {e}"))?;
        survivors.push(Survivor { via: Via::Http(addr.clone()), info, stopped: None });
    }
    for dir in &r.data_dirs {
        let stopped = recovery::Stopped::open(dir)?;
        let info = stopped.info()?;
        if survivors.iter().any(|s| s.info.id == info.id) {
            return Err(format!("{} belongs to member {:x}, which is running", dir.display(), info.id));
        }
        survivors.push(Survivor { via: Via::DataDir(dir.clone()), info, stopped: Some(stopped) });
    }
    Ok(survivors)
}

/// A dropped member that still answers on one of its client URLs: the plan must not drop it.
async fn answering_dropped(plan: &RecoveryPlan, survivors: &[Survivor], limit: Duration) -> Option<String> {
    // Every survivor's view: a stopped one knows no client URLs.
    let members: Vec<_> = survivors.iter().flat_map(|s| s.info.members.iter()).collect();
    for m in members.into_iter().filter(|m| plan.dropped.contains(&m.id)) {
        for url in &m.client_urls {
            let hostport = url.split("://").nth(1).unwrap_or(url).trim_end_matches('/').to_string();
            if let Ok(Ok(_)) = tokio::time::timeout(limit, tokio::net::TcpStream::connect(&hostport)).await {
                return Some(format!(
                    "member {} ({:x}) answers at {url}: it is not gone. Include it (give its endpoint), or stop it for good first",
                    m.name, m.id
                ));
            }
        }
    }
    None
}

pub async fn recover(opts: &Options, r: &RecoverOptions) -> RecoverReport {
    let mut report = RecoverReport::default();
    report.survivors = match gather(opts, r).await {
        Ok(s) => s,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    let infos: Vec<RecoveryInfo> = report.survivors.iter().map(|s| s.info.clone()).collect();
    let mut plan = match recovery::plan(&infos, &crate::isolate::operator()) {
        Ok(p) => p,
        Err(e) => {
            report.refused = Some(e);
            return report;
        }
    };
    if let Some(why) = answering_dropped(&plan, &report.survivors, opts.dial_timeout).await {
        report.refused = Some(why);
        return report;
    }
    if !r.apply {
        report.plan = Some(plan);
        return report;
    }
    plan.at_unix_ms = quorate_consensus::flight::unix_ms() as u64;
    // The chosen survivor last: the others are then already of the new incarnation when it
    // campaigns.
    let mut order: Vec<&Survivor> = report.survivors.iter().collect();
    order.sort_by_key(|s| s.info.id == plan.chosen);
    let mut applied = Vec::new();
    for s in order {
        let name = if s.info.name.is_empty() { format!("{:x}", s.info.id) } else { s.info.name.clone() };
        let outcome = match &s.via {
            Via::DataDir(_) => match &s.stopped {
                Some(stopped) => stopped.apply(&plan).await.map(|a| format!("{a:?} (offline)")),
                None => Err("the data directory is not open".to_string()),
            },
            Via::Http(addr) => {
                let body = serde_json::to_string(&plan).expect("a plan serializes");
                match http_post(opts, addr, "/v1/member/recover", &body, opts.command_timeout * 3).await {
                    Ok((200, reply)) => Ok(reply),
                    Ok((code, reply)) => Err(format!("{code}: {reply}")),
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        match outcome {
            Ok(o) => applied.push((name, o)),
            Err(e) => {
                applied.push((name.clone(), format!("FAILED: {e}")));
                report.error =
                    Some(format!("{name} did not apply the plan: {e}; fix it and run the same command again"));
                report.applied = applied;
                report.plan = Some(plan);
                return report;
            }
        }
    }
    report.applied = applied;
    report.leader = wait_leader(opts, &report.survivors, plan.incarnation).await;
    if report.leader.is_none() && !report.survivors.iter().all(|s| matches!(s.via, Via::DataDir(_))) {
        let stopped: Vec<String> = report
            .survivors
            .iter()
            .filter(|s| matches!(s.via, Via::DataDir(_)))
            .map(|s| name_of(&report, s.info.id))
            .collect();
        let hint = match stopped.is_empty() {
            true => String::new(),
            false => {
                format!(": start the stopped survivors ({}) if the others alone are no majority", stopped.join(", "))
            }
        };
        report.error = Some(format!("no leader of incarnation {} within {LEADER_WAIT:?}{hint}", plan.incarnation));
    }
    report.plan = Some(plan);
    report
}

/// The leader of the recovered cluster, as the running survivors report it.
async fn wait_leader(opts: &Options, survivors: &[Survivor], incarnation: u64) -> Option<String> {
    let addrs: Vec<&String> =
        survivors.iter().filter_map(|s| if let Via::Http(a) = &s.via { Some(a) } else { None }).collect();
    if addrs.is_empty() {
        return None;
    }
    let deadline = Instant::now() + LEADER_WAIT;
    while Instant::now() < deadline {
        for a in &addrs {
            let Ok(body) = http_get(opts, a, "/v1/member/status", opts.command_timeout).await else { continue };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else { continue };
            if v["role"] == "leader" && v["incarnation"] == incarnation {
                return Some(format!("{} in term {}", v["id"].as_str().unwrap_or("?"), v["term"]));
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    None
}

fn name_of(r: &RecoverReport, id: u64) -> String {
    let known = r.survivors.iter().flat_map(|s| &s.info.members).find(|m| m.id == id);
    match known {
        Some(m) if !m.name.is_empty() => format!("{} ({id:x})", m.name),
        _ => format!("{id:x}"),
    }
}

pub fn render(r: &RecoverReport) -> String {
    let mut out = String::new();
    for s in &r.survivors {
        let i = &s.info;
        let via = match &s.via {
            Via::Http(a) => a.clone(),
            Via::DataDir(d) => format!("{} (stopped)", d.display()),
        };
        let last = i.last_log.map_or("none".into(), |l| format!("term {} index {}", l.term, l.index));
        let _ = writeln!(
            out,
            "survivor {} at {via}: incarnation {}, last log {last}, committed {}, applied {}, term {}",
            name_of(r, i.id),
            i.incarnation,
            i.committed,
            i.applied,
            i.term
        );
    }
    if let Some(e) = &r.refused {
        let _ = writeln!(out, "refused: {e}");
    }
    if let Some(p) = &r.plan {
        let head = if r.applied.is_empty() { "(dry run; add --apply to carry it out)" } else { "" };
        let _ = writeln!(out, "recovery plan {} {head}", p.plan_id);
        let _ = writeln!(out, "  incarnation: {} -> {}", p.from_incarnation, p.incarnation);
        let voters: Vec<String> = p.voters.iter().map(|v| name_of(r, *v)).collect();
        let _ = writeln!(out, "  new voters (the survivors): {}", voters.join(", "));
        let _ = writeln!(out, "  chosen (the most recent log): {}", name_of(r, p.chosen));
        let dropped: Vec<String> = p.dropped.iter().map(|v| name_of(r, *v)).collect();
        let _ = writeln!(
            out,
            "  dropped: {}. They must stay down: restarted on their old data they are refused by every member; \
             to bring one back, wipe its data directory and add it with `etcdctl member add`",
            if dropped.is_empty() { "none".into() } else { dropped.join(", ") }
        );
        let _ = writeln!(
            out,
            "  kept: everything committed up to log index {} (the highest commit a survivor knew of), and the chosen \
             survivor's log up to index {}, uncommitted entries included",
            p.highest_commit_seen, p.kept_up_to
        );
        let _ = writeln!(
            out,
            "  may be lost: writes acknowledged after log index {}: the dropped members may have committed other \
             entries than the survivors hold there",
            p.highest_commit_seen
        );
    }
    for (name, outcome) in &r.applied {
        let _ = writeln!(out, "applied on {name}: {outcome}");
    }
    if let Some(l) = &r.leader {
        let _ = writeln!(out, "recovered: leader {l}. Next: `quorate ctl verify`");
    }
    if let Some(e) = &r.error {
        let _ = writeln!(out, "error: {e}");
    }
    out
}

impl RecoverReport {
    /// 0: a plan (dry run) or a recovery done; 1: refused or failed.
    pub fn exit_code(&self) -> i32 {
        if self.error.is_some() || self.refused.is_some() || self.plan.is_none() {
            1
        } else {
            0
        }
    }
}
