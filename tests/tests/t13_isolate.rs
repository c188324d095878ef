//! `quorate ctl isolate` and `unisolate` (issue 13 §1, ADR 0009) on real 3-member clusters,
//! through the real binary and the real `etcdctl`: an isolated member serves no client request
//! (etcd's UNAVAILABLE, HTTP 503 with a JSON body, each naming the isolation), is demoted to a
//! learner that keeps replicating, and is promoted back once unisolated; an isolation that would
//! leave the voters without a healthy quorum, or take the last voter, is refused with the
//! reason; the record survives a leader killed between its commit and the demotion, a restart,
//! and a snapshot that replaced the log entry.

use std::time::{Duration, Instant};

use quorate_tests::{ctl, doctor_until, etcdctl, findings, http, Cluster, Flavor};

const SETTLE: Duration = Duration::from_secs(20);

/// Whether `name` is a learner in the member list as the members at `endpoints` give it.
fn is_learner(endpoints: &str, name: &str) -> Option<bool> {
    let out = etcdctl(endpoints, &["member", "list", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
    v["members"].as_array()?.iter().find(|m| m["name"] == name).map(|m| m["isLearner"].as_bool().unwrap_or(false))
}

fn wait_learner(endpoints: &str, name: &str, learner: bool) {
    let deadline = Instant::now() + SETTLE;
    while is_learner(endpoints, name) != Some(learner) {
        assert!(Instant::now() < deadline, "{name} learner={learner} not seen within {SETTLE:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn others(c: &Cluster, but: &[usize]) -> String {
    (0..c.nodes.len()).filter(|i| !but.contains(i)).map(|i| c.nodes[i].endpoint()).collect::<Vec<_>>().join(",")
}

/// The member at `i` refuses gRPC and HTTP client requests, naming the isolation and `reason`.
fn assert_refuses(c: &Cluster, i: usize, reason: &str) {
    let put = etcdctl(&c.nodes[i].endpoint(), &["put", "refused", "1"]);
    assert!(!put.ok, "an isolated member took a put: {}", put.stdout);
    assert!(put.stderr.contains("this member is isolated since") && put.stderr.contains(reason), "{}", put.stderr);
    let get = etcdctl(&c.nodes[i].endpoint(), &["get", "k", "--consistency=s"]);
    assert!(!get.ok && get.stderr.contains("isolated"), "an isolated member served a read: {}", get.stdout);
    let reply = http(&c.nodes[i], "GET", "/v1/catalog/services", None).expect("http");
    assert_eq!(reply.status, 503, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["error"]["code"], "isolated", "{body}");
    assert_eq!(body["error"]["reason"], reason, "{body}");
    assert!(body["error"]["by"].as_str().is_some_and(|b| !b.is_empty()), "{body}");
    // Not healthy for a load balancer, on the HTTP port and on the client port.
    assert_eq!(http(&c.nodes[i], "GET", "/health", None).expect("health").status, 503);
    // Status still answers, and says why.
    let st = etcdctl(&c.nodes[i].endpoint(), &["endpoint", "status", "-w", "json"]);
    assert!(st.ok && st.stdout.contains(reason), "status names the isolation: {} {}", st.stdout, st.stderr);
}

#[test]
fn isolating_a_follower_then_the_leader_keeps_writes_going_and_unisolating_brings_them_back() {
    let mut c = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let leader = c.wait_leader(SETTLE).expect("leader");
    let follower = (leader + 1) % 3;
    let third = (leader + 2) % 3;
    let all = c.endpoints();
    let (f_name, l_name, t_name) =
        (c.nodes[follower].name.clone(), c.nodes[leader].name.clone(), c.nodes[third].name.clone());

    // A follower. A watch opened on it before is ended with the isolation, not left running.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_client, mut watch) = rt.block_on(async {
        let mut client = etcd_client::Client::connect([c.nodes[follower].endpoint()], None).await.expect("connect");
        let stream = client.watch("k", None).await.expect("watch");
        (client, stream)
    });
    let run = ctl(&all, &["isolate", &f_name, "--reason", "disk errors on sdb"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("isolated since 20"), "the time it was recorded: {}", run.stdout);
    assert_refuses(&c, follower, "disk errors on sdb");
    let ended = rt.block_on(async {
        tokio::time::timeout(SETTLE, async {
            loop {
                match watch.message().await {
                    Ok(Some(r)) if r.created() && r.events().is_empty() => continue,
                    other => return other,
                }
            }
        })
        .await
    });
    match ended {
        Ok(Err(e)) => assert!(e.to_string().contains("isolated"), "the watch ends naming the isolation: {e}"),
        other => panic!("the watch opened before the isolation was not ended: {other:?}"),
    }
    wait_learner(&others(&c, &[follower]), &f_name, true);
    let put = etcdctl(&others(&c, &[follower]), &["put", "while-isolated", "1"]);
    assert!(put.ok, "writes go on: {}", put.stderr);

    let status = ctl(&all, &["status"]);
    let row = status.stdout.lines().find(|l| l.starts_with(&f_name)).expect("row");
    assert!(row.trim_end().ends_with("yes"), "ISOLATED column: {}", status.stdout);
    let (_, report) = doctor_until(&all, "isolated finding", |_, r| !findings(r, "isolated").is_empty());
    let f = findings(&report, "isolated")[0];
    assert_eq!(f["members"][0], f_name.as_str(), "{report:#}");
    assert!(f["evidence"].as_str().unwrap().contains("disk errors on sdb"), "{report:#}");

    // The leader: it hands leadership over, and its successor demotes it.
    let run = ctl(&all, &["isolate", &l_name, "--reason", "suspect clock"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    wait_learner(&c.nodes[third].endpoint(), &l_name, true);
    assert_eq!(c.wait_leader(SETTLE).expect("leader"), third, "the only voter left leads");
    assert_refuses(&c, leader, "suspect clock");
    let put = etcdctl(&c.nodes[third].endpoint(), &["put", "k", "after-leader-isolated"]);
    assert!(put.ok, "writes go on through the remaining voter: {}", put.stderr);

    // The last voter.
    let run = ctl(&all, &["isolate", &t_name, "--reason", "anything"]);
    assert_eq!(run.code, 1, "isolating the last voter must be refused: {}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("last voter"), "{}", run.stderr);

    // Back: both serve again, are voters again, and have what was written meanwhile.
    for name in [&f_name, &l_name] {
        let run = ctl(&all, &["unisolate", name]);
        assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    }
    for name in [&f_name, &l_name] {
        wait_learner(&c.nodes[third].endpoint(), name, false);
    }
    for i in [follower, leader] {
        let deadline = Instant::now() + SETTLE;
        loop {
            let get = etcdctl(&c.nodes[i].endpoint(), &["get", "k", "--print-value-only"]);
            if get.ok {
                assert_eq!(get.stdout.trim(), "after-leader-isolated");
                break;
            }
            assert!(Instant::now() < deadline, "serves again once it applied the unisolation: {}", get.stderr);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    doctor_until(&all, "no isolated finding", |_, r| findings(r, "isolated").is_empty());

    // With a voter down, isolating another would leave two voters of which one answers. The
    // leader counts a member healthy while its last answer is under an election timeout old:
    // wait out a few.
    c.kill(follower);
    std::thread::sleep(Duration::from_secs(3));
    let run = ctl(&others(&c, &[follower]), &["isolate", &l_name, "--reason", "would break quorum"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("a quorum needs 2"), "the refusal says why: {}", run.stderr);
    let get = etcdctl(&c.nodes[leader].endpoint(), &["get", "k", "--print-value-only"]);
    assert!(get.ok, "the refused member still serves: {}", get.stderr);

    let timeline = ctl(&others(&c, &[follower]), &["timeline"]);
    assert!(timeline.stdout.contains("isolated by") && timeline.stdout.contains("unisolated"), "{}", timeline.stdout);
}

#[test]
fn an_isolation_outlives_the_leader_that_recorded_it_a_restart_and_a_snapshot() {
    let mut c =
        Cluster::start_with(Flavor::Quorate, 3, &["--drill-failpoints", "--snapshot-count", "100"]).expect("cluster");
    let leader = c.wait_leader(SETTLE).expect("leader");
    let target = (leader + 1) % 3;
    let all = c.endpoints();
    let name = c.nodes[target].name.clone();

    // The leader records the isolation and is killed before it demotes the member.
    let held = http(&c.nodes[leader], "PUT", "/debug/failpoints/hold-isolation", Some("true")).expect("failpoint");
    assert_eq!(held.status, 200, "{}", held.body);
    let run = ctl(&all, &["isolate", &name, "--reason", "kernel panics"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(is_learner(&c.nodes[leader].endpoint(), &name), Some(false), "held: not demoted yet");
    c.kill(leader);

    // Two voters are left, and demoting one of them would cost the quorum: the next leader
    // waits, and the doctor says so. The member refuses clients all along.
    assert_refuses(&c, target, "kernel panics");
    let (_, report) = doctor_until(&others(&c, &[leader]), "demotion pending", |_, r| {
        findings(r, "isolated").iter().any(|f| f["evidence"].as_str().unwrap_or("").contains("still a voter"))
    });
    assert_eq!(findings(&report, "isolated")[0]["members"][0], name.as_str(), "{report:#}");
    assert_eq!(is_learner(&others(&c, &[leader]), &name), Some(false), "not demoted while it would cost the quorum");

    // The old leader comes back (without the failpoint): the leader now demotes the member.
    c.spawn(leader).expect("restart the old leader");
    wait_learner(&others(&c, &[target]), &name, true);
    assert_refuses(&c, target, "kernel panics");

    // Enough writes that every member's snapshot holds the isolation and the log entry is gone.
    let survivor = (leader + 2) % 3;
    for i in 0..300 {
        let put = etcdctl(&c.nodes[survivor].endpoint(), &["put", &format!("fill{}", i % 7), "x"]);
        assert!(put.ok, "{}", put.stderr);
    }
    c.stop(target);
    c.spawn(target).expect("restart the isolated member");
    c.wait_leader(SETTLE).expect("leader");
    let deadline = Instant::now() + SETTLE;
    loop {
        let st = etcdctl(&c.nodes[target].endpoint(), &["endpoint", "status"]);
        if st.ok {
            break;
        }
        assert!(Instant::now() < deadline, "the restarted member answers Status: {}", st.stderr);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_refuses(&c, target, "kernel panics");
    let restarted_old_leader = http(&c.nodes[leader], "GET", "/v1/member/status", None).expect("status");
    let listed = restarted_old_leader.json()["isolated_members"].clone();
    assert!(listed.to_string().contains("kernel panics"), "the restarted old leader knows: {listed}");
    // It restarted from a snapshot taken after the isolation (past the log entry's index).
    let tl = ctl(&all, &["timeline", "--member", &name]);
    assert!(tl.stdout.contains("snapshot built at log index"), "{}", tl.stdout);

    let run = ctl(&all, &["unisolate", &name]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    wait_learner(&all, &name, false);
    // It serves again once it has applied the unisolation itself.
    let deadline = Instant::now() + SETTLE;
    while !etcdctl(&c.nodes[target].endpoint(), &["put", "back", "1"]).ok {
        assert!(Instant::now() < deadline, "the unisolated member serves again");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Three isolations asked at once, one per member, through three members: each alone passes the
/// quorum check, together they would take every voter. The leader takes them one at a time,
/// each checked against those committed before it: the last voter is never isolated.
#[test]
fn isolations_asked_at_once_never_take_the_last_voter() {
    let c = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    c.wait_leader(SETTLE).expect("leader");
    let runs: Vec<_> = (0..3)
        .map(|i| {
            let (endpoint, name) = (c.nodes[i].endpoint(), c.nodes[i].name.clone());
            std::thread::spawn(move || ctl(&endpoint, &["isolate", &name, "--reason", "all at once"]))
        })
        .map(|t| t.join().unwrap())
        .collect();
    let done = runs.iter().filter(|r| r.code == 0).count();
    assert!(done <= 2, "every voter isolated: {:?}", runs.iter().map(|r| &r.stdout).collect::<Vec<_>>());
    let refused: Vec<&str> = runs.iter().filter(|r| r.code != 0).map(|r| r.stderr.as_str()).collect();
    assert!(refused.iter().all(|e| e.contains("last voter") || e.contains("quorum")), "{refused:?}");
    let status = http(&c.nodes[0], "GET", "/v1/member/status", None).expect("status");
    let isolated = status.json()["isolated_members"].as_array().map_or(0, |a| a.len());
    assert!(isolated < 3, "{}", status.body);
}
