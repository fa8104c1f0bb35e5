//! Lists: label and field selectors, delete-collection, and paging with limit and continue.
use super::*;

#[tokio::test]
async fn label_selectors_filter_lists() {
    let (_server, cms) = config_maps_api();
    for (name, labels) in [
        ("db", vec![("tier", "db"), ("env", "prod")]),
        ("web", vec![("tier", "web"), ("env", "dev")]),
        ("bare", vec![]),
    ] {
        create(&cms, &config_map(name, &labels)).await;
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
    create_namespace(&client, "other").await;
    for ns in ["default", "other"] {
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        create(&cms, &config_map("same", &[])).await;
    }
    let all: Api<ConfigMap> = Api::all(client);
    let list = all.list(&by_fields("metadata.name=same")).await.unwrap();
    assert_eq!(list.items.len(), 2);
    assert!(list.metadata.resource_version.is_some());
    let in_other = "metadata.namespace=other,metadata.name=same";
    assert_eq!(count_where(&all, in_other).await, 1);
    let err = all.list(&by_fields("data.x=y")).await.unwrap_err();
    assert!(is_status(&err, 400, "BadRequest"), "{err:?}");
}

#[tokio::test]
async fn delete_collection_deletes_only_selected_objects() {
    let (_server, cms) = config_maps_api();
    for (name, tier) in [("a", "db"), ("b", "db"), ("c", "web")] {
        create(&cms, &config_map(name, &[("tier", tier)])).await;
    }
    cms.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("tier=db"),
    )
    .await
    .unwrap();
    assert_eq!(listed_names(&cms).await, ["c"]);
}

/// The page of at most `limit` items that `token` continues to.
fn page(limit: u32, token: &str) -> ListParams {
    ListParams::default().limit(limit).continue_token(token)
}

/// Creates ConfigMaps with these names in the default namespace.
async fn config_maps(cms: &Api<ConfigMap>, names: &[&str]) {
    for name in names {
        create(cms, &config_map(name, &[])).await;
    }
}

#[tokio::test]
async fn a_list_with_a_limit_comes_in_pages_joined_by_continue_tokens() {
    let (_server, cms) = config_maps_api();
    config_maps(&cms, &["a", "b", "c", "d", "e"]).await;

    let first = cms.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let mut names: Vec<String> = first.items.iter().map(|c| c.name_any()).collect();
    let mut token = first.metadata.continue_.clone();
    let mut pages = 1;
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        let page = cms.list(&page(2, &t)).await.unwrap();
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
    let (server, cms) = config_maps_api();
    config_maps(&cms, &["a", "b", "c"]).await;
    // As client-go's reflectors ask (kube-rs drops resourceVersion=0 when it sets a limit).
    let path = "/api/v1/namespaces/default/configmaps?limit=1&resourceVersion=0";
    let (code, list) = raw_get(&server, path, "application/json").await;
    assert_eq!(code, 200);
    assert_eq!(list["items"].as_array().map(Vec::len), Some(3));
    assert_eq!(list["metadata"].get("continue"), None);
}

#[tokio::test]
async fn a_filtered_page_holds_matching_objects_only() {
    let (_server, cms) = config_maps_api();
    for (name, tier) in [("a", "db"), ("b", "web"), ("c", "db"), ("d", "web")] {
        create(&cms, &config_map(name, &[("tier", tier)])).await;
    }
    let lp = ListParams::default().labels("tier=db").limit(1);
    let first = cms.list(&lp).await.unwrap();
    let token = first.metadata.continue_.clone().expect("more keys follow");
    // With a selector the server cannot count what is left without reading it.
    assert_eq!(first.metadata.remaining_item_count, None);
    let rest = cms.list(&lp.clone().continue_token(&token)).await.unwrap();
    assert_eq!(names(first.items.iter().chain(&rest.items)), ["a", "c"]);
}

#[tokio::test]
async fn a_continue_token_older_than_the_watch_history_is_410_expired() {
    let (server, cms) = config_maps_api();
    config_maps(&cms, &["a", "b"]).await;
    let first = cms.list(&ListParams::default().limit(1)).await.unwrap();
    let token = first.metadata.continue_.expect("a second page");
    config_maps(&cms, &["c"]).await;
    // History now starts after the change that made "c": the token's version is gone.
    server.faults().expire_watches();
    let err = cms.list(&page(1, &token)).await.unwrap_err();
    assert!(is_status(&err, 410, "Expired"), "{err:?}");
}

#[tokio::test]
async fn a_continue_token_the_server_did_not_issue_is_400() {
    let (_server, cms) = config_maps_api();
    let err = cms.list(&page(1, "forged")).await.unwrap_err();
    assert!(is_status(&err, 400, "BadRequest"), "{err:?}");
}

#[tokio::test]
async fn kube_watcher_paging_its_initial_list_sees_every_object() {
    let (server, cms) = config_maps_api();
    config_maps(&cms, &["a", "b", "c", "d"]).await;
    // MostRecent (kube-rs' default): a list without resourceVersion, paged by `limit`.
    let config = watcher::Config::default().page_size(1);
    let mut events = watcher(cms.clone(), config).boxed();
    assert_eq!(initial_names(&mut events).await, ["a", "b", "c", "d"]);
    assert_eq!(
        server.requests("GET", "/api/v1/namespaces/default/configmaps"),
        4
    );
}
