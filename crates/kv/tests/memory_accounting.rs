//! `bytes_in_use` is what `--quota-backend-bytes` is compared with (and what etcdctl shows as
//! the DB size), so it must count what the store really holds: here the store's live heap,
//! counted by the allocator of this test binary, across value sizes, new keys and overwrites,
//! deletes and a compaction. Counted, never timed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use quorate_kv::*;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const POS: LogPosition = LogPosition { index: 1, term: 1 };

fn put(s: &mut Store, key: Vec<u8>, value: Vec<u8>) {
    let applied = s.apply(&Command::Put(PutRequest { key, value, ..Default::default() }), POS);
    assert!(applied.result.is_ok());
}

/// Live heap of `s` built by `fill`, against its `bytes_in_use`.
fn measure(fill: impl FnOnce(&mut Store)) -> (u64, u64) {
    let before = LIVE.load(Ordering::Relaxed);
    let mut s = Store::new();
    fill(&mut s);
    let live = (LIVE.load(Ordering::Relaxed) - before) as u64;
    let counted = s.bytes_in_use();
    drop(s);
    (live, counted)
}

/// Lease `n`, under an id spread as the state machine's are (a hash of the log position).
fn grant(s: &mut Store, n: u64) -> i64 {
    let id = (n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 1) as i64;
    assert!(s.apply(&Command::LeaseGrant { id, ttl_s: 60 }, POS).result.is_ok());
    id
}

type Fill = Box<dyn FnOnce(&mut Store)>;

fn key(i: u64) -> Vec<u8> {
    format!("bench/{i:010}").into_bytes()
}

#[test]
fn the_quota_counts_what_the_store_holds() {
    let mut cases: Vec<(&str, Fill)> = vec![
        ("20k new keys, 256-byte values", Box::new(|s| (0..20_000).for_each(|i| put(s, key(i), vec![7; 256])))),
        ("5k new keys, 4 KiB values", Box::new(|s| (0..5_000).for_each(|i| put(s, key(i), vec![7; 4096])))),
        ("20k new keys, 8-byte values", Box::new(|s| (0..20_000).for_each(|i| put(s, key(i), vec![7; 8])))),
        (
            "1k keys overwritten 20 times, 64-byte values",
            Box::new(|s| (0..20_000).for_each(|i| put(s, key(i % 1_000), vec![7; 64]))),
        ),
        (
            "20k keys, half deleted, then compacted",
            Box::new(|s| {
                (0..20_000).for_each(|i| put(s, key(i), vec![7; 100]));
                for i in (0..20_000).step_by(2) {
                    s.apply(&Command::DeleteRange(DeleteRangeRequest { key: key(i), ..Default::default() }), POS);
                }
                let rev = s.revision();
                s.apply(&Command::Compact { revision: rev, physical: true }, POS);
            }),
        ),
    ];
    cases.push(("20k leases", Box::new(|s| (1..=20_000).for_each(|n| _ = grant(s, n)))));
    cases.push((
        "2k leases of 8 keys, 256-byte values, half of them revoked",
        Box::new(|s| {
            let ids: Vec<i64> = (1..=2_000).map(|n| grant(s, n)).collect();
            for i in 0..16_000u64 {
                let lease = ids[(i % 2_000) as usize];
                let applied = s.apply(
                    &Command::Put(PutRequest { key: key(i), value: vec![7; 256], lease, ..Default::default() }),
                    POS,
                );
                assert!(applied.result.is_ok());
            }
            for &id in ids.iter().step_by(2) {
                s.apply(&Command::LeaseRevoke { id }, POS);
            }
        }),
    ));
    cases.push((
        "5k keys of 4 versions, restored from a snapshot",
        Box::new(move |s| {
            let mut original = Store::new();
            (0..20_000).for_each(|i| put(&mut original, key(i % 5_000), vec![7; 100]));
            let snapshot = original.to_snapshot();
            drop(original);
            *s = Store::from_snapshot(snapshot);
        }),
    ));
    for (case, fill) in cases {
        let (live, counted) = measure(fill);
        let ratio = live as f64 / counted as f64;
        println!("{case}: live heap {live} bytes, counted {counted} ({ratio:.2})");
        assert!(
            (0.75..=1.1).contains(&ratio),
            "{case}: the store holds {live} bytes and counts {counted} (live / counted = {ratio:.2})"
        );
    }
}
