//! Active health checks: what a check is, what one probe result means, and the hysteresis that
//! turns probe results into a status. A probe that would make an instance critical must be
//! confirmed from a second vantage point (another member) when one is reachable, so one
//! member's network trouble never takes a healthy fleet down. Pure: the prober feeds results.

use serde::{Deserialize, Serialize};

use crate::{Health, RegistryError};

/// An HTTP (`GET`, 2xx passing, 429 warning, else critical) or TCP (connect) check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    #[serde(default = "default_interval_s")]
    pub interval_s: u64,
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    #[serde(default = "default_failures")]
    pub failures_before_critical: u32,
    #[serde(default = "default_successes")]
    pub successes_before_passing: u32,
    /// Deregister the instance once it has been critical this long (Consul's
    /// `DeregisterCriticalServiceAfter`); never when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deregister_critical_after_s: Option<u64>,
}

fn default_interval_s() -> u64 {
    10
}
fn default_timeout_s() -> u64 {
    2
}
fn default_failures() -> u32 {
    3
}
fn default_successes() -> u32 {
    1
}

impl CheckSpec {
    pub fn validated(self) -> Result<CheckSpec, RegistryError> {
        let bad = |m: &str| Err(RegistryError::InvalidCheck(m.into()));
        // The target goes into a request line and a Host header as it is: visible ASCII only
        // (no space, no CR or LF that would let a registry user write other requests).
        let visible = |t: &str| t.bytes().all(|b| (0x21..=0x7e).contains(&b));
        if !self.http.iter().chain(&self.tcp).all(|t| visible(t)) {
            return bad("the check's target must be visible ASCII, without spaces or control characters");
        }
        match (&self.http, &self.tcp) {
            (Some(url), None) => {
                if !url.starts_with("http://") || url.len() <= "http://".len() {
                    return bad("http must be an http:// URL");
                }
            }
            (None, Some(addr)) => {
                if !addr.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) {
                    return bad("tcp must be host:port");
                }
            }
            _ => return bad("exactly one of http and tcp"),
        }
        if self.interval_s == 0 || self.interval_s > 3600 {
            return bad("interval_s must be 1..=3600");
        }
        if self.timeout_s == 0 || self.timeout_s > self.interval_s {
            return bad("timeout_s must be 1..=interval_s");
        }
        if self.failures_before_critical == 0 || self.successes_before_passing == 0 {
            return bad("failures_before_critical and successes_before_passing must be at least 1");
        }
        Ok(self)
    }
}

/// What an HTTP status means for a check.
pub fn http_outcome(status: u16) -> Health {
    match status {
        200..=299 => Health::Passing,
        429 => Health::Warning,
        _ => Health::Critical,
    }
}

/// Consecutive probe results so far (kept by the leader, in memory).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckState {
    pub failures: u32,
    pub successes: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Stay,
    Become(Health),
    /// The instance would become critical: confirm from another member first.
    Confirm,
}

/// Feed one probe result for an instance whose recorded health is `current`.
pub fn step(current: Health, st: &mut CheckState, outcome: Health, spec: &CheckSpec) -> Step {
    match outcome {
        Health::Critical => {
            st.successes = 0;
            st.failures += 1;
            if current != Health::Critical && st.failures >= spec.failures_before_critical {
                Step::Confirm
            } else {
                Step::Stay
            }
        }
        ok => {
            st.failures = 0;
            st.successes += 1;
            match current {
                Health::Critical if st.successes >= spec.successes_before_passing => Step::Become(ok),
                Health::Critical => Step::Stay,
                c if c != ok => Step::Become(ok),
                _ => Step::Stay,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(f: u32, s: u32) -> CheckSpec {
        CheckSpec {
            http: Some("http://a:1/h".into()),
            tcp: None,
            interval_s: 1,
            timeout_s: 1,
            failures_before_critical: f,
            successes_before_passing: s,
            deregister_critical_after_s: None,
        }
    }

    #[test]
    fn hysteresis_table() {
        use Health::*;
        // (recorded health, probe results) -> the step after each result
        let cases: Vec<(Health, Vec<Health>, Vec<Step>)> = vec![
            (Passing, vec![Critical, Critical, Critical], vec![Step::Stay, Step::Stay, Step::Confirm]),
            (
                Passing,
                vec![Critical, Passing, Critical, Critical],
                vec![Step::Stay, Step::Stay, Step::Stay, Step::Stay],
            ),
            (Critical, vec![Passing, Passing], vec![Step::Stay, Step::Become(Passing)]),
            (Critical, vec![Passing, Critical, Passing], vec![Step::Stay, Step::Stay, Step::Stay]),
            (Passing, vec![Warning], vec![Step::Become(Warning)]),
            (Warning, vec![Passing], vec![Step::Become(Passing)]),
            (Critical, vec![Warning, Warning], vec![Step::Stay, Step::Become(Warning)]),
            (Critical, vec![Critical, Critical, Critical], vec![Step::Stay, Step::Stay, Step::Stay]),
        ];
        for (current, results, expected) in cases {
            let mut st = CheckState::default();
            let got: Vec<Step> = results.iter().map(|r| step(current, &mut st, *r, &spec(3, 2))).collect();
            assert_eq!(got, expected, "{current:?} then {results:?}");
        }
    }

    #[test]
    fn a_check_target_cannot_carry_another_request() {
        for bad in ["http://a:1/h HTTP/1.1\r\nX: y", "http://a:1/h\nGET /", "http://a b:1/h"] {
            let c = CheckSpec { http: Some(bad.into()), ..spec(3, 1) };
            assert!(c.validated().is_err(), "{bad:?}");
        }
        let tcp = CheckSpec { http: None, tcp: Some("a\r\n:80".into()), ..spec(3, 1) };
        assert!(tcp.validated().is_err());
    }

    #[test]
    fn checks_are_validated() {
        assert!(spec(3, 1).validated().is_ok());
        let tcp = CheckSpec { http: None, tcp: Some("10.0.0.1:80".into()), ..spec(3, 1) };
        assert!(tcp.validated().is_ok());
        for bad in [
            CheckSpec { http: None, ..spec(3, 1) },
            CheckSpec { tcp: Some("a:1".into()), ..spec(3, 1) },
            CheckSpec { http: Some("https://x".into()), ..spec(3, 1) },
            CheckSpec { http: None, tcp: Some("nope".into()), ..spec(3, 1) },
            CheckSpec { interval_s: 0, ..spec(3, 1) },
            CheckSpec { timeout_s: 5, interval_s: 2, ..spec(3, 1) },
            spec(0, 1),
        ] {
            assert_eq!(bad.clone().validated().unwrap_err().code(), "invalid_check", "{bad:?}");
        }
        assert_eq!(http_outcome(204), Health::Passing);
        assert_eq!(http_outcome(429), Health::Warning);
        assert_eq!(http_outcome(503), Health::Critical);
    }
}
