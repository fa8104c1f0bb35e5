//! KeypairRebuild: put SSH public keys into guests live through the agent, touching only
//! the keys this operator added, and verify them by reading them back. Also removal of
//! named keys (`spec.removeFingerprints`, `remove.rs`) and a read-only report of a guest's
//! keys (`mode: Inspect`, `inspect.rs`).
use super::context::Context;
use super::engine::{Cleanup, Outcome, Prepared, RunKind, Undo};
use super::error::Error;
use super::key_ownership::{self, HolderIds, Record, holder_id};
use super::keys::{
    WantedKey, fingerprint_of, parse_keys, present_fingerprints, remove_keys, remove_lines_with,
};
use super::password::cel_message;
use super::secrets;
use super::targets::TargetCall;
use crate::api::keypair::{KeyAction, KeyMode};
use crate::api::kubevirt::{VirtualMachine, VirtualMachineInstance};
use crate::api::wire::KeyOp;
use crate::api::{KeypairRebuild, Reason, RunSpec, RunStatus, SecretKeyRef, TargetStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use secrecy::ExposeSecret;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

mod cleanup;
mod inspect;
mod overlap;
mod remove;

pub use cleanup::{KEYS_FINALIZER, KEYS_LEFT_BEHIND};
pub use inspect::publish_guest_keys;

/// Annotation prefix on a VM recording the fingerprints guestcred added for a user and the
/// objects holding each (see `key_ownership`), so a later Replace removes them even when
/// the object that added them is gone, and never removes another live object's key.
pub const MANAGED_KEYS_ANNOTATION_PREFIX: &str = "keys.guestcred.io/";

fn annotation_key(user: &str) -> String {
    format!("{MANAGED_KEYS_ANNOTATION_PREFIX}{user}")
}

/// What one run of a KeypairRebuild does, as `prepare` read it.
pub enum KeyInput {
    /// `publicKeys`: the keys to put in place.
    Add(Vec<WantedKey>),
    /// `removeFingerprints`: the keys to remove (validated, distinct).
    Remove(BTreeSet<String>),
    /// `mode: Inspect`: read the keys.
    Inspect,
}

impl RunKind for KeypairRebuild {
    /// Only Live: Rebuild and Auto may restart the VM, deciding by the VMI's uid.
    fn reads_vmi_from_feed(&self) -> bool {
        self.spec.mode == KeyMode::Live
    }
    type Input = KeyInput;

    fn common(&self) -> &RunSpec {
        &self.spec.common
    }
    fn input_secret(&self) -> Option<&SecretKeyRef> {
        self.spec
            .public_keys
            .as_ref()
            .and_then(|p| p.secret_ref.as_ref())
    }
    fn run_status(&self) -> Option<&RunStatus> {
        self.status.as_ref().map(|s| &s.run)
    }
    fn grants_expire(&self) -> bool {
        self.spec.ttl_seconds.is_some() || self.spec.overlap_seconds.is_some()
    }
    fn latest(&self, ctx: &Context) -> Option<Arc<Self>> {
        ctx.rebuilds.get(&ObjectRef::from_obj(self))
    }

    fn validate(&self) -> Result<(), Error> {
        crate::api::rules::check_rebuild(self).map_err(|e| Error::InvalidSpec(cel_message(&e)))?;
        let ns = self.namespace().unwrap_or_default();
        if let Some(r) = self.input_secret() {
            secrets::check_same_namespace(r, &ns, "publicKeys.secretRef")?;
        }
        check_action(&self.spec)?;
        if let Some(u) = &self.spec.common.user {
            crate::api::validate::user(u)
                .map_err(|e| Error::InvalidUser(format!("spec.user: {}", e.message)))?;
        }
        if let Some(ttl) = self.spec.ttl_seconds
            && !(10..=31_536_000).contains(&ttl)
        {
            return Err(Error::InvalidSpec(format!(
                "ttlSeconds must be 10-31536000, got {ttl}"
            )));
        }
        overlap::check(&self.spec)?;
        Ok(())
    }

    async fn prepare(&self, ctx: &Context) -> Result<Prepared<KeyInput>, Error> {
        let uid = self.uid().unwrap_or_default();
        let flags = format!(
            "{:?}/{:?}/{}/{}",
            self.spec.mode,
            self.spec.strategy,
            self.spec.replace_all,
            self.spec.common.user.clone().unwrap_or_default()
        );
        let source = match check_action(&self.spec)? {
            KeyAction::Add => self.spec.public_keys.clone().unwrap_or_default(),
            KeyAction::Remove => {
                let fps: BTreeSet<String> = self.spec.remove_fingerprints.iter().cloned().collect();
                let mut parts: Vec<&[u8]> = vec![b"remove"];
                parts.extend(fps.iter().map(|f| f.as_bytes()));
                parts.push(flags.as_bytes());
                let hash = secrets::keyed_hash(&uid, &parts);
                return Ok(Prepared::inline(KeyInput::Remove(fps), hash));
            }
            KeyAction::Inspect => {
                let hash = secrets::keyed_hash(&uid, &[b"inspect", flags.as_bytes()]);
                return Ok(Prepared::inline(KeyInput::Inspect, hash));
            }
        };
        let ns = self.namespace().unwrap_or_default();
        let (text, secret_version) = match (&source.secret_ref, &source.inline) {
            (Some(r), None) => {
                let read = secrets::read_key(&ctx.client, &ns, r).await?;
                (
                    read.value.expose_secret().to_string(),
                    read.resource_version,
                )
            }
            (None, Some(list)) => (list.join("\n"), None),
            _ => {
                return Err(Error::InvalidSpec(
                    "set exactly one of publicKeys.secretRef and publicKeys.inline".into(),
                ));
            }
        };
        let keys = parse_keys(&text)?;
        let fps: Vec<&[u8]> = keys.iter().map(|k| k.fingerprint.as_bytes()).collect();
        let mut parts = fps;
        parts.push(flags.as_bytes());
        let hash = secrets::keyed_hash(&uid, &parts);
        Ok(Prepared {
            input: KeyInput::Add(keys),
            hash,
            legacy_hash: None,
            secret_version,
            rotation: None,
        })
    }

    fn finalizer() -> Option<&'static str> {
        Some(KEYS_FINALIZER)
    }

    async fn cleanup(&self, ctx: &Context) -> Result<Cleanup, Error> {
        cleanup::remove_granted_keys(self, ctx).await
    }

    fn overlap_ends_at(&self, target: &TargetStatus) -> Option<Timestamp> {
        overlap::removal_at(target)
    }

    async fn undo(
        &self,
        ctx: &Context,
        call: &TargetCall,
        target: &TargetStatus,
        due: Undo,
    ) -> Result<String, Error> {
        match due {
            Undo::Expired => self.expire_keys(ctx, call, target).await,
            Undo::OverlapEnded => overlap::end(self, ctx, call, target).await,
        }
    }

    async fn apply(
        &self,
        ctx: &Context,
        input: &KeyInput,
        call: &TargetCall,
    ) -> Result<Outcome, Error> {
        let wanted = match input {
            KeyInput::Add(wanted) => wanted,
            KeyInput::Remove(fps) => return remove::remove_keys(self, ctx, call, fps).await,
            KeyInput::Inspect => return inspect::inspect_keys(self, ctx, call).await,
        };
        let probe = call.shim.probe(&call.domain).await?;
        let live = match self.spec.mode {
            KeyMode::Rebuild => false,
            KeyMode::Inspect => {
                return Err(Error::InvalidSpec(
                    "mode Inspect takes no publicKeys".into(),
                ));
            }
            // Auto: live when the agent can do it, else rebuild. An agent that is not
            // connected (yet) is retried rather than taken as "cannot".
            KeyMode::Auto if probe.agent_connected => probe.supports_ssh_keys(),
            KeyMode::Auto | KeyMode::Live => {
                if !probe.agent_connected {
                    return Err(Error::Shim {
                        reason: crate::api::wire::ShimErrorReason::AgentNotConnected,
                        message: format!("the guest agent of {} is not connected", call.vm),
                    });
                }
                if !probe.supports_ssh_keys() {
                    return Err(Error::Shim {
                        reason: crate::api::wire::ShimErrorReason::Unsupported,
                        message: format!(
                            "the guest agent of {} lacks the guest-ssh-* commands (qemu-ga 5.2+, not blocked); use mode Rebuild or Auto",
                            call.vm
                        ),
                    });
                }
                true
            }
        };
        if !live {
            // A rebuild writes the keys into cloud-init user data; without guest-ssh-* no
            // one can remove them on time. Mode Rebuild is refused by validate (CEL); Auto
            // only finds out here, per VM, before anything changes.
            if let Some(ttl) = self.spec.ttl_seconds {
                return Err(Error::InvalidSpec(format!(
                    "ttlSeconds ({ttl}) needs live delivery, but the guest agent of {} lacks the guest-ssh-* commands, so mode Auto would rebuild the VM and the keys could not be removed on time; drop ttlSeconds or update the agent (qemu-ga 5.2+)",
                    call.vm
                )));
            }
            if let Some(overlap) = self.spec.overlap_seconds {
                return Err(Error::InvalidSpec(format!(
                    "overlapSeconds ({overlap}) needs live delivery, but the guest agent of {} lacks the guest-ssh-* commands, so mode Auto would rebuild the VM and the replaced keys could not be removed after the overlap; drop overlapSeconds or update the agent (qemu-ga 5.2+)",
                    call.vm
                )));
            }
            // The user data is rewritten without looking into the guest: what guestcred
            // recorded stands for what the guest has.
            let wanted_fps: BTreeSet<String> =
                wanted.iter().map(|k| k.fingerprint.clone()).collect();
            let (me, live, record) = self.ownership(ctx, call).await;
            let plan = key_ownership::plan_live(
                &me,
                &wanted_fps,
                &record.owned(),
                &record,
                &live,
                self.spec.strategy,
                self.spec.replace_all,
            );
            let others = self.granted_by_others(ctx, call);
            let dropped = key_ownership::removable(&record, &me, &plan.let_go, &live, &others);
            let outcome = super::rebuild::rebuild(ctx, self, call, wanted, &dropped).await?;
            let added: BTreeSet<String> = outcome.keys.iter().cloned().collect();
            update_record(ctx, call, |r, live| {
                r.hold(&me, &added, live);
                r.release(&me, &plan.let_go, live, &others);
                r.forget(&dropped, live);
            })
            .await?;
            return Ok(outcome);
        }
        let wanted_fps: BTreeSet<String> = wanted.iter().map(|k| k.fingerprint.clone()).collect();
        let lines: Vec<String> = wanted.iter().map(|k| k.line.clone()).collect();
        let current = call.shim.get_ssh_keys(&call.domain, &call.user).await?;
        let present_before: BTreeSet<String> =
            current.iter().filter_map(|l| fingerprint_of(l)).collect();
        let (me, live, record) = self.ownership(ctx, call).await;
        let plan = key_ownership::plan_live(
            &me,
            &wanted_fps,
            &present_before,
            &record,
            &live,
            self.spec.strategy,
            self.spec.replace_all,
        );
        // Record first what this object holds, so a crash after the change loses nothing.
        update_record(ctx, call, |r, live| r.hold(&me, &plan.to_hold, live)).await?;
        // With an overlap, the keys let go of stay until the new ones are verified and the
        // overlap has passed (`overlap::end`); nothing is removed now.
        let overlap = self
            .spec
            .overlap_seconds
            .filter(|_| !plan.let_go.is_empty());
        let mut removed = BTreeSet::new();
        if self.spec.replace_all {
            call.shim
                .ssh_keys(&call.domain, &call.user, KeyOp::Replace, lines.clone())
                .await?;
        } else {
            if overlap.is_none() && !plan.let_go.is_empty() {
                // Let go first, on a fresh read of the record: a key leaves the guest
                // only when no other live object holds or grants it.
                let others = self.granted_by_others(ctx, call);
                removed = update_record(ctx, call, |r, live| {
                    r.release(&me, &plan.let_go, live, &others)
                })
                .await?;
            }
            remove_lines_with(call, current, &removed).await?;
            call.shim
                .ssh_keys(&call.domain, &call.user, KeyOp::Add, lines)
                .await?;
        }
        // Verify by reading back.
        let present = present_fingerprints(call).await?;
        let missing: Vec<&String> = wanted_fps.difference(&present).collect();
        let lingering: Vec<&String> = removed.intersection(&present).collect();
        if !missing.is_empty() || !lingering.is_empty() {
            return Err(Error::VerificationFailed(format!(
                "read back from {}: missing {:?}, still present {:?}",
                call.vm, missing, lingering
            )));
        }
        // Forget what left the guest (Replace), or, with replaceAll, everything of
        // guestcred's the file no longer has.
        if self.spec.replace_all {
            update_record(ctx, call, |r, _| {
                let gone = r.owned().difference(&wanted_fps).cloned().collect();
                r.drop_keys(&gone);
            })
            .await?;
        } else if !removed.is_empty() {
            update_record(ctx, call, |r, live| r.forget(&removed, live)).await?;
        }
        let expires_at = self
            .spec
            .ttl_seconds
            .map(|s| Time(Timestamp::now() + Duration::from_secs(s.into())));
        let fps: Vec<String> = wanted.iter().map(|k| k.fingerprint.clone()).collect();
        let remove_at = overlap.map(|s| Time(Timestamp::now() + Duration::from_secs(s.into())));
        let replaced = match &remove_at {
            Some(at) => format!(
                "; the {} key(s) they replace stay until {} (overlapSeconds)",
                plan.let_go.len(),
                at.0
            ),
            None if removed.is_empty() => String::new(),
            None => format!("; removed {} key(s) guestcred added before", removed.len()),
        };
        Ok(Outcome {
            reason: Some(Reason::Verified),
            message: format!(
                "{} key(s) in place for user {} and verified{replaced}",
                fps.len(),
                call.user,
            ),
            mode: Some("Live".into()),
            keys: fps,
            verified: Some(true),
            expires_at,
            replaced_keys: if remove_at.is_some() {
                plan.let_go.iter().cloned().collect()
            } else {
                Vec::new()
            },
            replaced_keys_remove_at: remove_at,
            ..Outcome::default()
        })
    }
}

