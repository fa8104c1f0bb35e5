//! What the API server answered the world's client (the controller's, HostKubevirt's and the
//! test's own requests), counted by method, path and status code: how a test sees, on
//! either control plane, that a conflict really happened (a 409 on a status write) without
//! injecting one.
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

type Key = (String, String, u16);

/// The counts, shared by the client's service stack and the world.
#[derive(Clone, Default)]
pub struct Responses(Arc<Mutex<BTreeMap<Key, u64>>>);

impl Responses {
    fn record(&self, method: String, path: String, code: u16) {
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((method, path, code))
            .or_default() += 1;
    }

    /// How many `method` requests to a path ending in `path_suffix` were answered `code`.
    pub fn count(&self, method: &str, path_suffix: &str, code: u16) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|((m, p, c), _)| m == method && p.ends_with(path_suffix) && *c == code)
            .map(|(_, n)| n)
            .sum()
    }

    /// The layer for `kube::client::ClientBuilder::with_layer`.
    pub fn layer(&self) -> RecordLayer {
        RecordLayer(self.clone())
    }
}

pub struct RecordLayer(Responses);

impl<S> tower::Layer<S> for RecordLayer {
    type Service = Record<S>;
    fn layer(&self, inner: S) -> Record<S> {
        Record {
            inner,
            log: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Record<S> {
    inner: S,
    log: Responses,
}

impl<S, B, R> tower::Service<http::Request<B>> for Record<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (method, path) = (req.method().to_string(), req.uri().path().to_string());
        let log = self.log.clone();
        let answer = self.inner.call(req);
        Box::pin(async move {
            let response = answer.await?;
            log.record(method, path, response.status().as_u16());
            Ok(response)
        })
    }
}
