//! The eviction brake (self-preservation, done right): per zone, time-limited, and explained.
//!
//! The leader asks before evicting instances whose leases expired. Evicting more than a
//! threshold of a zone's instances within a sliding window looks like the leader's (or the
//! network's) trouble, not the instances': the brake engages and they are only marked
//! `suspect`. So does a leadership change, for one TTL. It releases when nothing in the zone
//! is expiring any more (renewals recovered) or after a maximum hold, so it can never stick.
//!
//! Active checks go through the same accounting (`judge_check`): marking an instance critical,
//! deregistering it after `deregister_critical_after`, and evicting an expired instance its
//! check confirmed dead all count in the zone's window, and when a large part of a zone fails
//! its checks at once (counting the instances that are failing now, not only those already
//! judged) that is a brake event: the changes are held, the instances stay served and flagged.
//! One confirmed-dead instance still overrides a hold caused by lease expiry.
//!
//! The state survives a leader change: `export` turns it into ages and held durations (no
//! clock readings), the leader replicates that, and a new leader `restore`s it, so a flapping
//! leader can neither reset the window nor restart the maximum hold. Pure: `now` is an argument.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug)]
pub struct BrakeConfig {
    /// How far back evictions count towards the threshold.
    pub window: Duration,
    /// Fraction of a zone's ephemeral instances that may be evicted within `window`.
    pub threshold: f64,
    /// The brake never holds longer than this.
    pub max_hold: Duration,
    /// Fewer evictions than this never engage it (a zone of two losing one is not a storm).
    pub min_evictions: usize,
}

impl Default for BrakeConfig {
    fn default() -> Self {
        BrakeConfig {
            window: Duration::from_secs(60),
            threshold: 0.25,
            max_hold: Duration::from_secs(300),
            min_evictions: 3,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Evict the expiring instances.
    Evict,
    /// Keep them, marked suspect, for this reason.
    Hold { reason: String },
}

#[derive(Debug)]
struct Engaged {
    since: Instant,
    reason: String,
    /// Engaged because leadership changed: lasts one TTL of leadership, not until recovery.
    takeover: bool,
    /// Engaged because many instances failed their active checks at once: lasts until none
    /// of the zone's checks fails any more, or the maximum hold.
    by_checks: bool,
}

#[derive(Debug, Default)]
struct Zone {
    /// Every removal or downgrade counted in the window (evictions, check-driven changes).
    evictions: VecDeque<Instant>,
    engaged: Option<Engaged>,
    /// Set when the brake let go after its maximum hold: what was held is evicted now.
    released_by_timeout: bool,
    /// The same for changes asked by active checks: they proceed until the checks recover.
    checks_released_by_timeout: bool,
}

impl Zone {
    fn is_idle(&self) -> bool {
        self.evictions.is_empty()
            && self.engaged.is_none()
            && !self.released_by_timeout
            && !self.checks_released_by_timeout
    }
}

/// The brake's state as it is replicated (ADR 0005): durations and ages, never clock readings,
/// so any member can take it over with its own monotonic clock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrakeState {
    pub zones: BTreeMap<String, ZoneState>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneState {
    /// The window's entries as (age in ms, how many), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub window: Vec<(u64, u32)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engaged: Option<EngagedState>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released_by_timeout: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub checks_released_by_timeout: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngagedState {
    /// How long the brake has held so far (as its leaders counted it).
    pub held_ms: u64,
    pub reason: String,
    #[serde(default)]
    pub takeover: bool,
    #[serde(default)]
    pub by_checks: bool,
}

/// What an active check asks the brake for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckChange {
    /// Mark the instance critical (a downgrade: counted in the window).
    MarkCritical,
    /// Remove an instance already critical: deregistered after `deregister_critical_after`, or
    /// expired and confirmed dead. Its downgrade was counted when it was marked.
    Remove,
}

/// What the brake did, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    Engaged { zone: String, reason: String },
    Released { zone: String, why: &'static str },
}

#[derive(Debug, Default)]
pub struct Brake {
    cfg: BrakeConfig,
    zones: BTreeMap<String, Zone>,
    transitions: Vec<Transition>,
}

impl Brake {
    pub fn new(cfg: BrakeConfig) -> Self {
        Brake { cfg, zones: BTreeMap::new(), transitions: Vec::new() }
    }

