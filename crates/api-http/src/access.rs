//! Who is calling over HTTP, and may they (etcd's users and roles, ADR 0010). Every HTTP port
//! route passes `guard`, which resolves the caller from the request's credentials, checks what
//! the route needs against the auth store as this member knows it, and runs the handler with
//! the caller in scope: every write a handler proposes (`ops::write`) carries the caller and is
//! checked again where it is applied, whatever the dialect.
//!
//! Credentials, in this order: Consul's `X-Consul-Token` header, `?token=`, `Authorization:
//! Bearer <token>` (a token from etcd's `Authenticate`, or one of `--auth-static-tokens-file`),
//! then `Authorization: Basic` (a user's name and password, as Eureka clients send them).
//! With auth off, nothing is checked.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use quorate_consensus::Member;
use quorate_kv::auth::{AuthError, AuthStore, PermType};
use quorate_registry::{namespace_prefix, service_prefix, DEFAULT_NAMESPACE};

use crate::ApiError;

tokio::task_local! {
    /// The user the request being served speaks for (`None`: nobody).
    static CALLER: Option<String>;
}

/// The caller of the request being served; `None` outside a request or for nobody.
pub fn caller() -> Option<String> {
    CALLER.try_with(|c| c.clone()).ok().flatten()
}

/// What a route needs of its caller while auth is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// Anyone (health, readiness, version, metrics, the member's own status).
    Open,
    /// A user this member knows; the handler's writes are checked at apply.
    User,
    /// `perm` on the keys `[key, range_end)`.
    Keys { perm: PermType, key: Vec<u8>, range_end: Vec<u8> },
    /// The root role.
    Root,
}

fn prefix(p: String) -> (Vec<u8>, Vec<u8>) {
    let key = p.into_bytes();
    let end = quorate_kv::prefix_end(&key);
    (key, end)
}

fn on_prefix(perm: PermType, p: String) -> Need {
    let (key, range_end) = prefix(p);
    Need::Keys { perm, key, range_end }
}

