//! What every HTTP answer passes through on its way out, whatever the dialect.
//!
//! - **A panic is an answer.** A handler that panics would otherwise take its connection down
//!   with it: the client sees a reset and no reason. Here the panic is caught, the client gets
//!   a 500 with the usual JSON error body, and the log says which route and which source line
//!   (`error!(method, path, location, panic, "handler panicked")`).
//! - **Every refusal is JSON.** axum's own rejections (a query string that does not parse,
//!   `?index=abc`, a body that is not JSON) are plain text; they are rewrapped as
//!   `{"error": {"code", "message"}}` like every other error.
//! - **A refused blocking query is not answered at once.** A blocking query (`?index=N`)
//!   normally takes up to its `wait`, so clients call it in a loop without a pause of their
//!   own. When such a request is refused (a bad parameter, no leader), an immediate answer
//!   turns that loop into a hot loop: measured with a real HA manager, ~39,000 refusals in
//!   30 s, a core burned on both sides. So a refusal to a blocking query is held until
//!   [`BLOCKING_REFUSAL_FLOOR`] has passed since the request arrived: a client retrying
//!   without backoff then costs one request a second, and a person who mistyped a
//!   parameter waits one second for the message. 404 is not a refusal (Consul answers a
//!   blocking read of a missing key with 404 after the wait), and answers that already
//!   took longer than the floor are not held further.
//!
//! This layer never looks inside a successful answer and never changes a status.

use std::any::Any;
use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::sync::Once;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::FutureExt;
use tracing::error;

use crate::ApiError;

/// The least time a refused blocking query takes to be answered (see the module comment).
pub(crate) const BLOCKING_REFUSAL_FLOOR: Duration = Duration::from_secs(1);

/// The most of a plain-text error body that is carried into its JSON form.
const PLAIN_ERROR_BYTES_MAX: usize = 16 * 1024;

thread_local! {
    /// Where the last panic on this thread happened, recorded by the hook installed in
    /// [`install_panic_location_hook`]; read right after the unwind is caught, on the same
    /// thread, because a future is polled on one thread from a panic to its catch.
    static PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Chain a panic hook that remembers each panic's source location for the log line
/// (the previous hook, usually the default one printing to stderr, still runs).
pub(crate) fn install_panic_location_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let location = info.location().map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
            PANIC_LOCATION.with(|cell| *cell.borrow_mut() = location);
            previous(info);
        }));
    });
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}

/// Whether the request is a blocking query: it names an `index` in its query string.
fn is_blocking(query: Option<&str>) -> bool {
    query.is_some_and(|q| q.split('&').any(|pair| pair.split('=').next() == Some("index")))
}

/// Whether `status` refuses the request (rather than answering it, as 404 does).
fn is_refusal(status: StatusCode) -> bool {
    (status.is_client_error() && status != StatusCode::NOT_FOUND) || status.is_server_error()
}

fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        s if s.is_server_error() => "internal",
        _ => "refused",
    }
}

/// A plain-text error (axum's rejections) as the JSON error every handler answers with.
async fn json_error_body(resp: Response) -> Response {
    let status = resp.status();
    let plain = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    if !(plain && (status.is_client_error() || status.is_server_error())) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, PLAIN_ERROR_BYTES_MAX).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::from("(error text too long)"),
    };
    let mut out = ApiError::new(status, code_for(status), text).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// The middleware: catch panics, JSON every refusal, hold refused blocking queries.
