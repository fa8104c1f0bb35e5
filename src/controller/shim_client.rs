//! The controller's side of the shim API: a leaf the rest of the controller reaches only
//! through the [`ShimApi`] trait (the engine's tests use a fake behind it), with the real
//! HTTP implementation [`ShimClient`].

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::wire::{
    DomainRef, GetSshKeysRequest, KeyOp, ProbeRequest, ProbeResponse, SetPasswordRequest,
    SetPasswordResponse, ShimError, ShimErrorReason, SshKeysRequest, SshKeysResponse, paths,
};

/// Why a shim call failed, as the controller needs to tell it apart.
#[derive(Debug, thiserror::Error)]
pub enum ShimCallError {
    /// The shim could not be reached or did not answer in time (→ ShimUnavailable).
    #[error("shim unreachable: {0}")]
    Unreachable(String),
    /// The shim answered with a typed error.
    #[error("shim error {0}")]
    Shim(ShimError),
    /// The shim answered something that is not the v1 protocol.
    #[error("unexpected shim answer (HTTP {status}): {message}")]
    Protocol { status: u16, message: String },
}

impl ShimCallError {
    /// The typed reason, when the shim gave one.
    pub fn reason(&self) -> Option<ShimErrorReason> {
        match self {
            Self::Shim(e) => Some(e.reason),
            _ => None,
        }
    }
}

/// The four calls a node shim answers (see `crate::api::wire`).
#[async_trait]
pub trait ShimApi: Send + Sync + Debug {
    async fn set_password(&self, request: &SetPasswordRequest) -> Result<(), ShimCallError>;
    /// Apply `op` with `keys`; returns the resulting authorized keys.
    async fn ssh_keys(
        &self,
        domain: &DomainRef,
        user: &str,
        op: KeyOp,
        keys: Vec<String>,
    ) -> Result<Vec<String>, ShimCallError>;
    async fn get_ssh_keys(
        &self,
        domain: &DomainRef,
        user: &str,
    ) -> Result<Vec<String>, ShimCallError>;
    async fn probe(&self, domain: &DomainRef) -> Result<ProbeResponse, ShimCallError>;
}

#[derive(Clone)]
pub struct ShimClient {
    base_url: String,
    token: Option<SecretString>,
    http: reqwest::Client,
}

impl std::fmt::Debug for ShimClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShimClient")
            .field("base_url", &self.base_url)
            .field("token", &self.token.as_ref().map(|_| "[REDACTED]"))
            .finish()
    }
}

impl ShimClient {
    /// `base_url` like `http://10.0.0.5:8443`. `timeout` bounds a whole request; set it
    /// above the shim's agent timeout so agent timeouts arrive as typed errors.
    pub fn new(
        base_url: impl Into<String>,
        token: Option<SecretString>,
        timeout: Duration,
    ) -> Result<Self, ShimCallError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| ShimCallError::Unreachable(format!("building HTTP client: {e}")))?;
        Ok(Self::with_http_client(base_url, token, http))
    }

    /// Use a prepared reqwest client (e.g. one configured for mutual TLS).
    pub fn with_http_client(
        base_url: impl Into<String>,
        token: Option<SecretString>,
        http: reqwest::Client,
    ) -> Self {
        Self {
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            token,
            http,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
    ) -> Result<Resp, ShimCallError> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base_url))
            .json(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token.expose_secret());
        }
        let response = request
            .send()
            .await
            .map_err(|e| ShimCallError::Unreachable(without_url(e)))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ShimCallError::Unreachable(without_url(e)))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| ShimCallError::Protocol {
                status: status.as_u16(),
                message: format!("decoding answer: {e}"),
            });
        }
        match serde_json::from_slice::<ShimError>(&bytes) {
            Ok(e) => Err(ShimCallError::Shim(e)),
            Err(_) => Err(ShimCallError::Protocol {
                status: status.as_u16(),
                message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            }),
        }
    }
}

#[async_trait]
impl ShimApi for ShimClient {
    async fn set_password(&self, request: &SetPasswordRequest) -> Result<(), ShimCallError> {
        self.post::<_, SetPasswordResponse>(paths::PASSWORD, request)
            .await
            .map(drop)
    }

    async fn ssh_keys(
        &self,
        domain: &DomainRef,
        user: &str,
        op: KeyOp,
        keys: Vec<String>,
    ) -> Result<Vec<String>, ShimCallError> {
        let request = SshKeysRequest {
            domain: domain.clone(),
            user: user.to_owned(),
            op,
            keys,
        };
        let response: SshKeysResponse = self.post(paths::SSH_KEYS, &request).await?;
        Ok(response.keys)
    }

    async fn get_ssh_keys(
        &self,
        domain: &DomainRef,
        user: &str,
    ) -> Result<Vec<String>, ShimCallError> {
        let request = GetSshKeysRequest {
            domain: domain.clone(),
            user: user.to_owned(),
        };
        let response: SshKeysResponse = self.post(paths::SSH_KEYS_GET, &request).await?;
        Ok(response.keys)
    }

    async fn probe(&self, domain: &DomainRef) -> Result<ProbeResponse, ShimCallError> {
        let request = ProbeRequest {
            domain: domain.clone(),
        };
        self.post(paths::PROBE, &request).await
    }
}

/// reqwest errors print the URL; keep that, but with the chain of causes.
fn without_url(e: reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
