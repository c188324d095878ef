use super::*;

fn put(k: &str) -> RequestOp {
    RequestOp::Put(PutRequest { key: k.into(), ..Default::default() })
}

fn del(k: &str, end: &str) -> RequestOp {
    RequestOp::DeleteRange(DeleteRangeRequest { key: k.into(), range_end: end.into(), prev_kv: false })
}

fn get(k: &str) -> RequestOp {
    RequestOp::Range(RangeRequest { key: k.into(), ..Default::default() })
}

fn nested(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
    RequestOp::Txn(TxnRequest { compare: vec![], success, failure })
}

fn cmp(k: &str) -> Compare {
    Compare { result: CompareResult::Equal, target: CompareTarget::Version(0), key: k.into(), range_end: vec![] }
}

fn writes(success: Vec<RequestOp>) -> Result<(), KvError> {
    check_txn_writes(&TxnRequest { compare: vec![], success, failure: vec![] }, &mut 0)
}

/// A Txn nested `depth` levels below the outer one, with one Put at the bottom.
fn chain(depth: usize) -> TxnRequest {
    let mut t = TxnRequest { compare: vec![cmp("c")], success: vec![put("bottom")], failure: vec![] };
    for _ in 0..depth {
        t = TxnRequest { compare: vec![cmp("c")], success: vec![RequestOp::Txn(t)], failure: vec![] };
    }
    t
}

#[test]
fn write_set_rule_table() {
    use KvError::DuplicateKey as Dup;
    let cases: Vec<(&str, Vec<RequestOp>, Result<(), KvError>)> = vec![
        ("two puts of one key", vec![put("a"), put("a")], Err(Dup)),
        ("a put inside a later delete", vec![put("b"), del("a", "c")], Err(Dup)),
        ("a delete over an earlier put", vec![del("a", "c"), put("b")], Err(Dup)),
        ("a put at a range's end is outside it", vec![del("a", "c"), put("c")], Ok(())),
        ("two deletes may overlap", vec![del("a", "c"), del("b", "d"), del("b", "")], Ok(())),
        ("from-key delete covers every later key", vec![del("a", "\0"), put("zzz")], Err(Dup)),
        ("an empty range deletes nothing", vec![del("c", "a"), put("b")], Ok(())),
        ("merged deletes cover the gap", vec![del("a", "c"), del("b", "e"), put("d")], Err(Dup)),
        ("a single-key delete covers only its key", vec![del("a", ""), put("a\0"), put("ab")], Ok(())),
        ("the two branches of a nested Txn never both run", vec![nested(vec![put("a")], vec![put("a")])], Ok(())),
        ("a put and a delete in opposite branches", vec![nested(vec![put("a")], vec![del("a", "b")])], Ok(())),
        ("a branch conflicts with a sibling put", vec![nested(vec![], vec![put("a")]), put("a")], Err(Dup)),
        (
            "a put in an earlier nested Txn against a delete in a later one (etcd misses this)",
            vec![nested(vec![put("x")], vec![]), nested(vec![], vec![del("a", "z")])],
            Err(Dup),
        ),
        (
            "deep inside one branch, shallow in the other",
            vec![nested(vec![nested(vec![nested(vec![put("k")], vec![])], vec![])], vec![put("k")]), get("k")],
            Ok(()),
        ),
        (
            "deep conflict inside one branch",
            vec![nested(vec![put("k"), nested(vec![nested(vec![put("k")], vec![])], vec![])], vec![])],
            Err(Dup),
        ),
    ];
    for (name, ops, want) in cases {
        assert_eq!(writes(ops), want, "{name}");
    }
}

#[test]
fn success_and_failure_lists_are_checked_apart() {
    let t = TxnRequest { compare: vec![], success: vec![put("a")], failure: vec![put("a"), del("a", "")] };
    assert_eq!(check_txn_writes(&t, &mut 0), Err(KvError::DuplicateKey));
    let t = TxnRequest { compare: vec![], success: vec![put("a")], failure: vec![del("a", "")] };
    assert_eq!(check_txn_writes(&t, &mut 0), Ok(()));
}

#[test]
fn admission_spends_etcds_op_budget_through_nested_txns() {
    let wide = |n: usize, from: usize| (from..from + n).map(|i| put(&format!("k{i}"))).collect::<Vec<_>>();
    let ok = TxnRequest { compare: vec![], success: wide(128, 0), failure: vec![] };
    assert_eq!(check_txn_request(&ok, 128, &mut 0), Ok(()));
    let compares = TxnRequest { compare: (0..129).map(|i| cmp(&format!("c{i}"))).collect(), ..Default::default() };
    assert_eq!(check_txn_request(&compares, 128, &mut 0), Err(KvError::TooManyOps { ops: 129, max: 128 }));
    // The outer Txn's largest list is 100 ops; a nested Txn has 28 left.
    let mut outer = wide(99, 0);
    outer.push(RequestOp::Txn(TxnRequest { success: wide(28, 1000), ..Default::default() }));
    let t = TxnRequest { success: outer.clone(), ..Default::default() };
    assert_eq!(check_txn_request(&t, 128, &mut 0), Ok(()));
    outer[99] = RequestOp::Txn(TxnRequest { success: wide(29, 1000), ..Default::default() });
    let t = TxnRequest { success: outer, ..Default::default() };
    assert_eq!(check_txn_request(&t, 128, &mut 0), Err(KvError::TooManyOps { ops: 29, max: 28 }));
    // A smaller configured limit applies at the top as well.
    let t = TxnRequest { success: wide(9, 0), ..Default::default() };
    assert_eq!(check_txn_request(&t, 8, &mut 0), Err(KvError::TooManyOps { ops: 9, max: 8 }));
}

