//! Snapshot files (`Maintenance.Snapshot`, `etcdctl snapshot save`) and restoring a fresh data
//! directory from one (`quorate snapshot restore`), as ADR 0004 describes.
//!
//! A file is `MAGIC`, the length of the store's bincode image (u64, little-endian), the image,
//! the auth section (`AUTH_SECTION`, its length as a u64, the users and roles in bincode; files
//! written before it have none and restore with auth off), zero padding to a multiple of 512
//! bytes, and a SHA-256 of everything before it: the same
//! trailer convention as etcd's snapshots, which `etcdctl snapshot save` checks (its files are
//! 512-byte pages plus a 32-byte digest).
//! A restored directory holds that image as the state machine's snapshot at log index 0 of a
//! new cluster whose membership is the restore's `--initial-cluster`, and an empty log purged up
//! to it: the members start as an initialised cluster and elect a leader.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use openraft::Membership;
use quorate_kv::auth::AuthStore;
use quorate_kv::{Store, StoreSnapshot};
use sha2::{Digest, Sha256};

use crate::types::{LogId, SnapshotMeta, StoredMembership};
use crate::{MemberNode, NodeId};

/// First bytes of every snapshot file.
pub const MAGIC: &[u8] = b"quorate-snapshot v1\n";
const DIGEST_BYTES: usize = 32;

/// Starts the users, roles and auth state after the image. Padding (zeros) never starts so.
const AUTH_SECTION: &[u8; 8] = b"qauth\x01\x00\xfe";

/// etcd's snapshot files are whole 512-byte pages plus the digest; etcdctl checks the size.
const PAGE_BYTES: usize = 512;

/// The snapshot file of `store`.
pub fn encode(store: &Store) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&[0; 8]);
    bincode::serialize_into(&mut out, &store.snapshot_view()).expect("a store always serializes");
    let image_len = (out.len() - MAGIC.len() - 8) as u64;
    out[MAGIC.len()..MAGIC.len() + 8].copy_from_slice(&image_len.to_le_bytes());
    // Without the token key: a backup must not let its holder forge tokens for the cluster.
    let auth = bincode::serialize(&store.auth().without_token_key()).expect("the auth store always serializes");
    out.extend_from_slice(AUTH_SECTION);
    out.extend_from_slice(&(auth.len() as u64).to_le_bytes());
    out.extend_from_slice(&auth);
    out.resize(out.len().div_ceil(PAGE_BYTES) * PAGE_BYTES, 0);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

/// Check and decode a snapshot file: the keyspace, and the users and roles (empty, auth off,
/// for a file written before they were saved).
pub fn decode(bytes: &[u8]) -> Result<(StoreSnapshot, AuthStore), String> {
    if !bytes.starts_with(MAGIC) {
        return Err("not a quorate snapshot file (bad header)".into());
    }
    if bytes.len() < MAGIC.len() + 8 + DIGEST_BYTES || bytes.len() % PAGE_BYTES != DIGEST_BYTES {
        return Err(format!("snapshot file is truncated ({} bytes)", bytes.len()));
    }
    let (body, digest) = bytes.split_at(bytes.len() - DIGEST_BYTES);
    if Sha256::digest(body).as_slice() != digest {
        return Err("snapshot file is corrupt or truncated (SHA-256 mismatch)".into());
    }
    let len_bytes: [u8; 8] = body[MAGIC.len()..MAGIC.len() + 8].try_into().expect("8 bytes");
    let image = &body[MAGIC.len() + 8..];
    let len = u64::from_le_bytes(len_bytes) as usize;
    if len > image.len() {
        return Err("snapshot file is corrupt (image length past the end)".into());
    }
    let snapshot = bincode::deserialize(&image[..len]).map_err(|e| format!("snapshot file is corrupt: {e}"))?;
    let rest = &image[len..];
    let auth = match rest.strip_prefix(AUTH_SECTION.as_slice()) {
        Some(section) if section.len() >= 8 => {
            let n = u64::from_le_bytes(section[..8].try_into().expect("8 bytes")) as usize;
            let data = section[8..].get(..n).ok_or("snapshot file is corrupt (auth section past the end)")?;
            bincode::deserialize(data).map_err(|e| format!("snapshot file is corrupt (auth section): {e}"))?
        }
        Some(_) => return Err("snapshot file is corrupt (auth section truncated)".into()),
        None => AuthStore::default(),
    };
    Ok((snapshot, auth))
}

/// The log position a restored cluster starts from: index 0, decided by no leader in term 0,
/// alike on every member restored with the same membership.
fn restored_log_id(members: &BTreeMap<NodeId, MemberNode>) -> LogId {
    use openraft::vote::RaftLeaderIdExt;
    let first = *members.keys().next().expect("at least one member");
    let leader = openraft::alias::LeaderIdOf::<crate::TypeConfig>::new_committed(0, first);
    openraft::LogId::new(leader, 0)
}

