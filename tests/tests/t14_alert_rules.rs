//! The Prometheus alert rules (issue 12, section 3): `deploy/prometheus/alerts.yml` passes
//! `promtool check rules`, its unit tests (`deploy/prometheus/alerts_test.yml`: a healthy
//! cluster with no alert, a member down, quorum lost, no leader, brake engaged, apply lag,
//! slow disk, ...) pass `promtool test rules`, and those tests are not vacuous: a copy of the
//! rules with a planted bug fails them. Every alert has a severity, a summary, a description
//! and a runbook link to a section of `docs/runbook.md`.
//!
//! `promtool` comes from Debian's `prometheus` package, which `scripts/test.sh` installs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

fn rules_dir() -> PathBuf {
    repo_root().join("deploy/prometheus")
}

fn promtool(args: &[&str], dir: &Path) -> Output {
    Command::new("promtool").args(args).current_dir(dir).output().unwrap_or_else(|e| {
        panic!("promtool not runnable ({e}); scripts/test.sh installs it (Debian package prometheus)")
    })
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn promtool_checks_the_rules() {
    let out = promtool(&["check", "rules", "alerts.yml"], &rules_dir());
    assert!(out.status.success(), "promtool check rules failed:\n{}", text(&out));
    assert!(text(&out).contains("SUCCESS"), "{}", text(&out));
}

#[test]
fn promtool_checks_the_example_config() {
    let out = promtool(&["check", "config", "prometheus.yml"], &rules_dir());
    assert!(out.status.success(), "promtool check config failed:\n{}", text(&out));
}

#[test]
fn the_rules_pass_their_unit_tests() {
    let out = promtool(&["test", "rules", "alerts_test.yml"], &rules_dir());
    assert!(out.status.success(), "promtool test rules failed:\n{}", text(&out));
}

/// Copies alerts.yml (with `from` replaced by `to`, which must occur once) and alerts_test.yml
/// into a temporary directory and runs the unit tests there.
fn test_with_planted_bug(from: &str, to: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let rules = std::fs::read_to_string(rules_dir().join("alerts.yml")).unwrap();
    assert_eq!(rules.matches(from).count(), 1, "the planted bug's target must occur once: {from}");
    std::fs::write(dir.path().join("alerts.yml"), rules.replace(from, to)).unwrap();
    std::fs::copy(rules_dir().join("alerts_test.yml"), dir.path().join("alerts_test.yml")).unwrap();
    // The broken copy is still valid: only its meaning changed.
    let check = promtool(&["check", "rules", "alerts.yml"], dir.path());
    assert!(check.status.success(), "the planted copy must still parse:\n{}", text(&check));
    promtool(&["test", "rules", "alerts_test.yml"], dir.path())
}

#[test]
fn the_unit_tests_catch_planted_bugs() {
    // Each bug silences (or misfires) one alert; the unit tests must fail and name it.
    let bugs = [
        // etcdNoLeader looking for the wrong value: never fires.
        ("etcd_server_has_leader{job=~\".*quorate.*\"} == 0", "etcd_server_has_leader{job=~\".*quorate.*\"} == 2", "etcdNoLeader"),
        // Quorum computed without the +1: 1 of 3 up is no longer "fewer than a majority".
        (
            "< ((count without (instance) (up{job=~\".*quorate.*\"}) + 1) / 2)",
            "< ((count without (instance) (up{job=~\".*quorate.*\"})) / 3)",
            "etcdInsufficientMembers",
        ),
        // The brake alert with too high a threshold: 2 zones held go unnoticed.
        (
            "max without (instance) (quorate_registry_brake_engaged_zones{job=~\".*quorate.*\"}) > 0\n        for: 1m",
            "max without (instance) (quorate_registry_brake_engaged_zones{job=~\".*quorate.*\"}) > 5\n        for: 1m",
            "QuorateBrakeEngaged",
        ),
        // Apply lag as applied - commit: never positive.
        (
            "(quorate_raft_commit_index{job=~\".*quorate.*\"} - quorate_raft_applied_index{job=~\".*quorate.*\"}) > 100",
            "(quorate_raft_applied_index{job=~\".*quorate.*\"} - quorate_raft_commit_index{job=~\".*quorate.*\"}) > 100",
            "QuorateApplyLagGrowing",
        ),
        // Fencing refusals summed over members: every member counts each one, so 3x the truth.
        (
            "max without (instance) (sum without (kind) (increase(quorate_fencing_refusals_total",
            "sum without (instance) (sum without (kind) (increase(quorate_fencing_refusals_total",
            "QuorateFencingRefusalsSpike",
        ),
        // A member-down rule that fires on healthy members (== bool 1).
        ("sum without (instance) (up{job=~\".*quorate.*\"} == bool 0)", "sum without (instance) (up{job=~\".*quorate.*\"} == bool 1)", "etcdMembersDown"),
    ];
    for (from, to, alert) in bugs {
        let out = test_with_planted_bug(from, to);
        let said = text(&out);
        assert!(!out.status.success(), "the unit tests passed with a planted bug in {alert}:\n{said}");
        assert!(said.contains(&format!("alertname: {alert},")), "the failure must name {alert}:\n{said}");
    }
}

/// The alerting rules, as (alert name, the rule's lines), read without a YAML parser: each
/// rule starts at a `- alert:` line.
fn rules() -> Vec<(String, String)> {
    let rules = std::fs::read_to_string(rules_dir().join("alerts.yml")).unwrap();
    let mut out: Vec<(String, String)> = Vec::new();
    for line in rules.lines() {
        if let Some(name) = line.trim_start().strip_prefix("- alert: ") {
            out.push((name.trim().to_string(), String::new()));
        } else if line.trim_start().starts_with("- name: ") {
            continue;
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

#[test]
fn every_alert_has_severity_summary_description_and_runbook() {
    let rules = rules();
    assert!(rules.len() >= 18, "expected the etcd-mixin and quorate alerts, got {}", rules.len());
    for name in [
        "etcdMembersDown",
        "etcdInsufficientMembers",
        "etcdNoLeader",
        "etcdHighNumberOfLeaderChanges",
        "etcdHighNumberOfFailedGRPCRequests",
        "etcdGRPCRequestsSlow",
        "etcdMemberCommunicationSlow",
        "etcdHighNumberOfFailedProposals",
        "etcdHighFsyncDurations",
        "etcdHighCommitDurations",
        "etcdDatabaseQuotaLowSpace",
        "etcdExcessiveDatabaseGrowth",
        "QuorateBrakeEngaged",
        "QuorateApplyLagGrowing",
        "QuorateFencingRefusalsSpike",
        "QuorateLeaseClockStalls",
    ] {
        assert!(rules.iter().any(|(n, _)| n == name), "no alert {name}");
    }
    for (name, body) in &rules {
        assert!(
            body.contains("severity: warning") || body.contains("severity: critical"),
            "{name}: severity must be warning or critical"
        );
        for key in ["summary: ", "description: ", "runbook_url: docs/runbook.md#"] {
            assert!(body.contains(key), "{name}: no {key}");
        }
    }
}

/// The `## ` sections of docs/runbook.md: (GitHub anchor, section text).
fn runbook_sections() -> Vec<(String, String)> {
    let runbook = std::fs::read_to_string(repo_root().join("docs/runbook.md")).unwrap();
    let mut out: Vec<(String, String)> = Vec::new();
    for line in runbook.lines() {
        if let Some(title) = line.strip_prefix("## ") {
            out.push((title.trim().to_lowercase(), String::new()));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

#[test]
fn every_runbook_link_has_a_section_in_the_seeds_order() {
    let sections = runbook_sections();
    for (name, body) in rules() {
        let anchor = body
            .lines()
            .find_map(|l| l.trim().strip_prefix("runbook_url: docs/runbook.md#"))
            .unwrap_or_else(|| panic!("{name}: no runbook_url"));
        let (_, text) = sections
            .iter()
            .find(|(a, _)| a == anchor)
            .unwrap_or_else(|| panic!("{name}: docs/runbook.md has no section #{anchor}"));
        // Symptom, then how to confirm, then how to fix, then verify; each with commands.
        let at = |part: &str| text.find(part).unwrap_or_else(|| panic!("#{anchor}: no {part}"));
        let order = [at("**Symptom.**"), at("**How to confirm.**"), at("**How to fix.**"), at("**Verify.**")];
        assert!(order.windows(2).all(|w| w[0] < w[1]), "#{anchor}: sections out of order");
        let confirm = &text[order[1]..order[2]];
        assert!(confirm.contains('`'), "#{anchor}: confirming takes commands");
        assert!(text[order[2]..].contains('`'), "#{anchor}: fixing and verifying take commands");
    }
}

#[test]
fn every_alert_is_unit_tested_firing() {
    let tests = std::fs::read_to_string(rules_dir().join("alerts_test.yml")).unwrap();
    for (name, _) in rules() {
        let firing = format!("alertname: {name}\n        exp_alerts:\n          - exp_labels:");
        assert!(tests.contains(&firing), "alerts_test.yml never expects {name} to fire");
    }
}

/// Metrics the rules use that the server does not export yet (their alerts stay silent until
/// it does). Remove a name from here when docs/metrics.md lists it.
const NOT_YET_EXPORTED: [&str; 0] = [];

#[test]
fn the_rules_use_documented_metrics() {
    let documented = std::fs::read_to_string(repo_root().join("docs/metrics.md")).unwrap();
    let rules = std::fs::read_to_string(rules_dir().join("alerts.yml")).unwrap();
    let mut names = Vec::new();
    for line in rules.lines().filter(|l| !l.trim_start().starts_with('#')) {
        // A metric name is an identifier right before a `{job=` selector.
        let mut rest = line;
        while let Some(at) = rest.find("{job=") {
            let before = &rest[..at];
            let start =
                before.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).map_or(0, |i| i + 1);
            names.push(before[start..].to_string());
            rest = &rest[at + 1..];
        }
    }
    assert!(names.len() > 20, "found only {names:?}");
    for name in names {
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
        let known =
            name == "up" || documented.contains(&format!("`{name}`")) || documented.contains(&format!("`{base}`"));
        assert!(
            known || NOT_YET_EXPORTED.contains(&name.as_str()),
            "alerts.yml uses {name}, which docs/metrics.md does not list"
        );
        assert!(
            !(known && NOT_YET_EXPORTED.contains(&name.as_str())),
            "{name} is exported now: drop it from NOT_YET_EXPORTED"
        );
    }
}
