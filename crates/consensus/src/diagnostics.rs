//! What `quorate ctl status` needs of a member beyond etcd's Maintenance.Status: the role as
//! Raft sees it (candidate included), how long since it last heard from the leader, and how
//! long its recent log commits (fsyncs) took. Read-only: it never touches Raft's state.

use std::time::Duration;

use openraft::rt::{Instant as _, WatchReceiver as _};
use openraft::ServerState;

use crate::{Member, RaftStatus};

/// The fsync p99 is over the commits of the last minute (as etcd-mixin's rate over minutes):
/// a slow commit from long ago, or one that spanned a pause of the process, ages out.
pub const FSYNC_WINDOW: Duration = Duration::from_secs(60);

/// One member's diagnostic view of itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberDiagnostics {
    pub raft: RaftStatus,
    /// Milliseconds since the leader was last heard from (on the leader: since a quorum last
    /// acknowledged it). `None` when it never was.
    pub last_leader_contact_ms: Option<u64>,
    /// The 99th percentile of the log commits (each one fsync) of the last `FSYNC_WINDOW`, in
    /// microseconds.
    pub fsync_p99_us: Option<u64>,
    /// How many commits `fsync_p99_us` is taken over.
    pub fsync_samples: usize,
}

/// The `q`-quantile (0..=1) of `samples` by the nearest-rank method; `None` when empty.
pub fn quantile(samples: &[u64], q: f64) -> Option<u64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

impl Member {
    pub fn diagnostics(&self) -> MemberDiagnostics {
        let raft = self.status();
        let last_leader_contact_ms = {
            let m = self.inner.raft.metrics().borrow_watched().clone();
            if m.state == ServerState::Leader {
                m.last_quorum_acked.as_ref().map(|t| t.elapsed().as_millis() as u64)
            } else {
                let contact = *self.inner.last_leader_contact.lock().unwrap();
                contact.map(|t| t.elapsed().as_millis() as u64)
            }
        };
        let samples: Vec<u64> = {
            let recent = self.inner.log.stats.recent_commit_us.lock().unwrap();
            recent.iter().filter(|(at, _)| at.elapsed() <= FSYNC_WINDOW).map(|(_, us)| *us).collect()
        };
        MemberDiagnostics {
            raft,
            last_leader_contact_ms,
            fsync_p99_us: quantile(&samples, 0.99),
            fsync_samples: samples.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantile_is_the_nearest_rank() {
        assert_eq!(quantile(&[], 0.99), None);
        assert_eq!(quantile(&[7], 0.99), Some(7));
        let hundred: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&hundred, 0.99), Some(99));
        assert_eq!(quantile(&hundred, 0.5), Some(50));
        let mut skewed = vec![1; 98];
        skewed.extend([500, 900]);
        assert_eq!(quantile(&skewed, 0.99), Some(500));
    }
}
