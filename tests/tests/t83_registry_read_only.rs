//! The registry's records are read-only over the generic KV APIs (issue 11, section 3): on a
//! 3-member cluster, `etcdctl del --prefix /quorate/`, a whole-keyspace delete, ranges that
//! merely overlap the registry, a write hidden in a nested Txn's failure branch, and Consul KV
//! deletes however the key is spelled (`%2Fquorate`, doubled slashes, the empty key) are all
//! refused with etcd's permission-denied code or a Consul 403 with a JSON body, and every
//! registered instance is still there afterwards. Reads and watches of the registry keep
//! working, and the registry's own writes (register, deregister) are not blocked. The eviction
//! brake's replicated state (`/quorate/brake`) is protected the same way, and so are the lock
//! and election services (a lock named inside the registry, an unlock of an instance's key).

use std::time::Duration;

use etcd_client::{Client, DeleteOptions, LockOptions, Txn, TxnOp};
use quorate_tests::{etcdctl, etcdctl_stdin, http, Cluster, Flavor};

const SVC: &str = "/api/v1/ns/default/services/web/instances";

fn listed(c: &Cluster, node: usize) -> Vec<String> {
    let v = http(&c.nodes[node], "GET", SVC, None).unwrap().json();
    let mut ids: Vec<String> =
        v["instances"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

fn assert_denied(what: &str, out: &quorate_tests::Output) {
    assert!(!out.ok, "{what} must be refused: {}", out.stdout);
    assert!(out.stderr.contains("etcdserver: permission denied"), "{what}: {}", out.stderr);
    assert!(out.stderr.contains("/api/v1/ns/"), "{what}: the refusal names the registry API: {}", out.stderr);
}

fn assert_grpc_denied<T: std::fmt::Debug>(what: &str, r: Result<T, etcd_client::Error>) {
    match r {
        Err(etcd_client::Error::GRpcStatus(s)) => {
            assert_eq!(format!("{:?}", s.code()), "PermissionDenied", "{what}: {s:?}");
            assert!(s.message().starts_with("etcdserver: permission denied"), "{what}: {}", s.message());
        }
        other => panic!("{what} must be refused with PermissionDenied, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_writes_into_the_registry_are_refused_and_instances_survive() {
    let c = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let ep = c.endpoints();

    eprintln!("register three persistent instances, and one through Consul; write an ordinary key");
    for id in ["web-1", "web-2", "web-3"] {
        let body = format!(r#"{{"address":"10.0.0.1","port":80,"kind":"persistent","tags":["{id}"]}}"#);
        let r = http(&c.nodes[0], "PUT", &format!("{SVC}/{id}"), Some(&body)).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = http(
        &c.nodes[1],
        "PUT",
        "/v1/agent/service/register",
        Some(r#"{"Name":"web","ID":"web-c","Address":"10.0.0.9","Port":80}"#),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(etcdctl(&ep, &["put", "/app/config", "v1"]).ok);
    let before = listed(&c, 0);
    assert_eq!(before, ["web-1", "web-2", "web-3", "web-c"]);
    let keys_before = etcdctl(&ep, &["get", "--prefix", "--keys-only", "/quorate/registry/"]);
    assert!(keys_before.ok && keys_before.stdout.contains("/quorate/registry/default/web/web-1"), "reads stay open");

    eprintln!("etcdctl: prefix, from-key, overlapping range and single-key writes are refused");
    assert_denied("del --prefix /quorate/", &etcdctl(&ep, &["del", "--prefix", "/quorate/"]));
    assert_denied("del --prefix /", &etcdctl(&ep, &["del", "--prefix", "/"]));
    assert_denied("del \"\" --from-key", &etcdctl(&ep, &["del", "", "--from-key"]));
    assert_denied("del /a --from-key", &etcdctl(&ep, &["del", "/a", "--from-key"]));
    assert_denied("del /a /quorate/registry/m", &etcdctl(&ep, &["del", "/a", "/quorate/registry/m"]));
    assert_denied("del one instance", &etcdctl(&ep, &["del", "/quorate/registry/default/web/web-1"]));
    assert_denied("put a forged instance", &etcdctl(&ep, &["put", "/quorate/registry/default/web/evil", "{}"]));
    assert_denied("put the brake's state", &etcdctl(&ep, &["put", "/quorate/brake", "{}"]));
    assert_denied("del /quorate/b /quorate/c", &etcdctl(&ep, &["del", "/quorate/b", "/quorate/c"]));
    // A txn whose success branch writes elsewhere and whose failure branch deletes instances.
    let txn = "value(\"/app/config\") = \"other\"\n\nput /app/x y\n\ndel /quorate/registry/default/web/web-2\n\n";
    assert_denied("txn failure branch", &etcdctl_stdin(&ep, &["txn"], Some(txn)));

    eprintln!("etcd client: the write hidden in a nested txn's failure branch is refused");
    let mut client = Client::connect(c.all_endpoints(), None).await.unwrap();
    let nested = Txn::new().or_else([TxnOp::delete("/quorate/", Some(DeleteOptions::new().with_prefix()))]);
    let outer = Txn::new().and_then([TxnOp::put("/app/y", "z", None), TxnOp::txn(nested)]);
    assert_grpc_denied("nested txn", client.txn(outer).await);
    let r = client.delete("/quorate/registry/", Some(DeleteOptions::new().with_prefix())).await;
    assert!(
        matches!(&r, Err(etcd_client::Error::GRpcStatus(s)) if format!("{:?}", s.code()) == "PermissionDenied"),
        "{r:?}"
    );
    assert!(client.get("/app/y", None).await.unwrap().kvs().is_empty(), "nothing of a refused txn is applied");
    assert!(client.get("/app/x", None).await.unwrap().kvs().is_empty(), "nothing of a refused txn is applied");

    eprintln!("a lock or an election named inside the registry, and unlocking an instance's key, are refused");
    let lease = client.lease_grant(30, None).await.unwrap().id();
    let name = "/quorate/registry/default/web";
    let lock = client.lock(name, Some(LockOptions::new().with_lease(lease)));
    assert_grpc_denied("lock", tokio::time::timeout(Duration::from_secs(10), lock).await.expect("answered"));
    let campaign = client.campaign(name, "me", lease);
    assert_grpc_denied("campaign", tokio::time::timeout(Duration::from_secs(10), campaign).await.expect("answered"));
    assert_grpc_denied("unlock", client.unlock("/quorate/registry/default/web/web-2").await);

    eprintln!("Consul KV: deletes and writes however the key is spelled are a 403 with a JSON body");
    for (method, path) in [
        ("DELETE", "/v1/kv/%2Fquorate?recurse"),
        ("DELETE", "/v1/kv/%2Fquorate%2F?recurse"),
        ("DELETE", "/v1/kv//quorate/registry?recurse"),
        ("DELETE", "/v1/kv/%2F?recurse"),
        ("DELETE", "/v1/kv/?recurse"),
        ("DELETE", "/v1/kv/%2Fquorate%2Fregistry%2Fdefault%2Fweb%2Fweb-3"),
        ("PUT", "/v1/kv/%2Fquorate%2Fregistry%2Fdefault%2Fweb%2Fevil"),
        ("PUT", "/v1/kv//quorate/registry/default/web/web-3?cas=0"),
    ] {
        let r = http(&c.nodes[2], method, path, Some("{}")).unwrap();
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
        let v = r.json();
        assert_eq!(v["error"]["code"], "permission_denied", "{method} {path}: {}", r.body);
        assert!(v["error"]["message"].as_str().unwrap().contains("/v1/agent/service/"), "{}", r.body);
    }
    // Consul KV elsewhere still works.
    let r = http(&c.nodes[2], "PUT", "/v1/kv/app/flag", Some("on")).unwrap();
    assert_eq!((r.status, r.body.trim()), (200, "true"), "{}", r.body);

    eprintln!("every instance and the ordinary key are intact, on every member");
    for n in 0..3 {
        assert_eq!(listed(&c, n), before, "m{}", n + 1);
    }
    let got = etcdctl(&ep, &["get", "/app/config", "--print-value-only"]);
    assert_eq!(got.stdout.trim(), "v1");
    let keys_after = etcdctl(&ep, &["get", "--prefix", "--keys-only", "/quorate/registry/"]);
    assert_eq!(keys_after.stdout, keys_before.stdout);

    eprintln!("the registry's own writes are not blocked: register and deregister");
    let r = http(
        &c.nodes[1],
        "PUT",
        &format!("{SVC}/web-4"),
        Some(r#"{"address":"10.0.0.4","port":80,"kind":"persistent"}"#),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http(&c.nodes[2], "DELETE", &format!("{SVC}/web-1"), None).unwrap();
    assert!(r.status == 200 || r.status == 204, "{} {}", r.status, r.body);
    let r = http(&c.nodes[0], "PUT", "/v1/agent/service/deregister/web-c", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(listed(&c, 0), ["web-2", "web-3", "web-4"]);
}
