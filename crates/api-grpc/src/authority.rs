//! Tolerance for the `:authority` that etcd's Go clients send.
//!
//! etcd's Go client (etcdctl 3.4 included) puts the whole endpoint URL, scheme and all, into
//! HTTP/2's `:authority` (`http://127.0.0.1:2379`), and 3.5.0 sent `#initially=[...]` (etcd
//! #13192). etcd's own server ignores the field; hyper's HTTP/2 layer rejects the request as
//! malformed, which would break `etcdctl --endpoints=http://...` and
//! `endpoint status --cluster`. This wrapper sits between the socket and the HTTP/2 server:
//! it decodes each request header block and re-encodes it, with an `:authority` that is
//! not a valid authority replaced by the part of it that is (or dropped).
//!
//! Re-encoded blocks use only "literal without indexing", so the server-side HPACK table
//! stays empty and the client-side table is tracked by our decoder alone. Every other frame
//! passes through byte for byte.
//!
//! A client sends one authority for its whole connection, so the first header block decides:
//! if its `:authority` is valid, that block and everything after it pass through untouched and
//! unparsed (no cost for well-behaved clients); if not, every block of the connection is
//! rewritten.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE_LEN: usize = 24;
/// The HTTP/2 client connection preface.
const H2_PREFACE: &[u8; PREFACE_LEN] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// HTTP/2's default SETTINGS_MAX_FRAME_SIZE, which our server never raises.
const FRAME_PAYLOAD_MAX: usize = 16_384;
/// Largest header block we accept before giving up on the connection.
const HEADER_BLOCK_BYTES_MAX: usize = 1 << 20;

struct PendingHeaders {
    stream_id: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Waiting for the first header block.
    Sniff,
    /// The client's authority is valid: bytes flow through unparsed.
    Passthrough,
    /// The client's authority is not: every header block is decoded and re-encoded.
    Rewrite,
}

