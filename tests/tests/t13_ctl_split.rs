//! The two doctor findings that need a cluster to disagree with itself, made for real:
//!
//! - `split-view`: three members, each in its own network namespace (as in t90, with
//!   `quorate_drill::net`); the leader is cut off from the other two by nftables drop rules,
//!   while this test (and so `quorate ctl`) still reaches every member's client and HTTP port.
//!   The doctor names the cut-off leader and shows each side's leader and term; after healing
//!   the finding goes away. Needs root (CI runs as root).
//! - `diverged`: one member started with `--drill-failpoints` is told to apply the next put of
//!   one key with a different value; the doctor names it, the revision and both hashes.
//!
//! Namespaces, rules and processes are removed when the test ends, also when it fails.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::Client;
use quorate_drill::net::Net;
use quorate_tests::{ctl, doctor_until, findings, http, quorate_bin, Cluster, Flavor};
use serde_json::Value;

fn names(f: &Value) -> Vec<String> {
    let mut v: Vec<String> = f["members"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect();
    v.sort();
    v
}

fn severity_code(f: &Value) -> i32 {
    match f["severity"].as_str() {
        Some("degraded") => 1,
        Some("critical") => 2,
        other => panic!("unknown severity {other:?}"),
    }
}

/// Three members in network namespaces of this test's own. Dropped in field order: the
/// processes first, then the namespaces (whose `Drop` removes every link and rule).
struct NsCluster {
    children: Vec<Child>,
    net: Net,
    _dir: tempfile::TempDir,
}

impl Drop for NsCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl NsCluster {
    fn start() -> NsCluster {
        let net = Net::create(3).expect("network namespaces (this test needs root: CI runs it as root)");
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = NsCluster { children: Vec::new(), net, _dir: dir };
        let ic: Vec<String> = (0..3).map(|s| format!("m{}=http://{}:2380", s + 1, cluster.net.ip(s))).collect();
        for s in 0..3 {
            let ip = cluster.net.ip(s);
            let log = std::fs::File::create(cluster._dir.path().join(format!("m{}.log", s + 1))).unwrap();
            let child = Command::new("ip")
                .args(["netns", "exec", &cluster.net.ns_member(s)])
                .arg(quorate_bin())
                .args(["server", "--name", &format!("m{}", s + 1), "--initial-cluster", &ic.join(",")])
                .args(["--data-dir", cluster._dir.path().join(format!("m{}", s + 1)).to_str().unwrap()])
                .args(["--listen-client-urls", &format!("http://{ip}:2379")])
                .args(["--listen-peer-urls", &format!("http://{ip}:2380")])
                .args(["--listen-http", &format!("{ip}:8500")])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            cluster.children.push(child);
        }
        cluster
    }

    fn endpoints(&self) -> String {
        (0..3).map(|s| format!("{}:2379", self.net.ip(s))).collect::<Vec<_>>().join(",")
    }
}

#[test]
fn a_leader_cut_off_from_the_others_is_a_split_view_until_healed() {
    let cluster = NsCluster::start();
    let eps = cluster.endpoints();

    eprintln!("three members in their own namespaces: wait for a healthy cluster");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let run = ctl(&eps, &["doctor", "-w", "json"]);
        if run.code == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "never healthy: {}\n{}", run.stdout, run.stderr);
        std::thread::sleep(Duration::from_millis(500));
    }
    let refused = tokio::runtime::Runtime::new().unwrap().block_on(quorate_tests::http_at(
        &format!("{}:8500", cluster.net.ip(0)),
        "PUT",
        "/debug/failpoints/diverge-put-key",
        Some("k"),
        Duration::from_secs(3),
    ));
    assert_eq!(refused.unwrap().status, 404, "failpoints are off without --drill-failpoints");
    let view = ctl(&eps, &["status", "-w", "json"]).json();
    let members = view["members"].as_array().unwrap();
    let leader_row = members.iter().find(|m| m["role"] == "leader").expect("a leader");
    let leader_name = leader_row["name"].as_str().unwrap().to_string();
    let old_term = leader_row["term"].as_u64().unwrap();
    let slot: usize = leader_name.trim_start_matches('m').parse::<usize>().unwrap() - 1;

    eprintln!("cut {leader_name} (leader in term {old_term}) off from the other two");
    let links: Vec<(usize, usize)> = (0..3).filter(|o| *o != slot).flat_map(|o| [(slot, o), (o, slot)]).collect();
    cluster.net.cut(&links).unwrap();
    let (run, report) = doctor_until(&eps, "split-view", |_, r| !findings(r, "split-view").is_empty());
    eprintln!("doctor: {report:#}");
    let split = findings(&report, "split-view");
    assert_eq!(split.len(), 1, "one split-view finding: {report:#}");
    let f = split[0];
    assert_eq!(names(f), vec![leader_name.clone()], "names the member cut off: {report:#}");
    let evidence = f["evidence"].as_str().unwrap();
    let others: Vec<String> = (0..3).filter(|o| *o != slot).map(|o| format!("m{}", o + 1)).collect();
    let new_view = ctl(&eps, &["status", "-w", "json"]).json();
    let new_leader = new_view["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "leader" && m["name"] != leader_name.as_str())
        .map(|m| (m["name"].as_str().unwrap().to_string(), m["term"].as_u64().unwrap()));
    let (new_leader, new_term) = new_leader.expect("the other two elected a leader of their own");
    assert!(others.contains(&new_leader), "{new_view:#}");
    assert!(new_term > old_term, "{new_view:#}");
    // Each side's leader and term.
    assert!(evidence.contains(&format!("{leader_name} in term {old_term}")), "old side: {evidence}");
    assert!(evidence.contains(&format!("{new_leader} in term {new_term}")), "new side: {evidence}");
    for o in &others {
        assert!(evidence.contains(o.as_str()), "{o} in {evidence}");
    }
    assert_eq!(run.code, report["verdict"].as_str().map_or(-1, |v| if v == "critical" { 2 } else { 1 }));
    assert!(run.code >= severity_code(f), "exit {} below the finding's severity: {report:#}", run.code);
    assert!(f["fix"].as_array().unwrap().iter().any(|s| s.as_str().unwrap().contains('`')), "{report:#}");
    // What the runbook tells the operator to look at: etcdctl shows both leaders, in two terms.
    let st = quorate_tests::etcdctl(&eps, &["endpoint", "status", "-w", "json"]);
    assert!(st.ok, "{}", st.stderr);
    let st: Value = serde_json::from_str(&st.stdout).unwrap();
    let mut leading: Vec<u64> = st
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["Status"]["leader"] == e["Status"]["header"]["member_id"])
        .map(|e| e["Status"]["raftTerm"].as_u64().unwrap())
        .collect();
    leading.sort();
    assert_eq!(leading, vec![old_term, new_term], "etcdctl endpoint status: {st:#}");
    let text = ctl(&eps, &["doctor"]);
    eprintln!("{}", text.stdout);
    assert_eq!(text.stdout.lines().next(), Some("verdict: degraded"), "{}", text.stdout);
    assert_eq!(text.code, 1);

    eprintln!("heal: the old leader follows {new_leader} again and the finding goes away");
    cluster.net.heal().unwrap();
    let (run, report) = doctor_until(&eps, "healed", |run, r| run.code == 0 && findings(r, "split-view").is_empty());
    assert_eq!(report["verdict"], "healthy", "{report:#}");
    assert_eq!(run.code, 0);
}

