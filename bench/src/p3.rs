//! P3: controller scale. The emulator holds 10,000 VMIs over 100 nodes and 1,000 finished
//! GuestPasswordResets (finished by the controller itself, against real agents); then the
//! controller is killed and restarted, and we measure how long it takes to resync and how
//! much memory it holds afterwards.
use crate::Ctx;
use crate::cluster::{self, BenchApi, NS, crypt_string, one_vm, reset, secret, spawn_controller};
use crate::fleet::{Fleet, vm_name};
use crate::stats::{Figure, Section};
use anyhow::bail;
use futures::StreamExt;
use guestcred::api::{GuestPasswordReset, RolloutSpec};
use guestcred_lab::kubevirt::{node, shim_pod, vm};
use guestcred_lab::world::SHIM_NAMESPACE;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A restart is synced once the controller made no API request and finished no reconcile
/// for this long.
const QUIET: Duration = Duration::from_millis(1500);

/// The controller's `guestcred_reconciles_total` for GuestPasswordResets, scraped from its
/// metrics endpoint, and when it last grew.
struct ReconcileCount {
    url: String,
    http: reqwest::Client,
    last: usize,
    changed_at: Option<Instant>,
}

impl ReconcileCount {
    fn new(port: u16) -> Self {
        Self {
            url: format!("http://127.0.0.1:{port}/metrics"),
            http: reqwest::Client::new(),
            last: 0,
            changed_at: None,
        }
    }

    /// (reconciles so far, when the count last grew); (0, None) until the endpoint answers.
    async fn sample(&mut self) -> (usize, Option<Instant>) {
        const SERIES: &str =
            r#"guestcred_reconciles_total{kind="GuestPasswordReset",result="ok"} "#;
        let text = match self.http.get(&self.url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let now = text
            .lines()
            .find_map(|l| l.strip_prefix(SERIES))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(self.last, |v| v as usize);
        if now != self.last {
            self.last = now;
            self.changed_at = Some(Instant::now());
        }
        (self.last, self.changed_at)
    }
}

pub struct Scale {
    pub vmis: usize,
    pub nodes: usize,
    pub resets: usize,
}

pub async fn run(
    ctx: &Ctx,
    fleet: &Fleet,
    scale: &Scale,
    rounds: usize,
) -> anyhow::Result<Section> {
    let dir = ctx.dir.join("p3");
    // Baseline: the same controller against an empty cluster (only the shim pods).
    let empty = BenchApi::start(&dir.join("empty")).await?;
    add_nodes(&empty.local, fleet, scale.nodes).await?;
    let idle_ctl =
        spawn_controller(ctx, &empty, fleet.port, &dir.join("controller-empty.log")).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let empty_rss = idle_ctl.rss_mib()?;
    drop(idle_ctl);
    drop(empty);

    let api = BenchApi::start(&dir).await?;
    let loaded = Instant::now();
    add_nodes(&api.local, fleet, scale.nodes).await?;
    // The real targets: every fleet VM, on its own node (a handful of resets each: host
    // qemu-ga instances do not like a long queue of callers that time out and hang up).
    let real: Vec<String> = (0..fleet.agents.len()).map(vm_name).collect();
    let mut vmis: Vec<(String, String)> = real
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), fleet.node_of(i).name.clone()))
        .collect();
    vmis.extend(
        (real.len()..scale.vmis).map(|i| (format!("s-{i:05}"), node_name(i % scale.nodes))),
    );
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(vmis)
        .map(|(name, node)| {
            let client = api.local.clone();
            async move { create_vmi(&client, &name, &node).await }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let hash = crypt_string("p3");
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(api.local.clone(), NS);
    secrets
        .create(&PostParams::default(), &secret("p3", &hash))
        .await?;
    let resets: Api<GuestPasswordReset> = Api::namespaced(api.local.clone(), NS);
    for i in 0..scale.resets {
        let mut obj = reset(
            &format!("p3-{i:04}"),
            one_vm(&real[i % real.len()]),
            "root",
            "p3",
            RolloutSpec::default(),
        );
        obj.metadata.labels = Some(BTreeMap::from([("bench".into(), "p3".into())]));
        resets.create(&PostParams::default(), &obj).await?;
    }
    let load_time = loaded.elapsed();

    // First run: the controller finishes all resets (real agent calls).
    let first = Instant::now();
    let mut controller =
        spawn_controller(ctx, &api, fleet.port, &dir.join("controller-0.log")).await?;
    wait_all_ready(&resets, scale.resets, Duration::from_secs(300)).await?;
    let first_run = first.elapsed();
    controller.kill();

    let (mut resync, mut rss, mut anon, mut hwm, mut reqs, mut reconciled) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for round in 1..=rounds {
        api.requests.clear();
        let metrics_port = cluster::free_port()?;
        let t0 = Instant::now();
        let cmd = cluster::controller_command(
            ctx,
            &api,
            fleet.port,
            &format!("127.0.0.1:{metrics_port}"),
        );
        let mut c = crate::procs::Proc::spawn(
            "controller",
            cmd,
            &dir.join(format!("controller-{round}.log")),
        )?;
        let deadline = t0 + Duration::from_secs(120);
        let mut reconciles = ReconcileCount::new(metrics_port);
        let synced_at = loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.check_alive()?;
            let (count, last_end) = api.requests.summary();
            let last_request = last_end.max(api.requests.last_start());
            let (done, last_reconcile) = reconciles.sample().await;
            if done >= scale.resets
                && let (Some(req), Some(rec)) = (last_request, last_reconcile)
                && req.elapsed() >= QUIET
                && rec.elapsed() >= QUIET
            {
                reqs.push(count as f64);
                reconciled.push(done as f64);
                break req.max(rec);
            }
            if Instant::now() > deadline {
                bail!(
                    "the restarted controller did not go quiet within 120 s ({count} requests, {done} reconciles)"
                );
            }
        };
        resync.push((synced_at - t0).as_secs_f64());
        rss.push(c.rss_mib()?);
        anon.push(c.anon_mib()?);
        hwm.push(c.hwm_mib()?);
        wait_all_ready(&resets, scale.resets, Duration::from_secs(10)).await?;
        c.kill();
    }
    drop(controller);

    let mut s = Section::new(
        "P3",
        &format!(
            "Controller scale: {} VMIs over {} nodes, {} finished GuestPasswordResets, controller restarted",
            scale.vmis, scale.nodes, scale.resets
        ),
    );
    let base = Figure::new(
        "P3.rss_empty",
        "controller RSS, synced against an empty cluster — baseline",
        "MiB",
        vec![empty_rss],
    );
    s.figures.push(
        Figure::new("P3.rss", "controller RSS after the resync", "MiB", rss)
            .against(&base)
            .max_at_most(64.0, "≤ 64 MiB"),
    );
    s.plain("P3.rss_anon", "  of which anonymous (RssAnon)", "MiB", anon);
    s.figures.push(
        Figure::new(
            "P3.hwm",
            "controller peak RSS (VmHWM) during the resync",
            "MiB",
            hwm,
        )
        .against(&base),
    );
    s.figures.push(base);
    s.figures.push(
        Figure::new(
            "P3.resync",
            "restart → last reconcile and last API request of the resync (then 1.5 s quiet)",
            "s",
            resync,
        )
        .max_at_most(5.0, "≤ 5 s"),
    );
    s.plain(
        "P3.resync_requests",
        "API requests (non-watch) made during one resync",
        "req",
        reqs,
    );
    s.plain(
        "P3.resync_reconciles",
        "reconciles of GuestPasswordResets during one resync (controller metric)",
        "n",
        reconciled,
    );
    s.plain(
        "P3.first_run",
        &format!(
            "first run: {} one-VM resets → all Ready ({} real agents)",
            scale.resets,
            fleet.agents.len()
        ),
        "s",
        vec![first_run.as_secs_f64()],
    );
    s.plain(
        "P3.load",
        "loading the emulator (in-process client)",
        "s",
        vec![load_time.as_secs_f64()],
    );
    s.notes.push(format!(
        "{rounds} restarts (SIGKILL, then a new process). The resync ends with the later of the new controller's last non-watch API request and its last reconcile (its own guestcred_reconciles_total, scraped every 50 ms; at least one per reset), after which neither happens for 1.5 s; the bench makes no API requests meanwhile, and checks afterwards that all {} resets are still Ready. RSS is read right then.",
        scale.resets
    ));
    s.notes.push("The emulator answers metadata-only lists and watches (the controller's Secret and VMI watches) with metadata only, as kube-apiserver does; it pages lists as kube-apiserver does (kube-rs watchers ask for 500 objects a page), so the one VMI watch (shared by both kinds) lists the 10000 VMIs in 20 requests.".into());
    Ok(s)
}

