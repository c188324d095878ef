//! Membership and maintenance through the real `etcdctl` 3.4 (issue 3): the same steps against
//! quorate and etcd, outputs compared once ids and ports are normalised; then a cluster grown
//! from 1 to 5 members and shrunk to 3 under a write load.

use std::time::{Duration, Instant};

use quorate_tests::{etcdctl, normalize, Cluster, Flavor, Output};

/// What a user sees, with member URLs named, ids normalised and etcdctl's retry chatter gone.
fn visible(c: &Cluster, o: &Output) -> String {
    let err: String = o.stderr.lines().filter(|l| !l.starts_with("{\"level\"")).map(|l| format!("{l}\n")).collect();
    let mut s = format!("ok={}\n{}{}", o.ok, o.stdout, err);
    for n in &c.nodes {
        for host in ["127.0.0.1", "localhost"] {
            s = s.replace(&format!("{host}:{}", n.peer_port), &format!("<{}-peer>", n.name));
            s = s.replace(&format!("{host}:{}", n.client_port), &format!("<{}-client>", n.name));
        }
    }
    // Member order differs between servers: sort list-like lines and initial-cluster entries.
    let mut s = normalize(&s);
    // etcdctl pads ids to 16 columns (`%16x`): an id with a leading zero digit gets a space.
    while s.contains("  <id>") {
        s = s.replace("  <id>", " <id>");
    }
    let mut lines: Vec<String> = s
        .lines()
        .map(|l| match l.strip_prefix("ETCD_INITIAL_CLUSTER=\"") {
            Some(rest) => {
                let mut parts: Vec<&str> = rest.trim_end_matches('"').split(',').collect();
                parts.sort_unstable();
                format!("ETCD_INITIAL_CLUSTER=\"{}\"", parts.join(","))
            }
            None => l.to_string(),
        })
        .collect();
    if lines.iter().filter(|l| l.starts_with("<id>, ") || l.starts_with("http://<")).count() > 1 {
        lines.sort();
    }
    lines.join("\n")
}

/// Member id (hex) of the member named `name`, from `member list`.
fn id_of(c: &Cluster, name: &str) -> String {
    let out = etcdctl(&c.endpoints(), &["member", "list"]);
    out.stdout
        .lines()
        .find(|l| l.split(", ").nth(2) == Some(name))
        .unwrap_or_else(|| panic!("{name} not in {}", out.stdout))
        .split(", ")
        .next()
        .unwrap()
        .to_string()
}

fn id_of_peer(c: &Cluster, peer_url: &str) -> String {
    let out = etcdctl(&c.endpoints(), &["member", "list"]);
    out.stdout.lines().find(|l| l.contains(peer_url)).expect("member by peer url").split(", ").next().unwrap().into()
}

