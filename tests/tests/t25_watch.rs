//! Watch with the Rust client: many watchers on one stream, ranges and prefixes, filters,
//! history replay, cancellation, progress, and a slow consumer that must not lose events.

use std::time::Duration;

use etcd_client::{Client, EventType, WatchFilterType, WatchOptions, WatchResponse};
use quorate_tests::{Cluster, Flavor};

async fn next(stream: &mut etcd_client::WatchStream) -> WatchResponse {
    // Generous: other black-box tests may be loading this two-core machine at the same time.
    tokio::time::timeout(Duration::from_secs(15), stream.message())
        .await
        .expect("watch response in time")
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_watchers_on_one_stream_see_ordered_events() {
    let cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let mut c = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    let first = c.put("w/a", "0", None).await.unwrap().header().unwrap().revision();

    // Start after `first` explicitly: a watch without a start revision begins at the serving
    // member's own revision, and a follower may not have applied `first` yet.
    let mut stream = c
        .watch("w/", Some(WatchOptions::new().with_prefix().with_prev_key().with_start_revision(first + 1)))
        .await
        .unwrap();
    let prefix_id = next(&mut stream).await.watch_id();
    stream
        .watch("w/a", Some(WatchOptions::new().with_filters([WatchFilterType::NoPut]).with_start_revision(first + 1)))
        .await
        .unwrap();
    let nodelete_id = next(&mut stream).await.watch_id();
    stream.watch("w/", Some(WatchOptions::new().with_prefix().with_start_revision(first))).await.unwrap();
    let replay_id = next(&mut stream).await.watch_id();
    assert!(prefix_id != nodelete_id && nodelete_id != replay_id);

    c.put("w/a", "1", None).await.unwrap();
    c.put("w/b", "1", None).await.unwrap();
    c.delete("w/a", None).await.unwrap();

    // Collect until each watcher has what it should: prefix 3 events, no-put 1, replay 4.
    let mut seen: std::collections::BTreeMap<i64, Vec<(EventType, String, i64)>> = Default::default();
    let want = |s: &std::collections::BTreeMap<i64, Vec<_>>| {
        s.get(&prefix_id).map_or(0, Vec::len) == 3
            && s.get(&nodelete_id).map_or(0, Vec::len) == 1
            && s.get(&replay_id).map_or(0, Vec::len) == 4
    };
    while !want(&seen) {
        let r = next(&mut stream).await;
        for e in r.events() {
            let kv = e.kv().unwrap();
            seen.entry(r.watch_id()).or_default().push((
                e.event_type(),
                kv.key_str().unwrap().to_string(),
                kv.mod_revision(),
            ));
            if r.watch_id() == prefix_id && e.event_type() == EventType::Put && kv.key() == b"w/a" {
                assert_eq!(e.prev_kv().unwrap().value(), b"0", "prev_kv carried");
            }
        }
    }
    for evs in seen.values() {
        assert!(evs.windows(2).all(|w| w[0].2 < w[1].2), "revisions strictly increase: {evs:?}");
    }
    assert_eq!(seen[&nodelete_id][0].0, EventType::Delete);
    assert_eq!(seen[&replay_id][0].2, first, "replay starts at the requested revision");

    // Cancel one watcher; the others keep going.
    stream.cancel(nodelete_id).await.unwrap();
    let r = next(&mut stream).await;
    assert!(r.canceled() && r.watch_id() == nodelete_id);
    c.put("w/c", "1", None).await.unwrap();
    let mut got_c = std::collections::BTreeSet::new();
    while got_c.len() < 2 {
        let r = next(&mut stream).await;
        assert_eq!(r.events()[0].kv().unwrap().key(), b"w/c");
        assert_ne!(r.watch_id(), nodelete_id, "a cancelled watcher got an event");
        got_c.insert(r.watch_id());
    }

    // A progress request answers with the current revision.
    stream.request_progress().await.unwrap();
    let r = next(&mut stream).await;
    assert!(r.events().is_empty());
    assert!(r.header().unwrap().revision() >= first + 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_a_compacted_revision_is_cancelled_with_the_compact_revision() {
    let cluster = Cluster::start(Flavor::Quorate, 1).expect("cluster");
    let mut c = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    for i in 0..5 {
        c.put("k", format!("{i}"), None).await.unwrap();
    }
    c.compact(4, None).await.unwrap();
    let mut stream = c.watch("k", Some(WatchOptions::new().with_start_revision(2))).await.unwrap();
    let mut r = next(&mut stream).await;
    if r.created() && !r.canceled() {
        r = next(&mut stream).await;
    }
    assert!(r.canceled());
    assert_eq!(r.compact_revision(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_gets_every_event_in_order() {
    let cluster = Cluster::start(Flavor::Quorate, 1).expect("cluster");
    let mut c = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    let mut stream = c.watch("slow/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    next(&mut stream).await;
    // Far more revisions than the stream and broadcast queues hold, while nobody reads.
    const N: usize = 6000;
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut c = c.clone();
        writers.push(tokio::spawn(async move {
            for i in (w..N).step_by(8) {
                c.put(format!("slow/{i:05}"), "x", None).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let mut revs = Vec::new();
    while revs.len() < N {
        let r = next(&mut stream).await;
        revs.extend(r.events().iter().map(|e| e.kv().unwrap().mod_revision()));
    }
    assert_eq!(revs.len(), N, "no duplicates");
    assert!(revs.windows(2).all(|w| w[1] == w[0] + 1), "no gaps, in order");
}

/// A replay from revision 1 comes as etcd sends one: many whole revisions to a response (at most
/// 1000), never a revision split across two, every event once and in order, and each response's
/// header at the revision of its last event (a client resuming from it misses nothing). Live
/// events after the replay still arrive one revision at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_comes_in_batches_of_whole_revisions() {
    use etcd_client::{Txn, TxnOp};
    const PUTS: usize = 2_500;
    let cluster = Cluster::start(Flavor::Quorate, 1).expect("cluster");
    let mut c = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    let mut expected = Vec::new(); // (revision, key) in order
    for i in 0..PUTS {
        let key = format!("r/{}", i % 50);
        let rev = c.put(key.as_str(), "v", None).await.unwrap().header().unwrap().revision();
        expected.push((rev, key));
        if i % 500 == 0 {
            // A revision of ten events, which no batch may split.
            let ops: Vec<TxnOp> = (0..10).map(|j| TxnOp::put(format!("r/t{j}"), "t", None)).collect();
            let rev = c.txn(Txn::new().and_then(ops)).await.unwrap().header().unwrap().revision();
            expected.extend((0..10).map(|j| (rev, format!("r/t{j}"))));
        }
    }
    let mut stream = c.watch("r/", Some(WatchOptions::new().with_prefix().with_start_revision(1))).await.unwrap();
    assert!(next(&mut stream).await.created());
    let (mut seen, mut responses, mut last_rev) = (Vec::new(), 0, 0);
    while seen.len() < expected.len() {
        let resp = next(&mut stream).await;
        responses += 1;
        let revs: Vec<i64> = resp.events().iter().map(|e| e.kv().unwrap().mod_revision()).collect();
        assert!(!revs.is_empty(), "an empty response during the replay");
        assert!(revs[0] > last_rev, "revision {} split across responses, or repeated", revs[0]);
        last_rev = *revs.last().unwrap();
        let distinct = revs.windows(2).filter(|w| w[0] != w[1]).count() + 1;
        assert!(distinct <= 1000, "{distinct} revisions in one response");
        assert_eq!(resp.header().unwrap().revision(), last_rev, "header is the batch's last revision");
        seen.extend(
            resp.events()
                .iter()
                .map(|e| (e.kv().unwrap().mod_revision(), e.kv().unwrap().key_str().unwrap().to_string())),
        );
    }
    assert_eq!(seen, expected, "every event once, in order");
    assert!(responses <= 10, "{responses} responses for {} revisions: not batched", PUTS + 5);

    c.put("r/live", "1", None).await.unwrap();
    let live = next(&mut stream).await;
    assert_eq!(live.events().len(), 1, "a live event arrives on its own");
}
