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
