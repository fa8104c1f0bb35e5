//! The emulator answers as the real kube-apiserver does where kubectl and clients notice:
//! OpenAPI v2 (kubectl 1.27), SelfSubjectAccessReview (`kubectl auth can-i`) and the size
//! limits (request body, JSON-patch copies, Secret/ConfigMap data, etcd's value limit).
//! Expected answers were measured against kube-apiserver v1.37.2 (`.lab/bin/controlplane`);
//! see lab/src/apiserver/limits.rs. Protobuf request bodies are covered by unit tests in
//! lab/src/apiserver/protobuf.rs and end to end by tests/kubectl_matrix.rs.

use axum::body::Body;
use guestcred_lab::apiserver::ApiServer;
use http::{Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;

struct Answer {
    status: StatusCode,
    content_type: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn call(
    server: &ApiServer,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Answer {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = server
        .router()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap()
        .to_vec();
    Answer {
        status,
        content_type,
        body,
    }
}

async fn post_json(server: &ApiServer, uri: &str, body: &Value) -> Answer {
    send_json(server, "POST", uri, "application/json", body).await
}

/// `method uri` with `body` as JSON of `content_type` (a patch type, say).
async fn send_json(
    server: &ApiServer,
    method: &str,
    uri: &str,
    content_type: &str,
    body: &impl serde::Serialize,
) -> Answer {
    let body = serde_json::to_vec(body).unwrap();
    call(server, method, uri, &[("content-type", content_type)], body).await
}

/// `GET uri`, accepting `accept`.
async fn get_as(server: &ApiServer, uri: &str, accept: &str) -> Answer {
    call(server, "GET", uri, &[("accept", accept)], vec![]).await
}

const JSON_PATCH: &str = "application/json-patch+json";

const BLOBS: &str = "/apis/example.com/v1/namespaces/default/blobs";

async fn server_with_blobs() -> ApiServer {
    let schema = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    server_with_crd("blob", "Blob", schema).await
}

/// A fresh emulator with the namespaced CRD `{singular}s.example.com` (kind `kind`,
/// version v1) whose objects have the OpenAPI v3 `schema`.
async fn server_with_crd(singular: &str, kind: &str, schema: Value) -> ApiServer {
    let server = ApiServer::new();
    let plural = format!("{singular}s");
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.example.com")},
        "spec": {"group": "example.com", "scope": "Namespaced",
                 "names": {"plural": plural, "singular": singular, "kind": kind},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                     "schema": {"openAPIV3Schema": schema}}]},
    });
    let a = post_json(
        &server,
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        &crd,
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED);
    server
}

fn blob(name: &str, size: usize) -> Value {
    json!({"apiVersion": "example.com/v1", "kind": "Blob", "metadata": {"name": name},
           "spec": {"x": "a".repeat(size)}})
}

/// The real server's error body, as compared here: code, reason (absent for etcd's
/// errors) and message.
fn status_of(a: &Answer) -> (u16, Option<String>, String) {
    let v = a.json();
    (
        a.status.as_u16(),
        v.get("reason").and_then(Value::as_str).map(str::to_string),
        v["message"].as_str().unwrap_or_default().to_string(),
    )
}

/// A 422 Invalid with `message`, as [`status_of`] gives it.
fn invalid(message: &str) -> (u16, Option<String>, String) {
    (422, Some("Invalid".into()), message.into())
}

