//! The flight recorder: every member's consensus events (pre-votes and votes with their
//! answers, term changes, elections, leaders elected and lost, the lease clock, stalls,
//! membership changes, snapshots, alarms, the eviction brake) kept in a bounded ring on disk in
//! its data directory, so that after an incident `quorate ctl timeline` can lay every member's
//! story side by side, across restarts.
//!
//! It owns the ring's file format and the one writer thread. It must never block Raft or a
//! client request: `Recorder::record` hands the event to a bounded queue and returns; a full
//! queue drops the event and counts it (`quorate_flight_events_dropped_total`). Nothing here
//! fsyncs: a write reaches the page cache at once, which a killed process (kill -9) does not
//! lose; a machine crash may lose the last events, and a torn last record is skipped on open.
//! Events are rare (elections, not requests): nothing records per client request.
//!
//! The ring is two segment files, `flight/0` and `flight/1`, of at most `SEGMENT_BYTES_MAX`
//! each. Records go to the current one; when it is full the other is emptied and becomes
//! current, so the ring holds between one and two segments of the newest events. A record is
//! `[payload length u32][checksum u32][sequence u64][payload]` (little-endian), the checksum the
//! first four bytes of the SHA-256 of sequence and payload, the payload the event as JSON (so an
//! operator can read it with `strings`, and a newer member's events stay readable).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::types::NodeId;

/// Largest segment file, in bytes: the ring holds at most twice this (about 10,000 events).
pub const SEGMENT_BYTES_MAX: u64 = 1 << 20;

/// Events waiting for the writer; more are dropped and counted.
pub const FLIGHT_QUEUE_MAX: usize = 1024;

/// Largest record payload, in bytes: a length above it in a header means a damaged record.
const RECORD_BYTES_MAX: usize = 64 << 10;

const HEADER_BYTES: usize = 16;

/// Records as (sequence number, payload).
type Records = Vec<(u64, Vec<u8>)>;

/// This member's wall clock in milliseconds since the Unix epoch (shown to people only).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A member id as etcd prints it.
pub fn hex(id: NodeId) -> String {
    format!("{id:x}")
}

/// Why a voter refused a pre-vote or a vote. A small fixed set: it is the `reason` label of
/// `quorate_raft_pre_votes_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The voter is in a later term than the one the candidate asks for.
    HigherTerm,
    /// The voter already voted for another candidate in that term.
    AlreadyVoted,
    /// The voter still hears a leader (openraft's leader lease): a live leader is not deposed.
    LeaderAlive,
    /// The candidate's log is behind the voter's.
    LogBehind,
}

impl Refusal {
    pub const ALL: [Refusal; 4] =
        [Refusal::HigherTerm, Refusal::AlreadyVoted, Refusal::LeaderAlive, Refusal::LogBehind];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::HigherTerm => "higher_term",
            Refusal::AlreadyVoted => "already_voted",
            Refusal::LeaderAlive => "leader_alive",
            Refusal::LogBehind => "log_behind",
        }
    }
}

/// Why an election this member started ended without it leading. The `reason` label of
/// `quorate_raft_elections_lost_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LostReason {
    /// Another member won the same term.
    AnotherLeader,
    /// A higher term reached this member (another candidate, or a leader) before it won.
    HigherTerm,
    /// It started its next election: some voters refused its vote.
    VoteRefused,
    /// It started its next election: too few voters answered at all.
    NoQuorum,
}

impl LostReason {
    pub const ALL: [LostReason; 4] =
        [LostReason::AnotherLeader, LostReason::HigherTerm, LostReason::VoteRefused, LostReason::NoQuorum];

    pub fn label(self) -> &'static str {
        match self {
            LostReason::AnotherLeader => "another_leader",
            LostReason::HigherTerm => "higher_term",
            LostReason::VoteRefused => "vote_refused",
            LostReason::NoQuorum => "no_quorum",
        }
    }
}

/// What became of a (pre-)vote request this member sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Granted,
    Refused,
    /// No answer (the peer is down or cut off, or the answer did not arrive in time).
    Unreachable,
}

