//! etcd's users and roles on the HTTP APIs (issue 14 §2, ADR 0010), on a real member: a role
//! allowed the registry's `orders` service only. The native API with a bearer token (static, and
//! one from etcd's `Authenticate`), Eureka with HTTP basic auth, the real `py-consul` with a
//! token: each registers, heartbeats and discovers `orders`, and each is refused `payments`;
//! nobody and bad credentials get 401, the operators' endpoints are root's, `/health` stays open;
//! the instance records who registered it.

use std::path::PathBuf;
use std::process::Command;

use quorate_api_grpc::pb::etcdserverpb as pb;
use quorate_tests::{http_with, Cluster, Flavor, HttpReply};

const ALICE_TOKEN: &str = "alice-static-token-0001";
const BOB_TOKEN: &str = "bob-static-token-000001";

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("QUORATE_PYTHON") {
        return p.into();
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/py/bin/python")
}

fn bearer(t: &str) -> (&'static str, String) {
    ("Authorization", format!("Bearer {t}"))
}

fn call(c: &Cluster, method: &str, path: &str, auth: Option<(&str, String)>, body: Option<&str>) -> HttpReply {
    let headers: Vec<(&str, &str)> = auth.iter().map(|(n, v)| (*n, v.as_str())).collect();
    http_with(&c.nodes[0], method, path, &headers, body).unwrap()
}

fn status_code(r: &HttpReply) -> (u16, String) {
    (r.status, r.json()["error"]["code"].as_str().unwrap_or_default().to_string())
}

