//! Lost acknowledged writes: once the cluster is quiet, each key's final value must be
//! explained by a write (or delete) that nothing acknowledged definitely came after. If every
//! write that could explain the final value was followed by an acknowledged write, those
//! acknowledged writes were lost.

use std::collections::BTreeMap;

use crate::history::{Input, Op, Output};

/// An acknowledged write whose effect vanished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lost {
    pub key: String,
    pub final_value: Option<String>,
    pub lost: Vec<Op>,
}

fn acknowledged(op: &Op) -> bool {
    matches!(op.output, Some(Output::Done) | Some(Output::Cas(true)))
}

/// The value `op` leaves, if it writes: `Some(None)` for a delete.
fn written(op: &Op) -> Option<Option<String>> {
    match (&op.input, &op.output) {
        (Input::Write(v), Some(Output::Done) | None) => Some(Some(v.clone())),
        (Input::Cas { new, .. }, Some(Output::Cas(true)) | None) => Some(Some(new.clone())),
        (Input::Delete, Some(Output::Done) | None) => Some(None),
        _ => None,
    }
}

/// `final_values`: each key's value read (linearizably) after the run; absent keys map to `None`.
pub fn check(history: &[Op], final_values: &BTreeMap<String, Option<String>>) -> Vec<Lost> {
    let mut out = Vec::new();
    for (key, fin) in final_values {
        let ops: Vec<&Op> = history.iter().filter(|o| &o.key == key && written(o).is_some()).collect();
        let writes_after =
            |t: u64| -> Vec<&Op> { ops.iter().copied().filter(|w| acknowledged(w) && w.invoke > t).collect() };
        // Candidates: operations that leave the final value; "nothing written yet" explains absence.
        let mut explained = fin.is_none() && writes_after(0).is_empty() && ops.iter().all(|w| !acknowledged(w));
        let mut lost: Option<Vec<&Op>> = None;
        for c in ops.iter().filter(|w| written(w).as_ref() == Some(fin)) {
            // An unknown-outcome candidate may have taken effect arbitrarily late.
            let after = match c.complete {
                Some(t) => writes_after(t),
                None => Vec::new(),
            };
            if after.is_empty() {
                explained = true;
                break;
            }
            if lost.as_ref().is_none_or(|l| after.len() < l.len()) {
                lost = Some(after);
            }
        }
        if !explained {
            let lost = lost.unwrap_or_else(|| ops.iter().copied().filter(|w| acknowledged(w)).collect());
            out.push(Lost { key: key.clone(), final_value: fin.clone(), lost: lost.into_iter().cloned().collect() });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(key: &str, a: u64, b: Option<u64>, v: &str) -> Op {
        let output = b.map(|_| Output::Done);
        Op { client: 1, key: key.into(), invoke: a, complete: b, input: Input::Write(v.into()), output }
    }

    fn fin(pairs: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.map(String::from))).collect()
    }

    #[test]
    fn the_last_acknowledged_write_survives() {
        let h = vec![w("k", 0, Some(10), "a"), w("k", 20, Some(30), "b")];
        assert!(check(&h, &fin(&[("k", Some("b"))])).is_empty());
        // Concurrent writes: either may be last.
        let h = vec![w("k", 0, Some(30), "a"), w("k", 10, Some(20), "b")];
        assert!(check(&h, &fin(&[("k", Some("a"))])).is_empty());
        assert!(check(&h, &fin(&[("k", Some("b"))])).is_empty());
    }

    #[test]
    fn an_overwritten_acknowledged_write_is_lost() {
        // b was acknowledged after a completed, yet the final value is a.
        let h = vec![w("k", 0, Some(10), "a"), w("k", 20, Some(30), "b")];
        let lost = check(&h, &fin(&[("k", Some("a"))]));
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].lost, vec![h[1].clone()]);
        // A key that vanished although a write was acknowledged.
        let lost = check(&h, &fin(&[("k", None)]));
        assert_eq!(lost.len(), 1);
    }

    #[test]
    fn unknown_writes_may_explain_the_final_value() {
        let h = vec![w("k", 0, Some(10), "a"), w("k", 5, None, "x"), w("k", 20, Some(30), "b")];
        // x's outcome was unknown: it may have landed after b.
        assert!(check(&h, &fin(&[("k", Some("x"))])).is_empty());
    }
}
