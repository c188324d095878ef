//! `quorate`: a clustered service registry and coordination store that cannot split its brain.
//! This binary parses flags, calls a library, and prints.

use std::path::PathBuf;

mod logging;

/// glibc's malloc showed up as a fifth of a member's CPU under write load; mimalloc is faster
/// for the many small, short-lived allocations of request handling. Built without transparent
/// huge pages (`no_thp`): with them an idle member held 71 MB, 43 MB without, and 100k puts left
/// 214 MB vs 187 MB, with no throughput difference beyond run-to-run noise.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use quorate_server::{parse_initial_cluster, ClusterState, Listeners, ServerConfig};

#[derive(Parser)]
#[command(name = "quorate", version, about = "A service registry and coordination store that cannot split its brain.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a member. With no flags: a single-member cluster with its data in ./default.quorate.
    Server(Box<ServerArgs>),
    /// Load over the etcd v3 API against any endpoints (quorate or etcd): throughput and
    /// latency percentiles per operation and client count.
    Bench(BenchArgs),
    /// Snapshot files (`etcdctl snapshot save` writes them).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Load over the native registry API: registrations/s, discovery queries/s (consistent and
    /// stale), then a heartbeat phase (measure the members' CPU from outside meanwhile).
    BenchRegistry(BenchRegistryArgs),
    /// The split-brain drill: start a cluster with every member in its own network namespace
    /// (root; or `--mode proxy` on loopback), drive clients, inject faults on a schedule fixed
    /// by the seed, check the recorded history, and write a report (Markdown and JSON). Exit 0:
    /// no anomaly; 1: anomalies; 2: the drill could not run.
    Drill(DrillArgs),
    /// The drill's peer-link proxy (the drill starts it in each member's namespace).
    #[command(hide = true)]
    DrillProxy(DrillProxyArgs),
    /// The operator's commands (etcdctl's global flags): status, doctor, timeline, audit, verify,
    /// isolate, unisolate, recover.
    /// See docs/ctl.md.
    Ctl(CtlArgs),
}

#[derive(Args)]
struct CtlArgs {
    /// Client addresses of the cluster's members, comma-separated (any one that answers is enough).
    #[arg(long, global = true, default_value = "127.0.0.1:2379", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Output format: table or json.
    #[arg(short = 'w', long, global = true, default_value = "table", value_parser = ["table", "json"])]
    write_out: String,
    /// Time to connect to a member (etcdctl style: 2s, 500ms).
    #[arg(long, global = true, default_value = "2s", value_parser = quorate_ctl::parse_duration)]
    dial_timeout: std::time::Duration,
    /// Time for each request to a member.
    #[arg(long, global = true, default_value = "5s", value_parser = quorate_ctl::parse_duration)]
    command_timeout: std::time::Duration,
    /// The CA of https:// endpoints and HTTP ports (etcdctl's flag).
    #[arg(long, global = true)]
    cacert: Option<PathBuf>,
    /// A client certificate, for members that require one (etcdctl's flag).
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    /// The key of --cert.
    #[arg(long, global = true)]
    key: Option<PathBuf>,
    /// With auth on: `name:password` (etcdctl's flag; without `:password`, QUORATE_PASSWORD).
    /// ctl logs in once and sends the token to every member, over gRPC and to the HTTP ports.
    #[arg(long, global = true)]
    user: Option<String>,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Every member's view side by side: role, term, leader, commit and applied index,
    /// revision, state hash, lag, last leader contact, db size, clock offset, fsync p99.
    Status,
    /// The same data judged: `verdict: healthy|degraded|critical`, then each finding with its
    /// evidence and fix. Exit 0 healthy, 1 degraded, 2 critical.
    Doctor,
    /// The flight recorder: every member's consensus events (votes and their answers, terms,
    /// elections, leaders, lease clock, stalls, membership, snapshots, alarms, brake) merged by
    /// term and time, with each member's clock offset. See docs/ctl.md.
    Timeline {
        /// Only events from this far back (10m, 90s, 2h).
        #[arg(long, value_parser = parse_since)]
        since: Option<std::time::Duration>,
        /// Only this member (name or hex id).
        #[arg(long)]
        member: Option<String>,
    },
    /// The registry against reality: probes every instance's own health endpoint from this
    /// host and reports ghosts (registered healthy, dead), zombies (registered critical,
    /// answering) and flapping ones; and any member whose registry differs from the others'.
    /// Exit 0 when everything agrees, 1 otherwise.
    Audit(AuditArgs),
    /// Whether the cluster is fit to take traffic again (after a recovery): every member
    /// answers, one leader in one term, equal state hashes, nothing critical, a short
    /// linearizability probe through every member and a short write load. Exit 0 only when
    /// every check passes. What the probe and the load write is deleted afterwards.
    Verify {
        /// How long the linearizability probe runs.
        #[arg(long, default_value = "2s", value_parser = quorate_ctl::parse_duration)]
        probe_duration: std::time::Duration,
        /// How long the write load runs (0s: none).
        #[arg(long, default_value = "3s", value_parser = quorate_ctl::parse_duration)]
        load_duration: std::time::Duration,
        /// Clients of the write load.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
        load_clients: u64,
    },
    /// Take a member out of service (recorded through Raft): it serves no client request (each
    /// is refused naming the isolation), and the leader demotes it to a learner that keeps
    /// replicating. Refused when the other voters would be left without a healthy quorum, or
    /// when it is the last voter. Exit 0 when recorded, 1 when refused.
    Isolate {
        /// The member's name or hex id.
        member: String,
        /// Why (shown to every client it refuses, in status and in the timeline).
        #[arg(long)]
        reason: String,
    },
    /// Put an isolated member back in service: it serves clients again, and the leader promotes
    /// it back to a voter once it has caught up.
    Unisolate {
        /// The member's name or hex id.
        member: String,
    },
    /// After losing a quorum for good: the survivors (every member that answers at --endpoints,
    /// and the stopped ones given by --data-dir) become the cluster. A dry run prints the plan:
    /// the survivor whose log is the most recent, what is kept and what may be lost, who is
    /// dropped. With --apply every survivor applies it (running ones restart in place), and the
    /// cluster's incarnation is raised, so that the dropped members, restarted on their old
    /// data, are refused by every member. Refused while a majority of the voters answers, or
    /// while a member it would drop answers. Exit 0 for a plan or a recovery done, 1 otherwise.
    Recover {
        /// The data directory of a stopped survivor (repeat for each); stop it first.
        #[arg(long)]
        data_dir: Vec<std::path::PathBuf>,
        /// Carry the plan out.
        #[arg(long)]
        apply: bool,
    },
}

