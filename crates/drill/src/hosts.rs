//! The members as processes, each in its own network namespace: start, kill -9, SIGSTOP and
//! SIGCONT, restart, replace with a fresh member, and move one member's wall clock through
//! libfaketime (`FAKETIME_DONT_FAKE_MONOTONIC=1`: only the wall clock moves).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use serde::Serialize;

use std::sync::Arc;

use crate::net::Net;
use crate::proxy::ProxyNet;

/// What the drill runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Quorate,
    Etcd,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Quorate => "quorate",
            Target::Etcd => "etcd",
        }
    }
}

/// Where Debian's `faketime` package puts the library.
const FAKETIME_LIBS: [&str; 2] =
    ["/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1"];

pub fn faketime_lib() -> Option<PathBuf> {
    FAKETIME_LIBS.iter().map(PathBuf::from).find(|p| p.exists())
}

pub struct MemberProc {
    /// Unique over the run: a replaced member gets a new name (`m2b`).
    pub name: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// libfaketime reads the offset from this file ("+0", "+2h").
    pub clock_file: PathBuf,
    child: Option<Child>,
}

/// How members are connected, and where faults on links are made.
pub enum Links {
    /// A network namespace per member (root): cuts in nftables, delay in a proxy process per
    /// namespace.
    Netns(Net),
    /// Members on loopback (no root): every peer link through the drill's own proxies, which
    /// cut and delay. Ports from `base` on, four per slot.
    Proxy { net: Arc<ProxyNet>, base: u16 },
}

pub struct Hosts {
    pub links: Links,
    pub target: Target,
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub members: Vec<MemberProc>,
    pub heartbeat_ms: u64,
    pub election_ms: u64,
    /// Extra flags for every quorate member (the planted bug, failpoints).
    pub extra: Vec<String>,
    faketime: Option<PathBuf>,
    renewals: usize,
    /// One peer-link proxy per slot (see `proxy.rs`), running for the whole drill.
    proxies: Vec<Child>,
}

impl Hosts {
    pub fn new(links: Links, target: Target, bin: PathBuf, dir: &Path, n: usize, extra: Vec<String>) -> Hosts {
        let members = (0..n).map(|slot| MemberProc::new(dir, format!("m{}", slot + 1))).collect();
        Hosts {
            links,
            target,
            bin,
            dir: dir.to_path_buf(),
            members,
            heartbeat_ms: 100,
            election_ms: 1000,
            extra,
            faketime: faketime_lib(),
            renewals: 0,
            proxies: Vec::new(),
        }
    }

    /// Start the peer-link proxies. Namespace mode: a process in each member's namespace
    /// (`ip:2381` to the member's `ip:2380`, delay read from `slot<n>.delay`); proxy mode: a
    /// task of the drill per member.
    pub async fn start_proxies(&mut self) -> anyhow::Result<()> {
        for slot in 0..self.members.len() {
            match &self.links {
                Links::Netns(net) => {
                    let ip = net.ip(slot);
                    let control = self.delay_file(slot);
                    std::fs::write(&control, "0\n")?;
                    let log = std::fs::File::create(self.dir.join(format!("proxy{}.log", slot + 1)))?;
                    let child = Command::new("ip")
                        .args(["netns", "exec", &net.ns_member(slot)])
                        .arg(&self.bin)
                        .args(["drill-proxy", "--listen", &format!("{ip}:2381"), "--to", &format!("{ip}:2380")])
                        .arg("--control")
                        .arg(&control)
                        .stdin(Stdio::null())
                        .stdout(log.try_clone()?)
                        .stderr(log)
                        .spawn()
                        .context("start a peer-link proxy")?;
                    self.proxies.push(child);
                }
                Links::Proxy { net, .. } => {
                    let (listen, to) = (self.port(slot, 2), self.port(slot, 1));
                    let addr = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
                    net.listen(slot, addr(listen), addr(to)).await.context("start a peer-link proxy")?;
                }
            }
        }
        Ok(())
    }

    fn delay_file(&self, slot: usize) -> PathBuf {
        self.dir.join(format!("slot{}.delay", slot + 1))
    }

    /// Delay everything flowing into member `slot` from its peers by `ms` (0: none).
    pub fn set_delay(&self, slot: usize, ms: u64) -> anyhow::Result<()> {
        match &self.links {
            Links::Netns(_) => std::fs::write(self.delay_file(slot), format!("{ms}\n"))?,
            Links::Proxy { net, .. } => net.set_delay(slot, ms),
        }
        Ok(())
    }

    /// Silently drop everything sent on these directed links (from, to).
    pub fn cut(&self, links: &[(usize, usize)]) -> anyhow::Result<()> {
        match &self.links {
            Links::Netns(net) => net.cut(links),
            Links::Proxy { net, .. } => {
                net.cut(links);
                Ok(())
            }
        }
    }

    pub fn heal_links(&self) -> anyhow::Result<()> {
        match &self.links {
            Links::Netns(net) => net.heal(),
            Links::Proxy { net, .. } => {
                net.heal();
                Ok(())
            }
        }
    }

