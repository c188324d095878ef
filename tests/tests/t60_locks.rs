//! Fenced locks (issue 3): 10 contenders for one lock with 2 s leases, each doing a fenced
//! read-modify-write of a counter under the lock; some holders are paused with SIGSTOP past
//! their lease while holding it. The server must refuse every write from a holder that lost its
//! lock, and the counter must end equal to the number of writes it accepted.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use quorate_tests::{Cluster, Flavor};

const WORKERS: usize = 10;
const RUN_SECS: u64 = 20;
const PAUSES: usize = 4;
/// Longer than the 2 s lease plus the lease clock's grace, so the paused holder loses the lock.
const PAUSE: Duration = Duration::from_millis(4500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_holders_cannot_write_after_losing_the_lock() {
    let cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let mut children = Vec::new();
    for w in 0..WORKERS {
        let endpoint = cluster.nodes[w % cluster.nodes.len()].endpoint();
        let mut child = Command::new(env!("CARGO_BIN_EXE_lock_worker"))
            .args([endpoint.as_str(), "locks/counter", "counter", &RUN_SECS.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn lock_worker");
        let out = child.stdout.take().unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((w, line));
            }
        });
        children.push(child);
    }
    drop(tx);

    let mut lines: Vec<(usize, String)> = Vec::new();
    let mut paused: Option<(usize, Instant)> = None;
    let mut pauses = 0;
    let start = Instant::now();
    loop {
        if let Some((w, since)) = paused {
            if since.elapsed() >= PAUSE {
                signal(children[w].id(), "CONT");
                paused = None;
            }
        }
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok((w, line)) => {
                // Pause a holder the moment it reports the lock, spread over the run.
                let due = start.elapsed() > Duration::from_secs(2 + 4 * pauses as u64);
                if line.starts_with("HOLD") && paused.is_none() && pauses < PAUSES && due {
                    signal(children[w].id(), "STOP");
                    eprintln!("paused worker {w} while it holds {}", &line[5..]);
                    paused = Some((w, Instant::now()));
                    pauses += 1;
                }
                lines.push((w, line));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a worker failed");
    }

    let accepted: Vec<u64> =
        lines.iter().filter_map(|(_, l)| l.strip_prefix("ACCEPT ")).map(|v| v.parse().unwrap()).collect();
    let rejected: Vec<&String> = lines.iter().map(|(_, l)| l).filter(|l| l.starts_with("REJECT")).collect();
    let put_errors: Vec<&String> = lines.iter().map(|(_, l)| l).filter(|l| l.starts_with("ERROR put")).collect();
    eprintln!(
        "{} increments accepted, {} stale writes refused, {pauses} holders paused past their lease",
        accepted.len(),
        rejected.len()
    );
    if let Some(r) = rejected.first() {
        eprintln!("a refusal reads: {r}");
    }
    assert!(put_errors.is_empty(), "writes with unknown outcome make the count uncheckable: {put_errors:?}");
    assert_eq!(pauses, PAUSES, "the run was too short to pause {PAUSES} holders");
    assert!(accepted.len() > 20, "too little progress: {} increments", accepted.len());

    // Every accepted write was a distinct, consecutive increment: no two holders ever wrote
    // on the same read.
    let mut sorted = accepted.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=accepted.len() as u64).collect::<Vec<_>>(), "accepted increments {accepted:?}");
    let out = quorate_tests::etcdctl(&cluster.endpoints(), &["get", "counter", "--print-value-only"]);
    assert_eq!(out.stdout.trim(), accepted.len().to_string(), "counter vs accepted increments");
    // Each paused holder woke up without its lock and tried its write.
    assert!(rejected.len() >= PAUSES - 1, "expected refused stale writes, got {rejected:?}");
    for r in &rejected {
        assert!(r.contains("fenced write rejected"), "{r}");
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill -{sig} {pid}");
}
