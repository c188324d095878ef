//! The drill's report: a JSON document and its Markdown rendering. Header (seed, revision,
//! members, timeouts, duration), operation counts per phase, the fault timeline, the safety
//! table (every row must read 0 or "equal"), liveness figures, anomalies with their minimal
//! sub-histories, and the one command that replays the run.

use std::fmt::Write as _;

use serde::Serialize;

use crate::history::Op;
use crate::workload::{OpStat, Outcome};

#[derive(Clone, Debug, Serialize)]
pub struct FaultWindow {
    pub kind: &'static str,
    pub what: String,
    pub start_ms: u64,
    pub healed_ms: u64,
    /// False when the fault does not apply to the target or could not be injected: no
    /// liveness figures then.
    pub applied: bool,
    /// Longest stretch without any acknowledged write, from injection to 10 s after healing
    /// (or to the next fault, if sooner).
    pub unavailable_ms: Option<u64>,
    /// From healing to the first acknowledged linearizable write invoked after it.
    pub recovery_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SafetyRow {
    pub check: &'static str,
    /// "0", "equal", a count, or "not applicable: ..." / "undecided: ...".
    pub result: String,
    pub ok: bool,
}

#[derive(Clone, Debug, Serialize, Default)]
pub struct PhaseCounts {
    pub ok: u64,
    pub failed: u64,
    pub unknown: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct OpCounts {
    pub kind: &'static str,
    pub before: PhaseCounts,
    pub during: PhaseCounts,
    pub after: PhaseCounts,
}

#[derive(Clone, Debug, Serialize)]
pub struct Anomaly {
    pub check: &'static str,
    pub detail: String,
    /// The minimal failing sub-history, when the checker produced one.
    pub history: Vec<Op>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub target: &'static str,
    pub seed: u64,
    pub git_revision: String,
    pub members: usize,
    pub clients: usize,
    pub heartbeat_ms: u64,
    pub election_ms: u64,
    pub duration_s: f64,
    pub mode: &'static str,
    pub unsafe_flags: Vec<String>,
    pub counts: Vec<OpCounts>,
    pub faults: Vec<FaultWindow>,
    pub safety: Vec<SafetyRow>,
    pub unavailable_ms: Option<Percentiles>,
    pub recovery_ms: Option<Percentiles>,
    pub lock_refused_stale_writes: u64,
    pub anomalies: Vec<Anomaly>,
    pub replay: String,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.safety.iter().all(|r| r.ok)
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let verdict = if self.passed() { "PASS: no anomaly" } else { "FAIL: anomalies found" };
        let _ = writeln!(s, "# quorate drill against {}: {verdict}\n", self.target);
        let _ = writeln!(s, "| seed | revision | members | clients | heartbeat / election | duration | hosts |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} ms / {} ms | {:.0} s | {} |\n",
            self.seed,
            self.git_revision,
            self.members,
            self.clients,
            self.heartbeat_ms,
            self.election_ms,
            self.duration_s,
            self.mode
        );
        if !self.unsafe_flags.is_empty() {
            let _ = writeln!(s, "**Planted bug on purpose:** {}\n", self.unsafe_flags.join(" "));
        }
        let _ = writeln!(s, "## Safety\n\n| check | result |\n|---|---|");
        for r in &self.safety {
            let mark = if r.ok { "" } else { " **✗**" };
            let _ = writeln!(s, "| {} | {}{mark} |", r.check, r.result);
        }
        let _ = writeln!(s, "\nStale fenced writes refused: {}\n", self.lock_refused_stale_writes);
        let _ = writeln!(s, "## Liveness\n");
        let pct = |p: &Option<Percentiles>| match p {
            Some(p) => format!("{} / {} / {}", p.p50, p.p99, p.max),
            None => "-".into(),
        };
        let _ = writeln!(s, "| figure (ms) | p50 / p99 / max |\n|---|---|");
        let _ = writeln!(s, "| unavailability per fault | {} |", pct(&self.unavailable_ms));
        let _ = writeln!(s, "| heal to first linearizable write | {} |\n", pct(&self.recovery_ms));
        let _ = writeln!(
            s,
            "## Fault timeline\n\n| at (s) | healed (s) | fault | what | unavailable (ms) | recovery (ms) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        for f in &self.faults {
            let _ = writeln!(
                s,
                "| {:.1} | {:.1} | {} | {} | {} | {} |",
                f.start_ms as f64 / 1000.0,
                f.healed_ms as f64 / 1000.0,
                f.kind,
                f.what,
                ms(f.unavailable_ms),
                ms(f.recovery_ms)
            );
        }
        let _ = writeln!(
            s,
            "\n## Operations (ok / failed / unknown)\n\n| op | before faults | during faults | after faults |"
        );
        let _ = writeln!(s, "|---|---|---|---|");
        let c = |p: &PhaseCounts| format!("{} / {} / {}", p.ok, p.failed, p.unknown);
        for o in &self.counts {
            let _ = writeln!(s, "| {} | {} | {} | {} |", o.kind, c(&o.before), c(&o.during), c(&o.after));
        }
        if !self.anomalies.is_empty() {
            let _ = writeln!(s, "\n## Anomalies\n");
            for a in &self.anomalies {
                let _ = writeln!(s, "### {}\n\n{}\n", a.check, a.detail);
                if !a.history.is_empty() {
                    let _ = writeln!(
                        s,
                        "| client | key | invoke (ms) | complete (ms) | input | output |\n|---|---|---|---|---|---|"
                    );
                    for op in &a.history {
                        let _ = writeln!(
                            s,
                            "| {} | {} | {:.3} | {} | {:?} | {} |",
                            op.client,
                            op.key,
                            op.invoke as f64 / 1e6,
                            op.complete.map_or("unknown".to_string(), |c| format!("{:.3}", c as f64 / 1e6)),
                            op.input,
                            op.output.as_ref().map_or("unknown".to_string(), |o| format!("{o:?}"))
                        );
                    }
                    let _ = writeln!(s);
                }
            }
        }
        let _ = writeln!(s, "\nReplay this run: `{}`", self.replay);
        s
    }
}

/// Percentiles of `v` (nearest rank), `None` when empty.
pub fn percentiles(mut v: Vec<u64>) -> Option<Percentiles> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    Some(Percentiles { p50: at(0.5), p99: at(0.99), max: *v.last().unwrap() })
}

