//! etcd's auth store, as pure logic (ADR 0010): users, roles, key permissions, whether auth is
//! enabled, and the auth revision that moves on every change. Commands carry passwords already
//! hashed (hashing is slow and belongs to the member that takes the request, not to every
//! member's apply); the rules and errors are etcd's.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The user and the role that may do everything.
pub const ROOT: &str = "root";

/// What a permission allows (etcd's `authpb.Permission.Type`: READ 0, WRITE 1, READWRITE 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PermType {
    Read,
    Write,
    ReadWrite,
}

impl PermType {
    fn allows(self, want: PermType) -> bool {
        self == PermType::ReadWrite || self == want
    }
}

/// A permission on a key (`range_end` empty), a range `[key, range_end)`, or every key from
/// `key` on (`range_end` = `[0]`, etcd's "from key").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    pub perm: PermType,
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The password's hash (a PHC string); `None` for a user made with `--no-password`, who
    /// can only be a client certificate's common name.
    pub password_hash: Option<String>,
    pub roles: BTreeSet<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// Sorted by key, then range end; one entry per (key, range end).
    pub perms: Vec<Permission>,
}

/// A change to the auth store, as a log entry carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthCommand {
    /// Turn auth on. `token_key` (random, chosen by the member that took the request) signs
    /// the tokens `Authenticate` issues from now on; each enable brings a new key.
    Enable {
        token_key: Vec<u8>,
    },
    /// A key for a store that has none (a cluster restored from a backup, which never carries
    /// one): proposed by the member that first needs to sign a token; a no-op once there is one.
    SetTokenKey {
        token_key: Vec<u8>,
    },
    Disable,
    UserAdd {
        name: String,
        password_hash: Option<String>,
    },
    UserDelete {
        name: String,
    },
    UserChangePassword {
        name: String,
        password_hash: Option<String>,
    },
    UserGrantRole {
        user: String,
        role: String,
    },
    UserRevokeRole {
        user: String,
        role: String,
    },
    RoleAdd {
        name: String,
    },
    RoleDelete {
        name: String,
    },
    RoleGrantPermission {
        role: String,
        perm: Permission,
    },
    RoleRevokePermission {
        role: String,
        key: Vec<u8>,
        range_end: Vec<u8>,
    },
}

/// etcd's auth errors, with the messages its clients match on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum AuthError {
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
}

/// The whole auth store: part of the replicated state, carried in snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthStore {
    enabled: bool,
    /// etcd's auth revision: 1 for a new store, one more on every change.
    revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
    /// Signs tokens (HMAC-SHA256); set when auth is first enabled.
    token_key: Vec<u8>,
}

impl Default for AuthStore {
    fn default() -> Self {
        AuthStore { enabled: false, revision: 1, users: BTreeMap::new(), roles: BTreeMap::new(), token_key: Vec::new() }
    }
}

/// etcd's `isValidPermissionRange`: a key, and an end that is empty, "from key" (`[0]`), or
/// after the key.
fn valid_range(key: &[u8], range_end: &[u8]) -> bool {
    !key.is_empty() && (range_end.is_empty() || range_end == [0] || key < range_end)
}

/// A half-open interval of keys; `None` as its end is "every key from the start on".
type Interval<'a> = (std::borrow::Cow<'a, [u8]>, Option<std::borrow::Cow<'a, [u8]>>);

/// The keys `[key, range_end)` names, as a request or a permission states them.
fn interval<'a>(key: &'a [u8], range_end: &'a [u8]) -> Interval<'a> {
    use std::borrow::Cow;
    match range_end {
        [] => {
            // One key: [key, key + "\0").
            let mut next = key.to_vec();
            next.push(0);
            (Cow::Borrowed(key), Some(Cow::Owned(next)))
        }
        [0] => (Cow::Borrowed(key), None),
        end => (Cow::Borrowed(key), Some(Cow::Borrowed(end))),
    }
}

