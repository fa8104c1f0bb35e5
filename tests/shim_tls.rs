//! The shim over mutual TLS, against real qemu-ga instances (`guestcred_lab::hostqga`):
//! who gets in, who is refused before any agent call, the node check, and certificate
//! rotation without a restart. Certificates are generated at run time with `rcgen`.
//!
//! Needs root, `unshare`, overlayfs and qemu-ga (scripts/install-deps.sh). Without them
//! these tests fail with the reason; they never skip.
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use guestcred::api::wire::{DomainRef, SetPasswordRequest, ShimErrorReason};
use guestcred::api::{GuestPasswordReset, Phase};
use guestcred::controller::shim_client::{ShimApi, ShimCallError, ShimClient};
use guestcred::metrics::ShimMetrics;
use guestcred::shim::auth::Auth;
use guestcred::shim::qga::QgaSocketAgent;
use guestcred::shim::server::{ServeOptions, ShimApp, serve_with};
use guestcred::tls::client::{ClientTlsFiles, ReloadingHttpClient};
use guestcred::tls::server::{ReloadingServerConfig, ServerTlsFiles};
use guestcred_lab::hostqga::{HostQga, HostQgaOptions};
use guestcred_lab::kubevirt::vm;
use guestcred_lab::testing::{
    ResetTest, Steps, TargetedTest, TestObject, hash_of, message, password_request, phase,
    shim_reason, silent_socket, target_reason,
};
use guestcred_lab::world::{World, WorldOptions, WorldTls};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use secrecy::SecretString;
use tempfile::TempDir;

const SHA512_HASH: &str = "$6$gcLabSalt$3CPr/vQb45sQFdvBm/TEkSym19vMe3VQweVAyOduj31BA4Mp6vxpjoDjssqBvU55c8jQk5a25w4TVseP2qvxD0";
const NODE: &str = "node-a";
const SHIM_NAME: &str = "guestcred-shim";
const CONTROLLER_NAME: &str = "guestcred-controller";
const TIMEOUT: Duration = Duration::from_secs(30);

