//! Builders for the objects tests apply, as extension traits on the API types themselves
//! (they live in guestcred-api): each `test(name)` gives a valid-looking object in
//! namespace `default`, and every setter returns the object, so a chain is the object:
//!
//! ```ignore
//! let r = GuestPasswordReset::test("r").vm("vm-a").from_secret("pw").crypted().user("alice");
//! let k = KeypairRebuild::test("k").selector("tier", "web").inline_keys([KEY1]).ttl(10);
//! let s = secret("pw", "password", "hunter2");
//! ```
use super::NS;
use guestcred::api::keypair::{KeyMode, KeyStrategy, PublicKeySource};
use guestcred::api::password::{GeneratePolicy, PasswordSource};
use guestcred::api::{
    GuestPasswordReset, GuestPasswordResetSpec, KeypairRebuild, KeypairRebuildSpec, RunSpec,
    SecretKeyRef, TargetSpec,
};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::ObjectMeta;
use std::collections::BTreeMap;

/// `Kind::test(name)`: the start of a builder chain.
pub trait TestObject: Sized {
    fn test(name: &str) -> Self;
}

/// What both kinds share: target, user, rollout, namespace.
pub trait TargetedTest: Sized {
    /// The object's metadata and the spec both kinds share.
    fn parts(&mut self) -> (&mut ObjectMeta, &mut RunSpec);

    /// Target one VM by name (replaces a selector).
    fn vm(mut self, name: &str) -> Self {
        self.parts().1.target = TargetSpec {
            vm_name: Some(name.into()),
            selector: None,
        };
        self
    }
    /// Target the VMs labelled `key=value` (replaces a VM name).
    fn selector(mut self, key: &str, value: &str) -> Self {
        self.parts().1.target = TargetSpec {
            vm_name: None,
            selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(key.to_string(), value.to_string())])),
                match_expressions: None,
            }),
        };
        self
    }
    /// Set the target as given, e.g. both a VM name and a selector.
    fn target(mut self, target: TargetSpec) -> Self {
        self.parts().1.target = target;
        self
    }
    fn user(mut self, user: &str) -> Self {
        self.parts().1.user = Some(user.into());
        self
    }
    fn max_concurrency(mut self, n: u32) -> Self {
        self.parts().1.rollout.max_concurrency = n;
        self
    }
    fn max_failures(mut self, n: u32) -> Self {
        self.parts().1.rollout.max_failures = n;
        self
    }
    fn deadline_seconds(mut self, seconds: u32) -> Self {
        self.parts().1.rollout.deadline_seconds = seconds;
        self
    }
    fn paused(mut self) -> Self {
        self.parts().1.rollout.paused = true;
        self
    }
    fn in_namespace(mut self, ns: &str) -> Self {
        self.parts().0.namespace = Some(ns.into());
        self
    }
}

fn secret_ref(name: &str, key: &str) -> SecretKeyRef {
    SecretKeyRef {
        name: name.into(),
        key: key.into(),
        namespace: None,
    }
}

/// `obj`, moved to the namespace test objects live in ([`NS`]).
fn in_test_namespace<K: kube::Resource>(mut obj: K) -> K {
    obj.meta_mut().namespace = Some(NS.into());
    obj
}

/// Both kinds keep the shared spec in `spec.common`.
macro_rules! targeted_test {
    ($($kind:ty),+) => {$(
        impl TargetedTest for $kind {
            fn parts(&mut self) -> (&mut ObjectMeta, &mut RunSpec) {
                (&mut self.metadata, &mut self.spec.common)
            }
        }
    )+};
}

targeted_test!(GuestPasswordReset, KeypairRebuild);

impl TestObject for GuestPasswordReset {
    /// No target and no password source yet; user from the VM (annotation or guest OS).
    fn test(name: &str) -> Self {
        in_test_namespace(GuestPasswordReset::new(
            name,
            GuestPasswordResetSpec {
                common: RunSpec::default(),
                password: PasswordSource::default(),
                rotation: None,
            },
        ))
    }
}

/// Password sources of a [`GuestPasswordReset`].
// `.from_secret(..)` reads as the spec does (`password: {secretRef: ..}`), not a conversion.
#[allow(clippy::wrong_self_convention)]
pub trait ResetTest: Sized {
    /// The password is key `password` of Secret `name` (same namespace).
    fn from_secret(self, name: &str) -> Self;
    /// The password is key `key` of Secret `name`, in namespace `namespace` if given.
    fn from_secret_key(self, name: &str, key: &str, namespace: Option<&str>) -> Self;
    /// A generated password of `length` characters per target.
    fn generate(self, length: u32) -> Self;
    /// Seal the generated password to age recipient `recipient` (after [`Self::generate`]).
    fn sealed_to(self, recipient: &str) -> Self;
    /// The Secret's value is a crypt(3) hash, set verbatim.
    fn crypted(self) -> Self;
    /// Generated passwords rotate every `every` (a Go duration), keeping `keep` earlier.
    fn rotate_every(self, every: &str, keep: u32) -> Self;
}

