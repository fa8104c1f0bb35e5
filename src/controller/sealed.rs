//! Sealed generated passwords (`spec.password.generate.sealTo.age`): the output Secret holds
//! only the armored age ciphertext, so the controller cannot read a sealed value back.
//!
//! - Within one controller process the plaintext is held in memory ([`SealedValues`], a
//!   `SecretString`, zeroized on drop) from sealing until the target is finished, so every
//!   retry re-sends the same value; it is dropped when the target succeeds or fails for
//!   good, when its run ends, and at the latest after the target's deadline.
//! - After a restart the held value is gone. A ciphertext whose value may have reached the
//!   guest (any agent call sent, a timed-out one included) must stay: it is never
//!   overwritten, and scheduled rotation prunes it only once a newer value is verified in
//!   that guest (`secrets::to_prune`). So the restarted controller seals a **new** value into
//!   a **new** Secret (the next sequence number of that target's run) and applies that
//!   ([`next_step`]).
use super::error::Error;
pub use super::secrets::SEAL_SEQ_ANNOTATION;
use super::secrets::{self, RESET_LABEL, RUN_LABEL, SEALED_LABEL, VM_LABEL};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Key of the armored ciphertext inside a sealed output Secret.
pub const SEALED_PASSWORD_KEY: &str = "password.age";
/// Annotation: the age recipient the value is sealed to (public).
pub const SEALED_TO_ANNOTATION: &str = "guestcred.io/sealed-to";

/// The recipient of `spec.password.generate.sealTo.age`, parsed (checksum included).
pub fn recipient(text: &str) -> Result<age::x25519::Recipient, Error> {
    age::x25519::Recipient::from_str(text.trim()).map_err(|e| {
        Error::InvalidSpec(format!(
            "password.generate.sealTo.age is not an age X25519 recipient (age1…, as age-keygen prints it): {e}"
        ))
    })
}

/// `value` encrypted to `to`, ASCII-armored (`-----BEGIN AGE ENCRYPTED FILE-----`).
pub fn seal(to: &age::x25519::Recipient, value: &SecretString) -> Result<String, Error> {
    age::encrypt_and_armor(to, value.expose_secret().as_bytes())
        .map_err(|e| Error::InvalidSpec(format!("sealing to the age recipient failed: {e}")))
}

/// One target's run, as the held values are keyed: (object UID, VM, run hash).
type Key = (String, String, String);

/// A value sealed by this process and not yet finished: the Secret it is sealed in and the
/// plaintext, until `until` (the target's deadline; later it is never sent again).
struct Held {
    secret: String,
    value: SecretString,
    until: Instant,
}

/// Plaintexts of sealed values this process has sealed and whose target is not finished.
/// Never written anywhere; each is zeroized when dropped (`SecretString`).
#[derive(Default)]
pub struct SealedValues(Mutex<HashMap<Key, Held>>);

impl SealedValues {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Held>> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        m.retain(|_, h| h.until > now);
        m
    }

    /// The held value of this target's run: (its Secret, the plaintext).
    fn get(&self, uid: &str, vm: &str, run: &str) -> Option<(String, SecretString)> {
        self.lock()
            .get(&(uid.into(), vm.into(), run.into()))
            .map(|h| (h.secret.clone(), h.value.clone()))
    }

    fn put(
        &self,
        uid: &str,
        vm: &str,
        run: &str,
        secret: &str,
        value: SecretString,
        ttl: Duration,
    ) {
        self.lock().insert(
            (uid.into(), vm.into(), run.into()),
            Held {
                secret: secret.into(),
                value,
                until: Instant::now() + ttl,
            },
        );
    }

    /// The target is finished (succeeded or failed for good): its value is erased.
    pub fn forget(&self, uid: &str, vm: &str) {
        self.lock().retain(|(u, v, _), _| !(u == uid && v == vm));
    }

    /// A run of the object began or goes on: values held for its other (superseded) runs
    /// are never sent again, so they are erased.
    pub fn forget_other_runs(&self, uid: &str, run: &str) {
        self.lock().retain(|(u, _, r), _| !(u == uid && r != run));
    }

    /// The object's run ended (or the object is gone): every value it held is erased.
    pub fn forget_object(&self, uid: &str) {
        self.lock().retain(|(u, _, _), _| u != uid);
    }

    /// How many values are held (for tests of the erasure).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A sealed Secret of one target's run, as listed.
#[derive(Clone, Debug, PartialEq)]
pub struct Existing {
    pub name: String,
    pub seq: u32,
}

/// What to send to a target whose password is sealed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// This process sealed it and still holds it (a retry): send the same value again.
    Resend { secret: String },
    /// Nothing held (first attempt, or after a restart: a sealed value cannot be read back):
    /// seal a new value into a new Secret with this sequence number. Every earlier Secret
    /// of the run stays as it is, since its value may be in the guest.
    SealNew { seq: u32 },
}

