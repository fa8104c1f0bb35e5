//! The guest agent abstraction the shim's handlers call. Backends: [`super::libvirt`] and
//! [`super::qga`]. Arguments are the validated types of [`super::validate`], so input checks
//! cannot be skipped by a backend.

use async_trait::async_trait;

use crate::api::validate::{Password, PublicKeys, UserName, ValidDomain};
use crate::api::wire::{ProbeResponse, ShimError};

#[async_trait]
pub trait GuestAgent: Send + Sync + 'static {
    /// Agent version, enabled commands and OS info. A domain whose agent is not connected
    /// answers `Ok` with `agent_connected: false`.
    async fn probe(&self, domain: &ValidDomain) -> Result<ProbeResponse, ShimError>;

    async fn set_password(
        &self,
        domain: &ValidDomain,
        user: &UserName,
        password: &Password,
    ) -> Result<(), ShimError>;

    /// The user's authorized keys; empty when the user has no authorized_keys file.
    async fn get_ssh_keys(
        &self,
        domain: &ValidDomain,
        user: &UserName,
    ) -> Result<Vec<String>, ShimError>;

    /// Append `keys` (duplicates are skipped by the agent); with `reset`, replace the file.
    async fn add_ssh_keys(
        &self,
        domain: &ValidDomain,
        user: &UserName,
        keys: &PublicKeys,
        reset: bool,
    ) -> Result<(), ShimError>;

    async fn remove_ssh_keys(
        &self,
        domain: &ValidDomain,
        user: &UserName,
        keys: &PublicKeys,
    ) -> Result<(), ShimError>;

    /// Whether the backend can serve requests at all (for `/readyz`).
    async fn ready(&self) -> Result<(), ShimError> {
        Ok(())
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
