//! kubectl compatibility matrix: kubectl 1.27, 1.33 and 1.35 (each called by its full
//! path under .lab/tools/kubectl-<v>/, installed by scripts/install-helm.sh) run the user
//! flows against the emulator and against a real kube-apiserver (`.lab/bin/controlplane
//! up`, built by scripts/build-controlplane.sh), and every cell must have the same outcome
//! on both. The README's "kubectl versions tested" table is this test's matrix.
//!
//! `wait --for=condition=Ready` needs a controller that reaches Ready; without guests the
//! test plays that part itself: it writes a Ready condition into the object's status
//! (as the controller does) while kubectl waits. The controller's own path to Ready is
//! covered by tests/examples_kubectl.rs and the controller tests.
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use guestcred_lab::apiserver::{ApiServer, write_kubeconfig};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

const VERSIONS: [&str; 3] = ["1.27", "1.33", "1.35"];
const FLOWS: [&str; 10] = [
    "create secret generic --from-file",
    "create ns",
    "apply -f examples/",
    "get",
    "get -o wide",
    "describe",
    "explain gpr.spec",
    "wait --for=condition=Ready",
    "delete --wait",
    "auth can-i",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn kubectl_path(version: &str) -> PathBuf {
    repo().join(format!(".lab/tools/kubectl-{version}/kubectl"))
}

/// One backend: a kubeconfig and a client for the test's own writes.
struct Backend {
    name: &'static str,
    kubeconfig: PathBuf,
    client: kube::Client,
}

fn kubectl(backend: &Backend, version: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(kubectl_path(version))
        .arg("--kubeconfig")
        .arg(&backend.kubeconfig)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("kubectl {version}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr
            .lines()
            .find(|l| !l.starts_with("Warning:") && !l.trim().is_empty())
            .unwrap_or("")
            .to_string();
        Err(first)
    }
}

fn gpr_api(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("guestcred.io", "v1alpha1", "GuestPasswordReset");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "guestpasswordresets");
    Api::namespaced_with(client.clone(), ns, &ar)
}