/// One consensus event. The `event` field names it (stable, for tools); the rest are its
/// details. Member ids are hex, as etcd prints them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The member started (its data directory opened).
    Started {
        name: String,
    },
    /// A pre-vote request this member sent as a candidate, and its answer.
    PreVoteSent {
        to: String,
        for_term: u64,
        outcome: Outcome,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<Refusal>,
        /// The voter's term and the leader it has accepted (if any), from its answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        voter_term: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        voter_leader: Option<String>,
        /// Requests to this peer that went unanswered (or, for a refused one, were refused) since
        /// the last one recorded, and were not recorded (`votes::UNANSWERED_RECORD_INTERVAL`).
        #[serde(default, skip_serializing_if = "is_zero")]
        unrecorded_before: u64,
    },
    /// A vote request this member sent as a candidate, and its answer.
    VoteSent {
        to: String,
        for_term: u64,
        outcome: Outcome,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<Refusal>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        voter_term: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        voter_leader: Option<String>,
        /// Requests to this peer that went unanswered since the last one recorded, and were not
        /// recorded (`votes::UNANSWERED_RECORD_INTERVAL`).
        #[serde(default, skip_serializing_if = "is_zero")]
        unrecorded_before: u64,
    },
    /// A pre-vote request this member answered as a voter.
    PreVoteAnswered {
        from: String,
        for_term: u64,
        granted: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<Refusal>,
    },
    /// A vote request this member answered as a voter.
    VoteAnswered {
        from: String,
        for_term: u64,
        granted: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<Refusal>,
    },
    TermChanged {
        from: u64,
        to: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        voted_for: Option<String>,
    },
    /// This member stood for the record's term (a pre-vote quorum said it could win).
    ElectionStarted,
    ElectionWon,
    ElectionLost {
        reason: LostReason,
    },
    /// This member learned of a new leader (itself included).
    LeaderElected {
        leader: String,
    },
    /// This member stopped leading (the record's term is the one it led).
    LeaderLost {
        reason: String,
    },
    /// The lease clock started expiring leases here (every lease got `grace_ms`).
    LeaseClockPromoted {
        grace_ms: u64,
    },
    LeaseClockDemoted,
    /// This member did not run for `gap_ms` (a pause, SIGSTOP, an overloaded machine).
    Stall {
        gap_ms: u64,
    },
    /// The leader heard from no quorum for an election timeout: lease expiry suspended.
    QuorumLost,
    QuorumRegained,
    MembershipChanged {
        voters: Vec<String>,
        learners: Vec<String>,
        log_index: u64,
    },
    SnapshotBuilt {
        index: u64,
        bytes: u64,
    },
    SnapshotInstalled {
        index: u64,
        bytes: u64,
    },
    Alarm {
        alarm: String,
        raised: bool,
        detail: String,
    },
    BrakeEngaged {
        zone: String,
        reason: String,
    },
    BrakeReleased {
        zone: String,
        why: String,
    },
    /// An operator's isolation of a member was applied here (`quorate ctl isolate`).
    Isolated {
        /// The isolated member (hex id); the record's own `member` is the leader that committed it.
        target: String,
        reason: String,
        by: String,
        log_index: u64,
    },
    /// A member's isolation was lifted (`quorate ctl unisolate`).
    Unisolated {
        target: String,
        log_index: u64,
    },
    /// `quorate ctl recover --apply` was applied here: the cluster's incarnation was raised.
    Recovered {
        plan: String,
        by: String,
        incarnation: u64,
        kept_up_to: u64,
        dropped: Vec<String>,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn outcome_text(
    outcome: Outcome,
    reason: Option<Refusal>,
    voter_term: Option<u64>,
    leader: &Option<String>,
    unrecorded_before: u64,
) -> String {
    let mut s = match (outcome, reason) {
        (Outcome::Granted, _) => "granted".to_string(),
        (Outcome::Unreachable, _) if unrecorded_before > 0 => {
            format!("no answer ({unrecorded_before} more unanswered since the last one recorded)")
        }
        (Outcome::Unreachable, _) => "no answer".to_string(),
        (Outcome::Refused, Some(r)) if unrecorded_before > 0 => {
            format!("refused: {} ({unrecorded_before} more refused since the last one recorded)", refusal_text(r))
        }
        (Outcome::Refused, Some(r)) => format!("refused: {}", refusal_text(r)),
        (Outcome::Refused, None) => "refused".to_string(),
    };
    if outcome == Outcome::Refused {
        match (voter_term, leader) {
            (Some(t), Some(l)) => s.push_str(&format!(" (voter follows {l} in term {t})")),
            (Some(t), None) => s.push_str(&format!(" (voter in term {t})")),
            _ => {}
        }
    }
    s
}

fn refusal_text(r: Refusal) -> &'static str {
    match r {
        Refusal::HigherTerm => "higher term",
        Refusal::AlreadyVoted => "already voted for another candidate in that term",
        Refusal::LeaderAlive => "a leader is alive",
        Refusal::LogBehind => "candidate log behind ours",
    }
}

