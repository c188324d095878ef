//! The eviction brake the leader's reaper and prober share, and its replication (ADR 0005).
//!
//! One brake per term of leadership, restored on the term's first use from the state the
//! previous leaders replicated under `BRAKE_STATE_KEY`, so a leader change neither resets the
//! window nor restarts the maximum hold. The reaper checkpoints it: on every change of its
//! shape (window counts, engagements), and once a second while a zone is held so the held
//! time keeps counting across leaders. Idle, it writes nothing. Checkpoints are term-fenced:
//! a deposed leader's is a no-op.

use std::sync::Mutex;
use std::time::Duration;

use quorate_consensus::Member;
use quorate_kv::{Command, PutRequest, RangeRequest};
use quorate_registry::{Brake, BrakeConfig, BrakeState, BRAKE_STATE_KEY};
use tokio::time::Instant;
use tracing::warn;

/// How often a held zone's progress is replicated: what a leader change may lose of it.
const CHECKPOINT_HELD_INTERVAL: Duration = Duration::from_secs(1);

/// What a checkpoint's shape is compared on: everything but the ages.
type Shape = Vec<(String, usize, Option<(String, bool, bool)>, bool, bool)>;

fn shape(s: &BrakeState) -> Shape {
    s.zones
        .iter()
        .map(|(zone, z)| {
            let window: usize = z.window.iter().map(|(_, n)| *n as usize).sum();
            let engaged = z.engaged.as_ref().map(|e| (e.reason.clone(), e.takeover, e.by_checks));
            (zone.clone(), window, engaged, z.released_by_timeout, z.checks_released_by_timeout)
        })
        .collect()
}

struct Current {
    term: u64,
    brake: Brake,
    written: Option<(Shape, Instant)>,
}

pub struct SharedBrake {
    cfg: BrakeConfig,
    current: Mutex<Option<Current>>,
}

impl SharedBrake {
    pub fn new(cfg: BrakeConfig) -> Self {
        SharedBrake { cfg, current: Mutex::new(None) }
    }

    /// Make the brake the one of `term`, restored from the replicated state the first time.
    pub async fn take_over(&self, member: &Member, term: u64) -> Result<(), quorate_consensus::ConsensusError> {
        if self.current.lock().unwrap().as_ref().is_some_and(|c| c.term == term) {
            return Ok(());
        }
        // Everything the previous leaders committed is applied here before it is read.
        member.linearize().await?;
        let state = read_state(member);
        let mut current = self.current.lock().unwrap();
        if current.as_ref().is_none_or(|c| c.term != term) {
            let brake = Brake::restore(self.cfg.clone(), &state, Instant::now().into_std());
            let written = Some((shape(&state), Instant::now()));
            *current = Some(Current { term, brake, written });
        }
        Ok(())
    }

    /// Not leading: forget the brake (the next leader restores it from the replicated state).
    pub fn step_down(&self) {
        *self.current.lock().unwrap() = None;
    }

    /// Run `f` on the brake of `term`; `None` if this member has not taken over for `term`.
    pub fn with<R>(&self, term: u64, f: impl FnOnce(&mut Brake) -> R) -> Option<R> {
        let mut current = self.current.lock().unwrap();
        current.as_mut().filter(|c| c.term == term).map(|c| f(&mut c.brake))
    }

    /// Replicate the state if its shape changed, or a zone is held and the last checkpoint is
    /// older than `CHECKPOINT_HELD_INTERVAL`.
    pub async fn checkpoint(&self, member: &Member, term: u64) {
        let now = Instant::now();
        let due = {
            let current = self.current.lock().unwrap();
            let Some(c) = current.as_ref().filter(|c| c.term == term) else { return };
            let state = c.brake.export(now.into_std());
            let s = shape(&state);
            let held = !c.brake.engaged().is_empty();
            let changed = c.written.as_ref().is_none_or(|(w, _)| *w != s);
            let stale = c.written.as_ref().is_none_or(|(_, at)| now.duration_since(*at) >= CHECKPOINT_HELD_INTERVAL);
            (changed || (held && stale)).then_some((state, s))
        };
        let Some((state, s)) = due else { return };
        let put = PutRequest {
            key: BRAKE_STATE_KEY.as_bytes().to_vec(),
            value: serde_json::to_vec(&state).expect("brake state serializes"),
            ..Default::default()
        };
        let cmd = Command::TermFenced { term, cmd: Box::new(Command::Put(put)) };
        match member.write(cmd).await {
            Ok(_) => {
                if let Some(c) = self.current.lock().unwrap().as_mut().filter(|c| c.term == term) {
                    c.written = Some((s, now));
                }
            }
            Err(e) => warn!(error = %e, "eviction brake checkpoint failed"),
        }
    }
}

pub(crate) fn read_state(member: &Member) -> BrakeState {
    let req = RangeRequest { key: BRAKE_STATE_KEY.as_bytes().to_vec(), ..Default::default() };
    member
        .read(|s| {
            let kv = s.range(&req).ok()?.kvs.into_iter().next()?;
            serde_json::from_slice(&kv.value).ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use quorate_registry::{EngagedState, ZoneState};

    #[test]
    fn the_shape_ignores_ages_but_not_counts_or_engagements() {
        let zone = |window: Vec<(u64, u32)>, held_ms: Option<u64>| BrakeState {
            zones: [(
                "z".to_string(),
                ZoneState {
                    window,
                    engaged: held_ms.map(|held_ms| EngagedState { held_ms, reason: "r".into(), ..Default::default() }),
                    ..Default::default()
                },
            )]
            .into(),
        };
        assert_eq!(shape(&zone(vec![(10, 2)], Some(5))), shape(&zone(vec![(900, 1), (950, 1)], Some(700))));
        assert_ne!(shape(&zone(vec![(10, 2)], None)), shape(&zone(vec![(10, 3)], None)));
        assert_ne!(shape(&zone(vec![(10, 2)], None)), shape(&zone(vec![(10, 2)], Some(0))));
    }
}
