//! Patches: merge, JSON and strategic merge, server-side apply and its field managers.
use super::*;

#[tokio::test]
async fn merge_json_and_strategic_patches_apply() {
    let (_server, cms) = config_maps_api();
    let mut cm = config_map("a", &[]);
    cm.data = Some(BTreeMap::from([
        ("keep".into(), "1".into()),
        ("drop".into(), "2".into()),
    ]));
    create(&cms, &cm).await;
    let pp = PatchParams::default();

    let merged = merge_patch(&cms, "a", json!({"data": {"drop": null, "new": "3"}}))
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
    let (_server, cms, created) = config_map_a().await;
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/name", "value": "other"}
    ]))
    .unwrap();
    let err = cms
        .patch("a", &PatchParams::default(), &Patch::<()>::Json(ops))
        .await
        .unwrap_err();
    assert!(is_status(&err, 422, "Invalid"), "{err:?}");
    assert_a_unchanged(&cms, &created).await;
}

#[tokio::test]
async fn apply_patch_creates_then_merges_another_managers_fields() {
    let (_server, cms) = config_maps_api();
    let first = PatchParams::apply("first").force();
    let created = apply_a(&cms, &first, json!({"one": "1"})).await;
    assert_eq!(created.data.unwrap()["one"], "1");

    let second = PatchParams::apply("second").force();
    let merged = apply_a(&cms, &second, json!({"two": "2"})).await;
    assert_eq!(merged.data.unwrap().len(), 2);
}

#[tokio::test]
async fn apply_patch_without_field_manager_is_rejected() {
    let (_server, cms) = config_maps_api();
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}});
    let err = cms
        .patch("a", &PatchParams::default(), &Patch::Apply(&body))
        .await
        .unwrap_err();
    assert!(is_status(&err, 422, "Invalid"), "{err:?}");
}

#[tokio::test]
async fn patch_carrying_a_stale_resource_version_is_409() {
    let (_server, cms, first) = config_map_a().await;
    let pp = PatchParams::default();
    merge_patch(&cms, "a", json!({"data": {"k": "1"}}))
        .await
        .unwrap();
    let stale = json!({"metadata": {"resourceVersion": first.resource_version()},
                       "data": {"k": "2"}});
    let err = cms.patch("a", &pp, &Patch::Merge(stale)).await.unwrap_err();
    assert!(is_status(&err, 409, "Conflict"), "{err:?}");
}

#[tokio::test]
async fn apply_removes_fields_the_same_manager_stops_applying() {
    let (_server, cms) = config_maps_api();
    let mine = PatchParams::apply("mine");
    apply_a(&cms, &mine, json!({"x": "1", "y": "2"})).await;
    merge_patch(&cms, "a", json!({"data": {"other": "3"}}))
        .await
        .unwrap();
    let after = apply_a(&cms, &mine, json!({"x": "1"})).await;
    let keys: Vec<String> = after.data.unwrap().into_keys().collect();
    assert_eq!(
        keys,
        ["other", "x"],
        "y dropped, the other writer's key kept"
    );
}

/// Server-side apply of ConfigMap `a` holding `data`, by the field manager of `pp`.
async fn apply_a(cms: &Api<ConfigMap>, pp: &PatchParams, data: Value) -> ConfigMap {
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "a"}, "data": data});
    cms.patch("a", pp, &Patch::Apply(&body)).await.unwrap()
}

/// ConfigMap `a` is still `before` (the same resourceVersion): nothing changed it.
async fn assert_a_unchanged(cms: &Api<ConfigMap>, before: &ConfigMap) {
    let now = cms.get("a").await.unwrap();
    assert_eq!(
        now.resource_version(),
        before.resource_version(),
        "ConfigMap a changed"
    );
}
