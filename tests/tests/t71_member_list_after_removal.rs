//! Membership answers that can be trusted (issue 13 §5). A member removed while it could not
//! hear of it (paused here, as a member cut off or stalled would be) still holds a
//! configuration that lists itself, and the leader sends it nothing more. Asked for the member
//! list once it runs again, it must not present that stale view: it finds out from the leader
//! that it is out, refuses with etcd's "the member has been permanently removed from the
//! cluster" and exits; a client that also knows the other members gets the true list from
//! them.

use std::time::{Duration, Instant};

use quorate_tests::{etcdctl, Cluster, Flavor};

/// The leader tells a removed member it is out for about 6.5 s (five tries of 1.3 s); a member
/// paused longer than that has missed the notice as well as the log entries.
const PAUSED: Duration = Duration::from_secs(8);

#[test]
fn a_member_removed_while_paused_refuses_its_stale_member_list_and_exits() {
    let mut c = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let leader = c.wait_leader(Duration::from_secs(10)).expect("leader");
    let gone = (leader + 1) % 3;
    let rest: Vec<String> = (0..3).filter(|i| *i != gone).map(|i| c.nodes[i].endpoint()).collect();
    let rest = rest.join(",");
    let list = etcdctl(&rest, &["member", "list"]);
    assert!(list.ok, "{}", list.stderr);
    let gone_name = c.nodes[gone].name.clone();
    let gone_id = list
        .stdout
        .lines()
        .find(|l| l.split(", ").nth(2) == Some(gone_name.as_str()))
        .and_then(|l| l.split(", ").next())
        .unwrap_or_else(|| panic!("{gone_name} not in {}", list.stdout))
        .to_string();

    c.signal(gone, "STOP");
    let removed = etcdctl(&rest, &["member", "remove", &gone_id]);
    assert!(removed.ok, "member remove: {}", removed.stderr);
    assert!(etcdctl(&rest, &["put", "after-removal", "1"]).ok, "a write after the removal");
    std::thread::sleep(PAUSED);
    c.signal(gone, "CONT");

    // Asked directly, the removed member refuses; and from then on it serves nothing from its
    // stale state, not even a serializable read (which a member answers from its own state).
    // Both go over one connection, one right after the other: the member exits a second after
    // it learns of its removal, and a new etcdctl process can take longer than that to start.
    let endpoint = c.nodes[gone].endpoint();
    let (listed, read) = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut client = etcd_client::Client::connect([endpoint], None).await.expect("connect");
        let listed = client.member_list().await;
        let read = client.get("k", Some(etcd_client::GetOptions::new().with_serializable())).await;
        (listed.map(|r| format!("{:?}", r.members())), read.map(|r| format!("{:?}", r.kvs())))
    });
    const REMOVED: &str = "the member has been permanently removed from the cluster";
    match listed {
        Ok(members) => panic!("the removed member answered member list: {members}"),
        Err(e) => assert!(e.to_string().contains(REMOVED), "the refusal names the removal: {e}"),
    }
    match read {
        Ok(kvs) => panic!("the removed member served a serializable read: {kvs}"),
        Err(e) => assert!(e.to_string().contains(REMOVED), "refused by the gate, by name: {e}"),
    }

    // A client that has every endpoint, the removed one first, gets the true list.
    let all = format!("{},{rest}", c.nodes[gone].endpoint());
    let listed = etcdctl(&all, &["member", "list"]);
    assert!(listed.ok, "{}", listed.stderr);
    assert!(!listed.stdout.contains(&format!(", {gone_name}, ")), "{}", listed.stdout);
    assert_eq!(listed.stdout.lines().count(), 2, "{}", listed.stdout);

    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.exited(gone) {
        assert!(Instant::now() < deadline, "the removed member did not exit");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(c.log(gone).contains("this member has been removed from the cluster"), "its log says why");
}
