//! The lab on a REAL control plane (`guestcred-lab up --control-plane real`): the
//! kube-apiserver, etcd and kube-controller-manager of `lab/controlplane` (built by
//! scripts/build-controlplane.sh) instead of the emulator, with the chart installed for
//! real by `helm install` and the controller running as the chart's ServiceAccount.
//!
//! What differs from the emulator, and why:
//! - nothing schedules Pods (no scheduler, kubelet, DaemonSet or ReplicaSet controller):
//!   the lab creates each node's shim Pod from the chart's DaemonSet template itself
//!   (owned by the DaemonSet, `Running` with the node's IP through the status subresource);
//! - the controller's and shims' credentials are ServiceAccount tokens minted with the
//!   TokenRequest API for the chart's ServiceAccounts, one kubeconfig each
//!   (`<state>/sa/<component>.kubeconfig`), so RBAC is exactly the chart's;
//! - KubeVirt's `restart` subresource is an aggregated API: an APIService
//!   `v1.subresources.kubevirt.io` backed by a Service + EndpointSlice whose address lives
//!   on a veth pair into a lab network namespace (the API server refuses loopback
//!   Endpoints); kubevirt-lite serves it over HTTPS there ([`RestartApi`]).
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::ClusterError;
use super::procs::{ProcessInfo, Startup, spawn_detached};

/// Which API server the lab runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ControlPlane {
    /// The project's in-memory API-server emulator (fast; no RBAC, CEL, GC by a real
    /// controller manager).
    #[default]
    Emulator,
    /// A real kube-apiserver + etcd + kube-controller-manager (lab/controlplane).
    Real,
}

impl ControlPlane {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlPlane::Emulator => "emulator",
            ControlPlane::Real => "real",
        }
    }
}

/// The Helm release the lab installs on a real control plane (in the controller's
/// namespace; the chart puts the shim in a namespace of its own).
pub const RELEASE: &str = "guestcred";
/// The chart's controller ServiceAccount for [`RELEASE`].
pub const CONTROLLER_SA: &str = "guestcred-controller";
/// The chart's shim ServiceAccount for [`RELEASE`].
pub const SHIM_SA: &str = "guestcred-shim";
/// The chart's shim DaemonSet for [`RELEASE`].
pub const SHIM_DAEMONSET: &str = "guestcred-shim";
/// The chart's leader-election Lease name (values: controller.leaderElection.leaseName).
pub const LEASE_NAME: &str = "guestcred-controller";
/// Namespace, Service and APIService of kubevirt-lite's aggregated `restart` API.
pub const KUBEVIRT_NAMESPACE: &str = "kubevirt";
pub const RESTART_SERVICE: &str = "kubevirt-lite-api";
pub const RESTART_APISERVICE: &str = "v1.subresources.kubevirt.io";
/// Lifetime of the minted ServiceAccount tokens (a lab lives for hours at most).
const TOKEN_SECONDS: i64 = 24 * 3600;
/// How long `controlplane up` may take to write `ready` (3-5 s typical).
const READY_TIMEOUT: Duration = Duration::from_secs(240);

/// Where the control plane keeps its PKI, etcd data, logs and audit log.
pub fn controlplane_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("controlplane")
}

/// The API server's audit log (JSON lines).
pub fn audit_log(state_dir: &Path) -> PathBuf {
    controlplane_dir(state_dir).join("audit.log")
}

/// The kubeconfig of a chart ServiceAccount (`controller`, `shim`).
pub fn sa_kubeconfig(state_dir: &Path, component: &str) -> PathBuf {
    state_dir.join("sa").join(format!("{component}.kubeconfig"))
}