    /// `expiring` instances of `zone` (of `zone_total` ephemeral ones) have expired leases.
    /// `leading_for` is how long this member has led; `ttl` the zone's longest instance TTL.
    pub fn judge(
        &mut self,
        zone: &str,
        expiring: usize,
        zone_total: usize,
        leading_for: Duration,
        ttl: Duration,
        now: Instant,
    ) -> Verdict {
        let cfg = self.cfg.clone();
        let z = self.zones.entry(zone.to_string()).or_default();
        while z.evictions.front().is_some_and(|t| now.duration_since(*t) > cfg.window) {
            z.evictions.pop_front();
        }
        if let Some(e) = z.engaged.as_ref().filter(|e| !e.by_checks) {
            if e.takeover && leading_for >= ttl {
                z.engaged = None;
                self.transitions.push(Transition::Released { zone: zone.into(), why: "takeover grace over" });
            } else if now.duration_since(e.since) >= cfg.max_hold {
                z.engaged = None;
                z.released_by_timeout = true;
                self.transitions.push(Transition::Released { zone: zone.into(), why: "maximum hold reached" });
            } else if expiring == 0 {
                z.engaged = None;
                self.transitions.push(Transition::Released { zone: zone.into(), why: "renewals recovered" });
            }
        }
        if expiring == 0 {
            z.released_by_timeout = false;
            return Verdict::Evict;
        }
        if z.released_by_timeout {
            // What the brake held is evicted now; the window starts afresh.
            z.released_by_timeout = false;
            z.evictions.clear();
            return Verdict::Evict;
        }
        if let Some(e) = &z.engaged {
            return Verdict::Hold { reason: e.reason.clone() };
        }
        let takeover = leading_for < ttl;
        let reason = if takeover {
            Some(format!("leadership changed {} ms ago, less than one TTL", leading_for.as_millis()))
        } else {
            let would_be = z.evictions.len() + expiring;
            let over = would_be as f64 > cfg.threshold * zone_total as f64;
            (over && would_be >= cfg.min_evictions).then(|| {
                format!(
                    "{would_be} of {zone_total} instances in zone {zone} would be evicted within {} s (threshold {}%)",
                    cfg.window.as_secs(),
                    (cfg.threshold * 100.0).round()
                )
            })
        };
        match reason {
            Some(reason) => {
                z.engaged = Some(Engaged { since: now, reason: reason.clone(), takeover, by_checks: false });
                self.transitions.push(Transition::Engaged { zone: zone.into(), reason: reason.clone() });
                Verdict::Hold { reason }
            }
            None => {
                z.evictions.extend(std::iter::repeat_n(now, expiring));
                Verdict::Evict
            }
        }
    }

    /// An operator's repair asks to deregister `removals` instances of `zone` (of `zone_total`)
    /// at once (`quorate ctl audit --repair`). Judged against the same threshold and window as
    /// evictions, but one outside vantage point is not a signal to act on: a refusal engages no
    /// hold and sets no flag (so it changes nothing for the zone's leases and checks), and a zone
    /// the brake already holds is refused whole. When allowed, every removal counts in the
    /// window, so that expiries right after it are judged with it.
    pub fn judge_repair(&mut self, zone: &str, removals: usize, zone_total: usize, now: Instant) -> Verdict {
        let cfg = self.cfg.clone();
        let z = self.zones.entry(zone.to_string()).or_default();
        while z.evictions.front().is_some_and(|t| now.duration_since(*t) > cfg.window) {
            z.evictions.pop_front();
        }
        if let Some(e) = &z.engaged {
            return Verdict::Hold { reason: format!("the brake holds zone {zone}: {}", e.reason) };
        }
        let would_be = z.evictions.len() + removals;
        if would_be as f64 > cfg.threshold * zone_total as f64 && would_be >= cfg.min_evictions {
            return Verdict::Hold {
                reason: format!(
                    "removing {removals} of {zone_total} instances in zone {zone} would make {would_be} removals within {} s \
                     (threshold {}%); deregister them one by one if the zone is really gone",
                    cfg.window.as_secs(),
                    (cfg.threshold * 100.0).round()
                ),
            };
        }
        z.evictions.extend(std::iter::repeat_n(now, removals));
        Verdict::Evict
    }

