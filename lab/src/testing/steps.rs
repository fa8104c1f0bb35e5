//! The steps controller tests take again and again, one call each: the default world, a
//! guest VM, a password Secret, an object applied, a run waited for. Each fails the test
//! with what went wrong, so a test reads as its scenario:
//!
//! ```ignore
//! let w = world().await;
//! let qga = w.guest("vm-a").await;
//! w.password_secret("pw", SHA512).await;
//! let r = w.run_to_end(&GuestPasswordReset::test("r").vm("vm-a").from_secret("pw").crypted()).await;
//! ```
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use kube::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{HasRun, NS, ResetTest, SHA512, TargetedTest, TestObject, finished, phase, secret};
use crate::hostqga::HostQga;
use crate::kubevirt::{VmDescription, vm};
use crate::world::{World, WorldOptions};
use guestcred::api::{GuestPasswordReset, Phase};

/// How long a step waits for the controller before it fails the test.
pub const STEP_WAIT: Duration = Duration::from_secs(30);

/// The default world (one node, the controller running); fails the test if it cannot start.
pub async fn world() -> World {
    World::start(WorldOptions::default())
        .await
        .expect("test world starts")
}

/// The default world spread over `nodes` nodes (node-1, node-2, …).
pub async fn world_on_nodes(nodes: usize) -> World {
    World::start(WorldOptions {
        nodes,
        ..WorldOptions::default()
    })
    .await
    .expect("test world starts")
}

/// The default world with VM `name` on node-1, whose real agent's guest has user alice.
pub async fn world_with_guest(name: &str) -> (World, HostQga) {
    let w = world().await;
    let qga = w.guest(name).await;
    (w, qga)
}

/// The node the `i`-th VM of a fleet spread over `nodes` nodes runs on: node-1, node-2, …,
/// node-`nodes`, node-1, … in turn.
pub fn node_of(i: usize, nodes: usize) -> String {
    format!("node-{}", i % nodes + 1)
}

/// `user`'s password hash in the guest of `qga` (`None` when the user has none); fails the
/// test if the guest's /etc/shadow cannot be read.
pub fn hash_of(qga: &HostQga, user: &str) -> Option<String> {
    qga.shadow_hash(user)
        .expect("the guest's /etc/shadow is readable")
}

/// The comments of `user`'s authorized keys in the guest of `qga`, sorted: which keys are
/// there ([`super::key_comments`]); fails the test if the file cannot be read.
pub fn keys_of(qga: &HostQga, user: &str) -> Vec<String> {
    super::key_comments(
        &qga.authorized_keys(user)
            .expect("the guest's authorized_keys"),
    )
}

/// Every object `api` lists (all of its scope, no selector); fails the test if the list is
/// refused.
pub async fn list_all<K>(api: &kube::Api<K>) -> Vec<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned,
{
    api.list(&Default::default())
        .await
        .unwrap_or_else(|e| panic!("list {}: {e}", K::plural(&())))
        .items
}

/// What the steps apply and read: any namespaced object (either kind, a Secret, a VM).
pub trait Object:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
{
}

impl<K> Object for K where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned
{
}

/// The steps, on a [`World`].
// Tests await these on their own runtime: the futures need no `Send` bound.
#[allow(async_fn_in_trait)]
pub trait Steps {
    /// VM `name` on node-1 with a real agent whose guest has user alice.
    async fn guest(&self, name: &str) -> HostQga;
    /// The VM (VM and VMI objects) `desc` describes, with no agent behind it.
    async fn vm_without_agent(&self, desc: &VmDescription);
    /// VMs `{tier}-0`, `{tier}-1`, … labelled `tier={tier}`, the i-th on `nodes[i]`, each
    /// with a real agent whose guest has user alice.
    async fn guests_in_tier(&self, tier: &str, nodes: &[&str]) -> Vec<HostQga>;
    /// Simulated VMs (the world's sim agents) named `names`, labelled `fleet={fleet}`, the
    /// i-th on [`node_of`]`(i, nodes)`.
    async fn sim_fleet(&self, fleet: &str, names: &[String], nodes: usize);
    /// Secret `pw` holding [`SHA512`] and reset `fleet` of every VM labelled
    /// `fleet={fleet}` to it (crypted, up to 64 VMs at a time), applied.
    async fn crypted_fleet_reset(&self, fleet: &str) {
        self.crypted_fleet_reset_at(fleet, 64).await;
    }
    /// [`Self::crypted_fleet_reset`], up to `max_concurrency` VMs at a time.
    async fn crypted_fleet_reset_at(&self, fleet: &str, max_concurrency: u32);
    /// Object `name` in [`NS`] once its run finished (waiting up to `within`), checked to
    /// have Succeeded.
    async fn succeeded_within<K: Object + HasRun>(&self, name: &str, within: Duration) -> K;
    /// VMs `names` on `node`, labelled `label` (key, value), each with a real agent whose
    /// guest has user alice: the agents by VM name.
    async fn bulk_guests(
        &self,
        names: impl IntoIterator<Item = String>,
        node: &str,
        label: (&str, &str),
    ) -> BTreeMap<String, HostQga>;
    /// Create or update `obj` (server-side apply); fails the test if it is refused.
    async fn put<K: Object>(&self, obj: &K) -> K;
    /// Deletes object `name` in [`NS`] (it stays while its finalizers run); fails the test
    /// if the delete is refused.
    async fn delete<K: Object>(&self, name: &str);
    /// Waits until object `name` in [`NS`] is gone (up to `within`); fails the test with
    /// what it still looks like.
    async fn gone<K: Object>(&self, name: &str, within: Duration);
    /// Secret `name` holding `value` under the key `password`.
    async fn password_secret(&self, name: &str, value: &str);
    /// Object `name` in [`NS`] once `pred` holds; fails the test after [`STEP_WAIT`].
    async fn once<K: Object>(&self, name: &str, pred: impl Fn(&K) -> bool) -> K;
    /// A JSON merge patch of object `name` in [`NS`]; fails the test if it is refused.
    async fn merge_patch<K: Object>(&self, name: &str, patch: serde_json::Value) -> K;
    /// The Events (events.k8s.io/v1) in [`NS`] with `reason`, each as `"{type}: {note}"`.
    async fn events_with_reason(&self, reason: &str) -> Vec<String>;
    /// `obj` applied, once `pred` holds for it.
    async fn apply_until<K: Object>(&self, obj: &K, pred: impl Fn(&K) -> bool) -> K;
    /// `obj` applied and its run finished (Succeeded, Failed or PartiallySucceeded).
    async fn run_to_end<K: Object + HasRun>(&self, obj: &K) -> K;
}

