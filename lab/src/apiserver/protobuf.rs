//! Protobuf request bodies (`application/vnd.kubernetes.protobuf`).
//!
//! kubectl 1.32+ sends built-in kinds it creates itself as protobuf (`kubectl create ns`,
//! `create secret generic --from-file`, `create configmap`, `create serviceaccount`, the
//! SelfSubjectAccessReview of `auth can-i`). The body is the `k8s\0` magic followed by a
//! `runtime.Unknown` whose `raw` is the object's own message. Both are decoded with the
//! prost types of the `k8s-pb` crate (kube-rs' generated bindings of the upstream
//! `generated.proto` files; the wire format has been stable across releases, so its 1.3x
//! messages read what kubectl 1.27–1.35 sends). The object is then converted to the JSON
//! the rest of the emulator works on. `k8s-pb` has no serde, so that mapping is written
//! here, one kind at a time: kinds not listed answer 415 as before, naming the kind. Answers
//! stay JSON, which every client that sends protobuf also accepts.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_pb::api::authorization::v1 as authz;
use k8s_pb::api::core::v1 as core;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use prost::Message;
use serde_json::{Map, Value, json};

use super::error::ApiError;

/// The media type kubectl sends protobuf bodies as.
pub(crate) const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";
/// The prefix of every Kubernetes protobuf message.
const MAGIC: &[u8] = b"k8s\0";

fn bad(message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("error decoding request body: {message}"))
}

/// Decodes a protobuf request body into the object's JSON form.
pub(crate) fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let payload = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad("protobuf body without the k8s\\0 prefix"))?;
    let unknown = Unknown::decode(payload).map_err(bad)?;
    if unknown
        .content_encoding
        .as_deref()
        .is_some_and(|e| !e.is_empty())
    {
        return Err(bad("content-encoded protobuf bodies are not supported"));
    }
    let type_meta = unknown.type_meta.unwrap_or_default();
    let api_version = type_meta.api_version.unwrap_or_default();
    let kind = type_meta.kind.unwrap_or_default();
    let raw = unknown.raw.unwrap_or_default();
    let raw = raw.as_slice();
    let mut obj = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => namespace(core::Namespace::decode(raw).map_err(bad)?),
        ("v1", "Secret") => secret(core::Secret::decode(raw).map_err(bad)?),
        ("v1", "ConfigMap") => config_map(core::ConfigMap::decode(raw).map_err(bad)?),
        ("v1", "ServiceAccount") => {
            service_account(core::ServiceAccount::decode(raw).map_err(bad)?)
        }
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview") => {
            self_subject_access_review(authz::SelfSubjectAccessReview::decode(raw).map_err(bad)?)
        }
        _ => {
            return Err(ApiError::unsupported_media_type(&format!(
                "{MEDIA_TYPE} (the lab API server decodes protobuf only for Namespace, Secret, \
                 ConfigMap, ServiceAccount and SelfSubjectAccessReview, not {api_version} {kind})"
            )));
        }
    };
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(obj)
}

/// A JSON object holding `metadata`, for the fields that follow.
fn with_metadata(metadata: Option<meta::ObjectMeta>) -> Map<String, Value> {
    Map::from_iter([("metadata".to_string(), object_meta(metadata))])
}

/// Inserts `value` under `key` unless it is empty (as Go's `omitempty` leaves it out).
fn put(m: &mut Map<String, Value>, key: &str, value: Value) {
    let empty = match &value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    };
    if !empty {
        m.insert(key.to_string(), value);
    }
}

fn strings(map: BTreeMap<String, String>) -> Value {
    Value::Object(
        map.into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect(),
    )
}

fn bytes(map: BTreeMap<String, Vec<u8>>) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    Value::Object(
        map.into_iter()
            .map(|(k, v)| (k, Value::String(b64.encode(v))))
            .collect(),
    )
}

/// The client-settable part of ObjectMeta (the server sets the rest).
fn object_meta(m: Option<meta::ObjectMeta>) -> Value {
    let m = m.unwrap_or_default();
    let mut out = Map::new();
    put(&mut out, "name", json!(m.name));
    put(&mut out, "generateName", json!(m.generate_name));
    put(&mut out, "namespace", json!(m.namespace));
    put(&mut out, "resourceVersion", json!(m.resource_version));
    put(&mut out, "labels", strings(m.labels));
    put(&mut out, "annotations", strings(m.annotations));
    put(&mut out, "finalizers", json!(m.finalizers));
    let owners: Vec<Value> = m
        .owner_references
        .into_iter()
        .map(|o| {
            let mut r = Map::new();
            put(&mut r, "apiVersion", json!(o.api_version));
            put(&mut r, "kind", json!(o.kind));
            put(&mut r, "name", json!(o.name));
            put(&mut r, "uid", json!(o.uid));
            if let Some(c) = o.controller {
                r.insert("controller".into(), json!(c));
            }
            if let Some(b) = o.block_owner_deletion {
                r.insert("blockOwnerDeletion".into(), json!(b));
            }
            Value::Object(r)
        })
        .collect();
    put(&mut out, "ownerReferences", json!(owners));
    Value::Object(out)
}

