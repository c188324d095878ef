//! The `quorum-loss` fault (issue 13 §6, ADR 0009): a majority including the leader is killed
//! for good, the survivors are recovered the way `quorate ctl recover --apply` does it, the
//! dropped members are restarted on their old data (they must be refused, and must not move
//! the survivors' term), then wiped and added again.
//!
//! The writers are held (`Recorder::hold`) and the cluster left to converge before the kill, so
//! that every acknowledged operation is on every member: the recovery plan then announces no
//! possible loss (its bound is the commit index the leader had), and any acknowledged write the
//! checkers find lost is an anomaly, as usual. They stay held until the dropped members have
//! been re-added: the recovery is judged on a quiet cluster, the cluster it leaves under load.
//! What goes wrong in the recovery itself is recorded in `Recorded::recovery_failures`.
//! (Announced losses, from a recovery under load, need the checkers to know each
//! acknowledgement's revision: ADR 0009 §3.)

use std::time::Duration;

use anyhow::{bail, Context};
use quorate_consensus::recovery::{self, RecoveryInfo, RecoveryPlan};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::faults::{leader, status};
use crate::hosts::Hosts;
use crate::workload::{Recorder, OP_TIMEOUT};

/// How long the cluster may take to converge while quiet, to stop hearing the dead leader, and
/// to elect the recovered leader.
const SETTLE: Duration = Duration::from_secs(20);
/// How long the dropped members are watched once restarted on their old data.
const DROPPED_WATCH: Duration = Duration::from_secs(5);

