//! Snapshots (issue 3): `etcdctl snapshot save` from a loaded 3-member cluster, then
//! `quorate snapshot restore` into three new data directories: the new cluster holds the same
//! keys and values, every member's HashKV agrees (and matches the original's), and it has a new
//! cluster id. Damaged files and non-empty directories are refused and change nothing.
//!
//! Raft snapshots travel between members in bounded chunks (issue 11): with a chunk size far
//! below the state's size, a lagging follower and a newly added member still catch up.

use std::process::Command;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use quorate_tests::{etcdctl, quorate_bin, ranges_at_one_revision, Cluster, Flavor};

fn restore(file: &std::path::Path, c: &Cluster, i: usize) -> std::process::Output {
    let n = &c.nodes[i];
    Command::new(quorate_bin())
        .args(["snapshot", "restore"])
        .arg(file)
        .args(["--data-dir", n.data_dir.to_str().unwrap(), "--name", &n.name])
        .args(["--initial-advertise-peer-urls", &n.peer_url(), "--initial-cluster", &c.initial_cluster])
        .output()
        .unwrap()
}

async fn everything(endpoint: &str) -> (Vec<(String, String)>, i64, u64) {
    let mut c = Client::connect([endpoint], None).await.unwrap();
    let r = c.get("", Some(GetOptions::new().with_all_keys())).await.unwrap();
    let kvs = r.kvs().iter().map(|kv| (kv.key_str().unwrap().into(), kv.value_str().unwrap().into())).collect();
    let h = r.header().unwrap();
    (kvs, h.revision(), h.cluster_id())
}

