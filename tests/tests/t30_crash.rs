//! Crash safety: kill -9 under a concurrent write load. No acknowledged write is lost, writes
//! resume quickly, and every member ends with the same keyspace at the same revision.

use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use quorate_tests::load::Load;
use quorate_tests::{ranges_at_one_revision, Cluster, Flavor};

async fn assert_all_acked_present(
    client: &mut Client,
    acked: &std::collections::BTreeMap<String, String>,
    prefix: &str,
) {
    let r = client.get(prefix, Some(GetOptions::new().with_prefix())).await.expect("read back");
    let stored: std::collections::BTreeMap<String, String> =
        r.kvs().iter().map(|kv| (kv.key_str().unwrap().to_string(), kv.value_str().unwrap().to_string())).collect();
    let lost: Vec<&String> = acked.keys().filter(|k| stored.get(*k) != acked.get(*k)).collect();
    assert!(lost.is_empty(), "{} acknowledged writes lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);
}

async fn assert_converged(cluster: &Cluster) {
    let ranges = ranges_at_one_revision(cluster).await;
    let (first_name, first) = &ranges[0];
    for (name, kvs) in &ranges[1..] {
        assert_eq!(kvs.len(), first.len(), "{name} and {first_name} hold different key counts");
        assert!(kvs == first, "{name} and {first_name} differ at the same revision");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let client = Client::connect(cluster.all_endpoints(), None).await.expect("connect");

    eprintln!("write load on 8 writers");
    let load = Load::start(&client, 8, "crash");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = cluster.wait_leader(Duration::from_secs(5)).expect("leader");
    let before = load.acked();
    assert!(before > 0, "no write acknowledged before the crash");

    eprintln!("kill -9 the leader ({})", cluster.nodes[leader].name);
    let killed_at = Instant::now();
    cluster.kill(leader);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let resumed = load.first_ack_after(killed_at + Duration::from_millis(50)).expect("writes resumed");
    let outage = resumed - killed_at;
    eprintln!("writes resumed {outage:?} after the kill");
    assert!(outage <= Duration::from_secs(3), "writes resumed only after {outage:?}");

    eprintln!("restart the killed member under load");
    cluster.spawn(leader).expect("restart");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let record = load.stop().await;
    eprintln!("{} acknowledged, {} failed or unknown", record.acked.len(), record.failures);

    let mut reader = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    assert_all_acked_present(&mut reader, &record.acked, "crash/").await;
    cluster.wait_ready(Duration::from_secs(20)).expect("restarted member rejoined");
    assert_converged(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_behind_the_compacted_log_catches_up_by_snapshot() {
    // Small snapshots so the log is purged past the stopped follower quickly.
    let mut cluster = Cluster::start_with(Flavor::Quorate, 3, &["--snapshot-count", "200"]).expect("cluster");
    let client = Client::connect(cluster.all_endpoints(), None).await.expect("connect");
    let leader = cluster.wait_leader(Duration::from_secs(5)).unwrap();
    let follower = (leader + 1) % 3;

    eprintln!("kill -9 follower {} and write well past two snapshots", cluster.nodes[follower].name);
    cluster.kill(follower);
    let load = Load::start(&client, 8, "snap");
    let deadline = Instant::now() + Duration::from_secs(30);
    while load.acked() < 1500 {
        assert!(Instant::now() < deadline, "load too slow: {} acked", load.acked());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    eprintln!("restart the follower: it must install a snapshot");
    cluster.spawn(follower).expect("restart");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let record = load.stop().await;
    cluster.wait_ready(Duration::from_secs(30)).expect("follower rejoined");
    assert_converged(&cluster).await;
    let log = cluster.log(follower);
    assert!(log.contains("installed snapshot"), "follower caught up without a snapshot:\n{log}");
    let mut reader = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    assert_all_acked_present(&mut reader, &record.acked, "snap/").await;
}
