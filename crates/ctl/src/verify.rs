//! `quorate ctl verify`: whether a cluster is fit to take traffic again after a recovery. Every
//! member answers; one leader, that every member follows, in one term; state hashes equal at
//! one revision; the doctor finds nothing critical; a short linearizability probe (writes,
//! reads and compare-and-sets through every member, judged by the drill's checker); and a short
//! write load (`quorate bench`'s) with its figures. Exit 0 only when every check passes. What
//! the probe and the load write is deleted afterwards.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::collect::Channel;
use quorate_api_grpc::pb::etcdserverpb as pb;
use quorate_drill::history::{Input, Op, Output};
use serde::Serialize;

use crate::collect::{bounded, dial, ClusterView};
use crate::{judge, Options, Thresholds, Verdict};

#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// How long the linearizability probe runs.
    pub probe_duration: Duration,
    /// How long the write load runs (0: no load).
    pub load_duration: Duration,
    pub load_clients: usize,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions { probe_duration: Duration::from_secs(2), load_duration: Duration::from_secs(3), load_clients: 8 }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// Every check passed: fit to take traffic.
    pub fit: bool,
    pub checks: Vec<Check>,
}

fn check(name: &'static str, passed: bool, detail: impl Into<String>) -> Check {
    Check { name, passed, detail: detail.into() }
}

/// The checks on the collected view: the pure core, table-tested.
pub fn judge_view(view: &ClusterView) -> Vec<Check> {
    let mut checks = Vec::new();
    let total = view.members.len();
    let down: Vec<String> = view.members.iter().filter(|m| !m.reachable).map(|m| m.name.clone()).collect();
    checks.push(check(
        "members",
        total > 0 && down.is_empty(),
        if down.is_empty() {
            format!("{total} of {total} members answer")
        } else {
            format!("{} of {total} members answer; down: {}", total - down.len(), down.join(", "))
        },
    ));

    let up: Vec<_> = view.members.iter().filter(|m| m.reachable).collect();
    let leaders: Vec<_> = up.iter().filter(|m| m.role.as_deref() == Some("leader")).collect();
    let followed: std::collections::BTreeSet<_> = up.iter().filter_map(|m| m.leader.clone()).collect();
    let terms: std::collections::BTreeSet<_> = up.iter().filter_map(|m| m.term).collect();
    let one_leader = leaders.len() == 1
        && followed.len() == 1
        && followed.first() == Some(&leaders[0].id)
        && terms.len() == 1
        && up.iter().all(|m| m.leader.is_some());
    checks.push(check(
        "leader",
        one_leader,
        match leaders.as_slice() {
            [l] if one_leader => format!("{} leads term {}, followed by every member", l.name, l.term.unwrap_or(0)),
            _ => format!(
                "members claiming leadership: [{}]; leaders followed: [{}]; terms: {terms:?}",
                leaders.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", "),
                followed.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        },
    ));

    let hashes: std::collections::BTreeSet<_> = up.iter().map(|m| m.hash).collect();
    let equal = !up.is_empty() && hashes.len() == 1 && hashes.first().is_some_and(|h| h.is_some());
    checks.push(check(
        "hashes",
        equal,
        match view.hash_revision {
            Some(rev) if equal => format!("equal on every member at revision {rev}"),
            Some(rev) => format!(
                "differ at revision {rev}: {}",
                up.iter()
                    .map(|m| format!("{}={}", m.name, m.hash.map_or("?".into(), |h| h.to_string())))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => "no revision every member has applied".into(),
        },
    ));

    let report = judge(view, &Thresholds::default());
    let codes: Vec<String> =
        report.findings.iter().map(|f| format!("{} ({:?})", f.code, f.severity).to_lowercase()).collect();
    checks.push(check(
        "doctor",
        report.verdict != Verdict::Critical,
        format!(
            "verdict {}{}",
            report.verdict.as_str(),
            if codes.is_empty() { String::new() } else { format!(": {}", codes.join(", ")) }
        ),
    ));
    checks
}

fn run_id() -> String {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    format!("quorate-verify/{ms}-{}/", std::process::id())
}

/// One probe client: writes, linearizable reads and compare-and-sets on `keys` through one
/// member, recorded with their invoke and complete times (nanoseconds since `t0`).
async fn probe_client(client: u32, ch: Channel, keys: Vec<String>, t0: Instant, until: Instant) -> Vec<Op> {
    let mut kv = pb::kv_client::KvClient::new(ch);
    let mut history = Vec::new();
    let mut last_seen: Vec<Option<String>> = vec![None; keys.len()];
    let ns = |t: Instant| t.duration_since(t0).as_nanos() as u64;
    let mut i = 0u64;
    while Instant::now() < until {
        let k = (i as usize) % keys.len();
        let key = keys[k].clone();
        let value = format!("c{client}-{i}");
        let invoke = Instant::now();
        let (input, output) = match i % 3 {
            0 => {
                let r = kv.put(pb::PutRequest {
                    key: key.clone().into(),
                    value: value.clone().into(),
                    ..Default::default()
                });
                (Input::Write(value), r.await.ok().map(|_| Output::Done))
            }
            1 => {
                let r = kv.range(pb::RangeRequest { key: key.clone().into(), ..Default::default() }).await;
                let out = r.ok().map(|r| {
                    let v = r.into_inner().kvs.first().map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
                    last_seen[k] = v.clone();
                    Output::Read(v)
                });
                (Input::Read, out)
            }
            _ => {
                let expected = last_seen[k].clone();
                let compare = match &expected {
                    Some(v) => pb::Compare {
                        result: pb::compare::CompareResult::Equal as i32,
                        target: pb::compare::CompareTarget::Value as i32,
                        key: key.clone().into(),
                        range_end: vec![],
                        target_union: Some(pb::compare::TargetUnion::Value(v.clone().into())),
                    },
                    None => pb::Compare {
                        result: pb::compare::CompareResult::Equal as i32,
                        target: pb::compare::CompareTarget::Create as i32,
                        key: key.clone().into(),
                        range_end: vec![],
                        target_union: Some(pb::compare::TargetUnion::CreateRevision(0)),
                    },
                };
                let put = pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                        key: key.clone().into(),
                        value: value.clone().into(),
                        ..Default::default()
                    })),
                };
                let r = kv.txn(pb::TxnRequest { compare: vec![compare], success: vec![put], failure: vec![] }).await;
                (Input::Cas { expected, new: value }, r.ok().map(|r| Output::Cas(r.into_inner().succeeded)))
            }
        };
        let complete = output.as_ref().map(|_| ns(Instant::now()));
        history.push(Op { client, key, invoke: ns(invoke), complete, input, output });
        i += 1;
    }
    history
}

