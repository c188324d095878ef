//! Active checks go through the eviction brake (issue 11, section 3). Every instance of zone
//! `a` fails its TCP check at once: that is a brake event, not an outage. The instances stay
//! passing and served (`?healthy=true` still lists them), flagged, and discovery says the
//! service is degraded and why; a single failing instance in zone `b` is marked critical as
//! usual. The leader is killed while the brake holds: the new leader continues the hold from
//! the replicated state, so the maximum hold still fires on time (not restarted), and then the
//! held instances become critical.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use quorate_tests::{http, Cluster, Flavor};
use tokio::net::TcpListener;

const SVC: &str = "/api/v1/ns/default/services/inv/instances";
const ZONE_A: usize = 8;
const MAX_HOLD_S: u64 = 30;

/// A TCP endpoint that accepts (and drops) connections until its task is aborted.
async fn endpoint() -> (u16, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            if l.accept().await.is_err() {
                return;
            }
        }
    });
    (port, task)
}

fn body(zone: &str, port: u16) -> String {
    format!(
        r#"{{"address":"127.0.0.1","port":{port},"zone":"{zone}","kind":"persistent",
            "check":{{"tcp":"127.0.0.1:{port}","interval_s":1,"timeout_s":1,"failures_before_critical":2}}}}"#
    )
}

struct View {
    /// id -> (health, flagged by the brake)
    instances: BTreeMap<String, (String, bool)>,
    degraded_reason: Option<String>,
}

/// Discovery through member `node` (retried while an election is under way).
fn view(c: &Cluster, node: usize, query: &str) -> View {
    let give_up = Instant::now() + Duration::from_secs(15);
    let r = loop {
        let r = http(&c.nodes[node], "GET", &format!("{SVC}{query}"), None).unwrap();
        if r.status == 200 || Instant::now() > give_up {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let instances = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let id = i["id"].as_str().unwrap().to_string();
            (id, (i["health"].as_str().unwrap().to_string(), i["brake_hold"].is_string()))
        })
        .collect();
    View { instances, degraded_reason: v["degraded_reason"].as_str().map(String::from) }
}

fn zone_a(v: &View) -> Vec<(String, bool)> {
    v.instances.iter().filter(|(id, _)| id.starts_with('a')).map(|(_, (h, held))| (h.clone(), *held)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_failing_its_checks_at_once_is_held_across_a_leader_change() {
    let mut c =
        Cluster::start_with(Flavor::Quorate, 3, &["--brake-max-hold-s", &MAX_HOLD_S.to_string()]).expect("cluster");

    eprintln!("register {ZONE_A} instances in zone a and 4 in zone b, each with a TCP check");
    let mut a_tasks = Vec::new();
    for i in 0..ZONE_A {
        let (port, task) = endpoint().await;
        a_tasks.push(task);
        let r = http(&c.nodes[0], "PUT", &format!("{SVC}/a{i}"), Some(&body("a", port))).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let mut b_tasks = Vec::new();
    for i in 0..4 {
        let (port, task) = endpoint().await;
        b_tasks.push(task);
        let r = http(&c.nodes[0], "PUT", &format!("{SVC}/b{i}"), Some(&body("b", port))).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = view(&c, 1, "");
    assert_eq!(v.instances.len(), ZONE_A + 4);
    assert!(v.instances.values().all(|(h, held)| h == "passing" && !held), "{:?}", v.instances);

    eprintln!("every endpoint of zone a goes away at once, and one of zone b");
    for t in a_tasks.drain(..) {
        t.abort();
    }
    b_tasks.remove(0).abort();
    let failed_at = Instant::now();

    eprintln!("zone a is held, not taken out; b0 alone is marked critical");
    let deadline = failed_at + Duration::from_secs(20);
    loop {
        let v = view(&c, 2, "");
        let a = zone_a(&v);
        let b0_critical = v.instances.get("b0").is_some_and(|(h, _)| h == "critical");
        if b0_critical && a.iter().all(|(_, held)| *held) {
            assert!(a.iter().all(|(h, _)| h == "passing"), "held instances keep their health: {a:?}");
            let reason = v.degraded_reason.unwrap_or_default();
            assert!(reason.contains("zone a"), "discovery says why: {reason:?}");
            break;
        }
        assert!(
            a.iter().all(|(h, _)| h == "passing"),
            "no instance of zone a may become critical while the brake engages: {:?}",
            v.instances
        );
        assert!(Instant::now() < deadline, "the brake never held zone a: {:?}", v.instances);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let held_at = Instant::now();
    eprintln!("held {:?} after the failure", held_at.duration_since(failed_at));
    let healthy = view(&c, 0, "?healthy=true");
    assert_eq!(zone_a(&healthy).len(), ZONE_A, "held instances are still served as healthy");
    let consul = http(&c.nodes[1], "GET", "/v1/health/service/inv", None).unwrap();
    assert!(consul.header("x-quorate-degraded").is_some_and(|r| r.contains("zone a")), "{:?}", consul.headers);

    eprintln!("kill the leader half-way through the maximum hold");
    tokio::time::sleep(Duration::from_secs(MAX_HOLD_S / 2)).await;
    let leader = c.wait_leader(Duration::from_secs(5)).unwrap();
    c.kill(leader);
    let other = (leader + 1) % 3;
    let v = view(&c, other, "");
    assert!(zone_a(&v).iter().all(|(h, held)| h == "passing" && *held), "still held: {:?}", v.instances);

    eprintln!("the new leader continues the hold: it ends at the maximum, counted from the first leader");
    // A restarted hold would last until the kill + MAX_HOLD_S; the continued one ends
    // MAX_HOLD_S after it engaged. Allow generous slack for the election and the probes.
    let deadline = held_at + Duration::from_secs(MAX_HOLD_S + 12);
    loop {
        let v = view(&c, other, "");
        let a = zone_a(&v);
        if a.iter().all(|(h, held)| h == "critical" && !held) {
            break;
        }
        assert!(Instant::now() < deadline, "the maximum hold did not fire after a leader change: {a:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("released {:?} after it engaged", held_at.elapsed());
    let since_failure = failed_at.elapsed();
    assert!(since_failure >= Duration::from_secs(MAX_HOLD_S), "released too early: {since_failure:?}");
    for t in b_tasks {
        t.abort();
    }
}
