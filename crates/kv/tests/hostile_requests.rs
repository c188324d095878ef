//! Property test: no request makes a member do more work than its size allows.
//!
//! Generates adversarial Txns (deep nesting, both branches nested, wide lists, many compares
//! over ranges, huge keys and values, ranges over the whole keyspace) and asserts that the
//! steps counted by the admission check and by apply stay within a fixed multiple of the
//! request's nodes (n log n) plus, for apply, the keys its compares, ranges and deletes may
//! visit. Steps are counted, never timed.
//!
//! A failing case prints its seed; replay it with
//! `QUORATE_HOSTILE_SEED=<seed> cargo test -p quorate-kv --test hostile_requests`.

use quorate_kv::*;

/// Cases per run (each on a fresh copy of a store with up to `STORE_KEYS_MAX` keys).
const CASES: u64 = 400;
const STORE_KEYS_MAX: u64 = 400;
/// Leaves and compares generated per request (Txn nodes come on top).
const NODES_MAX: usize = 3_000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Clone, Copy, Debug)]
enum Shape {
    /// One path nested up to `TXN_DEPTH_MAX` deep.
    Deep,
    /// Both branches nested at every level, until the node budget runs out.
    Bushy,
    /// Up to 128 ops per list and 128 compares.
    Wide,
    /// Many compares and ranges over large parts of the keyspace.
    Ranges,
    /// Keys and values of up to hundreds of KiB.
    Huge,
}

struct Gen {
    rng: Rng,
    shape: Shape,
    nodes_left: usize,
    unique: u64,
}

impl Gen {
    /// A key: often one of a few shared ones (so writes collide), else fresh, sometimes huge.
    fn key(&mut self) -> Vec<u8> {
        if matches!(self.shape, Shape::Huge) && self.rng.chance(20) {
            let len = 1 + self.rng.below(128 * 1024) as usize;
            let mut k = vec![b'h'; len];
            k.push(b'0' + self.rng.below(4) as u8);
            return k;
        }
        if self.rng.chance(25) {
            format!("s{}", self.rng.below(6)).into_bytes()
        } else {
            self.unique += 1;
            format!("k{:05}", self.rng.below(STORE_KEYS_MAX + 50) * 1000 + self.unique % 1000).into_bytes()
        }
    }

    /// A range end for `key`: none, a prefix end, "every key from here", or the whole space.
    fn range_end(&mut self, key: &[u8]) -> Vec<u8> {
        let wide = matches!(self.shape, Shape::Ranges);
        match self.rng.below(if wide { 3 } else { 6 }) {
            0 => vec![0],
            1 => prefix_end(&key[..1]),
            2 => prefix_end(key),
            _ => vec![],
        }
    }

    fn value(&mut self) -> Vec<u8> {
        if matches!(self.shape, Shape::Huge) && self.rng.chance(30) {
            vec![b'v'; self.rng.below(512 * 1024) as usize]
        } else {
            b"v".to_vec()
        }
    }

    fn compare(&mut self) -> Compare {
        let key = self.key();
        let range_end = if self.rng.chance(50) { self.range_end(&key) } else { vec![] };
        let target = match self.rng.below(5) {
            0 => CompareTarget::Version(self.rng.below(3) as i64),
            1 => CompareTarget::Create(self.rng.below(5) as i64),
            2 => CompareTarget::Mod(self.rng.below(5) as i64),
            3 => CompareTarget::Value(b"v".to_vec()),
            _ => CompareTarget::Lease(0),
        };
        let result = [CompareResult::Equal, CompareResult::NotEqual, CompareResult::Greater, CompareResult::Less]
            [self.rng.below(4) as usize];
        Compare { result, target, key, range_end }
    }

    fn leaf(&mut self) -> RequestOp {
        let key = self.key();
        let range_heavy = matches!(self.shape, Shape::Ranges);
        match self.rng.below(if range_heavy { 2 } else { 4 }) {
            0 => {
                let range_end = self.range_end(&key);
                RequestOp::Range(RangeRequest {
                    key,
                    range_end,
                    limit: self.rng.below(3) as i64,
                    sort_order: [SortOrder::None, SortOrder::Descend][self.rng.below(2) as usize],
                    sort_target: [SortTarget::Key, SortTarget::Value][self.rng.below(2) as usize],
                    count_only: self.rng.chance(30),
                    ..Default::default()
                })
            }
            1 if !range_heavy => {
                let range_end = self.range_end(&key);
                RequestOp::DeleteRange(DeleteRangeRequest { key, range_end, prev_kv: self.rng.chance(50) })
            }
            1 => RequestOp::Range(RangeRequest { key, range_end: vec![0], ..Default::default() }),
            _ => RequestOp::Put(PutRequest {
                key,
                value: self.value(),
                lease: if self.rng.chance(5) { 1 + self.rng.below(2) as i64 } else { 0 },
                prev_kv: self.rng.chance(30),
                ..Default::default()
            }),
        }
    }

