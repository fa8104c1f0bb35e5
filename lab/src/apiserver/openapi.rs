//! /openapi/v3: an index and one document per group-version, built from registered kinds.
//!
//! Every PATCH operation advertises the `fieldValidation` query parameter, so kubectl
//! delegates validation to the server (which does not validate: see the module docs)
//! instead of downloading /openapi/v2 for client-side validation.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::GIT_VERSION;
use super::resources::ResourceType;
use super::store::Inner;

/// `api/v1` or `apis/<group>/<version>`.
fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn group_versions(inner: &Inner) -> BTreeSet<(String, String)> {
    inner
        .types()
        .flat_map(|t| t.versions.iter().map(|v| (t.group.clone(), v.name.clone())))
        .collect()
}

pub(crate) fn index(inner: &Inner) -> Value {
    let mut paths = Map::new();
    for (g, v) in group_versions(inner) {
        let path = gv_path(&g, &v);
        let Some(doc) = document(inner, &path) else {
            continue;
        };
        let hash = hex::encode(Sha256::digest(doc.to_string().as_bytes()));
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={}", hash.to_uppercase())}),
        );
    }
    json!({"paths": paths})
}

/// `io.k8s.api.core.v1.Secret` style for built-ins, reversed group for CRDs.
fn schema_id(rt: &ResourceType, version: &str) -> String {
    if rt.group.is_empty() {
        return format!("io.k8s.api.core.{version}.{}", rt.kind);
    }
    let reversed: Vec<&str> = rt.group.split('.').rev().collect();
    format!("{}.{version}.{}", reversed.join("."), rt.kind)
}

/// A kind's schema for the OpenAPI v2 definitions: the same as in v3.
pub(crate) fn schema_for_v2(rt: &ResourceType, version: &str) -> Value {
    schema_for(rt, version)
}

fn schema_for(rt: &ResourceType, version: &str) -> Value {
    let gvk = json!({"group": rt.group, "version": version, "kind": rt.kind});
    let mut schema = rt
        .version(version)
        .and_then(|v| v.schema.clone())
        .unwrap_or_else(|| json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
    if schema.get("properties").is_some() {
        schema["properties"]["apiVersion"] = json!({"type": "string"});
        schema["properties"]["kind"] = json!({"type": "string"});
        schema["properties"]["metadata"] =
            json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    }
    schema["x-kubernetes-group-version-kind"] = json!([gvk]);
    schema
}

pub(crate) fn document(inner: &Inner, gv: &str) -> Option<Value> {
    let mut types: Vec<(&ResourceType, String)> = Vec::new();
    for rt in inner.types() {
        for v in &rt.versions {
            if gv_path(&rt.group, &v.name) == gv {
                types.push((rt, v.name.clone()));
            }
        }
    }
    if types.is_empty() {
        return None;
    }
    types.sort_by(|a, b| a.0.plural.cmp(&b.0.plural));
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for (rt, version) in types {
        let gvk = json!({"group": rt.group, "version": version, "kind": rt.kind});
        let id = schema_id(rt, &version);
        let item = if rt.namespaced {
            format!("/{gv}/namespaces/{{namespace}}/{}/{{name}}", rt.plural)
        } else {
            format!("/{gv}/{}/{{name}}", rt.plural)
        };
        // The collection paths too, as the real server has them (namespaced kinds are also
        // listed across namespaces): kubectl 1.27's explain finds a kind's GVK only under
        // `/<gv>/<plural>`.
        let mut collections = vec![format!("/{gv}/{}", rt.plural)];
        if rt.namespaced {
            collections.push(format!("/{gv}/namespaces/{{namespace}}/{}", rt.plural));
        }
        let reference = json!({"$ref": format!("#/components/schemas/{id}")});
        let response = json!({"200": {"description": "OK", "content": {"application/json": {"schema": reference}}}});
        let query = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string"}});
        paths.insert(
            item,
            json!({
                "get": {"x-kubernetes-group-version-kind": gvk, "x-kubernetes-action": "get",
                        "responses": response},
                "patch": {"x-kubernetes-group-version-kind": gvk, "x-kubernetes-action": "patch",
                          "parameters": [query("dryRun"), query("fieldManager"),
                                         query("fieldValidation"), query("force")],
                          "responses": response},
            }),
        );
        for collection in collections {
            paths.insert(
                collection,
                json!({"get": {"x-kubernetes-group-version-kind": gvk, "x-kubernetes-action": "list",
                               "responses": {"200": {"description": "OK"}}}}),
            );
        }
        schemas.insert(id, schema_for(rt, &version));
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}
