//! Member configuration in etcd's terms, and its validation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use quorate_consensus::{member_id, stable_id, MemberConfig, MemberNode};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterState {
    New,
    Existing,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub listen_client_addrs: Vec<SocketAddr>,
    pub advertise_client_urls: Vec<String>,
    pub listen_peer_addr: SocketAddr,
    pub advertise_peer_url: String,
    pub listen_http_addr: SocketAddr,
    /// etcd's `--listen-metrics-urls`: extra listeners that serve only `/metrics` and `/health`.
    pub listen_metrics_addrs: Vec<SocketAddr>,
    /// `name -> peer URL` for every initial member.
    pub initial_cluster: Vec<(String, String)>,
    pub initial_cluster_state: ClusterState,
    pub initial_cluster_token: String,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_ms: u64,
    pub quota_backend_bytes: u64,
    pub snapshot_count: u64,
    /// etcd's `--max-txn-ops`: most compares, and most ops per list, in one Txn; nested Txns
    /// spend from the same budget.
    pub max_txn_ops: usize,
    /// `--max-watchers-per-stream`: watchers one Watch stream may hold at once.
    pub max_watchers_per_stream: usize,
    /// etcd's `--auth-token-ttl`: how long a token from `Authenticate` is good for.
    pub auth_token_ttl: std::time::Duration,
    /// `--auth-static-tokens-file`: `<token> <user>` lines for the HTTP APIs.
    pub auth_static_tokens_file: Option<PathBuf>,
    /// etcd's `--auth-token`: `simple`, or `jwt,pub-key=...,priv-key=...,sign-method=...`.
    pub auth_token: String,
    /// etcd's `--max-request-bytes`: largest write request proposed, in bytes.
    pub max_request_bytes: usize,
    /// `--max-connections-per-client`: connections one client may hold open on the client port
    /// and on the HTTP port (each counted apart); 0: no limit.
    pub max_connections_per_client: usize,
    /// etcd's `--max-concurrent-streams`: HTTP/2 streams one client connection may have open
    /// (`None`: no limit).
    pub max_concurrent_streams: Option<u32>,
    /// The registry's eviction brake (ADR 0005).
    pub brake: quorate_registry::BrakeConfig,
    /// The address health-check probes are sent from (default: the system's choice).
    pub probe_source_ip: Option<std::net::IpAddr>,
    /// `--check-allowed-cidrs`: the only addresses health checks may probe (empty: any).
    pub check_allowed_cidrs: Vec<crate::cidr::Cidr>,
    /// Per-client rate limits (`crate::rate_limit`), the same for the gRPC and the HTTP APIs
    /// (each has its own buckets).
    pub rate_limit: RateLimitConfig,
    /// etcd's `--enable-pprof`: serve CPU profiles at `/debug/pprof/profile` (and a flamegraph).
    pub enable_pprof: bool,
    /// TLS on each port (none by default).
    pub tls: TlsConfig,
    /// Flags only `quorate drill` sets.
    pub drill: DrillFlags,
}

/// What only the drill turns on: a planted bug it must catch, and failpoints it injects.
#[derive(Clone, Copy, Debug, Default)]
pub struct DrillFlags {
    /// Serve linearizable reads from local state, without a ReadIndex round (unsafe).
    pub unsafe_local_reads: bool,
    /// Accept `PUT /debug/failpoints/fsync-delay-ms` on the HTTP listener.
    pub failpoints: bool,
    /// Lease renewals do not move deadlines: leases expire early (unsafe; issue 11).
    pub early_lease_expiry: bool,
    /// Send Raft snapshots in chunks of this many bytes (0: the default).
    pub snapshot_chunk_bytes: usize,
}

/// Largest `--max-request-bytes` accepted: a request must fit, with room to spare, in one peer
/// message (`PEER_MESSAGE_BYTES_MAX`) to replicate.
pub const REQUEST_BYTES_LIMIT: usize = quorate_consensus::PEER_MESSAGE_BYTES_MAX / 4;

/// Parse `name=url,name=url`.
pub fn parse_initial_cluster(s: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, url)) = part.split_once('=') else {
            bail!("--initial-cluster entry {part:?} is not name=url");
        };
        url_to_addr(url).with_context(|| format!("--initial-cluster entry {part:?}"))?;
        out.push((name.to_string(), url.to_string()));
    }
    if out.is_empty() {
        bail!("--initial-cluster is empty");
    }
    Ok(out)
}

/// `http://host:port` (or bare `host:port`) to a socket address to bind.
pub fn url_to_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let hostport = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")).unwrap_or(url);
    let hostport = hostport.trim_end_matches('/');
    let hostport = hostport.replace("localhost", "127.0.0.1");
    hostport.parse().with_context(|| format!("{url:?} is not a URL with an IP address and port"))
}

