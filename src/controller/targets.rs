//! Target resolution: which VMIs a spec names, where each runs, which shim serves it, and
//! which guest user to change.
use super::context::Context;
use super::error::Error;
use super::shim_client::ShimApi;
use crate::api::kubevirt::{
    ADMIN_USER_ANNOTATION, VirtualMachine, VirtualMachineInstance, VmiForCall, VmiNamePage,
};
use crate::api::wire::DomainRef;
use crate::api::{TargetSpec, UserSource};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::api::ListParams;
use kube::{Api, Client, Resource, ResourceExt};
use std::sync::Arc;

/// Everything one agent call on one target needs.
pub struct TargetCall {
    pub vm: String,
    pub node: String,
    pub domain: DomainRef,
    pub shim: Arc<dyn ShimApi>,
    pub user: String,
    pub user_source: UserSource,
    pub windows: bool,
    /// The VM asks KubeVirt to propagate credentials for this user through the agent.
    pub conflicts_with_access_credentials: bool,
    /// Generated passwords: the output Secret already recorded for this target.
    pub output_secret: Option<String>,
    pub vmi: VirtualMachineInstance,
    /// The VirtualMachine; None for a VMI without one, and when the call did not read it
    /// ([`VmRead::ForUserOnly`] with a named user).
    pub vm_object: Option<VirtualMachine>,
}

/// Whether a call reads the target's VirtualMachine (always fresh: no VM is cached).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmRead {
    /// The kind needs the VM itself: its annotations record which keys guestcred added
    /// (they must be current, see `key_ownership`), Rebuild edits and restarts it.
    Always,
    /// Only to find the user when the spec names none (the VM's admin-user annotation,
    /// read fresh: a stale one would change the wrong user). With a named user nothing is
    /// needed from the VM: KubeVirt propagates accessCredentials from the running VMI's
    /// spec, which the call reads fresh anyway. Saves one GET per target (bench P6).
    ForUserOnly,
}

/// Whether a call with `spec_user` reads the VM (pure; see [`VmRead`]).
pub fn reads_vm(vm_read: VmRead, spec_user: Option<&str>) -> bool {
    vm_read == VmRead::Always || spec_user.is_none()
}

/// The VM names of a run: the named VMI, or every running VMI matching the selector.
pub async fn resolve(client: &Client, ns: &str, target: &TargetSpec) -> Result<Vec<String>, Error> {
    match (&target.vm_name, &target.selector) {
        (Some(name), None) => Ok(vec![name.clone()]),
        (None, Some(selector)) => {
            let query = selector_query(selector)?;
            let url = VirtualMachineInstance::url_path(&(), Some(ns));
            let mut names = running_names_by_page(|cont| {
                let mut params = ListParams::default().labels(&query).limit(LIST_PAGE);
                if let Some(token) = cont {
                    params = params.continue_token(&token);
                }
                let req = kube::core::Request::new(&url).list(&params);
                async move {
                    let mut req = req.map_err(kube::Error::BuildRequest)?;
                    req.extensions_mut().insert("list");
                    client.request::<VmiNamePage>(req).await
                }
            })
            .await?;
            names.sort();
            if names.is_empty() {
                return Err(Error::NoTargets(format!(
                    "no running VirtualMachineInstance in namespace {ns} matches selector {query:?}"
                )));
            }
            Ok(names)
        }
        _ => Err(Error::InvalidSpec(
            "set exactly one of target.vmName and target.selector".into(),
        )),
    }
}

/// VMIs asked for per LIST page when a selector is resolved: a fleet's whole list in one
/// answer was 107 MB at 100,000 VMIs on a real API server (bench P6), all of it decoded at
/// once; kube-rs's watchers page by 500 as well.
pub const LIST_PAGE: u32 = 500;

/// The names of the running VMIs in every page of a paged LIST: `page(None)` asks for the
/// first page, `page(Some(token))` for the one after the page whose `continue` was `token`,
/// until a page has none. Only the names are kept from each page.
async fn running_names_by_page<F, Fut>(mut page: F) -> Result<Vec<String>, Error>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = kube::Result<VmiNamePage>>,
{
    let mut names = Vec::new();
    let mut cont = None;
    loop {
        let list = page(cont.take()).await?;
        names.extend(list.running_names().map(str::to_string));
        match list.next_page() {
            Some(next) => cont = Some(next.to_string()),
            None => return Ok(names),
        }
    }
}

/// A LabelSelector as a list query string.
pub fn selector_query(selector: &LabelSelector) -> Result<String, Error> {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for LabelSelectorRequirement {
        key,
        operator,
        values,
    } in selector.match_expressions.iter().flatten()
    {
        let values = values.clone().unwrap_or_default().join(",");
        parts.push(match operator.as_str() {
            "In" => format!("{key} in ({values})"),
            "NotIn" => format!("{key} notin ({values})"),
            "Exists" => key.clone(),
            "DoesNotExist" => format!("!{key}"),
            other => {
                return Err(Error::InvalidSpec(format!(
                    "target.selector: unknown operator {other:?} (use In, NotIn, Exists, DoesNotExist)"
                )));
            }
        });
    }
    if parts.is_empty() {
        return Err(Error::InvalidSpec(
            "target.selector is empty: it would match every VM; name the labels to match".into(),
        ));
    }
    Ok(parts.join(","))
}

