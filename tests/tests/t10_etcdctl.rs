//! The real `etcdctl` 3.4 against a 3-member quorate cluster and a 3-member etcd cluster,
//! running the same script; outputs must match once ids are normalised.

use std::time::Duration;

use quorate_tests::{etcdctl, etcdctl_stdin, normalize, Cluster, Flavor, Output};

/// One scripted step: arguments, optional stdin.
struct Step {
    args: Vec<String>,
    stdin: Option<String>,
}

fn step(args: &str) -> Step {
    Step { args: shell_words(args), stdin: None }
}

fn step_in(args: &str, stdin: &str) -> Step {
    Step { args: shell_words(args), stdin: Some(stdin.to_string()) }
}

/// Split on spaces, honouring double quotes.
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn run(endpoints: &str, s: &Step) -> Output {
    let args: Vec<&str> = s.args.iter().map(String::as_str).collect();
    etcdctl_stdin(endpoints, &args, s.stdin.as_deref())
}

/// What a user sees, minus etcdctl's retry chatter (JSON lines with timestamps).
fn visible(o: &Output) -> String {
    let err: String = o.stderr.lines().filter(|l| !l.starts_with("{\"level\"")).map(|l| format!("{l}\n")).collect();
    normalize(&format!("ok={}\n{}{}", o.ok, o.stdout, err))
}

fn script() -> Vec<Step> {
    vec![
        step("put foo bar"),
        step("put foo/a 1"),
        step("put foo/b 2"),
        step("put foo/c 3"),
        step("put zed z"),
        step("put foo baz --prev-kv"),
        step("get foo"),
        step("get foo --prefix"),
        step("get foo --prefix --limit=2"),
        step("get foo --prefix --keys-only"),
        step("get foo --prefix --consistency=s"),
        step("get --from-key foo/b"),
        step("get foo --prefix --sort-by=VALUE --order=DESCEND"),
        step("get foo --prefix --sort-by=MODIFY --order=ASCEND --limit=3"),
        step("get foo --prefix --sort-by=CREATE --order=DESCEND"),
        step("get foo --prefix --sort-by=VERSION"),
        step("get foo --prefix --count-only -w simple"),
        step("get foo --rev=2"),
        step("get foo --rev=100"),
        step("del foo/a --prev-kv"),
        step("del nothing"),
        step_in("txn", "value(\"foo\") = \"baz\"\n\nput foo/t yes\nget foo/b\n\nput foo/t no\n\n"),
        step_in("txn", "version(\"foo\") > \"5\"\nmod(\"zed\") < \"100\"\n\nput foo/t yes\n\ndel foo/t\n\n"),
        step_in("txn", "create(\"missing\") = \"0\"\n\nput missing here\n\n\n"),
        step("get foo/t"),
        step("get missing"),
        step("compaction 5"),
        step("get foo --rev=3"),
        step("get foo --rev=5"),
        step("compaction 4"),
        step("del foo --prefix --prev-kv"),
        step("get \"\" --prefix"),
        step("lease revoke 1234"),
        step("put --lease=1234 k v"),
        step("lease timetolive 1234"),
    ]
}

fn run_script(c: &Cluster) -> Vec<String> {
    let ep = c.endpoints();
    script().iter().map(|s| format!("$ etcdctl {}\n{}", s.args.join(" "), visible(&run(&ep, s)))).collect()
}

/// Lease, watch and cluster commands, whose outputs carry ids we must thread through.
fn lease_and_watch(c: &Cluster) -> Vec<String> {
    let ep = c.endpoints();
    let mut out = Vec::new();
    let g = etcdctl(&ep, &["lease", "grant", "100"]);
    out.push(visible(&g));
    let id = g.stdout.split_whitespace().nth(1).expect("lease id").to_string();
    out.push(visible(&etcdctl(&ep, &["put", "--lease", &id, "leased/a", "1"])));
    out.push(visible(&etcdctl(&ep, &["put", "--lease", &id, "leased/b", "2"])));
    let ttl = etcdctl(&ep, &["lease", "timetolive", "--keys", &id]);
    // Remaining seconds can tick between runs; keep the granted TTL and keys.
    let ttl_line = ttl.stdout.split(", remaining").next().unwrap_or_default().to_string();
    // etcd lists attached keys in map order; compare them as a set.
    let keys_part = ttl.stdout.split("attached keys").nth(1).unwrap_or_default();
    // etcdctl prints them as `([a b])`.
    let mut keys: Vec<&str> =
        keys_part.split_whitespace().map(|k| k.trim_matches(|c| matches!(c, '(' | ')' | '[' | ']'))).collect();
    keys.sort();
    out.push(normalize(&format!("{ttl_line} keys{keys:?}")));
    out.push(visible(&etcdctl(&ep, &["lease", "list"])));
    out.push(visible(&etcdctl(&ep, &["lease", "keep-alive", "--once", &id])));
    out.push(visible(&etcdctl(&ep, &["lease", "revoke", &id])));
    out.push(visible(&etcdctl(&ep, &["get", "leased", "--prefix"])));
    out.push(visible(&etcdctl(&ep, &["lease", "timetolive", &id])));
    out
}