async fn http_json(
    hosts: &Hosts,
    slot: usize,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<serde_json::Value> {
    let (code, reply) = crate::http::call(&hosts.http_addr(slot), method, path, body, Duration::from_secs(5)).await?;
    if code != 200 {
        bail!("{path}: {code}: {reply}");
    }
    serde_json::from_str(&reply).context("not JSON")
}

async fn info(hosts: &Hosts, slot: usize) -> anyhow::Result<RecoveryInfo> {
    let v = http_json(hosts, slot, "GET", "/v1/member/recovery", "").await?;
    serde_json::from_value(v).context("recovery info")
}

/// Poll until `done` or `SETTLE` passes.
async fn until<F: std::future::Future<Output = bool>>(mut done: impl FnMut() -> F) -> bool {
    let deadline = tokio::time::Instant::now() + SETTLE;
    while tokio::time::Instant::now() < deadline {
        if done().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Every member's applied index equals the leader's commit index (the quiet cluster has
/// converged); that commit index.
async fn converged(hosts: &Hosts) -> Option<u64> {
    let l = leader(hosts).await?;
    let commit = status(hosts, l).await?.raft_index;
    for slot in 0..hosts.members.len() {
        if status(hosts, slot).await?.raft_applied_index < commit {
            return None;
        }
    }
    Some(commit)
}

pub async fn inject(hosts: &mut Hosts, rng: &mut StdRng, rec: &Recorder) -> anyhow::Result<String> {
    use std::sync::atomic::Ordering::SeqCst;
    rec.hold.store(true, SeqCst);
    let (mut failures, mut killed) = (Vec::new(), false);
    let result = run(hosts, rng, rec, &mut failures, &mut killed).await;
    rec.hold.store(false, SeqCst);
    // Once the majority is dead, an error is the recovery's failure too, never a skipped fault.
    if let (Err(e), true) = (&result, killed) {
        failures.push(format!("the recovery stopped: {e:#}"));
    }
    let mut r = rec.rec.lock().unwrap();
    r.recoveries += usize::from(killed);
    r.recovery_failures.extend(failures);
    result
}

async fn run(
    hosts: &mut Hosts,
    rng: &mut StdRng,
    rec: &Recorder,
    failures: &mut Vec<String>,
    killed_any: &mut bool,
) -> anyhow::Result<String> {
    let n = hosts.members.len();
    let name = |h: &Hosts, s: usize| h.members[s].name.clone();
    // Quiet: every writer's operation under way has ended (a lock session takes seconds), a
    // candidate's grant and campaign (two operations started just before the hold) too, and
    // every member has everything the leader committed.
    let deadline = tokio::time::Instant::now() + SETTLE;
    while rec.busy.load(std::sync::atomic::Ordering::SeqCst) > 0 {
        if tokio::time::Instant::now() > deadline {
            return Ok("skipped: the writers did not finish while held".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(OP_TIMEOUT * 2 + Duration::from_millis(500)).await;
    let deadline = tokio::time::Instant::now() + SETTLE;
    let commit = loop {
        if let Some(c) = converged(hosts).await {
            break c;
        }
        if tokio::time::Instant::now() > deadline {
            return Ok("skipped: the cluster did not converge while quiet".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let l = leader(hosts).await.context("no leader")?;
    let mut others: Vec<usize> = (0..n).filter(|s| *s != l).collect();
    others.shuffle(rng);
    let mut dropped = vec![l];
    dropped.extend(others.iter().take(n / 2).copied());
    let survivors: Vec<usize> = (0..n).filter(|s| !dropped.contains(s)).collect();
    for s in &dropped {
        hosts.kill9(*s);
    }
    *killed_any = true;
    let names = |h: &Hosts, v: &[usize]| v.iter().map(|s| name(h, *s)).collect::<Vec<_>>().join(",");
    let killed = names(hosts, &dropped);

    // The plan, once no survivor hears from the dead leader.
    let deadline = tokio::time::Instant::now() + SETTLE;
    let mut infos = Vec::new();
    let heard = loop {
        infos.clear();
        for s in &survivors {
            match info(hosts, *s).await {
                Ok(i) if i.live_leader.is_none() => infos.push(i),
                _ => break,
            }
        }
        if infos.len() == survivors.len() {
            break true;
        }
        if tokio::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if !heard {
        failures.push(format!(
            "the survivors [{}] kept hearing from a leader after [{killed}] died",
            names(hosts, &survivors)
        ));
        return Ok(format!("killed [{killed}]; no recovery"));
    }
    let mut plan: RecoveryPlan = match recovery::plan(&infos, "drill") {
        Ok(p) => p,
        Err(e) => {
            failures.push(format!("the recovery plan was refused: {e}"));
            return Ok(format!("killed [{killed}]; plan refused"));
        }
    };
    if plan.highest_commit_seen < commit {
        failures.push(format!(
            "the plan keeps commits up to {} only, but the quiet cluster had committed {commit} on every member",
            plan.highest_commit_seen
        ));
    }
    plan.at_unix_ms = quorate_consensus::flight::unix_ms() as u64;
    // The chosen survivor last, as `ctl recover` does.
    let mut order = survivors.clone();
    order.sort_by_key(|s| infos.iter().find(|i| i.name == hosts.members[*s].name).is_some_and(|i| i.id == plan.chosen));
    let body = serde_json::to_string(&plan)?;
    for s in &order {
        if let Err(e) = http_json(hosts, *s, "POST", "/v1/member/recover", &body).await {
            failures.push(format!("{} did not apply the plan: {e:#}", name(hosts, *s)));
        }
    }
    let recovered = until(|| async {
        for s in &survivors {
            if let Ok(v) = http_json(hosts, *s, "GET", "/v1/member/status", "").await {
                if v["role"] == "leader" && v["incarnation"] == plan.incarnation {
                    return true;
                }
            }
        }
        false
    })
    .await;
    if !recovered {
        failures.push(format!("no leader of incarnation {} among [{}]", plan.incarnation, names(hosts, &survivors)));
        return Ok(format!("killed [{killed}]; recovery applied, no leader"));
    }
    // The dropped, restarted on their old data: refused, and the survivors' term stays.
    let term = |v: &serde_json::Value| v["term"].as_u64().unwrap_or(0);
    let before = http_json(hosts, survivors[0], "GET", "/v1/member/status", "").await.map(|v| term(&v)).unwrap_or(0);
    let ic = hosts.initial_cluster();
    for s in &dropped {
        hosts.spawn(*s, &ic, false)?;
    }
    tokio::time::sleep(DROPPED_WATCH).await;
    for s in &dropped {
        match http_json(hosts, *s, "GET", "/v1/member/status", "").await {
            Ok(v) if v["fenced"].is_string() => {}
            Ok(v) => failures.push(format!("{} restarted on its old data was not fenced: {v}", name(hosts, *s))),
            Err(e) => failures.push(format!("{} restarted on its old data did not answer: {e:#}", name(hosts, *s))),
        }
    }
    let after = http_json(hosts, survivors[0], "GET", "/v1/member/status", "").await.map(|v| term(&v)).unwrap_or(0);
    if after != before {
        failures.push(format!("the survivors' term moved from {before} to {after} while the dropped members ran"));
    }

    // Wiped and added again, one at a time.
    let mut added = Vec::new();
    for s in &dropped {
        hosts.renew(*s)?;
        crate::faults::add_fresh(hosts, *s, survivors[0]).await?;
        added.push(name(hosts, *s));
    }
    Ok(format!(
            "killed [{killed}] (the leader among them) for good; recovered [{}] (plan {}, incarnation {}, kept up to index {}); the dropped restarted on old data: {}; re-added fresh as [{}]",
            names(hosts, &survivors),
            plan.plan_id,
            plan.incarnation,
            plan.highest_commit_seen,
            if failures.is_empty() { "fenced, term unchanged" } else { "see the failures" },
            added.join(",")
    ))
}
