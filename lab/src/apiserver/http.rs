//! Request routing: discovery, OpenAPI, and the REST verbs on resources (incl. watch).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::error::ApiError;
use super::limits;
use super::openapi;
use super::openapi_v2;
use super::paging::{self, ListCursor, PageRequest};
use super::patch::{self, PatchKind};
use super::protobuf;
use super::resources::ResourceType;
use super::selector::{FieldSelector, LabelSelector, kind_fields};
use super::store::{BusMsg, Filter, ListPage};
use super::table;
use super::views::{View, text};
use super::{GIT_VERSION, Shared};

/// Interval of BOOKMARK events on watches that allow them (the real server: about a minute).
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// Watches without timeoutSeconds end after this (the real server: 30-60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

type Params = HashMap<String, String>;

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok(body: &Value) -> Response {
    json_response(StatusCode::OK, body)
}

/// Parsed resource path: `/api/v1/...` or `/apis/<group>/<version>/...`.
struct ResourcePath {
    group: String,
    version: String,
    plural: String,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_resource_path(group: &str, version: &str, rest: &[&str]) -> Option<ResourcePath> {
    let namespaced_form = rest.len() >= 3
        && rest[0] == "namespaces"
        && !(rest.len() == 3 && matches!(rest[2], "status" | "finalize"));
    let (ns, rest) = if namespaced_form {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(n.to_string()), None),
        [p, n, s] => (*p, Some(n.to_string()), Some(s.to_string())),
        _ => return None,
    };
    Some(ResourcePath {
        group: group.to_string(),
        version: version.to_string(),
        plural: plural.to_string(),
        ns,
        name,
        sub,
    })
}

fn not_found_path() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

/// The fallback handler: everything the emulator serves goes through here.
pub(crate) async fn dispatch(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<Params>,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    shared.count_request(method.as_str(), &path, shape(&headers) == Shape::Metadata);
    if matches!(method, Method::PUT | Method::PATCH) && path.ends_with("/status") {
        shared.status_write_released().await;
    }
    let routed = match limits::check_body(body.len()) {
        Ok(()) => route(&shared, &method, &path, &headers, &params, body).await,
        Err(e) => Err(e),
    };
    let response = match routed {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%method, %path, code = e.code, reason = e.reason, "request failed");
            e.into_response()
        }
    };
    tracing::trace!(%method, %path, status = response.status().as_u16(), "request");
    response
}

async fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    params: &Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let discovery =
        |f: &dyn Fn(&super::store::Inner) -> Option<Value>| -> Result<Response, ApiError> {
            if *method != Method::GET {
                return Err(ApiError::method_not_allowed("only GET is allowed here"));
            }
            check_discovery_accept(headers)?;
            let inner = shared.lock();
            f(&inner).map(|v| ok(&v)).ok_or_else(not_found_path)
        };
    let aggregated = |core: bool| -> Result<Response, ApiError> {
        if *method != Method::GET {
            return Err(ApiError::method_not_allowed("only GET is allowed here"));
        }
        let body = aggregated_discovery(&shared.lock(), core);
        Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, AGGREGATED_V2)],
            body.to_string(),
        )
            .into_response())
    };
    match segs.as_slice() {
        ["api"] if wants_aggregated(headers) => aggregated(true),
        ["apis"] if wants_aggregated(headers) => aggregated(false),
        [] => discovery(&|_| {
            Some(
                json!({"paths": ["/api", "/api/v1", "/apis", "/openapi/v2", "/openapi/v3", "/version"]}),
            )
        }),
        ["version"] => discovery(&|_| Some(version_body())),
        ["healthz" | "livez" | "readyz"] => Ok((StatusCode::OK, "ok").into_response()),
        ["api"] => discovery(&|_| {
            Some(json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}))
        }),
        ["apis"] => discovery(&|inner| Some(group_list(inner))),
        ["apis", g] => discovery(&|inner| group(inner, g)),
        ["api", "v1"] => discovery(&|inner| resource_list(inner, "", "v1")),
        ["apis", g, v] => discovery(&|inner| resource_list(inner, g, v)),
        ["openapi", "v2"] => {
            if *method != Method::GET {
                return Err(ApiError::method_not_allowed("only GET is allowed here"));
            }
            openapi_v2(shared, headers)
        }
        ["openapi", "v3"] => discovery(&|inner| Some(openapi::index(inner))),
        ["openapi", "v3", rest @ ..] => {
            let gv = rest.join("/");
            discovery(&|inner| openapi::document(inner, &gv))
        }
        ["api", "v1", rest @ ..] => match parse_resource_path("", "v1", rest) {
            Some(rp) => resource(shared, method, headers, params, body, rp).await,
            None => Err(not_found_path()),
        },
        ["apis", g, v, rest @ ..] => match parse_resource_path(g, v, rest) {
            Some(rp) => resource(shared, method, headers, params, body, rp).await,
            None => Err(not_found_path()),
        },
        _ => Err(not_found_path()),
    }
}

