//! etcd's auth on a real 3-member cluster (issue 14 §2, ADR 0010), driven by the real `etcdctl`
//! and by raw gRPC with a token: users, roles and prefix permissions; `auth enable`; every API
//! refusing with etcd's messages; a Txn refused for a branch that would not run; a watch across
//! a forbidden prefix; Maintenance and Cluster for root only; a token issued by one member
//! accepted by the others and void once its user is deleted; users and roles carried to a member
//! by a snapshot and kept across restarts.

use std::time::{Duration, Instant};

use quorate_api_grpc::pb::etcdserverpb as pb;
use quorate_tests::{etcdctl, etcdctl_stdin, Cluster, Flavor, Output};

fn ok(out: Output, what: &str) -> String {
    assert!(out.ok, "{what}: {}{}", out.stdout, out.stderr);
    out.stdout
}

fn refused(out: Output, what: &str, message: &str) {
    assert!(!out.ok, "{what} was allowed: {}", out.stdout);
    assert!(out.stderr.contains(message), "{what}: expected {message:?}, got {}", out.stderr);
}

/// root (with the root role), and alice with readwrite on the prefix `app/`.
const USERS: &[&[&str]] = &[
    &["user", "add", "root:rootpw"],
    &["user", "grant-role", "root", "root"],
    &["role", "add", "app"],
    &["role", "grant-permission", "app", "--prefix=true", "readwrite", "app/"],
    &["user", "add", "alice:alicepw"],
    &["user", "grant-role", "alice", "app"],
];

