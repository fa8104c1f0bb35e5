//! Calling a shim directly (tests of the shim's API, without a controller).
use guestcred::api::wire::{DomainRef, SetPasswordRequest, ShimErrorReason};
use guestcred::controller::shim_client::ShimCallError;
use secrecy::SecretString;

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

/// The two key lists hold the same keys, in any order.
pub fn assert_same_keys(actual: &[String], expected: &[&str]) {
    let mut a: Vec<&str> = actual.iter().map(String::as_str).collect();
    let mut e = expected.to_vec();
    a.sort_unstable();
    e.sort_unstable();
    assert_eq!(a, e);
}