impl Event {
    /// One line for people.
    pub fn text(&self) -> String {
        match self {
            Event::Started { name } => format!("member {name} started"),
            Event::PreVoteSent { to, for_term, outcome, reason, voter_term, voter_leader, unrecorded_before } => {
                let answer = outcome_text(*outcome, *reason, *voter_term, voter_leader, *unrecorded_before);
                format!("pre-vote for term {for_term} to {to}: {answer}")
            }
            Event::VoteSent { to, for_term, outcome, reason, voter_term, voter_leader, unrecorded_before } => {
                let answer = outcome_text(*outcome, *reason, *voter_term, voter_leader, *unrecorded_before);
                format!("vote for term {for_term} to {to}: {answer}")
            }
            Event::PreVoteAnswered { from, for_term, granted: true, .. } => {
                format!("granted pre-vote for term {for_term} to {from}")
            }
            Event::PreVoteAnswered { from, for_term, reason, .. } => {
                format!("refused pre-vote for term {for_term} to {from}: {}", reason.map_or("", refusal_text))
            }
            Event::VoteAnswered { from, for_term, granted: true, .. } => {
                format!("granted vote for term {for_term} to {from}")
            }
            Event::VoteAnswered { from, for_term, reason, .. } => {
                format!("refused vote for term {for_term} to {from}: {}", reason.map_or("", refusal_text))
            }
            Event::TermChanged { from, to, voted_for: Some(v) } => format!("term {from} -> {to} (voted for {v})"),
            Event::TermChanged { from, to, voted_for: None } => format!("term {from} -> {to}"),
            Event::ElectionStarted => "election started (became candidate)".into(),
            Event::ElectionWon => "election won: became leader".into(),
            Event::ElectionLost { reason } => format!("election lost: {}", reason.label().replace('_', " ")),
            Event::LeaderElected { leader } => format!("leader is {leader}"),
            Event::LeaderLost { reason } => format!("stepped down as leader: {reason}"),
            Event::LeaseClockPromoted { grace_ms } => {
                format!("lease clock promoted (every lease gets {grace_ms} ms grace)")
            }
            Event::LeaseClockDemoted => "lease clock demoted: no longer leader".into(),
            Event::Stall { gap_ms } => format!("stalled for {gap_ms} ms"),
            Event::QuorumLost => "leader lost quorum contact: lease expiry suspended".into(),
            Event::QuorumRegained => "leader regained quorum contact".into(),
            Event::MembershipChanged { voters, learners, log_index } => {
                format!(
                    "membership at log index {log_index}: voters [{}] learners [{}]",
                    voters.join(","),
                    learners.join(",")
                )
            }
            Event::SnapshotBuilt { index, bytes } => format!("snapshot built at log index {index} ({bytes} bytes)"),
            Event::SnapshotInstalled { index, bytes } => {
                format!("snapshot installed at log index {index} ({bytes} bytes)")
            }
            Event::Alarm { alarm, raised: true, detail } => format!("alarm {alarm} raised: {detail}"),
            Event::Alarm { alarm, raised: false, detail } => format!("alarm {alarm} disarmed: {detail}"),
            Event::BrakeEngaged { zone, reason } => format!("eviction brake engaged in zone {zone}: {reason}"),
            Event::BrakeReleased { zone, why } => format!("eviction brake released in zone {zone}: {why}"),
            Event::Isolated { target, reason, by, log_index } => {
                format!("member {target} isolated by {by}: {reason} (log index {log_index})")
            }
            Event::Recovered { plan, by, incarnation, kept_up_to, dropped } => format!(
                "recovery {plan} by {by}: incarnation {incarnation}, log kept up to index {kept_up_to}, dropped [{}]",
                dropped.join(",")
            ),
            Event::Unisolated { target, log_index } => format!("member {target} unisolated (log index {log_index})"),
        }
    }
}

