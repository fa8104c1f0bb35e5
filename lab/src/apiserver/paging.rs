//! List pagination (`limit` and `continue`), as kube-apiserver serves it: a page holds at
//! most `limit` objects in key order (namespace, then name); when more keys follow, the
//! list's metadata carries an opaque `continue` token naming the last key served and the
//! first page's resourceVersion, and (when no selector filters the list)
//! `remainingItemCount`.
//!
//! A list at resourceVersion "0" is answered whole, whatever its `limit`, as kube-apiserver's
//! watch cache answers it.
//!
//! One difference, documented in the module docs of `apiserver`: later pages are read from
//! the current state, not from a snapshot at the first page's resourceVersion (etcd keeps
//! old revisions; this store does not). Every page reports the first page's
//! resourceVersion, so a reflector that watches from it is replayed every change made
//! while it paged and ends with the same cache either way.
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use super::error::ApiError;

/// Where a continued list resumes: after this key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ListCursor {
    pub ns: String,
    pub name: String,
}

/// What a list request asks for, from its `limit`, `continue` and `resourceVersion`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct PageRequest {
    /// At most this many objects (`limit`; absent or 0: all).
    pub limit: Option<usize>,
    /// Resume after this key, at the first page's resourceVersion.
    pub resume: Option<(u64, ListCursor)>,
}

#[derive(Serialize, Deserialize)]
struct Token {
    /// Format marker, so a token from elsewhere is refused rather than misread.
    v: String,
    rv: u64,
    ns: String,
    name: String,
}

const TOKEN_FORMAT: &str = "guestcred-lab/1";

impl PageRequest {
    /// Reads the request; `history_from` is the oldest resourceVersion the store can still
    /// replay changes after: a token older than that is 410, as a compacted one is on a
    /// real server, and the client starts a new list.
    pub fn parse(
        limit: Option<&str>,
        continue_token: Option<&str>,
        resource_version: Option<&str>,
        history_from: u64,
    ) -> Result<Self, ApiError> {
        let limit = match limit {
            None => None,
            Some(s) => match s.parse::<usize>() {
                Ok(0) => None,
                Ok(n) => Some(n),
                Err(_) => {
                    return Err(ApiError::bad_request(format!(
                        "invalid limit {s:?}: must be a non-negative integer"
                    )));
                }
            },
        };
        let Some(token) = continue_token else {
            // resourceVersion=0 is served from kube-apiserver's watch cache, which ignores
            // `limit` and answers in one page (kubernetes#70735): client-go reflectors ask
            // so (kube-rs leaves resourceVersion=0 out when it sets a limit).
            let any_version = resource_version == Some("0");
            return Ok(Self {
                limit: limit.filter(|_| !any_version),
                resume: None,
            });
        };
        // Callers pass absent for an empty parameter, as `http::param` does.
        if resource_version.is_some_and(|rv| rv != "0") {
            return Err(ApiError::bad_request(
                "specifying resource version is not allowed when using continue",
            ));
        }
        let token = decode(token).ok_or_else(|| {
            ApiError::bad_request("continue key is not valid: not a token this server issued")
        })?;
        if token.rv < history_from {
            return Err(ApiError::gone(
                "The provided continue parameter is too old to display a consistent list \
                 result. You can start a new list without the continue parameter.",
            ));
        }
        Ok(Self {
            limit,
            resume: Some((
                token.rv,
                ListCursor {
                    ns: token.ns,
                    name: token.name,
                },
            )),
        })
    }

    /// The cursor to resume after, if this continues a list.
    pub fn after(&self) -> Option<&ListCursor> {
        self.resume.as_ref().map(|(_, c)| c)
    }

    /// The resourceVersion the list reports: the first page's for continued lists.
    pub fn list_rv(&self, current: u64) -> u64 {
        self.resume.as_ref().map_or(current, |(rv, _)| *rv)
    }
}

/// The token that resumes a list at `rv` after the object `last`.
pub(crate) fn encode(rv: u64, last: &ListCursor) -> String {
    let token = Token {
        v: TOKEN_FORMAT.into(),
        rv,
        ns: last.ns.clone(),
        name: last.name.clone(),
    };
    // A struct of strings and a number always serializes.
    let json = serde_json::to_vec(&token).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(json)
}

fn decode(token: &str) -> Option<Token> {
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    let token: Token = serde_json::from_slice(&bytes).ok()?;
    (token.v == TOKEN_FORMAT).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(ns: &str, name: &str) -> ListCursor {
        ListCursor {
            ns: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn a_token_resumes_after_the_key_and_at_the_version_it_was_issued_for() {
        let token = encode(42, &cursor("default", "vm-7"));
        let req = PageRequest::parse(Some("10"), Some(&token), None, 0).expect("parses");
        assert_eq!(req.limit, Some(10));
        assert_eq!(req.after(), Some(&cursor("default", "vm-7")));
        assert_eq!(req.list_rv(99), 42);
    }

    #[test]
    fn limit_zero_or_absent_means_everything() {
        for limit in [None, Some("0")] {
            let req = PageRequest::parse(limit, None, None, 0).expect("parses");
            assert_eq!(req, PageRequest::default());
        }
    }

    #[test]
    fn a_list_at_any_version_comes_whole_as_from_the_watch_cache() {
        let req = PageRequest::parse(Some("500"), None, Some("0"), 0).expect("parses");
        assert_eq!(req.limit, None);
    }

    #[test]
    fn a_negative_or_textual_limit_is_a_bad_request() {
        for limit in ["-1", "ten"] {
            let err = PageRequest::parse(Some(limit), None, None, 0).unwrap_err();
            assert_eq!(err.code, 400, "{limit}");
        }
    }

    #[test]
    fn a_token_this_server_did_not_issue_is_a_bad_request() {
        let foreign = URL_SAFE_NO_PAD.encode(br#"{"v":"meta.k8s.io/v1","rv":1,"start":"x"}"#);
        for token in ["not base64!", foreign.as_str()] {
            let err = PageRequest::parse(None, Some(token), None, 0).unwrap_err();
            assert_eq!(err.code, 400, "{token}");
        }
    }

    #[test]
    fn a_token_older_than_the_history_is_expired() {
        let token = encode(5, &cursor("", "a"));
        let err = PageRequest::parse(None, Some(&token), None, 6).unwrap_err();
        assert_eq!((err.code, err.reason), (410, "Expired"));
    }

    #[test]
    fn continue_with_a_resource_version_is_a_bad_request() {
        let token = encode(5, &cursor("", "a"));
        let err = PageRequest::parse(None, Some(&token), Some("5"), 0).unwrap_err();
        assert_eq!(err.code, 400);
    }
}
