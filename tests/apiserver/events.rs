//! Events: one store, two views (core/v1 and events.k8s.io/v1).
use super::*;

#[tokio::test]
async fn events_can_be_selected_by_involved_object() {
    let server = ApiServer::new();
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::default_namespaced(server.client());
    for (name, target) in [("e1", "db-0"), ("e2", "web-0")] {
        let mut ev = k8s_openapi::api::core::v1::Event::default();
        ev.metadata.name = Some(name.into());
        ev.involved_object.name = Some(target.into());
        ev.involved_object.kind = Some("Pod".into());
        create(&events, &ev).await;
    }
    let list = events
        .list(&by_fields(
            "involvedObject.name=db-0,involvedObject.kind=Pod",
        ))
        .await
        .unwrap();
    let names: Vec<String> = list.items.iter().map(|e| e.name_any()).collect();
    assert_eq!(names, ["e1"]);
}

type CoreEvent = k8s_openapi::api::core::v1::Event;

type EventsV1Event = k8s_openapi::api::events::v1::Event;

fn recorder(client: &Client) -> kube::runtime::events::Recorder {
    let reporter = kube::runtime::events::Reporter {
        controller: "guestcred-test".into(),
        instance: Some("lab-0".into()),
    };
    kube::runtime::events::Recorder::new(client.clone(), reporter)
}

fn password_reset() -> kube::runtime::events::Event {
    kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Warning,
        reason: "PasswordReset".into(),
        note: Some("guest password reset".into()),
        action: "Reset".into(),
        secondary: None,
    }
}

/// The "PasswordReset" Warning about `pod`, published `times` times by one recorder.
async fn publish_password_reset(
    client: &Client,
    pod: &k8s_openapi::api::core::v1::Pod,
    times: usize,
) {
    let recorder = recorder(client);
    for _ in 0..times {
        recorder
            .publish(&password_reset(), &pod.object_ref(&()))
            .await
            .unwrap();
    }
}

async fn create_pod(client: &Client, name: &str) -> k8s_openapi::api::core::v1::Pod {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::default_namespaced(client.clone());
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "guest", "image": "virt-launcher"}]},
    }))
    .expect("a valid Pod");
    create(&pods, &pod).await
}

/// The core/v1 Events about `name`, selected as `kubectl describe` selects them.
async fn core_events_about(client: &Client, name: &str) -> Vec<CoreEvent> {
    let events: Api<CoreEvent> = Api::default_namespaced(client.clone());
    let fields = format!("involvedObject.name={name},involvedObject.namespace=default");
    events.list(&by_fields(&fields)).await.unwrap().items
}

#[tokio::test]
async fn recorder_events_are_listed_as_core_events_of_their_object() {
    let server = ApiServer::new();
    let client = server.client();
    let pod = create_pod(&client, "vm-0").await;
    create_pod(&client, "vm-1").await;
    publish_password_reset(&client, &pod, 1).await;

    let events = core_events_about(&client, "vm-0").await;
    assert_eq!(events.len(), 1, "{events:?}");
    let ev = &events[0];
    assert_eq!(ev.involved_object.kind.as_deref(), Some("Pod"));
    assert_eq!(ev.involved_object.uid, pod.metadata.uid);
    assert_eq!(ev.message.as_deref(), Some("guest password reset"));
    assert_eq!(ev.reason.as_deref(), Some("PasswordReset"));
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert_eq!(ev.action.as_deref(), Some("Reset"));
    assert_eq!(ev.count, Some(1));
    assert_eq!(ev.reporting_component.as_deref(), Some("guestcred-test"));
    assert_eq!(ev.reporting_instance.as_deref(), Some("lab-0"));
    let source = ev.source.clone().unwrap_or_default();
    assert_eq!(source.component.as_deref(), Some("guestcred-test"));
    assert_eq!(source.host.as_deref(), Some("lab-0"));
    assert!(ev.first_timestamp.is_some() && ev.last_timestamp.is_some());
    assert!(ev.event_time.is_some());
    assert!(core_events_about(&client, "vm-1").await.is_empty());

    // kubectl describe selects by uid too; events.k8s.io still reads it as written.
    let events: Api<CoreEvent> = Api::default_namespaced(client.clone());
    let uid = pod.metadata.uid.clone().unwrap();
    let by_uid = format!("involvedObject.uid={uid}");
    assert_eq!(count_where(&events, &by_uid).await, 1);
    let v1: Api<EventsV1Event> = Api::default_namespaced(client);
    let same = v1.get(&ev.name_any()).await.unwrap();
    assert_eq!(same.note.as_deref(), Some("guest password reset"));
    assert_eq!(same.regarding.and_then(|r| r.uid), pod.metadata.uid);
    assert_eq!(same.deprecated_count, None);
    assert_eq!(same.metadata.uid, ev.metadata.uid);
}

