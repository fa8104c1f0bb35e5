//! P2 (bulk throughput), P4's qga-socket half and P5 (hung agent isolation) on one fleet:
//! host-run qemu-ga instances as the guests' agents, spread over lab nodes that each run a
//! real shim process (qga-socket backend), the controller process, and the emulator.
use crate::cluster::{
    self, BenchApi, NS, crypt_string, free_port, labelled, one_vm, reset, secret, spawn_controller,
    spawn_shim,
};
use crate::procs::Proc;
use crate::stats::{Figure, Section};
use crate::{Ctx, Footprint, sample_rss_under};
use anyhow::{Context as _, bail};
use futures::StreamExt;
use guestcred::api::validate;
use guestcred::api::wire::{DomainRef, SetPasswordRequest};
use guestcred::api::{GuestPasswordReset, RolloutSpec};
use guestcred::controller::shim_client::ShimApi as _;
use guestcred::shim::GuestAgent;
use guestcred::shim::qga::QgaSocketAgent;
use guestcred_lab::hostqga::HostQga;
use guestcred_lab::kubevirt::{create_node_with_shim, vm};
use guestcred_lab::world::SHIM_NAMESPACE;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use secrecy::SecretString;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const FLEET_LABEL: &str = "bench-fleet";
/// The shims' agent timeout (see `cluster::spawn_shim`).
pub const AGENT_TIMEOUT_S: f64 = 3.0;
/// P5's resets, all on node-1 (fewer when the fleet is smaller).
const P5_VMS: usize = 20;

pub struct FleetNode {
    pub name: String,
    pub ip: String,
    sockets: PathBuf,
    pub shim: Proc,
}

/// VM `i` is `vm-<i>` on node `i % nodes`; its agent socket is
/// `<node sockets>/default_vm-<i>/qga.sock`.
pub struct Fleet {
    pub dir: PathBuf,
    pub port: u16,
    pub nodes: Vec<FleetNode>,
    pub agents: Vec<HostQga>,
}

pub fn vm_name(i: usize) -> String {
    format!("vm-{i:03}")
}

impl Fleet {
    pub async fn start(ctx: &Ctx, nodes: usize, vms: usize) -> anyhow::Result<Fleet> {
        let dir = ctx.dir.join("fleet");
        let port = free_port()?;
        let mut fleet_nodes = Vec::new();
        for n in 0..nodes {
            let name = format!("node-{}", n + 1);
            let ip = format!("127.0.0.{}", 11 + n);
            let sockets = dir.join(&name);
            std::fs::create_dir_all(&sockets)?;
            let template = format!("{}/{{namespace}}_{{name}}/qga.sock", sockets.display());
            let args: Vec<String> = vec![
                "--backend".into(),
                "qga-socket".into(),
                "--qga-socket-template".into(),
                template,
            ];
            let addr = format!("{ip}:{port}").parse()?;
            let shim = spawn_shim(ctx, &name, addr, &args, &dir).await?;
            fleet_nodes.push(FleetNode {
                name,
                ip,
                sockets,
                shim,
            });
        }
        let started = Instant::now();
        let socket_dirs: Vec<PathBuf> = (0..vms)
            .map(|i| fleet_nodes[i % nodes].sockets.clone())
            .collect();
        let agents = tokio::task::spawn_blocking(move || start_agents(&socket_dirs)).await??;
        tracing::info!(vms, elapsed = ?started.elapsed(), "fleet agents up");
        Ok(Fleet {
            dir,
            port,
            nodes: fleet_nodes,
            agents,
        })
    }

    pub fn node_of(&self, i: usize) -> &FleetNode {
        &self.nodes[i % self.nodes.len()]
    }

