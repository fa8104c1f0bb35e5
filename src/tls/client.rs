//! The controller's half of mutual TLS: the CA that issued the shims' certificates, its
//! own client certificate, and the reqwest client built from them.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::Resumption;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

use super::{
    DEFAULT_RELOAD_INTERVAL, Reloadable, Snapshot, TlsError, certs, invalid, key, provider, roots,
    snapshot, spawn_reloader,
};

/// Checks the shim's chain against the CA, and its name against a fixed DNS name instead
/// of the pod IP the controller dialled.
#[derive(Debug)]
struct FixedNameVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What the controller needs to call shims over mutual TLS.
#[derive(Clone, Debug)]
pub struct ClientTlsFiles {
    /// CA that issued the shims' server certificates.
    pub ca: PathBuf,
    /// The controller's client certificate and key (both or neither).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// DNS name the shims' certificates must carry.
    pub server_name: String,
}

impl ClientTlsFiles {
    fn paths(&self) -> Vec<&Path> {
        let mut p = vec![self.ca.as_path()];
        p.extend(self.cert.as_deref());
        p.extend(self.key.as_deref());
        p
    }

    /// A rustls client config from the files' current content.
    fn build(&self, snap: &Snapshot) -> Result<ClientConfig, TlsError> {
        let roots = roots(&self.ca, &snap.contents[0])?;
        let provider = provider();
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(invalid(&self.ca.display().to_string()))?;
        let name = ServerName::try_from(self.server_name.clone())
            .map_err(invalid(&format!("shim server name {:?}", self.server_name)))?;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(invalid("TLS protocol versions"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(FixedNameVerifier { inner, name }));
        let mut config = match (&self.cert, &self.key) {
            (Some(cert_path), Some(key_path)) => {
                let chain = certs(cert_path, &snap.contents[1])?;
                let key = key(key_path, &snap.contents[2])?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(invalid(&key_path.display().to_string()))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(TlsError::Invalid {
                    what: "client certificate".into(),
                    message: "give both the client certificate and its key, or neither".into(),
                });
            }
        };
        // reqwest is built without HTTP/2 here: offer only HTTP/1.1.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = Resumption::in_memory_sessions(RESUMABLE_SHIMS);
        Ok(config)
    }
}

/// Shims (server names: one pod IP per node) whose TLS sessions the controller keeps for
/// resumption. A connection idle for [`POOL_IDLE_TIMEOUT`] is closed; the next call to that
/// node then resumes the session instead of a full handshake, if the session is still
/// held: its public-key work is one x25519 exchange instead of that plus two ECDSA P-256
/// verifications (the shim's chain, its handshake signature) and one ECDSA signature.
/// rustls keeps 256 by default, fewer than the nodes of a large cluster, so a bulk run
/// going round 1,000 nodes would find none. Each session holds the shim's
/// certificate chain and two tickets, about 1 KiB: a few MiB at most. A resumed session
/// keeps what the full handshake verified (the shim's chain and name; on the shim's side,
/// the controller's certificate); the store belongs to one client config, so new CA or
/// client certificate files start a new one and no session outlives a reload.
pub const RESUMABLE_SHIMS: usize = 4096;

/// How long the controller keeps an idle connection to a shim: below the shim's idle and
/// header-read timeouts (15 s, 10 s), so the shim never closes a connection the client is
/// about to reuse.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The controller's HTTPS client for shims, rebuilt by a reload thread when the CA or the
/// client certificate changes; a call only clones the current client.
pub struct ReloadingHttpClient {
    files: ClientTlsFiles,
    client: Arc<Reloadable<reqwest::Client>>,
}

impl std::fmt::Debug for ReloadingHttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingHttpClient")
            .field("files", &self.files)
            .finish()
    }
}

fn http_client(
    files: &ClientTlsFiles,
    snap: &Snapshot,
    timeout: Duration,
) -> Result<reqwest::Client, TlsError> {
    let config = files.build(snap)?;
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .https_only(true)
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build()
        .map_err(|e| TlsError::Client(e.to_string()))
}

impl ReloadingHttpClient {
    /// Load the files once (an error here is a configuration error worth failing on) and
    /// start the reload thread. Blocking: call it from a blocking context, or use
    /// [`ReloadingHttpClient::load`].
    pub fn new(files: ClientTlsFiles, timeout: Duration) -> Result<Self, TlsError> {
        Self::with_interval(files, timeout, DEFAULT_RELOAD_INTERVAL)
    }

    /// [`ReloadingHttpClient::new`] off the async workers.
    pub async fn load(files: ClientTlsFiles, timeout: Duration) -> Result<Self, TlsError> {
        tokio::task::spawn_blocking(move || Self::new(files, timeout))
            .await
            .map_err(|e| TlsError::Client(e.to_string()))?
    }

