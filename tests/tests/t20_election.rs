//! The brief's primary-election pattern with the Rust `etcd-client` crate: a 5 s lease and
//! `Txn.If(CreateRevision(k) == 0).Then(Put(k, v, lease))`, run by 20 contenders at once.

use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use quorate_tests::{Cluster, Flavor};

const KEY: &str = "/service/primary";
const CONTENDERS: usize = 20;
/// The brief's lease TTL.
const LEASE_TTL: Duration = Duration::from_secs(5);
/// How long after its TTL an abandoned lease's key may take to go, here.
const EXPIRY_EVENTUALLY: Duration = Duration::from_secs(15);

/// One round: every contender still in the race grants a lease and tries to take the key.
/// Returns the winners' (name, lease).
async fn round(client: &Client, names: &[String]) -> Vec<(String, i64)> {
    let mut tasks = Vec::new();
    for name in names {
        let mut c = client.clone();
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            let lease = c.lease_grant(LEASE_TTL.as_secs() as i64, None).await.expect("grant").id();
            let txn = Txn::new().when([Compare::create_revision(KEY, CompareOp::Equal, 0)]).and_then([TxnOp::put(
                KEY,
                name.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
            let won = c.txn(txn).await.expect("txn").succeeded();
            (name, lease, won)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (name, lease, won) = t.await.unwrap();
        if won {
            winners.push((name, lease));
        }
    }
    winners
}

async fn holder(client: &mut Client) -> Option<String> {
    let r = client.get(KEY, None).await.expect("get");
    r.kvs().first().map(|kv| kv.value_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_one_primary_per_round() {
    let cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let mut client = Client::connect(cluster.all_endpoints(), None).await.expect("connect");
    let mut names: Vec<String> = (0..CONTENDERS).map(|i| format!("contender-{i}")).collect();

    eprintln!("round 1: {CONTENDERS} contenders race for the key");
    let winners = round(&client, &names).await;
    assert_eq!(winners.len(), 1, "exactly one winner, got {winners:?}");
    let (first, first_lease) = winners[0].clone();
    assert_eq!(holder(&mut client).await.as_deref(), Some(first.as_str()));

    eprintln!("revoke the winner's lease: its key goes, one new winner follows");
    client.lease_revoke(first_lease).await.expect("revoke");
    assert_eq!(holder(&mut client).await, None);
    names.retain(|n| *n != first);
    // Every grant of this round is answered after this instant, so no lease of the round may
    // end before it plus the TTL.
    let granted_after = Instant::now();
    let winners = round(&client, &names).await;
    assert_eq!(winners.len(), 1, "exactly one winner after revoke, got {winners:?}");
    let (second, _) = winners[0].clone();
    assert_ne!(second, first);

    eprintln!("let the second winner's lease expire (no keepalive)");
    // A generous "eventually": the exact bound (TTL + RENEW_SLACK, to one tick) is the lease
    // core's virtual-time test `an_abandoned_lease_expires_after_its_ttl_plus_the_slack_and_not_before`;
    // here a loaded machine may add scheduling delay, never an early expiry.
    let deadline = granted_after + LEASE_TTL + EXPIRY_EVENTUALLY;
    while holder(&mut client).await.is_some() {
        assert!(Instant::now() < deadline, "lease did not expire within TTL + {EXPIRY_EVENTUALLY:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone_after = granted_after.elapsed();
    assert!(gone_after >= LEASE_TTL, "the key went {gone_after:?} after the grant was sent, before its TTL");
    names.retain(|n| *n != second);
    let winners = round(&client, &names).await;
    assert_eq!(winners.len(), 1, "exactly one winner after expiry, got {winners:?}");
    assert!(winners[0].0 != first && winners[0].0 != second);
}
