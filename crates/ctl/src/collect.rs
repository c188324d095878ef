//! Gathers every member's view. The member list comes from the first endpoint that answers
//! `MemberList`; every member in it is then asked, in parallel, for etcd's
//! `Maintenance.Status` and for quorate's `/v1/member/status` on its HTTP address, which the
//! member names in the Status response's `quorate-http-addr` metadata (an unspecified host,
//! 0.0.0.0 or [::], is replaced by the host its client URL was reached at). Then each
//! reachable member is asked for `HashKV` at the smallest revision they all have, and one of
//! them for the replicated eviction-brake state. A member that does not answer within the
//! timeouts is shown unreachable, with the error.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quorate_api_grpc::pb::etcdserverpb as pb;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Endpoint;

use crate::Options;

/// What `/v1/member/status` answers (schema in docs/ctl.md).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QuorateStatus {
    pub role: String,
    pub term: u64,
    pub leader: Option<String>,
    pub commit_index: u64,
    pub applied_index: u64,
    pub apply_lag_entries: u64,
    pub last_leader_contact_ms: Option<u64>,
    pub fsync_p99_us: Option<u64>,
    pub fsync_samples: usize,
    pub version: String,
    /// This member's isolation (`quorate ctl isolate`), if any.
    pub isolated: Option<Isolation>,
    /// Every isolated member this member knows of.
    pub isolated_members: Vec<IsolatedMember>,
    /// The cluster's incarnation as this member has it (raised by `ctl recover`).
    pub incarnation: Option<u64>,
    /// Set when a member of a newer incarnation refused this one: it was dropped by a recovery.
    pub fenced: Option<String>,
    /// The recovery that set the incarnation, if one did.
    pub recovery: Option<serde_json::Value>,
    pub wall_clock_unix_ms: u64,
}

/// An isolation as `/v1/member/status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Isolation {
    pub reason: String,
    /// UTC, RFC 3339.
    pub since: String,
    pub by: String,
}

/// An isolated member in another member's view.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IsolatedMember {
    /// Hex.
    pub id: String,
    #[serde(flatten)]
    pub isolation: Isolation,
    /// Still a voter: the leader has yet to demote it (it waits while the demotion would cost
    /// the quorum).
    pub demotion_pending: bool,
}

/// One member as `ctl status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    pub name: String,
    /// Hex, as etcdctl prints member ids.
    pub id: String,
    pub endpoint: String,
    pub peer_url: String,
    pub is_learner: bool,
    pub reachable: bool,
    /// Why it is unreachable, or what part of its view could not be read.
    pub error: Option<String>,
    /// leader, follower, learner or candidate.
    pub role: Option<String>,
    pub term: Option<u64>,
    /// The leader it follows (hex id).
    pub leader: Option<String>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub revision: Option<i64>,
    /// HashKV at `ClusterView::hash_revision`.
    pub hash: Option<u32>,
    pub apply_lag_entries: Option<u64>,
    pub last_leader_contact_ms: Option<u64>,
    pub db_size_bytes: Option<i64>,
    /// The member's wall clock minus this host's, at the midpoint of the round trip.
    pub clock_offset_ms: Option<i64>,
    /// Half the round trip: the offset is right to within this.
    pub clock_offset_error_ms: Option<u64>,
    pub fsync_p99_ms: Option<f64>,
    /// How many recent log commits the p99 is taken over.
    pub fsync_samples: Option<usize>,
    pub version: Option<String>,
    /// Alarms this member reports (etcd's Status errors), as `memberID:<id> alarm:<NAME>`.
    pub alarms: Vec<String>,
    /// Where its HTTP endpoints answer (from the Status metadata `quorate-http-addr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
    /// Set when an operator isolated this member: it answers only Status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolated: Option<Isolation>,
    /// The isolated members this member knows of.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub isolated_members: Vec<IsolatedMember>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<u64>,
    /// Why this member was fenced (dropped by a recovery), if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<String>,
    /// The recovery that set its incarnation (`ctl recover`'s plan), if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<serde_json::Value>,
}

/// A zone where the eviction brake holds, from the replicated brake state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrakeZone {
    pub zone: String,
    pub held_ms: u64,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    pub members: Vec<MemberView>,
    /// The revision the hashes are taken at: the smallest any reachable member has.
    pub hash_revision: Option<i64>,
    pub brake: Vec<BrakeZone>,
    /// Set when no endpoint gave a member list (the members shown are the endpoints given).
    pub member_list_error: Option<String>,
}