/// One event as the ring keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Position in this member's ring (from the record's header): increases by one per event.
    #[serde(default)]
    pub seq: u64,
    /// The recording member's id (hex).
    pub member: String,
    /// The recording member's wall clock, in milliseconds since the Unix epoch.
    pub at_unix_ms: i64,
    /// The member's Raft term when it recorded the event (for a lost leadership, the term led).
    pub term: u64,
    #[serde(flatten)]
    pub event: Event,
}

/// The two segment files. Callers serialise access (the recorder holds it in a mutex).
pub struct Ring {
    files: [File; 2],
    current: usize,
    current_len: u64,
    next_seq: u64,
    segment_bytes_max: u64,
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut h = Sha256::new();
    h.update(seq.to_le_bytes());
    h.update(payload);
    let d = h.finalize();
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// The records of one segment, and the length of its valid prefix: reading stops at the first
/// record that is incomplete or damaged (a torn tail).
fn scan(file: &File) -> io::Result<(Records, u64)> {
    let len = file.metadata()?.len();
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, 0)?;
    let mut records = Vec::new();
    let mut at = 0usize;
    while at + HEADER_BYTES <= bytes.len() {
        let h = &bytes[at..at + HEADER_BYTES];
        let n = u32::from_le_bytes(h[0..4].try_into().unwrap()) as usize;
        let sum = u32::from_le_bytes(h[4..8].try_into().unwrap());
        let seq = u64::from_le_bytes(h[8..16].try_into().unwrap());
        let end = at + HEADER_BYTES + n;
        if n > RECORD_BYTES_MAX || end > bytes.len() {
            break;
        }
        let payload = &bytes[at + HEADER_BYTES..end];
        if checksum(seq, payload) != sum {
            break;
        }
        records.push((seq, payload.to_vec()));
        at = end;
    }
    Ok((records, at as u64))
}

impl Ring {
    /// Open (or create) the ring in `dir`. A torn tail is cut off the current segment, so the
    /// next record follows the last whole one.
    pub fn open(dir: &Path, segment_bytes_max: u64) -> io::Result<Ring> {
        std::fs::create_dir_all(dir)?;
        let open = |i: usize| {
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join(i.to_string()))
        };
        let files = [open(0)?, open(1)?];
        let (a, a_len) = scan(&files[0])?;
        let (b, b_len) = scan(&files[1])?;
        let last = |r: &[(u64, Vec<u8>)]| r.last().map_or(0, |(s, _)| *s);
        let (current, current_len) = if last(&b) > last(&a) { (1, b_len) } else { (0, a_len) };
        files[current].set_len(current_len)?;
        let next_seq = last(&a).max(last(&b)) + 1;
        Ok(Ring { files, current, current_len, next_seq, segment_bytes_max })
    }

    /// Append one record; returns its sequence number.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<u64> {
        if payload.len() > RECORD_BYTES_MAX {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "flight record too large"));
        }
        let seq = self.next_seq;
        let mut frame = Vec::with_capacity(HEADER_BYTES + payload.len());
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&checksum(seq, payload).to_le_bytes());
        frame.extend_from_slice(&seq.to_le_bytes());
        frame.extend_from_slice(payload);
        if self.current_len > 0 && self.current_len + frame.len() as u64 > self.segment_bytes_max {
            self.current = 1 - self.current;
            self.files[self.current].set_len(0)?;
            self.current_len = 0;
        }
        self.files[self.current].write_all_at(&frame, self.current_len)?;
        self.current_len += frame.len() as u64;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Every whole record, oldest first.
    pub fn records(&self) -> io::Result<Records> {
        let (mut all, _) = scan(&self.files[1 - self.current])?;
        all.extend(scan(&self.files[self.current])?.0);
        all.sort_by_key(|(seq, _)| *seq);
        Ok(all)
    }

    /// Bytes on disk, both segments.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.metadata().map_or(0, |m| m.len())).sum()
    }
}

