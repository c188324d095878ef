//! `quorate ctl timeline`: every member's flight recorder merged into one timeline.
//!
//! The members and their clock offsets come from `collect` (the same round trip `ctl status`
//! measures); each reachable member is then asked for `/v1/member/timeline` on its HTTP address.
//! Events are ordered by term, then by time on this host's clock (each member's time minus its
//! offset), so that a member whose clock is off still lands where it belongs. Members that do
//! not answer are named. Merging and rendering are pure (`merge`, `render_table`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::collect::{self, MemberView};
use crate::Options;

/// `timeline`'s own flags.
#[derive(Clone, Debug, Default)]
pub struct TimelineOptions {
    /// Only events from this far back (on this host's clock).
    pub since: Option<Duration>,
    /// Only this member (name or hex id).
    pub member: Option<String>,
}

/// One member as the timeline shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TimelineMember {
    pub name: String,
    pub id: String,
    pub endpoint: String,
    /// Whether its events were read.
    pub reachable: bool,
    pub error: Option<String>,
    /// Its wall clock minus this host's (from `ctl status`'s round trip), and the bound on that.
    pub clock_offset_ms: Option<i64>,
    pub clock_offset_error_ms: Option<u64>,
    pub term: Option<u64>,
    pub events: usize,
    /// Events its recorder had to drop (queue full) since it started.
    pub dropped_events: u64,
}

/// One event of the merged timeline.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TimelineEvent {
    pub term: u64,
    /// The recording member's clock, and the same instant on this host's clock.
    pub at_unix_ms: i64,
    pub at_host_unix_ms: i64,
    pub member_name: String,
    pub member: String,
    pub seq: u64,
    pub event: String,
    /// For people, with member ids replaced by names.
    pub text: String,
    /// The event's own fields (member ids in hex).
    pub detail: Map<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// The cut-off on this host's clock, when `--since` was given.
    pub since_unix_ms: Option<i64>,
    pub members: Vec<TimelineMember>,
    pub events: Vec<TimelineEvent>,
    /// Set when no endpoint gave a member list.
    pub member_list_error: Option<String>,
    /// `--member` named no member in the list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_such_member: Option<String>,
}

fn host_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A member's events as its `/v1/member/timeline` answers them.
#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    events: Vec<Map<String, Value>>,
    #[serde(default)]
    dropped_events: u64,
}

/// Turn one member's raw events into timeline events, its times moved to this host's clock.
pub fn member_events(view: &MemberView, raw: Vec<Map<String, Value>>) -> Vec<TimelineEvent> {
    let offset = view.clock_offset_ms.unwrap_or(0);
    raw.into_iter()
        .map(|mut m| {
            let num = |m: &mut Map<String, Value>, k: &str| m.remove(k).and_then(|v| v.as_i64()).unwrap_or(0);
            let text_of = |m: &mut Map<String, Value>, k: &str| {
                m.remove(k).and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
            };
            let at = num(&mut m, "at_unix_ms");
            let term = num(&mut m, "term") as u64;
            let seq = num(&mut m, "seq") as u64;
            let event = text_of(&mut m, "event");
            let text = text_of(&mut m, "text");
            let member = text_of(&mut m, "member");
            TimelineEvent {
                term,
                at_unix_ms: at,
                at_host_unix_ms: at - offset,
                member_name: view.name.clone(),
                member: if member.is_empty() { view.id.clone() } else { member },
                seq,
                event,
                text,
                detail: m,
            }
        })
        .collect()
}

/// Merge every member's events: by term, then host time, then member and sequence. Member ids
/// in the texts become names.
pub fn merge(views: &[MemberView], per_member: Vec<Vec<TimelineEvent>>) -> Vec<TimelineEvent> {
    let mut all: Vec<TimelineEvent> = per_member.into_iter().flatten().collect();
    all.sort_by(|a, b| {
        (a.term, a.at_host_unix_ms, &a.member_name, a.seq).cmp(&(b.term, b.at_host_unix_ms, &b.member_name, b.seq))
    });
    // Longest ids first, so that no id is replaced inside a longer one.
    let mut names: Vec<(&str, &str)> = views
        .iter()
        .filter(|v| !v.name.is_empty() && !v.id.is_empty())
        .map(|v| (v.id.as_str(), v.name.as_str()))
        .collect();
    names.sort_by_key(|(id, _)| std::cmp::Reverse(id.len()));
    for e in &mut all {
        for (id, name) in &names {
            e.text = replace_word(&e.text, id, name);
        }
    }
    all
}

