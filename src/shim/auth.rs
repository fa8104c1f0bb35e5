//! Request authentication for the shim API.
//!
//! Default: mutual TLS ([`Auth::ClientCert`]). The TLS layer ([`crate::tls::server`]) only accepts
//! certificates chained to the configured client CA; this layer then requires that a
//! certificate was presented (401 otherwise) and that it names an allowed client as a DNS
//! SAN (403 otherwise). A bearer token can be required on top, never instead: a token
//! alone would travel over plain HTTP, so there is no token-only mode.
//!
//! There is no way to turn authentication off in the product: a test world that wants a
//! plain-HTTP shim serves `ShimApp::router_without_auth_for_test_worlds` from its own code
//! (guestcred-lab). Health endpoints are on the ops port, not here.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rustls::pki_types::CertificateDer;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::errors::ApiError;
use crate::api::wire::{ShimError, ShimErrorReason};
use crate::metrics::{Refusal, ShimMetrics};

/// The client certificate of the connection a request came on (set by the TLS server
/// loop, which requires one in the handshake). Only certificates chained to the client CA
/// get here.
#[derive(Clone, Debug)]
pub struct PeerCertificate(pub Option<CertificateDer<'static>>);

#[derive(Clone)]
pub enum Auth {
    /// Mutual TLS: a client certificate naming one of `allowed` (DNS SAN), and, when
    /// `token` is set, that bearer token too.
    ClientCert {
        allowed: Arc<[String]>,
        token: Option<Arc<SecretString>>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("reading the auth token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the auth token file {path} is empty")]
    Empty { path: String },
}

impl Auth {
    /// Mutual TLS accepting clients whose certificate names one of `allowed`.
    pub fn client_cert(allowed: Vec<String>, token: Option<SecretString>) -> Self {
        Self::ClientCert {
            allowed: allowed.into(),
            token: token.map(Arc::new),
        }
    }

    fn check(&self, header: Option<&str>, peer: Option<&PeerCertificate>) -> Result<(), Refused> {
        let Self::ClientCert { allowed, token } = self;
        // The handshake already required a certificate; this guards any other path.
        let Some(cert) = peer.and_then(|p| p.0.as_ref()) else {
            return Err(Refused::new(
                Refusal::Unauthenticated,
                ShimErrorReason::Unauthenticated,
                "no client certificate",
            ));
        };
        if !crate::tls::server::client_identity_allowed(cert, allowed) {
            return Err(Refused::new(
                Refusal::ClientNotAllowed,
                ShimErrorReason::Forbidden,
                "the client certificate does not name an allowed client",
            ));
        }
        match token {
            Some(t) => check_token(header, t),
            None => Ok(()),
        }
    }
}

/// Read a bearer token from a file (a mounted Secret), trimmed; empty is an error.
/// Blocking: call it from a blocking context (the shim does, at start).
#[allow(clippy::disallowed_methods)] // the blocking helper that reads the token file
pub fn read_token_file(path: &Path) -> Result<SecretString, AuthConfigError> {
    let raw = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
        AuthConfigError::Read {
            path: path.display().to_string(),
            source,
        }
    })?);
    let token = raw.trim();
    if token.is_empty() {
        return Err(AuthConfigError::Empty {
            path: path.display().to_string(),
        });
    }
    Ok(SecretString::from(token))
}

/// A refused request: the metric's reason and the typed answer.
#[derive(Debug)]
struct Refused {
    why: Refusal,
    error: ShimError,
}

impl Refused {
    fn new(why: Refusal, reason: ShimErrorReason, message: &str) -> Self {
        Self {
            why,
            error: ShimError::new(reason, message),
        }
    }
}

fn check_token(header: Option<&str>, expected: &SecretString) -> Result<(), Refused> {
    let unauthenticated = |m| {
        Refused::new(
            Refusal::Unauthenticated,
            ShimErrorReason::Unauthenticated,
            m,
        )
    };
    let Some(presented) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return Err(unauthenticated("missing bearer token"));
    };
    if digest_eq(presented.trim(), expected.expose_secret()) {
        Ok(())
    } else {
        Err(unauthenticated("invalid bearer token"))
    }
}

/// Compare fixed-size digests without an early exit, so timing does not reveal a prefix.
fn digest_eq(a: &str, b: &str) -> bool {
    let (da, db) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    da.iter()
        .zip(db.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// State of [`require_auth`].
#[derive(Clone)]
pub struct AuthState {
    pub auth: Auth,
    pub metrics: Arc<ShimMetrics>,
}

/// axum middleware: refuse unauthenticated (401) and unauthorized (403) requests, count
/// them, and log them without bodies.
pub async fn require_auth(
    State(state): State<AuthState>,
    request: Request,
    next: Next,
) -> Response {
    let header = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let peer_cert = request.extensions().get::<PeerCertificate>();
    match state.auth.check(header, peer_cert) {
        Ok(()) => next.run(request).await,
        Err(Refused { why, error: e }) => {
            state.metrics.refused(why);
            let peer = request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.to_string())
                .unwrap_or_else(|| "unknown".into());
            tracing::warn!(
                method = %request.method(),
                path = %request.uri().path(),
                %peer,
                reason = %e.message,
                "refused shim request"
            );
            ApiError(e).into_response()
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // test files
mod tests {
    use super::*;

    fn token() -> SecretString {
        SecretString::from("t0ken")
    }

    #[test]
    fn matching_bearer_token_passes() {
        assert!(check_token(Some("Bearer t0ken"), &token()).is_ok());
    }

    #[test]
    fn missing_or_wrong_token_is_unauthenticated() {
        for h in [
            None,
            Some("Bearer nope"),
            Some("Basic t0ken"),
            Some("t0ken"),
        ] {
            let e = check_token(h, &token()).unwrap_err();
            assert_eq!(e.error.reason, ShimErrorReason::Unauthenticated);
        }
    }

    #[test]
    fn a_token_on_top_of_client_certificates_does_not_replace_the_certificate() {
        let auth = Auth::client_cert(vec!["guestcred-controller".into()], Some(token()));
        let e = auth.check(Some("Bearer t0ken"), None).unwrap_err();
        assert_eq!(e.error.reason, ShimErrorReason::Unauthenticated);
        assert_eq!(e.why, Refusal::Unauthenticated);
    }

    fn mtls() -> Auth {
        Auth::client_cert(vec!["guestcred-controller".into()], None)
    }

    #[test]
    fn client_cert_auth_without_a_certificate_is_unauthenticated() {
        let no_tls = mtls().check(None, None).unwrap_err();
        assert_eq!(no_tls.error.reason, ShimErrorReason::Unauthenticated);
        let no_cert = mtls()
            .check(None, Some(&PeerCertificate(None)))
            .unwrap_err();
        assert_eq!(no_cert.error.reason, ShimErrorReason::Unauthenticated);
    }

    #[test]
    fn client_cert_auth_with_an_unparsable_certificate_is_forbidden() {
        let junk = PeerCertificate(Some(CertificateDer::from(vec![1u8, 2, 3])));
        let e = mtls().check(None, Some(&junk)).unwrap_err();
        assert_eq!(e.error.reason, ShimErrorReason::Forbidden);
        assert_eq!(e.why, Refusal::ClientNotAllowed);
    }

    #[test]
    fn token_file_is_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "t0ken\n").unwrap();
        let read = read_token_file(&path).unwrap();
        assert!(check_token(Some("Bearer t0ken"), &read).is_ok());
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(
            read_token_file(&path),
            Err(AuthConfigError::Empty { .. })
        ));
    }
}