/// Runs scripts/build-controlplane.sh (cached; a cold build takes ~8 min on 2 busy
/// cores). Returns the binary and how long the script took. Blocking.
pub fn build() -> Result<(PathBuf, Duration), ClusterError> {
    let script = crate::repo_dir().join("scripts/build-controlplane.sh");
    let t0 = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| ClusterError::io(format!("run {}", script.display()), e))?;
    if !out.status.success() {
        return Err(ClusterError::Failed(format!(
            "{} failed ({}): the real control plane cannot be built",
            script.display(),
            out.status
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bin = stdout
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .filter(|p| p.is_file())
        .ok_or_else(|| {
            ClusterError::Failed(format!("{} printed no binary path", script.display()))
        })?;
    Ok((bin, t0.elapsed()))
}

/// Starts `controlplane up --dir <dir>` detached and waits for `<dir>/ready` (blocking).
pub fn start(bin: &Path, dir: &Path) -> Result<ProcessInfo, ClusterError> {
    fs::create_dir_all(dir)
        .map_err(|e| ClusterError::io(format!("create {}", dir.display()), e))?;
    let ready = dir.join("ready");
    let _ = fs::remove_file(&ready);
    let mut cmd = Command::new(bin);
    cmd.arg("up").arg("--dir").arg(dir);
    let log = dir.join("up.log");
    let info = spawn_detached(cmd, &log)?;
    let startup = Startup::new(&info, READY_TIMEOUT);
    while !ready.is_file() {
        startup.check("controlplane up exited before it was ready", || {
            format!("the real control plane ({})", log.display())
        })?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(info)
}

/// The helm binary scripts/install-helm.sh installs (`$GUESTCRED_TOOLS_DIR/bin/helm`).
pub fn helm_binary() -> Result<PathBuf, ClusterError> {
    let tools = std::env::var_os("GUESTCRED_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_dir().join(".lab/tools"));
    let helm = tools.join("bin/helm");
    if helm.is_file() {
        Ok(helm)
    } else {
        Err(ClusterError::Missing {
            what: helm.display().to_string(),
            hint: "run scripts/install-deps.sh (it installs helm)".into(),
        })
    }
}

/// Runs helm with `args` against `kubeconfig` (blocking); stdout on success.
pub fn helm(kubeconfig: &Path, args: &[&str]) -> Result<String, ClusterError> {
    let helm = helm_binary()?;
    let out = Command::new(&helm)
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .current_dir(crate::repo_dir())
        .env("HELM_CACHE_HOME", crate::repo_dir().join(".lab/helm/cache"))
        .env(
            "HELM_CONFIG_HOME",
            crate::repo_dir().join(".lab/helm/config"),
        )
        .env("HELM_DATA_HOME", crate::repo_dir().join(".lab/helm/data"))
        .output()
        .map_err(|e| ClusterError::io(format!("run {}", helm.display()), e))?;
    if !out.status.success() {
        return Err(ClusterError::Failed(format!(
            "helm {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The values the lab's release runs with: the shims reach one libvirtd per node.
pub const LAB_RELEASE_SETS: &[&str] = &["shim.locator=libvirt-uri"];

/// `helm install guestcred charts/guestcred -n <ns> --create-namespace` with the lab's
/// values and `shim.namespace=<shim_namespace>` (the chart creates that namespace,
/// labelled for the privileged Pod Security level), in namespaced mode
/// (`watchNamespaces`) when `watched` names namespaces (which must exist: the chart's
/// Roles go into them). The CRDs are installed from crds/ before (`--skip-crds`).
/// Blocking.
pub fn install_release(
    kubeconfig: &Path,
    namespace: &str,
    shim_namespace: &str,
    watched: &[String],
) -> Result<(), ClusterError> {
    let chart = crate::repo_dir().join("charts/guestcred");
    let chart = chart.to_string_lossy();
    let mut args = vec![
        "install",
        RELEASE,
        &chart,
        "--namespace",
        namespace,
        "--create-namespace",
        "--skip-crds",
    ];
    for s in LAB_RELEASE_SETS {
        args.extend(["--set", s]);
    }
    let shim = format!("shim.namespace={shim_namespace}");
    args.extend(["--set", &shim]);
    let watch = format!("watchNamespaces={{{}}}", watched.join(","));
    if !watched.is_empty() {
        args.extend(["--set", &watch]);
    }
    helm(kubeconfig, &args).map(|_| ())
}

/// Creates namespace `name` unless it exists.
pub async fn ensure_namespace(client: &Client, name: &str) -> Result<(), ClusterError> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns = serde_json::from_value(json!({"metadata": {"name": name}}))
        .map_err(|e| ClusterError::Failed(format!("namespace {name}: {e}")))?;
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Creates namespace `name` enforcing the Pod Security `level` (latest version), or
/// labels it so if it exists (server-side apply of the labels only).
pub async fn ensure_namespace_enforcing(
    client: &Client,
    name: &str,
    level: &str,
) -> Result<(), ClusterError> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {
        "pod-security.kubernetes.io/enforce": level,
        "pod-security.kubernetes.io/enforce-version": "latest",
    }}});
    api.patch(
        name,
        &PatchParams::apply("guestcred-lab").force(),
        &Patch::Apply(&ns),
    )
    .await?;
    Ok(())
}

/// A kube client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Result<Client, ClusterError> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| ClusterError::Failed(format!("read {}: {e}", kubeconfig.display())))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| ClusterError::Failed(format!("kubeconfig {}: {e}", kubeconfig.display())))?;
    Ok(Client::try_from(config)?)
}

/// A token for `namespace/sa` from the TokenRequest API (the API server's own audience).
pub async fn mint_token(
    client: &Client,
    namespace: &str,
    sa: &str,
) -> Result<String, ClusterError> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"audiences": [], "expirationSeconds": TOKEN_SECONDS}
    }))
    .map_err(|e| ClusterError::Failed(format!("TokenRequest: {e}")))?;
    let made: TokenRequest = api
        .create_subresource("token", sa, &PostParams::default(), &request)
        .await?;
    made.status
        .map(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ClusterError::Failed(format!("TokenRequest for {namespace}/{sa}: no token")))
}