/// Read the VMI and VM, pick the shim on the VMI's node and the guest user.
pub async fn prepare_call(
    ctx: &Context,
    ns: &str,
    vm: &str,
    spec_user: Option<&str>,
    output_secret: Option<String>,
) -> Result<TargetCall, Error> {
    prepare_call_reading(ctx, ns, vm, spec_user, output_secret, VmRead::Always, None).await
}

/// [`prepare_call`], reading the VM only as `vm_read` says. The VMI is `read` (a fleet
/// run's feed, for a target's first attempt) or read fresh with a GET right before the
/// agent call: its node must be current (a migrated VM is called on its new node, never
/// through a stale one's shim: the shim answers DomainNotFound, which is retried with a
/// fresh read), its phase Running and not paused, and after a Rebuild's restart it must be
/// the new VMI.
pub async fn prepare_call_reading(
    ctx: &Context,
    ns: &str,
    vm: &str,
    spec_user: Option<&str>,
    output_secret: Option<String>,
    vm_read: VmRead,
    read: Option<VirtualMachineInstance>,
) -> Result<TargetCall, Error> {
    let vmi = match read {
        Some(vmi) => vmi,
        None => get_vmi_for_call(&ctx.client, ns, vm)
            .await?
            .ok_or_else(|| Error::VmNotFound(format!("{ns}/{vm}")))?,
    };
    let phase = vmi
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Unknown".into());
    if !vmi.is_running() {
        return Err(Error::VmNotRunning(format!(
            "VirtualMachineInstance {ns}/{vm} is {phase}, not Running"
        )));
    }
    if is_paused(&vmi) {
        return Err(Error::VmNotRunning(format!(
            "VirtualMachineInstance {ns}/{vm} is paused"
        )));
    }
    let node = vmi
        .node_name()
        .ok_or_else(|| {
            Error::VmNotRunning(format!("VirtualMachineInstance {ns}/{vm} has no node yet"))
        })?
        .to_string();
    let vm_object = if reads_vm(vm_read, spec_user) {
        let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), ns);
        vms.get_opt(vm).await?
    } else {
        None
    };
    let windows = vmi.is_windows();
    let (user, user_source) = choose_user(spec_user, vm_object.as_ref(), &vmi, windows);
    crate::api::validate::user(&user)
        .map_err(|e| Error::InvalidUser(format!("user {user:?}: {}", e.message)))?;
    // The running VMI's accessCredentials are what KubeVirt propagates now; the VM's
    // template (when read) also counts: its next VMI propagates them.
    let conflicts_with_access_credentials = vmi
        .access_credential_agent_users()
        .into_iter()
        .chain(
            vm_object
                .iter()
                .flat_map(VirtualMachine::access_credential_agent_users),
        )
        .any(|u| u == user || u == "*");
    let shim = ctx.shims.for_node(&node)?;
    let mut domain = DomainRef::new(ns, vm).with_node(&node);
    if let Some(uid) = vmi.launcher_pod_uid() {
        domain = domain.with_launcher_pod_uid(uid);
    }
    Ok(TargetCall {
        vm: vm.to_string(),
        node,
        domain,
        shim,
        user,
        user_source,
        windows,
        conflicts_with_access_credentials,
        output_secret,
        vmi,
        vm_object,
    })
}

/// GET one VMI, decoded as [`VmiForCall`] (only what a call reads: on a real API server the
/// full decode, managed fields included, was most of a target's VMI read in bench P6);
/// None when it does not exist. The same request as `Api::get_opt`.
async fn get_vmi_for_call(
    client: &Client,
    ns: &str,
    name: &str,
) -> kube::Result<Option<VirtualMachineInstance>> {
    let mut req = kube::core::Request::new(VirtualMachineInstance::url_path(&(), Some(ns)))
        .get(name, &kube::api::GetParams::default())
        .map_err(kube::Error::BuildRequest)?;
    req.extensions_mut().insert("get");
    match client.request::<VmiForCall>(req).await {
        Ok(read) => Ok(Some(read.into_vmi())),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_paused(vmi: &VirtualMachineInstance) -> bool {
    vmi.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Paused" && c.status == "True")
    })
}