/// Replace `word` in `text` where it stands alone (not inside a longer hex number).
fn replace_word(text: &str, word: &str, with: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(word) {
        let before = rest[..i].chars().last();
        let after = rest[i + word.len()..].chars().next();
        let alone =
            !before.is_some_and(|c| c.is_ascii_alphanumeric()) && !after.is_some_and(|c| c.is_ascii_alphanumeric());
        out.push_str(&rest[..i]);
        out.push_str(if alone { with } else { word });
        rest = &rest[i + word.len()..];
    }
    out.push_str(rest);
    out
}

/// Collect every member's events.
pub async fn gather(opts: &Options, t: &TimelineOptions) -> Timeline {
    let view = collect::collect(opts).await;
    let now = host_unix_ms();
    let since = t.since.map(|d| now - d.as_millis() as i64);
    let wanted: Vec<&MemberView> =
        view.members.iter().filter(|m| t.member.as_ref().is_none_or(|want| &m.name == want || &m.id == want)).collect();
    let answers = futures::future::join_all(wanted.iter().map(|m| async move {
        let Some(http) = m.http_addr.as_ref().filter(|_| m.reachable) else {
            return Err(m.error.clone().unwrap_or_else(|| "unreachable".into()));
        };
        // The cut-off on the member's own clock.
        let path = match since {
            Some(s) => format!("/v1/member/timeline?since_unix_ms={}", s + m.clock_offset_ms.unwrap_or(0)),
            None => "/v1/member/timeline".to_string(),
        };
        let body = collect::http_get(opts, http, &path, opts.command_timeout)
            .await
            .map_err(|e| format!("{http}{path}: {e}"))?;
        serde_json::from_str::<Answer>(&body).map_err(|e| format!("{http}{path}: {e}"))
    }))
    .await;
    let mut members = Vec::new();
    let mut per_member = Vec::new();
    for (m, answer) in wanted.iter().zip(answers) {
        let mut tm = TimelineMember {
            name: m.name.clone(),
            id: m.id.clone(),
            endpoint: m.endpoint.clone(),
            clock_offset_ms: m.clock_offset_ms,
            clock_offset_error_ms: m.clock_offset_error_ms,
            term: m.term,
            ..Default::default()
        };
        match answer {
            Ok(a) => {
                let events = member_events(m, a.events);
                tm.reachable = true;
                tm.events = events.len();
                tm.dropped_events = a.dropped_events;
                per_member.push(events);
            }
            Err(e) => tm.error = Some(e),
        }
        members.push(tm);
    }
    let events = merge(&view.members, per_member);
    let no_such_member = t.member.clone().filter(|_| members.is_empty() && view.member_list_error.is_none());
    Timeline { since_unix_ms: since, members, events, member_list_error: view.member_list_error, no_such_member }
}

use quorate_consensus::isolation::utc_parts as utc;

fn offset_text(m: &TimelineMember) -> String {
    match (m.clock_offset_ms, m.clock_offset_error_ms) {
        (Some(o), Some(e)) => format!("{o:+} ms ±{e} ms"),
        (Some(o), None) => format!("{o:+} ms"),
        _ => "?".into(),
    }
}

