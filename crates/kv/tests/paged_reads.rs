//! Long reads in pages (Range, a watch's replay, HashKV) give exactly what one read under the
//! lock gives, whatever is applied between the pages, and refuse when a compaction passes the
//! revision they read at.

use quorate_kv::*;

const POS: LogPosition = LogPosition { index: 1, term: 1 };

fn put(s: &mut Store, k: &str, v: &str) {
    let r = s.apply(&Command::Put(PutRequest { key: k.into(), value: v.into(), ..Default::default() }), POS);
    assert!(r.result.is_ok());
}

fn del(s: &mut Store, k: &str, end: &str) {
    let r = s
        .apply(&Command::DeleteRange(DeleteRangeRequest { key: k.into(), range_end: end.into(), prev_kv: false }), POS);
    assert!(r.result.is_ok());
}

/// 50 keys with some history: overwrites and deletes.
fn store() -> Store {
    let mut s = Store::new();
    for i in 0..50 {
        put(&mut s, &format!("k{i:02}"), &format!("v{}", 50 - i));
    }
    for i in (0..50).step_by(3) {
        put(&mut s, &format!("k{i:02}"), "again");
    }
    del(&mut s, "k10", "k15");
    s
}

/// Range page by page, applying `between` after each page.
fn paged_range(s: &mut Store, req: &RangeRequest, page: usize, mut between: impl FnMut(&mut Store)) -> RangeResponse {
    let mut scan = RangeScan::new(s, req).unwrap();
    for _ in 0..1_000 {
        s.range_step(req, &mut scan, page).unwrap();
        if scan.is_done() {
            return scan.finish(req);
        }
        between(s);
    }
    panic!("range never finished");
}

fn requests() -> Vec<RangeRequest> {
    let all = RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() };
    vec![
        all.clone(),
        RangeRequest { key: b"k20".to_vec(), ..Default::default() },
        RangeRequest { key: b"k05".to_vec(), range_end: vec![0], ..Default::default() },
        RangeRequest { limit: 7, ..all.clone() },
        RangeRequest { limit: 7, sort_order: SortOrder::Descend, sort_target: SortTarget::Value, ..all.clone() },
        RangeRequest { count_only: true, ..all.clone() },
        RangeRequest { keys_only: true, limit: 3, ..all.clone() },
        RangeRequest { min_mod_revision: 60, ..all.clone() },
        RangeRequest { revision: 30, ..all.clone() },
        RangeRequest { key: b"zz".to_vec(), range_end: b"a".to_vec(), ..Default::default() },
    ]
}

#[test]
fn a_range_in_pages_equals_one_range() {
    let mut s = store();
    for req in requests() {
        let whole = s.range(&req).unwrap();
        for page in [1, 2, 7, 1024] {
            assert_eq!(paged_range(&mut s, &req, page, |_| {}), whole, "{req:?} in pages of {page}");
        }
    }
}

#[test]
fn writes_between_pages_do_not_change_a_read_at_its_revision() {
    for req in requests() {
        let mut s = store();
        let whole = s.range(&req).unwrap();
        let mut n = 0;
        let paged = paged_range(&mut s, &req, 4, |s| {
            n += 1;
            put(s, &format!("k{:02}", n % 50), "later");
            put(s, &format!("k{n:02}x"), "new");
            del(s, &format!("k{:02}", (n * 7) % 50), "");
        });
        assert_eq!(paged, whole, "{req:?}");
    }
}

#[test]
fn a_compaction_past_the_revision_between_pages_refuses_the_read() {
    let mut s = store();
    let req = RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() };
    let mut scan = RangeScan::new(&s, &req).unwrap();
    s.range_step(&req, &mut scan, 5).unwrap();
    put(&mut s, "k00", "later");
    let current = s.revision();
    assert!(s.apply(&Command::Compact { revision: current, physical: false }, POS).result.is_ok());
    assert!(matches!(s.range_step(&req, &mut scan, 5), Err(KvError::Compacted { .. })));
    // A compaction at or below the scan's revision leaves it readable.
    let mut s = store();
    let mut scan = RangeScan::new(&s, &req).unwrap();
    s.range_step(&req, &mut scan, 5).unwrap();
    assert!(s.apply(&Command::Compact { revision: scan.revision(), physical: false }, POS).result.is_ok());
    s.range_step(&req, &mut scan, 5).unwrap();
}

