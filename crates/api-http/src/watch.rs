//! `GET /api/v1/ns/{ns}/watch?service=svc&from=REV`: the registry's change stream as
//! Server-Sent Events, one event per changed instance, in revision order, resumable from any
//! uncompacted revision (`from`, or the `Last-Event-ID` a reconnecting client sends).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use quorate_consensus::Applied;
use quorate_kv::EventKind;
use quorate_registry::{namespace_prefix, parse_instance_key, service_prefix, Instance};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};

use crate::{Api, ApiError};

/// Events a slow reader may have outstanding before the stream catches up from history.
const WATCH_QUEUED_MAX: usize = 256;

#[derive(Deserialize, Default)]
pub struct WatchParams {
    service: Option<String>,
    from: Option<i64>,
}

fn sse_event(e: &quorate_kv::Event) -> Option<Event> {
    let (ns, svc, id) = parse_instance_key(&e.kv.key)?;
    let (kind, instance) = match e.kind {
        EventKind::Put => ("put", serde_json::from_slice::<Instance>(&e.kv.value).ok()),
        EventKind::Delete => ("delete", None),
    };
    let data = json!({"revision": e.revision(), "type": kind, "namespace": ns, "service": svc, "id": id, "instance": instance});
    Some(Event::default().id(e.revision().to_string()).event(kind).data(data.to_string()))
}

pub async fn watch(
    State(api): State<Arc<Api>>,
    Path(ns): Path<String>,
    Query(q): Query<WatchParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    quorate_registry::check_name("namespace", &ns)?;
    let prefix = match &q.service {
        Some(svc) => {
            quorate_registry::check_name("service", svc)?;
            service_prefix(&ns, svc)
        }
        None => namespace_prefix(&ns),
    };
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i64>().ok());
    let mut events = api.member.subscribe();
    api.member.linearize().await?;
    let (key, end) = (prefix.clone().into_bytes(), quorate_kv::prefix_end(prefix.as_bytes()));
    let current = api.member.read(|s| s.revision());
    let start = resume.map(|r| r + 1).or(q.from).unwrap_or(current + 1);
    if start < 1 {
        return Err(ApiError::bad_request("bad_revision", format!("from must be a revision >= 1, not {start}")));
    }
    // Check the start now, so a compacted revision is a clean error rather than a dead stream.
    let first = api.member.read(|s| s.events_since(&key, &end, start))?;
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(WATCH_QUEUED_MAX);
    let member = api.member.clone();
    tokio::spawn(async move {
        let mut sent = start - 1;
        let mut backlog = first;
        loop {
            for e in backlog.drain(..) {
                if let Some(ev) = sse_event(&e) {
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                sent = sent.max(e.revision());
            }
            // Live: every applied revision after what was sent; on a gap, catch up from history.
            let next = tokio::select! {
                r = events.recv() => r,
                _ = tx.closed() => return,
            };
            match next {
                // Events at or below `sent` were in the history already read.
                Ok(Applied::Events { revision, events }) if revision > sent => {
                    backlog = events.iter().filter(|e| e.kv.key.starts_with(&key)).cloned().collect();
                    sent = revision;
                }
                Ok(Applied::Events { .. }) => {}
                Ok(Applied::Reset { .. }) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    match member.read(|s| s.events_since(&key, &end, sent + 1)) {
                        Ok(history) => backlog = history,
                        Err(_) => return, // compacted past us: the client resumes and gets the error
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}
