//! The member's budget of password work (Argon2id: tens of milliseconds and 19 MiB each), shared
//! by every door that checks or hashes a password (gRPC `Authenticate`, `UserAdd`,
//! `UserChangePassword`; HTTP basic auth): at most `SLOTS` at once on the member, each waited for
//! at most `WAIT`, run off the async runtime. A client guessing passwords slows itself, never
//! the member's Raft and request threads.

use std::time::Duration;

/// Password checks and hashes running at once on this member.
pub const SLOTS: usize = 2;
/// The longest a request waits for a slot before it is told to retry.
pub const WAIT: Duration = Duration::from_secs(1);

static WORK: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(SLOTS);

/// Every slot stayed taken for `WAIT`: the caller answers "retry".
#[derive(Debug)]
pub struct Busy;

async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Busy> {
    let _slot = tokio::time::timeout(WAIT, WORK.acquire()).await.map_err(|_| Busy)?.map_err(|_| Busy)?;
    tokio::task::spawn_blocking(f).await.map_err(|_| Busy)
}

/// `quorate_kv::auth::check_password` (an unknown user, `None`, costs a hash too).
pub async fn check(stored: Option<String>, password: String) -> Result<bool, Busy> {
    run(move || quorate_kv::auth::check_password(stored.as_deref(), &password)).await
}

/// A new Argon2id hash of `password`, with a fresh random salt.
pub async fn hash(password: String) -> Result<String, Busy> {
    run(move || quorate_kv::auth::hash_password(&password, &rand::random::<[u8; 16]>())).await
}

/// Milliseconds since the Unix epoch: tokens expire by the wall clock (as etcd's JWTs), the one
/// use of it at the doors; nothing replicated reads it.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
