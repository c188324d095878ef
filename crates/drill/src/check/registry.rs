//! Registry: no instance that kept heartbeating is ever evicted, and every instance that
//! stopped is gone (or held as suspect by the eviction brake) within TTL + election timeout
//! of its last acknowledged heartbeat. A fault overlapping that window (a leader change
//! grants every lease grace again) relaxes the bound to "gone or held by the end".

use std::collections::BTreeSet;

use serde::Serialize;

/// One instance's life as the drill drove it.
#[derive(Clone, Debug, Serialize)]
pub struct Life {
    pub id: String,
    pub registered_ms: u64,
    /// When its heartbeats stopped (`None`: it heartbeat to the end).
    pub stopped_ms: Option<u64>,
    /// Its last acknowledged heartbeat before it stopped.
    pub last_ack_ms: u64,
}

/// A consistent discovery read: who was listed, and who of them as suspect.
#[derive(Clone, Debug, Serialize)]
pub struct Listing {
    pub invoke_ms: u64,
    /// Which member answered, and at which revision (for the report).
    pub from: String,
    pub revision: i64,
    pub listed: BTreeSet<String>,
    pub suspect: BTreeSet<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum RegistryAnomaly {
    /// A heartbeating instance was missing from a discovery read, or a heartbeat found it gone.
    LiveEvicted { id: String, at_ms: u64, seen: String },
    /// A stopped instance was still listed (not as suspect) after its deadline.
    NotEvicted { id: String, at_ms: u64, deadline_ms: u64 },
}

pub struct Bounds {
    pub ttl_ms: u64,
    pub election_ms: u64,
    /// Reaper tick and discovery polling: how late an eviction can be seen at best.
    pub slack_ms: u64,
}

/// `gone_on_heartbeat`: (id, time) where a heartbeat was answered "no such instance";
/// `faults`: (start, healed) windows.
pub fn check(
    lives: &[Life],
    listings: &[Listing],
    gone_on_heartbeat: &[(String, u64)],
    faults: &[(u64, u64)],
    b: &Bounds,
) -> Vec<RegistryAnomaly> {
    let mut out = Vec::new();
    let last = listings.iter().map(|l| l.invoke_ms).max();
    for life in lives {
        match life.stopped_ms {
            None => {
                let missing =
                    listings.iter().filter(|l| l.invoke_ms > life.registered_ms).find(|l| !l.listed.contains(&life.id));
                if let Some(l) = missing {
                    let seen = format!("missing from a discovery read served by {} at revision {}", l.from, l.revision);
                    out.push(RegistryAnomaly::LiveEvicted { id: life.id.clone(), at_ms: l.invoke_ms, seen });
                } else if let Some((_, at)) = gone_on_heartbeat.iter().find(|(id, _)| *id == life.id) {
                    let seen = "a heartbeat was answered 404".to_string();
                    out.push(RegistryAnomaly::LiveEvicted { id: life.id.clone(), at_ms: *at, seen });
                }
            }
            Some(_) => {
                let deadline = life.last_ack_ms + b.ttl_ms + b.election_ms + b.slack_ms;
                let disturbed = faults.iter().any(|(s, e)| *s <= deadline && *e + b.election_ms >= life.last_ack_ms);
                let late = listings.iter().find(|l| {
                    let judged = if disturbed { Some(l.invoke_ms) == last } else { l.invoke_ms > deadline };
                    judged && l.listed.contains(&life.id) && !l.suspect.contains(&life.id)
                });
                if let Some(l) = late {
                    out.push(RegistryAnomaly::NotEvicted {
                        id: life.id.clone(),
                        at_ms: l.invoke_ms,
                        deadline_ms: deadline,
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(at: u64, listed: &[&str], suspect: &[&str]) -> Listing {
        Listing {
            invoke_ms: at,
            from: "m1".into(),
            revision: 1,
            listed: listed.iter().map(|s| s.to_string()).collect(),
            suspect: suspect.iter().map(|s| s.to_string()).collect(),
        }
    }
    const B: Bounds = Bounds { ttl_ms: 4_000, election_ms: 1_000, slack_ms: 1_000 };

    #[test]
    fn a_live_instance_missing_from_discovery_is_flagged() {
        let lives = [Life { id: "a".into(), registered_ms: 0, stopped_ms: None, last_ack_ms: 9_000 }];
        assert!(check(&lives, &[listing(5_000, &["a"], &[])], &[], &[], &B).is_empty());
        assert_eq!(
            check(&lives, &[listing(5_000, &[], &[])], &[], &[], &B),
            vec![RegistryAnomaly::LiveEvicted {
                id: "a".into(),
                at_ms: 5_000,
                seen: "missing from a discovery read served by m1 at revision 1".into()
            }]
        );
        assert_eq!(
            check(&lives, &[], &[("a".into(), 7_000)], &[], &B),
            vec![RegistryAnomaly::LiveEvicted {
                id: "a".into(),
                at_ms: 7_000,
                seen: "a heartbeat was answered 404".into()
            }]
        );
    }

    #[test]
    fn a_stopped_instance_must_go_by_its_deadline_unless_held_or_disturbed() {
        let lives = [Life { id: "s".into(), registered_ms: 0, stopped_ms: Some(10_000), last_ack_ms: 10_000 }];
        // Gone at 15 s: fine. Still listed at 17 s (deadline 16 s): late.
        assert!(check(&lives, &[listing(15_500, &[], &[])], &[], &[], &B).is_empty());
        assert_eq!(
            check(&lives, &[listing(17_000, &["s"], &[]), listing(18_000, &[], &[])], &[], &[], &B),
            vec![RegistryAnomaly::NotEvicted { id: "s".into(), at_ms: 17_000, deadline_ms: 16_000 }]
        );
        // Held as suspect by the brake: fine.
        assert!(check(&lives, &[listing(17_000, &["s"], &["s"])], &[], &[], &B).is_empty());
        // A fault in the window: only the last listing counts.
        let faults = [(12_000, 18_000)];
        assert!(check(&lives, &[listing(17_000, &["s"], &[]), listing(25_000, &[], &[])], &[], &faults, &B).is_empty());
    }
}
