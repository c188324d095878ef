//! The drill must catch a planted bug (issue 5; needs root): members started with the
//! drill-only `--drill-unsafe-local-reads` answer linearizable reads from local state, so the
//! leader cut off by a partition keeps serving the old values. `quorate drill` must say so:
//! exit 1, a linearizability anomaly with a short minimal history, and the replay command.
//! Afterwards none of its network namespaces is left behind.

use std::process::Command;

use quorate_tests::quorate_bin;

#[test]
fn the_drill_catches_stale_reads_from_a_partitioned_leader() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(quorate_bin())
        .args(["drill", "--short", "--seed", "7", "--faults", "partition-leader", "--hold-s", "6", "--quiet-s", "3"])
        .args(["--plant-stale-reads", "--out"])
        .arg(out.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The drill names its namespaces after its pid.
    let tag = run.id() % 100_000;
    let run = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    let stdout = String::from_utf8_lossy(&run.stdout);
    eprintln!("{stderr}");
    assert_eq!(run.status.code(), Some(1), "the drill must fail on the planted bug:\n{stdout}");

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    let lin = report["safety"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["check"].as_str().unwrap().starts_with("linearizability"))
        .unwrap();
    assert_eq!(lin["ok"], false, "linearizability row: {lin}");
    let anomaly = report["anomalies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["check"] == "linearizability")
        .expect("a linearizability anomaly");
    let ops = anomaly["history"].as_array().unwrap();
    assert!(!ops.is_empty() && ops.len() <= 10, "a minimal history, not the whole run: {} ops", ops.len());
    assert!(report["replay"].as_str().unwrap().contains("--seed 7"), "replay command names the seed");
    assert!(std::fs::read_to_string(out.path().join("report.md")).unwrap().contains("FAIL"));
    eprintln!("minimal failing history: {}", serde_json::to_string_pretty(anomaly).unwrap());

    let left = quorate_tests::drill_namespaces_left(tag);
    assert!(left.is_empty(), "the drill left namespaces behind: {left:?}");
}
