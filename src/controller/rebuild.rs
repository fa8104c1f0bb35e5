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
use super::context::Context;
use super::engine::Outcome;
use super::error::Error;
use super::keys::{WantedKey, fingerprint_of, present_fingerprints};
use super::secrets::keyed_hash;
use super::targets::{self, TargetCall};
use crate::api::keypair::KeyStrategy;
use crate::api::kubevirt::{VirtualMachine, VirtualMachineInstance};
use crate::api::{KeypairRebuild, Reason};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use serde_yaml::{Mapping, Value as Yaml};
use std::collections::BTreeSet;
use std::time::Duration;

/// Annotation on the VM: the keyed hash of the keys the last restart was requested for,
/// so a controller restart mid-rebuild waits for that restart instead of starting another.
pub const REBUILD_ANNOTATION: &str = "guestcred.io/rebuild-for";
const CLOUD_INIT_VOLUME: &str = "cloudinitdisk";

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
    let marker = keyed_hash(&kr.uid().unwrap_or_default(), &parts);
    let already = vm.annotations().get(REBUILD_ANNOTATION) == Some(&marker);
    let old_uid = call.vmi.uid();
    if !already {
        let volumes = with_cloud_init_keys(vm, &call.user, |existing| {
            merge_keys(
                existing,
                wanted,
                kr.spec.strategy,
                kr.spec.replace_all,
                previously_added,
            )
        })?;
        let patch = json!({"spec": {"template": {"spec": {"volumes": volumes}}}});
        vms.patch(&call.vm, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        restart(ctx, &ns, &call.vm).await?;
        let mark = json!({"metadata": {"annotations": {REBUILD_ANNOTATION: marker}}});
        vms.patch(&call.vm, &PatchParams::default(), &Patch::Merge(&mark))
            .await?;
    }
    let fresh = wait_for_new_vmi(ctx, &ns, &call.vm, if already { None } else { old_uid }).await?;
    // The VM may have come back on another node: find its shim again.
    let call = targets::prepare_call(ctx, &ns, &call.vm, Some(&call.user), None).await?;
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
/// replaced by `keys(existing)`; a NoCloud volume is added when there is none.
fn with_cloud_init_keys(
    vm: &VirtualMachine,
    user: &str,
    keys: impl FnOnce(Vec<String>) -> Vec<String>,
) -> Result<Vec<Value>, Error> {
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
    let source = volumes[idx][source_key].as_object_mut().ok_or_else(|| {
        Error::InvalidSpec(format!(
            "VM {}: {source_key} is not an object",
            vm.name_any()
        ))
    })?;
    if source.contains_key("secretRef") || source.contains_key("userDataSecretRef") {
        return Err(Error::InvalidSpec(format!(
            "VM {}: its cloud-init user data comes from a Secret, which Rebuild mode does not edit; put the keys there or use mode Live",
            vm.name_any()
        )));
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
                .map_err(|_| {
                    Error::InvalidSpec(format!(
                        "VM {}: userDataBase64 is not valid base64",
                        vm.name_any()
                    ))
                })?;
            String::from_utf8_lossy(&bytes).to_string()
        }
        _ => "#cloud-config\n".to_string(),
    };
    let updated = set_user_keys(&text, user, keys).map_err(|e| {
        Error::InvalidSpec(format!(
            "VM {}: cloud-init user data is not editable cloud-config: {e}",
            vm.name_any()
        ))
    })?;
    source.remove("userDataBase64");
    source.insert("userData".into(), Value::String(updated));
    Ok(volumes)
}

/// Set `users[name == user].ssh_authorized_keys` in cloud-config text.
pub fn set_user_keys(
    text: &str,
    user: &str,
    keys: impl FnOnce(Vec<String>) -> Vec<String>,
) -> Result<String, String> {
    let body = text.trim_start();
    if !body.is_empty() && !body.starts_with("#cloud-config") {
        return Err(
            "it does not start with #cloud-config (scripts and MIME parts are not edited)".into(),
        );
    }
    let mut doc: Yaml = serde_yaml::from_str(body).map_err(|e| e.to_string())?;
    if doc.is_null() {
        doc = Yaml::Mapping(Mapping::new());
    }
    let root = doc
        .as_mapping_mut()
        .ok_or("the document is not a mapping")?;
    let users = root
        .entry(Yaml::from("users"))
        .or_insert_with(|| Yaml::Sequence(vec![Yaml::from("default")]));
    let list = users.as_sequence_mut().ok_or("users is not a list")?;
    let pos = list
        .iter()
        .position(|u| u.get("name").and_then(Yaml::as_str) == Some(user));
    let entry = match pos {
        Some(p) => &mut list[p],
        None => {
            let mut m = Mapping::new();
            m.insert(Yaml::from("name"), Yaml::from(user));
            list.push(Yaml::Mapping(m));
            list.last_mut().ok_or("users list is empty")?
        }
    };
    let m = entry
        .as_mapping_mut()
        .ok_or("a users entry is not a mapping")?;
    let existing: Vec<String> = m
        .get("ssh_authorized_keys")
        .and_then(Yaml::as_sequence)
        .map(|s| {
            s.iter()
                .filter_map(Yaml::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let new: Vec<Yaml> = keys(existing).into_iter().map(Yaml::from).collect();
    m.insert(Yaml::from("ssh_authorized_keys"), Yaml::Sequence(new));
    let yaml = serde_yaml::to_string(&doc).map_err(|e| e.to_string())?;
    Ok(format!("#cloud-config\n{yaml}"))
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
    old_uid: Option<String>,
) -> Result<VirtualMachineInstance, Error> {
    let vmis: Api<VirtualMachineInstance> = Api::namespaced(ctx.client.clone(), ns);
    loop {
        if let Some(vmi) = vmis.get_opt(vm).await? {
            let new = old_uid.is_none() || vmi.uid() != old_uid;
            if new && vmi.is_running() && vmi.agent_connected() {
                return Ok(vmi);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_set_for_a_new_user_entry() {
        let out = set_user_keys("#cloud-config\npackage_update: true\n", "root", |_| {
            vec!["ssh-ed25519 AAAA k".into()]
        })
        .expect("edit");
        let doc: Yaml = serde_yaml::from_str(&out).expect("yaml");
        assert_eq!(doc["package_update"], Yaml::from(true));
        let users = doc["users"].as_sequence().expect("users");
        let root = users
            .iter()
            .find(|u| u.get("name").and_then(Yaml::as_str) == Some("root"))
            .expect("root");
        assert_eq!(
            root["ssh_authorized_keys"][0],
            Yaml::from("ssh-ed25519 AAAA k")
        );
        assert!(out.starts_with("#cloud-config\n"));
    }

    #[test]
    fn existing_keys_are_handed_to_the_merge() {
        let text = "#cloud-config\nusers:\n- name: alice\n  ssh_authorized_keys: [old]\n";
        let out = set_user_keys(text, "alice", |mut e| {
            e.push("new".into());
            e
        })
        .expect("edit");
        let doc: Yaml = serde_yaml::from_str(&out).expect("yaml");
        assert_eq!(
            doc["users"][0]["ssh_authorized_keys"],
            serde_yaml::from_str::<Yaml>("[old, new]").expect("yaml")
        );
    }

    #[test]
    fn shell_script_user_data_is_not_edited() {
        assert!(set_user_keys("#!/bin/sh\necho hi\n", "root", |k| k).is_err());
    }
}
