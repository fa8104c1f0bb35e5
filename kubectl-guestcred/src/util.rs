//! Small shared pieces: durations, generated names, the cluster connection, and API errors
//! that say which permission is missing.
use crate::cli::Global;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde::de::DeserializeOwned;
use std::fmt;

/// Exit codes: 0 every VM succeeded; 1 a VM failed (e.g. KeyNotFound) or the API refused; 2 a
/// usage error (nothing was created); 3 --timeout passed (the run goes on);
/// 130 interrupted.
pub mod exit {
    pub const FAILED: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const TIMEOUT: i32 = 3;
    pub const INTERRUPTED: i32 = 130;
}

/// An error that carries its exit code; everything else exits [`exit::FAILED`].
#[derive(Debug)]
pub struct Exit {
    pub code: i32,
    pub message: String,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

pub fn fail(code: i32, message: impl Into<String>) -> anyhow::Error {
    Exit {
        code,
        message: message.into(),
    }
    .into()
}

/// Five characters as in Kubernetes' generateName (no vowels, no look-alikes).
pub fn random_suffix() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// `<base>-<kind>-<random5>`, at most 63 characters (the controller labels output Secrets
/// with the reset's name, and a label value has at most 63).
pub fn object_name(base: &str, kind: &str) -> String {
    let max = 63 - kind.len() - 7;
    let mut base: String = base.chars().take(max).collect();
    while base.ends_with(['-', '.']) {
        base.pop();
    }
    if base.is_empty() {
        base = "bulk".into();
    }
    format!("{base}-{kind}-{}", random_suffix())
}

/// A client from the user's kubeconfig, as kubectl finds it: `--kubeconfig`, else
/// `$KUBECONFIG` (a list, merged), else `~/.kube/config`, else the in-cluster config. The
/// namespace is `-n`, else the context's, else `default`.
pub async fn connect(g: &Global) -> anyhow::Result<(Client, String)> {
    let opts = KubeConfigOptions {
        context: g.context.clone(),
        cluster: None,
        user: None,
    };
    let config = match &g.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("reading kubeconfig {}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &opts).await?
        }
        None => match Kubeconfig::read() {
            Ok(kc) => Config::from_custom_kubeconfig(kc, &opts).await?,
            Err(e) => Config::incluster().map_err(|_| {
                anyhow::anyhow!("no kubeconfig ({e}); pass --kubeconfig or set KUBECONFIG")
            })?,
        },
    };
    let ns = g
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    Ok((Client::try_from(config)?, ns))
}

/// What an API call was doing, so a refusal can name the permission it needs.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    pub verb: &'a str,
    pub resource: &'a str,
    pub namespace: &'a str,
}

impl<'a> Call<'a> {
    /// The same resource and namespace, another verb.
    pub fn with_verb(self, verb: &'a str) -> Self {
        Call { verb, ..self }
    }
}

/// A JSON merge patch of object `name` (as `kubectl patch --type merge`); a refusal names
/// the permission to patch `call`'s resource.
pub async fn merge_patch<K>(
    api: &Api<K>,
    name: &str,
    patch: serde_json::Value,
    call: Call<'_>,
) -> anyhow::Result<()>
where
    K: Clone + DeserializeOwned + fmt::Debug,
{
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map(drop)
        .map_err(|e| call.with_verb("patch").error(e))
}

pub const RESETS: &str = "guestpasswordresets.guestcred.io";
pub const REBUILDS: &str = "keypairrebuilds.guestcred.io";
pub const SECRETS: &str = "secrets";
pub const VMIS: &str = "virtualmachineinstances.kubevirt.io";
pub const NAMESPACES: &str = "namespaces";

impl Call<'_> {
    /// Turn a kube error into a sentence; a 403 names the verb and resource to ask for.
    pub fn error(&self, e: kube::Error) -> anyhow::Error {
        let Call {
            verb,
            resource,
            namespace,
        } = *self;
        match e {
            kube::Error::Api(status) if status.code == 403 => {
                let scope = if resource == NAMESPACES {
                    "at cluster scope".to_string()
                } else {
                    format!("in namespace {namespace:?}")
                };
                let role = if resource.ends_with(".guestcred.io") {
                    " (the guestcred-editor role grants it; guestcred-viewer grants get/list/watch)"
                } else {
                    ""
                };
                anyhow::anyhow!(
                    "permission denied: you need RBAC permission to {verb} {resource} {scope}{role}\n  the API server said: {}",
                    status.message
                )
            }
            kube::Error::Api(status) if status.code == 404 => {
                anyhow::anyhow!("{}", status.message)
            }
            kube::Error::Api(status) => anyhow::anyhow!(
                "cannot {verb} {resource} in namespace {namespace:?}: {} ({})",
                status.message,
                status.code
            ),
            other => {
                anyhow::anyhow!("cannot {verb} {resource} in namespace {namespace:?}: {other}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_a_label_value() {
        let long = "a".repeat(80);
        let n = object_name(&long, "pw");
        assert_eq!(n.len(), 63, "{n}");
        let n = object_name("db-0", "pw");
        assert!(n.starts_with("db-0-pw-") && n.len() == 13, "{n}");
        assert!(object_name("x-----", "key").starts_with("x-key-"));
    }
}
