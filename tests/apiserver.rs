//! The lab API-server emulator, driven through kube-rs exactly like the controller uses it.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{Stream, StreamExt};
use guestcred_lab::apiserver::ApiServer;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::core::{ApiResource, GroupVersionKind, ObjectMeta};
use kube::runtime::watcher;
use kube::{Client, CustomResource, CustomResourceExt, Resource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tower::ServiceExt;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
#[kube(
    group = "test.guestcred.io",
    version = "v1",
    kind = "Widget",
    namespaced,
    status = "WidgetStatus",
    shortname = "wdg",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#
)]
struct WidgetSpec {
    size: i32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema, PartialEq)]
struct WidgetStatus {
    phase: String,
}

const STEP: Duration = Duration::from_secs(5);

fn secret(name: &str, value: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(
            "password".to_string(),
            value.to_string(),
        )])),
        ..Default::default()
    }
}

fn config_map(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn widget(name: &str, size: i32) -> Widget {
    Widget::new(name, WidgetSpec { size })
}

fn owned_by(owner: &impl Resource<DynamicType = ()>) -> OwnerReference {
    owner
        .controller_owner_ref(&())
        .expect("owner has name and uid")
}

fn is_status(err: &kube::Error, code: u16, reason: &str) -> bool {
    matches!(err, kube::Error::Api(s) if s.code == code && s.reason == reason)
}

async fn install_widget_crd(client: &Client) -> CustomResourceDefinition {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &Widget::crd())
        .await
        .expect("CRD is accepted")
}

async fn next_event<S, T>(stream: &mut S) -> T
where
    S: Stream<Item = T> + Unpin,
{
    tokio::time::timeout(STEP, stream.next())
        .await
        .expect("an event arrives in time")
        .expect("the stream is still open")
}

/// Sends a raw request to the router (for what kube-rs cannot express).
async fn raw(server: &ApiServer, req: http::Request<String>) -> (u16, Value) {
    let (parts, body) = req.into_parts();
    let req = http::Request::from_parts(parts, axum::body::Body::from(body));
    let resp = server.router().oneshot(req).await.expect("router answers");
    let code = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body is readable");
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn get(path: &str, accept: &str) -> http::Request<String> {
    http::Request::get(path)
        .header("accept", accept)
        .body(String::new())
        .expect("valid request")
}

#[tokio::test]
async fn answered_requests_are_counted_by_method_and_exact_path() {
    let server = ApiServer::new();
    let secrets: Api<Secret> = Api::default_namespaced(server.client());
    secrets
        .create(&PostParams::default(), &secret("pw", "x"))
        .await
        .expect("create");
    secrets.get("pw").await.expect("get");
    let _ = secrets.get_opt("missing").await.expect("get missing");
    secrets.get("pw").await.expect("get again");
    let path = "/api/v1/namespaces/default/secrets/pw";
    assert_eq!(server.requests("GET", path), 2);
    assert_eq!(
        server.requests("POST", "/api/v1/namespaces/default/secrets"),
        1
    );
    assert_eq!(
        server.requests("GET", "/api/v1/namespaces/default/secrets/missing"),
        1
    );
    assert_eq!(server.requests("DELETE", path), 0);
}

#[tokio::test]
async fn secret_create_get_replace_delete_round_trip() {
    let server = ApiServer::new();
    let secrets: Api<Secret> = Api::default_namespaced(server.client());

    let created = secrets
        .create(&PostParams::default(), &secret("db", "hunter2"))
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.type_.as_deref(), Some("Opaque"));
    let data = created.data.clone().unwrap_or_default();
    assert_eq!(data["password"].0, b"hunter2");

    let mut fetched = secrets.get("db").await.unwrap();
    assert_eq!(fetched.metadata.uid, created.metadata.uid);
    fetched.string_data = Some(BTreeMap::from([("password".into(), "n3w".into())]));
    let replaced = secrets
        .replace("db", &PostParams::default(), &fetched)
        .await
        .unwrap();
    assert_eq!(
        replaced.data.clone().unwrap_or_default()["password"].0,
        b"n3w"
    );
    let rv = |s: &Secret| s.resource_version().unwrap().parse::<u64>().unwrap();
    assert!(rv(&replaced) > rv(&created));

    secrets
        .delete("db", &DeleteParams::default())
        .await
        .unwrap();
    let err = secrets.get("db").await.unwrap_err();
    assert!(is_status(&err, 404, "NotFound"), "{err:?}");
}

#[tokio::test]
async fn creating_an_existing_name_is_409_already_exists() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    cms.create(&PostParams::default(), &config_map("a", &[]))
        .await
        .unwrap();
    let err = cms
        .create(&PostParams::default(), &config_map("a", &[]))
        .await
        .unwrap_err();
    assert!(is_status(&err, 409, "AlreadyExists"), "{err:?}");
}

#[tokio::test]
async fn generate_name_gives_distinct_names_with_the_prefix() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let mut cm = config_map("", &[]);
    cm.metadata.name = None;
    cm.metadata.generate_name = Some("job-".into());
    let a = cms.create(&PostParams::default(), &cm).await.unwrap();
    let b = cms.create(&PostParams::default(), &cm).await.unwrap();
    assert!(a.name_any().starts_with("job-") && a.name_any().len() == 9);
    assert_ne!(a.name_any(), b.name_any());
}

#[tokio::test]
async fn creating_in_a_missing_namespace_is_404() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "nowhere");
    let err = cms
        .create(&PostParams::default(), &config_map("a", &[]))
        .await
        .unwrap_err();
    assert!(is_status(&err, 404, "NotFound"), "{err:?}");
}

#[tokio::test]
async fn update_with_a_stale_resource_version_is_409_conflict() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let first = cms
        .create(&PostParams::default(), &config_map("a", &[]))
        .await
        .unwrap();
    let mut newer = first.clone();
    newer.data = Some(BTreeMap::from([("k".into(), "1".into())]));
    cms.replace("a", &PostParams::default(), &newer)
        .await
        .unwrap();

    let mut stale = first;
    stale.data = Some(BTreeMap::from([("k".into(), "2".into())]));
    let err = cms
        .replace("a", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(is_status(&err, 409, "Conflict"), "{err:?}");
}

