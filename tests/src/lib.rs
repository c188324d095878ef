//! Black-box test harness: real `quorate server` processes (and real `etcd` for comparison),
//! driven by real clients. Nothing here mocks a member.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The `quorate` binary built next to the test executable (`cargo build -p quorate` first).
pub fn quorate_bin() -> PathBuf {
    if let Ok(p) = std::env::var("QUORATE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/quorate
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    profile_dir.join("quorate")
}

/// A free loopback port. The port is released before use, so a start can still race with
/// another process; `Cluster::start` retries on that.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Quorate,
    Etcd,
}

pub struct Node {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub http_port: u16,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// For a member added at run time: the `--initial-cluster` it joins with (state `existing`).
    pub join: Option<String>,
    /// Extra environment for this member's process (e.g. libfaketime), applied at each spawn.
    pub env: Vec<(String, String)>,
    /// `https` when the cluster's peers speak TLS (`Cluster::use_peer_tls`).
    pub peer_scheme: &'static str,
    child: Option<Child>,
}

impl Node {
    /// A member slot named `name` with free loopback ports and its files under `dir`.
    fn new(dir: &Path, name: String) -> Node {
        Node {
            data_dir: dir.join(format!("{name}.data")),
            log_path: dir.join(format!("{name}.log")),
            name,
            client_port: free_port(),
            peer_port: free_port(),
            http_port: free_port(),
            join: None,
            env: Vec::new(),
            peer_scheme: "http",
            child: None,
        }
    }

