//! The faults and their schedule. Each fault is injected, held, and healed by the runner; the
//! schedule (which faults, in which order, on which members) comes from the seed alone.

use std::time::Duration;

use anyhow::{bail, Context};
use quorate_api_grpc::pb::etcdserverpb as pb;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;

use crate::hosts::{Hosts, Target};
use crate::workload::channel;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    PartitionLeader,
    MajorityMinority,
    Bridge,
    OneWayLoss,
    DelaySpike,
    Pause,
    Kill,
    ClockJump,
    SlowDisk,
    Membership,
    LeaderTransfer,
    /// Opt-in (`--faults quorum-loss`), quorate only: a majority lost for good, then recovered.
    QuorumLoss,
}

pub const ALL: [FaultKind; 11] = [
    FaultKind::PartitionLeader,
    FaultKind::MajorityMinority,
    FaultKind::Bridge,
    FaultKind::OneWayLoss,
    FaultKind::DelaySpike,
    FaultKind::Pause,
    FaultKind::Kill,
    FaultKind::ClockJump,
    FaultKind::SlowDisk,
    FaultKind::Membership,
    FaultKind::LeaderTransfer,
];

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::PartitionLeader => "partition-leader",
            FaultKind::MajorityMinority => "majority-minority",
            FaultKind::Bridge => "bridge",
            FaultKind::OneWayLoss => "one-way-loss",
            FaultKind::DelaySpike => "delay-spike",
            FaultKind::Pause => "pause",
            FaultKind::Kill => "kill",
            FaultKind::ClockJump => "clock-jump",
            FaultKind::SlowDisk => "slow-disk",
            FaultKind::Membership => "membership",
            FaultKind::LeaderTransfer => "leader-transfer",
            FaultKind::QuorumLoss => "quorum-loss",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<FaultKind> {
        ALL.into_iter().chain(OPT_IN).find(|f| f.name() == s).with_context(|| {
            let names: Vec<&str> = ALL.iter().chain(&OPT_IN).map(|f| f.name()).collect();
            format!("unknown fault {s:?}; faults are: {}", names.join(", "))
        })
    }
}

/// Faults run only when named in `--faults`.
pub const OPT_IN: [FaultKind; 1] = [FaultKind::QuorumLoss];

/// The order faults run in: every selected kind once (shuffled), then, for longer drills,
/// kinds drawn at random, until `count` faults.
pub fn schedule(kinds: &[FaultKind], count: usize, rng: &mut StdRng) -> Vec<FaultKind> {
    let mut out = kinds.to_vec();
    out.shuffle(rng);
    while out.len() < count {
        out.push(kinds[rng.random_range(0..kinds.len())]);
    }
    out.truncate(count.max(kinds.len()));
    out
}

/// What is in force, to be healed.
pub enum Active {
    Cut,
    Paused(usize),
    Delayed(usize),
    Killed(usize),
    Clock(usize),
    SlowDisk(usize),
    /// Nothing to undo (done, or the fault does not apply to this target).
    Nothing,
}

/// Member `slot`'s Status, or `None` if it did not answer in time.
pub async fn status(hosts: &Hosts, slot: usize) -> Option<pb::StatusResponse> {
    let mut m = pb::maintenance_client::MaintenanceClient::new(channel(&hosts.client_url(slot)));
    let r = tokio::time::timeout(Duration::from_millis(500), m.status(pb::StatusRequest {})).await;
    r.ok()?.ok().map(tonic::Response::into_inner)
}

/// The slot of the member that says it leads (with the highest term), if any.
pub async fn leader(hosts: &Hosts) -> Option<usize> {
    let mut best: Option<(u64, usize)> = None;
    for slot in 0..hosts.members.len() {
        if let Some(s) = status(hosts, slot).await {
            let me = s.header.as_ref().map_or(0, |h| h.member_id);
            if s.leader == me && best.is_none_or(|(t, _)| s.raft_term > t) {
                best = Some((s.raft_term, slot));
            }
        }
    }
    best.map(|(_, slot)| slot)
}

async fn leader_or_random(hosts: &Hosts, rng: &mut StdRng) -> usize {
    match leader(hosts).await {
        Some(l) => l,
        None => rng.random_range(0..hosts.members.len()),
    }
}

fn member_id(s: &pb::StatusResponse) -> u64 {
    s.header.as_ref().map_or(0, |h| h.member_id)
}

/// Inject `kind`; returns what to heal and a one-line description for the timeline.
/// Whether an injection did nothing (the fault does not apply here, or there was nothing to do).
pub fn skipped(what: &str) -> bool {
    what.starts_with("skipped") || what.starts_with("not applicable") || what.starts_with("could not inject")
}

