//! Request authentication for the shim API.
//!
//! Interim scheme until mutual TLS lands: one shared bearer token, read from a file (a
//! mounted Secret). The check is a real one; `Disabled` exists only for tests and needs an
//! explicit `--insecure-no-auth`. Health endpoints stay open for kubelet probes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::server::ApiError;
use crate::api::wire::{ShimError, ShimErrorReason};

#[derive(Clone)]
pub enum Auth {
    /// `Authorization: Bearer <token>` must carry this token.
    BearerToken(Arc<SecretString>),
    /// No authentication (tests only).
    Disabled,
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
    pub fn bearer(token: SecretString) -> Self {
        Self::BearerToken(Arc::new(token))
    }

    /// Read the token from a file; surrounding whitespace (a trailing newline) is ignored.
    pub fn from_token_file(path: &Path) -> Result<Self, AuthConfigError> {
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
        Ok(Self::bearer(SecretString::from(token)))
    }

    fn check(&self, header: Option<&str>) -> Result<(), ShimError> {
        let expected = match self {
            Self::Disabled => return Ok(()),
            Self::BearerToken(t) => t,
        };
        let Some(presented) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return Err(ShimError::new(
                ShimErrorReason::Unauthenticated,
                "missing bearer token",
            ));
        };
        if digest_eq(presented.trim(), expected.expose_secret()) {
            Ok(())
        } else {
            Err(ShimError::new(
                ShimErrorReason::Unauthenticated,
                "invalid bearer token",
            ))
        }
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

/// axum middleware: refuse unauthenticated requests (401) and log them without bodies.
pub async fn require_auth(State(auth): State<Auth>, request: Request, next: Next) -> Response {
    let header = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth.check(header) {
        Ok(()) => next.run(request).await,
        Err(e) => {
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
                "refused unauthenticated shim request"
            );
            ApiError(e).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_auth() -> Auth {
        Auth::bearer(SecretString::from("t0ken"))
    }

    #[test]
    fn matching_bearer_token_passes() {
        assert!(token_auth().check(Some("Bearer t0ken")).is_ok());
    }

    #[test]
    fn missing_or_wrong_token_is_unauthenticated() {
        for h in [
            None,
            Some("Bearer nope"),
            Some("Basic t0ken"),
            Some("t0ken"),
        ] {
            let e = token_auth().check(h).unwrap_err();
            assert_eq!(e.reason, ShimErrorReason::Unauthenticated);
        }
    }

    #[test]
    fn disabled_auth_lets_everything_through() {
        assert!(Auth::Disabled.check(None).is_ok());
    }

    #[test]
    fn token_file_is_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "t0ken\n").unwrap();
        assert!(
            Auth::from_token_file(&path)
                .unwrap()
                .check(Some("Bearer t0ken"))
                .is_ok()
        );
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(
            Auth::from_token_file(&path),
            Err(AuthConfigError::Empty { .. })
        ));
    }
}
