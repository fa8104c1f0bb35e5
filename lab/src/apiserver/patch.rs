//! PATCH bodies: JSON merge patch, JSON patch, an approximate strategic merge patch, and
//! server-side apply (merge without field ownership).

use serde_json::{Map, Value};

use super::error::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PatchKind {
    Merge,
    Json,
    Strategic,
    Apply,
}

impl PatchKind {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let base = ct.split(';').next().unwrap_or("").trim();
        match base {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/json-patch+json" => Some(Self::Json),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// Parses a patch body of the given kind (apply bodies are YAML, a superset of JSON).
pub(crate) fn parse_body(kind: PatchKind, body: &[u8]) -> Result<Value, ApiError> {
    let parsed: Result<Value, String> = match kind {
        PatchKind::Apply => serde_yaml::from_slice(body).map_err(|e| e.to_string()),
        _ => serde_json::from_slice(body).map_err(|e| e.to_string()),
    };
    parsed.map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))
}

/// Applies `patch` to `doc`.
pub(crate) fn apply(kind: PatchKind, doc: &mut Value, patch: &Value) -> Result<(), ApiError> {
    match kind {
        PatchKind::Merge | PatchKind::Apply => {
            json_patch::merge(doc, patch);
            Ok(())
        }
        PatchKind::Strategic => {
            strategic_merge(doc, patch);
            Ok(())
        }
        PatchKind::Json => {
            super::limits::check_json_patch_copies(doc, patch)?;
            let ops: json_patch::Patch =
                serde_json::from_value(null_tests_on_missing_paths_pass(doc, patch))
                    .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(doc, &ops).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the JSON patch could not be applied: {e}"),
                )
            })
        }
    }
}

/// What a field manager's apply means relative to its previous apply: fields it applied
/// before and omits now become `null` (removed by the merge that follows). Lists are
/// atomic here, as without `x-kubernetes-list-type: map` on the real server.
pub(crate) fn with_removals(last: &Value, new: &Value) -> Value {
    match (last, new) {
        (Value::Object(l), Value::Object(n)) => {
            let mut out = Map::new();
            for (k, nv) in n {
                let v = match l.get(k) {
                    Some(lv) => with_removals(lv, nv),
                    None => nv.clone(),
                };
                out.insert(k.clone(), v);
            }
            for k in l.keys().filter(|k| !n.contains_key(*k)) {
                out.insert(k.clone(), Value::Null);
            }
            Value::Object(out)
        }
        _ => new.clone(),
    }
}

/// The real server's JSON patch treats a missing path as null for `test` (kube-runtime's
/// finalizer helper relies on it: `test /metadata/finalizers == null` before the first add);
/// the json-patch crate fails such a test, so those ops are dropped up front.
fn null_tests_on_missing_paths_pass(doc: &Value, patch: &Value) -> Value {
    let Value::Array(ops) = patch else {
        return patch.clone();
    };
    let keep = |op: &&Value| {
        let is_null_test = op.get("op").and_then(Value::as_str) == Some("test")
            && op.get("value").is_some_and(Value::is_null);
        let missing = op
            .get("path")
            .and_then(Value::as_str)
            .is_some_and(|p| doc.pointer(p).is_none());
        !(is_null_test && missing)
    };
    Value::Array(ops.iter().filter(keep).cloned().collect())
}

/// Lists merged by key instead of replaced (the common `patchMergeKey`s of built-in types).
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "volumeMounts"
        | "imagePullSecrets" => Some("name"),
        "conditions" => Some("type"),
        "ports" => Some("containerPort"),
        _ => None,
    }
}

/// Strategic merge patch, approximated: merge semantics plus keyed list merging for the
/// well-known lists above, `$patch: delete|replace` and `$deleteFromPrimitiveList`; other
/// directives (`$setElementOrder`, `$retainKeys`) are dropped so they never reach storage.
pub(crate) fn strategic_merge(doc: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *doc = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut clean = p.clone();
        clean.remove("$patch");
        *doc = Value::Object(clean);
        return;
    }
    if !doc.is_object() {
        *doc = Value::Object(Map::new());
    }
    let Value::Object(d) = doc else { return };
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(remove)) = (d.get_mut(field), v) {
                list.retain(|x| !remove.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        match v {
            Value::Null => {
                d.remove(k);
            }
            Value::Object(o) if o.get("$patch").and_then(Value::as_str) == Some("delete") => {
                d.remove(k);
            }
            Value::Object(_) => strategic_merge(d.entry(k.clone()).or_insert(Value::Null), v),
            Value::Array(items) => match (merge_key(k), d.get_mut(k)) {
                (Some(key), Some(Value::Array(existing))) => merge_keyed_list(existing, items, key),
                _ => {
                    d.insert(k.clone(), Value::Array(strip_directives(items)));
                }
            },
            _ => {
                d.insert(k.clone(), v.clone());
            }
        }
    }
}

fn strip_directives(items: &[Value]) -> Vec<Value> {
    items
        .iter()
        .filter(|i| i.get("$patch").is_none())
        .map(|i| {
            let mut i = i.clone();
            if let Value::Object(o) = &mut i {
                o.retain(|k, _| !k.starts_with('$'));
            }
            i
        })
        .collect()
}

fn merge_keyed_list(existing: &mut Vec<Value>, items: &[Value], key: &str) {
    for item in items {
        let Some(id) = item.get(key).cloned() else {
            existing.push(item.clone());
            continue;
        };
        let pos = existing.iter().position(|e| e.get(key) == Some(&id));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                existing.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_merge(&mut existing[i], item),
            (None, false) => {
                let mut fresh = Value::Null;
                strategic_merge(&mut fresh, item);
                existing.push(fresh);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merge_merges_conditions_by_type() {
        let mut doc = json!({"status": {"conditions": [
            {"type": "Ready", "status": "False"}, {"type": "Progressing", "status": "True"}]}});
        strategic_merge(
            &mut doc,
            &json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        assert_eq!(
            doc,
            json!({"status": {"conditions": [
                {"type": "Ready", "status": "True"}, {"type": "Progressing", "status": "True"}]}})
        );
    }

    #[test]
    fn strategic_merge_drops_kubectl_directives() {
        let mut doc = json!({"spec": {"containers": [{"name": "a", "image": "x"}]}});
        strategic_merge(
            &mut doc,
            &json!({"spec": {"$setElementOrder/containers": [{"name": "a"}],
                             "containers": [{"name": "a", "image": "y"}]}}),
        );
        assert_eq!(
            doc,
            json!({"spec": {"containers": [{"name": "a", "image": "y"}]}})
        );
    }
}
