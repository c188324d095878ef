//! One registry, three dialects (issue 4): an instance registered through Consul's API is
//! listed by the native API and Eureka's and seen by an etcd watch, and likewise from each
//! other dialect; the real PyPI clients `py-consul` and `py-eureka-client` work unmodified;
//! bad input gets a 4xx with a JSON error body and changes nothing.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions};
use quorate_tests::{http, Cluster, Flavor, HttpReply};

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("QUORATE_PYTHON") {
        return p.into();
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/py/bin/python")
}

fn run_py(script: &str, port: u16) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py").join(script);
    let out = Command::new(python()).arg(&path).arg(port.to_string()).output().unwrap_or_else(|e| {
        panic!("{}: {e} (scripts/test.sh creates target/py with the PyPI clients)", python().display())
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn native_ids(c: &Cluster, n: usize, svc: &str) -> Vec<String> {
    let v = http(&c.nodes[n], "GET", &format!("/api/v1/ns/default/services/{svc}/instances"), None).unwrap().json();
    v["instances"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_string()).collect()
}

fn consul_ids(c: &Cluster, n: usize, svc: &str) -> Vec<String> {
    let r = http(&c.nodes[n], "GET", &format!("/v1/health/service/{svc}"), None).unwrap();
    assert!(r.header("x-consul-index").is_some_and(|i| i.parse::<u64>().unwrap() > 0), "{:?}", r.headers);
    assert_eq!(r.header("x-consul-knownleader"), Some("true"));
    assert!(r.header("x-consul-lastcontact").is_some_and(|v| v.parse::<u64>().is_ok()));
    r.json().as_array().unwrap().iter().map(|e| e["Service"]["ID"].as_str().unwrap().to_string()).collect()
}

/// A GET with `Accept: application/json`, as Java Eureka clients send it.
fn json_get(c: &Cluster, n: usize, path: &str) -> HttpReply {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", c.nodes[n].http_port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\nConnection: close\r\n\r\n").unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    HttpReply { status, headers: vec![], body: body.to_string() }
}

fn eureka_ids(c: &Cluster, n: usize, app: &str) -> Vec<String> {
    let r = http(&c.nodes[n], "GET", "/eureka/apps/", None).unwrap();
    assert!(r.body.contains("<applications>"), "XML by default: {}", r.body);
    let apps = json_get(c, n, "/eureka/apps").json()["applications"]["application"].clone();
    let apps = apps.as_array().cloned().unwrap_or_default();
    apps.iter()
        .filter(|a| a["name"] == app)
        .flat_map(|a| a["instance"].as_array().cloned().unwrap_or_default())
        .map(|i| i["instanceId"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_state_three_dialects_and_real_clients() {
    let c = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let mut etcd = Client::connect(c.all_endpoints(), None).await.unwrap();
    let mut watch = etcd.watch("/quorate/registry/", Some(WatchOptions::new().with_prefix())).await.unwrap();

    eprintln!("register one instance through each dialect, on different members");
    let consul = r#"{"Name":"shop","ID":"shop-consul","Address":"10.0.0.1","Port":80,"Tags":["c"],"Check":{"TTL":"30s","Status":"passing"}}"#;
    let r = http(&c.nodes[0], "PUT", "/v1/agent/service/register", Some(consul)).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let eureka = r#"<instance><instanceId>shop-eureka</instanceId><hostName>h2</hostName><app>SHOP</app><ipAddr>10.0.0.2</ipAddr><status>UP</status><port enabled="true">80</port><leaseInfo><durationInSecs>30</durationInSecs><renewalIntervalInSecs>10</renewalIntervalInSecs></leaseInfo></instance>"#;
    let r = http(&c.nodes[1], "POST", "/eureka/apps/SHOP", Some(eureka)).unwrap();
    assert_eq!(r.status, 204, "{}", r.body);
    let native = r#"{"address":"10.0.0.3","port":80,"ttl_s":30,"heartbeat_interval_s":10}"#;
    let r = http(&c.nodes[2], "PUT", "/api/v1/ns/default/services/shop/instances/shop-native", Some(native)).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    let all = ["shop-consul", "shop-eureka", "shop-native"];
    for n in 0..3 {
        assert_eq!(native_ids(&c, n, "shop"), all, "native on m{}", n + 1);
        assert_eq!(consul_ids(&c, n, "shop"), all, "consul on m{}", n + 1);
        assert_eq!(eureka_ids(&c, n, "SHOP"), all, "eureka on m{}", n + 1);
    }
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(5), watch.message()).await.unwrap().unwrap().unwrap();
        for e in m.events() {
            if e.event_type() == EventType::Put {
                seen.push(e.kv().unwrap().key_str().unwrap().rsplit('/').next().unwrap().to_string());
            }
        }
    }
    seen.sort();
    assert_eq!(seen, all, "the etcd watch saw every registration");

    eprintln!("renew through each dialect, deregister through another");
    assert_eq!(http(&c.nodes[2], "PUT", "/v1/agent/check/pass/service:shop-consul", None).unwrap().status, 200);
    assert_eq!(http(&c.nodes[0], "PUT", "/eureka/apps/SHOP/shop-eureka?status=UP", None).unwrap().status, 200);
    let hb = "/api/v1/ns/default/services/shop/instances/shop-native/heartbeat";
    assert_eq!(http(&c.nodes[1], "PUT", hb, None).unwrap().status, 200);
    assert_eq!(http(&c.nodes[0], "DELETE", "/eureka/apps/SHOP/shop-consul", None).unwrap().status, 200);
    assert_eq!(http(&c.nodes[1], "PUT", "/v1/agent/service/deregister/shop-eureka", None).unwrap().status, 200);
    assert_eq!(native_ids(&c, 2, "shop"), ["shop-native"]);

    eprintln!("py-consul, unmodified");
    let out = run_py("consul_client.py", c.nodes[1].http_port);
    eprint!("{out}");
    assert!(out.trim_end().ends_with("OK"));
    eprintln!("py-eureka-client, unmodified");
    let out = run_py("eureka_client.py", c.nodes[2].http_port);
    eprint!("{out}");
    assert!(out.trim_end().ends_with("OK"));

    eprintln!("bad input through the dialects: 4xx, a JSON error, nothing changes");
    let revision = || http(&c.nodes[0], "GET", "/api/v1/ns/default/services", None).unwrap().json()["revision"].clone();
    let before = revision();
    let cases: &[(&str, &str, &str, u16)] = &[
        ("PUT", "/v1/agent/service/register", "{not json", 400),
        ("PUT", "/v1/agent/service/register", r#"{"Name":"","Port":1}"#, 400),
        ("PUT", "/v1/agent/service/register", r#"{"Name":"x","Port":70000}"#, 400),
        ("PUT", "/v1/agent/service/register", r#"{"Name":"x y","Port":1}"#, 400),
        ("PUT", "/v1/agent/service/register", r#"{"Name":"x","Check":{"TTL":"soon"}}"#, 400),
        ("PUT", "/v1/agent/service/deregister/nobody", "", 404),
        ("PUT", "/v1/agent/check/pass/service:nobody", "", 404),
        ("POST", "/eureka/apps/SHOP", "<instance><port>1", 400),
        ("POST", "/eureka/apps/SHOP", r#"{"instance":{"instanceId":"e1","ipAddr":"1.2.3.4","port":{"$":0}}}"#, 400),
        (
            "POST",
            "/eureka/apps/SHOP",
            r#"{"instance":{"instanceId":"e1","ipAddr":"1.2.3.4","port":1,"status":"MAYBE"}}"#,
            400,
        ),
        ("POST", "/eureka/apps/SHOP", r#"{"nothing":1}"#, 400),
        ("PUT", "/eureka/apps/SHOP/nobody", "", 404),
        ("DELETE", "/eureka/apps/SHOP/nobody", "", 404),
        ("GET", "/eureka/apps/NOSUCHAPP", "", 404),
    ];
    for (method, path, body, status) in cases {
        let r = http(&c.nodes[0], method, path, Some(body)).unwrap();
        assert_eq!(r.status, *status, "{method} {path} {body}: {}", r.body);
        assert!(r.json()["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{method} {path}: {}", r.body);
    }
    assert_eq!(before, revision(), "bad requests changed nothing");
}