impl AuthStore {
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    pub fn users(&self) -> impl Iterator<Item = (&String, &User)> {
        self.users.iter()
    }

    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    pub fn roles(&self) -> impl Iterator<Item = (&String, &Role)> {
        self.roles.iter()
    }

    /// Apply one command with etcd's rules. A refused command changes nothing; an accepted one
    /// moves the revision (except enabling, which only flips the flag, as etcd).
    pub fn apply(&mut self, cmd: &AuthCommand) -> Result<(), AuthError> {
        use AuthCommand::*;
        match cmd {
            Enable { token_key } => {
                if self.enabled {
                    return Ok(());
                }
                let root = self.users.get(ROOT).ok_or(AuthError::RootUserNotExist)?;
                if !root.roles.contains(ROOT) {
                    return Err(AuthError::RootRoleNotExist);
                }
                // A new key each time auth is turned on: tokens from before a disable stay void.
                self.token_key = token_key.clone();
                self.enabled = true;
                return Ok(());
            }
            Disable => {
                if !self.enabled {
                    return Ok(());
                }
                self.enabled = false;
            }
            SetTokenKey { token_key } => {
                if self.token_key.is_empty() {
                    self.token_key = token_key.clone();
                }
                return Ok(());
            }
            UserAdd { name, password_hash } => {
                if name.is_empty() {
                    return Err(AuthError::UserEmpty);
                }
                if self.users.contains_key(name) {
                    return Err(AuthError::UserAlreadyExist);
                }
                self.users.insert(name.clone(), User { password_hash: password_hash.clone(), roles: BTreeSet::new() });
            }
            UserDelete { name } => {
                if self.enabled && name == ROOT {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                self.users.remove(name).ok_or(AuthError::UserNotFound)?;
            }
            UserChangePassword { name, password_hash } => {
                let user = self.users.get_mut(name).ok_or(AuthError::UserNotFound)?;
                // A user made without a password keeps none (etcd).
                if user.password_hash.is_some() {
                    user.password_hash = password_hash.clone();
                }
            }
            UserGrantRole { user, role } => {
                if !self.users.contains_key(user) {
                    return Err(AuthError::UserNotFound);
                }
                if role != ROOT && !self.roles.contains_key(role) {
                    return Err(AuthError::RoleNotFound);
                }
                let u = self.users.get_mut(user).expect("checked");
                if !u.roles.insert(role.clone()) {
                    return Ok(());
                }
            }
            UserRevokeRole { user, role } => {
                if self.enabled && user == ROOT && role == ROOT {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                let u = self.users.get_mut(user).ok_or(AuthError::UserNotFound)?;
                if !u.roles.remove(role) {
                    return Err(AuthError::RoleNotGranted);
                }
            }
            RoleAdd { name } => {
                if name.is_empty() {
                    return Err(AuthError::RoleEmpty);
                }
                if self.roles.contains_key(name) {
                    return Err(AuthError::RoleAlreadyExist);
                }
                self.roles.insert(name.clone(), Role::default());
            }
            RoleDelete { name } => {
                if self.enabled && name == ROOT {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                self.roles.remove(name).ok_or(AuthError::RoleNotFound)?;
                for user in self.users.values_mut() {
                    user.roles.remove(name);
                }
            }
            RoleGrantPermission { role, perm } => {
                if !valid_range(&perm.key, &perm.range_end) {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                let r = self.roles.get_mut(role).ok_or(AuthError::RoleNotFound)?;
                let at = r.perms.binary_search_by(|p| (&p.key, &p.range_end).cmp(&(&perm.key, &perm.range_end)));
                match at {
                    Ok(i) => r.perms[i].perm = perm.perm,
                    Err(i) => r.perms.insert(i, perm.clone()),
                }
            }
            RoleRevokePermission { role, key, range_end } => {
                let r = self.roles.get_mut(role).ok_or(AuthError::RoleNotFound)?;
                let before = r.perms.len();
                r.perms.retain(|p| !(p.key == *key && p.range_end == *range_end));
                if r.perms.len() == before {
                    return Err(AuthError::PermissionNotGranted);
                }
            }
        }
        self.revision += 1;
        Ok(())
    }

    fn has_root_role(&self, user: &User) -> bool {
        user.roles.contains(ROOT)
    }

    /// With auth on, `user` must be someone this store knows (etcd: any authenticated user).
    pub fn check_user(&self, user: Option<&str>) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        let name = user.filter(|u| !u.is_empty()).ok_or(AuthError::UserEmpty)?;
        self.users.get(name).map(|_| ()).ok_or(AuthError::PermissionDenied)
    }

    /// etcd's `IsAdminPermitted`: with auth on, only a user with the root role.
    pub fn check_admin(&self, user: Option<&str>) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        let name = user.filter(|u| !u.is_empty()).ok_or(AuthError::UserEmpty)?;
        let u = self.users.get(name).ok_or(AuthError::UserNotFound)?;
        if self.has_root_role(u) {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }

    /// May `user` do `want` on the keys `[key, range_end)` (a single key when `range_end` is
    /// empty, every key from `key` on when it is `[0]`)? The union of the user's roles'
    /// permissions must cover every key of it; the root role covers all. Linear in the number
    /// of the user's permissions (after a sort).
    pub fn check(&self, user: Option<&str>, key: &[u8], range_end: &[u8], want: PermType) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        // Both, each by the union of the grants that allow it (a read grant and a write grant
        // on the same keys together allow reading and writing them).
        if want == PermType::ReadWrite {
            self.check(user, key, range_end, PermType::Read)?;
            return self.check(user, key, range_end, PermType::Write);
        }
        let name = user.filter(|u| !u.is_empty()).ok_or(AuthError::UserEmpty)?;
        let u = self.users.get(name).ok_or(AuthError::PermissionDenied)?;
        if self.has_root_role(u) {
            return Ok(());
        }
        let mut granted: Vec<Interval<'_>> = u
            .roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .flat_map(|r| r.perms.iter())
            .filter(|p| p.perm.allows(want))
            .map(|p| interval(&p.key, &p.range_end))
            .collect();
        granted.sort_by(|a, b| a.0.cmp(&b.0));
        let (start, end) = interval(key, range_end);
        // An empty or backwards range reads or writes nothing, but is judged by its first key.
        let end = match end {
            Some(e) if *e <= *start => interval(key, &[]).1,
            e => e,
        };
        // Sweep: `reached` is where the keys covered from `start` end so far.
        let mut reached: Option<Vec<u8>> = Some(start.to_vec());
        for (from, to) in &granted {
            let Some(at) = &reached else { break };
            if **from > at[..] {
                break;
            }
            reached = match to {
                None => None,
                Some(to) if to[..] > at[..] => Some(to.to_vec()),
                Some(_) => continue,
            };
        }
        let covered = match (&reached, &end) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(r), Some(e)) => r[..] >= e[..],
        };
        if covered {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }
}

/// Hash a password for storage: Argon2id with the crate's default cost (19 MiB, 2 passes), as a
/// PHC string that names its parameters, so they can be raised later without a migration.
/// `salt` must be random and new for every hash.
pub fn hash_password(password: &str, salt: &[u8; 16]) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(salt).expect("16 bytes is a valid salt");
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters")
        .to_string()
}

