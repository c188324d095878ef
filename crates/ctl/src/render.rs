//! Text output: the status table and the doctor's report. Pure: views in, strings out.

use crate::collect::{ClusterView, MemberView};
use crate::judge::Report;

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".to_string(), T::to_string)
}

/// The member a leader id names, by name when the member list has it.
fn leader_name(v: &ClusterView, id: &Option<String>) -> String {
    match id {
        None => "-".into(),
        Some(id) => v.members.iter().find(|m| &m.id == id && !m.name.is_empty()).map_or(id.clone(), |m| m.name.clone()),
    }
}

fn row(v: &ClusterView, m: &MemberView) -> Vec<String> {
    vec![
        m.name.clone(),
        m.id.clone(),
        m.endpoint.clone(),
        if m.reachable { "yes".into() } else { "no".into() },
        opt(&m.role),
        opt(&m.term),
        leader_name(v, &m.leader),
        opt(&m.commit_index),
        opt(&m.applied_index),
        opt(&m.revision),
        m.hash.map_or("-".into(), |h| format!("{h:08x}")),
        opt(&m.apply_lag_entries),
        m.last_leader_contact_ms.map_or("-".into(), |ms| format!("{ms}ms")),
        opt(&m.db_size_bytes),
        match (m.clock_offset_ms, m.clock_offset_error_ms) {
            (Some(o), Some(e)) => format!("{o:+}ms±{e}"),
            _ => "-".into(),
        },
        m.fsync_p99_ms.map_or("-".into(), |p| format!("{p:.1}ms")),
        opt(&m.version),
        isolated_cell(v, m),
    ]
}

/// `yes` for an isolated member (by its own word or any other member's), else `-`.
fn isolated_cell(v: &ClusterView, m: &MemberView) -> String {
    let known = v.members.iter().flat_map(|o| &o.isolated_members).any(|i| i.id == m.id);
    if m.isolated.is_some() || known {
        "yes".into()
    } else {
        "-".into()
    }
}

const HEADERS: [&str; 18] = [
    "NAME",
    "ID",
    "ENDPOINT",
    "REACHABLE",
    "ROLE",
    "TERM",
    "LEADER",
    "COMMIT",
    "APPLIED",
    "REVISION",
    "HASH",
    "APPLY LAG",
    "LAST CONTACT",
    "DB SIZE",
    "CLOCK OFFSET",
    "FSYNC P99",
    "VERSION",
    "ISOLATED",
];

/// One row per member, columns aligned; then the hash revision and any member's error.
pub fn status_table(v: &ClusterView) -> String {
    let rows: Vec<Vec<String>> = v.members.iter().map(|m| row(v, m)).collect();
    let mut widths: Vec<usize> = HEADERS.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(HEADERS.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    if let Some(rev) = v.hash_revision {
        out.push_str(&format!("hash at revision {rev} (the smallest any reachable member has)\n"));
    }
    for z in &v.brake {
        out.push_str(&format!("brake: zone {:?} held {} s: {}\n", z.zone, z.held_ms / 1000, z.reason));
    }
    if let Some(e) = &v.member_list_error {
        out.push_str(&format!("no member list: {e}\n"));
    }
    for m in v.members.iter().filter(|m| m.error.is_some()) {
        out.push_str(&format!("{}: {}\n", if m.name.is_empty() { &m.endpoint } else { &m.name }, opt(&m.error)));
    }
    out
}

/// `verdict: <v>` first, then each finding with its evidence and numbered fix.
pub fn doctor_text(r: &Report) -> String {
    let mut out = format!("verdict: {}\n", r.verdict.as_str());
    for f in &r.findings {
        let sev = serde_json::to_value(f.severity).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        out.push_str(&format!(
            "\n[{sev}] {}: {}\n",
            f.code,
            if f.members.is_empty() { "-".into() } else { f.members.join(", ") }
        ));
        out.push_str(&format!("  evidence: {}\n", f.evidence));
        out.push_str("  fix:\n");
        for (i, step) in f.fix.iter().enumerate() {
            out.push_str(&format!("    {}. {step}\n", i + 1));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge::{Finding, Severity, Verdict};

    #[test]
    fn doctor_text_starts_with_the_verdict() {
        let r = Report {
            verdict: Verdict::Degraded,
            findings: vec![Finding {
                code: "member-down".into(),
                severity: Severity::Degraded,
                members: vec!["m2".into()],
                evidence: "2/3 voters answer".into(),
                fix: vec!["`etcdctl endpoint status`".into()],
            }],
        };
        let t = doctor_text(&r);
        assert_eq!(t.lines().next(), Some("verdict: degraded"));
        assert!(t.contains("[degraded] member-down: m2"));
        assert!(t.contains("    1. `etcdctl endpoint status`"));
    }

    #[test]
    fn status_table_has_a_row_per_member_reachable_or_not() {
        let v = ClusterView {
            members: vec![
                MemberView {
                    name: "a".into(),
                    id: "a1".into(),
                    endpoint: "127.0.0.1:2379".into(),
                    reachable: true,
                    term: Some(3),
                    leader: Some("a1".into()),
                    ..Default::default()
                },
                MemberView { name: "b".into(), error: Some("refused".into()), ..Default::default() },
            ],
            ..Default::default()
        };
        let t = status_table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAME"));
        assert!(lines[1].starts_with("a ") && lines[1].contains("yes"));
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(cells[6], "a", "the leader by name: {}", lines[1]);
        assert!(lines[2].starts_with("b ") && lines[2].contains("no"));
        assert!(t.contains("b: refused"));
    }
}