    /// A handle on just a member's HTTP port, to use from another thread.
    pub fn detached(http_port: u16) -> Node {
        Node {
            name: String::new(),
            client_port: 0,
            peer_port: 0,
            http_port,
            data_dir: PathBuf::new(),
            log_path: PathBuf::new(),
            join: None,
            env: Vec::new(),
            peer_scheme: "http",
            child: None,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
    pub fn peer_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.peer_scheme, self.peer_port)
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// A child process killed (and reaped) when this is dropped.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Cluster {
    pub flavor: Flavor,
    pub nodes: Vec<Node>,
    pub initial_cluster: String,
    pub extra_args: Vec<String>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Start `n` members on loopback and wait until a write succeeds.
    pub fn start(flavor: Flavor, n: usize) -> anyhow::Result<Cluster> {
        Self::start_with(flavor, n, &[])
    }

    pub fn start_with(flavor: Flavor, n: usize, extra_args: &[&str]) -> anyhow::Result<Cluster> {
        let mut last_err = None;
        for _attempt in 0..3 {
            match Self::try_start(flavor, n, extra_args) {
                Ok(c) => return Ok(c),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap())
    }

    fn try_start(flavor: Flavor, n: usize, extra_args: &[&str]) -> anyhow::Result<Cluster> {
        let mut c = Self::unstarted(flavor, n)?;
        c.extra_args = extra_args.iter().map(|s| s.to_string()).collect();
        c.start_all()?;
        Ok(c)
    }

    /// A cluster's members laid out (ports, data directories) but not started, so a test can
    /// prepare their data directories first (`snapshot restore`). Start with `start_all`.
    pub fn unstarted(flavor: Flavor, n: usize) -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        if std::env::var_os("QUORATE_KEEP_LOGS").is_some() {
            eprintln!("cluster files in {}", dir.path().display());
        }
        let nodes: Vec<Node> = (1..=n).map(|i| Node::new(dir.path(), format!("m{i}"))).collect();
        let initial_cluster =
            nodes.iter().map(|n| format!("{}={}", n.name, n.peer_url())).collect::<Vec<_>>().join(",");
        Ok(Cluster { flavor, nodes, initial_cluster, extra_args: Vec::new(), dir })
    }

    /// Every member's peer URL `https://` (members added later too); the test gives the
    /// certificates in `extra_args`.
    pub fn use_peer_tls(&mut self) {
        for n in &mut self.nodes {
            n.peer_scheme = "https";
        }
        self.initial_cluster =
            self.nodes.iter().map(|n| format!("{}={}", n.name, n.peer_url())).collect::<Vec<_>>().join(",");
    }

    /// The directory this cluster's files live in (removed with the cluster).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Start every member and wait until the cluster serves writes.
    pub fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.spawn(i)?;
        }
        self.wait_ready(Duration::from_secs(20))
    }

    /// (Re)start member `i` with its existing data directory.
    pub fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log_path)?;
        let mut cmd = match self.flavor {
            Flavor::Quorate => {
                let mut c = Command::new(quorate_bin());
                c.arg("server").args(["--listen-http", &format!("127.0.0.1:{}", node.http_port)]);
                c
            }
            Flavor::Etcd => Command::new("etcd"),
        };
        cmd.args(["--name", &node.name])
            .args(["--data-dir", node.data_dir.to_str().unwrap()])
            .args(["--listen-client-urls", &node.client_url()])
            .args(["--advertise-client-urls", &node.client_url()])
            .args(["--listen-peer-urls", &node.peer_url()])
            .args(["--initial-advertise-peer-urls", &node.peer_url()])
            .args(["--initial-cluster", node.join.as_deref().unwrap_or(&self.initial_cluster)])
            // `{n}` in an extra argument is this member's number (1-based).
            .args(self.extra_args.iter().map(|a| a.replace("{n}", &(i + 1).to_string())))
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if self.flavor == Flavor::Etcd {
            cmd.args(["--initial-cluster-token", &format!("t-{}", self.nodes[0].peer_port)]);
            cmd.env("ETCD_UNSUPPORTED_ARCH", "");
        }
        if node.join.is_some() {
            cmd.args(["--initial-cluster-state", "existing"]);
        }
        let child = cmd.spawn().with_context(|| format!("spawn {:?}", self.flavor))?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    /// A new member slot (ports, data directory) for `member add`; not started. Returns its index.
    pub fn new_node(&mut self) -> usize {
        let name = format!("m{}", self.nodes.len() + 1);
        let mut node = Node::new(self.dir.path(), name);
        node.peer_scheme = self.nodes.first().map_or("http", |n| n.peer_scheme);
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Start member `i` (from `new_node`, already added with `member add`) so it joins the
    /// running cluster: `--initial-cluster-state existing` and an initial cluster of every
    /// running member plus itself.
    pub fn join(&mut self, i: usize) -> anyhow::Result<()> {
        let mut ic: Vec<String> =
            self.nodes.iter().filter(|n| n.is_running()).map(|n| format!("{}={}", n.name, n.peer_url())).collect();
        ic.push(format!("{}={}", self.nodes[i].name, self.nodes[i].peer_url()));
        self.nodes[i].join = Some(ic.join(","));
        self.spawn(i)
    }

    /// Whether member `i`'s process has exited by itself (it was running under this harness).
    pub fn exited(&mut self, i: usize) -> bool {
        match self.nodes[i].child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(_))) => {
                self.nodes[i].child = None;
                true
            }
            _ => false,
        }
    }

    /// SIGKILL member `i` (no chance to flush anything).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM member `i` and wait for it to exit.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            unsafe_signal(c.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, i: usize, sig: &str) {
        if let Some(pid) = self.nodes[i].pid() {
            unsafe_signal(pid, sig);
        }
    }

    pub fn endpoints(&self) -> String {
        self.nodes.iter().filter(|n| n.is_running()).map(|n| n.endpoint()).collect::<Vec<_>>().join(",")
    }

    pub fn all_endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.endpoint()).collect()
    }

    /// Wait until a put through every running member succeeds.
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for n in self.nodes.iter().filter(|n| n.is_running()) {
            loop {
                let out = etcdctl(&n.endpoint(), &["--command-timeout=1s", "endpoint", "health"]);
                if out.ok {
                    break;
                }
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(&n.log_path).unwrap_or_default();
                    bail!("member {} not healthy in time: {}\n--- log ---\n{}", n.name, out.stderr, tail(&log, 40));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        // Every member lists every running member's client URL (published through the log).
        for n in self.nodes.iter().filter(|n| n.is_running()) {
            loop {
                let out = etcdctl(&n.endpoint(), &["--command-timeout=1s", "member", "list"]);
                let listed = self.nodes.iter().filter(|m| m.is_running()).all(|m| out.stdout.contains(&m.client_url()));
                if out.ok && listed {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("member {} does not list every client URL in time: {}", n.name, out.stdout);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Index of the member that currently leads, from `endpoint status`.
    pub fn leader(&self) -> Option<usize> {
        for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| n.is_running()) {
            let out = etcdctl(&n.endpoint(), &["--command-timeout=1s", "endpoint", "status", "-w", "json"]);
            if !out.ok {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
            let st = &v[0]["Status"];
            if st["leader"].as_u64().is_some() && st["leader"] == st["header"]["member_id"] {
                return Some(i);
            }
        }
        None
    }

    pub fn wait_leader(&self, timeout: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!("no leader within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log_path).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::env::var_os("QUORATE_KEEP_LOGS").is_some() {
            let keep = tempfile::tempdir().map(|d| d.keep()).ok();
            if let Some(keep) = keep {
                for n in &self.nodes {
                    let _ = std::fs::copy(&n.log_path, keep.join(format!("{}.log", n.name)));
                }
                eprintln!("member logs kept in {}", keep.display());
            }
        }
        for i in 0..self.nodes.len() {
            // Resume first: a stopped process cannot handle SIGKILL promptly otherwise.
            self.signal(i, "CONT");
            self.kill(i);
        }
    }
}

fn unsafe_signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Run the real `etcdctl` (v3 API) against `endpoints`.
pub fn etcdctl(endpoints: &str, args: &[&str]) -> Output {
    etcdctl_stdin(endpoints, args, None)
}

pub fn etcdctl_stdin(endpoints: &str, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3").arg(format!("--endpoints={endpoints}")).args(args);
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("etcdctl is installed (apt-get install etcd-client)");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Run `etcdctl` steps in order at `endpoint`, each of which must succeed (an auth setup, say).
/// A step refused with "too many requests" (a rate-limited member) is retried for up to 5 s.
pub fn etcdctl_steps(endpoint: &str, steps: &[&[&str]]) {
    for args in steps {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut out = etcdctl(endpoint, args);
        while !out.ok && out.stderr.contains("too many requests") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(300));
            out = etcdctl(endpoint, args);
        }
        assert!(out.ok, "etcdctl {}: {}{}", args.join(" "), out.stdout, out.stderr);
    }
}

/// Replace values that legitimately differ between two clusters (ids, timings) so outputs
/// can be compared line by line.
pub fn normalize(s: &str) -> String {
    let mut out = String::new();
    for line in s.lines() {
        let mut l = line.to_string();
        // 16-hex-digit ids (lease, member) and decimal ids in JSON.
        l = regex_replace_hex16(&l);
        out.push_str(&l);
        out.push('\n');
    }
    out
}

fn regex_replace_hex16(line: &str) -> String {
    let bytes: Vec<char> = line.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let mut j = i;
        while j < bytes.len() && bytes[j].is_ascii_hexdigit() {
            j += 1;
        }
        let word_start = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
        let word_end = j == bytes.len() || !bytes[j].is_ascii_alphanumeric();
        if j - i >= 12 && j - i <= 16 && word_start && word_end && bytes[i..j].iter().any(|c| c.is_ascii_digit()) {
            out.push_str("<id>");
            i = j;
        } else if j > i {
            out.extend(&bytes[i..j]);
            i = j;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// A running write load: `writers` tasks putting unique keys, remembering what was acknowledged.
pub mod load {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use etcd_client::Client;

    #[derive(Default)]
    pub struct Record {
        /// key -> value, for every acknowledged put.
        pub acked: BTreeMap<String, String>,
        /// Completion times of acknowledged puts.
        pub ack_times: Vec<Instant>,
        pub failures: usize,
    }

    pub struct Load {
        stop: Arc<AtomicBool>,
        pub record: Arc<Mutex<Record>>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    }

    impl Load {
        pub fn start(client: &Client, writers: usize, prefix: &str) -> Load {
            let stop = Arc::new(AtomicBool::new(false));
            let record = Arc::new(Mutex::new(Record::default()));
            let mut tasks = Vec::new();
            for w in 0..writers {
                let (stop, record, mut c, prefix) = (stop.clone(), record.clone(), client.clone(), prefix.to_string());
                tasks.push(tokio::spawn(async move {
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("{prefix}/{w}/{seq:08}");
                        let value = format!("v-{w}-{seq}");
                        match tokio::time::timeout(Duration::from_secs(2), c.put(key.clone(), value.clone(), None))
                            .await
                        {
                            Ok(Ok(_)) => {
                                let mut r = record.lock().unwrap();
                                r.acked.insert(key, value);
                                r.ack_times.push(Instant::now());
                                seq += 1;
                            }
                            _ => {
                                record.lock().unwrap().failures += 1;
                                // The outcome is unknown; move on to a fresh key.
                                seq += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                }));
            }
            Load { stop, record, tasks }
        }

        pub async fn stop(self) -> Record {
            self.stop.store(true, Ordering::Relaxed);
            for t in self.tasks {
                let _ = t.await;
            }
            Arc::try_unwrap(self.record).ok().expect("tasks done").into_inner().unwrap()
        }

        pub fn acked(&self) -> usize {
            self.record.lock().unwrap().acked.len()
        }

        /// First acknowledgement completed after `t`.
        pub fn first_ack_after(&self, t: Instant) -> Option<Instant> {
            self.record.lock().unwrap().ack_times.iter().copied().filter(|a| *a > t).min()
        }
    }
}

/// Every member's whole keyspace at one revision, read locally (serializable) once each has
/// applied that far. Panics with the member name if one never gets there.
pub async fn ranges_at_one_revision(cluster: &Cluster) -> Vec<(String, Vec<(Vec<u8>, Vec<u8>, i64)>)> {
    use etcd_client::{Client, GetOptions};
    let running: Vec<String> = cluster.nodes.iter().filter(|n| n.is_running()).map(|n| n.endpoint()).collect();
    let mut leader_client = Client::connect(running, None).await.unwrap();
    let rev =
        leader_client.get("", Some(GetOptions::new().with_prefix().with_keys_only().with_limit(1))).await.unwrap();
    let rev = rev.header().unwrap().revision();
    let mut out = Vec::new();
    for n in cluster.nodes.iter().filter(|n| n.is_running()) {
        let mut c = Client::connect([n.endpoint()], None).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = c.get("", Some(GetOptions::new().with_prefix().with_serializable().with_revision(rev))).await;
            match r {
                Ok(r) => {
                    let kvs =
                        r.kvs().iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision())).collect();
                    out.push((n.name.clone(), kvs));
                    break;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "member {} never reached revision {rev}: {e}", n.name);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    out
}

/// `GET path` on a member's HTTP listener; returns the body.
pub fn http_get(node: &Node, path: &str) -> anyhow::Result<String> {
    Ok(http(node, "GET", path, None)?.body)
}

/// An HTTP answer: status, headers (names lower-cased) and body.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn http_request(method: &str, path: &str, body: Option<&str>) -> String {
    http_request_with(method, path, &[], body)
}

fn http_request_with(method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> String {
    let body = body.unwrap_or("");
    let extra: String = headers.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// `http` with extra request headers (credentials, say).
pub fn http_with(
    node: &Node,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> anyhow::Result<HttpReply> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", node.http_port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(http_request_with(method, path, headers, body).as_bytes())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    Ok(parse_reply(&buf))
}

/// One HTTP/1.1 request to a member's `--listen-http`, connection closed after the answer.
pub fn http(node: &Node, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<HttpReply> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", node.http_port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(http_request(method, path, body).as_bytes())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    Ok(parse_reply(&buf))
}

/// `http`, for many concurrent callers on a tokio runtime.
pub async fn http_async(port: u16, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<HttpReply> {
    http_at(&format!("127.0.0.1:{port}"), method, path, body, Duration::from_secs(30)).await
}

/// One HTTP/1.1 request to `addr` (`host:port`), giving up after `timeout`.
pub async fn http_at(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<HttpReply> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(http_request(method, path, body).as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(parse_reply(&String::from_utf8_lossy(&buf)))
    };
    tokio::time::timeout(timeout, exchange).await?
}

fn parse_reply(buf: &str) -> HttpReply {
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((buf, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    HttpReply { status, headers, body: body.to_string() }
}

/// The value of one Prometheus sample (no labels) from `/metrics`.
pub fn metric(node: &Node, name: &str) -> anyhow::Result<f64> {
    let body = http_get(node, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).map(|v| v.trim().parse::<f64>()))
        .ok_or_else(|| anyhow::anyhow!("no metric {name} in /metrics"))?
        .map_err(Into::into)
}

/// The network namespaces a drill run with pid tag `tag` (its pid modulo 100,000) left behind:
/// its switch `qdsw<tag>` and its members' `qd...x<tag>`.
pub fn drill_namespaces_left(tag: u32) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name == format!("qdsw{tag}") || (name.starts_with("qd") && name.ends_with(&format!("x{tag}"))))
        .map(str::to_string)
        .collect()
}

/// How long one `quorate ctl` run may take: its own timeouts (dial 2s, command 5s) bound it well
/// below.
pub const CTL_RUN_MAX: Duration = Duration::from_secs(30);
/// How long a situation may take to show in the doctor's verdict.
pub const DOCTOR_SETTLE_MAX: Duration = Duration::from_secs(30);

/// What one `quorate ctl` run printed, and its exit code.
pub struct CtlRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CtlRun {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

/// `quorate ctl --endpoints <endpoints> <args>` as an operator runs it, killed if it outlives
/// `CTL_RUN_MAX`.
pub fn ctl(endpoints: &str, args: &[&str]) -> CtlRun {
    let mut child = Command::new(quorate_bin())
        .args(["ctl", "--endpoints", endpoints])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn quorate ctl");
    let deadline = Instant::now() + CTL_RUN_MAX;
    while child.try_wait().expect("wait for ctl").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("quorate ctl {args:?} did not finish within {CTL_RUN_MAX:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("ctl output");
    CtlRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `ctl doctor -w json` until `done` accepts its report, or panics with the last one.
pub fn doctor_until(
    endpoints: &str,
    what: &str,
    done: impl Fn(&CtlRun, &serde_json::Value) -> bool,
) -> (CtlRun, serde_json::Value) {
    let deadline = Instant::now() + DOCTOR_SETTLE_MAX;
    loop {
        let run = ctl(endpoints, &["doctor", "-w", "json"]);
        let report = run.json();
        if done(&run, &report) {
            return (run, report);
        }
        if Instant::now() > deadline {
            panic!("{what}: not seen within {DOCTOR_SETTLE_MAX:?}; last exit {}: {report:#}\n{}", run.code, run.stderr);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The doctor's findings with `code`.
pub fn findings<'a>(report: &'a serde_json::Value, code: &str) -> Vec<&'a serde_json::Value> {
    report["findings"].as_array().unwrap().iter().filter(|f| f["code"] == code).collect()
}