/// What `method path` needs: the one table of who may do what over HTTP. A route not named
/// here is root's (so a route added later is closed until it is placed).
pub fn need(method: &Method, path: &str, query: Option<&str>) -> Need {
    use PermType::{Read, Write};
    let get = method == Method::GET || method == Method::HEAD;
    let mut seg: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // Eureka is served at /eureka and /eureka/v2: one `v2` is the same route (a second is not).
    if seg.len() >= 2 && seg[0] == "eureka" && seg[1] == "v2" {
        seg.remove(1);
    }
    let decoded = |s: &str| percent_decode(s);
    match seg.as_slice() {
        ["health" | "ready" | "version" | "metrics"] => Need::Open,
        ["v1", "member", "status" | "timeline" | "recovery"] if get => Need::Open,
        // Native registry.
        ["api", "v1", "ns", ns, "services"] | ["api", "v1", "ns", ns, "watch"] if get => {
            on_prefix(Read, namespace_prefix(&decoded(ns)))
        }
        ["api", "v1", "ns", ns, "services", svc, "instances", ..] => {
            on_prefix(if get { Read } else { Write }, service_prefix(&decoded(ns), &decoded(svc)))
        }
        // Consul: discovery by service; listings need the whole namespace; registrations and
        // check updates are checked by key where they are applied (their service is in the
        // body, or found from the check).
        ["v1", "health" | "catalog", "service", name] if get => {
            on_prefix(Read, service_prefix(DEFAULT_NAMESPACE, &decoded(name)))
        }
        ["v1", "catalog", "services"] | ["v1", "agent", "services"] if get => {
            on_prefix(Read, namespace_prefix(DEFAULT_NAMESPACE))
        }
        ["v1", "agent", "service", "register"] | ["v1", "agent", "service", "deregister", _] => Need::User,
        ["v1", "agent", "check", _, _] => Need::User,
        ["v1", "agent", "self"] | ["v1", "status", ..] => Need::User,
        ["v1", "session", ..] => Need::User,
        // Consul KV: the key, or every key under it with `recurse` or `keys`.
        ["v1", "kv", rest @ ..] => {
            let key = decoded(&rest.join("/")).into_bytes();
            let whole = query.is_some_and(|q| {
                q.split('&').any(|p| {
                    let name = percent_decode(&p.split('=').next().unwrap_or_default().replace('+', " "));
                    matches!(name.as_str(), "recurse" | "keys")
                })
            });
            let perm = if get { Read } else { Write };
            match (key.is_empty(), whole) {
                (true, _) => Need::Keys { perm, key: vec![0], range_end: vec![0] },
                (false, true) => {
                    let end = quorate_kv::prefix_end(&key);
                    Need::Keys { perm, key, range_end: end }
                }
                (false, false) => Need::Keys { perm, key, range_end: vec![] },
            }
        }
        // Eureka, by application (names kept lower-case).
        ["eureka", "apps"] | ["eureka", "apps", ""] | ["eureka", "apps", "delta"] | ["eureka", "instances", _]
            if get =>
        {
            on_prefix(Read, namespace_prefix(DEFAULT_NAMESPACE))
        }
        ["eureka", "apps", app, ..] => on_prefix(
            if get { Read } else { Write },
            service_prefix(DEFAULT_NAMESPACE, &decoded(app).to_ascii_lowercase()),
        ),
        // Everything else: operators' (isolate, recover, repair, failpoints, profiles).
        _ => Need::Root,
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `--auth-static-tokens-file`: `token user` per line (`#` comments), re-read when it changes.
pub struct StaticTokens {
    path: PathBuf,
    loaded: Mutex<(Option<SystemTime>, Instant, HashMap<String, String>)>,
}

/// How often the file's modification time is looked at.
const STATIC_TOKENS_RECHECK: Duration = Duration::from_secs(1);

impl StaticTokens {
    /// Read the file now: a missing or malformed file stops the start, naming the line.
    pub fn load(path: PathBuf) -> Result<StaticTokens, String> {
        let (stamp, map) = Self::read(&path)?;
        Ok(StaticTokens { path, loaded: Mutex::new((stamp, Instant::now(), map)) })
    }

    fn read(path: &PathBuf) -> Result<(Option<SystemTime>, HashMap<String, String>), String> {
        let stamp = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("--auth-static-tokens-file {}: {e}", path.display()))?;
        let mut map = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(token), Some(user), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(format!(
                    "--auth-static-tokens-file {} line {}: expected `<token> <user>`",
                    path.display(),
                    n + 1
                ));
            };
            if token.len() < 16 {
                return Err(format!(
                    "--auth-static-tokens-file {} line {}: a token shorter than 16 characters is guessable",
                    path.display(),
                    n + 1
                ));
            }
            map.insert(token.to_string(), user.to_string());
        }
        Ok((stamp, map))
    }

    /// The user `token` is bound to. A file that changed is re-read (at most once a second); one
    /// that became unreadable or malformed keeps the tokens read before, and says so.
    pub fn user(&self, token: &str) -> Option<String> {
        let mut loaded = self.loaded.lock().unwrap();
        if loaded.1.elapsed() >= STATIC_TOKENS_RECHECK {
            loaded.1 = Instant::now();
            let stamp = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
            if stamp != loaded.0 {
                match Self::read(&self.path) {
                    Ok((stamp, map)) => {
                        tracing::info!(file = %self.path.display(), tokens = map.len(), "static tokens re-read");
                        (loaded.0, loaded.2) = (stamp, map);
                    }
                    Err(e) => tracing::warn!(error = %e, "static tokens not re-read; the ones read before stay"),
                }
            }
        }
        loaded.2.get(token).cloned()
    }
}

/// Why credentials were not taken: they do not hold, or the member is checking as many
/// passwords as it will at once.
#[derive(Debug)]
enum Refused {
    Auth(AuthError),
    Busy,
}

