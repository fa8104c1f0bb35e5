//! Reading input Secrets, hashing inputs without revealing them, and storing generated
//! passwords before they are applied.
use super::error::Error;
use crate::api::{RunStatus, SecretKeyRef, TargetState};
use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use rand::Rng;
use rand::distr::Alphanumeric;
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use std::collections::BTreeMap;

/// Key of the password inside an output Secret.
pub const OUTPUT_PASSWORD_KEY: &str = "password";
pub const RESET_LABEL: &str = "guestcred.io/reset";
pub const VM_LABEL: &str = "guestcred.io/vm";
/// Label of a sealed output Secret (value `age`): it holds a ciphertext the controller
/// cannot read back (see `controller::sealed`).
pub const SEALED_LABEL: &str = "guestcred.io/sealed";
/// Annotation: the sequence number of a sealed Secret within its target's run (0, 1, …).
pub const SEAL_SEQ_ANNOTATION: &str = "guestcred.io/seal-seq";

/// Refuse references to another namespace (a namespaced object must not read others' Secrets).
pub fn check_same_namespace(r: &SecretKeyRef, own_ns: &str, field: &str) -> Result<(), Error> {
    match r.namespace.as_deref() {
        Some(ns) if !ns.is_empty() && ns != own_ns => Err(Error::InvalidSpec(format!(
            "{field}.namespace {ns:?} differs from this object's namespace {own_ns:?}: cross-namespace Secret references are refused; copy the Secret into {own_ns:?}"
        ))),
        _ => Ok(()),
    }
}

/// One key of a Secret, and the Secret's resourceVersion when it was read.
pub struct KeyValue {
    pub value: SecretString,
    pub resource_version: Option<String>,
}

/// The value of one key of a Secret in `ns`, as a secret string (valid UTF-8 required).
pub async fn read_key(client: &Client, ns: &str, r: &SecretKeyRef) -> Result<KeyValue, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = api
        .get_opt(&r.name)
        .await?
        .ok_or_else(|| Error::SecretNotFound(r.name.clone()))?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(&r.key))
                .map(|s| s.clone().into_bytes())
        })
        .ok_or_else(|| Error::SecretKeyMissing {
            secret: r.name.clone(),
            key: r.key.clone(),
        })?;
    let text = String::from_utf8(bytes).map_err(|_| {
        Error::InvalidPassword(format!(
            "Secret {} key {:?} is not valid UTF-8",
            r.name, r.key
        ))
    })?;
    Ok(KeyValue {
        value: SecretString::from(text),
        resource_version: secret.metadata.resource_version,
    })
}

/// The key that passwords are hashed with before their hash goes into status: 32 random
/// bytes in a Secret of the controller's own namespace that only the controller reads.
/// Created once and kept (never part of a Helm render, which would change it on every
/// upgrade and re-run every object). Anyone who can read an object's status, but not that
/// Secret, cannot test guesses of the password against `status.inputHash` offline (with
/// a key anyone can read, such as the object's UID, they could).
pub struct InputKey(zeroize::Zeroizing<Vec<u8>>);

impl std::fmt::Debug for InputKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InputKey([REDACTED])")
    }
}

/// Key of the input key inside its Secret.
pub const INPUT_KEY_DATA: &str = "key";

impl InputKey {
    #[cfg(test)]
    pub fn fixed(bytes: &[u8]) -> Self {
        Self(zeroize::Zeroizing::new(bytes.to_vec()))
    }

    /// "hmac-sha256k:<hex>" of the object's UID and `parts`, keyed with this key.
    pub fn hash(&self, uid: &str, parts: &[&[u8]]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts keys of any length");
        for p in std::iter::once(uid.as_bytes()).chain(parts.iter().copied()) {
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        format!("hmac-sha256k:{}", hex::encode(mac.finalize().into_bytes()))
    }

    /// The key in Secret `ns/name`, creating the Secret with a new random key if there is
    /// none (a concurrent creator's key wins: the create answers 409 and it is read).
    pub async fn ensure(client: &Client, ns: &str, name: &str) -> Result<Self, Error> {
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        let read = |s: Secret| -> Result<Self, Error> {
            s.data
                .and_then(|mut d| d.remove(INPUT_KEY_DATA))
                .filter(|b| b.0.len() >= 32)
                .map(|b| Self(zeroize::Zeroizing::new(b.0)))
                .ok_or_else(|| {
                    Error::InvalidSpec(format!(
                        "Secret {ns}/{name} has no {INPUT_KEY_DATA:?} of at least 32 bytes; delete it to have a new key made"
                    ))
                })
        };
        if let Some(s) = api.get_opt(name).await? {
            return read(s);
        }
        let mut key = zeroize::Zeroizing::new(vec![0u8; 32]);
        rand::Rng::fill(&mut rand::rng(), key.as_mut_slice());
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "guestcred".to_string(),
                )])),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(
                INPUT_KEY_DATA.to_string(),
                k8s_openapi::ByteString(key.to_vec()),
            )])),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(Self(key)),
            Err(kube::Error::Api(s)) if s.code == 409 => read(api.get(name).await?),
            Err(e) => Err(e.into()),
        }
    }
}

