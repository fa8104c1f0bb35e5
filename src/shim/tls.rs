//! Mutual TLS between the controller and the shims (rustls with the `ring` provider).
//!
//! Server side: [`ReloadingServerConfig`] re-reads the shim's certificate, key and client CA
//! on every handshake and rebuilds the rustls config when their bytes changed, so a rotated
//! Secret (kubelet swaps the files in place) takes effect for new connections without a
//! restart. A broken intermediate state (a half-written file) keeps the last good config.
//!
//! Client side: [`ReloadingHttpClient`] does the same for the controller's reqwest client.
//! The controller dials shims by pod IP, which no certificate issued at install time can
//! name, so it verifies the shim's chain against the CA and the certificate against one
//! fixed DNS name (`--shim-server-name`, default [`DEFAULT_SHIM_SERVER_NAME`]) instead of
//! the IP.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};

/// DNS name (SAN) the shim's server certificate carries and the controller checks.
pub const DEFAULT_SHIM_SERVER_NAME: &str = "guestcred-shim";
/// DNS name (SAN) the controller's client certificate carries and the shim accepts.
pub const DEFAULT_ALLOWED_CLIENT: &str = "guestcred-controller";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: String },
    #[error("{path}: no PEM private key found")]
    NoKey { path: String },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    #[error("building the HTTPS client: {0}")]
    Client(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            what: path.display().to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// The key's parse error is not quoted: it could echo key material.
fn key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| TlsError::NoKey {
        path: path.display().to_string(),
    })
}

fn roots(path: &Path, pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs(path, pem)? {
        store.add(cert).map_err(|e| TlsError::Invalid {
            what: path.display().to_string(),
            message: e.to_string(),
        })?;
    }
    Ok(Arc::new(store))
}

fn invalid(what: &str) -> impl FnOnce(rustls::Error) -> TlsError + '_ {
    move |e| TlsError::Invalid {
        what: what.to_owned(),
        message: e.to_string(),
    }
}

/// Files read together; `digest` tells whether any of them changed.
struct Snapshot {
    contents: Vec<zeroize::Zeroizing<Vec<u8>>>,
    digest: [u8; 32],
}

fn snapshot(paths: &[&Path]) -> Result<Snapshot, TlsError> {
    let mut hasher = Sha256::new();
    let mut contents = Vec::with_capacity(paths.len());
    for p in paths {
        let bytes = zeroize::Zeroizing::new(read(p)?);
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(&*bytes);
        contents.push(bytes);
    }
    Ok(Snapshot {
        contents,
        digest: hasher.finalize().into(),
    })
}