impl From<AuthError> for Refused {
    fn from(e: AuthError) -> Self {
        Refused::Auth(e)
    }
}

/// A password found right: the stored hash it matched (a new password voids it) and when.
type CheckedPassword = (String, Instant);

/// What the guard needs: the member (its auth store), the static tokens, and passwords already
/// checked (Argon2 is slow by design; a Eureka client sends its password with every request).
pub struct HttpAuth {
    pub member: Member,
    pub static_tokens: Option<StaticTokens>,
    checked: Mutex<HashMap<(String, [u8; 32]), CheckedPassword>>,
}

/// How long a checked password is remembered (while its user's stored hash is unchanged).
const CHECKED_PASSWORD_TTL: Duration = Duration::from_secs(300);
const CHECKED_PASSWORDS_MAX: usize = 10_000;

impl HttpAuth {
    pub fn new(member: Member, static_tokens: Option<StaticTokens>) -> Self {
        HttpAuth { member, static_tokens, checked: Mutex::new(HashMap::new()) }
    }

    /// The caller named by `headers` and `query`, with auth on. `Err` for credentials that do
    /// not hold (etcd's errors).
    async fn resolve(&self, headers: &HeaderMap, query: Option<&str>) -> Result<Option<String>, Refused> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let authz = header("authorization");
        let token = header("x-consul-token")
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .or_else(|| query_param(query, "token"))
            .or_else(|| authz.and_then(|a| strip_scheme(a, "bearer")).map(str::to_string));
        if let Some(token) = token {
            if let Some(user) = self.static_tokens.as_ref().and_then(|s| s.user(&token)) {
                return Ok(Some(user));
            }
            let now = quorate_consensus::passwords::now_unix_ms();
            return Ok(self.member.read(|s| s.auth().verify_token(&token, now)).map(Some)?);
        }
        if let Some(basic) = authz.and_then(|a| strip_scheme(a, "basic")) {
            return self.basic(basic).await.map(Some);
        }
        Ok(None)
    }

    async fn basic(&self, encoded: &str) -> Result<String, Refused> {
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD.decode(encoded).map_err(|_| AuthError::AuthFailed)?;
        let raw = String::from_utf8(raw).map_err(|_| AuthError::AuthFailed)?;
        let (user, password) = raw.split_once(':').ok_or(AuthError::AuthFailed)?;
        let stored = self.member.read(|s| s.auth().user(user).and_then(|u| u.password_hash.clone()));
        let digest: [u8; 32] =
            ring::digest::digest(&ring::digest::SHA256, password.as_bytes()).as_ref().try_into().expect("32 bytes");
        let key = (user.to_string(), digest);
        if let Some((hash, at)) = self.checked.lock().unwrap().get(&key) {
            if stored.as_deref() == Some(hash.as_str()) && at.elapsed() < CHECKED_PASSWORD_TTL {
                return Ok(user.to_string());
            }
        }
        // The member's bounded password work ("busy", 503, past it: never a 401 that reads as a
        // wrong password); an unknown user costs a hash too.
        let ok = quorate_consensus::passwords::check(stored.clone(), password.to_string())
            .await
            .map_err(|_| Refused::Busy)?;
        let Some(stored) = stored.filter(|_| ok) else {
            return Err(AuthError::AuthFailed.into());
        };
        let mut checked = self.checked.lock().unwrap();
        if checked.len() >= CHECKED_PASSWORDS_MAX {
            checked.clear();
        }
        checked.insert(key, (stored, Instant::now()));
        Ok(user.to_string())
    }
}

fn strip_scheme<'a>(header: &'a str, scheme: &str) -> Option<&'a str> {
    let (s, rest) = header.split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k == name && !v.is_empty()).then(|| percent_decode(v))
    })
}