#[tokio::test]
async fn generation_bumps_on_spec_changes_only() {
    let server = ApiServer::new();
    let client = server.client();
    install_widget_crd(&client).await;
    let widgets: Api<Widget> = Api::default_namespaced(client);
    let w = widgets
        .create(&PostParams::default(), &widget("w", 1))
        .await
        .unwrap();
    assert_eq!(w.metadata.generation, Some(1));
    let pp = PatchParams::default();

    let labelled = widgets
        .patch(
            "w",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .unwrap();
    assert_eq!(labelled.metadata.generation, Some(1));

    let status = widgets
        .patch_status(
            "w",
            &pp,
            &Patch::Merge(json!({"status": {"phase": "Running"}})),
        )
        .await
        .unwrap();
    assert_eq!(status.metadata.generation, Some(1));

    let spec = widgets
        .patch("w", &pp, &Patch::Merge(json!({"spec": {"size": 2}})))
        .await
        .unwrap();
    assert_eq!(spec.metadata.generation, Some(2));
}

#[tokio::test]
async fn status_subresource_isolates_spec_and_status_writes() {
    let server = ApiServer::new();
    let client = server.client();
    install_widget_crd(&client).await;
    let widgets: Api<Widget> = Api::default_namespaced(client);
    let mut w = widget("w", 1);
    w.status = Some(WidgetStatus {
        phase: "Ignored".into(),
    });
    let created = widgets.create(&PostParams::default(), &w).await.unwrap();
    assert_eq!(created.status, None, "create cannot set status");

    let pp = PatchParams::default();
    let after_status = widgets
        .patch_status(
            "w",
            &pp,
            &Patch::Merge(json!({"spec": {"size": 9}, "status": {"phase": "Running"}})),
        )
        .await
        .unwrap();
    assert_eq!(after_status.spec.size, 1, "status writes ignore spec");
    assert_eq!(after_status.status.unwrap().phase, "Running");

    let after_main = widgets
        .patch(
            "w",
            &pp,
            &Patch::Merge(json!({"spec": {"size": 3}, "status": {"phase": "Hacked"}})),
        )
        .await
        .unwrap();
    assert_eq!(after_main.spec.size, 3);
    assert_eq!(
        after_main.status.unwrap().phase,
        "Running",
        "main writes ignore status"
    );
}

#[tokio::test]
async fn merge_json_and_strategic_patches_apply() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let mut cm = config_map("a", &[]);
    cm.data = Some(BTreeMap::from([
        ("keep".into(), "1".into()),
        ("drop".into(), "2".into()),
    ]));
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let pp = PatchParams::default();

    let merged = cms
        .patch(
            "a",
            &pp,
            &Patch::Merge(json!({"data": {"drop": null, "new": "3"}})),
        )
        .await
        .unwrap();
    let keys: Vec<String> = merged.data.unwrap().into_keys().collect();
    assert_eq!(keys, ["keep", "new"]);

    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "replace", "path": "/data/keep", "value": "10"},
        {"op": "add", "path": "/metadata/labels", "value": {"x": "y"}}
    ]))
    .unwrap();
    let patched = cms.patch("a", &pp, &Patch::<()>::Json(ops)).await.unwrap();
    assert_eq!(patched.data.clone().unwrap()["keep"], "10");
    assert_eq!(patched.labels()["x"], "y");

    let strategic = cms
        .patch("a", &pp, &Patch::Strategic(json!({"data": {"s": "1"}})))
        .await
        .unwrap();
    assert_eq!(strategic.data.unwrap()["s"], "1");
}

#[tokio::test]
async fn failing_json_patch_test_op_is_422_and_changes_nothing() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let created = cms
        .create(&PostParams::default(), &config_map("a", &[]))
        .await
        .unwrap();
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/name", "value": "other"}
    ]))
    .unwrap();
    let err = cms
        .patch("a", &PatchParams::default(), &Patch::<()>::Json(ops))
        .await
        .unwrap_err();
    assert!(is_status(&err, 422, "Invalid"), "{err:?}");
    assert_eq!(
        cms.get("a").await.unwrap().resource_version(),
        created.resource_version()
    );
}

#[tokio::test]
async fn apply_patch_creates_then_merges_another_managers_fields() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let first = PatchParams::apply("first").force();
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "a"}, "data": {"one": "1"}});
    let created = cms.patch("a", &first, &Patch::Apply(&body)).await.unwrap();
    assert_eq!(created.data.unwrap()["one"], "1");

    let second = PatchParams::apply("second").force();
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "a"}, "data": {"two": "2"}});
    let merged = cms.patch("a", &second, &Patch::Apply(&body)).await.unwrap();
    assert_eq!(merged.data.unwrap().len(), 2);
}

#[tokio::test]
async fn apply_patch_without_field_manager_is_rejected() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}});
    let err = cms
        .patch("a", &PatchParams::default(), &Patch::Apply(&body))
        .await
        .unwrap_err();
    assert!(is_status(&err, 422, "Invalid"), "{err:?}");
}

#[tokio::test]
async fn patch_carrying_a_stale_resource_version_is_409() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let first = cms
        .create(&PostParams::default(), &config_map("a", &[]))
        .await
        .unwrap();
    let pp = PatchParams::default();
    cms.patch("a", &pp, &Patch::Merge(json!({"data": {"k": "1"}})))
        .await
        .unwrap();
    let stale = json!({"metadata": {"resourceVersion": first.resource_version()},
                       "data": {"k": "2"}});
    let err = cms.patch("a", &pp, &Patch::Merge(stale)).await.unwrap_err();
    assert!(is_status(&err, 409, "Conflict"), "{err:?}");
}

#[tokio::test]
async fn label_selectors_filter_lists() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    for (name, labels) in [
        ("db", vec![("tier", "db"), ("env", "prod")]),
        ("web", vec![("tier", "web"), ("env", "dev")]),
        ("bare", vec![]),
    ] {
        cms.create(&PostParams::default(), &config_map(name, &labels))
            .await
            .unwrap();
    }
    let names = |sel: &'static str| {
        let cms = cms.clone();
        async move {
            let list = cms.list(&ListParams::default().labels(sel)).await.unwrap();
            list.items.iter().map(|c| c.name_any()).collect::<Vec<_>>()
        }
    };
    assert_eq!(names("tier=db").await, ["db"]);
    assert_eq!(names("tier==web").await, ["web"]);
    assert_eq!(names("env!=prod").await, ["bare", "web"]);
    assert_eq!(names("tier in (db,web)").await, ["db", "web"]);
    assert_eq!(names("tier notin (db)").await, ["bare", "web"]);
    assert_eq!(names("tier").await, ["db", "web"]);
    assert_eq!(names("!tier").await, ["bare"]);
}

