//! TLS for quorate's ports, with rustls (ring), in etcd's terms: a certificate and key, a CA
//! that client certificates must chain to, and whether a client certificate is required.
//!
//! Certificates are re-read when their files change, as etcd does: every accepted connection
//! (and every outgoing peer connection) looks at the files' size, modification time and inode
//! first, and rebuilds the configuration when one moved. A rotation that leaves a file half
//! written or unreadable keeps the configuration in use, says so in the log, and is retried on
//! the next connection; connections already open keep the certificate they were set up with.
//!
//! A TLS handshake happens in a task of its own, bounded by `HANDSHAKE_TIMEOUT`: a client that
//! connects and sends nothing holds neither the accept loop nor a server slot.

pub mod jwt;
#[cfg(feature = "testing")]
pub mod testing;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections whose handshake is done, waiting for the server to take them.
const ACCEPTED_QUEUE: usize = 256;

/// Handshakes in progress at once on one listener.
const HANDSHAKES_MAX: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: {error}")]
    File { flag: &'static str, path: String, error: String },
    #[error("{0}")]
    Config(String),
}

/// The files of one side's TLS (etcd's `--cert-file`, `--key-file`, `--trusted-ca-file`, or
/// their `--peer-` twins), with the flag names used in errors.
#[derive(Clone, Debug)]
pub struct Files {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
    /// Flag names, for errors: cert, key, CA.
    pub flags: [&'static str; 3],
}

/// How a listener serves TLS.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub files: Files,
    /// Require a client certificate that chains to the CA (etcd's `--client-cert-auth`).
    pub client_cert_auth: bool,
    /// A client certificate's common name must be this (etcd's `--peer-cert-allowed-cn`).
    pub allowed_cn: Option<String>,
    /// ALPN protocols offered, most preferred first (`h2`, `http/1.1`).
    pub alpn: Vec<Vec<u8>>,
    /// What the log calls this listener ("client", "peer", "http").
    pub name: &'static str,
}

/// What identifies the files' current contents: size, modification time and inode of each.
type Stamp = Vec<Option<(u64, std::time::SystemTime, u64)>>;

fn stamp(paths: &[&Path]) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    paths
        .iter()
        .map(|p| std::fs::metadata(p).ok().map(|m| (m.len(), m.modified().unwrap_or(std::time::UNIX_EPOCH), m.ino())))
        .collect()
}

/// A configuration built from files, rebuilt when they change.
struct Reloading<C> {
    paths: Vec<PathBuf>,
    current: Mutex<Current<C>>,
    build: Box<dyn Fn() -> Result<C, TlsError> + Send + Sync>,
    what: &'static str,
}

struct Current<C> {
    stamp: Stamp,
    config: Arc<C>,
    /// The files as they were when they last failed to load, and when: a broken rotation is
    /// retried at most once a second, not on every connection.
    failed: Option<(Stamp, std::time::Instant)>,
}

/// How often files that failed to load are tried again while they stay unchanged.
const RELOAD_RETRY: Duration = Duration::from_secs(1);

