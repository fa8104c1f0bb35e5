//! The lab API-server emulator as a real kubectl sees it: a server on a loopback port, a
//! kubeconfig in a temp dir, and the `kubectl` binary run as a process.
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/

use std::path::{Path, PathBuf};
use std::time::Duration;

use guestcred_lab::apiserver::ApiServer;
use guestcred_lab::testing::{Kubectl, merge_patch, merge_patch_status};
use guestcred_lab::world::{World, WorldOptions};
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

const CRD_YAML: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.test.guestcred.io
spec:
  group: test.guestcred.io
  scope: Namespaced
  names:
    plural: gadgets
    singular: gadget
    kind: Gadget
    shortNames: [gdg]
  versions:
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
    additionalPrinterColumns:
    - name: Size
      type: integer
      jsonPath: .spec.size
    - name: Phase
      type: string
      jsonPath: .status.phase
    - name: Age
      type: date
      jsonPath: .metadata.creationTimestamp
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer}
          status:
            type: object
            properties:
              phase: {type: string}
"#;

fn gadget_yaml(name: &str, size: u32, tier: &str) -> String {
    format!(
        "apiVersion: test.guestcred.io/v1\nkind: Gadget\nmetadata:\n  name: {name}\n  labels:\n    tier: {tier}\nspec:\n  size: {size}\n"
    )
}

fn gadget_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("test.guestcred.io", "v1", "Gadget"))
}

/// A served emulator (no controller) and kubectl pointed at it, with a private HOME and
/// discovery cache and a 30 s bound on each run.
struct Lab {
    world: World,
    k: Kubectl,
}

async fn start_lab() -> Lab {
    let world = World::start(WorldOptions {
        nodes: 0,
        serve: true,
        start_controller: false,
        guestcred_crds: false,
        ..WorldOptions::default()
    })
    .await
    .expect("the served emulator starts");
    let k = world
        .kubectl()
        .private_home(world.temp_dir())
        .timeout(Duration::from_secs(30));
    Lab { world, k }
}

impl Lab {
    fn server(&self) -> &ApiServer {
        self.world.api()
    }

    fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.world.temp_dir().join(name);
        std::fs::write(&path, content).expect("fixture written");
        path
    }

    /// Runs kubectl to completion; panics with its stderr if it fails.
    async fn kubectl(&self, args: &[&str]) -> String {
        self.k.run_async(args).await
    }

    /// Writes `content` to the temp file `name` and `kubectl apply`s it.
    async fn apply_file(&self, name: &str, content: &str) {
        let path = self.file(name, content);
        self.kubectl(&["apply", "-f", path_str(&path)]).await;
    }

    /// The Gadgets of `default`, read and written through the API rather than kubectl.
    fn gadgets(&self) -> Api<DynamicObject> {
        Api::default_namespaced_with(self.server().client(), &gadget_resource())
    }

    async fn apply_crd(&self) {
        self.apply_file("crd.yaml", CRD_YAML).await;
    }
}

