//! GuestPasswordReset: set a guest user's password through the shim.
use super::context::Context;
use super::engine::{Outcome, Prepared, RunKind};
use super::error::Error;
use super::rotation;
use super::secrets;
use super::targets::{TargetCall, VmRead};
use crate::api::password::Charset;
use crate::api::wire::SetPasswordRequest;
use crate::api::{GuestPasswordReset, Reason, RunSpec, RunStatus, SecretKeyRef};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};
use std::sync::Arc;

/// Where the password of a run comes from.
pub enum PasswordInput {
    /// One value for every target (from a Secret).
    Fixed { value: SecretString, crypted: bool },
    /// A new random password per target, stored in an output Secret first.
    Generate {
        length: u32,
        symbols: bool,
        /// The run's keyed input hash: each run stores its passwords in Secrets of its own.
        run: String,
        /// `sealTo.age`: each password is stored only as a ciphertext to this recipient.
        seal_to: Option<age::x25519::Recipient>,
    },
}

/// Annotation: a new value starts a rotation of the generated passwords at once.
pub const ROTATE_NOW: &str = "guestcred.io/rotate-now";

/// The rotation interval the present falls in, for objects with `spec.rotation`.
fn rotation_slot(reset: &GuestPasswordReset) -> Result<Option<rotation::Slot>, Error> {
    let Some(r) = &reset.spec.rotation else {
        return Ok(None);
    };
    let schedule = rotation::Schedule::parse(r).map_err(Error::InvalidSpec)?;
    if r.keep_previous > 10 {
        return Err(Error::InvalidSpec(format!(
            "rotation.keepPrevious must be 0-10, got {}",
            r.keep_previous
        )));
    }
    let now = Timestamp::now();
    let created = reset
        .meta()
        .creation_timestamp
        .as_ref()
        .map_or(now, |t| t.0);
    Ok(Some(schedule.slot(created, now)))
}

impl RunKind for GuestPasswordReset {
    type Input = PasswordInput;

    fn common(&self) -> &RunSpec {
        &self.spec.common
    }
    fn input_secret(&self) -> Option<&SecretKeyRef> {
        self.spec.password.secret_ref.as_ref()
    }
    fn run_status(&self) -> Option<&RunStatus> {
        self.status.as_ref().map(|s| &s.run)
    }
    fn latest(&self, ctx: &Context) -> Option<Arc<Self>> {
        ctx.resets.get(&ObjectRef::from_obj(self))
    }
    /// A password needs the VM only for its admin-user annotation (see `VmRead`).
    fn vm_read(&self) -> VmRead {
        VmRead::ForUserOnly
    }

    fn validate(&self) -> Result<(), Error> {
        crate::api::rules::check_reset(self).map_err(|e| Error::InvalidSpec(cel_message(&e)))?;
        let ns = self.namespace().unwrap_or_default();
        if let Some(r) = &self.spec.password.secret_ref {
            secrets::check_same_namespace(r, &ns, "password.secretRef")?;
        }
        if let Some(u) = &self.spec.common.user {
            crate::api::validate::user(u)
                .map_err(|e| Error::InvalidUser(format!("spec.user: {}", e.message)))?;
        }
        rotation_slot(self)?;
        if let Some(to) = self
            .spec
            .password
            .generate
            .as_ref()
            .and_then(|g| g.seal_to.as_ref())
        {
            super::sealed::recipient(&to.age)?;
        }
        // The schema's range, checked again (API servers without schema validation).
        if let Some(g) = &self.spec.password.generate
            && !(16..=128).contains(&g.length)
        {
            return Err(Error::InvalidSpec(format!(
                "password.generate.length must be 16-128, got {}",
                g.length
            )));
        }
        Ok(())
    }

    /// Scheduled rotation: once a VM holds the new password, the generated Secrets of its
    /// earlier rotations beyond `keepPrevious` are deleted.
    async fn after_run(&self, ctx: &Context, status: &RunStatus) {
        // Every target of the run is finished: no sealed value is sent again.
        ctx.sealed.forget_object(&self.uid().unwrap_or_default());
        ctx.metrics.set_sealed_values_held(ctx.sealed.len());
        let Some(r) = &self.spec.rotation else {
            return;
        };
        if let Err(e) = secrets::prune_generated(&ctx.client, self, status, r.keep_previous).await {
            tracing::warn!(object = %self.name_any(), error = %e, "pruning earlier generated Secrets failed; tried again after the next run");
        }
    }

