//! The doctor's judgement: a pure function of the collected view. Every finding names its
//! code, the members, the numbers that show it and the runbook steps (exact commands) that fix
//! it. No IO and no clock here: the view carries everything, so each rule is table-tested.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::collect::{ClusterView, MemberView};

/// Where the doctor draws its lines.
#[derive(Clone, Debug)]
pub struct Thresholds {
    /// Entries a voter's applied index may trail the leader's commit index.
    pub lag_entries_max: u64,
    /// Entries a learner may trail before it is reported as behind.
    pub learner_lag_entries_max: u64,
    /// How long a follower may go without hearing from the leader (it hears once a second).
    pub leader_contact_max_ms: u64,
    /// fsync p99 above this is a slow disk (etcd-mixin warns at 500 ms).
    pub fsync_p99_max_ms: f64,
    /// Fewer recent commits than this say too little to judge a disk by.
    pub fsync_samples_min: usize,
    /// A clock offset certainly beyond this (offset minus its error bound) is skew.
    pub clock_skew_max_ms: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            lag_entries_max: 1000,
            learner_lag_entries_max: 1000,
            leader_contact_max_ms: 5000,
            fsync_p99_max_ms: 500.0,
            fsync_samples_min: 5,
            clock_skew_max_ms: 1000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Degraded,
    Critical,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Healthy,
    Degraded,
    Critical,
}

