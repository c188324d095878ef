//! Re-registering an instance with a new TTL takes the new TTL (issue 11, section 3): the
//! heartbeat answers with it, and an instance that shortened its TTL and then went silent is
//! evicted on the short TTL, not the long one it registered with first. Through the native
//! API and through Consul's TTL checks.

use std::time::{Duration, Instant};

use quorate_tests::{http, Cluster, Flavor};

const SVC: &str = "/api/v1/ns/default/services/pay/instances";

fn heartbeat_ttl_s(c: &Cluster, node: usize, id: &str) -> i64 {
    let r = http(&c.nodes[node], "PUT", &format!("{SVC}/{id}/heartbeat"), None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["ttl_s"].as_i64().unwrap()
}

fn register(c: &Cluster, node: usize, id: &str, ttl_s: u64) {
    let body = format!(r#"{{"address":"10.0.0.1","port":80,"ttl_s":{ttl_s},"heartbeat_interval_s":1}}"#);
    let r = http(&c.nodes[node], "PUT", &format!("{SVC}/{id}"), Some(&body)).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["ttl_s"], ttl_s, "{}", r.body);
}

fn listed(c: &Cluster, id: &str) -> bool {
    let r = http(&c.nodes[0], "GET", SVC, None).unwrap();
    if r.status == 404 {
        return false; // the service's last instance is gone
    }
    r.json()["instances"].as_array().unwrap_or_else(|| panic!("{}", r.body)).iter().any(|i| i["id"] == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reregistering_with_a_new_ttl_takes_the_new_ttl() {
    let c = Cluster::start(Flavor::Quorate, 3).expect("cluster");

    eprintln!("register with a 60 s TTL; the heartbeat says 60");
    register(&c, 0, "pay-1", 60);
    assert_eq!(heartbeat_ttl_s(&c, 1, "pay-1"), 60);

    eprintln!("register again with 2 s: the heartbeat says 2, then 45: it says 45");
    register(&c, 1, "pay-1", 2);
    assert_eq!(heartbeat_ttl_s(&c, 2, "pay-1"), 2);
    register(&c, 2, "pay-1", 45);
    assert_eq!(heartbeat_ttl_s(&c, 0, "pay-1"), 45);
    eprintln!("the same TTL again keeps the lease (and the TTL)");
    register(&c, 0, "pay-1", 45);
    assert_eq!(heartbeat_ttl_s(&c, 0, "pay-1"), 45);

    eprintln!("down to 2 s and silent: evicted well before the 45 s it had");
    register(&c, 1, "pay-1", 2);
    let silent_at = Instant::now();
    let deadline = silent_at + Duration::from_secs(25);
    while listed(&c, "pay-1") {
        assert!(Instant::now() < deadline, "still listed {:?} after going silent on a 2 s TTL", silent_at.elapsed());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("evicted {:?} after going silent", silent_at.elapsed());

    eprintln!("Consul: a TTL check registered again with a new TTL takes it");
    let consul = |ttl: &str| {
        format!(r#"{{"Name":"pay","ID":"pay-c","Address":"10.0.0.2","Port":80,"Check":{{"TTL":"{ttl}"}}}}"#)
    };
    let r = http(&c.nodes[0], "PUT", "/v1/agent/service/register", Some(&consul("50s"))).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(heartbeat_ttl_s(&c, 0, "pay-c"), 50);
    let r = http(&c.nodes[1], "PUT", "/v1/agent/service/register", Some(&consul("7s"))).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(heartbeat_ttl_s(&c, 1, "pay-c"), 7);
}
