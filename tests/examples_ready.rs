//! Every example in examples/ does what it says: applied with kubectl, as a user would,
//! against a world that has the VMs they name (db-0 and db-1 labelled tier=db, web-0, each
//! with a real qemu-ga whose guest has root and alice), each object ends Ready and
//! Succeeded, and the guests show it.
//!
//! `make test` runs this binary on the emulator and, with `GUESTCRED_CONTROL_PLANE=real`,
//! on a real kube-apiserver (lab/controlplane), where the CRDs' schemas and CEL rules
//! check every example on the way in.
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/
use guestcred_lab::hostqga::HostQga;
use guestcred_lab::kubevirt::vm;
use guestcred_lab::repo_dir;
use guestcred_lab::testing::{NS, verifies};
use guestcred_lab::world::{World, WorldOptions};

/// What examples/*.yaml create (kind/name), and the keys and passwords they carry.
const OBJECTS: [&str; 9] = [
    "guestpasswordreset/db-0-root",
    "guestpasswordreset/web-0-admin",
    "guestpasswordreset/db-1-generated",
    "guestpasswordreset/db-fleet-root",
    "keypairrebuild/web-0-keys",
    "keypairrebuild/db-0-rebuild-key",
    "guestpasswordreset/db-1-alice-weekly",
    "guestpasswordreset/db-0-alice-sealed",
    "keypairrebuild/web-0-alice-overlap",
];
/// The identity of example 08's recipient: published, for this test only.
const EXAMPLE_AGE_IDENTITY: &str =
    "AGE-SECRET-KEY-1NY6YW98QYA4MA9AHQJQ3KN93R7RNEX2NLH4AH0EU2083UK2KE6MQZHMEV3";
const EXAMPLE_KEY: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIJF3X2of517d5Kg00cGhwfj7PqWgUgbbxnZyL96Twgi5";
const FLEET_PASSWORD: &str = "rotate-me-quarterly-2026";
const WEB_ADMIN_HASH: &str = "$6$exampleSalt$3CPr/vQb45sQFdvBm/TEkSym19vMe3VQweVAyOduj31BA4Mp6vxpjoDjssqBvU55c8jQk5a25w4TVseP2qvxD0";

#[test]
fn every_example_applied_with_kubectl_ends_ready_and_the_guests_show_it() {
    let world = World::start_detached(WorldOptions {
        serve: true,
        controller_name: "guestcred-examples".into(),
        ..WorldOptions::default()
    })
    .unwrap_or_else(|e| panic!("the examples world must start: {e:#}"));
    let guests: Vec<HostQga> = world.block_on(async {
        vec![
            world
                .add_guest(&vm(NS, "db-0", "node-1").label("tier", "db"))
                .await,
            world
                .add_guest(&vm(NS, "db-1", "node-1").label("tier", "db"))
                .await,
            world.add_guest(&vm(NS, "web-0", "node-1")).await,
        ]
    });
    let (db0, db1, web0) = (&guests[0], &guests[1], &guests[2]);
    let kubectl = world.kubectl();

    let mut examples: Vec<_> = std::fs::read_dir(repo_dir().join("examples"))
        .expect("examples/")
        .flatten()
        .map(|e| e.path())
        .collect();
    examples.sort();
    assert_eq!(examples.len(), OBJECTS.len(), "one object per example");
    for e in &examples {
        kubectl.run(&["apply", "-f", &e.display().to_string()]);
    }
    let mut wait = vec!["wait", "--for=condition=Ready", "--timeout=240s", "-n", NS];
    wait.extend(OBJECTS);
    kubectl.run(&wait);
    for o in OBJECTS {
        let phase = kubectl.run(&["get", o, "-n", NS, "-o", "jsonpath={.status.phase}"]);
        assert_eq!(phase, "Succeeded", "{o}");
    }

    // The fleet reset ran last or first on db-0 and db-1; either way root's password on
    // db-1 is the fleet's or the generated one, and on db-0 the fleet's or example 01's.
    let root = |g: &HostQga| g.shadow_hash("root").expect("shadow").unwrap_or_default();
    let generated = world.block_on(world.output_password(NS, "db-1-generated", "db-1"));
    assert!(
        verifies(FLEET_PASSWORD, &root(db1)) || verifies(&generated, &root(db1)),
        "db-1: root has neither the fleet's nor the generated password"
    );
    assert!(
        verifies(FLEET_PASSWORD, &root(db0)) || verifies("change-me-0n-first-login", &root(db0)),
        "db-0: root has neither the fleet's nor example 01's password"
    );
    let weekly = world.block_on(world.output_password(NS, "db-1-alice-weekly", "db-1"));
    assert!(
        db1.password_matches("alice", &weekly).expect("shadow"),
        "db-1: alice has the password of the scheduled rotation's Secret"
    );
    let identity: age::x25519::Identity = EXAMPLE_AGE_IDENTITY.parse().expect("identity");
    let sealed = world.block_on(world.output_secrets(NS, "guestcred.io/reset=db-0-alice-sealed"));
    assert_eq!(sealed.len(), 1, "one sealed Secret");
    assert!(
        sealed[0].password.is_empty(),
        "no plaintext in the sealed Secret"
    );
    let armored = sealed[0].sealed.as_deref().expect("a ciphertext");
    let plain = age::decrypt(&identity, armored.as_bytes()).expect("decrypts with the identity");
    let plain = String::from_utf8(plain).expect("utf-8");
    assert!(
        db0.password_matches("alice", &plain).expect("shadow"),
        "db-0: alice has the sealed password"
    );
    let next = kubectl.run(&[
        "get",
        "gpr/db-1-alice-weekly",
        "-n",
        NS,
        "-o",
        "jsonpath={.status.nextRotation}",
    ]);
    assert!(!next.is_empty(), "the next rotation is shown");
    assert_eq!(
        web0.shadow_hash("alice").expect("shadow").as_deref(),
        Some(WEB_ADMIN_HASH),
        "web-0: alice has the example's crypt(3) hash verbatim"
    );
    let alice_keys = web0.authorized_keys("alice").expect("keys");
    assert!(
        alice_keys
            .iter()
            .any(|k| k.contains(EXAMPLE_KEY) && k.contains("alice@2027q1")),
        "web-0: example 09's key is in alice's authorized_keys: {alice_keys:?}"
    );
    for (name, g) in [("web-0", web0), ("db-0", db0)] {
        let keys = g.authorized_keys("root").expect("keys");
        assert!(
            keys.iter().any(|k| k.contains(EXAMPLE_KEY)),
            "{name}: the example's key is not in root's authorized_keys: {keys:?}"
        );
    }
    assert_eq!(
        world.kubevirt().restarts_done(NS, "db-0"),
        1,
        "example 06 rebuilt db-0 once"
    );
}
