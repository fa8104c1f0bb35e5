//! The CRDs' CEL rules (`x-kubernetes-validations`), checked client-side by the controller.
//!
//! kube's generated `validate_cel()` regenerates the whole CRD schema and compiles every
//! rule on each call: ~5 ms of CPU, which was 3/4 of the controller's CPU per reconcile.
//! Here each kind's rules are compiled once per thread and reused.
use super::{GuestPasswordReset, KeypairRebuild};
use kube::CustomResourceExt;
use kube::core::cel::{CompiledSchema, ValidationErrors, Validator, compile_schema};
use serde::Serialize;

/// A kind's compiled rules and the CEL function library they run with.
struct Rules {
    validator: Validator,
    schema: CompiledSchema,
}

impl Rules {
    fn of<K: CustomResourceExt>() -> Self {
        // Both derived CRDs have exactly one version with a schema (the crd-sync test reads it).
        let schema = K::crd()
            .spec
            .versions
            .first()
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or_default();
        Self {
            validator: Validator::new(),
            schema: compile_schema(&schema),
        }
    }

    fn check(&self, obj: &impl Serialize) -> Result<(), ValidationErrors> {
        let value = serde_json::to_value(obj).unwrap_or_default();
        self.validator.validate_compiled(&self.schema, &value, None)
    }
}

// Compiled CEL programs are not `Sync`, so each runtime thread keeps its own copy.
thread_local! {
    static RESET_RULES: Rules = Rules::of::<GuestPasswordReset>();
    static REBUILD_RULES: Rules = Rules::of::<KeypairRebuild>();
}

/// Check a GuestPasswordReset against its CRD's CEL creation rules.
pub fn check_reset(obj: &GuestPasswordReset) -> Result<(), ValidationErrors> {
    RESET_RULES.with(|r| r.check(obj))
}

