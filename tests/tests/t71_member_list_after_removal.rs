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

    // Asked directly, the removed member refuses (it may already be gone: then the connection
    // fails; what it must never do is list itself).
    let direct = etcdctl(&c.nodes[gone].endpoint(), &["--command-timeout=5s", "member", "list"]);
    assert!(
        !direct.stdout.contains(&format!(", {gone_name}, ")),
        "the removed member listed itself:\n{}",
        direct.stdout
    );
    assert!(!direct.ok, "the removed member answered: {}", direct.stdout);
    assert!(
        direct.stderr.contains("the member has been permanently removed from the cluster"),
        "the refusal names the removal: {}",
        direct.stderr
    );

    // Nor does it serve anything else from its stale state in the moment before it exits, not
    // even a serializable read (which a member answers from its own state).
    let read = etcdctl(&c.nodes[gone].endpoint(), &["--command-timeout=2s", "get", "k", "--consistency=s"]);
    assert!(!read.ok, "the removed member served a read: {}", read.stdout);

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