#[derive(Args)]
struct AuditArgs {
    /// Only this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only this service (in --namespace, default "default").
    #[arg(long)]
    service: Option<String>,
    /// Probe instances that have no HTTP check with an HTTP GET of this path (e.g. /health)
    /// instead of a TCP connect.
    #[arg(long)]
    health_path: Option<String>,
    /// Probes per instance; an instance that answers some and not others is flapping.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    probes: u32,
    /// Time between an instance's probes.
    #[arg(long, default_value = "300ms", value_parser = quorate_ctl::parse_duration)]
    probe_interval: std::time::Duration,
    /// Time a probe may take.
    #[arg(long, default_value = "2s", value_parser = quorate_ctl::parse_duration)]
    probe_timeout: std::time::Duration,
    /// Instances probed at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
    concurrency: u64,
    /// Plan the repairs: deregister ephemeral ghosts, mark passing the zombies the members' own
    /// active check marked critical (never an instance its owner took out, never a persistent
    /// one). A dry run unless --yes is given too; then the leader carries them out through the
    /// registry's rules (term-fenced, only if unchanged since the audit, and judged against the
    /// eviction brake: a zone whose removals would be a storm is left alone, and says so).
    #[arg(long)]
    repair: bool,
    /// With --repair: carry the repairs out.
    #[arg(long, requires = "repair")]
    yes: bool,
}

/// `--since`: etcdctl's durations, and hours.
fn parse_since(s: &str) -> Result<std::time::Duration, String> {
    match s.trim().strip_suffix('h') {
        Some(h) => {
            let hours = h.parse::<f64>().map_err(|e| format!("bad duration {s:?}: {e}"))?;
            quorate_ctl::seconds(hours * 3600.0).map_err(|e| format!("bad duration {s:?}: {e}"))
        }
        None => quorate_ctl::parse_duration(s),
    }
}

#[derive(Args)]
struct DrillProxyArgs {
    #[arg(long)]
    listen: std::net::SocketAddr,
    #[arg(long)]
    to: std::net::SocketAddr,
    /// A file holding the delay in milliseconds for traffic into the member.
    #[arg(long)]
    control: PathBuf,
}

#[derive(Args)]
struct DrillArgs {
    /// What to drill: quorate, or etcd (Debian's etcd-server on PATH) for comparison.
    #[arg(long, default_value = "quorate", value_parser = ["quorate", "etcd"])]
    target: String,
    /// The CI drill: 3 members, every fault once, about 3 minutes.
    #[arg(long)]
    short: bool,
    /// Members [default: 5; 3 with --short].
    #[arg(long)]
    members: Option<usize>,
    /// Concurrent etcd-API clients, each pinned to one member.
    #[arg(long, default_value_t = 12)]
    clients: usize,
    /// Fixes the fault schedule and the clients' choices [default: from the clock, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// Length of the fault part of the run [default: 600; --short: one of each fault].
    #[arg(long)]
    duration_s: Option<u64>,
    /// Faults to use, comma-separated [default: all]: partition-leader, majority-minority,
    /// bridge, one-way-loss, delay-spike, pause, kill, clock-jump, slow-disk, membership,
    /// leader-transfer; and, only when named, quorum-loss (a majority with the leader killed
    /// for good, the survivors recovered with `ctl recover`, the dropped restarted on old data
    /// and checked fenced, then re-added). `all,quorum-loss`: every fault.
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Seconds each fault is held before it is healed.
    #[arg(long)]
    hold_s: Option<u64>,
    /// Seconds of quiet after each heal.
    #[arg(long)]
    quiet_s: Option<u64>,
    /// Where the report (report.md, report.json) and the members' data and logs go.
    #[arg(long, default_value = "drill-report")]
    out: PathBuf,
    /// Hosts: netns (a network namespace per member, nftables cuts; needs root) or proxy
    /// (members on loopback, every peer link through the drill's own proxies; no root).
    #[arg(long, default_value = "netns", value_parser = ["netns", "proxy"])]
    mode: String,
    /// Time budget for the linearizability search, in seconds.
    #[arg(long, default_value_t = 120)]
    check_budget_s: u64,
    /// PLANTED BUG, for proving the drill: members serve linearizable reads from local state.
    #[arg(long)]
    plant_stale_reads: bool,
    /// PLANTED BUG, for proving the drill: members do not move a lease's deadline when it is
    /// renewed, so kept-alive leases expire at their grant's deadline.
    #[arg(long)]
    plant_early_lease_expiry: bool,
}

#[derive(Args)]
struct BenchRegistryArgs {
    /// Members' --listen-http addresses, comma-separated.
    #[arg(long, default_value = "127.0.0.1:8500")]
    endpoints: String,
    #[arg(long, default_value_t = 10_000)]
    instances: usize,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds per discovery phase (consistent, then stale).
    #[arg(long, default_value_t = 10)]
    query_seconds: u64,
    /// Seconds of heartbeats from every instance (0: skip).
    #[arg(long, default_value_t = 30)]
    heartbeat_seconds: u64,
    #[arg(long, default_value_t = 5)]
    heartbeat_interval_s: u64,
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Build a fresh data directory for one member of a new cluster from a snapshot file
    /// (offline; run it once per member with the same file, --initial-cluster and token).
    Restore(RestoreArgs),
}

#[derive(Args)]
struct RestoreArgs {
    /// The snapshot file (from `etcdctl snapshot save`).
    file: PathBuf,
    /// The data directory to create; it must not exist or be empty [default: ./<name>.quorate].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value = "default")]
    name: String,
    /// This member's peer URL in the new cluster.
    #[arg(long, default_value = "http://127.0.0.1:2380")]
    initial_advertise_peer_urls: String,
    /// Every member of the new cluster, name=peer-url,... [default: <name>=<peer url>]
    #[arg(long)]
    initial_cluster: Option<String>,
    #[arg(long, default_value = "quorate-cluster")]
    initial_cluster_token: String,
}

