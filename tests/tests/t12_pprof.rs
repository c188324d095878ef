//! `--enable-pprof` (etcd's flag): a member under write load answers
//! `/debug/pprof/profile?seconds=N` with a CPU profile that Go's own `go tool pprof` reads
//! (Debian's golang-go, installed by scripts/test.sh), on the client URL as etcd serves it;
//! and with a flamegraph SVG of quorate's frames on --listen-http. One profile at a time,
//! N bounded, and off by default.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;
use quorate_tests::{http_at, Cluster, Flavor};

/// Longest any one profile request may take here (a few seconds of sampling plus symbolising
/// a debug build's frames).
const PROFILE_REPLY_MAX: Duration = Duration::from_secs(60);
/// The load's own bound, should the test fail before it stops it.
const LOAD_MAX: Duration = Duration::from_secs(90);

/// An HTTP answer with its body as bytes (a profile is gzip, not text).
struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn get_bytes(addr: &str, path: &str) -> Reply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(PROFILE_REPLY_MAX, exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path} on {addr}: no answer within {PROFILE_REPLY_MAX:?}"))
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"));
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP head");
    let head = String::from_utf8_lossy(&buf[..split]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Reply { status, head, body: buf[split + 4..].to_vec() }
}

/// Puts from 8 clients until `stop` (or `LOAD_MAX`); counts what was acknowledged and what
/// failed (nothing should: the sampler's signals must not break a request).
fn start_load(
    endpoint: String,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = Client::connect([endpoint], None).await.expect("connect");
        let started = Instant::now();
        let writers = (0..8).map(|w| {
            let mut kv = client.kv_client();
            let (stop, acked, failed) = (stop.clone(), acked.clone(), failed.clone());
            async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && started.elapsed() < LOAD_MAX {
                    match kv.put(format!("load/{w}/{}", i % 500), vec![b'x'; 256], None).await {
                        Ok(_) => acked.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    i += 1;
                }
            }
        });
        futures::future::join_all(writers).await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_under_load_is_read_by_go_tool_pprof_and_drawn_as_a_flamegraph() {
    let cluster = Cluster::start_with(Flavor::Quorate, 1, &["--enable-pprof"]).expect("start a member");
    let node = &cluster.nodes[0];
    let client_addr = node.endpoint();
    let http_addr = format!("127.0.0.1:{}", node.http_port);

    eprintln!("bad durations are refused with a JSON error naming the bound");
    for path in [
        "/debug/pprof/profile?seconds=0",
        "/debug/pprof/profile?seconds=61",
        "/debug/pprof/profile?seconds=abc",
        "/debug/pprof/flamegraph?seconds=-3",
    ] {
        let r = get_bytes(&client_addr, path).await;
        assert_eq!(r.status, 400, "{path}: {}", String::from_utf8_lossy(&r.body));
        let error = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(error.contains("from 1 to 60"), "{path}: {error}");
    }

    eprintln!("put load on the member");
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let load = start_load(client_addr.clone(), stop.clone(), acked.clone(), failed.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.load(Ordering::Relaxed) < 100 {
        assert!(Instant::now() < deadline, "the load got no 100 puts acknowledged in 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    eprintln!("take a 3 s profile on the client URL, as etcd serves it; a second one meanwhile is refused");
    let first = tokio::spawn({
        let addr = client_addr.clone();
        async move { get_bytes(&addr, "/debug/pprof/profile?seconds=3").await }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.log(0).contains("CPU profile started") {
        assert!(Instant::now() < deadline, "the first profile did not start in 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = get_bytes(&http_addr, "/debug/pprof/profile?seconds=1").await;
    assert_eq!(second.status, 409, "a second profile while one runs: {}", String::from_utf8_lossy(&second.body));
    assert!(second.json()["error"].as_str().unwrap_or_default().contains("already"), "{}", second.json());
    let profile = first.await.expect("profile request");
    assert_eq!(profile.status, 200, "{}", String::from_utf8_lossy(&profile.body));
    assert!(profile.head.contains("content-type: application/octet-stream"), "{}", profile.head);
    assert_eq!(&profile.body[..2], &[0x1f, 0x8b], "gzipped, as Go serves profiles");

    eprintln!("go tool pprof reads it: a CPU profile with quorate's frames");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("cpu.pb.gz");
    std::fs::write(&file, &profile.body).expect("write profile");
    let top = go_pprof_top(&file);
    assert!(top.contains("Type: cpu"), "not a CPU profile:\n{top}");
    assert!(top.contains("quorate_"), "no quorate frame in the profile:\n{top}");

    eprintln!("a flamegraph SVG on --listen-http, with quorate's frames");
    let svg = get_bytes(&http_addr, "/debug/pprof/profile?seconds=2&format=svg").await;
    let text = String::from_utf8_lossy(&svg.body);
    assert_eq!(svg.status, 200, "{text}");
    assert!(svg.head.contains("content-type: image/svg+xml"), "{}", svg.head);
    assert!(
        text.contains("<svg") && text.trim_end().ends_with("</svg>"),
        "not an SVG: {}",
        &text[..text.len().min(300)]
    );
    assert!(text.contains("quorate_"), "no quorate frame in the flamegraph");

    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(30), load).await.expect("load stops").expect("load task");
    let log = cluster.log(0);
    assert_eq!(log.matches("CPU profile taken").count(), 2, "two profiles taken, logged:\n{log}");
    let (acked, failed) = (acked.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{acked} puts acknowledged, {failed} failed, while profiled");
    assert_eq!(failed, 0, "puts failed while the member was profiled ({acked} acknowledged)");
}

/// `go tool pprof -top` on a profile file; its output (panics if it cannot read it).
fn go_pprof_top(file: &Path) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof", "-symbolize=none", "-top"])
        .arg(file)
        .env("HOME", file.parent().expect("dir"))
        .output()
        .expect("go tool pprof (Debian's golang-go; scripts/test.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "go tool pprof failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiling_is_off_by_default() {
    let cluster = Cluster::start(Flavor::Quorate, 1).expect("start a member");
    let node = &cluster.nodes[0];
    for addr in [node.endpoint(), format!("127.0.0.1:{}", node.http_port)] {
        for path in ["/debug/pprof/profile?seconds=1", "/debug/pprof/flamegraph?seconds=1"] {
            let r = http_at(&addr, "GET", path, None, Duration::from_secs(30)).await.expect("GET");
            assert_eq!(r.status, 404, "{addr}{path}: {}", r.body);
            assert!(
                r.json()["error"].as_str().unwrap_or_default().contains("--enable-pprof"),
                "{addr}{path}: {}",
                r.body
            );
        }
    }
    assert!(!cluster.log(0).contains("CPU profile"), "no profile was taken");
}