/// The action the spec asks for, checked again as the CRD's CEL rules state it (an API
/// server without them lets anything through), plus what CEL does not check: distinct,
/// well-formed fingerprints.
fn check_action(spec: &crate::api::KeypairRebuildSpec) -> Result<KeyAction, Error> {
    let action = spec.action().map_err(Error::InvalidSpec)?;
    let adds_only = "ttlSeconds and replaceAll apply to keys being added (publicKeys); removeFingerprints and mode Inspect take neither";
    match action {
        KeyAction::Add => {}
        KeyAction::Inspect => {
            if spec.common.target.vm_name.is_none() {
                return Err(Error::InvalidSpec(
                    "mode Inspect reads one VM's keys: set target.vmName (the keys of every VM a selector matches would not fit in one object's status)".into(),
                ));
            }
            if spec.ttl_seconds.is_some() || spec.replace_all {
                return Err(Error::InvalidSpec(adds_only.into()));
            }
        }
        KeyAction::Remove => {
            if spec.mode == KeyMode::Rebuild {
                return Err(Error::InvalidSpec(
                    "removeFingerprints needs mode Live or Auto: the guest agent removes the keys (guest-ssh-remove-authorized-keys); a rebuild cannot take a key out".into(),
                ));
            }
            if spec.ttl_seconds.is_some() || spec.replace_all {
                return Err(Error::InvalidSpec(adds_only.into()));
            }
            let fps = &spec.remove_fingerprints;
            if fps.len() > crate::api::keypair::MAX_REMOVE_FINGERPRINTS {
                return Err(Error::InvalidSpec(format!(
                    "removeFingerprints lists {} fingerprints; at most {} per object",
                    fps.len(),
                    crate::api::keypair::MAX_REMOVE_FINGERPRINTS
                )));
            }
            let mut seen = BTreeSet::new();
            for (i, fp) in fps.iter().enumerate() {
                if !crate::api::keypair::is_fingerprint(fp) {
                    return Err(Error::InvalidSpec(format!(
                        "removeFingerprints[{i}]: each entry is a SHA256 fingerprint like SHA256:<43 base64 characters>, as ssh-keygen -lf KEYFILE prints it"
                    )));
                }
                if !seen.insert(fp) {
                    return Err(Error::InvalidSpec(format!(
                        "removeFingerprints[{i}] repeats {fp}"
                    )));
                }
            }
        }
    }
    Ok(action)
}

