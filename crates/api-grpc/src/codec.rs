//! The gRPC codec every generated service and client uses: prost's, except that a large
//! message is encoded with the worker thread handed over to the rest of the runtime.
//!
//! tonic encodes a response on the runtime thread that polls the connection. A member runs one
//! worker thread by default (ADR 0007), so encoding a 30 MB whole-keyspace Range there held up
//! the Raft core, heartbeats and every other client for as long as it took (issue 11: no client
//! stalls writes by reading). `block_in_place` gives the worker's queue to another thread for
//! the duration, and the encode itself runs in the slow lane (`lane`), behind everything else.
//!
//! Decoding is prost's, except for one error: prost stops at 100 levels of nesting, which only
//! a Txn nested about 50 deep reaches (each level is a `TxnRequest` inside a `RequestOp`). Such a
//! request gets etcd's "too many operations" (what etcd's op budget answers for deep nesting),
//! not a bare INTERNAL decode error.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;
use tonic_prost::ProstDecoder;

/// Messages at least this large are encoded off the runtime's worker: long enough to be worth
/// a thread hand-off (tens of microseconds), short of the time a heartbeat may wait.
pub const ENCODE_OFF_WORKER_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct QuorateCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for QuorateCodec<T, U> {
    fn default() -> Self {
        QuorateCodec(PhantomData)
    }
}

impl<T, U> Codec for QuorateCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = LargeOffWorker<T>;
    type Decoder = NestingIsTooManyOps<U>;

    fn encoder(&mut self) -> Self::Encoder {
        LargeOffWorker(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        NestingIsTooManyOps(ProstDecoder::default())
    }
}

#[derive(Debug, Default)]
pub struct NestingIsTooManyOps<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for NestingIsTooManyOps<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(too_deep_is_too_many_ops)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

fn too_deep_is_too_many_ops(s: Status) -> Status {
    if s.code() == tonic::Code::Internal && s.message().contains("recursion limit reached") {
        Status::invalid_argument("etcdserver: too many operations in txn request")
    } else {
        s
    }
}

#[derive(Debug, Clone)]
pub struct LargeOffWorker<T>(PhantomData<T>);

impl<T: Message> Encoder for LargeOffWorker<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // The length is computed once (prost's `encode` would compute it again to check room;
        // the buffer grows as needed).
        let len = item.encoded_len();
        buf.reserve(len);
        let mut encode = move || item.encode_raw(buf);
        if len >= ENCODE_OFF_WORKER_BYTES && on_multi_thread_runtime() {
            tokio::task::block_in_place(|| crate::lane::low_priority(encode))
        } else {
            encode()
        }
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// `block_in_place` panics on a current-thread runtime (tests and some clients use one).
fn on_multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::etcdserverpb as pb;
    use crate::pb::mvccpb::KeyValue;

    fn range_response(kvs: usize) -> pb::RangeResponse {
        let kv =
            |i: usize| KeyValue { key: format!("k{i:08}").into_bytes(), value: vec![b'v'; 256], ..Default::default() };
        pb::RangeResponse { kvs: (0..kvs).map(kv).collect(), count: kvs as i64, ..Default::default() }
    }

    #[test]
    fn a_nesting_too_deep_to_decode_is_etcds_too_many_ops() {
        use prost::Message as _;
        let mut t = pb::TxnRequest::default();
        for _ in 0..60 {
            let op = pb::RequestOp { request: Some(pb::request_op::Request::RequestTxn(t)) };
            t = pb::TxnRequest { success: vec![op], ..Default::default() };
        }
        let err = pb::TxnRequest::decode(t.encode_to_vec().as_slice()).expect_err("prost's recursion limit");
        let mapped = too_deep_is_too_many_ops(Status::internal(err.to_string()));
        assert_eq!(mapped.code(), tonic::Code::InvalidArgument);
        assert_eq!(mapped.message(), "etcdserver: too many operations in txn request");
        let other = too_deep_is_too_many_ops(Status::internal("invalid wire type"));
        assert_eq!(other.code(), tonic::Code::Internal);
    }

    #[test]
    fn only_large_messages_leave_the_worker() {
        assert!(range_response(10).encoded_len() < ENCODE_OFF_WORKER_BYTES);
        assert!(range_response(2_000).encoded_len() >= ENCODE_OFF_WORKER_BYTES);
    }

    /// A message whose encoding lasts until another task on the runtime has run 100 times
    /// (or 10 s): it finishes quickly only if the encode left the worker to the others.
    #[derive(Debug, Default)]
    struct WaitsForOthers(std::sync::Arc<std::sync::atomic::AtomicU64>);

    impl Message for WaitsForOthers {
        fn encode_raw(&self, _: &mut impl bytes::BufMut) {
            let t = std::time::Instant::now();
            while self.0.load(std::sync::atomic::Ordering::SeqCst) < 100 && t.elapsed().as_secs() < 10 {
                std::thread::yield_now();
            }
        }
        fn merge_field(
            &mut self,
            tag: u32,
            wire_type: prost::encoding::WireType,
            buf: &mut impl bytes::Buf,
            ctx: prost::encoding::DecodeContext,
        ) -> Result<(), prost::DecodeError> {
            prost::encoding::skip_field(wire_type, tag, buf, ctx)
        }
        fn encoded_len(&self) -> usize {
            ENCODE_OFF_WORKER_BYTES
        }
        fn clear(&mut self) {}
    }

    /// With one worker (a member's default), other tasks keep running while a response is
    /// encoded: tonic's own body encoder, polled on the worker as a connection task polls it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_large_encode_leaves_the_only_worker_to_the_other_tasks() {
        use http_body_util::BodyExt;
        use std::sync::atomic::Ordering;
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ticker = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                loop {
                    ticks.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                }
            })
        };
        // Tasks, not this test's own thread: the encode must run on the worker.
        let msg = WaitsForOthers(ticks.clone());
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            let source = futures::stream::iter([Ok::<_, Status>(msg)]);
            let encoder = QuorateCodec::<WaitsForOthers, WaitsForOthers>::default().encoder();
            let body = tonic::codec::EncodeBody::new_server(encoder, source, None, Default::default(), None);
            let mut body = std::pin::pin!(body);
            body.frame().await.expect("a frame").expect("encoded");
        })
        .await
        .unwrap();
        ticker.abort();
        assert!(
            started.elapsed().as_secs() < 5,
            "the encode held the only worker for {:?} (ticks seen: {})",
            started.elapsed(),
            ticks.load(Ordering::SeqCst)
        );
    }
}
