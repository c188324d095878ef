//! The writes every registry actor makes to a record it has read: replace it, or delete it,
//! only if it has not changed since (its mod revision). Leader side effects additionally wrap
//! these in `Command::TermFenced`; that is the caller's choice.

use quorate_kv::{Compare, CompareResult, CompareTarget, DeleteRangeRequest, PutRequest, RequestOp, TxnRequest};

use crate::Instance;

fn unchanged(key: &[u8], mod_revision: i64) -> Compare {
    Compare {
        result: CompareResult::Equal,
        target: CompareTarget::Mod(mod_revision),
        key: key.to_vec(),
        range_end: vec![],
    }
}

/// Store `instance` under `key` if the record there still has `mod_revision`.
pub fn replace_if_unchanged(key: &[u8], mod_revision: i64, instance: &Instance) -> TxnRequest {
    let value = serde_json::to_vec(instance).expect("instances serialize");
    TxnRequest {
        compare: vec![unchanged(key, mod_revision)],
        success: vec![RequestOp::Put(PutRequest { key: key.to_vec(), value, ..Default::default() })],
        failure: vec![],
    }
}

/// Delete the record under `key` if it still has `mod_revision`.
pub fn delete_if_unchanged(key: &[u8], mod_revision: i64) -> TxnRequest {
    TxnRequest {
        compare: vec![unchanged(key, mod_revision)],
        success: vec![RequestOp::DeleteRange(DeleteRangeRequest { key: key.to_vec(), ..Default::default() })],
        failure: vec![],
    }
}
