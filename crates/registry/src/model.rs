//! Instances and what a registration may say.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const DEFAULT_NAMESPACE: &str = "default";
pub const DEFAULT_WEIGHT: u32 = 100;
pub const WEIGHT_MAX: u32 = 1000;
pub const DEFAULT_HEARTBEAT_INTERVAL_S: u64 = 5;
pub const DEFAULT_TTL_S: u64 = 15;
/// A TTL longer than this is a mistake (an instance that vanished would linger for hours).
pub const TTL_MAX_S: u64 = 3600;
pub const NAME_BYTES_MAX: usize = 128;
pub const TAGS_MAX: usize = 64;
pub const META_ENTRIES_MAX: usize = 64;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Lives while heartbeats arrive (bound to a lease).
    #[default]
    Ephemeral,
    /// Lives until deregistered; its health comes from active checks.
    Persistent,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    #[default]
    Passing,
    Warning,
    Critical,
}

/// One registered endpoint of a user's service, as stored (JSON) under its instance key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub namespace: String,
    pub service: String,
    pub id: String,
    pub address: String,
    pub port: u16,
    pub zone: String,
    pub weight: u32,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub kind: Kind,
    pub health: Health,
    /// Its lease expired while the eviction brake held: still listed, flagged.
    #[serde(default)]
    pub suspect: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspect_reason: Option<String>,
    /// Its active check asked to mark it critical or deregister it while the eviction brake
    /// held its zone (many instances failing at once): kept as it was, served, and flagged
    /// with the brake's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brake_hold: Option<String>,
    pub heartbeat_interval_s: u64,
    pub ttl_s: u64,
    /// The lease an ephemeral instance's heartbeats renew; 0 for persistent instances.
    pub lease: i64,
    /// Who registered it (the authenticated user, with auth on): shown wherever it is listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_by: Option<String>,
    /// The id of its TTL check when registered through Consul (`service:<id>` if unnamed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_id: Option<String>,
    /// An active check the leader runs against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<crate::CheckSpec>,
}

impl Instance {
    /// Passing and not suspect: what `?healthy=true` returns.
    pub fn is_healthy(&self) -> bool {
        self.health == Health::Passing && !self.suspect
    }

    /// Why the eviction brake holds this instance, if it does (suspect, or a check's change
    /// held): what makes an answer `degraded`.
    pub fn degraded_reason(&self) -> Option<String> {
        if self.suspect {
            return Some(self.suspect_reason.clone().unwrap_or_default());
        }
        self.brake_hold.clone()
    }
}

/// The body of a native `PUT .../instances/{id}`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub address: String,
    pub port: i64,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub weight: Option<i64>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    #[serde(default)]
    pub kind: Kind,
    #[serde(default)]
    pub heartbeat_interval_s: Option<u64>,
    #[serde(default)]
    pub ttl_s: Option<u64>,
    #[serde(default)]
    pub check: Option<crate::CheckSpec>,
    /// `<key>@<revision>`: store the registration only while that lock or election key is
    /// held at that revision (ADR 0004). Not stored.
    #[serde(default)]
    pub fence: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RegistryError {
    #[error("invalid {what} {value:?}: 1 to 128 characters of letters, digits, '.', '_', '-' (and ':' in ids)")]
    InvalidName { what: &'static str, value: String },
    #[error("port {0} is out of range 1..=65535")]
    InvalidPort(i64),
    #[error("weight {0} is out of range 0..=1000")]
    InvalidWeight(i64),
    #[error("address is empty")]
    MissingAddress,
    #[error("ttl_s {ttl_s} must be at least heartbeat_interval_s {heartbeat_interval_s} and at most 3600")]
    InvalidTtl { ttl_s: u64, heartbeat_interval_s: u64 },
    #[error("heartbeat_interval_s must be at least 1")]
    InvalidHeartbeat,
    #[error("too many {what} (at most {max})")]
    TooMany { what: &'static str, max: usize },
    #[error("invalid check: {0}")]
    InvalidCheck(String),
}

impl RegistryError {
    /// A stable, machine-readable code for API error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            RegistryError::InvalidName { .. } => "invalid_name",
            RegistryError::InvalidPort(_) => "invalid_port",
            RegistryError::InvalidWeight(_) => "invalid_weight",
            RegistryError::MissingAddress => "missing_address",
            RegistryError::InvalidTtl { .. } | RegistryError::InvalidHeartbeat => "invalid_ttl",
            RegistryError::TooMany { .. } => "too_many",
            RegistryError::InvalidCheck(_) => "invalid_check",
        }
    }
}

/// Namespaces, services and instance ids: they become key segments, so they may never hold `/`.
pub fn check_name(what: &'static str, value: &str) -> Result<(), RegistryError> {
    let extra = if what == "instance id" { ":" } else { "" };
    let ok = !value.is_empty()
        && value.len() <= NAME_BYTES_MAX
        && value.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c) || extra.contains(c));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidName { what, value: value.chars().take(NAME_BYTES_MAX + 8).collect() })
    }
}

impl RegisterRequest {
    /// Validate and fill in defaults. `lease` is the ephemeral instance's lease (0 otherwise).
    pub fn into_instance(self, ns: &str, service: &str, id: &str, lease: i64) -> Result<Instance, RegistryError> {
        self.into_instance_with(ns, service, id, lease, true)
    }