fn url_of(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

fn host_port(endpoint: &str) -> String {
    let s = endpoint.split("://").last().unwrap_or(endpoint);
    s.trim_end_matches('/').to_string()
}

/// A connection to a member whose calls carry the `--user` token (if any).
pub(crate) type Channel = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, WithToken>;

/// Puts the token in each call's metadata, where etcd's clients put it.
#[derive(Clone)]
pub(crate) struct WithToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for WithToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert(quorate_api_grpc::TOKEN_METADATA, t.clone());
        }
        Ok(req)
    }
}

pub(crate) async fn dial(endpoint: &str, opts: &Options) -> anyhow::Result<Channel> {
    let url = url_of(endpoint);
    let ep = Endpoint::from_shared(url.clone())?.connect_timeout(opts.dial_timeout).timeout(opts.command_timeout);
    let token =
        opts.token.as_deref().map(str::parse).transpose().map_err(|_| anyhow::anyhow!("a token that is not ASCII"))?;
    let ch = if url.starts_with("https://") {
        let tls = opts.tls.as_ref().ok_or_else(|| anyhow::anyhow!("{url} is https://: give --cacert"))?;
        quorate_tls::connect(&ep, tls.grpc.clone()).await?
    } else {
        ep.connect().await?
    };
    Ok(tonic::service::interceptor::InterceptedService::new(ch, WithToken(token)))
}

/// The `Authorization` header line of `--user`'s token, or nothing. Sent only with the POSTs
/// (isolate, unisolate, recover: root's routes); the GETs ctl makes are open ones.
fn auth_header(opts: &Options) -> String {
    opts.token.as_deref().map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default()
}

/// One HTTP/1.1 exchange with `addr` (`host:port`, `http://host:port` or `https://host:port`):
/// `request` gets the `host:port` for its Host header; the whole raw reply.
async fn http_exchange(opts: &Options, addr: &str, request: impl FnOnce(&str) -> String) -> anyhow::Result<String> {
    let (https, hostport) = match addr.strip_prefix("https://") {
        Some(h) => (true, h),
        None => (false, addr.strip_prefix("http://").unwrap_or(addr)),
    };
    let hostport = hostport.trim_end_matches('/');
    let req = request(hostport);
    let mut buf = Vec::new();
    if https {
        let tls = opts.tls.as_ref().ok_or_else(|| anyhow::anyhow!("{addr} is https://: give --cacert"))?;
        let (host, port) = hostport.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("{addr}: no port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let mut s = tls.http.connect(host, port.parse()?).await?;
        s.write_all(req.as_bytes()).await?;
        // A server that closes without TLS's close_notify has still said all it had to say.
        if let Err(e) = s.read_to_end(&mut buf).await {
            if e.kind() != std::io::ErrorKind::UnexpectedEof || buf.is_empty() {
                return Err(e.into());
            }
        }
    } else {
        let mut s = tokio::net::TcpStream::connect(hostport).await?;
        s.write_all(req.as_bytes()).await?;
        s.read_to_end(&mut buf).await?;
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

pub(crate) async fn bounded<T, E: std::fmt::Display>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow::anyhow!("{e}")),
        Err(_) => Err(anyhow::anyhow!("timed out after {limit:?}")),
    }
}

pub(crate) async fn member_list(opts: &Options) -> Result<Vec<pb::Member>, String> {
    let mut errors = Vec::new();
    for e in &opts.endpoints {
        let attempt = async {
            let ch = bounded(opts.dial_timeout, dial(e, opts)).await?;
            let mut c = pb::cluster_client::ClusterClient::new(ch);
            let resp =
                bounded(opts.command_timeout, c.member_list(pb::MemberListRequest { linearizable: false })).await?;
            anyhow::Ok(resp.into_inner().members)
        };
        match attempt.await {
            Ok(m) if !m.is_empty() => return Ok(m),
            Ok(_) => errors.push(format!("{e}: empty member list")),
            Err(err) => errors.push(format!("{e}: {err}")),
        }
    }
    Err(errors.join("; "))
}

/// POST `body` to `path` at `addr` (HTTP/1.1, over TLS for `https://`); the status code and the
/// body.
pub(crate) async fn http_post(
    opts: &Options,
    addr: &str,
    path: &str,
    body: &str,
    limit: Duration,
) -> anyhow::Result<(u16, String)> {
    let fetch = http_exchange(opts, addr, |host| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            auth_header(opts),
            body.len()
        )
    });
    let raw = bounded(limit, fetch).await?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("malformed HTTP reply"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP reply"))?;
    Ok((code, body.to_string()))
}