/// Writes a kubeconfig for `user` with `token`, with the server and CA of `admin`.
pub fn write_token_kubeconfig(
    admin: &Path,
    out: &Path,
    user: &str,
    token: &str,
) -> Result<(), ClusterError> {
    let text = fs::read_to_string(admin)
        .map_err(|e| ClusterError::io(format!("read {}", admin.display()), e))?;
    let doc: Value = serde_yaml::from_str(&text)
        .map_err(|e| ClusterError::Failed(format!("{}: {e}", admin.display())))?;
    let cluster = doc
        .pointer("/clusters/0/cluster")
        .cloned()
        .ok_or_else(|| ClusterError::Failed(format!("{}: no cluster", admin.display())))?;
    let kc = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "lab", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "lab", "user": user}}],
        "current-context": user,
    });
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)
            .map_err(|e| ClusterError::io(format!("create {}", dir.display()), e))?;
    }
    let yaml =
        serde_yaml::to_string(&kc).map_err(|e| ClusterError::Failed(format!("kubeconfig: {e}")))?;
    fs::write(out, yaml).map_err(|e| ClusterError::io(format!("write {}", out.display()), e))?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(out, fs::Permissions::from_mode(0o600))
        .map_err(|e| ClusterError::io(format!("chmod {}", out.display()), e))
}

/// Mints tokens for the chart's controller ServiceAccount (in the controller's namespace)
/// and shim ServiceAccount (in the shim namespace) and writes
/// `<state>/sa/{controller,shim}.kubeconfig`. The shim never calls the API (the chart
/// mounts no token for it), so its kubeconfig only proves that: the audit log shows no
/// request from it.
pub async fn write_component_kubeconfigs(
    state_dir: &Path,
    admin: &Path,
    controller_namespace: &str,
    shim_namespace: &str,
) -> Result<(), ClusterError> {
    let client = client_from(admin).await?;
    for (component, sa, namespace) in [
        ("controller", CONTROLLER_SA, controller_namespace),
        ("shim", SHIM_SA, shim_namespace),
    ] {
        let token = mint_token(&client, namespace, sa).await?;
        let user = format!("system:serviceaccount:{namespace}:{sa}");
        write_token_kubeconfig(admin, &sa_kubeconfig(state_dir, component), &user, &token)?;
    }
    Ok(())
}

/// Applies every CRD in crds/ (server-side apply, as `kubectl apply --server-side`)
/// and kubevirt-lite's, then waits until all are Established.
pub async fn install_crds(client: &Client) -> Result<(), ClusterError> {
    let dir = crate::repo_dir().join("crds");
    let mut crds: Vec<CustomResourceDefinition> = Vec::new();
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .map_err(|e| ClusterError::io(format!("read {}", dir.display()), e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let text = fs::read_to_string(&file)
            .map_err(|e| ClusterError::io(format!("read {}", file.display()), e))?;
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text)
            .map_err(|e| ClusterError::Failed(format!("{}: {e}", file.display())))?;
        crds.push(crd);
    }
    crds.extend(crate::kubevirt::kubevirt_crds());
    let timeout = Duration::from_secs(60);
    match crate::kubevirt::apply_crds(client, &crds, timeout).await? {
        None => Ok(()),
        Some(name) => Err(ClusterError::Timeout {
            what: format!("CRD {name} to be Established"),
            after: timeout,
        }),
    }
}