#[tokio::test]
async fn openapi_v2_is_served_as_json_and_as_the_protobuf_kubectl_1_27_asks_for() {
    let server = server_with_blobs().await;
    let a = get_as(&server, "/openapi/v2", "application/json").await;
    assert_eq!(a.status, StatusCode::OK);
    let doc = a.json();
    assert_eq!(doc["swagger"], "2.0");
    let def = &doc["definitions"]["com.example.v1.Blob"];
    assert_eq!(
        def["x-kubernetes-group-version-kind"],
        json!([{"group": "example.com", "version": "v1", "kind": "Blob"}])
    );
    let patch = &doc["paths"]["/apis/example.com/v1/namespaces/{namespace}/blobs/{name}"]["patch"];
    let params: Vec<&str> = patch["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(params.contains(&"fieldValidation"), "{params:?}");

    let a = get_as(
        &server,
        "/openapi/v2",
        "application/com.github.proto-openapi.spec.v2@v1.0+protobuf",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.content_type,
        "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
    );
    // Field 1 (swagger, a string) comes first: "\n\x032.0".
    assert_eq!(&a.body[..5], b"\n\x032.0");
}

#[tokio::test]
async fn openapi_v3_lists_collection_paths_as_kubectl_1_27_explain_needs() {
    let server = server_with_blobs().await;
    let a = call(
        &server,
        "GET",
        "/openapi/v3/apis/example.com/v1",
        &[],
        vec![],
    )
    .await;
    let doc = a.json();
    let gvk = &doc["paths"]["/apis/example.com/v1/blobs"]["get"]["x-kubernetes-group-version-kind"];
    assert_eq!(gvk["kind"], "Blob", "{:#}", doc["paths"]);
}

#[tokio::test]
async fn self_subject_access_review_is_allowed_and_says_why() {
    let server = ApiServer::new();
    let review = json!({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"namespace": "default", "verb": "create",
                                        "resource": "secrets"}},
    });
    let a = post_json(
        &server,
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        &review,
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.json());
    let got = a.json();
    assert_eq!(got["status"]["allowed"], true);
    assert!(
        got["status"]["reason"]
            .as_str()
            .unwrap()
            .contains("no RBAC"),
        "{got}"
    );
    assert_eq!(got["spec"], review["spec"]);
}

#[tokio::test]
async fn a_body_over_three_mebibytes_is_413_for_create_and_patch() {
    let server = server_with_blobs().await;
    let a = post_json(&server, BLOBS, &blob("big", 3_200_000)).await;
    assert_eq!(
        status_of(&a),
        (
            413,
            Some("RequestEntityTooLarge".into()),
            "Request entity too large: limit is 3145728".into()
        )
    );
    assert_eq!(
        post_json(&server, BLOBS, &blob("small", 1000)).await.status,
        StatusCode::CREATED
    );
    let patch = json!({"spec": {"z": "c".repeat(3_200_000)}});
    let a = send_json(
        &server,
        "PATCH",
        &format!("{BLOBS}/small"),
        "application/merge-patch+json",
        &patch,
    )
    .await;
    assert_eq!(status_of(&a).0, 413);
}

#[tokio::test]
async fn objects_over_etcd_limits_are_refused_as_etcd_refuses_them() {
    let server = server_with_blobs().await;
    // 1.0 MB fits; 1.6 MB is over etcd's 1.5 MiB; 2.5 MB is over the gRPC client's 2 MiB.
    assert_eq!(
        post_json(&server, BLOBS, &blob("a", 1_000_000))
            .await
            .status,
        StatusCode::CREATED
    );
    let a = post_json(&server, BLOBS, &blob("b", 1_600_000)).await;
    assert_eq!(
        status_of(&a),
        (500, None, "etcdserver: request is too large".into())
    );
    let a = post_json(&server, BLOBS, &blob("c", 2_500_000)).await;
    let (code, reason, message) = status_of(&a);
    assert_eq!((code, reason), (500, None));
    assert!(
        message.starts_with(
            "rpc error: code = ResourceExhausted desc = trying to send message larger than max (25"
        ) && message.ends_with(" vs. 2097152)"),
        "{message}"
    );

    // A JSON patch growing the stored object past 1.5 MiB: etcd's answer, nothing stored.
    let grow = json!([{"op": "add", "path": "/spec/y", "value": "b".repeat(600_000)}]);
    let a = send_json(&server, "PATCH", &format!("{BLOBS}/a"), JSON_PATCH, &grow).await;
    assert_eq!(
        status_of(&a),
        (500, None, "etcdserver: request is too large".into())
    );
    let stored = call(&server, "GET", &format!("{BLOBS}/a"), &[], vec![]).await;
    assert!(stored.json()["spec"].get("y").is_none());

    // Copies of more than 3 MiB in total: json-patch's copy limit, a bare 422.
    let copies: Vec<Value> = (0..4)
        .map(|i| json!({"op": "copy", "from": "/spec/x", "path": format!("/spec/c{i}")}))
        .collect();
    let a = send_json(&server, "PATCH", &format!("{BLOBS}/a"), JSON_PATCH, &copies).await;
    assert_eq!(
        status_of(&a),
        invalid("the server rejected our request due to an error in our request")
    );
    assert_eq!(a.json()["details"], json!({}));
}