/// The agent of `call` is connected and has `commands` (else a transient
/// AgentNotConnected, or UnsupportedByAgent naming what `needs` them).
async fn require_agent(call: &TargetCall, commands: &[&str], needs: &str) -> Result<(), Error> {
    let probe = call.shim.probe(&call.domain).await?;
    if !probe.agent_connected {
        return Err(Error::Shim {
            reason: crate::api::wire::ShimErrorReason::AgentNotConnected,
            message: format!("the guest agent of {} is not connected", call.vm),
        });
    }
    let missing: Vec<&str> = commands
        .iter()
        .filter(|c| !probe.supported_commands.iter().any(|s| s == *c))
        .copied()
        .collect();
    if !missing.is_empty() {
        return Err(Error::Shim {
            reason: crate::api::wire::ShimErrorReason::Unsupported,
            message: format!(
                "the guest agent of {} lacks {} (qemu-ga 5.2+, not blocked), which {needs} needs",
                call.vm,
                missing.join(", ")
            ),
        });
    }
    Ok(())
}

/// The managed-key bookkeeping of a KeypairRebuild (the type lives in the api package).
trait ManagedKeys {
    async fn expire_keys(
        &self,
        ctx: &Context,
        call: &TargetCall,
        target: &TargetStatus,
    ) -> Result<String, Error>;
    /// This object's holder id, the live objects' (see `key_ownership`), and the target
    /// VM's record for its user, as the call read it. Waits until the cache of
    /// KeypairRebuilds has been listed once (right after a start, a reconcile may come
    /// first), so no live object is missing from it.
    async fn ownership(&self, ctx: &Context, call: &TargetCall) -> (String, HolderIds, Record);
    /// Keys the other live KeypairRebuilds of the namespace grant on the call's VM and
    /// user (their listed targets and pending expiries).
    fn granted_by_others(&self, ctx: &Context, call: &TargetCall) -> BTreeSet<String>;
}

