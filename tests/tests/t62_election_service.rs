//! The v3election service (issue 3): `Observe` sees every leader change and every proclaimed
//! value in order, and `Leader` on every member agrees with the latest `Proclaim`.

use std::time::Duration;

use quorate_api_grpc::pb::etcdserverpb as pb;
use quorate_api_grpc::pb::v3electionpb as el;
use quorate_tests::{Cluster, Flavor};
use tonic::transport::Channel;

const NAME: &[u8] = b"elections/primary";

async fn channel(endpoint: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{endpoint}")).unwrap().connect().await.unwrap()
}

async fn lease(ch: &Channel) -> i64 {
    let mut l = pb::lease_client::LeaseClient::new(ch.clone());
    l.lease_grant(pb::LeaseGrantRequest { ttl: 30, id: 0 }).await.unwrap().into_inner().id
}

fn campaign(ch: &Channel, lease: i64, value: &str) -> tokio::task::JoinHandle<el::LeaderKey> {
    let mut e = el::election_client::ElectionClient::new(ch.clone());
    let value = value.as_bytes().to_vec();
    tokio::spawn(async move {
        let r = e.campaign(el::CampaignRequest { name: NAME.to_vec(), lease, value }).await.expect("campaign");
        assert!(r.metadata().get("quorate-fence").is_some(), "campaign response carries the fencing token");
        r.into_inner().leader.unwrap()
    })
}

/// Wait until `n` candidates are queued under the election's name.
async fn wait_queued(ch: &Channel, n: i64) {
    let mut kv = pb::kv_client::KvClient::new(ch.clone());
    let mut prefix = NAME.to_vec();
    prefix.push(b'/');
    let mut end = prefix.clone();
    *end.last_mut().unwrap() += 1;
    for _ in 0..200 {
        let r = kv
            .range(pb::RangeRequest {
                key: prefix.clone(),
                range_end: end.clone(),
                count_only: true,
                ..Default::default()
            })
            .await
            .unwrap();
        if r.into_inner().count == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{n} candidates never queued");
}

async fn leader_everywhere(chs: &[Channel]) -> Vec<String> {
    let mut out = Vec::new();
    for ch in chs {
        let mut e = el::election_client::ElectionClient::new(ch.clone());
        let kv = e.leader(el::LeaderRequest { name: NAME.to_vec() }).await.expect("leader").into_inner().kv.unwrap();
        out.push(String::from_utf8(kv.value).unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_sees_every_change_and_leader_agrees_everywhere() {
    let cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let chs: Vec<Channel> = futures::future::join_all(cluster.all_endpoints().iter().map(|e| channel(e))).await;

    // No one has campaigned yet: etcd's error.
    let mut e0 = el::election_client::ElectionClient::new(chs[0].clone());
    let err = e0.leader(el::LeaderRequest { name: NAME.to_vec() }).await.unwrap_err();
    assert_eq!(err.message(), "election: no leader");

    let mut observed = e0.observe(el::LeaderRequest { name: NAME.to_vec() }).await.unwrap().into_inner();

    let (l1, l2, l3) = (lease(&chs[0]).await, lease(&chs[1]).await, lease(&chs[2]).await);
    let first = campaign(&chs[0], l1, "a").await.unwrap();
    let second = campaign(&chs[1], l2, "b");
    wait_queued(&chs[2], 2).await;
    let third = campaign(&chs[2], l3, "c");
    wait_queued(&chs[2], 3).await;

    let mut e1 = el::election_client::ElectionClient::new(chs[1].clone());
    e1.proclaim(el::ProclaimRequest { leader: Some(first.clone()), value: b"a2".to_vec() }).await.unwrap();
    assert_eq!(leader_everywhere(&chs).await, ["a2", "a2", "a2"]);

    // A queued candidate is not the leader and cannot proclaim.
    let mut fake = first.clone();
    fake.rev += 1;
    let err = e1.proclaim(el::ProclaimRequest { leader: Some(fake), value: b"x".to_vec() }).await.unwrap_err();
    assert_eq!(err.message(), "election: not leader");

    e1.resign(el::ResignRequest { leader: Some(first) }).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), second).await.expect("second elected").unwrap();
    e1.proclaim(el::ProclaimRequest { leader: Some(second.clone()), value: b"b2".to_vec() }).await.unwrap();
    assert_eq!(leader_everywhere(&chs).await, ["b2", "b2", "b2"]);

    // The second leader's lease goes: the third takes over.
    pb::lease_client::LeaseClient::new(chs[2].clone()).lease_revoke(pb::LeaseRevokeRequest { id: l2 }).await.unwrap();
    let third = tokio::time::timeout(Duration::from_secs(5), third).await.expect("third elected").unwrap();
    assert!(third.rev > second.rev);
    assert_eq!(leader_everywhere(&chs).await, ["c", "c", "c"]);

    let mut seen = Vec::new();
    while seen.len() < 5 {
        let msg = tokio::time::timeout(Duration::from_secs(5), observed.message()).await.expect("observe").unwrap();
        let kv = msg.unwrap().kv.unwrap();
        seen.push(String::from_utf8(kv.value).unwrap());
    }
    assert_eq!(seen, ["a", "a2", "b", "b2", "c"], "Observe order");
}
