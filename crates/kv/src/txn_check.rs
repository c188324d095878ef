//! What makes a Txn acceptable before anything runs: etcd's admission limits (`--max-txn-ops`,
//! spent through nested Txns as etcd's `checkTxnRequest` spends them) and the write-set rule (no
//! two writes that can run together touch the same key, unless both are deletes).
//!
//! A request is checked once, in one pass over its tree: every check here costs steps linear in
//! the number of its nodes (the write-set rule n log n set operations), however the Txns nest.
//! This module must never walk a subtree twice: a Txn nested 40 deep is a few hundred bytes,
//! and a walk that revisits each level's children doubles per level. Each function counts the
//! steps it takes, so tests can assert the bound by counting, never by timing.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound::{Included, Unbounded};

use crate::types::*;
use crate::KvError;

/// Deepest nesting of Txns inside a Txn that is accepted, the outer Txn being depth 0. etcd
/// bounds depth only through the op budget (each level spends at least one of
/// `--max-txn-ops`); gRPC decoding already stops near 50 levels. This bound is a constant, so
/// every member applying an entry decides alike whatever its flags say.
pub const TXN_DEPTH_MAX: usize = 64;

/// etcd's admission check for a Txn (v3rpc `checkTxnRequest` and `checkIntervals`), run by the
/// API before proposing so a refused request never reaches the log. A Txn may have at most
/// `max_ops` compares, at most `max_ops` success ops and at most `max_ops` failure ops; a nested
/// Txn gets what is left of the budget after its parent's largest list. Also refused: an empty
/// key anywhere, `ignore_value`/`ignore_lease` with a value/lease, nesting deeper than
/// `TXN_DEPTH_MAX`, and writes that overlap (see `check_txn_writes`). Adds the steps taken to
/// `steps`.
pub fn check_txn_request(t: &TxnRequest, max_ops: usize, steps: &mut u64) -> Result<(), KvError> {
    admit(t, max_ops, 0, steps)?;
    check_txn_writes(t, steps)
}

fn admit(t: &TxnRequest, budget: usize, depth: usize, steps: &mut u64) -> Result<(), KvError> {
    *steps += 1;
    if depth > TXN_DEPTH_MAX {
        // In etcd's terms a level is an op spent: too deep is too many ops.
        return Err(KvError::TooManyOps { ops: depth, max: TXN_DEPTH_MAX });
    }
    let ops = t.compare.len().max(t.success.len()).max(t.failure.len());
    if ops > budget {
        return Err(KvError::TooManyOps { ops, max: budget });
    }
    for c in &t.compare {
        *steps += 1;
        check_key(&c.key)?;
    }
    for op in t.success.iter().chain(&t.failure) {
        *steps += 1;
        match op {
            RequestOp::Range(r) => check_key(&r.key)?,
            RequestOp::Put(p) => check_put_shape(p)?,
            RequestOp::DeleteRange(d) => check_key(&d.key)?,
            RequestOp::Txn(inner) => admit(inner, budget - ops, depth + 1, steps)?,
        }
    }
    Ok(())
}

/// The checks of a Put that need no state (etcd's `checkPutRequest`).
pub(crate) fn check_put_shape(p: &PutRequest) -> Result<(), KvError> {
    check_key(&p.key)?;
    if p.ignore_value && !p.value.is_empty() {
        return Err(KvError::ValueProvided);
    }
    if p.ignore_lease && p.lease != 0 {
        return Err(KvError::LeaseProvided);
    }
    Ok(())
}

pub(crate) fn check_key(key: &[u8]) -> Result<(), KvError> {
    if key.is_empty() {
        Err(KvError::EmptyKey)
    } else {
        Ok(())
    }
}

/// etcd's rule on a Txn's writes, checked for the success and the failure list each: no two
/// writes that can both run may touch one key (`duplicate key given in txn request`), except
/// two deletes. Writes in the two branches of one nested Txn never both run, so they may
/// overlap; a write beside a nested Txn can run with either of its branches. Unlike etcd's
/// `checkIntervals`, a put inside an earlier nested Txn is also checked against a delete in a
/// later one. Nesting deeper than `TXN_DEPTH_MAX` is refused. Runs at apply as well, so it
/// depends on nothing but the request.
pub fn check_txn_writes(t: &TxnRequest, steps: &mut u64) -> Result<(), KvError> {
    write_set(&t.success, 1, steps)?;
    write_set(&t.failure, 1, steps)?;
    Ok(())
}

