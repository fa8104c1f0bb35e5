//! Other shapes of the same objects: Tables (kubectl get), PartialObjectMetadata, and the
//! formats the emulator refuses.
use super::*;

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
    let (server, cms) = config_maps_api();
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
