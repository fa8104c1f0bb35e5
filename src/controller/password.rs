//! GuestPasswordReset: set a guest user's password through the shim.
use super::context::Context;
use super::engine::{Outcome, Prepared, RunKind};
use super::error::Error;
use super::secrets;
use super::targets::TargetCall;
use crate::api::password::Charset;
use crate::api::wire::SetPasswordRequest;
use crate::api::{GuestPasswordReset, Reason, RunSpec, RunStatus, SecretKeyRef};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
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
    },
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
                })
            }
            (None, Some(g)) => {
                let symbols = g.charset == Charset::AlphanumericSymbols;
                let hash = secrets::keyed_hash(
                    &uid,
                    &[
                        b"generate",
                        &g.length.to_be_bytes(),
                        &[symbols as u8],
                        user.as_bytes(),
                    ],
                );
                Ok(Prepared::inline(
                    PasswordInput::Generate {
                        length: g.length,
                        symbols,
                        run: hash.clone(),
                    },
                    hash,
                ))
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
            } => {
                let (name, value) =
                    secrets::ensure_generated(&ctx.client, self, &call.vm, run, || {
                        secrets::generate_password(*length, *symbols)
                    })
                    .await?;
                (value, false, Some(name))
            }
        };
        if crypted && call.windows {
            return Err(Error::UnsupportedForOs(format!(
                "{} is a Windows guest: Windows cannot take a crypt(3) hash; use a plaintext or generated password",
                call.vm
            )));
        }
        call.shim
            .set_password(&SetPasswordRequest {
                domain: call.domain.clone(),
                user: call.user.clone(),
                password,
                crypted,
            })
            .await?;
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
