use super::*;
use crate::LeaseCheckpoint;

const POS: LogPosition = LogPosition { index: 1, term: 1 };

fn put(s: &mut Store, k: &str, v: &str) -> Applied {
    s.apply(&Command::Put(PutRequest { key: k.into(), value: v.into(), ..Default::default() }), POS)
}

fn get(s: &Store, k: &str) -> Option<KeyValue> {
    s.range(&RangeRequest { key: k.into(), ..Default::default() }).unwrap().kvs.into_iter().next()
}

fn keys(r: &RangeResponse) -> Vec<String> {
    r.kvs.iter().map(|kv| String::from_utf8(kv.key.clone()).unwrap()).collect()
}

#[test]
fn put_tracks_create_mod_revision_and_version() {
    let mut s = Store::new();
    assert_eq!(s.revision(), 1);
    assert_eq!(put(&mut s, "a", "1").revision, 2);
    assert_eq!(put(&mut s, "a", "2").revision, 3);
    let kv = get(&s, "a").unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
    assert_eq!(kv.value, b"2");
}

#[test]
fn delete_then_put_starts_a_new_generation() {
    let mut s = Store::new();
    put(&mut s, "a", "1");
    let d = s
        .apply(&Command::DeleteRange(DeleteRangeRequest { key: "a".into(), prev_kv: true, ..Default::default() }), POS);
    match d.result.unwrap() {
        CommandResponse::DeleteRange(r) => {
            assert_eq!(r.deleted, 1);
            assert_eq!(r.prev_kvs[0].value, b"1");
        }
        other => panic!("{other:?}"),
    }
    put(&mut s, "a", "2");
    let kv = get(&s, "a").unwrap();
    assert_eq!((kv.create_revision, kv.version), (4, 1));
}

#[test]
fn deleting_nothing_does_not_bump_the_revision() {
    let mut s = Store::new();
    put(&mut s, "a", "1");
    let d = s.apply(&Command::DeleteRange(DeleteRangeRequest { key: "zz".into(), ..Default::default() }), POS);
    assert_eq!(d.revision, 2);
    assert!(d.events.is_empty());
}

#[test]
fn range_prefix_from_key_limit_and_sort() {
    let mut s = Store::new();
    for (k, v) in [("a/1", "z"), ("a/2", "y"), ("a/3", "x"), ("b", "w")] {
        put(&mut s, k, v);
    }
    let prefix = RangeRequest { key: "a/".into(), range_end: prefix_end(b"a/"), ..Default::default() };
    let r = s.range(&prefix).unwrap();
    assert_eq!(keys(&r), ["a/1", "a/2", "a/3"]);
    assert_eq!((r.count, r.more), (3, false));

    let r = s.range(&RangeRequest { limit: 2, ..prefix.clone() }).unwrap();
    assert_eq!(keys(&r), ["a/1", "a/2"]);
    assert_eq!((r.count, r.more), (3, true));

    let r = s.range(&RangeRequest { key: "a/2".into(), range_end: vec![0], ..Default::default() }).unwrap();
    assert_eq!(keys(&r), ["a/2", "a/3", "b"]);

    let all = RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() };
    let r = s.range(&RangeRequest { sort_target: SortTarget::Value, ..all.clone() }).unwrap();
    assert_eq!(keys(&r), ["b", "a/3", "a/2", "a/1"], "value ascending by default");
    let r = s.range(&RangeRequest { sort_order: SortOrder::Descend, limit: 1, ..all.clone() }).unwrap();
    assert_eq!(keys(&r), ["b"]);
    assert!(r.more);

    let r = s.range(&RangeRequest { count_only: true, ..all.clone() }).unwrap();
    assert!(r.kvs.is_empty());
    assert_eq!(r.count, 4);
    let r = s.range(&RangeRequest { keys_only: true, ..all.clone() }).unwrap();
    assert!(r.kvs.iter().all(|kv| kv.value.is_empty()));
    let r = s.range(&RangeRequest { min_mod_revision: 4, max_mod_revision: 4, ..all }).unwrap();
    assert_eq!(keys(&r), ["a/3"]);
}

