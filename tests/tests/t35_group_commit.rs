//! Group commit: many concurrent proposals share one fsync, measured from the member's own
//! counters of durable log commits and entries.

use etcd_client::Client;
use quorate_tests::{metric, Cluster, Flavor};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_share_fsyncs() {
    let cluster = Cluster::start(Flavor::Quorate, 1).expect("cluster");
    let node = &cluster.nodes[0];
    let commits_before = metric(node, "quorate_storage_log_commits_total").unwrap();
    let entries_before = metric(node, "quorate_storage_log_entries_total").unwrap();

    let client = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    const WRITERS: usize = 64;
    const ROUNDS: usize = 10;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            for r in 0..ROUNDS {
                c.put(format!("gc/{w}/{r}"), "x", None).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    let commits = metric(node, "quorate_storage_log_commits_total").unwrap() - commits_before;
    let entries = metric(node, "quorate_storage_log_entries_total").unwrap() - entries_before;
    eprintln!("{entries} entries in {commits} durable commits");
    assert!(entries >= (WRITERS * ROUNDS) as f64, "every put is a durable log entry: {entries}");
    assert!(commits * 2.0 <= entries, "no group commit: {entries} entries took {commits} fsynced commits");
}
