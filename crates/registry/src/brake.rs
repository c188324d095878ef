//! The eviction brake (self-preservation, done right): per zone, time-limited, and explained.
//!
//! The leader asks before evicting instances whose leases expired. Evicting more than a
//! threshold of a zone's instances within a sliding window looks like the leader's (or the
//! network's) trouble, not the instances': the brake engages and they are only marked
//! `suspect`. So does a leadership change, for one TTL. It releases when nothing in the zone
//! is expiring any more (renewals recovered) or after a maximum hold, so it can never stick.
//! Pure: `now` is an argument.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

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
}

#[derive(Debug, Default)]
struct Zone {
    evictions: VecDeque<Instant>,
    engaged: Option<Engaged>,
    /// Set when the brake let go after its maximum hold: what was held is evicted now.
    released_by_timeout: bool,
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
        if let Some(e) = &z.engaged {
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
                z.engaged = Some(Engaged { since: now, reason: reason.clone(), takeover });
                self.transitions.push(Transition::Engaged { zone: zone.into(), reason: reason.clone() });
                Verdict::Hold { reason }
            }
            None => {
                z.evictions.extend(std::iter::repeat_n(now, expiring));
                Verdict::Evict
            }
        }
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
}
