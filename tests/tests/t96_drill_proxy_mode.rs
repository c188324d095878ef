//! The drill's proxy mode (issue 5): members on loopback, every peer link through the drill's
//! own proxies, which find the sending member by the owner of its socket and cut one directed
//! link at a time. A leader partition through the proxies must really isolate the leader (a
//! new one is elected: writes stall for more than an election timeout) and the run must end
//! with no anomaly.

use std::process::Command;

use quorate_tests::quorate_bin;

#[test]
fn a_leader_partition_through_the_proxies_isolates_it_and_nothing_breaks() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(quorate_bin())
        .args(["drill", "--mode", "proxy", "--short", "--seed", "3", "--faults", "partition-leader"])
        .args(["--hold-s", "6", "--quiet-s", "3", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    eprintln!("{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(run.status.code(), Some(0), "the drill found anomalies:\n{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["mode"], "loopback behind proxies");
    let fault = &report["faults"][0];
    assert_eq!(fault["kind"], "partition-leader");
    let stalled = fault["unavailable_ms"].as_u64().unwrap();
    assert!(stalled >= 1000, "writes went on through a partitioned leader ({stalled} ms): the cut did not hold");
    eprintln!("writes stalled {stalled} ms while the leader was cut off");
}
