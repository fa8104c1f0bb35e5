//! The parts of KubeVirt's `kubevirt.io/v1` VirtualMachine and VirtualMachineInstance that
//! guestcred reads. Unknown fields are kept (`rest`) so a read-modify-write never drops them.
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// `status.guestOSInfo`: what the guest agent reports (`guest-get-osinfo`), the same
/// fields the shim's probe returns.
pub use super::wire::GuestOsInfo;

/// Annotation on a VM naming the guest admin user (the analog of Nova's `os_admin_user`).
pub const ADMIN_USER_ANNOTATION: &str = "guestcred.io/admin-user";

/// A `kubevirt.io/v1` kind guestcred reads only in part: its spec keeps every field
/// (`rest`), so a read-modify-write never drops one. No schema: KubeVirt installs the CRD.
macro_rules! kubevirt_kind {
    ($(#[$doc:meta])* $spec:ident: $kind:tt, $plural:tt, $short:tt, status $status:tt) => {
        $(#[$doc])*
        #[derive(CustomResource, Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
        #[kube(
            group = "kubevirt.io",
            version = "v1",
            kind = $kind,
            plural = $plural,
            shortname = $short,
            namespaced,
            status = $status,
            schema = "disabled"
        )]
        pub struct $spec {
            #[serde(flatten)]
            pub rest: BTreeMap<String, Value>,
        }
    };
}

kubevirt_kind! {
    /// VirtualMachineInstance: a running VM.
    VmiSpec: "VirtualMachineInstance", "virtualmachineinstances", "vmi", status "VmiStatus"
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmiStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Pending, Scheduling, Scheduled, Running, Succeeded, Failed, Unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Launcher pod UID → node name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub active_pods: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<VmiCondition>,
    #[serde(
        rename = "guestOSInfo",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub guest_os_info: Option<GuestOsInfo>,
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmiCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl VirtualMachineInstance {
    pub fn is_running(&self) -> bool {
        self.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    }
    pub fn node_name(&self) -> Option<&str> {
        self.status.as_ref().and_then(|s| s.node_name.as_deref())
    }
    pub fn agent_connected(&self) -> bool {
        self.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "AgentConnected" && c.status == "True")
        })
    }
    /// True when KubeVirt reports a Windows guest.
    pub fn is_windows(&self) -> bool {
        self.status
            .as_ref()
            .and_then(|s| s.guest_os_info.as_ref())
            .and_then(|o| o.id.as_deref().or(o.name.as_deref()))
            .is_some_and(|id| id.to_ascii_lowercase().contains("windows") || id == "mswindows")
    }
    /// The launcher pod on the VMI's current node (KubeVirt's per-VM virtqemud lives there).
    pub fn launcher_pod_uid(&self) -> Option<&str> {
        let status = self.status.as_ref()?;
        let node = status.node_name.as_deref()?;
        status
            .active_pods
            .iter()
            .find(|(_, n)| n.as_str() == node)
            .map(|(uid, _)| uid.as_str())
    }
}

kubevirt_kind! {
    /// VirtualMachine: the VM definition (cloud-init, accessCredentials, annotations).
    VmSpec: "VirtualMachine", "virtualmachines", "vm", status "VmStatus"
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
pub struct VmStatus {
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

impl VirtualMachine {
    /// Users whose credentials KubeVirt propagates through the guest agent
    /// (`spec.template.spec.accessCredentials[].*.propagationMethod.qemuGuestAgent.users`).
    /// KubeVirt re-syncs these periodically and would overwrite our change.
    pub fn access_credential_agent_users(&self) -> Vec<String> {
        agent_users(
            self.spec
                .rest
                .get("template")
                .and_then(|t| t.pointer("/spec/accessCredentials")),
        )
    }
}

impl VirtualMachineInstance {
    /// The same for a running VMI (`spec.accessCredentials`, copied from the VM's template
    /// when the VMI was created): what KubeVirt propagates into this guest now.
    pub fn access_credential_agent_users(&self) -> Vec<String> {
        agent_users(self.spec.rest.get("accessCredentials"))
    }
}

/// The users of an `accessCredentials` list with qemuGuestAgent propagation ("*": all).
fn agent_users(creds: Option<&Value>) -> Vec<String> {
    let mut users = Vec::new();
    for cred in creds.and_then(Value::as_array).into_iter().flatten() {
        for kind in ["userPassword", "sshPublicKey"] {
            if let Some(list) = cred
                .get(kind)
                .and_then(|c| c.pointer("/propagationMethod/qemuGuestAgent/users"))
                .and_then(Value::as_array)
            {
                users.extend(list.iter().filter_map(Value::as_str).map(str::to_string));
            }
            // userPassword with qemuGuestAgent propagation has no users list: it applies
            // to the users named in the Secret's keys, which we cannot read here.
            if kind == "userPassword"
                && cred
                    .get(kind)
                    .and_then(|c| c.pointer("/propagationMethod/qemuGuestAgent"))
                    .is_some()
            {
                users.push("*".to_string());
            }
        }
    }
    users
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn creds() -> Value {
        json!([
            {"sshPublicKey": {"propagationMethod": {"qemuGuestAgent": {"users": ["alice"]}}}},
            {"userPassword": {"propagationMethod": {"qemuGuestAgent": {}}}},
            {"sshPublicKey": {"propagationMethod": {"noCloud": {}}}}
        ])
    }

    #[test]
    fn a_vm_and_its_vmi_name_the_same_agent_users() {
        let mut vm = VirtualMachine::new("vm", VmSpec::default());
        vm.spec.rest.insert(
            "template".into(),
            json!({"spec": {"accessCredentials": creds()}}),
        );
        let mut vmi = VirtualMachineInstance::new("vm", VmiSpec::default());
        vmi.spec.rest.insert("accessCredentials".into(), creds());
        let want = vec!["alice".to_string(), "*".to_string()];
        assert_eq!(vm.access_credential_agent_users(), want);
        assert_eq!(vmi.access_credential_agent_users(), want);
    }

    #[test]
    fn no_access_credentials_name_no_user() {
        let vmi = VirtualMachineInstance::new("vm", VmiSpec::default());
        assert!(vmi.access_credential_agent_users().is_empty());
    }
}
