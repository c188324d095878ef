//! One contender in the lock-safety test: loops Lock → read counter → fenced write of
//! counter+1 → Unlock, with a 2 s lease kept alive in the background, and prints one line per
//! outcome (`HOLD`, `ACCEPT <value>`, `REJECT`, `ERROR <message>`) so the test can pause it
//! while it holds the lock and count what the server accepted.
//!
//! Usage: lock_worker <endpoint> <lock-name> <counter-key> <seconds>

use std::io::Write;
use std::time::{Duration, Instant};

use quorate_api_grpc::pb::etcdserverpb as pb;
use quorate_api_grpc::pb::v3lockpb as lk;
use quorate_api_grpc::FENCE_HEADER;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, endpoint, name, counter, secs] = args.as_slice() else {
        anyhow::bail!("usage: lock_worker <endpoint> <lock-name> <counter-key> <seconds>");
    };
    let deadline = Instant::now() + Duration::from_secs(secs.parse()?);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))?.connect().await?;
    let mut kv = pb::kv_client::KvClient::new(channel.clone());
    let mut leases = pb::lease_client::LeaseClient::new(channel.clone());
    let mut locks = lk::lock_client::LockClient::new(channel.clone());
    while Instant::now() < deadline {
        let lease = match leases.lease_grant(pb::LeaseGrantRequest { ttl: 2, id: 0 }).await {
            Ok(r) => r.into_inner().id,
            Err(e) => {
                say(&format!("ERROR grant {}", e.message()));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let keepalive = {
            let mut leases = leases.clone();
            tokio::spawn(async move {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let Ok(resp) = leases.lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)).await else {
                    return;
                };
                let mut acks = resp.into_inner();
                loop {
                    if tx.send(pb::LeaseKeepAliveRequest { id: lease }).await.is_err() {
                        return;
                    }
                    let _ = acks.message().await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
        };
        let locked = locks.lock(lk::LockRequest { name: name.clone().into_bytes(), lease }).await;
        let (key, fence) = match locked {
            Ok(r) => {
                let fence = r.metadata().get(FENCE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
                (r.into_inner().key, fence)
            }
            Err(e) => {
                say(&format!("ERROR lock {}", e.message()));
                keepalive.abort();
                continue;
            }
        };
        let Some(fence) = fence else { anyhow::bail!("Lock response carried no {FENCE_HEADER} metadata") };
        say(&format!("HOLD {fence}"));
        // Hold the lock a little, so the test can pause us while we hold it.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let current = kv
            .range(pb::RangeRequest { key: counter.clone().into_bytes(), ..Default::default() })
            .await
            .map(|r| r.into_inner().kvs.first().map(|kv| String::from_utf8_lossy(&kv.value).parse::<u64>()));
        let next = match current {
            Ok(None) => 1,
            Ok(Some(Ok(v))) => v + 1,
            Ok(Some(Err(e))) => anyhow::bail!("counter is not a number: {e}"),
            Err(e) => {
                say(&format!("ERROR read {}", e.message()));
                keepalive.abort();
                continue;
            }
        };
        let mut put = tonic::Request::new(pb::PutRequest {
            key: counter.clone().into_bytes(),
            value: next.to_string().into_bytes(),
            ..Default::default()
        });
        put.metadata_mut().insert(FENCE_HEADER, fence.parse()?);
        match kv.put(put).await {
            Ok(_) => say(&format!("ACCEPT {next}")),
            Err(e) if e.code() == tonic::Code::FailedPrecondition => say(&format!("REJECT {}", e.message())),
            Err(e) => say(&format!("ERROR put {}", e.message())),
        }
        keepalive.abort();
        let _ = locks.unlock(lk::UnlockRequest { key }).await;
        let _ = leases.lease_revoke(pb::LeaseRevokeRequest { id: lease }).await;
    }
    Ok(())
}