/// Whether `password` is the one `hash` was made from. Slow by design (tens of milliseconds):
/// run it off the async runtime.
pub fn verify_password(hash: &str, password: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    let Ok(parsed) = PasswordHash::new(hash) else { return false };
    argon2::Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok()
}

/// `verify_password` against a user's stored hash, or (no such user, or one without a
/// password) a hash spent for nothing and `false`: the answer takes as long either way, so its
/// timing does not tell which names exist.
pub fn check_password(stored: Option<&str>, password: &str) -> bool {
    match stored {
        Some(hash) => verify_password(hash, password),
        None => {
            hash_password(password, &[0; 16]);
            false
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Tokens another scheme issues (etcd's `--auth-token jwt`): the server installs a checker at
/// start; `verify_token` asks it first. A global because every door that reads a token (gRPC,
/// HTTP, the rate limiter) goes through `verify_token`.
pub trait ExternalTokens: Send + Sync {
    /// The user `token` names, if the scheme vouches for it at `now_unix_ms`; `None` for a token
    /// that is not of the scheme or does not hold.
    fn user_of(&self, token: &str, now_unix_ms: u64) -> Option<String>;
}

static EXTERNAL_TOKENS: std::sync::OnceLock<Box<dyn ExternalTokens>> = std::sync::OnceLock::new();

/// Install the checker of externally issued tokens (once, at start).
pub fn set_external_tokens(checker: Box<dyn ExternalTokens>) {
    let _ = EXTERNAL_TOKENS.set(checker);
}

/// Longest token accepted for checking; anything longer is not one of ours.
const TOKEN_BYTES_MAX: usize = 1024;

impl AuthStore {
    /// What a token's signature covers: the user, its expiry, and the user's password hash, so
    /// that changing the password (or deleting and re-adding the user) voids every token issued
    /// before, as etcd invalidates a user's tokens.
    /// Every field length-prefixed, so no two (user, expiry, hash) sign the same bytes.
    fn token_message(user: &str, expires_unix_ms: u64, password_hash: &str) -> Vec<u8> {
        let mut msg = Vec::with_capacity(24 + user.len() + password_hash.len());
        msg.extend_from_slice(&(user.len() as u64).to_be_bytes());
        msg.extend_from_slice(user.as_bytes());
        msg.extend_from_slice(&expires_unix_ms.to_be_bytes());
        msg.extend_from_slice(&(password_hash.len() as u64).to_be_bytes());
        msg.extend_from_slice(password_hash.as_bytes());
        msg
    }

    fn token_key(&self) -> Option<ring::hmac::Key> {
        (!self.token_key.is_empty()).then(|| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.token_key))
    }

    /// A token for `user`, valid on every member until `expires_unix_ms` (wall clock) or until
    /// the user's password changes or the user is deleted. `verified_hash` is the stored hash
    /// the caller checked the password against: if the password changed meanwhile, no token.
    pub fn issue_token(&self, user: &str, verified_hash: &str, expires_unix_ms: u64) -> Result<String, AuthError> {
        if !self.enabled {
            return Err(AuthError::AuthNotEnabled);
        }
        let hash = self.users.get(user).and_then(|u| u.password_hash.as_deref()).ok_or(AuthError::AuthFailed)?;
        if hash != verified_hash {
            return Err(AuthError::AuthFailed);
        }
        let key = self.token_key().ok_or(AuthError::AuthFailed)?;
        let tag = ring::hmac::sign(&key, &Self::token_message(user, expires_unix_ms, hash));
        Ok(format!("{}.{expires_unix_ms}.{}", hex(user.as_bytes()), hex(tag.as_ref())))
    }

    /// This store without its token key, for a backup file: a restored cluster signs with a key
    /// of its own (`set_token_key`), so a backup never lets anyone forge tokens for the cluster
    /// it came from.
    pub fn without_token_key(&self) -> AuthStore {
        AuthStore { token_key: Vec::new(), ..self.clone() }
    }

    /// Whether tokens can be signed (a restored store has no key until one is proposed).
    pub fn has_token_key(&self) -> bool {
        !self.token_key.is_empty()
    }

    /// The user a token names, if it is one this store signed, has not expired at `now_unix_ms`,
    /// and its user still exists with the same password. Otherwise etcd's `invalid auth token`.
    pub fn verify_token(&self, token: &str, now_unix_ms: u64) -> Result<String, AuthError> {
        let bad = AuthError::InvalidAuthToken;
        if let Some(user) = EXTERNAL_TOKENS.get().and_then(|x| x.user_of(token, now_unix_ms)) {
            // Signed by the scheme's key; still only for a user that exists.
            return self.users.contains_key(&user).then_some(user).ok_or(bad);
        }
        if token.len() > TOKEN_BYTES_MAX {
            return Err(bad);
        }
        let mut parts = token.split('.');
        let (Some(user), Some(expires), Some(tag), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad);
        };
        let user = String::from_utf8(unhex(user).ok_or(bad.clone())?).map_err(|_| bad.clone())?;
        let expires: u64 = expires.parse().map_err(|_| bad.clone())?;
        let tag = unhex(tag).ok_or(bad.clone())?;
        if expires <= now_unix_ms {
            return Err(bad);
        }
        let hash = self.users.get(&user).and_then(|u| u.password_hash.as_deref()).ok_or(bad.clone())?;
        let key = self.token_key().ok_or(bad.clone())?;
        ring::hmac::verify(&key, &Self::token_message(&user, expires, hash), &tag).map_err(|_| bad)?;
        Ok(user)
    }
}

#[cfg(test)]
mod tests {
    use super::AuthCommand::*;
    use super::*;

    fn s(x: &str) -> String {
        x.to_string()
    }

    fn enable() -> AuthCommand {
        Enable { token_key: b"key".to_vec() }
    }

    fn perm(perm: PermType, key: &str, end: &[u8]) -> Permission {
        Permission { perm, key: key.as_bytes().to_vec(), range_end: end.to_vec() }
    }

    /// root with the root role, and alice with role `app`: readwrite on prefix `app/`, read on
    /// `shared`, write from `zlogs/` to the end of the keyspace.
    fn store() -> AuthStore {
        let mut a = AuthStore::default();
        for cmd in [
            UserAdd { name: s("root"), password_hash: Some(s("h")) },
            UserAdd { name: s("alice"), password_hash: Some(s("h")) },
            RoleAdd { name: s("app") },
            RoleGrantPermission { role: s("app"), perm: perm(PermType::ReadWrite, "app/", b"app0") },
            RoleGrantPermission { role: s("app"), perm: perm(PermType::Read, "shared", b"") },
            RoleGrantPermission { role: s("app"), perm: perm(PermType::Write, "zlogs/", &[0]) },
            UserGrantRole { user: s("alice"), role: s("app") },
            UserGrantRole { user: s("root"), role: s("root") },
            Enable { token_key: b"key".to_vec() },
        ] {
            a.apply(&cmd).unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        }
        a
    }

    #[test]
    fn enabling_needs_root_with_the_root_role_and_root_cannot_be_taken_away_while_on() {
        let mut a = AuthStore::default();
        assert_eq!(a.apply(&enable()), Err(AuthError::RootUserNotExist));
        a.apply(&UserAdd { name: s("root"), password_hash: Some(s("h")) }).unwrap();
        assert_eq!(a.apply(&enable()), Err(AuthError::RootRoleNotExist));
        a.apply(&UserGrantRole { user: s("root"), role: s("root") }).unwrap();
        let rev = a.revision();
        a.apply(&enable()).unwrap();
        assert!(a.enabled());
        assert_eq!(a.revision(), rev, "enabling moves no revision (etcd)");
        assert_eq!(a.apply(&UserDelete { name: s("root") }), Err(AuthError::InvalidAuthMgmt));
        assert_eq!(a.apply(&UserRevokeRole { user: s("root"), role: s("root") }), Err(AuthError::InvalidAuthMgmt));
        assert_eq!(a.apply(&RoleDelete { name: s("root") }), Err(AuthError::InvalidAuthMgmt));
        a.apply(&Disable).unwrap();
        assert_eq!(a.revision(), rev + 1);
        a.apply(&UserRevokeRole { user: s("root"), role: s("root") }).unwrap();
    }

    #[test]
    fn management_errors_are_etcds_and_a_refused_command_changes_nothing() {
        let mut a = store();
        let before = a.clone();
        let refused = [
            (UserAdd { name: s(""), password_hash: None }, AuthError::UserEmpty),
            (UserAdd { name: s("alice"), password_hash: None }, AuthError::UserAlreadyExist),
            (UserDelete { name: s("bob") }, AuthError::UserNotFound),
            (UserChangePassword { name: s("bob"), password_hash: None }, AuthError::UserNotFound),
            (UserGrantRole { user: s("bob"), role: s("app") }, AuthError::UserNotFound),
            (UserGrantRole { user: s("alice"), role: s("nope") }, AuthError::RoleNotFound),
            (UserRevokeRole { user: s("alice"), role: s("other") }, AuthError::RoleNotGranted),
            (RoleAdd { name: s("") }, AuthError::RoleEmpty),
            (RoleAdd { name: s("app") }, AuthError::RoleAlreadyExist),
            (RoleDelete { name: s("nope") }, AuthError::RoleNotFound),
            (RoleGrantPermission { role: s("nope"), perm: perm(PermType::Read, "k", b"") }, AuthError::RoleNotFound),
            (RoleGrantPermission { role: s("app"), perm: perm(PermType::Read, "", b"") }, AuthError::InvalidAuthMgmt),
            (RoleGrantPermission { role: s("app"), perm: perm(PermType::Read, "b", b"a") }, AuthError::InvalidAuthMgmt),
            (
                RoleRevokePermission { role: s("app"), key: b"app/".to_vec(), range_end: vec![] },
                AuthError::PermissionNotGranted,
            ),
        ];
        for (cmd, want) in refused {
            assert_eq!(a.apply(&cmd), Err(want.clone()), "{cmd:?}");
            assert_eq!(a, before, "{cmd:?} changed the store");
        }
        assert_eq!(AuthError::UserEmpty.to_string(), "etcdserver: user name is empty");
        assert_eq!(AuthError::PermissionDenied.to_string(), "etcdserver: permission denied");
        // Granting a role twice is a no-op, not an error, and moves no revision (etcd).
        a.apply(&UserGrantRole { user: s("alice"), role: s("app") }).unwrap();
        assert_eq!(a, before);
    }

    #[test]
    fn permissions_cover_keys_and_ranges_by_their_union() {
        let a = store();
        let alice = Some("alice");
        let ok = |k: &str, end: &[u8], want| a.check(alice, k.as_bytes(), end, want).is_ok();
        use PermType::{Read, Write};
        // The app/ prefix, both ways.
        assert!(ok("app/x", b"", Read) && ok("app/x", b"", Write));
        assert!(ok("app/", b"app0", Read), "the whole prefix");
        assert!(ok("app/a", b"app/b", Write), "a range inside it");
        assert!(!ok("app/a", b"b", Read), "a range running past it");
        assert!(!ok("app", b"", Read), "the key before the prefix");
        assert!(!ok("app/", &[0], Read), "from key: runs past the prefix");
        // A single key, read only.
        assert!(ok("shared", b"", Read));
        assert!(!ok("shared", b"", Write));
        assert!(!ok("shared", b"sharee", Read), "a range is more than the key");
        assert!(!ok("shared/x", b"", Read));
        // From key, write only: every key from zlogs/ on, up to the end of the keyspace.
        assert!(ok("zlogs/a", b"", Write) && ok("zzz", b"", Write) && ok("zlogs/", &[0], Write));
        assert!(!ok("zlogs/a", b"", Read));
        assert!(!ok("zlog", &[0], Write), "starts before");
        // Nothing else.
        assert!(!ok("other", b"", Read));
        assert!(!ok("\0", &[0], Read), "the whole keyspace");
        // root may do anything; an unknown user nothing; nobody, with auth on, is told so.
        assert!(a.check(Some("root"), b"\0", &[0], Write).is_ok());
        assert_eq!(a.check(Some("mallory"), b"app/x", b"", Read), Err(AuthError::PermissionDenied));
        assert_eq!(a.check(None, b"app/x", b"", Read), Err(AuthError::UserEmpty));
        assert_eq!(a.check(Some(""), b"app/x", b"", Read), Err(AuthError::UserEmpty));
        assert_eq!(a.check_admin(alice), Err(AuthError::PermissionDenied));
        assert_eq!(a.check_admin(Some("root")), Ok(()));
        assert_eq!(a.check_admin(None), Err(AuthError::UserEmpty));
    }

    #[test]
    fn read_and_write_grants_together_allow_both() {
        let mut a = store();
        use PermType::{Read, ReadWrite, Write};
        a.apply(&RoleGrantPermission { role: s("app"), perm: perm(Read, "both/", b"both0") }).unwrap();
        assert!(a.check(Some("alice"), b"both/x", b"", ReadWrite).is_err(), "read alone");
        a.apply(&RoleGrantPermission { role: s("app"), perm: perm(Write, "both/a", b"both0") }).unwrap();
        assert!(a.check(Some("alice"), b"both/b", b"", ReadWrite).is_ok());
        assert!(a.check(Some("alice"), b"both/", b"", ReadWrite).is_err(), "written only from both/a");
    }

    #[test]
    fn adjacent_permissions_join_and_revocation_takes_effect() {
        let mut a = store();
        use PermType::{Read, ReadWrite};
        a.apply(&RoleGrantPermission { role: s("app"), perm: perm(Read, "app0", b"app5") }).unwrap();
        assert!(a.check(Some("alice"), b"app/", b"app3", Read).is_ok(), "[app/, app0) and [app0, app5) join");
        assert!(a.check(Some("alice"), b"app/", b"app6", Read).is_err());
        // Re-granting the same (key, end) replaces its type.
        a.apply(&RoleGrantPermission { role: s("app"), perm: perm(Read, "app/", b"app0") }).unwrap();
        assert!(a.check(Some("alice"), b"app/x", b"", PermType::Write).is_err());
        a.apply(&RoleGrantPermission { role: s("app"), perm: perm(ReadWrite, "app/", b"app0") }).unwrap();
        let rev = a.revision();
        a.apply(&RoleRevokePermission { role: s("app"), key: b"app/".to_vec(), range_end: b"app0".to_vec() }).unwrap();
        assert_eq!(a.revision(), rev + 1);
        assert!(a.check(Some("alice"), b"app/x", b"", Read).is_err());
        // Deleting a role takes it from its users.
        a.apply(&RoleDelete { name: s("app") }).unwrap();
        assert!(a.user("alice").unwrap().roles.is_empty());
        assert!(a.check(Some("alice"), b"shared", b"", Read).is_err());
        // Auth off: everything is allowed, to anyone.
        a.apply(&Disable).unwrap();
        assert!(a.check(None, b"\0", &[0], PermType::Write).is_ok());
        assert!(a.check_admin(None).is_ok());
    }
    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        let h = hash_password("s3cret", &[7; 16]);
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password(&h, "s3cret"));
        assert!(!verify_password(&h, "s3cret "));
        assert!(!verify_password("not a hash", "s3cret"));
        assert_ne!(h, hash_password("s3cret", &[8; 16]), "the salt is in the hash");
    }

    #[test]
    fn tokens_name_their_user_until_they_expire_or_the_password_changes() {
        let mut a = store();
        let t = a.issue_token("alice", "h", 1_000).unwrap();
        assert_eq!(a.verify_token(&t, 999), Ok(s("alice")));
        assert_eq!(a.verify_token(&t, 1_000), Err(AuthError::InvalidAuthToken), "expired");
        // Tampered: another user's name, a later expiry, a flipped signature, junk.
        let bob = t.replacen(&hex(b"alice"), &hex(b"root"), 1);
        assert_eq!(a.verify_token(&bob, 0), Err(AuthError::InvalidAuthToken));
        let later = t.replacen(".1000.", ".9000.", 1);
        assert_eq!(a.verify_token(&later, 0), Err(AuthError::InvalidAuthToken));
        let mut flipped = t.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(a.verify_token(std::str::from_utf8(&flipped).unwrap(), 0), Err(AuthError::InvalidAuthToken));
        for junk in ["", "x", "a.b.c", "..", "61.1.zz", &"a".repeat(5000)] {
            assert_eq!(a.verify_token(junk, 0), Err(AuthError::InvalidAuthToken), "{junk:?}");
        }
        // Another store's key does not verify it.
        let mut other = AuthStore::default();
        for cmd in [
            UserAdd { name: s("root"), password_hash: Some(s("h")) },
            UserAdd { name: s("alice"), password_hash: Some(s("h")) },
            UserGrantRole { user: s("root"), role: s("root") },
            Enable { token_key: b"other".to_vec() },
        ] {
            other.apply(&cmd).unwrap();
        }
        assert_eq!(other.verify_token(&t, 0), Err(AuthError::InvalidAuthToken));
        // A new password voids it; so does deleting the user.
        a.apply(&UserChangePassword { name: s("alice"), password_hash: Some(s("h2")) }).unwrap();
        assert_eq!(a.verify_token(&t, 0), Err(AuthError::InvalidAuthToken));
        assert_eq!(a.issue_token("alice", "h", 1_000), Err(AuthError::AuthFailed), "checked against the old hash");
        let t2 = a.issue_token("alice", "h2", 1_000).unwrap();
        assert!(a.verify_token(&t2, 0).is_ok());
        a.apply(&UserDelete { name: s("alice") }).unwrap();
        assert_eq!(a.verify_token(&t2, 0), Err(AuthError::InvalidAuthToken));
        // No token for nobody, for a user without a password, or with auth off.
        assert_eq!(a.issue_token("nobody", "h", 1), Err(AuthError::AuthFailed));
        a.apply(&UserAdd { name: s("cn-only"), password_hash: None }).unwrap();
        assert_eq!(a.issue_token("cn-only", "h", 1), Err(AuthError::AuthFailed));
        a.apply(&Disable).unwrap();
        assert_eq!(a.issue_token("root", "h", 1), Err(AuthError::AuthNotEnabled));
        // Enabling again signs with the new key: tokens from before are void.
        let before = a.clone();
        a.apply(&Enable { token_key: b"rotated".to_vec() }).unwrap();
        let t3 = a.issue_token("root", "h", 1_000).unwrap();
        assert!(a.verify_token(&t3, 0).is_ok());
        assert_eq!(before.token_key, b"key");
        assert_ne!(a.token_key, before.token_key);
    }

    #[test]
    fn a_restored_store_signs_nothing_until_a_key_is_set_once() {
        let restored = store().without_token_key();
        let mut a = restored.clone();
        assert!(!a.has_token_key());
        assert_eq!(a.issue_token("alice", "h", 1_000), Err(AuthError::AuthFailed));
        a.apply(&SetTokenKey { token_key: b"first".to_vec() }).unwrap();
        let t = a.issue_token("alice", "h", 1_000).unwrap();
        // A second member's proposal, applied after, changes nothing: every member keeps one key.
        a.apply(&SetTokenKey { token_key: b"second".to_vec() }).unwrap();
        assert_eq!(a.verify_token(&t, 0), Ok(s("alice")));
        assert_eq!(a.revision(), restored.revision(), "no auth revision for a key");
    }
}
