//! The binary's log output: which lines (`--log-level`, or a `QUORATE_LOG` filter), how they
//! look (`--log-format text|json`), and what lines about consensus carry beyond their own
//! fields: the member (name and id) and its term, commit index and applied index, read from
//! `quorate_server::log_context` for every event whose target is openraft or
//! quorate_consensus. Writes to stderr; never blocks on the member.

use std::fmt::{self, Write as _};

use clap::ValueEnum;
use quorate_server::log_context::{self, ConsensusContext};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The environment variable holding a filter in tracing's syntax (`info,quorate_consensus=debug`).
pub const FILTER_ENV: &str = "QUORATE_LOG";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line per event: time, level, [consensus context,] target, message, fields.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The filter to log with, and why: an explicit `--log-level` wins, then `QUORATE_LOG`, then
/// the default (info). openraft's own lines are one level quieter than ours at info and
/// debug: its info lines narrate its internals (ask for them with `QUORATE_LOG`).
pub fn filter_directives(level: Option<LogLevel>, env: Option<&str>) -> (String, &'static str) {
    let from_level = |l: LogLevel| match l {
        LogLevel::Error => "error".to_string(),
        LogLevel::Warn => "warn".to_string(),
        LogLevel::Info => "info,openraft=warn".to_string(),
        // Ours at debug; the libraries under us (h2, hyper, tonic) stay at info, or a debug
        // log would be mostly their frames.
        LogLevel::Debug => "info,quorate=debug,openraft=info".to_string(),
    };
    match (level, env.map(str::trim).filter(|e| !e.is_empty())) {
        (Some(l), _) => (from_level(l), "--log-level"),
        (None, Some(e)) => (e.to_string(), FILTER_ENV),
        (None, None) => (from_level(LogLevel::Info), "default"),
    }
}

/// Install the global subscriber (once, at start).
pub fn init(level: Option<LogLevel>, format: LogFormat) {
    let env = std::env::var(FILTER_ENV).ok();
    let (directives, source) = filter_directives(level, env.as_deref());
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|e| {
        eprintln!("quorate: ignoring {FILTER_ENV}={directives:?}: {e}; logging at info");
        EnvFilter::new(filter_directives(Some(LogLevel::Info), None).0)
    });
    let ansi = format == LogFormat::Text && std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .event_format(Lines { json: format == LogFormat::Json })
        .init();
    tracing::debug!(filter = %directives, from = source, "log filter");
}

/// Formats each event as a text line or a JSON object, adding the consensus context.
struct Lines {
    json: bool,
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        // Lines from crates that log through `log` (pprof-rs) come in as events of target `log`
        // with `log.*` fields; show them under their own target, as tracing's formatter does.
        let normalized = tracing_log::NormalizeEvent::normalized_metadata(event);
        let from_log = normalized.is_some();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let consensus = if log_context::is_consensus_target(meta.target()) { log_context::current() } else { None };
        let mut timestamp = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let mut spans = Vec::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                let fields = ext.get::<FormattedFields<N>>().map(|f| f.fields.clone()).unwrap_or_default();
                spans.push((span.name(), fields));
            }
        }
        if self.json {
            let mut fields = JsonFields { from_log, ..JsonFields::default() };
            event.record(&mut fields);
            let line = json_line(&timestamp, *meta.level(), meta.target(), consensus, fields, &spans);
            writeln!(w, "{line}")
        } else {
            let mut fields = TextFields { from_log, ..TextFields::default() };
            event.record(&mut fields);
            let line =
                text_line(&timestamp, *meta.level(), meta.target(), consensus, &fields, &spans, w.has_ansi_escapes());
            writeln!(w, "{line}")
        }
    }
}

fn text_line(
    timestamp: &str,
    level: Level,
    target: &str,
    consensus: Option<ConsensusContext>,
    fields: &TextFields,
    spans: &[(&str, String)],
    ansi: bool,
) -> String {
    let mut line = String::with_capacity(160);
    let level_text = format!("{:>5}", level.as_str());
    if ansi {
        let color = match level {
            Level::ERROR => "31",
            Level::WARN => "33",
            Level::INFO => "32",
            Level::DEBUG => "34",
            Level::TRACE => "35",
        };
        let _ = write!(line, "\x1b[2m{timestamp}\x1b[0m \x1b[{color}m{level_text}\x1b[0m ");
    } else {
        let _ = write!(line, "{timestamp} {level_text} ");
    }
    // The context reads as a span, as the fields of enclosing spans do.
    if let Some(c) = consensus {
        let _ = write!(
            line,
            "raft{{member={} member_id={:x} term={} commit_index={} applied_index={}}}: ",
            c.member, c.member_id, c.term, c.commit_index, c.applied_index
        );
    }
    for (name, span_fields) in spans {
        if span_fields.is_empty() {
            let _ = write!(line, "{name}: ");
        } else {
            let _ = write!(line, "{name}{{{span_fields}}}: ");
        }
    }
    let _ = write!(line, "{target}: {}", fields.message);
    if !fields.rest.is_empty() {
        if !fields.message.is_empty() {
            line.push(' ');
        }
        line.push_str(&fields.rest);
    }
    line
}

