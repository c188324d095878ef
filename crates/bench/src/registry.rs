//! `quorate bench-registry`: load over the native registry API. Registrations per second,
//! discovery queries per second (consistent and stale), and a heartbeat phase in which every
//! registered instance heartbeats on its own schedule (for measuring members' CPU from outside).
//! Phases: register, heartbeat (right after, so no lease lapses), then queries.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug)]
pub struct RegistryBenchConfig {
    /// `host:port` of members' `--listen-http`.
    pub endpoints: Vec<String>,
    pub instances: usize,
    pub concurrency: usize,
    pub query_seconds: u64,
    /// Heartbeat phase length (0 skips it) and interval.
    pub heartbeat_seconds: u64,
    pub heartbeat_interval_s: u64,
}

#[derive(Debug, Serialize)]
pub struct RegistryBenchReport {
    pub registrations_per_s: f64,
    pub consistent_queries_per_s: f64,
    pub stale_queries_per_s: f64,
    pub heartbeats_per_s: f64,
    pub heartbeat_failures: u64,
}

/// One request on a fresh connection; returns the status code.
async fn request(endpoint: &str, method: &str, path: &str, body: &str) -> anyhow::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(endpoint).await.with_context(|| format!("connect {endpoint}"))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {endpoint}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let head = String::from_utf8_lossy(&buf[..buf.len().min(32)]).into_owned();
    head.split(' ').nth(1).and_then(|c| c.parse().ok()).context("no HTTP status line")
}

const SVC: &str = "/api/v1/ns/bench/services/bench/instances";

pub async fn run(cfg: &RegistryBenchConfig) -> anyhow::Result<RegistryBenchReport> {
    if cfg.endpoints.is_empty() {
        bail!("no endpoints");
    }
    let cfg = Arc::new(cfg.clone());
    let ttl = cfg.heartbeat_interval_s * 3;

    // Registrations: `concurrency` workers over the instance ids.
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..cfg.concurrency {
        let (cfg, next) = (cfg.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= cfg.instances {
                    return anyhow::Ok(());
                }
                let ep = &cfg.endpoints[(i + w) % cfg.endpoints.len()];
                let body = format!(
                    r#"{{"address":"10.{}.{}.{}","port":8080,"zone":"z{}","ttl_s":{ttl},"heartbeat_interval_s":{}}}"#,
                    i / 65536 % 256,
                    i / 256 % 256,
                    i % 256,
                    i % 4,
                    cfg.heartbeat_interval_s
                );
                let code = request(ep, "PUT", &format!("{SVC}/i{i}"), &body).await?;
                if code != 200 {
                    bail!("register i{i}: HTTP {code}");
                }
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    let registrations_per_s = cfg.instances as f64 / started.elapsed().as_secs_f64();

    // Heartbeats: every instance on its own schedule, spread over the interval.
    let (mut heartbeats_per_s, mut heartbeat_failures) = (0.0, 0);
    if cfg.heartbeat_seconds > 0 {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let interval = Duration::from_secs(cfg.heartbeat_interval_s);
        let mut beats = Vec::new();
        for i in 0..cfg.instances {
            let (cfg, stop, ok, failed) = (cfg.clone(), stop.clone(), ok.clone(), failed.clone());
            beats.push(tokio::spawn(async move {
                tokio::time::sleep(interval * i as u32 / cfg.instances as u32).await;
                let mut tick = tokio::time::interval(interval);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let ep = &cfg.endpoints[i % cfg.endpoints.len()];
                    match request(ep, "PUT", &format!("{SVC}/i{i}/heartbeat"), "").await {
                        Ok(200) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(404) => {
                            // What a client does when its lease is gone: register again.
                            failed.fetch_add(1, Ordering::Relaxed);
                            let body = format!(
                                r#"{{"address":"10.0.0.1","port":8080,"ttl_s":{},"heartbeat_interval_s":{}}}"#,
                                cfg.heartbeat_interval_s * 3,
                                cfg.heartbeat_interval_s
                            );
                            let _ = request(ep, "PUT", &format!("{SVC}/i{i}"), &body).await;
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        let t = Instant::now();
        println!("heartbeat phase: {} instances every {interval:?} for {} s", cfg.instances, cfg.heartbeat_seconds);
        tokio::time::sleep(Duration::from_secs(cfg.heartbeat_seconds)).await;
        stop.store(true, Ordering::Relaxed);
        heartbeats_per_s = ok.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();
        heartbeat_failures = failed.load(Ordering::Relaxed);
        for b in beats {
            b.abort();
        }
    }
    // Discovery: closed loop over one service (a small one, so the answer size does not
    // dominate): register a 10-instance service first.
    for i in 0..10 {
        let body = r#"{"address":"10.200.0.1","port":80,"kind":"persistent"}"#;
        request(&cfg.endpoints[0], "PUT", &format!("/api/v1/ns/bench/services/small/instances/s{i}"), body).await?;
    }
    let mut qps = Vec::new();
    for query in ["", "?stale"] {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for w in 0..cfg.concurrency {
            let (cfg, stop, done) = (cfg.clone(), stop.clone(), done.clone());
            let path = format!("/api/v1/ns/bench/services/small/instances{query}");
            workers.push(tokio::spawn(async move {
                let mut k = w;
                while !stop.load(Ordering::Relaxed) {
                    let ep = &cfg.endpoints[k % cfg.endpoints.len()];
                    k += 1;
                    if request(ep, "GET", &path, "").await? == 200 {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(())
            }));
        }
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(cfg.query_seconds)).await;
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.await??;
        }
        qps.push(done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64());
    }

    Ok(RegistryBenchReport {
        registrations_per_s,
        consistent_queries_per_s: qps[0],
        stale_queries_per_s: qps[1],
        heartbeats_per_s,
        heartbeat_failures,
    })
}
