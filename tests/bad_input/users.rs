//! Cases about the guest user: characters and lengths the controller refuses, a bad
//! admin-user annotation, and users the guest does not know.
use super::*;
use serde_json::json;

#[test]
fn user_with_a_colon_is_invalid_user() {
    apply_and_expect_stalled(
        &with_good_password(reset("colon-user").set("spec.user", json!("root:x"))),
        "InvalidUser",
        "must not contain ':'",
    );
}

#[test]
fn user_with_a_control_character_is_invalid_user() {
    apply_and_expect_stalled(
        &with_good_password(reset("ctrl-user").set("spec.user", json!("ali\u{7}ce"))),
        "InvalidUser",
        "control characters",
    );
}

#[test]
fn over_long_user_is_invalid_user() {
    expect_refused_or_stalled(
        &with_good_password(reset("long-user").set("spec.user", json!("u".repeat(40)))),
        "spec.user: Too long: may not be more than 32 bytes",
        "InvalidUser",
        "at most 32 characters",
    );
}

#[test]
fn keys_for_a_user_with_a_newline_is_invalid_user() {
    apply_and_expect_stalled(
        &[rebuild("k-newline-user")
            .set("spec.user", json!("alice\nroot"))
            .v()],
        "InvalidUser",
        "control characters",
    );
}

#[test]
fn admin_user_annotation_with_a_colon_is_invalid_user() {
    // Without spec.user the user comes from the VM's guestcred.io/admin-user annotation.
    apply_and_expect_target_failed(
        &with_good_password(
            reset("annotated-user")
                .set("spec.target.vmName", json!("vm-annotated"))
                .remove("spec.user"),
        ),
        "InvalidUser",
        "must not contain ':'",
    );
}

#[test]
fn user_unknown_in_the_guest_fails_with_user_not_found() {
    apply_and_expect_target_failed(
        &with_good_password(reset("ghost-user").set("spec.user", json!("ghost"))),
        "UserNotFound",
        "ghost",
    );
    assert_not_leaked(GOOD_PASSWORD);
}

#[test]
fn keys_for_a_user_unknown_in_the_guest_fail_with_user_not_found() {
    apply_and_expect_target_failed(
        &[rebuild("k-ghost-user").set("spec.user", json!("ghost")).v()],
        "UserNotFound",
        "ghost",
    );
}
