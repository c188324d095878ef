//! Where the registry lives in the keyspace (ADR 0005):
//! `/quorate/registry/<namespace>/<service>/<instance id>`. Names never contain `/`, so one
//! service's prefix never covers another's.

pub const REGISTRY_PREFIX: &str = "/quorate/registry/";

/// Where the leader replicates the eviction brake's state (ADR 0005), outside the records'
/// prefix so that no reader of instances meets it. Read-only over the KV APIs like them.
pub const BRAKE_STATE_KEY: &str = "/quorate/brake";

pub fn namespace_prefix(ns: &str) -> String {
    format!("{REGISTRY_PREFIX}{ns}/")
}

pub fn service_prefix(ns: &str, service: &str) -> String {
    format!("{REGISTRY_PREFIX}{ns}/{service}/")
}

pub fn instance_key(ns: &str, service: &str, id: &str) -> String {
    format!("{REGISTRY_PREFIX}{ns}/{service}/{id}")
}

/// (namespace, service, instance id) of a registry key.
pub fn parse_instance_key(key: &[u8]) -> Option<(String, String, String)> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(REGISTRY_PREFIX)?;
    let mut parts = rest.splitn(3, '/');
    let (ns, svc, id) = (parts.next()?, parts.next()?, parts.next()?);
    if ns.is_empty() || svc.is_empty() || id.is_empty() || id.contains('/') {
        return None;
    }
    Some((ns.into(), svc.into(), id.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_prefixes_nest() {
        let k = instance_key("default", "web", "web-1:8080");
        assert_eq!(parse_instance_key(k.as_bytes()), Some(("default".into(), "web".into(), "web-1:8080".into())));
        assert!(k.starts_with(&service_prefix("default", "web")));
        assert!(k.starts_with(&namespace_prefix("default")));
        assert!(!k.starts_with(&service_prefix("default", "we")), "web is not under we/");
        for bad in ["/quorate/registry/a/b", "/quorate/registry/a//c", "/other/a/b/c", "/quorate/registry/a/b/c/d"] {
            assert_eq!(parse_instance_key(bad.as_bytes()), None, "{bad}");
        }
    }
}