#[tokio::test]
async fn field_selectors_filter_lists_across_namespaces() {
    let server = ApiServer::new();
    let client = server.client();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some("other".into());
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    for ns in ["default", "other"] {
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        cms.create(&PostParams::default(), &config_map("same", &[]))
            .await
            .unwrap();
    }
    let all: Api<ConfigMap> = Api::all(client);
    let list = all
        .list(&ListParams::default().fields("metadata.name=same"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 2);
    assert!(list.metadata.resource_version.is_some());
    let other = all
        .list(&ListParams::default().fields("metadata.namespace=other,metadata.name=same"))
        .await
        .unwrap();
    assert_eq!(other.items.len(), 1);
    let err = all
        .list(&ListParams::default().fields("data.x=y"))
        .await
        .unwrap_err();
    assert!(is_status(&err, 400, "BadRequest"), "{err:?}");
}

#[tokio::test]
async fn deletion_waits_for_finalizers_then_removes_the_object() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let mut cm = config_map("a", &[]);
    cm.metadata.finalizers = Some(vec!["test.guestcred.io/cleanup".into()]);
    cms.create(&PostParams::default(), &cm).await.unwrap();

    cms.delete("a", &DeleteParams::default()).await.unwrap();
    let pending = cms.get("a").await.unwrap();
    assert!(pending.metadata.deletion_timestamp.is_some());

    let mut stream = cms
        .watch(
            &WatchParams::default(),
            &pending.resource_version().unwrap(),
        )
        .await
        .unwrap()
        .boxed();
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    match next_event(&mut stream).await.unwrap() {
        WatchEvent::Deleted(obj) => assert_eq!(obj.name_any(), "a"),
        other => panic!("expected DELETED, got {other:?}"),
    }
    let err = cms.get("a").await.unwrap_err();
    assert!(is_status(&err, 404, "NotFound"), "{err:?}");
}

#[tokio::test]
async fn deleting_an_owner_deletes_its_dependents_in_cascade() {
    let server = ApiServer::new();
    let client = server.client();
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let secrets: Api<Secret> = Api::default_namespaced(client);
    let owner = cms
        .create(&PostParams::default(), &config_map("owner", &[]))
        .await
        .unwrap();
    let mut child = config_map("child", &[]);
    child.metadata.owner_references = Some(vec![owned_by(&owner)]);
    let child = cms.create(&PostParams::default(), &child).await.unwrap();
    let mut grandchild = secret("grandchild", "x");
    grandchild.metadata.owner_references = Some(vec![owned_by(&child)]);
    secrets
        .create(&PostParams::default(), &grandchild)
        .await
        .unwrap();
    let bystander = secrets
        .create(&PostParams::default(), &secret("bystander", "y"))
        .await
        .unwrap();

    cms.delete("owner", &DeleteParams::default()).await.unwrap();

    assert!(cms.get_opt("child").await.unwrap().is_none());
    assert!(secrets.get_opt("grandchild").await.unwrap().is_none());
    assert_eq!(
        secrets.get("bystander").await.unwrap().uid(),
        bystander.uid()
    );
}

#[tokio::test]
async fn orphan_propagation_keeps_dependents() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let owner = cms
        .create(&PostParams::default(), &config_map("owner", &[]))
        .await
        .unwrap();
    let mut child = config_map("child", &[]);
    child.metadata.owner_references = Some(vec![owned_by(&owner)]);
    cms.create(&PostParams::default(), &child).await.unwrap();

    cms.delete("owner", &DeleteParams::orphan()).await.unwrap();
    assert!(cms.get_opt("child").await.unwrap().is_some());
}

#[tokio::test]
async fn crd_registration_serves_the_kind_in_discovery_and_typed_api() {
    let server = ApiServer::new();
    let client = server.client();
    let crd = install_widget_crd(&client).await;
    let conditions = crd.status.unwrap().conditions.unwrap_or_default();
    for ty in ["Established", "NamesAccepted"] {
        assert!(
            conditions
                .iter()
                .any(|c| c.type_ == ty && c.status == "True"),
            "{ty} is True"
        );
    }

    let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
    let gvk = GroupVersionKind::gvk("test.guestcred.io", "v1", "Widget");
    let (ar, caps) = discovery.resolve_gvk(&gvk).expect("Widget is discovered");
    assert_eq!(ar.plural, "widgets");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);

    let widgets: Api<Widget> = Api::default_namespaced(client.clone());
    widgets
        .create(&PostParams::default(), &widget("w", 4))
        .await
        .unwrap();
    assert_eq!(widgets.get("w").await.unwrap().spec.size, 4);
    let dynamic: Api<DynamicObject> = Api::default_namespaced_with(client, &ar);
    assert_eq!(dynamic.get("w").await.unwrap().data["spec"]["size"], 4);
}

#[tokio::test]
async fn deleting_a_crd_removes_its_objects_and_its_api() {
    let server = ApiServer::new();
    let client = server.client();
    install_widget_crd(&client).await;
    let widgets: Api<Widget> = Api::default_namespaced(client.clone());
    widgets
        .create(&PostParams::default(), &widget("w", 1))
        .await
        .unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete(Widget::crd_name(), &DeleteParams::default())
        .await
        .unwrap();
    let err = widgets.list(&ListParams::default()).await.unwrap_err();
    assert!(is_status(&err, 404, "NotFound"), "{err:?}");

    install_widget_crd(&client).await;
    assert!(
        widgets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn kube_watcher_sees_init_then_apply_and_delete() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    cms.create(&PostParams::default(), &config_map("existing", &[]))
        .await
        .unwrap();
    let mut events = watcher(cms.clone(), watcher::Config::default()).boxed();
    assert!(matches!(
        next_event(&mut events).await.unwrap(),
        watcher::Event::Init
    ));
    match next_event(&mut events).await.unwrap() {
        watcher::Event::InitApply(cm) => assert_eq!(cm.name_any(), "existing"),
        other => panic!("expected InitApply, got {other:?}"),
    }
    assert!(matches!(
        next_event(&mut events).await.unwrap(),
        watcher::Event::InitDone
    ));

    cms.create(&PostParams::default(), &config_map("new", &[]))
        .await
        .unwrap();
    match next_event(&mut events).await.unwrap() {
        watcher::Event::Apply(cm) => assert_eq!(cm.name_any(), "new"),
        other => panic!("expected Apply, got {other:?}"),
    }
    cms.delete("new", &DeleteParams::default()).await.unwrap();
    match next_event(&mut events).await.unwrap() {
        watcher::Event::Delete(cm) => assert_eq!(cm.name_any(), "new"),
        other => panic!("expected Delete, got {other:?}"),
    }
}

#[tokio::test]
async fn streaming_list_watcher_gets_initial_events_then_changes() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    cms.create(&PostParams::default(), &config_map("existing", &[]))
        .await
        .unwrap();
    let mut events = watcher(cms.clone(), watcher::Config::default().streaming_lists()).boxed();
    assert!(matches!(
        next_event(&mut events).await.unwrap(),
        watcher::Event::Init
    ));
    assert!(matches!(
        next_event(&mut events).await.unwrap(),
        watcher::Event::InitApply(_)
    ));
    assert!(matches!(
        next_event(&mut events).await.unwrap(),
        watcher::Event::InitDone
    ));
    cms.create(&PostParams::default(), &config_map("new", &[]))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut events).await.unwrap(),
        watcher::Event::Apply(_)
    ));
}

