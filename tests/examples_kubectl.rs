//! A user's first minutes, with the real kubectl against the served emulator and the
//! controller running: the CRDs and every example apply, `kubectl get` shows the printer
//! columns, and a reset for a VM that does not exist says VMNotFound.
use guestcred::controller::context::EngineSettings;
use guestcred::controller::shims::ShimAccess;
use guestcred_lab::apiserver::{ApiServer, write_kubeconfig};
use guestcred_lab::kubevirt::kubevirt_crds;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{Patch, PatchParams};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct Served {
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

async fn serve_with_controller() -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let server = ApiServer::new();
    let serving = server.clone();
    tokio::spawn(async move { serving.serve(listener, axum::Router::new()).await });
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    write_kubeconfig(&kubeconfig, &url).expect("kubeconfig");
    // KubeVirt's CRDs, as a cluster with KubeVirt has them.
    let client = server.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in kubevirt_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(
            &name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("kubevirt crd");
    }
    let access = ShimAccess {
        namespace: None,
        port: 1,
        scheme: "http".into(),
        token: None,
        tls: None,
        request_timeout: Duration::from_secs(2),
    };
    tokio::spawn(guestcred::controller::start(
        client,
        access,
        "test",
        EngineSettings::default(),
        Default::default(),
        std::future::pending(),
    ));
    Served {
        _dir: dir,
        kubeconfig,
    }
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("kubectl must be installed to run this test: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(path)
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_and_every_example_apply_and_show_their_status() {
    let s = serve_with_controller().await;
    let k = s.kubeconfig.clone();
    tokio::task::spawn_blocking(move || {
        kubectl(&k, &["apply", "-f", &repo("crds")]);
        kubectl(
            &k,
            &[
                "wait",
                "--for=condition=Established",
                "crd/guestpasswordresets.guestcred.io",
                "crd/keypairrebuilds.guestcred.io",
                "--timeout=10s",
            ],
        );
        let mut examples: Vec<_> = std::fs::read_dir(repo("examples"))
            .expect("examples")
            .flatten()
            .map(|e| e.path())
            .collect();
        examples.sort();
        assert!(examples.len() >= 6, "one example per use case");
        for e in &examples {
            kubectl(&k, &["apply", "-f", &e.display().to_string()]);
        }
        // The missing VM db-0 shows up as VMNotFound within a second or so.
        let start = Instant::now();
        loop {
            let reason = kubectl(
                &k,
                &[
                    "get",
                    "guestpasswordreset",
                    "db-0-root",
                    "-o",
                    "jsonpath={.status.targets[0].reason}",
                ],
            );
            if reason == "VMNotFound" {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no VMNotFound yet (got {reason:?})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let table = kubectl(&k, &["get", "gpr"]);
        let header = table.lines().next().unwrap_or_default();
        for col in ["NAME", "PHASE", "TARGETS", "READY", "AGE"] {
            assert!(header.contains(col), "column {col} missing in {header:?}");
        }
        assert!(table.contains("db-0-root"), "{table}");
        let rebuilds = kubectl(&k, &["get", "keypairrebuilds"]);
        assert!(
            rebuilds.lines().next().unwrap_or_default().contains("MODE"),
            "{rebuilds}"
        );
    })
    .await
    .expect("kubectl steps");
}
