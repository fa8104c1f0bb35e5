//! Shim wire protocol, version 1: JSON bodies exchanged between the controller and the
//! node shim (`POST /v1/...`). Field names are camelCase on the wire.
//!
//! The contract for failures is [`ShimError::reason`], not the HTTP status: the controller
//! maps reasons to condition reasons. Secrets are [`SecretString`]: serialized on purpose
//! (they must cross the wire) but never shown by `Debug`.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

/// Version segment of every shim route (`/v1/password`, ...).
pub const WIRE_VERSION: &str = "v1";

/// Route paths, shared by the server and the client so they cannot drift apart.
pub mod paths {
    pub const PASSWORD: &str = "/v1/password";
    pub const SSH_KEYS: &str = "/v1/ssh-keys";
    pub const SSH_KEYS_GET: &str = "/v1/ssh-keys/get";
    pub const PROBE: &str = "/v1/probe";
    pub const HEALTHZ: &str = "/healthz";
    pub const READYZ: &str = "/readyz";
}

/// Which VM on the shim's node a request is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DomainRef {
    pub namespace: String,
    pub name: String,
    /// UID of the virt-launcher pod; required by the `kubevirt` locator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launcher_pod_uid: Option<String>,
    /// Node the caller believes the VM runs on; a shim on another node refuses with
    /// `Forbidden` (a misrouted or replayed request never reaches a guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl DomainRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            launcher_pod_uid: None,
            node: None,
        }
    }

    pub fn with_node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }

    pub fn with_launcher_pod_uid(mut self, uid: impl Into<String>) -> Self {
        self.launcher_pod_uid = Some(uid.into());
        self
    }
}

impl std::fmt::Display for DomainRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn serialize_secret<S: Serializer>(secret: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(secret.expose_secret())
}

/// `POST /v1/password`: set `user`'s password. With `crypted`, `password` is a crypt(3)
/// hash stored verbatim; otherwise the guest hashes the plaintext.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SetPasswordRequest {
    pub domain: DomainRef,
    pub user: String,
    #[serde(serialize_with = "serialize_secret")]
    pub password: SecretString,
    #[serde(default)]
    pub crypted: bool,
}

/// Empty success body of `POST /v1/password`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetPasswordResponse {}

/// What `POST /v1/ssh-keys` does with `keys`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyOp {
    /// Append keys that are not there yet; keep the others.
    Add,
    /// Remove exactly these keys; keep the others.
    Remove,
    /// Make these keys the whole authorized_keys file.
    Replace,
}

/// `POST /v1/ssh-keys`: change `user`'s authorized keys; answers the resulting key set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SshKeysRequest {
    pub domain: DomainRef,
    pub user: String,
    pub op: KeyOp,
    pub keys: Vec<String>,
}

/// `POST /v1/ssh-keys/get`: read `user`'s authorized keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetSshKeysRequest {
    pub domain: DomainRef,
    pub user: String,
}

/// Authorized keys as the guest reports them (one OpenSSH line each, guest order).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SshKeysResponse {
    pub keys: Vec<String>,
}

/// `POST /v1/probe`: is the agent there, and what can it do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeRequest {
    pub domain: DomainRef,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResponse {
    pub agent_connected: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Enabled agent commands (disabled ones are left out).
    #[serde(default)]
    pub supported_commands: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<GuestOsInfo>,
}

impl ProbeResponse {
    /// Whether the agent can do live SSH key changes (`guest-ssh-*`).
    pub fn supports_ssh_keys(&self) -> bool {
        [
            "guest-ssh-get-authorized-keys",
            "guest-ssh-add-authorized-keys",
            "guest-ssh-remove-authorized-keys",
        ]
        .iter()
        .all(|c| self.supported_commands.iter().any(|s| s == c))
    }

    pub fn supports_set_password(&self) -> bool {
        self.supported_commands
            .iter()
            .any(|s| s == "guest-set-user-password")
    }
}

/// Subset of QGA `guest-get-osinfo`: the shim's probe returns it, and KubeVirt reports it
/// in a VMI's `status.guestOSInfo` (hence `JsonSchema`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestOsInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretty_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
}

/// Why a shim call failed. CamelCase on the wire; this is the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ShimErrorReason {
    AgentNotConnected,
    /// Unknown outcome: the guest may still apply the call when its agent wakes up.
    AgentTimeout,
    UserNotFound,
    /// The user exists but has no home directory, so it cannot hold authorized_keys.
    UserHomeMissing,
    DomainNotFound,
    DomainNotRunning,
    /// The agent lacks (or has disabled) the command.
    Unsupported,
    InvalidArgument,
    Unauthenticated,
    Forbidden,
    Internal,
}

impl ShimErrorReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AgentNotConnected => "AgentNotConnected",
            Self::AgentTimeout => "AgentTimeout",
            Self::UserNotFound => "UserNotFound",
            Self::UserHomeMissing => "UserHomeMissing",
            Self::DomainNotFound => "DomainNotFound",
            Self::DomainNotRunning => "DomainNotRunning",
            Self::Unsupported => "Unsupported",
            Self::InvalidArgument => "InvalidArgument",
            Self::Unauthenticated => "Unauthenticated",
            Self::Forbidden => "Forbidden",
            Self::Internal => "Internal",
        }
    }

    /// Advisory HTTP status for the reason (clients must read the reason, not this).
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidArgument => 400,
            Self::Unauthenticated => 401,
            Self::Forbidden => 403,
            Self::DomainNotFound | Self::UserNotFound => 404,
            Self::UserHomeMissing => 422,
            Self::DomainNotRunning | Self::AgentNotConnected => 409,
            Self::Unsupported => 501,
            Self::AgentTimeout => 504,
            Self::Internal => 500,
        }
    }
}

impl std::fmt::Display for ShimErrorReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error body of every failed shim call. `message` never contains a secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct ShimError {
    pub reason: ShimErrorReason,
    pub message: String,
}

impl ShimError {
    pub fn new(reason: ShimErrorReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ShimErrorReason::InvalidArgument, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ShimErrorReason::Internal, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn password_request(secret: &str) -> SetPasswordRequest {
        SetPasswordRequest {
            domain: DomainRef::new("ns", "vm"),
            user: "root".into(),
            password: SecretString::from(secret),
            crypted: false,
        }
    }

    #[test]
    fn password_request_debug_does_not_show_the_password() {
        let shown = format!("{:?}", password_request("hunter2-secret"));
        assert!(!shown.contains("hunter2-secret"), "{shown}");
    }

    #[test]
    fn password_request_round_trips_with_the_password_on_the_wire() {
        let json = serde_json::to_value(password_request("s3cret")).unwrap();
        assert_eq!(json["password"], "s3cret");
        assert_eq!(json["domain"]["namespace"], "ns");
        let back: SetPasswordRequest = serde_json::from_value(json).unwrap();
        assert_eq!(back.password.expose_secret(), "s3cret");
    }

    #[test]
    fn error_reasons_are_camel_case_on_the_wire() {
        let e = ShimError::new(ShimErrorReason::AgentNotConnected, "x");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["reason"], "AgentNotConnected");
        assert_eq!(ShimErrorReason::AgentTimeout.as_str(), "AgentTimeout");
    }

    #[test]
    fn key_op_is_lowercase_on_the_wire() {
        let op: KeyOp = serde_json::from_str("\"replace\"").unwrap();
        assert_eq!(op, KeyOp::Replace);
    }

    #[test]
    fn domain_ref_uses_camel_case_launcher_pod_uid() {
        let d = DomainRef::new("a", "b").with_launcher_pod_uid("u-1");
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["launcherPodUid"], "u-1");
    }
}