#[tokio::test]
async fn watching_from_an_expired_resource_version_gets_410() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let old = cms
        .create(&PostParams::default(), &config_map("a", &[]))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &config_map("b", &[]))
        .await
        .unwrap();
    server.faults().expire_watches();
    let mut stream = cms
        .watch(&WatchParams::default(), &old.resource_version().unwrap())
        .await
        .unwrap()
        .boxed();
    match next_event(&mut stream).await.unwrap() {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test]
async fn kube_watcher_relists_after_its_watch_expires() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let mut events = watcher(cms.clone(), watcher::Config::default()).boxed();
    assert!(matches!(
        next_event(&mut events).await.unwrap(),
        watcher::Event::Init
    ));
    assert!(matches!(
        next_event(&mut events).await.unwrap(),
        watcher::Event::InitDone
    ));
    cms.create(&PostParams::default(), &config_map("a", &[]))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut events).await.unwrap(),
        watcher::Event::Apply(_)
    ));

    server.faults().expire_watches();
    let err = next_event(&mut events).await.unwrap_err();
    assert!(
        matches!(err, watcher::Error::WatchError(ref s) if s.code == 410),
        "{err:?}"
    );
    assert!(matches!(
        next_event(&mut events).await.unwrap(),
        watcher::Event::Init
    ));
    match next_event(&mut events).await.unwrap() {
        watcher::Event::InitApply(cm) => assert_eq!(cm.name_any(), "a"),
        other => panic!("expected InitApply after relist, got {other:?}"),
    }
    assert!(matches!(
        next_event(&mut events).await.unwrap(),
        watcher::Event::InitDone
    ));
}

#[tokio::test]
async fn filtered_watch_sees_objects_leave_their_selector_as_deleted() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    cms.create(&PostParams::default(), &config_map("a", &[("tier", "db")]))
        .await
        .unwrap();
    let mut stream = cms
        .watch(&WatchParams::default().labels("tier=db"), "0")
        .await
        .unwrap()
        .boxed();
    assert!(matches!(
        next_event(&mut stream).await.unwrap(),
        WatchEvent::Added(_)
    ));
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"tier": "web"}}})),
    )
    .await
    .unwrap();
    match next_event(&mut stream).await.unwrap() {
        WatchEvent::Deleted(cm) => assert_eq!(cm.labels()["tier"], "web"),
        other => panic!("expected DELETED, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_ends_at_its_timeout() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let mut stream = cms
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap()
        .boxed();
    let drained = tokio::time::timeout(STEP, async {
        while let Some(ev) = stream.next().await {
            // Nothing changes meanwhile: only bookmarks may arrive before the end.
            assert!(matches!(ev, Ok(WatchEvent::Bookmark(_))), "{ev:?}");
        }
    })
    .await;
    assert!(drained.is_ok(), "the watch ends by itself");
}

#[tokio::test]
async fn injected_conflict_fails_the_next_status_write_only() {
    let server = ApiServer::new();
    let client = server.client();
    install_widget_crd(&client).await;
    let widgets: Api<Widget> = Api::default_namespaced(client);
    widgets
        .create(&PostParams::default(), &widget("w", 1))
        .await
        .unwrap();
    server.faults().conflict_next_status_writes(1);
    let patch = Patch::Merge(json!({"status": {"phase": "Running"}}));
    let err = widgets
        .patch_status("w", &PatchParams::default(), &patch)
        .await
        .unwrap_err();
    assert!(is_status(&err, 409, "Conflict"), "{err:?}");
    let ok = widgets
        .patch_status("w", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert_eq!(ok.status.unwrap().phase, "Running");
}

#[tokio::test]
async fn protobuf_bodies_get_415_with_a_status() {
    let server = ApiServer::new();
    let req = http::Request::post("/api/v1/namespaces/default/configmaps")
        .header("content-type", "application/vnd.kubernetes.protobuf")
        .body("k8s\0".to_string())
        .unwrap();
    let (code, body) = raw(&server, req).await;
    assert_eq!(code, 415);
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["code"], 415);
}

#[tokio::test]
async fn discovery_in_unsupported_formats_gets_406() {
    let server = ApiServer::new();
    let (code, body) = raw(
        &server,
        get(
            "/apis",
            "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList",
        ),
    )
    .await;
    assert_eq!(code, 406);
    assert_eq!(body["reason"], "NotAcceptable");
}

#[tokio::test]
async fn aggregated_discovery_serves_builtin_and_crd_kinds() {
    let server = ApiServer::new();
    let client = server.client();
    install_widget_crd(&client).await;
    let discovery = kube::Discovery::new(client).run_aggregated().await.unwrap();
    for gvk in [
        GroupVersionKind::gvk("", "v1", "Secret"),
        GroupVersionKind::gvk("apps", "v1", "Deployment"),
        GroupVersionKind::gvk("test.guestcred.io", "v1", "Widget"),
    ] {
        assert!(
            discovery.resolve_gvk(&gvk).is_some(),
            "{gvk:?} is discovered"
        );
    }
}

#[tokio::test]
async fn table_requests_render_printer_columns() {
    let server = ApiServer::new();
    let client = server.client();
    install_widget_crd(&client).await;
    let widgets: Api<Widget> = Api::default_namespaced(client);
    widgets
        .create(&PostParams::default(), &widget("w", 1))
        .await
        .unwrap();
    widgets
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running"}})),
        )
        .await
        .unwrap();
    let (code, table) = raw(
        &server,
        get(
            "/apis/test.guestcred.io/v1/namespaces/default/widgets",
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
        ),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(table["kind"], "Table");
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Name", "Phase"]);
    assert_eq!(table["rows"][0]["cells"], json!(["w", "Running"]));
}

#[tokio::test]
async fn openapi_v3_documents_registered_crds() {
    let server = ApiServer::new();
    install_widget_crd(&server.client()).await;
    let (_, index) = raw(&server, get("/openapi/v3", "application/json")).await;
    let url = index["paths"]["apis/test.guestcred.io/v1"]["serverRelativeURL"]
        .as_str()
        .expect("the CRD's group-version is in the index");
    let (code, doc) = raw(&server, get(url, "application/json")).await;
    assert_eq!(code, 200);
    let schema = &doc["components"]["schemas"]["io.guestcred.test.v1.Widget"];
    assert_eq!(
        schema["properties"]["spec"]["properties"]["size"]["type"],
        "integer"
    );
}

#[tokio::test]
async fn deleting_a_namespace_deletes_its_contents() {
    let server = ApiServer::new();
    let client = server.client();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some("doomed".into());
    let created = namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Active"));
    let cms: Api<ConfigMap> = Api::namespaced(client, "doomed");
    cms.create(&PostParams::default(), &config_map("a", &[]))
        .await
        .unwrap();
    namespaces
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    assert!(namespaces.get_opt("doomed").await.unwrap().is_none());
    assert!(cms.get_opt("a").await.unwrap().is_none());
}

#[tokio::test]
async fn no_op_updates_keep_the_resource_version() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let created = cms
        .create(&PostParams::default(), &config_map("a", &[("x", "y")]))
        .await
        .unwrap();
    let same = cms
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap();
    assert_eq!(same.resource_version(), created.resource_version());
}

