//! The runner: hosts up, clients and watchers on, faults on schedule, everything healed, the
//! final state read, every checker run, the report written.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use quorate_api_grpc::pb::etcdserverpb as pb;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::check::{self, convergence::MemberHash, leaders::Claim, linearizable::Verdict};
use crate::election::{self, CANDIDATES, PRIMARY_KEY};
use crate::faults::{self, FaultKind};
use crate::hosts::{Hosts, Links, Target};
use crate::net::{is_root, Net};
use crate::proxy::ProxyNet;
use crate::report::{self, Anomaly, FaultWindow, Report, SafetyRow};
use crate::workload::{self, channel, ClientCfg, Recorder, COUNTER_KEY};

pub struct DrillConfig {
    pub target: Target,
    pub members: usize,
    pub clients: usize,
    pub seed: u64,
    pub faults: Vec<FaultKind>,
    /// How many faults in all (at least one of each selected kind).
    pub count: usize,
    pub hold: Duration,
    pub quiet: Duration,
    pub out: PathBuf,
    /// The quorate binary (members run `quorate server`).
    pub bin: PathBuf,
    pub unsafe_local_reads: bool,
    /// Start quorate members with `--drill-early-lease-expiry` (a planted bug: renewals do not
    /// move deadlines).
    pub early_lease_expiry: bool,
    /// Members on loopback behind the drill's proxies (no root needed).
    pub proxy_mode: bool,
    pub check_budget: Duration,
    pub git_revision: String,
    pub replay: String,
}

