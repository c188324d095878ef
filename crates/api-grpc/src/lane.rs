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

/// Run `f` on a new lowest-priority thread and wait for it (blocks the caller).
pub fn low_priority<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| {
        let lane = std::thread::Builder::new().name("quorate-slow-lane".into());
        let t = lane
            .spawn_scoped(s, || {
                lower_this_thread();
                f()
            })
            .expect("a thread for a long read");
        t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// `low_priority` from async code: the runtime's thread is not blocked meanwhile.
pub async fn off_runtime<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    match tokio::task::spawn_blocking(move || low_priority(f)).await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(target_os = "linux")]
fn lower_this_thread() {
    // SAFETY: plain syscalls on this thread's own id; failure leaves the priority as it was.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_this_thread() {}

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
}