impl<C> Reloading<C> {
    fn new(
        paths: Vec<PathBuf>,
        what: &'static str,
        build: impl Fn() -> Result<C, TlsError> + Send + Sync + 'static,
    ) -> Result<Self, TlsError> {
        let stamp = stamp(&paths.iter().map(PathBuf::as_path).collect::<Vec<_>>());
        let config = Arc::new(build()?);
        Ok(Reloading {
            paths,
            current: Mutex::new(Current { stamp, config, failed: None }),
            build: Box::new(build),
            what,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current<C>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The configuration for a new connection: the files are looked at (three `stat`s), and
    /// read again, outside the lock, only when they changed.
    fn get(&self) -> Arc<C> {
        let now = stamp(&self.paths.iter().map(PathBuf::as_path).collect::<Vec<_>>());
        {
            let current = self.lock();
            let retry_later = current.failed.as_ref().is_some_and(|(s, at)| *s == now && at.elapsed() < RELOAD_RETRY);
            if current.stamp == now || retry_later {
                return current.config.clone();
            }
        }
        let built = (self.build)();
        let mut current = self.lock();
        match built {
            Ok(config) => {
                tracing::info!(listener = self.what, "TLS certificate files changed: reloaded");
                current.stamp = now;
                current.config = Arc::new(config);
                current.failed = None;
            }
            Err(e) => {
                // Keep serving with what worked; tried again once the files change or a
                // second has passed.
                if current.failed.as_ref().is_none_or(|(s, _)| *s != now) {
                    tracing::warn!(listener = self.what, error = %e, "TLS certificate files changed but cannot be loaded; keeping the ones in use");
                }
                current.failed = Some((now, std::time::Instant::now()));
            }
        }
        current.config.clone()
    }
}

fn read_certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |error: String| TlsError::File { flag, path: path.display().to_string(), error };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

fn read_key(flag: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        flag,
        path: path.display().to_string(),
        error: format!("no usable PEM private key: {e}"),
    })
}

fn read_roots(flag: &'static str, path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(flag, path)? {
        roots.add(cert).map_err(|e| TlsError::File {
            flag,
            path: path.display().to_string(),
            error: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build_server(s: &ServerSettings) -> Result<rustls::ServerConfig, TlsError> {
    let [cert_flag, key_flag, ca_flag] = s.files.flags;
    let certs = read_certs(cert_flag, &s.files.cert)?;
    let key = read_key(key_flag, &s.files.key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (&s.files.ca, s.client_cert_auth) {
        (Some(ca), true) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(read_roots(ca_flag, ca)?, provider())
                .build()
                .map_err(|e| TlsError::Config(format!("{ca_flag}: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        (None, true) => {
            return Err(TlsError::Config(format!("client certificates are required but {ca_flag} is not given")))
        }
        // A CA without client-cert-auth: a certificate, if offered, is checked; none is fine.
        (Some(ca), false) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(read_roots(ca_flag, ca)?, provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Config(format!("{ca_flag}: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        (None, false) => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError::Config(format!(
            "{} and {} do not make a usable pair: {e}",
            s.files.cert.display(),
            s.files.key.display()
        ))
    })?;
    config.alpn_protocols = s.alpn.clone();
    Ok(config)
}

/// The identity a verified client certificate states.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub common_name: Option<String>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
}

impl Identity {
    /// Parse a certificate (DER). `None` if it does not parse (rustls has verified it already).
    pub fn of(cert: &[u8]) -> Option<Identity> {
        use x509_parser::extensions::GeneralName;
        let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
        let common_name = x509.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
        let mut id = Identity { common_name, ..Identity::default() };
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => id.dns_names.push(d.to_string()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => id.ip_addresses.push(IpAddr::from(<[u8; 4]>::try_from(*b).ok()?)),
                        16 => id.ip_addresses.push(IpAddr::from(<[u8; 16]>::try_from(*b).ok()?)),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        Some(id)
    }

    /// Whether this certificate may speak for the member named `name` at `peer_url`: its common
    /// name is the member's name, or a subject alternative name is the URL's host.
    pub fn names_member(&self, name: &str, peer_url: &str) -> bool {
        if !name.is_empty() && self.common_name.as_deref() == Some(name) {
            return true;
        }
        let Some(host) = url_host(peer_url) else { return false };
        match host.parse::<IpAddr>() {
            Ok(ip) => self.ip_addresses.contains(&ip),
            Err(_) => self.dns_names.iter().any(|d| dns_matches(d, &host)),
        }
    }
}

/// A certificate's DNS name against a host, as TLS clients match them: exactly (any case), or
/// a `*.` wildcard standing for exactly one leftmost label.
fn dns_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(rest) => {
            host.split_once('.').is_some_and(|(label, tail)| !label.is_empty() && tail.eq_ignore_ascii_case(rest))
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// The host of `scheme://host:port/...` (brackets of an IPv6 address removed).
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let hostport = rest.split('/').next()?;
    if let Some(v6) = hostport.strip_prefix('[') {
        return v6.split_once(']').map(|(h, _)| h.to_string());
    }
    Some(hostport.rsplit_once(':').map_or(hostport, |(h, _)| h).to_string())
}

/// TCP keep-alive on an accepted connection (first probe after a minute idle, then every 10
/// s): a client that vanished without closing (a host gone, a NAT that forgot the flow) is
/// noticed in minutes, and what it held (a connection slot, a watch) is let go.
pub fn keep_alive(tcp: &TcpStream) {
    let ka = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(10));
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
}

/// Handshakes in progress at once from one client (an IPv4 address or an IPv6 /64): one client
/// opening connections and sending nothing cannot take every handshake slot of a listener.
const HANDSHAKES_PER_CLIENT: usize = 16;

/// The key of a client (for handshakes here, and for the server's rate and connection limits):
/// its IPv4 address (IPv4-mapped ones included), or its IPv6 /64 (one host has a whole /64 to
/// pick fresh addresses from).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

/// Handshakes in progress by client; a slot is given back when its guard drops.
#[derive(Default)]
struct InFlight(Mutex<std::collections::HashMap<IpAddr, usize>>);

struct InFlightGuard(Arc<InFlight>, IpAddr);

impl InFlight {
    fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<InFlightGuard> {
        let key = client_key(ip);
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key).or_insert(0);
        if *n >= HANDSHAKES_PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(InFlightGuard(self.clone(), key))
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut map = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

/// Accepts TLS on a listener, with the certificates of `ServerSettings`, re-read on change.
pub struct Acceptor {
    settings: ServerSettings,
    config: Reloading<rustls::ServerConfig>,
    /// Second of the last refused handshake logged (one line a second at most).
    last_logged: AtomicU64,
}

impl Acceptor {
    /// Loads the files now: a missing or unusable one is an error at start, naming its flag.
    pub fn new(settings: ServerSettings) -> Result<Arc<Acceptor>, TlsError> {
        let mut paths = vec![settings.files.cert.clone(), settings.files.key.clone()];
        paths.extend(settings.files.ca.clone());
        let s = settings.clone();
        let config = Reloading::new(paths, settings.name, move || build_server(&s))?;
        Ok(Arc::new(Acceptor { settings, config, last_logged: AtomicU64::new(0) }))
    }

    /// The handshake, and then the allowed common name: a connection that fails either is
    /// closed before anything it sent past the handshake is read.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<ServerConn> {
        let remote = tcp.peer_addr().ok();
        let local = tcp.local_addr().ok();
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.get());
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let identity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| Identity::of(leaf))
            .map(Arc::new);
        if let Some(cn) = &self.settings.allowed_cn {
            let theirs = identity.as_ref().and_then(|i| i.common_name.as_deref());
            if theirs != Some(cn.as_str()) {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("certificate common name {theirs:?} is not the allowed {cn:?}"),
                ));
            }
        }
        Ok(ServerConn { inner: Box::new(tls), remote, local, identity })
    }

    fn log_refusal(&self, remote: Option<SocketAddr>, e: &io::Error) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if self.last_logged.swap(now, Ordering::Relaxed) != now {
            let from = remote.map_or("?".to_string(), |a| a.to_string());
            let mut error = e.to_string();
            if error.contains("InvalidContentType") {
                error = "not a TLS handshake: a plaintext client (http://) on a TLS port?".into();
            }
            tracing::warn!(listener = self.settings.name, from = %from, error = %error, "rejected TLS connection");
        }
    }

    /// Accept on `listener` forever, each handshake in a task of its own; connections that
    /// completed it come out of the returned receiver. Ends when the receiver is dropped.
    pub fn serve(self: Arc<Self>, listener: TcpListener) -> tokio::sync::mpsc::Receiver<ServerConn> {
        let (tx, rx) = tokio::sync::mpsc::channel(ACCEPTED_QUEUE);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
        let by_client = Arc::new(InFlight::default());
        tokio::spawn(async move {
            loop {
                // At most HANDSHAKES_MAX at once: past that, new connections wait in the
                // kernel's backlog rather than take descriptors and tasks here.
                let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
                let (tcp, remote) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of descriptors and the like: pause rather than spin.
                            tracing::warn!(listener = self.settings.name, error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = tx.closed() => return,
                };
                let Some(slot) = by_client.enter(remote.ip()) else {
                    self.log_refusal(
                        Some(remote),
                        &io::Error::other(format!(
                            "{HANDSHAKES_PER_CLIENT} handshakes from this client in progress already"
                        )),
                    );
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                keep_alive(&tcp);
                let (me, tx) = (self.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let _slot = slot;
                    match me.accept(tcp).await {
                        Ok(conn) => {
                            // A server that takes no connection for this long is stuck or
                            // gone: drop this one rather than hold it.
                            let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, tx.send(conn)).await;
                        }
                        Err(e) => me.log_refusal(Some(remote), &e),
                    }
                });
            }
        });
        rx
    }
}