#[derive(Args)]
struct BenchArgs {
    /// etcd API endpoints, comma-separated.
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// Operations: put, get (linearizable), get-s (serializable), txn, lease-put, keepalive
    /// (renewals over a pool of 2048 leases on one stream per client).
    #[arg(long, default_value = "put,get,get-s,txn,lease-put")]
    ops: String,
    /// Concurrent clients, comma-separated; each op runs once per count.
    #[arg(long, default_value = "1,64")]
    clients: String,
    /// Seconds per (op, clients) run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Size of the key space.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// gRPC connections shared by the clients.
    #[arg(long, default_value_t = 8)]
    conns: usize,
    /// Write every key once before measuring, so reads find values.
    #[arg(long)]
    preload: bool,
    /// Long readers, comma-separated; each (op, clients) pair runs once per reader, with one more
    /// client repeating that read on the first endpoint: none (idle), range (the whole keyspace),
    /// watch (from revision 1), snapshot (Maintenance.Snapshot), hashkv, burn (one core of pure
    /// computation, the control), flood (another client putting on 16 streams as fast as it is
    /// answered, from 127.0.0.2: its "long reads" are its requests refused, e.g. by
    /// --rate-limit-rps).
    #[arg(long, default_value = "none")]
    readers: String,
    /// Run the reader at nice 19, so that on one machine its own decoding competes little with
    /// the members (as a reader on another host would).
    #[arg(long)]
    readers_niced: bool,
    /// Requests a second each client sends, on a fixed schedule (a well-behaved client: its
    /// latency under someone else's load), instead of as fast as they are answered.
    #[arg(long)]
    pace: Option<f64>,
    /// Print JSON rows instead of a Markdown table.
    #[arg(long)]
    json: bool,
    /// For https:// endpoints: the CA their certificates chain to (etcdctl's flag).
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// This client's certificate, for members that require one (etcdctl's flag).
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// The key of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
}

impl BenchArgs {
    fn tls(&self) -> anyhow::Result<Option<std::sync::Arc<quorate_tls::Connector>>> {
        let tls =
            quorate_ctl::ClientTls::from_flags(self.cacert.as_deref(), self.cert.as_deref(), self.key.as_deref())?;
        Ok(tls.map(|t| t.grpc))
    }
}

