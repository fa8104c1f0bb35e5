//! How clients see stored objects. Every kind is served as stored, except Events: as on a
//! real API server, core/v1 `events` and events.k8s.io/v1 `events` are one set of objects
//! in two shapes.
//!
//! Events are stored once, in core/v1 shape, under the core type. Requests through
//! events.k8s.io/v1 are converted on the way in ([`View::to_storage`]) and out
//! ([`View::present`]), and their field selectors name the stored fields
//! ([`View::storage_field`]). The shapes differ in field names only ([`RENAMED`]), so the
//! conversion is exact both ways, and patches apply to it ([`View::to_shape`]).
//!
//! Reads also fill a view's unset fields from their counterparts in the other shape, so
//! clients of either API see complete Events (the real server leaves them empty; kubectl
//! and most tools fall back to the other fields themselves):
//! - core/v1: `count` ← `series.count` (1 for an event seen once: `eventTime` without
//!   `series`), `firstTimestamp` ← `eventTime`, `lastTimestamp` ← `series.lastObservedTime`
//!   or `eventTime`, `source.component` ← `reportingComponent`, `source.host` ←
//!   `reportingInstance`;
//! - events.k8s.io/v1: `reportingController` ← `deprecatedSource.component`,
//!   `reportingInstance` ← `deprecatedSource.host`, `eventTime` ← `deprecatedFirstTimestamp`,
//!   `series` ← `deprecatedCount` and `deprecatedLastTimestamp` when the count is above 1.
//!
//! Filled fields are not stored (unless a client writes back what it read), so field
//! selectors do not see them, as on the real server.

use std::borrow::Cow;

use chrono::SecondsFormat;
use serde_json::{Map, Value, json};

use super::resources::ResourceType;

/// Fields the two Event shapes name differently, as (events.k8s.io/v1, core/v1). All other
/// fields (`reason`, `type`, `action`, `related`, `eventTime`, `series`,
/// `reportingInstance`, `metadata`) are the same in both.
const RENAMED: [(&str, &str); 7] = [
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedCount", "count"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum View {
    /// Served exactly as stored (every kind but Events).
    AsStored,
    /// core/v1 Events: the stored shape, plus filled fields.
    CoreEvent,
    /// events.k8s.io/v1 Events: converted from the stored core/v1 shape, plus filled fields.
    EventsV1Event,
}

impl View {
    pub fn of(rt: &ResourceType) -> Self {
        match (rt.group.as_str(), rt.plural.as_str()) {
            ("", "events") => Self::CoreEvent,
            ("events.k8s.io", "events") => Self::EventsV1Event,
            _ => Self::AsStored,
        }
    }

    /// The (group, version, plural) this view's objects are stored under, when it is not
    /// the served type itself.
    pub fn storage_type(self) -> Option<(&'static str, &'static str, &'static str)> {
        (self == Self::EventsV1Event).then_some(("", "v1", "events"))
    }

    /// A stored object as this view serves it at `api_version` (reads, watches, responses).
    pub fn present<'a>(self, stored: &'a Value, api_version: &str) -> Cow<'a, Value> {
        let same_version = stored.get("apiVersion").and_then(Value::as_str) == Some(api_version);
        let mut shown = match self {
            Self::AsStored if same_version => return Cow::Borrowed(stored),
            Self::AsStored => stored.clone(),
            Self::CoreEvent => {
                let mut ev = stored.clone();
                fill_core(&mut ev);
                ev
            }
            Self::EventsV1Event => {
                let mut ev = self.to_shape(stored);
                fill_events_v1(&mut ev);
                ev
            }
        };
        shown["apiVersion"] = json!(api_version);
        Cow::Owned(shown)
    }

    /// A stored object in this view's shape, exactly (no filled fields): what patches
    /// sent through this view apply to.
    pub fn to_shape(self, stored: &Value) -> Value {
        let mut obj = stored.clone();
        if self == Self::EventsV1Event {
            rename_fields(&mut obj, ToShape::EventsV1);
        }
        obj
    }

    /// An object written through this view, in the stored shape (a body that is no object
    /// is left for the store to refuse).
    pub fn to_storage(self, mut obj: Value) -> Value {
        if self == Self::EventsV1Event && obj.is_object() {
            rename_fields(&mut obj, ToShape::Core);
            obj["apiVersion"] = json!("v1");
        }
        obj
    }

    /// The stored field a field selector of this view names, if it is another one
    /// (`regarding.name` → `involvedObject.name`).
    pub fn storage_field(self, field: &str) -> Option<String> {
        if self != Self::EventsV1Event {
            return None;
        }
        RENAMED.iter().find_map(|(v1, core)| {
            let rest = field.strip_prefix(v1)?;
            (rest.is_empty() || rest.starts_with('.')).then(|| format!("{core}{rest}"))
        })
    }
}

