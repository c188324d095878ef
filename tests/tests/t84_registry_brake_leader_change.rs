//! The eviction brake's window survives a leader change (issue 11, section 3). Four of a
//! zone's twenty instances go silent and are evicted (at most 25% of the zone as it shrinks).
//! The leader is killed. Past the new leader's takeover grace, two more go silent: with the
//! window carried over that is 5 or 6 evictions of the 16 left within the window, a storm, so
//! they are held as suspects. A new leader that started its window afresh would have evicted
//! them (2 are fewer than the brake's minimum of 3).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quorate_tests::{http, http_async, Cluster, Flavor};

const SVC: &str = "/api/v1/ns/default/services/pay/instances";
const INSTANCES: usize = 20;
const TTL_S: u64 = 6;

fn body() -> String {
    format!(r#"{{"address":"10.0.0.1","port":80,"zone":"z","ttl_s":{TTL_S},"heartbeat_interval_s":1}}"#)
}

/// id -> suspect, as member `node` lists them (retried while an election is under way).
fn listed(c: &Cluster, node: usize) -> Vec<(String, bool)> {
    let give_up = Instant::now() + Duration::from_secs(15);
    loop {
        let r = http(&c.nodes[node], "GET", SVC, None).unwrap();
        if r.status == 200 {
            let v = r.json();
            return v["instances"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| (i["id"].as_str().unwrap().to_string(), i["suspect"].as_bool().unwrap()))
                .collect();
        }
        assert!(Instant::now() < give_up, "discovery keeps failing: {} {}", r.status, r.body);
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_carries_over_to_the_next_leader() {
    let mut c = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let ports: Arc<Mutex<Vec<u16>>> = Arc::new(Mutex::new(c.nodes.iter().map(|n| n.http_port).collect()));
    let quiet: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));

    eprintln!("register {INSTANCES} instances in one zone, heartbeating every second (TTL {TTL_S} s)");
    for i in 0..INSTANCES {
        let r = http(&c.nodes[i % 3], "PUT", &format!("{SVC}/p{i}"), Some(&body())).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let mut beats = Vec::new();
    for i in 0..INSTANCES {
        let (ports, quiet, stop) = (ports.clone(), quiet.clone(), stop.clone());
        let id = format!("p{i}");
        beats.push(tokio::spawn(async move {
            let mut k = i;
            while !stop.load(Ordering::Relaxed) {
                if !quiet.lock().unwrap().contains(&id) {
                    // Any live member; after a 404 (lease gone) register again, as clients do.
                    let list = ports.lock().unwrap().clone();
                    let port = list[k % list.len()];
                    k += 1;
                    if let Ok(r) = http_async(port, "PUT", &format!("{SVC}/{id}/heartbeat"), None).await {
                        if r.status == 404 {
                            let _ = http_async(port, "PUT", &format!("{SVC}/{id}"), Some(&body())).await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(TTL_S)).await;

    eprintln!("four go silent (not above the 25% threshold): evicted");
    let first: Vec<String> = (0..4).map(|i| format!("p{i}")).collect();
    quiet.lock().unwrap().extend(first.iter().cloned());
    let deadline = Instant::now() + Duration::from_secs(4 * TTL_S);
    loop {
        let list = listed(&c, 1);
        if first.iter().all(|id| !list.iter().any(|(i, _)| i == id)) {
            break;
        }
        assert!(Instant::now() < deadline, "the first four were not evicted: {list:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let leader = c.wait_leader(Duration::from_secs(5)).unwrap();
    eprintln!("kill the leader ({})", c.nodes[leader].name);
    ports.lock().unwrap().retain(|p| *p != c.nodes[leader].http_port);
    c.kill(leader);
    let other = (leader + 1) % 3;
    let new_leader = c.wait_leader(Duration::from_secs(15)).unwrap();
    eprintln!("{} leads; wait past its takeover grace (one TTL)", c.nodes[new_leader].name);
    tokio::time::sleep(Duration::from_secs(TTL_S + 3)).await;
    let list = listed(&c, other);
    assert_eq!(list.len(), INSTANCES - 4, "nothing else was evicted across the change: {list:?}");

    eprintln!("two more go silent: 5 or 6 evictions of 16 within the window, held as suspects");
    let second: Vec<String> = (4..6).map(|i| format!("p{i}")).collect();
    quiet.lock().unwrap().extend(second.iter().cloned());
    let deadline = Instant::now() + Duration::from_secs(4 * TTL_S);
    loop {
        let list = listed(&c, other);
        let state: Vec<Option<bool>> =
            second.iter().map(|id| list.iter().find(|(i, _)| i == id).map(|(_, s)| *s)).collect();
        assert!(state.iter().all(Option::is_some), "evicted: the window was reset by the leader change: {list:?}");
        if state.iter().all(|s| *s == Some(true)) {
            break;
        }
        assert!(Instant::now() < deadline, "never held: {list:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let v = http(&c.nodes[other], "GET", SVC, None).unwrap().json();
    assert_eq!(v["degraded"], true, "{v}");
    let reason = v["degraded_reason"].as_str().unwrap_or_default().to_string();
    eprintln!("held: {reason}");
    assert!(
        reason.starts_with("5 of 16") || reason.starts_with("6 of 16"),
        "the reason counts the previous leader's evictions: {reason}"
    );

    stop.store(true, Ordering::Relaxed);
    for b in beats {
        let _ = b.await;
    }
}
