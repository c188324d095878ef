//! `quorate ctl audit` (issue 13 §3) against real HTTP servers: the registry of a 3-member
//! cluster says one thing, the instances' own endpoints another. An alive instance agrees; one
//! whose port is closed and one whose /health answers 500 are ghosts (registered passing,
//! dead); one its active check marked critical that answers again is a zombie; one that
//! answers every other request is flapping. Every member's registry agrees.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quorate_tests::{http, quorate_bin, Cluster, Flavor};
use serde_json::Value;

const OK: u8 = 0;
const FAIL: u8 = 1;
const ALTERNATE: u8 = 2;
/// 500 to 127.0.0.1 (where ctl probes from), 200 to anyone else (the members, which probe
/// from 127.0.1.<n>): dead from the operator's host, alive from the cluster's side.
const FAILS_FOR_CTL_ONLY: u8 = 3;

/// An endpoint an instance "is": 200, 500, or each in turn, as `mode` says.
fn serve(mode: Arc<AtomicU8>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = AtomicUsize::new(0);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let n = served.fetch_add(1, Ordering::SeqCst);
            let from_ctl = conn.peer_addr().is_ok_and(|a| a.ip() == std::net::Ipv4Addr::LOCALHOST);
            let ok = match mode.load(Ordering::SeqCst) {
                OK => true,
                FAIL => false,
                FAILS_FOR_CTL_ONLY => !from_ctl,
                _ => n.is_multiple_of(2),
            };
            let code = if ok { "200 OK" } else { "500 Internal Server Error" };
            let _ = write!(conn, "HTTP/1.1 {code}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    port
}

fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn register(c: &Cluster, svc: &str, id: &str, body: &str) {
    let r = http(&c.nodes[0], "PUT", &format!("/api/v1/ns/default/services/{svc}/instances/{id}"), Some(body)).unwrap();
    assert_eq!(r.status, 200, "register {id}: {}", r.body);
}

fn audit(c: &Cluster, extra: &[&str]) -> (i32, Value) {
    let out = Command::new(quorate_bin())
        .args(["ctl", "--endpoints", &c.endpoints(), "-w", "json", "audit", "--health-path", "/health"])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), report)
}

fn verdict_of(report: &Value, id: &str) -> String {
    let i = report["instances"].as_array().unwrap().iter().find(|i| i["id"] == id);
    i.unwrap_or_else(|| panic!("{id} not audited: {report:#}"))["verdict"].as_str().unwrap().to_string()
}