/// A certificate authority made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A PEM certificate and its PEM key.
struct Issued {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("self-signed CA"),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn issue(&self, dns_name: &str, usage: ExtendedKeyUsagePurpose) -> Issued {
        let mut params = CertificateParams::new(vec![dns_name.to_string()]).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, dns_name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn server_cert(&self) -> Issued {
        self.issue(SHIM_NAME, ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn client_cert(&self, identity: &str) -> Issued {
        self.issue(identity, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// Write `content` so a reader sees either the old or the new file, as kubelet's atomic
/// Secret update does.
fn write_atomically(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename into place");
}

/// A shim serving HTTPS with mutual TLS on 127.0.0.1 for node `NODE`, the qga-socket
/// backend with sockets under `dir`, and its certificate files under `dir/tls`.
struct TlsShim {
    dir: TempDir,
    url: String,
    metrics: Arc<ShimMetrics>,
    server_files: ServerTlsFiles,
}

impl TlsShim {
    async fn start(ca: &Ca) -> Self {
        Self::start_with_token(ca, None).await
    }

    /// Like [`TlsShim::start`], also requiring `token` as a bearer token on top.
    async fn start_with_token(ca: &Ca, token: Option<&str>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("gct")
            .tempdir()
            .expect("tempdir");
        let tls_dir = dir.path().join("tls");
        std::fs::create_dir_all(&tls_dir).expect("tls dir");
        let server_files = ServerTlsFiles {
            cert: tls_dir.join("tls.crt"),
            key: tls_dir.join("tls.key"),
            client_ca: tls_dir.join("client-ca.crt"),
        };
        let shim = Self {
            dir,
            url: String::new(),
            metrics: ShimMetrics::new(),
            server_files,
        };
        shim.install_server_cert(ca);
        let tls = ReloadingServerConfig::new(shim.server_files.clone()).expect("TLS config");
        let template = format!("{}/{{name}}/qga.sock", shim.dir.path().display());
        let agent = Arc::new(QgaSocketAgent::new(template, Duration::from_secs(5)));
        let auth = Auth::client_cert(
            vec![CONTROLLER_NAME.into()],
            token.map(|t| SecretString::from(t.to_owned())),
        );
        let app = ShimApp::new(agent, NODE).backend("qga-socket");
        let metrics = app.metrics();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("https://{}", listener.local_addr().expect("addr"));
        let opts = ServeOptions {
            metrics: Some(metrics.clone()),
            ..ServeOptions::new(Arc::new(tls))
        };
        tokio::spawn(serve_with(
            listener,
            app.router(auth),
            opts,
            std::future::pending(),
        ));
        Self {
            url,
            metrics,
            ..shim
        }
    }

    /// (Re)write the shim's certificate, key and client CA, all from `ca`.
    fn install_server_cert(&self, ca: &Ca) {
        let issued = ca.server_cert();
        write_atomically(&self.server_files.key, &issued.key);
        write_atomically(&self.server_files.cert, &issued.cert);
        write_atomically(&self.server_files.client_ca, &ca.pem());
    }

    fn vm(&self, name: &str) -> HostQga {
        HostQga::start_with(
            self.dir.path(),
            name,
            &HostQgaOptions::default().user("alice"),
        )
        .unwrap_or_else(|e| {
            panic!("lab qemu-ga {name} must start (needs root, unshare, overlayfs, qemu-ga): {e}")
        })
    }

    /// An agent socket that counts connections and never answers.
    fn counting_vm(&self, name: &str) -> Arc<AtomicUsize> {
        silent_socket(&self.dir.path().join(name).join("qga.sock"))
    }

    fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    /// The controller, trusting `ca` and holding its own certificate from `ca`.
    fn controller(&self, ca: &Ca) -> Controller {
        Controller::new(self.dir.path(), ca, Some(&ca.client_cert(CONTROLLER_NAME)))
    }

    /// `as_whom` sets alice's password on VM `vm` (naming `node`), whose agent socket only
    /// counts connections: the answer, and how often the agent was reached (0 when the
    /// shim refused the request first).
    async fn set_password_on_guarded_vm(
        &self,
        as_whom: &Controller,
        vm: &str,
        node: Option<&str>,
    ) -> (Result<(), ShimCallError>, usize) {
        let agent_connections = self.counting_vm(vm);
        let r = as_whom
            .client(&self.url)
            .set_password(&password(vm, node))
            .await;
        (r, agent_connections.load(Ordering::SeqCst))
    }

    /// A plain TCP connection to the shim's TLS port (no handshake yet).
    async fn tcp_connect(&self) -> tokio::net::TcpStream {
        let addr = self.url.trim_start_matches("https://");
        tokio::net::TcpStream::connect(addr).await.expect("connect")
    }

    /// The shim refused one request, counted under `reason`.
    fn assert_refused_once(&self, reason: &str) {
        let text = self.metrics_text();
        let line = format!("guestcred_shim_requests_refused_total{{reason=\"{reason}\"}} 1");
        assert!(text.contains(&line), "no {line} in:\n{text}");
    }
}

/// A CA for the cluster and a shim serving with a certificate from it.
async fn cluster_shim() -> (Ca, TlsShim) {
    let ca = Ca::new("cluster CA");
    let shim = TlsShim::start(&ca).await;
    (ca, shim)
}

/// VM `vm` of namespace `lab`, on the shim's node.
fn on_node(vm: &str) -> DomainRef {
    DomainRef::new("lab", vm).with_node(NODE)
}

/// Probes `domain` until the shim answers (a starting shim refuses connections), for at
/// most `within`; the first answer that is not "unreachable".
async fn probe_once_reachable(
    client: &ShimClient,
    domain: &DomainRef,
    within: Duration,
) -> Result<guestcred::api::wire::ProbeResponse, ShimCallError> {
    let deadline = Instant::now() + within;
    loop {
        match client.probe(domain).await {
            Err(ShimCallError::Unreachable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// The controller's side: CA, optional client certificate, written to files under `dir`.
struct Controller {
    files: ClientTlsFiles,
}

impl Controller {
    fn new(dir: &Path, trusts: &Ca, client: Option<&Issued>) -> Self {
        let dir = dir.join(format!("controller-{}", rand_suffix()));
        std::fs::create_dir_all(&dir).expect("controller dir");
        let files = ClientTlsFiles {
            ca: dir.join("ca.crt"),
            cert: client.map(|_| dir.join("tls.crt")),
            key: client.map(|_| dir.join("tls.key")),
            server_name: SHIM_NAME.into(),
        };
        let c = Self { files };
        c.install(trusts, client);
        c
    }

    fn install(&self, trusts: &Ca, client: Option<&Issued>) {
        write_atomically(&self.files.ca, &trusts.pem());
        if let (Some(issued), Some(cert), Some(key)) = (client, &self.files.cert, &self.files.key) {
            write_atomically(key, &issued.key);
            write_atomically(cert, &issued.cert);
        }
    }

    fn reloading(&self) -> ReloadingHttpClient {
        ReloadingHttpClient::new(self.files.clone(), TIMEOUT).expect("controller TLS client")
    }

    fn client(&self, url: &str) -> ShimClient {
        shim_client(url, &self.reloading())
    }
}

fn shim_client(url: &str, tls: &ReloadingHttpClient) -> ShimClient {
    ShimClient::with_http_client(url, None, tls.http().expect("HTTPS client"))
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

fn password(vm: &str, domain_node: Option<&str>) -> SetPasswordRequest {
    let mut domain = DomainRef::new("lab", vm);
    if let Some(n) = domain_node {
        domain = domain.with_node(n);
    }
    password_request(domain, "alice", SHA512_HASH, true)
}

#[tokio::test]
async fn controller_certificate_reaches_the_guest() {
    let (ca, shim) = cluster_shim().await;
    let vm = shim.vm("vm-ok");
    let controller = shim.controller(&ca);

    controller
        .client(&shim.url)
        .set_password(&password("vm-ok", Some(NODE)))
        .await
        .expect("set password over mutual TLS");

    assert_eq!(hash_of(&vm, "alice").as_deref(), Some(SHA512_HASH));
}

#[tokio::test]
async fn bearer_token_on_top_of_mutual_tls_is_required_in_addition_to_the_certificate() {
    let ca = Ca::new("cluster CA");
    let shim = TlsShim::start_with_token(&ca, Some("extra-t0ken")).await;
    let _vm = shim.vm("vm-token");
    let agent_connections = shim.counting_vm("vm-token-guarded");
    let with_cert = shim.controller(&ca);
    let anonymous = Controller::new(shim.dir.path(), &ca, None);
    let call = |c: &Controller, token: Option<&str>| {
        let http = c.reloading().http().expect("HTTPS client");
        ShimClient::with_http_client(
            &shim.url,
            token.map(|t| SecretString::from(t.to_owned())),
            http,
        )
    };

    for (who, client) in [
        ("certificate, no token", call(&with_cert, None)),
        ("certificate, wrong token", call(&with_cert, Some("nope"))),
    ] {
        let r = client
            .set_password(&password("vm-token-guarded", Some(NODE)))
            .await;
        assert_eq!(shim_reason(r), ShimErrorReason::Unauthenticated, "{who}");
    }
    // A token without a certificate does not get past the handshake.
    let r = call(&anonymous, Some("extra-t0ken"))
        .set_password(&password("vm-token-guarded", Some(NODE)))
        .await;
    assert!(matches!(r, Err(ShimCallError::Unreachable(_))), "{r:?}");
    assert_eq!(agent_connections.load(Ordering::SeqCst), 0);

    let both = call(&with_cert, Some("extra-t0ken"));
    let probe = both
        .probe(&on_node("vm-token"))
        .await
        .expect("certificate and token together get in");
    assert!(probe.agent_connected);
}

/// Issue 18: the client certificate is required in the TLS handshake itself, not only by
/// the HTTP layer on /v1/*: a client without one never gets an HTTP exchange at all.
#[tokio::test]
async fn handshake_without_client_certificate_fails_and_never_reaches_the_agent() {
    let (ca, shim) = cluster_shim().await;
    let anonymous = Controller::new(shim.dir.path(), &ca, None);
    let (r, agent_calls) = shim
        .set_password_on_guarded_vm(&anonymous, "vm-guarded", Some(NODE))
        .await;
    assert!(matches!(r, Err(ShimCallError::Unreachable(_))), "{r:?}");
    assert_eq!(agent_calls, 0);
    shim.assert_refused_once("tls_handshake");
    // Not even the health routes answer without a certificate.
    let http = anonymous.reloading().http().expect("HTTPS client");
    let health = http.get(format!("{}/healthz", shim.url)).send().await;
    assert!(health.is_err(), "{health:?}");
}

/// Issue 18: health and metrics live on the plain metrics port only; the API port serves
/// nothing but /v1/*, even to the controller.
#[tokio::test]
async fn api_port_serves_no_health_or_metrics_routes() {
    let (ca, shim) = cluster_shim().await;
    let controller = shim.controller(&ca);
    let http = controller.reloading().http().expect("HTTPS client");
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = http
            .get(format!("{}{path}", shim.url))
            .send()
            .await
            .expect("the controller gets an answer");
        assert_eq!(r.status(), reqwest::StatusCode::NOT_FOUND, "{path}");
    }
}

/// Issue 18: a request that names no node is refused like one naming another node; the
/// controller always names the node it believes the VM runs on.
#[tokio::test]
async fn request_naming_no_node_is_forbidden() {
    let (ca, shim) = cluster_shim().await;
    let controller = shim.controller(&ca);
    let (r, agent_calls) = shim
        .set_password_on_guarded_vm(&controller, "vm-nowhere", None)
        .await;
    assert_eq!(shim_reason(r), ShimErrorReason::Forbidden);
    assert_eq!(agent_calls, 0);
    shim.assert_refused_once("missing_node");
}

/// A valid ed25519 key line padded with a comment to exactly `len` bytes; quotes in the
/// comment double in JSON, so this is the worst case for the body size.
fn padded_key(i: usize, len: usize) -> String {
    let base = format!(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOglZHLWMUiFZKISTA02CLUEt1OFBDFgL3fufFHEpdbt k{i}"
    );
    let mut line = base;
    while line.len() < len {
        line.push('"');
    }
    line
}

/// Issue 18: the body limit is set for the largest valid request (MAX_KEYS keys of
/// MAX_KEY_BYTES each, worst-case JSON escaping): it gets through to the backend.
#[tokio::test]
async fn largest_valid_request_passes_the_body_limit() {
    use guestcred::api::validate::{MAX_KEY_BYTES, MAX_KEYS};
    use guestcred::api::wire::KeyOp;
    let (ca, shim) = cluster_shim().await;
    let controller = shim.controller(&ca);
    let keys: Vec<String> = (0..MAX_KEYS)
        .map(|i| padded_key(i, MAX_KEY_BYTES))
        .collect();
    guestcred::api::validate::public_keys(&keys).expect("the keys are valid");

    let r = controller
        .client(&shim.url)
        .ssh_keys(&on_node("vm-absent"), "alice", KeyOp::Add, keys)
        .await;

    // Validated, then the backend finds no such VM: the body was read in full.
    assert_eq!(shim_reason(r), ShimErrorReason::DomainNotFound);
}

/// Issue 18: a body above the limit is refused with 413 before it is buffered, and the
/// shim keeps serving the same client.
#[tokio::test]
async fn oversize_body_gets_413_and_the_shim_keeps_serving() {
    let (ca, shim) = cluster_shim().await;
    let _vm = shim.vm("vm-after");
    let controller = shim.controller(&ca);
    let reloading = controller.reloading();
    let http = reloading.http().expect("HTTPS client");
    // Above the limit (about 4.1 MiB), below what the shim drains to keep the connection.
    let body = vec![b' '; 5 * 1024 * 1024];

    let r = http
        .post(format!("{}/v1/ssh-keys", shim.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("an answer, not a reset");
    assert_eq!(r.status(), reqwest::StatusCode::PAYLOAD_TOO_LARGE);
    let e: guestcred::api::wire::ShimError = r.json().await.expect("a typed error");
    assert_eq!(e.reason, ShimErrorReason::InvalidArgument);

    let probe = shim_client(&shim.url, &reloading)
        .probe(&on_node("vm-after"))
        .await
        .expect("the shim still serves");
    assert!(probe.agent_connected);
}

/// A file replaced by a FIFO nobody writes: reading it blocks. Dropping it releases every
/// reader stuck on it and puts `content` back.
struct BlockingFile {
    path: PathBuf,
    handle: PathBuf,
    content: String,
}

impl BlockingFile {
    fn new(path: &Path) -> Self {
        let content = std::fs::read_to_string(path).expect("read the file to block");
        std::fs::remove_file(path).expect("remove the file");
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("mkfifo");
        assert!(status.success());
        let handle = path.with_extension("fifo");
        std::fs::hard_link(path, &handle).expect("link the FIFO");
        Self {
            path: path.to_owned(),
            handle,
            content,
        }
    }
}

impl Drop for BlockingFile {
    fn drop(&mut self) {
        use std::os::unix::fs::OpenOptionsExt;
        write_atomically(&self.path, &self.content);
        for _ in 0..20 {
            // Opening the write side (there is a reader) and closing it gives readers EOF.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.handle);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Issue 18: the shim's certificate files are read by a reload thread, never on the
/// handshake path: a file whose read blocks (a FIFO with no writer) does not stall a new
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_file_that_blocks_on_read_never_stalls_shim_handshakes() {
    let (ca, shim) = cluster_shim().await;
    let _vm = shim.vm("vm-fifo");
    let controller = shim.controller(&ca);
    let reloading = controller.reloading();
    let _blocked = BlockingFile::new(&shim.server_files.client_ca);

    for _ in 0..2 {
        let client = shim_client(&shim.url, &reloading);
        let domain = on_node("vm-fifo");
        let probe = tokio::time::timeout(Duration::from_secs(10), client.probe(&domain))
            .await
            .expect("the handshake must not wait for the certificate files")
            .expect("the loaded certificate still serves");
        assert!(probe.agent_connected);
    }
}

/// Issue 18, the controller's side: getting the HTTPS client for a shim call reads no
/// file (a reload thread does), so a blocking file does not stall the call.
#[test]
fn a_certificate_file_that_blocks_on_read_never_stalls_the_controller_client() {
    let ca = Ca::new("cluster CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let controller = Controller::new(dir.path(), &ca, Some(&ca.client_cert(CONTROLLER_NAME)));
    let reloading = Arc::new(controller.reloading());
    let _blocked = BlockingFile::new(&controller.files.ca);

    let (tx, rx) = std::sync::mpsc::channel();
    let r = reloading.clone();
    std::thread::spawn(move || {
        let _ = tx.send(r.http().is_ok());
    });
    let got = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("http() must not wait for the certificate files");
    assert!(got, "the loaded client is handed out");
}

/// A raw TLS connection to the shim with `client`'s certificate (for what reqwest cannot
/// do: send half a request, or nothing at all).
async fn raw_tls(
    url: &str,
    ca: &Ca,
    client: &Issued,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.pem().as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("add CA");
    }
    let chain: Vec<_> = CertificateDer::pem_slice_iter(client.cert.as_bytes())
        .collect::<Result<_, _>>()
        .expect("client cert PEM");
    let key = PrivateKeyDer::from_pem_slice(client.key.as_bytes()).expect("client key PEM");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client auth");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let addr = url.trim_start_matches("https://");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(SHIM_NAME).expect("name"), tcp)
        .await
        .expect("TLS handshake with a valid certificate")
}

/// Waits until the server closes `stream` (EOF or error), writing `drip` every 2 s
/// meanwhile (empty: write nothing); the time it took, or `None` if still open at `limit`.
async fn closed_within<S>(stream: &mut S, drip: &[u8], limit: Duration) -> Option<Duration>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = Instant::now();
    let mut buf = [0u8; 512];
    while start.elapsed() < limit {
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => {
                if !drip.is_empty()
                    && (stream.write_all(drip).await.is_err() || stream.flush().await.is_err())
                {
                    return Some(start.elapsed());
                }
            }
        }
    }
    None
}

/// A connection that announces a 512-byte TLS handshake record and dribbles one byte of it
/// every 2 s; the task ends with how long the shim kept it open (`None`: still open at 9 s).
async fn slowloris(shim: &TlsShim) -> tokio::task::JoinHandle<Option<Duration>> {
    use tokio::io::AsyncWriteExt;
    let mut tcp = shim.tcp_connect().await;
    tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .expect("write");
    tokio::spawn(async move { closed_within(&mut tcp, &[0x01], Duration::from_secs(9)).await })
}

/// Issue 18, slowloris: many connections that dribble a TLS record one byte every 2 s are
/// dropped at the handshake deadline (5 s), and the controller gets in meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_handshakes_are_dropped_at_the_deadline_while_the_controller_gets_in() {
    let (ca, shim) = cluster_shim().await;
    let _vm = shim.vm("vm-slow");
    let lorises = futures::future::join_all((0..64).map(|_| slowloris(&shim))).await;
    let controller = shim.controller(&ca);
    let probe = tokio::time::timeout(
        Duration::from_secs(5),
        controller.client(&shim.url).probe(&on_node("vm-slow")),
    )
    .await
    .expect("the controller is not locked out")
    .expect("probe over mutual TLS");
    assert!(probe.agent_connected);
    for l in lorises {
        let closed = l.await.expect("loris task");
        assert!(
            closed.is_some(),
            "a stalled handshake outlived the deadline"
        );
    }
}

/// Issue 18: an authenticated client that sends its request headers one byte every 2 s
/// is cut off by the header-read timeout (10 s).
#[tokio::test]
async fn slow_request_headers_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let (ca, shim) = cluster_shim().await;
    let mut tls = raw_tls(&shim.url, &ca, &ca.client_cert(CONTROLLER_NAME)).await;
    tls.write_all(b"POST /v1/probe HTTP/1.1\r\nhost: shim\r\n")
        .await
        .expect("write");
    let closed = closed_within(&mut tls, b"x", Duration::from_secs(20)).await;
    assert!(closed.is_some(), "slow headers kept the connection open");
}

/// Issue 18: an authenticated connection that sends nothing is closed by the idle
/// timeout (15 s).
#[tokio::test]
async fn idle_connection_is_closed() {
    let (ca, shim) = cluster_shim().await;
    let mut tls = raw_tls(&shim.url, &ca, &ca.client_cert(CONTROLLER_NAME)).await;
    let closed = closed_within(&mut tls, b"", Duration::from_secs(25)).await;
    assert!(closed.is_some(), "an idle connection stayed open");
}

/// Issue 18: connections are capped (512 by default; counted in
/// guestcred_shim_open_connections), stalled handshakes cannot hold a slot past their
/// deadline, and the controller gets in while 600 idle sockets are open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_connections_are_capped_and_the_controller_still_gets_in() {
    let (ca, shim) = cluster_shim().await;
    let _vm = shim.vm("vm-crowd");
    let mut crowd = Vec::new();
    for _ in 0..600 {
        crowd.push(shim.tcp_connect().await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let text = shim.metrics_text();
    let open: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("guestcred_shim_open_connections "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no open-connections gauge in:\n{text}"));
    assert!((1..=512).contains(&open), "{open} connections open at once");

    let controller = shim.controller(&ca);
    let client = controller.client(&shim.url);
    let probe = probe_once_reachable(&client, &on_node("vm-crowd"), Duration::from_secs(25)).await;
    assert!(probe.expect("the controller gets in").agent_connected);
    drop(crowd);
}

#[tokio::test]
async fn certificate_from_another_ca_fails_the_handshake() {
    let (ca, shim) = cluster_shim().await;
    let rogue = Ca::new("rogue CA");
    // Trusts the right CA (so it would talk), but presents a certificate from another.
    let intruder = Controller::new(
        shim.dir.path(),
        &ca,
        Some(&rogue.client_cert(CONTROLLER_NAME)),
    );
    let (r, agent_calls) = shim
        .set_password_on_guarded_vm(&intruder, "vm-guarded", None)
        .await;
    assert!(matches!(r, Err(ShimCallError::Unreachable(_))), "{r:?}");
    assert_eq!(agent_calls, 0);
    shim.assert_refused_once("tls_handshake");
}

#[tokio::test]
async fn certificate_naming_another_client_is_forbidden() {
    let (ca, shim) = cluster_shim().await;
    let other = Controller::new(shim.dir.path(), &ca, Some(&ca.client_cert("someone-else")));
    let (r, agent_calls) = shim
        .set_password_on_guarded_vm(&other, "vm-guarded", None)
        .await;
    assert_eq!(shim_reason(r), ShimErrorReason::Forbidden);
    assert_eq!(agent_calls, 0);
}

#[tokio::test]
async fn request_naming_another_node_is_forbidden() {
    let (ca, shim) = cluster_shim().await;
    let controller = shim.controller(&ca);
    let (r, agent_calls) = shim
        .set_password_on_guarded_vm(&controller, "vm-elsewhere", Some("node-b"))
        .await;
    assert_eq!(shim_reason(r), ShimErrorReason::Forbidden);
    assert_eq!(agent_calls, 0);
    shim.assert_refused_once("wrong_node");
}

#[tokio::test]
async fn shim_that_does_not_present_the_shim_name_is_not_trusted() {
    let (ca, shim) = cluster_shim().await;
    // The controller trusts the CA but expects another server name.
    let mut controller = shim.controller(&ca);
    controller.files.server_name = "some-other-service".into();

    let r = controller.client(&shim.url).probe(&on_node("vm")).await;

    assert!(matches!(r, Err(ShimCallError::Unreachable(_))), "{r:?}");
}

#[tokio::test]
async fn rotated_certificates_and_cas_are_used_by_new_connections_without_restart() {
    let old_ca = Ca::new("old CA");
    let shim = TlsShim::start(&old_ca).await;
    let vm = shim.vm("vm-rotate");
    let controller = shim.controller(&old_ca);
    let reloading = controller.reloading();
    shim_client(&shim.url, &reloading)
        .probe(&on_node("vm-rotate"))
        .await
        .expect("works before the rotation");
    let stale = shim.controller(&old_ca);

    let new_ca = Ca::new("new CA");
    shim.install_server_cert(&new_ca);
    controller.install(&new_ca, Some(&new_ca.client_cert(CONTROLLER_NAME)));

    // The same shim process takes the new certificate and CA from its reload thread
    // (every 2 s): a fresh client that knows only the new CA gets in.
    let fresh = shim.controller(&new_ca);
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(e) = fresh.client(&shim.url).probe(&on_node("vm-rotate")).await {
        assert!(Instant::now() < deadline, "the shim never rotated: {e:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The same reloading client has rebuilt itself by two reload periods after the files
    // changed: its (new) connection pool makes new connections with the new files.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    shim_client(&shim.url, &reloading)
        .set_password(&password("vm-rotate", Some(NODE)))
        .await
        .expect("works after rotating both sides");
    assert_eq!(hash_of(&vm, "alice").as_deref(), Some(SHA512_HASH));
    // A client still on the old CA and old certificate is refused on a new connection.
    let r = stale.client(&shim.url).probe(&on_node("vm-rotate")).await;
    assert!(matches!(r, Err(ShimCallError::Unreachable(_))), "{r:?}");
}

#[tokio::test]
async fn half_written_certificate_keeps_the_last_good_one() {
    let (ca, shim) = cluster_shim().await;
    let _vm = shim.vm("vm-half");
    let controller = shim.controller(&ca);

    write_atomically(
        &shim.server_files.cert,
        "-----BEGIN CERTIFICATE-----\ntrunc",
    );

    let probe = controller
        .client(&shim.url)
        .probe(&on_node("vm-half"))
        .await
        .expect("the loaded certificate still serves");
    assert!(probe.agent_connected);
}

/// A free port on 127.0.0.1 (bound and released; good enough on a test machine).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn write_server_files(dir: &Path, ca: &Ca) -> [PathBuf; 3] {
    let issued = ca.server_cert();
    let paths = [dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt")];
    std::fs::write(&paths[0], issued.cert).unwrap();
    std::fs::write(&paths[1], issued.key).unwrap();
    std::fs::write(&paths[2], ca.pem()).unwrap();
    paths
}

/// `guestcred shim` with TLS flags: serves mutual TLS, exposes /metrics and /readyz on the
/// plain metrics port, and on SIGTERM lets an agent call in flight finish before exiting 0.
#[tokio::test]
async fn shim_binary_serves_mutual_tls_and_drains_in_flight_calls_on_sigterm() {
    let ca = Ca::new("cluster CA");
    let dir = tempfile::Builder::new().prefix("gctb").tempdir().unwrap();
    let [cert, key, client_ca] = write_server_files(dir.path(), &ca);
    let (port, metrics_port) = (free_port(), free_port());
    let template = format!("{}/{{namespace}}_{{name}}/qga.sock", dir.path().display());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_guestcred"));
    for (k, _) in std::env::vars() {
        if k.starts_with("GUESTCRED_SHIM_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .arg("shim")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .args(["--backend", "qga-socket", "--node-name", NODE])
        .args([
            "--agent-timeout-seconds",
            "3",
            "--shutdown-grace-seconds",
            "20",
        ])
        .arg("--qga-socket-template")
        .arg(&template)
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--client-ca-file")
        .arg(&client_ca)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn guestcred shim");
    let _vm = HostQga::start_with(dir.path(), "lab_vm-bin", &HostQgaOptions::default())
        .expect("lab qemu-ga must start");
    // A hung agent: the call on it stays in flight until the agent timeout.
    silent_socket(&dir.path().join("lab_vm-hung/qga.sock"));

    let controller = Controller::new(dir.path(), &ca, Some(&ca.client_cert(CONTROLLER_NAME)));
    let client = controller.client(&format!("https://127.0.0.1:{port}"));
    let probe = probe_once_reachable(&client, &on_node("vm-bin"), TIMEOUT).await;
    assert!(probe.expect("probe through the binary").agent_connected);
    let ops = format!("http://127.0.0.1:{metrics_port}");
    let ready = reqwest::get(format!("{ops}/readyz")).await.unwrap();
    assert!(ready.status().is_success());

    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.probe(&on_node("vm-hung")).await }
    });
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = reqwest::get(format!("{ops}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("guestcred_shim_in_flight_calls 1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hung call never showed as in flight:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());

    // The call in flight still gets its typed answer (the agent timeout), not a reset.
    let answer = in_flight.await.unwrap();
    match answer {
        Ok(p) => assert!(!p.agent_connected, "{p:?}"),
        Err(e) => assert!(matches!(e, ShimCallError::Shim(_)), "{e:?}"),
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
}

/// Reset "reset" of alice's password on VM `vm` to the crypted hash in Secret "pw".
fn crypted_reset_for_alice(vm: &str) -> GuestPasswordReset {
    GuestPasswordReset::test("reset")
        .vm(vm)
        .user("alice")
        .from_secret("pw")
        .crypted()
}

/// The real controller finds the shim pod, dials its IP over https, presents its client
/// certificate, checks the shim's by name, and the password lands in the guest.
#[tokio::test]
async fn controller_resets_a_password_through_mutual_tls_shims() {
    let ca = Ca::new("cluster CA");
    let dir = tempfile::Builder::new().prefix("gctw").tempdir().unwrap();
    let [cert, key, client_ca] = write_server_files(dir.path(), &ca);
    let controller = Controller::new(dir.path(), &ca, Some(&ca.client_cert(CONTROLLER_NAME)));
    let opts = WorldOptions {
        mtls: Some(WorldTls {
            shim: ServerTlsFiles {
                cert,
                key,
                client_ca,
            },
            allowed_clients: vec![CONTROLLER_NAME.into()],
            controller: controller.files.clone(),
        }),
        ..WorldOptions::default()
    };
    let w = World::start(opts)
        .await
        .expect("test world with mTLS shims");
    let qga = w.guest("vm-tls").await;
    w.password_secret("pw", SHA512_HASH).await;
    let r = w.run_to_end(&crypted_reset_for_alice("vm-tls")).await;
    assert_eq!(phase(&r), Some(Phase::Succeeded));
    assert_eq!(hash_of(&qga, "alice").as_deref(), Some(SHA512_HASH));
}

/// Issue 18: the controller calls only pods of the shim DaemonSet in the shim namespace.
/// A pod there that carries the shim labels but no DaemonSet owner (say, someone's debug
/// pod) is never dialled, and the target waits with ShimUnavailable.
#[tokio::test]
async fn controller_never_dials_a_labelled_pod_the_shim_daemonset_does_not_own() {
    use guestcred_lab::world::SHIM_NAMESPACE;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    let w = World::start(WorldOptions::default())
        .await
        .expect("test world");
    // Nothing listens there: dialling it would fail with "shim unreachable".
    let rogue_ip = "127.0.99.1";
    let mut pod = guestcred_lab::kubevirt::shim_pod(SHIM_NAMESPACE, "node-rogue", rogue_ip);
    pod.metadata.name = Some("debug-pod".into());
    pod.metadata.owner_references = None;
    let pods: Api<Pod> = Api::namespaced(w.client.clone(), SHIM_NAMESPACE);
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("rogue pod");
    let status = serde_json::json!({"status": pod.status});
    pods.patch_status("debug-pod", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("rogue pod status");
    w.vm_without_agent(&vm("default", "vm-rogue", "node-rogue"))
        .await;
    w.password_secret("pw", SHA512_HASH).await;
    let reset = crypted_reset_for_alice("vm-rogue");
    let r = w
        .apply_until(&reset, target_reason("ShimUnavailable"))
        .await;
    let message = message(&r);
    assert!(
        message.contains("no running guestcred shim pod on node node-rogue"),
        "the labelled pod was taken for a shim: {message}"
    );
}