    fn list(&mut self, depth: usize, width: u64, nest: u64) -> Vec<RequestOp> {
        let n = self.rng.below(width + 1);
        let mut ops = Vec::new();
        for _ in 0..n {
            if self.nodes_left == 0 {
                break;
            }
            self.nodes_left -= 1;
            ops.push(self.leaf());
        }
        if depth < TXN_DEPTH_MAX && self.nodes_left > 0 && self.rng.chance(nest) {
            let at = self.rng.below(ops.len() as u64 + 1) as usize;
            ops.insert(at, RequestOp::Txn(self.txn(depth + 1)));
        }
        ops
    }

    fn txn(&mut self, depth: usize) -> TxnRequest {
        let (width, compares, nest) = match self.shape {
            Shape::Deep => (2, 2, 97),
            Shape::Bushy => (2, 1, 100),
            Shape::Wide => (128, 128, 10),
            Shape::Ranges => (64, 128, 20),
            Shape::Huge => (4, 2, 30),
        };
        let n = self.rng.below(compares + 1).min(self.nodes_left as u64);
        self.nodes_left -= n as usize;
        let compare = (0..n).map(|_| self.compare()).collect();
        let success = self.list(depth, width, nest);
        // A deep chain nests in one branch; a bushy tree in both.
        let failure_nest = if matches!(self.shape, Shape::Bushy) { nest } else { nest / 10 };
        let failure = self.list(depth, width, failure_nest);
        TxnRequest { compare, success, failure }
    }
}

/// What a request is made of: `nodes` (Txns, compares, ops), `ranged` (compares, ranges and
/// deletes: what may visit keys) and `puts`.
#[derive(Default, Debug)]
struct Size {
    nodes: u64,
    ranged: u64,
    puts: u64,
}

fn measure(t: &TxnRequest, s: &mut Size) {
    s.nodes += 1 + t.compare.len() as u64;
    s.ranged += t.compare.len() as u64;
    for op in t.success.iter().chain(&t.failure) {
        s.nodes += 1;
        match op {
            RequestOp::Range(_) | RequestOp::DeleteRange(_) => s.ranged += 1,
            RequestOp::Put(_) => s.puts += 1,
            RequestOp::Txn(inner) => measure(inner, s),
        }
    }
}

fn depth(t: &TxnRequest) -> usize {
    let nested = t.success.iter().chain(&t.failure).filter_map(|op| match op {
        RequestOp::Txn(inner) => Some(depth(inner)),
        _ => None,
    });
    1 + nested.max().unwrap_or(0)
}

fn log2(n: u64) -> u64 {
    n.max(1).ilog2() as u64 + 1
}

/// A store with `keys` keys, some under leases 1 and 2, and some history.
fn store_with(keys: u64) -> Store {
    let mut s = Store::new();
    let pos = LogPosition { index: 1, term: 1 };
    for id in [1, 2] {
        s.apply(&Command::LeaseGrant { id, ttl_s: 60 }, pos);
    }
    for i in 0..keys {
        let key = format!("k{:05}", i * 1000).into_bytes();
        let lease = [0, 0, 1, 2][(i % 4) as usize];
        s.apply(&Command::Put(PutRequest { key, value: b"v".to_vec(), lease, ..Default::default() }), pos);
    }
    for i in 0..6 {
        let key = format!("s{i}").into_bytes();
        s.apply(&Command::Put(PutRequest { key, value: b"v".to_vec(), ..Default::default() }), pos);
    }
    s
}

