//! `set-password` and `show-password`.
use crate::cli::{Global, SetPassword, ShowPassword};
use crate::follow::{self, conclude};
use crate::targets;
use crate::util::{Call, RESETS, SECRETS, connect, exit, fail, merge_patch};
use guestcred_api::password::{GeneratePolicy, PasswordSource, SealTo};
use guestcred_api::{GuestPasswordReset, GuestPasswordResetSpec, RunSpec, SecretKeyRef};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::{Api, Client, ResourceExt};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};

pub const CREATED_BY: (&str, &str) = ("app.kubernetes.io/created-by", "kubectl-guestcred");

pub async fn set_password(g: &Global, a: SetPassword) -> anyhow::Result<()> {
    let rollout = a.targets.rollout.spec(a.stdin)?;
    if a.generate && !(16..=128).contains(&a.length) {
        return Err(fail(exit::USAGE, "--length must be 16-128"));
    }
    let target = targets::target_spec(&a.targets)?;
    let (client, ns) = connect(g).await?;
    if a.targets.dry_run {
        return targets::dry_run(&client, &ns, &a.targets).await;
    }
    // Read the value before anything is created: nothing half-made when stdin is empty.
    let value = if a.stdin {
        Some(read_password(&a)?)
    } else {
        None
    };
    let name = targets::name(&a.targets, "pw");
    let input_secret = format!("{name}-input");
    let secret_ref = match (&a.from_secret, a.stdin) {
        (Some(s), _) => {
            let (n, k) = s.split_once('/').unwrap_or((s, "password"));
            if n.is_empty() || k.is_empty() {
                return Err(fail(exit::USAGE, "--from-secret takes NAME or NAME/KEY"));
            }
            Some(SecretKeyRef {
                name: n.into(),
                key: k.into(),
                namespace: None,
            })
        }
        (None, true) => Some(SecretKeyRef {
            name: input_secret.clone(),
            key: "password".into(),
            namespace: None,
        }),
        (None, false) => None,
    };
    let mut reset = GuestPasswordReset::new(
        &name,
        GuestPasswordResetSpec {
            common: RunSpec {
                target,
                user: a.user.clone(),
                rollout,
            },
            password: PasswordSource {
                secret_ref,
                crypted: a.crypted,
                generate: a.generate.then_some(GeneratePolicy {
                    length: a.length,
                    charset: Default::default(),
                    seal_to: a.seal_to.clone().map(|age| SealTo { age }),
                }),
            },
            rotation: None,
        },
    );
    reset.metadata.namespace = Some(ns.clone());
    reset.metadata.labels = Some(BTreeMap::from([(
        CREATED_BY.0.to_string(),
        CREATED_BY.1.to_string(),
    )]));
    let resets: Api<GuestPasswordReset> = Api::namespaced(client.clone(), &ns);
    let call = Call {
        verb: "create",
        resource: RESETS,
        namespace: &ns,
    };
    let created = resets
        .create(&PostParams::default(), &reset)
        .await
        .map_err(|e| call.error(e))?;
    println!("guestpasswordreset.guestcred.io/{name} created");
    if let Some(value) = value {
        if let Err(e) = store_input(&client, &ns, &created, &input_secret, value).await {
            // Leave nothing behind that waits for a Secret that will never come.
            let _ = resets.delete(&name, &DeleteParams::default()).await;
            return Err(e);
        }
        let unpause = serde_json::json!({"spec": {"paused": false}});
        merge_patch(&resets, &name, unpause, call).await?;
    }
    if !a.follow.enabled() {
        return Ok(());
    }
    let outcome = follow::follow(&resets, &ns, &name, a.follow.timeout).await?;
    let generated = a.generate && matches!(outcome, follow::Outcome::Finished(_));
    let result = conclude::<GuestPasswordReset>(&name, outcome);
    if generated {
        let mut hint = if a.targets.vm.is_some() {
            format!("kubectl guestcred show-password {name}")
        } else {
            format!("kubectl guestcred show-password {name} --vm VM")
        };
        if a.seal_to.is_some() {
            // Sealed: only the matching identity decrypts it, here, locally.
            hint.push_str(" --identity KEYFILE");
        }
        eprintln!("To see the generated password: {hint}");
    }
    result
}

