//! `quorate drill` (issue 5, ADR 0006): real faults against a real cluster, a recorded
//! history, and checkers that judge it. Pure at the bottom (`history`, `check/*`, the report
//! arithmetic), IO at the edges (`net`, `hosts`, `faults`, `workload`, `run`).

pub mod check;
pub mod election;
pub mod faults;
pub mod history;
pub mod hosts;
pub mod http;
pub mod net;
pub mod proxy;
pub mod quorum_loss;
pub mod registry;
pub mod report;
pub mod run;
pub mod workload;

pub use faults::FaultKind;
pub use hosts::Target;
pub use run::{run, DrillConfig};
