//! Pruning of unknown fields against a CRD's structural schema, as the real server does on
//! every write: a field the schema does not declare is dropped silently (a controller
//! writing an undeclared status field sees it vanish here as on a cluster).

use serde_json::{Map, Value};

/// Prunes a whole custom object: apiVersion, kind and metadata are always kept.
pub(crate) fn prune_object(obj: &mut Value, schema: &Value) {
    let Value::Object(root) = obj else { return };
    let props = schema.get("properties").and_then(Value::as_object);
    let preserve = preserves_unknown(schema);
    root.retain(|k, _| {
        matches!(k.as_str(), "apiVersion" | "kind" | "metadata")
            || preserve
            || props.is_some_and(|p| p.contains_key(k))
    });
    if let Some(props) = props {
        for (k, v) in root.iter_mut() {
            if k == "metadata" {
                continue;
            }
            if let Some(s) = props.get(k) {
                prune(v, s);
            }
        }
    }
}

/// The fields [`prune_object`] would drop from `obj`, as the real server names them in a
/// strict decoding error (`spec.color`, `spec.items[0].x`), in document order.
pub(crate) fn unknown_fields(obj: &Value, schema: &Value) -> Vec<String> {
    let mut pruned = obj.clone();
    prune_object(&mut pruned, schema);
    let mut out = Vec::new();
    dropped(obj, &pruned, "", &mut out);
    out
}

fn dropped(before: &Value, after: &Value, path: &str, out: &mut Vec<String>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            for (k, v) in b {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match a.get(k) {
                    Some(kept) => dropped(v, kept, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(b), Value::Array(a)) => {
            for (i, (v, kept)) in b.iter().zip(a).enumerate() {
                dropped(v, kept, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn preserves_unknown(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
}

fn prune(value: &mut Value, schema: &Value) {
    match value {
        Value::Object(map) => prune_map(map, schema),
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    prune(item, item_schema);
                }
            }
        }
        _ => {}
    }
}

fn prune_map(map: &mut Map<String, Value>, schema: &Value) {
    let embedded = schema
        .get("x-kubernetes-embedded-resource")
        .and_then(Value::as_bool)
        == Some(true);
    let preserve = preserves_unknown(schema);
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    if additional.is_none() && !preserve {
        map.retain(|k, _| {
            props.is_some_and(|p| p.contains_key(k))
                || (embedded && matches!(k.as_str(), "apiVersion" | "kind" | "metadata"))
        });
    }
    for (k, v) in map.iter_mut() {
        match (props.and_then(|p| p.get(k)), additional) {
            (Some(s), _) => prune(v, s),
            (None, Some(s)) => prune(v, s),
            (None, None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {
                "size": {"type": "integer"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "items": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "empty": {"type": "object"}}}}})
    }

    #[test]
    fn undeclared_fields_are_dropped_at_every_level() {
        let mut obj = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a", "labels": {"k": "v"}},
            "extra": 1,
            "spec": {"size": 1, "bogus": true,
                     "labels": {"a": "b"},
                     "items": [{"name": "n", "junk": 1}],
                     "free": {"anything": {"goes": 1}},
                     "empty": {"dropped": 1}}});
        prune_object(&mut obj, &schema());
        assert_eq!(
            obj,
            json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a", "labels": {"k": "v"}},
                "spec": {"size": 1, "labels": {"a": "b"}, "items": [{"name": "n"}],
                         "free": {"anything": {"goes": 1}}, "empty": {}}})
        );
    }
}
