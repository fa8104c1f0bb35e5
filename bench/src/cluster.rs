//! The bench's Kubernetes: the lab API-server emulator served over loopback HTTP (so the
//! controller process and kubectl reach it like a real one), a log of the requests it
//! answered, and the objects every benchmark needs.
use anyhow::{Context as _, bail};
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use futures::{StreamExt, TryStreamExt};
use guestcred::api::password::PasswordSource;
use guestcred::api::{
    GuestPasswordReset, GuestPasswordResetSpec, Phase, RolloutSpec, RunSpec, SecretKeyRef,
    TargetSpec,
};
use guestcred::controller::shims::DEFAULT_SHIM_DAEMONSET;
use guestcred_lab::apiserver::{ApiServer, write_kubeconfig};
use guestcred_lab::kubevirt::{create_node_with_shim, install_crds};
use guestcred_lab::world::SHIM_NAMESPACE;
use guestcred_lab::world::real::RealControlPlane;
use guestcred_lab::world::responses::Responses;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{ListParams, ObjectMeta, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use sha2::{Digest, Sha512};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const NS: &str = "default";

/// Non-watch requests the emulator answered: (start, end), and per class of request
/// ([`classify`]) how many, how many failed, and the largest bodies.
#[derive(Default)]
pub struct RequestLog {
    spans: Mutex<Vec<(Instant, Instant)>>,
    classes: Mutex<BTreeMap<String, ClassStats>>,
}

/// Requests of one class since the last [`RequestLog::clear`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClassStats {
    pub count: u64,
    /// Answered with a status of 400 or more (a GET's 404 excepted).
    pub errors: u64,
    /// Largest request body (bytes).
    pub max_request: u64,
    /// Largest response body (bytes): for a write, the object as the server stored it.
    pub max_response: u64,
}

/// A request's class: verb and resource, with the subresource, e.g. `PATCH
/// guestpasswordresets/status`, `POST events`, `GET virtualmachineinstances` (one object)
/// or `LIST pods` (a GET without a name).
pub fn classify(method: &str, path: &str) -> String {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/... or /apis/<group>/<version>/...
    let rest: &[&str] = match parts.as_slice() {
        ["api", _v, rest @ ..] => rest,
        ["apis", _g, _v, rest @ ..] => rest,
        _ => return format!("{method} {path}"),
    };
    let rest = match rest {
        ["namespaces", _ns, r @ ..] if !r.is_empty() => r,
        r => r,
    };
    match rest {
        [] => format!("{method} {path}"),
        [res] if method == "GET" => format!("LIST {res}"),
        [res] | [res, _] => format!("{method} {res}"),
        [res, _, sub, ..] => format!("{method} {res}/{sub}"),
    }
}

impl RequestLog {
    fn push(&self, start: Instant, end: Instant) {
        self.lock().push((start, end));
    }

    fn count(&self, class: String, failed: bool, request: u64, response: u64) {
        let mut classes = self.classes.lock().unwrap_or_else(|p| p.into_inner());
        let c = classes.entry(class).or_default();
        c.count += 1;
        c.errors += u64::from(failed);
        c.max_request = c.max_request.max(request);
        c.max_response = c.max_response.max(response);
    }

