//! Label and field selectors, parsed once per request and matched against stored JSON.

use serde_json::Value;

use super::error::ApiError;

#[derive(Clone, Debug, PartialEq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector` query: all requirements must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct LabelSelector(Vec<LabelReq>);

/// Splits on commas outside parentheses (`a in (x,y),b` is two requirements), as the
/// plugin's `-l` does; blank parts dropped.
fn split_top_level(s: &str) -> Vec<&str> {
    guestcred_api::selector::split_terms(s)
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_set(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

impl LabelSelector {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let bad = || ApiError::bad_request(format!("unable to parse requirement: {s:?}"));
        let mut reqs = Vec::new();
        for part in split_top_level(s) {
            let req = if let Some(key) = part.strip_prefix('!') {
                LabelReq::NotExists(key.trim().to_string())
            } else if let Some((k, v)) = part.split_once("!=") {
                LabelReq::NotEq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = part.split_once("==") {
                LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = part.split_once('=') {
                LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, set)) = part.split_once(" notin ") {
                LabelReq::NotIn(k.trim().to_string(), parse_set(set).ok_or_else(bad)?)
            } else if let Some((k, set)) = part.split_once(" in ") {
                LabelReq::In(k.trim().to_string(), parse_set(set).ok_or_else(bad)?)
            } else {
                LabelReq::Exists(part.trim().to_string())
            };
            let key = match &req {
                LabelReq::Eq(k, _)
                | LabelReq::NotEq(k, _)
                | LabelReq::In(k, _)
                | LabelReq::NotIn(k, _)
                | LabelReq::Exists(k)
                | LabelReq::NotExists(k) => k,
            };
            if !valid_key(key) {
                return Err(bad());
            }
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }
}

/// Field paths every resource supports here (the real server's set differs per kind).
const COMMON_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "status.phase",
];

/// Extra field paths of some kinds, as the real server offers them (kubectl describe
/// selects Events by `involvedObject.*`).
pub(crate) fn kind_fields(group: &str, plural: &str) -> &'static [&'static str] {
    match (group, plural) {
        ("", "events") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "type",
        ],
        ("events.k8s.io", "events") => &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "regarding.apiVersion",
            "reason",
            "reportingController",
            "type",
        ],
        ("", "secrets") => &["type"],
        _ => &[],
    }
}

/// A parsed `fieldSelector` query.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `extra`: the kind's own field paths on top of the common ones.
    pub fn parse(s: &str, extra: &[&str]) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for part in split_top_level(s) {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                )));
            };
            let field = field.trim();
            if !COMMON_FIELDS.contains(&field) && !extra.contains(&field) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            let pointer = format!("/{}", field.replace('.', "/"));
            reqs.push((pointer, equal, value.trim().to_string()));
        }
        Ok(Self(reqs))
    }

    /// The same requirements with fields renamed (`rename` answers None to keep a name):
    /// a view's field names to the stored ones.
    pub fn renamed(mut self, rename: impl Fn(&str) -> Option<String>) -> Self {
        for (pointer, _, _) in &mut self.0 {
            let field = pointer[1..].replace('/', ".");
            if let Some(stored) = rename(&field) {
                *pointer = format!("/{}", stored.replace('.', "/"));
            }
        }
        self
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(pointer, equal, value)| {
            let actual = obj.pointer(pointer).and_then(Value::as_str).unwrap_or("");
            (actual == value) == *equal
        })
    }

    /// `metadata.name=x` lets a list or watch skip every other object.
    pub fn exact_name(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|(p, eq, _)| *p == "/metadata/name" && *eq)
            .map(|(_, _, v)| v.as_str())
    }
}

