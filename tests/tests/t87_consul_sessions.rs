//! Consul sessions keep Consul's contract (issue 11, section 6), on a real 3-member cluster:
//!
//! - an unrenewed session is invalidated no earlier than twice its TTL (Consul's
//!   `SessionTTLMultiplier`; HA managers ask for half the TTL they need): a 10 s session still
//!   exists, and still holds its lock, 15 s after it was created, and is gone (with the key
//!   it held, `Behavior: delete`) eventually after 20 s;
//! - `session/renew` answers an array with the session and the TTL as it was asked;
//! - a blocking query with a fractional wait (`wait=1.98s`, a Go duration) is served and
//!   waits; a refused blocking query gets a JSON 400 and is not answered at once, so a
//!   client that retries without backoff cannot hot-loop;
//! - a TTL that cannot be a duration (`99999999999999999999h`) gets a JSON 400, and every
//!   member keeps serving;
//! - locks keep Consul's behaviors: when a session ends, `release` (the default) keeps the key
//!   and frees it, `delete` deletes it; either way the lock cannot be taken again for the
//!   session's `LockDelay`, on any member, while an explicit `?release` frees it at once.

use std::time::{Duration, Instant};

use quorate_tests::{http, Cluster, Flavor, HttpReply};

const SESSION_TTL: Duration = Duration::from_secs(10);

fn assert_json_error(r: &HttpReply, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.body);
    let v: serde_json::Value =
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {}", r.body));
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {}", r.body);
}

fn create_session(c: &Cluster, n: usize, body: &str) -> String {
    let r = http(&c.nodes[n], "PUT", "/v1/session/create", Some(body)).unwrap();
    assert_eq!(r.status, 200, "session create {body}: {}", r.body);
    r.json()["ID"].as_str().unwrap().to_string()
}

/// The session as member `n` reports it (`session/info`), if it exists.
fn session_info(c: &Cluster, n: usize, id: &str) -> Option<serde_json::Value> {
    let r = http(&c.nodes[n], "GET", &format!("/v1/session/info/{id}"), None).unwrap();
    assert_eq!(r.status, 200, "session info: {}", r.body);
    r.json().as_array().unwrap().first().cloned()
}

