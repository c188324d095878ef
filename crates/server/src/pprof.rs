//! `--enable-pprof`: CPU profiles of a running member, where etcd serves Go's (`/debug/pprof`
//! on the client URLs, and here on `--listen-http` too).
//!
//! `GET /debug/pprof/profile?seconds=N` samples every thread for N seconds and answers with a
//! gzipped pprof protobuf, as Go's net/http/pprof does, so `go tool pprof` reads it;
//! `&format=svg` (or `GET /debug/pprof/flamegraph?seconds=N`) answers with a flamegraph.
//!
//! Sampling is pprof-rs: a SIGPROF timer (`setitimer(ITIMER_PROF)`, 100 Hz of CPU time) and
//! a backtrace taken in the signal handler into preallocated buckets. Why that is safe beside
//! our threads: the handler does not allocate and takes no lock it could wait on (a spin
//! try-lock, giving up the sample); it is installed with SA_RESTART, and the runtime, the log
//! writer and std's I/O retry what a signal interrupts (EINTR); a sample that lands in libc,
//! libgcc, pthread or the vDSO is dropped (the blocklist), because libgcc's unwinder is not
//! signal-safe there (an unwind under way, a loader lock held). The timer runs only while a
//! profile is being taken, so a member with `--enable-pprof` costs nothing until asked.
//! Symbolising a profile reads the binary's debug information (about a second and 300 MB for
//! a debug build); the cache is emptied after each profile.
//!
//! This module never profiles unless the flag is on, and takes one profile at a time (a
//! second request gets 409 while one runs, as the profiler is process-wide).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

/// Longest profile one request may ask for, in seconds (Go's default is 30).
pub const PROFILE_SECONDS_MAX: u64 = 60;
/// What a request without `seconds` gets, as Go's handler.
const PROFILE_SECONDS_DEFAULT: u64 = 30;
/// Samples per second of CPU time (Go's rate).
const SAMPLE_HZ: i32 = 100;
/// Where a sample is dropped rather than unwound (see the module comment).
const BLOCKLIST: [&str; 4] = ["libc", "libgcc", "pthread", "vdso"];

/// Whether profiling is on, and whether a profile is being taken now.
pub struct Profiling {
    enabled: bool,
    busy: Arc<AtomicBool>,
    /// Shown in the flamegraph's title.
    member_name: String,
}

impl Profiling {
    pub fn new(enabled: bool, member_name: &str) -> Self {
        Profiling { enabled, busy: Arc::new(AtomicBool::new(false)), member_name: member_name.to_string() }
    }
}

/// `/debug/pprof/profile` and `/debug/pprof/flamegraph`; merged into the client URLs' and
/// `--listen-http`'s routers.
pub fn router(profiling: Arc<Profiling>) -> Router {
    Router::new()
        .route("/debug/pprof/profile", get(profile))
        .route("/debug/pprof/flamegraph", get(flamegraph))
        .with_state(profiling)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// Gzipped pprof protobuf.
    Pprof,
    /// Flamegraph SVG.
    Svg,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Pprof => "pprof",
            Format::Svg => "svg",
        }
    }
}

async fn profile(State(p): State<Arc<Profiling>>, RawQuery(q): RawQuery) -> Response {
    take(p, q.as_deref().unwrap_or(""), Format::Pprof).await
}

async fn flamegraph(State(p): State<Arc<Profiling>>, RawQuery(q): RawQuery) -> Response {
    take(p, q.as_deref().unwrap_or(""), Format::Svg).await
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// `seconds` and `format` from a query string; an error message for a 400 otherwise.
fn parse_query(query: &str, default_format: Format) -> Result<(u64, Format), String> {
    let mut seconds = PROFILE_SECONDS_DEFAULT;
    let mut format = default_format;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "seconds" => {
                seconds =
                    value.parse::<u64>().ok().filter(|s| (1..=PROFILE_SECONDS_MAX).contains(s)).ok_or_else(|| {
                        format!("seconds must be a whole number from 1 to {PROFILE_SECONDS_MAX}, not {value:?}")
                    })?
            }
            "format" => {
                format = match value {
                    "pprof" | "proto" => Format::Pprof,
                    "svg" | "flamegraph" => Format::Svg,
                    other => return Err(format!("format must be pprof or svg, not {other:?}")),
                }
            }
            // Go's handler ignores what it does not know (e.g. `debug`); so do we.
            _ => {}
        }
    }
    Ok((seconds, format))
}