#[test]
fn a_watch_replay_in_pages_covers_exactly_up_to_where_it_began() {
    let mut s = store();
    for (key, end) in [("k", "l"), ("k03", ""), ("a", "\0")] {
        for start in [1, 20, 70] {
            let whole = s.events_since(key.as_bytes(), end.as_bytes(), start).unwrap();
            let mut scan = EventScan::new(&s, key.as_bytes(), end.as_bytes(), start).unwrap();
            assert_eq!(scan.upto(), s.revision());
            for i in 0..1_000 {
                s.events_step(&mut scan, 3).unwrap();
                if scan.is_done() {
                    break;
                }
                // Later writes belong to the live stream, not to the replay.
                put(&mut s, &format!("k{:02}", i % 50), "later");
            }
            assert_eq!(scan.finish(), whole, "{key}..{end} from {start}");
            s = store();
        }
    }
    let mut scan = EventScan::new(&s, b"k", b"l", 1).unwrap();
    s.events_step(&mut scan, 3).unwrap();
    let current = s.revision();
    assert!(s.apply(&Command::Compact { revision: current, physical: false }, POS).result.is_ok());
    assert!(matches!(s.events_step(&mut scan, 3), Err(KvError::Compacted { .. })));
}

#[test]
fn hashkv_in_pages_equals_one_hash_and_refuses_across_a_compaction() {
    let mut s = store();
    for rev in [0, 30, s.revision()] {
        let whole = s.hash_kv(rev).unwrap();
        let mut scan = HashScan::new(&s, rev).unwrap();
        for i in 0..1_000 {
            s.hash_step(&mut scan, 4).unwrap();
            if scan.is_done() {
                break;
            }
            put(&mut s, &format!("k{:02}", i % 50), "later");
        }
        assert_eq!(scan.finish(), whole, "at {rev}");
        s = store();
    }
    let mut scan = HashScan::new(&s, 0).unwrap();
    s.hash_step(&mut scan, 4).unwrap();
    assert!(s.apply(&Command::Compact { revision: 20, physical: false }, POS).result.is_ok());
    assert!(matches!(s.hash_step(&mut scan, 4), Err(KvError::Compacted { .. })));
}

#[test]
fn a_read_only_txn_in_pages_equals_one_read_only_txn() {
    let s = store();
    let range = |k: &str, end: &str, revision| {
        RequestOp::Range(RangeRequest { key: k.into(), range_end: end.into(), revision, ..Default::default() })
    };
    let holds = Compare {
        result: CompareResult::Greater,
        target: CompareTarget::Version(0),
        key: b"k01".to_vec(),
        range_end: vec![],
    };
    let fails = Compare { target: CompareTarget::Version(99), ..holds.clone() };
    let inner = |c: &Compare| {
        RequestOp::Txn(TxnRequest {
            compare: vec![c.clone()],
            success: vec![range("k2", "k3", 0)],
            failure: vec![range("k", "l", 30), range("k40", "", 0)],
        })
    };
    for (outer, nested) in [(&holds, &holds), (&holds, &fails), (&fails, &holds), (&fails, &fails)] {
        let t = TxnRequest {
            compare: vec![outer.clone()],
            success: vec![range("k", "\0", 0), inner(nested), range("k05", "", 20)],
            failure: vec![inner(nested), inner(&holds)],
        };
        let whole = s.read_only_txn(&t).unwrap().unwrap();
        let (path, rev) = s.read_only_txn_path(&t).unwrap().unwrap();
        let ranges: Vec<RangeResponse> = read_only_txn_ranges(&t, &path, rev)
            .iter()
            .map(|r| {
                let mut scan = RangeScan::new(&s, r).unwrap();
                for _ in 0..1_000 {
                    s.range_step(r, &mut scan, 3).unwrap();
                    if scan.is_done() {
                        break;
                    }
                }
                scan.finish(r)
            })
            .collect();
        assert_eq!(read_only_txn_response(&t, &path, ranges), whole);
    }
    let writes = TxnRequest {
        success: vec![RequestOp::Put(PutRequest { key: b"a".to_vec(), ..Default::default() })],
        ..Default::default()
    };
    assert!(s.read_only_txn_path(&writes).is_none());
}

