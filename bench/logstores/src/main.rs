//! Raft log stores compared on this machine's disk (ADR 0011): today's redb log, `raft-log`
//! (Databend's meta-service log, by openraft's author) and `raft-engine` (TiKV's).
//!
//! Three measurements, each in a fresh process so one store's page cache, threads and heap do
//! not carry into the next:
//! - `latency`: one entry appended and made durable, then the next; what a single client's
//!   write waits for on each member.
//! - `batch`: batches of entries, one sync each; what many clients get once writes group.
//! - `recover`: a log of about 1 GiB written, closed, then reopened until its last entry can be
//!   read; what a restart costs.
//!
//! `logstores all [ROUNDS]` runs every store and measurement in alternating rounds and prints
//! the medians; `scripts/bench-logstores.sh` builds it in release mode and runs it.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngCore;

const STORES: [&str; 3] = ["redb", "raft-log", "raft-engine"];

/// A put's log entry is about this big: a 256 B value, its key, the log id and the framing.
const ENTRY_BYTES: usize = 320;
const LATENCY_ENTRIES: u64 = 3000;
const BATCH_ENTRIES: u64 = 64;
const BATCHES: u64 = 400;
/// The recovery log: 1 GiB in 4 KiB entries, synced every 256 entries (1 MiB).
const RECOVER_ENTRY_BYTES: usize = 4096;
const RECOVER_LOG_BYTES: u64 = 1 << 30;
const RECOVER_BATCH: u64 = 256;

/// One store behind the three operations the measurements need.
trait Store {
    /// Append entries `from..from+n` (each `payload`) and return once they are durable.
    fn append_sync(&mut self, from: u64, n: u64, payload: &[u8]) -> io::Result<()>;
    /// The last entry's index and its length, read back (from memory or disk).
    fn last(&mut self) -> io::Result<Option<(u64, usize)>>;
}

fn open(store: &str, dir: &Path) -> io::Result<Box<dyn Store>> {
    Ok(match store {
        "redb" => Box::new(redb_log::Log::open(dir)?),
        "raft-log" => Box::new(raft_log_store::Log::open(dir)?),
        "raft-engine" => Box::new(engine::Log::open(dir)?),
        other => return Err(io::Error::other(format!("unknown store {other}"))),
    })
}

fn err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Today's log (`crates/consensus/src/log_store.rs`): a redb table keyed by index, one
/// two-phase, immediately durable transaction per batch, a 16 MiB page cache, and every entry
/// read into memory on open.
mod redb_log {
    use super::*;
    use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

    const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

    pub struct Log {
        db: Database,
        entries: std::collections::BTreeMap<u64, Vec<u8>>,
    }

    impl Log {
        pub fn open(dir: &Path) -> io::Result<Self> {
            let db = Database::builder().set_cache_size(16 << 20).create(dir.join("raft.redb")).map_err(err)?;
            let w = db.begin_write().map_err(err)?;
            w.open_table(LOG).map_err(err)?;
            w.commit().map_err(err)?;
            let mut entries = std::collections::BTreeMap::new();
            {
                let r = db.begin_read().map_err(err)?;
                let log = r.open_table(LOG).map_err(err)?;
                for item in log.iter().map_err(err)? {
                    let (k, v) = item.map_err(err)?;
                    entries.insert(k.value(), v.value().to_vec());
                }
            }
            Ok(Log { db, entries })
        }
    }

    impl Store for Log {
        fn append_sync(&mut self, from: u64, n: u64, payload: &[u8]) -> io::Result<()> {
            let mut w = self.db.begin_write().map_err(err)?;
            w.set_two_phase_commit(true);
            {
                let mut log = w.open_table(LOG).map_err(err)?;
                for i in from..from + n {
                    log.insert(i, payload).map_err(err)?;
                }
            }
            w.commit().map_err(err)?;
            for i in from..from + n {
                self.entries.insert(i, payload.to_vec());
            }
            Ok(())
        }

        fn last(&mut self) -> io::Result<Option<(u64, usize)>> {
            Ok(self.entries.iter().next_back().map(|(i, v)| (*i, v.len())))
        }
    }
}

/// `raft-log` with its flush worker's batching wait set to zero (its default, 1 ms, would be
/// added to every single-client write) and a 1 MiB replay buffer.
mod raft_log_store {
    use super::*;
    use raft_log::api::raft_log_writer::RaftLogWriter;
    use std::sync::mpsc::{sync_channel, SyncSender};

    #[derive(Debug, Clone, PartialEq, Eq, Default)]
    pub struct T;

    impl raft_log::Types for T {
        type LogId = (u64, u64);
        type LogPayload = Vec<u8>;
        type Vote = (u64, u64);
        type UserData = Vec<u8>;
        type Callback = SyncSender<io::Result<()>>;

