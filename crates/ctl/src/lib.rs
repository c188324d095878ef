//! `quorate ctl`: the operator's commands. `status` collects every member's view (etcd's
//! Maintenance API plus each member's `/v1/member/status`) side by side; `doctor` judges the
//! same data with a pure function (`judge`) and prints the findings with their runbook steps.
//!
//! Collecting is the only IO here (`collect`); judging and rendering are pure, so every finding
//! is table-tested on hand-built views.

pub mod audit;
pub mod collect;
pub mod isolate;
pub mod judge;
pub mod recover;
pub mod render;
pub mod timeline;
pub mod verify;

use std::time::Duration;

pub use collect::{ClusterView, MemberView};
pub use judge::{judge, Finding, Report, Severity, Thresholds, Verdict};

/// etcdctl's global flags.
#[derive(Clone, Debug)]
pub struct Options {
    /// Client addresses (`host:port` or URLs).
    pub endpoints: Vec<String>,
    pub json: bool,
    pub dial_timeout: Duration,
    pub command_timeout: Duration,
    /// TLS toward `https://` endpoints and HTTP ports (`--cacert`, `--cert`, `--key`).
    pub tls: Option<ClientTls>,
    /// With auth on (`--user`): the token from `login`, sent with every gRPC call and as a bearer
    /// token to the HTTP ports.
    pub token: Option<String>,
}

/// etcd's `Authenticate` at the first endpoint that answers: a token every member accepts.
/// `None` when auth is off (etcdctl carries on then too).
pub async fn login(opts: &Options, name: &str, password: &str) -> anyhow::Result<Option<String>> {
    let mut errors = Vec::new();
    for e in &opts.endpoints {
        let attempt = async {
            let ch = collect::bounded(opts.dial_timeout, collect::dial(e, opts)).await?;
            let mut auth = quorate_api_grpc::pb::etcdserverpb::auth_client::AuthClient::new(ch);
            let req = quorate_api_grpc::pb::etcdserverpb::AuthenticateRequest {
                name: name.to_string(),
                password: password.to_string(),
            };
            match tokio::time::timeout(opts.command_timeout, auth.authenticate(req)).await {
                Ok(Ok(r)) => anyhow::Ok(Some(r.into_inner().token)),
                Ok(Err(s)) if s.message() == "etcdserver: authentication is not enabled" => Ok(None),
                Ok(Err(s)) => Err(anyhow::anyhow!("{}", s.message())),
                Err(_) => Err(anyhow::anyhow!("timed out after {:?}", opts.command_timeout)),
            }
        };
        match attempt.await {
            Ok(token) => return Ok(token),
            Err(err) => errors.push(format!("{e}: {err}")),
        }
    }
    anyhow::bail!("--user {name}: could not log in: {}", errors.join("; "))
}

/// One CA and client certificate, for gRPC (ALPN `h2`) and for the HTTP port (`http/1.1`).
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub grpc: std::sync::Arc<quorate_tls::Connector>,
    pub http: std::sync::Arc<quorate_tls::Connector>,
}

impl ClientTls {
    /// etcdctl's `--cacert`, `--cert`, `--key`: `None` when none is given.
    pub fn from_flags(
        cacert: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> anyhow::Result<Option<ClientTls>> {
        let (ca, identity) = match (cacert, cert, key) {
            (None, None, None) => return Ok(None),
            (None, _, _) => anyhow::bail!("--cert and --key need --cacert"),
            (Some(ca), Some(cert), Some(key)) => (ca, Some((cert, key))),
            (Some(ca), None, None) => (ca, None),
            _ => anyhow::bail!("--cert and --key go together"),
        };
        let files = quorate_tls::Files {
            cert: identity.map(|(c, _)| c.to_path_buf()).unwrap_or_default(),
            key: identity.map(|(_, k)| k.to_path_buf()).unwrap_or_default(),
            ca: Some(ca.to_path_buf()),
            flags: ["--cert", "--key", "--cacert"],
        };
        let build = |alpn: &[&[u8]]| quorate_tls::Connector::build(files.clone(), identity.is_some(), alpn);
        Ok(Some(ClientTls { grpc: build(&[b"h2"])?, http: build(&[b"http/1.1"])? }))
    }
}

/// Print `value` as `-w json` asks, or as `text` renders it.
fn emit<T: serde::Serialize>(opts: &Options, value: &T, text: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
    if opts.json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", text(value));
    }
    Ok(())
}

