//! `GET /v1/member/timeline`: this member's flight recorder (`quorate_consensus::flight`), the
//! events `quorate ctl timeline` merges across the cluster (schema in docs/ctl.md).
//!
//! `since_unix_ms=<ms>` (on this member's clock) or `since=<duration>` (`90s`, `10m`, `2h`:
//! back from now) keeps the newer events only. The ring is read off the runtime's threads.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use crate::http::HttpState;

/// A duration as `ctl` writes them: a number and `ms`, `s`, `m` or `h` (bare: seconds).
fn parse_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let n: f64 = s[..split].parse().ok()?;
    let unit_ms = match &s[split..] {
        "ms" => 1.0,
        "" | "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return None,
    };
    Some((n * unit_ms) as i64)
}

pub async fn member_timeline(
    State(s): State<Arc<HttpState>>,
    Query(q): Query<HashMap<String, String>>,
) -> impl IntoResponse {
    let now = quorate_consensus::flight::unix_ms();
    let since = match (q.get("since_unix_ms"), q.get("since")) {
        (Some(ms), _) => match ms.parse::<i64>() {
            Ok(ms) => Some(ms),
            Err(_) => return bad("since_unix_ms must be milliseconds since the Unix epoch"),
        },
        (None, Some(d)) => match parse_ms(d) {
            Some(back) => Some(now - back),
            None => return bad("since must be a duration such as 90s, 10m or 2h"),
        },
        (None, None) => None,
    };
    let recorder = s.member().flight().clone();
    let read = tokio::task::spawn_blocking(move || recorder.read(since)).await;
    let records = match read {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": e.to_string()}))),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": e.to_string()}))),
    };
    let events: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).expect("records serialize");
            v["text"] = json!(r.event.text());
            v
        })
        .collect();
    let wall_clock_unix_ms = quorate_consensus::flight::unix_ms();
    (
        StatusCode::OK,
        Json(json!({
            "id": format!("{:x}", s.member().id()),
            "term": s.member().term(),
            "events": events,
            "dropped_events": s.member().flight().dropped().get(),
            "wall_clock_unix_ms": wall_clock_unix_ms,
        })),
    )
}

fn bad(msg: &str) -> (StatusCode, Json<serde_json::Value>) {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": msg })))
}

#[cfg(test)]
mod tests {
    use super::parse_ms;

    #[test]
    fn since_takes_the_durations_ctl_writes() {
        assert_eq!(parse_ms("10m"), Some(600_000));
        assert_eq!(parse_ms("90s"), Some(90_000));
        assert_eq!(parse_ms("250ms"), Some(250));
        assert_eq!(parse_ms("2h"), Some(7_200_000));
        assert_eq!(parse_ms("5"), Some(5_000));
        assert_eq!(parse_ms("5d"), None);
    }
}
