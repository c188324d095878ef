//! A data directory written by the version before ADR 0011 (its Raft log in `raft.redb`) is
//! migrated to raft-engine on first start and keeps every key; one whose snapshot image is a
//! value in `state.redb` (before images moved to files) starts from it and moves it to a file.
//!
//! `tests/fixtures/pre-0011-member.tar.gz` is a single member's data directory made by that
//! binary (commit 8eb2476): `quorate server --name m1 --data-dir m1` with its peer on
//! 127.0.0.1:47380, then 200 puts `pre/k1..pre/k200` = `v1..v200` and `pre/last`, then SIGTERM.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quorate_tests::{etcdctl, free_port, quorate_bin};

const PEER: &str = "http://127.0.0.1:47380";
const IMAGE_PEER: &str = "http://127.0.0.1:47390";

/// A member process, stopped when dropped (a failed assertion included).
struct Member(Child);

impl Drop for Member {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path, client: u16, log: &Path) -> Member {
    start_with(dir, PEER, client, log, &[])
}

/// `peer` is the address the fixture was made with (it is in its membership): the member
/// advertises it, but listens on a free port, since a one-member cluster never dials itself and
/// a fixed port may be taken by another test's connection (it is in the ephemeral range).
fn start_with(dir: &Path, peer: &str, client: u16, log: &Path, extra: &[&str]) -> Member {
    let listen_peer = format!("http://127.0.0.1:{}", free_port());
    let client_url = format!("http://127.0.0.1:{client}");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(quorate_bin())
        .arg("server")
        .args(["--name", "m1", "--data-dir", dir.to_str().unwrap()])
        .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &listen_peer, "--initial-advertise-peer-urls", peer])
        .args(["--initial-cluster", &format!("m1={peer}")])
        .args(["--listen-http", &format!("127.0.0.1:{}", free_port())])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .map(Member)
        .expect("spawn quorate")
}

/// A fresh directory holding `tests/fixtures/<name>` unpacked (a member's data directory, `m1`).
fn untar_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name);
    let untar = Command::new("tar").arg("xzf").arg(&fixture).arg("-C").arg(tmp.path()).status().unwrap();
    assert!(untar.success(), "untar {}", fixture.display());
    tmp
}

/// `etcdctl get` until the member answers; the member's log (`log`) is shown if it never does.
fn get(endpoint: &str, log: &Path, args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = etcdctl(endpoint, &[&["get"], args].concat());
        if out.ok {
            return out.stdout;
        }
        let member_log = || std::fs::read_to_string(log).unwrap_or_default();
        assert!(Instant::now() < deadline, "get {args:?}: {}\nmember log:\n{}", out.stderr, member_log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_data_directory_of_the_redb_log_version_is_migrated_and_keeps_every_key() {
    let tmp = untar_fixture("pre-0011-member.tar.gz");
    let dir = tmp.path().join("m1");
    assert!(dir.join("raft.redb").exists(), "the fixture holds a redb log");
    let log = tmp.path().join("m1.log");
    let client = free_port();
    let endpoint = format!("127.0.0.1:{client}");

    let member = start(&dir, client, &log);
    let last = get(&endpoint, &log, &["pre/last", "--print-value-only"]);
    let member_log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(last.trim(), "written by the redb-log binary", "{member_log}");
    let keys = get(&endpoint, &log, &["pre/k", "--prefix", "--keys-only"]);
    assert_eq!(keys.lines().filter(|l| !l.is_empty()).count(), 200, "{keys}");
    assert_eq!(get(&endpoint, &log, &["pre/k137", "--print-value-only"]).trim(), "v137");
    assert!(member_log.contains("raft log migrated"), "{member_log}");
    assert!(!dir.join("raft.redb").exists(), "raft.redb stays after the migration");
    assert!(dir.join("raft-engine").is_dir());

    // It keeps taking writes, and both old and new keys survive a restart.
    let put = etcdctl(&endpoint, &["put", "post/k", "after the migration"]);
    assert!(put.ok, "{}", put.stderr);
    drop(member);
    let member = start(&dir, client, &log);
    assert_eq!(get(&endpoint, &log, &["post/k", "--print-value-only"]).trim(), "after the migration");
    assert_eq!(get(&endpoint, &log, &["pre/k200", "--print-value-only"]).trim(), "v200");
    drop(member);
}

/// `tests/fixtures/pre-image-files-member.tar.gz` is a single member's data directory made by
/// the binary of commit 117957f, which kept snapshot images in `state.redb`: `quorate server
/// --name m1 --data-dir m1 --snapshot-count 100` with its peer on 127.0.0.1:47390, then 300 puts
/// `snap/k1..snap/k300` = `v1..v300` and `snap/last` = `done`, then SIGTERM. Its log was purged
/// up to its last snapshot (all but 20 entries), so the early keys are only in the image.
#[test]
fn a_snapshot_image_stored_in_the_state_file_loads_and_moves_to_a_file() {
    let tmp = untar_fixture("pre-image-files-member.tar.gz");
    let dir = tmp.path().join("m1");
    let images = dir.join("snapshots");
    assert!(!images.exists(), "the fixture was made before image files");
    let log = tmp.path().join("m1.log");
    let client = free_port();
    let endpoint = format!("127.0.0.1:{client}");
    let image_files = || std::fs::read_dir(&images).map_or(0, |d| d.count());

    let member = start_with(&dir, IMAGE_PEER, client, &log, &["--snapshot-count", "100"]);
    assert_eq!(get(&endpoint, &log, &["snap/last", "--print-value-only"]).trim(), "done");
    let keys = get(&endpoint, &log, &["snap/k", "--prefix", "--keys-only"]);
    assert_eq!(keys.lines().filter(|l| !l.is_empty()).count(), 300, "{keys}");
    assert_eq!(get(&endpoint, &log, &["snap/k1", "--print-value-only"]).trim(), "v1");
    assert_eq!(image_files(), 0, "nothing moves before the next snapshot");
    // Writes past the snapshot count make a new snapshot, stored as a file.
    for i in 0..150 {
        let put = etcdctl(&endpoint, &["put", &format!("post/k{i}"), "after"]);
        assert!(put.ok, "{}", put.stderr);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while image_files() == 0 {
        assert!(Instant::now() < deadline, "no image file 30 s after 150 writes past a snapshot count of 100");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(member);
    let member = start_with(&dir, IMAGE_PEER, client, &log, &["--snapshot-count", "100"]);
    assert_eq!(get(&endpoint, &log, &["snap/k1", "--print-value-only"]).trim(), "v1");
    assert_eq!(get(&endpoint, &log, &["snap/k300", "--print-value-only"]).trim(), "v300");
    assert_eq!(get(&endpoint, &log, &["post/k149", "--print-value-only"]).trim(), "after");
    assert_eq!(image_files(), 1);
    drop(member);
}