struct Inner {
    member: NodeId,
    /// `None`: recording is off (a recorder that could not open its ring, or a test's).
    tx: Option<SyncSender<Record>>,
    ring: Option<Arc<Mutex<Ring>>>,
    /// The member's current term, as the Raft watcher last saw it.
    term: AtomicU64,
    /// The last term in which a voter refused this member's vote (for `LostReason`).
    vote_refused_term: AtomicU64,
    /// Per peer, which unanswered (pre-)votes to it are recorded.
    unanswered: Mutex<std::collections::BTreeMap<NodeId, crate::votes::Unanswered>>,
    /// Per (peer, whether this member answered), which refused pre-votes are recorded.
    refused_pre_votes: Mutex<std::collections::BTreeMap<(NodeId, bool), crate::votes::Unanswered>>,
    /// The member's name, until `Started` is recorded: in the term Raft restored, once the
    /// watcher first reads it, so that a restart sorts where it happened.
    start: Mutex<Option<String>>,
    dropped: Counter,
}

/// The handle every recording site holds. Cheap to clone; `record` never blocks.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Inner>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::off(0)
    }
}

impl Recorder {
    /// A recorder that keeps nothing.
    pub fn off(member: NodeId) -> Recorder {
        Recorder {
            inner: Arc::new(Inner {
                member,
                tx: None,
                ring: None,
                term: AtomicU64::new(0),
                vote_refused_term: AtomicU64::new(0),
                unanswered: Mutex::default(),
                refused_pre_votes: Mutex::default(),
                start: Mutex::default(),
                dropped: Counter::default(),
            }),
        }
    }

    /// Open the ring in `dir` and start its writer thread. `Started` is recorded on the first
    /// `set_term`, in the term Raft restored.
    pub fn open(dir: &Path, member: NodeId, name: &str, segment_bytes_max: u64) -> io::Result<Recorder> {
        let ring = Arc::new(Mutex::new(Ring::open(dir, segment_bytes_max)?));
        let (tx, rx) = sync_channel::<Record>(FLIGHT_QUEUE_MAX);
        let writer = ring.clone();
        std::thread::Builder::new().name("flight-recorder".into()).spawn(move || {
            let mut failed = false;
            // Ends when every recorder handle is gone.
            while let Ok(record) = rx.recv() {
                let payload = serde_json::to_vec(&record).expect("flight records serialize");
                if let Err(e) = writer.lock().unwrap().append(&payload) {
                    if !failed {
                        tracing::warn!(error = %e, "flight recorder cannot write; events are lost until it can");
                        failed = true;
                    }
                } else {
                    failed = false;
                }
            }
        })?;
        let r = Recorder {
            inner: Arc::new(Inner {
                member,
                tx: Some(tx),
                ring: Some(ring),
                term: AtomicU64::new(0),
                vote_refused_term: AtomicU64::new(0),
                unanswered: Mutex::default(),
                refused_pre_votes: Mutex::default(),
                start: Mutex::default(),
                dropped: Counter::default(),
            }),
        };
        *r.inner.start.lock().unwrap() = Some(name.to_string());
        Ok(r)
    }

    /// Record `event` in the member's current term.
    pub fn record(&self, event: Event) {
        self.record_in(self.inner.term.load(Relaxed), event);
    }