pub(crate) async fn guard(req: Request, next: Next) -> Response {
    let started = tokio::time::Instant::now();
    let blocking = is_blocking(req.uri().query());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(resp) => resp,
        Err(payload) => {
            let location = PANIC_LOCATION.with(|cell| cell.borrow_mut().take()).unwrap_or_else(|| "unknown".into());
            let panic = panic_message(payload.as_ref());
            error!(%method, path, location, panic, "handler panicked");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("internal error serving {method} {path} (a bug: the member's log says where)"),
            )
            .into_response()
        }
    };
    let resp = json_error_body(resp).await;
    if blocking && is_refusal(resp.status()) {
        tokio::time::sleep_until(started + BLOCKING_REFUSAL_FLOOR).await;
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_queries_are_those_with_an_index() {
        assert!(is_blocking(Some("index=5")));
        assert!(is_blocking(Some("wait=1s&index=abc")));
        assert!(is_blocking(Some("index")));
        assert!(!is_blocking(Some("indexes=5")));
        assert!(!is_blocking(Some("wait=5s")));
        assert!(!is_blocking(None));
    }

    use axum::extract::Query;
    use axum::routing::get;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpStream;

    /// One HTTP/1.1 exchange on a kept-alive connection: (status, body).
    async fn exchange(conn: &mut BufReader<TcpStream>, path: &str) -> (u16, String) {
        let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
        conn.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut status_line = String::new();
        conn.read_line(&mut status_line).await.unwrap();
        let status: u16 = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut length = 0usize;
        for _ in 0..64 {
            let mut line = String::new();
            conn.read_line(&mut line).await.unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        conn.read_exact(&mut body).await.unwrap();
        (status, String::from_utf8(body).unwrap())
    }

    #[derive(serde::Deserialize)]
    struct Index {
        #[allow(dead_code)]
        index: Option<i64>,
    }

    /// The layer as `crate::router` applies it, around routes that panic or refuse.
    async fn serve() -> BufReader<TcpStream> {
        async fn panics() -> &'static str {
            let v: Vec<u8> = Vec::new();
            if v.is_empty() {
                panic!("planted panic for the test");
            }
            "unreachable"
        }
        async fn refuses(Query(_): Query<Index>) -> Result<&'static str, ApiError> {
            Err(ApiError::bad_request("bad_wait", "refused"))
        }
        let routes = axum::Router::new()
            .route("/panic", get(panics))
            .route("/refuse", get(refuses))
            .route("/ok", get(|| async { "fine" }));
        let app = crate::with_edge(routes);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        BufReader::new(TcpStream::connect(addr).await.unwrap())
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_json_and_keeps_the_connection() {
        let mut conn = serve().await;
        let (status, body) = exchange(&mut conn, "/panic").await;
        assert_eq!(status, 500);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "internal", "{body}");
        assert!(v["error"]["message"].as_str().unwrap().contains("/panic"), "{body}");
        // The same connection still serves.
        assert_eq!(exchange(&mut conn, "/ok").await, (200, "fine".to_string()));
    }

    #[tokio::test]
    async fn a_query_string_that_does_not_parse_is_refused_in_json() {
        let mut conn = serve().await;
        let (status, body) = exchange(&mut conn, "/refuse?index=abc").await;
        assert_eq!(status, 400);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "bad_request", "{body}");
    }

    #[tokio::test]
    async fn a_refused_blocking_query_is_held_for_the_floor() {
        let mut conn = serve().await;
        for path in ["/refuse?index=5&wait=1x", "/refuse?index=abc"] {
            let started = tokio::time::Instant::now();
            let (status, _) = exchange(&mut conn, path).await;
            assert_eq!(status, 400);
            assert!(started.elapsed() >= BLOCKING_REFUSAL_FLOOR, "{path}: answered after {:?}", started.elapsed());
        }
        // Not a blocking query: not held (a loopback exchange takes microseconds; the floor is 1 s).
        let started = tokio::time::Instant::now();
        assert_eq!(exchange(&mut conn, "/refuse?wait=5s").await.0, 400);
        assert!(started.elapsed() < BLOCKING_REFUSAL_FLOOR);
    }

    #[test]
    fn the_panic_hook_records_where_a_panic_happened() {
        install_panic_location_hook();
        let caught = std::panic::catch_unwind(|| {
            let v: Vec<u8> = Vec::new();
            v[1]
        });
        assert!(caught.is_err());
        let location = PANIC_LOCATION.with(|cell| cell.borrow_mut().take()).expect("a location");
        assert!(location.starts_with("crates/api-http/src/edge.rs:"), "{location}");
        assert!(panic_message(caught.unwrap_err().as_ref()).contains("index out of bounds"));
    }

    #[test]
    fn refusals_are_errors_other_than_not_found() {
        assert!(is_refusal(StatusCode::BAD_REQUEST));
        assert!(is_refusal(StatusCode::FORBIDDEN));
        assert!(is_refusal(StatusCode::SERVICE_UNAVAILABLE));
        assert!(is_refusal(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(!is_refusal(StatusCode::NOT_FOUND));
        assert!(!is_refusal(StatusCode::OK));
    }
}
