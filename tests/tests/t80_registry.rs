//! The registry's native HTTP API on a 3-member cluster (issue 4, first step): one state seen
//! through every member and through an etcd watch; heartbeats keep an instance, silence evicts
//! it within TTL + slack (generously); blocking queries; stale reads say so; bad input gets a
//! 4xx with a JSON body and changes nothing.

use std::time::{Duration, Instant};

use etcd_client::{Client, WatchOptions};
use quorate_tests::{http, Cluster, Flavor, HttpReply};

const SVC: &str = "/api/v1/ns/default/services/web/instances";

fn register(c: &Cluster, node: usize, id: &str, body: &str) -> HttpReply {
    http(&c.nodes[node], "PUT", &format!("{SVC}/{id}"), Some(body)).unwrap()
}

fn ids(reply: &HttpReply) -> Vec<String> {
    let v = reply.json();
    v["instances"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_string()).collect()
}

/// The first `n` events of an SSE stream, as "type id".
fn sse_ids(node: &quorate_tests::Node, path: &str, n: usize) -> Vec<String> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", node.http_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n").unwrap();
    let mut out = Vec::new();
    for line in BufReader::new(s).lines() {
        let line = line.expect("the stream delivers events");
        if let Some(data) = line.strip_prefix("data: ") {
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            out.push(format!("{} {}", v["type"].as_str().unwrap(), v["id"].as_str().unwrap()));
            if out.len() == n {
                break;
            }
        }
    }
    out
}

