//! The registry's records are read-only to the generic KV APIs (etcd KV/Txn, Consul KV): a
//! record changes only through the registry's own rules (validation, leases, the eviction
//! brake), so `etcdctl del --prefix /quorate/` must not be able to remove every instance at
//! once. Reads and watches of the keyspace stay open.
//!
//! The guard is a pure function over key ranges, in etcd's conventions for `range_end`, and
//! is checked against the command exactly as it would be proposed, after every dialect's key
//! mapping and decoding, so there is no spelling of a key (percent-encoded, doubled slashes, a
//! range that merely overlaps) that it does not see. It walks nested Txns without recursion,
//! in time linear in the command's size. The registry's own writes (the HTTP handlers, the
//! reaper, the prober) are proposed directly and never pass through it.

use quorate_kv::{Command, RequestOp, TxnRequest};

use crate::{BRAKE_STATE_KEY, REGISTRY_PREFIX};

/// A write that would touch a protected key range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The first offending operation's key (for a range, its start).
    pub key: Vec<u8>,
    /// Its `range_end` as given (empty for a single key).
    pub range_end: Vec<u8>,
}

/// Whether the etcd range `[key, range_end)` shares a key with the prefix `prefix`.
///
/// etcd's conventions: an empty `range_end` is the single key `key`; `"\0"` is every key from
/// `key` on; otherwise the half-open range, which is empty when `range_end <= key`.
pub fn range_overlaps_prefix(key: &[u8], range_end: &[u8], prefix: &[u8]) -> bool {
    let start = prefix;
    let end = quorate_kv::prefix_end(prefix);
    // `prefix_end` answers "\0" (no upper bound) for an all-0xff or empty prefix.
    let below_end = |k: &[u8]| end == [0] || k < end.as_slice();
    match range_end {
        [] => key >= start && below_end(key),
        [0] => below_end(key),
        re => key < re && below_end(key) && start < re,
    }
}

/// Whether the etcd range `[key, range_end)` contains the single key `single`.
pub fn range_contains_key(key: &[u8], range_end: &[u8], single: &[u8]) -> bool {
    match range_end {
        [] => key == single,
        [0] => key <= single,
        re => key <= single && single < re,
    }
}

/// Whether `[key, range_end)` shares a key with the registry's records or the brake's state.
pub fn touches_registry(key: &[u8], range_end: &[u8]) -> bool {
    range_overlaps_prefix(key, range_end, REGISTRY_PREFIX.as_bytes())
        || range_contains_key(key, range_end, BRAKE_STATE_KEY.as_bytes())
}

/// The first write in `cmd` (Put, DeleteRange, any branch of any nested Txn, through fences)
/// that touches a key under `prefix`, if any. Reads and compares are never refused.
pub fn first_write_under(cmd: &Command, prefix: &[u8]) -> Option<Refused> {
    first_write_where(cmd, &|key, end| range_overlaps_prefix(key, end, prefix))
}

/// `first_write_under` for the registry's keyspace (`touches_registry`): what the etcd KV API
/// refuses.
pub fn first_registry_write(cmd: &Command) -> Option<Refused> {
    first_write_where(cmd, &touches_registry)
}

type Protected<'a> = &'a dyn Fn(&[u8], &[u8]) -> bool;

fn first_write_where(cmd: &Command, protected: Protected) -> Option<Refused> {
    let mut cmd = cmd;
    loop {
        match cmd {
            Command::Fenced { cmd: inner, .. }
            | Command::TermFenced { cmd: inner, .. }
            | Command::Authorized { cmd: inner, .. } => cmd = inner,
            Command::Put(p) => return refused(&p.key, &[], protected),
            Command::DeleteRange(d) => return refused(&d.key, &d.range_end, protected),
            Command::Txn(t) => return txn_first_write(t, protected),
            _ => return None,
        }
    }
}

fn refused(key: &[u8], range_end: &[u8], protected: Protected) -> Option<Refused> {
    protected(key, range_end).then(|| Refused { key: key.to_vec(), range_end: range_end.to_vec() })
}