fn image(s: &Store) -> StoreSnapshot {
    serde_json::from_value(serde_json::to_value(s.snapshot_view()).unwrap()).unwrap()
}

/// Maintenance.Snapshot's copy, page by page, applying `between` after each page.
fn paged_snapshot(s: &mut Store, page: usize, mut between: impl FnMut(&mut Store)) -> Result<Store, KvError> {
    let mut scan = SnapshotScan::new(s);
    for _ in 0..1_000 {
        s.snapshot_step(&mut scan, page)?;
        if scan.is_done() {
            return Ok(scan.finish());
        }
        between(s);
    }
    panic!("snapshot never finished");
}

fn with_leases() -> Store {
    let mut s = store();
    for (id, keys) in [(7, ["k01", "k02", "k40"]), (8, ["k03", "k41", "k42"])] {
        assert!(s.apply(&Command::LeaseGrant { id, ttl_s: 30 }, POS).result.is_ok());
        for k in keys {
            let put = PutRequest { key: k.into(), value: b"leased".to_vec(), lease: id, ..Default::default() };
            assert!(s.apply(&Command::Put(put), POS).result.is_ok());
        }
    }
    // k02 leaves lease 7 by an overwrite without one; k42 by a delete.
    put(&mut s, "k02", "unleased");
    del(&mut s, "k42", "");
    assert!(s.apply(&Command::Compact { revision: 20, physical: true }, POS).result.is_ok());
    s
}

#[test]
fn a_snapshot_in_pages_is_the_store_at_the_revision_it_began() {
    let mut s = with_leases();
    let at_start = image(&s);
    for page in [1, 4, 1024] {
        let copy = paged_snapshot(&mut s.clone(), page, |_| {}).unwrap();
        assert_eq!(image(&copy), at_start, "page {page}");
        assert_eq!(copy.lease(7).unwrap().keys, s.lease(7).unwrap().keys);
    }

    // Writes between pages: new keys, overwrites, deletes, a lease revoked, one granted.
    let mut n = 0;
    let copy = paged_snapshot(&mut s, 4, |s| {
        n += 1;
        put(s, &format!("k{:02}", (n * 7) % 60), "later");
        put(s, &format!("new{n}"), "later");
        del(s, &format!("k{:02}", (n * 11) % 50), "");
        if n == 2 {
            assert!(s.apply(&Command::LeaseRevoke { id: 8 }, POS).result.is_ok());
            assert!(s.apply(&Command::LeaseGrant { id: 9, ttl_s: 5 }, POS).result.is_ok());
        }
    })
    .unwrap();
    assert!(n > 3, "the writes ran between pages");
    assert_eq!(image(&copy), at_start);
    // The copy is a working store: it reads as the original did.
    let all = RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() };
    assert_eq!(copy.range(&all).unwrap(), with_leases().range(&all).unwrap());
}

#[test]
fn a_compaction_between_snapshot_pages_refuses_the_copy() {
    let mut s = store();
    let rev = s.revision();
    let mut compacted = false;
    let r = paged_snapshot(&mut s, 4, |s| {
        if !compacted {
            compacted = true;
            assert!(s.apply(&Command::Compact { revision: rev, physical: true }, POS).result.is_ok());
        }
    });
    assert!(matches!(r, Err(KvError::Compacted { .. })), "{:?}", r.map(|s| s.revision()));
}
