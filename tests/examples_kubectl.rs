//! A user's first minutes, with the real kubectl against the served emulator and the
//! controller running: the CRDs and every example apply, `kubectl get` shows the printer
//! columns, and a reset for a VM that does not exist says VMNotFound.
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/
use guestcred::controller::context::EngineSettings;
use guestcred_lab::repo_dir;
use guestcred_lab::world::{World, WorldOptions};
use std::time::{Duration, Instant};

/// The emulator served for kubectl, KubeVirt's CRDs (as a cluster with KubeVirt has them,
/// but not guestcred's: the test applies those), and the controller with its production
/// engine settings.
async fn served_with_controller() -> World {
    World::start(WorldOptions {
        nodes: 0,
        serve: true,
        guestcred_crds: false,
        settings: EngineSettings::default(),
        request_timeout: Some(Duration::from_secs(2)),
        controller_name: "test".into(),
        ..WorldOptions::default()
    })
    .await
    .expect("the served emulator and the controller start")
}

fn repo(path: &str) -> String {
    repo_dir().join(path).display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_and_every_example_apply_and_show_their_status() {
    let w = served_with_controller().await;
    let k = w.kubectl();
    tokio::task::spawn_blocking(move || {
        k.run(&["apply", "-f", &repo("crds")]);
        k.run(&[
            "wait",
            "--for=condition=Established",
            "crd/guestpasswordresets.guestcred.io",
            "crd/keypairrebuilds.guestcred.io",
            "--timeout=10s",
        ]);
        let mut examples: Vec<_> = std::fs::read_dir(repo("examples"))
            .expect("examples")
            .flatten()
            .map(|e| e.path())
            .collect();
        examples.sort();
        assert!(examples.len() >= 6, "one example per use case");
        for e in &examples {
            k.run(&["apply", "-f", &e.display().to_string()]);
        }
        // The missing VM db-0 shows up as VMNotFound within a second or so.
        let start = Instant::now();
        loop {
            let reason = k.run(&[
                "get",
                "guestpasswordreset",
                "db-0-root",
                "-o",
                "jsonpath={.status.targets[0].reason}",
            ]);
            if reason == "VMNotFound" {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no VMNotFound yet (got {reason:?})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let table = k.run(&["get", "gpr"]);
        let header = table.lines().next().unwrap_or_default();
        for col in ["NAME", "PHASE", "TARGETS", "READY", "AGE"] {
            assert!(header.contains(col), "column {col} missing in {header:?}");
        }
        assert!(table.contains("db-0-root"), "{table}");
        let rebuilds = k.run(&["get", "keypairrebuilds"]);
        assert!(
            rebuilds.lines().next().unwrap_or_default().contains("MODE"),
            "{rebuilds}"
        );
    })
    .await
    .expect("kubectl steps");
}