#[tokio::test]
async fn events_can_be_selected_by_involved_object() {
    let server = ApiServer::new();
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::default_namespaced(server.client());
    for (name, target) in [("e1", "db-0"), ("e2", "web-0")] {
        let mut ev = k8s_openapi::api::core::v1::Event::default();
        ev.metadata.name = Some(name.into());
        ev.involved_object.name = Some(target.into());
        ev.involved_object.kind = Some("Pod".into());
        events.create(&PostParams::default(), &ev).await.unwrap();
    }
    let list = events
        .list(&ListParams::default().fields("involvedObject.name=db-0,involvedObject.kind=Pod"))
        .await
        .unwrap();
    let names: Vec<String> = list.items.iter().map(|e| e.name_any()).collect();
    assert_eq!(names, ["e1"]);
}

const METADATA_LIST: &str = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";
const METADATA: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";

async fn server_with_secret_pw() -> ApiServer {
    let server = ApiServer::new();
    let secrets: Api<Secret> = Api::default_namespaced(server.client());
    secrets
        .create(&PostParams::default(), &secret("pw", "hunter2"))
        .await
        .expect("create");
    server
}

#[tokio::test]
async fn metadata_lists_carry_only_metadata() {
    let server = server_with_secret_pw().await;
    let (code, list) = raw(
        &server,
        get("/api/v1/namespaces/default/secrets", METADATA_LIST),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "PartialObjectMetadataList");
    assert_eq!(list["apiVersion"], "meta.k8s.io/v1");
    assert_eq!(list["items"][0]["kind"], "PartialObjectMetadata");
    assert_eq!(list["items"][0]["metadata"]["name"], "pw");
    assert!(list["items"][0].get("data").is_none(), "{list}");
}

#[tokio::test]
async fn metadata_get_carries_only_metadata() {
    let server = server_with_secret_pw().await;
    let (code, obj) = raw(
        &server,
        get("/api/v1/namespaces/default/secrets/pw", METADATA),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(obj["kind"], "PartialObjectMetadata");
    assert!(obj.get("data").is_none(), "{obj}");
}

#[tokio::test]
async fn metadata_watch_events_carry_only_metadata() {
    let server = server_with_secret_pw().await;
    let req = get(
        "/api/v1/namespaces/default/secrets?watch=true&resourceVersion=0&timeoutSeconds=1",
        METADATA,
    );
    let (parts, body) = req.into_parts();
    let req = http::Request::from_parts(parts, axum::body::Body::from(body));
    let resp = server.router().oneshot(req).await.expect("router answers");
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    let first: Value = serde_json::from_slice(bytes.split(|b| *b == b'\n').next().unwrap_or(b""))
        .expect("an event line");
    assert_eq!(first["type"], "ADDED");
    assert_eq!(first["object"]["kind"], "PartialObjectMetadata");
    assert_eq!(first["object"]["metadata"]["name"], "pw");
    assert!(first["object"].get("data").is_none(), "{first}");
}

#[tokio::test]
async fn kube_metadata_watcher_accepts_the_metadata_shape() {
    let server = server_with_secret_pw().await;
    let api: Api<kube::core::PartialObjectMeta<Secret>> = Api::default_namespaced(server.client());
    let mut events = watcher(api, watcher::Config::default()).boxed();
    let mut names = Vec::new();
    loop {
        match next_event(&mut events).await.expect("no watch error") {
            watcher::Event::InitApply(m) => names.push(m.name_any()),
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(names, ["pw"]);
}

#[tokio::test]
async fn table_watches_send_one_row_tables() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    cms.create(&PostParams::default(), &config_map("a", &[]))
        .await
        .unwrap();
    let req = get(
        "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=0&timeoutSeconds=1",
        "application/json;as=Table;v=v1;g=meta.k8s.io",
    );
    let (parts, body) = req.into_parts();
    let req = http::Request::from_parts(parts, axum::body::Body::from(body));
    let resp = server.router().oneshot(req).await.unwrap();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let first: Value =
        serde_json::from_slice(bytes.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(first["type"], "ADDED");
    assert_eq!(first["object"]["kind"], "Table");
    assert_eq!(first["object"]["rows"][0]["cells"][0], "a");
}

#[tokio::test]
async fn kube_runtime_finalizer_helper_adds_then_releases_its_finalizer() {
    use kube::runtime::controller::Action;
    use kube::runtime::finalizer::{Event as Finalizer, finalizer};
    use std::sync::Arc;

    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let created = cms
        .create(&PostParams::default(), &config_map("a", &[]))
        .await
        .unwrap();
    let handle = |obj: ConfigMap| {
        finalizer(
            &cms,
            "test.guestcred.io/cleanup",
            Arc::new(obj),
            |ev| async move {
                match ev {
                    Finalizer::Apply(_) | Finalizer::Cleanup(_) => {
                        Ok::<_, std::convert::Infallible>(Action::await_change())
                    }
                }
            },
        )
    };

    handle(created).await.unwrap();
    let guarded = cms.get("a").await.unwrap();
    assert_eq!(guarded.finalizers(), ["test.guestcred.io/cleanup"]);

    cms.delete("a", &DeleteParams::default()).await.unwrap();
    let deleting = cms.get("a").await.unwrap();
    assert!(deleting.metadata.deletion_timestamp.is_some());
    handle(deleting).await.unwrap();
    assert!(cms.get_opt("a").await.unwrap().is_none());
}

#[tokio::test]
async fn watches_that_allow_bookmarks_receive_them() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let mut stream = cms
        .watch(&WatchParams::default(), "0") // kube-rs asks for bookmarks by default
        .await
        .unwrap()
        .boxed();
    match next_event(&mut stream).await.unwrap() {
        WatchEvent::Bookmark(bm) => assert!(!bm.metadata.resource_version.is_empty()),
        other => panic!("expected BOOKMARK, got {other:?}"),
    }
}

#[tokio::test]
async fn delete_collection_deletes_only_selected_objects() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    for (name, tier) in [("a", "db"), ("b", "db"), ("c", "web")] {
        cms.create(&PostParams::default(), &config_map(name, &[("tier", tier)]))
            .await
            .unwrap();
    }
    cms.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("tier=db"),
    )
    .await
    .unwrap();
    let left: Vec<String> = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    assert_eq!(left, ["c"]);
}