/// Same names as the fleet's nodes: a shim refuses calls for VMs of another node.
fn node_name(i: usize) -> String {
    format!("node-{}", i + 1)
}

/// `count` Nodes with a shim pod each; the first ones point at the fleet's real shims.
async fn add_nodes(client: &Client, fleet: &Fleet, count: usize) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), SHIM_NAMESPACE);
    for i in 0..count {
        let name = node_name(i);
        // Nodes without a real shim get an address nobody listens on; no target runs there.
        let ip = fleet
            .nodes
            .get(i)
            .map(|n| n.ip.clone())
            .unwrap_or_else(|| format!("127.0.1.{}", (i % 250) + 1));
        nodes.create(&PostParams::default(), &node(&name)).await?;
        let pod = shim_pod(SHIM_NAMESPACE, &name, &ip);
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        pods.create(&PostParams::default(), &pod).await?;
        let status = serde_json::json!({"status": pod.status});
        pods.patch_status(&pod_name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
    }
    Ok(())
}

async fn create_vmi(client: &Client, name: &str, node: &str) -> anyhow::Result<()> {
    let d = vm(NS, name, node).label("app", "scale");
    let vmis: Api<guestcred::api::kubevirt::VirtualMachineInstance> =
        Api::namespaced(client.clone(), NS);
    vmis.create(&PostParams::default(), &d.vmi_object()).await?;
    let status = serde_json::json!({"status": d.vmi_status()});
    vmis.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

async fn wait_all_ready(
    api: &Api<GuestPasswordReset>,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let list = api.list(&ListParams::default().labels("bench=p3")).await?;
        let ready = list.items.iter().filter(|r| cluster::is_ready(r)).count();
        let bad = list
            .items
            .iter()
            .filter(|r| cluster::is_finished_badly(r))
            .count();
        if bad > 0 {
            bail!("{bad} of the P3 resets failed");
        }
        if ready >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {ready}/{count} P3 resets Ready after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
