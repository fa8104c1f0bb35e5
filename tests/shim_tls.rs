//! The shim over mutual TLS, against real qemu-ga instances (`guestcred_lab::hostqga`):
//! who gets in, who is refused before any agent call, the node check, and certificate
//! rotation without a restart. Certificates are generated at run time with `rcgen`.
//!
//! Needs root, `unshare`, overlayfs and qemu-ga (scripts/install-deps.sh). Without them
//! these tests fail with the reason; they never skip.

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
    ResetTest, TargetedTest, TestObject, password_request, secret, shim_reason,
};
use guestcred_lab::world::{World, WorldOptions, WorldTls};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use secrecy::SecretString;
use tempfile::TempDir;
use tokio::net::UnixListener;

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
        let app = ShimApp::new(agent, auth).node(NODE).backend("qga-socket");
        let metrics = app.metrics();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("https://{}", listener.local_addr().expect("addr"));
        let opts = ServeOptions {
            tls: Some(Arc::new(tls)),
            metrics: Some(metrics.clone()),
            grace: None,
        };
        tokio::spawn(serve_with(
            listener,
            app.router(),
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
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("socket dir");
        let listener = UnixListener::bind(dir.join("qga.sock")).expect("bind agent socket");
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        });
        count
    }

    fn metrics_text(&self) -> String {
        self.metrics.encode()
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
    let ca = Ca::new("cluster CA");
    let shim = TlsShim::start(&ca).await;
    let vm = shim.vm("vm-ok");
    let controller = Controller::new(shim.dir.path(), &ca, Some(&ca.client_cert(CONTROLLER_NAME)));

    controller
        .client(&shim.url)
        .set_password(&password("vm-ok", Some(NODE)))
        .await
        .expect("set password over mutual TLS");

    assert_eq!(
        vm.shadow_hash("alice").unwrap().as_deref(),
        Some(SHA512_HASH)
    );
}

#[tokio::test]
async fn bearer_token_on_top_of_mutual_tls_is_required_in_addition_to_the_certificate() {
    let ca = Ca::new("cluster CA");
    let shim = TlsShim::start_with_token(&ca, Some("extra-t0ken")).await;
    let _vm = shim.vm("vm-token");
    let agent_connections = shim.counting_vm("vm-token-guarded");
    let with_cert = Controller::new(shim.dir.path(), &ca, Some(&ca.client_cert(CONTROLLER_NAME)));
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
        (
            "token, no certificate",
            call(&anonymous, Some("extra-t0ken")),
        ),
    ] {
        let r = client
            .set_password(&password("vm-token-guarded", None))
            .await;
        assert_eq!(shim_reason(r), ShimErrorReason::Unauthenticated, "{who}");
    }
    assert_eq!(agent_connections.load(Ordering::SeqCst), 0);

    let both = call(&with_cert, Some("extra-t0ken"));
    let probe = both
        .probe(&DomainRef::new("lab", "vm-token"))
        .await
        .expect("certificate and token together get in");
    assert!(probe.agent_connected);
}