        fn log_index(log_id: &Self::LogId) -> u64 {
            log_id.1
        }

        fn payload_size(payload: &Self::LogPayload) -> u64 {
            payload.len() as u64
        }
    }

    pub struct Log(raft_log::RaftLog<T>);

    impl Log {
        pub fn open(dir: &Path) -> io::Result<Self> {
            let mut config = raft_log::Config::new(dir.join("wal").display());
            config.wal.flush_batch_wait = Some(Duration::ZERO);
            config.wal.read_buffer_size = Some(1 << 20);
            config.wal.chunk_max_size = Some(64 << 20);
            config.log_cache_capacity = Some(16 << 20);
            std::fs::create_dir_all(&config.wal.dir)?;
            Ok(Log(raft_log::RaftLog::open(Arc::new(config))?))
        }
    }

    impl Store for Log {
        fn append_sync(&mut self, from: u64, n: u64, payload: &[u8]) -> io::Result<()> {
            self.0.append((from..from + n).map(|i| ((1, i), payload.to_vec())))?;
            let (tx, rx) = sync_channel(1);
            self.0.flush(true, Some(tx))?;
            rx.recv().map_err(err)?
        }

        fn last(&mut self) -> io::Result<Option<(u64, usize)>> {
            let Some(&(_, last)) = self.0.log_state().last() else { return Ok(None) };
            let (id, payload) = self.0.read(last, last + 1).next().ok_or_else(|| err("last entry missing"))??;
            Ok(Some((id.1, payload.len())))
        }
    }
}

/// `raft-engine` with one Raft group, compression off (the payloads are random) and its
/// defaults otherwise (128 MiB files, tail corruption tolerated, 4 recovery threads). Its
/// entries must be protobuf messages: a `BytesValue` holding the index, then the payload.
mod engine {
    use super::*;
    use protobuf::well_known_types::BytesValue;
    use raft_engine::{Config, Engine, LogBatch, MessageExt, ReadableSize};

    pub struct M;

    impl MessageExt for M {
        type Entry = BytesValue;

        fn index(e: &BytesValue) -> u64 {
            u64::from_le_bytes(e.value[..8].try_into().unwrap())
        }
    }

    pub struct Log(Engine);

    impl Log {
        pub fn open(dir: &Path) -> io::Result<Self> {
            let config = Config {
                dir: dir.join("engine").display().to_string(),
                batch_compression_threshold: ReadableSize(0),
                ..Config::default()
            };
            Ok(Log(Engine::open(config).map_err(err)?))
        }
    }

    impl Store for Log {
        fn append_sync(&mut self, from: u64, n: u64, payload: &[u8]) -> io::Result<()> {
            let entries: Vec<BytesValue> = (from..from + n)
                .map(|i| {
                    let mut value = Vec::with_capacity(8 + payload.len());
                    value.extend_from_slice(&i.to_le_bytes());
                    value.extend_from_slice(payload);
                    BytesValue { value, ..Default::default() }
                })
                .collect();
            let mut batch = LogBatch::default();
            batch.add_entries::<M>(1, &entries).map_err(err)?;
            self.0.write(&mut batch, true).map_err(err)?;
            Ok(())
        }

        fn last(&mut self) -> io::Result<Option<(u64, usize)>> {
            let Some(last) = self.0.last_index(1) else { return Ok(None) };
            let e = self.0.get_entry::<M>(1, last).map_err(err)?.ok_or_else(|| err("last entry missing"))?;
            Ok(Some((M::index(&e), e.value.len() - 8)))
        }
    }
}