impl ResetTest for GuestPasswordReset {
    fn from_secret(self, name: &str) -> Self {
        self.from_secret_key(name, "password", None)
    }
    fn from_secret_key(mut self, name: &str, key: &str, namespace: Option<&str>) -> Self {
        let mut r = secret_ref(name, key);
        r.namespace = namespace.map(str::to_string);
        self.spec.password.secret_ref = Some(r);
        self
    }
    fn generate(mut self, length: u32) -> Self {
        self.spec.password.generate = Some(GeneratePolicy {
            length,
            charset: Default::default(),
            seal_to: None,
        });
        self
    }
    fn sealed_to(mut self, recipient: &str) -> Self {
        if let Some(g) = self.spec.password.generate.as_mut() {
            g.seal_to = Some(guestcred::api::password::SealTo {
                age: recipient.into(),
            });
        }
        self
    }
    fn crypted(mut self) -> Self {
        self.spec.password.crypted = true;
        self
    }
    fn rotate_every(mut self, every: &str, keep: u32) -> Self {
        self.spec.rotation = Some(guestcred::api::password::RotationPolicy {
            every: Some(every.into()),
            schedule: None,
            time_zone: None,
            keep_previous: keep,
        });
        self
    }
}

impl TestObject for KeypairRebuild {
    /// Live mode, Replace strategy, no keys and no target yet.
    fn test(name: &str) -> Self {
        in_test_namespace(KeypairRebuild::new(
            name,
            KeypairRebuildSpec {
                common: RunSpec::default(),
                public_keys: None,
                mode: KeyMode::Live,
                strategy: KeyStrategy::Replace,
                replace_all: false,
                ttl_seconds: None,
                overlap_seconds: None,
                on_delete: Default::default(),
                remove_fingerprints: Vec::new(),
            },
        ))
    }
}

/// Keys, mode and strategy of a [`KeypairRebuild`].
pub trait KeysTest: Sized {
    fn inline_keys<I, S>(self, keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>;
    /// The keys are key `key` of Secret `name` (authorized_keys format).
    fn keys_from_secret(self, name: &str, key: &str) -> Self;
    fn mode(self, mode: KeyMode) -> Self;
    fn strategy(self, strategy: KeyStrategy) -> Self;
    fn replace_all(self) -> Self;
    fn ttl(self, seconds: u32) -> Self;
    /// Replace with overlap: the replaced keys stay `seconds` after the new ones verified.
    fn overlap(self, seconds: u32) -> Self;
    /// Remove the keys with these fingerprints (`removeFingerprints`, no `publicKeys`).
    fn remove_fingerprints<I, S>(self, fingerprints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>;
    /// Mode Inspect: read the keys, change nothing (no `publicKeys`).
    fn inspect(self) -> Self;
}

impl KeysTest for KeypairRebuild {
    fn inline_keys<I, S>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.spec.public_keys = Some(PublicKeySource {
            secret_ref: None,
            inline: Some(keys.into_iter().map(|k| k.as_ref().to_string()).collect()),
        });
        self
    }
    fn keys_from_secret(mut self, name: &str, key: &str) -> Self {
        self.spec.public_keys = Some(PublicKeySource {
            secret_ref: Some(secret_ref(name, key)),
            inline: None,
        });
        self
    }
    fn mode(mut self, mode: KeyMode) -> Self {
        self.spec.mode = mode;
        self
    }
    fn strategy(mut self, strategy: KeyStrategy) -> Self {
        self.spec.strategy = strategy;
        self
    }
    fn replace_all(mut self) -> Self {
        self.spec.replace_all = true;
        self
    }
    fn ttl(mut self, seconds: u32) -> Self {
        self.spec.ttl_seconds = Some(seconds);
        self
    }
    fn overlap(mut self, seconds: u32) -> Self {
        self.spec.overlap_seconds = Some(seconds);
        self
    }
    fn remove_fingerprints<I, S>(mut self, fingerprints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.spec.public_keys = None;
        self.spec.remove_fingerprints = fingerprints
            .into_iter()
            .map(|f| f.as_ref().to_string())
            .collect();
        self
    }
    fn inspect(mut self) -> Self {
        self.spec.public_keys = None;
        self.spec.mode = KeyMode::Inspect;
        self
    }
}

impl TestObject for Secret {
    /// An empty Secret in `default` (no type: the API server defaults it to Opaque).
    fn test(name: &str) -> Self {
        in_test_namespace(Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        })
    }
}

/// Contents of a [`Secret`].
pub trait SecretTest: Sized {
    /// `data[key] = value` (any bytes).
    fn data(self, key: &str, value: impl AsRef<[u8]>) -> Self;
    /// `stringData[key] = value`, merged into `data` by the API server.
    fn string_data(self, key: &str, value: &str) -> Self;
    /// No namespace: the client's default namespace applies.
    fn without_namespace(self) -> Self;
}

impl SecretTest for Secret {
    fn data(mut self, key: &str, value: impl AsRef<[u8]>) -> Self {
        self.data
            .get_or_insert_with(Default::default)
            .insert(key.into(), ByteString(value.as_ref().to_vec()));
        self
    }
    fn string_data(mut self, key: &str, value: &str) -> Self {
        self.string_data
            .get_or_insert_with(Default::default)
            .insert(key.into(), value.into());
        self
    }
    fn without_namespace(mut self) -> Self {
        self.metadata.namespace = None;
        self
    }
}

/// Secret `name` in `default` holding `value` (any bytes) under `key`.
pub fn secret(name: &str, key: &str, value: impl AsRef<[u8]>) -> Secret {
    Secret::test(name).data(key, value)
}
