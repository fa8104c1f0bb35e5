//! The parts of KubeVirt's `kubevirt.io/v1` VirtualMachine and VirtualMachineInstance that
//! guestcred reads. Unknown fields are kept (`rest`) so a read-modify-write never drops them.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
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

/// The VMI phase in which a guest agent can answer: the only phase guestcred calls in.
pub const RUNNING_PHASE: &str = "Running";

impl VirtualMachineInstance {
    pub fn is_running(&self) -> bool {
        self.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(RUNNING_PHASE)
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

/// A VMI as one agent call reads it: decoded with only the fields a call uses (see
/// [`VmiForCall::into_vmi`]). On a real API server a VMI carries `metadata.managedFields`
/// (one JSON tree per field manager) and KubeVirt's large spec and status (domain, devices,
/// volumes, interfaces, migration state); decoding all of it into `Value` trees for every
/// target was the largest part of a target's fresh VMI read in bench P6. Unknown fields
/// are skipped by the parser without being built. Read-only: what it yields lacks fields,
/// so it is never written back (guestcred writes no VMI).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct VmiForCall {
    #[serde(default)]
    metadata: MetaForCall,
    #[serde(default)]
    spec: VmiSpecForCall,
    #[serde(default)]
    status: Option<VmiStatusForCall>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaForCall {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    generation: Option<i64>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
    creation_timestamp: Option<Time>,
    deletion_timestamp: Option<Time>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VmiSpecForCall {
    access_credentials: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VmiStatusForCall {
    node_name: Option<String>,
    phase: Option<String>,
    #[serde(default)]
    active_pods: BTreeMap<String, String>,
    #[serde(default)]
    conditions: Vec<VmiCondition>,
    #[serde(rename = "guestOSInfo")]
    guest_os_info: Option<GuestOsInfo>,
}

impl VmiForCall {
    /// The VMI's name ("" when the server sent none).
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }
    /// The resourceVersion it was read at.
    pub fn resource_version(&self) -> Option<&str> {
        self.metadata.resource_version.as_deref()
    }
    /// The VMI with what was read: metadata without managed fields, owner references or
    /// finalizers, a spec holding only `accessCredentials`, a status without `rest`.
    /// Every [`VirtualMachineInstance`] method answers on it as on the full object.
    pub fn into_vmi(self) -> VirtualMachineInstance {
        let m = self.metadata;
        let mut vmi = VirtualMachineInstance::new(&m.name.unwrap_or_default(), VmiSpec::default());
        vmi.metadata.namespace = m.namespace;
        vmi.metadata.uid = m.uid;
        vmi.metadata.resource_version = m.resource_version;
        vmi.metadata.generation = m.generation;
        vmi.metadata.labels = m.labels;
        vmi.metadata.annotations = m.annotations;
        vmi.metadata.creation_timestamp = m.creation_timestamp;
        vmi.metadata.deletion_timestamp = m.deletion_timestamp;
        if let Some(creds) = self.spec.access_credentials {
            vmi.spec.rest.insert("accessCredentials".into(), creds);
        }
        vmi.status = self.status.map(|s| VmiStatus {
            node_name: s.node_name,
            phase: s.phase,
            active_pods: s.active_pods,
            conditions: s.conditions,
            guest_os_info: s.guest_os_info,
            rest: BTreeMap::new(),
        });
        vmi
    }
}

/// One page of a VMI LIST as resolving a selector reads it: each VMI's name and phase, and
/// the page's continue token. kube's `ObjectList` is flattened (`types`), so serde buffers a
/// whole page as generic content before building it, and each item would be a full VMI with
/// managed fields: a fleet of 100,000 VMIs listed 107 MB on a real API server (bench P6).
#[derive(Debug, Default, Deserialize)]
pub struct VmiNamePage {
    #[serde(default)]
    metadata: ListMeta,
    /// `null` on an empty page from some servers.
    #[serde(default)]
    items: Option<Vec<VmiName>>,
}

#[derive(Debug, Default, Deserialize)]
struct VmiName {
    #[serde(default)]
    metadata: NameOnly,
    #[serde(default)]
    status: Option<PhaseOnly>,
}

#[derive(Debug, Default, Deserialize)]
struct NameOnly {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct PhaseOnly {
    #[serde(default)]
    phase: Option<String>,
}

impl VmiNamePage {
    /// The names of the page's Running VMIs (as [`VirtualMachineInstance::is_running`]).
    pub fn running_names(&self) -> impl Iterator<Item = &str> {
        self.items.iter().flatten().filter_map(|vmi| {
            let running =
                vmi.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(RUNNING_PHASE);
            vmi.metadata.name.as_deref().filter(|_| running)
        })
    }
    /// The token for the next page; None on the last (kube-apiserver's may be empty).
    pub fn next_page(&self) -> Option<&str> {
        self.metadata.next_page()
    }
}

/// One page of a VMI LIST read as [`VmiForCall`]s (a fleet run's VMI feed): the items, the
/// page's continue token and the resourceVersion a watch continues from.
#[derive(Debug, Default, Deserialize)]
pub struct VmiCallPage {
    #[serde(default)]
    metadata: ListMeta,
    /// `null` on an empty page from some servers.
    #[serde(default)]
    items: Option<Vec<VmiForCall>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    #[serde(default, rename = "continue")]
    continue_: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
}

impl ListMeta {
    /// The token for the next page; None on the last (kube-apiserver's may be empty).
    fn next_page(&self) -> Option<&str> {
        self.continue_.as_deref().filter(|c| !c.is_empty())
    }
}

impl VmiCallPage {
    /// The token for the next page; None on the last (kube-apiserver's may be empty).
    pub fn next_page(&self) -> Option<&str> {
        self.metadata.next_page()
    }
    /// The list's resourceVersion: a watch from it sees every change after the list.
    pub fn resource_version(&self) -> Option<&str> {
        self.metadata.resource_version.as_deref()
    }
    /// The page's VMIs.
    pub fn into_items(self) -> Vec<VmiForCall> {
        self.items.unwrap_or_default()
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

    /// A VMI as a real API server answers a GET: managed fields, KubeVirt's spec and
    /// status beyond what guestcred reads.
    fn served_vmi() -> Value {
        json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {
                "name": "vm-1", "namespace": "prod", "uid": "u-1", "resourceVersion": "42",
                "generation": 3, "creationTimestamp": "2026-12-01T10:00:00Z",
                "deletionTimestamp": "2026-12-01T11:00:00Z",
                "labels": {"env": "prod"},
                "annotations": {ADMIN_USER_ANNOTATION: "ops"},
                "finalizers": ["kubevirt.io/virtualMachineControllerFinalize"],
                "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                    "name": "vm-1", "uid": "vm-u-1", "controller": true}],
                "managedFields": [{"manager": "virt-controller", "operation": "Update",
                    "apiVersion": "kubevirt.io/v1", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:status": {"f:phase": {}, "f:nodeName": {}}}}]
            },
            "spec": {
                "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                    "resources": {"requests": {"memory": "1Gi"}}},
                "volumes": [{"name": "root", "containerDisk": {"image": "fedora"}}],
                "accessCredentials": creds()
            },
            "status": {
                "phase": "Running", "nodeName": "node-7",
                "activePods": {"pod-old": "node-2", "pod-new": "node-7"},
                "conditions": [{"type": "AgentConnected", "status": "True"},
                    {"type": "Ready", "status": "True", "reason": "", "message": ""}],
                "guestOSInfo": {"id": "mswindows", "name": "Windows", "kernelVersion": "10"},
                "interfaces": [{"ipAddress": "10.0.0.7", "name": "default"}],
                "migrationState": {"completed": true}
            }
        })
    }

    #[test]
    fn a_vmi_read_for_a_call_answers_every_question_as_the_full_object_does() {
        let full: VirtualMachineInstance = serde_json::from_value(served_vmi()).unwrap();
        let read: VmiForCall = serde_json::from_value(served_vmi()).unwrap();
        let read = read.into_vmi();
        // The whole metadata, so that a field added to the read later is compared too;
        // only what the read leaves out on purpose is cleared from the full object's.
        let mut expected = full.metadata.clone();
        expected.managed_fields = None;
        expected.finalizers = None;
        expected.owner_references = None;
        assert_eq!(read.metadata, expected);
        assert_eq!(read.is_running(), full.is_running());
        assert_eq!(read.node_name(), full.node_name());
        assert_eq!(read.agent_connected(), full.agent_connected());
        assert_eq!(read.is_windows(), full.is_windows());
        assert_eq!(read.launcher_pod_uid(), full.launcher_pod_uid());
        assert_eq!(read.launcher_pod_uid(), Some("pod-new"));
        assert_eq!(
            read.access_credential_agent_users(),
            full.access_credential_agent_users()
        );
        assert_eq!(read.access_credential_agent_users(), vec!["alice", "*"]);
    }

    #[test]
    fn a_vmi_read_for_a_call_keeps_no_managed_fields_or_unread_spec() {
        let read: VmiForCall = serde_json::from_value(served_vmi()).unwrap();
        let read = read.into_vmi();
        assert!(read.metadata.managed_fields.is_none());
        assert_eq!(
            read.spec.rest.keys().collect::<Vec<_>>(),
            ["accessCredentials"]
        );
        assert!(read.status.is_some_and(|s| s.rest.is_empty()));
    }

    #[test]
    fn a_vmi_read_for_a_call_without_status_is_not_running() {
        let read: VmiForCall =
            serde_json::from_value(json!({"metadata": {"name": "vm-2"}, "spec": {}})).unwrap();
        let read = read.into_vmi();
        assert!(!read.is_running());
        assert_eq!(read.node_name(), None);
        assert!(read.access_credential_agent_users().is_empty());
    }

    #[test]
    fn a_name_page_lists_the_running_vmis_and_the_next_token() {
        let page: VmiNamePage = serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceList",
            "metadata": {"resourceVersion": "9", "continue": "after-c"},
            "items": [served_vmi(),
                {"metadata": {"name": "b"}, "status": {"phase": "Scheduling"}},
                {"metadata": {"name": "c"}},
                {"metadata": {"name": "d"}, "status": {"phase": "Running"}}]
        }))
        .unwrap();
        assert_eq!(page.running_names().collect::<Vec<_>>(), ["vm-1", "d"]);
        assert_eq!(page.next_page(), Some("after-c"));
    }

    #[test]
    fn a_last_name_page_has_no_next_token_and_may_have_null_items() {
        for last in [
            json!({"metadata": {"continue": ""}, "items": null}),
            json!({"metadata": {}, "items": []}),
            json!({}),
        ] {
            let page: VmiNamePage = serde_json::from_value(last).unwrap();
            assert_eq!(page.next_page(), None);
            assert_eq!(page.running_names().count(), 0);
        }
    }

    #[test]
    fn no_access_credentials_name_no_user() {
        let vmi = VirtualMachineInstance::new("vm", VmiSpec::default());
        assert!(vmi.access_credential_agent_users().is_empty());
    }
}