/// Counts per op kind, split by whether the op was invoked before the first fault, during
/// the fault part of the run, or after the last heal.
pub fn counts(stats: &[OpStat], first_fault_ms: u64, last_heal_ms: u64) -> Vec<OpCounts> {
    let mut kinds: Vec<&'static str> = stats.iter().map(|s| s.kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    kinds
        .into_iter()
        .map(|kind| {
            let mut c = OpCounts {
                kind,
                before: PhaseCounts::default(),
                during: PhaseCounts::default(),
                after: PhaseCounts::default(),
            };
            for s in stats.iter().filter(|s| s.kind == kind) {
                let phase = if s.invoke_ms < first_fault_ms {
                    &mut c.before
                } else if s.invoke_ms < last_heal_ms {
                    &mut c.during
                } else {
                    &mut c.after
                };
                match s.outcome {
                    Outcome::Ok => phase.ok += 1,
                    Outcome::Failed => phase.failed += 1,
                    Outcome::Unknown => phase.unknown += 1,
                }
            }
            c
        })
        .collect()
}

fn is_write(kind: &str) -> bool {
    matches!(kind, "put" | "delete" | "cas" | "lease-put" | "fenced-put")
}

/// Longest stretch in [from, to] with no acknowledged write completing.
pub fn unavailable(stats: &[OpStat], from: u64, to: u64) -> u64 {
    let mut done: Vec<u64> = stats
        .iter()
        .filter(|s| is_write(s.kind) && s.outcome == Outcome::Ok && s.complete_ms >= from && s.complete_ms <= to)
        .map(|s| s.complete_ms)
        .collect();
    done.sort_unstable();
    let mut last = from;
    let mut worst = 0;
    for t in done.into_iter().chain([to]) {
        worst = worst.max(t - last);
        last = t;
    }
    worst
}

/// From `healed` to the completion of the first acknowledged write invoked after it.
pub fn recovery(stats: &[OpStat], healed: u64) -> Option<u64> {
    stats
        .iter()
        .filter(|s| is_write(s.kind) && s.outcome == Outcome::Ok && s.invoke_ms >= healed)
        .map(|s| s.complete_ms - healed)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(invoke_ms: u64, complete_ms: u64) -> OpStat {
        OpStat { kind: "put", client: 0, invoke_ms, complete_ms, outcome: Outcome::Ok }
    }

    #[test]
    fn liveness_figures_come_from_acknowledged_writes() {
        let stats = [w(0, 100), w(100, 300), w(900, 2_000), w(2_100, 2_150)];
        assert_eq!(unavailable(&stats, 0, 2_500), 1_700);
        assert_eq!(recovery(&stats, 1_000), Some(1_150));
        assert_eq!(recovery(&stats, 3_000), None);
        let p = percentiles(vec![5, 1, 9, 3]).unwrap();
        assert_eq!((p.p50, p.p99, p.max), (3, 9, 9));
    }
}
