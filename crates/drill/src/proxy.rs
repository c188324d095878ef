//! Peer-link proxies, two ways.
//!
//! - `serve` (`quorate drill-proxy`, namespace mode): one process inside each member's
//!   namespace (`ip:2381` to the member's `ip:2380`); members advertise it as their peer URL,
//!   so delay spikes can be injected on everything flowing into a member (this kernel has no
//!   `tc netem`). Cuts stay in nftables on the bridge, which the proxied traffic still crosses.
//! - `ProxyNet` (proxy mode, no root): members on loopback, one proxy task per member in the
//!   drill itself. On loopback every connection comes from 127.0.0.1, so the proxy finds the
//!   sending member by the owner of the connecting socket (`/proc/net/tcp` inode, then the
//!   members' `/proc/<pid>/fd`), and can then blackhole one directed link, as a partition does.
//!
//! A delay is a latency, not a throttle: each chunk is held until its due time, in order.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What happens to a chunk: dropped silently, or delayed this many milliseconds.
type Gate = Arc<dyn Fn() -> (bool, u64) + Send + Sync>;

pub async fn serve(listen: SocketAddr, to: SocketAddr, control: PathBuf) -> anyhow::Result<()> {
    let delay = Arc::new(AtomicU64::new(0));
    let d = delay.clone();
    tokio::spawn(async move {
        loop {
            let ms = tokio::fs::read_to_string(&control).await.ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
            d.store(ms, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (inbound, _) = listener.accept().await?;
        let delay = delay.clone();
        let inward: Gate = Arc::new(move || (false, delay.load(Ordering::Relaxed)));
        tokio::spawn(splice(inbound, to, inward, Arc::new(|| (false, 0))));
    }
}

/// Connect to `to` and copy both ways through the gates.
async fn splice(inbound: TcpStream, to: SocketAddr, inward: Gate, outward: Gate) {
    let Ok(outbound) = TcpStream::connect(to).await else { return };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_r, in_w) = inbound.into_split();
    let (out_r, out_w) = outbound.into_split();
    tokio::join!(pump(in_r, out_w, inward), pump(out_r, in_w, outward));
}

async fn pump(mut r: tokio::net::tcp::OwnedReadHalf, mut w: tokio::net::tcp::OwnedWriteHalf, gate: Gate) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if w.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let (drop, ms) = gate();
                    if drop {
                        continue; // blackholed: the sender hears nothing, as with a silent drop
                    }
                    let due = tokio::time::Instant::now() + Duration::from_millis(ms);
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    tokio::join!(reader, writer);
}

/// Proxy mode's links: every member's peer traffic passes through a proxy task here.
pub struct ProxyNet {
    pids: Mutex<HashMap<u32, usize>>,
    cut: Mutex<BTreeSet<(usize, usize)>>,
    delay: Vec<AtomicU64>,
}

impl ProxyNet {
    pub fn new(members: usize) -> Arc<ProxyNet> {
        Arc::new(ProxyNet {
            pids: Mutex::default(),
            cut: Mutex::default(),
            delay: (0..members).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Member `slot` now runs as `pid` (after every start).
    pub fn set_pid(&self, slot: usize, pid: u32) {
        let mut pids = self.pids.lock().unwrap();
        pids.retain(|_, s| *s != slot);
        pids.insert(pid, slot);
    }

    pub fn cut(&self, links: &[(usize, usize)]) {
        self.cut.lock().unwrap().extend(links.iter().copied());
    }

    pub fn heal(&self) {
        self.cut.lock().unwrap().clear();
    }

    pub fn set_delay(&self, slot: usize, ms: u64) {
        self.delay[slot].store(ms, Ordering::Relaxed);
    }

    /// Proxy `listen` to member `slot` at `to` until the drill ends.
    pub async fn listen(self: &Arc<Self>, slot: usize, listen: SocketAddr, to: SocketAddr) -> anyhow::Result<()> {
        let listener = TcpListener::bind(listen).await?;
        let net = self.clone();
        tokio::spawn(async move {
            while let Ok((inbound, from)) = listener.accept().await {
                let net = net.clone();
                tokio::spawn(async move {
                    // Which member is calling; unknown (not a member) is never cut.
                    let src = net.owner(from, listen);
                    let (n1, n2) = (net.clone(), net.clone());
                    let inward: Gate = Arc::new(move || {
                        let cut = src.is_some_and(|s| n1.cut.lock().unwrap().contains(&(s, slot)));
                        (cut, n1.delay[slot].load(Ordering::Relaxed))
                    });
                    let outward: Gate =
                        Arc::new(move || (src.is_some_and(|s| n2.cut.lock().unwrap().contains(&(slot, s))), 0));
                    splice(inbound, to, inward, outward).await;
                });
            }
        });
        Ok(())
    }

    /// The member that owns the socket connecting from `from` to `to`.
    fn owner(&self, from: SocketAddr, to: SocketAddr) -> Option<usize> {
        let inode = socket_inode(from, to)?;
        let needle = format!("socket:[{inode}]");
        let pids = self.pids.lock().unwrap().clone();
        pids.into_iter().find_map(|(pid, slot)| {
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
            fds.flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == needle))
                .then_some(slot)
        })
    }
}

/// The inode of the IPv4 TCP socket bound to `local` and connected to `remote`.
fn socket_inode(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    let hex = |a: SocketAddr| -> Option<String> {
        let IpAddr::V4(ip) = a.ip() else { return None };
        Some(format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), a.port()))
    };
    let (l, r) = (hex(local)?, hex(remote)?);
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 9 && f[1] == l && f[2] == r).then(|| f[9].parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_owner_of_a_loopback_connection_is_found_by_its_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = listener.local_addr().unwrap();
        let client = TcpStream::connect(to).await.unwrap();
        let (_, from) = listener.accept().await.unwrap();
        let net = ProxyNet::new(2);
        assert_eq!(net.owner(from, to), None, "no member owns it yet");
        net.set_pid(1, std::process::id());
        assert_eq!(net.owner(from, to), Some(1), "this process owns the connecting socket");
        drop(client);
    }
}