fn hashkv(c: &Cluster, rev: i64) -> Vec<String> {
    let out = etcdctl(&c.endpoints(), &["endpoint", "hashkv", "--cluster", &format!("--rev={rev}")]);
    assert!(out.ok, "{}", out.stderr);
    out.stdout.lines().map(|l| l.rsplit(", ").next().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_from_a_loaded_cluster_and_restore_into_a_new_one() {
    let original = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let mut client = Client::connect(original.all_endpoints(), None).await.unwrap();
    for i in 0..2000 {
        client.put(format!("load/{i:05}"), format!("value-{i}"), None).await.unwrap();
    }
    for i in 0..100 {
        client.delete(format!("load/{i:05}"), None).await.unwrap();
    }
    let lease = client.lease_grant(600, None).await.unwrap().id();
    client.put("leased", "x", Some(etcd_client::PutOptions::new().with_lease(lease))).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.db");
    let saved = etcdctl(&original.nodes[1].endpoint(), &["snapshot", "save", file.to_str().unwrap()]);
    assert!(saved.ok, "{}", saved.stderr);
    assert_eq!(saved.stdout.trim(), format!("Snapshot saved at {}", file.display()));
    let (before, rev, old_cluster) = everything(&original.nodes[0].endpoint()).await;
    let old_hash = hashkv(&original, rev);
    assert!(old_hash.iter().all(|h| *h == old_hash[0]));
    drop(original);

    let mut restored = Cluster::unstarted(Flavor::Quorate, 3).unwrap();

    // Damaged files: refused, and no data directory is left behind.
    let bytes = std::fs::read(&file).unwrap();
    let truncated = dir.path().join("truncated.db");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let corrupt = dir.path().join("corrupt.db");
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x40;
    std::fs::write(&corrupt, &flipped).unwrap();
    for (bad, why) in [(&truncated, "truncated"), (&corrupt, "corrupt")] {
        let out = restore(bad, &restored, 0);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{why}: {err}");
        assert!(!restored.nodes[0].data_dir.join("state.redb").exists(), "a failed restore wrote data");
    }

    for i in 0..3 {
        let out = restore(&file, &restored, i);
        assert!(out.status.success(), "restore m{}: {}", i + 1, String::from_utf8_lossy(&out.stderr));
    }
    // Restoring over a restored directory is refused.
    let again = restore(&file, &restored, 0);
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    restored.start_all().expect("restored cluster starts");
    let (after, new_rev, new_cluster) = everything(&restored.nodes[2].endpoint()).await;
    assert_eq!(after, before, "the restored cluster holds the same keys and values");
    assert_eq!(new_rev, rev, "and the same revision");
    assert_ne!(new_cluster, old_cluster, "a restored cluster has a new cluster id");
    let new_hash = hashkv(&restored, rev);
    assert_eq!(new_hash.len(), 3);
    assert!(new_hash.iter().all(|h| *h == old_hash[0]), "HashKV {new_hash:?} vs original {}", old_hash[0]);

    // The restored cluster works: writes, and the lease is still there.
    let mut c = Client::connect(restored.all_endpoints(), None).await.unwrap();
    c.put("after-restore", "1", None).await.unwrap();
    let ttl = c.lease_time_to_live(lease, None).await.unwrap();
    assert!(ttl.ttl() > 500, "the lease survived with its remaining TTL: {}", ttl.ttl());
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Peer snapshot chunk size for the chunked-transfer test: the state below is ~100 times larger.
const CHUNK_BYTES: usize = 4096;

/// Keys written so that the log is purged well past a stopped follower, and the state spans
/// many chunks (each key carries a 256-byte value).
const KEYS: usize = 1600;

async fn write_keys(client: &Client, prefix: &str) {
    let value = "v".repeat(256);
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (mut c, value, prefix) = (client.clone(), value.clone(), prefix.to_string());
        tasks.push(tokio::spawn(async move {
            for i in (w..KEYS).step_by(8) {
                // A put may meet a leader change while a member restarts: retry, bounded.
                let mut attempts = 0;
                while let Err(e) = c.put(format!("{prefix}/{i:05}"), value.as_str(), None).await {
                    attempts += 1;
                    assert!(attempts < 50, "put {prefix}/{i:05} kept failing: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Every running member holds the same keys at the same revision (each waits up to 20 s).
async fn assert_converged(cluster: &Cluster) {
    let ranges = ranges_at_one_revision(cluster).await;
    let (first_name, first) = &ranges[0];
    for (name, kvs) in &ranges[1..] {
        assert_eq!(kvs.len(), first.len(), "{name} and {first_name} hold different key counts");
        assert!(kvs == first, "{name} and {first_name} differ at the same revision");
    }
}

/// The chunk counts of the snapshots member `i` received, from its log.
fn chunks_received(cluster: &Cluster, i: usize) -> Vec<u64> {
    cluster
        .log(i)
        .lines()
        .filter(|l| l.contains("snapshot received"))
        .filter_map(|l| l.split("chunks=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_many_chunks_long_reaches_a_lagging_and_a_new_member() {
    let chunk = CHUNK_BYTES.to_string();
    let args = ["--snapshot-count", "200", "--drill-snapshot-chunk-bytes", &chunk];
    let mut cluster = Cluster::start_with(Flavor::Quorate, 3, &args).expect("cluster");
    let leader = cluster.wait_leader(Duration::from_secs(10)).expect("leader");
    let follower = (leader + 1) % 3;

    eprintln!("kill -9 follower {} and write well past several snapshots", cluster.nodes[follower].name);
    cluster.kill(follower);
    let running: Vec<String> = cluster.nodes.iter().filter(|n| n.is_running()).map(|n| n.endpoint()).collect();
    let client = Client::connect(running, None).await.unwrap();
    write_keys(&client, "lag").await;

    eprintln!("restart the follower: it catches up by a snapshot sent in chunks of {CHUNK_BYTES} bytes");
    cluster.spawn(follower).expect("restart");
    cluster.wait_ready(Duration::from_secs(30)).expect("follower rejoined");
    assert_converged(&cluster).await;
    let chunks = chunks_received(&cluster, follower);
    eprintln!("the follower received snapshots of {chunks:?} chunks");
    assert!(chunks.iter().any(|&n| n >= 20), "the follower received no snapshot of many chunks: {chunks:?}");

    eprintln!("add a fourth member: it starts from a snapshot, also in many chunks");
    let new = cluster.new_node();
    let (name, peer) = (cluster.nodes[new].name.clone(), cluster.nodes[new].peer_url());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = etcdctl(&cluster.endpoints(), &["member", "add", &name, &format!("--peer-urls={peer}")]);
        if out.ok {
            break;
        }
        assert!(Instant::now() < deadline, "member add refused: {}", out.stderr);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cluster.join(new).expect("start the new member");
    write_keys(&client, "after").await;
    assert_converged(&cluster).await;
    let chunks = chunks_received(&cluster, new);
    eprintln!("the new member received snapshots of {chunks:?} chunks");
    assert!(chunks.iter().any(|&n| n >= 20), "the new member received no snapshot of many chunks: {chunks:?}");
    assert!(cluster.log(new).contains("installed snapshot"), "the new member installed no snapshot");
}