    /// One instance of `zone` whose active check asks for `change`. For `MarkCritical`,
    /// `failing` of the zone's `zone_total` checked instances (this one included) fail their
    /// checks now; for `Remove`, `failing` of them are due for removal at once. `Evict` means:
    /// carry the change out; `Hold`: keep the instance as it is.
    pub fn judge_check(
        &mut self,
        zone: &str,
        change: CheckChange,
        failing: usize,
        zone_total: usize,
        now: Instant,
    ) -> Verdict {
        let cfg = self.cfg.clone();
        let z = self.zones.entry(zone.to_string()).or_default();
        while z.evictions.front().is_some_and(|t| now.duration_since(*t) > cfg.window) {
            z.evictions.pop_front();
        }
        if let Some(e) = z.engaged.as_ref().filter(|e| e.by_checks) {
            if now.duration_since(e.since) < cfg.max_hold {
                return Verdict::Hold { reason: e.reason.clone() };
            }
            z.engaged = None;
            z.checks_released_by_timeout = true;
            self.transitions.push(Transition::Released { zone: zone.into(), why: "maximum hold reached" });
        }
        if !z.checks_released_by_timeout {
            let would_be = match change {
                // What has been changed in the window, plus every instance failing right now.
                CheckChange::MarkCritical => z.evictions.len() + failing.max(1),
                // Its downgrade was counted already: only many at once is a storm.
                CheckChange::Remove => failing.max(1),
            };
            let over = would_be as f64 > cfg.threshold * zone_total as f64;
            if over && would_be >= cfg.min_evictions {
                let reason = format!(
                    "{failing} of {zone_total} checked instances in zone {zone} fail their checks at once \
                     ({would_be} changes within {} s, threshold {}%)",
                    cfg.window.as_secs(),
                    (cfg.threshold * 100.0).round()
                );
                // A hold already running (lease expiry) keeps its start: the maximum hold counts.
                let since = z.engaged.as_ref().map_or(now, |e| e.since);
                z.engaged = Some(Engaged { since, reason: reason.clone(), takeover: false, by_checks: true });
                self.transitions.push(Transition::Engaged { zone: zone.into(), reason: reason.clone() });
                return Verdict::Hold { reason };
            }
        }
        if change == CheckChange::MarkCritical {
            z.evictions.push_back(now);
        }
        Verdict::Evict
    }

    /// Called on every pass over the zone's checks: `failing` of its checked instances fail
    /// their checks now (held or not yet judged). None failing releases a hold the checks
    /// engaged; a hold past its maximum is released so the held changes proceed.
    pub fn observe_checks(&mut self, zone: &str, failing: usize, now: Instant) {
        let max_hold = self.cfg.max_hold;
        let Some(z) = self.zones.get_mut(zone) else { return };
        if failing == 0 {
            z.checks_released_by_timeout = false;
        }
        if let Some(e) = z.engaged.as_ref().filter(|e| e.by_checks) {
            if failing == 0 {
                z.engaged = None;
                self.transitions.push(Transition::Released { zone: zone.into(), why: "checks recovered" });
            } else if now.duration_since(e.since) >= max_hold {
                z.engaged = None;
                z.checks_released_by_timeout = true;
                self.transitions.push(Transition::Released { zone: zone.into(), why: "maximum hold reached" });
            }
        }
    }

    /// The state to replicate, as ages relative to `now`.
    pub fn export(&self, now: Instant) -> BrakeState {
        let ms = |t: Instant| now.saturating_duration_since(t).as_millis() as u64;
        let zones = self
            .zones
            .iter()
            .filter(|(_, z)| !z.is_idle())
            .map(|(name, z)| {
                let mut window: Vec<(u64, u32)> = Vec::new();
                for t in &z.evictions {
                    match window.last_mut() {
                        Some((age, n)) if *age == ms(*t) => *n += 1,
                        _ => window.push((ms(*t), 1)),
                    }
                }
                let engaged = z.engaged.as_ref().map(|e| EngagedState {
                    held_ms: ms(e.since),
                    reason: e.reason.clone(),
                    takeover: e.takeover,
                    by_checks: e.by_checks,
                });
                let state = ZoneState {
                    window,
                    engaged,
                    released_by_timeout: z.released_by_timeout,
                    checks_released_by_timeout: z.checks_released_by_timeout,
                };
                (name.clone(), state)
            })
            .collect();
        BrakeState { zones }
    }

