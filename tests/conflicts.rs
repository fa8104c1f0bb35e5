//! Optimistic concurrency as the API server itself does it, with no injected fault: a write
//! carrying a stale resourceVersion is refused with 409 Conflict, and the controller,
//! whose status writes carry the resourceVersion they were based on, recovers from a fresh
//! read. (tests/faults.rs injects 409s into the emulator for the cases a real server cannot
//! be made to produce on demand.)
//!
//! `make test` runs this binary twice: on the emulator and, with
//! `GUESTCRED_CONTROL_PLANE=real`, on a real kube-apiserver + etcd (lab/controlplane). One
//! world per run, shared by the tests; each test has objects of its own.
use guestcred::api::kubevirt::VirtualMachine;
use guestcred::api::{GuestPasswordReset, Phase};
use guestcred_lab::hostqga::HostQga;
use guestcred_lab::kubevirt::vm;
use guestcred_lab::testing::{NS, ResetTest, TargetedTest, TestObject, finished, phase, verifies};
use guestcred_lab::world::{World, WorldOptions};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);

struct Lab {
    world: World,
    agents: Vec<HostQga>,
}

/// Two nodes; VMs `race` (node-1) and `race-twice` (node-2, alone there: its shim's calls
/// are its own) have a real qemu-ga with user alice, VM `two-writers` has none (only its
/// object is written).
fn lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| {
        let world = World::start_detached(WorldOptions {
            nodes: 2,
            controller_name: "guestcred-conflicts".into(),
            ..WorldOptions::default()
        })
        .unwrap_or_else(|e| panic!("the conflicts lab must start: {e:#}"));
        let agents = world
            .block_on(async {
                let race = world.add_guest(&vm(NS, "race", "node-1")).await;
                let twice = world.add_guest(&vm(NS, "race-twice", "node-2")).await;
                world.add_vm(&vm(NS, "two-writers", "node-1"), None).await?;
                anyhow::Ok(vec![race, twice])
            })
            .unwrap_or_else(|e| panic!("the conflicts lab must start: {e:#}"));
        Lab { world, agents }
    })
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict")
}

/// A merge patch of VM `two-writers`' status.printableStatus to `value`, conditioned on
/// `resource_version` when one is given.
async fn write_printable_status(
    vms: &Api<VirtualMachine>,
    resource_version: Option<&str>,
    value: &str,
) -> kube::Result<VirtualMachine> {
    let mut patch = json!({"status": {"printableStatus": value}});
    if let Some(rv) = resource_version {
        patch["metadata"] = json!({"resourceVersion": rv});
    }
    vms.patch_status("two-writers", &PatchParams::default(), &Patch::Merge(patch))
        .await
}

/// Two writers of one object's status: the one that read it before the other wrote is
/// refused with 409 (merge patch and update alike, each carrying the resourceVersion it
/// read); a write without a resourceVersion is not conditioned and lands; a fresh read
/// gives a resourceVersion that is accepted.
#[test]
fn a_status_write_on_a_stale_resource_version_is_refused_with_409() {
    let w = &lab().world;
    w.block_on(async {
        let vms: Api<VirtualMachine> = Api::namespaced(w.client.clone(), NS);
        let read_by_a = vms.get("two-writers").await.expect("writer A reads");
        let stale = read_by_a.metadata.resource_version.clone().expect("rv");
        write_printable_status(&vms, None, "Written-by-B")
            .await
            .expect("writer B writes without a precondition");

        let err = write_printable_status(&vms, Some(&stale), "Written-by-A")
            .await
            .expect_err("A's patch on the stale resourceVersion is refused");
        assert!(is_conflict(&err), "{err}");
        let mut replace = read_by_a.clone();
        replace.status = Some(
            serde_json::from_value(json!({"printableStatus": "Written-by-A"})).expect("status"),
        );
        let err = vms
            .replace_status("two-writers", &PostParams::default(), &replace)
            .await
            .expect_err("A's update on the stale resourceVersion is refused");
        assert!(is_conflict(&err), "{err}");
        let now = vms.get("two-writers").await.expect("read");
        assert_eq!(
            now.status
                .as_ref()
                .and_then(|s| s.rest.get("printableStatus")),
            Some(&json!("Written-by-B")),
            "B's status stands"
        );

        let fresh = now.metadata.resource_version.clone().expect("rv");
        write_printable_status(&vms, Some(&fresh), "Written-by-A")
            .await
            .expect("A's patch on a fresh read lands");
    });
}

