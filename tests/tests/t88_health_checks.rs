//! Active health checks (issue 4): an HTTP-checked persistent instance becomes critical after
//! `failures_before_critical` failed probes and passing again after it recovers; when only the
//! leader's probes are blocked while other members still reach it, it stays passing. Each
//! member probes from its own loopback address (`--probe-source-ip 127.0.0.<n>`), so the
//! target can refuse one member.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quorate_tests::{http, Cluster, Flavor};

#[derive(Default)]
struct Target {
    failing: bool,
    refused: HashSet<IpAddr>,
    probes: Vec<IpAddr>,
}

/// A tiny HTTP endpoint the instance "is": 200 unless told to fail, or the prober is refused.
fn serve(target: Arc<Mutex<Target>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let from = conn.peer_addr().unwrap().ip();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let code = {
                let mut t = target.lock().unwrap();
                t.probes.push(from);
                if t.failing || t.refused.contains(&from) {
                    "503 Service Unavailable"
                } else {
                    "200 OK"
                }
            };
            let _ = write!(conn, "HTTP/1.1 {code}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    port
}

const SVC: &str = "/api/v1/ns/default/services/db/instances";

fn health(c: &Cluster) -> String {
    let v = http(&c.nodes[0], "GET", &format!("{SVC}/db-1"), None).unwrap().json();
    v["health"].as_str().unwrap().to_string()
}

fn wait_health(c: &Cluster, want: &str, within: Duration) -> Duration {
    let start = Instant::now();
    while health(c) != want {
        assert!(start.elapsed() < within, "still {} after {within:?}, want {want}", health(c));
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

#[test]
fn http_checks_with_hysteresis_and_a_second_vantage_point() {
    let c = Cluster::start_with(Flavor::Quorate, 3, &["--probe-source-ip", "127.0.0.{n}"]).expect("cluster");
    let target = Arc::new(Mutex::new(Target::default()));
    let port = serve(target.clone());

    let body = format!(
        r#"{{"address":"127.0.0.1","port":{port},"kind":"persistent","check":{{"http":"http://127.0.0.1:{port}/health","interval_s":1,"timeout_s":1,"failures_before_critical":3,"successes_before_passing":1}}}}"#
    );
    let r = http(&c.nodes[1], "PUT", &format!("{SVC}/db-1"), Some(&body)).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(health(&c), "passing");
    let leader = c.wait_leader(Duration::from_secs(5)).unwrap();
    let leader_ip: IpAddr = format!("127.0.0.{}", leader + 1).parse().unwrap();
    assert!(target.lock().unwrap().probes.contains(&leader_ip), "the leader probes, from its own address");

    eprintln!("the endpoint fails for everyone: critical after 3 failed probes");
    target.lock().unwrap().failing = true;
    let took = wait_health(&c, "critical", Duration::from_secs(10));
    eprintln!("critical after {took:?}");
    assert!(took >= Duration::from_millis(1800), "three probes a second apart cannot take {took:?}");

    eprintln!("it recovers: passing after one good probe");
    target.lock().unwrap().failing = false;
    let took = wait_health(&c, "passing", Duration::from_secs(5));
    eprintln!("passing again after {took:?}");

    eprintln!("only the leader's probes are refused: another member confirms it is alive");
    target.lock().unwrap().refused.insert(leader_ip);
    target.lock().unwrap().probes.clear();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(health(&c), "passing", "one vantage point's trouble must not mark it critical");
    }
    let probes = target.lock().unwrap().probes.clone();
    assert!(probes.iter().any(|ip| *ip != leader_ip), "another member was asked to probe: {probes:?}");
    assert!(c.log(leader).contains("another member reaches the instance"));

    eprintln!("Consul's DeregisterCriticalServiceAfter: a dead service goes once critical for that long");
    let consul = r#"{"Name":"gone","ID":"gone-1","Port":1,"Check":{"TCP":"127.0.0.1:1","Interval":"1s","Timeout":"1s","DeregisterCriticalServiceAfter":"2s"}}"#;
    let r = http(&c.nodes[2], "PUT", "/v1/agent/service/register", Some(consul)).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let start = Instant::now();
    loop {
        let list = http(&c.nodes[0], "GET", "/v1/health/service/gone", None).unwrap().json();
        if list.as_array().unwrap().is_empty() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never deregistered: {list}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = start.elapsed();
    eprintln!("deregistered {took:?} after registration");
    assert!(took >= Duration::from_secs(4), "3 failed probes plus 2 s critical cannot take {took:?}");
}