#[tokio::test]
async fn token_reviews_answer_unauthenticated_and_are_not_stored() {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let server = ApiServer::new();
    let reviews: Api<TokenReview> = Api::all(server.client());
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some("opaque".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = reviews
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    assert_eq!(answer.status.unwrap().authenticated, Some(false));
    let err = reviews.list(&ListParams::default()).await.unwrap_err();
    assert!(is_status(&err, 405, "MethodNotAllowed"), "{err:?}");
}

#[tokio::test]
async fn apply_removes_fields_the_same_manager_stops_applying() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let mine = PatchParams::apply("mine");
    let body = |data: Value| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
                                     "metadata": {"name": "a"}, "data": data})
    };
    cms.patch("a", &mine, &Patch::Apply(body(json!({"x": "1", "y": "2"}))))
        .await
        .unwrap();
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"other": "3"}})),
    )
    .await
    .unwrap();
    let after = cms
        .patch("a", &mine, &Patch::Apply(body(json!({"x": "1"}))))
        .await
        .unwrap();
    let keys: Vec<String> = after.data.unwrap().into_keys().collect();
    assert_eq!(
        keys,
        ["other", "x"],
        "y dropped, the other writer's key kept"
    );
}

#[tokio::test]
async fn no_finalizer_can_be_added_to_an_object_being_deleted() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let mut cm = config_map("a", &[]);
    cm.metadata.finalizers = Some(vec!["first".into()]);
    cms.create(&PostParams::default(), &cm).await.unwrap();
    cms.delete("a", &DeleteParams::default()).await.unwrap();
    let err = cms
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["first", "second"]}})),
        )
        .await
        .unwrap_err();
    assert!(is_status(&err, 422, "Invalid"), "{err:?}");
}

#[tokio::test]
async fn creating_with_a_resource_version_is_refused() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let fetched = cms
        .create(&PostParams::default(), &config_map("a", &[]))
        .await
        .unwrap();
    let mut copy = fetched.clone();
    copy.metadata.name = Some("b".into());
    copy.metadata.uid = None;
    let err = cms.create(&PostParams::default(), &copy).await.unwrap_err();
    assert!(is_status(&err, 500, "InternalError"), "{err:?}");
}

async fn kube_client_from(kubeconfig: &std::path::Path) -> Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig parses");
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .expect("kube-rs accepts the kubeconfig");
    Client::try_from(config).expect("client from kubeconfig")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_kube_clients_and_extra_routes() {
    let server = ApiServer::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let extra = axum::Router::new().route(
        "/apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachines/{name}/restart",
        axum::routing::put(|| async { "restarted" }),
    );
    let serving = server.clone();
    tokio::spawn(async move { serving.serve(listener, extra).await });
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    guestcred_lab::apiserver::write_kubeconfig(&kubeconfig, &url).unwrap();

    let client = kube_client_from(&kubeconfig).await;
    assert_eq!(client.default_namespace(), "default");
    assert_eq!(client.apiserver_version().await.unwrap().major, "1");
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    secrets
        .create(&PostParams::default(), &secret("s", "x"))
        .await
        .unwrap();
    let seen_in_process: Api<Secret> = Api::default_namespaced(server.client());
    assert!(seen_in_process.get_opt("s").await.unwrap().is_some());

    let req = http::Request::put(
        "/apis/subresources.kubevirt.io/v1/namespaces/default/virtualmachines/vm/restart",
    )
    .body(Vec::new())
    .unwrap();
    let body = client.request_text(req).await.unwrap();
    assert_eq!(body, "restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_on_the_bound_port_and_writes_a_kubeconfig() {
    use guestcred_lab::apiserver::{ApiServerArgs, run};
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("lab").join("kubeconfig");
    let args = ApiServerArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        kubeconfig: Some(kubeconfig.clone()),
    };
    let task = tokio::spawn(run(args));
    let written = tokio::time::timeout(STEP, async {
        while !kubeconfig.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(written.is_ok(), "run writes the kubeconfig once it listens");
    let client = kube_client_from(&kubeconfig).await;
    let namespaces: Api<Namespace> = Api::all(client);
    let names: Vec<String> = namespaces
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|n| n.name_any())
        .collect();
    assert_eq!(names, ["default", "kube-public", "kube-system"]);
    task.abort();
}

#[tokio::test]
async fn fields_missing_from_the_crd_schema_are_pruned() {
    let server = ApiServer::new();
    let client = server.client();
    install_widget_crd(&client).await;
    let ar = ApiResource::erase::<Widget>(&());
    let widgets: Api<DynamicObject> = Api::default_namespaced_with(client, &ar);
    let mut obj = DynamicObject::new("w", &ar);
    obj.data = json!({"spec": {"size": 1, "colour": "red"}, "extra": true});
    let created = widgets.create(&PostParams::default(), &obj).await.unwrap();
    assert_eq!(created.data["spec"], json!({"size": 1}));
    assert!(created.data.get("extra").is_none());

    let status = widgets
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running", "undeclared": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(status.data["status"], json!({"phase": "Running"}));
}

// Events: one store, two views (core/v1 and events.k8s.io/v1).

type CoreEvent = k8s_openapi::api::core::v1::Event;
type EventsV1Event = k8s_openapi::api::events::v1::Event;

fn recorder(client: &Client) -> kube::runtime::events::Recorder {
    let reporter = kube::runtime::events::Reporter {
        controller: "guestcred-test".into(),
        instance: Some("lab-0".into()),
    };
    kube::runtime::events::Recorder::new(client.clone(), reporter)
}

fn password_reset() -> kube::runtime::events::Event {
    kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Warning,
        reason: "PasswordReset".into(),
        note: Some("guest password reset".into()),
        action: "Reset".into(),
        secondary: None,
    }
}

