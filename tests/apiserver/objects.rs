//! Objects: create, read, update, delete, names, resourceVersions, generations, the
//! status subresource, and the requests the emulator counts or answers without storing.
use super::*;

#[tokio::test]
async fn answered_requests_are_counted_by_method_and_exact_path() {
    let server = ApiServer::new();
    let secrets: Api<Secret> = Api::default_namespaced(server.client());
    create(&secrets, &secret("pw", "x")).await;
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

    let created = create(&secrets, &secret("db", "hunter2")).await;
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
    let (_server, cms) = config_maps_api();
    create(&cms, &config_map("a", &[])).await;
    let err = create_refused(&cms, &config_map("a", &[])).await;
    assert!(is_status(&err, 409, "AlreadyExists"), "{err:?}");
}

#[tokio::test]
async fn generate_name_gives_distinct_names_with_the_prefix() {
    let (_server, cms) = config_maps_api();
    let mut cm = config_map("", &[]);
    cm.metadata.name = None;
    cm.metadata.generate_name = Some("job-".into());
    let a = create(&cms, &cm).await;
    let b = create(&cms, &cm).await;
    assert!(a.name_any().starts_with("job-") && a.name_any().len() == 9);
    assert_ne!(a.name_any(), b.name_any());
}

#[tokio::test]
async fn creating_in_a_missing_namespace_is_404() {
    let server = ApiServer::new();
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), "nowhere");
    let err = create_refused(&cms, &config_map("a", &[])).await;
    assert!(is_status(&err, 404, "NotFound"), "{err:?}");
}

#[tokio::test]
async fn update_with_a_stale_resource_version_is_409_conflict() {
    let (_server, cms, first) = config_map_a().await;
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
    let (_server, widgets) = widgets_api().await;
    let w = create(&widgets, &widget("w", 1)).await;
    assert_eq!(w.metadata.generation, Some(1));

    let labelled = merge_patch(&widgets, "w", json!({"metadata": {"labels": {"a": "b"}}}))
        .await
        .unwrap();
    assert_eq!(labelled.metadata.generation, Some(1));

    let status = merge_patch_status(&widgets, "w", json!({"status": {"phase": "Running"}}))
        .await
        .unwrap();
    assert_eq!(status.metadata.generation, Some(1));

    let spec = merge_patch(&widgets, "w", json!({"spec": {"size": 2}}))
        .await
        .unwrap();
    assert_eq!(spec.metadata.generation, Some(2));
}

#[tokio::test]
async fn status_subresource_isolates_spec_and_status_writes() {
    let (_server, widgets) = widgets_api().await;
    let mut w = widget("w", 1);
    w.status = Some(WidgetStatus {
        phase: "Ignored".into(),
    });
    let created = create(&widgets, &w).await;
    assert_eq!(created.status, None, "create cannot set status");

    // Each write carries both a spec and a status.
    let both = |size: i32, phase: &str| json!({"spec": {"size": size}, "status": {"phase": phase}});
    let after_status = merge_patch_status(&widgets, "w", both(9, "Running"))
        .await
        .unwrap();
    assert_eq!(after_status.spec.size, 1, "status writes ignore spec");
    assert_eq!(after_status.status.unwrap().phase, "Running");

    let after_main = merge_patch(&widgets, "w", both(3, "Hacked")).await.unwrap();
    assert_eq!(after_main.spec.size, 3);
    assert_eq!(
        after_main.status.unwrap().phase,
        "Running",
        "main writes ignore status"
    );
}

#[tokio::test]
async fn injected_conflict_fails_the_next_status_write_only() {
    let (server, widgets) = widgets_api().await;
    create(&widgets, &widget("w", 1)).await;
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
async fn no_op_updates_keep_the_resource_version() {
    let (_server, cms) = config_maps_api();
    let created = create(&cms, &config_map("a", &[("x", "y")])).await;
    let same = merge_patch(&cms, "a", json!({"metadata": {"labels": {"x": "y"}}}))
        .await
        .unwrap();
    assert_eq!(same.resource_version(), created.resource_version());
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
    let answer = create(&reviews, &review).await;
    assert_eq!(answer.status.unwrap().authenticated, Some(false));
    let err = reviews.list(&ListParams::default()).await.unwrap_err();
    assert!(is_status(&err, 405, "MethodNotAllowed"), "{err:?}");
}

#[tokio::test]
async fn creating_with_a_resource_version_is_refused() {
    let (_server, cms, fetched) = config_map_a().await;
    let mut copy = fetched.clone();
    copy.metadata.name = Some("b".into());
    copy.metadata.uid = None;
    let err = create_refused(&cms, &copy).await;
    assert!(is_status(&err, 500, "InternalError"), "{err:?}");
}
