//! A minimal HTTP/1.1 client for the members' HTTP listener (registry workload, failpoints).

use std::time::Duration;

use anyhow::Context;

/// A minimal HTTP/1.1 call: (status, body).
pub async fn call(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        anyhow::Ok(String::from_utf8_lossy(&out).into_owned())
    };
    let out = tokio::time::timeout(timeout, io).await.context("timed out")??;
    let status = out.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no HTTP status")?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}
