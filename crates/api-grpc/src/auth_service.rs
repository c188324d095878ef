//! etcd's Auth service (ADR 0010): users, roles and permissions replicated through Raft,
//! passwords hashed (Argon2id) by the member that takes the request, tokens that every member
//! verifies. Management calls are root's once auth is on; the rule is the state machine's
//! (`Store::authorize`), checked here and again at apply.

use std::sync::Arc;

use quorate_kv::auth::{AuthCommand, AuthError, PermType, Permission, ROOT};
use quorate_kv::{Command, CommandResponse};
use tonic::{Request, Response, Status};

use crate::pb::authpb;
use crate::pb::etcdserverpb as pb;
use crate::status::{auth_status, consensus_status, kv_status};
use crate::Ctx;

pub struct AuthService {
    pub ctx: Arc<Ctx>,
}

/// etcd's answer when the member's password work is all taken (`quorate_consensus::passwords`).
fn busy(_: quorate_consensus::passwords::Busy) -> Status {
    Status::resource_exhausted("etcdserver: too many requests")
}

fn random_key() -> Result<Vec<u8>, Status> {
    let mut key = vec![0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| Status::internal("no randomness for a token key"))?;
    Ok(key)
}

impl AuthService {
    /// Propose an auth change as the caller; the header after it.
    async fn change<T>(&self, req: &Request<T>, cmd: AuthCommand) -> Result<pb::ResponseHeader, Status> {
        let user = self.ctx.caller(req)?;
        self.ctx.refuse_learner()?;
        let cmd = self.ctx.as_user(user, Command::Auth(cmd))?;
        let resp = self.ctx.member.write(cmd).await.map_err(consensus_status)?;
        let revision = resp.revision;
        match resp.kv_result().map_err(kv_status)? {
            CommandResponse::Auth { .. } => Ok(self.ctx.header_at(revision)),
            other => Err(Status::internal(format!("unexpected auth result {other:?}"))),
        }
    }

    /// A read of the auth store, after a read index (a user just added at the leader is seen),
    /// as the caller (`None` for `Authenticate` and `AuthStatus`, which ignore any token sent, as
    /// etcd does: a client re-authenticates with its expired token still attached).
    async fn read<T, R>(
        &self,
        req: &Request<T>,
        as_caller: bool,
        f: impl FnOnce(Option<&str>, &quorate_kv::auth::AuthStore) -> Result<R, AuthError>,
    ) -> Result<(R, pb::ResponseHeader), Status> {
        self.ctx.member.linearize().await.map_err(consensus_status)?;
        let user = if as_caller { self.ctx.caller(req)? } else { None };
        let out = self.ctx.member.read(|s| f(user.as_deref(), s.auth())).map_err(auth_status)?;
        Ok((out, self.ctx.header()))
    }
}

fn perm_out(p: &Permission) -> authpb::Permission {
    let t = match p.perm {
        PermType::Read => authpb::permission::Type::Read,
        PermType::Write => authpb::permission::Type::Write,
        PermType::ReadWrite => authpb::permission::Type::Readwrite,
    };
    authpb::Permission { perm_type: t as i32, key: p.key.clone(), range_end: p.range_end.clone() }
}

#[tonic::async_trait]
impl pb::auth_server::Auth for AuthService {
    async fn auth_enable(
        &self,
        req: Request<pb::AuthEnableRequest>,
    ) -> Result<Response<pb::AuthEnableResponse>, Status> {
        let header = self.change(&req, AuthCommand::Enable { token_key: random_key()? }).await?;
        Ok(Response::new(pb::AuthEnableResponse { header: Some(header) }))
    }

    async fn auth_disable(
        &self,
        req: Request<pb::AuthDisableRequest>,
    ) -> Result<Response<pb::AuthDisableResponse>, Status> {
        let header = self.change(&req, AuthCommand::Disable).await?;
        Ok(Response::new(pb::AuthDisableResponse { header: Some(header) }))
    }

    async fn auth_status(
        &self,
        req: Request<pb::AuthStatusRequest>,
    ) -> Result<Response<pb::AuthStatusResponse>, Status> {
        let ((enabled, auth_revision), header) = self.read(&req, false, |_, a| Ok((a.enabled(), a.revision()))).await?;
        Ok(Response::new(pb::AuthStatusResponse { header: Some(header), enabled, auth_revision }))
    }