    /// Like [`ReloadingHttpClient::new`], looking at the files every `interval`.
    pub fn with_interval(
        files: ClientTlsFiles,
        timeout: Duration,
        interval: Duration,
    ) -> Result<Self, TlsError> {
        let paths: Vec<PathBuf> = files.paths().into_iter().map(Path::to_path_buf).collect();
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        let snap = snapshot(&refs)?;
        let client = Reloadable::new(http_client(&files, &snap, timeout)?);
        let for_reload = files.clone();
        spawn_reloader(
            "shim-client-tls",
            paths,
            snap.digest,
            Arc::downgrade(&client),
            interval,
            move |snap| http_client(&for_reload, snap, timeout),
        );
        Ok(Self { files, client })
    }

    /// The client for the files' latest usable content (no file is read here).
    pub fn http(&self) -> Result<reqwest::Client, TlsError> {
        Ok(reqwest::Client::clone(&self.client.load()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::server::{ReloadingServerConfig, ServerTlsFiles};
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair,
    };
    use rustls::{ClientConnection, ConnectionCommon, HandshakeKind, ServerConnection};

    const SHIM: &str = "shim.guestcred.test";

    /// CA, shim and controller certificates as files, and the two configs built from them.
    #[allow(clippy::disallowed_methods)] // a plain #[test]: no async runtime to block
    fn configs(dir: &Path) -> (Arc<ClientConfig>, Arc<rustls::ServerConfig>) {
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("CA");
        let write = |name: &str, content: &str| {
            let path = dir.join(name);
            std::fs::write(&path, content).expect("write");
            path
        };
        let issue = |name: &str, usage: ExtendedKeyUsagePurpose| {
            let mut params = CertificateParams::new(vec![name.to_string()]).expect("params");
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("key");
            let cert = params.signed_by(&key, &ca).expect("sign");
            (cert.pem(), key.serialize_pem())
        };
        let (shim_cert, shim_key) = issue(SHIM, ExtendedKeyUsagePurpose::ServerAuth);
        let (ctl_cert, ctl_key) = issue("controller", ExtendedKeyUsagePurpose::ClientAuth);
        let client = ClientTlsFiles {
            ca: write("ca.crt", &ca.pem()),
            cert: Some(write("ctl.crt", &ctl_cert)),
            key: Some(write("ctl.key", &ctl_key)),
            server_name: SHIM.into(),
        };
        let refs = client.paths();
        let client = client
            .build(&snapshot(&refs).expect("snapshot"))
            .expect("client");
        let server = ServerTlsFiles {
            cert: write("shim.crt", &shim_cert),
            key: write("shim.key", &shim_key),
            client_ca: write("ca.crt", &ca.pem()),
        };
        let server = ReloadingServerConfig::with_interval(server, Duration::from_secs(3600))
            .expect("server")
            .current();
        (Arc::new(client), server)
    }

    /// Everything `from` has to send, read and processed by `to`.
    fn transfer<A, B>(from: &mut ConnectionCommon<A>, to: &mut ConnectionCommon<B>)
    where
        B: rustls::SideData,
    {
        let mut bytes = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut bytes).expect("write");
        }
        let mut rd = &bytes[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).expect("read");
            to.process_new_packets().expect("handshake");
        }
    }

    /// One connection to the shim at `ip` (in memory, no sockets), run until the shim's
    /// session tickets have arrived; how the handshake went.
    fn connect(
        client: &Arc<ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
        ip: std::net::Ipv4Addr,
    ) -> Option<HandshakeKind> {
        let name = ServerName::IpAddress(std::net::IpAddr::V4(ip).into());
        let mut c = ClientConnection::new(client.clone(), name).expect("client connection");
        let mut s = ServerConnection::new(server.clone()).expect("server connection");
        for _ in 0..4 {
            transfer(&mut c, &mut s);
            transfer(&mut s, &mut c);
        }
        assert!(!c.is_handshaking(), "handshake with {ip} finished");
        assert!(
            s.peer_certificates().is_some(),
            "the shim has the controller's certificate"
        );
        c.handshake_kind()
    }

    #[test]
    fn a_reconnect_resumes_the_session_after_calls_to_more_shims_than_rustls_keeps_by_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (client, server) = configs(dir.path());
        // One server config stands in for every node's shim: let it hold all sessions.
        let mut server = rustls::ServerConfig::clone(&server);
        server.session_storage = rustls::server::ServerSessionMemoryCache::new(1024);
        let server = Arc::new(server);
        let node = |i: u32| std::net::Ipv4Addr::from(0x7f00_0000 + 1 + i);
        for i in 0..300 {
            assert_eq!(
                connect(&client, &server, node(i)),
                Some(HandshakeKind::Full)
            );
        }
        assert_eq!(
            connect(&client, &server, node(0)),
            Some(HandshakeKind::Resumed),
            "the first of 300 shims is called again after its connection was closed"
        );
    }
}
