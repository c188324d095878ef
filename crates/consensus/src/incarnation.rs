//! The cluster's incarnation (ADR 0009 §2): a number every member stores in its Raft log store
//! and every peer message carries in its `quorate-incarnation` metadata. `quorate ctl recover`
//! raises it on the survivors of a quorum loss, so that a member it dropped, restarted on its
//! old data, is refused by every member of the new cluster before any of its messages reaches
//! Raft: it cannot vote, campaign, replicate or raise a term there.
//!
//! A message without the header (a member older than incarnations) counts as incarnation 1,
//! so a rolling upgrade works, and is refused once a recovery has happened.
//!
//! One member runs per process, so the incarnation and the fenced state are process-wide.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// gRPC metadata carrying the sender's incarnation.
pub const HEADER: &str = "quorate-incarnation";
/// gRPC metadata naming the sender (hex id), so that a refusal can tell a member the recovery
/// dropped from one it left as a survivor that has yet to apply the plan.
const FROM_HEADER: &str = "quorate-from";

/// How a refusal tells a sender that it is of an older incarnation (it fences itself).
const STALE_PREFIX: &str = "this member belongs to incarnation ";

static CURRENT: AtomicU64 = AtomicU64::new(1);
static ME: AtomicU64 = AtomicU64::new(0);
/// The members the recovery that set our incarnation kept as voters (they may still be applying
/// it: told so, they are not fenced).
static SURVIVORS: Mutex<Vec<u64>> = Mutex::new(Vec::new());

/// Told when this member becomes fenced (the member's `serving` signal).
static ON_FENCE: std::sync::OnceLock<tokio::sync::watch::Sender<u64>> = std::sync::OnceLock::new();

pub(crate) fn on_fence(serving: tokio::sync::watch::Sender<u64>) {
    let _ = ON_FENCE.set(serving);
}
static FENCED: Mutex<Option<(String, Option<Instant>)>> = Mutex::new(None);

/// How often a fenced member repeats its error in the log.
const FENCED_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// This member's incarnation.
pub fn current() -> u64 {
    CURRENT.load(Ordering::Acquire)
}

pub(crate) fn set(n: u64) {
    CURRENT.store(n.max(1), Ordering::Release);
}

/// This member's id (sent with every message) and the survivors of the recovery that set its
/// incarnation, if one did.
pub(crate) fn set_identity(me: u64, survivors: Vec<u64>) {
    ME.store(me, Ordering::Release);
    *SURVIVORS.lock().unwrap() = survivors;
}

/// Why this member is fenced (it met a member of a newer incarnation), if it is: it then serves
/// no client request.
pub fn fenced() -> Option<String> {
    FENCED.lock().unwrap().as_ref().map(|(m, _)| m.clone())
}

/// What a member of incarnation `old` is told once the cluster is at `new`.
pub fn stale_message(old: u64, new: u64) -> String {
    format!(
        "{STALE_PREFIX}{old}; the cluster is at {new}: wipe its data directory and add it with `member add` \
         (it was dropped by `quorate ctl recover`)"
    )
}

fn fence(message: String) {
    let mut f = FENCED.lock().unwrap();
    let due = match &*f {
        Some((_, Some(logged))) => logged.elapsed() >= FENCED_LOG_INTERVAL,
        _ => true,
    };
    if due {
        tracing::error!(%message, "fenced: this member was dropped from the cluster by a recovery");
    }
    let logged = if due { Some(Instant::now()) } else { f.as_ref().and_then(|(_, t)| *t) };
    let first = f.is_none();
    *f = Some((message, logged));
    drop(f);
    if first {
        if let Some(s) = ON_FENCE.get() {
            s.send_modify(|n| *n += 1);
        }
    }
}

/// Put this member's incarnation on an outgoing request.
pub(crate) fn stamp<T>(req: &mut tonic::Request<T>) {
    req.metadata_mut().insert(HEADER, current().to_string().parse().expect("a number is valid metadata"));
    let me = ME.load(Ordering::Acquire);
    if me != 0 {
        req.metadata_mut().insert(FROM_HEADER, format!("{me:x}").parse().expect("hex is valid metadata"));
    }
}

/// Put this member's incarnation on a response (a sender drops answers of another one).
pub(crate) fn stamp_response<T>(resp: &mut tonic::Response<T>) {
    resp.metadata_mut().insert(HEADER, current().to_string().parse().expect("a number is valid metadata"));
}

