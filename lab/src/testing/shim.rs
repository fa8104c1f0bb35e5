//! Calling a shim directly (tests of the shim's API, without a controller).
use guestcred::api::wire::{DomainRef, SetPasswordRequest, ShimErrorReason};
use guestcred::controller::shim_client::ShimCallError;
use secrecy::SecretString;

/// Serves `router` (a shim's, say) over plain HTTP on 127.0.0.1 until the test ends; its
/// base URL.
pub async fn serve_on_loopback(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(crate::world::serve_plain_http(
        listener,
        router,
        std::future::pending(),
    ));
    url
}

/// A hung agent: a socket at `path` (its directory created) that accepts connections and
/// never answers. Counts the connections.
pub fn silent_socket(path: &std::path::Path) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("socket dir");
    }
    let listener = tokio::net::UnixListener::bind(path).expect("bind silent socket");
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    count
}

/// The typed reason of a call that must have failed with a shim error.
pub fn shim_reason<T: std::fmt::Debug>(r: Result<T, ShimCallError>) -> ShimErrorReason {
    match r {
        Err(ShimCallError::Shim(e)) => e.reason,
        other => panic!("expected a typed shim error, got {other:?}"),
    }
}

/// Set `user`'s password on `domain` to `secret` (a crypt(3) hash when `crypted`).
pub fn password_request(
    domain: DomainRef,
    user: &str,
    secret: &str,
    crypted: bool,
) -> SetPasswordRequest {
    SetPasswordRequest {
        domain,
        user: user.into(),
        password: SecretString::from(secret),
        crypted,
    }
}

/// A call to a hung agent, spawned earlier, ends within `limit` with AgentTimeout.
pub async fn assert_agent_timeout<T: std::fmt::Debug>(
    call: tokio::task::JoinHandle<Result<T, ShimCallError>>,
    limit: std::time::Duration,
) {
    let r = tokio::time::timeout(limit, call)
        .await
        .expect("the hung call ends")
        .expect("join");
    assert_eq!(shim_reason(r), ShimErrorReason::AgentTimeout);
}

/// The two key lists hold the same keys, in any order.
pub fn assert_same_keys(actual: &[String], expected: &[&str]) {
    let mut a: Vec<&str> = actual.iter().map(String::as_str).collect();
    let mut e = expected.to_vec();
    a.sort_unstable();
    e.sort_unstable();
    assert_eq!(a, e);
}
