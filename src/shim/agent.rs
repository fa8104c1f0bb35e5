//! The guest agent abstraction the shim's handlers call. Backends: [`super::libvirt`] and
//! [`super::qga`]. Arguments are the validated types of [`super::validate`], so input checks
//! cannot be skipped by a backend.

use async_trait::async_trait;

use super::errors::{self, UserCheck};
use crate::api::validate::{Password, PublicKeys, UserName, ValidDomain};
use crate::api::wire::{ProbeResponse, ShimError, ShimErrorReason};

/// One request to a guest agent. Backends implement [`GuestAgent::execute`] for all of them
/// in one place; callers use the typed methods of [`GuestAgent`], which build these.
#[derive(Clone, Copy)]
pub enum AgentCall<'a> {
    /// Agent version, enabled commands and OS info.
    Probe,
    SetPassword {
        user: &'a UserName,
        password: &'a Password,
    },
    /// The user's authorized keys.
    GetSshKeys { user: &'a UserName },
    /// Append `keys` (duplicates are skipped by the agent); with `reset`, replace the file.
    AddSshKeys {
        user: &'a UserName,
        keys: &'a PublicKeys,
        reset: bool,
    },
    RemoveSshKeys {
        user: &'a UserName,
        keys: &'a PublicKeys,
    },
}

impl AgentCall<'_> {
    /// The operation's name in metrics.
    pub fn operation(&self) -> &'static str {
        match self {
            Self::Probe => "probe",
            Self::SetPassword { .. } => "set-password",
            Self::GetSshKeys { .. } => "get-ssh-keys",
            Self::AddSshKeys { reset: true, .. } => "replace-ssh-keys",
            Self::AddSshKeys { .. } => "add-ssh-keys",
            Self::RemoveSshKeys { .. } => "remove-ssh-keys",
        }
    }
}

/// A backend's answer to an [`AgentCall`]: `Probe` to a probe, `Keys` to `GetSshKeys`,
/// `Done` to the others.
#[derive(Debug)]
pub enum AgentReply {
    Probe(ProbeResponse),
    Keys(Vec<String>),
    Done,
}

impl AgentReply {
    fn mismatch(self, call: AgentCall<'_>) -> ShimError {
        let operation = call.operation();
        ShimError::internal(format!("agent backend answered {operation} with {self:?}"))
    }

    fn done(self, call: AgentCall<'_>) -> Result<(), ShimError> {
        match self {
            Self::Done => Ok(()),
            other => Err(other.mismatch(call)),
        }
    }
}

#[async_trait]
pub trait GuestAgent: Send + Sync + 'static {
    /// Carry out `call` on the agent of `domain`.
    async fn execute(
        &self,
        domain: &ValidDomain,
        call: AgentCall<'_>,
    ) -> Result<AgentReply, ShimError>;

    /// Whether the backend can serve requests at all (for `/readyz`).
    async fn ready(&self) -> Result<(), ShimError> {
        Ok(())
    }

    /// Agent version, enabled commands and OS info. A domain whose agent is not connected
    /// answers `Ok` with `agent_connected: false`.
    async fn probe(&self, domain: &ValidDomain) -> Result<ProbeResponse, ShimError> {
        match self.execute(domain, AgentCall::Probe).await? {
            AgentReply::Probe(probe) => Ok(probe),
            other => Err(other.mismatch(AgentCall::Probe)),
        }
    }

    async fn set_password(
        &self,
        domain: &ValidDomain,
        user: &UserName,
        password: &Password,
    ) -> Result<(), ShimError> {
        let call = AgentCall::SetPassword { user, password };
        self.execute(domain, call).await?.done(call)
    }

    /// The user's authorized keys; empty when the user has no authorized_keys file.
    async fn get_ssh_keys(
        &self,
        domain: &ValidDomain,
        user: &UserName,
    ) -> Result<Vec<String>, ShimError> {
        let call = AgentCall::GetSshKeys { user };
        match self.execute(domain, call).await? {
            AgentReply::Keys(keys) => Ok(keys),
            other => Err(other.mismatch(call)),
        }
    }

    /// Append `keys` (duplicates are skipped by the agent); with `reset`, replace the file.
    async fn add_ssh_keys(
        &self,
        domain: &ValidDomain,
        user: &UserName,
        keys: &PublicKeys,
        reset: bool,
    ) -> Result<(), ShimError> {
        let call = AgentCall::AddSshKeys { user, keys, reset };
        self.execute(domain, call).await?.done(call)
    }

    async fn remove_ssh_keys(
        &self,
        domain: &ValidDomain,
        user: &UserName,
        keys: &PublicKeys,
    ) -> Result<(), ShimError> {
        let call = AgentCall::RemoveSshKeys { user, keys };
        self.execute(domain, call).await?.done(call)
    }
}

