//! Watches: initial events, streaming lists, 410 Gone and relists, selectors, timeouts,
//! bookmarks.
use super::*;

/// A kube-rs watcher with `config` over ConfigMap "existing" reports its initial list, then
/// "new" being created; returns the ConfigMaps and the still open watcher.
async fn watcher_sees_existing_then_new(
    config: watcher::Config,
) -> (
    Api<ConfigMap>,
    futures::stream::BoxStream<'static, watcher::Result<watcher::Event<ConfigMap>>>,
) {
    let (_server, cms) = config_maps_api();
    create(&cms, &config_map("existing", &[])).await;
    let mut events = watcher(cms.clone(), config).boxed();
    assert_eq!(
        next_changes(&mut events, 3).await,
        ["Init", "InitApply existing", "InitDone"]
    );
    create(&cms, &config_map("new", &[])).await;
    assert_eq!(next_change(&mut events).await, "Apply new");
    (cms, events)
}

#[tokio::test]
async fn kube_watcher_sees_init_then_apply_and_delete() {
    let (cms, mut events) = watcher_sees_existing_then_new(watcher::Config::default()).await;
    cms.delete("new", &DeleteParams::default()).await.unwrap();
    assert_eq!(next_change(&mut events).await, "Delete new");
}

#[tokio::test]
async fn streaming_list_watcher_gets_initial_events_then_changes() {
    let _still_open =
        watcher_sees_existing_then_new(watcher::Config::default().streaming_lists()).await;
}

#[tokio::test]
async fn watching_from_an_expired_resource_version_gets_410() {
    let (server, cms, old) = config_map_a().await;
    create(&cms, &config_map("b", &[])).await;
    server.faults().expire_watches();
    let mut stream = cms
        .watch(&WatchParams::default(), &old.resource_version().unwrap())
        .await
        .unwrap()
        .boxed();
    match next_event(&mut stream).await.unwrap() {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test]
async fn kube_watcher_relists_after_its_watch_expires() {
    let (server, cms) = config_maps_api();
    let mut events = watcher(cms.clone(), watcher::Config::default()).boxed();
    assert_eq!(next_changes(&mut events, 2).await, ["Init", "InitDone"]);
    create(&cms, &config_map("a", &[])).await;
    assert_eq!(next_change(&mut events).await, "Apply a");

    server.faults().expire_watches();
    let err = next_event(&mut events).await.unwrap_err();
    assert!(
        matches!(err, watcher::Error::WatchError(ref s) if s.code == 410),
        "{err:?}"
    );
    assert_eq!(
        next_changes(&mut events, 3).await,
        ["Init", "InitApply a", "InitDone"]
    );
}

#[tokio::test]
async fn filtered_watch_sees_objects_leave_their_selector_as_deleted() {
    let (_server, cms) = config_maps_api();
    create(&cms, &config_map("a", &[("tier", "db")])).await;
    let mut stream = cms
        .watch(&WatchParams::default().labels("tier=db"), "0")
        .await
        .unwrap()
        .boxed();
    assert!(matches!(
        next_event(&mut stream).await.unwrap(),
        WatchEvent::Added(_)
    ));
    merge_patch(&cms, "a", json!({"metadata": {"labels": {"tier": "web"}}}))
        .await
        .unwrap();
    match next_event(&mut stream).await.unwrap() {
        WatchEvent::Deleted(cm) => assert_eq!(cm.labels()["tier"], "web"),
        other => panic!("expected DELETED, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_ends_at_its_timeout() {
    let (_server, cms) = config_maps_api();
    let mut stream = cms
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap()
        .boxed();
    let drained = tokio::time::timeout(STEP, async {
        while let Some(ev) = stream.next().await {
            // Nothing changes meanwhile: only bookmarks may arrive before the end.
            assert!(matches!(ev, Ok(WatchEvent::Bookmark(_))), "{ev:?}");
        }
    })
    .await;
    assert!(drained.is_ok(), "the watch ends by itself");
}

#[tokio::test]
async fn watches_that_allow_bookmarks_receive_them() {
    let (_server, cms) = config_maps_api();
    let mut stream = cms
        .watch(&WatchParams::default(), "0") // kube-rs asks for bookmarks by default
        .await
        .unwrap()
        .boxed();
    match next_event(&mut stream).await.unwrap() {
        WatchEvent::Bookmark(bm) => assert!(!bm.metadata.resource_version.is_empty()),
        other => panic!("expected BOOKMARK, got {other:?}"),
    }
}
