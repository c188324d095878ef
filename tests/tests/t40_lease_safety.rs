//! Leases across leader changes: kept-alive leases survive, abandoned ones expire on time,
//! and a leader that was paused past their TTL does not revoke what the new leader kept alive.

use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use quorate_tests::{Cluster, Flavor};

/// Kill the current leader, wait for a new one, restart the old member. Returns the new leader.
fn change_leader(cluster: &mut Cluster) -> usize {
    let old = cluster.wait_leader(Duration::from_secs(10)).expect("leader");
    eprintln!("kill -9 leader {}", cluster.nodes[old].name);
    cluster.kill(old);
    let deadline = Instant::now() + Duration::from_secs(10);
    let new = loop {
        if let Some(l) = cluster.leader() {
            if l != old {
                break l;
            }
        }
        assert!(Instant::now() < deadline, "no new leader");
        std::thread::sleep(Duration::from_millis(50));
    };
    cluster.spawn(old).expect("restart");
    eprintln!("new leader {}", cluster.nodes[new].name);
    new
}

/// Kill the current leader and hand the lead to member `to` (restarting the killed one).
async fn change_leader_to(cluster: &mut Cluster, to: usize) -> usize {
    let old = cluster.wait_leader(Duration::from_secs(10)).expect("leader");
    eprintln!("kill -9 leader {}", cluster.nodes[old].name);
    cluster.kill(old);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut new = loop {
        match cluster.leader() {
            Some(l) if l != old => break l,
            _ => {}
        }
        assert!(Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if new != to {
        let name = cluster.nodes[to].name.clone();
        let mut at_leader = Client::connect([cluster.nodes[new].endpoint()], None).await.unwrap();
        let members = at_leader.member_list().await.unwrap();
        let id = members.members().iter().find(|m| m.name() == name).expect("member").id();
        at_leader.move_leader(id).await.expect("move-leader");
        new = cluster.wait_leader(Duration::from_secs(5)).expect("leader");
    }
    cluster.spawn(old).expect("restart");
    eprintln!("new leader {}", cluster.nodes[new].name);
    new
}

async fn exists(c: &mut Client, key: &str) -> bool {
    !c.get(key, None).await.expect("get").kvs().is_empty()
}

/// Every DELETE event for `key` since `rev`, read by a watch replay.
async fn deletes_since(c: &mut Client, key: &str, rev: i64) -> usize {
    let mut stream = c.watch(key, Some(WatchOptions::new().with_start_revision(rev))).await.unwrap();
    let mut deletes = 0;
    // History replay arrives right after creation; give it a moment, then stop.
    while let Ok(Some(resp)) =
        tokio::time::timeout(Duration::from_millis(500), stream.message()).await.map(|r| r.unwrap())
    {
        deletes += resp.events().iter().filter(|e| e.event_type() == EventType::Delete).count();
    }
    deletes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kept_alive_lease_survives_three_leader_changes() {
    let mut cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let mut c = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    let lease = c.lease_grant(10, None).await.unwrap().id();
    let put = c.put("kept", "alive", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    let start_rev = put.header().unwrap().revision();

    eprintln!("keep the lease alive every 2 s through every member in turn");
    let endpoints = cluster.all_endpoints();
    // Like a real client: each attempt has a deadline, and a member that does not answer in
    // time (dead, or restarting and not yet serving) is skipped for the next one.
    let keeper = tokio::spawn(async move {
        let mut i = 0usize;
        loop {
            let ep = endpoints[i % endpoints.len()].clone();
            i += 1;
            let attempt = async {
                let mut k = Client::connect([ep], None).await.ok()?;
                let (mut keeper, mut stream) = k.lease_keep_alive(lease).await.ok()?;
                keeper.keep_alive().await.ok()?;
                stream.message().await.ok()?
            };
            let renewed = tokio::time::timeout(Duration::from_millis(500), attempt).await.ok().flatten();
            eprintln!("keepalive via endpoint {}: {:?}", i % 3, renewed.as_ref().map(|r| r.ttl()));
            if renewed.is_some() {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    });

    for _ in 0..3 {
        change_leader(&mut cluster);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    cluster.wait_ready(Duration::from_secs(20)).unwrap();
    let mut c = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    assert!(exists(&mut c, "kept").await, "kept-alive lease's key vanished");
    let ttl = c.lease_time_to_live(lease, None).await.unwrap();
    assert!(ttl.ttl() > 0, "lease gone: ttl {}", ttl.ttl());
    assert_eq!(deletes_since(&mut c, "kept", start_rev).await, 0, "the key was deleted at some revision");
    keeper.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abandoned_lease_expires_within_ttl_plus_election_timeout_across_leader_changes() {
    let mut cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let mut c = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    let lease = c.lease_grant(10, None).await.unwrap().id();
    c.put("abandoned", "x", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    let granted = Instant::now();

    // Two leader changes, both over well before the TTL runs out (each takes ~2.5 s); a new
    // leader grants every lease one election timeout of grace, so a change that completes
    // after TTL - 1 s legitimately delays expiry by that grace. The second change hands the
    // lead to the member killed first: it replayed its log after the restart, so its own
    // marks count the whole TTL from the restart, and it must take the deadline from a peer
    // that saw the grant live.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = cluster.wait_leader(Duration::from_secs(10)).expect("leader");
    change_leader(&mut cluster);
    let second = change_leader_to(&mut cluster, first).await;
    assert_eq!(second, first, "the restarted member should lead now");
    eprintln!("leader changes done {:?} after the grant", granted.elapsed());
    assert!(granted.elapsed() < Duration::from_secs(9), "leader changes took too long to test the bound");

    let mut c = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    loop {
        match c.get("abandoned", Some(GetOptions::new())).await {
            Ok(r) if r.kvs().is_empty() => break,
            _ => {}
        }
        assert!(
            // TTL + the lease slack (1 s + 1%) + one election timeout of grace + a second of
            // slack for this machine; the exact bounds are the lease core's unit tests.
            granted.elapsed() < Duration::from_millis(13_000),
            "abandoned lease still alive after TTL + slack + election timeout"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = granted.elapsed();
    eprintln!("abandoned lease expired {took:?} after the grant");
    assert!(took >= Duration::from_secs(9), "lease expired early: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_leader_does_not_revoke_leases_the_new_leader_kept_alive() {
    let cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let leader = cluster.wait_leader(Duration::from_secs(5)).unwrap();
    let followers: Vec<String> = (0..3).filter(|i| *i != leader).map(|i| cluster.nodes[i].endpoint()).collect();
    // Clients talk only to the followers: the paused leader must not hold their streams.
    let mut c = Client::connect(followers.clone(), None).await.unwrap();
    let lease = c.lease_grant(3, None).await.unwrap().id();
    let put = c.put("svc/instance", "up", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    let start_rev = put.header().unwrap().revision();
    let (mut keeper, mut stream) = c.lease_keep_alive(lease).await.unwrap();
    let keep = tokio::spawn(async move {
        loop {
            if keeper.keep_alive().await.is_err() {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), stream.message()).await;
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
    });

    eprintln!("SIGSTOP leader {} for 8 s, well past the 3 s TTL", cluster.nodes[leader].name);
    cluster.signal(leader, "STOP");
    tokio::time::sleep(Duration::from_secs(8)).await;
    eprintln!("SIGCONT the old leader");
    cluster.signal(leader, "CONT");
    tokio::time::sleep(Duration::from_secs(4)).await;

    let mut reader = Client::connect(followers, None).await.unwrap();
    assert!(exists(&mut reader, "svc/instance").await, "lease kept alive by the new leader was revoked");
    assert_eq!(deletes_since(&mut reader, "svc/instance", start_rev).await, 0, "the key was deleted at some revision");
    let new_leader = cluster.wait_leader(Duration::from_secs(5)).unwrap();
    assert_ne!(new_leader, leader, "the paused member should have been replaced");
    keep.abort();
}

/// The seed's failure: a client renews its lease, the leader answers and dies at once. The key
/// must outlive the renewal's answer by the TTL it promised, watched through another member.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewal_answered_just_before_the_leader_dies_is_kept_by_the_next_leader() {
    const TTL_S: i64 = 6;
    let mut cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    for round in 0..3 {
        let leader = cluster.wait_leader(Duration::from_secs(10)).expect("leader");
        let other = (leader + 1) % 3;
        eprintln!("round {round}: grant a {TTL_S} s lease on the leader {}", cluster.nodes[leader].name);
        let mut at_leader = Client::connect([cluster.nodes[leader].endpoint()], None).await.unwrap();
        let lease = at_leader.lease_grant(TTL_S, None).await.unwrap().id();
        let key = format!("primary-{round}");
        let put = at_leader.put(key.as_str(), "me", Some(PutOptions::new().with_lease(lease))).await.unwrap();
        let rev = put.header().unwrap().revision();
        let mut watcher = Client::connect([cluster.nodes[other].endpoint()], None).await.unwrap();
        let mut events =
            watcher.watch(key.as_str(), Some(WatchOptions::new().with_start_revision(rev + 1))).await.unwrap();

        eprintln!("renew once after 4.2 s, then kill -9 the leader right after the answer");
        tokio::time::sleep(Duration::from_millis(4_200)).await;
        let (mut keeper, mut stream) = at_leader.lease_keep_alive(lease).await.unwrap();
        keeper.keep_alive().await.unwrap();
        let answer = stream.message().await.unwrap().expect("keep-alive answer");
        let acked = Instant::now();
        assert_eq!(answer.ttl(), TTL_S, "the renewal promised a full TTL");
        cluster.kill(leader);

        eprintln!("watch through {} for the key's deletion", cluster.nodes[other].name);
        let deleted = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let resp = events.message().await.expect("watch").expect("watch stream open");
                if resp.events().iter().any(|e| e.event_type() == EventType::Delete) {
                    return Instant::now();
                }
            }
        })
        .await
        .expect("the abandoned lease never expired");
        let lived = deleted - acked;
        eprintln!("round {round}: the key lived {lived:?} after the renewal's answer");
        assert!(
            lived >= Duration::from_secs(TTL_S as u64),
            "lease expired {:?} early",
            Duration::from_secs(TTL_S as u64) - lived
        );
        cluster.spawn(leader).expect("restart");
        cluster.wait_ready(Duration::from_secs(20)).expect("ready");
    }
}
