//! Linearizability per key (Wing & Gong's search with Lowe's memoisation, as Porcupine and
//! Knossos do it), for a register with read, write, compare-and-set and delete.
//!
//! Each key is checked on its own (linearizability is compositional). The search linearizes
//! one operation at a time: an operation may go next only if it was invoked before every
//! not-yet-linearized completed operation returned. Operations with an unknown outcome may
//! take effect at any point after their invocation, or never; reads with an unknown outcome
//! constrain nothing and are dropped. Visited (set of linearized operations, register value)
//! pairs are memoised. The search has a time budget: running out is reported as such, never as
//! a pass. On a violation the checker shrinks the key's history to a minimal failing one
//! (removing any single operation from it makes it linearizable) for the report.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use crate::history::{Input, Op, Output};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// `ops` is a minimal failing sub-history of `key`.
    Violation {
        key: String,
        ops: Vec<Op>,
    },
    /// The search ran out of time on `key`: nothing can be concluded about it.
    TimedOut {
        key: String,
    },
}

/// Check every key of `history` within `budget` in total.
pub fn check(history: &[Op], budget: Duration) -> Verdict {
    let deadline = Instant::now() + budget;
    let mut by_key: BTreeMap<&str, Vec<Op>> = BTreeMap::new();
    for op in history {
        // A read whose answer never came says nothing.
        if op.is_unknown() && op.input == Input::Read {
            continue;
        }
        by_key.entry(&op.key).or_default().push(op.clone());
    }
    for (key, ops) in by_key {
        match linearizable(&ops, deadline) {
            Some(true) => {}
            Some(false) => return Verdict::Violation { key: key.into(), ops: shrink(ops, deadline) },
            None => return Verdict::TimedOut { key: key.into() },
        }
    }
    Verdict::Linearizable
}

/// The register after `op` from `state`, if `op`'s recorded output is possible there.
fn step(state: &Option<String>, op: &Op) -> Option<Option<String>> {
    match (&op.input, &op.output) {
        (Input::Read, Some(Output::Read(seen))) => (seen == state).then(|| state.clone()),
        (Input::Read, _) => None,
        (Input::Write(v), Some(Output::Done) | None) => Some(Some(v.clone())),
        (Input::Delete, Some(Output::Done) | None) => Some(None),
        (Input::Cas { expected, new }, Some(Output::Cas(true))) => (expected == state).then(|| Some(new.clone())),
        (Input::Cas { expected, .. }, Some(Output::Cas(false))) => (expected != state).then(|| state.clone()),
        // An unknown CAS took effect if it could have.
        (Input::Cas { expected, new }, None) => (expected == state).then(|| Some(new.clone())),
        _ => None,
    }
}

/// `Some(verdict)`, or `None` past the deadline.
fn linearizable(ops: &[Op], deadline: Instant) -> Option<bool> {
    let n = ops.len();
    let words = n.div_ceil(64);
    let ret = |op: &Op| op.complete.unwrap_or(u64::MAX);
    let completed: Vec<usize> = (0..n).filter(|i| ops[*i].complete.is_some()).collect();
    let mut seen: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    // Depth-first, explicit stack of (linearized set, state).
    let mut stack: Vec<(Vec<u64>, Option<String>)> = vec![(vec![0; words], None)];
    let mut steps: u64 = 0;
    while let Some((done, state)) = stack.pop() {
        steps += 1;
        if steps.is_multiple_of(1024) && Instant::now() > deadline {
            return None;
        }
        let is_done = |i: usize| done[i / 64] >> (i % 64) & 1 == 1;
        if completed.iter().all(|i| is_done(*i)) {
            return Some(true);
        }
        // The earliest return among pending operations bounds which may go next.
        let horizon = (0..n).filter(|i| !is_done(*i)).map(|i| ret(&ops[i])).min().unwrap_or(u64::MAX);
        // An operation may go next only if no pending one returned before it was invoked.
        for i in (0..n).filter(|i| !is_done(*i) && ops[*i].invoke <= horizon) {
            let Some(next) = step(&state, &ops[i]) else { continue };
            let mut d = done.clone();
            d[i / 64] |= 1 << (i % 64);
            if seen.insert((d.clone(), next.clone())) {
                stack.push((d, next));
            }
        }
    }
    Some(false)
}

/// Every value a read saw was written by some operation in `ops`: removing the write a read
/// depends on would turn the story into "a read of a value nobody wrote", which fails for a
/// trivial reason and explains nothing.
fn self_explaining(ops: &[Op]) -> bool {
    let written: HashSet<&str> = ops
        .iter()
        .filter_map(|o| match &o.input {
            Input::Write(v) | Input::Cas { new: v, .. } => Some(v.as_str()),
            _ => None,
        })
        .collect();
    ops.iter().all(|o| match &o.output {
        Some(Output::Read(Some(v))) => written.contains(v.as_str()),
        _ => true,
    })
}

/// Remove operations one at a time while the rest still fails (and still explains every read):
/// a minimal failing history.
/// Whether `ops` still shows the violation: it explains every read and cannot be linearized.
/// `None` when the budget ran out.
fn still_fails(ops: &[Op], deadline: Instant) -> Option<bool> {
    if !self_explaining(ops) {
        return Some(false);
    }
    linearizable(ops, deadline).map(|ok| !ok)
}