/// The body of the `selectors` fuzz target (fuzz/fuzz_targets/selectors.rs), replayed over
/// its committed corpus by `cargo test` (lab/tests/fuzz_corpus.rs). Input: the first byte
/// picks a kind's extra field paths (none, core Events, events.k8s.io Events, Secrets);
/// the rest is text, one item per line: a label selector, a field selector, the object's
/// labels (`k=v,k=v`), then values for the field paths in order (common ones first).
/// Properties, besides never panicking:
/// - a selector is the conjunction of its top-level parts: it parses exactly when every
///   part parses alone, and matches exactly when every part matches alone;
/// - `exact_name` (which lets a list skip every other object) is sound: an object that
///   matches has that name;
/// - renaming fields to themselves changes nothing.
pub fn fuzz_selectors(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let extra = match kind % 4 {
        0 => &[][..],
        1 => kind_fields("", "events"),
        2 => kind_fields("events.k8s.io", "events"),
        _ => kind_fields("", "secrets"),
    };
    let text = String::from_utf8_lossy(rest);
    let mut lines = text.split('\n');
    let (labels, fields) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    let mut obj = serde_json::json!({"metadata": {
        "labels": lines.next().unwrap_or("").split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), Value::from(v)))
            .collect::<serde_json::Map<_, _>>(),
    }});
    for (path, value) in COMMON_FIELDS.iter().chain(extra).zip(lines) {
        let mut at = &mut obj;
        for key in path.split('.') {
            at = &mut at[key];
        }
        *at = Value::from(value);
    }
    let obj = obj;

    let label_sel = LabelSelector::parse(labels);
    let label_parts: Vec<_> = split_top_level(labels)
        .into_iter()
        .map(LabelSelector::parse)
        .collect();
    assert_eq!(label_sel.is_ok(), label_parts.iter().all(Result::is_ok));
    if let Ok(sel) = &label_sel {
        let each = label_parts.iter().flatten().all(|p| p.matches(&obj));
        assert_eq!(sel.matches(&obj), each, "{labels:?} on {obj}");
    }

    let field_sel = FieldSelector::parse(fields, extra);
    let field_parts: Vec<_> = split_top_level(fields)
        .into_iter()
        .map(|p| FieldSelector::parse(p, extra))
        .collect();
    assert_eq!(field_sel.is_ok(), field_parts.iter().all(Result::is_ok));
    let Ok(sel) = field_sel else {
        return;
    };
    let matches = sel.matches(&obj);
    let each = field_parts.iter().flatten().all(|p| p.matches(&obj));
    assert_eq!(matches, each, "{fields:?} on {obj}");
    if let (true, Some(name)) = (matches, sel.exact_name()) {
        let actual = obj.pointer("/metadata/name").and_then(Value::as_str);
        assert_eq!(actual.unwrap_or(""), name, "{fields:?} on {obj}");
    }
    assert_eq!(sel.clone().renamed(|_| None), sel);
    assert_eq!(sel.clone().renamed(|f| Some(f.to_string())), sel);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labelled(labels: Value) -> Value {
        json!({"metadata": {"name": "x", "labels": labels}})
    }

    #[test]
    fn set_based_requirements_match_like_the_real_server() {
        let sel = LabelSelector::parse("tier in (db, web),env notin (prod),app,!legacy").unwrap();
        assert!(sel.matches(&labelled(json!({"tier": "db", "app": "a"}))));
        assert!(!sel.matches(&labelled(json!({"tier": "db", "app": "a", "env": "prod"}))));
        assert!(!sel.matches(&labelled(json!({"tier": "db"}))));
        assert!(!sel.matches(&labelled(json!({"tier": "db", "app": "a", "legacy": "1"}))));
    }

    #[test]
    fn not_equal_matches_objects_without_the_label() {
        let sel = LabelSelector::parse("env!=prod").unwrap();
        assert!(sel.matches(&labelled(json!({}))));
    }

    #[test]
    fn unsupported_field_is_rejected() {
        assert_eq!(
            FieldSelector::parse("spec.foo=bar", &[]).unwrap_err().code,
            400
        );
    }
}
