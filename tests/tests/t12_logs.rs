//! `--log-format json` and `--log-level` on real members: every line is a JSON object, every
//! line about consensus (openraft's and quorate_consensus's) carries the member's name and id,
//! its term and its commit and applied index, and those are right across an election forced by
//! killing the leader; `--log-level warn` prints no info line; bad values are refused by the
//! flag parser with the values it accepts.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quorate_tests::{free_port, http_get, quorate_bin, Cluster, Flavor};
use serde_json::Value;

/// Time for the survivors to elect a new leader after the old one is killed.
const ELECTION_MAX: Duration = Duration::from_secs(20);

/// `/v1/member/status` of member `i`: (id in hex, term).
fn id_and_term(cluster: &Cluster, i: usize) -> (String, u64) {
    let v: Value = serde_json::from_str(&http_get(&cluster.nodes[i], "/v1/member/status").expect("status"))
        .expect("status is JSON");
    (v["id"].as_str().expect("id").to_string(), v["term"].as_u64().expect("term"))
}

/// Member `i`'s log, every line parsed as JSON (panics on a line that is not).
fn json_lines(cluster: &Cluster, i: usize) -> Vec<Value> {
    cluster
        .log(i)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("m{}: not a JSON line ({e}): {l}", i + 1)))
        .collect()
}

fn is_consensus(line: &Value) -> bool {
    let target = line["target"].as_str().unwrap_or_default();
    ["openraft", "quorate_consensus"].iter().any(|t| target == *t || target.starts_with(&format!("{t}::")))
}

#[test]
fn consensus_lines_carry_member_term_and_index_across_an_election() {
    let mut cluster = Cluster::start_with(Flavor::Quorate, 3, &["--log-format", "json"]).expect("start 3 members");
    let leader = cluster.wait_leader(ELECTION_MAX).expect("a leader");
    let ids: Vec<String> = (0..3).map(|i| id_and_term(&cluster, i).0).collect();
    let (_, term_before) = id_and_term(&cluster, leader);
    assert!(term_before >= 1);

    eprintln!("kill the leader (m{}, term {term_before}) so that the others elect another", leader + 1);
    let lines_before: Vec<usize> = (0..3).map(|i| json_lines(&cluster, i).len()).collect();
    cluster.kill(leader);
    let deadline = Instant::now() + ELECTION_MAX;
    let new_leader = loop {
        if let Some(l) = cluster.leader() {
            break l;
        }
        assert!(Instant::now() < deadline, "no new leader within {ELECTION_MAX:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let (_, term_after) = id_and_term(&cluster, new_leader);
    assert!(term_after > term_before, "term {term_after} after the election, {term_before} before");
    // The survivors' lines about the new leader are written as they learn of it.
    std::thread::sleep(Duration::from_millis(500));

    for i in 0..3 {
        let name = &cluster.nodes[i].name;
        let lines = json_lines(&cluster, i);
        assert!(!lines.is_empty(), "{name} logged nothing");
        let mut consensus = 0;
        let mut last_term = 0;
        let mut last_applied = 0;
        for (n, line) in lines.iter().enumerate() {
            for key in ["timestamp", "level", "target", "message"] {
                assert!(line[key].is_string(), "{name} line {n} has no {key}: {line}");
            }
            if !is_consensus(line) {
                assert!(line.get("term").is_none(), "{name}: a line not about consensus carries a term: {line}");
                continue;
            }
            consensus += 1;
            assert_eq!(line["member"], name.as_str(), "{name} line {n}: {line}");
            assert_eq!(line["member_id"], ids[i].as_str(), "{name} line {n}: {line}");
            let term = line["term"].as_u64().unwrap_or_else(|| panic!("{name} line {n} has no term: {line}"));
            let applied = line["applied_index"].as_u64().unwrap_or_else(|| panic!("{name} line {n}: {line}"));
            assert!(line["commit_index"].is_u64(), "{name} line {n} has no commit index: {line}");
            assert!(term >= last_term, "{name} line {n}: term went back from {last_term}: {line}");
            assert!(applied >= last_applied, "{name} line {n}: applied index went back: {line}");
            let bound = if n < lines_before[i] { term_before } else { term_after };
            assert!(term <= bound, "{name} line {n}: term {term} beyond the cluster's {bound}: {line}");
            (last_term, last_applied) = (term, applied);
        }
        assert!(consensus > 0, "{name} logged no line about consensus");

        // Each member logs the leader it learns of, with the term it leads in.
        let elected = |range: &[Value]| -> Vec<(String, u64, u64)> {
            range
                .iter()
                .filter(|l| l["message"] == "elected leader")
                .map(|l| {
                    let leader = l["fields"]["leader"].as_str().unwrap_or_default().to_string();
                    (leader, l["term"].as_u64().unwrap_or(0), l["applied_index"].as_u64().unwrap_or(0))
                })
                .collect()
        };
        let before = elected(&lines[..lines_before[i]]);
        let (first_leader, first_term, _) =
            before.last().cloned().unwrap_or_else(|| panic!("{name}: no leader logged"));
        assert_eq!((first_leader, first_term), (ids[leader].clone(), term_before), "{name}: the first leader");
        if i == leader {
            continue;
        }
        let after = elected(&lines[lines_before[i]..]);
        let (next_leader, next_term, applied) =
            after.last().cloned().unwrap_or_else(|| panic!("{name}: no new leader logged after the kill"));
        assert_eq!((next_leader, next_term), (ids[new_leader].clone(), term_after), "{name}: the new leader");
        assert!(applied > 0, "{name}: applied index 0 after the cluster wrote its members");
    }
}

#[test]
fn log_level_warn_prints_warnings_and_no_info_line() {
    let mut cluster = Cluster::start_with(Flavor::Quorate, 3, &["--log-level", "warn"]).expect("start 3 members");
    let leader = cluster.wait_leader(ELECTION_MAX).expect("a leader");
    let follower = (leader + 1) % 3;
    eprintln!("kill a follower, so that the leader warns it cannot reach it");
    cluster.kill(follower);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.log(leader).contains(" WARN ") {
        assert!(Instant::now() < deadline, "the leader warned of nothing in 20 s:\n{}", cluster.log(leader));
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut levels: HashMap<String, usize> = HashMap::new();
    for i in 0..3 {
        for line in cluster.log(i).lines() {
            let level = line.split_whitespace().nth(1).unwrap_or_default().to_string();
            assert!(level == "WARN" || level == "ERROR", "m{}: {line}", i + 1);
            *levels.entry(level).or_default() += 1;
        }
    }
    eprintln!("lines by level: {levels:?}");
}

#[test]
fn bad_log_flags_are_refused_with_the_values_accepted() {
    for (flag, value, accepted) in
        [("--log-level", "verbose", "error, warn, info, debug"), ("--log-format", "xml", "text, json")]
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(quorate_bin())
            .args(["server", flag, value, "--data-dir"])
            .arg(dir.path())
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{}", free_port())])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", free_port())])
            .args(["--listen-http", &format!("127.0.0.1:{}", free_port())])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run quorate");
        // Refused at once; a member that started instead is stopped, and fails the test.
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let out = child.wait_with_output().expect("quorate's output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(&format!("invalid value '{value}' for '{flag}")), "{stderr}");
        assert!(stderr.contains(accepted), "{stderr}");
    }
}
