//! The slow lane: the heavy half of a long read runs on a thread the OS schedules behind
//! everything else in the process (nice 19), so that when the CPUs are short, the Raft core,
//! apply, heartbeats and other clients' requests get them first, and the long read waits.
//!
//! Only work done without the store's lock goes here: copying and sorting what a scan
//! collected, converting it, hashing it, encoding it. The scan's pages themselves are taken at
//! normal priority: a low-priority thread preempted while holding the lock would make apply
//! wait for it (priority inversion).
//!
//! Each call runs on a thread of its own: a long read is rare and long, and a thread is
//! created in tens of microseconds. The nice value is per thread on Linux, so lowering it there
//! touches nothing else; elsewhere the call simply runs at normal priority.
//!
//! At most `LANE_JOBS_MAX` jobs run at once (the others wait, asynchronously): however many
//! long reads clients start, the lane never fills tokio's blocking pool, which the codec's
//! `block_in_place` needs to hand a worker's queue to (an exhausted pool would strand it).

use std::sync::LazyLock;

use tokio::sync::Semaphore;

/// Slow-lane jobs (`off_runtime`) running at once, per process.
fn lane_jobs_max() -> usize {
    2 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

static LANE: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(lane_jobs_max()));

/// Run `f` on a new lowest-priority thread and wait for it (blocks the caller). If no thread
/// can be created (a process limit), `f` runs here, at the caller's priority.
pub fn low_priority<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let f = std::sync::Mutex::new(Some(f));
    let spawned = std::thread::scope(|s| {
        let lane = std::thread::Builder::new().name("quorate-slow-lane".into());
        let t = lane.spawn_scoped(s, || {
            lower_this_thread();
            let f = f.lock().unwrap_or_else(|e| e.into_inner()).take().expect("taken once");
            f()
        });
        t.ok().map(|t| t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    });
    match spawned {
        Some(r) => r,
        None => {
            let f = f.into_inner().unwrap_or_else(|e| e.into_inner()).expect("not taken: no thread ran");
            f()
        }
    }
}

/// `low_priority` from async code: the runtime's thread is not blocked meanwhile. Waits for
/// a place in the lane first.
pub async fn off_runtime<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    let _place = LANE.acquire().await.expect("the lane's semaphore is never closed");
    match tokio::task::spawn_blocking(move || low_priority(f)).await {
        Ok(r) => r,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Only when the runtime shuts down: nothing is waiting for the answer any more.
            Err(e) => panic!("a slow-lane job was cancelled: {e}"),
        },
    }
}

/// Nice 19 for the calling thread only (Linux keeps the nice value per thread; elsewhere a
/// no-op).
#[cfg(target_os = "linux")]
pub fn lower_this_thread() {
    // SAFETY: plain syscalls on this thread's own id; failure leaves the priority as it was.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

#[cfg(not(target_os = "linux"))]
pub fn lower_this_thread() {}

/// This thread's nice value (Linux), for tests.
#[cfg(all(test, target_os = "linux"))]
pub fn this_thread_nice() -> i32 {
    // SAFETY: as above; getpriority returns the nice value (-1 is a valid value, errno unused).
    unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_work_runs_at_nice_19_and_the_caller_keeps_its_priority() {
        let before = this_thread_nice();
        assert_eq!(low_priority(this_thread_nice), 19);
        assert_eq!(this_thread_nice(), before, "the caller's own priority is untouched");
    }

    #[test]
    fn a_panic_in_the_lane_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| low_priority(|| panic!("boom")));
        assert!(r.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn off_runtime_returns_the_result() {
        assert_eq!(off_runtime(|| (this_thread_nice(), 7)).await, (19, 7));
    }

    /// However many long reads are started, no more than the lane's places run at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_jobs_run_at_once_than_the_lane_has_places() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        use std::sync::Arc;
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let jobs: Vec<_> = (0..4 * lane_jobs_max())
            .map(|_| {
                let (running, most) = (running.clone(), most.clone());
                tokio::spawn(off_runtime(move || {
                    let now = running.fetch_add(1, SeqCst) + 1;
                    most.fetch_max(now, SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    running.fetch_sub(1, SeqCst);
                }))
            })
            .collect();
        for j in jobs {
            j.await.unwrap();
        }
        let most = most.load(SeqCst);
        assert!(most <= lane_jobs_max(), "{most} jobs at once, places: {}", lane_jobs_max());
        assert!(most > 1, "the lane runs jobs side by side");
    }
}
