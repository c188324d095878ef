//! Connections per client (issue 14 §3) on a real member: with `--max-connections-per-client 3`,
//! a client that holds three connections open has its fourth closed at once, on the client port
//! and on the HTTP port alike, while another client (another source address) is served; a
//! closed connection frees its slot.

use std::time::Duration;

use quorate_api_grpc::pb::etcdserverpb as pb;
use quorate_tests::{Cluster, Flavor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const MAX: usize = 3;

async fn connect_from(from: &str, to: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to.parse().unwrap()).await.unwrap()
}

/// Whether the member closed `conn` without a word (within 3 s of being poked).
async fn closed_at_once(mut conn: TcpStream) -> bool {
    let _ = conn.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(Duration::from_secs(3), conn.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_)))
}

/// A `/health` answer over `conn`.
async fn served(mut conn: TcpStream) -> bool {
    if conn.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), conn.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200")
}

#[test]
fn a_client_past_its_connections_is_closed_at_once_and_others_are_served() {
    let c =
        Cluster::start_with(Flavor::Quorate, 1, &["--max-connections-per-client", &MAX.to_string()]).expect("cluster");
    let client = c.nodes[0].endpoint();
    let http = format!("127.0.0.1:{}", c.nodes[0].http_port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for (port, addr) in [("client", &client), ("http", &http)] {
            let mut held = Vec::new();
            for _ in 0..MAX {
                held.push(connect_from("127.0.0.1", addr).await);
            }
            // Accepted in order: give the member a moment to count the ones held.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(
                closed_at_once(connect_from("127.0.0.1", addr).await).await,
                "{port}: a connection past the limit was kept"
            );
            assert!(served(connect_from("127.0.0.2", addr).await).await, "{port}: another client was not served");

            // One closed frees its slot (the member notices the close on its next read).
            drop(held.pop());
            let mut freed = false;
            for _ in 0..20 {
                if served(connect_from("127.0.0.1", addr).await).await {
                    freed = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            assert!(freed, "{port}: a closed connection did not free its slot");
            drop(held);
        }

        // gRPC from a client at its limit is refused; from another it works.
        let mut held = Vec::new();
        for _ in 0..MAX {
            held.push(connect_from("127.0.0.1", &client).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{client}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(3));
        let refused = async {
            let conn = ch.clone().local_address(Some("127.0.0.1".parse().unwrap())).connect().await?;
            pb::kv_client::KvClient::new(conn)
                .put(pb::PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), ..Default::default() })
                .await
                .map_err(anyhow::Error::from)?;
            anyhow::Ok(())
        };
        assert!(refused.await.is_err(), "a gRPC client past its connections was served");
        let other = ch.local_address(Some("127.0.0.2".parse().unwrap())).connect().await.expect("connect");
        pb::kv_client::KvClient::new(other)
            .put(pb::PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), ..Default::default() })
            .await
            .expect("another client writes");
    });
}