/// The shim's certificate, key and the CA that issues client certificates.
#[derive(Clone, Debug)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl ServerTlsFiles {
    fn build(&self, snap: &Snapshot) -> Result<Arc<ServerConfig>, TlsError> {
        let chain = certs(&self.cert, &snap.contents[0])?;
        let key = key(&self.key, &snap.contents[1])?;
        let roots = roots(&self.client_ca, &snap.contents[2])?;
        let provider = provider();
        // Connections without a certificate complete the handshake and get a typed 401
        // from the auth layer; certificates from another CA fail the handshake.
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Invalid {
                what: self.client_ca.display().to_string(),
                message: e.to_string(),
            })?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(invalid("TLS protocol versions"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(invalid(&self.key.display().to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

struct Loaded<T> {
    digest: [u8; 32],
    value: T,
}

/// The shim's rustls config, rebuilt when its files change (checked on each handshake).
pub struct ReloadingServerConfig {
    files: ServerTlsFiles,
    loaded: Mutex<Loaded<Arc<ServerConfig>>>,
}

impl ReloadingServerConfig {
    /// Load the files once; an error here is fatal (the shim must not start without TLS).
    pub fn new(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let snap = snapshot(&files.paths())?;
        let config = files.build(&snap)?;
        Ok(Self {
            files,
            loaded: Mutex::new(Loaded {
                digest: snap.digest,
                value: config,
            }),
        })
    }

    /// The config for a new handshake: the files' current content if it is valid, else
    /// the last good one.
    pub fn current(&self) -> Arc<ServerConfig> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let snap = match snapshot(&self.files.paths()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-read TLS files; keeping the loaded certificate");
                return loaded.value.clone();
            }
        };
        if snap.digest != loaded.digest {
            match self.files.build(&snap) {
                Ok(config) => {
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate or client CA changed; reloaded");
                    *loaded = Loaded {
                        digest: snap.digest,
                        value: config,
                    };
                }
                Err(e) => {
                    tracing::warn!(error = %e, "changed TLS files are not usable (yet); keeping the loaded certificate");
                }
            }
        }
        loaded.value.clone()
    }
}

impl ServerTlsFiles {
    fn paths(&self) -> [&Path; 3] {
        [&self.cert, &self.key, &self.client_ca]
    }
}

/// Whether a verified client certificate names one of `allowed` as a DNS SAN.
pub fn client_identity_allowed(cert: &CertificateDer<'_>, allowed: &[String]) -> bool {
    let Ok(end_entity) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    allowed.iter().any(|name| {
        ServerName::try_from(name.as_str())
            .is_ok_and(|n| end_entity.verify_is_valid_for_subject_name(&n).is_ok())
    })
}

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
            .map_err(|e| TlsError::Invalid {
                what: self.ca.display().to_string(),
                message: e.to_string(),
            })?;
        let name =
            ServerName::try_from(self.server_name.clone()).map_err(|e| TlsError::Invalid {
                what: format!("shim server name {:?}", self.server_name),
                message: e.to_string(),
            })?;
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
        Ok(config)
    }
}

/// The controller's HTTPS client for shims, rebuilt when the CA or client cert changes.
pub struct ReloadingHttpClient {
    files: ClientTlsFiles,
    timeout: Duration,
    loaded: Mutex<Option<Loaded<reqwest::Client>>>,
}

impl std::fmt::Debug for ReloadingHttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingHttpClient")
            .field("files", &self.files)
            .finish()
    }
}

impl ReloadingHttpClient {
    /// Load the files once (an error here is a configuration error worth failing on).
    pub fn new(files: ClientTlsFiles, timeout: Duration) -> Result<Self, TlsError> {
        let c = Self {
            files,
            timeout,
            loaded: Mutex::new(None),
        };
        c.http()?;
        Ok(c)
    }

    /// The client for the files' current content (the last good one when they are
    /// momentarily unusable).
    pub fn http(&self) -> Result<reqwest::Client, TlsError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let snap = match snapshot(&self.files.paths()) {
            Ok(s) => s,
            Err(e) => {
                return match loaded.as_ref() {
                    Some(l) => {
                        tracing::warn!(error = %e, "cannot re-read shim TLS files; keeping the loaded client certificate");
                        Ok(l.value.clone())
                    }
                    None => Err(e),
                };
            }
        };
        if let Some(l) = loaded.as_ref()
            && l.digest == snap.digest
        {
            return Ok(l.value.clone());
        }
        let built = self.files.build(&snap).and_then(|config| {
            reqwest::Client::builder()
                .use_preconfigured_tls(config)
                .https_only(true)
                .timeout(self.timeout)
                .connect_timeout(self.timeout.min(Duration::from_secs(5)))
                .build()
                .map_err(|e| TlsError::Client(e.to_string()))
        });
        match (built, loaded.as_ref()) {
            (Ok(client), _) => {
                if loaded.is_some() {
                    tracing::info!(
                        "shim CA or client certificate changed; rebuilt the shim client"
                    );
                }
                *loaded = Some(Loaded {
                    digest: snap.digest,
                    value: client.clone(),
                });
                Ok(client)
            }
            (Err(e), Some(l)) => {
                tracing::warn!(error = %e, "changed shim TLS files are not usable (yet); keeping the loaded client");
                Ok(l.value.clone())
            }
            (Err(e), None) => Err(e),
        }
    }
}
