//! Cases about scheduled rotation (`spec.rotation`): schedules and time zones that are not
//! what they look like. The server cannot check a cron string or a zone name; the
//! controller refuses them with `InvalidSpec` before any password is generated.
use super::*;
use serde_json::json;

/// A reset of generated passwords with `rotation` as given.
fn rotating(name: &str, rotation: Value) -> Value {
    reset(name)
        .set("spec.password", json!({"generate": {"length": 20}}))
        .set("spec.rotation", rotation)
        .v()
}

#[test]
fn a_schedule_that_is_not_five_cron_fields_is_invalid_spec() {
    apply(&[rotating("cron-seconds", json!({"schedule": "0 0 3 * * 0"}))]);
    expect_stalled(
        "gpr",
        "cron-seconds",
        "InvalidSpec",
        "is not a cron schedule of five fields",
    );
}

#[test]
fn a_schedule_that_never_comes_is_invalid_spec() {
    apply(&[rotating("cron-feb31", json!({"schedule": "0 0 31 2 *"}))]);
    expect_stalled(
        "gpr",
        "cron-feb31",
        "InvalidSpec",
        "names no time that ever comes",
    );
}

#[test]
fn an_unknown_time_zone_is_invalid_spec_naming_it() {
    apply(&[rotating(
        "cron-mars",
        json!({"schedule": "@daily", "timeZone": "Mars/Olympus"}),
    )]);
    expect_stalled("gpr", "cron-mars", "InvalidSpec", "\"Mars/Olympus\"");
}

#[test]
fn both_every_and_schedule_is_invalid_spec() {
    let both = rotating(
        "cron-both",
        json!({"every": "720h", "schedule": "0 3 * * 0"}),
    );
    if applied_unless_the_server_refuses(
        &[both],
        "set exactly one of rotation.every and rotation.schedule",
    ) {
        expect_stalled(
            "gpr",
            "cron-both",
            "InvalidSpec",
            "set exactly one of rotation.every and rotation.schedule",
        );
    }
}