#[tokio::test]
async fn secret_and_config_map_data_over_one_mebibyte_is_invalid() {
    use base64::Engine as _;
    let server = ApiServer::new();
    let data = base64::engine::general_purpose::STANDARD.encode(vec![b'a'; 1_100_000]);
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bigsec"},
                        "data": {"k": data}});
    let a = post_json(&server, "/api/v1/namespaces/default/secrets", &secret).await;
    assert_eq!(
        status_of(&a),
        invalid("Secret \"bigsec\" is invalid: data: Too long: may not be more than 1048576 bytes")
    );
    assert_eq!(a.json()["details"]["causes"][0]["field"], "data");
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big-b"},
                    "data": {"x": "a".repeat(1_600_000)}});
    let a = post_json(&server, "/api/v1/namespaces/default/configmaps", &cm).await;
    assert_eq!(
        status_of(&a),
        invalid("ConfigMap \"big-b\" is invalid: []: Too long: may not be more than 1048576 bytes")
    );
}

/// A CRD with a structural schema: `spec.size` is declared, nothing else.
async fn server_with_gadgets() -> ApiServer {
    let schema = json!({"type": "object", "properties": {
        "spec": {"type": "object", "properties": {"size": {"type": "integer"}}}}});
    server_with_crd("gadget", "Gadget", schema).await
}

const GADGETS: &str = "/apis/example.com/v1/namespaces/default/gadgets";

/// kubectl (1.27 and later) sends `fieldValidation=Strict`: the real server then refuses
/// a field the schema does not declare instead of dropping it (400, measured against
/// kube-apiserver v1.37.2); without the parameter (kube-rs clients) it is dropped.
#[tokio::test]
async fn strict_field_validation_refuses_unknown_fields_and_the_default_prunes_them() {
    let server = server_with_gadgets().await;
    let gadget = |name: &str| {
        json!({"apiVersion": "example.com/v1", "kind": "Gadget",
               "metadata": {"name": name}, "spec": {"size": 1, "color": "blue"}})
    };
    let strict = post_json(
        &server,
        &format!("{GADGETS}?fieldValidation=Strict"),
        &gadget("strict"),
    )
    .await;
    assert_eq!(
        status_of(&strict),
        (
            400,
            Some("BadRequest".into()),
            "Gadget in version \"v1\" cannot be handled as a Gadget: strict decoding error: unknown field \"spec.color\"".into()
        )
    );
    let lenient = post_json(&server, GADGETS, &gadget("lenient")).await;
    assert_eq!(lenient.status, StatusCode::CREATED);
    assert_eq!(lenient.json()["spec"], json!({"size": 1}), "pruned");

    // kubectl apply of an existing object: a merge patch, strict too; the real server
    // answers it differently from a create.
    let patched = send_json(
        &server,
        "PATCH",
        &format!("{GADGETS}/lenient?fieldValidation=Strict"),
        "application/merge-patch+json",
        &json!({"spec": {"colour": "red"}}),
    )
    .await;
    // 422 with the patched object in the message (the emulator puts the patch there).
    let (code, reason, message) = status_of(&patched);
    assert_eq!(
        (code, reason.as_deref()),
        (422, Some("Invalid")),
        "{message}"
    );
    assert!(
        message.starts_with(" \"\" is invalid: patch: Invalid value: \"")
            && message.ends_with("\": strict decoding error: unknown field \"spec.colour\""),
        "{message}"
    );
}

/// A Pod needs at least one container: kube-apiserver v1.37.2 answers 422 (measured),
/// where the emulator once stored it (the lab's shim pods had none).
#[tokio::test]
async fn a_pod_without_containers_is_invalid() {
    let server = ApiServer::new();
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                     "spec": {"nodeName": "n", "containers": []}});
    let a = post_json(&server, "/api/v1/namespaces/default/pods", &pod).await;
    assert_eq!(
        status_of(&a),
        invalid("Pod \"p\" is invalid: spec.containers: Required value")
    );
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                     "spec": {"nodeName": "n", "containers": [{"name": "c", "image": "i"}]}});
    let a = post_json(&server, "/api/v1/namespaces/default/pods", &pod).await;
    assert_eq!(a.status, StatusCode::CREATED);
}