/// TLS on the ports that serve it, as etcd's flags set it.
#[derive(Clone, Debug, Default)]
pub struct TlsConfig {
    /// `--cert-file`, `--key-file`, `--trusted-ca-file`, `--client-cert-auth`: for the
    /// `https://` entries of `--listen-client-urls`.
    pub client: Option<quorate_tls::ServerSettings>,
    /// Which of `listen_client_addrs` serve TLS (`https://`).
    pub client_https: Vec<bool>,
    /// `--listen-http https://...`: the HTTP APIs over TLS (`--http-*` flags, or the client's).
    pub http: Option<quorate_tls::ServerSettings>,
    /// `https://` peer URLs: the peer port serves TLS and every peer is dialled over TLS.
    pub peer: Option<PeerTls>,
}

/// Peer TLS: what the peer port serves, and what this member offers when it dials a peer.
#[derive(Clone, Debug)]
pub struct PeerTls {
    pub server: quorate_tls::ServerSettings,
    pub client: quorate_tls::Files,
}

/// `--rate-limit-*`: requests per second per client and their burst, and the same for liveness
/// traffic (keep-alive streams, heartbeats, renewals). A rate of 0 is no limit.
#[derive(Clone, Debug, Default)]
pub struct RateLimitConfig {
    pub rps: f64,
    pub burst: f64,
    pub liveness_rps: f64,
    pub liveness_burst: f64,
    /// The HTTP APIs' request rate and burst, when they differ from the gRPC port's.
    pub http: Option<(f64, f64)>,
}

impl RateLimitConfig {
    /// The limits of the HTTP APIs: the gRPC port's, with `http`'s request rate if given.
    pub fn for_http(&self) -> RateLimitConfig {
        match self.http {
            Some((rps, burst)) => RateLimitConfig { rps, burst, http: None, ..self.clone() },
            None => self.clone(),
        }
    }
}

impl ServerConfig {
    pub fn member_id(&self) -> u64 {
        member_id(&self.name, &self.advertise_peer_url)
    }

    /// Derived from the initial membership and token, so every initial member agrees.
    pub fn cluster_id(&self) -> u64 {
        let mut members: Vec<String> = self.initial_cluster.iter().map(|(n, u)| format!("{n}={u}")).collect();
        members.sort();
        stable_id(&[&format!("{}|{}", members.join(","), self.initial_cluster_token)])
    }

    pub fn member_config(&self) -> anyhow::Result<MemberConfig> {
        if self.heartbeat_interval_ms == 0 || self.election_timeout_ms < 5 * self.heartbeat_interval_ms {
            bail!(
                "--election-timeout ({} ms) must be at least 5 times --heartbeat-interval ({} ms)",
                self.election_timeout_ms,
                self.heartbeat_interval_ms
            );
        }
        if self.max_watchers_per_stream == 0 {
            bail!("--max-watchers-per-stream must be at least 1");
        }
        if self.max_txn_ops == 0 {
            bail!("--max-txn-ops must be at least 1");
        }
        if self.max_request_bytes == 0 || self.max_request_bytes > REQUEST_BYTES_LIMIT {
            bail!("--max-request-bytes must be between 1 and {REQUEST_BYTES_LIMIT}");
        }
        let mut initial = BTreeMap::new();
        for (name, url) in &self.initial_cluster {
            initial
                .insert(member_id(name, url), MemberNode { name: name.clone(), peer_url: url.clone(), promote: false });
        }
        let me = self.member_id();
        match initial.get(&me) {
            Some(_) => {}
            None => bail!(
                "--initial-cluster has no entry {}={} for this member (check --name and --initial-advertise-peer-urls)",
                self.name,
                self.advertise_peer_url
            ),
        }
        Ok(MemberConfig {
            id: me,
            name: self.name.clone(),
            data_dir: self.data_dir.clone(),
            peer_url: self.advertise_peer_url.clone(),
            client_urls: self.advertise_client_urls.clone(),
            initial_members: initial,
            new_cluster: self.initial_cluster_state == ClusterState::New,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            election_timeout_ms: self.election_timeout_ms,
            snapshot_entries: self.snapshot_count,
            quota_bytes: self.quota_backend_bytes,
            join_incarnation: None,
            cluster_id: self.cluster_id(),
        })
    }
}

#[cfg(test)]
mod rate_limit_tests {
    use super::RateLimitConfig;

    #[test]
    fn the_http_apis_take_their_own_request_rate_and_share_the_liveness_one() {
        let grpc = RateLimitConfig { rps: 100.0, burst: 200.0, liveness_rps: 5.0, liveness_burst: 10.0, http: None };
        let same = grpc.for_http();
        assert_eq!((same.rps, same.burst, same.liveness_rps), (100.0, 200.0, 5.0));
        let apart = RateLimitConfig { http: Some((7.0, 0.0)), ..grpc }.for_http();
        assert_eq!((apart.rps, apart.burst, apart.liveness_rps, apart.liveness_burst), (7.0, 0.0, 5.0, 10.0));
    }
}