fn namespace(ns: core::Namespace) -> Value {
    let mut out = with_metadata(ns.metadata);
    let finalizers = ns.spec.map(|s| s.finalizers).unwrap_or_default();
    if !finalizers.is_empty() {
        out.insert("spec".into(), json!({"finalizers": finalizers}));
    }
    Value::Object(out)
}

fn secret(s: core::Secret) -> Value {
    let mut out = with_metadata(s.metadata);
    put(&mut out, "data", bytes(s.data));
    put(&mut out, "stringData", strings(s.string_data));
    put(&mut out, "type", json!(s.r#type));
    put(&mut out, "immutable", json!(s.immutable));
    Value::Object(out)
}

fn config_map(c: core::ConfigMap) -> Value {
    let mut out = with_metadata(c.metadata);
    put(&mut out, "data", strings(c.data));
    put(&mut out, "binaryData", bytes(c.binary_data));
    put(&mut out, "immutable", json!(c.immutable));
    Value::Object(out)
}

fn service_account(sa: core::ServiceAccount) -> Value {
    let mut out = with_metadata(sa.metadata);
    let pull: Vec<Value> = sa
        .image_pull_secrets
        .into_iter()
        .map(|r| json!({"name": r.name}))
        .collect();
    put(&mut out, "imagePullSecrets", json!(pull));
    if let Some(a) = sa.automount_service_account_token {
        out.insert("automountServiceAccountToken".into(), json!(a));
    }
    Value::Object(out)
}

fn self_subject_access_review(r: authz::SelfSubjectAccessReview) -> Value {
    let spec = r.spec.unwrap_or_default();
    let mut s = Map::new();
    if let Some(a) = spec.resource_attributes {
        let mut m = Map::new();
        put(&mut m, "namespace", json!(a.namespace));
        put(&mut m, "verb", json!(a.verb));
        put(&mut m, "group", json!(a.group));
        put(&mut m, "version", json!(a.version));
        put(&mut m, "resource", json!(a.resource));
        put(&mut m, "subresource", json!(a.subresource));
        put(&mut m, "name", json!(a.name));
        s.insert("resourceAttributes".into(), Value::Object(m));
    }
    if let Some(a) = spec.non_resource_attributes {
        let mut m = Map::new();
        put(&mut m, "path", json!(a.path));
        put(&mut m, "verb", json!(a.verb));
        s.insert("nonResourceAttributes".into(), Value::Object(m));
    }
    json!({"metadata": object_meta(r.metadata), "spec": s})
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_pb::apimachinery::pkg::runtime::TypeMeta;

    /// A body as client-go's protobuf serializer writes it.
    pub(crate) fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let unknown = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        let mut body = MAGIC.to_vec();
        body.extend(unknown.encode_to_vec());
        body
    }

    #[test]
    fn a_secret_decodes_with_base64_data_and_labels() {
        let s = core::Secret {
            metadata: Some(meta::ObjectMeta {
                name: Some("pw".into()),
                labels: [("a".to_string(), "b".to_string())].into(),
                ..Default::default()
            }),
            data: [("password".to_string(), b"hunter2\n".to_vec())].into(),
            r#type: Some("Opaque".into()),
            ..Default::default()
        };
        let obj = decode(&envelope("v1", "Secret", s.encode_to_vec())).unwrap();
        assert_eq!(
            obj,
            json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                   "metadata": {"name": "pw", "labels": {"a": "b"}},
                   "data": {"password": "aHVudGVyMgo="}})
        );
    }

    #[test]
    fn unknown_kinds_and_bad_bodies_are_refused() {
        let e = decode(&envelope("apps/v1", "Deployment", vec![])).unwrap_err();
        assert_eq!(e.code, 415);
        assert!(e.message.contains("apps/v1 Deployment"), "{}", e.message);
        assert_eq!(decode(b"{}").unwrap_err().code, 400);
        assert_eq!(decode(b"k8s\0\xff\xff").unwrap_err().code, 400);
    }
}