/// The decision for one attempt of a sealed target: `held` is the Secret whose value this
/// process holds (if any), `existing` the sealed Secrets of the target's run. A held value
/// is re-sent only while its Secret exists (a value stored nowhere is never sent); anything
/// else gets a new value in a Secret numbered after every existing one, so none is ever
/// overwritten.
pub fn next_step(held: Option<&str>, existing: &[Existing]) -> Step {
    if let Some(secret) = held
        && existing.iter().any(|e| e.name == secret)
    {
        return Step::Resend {
            secret: secret.to_string(),
        };
    }
    Step::SealNew {
        seq: existing.iter().map(|e| e.seq + 1).max().unwrap_or(0),
    }
}

/// Name of the sealed Secret number `seq` of a target's run: number 0 has the name an
/// unsealed Secret would have; later ones a digest that also covers the number.
pub fn sealed_secret_name(owner: &str, vm: &str, run: &str, seq: u32) -> String {
    if seq == 0 {
        secrets::output_secret_name(owner, vm, run)
    } else {
        secrets::output_secret_name(owner, vm, &format!("{run}/sealed-{seq}"))
    }
}

/// How many times a create that finds its name taken (by an earlier Secret of this object
/// that the list did not show yet) moves on to the next number.
const CREATE_TRIES: u32 = 8;

/// Where a target's value is sealed to, and how long its plaintext may be held.
pub struct Sealing<'a> {
    pub to: &'a age::x25519::Recipient,
    /// At most the target's deadline (after it, the value is never sent again).
    pub hold_for: Duration,
}