async fn delete_prefix(ch: Channel, prefix: &str) {
    let mut kv = pb::kv_client::KvClient::new(ch);
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let _ = kv.delete_range(pb::DeleteRangeRequest { key: prefix.into(), range_end: end, ..Default::default() }).await;
}

async fn probe(opts: &Options, endpoints: &[String], prefix: &str, v: &VerifyOptions) -> Check {
    let mut chans = Vec::new();
    for e in endpoints {
        match bounded(opts.dial_timeout, dial(e, opts)).await {
            Ok(ch) => chans.push(ch),
            Err(err) => return check("linearizability", false, format!("cannot reach {e}: {err}")),
        }
    }
    let keys: Vec<String> = (0..3).map(|k| format!("{prefix}lin/k{k}")).collect();
    let t0 = Instant::now();
    let until = t0 + v.probe_duration;
    let clients = chans.iter().enumerate().map(|(c, ch)| probe_client(c as u32, ch.clone(), keys.clone(), t0, until));
    let history: Vec<Op> = futures::future::join_all(clients).await.into_iter().flatten().collect();
    let done = history.iter().filter(|o| !o.is_unknown()).count();
    let unknown = history.len() - done;
    let verdict = tokio::task::spawn_blocking(move || {
        quorate_drill::check::linearizable::check(&history, Duration::from_secs(20))
    })
    .await;
    use quorate_drill::check::linearizable::Verdict as L;
    match verdict {
        Ok(L::Linearizable) if done > 0 => check(
            "linearizability",
            true,
            format!(
                "{done} operations on 3 keys through {} members, linearizable ({unknown} without an answer)",
                chans.len()
            ),
        ),
        Ok(L::Linearizable) => check("linearizability", false, "no operation was answered"),
        Ok(L::Violation { key, ops }) => check(
            "linearizability",
            false,
            format!("NOT linearizable on {key}: minimal history {}", serde_json::to_string(&ops).unwrap_or_default()),
        ),
        Ok(L::TimedOut { key }) => check("linearizability", false, format!("checker ran out of time on {key}")),
        Err(e) => check("linearizability", false, format!("checker failed: {e}")),
    }
}