fn watch_replay(c: &Cluster, from_rev: &str) -> String {
    let ep = c.endpoints();
    let child = std::process::Command::new("timeout")
        .args([
            "3",
            "etcdctl",
            &format!("--endpoints={ep}"),
            "watch",
            "--prefix",
            "",
            &format!("--rev={from_rev}"),
            "--prev-kv",
        ])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    normalize(&String::from_utf8_lossy(&child.stdout))
}

/// A 3-member quorate cluster and a 3-member etcd cluster, started side by side.
fn start_quorate_and_etcd() -> (Cluster, Cluster) {
    std::thread::scope(|s| {
        let q = s.spawn(|| Cluster::start(Flavor::Quorate, 3).expect("quorate cluster"));
        let e = s.spawn(|| Cluster::start(Flavor::Etcd, 3).expect("etcd cluster"));
        (q.join().unwrap(), e.join().unwrap())
    })
}

#[test]
fn etcdctl_outputs_match_etcd() {
    let (q, e) = start_quorate_and_etcd();
    let qs = run_script(&q);
    let es = run_script(&e);
    for (a, b) in qs.iter().zip(es.iter()) {
        assert_eq!(a, b, "quorate (left) and etcd (right) differ");
    }
    let ql = lease_and_watch(&q);
    let el = lease_and_watch(&e);
    for (a, b) in ql.iter().zip(el.iter()) {
        assert_eq!(a, b, "lease: quorate (left) and etcd (right) differ");
    }
    // Both stores were compacted at revision 5; watch everything from there with prev kvs.
    assert_eq!(watch_replay(&q, "5"), watch_replay(&e, "5"), "watch replay differs");
    let compacted_q = watch_replay(&q, "2");
    let compacted_e = watch_replay(&e, "2");
    assert_eq!(compacted_q, compacted_e, "watch on a compacted revision differs");
}

#[test]
fn cluster_views_through_etcdctl() {
    let c = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let ep = c.endpoints();
    let members = etcdctl(&ep, &["member", "list"]);
    assert!(members.ok, "{}", members.stderr);
    assert_eq!(members.stdout.lines().count(), 3, "{}", members.stdout);
    for n in &c.nodes {
        let line = members.stdout.lines().find(|l| l.contains(&format!(", {}, ", n.name))).expect("member listed");
        assert!(line.contains("started"), "{line}");
        assert!(line.contains(&n.peer_url()) && line.contains(&n.client_url()), "{line}");
    }
    let status = etcdctl(&c.nodes[0].endpoint(), &["endpoint", "status", "--cluster", "-w", "json"]);
    assert!(status.ok, "{}", status.stderr);
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 3);
    let leaders: std::collections::BTreeSet<u64> =
        arr.iter().map(|s| s["Status"]["leader"].as_u64().unwrap()).collect();
    assert_eq!(leaders.len(), 1, "every member names the same leader: {v}");
    let leader = *leaders.iter().next().unwrap();
    assert_eq!(arr.iter().filter(|s| s["Status"]["header"]["member_id"].as_u64() == Some(leader)).count(), 1);
    for s in arr {
        let st = &s["Status"];
        assert!(st["raftIndex"].as_u64().unwrap() > 0, "{st}");
        assert!(st["dbSize"].as_i64().unwrap() > 0, "{st}");
        assert_eq!(st["raftTerm"], arr[0]["Status"]["raftTerm"]);
    }
    let health = etcdctl(&c.nodes[0].endpoint(), &["endpoint", "health", "--cluster"]);
    assert!(health.ok, "{}", health.stderr);
    assert_eq!(health.stdout.matches("is healthy").count() + health.stderr.matches("is healthy").count(), 3);
}