/// Clears the busy flag when the profile is done, also when the request is dropped midway.
struct Busy(Arc<AtomicBool>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

async fn take(p: Arc<Profiling>, query: &str, default_format: Format) -> Response {
    if !p.enabled {
        return error(
            StatusCode::NOT_FOUND,
            "profiling is off on this member: start it with --enable-pprof to serve /debug/pprof".into(),
        );
    }
    let (seconds, format) = match parse_query(query, default_format) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if p.busy.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_err() {
        return error(
            StatusCode::CONFLICT,
            format!("a CPU profile is already being taken on this member; retry when it ends (at most {PROFILE_SECONDS_MAX} s)"),
        );
    }
    let busy = Busy(p.busy.clone());
    tracing::info!(seconds, format = format.name(), "CPU profile started");
    // Starting resolves a first backtrace and lists the loaded libraries: blocking work.
    let guard = match tokio::task::spawn_blocking(|| {
        pprof::ProfilerGuardBuilder::default().frequency(SAMPLE_HZ).blocklist(&BLOCKLIST).build()
    })
    .await
    {
        Ok(Ok(g)) => g,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot start the profiler: {e}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot start the profiler: {e}")),
    };
    // Dropping this future (the client went away) drops the guard: sampling stops.
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let title = format!("quorate {} CPU, {seconds} s", p.member_name);
    // Symbolising the samples reads the binary's debug information: blocking work. The guard
    // and the busy flag go with it, so the next profile waits until this one is really done.
    let built = tokio::task::spawn_blocking(move || {
        let _busy = busy;
        let report = guard.report().build().map_err(|e| e.to_string())?;
        drop(guard);
        let samples: isize = report.data.values().sum();
        let body = match format {
            Format::Pprof => encode_pprof(&report),
            Format::Svg => encode_svg(&report, &title),
        };
        // Symbolising parsed the binary's debug information into a process-wide cache: about
        // 300 MB of a debug build, which would otherwise stay for good.
        drop(report);
        backtrace::clear_symbol_cache();
        Ok::<_, String>((samples, body?))
    })
    .await;
    match built {
        Ok(Ok((samples, body))) => {
            tracing::info!(seconds, format = format.name(), samples, bytes = body.len(), "CPU profile taken");
            let headers = match format {
                Format::Pprof => [
                    ("content-type", "application/octet-stream"),
                    ("content-disposition", "attachment; filename=\"profile\""),
                ],
                Format::Svg => [("content-type", "image/svg+xml"), ("content-disposition", "inline")],
            };
            (StatusCode::OK, headers, body).into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot build the profile: {e}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot build the profile: {e}")),
    }
}

/// The profile as Go serves it: pprof's protobuf, gzipped.
fn encode_pprof(report: &pprof::Report) -> Result<Vec<u8>, String> {
    use pprof::protos::Message;
    use std::io::Write;
    let profile = report.pprof().map_err(|e| e.to_string())?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&profile.encode_to_vec()).map_err(|e| e.to_string())?;
    gz.finish().map_err(|e| e.to_string())
}

fn encode_svg(report: &pprof::Report, title: &str) -> Result<Vec<u8>, String> {
    if report.data.is_empty() {
        // inferno refuses an empty graph; an idle member can give one.
        return Ok(format!(
            "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"600\" height=\"40\"><text x=\"10\" y=\"25\">{title}: no samples (the member used no CPU)</text></svg>\n"
        )
        .into_bytes());
    }
    let mut options = pprof::flamegraph::Options::default();
    options.title = title.to_string();
    let mut svg = Vec::new();
    report.flamegraph_with_options(&mut svg, &mut options).map_err(|e| e.to_string())?;
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_bounded_and_formats_are_named() {
        let table = [
            ("", Some((30, Format::Pprof))),
            ("seconds=5", Some((5, Format::Pprof))),
            ("seconds=1", Some((1, Format::Pprof))),
            ("seconds=60&format=svg", Some((60, Format::Svg))),
            ("format=proto&debug=1", Some((30, Format::Pprof))),
            ("seconds=0", None),
            ("seconds=61", None),
            ("seconds=-1", None),
            ("seconds=abc", None),
            ("format=png", None),
        ];
        for (query, want) in table {
            assert_eq!(parse_query(query, Format::Pprof).ok(), want, "query {query:?}");
        }
        assert_eq!(parse_query("", Format::Svg), Ok((30, Format::Svg)));
    }
}
