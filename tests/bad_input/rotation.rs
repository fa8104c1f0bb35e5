//! Cases about scheduled rotation (`spec.rotation`): schedules and time zones that are not
//! what they look like. The server cannot check a cron string or a zone name; the
//! controller refuses them with `InvalidSpec` before any password is generated.
use super::*;
use serde_json::json;

/// A reset of generated passwords with `rotation` as given.
fn rotating(name: &str, rotation: Value) -> Obj {
    reset(name)
        .set("spec.password", json!({"generate": {"length": 20}}))
        .set("spec.rotation", rotation)
}

#[test]
fn a_schedule_that_is_not_five_cron_fields_is_invalid_spec() {
    apply_and_expect_stalled(
        &[rotating("cron-seconds", json!({"schedule": "0 0 3 * * 0"})).v()],
        "InvalidSpec",
        "is not a cron schedule of five fields",
    );
}

#[test]
fn a_schedule_that_never_comes_is_invalid_spec() {
    apply_and_expect_stalled(
        &[rotating("cron-feb31", json!({"schedule": "0 0 31 2 *"})).v()],
        "InvalidSpec",
        "names no time that ever comes",
    );
}

#[test]
fn an_unknown_time_zone_is_invalid_spec_naming_it() {
    apply_and_expect_stalled(
        &[rotating(
            "cron-mars",
            json!({"schedule": "@daily", "timeZone": "Mars/Olympus"}),
        )
        .v()],
        "InvalidSpec",
        "\"Mars/Olympus\"",
    );
}

#[test]
fn both_every_and_schedule_is_invalid_spec() {
    invalid_spec(
        rotating(
            "cron-both",
            json!({"every": "720h", "schedule": "0 3 * * 0"}),
        ),
        "set exactly one of rotation.every and rotation.schedule",
        "set exactly one of rotation.every and rotation.schedule",
    );
}