async fn create_pod(client: &Client, name: &str) -> k8s_openapi::api::core::v1::Pod {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::default_namespaced(client.clone());
    let mut pod = k8s_openapi::api::core::v1::Pod::default();
    pod.metadata.name = Some(name.into());
    pods.create(&PostParams::default(), &pod).await.unwrap()
}

/// The core/v1 Events about `name`, selected as `kubectl describe` selects them.
async fn core_events_about(client: &Client, name: &str) -> Vec<CoreEvent> {
    let events: Api<CoreEvent> = Api::default_namespaced(client.clone());
    let fields = format!("involvedObject.name={name},involvedObject.namespace=default");
    events
        .list(&ListParams::default().fields(&fields))
        .await
        .unwrap()
        .items
}

#[tokio::test]
async fn recorder_events_are_listed_as_core_events_of_their_object() {
    let server = ApiServer::new();
    let client = server.client();
    let pod = create_pod(&client, "vm-0").await;
    create_pod(&client, "vm-1").await;
    recorder(&client)
        .publish(&password_reset(), &pod.object_ref(&()))
        .await
        .unwrap();

    let events = core_events_about(&client, "vm-0").await;
    assert_eq!(events.len(), 1, "{events:?}");
    let ev = &events[0];
    assert_eq!(ev.involved_object.kind.as_deref(), Some("Pod"));
    assert_eq!(ev.involved_object.uid, pod.metadata.uid);
    assert_eq!(ev.message.as_deref(), Some("guest password reset"));
    assert_eq!(ev.reason.as_deref(), Some("PasswordReset"));
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert_eq!(ev.action.as_deref(), Some("Reset"));
    assert_eq!(ev.count, Some(1));
    assert_eq!(ev.reporting_component.as_deref(), Some("guestcred-test"));
    assert_eq!(ev.reporting_instance.as_deref(), Some("lab-0"));
    let source = ev.source.clone().unwrap_or_default();
    assert_eq!(source.component.as_deref(), Some("guestcred-test"));
    assert_eq!(source.host.as_deref(), Some("lab-0"));
    assert!(ev.first_timestamp.is_some() && ev.last_timestamp.is_some());
    assert!(ev.event_time.is_some());
    assert!(core_events_about(&client, "vm-1").await.is_empty());

    // kubectl describe selects by uid too; events.k8s.io still reads it as written.
    let events: Api<CoreEvent> = Api::default_namespaced(client.clone());
    let uid = pod.metadata.uid.clone().unwrap();
    let by_uid = events
        .list(&ListParams::default().fields(&format!("involvedObject.uid={uid}")))
        .await
        .unwrap();
    assert_eq!(by_uid.items.len(), 1);
    let v1: Api<EventsV1Event> = Api::default_namespaced(client);
    let same = v1.get(&ev.name_any()).await.unwrap();
    assert_eq!(same.note.as_deref(), Some("guest password reset"));
    assert_eq!(same.regarding.and_then(|r| r.uid), pod.metadata.uid);
    assert_eq!(same.deprecated_count, None);
    assert_eq!(same.metadata.uid, ev.metadata.uid);
}

#[tokio::test]
async fn a_repeated_recorder_event_raises_the_core_count() {
    let server = ApiServer::new();
    let client = server.client();
    let pod = create_pod(&client, "vm-0").await;
    let recorder = recorder(&client);
    for _ in 0..3 {
        recorder
            .publish(&password_reset(), &pod.object_ref(&()))
            .await
            .unwrap();
    }
    let events = core_events_about(&client, "vm-0").await;
    assert_eq!(
        events.len(),
        1,
        "one Event, patched with a series: {events:?}"
    );
    let ev = &events[0];
    assert_eq!(ev.count, Some(3));
    assert_eq!(ev.series.as_ref().and_then(|s| s.count), Some(3));
    assert!(ev.last_timestamp >= ev.first_timestamp);

    let v1: Api<EventsV1Event> = Api::default_namespaced(client);
    let series = v1.get(&ev.name_any()).await.unwrap().series.unwrap();
    assert_eq!(series.count, 3);
}

#[tokio::test]
async fn core_events_are_readable_through_events_k8s_io() {
    let server = ApiServer::new();
    let client = server.client();
    let core: Api<CoreEvent> = Api::default_namespaced(client.clone());
    let ev: CoreEvent = serde_json::from_value(json!({
        "metadata": {"name": "vm-0.1"},
        "involvedObject": {"kind": "Pod", "name": "vm-0", "namespace": "default", "uid": "u-1"},
        "message": "Started container", "reason": "Started", "type": "Normal", "count": 4,
        "source": {"component": "kubelet", "host": "node-1"},
        "firstTimestamp": "2025-01-02T03:04:05Z", "lastTimestamp": "2025-01-02T03:10:00Z",
    }))
    .unwrap();
    core.create(&PostParams::default(), &ev).await.unwrap();

    let v1: Api<EventsV1Event> = Api::default_namespaced(client.clone());
    let got = v1.get("vm-0.1").await.unwrap();
    assert_eq!(got.note.as_deref(), Some("Started container"));
    assert_eq!(got.reason.as_deref(), Some("Started"));
    assert_eq!(got.type_.as_deref(), Some("Normal"));
    assert_eq!(got.deprecated_count, Some(4));
    assert_eq!(got.regarding.unwrap().name.as_deref(), Some("vm-0"));
    assert_eq!(got.reporting_controller.as_deref(), Some("kubelet"));
    assert_eq!(got.reporting_instance.as_deref(), Some("node-1"));
    assert!(got.event_time.is_some());
    assert_eq!(got.series.map(|s| s.count), Some(4));

    let selected = v1
        .list(&ListParams::default().fields("regarding.name=vm-0,reason=Started,type=Normal"))
        .await
        .unwrap();
    assert_eq!(selected.items.len(), 1);
    let none = v1
        .list(&ListParams::default().fields("regarding.name=vm-1"))
        .await
        .unwrap();
    assert!(none.items.is_empty());

    // A patch through events.k8s.io lands in the core view; a delete removes both.
    v1.patch(
        "vm-0.1",
        &PatchParams::default(),
        &Patch::Merge(json!({"note": "Restarted container"})),
    )
    .await
    .unwrap();
    let patched = core.get("vm-0.1").await.unwrap();
    assert_eq!(patched.message.as_deref(), Some("Restarted container"));
    assert_eq!(patched.count, Some(4));
    core.delete("vm-0.1", &DeleteParams::default())
        .await
        .unwrap();
    assert!(v1.get_opt("vm-0.1").await.unwrap().is_none());
}

