//! The drill's hosts: one network namespace per member, each with a veth into a bridge that
//! lives in a namespace of the drill's own, and a veth from the host into the same bridge so
//! the clients (outside every member's namespace) reach every member, as in Jepsen. Cuts are
//! nftables drop rules in a `bridge` table of the switch namespace: a partition is a silent
//! drop, never a refused connection. Everything is removed when the `Net` is dropped, which
//! also happens on Ctrl-C and on failure (the runner owns it).

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Mutex;

use anyhow::{bail, Context};

pub(crate) fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("run {}", args[0]))?;
    if !out.status.success() {
        bail!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Whether this process runs as root (namespaces and nftables need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

pub struct Net {
    tag: String,
    subnet: u32,
    members: usize,
    /// Directed links currently dropped, as (from, to) member slots.
    cut: Mutex<BTreeSet<(usize, usize)>>,
    /// The lock that makes `subnet` this net's alone while it exists (released by the kernel if
    /// the process dies).
    _claim: std::fs::File,
}

/// Where subnet claims are locked: one file per subnet, each held with an exclusive lock by the
/// net that uses it.
const CLAIMS_DIR: &str = "/tmp/quorate-drill-subnets";

/// Claim a free subnet (10..250) for this process, starting from one its pid picks: two nets
/// made at once (t90 and a split-view test, running side by side in CI) never share one.
fn claim_subnet() -> anyhow::Result<(u32, std::fs::File)> {
    std::fs::create_dir_all(CLAIMS_DIR)?;
    let start = std::process::id() % 240;
    for n in 0..240 {
        let subnet = 10 + (start + n) % 240;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(format!("{CLAIMS_DIR}/{subnet}"))?;
        if f.try_lock().is_ok() {
            return Ok((subnet, f));
        }
    }
    anyhow::bail!("every drill subnet 10.78.10-249.0/24 is in use (locks in {CLAIMS_DIR})")
}

impl Net {
    fn ns_switch(&self) -> String {
        format!("qdsw{}", self.tag)
    }

    /// The namespace member `slot` (0-based) runs in.
    pub fn ns_member(&self, slot: usize) -> String {
        format!("qd{slot}x{}", self.tag)
    }

    /// Member `slot`'s address.
    pub fn ip(&self, slot: usize) -> String {
        format!("10.78.{}.{}", self.subnet, slot + 1)
    }

    pub fn create(members: usize) -> anyhow::Result<Net> {
        let pid = std::process::id();
        let (subnet, claim) = claim_subnet()?;
        let net = Net { tag: format!("{}", pid % 100_000), subnet, members, cut: Mutex::default(), _claim: claim };
        // Created step by step; on any error `net` is dropped and removes what exists.
        let sw = net.ns_switch();
        sh(&["ip", "netns", "add", &sw])?;
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        for slot in 0..members {
            let ns = net.ns_member(slot);
            let (a, b) = (format!("qdv{slot}x{}", net.tag), format!("qdp{slot}x{}", net.tag));
            sh(&["ip", "netns", "add", &ns])?;
            sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b])?;
            sh(&["ip", "link", "set", &a, "netns", &ns])?;
            sh(&["ip", "link", "set", &b, "netns", &sw])?;
            sh(&["ip", "-n", &sw, "link", "set", &b, "master", "br0"])?;
            sh(&["ip", "-n", &sw, "link", "set", &b, "up"])?;
            sh(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", net.ip(slot)), "dev", &a])?;
            sh(&["ip", "-n", &ns, "link", "set", &a, "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        let (h, p) = (format!("qdh{}", net.tag), format!("qdph{}", net.tag));
        sh(&["ip", "link", "add", &h, "type", "veth", "peer", "name", &p])?;
        sh(&["ip", "link", "set", &p, "netns", &sw])?;
        sh(&["ip", "-n", &sw, "link", "set", &p, "master", "br0"])?;
        sh(&["ip", "-n", &sw, "link", "set", &p, "up"])?;
        sh(&["ip", "addr", "add", &format!("10.78.{}.254/24", net.subnet), "dev", &h])?;
        sh(&["ip", "link", "set", &h, "up"])?;
        let chain = "{ type filter hook forward priority 0 ; }";
        sh(&["ip", "netns", "exec", &sw, "nft", "add", "table", "bridge", "qdrill"])?;
        sh(&["ip", "netns", "exec", &sw, "nft", "add", "chain", "bridge", "qdrill", "cut", chain])?;
        Ok(net)
    }

    /// Drop everything sent from `from` to `to` (one direction; cut both for a partition).
    pub fn cut(&self, links: &[(usize, usize)]) -> anyhow::Result<()> {
        let sw = self.ns_switch();
        let mut cut = self.cut.lock().unwrap();
        for &(from, to) in links {
            if !cut.insert((from, to)) {
                continue;
            }
            let rule = format!("ip saddr {} ip daddr {} drop", self.ip(from), self.ip(to));
            let mut args = vec!["ip", "netns", "exec", &sw, "nft", "add", "rule", "bridge", "qdrill", "cut"];
            args.extend(rule.split(' '));
            sh(&args)?;
        }
        Ok(())
    }

    /// Remove every cut.
    pub fn heal(&self) -> anyhow::Result<()> {
        sh(&["ip", "netns", "exec", &self.ns_switch(), "nft", "flush", "chain", "bridge", "qdrill", "cut"])?;
        self.cut.lock().unwrap().clear();
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = sh(&["ip", "link", "del", &format!("qdh{}", self.tag)]);
        for slot in 0..self.members {
            let _ = sh(&["ip", "netns", "del", &self.ns_member(slot)]);
        }
        let _ = sh(&["ip", "netns", "del", &self.ns_switch()]);
    }
}