/// The agent errors that both real backends (libvirt and qga-socket) turn into answers, in
/// one place: no agent on the channel is a probe answer (`agent_connected: false`); a user
/// without an authorized_keys file has no keys and nothing to remove; a failed password
/// set that looks like an unknown user is confirmed with a read-only key lookup (see
/// [`errors::password_failure`]).
pub async fn settle<A: GuestAgent + ?Sized>(
    agent: &A,
    domain: &ValidDomain,
    call: AgentCall<'_>,
    result: Result<AgentReply, ShimError>,
) -> Result<AgentReply, ShimError> {
    let Err(e) = result else {
        return result;
    };
    match call {
        AgentCall::Probe if e.reason == ShimErrorReason::AgentNotConnected => {
            Ok(AgentReply::Probe(ProbeResponse::default()))
        }
        AgentCall::GetSshKeys { .. } if errors::is_missing_authorized_keys(&e.message) => {
            Ok(AgentReply::Keys(Vec::new()))
        }
        AgentCall::RemoveSshKeys { .. } if errors::is_missing_authorized_keys(&e.message) => {
            Ok(AgentReply::Done)
        }
        AgentCall::SetPassword { user, .. } if e.reason == ShimErrorReason::UserNotFound => {
            let check = UserCheck::from_get_keys(&agent.get_ssh_keys(domain, user).await);
            Err(errors::password_failure(e, check))
        }
        _ => Err(e),
    }
}

/// Expand `{namespace}` and `{name}` in a domain-name or socket-path template.
pub fn expand_template(template: &str, domain: &ValidDomain) -> String {
    template
        .replace("{namespace}", domain.namespace())
        .replace("{name}", domain.name())
}

/// Characters of the names a template's `{namespace}` and `{name}` expand to (see
/// `api::validate::domain`): lowercase letters, digits, '-' and '.'.
fn name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'
}

/// Refuse a template under which two VMs of the same name in different namespaces could
/// meet: it must contain both `{namespace}` and `{name}`, separated by at least one
/// character no name can contain (such as `/` or `_`), so that `ns-a/db` and `ns-b/db`
/// (or `a-b`/`c` and `a`/`b-c`) always expand to different paths.
pub fn check_template(flag: &str, template: &str) -> Result<(), String> {
    let (Some(ns), Some(name)) = (template.find("{namespace}"), template.find("{name}")) else {
        return Err(format!(
            "{flag} {template:?} must contain both {{namespace}} and {{name}}: VMs of the same name in different namespaces must never reach the same guest"
        ));
    };
    let between = if ns < name {
        &template[ns + "{namespace}".len()..name]
    } else {
        &template[name + "{name}".len()..ns]
    };
    if !between.chars().any(|c| !name_char(c)) {
        return Err(format!(
            "{flag} {template:?}: separate {{namespace}} and {{name}} with a character no Kubernetes name contains, such as '/' or '_' (e.g. {{namespace}}/{{name}}.qga); otherwise different VMs can expand to the same path"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::validate;
    use crate::api::wire::DomainRef;

    #[test]
    fn template_expands_namespace_and_name() {
        let d = validate::domain(&DomainRef::new("prod", "db-0")).unwrap();
        assert_eq!(expand_template("{namespace}_{name}", &d), "prod_db-0");
        assert_eq!(
            expand_template("/var/run/qemu-server/{name}.qga", &d),
            "/var/run/qemu-server/db-0.qga"
        );
    }
}