async fn load(opts: &Options, endpoints: &[String], prefix: &str, v: &VerifyOptions) -> Check {
    let cfg = quorate_bench::BenchConfig {
        endpoints: endpoints.to_vec(),
        ops: vec![quorate_bench::Op::Put],
        clients: vec![v.load_clients],
        duration: v.load_duration,
        keys: 1000,
        value_bytes: 256,
        conns: v.load_clients,
        readers: vec![quorate_bench::Reader::None],
        reader_niced: false,
        key_prefix: format!("{prefix}load/"),
        tls: opts.tls.as_ref().map(|t| t.grpc.clone()),
        pace: None,
    };
    match quorate_bench::run_one(&cfg, quorate_bench::Op::Put, v.load_clients, quorate_bench::Reader::None).await {
        Ok(r) => check(
            "load",
            r.errors == 0 && r.ops > 0,
            format!(
                "put, {} clients, {:?}: {:.0} ops/s, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, {} errors",
                v.load_clients, v.load_duration, r.ops_per_s, r.p50_ms, r.p99_ms, r.max_ms, r.errors
            ),
        ),
        Err(e) => check("load", false, format!("{e:#}")),
    }
}

/// Collect, judge, probe, load.
pub async fn verify(opts: &Options, v: &VerifyOptions) -> VerifyReport {
    let view = crate::collect::collect(opts).await;
    let mut checks = judge_view(&view);
    let endpoints: Vec<String> = view.members.iter().filter(|m| m.reachable).map(|m| m.endpoint.clone()).collect();
    if endpoints.is_empty() {
        checks.push(check("linearizability", false, "no member answers"));
    } else {
        let prefix = run_id();
        checks.push(probe(opts, &endpoints, &prefix, v).await);
        if !v.load_duration.is_zero() {
            checks.push(load(opts, &endpoints, &prefix, v).await);
        }
        if let Ok(ch) = bounded(opts.dial_timeout, dial(&endpoints[0], opts)).await {
            delete_prefix(ch, &prefix).await;
        }
    }
    VerifyReport { fit: checks.iter().all(|c| c.passed), checks }
}

pub fn render(r: &VerifyReport) -> String {
    let mut out = String::new();
    for c in &r.checks {
        out.push_str(&format!("{} {:<16} {}\n", if c.passed { "PASS" } else { "FAIL" }, c.name, c.detail));
    }
    out.push_str(if r.fit { "verdict: fit to take traffic\n" } else { "verdict: NOT fit to take traffic\n" });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::MemberView;

    fn member(name: &str, id: &str, role: &str, leader: &str, term: u64, hash: u32) -> MemberView {
        MemberView {
            name: name.into(),
            id: id.into(),
            endpoint: format!("{name}:2379"),
            reachable: true,
            role: Some(role.into()),
            leader: Some(leader.into()),
            term: Some(term),
            hash: Some(hash),
            commit_index: Some(10),
            applied_index: Some(10),
            revision: Some(5),
            ..Default::default()
        }
    }

    fn view(members: Vec<MemberView>) -> ClusterView {
        ClusterView { members, hash_revision: Some(5), ..Default::default() }
    }

    fn passed(checks: &[Check]) -> Vec<(&'static str, bool)> {
        checks.iter().map(|c| (c.name, c.passed)).collect()
    }

    #[test]
    fn a_healthy_view_passes_every_check_and_each_fault_fails_its_own() {
        let healthy = vec![
            member("m1", "a", "leader", "a", 3, 7),
            member("m2", "b", "follower", "a", 3, 7),
            member("m3", "c", "follower", "a", 3, 7),
        ];
        assert_eq!(
            passed(&judge_view(&view(healthy.clone()))),
            vec![("members", true), ("leader", true), ("hashes", true), ("doctor", true)]
        );

        let mut diverged = healthy.clone();
        diverged[2].hash = Some(8);
        assert_eq!(passed(&judge_view(&view(diverged)))[2], ("hashes", false));

        let mut two_leaders = healthy.clone();
        two_leaders[2] = member("m3", "c", "leader", "c", 2, 7);
        assert_eq!(passed(&judge_view(&view(two_leaders)))[1], ("leader", false));

        let mut other_term = healthy.clone();
        other_term[1].term = Some(4);
        assert_eq!(passed(&judge_view(&view(other_term)))[1], ("leader", false));

        let mut down = healthy;
        down[1] = MemberView { name: "m2".into(), reachable: false, ..Default::default() };
        let checks = judge_view(&view(down));
        assert_eq!(checks[0], check("members", false, "2 of 3 members answer; down: m2"));
    }
}