/// A lab with the Gadget CRD and Gadget `g1` (size 1, tier db), applied with kubectl.
async fn lab_with_gadget_g1() -> Lab {
    let lab = start_lab().await;
    lab.apply_crd().await;
    lab.apply_file("g.yaml", &gadget_yaml("g1", 1, "db")).await;
    lab
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_a_crd_and_waits_until_it_is_established() {
    let lab = start_lab().await;
    lab.apply_crd().await;
    let out = lab
        .kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=10s",
            "crd/gadgets.test.guestcred.io",
        ])
        .await;
    assert!(out.contains("condition met"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_and_reads_a_custom_object() {
    let lab = start_lab().await;
    lab.apply_crd().await;
    lab.apply_file("g.yaml", &gadget_yaml("g1", 3, "db")).await;

    let yaml = lab.kubectl(&["get", "gadget", "g1", "-o", "yaml"]).await;
    let parsed: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("kubectl prints YAML");
    assert_eq!(parsed["spec"]["size"], serde_yaml::Value::from(3));
    assert_eq!(
        parsed["metadata"]["namespace"],
        serde_yaml::Value::from("default")
    );

    // A second apply with a change goes through kubectl's patch path.
    lab.apply_file("g2.yaml", &gadget_yaml("g1", 5, "db")).await;
    let size = lab
        .kubectl(&["get", "gdg", "g1", "-o", "jsonpath={.spec.size}"])
        .await;
    assert_eq!(size, "5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_filters_by_label_and_shows_printer_columns() {
    let lab = start_lab().await;
    lab.apply_crd().await;
    let objs = format!(
        "{}---\n{}",
        gadget_yaml("db-0", 1, "db"),
        gadget_yaml("web-0", 2, "web")
    );
    lab.apply_file("gadgets.yaml", &objs).await;
    let gadgets = lab.gadgets();
    merge_patch_status(&gadgets, "db-0", json!({"status": {"phase": "Running"}}))
        .await
        .expect("status written");

    let out = lab.kubectl(&["get", "gadgets", "-l", "tier=db"]).await;
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 2, "header and one row:\n{out}");
    assert_eq!(lines[0], ["NAME", "SIZE", "PHASE", "AGE"]);
    assert_eq!(&lines[1][..3], ["db-0", "1", "Running"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_delete_and_wait_for_delete_follow_finalizers() {
    let lab = lab_with_gadget_g1().await;
    let gadgets = lab.gadgets();
    let finalizers = |f: serde_json::Value| json!({"metadata": {"finalizers": f}});
    merge_patch(&gadgets, "g1", finalizers(json!(["test/hold"])))
        .await
        .expect("finalizer added");

    lab.kubectl(&["delete", "gadget", "g1", "--wait=false"])
        .await;
    let waiting = lab
        .k
        .output_async(&["wait", "--for=delete", "--timeout=20s", "gadget/g1"]);
    let release = async {
        // The object stays while its finalizer does; releasing it completes the deletion.
        let pending = gadgets.get("g1").await.expect("still there");
        assert!(pending.metadata.deletion_timestamp.is_some());
        tokio::time::sleep(Duration::from_millis(300)).await;
        merge_patch(&gadgets, "g1", finalizers(json!(null)))
            .await
            .expect("finalizer removed");
    };
    let (out, ()) = tokio::join!(waiting, release);
    assert!(
        out.success(),
        "kubectl wait --for=delete failed: {}",
        out.stderr
    );
    assert!(gadgets.get_opt("g1").await.expect("get works").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_describe_lists_events_a_kube_recorder_wrote() {
    use kube::Resource;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};

    let lab = lab_with_gadget_g1().await;
    let gadgets = lab.gadgets();
    let gadget = gadgets.get("g1").await.expect("gadget exists");
    let recorder = Recorder::new(
        lab.server().client(),
        Reporter {
            controller: "guestcred-test".into(),
            instance: Some("lab-0".into()),
        },
    );
    let event = Event {
        type_: EventType::Warning,
        reason: "PasswordResetFailed".into(),
        note: Some("guest agent not responding".into()),
        action: "Reset".into(),
        secondary: None,
    };
    // Twice: the second publish patches the Event's series (events.k8s.io/v1).
    for _ in 0..2 {
        recorder
            .publish(&event, &gadget.object_ref(&gadget_resource()))
            .await
            .expect("event published");
    }

    let out = lab.kubectl(&["describe", "gadget", "g1"]).await;
    let events = out
        .split_once("Events:")
        .map(|(_, events)| events)
        .unwrap_or_else(|| panic!("no Events section:\n{out}"));
    let row = events
        .lines()
        .find(|l| l.contains("PasswordResetFailed"))
        .unwrap_or_else(|| panic!("no row for the Event:\n{out}"));
    assert!(row.contains("Warning"), "{row}");
    assert!(row.contains("guest agent not responding"), "{row}");
    assert!(row.contains("guestcred-test"), "{row}");
    assert!(row.contains("x2"), "the repeat count shows: {row}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_follows_continue_tokens_across_pages() {
    let lab = start_lab().await;
    let maps: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|name| format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n"))
        .collect();
    lab.apply_file("maps.yaml", &maps.join("---\n")).await;
    let path = "/api/v1/namespaces/default/configmaps";
    let before = lab.server().requests("GET", path);

    let table = lab
        .kubectl(&["get", "configmaps", "--chunk-size=1", "--no-headers"])
        .await;
    let rows: Vec<&str> = table
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(rows, ["a", "b", "c"], "{table}");
    assert_eq!(
        lab.server().requests("GET", path) - before,
        3,
        "one GET a page"
    );

    let names = lab
        .kubectl(&["get", "configmaps", "--chunk-size=2", "-o", "name"])
        .await;
    assert_eq!(
        names.lines().collect::<Vec<_>>(),
        ["configmap/a", "configmap/b", "configmap/c"]
    );
}
