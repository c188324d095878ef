//! Registry instances by state, and brake-held instances by zone, kept up to date where the
//! state machine applies its writes (`quorate_consensus::ApplyObserver`), so that a scrape reads
//! a handful of numbers instead of decoding the registry. Each applied change to a record
//! subtracts what the record was and adds what it is; a snapshot install recounts.
//!
//! Brake releases are counted here too, from the replicated brake state (`BRAKE_STATE_KEY`): a
//! checkpoint in which a zone held before is held no more. Every member applies it, so every
//! member counts the release, whichever leader made it (and a leader change loses none).
//!
//! It also keeps which records changed lately (`changed_since`), so that the leader's view of
//! the registry (`crate::registry_view`) re-reads those records instead of decoding them all.
//!
//! Owns the counts only: it never reads the store outside the two observer calls, which run
//! under the store's write lock and touch only the records that changed.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use quorate_kv::{Event, EventKind, KeyValue, RangeRequest, Store};
use quorate_registry::{BrakeState, Health, BRAKE_STATE_KEY, REGISTRY_PREFIX};

/// The states `quorate_registry_instances{state}` exports, in this order.
pub const STATES: [&str; 4] = ["passing", "warning", "critical", "suspect"];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Instances by state, indexed as `STATES`.
    pub by_state: [i64; 4],
    /// Instances the eviction brake holds, by zone (zones with none are absent).
    pub held: BTreeMap<String, i64>,
    /// Times the brake let go of a zone it held, by zone, since this member started.
    pub brake_releases: BTreeMap<String, u64>,
}

/// Registry records remembered as changed (`changed_since`); a reader further behind reloads.
pub const REGISTRY_CHANGES_QUEUED_MAX: usize = 16_384;

#[derive(Default)]
pub struct RegistryCounts {
    counts: Mutex<Counts>,
    changes: Mutex<Changes>,
}

/// The registry records changed lately, in apply order.
#[derive(Default)]
struct Changes {
    /// Bumped whenever the whole state was replaced: every reader reloads.
    epoch: u64,
    /// (revision, key) of each change, oldest first, at most `REGISTRY_CHANGES_QUEUED_MAX`.
    recent: VecDeque<(i64, Vec<u8>)>,
    /// The newest revision whose changes were dropped from `recent`.
    dropped_through: i64,
}

/// What changed in the registry since a reader's position (`RegistryCounts::changed_since`).
#[derive(Debug, PartialEq, Eq)]
pub enum Changed {
    /// These records (each once) changed: re-read them.
    Keys(Vec<Vec<u8>>),
    /// The reader is too far behind, or the state was replaced: read everything.
    Everything,
}

/// Where a reader of `changed_since` is: the epoch and the revision of the last change it saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub revision: i64,
}

/// The fields of a stored `quorate_registry::Instance` that are counted.
#[derive(serde::Deserialize)]
struct Counted {
    zone: String,
    health: Health,
    #[serde(default)]
    suspect: bool,
    #[serde(default)]
    brake_hold: Option<serde::de::IgnoredAny>,
}

impl Counted {
    fn decode(kv: &KeyValue) -> Option<Counted> {
        if !kv.key.starts_with(REGISTRY_PREFIX.as_bytes()) {
            return None;
        }
        serde_json::from_slice(&kv.value).ok()
    }

    fn state(&self) -> usize {
        match (self.suspect, self.health) {
            (true, _) => 3,
            (false, Health::Passing) => 0,
            (false, Health::Warning) => 1,
            (false, Health::Critical) => 2,
        }
    }
}

impl Counts {
    /// Add (`by` = 1) or take away (`by` = -1) one record.
    fn add(&mut self, c: &Counted, by: i64) {
        self.by_state[c.state()] += by;
        if c.brake_hold.is_some() {
            let n = self.held.entry(c.zone.clone()).or_insert(0);
            *n += by;
            if *n == 0 {
                self.held.remove(&c.zone);
            }
        }
    }