#[derive(Args)]
struct ServerArgs {
    /// Human-readable name of this member.
    #[arg(long, default_value = "default")]
    name: String,
    /// Data directory [default: ./<name>.quorate].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// URLs to listen on for etcd gRPC clients, comma-separated.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    listen_client_urls: String,
    /// Client URLs to advertise to the rest of the cluster [default: --listen-client-urls].
    #[arg(long)]
    advertise_client_urls: Option<String>,
    /// URL to listen on for other members.
    #[arg(long, default_value = "http://127.0.0.1:2380")]
    listen_peer_urls: String,
    /// Peer URL to advertise to the rest of the cluster [default: --listen-peer-urls].
    #[arg(long)]
    initial_advertise_peer_urls: Option<String>,
    /// Address for HTTP: /health, /ready, /version, /metrics (and the registry APIs).
    #[arg(long, default_value = "127.0.0.1:8500")]
    listen_http: String,
    /// Extra URLs serving only /metrics and /health, comma-separated (etcd's flag).
    #[arg(long, default_value = "")]
    listen_metrics_urls: String,
    /// Initial cluster: name=peer-url,... [default: <name>=<advertised peer URL>].
    #[arg(long)]
    initial_cluster: Option<String>,
    /// `new` to bootstrap a cluster, `existing` to join one.
    #[arg(long, default_value = "new", value_parser = ["new", "existing"])]
    initial_cluster_state: String,
    /// Distinguishes clusters that share an --initial-cluster.
    #[arg(long, default_value = "quorate-cluster")]
    initial_cluster_token: String,
    /// Leader heartbeat interval, in milliseconds.
    #[arg(long, default_value_t = 100)]
    heartbeat_interval: u64,
    /// Election timeout, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    election_timeout: u64,
    /// Raise the NOSPACE alarm when the keyspace and its uncompacted history exceed this many
    /// bytes (0 = 2 GiB). Writes that add data are then refused until `etcdctl alarm disarm`.
    #[arg(long, default_value_t = 0)]
    quota_backend_bytes: u64,
    /// Applied entries between snapshots (the log before a snapshot is compacted). etcd 3.4's
    /// default: every snapshot copies and encodes the whole state on every member at once.
    #[arg(long, default_value_t = 100_000)]
    snapshot_count: u64,
    /// Threads that run the member's network, Raft and request tasks (0 = half the CPUs, at
    /// least one). The log writer and blocking work have threads of their own. Fewer threads
    /// hand a request between fewer cores; see docs/adr/0007-runtime-threads-and-write-path.md.
    #[arg(long, default_value_t = 0)]
    worker_threads: usize,
    /// Registry eviction brake: engage when more than this percentage of a zone's ephemeral
    /// instances would be evicted within --brake-window-s.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u8).range(1..=100))]
    brake_threshold_percent: u8,
    /// Registry eviction brake: the sliding window evictions are counted over, in seconds.
    #[arg(long, default_value_t = 60)]
    brake_window_s: u64,
    /// Registry eviction brake: the longest it holds, in seconds.
    #[arg(long, default_value_t = 300)]
    brake_max_hold_s: u64,
    /// Most operations in one Txn, as etcd's --max-txn-ops: at most this many compares, success
    /// ops and failure ops each; a nested Txn gets what its parent's largest list left.
    /// Larger Txns get etcd's "too many operations in txn request".
    #[arg(long, default_value_t = 128)]
    max_txn_ops: usize,
    /// Watchers one Watch stream may hold at once; a create past it is cancelled with the reason
    /// (etcd has no such limit; 10,000 is far above what its clients open on one stream).
    #[arg(long, default_value_t = 10_000)]
    max_watchers_per_stream: usize,
    /// Seconds a token from Authenticate (etcdctl --user) is good for, as etcd's
    /// --auth-token-ttl. Tokens are signed with a key replicated with the users, so any member
    /// accepts them; changing a user's password or deleting the user voids its tokens.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400 * 365))]
    auth_token_ttl: u64,
    /// A file of `<token> <user>` lines: tokens for agents that cannot log in (Consul's
    /// X-Consul-Token, ?token=, or a bearer token on the HTTP port), each bound to a user of the
    /// auth store, whose roles decide what it may do. Re-read when it changes. Tokens shorter
    /// than 16 characters are refused at start.
    #[arg(long)]
    auth_static_tokens_file: Option<std::path::PathBuf>,
    /// Tokens from Authenticate: `simple` (signed with a key replicated with the users; every
    /// member accepts them), or etcd's `jwt,pub-key=PATH,priv-key=PATH,sign-method=ES256|RS256
    /// [,ttl=5m]` (JSON Web Tokens any member verifies with the public key; a member without
    /// priv-key verifies and does not issue). Keys in PEM; the private key PKCS#8 (RSA: or PKCS#1).
    #[arg(long, default_value = "simple")]
    auth_token: String,
    /// Largest write request proposed, in bytes, as etcd's --max-request-bytes (default 1.5
    /// MiB). Larger requests get etcd's "request is too large"; gRPC refuses messages more than
    /// 512 KiB above it.
    #[arg(long, default_value_t = 1_572_864)]
    max_request_bytes: usize,
    /// Connections one client (an IPv4 address, or an IPv6 /64) may hold open at once on the
    /// client port, and apart on the HTTP port; one past it is closed as soon as it is accepted.
    /// 0 (the default): no limit. Clients behind one NAT or proxy count as one.
    #[arg(long, default_value_t = 0)]
    max_connections_per_client: usize,
    /// HTTP/2 streams (concurrent calls, watches and keep-alives) one client connection may
    /// have open, as etcd's flag; clients queue past it. 0 (the default): no limit, as etcd.
    #[arg(long, default_value_t = 0)]
    max_concurrent_streams: u32,
    /// Send health-check probes from this local address (multi-homed hosts).
    #[arg(long)]
    probe_source_ip: Option<std::net::IpAddr>,
    /// Active health checks (HTTP and TCP) may probe only addresses in these CIDR blocks,
    /// comma-separated (10.0.0.0/8,fd00::/8), checked on the address a check's host resolves to
    /// at each probe; a check outside them is critical and never connected. Default: any
    /// address, as Consul.
    #[arg(long, value_delimiter = ',')]
    check_allowed_cidrs: Vec<quorate_server::cidr::Cidr>,
    /// Requests per second each client (the authenticated user with auth on, else the source
    /// address) may send, on the gRPC client port and on the HTTP APIs alike (each counts its
    /// own; --rate-limit-http-rps sets the HTTP APIs apart); over it, gRPC RESOURCE_EXHAUSTED
    /// "etcdserver: too many requests" and HTTP 429 with Retry-After. 0: no limit.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    rate_limit_rps: f64,
    /// Requests a client may send at once above its rate (0: twice the rate).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    rate_limit_burst: f64,
    /// The same for liveness traffic, counted apart so that a write storm cannot starve it:
    /// lease keep-alive streams opened, registry heartbeats, Consul check updates and session
    /// renewals, Eureka renewals. 0: no limit.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    rate_limit_liveness_rps: f64,
    /// Liveness requests a client may send at once above its rate (0: twice the rate).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    rate_limit_liveness_burst: f64,
    /// The request rate for the HTTP APIs (registry, Consul, Eureka) when it should differ from
    /// the gRPC port's --rate-limit-rps (unset: the same). Liveness limits are shared.
    #[arg(long, value_parser = non_negative)]
    rate_limit_http_rps: Option<f64>,
    /// The HTTP APIs' burst when --rate-limit-http-rps is given (0: twice that rate).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative, requires = "rate_limit_http_rps")]
    rate_limit_http_burst: f64,
    /// Serve CPU profiles, as etcd's flag: GET /debug/pprof/profile?seconds=N (1 to 60,
    /// default 30) on the client URLs and --listen-http answers with a gzipped pprof protobuf
    /// (`go tool pprof -top http://HOST:2379/debug/pprof/profile?seconds=10`); add
    /// &format=svg, or GET /debug/pprof/flamegraph?seconds=N, for a flamegraph SVG. One profile
    /// at a time (409 while one runs); 404 when off. Sampling (SIGPROF, 100 Hz) runs only while
    /// a profile is taken.
    #[arg(long)]
    enable_pprof: bool,
    /// Client TLS (etcd's flag): the certificate served on the https:// entries of
    /// --listen-client-urls (PEM; re-read when the file changes).
    #[arg(long)]
    cert_file: Option<PathBuf>,
    /// The key of --cert-file (PEM).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// The CA that client certificates must chain to (PEM).
    #[arg(long)]
    trusted_ca_file: Option<PathBuf>,
    /// Require every client on the https:// client URLs to present a certificate signed by
    /// --trusted-ca-file (etcd's flag).
    #[arg(long)]
    client_cert_auth: bool,
    /// Peer TLS (etcd's flag): this member's certificate, served on its https:// peer URL and
    /// offered when it dials other members. Every peer URL must then be https://.
    #[arg(long)]
    peer_cert_file: Option<PathBuf>,
    /// The key of --peer-cert-file (PEM).
    #[arg(long)]
    peer_key_file: Option<PathBuf>,
    /// The CA that other members' certificates must chain to (PEM); required with peer TLS.
    #[arg(long)]
    peer_trusted_ca_file: Option<PathBuf>,
    /// Refuse a peer connection without a certificate signed by --peer-trusted-ca-file, before
    /// any Raft message is read, and believe a message only when the certificate names the
    /// member it says it is from (its CN is the member's name, or a SAN its peer URL's host).
    #[arg(long)]
    peer_client_cert_auth: bool,
    /// A peer certificate's common name must be exactly this (etcd's flag).
    #[arg(long)]
    peer_cert_allowed_cn: Option<String>,
    /// TLS for an https:// --listen-http: its certificate [default: --cert-file].
    #[arg(long)]
    http_cert_file: Option<PathBuf>,
    /// The key of --http-cert-file [default: --key-file].
    #[arg(long)]
    http_key_file: Option<PathBuf>,
    /// The CA HTTP client certificates must chain to [default: --trusted-ca-file].
    #[arg(long)]
    http_trusted_ca_file: Option<PathBuf>,
    /// Require HTTP clients to present a certificate [default: --client-cert-auth].
    #[arg(long)]
    http_client_cert_auth: Option<bool>,
    /// Lowest level logged: error, warn, info or debug [default: info]. When given, it wins
    /// over a QUORATE_LOG filter (tracing's syntax, e.g. info,quorate_consensus=debug), which
    /// wins over the default. openraft's own lines are one level quieter at info and debug.
    #[arg(long, value_enum)]
    log_level: Option<logging::LogLevel>,
    /// Log format: text (one line per event) or json (one object per line). Every line about
    /// consensus (openraft's and quorate_consensus's) carries the member's name and id, its
    /// term, commit index and applied index.
    #[arg(long, value_enum, default_value = "text")]
    log_format: logging::LogFormat,
    /// DRILL ONLY, UNSAFE: serve linearizable reads from local state (a planted bug the drill
    /// must catch). Never use it for anything else.
    #[arg(long, hide = true)]
    drill_unsafe_local_reads: bool,
    /// DRILL ONLY: accept failpoints over HTTP (`PUT /debug/failpoints/fsync-delay-ms`).
    #[arg(long, hide = true)]
    drill_failpoints: bool,
    /// DRILL ONLY, UNSAFE: lease renewals do not move deadlines, so leases expire before what
    /// clients were told (a planted bug the drill must catch). Never use it for anything else.
    #[arg(long, hide = true)]
    drill_early_lease_expiry: bool,
    /// DRILL/TEST ONLY: send Raft snapshots to other members in chunks of this many bytes
    /// (0: the default, 1 MiB), so a small state crosses as many chunks.
    #[arg(long, hide = true, default_value_t = 0)]
    drill_snapshot_chunk_bytes: usize,
}

