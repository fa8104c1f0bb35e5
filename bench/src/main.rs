//! guestcred-bench: the numbers behind `make bench` (see docs/benchmarks.md).
//!
//! P1 single reset latency on a real guest, P2 bulk throughput over a fleet of host qemu-ga
//! agents, P3 controller scale (10k VMIs, 1k finished resets, restart), P4 shim footprint,
//! P5 hung agent isolation, P6 fleet scale over simulated agents (1,000 nodes, up to
//! 100,000 targets, controller restart). The controller and the shims run as separate release processes
//! (CPU and RSS from /proc); the API server is the lab emulator served over loopback HTTP
//! from this process. Writes `<out>/results.json` and `<out>/results.md`.
mod cluster;
mod fleet;
mod p1;
mod p3;
mod p6;
mod procs;
mod report;
mod stats;

use anyhow::Context as _;
use clap::Parser;
use procs::Proc;
use stats::Section;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "guestcred-bench",
    about = "guestcred benchmarks (P1-P6); needs root and scripts/install-deps.sh"
)]
struct Args {
    /// Where results.json and results.md go.
    #[arg(long, default_value = "bench")]
    out: PathBuf,
    /// Run only these benchmarks (comma-separated: p1,p2,p3,p4,p5,p6). The other sections of
    /// an existing `<out>/results.json` are kept, each noted as from its earlier run.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// P1 rounds (each: API, kubectl, direct libvirt, virsh).
    #[arg(long, default_value_t = 20)]
    p1_rounds: usize,
    /// P2 rounds (each: a controller run and a direct run over the whole fleet).
    #[arg(long, default_value_t = 5)]
    p2_rounds: usize,
    /// Fleet size (host qemu-ga instances) and nodes for P2/P4/P5.
    #[arg(long, default_value_t = 500)]
    vms: usize,
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// P3 scale.
    #[arg(long, default_value_t = 10_000)]
    p3_vmis: usize,
    #[arg(long, default_value_t = 100)]
    p3_nodes: usize,
    #[arg(long, default_value_t = 1_000)]
    p3_resets: usize,
    #[arg(long, default_value_t = 3)]
    p3_rounds: usize,
    /// P6 sizes: targets (VMIs selected by one reset), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000, 10_000, 100_000])]
    p6_sizes: Vec<usize>,
    /// P6 API servers: the emulator, the real control plane (lab/controlplane) or both.
    /// Default: both when the real control plane is built (.lab/bin/controlplane, as
    /// `make test` builds it), else the emulator.
    #[arg(long, value_enum)]
    p6_control_plane: Option<p6::Planes>,
    /// P6 sizes on the real control plane, comma-separated (100,000 adds about 10 minutes:
    /// loading the VMIs into etcd and the run).
    #[arg(long, value_delimiter = ',', default_values_t = [1_000, 10_000, 100_000])]
    p6_real_sizes: Vec<usize>,
    /// P6 nodes (one simulated shim each, on its own loopback address).
    #[arg(long, default_value_t = 1_000)]
    p6_nodes: usize,
    #[arg(long, default_value_t = 512)]
    p6_max_concurrency: u32,
    /// P6: the simulated agent's crypted set-password latency.
    #[arg(long, default_value_t = 70)]
    p6_latency_ms: u64,
    /// P6: bound on one run (reset created → finished) per size; past it the size is
    /// reported as "did not finish".
    #[arg(long, default_value_t = 600)]
    p6_timeout_secs: u64,
    /// P5 rounds (each: 20 resets without and with a hung agent).
    #[arg(long, default_value_t = 5)]
    p5_rounds: usize,
    /// Extra environment for every controller process (KEY=VALUE, repeatable), for
    /// experiments such as allocator settings; added to the chart's (MALLOC_ARENA_MAX=1).
    #[arg(long = "controller-env", value_name = "KEY=VALUE")]
    controller_env: Vec<String>,
    /// Keep the scratch directory (logs of every process) instead of deleting it.
    #[arg(long)]
    keep: bool,
    /// Seconds of load per P4 sample.
    #[arg(long, default_value_t = 3)]
    load_secs: u64,
}

