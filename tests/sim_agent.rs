//! SCALE / SIMULATION TEST. The guests here are simulated (`guestcred_lab::simagent`): the
//! shims, the controller, the API server emulator and the HTTP between them are the real
//! code, but no qemu-ga answers. What this shows is the controller and the shims at a scale
//! a machine cannot run real agents for; correctness against a real guest agent is proven
//! by the tests that use host qemu-ga and the TCG guests (tests/controller.rs,
//! tests/e2e_lab.rs, ...), never by this one.
use guestcred::api::GuestPasswordReset;
use guestcred_lab::simagent::{SimAgentOptions, SimOp, SimOutcome};
use guestcred_lab::testing::*;
use guestcred_lab::world::{World, WorldOptions};
use std::time::Duration;

const NODES: usize = 4;
const VMS: usize = 200;

/// A GuestPasswordReset over 200 simulated VMs on 4 nodes (the TCG guest's latencies, 5% of
/// calls failing at once as an agent that is not connected, retried by the controller):
/// every simulated guest ends up holding the value, every call went to the VM's own node,
/// and no VM got a second set-password call after one had succeeded.
#[tokio::test]
async fn simulated_fleet_reset_of_200_vms_on_4_nodes_sets_every_guest_once() {
    let w = World::start(WorldOptions {
        nodes: NODES,
        sim_agent: Some(SimAgentOptions {
            failure_rate: 0.05,
            seed: 19,
            // A call to a VM the node does not have is an error, not a new guest.
            auto_create_domains: false,
            ..SimAgentOptions::default()
        }),
        ..WorldOptions::default()
    })
    .await
    .expect("test world starts");
    let names: Vec<String> = (0..VMS).map(|i| format!("sim-{i:03}")).collect();
    w.sim_fleet("sim", &names, NODES).await;
    w.crypted_fleet_reset("sim").await;
    let _: GuestPasswordReset = w.succeeded_within("fleet", Duration::from_secs(120)).await;

    let mut failures_retried = 0;
    for n in 1..=NODES {
        let node = format!("node-{n}");
        let sim = w.sim_agent(&node).expect("simulated agent");
        let mine: Vec<&String> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| i % NODES + 1 == n)
            .map(|(_, name)| name)
            .collect();
        for name in &mine {
            assert!(
                sim.holds_password(NS, name, "root", SHA512),
                "{node}: {name} does not hold the new password"
            );
        }
        let records = sim.records();
        // Every call this node's shim passed on was for one of its own VMs.
        assert!(
            records
                .iter()
                .all(|r| mine.iter().any(|m| r.domain == format!("{NS}/{m}"))),
            "{node} got a call for another node's VM"
        );
        let second = sim.calls_after_success(SimOp::SetPassword);
        assert!(
            second.is_empty(),
            "{node}: set-password after a recorded success: {second:#?}"
        );
        for name in &mine {
            let sets: Vec<_> = records
                .iter()
                .filter(|r| r.op == SimOp::SetPassword && r.domain == format!("{NS}/{name}"))
                .collect();
            let ok = sets.iter().filter(|r| r.outcome == SimOutcome::Ok).count();
            assert_eq!(ok, 1, "{node}: {name} has {ok} successful sets: {sets:#?}");
            assert!(
                sets.iter()
                    .all(|r| r.digest.as_deref() == Some(&*sim.digest(SHA512))),
                "{node}: {name} was sent another value"
            );
            failures_retried += sets.len() - 1;
        }
    }
    // The seed makes some calls fail: the check above covered retries, not just a clean run.
    assert!(
        failures_retried > 0,
        "no set-password failed; the retry path was not exercised"
    );
}
