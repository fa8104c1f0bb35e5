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
use guestcred_lab::testing::{SecretTest, TestObject};
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

/// A fresh emulator and the ConfigMaps of its `default` namespace.
fn config_maps_api() -> (ApiServer, Api<ConfigMap>) {
    let server = ApiServer::new();
    let cms = Api::default_namespaced(server.client());
    (server, cms)
}

/// The same, with ConfigMap `a` created (returned as the server answered).
async fn config_map_a() -> (ApiServer, Api<ConfigMap>, ConfigMap) {
    let (server, cms) = config_maps_api();
    let a = cms
        .create(&PostParams::default(), &config_map("a", &[]))
        .await
        .unwrap();
    (server, cms, a)
}