    /// Requests per class since the last `clear`.
    pub fn classes(&self) -> BTreeMap<String, ClassStats> {
        self.classes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Instant, Instant)>> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn clear(&self) {
        self.lock().clear();
        self.classes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// (number of requests, end of the last one) since the last `clear`.
    pub fn summary(&self) -> (usize, Option<Instant>) {
        let spans = self.lock();
        (spans.len(), spans.iter().map(|s| s.1).max())
    }

    /// Start of the latest request.
    pub fn last_start(&self) -> Option<Instant> {
        self.lock().iter().map(|s| s.0).max()
    }
}

/// Whether `uri` asks for a watch (streamed, not counted).
fn is_watch(uri: &axum::http::Uri) -> bool {
    uri.query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"))
}

async fn record(State(log): State<Arc<RequestLog>>, req: Request, next: Next) -> Response {
    let watch = is_watch(req.uri());
    let start = Instant::now();
    if watch {
        return next.run(req).await;
    }
    let class = classify(req.method().as_str(), req.uri().path());
    let write = req.method() != axum::http::Method::GET;
    let request_len = body_len(req.headers());
    let resp = next.run(req).await;
    // A GET answered 404 is an answer (`get_opt` of an absent VirtualMachine), not a failure.
    let code = resp.status().as_u16();
    let failed = code >= 400 && (write || code != 404);
    // A write's answer is the object as stored: its size is what the write made.
    let (resp, response_len) = if write {
        let (parts, body) = resp.into_parts();
        match axum::body::to_bytes(body, usize::MAX).await {
            Ok(bytes) => {
                let len = bytes.len() as u64;
                (
                    Response::from_parts(parts, axum::body::Body::from(bytes)),
                    len,
                )
            }
            Err(_) => (Response::from_parts(parts, axum::body::Body::empty()), 0),
        }
    } else {
        // The emulator sends no Content-Length; its bodies are whole, so their size is known.
        let len = axum::body::HttpBody::size_hint(resp.body())
            .exact()
            .unwrap_or_else(|| body_len(resp.headers()));
        (resp, len)
    };
    log.count(class, failed, request_len, response_len);
    log.push(start, Instant::now());
    resp
}

fn body_len(headers: &axum::http::HeaderMap) -> u64 {
    headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Headers that belong to one hop (RFC 9110 7.6.1) or that the proxy sets itself: the
/// client's `Host`, and `Accept-Encoding` (answers stay uncompressed, so their sizes mean
/// what the emulator's do).
const HOP_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
    "host",
    "content-length",
    "accept-encoding",
    "authorization",
];

fn copy_headers(from: &axum::http::HeaderMap, to: &mut axum::http::HeaderMap) {
    for (k, v) in from {
        if !HOP_HEADERS.contains(&k.as_str()) {
            to.append(k.clone(), v.clone());
        }
    }
}

/// The loopback proxy in front of a real API server: every request is sent on with
/// `client`'s identity (the admin's client certificate, over TLS). Watches are streamed;
/// every other answer is read whole, so it carries a Content-Length that [`record`]
/// reads (the real server streams large lists chunked, without one).
async fn forward(State(client): State<Client>, req: Request) -> Response {
    match forward_to(&client, req).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::warn!(error = %e, "bench proxy: request to the real API server failed");
            let mut resp = Response::new(axum::body::Body::from(format!("bench proxy: {e:#}")));
            *resp.status_mut() = axum::http::StatusCode::BAD_GATEWAY;
            resp
        }
    }
}

async fn forward_to(client: &Client, req: Request) -> anyhow::Result<Response> {
    let watch = is_watch(req.uri());
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await?;
    let uri = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut out = axum::http::Request::new(kube::client::Body::from(bytes.to_vec()));
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri.parse()?;
    copy_headers(&parts.headers, out.headers_mut());
    let (parts, body) = client.send(out).await?.into_parts();
    let mut resp = Response::new(axum::body::Body::empty());
    *resp.status_mut() = parts.status;
    copy_headers(&parts.headers, resp.headers_mut());
    let body = axum::body::Body::new(body);
    if watch {
        *resp.body_mut() = body;
    } else {
        let bytes = axum::body::to_bytes(body, usize::MAX).await?;
        resp.headers_mut()
            .insert(axum::http::header::CONTENT_LENGTH, bytes.len().into());
        *resp.body_mut() = axum::body::Body::from(bytes);
    }
    Ok(resp)
}