#[test]
fn lock_and_elect_through_etcdctl() {
    let c = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let ep = c.endpoints();
    // Hold the lock for 2 s in one process; a second locker must wait for it.
    let holder = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([&format!("--endpoints={ep}"), "lock", "L", "sleep", "2"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let start = std::time::Instant::now();
    let second = etcdctl(&ep, &["lock", "L", "echo", "second"]);
    let waited = start.elapsed();
    assert!(second.ok, "{}", second.stderr);
    assert_eq!(second.stdout.trim(), "second");
    assert!(waited >= Duration::from_millis(1000), "second locker did not wait: {waited:?}");
    let mut holder = holder;
    assert!(holder.wait().unwrap().success());

    // Elect: a campaigner proclaims; an observer (-l) sees it.
    let mut campaigner = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([&format!("--endpoints={ep}"), "elect", "E", "p1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let observe = std::process::Command::new("timeout")
        .args(["2", "etcdctl", &format!("--endpoints={ep}"), "elect", "-l", "E"])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    let seen = String::from_utf8_lossy(&observe.stdout);
    assert!(seen.lines().any(|l| l == "p1"), "observer saw {seen:?}");
    let _ = campaigner.kill();
    let _ = campaigner.wait();
}

#[test]
fn check_perf_small_load_passes() {
    let c = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let out = etcdctl(&c.endpoints(), &["check", "perf", "--load=s"]);
    // The progress bar rewrites its line with carriage returns: a verdict can follow one.
    let report: String = out
        .stdout
        .lines()
        .flat_map(|l| l.split('\r'))
        .map(str::trim_start)
        .filter(|l| l.starts_with("PASS") || l.starts_with("FAIL"))
        .map(|l| format!("{l}\n"))
        .collect();
    eprintln!("{report}");
    // The verdict lines can hide inside the progress bar's escapes: on failure, show the raw end.
    let tail: String = out.stdout.chars().rev().take(600).collect::<Vec<_>>().into_iter().rev().collect();
    assert!(out.ok, "check perf failed:\n{report}\n{}\n--- raw end of stdout ---\n{tail:?}", out.stderr);
    assert!(report.lines().last() == Some("PASS"), "{report}");
    assert!(!report.contains("FAIL"), "{report}");
}

/// Member ids (hex) from `endpoint status -w json`, with the leader's first.
fn ids_leader_first(c: &Cluster) -> Vec<String> {
    let out = etcdctl(&c.endpoints(), &["endpoint", "status", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("status json");
    let mut ids: Vec<(bool, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let st = &s["Status"];
            let id = st["header"]["member_id"].as_u64().unwrap();
            (st["leader"].as_u64() != Some(id), format!("{id:x}"))
        })
        .collect();
    ids.sort();
    ids.into_iter().map(|(_, id)| id).collect()
}

#[test]
fn move_leader_through_etcdctl() {
    let (q, e) = start_quorate_and_etcd();
    let ids = ids_leader_first(&q);
    let (from, to) = (&ids[0], &ids[1]);
    let out = etcdctl(&q.endpoints(), &["move-leader", to]);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), format!("Leadership transferred from {from} to {to}"));
    assert_eq!(&ids_leader_first(&q)[0], to, "the named member leads now");
    // Writes keep working under the new leader.
    assert!(etcdctl(&q.endpoints(), &["put", "after-move", "1"]).ok);

    // An id that is not a member: same error as etcd, and nothing changes.
    let bad_q = etcdctl(&q.endpoints(), &["move-leader", "1234"]);
    let bad_e = etcdctl(&e.endpoints(), &["move-leader", "1234"]);
    assert!(!bad_q.ok);
    let last = |o: &Output| o.stderr.lines().filter(|l| !l.starts_with("{\"level\"")).collect::<Vec<_>>().join("\n");
    assert_eq!(last(&bad_q), last(&bad_e), "error for an unknown transferee");
    assert_eq!(&ids_leader_first(&q)[0], to);
}
