//! KeypairRebuild's Rebuild mode: OpenStack Nova's "rebuild with a new key_name" for
//! KubeVirt VMs. The user's keys go into the VM's cloud-init user data, the VM restarts
//! through KubeVirt's `restart` subresource, and once the new VMI runs with its agent
//! connected the keys are read back.
//!
//! Not a reimage: the root disk is kept. Recreating it from its source (a DataVolume's
//! import) would destroy the guest's data and is a different operation; it is not done.
//! Cloud-init applies `users[].ssh_authorized_keys` once per instance-id; KubeVirt's
//! NoCloud instance-id is stable per VM, so guests need the users module to run on every
//! boot (or a ConfigDrive with a new instance id). The lab's cloud-init stand-in does.
//!
//! # Order, and a crash at any point
//! 1. The edited user data is written: inline in the VM, or — when the VM takes it from a
//!    Secret — into a Secret guestcred creates (below).
//! 2. One VM patch points the VM at it *and* sets the marker annotation
//!    `guestcred.io/rebuild-for: <keyed hash of keys and user>/<uid of the VMI to replace>`.
//! 3. The restart is requested.
//! 4. Wait for a VMI whose uid is not the marker's, Running with its agent, and read the
//!    keys back there: verification never reads the VMI that was restarted.
//!
//! A run that finds its own marker (a controller restart, a retried attempt) does not
//! edit or restart again when the restart was delivered: the VMI's uid changed, it is
//! being deleted, or the VM still has `status.stateChangeRequests` (KubeVirt records the
//! restart there before it answers). Only a marker whose VMI still runs unchanged with no
//! request pending — a crash between 2 and 3, or a refused request — sends the restart
//! again. So a crash anywhere restarts the VM once.
//!
//! # User data from a Secret
//! A VM whose cloudInitNoCloud / cloudInitConfigDrive volume names `userDataSecretRef` or
//! `secretRef` keeps that Secret untouched: guestcred copies it (every key) into a Secret
//! of its own, `<vm>-gc-userdata-<digest of the content>`, with the edited user data,
//! owned by the VM (so it lives as long as the VM may boot from it, outlives the
//! KeypairRebuild, and goes with the VM), labelled `guestcred.io/vm` and annotated
//! `guestcred.io/user-data-from: <field>/<the user's Secret>`, and points the VM's volume
//! at it. A later rebuild edits guestcred's copy into a new one (content-addressed:
//! create-only, never an update). Undo: point the volume back at the Secret named in that
//! annotation (`kubectl edit vm`), then delete guestcred's copies.
//!
//! The user data is edited as text (`user_data`), so everything else in it, comments
//! included, stays.
mod user_data;

use super::context::Context;
use super::engine::Outcome;
use super::error::Error;
use super::keys::{WantedKey, fingerprint_of, present_fingerprints};
use super::secrets::keyed_hash;
use super::targets::{self, TargetCall};
use crate::api::keypair::KeyStrategy;
use crate::api::kubevirt::{VirtualMachine, VirtualMachineInstance};
use crate::api::{KeypairRebuild, Reason};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use sha2::Digest;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

pub use user_data::set_user_keys;

/// Annotation on the VM: `<keyed hash of the keys and user>/<uid of the VMI it replaces>`,
/// written with the edited user data before the restart (see the module docs).
pub const REBUILD_ANNOTATION: &str = "guestcred.io/rebuild-for";
/// Annotation on guestcred's copy of a user-data Secret: `<field>/<the user's Secret>`.
pub const USER_DATA_FROM_ANNOTATION: &str = "guestcred.io/user-data-from";
const CLOUD_INIT_VOLUME: &str = "cloudinitdisk";

/// A marker found on the VM.
struct Marker<'a> {
    hash: &'a str,
    /// The VMI the restart replaces ("" for markers written before it was recorded).
    from_uid: &'a str,
}

fn marker_of(vm: &VirtualMachine) -> Option<Marker<'_>> {
    let v = vm.annotations().get(REBUILD_ANNOTATION)?;
    let (hash, from_uid) = v.split_once('/').unwrap_or((v.as_str(), ""));
    Some(Marker { hash, from_uid })
}

