//! Snapshots (issue 3): `etcdctl snapshot save` from a loaded 3-member cluster, then
//! `quorate snapshot restore` into three new data directories: the new cluster holds the same
//! keys and values, every member's HashKV agrees (and matches the original's), and it has a new
//! cluster id. Damaged files and non-empty directories are refused and change nothing.

use std::process::Command;
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use quorate_tests::{etcdctl, quorate_bin, Cluster, Flavor};

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