    /// A brake that continues from `state` (what the previous leader replicated), at `now`.
    pub fn restore(cfg: BrakeConfig, state: &BrakeState, now: Instant) -> Self {
        let at = |age_ms: u64| now.checked_sub(Duration::from_millis(age_ms)).unwrap_or(now);
        let zones = state
            .zones
            .iter()
            .map(|(name, s)| {
                let mut evictions = VecDeque::new();
                for (age, n) in &s.window {
                    evictions.extend(std::iter::repeat_n(at(*age), *n as usize));
                }
                let engaged = s.engaged.as_ref().map(|e| Engaged {
                    since: at(e.held_ms),
                    reason: e.reason.clone(),
                    takeover: e.takeover,
                    by_checks: e.by_checks,
                });
                let zone = Zone {
                    evictions,
                    engaged,
                    released_by_timeout: s.released_by_timeout,
                    checks_released_by_timeout: s.checks_released_by_timeout,
                };
                (name.clone(), zone)
            })
            .collect();
        Brake { cfg, zones, transitions: Vec::new() }
    }

    /// Zones where the brake holds now, with the reason.
    pub fn engaged(&self) -> Vec<(String, String)> {
        self.zones.iter().filter_map(|(z, s)| s.engaged.as_ref().map(|e| (z.clone(), e.reason.clone()))).collect()
    }