#[test]
fn reads_at_old_future_and_compacted_revisions() {
    let mut s = Store::new();
    put(&mut s, "a", "1"); // rev 2
    put(&mut s, "a", "2"); // rev 3
    put(&mut s, "a", "3"); // rev 4
    let at = |s: &Store, rev| s.range(&RangeRequest { key: "a".into(), revision: rev, ..Default::default() });
    assert_eq!(at(&s, 2).unwrap().kvs[0].value, b"1");
    assert_eq!(at(&s, 5), Err(KvError::FutureRevision { requested: 5, current: 4 }));
    s.apply(&Command::Compact { revision: 3, physical: false }, POS);
    assert_eq!(at(&s, 2), Err(KvError::Compacted { requested: 2, compacted: 3 }));
    assert_eq!(at(&s, 3).unwrap().kvs[0].value, b"2");
    let again = s.apply(&Command::Compact { revision: 3, physical: false }, POS);
    assert_eq!(again.result, Err(KvError::Compacted { requested: 3, compacted: 3 }));
    let future = s.apply(&Command::Compact { revision: 9, physical: false }, POS);
    assert_eq!(future.result, Err(KvError::FutureRevision { requested: 9, current: 4 }));
}

#[test]
fn compaction_drops_deleted_keys_entirely() {
    let mut s = Store::new();
    put(&mut s, "a", "1");
    s.apply(&Command::DeleteRange(DeleteRangeRequest { key: "a".into(), ..Default::default() }), POS);
    put(&mut s, "b", "1");
    s.apply(&Command::Compact { revision: 4, physical: true }, POS);
    assert_eq!(s.key_count(), 1);
    assert!(get(&s, "a").is_none());
}

#[test]
fn a_key_holds_room_for_the_versions_it_has_not_more() {
    let mut s = Store::new();
    put(&mut s, "once", "1");
    assert_eq!(s.keys[b"once".as_slice()].capacity(), 1, "a key written once");
    for i in 0..100 {
        put(&mut s, "often", &i.to_string());
    }
    assert!(s.keys[b"often".as_slice()].capacity() >= 100);
    let rev = s.revision();
    s.apply(&Command::Compact { revision: rev, physical: true }, POS);
    let often = &s.keys[b"often".as_slice()];
    assert_eq!(often.len(), 1);
    assert!(often.capacity() <= 2, "compaction kept room for {} versions", often.capacity());
    assert_eq!(get(&s, "often").unwrap().value, b"99");
}

#[test]
fn bytes_in_use_is_the_same_counted_as_it_goes_or_afresh() {
    // Every member must reach the same count from the same log, whether it applied each entry,
    // compacted, or restored from a snapshot.
    let mut s = Store::new();
    for id in 1..=5 {
        s.apply(&Command::LeaseGrant { id, ttl_s: 60 }, POS);
    }
    for i in 0..300 {
        // Keys move between leases, leave them, and are deleted while bound.
        let lease = [0, 1, 2, 3, 4, 5][i % 6];
        let key = format!("k{}", i % 37);
        s.apply(
            &Command::Put(PutRequest {
                key: key.into(),
                value: "v".repeat(i % 50).into(),
                lease,
                ..Default::default()
            }),
            POS,
        );
        if i % 7 == 0 {
            s.apply(
                &Command::DeleteRange(DeleteRangeRequest { key: format!("k{}", i % 11).into(), ..Default::default() }),
                POS,
            );
        }
    }
    let restored = |s: &Store| Store::from_snapshot(s.to_snapshot()).bytes_in_use();
    assert_eq!(s.bytes_in_use(), restored(&s));
    let bound = s.bytes_in_use();
    s.apply(&Command::LeaseRevoke { id: 2 }, POS);
    assert!(s.bytes_in_use() < bound, "a revoked lease and its keys are freed");
    assert_eq!(s.bytes_in_use(), restored(&s));
    let running = s.bytes_in_use();
    s.apply(&Command::Compact { revision: s.revision() - 50, physical: true }, POS);
    assert!(s.bytes_in_use() < running, "compaction frees: {} vs {running}", s.bytes_in_use());
    assert_eq!(s.bytes_in_use(), restored(&s));
    let ignore = PutRequest { key: "k1".into(), ignore_value: true, ..Default::default() };
    let cost = s.quota_cost(&Command::Put(ignore.clone())).unwrap();
    let before = s.bytes_in_use();
    s.apply(&Command::Put(ignore), POS);
    assert!(s.bytes_in_use() - before <= cost, "a put keeping its value costs it");
    let leased = PutRequest { key: "new".into(), value: "v".into(), lease: 1, ..Default::default() };
    let cost = s.quota_cost(&Command::Put(leased.clone())).unwrap();
    let before = s.bytes_in_use();
    s.apply(&Command::Put(leased), POS);
    assert!(s.bytes_in_use() - before <= cost, "a put binding a new key to a lease costs its entry in the lease too");
}

fn txn_cas(key: &str, create_rev: i64, value: &str) -> Command {
    Command::Txn(TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal,
            target: CompareTarget::Create(create_rev),
            key: key.into(),
            range_end: vec![],
        }],
        success: vec![RequestOp::Put(PutRequest { key: key.into(), value: value.into(), ..Default::default() })],
        failure: vec![RequestOp::Range(RangeRequest { key: key.into(), ..Default::default() })],
    })
}

