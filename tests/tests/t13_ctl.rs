//! `quorate ctl status` and `quorate ctl doctor` run as an operator runs them (the built
//! binary, against a real multi-process cluster), after making each situation for real:
//! a fresh cluster, a member killed with SIGKILL, two of three killed, a member's disk slowed
//! with the fsync failpoint, and the backend quota filled.

use std::time::{Duration, Instant};

use etcd_client::Client;
use quorate_tests::{ctl, doctor_until, findings, http, Cluster, Flavor};
use serde_json::Value;

fn names(f: &Value) -> Vec<String> {
    f["members"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect()
}

#[test]
fn a_fresh_cluster_is_healthy_and_status_shows_every_member_side_by_side() {
    let cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let leader = cluster.wait_leader(Duration::from_secs(20)).expect("leader");
    // One endpoint is enough: the member list names the others.
    let one = cluster.nodes[0].endpoint();

    eprintln!("doctor on a fresh cluster: healthy, exit 0");
    let (_, report) = doctor_until(&one, "healthy", |run, r| run.code == 0 && r["verdict"] == "healthy");
    assert!(report["findings"].as_array().unwrap().is_empty(), "{report:#}");
    let text = ctl(&one, &["doctor"]);
    assert_eq!(text.stdout.lines().next(), Some("verdict: healthy"), "{}", text.stdout);
    assert_eq!(text.code, 0);

    eprintln!("status -w json: every member, one leader, one hash");
    let run = ctl(&one, &["status", "-w", "json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let view = run.json();
    let members = view["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{view:#}");
    let leader_name = &cluster.nodes[leader].name;
    let leader_id = members.iter().find(|m| &m["name"] == leader_name).expect("leader listed")["id"].clone();
    for m in members {
        let name = m["name"].as_str().unwrap();
        assert!(cluster.nodes.iter().any(|n| n.name == name && m["endpoint"] == n.endpoint().as_str()), "{m:#}");
        assert_eq!(m["reachable"], true, "{m:#}");
        assert_eq!(m["leader"], leader_id, "{name} follows the leader: {m:#}");
        assert_eq!(m["role"], if name == leader_name { "leader" } else { "follower" }, "{m:#}");
        assert_eq!(m["term"], members[0]["term"], "one term: {view:#}");
        assert_eq!(m["hash"], members[0]["hash"], "one state hash: {view:#}");
        assert!(m["hash"].is_u64() && m["revision"].as_i64().unwrap() >= 1, "{m:#}");
        assert!(m["applied_index"].as_u64().unwrap() >= 1, "{m:#}");
        assert!(m["db_size_bytes"].as_i64().unwrap() > 0, "{m:#}");
        // Same host: the offset is within its error bound plus scheduling noise.
        let offset = m["clock_offset_ms"].as_i64().expect("clock offset measured");
        let err = m["clock_offset_error_ms"].as_i64().unwrap();
        assert!(offset.abs() <= err + 50, "same clock: offset {offset} ms ± {err}");
        assert!(m["fsync_p99_ms"].is_number(), "{m:#}");
        assert!(m["version"].is_string(), "{m:#}");
    }
    let table = ctl(&one, &["status"]);
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert!(lines[0].starts_with("NAME") && lines[0].contains("CLOCK OFFSET"), "{}", table.stdout);
    for n in &cluster.nodes {
        assert!(lines.iter().any(|l| l.starts_with(&n.name) && l.contains("yes")), "{} in {}", n.name, table.stdout);
    }
}

#[test]
fn a_killed_member_is_down_and_the_cluster_degraded() {
    let mut cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let leader = cluster.wait_leader(Duration::from_secs(20)).expect("leader");
    let victim = (leader + 1) % 3;
    let all = cluster.all_endpoints().join(",");
    let victim_name = cluster.nodes[victim].name.clone();

    eprintln!("kill -9 {victim_name} (a follower)");
    cluster.kill(victim);
    let (_, report) = doctor_until(&all, "degraded", |run, r| run.code == 1 && r["verdict"] == "degraded");
    let down = findings(&report, "member-down");
    assert_eq!(down.len(), 1, "{report:#}");
    assert_eq!(names(down[0]), vec![victim_name.clone()], "{report:#}");
    assert_eq!(down[0]["severity"], "degraded");
    assert!(down[0]["evidence"].as_str().unwrap().contains("2/3 voters answer"), "{report:#}");
    assert!(
        down[0]["fix"].as_array().unwrap().iter().any(|s| s.as_str().unwrap().contains("member remove")),
        "{report:#}"
    );
    assert!(findings(&report, "quorum-lost").is_empty(), "{report:#}");

    eprintln!("status still shows the killed member, unreachable");
    let view = ctl(&all, &["status", "-w", "json"]).json();
    let row = view["members"].as_array().unwrap().iter().find(|m| m["name"] == victim_name.as_str()).cloned();
    assert_eq!(row.expect("killed member listed")["reachable"], false, "{view:#}");
    let text = ctl(&all, &["doctor"]);
    assert_eq!(text.code, 1);
    assert_eq!(text.stdout.lines().next(), Some("verdict: degraded"), "{}", text.stdout);
}

#[test]
fn two_of_three_killed_is_quorum_lost_and_critical() {
    let mut cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let leader = cluster.wait_leader(Duration::from_secs(20)).expect("leader");
    let all = cluster.all_endpoints().join(",");
    // The two followers: the survivor is the old leader, which may still call itself leader.
    let (a, b) = ((leader + 1) % 3, (leader + 2) % 3);

    eprintln!("kill -9 both followers");
    cluster.kill(a);
    cluster.kill(b);
    let (run, report) = doctor_until(&all, "critical", |run, r| run.code == 2 && r["verdict"] == "critical");
    let lost = findings(&report, "quorum-lost");
    assert_eq!(lost.len(), 1, "{report:#}");
    assert_eq!(lost[0]["severity"], "critical");
    let mut lost_names = names(lost[0]);
    lost_names.sort();
    let mut killed = vec![cluster.nodes[a].name.clone(), cluster.nodes[b].name.clone()];
    killed.sort();
    assert_eq!(lost_names, killed, "{report:#}");
    assert!(lost[0]["evidence"].as_str().unwrap().contains("1/3 voters answer"), "{report:#}");
    assert_eq!(findings(&report, "member-down").len(), 2, "{report:#}");
    assert_eq!(run.code, 2);
}

#[test]
fn a_slowed_disk_is_reported_with_its_fsync_p99() {
    let cluster = Cluster::start_with(Flavor::Quorate, 3, &["--drill-failpoints"]).expect("cluster");
    let leader = cluster.wait_leader(Duration::from_secs(20)).expect("leader");
    let slow = (leader + 1) % 3;
    let all = cluster.all_endpoints().join(",");
    let slow_name = cluster.nodes[slow].name.clone();

    eprintln!("hold every log fsync on {slow_name} for 800 ms, then write");
    let set = http(&cluster.nodes[slow], "PUT", "/debug/failpoints/fsync-delay-ms", Some("800")).unwrap();
    assert_eq!(set.status, 200, "{}", set.body);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = Client::connect([cluster.nodes[leader].endpoint()], None).await.unwrap();
        for i in 0..10 {
            c.put(format!("slow/{i}"), "v", None).await.expect("put commits on the other two");
        }
    });
    let (_, report) = doctor_until(&all, "slow-disk", |_, r| !findings(r, "slow-disk").is_empty());
    assert_eq!(report["verdict"], "degraded", "{report:#}");
    let slow_disk = findings(&report, "slow-disk");
    assert_eq!(slow_disk.len(), 1, "only the slowed member: {report:#}");
    assert_eq!(names(slow_disk[0]), vec![slow_name], "{report:#}");
    assert!(slow_disk[0]["evidence"].as_str().unwrap().contains("fsync p99"), "{report:#}");
    http(&cluster.nodes[slow], "PUT", "/debug/failpoints/fsync-delay-ms", Some("0")).unwrap();
}

#[test]
fn a_full_quota_raises_alarm_nospace_and_is_critical() {
    let cluster = Cluster::start_with(Flavor::Quorate, 3, &["--quota-backend-bytes", "200000"]).expect("cluster");
    cluster.wait_leader(Duration::from_secs(20)).expect("leader");
    let all = cluster.all_endpoints().join(",");

    eprintln!("fill the 200 kB quota until writes are refused");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let refused = rt.block_on(async {
        let mut c = Client::connect(cluster.all_endpoints(), None).await.unwrap();
        for i in 0..400 {
            if c.put(format!("big/{i}"), vec![b'x'; 1024], None).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    });
    assert!(refused, "writes past the quota are refused");
    let (run, report) = doctor_until(&all, "alarm-nospace", |_, r| !findings(r, "alarm-nospace").is_empty());
    assert_eq!(run.code, 2, "{report:#}");
    assert_eq!(report["verdict"], "critical");
    let alarm = findings(&report, "alarm-nospace")[0];
    assert!(!names(alarm).is_empty(), "{report:#}");
    assert!(
        alarm["fix"].as_array().unwrap().iter().any(|s| s.as_str().unwrap().contains("alarm disarm")),
        "{report:#}"
    );
}

/// libfaketime, as Debian's `faketime` package installs it.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[test]
fn a_member_with_an_offset_wall_clock_is_reported_as_clock_skew() {
    if !std::path::Path::new(LIBFAKETIME).exists() {
        panic!("{LIBFAKETIME} missing: apt-get install faketime");
    }
    let mut cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let leader = cluster.wait_leader(Duration::from_secs(20)).expect("leader");
    let skewed = (leader + 1) % 3;
    let skewed_name = cluster.nodes[skewed].name.clone();
    let all = cluster.all_endpoints().join(",");

    eprintln!("restart {skewed_name} with its wall clock 30 s ahead (monotonic clock untouched)");
    cluster.stop(skewed);
    cluster.nodes[skewed].env = vec![
        ("LD_PRELOAD".into(), LIBFAKETIME.into()),
        ("FAKETIME".into(), "+30s".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ];
    cluster.spawn(skewed).expect("respawn under faketime");
    let (run, report) = doctor_until(&all, "clock-skew", |_, r| !findings(r, "clock-skew").is_empty());
    assert_eq!(run.code, 1, "{report:#}");
    let skew = findings(&report, "clock-skew");
    assert_eq!(skew.len(), 1, "only the offset member: {report:#}");
    assert_eq!(names(skew[0]), vec![skewed_name.clone()], "{report:#}");

    let view = ctl(&all, &["status", "-w", "json"]).json();
    let row = view["members"].as_array().unwrap().iter().find(|m| m["name"] == skewed_name.as_str()).cloned().unwrap();
    let offset = row["clock_offset_ms"].as_i64().expect("offset measured");
    let err = row["clock_offset_error_ms"].as_i64().unwrap();
    assert!((offset - 30_000).abs() <= err + 1000, "offset {offset} ms ± {err}, expected about +30000: {row:#}");
}

#[test]
fn a_zone_gone_quiet_is_reported_as_brake_engaged() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const SVC: &str = "/api/v1/ns/default/services/api/instances";
    const PER_ZONE: usize = 10;
    let cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    cluster.wait_leader(Duration::from_secs(20)).expect("leader");
    let all = cluster.all_endpoints().join(",");
    let body = |zone: &str, i: usize| {
        format!(r#"{{"address":"10.0.{i}.1","port":80,"zone":"{zone}","ttl_s":3,"heartbeat_interval_s":1}}"#)
    };
    for zone in ["a", "b"] {
        for i in 0..PER_ZONE {
            let r = http(&cluster.nodes[0], "PUT", &format!("{SVC}/{zone}{i}"), Some(&body(zone, i))).unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
        }
    }
    let zone_a_quiet = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let port = cluster.nodes[0].http_port;
    let beats = {
        let (zone_a_quiet, stop) = (zone_a_quiet.clone(), stop.clone());
        std::thread::spawn(move || {
            let node = quorate_tests::Node::detached(port);
            while !stop.load(Ordering::Relaxed) {
                for zone in ["a", "b"] {
                    if zone == "a" && zone_a_quiet.load(Ordering::Relaxed) {
                        continue;
                    }
                    for i in 0..PER_ZONE {
                        let _ = http(&node, "PUT", &format!("{SVC}/{zone}{i}/heartbeat"), None);
                    }
                }
                std::thread::sleep(Duration::from_millis(700));
            }
        })
    };
    eprintln!("heartbeats from both zones, past the leader's takeover hold");
    std::thread::sleep(Duration::from_secs(5));
    let (run, _) = doctor_until(&all, "healthy", |run, r| run.code == 0 && r["verdict"] == "healthy");
    assert_eq!(run.code, 0);

    eprintln!("zone a goes quiet");
    zone_a_quiet.store(true, Ordering::Relaxed);
    let (run, report) = doctor_until(&all, "brake-engaged", |_, r| !findings(r, "brake-engaged").is_empty());
    stop.store(true, Ordering::Relaxed);
    beats.join().unwrap();
    assert_eq!(run.code, 1, "{report:#}");
    let brake = findings(&report, "brake-engaged");
    assert_eq!(brake.len(), 1, "only zone a: {report:#}");
    assert!(brake[0]["evidence"].as_str().unwrap().contains("zone \"a\""), "{report:#}");
}

#[test]
fn a_follower_whose_disk_holds_it_back_is_reported_lagging() {
    let cluster = Cluster::start_with(Flavor::Quorate, 3, &["--drill-failpoints"]).expect("cluster");
    let leader = cluster.wait_leader(Duration::from_secs(20)).expect("leader");
    let slow = (leader + 1) % 3;
    let slow_name = cluster.nodes[slow].name.clone();
    let all = cluster.all_endpoints().join(",");

    eprintln!("hold every log fsync on {slow_name} for 5 s while 16 writers put through the leader");
    let set = http(&cluster.nodes[slow], "PUT", "/debug/failpoints/fsync-delay-ms", Some("5000")).unwrap();
    assert_eq!(set.status, 200, "{}", set.body);
    let load = Load::start(cluster.nodes[leader].endpoint());
    let (run, report) = doctor_until(&all, "member-lagging", |_, r| !findings(r, "member-lagging").is_empty());
    load.stop();
    http(&cluster.nodes[slow], "PUT", "/debug/failpoints/fsync-delay-ms", Some("0")).unwrap();
    assert_eq!(run.code, 1, "{report:#}");
    let lagging = findings(&report, "member-lagging");
    assert_eq!(lagging.len(), 1, "only the held member: {report:#}");
    assert_eq!(names(lagging[0]), vec![slow_name], "{report:#}");
    eprintln!("doctor: {}", lagging[0]["evidence"]);
    assert!(lagging[0]["evidence"].as_str().unwrap().contains("entries behind"), "{report:#}");
}

/// 16 writers putting through one endpoint on their own thread, until stopped.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Load {
    fn start(endpoint: String) -> Load {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Runtime::new().unwrap();
                rt.block_on(async {
                    let c = Client::connect([endpoint], None).await.unwrap();
                    let writers: Vec<_> = (0..16)
                        .map(|w| {
                            let (mut c, stop) = (c.clone(), stop.clone());
                            tokio::spawn(async move {
                                let mut i = 0u64;
                                while !stop.load(Ordering::Relaxed) {
                                    let _ = c.put(format!("load/{w}/{}", i % 100), "v", None).await;
                                    i += 1;
                                }
                            })
                        })
                        .collect();
                    for w in writers {
                        let _ = w.await;
                    }
                })
            })
        };
        Load { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap();
    }
}