fn json_line(
    timestamp: &str,
    level: Level,
    target: &str,
    consensus: Option<ConsensusContext>,
    fields: JsonFields,
    spans: &[(&str, String)],
) -> String {
    use serde_json::{json, Value};
    // Keys in this order (serde_json's map sorts them): when, how bad, where, what, who.
    let mut line = String::with_capacity(256);
    let mut put = |key: &str, value: Value| {
        line.push(if line.is_empty() { '{' } else { ',' });
        line.push_str(&Value::from(key).to_string());
        line.push(':');
        line.push_str(&value.to_string());
    };
    put("timestamp", json!(timestamp));
    put("level", json!(level.as_str()));
    put("target", json!(target));
    put("message", json!(fields.message));
    if let Some(c) = consensus {
        put("member", json!(c.member));
        put("member_id", json!(format!("{:x}", c.member_id)));
        put("term", json!(c.term));
        put("commit_index", json!(c.commit_index));
        put("applied_index", json!(c.applied_index));
    }
    if !fields.rest.is_empty() {
        put("fields", Value::Object(fields.rest));
    }
    if !spans.is_empty() {
        put("spans", spans.iter().map(|(name, f)| json!({"name": name, "fields": f})).collect());
    }
    line.push('}');
    line
}

/// An event's fields as text: the message, then `key=value` pairs (values as `Debug`, as
/// tracing's own text format writes them).
#[derive(Default)]
struct TextFields {
    /// Skip the `log.*` fields of a line that came through `log`.
    from_log: bool,
    message: String,
    rest: String,
}

impl Visit for TextFields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else if !(self.from_log && field.name().starts_with("log.")) {
            if !self.rest.is_empty() {
                self.rest.push(' ');
            }
            let _ = write!(self.rest, "{}={value:?}", field.name());
        }
    }
}

/// An event's fields as JSON values: numbers and booleans as themselves, strings as strings,
/// anything else as its `Debug` text.
#[derive(Default)]
struct JsonFields {
    /// Skip the `log.*` fields of a line that came through `log`.
    from_log: bool,
    message: String,
    rest: serde_json::Map<String, serde_json::Value>,
}

impl JsonFields {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        if !(self.from_log && field.name().starts_with("log.")) {
            self.rest.insert(field.name().to_string(), value);
        }
    }
}

impl Visit for JsonFields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.put(field, serde_json::Value::String(format!("{value:?}")));
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.put(field, value.into());
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, serde_json::Number::from_f64(value).map_or_else(|| value.to_string().into(), Into::into));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_level_wins_then_the_environment_then_info() {
        let table = [
            (None, None, "info,openraft=warn", "default"),
            (None, Some(""), "info,openraft=warn", "default"),
            (None, Some("quorate_consensus=debug"), "quorate_consensus=debug", FILTER_ENV),
            (Some(LogLevel::Warn), Some("debug"), "warn", "--log-level"),
            (Some(LogLevel::Error), None, "error", "--log-level"),
            (Some(LogLevel::Info), None, "info,openraft=warn", "--log-level"),
            (Some(LogLevel::Debug), None, "info,quorate=debug,openraft=info", "--log-level"),
        ];
        for (level, env, want, source) in table {
            assert_eq!(filter_directives(level, env), (want.to_string(), source), "{level:?} {env:?}");
        }
    }

    fn context() -> ConsensusContext {
        ConsensusContext { member: "m1", member_id: 0xab, term: 7, commit_index: 42, applied_index: 41 }
    }

    #[test]
    fn a_consensus_line_carries_member_term_and_indexes_in_text() {
        let fields = TextFields { from_log: false, message: "elected leader".into(), rest: "leader=\"cd\"".into() };
        let line = text_line("T", Level::INFO, "quorate_consensus::status_watch", Some(context()), &fields, &[], false);
        assert_eq!(
            line,
            "T  INFO raft{member=m1 member_id=ab term=7 commit_index=42 applied_index=41}: \
             quorate_consensus::status_watch: elected leader leader=\"cd\""
        );
        let plain = text_line("T", Level::WARN, "quorate_server", None, &fields, &[("req", "id=1".into())], false);
        assert_eq!(plain, "T  WARN req{id=1}: quorate_server: elected leader leader=\"cd\"");
    }

    #[test]
    fn a_consensus_line_carries_member_term_and_indexes_in_json() {
        let mut rest = serde_json::Map::new();
        rest.insert("term".into(), 6.into());
        let fields = JsonFields { from_log: false, message: "tightened".into(), rest };
        let line = json_line("T", Level::INFO, "quorate_consensus", Some(context()), fields, &[]);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["member"], "m1");
        assert_eq!(v["member_id"], "ab");
        assert_eq!(v["term"], 7, "the context's term, not the event's own field");
        assert_eq!(v["fields"]["term"], 6);
        assert_eq!(v["commit_index"], 42);
        assert_eq!(v["applied_index"], 41);
        assert_eq!(v["message"], "tightened");
        assert_eq!(v["level"], "INFO");
        assert!(line.starts_with("{\"timestamp\":\"T\",\"level\""), "{line}");
        let plain: serde_json::Value =
            serde_json::from_str(&json_line("T", Level::INFO, "h2", None, JsonFields::default(), &[])).unwrap();
        assert!(plain.get("term").is_none() && plain.get("member").is_none(), "{plain}");
    }
}
