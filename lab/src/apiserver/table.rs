//! Server-side `Table` rendering (what `kubectl get` asks for), from printer columns.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::resources::ResourceType;

/// Evaluates the JSONPath subset printer columns use: `.a.b`, `.a[0].b`, and
/// `.a[?(@.type=="Ready")].status`. Returns every match (a filter may match several).
pub(crate) fn eval_path<'a>(obj: &'a Value, path: &str) -> Vec<&'a Value> {
    let path = path.trim();
    let path = path
        .strip_prefix('{')
        .and_then(|p| p.strip_suffix('}'))
        .unwrap_or(path);
    let mut current = vec![obj];
    let mut rest = path.strip_prefix('$').unwrap_or(path);
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let field = &r[..end];
            rest = &r[end..];
            if field.is_empty() {
                continue;
            }
            current = current.into_iter().filter_map(|v| v.get(field)).collect();
        } else if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else {
                return Vec::new();
            };
            let inner = &r[..end];
            rest = &r[end + 1..];
            current = index(current, inner);
        } else {
            return Vec::new();
        }
    }
    current
}

fn index<'a>(current: Vec<&'a Value>, inner: &str) -> Vec<&'a Value> {
    let items = current
        .into_iter()
        .filter_map(Value::as_array)
        .flat_map(|a| a.iter());
    if inner == "*" {
        return items.collect();
    }
    if let Ok(i) = inner.parse::<usize>() {
        return items.skip(i).take(1).collect();
    }
    // ?(@.field=="value") or ?(@.field=='value')
    let Some(cond) = inner.strip_prefix("?(@.").and_then(|c| c.strip_suffix(')')) else {
        return Vec::new();
    };
    let Some((field, value)) = cond.split_once("==") else {
        return Vec::new();
    };
    let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
    let field = field.trim();
    items
        .filter(|item| {
            eval_path(item, &format!(".{field}"))
                .first()
                .is_some_and(|v| match v {
                    Value::String(s) => s == value,
                    Value::Number(n) => n.to_string() == value,
                    Value::Bool(b) => b.to_string() == value,
                    _ => false,
                })
        })
        .collect()
}

/// Like Kubernetes' `duration.HumanDuration`: "45s", "3m12s", "5h", "12d".
pub(crate) fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    let m = s / 60;
    let h = m / 60;
    let d = h / 24;
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        two_units(m, 'm', s % 60, 's')
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        two_units(h, 'h', m % 60, 'm')
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        two_units(d, 'd', h % 24, 'h')
    } else if h < 24 * 365 * 2 {
        format!("{d}d")
    } else {
        format!("{}y", d / 365)
    }
}

/// "3m12s" from (3, 'm', 12, 's'); "3m" when the rest is 0.
fn two_units(n: i64, unit: char, rest: i64, rest_unit: char) -> String {
    if rest == 0 {
        format!("{n}{unit}")
    } else {
        format!("{n}{unit}{rest}{rest_unit}")
    }
}

fn cell(values: &[&Value], type_: &str) -> Value {
    let Some(first) = values.first() else {
        return Value::Null;
    };
    if type_ == "date" {
        return match first
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        {
            Some(t) => json!(human_duration(
                (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds()
            )),
            None => json!("<unknown>"),
        };
    }
    if values.len() > 1 {
        let joined: Vec<String> = values
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect();
        return json!(joined.join(","));
    }
    match first {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => (*first).clone(),
        other => json!(other.to_string()),
    }
}

/// A meta.k8s.io/v1 Table of `objs`; rows carry PartialObjectMetadata unless
/// `includeObject=None|Object` says otherwise.
pub(crate) fn render(
    rt: &ResourceType,
    version: &str,
    objs: &[&Value],
    rv: u64,
    params: &HashMap<String, String>,
) -> Value {
    let columns = rt
        .version(version)
        .map(|v| v.columns.clone())
        .unwrap_or_default();
    let mut defs = vec![json!({
        "name": "Name", "type": "string", "format": "name", "priority": 0,
        "description": "Name must be unique within a namespace.",
    })];
    defs.extend(columns.iter().map(|c| {
        json!({"name": c.name, "type": c.type_, "format": c.format,
               "description": c.description, "priority": c.priority})
    }));
    let include = params.get("includeObject").map(String::as_str);
    let api_version = rt.api_version(version);
    let rows: Vec<Value> = objs
        .iter()
        .map(|obj| {
            let mut cells = vec![
                obj.pointer("/metadata/name")
                    .cloned()
                    .unwrap_or(Value::Null),
            ];
            cells.extend(
                columns
                    .iter()
                    .map(|c| cell(&eval_path(obj, &c.json_path), &c.type_)),
            );
            let mut row = json!({"cells": cells});
            match include {
                Some("None") => {}
                Some("Object") => {
                    let mut full = (*obj).clone();
                    full["apiVersion"] = json!(api_version);
                    row["object"] = full;
                }
                _ => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                        "metadata": obj.get("metadata").cloned().unwrap_or_default(),
                    });
                }
            }
            row
        })
        .collect();
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": defs, "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_expression_picks_the_matching_condition() {
        let obj = json!({"status": {"conditions": [
            {"type": "Progressing", "status": "False"}, {"type": "Ready", "status": "True"}]}});
        let got = eval_path(&obj, r#".status.conditions[?(@.type=="Ready")].status"#);
        assert_eq!(got, vec![&json!("True")]);
    }

    #[test]
    fn human_duration_matches_kubectl_style() {
        assert_eq!(human_duration(45), "45s");
        assert_eq!(human_duration(192), "3m12s");
        assert_eq!(human_duration(3 * 3600), "3h");
        assert_eq!(human_duration(3 * 86400 + 3600), "3d1h");
        assert_eq!(human_duration(180), "3m");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
        assert_eq!(human_duration(3 * 86400), "3d");
    }
}
