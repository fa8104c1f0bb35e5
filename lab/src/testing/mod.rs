//! The test support layer every test binary shares: object builders in the style of
//! `GuestPasswordReset::test("r").vm("a").from_secret("pw")`, the common predicates, one
//! kubectl runner, one log capture and one secret scan. The in-process world they run
//! against is [`crate::world::World`].
//!
//! `use guestcred_lab::testing::*;` brings all of it in.
pub mod api_calls;
pub mod builders;
pub mod guests;
pub mod keys;
pub mod kubectl;
pub mod logs;
pub mod predicates;
pub mod shim;
pub mod steps;

pub use api_calls::{merge_patch, merge_patch_status, sorted_names};
pub use builders::{KeysTest, ResetTest, SecretTest, TargetedTest, TestObject, secret};
pub use guests::labelled_guests;
pub use keys::{HAND, KEY1, KEY2, KEY3, SHA512_OTHER};
pub use kubectl::Kubectl;
pub use logs::{LogCapture, assert_not_leaked, leaks};
pub use predicates::*;
pub use shim::{
    assert_agent_timeout, assert_same_keys, password_request, serve_on_loopback, shim_reason,
    silent_socket,
};
pub use steps::{
    STEP_WAIT, Steps, hash_of, keys_of, list_all, node_of, world, world_on_nodes, world_with_guest,
};

/// The guestcred-lab binary, for tests that drive a lab as a user does. It is another
/// workspace package's: `make test` builds every binary first; fails the test if it is not
/// built.
pub fn lab_binary() -> &'static std::path::Path {
    static LAB: std::sync::LazyLock<std::path::PathBuf> = std::sync::LazyLock::new(|| {
        crate::cluster::lab_binary(None)
            .expect("the guestcred-lab binary (cargo build --workspace --bins)")
    });
    &LAB
}

/// The namespace test objects live in unless they say otherwise.
pub const NS: &str = "default";

/// A crypt(3) SHA-512 hash (`$6$gcTestSalt$…`) that tests set verbatim.
pub const SHA512: &str = "$6$gcTestSalt$U5mGf0Yd1K8Zz3n7u3f9p8m2q6E4rT1yW0xV5cB7nM9kL3jH2gF6dS4aQ8wE1rT5yU7iO9pA2sD4fG6hJ8kL0.";

/// A guest agent whose guest has user `alice` (besides root), as most tests want.
pub fn alice() -> crate::hostqga::HostQgaOptions {
    crate::hostqga::HostQgaOptions::default().user("alice")
}

/// Sends `sig` (e.g. `-STOP`, `-CONT`) to a host-run qemu-ga, to freeze or thaw the agent.
pub fn signal(qga: &crate::hostqga::HostQga, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &qga.pid().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {}", qga.pid());
}

/// Does `hash` (from /etc/shadow) verify `password`? Uses the system's crypt(3), with the
/// password on stdin (never in a process argument).
pub fn verifies(password: &str, hash: &str) -> bool {
    crate::hostqga::crypt_matches(password, hash).expect("perl's crypt(3) verifies hashes")
}

/// alice's password hash in the guest of `qga` ("" when she has none).
pub fn alice_hash(qga: &crate::hostqga::HostQga) -> String {
    qga.shadow_hash("alice")
        .expect("shadow")
        .unwrap_or_default()
}

/// Generated passwords by VM, as [`crate::world::World::output_passwords`] reads them:
/// (resourceVersion, value).
pub type StoredPasswords = std::collections::BTreeMap<String, (String, String)>;

/// Every stored password of `before` is still there, unchanged (same resourceVersion,
/// same value) in `after`; `context` starts each failure message.
pub fn assert_never_rewritten(before: &StoredPasswords, after: &StoredPasswords, context: &str) {
    for (vm, stored) in before {
        assert_eq!(
            after.get(vm),
            Some(stored),
            "{context}{vm}'s stored password was never rewritten"
        );
    }
}

/// alice in the guest of each agent of `agents` (by VM name) has the password `stored`
/// holds for that VM; `context` starts each failure message.
pub fn assert_alice_has_stored_passwords(
    agents: &std::collections::BTreeMap<String, crate::hostqga::HostQga>,
    stored: &StoredPasswords,
    context: &str,
) {
    for (vm, qga) in agents {
        let (_, pw) = stored
            .get(vm)
            .unwrap_or_else(|| panic!("{context}{vm} has no stored password"));
        assert!(
            verifies(pw, &alice_hash(qga)),
            "{context}{vm}'s guest has its stored password"
        );
    }
}

/// The comments (third field) of authorized_keys lines, sorted: which keys are there.
pub fn key_comments(keys: &[String]) -> Vec<String> {
    let mut c: Vec<String> = keys
        .iter()
        .filter_map(|k| k.split_whitespace().nth(2).map(str::to_string))
        .collect();
    c.sort();
    c
}
