//! DRILL ONLY: a failpoint that makes this member's state diverge from the others', so that
//! `quorate ctl doctor` can be shown a real `diverged` finding (different state hashes at one
//! revision). Armed with a key (the server accepts it only with `--drill-failpoints`), the
//! next put of exactly that key that this member applies stores another value; the log entry,
//! the revision and every other member are untouched, so only this member's HashKV differs.
//! It fires once and is then off again. In memory only: a restart forgets it.
//!
//! When it is off (always, unless a drill armed it) applying costs one relaxed atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use quorate_kv::Command;

/// What the diverging put appends to the value it was sent.
pub const DIVERGED_SUFFIX: &[u8] = b" (diverged by the drill failpoint)";

static ARMED: AtomicBool = AtomicBool::new(false);
static KEY: Mutex<Option<Vec<u8>>> = Mutex::new(None);

/// Arm the failpoint: the next applied put of `key` on this member stores another value.
pub fn arm_diverge_put(key: Vec<u8>) {
    tracing::warn!(key = %String::from_utf8_lossy(&key), "DRILL ONLY: failpoint armed: the next put of this key applies differently here");
    *KEY.lock().unwrap() = Some(key);
    ARMED.store(true, Ordering::Release);
}

/// The command to apply instead of `cmd`: `Some` only when the failpoint is armed and `cmd`
/// puts its key, which disarms it.
pub(crate) fn diverge_put(cmd: &Command) -> Option<Command> {
    if !ARMED.load(Ordering::Relaxed) {
        return None;
    }
    let Command::Put(p) = cmd.unwrapped() else { return None };
    let mut key = KEY.lock().unwrap();
    if key.as_deref() != Some(p.key.as_slice()) {
        return None;
    }
    *key = None;
    ARMED.store(false, Ordering::Release);
    let mut p = p.clone();
    p.value.extend_from_slice(DIVERGED_SUFFIX);
    tracing::warn!(key = %String::from_utf8_lossy(&p.key), "DRILL ONLY: failpoint fired: this put applied differently here");
    Some(Command::Put(p))
}

/// DRILL ONLY: while set, this member's leader loop does not act on isolation records (no
/// hand-over, no demotion), so that a test can kill a leader between an isolation's commit and
/// its demotion and see the next leader finish it. In memory only.
static HOLD_ISOLATION: AtomicBool = AtomicBool::new(false);

pub fn hold_isolation(hold: bool) {
    tracing::warn!(hold, "DRILL ONLY: failpoint: isolation reconciler held");
    HOLD_ISOLATION.store(hold, Ordering::Release);
}

pub(crate) fn isolation_held() -> bool {
    HOLD_ISOLATION.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quorate_kv::PutRequest;

    fn put(key: &str) -> Command {
        Command::Put(PutRequest { key: key.into(), value: b"v".to_vec(), ..Default::default() })
    }

    #[test]
    fn only_the_next_put_of_the_armed_key_diverges_and_only_once() {
        assert_eq!(diverge_put(&put("k")), None, "off until armed");
        arm_diverge_put(b"k".to_vec());
        assert_eq!(diverge_put(&put("other")), None, "another key");
        assert_eq!(diverge_put(&Command::LeaseRevoke { id: 1 }), None, "not a put");
        let Some(Command::Put(p)) = diverge_put(&put("k")) else { panic!("the armed key diverges") };
        assert_eq!(p.value, [b"v".as_slice(), DIVERGED_SUFFIX].concat());
        assert_eq!(diverge_put(&put("k")), None, "fired once, then off");
    }
}