pub async fn run(cfg: DrillConfig) -> anyhow::Result<Report> {
    if !cfg.proxy_mode && !is_root() {
        bail!("network namespaces need root: run it as root, or use --mode proxy (members on loopback behind the drill's own proxies)");
    }
    if cfg.members < 3 {
        bail!("--members must be at least 3 (a partition needs a majority and a minority)");
    }
    if cfg.target == Target::Etcd && which("etcd").is_none() {
        bail!("--target etcd needs the etcd binary on PATH (apt-get install etcd-server)");
    }
    let hosts_dir = cfg.out.join("hosts");
    let _ = std::fs::remove_dir_all(&hosts_dir);
    std::fs::create_dir_all(&hosts_dir).with_context(|| format!("create {}", hosts_dir.display()))?;
    let links = if cfg.proxy_mode {
        // Below the ephemeral port range, spread by pid so two drills do not collide.
        let base = 10_000 + (std::process::id() % 200) as u16 * 100;
        Links::Proxy { net: ProxyNet::new(cfg.members), base }
    } else {
        Links::Netns(Net::create(cfg.members).context("create the network namespaces")?)
    };
    let mut extra = Vec::new();
    if cfg.target == Target::Quorate {
        extra.push("--drill-failpoints".to_string());
        if cfg.unsafe_local_reads {
            extra.push("--drill-unsafe-local-reads".to_string());
        }
        if cfg.early_lease_expiry {
            extra.push("--drill-early-lease-expiry".to_string());
        }
    }
    let mut hosts = Hosts::new(links, cfg.target, cfg.bin.clone(), &hosts_dir, cfg.members, extra);
    hosts.start_proxies().await?;
    let ic = hosts.initial_cluster();
    for slot in 0..cfg.members {
        hosts.spawn(slot, &ic, false)?;
    }
    eprintln!(
        "drill: {} members of {} started ({}); waiting for a leader",
        cfg.members,
        cfg.target.name(),
        hosts.mode()
    );
    wait_ready(&mut hosts, Duration::from_secs(30)).await?;
    let start_rev = put(&hosts, "drill/start", "1").await.context("first write")?;

    let rec = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for id in 0..cfg.clients {
        let c = ClientCfg {
            id: id as u32,
            url: hosts.client_url(id % cfg.members),
            seed: cfg.seed,
            locks: cfg.target == Target::Quorate && id < 4,
        };
        tasks.push(tokio::spawn(workload::run_client(c, rec.clone(), stop.clone())));
    }
    for slot in 0..cfg.members {
        let w = workload::run_watcher(slot, hosts.client_url(slot), start_rev + 1, rec.clone(), stop.clone());
        tasks.push(tokio::spawn(w));
    }
    // The seed's primary election, and on every member a watch on its key and on the lease
    // sessions' keys, whose deletions the lease-expiry checker judges.
    for i in 0..CANDIDATES {
        let c = election::run_candidate(i, hosts.client_url(i % cfg.members), cfg.seed, rec.clone(), stop.clone());
        tasks.push(tokio::spawn(c));
    }
    for slot in 0..cfg.members {
        for (key, range_end) in [(PRIMARY_KEY, ""), ("l/", "l0")] {
            let url = hosts.client_url(slot);
            let w = workload::run_lease_watcher(slot, url, key, range_end, start_rev + 1, rec.clone(), stop.clone());
            tasks.push(tokio::spawn(w));
        }
    }
    let registry = (cfg.target == Target::Quorate).then(|| {
        let addrs: Vec<String> = (0..cfg.members).map(|s| hosts.http_addr(s)).collect();
        tokio::spawn(crate::registry::run(addrs, rec.clone(), stop.clone(), cfg.seed))
    });
    let claims = Arc::new(std::sync::Mutex::new(Vec::<Claim>::new()));
    let urls: Vec<String> = (0..cfg.members).map(|s| hosts.client_url(s)).collect();
    let poller = tokio::spawn(poll_leaders(urls, rec.clone(), claims.clone(), stop.clone()));

    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let plan = faults::schedule(&cfg.faults, cfg.count, &mut rng);
    eprintln!(
        "drill: {} clients running; faults: {}",
        cfg.clients,
        plan.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
    );
    tokio::time::sleep(cfg.quiet).await;
    let mut windows = Vec::new();
    for kind in plan {
        let start_ms = rec.now_ms();
        let (active, what) = match faults::inject(kind, &mut hosts, &mut rng, &rec).await {
            Ok(a) => a,
            Err(e) => (faults::Active::Nothing, format!("could not inject: {e:#}")),
        };
        eprintln!("drill: {:>6.1}s {}: {what}", start_ms as f64 / 1000.0, kind.name());
        let applied = !faults::skipped(&what);
        if applied {
            tokio::time::sleep(cfg.hold).await;
        }
        if let Err(e) = faults::heal(active, &mut hosts).await {
            eprintln!("drill: healing {} failed: {e:#}", kind.name());
        }
        let healed_ms = rec.now_ms();
        windows.push(FaultWindow {
            kind: kind.name(),
            what,
            start_ms,
            healed_ms,
            applied,
            unavailable_ms: None,
            recovery_ms: None,
        });
        tokio::time::sleep(cfg.quiet).await;
    }
    // Everything healed, whatever happened above.
    hosts.heal_links()?;
    for slot in 0..cfg.members {
        hosts.resume(slot);
        hosts.set_clock(slot, "+0")?;
        hosts.set_delay(slot, 0)?;
    }
    tokio::time::sleep(cfg.quiet).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
    }
    let _ = poller.await;
    let registry = match registry {
        Some(t) => Some(t.await.context("registry workload")?),
        None => None,
    };
    let ended_ms = rec.now_ms();
    eprintln!("drill: workload stopped at {:.1}s; reading the final state", ended_ms as f64 / 1000.0);
    wait_ready(&mut hosts, Duration::from_secs(60)).await.context("the cluster did not recover after the faults")?;
    // Abandoned leases: TTL plus a new leader's grace, from the last one granted.
    tokio::time::sleep(Duration::from_secs(6)).await;

    let claims = claims.lock().unwrap().clone();
    let mut rep = judge(&cfg, &hosts, &rec, &claims, registry, start_rev, &mut windows).await?;
    rep.duration_s = rec.start.elapsed().as_secs_f64();
    std::fs::write(cfg.out.join("report.json"), serde_json::to_vec_pretty(&rep)?)?;
    std::fs::write(cfg.out.join("report.md"), rep.markdown())?;
    Ok(rep)
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join(bin)).find(|p| p.exists())
}

