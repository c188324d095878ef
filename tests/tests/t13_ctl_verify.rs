//! `quorate ctl verify` (issue 13 §4): on a healthy 3-member cluster every check passes (members,
//! one leader, equal hashes, doctor, a linearizability probe through every member, a write load)
//! and exit 0, with nothing left behind in the keyspace; on a cluster where one member applied
//! a write differently (the drill-only divergence failpoint) the hashes check fails and exit 1.

use std::process::Command;
use std::time::{Duration, Instant};

use quorate_tests::{etcdctl, http, quorate_bin, Cluster, Flavor};
use serde_json::Value;

fn verify(endpoints: &str) -> (i32, Value, String) {
    let out = Command::new(quorate_bin())
        .args([
            "ctl",
            "--endpoints",
            endpoints,
            "-w",
            "json",
            "verify",
            "--probe-duration",
            "1s",
            "--load-duration",
            "1s",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), v, stdout)
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name}: {report:#}"))
}

#[test]
fn a_healthy_cluster_is_fit_and_a_diverged_one_is_not() {
    let c = Cluster::start_with(Flavor::Quorate, 3, &["--drill-failpoints"]).expect("cluster");
    let leader = c.wait_leader(Duration::from_secs(20)).expect("leader");
    let all = c.all_endpoints().join(",");

    // Right after start a member may still be catching up: give the cluster a few tries.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (code, report, _) = loop {
        let run = verify(&all);
        if run.0 == 0 || Instant::now() > deadline {
            break run;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["fit"], true);
    for name in ["members", "leader", "hashes", "doctor", "linearizability", "load"] {
        assert_eq!(check(&report, name)["passed"], true, "{name}: {report:#}");
    }
    let lin = check(&report, "linearizability")["detail"].as_str().unwrap().to_string();
    assert!(lin.contains("through 3 members"), "{lin}");
    let left = etcdctl(&all, &["get", "quorate-verify/", "--prefix", "--keys-only"]);
    assert!(left.ok && left.stdout.trim().is_empty(), "verify left keys behind: {}", left.stdout);

    let odd = (leader + 1) % 3;
    let set = http(&c.nodes[odd], "PUT", "/debug/failpoints/diverge-put-key", Some("diverge/key")).unwrap();
    assert_eq!(set.status, 200, "{}", set.body);
    assert!(etcdctl(&all, &["put", "diverge/key", "the value every member was sent"]).ok);
    let deadline = Instant::now() + Duration::from_secs(20);
    let (code, report, _) = loop {
        let run = verify(&all);
        if check(&run.1, "hashes")["passed"] == false || Instant::now() > deadline {
            break run;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["fit"], false);
    assert_eq!(check(&report, "hashes")["passed"], false, "{report:#}");
    let doctor = check(&report, "doctor");
    assert_eq!(doctor["passed"], false, "diverged is critical: {report:#}");
    assert!(doctor["detail"].as_str().unwrap().contains("diverged"), "{report:#}");
}