#[test]
fn audit_finds_ghosts_zombies_and_flapping_instances_against_real_endpoints() {
    let c = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let alive = serve(Arc::new(AtomicU8::new(OK)));
    let failing = serve(Arc::new(AtomicU8::new(FAIL)));
    let flapping = serve(Arc::new(AtomicU8::new(ALTERNATE)));
    let zombie_mode = Arc::new(AtomicU8::new(FAIL));
    let zombie = serve(zombie_mode.clone());
    let gone = closed_port();
    let ephemeral =
        |port: u16| format!(r#"{{"address":"127.0.0.1","port":{port},"ttl_s":120,"heartbeat_interval_s":30}}"#);

    register(&c, "api", "alive-1", &ephemeral(alive));
    register(&c, "web", "closed-1", &ephemeral(gone));
    register(&c, "web", "fails-1", &ephemeral(failing));
    register(&c, "web", "flaps-1", &ephemeral(flapping));
    // Its check marks it critical at the first failure and would take 100 good probes to mark
    // it passing again: once its endpoint recovers, the registry is wrong for a while.
    register(
        &c,
        "web",
        "zombie-1",
        &format!(
            r#"{{"address":"127.0.0.1","port":{zombie},"kind":"persistent","check":{{"http":"http://127.0.0.1:{zombie}/health","interval_s":1,"timeout_s":1,"failures_before_critical":1,"successes_before_passing":100}}}}"#
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = http(&c.nodes[0], "GET", "/api/v1/ns/default/services/web/instances/zombie-1", None).unwrap();
        if r.json()["health"] == "critical" {
            break;
        }
        assert!(Instant::now() < deadline, "the check never marked it critical: {}", r.body);
        std::thread::sleep(Duration::from_millis(200));
    }
    zombie_mode.store(OK, Ordering::SeqCst);

    let (code, report) = audit(&c, &[]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(verdict_of(&report, "alive-1"), "agrees");
    assert_eq!(verdict_of(&report, "closed-1"), "ghost");
    assert_eq!(verdict_of(&report, "fails-1"), "ghost");
    assert_eq!(verdict_of(&report, "flaps-1"), "flapping");
    assert_eq!(verdict_of(&report, "zombie-1"), "zombie");
    assert_eq!(
        (report["ghosts"].as_u64(), report["zombies"].as_u64(), report["flapping"].as_u64()),
        (Some(2), Some(1), Some(1))
    );
    let members = report["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{report:#}");
    assert!(members.iter().all(|m| m["agrees"] == true), "{report:#}");

    // One service that agrees: exit 0. The table names the verdict.
    let (code, report) = audit(&c, &["--service", "api"]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["instances"].as_array().unwrap().len(), 1, "{report:#}");
    let table = Command::new(quorate_bin())
        .args(["ctl", "--endpoints", &c.endpoints(), "audit", "--service", "web", "--health-path", "/health"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    eprintln!("{table}");
    assert!(table.contains("2 ghosts, 1 zombies, 1 flapping"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("zombie") && l.contains("zombie-1")), "{table}");
    // The 500 is read as such, even when the status line arrives in pieces (the server writes it
    // in several writes).
    assert!(table.lines().any(|l| l.contains("fails-1") && l.ends_with("HTTP 500")), "{table}");
}

fn audit_repair(c: &Cluster, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["--repair"];
    args.extend_from_slice(extra);
    audit(c, &args)
}

fn instance_ids(c: &Cluster, svc: &str) -> Vec<String> {
    let r = http(&c.nodes[0], "GET", &format!("/api/v1/ns/default/services/{svc}/instances"), None).unwrap();
    let v = r.json();
    let list = v.as_array().cloned().or_else(|| v["instances"].as_array().cloned()).unwrap_or_default();
    let mut ids: Vec<String> = list.iter().map(|i| i["id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

#[test]
fn audit_repair_deregisters_ghosts_and_remarks_zombies_through_the_brake() {
    let c = Cluster::start_with(Flavor::Quorate, 3, &["--probe-source-ip", "127.0.1.{n}"]).expect("cluster");
    let alive = serve(Arc::new(AtomicU8::new(OK)));
    let zombie_mode = Arc::new(AtomicU8::new(FAIL));
    let zombie = serve(zombie_mode.clone());
    let in_zone = |zone: &str, port: u16| {
        format!(r#"{{"address":"127.0.0.1","port":{port},"zone":"{zone}","ttl_s":120,"heartbeat_interval_s":30}}"#)
    };
    // Zone a: six alive, one ghost, one zombie. Zone b: all four dead, a storm the brake holds.
    for n in 0..6 {
        register(&c, "web", &format!("a-alive-{n}"), &in_zone("a", alive));
    }
    register(&c, "web", "a-ghost", &in_zone("a", closed_port()));
    // Dead from here, alive from the members: the leader's own probe keeps it.
    register(&c, "web", "a-split", &in_zone("a", serve(Arc::new(AtomicU8::new(FAILS_FOR_CTL_ONLY)))));
    // Persistent: lives until its owner deregisters it; a repair never removes it.
    let persistent = closed_port();
    register(
        &c,
        "web",
        "a-persistent",
        &format!(r#"{{"address":"127.0.0.1","port":{persistent},"zone":"a","kind":"persistent"}}"#),
    );
    for n in 0..4 {
        register(&c, "web", &format!("b-dead-{n}"), &in_zone("b", closed_port()));
    }
    register(
        &c,
        "web",
        "a-zombie",
        &format!(
            r#"{{"address":"127.0.0.1","port":{zombie},"zone":"a","kind":"persistent","check":{{"http":"http://127.0.0.1:{zombie}/health","interval_s":1,"timeout_s":1,"failures_before_critical":1,"successes_before_passing":100}}}}"#
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(&c.nodes[0], "GET", "/api/v1/ns/default/services/web/instances/a-zombie", None).unwrap().json()["health"]
        != "critical"
    {
        assert!(Instant::now() < deadline, "the check never marked it critical");
        std::thread::sleep(Duration::from_millis(200));
    }
    zombie_mode.store(OK, Ordering::SeqCst);
    let before = instance_ids(&c, "web");
    assert_eq!(before.len(), 14, "{before:?}");

    // A dry run plans and changes nothing.
    let (code, report) = audit_repair(&c, &[]);
    assert_eq!(code, 1, "{report:#}");
    let planned = report["repair"]["planned"].as_array().unwrap();
    assert_eq!(planned.iter().filter(|p| p["action"] == "deregister").count(), 6, "{report:#}");
    assert_eq!(planned.iter().filter(|p| p["action"] == "mark-passing").count(), 1, "{report:#}");
    assert!(report["repair"]["applied"].is_null(), "{report:#}");
    let skipped = report["repair"]["skipped"].to_string();
    assert!(skipped.contains("a-persistent") && skipped.contains("persistent"), "{report:#}");
    assert_eq!(instance_ids(&c, "web"), before, "a dry run changed the registry");

    // Carried out: the ghost goes, the zombie is passing, zone b's storm is held whole.
    let (code, report) = audit_repair(&c, &["--yes"]);
    assert_eq!(code, 1, "not every repair was done: {report:#}");
    let results = report["repair"]["applied"]["results"].as_array().unwrap().clone();
    let outcome = |key_end: &str| {
        let r = results.iter().find(|r| r["key"].as_str().unwrap().ends_with(key_end));
        r.unwrap_or_else(|| panic!("{key_end}: {report:#}"))["outcome"].as_str().unwrap().to_string()
    };
    assert_eq!(outcome("/a-ghost"), "done");
    assert_eq!(outcome("/a-split"), "refused", "the leader reaches it: {report:#}");
    assert_eq!(outcome("/a-zombie"), "done");
    for n in 0..4 {
        assert_eq!(outcome(&format!("/b-dead-{n}")), "held", "{report:#}");
    }
    assert!(results
        .iter()
        .filter(|r| r["outcome"] == "held")
        .all(|r| r["detail"].as_str().unwrap().contains("eviction brake")));
    let after = instance_ids(&c, "web");
    assert!(!after.contains(&"a-ghost".to_string()), "{after:?}");
    assert!(after.contains(&"a-persistent".to_string()), "a persistent instance is never repaired away: {after:?}");
    assert!(after.contains(&"a-split".to_string()), "an instance the leader reaches is kept: {after:?}");
    assert!((0..4).all(|n| after.contains(&format!("b-dead-{n}"))), "the brake kept zone b: {after:?}");
    let z = http(&c.nodes[1], "GET", "/api/v1/ns/default/services/web/instances/a-zombie", None).unwrap().json();
    assert_eq!(z["health"], "passing", "{z:#}");

    // A held repair engages nothing: the brake does not hold zone b for its leases or checks
    // (one outside vantage point is not a storm the registry saw).
    let doctor = Command::new(quorate_bin())
        .args(["ctl", "--endpoints", &c.endpoints(), "-w", "json", "doctor"])
        .output()
        .unwrap();
    let doctor: Value = serde_json::from_slice(&doctor.stdout).unwrap();
    assert!(
        doctor["findings"].as_array().unwrap().iter().all(|f| f["code"] != "brake-engaged"),
        "a refused repair engaged the brake: {doctor:#}"
    );

    // What is left: zone b's ghosts and the persistent one.
    let (_, report) = audit(&c, &[]);
    assert_eq!(verdict_of(&report, "a-zombie"), "agrees");
    assert_eq!(report["ghosts"].as_u64(), Some(6), "{report:#}");
}