/// KubeVirt recorded a restart (or stop/start) it has not finished.
fn restart_pending(vm: &VirtualMachine) -> bool {
    vm.status
        .as_ref()
        .and_then(|s| s.rest.get("stateChangeRequests"))
        .and_then(Value::as_array)
        .is_some_and(|r| !r.is_empty())
}

pub async fn rebuild(
    ctx: &Context,
    kr: &KeypairRebuild,
    call: &TargetCall,
    wanted: &[WantedKey],
    previously_added: &BTreeSet<String>,
) -> Result<Outcome, Error> {
    let vm = call.vm_object.as_ref().ok_or_else(|| {
        Error::InvalidSpec(format!(
            "mode Rebuild needs a VirtualMachine named {}: a bare VirtualMachineInstance cannot be restarted with new cloud-init data",
            call.vm
        ))
    })?;
    let ns = vm.namespace().unwrap_or_default();
    let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let fps: Vec<&[u8]> = wanted.iter().map(|k| k.fingerprint.as_bytes()).collect();
    let mut parts = fps;
    parts.push(call.user.as_bytes());
    let hash = keyed_hash(&kr.uid().unwrap_or_default(), &parts);
    let current_uid = call.vmi.uid().unwrap_or_default();
    let from_uid = match marker_of(vm) {
        Some(m) if m.hash == hash => {
            let delivered = m.from_uid != current_uid
                || call.vmi.metadata.deletion_timestamp.is_some()
                || restart_pending(vm);
            if !delivered {
                restart(ctx, &ns, &call.vm).await?;
            }
            m.from_uid.to_string()
        }
        _ => {
            let volumes = with_cloud_init_keys(ctx, vm, &call.user, |existing| {
                merge_keys(
                    existing,
                    wanted,
                    kr.spec.strategy,
                    kr.spec.replace_all,
                    previously_added,
                )
            })
            .await?;
            // User data and marker in one write, with the VM's resourceVersion: the
            // restart below is for exactly this edit.
            let patch = json!({
                "metadata": {
                    "resourceVersion": vm.resource_version(),
                    "annotations": {REBUILD_ANNOTATION: format!("{hash}/{current_uid}")},
                },
                "spec": {"template": {"spec": {"volumes": volumes}}},
            });
            vms.patch(&call.vm, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            restart(ctx, &ns, &call.vm).await?;
            current_uid
        }
    };
    let fresh = wait_for_new_vmi(ctx, &ns, &call.vm, &from_uid).await?;
    // The VM may have come back on another node: find its shim again, on the new VMI.
    let call = targets::prepare_call(ctx, &ns, &call.vm, Some(&call.user), None).await?;
    if call.vmi.uid() == Some(from_uid.clone()) && !from_uid.is_empty() {
        return Err(Error::VmNotRunning(format!(
            "VirtualMachineInstance {ns}/{} is still the one being restarted",
            call.vm
        )));
    }
    let fps: Vec<String> = wanted.iter().map(|k| k.fingerprint.clone()).collect();
    let probe = call.shim.probe(&call.domain).await?;
    let verified = if probe.supports_ssh_keys() {
        let present = present_fingerprints(&call).await?;
        let missing: Vec<&String> = fps.iter().filter(|f| !present.contains(*f)).collect();
        if !missing.is_empty() {
            return Err(Error::VerificationFailed(format!(
                "after the rebuild of {}, keys missing in the guest: {missing:?}",
                call.vm
            )));
        }
        true
    } else {
        false
    };
    Ok(Outcome {
        reason: Some(if verified {
            Reason::Verified
        } else {
            Reason::Applied
        }),
        message: format!(
            "VM rebuilt (new VMI {}) with {} key(s) for user {}{}",
            fresh.uid().unwrap_or_default(),
            fps.len(),
            call.user,
            if verified {
                "; verified"
            } else {
                "; not verified: the agent cannot read keys (no guest-ssh-*)"
            }
        ),
        mode: Some("Rebuild".into()),
        keys: fps,
        verified: Some(verified),
        ..Outcome::default()
    })
}

/// The key lines cloud-init should install for the user.
fn merge_keys(
    existing: Vec<String>,
    wanted: &[WantedKey],
    strategy: KeyStrategy,
    replace_all: bool,
    previously_added: &BTreeSet<String>,
) -> Vec<String> {
    let mut keep: Vec<String> = if replace_all {
        Vec::new()
    } else {
        existing
            .into_iter()
            .filter(|l| {
                strategy == KeyStrategy::Append
                    || !fingerprint_of(l).is_some_and(|fp| previously_added.contains(&fp))
            })
            .collect()
    };
    let have: BTreeSet<String> = keep.iter().filter_map(|l| fingerprint_of(l)).collect();
    keep.extend(
        wanted
            .iter()
            .filter(|k| !have.contains(&k.fingerprint))
            .map(|k| k.line.clone()),
    );
    keep
}

/// The VM's volumes with the user's `ssh_authorized_keys` in the cloud-init user data
/// replaced by `keys(existing)`; a NoCloud volume is added when there is none. User data
/// from a Secret goes into a copy guestcred owns (see the module docs).
async fn with_cloud_init_keys(
    ctx: &Context,
    vm: &VirtualMachine,
    user: &str,
    keys: impl FnOnce(Vec<String>) -> Vec<String>,
) -> Result<Vec<Value>, Error> {
    let name = vm.name_any();
    let invalid = |what: String| Error::InvalidSpec(format!("VM {name}: {what}"));
    let mut volumes: Vec<Value> = vm
        .spec
        .rest
        .get("template")
        .and_then(|t| t.pointer("/spec/volumes"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let idx = volumes.iter().position(|v| {
        v.get("cloudInitNoCloud").is_some() || v.get("cloudInitConfigDrive").is_some()
    });
    let idx = match idx {
        Some(i) => i,
        None => {
            volumes.push(json!({"name": CLOUD_INIT_VOLUME, "cloudInitNoCloud": {"userData": "#cloud-config\n"}}));
            volumes.len() - 1
        }
    };
    let source_key = if volumes[idx].get("cloudInitNoCloud").is_some() {
        "cloudInitNoCloud"
    } else {
        "cloudInitConfigDrive"
    };
    let source = volumes[idx][source_key]
        .as_object_mut()
        .ok_or_else(|| invalid(format!("{source_key} is not an object")))?;
    let edit = |text: &str| {
        set_user_keys(text, user, keys).map_err(|e| {
            invalid(format!(
                "cloud-init user data is not editable cloud-config: {e}"
            ))
        })
    };
    let secret_field = ["userDataSecretRef", "secretRef"]
        .into_iter()
        .find(|f| source.contains_key(*f));
    if let Some(field) = secret_field {
        let from = source[field]
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("{source_key}.{field} has no name")))?
            .to_string();
        let copy = user_data_copy(ctx, vm, field, &from, edit).await?;
        source.insert(field.into(), json!({"name": copy}));
        return Ok(volumes);
    }
    let text = match (
        source.get("userData").and_then(Value::as_str),
        source.get("userDataBase64").and_then(Value::as_str),
    ) {
        (Some(t), _) => t.to_string(),
        (None, Some(b64)) => {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| invalid("userDataBase64 is not valid base64".into()))?;
            String::from_utf8_lossy(&bytes).to_string()
        }
        _ => "#cloud-config\n".to_string(),
    };
    let updated = edit(&text)?;
    source.remove("userDataBase64");
    source.insert("userData".into(), Value::String(updated));
    Ok(volumes)
}

