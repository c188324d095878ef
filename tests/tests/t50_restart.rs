//! Stop every member and start them again: data, revisions and leases (with their remaining
//! TTL) are all still there.

use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions};
use quorate_tests::{Cluster, Flavor};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_restart_keeps_data_revisions_and_leases() {
    let mut cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let mut c = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    for i in 0..200 {
        c.put(format!("data/{i:03}"), format!("value-{i}"), None).await.unwrap();
    }
    c.delete("data/007", None).await.unwrap();
    let lease = c.lease_grant(60, None).await.unwrap().id();
    c.put("leased", "x", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    let before = c.get("data/", Some(GetOptions::new().with_prefix())).await.unwrap();
    let rev_before = before.header().unwrap().revision();
    let hash_before = c.maintenance_client().hash_kv(0).await.unwrap().hash();
    drop(c);

    eprintln!("stop all three members");
    for i in 0..3 {
        cluster.stop(i);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("start them again");
    for i in 0..3 {
        cluster.spawn(i).unwrap();
    }
    cluster.wait_ready(Duration::from_secs(30)).expect("cluster back");

    let mut c = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    let after = c.get("data/", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(after.kvs().len(), 199);
    assert_eq!(after.header().unwrap().revision(), rev_before, "revision moved across the restart");
    for (a, b) in before.kvs().iter().zip(after.kvs()) {
        assert_eq!(
            (a.key(), a.value(), a.mod_revision(), a.create_revision(), a.version()),
            (b.key(), b.value(), b.mod_revision(), b.create_revision(), b.version())
        );
    }
    assert_eq!(c.maintenance_client().hash_kv(0).await.unwrap().hash(), hash_before);
    let ttl = c.lease_time_to_live(lease, None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 60);
    assert!(ttl.ttl() > 40 && ttl.ttl() <= 60, "remaining TTL after restart: {}", ttl.ttl());
    assert_eq!(c.get("leased", None).await.unwrap().kvs().len(), 1);
    // History survives too: an old revision is still readable.
    let old = c.get("data/000", Some(GetOptions::new().with_revision(2))).await.unwrap();
    assert_eq!(old.kvs()[0].value(), b"value-0");
}
