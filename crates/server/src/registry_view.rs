//! The registry's records as the leader's background workers (reaper, prober) see them:
//! decoded once per store revision and reused while it stays the same. Heartbeats renew leases
//! without writing, so at rest the revision does not move and a tick decodes nothing.

use quorate_consensus::Member;
use quorate_kv::RangeRequest;
use quorate_registry::{Instance, REGISTRY_PREFIX};

pub struct Record {
    pub key: Vec<u8>,
    pub mod_revision: i64,
    pub instance: Instance,
}

pub struct RegistryView {
    revision: i64,
    records: Vec<Record>,
}

impl RegistryView {
    pub fn new() -> Self {
        RegistryView { revision: -1, records: Vec::new() }
    }

    /// Every registry record at the store's current revision.
    pub fn records(&mut self, member: &Member) -> &[Record] {
        let prefix = REGISTRY_PREFIX.as_bytes().to_vec();
        let req = RangeRequest { range_end: quorate_kv::prefix_end(&prefix), key: prefix, ..Default::default() };
        let fresh = member.read(|s| {
            let revision = s.revision();
            if revision == self.revision {
                return None;
            }
            let kvs = s.range(&req).map(|r| r.kvs).unwrap_or_default();
            Some((revision, kvs))
        });
        if let Some((revision, kvs)) = fresh {
            self.revision = revision;
            self.records = kvs
                .into_iter()
                .filter_map(|kv| {
                    let instance = serde_json::from_slice(&kv.value).ok()?;
                    Some(Record { key: kv.key, mod_revision: kv.mod_revision, instance })
                })
                .collect();
        }
        &self.records
    }
}