impl Steps for World {
    async fn guest(&self, name: &str) -> HostQga {
        self.add_guest(&vm(NS, name, "node-1")).await
    }

    async fn vm_without_agent(&self, desc: &VmDescription) {
        self.add_vm(desc, None)
            .await
            .unwrap_or_else(|e| panic!("VM {}: {e:#}", desc.name));
    }

    async fn guests_in_tier(&self, tier: &str, nodes: &[&str]) -> Vec<HostQga> {
        let mut guests = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let desc = vm(NS, &format!("{tier}-{i}"), node).label("tier", tier);
            guests.push(self.add_guest(&desc).await);
        }
        guests
    }

    async fn bulk_guests(
        &self,
        names: impl IntoIterator<Item = String>,
        node: &str,
        label: (&str, &str),
    ) -> BTreeMap<String, HostQga> {
        let mut agents = BTreeMap::new();
        for name in names {
            let desc = vm(NS, &name, node).label(label.0, label.1);
            agents.insert(name, self.add_guest(&desc).await);
        }
        agents
    }

    async fn sim_fleet(&self, fleet: &str, names: &[String], nodes: usize) {
        for (i, name) in names.iter().enumerate() {
            self.add_sim_vm(&vm(NS, name, &node_of(i, nodes)).label("fleet", fleet))
                .await
                .unwrap_or_else(|e| panic!("simulated VM {name}: {e:#}"));
        }
    }

    async fn crypted_fleet_reset_at(&self, fleet: &str, max_concurrency: u32) {
        self.password_secret("pw", SHA512).await;
        self.put(
            &GuestPasswordReset::test("fleet")
                .selector("fleet", fleet)
                .from_secret("pw")
                .crypted()
                .max_concurrency(max_concurrency),
        )
        .await;
    }

    async fn succeeded_within<K: Object + HasRun>(&self, name: &str, within: Duration) -> K {
        let o: K = self
            .wait_for(NS, name, within, finished)
            .await
            .unwrap_or_else(|e| panic!("{} {name} finishes: {e:#}", K::kind(&())));
        assert_eq!(phase(&o), Some(Phase::Succeeded), "{o:#?}");
        o
    }

    async fn put<K: Object>(&self, obj: &K) -> K {
        let name = obj.meta().name.clone().unwrap_or_default();
        self.apply(obj)
            .await
            .unwrap_or_else(|e| panic!("apply {} {name}: {e}", K::kind(&())))
    }

    async fn delete<K: Object>(&self, name: &str) {
        let api: kube::Api<K> = kube::Api::namespaced(self.client.clone(), NS);
        api.delete(name, &Default::default())
            .await
            .unwrap_or_else(|e| panic!("delete {} {name}: {e}", K::kind(&())));
    }

    async fn gone<K: Object>(&self, name: &str, within: Duration) {
        let api: kube::Api<K> = kube::Api::namespaced(self.client.clone(), NS);
        let start = std::time::Instant::now();
        while let Some(o) = api.get_opt(name).await.expect("get") {
            assert!(start.elapsed() < within, "{name} still there: {o:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn password_secret(&self, name: &str, value: &str) {
        self.put(&secret(name, "password", value)).await;
    }

    async fn once<K: Object>(&self, name: &str, pred: impl Fn(&K) -> bool) -> K {
        self.wait_for(NS, name, STEP_WAIT, pred)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    async fn merge_patch<K: Object>(&self, name: &str, patch: serde_json::Value) -> K {
        let api: kube::Api<K> = kube::Api::namespaced(self.client.clone(), NS);
        let params = kube::api::PatchParams::default();
        api.patch(name, &params, &kube::api::Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("merge patch of {} {name}: {e}", K::kind(&())))
    }

    async fn events_with_reason(&self, reason: &str) -> Vec<String> {
        let events: kube::Api<k8s_openapi::api::events::v1::Event> =
            kube::Api::namespaced(self.client.clone(), NS);
        list_all(&events)
            .await
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .map(|e| {
                let (type_, note) = (e.type_.unwrap_or_default(), e.note.unwrap_or_default());
                format!("{type_}: {note}")
            })
            .collect()
    }

    async fn apply_until<K: Object>(&self, obj: &K, pred: impl Fn(&K) -> bool) -> K {
        self.put(obj).await;
        self.once(&obj.meta().name.clone().unwrap_or_default(), pred)
            .await
    }

    async fn run_to_end<K: Object + HasRun>(&self, obj: &K) -> K {
        self.apply_until(obj, finished).await
    }
}
