//! Following this member's Raft status as Raft publishes it: what the server needs to stamp
//! every log line about consensus with the term and log indexes (crates/server's
//! `log_context`). Owns no state; it never blocks Raft (it reads Raft's metrics watch).

use std::time::Duration;

use openraft::rt::WatchReceiver as _;
use tracing::info;

use crate::{Member, RaftStatus};

impl Member {
    /// Call `see` with this member's status now, at once after every change of term, role,
    /// leader or membership, and after changes of the log indexes at most once per
    /// `index_refresh` (they move with every write; following each would wake a task per
    /// write). Returns when Raft stops. Logs each new leader after `see` has been told, so that
    /// line already carries the new term.
    pub async fn follow_status(&self, index_refresh: Duration, mut see: impl FnMut(&RaftStatus)) {
        let mut server = self.inner.raft.server_metrics();
        let mut all = self.inner.raft.metrics();
        let mut last_leader = None;
        loop {
            let st = self.status();
            see(&st);
            if st.leader.is_some() && st.leader != last_leader {
                let leader = st.leader.map(|l| format!("{l:x}")).unwrap_or_default();
                info!(%leader, state = st.state, "elected leader");
            }
            last_leader = st.leader;
            let indexes = async {
                tokio::time::sleep(index_refresh).await;
                all.changed().await
            };
            let changed = tokio::select! {
                r = server.changed() => r,
                r = indexes => r,
            };
            if changed.is_err() {
                return;
            }
        }
    }
}