/// The server's runtime threads: `requested`, or half of `cpus` (at least one) when it is 0. A
/// request crosses the Raft core, the peer streams and the state machine as a chain of task
/// wake-ups; each one that lands on another thread costs a futex wake and often
/// a sleeping core's wake-up, which measured as the largest part of a small write's latency
/// (ADR 0007). The other half of the CPUs is left to the log writer's fsyncs, the kernel's
/// network stack and, where members share a host, to the other members.
fn server_worker_threads(requested: usize, cpus: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        (cpus / 2).max(1)
    }
}

/// A finite number, 0 or more (rates and bursts).
fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a finite number of 0 or more")),
    }
}

fn first_url(list: &str) -> String {
    list.split(',').next().unwrap_or_default().trim().to_string()
}

impl ServerArgs {
    fn into_config(self) -> anyhow::Result<ServerConfig> {
        let tls = self.tls_config()?;
        let listen_client_addrs = self
            .listen_client_urls
            .split(',')
            .map(|u| quorate_server::url_to_addr(u.trim()).context("--listen-client-urls"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let advertise_client_urls: Vec<String> = self
            .advertise_client_urls
            .unwrap_or_else(|| self.listen_client_urls.clone())
            .split(',')
            .map(|s| s.trim().to_string())
            .collect();
        let listen_peer_addr =
            quorate_server::url_to_addr(&first_url(&self.listen_peer_urls)).context("--listen-peer-urls")?;
        let advertise_peer_url =
            first_url(&self.initial_advertise_peer_urls.unwrap_or_else(|| self.listen_peer_urls.clone()));
        let initial = self.initial_cluster.unwrap_or_else(|| format!("{}={}", self.name, advertise_peer_url));
        let listen_http_addr = quorate_server::url_to_addr(&self.listen_http).context("--listen-http")?;
        let listen_metrics_addrs = self
            .listen_metrics_urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| quorate_server::url_to_addr(u).context("--listen-metrics-urls"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(ServerConfig {
            data_dir: self.data_dir.unwrap_or_else(|| PathBuf::from(format!("{}.quorate", self.name))),
            name: self.name,
            listen_client_addrs,
            advertise_client_urls,
            listen_peer_addr,
            advertise_peer_url,
            listen_http_addr,
            listen_metrics_addrs,
            initial_cluster: parse_initial_cluster(&initial)?,
            initial_cluster_state: if self.initial_cluster_state == "new" {
                ClusterState::New
            } else {
                ClusterState::Existing
            },
            initial_cluster_token: self.initial_cluster_token,
            heartbeat_interval_ms: self.heartbeat_interval,
            election_timeout_ms: self.election_timeout,
            quota_backend_bytes: if self.quota_backend_bytes == 0 { 2 << 30 } else { self.quota_backend_bytes },
            snapshot_count: self.snapshot_count,
            brake: quorate_registry::BrakeConfig {
                threshold: f64::from(self.brake_threshold_percent) / 100.0,
                window: std::time::Duration::from_secs(self.brake_window_s),
                max_hold: std::time::Duration::from_secs(self.brake_max_hold_s),
                ..Default::default()
            },
            max_txn_ops: self.max_txn_ops,
            max_watchers_per_stream: self.max_watchers_per_stream,
            auth_token_ttl: std::time::Duration::from_secs(self.auth_token_ttl),
            auth_static_tokens_file: self.auth_static_tokens_file.clone(),
            auth_token: self.auth_token.clone(),
            max_request_bytes: self.max_request_bytes,
            max_connections_per_client: self.max_connections_per_client,
            max_concurrent_streams: (self.max_concurrent_streams > 0).then_some(self.max_concurrent_streams),
            probe_source_ip: self.probe_source_ip,
            check_allowed_cidrs: self.check_allowed_cidrs,
            rate_limit: quorate_server::RateLimitConfig {
                rps: self.rate_limit_rps,
                burst: self.rate_limit_burst,
                liveness_rps: self.rate_limit_liveness_rps,
                liveness_burst: self.rate_limit_liveness_burst,
                http: self.rate_limit_http_rps.map(|rps| (rps, self.rate_limit_http_burst)),
            },
            enable_pprof: self.enable_pprof,
            tls,
            drill: quorate_server::DrillFlags {
                unsafe_local_reads: self.drill_unsafe_local_reads,
                failpoints: self.drill_failpoints,
                early_lease_expiry: self.drill_early_lease_expiry,
                snapshot_chunk_bytes: self.drill_snapshot_chunk_bytes,
            },
        })
    }
}

fn is_https(url: &str) -> bool {
    url.trim().get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

impl ServerArgs {
    /// TLS from etcd's flags, checked against the URLs: an https:// URL is served with a
    /// certificate or refused at start, never served as plaintext; a certificate no https://
    /// URL uses is a mistake said out loud.
    fn tls_config(&self) -> anyhow::Result<quorate_server::TlsConfig> {
        use anyhow::bail;
        use quorate_tls::{Files, ServerSettings};
        let h2_and_http1 = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        if self.listen_metrics_urls.split(',').any(is_https) {
            bail!("--listen-metrics-urls: https:// is not served; /metrics and /health are served over TLS on the client URLs");
        }

        // Client URLs.
        let client_https: Vec<bool> = self.listen_client_urls.split(',').map(is_https).collect();
        let advertised_https = self.advertise_client_urls.as_deref().unwrap_or("").split(',').any(is_https);
        let client = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                if !client_https.contains(&true) {
                    bail!("--cert-file is given but no --listen-client-urls entry is https://");
                }
                if self.client_cert_auth && self.trusted_ca_file.is_none() {
                    bail!("--client-cert-auth needs --trusted-ca-file (the CA client certificates must chain to)");
                }
                Some(ServerSettings {
                    files: Files {
                        cert: cert.clone(),
                        key: key.clone(),
                        ca: self.trusted_ca_file.clone(),
                        flags: ["--cert-file", "--key-file", "--trusted-ca-file"],
                    },
                    client_cert_auth: self.client_cert_auth,
                    allowed_cn: None,
                    alpn: h2_and_http1.clone(),
                    name: "client",
                })
            }
            (None, None) if client_https.contains(&true) || advertised_https => {
                let listed = [
                    ("--listen-client-urls", Some(&self.listen_client_urls)),
                    ("--advertise-client-urls", self.advertise_client_urls.as_ref()),
                ];
                let (flag, url) = listed
                    .iter()
                    .filter_map(|(f, l)| l.and_then(|l| l.split(',').find(|u| is_https(u))).map(|u| (f, u.trim())))
                    .next()
                    .unwrap_or((&"--listen-client-urls", ""));
                bail!("{flag} {url}: an https:// URL needs --cert-file and --key-file (quorate never serves it as plaintext)")
            }
            (None, None) if self.client_cert_auth || self.trusted_ca_file.is_some() => {
                bail!(
                    "--client-cert-auth and --trusted-ca-file need --cert-file, --key-file and an https:// client URL"
                )
            }
            (None, None) => None,
            _ => bail!("--cert-file and --key-file go together"),
        };
        // Said at start, as etcd does not: a client certificate is then asked only on the
        // https:// entries, and the HTTP APIs ask for none unless their port is https:// too.
        if self.client_cert_auth && client_https.contains(&false) {
            tracing::warn!(
                "--client-cert-auth: the http:// entries of --listen-client-urls serve every client without a certificate"
            );
        }
        if self.client_cert_auth && !is_https(&self.listen_http) {
            tracing::warn!(
                listen_http = %self.listen_http,
                "--client-cert-auth: --listen-http is plaintext and serves the registry, Consul, Eureka and /v1/member/* \
                 without a certificate (make it https://, or keep it on loopback)"
            );
        }
        if advertised_https && !client_https.contains(&true) {
            bail!("--advertise-client-urls has an https:// URL but no --listen-client-urls entry is https://");
        }

        // The HTTP port: its own flags, or the client's.
        let http = if is_https(&self.listen_http) {
            let cert = self.http_cert_file.clone().or_else(|| self.cert_file.clone());
            let key = self.http_key_file.clone().or_else(|| self.key_file.clone());
            let (Some(cert), Some(key)) = (cert, key) else {
                bail!(
                    "--listen-http {} needs --http-cert-file and --http-key-file (or --cert-file and --key-file)",
                    self.listen_http
                )
            };
            let ca = self.http_trusted_ca_file.clone().or_else(|| self.trusted_ca_file.clone());
            let client_cert_auth = self.http_client_cert_auth.unwrap_or(self.client_cert_auth);
            if client_cert_auth && ca.is_none() {
                bail!("HTTP client certificates are required but no CA is given (--http-trusted-ca-file)");
            }
            Some(ServerSettings {
                files: Files {
                    cert,
                    key,
                    ca,
                    flags: ["--http-cert-file", "--http-key-file", "--http-trusted-ca-file"],
                },
                client_cert_auth,
                allowed_cn: None,
                alpn: h2_and_http1,
                name: "http",
            })
        } else {
            if self.http_cert_file.is_some() || self.http_key_file.is_some() || self.http_trusted_ca_file.is_some() {
                bail!("--http-cert-file, --http-key-file and --http-trusted-ca-file need an https:// --listen-http");
            }
            None
        };

        // Peer URLs: all https:// (with the peer flags) or none.
        let mut peer_urls: Vec<(&str, &str)> =
            self.listen_peer_urls.split(',').map(|u| ("--listen-peer-urls", u)).collect();
        if let Some(a) = &self.initial_advertise_peer_urls {
            peer_urls.extend(a.split(',').map(|u| ("--initial-advertise-peer-urls", u)));
        }
        if let Some(c) = &self.initial_cluster {
            peer_urls.extend(c.split(',').filter_map(|e| e.split_once('=')).map(|(_, u)| ("--initial-cluster", u)));
        }
        let peer_https = is_https(&first_url(&self.listen_peer_urls));
        if let Some((flag, url)) = peer_urls.iter().find(|(_, u)| is_https(u) != peer_https) {
            bail!(
                "{flag} {}: peer URLs are all https:// (peer TLS) or all http://, and --listen-peer-urls is {}",
                url.trim(),
                first_url(&self.listen_peer_urls)
            );
        }
        let peer = match (&self.peer_cert_file, &self.peer_key_file, &self.peer_trusted_ca_file) {
            (Some(cert), Some(key), Some(ca)) if peer_https => {
                let files = Files {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: Some(ca.clone()),
                    flags: ["--peer-cert-file", "--peer-key-file", "--peer-trusted-ca-file"],
                };
                Some(quorate_server::PeerTls {
                    server: ServerSettings {
                        files: files.clone(),
                        client_cert_auth: self.peer_client_cert_auth,
                        allowed_cn: self.peer_cert_allowed_cn.clone(),
                        alpn: vec![b"h2".to_vec()],
                        name: "peer",
                    },
                    client: files,
                })
            }
            (None, None, None) if peer_https => {
                bail!("https:// peer URLs need --peer-cert-file, --peer-key-file and --peer-trusted-ca-file")
            }
            (None, None, None) if self.peer_client_cert_auth || self.peer_cert_allowed_cn.is_some() => {
                bail!("--peer-client-cert-auth and --peer-cert-allowed-cn need peer TLS (https:// peer URLs and --peer-cert-file)")
            }
            (None, None, None) => None,
            _ if !peer_https => bail!("--peer-cert-file and its key and CA need https:// peer URLs"),
            _ => bail!("peer TLS needs all three of --peer-cert-file, --peer-key-file and --peer-trusted-ca-file"),
        };
        if self.peer_cert_allowed_cn.is_some() && !self.peer_client_cert_auth {
            bail!("--peer-cert-allowed-cn needs --peer-client-cert-auth (without it, peers need offer no certificate)");
        }
        Ok(quorate_server::TlsConfig { client, client_https, http, peer })
    }
}

async fn shutdown_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (the `libmimalloc-sys` bindings do not
/// name it; `a_purge_delay_is_what_is_set` checks the index by its default).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Give freed pages back to the system when they are freed, not a second later. mimalloc runs a
/// delayed purge only when the thread that freed allocates again, so a thread that goes idle
/// after freeing a lot (the leader's after a snapshot, a load that stops) kept it resident for
/// good: one member of three held 214 MB instead of 103 after 100k puts (ADR 0013). The
/// same-run benchmark put every row within 0.93–1.05x of the delayed purge. `MIMALLOC_PURGE_DELAY`
/// in the environment still decides, when set.
fn purge_freed_pages_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's process-wide options, which it reads atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
    }
}

fn main() {
    purge_freed_pages_at_once();
    if let Err(e) = run() {
        // One line with the cause chain; no backtrace (RUST_BACKTRACE is for bugs, not for bad flags).
        eprintln!("quorate: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Server(args) => logging::init(args.log_level, args.log_format),
        _ => logging::init(None, logging::LogFormat::Text),
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Command::Server(args) = &cli.command {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = server_worker_threads(args.worker_threads, cpus);
        tracing::info!(worker_threads = threads, "runtime");
        builder.worker_threads(threads);
    }
    let rt = builder.enable_all().build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Bench(args) => {
                let cfg = quorate_bench::BenchConfig {
                    endpoints: args.endpoints.split(',').map(|s| s.trim().to_string()).collect(),
                    ops: args.ops.split(',').map(|s| s.trim().parse()).collect::<anyhow::Result<_>>()?,
                    clients: args
                        .clients
                        .split(',')
                        .map(|s| s.trim().parse().context("--clients"))
                        .collect::<anyhow::Result<_>>()?,
                    duration: std::time::Duration::from_secs(args.seconds),
                    keys: args.keys,
                    value_bytes: args.value_bytes,
                    conns: args.conns,
                    readers: args.readers.split(',').map(|s| s.trim().parse()).collect::<anyhow::Result<_>>()?,
                    reader_niced: args.readers_niced,
                    key_prefix: quorate_bench::KEY_PREFIX.to_string(),
                    tls: args.tls()?,
                    pace: args.pace,
                };
                if args.preload {
                    quorate_bench::preload(&cfg).await?;
                }
                let rows = quorate_bench::run(&cfg).await?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    print!("{}", quorate_bench::table(&rows));
                }
                Ok(())
            }
            Command::Drill(args) => drill(args).await,
            Command::DrillProxy(a) => quorate_drill::proxy::serve(a.listen, a.to, a.control).await,
            Command::BenchRegistry(args) => {
                let cfg = quorate_bench::registry::RegistryBenchConfig {
                    endpoints: args.endpoints.split(',').map(|s| s.trim().to_string()).collect(),
                    instances: args.instances,
                    concurrency: args.concurrency,
                    query_seconds: args.query_seconds,
                    heartbeat_seconds: args.heartbeat_seconds,
                    heartbeat_interval_s: args.heartbeat_interval_s,
                };
                let report = quorate_bench::registry::run(&cfg).await?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                Ok(())
            }
            Command::Snapshot(SnapshotCommand::Restore(args)) => {
                let peer_url = first_url(&args.initial_advertise_peer_urls);
                let initial = args.initial_cluster.unwrap_or_else(|| format!("{}={}", args.name, peer_url));
                let data_dir = args.data_dir.unwrap_or_else(|| PathBuf::from(format!("{}.quorate", args.name)));
                let r = quorate_server::restore_snapshot(
                    &args.file,
                    &data_dir,
                    &args.name,
                    &peer_url,
                    &parse_initial_cluster(&initial)?,
                    &args.initial_cluster_token,
                )?;
                println!(
                    "restored {} at revision {} into {} (member {:x} of new cluster {:x})",
                    args.file.display(),
                    r.revision,
                    data_dir.display(),
                    r.member_id,
                    r.cluster_id
                );
                Ok(())
            }
            Command::Ctl(args) => {
                let mut opts = quorate_ctl::Options {
                    endpoints: args.endpoints.iter().map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect(),
                    json: args.write_out == "json",
                    dial_timeout: args.dial_timeout,
                    command_timeout: args.command_timeout,
                    tls: quorate_ctl::ClientTls::from_flags(
                        args.cacert.as_deref(),
                        args.cert.as_deref(),
                        args.key.as_deref(),
                    )?,
                    token: None,
                };
                if let Some(user) = &args.user {
                    let (name, password) = match user.split_once(':') {
                        Some((n, p)) => (n.to_string(), p.to_string()),
                        None => (
                            user.clone(),
                            std::env::var("QUORATE_PASSWORD").map_err(|_| {
                                anyhow::anyhow!(
                                    "--user {user}: give name:password, or the password in QUORATE_PASSWORD"
                                )
                            })?,
                        ),
                    };
                    opts.token = quorate_ctl::login(&opts, &name, &password).await?;
                }
                let code = match args.command {
                    CtlCommand::Status => quorate_ctl::status(&opts).await?,
                    CtlCommand::Isolate { member, reason } => {
                        quorate_ctl::isolate::isolate(&opts, &member, &reason).await
                    }
                    CtlCommand::Unisolate { member } => quorate_ctl::isolate::unisolate(&opts, &member).await,
                    CtlCommand::Recover { data_dir, apply } => {
                        let r = quorate_ctl::recover::RecoverOptions { data_dirs: data_dir, apply };
                        quorate_ctl::recover(&opts, &r).await?
                    }
                    CtlCommand::Doctor => quorate_ctl::doctor(&opts).await?,
                    CtlCommand::Timeline { since, member } => {
                        let t = quorate_ctl::timeline::TimelineOptions { since, member };
                        quorate_ctl::timeline(&opts, &t).await?
                    }
                    CtlCommand::Audit(a) => {
                        let (repair, yes) = (a.repair, a.yes);
                        let a = quorate_ctl::audit::AuditOptions {
                            namespace: a.namespace,
                            service: a.service,
                            health_path: a.health_path,
                            probes: a.probes,
                            probe_interval: a.probe_interval,
                            probe_timeout: a.probe_timeout,
                            concurrency: a.concurrency as usize,
                        };
                        quorate_ctl::audit(&opts, &a, repair, yes).await?
                    }
                    CtlCommand::Verify { probe_duration, load_duration, load_clients } => {
                        let v = quorate_ctl::verify::VerifyOptions {
                            probe_duration,
                            load_duration,
                            load_clients: load_clients as usize,
                        };
                        quorate_ctl::verify(&opts, &v).await?
                    }
                };
                std::process::exit(code);
            }
            Command::Server(args) => {
                let cfg = args.into_config()?;
                let listeners = Listeners::bind(&cfg).await?;
                quorate_server::run(cfg, listeners, shutdown_signal()).await
            }
        }
    })
}