fn consul_index(r: &HttpReply) -> u64 {
    r.header("x-consul-index").and_then(|i| i.parse().ok()).expect("X-Consul-Index")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrenewed_session_lives_until_twice_its_ttl() {
    let c = Cluster::start(Flavor::Quorate, 3).expect("cluster");

    eprintln!("create an unrenewed 10 s session that holds a lock (behavior delete)");
    let held = create_session(&c, 0, r#"{"Name":"ha-leader","TTL":"10s","Behavior":"delete","LockDelay":"5s"}"#);
    let successor = create_session(&c, 2, r#"{"Name":"replica","TTL":"30s","LockDelay":"0s"}"#);
    let created = Instant::now();
    let r = http(&c.nodes[1], "PUT", &format!("/v1/kv/service/ha/leader?acquire={held}"), Some("primary-1")).unwrap();
    assert_eq!((r.status, r.body.trim()), (200, "true"), "acquire");
    let info = session_info(&c, 2, &held).expect("the session exists on every member");
    assert_eq!(info["TTL"], "10s", "the session reports the TTL as asked: {info}");
    assert_eq!(info["Behavior"], "delete");

    eprintln!("session/renew answers an array with the session and its TTL as asked");
    let renewed = create_session(&c, 1, r#"{"ttl":"10.5s"}"#);
    let r = http(&c.nodes[2], "PUT", &format!("/v1/session/renew/{renewed}"), None).unwrap();
    assert_eq!(r.status, 200, "renew: {}", r.body);
    let list = r.json();
    let list = list.as_array().expect("renew answers an array");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["ID"], renewed.as_str());
    assert_eq!(list[0]["TTL"], "10.5s", "renew reports the TTL as asked: {:?}", list[0]);
    assert_eq!(list[0]["Behavior"], "release", "Consul's default behavior");
    let r = http(&c.nodes[0], "PUT", "/v1/session/renew/0badcafe-0000-0001-8000-000000000000", None).unwrap();
    assert_json_error(&r, 404, "renew of an unknown session");
    assert_eq!(http(&c.nodes[0], "PUT", &format!("/v1/session/destroy/{renewed}"), None).unwrap().status, 200);

    eprintln!("the unrenewed 10 s session still exists and holds its lock at 1.5x its TTL");
    let at = created + SESSION_TTL * 3 / 2;
    tokio::time::sleep(at.saturating_duration_since(Instant::now())).await;
    for n in 0..3 {
        let info = session_info(&c, n, &held);
        assert!(
            info.is_some(),
            "m{}: the session is gone {:?} after creation (before 2x TTL)",
            n + 1,
            created.elapsed()
        );
    }
    let r = http(&c.nodes[0], "GET", "/v1/kv/service/ha/leader", None).unwrap();
    assert_eq!(r.status, 200, "the lock's key: {}", r.body);
    assert_eq!(r.json()[0]["Session"], held.as_str(), "still held by the session");
    let checked_at = created.elapsed();

    eprintln!("and it is gone eventually after 2x its TTL, with the key it held");
    let deadline = created + SESSION_TTL * 2 + Duration::from_secs(20);
    let mut last_present = Instant::now();
    let gone_after = loop {
        if session_info(&c, 0, &held).is_none() {
            break created.elapsed();
        }
        last_present = Instant::now();
        assert!(Instant::now() < deadline, "the session outlived 2x its TTL + 20 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("  present at {checked_at:?}, gone at {gone_after:?} after creation (TTL 10 s)");
    assert!(gone_after >= SESSION_TTL * 3 / 2);
    // The session ended after `last_present`, so its 5 s lock delay lasts at least until
    // `last_present + 5 s` on the member that answered.
    let took = acquire(&c, 0, "service/ha/leader", &successor, "replica");
    let within = last_present.elapsed();
    if within < Duration::from_secs(5) {
        assert!(!took, "the lock of a session invalidated by its TTL was re-acquired within its lock delay");
    }
    eprintln!("  acquisition {within:?} after the session was last seen: {}", if took { "granted" } else { "refused" });
    for n in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while session_info(&c, n, &held).is_some() {
            assert!(Instant::now() < deadline, "m{} still lists the session", n + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let r = http(&c.nodes[2], "GET", "/v1/kv/service/ha/leader", None).unwrap();
    assert_eq!(r.status, 404, "the held key went with its session (behavior delete): {}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_are_gos_and_refusals_are_json() {
    let c = Cluster::start(Flavor::Quorate, 3).expect("cluster");

    eprintln!("durations that are not durations, or out of Consul's bounds: JSON 400, never a panic");
    for (path, body) in [
        ("/v1/session/create", r#"{"TTL":"99999999999999999999h"}"#),
        ("/v1/session/create", r#"{"TTL":"9s"}"#),
        ("/v1/session/create", r#"{"TTL":"24h0m1s"}"#),
        ("/v1/session/create", r#"{"TTL":"10"}"#),
        ("/v1/session/create", r#"{"TTL":"10s","LockDelay":"61s"}"#),
        ("/v1/session/create", r#"{"TTL":"10s","Behavior":"explode"}"#),
        ("/v1/agent/service/register", r#"{"Name":"db","Check":{"TTL":"99999999999999999999h"}}"#),
        ("/v1/agent/service/register", r#"{"Name":"db","Check":{"HTTP":"http://127.0.0.1:1/","Interval":"1d"}}"#),
    ] {
        for n in 0..3 {
            let r = http(&c.nodes[n], "PUT", path, Some(body)).unwrap();
            assert_json_error(&r, 400, &format!("m{} {path} {body}", n + 1));
        }
    }
    for n in 0..3 {
        assert_eq!(http(&c.nodes[n], "GET", "/v1/status/leader", None).unwrap().status, 200, "m{} serves", n + 1);
    }

    eprintln!("a blocking query with a fractional wait is served after that wait");
    let r = http(&c.nodes[1], "GET", "/v1/catalog/services", None).unwrap();
    let index = consul_index(&r);
    for wait in ["1.98s", "1500ms", "0.025m"] {
        let started = Instant::now();
        let r = http(&c.nodes[1], "GET", &format!("/v1/catalog/services?index={index}&wait={wait}"), None).unwrap();
        let took = started.elapsed();
        assert_eq!(r.status, 200, "wait={wait}: {}", r.body);
        assert!(took >= Duration::from_millis(1400), "wait={wait} answered after {took:?}: it did not block");
        assert!(took < Duration::from_secs(20), "wait={wait} answered after {took:?}");
    }

    eprintln!("a refused blocking query: JSON 400, and not answered at once");
    for query in ["wait=5x", "wait=99999999999999999999h", "wait=-", "index=abc&wait=1s"] {
        let path = if query.starts_with("index=") {
            format!("/v1/health/service/web?{query}")
        } else {
            format!("/v1/health/service/web?index={index}&{query}")
        };
        let started = Instant::now();
        let r = http(&c.nodes[2], "GET", &path, None).unwrap();
        let took = started.elapsed();
        assert_json_error(&r, 400, &path);
        assert!(took >= Duration::from_millis(900), "{path} refused after {took:?}: a retry loop would be hot");
    }
    // A client that retries a refused blocking query without any backoff, for 3 s.
    let bad = format!("/v1/health/service/web?index={index}&wait=9.98q");
    let started = Instant::now();
    let mut refusals = 0;
    while started.elapsed() < Duration::from_secs(3) {
        assert_eq!(http(&c.nodes[0], "GET", &bad, None).unwrap().status, 400);
        refusals += 1;
    }
    eprintln!("  {refusals} refusals in {:?} for a client retrying without backoff", started.elapsed());
    assert!(refusals <= 4, "{refusals} refusals in 3 s");
}

/// `PUT /v1/kv/<key>?acquire=<session>` on member `n`: whether it took the lock.
fn acquire(c: &Cluster, n: usize, key: &str, session: &str, value: &str) -> bool {
    let r = http(&c.nodes[n], "PUT", &format!("/v1/kv/{key}?acquire={session}"), Some(value)).unwrap();
    assert_eq!(r.status, 200, "acquire {key} on m{}: {}", n + 1, r.body);
    match r.body.trim() {
        "true" => true,
        "false" => false,
        other => panic!("acquire answered {other:?}"),
    }
}

/// The key as member `n` shows it, if it exists.
fn kv_entry(c: &Cluster, n: usize, key: &str) -> Option<serde_json::Value> {
    let r = http(&c.nodes[n], "GET", &format!("/v1/kv/{key}"), None).unwrap();
    match r.status {
        404 => None,
        200 => Some(r.json()[0].clone()),
        s => panic!("GET {key}: {s} {}", r.body),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_keep_consuls_behaviors_and_lock_delay() {
    let c = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    const LOCK_DELAY: Duration = Duration::from_secs(5);

    eprintln!("a session with the default behavior (release) and a 5 s lock delay takes a lock");
    let first = create_session(&c, 0, r#"{"Name":"first","TTL":"30s","LockDelay":"5s"}"#);
    let second = create_session(&c, 1, r#"{"name":"second","ttl":"30s","lockdelay":"0s"}"#);
    let info = session_info(&c, 2, &first).expect("session");
    assert_eq!(info["Behavior"], "release", "Consul's default: {info}");
    assert_eq!(info["LockDelay"], 5_000_000_000u64, "LockDelay in nanoseconds, as Consul reports it: {info}");
    assert!(acquire(&c, 0, "app/leader", &first, "first"));
    assert!(!acquire(&c, 2, "app/leader", &second, "second"), "a held lock is not granted to another session");
    let e = kv_entry(&c, 1, "app/leader").expect("key");
    assert_eq!((e["Session"].as_str(), e["LockIndex"].as_u64()), (Some(first.as_str()), Some(1)), "{e}");

    eprintln!("its session ends: the key stays, unlocked, and waits out the lock delay on every member");
    let r = http(&c.nodes[0], "GET", "/v1/kv/app/leader", None).unwrap();
    let watch_path = format!("/v1/kv/app/leader?index={}&wait=30s", consul_index(&r));
    let port = c.nodes[0].http_port;
    let watcher = tokio::spawn(async move {
        let started = Instant::now();
        (quorate_tests::http_async(port, "GET", &watch_path, None).await.unwrap(), started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let destroy_sent = Instant::now();
    assert_eq!(http(&c.nodes[1], "PUT", &format!("/v1/session/destroy/{first}"), None).unwrap().status, 200);
    let e = kv_entry(&c, 2, "app/leader").expect("behavior release keeps the key");
    assert!(e.get("Session").is_none(), "released: {e}");
    assert_eq!(e["Value"], "Zmlyc3Q=", "the value stays: {e}");
    let (woke, waited) = watcher.await.unwrap();
    assert_eq!(woke.status, 200, "{}", woke.body);
    assert!(woke.json()[0].get("Session").is_none(), "the blocking read woke on the release: {}", woke.body);
    assert!(waited < Duration::from_secs(25), "the blocking read waited out its wait ({waited:?}) instead of waking");
    let mut conclusive = 0;
    for n in [0, 1, 2, 0, 1, 2] {
        let took = acquire(&c, n, "app/leader", &second, "second");
        if destroy_sent.elapsed() < LOCK_DELAY {
            assert!(!took, "m{}: the lock was granted {:?} after its session ended", n + 1, destroy_sent.elapsed());
            conclusive += 1;
        }
    }
    assert!(conclusive > 0, "no acquisition was answered within the lock delay: the machine is too slow for this test");
    let deadline = destroy_sent + LOCK_DELAY + Duration::from_secs(15);
    let granted_after = loop {
        if acquire(&c, 2, "app/leader", &second, "second") {
            break destroy_sent.elapsed();
        }
        assert!(Instant::now() < deadline, "the lock delay never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("  lock granted again {granted_after:?} after the holder's session was destroyed (lock delay 5 s)");
    assert!(granted_after >= LOCK_DELAY, "granted after {granted_after:?}, within the lock delay");
    let e = kv_entry(&c, 0, "app/leader").expect("key");
    assert_eq!((e["Session"].as_str(), e["LockIndex"].as_u64()), (Some(second.as_str()), Some(2)), "{e}");

    eprintln!("an explicit release frees the lock at once");
    let r = http(&c.nodes[0], "PUT", &format!("/v1/kv/app/leader?release={second}"), Some("done")).unwrap();
    assert_eq!(r.body.trim(), "true", "release: {}", r.body);
    let third = create_session(&c, 2, r#"{"TTL":"30s"}"#);
    assert!(acquire(&c, 1, "app/leader", &third, "third"), "no lock delay after an explicit release");

    eprintln!("deleting a held key drops its lock (no delay: the session did not end)");
    assert_eq!(http(&c.nodes[2], "DELETE", "/v1/kv/app/leader", None).unwrap().status, 200);
    assert_eq!(http(&c.nodes[2], "PUT", "/v1/kv/app/leader", Some("plain")).unwrap().status, 200);
    let e = kv_entry(&c, 0, "app/leader").expect("key");
    assert!(e.get("Session").is_none(), "{e}");
    assert!(acquire(&c, 0, "app/leader", &second, "second"));

    eprintln!("behavior delete: the key goes with its session");
    let ephemeral = create_session(&c, 0, r#"{"TTL":"30s","Behavior":"delete"}"#);
    assert!(acquire(&c, 1, "app/ephemeral", &ephemeral, "here"));
    assert_eq!(http(&c.nodes[2], "PUT", &format!("/v1/session/destroy/{ephemeral}"), None).unwrap().status, 200);
    for n in 0..3 {
        assert!(kv_entry(&c, n, "app/ephemeral").is_none(), "m{} still has the key", n + 1);
    }
}
