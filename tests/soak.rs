//! Soak: rounds of bulk generated-password runs over many VMs while the shim is killed and
//! restarted, the controller is killed and restarted, status writes get 409s and watches
//! expire. Each round checks the same invariants as tests/faults.rs: every object reaches
//! a terminal state within its deadline, each VM's stored password is applied (it
//! verifies in the guest) and never rewritten, and no password leaks.
//!
//! Ignored by default (minutes, not seconds): `make soak` runs it with `--ignored`.
//! `GUESTCRED_SOAK_ROUNDS` and `GUESTCRED_SOAK_VMS` scale it (defaults 5 and 12).
use guestcred::api::{GuestPasswordReset, Phase};
use guestcred_lab::testing::*;
use guestcred_lab::world::{World, WorldOptions};
use std::time::Duration;

const NODE: &str = "node-1";
const WAIT: Duration = Duration::from_secs(90);

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: run with `make soak`"]
async fn bulk_runs_survive_repeated_faults_with_every_password_applied_once() {
    let rounds = env_or("GUESTCRED_SOAK_ROUNDS", 5);
    let vms = env_or("GUESTCRED_SOAK_VMS", 12);
    let mut lab = World::start(WorldOptions::fault_lab())
        .await
        .expect("the fault lab starts");
    let agents = lab
        .bulk_guests(
            (0..vms).map(|i| format!("vm-{i:03}")),
            NODE,
            ("bulk", "soak"),
        )
        .await;
    let mut all_passwords: Vec<String> = Vec::new();
    for round in 0..rounds {
        let name = format!("soak-{round}");
        let r = GuestPasswordReset::test(&name)
            .selector("bulk", "soak")
            .user("alice")
            .generate(24)
            .max_concurrency(3)
            .deadline_seconds(120);
        lab.apply(&r).await.expect("apply");
        lab.wait_for::<GuestPasswordReset>(NS, &name, WAIT, succeeded_at_least(vms / 3))
            .await
            .expect("a third of the targets done");
        // A different fault mix each round; every round kills something mid-run.
        match round % 4 {
            0 => {
                lab.kill_shim(NODE);
                tokio::time::sleep(Duration::from_millis(500)).await;
                lab.restart_shim(NODE).await;
            }
            1 => {
                lab.kill_controller();
                lab.start_controller();
            }
            2 => {
                lab.api().faults().conflict_next_status_writes(10);
                lab.api().faults().expire_watches();
            }
            _ => {
                lab.kill_controller();
                lab.kill_shim(NODE);
                lab.api().faults().expire_watches();
                lab.restart_shim(NODE).await;
                lab.start_controller();
            }
        }
        let before = lab
            .output_passwords(NS, &format!("guestcred.io/reset={name}"))
            .await;
        let done = lab
            .wait_for::<GuestPasswordReset>(NS, &name, WAIT, finished)
            .await
            .expect("a terminal phase");
        assert_eq!(
            phase(&done),
            Some(Phase::Succeeded),
            "round {round}: {:#?}",
            done.status
        );
        let after = lab
            .output_passwords(NS, &format!("guestcred.io/reset={name}"))
            .await;
        assert_eq!(
            after.len(),
            vms,
            "round {round}: one stored password per VM"
        );
        let context = format!("round {round}: ");
        assert_never_rewritten(&before, &after, &context);
        assert_alice_has_stored_passwords(&agents, &after, &context);
        all_passwords.extend(after.into_values().map(|(_, p)| p));
        assert!(lab.controller_alive(), "round {round}: controller running");
    }
    let canaries: Vec<&str> = all_passwords.iter().map(String::as_str).collect();
    lab.assert_not_leaked(&canaries).await;
}
