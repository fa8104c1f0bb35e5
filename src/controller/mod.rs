//! The controller: reconciles GuestPasswordReset and KeypairRebuild objects.
//!
//! Watches both kinds, VirtualMachineInstances (a target becoming Running or appearing)
//! and Secrets (metadata only: a changed input Secret starts a new run), in every namespace
//! or only those of `--watch-namespaces` (see `namespaces`), and drives each object's
//! targets through the node shims (see `engine`).
pub mod context;
pub mod engine;
pub mod error;
pub mod key_ownership;
pub mod keypair;
pub mod keys;
pub mod leader;
pub mod lenient;
pub mod namespaces;
pub mod password;
pub mod rebuild;
pub mod rotation;
pub mod sealed;
pub mod secrets;
pub mod shim_client;
pub mod shims;
pub mod targets;

use crate::api::kubevirt::VirtualMachineInstance;
use crate::api::{GuestPasswordReset, KeypairRebuild, RunStatus, TargetSpec};
use crate::metrics::ControllerMetrics;
use crate::runtime::LogFormat;
use context::{Context, EngineSettings};
use engine::RunKind;
use error::Error;
use futures::channel::mpsc::UnboundedSender;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::{PartialObjectMeta, Selector, SelectorExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use leader::Leadership;
use namespaces::{WatchScope, watch_scope};
use shims::{ShimAccess, ShimDirectory};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Flags of `guestcred controller` (each also from a GUESTCRED_* environment variable).
#[derive(clap::Args, Clone, Debug)]
pub struct ControllerArgs {
    /// Namespace of the shim DaemonSet's pods (the chart's `shim.namespace`, by default
    /// `<release namespace>-shim`): apart from the controller's own namespace, which can
    /// then enforce Pod Security `restricted` while this one allows the shim's hostPath.
    /// Required: shims are looked up (list/watch pods) in this one namespace only.
    #[arg(long, env = "GUESTCRED_SHIM_NAMESPACE", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub shim_namespace: String,
    /// Name of the shim DaemonSet; only pods it owns (ownerReferences) are called.
    #[arg(
        long,
        env = "GUESTCRED_SHIM_DAEMONSET_NAME",
        default_value = shims::DEFAULT_SHIM_DAEMONSET,
        value_parser = clap::builder::NonEmptyStringValueParser::new()
    )]
    pub shim_daemonset_name: String,
    /// Port the shims listen on.
    #[arg(long, env = "GUESTCRED_SHIM_PORT", default_value_t = 8443)]
    pub shim_port: u16,
    /// File with the bearer token the shims expect (on top of mutual TLS).
    #[arg(long, env = "GUESTCRED_SHIM_TOKEN_FILE")]
    pub shim_token_file: Option<PathBuf>,
    /// CA (PEM) that issued the shims' certificates. Required: shims are called over https
    /// with mutual TLS only (files are re-read when they change).
    #[arg(long, env = "GUESTCRED_SHIM_CA_FILE")]
    pub shim_ca_file: PathBuf,
    /// The controller's client certificate (PEM, SAN `guestcred-controller`); required,
    /// shims refuse handshakes without one.
    #[arg(long, env = "GUESTCRED_SHIM_CLIENT_CERT_FILE")]
    pub shim_client_cert_file: PathBuf,
    /// The controller's client key (PEM).
    #[arg(long, env = "GUESTCRED_SHIM_CLIENT_KEY_FILE")]
    pub shim_client_key_file: PathBuf,
    /// DNS name the shims' certificates carry (checked instead of the pod IP).
    #[arg(long, env = "GUESTCRED_SHIM_SERVER_NAME", default_value = crate::tls::DEFAULT_SHIM_SERVER_NAME)]
    pub shim_server_name: String,
    /// Plain-HTTP address for /metrics, /healthz and /readyz; empty to disable.
    #[arg(long, env = "GUESTCRED_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    pub metrics_listen: String,
    /// A second address for /healthz and /readyz (kubelet probes); empty: none.
    #[arg(long, env = "GUESTCRED_HEALTH_LISTEN", default_value = "")]
    pub health_listen: String,
    /// Bound on one shim request in seconds (keep it above the shim's agent timeout).
    #[arg(
        long,
        env = "GUESTCRED_SHIM_REQUEST_TIMEOUT_SECONDS",
        default_value_t = 15
    )]
    pub shim_request_timeout_seconds: u64,
    /// Name reported as the source of Events.
    #[arg(
        long,
        env = "GUESTCRED_CONTROLLER_NAME",
        default_value = "guestcred-controller"
    )]
    pub controller_name: String,
    /// Log format.
    #[arg(long, env = "GUESTCRED_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Reconcile only while holding a Lease (required with more than one replica).
    #[arg(long, env = "GUESTCRED_LEADER_ELECTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "GUESTCRED_LEASE_NAME",
        default_value = "guestcred-controller"
    )]
    pub lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace, POD_NAMESPACE, else "default").
    #[arg(long, env = "GUESTCRED_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Seconds a lease stays valid without renewal (a dead leader is replaced after this).
    #[arg(long, env = "GUESTCRED_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Watch only these namespaces (comma-separated; the chart's `watchNamespaces`, which
    /// then grants Roles there instead of cluster-wide rules). Objects in any other
    /// namespace are never seen, so never reconciled. None: every namespace.
    #[arg(
        long,
        env = "GUESTCRED_WATCH_NAMESPACES",
        value_delimiter = ',',
        value_parser = namespaces::parse_namespace
    )]
    pub watch_namespaces: Vec<String>,
    /// Async worker threads. The controller mostly waits on the API server and the shims:
    /// one worker used ~12% less CPU per target than two at the same rate (bench P6, see
    /// docs/benchmarks.md). Raise it when the controller's CPU use nears one core.
    #[arg(long, env = "GUESTCRED_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub worker_threads: u16,
}

