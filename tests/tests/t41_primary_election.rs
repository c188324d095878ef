//! The seed's primary election under repeated leader kills (issue 11): three candidates, each
//! talking to its own member, run `lease + Txn If(CreateRevision(k) == 0) Then Put(k, lease) +
//! keep-alive` (the drill's election workload, `quorate_drill::election`), and the leader is
//! killed with SIGKILL three times. Each candidate believes it is primary from its Txn's answer
//! until its last acknowledged renewal + TTL; no two beliefs may overlap
//! (`quorate_drill::check::primaries`, unit-tested on known-bad histories).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quorate_drill::check::primaries;
use quorate_drill::election::{run_candidate, CANDIDATES};
use quorate_drill::workload::Recorder;
use quorate_tests::{Cluster, Flavor};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_seeds_primary_election_never_has_two_primaries_across_leader_kills() {
    let mut cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let rec = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    eprintln!("{CANDIDATES} candidates campaign, one per member");
    let candidates: Vec<_> = (0..CANDIDATES)
        .map(|i| {
            let url = format!("http://{}", cluster.nodes[i % 3].endpoint());
            tokio::spawn(run_candidate(i, url, 11, rec.clone(), stop.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;

    for kill in 0..3 {
        let leader = cluster.wait_leader(Duration::from_secs(10)).expect("leader");
        eprintln!("kill {kill}: SIGKILL the leader {}", cluster.nodes[leader].name);
        cluster.kill(leader);
        tokio::time::sleep(Duration::from_secs(6)).await;
        cluster.spawn(leader).expect("restart");
        cluster.wait_ready(Duration::from_secs(20)).expect("ready");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in candidates {
        let _ = tokio::time::timeout(Duration::from_secs(15), c).await;
    }

    let r = rec.rec.lock().unwrap();
    let beliefs = primaries::beliefs(&r.primary_wins, &r.lease_answers, &r.lease_revokes);
    eprintln!(
        "{} wins, {} terms as primary, {} lease answers",
        r.primary_wins.len(),
        beliefs.len(),
        r.lease_answers.len()
    );
    assert!(beliefs.len() >= 2, "the primary never changed hands: nothing was tested");
    let two = primaries::check(&beliefs);
    assert!(two.is_empty(), "two primaries at once: {two:#?}");
}