impl Verdict {
    pub fn exit_code(self) -> i32 {
        match self {
            Verdict::Healthy => 0,
            Verdict::Degraded => 1,
            Verdict::Critical => 2,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Healthy => "healthy",
            Verdict::Degraded => "degraded",
            Verdict::Critical => "critical",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub code: String,
    pub severity: Severity,
    pub members: Vec<String>,
    pub evidence: String,
    /// Runbook steps, in order; each names the exact command.
    pub fix: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub verdict: Verdict,
    pub findings: Vec<Finding>,
}

fn label(m: &MemberView) -> String {
    if m.name.is_empty() {
        m.endpoint.clone()
    } else {
        m.name.clone()
    }
}

/// A member id (hex) as a name, when the member list knows it.
fn name_of(v: &ClusterView, id: &str) -> String {
    v.members.iter().find(|m| m.id == id).map_or_else(|| id.to_string(), label)
}

/// Every reachable voter's view, grouped: `leader m1 in term 2 (seen by m1, m2)`, newest term
/// first; a leader's own row says when a quorum last acknowledged it.
fn views(v: &ClusterView, reachable: &[&MemberView]) -> String {
    let mut groups: BTreeMap<(std::cmp::Reverse<u64>, Option<&str>), Vec<String>> = BTreeMap::new();
    for m in reachable.iter().filter(|m| !m.is_learner) {
        let Some(term) = m.term else { continue };
        groups.entry((std::cmp::Reverse(term), m.leader.as_deref())).or_default().push(label(m));
    }
    groups
        .iter()
        .map(|((std::cmp::Reverse(term), l), seen)| {
            let acked = l
                .and_then(|id| reachable.iter().find(|m| m.id == id && m.role.as_deref() == Some("leader")))
                .filter(|m| m.term == Some(*term))
                .and_then(|m| m.last_leader_contact_ms)
                .map_or(String::new(), |ms| format!("; quorum last acknowledged it {ms} ms ago"));
            match l {
                Some(id) => format!("leader {} in term {term} (seen by {}{acked})", name_of(v, id), seen.join(", ")),
                None => format!("no leader in term {term} (seen by {})", seen.join(", ")),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn finding(code: &str, severity: Severity, members: Vec<String>, evidence: String, fix: Vec<String>) -> Finding {
    Finding { code: code.into(), severity, members, evidence, fix }
}

/// The client endpoints of the members that answer, for the commands in the fixes.
fn healthy_endpoints(v: &ClusterView) -> String {
    let eps: Vec<&str> = v.members.iter().filter(|m| m.reachable).map(|m| m.endpoint.as_str()).collect();
    if eps.is_empty() {
        v.members.iter().map(|m| m.endpoint.as_str()).collect::<Vec<_>>().join(",")
    } else {
        eps.join(",")
    }
}

pub fn judge(v: &ClusterView, t: &Thresholds) -> Report {
    let mut findings = Vec::new();
    let eps = healthy_endpoints(v);
    let voters: Vec<&MemberView> = v.members.iter().filter(|m| !m.is_learner).collect();
    let answering = voters.iter().filter(|m| m.reachable).count();
    let quorum = voters.len() / 2 + 1;
    let reachable: Vec<&MemberView> = v.members.iter().filter(|m| m.reachable).collect();
    let leaders: Vec<&MemberView> = reachable.iter().copied().filter(|m| m.role.as_deref() == Some("leader")).collect();
    // The leader in the highest term, as the reference for lag.
    let leader = leaders.iter().copied().max_by_key(|m| m.term.unwrap_or(0));

    // quorum-lost
    if answering < quorum || leader.is_none() {
        let down: Vec<String> = voters.iter().filter(|m| !m.reachable).map(|m| label(m)).collect();
        let evidence = format!(
            "{answering}/{} voters answer (quorum {quorum}); leader: {}{}{}",
            voters.len(),
            leader.map_or("none reachable".to_string(), label),
            if answering >= quorum { " (a majority answers: an election may be under way)" } else { "" },
            v.member_list_error.as_ref().map_or(String::new(), |e| format!("; no member list: {e}")),
        );
        let mut fix =
            vec!["Do not delete any data directory: the members that come back carry the committed log.".to_string()];
        if down.is_empty() {
            fix.push(format!(
                "Every voter answers but none leads: watch the term for a minute (an election may be in progress): `quorate ctl --endpoints={eps} status`"
            ));
            fix.push("If the term keeps rising, check the peer links between members (peer URLs reachable from each other, firewalls): `etcdctl --endpoints=".to_string() + &eps + " member list -w table`");
        } else {
            fix.push(format!(
                "Start the members that are down again with their original flags and data directories: {}",
                down.join(", ")
            ));
            fix.push(format!("Confirm a leader is back: `quorate ctl --endpoints={eps} status`"));
            fix.push("If a majority is lost for good, restore from the newest backup: `etcdctl --endpoints=<a survivor> snapshot save backup.db`, then `quorate snapshot restore backup.db --name <name> --initial-cluster <...>` on every member of a new cluster".to_string());
        }
        findings.push(finding("quorum-lost", Severity::Critical, down, evidence, fix));
    }

    // member-down
    for m in v.members.iter().filter(|m| !m.reachable) {
        let id = if m.id.is_empty() { "<id>".to_string() } else { m.id.clone() };
        findings.push(finding(
            "member-down",
            Severity::Degraded,
            vec![label(m)],
            format!(
                "{} ({}) does not answer: {}; {answering}/{} voters answer (quorum {quorum})",
                label(m),
                m.endpoint,
                m.error.as_deref().unwrap_or("no answer"),
                voters.len()
            ),
            vec![
                format!("Confirm from its host: `etcdctl --endpoints={} endpoint status -w table`", m.endpoint),
                format!(
                    "If the process is gone, start it again with its original flags and data directory (`quorate server --name {} ...`); it catches up from the leader",
                    label(m)
                ),
                format!(
                    "If its data directory is lost, replace it: `etcdctl --endpoints={eps} member remove {id}`, then `etcdctl --endpoints={eps} member add {} --peer-urls={}`, and start it with an empty --data-dir and `--initial-cluster-state existing`",
                    label(m),
                    if m.peer_url.is_empty() { "<peer url>" } else { &m.peer_url }
                ),
                format!("Check: `quorate ctl --endpoints={eps} doctor`"),
            ],
        ));
    }

    // split-view: two leaders in one term, members in one term naming different leaders, or
    // terms further apart than one election.
    let mut by_term: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
    for m in &reachable {
        if let (Some(term), Some(l)) = (m.term, m.leader.as_deref()) {
            by_term.entry(term).or_default().insert(l);
        }
    }
    let mut leaders_by_term: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for l in &leaders {
        leaders_by_term.entry(l.term.unwrap_or(0)).or_default().push(label(l));
    }
    for (term, ls) in leaders_by_term.iter().filter(|(_, ls)| ls.len() > 1) {
        findings.push(finding(
            "split-view",
            Severity::Critical,
            ls.clone(),
            format!("{} members claim to lead term {term}: {}", ls.len(), ls.join(", ")),
            vec![
                format!("Capture every member's view now: `quorate ctl --endpoints={eps} status -w json > split.json`"),
                "Stop writes to the cluster, keep the members' logs, and report it: two leaders in one term is a bug"
                    .to_string(),
                format!(
                    "Transfer leadership to one of them to end the term: `etcdctl --endpoints={eps} move-leader <id>`"
                ),
            ],
        ));
    }
    // A leader in an older term than the reference leader that has not heard from a quorum
    // for longer than a follower may go without its leader: cut off from the majority and
    // unaware it was deposed (PreVote keeps its term and openraft keeps its role until it
    // hears of the newer term). Its term is then only one election behind, so the term gap
    // alone does not show it. One that a quorum acknowledged just now is a handover in flight.
    let stale_leaders: Vec<&MemberView> = match leader {
        Some(r) => leaders
            .iter()
            .copied()
            .filter(|l| l.term < r.term)
            .filter(|l| l.last_leader_contact_ms.is_none_or(|ms| ms > t.leader_contact_max_ms))
            .collect(),
        None => Vec::new(),
    };
    let terms: Vec<u64> = reachable.iter().filter(|m| !m.is_learner).filter_map(|m| m.term).collect();
    let (min_term, max_term) = (terms.iter().min().copied(), terms.iter().max().copied());
    let disagreeing_term = by_term.iter().find(|(_, ls)| ls.len() > 1);
    if let (Some(lo), Some(hi)) = (min_term, max_term) {
        if hi - lo > 1 || disagreeing_term.is_some() || !stale_leaders.is_empty() {
            let mut evidence = Vec::new();
            for l in &stale_leaders {
                evidence.push(format!(
                    "{} still claims to lead term {} but {}, while {} leads term {}",
                    label(l),
                    l.term.unwrap_or(0),
                    l.last_leader_contact_ms.map_or(
                        "cannot say when a quorum last acknowledged it".to_string(),
                        |ms| {
                            format!("no quorum has acknowledged it for {ms} ms (limit {})", t.leader_contact_max_ms)
                        }
                    ),
                    leader.map_or_else(String::new, label),
                    leader.and_then(|r| r.term).unwrap_or(0),
                ));
            }
            if let Some((term, ls)) = disagreeing_term {
                evidence.push(format!(
                    "members in term {term} follow different leaders: {}",
                    ls.iter().map(|id| name_of(v, id)).collect::<Vec<_>>().join(", ")
                ));
            }
            if hi - lo > 1 {
                evidence.push(format!("terms {lo}..{hi} differ by more than one election"));
            }
            evidence.push(format!("views: {}", views(v, &reachable)));
            let behind: Vec<String> = reachable
                .iter()
                .filter(|m| !m.is_learner && m.term.is_some_and(|x| x < hi))
                .map(|m| label(m))
                .collect();
            let mut fix = vec![format!(
                "Watch whether the views converge within a few seconds: `quorate ctl --endpoints={eps} status`"
            )];
            if !stale_leaders.is_empty() {
                let majority: Vec<&str> =
                    reachable.iter().filter(|m| m.term.is_some_and(|x| x == hi)).map(|m| m.endpoint.as_str()).collect();
                let stale: Vec<String> = stale_leaders.iter().map(|l| label(l)).collect();
                fix.push(format!(
                    "{} cannot commit anything: writes and linearizable reads sent to it fail or time out; point clients at the majority: `etcdctl --endpoints={} endpoint status -w table`",
                    stale.join(", "),
                    majority.join(",")
                ));
                fix.push(format!(
                    "From the host of {}, check that every other member's peer URL is reachable (firewall, routes, a partition): `etcdctl --endpoints={eps} member list -w table` lists them; then `nc -zv <host> <peer port>` for each, and `nft list ruleset` / `iptables -S` on both ends",
                    stale.join(", ")
                ));
                fix.push(format!(
                    "Do not restart it or delete its data directory: once its links are back it follows the new leader without raising the term (PreVote). Check: `quorate ctl --endpoints={eps} doctor`"
                ));
            } else {
                fix.push("If not, check the peer links of the members behind (each must reach every other member's peer URL): `etcdctl member list -w table` shows the URLs".to_string());
            }
            findings.push(finding("split-view", Severity::Degraded, behind, evidence.join("; "), fix));
        }
    }

    // diverged
    if let Some(rev) = v.hash_revision {
        let mut groups: BTreeMap<u32, Vec<&MemberView>> = BTreeMap::new();
        for m in reachable.iter().copied().filter(|m| m.hash.is_some()) {
            groups.entry(m.hash.unwrap_or_default()).or_default().push(m);
        }
        if groups.len() > 1 {
            let largest = groups.values().map(Vec::len).max().unwrap_or(0);
            // The members that agree, when more than half of those that answer do.
            let majority: Option<&Vec<&MemberView>> =
                groups.values().find(|g| g.len() == largest && largest * 2 > reachable.len());
            let odd: Vec<&MemberView> = reachable
                .iter()
                .copied()
                .filter(|m| m.hash.is_some() && majority.is_none_or(|maj| !maj.iter().any(|x| std::ptr::eq(*x, *m))))
                .collect();
            let evidence = format!(
                "HashKV at revision {rev}: {}{}",
                groups
                    .iter()
                    .map(|(h, ms)| format!("{h:08x} on {}", ms.iter().map(|m| label(m)).collect::<Vec<_>>().join(",")))
                    .collect::<Vec<_>>()
                    .join("; "),
                if majority.is_none() { " (no majority agrees)" } else { "" },
            );
            let mut fix = vec![format!("Confirm: `etcdctl --endpoints={eps} endpoint hashkv --rev={rev} -w table`")];
            match majority {
                Some(maj) => {
                    let maj_eps = maj.iter().map(|m| m.endpoint.as_str()).collect::<Vec<_>>().join(",");
                    fix.push(format!(
                        "Stop writes if you can, and save the majority's state first: `etcdctl --endpoints={} snapshot save backup.db`",
                        maj[0].endpoint
                    ));
                    if let Some(l) = odd.iter().find(|m| m.role.as_deref() == Some("leader")) {
                        let to = if maj[0].id.is_empty() { "<id>" } else { maj[0].id.as_str() };
                        fix.push(format!(
                            "{} leads: move leadership to the majority first: `etcdctl --endpoints={} move-leader {to}`",
                            label(l),
                            l.endpoint
                        ));
                    }
                    for m in &odd {
                        let id = if m.id.is_empty() { "<id>" } else { m.id.as_str() };
                        let peer = if m.peer_url.is_empty() { "<peer url>" } else { m.peer_url.as_str() };
                        fix.push(format!(
                            "Replace {name}: stop its process, keep its data directory aside for the bug report (`mv <data-dir> <data-dir>.diverged`), then `etcdctl --endpoints={maj_eps} member remove {id}`, `etcdctl --endpoints={maj_eps} member add {name} --peer-urls={peer}`, and start it with an empty --data-dir and `--initial-cluster-state existing`; it copies the majority's state",
                            name = label(m)
                        ));
                    }
                    fix.push(format!("Check the hashes agree again: `quorate ctl --endpoints={eps} status`"));
                }
                None => {
                    fix.push("No majority agrees, so there is no state to copy from: stop writes, save a snapshot of every member (`etcdctl --endpoints=<member> snapshot save <name>.db`) and keep every data directory".to_string());
                    fix.push("Compare the members' keys at that revision to find which is right: `etcdctl --endpoints=<member> get '' --prefix --rev=<revision> -w json`".to_string());
                }
            }
            findings.push(finding(
                "diverged",
                Severity::Critical,
                odd.iter().map(|m| label(m)).collect(),
                evidence,
                fix,
            ));
        }
    }

    // member-lagging and learner-behind
    if let Some(l) = leader {
        let leader_commit = l.commit_index.unwrap_or(0);
        // Another member that calls itself leader is a deposed one (split-view), not a lagging follower.
        for m in reachable.iter().filter(|m| m.id != l.id && m.role.as_deref() != Some("leader")) {
            let lag = leader_commit.saturating_sub(m.applied_index.unwrap_or(0));
            if m.is_learner {
                if lag > t.learner_lag_entries_max {
                    findings.push(finding(
                        "learner-behind",
                        Severity::Degraded,
                        vec![label(m)],
                        format!(
                            "learner applied {} of the leader's {leader_commit} ({lag} entries behind; limit {})",
                            m.applied_index.unwrap_or(0),
                            t.learner_lag_entries_max
                        ),
                        vec![
                            "Do not promote it yet: `etcdctl member promote` is refused until it has caught up".to_string(),
                            format!("Watch it catch up: `quorate ctl --endpoints={eps} status`"),
                            "If the lag does not shrink, check its disk and its link to the leader (slow-disk, network)".to_string(),
                        ],
                    ));
                }
                continue;
            }
            let contact = m.last_leader_contact_ms.filter(|ms| *ms > t.leader_contact_max_ms);
            if lag > t.lag_entries_max || contact.is_some() {
                let mut evidence = format!(
                    "applied {} of the leader's {leader_commit} ({lag} entries behind; limit {})",
                    m.applied_index.unwrap_or(0),
                    t.lag_entries_max
                );
                if let Some(ms) = m.last_leader_contact_ms {
                    evidence.push_str(&format!(
                        "; last contact with the leader {ms} ms ago (limit {})",
                        t.leader_contact_max_ms
                    ));
                }
                findings.push(finding(
                    "member-lagging",
                    Severity::Degraded,
                    vec![label(m)],
                    evidence,
                    vec![
                        format!("Watch whether the lag shrinks: `quorate ctl --endpoints={eps} status`"),
                        format!("Check its disk: `etcdctl --endpoints={} check perf` and its fsync p99 in `quorate ctl status`", m.endpoint),
                        "Check its CPU and its link to the leader (`top`, `ping` to the leader's host).".to_string(),
                    ],
                ));
            }
        }
    }

    // slow-disk
    for m in &reachable {
        let samples = m.fsync_samples.unwrap_or(0);
        if samples < t.fsync_samples_min {
            continue;
        }
        if let Some(p99) = m.fsync_p99_ms.filter(|p| *p > t.fsync_p99_max_ms) {
            findings.push(finding(
                "slow-disk",
                Severity::Degraded,
                vec![label(m)],
                format!("fsync p99 {p99:.1} ms over the last {samples} log commits (limit {} ms)", t.fsync_p99_max_ms),
                vec![
                    format!("Measure the disk: `etcdctl --endpoints={} check perf`, and on its host `iostat -x 1 5`", m.endpoint),
                    "Move its --data-dir to a dedicated SSD, or stop whatever else writes to that disk".to_string(),
                    format!("If it leads, move leadership to a member with a faster disk: `etcdctl --endpoints={eps} move-leader <id>`"),
                ],
            ));
        }
    }

    // clock-skew
    for m in &reachable {
        if let Some(off) = m.clock_offset_ms {
            let err = m.clock_offset_error_ms.unwrap_or(0);
            if off.unsigned_abs().saturating_sub(err) > t.clock_skew_max_ms {
                findings.push(finding(
                    "clock-skew",
                    Severity::Degraded,
                    vec![label(m)],
                    format!(
                        "wall clock {off:+} ms ±{err} ms from this host (limit {} ms); consensus does not use wall clocks, registry timestamps and logs do",
                        t.clock_skew_max_ms
                    ),
                    vec![
                        "On its host: `timedatectl status` and `chronyc tracking`".to_string(),
                        "Step the clock once NTP is reachable: `chronyc makestep`".to_string(),
                        format!("Check: `quorate ctl --endpoints={eps} status`"),
                    ],
                ));
            }
        }
    }

    // alarm-nospace: every member reports the cluster's alarms; report each alarmed member once.
    let mut nospace: BTreeSet<String> = BTreeSet::new();
    for m in &reachable {
        for a in m.alarms.iter().filter(|a| a.contains("NOSPACE")) {
            let id = a.split_whitespace().find_map(|w| w.strip_prefix("memberID:")).and_then(|d| d.parse::<u64>().ok());
            let name = id
                .and_then(|id| v.members.iter().find(|x| x.id == format!("{id:x}")))
                .map(label)
                .unwrap_or_else(|| id.map_or_else(|| label(m), |id| format!("{id:x}")));
            nospace.insert(name);
        }
    }
    if !nospace.is_empty() {
        let sizes: Vec<String> =
            reachable.iter().filter_map(|m| m.db_size_bytes.map(|b| format!("{}={b}", label(m)))).collect();
        findings.push(finding(
            "alarm-nospace",
            Severity::Critical,
            nospace.into_iter().collect(),
            format!("NOSPACE alarm raised: the cluster refuses writes; db size bytes {}", sizes.join(", ")),
            vec![
                format!("See the sizes: `etcdctl --endpoints={eps} endpoint status -w table`"),
                format!("Free space: compact old revisions, `etcdctl --endpoints={eps} compact <current revision>`, then `etcdctl --endpoints={eps} defrag`"),
                "Or raise the quota: restart each member with a larger `--quota-backend-bytes`".to_string(),
                format!("Then disarm: `etcdctl --endpoints={eps} alarm disarm` and check `etcdctl --endpoints={eps} alarm list` is empty"),
            ],
        ));
    }

    // brake-engaged
    for z in &v.brake {
        findings.push(finding(
            "brake-engaged",
            Severity::Degraded,
            leader.map(|l| vec![label(l)]).unwrap_or_default(),
            format!("eviction brake holds zone {:?} for {} s: {}", z.zone, z.held_ms / 1000, z.reason),
            vec![
                format!("Find why zone {:?}'s instances stopped heartbeating (network to the zone, a deploy, the clients' hosts)", z.zone),
                "Instances held by the brake are not evicted; once their heartbeats return it releases, or after --brake-max-hold-s".to_string(),
                format!("Check: `quorate ctl --endpoints={eps} doctor`"),
            ],
        ));
    }

    // stale-incarnation: a member dropped by a recovery came back on its old data.
    for m in v.members.iter().filter(|m| m.fenced.is_some()) {
        findings.push(finding(
            "stale-incarnation",
            Severity::Critical,
            vec![label(m)],
            m.fenced.clone().unwrap_or_default(),
            vec![
                format!("Stop {}: it was dropped by `quorate ctl recover` and serves nothing; its data is of the old cluster", label(m)),
                "Wipe its data directory (keep a copy if its writes after the recovery point matter to you)".to_string(),
                format!("Add it again: `etcdctl --endpoints=<a member of the recovered cluster> member add {} --peer-urls=<its peer URL>`, then start it with `--initial-cluster-state existing`", label(m)),
            ],
        ));
    }
    // recovered: the cluster runs on a recovery from quorum loss (shown for an hour after it).
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let recent = v
        .members
        .iter()
        .filter(|m| m.fenced.is_none())
        .filter_map(|m| m.recovery.as_ref())
        .find(|r| r["at_unix_ms"].as_u64().is_some_and(|at| now_ms.saturating_sub(at) < 3_600_000));
    if let Some(r) = recent {
        let at = r["at_unix_ms"].as_u64().unwrap_or(0);
        let dropped: Vec<String> = r["dropped"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_u64())
            .map(|d| format!("{d:x}"))
            .collect();
        findings.push(finding(
            "recovered",
            Severity::Degraded,
            Vec::new(),
            format!(
                "recovered from quorum loss by {} at {} (plan {}, incarnation {}): kept the log up to index {}, dropped [{}]; writes the dropped members acknowledged after that index may be lost",
                r["by"].as_str().unwrap_or("?"),
                quorate_consensus::isolation::utc_text(at),
                r["plan_id"].as_str().unwrap_or("?"),
                r["incarnation"],
                r["kept_up_to"],
                dropped.join(",")
            ),
            vec![
                format!("Check the cluster is fit: `quorate ctl --endpoints={eps} verify`"),
                "Keep the dropped members down; to bring one back, wipe its data directory and `etcdctl member add` it".to_string(),
                "Restore the fault tolerance you had: add members until there are as many voters as before".to_string(),
            ],
        ));
    }

    // isolated: an operator took the member out of service. Every member knows; the member
    // itself says so even when no other answers.
    let mut isolated: std::collections::BTreeMap<String, (crate::collect::Isolation, bool)> = Default::default();
    for m in v.members.iter().filter(|m| m.reachable) {
        for i in &m.isolated_members {
            let pending = i.demotion_pending && m.role.as_deref() == Some("leader");
            let e = isolated.entry(i.id.clone()).or_insert((i.isolation.clone(), false));
            e.1 |= pending;
        }
        if let Some(i) = &m.isolated {
            isolated.entry(m.id.clone()).or_insert((i.clone(), false));
        }
    }
    for (id, (i, pending)) in isolated {
        let name = v.members.iter().find(|m| m.id == id).map_or(id.clone(), label);
        let mut evidence = format!("isolated since {} by {}: {}", i.since, i.by, i.reason);
        if pending {
            evidence
                .push_str("; still a voter: the leader demotes it once that leaves the other voters a healthy quorum");
        }
        findings.push(finding(
            "isolated",
            Severity::Degraded,
            vec![name.clone()],
            evidence,
            vec![
                "It serves no client request (clients must list other endpoints); its data stays and it keeps replicating".to_string(),
                format!("When it is fit to serve again: `quorate ctl --endpoints={eps} unisolate {name}` (it is promoted back once caught up)"),
            ],
        ));
    }

    let verdict = match findings.iter().map(|f| f.severity).max() {
        None => Verdict::Healthy,
        Some(Severity::Degraded) => Verdict::Degraded,
        Some(Severity::Critical) => Verdict::Critical,
    };
    Report { verdict, findings }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::BrakeZone;

    /// A reachable voter of a healthy cluster in term 2 led by "a".
    fn member(name: &str, id: &str, role: &str) -> MemberView {
        MemberView {
            name: name.into(),
            id: id.into(),
            endpoint: format!("127.0.0.1:{}", 2379 + id.len()),
            peer_url: format!("http://127.0.0.1:{}", 2380 + id.len()),
            reachable: true,
            role: Some(role.into()),
            term: Some(2),
            leader: Some("a1".into()),
            commit_index: Some(100),
            applied_index: Some(100),
            revision: Some(50),
            hash: Some(0xdead),
            apply_lag_entries: Some(0),
            last_leader_contact_ms: Some(300),
            db_size_bytes: Some(1 << 20),
            clock_offset_ms: Some(3),
            clock_offset_error_ms: Some(1),
            fsync_p99_ms: Some(4.0),
            fsync_samples: Some(256),
            version: Some("3.5.0".into()),
            ..Default::default()
        }
    }

    fn healthy() -> ClusterView {
        ClusterView {
            members: vec![member("a", "a1", "leader"), member("b", "b2", "follower"), member("c", "c3", "follower")],
            hash_revision: Some(50),
            ..Default::default()
        }
    }

    fn down(m: &mut MemberView) {
        *m = MemberView {
            name: m.name.clone(),
            id: m.id.clone(),
            endpoint: m.endpoint.clone(),
            error: Some("connection refused".into()),
            ..Default::default()
        };
    }

    fn codes(r: &Report) -> Vec<(&str, Severity, Vec<String>)> {
        r.findings.iter().map(|f| (f.code.as_str(), f.severity, f.members.clone())).collect()
    }

    type Case = (&'static str, fn(&mut ClusterView), Verdict, Vec<(&'static str, Severity, Vec<&'static str>)>);

    #[test]
    fn every_finding_is_judged_from_the_view() {
        use Severity::*;
        let cases: Vec<Case> = vec![
            ("healthy", |_| {}, Verdict::Healthy, vec![]),
            (
                "one follower down",
                |v| down(&mut v.members[2]),
                Verdict::Degraded,
                vec![("member-down", Degraded, vec!["c"])],
            ),
            (
                "two of three down",
                |v| {
                    down(&mut v.members[0]);
                    down(&mut v.members[1]);
                    v.members[2].role = Some("candidate".into());
                    v.members[2].leader = None;
                },
                Verdict::Critical,
                vec![
                    ("quorum-lost", Critical, vec!["a", "b"]),
                    ("member-down", Degraded, vec!["a"]),
                    ("member-down", Degraded, vec!["b"]),
                ],
            ),
            (
                "two of three down, the survivor still calls itself leader",
                |v| {
                    down(&mut v.members[1]);
                    down(&mut v.members[2]);
                },
                Verdict::Critical,
                vec![
                    ("quorum-lost", Critical, vec!["b", "c"]),
                    ("member-down", Degraded, vec!["b"]),
                    ("member-down", Degraded, vec!["c"]),
                ],
            ),
            (
                "all answer, none leads",
                |v| {
                    for m in &mut v.members {
                        m.role = Some("candidate".into());
                        m.leader = None;
                    }
                },
                Verdict::Critical,
                vec![("quorum-lost", Critical, vec![])],
            ),
            (
                "nothing answers, no member list",
                |v| {
                    v.members = vec![MemberView { endpoint: "127.0.0.1:2379".into(), ..Default::default() }];
                    v.member_list_error = Some("refused".into());
                    v.hash_revision = None;
                },
                Verdict::Critical,
                vec![
                    ("quorum-lost", Critical, vec!["127.0.0.1:2379"]),
                    ("member-down", Degraded, vec!["127.0.0.1:2379"]),
                ],
            ),
            (
                "a follower 1000 entries behind is within the limit",
                |v| {
                    v.members[0].commit_index = Some(1100);
                    v.members[1].applied_index = Some(100);
                },
                Verdict::Healthy,
                vec![],
            ),
            (
                "a follower 1001 entries behind",
                |v| {
                    v.members[0].commit_index = Some(2000);
                    v.members[1].applied_index = Some(999);
                    v.members[2].applied_index = Some(2000);
                },
                Verdict::Degraded,
                vec![("member-lagging", Degraded, vec!["b"])],
            ),
            (
                "a follower that has not heard from the leader",
                |v| v.members[2].last_leader_contact_ms = Some(9000),
                Verdict::Degraded,
                vec![("member-lagging", Degraded, vec!["c"])],
            ),
            (
                "two leaders in one term",
                |v| {
                    v.members[1].role = Some("leader".into());
                    v.members[1].leader = Some("b2".into());
                },
                Verdict::Critical,
                vec![("split-view", Critical, vec!["a", "b"]), ("split-view", Degraded, vec![])],
            ),
            (
                "terms three apart",
                |v| {
                    v.members[2].term = Some(5);
                    v.members[2].leader = None;
                    v.members[2].role = Some("candidate".into());
                },
                Verdict::Degraded,
                vec![("split-view", Degraded, vec!["a", "b"])],
            ),
            (
                "one election apart is not a split",
                |v| {
                    v.members[2].term = Some(3);
                    v.members[2].leader = Some("c3".into());
                },
                Verdict::Healthy,
                vec![],
            ),
            (
                "a leader cut off from the others: they elected one of their own, it still claims its old term",
                |v| {
                    // a leads term 2 but no quorum has acknowledged it for 20 s; b leads term 3.
                    v.members[0].last_leader_contact_ms = Some(20_000);
                    for m in &mut v.members[1..] {
                        m.term = Some(3);
                        m.leader = Some("b2".into());
                    }
                    v.members[1].role = Some("leader".into());
                },
                Verdict::Degraded,
                vec![("split-view", Degraded, vec!["a"])],
            ),
            (
                "a deposed leader a quorum acknowledged just now is a handover in flight",
                |v| {
                    v.members[0].last_leader_contact_ms = Some(40);
                    for m in &mut v.members[1..] {
                        m.term = Some(3);
                        m.leader = Some("b2".into());
                    }
                    v.members[1].role = Some("leader".into());
                },
                Verdict::Healthy,
                vec![],
            ),
            (
                "a follower cut off alone keeps its term and its leader: lagging, not a split",
                |v| {
                    v.members[2].last_leader_contact_ms = Some(20_000);
                },
                Verdict::Degraded,
                vec![("member-lagging", Degraded, vec!["c"])],
            ),
            (
                "a different hash",
                |v| v.members[1].hash = Some(0xbeef),
                Verdict::Critical,
                vec![("diverged", Critical, vec!["b"])],
            ),
            (
                "the leader's hash differs",
                |v| v.members[0].hash = Some(0xbeef),
                Verdict::Critical,
                vec![("diverged", Critical, vec!["a"])],
            ),
            (
                "three hashes: no majority agrees, every member is named",
                |v| {
                    v.members[0].hash = Some(1);
                    v.members[1].hash = Some(2);
                },
                Verdict::Critical,
                vec![("diverged", Critical, vec!["a", "b", "c"])],
            ),
            (
                "one of two answering differs: no majority agrees",
                |v| {
                    down(&mut v.members[2]);
                    v.members[1].hash = Some(0xbeef);
                },
                Verdict::Critical,
                vec![("member-down", Degraded, vec!["c"]), ("diverged", Critical, vec!["a", "b"])],
            ),
            (
                "a slow disk",
                |v| v.members[2].fsync_p99_ms = Some(812.5),
                Verdict::Degraded,
                vec![("slow-disk", Degraded, vec!["c"])],
            ),
            ("a fast disk", |v| v.members[2].fsync_p99_ms = Some(499.0), Verdict::Healthy, vec![]),
            (
                "one slow commit among too few to judge",
                |v| {
                    v.members[2].fsync_p99_ms = Some(900.0);
                    v.members[2].fsync_samples = Some(4);
                },
                Verdict::Healthy,
                vec![],
            ),
            (
                "a skewed clock",
                |v| v.members[1].clock_offset_ms = Some(-30_000),
                Verdict::Degraded,
                vec![("clock-skew", Degraded, vec!["b"])],
            ),
            (
                "an offset within its error bound",
                |v| {
                    v.members[1].clock_offset_ms = Some(1400);
                    v.members[1].clock_offset_error_ms = Some(500);
                },
                Verdict::Healthy,
                vec![],
            ),
            (
                "a NOSPACE alarm",
                |v| {
                    for m in &mut v.members {
                        m.alarms = vec![format!("memberID:{} alarm:NOSPACE", 0xb2)];
                    }
                },
                Verdict::Critical,
                vec![("alarm-nospace", Critical, vec!["b"])],
            ),
            (
                "the brake holds a zone",
                |v| {
                    v.brake =
                        vec![BrakeZone { zone: "eu-1".into(), held_ms: 42_000, reason: "30 of 40 expired".into() }]
                },
                Verdict::Degraded,
                vec![("brake-engaged", Degraded, vec!["a"])],
            ),
            (
                "a member isolated, as the leader and the member itself say",
                |v| {
                    let i = crate::collect::Isolation { reason: "disk".into(), since: "t".into(), by: "op@h".into() };
                    v.members[2].isolated = Some(i.clone());
                    v.members[2].is_learner = true;
                    v.members[0].isolated_members =
                        vec![crate::collect::IsolatedMember { id: "c3".into(), isolation: i, demotion_pending: false }];
                },
                Verdict::Degraded,
                vec![("isolated", Degraded, vec!["c"])],
            ),
            (
                "an isolated member only the member itself reports",
                |v| {
                    let i = crate::collect::Isolation { reason: "disk".into(), since: "t".into(), by: "op@h".into() };
                    v.members[1].isolated = Some(i);
                },
                Verdict::Degraded,
                vec![("isolated", Degraded, vec!["b"])],
            ),
            (
                "a learner far behind",
                |v| {
                    let mut l = member("d", "d4", "learner");
                    l.is_learner = true;
                    l.applied_index = Some(5);
                    v.members[0].commit_index = Some(5000);
                    v.members[1].applied_index = Some(5000);
                    v.members[2].applied_index = Some(5000);
                    v.members.push(l);
                },
                Verdict::Degraded,
                vec![("learner-behind", Degraded, vec!["d"])],
            ),
        ];
        for (name, setup, verdict, want) in cases {
            let mut v = healthy();
            setup(&mut v);
            let r = judge(&v, &Thresholds::default());
            let want: Vec<(&str, Severity, Vec<String>)> =
                want.into_iter().map(|(c, s, ms)| (c, s, ms.into_iter().map(String::from).collect())).collect();
            assert_eq!(codes(&r), want, "{name}");
            assert_eq!(r.verdict, verdict, "{name}");
            for f in &r.findings {
                assert!(!f.evidence.is_empty(), "{name}: {} has evidence", f.code);
                assert!(f.fix.iter().any(|s| s.contains('`')), "{name}: {} names a command", f.code);
            }
        }
    }

    #[test]
    fn a_deposed_leader_is_shown_beside_the_new_one_with_each_side_s_term() {
        let mut v = healthy();
        v.members[0].last_leader_contact_ms = Some(20_000);
        for m in &mut v.members[1..] {
            m.term = Some(3);
            m.leader = Some("b2".into());
        }
        v.members[1].role = Some("leader".into());
        v.members[1].last_leader_contact_ms = Some(80);
        let r = judge(&v, &Thresholds::default());
        let f = &r.findings[0];
        assert_eq!(f.code, "split-view");
        assert!(f.evidence.contains("a still claims to lead term 2"), "{}", f.evidence);
        assert!(f.evidence.contains("no quorum has acknowledged it for 20000 ms"), "{}", f.evidence);
        assert!(f.evidence.contains("while b leads term 3"), "{}", f.evidence);
        assert!(
            f.evidence.contains("leader b in term 3 (seen by b, c; quorum last acknowledged it 80 ms ago)"),
            "{}",
            f.evidence
        );
        assert!(
            f.evidence.contains("leader a in term 2 (seen by a; quorum last acknowledged it 20000 ms ago)"),
            "{}",
            f.evidence
        );
        assert!(
            f.fix.iter().any(|s| s.contains("endpoint status") && s.contains(&v.members[1].endpoint)),
            "{:?}",
            f.fix
        );
    }

    #[test]
    fn a_diverged_member_s_fix_names_its_id_peer_url_and_the_majority() {
        let mut v = healthy();
        v.members[1].hash = Some(0xbeef);
        v.members[0].hash = Some(0xdead);
        let r = judge(&v, &Thresholds::default());
        let f = &r.findings[0];
        assert_eq!(f.evidence, "HashKV at revision 50: 0000beef on b; 0000dead on a,c");
        let maj = format!("{},{}", v.members[0].endpoint, v.members[2].endpoint);
        let fix = f.fix.join("\n");
        assert!(fix.contains(&format!("--endpoints={maj} member remove b2")), "{fix}");
        assert!(fix.contains(&format!("member add b --peer-urls={}", v.members[1].peer_url)), "{fix}");
        assert!(fix.contains(&format!("--endpoints={} snapshot save", v.members[0].endpoint)), "{fix}");
        assert!(!fix.contains("move-leader"), "b does not lead: {fix}");

        v.members[0].hash = Some(0xbeef);
        v.members[1].hash = Some(0xdead);
        let r = judge(&v, &Thresholds::default());
        assert!(r.findings[0].fix.iter().any(|s| s.contains("move-leader b2")), "{:?}", r.findings[0].fix);
    }

    #[test]
    fn the_exit_code_is_the_verdict() {
        assert_eq!(Verdict::Healthy.exit_code(), 0);
        assert_eq!(Verdict::Degraded.exit_code(), 1);
        assert_eq!(Verdict::Critical.exit_code(), 2);
    }

    #[test]
    fn json_has_the_documented_shape() {
        let mut v = healthy();
        down(&mut v.members[2]);
        let j = serde_json::to_value(judge(&v, &Thresholds::default())).unwrap();
        assert_eq!(j["verdict"], "degraded");
        let f = &j["findings"][0];
        assert_eq!(f["code"], "member-down");
        assert_eq!(f["severity"], "degraded");
        assert_eq!(f["members"][0], "c");
        assert!(f["evidence"].as_str().unwrap().contains("2/3 voters answer"));
        assert!(f["fix"].as_array().unwrap().len() >= 2);
    }
}