#[test]
fn txn_create_if_absent_has_exactly_one_winner() {
    let mut s = Store::new();
    let first = s.apply(&txn_cas("leader", 0, "me"), POS);
    let second = s.apply(&txn_cas("leader", 0, "you"), POS);
    let succeeded = |a: &Applied| match a.result.as_ref().unwrap() {
        CommandResponse::Txn(t) => t.succeeded,
        other => panic!("{other:?}"),
    };
    assert!(succeeded(&first));
    assert!(!succeeded(&second));
    assert_eq!(second.revision, first.revision, "a failed read-only branch does not bump the revision");
    assert_eq!(get(&s, "leader").unwrap().value, b"me");
}

#[test]
fn txn_compare_table() {
    let mut s = Store::new();
    put(&mut s, "k", "m"); // rev 2, version 1
    let cases: Vec<(CompareTarget, CompareResult, bool)> = vec![
        (CompareTarget::Value("m".into()), CompareResult::Equal, true),
        (CompareTarget::Value("a".into()), CompareResult::Greater, true),
        (CompareTarget::Value("z".into()), CompareResult::Less, true),
        (CompareTarget::Value("m".into()), CompareResult::NotEqual, false),
        (CompareTarget::Version(1), CompareResult::Equal, true),
        (CompareTarget::Mod(2), CompareResult::Equal, true),
        (CompareTarget::Create(3), CompareResult::Less, true),
        (CompareTarget::Lease(0), CompareResult::Equal, true),
    ];
    for (target, result, want) in cases {
        let c = Compare { result, target: target.clone(), key: "k".into(), range_end: vec![] };
        assert_eq!(s.compare_holds(&c, &mut 0), want, "{target:?} {result:?}");
    }
    let missing = Compare {
        result: CompareResult::NotEqual,
        target: CompareTarget::Value("x".into()),
        key: "none".into(),
        range_end: vec![],
    };
    assert!(!s.compare_holds(&missing, &mut 0), "value compares on a missing key always fail");
    put(&mut s, "k2", "n");
    let range = Compare {
        result: CompareResult::Greater,
        target: CompareTarget::Mod(1),
        key: "k".into(),
        range_end: "l".into(),
    };
    assert!(s.compare_holds(&range, &mut 0), "range compare holds for every key");
}