impl ManagedKeys for KeypairRebuild {
    /// Let go of the keys a TTL'd run granted and remove those no other live object holds
    /// or grants (by fingerprint), then forget them on the VM.
    async fn expire_keys(
        &self,
        ctx: &Context,
        call: &TargetCall,
        target: &TargetStatus,
    ) -> Result<String, Error> {
        let (me, _, record) = self.ownership(ctx, call).await;
        // Only the granted keys guestcred itself added: a key the person had before stays.
        let granted: BTreeSet<String> = target
            .keys
            .iter()
            .filter(|k| record.owned().contains(*k))
            .cloned()
            .collect();
        let others = self.granted_by_others(ctx, call);
        let gone = if granted.is_empty() {
            BTreeSet::new()
        } else {
            update_record(ctx, call, |r, live| r.release(&me, &granted, live, &others)).await?
        };
        let expired = remove_keys(call, &gone).await?;
        if !gone.is_empty() {
            update_record(ctx, call, |r, live| r.forget(&gone, live)).await?;
        }
        Ok(format!(
            "TTL passed: removed {expired} key(s) from user {}",
            call.user
        ))
    }

    async fn ownership(&self, ctx: &Context, call: &TargetCall) -> (String, HolderIds, Record) {
        // Err only when the cache's writer is gone (the controller stops).
        let _ = ctx.rebuilds.wait_until_ready().await;
        let annotations = match &call.vm_object {
            Some(vm) => vm.annotations(),
            None => call.vmi.annotations(),
        };
        let record = Record::parse(
            annotations
                .get(&annotation_key(&call.user))
                .map(String::as_str),
        );
        let live = live_holders(ctx, self.namespace().as_deref());
        (holder_id(&self.uid().unwrap_or_default()), live, record)
    }

