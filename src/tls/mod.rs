//! Mutual TLS between the controller and the shims (rustls with the `ring` provider):
//! the PEM loading both halves share; [`server`] is the shim's half, [`client`] the
//! controller's.
//!
//! Server side: [`server::ReloadingServerConfig`] keeps the shim's rustls config in memory;
//! a reload thread of its own ([`spawn_reloader`]) re-reads the certificate, key and client
//! CA every [`DEFAULT_RELOAD_INTERVAL`] and swaps in a new config when their bytes changed,
//! so a rotated Secret (kubelet swaps the files in place) takes effect for new connections
//! without a restart. A handshake only clones the current snapshot: no file is read, and
//! no lock is held across a read, on the async workers. A broken intermediate state (a
//! half-written file) keeps the last good config.
//!
//! Client side: [`client::ReloadingHttpClient`] does the same for the controller's reqwest client.
//! The controller dials shims by pod IP, which no certificate issued at install time can
//! name, so it verifies the shim's chain against the CA and the certificate against one
//! fixed DNS name (`--shim-server-name`, default [`DEFAULT_SHIM_SERVER_NAME`]) instead of
//! the IP.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

pub mod client;
pub mod server;

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

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How often the reload threads look at the certificate files.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Blocking: only on a reload thread, in `spawn_blocking`, or before the runtime starts.
#[allow(clippy::disallowed_methods)] // the one blocking read of certificate files
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

pub(crate) fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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
pub(crate) fn key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| TlsError::NoKey {
        path: path.display().to_string(),
    })
}

pub(crate) fn roots(path: &Path, pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs(path, pem)? {
        store.add(cert).map_err(|e| TlsError::Invalid {
            what: path.display().to_string(),
            message: e.to_string(),
        })?;
    }
    Ok(Arc::new(store))
}

pub(crate) fn invalid<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> TlsError + '_ {
    move |e| TlsError::Invalid {
        what: what.to_owned(),
        message: e.to_string(),
    }
}

/// Files read together; `digest` tells whether any of them changed.
pub(crate) struct Snapshot {
    pub(crate) contents: Vec<zeroize::Zeroizing<Vec<u8>>>,
    pub(crate) digest: [u8; 32],
}

pub(crate) fn snapshot(paths: &[&Path]) -> Result<Snapshot, TlsError> {
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

/// A value built from files, swapped in place by its reload thread. Readers take the
/// current `Arc` under a read lock that is never held across I/O.
pub(crate) struct Reloadable<T> {
    current: RwLock<Arc<T>>,
}

impl<T> Reloadable<T> {
    pub(crate) fn new(value: T) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Arc::new(value)),
        })
    }

    /// The current value (cheap: an `Arc` clone).
    pub(crate) fn load(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn store(&self, value: T) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
    }
}

/// Start the thread that re-reads `paths` every `interval` and, when their bytes changed
/// and `build` accepts them, swaps the result into `target`. It ends once `target` is
/// dropped. A dedicated thread, not `spawn_blocking`: a read that never returns (a FIFO,
/// a hung network file system) must not hold up the runtime's shutdown.
pub(crate) fn spawn_reloader<T, F>(
    what: &'static str,
    paths: Vec<PathBuf>,
    digest: [u8; 32],
    target: Weak<Reloadable<T>>,
    interval: Duration,
    build: F,
) where
    T: Send + Sync + 'static,
    F: Fn(&Snapshot) -> Result<T, TlsError> + Send + 'static,
{
    let spawned = std::thread::Builder::new()
        .name(format!("{what}-reload"))
        .spawn(move || {
            let mut digest = digest;
            loop {
                std::thread::sleep(interval);
                if target.strong_count() == 0 {
                    return;
                }
                let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
                let snap = match snapshot(&refs) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(what, error = %e, "cannot re-read TLS files; keeping the loaded ones");
                        continue;
                    }
                };
                if snap.digest == digest {
                    continue;
                }
                match build(&snap) {
                    Ok(value) => {
                        let Some(target) = target.upgrade() else {
                            return;
                        };
                        target.store(value);
                        digest = snap.digest;
                        tracing::info!(what, "TLS files changed; reloaded");
                    }
                    Err(e) => {
                        tracing::warn!(what, error = %e, "changed TLS files are not usable (yet); keeping the loaded ones");
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(what, error = %e, "cannot start the TLS reload thread; certificates will not be reloaded");
    }
}