fn with<'a>(user: &[&'a str], args: &[&'a str]) -> Vec<&'a str> {
    [user, args].concat()
}

async fn channel(endpoint: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{endpoint}")).unwrap().connect().await.expect("channel")
}

async fn authenticate(endpoint: &str, name: &str, password: &str) -> String {
    let mut auth = pb::auth_client::AuthClient::new(channel(endpoint).await);
    let req = pb::AuthenticateRequest { name: name.into(), password: password.into() };
    auth.authenticate(req).await.expect("authenticate").into_inner().token
}

/// A Put with `token` (none: no metadata) at `endpoint`.
async fn put(endpoint: &str, token: Option<&str>, key: &str) -> Result<i64, tonic::Status> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}")).unwrap().connect().await;
    let mut kv = pb::kv_client::KvClient::new(ch.map_err(|e| tonic::Status::unavailable(e.to_string()))?);
    let mut req = tonic::Request::new(pb::PutRequest { key: key.into(), value: b"v".to_vec(), ..Default::default() });
    if let Some(t) = token {
        req.metadata_mut().insert(quorate_api_grpc::TOKEN_METADATA, t.parse().unwrap());
    }
    kv.put(req).await.map(|r| r.into_inner().header.unwrap().revision)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_auth_guards_every_api_on_every_member() {
    let mut c = Cluster::start_with(Flavor::Quorate, 3, &["--snapshot-count", "200"]).expect("cluster");
    // "m3" is a follower that misses every auth change: it will learn them from a snapshot.
    // "m1" leads when this starts; "m2" is the other follower.
    let leader = c.wait_leader(Duration::from_secs(10)).expect("a leader");
    let (lag, other) = ((leader + 1) % 3, (leader + 2) % 3);
    let (m1, m2, m3) = (c.nodes[leader].endpoint(), c.nodes[other].endpoint(), c.nodes[lag].endpoint());
    c.kill(lag);

    quorate_tests::etcdctl_steps(&m1, USERS);
    // Enabling needs root with the root role (etcd's rule) — checked above; now on.
    assert!(ok(etcdctl(&m1, &["auth", "enable"]), "auth enable").contains("Authentication Enabled"));

    let alice = ["--user", "alice:alicepw"];
    let root = ["--user", "root:rootpw"];

    // Nobody: etcd's "user name is empty", for writes and reads, at every running member.
    for m in [&m1, &m2] {
        refused(etcdctl(m, &["put", "app/x", "1"]), "unauthenticated put", "etcdserver: user name is empty");
        refused(etcdctl(m, &["get", "app/x"]), "unauthenticated get", "etcdserver: user name is empty");
    }
    refused(etcdctl(&m2, &["--user", "alice:nope", "get", "app/x"]), "a wrong password", "authentication failed");

    // alice: her prefix, both ways; nothing else.
    ok(etcdctl(&m2, &with(&alice, &["put", "app/x", "1"])), "alice puts under app/");
    assert!(ok(etcdctl(&m1, &with(&alice, &["get", "app/x"])), "alice reads app/x").contains("app/x\n1"));
    refused(
        etcdctl(&m2, &with(&alice, &["put", "other", "1"])),
        "alice writes outside app/",
        "etcdserver: permission denied",
    );
    refused(
        etcdctl(&m1, &with(&alice, &["get", "--prefix", "ap"])),
        "alice reads past app/",
        "etcdserver: permission denied",
    );
    refused(
        etcdctl(&m1, &with(&alice, &["del", "--prefix", "app"])),
        "alice deletes past app/",
        "etcdserver: permission denied",
    );

    // A Txn whose success branch would run (app/c does not exist) but whose failure branch
    // writes outside the prefix: refused whole, as etcd checks every branch.
    let txn = "version(\"app/c\") = \"0\"\n\nput app/ok 1\n\nput secret 1\n\n";
    refused(
        etcdctl_stdin(&m2, &with(&alice, &["txn"]), Some(txn)),
        "a txn with a forbidden failure branch",
        "etcdserver: permission denied",
    );
    let txn = "version(\"app/c\") = \"0\"\n\nput app/ok 1\n\nput app/other 1\n\n";
    assert!(ok(etcdctl_stdin(&m2, &with(&alice, &["txn"]), Some(txn)), "a txn inside app/").contains("SUCCESS"));

    // A watch across a forbidden prefix is cancelled by the server; one on her prefix is not.
    let watch = etcdctl(&m1, &with(&alice, &["--command-timeout=3s", "watch", "--prefix", "ap"]));
    refused(watch, "alice watches past app/", "etcdserver: permission denied");

    // Maintenance and Cluster are root's.
    refused(etcdctl(&m1, &with(&alice, &["endpoint", "hashkv"])), "alice hashes", "permission denied");
    refused(etcdctl(&m1, &with(&alice, &["alarm", "list"])), "alice lists alarms", "permission denied");
    refused(etcdctl(&m1, &with(&alice, &["defrag"])), "alice defragments", "permission denied");
    let snap = c.dir().join("alice.db");
    refused(
        etcdctl(&m1, &with(&alice, &["snapshot", "save", snap.to_str().unwrap()])),
        "alice saves a snapshot",
        "permission denied",
    );
    refused(
        etcdctl(&m1, &with(&alice, &["member", "add", "x", "--peer-urls=http://127.0.0.1:1"])),
        "alice adds a member",
        "permission denied",
    );
    refused(etcdctl(&m1, &with(&alice, &["user", "add", "eve:pw"])), "alice adds a user", "permission denied");
    refused(etcdctl(&m1, &with(&alice, &["auth", "disable"])), "alice disables auth", "permission denied");
    ok(etcdctl(&m1, &with(&root, &["endpoint", "hashkv"])), "root hashes");
    assert!(ok(etcdctl(&m1, &with(&root, &["user", "list"])), "root lists users").contains("alice"));
    ok(etcdctl(&m1, &with(&root, &["put", "secret", "s"])), "root writes anywhere");

    // A token from m1 is good at m2; tampered or absent, it is not.
    let token = authenticate(&m1, "alice", "alicepw").await;
    put(&m2, Some(&token), "app/from-m1-token").await.expect("m1's token at m2");
    let forged = token.replacen(".", ".9", 1);
    let e = put(&m2, Some(&forged), "app/forged").await.expect_err("a forged token");
    assert_eq!((e.code(), e.message()), (tonic::Code::Unauthenticated, "etcdserver: invalid auth token"));
    let e = put(&m2, None, "app/none").await.expect_err("no token");
    assert_eq!((e.code(), e.message()), (tonic::Code::InvalidArgument, "etcdserver: user name is empty"));

    // Enough writes to purge the log past every auth change, then m3 comes back: only a
    // snapshot can tell it about users, roles and that auth is on.
    // Written until the leader has given up on the log for m3 and tries to send it a snapshot
    // (it says so in its log), however fast the writes went.
    let root_token = authenticate(&m1, "root", "rootpw").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    while ![leader, other].iter().any(|&m| c.log(m).contains("sending snapshot")) {
        assert!(Instant::now() < deadline, "no snapshot for m3 after {i} writes");
        for _ in 0..100 {
            put(&m1, Some(&root_token), &format!("load/{i}")).await.expect("root's load");
            i += 1;
        }
    }
    c.spawn(lag).expect("restart m3");
    let deadline = Instant::now() + Duration::from_secs(30);
    while put(&m3, Some(&token), "app/at-m3").await.is_err() {
        assert!(Instant::now() < deadline, "m3 never accepted alice's token:\n{}", c.log(lag));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(c.log(lag).contains("installed snapshot"), "m3 caught up without a snapshot:\n{}", c.log(lag));
    refused(etcdctl(&m3, &["put", "app/x", "2"]), "unauthenticated put at m3", "etcdserver: user name is empty");
    refused(etcdctl(&m3, &with(&alice, &["put", "other", "1"])), "alice outside app/ at m3", "permission denied");

    // Deleting alice voids her token everywhere.
    ok(etcdctl(&m1, &with(&root, &["user", "delete", "alice"])), "root deletes alice");
    for m in [&m1, &m2, &m3] {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match put(m, Some(&token), "app/after-delete").await {
                Err(e) if e.message() == "etcdserver: invalid auth token" => break,
                other => assert!(Instant::now() < deadline, "{m}: a deleted user's token: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Restarted, every member still has auth on and root's password.
    for i in [leader, other] {
        c.stop(i);
    }
    for i in [leader, other] {
        c.spawn(i).expect("restart");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !etcdctl(&m2, &with(&root, &["--command-timeout=2s", "put", "after-restart", "1"])).ok {
        assert!(Instant::now() < deadline, "root cannot write after a restart:\n{}", c.log(other));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    refused(etcdctl(&m1, &["put", "k", "v"]), "unauthenticated put after a restart", "user name is empty");

    // root turns it off; then anyone writes again.
    assert!(ok(etcdctl(&m1, &with(&root, &["auth", "disable"])), "auth disable").contains("Authentication Disabled"));
    ok(etcdctl(&m1, &["put", "k", "v"]), "a put with auth off");
}

/// etcd's `--auth-token jwt`: members share the key files, so a JWT issued by one is taken by the
/// others; a forged or a deleted
/// user's JWT is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_tokens_from_one_member_are_taken_by_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (public, private) = quorate_tls::testing::jwt_keys(dir.path());
    let (public, private) = (public.display().to_string(), private.display().to_string());
    let spec = format!("jwt,pub-key={public},priv-key={private},sign-method=ES256,ttl=10m");
    let c = Cluster::start_with(Flavor::Quorate, 2, &["--auth-token", &spec]).expect("cluster");
    let (m1, m2) = (c.nodes[0].endpoint(), c.nodes[1].endpoint());
    quorate_tests::etcdctl_steps(&m1, USERS);
    quorate_tests::etcdctl_steps(&m1, &[&["auth", "enable"]]);
    ok(etcdctl(&m2, &with(&["--user", "alice:alicepw"], &["put", "app/x", "1"])), "etcdctl --user with JWTs");
    let token = authenticate(&m1, "alice", "alicepw").await;
    assert!(token.starts_with("eyJ") && token.matches('.').count() == 2, "not a JWT: {token}");
    put(&m2, Some(&token), "app/jwt-from-m1").await.expect("m1's JWT at m2");
    let e = put(&m2, Some(&token), "other").await.expect_err("outside her prefix");
    assert_eq!(e.message(), "etcdserver: permission denied");
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    let e = put(&m2, Some(&forged), "app/forged").await.expect_err("a forged JWT");
    assert_eq!(e.message(), "etcdserver: invalid auth token");
    ok(etcdctl(&m1, &with(&["--user", "root:rootpw"], &["user", "delete", "alice"])), "delete alice");
    let deadline = Instant::now() + Duration::from_secs(5);
    while put(&m2, Some(&token), "app/after").await.is_ok() {
        assert!(Instant::now() < deadline, "a deleted user's JWT still writes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `snapshot save` keeps users, roles and auth on, never the token key; a cluster restored from
/// it signs with one key every member shares (proposed through the log by the first login, at a
/// follower here), so a token from one member is taken by the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_cluster_keeps_its_users_and_signs_with_one_key() {
    let c = Cluster::start_with(Flavor::Quorate, 1, &[]).expect("cluster");
    let m = c.nodes[0].endpoint();
    quorate_tests::etcdctl_steps(&m, USERS);
    quorate_tests::etcdctl_steps(&m, &[&["auth", "enable"]]);
    let file = c.dir().join("backup.db");
    let save = etcdctl(&m, &["--user", "root:rootpw", "snapshot", "save", file.to_str().unwrap()]);
    assert!(save.ok, "snapshot save as root: {}", save.stderr);

    let mut restored = Cluster::unstarted(Flavor::Quorate, 3).unwrap();
    for i in 0..3 {
        let n = &restored.nodes[i];
        let out = std::process::Command::new(quorate_tests::quorate_bin())
            .args(["snapshot", "restore"])
            .arg(&file)
            .args(["--data-dir", n.data_dir.to_str().unwrap(), "--name", &n.name])
            .args(["--initial-advertise-peer-urls", &n.peer_url(), "--initial-cluster", &restored.initial_cluster])
            .output()
            .unwrap();
        assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
    }
    for i in 0..3 {
        restored.spawn(i).unwrap();
    }
    let leader = restored.wait_leader(Duration::from_secs(20)).expect("the restored cluster elects");
    let follower = (leader + 1) % 3;
    let eps: Vec<String> = restored.nodes.iter().map(|n| n.endpoint()).collect();
    // Auth is still on, with the users of the backup.
    let deadline = Instant::now() + Duration::from_secs(20);
    let token = loop {
        let mut auth = pb::auth_client::AuthClient::new(channel(&eps[follower]).await);
        let req = pb::AuthenticateRequest { name: "alice".into(), password: "alicepw".into() };
        match auth.authenticate(req).await {
            Ok(r) => break r.into_inner().token,
            Err(e) => assert!(Instant::now() < deadline, "alice cannot log in at a follower: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for ep in &eps {
        put(ep, Some(&token), "app/restored").await.unwrap_or_else(|e| panic!("{ep}: the follower's token: {e:?}"));
    }
    let e = put(&eps[leader], None, "app/nobody").await.expect_err("auth is off after a restore");
    assert_eq!(e.message(), "etcdserver: user name is empty");
}