    /// Engagements and releases since the last call.
    pub fn take_transitions(&mut self) -> Vec<Transition> {
        std::mem::take(&mut self.transitions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(15);
    const MARK: CheckChange = CheckChange::MarkCritical;
    const REMOVE: CheckChange = CheckChange::Remove;
    const LONG: Duration = Duration::from_secs(3600);

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_few_expiries_are_evicted() {
        let mut b = Brake::new(BrakeConfig::default());
        let t0 = Instant::now();
        // 10 of 1000 at once, then 2 of a zone of 2: no storm.
        assert_eq!(b.judge("a", 10, 1000, LONG, TTL, t0), Verdict::Evict);
        assert_eq!(b.judge("tiny", 2, 2, LONG, TTL, t0), Verdict::Evict);
        assert!(b.engaged().is_empty());
    }

    #[test]
    fn a_mass_expiry_holds_only_its_zone_until_renewals_recover() {
        let mut b = Brake::new(BrakeConfig::default());
        let t0 = Instant::now();
        let v = b.judge("eu-1", 60, 100, LONG, TTL, t0);
        assert!(matches!(&v, Verdict::Hold { reason } if reason.contains("60 of 100")), "{v:?}");
        assert_eq!(b.judge("us-1", 5, 100, LONG, TTL, t0), Verdict::Evict, "other zones are unaffected");
        assert!(matches!(b.judge("eu-1", 60, 100, LONG, TTL, t0 + s(30)), Verdict::Hold { .. }));
        // The held instances re-register: nothing expiring, the brake releases.
        assert_eq!(b.judge("eu-1", 0, 100, LONG, TTL, t0 + s(40)), Verdict::Evict);
        assert!(b.engaged().is_empty());
        let t = b.take_transitions();
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!(t[1], Transition::Released { zone: "eu-1".into(), why: "renewals recovered" });
    }

    #[test]
    fn the_window_accumulates_and_slides() {
        let mut b = Brake::new(BrakeConfig::default());
        let t0 = Instant::now();
        // 20 then 10 of 100 within the window: the second batch would make 30% > 25%.
        assert_eq!(b.judge("z", 20, 100, LONG, TTL, t0), Verdict::Evict);
        assert!(matches!(b.judge("z", 10, 100, LONG, TTL, t0 + s(10)), Verdict::Hold { .. }));
        let mut b = Brake::new(BrakeConfig::default());
        assert_eq!(b.judge("z", 20, 100, LONG, TTL, t0), Verdict::Evict);
        assert_eq!(b.judge("z", 10, 100, LONG, TTL, t0 + s(61)), Verdict::Evict, "the first batch left the window");
    }

    #[test]
    fn it_never_holds_past_the_maximum() {
        let mut b = Brake::new(BrakeConfig::default());
        let t0 = Instant::now();
        assert!(matches!(b.judge("z", 50, 100, LONG, TTL, t0), Verdict::Hold { .. }));
        assert!(matches!(b.judge("z", 50, 100, LONG, TTL, t0 + s(299)), Verdict::Hold { .. }));
        assert_eq!(b.judge("z", 50, 100, LONG, TTL, t0 + s(300)), Verdict::Evict, "released after 5 min");
        assert_eq!(
            b.take_transitions().last(),
            Some(&Transition::Released { zone: "z".into(), why: "maximum hold reached" })
        );
    }

    #[test]
    fn a_new_leader_holds_for_one_ttl() {
        let mut b = Brake::new(BrakeConfig::default());
        let t0 = Instant::now();
        let v = b.judge("z", 1, 1000, s(3), TTL, t0);
        assert!(matches!(&v, Verdict::Hold { reason } if reason.contains("leadership changed")), "{v:?}");
        assert!(matches!(b.judge("z", 1, 1000, s(10), TTL, t0 + s(7)), Verdict::Hold { .. }));
        // One TTL of leadership later the instance is still expired: it really is gone.
        assert_eq!(b.judge("z", 1, 1000, s(15), TTL, t0 + s(12)), Verdict::Evict);
        assert_eq!(
            b.take_transitions().last(),
            Some(&Transition::Released { zone: "z".into(), why: "takeover grace over" })
        );
        // A storm right after a takeover is still a storm.
        assert!(matches!(b.judge("z", 600, 1000, s(20), TTL, t0 + s(17)), Verdict::Hold { .. }));
    }

    #[test]
    fn a_zone_failing_its_checks_at_once_is_a_brake_event() {
        let mut b = Brake::new(BrakeConfig::default());
        let t0 = Instant::now();
        // All 20 instances of zone a fail at once: the first one judged already sees them all.
        let v = b.judge_check("a", MARK, 20, 20, t0);
        assert!(matches!(&v, Verdict::Hold { reason } if reason.contains("20 of 20")), "{v:?}");
        for i in 1..20 {
            assert!(matches!(b.judge_check("a", MARK, 20, 20, t0 + s(i)), Verdict::Hold { .. }), "instance {i}");
        }
        // One failing instance in another zone is simply marked.
        assert_eq!(b.judge_check("b", MARK, 1, 20, t0), Verdict::Evict);
        // Lease expiries in a zone the checks hold are held too.
        assert!(matches!(b.judge("a", 1, 20, LONG, TTL, t0 + s(30)), Verdict::Hold { .. }));
        assert_eq!(b.engaged().len(), 1);
    }

    #[test]
    fn single_check_failures_are_carried_out_and_counted_in_the_window() {
        let mut b = Brake::new(BrakeConfig::default());
        let t0 = Instant::now();
        // 25% of 20 is 5: five instances failing one after another are marked...
        for i in 0..5 {
            assert_eq!(b.judge_check("z", MARK, 1, 20, t0 + s(i)), Verdict::Evict, "instance {i}");
        }
        // ...the sixth within the window is a storm.
        assert!(matches!(b.judge_check("z", MARK, 1, 20, t0 + s(6)), Verdict::Hold { .. }));
        // Evictions by lease expiry and check-driven changes share the window.
        let mut b = Brake::new(BrakeConfig::default());
        assert_eq!(b.judge("z", 4, 20, LONG, TTL, t0), Verdict::Evict);
        assert_eq!(b.judge_check("z", MARK, 1, 20, t0 + s(1)), Verdict::Evict);
        assert!(matches!(b.judge_check("z", MARK, 1, 20, t0 + s(2)), Verdict::Hold { .. }));
        assert!(matches!(b.judge("z", 1, 20, LONG, TTL, t0 + s(3)), Verdict::Hold { .. }));
    }

    #[test]
    fn a_confirmed_dead_instance_overrides_a_lease_hold() {
        let mut b = Brake::new(BrakeConfig::default());
        let t0 = Instant::now();
        // Marked critical (counted), then its lease expires along with a storm of others.
        assert_eq!(b.judge_check("z", MARK, 1, 20, t0), Verdict::Evict);
        assert!(matches!(b.judge("z", 12, 20, LONG, TTL, t0 + s(1)), Verdict::Hold { .. }));
        assert_eq!(b.judge_check("z", REMOVE, 1, 20, t0 + s(2)), Verdict::Evict, "its check confirmed it dead");
        assert_eq!(b.export(t0 + s(2)).zones["z"].window, vec![(2000, 1)], "counted once, when it was marked");
    }

    #[test]
    fn removals_of_critical_instances_are_held_only_in_numbers_or_while_held() {
        let mut b = Brake::new(BrakeConfig::default());
        let t0 = Instant::now();
        // A small zone: one marked, then deregistered, then another: no storm.
        assert_eq!(b.judge_check("small", MARK, 1, 2, t0), Verdict::Evict);
        assert_eq!(b.judge_check("small", MARK, 1, 2, t0 + s(1)), Verdict::Evict);
        assert_eq!(b.judge_check("small", REMOVE, 1, 2, t0 + s(3)), Verdict::Evict);
        assert_eq!(b.judge_check("small", REMOVE, 1, 2, t0 + s(3)), Verdict::Evict);
        // Ten of twenty due for deregistration at once is a storm.
        let v = b.judge_check("big", REMOVE, 10, 20, t0);
        assert!(matches!(&v, Verdict::Hold { reason } if reason.contains("10 of 20")), "{v:?}");
        // And while the checks hold a zone, a single removal waits too.
        assert!(matches!(b.judge_check("big", REMOVE, 1, 20, t0 + s(5)), Verdict::Hold { .. }));
    }

    #[test]
    fn a_check_hold_releases_when_the_checks_recover_or_after_the_maximum() {
        let mut b = Brake::new(BrakeConfig::default());
        let t0 = Instant::now();
        assert!(matches!(b.judge_check("z", MARK, 10, 10, t0), Verdict::Hold { .. }));
        b.observe_checks("z", 10, t0 + s(10));
        assert_eq!(b.engaged().len(), 1);
        b.observe_checks("z", 0, t0 + s(20));
        assert!(b.engaged().is_empty());
        assert_eq!(
            b.take_transitions().last(),
            Some(&Transition::Released { zone: "z".into(), why: "checks recovered" })
        );

        let mut b = Brake::new(BrakeConfig::default());
        assert!(matches!(b.judge_check("z", MARK, 10, 10, t0), Verdict::Hold { .. }));
        assert!(matches!(b.judge_check("z", MARK, 10, 10, t0 + s(299)), Verdict::Hold { .. }));
        b.observe_checks("z", 10, t0 + s(300));
        // Every held change now proceeds, one after another, until the checks recover.
        for i in 0..10 {
            assert_eq!(b.judge_check("z", MARK, 10, 10, t0 + s(301)), Verdict::Evict, "instance {i}");
        }
        b.observe_checks("z", 0, t0 + s(310));
        assert!(
            matches!(b.judge_check("z", MARK, 10, 10, t0 + s(400)), Verdict::Hold { .. }),
            "a new storm holds again"
        );
    }

    #[test]
    fn the_state_survives_a_leader_change() {
        let cfg = BrakeConfig::default();
        let t0 = Instant::now();
        let mut old = Brake::new(cfg.clone());
        assert_eq!(old.judge("z", 20, 100, LONG, TTL, t0), Verdict::Evict);
        assert!(matches!(old.judge("z", 60, 100, LONG, TTL, t0 + s(10)), Verdict::Hold { .. }));
        // The new leader's clock has nothing to do with the old one's.
        let state = old.export(t0 + s(200));
        let json = serde_json::to_string(&state).unwrap();
        let state: BrakeState = serde_json::from_str(&json).unwrap();
        let u0 = Instant::now() + s(5000);
        let mut new = Brake::restore(cfg.clone(), &state, u0);
        assert_eq!(new.engaged().len(), 1, "still engaged after the change");
        // Even past its own takeover grace, the new leader keeps holding: the hold began 190 s ago.
        assert!(matches!(new.judge("z", 60, 100, LONG, TTL, u0 + s(50)), Verdict::Hold { .. }));
        // And the maximum hold fires when the first leader's would have (10 + 300 s).
        assert_eq!(new.judge("z", 60, 100, LONG, TTL, u0 + s(110)), Verdict::Evict);

        // The window survives too: 20 evicted, then a new leader sees 10 more as a storm.
        let mut old = Brake::new(cfg.clone());
        assert_eq!(old.judge("w", 20, 100, LONG, TTL, t0), Verdict::Evict);
        let mut new = Brake::restore(cfg.clone(), &old.export(t0 + s(5)), u0);
        assert!(matches!(new.judge("w", 10, 100, LONG, TTL, u0 + s(5)), Verdict::Hold { .. }));
        // A fresh brake (the old behaviour) would have let them go.
        assert_eq!(Brake::new(cfg).judge("w", 10, 100, LONG, TTL, u0 + s(5)), Verdict::Evict);
    }

    #[test]
    fn a_flapping_leader_cannot_hold_forever() {
        let cfg = BrakeConfig::default();
        // Leaders that each lead 10 s (less than one TTL) and hand the state on: every one of
        // them would start a takeover hold, but the hold counts from the first, so it ends.
        let mut state = BrakeState::default();
        let mut released_after_s = None;
        for leader in 0..60u64 {
            let u0 = Instant::now() + s(leader * 1000);
            let mut b = Brake::restore(cfg.clone(), &state, u0);
            for tick in 0..10 {
                if b.judge("z", 1, 1000, s(tick), TTL, u0 + s(tick)) == Verdict::Evict {
                    released_after_s.get_or_insert(leader * 10 + tick);
                }
            }
            state = b.export(u0 + s(10));
        }
        let after = released_after_s.expect("the maximum hold fires under a flapping leader");
        assert!((300..=310).contains(&after), "released after {after} s of leadership");
    }

    #[test]
    fn an_idle_brake_exports_nothing() {
        let mut b = Brake::new(BrakeConfig::default());
        let t0 = Instant::now();
        assert_eq!(b.judge("z", 0, 10, LONG, TTL, t0), Verdict::Evict);
        assert_eq!(b.export(t0), BrakeState::default());
        assert_eq!(b.judge("z", 1, 10, LONG, TTL, t0), Verdict::Evict);
        assert_eq!(b.export(t0 + s(61)).zones["z"].window, vec![(61_000, 1)]);
    }
    #[test]
    fn a_repair_is_judged_by_the_threshold_without_engaging_anything_and_counts_every_removal() {
        let cfg = BrakeConfig::default(); // 25%, 60 s window, at least 3
        let mut b = Brake::new(cfg.clone());
        let t0 = Instant::now();
        // A storm: refused, and nothing engaged or latched for the zone.
        assert!(matches!(b.judge_repair("b", 4, 4, t0), Verdict::Hold { .. }));
        assert!(b.engaged().is_empty(), "a refused repair engages no hold");
        assert!(b.take_transitions().is_empty());
        // Leases in that zone are still judged as usual: one expiry of 24 is evicted.
        assert_eq!(b.judge("b", 1, 24, Duration::from_secs(600), Duration::from_secs(15), t0), Verdict::Evict);
        // Allowed removals count one each in the window: 2 of 20 now, then 4 expiring of 20
        // would make 1 + 2 + 4 = 7 > 5: held.
        assert_eq!(b.judge_repair("a", 2, 20, t0), Verdict::Evict);
        assert!(matches!(
            b.judge("a", 4, 20, Duration::from_secs(600), Duration::from_secs(15), t0),
            Verdict::Hold { .. }
        ));
        // A zone the brake holds refuses repairs whole.
        assert!(matches!(b.judge_repair("a", 1, 20, t0), Verdict::Hold { .. }));
        // Outside the window, a later repair of the same size is judged afresh.
        let mut b = Brake::new(cfg.clone());
        assert!(matches!(b.judge_repair("c", 4, 4, t0), Verdict::Hold { .. }));
        let later = t0 + Duration::from_secs(3600);
        assert!(matches!(b.judge_repair("c", 4, 4, later), Verdict::Hold { .. }), "no latch lets it through later");
    }
}
