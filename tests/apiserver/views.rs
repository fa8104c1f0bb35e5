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
    let (server, widgets) = widgets_api().await;
    create(&widgets, &widget("w", 1)).await;
    merge_patch_status(&widgets, "w", json!({"status": {"phase": "Running"}}))
        .await
        .unwrap();
    let (code, table) = raw_get(
        &server,
        "/apis/test.guestcred.io/v1/namespaces/default/widgets",
        &format!("{TABLE},application/json"),
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

const TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";

const METADATA_LIST: &str = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";

const METADATA: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";

async fn server_with_secret_pw() -> ApiServer {
    let server = ApiServer::new();
    let secrets: Api<Secret> = Api::default_namespaced(server.client());
    create(&secrets, &secret("pw", "hunter2")).await;
    server
}

/// `GET path` as `accept` from a server holding Secret `pw`; the answer must be 200.
async fn ok_from_server_with_secret_pw(path: &str, accept: &str) -> Value {
    let server = server_with_secret_pw().await;
    let (code, body) = raw_get(&server, path, accept).await;
    assert_eq!(code, 200, "{body}");
    body
}

#[tokio::test]
async fn metadata_lists_carry_only_metadata() {
    let list =
        ok_from_server_with_secret_pw("/api/v1/namespaces/default/secrets", METADATA_LIST).await;
    assert_eq!(list["kind"], "PartialObjectMetadataList");
    assert_eq!(list["apiVersion"], "meta.k8s.io/v1");
    assert_eq!(list["items"][0]["kind"], "PartialObjectMetadata");
    assert_eq!(list["items"][0]["metadata"]["name"], "pw");
    assert!(list["items"][0].get("data").is_none(), "{list}");
}

#[tokio::test]
async fn metadata_get_carries_only_metadata() {
    let obj =
        ok_from_server_with_secret_pw("/api/v1/namespaces/default/secrets/pw", METADATA).await;
    assert_eq!(obj["kind"], "PartialObjectMetadata");
    assert!(obj.get("data").is_none(), "{obj}");
}

#[tokio::test]
async fn metadata_watch_events_carry_only_metadata() {
    let server = server_with_secret_pw().await;
    let first = first_watch_event(&server, "/api/v1/namespaces/default/secrets", METADATA).await;
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
    assert_eq!(initial_names(&mut events).await, ["pw"]);
}

#[tokio::test]
async fn table_watches_send_one_row_tables() {
    let (server, cms) = config_maps_api();
    create(&cms, &config_map("a", &[])).await;
    let first = first_watch_event(&server, "/api/v1/namespaces/default/configmaps", TABLE).await;
    assert_eq!(first["type"], "ADDED");
    assert_eq!(first["object"]["kind"], "Table");
    assert_eq!(first["object"]["rows"][0]["cells"][0], "a");
}