/// The Secret holding the `--stdin` value, owned by the reset (deleted with it).
async fn store_input(
    client: &Client,
    ns: &str,
    reset: &GuestPasswordReset,
    name: &str,
    value: Vec<u8>,
) -> anyhow::Result<()> {
    let owner = OwnerReference {
        api_version: "guestcred.io/v1alpha1".into(),
        kind: "GuestPasswordReset".into(),
        name: reset.name_any(),
        uid: reset.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            owner_references: Some(vec![owner]),
            labels: Some(BTreeMap::from([(
                CREATED_BY.0.to_string(),
                CREATED_BY.1.to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([("password".into(), ByteString(value))])),
        ..Default::default()
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .map_err(|e| {
            Call {
                verb: "create",
                resource: SECRETS,
                namespace: ns,
            }
            .error(e)
        })?;
    println!("secret/{name} created (owned by the reset)");
    Ok(())
}

/// The password from stdin: from a terminal without echo (asked twice), else all of stdin
/// less one trailing newline.
fn read_password(a: &SetPassword) -> anyhow::Result<Vec<u8>> {
    let who = format!(
        "{}@{}",
        a.user.as_deref().unwrap_or("<default user>"),
        a.targets.vm.as_deref().unwrap_or("<selected VMs>")
    );
    let value = if std::io::stdin().is_terminal() {
        let term = console::Term::stderr();
        eprint!("New password for {who}: ");
        let first = term.read_secure_line()?;
        eprint!("Retype it: ");
        let second = term.read_secure_line()?;
        if first != second {
            return Err(fail(
                exit::USAGE,
                "the two passwords differ; nothing was changed",
            ));
        }
        first.into_bytes()
    } else {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        if buf.ends_with(b"\n") {
            buf.pop();
            if buf.ends_with(b"\r") {
                buf.pop();
            }
        }
        buf
    };
    if value.is_empty() {
        return Err(fail(
            exit::USAGE,
            "--stdin: empty password; nothing was changed",
        ));
    }
    Ok(value)
}

pub async fn show_password(g: &Global, a: ShowPassword) -> anyhow::Result<()> {
    if !a.force && !std::io::stdout().is_terminal() {
        return Err(fail(
            exit::FAILED,
            "refusing to print a password to a non-terminal (pipe or file); add --force if that is what you want",
        ));
    }
    let (client, ns) = connect(g).await?;
    let resets: Api<GuestPasswordReset> = Api::namespaced(client.clone(), &ns);
    let reset = resets.get(&a.reset).await.map_err(|e| {
        Call {
            verb: "get",
            resource: RESETS,
            namespace: &ns,
        }
        .error(e)
    })?;
    if reset.spec.password.generate.is_none() {
        return Err(fail(
            exit::FAILED,
            format!(
                "{} does not generate passwords: its password comes from a Secret you provided",
                a.reset
            ),
        ));
    }
    let targets = reset.status.map(|s| s.run.targets).unwrap_or_default();
    let with_output: Vec<_> = targets
        .iter()
        .filter(|t| a.vm.as_deref().is_none_or(|vm| t.vm == vm))
        .collect();
    let target = match (with_output.as_slice(), &a.vm) {
        ([t], _) => *t,
        ([], Some(vm)) => {
            return Err(fail(
                exit::FAILED,
                format!("{} has no target VM {vm}", a.reset),
            ));
        }
        ([], None) => {
            return Err(fail(
                exit::FAILED,
                format!("{} has no targets yet", a.reset),
            ));
        }
        (many, _) => {
            let vms: Vec<&str> = many.iter().map(|t| t.vm.as_str()).collect();
            return Err(fail(
                exit::USAGE,
                format!(
                    "{} has {} VMs; choose one with --vm ({})",
                    a.reset,
                    vms.len(),
                    vms.join(", ")
                ),
            ));
        }
    };
    let Some(secret_name) = &target.output_secret else {
        return Err(fail(
            exit::FAILED,
            format!(
                "no password stored for VM {} yet (state {:?})",
                target.vm, target.state
            ),
        ));
    };
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    let secret = secrets.get(secret_name).await.map_err(|e| {
        Call {
            verb: "get",
            resource: SECRETS,
            namespace: &ns,
        }
        .error(e)
    })?;
    let value = stored_password(secret_name, secret.data.unwrap_or_default(), &a)?;
    if target.state != guestcred_api::TargetState::Succeeded {
        eprintln!(
            "warning: VM {} is {:?}: the guest may not have this password yet",
            target.vm, target.state
        );
    }
    println!("{value}");
    Ok(())
}

/// Key of a sealed password's armored age ciphertext in its output Secret.
const SEALED_KEY: &str = "password.age";

/// The password an output Secret stores: its `password`, or its sealed `password.age`
/// decrypted with the identity file of `--identity` (never sent anywhere).
fn stored_password(
    secret_name: &str,
    mut data: BTreeMap<String, ByteString>,
    a: &ShowPassword,
) -> anyhow::Result<String> {
    let plain = match (
        data.remove("password"),
        data.remove(SEALED_KEY),
        &a.identity,
    ) {
        (Some(v), _, _) => v.0,
        (None, Some(_), None) => {
            return Err(fail(
                exit::FAILED,
                format!(
                    "the password of {} is sealed: Secret {secret_name} holds only an age ciphertext, \
                     which only the matching identity decrypts; run again with --identity FILE \
                     (your age identity, as age-keygen wrote it)",
                    a.reset
                ),
            ));
        }
        (None, Some(sealed), Some(path)) => {
            let ids =
                age::IdentityFile::from_file(path.to_string_lossy().into_owned()).map_err(|e| {
                    fail(
                        exit::FAILED,
                        format!("--identity {}: cannot read it: {e}", path.display()),
                    )
                })?;
            unseal(&sealed.0, ids)
                .map_err(|e| fail(exit::FAILED, format!("--identity {}: {e}", path.display())))?
        }
        (None, None, _) => {
            return Err(fail(
                exit::FAILED,
                format!("Secret {secret_name} has no password"),
            ));
        }
    };
    String::from_utf8(plain).map_err(|_| fail(exit::FAILED, "the stored password is not UTF-8"))
}

/// Decrypt an armored age ciphertext with the identities of an identity file.
fn unseal(armored: &[u8], ids: age::IdentityFile<age::NoCallbacks>) -> Result<Vec<u8>, String> {
    let ids = ids
        .into_identities()
        .map_err(|e| format!("not an age identity file: {e}"))?;
    if ids.is_empty() {
        return Err("holds no age identity (AGE-SECRET-KEY-1…)".into());
    }
    let decryptor = age::Decryptor::new_buffered(age::armor::ArmoredReader::new(armored))
        .map_err(|e| format!("the stored value is not an age ciphertext: {e}"))?;
    let mut reader = decryptor
        .decrypt(ids.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => {
                "this identity does not match the recipient the password is sealed to".to_string()
            }
            e => format!("cannot decrypt: {e}"),
        })?;
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut plain)
        .map_err(|e| format!("cannot decrypt: {e}"))?;
    Ok(plain)
}

#[cfg(test)]
mod sealed_tests {
    use super::*;

    fn ids_of(id: &age::x25519::Identity) -> age::IdentityFile<age::NoCallbacks> {
        use age::secrecy::ExposeSecret;
        let text = format!("# created: test\n{}\n", id.to_string().expose_secret());
        age::IdentityFile::from_buffer(text.as_bytes()).expect("identity file")
    }

    #[test]
    fn a_sealed_password_decrypts_with_the_matching_identity_file() {
        let id = age::x25519::Identity::generate();
        let sealed = age::encrypt_and_armor(&id.to_public(), b"Plugin-Sealed-1").expect("seal");
        assert_eq!(
            unseal(sealed.as_bytes(), ids_of(&id)).expect("unseal"),
            b"Plugin-Sealed-1"
        );
    }

    #[test]
    fn another_identity_is_told_it_does_not_match() {
        let id = age::x25519::Identity::generate();
        let other = age::x25519::Identity::generate();
        let sealed = age::encrypt_and_armor(&id.to_public(), b"Plugin-Sealed-2").expect("seal");
        let e = unseal(sealed.as_bytes(), ids_of(&other)).expect_err("other identity");
        assert!(e.contains("does not match"), "{e}");
    }
}