/// A generated-password reset of alice on VM `vm` (also its name) run while someone keeps
/// editing the reset's labels: every edit moves the resourceVersion the controller's next
/// status write is conditioned on. Checks that the run succeeded and that the API server
/// refused some of its status writes with 409 (else nothing was tested).
fn succeeded_despite_label_edits(vm: &str) {
    let (finished, conflicts) = run_with_label_edits(vm);
    assert_eq!(
        phase(&finished),
        Some(Phase::Succeeded),
        "{:#?}",
        finished.status
    );
    assert!(
        conflicts > 0,
        "no status write conflicted: nothing was tested"
    );
}

/// [`succeeded_despite_label_edits`]' run: the finished object and how many of its status
/// writes the API server refused with 409.
fn run_with_label_edits(vm: &str) -> (GuestPasswordReset, u64) {
    let w = &lab().world;
    let done = AtomicBool::new(false);
    let r = GuestPasswordReset::test(vm)
        .vm(vm)
        .user("alice")
        .generate(24);
    let finished = w.block_on(async {
        let resets: Api<GuestPasswordReset> = Api::namespaced(w.client.clone(), NS);
        let editor = async {
            let mut edits = 0u32;
            // Unconditioned label edits, as `kubectl label --overwrite` sends them; bounded
            // so that a stuck run still ends the test.
            while !done.load(Ordering::SeqCst) && edits < 2000 {
                edits += 1;
                let patch = json!({"metadata": {"labels": {"edit": edits.to_string()}}});
                match resets
                    .patch(vm, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => panic!("label edit: {e}"),
                }
                // Often enough that some status write of a sub-second run conflicts.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            edits
        };
        let run = async {
            w.apply(&r).await.expect("apply");
            let finished = w
                .wait_for(NS, vm, WAIT, |r: &GuestPasswordReset| finished(r))
                .await;
            done.store(true, Ordering::SeqCst);
            finished.expect("the run finishes")
        };
        let (edits, finished) = tokio::join!(editor, run);
        eprintln!("{vm}: {edits} label edits during the run");
        finished
    });
    let path = format!("/guestpasswordresets/{vm}/status");
    let conflicts = w.responses().count("PATCH", &path, 409);
    let accepted = w.responses().count("PATCH", &path, 200);
    eprintln!("{vm}: status writes {accepted} accepted, {conflicts} refused with 409");
    (finished, conflicts)
}

/// The API server refuses some of the status writes of a run whose labels keep changing
/// (409), the controller reads the object fresh and writes again, and the run ends
/// Succeeded with one generated password, stored once and set in the guest.
#[test]
fn labels_edited_while_a_reset_runs_make_its_status_writes_conflict_and_it_still_succeeds() {
    succeeded_despite_label_edits("race");
    let w = &lab().world;
    // Exactly one output Secret (output_password asserts it): one generated password.
    let password = w.block_on(w.output_password(NS, "race", "race"));
    let hash = lab().agents[0]
        .shadow_hash("alice")
        .expect("shadow")
        .expect("alice has a password");
    assert!(
        verifies(&password, &hash),
        "the stored password is the one set"
    );
}

/// A 409 that only a label edit caused is not someone else's status: the write is retried
/// on a fresh read and the password is set once. (The engine compared the object's status
/// with the status it had sent, not with the one the server stored, took the difference
/// for someone else's write, dropped the run as superseded and set the password again.)
#[test]
fn a_status_conflict_caused_by_a_label_edit_does_not_set_the_password_twice() {
    succeeded_despite_label_edits("race-twice");
    assert_eq!(
        lab().world.agent_calls_on("node-2", "set-password"),
        1,
        "one password set, however many status writes conflicted"
    );
}
