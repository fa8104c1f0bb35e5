//! The target part shared by set-password, add-key and remove-key: one VM by name or every
//! running VM a selector matches (`spec.target`), the rollout settings, the object's name,
//! and `--dry-run` (the VMs that would be targeted and their nodes; nothing is created).
use crate::cli::{Rollout, Targets};
use crate::util::{Call, VMIS, exit, fail, object_name};
use guestcred_api::kubevirt::VirtualMachineInstance;
use guestcred_api::{RolloutSpec, TargetSpec};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

/// `spec.target` from the command line (a usage error when the selector does not parse).
pub fn target_spec(t: &Targets) -> anyhow::Result<TargetSpec> {
    match (&t.vm, &t.selector) {
        (Some(vm), None) => Ok(TargetSpec {
            vm_name: Some(vm.clone()),
            selector: None,
        }),
        (None, Some(sel)) => Ok(TargetSpec {
            vm_name: None,
            selector: Some(crate::selector::parse(sel).map_err(|e| fail(exit::USAGE, e))?),
        }),
        // clap's group makes this unreachable from the command line.
        _ => Err(fail(
            exit::USAGE,
            "give either a VM name or -l SELECTOR, not both",
        )),
    }
}

impl Rollout {
    /// The rollout fields of the spec, checked as the API checks them (a usage error
    /// before anything is created).
    pub fn spec(&self, paused: bool) -> anyhow::Result<RolloutSpec> {
        let spec = RolloutSpec {
            max_concurrency: self.max_concurrency,
            max_failures: self.max_failures,
            deadline_seconds: u32::try_from(self.deadline.as_secs()).unwrap_or(u32::MAX),
            paused,
        };
        spec.check().map_err(|e| fail(exit::USAGE, e))?;
        Ok(spec)
    }
}

/// `<vm>-<kind>-<random>`, or `bulk-<kind>-<random>` for a selector.
pub fn name(t: &Targets, kind: &str) -> String {
    object_name(t.vm.as_deref().unwrap_or("bulk"), kind)
}

/// One row of the dry run: the VM, its node, phase, agent, and whether a run targets it
/// (running VMIs only, as the controller picks them).
fn row(v: &VirtualMachineInstance) -> (Vec<String>, bool) {
    let running = v.is_running();
    let row = vec![
        v.name_any(),
        v.node_name().unwrap_or("-").into(),
        v.status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "-".into()),
        if v.agent_connected() {
            "Connected"
        } else {
            "NotConnected"
        }
        .into(),
        if running { "yes" } else { "no (not running)" }.into(),
    ];
    (row, running)
}

/// The dry run's report: a table of `found` and how many of them a run would target.
pub fn report(found: &[VirtualMachineInstance], ns: &str) -> (String, usize) {
    let mut rows = vec![vec![
        "VM".to_string(),
        "NODE".into(),
        "PHASE".into(),
        "AGENT".into(),
        "TARGETED".into(),
    ]];
    let mut targeted = 0;
    for v in found {
        let (r, running) = row(v);
        targeted += usize::from(running);
        rows.push(r);
    }
    let mut text = if found.is_empty() {
        format!("No VirtualMachineInstances match in namespace {ns}.\n")
    } else {
        crate::status::table(&rows)
    };
    text.push_str(&format!(
        "{targeted} VM(s) would be targeted in namespace {ns} (dry run: nothing was created).\n"
    ));
    (text, targeted)
}

/// `--dry-run`: print the VMs a run would target and their nodes; nothing is created.
pub async fn dry_run(client: &Client, ns: &str, t: &Targets) -> anyhow::Result<()> {
    let vmis: Api<VirtualMachineInstance> = Api::namespaced(client.clone(), ns);
    let call = Call {
        verb: "list",
        resource: VMIS,
        namespace: ns,
    };
    let found: Vec<VirtualMachineInstance> = match (&t.vm, &t.selector) {
        (Some(vm), _) => vmis
            .get_opt(vm)
            .await
            .map_err(|e| {
                Call {
                    verb: "get",
                    ..call
                }
                .error(e)
            })?
            .into_iter()
            .collect(),
        (None, Some(sel)) => {
            vmis.list(&ListParams::default().labels(sel))
                .await
                .map_err(|e| call.error(e))?
                .items
        }
        (None, None) => Vec::new(),
    };
    let (text, targeted) = report(&found, ns);
    print!("{text}");
    if targeted == 0 {
        return Err(fail(
            exit::FAILED,
            "no running VM would be targeted (NoTargets)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmi(name: &str, node: &str, phase: &str) -> VirtualMachineInstance {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {},
            "status": {"phase": phase, "nodeName": node,
                "conditions": [{"type": "AgentConnected", "status": "True"}]},
        }))
        .expect("a VMI")
    }

    #[test]
    fn the_dry_run_counts_running_vms_only_and_names_their_nodes() {
        let (text, targeted) = report(
            &[
                vmi("a", "node-1", "Running"),
                vmi("b", "node-2", "Succeeded"),
            ],
            "ns",
        );
        assert_eq!(targeted, 1);
        let rows: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows[1], ["a", "node-1", "Running", "Connected", "yes"]);
        assert_eq!(
            rows[2][..5],
            ["b", "node-2", "Succeeded", "Connected", "no"]
        );
        assert!(text.ends_with(
            "1 VM(s) would be targeted in namespace ns (dry run: nothing was created).\n"
        ));
        let (text, targeted) = report(&[], "ns");
        assert_eq!(targeted, 0);
        assert!(text.starts_with("No VirtualMachineInstances match in namespace ns."));
    }

    #[test]
    fn a_target_is_a_vm_name_or_a_parsed_selector() {
        let mut t = Targets {
            vm: Some("db-0".into()),
            selector: None,
            dry_run: false,
            rollout: Rollout {
                max_concurrency: 10,
                max_failures: 0,
                deadline: std::time::Duration::from_secs(300),
            },
        };
        assert_eq!(
            target_spec(&t).expect("vm").vm_name.as_deref(),
            Some("db-0")
        );
        assert!(name(&t, "rmkey").starts_with("db-0-rmkey-"));
        t.vm = None;
        t.selector = Some("tier=web".into());
        let sel = target_spec(&t).expect("selector").selector.expect("set");
        assert_eq!(sel.match_labels.expect("labels")["tier"], "web");
        assert!(name(&t, "key").starts_with("bulk-key-"));
        t.selector = Some("a in (b".into());
        assert!(target_spec(&t).is_err());
        t.rollout.max_concurrency = 0;
        assert!(
            t.rollout.spec(false).is_err(),
            "1-1000, as the API checks it"
        );
    }
}