/// What every benchmark needs.
pub struct Ctx {
    /// Scratch directory (short: agent socket paths live below it).
    pub dir: PathBuf,
    pub guestcred: PathBuf,
    /// The shim as the DaemonSet image runs it (`guestcred-shim`).
    pub shim: PathBuf,
    pub kubectl: PathBuf,
    /// CA, shim server and controller client certificates (mutual TLS, as deployed).
    pub tls: guestcred_lab::cluster::tls::LabTls,
    pub controller_env: Vec<(String, String)>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // P6's in-process simulated shims would log every agent call here.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("info,guestcred::shim=warn")
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let wants =
        |p: &str| args.only.is_empty() || args.only.iter().any(|o| o.eq_ignore_ascii_case(p));
    let started = Instant::now();
    let p6_planes = args
        .p6_control_plane
        .unwrap_or_else(p6::Planes::default_here);
    let machine = report::Machine::probe();
    let tmp = tempfile::Builder::new().prefix("gcb").tempdir_in("/tmp")?;
    let dir = if args.keep {
        let kept = tmp.keep();
        tracing::info!(dir = %kept.display(), "keeping the scratch directory");
        kept
    } else {
        tmp.path().to_path_buf()
    };
    let tls = guestcred_lab::cluster::tls::LabTls::new(dir.join("tls"));
    tls.mint()?;
    // The deployed controller's environment first; --controller-env adds to it or
    // overrides it (the controller reads the last value of a variable).
    let deployed = guestcred_lab::DEPLOYED_CONTROLLER_ENV
        .iter()
        .map(|(k, v)| anyhow::Ok((k.to_string(), v.to_string())));
    let controller_env = deployed
        .chain(args.controller_env.iter().map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--controller-env {kv:?} is not KEY=VALUE"))
        }))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ctx = Ctx {
        controller_env,
        tls,
        dir,
        guestcred: procs::sibling_binary("guestcred")?,
        shim: procs::sibling_binary("guestcred-shim")?,
        kubectl: which("kubectl").context("kubectl is needed for P1 (scripts/install-deps.sh)")?,
    };
    let mut sections: Vec<Section> = Vec::new();
    let mut p4 = Section::new(
        "P4",
        "Shim footprint: RSS idle and under 50 concurrent requests",
    );

    // A benchmark that fails is reported as failed; the others still run and are written.
    let mut failed: Vec<String> = Vec::new();
    let mut fail = |id: &str, e: anyhow::Error, sections: &mut Vec<Section>| {
        tracing::error!(benchmark = id, error = format!("{e:#}"), "benchmark failed");
        let mut s = Section::new(id, "FAILED");
        s.notes.push(format!("FAILED: {e:#}"));
        sections.push(s);
        failed.push(id.to_string());
    };
    if wants("p1") || wants("p4") {
        tracing::info!("P1: real guest");
        // P4 alone needs the libvirt shim warmed by P1's warm-up round, not its 20 rounds.
        let p1_rounds = if wants("p1") { args.p1_rounds } else { 0 };
        match p1::run(&ctx, p1_rounds, args.load_secs).await {
            Ok(r) => {
                if wants("p1") {
                    sections.push(r.p1);
                }
                p4.figures.extend(r.p4_libvirt);
            }
            Err(e) if wants("p1") => fail("P1", e, &mut sections),
            // Only P4 wanted P1's shim: P4 is what failed.
            Err(e) => fail("P4", e.context("P1's warm-up for P4"), &mut sections),
        }
    }
    if wants("p2") || wants("p3") || wants("p4") || wants("p5") {
        tracing::info!(
            vms = args.vms,
            nodes = args.nodes,
            "starting the agent fleet"
        );
        let fleet = fleet::Fleet::start(&ctx, args.nodes, args.vms)
            .await
            .context("fleet")?;
        if wants("p2") || wants("p4") || wants("p5") {
            tracing::info!("P2, P4, P5: fleet");
            let parts = fleet::Parts {
                p2: wants("p2"),
                p5: wants("p5"),
            };
            match fleet::run(
                &ctx,
                &fleet,
                args.p2_rounds,
                args.p5_rounds,
                args.load_secs,
                parts,
            )
            .await
            {
                Ok(r) => {
                    if wants("p2") {
                        sections.push(r.p2);
                    }
                    p4.figures.extend(r.p4_qga);
                    if wants("p5") {
                        sections.push(r.p5);
                    }
                }
                Err(e) if wants("p2") => fail("P2", e, &mut sections),
                Err(e) if wants("p5") => fail("P5", e, &mut sections),
                Err(e) => fail("P4", e.context("the fleet's P4 half"), &mut sections),
            }
        }
        if wants("p3") {
            tracing::info!("P3: scale");
            let scale = p3::Scale {
                vmis: args.p3_vmis,
                nodes: args.p3_nodes,
                resets: args.p3_resets,
            };
            match p3::run(&ctx, &fleet, &scale, args.p3_rounds).await {
                Ok(s) => sections.push(s),
                Err(e) => fail("P3", e, &mut sections),
            }
        }
    }
    if wants("p6") {
        tracing::info!(
            control_plane = ?p6_planes,
            sizes = ?args.p6_sizes,
            real_sizes = ?args.p6_real_sizes,
            "P6: fleet scale (simulated agents)"
        );
        let opts = p6::Opts {
            sizes: args.p6_sizes.clone(),
            planes: p6_planes,
            real_sizes: args.p6_real_sizes.clone(),
            nodes: args.p6_nodes,
            max_concurrency: args.p6_max_concurrency,
            set_password_ms: args.p6_latency_ms,
            timeout: Duration::from_secs(args.p6_timeout_secs),
        };
        match p6::run(&ctx, &opts).await {
            Ok(s) => sections.push(s),
            Err(e) => fail("P6", e, &mut sections),
        }
    }
    if wants("p4") {
        p4.notes.push(format!(
            "RSS, RssAnon (/proc/PID/status), USS (Private_Clean + Private_Dirty, plus the pages of the shim's own binary it shares with the other shims of the bench: a node runs one) and PSS (/proc/PID/smaps) sampled every 10 ms while 50 workers each keep one request in flight for {} s (3 samples per backend; each figure's own peak); idle is read before any load (libvirt: also after its first calls). Targets: RSS idle ≤ {P4_IDLE_RSS} MiB, under load ≤ {P4_LOAD_RSS} MiB; USS idle ≤ {P4_IDLE_USS} MiB, under load ≤ {P4_LOAD_USS} MiB.",
            args.load_secs
        ));
        p4.notes.push("USS is what the node gets back when the shim exits; PSS charges each shared page to the processes mapping it in equal parts, so it depends on what else runs: here the libvirt shim shares libvirt and its libraries with the bench's private libvirtd (as it would with the node's libvirtd), and the qga-socket shims share their binary and libraries with each other (one shim per node in production) and with libvirtd. RSS counts every shared page in full. Pages are shared only between processes mapping the same files (here: host libraries); a shim in its own container image shares its libraries with nothing, and its cost is then close to its RSS (docs/benchmarks.md).".to_string());
        sections.push(p4);
    }
    let only: Vec<String> = args.only.iter().map(|o| o.to_uppercase()).collect();
    if !only.is_empty() {
        // A partial run replaces its own sections of the report and keeps the others.
        let measured: Vec<String> = sections.iter().map(|s| s.id.clone()).collect();
        let mut all = only.clone();
        all.extend(measured);
        sections.extend(report::kept_sections(&args.out, &all)?);
    }
    sections.sort_by(|a, b| a.id.cmp(&b.id));

    let report = report::Report {
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        git_commit: git_commit(),
        machine,
        duration_s: started.elapsed().as_secs_f64(),
        scale: serde_json::json!({
            "p1_rounds": args.p1_rounds, "p2_rounds": args.p2_rounds, "vms": args.vms,
            "nodes": args.nodes, "p3_vmis": args.p3_vmis, "p3_nodes": args.p3_nodes,
            "p3_resets": args.p3_resets, "p3_rounds": args.p3_rounds,
            "p5_rounds": args.p5_rounds, "load_secs": args.load_secs,
            "p6_sizes": args.p6_sizes, "p6_nodes": args.p6_nodes,
            "p6_max_concurrency": args.p6_max_concurrency, "p6_latency_ms": args.p6_latency_ms,
            "p6_timeout_secs": args.p6_timeout_secs,
            "p6_control_plane": format!("{p6_planes:?}").to_lowercase(),
            "p6_real_sizes": args.p6_real_sizes,
            "controller_env": args.controller_env,
        }),
        only,
        sections,
    };
    report.write(&args.out)?;
    println!("{}", report.markdown());
    println!(
        "written: {}/results.md, {}/results.json",
        args.out.display(),
        args.out.display()
    );
    if !failed.is_empty() {
        anyhow::bail!("benchmarks failed: {} (see the report)", failed.join(", "));
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=10"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Idle and loaded memory of one shim backend, as P4's figures.
pub struct Footprint {
    pub idle: Vec<procs::Mem>,
    pub peaks: Vec<procs::Mem>,
    pub hwm: f64,
}

/// P4 targets, MiB: RSS (the first goal, kept) and USS (what the node pays, issue 19).
pub const P4_IDLE_RSS: f64 = 20.0;
pub const P4_LOAD_RSS: f64 = 40.0;
pub const P4_IDLE_USS: f64 = 8.0;
pub const P4_LOAD_USS: f64 = 16.0;

impl Footprint {
    /// `P4.<key>.*` figures; `load` says what the 50 concurrent requests were.
    pub fn figures(self, key: &str, backend: &str, load: &str) -> Vec<stats::Figure> {
        use stats::Figure;
        let pick = |v: &[procs::Mem], f: fn(&procs::Mem) -> f64| v.iter().map(f).collect();
        let idle = |id: &str, title: &str, f: fn(&procs::Mem) -> f64| {
            Figure::new(&format!("P4.{key}.{id}"), title, "MiB", pick(&self.idle, f))
        };
        let peak = |id: &str, title: &str, f: fn(&procs::Mem) -> f64| {
            Figure::new(
                &format!("P4.{key}.{id}"),
                title,
                "MiB",
                pick(&self.peaks, f),
            )
        };
        let idle_rss = idle("idle", &format!("shim RSS idle ({backend} backend)"), |m| {
            m.rss
        });
        let idle_anon = idle(
            "idle_anon",
            "  of which anonymous (RssAnon: heap, stacks; the rest is the binary and shared libraries)",
            |m| m.anon,
        );
        let idle_uss = idle(
            "idle_uss",
            "shim USS idle: pages only the shim maps (Private_Clean + Private_Dirty; its binary's pages counted as its own), freed when it exits",
            |m| m.uss,
        );
        let idle_pss = idle(
            "idle_pss",
            "shim PSS idle: shared pages divided among the processes mapping them",
            |m| m.pss,
        );
        let load_rss = peak(
            "load",
            &format!("shim peak RSS under 50 concurrent {load} ({backend} backend)"),
            |m| m.rss,
        )
        .against(&idle_rss)
        .max_at_most(P4_LOAD_RSS, &format!("peak ≤ {P4_LOAD_RSS} MiB"));
        let load_anon = peak("load_anon", "  peak anonymous RSS under that load", |m| {
            m.anon
        })
        .against(&idle_anon);
        let load_uss = peak("load_uss", "shim peak USS under that load", |m| m.uss)
            .against(&idle_uss)
            .max_at_most(P4_LOAD_USS, &format!("peak ≤ {P4_LOAD_USS} MiB"));
        let load_pss =
            peak("load_pss", "shim peak PSS under that load", |m| m.pss).against(&idle_pss);
        let hwm = Figure::new(
            &format!("P4.{key}.hwm"),
            "shim VmHWM at the end",
            "MiB",
            vec![self.hwm],
        );
        vec![
            idle_rss.max_at_most(P4_IDLE_RSS, &format!("≤ {P4_IDLE_RSS} MiB")),
            idle_anon,
            idle_uss.max_at_most(P4_IDLE_USS, &format!("≤ {P4_IDLE_USS} MiB")),
            idle_pss,
            load_rss,
            load_anon,
            load_uss,
            load_pss,
            hwm,
        ]
    }
}

/// Peak RSS, RssAnon, USS and PSS of `proc` (each its own maximum), sampled every 10 ms
/// while `workers` tasks each keep calling `call` for `duration`. Fails if any call failed.
pub async fn sample_rss_under<F, Fut>(
    proc: &Proc,
    workers: usize,
    duration: Duration,
    call: F,
) -> anyhow::Result<procs::Mem>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let call = Arc::new(call);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (call, stop, done) = (call.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    call(w).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    let end = Instant::now() + duration;
    let mut peak = proc.mem()?;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
        peak = peak.max(proc.mem()?);
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    tracing::info!(requests = done.load(Ordering::Relaxed), peak_rss_mib = peak.rss, peak_uss_mib = peak.uss, name = %proc.name, "load sample");
    Ok(peak)
}
