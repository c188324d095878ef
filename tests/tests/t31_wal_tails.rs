//! The Raft log's tail on a real cluster (ADR 0011): a member killed with -9 in the middle of a
//! write load, whose log's last record is then torn or corrupted at a random offset, comes
//! back, cuts the damage and converges; nothing acknowledged is lost.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use quorate_tests::load::Load;
use quorate_tests::{ranges_at_one_revision, Cluster, Flavor};

/// xorshift64: offsets that differ from run to run, printed seed to replay one.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The member's newest raft-engine file.
fn last_log_file(data_dir: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir.join("raft-engine"))
        .expect("the member's raft-engine directory")
        .map(|f| f.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "raftlog"))
        .collect();
    files.sort();
    files.pop().expect("a raft-engine file")
}

/// Damage the last record of a stopped member's log: raft-engine preallocates its files, so
/// the written part ends at the last non-zero byte; the last record is within the bytes before
/// it. Even rounds truncate the file there, odd rounds flip a byte.
fn damage_tail(data_dir: &Path, round: usize, rng: &mut Rng) -> String {
    let file = last_log_file(data_dir);
    let mut bytes = std::fs::read(&file).unwrap();
    let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    // A batch of a few puts under this load is a few hundred bytes.
    let from = end.saturating_sub(256);
    let at = from + (rng.next() as usize) % (end - from).max(1);
    if round.is_multiple_of(2) {
        bytes.truncate(at);
        std::fs::write(&file, &bytes).unwrap();
        format!("{} truncated at {at} (written part ended at {end})", file.display())
    } else {
        bytes[at] ^= 0x5a;
        std::fs::write(&file, &bytes).unwrap();
        format!("{} byte {at} flipped (written part ended at {end})", file.display())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_members_torn_or_corrupt_tail_is_cut_and_nothing_acknowledged_is_lost() {
    let mut cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let client = Client::connect(cluster.all_endpoints(), None).await.expect("connect");
    let load = Load::start(&client, 8, "tail");
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("damage offsets from seed {seed}");
    let mut rng = Rng(seed);
    for round in 0..4usize {
        // Followers and leaders alike: the member that goes is the leader every other round.
        let leader = cluster.wait_leader(Duration::from_secs(10)).expect("leader");
        let victim = if round.is_multiple_of(2) { (leader + 1) % 3 } else { leader };
        let before = load.acked();
        let deadline = Instant::now() + Duration::from_secs(20);
        while load.acked() < before + 200 {
            assert!(Instant::now() < deadline, "round {round}: the load stalled at {} acked", load.acked());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("round {round}: kill -9 {} during writes", cluster.nodes[victim].name);
        cluster.kill(victim);
        let what = damage_tail(&cluster.nodes[victim].data_dir, round, &mut rng);
        eprintln!("round {round}: {what}");
        cluster.spawn(victim).expect("restart");
        cluster.wait_ready(Duration::from_secs(30)).unwrap_or_else(|e| {
            panic!(
                "round {round}: {} did not come back after {what}: {e}\n{}",
                cluster.nodes[victim].name,
                cluster.log(victim)
            )
        });
    }
    let record = load.stop().await;
    eprintln!("{} acknowledged, {} failed or unknown", record.acked.len(), record.failures);

    let mut reader = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    let r = reader.get("tail/", Some(GetOptions::new().with_prefix())).await.expect("read back");
    let stored: std::collections::BTreeMap<String, String> =
        r.kvs().iter().map(|kv| (kv.key_str().unwrap().to_string(), kv.value_str().unwrap().to_string())).collect();
    let lost: Vec<&String> = record.acked.keys().filter(|k| stored.get(*k) != record.acked.get(*k)).collect();
    assert!(lost.is_empty(), "{} acknowledged writes lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);

    // Every member, the damaged ones included, holds the same keyspace at the same revision.
    let ranges = ranges_at_one_revision(&cluster).await;
    let (first_name, first) = &ranges[0];
    for (name, kvs) in &ranges[1..] {
        assert!(kvs == first, "{name} and {first_name} differ at the same revision");
    }
}
