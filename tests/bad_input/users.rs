//! Cases about the guest user: characters and lengths the controller refuses, a bad
//! admin-user annotation, and users the guest does not know.
use super::*;
use serde_json::json;

#[test]
fn user_with_a_colon_is_invalid_user() {
    let mut objs = reset_with_password("colon-user", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["user"] = json!("root:x");
    apply(&objs);
    expect_stalled("gpr", "colon-user", "InvalidUser", "must not contain ':'");
}

#[test]
fn user_with_a_control_character_is_invalid_user() {
    let mut objs = reset_with_password("ctrl-user", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["user"] = json!("ali\u{7}ce");
    apply(&objs);
    expect_stalled("gpr", "ctrl-user", "InvalidUser", "control characters");
}

#[test]
fn over_long_user_is_invalid_user() {
    let mut objs = reset_with_password("long-user", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["user"] = json!("u".repeat(40));
    if applied_unless_the_server_refuses(
        &objs,
        "spec.user: Too long: may not be more than 32 bytes",
    ) {
        expect_stalled("gpr", "long-user", "InvalidUser", "at most 32 characters");
    }
}

#[test]
fn keys_for_a_user_with_a_newline_is_invalid_user() {
    apply(&[rebuild("k-newline-user")
        .set("spec.user", json!("alice\nroot"))
        .v()]);
    expect_stalled("kpr", "k-newline-user", "InvalidUser", "control characters");
}

#[test]
fn admin_user_annotation_with_a_colon_is_invalid_user() {
    // Without spec.user the user comes from the VM's guestcred.io/admin-user annotation.
    let mut objs = reset_with_password("annotated-user", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["target"]["vmName"] = json!("vm-annotated");
    objs[1]["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("user");
    apply(&objs);
    expect_target_failed(
        "gpr",
        "annotated-user",
        "InvalidUser",
        "must not contain ':'",
    );
}

#[test]
fn user_unknown_in_the_guest_fails_with_user_not_found() {
    let mut objs = reset_with_password("ghost-user", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["user"] = json!("ghost");
    apply(&objs);
    expect_target_failed("gpr", "ghost-user", "UserNotFound", "ghost");
    assert_not_leaked(GOOD_PASSWORD);
}

#[test]
fn keys_for_a_user_unknown_in_the_guest_fail_with_user_not_found() {
    apply(&[rebuild("k-ghost-user").set("spec.user", json!("ghost")).v()]);
    expect_target_failed("kpr", "k-ghost-user", "UserNotFound", "ghost");
}
