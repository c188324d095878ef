//! Issue 12, metrics: what an etcd operator's monitoring (etcd-mixin's alerts and dashboard)
//! scrapes is there under etcd's names, types and labels, with etcd's meaning, on every client
//! URL (beside gRPC on the same port), on `--listen-http` and on `--listen-metrics-urls`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use quorate_tests::{etcdctl, free_port, http_at, Cluster, Flavor};

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a value that should move may take to show it.
const SETTLE: Duration = Duration::from_secs(15);

/// One sample: its name as exposed, its labels and its value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed scrape: each family's type (`# TYPE`), and every sample.
#[derive(Debug)]
struct Scrape {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((name, after)) = rest.split_once("=\"") {
        let end = after.find('"').expect("closing quote");
        labels.insert(name.trim_start_matches(',').trim().to_string(), after[..end].to_string());
        rest = &after[end + 1..];
    }
    labels
}

fn parse(body: &str) -> Scrape {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in body.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let (name, kind) = t.split_once(' ').expect("TYPE name kind");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample value");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, parse_labels(l.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        samples.push(Sample { name: name.to_string(), labels, value: value.parse().expect("numeric value") });
    }
    Scrape { types, samples }
}

impl Scrape {
    /// The type of the family a sample name belongs to (OpenMetrics types a counter under its
    /// name without `_total`, a histogram under its name without `_bucket`/`_sum`/`_count`).
    fn type_of(&self, sample: &str) -> Option<&str> {
        if let Some(t) = self.types.get(sample) {
            return Some(t);
        }
        ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| sample.strip_suffix(s))
            .find_map(|family| self.types.get(family))
            .map(String::as_str)
    }

    fn all(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The value of the one sample `name` whose labels include `want`.
    fn value(&self, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .map(|s| s.value)
    }

    fn get(&self, name: &str) -> f64 {
        self.value(name, &[]).unwrap_or_else(|| panic!("no sample {name}"))
    }
}

async fn scrape(addr: &str) -> Scrape {
    let reply = http_at(addr, "GET", "/metrics", None, SCRAPE_TIMEOUT).await.expect("scrape");
    assert_eq!(reply.status, 200, "GET {addr}/metrics: {}", reply.body);
    parse(&reply.body)
}

/// A scrape as Prometheus asks for it (OpenMetrics preferred): the content type and the body.
async fn scrape_openmetrics(addr: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!(
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).to_string())
    };
    let reply = tokio::time::timeout(SCRAPE_TIMEOUT, exchange).await.expect("scrape in time").expect("scrape");
    let (head, body) = reply.split_once("\r\n\r\n").expect("HTTP reply");
    let content_type = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    (content_type, body.to_string())
}

/// One HTTP/1.1 request with a binary body to `addr`: the status and the body.
async fn http1_exchange(addr: &str, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nTE: trailers\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).to_string())
    };
    let reply = tokio::time::timeout(SCRAPE_TIMEOUT, exchange).await.expect("answer in time").expect("exchange");
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, body.to_string())
}

/// Every etcd metric that etcd-mixin's alerts and dashboard use (and the others issue 12
/// names), as the sample name etcd exposes, and the family's type.
const ETCD_METRICS: &[(&str, &str)] = &[
    ("etcd_server_has_leader", "gauge"),
    ("etcd_server_is_leader", "gauge"),
    ("etcd_server_leader_changes_seen_total", "counter"),
    ("etcd_server_proposals_committed_total", "gauge"),
    ("etcd_server_proposals_applied_total", "gauge"),
    ("etcd_server_proposals_pending", "gauge"),
    ("etcd_server_proposals_failed_total", "counter"),
    ("etcd_disk_wal_fsync_duration_seconds_bucket", "histogram"),
    ("etcd_disk_wal_fsync_duration_seconds_count", "histogram"),
    ("etcd_disk_wal_fsync_duration_seconds_sum", "histogram"),
    ("etcd_disk_backend_commit_duration_seconds_bucket", "histogram"),
    ("etcd_network_peer_round_trip_time_seconds_bucket", "histogram"),
    ("etcd_network_peer_sent_failures_total", "counter"),
    ("etcd_mvcc_db_total_size_in_bytes", "gauge"),
    ("etcd_server_quota_backend_bytes", "gauge"),
    ("etcd_debugging_mvcc_keys_total", "gauge"),
    ("grpc_server_started_total", "counter"),
    ("grpc_server_handled_total", "counter"),
    ("grpc_server_handling_seconds_bucket", "histogram"),
    ("process_resident_memory_bytes", "gauge"),
    ("process_cpu_seconds_total", "counter"),
    ("process_open_fds", "gauge"),
    ("process_max_fds", "gauge"),
    ("process_virtual_memory_bytes", "gauge"),
    ("process_start_time_seconds", "gauge"),
];