/// Every member answers Status, one of them leads, and a write goes through.
async fn wait_ready(hosts: &mut Hosts, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut all = true;
        for slot in 0..hosts.members.len() {
            if !hosts.is_running(slot) {
                bail!("member {} exited:\n{}", hosts.members[slot].name, hosts.log_tail(slot, 20));
            }
            all &= faults::status(hosts, slot).await.is_some_and(|s| s.leader != 0);
        }
        if all && put(hosts, "drill/ready", "1").await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("members not ready within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A write through any member; its revision.
async fn put(hosts: &Hosts, key: &str, value: &str) -> anyhow::Result<i64> {
    for slot in 0..hosts.members.len() {
        let mut kv = pb::kv_client::KvClient::new(channel(&hosts.client_url(slot)));
        let req = pb::PutRequest { key: key.into(), value: value.into(), ..Default::default() };
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(3), kv.put(req)).await {
            return Ok(r.into_inner().header.map_or(0, |h| h.revision));
        }
    }
    bail!("no member accepted a write")
}

async fn poll_leaders(
    urls: Vec<String>,
    rec: Arc<Recorder>,
    claims: Arc<std::sync::Mutex<Vec<Claim>>>,
    stop: Arc<AtomicBool>,
) {
    let clients: Vec<_> = urls.iter().map(|u| pb::maintenance_client::MaintenanceClient::new(channel(u))).collect();
    while !stop.load(Ordering::Relaxed) {
        let polls = clients.iter().map(|c| {
            let mut c = c.clone();
            async move { tokio::time::timeout(Duration::from_millis(400), c.status(pb::StatusRequest {})).await }
        });
        for r in futures::future::join_all(polls).await {
            if let Ok(Ok(s)) = r {
                let s = s.into_inner();
                let me = s.header.as_ref().map_or(0, |h| h.member_id);
                if me != 0 && s.leader == me {
                    let c = Claim { at_ms: rec.now_ms(), member: format!("{me:x}"), term: s.raft_term };
                    claims.lock().unwrap().push(c);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const LEASE_EXPIRY_ROW: &str = "leases expired early (a key gone before its last answered grant or renewal + TTL)";
const PRIMARIES_ROW: &str = "two primaries (the seed's lease election: overlapping promised terms)";
const REGISTRY_ROW: &str = "registry (live instance evicted, or stopped one kept past TTL + election timeout)";

fn row(check: &'static str, result: String, ok: bool) -> SafetyRow {
    SafetyRow { check, result, ok }
}

fn count_row(check: &'static str, n: usize) -> SafetyRow {
    row(check, n.to_string(), n == 0)
}

async fn judge(
    cfg: &DrillConfig,
    hosts: &Hosts,
    rec: &Arc<Recorder>,
    claims: &[Claim],
    registry: Option<crate::registry::RegistryRecord>,
    start_rev: i64,
    windows: &mut [FaultWindow],
) -> anyhow::Result<Report> {
    let url = hosts.client_url(0);
    let mut kv = pb::kv_client::KvClient::new(channel(&url));
    // Every client and watcher has stopped: the record is final.
    let r = std::mem::take(&mut *rec.rec.lock().unwrap());
    let mut anomalies = Vec::new();
    let mut safety = Vec::new();

    // Final values of every register key and every lease key, read linearizably.
    let mut finals: BTreeMap<String, Option<String>> = BTreeMap::new();
    for key in &r.register_keys {
        let got =
            kv.range(pb::RangeRequest { key: key.clone().into_bytes(), ..Default::default() }).await?.into_inner();
        finals.insert(key.clone(), got.kvs.first().map(|kv| String::from_utf8_lossy(&kv.value).into_owned()));
    }
    let mut leftover = Vec::new();
    for (key, lease) in &r.lease_keys {
        let got =
            kv.range(pb::RangeRequest { key: key.clone().into_bytes(), ..Default::default() }).await?.into_inner();
        if !got.kvs.is_empty() {
            leftover.push((key.clone(), *lease));
        }
    }

    eprintln!("drill: checking {} register operations on {} keys", r.register.len(), r.register_keys.len());
    match check::linearizable::check(&r.register, cfg.check_budget) {
        Verdict::Linearizable => safety.push(row("linearizability violations (per key)", "0".into(), true)),
        Verdict::Violation { key, ops } => {
            safety.push(row("linearizability violations (per key)", format!("1 (key {key})"), false));
            anomalies.push(Anomaly {
                check: "linearizability",
                detail: format!("No order of these operations on {key} explains what the clients saw (a minimal failing sub-history):"),
                history: ops,
            });
        }
        Verdict::TimedOut { key } => safety.push(row(
            "linearizability violations (per key)",
            format!("undecided: the search ran out of its budget on {key}"),
            false,
        )),
    }

    let lost = check::lost_writes::check(&r.register, &finals);
    safety.push(count_row("lost acknowledged writes", lost.len()));
    for l in lost {
        anomalies.push(Anomaly {
            check: "lost acknowledged writes",
            detail: format!("{}: final value {:?} cannot follow these acknowledged writes", l.key, l.final_value),
            history: l.lost,
        });
    }

    // Status polls name members by id, logs by name: each source is checked on its own.
    let mut two = check::leaders::check(claims);
    let mut logged = Vec::new();
    for entry in std::fs::read_dir(&hosts.dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(member) = name.strip_suffix(".log").filter(|m| m.starts_with('m')) else { continue };
        let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for term in check::leaders::terms_in_log(&log) {
            logged.push(Claim { at_ms: 0, member: member.to_string(), term });
        }
    }
    two.extend(check::leaders::check(&logged));
    let result = format!("{} ({} Status claims, {} log claims)", two.len(), claims.len(), logged.len());
    safety.push(row("terms with two leaders (Status polls and member logs)", result, two.is_empty()));
    for t in two {
        // What the logs say of that term helps tell two Raft leaders from a Status answer
        // whose leader and term fields were read at different moments.
        let mut in_logs: Vec<&str> = logged.iter().filter(|c| c.term == t.term).map(|c| c.member.as_str()).collect();
        in_logs.dedup();
        anomalies.push(Anomaly {
            check: "leaders",
            detail: format!(
                "term {}: members {:?} each said they led; the members' logs name {:?} as elected in that term",
                t.term, t.members, in_logs
            ),
            history: vec![],
        });
    }

    if r.recoveries > 0 || !r.recovery_failures.is_empty() {
        let result = format!("{} ({} recoveries)", r.recovery_failures.len(), r.recoveries);
        safety.push(row(
            "quorum-loss recoveries that went wrong (plan, fencing, term)",
            result,
            r.recovery_failures.is_empty(),
        ));
        for f in &r.recovery_failures {
            anomalies.push(Anomaly { check: "quorum-loss recovery", detail: f.clone(), history: vec![] });
        }
    }

    let revs = check::revisions::check(&r.acked);
    safety.push(count_row("revision anomalies (shared by two writes, or going back)", revs.len()));
    for a in revs {
        anomalies.push(Anomaly { check: "revisions", detail: format!("{a:?}"), history: vec![] });
    }

    // The reference for the watchers: every change to the register keys, from the history.
    let reference = reference_changes(&url, start_rev + 1).await?;
    let mut watch_anomalies = 0;
    for (slot, start, deliveries) in &r.watches {
        for a in check::watch::check(*start, deliveries, &reference) {
            watch_anomalies += 1;
            anomalies.push(Anomaly {
                check: "watch",
                detail: format!("watcher on member slot {slot}: {a:?}"),
                history: vec![],
            });
        }
    }
    safety.push(count_row("watch anomalies (order, gaps, duplicates, split revisions)", watch_anomalies));

    let leases = check::leases::check(&r.lease_reads, &leftover);
    safety.push(count_row("lease anomalies (key outlived its lease)", leases.len()));
    for a in leases {
        anomalies.push(Anomaly { check: "leases", detail: format!("{a:?}"), history: vec![] });
    }

    let early = check::lease_expiry::check(&r.lease_answers, &r.lease_revokes, &r.lease_deletions);
    let promised = check::lease_expiry::promises(&r.lease_answers).len();
    let result = format!(
        "{} ({promised} leases promised in {} answers, {} deletions of their keys seen by watchers or winning Txns)",
        early.len(),
        r.lease_answers.len(),
        r.lease_deletions.len()
    );
    safety.push(row(LEASE_EXPIRY_ROW, result, early.is_empty()));
    for e in early {
        anomalies.push(Anomaly {
            check: "lease expired early",
            detail: format!(
                "lease {:x}: key {} seen deleted by the {} at {:.0} ms (revision {}), {:.0} ms before the promise to client {} ran out (last answer + TTL: {:.0} ms)",
                e.lease, e.key, e.observer, e.seen_ms, e.revision, e.early_ms, e.client, e.promised_until_ms
            ),
            history: vec![],
        });
    }

    let beliefs = check::primaries::beliefs(&r.primary_wins, &r.lease_answers, &r.lease_revokes);
    let two = check::primaries::check(&beliefs);
    let [accepted, refused, unknown] = r.primary_work;
    let result = format!(
        "{} ({} terms as primary; fenced writes {accepted} accepted, {refused} refused, {unknown} unknown)",
        two.len(),
        beliefs.len()
    );
    safety.push(row(PRIMARIES_ROW, result, two.is_empty()));
    let ms = |ns: u64| ns as f64 / 1e6;
    for t in two {
        let (a, b) = (t.earlier, t.later);
        anomalies.push(Anomaly {
            check: "two primaries",
            detail: format!(
                "candidate {} (lease {:x}, create revision {}) was promised it was primary from {:.0} ms to {:.0} ms; candidate {} (lease {:x}, create revision {}) won at {:.0} ms: two primaries for {} ms",
                a.candidate, a.lease, a.create_revision, ms(a.from_ns), ms(a.until_ns),
                b.candidate, b.lease, b.create_revision, ms(b.from_ns), t.overlap_ms
            ),
            history: vec![],
        });
    }

    if cfg.target == Target::Quorate {
        let pairs = check::locks::check(&r.lock_accepted);
        safety.push(count_row("lock holders whose fenced writes were both accepted", pairs.len()));
        for (newer, stale) in pairs {
            anomalies.push(Anomaly {
                check: "locks",
                detail: format!(
                    "write with token {} accepted at revision {} after token {} wrote at {}",
                    stale.token, stale.revision, newer.token, newer.revision
                ),
                history: vec![],
            });
        }
        let got = kv.range(pb::RangeRequest { key: COUNTER_KEY.into(), ..Default::default() }).await?.into_inner();
        let counter: u64 = got.kvs.first().and_then(|kv| String::from_utf8_lossy(&kv.value).parse().ok()).unwrap_or(0);
        let accepted = r.lock_accepted.len() as u64;
        let ok = counter >= accepted && counter <= accepted + r.lock_unknown;
        let result = if ok {
            format!("equal ({counter} = {accepted} accepted + {} of {} unknown)", counter - accepted, r.lock_unknown)
        } else {
            format!("differs: counter {counter}, accepted {accepted}, unknown {}", r.lock_unknown)
        };
        safety.push(row("fenced counter = accepted increments", result, ok));
    } else {
        safety.push(row(
            "lock holders whose fenced writes were both accepted",
            "not applicable: etcd has no server-side fencing".into(),
            true,
        ));
        safety.push(row(
            "fenced counter = accepted increments",
            "not applicable: etcd has no server-side fencing".into(),
            true,
        ));
    }

    let end_rev = put(hosts, "drill/end", "1").await?;
    let hashes = hashes_at(hosts, end_rev).await;
    match check::convergence::check(&hashes) {
        None => safety.push(row(
            "convergence (HashKV on every member at one revision)",
            format!("equal at revision {end_rev}"),
            true,
        )),
        Some(diff) => {
            safety.push(row("convergence (HashKV on every member at one revision)", diff.clone(), false));
            anomalies.push(Anomaly { check: "convergence", detail: diff, history: vec![] });
        }
    }
    match registry {
        Some(reg) => {
            let faults: Vec<(u64, u64)> = windows.iter().map(|w| (w.start_ms, w.healed_ms)).collect();
            let bounds = check::registry::Bounds {
                ttl_ms: crate::registry::TTL_S * 1000,
                election_ms: hosts.election_ms,
                slack_ms: 1_500,
            };
            let found = check::registry::check(&reg.lives, &reg.listings, &reg.gone_on_heartbeat, &faults, &bounds);
            let stopped = reg.lives.iter().filter(|l| l.stopped_ms.is_some()).count();
            let result = format!(
                "{} ({} heartbeating, {stopped} stopped, {} discovery reads; {} lease lapses held by the brake and re-registered)",
                found.len(),
                reg.lives.len() - stopped,
                reg.listings.len(),
                reg.lapsed.len()
            );
            safety.push(row(REGISTRY_ROW, result, found.is_empty()));
            for a in found {
                anomalies.push(Anomaly { check: "registry", detail: format!("{a:?}"), history: vec![] });
            }
        }
        None => safety.push(row(REGISTRY_ROW, "not applicable: etcd has no registry".into(), true)),
    }

    let next_starts: Vec<u64> = windows.iter().skip(1).map(|w| w.start_ms).chain([u64::MAX]).collect();
    for (w, next) in windows.iter_mut().zip(next_starts) {
        if w.applied {
            let end = (w.healed_ms + 10_000).min(next);
            w.unavailable_ms = Some(report::unavailable(&r.stats, w.start_ms, end));
            w.recovery_ms = report::recovery(&r.stats, w.healed_ms);
        }
    }
    let first = windows.first().map_or(u64::MAX, |w| w.start_ms);
    let last = windows.last().map_or(u64::MAX, |w| w.healed_ms);
    let mut flags = Vec::new();
    if cfg.unsafe_local_reads {
        flags.push("--drill-unsafe-local-reads".to_string());
    }
    if cfg.early_lease_expiry && cfg.target == Target::Quorate {
        flags.push("--drill-early-lease-expiry".to_string());
    }
    Ok(Report {
        target: cfg.target.name(),
        seed: cfg.seed,
        git_revision: cfg.git_revision.clone(),
        members: cfg.members,
        clients: cfg.clients,
        heartbeat_ms: hosts.heartbeat_ms,
        election_ms: hosts.election_ms,
        duration_s: 0.0,
        mode: hosts.mode(),
        unsafe_flags: flags,
        counts: report::counts(&r.stats, first, last),
        unavailable_ms: report::percentiles(windows.iter().filter_map(|w| w.unavailable_ms).collect()),
        recovery_ms: report::percentiles(windows.iter().filter_map(|w| w.recovery_ms).collect()),
        faults: windows.to_vec(),
        safety,
        lock_refused_stale_writes: r.lock_refused,
        anomalies,
        replay: cfg.replay.clone(),
    })
}

/// Every change to the register keys from `from` on, as one watch replays it.
async fn reference_changes(url: &str, from: i64) -> anyhow::Result<Vec<check::watch::Change>> {
    let (tx, mut stream) = workload::watch_registers(url, from).await?;
    let mut out = Vec::new();
    while let Ok(Ok(Some(w))) = tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
        out.extend(workload::changes_of(&w));
    }
    drop(tx);
    Ok(out)
}

/// Every member's HashKV at `rev` (each retried until it has applied that far).
async fn hashes_at(hosts: &Hosts, rev: i64) -> Vec<MemberHash> {
    let mut out = Vec::new();
    for slot in 0..hosts.members.len() {
        let mut m = pb::maintenance_client::MaintenanceClient::new(channel(&hosts.client_url(slot)));
        let mut hash = None;
        for _ in 0..30 {
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_secs(2), m.hash_kv(pb::HashKvRequest { revision: rev })).await
            {
                hash = Some(r.into_inner().hash);
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        out.push(MemberHash { member: hosts.members[slot].name.clone(), revision: rev, hash });
    }
    out
}