/// /openapi/v2: protobuf when the client asks for it first (kubectl does), else JSON.
fn openapi_v2(shared: &Arc<Shared>, headers: &HeaderMap) -> Result<Response, ApiError> {
    let doc = openapi_v2::document(&shared.lock());
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let first = accept.split(',').next().unwrap_or("").trim();
    if first.starts_with(openapi_v2::PROTOBUF_ACCEPT) {
        return Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, openapi_v2::PROTOBUF_CONTENT_TYPE)],
            openapi_v2::protobuf(&doc),
        )
            .into_response());
    }
    check_discovery_accept(headers)?;
    Ok(ok(&doc))
}

const AGGREGATED_V2: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Aggregated discovery v2 is served when asked for (kubectl asks first, kube-rs's
/// `Discovery::run_aggregated` only); v2beta1 is not, clients then take the legacy lists.
fn wants_aggregated(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| {
            accept.split(',').any(|part| {
                let params: Vec<&str> = part.split(';').map(str::trim).collect();
                params.contains(&"g=apidiscovery.k8s.io")
                    && params.contains(&"v=v2")
                    && params.contains(&"as=APIGroupDiscoveryList")
            })
        })
}

/// apidiscovery.k8s.io/v2 APIGroupDiscoveryList for /api (`core`) or /apis.
fn aggregated_discovery(inner: &super::store::Inner, core: bool) -> Value {
    let mut groups: Vec<&str> = inner
        .types()
        .map(|t| t.group.as_str())
        .filter(|g| g.is_empty() == core)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    let items: Vec<Value> = groups
        .into_iter()
        .map(|g| {
            let versions: Vec<Value> = group_versions(inner, g)
                .into_iter()
                .map(|v| {
                    let mut types: Vec<&Arc<ResourceType>> = inner
                        .types()
                        .filter(|t| t.group == g && t.version(&v).is_some())
                        .collect();
                    types.sort_by(|a, b| a.plural.cmp(&b.plural));
                    let resources: Vec<Value> =
                        types.iter().map(|rt| aggregated_resource(rt, &v)).collect();
                    json!({"version": v, "resources": resources, "freshness": "Current"})
                })
                .collect();
            let metadata = if g.is_empty() {
                json!({})
            } else {
                json!({"name": g})
            };
            json!({"metadata": metadata, "versions": versions})
        })
        .collect();
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2",
           "metadata": {}, "items": items})
}

fn aggregated_resource(rt: &ResourceType, version: &str) -> Value {
    let kind = json!({"group": rt.group, "version": version, "kind": rt.kind});
    let mut r = json!({
        "resource": rt.plural, "responseKind": kind,
        "scope": if rt.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": rt.singular, "verbs": rt.verbs(),
    });
    if !rt.short_names.is_empty() {
        r["shortNames"] = json!(rt.short_names);
    }
    if !rt.categories.is_empty() {
        r["categories"] = json!(rt.categories);
    }
    if rt.has_status(version) {
        r["subresources"] = json!([{"subresource": "status", "responseKind": kind,
                                    "verbs": ["get", "patch", "update"]}]);
    }
    r
}

/// Legacy discovery documents: for clients that accept plain JSON; others get 406.
fn check_discovery_accept(headers: &HeaderMap) -> Result<(), ApiError> {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.is_empty() {
        return Ok(());
    }
    let plain = accept.split(',').any(|part| {
        let part = part.trim();
        let base = part.split(';').next().unwrap_or("").trim();
        matches!(base, "application/json" | "*/*" | "application/*") && !part.contains("as=")
    });
    if plain {
        Ok(())
    } else {
        Err(ApiError::not_acceptable())
    }
}