    /// Register nodes, shim pods and the VMs (labelled `bench-fleet=yes`) in `api`.
    pub async fn register(&self, api: &BenchApi) -> anyhow::Result<()> {
        for n in &self.nodes {
            create_node_with_shim(&api.local, &n.name, SHIM_NAMESPACE, &n.ip).await?;
        }
        let client = api.local.clone();
        let results: Vec<kube::Result<()>> = futures::stream::iter(0..self.agents.len())
            .map(|i| {
                let d = vm(NS, &vm_name(i), &self.node_of(i).name).label(FLEET_LABEL, "yes");
                let client = client.clone();
                async move { d.create(&client).await }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        results.into_iter().collect::<kube::Result<Vec<()>>>()?;
        Ok(())
    }

    fn shims_cpu(&self) -> anyhow::Result<Duration> {
        self.nodes.iter().map(|n| n.shim.cpu()).sum()
    }

    /// Every agent's root hash is `hash`.
    fn check_all(&self, hash: &str) -> anyhow::Result<()> {
        for a in &self.agents {
            if a.shadow_hash("root")?.as_deref() != Some(hash) {
                bail!("{} does not hold the value of the last bulk run", a.name());
            }
        }
        Ok(())
    }
}

/// Start one host qemu-ga per VM, eight at a time.
fn start_agents(socket_dirs: &[PathBuf]) -> anyhow::Result<Vec<HostQga>> {
    let chunks: Vec<(usize, &[PathBuf])> = socket_dirs
        .chunks(socket_dirs.len().div_ceil(8).max(1))
        .enumerate()
        .collect();
    let per_chunk = socket_dirs.len().div_ceil(8).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|(c, dirs)| {
                s.spawn(move || {
                    dirs.iter()
                        .enumerate()
                        .map(|(k, d)| {
                            let i = c * per_chunk + k;
                            HostQga::start(d, &format!("{NS}_{}", vm_name(i)))
                                .with_context(|| format!("starting qemu-ga for {}", vm_name(i)))
                        })
                        .collect::<anyhow::Result<Vec<HostQga>>>()
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            let part = h
                .join()
                .map_err(|_| anyhow::anyhow!("agent starter panicked"))??;
            all.extend(part);
        }
        Ok(all)
    })
}

pub struct FleetResult {
    pub p2: Section,
    pub p4_qga: Vec<Figure>,
    pub p5: Section,
}

/// Which of the fleet's benchmarks to run (P4 always runs: it is cheap).
#[derive(Clone, Copy, Debug)]
pub struct Parts {
    pub p2: bool,
    pub p5: bool,
}

pub async fn run(
    ctx: &Ctx,
    fleet: &Fleet,
    rounds: usize,
    p5_rounds: usize,
    load_secs: u64,
    only: Parts,
) -> anyhow::Result<FleetResult> {
    let dir = fleet.dir.join("api");
    let api = BenchApi::start(&dir).await?;
    fleet.register(&api).await?;
    let mut footprint = Footprint {
        idle: Vec::new(),
        peaks: Vec::new(),
        hwm: 0.0,
    };
    for n in &fleet.nodes {
        footprint.idle.push(n.shim.mem()?);
    }
    let mut controller =
        spawn_controller(ctx, &api, fleet.port, &fleet.dir.join("controller.log")).await?;
    let n = fleet.agents.len();
    let resets: Api<GuestPasswordReset> = Api::namespaced(api.http.clone(), NS);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(api.local.clone(), NS);
    let direct_agents: Vec<Arc<QgaSocketAgent>> = fleet
        .nodes
        .iter()
        .map(|node| {
            Arc::new(QgaSocketAgent::new(
                format!("{}/{{namespace}}_{{name}}/qga.sock", node.sockets.display()),
                Duration::from_secs(3),
            ))
        })
        .collect();

    // P2: alternate a controller run and a direct run; round 0 is a warm-up.
    let (mut wall, mut direct_wall, mut ctl_cpu, mut shim_cpu, mut reqs) =
        (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..=rounds {
        // Without P2, its warm-up round still runs, so P4's shims have served a fleet run.
        if !only.p2 && round > 0 {
            break;
        }
        let tag = format!("p2-{round}");
        let hash = crypt_string(&tag);
        secrets
            .create(&PostParams::default(), &secret(&tag, &hash))
            .await?;
        let rollout = RolloutSpec {
            max_concurrency: 64,
            deadline_seconds: 120,
            ..RolloutSpec::default()
        };
        let obj = reset(&tag, labelled(FLEET_LABEL, "yes"), "root", &tag, rollout);
        let (c0, s0) = (controller.cpu()?, fleet.shims_cpu()?);
        api.requests.clear();
        let d = cluster::create_until_ready(&resets, &obj, Duration::from_secs(300)).await?;
        let (c1, s1) = (controller.cpu()?, fleet.shims_cpu()?);
        let (requests, _) = api.requests.summary();
        fleet.check_all(&hash)?;
        let direct = direct_run(
            fleet,
            &direct_agents,
            &crypt_string(&format!("{tag}-direct")),
            64,
        )
        .await?;
        if round > 0 {
            wall.push(d.as_secs_f64());
            direct_wall.push(direct.as_secs_f64());
            ctl_cpu.push((c1 - c0).as_secs_f64() * 1e3 / n as f64);
            shim_cpu.push((s1 - s0).as_secs_f64() * 1e3 / n as f64);
            reqs.push(requests as f64 / n as f64);
        }
    }
    let direct = Figure::new(
        "P2.direct",
        &format!("{n} agent calls made directly (qga-socket, same parallelism 64) — baseline"),
        "s",
        direct_wall,
    );
    let mut p2 = Section::new(
        "P2",
        &format!(
            "Bulk throughput: {n} guests over {} nodes, one GuestPasswordReset with a selector, maxConcurrency 64",
            fleet.nodes.len()
        ),
    );
    p2.versus(
        Figure::new(
            "P2.controller",
            "create → Ready=True for all targets",
            "s",
            wall,
        ),
        direct,
        1.5,
        "median ≤ 1.5× direct",
    );
    p2.figures.push(
        Figure::new(
            "P2.controller_cpu",
            "controller CPU per target",
            "ms",
            ctl_cpu,
        )
        .median_at_most(2.0, "median ≤ 2 ms"),
    );
    p2.plain(
        "P2.shim_cpu",
        "shim CPU per call (all shims)",
        "ms",
        shim_cpu,
    );
    p2.plain(
        "P2.api_requests",
        "API requests (non-watch) per target during a run",
        "req",
        reqs,
    );
    p2.notes.push(format!(
        "{rounds} rounds after a warm-up; each round is a controller run then a direct run with another value. Agents are host qemu-ga instances (one per VM, private /etc) on unix sockets; the direct baseline drives the same sockets with the shim's own QGA client (QgaSocketAgent) from the bench process. After each controller run every agent's /etc/shadow is checked."
    ));

    // P4, qga-socket backend: 50 concurrent password sets on node-1's shim, 50 distinct VMs.
    let node1 = &fleet.nodes[0];
    let client = cluster::shim_client(ctx, format!("{}:{}", node1.ip, fleet.port).parse()?)?;
    let node1_vms: Arc<Vec<String>> = Arc::new(
        (0..n)
            .step_by(fleet.nodes.len())
            .take(50)
            .map(vm_name)
            .collect(),
    );
    for round in 0..3 {
        let c = client.clone();
        let vms = node1_vms.clone();
        let node = node1.name.clone();
        let value = crypt_string(&format!("p4-{round}"));
        let peak = sample_rss_under(&node1.shim, 50, Duration::from_secs(load_secs), move |w| {
            let c = c.clone();
            let req = SetPasswordRequest {
                // The shim serves requests naming its own node only, as the controller's.
                domain: DomainRef::new(NS, &vms[w % vms.len()]).with_node(&node),
                user: "root".into(),
                password: SecretString::from(value.clone()),
                crypted: true,
            };
            async move {
                c.set_password(&req)
                    .await
                    .map_err(|e| anyhow::anyhow!("set_password: {e}"))
            }
        })
        .await?;
        footprint.peaks.push(peak);
    }
    footprint.hwm = node1.shim.hwm_mib()?;

    // P5: 20 VMs on node-1; runs without and with one hung agent, alternating.
    let p5 = if only.p5 {
        p5(fleet, &controller, &resets, &secrets, p5_rounds).await?
    } else {
        Section::new("P5", "not run")
    };
    controller.check_alive()?;
    Ok(FleetResult {
        p2,
        p4_qga: footprint.figures("qga", "qga-socket", "/v1/password requests to 50 agents"),
        p5,
    })
}

async fn direct_run(
    fleet: &Fleet,
    agents: &[Arc<QgaSocketAgent>],
    hash: &str,
    parallel: usize,
) -> anyhow::Result<Duration> {
    let password = validate::password(&SecretString::from(hash.to_string()), true)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let user = validate::user("root").map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let nodes = fleet.nodes.len();
    let t0 = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..fleet.agents.len())
        .map(|i| {
            let agent = agents[i % nodes].clone();
            let (password, user) = (&password, &user);
            async move {
                let domain = validate::domain(&DomainRef::new(NS, vm_name(i)))
                    .map_err(|e| anyhow::anyhow!("{}", e.message))?;
                agent
                    .set_password(&domain, user, password)
                    .await
                    .map_err(|e| anyhow::anyhow!("direct call to {}: {}", vm_name(i), e.message))
            }
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    let took = t0.elapsed();
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    fleet.check_all(hash)?;
    Ok(took)
}

/// Latency of each of `names` (create → Ready=True), and for `hung` the times until its
/// target first reports AgentTimeout and until the object Failed.
struct P5Round {
    /// (VM, latency in ms) of each healthy reset.
    healthy: Vec<(String, f64)>,
    hung_timeout: Option<f64>,
    hung_failed: Option<f64>,
}

/// Quiet time before each P5 case.
const P5_SETTLE: Duration = Duration::from_secs(1);

async fn p5_round(
    fleet: &Fleet,
    controller: &Proc,
    resets: &Api<GuestPasswordReset>,
    secrets: &Api<k8s_openapi::api::core::v1::Secret>,
    tag: &str,
    hung: Option<usize>,
) -> anyhow::Result<P5Round> {
    let vms: Vec<usize> = (0..fleet.agents.len())
        .step_by(fleet.nodes.len())
        .take(P5_VMS)
        .collect();
    secrets
        .create(&PostParams::default(), &secret(tag, &crypt_string(tag)))
        .await?;
    let mut stream = cluster::open_watch(resets, None, Some(&format!("bench-round={tag}"))).await?;
    let hung_name = hung.map(|i| format!("{tag}-{}", vm_name(i)));
    let cpu = || -> anyhow::Result<[f64; 4]> {
        let agents: Duration = vms
            .iter()
            .map(|&i| crate::procs::cpu_time(fleet.agents[i].pid()))
            .sum::<anyhow::Result<Duration>>()?;
        Ok([
            controller.cpu()?.as_secs_f64() * 1e3,
            fleet.nodes[0].shim.cpu()?.as_secs_f64() * 1e3,
            crate::procs::cpu_time(std::process::id())?.as_secs_f64() * 1e3,
            agents.as_secs_f64() * 1e3,
        ])
    };
    // Per-case CPU is a debugging aid: read /proc only when it will be logged.
    let log_cpu = tracing::enabled!(tracing::Level::DEBUG);
    let cpu0 = if log_cpu { cpu()? } else { [0.0; 4] };
    // Creation and the watch run side by side, so each outcome is timed when it arrives,
    // not when the last create has returned.
    let started = std::sync::Mutex::new(BTreeMap::new());
    let create_all = async {
        for &i in &vms {
            let name = format!("{tag}-{}", vm_name(i));
            let rollout = RolloutSpec {
                deadline_seconds: 10,
                ..RolloutSpec::default()
            };
            let mut obj = reset(&name, one_vm(&vm_name(i)), "root", tag, rollout);
            obj.metadata.labels = Some(BTreeMap::from([("bench-round".into(), tag.into())]));
            if let Ok(mut started) = started.lock() {
                started.insert(name.clone(), (vm_name(i), Instant::now()));
            }
            resets.create(&PostParams::default(), &obj).await?;
            tracing::debug!(object = %name, "created");
        }
        anyhow::Ok(())
    };
    let mut out = P5Round {
        healthy: vec![],
        hung_timeout: None,
        hung_failed: None,
    };
    let mut done = BTreeMap::new();
    let total = vms.len();
    let follow_all = cluster::follow(&mut stream, Duration::from_secs(60), |o, now| {
        let name = o.name_any();
        let Some((vm, t0)) = started.lock().ok().and_then(|s| s.get(&name).cloned()) else {
            return Ok(false);
        };
        let secs = (now - t0).as_secs_f64();
        if Some(&name) == hung_name.as_ref() {
            let reason = o
                .status
                .as_ref()
                .and_then(|s| s.run.targets.first())
                .and_then(|t| t.reason.clone());
            if out.hung_timeout.is_none() && reason.is_some() {
                if reason.as_deref() != Some("AgentTimeout") {
                    bail!("the hung VM reported {reason:?}, not AgentTimeout");
                }
                out.hung_timeout = Some(secs);
            }
            if cluster::is_finished_badly(o) && out.hung_failed.is_none() {
                out.hung_failed = Some(secs);
                done.insert(name, ());
            }
            if cluster::is_ready(o) {
                bail!("the hung VM's reset became Ready");
            }
        } else if cluster::is_ready(o) && !done.contains_key(&name) {
            tracing::debug!(object = %name, ms = secs * 1e3, "ready seen");
            out.healthy.push((vm, secs * 1e3));
            done.insert(name, ());
            if log_cpu && out.healthy.len() == total - usize::from(hung.is_some()) {
                let c = cpu()?;
                tracing::debug!(
                    round = tag,
                    controller = c[0] - cpu0[0],
                    shim = c[1] - cpu0[1],
                    bench = c[2] - cpu0[2],
                    agents = c[3] - cpu0[3],
                    "cpu ms until the healthy ones are done"
                );
            }
        } else if cluster::is_finished_badly(o) {
            bail!(
                "{name} failed: {}",
                serde_json::to_string(&o.status).unwrap_or_default()
            );
        }
        Ok(done.len() == total)
    });
    futures::try_join!(create_all, follow_all).with_context(|| format!("P5 round {tag}"))?;
    Ok(out)
}

async fn p5(
    fleet: &Fleet,
    controller: &Proc,
    resets: &Api<GuestPasswordReset>,
    secrets: &Api<k8s_openapi::api::core::v1::Secret>,
    rounds: usize,
) -> anyhow::Result<Section> {
    let hung_vm = 0usize;
    let hung_pid = fleet.agents[hung_vm].pid().to_string();
    let (mut without, mut with, mut timeouts, mut failed) = (vec![], vec![], vec![], vec![]);
    // Every case starts from the same quiet state: the previous case's trailing work
    // (final reconciles, Events, a resumed agent draining its queue) is over.
    let hung_pid = &hung_pid;
    let case = |tag: String, hung: bool| async move {
        tokio::time::sleep(P5_SETTLE).await;
        if !hung {
            return p5_round(fleet, controller, resets, secrets, &tag, None).await;
        }
        signal(hung_pid, "-STOP")?;
        let round = p5_round(fleet, controller, resets, secrets, &tag, Some(hung_vm)).await;
        signal(hung_pid, "-CONT")?;
        round
    };
    for round in 0..=rounds {
        // Odd rounds run the hung case first, so neither case always comes second.
        let (a, b) = if round % 2 == 1 {
            let b = case(format!("p5b-{round}"), true).await?;
            (case(format!("p5a-{round}"), false).await?, b)
        } else {
            let a = case(format!("p5a-{round}"), false).await?;
            (a, case(format!("p5b-{round}"), true).await?)
        };
        if round > 0 {
            // The same 19 VMs on both sides: the baseline leaves out the VM that hangs.
            let hung = vm_name(hung_vm);
            without.extend(
                a.healthy
                    .into_iter()
                    .filter(|(vm, _)| *vm != hung)
                    .map(|(_, ms)| ms),
            );
            with.extend(b.healthy.into_iter().map(|(_, ms)| ms));
            timeouts.extend(b.hung_timeout);
            failed.extend(b.hung_failed);
        }
    }
    let base = Figure::new(
        "P5.without_hung",
        "latency of the same 19 resets in a round of 20 with no hung agent — baseline",
        "ms",
        without,
    );
    let mut s = Section::new(
        "P5",
        "Hung agent isolation: 20 one-VM resets on one node, one agent frozen (SIGSTOP)",
    );
    s.versus(
        Figure::new(
            "P5.with_hung",
            "latency of each of the 19 healthy resets while one agent is hung",
            "ms",
            with,
        ),
        base,
        1.1,
        "median ≤ 1.1× without",
    );
    s.figures.push(
        Figure::new(
            "P5.hung_timeout",
            "hung VM: create → its target reports AgentTimeout (shim agent timeout 3 s)",
            "s",
            timeouts,
        )
        .max_at_most(AGENT_TIMEOUT_S + 1.0, "≤ timeout + 1 s"),
    );
    s.figures.push(
        Figure::new(
            "P5.hung_failed",
            "hung VM: create → Failed/DeadlineExceeded (deadlineSeconds 10, retries in between)",
            "s",
            failed,
        )
        .max_at_most(11.0, "≤ deadline + 1 s"),
    );
    s.notes.push(format!(
        "{rounds} rounds after a warm-up; each round runs the 20 resets without and with agent {} frozen (the order alternates; each case starts after 1 s of quiet). Latency is create → Ready=True seen by the watch that runs while the objects are created, per object; both figures are over the same 19 VMs (the baseline leaves out {}'s reset).",
        vm_name(hung_vm),
        vm_name(hung_vm)
    ));
    Ok(s)
}

fn signal(pid: &str, sig: &str) -> anyhow::Result<()> {
    let ok = std::process::Command::new("kill")
        .args([sig, pid])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!("kill {sig} {pid} failed");
    }
    Ok(())
}