    /// Count every record of the registry in `store` (what the instance counts must always
    /// equal); no releases.
    fn instances_of(store: &Store) -> Counts {
        let prefix = REGISTRY_PREFIX.as_bytes().to_vec();
        let req = RangeRequest { range_end: quorate_kv::prefix_end(&prefix), key: prefix, ..Default::default() };
        let mut counts = Counts::default();
        for kv in store.range(&req).map(|r| r.kvs).unwrap_or_default() {
            if let Some(c) = Counted::decode(&kv) {
                counts.add(&c, 1);
            }
        }
        counts
    }
}

impl RegistryCounts {
    pub fn get(&self) -> Counts {
        self.counts.lock().unwrap().clone()
    }

    /// The registry records changed after `from`, and the position to ask from next time. A
    /// reader at `Position::default()` (never read) gets `Everything`.
    pub fn changed_since(&self, from: Position) -> (Changed, Position) {
        let changes = self.changes.lock().unwrap();
        let newest = changes.recent.back().map_or(changes.dropped_through, |(rev, _)| *rev);
        let now = Position { epoch: changes.epoch, revision: newest };
        if from.epoch != changes.epoch || from.revision < changes.dropped_through {
            return (Changed::Everything, now);
        }
        let start = changes.recent.partition_point(|(rev, _)| *rev <= from.revision);
        let mut keys: Vec<Vec<u8>> = changes.recent.range(start..).map(|(_, k)| k.clone()).collect();
        keys.sort_unstable();
        keys.dedup();
        (Changed::Keys(keys), now)
    }

    fn remember(&self, revision: i64, key: &[u8]) {
        let mut changes = self.changes.lock().unwrap();
        if changes.recent.len() == REGISTRY_CHANGES_QUEUED_MAX {
            if let Some((dropped, _)) = changes.recent.pop_front() {
                changes.dropped_through = dropped;
            }
        }
        changes.recent.push_back((revision, key.to_vec()));
    }
}

impl quorate_consensus::ApplyObserver for RegistryCounts {
    fn applied(&self, events: &[Event]) {
        let prefix = REGISTRY_PREFIX.as_bytes();
        let brake = BRAKE_STATE_KEY.as_bytes();
        let mut mine = events.iter().filter(|e| e.kv.key.starts_with(prefix) || e.kv.key == brake).peekable();
        if mine.peek().is_none() {
            return;
        }
        let mut counts = self.counts.lock().unwrap();
        for e in mine {
            if e.kv.key != brake {
                self.remember(e.revision(), &e.kv.key);
            }
            if e.kv.key == brake {
                for zone in released_zones(e) {
                    *counts.brake_releases.entry(zone).or_insert(0) += 1;
                }
                continue;
            }
            if let Some(before) = e.prev_kv.as_deref().and_then(Counted::decode) {
                counts.add(&before, -1);
            }
            if e.kind == EventKind::Put {
                if let Some(after) = Counted::decode(&e.kv) {
                    counts.add(&after, 1);
                }
            }
        }
    }

    fn reset(&self, store: &Store) {
        {
            let mut changes = self.changes.lock().unwrap();
            let epoch = changes.epoch + 1;
            *changes = Changes { epoch, recent: VecDeque::new(), dropped_through: store.revision() };
        }
        let mut counts = self.counts.lock().unwrap();
        // Releases are events, not state: what was counted stays counted.
        let releases = std::mem::take(&mut counts.brake_releases);
        *counts = Counts { brake_releases: releases, ..Counts::instances_of(store) };
    }
}