#[tokio::test]
async fn a_repeated_recorder_event_raises_the_core_count() {
    let server = ApiServer::new();
    let client = server.client();
    let pod = create_pod(&client, "vm-0").await;
    publish_password_reset(&client, &pod, 3).await;
    let events = core_events_about(&client, "vm-0").await;
    assert_eq!(
        events.len(),
        1,
        "one Event, patched with a series: {events:?}"
    );
    let ev = &events[0];
    assert_eq!(ev.count, Some(3));
    assert_eq!(ev.series.as_ref().and_then(|s| s.count), Some(3));
    assert!(ev.last_timestamp >= ev.first_timestamp);

    let v1: Api<EventsV1Event> = Api::default_namespaced(client);
    let series = v1.get(&ev.name_any()).await.unwrap().series.unwrap();
    assert_eq!(series.count, 3);
}

#[tokio::test]
async fn core_events_are_readable_through_events_k8s_io() {
    let server = ApiServer::new();
    let client = server.client();
    let core: Api<CoreEvent> = Api::default_namespaced(client.clone());
    let ev: CoreEvent = serde_json::from_value(json!({
        "metadata": {"name": "vm-0.1"},
        "involvedObject": {"kind": "Pod", "name": "vm-0", "namespace": "default", "uid": "u-1"},
        "message": "Started container", "reason": "Started", "type": "Normal", "count": 4,
        "source": {"component": "kubelet", "host": "node-1"},
        "firstTimestamp": "2025-01-02T03:04:05Z", "lastTimestamp": "2025-01-02T03:10:00Z",
    }))
    .unwrap();
    create(&core, &ev).await;

    let v1: Api<EventsV1Event> = Api::default_namespaced(client.clone());
    let got = v1.get("vm-0.1").await.unwrap();
    assert_eq!(got.note.as_deref(), Some("Started container"));
    assert_eq!(got.reason.as_deref(), Some("Started"));
    assert_eq!(got.type_.as_deref(), Some("Normal"));
    assert_eq!(got.deprecated_count, Some(4));
    assert_eq!(got.regarding.unwrap().name.as_deref(), Some("vm-0"));
    assert_eq!(got.reporting_controller.as_deref(), Some("kubelet"));
    assert_eq!(got.reporting_instance.as_deref(), Some("node-1"));
    assert!(got.event_time.is_some());
    assert_eq!(got.series.map(|s| s.count), Some(4));

    let selected = "regarding.name=vm-0,reason=Started,type=Normal";
    assert_eq!(count_where(&v1, selected).await, 1);
    assert_eq!(count_where(&v1, "regarding.name=vm-1").await, 0);

    // A patch through events.k8s.io lands in the core view; a delete removes both.
    merge_patch(&v1, "vm-0.1", json!({"note": "Restarted container"}))
        .await
        .unwrap();
    let patched = core.get("vm-0.1").await.unwrap();
    assert_eq!(patched.message.as_deref(), Some("Restarted container"));
    assert_eq!(patched.count, Some(4));
    core.delete("vm-0.1", &DeleteParams::default())
        .await
        .unwrap();
    assert!(gone(&v1, "vm-0.1").await);
}

#[tokio::test]
async fn event_watches_see_writes_through_the_other_api_in_their_own_shape() {
    let server = ApiServer::new();
    let client = server.client();
    let v1: Api<EventsV1Event> = Api::default_namespaced(client.clone());
    let core: Api<CoreEvent> = Api::default_namespaced(client.clone());
    let mut v1_watch = v1
        .watch(&WatchParams::default().fields("regarding.name=vm-0"), "0")
        .await
        .unwrap()
        .boxed();
    let mut core_watch = core
        .watch(
            &WatchParams::default().fields("involvedObject.name=vm-0"),
            "0",
        )
        .await
        .unwrap()
        .boxed();
    let pod = create_pod(&client, "vm-0").await;
    publish_password_reset(&client, &pod, 2).await;
    match next_event(&mut core_watch).await.unwrap() {
        WatchEvent::Added(ev) => assert_eq!(ev.reason.as_deref(), Some("PasswordReset")),
        other => panic!("expected ADDED, got {other:?}"),
    }
    match next_event(&mut core_watch).await.unwrap() {
        WatchEvent::Modified(ev) => assert_eq!(ev.count, Some(2)),
        other => panic!("expected MODIFIED, got {other:?}"),
    }
    match next_event(&mut v1_watch).await.unwrap() {
        WatchEvent::Added(ev) => assert_eq!(ev.note.as_deref(), Some("guest password reset")),
        other => panic!("expected ADDED, got {other:?}"),
    }
}
