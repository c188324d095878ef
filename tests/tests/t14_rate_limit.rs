//! Per-client rate limits (issue 14 §3) on a real member: a client over its rate gets etcd's
//! `RESOURCE_EXHAUSTED` "etcdserver: too many requests" on gRPC and HTTP 429 with `Retry-After`
//! on the HTTP APIs, while another client (another source address) is served; and liveness
//! traffic (a lease keep-alive stream, heartbeats) has its own budget, so a client that spent
//! its write budget still keeps its lease alive. (That another client's latency is unchanged is
//! a benchmark's to show, not a test's.)

use std::net::IpAddr;

use quorate_api_grpc::pb::etcdserverpb as pb;
use quorate_tests::{Cluster, Flavor};

const RATE: &str = "5";

async fn kv_from(endpoint: &str, from: &str) -> pb::kv_client::KvClient<tonic::transport::Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .unwrap()
        .local_address(Some(from.parse::<IpAddr>().unwrap()))
        .connect()
        .await
        .expect("connect");
    pb::kv_client::KvClient::new(ch)
}

/// `n` puts back to back: (accepted, refused with etcd's too-many-requests).
async fn puts(kv: &mut pb::kv_client::KvClient<tonic::transport::Channel>, n: usize) -> (usize, usize) {
    let (mut ok, mut limited) = (0, 0);
    for i in 0..n {
        let req = pb::PutRequest { key: format!("k{i}").into_bytes(), value: b"v".to_vec(), ..Default::default() };
        match kv.put(req).await {
            Ok(_) => ok += 1,
            Err(s) if s.code() == tonic::Code::ResourceExhausted && s.message() == "etcdserver: too many requests" => {
                limited += 1
            }
            Err(s) => panic!("unexpected refusal: {s:?}"),
        }
    }
    (ok, limited)
}

#[test]
fn a_client_over_its_rate_is_refused_and_another_is_served() {
    let c = Cluster::start_with(
        Flavor::Quorate,
        1,
        &["--rate-limit-rps", RATE, "--rate-limit-burst", RATE, "--rate-limit-liveness-rps", RATE],
    )
    .expect("cluster");
    let endpoint = c.nodes[0].endpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut noisy = kv_from(&endpoint, "127.0.0.1").await;
        let started = std::time::Instant::now();
        let (ok, limited) = puts(&mut noisy, 40).await;
        let allowed = 5.0 + 5.0 * started.elapsed().as_secs_f64() + 1.0;
        assert!(limited > 0, "40 puts at once from one client, none refused");
        assert!((ok as f64) <= allowed, "{ok} accepted, the bucket allows {allowed:.1}");

        // Another source address has its own bucket.
        let mut quiet = kv_from(&endpoint, "127.0.0.2").await;
        let (ok, limited) = puts(&mut quiet, 3).await;
        assert_eq!((ok, limited), (3, 0), "another client is served while the first is limited");

        // The noisy client's write budget is spent, its liveness budget is not: a lease granted
        // for it elsewhere is kept alive over its own connection.
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}")).unwrap();
        let mut grant = pb::lease_client::LeaseClient::new(
            ch.clone().local_address(Some("127.0.0.3".parse().unwrap())).connect().await.unwrap(),
        );
        let lease = grant.lease_grant(pb::LeaseGrantRequest { ttl: 30, id: 0 }).await.unwrap().into_inner().id;
        let (ok, limited) = puts(&mut noisy, 10).await;
        assert!(limited > 0, "the noisy client is still over its write rate ({ok} accepted)");
        let mut lease_client = pb::lease_client::LeaseClient::new(
            ch.local_address(Some("127.0.0.1".parse().unwrap())).connect().await.unwrap(),
        );
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(pb::LeaseKeepAliveRequest { id: lease }).await.unwrap();
        let mut answers = lease_client
            .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("a keep-alive stream opened from the client over its write rate")
            .into_inner();
        let answer = answers.message().await.expect("keep-alive answered").expect("an answer");
        assert_eq!(answer.id, lease);
        assert!(answer.ttl > 0);
    });
}

