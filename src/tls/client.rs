//! The controller's half of mutual TLS: the CA that issued the shims' certificates, its
//! own client certificate, and the reqwest client built from them.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

use super::{Loaded, Snapshot, TlsError, certs, invalid, key, provider, roots, snapshot};

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
