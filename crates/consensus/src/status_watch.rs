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
    /// write). Returns when Raft stops. Logs each leader it learns of, once per leader and term
    /// (openraft can forget a leader and name it again in the same term), after `see` has been
    /// told, so that line already carries the new term.
    pub async fn follow_status(&self, index_refresh: Duration, mut see: impl FnMut(&RaftStatus)) {
        let mut server = self.inner.raft.server_metrics();
        let mut all = self.inner.raft.metrics();
        let mut logged = None;
        loop {
            let st = self.status();
            see(&st);
            if let Some(leader) = st.leader.filter(|l| logged != Some((*l, st.term))) {
                info!(leader = %format!("{leader:x}"), state = st.state, "elected leader");
                logged = Some((leader, st.term));
            }
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
