//! Durations as Consul reads them: Go's `time.ParseDuration`, exactly.
//!
//! Every duration an HTTP client sends (a blocking query's `wait`, a check's `TTL`,
//! `Interval`, `Timeout`, `DeregisterCriticalServiceAfter`, a session's `TTL` and
//! `LockDelay`) goes through [`parse_go_duration`], so what Consul accepts, quorate accepts:
//! an optional sign, then one or more `<number><unit>` with decimal fractions (`9.98s`,
//! `1h2m3.5s`, `.5s`), units `ns us µs μs ms s m h`, and `0` alone. A value Go would refuse
//! (no unit, an unknown unit, more than about 2562047h) is an error, never a panic: the
//! arithmetic is Go's, on 64-bit nanoseconds with every overflow checked.
//!
//! This module owns parsing only; what range a field allows is decided where it is used.

use std::fmt;
use std::time::Duration;

/// Why a string is not a Go duration. The message is Go's own (clients print it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurationError(String);

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DurationError {}

/// Go's `1 << 63`: the magnitude of the most negative duration.
const MAGNITUDE_MAX: u64 = 1 << 63;

fn unit_ns(unit: &str) -> Option<u64> {
    Some(match unit {
        "ns" => 1,
        "us" | "µs" | "μs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    })
}

/// Parse `s` with Go's grammar `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+` (or `0`), returning signed
/// nanoseconds as Go's `time.Duration` holds them.
pub fn parse_go_duration(s: &str) -> Result<i64, DurationError> {
    let invalid = || DurationError(format!("time: invalid duration {s:?}"));
    let mut rest = s;
    let mut negative = false;
    if let Some(c) = rest.chars().next() {
        if c == '-' || c == '+' {
            negative = c == '-';
            rest = &rest[1..];
        }
    }
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        if !rest.starts_with(|c: char| c == '.' || c.is_ascii_digit()) {
            return Err(invalid());
        }
        // The whole part: [0-9]*, refusing anything beyond 1<<63.
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let mut whole: u64 = 0;
        for b in rest[..digits].bytes() {
            whole = whole.checked_mul(10).and_then(|w| w.checked_add(u64::from(b - b'0'))).ok_or_else(invalid)?;
            if whole > MAGNITUDE_MAX {
                return Err(invalid());
            }
        }
        let had_whole = digits > 0;
        rest = &rest[digits..];
        // The fraction: (\.[0-9]*)?, keeping as many digits as fit (Go stops accumulating
        // precision rather than failing).
        let (mut fraction, mut scale, mut had_fraction) = (0u64, 1f64, false);
        if let Some(after_dot) = rest.strip_prefix('.') {
            let digits = after_dot.find(|c: char| !c.is_ascii_digit()).unwrap_or(after_dot.len());
            had_fraction = digits > 0;
            let mut overflowed = false;
            for b in after_dot[..digits].bytes() {
                if overflowed {
                    continue;
                }
                match fraction.checked_mul(10).and_then(|f| f.checked_add(u64::from(b - b'0'))) {
                    Some(next) if next <= MAGNITUDE_MAX => {
                        fraction = next;
                        scale *= 10.0;
                    }
                    _ => overflowed = true,
                }
            }
            rest = &after_dot[digits..];
        }
        if !had_whole && !had_fraction {
            return Err(invalid());
        }
        let unit_len = rest.find(|c: char| c == '.' || c.is_ascii_digit()).unwrap_or(rest.len());
        if unit_len == 0 {
            return Err(DurationError(format!("time: missing unit in duration {s:?}")));
        }
        let unit_name = &rest[..unit_len];
        let unit = unit_ns(unit_name)
            .ok_or_else(|| DurationError(format!("time: unknown unit {unit_name:?} in duration {s:?}")))?;
        rest = &rest[unit_len..];
        if whole > MAGNITUDE_MAX / unit {
            return Err(invalid());
        }
        let mut part = whole * unit;
        if fraction > 0 {
            // As Go: f64 is precise enough for a fraction of the largest unit (3.6e12 ns).
            let extra = (fraction as f64 * (unit as f64 / scale)) as u64;
            part = part.checked_add(extra).filter(|p| *p <= MAGNITUDE_MAX).ok_or_else(invalid)?;
        }
        total = total.checked_add(part).filter(|t| *t <= MAGNITUDE_MAX).ok_or_else(invalid)?;
    }
    if negative {
        // -(1<<63) is Go's smallest duration; every other magnitude fits too.
        return Ok((total as i64).wrapping_neg());
    }
    i64::try_from(total).map_err(|_| invalid())
}

/// A duration that must not be negative (a TTL, an interval, a wait), as a `Duration`.
pub fn parse_non_negative(s: &str) -> Result<Duration, DurationError> {
    let ns = parse_go_duration(s)?;
    u64::try_from(ns)
        .map(Duration::from_nanos)
        .map_err(|_| DurationError(format!("negative duration {s:?} is not allowed here")))
}

/// Whole seconds, rounded up, for the parts of quorate that count TTLs in seconds.
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: i64 = 1;
    const US: i64 = 1_000;
    const MS: i64 = 1_000_000;
    const S: i64 = 1_000_000_000;
    const M: i64 = 60 * S;
    const H: i64 = 60 * M;

    /// Go's own table (`time/time_test.go`, `parseDurationTests`), plus Consul's cases.
    #[test]
    fn accepts_what_go_accepts() {
        let table: &[(&str, i64)] = &[
            ("0", 0),
            ("5s", 5 * S),
            ("30s", 30 * S),
            ("1478s", 1478 * S),
            ("-5s", -5 * S),
            ("+5s", 5 * S),
            ("-0", 0),
            ("+0", 0),
            ("5.0s", 5 * S),
            ("5.6s", 5 * S + 600 * MS),
            ("5.s", 5 * S),
            (".5s", 500 * MS),
            ("1.0s", S),
            ("1.00s", S),
            ("1.004s", S + 4 * MS),
            ("1.0040s", S + 4 * MS),
            ("100.00100s", 100 * S + MS),
            ("10ns", 10 * NS),
            ("11us", 11 * US),
            ("12µs", 12 * US),
            ("12μs", 12 * US),
            ("13ms", 13 * MS),
            ("14s", 14 * S),
            ("15m", 15 * M),
            ("16h", 16 * H),
            ("3h30m", 3 * H + 30 * M),
            ("10.5s4m", 4 * M + 10 * S + 500 * MS),
            ("-2m3.4s", -(2 * M + 3 * S + 400 * MS)),
            ("1h2m3s4ms5us6ns", H + 2 * M + 3 * S + 4 * MS + 5 * US + 6 * NS),
            ("39h9m14.425s", 39 * H + 9 * M + 14 * S + 425 * MS),
            ("52763797000ns", 52763797000 * NS),
            ("0.3333333333333333333h", 20 * M),
            ("9007199254740993ns", (1 << 53) + 1),
            ("9223372036854775807ns", i64::MAX),
            ("9223372036854775.807us", i64::MAX),
            ("9223372036s854ms775us807ns", i64::MAX),
            ("-9223372036854775808ns", i64::MIN),
            ("-9223372036854775.808us", i64::MIN),
            ("-2562047h47m16.854775808s", i64::MIN),
            ("0.100000000000000000000h", 6 * M),
            ("0.830103483285477580700h", 49 * M + 48 * S + 372_539_827 * NS),
            // What Consul clients send.
            ("9.98s", 9 * S + 980 * MS),
            ("1h2m3.5s", H + 2 * M + 3 * S + 500 * MS),
            ("10s", 10 * S),
            ("24h", 24 * H),
            ("2562047h", 2_562_047 * H),
        ];
        for (input, want) in table {
            assert_eq!(parse_go_duration(input), Ok(*want), "{input:?}");
        }
    }

    #[test]
    fn refuses_what_go_refuses_without_panicking() {
        for input in [
            "",
            "3",
            "-",
            "s",
            ".",
            "-.",
            ".s",
            "+.s",
            "1d",
            "\u{85}\u{85}",
            "hello \u{ff}ff world",
            " 5s",
            "5s ",
            "5 s",
            "5S",
            "9223372036854775808ns",
            "9223372036854775.808us",
            "9223372036854ms775us808ns",
            "9223372036s854ms775us808ns",
            "-9223372036854775809ns",
            "99999999999999999999h",
            "99999999999999999999999999999999999999s",
            "2562048h",
            "2562047h48m",
            "1h1h1h1h1h1h1h1h1h1h99999999999999h",
            "5s-3s",
            "5s.",
            "..5s",
        ] {
            assert!(parse_go_duration(input).is_err(), "{input:?} should be refused");
        }
    }

    #[test]
    fn error_messages_are_gos() {
        assert_eq!(parse_go_duration("3").unwrap_err().to_string(), r#"time: missing unit in duration "3""#);
        assert_eq!(parse_go_duration("1d").unwrap_err().to_string(), r#"time: unknown unit "d" in duration "1d""#);
        assert_eq!(
            parse_go_duration("99999999999999999999h").unwrap_err().to_string(),
            r#"time: invalid duration "99999999999999999999h""#
        );
    }

    #[test]
    fn non_negative_durations_and_rounding() {
        assert_eq!(parse_non_negative("9.98s"), Ok(Duration::from_millis(9980)));
        assert_eq!(parse_non_negative("0"), Ok(Duration::ZERO));
        assert!(parse_non_negative("-1s").is_err());
        assert_eq!(ceil_secs(Duration::from_millis(9980)), 10);
        assert_eq!(ceil_secs(Duration::from_secs(10)), 10);
        assert_eq!(ceil_secs(Duration::from_nanos(1)), 1);
        assert_eq!(ceil_secs(Duration::ZERO), 0);
    }

    /// Arbitrary short strings over the grammar's alphabet: never a panic, and whatever
    /// parses is within Go's range (checked by the types).
    #[test]
    fn never_panics_on_any_mix_of_the_alphabet() {
        let alphabet: Vec<char> = "0123456789.+-nsuµmh9".chars().collect();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 24) as usize;
            let s: String =
                (0..len).map(|i| alphabet[((seed >> (i % 48)) as usize + i * 7) % alphabet.len()]).collect();
            let _ = parse_go_duration(&s);
        }
    }
}