#[derive(Clone, Copy)]
enum ToShape {
    Core,
    EventsV1,
}

/// Moves each renamed field to its name in the `to` shape. A field named as in the target
/// shape but unknown to the source one is dropped, as the real server drops unknown fields.
fn rename_fields(obj: &mut Value, to: ToShape) {
    let Some(m) = obj.as_object_mut() else {
        return;
    };
    let moved: Vec<(&str, Option<Value>)> = RENAMED
        .iter()
        .map(|&(v1, core)| {
            let (from, to) = match to {
                ToShape::Core => (v1, core),
                ToShape::EventsV1 => (core, v1),
            };
            m.remove(to);
            (to, m.remove(from))
        })
        .collect();
    for (to, value) in moved {
        if let Some(v) = value {
            m.insert(to.to_string(), v);
        }
    }
}

/// Absent, null, "", 0 or {}: what Go's `omitempty` leaves out.
fn is_unset(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Number(n)) => n.as_f64() == Some(0.0),
        Some(Value::Object(o)) => o.is_empty(),
        _ => false,
    }
}

fn set_if_unset(m: &mut Map<String, Value>, field: &str, value: Option<Value>) {
    if let Some(v) = value.filter(|v| !is_unset(Some(v)))
        && is_unset(m.get(field))
    {
        m.insert(field.to_string(), v);
    }
}