    /// As `into_instance`; `port_required: false` also accepts port 0 (Consul services may
    /// have no port).
    pub fn into_instance_with(
        self,
        ns: &str,
        service: &str,
        id: &str,
        lease: i64,
        port_required: bool,
    ) -> Result<Instance, RegistryError> {
        check_name("namespace", ns)?;
        check_name("service", service)?;
        check_name("instance id", id)?;
        let address = self.address.trim().to_string();
        if address.is_empty() {
            return Err(RegistryError::MissingAddress);
        }
        let port = u16::try_from(self.port)
            .ok()
            .filter(|p| *p > 0 || !port_required)
            .ok_or(RegistryError::InvalidPort(self.port))?;
        let weight = match self.weight {
            None => DEFAULT_WEIGHT,
            Some(w) => u32::try_from(w).ok().filter(|w| *w <= WEIGHT_MAX).ok_or(RegistryError::InvalidWeight(w))?,
        };
        let heartbeat_interval_s = self.heartbeat_interval_s.unwrap_or(DEFAULT_HEARTBEAT_INTERVAL_S);
        if heartbeat_interval_s == 0 {
            return Err(RegistryError::InvalidHeartbeat);
        }
        let ttl_s = self.ttl_s.unwrap_or(DEFAULT_TTL_S.max(heartbeat_interval_s * 3));
        if ttl_s < heartbeat_interval_s || ttl_s > TTL_MAX_S {
            return Err(RegistryError::InvalidTtl { ttl_s, heartbeat_interval_s });
        }
        if self.tags.len() > TAGS_MAX {
            return Err(RegistryError::TooMany { what: "tags", max: TAGS_MAX });
        }
        if self.meta.len() > META_ENTRIES_MAX {
            return Err(RegistryError::TooMany { what: "meta entries", max: META_ENTRIES_MAX });
        }
        let zone = self.zone.filter(|z| !z.is_empty()).unwrap_or_else(|| "default".into());
        check_name("zone", &zone)?;
        Ok(Instance {
            namespace: ns.into(),
            service: service.into(),
            id: id.into(),
            address,
            port,
            zone,
            weight,
            tags: self.tags,
            meta: self.meta,
            kind: self.kind,
            health: Health::Passing,
            suspect: false,
            suspect_reason: None,
            brake_hold: None,
            heartbeat_interval_s,
            ttl_s,
            lease: if self.kind == Kind::Ephemeral { lease } else { 0 },
            registered_by: None,
            check_id: None,
            check: match self.check {
                Some(c) => Some(c.validated()?),
                None => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(port: i64) -> RegisterRequest {
        RegisterRequest { address: "10.0.0.1".into(), port, ..Default::default() }
    }

    #[test]
    fn defaults_fill_in() {
        let i = req(8080).into_instance("default", "web", "web-1", 7).unwrap();
        assert_eq!((i.weight, i.heartbeat_interval_s, i.ttl_s, i.zone.as_str()), (100, 5, 15, "default"));
        assert_eq!((i.kind, i.health, i.lease), (Kind::Ephemeral, Health::Passing, 7));
        assert!(i.is_healthy());
        let p = RegisterRequest { kind: Kind::Persistent, ..req(1) }.into_instance("ns", "db", "db:1", 7).unwrap();
        assert_eq!(p.lease, 0, "persistent instances own no lease");
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let long = "x".repeat(129);
        let cases: Vec<(RegisterRequest, (&str, &str, &str), &str)> = vec![
            (req(0), ("default", "web", "a"), "invalid_port"),
            (req(65536), ("default", "web", "a"), "invalid_port"),
            (req(-1), ("default", "web", "a"), "invalid_port"),
            (RegisterRequest { weight: Some(1001), ..req(80) }, ("default", "web", "a"), "invalid_weight"),
            (RegisterRequest { weight: Some(-5), ..req(80) }, ("default", "web", "a"), "invalid_weight"),
            (RegisterRequest { address: " ".into(), ..req(80) }, ("default", "web", "a"), "missing_address"),
            (
                RegisterRequest { ttl_s: Some(2), heartbeat_interval_s: Some(5), ..req(80) },
                ("d", "w", "a"),
                "invalid_ttl",
            ),
            (RegisterRequest { heartbeat_interval_s: Some(0), ..req(80) }, ("d", "w", "a"), "invalid_ttl"),
            (req(80), ("default", "we/b", "a"), "invalid_name"),
            (req(80), ("", "web", "a"), "invalid_name"),
            (req(80), ("default", "web", "a:b/c"), "invalid_name"),
            (req(80), ("default", "web:1", "a"), "invalid_name"),
            (req(80), ("default", long.as_str(), "a"), "invalid_name"),
            (RegisterRequest { zone: Some("eu/1".into()), ..req(80) }, ("d", "w", "a"), "invalid_name"),
        ];
        for (r, (ns, svc, id), code) in cases {
            let e = r.into_instance(ns, svc, id, 1).unwrap_err();
            assert_eq!(e.code(), code, "{ns}/{svc}/{id}: {e}");
        }
    }

    #[test]
    fn records_round_trip_through_json() {
        let i = req(8080).into_instance("default", "web", "web-1", 7).unwrap();
        let back: Instance = serde_json::from_slice(&serde_json::to_vec(&i).unwrap()).unwrap();
        assert_eq!(back, i);
        assert!(serde_json::from_str::<RegisterRequest>(r#"{"address":"a","port":1,"colour":"red"}"#).is_err());
    }
}
