//! What consensus measures on its own hot paths, for the member's `/metrics`: the log
//! writer's fsyncs, the peer transport's round trips and failures, proposals in flight and
//! failed, leader changes and forwarded requests. The instruments live here because only
//! this crate sees those paths; naming, registering and encoding them is the server's job.
//!
//! Everything here is a cheap atomic or a histogram observation: nothing on these paths
//! waits for a scrape.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// etcd's `etcd_disk_wal_fsync_duration_seconds` and `..._backend_commit_...` buckets:
/// 1 ms doubling 14 times (to about 8 s).
pub fn disk_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

/// etcd's `etcd_network_peer_round_trip_time_seconds` buckets: 0.1 ms doubling 16 times.
pub fn peer_rtt_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// Counters keyed by one `kind` label.
pub type KindCounters = Family<Vec<(&'static str, &'static str)>, Counter>;

/// A metric family keyed by etcd's `To` label (the peer's member id in hex).
pub type PeerLabels = Vec<(&'static str, String)>;

/// The `To` label for a peer, spelled as etcd spells member ids.
pub fn to_peer(id: u64) -> PeerLabels {
    vec![("To", format!("{id:x}"))]
}

/// A histogram with the log writer's fsync buckets that `LogStats` can hold by default.
pub struct FsyncHistogram(pub Histogram);

impl Default for FsyncHistogram {
    fn default() -> Self {
        FsyncHistogram(disk_histogram())
    }
}

/// The instruments one member keeps. Cheap to clone (every field is shared).
#[derive(Clone)]
pub struct ConsensusMetrics {
    /// Raft log commits (each one fsync), as etcd's WAL fsync.
    pub wal_fsync_seconds: Histogram,
    /// Commits of the state file (`state.redb`): snapshots written.
    pub backend_commit_seconds: Histogram,
    /// Peer RPC round trips that were answered, by peer.
    pub peer_rtt_seconds: Family<PeerLabels, Histogram, fn() -> Histogram>,
    /// The peer's wall clock minus this member's, as the last probe measured it, by peer
    /// (within half that probe's round trip).
    pub peer_clock_offset_seconds: Family<PeerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Peer RPCs and append streams that failed, by peer.
    pub peer_sent_failures: Family<PeerLabels, Counter>,
    /// Proposals this member has handed to Raft (or forwarded) that have not finished.
    pub proposals_pending: Gauge,
    /// Proposals that ended in an error.
    pub proposals_failed: Counter,
    /// Times this member saw a new leader (from none or from another).
    pub leader_changes: Counter,
    /// Requests this member forwarded to the leader, by kind.
    pub forwarded: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// `forwarded`'s counters, one per kind, made once (`ForwardedCounters`).
    pub(crate) forwarded_by_kind: ForwardedCounters,
    /// Terms this member stood for (an election it started after a granted pre-vote).
    pub elections_started: Counter,
    /// Times this member became leader (never more than `elections_started`: both are counted
    /// once per term from the vote, see `observe`).
    pub elections_won: Counter,
    /// Elections this member started and did not win, by reason (`flight::LostReason`).
    pub elections_lost: KindCounters,
    /// Pre-votes this member refused as a voter, by reason (`flight::Refusal`).
    pub pre_votes_refused: KindCounters,
    /// The flight recorder (`crate::flight`); it counts the events it had to drop.
    pub flight: crate::flight::Recorder,
    /// The lease clock: times it started expiring leases (this member became a quorum-connected
    /// leader; every lease got the grace of one election timeout).
    pub lease_clock_promotions: Counter,
    /// Times it stopped (this member no longer leads).
    pub lease_clock_demotions: Counter,
    /// Times it found this member had not run for a while (a pause, SIGSTOP): on a leader,
    /// every lease gets the grace again.
    pub lease_clock_stalls: Counter,
    /// Times a leader suspended lease expiry because no quorum had answered it lately.
    pub lease_expiry_suspended: Counter,
    /// Leases this member expired as leader (in committed expiry proposals).
    pub leases_expired: Counter,
    /// Applied entries that fencing made no-ops, by kind (`token`, `stale_term`).
    pub fencing_refusals: KindCounters,
}

/// The `kind` label of `quorate_server_forwarded_requests_total`, indexed by
/// `ForwardReq::kind_index`.
pub(crate) const FORWARDED_KINDS: [&str; 12] = [
    "write",
    "read_index",
    "lease_keepalive",
    "lease_ttl",
    "lease_table",
    "lease_marks",
    "membership",
    "members",
    "member_list",
    "removed",
    "app",
    "probe",
];

/// One counter per forwarded kind, taken from the family once: counting a forwarded request
/// is an atomic add, with no label set built and no lock taken on the family.
#[derive(Clone)]
pub(crate) struct ForwardedCounters(std::sync::Arc<[Counter]>);

impl ForwardedCounters {
    fn new(family: &KindCounters) -> Self {
        ForwardedCounters(FORWARDED_KINDS.iter().map(|k| family.get_or_create(&vec![("kind", *k)]).clone()).collect())
    }

    /// Count one request of kind `FORWARDED_KINDS[kind]`.
    pub(crate) fn inc(&self, kind: usize) {
        self.0[kind].inc();
    }
}

impl Default for ConsensusMetrics {
    fn default() -> Self {
        let forwarded = KindCounters::default();
        // Every reason has a series from the start, zero included, so a rate over it is defined.
        let elections_lost = KindCounters::default();
        for r in crate::flight::LostReason::ALL {
            let _ = elections_lost.get_or_create(&vec![("reason", r.label())]);
        }
        let pre_votes_refused = KindCounters::default();
        for r in crate::flight::Refusal::ALL {
            let _ = pre_votes_refused.get_or_create(&vec![("reason", r.label())]);
        }
        ConsensusMetrics {
            wal_fsync_seconds: disk_histogram(),
            backend_commit_seconds: disk_histogram(),
            peer_rtt_seconds: Family::new_with_constructor(peer_rtt_histogram),
            peer_sent_failures: Family::default(),
            peer_clock_offset_seconds: Family::default(),
            proposals_pending: Gauge::default(),
            proposals_failed: Counter::default(),
            leader_changes: Counter::default(),
            forwarded_by_kind: ForwardedCounters::new(&forwarded),
            forwarded,
            elections_started: Counter::default(),
            elections_won: Counter::default(),
            elections_lost,
            pre_votes_refused,
            flight: crate::flight::Recorder::default(),
            lease_clock_promotions: Counter::default(),
            lease_clock_demotions: Counter::default(),
            lease_clock_stalls: Counter::default(),
            lease_expiry_suspended: Counter::default(),
            leases_expired: Counter::default(),
            fencing_refusals: Family::default(),
        }
    }
}

/// Counts a proposal as pending for as long as it lives.
pub(crate) struct PendingGuard(Gauge);

impl PendingGuard {
    pub(crate) fn new(g: &Gauge) -> Self {
        g.inc();
        PendingGuard(g.clone())
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts this thread's allocations, so a test can assert a path makes none.
    struct CountingAlloc;

    thread_local! {
        static ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
            unsafe { std::alloc::System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static COUNTING: CountingAlloc = CountingAlloc;

    /// Every kind has its series from the start, and counting a forwarded request allocates
    /// nothing (it built a label set per request once).
    #[test]
    fn counting_a_forwarded_request_allocates_nothing() {
        let m = ConsensusMetrics::default();
        let before = ALLOCATIONS.with(|n| n.get());
        for i in 0..1200 {
            m.forwarded_by_kind.inc(i % FORWARDED_KINDS.len());
        }
        assert_eq!(ALLOCATIONS.with(|n| n.get()), before, "allocations while counting 1200 forwarded requests");
        for kind in FORWARDED_KINDS {
            assert_eq!(m.forwarded.get_or_create(&vec![("kind", kind)]).get(), 100, "{kind}");
        }
    }

    #[test]
    fn a_pending_proposal_is_counted_until_it_ends() {
        let m = ConsensusMetrics::default();
        let a = PendingGuard::new(&m.proposals_pending);
        let b = PendingGuard::new(&m.proposals_pending);
        assert_eq!(m.proposals_pending.get(), 2);
        drop(a);
        assert_eq!(m.proposals_pending.get(), 1);
        drop(b);
        assert_eq!(m.proposals_pending.get(), 0);
    }
}
