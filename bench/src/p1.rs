//! P1 (single reset latency on a real lab guest) and P4's libvirt half (shim footprint
//! with the libvirt backend), sharing one world: a private libvirtd, one TCG guest with a
//! real qemu-ga, a libvirt-backend shim process, the controller process, the emulator.
use crate::cluster::{
    self, BenchApi, NS, crypt_string, free_port, one_vm, reset, secret, spawn_controller,
    spawn_shim,
};
use crate::stats::{Figure, Section};
use crate::{Ctx, Footprint, sample_rss_under};
use anyhow::{Context as _, bail};
use guestcred::api::RolloutSpec;
use guestcred::api::wire::DomainRef;
use guestcred::controller::shim_client::ShimApi as _;
use guestcred_lab::guest::{
    GuestImage, GuestSpec, Libvirtd, default_cache_dir, shadow_entry, start_guest, wait_for_agent,
};
use guestcred_lab::kubevirt::{create_node_with_shim, vm};
use guestcred_lab::world::SHIM_NAMESPACE;
use kube::Api;
use kube::api::PostParams;
use std::sync::Arc;
use std::time::{Duration, Instant};

const VM: &str = "bench-vm";
const DOMAIN: &str = "default_bench-vm";
/// A user of the lab image that no other part of the bench touches.
const USER: &str = "lab1";
const WAIT: Duration = Duration::from_secs(60);

/// The direct baseline: one libvirt connection and domain handle, reused for every call.
struct Direct {
    // Field order: the domain handle is released before its connection.
    dom: virt::domain::Domain,
    _conn: virt::connect::Connect,
}

impl Direct {
    fn open(uri: &str) -> anyhow::Result<Direct> {
        virt::error::clear_error_callback();
        let conn = virt::connect::Connect::open(Some(uri)).context("libvirt connect")?;
        let dom = conn
            .lookup_domain_by_name(DOMAIN)
            .context("look up the bench domain")?;
        Ok(Direct { dom, _conn: conn })
    }
}

#[derive(Clone, Copy, Debug)]
enum Method {
    Api,
    Kubectl,
    Direct,
    Virsh,
}

pub struct P1Result {
    pub p1: Section,
    pub p4_libvirt: Vec<Figure>,
}