/// Writes Ready=True into the reset's status, as the controller would.
async fn mark_ready(client: &kube::Client, ns: &str, name: &str) {
    let api = gpr_api(client, ns);
    let generation = api
        .get(name)
        .await
        .unwrap()
        .metadata
        .generation
        .unwrap_or(1);
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = json!({"status": {"phase": "Succeeded", "conditions": [{
        "type": "Ready", "status": "True", "reason": "Succeeded", "message": "matrix test",
        "lastTransitionTime": now, "observedGeneration": generation}]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// One flow for one kubectl version; Ok(()) or the first line of kubectl's error.
async fn run_flow(backend: &Backend, version: &str, flow: &str) -> Result<(), String> {
    let ns = format!("matrix-{}", version.replace('.', "-"));
    let secret_file = std::env::temp_dir().join("guestcred-matrix-password");
    std::fs::write(&secret_file, "hunter2\n").unwrap();
    let from_file = format!("--from-file=password={}", secret_file.display());
    let k = |args: &[&str]| kubectl(backend, version, args).map(|_| ());
    match flow {
        "create ns" => k(&["create", "ns", &ns]),
        "create secret generic --from-file" => {
            // The namespace comes first; creating it is the next flow's check.
            let _ = kubectl(backend, "1.35", &["create", "ns", &format!("{ns}-s")]);
            k(&[
                "create",
                "secret",
                "generic",
                "pw",
                &from_file,
                "-n",
                &format!("{ns}-s"),
            ])
        }
        "apply -f examples/" => k(&["apply", "-f", "examples/"]),
        "get" => {
            let out = kubectl(backend, version, &["get", "gpr", "-n", "default"])?;
            out.contains("db-0-root")
                .then_some(())
                .ok_or_else(|| format!("no db-0-root in:\n{out}"))
        }
        "get -o wide" => k(&["get", "gpr", "db-0-root", "-n", "default", "-o", "wide"]),
        "describe" => {
            let out = kubectl(backend, version, &["describe", "gpr", "db-0-root"])?;
            out.contains("GuestPasswordReset")
                .then_some(())
                .ok_or_else(|| format!("describe without the kind:\n{out}"))
        }
        "explain gpr.spec" => {
            let out = kubectl(backend, version, &["explain", "gpr.spec"])?;
            out.contains("GuestPasswordReset")
                .then_some(())
                .ok_or_else(|| format!("explain without the kind:\n{out}"))
        }
        "wait --for=condition=Ready" => {
            let name = format!("wait-{}", version.replace('.', "-"));
            let manifest = std::env::temp_dir().join(format!("{name}-{}.yaml", backend.name));
            std::fs::write(
                &manifest,
                format!(
                    "apiVersion: guestcred.io/v1alpha1\nkind: GuestPasswordReset\n\
                     metadata: {{name: {name}, namespace: default}}\n\
                     spec:\n  target: {{vmName: db-0}}\n  user: root\n  password:\n    \
                     secretRef: {{name: db-root-password, key: password}}\n"
                ),
            )
            .unwrap();
            k(&["apply", "-f", manifest.to_str().unwrap()])?;
            let kubeconfig = backend.kubeconfig.clone();
            let path = kubectl_path(version);
            let target = format!("gpr/{name}");
            let waiting = tokio::task::spawn_blocking(move || {
                Command::new(path)
                    .arg("--kubeconfig")
                    .arg(kubeconfig)
                    .args(["wait", "--for=condition=Ready", "--timeout=30s", "-n"])
                    .args(["default", &target])
                    .output()
            });
            tokio::time::sleep(Duration::from_millis(500)).await;
            mark_ready(&backend.client, "default", &name).await;
            let out = waiting.await.unwrap().unwrap();
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
            }
        }
        "delete --wait" => {
            let name = format!("del-{}", version.replace('.', "-"));
            k(&["create", "configmap", &name, "--from-literal=a=b"])?;
            k(&["delete", "configmap", &name, "--wait=true", "--timeout=30s"])
        }
        "auth can-i" => {
            let out = kubectl(backend, version, &["auth", "can-i", "create", "secrets"])?;
            (out.trim() == "yes")
                .then_some(())
                .ok_or_else(|| format!("can-i said {out:?}"))
        }
        other => panic!("unknown flow {other}"),
    }
}

async fn matrix(backend: &Backend) -> Vec<(String, String, Result<(), String>)> {
    kubectl(backend, "1.35", &["apply", "-f", "crds/"]).expect("CRDs applied");
    kubectl(
        backend,
        "1.35",
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            "crds/",
        ],
    )
    .expect("CRDs established");
    let mut cells = Vec::new();
    for version in VERSIONS {
        for flow in FLOWS {
            // Right after Established, a real server's discovery and OpenAPI can lag.
            let deadline = Instant::now() + Duration::from_secs(20);
            let outcome = loop {
                let outcome = run_flow(backend, version, flow).await;
                let retry = backend.name == "kube-apiserver"
                    && flow == "apply -f examples/"
                    && outcome.is_err()
                    && Instant::now() < deadline;
                if !retry {
                    break outcome;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            };
            cells.push((version.to_string(), flow.to_string(), outcome));
        }
    }
    cells
}

async fn emulator(dir: &Path) -> Backend {
    let server = ApiServer::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let kubeconfig = dir.join("emulator.kubeconfig");
    write_kubeconfig(&kubeconfig, &url).unwrap();
    let serving = server.clone();
    tokio::spawn(async move { serving.serve(listener, axum::Router::new()).await });
    Backend {
        name: "emulator",
        kubeconfig,
        client: server.client(),
    }
}

/// The real control plane, stopped (SIGTERM) when dropped.
struct ControlPlane(Child);

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // SIGTERM lets `up` stop its children; then reap it.
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn control_plane(dir: &Path) -> (ControlPlane, Backend) {
    let build = Command::new("bash")
        .arg(repo().join("scripts/build-controlplane.sh"))
        .current_dir(repo())
        .stdout(Stdio::piped())
        .output()
        .expect("scripts/build-controlplane.sh runs");
    assert!(build.status.success(), "build-controlplane.sh failed");
    let bin = String::from_utf8_lossy(&build.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    let cp_dir = dir.join("controlplane");
    let log = std::fs::File::create(dir.join("controlplane.log")).unwrap();
    let child = Command::new(&bin)
        .args(["up", "--dir"])
        .arg(&cp_dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{bin} up: {e}"));
    let cp = ControlPlane(child);
    let deadline = Instant::now() + Duration::from_secs(240);
    while !cp_dir.join("ready").exists() {
        assert!(
            Instant::now() < deadline,
            "control plane not ready in 240 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let kubeconfig = cp_dir.join("admin.kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&kubeconfig).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    (
        cp,
        Backend {
            name: "kube-apiserver",
            kubeconfig,
            client,
        },
    )
}

fn render(cells: &[(String, String, Result<(), String>)]) -> String {
    cells
        .iter()
        .map(|(v, f, o)| match o {
            Ok(()) => format!("{v} | {f} | ok"),
            Err(e) => format!("{v} | {f} | FAILED: {e}"),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_versions_have_the_same_outcomes_on_the_emulator_and_a_real_apiserver() {
    for v in VERSIONS {
        assert!(
            kubectl_path(v).exists(),
            "{} missing: run scripts/install-deps.sh",
            kubectl_path(v).display()
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path()).await;
    let emu_cells = matrix(&emu).await;
    let (_cp, real) = control_plane(dir.path()).await;
    let real_cells = matrix(&real).await;

    println!("emulator:\n{}", render(&emu_cells));
    println!("kube-apiserver:\n{}", render(&real_cells));
    let mut differences = Vec::new();
    for (e, r) in emu_cells.iter().zip(&real_cells) {
        if e.2.is_ok() != r.2.is_ok() {
            differences.push(format!(
                "kubectl {} {}: emulator {:?}, kube-apiserver {:?}",
                e.0, e.1, e.2, r.2
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "outcomes differ:\n{}",
        differences.join("\n")
    );
    // And every cell works (the README's table says so).
    let failed: Vec<_> = emu_cells.iter().filter(|c| c.2.is_err()).collect();
    assert!(failed.is_empty(), "failed cells: {failed:?}");
}