impl ControllerArgs {
    /// Lease settings when leader election is on.
    pub fn lease(&self) -> Option<leader::LeaseSettings> {
        self.leader_election.then(|| leader::LeaseSettings {
            name: self.lease_name.clone(),
            namespace: self
                .lease_namespace
                .clone()
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "default".into()),
            identity: std::env::var("POD_NAME")
                .unwrap_or_else(|_| format!("{}-{}", self.controller_name, std::process::id())),
            duration_seconds: self.lease_duration_seconds,
            grace_seconds: (self.lease_duration_seconds / 3).max(1),
        })
    }
}

/// Build the controller's runtime (sized by `--worker-threads`) and run the controller on
/// it until it stops.
pub fn main(args: ControllerArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    crate::runtime::start(args.worker_threads, None, "guestcred-controller")
        .context("starting the async runtime")?
        .block_on(run(args))
}

/// `guestcred controller`: connect with the ambient kubeconfig / in-cluster config and run.
pub async fn run(args: ControllerArgs) -> anyhow::Result<()> {
    crate::runtime::logging::init(args.log_format);
    let metrics = Arc::new(ControllerMetrics::new());
    let client = Client::try_default().await?;
    // Files are read off the async workers (the token here, certificates by the reload
    // thread of the TLS client).
    let token = match args.shim_token_file.clone() {
        Some(p) => Some(
            tokio::task::spawn_blocking(move || crate::shim::auth::read_token_file(&p)).await??,
        ),
        None => None,
    };
    let tls = crate::tls::client::ClientTlsFiles {
        ca: args.shim_ca_file.clone(),
        cert: Some(args.shim_client_cert_file.clone()),
        key: Some(args.shim_client_key_file.clone()),
        server_name: args.shim_server_name.clone(),
    };
    let request_timeout = Duration::from_secs(args.shim_request_timeout_seconds);
    // Fail at start on unusable files, not on the first target.
    let http = crate::tls::client::ReloadingHttpClient::load(tls, request_timeout).await?;
    crate::runtime::admin::serve_controller_ops(
        &metrics,
        &args.metrics_listen,
        &args.health_listen,
    )
    .await;
    let access = ShimAccess {
        namespace: args.shim_namespace.clone(),
        daemonset: args.shim_daemonset_name.clone(),
        port: args.shim_port,
        token,
        transport: shims::ShimTransport::MutualTls(Arc::new(http)),
        request_timeout,
    };
    let setup = |client: Client, leadership| Setup {
        client,
        access,
        name: args.controller_name.clone(),
        settings: EngineSettings::default(),
        metrics: metrics.clone(),
        leadership,
        input_key_secret: (own_namespace(), INPUT_KEY_SECRET.to_string()),
        watch: WatchScope::new(&args.watch_namespaces),
    };
    let Some(lease) = args.lease() else {
        start(
            setup(client, Leadership::Always),
            crate::runtime::signals::shutdown_signal(),
        )
        .await;
        return Ok(());
    };
    // A standby is healthy and ready while it waits for the lease (a rollout of two
    // replicas must not wait for the follower to become leader).
    metrics.set_ready(true);
    let (lost, elector, leadership) = tokio::select! {
        acquired = leader::acquire(client.clone(), &lease) => acquired?,
        _ = crate::runtime::signals::shutdown_signal() => return Ok(()),
    };
    let lost = futures::FutureExt::shared(lost);
    let stop = {
        let lost = lost.clone();
        async move {
            tokio::select! {
                _ = lost => {}
                _ = crate::runtime::signals::shutdown_signal() => {}
            }
        }
    };
    start(setup(client, leadership), stop).await;
    elector.abort();
    if futures::FutureExt::now_or_never(lost).is_some() {
        anyhow::bail!(
            "lost the leader lease {}; exiting so a follower takes over",
            lease.name
        );
    }
    Ok(())
}