/// An HTTP/1.1 GET (the member's JSON endpoint, over TLS for `https://`); returns the body of
/// a 200.
pub(crate) async fn http_get(opts: &Options, addr: &str, path: &str, limit: Duration) -> anyhow::Result<String> {
    let fetch =
        http_exchange(opts, addr, |host| format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"));
    let raw = bounded(limit, fetch).await?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("malformed HTTP reply"))?;
    if !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!("{}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
}

/// The member's HTTP address from the Status metadata, with an unspecified host replaced by
/// the host its client endpoint was reached at.
pub fn http_addr_for(advertised: &str, client_endpoint: &str) -> String {
    // `https://host:port` when the member serves its HTTP port over TLS.
    let (scheme, bare) = match advertised.strip_prefix("https://") {
        Some(rest) => ("https://", rest),
        None => ("", advertised),
    };
    let Ok(addr) = bare.parse::<std::net::SocketAddr>() else {
        return advertised.to_string();
    };
    if !addr.ip().is_unspecified() {
        return advertised.to_string();
    }
    let client = host_port(client_endpoint);
    let host = client.rsplit_once(':').map_or(client.as_str(), |(h, _)| h);
    format!("{scheme}{host}:{}", addr.port())
}

fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Asks one member; fills what it can and records the first error.
async fn ask(m: &pb::Member, opts: &Options) -> (MemberView, Option<Channel>) {
    let endpoint = m.client_ur_ls.first().cloned().unwrap_or_default();
    let mut v = MemberView {
        name: m.name.clone(),
        id: format!("{:x}", m.id),
        endpoint: host_port(&endpoint),
        peer_url: m.peer_ur_ls.first().cloned().unwrap_or_default(),
        is_learner: m.is_learner,
        ..Default::default()
    };
    if endpoint.is_empty() {
        v.error = Some("no client URL published (member not started yet?)".into());
        return (v, None);
    }
    let ch = match bounded(opts.dial_timeout, dial(&endpoint, opts)).await {
        Ok(ch) => ch,
        Err(e) => {
            v.error = Some(format!("dial {}: {e}", v.endpoint));
            return (v, None);
        }
    };
    let mut maint = pb::maintenance_client::MaintenanceClient::new(ch.clone());
    let resp = match bounded(opts.command_timeout, maint.status(pb::StatusRequest {})).await {
        Ok(r) => r,
        Err(e) => {
            v.error = Some(format!("status: {e}"));
            return (v, None);
        }
    };
    v.reachable = true;
    let http = resp
        .metadata()
        .get(quorate_api_grpc::HTTP_ADDR_METADATA)
        .and_then(|h| h.to_str().ok())
        .map(|a| http_addr_for(a, &endpoint));
    let st = resp.into_inner();
    v.term = Some(st.raft_term);
    v.leader = (st.leader != 0).then(|| format!("{:x}", st.leader));
    v.commit_index = Some(st.raft_index);
    v.applied_index = Some(st.raft_applied_index);
    v.revision = st.header.map(|h| h.revision);
    v.db_size_bytes = Some(st.db_size);
    v.version = Some(st.version.clone());
    // Only etcd's alarm lines: an isolated member's Status also names its isolation, whose
    // reason is free text (it must never read as an alarm).
    v.alarms = st.errors.iter().filter(|e| e.starts_with("memberID:") && e.contains(" alarm:")).cloned().collect();
    v.apply_lag_entries = Some(st.raft_index.saturating_sub(st.raft_applied_index));
    v.role = Some(
        if st.is_learner {
            "learner"
        } else if st.leader == m.id {
            "leader"
        } else {
            "follower"
        }
        .into(),
    );
    let Some(http) = http else {
        v.error = Some("no quorate-http-addr in Status (not a quorate member?)".into());
        return (v, Some(ch));
    };
    v.http_addr = Some(http.clone());
    let sent_at = SystemTime::now();
    let started = Instant::now();
    match http_get(opts, &http, "/v1/member/status", opts.command_timeout).await {
        Ok(body) => {
            let rtt_ms = started.elapsed().as_secs_f64() * 1000.0;
            match serde_json::from_str::<QuorateStatus>(&body) {
                Ok(q) => {
                    let midpoint_ms = unix_ms(sent_at) + rtt_ms / 2.0;
                    v.clock_offset_ms = Some((q.wall_clock_unix_ms as f64 - midpoint_ms).round() as i64);
                    v.clock_offset_error_ms = Some((rtt_ms / 2.0).ceil() as u64);
                    v.role = Some(q.role.clone());
                    v.term = Some(q.term);
                    v.leader = q.leader.clone();
                    v.apply_lag_entries = Some(q.apply_lag_entries);
                    v.last_leader_contact_ms = q.last_leader_contact_ms;
                    v.fsync_p99_ms = q.fsync_p99_us.map(|us| us as f64 / 1000.0);
                    v.fsync_samples = Some(q.fsync_samples);
                    v.version = Some(q.version);
                    v.isolated = q.isolated;
                    v.isolated_members = q.isolated_members;
                    v.incarnation = q.incarnation;
                    v.fenced = q.fenced;
                    v.recovery = q.recovery.filter(|r| !r.is_null());
                }
                Err(e) => v.error = Some(format!("{http}/v1/member/status: {e}")),
            }
        }
        Err(e) => v.error = Some(format!("{http}/v1/member/status: {e}")),
    }
    (v, Some(ch))
}

/// Every member's view, bounded by the dial and command timeouts.
pub async fn collect(opts: &Options) -> ClusterView {
    let mut view = ClusterView::default();
    let members = match member_list(opts).await {
        Ok(m) => m,
        Err(e) => {
            view.member_list_error = Some(e);
            // Nothing answered: show the endpoints we were given, all unreachable.
            opts.endpoints
                .iter()
                .map(|e| pb::Member { name: String::new(), client_ur_ls: vec![url_of(e)], ..Default::default() })
                .collect()
        }
    };
    let asked = futures::future::join_all(members.iter().map(|m| ask(m, opts))).await;
    let (mut views, channels): (Vec<_>, Vec<_>) = asked.into_iter().unzip();

    view.hash_revision = views.iter().filter_map(|v| v.revision).min();
    if let Some(rev) = view.hash_revision {
        let hashes = futures::future::join_all(channels.iter().map(|ch| async move {
            let ch = ch.clone()?;
            let mut maint = pb::maintenance_client::MaintenanceClient::new(ch);
            let r = bounded(opts.command_timeout, maint.hash_kv(pb::HashKvRequest { revision: rev })).await.ok()?;
            Some(r.into_inner().hash)
        }))
        .await;
        for (v, h) in views.iter_mut().zip(hashes) {
            v.hash = h;
        }
    }
    // An isolated member refuses reads: ask one that is not.
    let mut readable =
        views.iter().zip(&channels).filter(|(v, _)| v.isolated.is_none()).filter_map(|(_, c)| c.as_ref());
    if let Some(ch) = readable.next() {
        view.brake = read_brake(ch.clone(), opts.command_timeout).await.unwrap_or_default();
    }
    view.members = views;
    view
}

/// The zones where the replicated eviction brake holds (a serializable read: it answers
/// without a quorum).
async fn read_brake(ch: Channel, limit: Duration) -> anyhow::Result<Vec<BrakeZone>> {
    let mut kv = pb::kv_client::KvClient::new(ch);
    let req = pb::RangeRequest {
        key: quorate_registry::BRAKE_STATE_KEY.as_bytes().to_vec(),
        serializable: true,
        ..Default::default()
    };
    let resp = bounded(limit, kv.range(req)).await?.into_inner();
    let Some(kv) = resp.kvs.first() else { return Ok(Vec::new()) };
    let state: quorate_registry::BrakeState = serde_json::from_slice(&kv.value)?;
    Ok(state
        .zones
        .into_iter()
        .filter_map(|(zone, z)| z.engaged.map(|e| BrakeZone { zone, held_ms: e.held_ms, reason: e.reason }))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::http_addr_for;

    #[test]
    fn an_unspecified_http_host_is_replaced_by_the_client_host() {
        assert_eq!(http_addr_for("127.0.0.1:8500", "http://10.0.0.5:2379"), "127.0.0.1:8500");
        assert_eq!(http_addr_for("0.0.0.0:8500", "http://10.0.0.5:2379"), "10.0.0.5:8500");
        assert_eq!(http_addr_for("0.0.0.0:8500", "10.0.0.5:2379"), "10.0.0.5:8500");
        assert_eq!(http_addr_for("https://0.0.0.0:8500", "https://10.0.0.5:2379"), "https://10.0.0.5:8500");
        assert_eq!(http_addr_for("https://127.0.0.1:8500", "10.0.0.5:2379"), "https://127.0.0.1:8500");
    }
}
