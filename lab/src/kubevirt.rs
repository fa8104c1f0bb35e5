//! kubevirt-lite, part 1: KubeVirt's CRDs as the lab installs them, and small builders for
//! the objects KubeVirt (and kubelet) would create: Nodes, launcher Pods, VMs, VMIs and shim
//! Pods. Tests and `guestcred-lab up` build their world from these.
use guestcred::api::kubevirt::{
    GuestOsInfo, VirtualMachine, VirtualMachineInstance, VmiCondition, VmiStatus,
};
use guestcred::controller::shims::{DEFAULT_SHIM_DAEMONSET, SHIM_POD_SELECTOR};
use k8s_openapi::api::core::v1::{Node, Pod, PodSpec, PodStatus};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// A permissive CRD for one KubeVirt kind (the lab does not validate KubeVirt's schema).
fn kubevirt_crd(kind: &str, plural: &str, short: &str) -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.kubevirt.io")},
        "spec": {
            "group": "kubevirt.io",
            "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(),
                      "shortNames": [short], "categories": ["all"]},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Node", "type": "string", "jsonPath": ".status.nodeName"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
                ]
            }]
        }
    }))
    .expect("static CRD is valid")
}

/// KubeVirt's VirtualMachine and VirtualMachineInstance CRDs.
pub fn kubevirt_crds() -> Vec<CustomResourceDefinition> {
    vec![
        kubevirt_crd("VirtualMachine", "virtualmachines", "vm"),
        kubevirt_crd("VirtualMachineInstance", "virtualmachineinstances", "vmi"),
    ]
}

/// Apply CRDs (guestcred's and KubeVirt's) and wait until each is Established.
pub async fn install_crds(client: &Client) -> kube::Result<()> {
    let mut all: Vec<CustomResourceDefinition> =
        guestcred::api::crds().into_iter().map(|(_, c)| c).collect();
    all.extend(kubevirt_crds());
    // The emulator establishes a CRD as it stores it: nothing to report after 2 s.
    apply_crds(client, &all, Duration::from_secs(2)).await?;
    Ok(())
}

/// Applies `crds` (server-side apply, as `kubectl apply --server-side`), then waits until
/// each is Established: `None` when all are, else the name of the first that was not
/// within `timeout`.
pub(crate) async fn apply_crds(
    client: &Client,
    crds: &[CustomResourceDefinition],
    timeout: Duration,
) -> kube::Result<Option<String>> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply("guestcred-lab").force();
    for crd in crds {
        api.patch(&crd.name_any(), &pp, &Patch::Apply(crd)).await?;
    }
    let deadline = tokio::time::Instant::now() + timeout;
    for crd in crds {
        loop {
            let c = api.get(&crd.name_any()).await?;
            let established = c.status.and_then(|s| s.conditions).is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Some(crd.name_any()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(None)
}

/// A Node object.
pub fn node(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/hostname".to_string(), name.to_string()),
                ("kubevirt.io/schedulable".to_string(), "true".to_string()),
            ])),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A Running pod on `node` with `pod_ip`.
fn running_pod(
    ns: &str,
    name: &str,
    node: &str,
    pod_ip: &str,
    labels: BTreeMap<String, String>,
) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            // A Pod needs a container (the API server refuses one without); it never runs.
            containers: vec![k8s_openapi::api::core::v1::Container {
                name: "shim".into(),
                image: Some("guestcred:lab".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(pod_ip.into()),
            host_ip: Some(pod_ip.into()),
            ..Default::default()
        }),
    }
}