#[tokio::test]
async fn request_without_client_certificate_is_unauthenticated_and_never_reaches_the_agent() {
    let ca = Ca::new("cluster CA");
    let shim = TlsShim::start(&ca).await;
    let agent_connections = shim.counting_vm("vm-guarded");
    let anonymous = Controller::new(shim.dir.path(), &ca, None);

    let r = anonymous
        .client(&shim.url)
        .set_password(&password("vm-guarded", None))
        .await;

    assert_eq!(shim_reason(r), ShimErrorReason::Unauthenticated);
    assert_eq!(agent_connections.load(Ordering::SeqCst), 0);
    assert!(
        shim.metrics_text()
            .contains(r#"guestcred_shim_requests_refused_total{reason="unauthenticated"} 1"#)
    );
}

#[tokio::test]
async fn certificate_from_another_ca_fails_the_handshake() {
    let ca = Ca::new("cluster CA");
    let shim = TlsShim::start(&ca).await;
    let agent_connections = shim.counting_vm("vm-guarded");
    let rogue = Ca::new("rogue CA");
    // Trusts the right CA (so it would talk), but presents a certificate from another.
    let intruder = Controller::new(
        shim.dir.path(),
        &ca,
        Some(&rogue.client_cert(CONTROLLER_NAME)),
    );

    let r = intruder
        .client(&shim.url)
        .set_password(&password("vm-guarded", None))
        .await;

    assert!(matches!(r, Err(ShimCallError::Unreachable(_))), "{r:?}");
    assert_eq!(agent_connections.load(Ordering::SeqCst), 0);
    assert!(
        shim.metrics_text()
            .contains(r#"guestcred_shim_requests_refused_total{reason="tls_handshake"} 1"#)
    );
}

#[tokio::test]
async fn certificate_naming_another_client_is_forbidden() {
    let ca = Ca::new("cluster CA");
    let shim = TlsShim::start(&ca).await;
    let agent_connections = shim.counting_vm("vm-guarded");
    let other = Controller::new(shim.dir.path(), &ca, Some(&ca.client_cert("someone-else")));

    let r = other
        .client(&shim.url)
        .set_password(&password("vm-guarded", None))
        .await;

    assert_eq!(shim_reason(r), ShimErrorReason::Forbidden);
    assert_eq!(agent_connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn request_naming_another_node_is_forbidden() {
    let ca = Ca::new("cluster CA");
    let shim = TlsShim::start(&ca).await;
    let agent_connections = shim.counting_vm("vm-elsewhere");
    let controller = Controller::new(shim.dir.path(), &ca, Some(&ca.client_cert(CONTROLLER_NAME)));

    let r = controller
        .client(&shim.url)
        .set_password(&password("vm-elsewhere", Some("node-b")))
        .await;

    assert_eq!(shim_reason(r), ShimErrorReason::Forbidden);
    assert_eq!(agent_connections.load(Ordering::SeqCst), 0);
    assert!(
        shim.metrics_text()
            .contains(r#"guestcred_shim_requests_refused_total{reason="wrong_node"} 1"#)
    );
}

#[tokio::test]
async fn shim_that_does_not_present_the_shim_name_is_not_trusted() {
    let ca = Ca::new("cluster CA");
    let shim = TlsShim::start(&ca).await;
    // The controller trusts the CA but expects another server name.
    let mut controller =
        Controller::new(shim.dir.path(), &ca, Some(&ca.client_cert(CONTROLLER_NAME)));
    controller.files.server_name = "some-other-service".into();

    let r = controller
        .client(&shim.url)
        .probe(&DomainRef::new("lab", "vm"))
        .await;

    assert!(matches!(r, Err(ShimCallError::Unreachable(_))), "{r:?}");
}

#[tokio::test]
async fn rotated_certificates_and_cas_are_used_by_new_connections_without_restart() {
    let old_ca = Ca::new("old CA");
    let shim = TlsShim::start(&old_ca).await;
    let vm = shim.vm("vm-rotate");
    let controller = Controller::new(
        shim.dir.path(),
        &old_ca,
        Some(&old_ca.client_cert(CONTROLLER_NAME)),
    );
    let reloading = controller.reloading();
    shim_client(&shim.url, &reloading)
        .probe(&DomainRef::new("lab", "vm-rotate"))
        .await
        .expect("works before the rotation");
    let stale = Controller::new(
        shim.dir.path(),
        &old_ca,
        Some(&old_ca.client_cert(CONTROLLER_NAME)),
    );

    let new_ca = Ca::new("new CA");
    shim.install_server_cert(&new_ca);
    controller.install(&new_ca, Some(&new_ca.client_cert(CONTROLLER_NAME)));

    // The same reloading client picks up the new files and the same shim process the new
    // certificate and CA.
    shim_client(&shim.url, &reloading)
        .set_password(&password("vm-rotate", Some(NODE)))
        .await
        .expect("works after rotating both sides");
    assert_eq!(
        vm.shadow_hash("alice").unwrap().as_deref(),
        Some(SHA512_HASH)
    );
    // A client still on the old CA and old certificate is refused on a new connection.
    let r = stale
        .client(&shim.url)
        .probe(&DomainRef::new("lab", "vm-rotate"))
        .await;
    assert!(matches!(r, Err(ShimCallError::Unreachable(_))), "{r:?}");
}

#[tokio::test]
async fn half_written_certificate_keeps_the_last_good_one() {
    let ca = Ca::new("cluster CA");
    let shim = TlsShim::start(&ca).await;
    let _vm = shim.vm("vm-half");
    let controller = Controller::new(shim.dir.path(), &ca, Some(&ca.client_cert(CONTROLLER_NAME)));

    write_atomically(
        &shim.server_files.cert,
        "-----BEGIN CERTIFICATE-----\ntrunc",
    );

    let probe = controller
        .client(&shim.url)
        .probe(&DomainRef::new("lab", "vm-half"))
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
    let template = format!("{}/{{name}}/qga.sock", dir.path().display());
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
    let _vm = HostQga::start_with(dir.path(), "vm-bin", &HostQgaOptions::default())
        .expect("lab qemu-ga must start");
    // A hung agent: the call on it stays in flight until the agent timeout.
    let hung_dir = dir.path().join("vm-hung");
    std::fs::create_dir_all(&hung_dir).unwrap();
    let hung = UnixListener::bind(hung_dir.join("qga.sock")).unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });

    let controller = Controller::new(dir.path(), &ca, Some(&ca.client_cert(CONTROLLER_NAME)));
    let client = controller.client(&format!("https://127.0.0.1:{port}"));
    let deadline = Instant::now() + TIMEOUT;
    let probe = loop {
        match client.probe(&DomainRef::new("lab", "vm-bin")).await {
            Err(ShimCallError::Unreachable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other,
        }
    };
    assert!(probe.expect("probe through the binary").agent_connected);
    let ops = format!("http://127.0.0.1:{metrics_port}");
    let ready = reqwest::get(format!("{ops}/readyz")).await.unwrap();
    assert!(ready.status().is_success());

    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.probe(&DomainRef::new("lab", "vm-hung")).await }
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
    let qga = w
        .add_vm(
            &vm("default", "vm-tls", "node-1"),
            Some(HostQgaOptions::default().user("alice")),
        )
        .await
        .expect("vm")
        .expect("agent");
    w.apply(&secret("pw", "password", SHA512_HASH))
        .await
        .expect("secret");
    let reset = GuestPasswordReset::test("reset")
        .vm("vm-tls")
        .user("alice")
        .from_secret("pw")
        .crypted();
    w.apply(&reset).await.expect("reset");

    let r: GuestPasswordReset = w
        .wait_for("default", "reset", TIMEOUT, |r: &GuestPasswordReset| {
            r.status
                .as_ref()
                .is_some_and(|s| matches!(s.run.phase, Some(Phase::Succeeded | Phase::Failed)))
        })
        .await
        .expect("the reset finishes");
    assert_eq!(r.status.expect("status").run.phase, Some(Phase::Succeeded));
    assert_eq!(
        qga.shadow_hash("alice").unwrap().as_deref(),
        Some(SHA512_HASH)
    );
}