    pub fn mode(&self) -> &'static str {
        match self.links {
            Links::Netns(_) => "network namespaces",
            Links::Proxy { .. } => "loopback behind proxies",
        }
    }

    /// Proxy mode's port `k` of `slot`: 0 client, 1 peer, 2 peer proxy, 3 HTTP.
    fn port(&self, slot: usize, k: u16) -> u16 {
        match self.links {
            Links::Proxy { base, .. } => base + 4 * slot as u16 + k,
            Links::Netns(_) => [2379, 2380, 2381, 8500][k as usize],
        }
    }

    fn host(&self, slot: usize) -> String {
        match &self.links {
            Links::Netns(net) => net.ip(slot),
            Links::Proxy { .. } => "127.0.0.1".to_string(),
        }
    }

    pub fn has_faketime(&self) -> bool {
        self.faketime.is_some()
    }

    pub fn client_url(&self, slot: usize) -> String {
        format!("http://{}:{}", self.host(slot), self.port(slot, 0))
    }

    /// The peer URL members advertise: the slot's peer-link proxy.
    pub fn peer_url(&self, slot: usize) -> String {
        format!("http://{}:{}", self.host(slot), self.port(slot, 2))
    }

    pub fn http_addr(&self, slot: usize) -> String {
        format!("{}:{}", self.host(slot), self.port(slot, 3))
    }

    pub fn initial_cluster(&self) -> String {
        (0..self.members.len())
            .map(|s| format!("{}={}", self.members[s].name, self.peer_url(s)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Start member `slot` (its process must not be running).
    pub fn spawn(&mut self, slot: usize, initial_cluster: &str, existing: bool) -> anyhow::Result<()> {
        let host = self.host(slot);
        let (client, peer, http) = (
            format!("http://{host}:{}", self.port(slot, 0)),
            format!("http://{host}:{}", self.port(slot, 1)),
            format!("{host}:{}", self.port(slot, 3)),
        );
        let advertised = self.peer_url(slot);
        let m = &self.members[slot];
        std::fs::write(&m.clock_file, "+0\n")?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&m.log_path)?;
        let mut cmd = match &self.links {
            Links::Netns(net) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &net.ns_member(slot)]);
                c.arg(match self.target {
                    Target::Quorate => self.bin.as_os_str(),
                    Target::Etcd => "etcd".as_ref(),
                });
                c
            }
            Links::Proxy { .. } => Command::new(match self.target {
                Target::Quorate => self.bin.as_os_str(),
                Target::Etcd => "etcd".as_ref(),
            }),
        };
        let state = if existing { "existing" } else { "new" };
        match self.target {
            Target::Quorate => {
                cmd.arg("server");
                cmd.args(["--listen-http", &http]);
                cmd.args(&self.extra);
            }
            Target::Etcd => {
                cmd.args(["--initial-cluster-token", "quorate-drill"]);
            }
        }
        cmd.args(["--name", &m.name, "--data-dir", m.data_dir.to_str().context("data dir")?]);
        cmd.args(["--listen-client-urls", &client, "--advertise-client-urls", &client]);
        cmd.args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &advertised]);
        cmd.args(["--initial-cluster", initial_cluster, "--initial-cluster-state", state]);
        cmd.args(["--heartbeat-interval", &self.heartbeat_ms.to_string()]);
        cmd.args(["--election-timeout", &self.election_ms.to_string()]);
        if let Some(lib) = &self.faketime {
            cmd.env("LD_PRELOAD", lib);
            cmd.env("FAKETIME_TIMESTAMP_FILE", &m.clock_file);
            cmd.env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
            cmd.env("FAKETIME_CACHE_DURATION", "1");
        }
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let child = cmd.spawn().with_context(|| format!("start member {}", m.name))?;
        if let Links::Proxy { net, .. } = &self.links {
            net.set_pid(slot, child.id());
        }
        self.members[slot].child = Some(child);
        Ok(())
    }

    pub fn pid(&self, slot: usize) -> Option<u32> {
        self.members[slot].child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self, slot: usize) -> bool {
        match self.members[slot].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn signal(&self, slot: usize, sig: &str) {
        if let Some(pid) = self.pid(slot) {
            let _ = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status();
        }
    }

    pub fn kill9(&mut self, slot: usize) {
        if let Some(mut c) = self.members[slot].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pause(&self, slot: usize) {
        self.signal(slot, "STOP");
    }

    pub fn resume(&self, slot: usize) {
        self.signal(slot, "CONT");
    }

    /// Offset member `slot`'s wall clock ("+2h", "-90m", "+0").
    pub fn set_clock(&self, slot: usize, offset: &str) -> anyhow::Result<()> {
        std::fs::write(&self.members[slot].clock_file, format!("{offset}\n"))?;
        Ok(())
    }

    /// Replace member `slot` by a fresh one (new name, empty data directory) in the same
    /// namespace; the caller has removed the old one from the cluster and adds the new one.
    pub fn renew(&mut self, slot: usize) -> anyhow::Result<()> {
        self.kill9(slot);
        self.renewals += 1;
        let name = format!("m{}r{}", slot + 1, self.renewals);
        self.members[slot] = MemberProc::new(&self.dir, name);
        Ok(())
    }

    pub fn log_tail(&self, slot: usize, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.members[slot].log_path).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl MemberProc {
    fn new(dir: &Path, name: String) -> MemberProc {
        MemberProc {
            data_dir: dir.join(format!("{name}.data")),
            log_path: dir.join(format!("{name}.log")),
            clock_file: dir.join(format!("{name}.clock")),
            name,
            child: None,
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for slot in 0..self.members.len() {
            // Resume first: a stopped process does not die of SIGKILL until continued.
            self.resume(slot);
            self.kill9(slot);
        }
        for p in &mut self.proxies {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}