/// Every key the ops may write, after checking that no two of them conflict.
fn write_set<'a>(ops: &'a [RequestOp], depth: usize, steps: &mut u64) -> Result<WriteSet<'a>, KvError> {
    let mut acc = WriteSet::default();
    for op in ops {
        *steps += 1;
        let one = match op {
            RequestOp::Range(_) => continue,
            RequestOp::Put(p) => WriteSet::put(&p.key),
            RequestOp::DeleteRange(d) => WriteSet::delete(&d.key, &d.range_end),
            RequestOp::Txn(inner) => {
                if depth > TXN_DEPTH_MAX {
                    return Err(KvError::TooManyOps { ops: depth, max: TXN_DEPTH_MAX });
                }
                // Either branch may run: the op writes their union, and the two branches are
                // not checked against each other.
                let then = write_set(&inner.success, depth + 1, steps)?;
                let otherwise = write_set(&inner.failure, depth + 1, steps)?;
                then.union(otherwise, steps)
            }
        };
        acc = acc.join(one, steps)?;
    }
    Ok(acc)
}

/// Keys some writes may touch: puts by key, deletes as disjoint half-open ranges
/// `start -> end` (`None`: no end). Joining two sets moves the smaller into the larger, so a
/// key moves O(log n) times whatever the shape of the tree.
#[derive(Default)]
struct WriteSet<'a> {
    puts: BTreeSet<&'a [u8]>,
    dels: BTreeMap<&'a [u8], Option<Vec<u8>>>,
}

impl<'a> WriteSet<'a> {
    fn put(key: &'a [u8]) -> Self {
        WriteSet { puts: BTreeSet::from([key]), dels: BTreeMap::new() }
    }

    fn delete(key: &'a [u8], range_end: &'a [u8]) -> Self {
        let end = match KeyRange::new(key, range_end) {
            KeyRange::Single(k) => Some([k, &[0]].concat()),
            KeyRange::FromKey(_) => None,
            // An empty range deletes nothing.
            KeyRange::Between(s, e) if e <= s => return WriteSet::default(),
            KeyRange::Between(_, e) => Some(e.to_vec()),
        };
        WriteSet { puts: BTreeSet::new(), dels: BTreeMap::from([(key, end)]) }
    }

    fn len(&self) -> usize {
        self.puts.len() + self.dels.len()
    }

    /// Both sets' writes, refused if a write of one conflicts with a write of the other.
    fn join(self, other: WriteSet<'a>, steps: &mut u64) -> Result<Self, KvError> {
        let (big, small) = if self.len() >= other.len() { (self, other) } else { (other, self) };
        for key in &small.puts {
            *steps += 1;
            if big.puts.contains(key) || big.deletes(key) {
                return Err(KvError::DuplicateKey);
            }
        }
        for (start, end) in &small.dels {
            *steps += 1;
            if big.puts_within(start, end) {
                return Err(KvError::DuplicateKey);
            }
        }
        Ok(big.union(small, steps))
    }

    /// Both sets' writes, unchecked.
    fn union(self, other: WriteSet<'a>, steps: &mut u64) -> Self {
        let (mut big, small) = if self.len() >= other.len() { (self, other) } else { (other, self) };
        *steps += small.len() as u64;
        big.puts.extend(small.puts);
        for (start, end) in small.dels {
            big.insert_delete(start, end, steps);
        }
        big
    }

    /// Whether a delete range holds `key`.
    fn deletes(&self, key: &[u8]) -> bool {
        self.dels.range::<[u8], _>((Unbounded, Included(key))).next_back().is_some_and(|(_, end)| before(key, end))
    }

    /// Whether a put lies in `[start, end)`.
    fn puts_within(&self, start: &[u8], end: &Option<Vec<u8>>) -> bool {
        self.puts.range::<[u8], _>((Included(start), Unbounded)).next().is_some_and(|k| before(k, end))
    }

    /// Add a delete range, merging the ranges it overlaps so the ranges stay disjoint. Each
    /// range is removed at most once after its insertion, so merging is amortised O(log n).
    fn insert_delete(&mut self, mut start: &'a [u8], mut end: Option<Vec<u8>>, steps: &mut u64) {
        if let Some((&s, e)) = self.dels.range::<[u8], _>((Unbounded, Included(start))).next_back() {
            if before(start, e) {
                let e = self.dels.remove(s).expect("just found");
                start = s;
                end = later_end(end, e);
            }
        }
        loop {
            *steps += 1;
            let next = self.dels.range::<[u8], _>((Included(start), Unbounded)).next().map(|(&s, _)| s);
            match next {
                Some(s) if before(s, &end) => {
                    let e = self.dels.remove(s).expect("just found");
                    end = later_end(end, e);
                }
                _ => break,
            }
        }
        self.dels.insert(start, end);
    }
}

/// Whether `key` is below the exclusive `end` (`None`: no end).
fn before(key: &[u8], end: &Option<Vec<u8>>) -> bool {
    end.as_deref().is_none_or(|e| key < e)
}

fn later_end(a: Option<Vec<u8>>, b: Option<Vec<u8>>) -> Option<Vec<u8>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
