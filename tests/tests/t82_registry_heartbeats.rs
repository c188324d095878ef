//! Heartbeats at scale (issue 4): 1,000 ephemeral instances, each heartbeating on its own
//! schedule through some member; the leader is killed; after the new leader takes over none
//! of them was evicted. Then 10 stop heartbeating: those 10, and only those, are evicted within
//! TTL + slack (see the comment at the bound).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quorate_tests::{http, http_async, Cluster, Flavor, Node};

const INSTANCES: usize = 1000;
const TTL_S: u64 = 6;
const HEARTBEAT_S: u64 = 2;
const SVC: &str = "/api/v1/ns/default/services/fleet/instances";

fn listed(node: &Node) -> Option<BTreeSet<String>> {
    let r = http(node, "GET", SVC, None).ok()?;
    if r.status != 200 {
        return None;
    }
    let v = r.json();
    Some(v["instances"].as_array()?.iter().map(|i| i["id"].as_str().unwrap().to_string()).collect())
}

/// One instance's heartbeat loop: every interval, through the members in turn (skipping dead
/// ones), until stopped or silenced. Returns how many heartbeats failed everywhere.
struct Fleet {
    ports: Mutex<Vec<u16>>,
    silenced: Mutex<BTreeSet<usize>>,
    last_ok: Mutex<std::collections::HashMap<usize, Instant>>,
    stop: AtomicBool,
    failed: AtomicUsize,
}

async fn heartbeat(i: usize, fleet: Arc<Fleet>) {
    // Spread the fleet over the interval, as real instances are.
    tokio::time::sleep(Duration::from_secs(HEARTBEAT_S) * (i as u32) / INSTANCES as u32).await;
    let mut tick = tokio::time::interval(Duration::from_secs(HEARTBEAT_S));
    let mut k = i;
    while !fleet.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        if fleet.silenced.lock().unwrap().contains(&i) {
            return;
        }
        let ports = fleet.ports.lock().unwrap().clone();
        let mut ok = false;
        let mut last = String::new();
        for j in 0..ports.len() {
            match http_async(ports[(k + j) % ports.len()], "PUT", &format!("{SVC}/i{i}/heartbeat"), None).await {
                Ok(r) if r.status == 200 => {
                    ok = true;
                    fleet.last_ok.lock().unwrap().insert(i, Instant::now());
                    break;
                }
                Ok(r) => last = format!("{} {}", r.status, r.body),
                Err(e) => last = e.to_string(),
            }
        }
        k += 1;
        if !ok {
            fleet.failed.fetch_add(1, Ordering::Relaxed);
            eprintln!("heartbeat of i{i} failed everywhere: {last}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_heartbeating_instances_survive_a_leader_kill() {
    let mut c = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let fleet = Arc::new(Fleet {
        ports: Mutex::new(c.nodes.iter().map(|n| n.http_port).collect()),
        silenced: Mutex::default(),
        last_ok: Mutex::default(),
        stop: AtomicBool::new(false),
        failed: AtomicUsize::new(0),
    });

    eprintln!("register {INSTANCES} instances in 4 zones (TTL {TTL_S} s, heartbeat every {HEARTBEAT_S} s)");
    let mut regs = Vec::new();
    for i in 0..INSTANCES {
        let port = c.nodes[i % 3].http_port;
        regs.push(tokio::spawn(async move {
            let body = format!(
                r#"{{"address":"10.1.{}.{}","port":8080,"zone":"z{}","ttl_s":{TTL_S},"heartbeat_interval_s":{HEARTBEAT_S}}}"#,
                i / 250,
                i % 250,
                i % 4
            );
            let r = http_async(port, "PUT", &format!("{SVC}/i{i}"), Some(&body)).await.unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
        }));
        if regs.len() >= 50 {
            for r in regs.drain(..) {
                r.await.unwrap();
            }
        }
    }
    for r in regs {
        r.await.unwrap();
    }
    assert_eq!(listed(&c.nodes[0]).unwrap().len(), INSTANCES);

    eprintln!("every instance heartbeats on its own schedule");
    let beats: Vec<_> = (0..INSTANCES).map(|i| tokio::spawn(heartbeat(i, fleet.clone()))).collect();
    tokio::time::sleep(Duration::from_secs(4)).await;

    let leader = c.wait_leader(Duration::from_secs(5)).unwrap();
    eprintln!("kill -9 the leader ({})", c.nodes[leader].name);
    fleet.ports.lock().unwrap().retain(|p| *p != c.nodes[leader].http_port);
    c.kill(leader);
    let survivor = (leader + 1) % 3;
    let new_leader = c.wait_leader(Duration::from_secs(10)).unwrap();
    eprintln!("{} leads; wait two TTLs", c.nodes[new_leader].name);
    tokio::time::sleep(Duration::from_secs(2 * TTL_S)).await;
    let all = listed(&c.nodes[survivor]).expect("list");
    let evicted = INSTANCES - all.len();
    eprintln!(
        "{evicted} instances evicted across the leader change; {} heartbeats failed",
        fleet.failed.load(Ordering::Relaxed)
    );
    assert_eq!(evicted, 0, "heartbeating instances were evicted");

    eprintln!("silence 10 instances");
    let quiet: BTreeSet<usize> = (0..10).map(|k| k * 97 % INSTANCES).collect();
    fleet.silenced.lock().unwrap().extend(quiet.iter().copied());
    let quiet_ids: BTreeSet<String> = quiet.iter().map(|i| format!("i{i}")).collect();
    let started = Instant::now();
    let mut gone: std::collections::HashMap<usize, Instant> = Default::default();
    while gone.len() < quiet.len() {
        let now = listed(&c.nodes[survivor]).expect("list");
        for i in &quiet {
            if !now.contains(&format!("i{i}")) {
                gone.entry(*i).or_insert_with(Instant::now);
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "silenced instances were not evicted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // From each one's last renewed heartbeat to when it was seen gone (polled every 100 ms).
    let last_ok = fleet.last_ok.lock().unwrap().clone();
    let worst = quiet.iter().map(|i| gone[i] - last_ok[i]).max().unwrap();
    eprintln!("the 10 silenced instances were gone at most {worst:?} after their last heartbeat");
    // A generous "eventually": TTL + the lease slack (1 s) + one election timeout + a second
    // and a half for this loaded machine (every heartbeat is a logged renewal). The exact bound
    // is the lease core's unit test (`an_abandoned_lease_expires_after_its_ttl_plus_the_slack`).
    let limit = Duration::from_secs(TTL_S + 3);
    assert!(worst <= limit, "evicted only after {worst:?} (limit {limit:?})");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let now = listed(&c.nodes[survivor]).expect("list");
    assert_eq!(now.len(), INSTANCES - 10, "only the silenced instances are gone");
    assert!(quiet_ids.iter().all(|id| !now.contains(id)));
    assert_eq!(fleet.failed.load(Ordering::Relaxed), 0, "every heartbeat found a member that renewed it");

    fleet.stop.store(true, Ordering::Relaxed);
    for b in beats {
        b.abort();
    }
}