/// Shrink a failing history to a minimal one (delta debugging): first the shortest failing
/// prefix by invocation time, then drop ever smaller chunks while it still fails, ending with
/// single operations, so removing any one operation from the result makes it linearizable.
fn shrink(mut ops: Vec<Op>, deadline: Instant) -> Vec<Op> {
    ops.sort_by_key(|o| o.invoke);
    // The shortest failing prefix (binary search; failing prefixes are the common case).
    let (mut lo, mut hi) = (1, ops.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        match still_fails(&ops[..mid], deadline) {
            Some(true) => hi = mid,
            Some(false) => lo = mid + 1,
            None => return ops,
        }
    }
    if still_fails(&ops[..hi], deadline) == Some(true) {
        ops.truncate(hi);
    }
    let mut chunk = ops.len().div_ceil(2);
    loop {
        let mut i = 0;
        let mut removed = false;
        while i < ops.len() {
            let end = (i + chunk).min(ops.len());
            let mut without = ops[..i].to_vec();
            without.extend_from_slice(&ops[end..]);
            match still_fails(&without, deadline) {
                Some(true) => {
                    ops = without;
                    removed = true;
                }
                Some(false) => i = end,
                None => return ops,
            }
        }
        if chunk == 1 && !removed {
            return ops;
        }
        chunk = chunk.div_ceil(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Nanos;

    fn op(client: u32, invoke: Nanos, complete: Option<Nanos>, input: Input, output: Option<Output>) -> Op {
        Op { client, key: "k".into(), invoke, complete, input, output }
    }
    fn w(c: u32, a: Nanos, b: Nanos, v: &str) -> Op {
        op(c, a, Some(b), Input::Write(v.into()), Some(Output::Done))
    }
    fn r(c: u32, a: Nanos, b: Nanos, v: Option<&str>) -> Op {
        op(c, a, Some(b), Input::Read, Some(Output::Read(v.map(String::from))))
    }
    const BUDGET: Duration = Duration::from_secs(5);

    #[test]
    fn sequential_and_overlapping_histories_pass() {
        let h = vec![w(1, 0, 10, "a"), r(2, 20, 30, Some("a")), w(1, 40, 50, "b"), r(2, 60, 70, Some("b"))];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
        // A read overlapping a write may see either value.
        let h = vec![w(1, 0, 10, "a"), w(1, 20, 50, "b"), r(2, 30, 40, Some("a")), r(3, 30, 40, Some("b"))];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
        // Reads before anything was written see nothing.
        assert_eq!(check(&[r(1, 0, 5, None), w(2, 10, 20, "a")], BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_is_caught_and_shrunk() {
        // b was acknowledged before the read began; the read still saw a.
        let h = vec![
            w(1, 0, 10, "a"),
            w(1, 20, 30, "b"),
            r(2, 40, 50, Some("a")),
            r(3, 60, 70, Some("b")),
            w(4, 80, 90, "c"),
        ];
        match check(&h, BUDGET) {
            Verdict::Violation { key, ops } => {
                assert_eq!(key, "k");
                // Minimal: the two writes and the stale read.
                assert_eq!(ops, vec![h[0].clone(), h[1].clone(), h[2].clone()]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_lost_write_is_caught() {
        // The write of b was acknowledged, yet a later read sees the older a.
        let h = vec![w(1, 0, 10, "a"), w(2, 20, 30, "b"), r(3, 100, 110, Some("a"))];
        assert!(matches!(check(&h, BUDGET), Verdict::Violation { .. }));
    }

    #[test]
    fn unknown_outcomes_may_or_may_not_have_happened() {
        // An unknown write may show up later...
        let maybe = op(1, 10, None, Input::Write("x".into()), None);
        let h = vec![w(1, 0, 5, "a"), maybe.clone(), r(2, 100, 110, Some("x"))];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
        // ...or never.
        let h = vec![w(1, 0, 5, "a"), maybe.clone(), r(2, 100, 110, Some("a"))];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
        // But not before it was invoked.
        let h = vec![w(1, 0, 5, "a"), r(2, 6, 8, Some("x")), op(1, 10, None, Input::Write("x".into()), None)];
        assert!(matches!(check(&h, BUDGET), Verdict::Violation { .. }));
        // An unknown read constrains nothing.
        let h = vec![w(1, 0, 5, "a"), op(2, 6, None, Input::Read, None)];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn compare_and_set_has_one_winner() {
        let cas =
            |c, a, b, ok| op(c, a, Some(b), Input::Cas { expected: None, new: format!("c{c}") }, Some(Output::Cas(ok)));
        // Two concurrent create-if-absent: one wins.
        assert_eq!(check(&[cas(1, 0, 10, true), cas(2, 0, 10, false)], BUDGET), Verdict::Linearizable);
        // Both winning is a split brain.
        assert!(matches!(check(&[cas(1, 0, 10, true), cas(2, 0, 10, true)], BUDGET), Verdict::Violation { .. }));
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut other = w(1, 0, 10, "z");
        other.key = "other".into();
        let h = vec![other, w(1, 0, 10, "a"), r(2, 20, 30, Some("a"))];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn running_out_of_time_is_not_a_pass() {
        // Many concurrent writes of distinct values and a read that matches none: the search
        // must explore orders; a zero budget cannot conclude.
        let mut h: Vec<Op> = (0..40).map(|c| w(c, 0, 1000, &format!("v{c}"))).collect();
        h.push(r(99, 2000, 2010, Some("nobody")));
        assert_eq!(check(&h, Duration::ZERO), Verdict::TimedOut { key: "k".into() });
    }
}