fn version_body() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": GIT_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24.0", "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn group_versions(inner: &super::store::Inner, group: &str) -> Vec<String> {
    let mut versions: Vec<String> = Vec::new();
    for rt in inner.types().filter(|t| t.group == group) {
        for v in &rt.versions {
            if !versions.contains(&v.name) {
                versions.push(v.name.clone());
            }
        }
    }
    versions.sort_by(|a, b| super::resources::compare_versions(a, b));
    versions
}

fn group_body(group: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": vs,
        "preferredVersion": vs.first().cloned().unwrap_or(Value::Null),
    })
}

fn group_list(inner: &super::store::Inner) -> Value {
    let mut groups: Vec<&str> = inner
        .types()
        .map(|t| t.group.as_str())
        .filter(|g| !g.is_empty())
        .collect();
    groups.sort_unstable();
    groups.dedup();
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|g| group_body(g, &group_versions(inner, g)))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn group(inner: &super::store::Inner, group: &str) -> Option<Value> {
    let versions = group_versions(inner, group);
    if versions.is_empty() {
        return None;
    }
    let mut body = group_body(group, &versions);
    body["kind"] = json!("APIGroup");
    body["apiVersion"] = json!("v1");
    Some(body)
}

fn resource_list(inner: &super::store::Inner, group: &str, version: &str) -> Option<Value> {
    let mut types: Vec<&Arc<ResourceType>> = inner
        .types()
        .filter(|t| t.group == group && t.version(version).is_some())
        .collect();
    if types.is_empty() {
        return None;
    }
    types.sort_by(|a, b| a.plural.cmp(&b.plural));
    let mut resources = Vec::new();
    for rt in types {
        let mut r = json!({
            "name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced,
            "kind": rt.kind, "verbs": rt.verbs(),
        });
        if !rt.short_names.is_empty() {
            r["shortNames"] = json!(rt.short_names);
        }
        if !rt.categories.is_empty() {
            r["categories"] = json!(rt.categories);
        }
        resources.push(r);
        if rt.has_status(version) {
            resources.push(json!({
                "name": format!("{}/status", rt.plural), "singularName": "",
                "namespaced": rt.namespaced, "kind": rt.kind, "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

fn param<'a>(params: &'a Params, key: &str) -> Option<&'a str> {
    params
        .get(key)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

fn is_true(params: &Params, key: &str) -> bool {
    matches!(param(params, key), Some("true" | "1"))
}

fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
}

/// Decodes a POST/PUT body (JSON, YAML, or protobuf for the kinds `protobuf` knows;
/// others get 415).
fn decode_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    let ct = content_type(headers);
    let base = ct.split(';').next().unwrap_or("").trim();
    let parsed = match base {
        "" | "application/json" => serde_json::from_slice(body).map_err(|e| e.to_string()),
        "application/yaml" => serde_yaml::from_slice(body).map_err(|e| e.to_string()),
        protobuf::MEDIA_TYPE => return protobuf::decode(body),
        _ => return Err(ApiError::unsupported_media_type(ct)),
    };
    parsed.map_err(|e| ApiError::bad_request(format!("error decoding request body: {e}")))
}

/// How objects are served, from the first media type of `Accept`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Full,
    /// `as=Table` (kubectl get).
    Table,
    /// `as=PartialObjectMetadata[List]`: metadata only, as metadata watches and lists get.
    Metadata,
}

fn shape(headers: &HeaderMap) -> Shape {
    let first = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.split(',').next())
        .unwrap_or("");
    if first.contains("as=Table") {
        Shape::Table
    } else if first.contains("as=PartialObjectMetadata") {
        Shape::Metadata
    } else {
        Shape::Full
    }
}

/// An object as a PartialObjectMetadata (apiVersion meta.k8s.io/v1).
fn metadata_only(obj: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": obj.get("metadata").cloned().unwrap_or(Value::Null),
    })
}

fn check_accept(headers: &HeaderMap) -> Result<(), ApiError> {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.is_empty()
        || accept.contains("json")
        || accept.contains("*/*")
        || accept.contains("yaml")
    {
        Ok(())
    } else {
        Err(ApiError::not_acceptable())
    }
}

fn serialize_into(buf: &mut Vec<u8>, obj: &Value) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, obj);
}