/// spec.user, else the VM's (or VMI's) admin-user annotation, else by guest OS.
pub fn choose_user(
    spec_user: Option<&str>,
    vm: Option<&VirtualMachine>,
    vmi: &VirtualMachineInstance,
    windows: bool,
) -> (String, UserSource) {
    if let Some(u) = spec_user {
        return (u.to_string(), UserSource::Spec);
    }
    let annotated = vm
        .and_then(|v| v.annotations().get(ADMIN_USER_ANNOTATION))
        .or_else(|| vmi.annotations().get(ADMIN_USER_ANNOTATION));
    if let Some(u) = annotated {
        return (u.clone(), UserSource::Annotation);
    }
    let user = if windows { "Administrator" } else { "root" };
    (user.to_string(), UserSource::GuestOS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::kubevirt::{GuestOsInfo, VmiStatus};
    use std::collections::BTreeMap;

    fn vmi_in_phase(name: &str, phase: &str) -> VirtualMachineInstance {
        let mut vmi = VirtualMachineInstance::new(name, Default::default());
        vmi.status = Some(VmiStatus {
            phase: Some(phase.into()),
            ..Default::default()
        });
        vmi
    }

    /// A LIST page as the server sends it, read as the resolution reads it.
    fn page(items: Vec<VirtualMachineInstance>, cont: Option<&str>) -> kube::Result<VmiNamePage> {
        let body = serde_json::json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstanceList",
            "metadata": {"continue": cont},
            "items": items,
        });
        Ok(serde_json::from_value(body).expect("a list page decodes"))
    }

    #[tokio::test]
    async fn a_selector_is_resolved_a_page_at_a_time_following_each_continue_token() {
        let mut asked = Vec::new();
        let names = running_names_by_page(|cont| {
            asked.push(cont.clone());
            let answer = match cont.as_deref() {
                None => page(
                    vec![
                        vmi_in_phase("a", "Running"),
                        vmi_in_phase("b", "Scheduling"),
                    ],
                    Some("after-b"),
                ),
                Some("after-b") => page(vec![vmi_in_phase("c", "Running")], Some("after-c")),
                // kube-apiserver's last page may carry an empty continue.
                Some("after-c") => page(vec![vmi_in_phase("d", "Running")], Some("")),
                Some(other) => panic!("unexpected continue token {other:?}"),
            };
            async move { answer }
        })
        .await
        .expect("every page read");
        assert_eq!(
            names,
            ["a", "c", "d"],
            "running VMIs of every page, in order"
        );
        assert_eq!(
            asked,
            [None, Some("after-b".into()), Some("after-c".into())],
            "each page asked with the token of the one before, and no page after the last"
        );
    }

    fn vmi_with_os(id: &str) -> VirtualMachineInstance {
        let mut vmi = VirtualMachineInstance::new("vm", Default::default());
        vmi.status = Some(VmiStatus {
            guest_os_info: Some(GuestOsInfo {
                id: Some(id.into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        vmi
    }

    fn vm_annotated(user: &str) -> VirtualMachine {
        let mut vm = VirtualMachine::new("vm", Default::default());
        vm.metadata.annotations = Some(BTreeMap::from([(
            ADMIN_USER_ANNOTATION.to_string(),
            user.to_string(),
        )]));
        vm
    }

    /// The user chosen for a VM annotated with `annotation` (if any) whose guest OS is `os`.
    fn user_for(spec: Option<&str>, annotation: Option<&str>, os: &str) -> (String, UserSource) {
        let vm = annotation.map(vm_annotated);
        let vmi = vmi_with_os(os);
        choose_user(spec, vm.as_ref(), &vmi, vmi.is_windows())
    }

    #[test]
    fn spec_user_wins_over_annotation() {
        let chosen = user_for(Some("alice"), Some("bob"), "debian");
        assert_eq!(chosen, ("alice".into(), UserSource::Spec));
    }

    #[test]
    fn annotation_wins_over_guest_os() {
        let chosen = user_for(None, Some("cloud-user"), "mswindows");
        assert_eq!(chosen, ("cloud-user".into(), UserSource::Annotation));
    }

    #[test]
    fn windows_guests_default_to_administrator() {
        let chosen = user_for(None, None, "mswindows");
        assert_eq!(chosen, ("Administrator".into(), UserSource::GuestOS));
    }

    #[test]
    fn other_guests_default_to_root() {
        assert_eq!(user_for(None, None, "debian").0, "root");
    }

    #[test]
    fn the_vm_is_read_for_the_user_only_when_the_spec_names_none() {
        assert!(reads_vm(VmRead::ForUserOnly, None));
        assert!(!reads_vm(VmRead::ForUserOnly, Some("root")));
    }

    #[test]
    fn kinds_that_need_the_vm_always_read_it() {
        assert!(reads_vm(VmRead::Always, Some("root")));
        assert!(reads_vm(VmRead::Always, None));
    }

    #[test]
    fn selector_with_labels_and_expressions_becomes_a_query() {
        let sel = LabelSelector {
            match_labels: Some(BTreeMap::from([("tier".to_string(), "db".to_string())])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "zone".into(),
                operator: "In".into(),
                values: Some(vec!["a".into(), "b".into()]),
            }]),
        };
        assert_eq!(
            selector_query(&sel).expect("valid"),
            "tier=db,zone in (a,b)"
        );
    }

    #[test]
    fn empty_selector_is_refused() {
        assert!(matches!(
            selector_query(&LabelSelector::default()),
            Err(Error::InvalidSpec(_))
        ));
    }
}
