//! The shim's half of mutual TLS: its certificate and the CA that issues client
//! certificates, reloaded when the files change.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::WebPkiClientVerifier;

use super::{
    DEFAULT_RELOAD_INTERVAL, Reloadable, Snapshot, TlsError, certs, invalid, key, provider, roots,
    snapshot, spawn_reloader,
};

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
        // A client certificate chained to the client CA is required in the handshake
        // itself: a client without one never gets to send an HTTP request.
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(invalid(&self.client_ca.display().to_string()))?;
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

/// The shim's rustls config, rebuilt by a reload thread when its files change.
pub struct ReloadingServerConfig {
    config: Arc<Reloadable<Arc<ServerConfig>>>,
}

impl ReloadingServerConfig {
    /// Load the files once (an error here is fatal: the shim must not start without TLS)
    /// and start the reload thread. Blocking: call it from a blocking context, or use
    /// [`ReloadingServerConfig::load`].
    pub fn new(files: ServerTlsFiles) -> Result<Self, TlsError> {
        Self::with_interval(files, DEFAULT_RELOAD_INTERVAL)
    }

    /// [`ReloadingServerConfig::new`] off the async workers.
    pub async fn load(files: ServerTlsFiles) -> Result<Self, TlsError> {
        tokio::task::spawn_blocking(move || Self::new(files))
            .await
            .map_err(|e| TlsError::Invalid {
                what: "loading the TLS files".into(),
                message: e.to_string(),
            })?
    }

    /// Like [`ReloadingServerConfig::new`], looking at the files every `interval`.
    pub fn with_interval(files: ServerTlsFiles, interval: Duration) -> Result<Self, TlsError> {
        let paths = files.paths();
        let refs: Vec<&std::path::Path> = paths.iter().map(PathBuf::as_path).collect();
        let snap = snapshot(&refs)?;
        let config = Reloadable::new(files.build(&snap)?);
        spawn_reloader(
            "shim-tls",
            paths,
            snap.digest,
            Arc::downgrade(&config),
            interval,
            move |snap| files.build(snap),
        );
        Ok(Self { config })
    }

    /// The config for a new handshake: a snapshot in memory, never a file read.
    pub fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.config.load())
    }
}

impl ServerTlsFiles {
    fn paths(&self) -> Vec<PathBuf> {
        vec![self.cert.clone(), self.key.clone(), self.client_ca.clone()]
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
