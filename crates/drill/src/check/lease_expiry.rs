//! Lease expired early (issue 11): no key of a lease may disappear by expiry before the last
//! promise a client was given for that lease ran out. A promise is the answer to a grant or a
//! keep-alive: from when the answer arrived at the client, the lease lives at least the TTL it
//! carried (a keep-alive answered with TTL 0 means "not found" and promises nothing).
//!
//! An observation is a key of the lease seen deleted: a watch DELETE event (the time it
//! arrived) or a read that found the key gone. Both come after the deletion itself, so an
//! observation before the promise ran out proves the deletion was early. Deletions a client
//! asked for are not expiries: a lease is judged only by what was seen before any revoke of it
//! was invoked (a revoke with an unknown outcome counts from its invocation too).
//!
//! All times are the drill's one monotonic clock, so no clock offset enters the comparison.

use std::collections::HashMap;

use serde::Serialize;

use crate::history::Nanos;

/// An answer to a lease grant or keep-alive, as the client received it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LeaseAnswer {
    pub client: u32,
    pub lease: i64,
    /// When the answer arrived at the client.
    pub at_ns: Nanos,
    /// The TTL it promised; 0: the lease was not found, no promise.
    pub ttl_s: i64,
}

impl LeaseAnswer {
    /// Until when this answer promised the lease lives, if it promised anything.
    pub fn promised_until_ns(&self) -> Option<Nanos> {
        (self.ttl_s > 0).then(|| self.at_ns + self.ttl_s as u64 * 1_000_000_000)
    }
}

/// A revoke a client invoked (whatever its outcome).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Revoke {
    pub client: u32,
    pub lease: i64,
    pub invoke_ns: Nanos,
}

/// A key attached to `lease` seen deleted at `at_ns` (a watch event's arrival, or a read).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Deletion {
    /// Who saw it ("watcher m1 on drill/primary", "read by client 3").
    pub observer: String,
    pub key: String,
    pub lease: i64,
    /// The revision of the deletion (0 when a read saw it without one).
    pub revision: i64,
    pub at_ns: Nanos,
}

/// A lease whose key was seen deleted before the client's promise ran out.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EarlyExpiry {
    pub lease: i64,
    pub key: String,
    pub observer: String,
    pub revision: i64,
    /// The client whose answer made the latest promise.
    pub client: u32,
    pub seen_ms: f64,
    pub promised_until_ms: f64,
    /// How long before the promise ran out the deletion was seen.
    pub early_ms: f64,
}

/// The latest promise per lease: (until, the client told so).
pub fn promises(answers: &[LeaseAnswer]) -> HashMap<i64, (Nanos, u32)> {
    let mut out: HashMap<i64, (Nanos, u32)> = HashMap::new();
    for a in answers {
        let Some(until) = a.promised_until_ns() else { continue };
        let e = out.entry(a.lease).or_insert((until, a.client));
        if until > e.0 {
            *e = (until, a.client);
        }
    }
    out
}

