//! No request can stop a member (issue 11 §2): a Txn nested 40 deep (a few hundred bytes) is
//! answered in milliseconds, and the cluster still takes writes after every member restarts
//! and replays it; requests past etcd's limits (`--max-txn-ops`, `--max-request-bytes`) get
//! etcd's errors, from the defaults or from the flags, and change nothing.

use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, Error, Txn, TxnOp};
use quorate_tests::{Cluster, Flavor};
use tonic::Code;

/// Generous: the bug this guards against never answered at all, and etcd answers in ~10 ms.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// The code gRPC itself refuses an oversized message with: tonic says OutOfRange where
/// grpc-go (etcd) says ResourceExhausted; either way the message is never decoded.
const GRPC_TOO_LARGE: Code = Code::OutOfRange;

fn status(e: Error) -> (Code, String) {
    match e {
        Error::GRpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

/// A Txn `depth` levels deep, each level guarded by a compare, with one Put at the bottom.
fn nested(depth: usize, bottom: &str) -> Txn {
    let mut t =
        Txn::new().when([Compare::version("guard", CompareOp::Equal, 0)]).and_then([TxnOp::put(bottom, "v", None)]);
    for _ in 0..depth {
        t = Txn::new().when([Compare::version("guard", CompareOp::Equal, 0)]).and_then([TxnOp::txn(t)]);
    }
    t
}

async fn fingerprint(c: &mut Client) -> (i64, u32) {
    let st = c.status().await.unwrap();
    let h = c.maintenance_client().hash_kv(0).await.unwrap();
    (st.header().unwrap().revision(), h.hash())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txn_nested_40_deep_is_answered_in_milliseconds_and_survives_a_restart_of_every_member() {
    let mut cluster = Cluster::start(Flavor::Quorate, 3).expect("cluster");
    let mut c = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    c.put("before", "1", None).await.expect("write before");

    eprintln!("send the 40-deep Txn that used to freeze a member");
    let started = Instant::now();
    let answer = tokio::time::timeout(ANSWER_WITHIN, c.txn(nested(40, "bottom"))).await;
    let took = started.elapsed();
    let answer = answer.unwrap_or_else(|_| panic!("no answer within {ANSWER_WITHIN:?}"));
    eprintln!("answered in {took:?}: {:?}", answer.as_ref().map(|r| r.succeeded()));
    assert!(answer.expect("a 40-deep Txn is within etcd's limits").succeeded());
    assert_eq!(c.get("bottom", None).await.unwrap().kvs().len(), 1, "the Put at the bottom ran");

    eprintln!("deeper than gRPC decodes or the depth bound allows: refused, also in milliseconds");
    for depth in [70, 200] {
        let started = Instant::now();
        let answer = tokio::time::timeout(ANSWER_WITHIN, c.txn(nested(depth, "deeper"))).await;
        let answer = answer.unwrap_or_else(|_| panic!("no answer to a {depth}-deep Txn within {ANSWER_WITHIN:?}"));
        assert!(answer.is_err(), "a {depth}-deep Txn was accepted");
        eprintln!("{depth} deep refused in {:?}: {:?}", started.elapsed(), answer.err());
    }
    assert!(c.get("deeper", None).await.unwrap().kvs().is_empty(), "a refused Txn wrote");

    eprintln!("stop every member; each replays the deep Txn from its log on the way back");
    for i in 0..3 {
        cluster.stop(i);
    }
    cluster.start_all().expect("every member serves again after replaying its log");
    let mut c = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    c.put("after", "1", None).await.expect("write after the restart");
    for key in ["before", "bottom", "after"] {
        assert_eq!(c.get(key, None).await.unwrap().kvs().len(), 1, "{key} lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_etcds_default_limits_get_etcds_errors() {
    let cluster = Cluster::start(Flavor::Quorate, 1).expect("cluster");
    let mut c = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    c.put("k", "v", None).await.unwrap();
    let before = fingerprint(&mut c).await;
    let puts =
        |n: usize, prefix: &str| (0..n).map(|i| TxnOp::put(format!("{prefix}{i}"), "v", None)).collect::<Vec<_>>();
    let compares =
        |n: usize| (0..n).map(|i| Compare::version(format!("c{i}"), CompareOp::Equal, 0)).collect::<Vec<_>>();
    let too_many = (Code::InvalidArgument, "etcdserver: too many operations in txn request".to_string());

    // 128 ops is etcd's default limit: accepted; the 129th is refused, in either list.
    assert!(c.txn(Txn::new().and_then(puts(128, "ok"))).await.is_ok());
    assert_eq!(status(c.txn(Txn::new().or_else(puts(129, "f"))).await.unwrap_err()), too_many);
    // Compares count too (a read-only Txn is refused as well: it never reaches the log).
    assert_eq!(status(c.txn(Txn::new().when(compares(129))).await.unwrap_err()), too_many);
    // A nested Txn spends what its parent left: 100 ops at the top leave 28.
    let mut outer = puts(99, "o");
    outer.push(TxnOp::txn(Txn::new().and_then(puts(29, "n"))));
    assert_eq!(status(c.txn(Txn::new().and_then(outer)).await.unwrap_err()), too_many);
    // Overlapping writes in a nested Txn and beside it.
    let dup = Txn::new().and_then([
        TxnOp::txn(Txn::new().and_then([TxnOp::put("d/1", "v", None)])),
        TxnOp::delete("d/", Some(etcd_client::DeleteOptions::new().with_prefix())),
    ]);
    assert_eq!(
        status(c.txn(dup).await.unwrap_err()),
        (Code::InvalidArgument, "etcdserver: duplicate key given in txn request".to_string())
    );
    // Past --max-request-bytes (1.5 MiB), etcd's error; past it plus gRPC's headroom, gRPC's.
    let too_large = (Code::InvalidArgument, "etcdserver: request is too large".to_string());
    assert_eq!(status(c.put("big", vec![b'x'; 1536 * 1024 + 1], None).await.unwrap_err()), too_large);
    let big_txn = Txn::new().and_then([TxnOp::put("big", vec![b'x'; 1800 * 1024], None)]);
    assert_eq!(status(c.txn(big_txn).await.unwrap_err()), too_large);
    let (code, message) = status(c.put("huge", vec![b'x'; 2048 * 1024 + 1024], None).await.unwrap_err());
    assert_eq!(code, GRPC_TOO_LARGE, "{message}");

    // Everything refused above changed nothing (the accepted 128-op Txn aside).
    let after = fingerprint(&mut c).await;
    assert_eq!(after.0, before.0 + 1, "only the accepted Txn wrote");
    assert!(c.get("big", None).await.unwrap().kvs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_flags_reach_the_handler() {
    let cluster = Cluster::start_with(Flavor::Quorate, 1, &["--max-txn-ops", "4", "--max-request-bytes", "10000"])
        .expect("cluster");
    let mut c = Client::connect(cluster.all_endpoints(), None).await.unwrap();
    let puts = |n: usize| (0..n).map(|i| TxnOp::put(format!("p{i}"), "v", None)).collect::<Vec<_>>();
    let too_many = (Code::InvalidArgument, "etcdserver: too many operations in txn request".to_string());
    assert!(c.txn(Txn::new().and_then(puts(4))).await.is_ok());
    assert_eq!(status(c.txn(Txn::new().and_then(puts(5))).await.unwrap_err()), too_many);
    // 2 ops at the top leave 2 for the nested Txn.
    let nested = Txn::new().and_then([TxnOp::put("a", "v", None), TxnOp::txn(Txn::new().and_then(puts(3)))]);
    assert_eq!(status(c.txn(nested).await.unwrap_err()), too_many);

    let too_large = (Code::InvalidArgument, "etcdserver: request is too large".to_string());
    assert!(c.put("fits", vec![b'x'; 9_000], None).await.is_ok());
    assert_eq!(status(c.put("big", vec![b'x'; 10_001], None).await.unwrap_err()), too_large);
    // gRPC's own limit is the flag plus etcd's 512 KiB of headroom.
    let (code, message) = status(c.put("huge", vec![b'x'; 10_000 + 512 * 1024 + 1], None).await.unwrap_err());
    assert_eq!(code, GRPC_TOO_LARGE, "{message}");
}