/// An auth refusal over HTTP: 401 when the caller is not established (no or bad credentials),
/// 403 when it is and may not; the message is etcd's.
pub fn refusal(e: AuthError) -> ApiError {
    let (status, code) = match e {
        AuthError::UserEmpty => (StatusCode::UNAUTHORIZED, "user_name_empty"),
        AuthError::InvalidAuthToken => (StatusCode::UNAUTHORIZED, "invalid_auth_token"),
        AuthError::AuthFailed => (StatusCode::UNAUTHORIZED, "auth_failed"),
        AuthError::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
        _ => (StatusCode::FORBIDDEN, "auth"),
    };
    ApiError::new(status, code, e.to_string())
}

/// With auth on, `perm` on `[key, range_end)` for the request's caller: for what the route
/// table cannot see (a Consul check's instance is found from the check id).
pub fn permit(member: &Member, perm: PermType, key: &[u8], range_end: &[u8]) -> Result<(), ApiError> {
    let user = caller();
    member.read(|s| s.auth().check(user.as_deref(), key, range_end, perm)).map_err(refusal)
}

fn allowed(auth: &AuthStore, user: Option<&str>, need: &Need) -> Result<(), AuthError> {
    match need {
        Need::Open => Ok(()),
        Need::User => auth.check_user(user),
        Need::Keys { perm, key, range_end } => auth.check(user, key, range_end, *perm),
        Need::Root => auth.check_admin(user),
    }
}

/// The middleware: resolve, check, and serve with the caller in scope.
pub async fn guard(State(auth): State<Arc<HttpAuth>>, req: Request, next: Next) -> Response {
    if !auth.member.read(|s| s.auth().enabled()) {
        return CALLER.scope(None, next.run(req)).await;
    }
    let query = req.uri().query().map(str::to_string);
    let need = need(req.method(), req.uri().path(), query.as_deref());
    if need == Need::Open {
        // Health, metrics and status answer whatever credentials come with them.
        return CALLER.scope(None, next.run(req)).await;
    }
    let user = match auth.resolve(req.headers(), query.as_deref()).await {
        Ok(user) => user,
        // Bad credentials are refused even where none are needed: a client must learn that its
        // token expired before it matters.
        Err(Refused::Auth(e)) => return with_challenge(refusal(e).into_response()),
        Err(Refused::Busy) => {
            let e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_busy",
                "too many password checks at once on this member: retry",
            );
            let mut resp = e.into_response();
            resp.headers_mut().insert("retry-after", axum::http::HeaderValue::from_static("1"));
            return resp;
        }
    };
    if let Err(e) = auth.member.read(|s| allowed(s.auth(), user.as_deref(), &need)) {
        return with_challenge(refusal(e).into_response());
    }
    CALLER.scope(user, next.run(req)).await
}

