//! The lab API-server emulator, driven through kube-rs exactly like the controller uses it.
//! One binary, a module per concern.
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/
mod deletion;
mod discovery;
mod events;
mod lists;
mod objects;
mod patch;
mod serving;
mod views;
mod watch;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{Stream, StreamExt};
use guestcred_lab::apiserver::ApiServer;
use guestcred_lab::testing::{SecretTest, TestObject, merge_patch, merge_patch_status};
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

/// A Secret without a namespace (the client's default applies) holding `value` as
/// `stringData.password`: the API server turns it into data.
fn secret(name: &str, value: &str) -> Secret {
    Secret::test(name)
        .without_namespace()
        .string_data("password", value)
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

/// The next event of a kube-rs watcher, named: `Init`, `InitApply <name>`, `InitDone`,
/// `Apply <name>` or `Delete <name>`; fails the test on a watch error.
async fn next_change<S, K>(events: &mut S) -> String
where
    S: Stream<Item = watcher::Result<watcher::Event<K>>> + Unpin,
    K: Resource,
{
    match next_event(events).await.expect("no watch error") {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitApply(o) => format!("InitApply {}", o.name_any()),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::Apply(o) => format!("Apply {}", o.name_any()),
        watcher::Event::Delete(o) => format!("Delete {}", o.name_any()),
    }
}

/// The next `n` events of a kube-rs watcher, named as [`next_change`] names them.
async fn next_changes<S, K>(events: &mut S, n: usize) -> Vec<String>
where
    S: Stream<Item = watcher::Result<watcher::Event<K>>> + Unpin,
    K: Resource,
{
    let mut changes = Vec::new();
    for _ in 0..n {
        changes.push(next_change(events).await);
    }
    changes
}

/// The names a kube-rs watcher's initial list delivers, up to its `InitDone`.
async fn initial_names<S, K>(events: &mut S) -> Vec<String>
where
    S: Stream<Item = watcher::Result<watcher::Event<K>>> + Unpin,
    K: Resource + std::fmt::Debug,
{
    let mut names = Vec::new();
    loop {
        match next_event(events).await.expect("no watch error") {
            watcher::Event::Init => {}
            watcher::Event::InitApply(o) => names.push(o.name_any()),
            watcher::Event::InitDone => return names,
            other => panic!("unexpected event during the initial list: {other:?}"),
        }
    }
}

/// Sends a raw request to the router (for what kube-rs cannot express).
async fn raw(server: &ApiServer, req: http::Request<String>) -> (u16, Value) {
    let (code, bytes) = raw_bytes(server, req).await;
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// The router's answer to `req`: status code and body.
async fn raw_bytes(server: &ApiServer, req: http::Request<String>) -> (u16, axum::body::Bytes) {
    let (parts, body) = req.into_parts();
    let req = http::Request::from_parts(parts, axum::body::Body::from(body));
    let resp = server.router().oneshot(req).await.expect("router answers");
    let code = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body is readable");
    (code, bytes)
}

/// `GET path` with `accept`, straight to the router.
async fn raw_get(server: &ApiServer, path: &str, accept: &str) -> (u16, Value) {
    raw(server, get(path, accept)).await
}

fn get(path: &str, accept: &str) -> http::Request<String> {
    http::Request::get(path)
        .header("accept", accept)
        .body(String::new())
        .expect("valid request")
}

/// `obj` created through `api`, as the server answered; fails the test if it is refused.
async fn create<K>(api: &Api<K>, obj: &K) -> K
where
    K: Resource + Clone + std::fmt::Debug + Serialize + serde::de::DeserializeOwned,
{
    api.create(&PostParams::default(), obj)
        .await
        .expect("the object is created")
}

/// Why the server refused to create `obj` through `api`; fails the test if it was created.
async fn create_refused<K>(api: &Api<K>, obj: &K) -> kube::Error
where
    K: Resource + Clone + std::fmt::Debug + Serialize + serde::de::DeserializeOwned,
{
    api.create(&PostParams::default(), obj)
        .await
        .expect_err("the create is refused")
}

/// List parameters selecting by field, e.g. `by_fields("metadata.name=a")`.
fn by_fields(selector: &str) -> ListParams {
    ListParams::default().fields(selector)
}

/// How many objects `api` lists with the field selector `fields`.
async fn count_where<K>(api: &Api<K>, fields: &str) -> usize
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    api.list(&by_fields(fields))
        .await
        .expect("list")
        .items
        .len()
}

/// Whether `name` no longer exists, as `api` sees it.
async fn gone<K>(api: &Api<K>, name: &str) -> bool
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    api.get_opt(name).await.expect("get").is_none()
}

/// The names of `items`, in the order given.
fn names<'a, K: Resource + 'a>(items: impl IntoIterator<Item = &'a K>) -> Vec<String> {
    items.into_iter().map(|o| o.name_any()).collect()
}

/// The names of everything `api` lists, in the server's order.
async fn listed_names<K>(api: &Api<K>) -> Vec<String>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    names(&api.list(&ListParams::default()).await.expect("list").items)
}

/// Namespace `name`, created through `client`.
async fn create_namespace(client: &Client, name: &str) -> Namespace {
    let mut ns = Namespace::default();
    ns.metadata.name = Some(name.into());
    create(&Api::all(client.clone()), &ns).await
}

/// A fresh emulator with the Widget CRD installed, and the Widgets of `default`.
async fn widgets_api() -> (ApiServer, Api<Widget>) {
    let server = ApiServer::new();
    install_widget_crd(&server.client()).await;
    let widgets = Api::default_namespaced(server.client());
    (server, widgets)
}

/// The first event of a watch on the collection at `path` from resourceVersion 0, as the
/// router answers it in `accept`, as JSON.
async fn first_watch_event(server: &ApiServer, path: &str, accept: &str) -> Value {
    let path = format!("{path}?watch=true&resourceVersion=0&timeoutSeconds=1");
    let (_, bytes) = raw_bytes(server, get(&path, accept)).await;
    serde_json::from_slice(bytes.split(|b| *b == b'\n').next().unwrap_or(b""))
        .expect("an event line")
}

/// A fresh emulator and the ConfigMaps of its `default` namespace.
fn config_maps_api() -> (ApiServer, Api<ConfigMap>) {
    let server = ApiServer::new();
    let cms = Api::default_namespaced(server.client());
    (server, cms)
}

/// The same, with ConfigMap `a` created (returned as the server answered).
async fn config_map_a() -> (ApiServer, Api<ConfigMap>, ConfigMap) {
    let (server, cms) = config_maps_api();
    let a = create(&cms, &config_map("a", &[])).await;
    (server, cms, a)
}
