//! `quorate drill` (issue 5): real faults against a real cluster, a recorded history, and
//! checkers that judge it. Built in steps; this one holds the history model and the
//! linearizability checker, which are pure and tested on known-good and known-bad histories.
//! Nothing here does IO.

pub mod check;
pub mod history;