#[test]
fn a_member_that_applied_a_write_differently_is_diverged_and_critical() {
    let cluster = Cluster::start_with(Flavor::Quorate, 3, &["--drill-failpoints"]).expect("cluster");
    let leader = cluster.wait_leader(Duration::from_secs(20)).expect("leader");
    let odd = (leader + 1) % 3;
    let odd_name = cluster.nodes[odd].name.clone();
    let all = cluster.all_endpoints().join(",");
    let (_, report) = doctor_until(&all, "healthy", |run, r| run.code == 0 && r["verdict"] == "healthy");
    assert!(report["findings"].as_array().unwrap().is_empty(), "{report:#}");

    eprintln!("arm the failpoint on {odd_name}: its next apply of a put to diverge/key stores another value");
    let set = http(&cluster.nodes[odd], "PUT", "/debug/failpoints/diverge-put-key", Some("diverge/key")).unwrap();
    assert_eq!(set.status, 200, "{}", set.body);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = Client::connect([cluster.nodes[leader].endpoint()], None).await.unwrap();
        c.put("diverge/before", "v", None).await.unwrap();
        c.put("diverge/key", "the value every member was sent", None).await.unwrap();
        c.put("diverge/after", "v", None).await.unwrap();
    });

    let (run, report) = doctor_until(&all, "diverged", |_, r| !findings(r, "diverged").is_empty());
    eprintln!("doctor: {report:#}");
    assert_eq!(run.code, 2, "{report:#}");
    assert_eq!(report["verdict"], "critical", "{report:#}");
    let diverged = findings(&report, "diverged");
    assert_eq!(diverged.len(), 1, "{report:#}");
    assert_eq!(diverged[0]["severity"], "critical");
    assert_eq!(names(diverged[0]), vec![odd_name.clone()], "names only the odd member: {report:#}");

    eprintln!("status shows the odd member's hash apart from the others', at one revision");
    let view = ctl(&all, &["status", "-w", "json"]).json();
    let rows = view["members"].as_array().unwrap();
    let hash_of = |name: &str| rows.iter().find(|m| m["name"] == name).unwrap()["hash"].as_u64().expect("a hash");
    let odd_hash = hash_of(&odd_name);
    let others: Vec<u64> = cluster.nodes.iter().filter(|n| n.name != odd_name).map(|n| hash_of(&n.name)).collect();
    assert_eq!(others[0], others[1], "the two others agree: {view:#}");
    assert_ne!(odd_hash, others[0], "the odd member's hash differs: {view:#}");
    let rev = view["hash_revision"].as_i64().expect("hashes taken at one revision");
    let evidence = diverged[0]["evidence"].as_str().unwrap();
    assert!(evidence.contains(&format!("revision {rev}")), "the revision in {evidence}");
    assert!(evidence.contains(&format!("{odd_hash:08x}")), "the odd hash in {evidence}");
    assert!(evidence.contains(&format!("{:08x}", others[0])), "the majority's hash in {evidence}");
    let text = ctl(&all, &["doctor"]);
    eprintln!("{}", text.stdout);
    assert_eq!(text.stdout.lines().next(), Some("verdict: critical"), "{}", text.stdout);
    assert_eq!(text.code, 2);
    let hashkv = quorate_tests::etcdctl(&all, &["endpoint", "hashkv", &format!("--rev={rev}"), "-w", "json"]);
    assert!(hashkv.ok, "{}", hashkv.stderr);
    assert!(
        hashkv.stdout.contains(&format!("\"hash\":{odd_hash}")),
        "etcdctl endpoint hashkv confirms: {}",
        hashkv.stdout
    );
    let table = ctl(&all, &["status"]);
    let odd_line = table.stdout.lines().find(|l| l.starts_with(&odd_name)).expect("odd member's row");
    assert!(odd_line.contains(&format!("{odd_hash:08x}")), "{}", table.stdout);

    let odd_id = rows.iter().find(|m| m["name"] == odd_name.as_str()).unwrap()["id"].as_str().unwrap().to_string();
    assert!(
        diverged[0]["fix"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str().unwrap().contains(&format!("member remove {odd_id}"))),
        "the fix replaces the odd member by its id: {report:#}"
    );

    eprintln!("the odd member stored another value, once: the next put of the key applies alike everywhere");
    rt.block_on(async {
        let get = |i: usize| {
            let endpoint = cluster.nodes[i].endpoint();
            async move {
                let mut c = Client::connect([endpoint], None).await.unwrap();
                let opts = etcd_client::GetOptions::new().with_serializable();
                c.get("diverge/key", Some(opts)).await.unwrap().kvs()[0].value().to_vec()
            }
        };
        assert_eq!(get(leader).await, b"the value every member was sent");
        let odd_value = get(odd).await;
        assert!(odd_value.starts_with(b"the value every member was sent") && odd_value.len() > 31, "{odd_value:?}");
        let mut c = Client::connect([cluster.nodes[leader].endpoint()], None).await.unwrap();
        c.put("diverge/key", "second", None).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while get(odd).await != b"second" {
            assert!(Instant::now() < deadline, "the odd member never applied the second put as sent");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}