fn assert_etcd_names(s: &Scrape, where_: &str) {
    for (name, kind) in ETCD_METRICS {
        assert!(!s.all(name).is_empty(), "{where_}: no sample {name}");
        assert_eq!(s.type_of(name), Some(*kind), "{where_}: type of {name}");
    }
}

/// The `le` bounds of a histogram's buckets (without `+Inf`), for one label set.
fn buckets(s: &Scrape, name: &str, want: &[(&str, &str)]) -> Vec<f64> {
    s.samples
        .iter()
        .filter(|x| x.name == name && want.iter().all(|(k, v)| x.labels.get(*k).map(String::as_str) == Some(*v)))
        .filter_map(|x| x.labels.get("le"))
        .filter(|le| *le != "+Inf")
        .map(|le| le.parse().unwrap())
        .collect()
}

fn exponential(start: f64, factor: f64, n: i32) -> Vec<f64> {
    (0..n).map(|i| start * factor.powi(i)).collect()
}

fn close(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-9 * y.abs().max(1.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_operators_metrics_are_served_beside_grpc_and_mean_what_they_mean_in_etcd() {
    let mut cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");

    eprintln!("restart m3 with an extra --listen-metrics-urls listener");
    let metrics_port = free_port();
    cluster.stop(2);
    cluster.extra_args = vec!["--listen-metrics-urls".into(), format!("http://127.0.0.1:{metrics_port}")];
    cluster.spawn(2).expect("respawn m3");
    cluster.wait_ready(Duration::from_secs(20)).expect("ready after restart");
    let metrics_addr = format!("127.0.0.1:{metrics_port}");

    let clients: Vec<String> = cluster.nodes.iter().map(|n| n.endpoint()).collect();
    let https: Vec<String> = cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.http_port)).collect();

    eprintln!("wait until every member has probed its peers (once a second)");
    let deadline = Instant::now() + SETTLE;
    for addr in &clients {
        while scrape(addr).await.all("etcd_network_peer_round_trip_time_seconds_count").len() < 2 {
            assert!(Instant::now() < deadline, "{addr}: no round trips to both peers");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    eprintln!("every member's client port answers etcdctl and GET /metrics alike");
    let out = etcdctl(&clients[0], &["put", "metrics/first", "v"]);
    assert!(out.ok, "etcdctl put on the client port: {}", out.stderr);
    for (i, addr) in clients.iter().enumerate() {
        let s = scrape(addr).await;
        assert_etcd_names(&s, &format!("client URL of m{}", i + 1));
        let health = http_at(addr, "GET", "/health", None, SCRAPE_TIMEOUT).await.expect("health");
        assert_eq!(health.status, 200, "client URL /health: {}", health.body);
        assert!(health.body.contains("\"health\":\"true\""), "{}", health.body);
    }
    let out = etcdctl(&clients.join(","), &["endpoint", "status", "-w", "json"]);
    assert!(out.ok, "etcdctl endpoint status after scrapes: {}", out.stderr);

    eprintln!("HTTP/1 on the client port reaches /metrics and /health only: a gRPC Put framed over HTTP/1.1 is refused, not applied");
    // PutRequest { key: "metrics/http1", value: "v" } in one gRPC frame.
    let mut put = vec![0u8, 0, 0, 0, 18, 0x0a, 13];
    put.extend_from_slice(b"metrics/http1");
    put.extend_from_slice(&[0x12, 1, b'v']);
    let (status, body) = http1_exchange(&clients[0], "POST", "/etcdserverpb.KV/Put", "application/grpc", &put).await;
    assert_eq!(status, 404, "gRPC over HTTP/1.1: {body}");
    assert!(body.starts_with("{\"error\""), "a JSON error: {body}");
    let (status, body) = http1_exchange(&clients[0], "GET", "/v3/kv/range", "application/json", b"").await;
    assert_eq!(status, 404, "an unknown HTTP/1 path: {body}");
    let out = etcdctl(&clients[0], &["get", "metrics/http1", "--print-value-only"]);
    assert!(out.ok && out.stdout.trim().is_empty(), "the Put sent over HTTP/1.1 was applied: {}", out.stdout);

    eprintln!("--listen-http and --listen-metrics-urls serve the same names; the latter nothing else");
    for (i, addr) in https.iter().enumerate() {
        assert_etcd_names(&scrape(addr).await, &format!("--listen-http of m{}", i + 1));
    }
    assert_etcd_names(&scrape(&metrics_addr).await, "--listen-metrics-urls of m3");
    let health = http_at(&metrics_addr, "GET", "/health", None, SCRAPE_TIMEOUT).await.expect("health");
    assert_eq!(health.status, 200, "metrics URL /health: {}", health.body);
    let version = http_at(&metrics_addr, "GET", "/version", None, SCRAPE_TIMEOUT).await.expect("version");
    assert_eq!(version.status, 404, "a metrics URL serves only /metrics and /health");

    eprintln!("plain scrapes get the classic text format (counters typed as x_total), Prometheus gets OpenMetrics");
    let classic = http_at(&clients[0], "GET", "/metrics", None, SCRAPE_TIMEOUT).await.expect("scrape");
    assert!(classic.header("content-type").is_some_and(|t| t.starts_with("text/plain")), "{:?}", classic.headers);
    assert!(classic.body.contains("# TYPE etcd_server_proposals_failed_total counter\n"), "classic counter TYPE");
    assert!(!classic.body.contains("# EOF"));
    let (content_type, om) = scrape_openmetrics(&clients[0]).await;
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    assert!(om.contains("# TYPE etcd_server_proposals_failed counter\n"), "OpenMetrics counter TYPE");
    assert!(om.trim_end().ends_with("# EOF"));
    assert_etcd_names(&parse(&om), "OpenMetrics scrape of m1");

    eprintln!("histograms have etcd's buckets");
    let s = scrape(&clients[0]).await;
    assert!(
        close(&buckets(&s, "etcd_disk_wal_fsync_duration_seconds_bucket", &[]), &exponential(0.001, 2.0, 14)),
        "fsync buckets"
    );
    assert!(
        close(&buckets(&s, "etcd_disk_backend_commit_duration_seconds_bucket", &[]), &exponential(0.001, 2.0, 14)),
        "backend commit buckets"
    );

    eprintln!("exactly one member says it leads, and every member knows a leader");
    let deadline = Instant::now() + SETTLE;
    let ids = loop {
        let mut leaders = 0.0;
        let mut has = 0.0;
        let mut ids = Vec::new();
        for addr in &clients {
            let s = scrape(addr).await;
            leaders += s.get("etcd_server_is_leader");
            has += s.get("etcd_server_has_leader");
            ids.push(s.all("etcd_server_id")[0].labels["server_id"].clone());
        }
        if leaders == 1.0 && has == 3.0 {
            break ids;
        }
        assert!(Instant::now() < deadline, "is_leader sums to {leaders}, has_leader to {has}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    eprintln!("puts move committed and applied proposals, fsyncs and gRPC's handled Put/OK");
    let before: Vec<Scrape> = futures_join(&clients).await;
    for i in 0..20 {
        let out = etcdctl(&clients[0], &["put", &format!("metrics/k{i}"), "v"]);
        assert!(out.ok, "put {i}: {}", out.stderr);
    }
    let deadline = Instant::now() + SETTLE;
    loop {
        let after = futures_join(&clients).await;
        let grew = before.iter().zip(&after).all(|(b, a)| {
            a.get("etcd_server_proposals_committed_total") >= b.get("etcd_server_proposals_committed_total") + 20.0
                && a.get("etcd_server_proposals_applied_total") >= b.get("etcd_server_proposals_applied_total") + 20.0
                && a.get("etcd_disk_wal_fsync_duration_seconds_count")
                    > b.get("etcd_disk_wal_fsync_duration_seconds_count")
        });
        if grew {
            let puts_ok = after[0]
                .value(
                    "grpc_server_handled_total",
                    &[
                        ("grpc_type", "unary"),
                        ("grpc_service", "etcdserverpb.KV"),
                        ("grpc_method", "Put"),
                        ("grpc_code", "OK"),
                    ],
                )
                .expect("grpc_server_handled_total for Put/OK");
            assert!(puts_ok >= 21.0, "handled Put/OK on m1: {puts_ok}");
            let started = after[0]
                .value("grpc_server_started_total", &[("grpc_service", "etcdserverpb.KV"), ("grpc_method", "Put")])
                .expect("grpc_server_started_total for Put");
            assert!(started >= puts_ok, "started {started} < handled {puts_ok}");
            for a in &after {
                assert!(a.get("etcd_debugging_mvcc_keys_total") >= 21.0);
                assert!(a.get("etcd_mvcc_db_total_size_in_bytes") > 0.0);
                assert_eq!(a.get("etcd_server_quota_backend_bytes"), 2.0 * 1024.0 * 1024.0 * 1024.0);
                assert!(a.get("etcd_server_leader_changes_seen_total") >= 1.0);
                assert!(a.get("process_resident_memory_bytes") > 1e6);
                assert!(a.get("process_open_fds") > 0.0 && a.get("process_open_fds") <= a.get("process_max_fds"));
            }
            break;
        }
        assert!(Instant::now() < deadline, "proposals or fsyncs did not grow after 20 puts");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    eprintln!("quorate's own: an election was won, the leader's lease clock runs and expires an abandoned lease");
    // A leader elected a moment ago (the restart above, or a loaded machine, can cause an
    // election) promotes its lease clock once it has committed in its term: wait for that.
    let deadline = Instant::now() + SETTLE;
    let (leader, all) = loop {
        let leader = cluster.wait_leader(SETTLE).expect("leader");
        let all = futures_join(&clients).await;
        if all[leader].get("quorate_lease_clock_promotions_total") >= 1.0 {
            break (leader, all);
        }
        assert!(Instant::now() < deadline, "the leader's lease clock was never promoted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let won: f64 = all.iter().map(|s| s.get("quorate_raft_elections_won_total")).sum();
    assert!(won >= 1.0, "elections won across the cluster: {won}");
    for s in &all {
        assert_eq!(s.type_of("quorate_raft_apply_lag_entries"), Some("gauge"));
        for state in ["passing", "warning", "critical", "suspect"] {
            assert!(s.value("quorate_registry_instances", &[("state", state)]).is_some(), "instances {state}");
        }
    }
    let reply = http_at(
        &https[0],
        "PUT",
        "/v1/agent/service/register",
        Some(r#"{"ID":"metrics-1","Name":"metrics","Address":"127.0.0.1","Port":9,"Check":{"TTL":"600s"}}"#),
        SCRAPE_TIMEOUT,
    )
    .await
    .expect("register");
    assert_eq!(reply.status, 200, "register: {}", reply.body);
    let deadline = Instant::now() + SETTLE;
    loop {
        let counted = futures_join(&clients)
            .await
            .iter()
            .all(|s| s.all("quorate_registry_instances").iter().map(|x| x.value).sum::<f64>() == 1.0);
        if counted {
            break;
        }
        assert!(Instant::now() < deadline, "the registered instance is not counted on every member");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let expired_before = all[leader].get("quorate_leases_expired_total");
    let out = etcdctl(&clients[leader], &["lease", "grant", "2"]);
    assert!(out.ok, "lease grant: {}", out.stderr);
    let deadline = Instant::now() + SETTLE;
    while scrape(&clients[leader]).await.get("quorate_leases_expired_total") < expired_before + 1.0 {
        assert!(Instant::now() < deadline, "the abandoned lease was not expired by the leader");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    eprintln!("a fenced put whose lock is not held is refused, and every member counts the refusal");
    let before: Vec<f64> = futures_join(&clients)
        .await
        .iter()
        .map(|s| s.value("quorate_fencing_refusals_total", &[("kind", "token")]).unwrap_or(0.0))
        .collect();
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", clients[0]))
        .unwrap()
        .connect()
        .await
        .expect("grpc channel");
    let mut kv = quorate_api_grpc::pb::etcdserverpb::kv_client::KvClient::new(ch);
    let mut put = tonic::Request::new(quorate_api_grpc::pb::etcdserverpb::PutRequest {
        key: b"metrics/fenced".to_vec(),
        value: b"v".to_vec(),
        ..Default::default()
    });
    put.metadata_mut().insert(quorate_api_grpc::FENCE_HEADER, "metrics/no-such-lock@1".parse().unwrap());
    let refused = kv.put(put).await.expect_err("a put fenced by a lock nobody holds is refused");
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = futures_join(&clients).await;
        let counted = now
            .iter()
            .zip(&before)
            .all(|(s, b)| s.value("quorate_fencing_refusals_total", &[("kind", "token")]).unwrap_or(0.0) >= b + 1.0);
        if counted {
            let code = format!("{:?}", refused.code());
            let handled = now[0].value(
                "grpc_server_handled_total",
                &[("grpc_service", "etcdserverpb.KV"), ("grpc_method", "Put"), ("grpc_code", code.as_str())],
            );
            assert!(handled.is_some_and(|n| n >= 1.0), "handled Put with grpc_code={code}: {handled:?}");
            break;
        }
        assert!(Instant::now() < deadline, "fencing refusal not counted on every member");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    eprintln!("the leader measures a round trip to each peer, labelled To=<peer id>, with etcd's buckets");
    let leader = cluster.wait_leader(SETTLE).expect("leader");
    let s = scrape(&clients[leader]).await;
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| *i != leader) {
        let n = s
            .value("etcd_network_peer_round_trip_time_seconds_count", &[("To", id)])
            .unwrap_or_else(|| panic!("no round trip to m{} ({id}) on the leader", i + 1));
        assert!(n > 0.0, "round trips to m{}: {n}", i + 1);
        assert!(
            close(
                &buckets(&s, "etcd_network_peer_round_trip_time_seconds_bucket", &[("To", id)]),
                &exponential(0.0001, 2.0, 16)
            ),
            "peer round-trip buckets"
        );
        assert!(s.value("etcd_network_peer_sent_failures_total", &[("To", id)]).is_some(), "sent failures to {id}");
        // One host, one clock: the measured offset is within the probe's error, far below 1 s.
        let offset = s.value("quorate_network_peer_clock_offset_seconds", &[("To", id)]).expect("clock offset");
        assert!(offset.abs() < 1.0, "clock offset to m{}: {offset} s", i + 1);
    }
    let to: Vec<&String> =
        s.all("etcd_network_peer_round_trip_time_seconds_count").iter().map(|x| &x.labels["To"]).collect();
    assert!(!to.contains(&&ids[leader]), "no round trip to itself: {to:?}");

    eprintln!("kill two members: the survivor reports no leader, and /health says so");
    let survivor = (leader + 1) % 3;
    for i in (0..3).filter(|i| *i != survivor) {
        cluster.kill(i);
    }
    let deadline = Instant::now() + SETTLE;
    loop {
        let s = scrape(&clients[survivor]).await;
        if s.get("etcd_server_has_leader") == 0.0 {
            assert_eq!(s.get("etcd_server_is_leader"), 0.0);
            let failures: f64 = s.all("etcd_network_peer_sent_failures_total").iter().map(|x| x.value).sum();
            assert!(failures > 0.0, "sends to the dead members failed");
            break;
        }
        assert!(Instant::now() < deadline, "survivor still reports a leader");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let health = http_at(&clients[survivor], "GET", "/health", None, SCRAPE_TIMEOUT).await.expect("health");
    assert_eq!(health.status, 503, "health without quorum: {}", health.body);
}

async fn futures_join(addrs: &[String]) -> Vec<Scrape> {
    let mut out = Vec::new();
    for a in addrs {
        out.push(scrape(a).await);
    }
    out
}

/// libfaketime, as Debian's `faketime` package installs it.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_member_measures_its_peers_wall_clock_offset() {
    assert!(std::path::Path::new(LIBFAKETIME).exists(), "{LIBFAKETIME} missing: apt-get install faketime");
    let mut cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let clients: Vec<String> = cluster.nodes.iter().map(|n| n.endpoint()).collect();

    eprintln!("restart m3 with its wall clock 30 s ahead (monotonic clock untouched)");
    cluster.stop(2);
    cluster.nodes[2].env = vec![
        ("LD_PRELOAD".into(), LIBFAKETIME.into()),
        ("FAKETIME".into(), "+30s".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ];
    cluster.spawn(2).expect("respawn under faketime");
    cluster.wait_ready(Duration::from_secs(20)).expect("ready");
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for addr in &clients {
            ids.push(scrape(addr).await.all("etcd_server_id")[0].labels["server_id"].clone());
        }
        ids
    };

    eprintln!("m1 and m2 see m3 30 s ahead; m3 sees them 30 s behind; m1 and m2 agree");
    let deadline = Instant::now() + SETTLE;
    loop {
        let mut seen = Vec::new();
        for (i, addr) in clients.iter().enumerate() {
            let s = scrape(addr).await;
            for (j, id) in ids.iter().enumerate().filter(|(j, _)| *j != i) {
                seen.push((i, j, s.value("quorate_network_peer_clock_offset_seconds", &[("To", id)])));
            }
        }
        let right = seen.iter().all(|(i, j, offset)| {
            let want = match (*i, *j) {
                (_, 2) => 30.0,
                (2, _) => -30.0,
                _ => 0.0,
            };
            offset.is_some_and(|o| (o - want).abs() < 2.0)
        });
        if right {
            break;
        }
        assert!(Instant::now() < deadline, "offsets (from, to, seconds): {seen:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Registry instances by state from the registry itself (member `endpoint`'s own state, a
/// serializable read of the records the API keeps under `/quorate/registry/`).
async fn registry_states(endpoint: &str) -> BTreeMap<String, f64> {
    let mut client = etcd_client::Client::connect([endpoint], None).await.expect("etcd client");
    let opts = etcd_client::GetOptions::new().with_prefix().with_serializable();
    let resp = client.get("/quorate/registry/", Some(opts)).await.expect("range the registry");
    let mut states: BTreeMap<String, f64> =
        ["passing", "warning", "critical", "suspect"].iter().map(|s| (s.to_string(), 0.0)).collect();
    for kv in resp.kvs() {
        let i: serde_json::Value = serde_json::from_slice(kv.value()).expect("instance JSON");
        let state = if i["suspect"] == true { "suspect" } else { i["health"].as_str().expect("health") };
        *states.get_mut(state).expect("a known state") += 1.0;
    }
    states
}

fn exported_states(s: &Scrape) -> BTreeMap<String, f64> {
    s.all("quorate_registry_instances").iter().map(|x| (x.labels["state"].clone(), x.value)).collect()
}

/// Every member's `quorate_registry_instances{state}` equals what its registry holds.
async fn assert_counts_match_the_registry(clients: &[String], after: &str) {
    let deadline = Instant::now() + SETTLE;
    for (i, addr) in clients.iter().enumerate() {
        loop {
            let (held, exported) = (registry_states(addr).await, exported_states(&scrape(addr).await));
            if held == exported {
                break;
            }
            assert!(Instant::now() < deadline, "after {after}, m{}: registry {held:?}, exported {exported:?}", i + 1);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A TCP endpoint on `port` (0: any) that accepts connections until its task is aborted.
async fn tcp_endpoint(port: u16) -> (u16, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind endpoint");
    let port = l.local_addr().unwrap().port();
    (port, tokio::spawn(async move { while l.accept().await.is_ok() {} }))
}

/// Wait until `check` holds for member `addr`'s scrape.
async fn until(addr: &str, what: &str, check: impl Fn(&Scrape) -> bool) {
    let deadline = Instant::now() + SETTLE;
    while !check(&scrape(addr).await) {
        assert!(Instant::now() < deadline, "{addr}: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_metrics_follow_registrations_heartbeats_checks_and_the_brake() {
    let cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let clients: Vec<String> = cluster.nodes.iter().map(|n| n.endpoint()).collect();
    let https: Vec<String> = cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.http_port)).collect();
    let put = |at: usize, path: String, body: Option<String>| {
        let addr = https[at].clone();
        async move {
            let r = http_at(&addr, "PUT", &path, body.as_deref(), SCRAPE_TIMEOUT).await.expect("PUT");
            assert!(r.status == 200 || r.status == 204, "PUT {path}: {} {}", r.status, r.body);
        }
    };
    let native = |svc: &str, id: &str| format!("/api/v1/ns/default/services/{svc}/instances/{id}");
    let checked = |zone: &str, port: u16| {
        format!(
            r#"{{"address":"127.0.0.1","port":{port},"zone":"{zone}","kind":"persistent",
                "check":{{"tcp":"127.0.0.1:{port}","interval_s":1,"timeout_s":1,"failures_before_critical":2}}}}"#
        )
    };

    eprintln!("register through every dialect: ephemeral, persistent with checks, Consul TTL, Eureka");
    for id in ["e1", "e2"] {
        put(0, native("eph", id), Some(r#"{"address":"10.0.0.1","port":80,"ttl_s":600}"#.into())).await;
    }
    put(
        1,
        native("eph", "short"),
        Some(r#"{"address":"10.0.0.1","port":80,"ttl_s":2,"heartbeat_interval_s":1}"#.into()),
    )
    .await;
    let mut zone_tasks = Vec::new();
    let mut zone_ports = Vec::new();
    for i in 0..4 {
        let (port, task) = tcp_endpoint(0).await;
        zone_tasks.push(task);
        zone_ports.push(port);
        put(i % 3, native("held", &format!("h{i}")), Some(checked("rel", port))).await;
    }
    let consul = r#"{"ID":"c1","Name":"cons","Address":"127.0.0.1","Port":9,"Check":{"TTL":"600s"}}"#;
    put(2, "/v1/agent/service/register".into(), Some(consul.into())).await;
    let eureka = r#"<instance><instanceId>eu1</instanceId><hostName>h</hostName><app>EUR</app><ipAddr>10.0.0.2</ipAddr><status>UP</status><port enabled="true">80</port><leaseInfo><durationInSecs>600</durationInSecs><renewalIntervalInSecs>10</renewalIntervalInSecs></leaseInfo></instance>"#;
    let r = http_at(&https[1], "POST", "/eureka/apps/EUR", Some(eureka), SCRAPE_TIMEOUT).await.expect("eureka");
    assert_eq!(r.status, 204, "eureka register: {}", r.body);
    assert_counts_match_the_registry(&clients, "registrations").await;

    eprintln!("a heartbeat in each dialect moves that dialect's counter on the member that took it");
    let beats = |s: &Scrape, d: &str| s.value("quorate_registry_heartbeats_total", &[("dialect", d)]).unwrap_or(-1.0);
    for (at, dialect, path) in [
        (1, "native", format!("{}/heartbeat", native("eph", "e1"))),
        (2, "consul", "/v1/agent/check/pass/service:c1".to_string()),
        (0, "eureka", "/eureka/apps/EUR/eu1".to_string()),
    ] {
        let before = beats(&scrape(&clients[at]).await, dialect);
        assert!(before >= 0.0, "m{}: no quorate_registry_heartbeats_total{{dialect={dialect}}}", at + 1);
        put(at, path, None).await;
        assert_eq!(beats(&scrape(&clients[at]).await, dialect), before + 1.0, "{dialect} heartbeat on m{}", at + 1);
    }

    eprintln!("state changes: a Consul check warns, then fails; an instance's check fails and is confirmed");
    put(0, "/v1/agent/check/warn/service:c1".into(), None).await;
    assert_counts_match_the_registry(&clients, "a warning").await;
    put(0, "/v1/agent/check/fail/service:c1".into(), None).await;
    // Only the leader probes; summed over the members, a leader change loses nothing.
    let results = |all: &[Scrape], r: &str| -> f64 {
        all.iter().map(|s| s.value("quorate_registry_check_results_total", &[("result", r)]).unwrap_or(0.0)).sum()
    };
    let confirmed = |all: &[Scrape]| -> f64 {
        all.iter()
            .map(|s| s.value("quorate_registry_check_confirmations_total", &[("outcome", "confirmed")]).unwrap_or(0.0))
            .sum()
    };
    let before = futures_join(&clients).await;
    let (critical_before, confirmed_before) = (results(&before, "critical"), confirmed(&before));
    let dead_port = free_port();
    put(1, native("solo", "dead"), Some(checked("solo", dead_port))).await;
    let deadline = Instant::now() + SETTLE;
    loop {
        let all = futures_join(&clients).await;
        if results(&all, "critical") >= critical_before + 2.0 && confirmed(&all) >= confirmed_before + 1.0 {
            assert!(results(&all, "passing") > 0.0, "the live endpoints' checks pass");
            break;
        }
        assert!(Instant::now() < deadline, "the failing check's critical results and its confirmation");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_counts_match_the_registry(&clients, "check failures").await;

    eprintln!(
        "zone rel fails its checks at once: the brake holds it; the checks recover: every member counts a release"
    );
    let released = |s: &Scrape| s.value("quorate_registry_brake_releases_total", &[("zone", "rel")]).unwrap_or(0.0);
    let mut before = Vec::new();
    for addr in &clients {
        before.push(released(&scrape(addr).await));
    }
    for t in zone_tasks.drain(..) {
        t.abort();
    }
    for (addr, before) in clients.iter().zip(&before) {
        until(addr, "brake engaged on zone rel", |s| {
            s.value("quorate_registry_brake_engaged", &[("zone", "rel")]) == Some(1.0)
        })
        .await;
        assert_eq!(released(&scrape(addr).await), *before, "{addr}: a release counted as the brake engaged");
    }
    for port in &zone_ports {
        zone_tasks.push(tcp_endpoint(*port).await.1);
    }
    for (addr, before) in clients.iter().zip(&before) {
        until(addr, "a brake release counted for zone rel", |s| released(s) == before + 1.0).await;
    }

    eprintln!("deregistrations (native, Consul, Eureka) and a lease expiry");
    let r = http_at(&https[2], "DELETE", &native("eph", "e2"), None, SCRAPE_TIMEOUT).await.expect("delete");
    assert_eq!(r.status, 200, "{}", r.body);
    put(0, "/v1/agent/service/deregister/c1".into(), None).await;
    let r = http_at(&https[1], "DELETE", "/eureka/apps/EUR/eu1", None, SCRAPE_TIMEOUT).await.expect("cancel");
    assert_eq!(r.status, 200, "{}", r.body);
    let deadline = Instant::now() + SETTLE;
    // e1 and h0..h3 pass once `short`'s lease has expired: gone, or suspect while the brake
    // holds zone default (a new leader's takeover hold, say).
    loop {
        let left = registry_states(&clients[0]).await;
        if left["passing"] == 5.0 && left["critical"] == 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the short-lived instance's lease did not expire: {left:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_counts_match_the_registry(&clients, "deregistrations and an expiry").await;
    for t in zone_tasks {
        t.abort();
    }
}