#[test]
fn no_request_costs_more_than_its_size() {
    let base_seed: u64 = std::env::var("QUORATE_HOSTILE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let shapes = [Shape::Deep, Shape::Bushy, Shape::Wide, Shape::Ranges, Shape::Huge];
    let stores: Vec<Store> = [0, 40, STORE_KEYS_MAX].iter().map(|&k| store_with(k)).collect();
    let (mut refused, mut applied) = (0, 0);
    let (mut nodes_max, mut depth_cases, mut steps_max) = (0, 0, 0);
    let generate = |seed: u64| {
        let mut rng = Rng(seed);
        let shape = shapes[rng.below(shapes.len() as u64) as usize];
        let store = rng.below(stores.len() as u64) as usize;
        let mut gen = Gen { rng, shape, nodes_left: NODES_MAX, unique: 0 };
        (shape, store, gen.txn(0))
    };
    // Shallow cases first: a bug that doubles the work per level then fails at a small depth
    // instead of hanging on a deep one.
    let mut seeds: Vec<(usize, u64)> =
        (0..CASES).map(|case| base_seed.wrapping_add(case)).map(|seed| (depth(&generate(seed).2), seed)).collect();
    seeds.sort();
    for (_, seed) in seeds {
        let (shape, store, t) = generate(seed);
        let store = &stores[store];
        let mut size = Size::default();
        measure(&t, &mut size);
        let n = size.nodes;
        let ctx = format!("seed {seed} ({shape:?}, {size:?}); replay with QUORATE_HOSTILE_SEED={seed}");

        // Admission, with etcd's default limit and with none.
        for max_ops in [TXN_OPS_MAX, usize::MAX] {
            let mut steps = 0;
            let _ = check_txn_request(&t, max_ops, &mut steps);
            assert!(steps <= 4 * n * log2(n), "admission took {steps} steps for {n} nodes: {ctx}");
        }
        let writes_ok = check_txn_writes(&t, &mut 0);

        // Apply (what a member does with an entry already in its log, admitted or not).
        let mut s = store.clone();
        let before = (s.revision(), s.hash_kv(0).unwrap());
        let keys = s.key_count() as u64 + size.puts;
        depth_cases += u64::from(depth(&t) >= 30);
        let a = s.apply(&Command::Txn(t), LogPosition { index: 2, term: 1 });
        nodes_max = nodes_max.max(n);
        steps_max = steps_max.max(a.work_steps);
        let bound = 8 * n * log2(n) + 2 * size.ranged * (keys + 1);
        assert!(a.work_steps <= bound, "apply took {} steps, bound {bound}: {ctx}", a.work_steps);
        match &a.result {
            Ok(_) => applied += 1,
            Err(e) => {
                refused += 1;
                assert_eq!((s.revision(), s.hash_kv(0).unwrap()), before, "refused ({e}) but changed: {ctx}");
                if writes_ok.is_ok() {
                    assert!(
                        !matches!(e, KvError::DuplicateKey | KvError::TooManyOps { .. }),
                        "apply refused ({e}) what the write-set check accepted: {ctx}"
                    );
                }
            }
        }
        assert_eq!(writes_ok.is_err(), matches!(a.result, Err(KvError::DuplicateKey | KvError::TooManyOps { .. })));
    }
    eprintln!(
        "{CASES} cases: {applied} applied, {refused} refused, {depth_cases} nested 30+ deep, \
         largest {nodes_max} nodes, most apply steps {steps_max}"
    );
    // The generator must exercise both outcomes and deep nesting, or the bounds prove little.
    assert!(applied > CASES / 10 && refused > CASES / 10, "applied {applied}, refused {refused}");
    assert!(depth_cases > CASES / 20, "only {depth_cases} cases nested 30+ deep");
}

/// A Txn `depth` levels deep with one Put at the bottom: the request that froze a member.
fn chain(depth: usize) -> TxnRequest {
    let cmp = Compare {
        result: CompareResult::Equal,
        target: CompareTarget::Version(0),
        key: b"absent".to_vec(),
        range_end: vec![],
    };
    let put = PutRequest { key: b"bottom".to_vec(), value: b"v".to_vec(), ..Default::default() };
    let mut t = TxnRequest { compare: vec![cmp.clone()], success: vec![RequestOp::Put(put)], failure: vec![] };
    for _ in 0..depth {
        t = TxnRequest { compare: vec![cmp.clone()], success: vec![RequestOp::Txn(t)], failure: vec![] };
    }
    t
}

#[test]
fn a_txn_nested_40_deep_applies_in_a_few_hundred_steps() {
    let mut s = Store::new();
    // Shallow first: a walk that doubles per level fails at a small depth instead of hanging.
    for depth in 1..=40 {
        let a = s.apply(&Command::Txn(chain(depth)), LogPosition { index: depth as u64, term: 1 });
        assert!(a.result.is_ok(), "{:?}", a.result);
        assert!(a.work_steps <= 20 * (depth as u64 + 1), "{} steps for {depth} levels", a.work_steps);
    }
    let got = s.range(&RangeRequest { key: b"bottom".to_vec(), ..Default::default() }).unwrap();
    assert_eq!(got.kvs.len(), 1);
    // Deeper than any admitted request: refused at apply too, the same on every member.
    let a = s.apply(&Command::Txn(chain(TXN_DEPTH_MAX + 1)), LogPosition { index: 41, term: 1 });
    assert!(matches!(a.result, Err(KvError::TooManyOps { .. })), "{:?}", a.result);
    assert!(a.work_steps < 1_000, "{} steps", a.work_steps);
}

#[test]
fn nested_compares_see_the_state_before_the_txn_as_in_etcd() {
    // etcd chooses every branch before running any op (`compareToPath`): the nested compare
    // sees "x" absent although the outer Txn puts it first.
    let put = |k: &str| RequestOp::Put(PutRequest { key: k.into(), value: b"v".to_vec(), ..Default::default() });
    let x_absent = Compare {
        result: CompareResult::Equal,
        target: CompareTarget::Version(0),
        key: b"x".to_vec(),
        range_end: vec![],
    };
    let inner = TxnRequest { compare: vec![x_absent], success: vec![put("then")], failure: vec![put("else")] };
    let t = TxnRequest { compare: vec![], success: vec![put("x"), RequestOp::Txn(inner)], failure: vec![] };
    let mut s = Store::new();
    let a = s.apply(&Command::Txn(t), LogPosition { index: 1, term: 1 });
    match a.result {
        Ok(CommandResponse::Txn(r)) => match &r.responses[1] {
            ResponseOp::Txn(inner) => assert!(inner.succeeded),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    let has = |k: &str| !s.range(&RangeRequest { key: k.into(), ..Default::default() }).unwrap().kvs.is_empty();
    assert!(has("then") && !has("else"));
}
