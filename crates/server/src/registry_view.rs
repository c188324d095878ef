//! The registry's records as the leader's background workers (reaper, prober) see them, kept
//! up to date by re-reading only the records that changed since the last look
//! (`RegistryCounts::changed_since`). The whole registry is read and decoded only on the first
//! look, after a snapshot replaced the state, or after falling behind the change queue; the
//! store's lock is held for the copy, never for the decoding.

use std::sync::Arc;

use quorate_consensus::Member;
use quorate_kv::{KeyValue, RangeRequest};
use quorate_registry::{Instance, REGISTRY_PREFIX};

use crate::registry_counts::{Changed, Position, RegistryCounts};

pub struct Record {
    pub key: Vec<u8>,
    pub mod_revision: i64,
    pub instance: Instance,
}

pub struct RegistryView {
    changes: Arc<RegistryCounts>,
    at: Position,
    /// Sorted by key.
    records: Vec<Record>,
}

fn decode(kv: KeyValue) -> Option<Record> {
    let instance = serde_json::from_slice(&kv.value).ok()?;
    Some(Record { key: kv.key, mod_revision: kv.mod_revision, instance })
}

impl RegistryView {
    pub fn new(changes: Arc<RegistryCounts>) -> Self {
        RegistryView { changes, at: Position::default(), records: Vec::new() }
    }

    /// Every registry record as the store holds it now.
    pub fn records(&mut self, member: &Member) -> &[Record] {
        let (changed, at) = self.changes.changed_since(self.at);
        match changed {
            Changed::Everything => {
                let prefix = REGISTRY_PREFIX.as_bytes().to_vec();
                let req =
                    RangeRequest { range_end: quorate_kv::prefix_end(&prefix), key: prefix, ..Default::default() };
                let kvs = member.read(|s| s.range(&req).map(|r| r.kvs).unwrap_or_default());
                self.records = kvs.into_iter().filter_map(decode).collect();
            }
            Changed::Keys(keys) => {
                for key in keys {
                    let req = RangeRequest { key: key.clone(), ..Default::default() };
                    let now = member.read(|s| s.range(&req).ok().and_then(|r| r.kvs.into_iter().next()));
                    let record = now.and_then(decode);
                    match (self.records.binary_search_by(|r| r.key.as_slice().cmp(&key)), record) {
                        (Ok(i), Some(r)) => self.records[i] = r,
                        (Ok(i), None) => {
                            self.records.remove(i);
                        }
                        (Err(i), Some(r)) => self.records.insert(i, r),
                        (Err(_), None) => {}
                    }
                }
            }
        }
        self.at = at;
        &self.records
    }
}
