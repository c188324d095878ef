//! A real partition (issue 4; needs root): three members, each in its own network namespace,
//! joined by a bridge inside a namespace of the test's own; the leader is cut off from the
//! others by nftables drop rules (a silent partition) for three TTLs. Instances that heartbeat
//! only through the old leader go quiet as far as the majority can tell. The old leader evicts
//! nothing (it cannot commit, and its term is stale when the partition heals); the new leader
//! marks them suspect under the brake instead of evicting them; after healing they come back.
//! Every namespace, link and rule is removed afterwards, also when the test fails.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quorate_drill::net::Net;
use quorate_tests::{http_at, quorate_bin, HttpReply};

const INSTANCES: usize = 30;
const TTL_S: u64 = 4;

struct Members(Vec<Child>);

impl Drop for Members {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Requests to members give up after 3 s: a cut-off member must not hold a client up.
async fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<HttpReply> {
    http_at(addr, method, path, body, Duration::from_secs(3)).await
}

const SVC: &str = "/api/v1/ns/default/services/pay/instances";

fn body(i: usize) -> String {
    format!(r#"{{"address":"10.1.0.{i}","port":80,"zone":"p","ttl_s":{TTL_S},"heartbeat_interval_s":1}}"#)
}

async fn listed(addr: &str) -> Option<(BTreeSet<String>, usize, bool)> {
    let r = http(addr, "GET", SVC, None).await.ok()?;
    if r.status != 200 {
        return None;
    }
    let v = r.json();
    let items = v["instances"].as_array()?;
    let ids = items.iter().map(|i| i["id"].as_str().unwrap().to_string()).collect();
    let suspects = items.iter().filter(|i| i["suspect"].as_bool() == Some(true)).count();
    Some((ids, suspects, v["degraded"].as_bool().unwrap_or(false)))
}

/// The member whose `/metrics` says it leads.
async fn leader_of(addrs: &[String]) -> Option<usize> {
    for (i, a) in addrs.iter().enumerate() {
        if let Ok(r) = http(a, "GET", "/metrics", None).await {
            if r.body.lines().any(|line| line == "quorate_raft_is_leader 1") {
                return Some(i);
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_evicts_nothing_and_the_brake_holds_on_the_new_one() {
    let net = Net::create(3).expect("network namespaces (this test needs root: CI runs it as root)");
    let dir = tempfile::tempdir().unwrap();
    let ic: Vec<String> = (0..3).map(|s| format!("m{}=http://{}:2380", s + 1, net.ip(s))).collect();
    let mut children = Vec::new();
    for i in 1..=3 {
        let ip = net.ip(i - 1);
        let log = std::fs::File::create(dir.path().join(format!("m{i}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &net.ns_member(i - 1)])
            .arg(quorate_bin())
            .args(["server", "--name", &format!("m{i}"), "--initial-cluster", &ic.join(",")])
            .args(["--data-dir", dir.path().join(format!("m{i}")).to_str().unwrap()])
            .args(["--listen-client-urls", &format!("http://{ip}:2379")])
            .args(["--listen-peer-urls", &format!("http://{ip}:2380")])
            .args(["--listen-http", &format!("{ip}:8500")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        children.push(child);
    }
    let _members = Members(children);
    let addrs: Vec<String> = (0..3).map(|s| format!("{}:8500", net.ip(s))).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    for a in &addrs {
        while !matches!(http(a, "GET", "/health", None).await, Ok(r) if r.status == 200) {
            assert!(Instant::now() < deadline, "member {a} never became healthy");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let leader = leader_of(&addrs).await.expect("a leader");
    let leader_addr = addrs[leader].clone();
    let majority: Vec<String> =
        addrs.iter().enumerate().filter(|(i, _)| *i != leader).map(|(_, a)| a.clone()).collect();
    eprintln!("m{} leads; {INSTANCES} instances register and heartbeat only through it", leader + 1);
    for i in 0..INSTANCES {
        let r = http(&leader_addr, "PUT", &format!("{SVC}/p{i}"), Some(&body(i))).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut beats = Vec::new();
    for i in 0..INSTANCES {
        let (stop, addr) = (stop.clone(), leader_addr.clone());
        beats.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = http(&addr, "PUT", &format!("{SVC}/p{i}/heartbeat"), None).await {
                    if r.status == 404 {
                        let _ = http(&addr, "PUT", &format!("{SVC}/p{i}"), Some(&body(i))).await;
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2 * TTL_S)).await;

    eprintln!("cut m{} off from the others for {} s", leader + 1, 3 * TTL_S);
    let links: Vec<(usize, usize)> = (0..3).filter(|o| *o != leader).flat_map(|o| [(leader, o), (o, leader)]).collect();
    net.cut(&links).unwrap();
    let cut_at = Instant::now();
    let mut most_suspects = 0;
    while cut_at.elapsed() < Duration::from_secs(3 * TTL_S) {
        if let Some((ids, suspects, degraded)) = listed(&majority[0]).await {
            assert_eq!(ids.len(), INSTANCES, "an instance was evicted during the partition");
            assert!(suspects == 0 || degraded, "suspects are reported as degraded");
            most_suspects = most_suspects.max(suspects);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("during the partition: none evicted, up to {most_suspects} held as suspect by the new leader");
    assert_eq!(most_suspects, INSTANCES, "the new leader saw them all go quiet and the brake held them");

    eprintln!("heal; the instances come back through their member");
    net.heal().unwrap();
    let healed = Instant::now();
    loop {
        if let Some((ids, suspects, degraded)) = listed(&majority[0]).await {
            assert_eq!(ids.len(), INSTANCES, "an instance was evicted after healing");
            if suspects == 0 && !degraded {
                break;
            }
        }
        assert!(healed.elapsed() < Duration::from_secs(20), "the suspects never recovered");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("all {INSTANCES} healthy again {:?} after healing", healed.elapsed());
    stop.store(true, Ordering::Relaxed);
    for b in beats {
        b.abort();
    }
    for (i, a) in addrs.iter().enumerate() {
        let m = http(a, "GET", "/metrics", None).await.unwrap().body;
        let evicted = m.lines().find(|l| l.starts_with("quorate_registry_evictions_total ")).unwrap_or("");
        assert!(evicted.ends_with(" 0"), "m{} evicted instances: {evicted}", i + 1);
    }
    let old_log = std::fs::read_to_string(dir.path().join(format!("m{}.log", leader + 1))).unwrap();
    assert!(!old_log.contains("evicted instance"), "the old leader evicted nothing");
}