/// The type a request names and where its objects are stored: the same type, except for
/// events.k8s.io Events, a view of the core ones (see `views.rs`).
struct Served {
    rt: Arc<ResourceType>,
    version: String,
    view: View,
    store_rt: Arc<ResourceType>,
    store_version: String,
}

impl Served {
    fn resolve(shared: &Shared, rp: &ResourcePath) -> Result<Self, ApiError> {
        let inner = shared.lock();
        let rt = inner
            .lookup(&rp.group, &rp.version, &rp.plural)
            .ok_or_else(not_found_path)?;
        let view = View::of(&rt);
        let (store_rt, store_version) = match view.storage_type() {
            Some((group, version, plural)) => (
                inner
                    .lookup(group, version, plural)
                    .ok_or_else(not_found_path)?,
                version.to_string(),
            ),
            None => (rt.clone(), rp.version.clone()),
        };
        Ok(Self {
            rt,
            version: rp.version.clone(),
            view,
            store_rt,
            store_version,
        })
    }

    /// Which stored objects a list, watch or deletecollection sees; selectors use the
    /// served type's field names.
    fn filter(&self, ns: Option<&str>, params: &Params) -> Result<Filter, ApiError> {
        let fields = FieldSelector::parse(
            param(params, "fieldSelector").unwrap_or(""),
            kind_fields(&self.rt.group, &self.rt.plural),
        )?;
        Ok(Filter {
            res: self.store_rt.key(),
            ns: if self.rt.namespaced {
                ns.map(str::to_string)
            } else {
                None
            },
            labels: LabelSelector::parse(param(params, "labelSelector").unwrap_or(""))?,
            fields: fields.renamed(|f| self.view.storage_field(f)),
        })
    }
}