/// A server-side TLS connection that completed its handshake.
pub struct ServerConn {
    inner: Box<tokio_rustls::server::TlsStream<TcpStream>>,
    pub remote: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    /// The verified client certificate's identity, if the client offered one.
    pub identity: Option<Arc<Identity>>,
}

impl AsyncRead for ServerConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServerConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What a peer-port request learns about its connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    pub identity: Option<Arc<Identity>>,
}

impl tonic::transport::server::Connected for ServerConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        ConnInfo { remote: self.remote, identity: self.identity.clone() }
    }
}

/// The client side of peer TLS: this member's certificate (offered to peers that ask for one)
/// and the CA peers' certificates must chain to, re-read when the files change.
pub struct Connector {
    config: Reloading<rustls::ClientConfig>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").field("files", &self.config.paths).finish()
    }
}

/// `identity`: offer `files`' certificate and key; without, offer none.
fn build_client(files: &Files, identity: bool, alpn: &[Vec<u8>]) -> Result<rustls::ClientConfig, TlsError> {
    let [cert_flag, key_flag, ca_flag] = files.flags;
    let Some(ca) = &files.ca else {
        return Err(TlsError::Config(format!("{ca_flag} is required to check the other side's certificate")));
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(read_roots(ca_flag, ca)?);
    let mut config = match identity {
        true => builder
            .with_client_auth_cert(read_certs(cert_flag, &files.cert)?, read_key(key_flag, &files.key)?)
            .map_err(|e| TlsError::Config(format!("{} and {}: {e}", files.cert.display(), files.key.display())))?,
        false => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

/// ALPN for gRPC.
const H2: &[&[u8]] = &[b"h2"];

impl Connector {
    /// Check servers against `files.ca`; offer `files`' certificate (with `identity`) to those
    /// that ask; speak the first of `alpn` the server takes (`http/1.1` for a plain HTTP client).
    pub fn build(files: Files, identity: bool, alpn: &[&[u8]]) -> Result<Arc<Connector>, TlsError> {
        let mut paths = if identity { vec![files.cert.clone(), files.key.clone()] } else { vec![] };
        paths.extend(files.ca.clone());
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let what = if identity { "peer client" } else { "client" };
        Ok(Arc::new(Connector { config: Reloading::new(paths, what, move || build_client(&files, identity, &alpn))? }))
    }

    /// gRPC: check servers against `files.ca`; offer `files`' certificate to those that ask.
    pub fn new(files: Files) -> Result<Arc<Connector>, TlsError> {
        Self::build(files, true, H2)
    }

    /// gRPC: check servers against the CA in `ca` (flag name `ca_flag` in errors); offer no
    /// certificate.
    pub fn anonymous(ca: PathBuf, ca_flag: &'static str) -> Result<Arc<Connector>, TlsError> {
        let files = Files { cert: PathBuf::new(), key: PathBuf::new(), ca: Some(ca), flags: ["", "", ca_flag] };
        Self::build(files, false, H2)
    }

    /// Connect to `host:port` and complete a handshake that checks the server's certificate
    /// names `host` (an IP address in a SAN, or a DNS name).
    pub async fn connect(&self, host: &str, port: u16) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let connector = tokio_rustls::TlsConnector::from(self.config.get());
        tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
    }
}

/// What tonic dials through: TCP to the URI's host and port, then the handshake.
fn dialer(
    connector: Arc<Connector>,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = io::Error,
    Future = impl std::future::Future<
        Output = io::Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>,
    > + Send,
> + Send
       + 'static {
    tower::service_fn(move |uri: http::Uri| {
        let connector = connector.clone();
        async move {
            let host = uri.host().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host in the URL"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tls = connector.connect(&host, port).await?;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    })
}

/// A lazily connected gRPC channel to `endpoint` over TLS through `connector` (the endpoint's
/// connect timeout bounds the TCP connection and the handshake together).
pub fn channel(endpoint: &tonic::transport::Endpoint, connector: Arc<Connector>) -> tonic::transport::Channel {
    endpoint.connect_with_connector_lazy(dialer(connector))
}

/// `channel`, connected now: a refused handshake is an error here.
pub async fn connect(
    endpoint: &tonic::transport::Endpoint,
    connector: Arc<Connector>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    endpoint.connect_with_connector(dialer(connector)).await
}

#[cfg(test)]
mod tests {
    use super::testing::{Ca, Issued};
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn files(issued: &Issued, ca: Option<PathBuf>) -> Files {
        Files { cert: issued.cert.clone(), key: issued.key.clone(), ca, flags: ["--cert", "--key", "--ca"] }
    }

    fn settings(issued: &Issued, ca: &Path, client_cert_auth: bool, allowed_cn: Option<&str>) -> ServerSettings {
        ServerSettings {
            files: files(issued, Some(ca.to_path_buf())),
            client_cert_auth,
            allowed_cn: allowed_cn.map(str::to_string),
            alpn: vec![b"h2".to_vec()],
            name: "test",
        }
    }

    /// A listener that echoes one line per connection; returns its port and what the server
    /// learnt of each client (or why it refused it).
    async fn echo(acceptor: Arc<Acceptor>) -> (u16, tokio::sync::mpsc::Receiver<Option<Arc<Identity>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut accepted = acceptor.serve(listener);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(mut conn) = accepted.recv().await {
                let _ = tx.send(conn.identity.clone()).await;
                tokio::spawn(async move {
                    let mut buf = [0u8; 5];
                    if conn.read_exact(&mut buf).await.is_ok() {
                        let _ = conn.write_all(&buf).await;
                    }
                });
            }
        });
        (port, rx)
    }

    async fn round_trip(connector: &Connector, port: u16) -> io::Result<()> {
        let mut tls = connector.connect("127.0.0.1", port).await?;
        tls.write_all(b"hello").await?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"hello");
        Ok(())
    }

    #[tokio::test]
    async fn mutual_tls_lets_in_only_certificates_of_the_ca_and_the_allowed_name() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, rogue) = (Ca::new("ca"), Ca::new("rogue"));
        let ca_pem = ca.write(dir.path(), "ca");
        let server = ca.issue_files(dir.path(), "server", "m1");
        let good = ca.issue_files(dir.path(), "good", "m2");
        let forged = rogue.issue_files(dir.path(), "forged", "m2");
        let other_name = ca.issue_files(dir.path(), "other", "intruder");

        let (port, mut seen) = echo(Acceptor::new(settings(&server, &ca_pem, true, None)).unwrap()).await;
        let good_client = Connector::new(files(&good, Some(ca_pem.clone()))).unwrap();
        round_trip(&good_client, port).await.unwrap();
        let id = seen.recv().await.unwrap().expect("the client's identity");
        assert_eq!(id.common_name.as_deref(), Some("m2"));
        assert_eq!(id.ip_addresses, vec![IpAddr::from([127, 0, 0, 1])]);

        // Signed by another CA: refused. No certificate at all: refused. Not TLS: refused.
        let forged_client = Connector::new(files(&forged, Some(ca_pem.clone()))).unwrap();
        assert!(round_trip(&forged_client, port).await.is_err(), "a certificate of another CA got in");
        let no_cert = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(read_roots("ca", &ca_pem).unwrap())
            .with_no_client_auth();
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let result = async {
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(no_cert)).connect(name, tcp).await?;
            tls.write_all(b"hello").await?;
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).await
        };
        assert!(result.await.is_err(), "a client without a certificate got in");
        // Plaintext: the server answers with a TLS alert record (type 21) at most, and closes.
        let mut plain = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        plain.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await.unwrap();
        assert!(answer.is_empty() || answer[0] == 21, "a plaintext client got {answer:?}");
        let nothing = tokio::time::timeout(Duration::from_millis(300), seen.recv()).await;
        assert!(nothing.is_err(), "a refused connection reached the server");

        // An allowed common name: the CA's word is not enough.
        let (port, mut seen) = echo(Acceptor::new(settings(&server, &ca_pem, true, Some("m2"))).unwrap()).await;
        round_trip(&good_client, port).await.unwrap();
        assert!(seen.recv().await.unwrap().is_some());
        let other_client = Connector::new(files(&other_name, Some(ca_pem.clone()))).unwrap();
        assert!(round_trip(&other_client, port).await.is_err(), "a certificate with another CN got in");
        let nothing = tokio::time::timeout(Duration::from_millis(300), seen.recv()).await;
        assert!(nothing.is_err(), "a certificate with another CN reached the server");
    }

    #[tokio::test]
    async fn certificates_are_reread_when_their_files_change_and_a_broken_file_keeps_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (old_ca, new_ca) = (Ca::new("old"), Ca::new("new"));
        let (old_pem, new_pem) = (old_ca.write(dir.path(), "old-ca"), new_ca.write(dir.path(), "new-ca"));
        let server = old_ca.issue_files(dir.path(), "server", "m1");
        let settings = ServerSettings {
            files: files(&server, None),
            client_cert_auth: false,
            allowed_cn: None,
            alpn: vec![],
            name: "test",
        };
        let (port, _seen) = echo(Acceptor::new(settings).unwrap()).await;
        let client = old_ca.issue_files(dir.path(), "client", "c");
        let trusts_old = Connector::new(files(&client, Some(old_pem))).unwrap();
        let trusts_new = Connector::new(files(&client, Some(new_pem))).unwrap();
        round_trip(&trusts_old, port).await.unwrap();
        assert!(round_trip(&trusts_new, port).await.is_err());

        // A rotation caught half-way (a key that is not a key): the old pair stays in use.
        std::fs::write(&server.key, "-----BEGIN PRIVATE KEY-----\nbroken\n").unwrap();
        round_trip(&trusts_old, port).await.unwrap();

        // The new pair in place: new connections get it, without a restart.
        let (cert, key) = new_ca.issue("m1");
        std::fs::write(&server.cert, cert).unwrap();
        std::fs::write(&server.key, key).unwrap();
        round_trip(&trusts_new, port).await.unwrap();
        assert!(round_trip(&trusts_old, port).await.is_err(), "the old certificate is still served");
    }

    #[test]
    fn url_hosts() {
        assert_eq!(url_host("https://127.0.0.1:2380").as_deref(), Some("127.0.0.1"));
        assert_eq!(url_host("https://[::1]:2380/x").as_deref(), Some("::1"));
        assert_eq!(url_host("https://m1.example:2380").as_deref(), Some("m1.example"));
        assert_eq!(url_host("m1:2380").as_deref(), Some("m1"));
    }

    #[test]
    fn a_certificate_names_a_member_by_common_name_or_by_its_url_host() {
        let id = Identity {
            common_name: Some("m1".into()),
            dns_names: vec!["m1.example".into()],
            ip_addresses: vec!["10.0.0.1".parse().unwrap()],
        };
        assert!(id.names_member("m1", "https://192.168.0.9:2380"));
        assert!(id.names_member("m2", "https://10.0.0.1:2380"));
        assert!(id.names_member("m2", "https://M1.example:2380"));
        assert!(!id.names_member("m2", "https://10.0.0.2:2380"));
        assert!(!id.names_member("m2", "https://m2.example:2380"));
        assert!(!Identity::default().names_member("m1", "https://10.0.0.1:2380"));
        // A member added but not started yet has no name: an empty CN names nobody.
        let blank = Identity { common_name: Some(String::new()), ..Identity::default() };
        assert!(!blank.names_member("", "https://10.0.0.9:2380"));
        // Wildcards stand for one label, as in TLS.
        let wild = Identity { dns_names: vec!["*.etcd.ns.svc".into()], ..Identity::default() };
        assert!(wild.names_member("m1", "https://m1.etcd.ns.svc:2380"));
        assert!(!wild.names_member("m1", "https://a.m1.etcd.ns.svc:2380"));
        assert!(!wild.names_member("m1", "https://etcd.ns.svc:2380"));
    }
}
