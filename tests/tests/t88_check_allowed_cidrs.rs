//! `--check-allowed-cidrs` (issue 14 §3): a registry user can register a health check against
//! any address; with the flag, members probe only addresses inside the blocks, judged on the
//! address the check's host resolves to. A check outside them is critical, and the target never
//! sees a connection. And an `https://` URL is refused at start (quorate does not serve TLS yet:
//! it must not serve plaintext where a client expects TLS).

use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quorate_tests::{http, quorate_bin, Cluster, Flavor};

const SVC: &str = "/api/v1/ns/default/services/web/instances";

/// An HTTP endpoint answering 200 that counts the connections it gets.
fn serve() -> (u16, Arc<AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            counted.fetch_add(1, Ordering::Relaxed);
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (port, seen)
}

fn register(c: &Cluster, id: &str, port: u16) {
    let body = format!(
        r#"{{"address":"127.0.0.1","port":{port},"kind":"persistent","check":{{"http":"http://127.0.0.1:{port}/health","interval_s":1,"timeout_s":1,"failures_before_critical":1,"successes_before_passing":1}}}}"#
    );
    let r = http(&c.nodes[0], "PUT", &format!("{SVC}/{id}"), Some(&body)).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

fn health_after(c: &Cluster, id: &str, wait: Duration) -> String {
    std::thread::sleep(wait);
    let v = http(&c.nodes[0], "GET", &format!("{SVC}/{id}"), None).unwrap().json();
    v["health"].as_str().unwrap_or_default().to_string()
}

#[test]
fn checks_outside_the_allowed_blocks_are_never_probed() {
    let (port, seen) = serve();
    let denied = Cluster::start_with(Flavor::Quorate, 1, &["--check-allowed-cidrs", "10.0.0.0/8,fd00::/8"]).unwrap();
    register(&denied, "outside", port);
    assert_eq!(health_after(&denied, "outside", Duration::from_secs(4)), "critical");
    assert_eq!(seen.load(Ordering::Relaxed), 0, "the target outside the blocks was connected to");
    assert!(denied.log(0).contains("outside --check-allowed-cidrs"), "the member says why");
    drop(denied);

    let allowed = Cluster::start_with(Flavor::Quorate, 1, &["--check-allowed-cidrs", "127.0.0.0/8"]).unwrap();
    register(&allowed, "inside", port);
    assert_eq!(health_after(&allowed, "inside", Duration::from_secs(4)), "passing");
    assert!(seen.load(Ordering::Relaxed) > 0, "the target inside the blocks is probed");
}

/// Runs `quorate args`, which must exit by itself within 10 s (a server that starts instead is
/// killed, and the test fails); its exit status and stderr.
fn must_exit(args: &[&str]) -> (bool, String) {
    use std::io::Read;
    let mut child = Command::new(quorate_bin())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run quorate");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("quorate {args:?} started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status.success(), err)
}

#[test]
fn https_urls_are_refused_rather_than_served_as_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let data = data.to_str().unwrap();
    let (ok, err) =
        must_exit(&["server", "--name", "m1", "--data-dir", data, "--listen-client-urls", "https://127.0.0.1:0"]);
    assert!(!ok, "an https:// client URL was accepted");
    assert!(
        err.contains("--listen-client-urls https://127.0.0.1:0") && err.contains("needs --cert-file and --key-file"),
        "{err}"
    );
    let (ok, err) = must_exit(&["server", "--data-dir", data, "--check-allowed-cidrs", "10.0.0.0/33"]);
    assert!(!ok && err.contains("not a CIDR block"), "{err}");
}