/// Retry `args` until it succeeds (or 20 s pass); the last output.
fn until_ok(c: &Cluster, endpoints: &str, args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = etcdctl(endpoints, args);
        if out.ok || Instant::now() > deadline {
            return out;
        }
        let _ = c;
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The membership script; returns (step, what the user saw) pairs.
fn membership_script(c: &mut Cluster) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let mut record = |c: &Cluster, step: &str, o: Output| {
        let shown = visible(c, &o);
        eprintln!("[{:?}] {step}:\n{shown}", c.flavor);
        seen.push((step.to_string(), shown));
    };

    etcdctl(&c.endpoints(), &["put", "k", "v"]);
    let new = c.new_node();
    let peer = c.nodes[new].peer_url();
    let name = c.nodes[new].name.clone();
    // etcd refuses membership changes until every member has been connected for 5 s
    // ("unhealthy cluster", --strict-reconfig-check): retry until accepted.
    let out = until_ok(c, &c.endpoints(), &["member", "add", &name, "--learner", &format!("--peer-urls={peer}")]);
    record(c, "member add --learner", out);
    let learner = id_of_peer(c, &peer);
    let taken = format!("--peer-urls={}", c.nodes[0].peer_url());
    record(c, "member add with a taken peer URL", etcdctl(&c.endpoints(), &["member", "add", "x", &taken]));
    record(c, "member list with an unstarted learner", etcdctl(&c.endpoints(), &["member", "list"]));
    record(c, "promote an unstarted learner", etcdctl(&c.endpoints(), &["member", "promote", &learner]));
    let leader = c.wait_leader(Duration::from_secs(10)).expect("leader");
    let to_learner = etcdctl(&c.nodes[leader].endpoint(), &["move-leader", &learner]);
    record(c, "move leadership to a learner", to_learner);

    c.join(new).expect("start the learner");
    let learner_ep = c.nodes[new].endpoint();
    let served = until_ok(c, &learner_ep, &["get", "k", "--consistency=s"]);
    record(c, "serializable get on the learner", served);
    wait_for("the learner to publish its name", || {
        etcdctl(&c.nodes[0].endpoint(), &["member", "list"]).stdout.contains(&format!(", {name}, "))
    });
    record(c, "member list with a started learner", etcdctl(&c.nodes[0].endpoint(), &["member", "list"]));
    let promoted = until_ok(c, &c.nodes[0].endpoint(), &["member", "promote", &learner]);
    record(c, "promote the caught-up learner", promoted);
    record(c, "promote it again", etcdctl(&c.endpoints(), &["member", "promote", &learner]));
    record(c, "promote an unknown member", etcdctl(&c.endpoints(), &["member", "promote", "1234"]));

    let m2 = id_of(c, "m2");
    let alias = format!("--peer-urls=http://localhost:{}", c.nodes[1].peer_port);
    record(c, "member update", until_ok(c, &c.endpoints(), &["member", "update", &m2, &alias]));
    record(c, "member list after update", etcdctl(&c.endpoints(), &["member", "list"]));
    record(
        c,
        "member update unknown",
        etcdctl(&c.endpoints(), &["member", "update", "1234", "--peer-urls=http://127.0.0.1:1"]),
    );
    record(c, "member remove unknown", etcdctl(&c.endpoints(), &["member", "remove", "1234"]));

    // HashKV: equal on every member (the numbers differ from etcd's: another hash function).
    wait_for("every member to apply the last change", || {
        let h = hashkv_cluster(c);
        h.len() == 4 && h.iter().all(|x| *x == h[0])
    });
    let mut hashes = etcdctl(&c.endpoints(), &["endpoint", "hashkv", "--cluster"]);
    hashes.stdout = hashes.stdout.lines().map(|l| format!("{}, <hash>\n", l.rsplit_once(", ").unwrap().0)).collect();
    record(c, "endpoint hashkv --cluster", hashes);
    let status = etcdctl(&c.endpoints(), &["endpoint", "status", "--cluster", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&status.stdout).expect("status json");
    let shape: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let st = &s["Status"];
            let is_leader = st["leader"] == st["header"]["member_id"];
            let learner = st["isLearner"].as_bool().unwrap_or(false);
            format!("leader={is_leader} learner={learner} index>0={}", st["raftIndex"].as_u64() > Some(0))
        })
        .collect();
    let mut shape = shape;
    shape.sort();
    seen_shape(c, &shape);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.db");
    let mut saved = etcdctl(&c.nodes[0].endpoint(), &["snapshot", "save", file.to_str().unwrap()]);
    saved.stdout = saved.stdout.replace(dir.path().to_str().unwrap(), "<dir>");
    record(c, "snapshot save", saved);
    record(c, "alarm list", etcdctl(&c.endpoints(), &["alarm", "list"]));
    record(c, "alarm disarm", etcdctl(&c.endpoints(), &["alarm", "disarm"]));
    record(c, "defrag", etcdctl(&c.nodes[0].endpoint(), &["defrag"]));

    // Remove the leader, asking the other members (a leader removing itself may stop before
    // it answers; etcd does).
    let leader = c.wait_leader(Duration::from_secs(10)).expect("leader");
    let leader_name = c.nodes[leader].name.clone();
    let leader_id = id_of(c, &leader_name);
    let others: Vec<String> =
        c.nodes.iter().enumerate().filter(|(i, n)| *i != leader && n.is_running()).map(|(_, n)| n.endpoint()).collect();
    let out = until_ok(c, &others.join(","), &["member", "remove", &leader_id]);
    record(c, "member remove the leader", out);
    wait_for("the removed leader to exit", || c.exited(leader));
    let rest = c.endpoints();
    let put = until_ok(c, &rest, &["put", "after-removal", "1"]);
    record(c, "put after removing the leader", put);
    // Which member led is chance: name the survivors alike, and check the leader is gone.
    let mut list = etcdctl(&rest, &["member", "list"]);
    assert!(!list.stdout.contains(&format!(", {leader_name}, ")), "{}", list.stdout);
    list.stdout = visible(c, &list);
    for n in &c.nodes {
        list.stdout = list.stdout.replace(&format!("<{}-", n.name), "<m-").replace(&format!(", {}, ", n.name), ", m, ");
    }
    record(c, "member list after removing the leader", list);
    seen
}

#[test]
fn membership_through_etcdctl_matches_etcd() {
    let (mut q, mut e) = std::thread::scope(|s| {
        let q = s.spawn(|| Cluster::start(Flavor::Quorate, 3).expect("quorate cluster"));
        let e = s.spawn(|| Cluster::start(Flavor::Etcd, 3).expect("etcd cluster"));
        (q.join().unwrap(), e.join().unwrap())
    });
    let qs = membership_script(&mut q);
    let es = membership_script(&mut e);
    for ((step, a), (_, b)) in qs.iter().zip(es.iter()) {
        eprintln!("== {step}\n{a}");
        assert_eq!(a, b, "{step}: quorate (left) and etcd (right) differ");
    }
    let log = q.log(q.nodes.iter().position(|n| !n.is_running()).expect("the removed member"));
    assert!(log.contains("this member has been removed from the cluster"), "the removed member says why");
}