fn revision(c: &Cluster) -> i64 {
    http(&c.nodes[0], "GET", "/api/v1/ns/default/services", None).unwrap().json()["revision"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_registry_on_three_members() {
    let c = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let mut etcd = Client::connect(c.all_endpoints(), None).await.unwrap();
    let start_rev = revision(&c);
    let mut watch = etcd
        .watch("/quorate/registry/", Some(WatchOptions::new().with_prefix().with_start_revision(start_rev + 1)))
        .await
        .unwrap();

    eprintln!("register through m1; m2 and m3 list it, and an etcd watch sees it");
    let r = register(
        &c,
        0,
        "web-1",
        r#"{"address":"10.0.0.1","port":8080,"zone":"eu","tags":["v1"],"heartbeat_interval_s":1,"ttl_s":3}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["heartbeat_interval_s"], 1, "the server tells the client its heartbeat interval");
    let rev: i64 = r.header("x-quorate-revision").unwrap().parse().unwrap();
    for h in ["x-quorate-term", "x-quorate-member", "x-quorate-leader"] {
        assert!(r.header(h).is_some_and(|v| !v.is_empty()), "{h} missing: {:?}", r.headers);
    }
    let r = register(&c, 2, "web-2", r#"{"address":"10.0.0.2","port":8080,"zone":"us","ttl_s":30}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    for n in 0..3 {
        let list = http(&c.nodes[n], "GET", SVC, None).unwrap();
        assert_eq!(ids(&list), ["web-1", "web-2"], "m{}", n + 1);
        assert!(list.header("x-quorate-stale").is_none(), "a default read is linearizable");
    }
    let resp = loop {
        let m = tokio::time::timeout(Duration::from_secs(5), watch.message()).await.unwrap().unwrap().unwrap();
        if !m.events().is_empty() {
            break m;
        }
    };
    let ev = &resp.events()[0];
    assert_eq!(ev.kv().unwrap().key_str().unwrap(), "/quorate/registry/default/web/web-1");
    assert_eq!(ev.kv().unwrap().mod_revision(), rev);

    eprintln!("the change stream (SSE) replays both registrations from a revision, on any member");
    let sse = sse_ids(&c.nodes[2], &format!("/api/v1/ns/default/watch?service=web&from={}", start_rev + 1), 2);
    assert_eq!(sse, ["put web-1", "put web-2"]);

    eprintln!("filters: zone, tag, prefer_zone; stale reads carry their age");
    assert_eq!(ids(&http(&c.nodes[1], "GET", &format!("{SVC}?zone=us"), None).unwrap()), ["web-2"]);
    assert_eq!(ids(&http(&c.nodes[1], "GET", &format!("{SVC}?tag=v1"), None).unwrap()), ["web-1"]);
    assert_eq!(ids(&http(&c.nodes[1], "GET", &format!("{SVC}?prefer_zone=eu"), None).unwrap()), ["web-1"]);
    assert_eq!(ids(&http(&c.nodes[1], "GET", &format!("{SVC}?prefer_zone=ap"), None).unwrap()), ["web-1", "web-2"]);
    let stale = http(&c.nodes[2], "GET", &format!("{SVC}?stale"), None).unwrap();
    assert_eq!(stale.header("x-quorate-stale"), Some("true"));
    assert!(stale.header("x-quorate-stale-age-ms").is_some());

    eprintln!("heartbeats keep web-1 (TTL 3 s) for 6 s, through any member");
    let mut last_heartbeat = Instant::now();
    for i in 0..7 {
        if i > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let hb = http(&c.nodes[i % 3], "PUT", &format!("{SVC}/web-1/heartbeat"), None).unwrap();
        assert_eq!(hb.status, 200, "{}", hb.body);
        last_heartbeat = Instant::now();
    }
    assert_eq!(ids(&http(&c.nodes[0], "GET", SVC, None).unwrap()), ["web-1", "web-2"]);

    eprintln!("a blocking query returns when the service changes");
    let index = revision(&c);
    let node = c.nodes[1].http_port;
    let waiter = std::thread::spawn(move || {
        let started = Instant::now();
        let n = quorate_tests::Node::detached(node);
        let r = http(&n, "GET", &format!("{SVC}?index={index}&wait=20s"), None).unwrap();
        (started.elapsed(), r)
    });

    eprintln!("silence: web-1 stops heartbeating and is evicted within TTL + slack");
    let silent_since = last_heartbeat;
    let deadline = silent_since + Duration::from_secs(10);
    loop {
        let list = http(&c.nodes[0], "GET", SVC, None).unwrap();
        if ids(&list) == ["web-2"] {
            break;
        }
        assert!(Instant::now() < deadline, "web-1 was never evicted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone_after = silent_since.elapsed();
    eprintln!("evicted {gone_after:?} after its last heartbeat (TTL 3 s, election timeout 1 s)");
    // A generous "eventually": TTL + the lease slack (1 s) + one election timeout + a second for
    // this machine; the exact bound is the lease core's unit test.
    assert!(gone_after <= Duration::from_secs(6), "evicted only after {gone_after:?}");
    assert!(gone_after >= Duration::from_millis(2500), "evicted too early: {gone_after:?}");
    let (waited, blocked) = waiter.join().unwrap();
    assert_eq!(ids(&blocked), ["web-2"], "the blocking query answered with the change");
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(10), "blocked {waited:?}");

    eprintln!("a heartbeat after eviction is a 404; registering again works");
    let hb = http(&c.nodes[1], "PUT", &format!("{SVC}/web-1/heartbeat"), None).unwrap();
    assert_eq!(hb.status, 404, "{}", hb.body);
    let r = register(&c, 1, "web-1", r#"{"address":"10.0.0.1","port":8080,"ttl_s":3,"heartbeat_interval_s":1}"#);
    assert_eq!(r.status, 200);

    eprintln!("bad input: 4xx with a JSON error, nothing stored changes");
    let before = revision(&c);
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        (
            "PUT",
            "/api/v1/ns/default/services/web/instances/x",
            Some(r#"{"address":"a","port":0}"#),
            400,
            "invalid_port",
        ),
        (
            "PUT",
            "/api/v1/ns/default/services/web/instances/x",
            Some(r#"{"address":"a","port":70000}"#),
            400,
            "invalid_port",
        ),
        (
            "PUT",
            "/api/v1/ns/default/services/web/instances/x",
            Some(r#"{"address":"a","port":1,"weight":1001}"#),
            400,
            "invalid_weight",
        ),
        (
            "PUT",
            "/api/v1/ns/default/services/web/instances/x",
            Some(r#"{"address":"a","port":1,"weight":-1}"#),
            400,
            "invalid_weight",
        ),
        ("PUT", "/api/v1/ns/default/services/web/instances/x", Some(r#"{"address":"a","#), 400, "malformed_json"),
        (
            "PUT",
            "/api/v1/ns/default/services/web/instances/x",
            Some(r#"{"address":"a","port":1,"colour":1}"#),
            400,
            "malformed_json",
        ),
        (
            "PUT",
            "/api/v1/ns/default/services/w%20b/instances/x",
            Some(r#"{"address":"a","port":1}"#),
            400,
            "invalid_name",
        ),
        ("PUT", "/api/v1/ns/n%2Fs/services/web/instances/x", Some(r#"{"address":"a","port":1}"#), 400, "invalid_name"),
        ("DELETE", "/api/v1/ns/default/services/web/instances/nobody", None, 404, "unknown_instance"),
        ("PUT", "/api/v1/ns/default/services/web/instances/nobody/heartbeat", None, 404, "unknown_instance"),
        ("GET", "/api/v1/ns/default/services/nothing/instances/nobody", None, 404, "unknown_instance"),
        ("GET", "/api/v1/ns/default/services/web/instances?index=1&wait=2d", None, 400, "bad_wait"),
        ("GET", "/api/v1/ns/default/watch?from=0", None, 400, "bad_revision"),
        ("GET", "/api/v1/ns/nowhere/services", None, 404, "unknown_namespace"),
        ("GET", "/api/v1/ns/default/services/nothing/instances", None, 404, "unknown_service"),
    ];
    for (method, path, body, status, code) in cases {
        let r = http(&c.nodes[2], method, path, *body).unwrap();
        assert_eq!(r.status, *status, "{method} {path}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], *code, "{method} {path}: {}", r.body);
        assert!(r.json()["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(r.header("x-quorate-member").is_some(), "errors also say who answered: {:?}", r.headers);
    }
    assert_eq!(revision(&c), before, "bad requests changed nothing");

    eprintln!("a fenced registration applies only while its lock key is held at its token");
    let lease = etcd.lease_grant(30, None).await.unwrap().id();
    let put = etcd.put("locks/primary", "me", Some(etcd_client::PutOptions::new().with_lease(lease))).await.unwrap();
    let token = put.header().unwrap().revision();
    let fenced = format!(r#"{{"address":"10.0.0.9","port":80,"fence":"locks/primary@{token}"}}"#);
    let r = register(&c, 1, "primary", &fenced);
    assert_eq!(r.status, 200, "{}", r.body);
    etcd.lease_revoke(lease).await.unwrap();
    let stale = format!(r#"{{"address":"10.0.0.66","port":80,"fence":"locks/primary@{token}"}}"#);
    let r = register(&c, 2, "primary", &stale);
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "fence_rejected");
    let kept = http(&c.nodes[0], "GET", &format!("{SVC}/primary"), None).unwrap().json();
    assert_eq!(kept["address"], "10.0.0.9", "the stale holder's write changed nothing");
    let r = http(&c.nodes[0], "DELETE", &format!("{SVC}/primary?fence=locks/primary@{token}"), None).unwrap();
    assert_eq!(r.status, 409, "{}", r.body);
    let r = register(&c, 2, "x", r#"{"address":"a","port":1,"fence":"no-token"}"#);
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (400, Some("bad_fence")));
    assert_eq!(http(&c.nodes[0], "DELETE", &format!("{SVC}/primary"), None).unwrap().status, 200);

    eprintln!("deregister");
    let d = http(&c.nodes[0], "DELETE", &format!("{SVC}/web-2"), None).unwrap();
    assert_eq!(d.status, 200, "{}", d.body);
    assert_eq!(ids(&http(&c.nodes[2], "GET", SVC, None).unwrap()), ["web-1"]);
}
