//! TLS (issue 14 §1) on real members, with certificates made by the test: the real `etcdctl`
//! over TLS and mutual TLS, a client without a certificate (or with one of another CA)
//! refused under `--client-cert-auth`, the HTTP port over TLS (curl), certificate rotation
//! without a restart, start-up errors; and a 3-member cluster with peer mutual TLS, where a
//! connection without a valid certificate sends a Raft vote with a huge term and changes
//! nothing, and a member with a certificate of another CA cannot join while one with a valid
//! certificate can.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quorate_tests::{etcdctl, free_port, quorate_bin, Cluster, Flavor, Reaped};
use quorate_tls::testing::{Ca, Issued};

/// etcdctl's TLS flags.
fn tls_flags(ca: &Path, client: Option<&Issued>) -> Vec<String> {
    let mut flags =
        vec![format!("--cacert={}", ca.display()), "--dial-timeout=2s".into(), "--command-timeout=3s".into()];
    if let Some(c) = client {
        flags.push(format!("--cert={}", c.cert.display()));
        flags.push(format!("--key={}", c.key.display()));
    }
    flags
}

fn ctl(endpoint: &str, flags: &[String], args: &[&str]) -> quorate_tests::Output {
    let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
    all.extend_from_slice(args);
    etcdctl(endpoint, &all)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Member {
    child: Reaped,
    client: String,
    http: String,
    log: PathBuf,
}

/// A single-member cluster with an `https://` client URL and an `https://` HTTP port.
fn start(dir: &Path, data: &str, client_port: u16, http_port: u16, tls: &[String]) -> Member {
    let log = dir.join(format!("{data}.log"));
    let peer = format!("http://127.0.0.1:{}", free_port());
    let client = format!("https://127.0.0.1:{client_port}");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(quorate_bin())
        .arg("server")
        .args(["--name", "m1", "--data-dir", dir.join(data).to_str().unwrap()])
        .args(["--listen-client-urls", &client, "--listen-peer-urls", &peer])
        .args(["--listen-http", &format!("https://127.0.0.1:{http_port}")])
        .args(tls)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    Member { child: Reaped(child), client, http: format!("https://127.0.0.1:{http_port}"), log }
}

/// `curl` over TLS to the HTTP port: (ok, body).
fn curl(url: &str, ca: &Path, client: Option<&Issued>) -> (bool, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "3", "--fail", "--cacert", ca.to_str().unwrap()]);
    if let Some(c) = client {
        cmd.args(["--cert", c.cert.to_str().unwrap(), "--key", c.key.to_str().unwrap()]);
    }
    let out = cmd.arg(url).output().expect("curl is installed (scripts/test.sh installs it)");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn etcdctl_over_tls_and_mutual_tls_a_client_without_a_valid_certificate_refused_and_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, rogue, next) = (Ca::new("ca"), Ca::new("rogue"), Ca::new("next"));
    let ca_pem = ca.write(d, "ca");
    let next_pem = next.write(d, "next-ca");
    let server = ca.issue_files(d, "server", "m1");
    let client = ca.issue_files(d, "client", "alice");
    let forged = rogue.issue_files(d, "forged", "alice");
    let (client_port, http_port) = (free_port(), free_port());
    let files = |auth: bool| {
        let mut f = vec![
            format!("--cert-file={}", server.cert.display()),
            format!("--key-file={}", server.key.display()),
            format!("--trusted-ca-file={}", ca_pem.display()),
        ];
        if auth {
            f.push("--client-cert-auth".into());
        }
        f
    };

    // Mutual TLS: a client certificate of the CA is required.
    let m = start(d, "data", client_port, http_port, &files(true));
    let with_cert = tls_flags(&ca_pem, Some(&client));
    wait_until("the member answers over mutual TLS", Duration::from_secs(20), || {
        ctl(&m.client, &with_cert, &["endpoint", "health"]).ok
    });
    assert!(ctl(&m.client, &with_cert, &["put", "k", "v1"]).ok);
    let got = ctl(&m.client, &with_cert, &["get", "k", "--print-value-only"]);
    assert_eq!(got.stdout.trim(), "v1", "{}", got.stderr);
    let no_cert = ctl(&m.client, &tls_flags(&ca_pem, None), &["put", "k", "intruder"]);
    assert!(!no_cert.ok, "a client without a certificate wrote under --client-cert-auth");
    let other_ca = ctl(&m.client, &tls_flags(&ca_pem, Some(&forged)), &["put", "k", "intruder"]);
    assert!(!other_ca.ok, "a client with a certificate of another CA wrote");
    let plain = etcdctl(&m.client.replace("https://", "http://"), &["--dial-timeout=2s", "put", "k", "intruder"]);
    assert!(!plain.ok, "a plaintext client wrote to a TLS port");
    let log = std::fs::read_to_string(&m.log).unwrap();
    assert!(log.contains("rejected TLS connection"), "refusals are logged:\n{log}");
    // The HTTP port over TLS, with the same rule; /health on the client port over TLS too.
    let (ok, body) = curl(&format!("{}/health", m.http), &ca_pem, Some(&client));
    assert!(ok && body.contains("\"health\":\"true\""), "{body}");
    assert!(
        !curl(&format!("{}/health", m.http), &ca_pem, None).0,
        "the HTTP port let in a client without a certificate"
    );
    let (ok, body) = curl(&format!("{}/health", m.client), &ca_pem, Some(&client));
    assert!(ok && body.contains("\"health\":\"true\""), "/health over TLS on the client port: {body}");
    // The operator's tool, with etcdctl's TLS flags: gRPC and the HTTP port, both over TLS.
    let (ca_s, cert_s, key_s) = (ca_pem.to_str().unwrap(), client.cert.to_str().unwrap(), client.key.to_str().unwrap());
    let run =
        quorate_tests::ctl(&m.client, &["status", "-w", "json", "--cacert", ca_s, "--cert", cert_s, "--key", key_s]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let row = run.json()["members"][0].clone();
    assert!(row["http_addr"].as_str().is_some_and(|a| a.starts_with("https://")), "{row:#}");
    assert!(row["error"].is_null() && row["fsync_samples"].is_u64(), "read over TLS from the HTTP port: {row:#}");
    let run = quorate_tests::ctl(&m.client, &["status", "-w", "json"]);
    assert_ne!(run.code, 0, "ctl reached an https:// endpoint without --cacert");
    assert!(
        run.stderr.contains("give --cacert") || run.stdout.contains("give --cacert"),
        "{}{}",
        run.stdout,
        run.stderr
    );
    drop(m);

    // TLS without client certificates: the server's certificate is checked, no client's asked.
    let m = start(d, "data", client_port, http_port, &files(false));
    let server_only = tls_flags(&ca_pem, None);
    wait_until("the member answers over TLS", Duration::from_secs(20), || {
        ctl(&m.client, &server_only, &["endpoint", "health"]).ok
    });
    let got = ctl(&m.client, &server_only, &["get", "k", "--print-value-only"]);
    assert_eq!(got.stdout.trim(), "v1", "the write before the restart: {}", got.stderr);
    let pid = m.child.0.id();

    // Rotation: a certificate of the next CA written over the files; new connections get it,
    // without a restart (same process).
    let (cert, key) = next.issue("m1");
    std::fs::write(&server.cert, cert).unwrap();
    std::fs::write(&server.key, key).unwrap();
    let next_only = tls_flags(&next_pem, None);
    wait_until("the rotated certificate is served", Duration::from_secs(10), || {
        ctl(&m.client, &next_only, &["put", "k", "v2"]).ok
    });
    assert!(!ctl(&m.client, &server_only, &["get", "k"]).ok, "the old certificate is still served");
    assert!(curl(&format!("{}/health", m.http), &next_pem, None).0, "the HTTP port serves the rotated certificate");
    assert_eq!(m.child.0.id(), pid);
    drop(m);

    // Start-up errors: an https:// URL without a certificate, a missing certificate file.
    let refused = |args: &[&str]| {
        let out = Command::new(quorate_bin())
            .arg("server")
            .args(["--data-dir", d.join("never").to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Port 0 (any free one): a port picked free and released could be taken by another test
    // before this member binds it, and the refusal would be about the port.
    let e = refused(&["--listen-client-urls", "https://127.0.0.1:0"]);
    assert!(e.contains("needs --cert-file and --key-file"), "{e}");
    let missing = d.join("missing.pem");
    let e = refused(&[
        "--listen-client-urls",
        "https://127.0.0.1:0",
        "--listen-peer-urls",
        "http://127.0.0.1:0",
        "--listen-http",
        "127.0.0.1:0",
        "--cert-file",
        missing.to_str().unwrap(),
        "--key-file",
        server.key.to_str().unwrap(),
    ]);
    assert!(e.contains("--cert-file") && e.contains("missing.pem"), "{e}");
    let e = refused(&[
        "--client-cert-auth",
        "--cert-file",
        "a",
        "--key-file",
        "b",
        "--listen-client-urls",
        "https://127.0.0.1:1",
    ]);
    assert!(e.contains("--client-cert-auth needs --trusted-ca-file"), "{e}");
}

/// `Peer/Vote` with a huge term through `channel`, addressed to member `to`, for candidate
/// `candidate`, saying it is from `from`.
async fn huge_vote(
    channel: tonic::transport::Channel,
    to: u64,
    from: Option<u64>,
    candidate: u64,
) -> Result<(), tonic::Status> {
    use quorate_consensus::pb::peer_client::PeerClient;
    let mut req = tonic::Request::new(quorate_consensus::vote_frame(candidate, u64::MAX / 4));
    req.metadata_mut().insert("quorate-to", format!("{to:x}").parse().unwrap());
    if let Some(from) = from {
        req.metadata_mut().insert("quorate-from", format!("{from:x}").parse().unwrap());
    }
    req.set_timeout(Duration::from_secs(3));
    tokio::time::timeout(Duration::from_secs(5), PeerClient::new(channel).vote(req))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no answer"))?
        .map(drop)
}

fn endpoint(url: &str) -> tonic::transport::Endpoint {
    tonic::transport::Endpoint::from_shared(url.to_string()).unwrap().connect_timeout(Duration::from_secs(2))
}

/// (member id, raft term, leader) as member `i` reports them.
fn status(c: &Cluster, i: usize) -> (u64, u64, u64) {
    let out = etcdctl(&c.nodes[i].endpoint(), &["endpoint", "status", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("endpoint status answers");
    let s = &v[0]["Status"];
    let field = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("endpoint status: {}", out.stdout));
    (field(&s["header"]["member_id"]), field(&s["raftTerm"]), field(&s["leader"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_mutual_tls_refuses_strangers_before_raft_and_keeps_out_a_member_of_another_ca() {
    let mut c = Cluster::unstarted(Flavor::Quorate, 3).unwrap();
    c.use_peer_tls();
    let d = c.dir().to_path_buf();
    let (ca, rogue) = (Ca::new("peer-ca"), Ca::new("rogue"));
    let ca_pem = ca.write(&d, "peer-ca");
    for i in 1..=3 {
        ca.issue_files(&d, &format!("m{i}"), &format!("m{i}"));
    }
    c.extra_args = vec![
        format!("--peer-cert-file={}/m{{n}}.pem", d.display()),
        format!("--peer-key-file={}/m{{n}}.key", d.display()),
        format!("--peer-trusted-ca-file={}", ca_pem.display()),
        "--peer-client-cert-auth".into(),
    ];
    c.start_all().unwrap();
    let leader = c.wait_leader(Duration::from_secs(10)).unwrap();
    assert!(etcdctl(&c.endpoints(), &["put", "before", "1"]).ok);
    let (_, term, leader_id) = status(&c, leader);

    // Strangers on every member's peer port: plaintext, and TLS with a certificate of another
    // CA. Each sends a vote with a huge term; none reaches Raft.
    let forged = rogue.issue_files(&d, "forged", "m1");
    let forged_files = quorate_tls::Files {
        cert: forged.cert.clone(),
        key: forged.key.clone(),
        ca: Some(ca_pem.clone()),
        flags: ["--peer-cert-file", "--peer-key-file", "--peer-trusted-ca-file"],
    };
    let forger = quorate_tls::Connector::new(forged_files).unwrap();
    let (m1, m3) = (status(&c, 0).0, status(&c, 2).0);
    for i in 0..3 {
        let (id, _, _) = status(&c, i);
        let https = c.nodes[i].peer_url();
        let plain = huge_vote(endpoint(&https.replace("https://", "http://")).connect_lazy(), id, Some(m1), m1).await;
        assert!(plain.is_err(), "a plaintext vote reached member {i}");
        let forged = huge_vote(quorate_tls::channel(&endpoint(&https), forger.clone()), id, Some(m1), m1).await;
        assert!(forged.is_err(), "a vote over a certificate of another CA reached member {i}");
    }
    // Certificates of the right CA that do not name the member they speak for. Members share a
    // host here, so these name another host: only the common name can name a member.
    let elsewhere = |name: &str, cn: &str| {
        let issued = ca.issue_files_for(&d, name, cn, &["elsewhere.example"]);
        let files =
            quorate_tls::Files { cert: issued.cert, key: issued.key, ca: Some(ca_pem.clone()), flags: ["", "", ""] };
        quorate_tls::Connector::new(files).unwrap()
    };
    let (intruder, as_m3) = (elsewhere("intruder", "intruder"), elsewhere("as-m3", "m3"));
    let follower = (leader + 1) % 3;
    let (fid, _, _) = status(&c, follower);
    let url = c.nodes[follower].peer_url();
    let vote = |via: &std::sync::Arc<quorate_tls::Connector>, from: Option<u64>, candidate: u64| {
        huge_vote(quorate_tls::channel(&endpoint(&url), via.clone()), fid, from, candidate)
    };
    let e = vote(&intruder, Some(m1), m1).await.expect_err("a certificate naming no member spoke for m1");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = vote(&intruder, None, m1).await.expect_err("a message that says nothing of its sender got in");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = vote(&as_m3, Some(m3), m1).await.expect_err("m3's certificate spoke for m1");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // A stranger (a removed member, a client certificate of the CA) speaking for itself under
    // an id no member has: no vote from it is read either.
    let e = vote(&intruder, Some(0xbad), 0xbad).await.expect_err("a stranger's vote reached Raft");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..3 {
        let (_, t, l) = status(&c, i);
        assert_eq!((t, l), (term, leader_id), "member {i}'s term or leader moved");
    }
    assert!(etcdctl(&c.endpoints(), &["put", "after", "1"]).ok, "writes go on");
    let log = c.log(leader);
    assert!(log.contains("rejected TLS connection") && log.contains("listener=\"peer\""), "{log}");

    // A control: m3's certificate speaking for m3 is read and answered by Raft (which refuses
    // a candidate with an empty log), so the refusals above are the gate's, not a malformed
    // message's.
    let answered = vote(&as_m3, Some(m3), m3).await;
    assert!(answered.is_ok(), "the control vote was not answered: {answered:?}");

    // A member whose certificate is of another CA cannot join; one with a valid one can.
    let m4 = c.new_node();
    let added = etcdctl(&c.endpoints(), &["member", "add", "m4", &format!("--peer-urls={}", c.nodes[m4].peer_url())]);
    assert!(added.ok, "{}", added.stderr);
    rogue.issue_files(&d, "m4", "m4");
    c.join(m4).unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let joined = etcdctl(&c.nodes[m4].endpoint(), &["--dial-timeout=1s", "--command-timeout=2s", "get", "before"]);
    assert!(!joined.ok || !joined.stdout.contains("before"), "a member with a certificate of another CA joined");
    c.kill(m4);
    let list = etcdctl(&c.endpoints(), &["member", "list", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let m4_id =
        v["members"].as_array().unwrap().iter().find(|m| m["peerURLs"][0] == c.nodes[m4].peer_url().as_str()).unwrap()
            ["ID"]
            .as_u64()
            .unwrap();
    assert!(etcdctl(&c.endpoints(), &["member", "remove", &format!("{m4_id:x}")]).ok);

    let m5 = c.new_node();
    let added = etcdctl(&c.endpoints(), &["member", "add", "m5", &format!("--peer-urls={}", c.nodes[m5].peer_url())]);
    assert!(added.ok, "{}", added.stderr);
    ca.issue_files(&d, "m5", "m5");
    c.join(m5).unwrap();
    let m5_endpoint = c.nodes[m5].endpoint();
    wait_until("the member with a valid certificate joins", Duration::from_secs(30), || {
        etcdctl(&m5_endpoint, &["--command-timeout=2s", "get", "after", "--print-value-only"]).stdout.trim() == "1"
    });
}

/// Under `--client-cert-auth`, a request without a token is the user its certificate's common
/// name names (etcd's rule): with auth on, alice's certificate writes under her prefix and
/// nowhere else, root's certificate may do what root may, all without `--user`.
#[test]
fn a_client_certificates_common_name_is_its_user_under_client_cert_auth() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("ca");
    let ca_pem = ca.write(d, "ca");
    let server = ca.issue_files(d, "server", "m1");
    let (root, alice) = (ca.issue_files(d, "root", "root"), ca.issue_files(d, "alice", "alice"));
    let files = vec![
        format!("--cert-file={}", server.cert.display()),
        format!("--key-file={}", server.key.display()),
        format!("--trusted-ca-file={}", ca_pem.display()),
        "--client-cert-auth".into(),
    ];
    let m = start(d, "data", free_port(), free_port(), &files);
    let (as_root, as_alice) = (tls_flags(&ca_pem, Some(&root)), tls_flags(&ca_pem, Some(&alice)));
    wait_until("the member answers over mutual TLS", Duration::from_secs(20), || {
        ctl(&m.client, &as_root, &["endpoint", "health"]).ok
    });
    for args in [
        &["user", "add", "root:unused-password"][..],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "app"],
        &["role", "grant-permission", "app", "--prefix=true", "readwrite", "app/"],
        &["user", "add", "alice:unused-password"],
        &["user", "grant-role", "alice", "app"],
        &["auth", "enable"],
    ] {
        let out = ctl(&m.client, &as_root, args);
        assert!(out.ok, "{args:?}: {}", out.stderr);
    }
    let out = ctl(&m.client, &as_alice, &["put", "app/x", "1"]);
    assert!(out.ok, "alice's certificate under her prefix: {}", out.stderr);
    let out = ctl(&m.client, &as_alice, &["put", "other", "1"]);
    assert!(!out.ok && out.stderr.contains("etcdserver: permission denied"), "{}", out.stderr);
    let out = ctl(&m.client, &as_alice, &["endpoint", "hashkv"]);
    assert!(!out.ok && out.stderr.contains("permission denied"), "alice's certificate hashed: {}", out.stdout);
    let out = ctl(&m.client, &as_root, &["endpoint", "hashkv"]);
    assert!(out.ok, "root's certificate is root: {}", out.stderr);
    let out = ctl(&m.client, &as_root, &["put", "other", "1"]);
    assert!(out.ok, "{}", out.stderr);
}