/// The shim DaemonSet's pod on `node`, with the labels the chart uses.
pub fn shim_pod(ns: &str, node: &str, pod_ip: &str) -> Pod {
    let labels = SHIM_POD_SELECTOR
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut pod = running_pod(ns, &format!("guestcred-shim-{node}"), node, pod_ip, labels);
    // Owned by the chart's DaemonSet, as kube-controller-manager makes them: the controller
    // calls only pods of the shim DaemonSet. (No DaemonSet object is needed: the emulator
    // collects dependents only when an owner is deleted.)
    pod.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "apps/v1".into(),
        kind: "DaemonSet".into(),
        name: DEFAULT_SHIM_DAEMONSET.into(),
        uid: LAB_SHIM_DAEMONSET_UID.into(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    pod
}

/// The uid the lab's shim pods name for their (absent) DaemonSet.
pub const LAB_SHIM_DAEMONSET_UID: &str = "00000000-0000-4000-8000-00000000d5e7";

/// Description of a lab VM as KubeVirt would show it.
#[derive(Clone, Debug)]
pub struct VmDescription {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub phase: String,
    pub agent_connected: bool,
    pub os_id: String,
    /// Users for which the VM declares KubeVirt accessCredentials with agent propagation.
    pub access_credential_users: Vec<String>,
}

/// A running VM named `name` on `node` in `ns`, Linux guest with a connected agent.
pub fn vm(ns: &str, name: &str, node: &str) -> VmDescription {
    VmDescription {
        namespace: ns.into(),
        name: name.into(),
        node: node.into(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        phase: "Running".into(),
        agent_connected: true,
        os_id: "debian".into(),
        access_credential_users: Vec::new(),
    }
}

/// 16 bytes in the `8-4-4-4-12` lowercase-hex form of Kubernetes UIDs.
pub(crate) fn uid_string(bytes: [u8; 16]) -> String {
    let h = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl VmDescription {
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }
    pub fn annotation(mut self, k: &str, v: &str) -> Self {
        self.annotations.insert(k.into(), v.into());
        self
    }
    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = phase.into();
        self
    }
    pub fn os(mut self, id: &str) -> Self {
        self.os_id = id.into();
        self
    }
    pub fn access_credentials_for(mut self, user: &str) -> Self {
        self.access_credential_users.push(user.into());
        self
    }

    /// The launcher pod UID KubeVirt would record in `status.activePods`.
    pub fn launcher_uid(&self) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(format!("{}/{}", self.namespace, self.name));
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        uid_string(bytes)
    }

    pub fn vm_object(&self) -> VirtualMachine {
        let mut spec = BTreeMap::new();
        let mut template_spec = json!({"domain": {"devices": {}}});
        if let Some(creds) = self.access_credentials() {
            template_spec["accessCredentials"] = creds;
        }
        spec.insert("running".to_string(), json!(true));
        spec.insert(
            "template".to_string(),
            json!({"metadata": {"labels": self.labels}, "spec": template_spec}),
        );
        let mut vm =
            VirtualMachine::new(&self.name, guestcred::api::kubevirt::VmSpec { rest: spec });
        vm.metadata.namespace = Some(self.namespace.clone());
        vm.metadata.labels = Some(self.labels.clone());
        vm.metadata.annotations = Some(self.annotations.clone());
        vm
    }

    /// `accessCredentials` as the VM's template declares them, and as KubeVirt copies them
    /// into the spec of the VMI it starts.
    fn access_credentials(&self) -> Option<serde_json::Value> {
        (!self.access_credential_users.is_empty()).then(|| {
            json!([{
                "sshPublicKey": {
                    "source": {"secret": {"secretName": "kubevirt-managed-keys"}},
                    "propagationMethod": {"qemuGuestAgent": {"users": self.access_credential_users}}
                }
            }])
        })
    }

    pub fn vmi_object(&self) -> VirtualMachineInstance {
        let mut vmi = VirtualMachineInstance::new(&self.name, Default::default());
        if let Some(creds) = self.access_credentials() {
            vmi.spec.rest.insert("accessCredentials".into(), creds);
        }
        vmi.metadata.namespace = Some(self.namespace.clone());
        vmi.metadata.labels = Some(self.labels.clone());
        vmi.status = Some(self.vmi_status());
        vmi
    }

    pub fn vmi_status(&self) -> VmiStatus {
        let running = self.phase == "Running";
        VmiStatus {
            node_name: Some(self.node.clone()),
            phase: Some(self.phase.clone()),
            active_pods: if running {
                BTreeMap::from([(self.launcher_uid(), self.node.clone())])
            } else {
                BTreeMap::new()
            },
            conditions: vec![VmiCondition {
                type_: "AgentConnected".into(),
                status: if self.agent_connected && running {
                    "True"
                } else {
                    "False"
                }
                .into(),
                reason: None,
                message: None,
            }],
            guest_os_info: Some(GuestOsInfo {
                id: Some(self.os_id.clone()),
                name: Some(self.os_id.clone()),
                ..Default::default()
            }),
            rest: BTreeMap::new(),
        }
    }

    /// Create the VM and its VMI (with status) in the API server.
    pub async fn create(&self, client: &Client) -> kube::Result<()> {
        let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), &self.namespace);
        vms.create(&PostParams::default(), &self.vm_object())
            .await?;
        self.create_without_vm(client).await
    }

    /// Create only the VMI (with status): a VMI started without a VirtualMachine, as
    /// `kubectl create -f vmi.yaml` does in KubeVirt.
    pub async fn create_without_vm(&self, client: &Client) -> kube::Result<()> {
        let vmis: Api<VirtualMachineInstance> = Api::namespaced(client.clone(), &self.namespace);
        vmis.create(&PostParams::default(), &self.vmi_object())
            .await?;
        let status = json!({"status": self.vmi_status()});
        vmis.patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(())
    }
}

/// Create a Node, and a shim Pod on it in `shim_ns` with `pod_ip`.
pub async fn create_node_with_shim(
    client: &Client,
    node_name: &str,
    shim_ns: &str,
    pod_ip: &str,
) -> kube::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(&PostParams::default(), &node(node_name))
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), shim_ns);
    let pod = shim_pod(shim_ns, node_name, pod_ip);
    let name = pod.name_any();
    pods.create(&PostParams::default(), &pod).await?;
    let status = json!({"status": pod.status});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_string_is_lowercase_hex_in_8_4_4_4_12_groups() {
        let bytes: [u8; 16] = std::array::from_fn(|i| i as u8 * 17);
        assert_eq!(uid_string(bytes), "00112233-4455-6677-8899-aabbccddeeff");
    }

    #[test]
    fn launcher_uid_is_the_vms_namespaced_name_hashed() {
        // The first 16 bytes of SHA-256("default/vm-1-1").
        let uid = vm("default", "vm-1-1", "node-1").launcher_uid();
        assert_eq!(uid, "ca69e3e9-2d23-2fe7-277c-587ea46662ed");
        assert_ne!(uid, vm("default", "vm-1-2", "node-1").launcher_uid());
    }
}
