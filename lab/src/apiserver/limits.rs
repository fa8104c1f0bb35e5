//! Size limits, with the real server's answers (measured against kube-apiserver v1.37.2
//! with its embedded etcd at default settings, `.lab/bin/controlplane`):
//!
//! | what | limit | answer |
//! |---|---|---|
//! | a request body (create, update, any patch) | 3 MiB (`--max-request-bytes` default 3145728) | 413 `RequestEntityTooLarge` "Request entity too large: limit is 3145728" |
//! | the values a JSON patch copies, summed | 3 MiB | 422 `Invalid` "the server rejected our request due to an error in our request", `details: {}` |
//! | a Secret's or ConfigMap's data (keys + values) | 1 MiB | 422 `Invalid` "Secret \"x\" is invalid: data: Too long: may not be more than 1048576 bytes" (ConfigMap: field `[]`) |
//! | the etcd write (the stored object plus its key) | gRPC client 2 MiB | 500, no reason: "rpc error: code = ResourceExhausted desc = trying to send message larger than max (N vs. 2097152)" |
//! | the etcd write | etcd `--max-request-bytes` 1.5 MiB (1572864) | 500, no reason: "etcdserver: request is too large" |
//!
//! The first three are exact. The etcd ones depend on the size of the object as stored:
//! the real server stores built-in kinds as protobuf and custom objects as CBOR, with
//! `managedFields`; the emulator measures its own JSON (no managedFields) plus the key, so
//! objects within a few hundred bytes of a limit may land on the other side of it, and the
//! `N` in the gRPC message is the emulator's estimate.

use serde_json::{Value, json};

use super::error::ApiError;

/// kube-apiserver's default `--max-request-bytes`.
pub(crate) const MAX_REQUEST_BODY_BYTES: usize = 3 * 1024 * 1024;
/// The etcd client's gRPC send limit as kube-apiserver configures it.
const GRPC_MAX_SEND_BYTES: usize = 2 * 1024 * 1024;
/// etcd's default `--max-request-bytes`.
const ETCD_MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// Bytes a raft request adds around the transaction (header, request id).
const RAFT_OVERHEAD: usize = 16;
/// Bytes a transaction adds around the key and value (measured: a custom object whose stored
/// form is L bytes is sent as L + 325 with a 42-byte key).
const TXN_OVERHEAD: usize = 24;
/// Secret and ConfigMap data (keys plus values) limit.
const MAX_DATA_BYTES: usize = 1024 * 1024;

/// A request body over the server's limit.
pub(crate) fn check_body(len: usize) -> Result<(), ApiError> {
    if len > MAX_REQUEST_BODY_BYTES {
        return Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: limit is {MAX_REQUEST_BODY_BYTES}"),
        ));
    }
    Ok(())
}

/// A JSON patch whose `copy` operations copy more than the request limit in total
/// (kube-apiserver sets json-patch's AccumulatedCopySizeLimit to the request limit).
/// Sizes are taken from `doc` before the patch.
pub(crate) fn check_json_patch_copies(doc: &Value, patch: &Value) -> Result<(), ApiError> {
    let Some(ops) = patch.as_array() else {
        return Ok(());
    };
    let copied: usize = ops
        .iter()
        .filter(|op| op.get("op").and_then(Value::as_str) == Some("copy"))
        .filter_map(|op| op.get("from").and_then(Value::as_str))
        .filter_map(|from| doc.pointer(from))
        .map(|v| serde_json::to_vec(v).map(|b| b.len()).unwrap_or(0))
        .sum();
    if copied > MAX_REQUEST_BODY_BYTES {
        return Err(ApiError {
            details: Some(json!({})),
            ..ApiError::new(
                422,
                "Invalid",
                "the server rejected our request due to an error in our request",
            )
        });
    }
    Ok(())
}

/// Secret and ConfigMap validation: their data may hold at most 1 MiB.
pub(crate) fn check_data(plural: &str, obj: &Value) -> Result<(), ApiError> {
    let (kind, field, maps): (&str, &str, &[&str]) = match plural {
        "secrets" => ("Secret", "data", &["data"]),
        "configmaps" => ("ConfigMap", "[]", &["data", "binaryData"]),
        _ => return Ok(()),
    };
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut total = 0;
    for map in maps {
        let Some(m) = obj.get(*map).and_then(Value::as_object) else {
            continue;
        };
        for (k, v) in m {
            let s = v.as_str().unwrap_or_default();
            // Secret data and ConfigMap binaryData count their decoded bytes.
            let decoded = (*map != "data" || plural == "secrets")
                .then(|| b64.decode(s).ok().map(|b| b.len()))
                .flatten();
            total += k.len() + decoded.unwrap_or(s.len());
        }
    }
    if total <= MAX_DATA_BYTES {
        return Ok(());
    }
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let detail = format!("Too long: may not be more than {MAX_DATA_BYTES} bytes");
    Err(ApiError {
        details: Some(json!({
            "name": name, "kind": kind,
            "causes": [{"reason": "FieldValueTooLong", "message": detail, "field": field}],
        })),
        ..ApiError::new(
            422,
            "Invalid",
            format!("{kind} \"{name}\" is invalid: {field}: {detail}"),
        )
    })
}

/// The etcd write of `obj` under `key` (`/registry/...`): refused as etcd or its client
/// would refuse it.
pub(crate) fn check_stored(key: &str, obj: &Value) -> Result<(), ApiError> {
    let value = serde_json::to_vec(obj).map(|b| b.len()).unwrap_or(0);
    let message = 2 * key.len() + value + TXN_OVERHEAD;
    if message > GRPC_MAX_SEND_BYTES {
        return Err(ApiError::new(
            500,
            "",
            format!(
                "rpc error: code = ResourceExhausted desc = trying to send message larger than max ({message} vs. {GRPC_MAX_SEND_BYTES})"
            ),
        ));
    }
    if message + RAFT_OVERHEAD > ETCD_MAX_REQUEST_BYTES {
        return Err(ApiError::new(500, "", "etcdserver: request is too large"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_over_three_mebibytes_are_413() {
        assert!(check_body(MAX_REQUEST_BODY_BYTES).is_ok());
        let e = check_body(MAX_REQUEST_BODY_BYTES + 1).unwrap_err();
        assert_eq!((e.code, e.reason), (413, "RequestEntityTooLarge"));
        assert_eq!(e.message, "Request entity too large: limit is 3145728");
    }

    #[test]
    fn secret_data_counts_decoded_bytes() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let secret =
            |n: usize| json!({"metadata": {"name": "s"}, "data": {"k": b64.encode(vec![b'a'; n])}});
        assert!(check_data("secrets", &secret(MAX_DATA_BYTES - 1)).is_ok());
        let e = check_data("secrets", &secret(MAX_DATA_BYTES)).unwrap_err();
        assert_eq!(
            e.message,
            "Secret \"s\" is invalid: data: Too long: may not be more than 1048576 bytes"
        );
    }

    #[test]
    fn etcd_limits_answer_like_etcd() {
        let obj = |n: usize| json!({"spec": {"x": "a".repeat(n)}});
        assert!(check_stored("/registry/k", &obj(1_500_000)).is_ok());
        let e = check_stored("/registry/k", &obj(1_600_000)).unwrap_err();
        assert_eq!((e.code, e.reason), (500, ""));
        assert_eq!(e.message, "etcdserver: request is too large");
        let e = check_stored("/registry/k", &obj(2_500_000)).unwrap_err();
        assert!(e.message.starts_with("rpc error: code = ResourceExhausted"));
        assert!(e.message.ends_with(" vs. 2097152)"), "{}", e.message);
    }
}
