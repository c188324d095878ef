//! Who is calling, and may they (etcd's auth, ADR 0010). The caller is resolved as etcd does:
//! the `token` metadata (from `Authenticate`), else, under `--client-cert-auth`, the verified
//! client certificate's common name, else nobody. Every request is checked here, at the door,
//! against the auth store as this member knows it; every write is checked again where it is
//! applied (`Command::Authorized`), against the store as it is then.

use quorate_kv::auth::{AuthError, AuthStore, PermType};
use quorate_kv::Command;
use tonic::{Request, Status};

use crate::status::auth_status;
use crate::Ctx;

/// The metadata key etcd's clients put their token under.
pub const TOKEN_METADATA: &str = "token";

impl Ctx {
    /// The user a request speaks for; `None` with auth off or when it names nobody. A token that
    /// does not verify is etcd's `invalid auth token`, even where nobody would be allowed.
    pub(crate) fn caller<T>(&self, req: &Request<T>) -> Result<Option<String>, Status> {
        let token = req.metadata().get(TOKEN_METADATA).map(|v| v.to_str().unwrap_or("\u{0}"));
        let cn = || {
            let info = req.extensions().get::<quorate_tls::ConnInfo>()?;
            let cn = info.identity.as_ref()?.common_name.clone()?;
            (self.cn_is_user && !cn.is_empty()).then_some(cn)
        };
        self.member.read(|s| {
            let auth = s.auth();
            if !auth.enabled() {
                return Ok(None);
            }
            match token {
                Some(t) => {
                    auth.verify_token(t, quorate_consensus::passwords::now_unix_ms()).map(Some).map_err(auth_status)
                }
                None => Ok(cn()),
            }
        })
    }

    /// Check `rule` against the store (keys, leases and auth) as this member knows it now.
    pub(crate) fn authorize(
        &self,
        rule: impl FnOnce(&quorate_kv::Store) -> Result<(), AuthError>,
    ) -> Result<(), Status> {
        self.member.read(rule).map_err(auth_status)
    }

    /// Check `rule` against the auth store as this member knows it now.
    pub(crate) fn permit(&self, rule: impl FnOnce(&AuthStore) -> Result<(), AuthError>) -> Result<(), Status> {
        self.member.read(|s| rule(s.auth())).map_err(auth_status)
    }

    /// Read permission on `[key, range_end)` for `user`.
    pub(crate) fn permit_read(&self, user: Option<&str>, key: &[u8], range_end: &[u8]) -> Result<(), Status> {
        self.permit(|a| a.check(user, key, range_end, PermType::Read))
    }

    /// The caller, who must have the root role (auth on): Maintenance, Cluster changes.
    pub(crate) fn admin<T>(&self, req: &Request<T>) -> Result<Option<String>, Status> {
        let user = self.caller(req)?;
        self.permit(|a| a.check_admin(user.as_deref()))?;
        Ok(user)
    }

    /// With auth on, `user` must be a user this member knows (lease keep-alives and the like).
    pub(crate) fn authenticated<T>(&self, req: &Request<T>) -> Result<Option<String>, Status> {
        let user = self.caller(req)?;
        self.permit(|a| a.check_user(user.as_deref()))?;
        Ok(user)
    }

    /// `cmd` checked at the door for `user`, and wrapped so that it is checked again at apply.
    /// Wrapped with auth off too: a member that has not yet applied `auth enable` (one that
    /// lags, or restarted from an old snapshot) must not let a write through unchecked, and
    /// the state machine refuses nobody's write once auth is on.
    pub(crate) fn as_user(&self, user: Option<String>, cmd: Command) -> Result<Command, Status> {
        self.member.read(|s| s.authorize(user.as_deref(), &cmd)).map_err(auth_status)?;
        Ok(cmd.authorized(user))
    }
}
