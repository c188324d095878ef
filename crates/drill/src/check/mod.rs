//! The checkers, one file each. Each is a pure function of what the drill recorded.

pub mod linearizable;
pub mod locks;
pub mod lost_writes;
pub mod watch;
