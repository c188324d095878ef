//! Group commit: many concurrent proposals share one fsync, measured from the member's own
//! counters of durable log commits and entries.
//!
//! The test makes its own overlap: with the drill failpoint every log fsync is held, so the
//! appends of concurrent writers queue behind the one being made durable, on an idle machine as
//! on a loaded one. A log writer that fsynced each append on its own would still take one
//! commit per entry.

use std::time::Duration;

use etcd_client::Client;
use quorate_tests::{http, metric, Cluster, Flavor};

/// How long the failpoint holds every log fsync: far longer than concurrent puts over loopback
/// take to reach the member, so they queue behind the held one.
const FSYNC_HOLD_MS: u64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_share_fsyncs() {
    let cluster = Cluster::start_with(Flavor::Quorate, 1, &["--drill-failpoints"]).expect("cluster");
    let node = &cluster.nodes[0];
    let client = Client::connect(cluster.all_endpoints(), None).await.unwrap();

    eprintln!("hold every log fsync for {FSYNC_HOLD_MS} ms");
    let set = http(node, "PUT", "/debug/failpoints/fsync-delay-ms", Some(&FSYNC_HOLD_MS.to_string())).unwrap();
    assert_eq!(set.status, 200, "failpoint refused: {}", set.body);
    let commits_before = metric(node, "quorate_storage_log_commits_total").unwrap();
    let entries_before = metric(node, "quorate_storage_log_entries_total").unwrap();

    eprintln!("queue concurrent puts behind the held fsyncs");
    const WRITERS: usize = 64;
    const ROUNDS: usize = 5;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            for r in 0..ROUNDS {
                c.put(format!("gc/{w}/{r}"), "x", None).await.unwrap();
            }
        }));
    }
    let all = async {
        for t in tasks {
            t.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all).await.expect("the puts finish");

    let commits = metric(node, "quorate_storage_log_commits_total").unwrap() - commits_before;
    let entries = metric(node, "quorate_storage_log_entries_total").unwrap() - entries_before;
    let cleared = http(node, "PUT", "/debug/failpoints/fsync-delay-ms", Some("0")).unwrap();
    assert_eq!(cleared.status, 200, "failpoint not cleared: {}", cleared.body);
    eprintln!("{entries} entries in {commits} durable commits");
    assert!(entries >= (WRITERS * ROUNDS) as f64, "every put is a durable log entry: {entries}");
    // Each round's puts arrive while one fsync is held, so about two commits carry a round;
    // four entries per commit on average leaves a wide margin.
    assert!(commits * 4.0 <= entries, "no group commit: {entries} entries took {commits} fsynced commits");
}