const NATIVE: &str = r#"{"address":"10.0.0.3","port":80,"ttl_s":30,"heartbeat_interval_s":10}"#;
const EUREKA: &str = r#"<instance><instanceId>ID</instanceId><hostName>h2</hostName><app>APP</app><ipAddr>10.0.0.2</ipAddr><status>UP</status><port enabled="true">80</port><leaseInfo><durationInSecs>30</durationInSecs><renewalIntervalInSecs>10</renewalIntervalInSecs></leaseInfo></instance>"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_apis_answer_to_the_same_users_and_roles() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("# agents\n{ALICE_TOKEN} alice\n{BOB_TOKEN} bob\n")).unwrap();
    let c = Cluster::start_with(Flavor::Quorate, 1, &["--auth-static-tokens-file", tokens.to_str().unwrap()])
        .expect("cluster");
    let m = c.nodes[0].endpoint();
    quorate_tests::etcdctl_steps(
        &m,
        &[
            &["user", "add", "root:rootpw"][..],
            &["user", "grant-role", "root", "root"],
            &["role", "add", "orders"],
            &["role", "grant-permission", "orders", "--prefix=true", "readwrite", "/quorate/registry/default/orders/"],
            &["user", "add", "alice:alicepw"],
            &["user", "grant-role", "alice", "orders"],
            &["user", "add", "bob:bobpw"],
            &["auth", "enable"],
        ],
    );
    let alice = || Some(bearer(ALICE_TOKEN));
    let orders = "/api/v1/ns/default/services/orders/instances/o1";
    let payments = "/api/v1/ns/default/services/payments/instances/p1";

    // Native API, static bearer token: orders yes, payments no.
    let r = call(&c, "PUT", orders, alice(), Some(NATIVE));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(status_code(&call(&c, "PUT", payments, alice(), Some(NATIVE))), (403, "permission_denied".into()));
    assert_eq!(
        status_code(&call(&c, "PUT", orders, Some(bearer(BOB_TOKEN)), Some(NATIVE))),
        (403, "permission_denied".into())
    );
    let r = call(&c, "PUT", orders, None, Some(NATIVE));
    assert_eq!(status_code(&r), (401, "user_name_empty".into()));
    assert!(r.header("www-authenticate").is_some_and(|v| v.contains("Bearer")), "{:?}", r.headers);
    assert_eq!(
        status_code(&call(&c, "PUT", orders, Some(bearer("not-a-token")), Some(NATIVE))),
        (401, "invalid_auth_token".into())
    );
    assert_eq!(call(&c, "PUT", &format!("{orders}/heartbeat"), alice(), None).status, 200);

    // root, with a token from etcd's Authenticate, registers payments; alice may neither renew
    // nor see it.
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{m}")).unwrap().connect().await.unwrap();
    let mut auth = pb::auth_client::AuthClient::new(ch);
    let root_token = auth
        .authenticate(pb::AuthenticateRequest { name: "root".into(), password: "rootpw".into() })
        .await
        .unwrap()
        .into_inner()
        .token;
    let r = call(&c, "PUT", payments, Some(bearer(&root_token)), Some(NATIVE));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(status_code(&call(&c, "PUT", &format!("{payments}/heartbeat"), alice(), None)).0, 403);
    assert_eq!(status_code(&call(&c, "GET", "/api/v1/ns/default/services/payments/instances", alice(), None)).0, 403);
    let r = call(&c, "GET", "/api/v1/ns/default/services/orders/instances", alice(), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["instances"][0]["registered_by"], "alice", "{}", r.body);
    let r = call(&c, "GET", payments, Some(bearer(&root_token)), None);
    assert_eq!(r.json()["registered_by"], "root", "{}", r.body);

    // Eureka, HTTP basic auth.
    let basic = |user: &str| Some(("Authorization", format!("Basic {}", b64(user))));
    let body = EUREKA.replace("ID", "o2").replace("APP", "ORDERS");
    let r = call(&c, "POST", "/eureka/apps/ORDERS", basic("alice:alicepw"), Some(&body));
    assert_eq!(r.status, 204, "{}", r.body);
    let body = EUREKA.replace("ID", "p2").replace("APP", "PAYMENTS");
    assert_eq!(status_code(&call(&c, "POST", "/eureka/apps/PAYMENTS", basic("alice:alicepw"), Some(&body))).0, 403);
    assert_eq!(
        status_code(&call(&c, "POST", "/eureka/apps/ORDERS", basic("alice:wrong"), Some(&body))),
        (401, "auth_failed".into())
    );
    assert_eq!(call(&c, "PUT", "/eureka/apps/ORDERS/o2", basic("alice:alicepw"), None).status, 200);

    // Consul KV: alice has no keys there; ?token= is read like the header.
    let r = call(&c, "PUT", &format!("/v1/kv/config?token={ALICE_TOKEN}"), None, Some("x"));
    assert_eq!(status_code(&r).0, 403, "{}", r.body);

    // The real py-consul with a token.
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/consul_acl.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(c.nodes[0].http_port.to_string())
        .arg(ALICE_TOKEN)
        .output()
        .expect("scripts/test.sh creates target/py with py-consul");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprint!("{stdout}");
    assert!(
        out.status.success() && stdout.trim_end().ends_with("OK"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A Consul session is its creator's: alice may not destroy root's, and an id that names an
    // instance's lease (not a session) revokes nothing.
    let r = call(&c, "PUT", "/v1/session/create", Some(bearer(&root_token)), Some("{}"));
    assert_eq!(r.status, 200, "{}", r.body);
    let session = r.json()["ID"].as_str().unwrap().to_string();
    let r = call(&c, "PUT", &format!("/v1/session/destroy/{session}"), alice(), None);
    assert_eq!(status_code(&r).0, 403, "{}", r.body);
    let lease = call(&c, "GET", orders, alice(), None).json()["lease"].as_i64().unwrap() as u64;
    let fake = format!("{:08x}-{:04x}-{:04x}-8000-000000000000", lease >> 32, (lease >> 16) & 0xffff, lease & 0xffff);
    assert_eq!(call(&c, "PUT", &format!("/v1/session/destroy/{fake}"), alice(), None).status, 200);
    assert_eq!(
        call(&c, "PUT", &format!("{orders}/heartbeat"), alice(), None).status,
        200,
        "the instance's lease lives"
    );
    assert_eq!(call(&c, "PUT", &format!("/v1/session/destroy/{session}"), Some(bearer(&root_token)), None).status, 200);

    // quorate ctl with --user: the operator's view needs root; without it, what is open only.
    let ep = c.nodes[0].endpoint();
    let run = quorate_tests::ctl(&ep, &["status"]);
    assert_eq!(run.code, 0, "ctl status with auth on and no user: {}{}", run.stdout, run.stderr);
    let run = quorate_tests::ctl(&ep, &["audit"]);
    assert_ne!(run.code, 0, "ctl audit with no user read the registry: {}", run.stdout);
    let run = quorate_tests::ctl(&ep, &["--user", "root:rootpw", "audit", "-w", "json"]);
    assert!(run.stdout.contains("\"instances\""), "ctl audit as root: {}{}", run.stdout, run.stderr);
    let audit = run.json();
    let o1 = audit["instances"].as_array().unwrap().iter().find(|i| i["id"] == "o1").expect("o1 audited").clone();
    assert_eq!(o1["registered_by"], "alice", "who registered it, in the audit: {o1:#}");
    let run = quorate_tests::ctl(&ep, &["--user", "root:wrong", "status"]);
    assert!(run.code != 0 && run.stderr.contains("authentication failed"), "{}", run.stderr);

    // Operators' endpoints are root's; health and status are open.
    for (method, path) in [
        ("POST", "/v1/member/isolate"),
        ("PUT", "/debug/failpoints/fsync-delay-ms"),
        ("POST", "/v1/registry/repair"),
        ("GET", "/debug/pprof/profile?seconds=1"),
    ] {
        assert_eq!(status_code(&call(&c, method, path, alice(), Some("{}"))).0, 403, "{method} {path}");
    }
    assert_eq!(call(&c, "GET", "/health", None, None).status, 200);
    assert_eq!(call(&c, "GET", "/v1/member/status", None, None).status, 200);
}

fn b64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &c)| n | (c as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