async fn resource(
    shared: &Arc<Shared>,
    method: &Method,
    headers: &HeaderMap,
    params: &Params,
    body: Bytes,
    rp: ResourcePath,
) -> Result<Response, ApiError> {
    let served = Served::resolve(shared, &rp)?;
    let rt = &served.rt;
    let (store_rt, store_version) = (&served.store_rt, served.store_version.as_str());
    let view = served.view;
    if (rt.namespaced && rp.ns.is_none() && rp.name.is_some())
        || (!rt.namespaced && rp.ns.is_some())
    {
        return Err(not_found_path());
    }
    let status_only = match rp.sub.as_deref() {
        None => false,
        Some("status") if rt.has_status(&rp.version) => true,
        Some(_) => return Err(not_found_path()),
    };
    check_accept(headers)?;
    let ns = rp.ns.as_deref().unwrap_or("");
    let api_version = rt.api_version(&rp.version);
    if rt.create_only && *method != Method::POST {
        return Err(ApiError::method_not_allowed(format!(
            "{} only supports create",
            rt.qualified()
        )));
    }
    let respond = |code: StatusCode, stored: &Value| -> Response {
        let obj = view.present(stored, &api_version);
        match shape(headers) {
            Shape::Table => {
                let inner = shared.lock();
                let t = table::render(rt, &rp.version, &[&obj], inner.rv(), params);
                json_response(code, &t)
            }
            Shape::Metadata => json_response(code, &metadata_only(&obj)),
            Shape::Full => json_response(code, &obj),
        }
    };
    match (method.clone(), rp.name.as_deref()) {
        (Method::GET, None) => {
            let filter = served.filter(rp.ns.as_deref(), params)?;
            if is_true(params, "watch") {
                return watch(shared, &served, filter, params, shape(headers));
            }
            list(shared, &served, &filter, headers, params)
        }
        (Method::GET, Some(name)) => {
            let obj = shared.lock().get(store_rt, ns, name)?;
            Ok(respond(StatusCode::OK, &obj))
        }
        (Method::POST, None) => {
            let obj = view.to_storage(decode_body(headers, &body)?);
            strict_fields(params, store_rt, store_version, &obj)?;
            required_fields(store_rt, &obj)?;
            let created = shared
                .lock()
                .create(store_rt, store_version, rp.ns.as_deref(), obj)?;
            // Virtual resources (reviews) answer 201 too, as on the real server.
            Ok(respond(StatusCode::CREATED, &created))
        }
        (Method::PUT, Some(name)) => {
            let obj = view.to_storage(decode_body(headers, &body)?);
            strict_fields(params, store_rt, store_version, &obj)?;
            if !status_only {
                required_fields(store_rt, &obj)?;
            }
            if status_only {
                shared.take_status_conflict(rt, name)?;
            }
            let updated =
                shared
                    .lock()
                    .update(store_rt, store_version, ns, name, obj, status_only)?;
            Ok(respond(StatusCode::OK, &updated))
        }
        (Method::PATCH, Some(name)) => {
            let ct = content_type(headers);
            let kind = PatchKind::from_content_type(ct)
                .ok_or_else(|| ApiError::unsupported_media_type(ct))?;
            if kind == PatchKind::Apply && param(params, "fieldManager").is_none() {
                return Err(ApiError::invalid(
                    &rt.plural,
                    &rt.group,
                    name,
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                ));
            }
            let patch_body = patch::parse_body(kind, &body)?;
            if matches!(kind, PatchKind::Merge | PatchKind::Strategic) {
                strict_fields(params, store_rt, store_version, &patch_body).map_err(|e| {
                    // The real server answers a patch with 422 and the patched object in
                    // the message; here the patch stands in for it.
                    ApiError::new(
                        422,
                        "Invalid",
                        format!(
                            " \"\" is invalid: patch: Invalid value: {:?}: {}",
                            patch_body.to_string(),
                            e.message
                                .rsplit(": strict decoding error: ")
                                .next()
                                .map_or_else(
                                    || e.message.clone(),
                                    |f| format!("strict decoding error: {f}")
                                )
                        ),
                    )
                })?;
            }
            if status_only {
                shared.take_status_conflict(rt, name)?;
            }
            let manager = param(params, "fieldManager").unwrap_or("");
            let patched = shared.lock().patch(
                store_rt,
                store_version,
                ns,
                name,
                kind,
                &patch_body,
                status_only,
                manager,
                view,
            )?;
            Ok(respond(StatusCode::OK, &patched))
        }
        (Method::DELETE, Some(name)) => {
            let orphan = orphan_requested(params, &body);
            let deleted = shared.lock().delete(store_rt, ns, name, orphan)?;
            Ok(respond(StatusCode::OK, &deleted))
        }
        (Method::DELETE, None) => {
            let filter = served.filter(rp.ns.as_deref(), params)?;
            let orphan = orphan_requested(params, &body);
            let mut inner = shared.lock();
            let deleted = inner.delete_collection(store_rt, &filter, orphan);
            let items: Vec<Value> = deleted
                .iter()
                .map(|o| view.present(o, &api_version).into_owned())
                .collect();
            Ok(ok(&json!({
                "kind": rt.list_kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": inner.rv().to_string()}, "items": items,
            })))
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on this path"
        ))),
    }
}

/// `fieldValidation=Strict` (kubectl 1.27+ sends it): a custom object with fields its
/// schema does not declare is refused as the real server refuses it, instead of pruned.
/// (Other values, or none, prune silently; the real server's `Warn` also sends a Warning
/// header, which no client here reads.) For a merge patch, the patch's own fields count
/// (the real server checks the patched object: the same fields, as the stored one has no
/// unknown ones).
fn strict_fields(
    params: &Params,
    rt: &ResourceType,
    version: &str,
    obj: &Value,
) -> Result<(), ApiError> {
    if param(params, "fieldValidation") != Some("Strict") {
        return Ok(());
    }
    let Some(schema) = rt
        .version(version)
        .filter(|_| rt.from_crd)
        .and_then(|v| v.schema.as_ref())
    else {
        return Ok(());
    };
    let unknown = super::prune::unknown_fields(obj, schema);
    if unknown.is_empty() {
        return Ok(());
    }
    let fields: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    Err(ApiError::bad_request(format!(
        "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
        fields.join(", "),
        kind = rt.kind
    )))
}

/// The one required field of a core kind the lab could get wrong: a Pod needs a container
/// (the real server: 422 `Pod "p" is invalid: spec.containers: Required value`).
fn required_fields(rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
    if rt.from_crd || rt.group.as_str() != "" || rt.plural.as_str() != "pods" {
        return Ok(());
    }
    let has_container = obj
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty());
    if has_container {
        return Ok(());
    }
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Err(ApiError::invalid(
        &rt.plural,
        &rt.group,
        name,
        &format!("Pod \"{name}\" is invalid: spec.containers: Required value"),
    ))
}

