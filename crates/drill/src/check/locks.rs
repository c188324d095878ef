//! Lock safety with fencing: every fenced write the server accepted carries its holder's token
//! (the lock key's create revision). Tokens only grow with the revision the writes were
//! accepted at; an accepted write with an older token after a newer one means two holders'
//! writes were both accepted (the stale holder was not fenced off).

/// An accepted fenced write: the token it carried and the revision it was accepted at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub token: i64,
    pub revision: i64,
}

/// Pairs (newer holder's write, stale holder's later write) that were both accepted.
pub fn check(accepted: &[Accepted]) -> Vec<(Accepted, Accepted)> {
    let mut by_rev = accepted.to_vec();
    by_rev.sort_by_key(|a| a.revision);
    let mut newest: Option<Accepted> = None;
    let mut out = Vec::new();
    for a in by_rev {
        match newest {
            Some(n) if a.token < n.token => out.push((n, a)),
            Some(n) if a.token == n.token => {}
            _ => newest = Some(a),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(token: i64, revision: i64) -> Accepted {
        Accepted { token, revision }
    }

    #[test]
    fn holders_in_turn_pass() {
        assert!(check(&[a(10, 11), a(10, 12), a(20, 21), a(30, 35), a(30, 36)]).is_empty());
    }

    #[test]
    fn a_stale_holders_accepted_write_is_flagged() {
        // Holder 10 was paused; 20 took over and wrote at 21; 10's write was accepted at 25.
        let bad = check(&[a(10, 11), a(20, 21), a(10, 25)]);
        assert_eq!(bad, vec![(a(20, 21), a(10, 25))]);
    }
}
