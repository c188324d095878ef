//! Connections per client (issue 14 §3): at most `--max-connections-per-client` open at once
//! from one client (an IPv4 address, or an IPv6 /64, as the rate limits key them) on the client
//! port and on the HTTP port, each counted apart. A connection past it is closed as soon as it
//! is accepted, before anything it sent is read, and the refusal is logged (one line a second
//! at most). Streams within a connection are bounded by `--max-concurrent-streams` (HTTP/2's
//! own setting) and watchers within a stream by `--max-watchers-per-stream`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::rate_limit::client_key;

/// Open connections by client, against a ceiling.
pub struct ConnLimit {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
    /// What the log calls the port.
    port: &'static str,
    last_logged: AtomicU64,
}

impl ConnLimit {
    /// `None` when `max` is 0 (no limit).
    pub fn new(max: usize, port: &'static str) -> Option<Arc<ConnLimit>> {
        (max > 0).then(|| Arc::new(ConnLimit { max, open: Mutex::default(), port, last_logged: AtomicU64::new(0) }))
    }

    /// A slot for one more connection from `remote`, held until the guard drops; `None` (and a
    /// log line) when the client has `max` open already.
    pub fn admit(self: &Arc<Self>, remote: SocketAddr) -> Option<ConnGuard> {
        let key = client_key(remote.ip());
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            drop(open);
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            if self.last_logged.swap(now, Ordering::Relaxed) != now {
                tracing::warn!(
                    port = self.port,
                    client = %key,
                    max = self.max,
                    "refused a connection: the client has --max-connections-per-client open"
                );
            }
            return None;
        }
        *n += 1;
        Some(ConnGuard { limit: self.clone(), key })
    }

    /// Connections open from the client of `ip` (tests).
    pub fn open(&self, ip: IpAddr) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(&client_key(ip)).copied().unwrap_or(0)
    }
}

/// One admitted connection's slot.
pub struct ConnGuard {
    limit: Arc<ConnLimit>,
    key: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut open = self.limit.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// A connection that holds its slot while it lives.
pub struct Limited<S> {
    inner: S,
    _guard: Option<ConnGuard>,
}

impl<S> Limited<S> {
    pub fn new(inner: S, guard: Option<ConnGuard>) -> Self {
        Limited { inner, _guard: guard }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The client-port connections `incoming` yields, each admitted by `limit` (all when `None`).
pub fn admit_all<S, E>(
    incoming: impl futures::Stream<Item = Result<S, E>>,
    limit: Option<Arc<ConnLimit>>,
) -> impl futures::Stream<Item = Result<Limited<S>, E>>
where
    S: tonic::transport::server::Connected<ConnectInfo = quorate_tls::ConnInfo>,
{
    use futures::StreamExt;
    incoming.filter_map(move |conn| {
        let admitted = match conn {
            Err(e) => Some(Err(e)),
            Ok(conn) => match (&limit, conn.connect_info().remote) {
                (Some(limit), Some(addr)) => limit.admit(addr).map(|g| Ok(Limited::new(conn, Some(g)))),
                _ => Some(Ok(Limited::new(conn, None))),
            },
        };
        futures::future::ready(admitted)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_at_most_max_and_a_closed_connection_frees_its_slot() {
        let limit = ConnLimit::new(2, "test").unwrap();
        let a: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let a2: SocketAddr = "10.0.0.1:1001".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:1000".parse().unwrap();
        let g1 = limit.admit(a).unwrap();
        let _g2 = limit.admit(a2).unwrap();
        assert!(limit.admit(a).is_none(), "a third connection from the same address");
        let _g3 = limit.admit(b).expect("another client is not affected");
        drop(g1);
        assert_eq!(limit.open(a.ip()), 1);
        let _g4 = limit.admit(a).expect("a slot freed by a closed connection");
        // IPv6: one /64 is one client.
        let v6a: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        let v6b: SocketAddr = "[2001:db8::ffff]:1".parse().unwrap();
        let _h = (limit.admit(v6a).unwrap(), limit.admit(v6b).unwrap());
        assert!(limit.admit("[2001:db8::2]:1".parse().unwrap()).is_none());
        assert!(ConnLimit::new(0, "off").is_none());
    }
}