/// The controller's own namespace: the pod's (POD_NAMESPACE, set by the chart), else
/// "default".
pub fn own_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// What a controller runs with.
pub struct Setup {
    pub client: Client,
    pub access: ShimAccess,
    /// Name reported as the source of Events.
    pub name: String,
    pub settings: EngineSettings,
    pub metrics: Arc<ControllerMetrics>,
    /// Checked before each agent call.
    pub leadership: Leadership,
    /// Where the key that password hashes in status are keyed with lives (namespace,
    /// name): created once by the controller, readable by it alone.
    pub input_key_secret: (String, String),
    /// Where objects, Secrets and VMIs are watched.
    pub watch: WatchScope,
}

/// The default name of the input-key Secret, in the controller's namespace.
pub const INPUT_KEY_SECRET: &str = "guestcred-input-hash-key";

/// Run both controllers until `shutdown` resolves (then in-flight reconciles finish, but
/// start no agent call once leadership is lost).
pub async fn start(
    setup: Setup,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let Setup {
        client,
        access,
        name: controller_name,
        settings,
        metrics,
        leadership,
        input_key_secret,
        watch,
    } = setup;
    let input_key = loop {
        match secrets::InputKey::ensure(&client, &input_key_secret.0, &input_key_secret.1).await {
            Ok(key) => break key,
            Err(e) => {
                warn!(namespace = %input_key_secret.0, secret = %input_key_secret.1, error = %e, "cannot read or create the input-hash key; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let (shims, shim_watch) = ShimDirectory::start(client.clone(), access);
    let shim_task = tokio::spawn(shim_watch);

    let reporter = Reporter {
        controller: controller_name.to_string(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    // Untyped watches: one object that does not match the types must not stop the kind.
    info!(scope = %watch, "watching");
    let (store, stream) =
        lenient::watch::<GuestPasswordReset>(client.clone(), recorder.clone(), &watch);
    let resets = Controller::for_stream(stream, store).with_config(reconcile_limit());
    let (store, stream) =
        lenient::watch::<KeypairRebuild>(client.clone(), recorder.clone(), &watch);
    let rebuilds = Controller::for_stream(stream, store).with_config(reconcile_limit());
    let (reset_triggers, reset_changes) = futures::channel::mpsc::unbounded();
    let (rebuild_triggers, rebuild_changes) = futures::channel::mpsc::unbounded();
    let triggers = Triggers {
        resets: (resets.store(), reset_triggers),
        rebuilds: (rebuilds.store(), rebuild_triggers),
    };
    let (secret_versions, secret_watch) = secret_versions(client.clone(), &watch, triggers.clone());
    let secret_task = tokio::spawn(secret_watch);
    let vmi_task = tokio::spawn(vmi_changes(client.clone(), &watch, triggers));
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder,
        shims,
        settings,
        metrics,
        leadership,
        input_key,
        resets: resets.store(),
        rebuilds: rebuilds.store(),
        secret_versions,
        key_reports: Default::default(),
        sealed: Default::default(),
    });
    // Finished objects whose Secret kept its resourceVersion resync without reading it:
    // give that cache a moment to fill before the first reconciles (a miss only costs a GET).
    let _ = tokio::time::timeout(SECRET_CACHE_WAIT, ctx.secret_versions.wait_until_ready()).await;
    let shutdown = shutdown.shared();
    let resets = resets
        .reconcile_on(reset_changes)
        .graceful_shutdown_on(shutdown.clone())
        .run(
            reconcile::<GuestPasswordReset>,
            error_policy::<GuestPasswordReset>,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    let rebuilds = rebuilds
        .reconcile_on(rebuild_changes)
        .graceful_shutdown_on(shutdown.clone())
        .run(
            reconcile_rebuild,
            error_policy::<KeypairRebuild>,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    ctx.shims.ready().await;
    info!("controller started");
    let synced = async {
        let _ = ctx.resets.wait_until_ready().await;
        let _ = ctx.rebuilds.wait_until_ready().await;
        ctx.metrics.set_ready(true);
    };
    futures::join!(resets, rebuilds, synced);
    shim_task.abort();
    secret_task.abort();
    vmi_task.abort();
    info!("controller stopped");
}

/// Reconciles of one kind running at once. Unbounded, a restart with N finished objects
/// reconciled them all at once: N concurrent API requests, so N connections to the API
/// server kept in the client's pool (1,000 objects: ~580 connections, +45 MiB RSS). A
/// bulk run is one reconcile, so this does not limit targets; it only queues objects
/// beyond it (e.g. many single-VM resets waiting on hung agents until their deadlines).
const MAX_CONCURRENT_RECONCILES: u16 = 128;

fn reconcile_limit() -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(MAX_CONCURRENT_RECONCILES)
}

/// How long a starting controller waits for the Secret metadata cache.
const SECRET_CACHE_WAIT: Duration = Duration::from_secs(5);

/// Where a watched Secret or VMI change is sent: to each kind's controller, as reconciles
/// of the objects the change concerns.
#[derive(Clone)]
struct Triggers {
    resets: (
        Store<GuestPasswordReset>,
        UnboundedSender<ObjectRef<GuestPasswordReset>>,
    ),
    rebuilds: (
        Store<KeypairRebuild>,
        UnboundedSender<ObjectRef<KeypairRebuild>>,
    ),
}

impl Triggers {
    /// The objects whose input is this Secret (their run starts again if its value changed).
    fn secret_changed(&self, secret: &PartialObjectMeta<Secret>) {
        let (ns, name) = (secret.namespace(), secret.name_any());
        send_matching(&self.resets, |o| uses_secret(o, ns.as_deref(), &name));
        send_matching(&self.rebuilds, |o| uses_secret(o, ns.as_deref(), &name));
    }

    /// The objects waiting for this VMI (it appeared, started, moved node, or its agent
    /// connected).
    fn vmi_changed(&self, vmi: &PartialObjectMeta<VirtualMachineInstance>) {
        send_matching(&self.resets, |o| waits_for_vmi(o, vmi));
        send_matching(&self.rebuilds, |o| waits_for_vmi(o, vmi));
    }
}

fn uses_secret<K: RunKind>(o: &K, ns: Option<&str>, secret: &str) -> bool {
    o.namespace().as_deref() == ns && o.input_secret().is_some_and(|r| r.name == secret)
}

fn waits_for_vmi<K: RunKind>(o: &K, vmi: &PartialObjectMeta<VirtualMachineInstance>) -> bool {
    o.namespace() == vmi.namespace()
        && waits_for(o.target(), o.run_status(), &vmi.name_any(), vmi.labels())
}

fn send_matching<K: RunKind>(
    (store, to): &(Store<K>, UnboundedSender<ObjectRef<K>>),
    matches: impl Fn(&K) -> bool,
) {
    for o in store.state() {
        if matches(o.as_ref()) {
            // Closed only when the controller stopped.
            let _ = to.unbounded_send(ObjectRef::from_obj(o.as_ref()));
        }
    }
}

/// A cache of every Secret's name and resourceVersion, and the watch that fills it and
/// then (so a reconcile never sees the cache older than its trigger) asks for reconciles
/// of the objects that reference a changed Secret. The watch is metadata-only (no
/// Secret's data crosses the wire), and of the metadata only those fields are kept:
/// labels and annotations can be large (or, like kubectl's last-applied-configuration,
/// hold the Secret's data).
fn secret_versions(
    client: Client,
    scope: &WatchScope,
    triggers: Triggers,
) -> (
    Store<PartialObjectMeta<Secret>>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (store, writer) = reflector::store();
    let apis = scope.apis(
        || Api::<PartialObjectMeta<Secret>>::all(client.clone()),
        |ns| Api::namespaced(client.clone(), ns),
    );
    let watch = |api| {
        watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|s: &mut PartialObjectMeta<Secret>| s.metadata = name_and_version(s))
    };
    let watch = watch_scope(apis, watch, name_and_version_only)
        .reflect(writer)
        .touched_objects()
        .for_each(on_each_touched("Secret", move |secret| {
            triggers.secret_changed(secret)
        }));
    (store, watch)
}

/// For a metadata watch's `for_each`: `changed` with each object the watch touched; a
/// failed watch is logged, and retries by itself.
fn on_each_touched<K, E: std::fmt::Display>(
    kind: &'static str,
    changed: impl Fn(&K),
) -> impl FnMut(Result<K, E>) -> futures::future::Ready<()> {
    move |touched| {
        match touched {
            Ok(object) => changed(&object),
            Err(e) => warn!(error = %e, "{kind} metadata watch failed; retrying"),
        }
        futures::future::ready(())
    }
}

/// What is kept of an object's metadata: name, namespace, resourceVersion.
fn name_and_version<K>(o: &PartialObjectMeta<K>) -> ObjectMeta {
    ObjectMeta {
        name: o.metadata.name.clone(),
        namespace: o.metadata.namespace.clone(),
        resource_version: o.metadata.resource_version.clone(),
        ..ObjectMeta::default()
    }
}

/// The object with only that metadata (what a merged namespaced watch keeps of it).
fn name_and_version_only<K>(o: &PartialObjectMeta<K>) -> PartialObjectMeta<K> {
    PartialObjectMeta {
        types: o.types.clone(),
        metadata: name_and_version(o),
        _phantom: std::marker::PhantomData,
    }
}

/// VMIs per page of the VMI watch's list (kube-rs asks for 500). A real API server's
/// metadata carries managed fields, decoded into JSON trees, and a page's memory is held
/// until the page is done: a smaller page keeps that peak (and the RSS the allocator
/// keeps after the sync) small, for 5 times as many LIST requests at sync. Bench P6 on
/// the real control plane, N=1,000, RSS per VMI above the baseline: 0.62, 0.94 and -0.34
/// KiB with 100 against 1.40 and 0.55 KiB with 500 (noisy single runs).
const VMI_WATCH_PAGE: u32 = 100;

/// One metadata-only VMI watch for both kinds (nothing of it is cached: a reconcile reads
/// the VMIs it needs), triggering the objects that wait for a changed VMI.
fn vmi_changes(
    client: Client,
    scope: &WatchScope,
    triggers: Triggers,
) -> impl std::future::Future<Output = ()> + use<> {
    let apis = scope.apis(
        || Api::<PartialObjectMeta<VirtualMachineInstance>>::all(client.clone()),
        |ns| Api::namespaced(client.clone(), ns),
    );
    let watch =
        |api| watcher(api, watcher::Config::default().page_size(VMI_WATCH_PAGE)).default_backoff();
    watch_scope(apis, watch, name_and_version_only)
        .touched_objects()
        .for_each(on_each_touched("VMI", move |vmi| triggers.vmi_changed(vmi)))
}

/// Whether an object has unfinished business with this VMI: one of its run's targets is
/// it and not finished, or the object has no targets yet and names it or selects it.
fn waits_for(
    target: &TargetSpec,
    status: Option<&RunStatus>,
    vmi: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    match status {
        // A large run lists only some targets: any unfinished one may be this VMI.
        Some(s) if s.is_sharded() => s.unfinished() > 0,
        Some(s) if !s.targets.is_empty() => s
            .targets
            .iter()
            .any(|t| t.vm == vmi && !t.state.is_terminal()),
        _ => match (&target.vm_name, &target.selector) {
            (Some(name), _) => name == vmi,
            (None, Some(selector)) => {
                Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
            }
            (None, None) => false,
        },
    }
}

async fn reconcile<K: RunKind>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    let result = engine::reconcile(obj, ctx.clone()).await;
    ctx.metrics.reconcile(&K::kind(&()), result.is_ok());
    result
}

/// A KeypairRebuild's reconcile, then the key reports of its Inspect targets (written
/// after the run's own status write; see `keypair::publish_guest_keys`).
async fn reconcile_rebuild(obj: Arc<KeypairRebuild>, ctx: Arc<Context>) -> Result<Action, Error> {
    let action = reconcile(obj.clone(), ctx.clone()).await?;
    Ok(match keypair::publish_guest_keys(&obj, &ctx).await {
        Some(wait) => Action::requeue(wait),
        None => action,
    })
}

fn error_policy<K: RunKind>(obj: Arc<K>, err: &Error, _ctx: Arc<Context>) -> Action {
    warn!(kind = %K::kind(&()), object = %obj.name_any(), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{TargetState, TargetStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    fn named(vm: &str) -> TargetSpec {
        TargetSpec {
            vm_name: Some(vm.into()),
            selector: None,
        }
    }

    fn selecting(key: &str, value: &str) -> TargetSpec {
        TargetSpec {
            vm_name: None,
            selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(key.into(), value.into())])),
                match_expressions: None,
            }),
        }
    }

    fn labels(key: &str, value: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(key.into(), value.into())])
    }

    fn run_with(vm: &str, state: TargetState) -> RunStatus {
        RunStatus {
            targets: vec![TargetStatus {
                vm: vm.into(),
                state,
                ..TargetStatus::default()
            }],
            ..RunStatus::default()
        }
    }

    #[test]
    fn an_object_without_targets_waits_for_the_vmi_it_names() {
        assert!(waits_for(&named("a"), None, "a", &BTreeMap::new()));
        assert!(!waits_for(&named("a"), None, "b", &BTreeMap::new()));
    }

    #[test]
    fn an_object_without_targets_waits_for_vmis_its_selector_matches() {
        let idle = RunStatus::default();
        let target = selecting("tier", "db");
        assert!(waits_for(&target, Some(&idle), "x", &labels("tier", "db")));
        assert!(!waits_for(
            &target,
            Some(&idle),
            "x",
            &labels("tier", "web")
        ));
    }

    #[test]
    fn a_run_waits_only_for_its_unfinished_targets() {
        let target = selecting("tier", "db");
        let pending = run_with("a", TargetState::Pending);
        let done = run_with("a", TargetState::Succeeded);
        let db = labels("tier", "db");
        assert!(waits_for(&target, Some(&pending), "a", &db));
        assert!(!waits_for(&target, Some(&done), "a", &db));
        // A VM that matches later does not join a run already under way.
        assert!(!waits_for(&target, Some(&pending), "b", &db));
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: ControllerArgs,
    }

    fn parse(argv: &[&str]) -> Result<ControllerArgs, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("controller").chain(argv.iter().copied()))
            .map(|c| c.args)
    }

    #[test]
    fn the_runtime_is_one_worker_unless_asked_and_refuses_zero() {
        let with = |extra: &[&str]| {
            let argv: Vec<&str> = ["--shim-namespace", "s"]
                .iter()
                .chain(TLS.iter())
                .chain(extra)
                .copied()
                .collect();
            parse(&argv).map(|a| a.worker_threads)
        };
        assert_eq!(with(&[]).expect("defaults"), 1);
        assert_eq!(with(&["--worker-threads", "4"]).expect("four"), 4);
        assert!(with(&["--worker-threads", "0"]).is_err());
    }

    const TLS: [&str; 6] = [
        "--shim-ca-file",
        "/ca.crt",
        "--shim-client-cert-file",
        "/tls.crt",
        "--shim-client-key-file",
        "/tls.key",
    ];

    #[test]
    fn starting_without_a_shim_ca_names_the_flag() {
        let Err(e) = parse(&["--shim-namespace", "guestcred-system"]) else {
            panic!("a controller without a CA for the shims must not start");
        };
        assert!(e.to_string().contains("--shim-ca-file"), "{e}");
    }

    #[test]
    fn the_shim_namespace_is_required() {
        let Err(e) = parse(&TLS) else {
            panic!("shims are looked up in one namespace, never all of them");
        };
        assert!(e.to_string().contains("--shim-namespace"), "{e}");
    }

    #[test]
    fn plain_http_to_shims_is_not_an_option() {
        let mut argv = vec![
            "--shim-namespace",
            "guestcred-system",
            "--shim-scheme",
            "http",
        ];
        argv.extend(TLS);
        assert!(parse(&argv).is_err());
    }
}
