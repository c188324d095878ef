//! The registry workload (quorate only): instances in two zones register over the native HTTP
//! API and heartbeat through their member, falling back to the others as a real client does;
//! now and then one stops for good; a poller reads discovery (consistent) all along.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::check::registry::{Life, Listing};
use crate::workload::{Outcome, Recorder};

pub const INSTANCES: usize = 20;
pub const TTL_S: u64 = 4;
const SVC: &str = "/api/v1/ns/default/services/drill-svc/instances";
/// At most one instance stops per this long, alternating zones, so a zone loses at most 20%
/// of its instances in the brake's window: the brake should not hold them.
const STOP_EVERY: Duration = Duration::from_secs(20);

#[derive(Default)]
pub struct RegistryRecord {
    pub lives: Vec<Life>,
    pub listings: Vec<Listing>,
    /// Heartbeats answered "no such instance": its record was evicted.
    pub gone_on_heartbeat: Vec<(String, u64)>,
    /// Heartbeats answered "lease expired" while the record stayed (held as suspect by the
    /// brake): the instance registered again, as Eureka and Consul clients do.
    pub lapsed: Vec<(String, u64)>,
}

fn body(i: usize) -> String {
    let zone = if i.is_multiple_of(2) { "za" } else { "zb" };
    format!(r#"{{"address":"10.9.0.{i}","port":80,"zone":"{zone}","ttl_s":{TTL_S},"heartbeat_interval_s":1}}"#)
}

struct Instance {
    id: String,
    registered_ms: u64,
    last_ack_ms: u64,
    stopped_ms: Option<u64>,
}

/// Register every instance, keep them heartbeating until `stop`, stop some on the way.
pub async fn run(addrs: Vec<String>, rec: Arc<Recorder>, stop: Arc<AtomicBool>, seed: u64) -> RegistryRecord {
    let out = Arc::new(Mutex::new(RegistryRecord::default()));
    let instances: Arc<Mutex<Vec<Instance>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..INSTANCES {
        let (addrs, rec, stop, out, instances) =
            (addrs.clone(), rec.clone(), stop.clone(), out.clone(), instances.clone());
        tasks.push(tokio::spawn(async move {
            let id = format!("i{i}");
            let path = format!("{SVC}/{id}");
            let registered_ms = loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(t) = call_any(&addrs, i, "PUT", &path, &body(i), &rec, "register")
                    .await
                    .filter(|(s, _)| *s == 200)
                    .map(|_| rec.now_ms())
                {
                    break t;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            };
            let slot = {
                let mut all = instances.lock().unwrap();
                all.push(Instance { id: id.clone(), registered_ms, last_ack_ms: registered_ms, stopped_ms: None });
                all.len() - 1
            };
            let beat = format!("{path}/heartbeat");
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _busy = rec.wait_while_held().await;
                if instances.lock().unwrap()[slot].stopped_ms.is_some() {
                    return;
                }
                match call_any(&addrs, i, "PUT", &beat, "", &rec, "heartbeat").await {
                    Some((200, _)) => instances.lock().unwrap()[slot].last_ack_ms = rec.now_ms(),
                    Some((404, b)) => {
                        // Record what happened, then register again as a client would.
                        let at = (id.clone(), rec.now_ms());
                        if b.contains("lease_expired") {
                            out.lock().unwrap().lapsed.push(at);
                        } else {
                            out.lock().unwrap().gone_on_heartbeat.push(at);
                        }
                        let _ = call_any(&addrs, i, "PUT", &path, &body(i), &rec, "register").await;
                    }
                    _ => {}
                }
            }
        }));
    }
    // The stopper and the discovery poller.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_4e61_7374_7279);
    let mut next_stop = tokio::time::Instant::now() + STOP_EVERY;
    let mut zone = 0;
    let mut k = 0usize;
    while !stop.load(Ordering::Relaxed) {
        if tokio::time::Instant::now() >= next_stop {
            next_stop += STOP_EVERY;
            let mut all = instances.lock().unwrap();
            let candidates: Vec<usize> = (0..all.len())
                .filter(|s| all[*s].stopped_ms.is_none() && all[*s].id[1..].parse::<usize>().unwrap_or(0) % 2 == zone)
                .collect();
            // Keep most of the fleet heartbeating: stop at most a third.
            if !candidates.is_empty() && all.iter().filter(|i| i.stopped_ms.is_some()).count() < INSTANCES / 3 {
                let s = candidates[rng.random_range(0..candidates.len())];
                all[s].stopped_ms = Some(rec.now_ms());
            }
            zone = 1 - zone;
        }
        k += 1;
        let invoke_ms = rec.now_ms();
        let addr = &addrs[k % addrs.len()];
        let listing = match crate::http::call(addr, "GET", SVC, "", Duration::from_secs(2)).await {
            Ok((200, b)) => serde_json::from_str::<serde_json::Value>(&b).ok().map(|v| {
                let items = v["instances"].as_array().cloned().unwrap_or_default();
                let id = |i: &serde_json::Value| i["id"].as_str().unwrap_or_default().to_string();
                Listing {
                    invoke_ms,
                    from: addr.clone(),
                    revision: v["revision"].as_i64().unwrap_or(0),
                    listed: items.iter().map(id).collect::<BTreeSet<_>>(),
                    suspect: items.iter().filter(|i| i["suspect"].as_bool() == Some(true)).map(id).collect(),
                }
            }),
            _ => None,
        };
        let outcome = if listing.is_some() { Outcome::Ok } else { Outcome::Failed };
        rec.stat("discovery", u32::MAX, invoke_ms * 1_000_000, outcome);
        if let Some(l) = listing {
            out.lock().unwrap().listings.push(l);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let mut r = std::mem::take(&mut *out.lock().unwrap());
    r.lives = instances
        .lock()
        .unwrap()
        .iter()
        .map(|i| Life {
            id: i.id.clone(),
            registered_ms: i.registered_ms,
            stopped_ms: i.stopped_ms,
            last_ack_ms: i.last_ack_ms,
        })
        .collect();
    r
}

/// Call `path` on the instance's own member first, then the others (1 s each).
async fn call_any(
    addrs: &[String],
    i: usize,
    method: &str,
    path: &str,
    body: &str,
    rec: &Recorder,
    kind: &'static str,
) -> Option<(u16, String)> {
    let invoke = rec.now_ns();
    for k in 0..addrs.len() {
        let addr = &addrs[(i + k) % addrs.len()];
        match crate::http::call(addr, method, path, body, Duration::from_secs(1)).await {
            Ok((status, b)) if status < 500 => {
                rec.stat(kind, u32::MAX, invoke, if status < 300 { Outcome::Ok } else { Outcome::Failed });
                return Some((status, b));
            }
            _ => continue,
        }
    }
    rec.stat(kind, u32::MAX, invoke, Outcome::Failed);
    None
}