#[tokio::test]
async fn event_watches_see_writes_through_the_other_api_in_their_own_shape() {
    let server = ApiServer::new();
    let client = server.client();
    let v1: Api<EventsV1Event> = Api::default_namespaced(client.clone());
    let core: Api<CoreEvent> = Api::default_namespaced(client.clone());
    let mut v1_watch = v1
        .watch(&WatchParams::default().fields("regarding.name=vm-0"), "0")
        .await
        .unwrap()
        .boxed();
    let mut core_watch = core
        .watch(
            &WatchParams::default().fields("involvedObject.name=vm-0"),
            "0",
        )
        .await
        .unwrap()
        .boxed();
    let pod = create_pod(&client, "vm-0").await;
    let recorder = recorder(&client);
    for _ in 0..2 {
        recorder
            .publish(&password_reset(), &pod.object_ref(&()))
            .await
            .unwrap();
    }
    match next_event(&mut core_watch).await.unwrap() {
        WatchEvent::Added(ev) => assert_eq!(ev.reason.as_deref(), Some("PasswordReset")),
        other => panic!("expected ADDED, got {other:?}"),
    }
    match next_event(&mut core_watch).await.unwrap() {
        WatchEvent::Modified(ev) => assert_eq!(ev.count, Some(2)),
        other => panic!("expected MODIFIED, got {other:?}"),
    }
    match next_event(&mut v1_watch).await.unwrap() {
        WatchEvent::Added(ev) => assert_eq!(ev.note.as_deref(), Some("guest password reset")),
        other => panic!("expected ADDED, got {other:?}"),
    }
}

/// Creates ConfigMaps with these names in the default namespace.
async fn config_maps(cms: &Api<ConfigMap>, names: &[&str]) {
    for name in names {
        cms.create(&PostParams::default(), &config_map(name, &[]))
            .await
            .expect("config map created");
    }
}

#[tokio::test]
async fn a_list_with_a_limit_comes_in_pages_joined_by_continue_tokens() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    config_maps(&cms, &["a", "b", "c", "d", "e"]).await;

    let first = cms.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let mut names: Vec<String> = first.items.iter().map(|c| c.name_any()).collect();
    let mut token = first.metadata.continue_.clone();
    let mut pages = 1;
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        let page = cms
            .list(&ListParams::default().limit(2).continue_token(&t))
            .await
            .unwrap();
        assert_eq!(
            page.metadata.resource_version,
            first.metadata.resource_version
        );
        names.extend(page.items.iter().map(|c| c.name_any()));
        token = page.metadata.continue_.clone();
        pages += 1;
    }
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
    assert_eq!(pages, 3);
}

#[tokio::test]
async fn a_list_at_resource_version_zero_ignores_the_limit_as_the_watch_cache_does() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    config_maps(&cms, &["a", "b", "c"]).await;
    // As client-go's reflectors ask (kube-rs drops resourceVersion=0 when it sets a limit).
    let path = "/api/v1/namespaces/default/configmaps?limit=1&resourceVersion=0";
    let (code, list) = raw(&server, get(path, "application/json")).await;
    assert_eq!(code, 200);
    assert_eq!(list["items"].as_array().map(Vec::len), Some(3));
    assert_eq!(list["metadata"].get("continue"), None);
}

#[tokio::test]
async fn a_filtered_page_holds_matching_objects_only() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    for (name, tier) in [("a", "db"), ("b", "web"), ("c", "db"), ("d", "web")] {
        cms.create(&PostParams::default(), &config_map(name, &[("tier", tier)]))
            .await
            .unwrap();
    }
    let lp = ListParams::default().labels("tier=db").limit(1);
    let first = cms.list(&lp).await.unwrap();
    let token = first.metadata.continue_.clone().expect("more keys follow");
    // With a selector the server cannot count what is left without reading it.
    assert_eq!(first.metadata.remaining_item_count, None);
    let rest = cms.list(&lp.clone().continue_token(&token)).await.unwrap();
    let names: Vec<String> = first
        .items
        .iter()
        .chain(&rest.items)
        .map(|c| c.name_any())
        .collect();
    assert_eq!(names, ["a", "c"]);
}

#[tokio::test]
async fn a_continue_token_older_than_the_watch_history_is_410_expired() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    config_maps(&cms, &["a", "b"]).await;
    let first = cms.list(&ListParams::default().limit(1)).await.unwrap();
    let token = first.metadata.continue_.expect("a second page");
    config_maps(&cms, &["c"]).await;
    // History now starts after the change that made "c": the token's version is gone.
    server.faults().expire_watches();
    let err = cms
        .list(&ListParams::default().limit(1).continue_token(&token))
        .await
        .unwrap_err();
    assert!(is_status(&err, 410, "Expired"), "{err:?}");
}

#[tokio::test]
async fn a_continue_token_the_server_did_not_issue_is_400() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let err = cms
        .list(&ListParams::default().limit(1).continue_token("forged"))
        .await
        .unwrap_err();
    assert!(is_status(&err, 400, "BadRequest"), "{err:?}");
}

#[tokio::test]
async fn kube_watcher_paging_its_initial_list_sees_every_object() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    config_maps(&cms, &["a", "b", "c", "d"]).await;
    // MostRecent (kube-rs' default): a list without resourceVersion, paged by `limit`.
    let config = watcher::Config::default().page_size(1);
    let mut events = watcher(cms.clone(), config).boxed();
    let mut seen = Vec::new();
    loop {
        match next_event(&mut events).await.unwrap() {
            watcher::Event::Init => {}
            watcher::Event::InitApply(cm) => seen.push(cm.name_any()),
            watcher::Event::InitDone => break,
            other => panic!("unexpected event during the initial list: {other:?}"),
        }
    }
    assert_eq!(seen, ["a", "b", "c", "d"]);
    assert_eq!(
        server.requests("GET", "/api/v1/namespaces/default/configmaps"),
        4
    );
}
