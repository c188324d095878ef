//! The checkers, one file each.

pub mod linearizable;