/// Creates the Node and, as the DaemonSet controller would, the shim Pod on it from the
/// chart's DaemonSet template (owned by the DaemonSet) in `namespace`, the chart's shim
/// namespace (so the API server's PodSecurity admission judges it by that namespace's
/// level), then marks it Running with `pod_ip` through the status subresource, as a
/// kubelet would.
pub async fn create_node_with_shim(
    client: &Client,
    node_name: &str,
    namespace: &str,
    pod_ip: &str,
) -> Result<(), ClusterError> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(&PostParams::default(), &crate::kubevirt::node(node_name))
        .await?;
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let ds = daemonsets.get(SHIM_DAEMONSET).await?;
    let template = ds
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .ok_or_else(|| ClusterError::Failed("the shim DaemonSet has no template".into()))?;
    let mut spec = template.spec.unwrap_or_default();
    spec.node_name = Some(node_name.into());
    let mut meta = template.metadata.unwrap_or_default();
    meta.name = Some(format!("{SHIM_DAEMONSET}-{node_name}"));
    meta.namespace = Some(namespace.into());
    meta.owner_references = Some(vec![OwnerReference {
        api_version: "apps/v1".into(),
        kind: "DaemonSet".into(),
        name: ds.name_any(),
        uid: ds.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    let pod = Pod {
        metadata: meta,
        spec: Some(spec),
        status: None,
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let created = pods.create(&PostParams::default(), &pod).await?;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = json!({"status": {
        "phase": "Running",
        "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
        "hostIP": pod_ip, "hostIPs": [{"ip": pod_ip}],
        "startTime": now,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": "True", "lastTransitionTime": now},
        ],
    }});
    pods.patch_status(
        &created.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&status),
    )
    .await?;
    Ok(())
}

// ---- the aggregated `restart` API --------------------------------------------------

/// The lab network namespace and veth pair the aggregated API's address lives on: a
/// private /30 that exists only inside this machine (`10.250.X.Y/30`, picked from the
/// state directory so labs side by side differ). The server listens on the host end;
/// nothing routes anywhere else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabNet {
    pub netns: String,
    /// The veth end in the host namespace.
    pub host_if: String,
    /// Its address: the Service's endpoint.
    pub host_ip: String,
    pub peer_ip: String,
}

impl LabNet {
    pub fn for_state_dir(state_dir: &Path) -> LabNet {
        use sha2::Digest;
        let h = sha2::Sha256::digest(state_dir.to_string_lossy().as_bytes());
        let tag = hex::encode(&h[..3]);
        let (x, y) = (h[3], (h[4] % 64) * 4);
        LabNet {
            netns: format!("gclab-{tag}"),
            host_if: format!("gch{tag}"),
            host_ip: format!("10.250.{x}.{}", y + 1),
            peer_ip: format!("10.250.{x}.{}", y + 2),
        }
    }