/// "hmac-sha256:<hex>" of `parts`, keyed with `key` (the object's UID): it changes with
/// the input. For inputs that are not secret (key fingerprints, generate settings), and to
/// recognise password hashes status recorded before the controller had an [`InputKey`].
pub fn keyed_hash(key: &str, parts: &[&[u8]]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC accepts keys of any length");
    for p in parts {
        mac.update(&(p.len() as u64).to_be_bytes());
        mac.update(p);
    }
    format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
}

/// A random password from the OS RNG.
pub fn generate_password(length: u32, symbols: bool) -> SecretString {
    const SYMBOLS: &[u8] = b"-_.+=@%";
    let mut rng = rand::rng();
    let s: String = (0..length)
        .map(|_| {
            if symbols && rng.random_ratio(1, 6) {
                SYMBOLS[rng.random_range(0..SYMBOLS.len())] as char
            } else {
                rng.sample(Alphanumeric) as char
            }
        })
        .collect();
    SecretString::from(s)
}

/// Name of the output Secret of one target in one run: readable (`<reset>-<vm>-…`) and
/// unique. The digest covers the run (its keyed input hash, which includes the object's
/// UID) and the VM, so two objects or VMs whose names join to the same text (`a-b` + `c`
/// and `a` + `b-c`), a recreated object of the same name, and a new run after a spec
/// change never share a Secret. Each readable part is cut so the name stays a valid DNS
/// subdomain of at most 253 characters.
pub fn output_secret_name(owner: &str, vm: &str, run: &str) -> String {
    use sha2::Digest;
    let mut h = Sha256::new();
    for part in [run, vm] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest = hex::encode(&h.finalize()[..6]);
    let part = |s: &str| -> String {
        let mut s = s.to_string();
        s.truncate(100);
        s.trim_end_matches(['-', '.']).to_string()
    };
    format!("{}-{}-pw-{digest}", part(owner), part(vm))
}

/// Label on an output Secret naming the run it was generated for (the digest in its name).
pub const RUN_LABEL: &str = "guestcred.io/run";

/// The [`RUN_LABEL`] value of a target's run: the digest in the name of its (first) Secret.
pub fn run_label_of(output_secret_name: &str) -> String {
    output_secret_name
        .rsplit('-')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Where an output Secret goes: its name, the VM it is for and its run's label value.
pub struct OutputSecret<'a> {
    pub name: &'a str,
    pub vm: &'a str,
    pub run_label: &'a str,
}

/// An output Secret of `owner` (plain or sealed): owned by it (deleted with it), labelled
/// with the object, the VM and the run, holding one key.
pub fn output_secret<K: Resource<DynamicType = ()>>(
    owner: &K,
    at: OutputSecret<'_>,
    (key, value): (&str, Vec<u8>),
) -> Secret {
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(at.name.to_string()),
            namespace: owner.namespace(),
            labels: Some(BTreeMap::from([
                (RESET_LABEL.to_string(), owner.name_any()),
                (VM_LABEL.to_string(), at.vm.to_string()),
                (RUN_LABEL.to_string(), at.run_label.to_string()),
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    "guestcred".to_string(),
                ),
            ])),
            owner_references: owner.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            key.to_string(),
            k8s_openapi::ByteString(value),
        )])),
        ..Default::default()
    }
}