    /// Record `event` in `term`.
    pub fn record_in(&self, term: u64, event: Event) {
        let Some(tx) = &self.inner.tx else { return };
        let record = Record { seq: 0, member: hex(self.inner.member), at_unix_ms: unix_ms(), term, event };
        match tx.try_send(record) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.inner.dropped.inc();
            }
        }
    }

    /// The member's current term (kept by the Raft watcher).
    pub fn term(&self) -> u64 {
        self.inner.term.load(Relaxed)
    }

    /// The member's term now (from the Raft watcher). The first call records `Started`.
    pub(crate) fn set_term(&self, term: u64) {
        self.inner.term.store(term, Relaxed);
        if let Some(name) = self.inner.start.lock().unwrap().take() {
            self.record_in(term, Event::Started { name });
        }
    }

    pub(crate) fn note_vote_refused(&self, term: u64) {
        self.inner.vote_refused_term.fetch_max(term, Relaxed);
    }

    /// An unanswered (pre-)vote to `to` at `now`: `Some(unrecorded before it)` if it is to be
    /// recorded (`votes::UNANSWERED_RECORD_INTERVAL`).
    pub(crate) fn admit_unanswered(&self, to: NodeId, now: std::time::Instant) -> Option<u64> {
        self.inner.unanswered.lock().unwrap().entry(to).or_default().admit(now)
    }

    /// A refused pre-vote exchanged with `peer` at `now` (`answered`: this member refused it):
    /// `Some(unrecorded before it)` if it is to be recorded. A partial partition makes a cut-off
    /// member ask, and be refused, every election timeout for as long as it lasts: recording each
    /// would push the start of the incident out of the ring.
    pub(crate) fn admit_refused_pre_vote(&self, peer: NodeId, answered: bool, now: std::time::Instant) -> Option<u64> {
        self.inner.refused_pre_votes.lock().unwrap().entry((peer, answered)).or_default().admit(now)
    }

    pub(crate) fn vote_refused_in(&self, term: u64) -> bool {
        self.inner.vote_refused_term.load(Relaxed) >= term
    }

    /// Events dropped because the writer's queue was full.
    pub fn dropped(&self) -> &Counter {
        &self.inner.dropped
    }

    /// The recorded events at or after `since_unix_ms` (on this member's clock), oldest first.
    /// Records that do not parse (a newer member's event kinds) are skipped.
    pub fn read(&self, since_unix_ms: Option<i64>) -> io::Result<Vec<Record>> {
        let Some(ring) = &self.inner.ring else { return Ok(Vec::new()) };
        let raw = ring.lock().unwrap().records()?;
        Ok(raw
            .into_iter()
            .filter_map(|(seq, payload)| {
                let mut r: Record = serde_json::from_slice(&payload).ok()?;
                r.seq = seq;
                Some(r)
            })
            .filter(|r| since_unix_ms.is_none_or(|s| r.at_unix_ms >= s))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(i: u64) -> Vec<u8> {
        format!("event number {i:04}").into_bytes()
    }

    #[test]
    fn the_ring_keeps_the_newest_records_within_two_segments() {
        let dir = tempfile::tempdir().unwrap();
        let segment = 1000;
        let mut ring = Ring::open(dir.path(), segment).unwrap();
        for i in 0..500 {
            assert_eq!(ring.append(&payload(i)).unwrap(), i + 1);
        }
        assert!(ring.bytes() <= 2 * segment, "{} bytes on disk", ring.bytes());
        let kept = ring.records().unwrap();
        // Each record is 16 + 17 bytes: at least one full segment of the newest is kept.
        assert!(kept.len() >= (segment / 33) as usize, "kept {}", kept.len());
        let seqs: Vec<u64> = kept.iter().map(|(s, _)| *s).collect();
        let newest: Vec<u64> = (501 - kept.len() as u64..=500).collect();
        assert_eq!(seqs, newest, "the newest records, in order, none missing");
        for (seq, p) in &kept {
            assert_eq!(p, &payload(seq - 1));
        }
    }

    #[test]
    fn the_ring_survives_reopening_and_continues_its_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = Ring::open(dir.path(), 1000).unwrap();
        for i in 0..40 {
            ring.append(&payload(i)).unwrap();
        }
        let before = ring.records().unwrap();
        drop(ring);
        let mut ring = Ring::open(dir.path(), 1000).unwrap();
        assert_eq!(ring.records().unwrap(), before, "the same records after reopening");
        assert_eq!(ring.append(b"after").unwrap(), 41);
        assert_eq!(ring.records().unwrap().last().unwrap(), &(41, b"after".to_vec()));
    }

    #[test]
    fn a_torn_or_damaged_tail_is_skipped_and_overwritten() {
        for damage in ["cut", "flip"] {
            let dir = tempfile::tempdir().unwrap();
            let mut ring = Ring::open(dir.path(), 1 << 20).unwrap();
            for i in 0..10 {
                ring.append(&payload(i)).unwrap();
            }
            drop(ring);
            let path = dir.path().join("0");
            let len = std::fs::metadata(&path).unwrap().len();
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            match damage {
                // A kill -9 in the middle of the last write.
                "cut" => f.set_len(len - 5).unwrap(),
                _ => f.write_all_at(b"X", len - 3).unwrap(),
            }
            drop(f);
            let mut ring = Ring::open(dir.path(), 1 << 20).unwrap();
            let kept = ring.records().unwrap();
            assert_eq!(kept.len(), 9, "{damage}: the damaged last record is skipped");
            assert_eq!(ring.append(b"next").unwrap(), 10, "{damage}: the sequence resumes after the last whole one");
            let kept = ring.records().unwrap();
            assert_eq!(kept.len(), 10, "{damage}: a record after the cut is readable");
            assert_eq!(kept.last().unwrap().1, b"next".to_vec());
        }
    }

    #[test]
    fn garbage_in_a_segment_is_never_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("0"), [0xffu8; 100]).unwrap();
        std::fs::write(dir.path().join("1"), b"").unwrap();
        let mut ring = Ring::open(dir.path(), 1000).unwrap();
        assert!(ring.records().unwrap().is_empty());
        ring.append(b"x").unwrap();
        assert_eq!(ring.records().unwrap().len(), 1);
    }

    #[test]
    fn events_are_json_with_a_stable_name_and_read_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let r = Recorder::open(dir.path(), 0xab, "m1", 1 << 20).unwrap();
        r.set_term(7);
        r.record(Event::LeaderLost { reason: "saw term 8".into() });
        r.record_in(8, Event::QuorumLost);
        r.record_in(8, Event::ElectionLost { reason: LostReason::NoQuorum });
        // The writer is a thread: wait (boundedly) for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while r.read(None).unwrap().len() < 4 {
            assert!(std::time::Instant::now() < deadline, "the writer never wrote");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(r);
        let r = Recorder::open(dir.path(), 0xab, "m1", 1 << 20).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        r.set_term(8);
        while r.read(None).unwrap().len() < 5 {
            assert!(std::time::Instant::now() < deadline, "the writer never wrote");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let all = r.read(None).unwrap();
        let events: Vec<_> = all.iter().map(|r| (r.term, r.event.clone())).collect();
        assert_eq!(
            events,
            vec![
                (7, Event::Started { name: "m1".into() }),
                (7, Event::LeaderLost { reason: "saw term 8".into() }),
                (8, Event::QuorumLost),
                (8, Event::ElectionLost { reason: LostReason::NoQuorum }),
                (8, Event::Started { name: "m1".into() }),
            ]
        );
        assert_eq!(all[1].member, "ab");
        let json = serde_json::to_value(&all[3]).unwrap();
        assert_eq!(json["event"], "election_lost");
        assert_eq!(json["reason"], "no_quorum");
        assert_eq!(serde_json::to_value(&all[2]).unwrap()["event"], "quorum_lost");
        assert!(r.read(Some(unix_ms() + 60_000)).unwrap().is_empty(), "since filters by time");
    }

    #[test]
    fn refused_pre_votes_are_recorded_once_per_interval_per_peer_and_side() {
        let r = Recorder::off(1);
        let t0 = std::time::Instant::now();
        let s = std::time::Duration::from_secs;
        assert_eq!(r.admit_refused_pre_vote(2, false, t0), Some(0));
        assert_eq!(r.admit_refused_pre_vote(2, false, t0 + s(1)), None);
        assert_eq!(r.admit_refused_pre_vote(2, true, t0 + s(1)), Some(0), "the voter's side on its own");
        assert_eq!(r.admit_refused_pre_vote(3, false, t0 + s(1)), Some(0), "another peer on its own");
        assert_eq!(r.admit_refused_pre_vote(2, false, t0 + s(2)), None);
        assert_eq!(r.admit_refused_pre_vote(2, false, t0 + s(10)), Some(2), "the two in between are counted");
        let text = Event::PreVoteSent {
            to: "m3".into(),
            for_term: 3,
            outcome: Outcome::Refused,
            reason: Some(Refusal::LeaderAlive),
            voter_term: Some(2),
            voter_leader: None,
            unrecorded_before: 2,
        }
        .text();
        assert!(text.contains("2 more refused since the last one recorded"), "{text}");
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (tx, _rx) = sync_channel::<Record>(1);
        let r = Recorder {
            inner: Arc::new(Inner {
                member: 1,
                tx: Some(tx),
                ring: None,
                term: AtomicU64::new(0),
                vote_refused_term: AtomicU64::new(0),
                unanswered: Mutex::default(),
                refused_pre_votes: Mutex::default(),
                start: Mutex::default(),
                dropped: Counter::default(),
            }),
        };
        for _ in 0..5 {
            r.record(Event::QuorumRegained);
        }
        assert_eq!(r.dropped().get(), 4);
    }
}