fn orphan_requested(params: &Params, body: &[u8]) -> bool {
    let from_body = serde_json::from_slice::<Value>(body).ok().and_then(|b| {
        b.get("propagationPolicy")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| {
                b.get("orphanDependents")
                    .and_then(Value::as_bool)
                    .map(|o| if o { "Orphan".into() } else { String::new() })
            })
    });
    let policy = param(params, "propagationPolicy")
        .map(str::to_string)
        .or(from_body);
    policy.as_deref() == Some("Orphan") || is_true(params, "orphanDependents")
}

fn list(
    shared: &Arc<Shared>,
    served: &Served,
    filter: &Filter,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Response, ApiError> {
    let (rt, version, view) = (&served.rt, served.version.as_str(), served.view);
    let api_version = rt.api_version(version);
    let (page, rv) = {
        let inner = shared.lock();
        let request = PageRequest::parse(
            param(params, "limit"),
            param(params, "continue"),
            param(params, "resourceVersion"),
            inner.history_from(),
        )?;
        let page = inner.list_page(filter, request.after(), request.limit);
        (page, request.list_rv(inner.rv()))
    };
    let list_meta = list_meta(&page, filter, rv);
    let shape = shape(headers);
    let items = match shared
        .take_stale_list(&rt.plural)
        .filter(|_| shape == Shape::Full)
    {
        Some(stale) => with_stale_copies(page.items, stale),
        None => page.items,
    };
    if shape == Shape::Table {
        let shown: Vec<_> = items
            .iter()
            .map(|o| view.present(o, &api_version))
            .collect();
        let objs: Vec<&Value> = shown.iter().map(|o| o.as_ref()).collect();
        let mut table = table::render(rt, version, &objs, rv, params);
        table["metadata"] = list_meta;
        return Ok(ok(&table));
    }
    let metadata = shape == Shape::Metadata;
    let (list_kind, list_api_version) = if metadata {
        ("PartialObjectMetadataList", "meta.k8s.io/v1")
    } else {
        (rt.list_kind.as_str(), api_version.as_str())
    };
    let mut buf = Vec::with_capacity(256 + items.len() * 512);
    let head = json!({"kind": list_kind, "apiVersion": list_api_version,
                      "metadata": list_meta});
    let head = head.to_string();
    // `{...}` without its closing brace, then the items array.
    buf.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
    buf.extend_from_slice(b",\"items\":[");
    for (i, obj) in items.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        let shown = view.present(obj, &api_version);
        if metadata {
            serialize_into(&mut buf, &metadata_only(&shown));
        } else {
            serialize_into(&mut buf, &shown);
        }
    }
    buf.extend_from_slice(b"]}");
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        buf,
    )
        .into_response())
}

/// `items` with each object that has a stale copy (same namespace and name) replaced by
/// it (the `serve_stale_list_once` fault).
fn with_stale_copies(items: Vec<Arc<Value>>, stale: Vec<Value>) -> Vec<Arc<Value>> {
    let key = |o: &Value| {
        (
            text(o, "/metadata/namespace").unwrap_or_default(),
            text(o, "/metadata/name").unwrap_or_default(),
        )
    };
    items
        .into_iter()
        .map(|item| {
            let k = key(&item);
            match stale.iter().find(|s| key(s) == k) {
                Some(old) => Arc::new(old.clone()),
                None => item,
            }
        })
        .collect()
}

/// A list's metadata: its resourceVersion and, when keys follow the page, the token that
/// continues it (and how many objects follow, when no selector makes that a guess).
fn list_meta(page: &ListPage, filter: &Filter, rv: u64) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    let last = page.items.last().filter(|_| page.keys_after > 0);
    if let Some(last) = last {
        let cursor = ListCursor {
            ns: text(last, "/metadata/namespace").unwrap_or_default(),
            name: text(last, "/metadata/name").unwrap_or_default(),
        };
        meta["continue"] = json!(paging::encode(rv, &cursor));
        if filter.is_unfiltered() {
            meta["remainingItemCount"] = json!(page.keys_after);
        }
    }
    meta
}

/// One watch event line; `obj` is as served.
fn event_line(ty: &str, obj: &Value) -> Bytes {
    let mut buf = Vec::with_capacity(512);
    buf.extend_from_slice(b"{\"type\":\"");
    buf.extend_from_slice(ty.as_bytes());
    buf.extend_from_slice(b"\",\"object\":");
    serialize_into(&mut buf, obj);
    buf.extend_from_slice(b"}\n");
    Bytes::from(buf)
}