/// The zones a change of the replicated brake state released: held before, not held after.
fn released_zones(e: &Event) -> Vec<String> {
    let held = |kv: Option<&KeyValue>| -> Vec<String> {
        let state: BrakeState = kv.and_then(|kv| serde_json::from_slice(&kv.value).ok()).unwrap_or_default();
        state.zones.into_iter().filter(|(_, z)| z.engaged.is_some()).map(|(zone, _)| zone).collect()
    };
    let after = if e.kind == EventKind::Put { held(Some(&e.kv)) } else { Vec::new() };
    held(e.prev_kv.as_deref()).into_iter().filter(|z| !after.contains(z)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use quorate_consensus::ApplyObserver;
    use quorate_kv::{Command, DeleteRangeRequest, LogPosition, PutRequest};
    use quorate_registry::{instance_key, Instance, Kind, RegisterRequest};

    fn instance(id: &str, zone: &str, kind: Kind, lease: i64) -> Instance {
        let req = RegisterRequest {
            address: "10.0.0.1".into(),
            port: 80,
            zone: Some(zone.into()),
            kind,
            ..Default::default()
        };
        req.into_instance("default", "web", id, lease).unwrap()
    }

    struct Harness {
        store: Store,
        counts: RegistryCounts,
        index: u64,
    }

    impl Harness {
        fn apply(&mut self, cmd: Command) {
            self.index += 1;
            let applied = self.store.apply(&cmd, LogPosition { index: self.index, term: 1 });
            assert!(applied.result.is_ok(), "{cmd:?}: {:?}", applied.result);
            if !applied.events.is_empty() {
                self.counts.applied(&applied.events);
            }
            let Counts { by_state, held, .. } = self.counts.get();
            assert_eq!(
                Counts { by_state, held, ..Default::default() },
                Counts::instances_of(&self.store),
                "after {cmd:?}"
            );
        }

        fn put(&mut self, i: &Instance) {
            let key = instance_key(&i.namespace, &i.service, &i.id).into_bytes();
            let value = serde_json::to_vec(i).unwrap();
            self.apply(Command::Put(PutRequest { key, value, lease: i.lease, ..Default::default() }));
        }
    }

    /// Registrations, every change of state, brake holds, deregistrations (one key, a range,
    /// a lease expiry) and unrelated keys: after each, the kept counts equal a recount.
    #[test]
    fn kept_counts_equal_a_recount_after_every_kind_of_write() {
        let mut h = Harness { store: Store::new(), counts: RegistryCounts::default(), index: 0 };
        h.counts.reset(&h.store);
        h.apply(Command::LeaseGrant { id: 7, ttl_s: 60 });
        let mut a = instance("a", "z1", Kind::Ephemeral, 7);
        let mut b = instance("b", "z1", Kind::Persistent, 0);
        let c = instance("c", "z2", Kind::Persistent, 0);
        for i in [&a, &b, &c] {
            h.put(i);
        }
        assert_eq!(h.counts.get().by_state, [3, 0, 0, 0]);
        h.apply(Command::Put(PutRequest { key: b"/other/key".to_vec(), value: b"x".to_vec(), ..Default::default() }));

        b.health = Health::Warning;
        h.put(&b);
        b.health = Health::Critical;
        h.put(&b);
        a.suspect = true;
        a.suspect_reason = Some("brake".into());
        h.put(&a);
        assert_eq!(h.counts.get().by_state, [1, 0, 1, 1]);
        b.brake_hold = Some("checks failing in zone z1".into());
        h.put(&b);
        assert_eq!(h.counts.get().held, BTreeMap::from([("z1".to_string(), 1)]));
        b.brake_hold = None;
        h.put(&b);
        assert!(h.counts.get().held.is_empty());

        h.apply(Command::DeleteRange(DeleteRangeRequest {
            key: instance_key("default", "web", "c").into_bytes(),
            ..Default::default()
        }));
        assert_eq!(h.counts.get().by_state, [0, 0, 1, 1]);
        h.apply(Command::LeaseRevoke { id: 7 });
        assert_eq!(h.counts.get().by_state, [0, 0, 1, 0], "the lease took the ephemeral instance with it");
        let prefix = REGISTRY_PREFIX.as_bytes().to_vec();
        h.apply(Command::DeleteRange(DeleteRangeRequest {
            range_end: quorate_kv::prefix_end(&prefix),
            key: prefix,
            ..Default::default()
        }));
        assert_eq!(h.counts.get(), Counts::default());
    }

    /// A zone held in one checkpoint and not in the next is one release; staying held, or
    /// another zone engaging, is none.
    #[test]
    fn a_zone_held_then_not_is_one_release() {
        use quorate_registry::{EngagedState, ZoneState};
        let mut h = Harness { store: Store::new(), counts: RegistryCounts::default(), index: 0 };
        h.counts.reset(&h.store);
        let state = |held: &[&str]| BrakeState {
            zones: ["a", "b"]
                .iter()
                .map(|z| {
                    let engaged = held.contains(z).then(|| EngagedState { reason: "r".into(), ..Default::default() });
                    (z.to_string(), ZoneState { engaged, ..Default::default() })
                })
                .collect(),
        };
        let checkpoint = |h: &mut Harness, held: &[&str]| {
            let value = serde_json::to_vec(&state(held)).unwrap();
            h.apply(Command::Put(PutRequest { key: BRAKE_STATE_KEY.into(), value, ..Default::default() }));
            h.counts.get().brake_releases
        };
        assert!(checkpoint(&mut h, &["a"]).is_empty());
        assert!(checkpoint(&mut h, &["a"]).is_empty(), "still held");
        assert!(checkpoint(&mut h, &["a", "b"]).is_empty(), "b engaged");
        assert_eq!(checkpoint(&mut h, &["b"]), BTreeMap::from([("a".to_string(), 1)]));
        assert_eq!(checkpoint(&mut h, &[]), BTreeMap::from([("a".to_string(), 1), ("b".to_string(), 1)]));
        checkpoint(&mut h, &["a"]);
        assert_eq!(checkpoint(&mut h, &[])["a"], 2);
        h.counts.reset(&Store::new());
        assert_eq!(h.counts.get().brake_releases["a"], 2, "a snapshot install keeps what was counted");
    }

    /// A reader is told which records changed since it last asked, each once; one that fell
    /// behind the queue, or that predates a reset, reads everything.
    #[test]
    fn changed_since_names_each_changed_record_once_or_says_read_everything() {
        let mut h = Harness { store: Store::new(), counts: RegistryCounts::default(), index: 0 };
        h.counts.reset(&h.store);
        let (first, at) = h.counts.changed_since(Position::default());
        assert_eq!(first, Changed::Everything, "a new reader reads everything");
        assert_eq!(h.counts.changed_since(at).0, Changed::Keys(vec![]));
        let mut a = instance("a", "z1", Kind::Persistent, 0);
        h.put(&a);
        a.health = Health::Warning;
        h.put(&a);
        h.put(&instance("b", "z1", Kind::Persistent, 0));
        h.apply(Command::Put(PutRequest { key: b"/other".to_vec(), value: b"x".to_vec(), ..Default::default() }));
        let key = |id: &str| instance_key("default", "web", id).into_bytes();
        let (changed, next) = h.counts.changed_since(at);
        assert_eq!(changed, Changed::Keys(vec![key("a"), key("b")]));
        assert_eq!(h.counts.changed_since(next).0, Changed::Keys(vec![]));
        for _ in 0..=REGISTRY_CHANGES_QUEUED_MAX {
            h.index += 1;
            let value = serde_json::to_vec(&a).unwrap();
            let cmd = Command::Put(PutRequest { key: key("a"), value, ..Default::default() });
            let applied = h.store.apply(&cmd, LogPosition { index: h.index, term: 1 });
            h.counts.applied(&applied.events);
        }
        assert_eq!(h.counts.changed_since(next).0, Changed::Everything, "fell behind the queue");
        let (_, latest) = h.counts.changed_since(next);
        h.counts.reset(&h.store);
        assert_eq!(h.counts.changed_since(latest).0, Changed::Everything, "the state was replaced");
    }

    #[test]
    fn a_reset_recounts_the_whole_state() {
        let mut h = Harness { store: Store::new(), counts: RegistryCounts::default(), index: 0 };
        h.counts.reset(&h.store);
        h.put(&instance("a", "z1", Kind::Persistent, 0));
        let mut other = Store::new();
        for (n, id) in ["x", "y"].iter().enumerate() {
            let mut i = instance(id, "z9", Kind::Persistent, 0);
            i.brake_hold = Some("held".into());
            let key = instance_key("default", "web", id).into_bytes();
            let cmd = Command::Put(PutRequest { key, value: serde_json::to_vec(&i).unwrap(), ..Default::default() });
            other.apply(&cmd, LogPosition { index: n as u64 + 1, term: 1 });
        }
        h.counts.reset(&other);
        assert_eq!(h.counts.get().by_state, [2, 0, 0, 0]);
        assert_eq!(h.counts.get().held, BTreeMap::from([("z9".to_string(), 2)]));
    }
}
