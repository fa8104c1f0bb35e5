//! Deletion: finalizers, owner references and garbage collection, namespaces.
use super::*;

/// ConfigMap `a`, created with `finalizer` and then deleted: it waits for the finalizer.
async fn config_map_a_being_deleted(finalizer: &str) -> (ApiServer, Api<ConfigMap>) {
    let (server, cms) = config_maps_api();
    let mut cm = config_map("a", &[]);
    cm.metadata.finalizers = Some(vec![finalizer.into()]);
    create(&cms, &cm).await;
    cms.delete("a", &DeleteParams::default()).await.unwrap();
    (server, cms)
}

#[tokio::test]
async fn deletion_waits_for_finalizers_then_removes_the_object() {
    let (_server, cms) = config_map_a_being_deleted("test.guestcred.io/cleanup").await;
    let pending = cms.get("a").await.unwrap();
    assert!(pending.metadata.deletion_timestamp.is_some());

    let mut stream = cms
        .watch(
            &WatchParams::default(),
            &pending.resource_version().unwrap(),
        )
        .await
        .unwrap()
        .boxed();
    merge_patch(&cms, "a", json!({"metadata": {"finalizers": null}}))
        .await
        .unwrap();
    match next_event(&mut stream).await.unwrap() {
        WatchEvent::Deleted(obj) => assert_eq!(obj.name_any(), "a"),
        other => panic!("expected DELETED, got {other:?}"),
    }
    let err = cms.get("a").await.unwrap_err();
    assert!(is_status(&err, 404, "NotFound"), "{err:?}");
}

/// ConfigMap "owner" and ConfigMap "child", which it owns; returns the child.
async fn owner_with_child(cms: &Api<ConfigMap>) -> ConfigMap {
    let owner = create(cms, &config_map("owner", &[])).await;
    let mut child = config_map("child", &[]);
    child.metadata.owner_references = Some(vec![owned_by(&owner)]);
    create(cms, &child).await
}

#[tokio::test]
async fn deleting_an_owner_deletes_its_dependents_in_cascade() {
    let server = ApiServer::new();
    let client = server.client();
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let secrets: Api<Secret> = Api::default_namespaced(client);
    let child = owner_with_child(&cms).await;
    let mut grandchild = secret("grandchild", "x");
    grandchild.metadata.owner_references = Some(vec![owned_by(&child)]);
    create(&secrets, &grandchild).await;
    let bystander = create(&secrets, &secret("bystander", "y")).await;

    cms.delete("owner", &DeleteParams::default()).await.unwrap();

    assert!(gone(&cms, "child").await);
    assert!(gone(&secrets, "grandchild").await);
    assert_eq!(
        secrets.get("bystander").await.unwrap().uid(),
        bystander.uid()
    );
}

#[tokio::test]
async fn orphan_propagation_keeps_dependents() {
    let (_server, cms) = config_maps_api();
    owner_with_child(&cms).await;

    cms.delete("owner", &DeleteParams::orphan()).await.unwrap();
    assert!(!gone(&cms, "child").await);
}

#[tokio::test]
async fn deleting_a_namespace_deletes_its_contents() {
    let server = ApiServer::new();
    let client = server.client();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let created = create_namespace(&client, "doomed").await;
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Active"));
    let cms: Api<ConfigMap> = Api::namespaced(client, "doomed");
    create(&cms, &config_map("a", &[])).await;
    namespaces
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    assert!(gone(&namespaces, "doomed").await);
    assert!(gone(&cms, "a").await);
}

#[tokio::test]
async fn kube_runtime_finalizer_helper_adds_then_releases_its_finalizer() {
    use kube::runtime::controller::Action;
    use kube::runtime::finalizer::{Event as Finalizer, finalizer};
    use std::sync::Arc;

    let (_server, cms, created) = config_map_a().await;
    let handle = |obj: ConfigMap| {
        finalizer(
            &cms,
            "test.guestcred.io/cleanup",
            Arc::new(obj),
            |ev| async move {
                match ev {
                    Finalizer::Apply(_) | Finalizer::Cleanup(_) => {
                        Ok::<_, std::convert::Infallible>(Action::await_change())
                    }
                }
            },
        )
    };

    handle(created).await.unwrap();
    let guarded = cms.get("a").await.unwrap();
    assert_eq!(guarded.finalizers(), ["test.guestcred.io/cleanup"]);

    cms.delete("a", &DeleteParams::default()).await.unwrap();
    let deleting = cms.get("a").await.unwrap();
    assert!(deleting.metadata.deletion_timestamp.is_some());
    handle(deleting).await.unwrap();
    assert!(gone(&cms, "a").await);
}

#[tokio::test]
async fn no_finalizer_can_be_added_to_an_object_being_deleted() {
    let (_server, cms) = config_map_a_being_deleted("first").await;
    let err = merge_patch(
        &cms,
        "a",
        json!({"metadata": {"finalizers": ["first", "second"]}}),
    )
    .await
    .unwrap_err();
    assert!(is_status(&err, 422, "Invalid"), "{err:?}");
}
