//! The registry reaper (ADR 0005): on the leader, ephemeral instances whose lease expired are
//! evicted, or marked suspect while the eviction brake holds. Every write is term-fenced and
//! compares the record's mod revision, so a deposed leader's decision, or one about a record
//! that changed since (the instance registered again), is a no-op.
//!
//! The brake is shared with the prober and replicated (`brake_state`): an expired instance its
//! check confirmed dead is judged as a check-driven removal (it overrides a lease hold, but
//! counts, and a zone of them at once is held too).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use quorate_consensus::Member;
use quorate_kv::Command;
use quorate_registry::{CheckChange, Health, Instance, Kind, Transition, Verdict};

use crate::brake_state::SharedBrake;
use crate::registry_view::RegistryView;
use quorate_consensus::FlightEvent;
use tokio::time::Instant;
use tracing::{info, warn};

/// What the reaper has done on this member, for `/metrics`.
#[derive(Default)]
pub struct ReaperStats {
    pub evicted: std::sync::atomic::AtomicU64,
    pub marked_suspect: std::sync::atomic::AtomicU64,
    /// Zones where the brake holds now (on the leader; 0 elsewhere).
    pub brake_engaged_zones: std::sync::atomic::AtomicU64,
}

/// How often the leader looks for expired instances.
const REAP_INTERVAL: Duration = Duration::from_millis(500);

struct Expired {
    key: Vec<u8>,
    mod_revision: i64,
    instance: Instance,
}

/// Every ephemeral instance by zone: (how many, the expired ones, the longest TTL). Lease
/// expiry does not change the revision, so liveness is looked up on every tick.
fn scan(member: &Member, view: &mut RegistryView) -> BTreeMap<String, (usize, Vec<Expired>, Duration)> {
    let records = view.records(member);
    member.read(|s| {
        let mut zones: BTreeMap<String, (usize, Vec<Expired>, Duration)> = BTreeMap::new();
        for r in records.iter().filter(|r| r.instance.kind == Kind::Ephemeral) {
            let zone = zones.entry(r.instance.zone.clone()).or_default();
            zone.0 += 1;
            zone.2 = zone.2.max(Duration::from_secs(r.instance.ttl_s));
            if s.lease(r.instance.lease).is_none() {
                let e = Expired { key: r.key.clone(), mod_revision: r.mod_revision, instance: r.instance.clone() };
                zone.1.push(e);
            }
        }
        zones
    })
}

/// An active check confirmed it critical: its lease expiry is not the brake's guess to make.
fn confirmed_dead(i: &Instance) -> bool {
    i.check.is_some() && i.health == Health::Critical
}

pub async fn run(
    member: Member,
    brake: Arc<SharedBrake>,
    stats: Arc<ReaperStats>,
    changes: Arc<crate::registry_counts::RegistryCounts>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut view = RegistryView::new(changes);
    let mut leading: Option<(u64, Instant)> = None;
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let st = member.status();
        if st.leader != Some(st.id) {
            leading = None;
            brake.step_down();
            stats.brake_engaged_zones.store(0, Relaxed);
            continue;
        }
        let term = st.term;
        let since = match leading {
            Some((t, since)) if t == term => since,
            _ => {
                // A new term of leadership: the takeover hold counts from now; the brake's
                // window and holds continue from the replicated state.
                leading = Some((term, Instant::now()));
                Instant::now()
            }
        };
        if let Err(e) = brake.take_over(&member, term).await {
            warn!(error = %e, "eviction brake: could not take over the replicated state");
            continue;
        }
        let now = Instant::now();
        for (zone, (total, expired, ttl)) in scan(&member, &mut view) {
            let dead = expired.iter().filter(|e| confirmed_dead(&e.instance)).count();
            let lease_only = expired.len() - dead;
            let judged = brake.with(term, |b| b.judge(&zone, lease_only, total, now - since, ttl, now.into_std()));
            let Some(verdict) = judged else { break };
            for e in expired {
                // A check that confirmed the instance dead overrides a lease hold, but counts.
                let verdict = if confirmed_dead(&e.instance) {
                    let judged =
                        brake.with(term, |b| b.judge_check(&zone, CheckChange::Remove, dead, total, now.into_std()));
                    let Some(v) = judged else { break };
                    v
                } else {
                    verdict.clone()
                };
                let txn = match &verdict {
                    Verdict::Evict => quorate_registry::delete_if_unchanged(&e.key, e.mod_revision),
                    Verdict::Hold { reason } => {
                        if e.instance.suspect && e.instance.suspect_reason.as_deref() == Some(reason) {
                            continue;
                        }
                        let marked =
                            Instance { suspect: true, suspect_reason: Some(reason.clone()), ..e.instance.clone() };
                        quorate_registry::replace_if_unchanged(&e.key, e.mod_revision, &marked)
                    }
                };
                let cmd = Command::TermFenced { term, cmd: Box::new(Command::Txn(txn)) };
                let applied = member
                    .write(cmd)
                    .await
                    .map(|r| matches!(r.result, Some(Ok(quorate_kv::CommandResponse::Txn(ref t))) if t.succeeded));
                match applied {
                    Ok(false) => {}
                    Ok(true) if verdict != Verdict::Evict => {
                        stats.marked_suspect.fetch_add(1, Relaxed);
                    }
                    Ok(true) => {
                        stats.evicted.fetch_add(1, Relaxed);
                        info!(
                        service = %format!("{}/{}", e.instance.namespace, e.instance.service),
                        instance = %e.instance.id,
                        zone = %zone,
                        term,
                        "evicted instance: its lease expired"
                        )
                    }
                    Err(err) => warn!(instance = %e.instance.id, error = %err, "registry reaper write failed"),
                }
            }
        }
        let (engaged, transitions) =
            brake.with(term, |b| (b.engaged().len(), b.take_transitions())).unwrap_or_default();
        stats.brake_engaged_zones.store(engaged as u64, Relaxed);
        for t in transitions {
            match t {
                Transition::Engaged { zone, reason } => {
                    warn!(%zone, %reason, "eviction brake engaged");
                    member.flight().record_in(term, FlightEvent::BrakeEngaged { zone, reason });
                }
                Transition::Released { zone, why } => {
                    info!(%zone, why, "eviction brake released");
                    member.flight().record_in(term, FlightEvent::BrakeReleased { zone, why: why.to_string() });
                }
            }
        }
        brake.checkpoint(&member, term).await;
    }
}