async fn drill(args: DrillArgs) -> anyhow::Result<()> {
    use quorate_drill::{FaultKind, Target};
    let target = if args.target == "etcd" { Target::Etcd } else { Target::Quorate };
    let faults: Vec<FaultKind> = if args.faults.is_empty() {
        quorate_drill::faults::ALL.to_vec()
    } else {
        // `all` stands for the default set (to add an opt-in fault to it: `all,quorum-loss`).
        let mut out = Vec::new();
        for f in &args.faults {
            match f.as_str() {
                "all" => out.extend(quorate_drill::faults::ALL),
                f => out.push(FaultKind::parse(f)?),
            }
        }
        out
    };
    let members = args.members.unwrap_or(if args.short { 3 } else { 5 });
    let hold = args.hold_s.unwrap_or(if args.short { 6 } else { 8 });
    let quiet = args.quiet_s.unwrap_or(if args.short { 4 } else { 5 });
    let count = match args.duration_s {
        Some(d) => (d / (hold + quiet).max(1)) as usize,
        None if args.short => faults.len(),
        None => (600 / (hold + quiet).max(1)) as usize,
    }
    .max(faults.len());
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(1)
    });
    let names: Vec<&str> = faults.iter().map(|f| f.name()).collect();
    let mut replay = format!(
        "quorate drill --target {} --members {members} --clients {} --seed {seed} --faults {} --duration-s {} --hold-s {hold} --quiet-s {quiet} --out {}",
        args.target,
        args.clients,
        names.join(","),
        count as u64 * (hold + quiet),
        args.out.display()
    );
    if args.plant_stale_reads {
        replay.push_str(" --plant-stale-reads");
    }
    if args.plant_early_lease_expiry {
        replay.push_str(" --plant-early-lease-expiry");
    }
    if args.mode == "proxy" {
        replay.push_str(" --mode proxy");
    }
    eprintln!("drill: seed {seed}; replay with: {replay}");
    // The checkout the binary was built in (target/<profile>/quorate), else the version.
    let exe_dir = std::env::current_exe()?.parent().map(PathBuf::from).unwrap_or_default();
    let git_revision = std::process::Command::new("git")
        .arg("-C")
        .arg(&exe_dir)
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string());
    let cfg = quorate_drill::DrillConfig {
        target,
        members,
        clients: args.clients,
        seed,
        faults,
        count,
        hold: std::time::Duration::from_secs(hold),
        quiet: std::time::Duration::from_secs(quiet),
        out: args.out.clone(),
        bin: std::env::current_exe()?,
        unsafe_local_reads: args.plant_stale_reads,
        early_lease_expiry: args.plant_early_lease_expiry,
        proxy_mode: args.mode == "proxy",
        check_budget: std::time::Duration::from_secs(args.check_budget_s),
        git_revision,
        replay,
    };
    let result = tokio::select! {
        r = quorate_drill::run(cfg) => Some(r),
        _ = tokio::signal::ctrl_c() => None,
    };
    // Dropping the run (also on Ctrl-C) has killed the members and removed the namespaces.
    match result {
        None => {
            eprintln!("drill: interrupted; members stopped and namespaces removed");
            std::process::exit(130);
        }
        Some(Err(e)) => {
            eprintln!("quorate drill: {e:#}");
            std::process::exit(2);
        }
        Some(Ok(report)) => {
            println!("{}", report.markdown());
            eprintln!("drill: report in {}/report.md and report.json", args.out.display());
            if !report.passed() {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::server_worker_threads;

    #[test]
    fn a_purge_delay_is_what_is_set() {
        // mimalloc 3's default purge delay is 1000 ms (or what the environment set), and no
        // neighbouring option defaults to it.
        let want = std::env::var("MIMALLOC_PURGE_DELAY").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
        // SAFETY: reads mimalloc's options.
        let get = |o| unsafe { libmimalloc_sys::mi_option_get(o) };
        assert_eq!(get(super::MI_OPTION_PURGE_DELAY), want);
        assert_ne!(get(super::MI_OPTION_PURGE_DELAY - 1), want);
        assert_ne!(get(super::MI_OPTION_PURGE_DELAY + 1), want);
    }

    #[test]
    fn worker_threads_are_what_was_asked_or_half_the_cpus() {
        // (requested, cpus) -> threads
        let table = [((0, 1), 1), ((0, 2), 1), ((0, 3), 1), ((0, 8), 4), ((3, 2), 3), ((1, 64), 1)];
        for ((requested, cpus), want) in table {
            assert_eq!(server_worker_threads(requested, cpus), want, "requested {requested}, {cpus} CPUs");
        }
    }
}