/// Every branch of every nested Txn, with an explicit stack: no recursion, each op seen once.
fn txn_first_write(txn: &TxnRequest, protected: Protected) -> Option<Refused> {
    let mut stack: Vec<&TxnRequest> = vec![txn];
    while let Some(t) = stack.pop() {
        for op in t.success.iter().chain(&t.failure) {
            let hit = match op {
                RequestOp::Txn(inner) => {
                    stack.push(inner);
                    None
                }
                RequestOp::Put(p) => refused(&p.key, &[], protected),
                RequestOp::DeleteRange(d) => refused(&d.key, &d.range_end, protected),
                RequestOp::Range(_) => None,
            };
            if hit.is_some() {
                return hit;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use quorate_kv::{DeleteRangeRequest, PutRequest, RangeRequest};

    const P: &[u8] = b"/quorate/registry/";

    #[test]
    fn ranges_overlap_the_registry_in_etcds_conventions() {
        // (key, range_end, touches the registry)
        let table: &[(&[u8], &[u8], bool)] = &[
            // Single keys.
            (b"/quorate/registry/default/web/w1", b"", true),
            (b"/quorate/registry/", b"", true),
            (b"/quorate/registry", b"", false),
            (b"/quorate/registrz", b"", false),
            (b"/quorate/consul/sessions/x", b"", false),
            // The brake's replicated state, a single key next to the records.
            (b"/quorate/brake", b"", true),
            (b"/quorate/brakes", b"", false),
            (b"/quorate/b", b"/quorate/c", true),
            (b"/quorate/brake\0", b"/quorate/r", false),
            (b"/quorate/brake\0", b"\0", true),
            (b"/app/config", b"", false),
            // Prefixes (`--prefix`: range_end = prefix + 1).
            (b"/quorate/", b"/quorate0", true),
            (b"/quorate", b"/quoratf", true),
            (b"/", b"0", true),
            (b"/quorate/registry/default/", b"/quorate/registry/default0", true),
            (b"/quorate/consul/", b"/quorate/consul0", false),
            (b"/app/", b"/app0", false),
            // From a key (`--from-key`: range_end = "\0").
            (b"\0", b"\0", true),
            (b"", b"\0", true),
            (b"/a", b"\0", true),
            (b"/quorate/registry/zzz", b"\0", true),
            (b"/quorate/registry0", b"\0", false),
            (b"/z", b"\0", false),
            // Ranges that start before and end inside, start inside and end after, or touch.
            (b"/a", b"/quorate/registry/a", true),
            (b"/quorate/c", b"/quorate/registry/", false),
            (b"/a", b"/quorate/registry/", true), // holds the brake's state
            (b"/a", b"/quorate/registry/\0", true),
            (b"/quorate/registry/x", b"/z", true),
            (b"/quorate/registry0", b"/z", false),
            (b"/quorate/registry/", b"/quorate/registry0", true),
            // An empty range (end before start) deletes nothing.
            (b"/z", b"/a", false),
            (b"/quorate/registry/x", b"/quorate/registry/x", false),
        ];
        for (key, end, want) in table {
            assert_eq!(
                touches_registry(key, end),
                *want,
                "[{}, {})",
                String::from_utf8_lossy(key),
                String::from_utf8_lossy(end)
            );
        }
    }

    #[test]
    fn a_prefix_of_all_0xff_has_no_upper_bound() {
        assert!(range_overlaps_prefix(b"\xff\xff\x01", b"", b"\xff\xff"));
        assert!(range_overlaps_prefix(b"\xfe", b"\0", b"\xff"));
        assert!(!range_overlaps_prefix(b"\xfe", b"", b"\xff"));
    }

    fn put(k: &[u8]) -> RequestOp {
        RequestOp::Put(PutRequest { key: k.to_vec(), ..Default::default() })
    }
    fn del(k: &[u8], end: &[u8]) -> RequestOp {
        RequestOp::DeleteRange(DeleteRangeRequest { key: k.to_vec(), range_end: end.to_vec(), prev_kv: false })
    }
    fn read(k: &[u8], end: &[u8]) -> RequestOp {
        RequestOp::Range(RangeRequest { key: k.to_vec(), range_end: end.to_vec(), ..Default::default() })
    }
    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
        TxnRequest { compare: vec![], success, failure }
    }

    #[test]
    fn every_write_of_every_branch_is_seen_and_reads_pass() {
        let reg = b"/quorate/registry/default/web/w1";
        let refused = |c: &Command| first_registry_write(c).map(|r| r.key);
        assert_eq!(refused(&Command::Put(PutRequest { key: reg.to_vec(), ..Default::default() })), Some(reg.to_vec()));
        assert_eq!(
            refused(&Command::DeleteRange(DeleteRangeRequest {
                key: b"/quorate/".to_vec(),
                range_end: b"/quorate0".to_vec(),
                prev_kv: false
            })),
            Some(b"/quorate/".to_vec())
        );
        assert_eq!(refused(&Command::Put(PutRequest { key: b"/app".to_vec(), ..Default::default() })), None);
        // Reads of the registry, inside a Txn, are fine; so is a write elsewhere.
        assert_eq!(refused(&Command::Txn(txn(vec![read(P, b"\0"), put(b"/app")], vec![read(reg, b"")]))), None);
        // The failure branch counts as much as the success branch.
        assert!(refused(&Command::Txn(txn(vec![put(b"/app")], vec![del(b"/", b"0")]))).is_some());
        // Nested 200 deep, the offending write at the bottom of a failure branch.
        let mut t = txn(vec![], vec![put(reg)]);
        for _ in 0..200 {
            t = txn(vec![put(b"/app"), RequestOp::Txn(t)], vec![]);
        }
        assert_eq!(refused(&Command::Txn(t.clone())), Some(reg.to_vec()));
        // Through a fence and a term fence.
        let fenced = Command::Fenced {
            fence: quorate_kv::Fence { key: b"/lock".to_vec(), revision: 3 },
            cmd: Box::new(Command::TermFenced { term: 2, cmd: Box::new(Command::Txn(t)) }),
        };
        assert_eq!(refused(&fenced), Some(reg.to_vec()));
        // Commands that are not key writes.
        assert_eq!(refused(&Command::LeaseGrant { id: 0, ttl_s: 5 }), None);
        assert_eq!(refused(&Command::Compact { revision: 3, physical: false }), None);
    }

    #[test]
    fn a_wider_prefix_can_be_protected() {
        // Consul KV hides all of `/quorate/`, sessions included.
        let c = Command::Put(PutRequest { key: b"/quorate/consul/sessions/s".to_vec(), ..Default::default() });
        assert!(first_write_under(&c, b"/quorate/").is_some());
        assert!(first_registry_write(&c).is_none());
    }
}