/// The string at `pointer`, if set.
pub(super) fn text(obj: &Value, pointer: &str) -> Option<String> {
    obj.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// A timestamp in another precision: `Time` (seconds) or `MicroTime` (microseconds).
fn retimed(t: &str, precision: SecondsFormat) -> Value {
    match chrono::DateTime::parse_from_rfc3339(t) {
        Ok(parsed) => json!(parsed.to_utc().to_rfc3339_opts(precision, true)),
        Err(_) => json!(t),
    }
}

/// Sets `obj[field][sub]` if unset, creating `obj[field]` if needed.
fn set_nested_if_unset(obj: &mut Value, field: &str, sub: &str, value: Option<String>) {
    let Some(value) = value else { return };
    if !obj.get(field).is_some_and(Value::is_object) {
        obj[field] = json!({});
    }
    if let Some(m) = obj[field].as_object_mut() {
        set_if_unset(m, sub, Some(json!(value)));
    }
}

fn fill_core(ev: &mut Value) {
    let event_time = text(ev, "/eventTime");
    let series_count = ev.pointer("/series/count").cloned();
    let last_observed = text(ev, "/series/lastObservedTime").or_else(|| event_time.clone());
    let count = series_count.or_else(|| event_time.as_ref().map(|_| json!(1)));
    let component = text(ev, "/reportingComponent");
    let instance = text(ev, "/reportingInstance");
    let seconds = |t: &String| retimed(t, SecondsFormat::Secs);
    if let Some(m) = ev.as_object_mut() {
        set_if_unset(m, "count", count);
        set_if_unset(m, "firstTimestamp", event_time.as_ref().map(seconds));
        set_if_unset(m, "lastTimestamp", last_observed.as_ref().map(seconds));
    }
    set_nested_if_unset(ev, "source", "component", component);
    set_nested_if_unset(ev, "source", "host", instance);
}

fn fill_events_v1(ev: &mut Value) {
    let component = text(ev, "/deprecatedSource/component");
    let host = text(ev, "/deprecatedSource/host");
    let first = text(ev, "/deprecatedFirstTimestamp");
    let last = text(ev, "/deprecatedLastTimestamp");
    let count = ev.get("deprecatedCount").and_then(Value::as_i64);
    let micros = |t: &String| retimed(t, SecondsFormat::Micros);
    let series = match (count, &last) {
        (Some(n), Some(t)) if n > 1 => Some(json!({"count": n, "lastObservedTime": micros(t)})),
        _ => None,
    };
    if let Some(m) = ev.as_object_mut() {
        set_if_unset(m, "reportingController", component.map(Value::from));
        set_if_unset(m, "reportingInstance", host.map(Value::from));
        set_if_unset(m, "eventTime", first.as_ref().map(micros));
        set_if_unset(m, "series", series);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events_v1_event() -> Value {
        json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e", "namespace": "default"},
            "regarding": {"kind": "Pod", "name": "p"}, "note": "hello", "reason": "Started",
            "type": "Normal", "action": "Start", "reportingController": "guestcred",
            "reportingInstance": "host-1", "eventTime": "2025-01-02T03:04:05.678901Z",
        })
    }

    #[test]
    fn events_v1_shape_round_trips_through_storage() {
        let v1 = events_v1_event();
        let stored = View::EventsV1Event.to_storage(v1.clone());
        assert_eq!(stored["involvedObject"]["name"], "p");
        assert_eq!(stored["message"], "hello");
        assert_eq!(stored["reportingComponent"], "guestcred");
        assert!(stored.get("note").is_none() && stored.get("regarding").is_none());
        let mut back = View::EventsV1Event.to_shape(&stored);
        back["apiVersion"] = v1["apiVersion"].clone();
        assert_eq!(back, v1);
        assert_eq!(View::EventsV1Event.to_storage(json!([1])), json!([1]));
    }

    #[test]
    fn core_view_fills_count_timestamps_and_source() {
        let mut stored = View::EventsV1Event.to_storage(events_v1_event());
        let shown = View::CoreEvent.present(&stored, "v1");
        assert_eq!(shown["count"], 1);
        assert_eq!(shown["firstTimestamp"], "2025-01-02T03:04:05Z");
        assert_eq!(shown["lastTimestamp"], "2025-01-02T03:04:05Z");
        assert_eq!(
            shown["source"],
            json!({"component": "guestcred", "host": "host-1"})
        );
        stored["series"] = json!({"count": 4, "lastObservedTime": "2025-01-02T03:09:00.000001Z"});
        let shown = View::CoreEvent.present(&stored, "v1");
        assert_eq!(shown["count"], 4);
        assert_eq!(shown["lastTimestamp"], "2025-01-02T03:09:00Z");
    }

    #[test]
    fn events_v1_view_fills_from_deprecated_fields() {
        let stored = json!({
            "apiVersion": "v1", "kind": "Event", "metadata": {"name": "e"},
            "involvedObject": {"name": "p"}, "message": "m", "count": 3,
            "source": {"component": "kubelet", "host": "node-1"},
            "firstTimestamp": "2025-01-02T03:04:05Z", "lastTimestamp": "2025-01-02T03:05:00Z",
        });
        let shown = View::EventsV1Event.present(&stored, "events.k8s.io/v1");
        assert_eq!(shown["note"], "m");
        assert_eq!(shown["deprecatedCount"], 3);
        assert_eq!(shown["reportingController"], "kubelet");
        assert_eq!(shown["reportingInstance"], "node-1");
        assert_eq!(shown["eventTime"], "2025-01-02T03:04:05.000000Z");
        assert_eq!(shown["series"]["count"], 3);
    }

    #[test]
    fn events_v1_selector_fields_name_stored_fields() {
        let v = View::EventsV1Event;
        assert_eq!(
            v.storage_field("regarding.name").as_deref(),
            Some("involvedObject.name")
        );
        assert_eq!(
            v.storage_field("reportingController").as_deref(),
            Some("reportingComponent")
        );
        assert_eq!(v.storage_field("reason"), None);
        assert_eq!(View::CoreEvent.storage_field("regarding.name"), None);
    }
}