#[test]
fn txn_reads_see_its_own_writes_and_share_one_revision() {
    let mut s = Store::new();
    let t = Command::Txn(TxnRequest {
        compare: vec![],
        success: vec![
            RequestOp::Put(PutRequest { key: "a".into(), value: "1".into(), ..Default::default() }),
            RequestOp::Put(PutRequest { key: "b".into(), value: "2".into(), ..Default::default() }),
            RequestOp::Range(RangeRequest { key: "a".into(), range_end: "c".into(), ..Default::default() }),
        ],
        failure: vec![],
    });
    let a = s.apply(&t, POS);
    assert_eq!(a.revision, 2);
    assert_eq!(a.events.len(), 2);
    match a.result.unwrap() {
        CommandResponse::Txn(t) => match &t.responses[2] {
            ResponseOp::Range(r) => assert_eq!(r.count, 2),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

#[test]
fn txn_rejections_change_nothing() {
    let mut s = Store::new();
    put(&mut s, "a", "1");
    let before = s.hash_kv(0).unwrap();
    let dup = Command::Txn(TxnRequest {
        success: vec![
            RequestOp::Put(PutRequest { key: "a".into(), ..Default::default() }),
            RequestOp::DeleteRange(DeleteRangeRequest { key: "a".into(), range_end: "b".into(), prev_kv: false }),
        ],
        ..Default::default()
    });
    assert_eq!(s.apply(&dup, POS).result, Err(KvError::DuplicateKey));
    let many = TxnRequest {
        success: (0..129)
            .map(|i| RequestOp::Put(PutRequest { key: format!("k{i}").into(), ..Default::default() }))
            .collect(),
        ..Default::default()
    };
    // The op limit is the API's admission rule (a flag); apply checks only what every member
    // decides alike.
    assert_eq!(crate::check_txn_request(&many, TXN_OPS_MAX, &mut 0), Err(KvError::TooManyOps { ops: 129, max: 128 }));
    let bad_lease = Command::Txn(TxnRequest {
        success: vec![
            RequestOp::Put(PutRequest { key: "x".into(), ..Default::default() }),
            RequestOp::Put(PutRequest { key: "y".into(), lease: 77, ..Default::default() }),
        ],
        ..Default::default()
    });
    assert_eq!(s.apply(&bad_lease, POS).result, Err(KvError::LeaseNotFound { id: 77 }));
    assert_eq!(s.hash_kv(0).unwrap(), before);
    assert_eq!(s.revision(), 2);
}

#[test]
fn put_errors() {
    let mut s = Store::new();
    let p = |key: &str, lease, ignore_value| {
        Command::Put(PutRequest { key: key.into(), lease, ignore_value, ..Default::default() })
    };
    assert_eq!(s.apply(&p("", 0, false), POS).result, Err(KvError::EmptyKey));
    assert_eq!(s.apply(&p("a", 5, false), POS).result, Err(KvError::LeaseNotFound { id: 5 }));
    assert_eq!(s.apply(&p("a", 0, true), POS).result, Err(KvError::KeyNotFound));
    assert_eq!(s.revision(), 1);
}

#[test]
fn lease_grant_attach_revoke_deletes_keys_at_one_revision() {
    let mut s = Store::new();
    let g = s.apply(&Command::LeaseGrant { id: 0, ttl_s: 10 }, LogPosition { index: 7, term: 2 });
    let CommandResponse::LeaseGrant { id, ttl_s } = g.result.unwrap() else { panic!() };
    assert!(id > 0);
    assert_eq!(ttl_s, 10);
    let again = s.apply(&Command::LeaseGrant { id, ttl_s: 10 }, POS);
    assert_eq!(again.result, Err(KvError::LeaseExists { id }));
    for k in ["a", "b"] {
        s.apply(&Command::Put(PutRequest { key: k.into(), lease: id, ..Default::default() }), POS);
    }
    put(&mut s, "c", "no lease");
    // Re-putting "b" without a lease detaches it.
    put(&mut s, "b", "free");
    assert_eq!(s.lease(id).unwrap().keys.len(), 1);
    let r = s.apply(&Command::LeaseRevoke { id }, POS);
    assert_eq!(r.events.len(), 1);
    assert!(get(&s, "a").is_none());
    assert!(get(&s, "b").is_some());
    assert_eq!(s.apply(&Command::LeaseRevoke { id }, POS).result, Err(KvError::LeaseNotFound { id }));
}

#[test]
fn lease_expiry_from_a_stale_term_is_a_no_op() {
    let mut s = Store::new();
    s.apply(&Command::LeaseGrant { id: 42, ttl_s: 5 }, POS);
    s.apply(&Command::Put(PutRequest { key: "svc".into(), lease: 42, ..Default::default() }), POS);
    let stale = s.apply(&Command::LeaseExpire { ids: vec![42], term: 3 }, LogPosition { index: 9, term: 4 });
    assert_eq!(stale.result, Ok(CommandResponse::LeaseExpire { expired: vec![], stale_term: true }));
    assert!(get(&s, "svc").is_some());
    assert!(s.lease(42).is_some());
    let fresh = s.apply(&Command::LeaseExpire { ids: vec![42, 43], term: 4 }, LogPosition { index: 10, term: 4 });
    assert_eq!(fresh.result, Ok(CommandResponse::LeaseExpire { expired: vec![42], stale_term: false }));
    assert!(get(&s, "svc").is_none());
}

#[test]
fn an_expiry_verdict_applies_only_to_the_decision_it_judged() {
    let at = |index| LogPosition { index, term: 4 };
    let mut s = Store::new();
    s.apply(&Command::LeaseGrant { id: 7, ttl_s: 5 }, at(10));
    s.apply(&Command::LeaseGrant { id: 8, ttl_s: 5 }, at(11));
    s.apply(&Command::Put(PutRequest { key: "a".into(), lease: 7, ..Default::default() }), at(12));
    // The leader judged lease 7 at its grant (10); a renewal was logged before the verdict.
    let renewed = s.apply(&Command::LeaseRenew { ids: vec![7, 99] }, at(13));
    assert_eq!(renewed.result, Ok(CommandResponse::LeaseRenew { renewed: vec![7] }));
    assert_eq!(s.lease(7).unwrap().set_at, 13);
    let verdict = s.apply(&Command::LeaseExpireAt { leases: vec![(7, 10), (8, 11)], term: 4 }, at(14));
    assert_eq!(verdict.result, Ok(CommandResponse::LeaseExpire { expired: vec![8], stale_term: false }));
    assert!(get(&s, "a").is_some());
    // Revoked and granted again under the same id: a verdict on the old grant is a no-op.
    s.apply(&Command::LeaseRevoke { id: 7 }, at(15));
    s.apply(&Command::LeaseGrant { id: 7, ttl_s: 5 }, at(16));
    let old = s.apply(&Command::LeaseExpireAt { leases: vec![(7, 13)], term: 4 }, at(17));
    assert_eq!(old.result, Ok(CommandResponse::LeaseExpire { expired: vec![], stale_term: false }));
    assert!(s.lease(7).is_some());
    // A verdict from another term is a no-op whatever it names.
    let stale = s.apply(&Command::LeaseExpireAt { leases: vec![(7, 16)], term: 3 }, at(18));
    assert_eq!(stale.result, Ok(CommandResponse::LeaseExpire { expired: vec![], stale_term: true }));
    let due = s.apply(&Command::LeaseExpireAt { leases: vec![(7, 16)], term: 4 }, at(19));
    assert_eq!(due.result, Ok(CommandResponse::LeaseExpire { expired: vec![7], stale_term: false }));
}

#[test]
fn lease_renewal_clears_a_checkpointed_remainder() {
    let mut s = Store::new();
    s.apply(&Command::LeaseGrant { id: 1, ttl_s: 10 }, POS);
    s.apply(&Command::LeaseCheckpoint(vec![LeaseCheckpoint { id: 1, remaining_ms: 4_000 }]), POS);
    s.apply(&Command::LeaseRenew { ids: vec![1] }, LogPosition { index: 5, term: 1 });
    assert_eq!(s.lease(1).unwrap().remaining_at_checkpoint_ms(), 10_000);
}

#[test]
fn lease_checkpoint_records_remaining_ttl() {
    let mut s = Store::new();
    s.apply(&Command::LeaseGrant { id: 1, ttl_s: 10 }, POS);
    assert_eq!(s.lease(1).unwrap().remaining_at_checkpoint_ms(), 10_000);
    s.apply(
        &Command::LeaseCheckpoint(vec![
            LeaseCheckpoint { id: 1, remaining_ms: 4_000 },
            LeaseCheckpoint { id: 2, remaining_ms: 1 },
        ]),
        POS,
    );
    assert_eq!(s.lease(1).unwrap().remaining_at_checkpoint_ms(), 4_000);
    assert!(s.lease(2).is_none());
}

#[test]
fn events_since_replays_history_in_order_with_prev_kv() {
    let mut s = Store::new();
    put(&mut s, "a", "1"); // 2
    put(&mut s, "b", "1"); // 3
    put(&mut s, "a", "2"); // 4
    s.apply(&Command::DeleteRange(DeleteRangeRequest { key: "a".into(), range_end: "c".into(), prev_kv: false }), POS); // 5
    let evs = s.events_since(b"a", b"c", 3).unwrap();
    let shape: Vec<(i64, EventKind, &[u8])> = evs.iter().map(|e| (e.revision(), e.kind, e.kv.key.as_slice())).collect();
    assert_eq!(
        shape,
        vec![
            (3, EventKind::Put, &b"b"[..]),
            (4, EventKind::Put, b"a"),
            (5, EventKind::Delete, b"a"),
            (5, EventKind::Delete, b"b")
        ]
    );
    assert_eq!(evs[1].prev_kv.as_ref().unwrap().value, b"1");
    s.apply(&Command::Compact { revision: 4, physical: false }, POS);
    assert_eq!(s.events_since(b"a", b"c", 3), Err(KvError::Compacted { requested: 3, compacted: 4 }));
}

#[test]
fn snapshot_round_trip_preserves_everything() {
    let mut s = Store::new();
    s.apply(&Command::LeaseGrant { id: 9, ttl_s: 30 }, POS);
    s.apply(&Command::Put(PutRequest { key: "x".into(), value: "1".into(), lease: 9, ..Default::default() }), POS);
    put(&mut s, "y", "2");
    put(&mut s, "y", "3");
    s.apply(&Command::Compact { revision: 3, physical: false }, POS);
    let t = Store::from_snapshot(s.to_snapshot());
    assert_eq!(t.revision(), s.revision());
    assert_eq!(t.compact_revision(), 3);
    assert_eq!(t.hash_kv(0), s.hash_kv(0));
    assert_eq!(t.lease(9), s.lease(9));
}

#[test]
fn key_ranges_overlap() {
    let a = KeyRange::new(b"a", b"");
    assert!(a.overlaps(&KeyRange::new(b"a", b"b")));
    assert!(!a.overlaps(&KeyRange::new(b"b", b"c")));
    assert!(KeyRange::new(b"a", &[0]).overlaps(&KeyRange::new(b"z", b"")));
    assert!(!KeyRange::new(b"a", b"b").overlaps(&KeyRange::new(b"b", b"")));
    assert_eq!(prefix_end(b"a/"), b"a0");
    assert_eq!(prefix_end(&[0xff]), vec![0]);
}

#[test]
fn nospace_alarm_refuses_only_writes_that_add_data() {
    let mut s = Store::new();
    put(&mut s, "a", "1");
    let raise = s.apply(&Command::Alarm { activate: true, member: 7, alarm: AlarmType::NoSpace }, POS);
    assert_eq!(raise.result, Ok(CommandResponse::Alarm { alarms: vec![(7, AlarmType::NoSpace)] }));
    assert_eq!(put(&mut s, "b", "2").result, Err(KvError::NoSpace));
    assert_eq!(s.apply(&Command::LeaseGrant { id: 1, ttl_s: 5 }, POS).result, Err(KvError::NoSpace));
    let txn_put = Command::Txn(TxnRequest {
        success: vec![RequestOp::Put(PutRequest { key: "c".into(), ..Default::default() })],
        ..Default::default()
    });
    assert_eq!(s.apply(&txn_put, POS).result, Err(KvError::NoSpace));
    let del = s.apply(&Command::DeleteRange(DeleteRangeRequest { key: "a".into(), ..Default::default() }), POS);
    assert!(del.result.is_ok(), "deletes still work");
    assert!(s.apply(&Command::Compact { revision: 3, physical: true }, POS).result.is_ok(), "compaction still works");
    s.apply(&Command::Alarm { activate: false, member: 7, alarm: AlarmType::NoSpace }, POS);
    assert!(put(&mut s, "b", "2").result.is_ok(), "disarmed");
}

#[test]
fn bytes_in_use_grows_with_history_and_shrinks_with_compaction() {
    let mut s = Store::new();
    for i in 0..10 {
        put(&mut s, "k", &format!("{i:0100}"));
    }
    let full = s.bytes_in_use();
    assert!(full >= 10 * 100);
    s.apply(&Command::Compact { revision: s.revision(), physical: true }, POS);
    assert!(s.bytes_in_use() < full / 5, "{} vs {}", s.bytes_in_use(), full);
    assert_eq!(Store::from_snapshot(s.to_snapshot()).bytes_in_use(), s.bytes_in_use());
}

#[test]
fn read_only_txn_matches_the_replicated_path() {
    let mut s = Store::new();
    put(&mut s, "a", "1");
    put(&mut s, "b", "2");
    let t = TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal,
            target: CompareTarget::Value("1".into()),
            key: "a".into(),
            range_end: vec![],
        }],
        success: vec![RequestOp::Range(RangeRequest { key: "a".into(), range_end: "c".into(), ..Default::default() })],
        failure: vec![],
    };
    let local = s.read_only_txn(&t).expect("read-only").unwrap();
    let replicated = match s.apply(&Command::Txn(t), POS).result.unwrap() {
        CommandResponse::Txn(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(local, replicated);
    let writes = TxnRequest {
        failure: vec![RequestOp::DeleteRange(DeleteRangeRequest { key: "a".into(), ..Default::default() })],
        ..Default::default()
    };
    assert!(s.read_only_txn(&writes).is_none());
}

#[test]
fn snapshot_view_serialises_like_the_owned_snapshot() {
    let mut s = Store::new();
    s.apply(&Command::LeaseGrant { id: 9, ttl_s: 30 }, POS);
    s.apply(&Command::Put(PutRequest { key: "x".into(), value: "1".into(), lease: 9, ..Default::default() }), POS);
    put(&mut s, "y", "2");
    s.apply(&Command::DeleteRange(DeleteRangeRequest { key: "y".into(), ..Default::default() }), POS);
    s.apply(&Command::Alarm { activate: true, member: 3, alarm: AlarmType::NoSpace }, POS);
    let owned = serde_json::to_string(&s.to_snapshot()).unwrap();
    let view = serde_json::to_string(&s.snapshot_view()).unwrap();
    assert_eq!(owned, view);
}

fn fenced(key: &str, revision: i64, cmd: Command) -> Command {
    Command::Fenced { fence: Fence { key: key.into(), revision }, cmd: Box::new(cmd) }
}

fn put_cmd(k: &str, v: &str) -> Command {
    Command::Put(PutRequest { key: k.into(), value: v.into(), ..Default::default() })
}

#[test]
fn fenced_writes_apply_only_while_the_guard_key_is_held_at_its_token() {
    let mut s = Store::new();
    let lease = s.apply(&Command::LeaseGrant { id: 7, ttl_s: 10 }, POS);
    assert!(lease.result.is_ok());
    let granted = s.apply(&Command::Put(PutRequest { key: "lock/7".into(), lease: 7, ..Default::default() }), POS);
    let token = granted.revision;
    put(&mut s, "counter", "0");

    // (fence, expected ok) against the live lock key.
    let cases = [(("lock/7", token), true), (("lock/7", token - 1), false), (("lock/8", token), false)];
    for ((key, rev), ok) in cases {
        let before = s.revision();
        let a = s.apply(&fenced(key, rev, put_cmd("counter", "x")), POS);
        assert_eq!(a.result.is_ok(), ok, "fence {key}@{rev}");
        assert_eq!(s.revision(), before + ok as i64, "a rejected write must not bump the revision");
    }

    // The lease expires: the lock key goes with it, and the holder's writes are refused.
    s.apply(&Command::LeaseExpire { ids: vec![7], term: POS.term }, POS);
    let before = (s.revision(), get(&s, "counter"));
    let a = s.apply(&fenced("lock/7", token, put_cmd("counter", "stale")), POS);
    assert_eq!(a.result, Err(KvError::FenceRejected { key: "lock/7".into(), revision: token }));
    assert_eq!((s.revision(), get(&s, "counter")), before);

    // Re-created under the same name: a new token; the old one stays dead.
    s.apply(&Command::LeaseGrant { id: 7, ttl_s: 10 }, POS);
    let again = s.apply(&Command::Put(PutRequest { key: "lock/7".into(), lease: 7, ..Default::default() }), POS);
    assert!(s.apply(&fenced("lock/7", token, put_cmd("counter", "stale")), POS).result.is_err());
    assert!(s.apply(&fenced("lock/7", again.revision, put_cmd("counter", "fresh")), POS).result.is_ok());

    // Fences guard only KV writes.
    let a = s.apply(&fenced("lock/7", again.revision, Command::LeaseRevoke { id: 7 }), POS);
    assert_eq!(a.result, Err(KvError::FenceNotAllowed));
    assert!(s.lease(7).is_some());
}

#[test]
fn fence_header_parses_key_and_token() {
    assert_eq!(Fence::parse("locks/a/1f@42"), Some(Fence { key: b"locks/a/1f".to_vec(), revision: 42 }));
    assert_eq!(Fence::parse("a@b@7"), Some(Fence { key: b"a@b".to_vec(), revision: 7 }));
    for bad in ["", "a", "@5", "a@", "a@0", "a@-3", "a@x"] {
        assert_eq!(Fence::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn term_fenced_commands_apply_only_in_their_own_term() {
    let mut s = Store::new();
    put(&mut s, "registry/a", "up");
    let evict = |term| Command::TermFenced {
        term,
        cmd: Box::new(Command::DeleteRange(DeleteRangeRequest { key: "registry/a".into(), ..Default::default() })),
    };
    let in_term_3 = LogPosition { index: 9, term: 3 };
    let stale = s.apply(&evict(2), in_term_3);
    assert_eq!(stale.result, Ok(CommandResponse::StaleTerm));
    assert!(get(&s, "registry/a").is_some(), "a deposed leader's eviction changes nothing");
    let current = s.apply(&evict(3), in_term_3);
    assert!(matches!(current.result, Ok(CommandResponse::DeleteRange(_))));
    assert!(get(&s, "registry/a").is_none());
}

mod authorized {
    use super::*;
    use crate::auth::{AuthCommand as A, AuthError, PermType, Permission};

    fn as_user(user: &str, cmd: Command) -> Command {
        Command::Authorized { user: Some(user.into()), cmd: Box::new(cmd) }
    }

    fn auth(s: &mut Store, cmd: A) {
        s.apply(&Command::Auth(cmd.clone()), POS).result.unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    }

    /// root, and alice with readwrite on the prefix `app/`; auth on.
    fn store() -> Store {
        let mut s = Store::new();
        auth(&mut s, A::UserAdd { name: "root".into(), password_hash: Some("h".into()) });
        auth(&mut s, A::UserGrantRole { user: "root".into(), role: "root".into() });
        auth(&mut s, A::UserAdd { name: "alice".into(), password_hash: Some("h".into()) });
        auth(&mut s, A::RoleAdd { name: "app".into() });
        let perm = Permission { perm: PermType::ReadWrite, key: b"app/".to_vec(), range_end: b"app0".to_vec() };
        auth(&mut s, A::RoleGrantPermission { role: "app".into(), perm });
        auth(&mut s, A::UserGrantRole { user: "alice".into(), role: "app".into() });
        auth(&mut s, A::Enable { token_key: b"k".to_vec() });
        s
    }

    fn refused(s: &mut Store, cmd: Command) -> KvError {
        let rev = s.revision();
        let a = s.apply(&cmd, POS);
        assert_eq!(a.revision, rev, "a refused command moved the revision");
        assert!(a.events.is_empty());
        a.result.expect_err("refused")
    }

    #[test]
    fn writes_apply_only_under_a_permission_held_when_they_are_applied() {
        let mut s = store();
        assert!(s.apply(&as_user("alice", put_cmd("app/x", "1")), POS).result.is_ok());
        assert_eq!(
            refused(&mut s, as_user("alice", put_cmd("other", "1"))),
            KvError::Auth(AuthError::PermissionDenied)
        );
        assert_eq!(
            refused(&mut s, Command::Authorized { user: None, cmd: Box::new(put_cmd("app/x", "2")) }),
            KvError::Auth(AuthError::UserEmpty)
        );
        assert!(s.apply(&as_user("root", put_cmd("other", "1")), POS).result.is_ok(), "root writes anywhere");
        // A revocation that lands before the write in the log wins, whatever the door saw.
        auth(
            &mut s,
            A::RoleRevokePermission { role: "app".into(), key: b"app/".to_vec(), range_end: b"app0".to_vec() },
        );
        assert_eq!(
            refused(&mut s, as_user("alice", put_cmd("app/x", "3"))),
            KvError::Auth(AuthError::PermissionDenied)
        );
        assert_eq!(get(&s, "app/x").unwrap().value, b"1");
        // The member's own commands (evictions, lease decisions) are not a client's: unwrapped.
        assert!(s.apply(&put_cmd("internal", "1"), POS).result.is_ok());
        // Auth changes and compaction are root's.
        let grant = Command::Auth(A::RoleAdd { name: "x".into() });
        assert_eq!(refused(&mut s, as_user("alice", grant.clone())), KvError::Auth(AuthError::PermissionDenied));
        assert!(s.apply(&as_user("root", grant), POS).result.is_ok());
        assert_eq!(
            refused(&mut s, as_user("alice", Command::Alarm { activate: true, member: 1, alarm: AlarmType::NoSpace })),
            KvError::Auth(AuthError::PermissionDenied)
        );
    }

    #[test]
    fn a_txn_needs_every_branch_permitted_whichever_runs() {
        let mut s = store();
        let txn = |failure_key: &str| {
            Command::Txn(TxnRequest {
                compare: vec![Compare {
                    result: CompareResult::Equal,
                    target: CompareTarget::Version(0),
                    key: b"app/c".to_vec(),
                    range_end: vec![],
                }],
                success: vec![RequestOp::Put(PutRequest {
                    key: b"app/ok".to_vec(),
                    value: b"1".to_vec(),
                    ..Default::default()
                })],
                failure: vec![RequestOp::Txn(TxnRequest {
                    compare: vec![],
                    success: vec![RequestOp::DeleteRange(DeleteRangeRequest {
                        key: failure_key.into(),
                        ..Default::default()
                    })],
                    failure: vec![],
                })],
            })
        };
        // The success branch would run (app/c does not exist), yet the nested delete outside
        // the prefix in the failure branch refuses the whole Txn.
        assert_eq!(refused(&mut s, as_user("alice", txn("secret"))), KvError::Auth(AuthError::PermissionDenied));
        assert!(s.apply(&as_user("alice", txn("app/gone")), POS).result.is_ok());
        // A compare reads: comparing a key outside the prefix is refused too.
        let peek = Command::Txn(TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal,
                target: CompareTarget::Value(b"guess".to_vec()),
                key: b"secret".to_vec(),
                range_end: vec![],
            }],
            success: vec![RequestOp::Put(PutRequest { key: b"app/y".to_vec(), ..Default::default() })],
            failure: vec![],
        });
        assert_eq!(refused(&mut s, as_user("alice", peek)), KvError::Auth(AuthError::PermissionDenied));
    }

    #[test]
    fn revoking_a_lease_needs_write_on_its_keys_and_auth_survives_a_snapshot_scan() {
        let mut s = store();
        s.apply(&as_user("root", Command::LeaseGrant { id: 7, ttl_s: 60 }), POS).result.unwrap();
        let p = PutRequest { key: b"other".to_vec(), value: b"v".to_vec(), lease: 7, ..Default::default() };
        s.apply(&as_user("root", Command::Put(p)), POS).result.unwrap();
        assert_eq!(
            refused(&mut s, as_user("alice", Command::LeaseRevoke { id: 7 })),
            KvError::Auth(AuthError::PermissionDenied)
        );
        assert!(s.apply(&as_user("alice", Command::LeaseGrant { id: 8, ttl_s: 60 }), POS).result.is_ok());
        assert_eq!(
            refused(&mut s, as_user("mallory", Command::LeaseGrant { id: 9, ttl_s: 60 })),
            KvError::Auth(AuthError::PermissionDenied)
        );
        let mut scan = SnapshotScan::new(&s);
        while s.snapshot_step(&mut scan, 10).is_ok() && !scan.is_done() {}
        assert_eq!(scan.finish().auth(), s.auth());
    }
}
