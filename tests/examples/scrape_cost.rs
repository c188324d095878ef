//! What a `/metrics` scrape costs on a real member as its registry grows (issue 12's acceptance:
//! under 50 ms with 10,000 instances). Starts one `quorate` member (target/debug/quorate, or
//! `QUORATE_BIN`), scrapes it with an empty registry, registers the instances, and scrapes
//! again; before every scrape one registry record changes (a re-registration with another
//! weight), so nothing a scrape computes can be reused from the scrape before. Prints the
//! p50, p99 and max of each.
//!
//! ```text
//! cargo build -p quorate && cargo run -p quorate-tests --example scrape_cost -- [INSTANCES] [SCRAPES]
//! ```
//!
//! Defaults: 10000 instances, 200 scrapes. A release measurement builds with `--release` and
//! points `QUORATE_BIN` at target/release/quorate.

use std::time::{Duration, Instant};

use quorate_tests::{http_async, http_at, Cluster, Flavor};

const REGISTER_IN_FLIGHT: usize = 64;

fn body(weight: u32) -> String {
    format!(r#"{{"address":"10.0.0.1","port":80,"zone":"z1","kind":"persistent","weight":{weight}}}"#)
}

fn path(i: usize) -> String {
    format!("/api/v1/ns/default/services/svc{}/instances/i{i}", i % 100)
}

/// `scrapes` scrapes of the client URL, each after one registry record changed: the
/// milliseconds each took (the whole HTTP exchange, as a scraper sees it).
async fn measure(cluster: &Cluster, scrapes: usize) -> Vec<f64> {
    let node = &cluster.nodes[0];
    let mut took = Vec::with_capacity(scrapes);
    for k in 0..scrapes {
        let r = http_async(node.http_port, "PUT", &path(usize::MAX - 1), Some(&body(k as u32 % 1000))).await;
        assert_eq!(r.expect("change a record").status, 200);
        let started = Instant::now();
        let reply = http_at(&node.endpoint(), "GET", "/metrics", None, Duration::from_secs(30)).await.expect("scrape");
        took.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    took
}

fn report(instances: usize, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    let q = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    println!(
        "instances={instances} scrapes={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        ms.len(),
        q(0.5),
        q(0.99),
        ms[ms.len() - 1]
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let instances = args.next().transpose()?.unwrap_or(10_000);
    let scrapes = args.next().transpose()?.unwrap_or(200);
    let cluster = Cluster::start(Flavor::Quorate, 1)?;
    cluster.wait_ready(Duration::from_secs(30))?;

    eprintln!("scrapes with an empty registry (one record, changed before each)");
    let empty = measure(&cluster, scrapes).await;

    eprintln!("register {instances} instances, {REGISTER_IN_FLIGHT} at a time");
    let started = Instant::now();
    let port = cluster.nodes[0].http_port;
    let mut next = 0;
    while next < instances {
        let batch: Vec<_> = (next..instances.min(next + REGISTER_IN_FLIGHT))
            .map(|i| tokio::spawn(async move { http_async(port, "PUT", &path(i), Some(&body(100))).await }))
            .collect();
        for t in batch {
            let r = t.await??;
            anyhow::ensure!(r.status == 200, "register: {} {}", r.status, r.body);
        }
        next += REGISTER_IN_FLIGHT;
    }
    eprintln!("registered in {:.1} s", started.elapsed().as_secs_f64());
    let counted = measure(&cluster, 1).await;
    drop(counted);
    let reply = http_at(&cluster.nodes[0].endpoint(), "GET", "/metrics", None, Duration::from_secs(30)).await?;
    let passing = reply
        .body
        .lines()
        .find_map(|l| l.strip_prefix("quorate_registry_instances{state=\"passing\"} "))
        .unwrap_or("?")
        .to_string();
    eprintln!("the member counts {passing} passing instances");

    eprintln!("scrapes with {instances} instances (one record changed before each)");
    let full = measure(&cluster, scrapes).await;
    report(0, empty);
    report(instances, full);
    Ok(())
}