/// 401s name the schemes a client may answer with.
fn with_challenge(mut resp: Response) -> Response {
    if resp.status() == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            "www-authenticate",
            axum::http::HeaderValue::from_static("Bearer realm=\"quorate\", Basic realm=\"quorate\""),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(perm: PermType, key: &str, end: &[u8]) -> Need {
        Need::Keys { perm, key: key.as_bytes().to_vec(), range_end: end.to_vec() }
    }

    #[test]
    fn every_route_needs_what_its_keys_need_and_unknown_routes_are_roots() {
        use PermType::{Read, Write};
        let (get, put, post, del) = (Method::GET, Method::PUT, Method::POST, Method::DELETE);
        let table = [
            (&get, "/health", None, Need::Open),
            (&get, "/metrics", None, Need::Open),
            (&get, "/v1/member/status", None, Need::Open),
            (&post, "/v1/member/isolate", None, Need::Root),
            (&post, "/v1/registry/repair", None, Need::Root),
            (&put, "/debug/failpoints/fsync-delay-ms", None, Need::Root),
            (&get, "/debug/pprof/profile", None, Need::Root),
            (&get, "/something/new", None, Need::Root),
            (
                &put,
                "/api/v1/ns/prod/services/orders/instances/i1",
                None,
                keys(Write, "/quorate/registry/prod/orders/", b"/quorate/registry/prod/orders0"),
            ),
            (
                &put,
                "/api/v1/ns/prod/services/orders/instances/i1/heartbeat",
                None,
                keys(Write, "/quorate/registry/prod/orders/", b"/quorate/registry/prod/orders0"),
            ),
            (
                &get,
                "/api/v1/ns/prod/services/orders/instances",
                None,
                keys(Read, "/quorate/registry/prod/orders/", b"/quorate/registry/prod/orders0"),
            ),
            (&get, "/api/v1/ns/prod/services", None, keys(Read, "/quorate/registry/prod/", b"/quorate/registry/prod0")),
            (
                &get,
                "/v1/health/service/web",
                None,
                keys(Read, "/quorate/registry/default/web/", b"/quorate/registry/default/web0"),
            ),
            (
                &get,
                "/v1/catalog/services",
                None,
                keys(Read, "/quorate/registry/default/", b"/quorate/registry/default0"),
            ),
            (&put, "/v1/agent/service/register", None, Need::User),
            (&get, "/v1/kv/app/a%2Fb", None, keys(Read, "app/a/b", b"")),
            (&get, "/v1/kv/app/", Some("recurse=true"), keys(Read, "app/", b"app0")),
            (&get, "/v1/kv/app", Some("keys"), keys(Read, "app", b"apq")),
            (&put, "/v1/kv/app/x", Some("cas=3"), keys(Write, "app/x", b"")),
            (&del, "/v1/kv/", Some("recurse"), keys(Write, "\0", &[0])),
            (
                &post,
                "/eureka/apps/ORDERS",
                None,
                keys(Write, "/quorate/registry/default/orders/", b"/quorate/registry/default/orders0"),
            ),
            (
                &put,
                "/eureka/apps/ORDERS/i1",
                None,
                keys(Write, "/quorate/registry/default/orders/", b"/quorate/registry/default/orders0"),
            ),
            (&get, "/eureka/apps", None, keys(Read, "/quorate/registry/default/", b"/quorate/registry/default0")),
            (
                &put,
                "/eureka/v2/apps/ORDERS/i1",
                None,
                keys(Write, "/quorate/registry/default/orders/", b"/quorate/registry/default/orders0"),
            ),
            (&get, "/v1/kv/app", Some("%72ecurse"), keys(Read, "app", b"apq")),
            (&put, "/eureka/v2/v2/apps/ORDERS/i1", None, Need::Root),
            (&get, "/v1/kv/app", Some("k%65ys=1"), keys(Read, "app", b"apq")),
        ];
        for (method, path, query, want) in table {
            assert_eq!(need(method, path, query), want, "{method} {path}?{query:?}");
        }
    }

    #[test]
    fn credentials_are_parsed_from_every_place_clients_put_them() {
        assert_eq!(strip_scheme("Bearer abc", "bearer"), Some("abc"));
        assert_eq!(strip_scheme("basic  eHk=", "basic"), Some("eHk="));
        assert_eq!(strip_scheme("Bearer abc", "basic"), None);
        assert_eq!(query_param(Some("index=3&token=a%2Bb"), "token"), Some("a+b".into()));
        assert_eq!(query_param(Some("token="), "token"), None);
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }

    #[test]
    fn static_tokens_are_read_checked_and_reread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# ops\nabcdefghijklmnop0001 alice\n\n").unwrap();
        let t = StaticTokens::load(path.clone()).unwrap();
        assert_eq!(t.user("abcdefghijklmnop0001"), Some("alice".into()));
        assert_eq!(t.user("nope"), None);
        std::fs::write(dir.path().join("short"), "abc alice\n").unwrap();
        assert!(StaticTokens::load(dir.path().join("short")).err().unwrap().contains("line 1"));
        std::fs::write(dir.path().join("three"), "abcdefghijklmnop0001 alice extra\n").unwrap();
        assert!(StaticTokens::load(dir.path().join("three")).is_err());
        assert!(StaticTokens::load(dir.path().join("missing")).is_err());
    }
}