pub struct AuthorityFix<S> {
    inner: S,
    mode: Mode,
    raw: BytesMut,
    ready: BytesMut,
    preface_done: bool,
    pending: Option<PendingHeaders>,
    decoder: loona_hpack::Decoder<'static>,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            mode: Mode::Sniff,
            raw: BytesMut::with_capacity(16 * 1024),
            ready: BytesMut::new(),
            preface_done: false,
            pending: None,
            decoder: loona_hpack::Decoder::new(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Move every complete frame from `raw` to `ready`, rewriting header blocks.
    fn process(&mut self) -> io::Result<()> {
        if self.mode == Mode::Passthrough {
            let all = self.raw.split();
            self.ready.extend_from_slice(&all);
            return Ok(());
        }
        if !self.preface_done {
            // Not HTTP/2 (an HTTP/1 request for `/metrics` or `/health` on the client port):
            // nothing to fix, let every byte through.
            let seen = self.raw.len().min(PREFACE_LEN);
            if self.raw[..seen] != H2_PREFACE[..seen] {
                self.mode = Mode::Passthrough;
                return self.process();
            }
            if self.raw.len() < PREFACE_LEN {
                return Ok(());
            }
            self.ready.extend_from_slice(&self.raw.split_to(PREFACE_LEN));
            self.preface_done = true;
        }
        while self.raw.len() >= FRAME_HEADER_LEN {
            let len = u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]) as usize;
            if self.raw.len() < FRAME_HEADER_LEN + len {
                return Ok(());
            }
            let kind = self.raw[3];
            let flags = self.raw[4];
            let stream_id = u32::from_be_bytes([self.raw[5], self.raw[6], self.raw[7], self.raw[8]]) & 0x7fff_ffff;
            let frame = self.raw.split_to(FRAME_HEADER_LEN + len);
            let payload = &frame[FRAME_HEADER_LEN..];
            match kind {
                TYPE_HEADERS => {
                    let mut p = payload;
                    let mut pad = 0usize;
                    if flags & FLAG_PADDED != 0 {
                        pad = *p.first().ok_or_else(|| bad("empty padded HEADERS"))? as usize;
                        p = &p[1..];
                    }
                    let mut priority = None;
                    if flags & FLAG_PRIORITY != 0 {
                        if p.len() < 5 {
                            return Err(bad("short PRIORITY in HEADERS"));
                        }
                        priority = Some([p[0], p[1], p[2], p[3], p[4]]);
                        p = &p[5..];
                    }
                    if pad > p.len() {
                        return Err(bad("padding longer than HEADERS"));
                    }
                    let fragment = &p[..p.len() - pad];
                    let pending = PendingHeaders { stream_id, flags, priority, block: fragment.to_vec() };
                    if flags & FLAG_END_HEADERS != 0 {
                        if self.sniff_passes(&pending)? {
                            self.ready.extend_from_slice(&frame);
                            return self.process();
                        }
                        self.emit(pending)?;
                    } else {
                        self.pending = Some(pending);
                    }
                }
                TYPE_CONTINUATION if self.pending.is_some() => {
                    let mut pending = self.pending.take().expect("checked above");
                    pending.block.extend_from_slice(payload);
                    if pending.block.len() > HEADER_BLOCK_BYTES_MAX {
                        return Err(bad("header block too large"));
                    }
                    if flags & FLAG_END_HEADERS != 0 {
                        self.emit(pending)?;
                    } else {
                        self.pending = Some(pending);
                    }
                }
                _ => self.ready.extend_from_slice(&frame),
            }
        }
        Ok(())
    }

    /// In `Sniff` mode, decide from this (first, single-frame) header block whether the
    /// connection needs rewriting. True means: pass this frame and the rest through.
    fn sniff_passes(&mut self, h: &PendingHeaders) -> io::Result<bool> {
        if self.mode != Mode::Sniff {
            return Ok(false);
        }
        // Decode with a scratch decoder: ours must stay empty if we end up passing through,
        // or learn this block if we end up rewriting (emit decodes it again).
        let headers = loona_hpack::Decoder::new().decode(&h.block).map_err(|e| bad(&format!("HPACK: {e:?}")))?;
        let valid = headers
            .iter()
            .filter(|(n, _)| n == b":authority")
            .all(|(_, v)| fix_authority(v).as_deref() == Some(v.as_slice()));
        self.mode = if valid { Mode::Passthrough } else { Mode::Rewrite };
        Ok(valid)
    }

    fn emit(&mut self, h: PendingHeaders) -> io::Result<()> {
        if self.mode == Mode::Sniff {
            // A first block split over CONTINUATIONs: rewrite this connection to be safe.
            self.mode = Mode::Rewrite;
        }
        let headers = self.decoder.decode(&h.block).map_err(|e| bad(&format!("HPACK: {e:?}")))?;
        let mut block = Vec::with_capacity(h.block.len() + 64);
        for (name, value) in headers {
            let value = if name == b":authority" { fix_authority(&value) } else { Some(value) };
            if let Some(value) = value {
                literal_without_indexing(&mut block, &name, &value);
            }
        }
        let mut first = true;
        let mut rest: &[u8] = &block;
        loop {
            let room = if first && h.priority.is_some() { FRAME_PAYLOAD_MAX - 5 } else { FRAME_PAYLOAD_MAX };
            let take = rest.len().min(room);
            let (chunk, tail) = rest.split_at(take);
            let last = tail.is_empty();
            let (kind, mut flags) = if first {
                (TYPE_HEADERS, h.flags & (FLAG_END_STREAM | FLAG_PRIORITY))
            } else {
                (TYPE_CONTINUATION, 0)
            };
            if last {
                flags |= FLAG_END_HEADERS;
            }
            let prio_len = if first { h.priority.map(|_| 5).unwrap_or(0) } else { 0 };
            let len = chunk.len() + prio_len;
            self.ready.put_slice(&(len as u32).to_be_bytes()[1..]);
            self.ready.put_u8(kind);
            self.ready.put_u8(flags);
            self.ready.put_u32(h.stream_id);
            if first {
                if let Some(p) = h.priority {
                    self.ready.put_slice(&p);
                }
            }
            self.ready.put_slice(chunk);
            rest = tail;
            first = false;
            if last {
                return Ok(());
            }
        }
    }
}

/// `http://host:port/` becomes `host:port`; anything still not an authority is dropped.
fn fix_authority(value: &[u8]) -> Option<Vec<u8>> {
    let s = std::str::from_utf8(value).ok()?;
    let s = s.split_once("://").map(|(_, rest)| rest).unwrap_or(s);
    let s = s.trim_end_matches('/');
    s.parse::<http::uri::Authority>().ok().map(|_| s.as_bytes().to_vec())
}

