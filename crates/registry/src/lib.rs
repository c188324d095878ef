//! The registry's rules: what an instance is, which names and values are valid, where
//! instances live in the keyspace, and the eviction brake. Pure: no IO, no clock of its own
//! (callers pass `now`), so every rule is table-tested. It never writes anything itself: the
//! server turns its decisions into term-fenced commands (ADR 0005).

mod brake;
mod checks;
mod guard;
mod keys;
mod model;
mod writes;

pub use brake::{Brake, BrakeConfig, BrakeState, CheckChange, EngagedState, Transition, Verdict, ZoneState};
pub use checks::{http_outcome, step, CheckSpec, CheckState, Step};
pub use guard::{first_registry_write, first_write_under, range_overlaps_prefix, touches_registry, Refused};
pub use keys::{instance_key, namespace_prefix, parse_instance_key, service_prefix, BRAKE_STATE_KEY, REGISTRY_PREFIX};
pub use model::{check_name, Health, Instance, Kind, RegisterRequest, RegistryError, DEFAULT_NAMESPACE};
pub use writes::{delete_if_unchanged, replace_if_unchanged};