pub async fn inject(
    kind: FaultKind,
    hosts: &mut Hosts,
    rng: &mut StdRng,
    rec: &crate::workload::Recorder,
) -> anyhow::Result<(Active, String)> {
    let n = hosts.members.len();
    let name = |h: &Hosts, s: usize| h.members[s].name.clone();
    Ok(match kind {
        FaultKind::PartitionLeader => {
            let l = leader_or_random(hosts, rng).await;
            let links: Vec<(usize, usize)> = (0..n).filter(|o| *o != l).flat_map(|o| [(l, o), (o, l)]).collect();
            hosts.cut(&links)?;
            (Active::Cut, format!("{} (leader) cut off from every other member", name(hosts, l)))
        }
        FaultKind::MajorityMinority => {
            let l = leader_or_random(hosts, rng).await;
            let mut others: Vec<usize> = (0..n).filter(|o| *o != l).collect();
            others.shuffle(rng);
            // The leader and enough others to stay short of a majority.
            let mut minority = vec![l];
            minority.extend(others.iter().take((n - 1) / 2 - 1).copied());
            let majority: Vec<usize> = (0..n).filter(|s| !minority.contains(s)).collect();
            let links: Vec<(usize, usize)> =
                minority.iter().flat_map(|a| majority.iter().flat_map(move |b| [(*a, *b), (*b, *a)])).collect();
            hosts.cut(&links)?;
            let names = |v: &[usize]| v.iter().map(|s| name(hosts, *s)).collect::<Vec<_>>().join(",");
            (
                Active::Cut,
                format!("minority [{}] (with the leader) cut from majority [{}]", names(&minority), names(&majority)),
            )
        }
        FaultKind::Bridge => {
            // One member sees everyone; the rest split into two halves that cannot see each other.
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(rng);
            let bridge = order[0];
            let (left, right) = order[1..].split_at((n - 1) / 2);
            let links: Vec<(usize, usize)> =
                left.iter().flat_map(|a| right.iter().flat_map(move |b| [(*a, *b), (*b, *a)])).collect();
            hosts.cut(&links)?;
            (Active::Cut, format!("{} bridges two halves that cannot see each other", name(hosts, bridge)))
        }
        FaultKind::OneWayLoss => {
            let l = leader_or_random(hosts, rng).await;
            let links: Vec<(usize, usize)> = (0..n).filter(|o| *o != l).map(|o| (l, o)).collect();
            hosts.cut(&links)?;
            (Active::Cut, format!("everything {} (leader) sends is lost; it still hears the others", name(hosts, l)))
        }
        FaultKind::DelaySpike => {
            let s = if rng.random_bool(0.5) { leader_or_random(hosts, rng).await } else { rng.random_range(0..n) };
            let ms = rng.random_range(200..1500);
            hosts.set_delay(s, ms)?;
            (Active::Delayed(s), format!("everything {}'s peers send it arrives {ms} ms late", name(hosts, s)))
        }
        FaultKind::Pause => {
            let s = if rng.random_bool(0.5) { leader_or_random(hosts, rng).await } else { rng.random_range(0..n) };
            hosts.pause(s);
            (Active::Paused(s), format!("SIGSTOP {}", name(hosts, s)))
        }
        FaultKind::Kill => {
            let s = if rng.random_bool(0.5) { leader_or_random(hosts, rng).await } else { rng.random_range(0..n) };
            hosts.kill9(s);
            (Active::Killed(s), format!("kill -9 {}", name(hosts, s)))
        }
        FaultKind::ClockJump => {
            if !hosts.has_faketime() {
                return Ok((
                    Active::Nothing,
                    "skipped: libfaketime is not installed (apt-get install faketime)".into(),
                ));
            }
            let s = rng.random_range(0..n);
            let offset = if rng.random_bool(0.5) { "+3h" } else { "-3h" };
            hosts.set_clock(s, offset)?;
            let note =
                if hosts.target == Target::Etcd { " (Go reads the clock without libc: no effect on etcd)" } else { "" };
            (Active::Clock(s), format!("wall clock of {} jumps {offset}{note}", name(hosts, s)))
        }
        FaultKind::SlowDisk => {
            if hosts.target != Target::Quorate {
                return Ok((Active::Nothing, "not applicable: needs quorate's fsync failpoint".into()));
            }
            let s = leader_or_random(hosts, rng).await;
            set_fsync_delay(hosts, s, 400).await?;
            (Active::SlowDisk(s), format!("every log fsync on {} stalls 400 ms", name(hosts, s)))
        }
        FaultKind::Membership => {
            let s = rng.random_range(0..n);
            let desc = replace_member(hosts, s).await?;
            (Active::Nothing, desc)
        }
        FaultKind::QuorumLoss => {
            if hosts.target != Target::Quorate {
                return Ok((Active::Nothing, "not applicable: needs `quorate ctl recover`".into()));
            }
            (Active::Nothing, crate::quorum_loss::inject(hosts, rng, rec).await?)
        }
        FaultKind::LeaderTransfer => {
            let Some(l) = leader(hosts).await else {
                return Ok((Active::Nothing, "skipped: no leader to transfer from".into()));
            };
            let to = (l + 1 + rng.random_range(0..n - 1)) % n;
            let target = status(hosts, to).await.map(|s| member_id(&s)).context("target member did not answer")?;
            let mut m = pb::maintenance_client::MaintenanceClient::new(channel(&hosts.client_url(l)));
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                m.move_leader(pb::MoveLeaderRequest { target_id: target }),
            )
            .await;
            let how = match r {
                Ok(Ok(_)) => "done".to_string(),
                Ok(Err(s)) => format!("refused: {}", s.message()),
                Err(_) => "timed out".to_string(),
            };
            (Active::Nothing, format!("move leader {} -> {}: {how}", name(hosts, l), name(hosts, to)))
        }
    })
}

