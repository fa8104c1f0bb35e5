//! CRDs, discovery and OpenAPI: what a client learns about the kinds the server has.
use super::*;

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
    create(&widgets, &widget("w", 4)).await;
    assert_eq!(widgets.get("w").await.unwrap().spec.size, 4);
    let dynamic: Api<DynamicObject> = Api::default_namespaced_with(client, &ar);
    assert_eq!(dynamic.get("w").await.unwrap().data["spec"]["size"], 4);
}

#[tokio::test]
async fn deleting_a_crd_removes_its_objects_and_its_api() {
    let (server, widgets) = widgets_api().await;
    let client = server.client();
    create(&widgets, &widget("w", 1)).await;
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
async fn discovery_in_unsupported_formats_gets_406() {
    let server = ApiServer::new();
    let (code, body) = raw_get(
        &server,
        "/apis",
        "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList",
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
async fn openapi_v3_documents_registered_crds() {
    let server = ApiServer::new();
    install_widget_crd(&server.client()).await;
    let (_, index) = raw_get(&server, "/openapi/v3", "application/json").await;
    let url = index["paths"]["apis/test.guestcred.io/v1"]["serverRelativeURL"]
        .as_str()
        .expect("the CRD's group-version is in the index");
    let (code, doc) = raw_get(&server, url, "application/json").await;
    assert_eq!(code, 200);
    let schema = &doc["components"]["schemas"]["io.guestcred.test.v1.Widget"];
    assert_eq!(
        schema["properties"]["spec"]["properties"]["size"]["type"],
        "integer"
    );
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
    let created = create(&widgets, &obj).await;
    assert_eq!(created.data["spec"], json!({"size": 1}));
    assert!(created.data.get("extra").is_none());

    let status = merge_patch_status(
        &widgets,
        "w",
        json!({"status": {"phase": "Running", "undeclared": 1}}),
    )
    .await
    .unwrap();
    assert_eq!(status.data["status"], json!({"phase": "Running"}));
}