pub struct BenchApi {
    pub kubeconfig: PathBuf,
    /// Client for setup that the request log does not count: in-process for the
    /// emulator, the admin's straight to a real API server.
    pub local: Client,
    /// Client over loopback HTTP: what users, kubectl and the controller go through.
    pub http: Client,
    pub requests: Arc<RequestLog>,
    server: tokio::task::JoinHandle<()>,
    /// On a real control plane: its process (stopped when dropped) and the uid of the
    /// shim DaemonSet the shim pods must belong to (its garbage collector deletes pods
    /// whose owner does not exist).
    real: Option<(Box<RealControlPlane>, String)>,
}

impl BenchApi {
    /// Serve a fresh emulator on 127.0.0.1, write its kubeconfig to `dir`, install the CRDs
    /// and the shim namespace.
    pub async fn start(dir: &Path) -> anyhow::Result<BenchApi> {
        std::fs::create_dir_all(dir)?;
        let api = ApiServer::new();
        let requests = Arc::new(RequestLog::default());
        let app = api
            .router()
            .layer(middleware::from_fn_with_state(requests.clone(), record));
        let local = api.client();
        install_crds(&local).await?;
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": SHIM_NAMESPACE}}))?;
        Api::<Namespace>::all(local.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        BenchApi::serve(dir, app, requests, local, None).await
    }

    /// A real control plane (lab/controlplane: kube-apiserver, etcd,
    /// kube-controller-manager; built, cached, by scripts/build-controlplane.sh) with a
    /// counting loopback proxy in front: the kubeconfig in `dir` names the proxy, which
    /// counts each request as [`BenchApi::start`]'s emulator does and sends it on as the
    /// admin. CRDs, the shim namespace and an (inert) shim DaemonSet are installed.
    pub async fn start_real(dir: &Path) -> anyhow::Result<BenchApi> {
        std::fs::create_dir_all(dir)?;
        let t = Instant::now();
        let (cp, admin) = RealControlPlane::start(&Responses::default())
            .await
            .context("starting the real control plane")?;
        guestcred_lab::cluster::real::install_crds(&admin).await?;
        guestcred_lab::cluster::real::ensure_namespace(&admin, SHIM_NAMESPACE).await?;
        let uid = guestcred_lab::world::real::create_shim_daemonset(
            &admin,
            SHIM_NAMESPACE,
            DEFAULT_SHIM_DAEMONSET,
        )
        .await?;
        tracing::info!(elapsed = ?t.elapsed(), "real control plane ready");
        let requests = Arc::new(RequestLog::default());
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(admin.clone())
            .layer(middleware::from_fn_with_state(requests.clone(), record));
        BenchApi::serve(dir, app, requests, admin, Some((Box::new(cp), uid))).await
    }

    /// Serve `app` on 127.0.0.1 and write its kubeconfig to `dir`.
    async fn serve(
        dir: &Path,
        app: axum::Router,
        requests: Arc<RequestLog>,
        local: Client,
        real: Option<(Box<RealControlPlane>, String)>,
    ) -> anyhow::Result<BenchApi> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "bench API server stopped");
            }
        });
        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &url)?;
        let config = Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&kubeconfig)?,
            &KubeConfigOptions::default(),
        )
        .await?;
        let http = Client::try_from(config)?;
        tracing::debug!(%url, "bench API server");
        Ok(BenchApi {
            kubeconfig,
            local,
            http,
            requests,
            server,
            real,
        })
    }

    /// The real control plane's `controlplane up` process (its components are children).
    pub fn control_plane_pid(&self) -> Option<u32> {
        self.real.as_ref().map(|(cp, _)| cp.pid())
    }

    /// Node `name` and its shim pod (Running at `ip`), made with the setup client.
    pub async fn create_node_with_shim(&self, name: &str, ip: &str) -> anyhow::Result<()> {
        match &self.real {
            None => Ok(create_node_with_shim(&self.local, name, SHIM_NAMESPACE, ip).await?),
            Some((_, uid)) => {
                guestcred_lab::world::real::create_node_with_shim(
                    &self.local,
                    name,
                    SHIM_NAMESPACE,
                    ip,
                    uid,
                )
                .await
            }
        }
    }
}