    fn granted_by_others(&self, ctx: &Context, call: &TargetCall) -> BTreeSet<String> {
        let same = |vm: &str, user: Option<&str>| vm == call.vm && user == Some(call.user.as_str());
        let mut out = BTreeSet::new();
        for o in ctx.rebuilds.state() {
            if o.namespace() != self.namespace()
                || o.uid() == self.uid()
                || o.metadata.deletion_timestamp.is_some()
            {
                continue;
            }
            let Some(st) = o.status.as_ref().map(|s| &s.run) else {
                continue;
            };
            for t in &st.targets {
                if t.state == crate::api::TargetState::Succeeded
                    && t.reason.as_deref() != Some(Reason::Expired.as_str())
                    && same(&t.vm, t.user.as_deref())
                {
                    out.extend(t.keys.iter().cloned());
                }
            }
            for p in &st.pending_expiries {
                if same(&p.vm, p.user.as_deref()) {
                    out.extend(p.keys.iter().cloned());
                }
            }
        }
        out
    }
}

/// Holder ids of the KeypairRebuilds of namespace `ns` that are not being deleted.
fn live_holders(ctx: &Context, ns: Option<&str>) -> HolderIds {
    ctx.rebuilds
        .state()
        .iter()
        .filter(|o| o.namespace().as_deref() == ns && o.metadata.deletion_timestamp.is_none())
        .filter_map(|o| o.uid())
        .map(|uid| holder_id(&uid))
        .collect()
}