    async fn prepare(&self, ctx: &Context) -> Result<Prepared<PasswordInput>, Error> {
        let uid = self.uid().unwrap_or_default();
        let user = self.spec.common.user.clone().unwrap_or_default();
        let p = &self.spec.password;
        match (&p.secret_ref, &p.generate) {
            (Some(r), None) => {
                let ns = self.namespace().unwrap_or_default();
                let secrets::KeyValue {
                    value,
                    resource_version,
                } = secrets::read_key(&ctx.client, &ns, r).await?;
                crate::api::validate::password(&value, p.crypted).map_err(|e| {
                    Error::InvalidPassword(format!(
                        "Secret {} key {:?}: {}",
                        r.name, r.key, e.message
                    ))
                })?;
                let parts: [&[u8]; 3] = [
                    value.expose_secret().as_bytes(),
                    &[p.crypted as u8],
                    user.as_bytes(),
                ];
                let hash = ctx.input_key.hash(&uid, &parts);
                // Status written before the controller had its key: same input, no re-run.
                let legacy_hash = Some(secrets::keyed_hash(&uid, &parts));
                Ok(Prepared {
                    input: PasswordInput::Fixed {
                        value,
                        crypted: p.crypted,
                    },
                    hash,
                    legacy_hash,
                    secret_version: resource_version,
                    rotation: None,
                })
            }
            (None, Some(g)) => {
                let symbols = g.charset == Charset::AlphanumericSymbols;
                let mut parts: Vec<Vec<u8>> = vec![
                    b"generate".to_vec(),
                    g.length.to_be_bytes().to_vec(),
                    vec![symbols as u8],
                    user.as_bytes().to_vec(),
                ];
                // A new rotation interval, or a new rotate-now value, is a new input: a new
                // run with new passwords. (Without either, the hash is what it always was.)
                let slot = rotation_slot(self)?;
                if let Some(slot) = &slot {
                    parts.push(b"rotation".to_vec());
                    parts.push(slot.index.to_be_bytes().to_vec());
                }
                if let Some(token) = self.annotations().get(ROTATE_NOW) {
                    parts.push(b"rotate-now".to_vec());
                    parts.push(token.as_bytes().to_vec());
                }
                // Sealed to another key: a new run, sealed to the new key.
                let seal_to = match &g.seal_to {
                    Some(to) => {
                        parts.push(b"seal-to-age".to_vec());
                        parts.push(to.age.trim().as_bytes().to_vec());
                        Some(super::sealed::recipient(&to.age)?)
                    }
                    None => None,
                };
                let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
                let hash = secrets::keyed_hash(&uid, &parts);
                // Values held for an earlier run of this object are never sent again.
                ctx.sealed.forget_other_runs(&uid, &hash);
                ctx.metrics.set_sealed_values_held(ctx.sealed.len());
                Ok(Prepared {
                    rotation: slot.map(|s| (Time(s.last), Time(s.next))),
                    ..Prepared::inline(
                        PasswordInput::Generate {
                            length: g.length,
                            symbols,
                            run: hash.clone(),
                            seal_to,
                        },
                        hash,
                    )
                })
            }
            _ => Err(Error::InvalidSpec(
                "set exactly one of password.secretRef and password.generate".into(),
            )),
        }
    }

    async fn apply(
        &self,
        ctx: &Context,
        input: &PasswordInput,
        call: &TargetCall,
    ) -> Result<Outcome, Error> {
        let (password, crypted, output_secret) = match input {
            PasswordInput::Fixed { value, crypted } => (value.clone(), *crypted, None),
            PasswordInput::Generate {
                length,
                symbols,
                run,
                seal_to: None,
            } => {
                let (name, value) =
                    secrets::ensure_generated(&ctx.client, self, &call.vm, run, || {
                        secrets::generate_password(*length, *symbols)
                    })
                    .await?;
                (value, false, Some(name))
            }
            PasswordInput::Generate {
                length,
                symbols,
                run,
                seal_to: Some(to),
            } => {
                // Held no longer than the target may run (its deadline, plus its last call).
                let hold_for = std::time::Duration::from_secs(
                    u64::from(self.spec.common.rollout.deadline_seconds) + 60,
                );
                let (name, value) = super::sealed::ensure_sealed(
                    &ctx.client,
                    &ctx.sealed,
                    self,
                    (&call.vm, run),
                    super::sealed::Sealing { to, hold_for },
                    || secrets::generate_password(*length, *symbols),
                )
                .await?;
                (value, false, Some(name))
            }
        };
        let sealed = matches!(
            input,
            PasswordInput::Generate {
                seal_to: Some(_),
                ..
            }
        );
        if crypted && call.windows {
            return Err(Error::UnsupportedForOs(format!(
                "{} is a Windows guest: Windows cannot take a crypt(3) hash; use a plaintext or generated password",
                call.vm
            )));
        }
        let sent = call
            .shim
            .set_password(&SetPasswordRequest {
                domain: call.domain.clone(),
                user: call.user.clone(),
                password,
                crypted,
            })
            .await
            .map_err(Error::from);
        if sealed {
            // Finished (set, or failed for good): erase the value. A transient failure is
            // retried with the same value, so it is kept until then.
            if sent.as_ref().is_ok() || sent.as_ref().is_err_and(|e| !e.is_transient()) {
                ctx.sealed.forget(&self.uid().unwrap_or_default(), &call.vm);
            }
            ctx.metrics.set_sealed_values_held(ctx.sealed.len());
        }
        sent?;
        let how = if crypted { "crypted hash" } else { "password" };
        Ok(Outcome {
            reason: Some(Reason::Applied),
            message: match &output_secret {
                Some(s) => format!(
                    "generated password of user {} set; stored in Secret {s}",
                    call.user
                ),
                None => format!("{how} of user {} set", call.user),
            },
            output_secret,
            ..Outcome::default()
        })
    }
}

/// CEL failures as one line that names the rule's message.
pub fn cel_message(e: &impl std::fmt::Display) -> String {
    format!("spec is invalid: {e}")
}