    /// Creates the namespace and the veth pair (removing leftovers first). Blocking.
    pub fn create(&self) -> Result<(), ClusterError> {
        self.remove();
        for args in self.setup_commands() {
            let out = Command::new("ip")
                .args(&args)
                .output()
                .map_err(|e| ClusterError::io("run ip", e))?;
            if !out.status.success() {
                return Err(ClusterError::Failed(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        Ok(())
    }

    /// The `ip` commands (arguments) that make the namespace and the veth pair: the peer
    /// end goes into the namespace as `eth0`, each end gets its address in the /30.
    fn setup_commands(&self) -> Vec<Vec<String>> {
        let (ns, host_if, peer) = (&self.netns, &self.host_if, "eth0");
        let tmp_peer = format!("{host_if}p");
        [
            format!("netns add {ns}"),
            format!("link add {host_if} type veth peer name {tmp_peer}"),
            format!("link set {tmp_peer} netns {ns}"),
            format!("-n {ns} link set {tmp_peer} name {peer}"),
            format!("addr add {}/30 dev {host_if}", self.host_ip),
            format!("-n {ns} addr add {}/30 dev {peer}", self.peer_ip),
            format!("-n {ns} link set {peer} up"),
            format!("link set {host_if} up"),
        ]
        .iter()
        // Names and addresses have no blanks (see `for_state_dir`).
        .map(|command| command.split_whitespace().map(String::from).collect())
        .collect()
    }

    /// Removes the veth pair and the namespace (idempotent). Blocking.
    pub fn remove(&self) {
        for args in [
            vec!["link", "del", self.host_if.as_str()],
            vec!["netns", "del", self.netns.as_str()],
        ] {
            let _ = Command::new("ip")
                .args(&args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }

    /// Whether the namespace or the link still exist.
    pub fn exists(&self) -> bool {
        Path::new("/run/netns").join(&self.netns).exists()
            || Path::new("/sys/class/net").join(&self.host_if).exists()
    }
}

/// A serving certificate for the aggregated API (`<svc>.<ns>.svc`), from a CA of its
/// own: (CA PEM, cert PEM, key PEM).
fn restart_api_certs() -> Result<(String, String, String), ClusterError> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let fail = |e: rcgen::Error| ClusterError::Failed(format!("restart API certificate: {e}"));
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kubevirt-lite aggregated API CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(fail)?)
        .map_err(fail)?;
    let name = format!("{RESTART_SERVICE}.{KUBEVIRT_NAMESPACE}.svc");
    let mut params = CertificateParams::new(vec![name.clone()]).map_err(fail)?;
    params.distinguished_name.push(DnType::CommonName, &name);
    let key = KeyPair::generate().map_err(fail)?;
    let cert = params.signed_by(&key, &ca).map_err(fail)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}

/// kubevirt-lite's `restart` subresource as an aggregated API on a real API server.
pub struct RestartApi {
    pub net: LabNet,
    pub port: u16,
    pub task: tokio::task::JoinHandle<()>,
}

/// Serves `router` (plus the discovery document the aggregator's availability check
/// reads) over HTTPS on the lab net's host address, then registers Service,
/// EndpointSlice and APIService and waits until the APIService is Available.
/// The server accepts the aggregator's connection without checking its front-proxy
/// client certificate (lab only; KubeVirt's virt-api checks it).
pub async fn serve_restart_api(
    client: &Client,
    net: LabNet,
    router: axum::Router,
) -> Result<RestartApi, ClusterError> {
    let (ca_pem, cert_pem, key_pem) = restart_api_certs()?;
    let certs = rustls_pemfile_certs(&cert_pem)?;
    let key = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| ClusterError::Failed(format!("restart API key: {e}")))?
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClusterError::Failed(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ClusterError::Failed(format!("TLS: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind((net.host_ip.as_str(), 0))
        .await
        .map_err(|e| ClusterError::io(format!("bind {}", net.host_ip), e))?;
    let port = listener
        .local_addr()
        .map_err(|e| ClusterError::io("restart API address", e))?
        .port();
    let router = router
        .route(
            "/apis/subresources.kubevirt.io/v1",
            axum::routing::get(discovery),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, router) = (acceptor.clone(), router.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(router);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    });
    register_restart_api(client, &net, port, &ca_pem).await?;
    Ok(RestartApi { net, port, task })
}

fn rustls_pemfile_certs(
    pem: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ClusterError> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClusterError::Failed(format!("restart API certificate: {e}")))
}

async fn discovery() -> axum::Json<Value> {
    axum::Json(json!({
        "kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": "subresources.kubevirt.io/v1",
        "resources": [{
            "name": "virtualmachines/restart", "singularName": "", "namespaced": true,
            "kind": "VirtualMachine", "verbs": ["update"]
        }]
    }))
}

fn dynamic(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// Server-side applies `object` (its apiVersion, kind and metadata say where), a
/// resource whose plural is `plural`.
async fn apply(client: &Client, plural: &str, object: &Value) -> Result<(), ClusterError> {
    let field = |pointer: &str| object.pointer(pointer).and_then(Value::as_str);
    let api_version = field("/apiVersion").unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let ar = dynamic(group, version, field("/kind").unwrap_or_default(), plural);
    let api: Api<DynamicObject> = match field("/metadata/namespace") {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let name = field("/metadata/name").unwrap_or_default();
    let pp = PatchParams::apply("guestcred-lab").force();
    api.patch(name, &pp, &Patch::Apply(object)).await?;
    Ok(())
}

/// Namespace `kubevirt`, a selector-less Service, its EndpointSlice at the lab net's
/// address and the APIService; waits until the APIService is Available.
async fn register_restart_api(
    client: &Client,
    net: &LabNet,
    port: u16,
    ca_pem: &str,
) -> Result<(), ClusterError> {
    use base64::Engine as _;
    let ns = KUBEVIRT_NAMESPACE;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let objects = [
        (
            "namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        ),
        (
            "services",
            json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": RESTART_SERVICE, "namespace": ns},
               "spec": {"ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}]}}),
        ),
        (
            "endpointslices",
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": format!("{RESTART_SERVICE}-lab"), "namespace": ns,
                            "labels": {"kubernetes.io/service-name": RESTART_SERVICE,
                                       "endpointslice.kubernetes.io/managed-by": "guestcred-lab"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": [net.host_ip], "conditions": {"ready": true}}],
               "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}),
        ),
        (
            "apiservices",
            json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
               "metadata": {"name": RESTART_APISERVICE},
               "spec": {"group": "subresources.kubevirt.io", "version": "v1",
                        "groupPriorityMinimum": 1000, "versionPriority": 15,
                        "caBundle": ca,
                        "service": {"namespace": ns, "name": RESTART_SERVICE, "port": 443}}}),
        ),
    ];
    for (plural, object) in &objects {
        apply(client, plural, object).await?;
    }
    let api: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &dynamic("apiregistration.k8s.io", "v1", "APIService", "apiservices"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let svc = api.get(RESTART_APISERVICE).await?;
        let available = svc
            .data
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.get("type").and_then(Value::as_str) == Some("Available"))
                    .cloned()
            });
        if available
            .as_ref()
            .and_then(|c| c.get("status"))
            .and_then(Value::as_str)
            == Some("True")
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::Failed(format!(
                "APIService {RESTART_APISERVICE} did not become Available: {}",
                available.map(|c| c.to_string()).unwrap_or_default()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lab_net_is_made_by_eight_ip_commands_in_order() {
        let net = LabNet {
            netns: "gclab-abc".into(),
            host_if: "gchabc".into(),
            host_ip: "10.250.1.5".into(),
            peer_ip: "10.250.1.6".into(),
        };
        let argv = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(
            net.setup_commands(),
            vec![
                argv(&["netns", "add", "gclab-abc"]),
                argv(&[
                    "link", "add", "gchabc", "type", "veth", "peer", "name", "gchabcp"
                ]),
                argv(&["link", "set", "gchabcp", "netns", "gclab-abc"]),
                argv(&["-n", "gclab-abc", "link", "set", "gchabcp", "name", "eth0"]),
                argv(&["addr", "add", "10.250.1.5/30", "dev", "gchabc"]),
                argv(&[
                    "-n",
                    "gclab-abc",
                    "addr",
                    "add",
                    "10.250.1.6/30",
                    "dev",
                    "eth0"
                ]),
                argv(&["-n", "gclab-abc", "link", "set", "eth0", "up"]),
                argv(&["link", "set", "gchabc", "up"]),
            ]
        );
    }

    #[test]
    fn the_lab_net_is_a_private_slash_30_with_short_interface_names() {
        let net = LabNet::for_state_dir(Path::new("/tmp/some-lab"));
        let host: std::net::Ipv4Addr = net.host_ip.parse().expect("IPv4");
        let peer: std::net::Ipv4Addr = net.peer_ip.parse().expect("IPv4");
        assert_eq!(host.octets()[..2], [10, 250]);
        assert_eq!(u32::from(host) & !3, u32::from(peer) & !3, "one /30");
        assert_eq!(u32::from(host) & 3, 1);
        assert_eq!(u32::from(peer) & 3, 2);
        // IFNAMSIZ: 15 bytes, including the temporary peer name.
        assert!(net.host_if.len() < 15, "{}", net.host_if);
        assert_ne!(net, LabNet::for_state_dir(Path::new("/tmp/other-lab")));
    }

    #[test]
    fn a_component_kubeconfig_carries_the_admin_cluster_and_only_a_token() {
        let dir = tempfile::tempdir().expect("temp dir");
        let admin = dir.path().join("admin.kubeconfig");
        fs::write(
            &admin,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: https://127.0.0.1:6443\n    certificate-authority-data: Q0E=\nusers:\n- name: admin\n  user:\n    client-certificate-data: eA==\n    client-key-data: eQ==\n",
        )
        .expect("write");
        let out = dir.path().join("sa/controller.kubeconfig");
        write_token_kubeconfig(&admin, &out, "system:serviceaccount:ns:sa", "tok")
            .expect("written");
        let kc: Value =
            serde_yaml::from_str(&fs::read_to_string(&out).expect("read")).expect("YAML");
        assert_eq!(
            kc["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:6443"
        );
        assert_eq!(
            kc["clusters"][0]["cluster"]["certificate-authority-data"],
            "Q0E="
        );
        assert_eq!(kc["users"][0]["user"], json!({"token": "tok"}));
    }
}