pub async fn run(ctx: &Ctx, rounds: usize, load_secs: u64) -> anyhow::Result<P1Result> {
    let dir = ctx.dir.join("p1");
    std::fs::create_dir_all(&dir)?;
    let cache = default_cache_dir();
    let booted = Instant::now();
    let lv_dir = dir.join("libvirtd");
    let (libvirtd, uri) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let image = GuestImage::ensure(&cache)?;
        let libvirtd = Libvirtd::start(&lv_dir, &cache)?;
        let vms = lv_dir.join("vms");
        start_guest(&libvirtd, &image, &GuestSpec::new(DOMAIN), &vms)?;
        let uri = libvirtd.uri();
        wait_for_agent(&uri, DOMAIN, Duration::from_secs(180))?;
        Ok((libvirtd, uri))
    })
    .await??;
    tracing::info!(elapsed = ?booted.elapsed(), "P1 guest up");

    let api = BenchApi::start(&dir).await?;
    let port = free_port()?;
    let addr: std::net::SocketAddr = format!("127.0.0.10:{port}").parse()?;
    create_node_with_shim(&api.local, "node-1", SHIM_NAMESPACE, "127.0.0.10").await?;
    vm(NS, VM, "node-1").create(&api.local).await?;
    let shim_args: Vec<String> = ["--backend", "libvirt", "--locator", "libvirt-uri"]
        .iter()
        .map(|s| s.to_string())
        .chain(["--libvirt-uri".to_string(), uri.clone()])
        .collect();
    let shim = spawn_shim(ctx, "node-1", addr, &shim_args, &dir).await?;
    let mut footprint = Footprint {
        idle: vec![shim.mem()?],
        peaks: Vec::new(),
        hwm: 0.0,
    };
    let controller = spawn_controller(ctx, &api, port, &dir.join("controller.log")).await?;
    let direct = Arc::new(
        tokio::task::spawn_blocking({
            let uri = uri.clone();
            move || Direct::open(&uri)
        })
        .await??,
    );

    let resets: Api<guestcred::api::GuestPasswordReset> = Api::namespaced(api.http.clone(), NS);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(api.local.clone(), NS);
    let mut samples: [Vec<f64>; 4] = Default::default();
    let mut controller_cpu = Vec::new();
    let mut last_hash = String::new();
    let order = [Method::Api, Method::Kubectl, Method::Direct, Method::Virsh];
    // Round 0 warms every path up (first agent call, first HTTP connections) and is dropped.
    for round in 0..=rounds {
        for k in 0..order.len() {
            let method = order[(k + round) % order.len()];
            let tag = format!("p1-{round}-{method:?}").to_lowercase();
            let hash = crypt_string(&tag);
            let elapsed = match method {
                Method::Api => {
                    secrets
                        .create(&PostParams::default(), &secret(&tag, &hash))
                        .await?;
                    let obj = reset(&tag, one_vm(VM), USER, &tag, RolloutSpec::default());
                    let cpu0 = controller.cpu()?;
                    let d = cluster::create_until_ready(&resets, &obj, WAIT).await?;
                    if round > 0 {
                        controller_cpu.push((controller.cpu()? - cpu0).as_secs_f64() * 1e3);
                    }
                    d
                }
                Method::Kubectl => {
                    secrets
                        .create(&PostParams::default(), &secret(&tag, &hash))
                        .await?;
                    let obj = reset(&tag, one_vm(VM), USER, &tag, RolloutSpec::default());
                    kubectl_apply_and_wait(ctx, &api, &dir, &obj).await?
                }
                Method::Direct => {
                    let d = direct.clone();
                    let h = hash.clone();
                    let t0 = Instant::now();
                    tokio::task::spawn_blocking(move || d.dom.set_user_password(USER, &h, 1))
                        .await?
                        .context("direct set-user-password")?;
                    t0.elapsed()
                }
                Method::Virsh => {
                    let t0 = Instant::now();
                    let mut virsh = tokio::process::Command::new("virsh");
                    virsh
                        .args(["-q", "-c", &uri, "set-user-password", DOMAIN, USER, &hash])
                        .arg("--encrypted");
                    succeeds(&mut virsh, "virsh set-user-password").await?;
                    t0.elapsed()
                }
            };
            last_hash = hash;
            if round > 0 {
                samples[method as usize].push(elapsed.as_secs_f64() * 1e3);
            }
        }
    }
    // The guest really holds the last value: read /etc/shadow through the agent.
    let shadow = tokio::task::spawn_blocking({
        let uri = uri.clone();
        move || shadow_entry(&uri, DOMAIN, USER)
    })
    .await??;
    if !shadow.contains(&last_hash) {
        bail!("the guest's shadow entry for {USER} is not the last value set");
    }

    // P4, libvirt backend: idle, then 50 concurrent probes (each a blocking libvirt call).
    footprint.idle.push(shim.mem()?);
    let client = cluster::shim_client(ctx, addr)?;
    for _ in 0..3 {
        let c = client.clone();
        let peak = sample_rss_under(&shim, 50, Duration::from_secs(load_secs), move |_| {
            let c = c.clone();
            async move {
                // The shim serves requests naming its own node only, as the controller's.
                c.probe(&DomainRef::new(NS, VM).with_node("node-1"))
                    .await
                    .map(drop)
                    .map_err(|e| anyhow::anyhow!("probe: {e}"))
            }
        })
        .await?;
        footprint.peaks.push(peak);
    }
    footprint.hwm = shim.hwm_mib()?;
    drop(controller);
    drop(shim);
    drop(direct);
    drop(api);
    tokio::task::spawn_blocking(move || libvirtd.stop()).await??;

    let [api_ms, kubectl_ms, direct_ms, virsh_ms] = samples;
    let direct = Figure::new(
        "P1.direct",
        "virDomainSetUserPassword (virt crate, reused connection) — baseline",
        "ms",
        direct_ms,
    );
    let mut p1 = Section::new(
        "P1",
        "Single reset latency on a real lab guest (crypted, QEMU TCG)",
    );
    p1.figures.push(
        Figure::new(
            "P1.api",
            "GuestPasswordReset created with the kube client → Ready=True seen by a watch",
            "ms",
            api_ms,
        )
        .against(&direct)
        .ratio_at_most(1.3, "median ≤ 1.3× direct libvirt"),
    );
    p1.figures.push(
        Figure::new(
            "P1.kubectl",
            "kubectl apply + kubectl wait --for=condition=Ready",
            "ms",
            kubectl_ms,
        )
        .against(&direct),
    );
    p1.figures.push(
        Figure::new(
            "P1.virsh",
            "virsh set-user-password --encrypted (a process per call)",
            "ms",
            virsh_ms,
        )
        .against(&direct),
    );
    p1.figures.push(direct);
    p1.plain(
        "P1.controller_cpu",
        "controller CPU per reset (kube-client path)",
        "ms",
        controller_cpu,
    );
    p1.notes.push(format!(
        "{rounds} rounds after one warm-up round; the four methods alternate and their order rotates every round. Every call sets a distinct SHA-512 crypt string for user {USER}; the last one is read back from the guest's /etc/shadow."
    ));
    p1.notes.push("Controller and shim are separate release processes; the shim uses the libvirt backend against the same private libvirtd the baselines use. The API server is the lab emulator served over loopback HTTP.".into());

    Ok(P1Result {
        p1,
        p4_libvirt: footprint.figures("libvirt", "libvirt", "/v1/probe requests to one TCG guest"),
    })
}

/// Runs `cmd` to the end; an error naming `what`, with its stderr, unless it succeeds.
async fn succeeds(cmd: &mut tokio::process::Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// `kubectl apply -f` then `kubectl wait --for=condition=Ready`, as users do.
async fn kubectl_apply_and_wait(
    ctx: &Ctx,
    api: &BenchApi,
    dir: &std::path::Path,
    obj: &guestcred::api::GuestPasswordReset,
) -> anyhow::Result<Duration> {
    use kube::ResourceExt;
    let name = obj.name_any();
    let file = dir.join(format!("{name}.json"));
    std::fs::write(&file, serde_json::to_vec(obj)?)?;
    let run = |args: Vec<String>| {
        let mut c = tokio::process::Command::new(&ctx.kubectl);
        c.args(args).env("KUBECONFIG", &api.kubeconfig);
        c
    };
    let t0 = Instant::now();
    let apply = vec!["apply".into(), "-f".into(), file.display().to_string()];
    succeeds(&mut run(apply), "kubectl apply").await?;
    let mut wait = run(vec![
        "wait".into(),
        "--for=condition=Ready".into(),
        format!("guestpasswordreset/{name}"),
        "-n".into(),
        NS.into(),
        "--timeout=60s".into(),
    ]);
    succeeds(&mut wait, "kubectl wait").await?;
    Ok(t0.elapsed())
}
