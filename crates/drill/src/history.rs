//! What a drill records: every operation a client invoked, with monotonic invoke and complete
//! times, its input, and its output, or `None` when the outcome is unknown (it timed out or
//! the connection died: it may or may not have taken effect).

use serde::{Deserialize, Serialize};

/// Monotonic nanoseconds since the drill started.
pub type Nanos = u64;

/// One operation on one key of a register-like store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    Read,
    Write(String),
    /// Compare-and-set: write `new` only if the value is `expected` (`None`: absent).
    Cas {
        expected: Option<String>,
        new: String,
    },
    Delete,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// What a read saw (`None`: absent).
    Read(Option<String>),
    /// A write or delete was acknowledged.
    Done,
    /// Whether a CAS applied.
    Cas(bool),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub client: u32,
    pub key: String,
    pub invoke: Nanos,
    /// `None`: the outcome is unknown (the operation may have happened, at any time after invoke).
    pub complete: Option<Nanos>,
    pub input: Input,
    /// `None` exactly when `complete` is `None`.
    pub output: Option<Output>,
}

impl Op {
    pub fn is_unknown(&self) -> bool {
        self.output.is_none()
    }
}