/// The stored generated password of a target in this run, creating (and storing) it first
/// if there is none yet. Returns the Secret's name and the password. Storing comes first so
/// that a restart between "stored" and "applied" re-applies the same password. A Secret of
/// that name is reused only when this object (by UID) owns it; any other is refused, never
/// overwritten or adopted. Secrets of earlier runs are kept (owned, so deleted with the
/// object): the guest may still hold one of their passwords if this run does not finish.
pub async fn ensure_generated<K: Resource<DynamicType = ()>>(
    client: &Client,
    owner: &K,
    vm: &str,
    run: &str,
    make: impl FnOnce() -> SecretString,
) -> Result<(String, SecretString), Error> {
    let ns = owner.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let name = output_secret_name(&owner.name_any(), vm, run);
    let uid = owner.uid().unwrap_or_default();
    let r = SecretKeyRef {
        name: name.clone(),
        key: OUTPUT_PASSWORD_KEY.into(),
        namespace: None,
    };
    if let Some(existing) = api.get_opt(&name).await? {
        check_owned(&existing, &uid)?;
        return Ok((name, read_key(client, &ns, &r).await?.value));
    }
    let password = make();
    let run_label = run_label_of(&name);
    let secret = output_secret(
        owner,
        OutputSecret {
            name: &name,
            vm,
            run_label: &run_label,
        },
        (
            OUTPUT_PASSWORD_KEY,
            password.expose_secret().as_bytes().to_vec(),
        ),
    );
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok((name, password)),
        // Someone (an earlier attempt) stored one first: use theirs, never a second one.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            if let Some(existing) = api.get_opt(&name).await? {
                check_owned(&existing, &uid)?;
            }
            Ok((name, read_key(client, &ns, &r).await?.value))
        }
        Err(e) => Err(e.into()),
    }
}