/// The incarnation a request or response carries (1 when it carries none).
pub(crate) fn of(meta: &tonic::metadata::MetadataMap) -> Result<u64, tonic::Status> {
    match meta.get(HEADER).map(|v| v.to_str().ok().and_then(|s| s.parse::<u64>().ok())) {
        None => Ok(1),
        Some(Some(n)) if n >= 1 => Ok(n),
        Some(_) => Err(tonic::Status::invalid_argument(format!("bad {HEADER} metadata"))),
    }
}

/// The member a message says it is from.
pub(crate) fn sender(meta: &tonic::metadata::MetadataMap) -> Option<u64> {
    meta.get(FROM_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| u64::from_str_radix(v, 16).ok())
}

/// On receipt, before anything reaches Raft: a message from another incarnation is refused.
pub(crate) fn check(meta: &tonic::metadata::MetadataMap) -> Result<(), tonic::Status> {
    let (theirs, ours) = (of(meta)?, current());
    let from = sender(meta);
    match theirs.cmp(&ours) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Less if from.is_some_and(|f| SURVIVORS.lock().unwrap().contains(&f)) => {
            Err(tonic::Status::failed_precondition(format!(
                "member at incarnation {ours} refuses a message of incarnation {theirs}: the sender is a survivor of the \
                 recovery that raised it and has yet to apply it (run `quorate ctl recover --apply` again)"
            )))
        }
        std::cmp::Ordering::Less => Err(tonic::Status::failed_precondition(stale_message(theirs, ours))),
        // The sender is of a newer incarnation: this member is either one the recovery dropped
        // or a survivor yet to apply it. It cannot tell which, so it only refuses; a dropped
        // member learns it from the refusals of its own messages (`note`).
        std::cmp::Ordering::Greater => Err(tonic::Status::failed_precondition(format!(
            "member at incarnation {ours} refuses a message of incarnation {theirs}: it was dropped by a recovery, \
             or has yet to apply it"
        ))),
    }
}

/// On a sender, for every refusal it gets: one that says this member is of an older
/// incarnation fences it.
///
/// Also when this member's own cluster still elects a leader: dropped members restarted
/// together may be a majority of the old membership, and must not serve as a second cluster.
/// Of two incarnations that can reach each other, only the newer one serves.
pub(crate) fn note(status: &tonic::Status) {
    if status.code() == tonic::Code::FailedPrecondition && status.message().starts_with(STALE_PREFIX) {
        fence(status.message().to_string());
    }
}

/// On a sender, for every answer: one from another incarnation is not to be believed.
pub(crate) fn check_answer(meta: &tonic::metadata::MetadataMap) -> Result<(), String> {
    let (theirs, ours) = (of(meta).map_err(|s| s.message().to_string())?, current());
    if theirs == ours {
        Ok(())
    } else {
        Err(format!("an answer of incarnation {theirs} to a member at {ours}: ignored"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(n: Option<&str>) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        if let Some(n) = n {
            m.insert(HEADER, n.parse().unwrap());
        }
        m
    }

    /// One test, as the state is process-wide.
    #[test]
    fn messages_of_another_incarnation_are_refused_and_a_newer_one_fences_this_member() {
        set(1);
        assert!(check(&meta(None)).is_ok(), "an older binary, before any recovery");
        assert!(check(&meta(Some("1"))).is_ok());
        assert!(check(&meta(Some("x"))).is_err());
        assert!(check(&meta(Some("0"))).is_err());
        set(2);
        let refused = check(&meta(None)).unwrap_err();
        assert!(refused.message().starts_with("this member belongs to incarnation 1; the cluster is at 2"));
        assert!(check(&meta(Some("1"))).is_err());
        assert_eq!(fenced(), None, "an older sender does not fence the receiver");
        note(&tonic::Status::failed_precondition("member at incarnation 2 refuses a message of incarnation 3"));
        assert_eq!(fenced(), None, "the newer side's refusal does not fence the sender");
        // A survivor of our recovery that has not applied it yet is told so, not fenced.
        set_identity(1, vec![1, 7]);
        let mut from7 = meta(Some("1"));
        from7.insert(FROM_HEADER, "7".parse().unwrap());
        let told = check(&from7).unwrap_err();
        assert!(!told.message().starts_with(STALE_PREFIX), "{}", told.message());
        assert!(check(&meta(Some("3"))).is_err());
        assert_eq!(fenced(), None, "a newer message is refused, and fences no one");
        note(&tonic::Status::failed_precondition(stale_message(2, 3)));
        assert!(fenced().is_some_and(|m| m.contains("incarnation 2; the cluster is at 3")), "{:?}", fenced());
    }
}