/// The value to send to `vm` in this run: the held one on a retry, else a new one sealed to
/// `sealing.to` and stored in a new Secret first. Returns the Secret's name and the
/// plaintext.
pub async fn ensure_sealed<K: Resource<DynamicType = ()>>(
    client: &Client,
    held: &SealedValues,
    owner: &K,
    (vm, run): (&str, &str),
    sealing: Sealing<'_>,
    make: impl FnOnce() -> SecretString,
) -> Result<(String, SecretString), Error> {
    let Sealing { to, hold_for } = sealing;
    let ns = owner.namespace().unwrap_or_default();
    let uid = owner.uid().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let first = sealed_secret_name(&owner.name_any(), vm, run, 0);
    let run_label = secrets::run_label_of(&first);
    let listed = api
        .list_metadata(&ListParams::default().labels(&format!(
            "{RESET_LABEL}={},{RUN_LABEL}={run_label},{SEALED_LABEL}=age",
            owner.name_any()
        )))
        .await?;
    let existing: Vec<Existing> = listed
        .items
        .iter()
        .filter(|m| secrets::owned_by(&m.metadata, &uid))
        .filter(|m| m.labels().get(VM_LABEL).map(String::as_str) == Some(vm))
        .filter_map(|m| {
            Some(Existing {
                name: m.metadata.name.clone()?,
                seq: m.annotations().get(SEAL_SEQ_ANNOTATION)?.parse().ok()?,
            })
        })
        .collect();
    let held_now = held.get(&uid, vm, run);
    let mut seq = match next_step(held_now.as_ref().map(|(s, _)| s.as_str()), &existing) {
        Step::Resend { secret } => {
            let (_, value) = held_now.expect("Resend only with a held value");
            return Ok((secret, value));
        }
        Step::SealNew { seq } => seq,
    };
    let password = make();
    let ciphertext = seal(to, &password)?;
    for _ in 0..CREATE_TRIES {
        let name = sealed_secret_name(&owner.name_any(), vm, run, seq);
        let mut secret = secrets::output_secret(
            owner,
            secrets::OutputSecret {
                name: &name,
                vm,
                run_label: &run_label,
            },
            (SEALED_PASSWORD_KEY, ciphertext.clone().into_bytes()),
        );
        secret
            .labels_mut()
            .insert(SEALED_LABEL.to_string(), "age".to_string());
        secret.annotations_mut().extend([
            (SEAL_SEQ_ANNOTATION.to_string(), seq.to_string()),
            (SEALED_TO_ANNOTATION.to_string(), to.to_string()),
        ]);
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                held.put(&uid, vm, run, &name, password.clone(), hold_for);
                return Ok((name, password));
            }
            // Taken: ours (an earlier value, maybe in the guest: kept) → the next number;
            // anyone else's → refused, never overwritten.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                if let Some(taken) = api.get_opt(&name).await? {
                    secrets::check_owned(&taken, &uid)?;
                }
                seq += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::OutputSecretConflict(format!(
        "no free name for a new sealed Secret of VM {vm} after {CREATE_TRIES} tries"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn existing(name: &str, seq: u32) -> Existing {
        Existing {
            name: name.into(),
            seq,
        }
    }

    #[test]
    fn the_first_attempt_seals_a_new_value_as_number_zero() {
        assert_eq!(next_step(None, &[]), Step::SealNew { seq: 0 });
    }

    #[test]
    fn a_retry_in_the_same_process_resends_the_held_value() {
        assert_eq!(
            next_step(Some("s-0"), &[existing("s-0", 0)]),
            Step::Resend {
                secret: "s-0".into()
            }
        );
    }

    #[test]
    fn after_a_restart_a_new_value_goes_into_a_new_secret_and_the_old_stays() {
        // Nothing held: the ciphertext of number 0 (maybe in the guest) cannot be read back.
        assert_eq!(
            next_step(None, &[existing("s-0", 0)]),
            Step::SealNew { seq: 1 }
        );
        assert_eq!(
            next_step(None, &[existing("s-2", 2), existing("s-0", 0)]),
            Step::SealNew { seq: 3 }
        );
    }

    #[test]
    fn a_held_value_whose_secret_is_gone_is_never_sent_again() {
        // Someone deleted the Secret: sending its value would leave a password stored nowhere.
        assert_eq!(
            next_step(Some("s-1"), &[existing("s-0", 0)]),
            Step::SealNew { seq: 1 }
        );
    }

    #[test]
    fn sealed_secret_names_differ_by_number_and_number_zero_is_the_usual_name() {
        let zero = sealed_secret_name("r", "vm", "run", 0);
        assert_eq!(zero, secrets::output_secret_name("r", "vm", "run"));
        assert_ne!(zero, sealed_secret_name("r", "vm", "run", 1));
        assert_ne!(
            sealed_secret_name("r", "vm", "run", 1),
            sealed_secret_name("r", "vm", "run", 2)
        );
    }

    #[test]
    fn a_sealed_value_decrypts_with_the_identity_only() {
        let id = age::x25519::Identity::generate();
        let other = age::x25519::Identity::generate();
        let value = SecretString::from("Sealed-Unit-Value-9q".to_string());
        let armored = seal(&id.to_public(), &value).expect("seal");
        assert!(armored.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
        assert!(!armored.contains("Sealed-Unit-Value-9q"));
        let plain = age::decrypt(&id, armored.as_bytes()).expect("decrypt");
        assert_eq!(plain, b"Sealed-Unit-Value-9q");
        assert!(age::decrypt(&other, armored.as_bytes()).is_err());
    }

    #[test]
    fn a_recipient_with_a_bad_checksum_is_invalid_spec() {
        let good = age::x25519::Identity::generate().to_public().to_string();
        assert!(recipient(&good).is_ok());
        let mut bad = good.clone();
        let last = if bad.ends_with('q') { 'p' } else { 'q' };
        bad.pop();
        bad.push(last);
        assert!(matches!(recipient(&bad), Err(Error::InvalidSpec(_))));
        assert!(matches!(
            recipient("ssh-ed25519 AAAA"),
            Err(Error::InvalidSpec(_))
        ));
    }

    #[test]
    fn held_values_are_erased_when_their_target_or_object_finishes() {
        let v = SealedValues::default();
        let long = Duration::from_secs(60);
        v.put(
            "u1",
            "a",
            "run",
            "s-a",
            SecretString::from("x".to_string()),
            long,
        );
        v.put(
            "u1",
            "b",
            "run",
            "s-b",
            SecretString::from("y".to_string()),
            long,
        );
        v.put(
            "u2",
            "a",
            "run",
            "s-c",
            SecretString::from("z".to_string()),
            long,
        );
        assert!(v.get("u1", "a", "run").is_some());
        assert!(v.get("u1", "a", "other-run").is_none());
        v.forget("u1", "a");
        assert!(v.get("u1", "a", "run").is_none());
        assert_eq!(v.len(), 2);
        v.put(
            "u1",
            "b",
            "run-2",
            "s-e",
            SecretString::from("v".to_string()),
            long,
        );
        v.forget_other_runs("u1", "run-2");
        assert!(
            v.get("u1", "b", "run").is_none(),
            "a superseded run's value is erased"
        );
        assert!(v.get("u1", "b", "run-2").is_some());
        assert!(
            v.get("u2", "a", "run").is_some(),
            "other objects keep theirs"
        );
        v.forget_object("u1");
        assert_eq!(v.len(), 1);
        v.put(
            "u3",
            "a",
            "run",
            "s-d",
            SecretString::from("w".to_string()),
            Duration::ZERO,
        );
        assert!(
            v.get("u3", "a", "run").is_none(),
            "past the deadline it is gone"
        );
    }
}