/// Keys a user-data Secret may hold its user data under (KubeVirt reads either).
const USER_DATA_KEYS: [&str; 2] = ["userdata", "userData"];

/// Write the edited copy of user-data Secret `from` (every key kept, the user data
/// edited) as a Secret guestcred owns through the VM; returns its name. `from` may be an
/// earlier copy: the new one records the user's Secret that copy came from.
async fn user_data_copy(
    ctx: &Context,
    vm: &VirtualMachine,
    field: &str,
    from: &str,
    edit: impl FnOnce(&str) -> Result<String, Error>,
) -> Result<String, Error> {
    let ns = vm.namespace().unwrap_or_default();
    let vm_name = vm.name_any();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let source = secrets
        .get_opt(from)
        .await?
        .ok_or_else(|| Error::SecretNotFound(format!("{from} (the user data of VM {vm_name})")))?;
    let mut data: BTreeMap<String, ByteString> = source.data.clone().unwrap_or_default();
    let key = USER_DATA_KEYS
        .into_iter()
        .find(|k| data.contains_key(*k))
        .ok_or_else(|| Error::SecretKeyMissing {
            secret: from.to_string(),
            key: "userdata".into(),
        })?;
    let text = String::from_utf8(data[key].0.clone()).map_err(|_| {
        Error::InvalidSpec(format!(
            "VM {vm_name}: the user data in Secret {from} is not UTF-8"
        ))
    })?;
    let updated = edit(&text)?;
    data.insert(key.to_string(), ByteString(updated.into_bytes()));
    // The user's Secret this chain of copies started from.
    let original = source
        .annotations()
        .get(USER_DATA_FROM_ANNOTATION)
        .cloned()
        .unwrap_or_else(|| format!("{field}/{from}"));
    let mut digest = sha2::Sha256::new();
    for (k, v) in &data {
        digest.update(k.as_bytes());
        digest.update([0]);
        digest.update(&v.0);
        digest.update([0]);
    }
    let digest = hex::encode(digest.finalize());
    let prefix: String = vm_name.chars().take(200).collect();
    let name = format!("{prefix}-gc-userdata-{}", &digest[..10]);
    let owner = OwnerReference {
        api_version: "kubevirt.io/v1".into(),
        kind: "VirtualMachine".into(),
        name: vm_name.clone(),
        uid: vm.uid().unwrap_or_default(),
        ..OwnerReference::default()
    };
    let copy = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            labels: Some(BTreeMap::from([
                ("guestcred.io/vm".to_string(), vm_name.clone()),
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    "guestcred".to_string(),
                ),
            ])),
            annotations: Some(BTreeMap::from([(
                USER_DATA_FROM_ANNOTATION.to_string(),
                original,
            )])),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        type_: source.type_.clone(),
        data: Some(data.clone()),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &copy).await {
        Ok(_) => Ok(name),
        // Same name, same content (a retry, or the same edit again): reuse it only if it
        // is ours and holds exactly this.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let existing = secrets.get(&name).await?;
            let ours = existing
                .owner_references()
                .iter()
                .any(|o| o.uid == vm.uid().unwrap_or_default());
            if ours && existing.data.as_ref() == Some(&data) {
                Ok(name)
            } else {
                Err(Error::OutputSecretConflict(format!(
                    "Secret {name} exists and is not guestcred's copy of the user data of VM {vm_name}; delete or rename it"
                )))
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// `PUT .../virtualmachines/NAME/restart` on KubeVirt's subresource API.
async fn restart(ctx: &Context, ns: &str, vm: &str) -> Result<(), Error> {
    let path =
        format!("/apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachines/{vm}/restart");
    let req = http::Request::put(path)
        .header("content-type", "application/json")
        .body(b"{}".to_vec())
        .map_err(|e| Error::InvalidSpec(format!("building the restart request: {e}")))?;
    ctx.client.request_text(req).await?;
    Ok(())
}

/// Wait until the VM's VMI is a new one (uid differs from `old_uid`), Running, with its
/// agent connected. The engine's per-target deadline bounds the wait.
async fn wait_for_new_vmi(
    ctx: &Context,
    ns: &str,
    vm: &str,
    old_uid: &str,
) -> Result<VirtualMachineInstance, Error> {
    let vmis: Api<VirtualMachineInstance> = Api::namespaced(ctx.client.clone(), ns);
    loop {
        if let Some(vmi) = vmis.get_opt(vm).await? {
            let new = vmi.uid().as_deref() != Some(old_uid);
            if new && vmi.is_running() && vmi.agent_connected() {
                return Ok(vmi);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
