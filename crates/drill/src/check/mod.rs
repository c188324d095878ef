//! The checkers, one file each. Each is a pure function of what the drill recorded.

pub mod convergence;
pub mod leaders;
pub mod lease_expiry;
pub mod leases;
pub mod linearizable;
pub mod locks;
pub mod lost_writes;
pub mod primaries;
pub mod registry;
pub mod revisions;
pub mod watch;
