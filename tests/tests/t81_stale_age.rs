//! `X-Quorate-Stale-Age-Ms` says how old a stale answer's data may be (issue 11, section 3).
//! A follower whose log fsyncs are held (the drill failpoint) falls behind in applying while
//! it still hears from the leader every second. Writes go to the leader; stale reads go to the
//! follower. Each stale answer's revision tells which acknowledged write it had not seen yet,
//! so the test knows a lower bound on how old the data was: the age the member reports must
//! never be below it. Counting from the member's last contact with the leader (what it did
//! before) says "fresh" while the data is seconds behind.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::Client;
use quorate_tests::{http, Cluster, Flavor};

const FSYNC_HOLD_MS: u64 = 1500;
const SVC: &str = "/api/v1/ns/default/services/web/instances";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_age_is_never_below_how_old_the_data_is() {
    let c = Cluster::start_with(Flavor::Quorate, 3, &["--drill-failpoints"]).expect("cluster");
    let leader = c.wait_leader(Duration::from_secs(5)).unwrap();
    let follower = (leader + 1) % 3;
    let r = http(
        &c.nodes[leader],
        "PUT",
        &format!("{SVC}/web-1"),
        Some(r#"{"address":"10.0.0.1","port":80,"kind":"persistent"}"#),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    tokio::time::sleep(Duration::from_secs(2)).await;

    eprintln!("hold every log fsync on {} for {FSYNC_HOLD_MS} ms", c.nodes[follower].name);
    let set =
        http(&c.nodes[follower], "PUT", "/debug/failpoints/fsync-delay-ms", Some(&FSYNC_HOLD_MS.to_string())).unwrap();
    assert_eq!(set.status, 200, "failpoint refused: {}", set.body);

    eprintln!("write through the leader for 8 s, recording when each revision was acknowledged");
    let acks: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
    let writer = {
        let acks = acks.clone();
        let endpoint = c.nodes[leader].endpoint();
        tokio::spawn(async move {
            let mut client = Client::connect([endpoint], None).await.unwrap();
            let until = Instant::now() + Duration::from_secs(8);
            let mut n = 0u64;
            while Instant::now() < until {
                if let Ok(r) = client.put(format!("stale/{}", n % 16), n.to_string(), None).await {
                    let rev = r.header().unwrap().revision();
                    acks.lock().unwrap().push((rev, Instant::now()));
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    eprintln!("stale reads on the follower: the age it reports against what it had missed");
    let mut worst_missed = Duration::ZERO;
    let mut reads = 0;
    let mut unknown = 0;
    while !writer.is_finished() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let sent = Instant::now();
        let port = c.nodes[follower].http_port;
        let r = quorate_tests::http_async(port, "GET", &format!("{SVC}?stale"), None).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-quorate-stale"), Some("true"));
        let revision: i64 = r.header("x-quorate-revision").unwrap().parse().unwrap();
        let age = r.header("x-quorate-stale-age-ms").unwrap().to_string();
        // The first acknowledged write this answer had not seen: the leader had committed it
        // when its answer arrived, so the data was at least that old when it was served.
        let missed = acks.lock().unwrap().iter().find(|(rev, _)| *rev > revision).map(|(_, at)| *at);
        let Some(missed_at) = missed.filter(|at| *at <= sent) else { continue };
        let behind = sent.duration_since(missed_at);
        worst_missed = worst_missed.max(behind);
        reads += 1;
        if age == "unknown" {
            unknown += 1;
            continue;
        }
        let age_ms: u64 = age.parse().unwrap();
        assert!(
            age_ms + 5 >= behind.as_millis() as u64,
            "stale age {age_ms} ms, but the data (revision {revision}) had missed a write acknowledged {behind:?} earlier"
        );
    }
    writer.await.unwrap();
    let cleared = http(&c.nodes[follower], "PUT", "/debug/failpoints/fsync-delay-ms", Some("0")).unwrap();
    assert_eq!(cleared.status, 200, "{}", cleared.body);
    eprintln!("{reads} behind reads ({unknown} of them 'unknown'); the follower was up to {worst_missed:?} behind");
    // The follower was caught up before the writes began, and its freshness is tracked as it
    // applies (not only when a read asks), so it always knows how old its data is.
    assert!(reads > 0, "no read was behind");
    assert_eq!(unknown, 0, "answers that said 'unknown' although the follower had been caught up");
    assert!(worst_missed >= Duration::from_millis(1000), "the follower never fell behind: the test made no weather");
}