    async fn authenticate(
        &self,
        req: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let r = req.get_ref();
        let (name, password) = (r.name.clone(), r.password.clone());
        let (stored, header) = self
            .read(&req, false, |_, a| {
                if !a.enabled() {
                    return Err(AuthError::AuthNotEnabled);
                }
                Ok(a.user(&name).and_then(|u| u.password_hash.clone()))
            })
            .await?;
        // The member's bounded password work; "too many requests" past it (clients retry).
        let verified = stored.clone();
        let ok = quorate_consensus::passwords::check(stored, password).await.map_err(busy)?;
        if !ok {
            return Err(auth_status(AuthError::AuthFailed));
        }
        let expires =
            quorate_consensus::passwords::now_unix_ms().saturating_add(self.ctx.auth_token_ttl.as_millis() as u64);
        let verified = verified.unwrap_or_default();
        if let Some(jwt) = quorate_tls::jwt::installed().filter(|j| j.signs()) {
            // etcd's `--auth-token jwt`: signed here, verified by any member with the public key.
            let revision = self.ctx.member.read(|s| s.auth().revision());
            let exp = (quorate_consensus::passwords::now_unix_ms() / 1000).saturating_add(jwt.ttl.as_secs());
            let token = jwt.sign(&name, revision, exp).ok_or_else(|| Status::internal("could not sign a token"))?;
            return Ok(Response::new(pb::AuthenticateResponse { header: Some(header), token }));
        }
        if !self.ctx.member.read(|s| s.auth().has_token_key()) {
            // A restored cluster: the first token needs a key every member shares. The
            // member's own command (not a client's); a no-op if another member's came first.
            let cmd = Command::Auth(AuthCommand::SetTokenKey { token_key: random_key()? });
            self.ctx.member.write(cmd).await.map_err(consensus_status)?;
            // A follower's write returns once the leader applied it: catch up before signing.
            self.ctx.member.linearize().await.map_err(consensus_status)?;
        }
        let token = self.ctx.member.read(|s| s.auth().issue_token(&name, &verified, expires)).map_err(auth_status)?;
        Ok(Response::new(pb::AuthenticateResponse { header: Some(header), token }))
    }

    async fn user_add(
        &self,
        req: Request<pb::AuthUserAddRequest>,
    ) -> Result<Response<pb::AuthUserAddResponse>, Status> {
        let r = req.get_ref();
        let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
        if !r.hashed_password.is_empty() {
            return Err(Status::invalid_argument(
                "quorate: hashedPassword (a client-side bcrypt hash) is not accepted; send the password over TLS",
            ));
        }
        // Root's, before any hashing: nobody else may make the member spend a hash.
        self.ctx.admin(&req)?;
        let name = r.name.clone();
        let password_hash = if no_password {
            None
        } else {
            Some(quorate_consensus::passwords::hash(r.password.clone()).await.map_err(busy)?)
        };
        let header = self.change(&req, AuthCommand::UserAdd { name, password_hash }).await?;
        Ok(Response::new(pb::AuthUserAddResponse { header: Some(header) }))
    }

    async fn user_get(
        &self,
        req: Request<pb::AuthUserGetRequest>,
    ) -> Result<Response<pb::AuthUserGetResponse>, Status> {
        let name = req.get_ref().name.clone();
        let (roles, header) = self
            .read(&req, true, |caller, a| {
                // A user may read itself; anyone else needs root.
                if caller != Some(name.as_str()) {
                    a.check_admin(caller)?;
                }
                Ok(a.user(&name).ok_or(AuthError::UserNotFound)?.roles.iter().cloned().collect())
            })
            .await?;
        Ok(Response::new(pb::AuthUserGetResponse { header: Some(header), roles }))
    }

    async fn user_list(
        &self,
        req: Request<pb::AuthUserListRequest>,
    ) -> Result<Response<pb::AuthUserListResponse>, Status> {
        let (users, header) = self
            .read(&req, true, |caller, a| {
                a.check_admin(caller)?;
                Ok(a.users().map(|(n, _)| n.clone()).collect())
            })
            .await?;
        Ok(Response::new(pb::AuthUserListResponse { header: Some(header), users }))
    }

    async fn user_delete(
        &self,
        req: Request<pb::AuthUserDeleteRequest>,
    ) -> Result<Response<pb::AuthUserDeleteResponse>, Status> {
        let name = req.get_ref().name.clone();
        let header = self.change(&req, AuthCommand::UserDelete { name }).await?;
        Ok(Response::new(pb::AuthUserDeleteResponse { header: Some(header) }))
    }