/// `endpoint status --cluster` on a healthy 4-member cluster: one leader, no learner.
fn seen_shape(c: &Cluster, shape: &[String]) {
    let expect =
        ["leader=false learner=false index>0=true"; 3].into_iter().chain(["leader=true learner=false index>0=true"]);
    let expect: Vec<String> = expect.map(String::from).collect();
    assert_eq!(shape, expect, "{:?}: endpoint status --cluster", c.flavor);
}

/// `endpoint hashkv --cluster`: one hash per member, equal across members.
fn hashkv_cluster(c: &Cluster) -> Vec<String> {
    let out = etcdctl(&c.endpoints(), &["endpoint", "hashkv", "--cluster"]);
    assert!(out.ok, "{}", out.stderr);
    out.stdout.lines().map(|l| l.rsplit(", ").next().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_from_one_to_five_and_shrink_to_three_under_load() {
    let mut c = Cluster::start(Flavor::Quorate, 1).expect("cluster");
    let client = etcd_client::Client::connect([c.nodes[0].endpoint()], None).await.unwrap();
    let load = quorate_tests::load::Load::start(&client, 4, "grow");

    for _ in 2..=5 {
        let i = c.new_node();
        let (name, peer) = (c.nodes[i].name.clone(), c.nodes[i].peer_url());
        let out = etcdctl(&c.endpoints(), &["member", "add", &name, &format!("--peer-urls={peer}")]);
        assert!(out.ok, "member add {name}: {}", out.stderr);
        c.join(i).unwrap();
        // Added as a voter: it catches up as a learner, then the leader promotes it.
        wait_for(&format!("{name} to be a started voter"), || {
            let list = etcdctl(&c.nodes[0].endpoint(), &["member", "list"]).stdout;
            list.lines().any(|l| l.contains(&format!(", started, {name}, ")) && l.ends_with(", false"))
        });
        let acked = load.acked();
        eprintln!("{name} joined; {acked} writes acknowledged so far");
    }
    // The member list shows a member added as a voter as one at once (as etcd does); it
    // counts towards the quorum once the leader has promoted it, which each member's own
    // Status reports when it has applied the promotion.
    wait_for("every member to report itself a voter", || {
        let status = etcdctl(&c.endpoints(), &["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap_or_default();
        v.as_array()
            .is_some_and(|all| all.len() == 5 && all.iter().all(|s| s["Status"]["isLearner"].as_bool() != Some(true)))
    });

    // Shrink to 3 by removing the leader and one follower: first hand leadership to m5 (the
    // load talks to m1), then remove m5 and m4.
    let m5 = id_of(&c, "m5");
    let moved = etcdctl(&c.endpoints(), &["move-leader", &m5]);
    assert!(moved.ok, "move-leader: {}", moved.stderr);
    assert_eq!(c.wait_leader(Duration::from_secs(10)).unwrap(), 4);
    let victims = vec![4, 3];
    for v in victims {
        let id = id_of(&c, &c.nodes[v].name.clone());
        let out = etcdctl(&c.nodes[0].endpoint(), &["member", "remove", &id]);
        assert!(out.ok, "member remove {}: {}", c.nodes[v].name, out.stderr);
        wait_for("the removed member to exit", || c.exited(v));
        eprintln!("{} removed; {} writes acknowledged so far", c.nodes[v].name, load.acked());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let record = load.stop().await;
    assert!(record.acked.len() > 100, "the load made progress: {}", record.acked.len());
    eprintln!("{} writes acknowledged, {} failed or unknown", record.acked.len(), record.failures);

    // No acknowledged write lost, read through every remaining member.
    let mut members: Vec<etcd_client::Client> = Vec::new();
    for n in c.nodes.iter().filter(|n| n.is_running()) {
        members.push(etcd_client::Client::connect([n.endpoint()], None).await.unwrap());
    }
    assert_eq!(members.len(), 3);
    for m in &mut members {
        let r = m.get("grow/", Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
        let stored: std::collections::BTreeMap<String, String> =
            r.kvs().iter().map(|kv| (kv.key_str().unwrap().into(), kv.value_str().unwrap().into())).collect();
        for (k, v) in &record.acked {
            assert_eq!(stored.get(k), Some(v), "acknowledged write {k} lost");
        }
    }
    let ranges = quorate_tests::ranges_at_one_revision(&c).await;
    for (name, kvs) in &ranges[1..] {
        assert_eq!(kvs, &ranges[0].1, "{name} differs from {}", ranges[0].0);
    }
    let hashes = hashkv_cluster(&c);
    assert_eq!(hashes.len(), 3);
    assert!(hashes.iter().all(|h| *h == hashes[0]), "HashKV differs: {hashes:?}");
}
