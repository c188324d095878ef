//! The peer-link proxy (`quorate drill-proxy`, started by the drill inside each member's
//! namespace): every member advertises the proxy's port as its peer URL, so all Raft traffic
//! into a member passes through it. It adds a delay, read from a control file every 100 ms,
//! to everything flowing into the member (this kernel has no `tc netem`). The delay is a
//! latency, not a throttle: each chunk is held until its due time, in order. Cuts stay in
//! nftables on the bridge, which the proxied traffic still crosses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(to).await else { return };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (in_r, in_w) = inbound.into_split();
            let (out_r, out_w) = outbound.into_split();
            tokio::join!(pump(in_r, out_w, Some(delay)), pump(out_r, in_w, None));
        });
    }
}

/// Copy `r` to `w`, each chunk held `delay` milliseconds (as set when it was read).
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: Option<Arc<AtomicU64>>,
) {
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
                    let ms = delay.as_ref().map_or(0, |d| d.load(Ordering::Relaxed));
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
