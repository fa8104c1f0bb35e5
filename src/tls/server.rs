//! The shim's half of mutual TLS: its certificate and the CA that issues client
//! certificates, reloaded when the files change.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::WebPkiClientVerifier;

use super::{Loaded, Snapshot, TlsError, certs, invalid, key, provider, roots, snapshot};

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
