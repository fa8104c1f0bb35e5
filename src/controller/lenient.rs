//! Watches a kind as untyped objects and converts each one here, so that an object the
//! typed spec cannot read (a negative `maxConcurrency`, `mode: live`, a missing
//! `password`: anything an API server without schema validation lets through) is reported
//! on that object as InvalidSpec. A typed watch would fail the whole list instead, and with
//! it every object of the kind, until the bad one is deleted.
use crate::api::Reason;
use crate::api::RunStatus;
use crate::api::conditions::{self, PROGRESSING, READY, STALLED};
use futures::{Stream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::warn;

use super::namespaces::{WatchScope, watch_scope};

/// A reflector store of `K` and the stream of applied `K` objects for
/// `Controller::for_stream`, in the namespaces of `scope`. Objects that do not deserialize
/// are reported and left out.
pub fn watch<K>(
    client: Client,
    recorder: Recorder,
    scope: &WatchScope,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Send + Sync + 'static,
{
    let ar = ApiResource::erase::<K>(&());
    let apis = scope.apis(
        || Api::<DynamicObject>::all_with(client.clone(), &ar),
        |ns| Api::namespaced_with(client.clone(), ns, &ar),
    );
    let (reader, writer) = reflector::store::<K>();
    let known = reader.clone();
    let watch = |api| watcher(api, watcher::Config::default()).default_backoff();
    let typed = watch_scope(apis, watch, name_only).filter_map(move |event| {
        let (client, recorder, ar) = (client.clone(), recorder.clone(), ar.clone());
        let known = known.clone();
        async move {
            match event {
                Ok(e) => typed_event::<K>(e, &client, &recorder, &ar, &known)
                    .await
                    .map(Ok),
                Err(e) => Some(Err(e)),
            }
        }
    });
    let stream = reflector::reflector(writer, typed).applied_objects();
    (reader, stream)
}

async fn typed_event<K: Resource<DynamicType = ()> + DeserializeOwned + Clone>(
    event: watcher::Event<DynamicObject>,
    client: &Client,
    recorder: &Recorder,
    ar: &ApiResource,
    known: &Store<K>,
) -> Option<watcher::Event<K>> {
    use watcher::Event as E;
    match event {
        E::Init => Some(E::Init),
        E::InitDone => Some(E::InitDone),
        E::InitApply(o) => typed(o, client, recorder, ar).await.map(E::InitApply),
        // An update that makes a known object unreadable takes it out of the store, as if
        // deleted: a run of its older spec stops starting agent calls (it sees the object
        // gone), and nothing drives it until a readable spec comes back.
        E::Apply(o) => {
            let key = reflector::ObjectRef::<K>::new(&o.name_any())
                .within(&o.namespace().unwrap_or_default());
            match typed(o, client, recorder, ar).await {
                Some(k) => Some(E::Apply(k)),
                None => known.get(&key).map(|old| E::Delete(old.as_ref().clone())),
            }
        }
        // Looked up by key: a namespaced watch's re-list reports what it no longer has with
        // the name only (see `namespaces`). An unreadable object that is deleted was never
        // in the store: nothing to forget.
        E::Delete(o) => {
            let key = reflector::ObjectRef::<K>::new(&o.name_any())
                .within(&o.namespace().unwrap_or_default());
            known.get(&key).map(|old| E::Delete(old.as_ref().clone()))
        }
    }
}

/// What a merged namespaced watch keeps of an object once listed: its name and namespace.
fn name_only(o: &DynamicObject) -> DynamicObject {
    DynamicObject {
        types: o.types.clone(),
        metadata: kube::api::ObjectMeta {
            name: o.metadata.name.clone(),
            namespace: o.metadata.namespace.clone(),
            ..Default::default()
        },
        data: serde_json::Value::Null,
    }
}

async fn typed<K: DeserializeOwned>(
    obj: DynamicObject,
    client: &Client,
    recorder: &Recorder,
    ar: &ApiResource,
) -> Option<K> {
    match parse::<K>(&obj) {
        Ok(k) => Some(k),
        Err(message) => {
            if obj.metadata.deletion_timestamp.is_none() {
                report_invalid(&obj, &message, client, recorder, ar).await;
            }
            None
        }
    }
}

/// The object as `K`, or a message naming the field that is wrong and how.
fn parse<K: DeserializeOwned>(obj: &DynamicObject) -> Result<K, String> {
    let value = serde_json::to_value(obj).map_err(|e| e.to_string())?;
    let spec = value.get("spec").cloned();
    serde_path_to_error::deserialize::<_, K>(value).map_err(|e| {
        let (mut path, mut what) = (e.path().to_string(), e.inner().to_string());
        // serde loses the path inside the flattened rollout fields: ask them directly.
        if path == "spec"
            && let Some(Err(r)) =
                spec.map(serde_path_to_error::deserialize::<_, crate::api::RolloutSpec>)
        {
            (path, what) = (format!("spec.{}", r.path()), r.inner().to_string());
        }
        format!(
            "spec is invalid: {path}: {what}; fix that field (kubectl explain {}.spec lists the fields and types)",
            ar_kind_lower(obj)
        )
    })
}

fn ar_kind_lower(obj: &DynamicObject) -> String {
    obj.types
        .as_ref()
        .map(|t| t.kind.to_lowercase())
        .unwrap_or_else(|| "the object".into())
}

/// Stalled/InvalidSpec on the object itself, once per generation and message.
async fn report_invalid(
    obj: &DynamicObject,
    message: &str,
    client: &Client,
    recorder: &Recorder,
    ar: &ApiResource,
) {
    let old: RunStatus = obj
        .data
        .get("status")
        .cloned()
        .and_then(|s| serde_json::from_value(s).ok())
        .unwrap_or_default();
    let generation = obj.metadata.generation;
    let reason = Reason::InvalidSpec.as_str();
    let already = old.observed_generation == generation
        && old
            .conditions
            .iter()
            .any(|c| c.type_ == STALLED && c.reason == reason && c.message == message);
    if already {
        return;
    }
    let now = Time(Timestamp::now());
    let mut conds = old.conditions;
    for (type_, status) in [(STALLED, true), (READY, false), (PROGRESSING, false)] {
        conditions::set_condition(&mut conds, type_, status, reason, message, generation, &now);
    }
    let patch = serde_json::json!({"status": {
        "observedGeneration": generation,
        "phase": "Failed",
        "conditions": conds,
    }});
    let ns = obj.namespace().unwrap_or_default();
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), &ns, ar);
    let name = obj.name_any();
    warn!(object = %name, namespace = %ns, "object does not match the CRD's schema");
    if let Err(e) = api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        warn!(object = %name, error = %e, "could not report the invalid spec");
        return;
    }
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: reason.to_string(),
        note: Some(message.to_string()),
        action: "Validate".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &obj.object_ref(ar)).await {
        warn!(object = %name, error = %e, "could not publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::GuestPasswordReset;

    fn object(spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "guestcred.io/v1alpha1",
            "kind": "GuestPasswordReset",
            "metadata": {"name": "r", "namespace": "default"},
            "spec": spec,
        }))
        .expect("dynamic object")
    }

    #[test]
    fn a_negative_number_is_named_by_its_field() {
        let o = object(serde_json::json!({
            "target": {"vmName": "a"},
            "password": {"generate": {"length": 20}},
            "maxConcurrency": -1,
        }));
        let msg = parse::<GuestPasswordReset>(&o).expect_err("negative");
        assert!(msg.contains("spec.maxConcurrency"), "{msg}");
        assert!(msg.contains("-1"), "{msg}");
    }

    #[test]
    fn a_missing_required_field_is_named() {
        let o = object(serde_json::json!({"target": {"vmName": "a"}}));
        let msg = parse::<GuestPasswordReset>(&o).expect_err("missing");
        assert!(msg.contains("password"), "{msg}");
    }

    #[test]
    fn a_valid_object_parses() {
        let o = object(serde_json::json!({
            "target": {"vmName": "a"},
            "password": {"generate": {"length": 20}},
        }));
        assert!(parse::<GuestPasswordReset>(&o).is_ok());
    }
}