fn literal_without_indexing(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    out.extend(loona_hpack::encoder::encode_integer(name.len(), 7));
    out.extend_from_slice(name);
    out.extend(loona_hpack::encoder::encode_integer(value.len(), 7));
    out.extend_from_slice(value);
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("http2 header rewrite: {msg}"))
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        // EOF: pass through whatever is left unparsed.
                        let rest = this.raw.split();
                        this.ready.extend_from_slice(&rest);
                        if this.ready.is_empty() {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    this.raw.extend_from_slice(rb.filled());
                    this.process()?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Requests learn the client's address (rate and connection limits key on it) and, over TLS,
/// its verified certificate (whose common name is a user under `--client-cert-auth`).
impl tonic::transport::server::Connected for AuthorityFix<tokio::net::TcpStream> {
    type ConnectInfo = quorate_tls::ConnInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        quorate_tls::ConnInfo { remote: self.inner.peer_addr().ok(), identity: None }
    }
}

impl tonic::transport::server::Connected for AuthorityFix<quorate_tls::ServerConn> {
    type ConnectInfo = quorate_tls::ConnInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        quorate_tls::ConnInfo { remote: self.inner.remote, identity: self.inner.identity.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("127.0.0.1:2379", Some("127.0.0.1:2379")),
            ("http://127.0.0.1:2379", Some("127.0.0.1:2379")),
            ("https://node-1.example:2379/", Some("node-1.example:2379")),
            ("#initially=[http://a:1]", None),
            ("", None),
        ];
        for (input, want) in cases {
            assert_eq!(fix_authority(input.as_bytes()).as_deref(), want.map(str::as_bytes), "{input}");
        }
    }

    #[tokio::test]
    async fn rewrites_authority_and_passes_other_frames() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode(vec![(&b":method"[..], &b"POST"[..]), (b":authority", b"http://127.0.0.1:2379")]);
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS frame, empty.
        wire.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        // HEADERS split over a CONTINUATION.
        let (a, b) = block.split_at(block.len() / 2);
        wire.extend_from_slice(&(a.len() as u32).to_be_bytes()[1..]);
        wire.extend_from_slice(&[TYPE_HEADERS, FLAG_END_STREAM, 0, 0, 0, 1]);
        wire.extend_from_slice(a);
        wire.extend_from_slice(&(b.len() as u32).to_be_bytes()[1..]);
        wire.extend_from_slice(&[TYPE_CONTINUATION, FLAG_END_HEADERS, 0, 0, 0, 1]);
        wire.extend_from_slice(b);

        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(&wire).await.unwrap();
        drop(client);
        let mut fixed = AuthorityFix::new(server);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await.unwrap();
        assert_eq!(&out[..PREFACE_LEN + 9], &wire[..PREFACE_LEN + 9], "preface and SETTINGS unchanged");
        let h = &out[PREFACE_LEN + 9..];
        assert_eq!(h[3], TYPE_HEADERS);
        assert_eq!(h[4], FLAG_END_STREAM | FLAG_END_HEADERS);
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        let headers = loona_hpack::Decoder::new().decode(&h[9..9 + len]).unwrap();
        assert_eq!(
            headers,
            vec![(b":method".to_vec(), b"POST".to_vec()), (b":authority".to_vec(), b"127.0.0.1:2379".to_vec())]
        );
    }

    #[tokio::test]
    async fn a_valid_authority_passes_the_connection_through_untouched() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut enc = loona_hpack::Encoder::new();
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        for stream in [1u8, 3] {
            let block = enc.encode(vec![(&b":method"[..], &b"POST"[..]), (b":authority", b"127.0.0.1:2379")]);
            wire.extend_from_slice(&(block.len() as u32).to_be_bytes()[1..]);
            wire.extend_from_slice(&[TYPE_HEADERS, FLAG_END_HEADERS, 0, 0, 0, stream]);
            wire.extend_from_slice(&block);
        }
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(&wire).await.unwrap();
        drop(client);
        let mut out = Vec::new();
        AuthorityFix::new(server).read_to_end(&mut out).await.unwrap();
        assert_eq!(out, wire);
    }

    #[tokio::test]
    async fn an_http1_request_passes_through_untouched_however_short() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for wire in [&b"GET / HTTP/1.0\r\n\r\n"[..], b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1:2379\r\n\r\n"] {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            client.write_all(wire).await.unwrap();
            drop(client);
            let mut out = Vec::new();
            AuthorityFix::new(server).read_to_end(&mut out).await.unwrap();
            assert_eq!(out, wire);
        }
    }
}