impl Drop for BenchApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A syntactically valid SHA-512 crypt string derived from `tag`. Agents store crypted
/// passwords verbatim (`chpasswd -e`), so it need not be the hash of anything; a distinct
/// value per round lets the bench check afterwards that the last round really landed.
pub fn crypt_string(tag: &str) -> String {
    const ALPHABET: &[u8] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let digest = Sha512::digest(tag.as_bytes());
    let chars = |n: usize, skip: usize| -> String {
        (0..n)
            .map(|i| ALPHABET[(digest[(i + skip) % digest.len()] % 64) as usize] as char)
            .collect()
    };
    // The hash's last character carries 2 bits (512 = 85 * 6 + 2): libcrypt only ever
    // writes one of the alphabet's first four there, and the shim checks it.
    let mut hash = chars(86, 0);
    hash.pop();
    hash.push(ALPHABET[(digest[21] % 4) as usize] as char);
    format!("$6${}${hash}", chars(16, 7))
}

pub fn secret(name: &str, value: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "password".to_string(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

/// A crypted reset of `user` from Secret `secret` (key `password`).
pub fn reset(
    name: &str,
    target: TargetSpec,
    user: &str,
    secret: &str,
    rollout: RolloutSpec,
) -> GuestPasswordReset {
    let mut r = GuestPasswordReset::new(
        name,
        GuestPasswordResetSpec {
            common: RunSpec {
                target,
                user: Some(user.into()),
                rollout,
            },
            password: PasswordSource {
                secret_ref: Some(SecretKeyRef {
                    name: secret.into(),
                    key: "password".into(),
                    namespace: None,
                }),
                crypted: true,
                generate: None,
            },
            rotation: None,
        },
    );
    r.metadata.namespace = Some(NS.into());
    r
}

pub fn one_vm(name: &str) -> TargetSpec {
    TargetSpec {
        vm_name: Some(name.into()),
        selector: None,
    }
}

pub fn labelled(key: &str, value: &str) -> TargetSpec {
    TargetSpec {
        vm_name: None,
        selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(key.to_string(), value.to_string())])),
            match_expressions: None,
        }),
    }
}