fn error_line(e: &ApiError) -> Bytes {
    let line = json!({"type": "ERROR", "object": e.status_body()});
    Bytes::from(format!("{line}\n"))
}

fn bookmark(rt: &ResourceType, api_version: &str, rv: u64, initial_end: bool) -> Value {
    let mut m = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        m["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": rt.kind, "apiVersion": api_version, "metadata": m})
}

/// Renders watch events: objects, their metadata, or one-row Tables for `kubectl get -w`.
struct EventRenderer {
    rt: Arc<ResourceType>,
    version: String,
    api_version: String,
    view: View,
    shape: Shape,
    params: Params,
}

impl EventRenderer {
    /// The line for a change of stored object `obj`.
    fn line(&self, ty: &str, obj: &Value, rv: u64) -> Bytes {
        let shown = self.view.present(obj, &self.api_version);
        match self.shape {
            Shape::Table => {
                let t = table::render(&self.rt, &self.version, &[&shown], rv, &self.params);
                let line = json!({"type": ty, "object": t});
                Bytes::from(format!("{line}\n"))
            }
            Shape::Metadata => event_line(ty, &metadata_only(&shown)),
            Shape::Full => event_line(ty, &shown),
        }
    }
}

fn watch(
    shared: &Arc<Shared>,
    served: &Served,
    filter: Filter,
    params: &Params,
    shape: Shape,
) -> Result<Response, ApiError> {
    let (rt, version) = (served.rt.clone(), served.version.as_str());
    let rv = match param(params, "resourceVersion") {
        None => None,
        Some(s) => Some(
            s.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {s:?}")))?,
        ),
    };
    let send_initial = is_true(params, "sendInitialEvents");
    let bookmarks = is_true(params, "allowWatchBookmarks");
    let timeout = param(params, "timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_WATCH_TIMEOUT);
    let api_version = rt.api_version(version);
    // sendInitialEvents: the current state first (NotOlderThan), whatever rv says.
    let start = shared
        .lock()
        .watch(&filter, if send_initial { None } else { rv });
    let (mut tx, rx) = futures::channel::mpsc::channel::<Bytes>(256);
    let body_stream = rx.map(Ok::<Bytes, Infallible>);
    let start = match start {
        Ok(s) => s,
        Err(e) => {
            // The real server answers an expired resourceVersion with 200 and one ERROR event.
            let line = error_line(&e);
            tokio::spawn(async move {
                let _ = tx.send(line).await;
            });
            return Ok(stream_response(body_stream));
        }
    };
    let render = EventRenderer {
        rt: rt.clone(),
        version: version.to_string(),
        api_version: api_version.clone(),
        view: served.view,
        shape,
        params: params.clone(),
    };
    tokio::spawn(async move {
        let mut bus = start.rx;
        let mut last_rv = start.rv;
        for (ty, obj) in start.initial {
            if tx
                .send(render.line(ty.as_str(), &obj, last_rv))
                .await
                .is_err()
            {
                return;
            }
        }
        if send_initial {
            let bm = bookmark(&rt, &api_version, last_rv, true);
            if tx.send(event_line("BOOKMARK", &bm)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(BOOKMARK_INTERVAL);
        ticker.tick().await;
        loop {
            let line = tokio::select! {
                _ = &mut deadline => return,
                _ = ticker.tick(), if bookmarks => {
                    event_line("BOOKMARK", &bookmark(&rt, &api_version, last_rv, false))
                }
                msg = bus.recv() => match msg {
                    Ok(BusMsg::Event(rec)) => {
                        last_rv = rec.rv;
                        match filter.translate(&rec) {
                            Some((ty, obj)) => render.line(ty.as_str(), &obj, rec.rv),
                            None => continue,
                        }
                    }
                    Ok(BusMsg::Expire) | Err(RecvError::Lagged(_)) => {
                        let _ = tx.send(error_line(&ApiError::gone(format!(
                            "too old resource version: {last_rv}"
                        )))).await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                },
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    Ok(stream_response(body_stream))
}

fn stream_response<S>(stream: S) -> Response
where
    S: futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}