/// Build a fresh data directory at `data_dir` holding `bytes` (a checked snapshot file) as the
/// state of a new cluster of `members`. Refuses a directory that already has data.
pub fn restore(bytes: &[u8], data_dir: &Path, members: &BTreeMap<NodeId, MemberNode>) -> Result<i64, String> {
    let (mut snapshot, auth) = decode(bytes)?;
    // A lease's `set_at` names its last decision by log index; the restored cluster's log starts
    // again at 0, so an old index could collide with a new renewal's and make a stale deadline
    // pass for the renewal's (ADR 0008). Every lease starts from the restored position.
    for lease in &mut snapshot.leases {
        lease.set_at = 0;
    }
    if members.is_empty() {
        return Err("--initial-cluster names no member".into());
    }
    let has_data = std::fs::read_dir(data_dir).map(|mut d| d.next().is_some()).unwrap_or(false);
    if has_data {
        return Err(format!("data directory {} is not empty; restore needs a fresh one", data_dir.display()));
    }
    std::fs::create_dir_all(data_dir).map_err(|e| format!("create {}: {e}", data_dir.display()))?;
    // With no token key: every member of the restored cluster must sign with the same one, so
    // the first to sign a token proposes it through the log (`AuthCommand::SetTokenKey`).
    let mut store = Store::from_snapshot(snapshot);
    store.set_auth(auth);
    let revision = store.revision();

    let log_id = restored_log_id(members);
    let voters: BTreeSet<NodeId> = members.keys().copied().collect();
    let membership = Membership::new(vec![voters], members.clone()).map_err(|e| format!("membership: {e}"))?;
    let meta =
        SnapshotMeta { last_log_id: Some(log_id), last_membership: StoredMembership::new(Some(log_id), membership) };
    let sm = crate::state_machine::StateMachine::open(&data_dir.join("state.redb"), std::time::Duration::ZERO)
        .map_err(|e| format!("create state: {e}"))?;
    sm.save_image(&meta, &store).map_err(|e| format!("write state: {e}"))?;
    crate::log_store::LogStore::write_restored(data_dir, log_id).map_err(|e| format!("write raft log: {e}"))?;
    Ok(revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(n: usize) -> Store {
        let mut s = Store::new();
        for i in 0..n {
            let put =
                quorate_kv::PutRequest { key: format!("k{i}").into(), value: b"v".to_vec(), ..Default::default() };
            s.apply(&quorate_kv::Command::Put(put), quorate_kv::LogPosition { index: 1, term: 1 });
        }
        s
    }

    #[test]
    fn a_file_round_trips_and_damage_is_refused() {
        let s = store_with(10);
        let file = encode(&s);
        assert_eq!(file.len() % 512, 32, "pages plus a digest, as etcdctl expects");
        let back = Store::from_snapshot(decode(&file).unwrap().0);
        assert_eq!(back.revision(), s.revision());
        assert_eq!(back.hash_kv(0).unwrap(), s.hash_kv(0).unwrap());

        let mut flipped = file.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 1;
        assert!(decode(&flipped).unwrap_err().contains("corrupt"));
        assert!(decode(&file[..file.len() - 5]).is_err(), "truncated");
        assert!(decode(&file[..10]).is_err(), "truncated inside the header");
        assert!(decode(b"SQLite format 3\0").unwrap_err().contains("not a quorate snapshot"));
    }

    #[test]
    fn users_and_roles_ride_in_the_file_and_older_files_restore_with_auth_off() {
        use quorate_kv::auth::AuthCommand;
        let mut s = store_with(3);
        for cmd in [
            AuthCommand::UserAdd { name: "root".into(), password_hash: Some("h".into()) },
            AuthCommand::UserGrantRole { user: "root".into(), role: "root".into() },
            AuthCommand::Enable { token_key: b"k".to_vec() },
        ] {
            s.apply(&quorate_kv::Command::Auth(cmd), quorate_kv::LogPosition { index: 2, term: 1 }).result.unwrap();
        }
        let (_, auth) = decode(&encode(&s)).unwrap();
        assert_eq!(auth, s.auth().without_token_key(), "users and roles, never the token key");
        assert_ne!(&auth, s.auth());
        assert!(auth.enabled());

        // A file of the format before the auth section: image, zero padding, digest.
        let mut old = MAGIC.to_vec();
        let image = bincode::serialize(&s.snapshot_view()).unwrap();
        old.extend_from_slice(&(image.len() as u64).to_le_bytes());
        old.extend_from_slice(&image);
        old.resize(old.len().div_ceil(PAGE_BYTES) * PAGE_BYTES, 0);
        let digest = Sha256::digest(&old);
        old.extend_from_slice(&digest);
        let (snap, auth) = decode(&old).unwrap();
        assert_eq!(Store::from_snapshot(snap).revision(), s.revision());
        assert_eq!(auth, AuthStore::default());
    }
}