/// Scheduled rotation: delete this object's generated Secrets that are older than the
/// `keep` kept before each VM's current one. Only VMs whose target succeeded in `status`
/// (the guest holds the current password) are pruned; a Secret not owned by this object is
/// never touched.
pub async fn prune_generated<K: Resource<DynamicType = ()>>(
    client: &Client,
    owner: &K,
    status: &RunStatus,
    keep: u32,
) -> Result<usize, Error> {
    let ns = owner.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let uid = owner.uid().unwrap_or_default();
    let listed = api
        .list_metadata(
            &ListParams::default().labels(&format!("{RESET_LABEL}={}", owner.name_any())),
        )
        .await?;
    let stored: Vec<StoredPassword> = listed
        .items
        .iter()
        .filter(|m| owned_by(&m.metadata, &uid))
        .filter_map(|m| {
            let labels = m.metadata.labels.as_ref()?;
            Some(StoredPassword {
                name: m.metadata.name.clone()?,
                vm: labels.get(VM_LABEL)?.clone(),
                created: m.metadata.creation_timestamp.as_ref()?.0,
                sealed: labels.contains_key(SEALED_LABEL).then(|| SealedOrder {
                    run: labels.get(RUN_LABEL).cloned().unwrap_or_default(),
                    seq: m
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(SEAL_SEQ_ANNOTATION))
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0),
                }),
            })
        })
        .collect();
    let current: BTreeMap<&str, &str> = status
        .targets
        .iter()
        .filter(|t| t.state == TargetState::Succeeded)
        .filter_map(|t| Some((t.vm.as_str(), t.output_secret.as_deref()?)))
        .collect();
    let doomed = to_prune(&stored, &current, keep as usize);
    for name in &doomed {
        match api.delete(name, &Default::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(doomed.len())
}

/// A generated Secret as listed: its name, VM and creation time, and for a sealed one its
/// place among the sealed Secrets of its target's run.
#[derive(Clone, Debug)]
struct StoredPassword {
    name: String,
    vm: String,
    created: k8s_openapi::jiff::Timestamp,
    sealed: Option<SealedOrder>,
}

/// A sealed Secret's run ([`RUN_LABEL`]) and number in it ([`SEAL_SEQ_ANNOTATION`]): within
/// one run and VM, a higher number was sealed later.
#[derive(Clone, Debug, PartialEq)]
struct SealedOrder {
    run: String,
    seq: u32,
}

/// The Secrets to delete: per VM whose current Secret is known (its target succeeded: the
/// guest holds that value), those created before it beyond the `keep` newest of them.
/// Never the current one, never a newer one (a run that has not finished may be applying
/// it), never a VM without a current one. A sealed Secret's value may be in the guest
/// (its call may have been sent) and cannot be read back, so it goes only when it is known
/// to be older than the verified one: a lower number of the same run, or created in an
/// earlier second (creation times have whole seconds; a tie may be a newer value, which
/// is kept).
fn to_prune(stored: &[StoredPassword], current: &BTreeMap<&str, &str>, keep: usize) -> Vec<String> {
    let mut doomed = Vec::new();
    for (vm, now) in current {
        let Some(current) = stored.iter().find(|s| s.name == *now) else {
            continue;
        };
        let now_created = current.created;
        let older_than_now = |s: &StoredPassword| match (&s.sealed, &current.sealed) {
            // Sealed Secrets of one run and VM are numbered in the order they were sealed.
            (Some(a), Some(b)) if a.run == b.run => a.seq < b.seq,
            (Some(_), _) => s.created < now_created,
            (None, _) => s.created <= now_created,
        };
        let mut older: Vec<&StoredPassword> = stored
            .iter()
            .filter(|s| s.vm == *vm && s.name != *now && older_than_now(s))
            .collect();
        older.sort_by_key(|s| std::cmp::Reverse(s.created));
        doomed.extend(older.into_iter().skip(keep).map(|s| s.name.clone()));
    }
    doomed
}

/// Is an object with `meta` this object's: its controller owner reference has our UID?
pub fn owned_by(meta: &kube::api::ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

/// An output Secret is this object's only if its controller owner reference has our UID.
pub fn check_owned(secret: &Secret, uid: &str) -> Result<(), Error> {
    if owned_by(&secret.metadata, uid) {
        Ok(())
    } else {
        Err(Error::OutputSecretConflict(format!(
            "Secret {} exists and is not owned by this object: it is neither reused nor overwritten; delete or rename it",
            secret.metadata.name.as_deref().unwrap_or_default()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_secret_names_of_different_objects_or_vms_never_collide() {
        let a = output_secret_name("a-b", "c", "run-of-a-b");
        let b = output_secret_name("a", "b-c", "run-of-a");
        assert_ne!(a, b);
        // Even with the same run hash, the VM part keeps them apart.
        assert_ne!(
            output_secret_name("a-b", "c", "run"),
            output_secret_name("a", "b-c", "run")
        );
    }

    #[test]
    fn a_new_run_gets_a_new_output_secret() {
        assert_ne!(
            output_secret_name("r", "vm", "run-1"),
            output_secret_name("r", "vm", "run-2")
        );
        assert_eq!(
            output_secret_name("r", "vm", "run-1"),
            output_secret_name("r", "vm", "run-1")
        );
    }

    #[test]
    fn output_secret_names_stay_valid_for_the_longest_names() {
        let long = "x".repeat(253);
        let name = output_secret_name(&long, &format!("{}-.", "y".repeat(99)), "run");
        assert!(name.len() <= 253, "{}", name.len());
        let dns = name
            .split('.')
            .all(|l| !l.is_empty() && !l.starts_with('-') && !l.ends_with('-'));
        assert!(dns, "{name}");
        assert!(name.starts_with(&"x".repeat(100)));
    }

    #[test]
    fn input_key_hashes_change_with_the_key_the_object_and_the_input() {
        let k1 = InputKey::fixed(&[1; 32]);
        let k2 = InputKey::fixed(&[2; 32]);
        let a = k1.hash("uid-1", &[b"secret"]);
        assert!(a.starts_with("hmac-sha256k:"));
        assert_ne!(
            a,
            k2.hash("uid-1", &[b"secret"]),
            "without the key, no guess verifies"
        );
        assert_ne!(a, k1.hash("uid-2", &[b"secret"]));
        assert_ne!(a, k1.hash("uid-1", &[b"secret2"]));
        assert_eq!(a, k1.hash("uid-1", &[b"secret"]));
        assert_ne!(a, keyed_hash("uid-1", &[b"secret"]));
        assert!(!format!("{k1:?}").contains('1'));
    }

    #[test]
    fn hash_changes_with_the_input_and_the_key() {
        let a = keyed_hash("uid-1", &[b"secret"]);
        assert_ne!(a, keyed_hash("uid-1", &[b"secret2"]));
        assert_ne!(a, keyed_hash("uid-2", &[b"secret"]));
        assert_eq!(a, keyed_hash("uid-1", &[b"secret"]));
        assert!(!a.contains("secret"));
    }

    #[test]
    fn part_boundaries_matter() {
        assert_ne!(
            keyed_hash("k", &[b"ab", b"c"]),
            keyed_hash("k", &[b"a", b"bc"])
        );
    }

    #[test]
    fn generated_passwords_have_the_requested_length_and_differ() {
        let a = generate_password(24, false);
        let b = generate_password(24, true);
        assert_eq!(a.expose_secret().len(), 24);
        assert_eq!(b.expose_secret().len(), 24);
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert!(a.expose_secret().chars().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn cross_namespace_reference_is_refused() {
        let r = SecretKeyRef {
            name: "s".into(),
            key: "k".into(),
            namespace: Some("other".into()),
        };
        assert!(matches!(
            check_same_namespace(&r, "mine", "password.secretRef"),
            Err(Error::InvalidSpec(_))
        ));
        let same = SecretKeyRef {
            namespace: Some("mine".into()),
            ..r
        };
        assert!(check_same_namespace(&same, "mine", "password.secretRef").is_ok());
    }

    fn stored(name: &str, vm: &str, at: i64) -> StoredPassword {
        StoredPassword {
            name: name.into(),
            vm: vm.into(),
            created: k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + at).expect("time"),
            sealed: None,
        }
    }

    /// VM `vm`'s stored secrets, each a name and when it was created.
    fn stored_of(vm: &str, secrets: &[(&str, i64)]) -> Vec<StoredPassword> {
        secrets
            .iter()
            .map(|&(name, at)| stored(name, vm, at))
            .collect()
    }

    /// VM `vm`'s sealed secrets, each a name and when it was created, each its own run.
    fn sealed_of(vm: &str, secrets: &[(&str, i64)]) -> Vec<StoredPassword> {
        secrets
            .iter()
            .map(|&(name, at)| sealed_in_run(name, vm, at, name, 0))
            .collect()
    }

    fn sealed_in_run(name: &str, vm: &str, at: i64, run: &str, seq: u32) -> StoredPassword {
        StoredPassword {
            sealed: Some(SealedOrder {
                run: run.into(),
                seq,
            }),
            ..stored(name, vm, at)
        }
    }

    /// What `to_prune` lets go of, given each VM's current secret, sorted.
    fn pruned(all: &[StoredPassword], current: &[(&str, &str)], keep: usize) -> Vec<String> {
        let mut doomed = to_prune(all, &current.iter().copied().collect(), keep);
        doomed.sort();
        doomed
    }

    #[test]
    fn a_lower_numbered_sealed_secret_of_the_same_run_is_older_even_in_the_same_second() {
        // A restart right after sealing: number 0 and number 1 of one run, same second.
        // Number 1 verified: number 0 is known to be older, and may go.
        let all = [
            sealed_in_run("a-0", "a", 5, "r2", 0),
            sealed_in_run("a-1", "a", 5, "r2", 1),
            sealed_in_run("x-0", "a", 5, "r3", 0),
        ];
        assert_eq!(pruned(&all, &[("a", "a-1")], 0), ["a-0"]);
        // The other way round (number 0 verified) number 1 is newer: kept.
        assert!(pruned(&all, &[("a", "a-0")], 0).is_empty());
    }

    #[test]
    fn a_sealed_secret_that_may_be_in_the_guest_stays_until_a_newer_value_is_verified() {
        // Run 2 sealed a-2a, its call was sent (maybe applied), the controller restarted
        // and sealed a-2b. Until a-2b is verified the VM's current one is still a-1.
        let all = sealed_of("a", &[("a-1", 1), ("a-2a", 5), ("a-2b", 9)]);
        assert!(pruned(&all, &[("a", "a-1")], 0).is_empty());
        // A VM whose run failed (no current one) keeps all of them.
        assert!(pruned(&all, &[], 0).is_empty());
        // a-2b verified in the guest: the older ones may go.
        assert_eq!(pruned(&all, &[("a", "a-2b")], 0), ["a-1", "a-2a"]);
    }

    #[test]
    fn a_sealed_secret_created_in_the_same_second_as_the_verified_one_is_kept() {
        // Creation times have whole seconds: it may be the newer value.
        let all = sealed_of("a", &[("a-2a", 5), ("a-2b", 5)]);
        assert!(pruned(&all, &[("a", "a-2b")], 0).is_empty());
        // Unsealed ones can be read back (and are never replaced), as before.
        let plain = stored_of("p", &[("p-1", 5), ("p-2", 5)]);
        assert_eq!(pruned(&plain, &[("p", "p-2")], 0), ["p-1"]);
    }

    #[test]
    fn rotation_keeps_the_current_secret_and_the_newest_earlier_ones() {
        let all = [
            stored_of("a", &[("a-1", 1), ("a-2", 2), ("a-3", 3), ("a-4", 4)]),
            stored_of("b", &[("b-1", 1)]),
        ]
        .concat();
        assert_eq!(pruned(&all, &[("a", "a-4")], 1), ["a-1", "a-2"]);
    }

    #[test]
    fn a_vm_without_a_current_secret_keeps_all_of_its_own() {
        let all = stored_of("b", &[("b-1", 1), ("b-2", 2)]);
        assert!(pruned(&all, &[], 0).is_empty());
    }

    #[test]
    fn a_secret_newer_than_the_current_one_is_kept() {
        // A rotation that has not reached this VM yet stored its next password already.
        let all = stored_of("a", &[("a-1", 1), ("a-2", 2), ("a-3", 3)]);
        assert_eq!(pruned(&all, &[("a", "a-2")], 0), ["a-1"]);
    }
}