#[test]
fn a_learner_whose_disk_holds_it_back_is_reported_behind() {
    let mut cluster = Cluster::start_with(Flavor::Quorate, 3, &["--drill-failpoints"]).expect("cluster");
    let leader = cluster.wait_leader(Duration::from_secs(20)).expect("leader");
    let all = cluster.all_endpoints().join(",");

    let new = cluster.new_node();
    let name = cluster.nodes[new].name.clone();
    eprintln!("add {name} as a learner and start it");
    let peer = format!("--peer-urls={}", cluster.nodes[new].peer_url());
    let added = quorate_tests::etcdctl(&all, &["member", "add", &name, "--learner", &peer]);
    assert!(added.ok, "{}", added.stderr);
    cluster.join(new).expect("start the learner");
    let (_, report) = doctor_until(&all, "the learner answers", |run, r| {
        let view = ctl(&all, &["status", "-w", "json"]).json();
        let learner_up = view["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == name.as_str() && m["reachable"] == true && m["role"] == "learner");
        learner_up && run.code == 0 && r["verdict"] == "healthy"
    });
    assert!(report["findings"].as_array().unwrap().is_empty(), "{report:#}");

    eprintln!("hold every log fsync on the learner for 5 s while 16 writers put through the leader");
    let set = http(&cluster.nodes[new], "PUT", "/debug/failpoints/fsync-delay-ms", Some("5000")).unwrap();
    assert_eq!(set.status, 200, "{}", set.body);
    let load = Load::start(cluster.nodes[leader].endpoint());
    let (run, report) = doctor_until(&all, "learner-behind", |_, r| !findings(r, "learner-behind").is_empty());
    load.stop();
    http(&cluster.nodes[new], "PUT", "/debug/failpoints/fsync-delay-ms", Some("0")).unwrap();
    assert_eq!(run.code, 1, "{report:#}");
    let behind = findings(&report, "learner-behind");
    assert_eq!(names(behind[0]), vec![name], "{report:#}");
    assert!(findings(&report, "member-lagging").is_empty(), "a learner is not a lagging voter: {report:#}");
}

#[test]
fn a_paused_member_is_down_within_the_command_timeout_and_back_once_resumed() {
    let cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let leader = cluster.wait_leader(Duration::from_secs(20)).expect("leader");
    let paused = (leader + 1) % 3;
    let paused_name = cluster.nodes[paused].name.clone();
    // The paused member first: the member list must come from the next endpoint.
    let mut eps = vec![cluster.nodes[paused].endpoint()];
    eps.extend(cluster.nodes.iter().enumerate().filter(|(i, _)| *i != paused).map(|(_, n)| n.endpoint()));
    let eps = eps.join(",");

    eprintln!("SIGSTOP {paused_name}: it accepts connections but answers nothing");
    cluster.signal(paused, "STOP");
    let started = Instant::now();
    let run = ctl(&eps, &["--dial-timeout", "1s", "--command-timeout", "1s", "doctor", "-w", "json"]);
    let took = started.elapsed();
    cluster.signal(paused, "CONT");
    let report = run.json();
    assert_eq!(run.code, 1, "{report:#}");
    let down = findings(&report, "member-down");
    assert_eq!(down.len(), 1, "{report:#}");
    assert_eq!(names(down[0]), vec![paused_name.clone()], "{report:#}");
    // Member list (one timeout on the paused member), Status and HashKV in parallel: a few
    // timeouts, not one per request to a silent member.
    assert!(took < Duration::from_secs(8), "doctor took {took:?} with a paused member");

    eprintln!("SIGCONT: it answers again and the cluster has its quorum and leader");
    // A log commit that spanned the pause may show as slow-disk for a minute: that commit did
    // take that long, as the member saw it.
    let (_, report) = doctor_until(&eps, "the paused member back", |_, r| {
        r["findings"].as_array().unwrap().iter().all(|f| f["code"] == "slow-disk")
    });
    for f in findings(&report, "slow-disk") {
        assert_eq!(names(f), vec![paused_name.clone()], "only the paused member's commits: {report:#}");
    }
}
