//! openraft makes a `base2histogram::Histogram` when a member starts. Upstream base2histogram
//! 0.2.3 then built the lookup tables of all sixteen widths, about 27 MB that every member held
//! for its whole life (more than half of its idle RSS); the patched copy in `third_party/`
//! builds only the width asked for. This fails if the workspace goes back to the upstream
//! crate without the fix. (Its own binary: the allocator counts every allocation in it.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_histogram_of_the_default_width_builds_only_its_own_tables() {
    let before = ALLOCATED.load(Ordering::Relaxed);
    let mut h = base2histogram::Histogram::<()>::new();
    h.record(1500);
    let allocated = ALLOCATED.load(Ordering::Relaxed) - before;
    assert!(allocated < 256 << 10, "one histogram of width 3 allocated {allocated} bytes");
    assert_eq!(h.total(), 1);
}