#[test]
fn admission_refuses_what_etcd_refuses_anywhere_in_the_tree() {
    let deep = |op: RequestOp| TxnRequest { success: vec![nested(vec![get("a")], vec![op])], ..Default::default() };
    assert_eq!(check_txn_request(&deep(put("")), 128, &mut 0), Err(KvError::EmptyKey));
    assert_eq!(check_txn_request(&deep(del("", "")), 128, &mut 0), Err(KvError::EmptyKey));
    assert_eq!(check_txn_request(&deep(get("")), 128, &mut 0), Err(KvError::EmptyKey));
    let with_value =
        RequestOp::Put(PutRequest { key: "a".into(), value: "v".into(), ignore_value: true, ..Default::default() });
    assert_eq!(check_txn_request(&deep(with_value), 128, &mut 0), Err(KvError::ValueProvided));
    let with_lease = RequestOp::Put(PutRequest { key: "a".into(), lease: 5, ignore_lease: true, ..Default::default() });
    assert_eq!(check_txn_request(&deep(with_lease), 128, &mut 0), Err(KvError::LeaseProvided));
    let empty_compare = TxnRequest { compare: vec![cmp("")], ..Default::default() };
    assert_eq!(check_txn_request(&empty_compare, 128, &mut 0), Err(KvError::EmptyKey));
}

#[test]
fn nesting_is_bounded_by_a_constant_depth() {
    assert_eq!(check_txn_request(&chain(TXN_DEPTH_MAX), 128, &mut 0), Ok(()));
    let too_deep = Err(KvError::TooManyOps { ops: TXN_DEPTH_MAX + 1, max: TXN_DEPTH_MAX });
    assert_eq!(check_txn_request(&chain(TXN_DEPTH_MAX + 1), 128, &mut 0), too_deep);
    assert_eq!(check_txn_writes(&chain(TXN_DEPTH_MAX), &mut 0), Ok(()));
    assert_eq!(check_txn_writes(&chain(TXN_DEPTH_MAX + 1), &mut 0), too_deep);
}

#[test]
fn a_txn_nested_40_deep_is_checked_in_a_few_hundred_steps() {
    // The request that froze a member: each level used to double the work. Shallow first, so
    // a walk that doubles per level fails here instead of hanging.
    for depth in 1..=40 {
        let mut steps = 0;
        assert_eq!(check_txn_request(&chain(depth), 128, &mut steps), Ok(()));
        assert!(steps <= 10 * (depth as u64 + 1), "{steps} steps for {depth} levels");
    }
    // Both branches nested at every level, under a node budget: every node is visited, and
    // the steps stay within a small multiple of n log n.
    fn both(depth: usize, nodes: &mut usize) -> TxnRequest {
        *nodes += 1;
        let key = format!("k{nodes}");
        let mut t = TxnRequest { compare: vec![cmp("c")], success: vec![put(&key)], failure: vec![put(&key)] };
        for list in [&mut t.success, &mut t.failure] {
            if depth > 0 && *nodes < 4_000 {
                list.push(RequestOp::Txn(both(depth - 1, nodes)));
            }
        }
        t
    }
    let mut nodes = 0;
    let t = both(TXN_DEPTH_MAX, &mut nodes);
    let mut steps = 0;
    // Each level spends two ops of etcd's budget: a large limit lets the whole tree in.
    assert!(matches!(check_txn_request(&t, 128, &mut 0), Err(KvError::TooManyOps { max: 0, .. })));
    assert_eq!(check_txn_request(&t, 1 << 20, &mut steps), Ok(()));
    let n = nodes as u64 * 4;
    assert!(steps <= 4 * n * (n.ilog2() as u64 + 1), "{steps} steps for {n} nodes");
    // The same tree with every level's put on one key: refused, without walking it all.
    let mut conflicting = both(TXN_DEPTH_MAX, &mut 0);
    let top_put = conflicting.success[0].clone();
    if let RequestOp::Txn(inner) = &mut conflicting.success[1] {
        inner.success[0] = top_put;
    }
    let mut steps = 0;
    assert_eq!(check_txn_request(&conflicting, 1 << 20, &mut steps), Err(KvError::DuplicateKey));
}