/// Check a KeypairRebuild against its CRD's CEL creation rules.
pub fn check_rebuild(obj: &KeypairRebuild) -> Result<(), ValidationErrors> {
    REBUILD_RULES.with(|r| r.check(obj))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GuestPasswordResetSpec, KeypairRebuildSpec};

    fn reset_spec(json: serde_json::Value) -> GuestPasswordResetSpec {
        serde_json::from_value(json).expect("a valid spec fixture")
    }

    fn rebuild_spec(json: serde_json::Value) -> KeypairRebuildSpec {
        serde_json::from_value(json).expect("a valid spec fixture")
    }

    /// The compiled rules give a spec the verdict kube's own `validate_cel` gives it.
    fn assert_same_verdict(
        compiled: Result<(), ValidationErrors>,
        kube: Result<(), ValidationErrors>,
        spec: &serde_json::Value,
    ) {
        assert_eq!(
            compiled.map_err(|e| e.to_string()),
            kube.map_err(|e| e.to_string()),
            "{spec}"
        );
    }

    #[test]
    fn compiled_reset_rules_agree_with_kube_validate_cel() {
        let specs = [
            serde_json::json!({"target": {"vmName": "vm-a"}, "password": {"crypted": true, "secretRef": {"name": "s", "key": "k"}}}),
            serde_json::json!({"target": {"vmName": "vm-a"}, "password": {}}),
            serde_json::json!({"target": {"vmName": "vm-a", "selector": {}}, "password": {"generate": {"length": 20}}}),
            serde_json::json!({"target": {"vmName": "vm-a"}, "password": {"crypted": true, "generate": {"length": 20}}}),
        ];
        for spec in specs {
            let obj = GuestPasswordReset::new("r", reset_spec(spec.clone()));
            assert_same_verdict(check_reset(&obj), obj.validate_cel(), &spec);
        }
    }

    fn reset_refusal(spec: serde_json::Value) -> Option<String> {
        check_reset(&GuestPasswordReset::new("r", reset_spec(spec)))
            .err()
            .map(|e| e.to_string())
    }

    #[test]
    fn rotation_applies_to_generated_passwords_only() {
        let refused = reset_refusal(serde_json::json!({"target": {"vmName": "a"},
            "password": {"secretRef": {"name": "s", "key": "k"}}, "rotation": {"every": "720h"}}));
        assert!(
            refused.is_some_and(|e| e.contains("generated passwords only")),
            "a Secret's password cannot rotate by itself"
        );
        let generated = reset_refusal(serde_json::json!({"target": {"vmName": "a"},
            "password": {"generate": {"length": 20}}, "rotation": {"every": "720h"}}));
        assert_eq!(generated, None);
    }

    #[test]
    fn rotation_intervals_under_10_seconds_or_unreadable_are_refused() {
        for every in ["5s", "1ms"] {
            let refused = reset_refusal(serde_json::json!({"target": {"vmName": "a"},
                "password": {"generate": {"length": 20}}, "rotation": {"every": every}}));
            assert!(
                refused.is_some_and(|e| e.contains("at least 10s")),
                "{every}"
            );
        }
        for every in ["10s", "1h30m", "2160h"] {
            let ok = reset_refusal(serde_json::json!({"target": {"vmName": "a"},
                "password": {"generate": {"length": 20}}, "rotation": {"every": every}}));
            assert_eq!(ok, None, "{every}");
        }
    }

    #[test]
    fn rotation_has_exactly_one_of_every_and_schedule() {
        for rotation in [
            serde_json::json!({}),
            serde_json::json!({"every": "720h", "schedule": "0 3 * * 0"}),
        ] {
            let refused = reset_refusal(serde_json::json!({"target": {"vmName": "a"},
                "password": {"generate": {"length": 20}}, "rotation": rotation}));
            assert!(
                refused.is_some_and(
                    |e| e.contains("exactly one of rotation.every and rotation.schedule")
                ),
                "{rotation}"
            );
        }
        let scheduled = reset_refusal(serde_json::json!({"target": {"vmName": "a"},
            "password": {"generate": {"length": 20}},
            "rotation": {"schedule": "0 3 * * 0", "timeZone": "Europe/Berlin"}}));
        assert_eq!(scheduled, None);
    }

    #[test]
    fn a_time_zone_without_a_schedule_is_refused() {
        let refused = reset_refusal(serde_json::json!({"target": {"vmName": "a"},
            "password": {"generate": {"length": 20}},
            "rotation": {"every": "720h", "timeZone": "Europe/Berlin"}}));
        assert!(refused.is_some_and(|e| e.contains("timeZone applies only to rotation.schedule")));
    }

    #[test]
    fn compiled_rebuild_rules_agree_with_kube_validate_cel() {
        let specs = [
            serde_json::json!({"target": {"vmName": "vm-a"}, "publicKeys": {"inline": ["ssh-ed25519 AAAA x"]}}),
            serde_json::json!({"target": {"vmName": "vm-a"}, "publicKeys": {}}),
            serde_json::json!({"target": {"vmName": "vm-a"}, "publicKeys": {"inline": [], "secretRef": {"name": "s", "key": "k"}}}),
        ];
        for spec in specs {
            let obj = KeypairRebuild::new("k", rebuild_spec(spec.clone()));
            assert_same_verdict(check_rebuild(&obj), obj.validate_cel(), &spec);
        }
    }

    const FP: &str = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";

    /// The spec as a real API server validates it: defaults applied (mode Auto,
    /// strategy Replace, replaceAll false), as they are before CEL rules run.
    fn defaulted(mut spec: serde_json::Value) -> KeypairRebuild {
        for (k, v) in [
            ("mode", serde_json::json!("Auto")),
            ("strategy", serde_json::json!("Replace")),
            ("replaceAll", serde_json::json!(false)),
        ] {
            spec.as_object_mut().expect("object").entry(k).or_insert(v);
        }
        KeypairRebuild::new("k", rebuild_spec(spec))
    }

    #[test]
    fn removal_and_inspect_rules_refuse_each_bad_combination_and_agree_with_kube() {
        let keys = serde_json::json!({"inline": ["ssh-ed25519 AAAA x"]});
        let ok = [
            serde_json::json!({"target": {"vmName": "a"}, "publicKeys": keys}),
            serde_json::json!({"target": {"vmName": "a"}, "removeFingerprints": [FP]}),
            serde_json::json!({"target": {"selector": {"matchLabels": {"t": "w"}}}, "removeFingerprints": [FP], "mode": "Live"}),
            serde_json::json!({"target": {"vmName": "a"}, "mode": "Inspect"}),
        ];
        let bad = [
            (
                serde_json::json!({"target": {"vmName": "a"}}),
                "set exactly one of publicKeys",
            ),
            (
                serde_json::json!({"target": {"vmName": "a"}, "publicKeys": keys, "removeFingerprints": [FP]}),
                "set exactly one of publicKeys",
            ),
            (
                serde_json::json!({"target": {"vmName": "a"}, "publicKeys": keys, "mode": "Inspect"}),
                "set exactly one of publicKeys",
            ),
            (
                serde_json::json!({"target": {"selector": {}}, "mode": "Inspect"}),
                "mode Inspect reads one VM's keys",
            ),
            (
                serde_json::json!({"target": {"vmName": "a"}, "removeFingerprints": [FP], "ttlSeconds": 60}),
                "ttlSeconds and replaceAll apply to keys being added",
            ),
            (
                serde_json::json!({"target": {"vmName": "a"}, "mode": "Inspect", "replaceAll": true}),
                "ttlSeconds and replaceAll apply to keys being added",
            ),
            (
                serde_json::json!({"target": {"vmName": "a"}, "removeFingerprints": [FP], "mode": "Rebuild"}),
                "removeFingerprints needs mode Live or Auto",
            ),
            (
                serde_json::json!({"target": {"vmName": "a"}, "removeFingerprints": ["SHA256:abc"]}),
                "each entry is a SHA256 fingerprint",
            ),
        ];
        for spec in ok {
            let obj = defaulted(spec.clone());
            assert_eq!(
                check_rebuild(&obj).map_err(|e| e.to_string()),
                Ok(()),
                "{spec}"
            );
            assert_eq!(obj.spec.action().map(|_| ()), Ok(()), "{spec}");
        }
        for (spec, want) in bad {
            let obj = defaulted(spec.clone());
            let got = check_rebuild(&obj).map_err(|e| e.to_string());
            assert!(
                got.as_ref().is_err_and(|e| e.contains(want)),
                "{spec}: {got:?}"
            );
            assert_eq!(got, obj.validate_cel().map_err(|e| e.to_string()), "{spec}");
        }
    }

    #[test]
    fn compiled_rules_still_refuse_an_invalid_spec() {
        let obj = GuestPasswordReset::new(
            "r",
            reset_spec(serde_json::json!({"target": {"vmName": "vm-a"}, "password": {}})),
        );
        assert!(check_reset(&obj).is_err());
    }
}