#[test]
fn the_http_apis_answer_429_with_retry_after() {
    let c = Cluster::start_with(Flavor::Quorate, 1, &["--rate-limit-rps", RATE, "--rate-limit-burst", RATE])
        .expect("cluster");
    let replies: Vec<_> =
        (0..30).map(|_| quorate_tests::http(&c.nodes[0], "GET", "/v1/catalog/services", None).unwrap()).collect();
    let limited: Vec<_> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(!limited.is_empty(), "30 requests at once, none limited");
    let r = limited[0];
    assert!(r.header("retry-after").and_then(|v| v.parse::<u64>().ok()).is_some_and(|s| s >= 1), "{:?}", r);
    assert_eq!(r.json()["error"]["code"], "too_many_requests", "{}", r.body);
    // /health and /metrics are not client APIs: never limited.
    for _ in 0..10 {
        assert_eq!(quorate_tests::http(&c.nodes[0], "GET", "/metrics", None).unwrap().status, 200);
    }
}

/// One stream holds at most `--max-watchers-per-stream` watchers: a create past it is cancelled
/// with the reason; another stream has its own allowance.
#[test]
fn a_stream_holds_at_most_its_watchers() {
    let c = Cluster::start_with(Flavor::Quorate, 1, &["--max-watchers-per-stream", "3"]).expect("cluster");
    let endpoint = c.nodes[0].endpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = etcd_client::Client::connect([endpoint], None).await.expect("connect");
        let mut stream = client.watch("w0", None).await.expect("watch");
        for key in ["w1", "w2", "w3"] {
            stream.watch(key, None).await.expect("another watch on the stream");
        }
        let mut created = Vec::new();
        while created.len() < 4 {
            let r = stream.message().await.expect("answer").expect("a response");
            if r.created() {
                created.push((r.watch_id(), r.canceled(), r.cancel_reason().to_string()));
            }
        }
        let refused: Vec<_> = created.iter().filter(|(_, canceled, _)| *canceled).collect();
        assert_eq!(refused.len(), 1, "{created:?}");
        assert!(refused[0].2.contains("too many watchers on this stream"), "{created:?}");

        let mut other = client.watch("v0", None).await.expect("another stream has its own allowance");
        let r = other.message().await.expect("answer").expect("a response");
        assert!(r.created() && !r.canceled(), "{r:?}");
    });
}

/// With auth on, the bucket is the user's, not the address's: two users behind one address (a
/// NAT, a sidecar) are limited apart, so one of them flooding leaves the other served.
#[test]
fn with_auth_on_each_user_has_its_own_bucket_whatever_its_address() {
    let c = Cluster::start_with(Flavor::Quorate, 1, &["--rate-limit-rps", RATE, "--rate-limit-burst", RATE])
        .expect("cluster");
    let endpoint = c.nodes[0].endpoint();
    quorate_tests::etcdctl_steps(
        &endpoint,
        &[
            &["user", "add", "root:rootpw"][..],
            &["user", "grant-role", "root", "root"],
            &["role", "add", "k"],
            &["role", "grant-permission", "k", "--prefix=true", "readwrite", "k"],
            &["user", "add", "alice:alicepw"],
            &["user", "grant-role", "alice", "k"],
            &["user", "add", "bob:bobpw"],
            &["user", "grant-role", "bob", "k"],
            &["auth", "enable"],
        ],
    );
    // The setup spent this address's bucket; let it refill before the users' turn.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let token = |name: &'static str, pw: &'static str| {
            let endpoint = endpoint.clone();
            async move {
                let ch = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                let mut auth = pb::auth_client::AuthClient::new(ch);
                let req = pb::AuthenticateRequest { name: name.into(), password: pw.into() };
                auth.authenticate(req).await.expect("authenticate").into_inner().token
            }
        };
        let (alice, bob) = (token("alice", "alicepw").await, token("bob", "bobpw").await);
        let kv = kv_from(&endpoint, "127.0.0.1").await;
        let put_as = |t: String, i: usize| {
            let mut req = tonic::Request::new(pb::PutRequest {
                key: format!("k{i}").into_bytes(),
                value: b"v".to_vec(),
                ..Default::default()
            });
            req.metadata_mut().insert(quorate_api_grpc::TOKEN_METADATA, t.parse().unwrap());
            let mut kv = kv.clone();
            async move { kv.put(req).await }
        };
        let mut limited = 0;
        for i in 0..40 {
            match put_as(alice.clone(), i).await {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::ResourceExhausted => limited += 1,
                Err(s) => panic!("alice: {s:?}"),
            }
        }
        assert!(limited > 0, "40 puts at once from alice, none refused");
        // bob, from the same address and connection, is served at once.
        for i in 0..3 {
            put_as(bob.clone(), i).await.expect("bob was limited by alice's flood");
        }
    });
}