/// `quorate ctl status`: prints the view; exit 0 when at least one member answered, else 1.
pub async fn status(opts: &Options) -> anyhow::Result<i32> {
    let view = collect::collect(opts).await;
    emit(opts, &view, render::status_table)?;
    Ok(if view.members.iter().any(|m| m.reachable) { 0 } else { 1 })
}

/// `quorate ctl audit`: prints the audit; exit 0 when the registry agrees with what answers
/// and every member holds the same registry, 1 otherwise.
///
/// With `repair`, the repairs the audit calls for are planned (and printed); with `yes` as well,
/// the leader carries them out, and the exit code is 0 only when every one was done.
pub async fn audit(opts: &Options, a: &audit::AuditOptions, repair: bool, yes: bool) -> anyhow::Result<i32> {
    let mut report = audit::audit(opts, a).await?;
    let mut code = if report.clean() { 0 } else { 1 };
    if repair {
        let mut plan = audit::plan_repairs(&report);
        if yes {
            audit::apply_repairs(opts, &mut plan, a.health_path.as_deref()).await?;
            code = if plan.complete() { 0 } else { 1 };
        }
        report.repair = Some(plan);
    }
    emit(opts, &report, audit::render)?;
    Ok(code)
}

/// `quorate ctl recover`: prints the survivors and the plan (and, with `--apply`, what each
/// survivor did); exit 0 for a plan or a recovery done, 1 when refused or failed.
pub async fn recover(opts: &Options, r: &recover::RecoverOptions) -> anyhow::Result<i32> {
    let report = recover::recover(opts, r).await;
    emit(opts, &report, recover::render)?;
    Ok(report.exit_code())
}

/// `quorate ctl verify`: prints each check; exit 0 only when every one passed.
pub async fn verify(opts: &Options, v: &verify::VerifyOptions) -> anyhow::Result<i32> {
    let report = verify::verify(opts, v).await;
    emit(opts, &report, verify::render)?;
    Ok(if report.fit { 0 } else { 1 })
}

/// `quorate ctl doctor`: prints the verdict and the findings; the exit code is the verdict's
/// (0 healthy, 1 degraded, 2 critical).
pub async fn doctor(opts: &Options) -> anyhow::Result<i32> {
    let view = collect::collect(opts).await;
    let report = judge(&view, &Thresholds::default());
    emit(opts, &report, render::doctor_text)?;
    Ok(report.verdict.exit_code())
}

/// `quorate ctl timeline`: every member's flight recorder, merged; exit 0 when at least one
/// member's events were read, else 1.
pub async fn timeline(opts: &Options, t: &timeline::TimelineOptions) -> anyhow::Result<i32> {
    let tl = timeline::gather(opts, t).await;
    emit(opts, &tl, timeline::render_table)?;
    Ok(if tl.members.iter().any(|m| m.reachable) { 0 } else { 1 })
}

/// Parses a duration as etcdctl writes them: `2s`, `500ms`, `1m`, or bare seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (use ms, s or m)")),
    };
    seconds(secs).map_err(|e| format!("bad duration {s:?}: {e}"))
}

/// A number of seconds as a `Duration`: finite, not negative, and at most 100 years.
pub fn seconds(secs: f64) -> Result<Duration, String> {
    const MAX_S: f64 = 100.0 * 365.0 * 86_400.0;
    if !secs.is_finite() || secs < 0.0 {
        return Err("must be a finite, non-negative number".into());
    }
    if secs > MAX_S {
        return Err("longer than 100 years".into());
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_parse_as_etcdctl_writes_them() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("2h").is_err());
        for bad in ["-1s", "infs", "NaNs", "99999999999999999999999", "1e300ms"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_duration("x").is_err());
    }
}
