//! Protobuf messages to and from the state machine's plain types.

use quorate_kv as kv;

use crate::pb::etcdserverpb as pb;
use crate::pb::mvccpb;

pub fn kv_out(kv: kv::KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value,
        lease: kv.lease,
    }
}

pub fn event_out(e: &kv::Event, with_prev: bool) -> mvccpb::Event {
    mvccpb::Event {
        r#type: match e.kind {
            kv::EventKind::Put => mvccpb::event::EventType::Put as i32,
            kv::EventKind::Delete => mvccpb::event::EventType::Delete as i32,
        },
        kv: Some(kv_out((*e.kv).clone())),
        prev_kv: if with_prev { e.prev_kv.as_deref().cloned().map(kv_out) } else { None },
    }
}

pub fn range_in(r: pb::RangeRequest) -> kv::RangeRequest {
    kv::RangeRequest {
        key: r.key,
        range_end: r.range_end,
        limit: r.limit,
        revision: r.revision,
        sort_order: match r.sort_order {
            1 => kv::SortOrder::Ascend,
            2 => kv::SortOrder::Descend,
            _ => kv::SortOrder::None,
        },
        sort_target: match r.sort_target {
            1 => kv::SortTarget::Version,
            2 => kv::SortTarget::Create,
            3 => kv::SortTarget::Mod,
            4 => kv::SortTarget::Value,
            _ => kv::SortTarget::Key,
        },
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    }
}

pub fn range_out(r: kv::RangeResponse, header: pb::ResponseHeader) -> pb::RangeResponse {
    pb::RangeResponse {
        header: Some(header),
        kvs: r.kvs.into_iter().map(kv_out).collect(),
        more: r.more,
        count: r.count,
    }
}

pub fn put_in(p: pb::PutRequest) -> kv::PutRequest {
    kv::PutRequest {
        key: p.key,
        value: p.value,
        lease: p.lease,
        prev_kv: p.prev_kv,
        ignore_value: p.ignore_value,
        ignore_lease: p.ignore_lease,
    }
}

pub fn delete_in(d: pb::DeleteRangeRequest) -> kv::DeleteRangeRequest {
    kv::DeleteRangeRequest { key: d.key, range_end: d.range_end, prev_kv: d.prev_kv }
}

pub fn put_out(p: kv::PutResponse, header: pb::ResponseHeader) -> pb::PutResponse {
    pb::PutResponse { header: Some(header), prev_kv: p.prev_kv.map(kv_out) }
}

pub fn delete_out(d: kv::DeleteRangeResponse, header: pb::ResponseHeader) -> pb::DeleteRangeResponse {
    pb::DeleteRangeResponse {
        header: Some(header),
        deleted: d.deleted,
        prev_kvs: d.prev_kvs.into_iter().map(kv_out).collect(),
    }
}

pub fn txn_in(t: pb::TxnRequest) -> kv::TxnRequest {
    kv::TxnRequest {
        compare: t.compare.into_iter().map(compare_in).collect(),
        success: t.success.into_iter().filter_map(op_in).collect(),
        failure: t.failure.into_iter().filter_map(op_in).collect(),
    }
}

fn compare_in(c: pb::Compare) -> kv::Compare {
    use pb::compare::TargetUnion as U;
    let result = match c.result {
        1 => kv::CompareResult::Greater,
        2 => kv::CompareResult::Less,
        3 => kv::CompareResult::NotEqual,
        _ => kv::CompareResult::Equal,
    };
    // The target enum says what to compare; the union carries the operand (absent = zero).
    let target = match (c.target, c.target_union) {
        (0, Some(U::Version(v))) => kv::CompareTarget::Version(v),
        (0, _) => kv::CompareTarget::Version(0),
        (1, Some(U::CreateRevision(v))) => kv::CompareTarget::Create(v),
        (1, _) => kv::CompareTarget::Create(0),
        (2, Some(U::ModRevision(v))) => kv::CompareTarget::Mod(v),
        (2, _) => kv::CompareTarget::Mod(0),
        (3, Some(U::Value(v))) => kv::CompareTarget::Value(v),
        (3, _) => kv::CompareTarget::Value(Vec::new()),
        (_, Some(U::Lease(v))) => kv::CompareTarget::Lease(v),
        (_, _) => kv::CompareTarget::Lease(0),
    };
    kv::Compare { result, target, key: c.key, range_end: c.range_end }
}

/// Whether a Txn, nested Txns included, has an op with no request in it (etcd refuses such a Txn
/// with `key not found`; `txn_in` would drop the op). Walks each op once, with a stack.
pub fn has_empty_op(t: &pb::TxnRequest) -> bool {
    use pb::request_op::Request as R;
    let mut stack = vec![t];
    while let Some(t) = stack.pop() {
        for op in t.success.iter().chain(&t.failure) {
            match &op.request {
                None => return true,
                Some(R::RequestTxn(inner)) => stack.push(inner),
                Some(_) => {}
            }
        }
    }
    false
}

fn op_in(op: pb::RequestOp) -> Option<kv::RequestOp> {
    use pb::request_op::Request as R;
    Some(match op.request? {
        R::RequestRange(r) => kv::RequestOp::Range(range_in(r)),
        R::RequestPut(p) => kv::RequestOp::Put(put_in(p)),
        R::RequestDeleteRange(d) => kv::RequestOp::DeleteRange(delete_in(d)),
        R::RequestTxn(t) => kv::RequestOp::Txn(txn_in(t)),
    })
}

pub fn txn_out(t: kv::TxnResponse, header: &pb::ResponseHeader) -> pb::TxnResponse {
    use pb::response_op::Response as R;
    let responses = t
        .responses
        .into_iter()
        .map(|r| pb::ResponseOp {
            response: Some(match r {
                kv::ResponseOp::Range(r) => R::ResponseRange(range_out(r, *header)),
                kv::ResponseOp::Put(p) => R::ResponsePut(put_out(p, *header)),
                kv::ResponseOp::DeleteRange(d) => R::ResponseDeleteRange(delete_out(d, *header)),
                kv::ResponseOp::Txn(t) => R::ResponseTxn(txn_out(t, header)),
            }),
        })
        .collect();
    pb::TxnResponse { header: Some(*header), succeeded: t.succeeded, responses }
}