fn payload(bytes: usize) -> Vec<u8> {
    let mut p = vec![0; bytes];
    rand::rng().fill_bytes(&mut p);
    p
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// One measurement in this process; prints `key=value` pairs on one line.
fn measure(store: &str, what: &str, dir: &Path) -> io::Result<String> {
    match what {
        "latency" => {
            let mut log = open(store, dir)?;
            let p = payload(ENTRY_BYTES);
            let mut took = Vec::with_capacity(LATENCY_ENTRIES as usize);
            for i in 1..=LATENCY_ENTRIES {
                let started = Instant::now();
                log.append_sync(i, 1, &p)?;
                took.push(started.elapsed());
            }
            took.sort();
            let mean = took.iter().sum::<Duration>() / took.len() as u32;
            Ok(format!(
                "mean_us={} p50_us={} p99_us={}",
                mean.as_micros(),
                percentile(&took, 0.5).as_micros(),
                percentile(&took, 0.99).as_micros()
            ))
        }
        "batch" => {
            let mut log = open(store, dir)?;
            let p = payload(ENTRY_BYTES);
            let started = Instant::now();
            for b in 0..BATCHES {
                log.append_sync(1 + b * BATCH_ENTRIES, BATCH_ENTRIES, &p)?;
            }
            let secs = started.elapsed().as_secs_f64();
            Ok(format!("entries_per_s={:.0}", (BATCHES * BATCH_ENTRIES) as f64 / secs))
        }
        "fill" => {
            let mut log = open(store, dir)?;
            let p = payload(RECOVER_ENTRY_BYTES);
            let n = RECOVER_LOG_BYTES / RECOVER_ENTRY_BYTES as u64;
            let started = Instant::now();
            let mut i = 1;
            while i <= n {
                log.append_sync(i, RECOVER_BATCH, &p)?;
                i += RECOVER_BATCH;
            }
            Ok(format!("fill_s={:.1}", started.elapsed().as_secs_f64()))
        }
        "recover" => {
            let started = Instant::now();
            let mut log = open(store, dir)?;
            let last = log.last()?;
            let took = started.elapsed();
            let expect = RECOVER_LOG_BYTES / RECOVER_ENTRY_BYTES as u64;
            if last != Some((expect, RECOVER_ENTRY_BYTES)) {
                return Err(err(format!("recovered last entry {last:?}, wrote {expect}")));
            }
            Ok(format!("recover_ms={} rss_mb={}", took.as_millis(), rss_mb()))
        }
        other => Err(err(format!("unknown measurement {other}"))),
    }
}

fn rss_mb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// Run one measurement in a child process and parse its `key=value` line.
fn child(store: &str, what: &str, dir: &Path) -> Vec<(String, f64)> {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["one", store, what])
        .arg(dir)
        .output()
        .expect("run the measurement");
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{store} {what} failed: {}", String::from_utf8_lossy(&out.stderr));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn all(rounds: usize, base: &Path) {
    use std::collections::BTreeMap;
    let mut results: BTreeMap<(&str, String), Vec<f64>> = BTreeMap::new();
    let fresh = |name: &str| -> PathBuf {
        let dir = base.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    for round in 0..rounds {
        // Alternate the order so no store always runs first (or right after another's writes).
        let mut order = STORES.to_vec();
        order.rotate_left(round % STORES.len());
        for store in &order {
            for what in ["latency", "batch"] {
                for (k, v) in child(store, what, &fresh(store)) {
                    results.entry((store, k)).or_default().push(v);
                }
            }
            eprintln!("round {} {store}: latency and batch done", round + 1);
        }
    }
    // Recovery once per store (1 GiB each): written, then reopened in `rounds` fresh processes.
    for store in STORES {
        let dir = fresh(store);
        for (k, v) in child(store, "fill", &dir) {
            results.entry((store, k)).or_default().push(v);
        }
        for _ in 0..rounds {
            for (k, v) in child(store, "recover", &dir) {
                results.entry((store, k)).or_default().push(v);
            }
        }
        eprintln!("{store}: recovery done");
        let _ = std::fs::remove_dir_all(&dir);
    }
    let get = |store: &str, k: &str| median(results[&(store, k.to_string())].clone());
    println!("Raft log stores, medians of {rounds} rounds ({ENTRY_BYTES} B entries; recovery of a 1 GiB log)");
    println!();
    println!("| store | 1-entry append+sync mean | p50 | p99 | {BATCH_ENTRIES}-entry batches, entries/s | write 1 GiB | recover 1 GiB | RSS after recovery |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for store in STORES {
        println!(
            "| {store} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} | {:.1} s | {:.0} ms | {:.0} MB |",
            get(store, "mean_us"),
            get(store, "p50_us"),
            get(store, "p99_us"),
            get(store, "entries_per_s"),
            get(store, "fill_s"),
            get(store, "recover_ms"),
            get(store, "rss_mb"),
        );
    }
    println!();
    let base_mean = get("redb", "mean_us");
    let base_batch = get("redb", "entries_per_s");
    let base_recover = get("redb", "recover_ms");
    for store in &STORES[1..] {
        println!(
            "{store} / redb: append+sync latency {:.2}x, batched throughput {:.2}x, recovery time {:.2}x",
            get(store, "mean_us") / base_mean,
            get(store, "entries_per_s") / base_batch,
            get(store, "recover_ms") / base_recover,
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["one", store, what, dir] => match measure(store, what, Path::new(dir)) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("{store} {what}: {e}");
                std::process::exit(1);
            }
        },
        ["all", rest @ ..] => {
            let rounds = rest.first().map_or(3, |r| r.parse().expect("ROUNDS is a number"));
            let base = rest.get(1).map_or_else(|| PathBuf::from("target/logstores-bench"), PathBuf::from);
            all(rounds, &base);
        }
        _ => {
            eprintln!("usage: logstores all [ROUNDS] [DIR]\n       logstores one STORE latency|batch|fill|recover DIR");
            std::process::exit(2);
        }
    }
}
