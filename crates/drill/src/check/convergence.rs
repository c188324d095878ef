//! Final convergence: after every fault is healed, every member's HashKV at one revision is
//! the same.

use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemberHash {
    pub member: String,
    pub revision: i64,
    /// `None`: the member did not answer.
    pub hash: Option<u32>,
}

/// `None` when all answered with one hash; otherwise what differed.
pub fn check(hashes: &[MemberHash]) -> Option<String> {
    let first = hashes.first()?;
    let silent: Vec<&str> = hashes.iter().filter(|h| h.hash.is_none()).map(|h| h.member.as_str()).collect();
    if !silent.is_empty() {
        return Some(format!("no HashKV answer from {}", silent.join(", ")));
    }
    if hashes.iter().all(|h| h.hash == first.hash && h.revision == first.revision) {
        return None;
    }
    let all: Vec<String> =
        hashes.iter().map(|h| format!("{}@{}={:08x}", h.member, h.revision, h.hash.unwrap_or(0))).collect();
    Some(format!("hashes differ: {}", all.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_hashes_converge_and_a_different_one_does_not() {
        let h = |m: &str, hash| MemberHash { member: m.into(), revision: 9, hash };
        assert_eq!(check(&[h("m1", Some(1)), h("m2", Some(1))]), None);
        assert!(check(&[h("m1", Some(1)), h("m2", Some(2))]).unwrap().contains("differ"));
        assert!(check(&[h("m1", Some(1)), h("m2", None)]).unwrap().contains("m2"));
    }
}