/// One anomaly per lease that expired early: its earliest observation before the promise.
pub fn check(answers: &[LeaseAnswer], revokes: &[Revoke], deletions: &[Deletion]) -> Vec<EarlyExpiry> {
    let promised = promises(answers);
    let mut first_revoke: HashMap<i64, Nanos> = HashMap::new();
    for r in revokes {
        let e = first_revoke.entry(r.lease).or_insert(r.invoke_ns);
        *e = (*e).min(r.invoke_ns);
    }
    let mut worst: HashMap<i64, &Deletion> = HashMap::new();
    for d in deletions {
        if first_revoke.get(&d.lease).is_some_and(|&at| at <= d.at_ns) {
            continue; // the client asked for it
        }
        let Some(&(until, _)) = promised.get(&d.lease) else { continue };
        if d.at_ns >= until {
            continue;
        }
        let e = worst.entry(d.lease).or_insert(d);
        if d.at_ns < e.at_ns {
            *e = d;
        }
    }
    let ms = |ns: Nanos| ns as f64 / 1e6;
    let mut out: Vec<EarlyExpiry> = worst
        .into_values()
        .map(|d| {
            let (until, client) = promised[&d.lease];
            EarlyExpiry {
                lease: d.lease,
                key: d.key.clone(),
                observer: d.observer.clone(),
                revision: d.revision,
                client,
                seen_ms: ms(d.at_ns),
                promised_until_ms: ms(until),
                early_ms: ms(until - d.at_ns),
            }
        })
        .collect();
    out.sort_by(|a, b| a.seen_ms.total_cmp(&b.seen_ms));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    fn answer(lease: i64, at_s: f64, ttl_s: i64) -> LeaseAnswer {
        LeaseAnswer { client: 1, lease, at_ns: (at_s * S as f64) as Nanos, ttl_s }
    }

    fn deleted(lease: i64, at_s: f64) -> Deletion {
        Deletion {
            observer: "watcher m1".into(),
            key: "drill/primary".into(),
            lease,
            revision: 40,
            at_ns: (at_s * S as f64) as Nanos,
        }
    }

    #[test]
    fn a_key_gone_after_the_last_renewal_plus_ttl_passes() {
        // Granted at 0 s (TTL 3), renewed at 1 s and 2 s, abandoned: gone at 5.4 s.
        let answers = [answer(7, 0.0, 3), answer(7, 1.0, 3), answer(7, 2.0, 3)];
        assert!(check(&answers, &[], &[deleted(7, 5.4)]).is_empty());
        // Exactly at the promise is not early.
        assert!(check(&answers, &[], &[deleted(7, 5.0)]).is_empty());
    }

    #[test]
    fn a_key_gone_before_the_last_renewal_plus_ttl_is_flagged_with_how_early() {
        // The planted bug: renewals did not move the deadline, the key went at grant + 3.5 s.
        let answers = [answer(7, 0.0, 3), answer(7, 1.0, 3), answer(7, 2.0, 3)];
        let found = check(&answers, &[], &[deleted(7, 3.5), deleted(7, 3.6)]);
        assert_eq!(found.len(), 1, "one anomaly per lease: {found:?}");
        let e = &found[0];
        assert_eq!((e.lease, e.key.as_str(), e.revision), (7, "drill/primary", 40));
        assert!((e.early_ms - 1_500.0).abs() < 0.01, "{e:?}");
        assert!((e.promised_until_ms - 5_000.0).abs() < 0.01, "{e:?}");
    }

    #[test]
    fn a_renewal_answered_after_the_key_was_gone_counts_as_a_broken_promise() {
        // The key went at 3.2 s, yet a keep-alive answered at 3.3 s promised 3 more seconds.
        let answers = [answer(7, 0.0, 3), answer(7, 3.3, 3)];
        let found = check(&answers, &[], &[deleted(7, 3.2)]);
        assert_eq!(found.len(), 1);
        assert!((found[0].early_ms - 3_100.0).abs() < 0.01);
    }

    #[test]
    fn not_found_answers_promise_nothing() {
        let answers = [answer(7, 0.0, 3), answer(7, 2.9, 0)];
        assert!(check(&answers, &[], &[deleted(7, 3.1)]).is_empty());
        assert_eq!(check(&answers, &[], &[deleted(7, 2.95)]).len(), 1);
    }

    #[test]
    fn deletions_after_a_revoke_was_invoked_are_the_clients_own() {
        let answers = [answer(7, 0.0, 3), answer(7, 1.0, 3)];
        let revoke = [Revoke { client: 1, lease: 7, invoke_ns: S + S / 2 }];
        assert!(check(&answers, &revoke, &[deleted(7, 1.6)]).is_empty());
        // Seen before the revoke was even sent: not the revoke's doing.
        assert_eq!(check(&answers, &revoke, &[deleted(7, 1.4)]).len(), 1);
    }

    #[test]
    fn leases_nobody_was_promised_and_other_leases_are_not_confused() {
        // Lease 8 was never answered (unknown grant): nothing to hold it to.
        assert!(check(&[answer(7, 0.0, 3)], &[], &[deleted(8, 0.5)]).is_empty());
        let answers = [answer(7, 0.0, 3), answer(8, 0.0, 10)];
        let found = check(&answers, &[], &[deleted(7, 3.1), deleted(8, 3.1)]);
        assert_eq!(found.iter().map(|e| e.lease).collect::<Vec<_>>(), vec![8]);
    }
}