/// Change the record of keys guestcred added to a VM and who holds them (see
/// `key_ownership`) with `f`, which returns what it decided. Read fresh and written with
/// the resourceVersion it was read at, retried on conflicts: several objects (and runs)
/// record keys on the same VM and user at once, and none may lose another's update (a lost
/// record would leave a key no TTL or deletion ever removes), and what `f` decides is
/// decided on the record the write replaced. `f` also gets the live objects' holder ids,
/// read after the record: an object whose hold the record shows is live there (it was in
/// this controller's cache before its run recorded the hold), so no hold of an object
/// created meanwhile is taken for a deleted object's. On the VM, else (a VMI without a
/// VM) on the VMI. A record in the format before holders is rewritten in the current one.
async fn update_record<T: Default>(
    ctx: &Context,
    call: &TargetCall,
    f: impl Fn(&mut Record, &HolderIds) -> T,
) -> Result<T, Error> {
    let decided = std::sync::Mutex::new(None);
    let ns = call.vmi.namespace();
    update_vm_annotation(ctx, call, &annotation_key(&call.user), |old| {
        let old = old.map(String::as_str);
        let mut record = Record::parse(old);
        let live = live_holders(ctx, ns.as_deref());
        let out = f(&mut record, &live);
        if let Ok(mut d) = decided.lock() {
            *d = Some(out);
        }
        let value = record.to_value();
        (old.unwrap_or_default() != value).then_some(value)
    })
    .await?;
    // `f` ran on every attempt (the one that landed is the last).
    Ok(decided.into_inner().ok().flatten().unwrap_or_default())
}

/// Change one annotation of the target's VM (else, a VMI without a VM, of the VMI): `f`
/// gets its current value and returns the new one (None: leave it). Read fresh and
/// written with the resourceVersion it was read at, retried on conflicts, so concurrent
/// writers never lose each other's updates.
async fn update_vm_annotation(
    ctx: &Context,
    call: &TargetCall,
    key: &str,
    f: impl Fn(Option<&String>) -> Option<String>,
) -> Result<(), Error> {
    let ns = call.vmi.namespace().unwrap_or_default();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = if call.vm_object.is_some() {
            let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
            patch_annotation(&api, &call.vm, key, &f).await
        } else {
            let api: Api<VirtualMachineInstance> = Api::namespaced(ctx.client.clone(), &ns);
            patch_annotation(&api, &call.vm, key, &f).await
        };
        match result {
            Err(kube::Error::Api(s)) if s.code == 409 && attempt < 10 => continue,
            other => return other.map_err(Error::from),
        }
    }
}

async fn patch_annotation<K>(
    api: &Api<K>,
    name: &str,
    key: &str,
    f: &impl Fn(Option<&String>) -> Option<String>,
) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let fresh = api.get(name).await?;
    let Some(value) = f(fresh.annotations().get(key)) else {
        return Ok(());
    };
    let patch = serde_json::json!({"metadata": {
        "resourceVersion": fresh.resource_version(),
        "annotations": {key: value},
    }});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJF3X2of517d5Kg00cGhwfj7PqWgUgbbxnZyL96Twgi5 test@example";

    #[test]
    fn comments_and_blank_lines_are_skipped() {
        let keys = parse_keys(&format!("# team keys\n\n{ED25519}\n")).expect("valid");
        assert_eq!(keys.len(), 1);
        assert!(keys[0].fingerprint.starts_with("SHA256:"));
    }

    #[test]
    fn invalid_line_is_named_by_number_without_its_content() {
        let err = parse_keys(&format!("{ED25519}\nssh-rsa notbase64 secretcomment"))
            .expect_err("invalid");
        let msg = err.to_string();
        assert!(msg.contains("line 2"), "{msg}");
        assert!(!msg.contains("secretcomment"), "{msg}");
        assert_eq!(err.reason(), Reason::InvalidPublicKey);
    }

    #[test]
    fn private_key_is_refused_with_a_warning() {
        let err =
            parse_keys("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaA==\n").expect_err("private");
        assert!(err.to_string().contains("private key"));
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let err = parse_keys(&format!("{ED25519}\n{ED25519}")).expect_err("dup");
        assert!(err.to_string().contains("line 2 repeats"));
    }

    #[test]
    fn empty_key_list_is_refused() {
        assert!(matches!(
            parse_keys("# nothing\n"),
            Err(Error::InvalidPublicKey(_))
        ));
    }
}