    async fn user_change_password(
        &self,
        req: Request<pb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<pb::AuthUserChangePasswordResponse>, Status> {
        let r = req.get_ref();
        if !r.hashed_password.is_empty() {
            return Err(Status::invalid_argument(
                "quorate: hashedPassword (a client-side bcrypt hash) is not accepted; send the password over TLS",
            ));
        }
        self.ctx.admin(&req)?;
        let name = r.name.clone();
        let password_hash = Some(quorate_consensus::passwords::hash(r.password.clone()).await.map_err(busy)?);
        let header = self.change(&req, AuthCommand::UserChangePassword { name, password_hash }).await?;
        Ok(Response::new(pb::AuthUserChangePasswordResponse { header: Some(header) }))
    }

    async fn user_grant_role(
        &self,
        req: Request<pb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<pb::AuthUserGrantRoleResponse>, Status> {
        let r = req.get_ref();
        let cmd = AuthCommand::UserGrantRole { user: r.user.clone(), role: r.role.clone() };
        let header = self.change(&req, cmd).await?;
        Ok(Response::new(pb::AuthUserGrantRoleResponse { header: Some(header) }))
    }

    async fn user_revoke_role(
        &self,
        req: Request<pb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<pb::AuthUserRevokeRoleResponse>, Status> {
        let r = req.get_ref();
        let cmd = AuthCommand::UserRevokeRole { user: r.name.clone(), role: r.role.clone() };
        let header = self.change(&req, cmd).await?;
        Ok(Response::new(pb::AuthUserRevokeRoleResponse { header: Some(header) }))
    }

    async fn role_add(
        &self,
        req: Request<pb::AuthRoleAddRequest>,
    ) -> Result<Response<pb::AuthRoleAddResponse>, Status> {
        let name = req.get_ref().name.clone();
        let header = self.change(&req, AuthCommand::RoleAdd { name }).await?;
        Ok(Response::new(pb::AuthRoleAddResponse { header: Some(header) }))
    }

    async fn role_get(
        &self,
        req: Request<pb::AuthRoleGetRequest>,
    ) -> Result<Response<pb::AuthRoleGetResponse>, Status> {
        let name = req.get_ref().role.clone();
        let (perm, header) = self
            .read(&req, true, |caller, a| {
                // A user may read the roles it has; anyone else needs root.
                let has = caller.and_then(|c| a.user(c)).is_some_and(|u| u.roles.contains(&name));
                if !has {
                    a.check_admin(caller)?;
                }
                if name == ROOT {
                    return Ok(vec![authpb::Permission {
                        perm_type: authpb::permission::Type::Readwrite as i32,
                        key: vec![0],
                        range_end: vec![0],
                    }]);
                }
                Ok(a.role(&name).ok_or(AuthError::RoleNotFound)?.perms.iter().map(perm_out).collect())
            })
            .await?;
        Ok(Response::new(pb::AuthRoleGetResponse { header: Some(header), perm }))
    }

    async fn role_list(
        &self,
        req: Request<pb::AuthRoleListRequest>,
    ) -> Result<Response<pb::AuthRoleListResponse>, Status> {
        let (roles, header) = self
            .read(&req, true, |caller, a| {
                a.check_admin(caller)?;
                Ok(a.roles().map(|(n, _)| n.clone()).collect())
            })
            .await?;
        Ok(Response::new(pb::AuthRoleListResponse { header: Some(header), roles }))
    }

    async fn role_delete(
        &self,
        req: Request<pb::AuthRoleDeleteRequest>,
    ) -> Result<Response<pb::AuthRoleDeleteResponse>, Status> {
        let name = req.get_ref().role.clone();
        let header = self.change(&req, AuthCommand::RoleDelete { name }).await?;
        Ok(Response::new(pb::AuthRoleDeleteResponse { header: Some(header) }))
    }

    async fn role_grant_permission(
        &self,
        req: Request<pb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<pb::AuthRoleGrantPermissionResponse>, Status> {
        let r = req.get_ref();
        let p = r.perm.as_ref().ok_or_else(|| auth_status(AuthError::PermissionNotGiven))?;
        let perm = match authpb::permission::Type::try_from(p.perm_type) {
            Ok(authpb::permission::Type::Read) => PermType::Read,
            Ok(authpb::permission::Type::Write) => PermType::Write,
            Ok(authpb::permission::Type::Readwrite) => PermType::ReadWrite,
            Err(_) => return Err(Status::invalid_argument("etcdserver: invalid permission type")),
        };
        let perm = Permission { perm, key: p.key.clone(), range_end: p.range_end.clone() };
        let header = self.change(&req, AuthCommand::RoleGrantPermission { role: r.name.clone(), perm }).await?;
        Ok(Response::new(pb::AuthRoleGrantPermissionResponse { header: Some(header) }))
    }

    async fn role_revoke_permission(
        &self,
        req: Request<pb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<pb::AuthRoleRevokePermissionResponse>, Status> {
        let r = req.get_ref();
        let cmd = AuthCommand::RoleRevokePermission {
            role: r.role.clone(),
            key: r.key.clone(),
            range_end: r.range_end.clone(),
        };
        let header = self.change(&req, cmd).await?;
        Ok(Response::new(pb::AuthRoleRevokePermissionResponse { header: Some(header) }))
    }
}