/// The table an operator reads in an incident: the members (clock offset, how many events, or
/// why not), then the events by term and time.
pub fn render_table(t: &Timeline) -> String {
    let mut out = String::new();
    if let Some(e) = &t.member_list_error {
        out.push_str(&format!("no member list: {e}\n"));
    }
    if let Some(m) = &t.no_such_member {
        out.push_str(&format!("no member named {m} in the member list (names and ids: quorate ctl status)\n"));
    }
    out.push_str(&format!(
        "{:<10} {:<17} {:<22} {:<16} {:>6}  {}\n",
        "MEMBER", "ID", "ENDPOINT", "CLOCK OFFSET", "EVENTS", "STATUS"
    ));
    for m in &t.members {
        let status = match (&m.error, m.reachable) {
            (_, true) if m.dropped_events > 0 => format!("ok ({} events dropped)", m.dropped_events),
            (_, true) => "ok".into(),
            (Some(e), false) => format!("UNREACHABLE: {e}"),
            (None, false) => "UNREACHABLE".into(),
        };
        let events = if m.reachable { m.events.to_string() } else { "-".into() };
        out.push_str(&format!(
            "{:<10} {:<17} {:<22} {:<16} {:>6}  {}\n",
            m.name,
            m.id,
            m.endpoint,
            offset_text(m),
            events,
            status
        ));
    }
    out.push('\n');
    let dates: std::collections::BTreeSet<String> = t.events.iter().map(|e| utc(e.at_host_unix_ms).1).collect();
    let dates: Vec<String> = dates.into_iter().collect();
    out.push_str(&format!(
        "times are this host's clock, UTC{}; ordered by term, then time\n",
        if dates.is_empty() { String::new() } else { format!(" ({})", dates.join(" to ")) }
    ));
    out.push_str(&format!("{:>6}  {:<12}  {:<10} {:<20} {}\n", "TERM", "TIME", "MEMBER", "EVENT", "DETAIL"));
    let mut last_term = None;
    for e in &t.events {
        if last_term.is_some_and(|t| t != e.term) {
            out.push_str(&format!("{:-<6}\n", ""));
        }
        last_term = Some(e.term);
        out.push_str(&format!(
            "{:>6}  {:<12}  {:<10} {:<20} {}\n",
            e.term,
            utc(e.at_host_unix_ms).0,
            e.member_name,
            e.event,
            e.text
        ));
    }
    if t.events.is_empty() {
        out.push_str("(no events)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view(name: &str, id: &str, offset: i64) -> MemberView {
        MemberView {
            name: name.into(),
            id: id.into(),
            reachable: true,
            clock_offset_ms: Some(offset),
            ..Default::default()
        }
    }

    fn raw(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn events_merge_by_term_then_host_time_with_names_for_ids() {
        let a = view("m1", "a1", 0);
        // m2's clock is 5 s ahead: its 10_004_000 is 9_999_000 here.
        let b = view("m2", "b2", 5000);
        let ea = member_events(
            &a,
            vec![
                raw(
                    json!({"seq": 1, "member": "a1", "at_unix_ms": 10_000_000, "term": 3, "event": "leader_lost", "text": "stepped down"}),
                ),
                raw(
                    json!({"seq": 2, "member": "a1", "at_unix_ms": 10_001_000, "term": 4, "event": "pre_vote_sent", "to": "b2", "text": "pre-vote for term 5 to b2: refused"}),
                ),
            ],
        );
        let eb = member_events(
            &b,
            vec![raw(
                json!({"seq": 9, "member": "b2", "at_unix_ms": 10_004_000, "term": 4, "event": "election_won", "text": "election won"}),
            )],
        );
        let all = merge(&[a, b], vec![ea, eb]);
        let order: Vec<(&str, &str)> = all.iter().map(|e| (e.member_name.as_str(), e.event.as_str())).collect();
        assert_eq!(order, [("m1", "leader_lost"), ("m2", "election_won"), ("m1", "pre_vote_sent")]);
        assert_eq!(all[1].at_host_unix_ms, 9_999_000);
        assert_eq!(all[2].text, "pre-vote for term 5 to m2: refused");
        assert_eq!(all[2].detail["to"], "b2", "the detail keeps the id");
    }

    #[test]
    fn an_id_inside_a_longer_number_is_not_replaced() {
        assert_eq!(replace_word("to ab and abc and xab", "ab", "m1"), "to m1 and abc and xab");
    }

    #[test]
    fn the_table_names_unreachable_members_and_shows_offsets() {
        let t = Timeline {
            members: vec![
                TimelineMember {
                    name: "m1".into(),
                    id: "a1".into(),
                    reachable: true,
                    clock_offset_ms: Some(-3),
                    clock_offset_error_ms: Some(1),
                    events: 2,
                    ..Default::default()
                },
                TimelineMember {
                    name: "m3".into(),
                    id: "c3".into(),
                    error: Some("dial: refused".into()),
                    ..Default::default()
                },
            ],
            events: vec![TimelineEvent {
                term: 4,
                at_host_unix_ms: 1_764_522_301_234,
                member_name: "m1".into(),
                event: "election_won".into(),
                text: "election won: became leader".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let table = render_table(&t);
        assert!(table.contains("-3 ms ±1 ms"), "{table}");
        assert!(table.contains("UNREACHABLE: dial: refused"), "{table}");
        assert!(table.contains("17:05:01.234"), "{table}");
        assert!(table.contains("2025-11-30"), "{table}");
    }
}