pub async fn heal(active: Active, hosts: &mut Hosts) -> anyhow::Result<()> {
    match active {
        Active::Cut => hosts.heal_links()?,
        Active::Paused(s) => hosts.resume(s),
        Active::Delayed(s) => hosts.set_delay(s, 0)?,
        Active::Killed(s) => {
            let ic = hosts.initial_cluster();
            hosts.spawn(s, &ic, false)?;
        }
        Active::Clock(s) => hosts.set_clock(s, "+0")?,
        Active::SlowDisk(s) => set_fsync_delay(hosts, s, 0).await?,
        Active::Nothing => {}
    }
    Ok(())
}

async fn set_fsync_delay(hosts: &Hosts, slot: usize, ms: u64) -> anyhow::Result<()> {
    let path = "/debug/failpoints/fsync-delay-ms";
    let (status, body) =
        crate::http::call(&hosts.http_addr(slot), "PUT", path, &ms.to_string(), Duration::from_secs(3))
            .await
            .context("failpoint call")?;
    if status != 200 {
        bail!("failpoint refused ({status}): {body}");
    }
    Ok(())
}

/// Remove member `slot` from the cluster, then add a fresh member with an empty data
/// directory in its place (same namespace and address, new name), as an operator replaces a
/// broken machine.
async fn replace_member(hosts: &mut Hosts, slot: usize) -> anyhow::Result<String> {
    let n = hosts.members.len();
    let old_name = hosts.members[slot].name.clone();
    let old_id = status(hosts, slot).await.map(|s| member_id(&s));
    // Ask a member other than the one leaving.
    let via = (0..n).find(|s| *s != slot).unwrap_or(0);
    let mut cluster = pb::cluster_client::ClusterClient::new(channel(&hosts.client_url(via)));
    let list =
        tokio::time::timeout(Duration::from_secs(3), cluster.member_list(pb::MemberListRequest { linearizable: true }))
            .await
            .context("member list timed out")??
            .into_inner();
    let old_id = old_id
        .or_else(|| list.members.iter().find(|m| m.name == old_name).map(|m| m.id))
        .context("the member to replace is not listed")?;
    tokio::time::timeout(Duration::from_secs(10), cluster.member_remove(pb::MemberRemoveRequest { id: old_id }))
        .await
        .context("member remove timed out")??;
    hosts.renew(slot)?;
    let new_name = add_fresh(hosts, slot, via).await?;
    Ok(format!("removed {old_name}, added a fresh {new_name} in its place"))
}

/// Add member `slot` (renewed: new name, empty data directory) to the cluster through member
/// `via`, and start it joining; its name.
pub(crate) async fn add_fresh(hosts: &mut Hosts, slot: usize, via: usize) -> anyhow::Result<String> {
    let mut cluster = pb::cluster_client::ClusterClient::new(channel(&hosts.client_url(via)));
    let peer = hosts.peer_url(slot);
    // etcd refuses membership changes while it considers the cluster unhealthy (a member
    // reconnecting after the previous fault): an operator retries, and so does the drill.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let added = loop {
        let add = cluster.member_add(pb::MemberAddRequest { peer_ur_ls: vec![peer.clone()], is_learner: false });
        match tokio::time::timeout(Duration::from_secs(10), add).await {
            Ok(Ok(r)) => break r.into_inner(),
            Ok(Err(s)) if tokio::time::Instant::now() < deadline => {
                eprintln!("drill: member add refused ({}); retrying", s.message());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(Err(s)) => bail!("could not add {}: {}", hosts.members[slot].name, s.message()),
            Err(_) => bail!("adding {} timed out", hosts.members[slot].name),
        }
    };
    let new_name = hosts.members[slot].name.clone();
    // The initial cluster of a joining member: everyone listed, the new one under its name.
    let mut ic: Vec<String> = added
        .members
        .iter()
        .filter(|m| !m.peer_ur_ls.contains(&peer))
        .filter_map(|m| m.peer_ur_ls.first().map(|u| format!("{}={u}", m.name)))
        .collect();
    ic.push(format!("{new_name}={peer}"));
    hosts.spawn(slot, &ic.join(","), true)?;
    Ok(new_name)
}