pub fn is_ready(r: &GuestPasswordReset) -> bool {
    r.status.as_ref().is_some_and(|s| {
        s.run
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

pub fn is_finished_badly(r: &GuestPasswordReset) -> bool {
    r.status
        .as_ref()
        .is_some_and(|s| matches!(s.run.phase, Some(Phase::Failed | Phase::PartiallySucceeded)))
}

/// A watch on the resets matching `fields`/`labels`, opened from the current
/// resourceVersion, so nothing that happens after this returns is missed.
pub async fn open_watch(
    api: &Api<GuestPasswordReset>,
    fields: Option<&str>,
    labels: Option<&str>,
) -> anyhow::Result<futures::stream::BoxStream<'static, kube::Result<WatchEvent<GuestPasswordReset>>>>
{
    let mut lp = ListParams::default();
    let mut wp = WatchParams::default().timeout(290);
    if let Some(f) = fields {
        lp = lp.fields(f);
        wp = wp.fields(f);
    }
    if let Some(l) = labels {
        lp = lp.labels(l);
        wp = wp.labels(l);
    }
    let rv = api
        .list(&lp)
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    Ok(api.watch(&wp, &rv).await?.boxed())
}

/// Feed every object the watch delivers to `seen` until it returns true.
pub async fn follow(
    stream: &mut futures::stream::BoxStream<'static, kube::Result<WatchEvent<GuestPasswordReset>>>,
    timeout: Duration,
    mut seen: impl FnMut(&GuestPasswordReset, Instant) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let ev = tokio::time::timeout_at(deadline, stream.try_next())
            .await
            .with_context(|| format!("no outcome within {timeout:?}"))??;
        match ev {
            Some(WatchEvent::Added(o)) | Some(WatchEvent::Modified(o)) => {
                if seen(&o, Instant::now())? {
                    return Ok(());
                }
            }
            Some(WatchEvent::Error(e)) => bail!("watch error: {e:?}"),
            Some(_) => {}
            None => bail!("the watch ended early"),
        }
    }
}

/// Create `obj` and return the time until a watch sees it Ready=True.
pub async fn create_until_ready(
    api: &Api<GuestPasswordReset>,
    obj: &GuestPasswordReset,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let name = obj.name_any();
    let mut stream = open_watch(api, Some(&format!("metadata.name={name}")), None).await?;
    let t0 = Instant::now();
    api.create(&PostParams::default(), obj).await?;
    let mut at = None;
    follow(&mut stream, timeout, |o, now| {
        if is_ready(o) {
            at = Some(now);
            return Ok(true);
        }
        if is_finished_badly(o) {
            bail!(
                "{name} finished without Ready: {}",
                serde_json::to_string(&o.status).unwrap_or_default()
            );
        }
        Ok(false)
    })
    .await
    .with_context(|| format!("waiting for {name} to become Ready"))?;
    Ok(at.map_or(Duration::ZERO, |t| t - t0))
}

/// A free TCP port on 127.0.0.1 (all lab shims share one port on their own loopback IPs).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// `guestcred-shim` on `addr` with extra backend flags, serving mutual TLS with the bench's
/// certificates as the chart deploys it; returns once it listens.
pub async fn spawn_shim(
    ctx: &crate::Ctx,
    node: &str,
    addr: std::net::SocketAddr,
    backend_args: &[String],
    dir: &Path,
) -> anyhow::Result<crate::procs::Proc> {
    let mut cmd = std::process::Command::new(&ctx.shim);
    cmd.args(["--listen", &addr.to_string(), "--node-name", node])
        .args(ctx.tls.shim().shim_flags())
        .args(["--agent-timeout-seconds", "3"])
        // Metrics on the shim's own address (the default 0.0.0.0:9090 is shared by all).
        .args(["--metrics-listen", &format!("{}:0", addr.ip())])
        .args(backend_args)
        .env("RUST_LOG", "info");
    let mut p = crate::procs::Proc::spawn(
        &format!("shim on {node}"),
        cmd,
        &dir.join(format!("shim-{node}.log")),
    )?;
    p.wait_for_port(addr, Duration::from_secs(30)).await?;
    Ok(p)
}

/// `guestcred controller` against `api`, calling shims over mutual TLS.
pub fn controller_command(
    ctx: &crate::Ctx,
    api: &BenchApi,
    shim_port: u16,
    metrics_listen: &str,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(&ctx.guestcred);
    cmd.arg("controller")
        .args(["--shim-namespace", SHIM_NAMESPACE])
        .args(["--shim-port", &shim_port.to_string()])
        .args(["--shim-request-timeout-seconds", "10"])
        .args(ctx.tls.controller().controller_flags())
        .args(["--metrics-listen", metrics_listen])
        .env("KUBECONFIG", &api.kubeconfig)
        .env("RUST_LOG", "info")
        .envs(ctx.controller_env.iter().map(|(k, v)| (k, v)));
    cmd
}

/// The controller process; returns once it has synced its shim directory.
pub async fn spawn_controller(
    ctx: &crate::Ctx,
    api: &BenchApi,
    shim_port: u16,
    log: &Path,
) -> anyhow::Result<crate::procs::Proc> {
    let cmd = controller_command(ctx, api, shim_port, "127.0.0.1:0");
    let mut p = crate::procs::Proc::spawn("controller", cmd, log)?;
    p.wait_for_log("controller started", Duration::from_secs(60))
        .await?;
    Ok(p)
}

/// A client for the shim at `addr` with the controller's client certificate.
pub fn shim_client(
    ctx: &crate::Ctx,
    addr: std::net::SocketAddr,
) -> anyhow::Result<guestcred::controller::shim_client::ShimClient> {
    let http = guestcred::tls::client::ReloadingHttpClient::new(
        ctx.tls.controller_client_files(),
        Duration::from_secs(30),
    )?
    .http()?;
    Ok(
        guestcred::controller::shim_client::ShimClient::with_http_client(
            format!("https://{addr}"),
            None,
            http,
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypt_strings_pass_the_shims_crypted_password_check() {
        let value = secrecy::SecretString::from(crypt_string("round-1"));
        guestcred::api::validate::password(&value, true).expect("looks like crypt(3)");
    }

    #[test]
    fn requests_are_classed_by_verb_resource_and_subresource() {
        let cases = [
            (
                "PATCH",
                "/apis/guestcred.io/v1alpha1/namespaces/default/guestpasswordresets/r/status",
                "PATCH guestpasswordresets/status",
            ),
            (
                "POST",
                "/apis/events.k8s.io/v1/namespaces/default/events",
                "POST events",
            ),
            (
                "GET",
                "/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstances/vm-1",
                "GET virtualmachineinstances",
            ),
            (
                "GET",
                "/apis/kubevirt.io/v1/virtualmachineinstances",
                "LIST virtualmachineinstances",
            ),
            ("PUT", "/api/v1/namespaces/default/secrets/s", "PUT secrets"),
            ("GET", "/api/v1/nodes/node-1", "GET nodes"),
            ("GET", "/version", "GET /version"),
        ];
        for (method, path, class) in cases {
            assert_eq!(classify(method, path), class, "{method} {path}");
        }
    }

    #[test]
    fn the_proxy_passes_end_to_end_headers_and_drops_hop_by_hop_ones() {
        use axum::http::{HeaderMap, HeaderValue};
        let mut from = HeaderMap::new();
        for (k, v) in [
            ("content-type", "application/merge-patch+json"),
            (
                "accept",
                "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
            ),
            ("user-agent", "guestcred"),
            ("host", "127.0.0.1:1234"),
            ("connection", "keep-alive"),
            ("content-length", "12"),
            ("transfer-encoding", "chunked"),
            ("accept-encoding", "gzip"),
            ("authorization", "Bearer x"),
        ] {
            from.append(k, HeaderValue::from_static(v));
        }
        let mut to = HeaderMap::new();
        copy_headers(&from, &mut to);
        let mut kept: Vec<&str> = to.keys().map(|k| k.as_str()).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["accept", "content-type", "user-agent"]);
        assert_eq!(to["accept"], from["accept"]);
    }

    #[test]
    fn watches_are_told_from_other_requests_by_their_query() {
        let watch = |u: &str| is_watch(&u.parse().expect("uri"));
        assert!(watch("/api/v1/pods?watch=true&resourceVersion=1"));
        assert!(watch("/api/v1/pods?resourceVersion=1&watch=1"));
        assert!(!watch("/api/v1/pods?limit=500"));
        assert!(!watch("/api/v1/pods?allowWatchBookmarks=true"));
        assert!(!watch("/api/v1/pods"));
    }

    #[tokio::test]
    async fn the_request_log_records_the_size_of_a_read_answer_sent_without_content_length() {
        let log = Arc::new(RequestLog::default());
        let app = axum::Router::new()
            .route(
                "/api/v1/namespaces/default/pods/p",
                axum::routing::get(|| async { "twelve bytes" }),
            )
            .layer(middleware::from_fn_with_state(log.clone(), record));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!(
            "http://{}/api/v1/namespaces/default/pods/p",
            listener.local_addr().expect("address")
        );
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let answer = reqwest::get(&url)
            .await
            .expect("GET")
            .text()
            .await
            .expect("body");
        server.abort();
        assert_eq!(answer, "twelve bytes");
        let pods = log.classes().remove("GET pods").expect("counted");
        assert_eq!((pods.count, pods.max_response), (1, 12));
    }

    #[test]
    fn crypt_strings_differ_per_tag() {
        assert_ne!(crypt_string("a"), crypt_string("b"));
    }
}
