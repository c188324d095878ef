//! `quorate ctl recover` (issue 13 §2, ADR 0009) on real multi-process clusters: a majority
//! killed -9 for good (the leader among them), the plan, then the apply on the running survivors
//! (which restart in place) or on a stopped survivor's data directory; writes resume, every key
//! written before is kept; the dropped members restarted on their old data are refused by the new
//! cluster and cannot move its term; wiped and added again, they join.

use std::time::{Duration, Instant};

use quorate_tests::{ctl, etcdctl, http, Cluster, Flavor};

const KEYS: usize = 50;
const SETTLE: Duration = Duration::from_secs(30);

fn write_keys(endpoints: &str) {
    for i in 0..KEYS {
        let put = etcdctl(endpoints, &["put", &format!("before/{i:03}"), &format!("v{i}")]);
        assert!(put.ok, "{}", put.stderr);
    }
}

fn assert_keys_kept(endpoint: &str) {
    let got = etcdctl(endpoint, &["get", "before/", "--prefix", "--keys-only"]);
    assert!(got.ok, "{}", got.stderr);
    let keys = got.stdout.lines().filter(|l| !l.is_empty()).count();
    assert_eq!(keys, KEYS, "every key written before the loss is kept: {}", got.stdout);
}

/// The first put through `endpoint` that succeeds, retried until `limit`.
fn put_within(endpoint: &str, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if etcdctl(endpoint, &["--command-timeout=1s", "put", "after", "1"]).ok {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn status(c: &Cluster, i: usize) -> serde_json::Value {
    http(&c.nodes[i], "GET", "/v1/member/status", None).expect("status").json()
}

/// Five members with the keys written, then three killed -9 for good, the leader among them:
/// (the cluster, the lost, the survivors, the survivors' endpoints).
fn five_lose_three() -> (Cluster, Vec<usize>, Vec<usize>, String) {
    let mut c = Cluster::start(Flavor::Quorate, 5).expect("cluster");
    let leader = c.wait_leader(SETTLE).expect("leader");
    write_keys(&c.endpoints());
    let lost: Vec<usize> = (0..3).map(|k| (leader + k) % 5).collect();
    let survivors: Vec<usize> = (0..5).filter(|i| !lost.contains(i)).collect();
    for i in &lost {
        c.kill(*i);
    }
    let eps = survivors.iter().map(|i| c.nodes[*i].endpoint()).collect::<Vec<_>>().join(",");
    (c, lost, survivors, eps)
}

#[test]
fn three_of_five_lost_the_survivors_recover_and_the_dropped_are_fenced_then_re_added() {
    let (mut c, lost, survivors, eps) = five_lose_three();
    let pids_before: Vec<Option<u32>> = survivors.iter().map(|i| c.nodes[*i].pid()).collect();

    // Refused while a majority of the voters answers: one of the lost back makes three of five.
    c.spawn(lost[1]).expect("restart");
    let refused = ctl(&format!("{eps},{}", c.nodes[lost[1]].endpoint()), &["recover"]);
    assert_eq!(refused.code, 1, "{}{}", refused.stdout, refused.stderr);
    c.kill(lost[1]);
    // A survivor hears from no leader once its last contact is older than an election timeout
    // and two lease syncs: until then the plan is refused ("still hears from a leader").
    let deadline = Instant::now() + SETTLE;
    while survivors.iter().any(|i| {
        let r = http(&c.nodes[*i], "GET", "/v1/member/recovery", None).expect("recovery info");
        !r.json()["live_leader"].is_null()
    }) {
        assert!(Instant::now() < deadline, "the survivors still hear from a leader");
        std::thread::sleep(Duration::from_millis(200));
    }

    let dry = ctl(&eps, &["recover"]);
    assert_eq!(dry.code, 0, "{}{}", dry.stdout, dry.stderr);
    assert!(dry.stdout.contains("dry run") && dry.stdout.contains("incarnation: 1 -> 2"), "{}", dry.stdout);
    for i in &lost {
        assert!(dry.stdout.contains(&c.nodes[*i].name), "the plan names the dropped: {}", dry.stdout);
    }
    assert!(put_within(&eps, Duration::from_secs(2)).is_none(), "a dry run changes nothing");

    let started = Instant::now();
    let applied = ctl(&eps, &["recover", "--apply"]);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    assert!(applied.stdout.contains("recovered: leader"), "{}", applied.stdout);
    let resumed = put_within(&eps, Duration::from_secs(10)).expect("writes resume");
    eprintln!("writes resumed {:?} after the apply began", started.elapsed());
    let _ = resumed;
    let pids_after: Vec<Option<u32>> = survivors.iter().map(|i| c.nodes[*i].pid()).collect();
    assert_eq!(pids_before, pids_after, "the survivors restarted in place");
    for i in &survivors {
        assert_keys_kept(&c.nodes[*i].endpoint());
        assert_eq!(status(&c, *i)["incarnation"], 2);
    }
    let list = etcdctl(&eps, &["member", "list"]);
    assert_eq!(list.stdout.lines().count(), 2, "the survivors are the cluster: {}", list.stdout);
    // The doctor and the timeline say who recovered, when, and what was dropped.
    let doctor = ctl(&eps, &["doctor", "-w", "json"]);
    let report = doctor.json();
    let recovered = quorate_tests::findings(&report, "recovered");
    assert_eq!(recovered.len(), 1, "{report:#}");
    let evidence = recovered[0]["evidence"].as_str().unwrap();
    assert!(evidence.contains("recovered from quorum loss by ") && evidence.contains("incarnation 2"), "{evidence}");
    let timeline = ctl(&eps, &["timeline"]);
    assert!(timeline.stdout.contains("recovery ") && timeline.stdout.contains("dropped ["), "{}", timeline.stdout);

    // The dropped restarted on their old data: refused, and the survivors' term stays.
    let term_before = status(&c, survivors[0])["term"].as_u64().unwrap();
    for i in &lost {
        c.spawn(*i).expect("restart a dropped member");
    }
    std::thread::sleep(Duration::from_secs(6));
    for i in &lost {
        let st = status(&c, *i);
        assert!(
            st["fenced"].as_str().is_some_and(|f| f.contains("belongs to incarnation 1; the cluster is at 2")),
            "{st}"
        );
        let put = etcdctl(&c.nodes[*i].endpoint(), &["put", "from-dropped", "1"]);
        assert!(!put.ok && put.stderr.contains("belongs to incarnation 1"), "{}", put.stderr);
        assert!(c.log(*i).contains("belongs to incarnation 1; the cluster is at 2"), "its log says why");
    }
    let term_after = status(&c, survivors[0])["term"].as_u64().unwrap();
    assert_eq!(term_before, term_after, "the dropped moved the survivors' term");
    assert!(put_within(&eps, Duration::from_secs(2)).is_some());
    let doctor = ctl(&c.nodes[lost[0]].endpoint(), &["doctor", "-w", "json"]);
    assert!(doctor.stdout.contains("stale-incarnation"), "{}", doctor.stdout);

    // Wiped and added again, a dropped member joins the new cluster.
    let back = lost[0];
    c.kill(back);
    std::fs::remove_dir_all(&c.nodes[back].data_dir).unwrap();
    let added =
        etcdctl(&eps, &["member", "add", &c.nodes[back].name, &format!("--peer-urls={}", c.nodes[back].peer_url())]);
    assert!(added.ok, "{}", added.stderr);
    c.join(back).expect("join");
    let deadline = Instant::now() + SETTLE;
    loop {
        let got = etcdctl(&c.nodes[back].endpoint(), &["get", "before/", "--prefix", "--keys-only"]);
        if got.ok && got.stdout.lines().filter(|l| !l.is_empty()).count() == KEYS {
            break;
        }
        assert!(Instant::now() < deadline, "the re-added member serves the data: {}", got.stderr);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(status(&c, back)["incarnation"], 2, "it joined at the cluster's incarnation");
}

#[test]
fn a_stopped_survivor_is_recovered_offline_on_its_data_directory() {
    let mut c = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let leader = c.wait_leader(SETTLE).expect("leader");
    write_keys(&c.endpoints());
    let survivor = (leader + 1) % 3;
    for i in 0..3 {
        c.kill(i);
    }
    let dir = c.nodes[survivor].data_dir.to_str().unwrap().to_string();
    let endpoint = c.nodes[survivor].endpoint();
    let dry = ctl(&endpoint, &["recover", "--data-dir", &dir]);
    assert_eq!(dry.code, 0, "{}{}", dry.stdout, dry.stderr);
    assert!(dry.stdout.contains("(stopped)") && dry.stdout.contains("dry run"), "{}", dry.stdout);
    let applied = ctl(&endpoint, &["recover", "--data-dir", &dir, "--apply"]);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    let again = ctl(&endpoint, &["recover", "--data-dir", &dir, "--apply"]);
    assert_ne!(again.code, 0, "nothing left to recover once it is a cluster of one: {}", again.stdout);

    c.spawn(survivor).expect("start the survivor");
    put_within(&endpoint, SETTLE).expect("it leads a cluster of one");
    assert_keys_kept(&endpoint);
    assert_eq!(status(&c, survivor)["incarnation"], 2);
}

/// An `--apply` cut short (here: the plan applied by hand to one survivor only) is finished by
/// running the command again: the same plan, not a new one, and the survivor still to apply it
/// is told so by the other, not fenced.
#[test]
fn a_recovery_cut_short_is_finished_by_running_it_again() {
    let (c, _, survivors, eps) = five_lose_three();
    let deadline = Instant::now() + SETTLE;
    let plan = loop {
        let dry = ctl(&eps, &["recover", "-w", "json"]);
        if dry.code == 0 {
            break dry.json()["plan"].clone();
        }
        assert!(Instant::now() < deadline, "no plan: {}", dry.stdout);
        std::thread::sleep(Duration::from_millis(300));
    };
    let chosen = format!("{:x}", plan["chosen"].as_u64().unwrap());
    let ids: Vec<String> = survivors.iter().map(|i| status(&c, *i)["id"].as_str().unwrap().to_string()).collect();
    let other = survivors[ids.iter().position(|id| *id != chosen).unwrap()];
    let chosen_slot = survivors[ids.iter().position(|id| *id == chosen).unwrap()];

    let applied = http(&c.nodes[other], "POST", "/v1/member/recover", Some(&plan.to_string())).expect("apply one");
    assert_eq!(applied.status, 200, "{}", applied.body);
    std::thread::sleep(Duration::from_secs(3));
    let st = status(&c, chosen_slot);
    assert!(st["fenced"].is_null(), "a survivor yet to apply the plan is not fenced: {st}");

    let finish = ctl(&eps, &["recover", "--apply", "-w", "json"]);
    assert_eq!(finish.code, 0, "{}{}", finish.stdout, finish.stderr);
    assert_eq!(finish.json()["plan"]["plan_id"], plan["plan_id"], "the same plan, finished");
    put_within(&eps, Duration::from_secs(10)).expect("writes resume");
    for i in &survivors {
        assert_keys_kept(&c.nodes[*i].endpoint());
        assert_eq!(status(&c, *i)["incarnation"], 2);
    }
}
