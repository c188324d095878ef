//! The registry reaper (ADR 0005): on the leader, ephemeral instances whose lease expired are
//! evicted, or marked suspect while the eviction brake holds. Every write is term-fenced and
//! compares the record's mod revision, so a deposed leader's decision, or one about a record
//! that changed since (the instance registered again), is a no-op.

use std::collections::BTreeMap;
use std::time::Duration;

use quorate_consensus::Member;
use quorate_kv::Command;
use quorate_registry::{Brake, BrakeConfig, Health, Instance, Kind, Transition, Verdict};

use crate::registry_view::RegistryView;
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

pub async fn run(member: Member, cfg: BrakeConfig, stats: std::sync::Arc<ReaperStats>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut brake = Brake::new(cfg.clone());
    let mut view = RegistryView::new();
    let mut leading: Option<(u64, Instant)> = None;
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let st = member.status();
        if st.leader != Some(st.id) {
            leading = None;
            stats.brake_engaged_zones.store(0, Relaxed);
            continue;
        }
        let term = st.term;
        let since = match leading {
            Some((t, since)) if t == term => since,
            _ => {
                // A new term of leadership: the brake starts afresh, with its takeover hold.
                brake = Brake::new(cfg.clone());
                leading = Some((term, Instant::now()));
                Instant::now()
            }
        };
        let now = Instant::now();
        for (zone, (total, expired, ttl)) in scan(&member, &mut view) {
            let verdict = brake.judge(&zone, expired.len(), total, now - since, ttl, now.into_std());
            for e in expired {
                // An active check that confirmed the instance dead overrides the brake.
                let confirmed_dead = e.instance.check.is_some() && e.instance.health == Health::Critical;
                let verdict = if confirmed_dead { Verdict::Evict } else { verdict.clone() };
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
        stats.brake_engaged_zones.store(brake.engaged().len() as u64, Relaxed);
        for t in brake.take_transitions() {
            match t {
                Transition::Engaged { zone, reason } => warn!(%zone, %reason, "eviction brake engaged"),
                Transition::Released { zone, why } => info!(%zone, why, "eviction brake released"),
            }
        }
    }
}
