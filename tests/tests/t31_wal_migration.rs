//! A data directory written by the version before ADR 0011 (its Raft log in `raft.redb`) is
//! migrated to raft-engine on first start and keeps every key.
//!
//! `tests/fixtures/pre-0011-member.tar.gz` is a single member's data directory made by that
//! binary (commit 8eb2476): `quorate server --name m1 --data-dir m1` with its peer on
//! 127.0.0.1:47380, then 200 puts `pre/k1..pre/k200` = `v1..v200` and `pre/last`, then SIGTERM.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quorate_tests::{etcdctl, free_port, quorate_bin};

const PEER: &str = "http://127.0.0.1:47380";

/// A member process, stopped when dropped (a failed assertion included).
struct Member(Child);

impl Drop for Member {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path, client: u16, log: &Path) -> Member {
    let client_url = format!("http://127.0.0.1:{client}");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(quorate_bin())
        .arg("server")
        .args(["--name", "m1", "--data-dir", dir.to_str().unwrap()])
        .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", PEER, "--initial-advertise-peer-urls", PEER])
        .args(["--initial-cluster", &format!("m1={PEER}")])
        .args(["--listen-http", &format!("127.0.0.1:{}", free_port())])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .map(Member)
        .expect("spawn quorate")
}

/// `etcdctl get` until the member answers.
fn get(endpoint: &str, args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = etcdctl(endpoint, &[&["get"], args].concat());
        if out.ok {
            return out.stdout;
        }
        assert!(Instant::now() < deadline, "get {args:?}: {}", out.stderr);
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_data_directory_of_the_redb_log_version_is_migrated_and_keeps_every_key() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pre-0011-member.tar.gz");
    let untar = Command::new("tar").arg("xzf").arg(&fixture).arg("-C").arg(tmp.path()).status().unwrap();
    assert!(untar.success(), "untar {}", fixture.display());
    let dir = tmp.path().join("m1");
    assert!(dir.join("raft.redb").exists(), "the fixture holds a redb log");
    let log = tmp.path().join("m1.log");
    let client = free_port();
    let endpoint = format!("127.0.0.1:{client}");

    let member = start(&dir, client, &log);
    let last = get(&endpoint, &["pre/last", "--print-value-only"]);
    let member_log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(last.trim(), "written by the redb-log binary", "{member_log}");
    let keys = get(&endpoint, &["pre/k", "--prefix", "--keys-only"]);
    assert_eq!(keys.lines().filter(|l| !l.is_empty()).count(), 200, "{keys}");
    assert_eq!(get(&endpoint, &["pre/k137", "--print-value-only"]).trim(), "v137");
    assert!(member_log.contains("raft log migrated"), "{member_log}");
    assert!(!dir.join("raft.redb").exists(), "raft.redb stays after the migration");
    assert!(dir.join("raft-engine").is_dir());

    // It keeps taking writes, and both old and new keys survive a restart.
    let put = etcdctl(&endpoint, &["put", "post/k", "after the migration"]);
    assert!(put.ok, "{}", put.stderr);
    drop(member);
    let member = start(&dir, client, &log);
    assert_eq!(get(&endpoint, &["post/k", "--print-value-only"]).trim(), "after the migration");
    assert_eq!(get(&endpoint, &["pre/k200", "--print-value-only"]).trim(), "v200");
    drop(member);
}
