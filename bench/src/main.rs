//! guestcred-bench: the numbers behind `make bench` (see docs/benchmarks.md).
//!
//! P1 single reset latency on a real guest, P2 bulk throughput over a fleet of host qemu-ga
//! agents, P3 controller scale (10k VMIs, 1k finished resets, restart), P4 shim footprint,
//! P5 hung agent isolation. The controller and the shims run as separate release processes
//! (CPU and RSS from /proc); the API server is the lab emulator served over loopback HTTP
//! from this process. Writes `<out>/results.json` and `<out>/results.md`.
mod cluster;
mod fleet;
mod p1;
mod p3;
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
    about = "guestcred benchmarks (P1-P5); needs root and scripts/install-deps.sh"
)]
struct Args {
    /// Where results.json and results.md go.
    #[arg(long, default_value = "bench")]
    out: PathBuf,
    /// Run only these benchmarks (comma-separated: p1,p2,p3,p4,p5); results are still written.
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
    /// P5 rounds (each: 20 resets without and with a hung agent).
    #[arg(long, default_value_t = 5)]
    p5_rounds: usize,
    /// Extra environment for every controller process (KEY=VALUE, repeatable), for
    /// experiments such as allocator settings.
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
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let wants =
        |p: &str| args.only.is_empty() || args.only.iter().any(|o| o.eq_ignore_ascii_case(p));
    let started = Instant::now();
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
    let controller_env = args
        .controller_env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--controller-env {kv:?} is not KEY=VALUE"))
        })
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
        match p1::run(&ctx, args.p1_rounds, args.load_secs).await {
            Ok(r) => {
                if wants("p1") {
                    sections.push(r.p1);
                }
                p4.figures.extend(r.p4_libvirt);
            }
            Err(e) => fail("P1", e, &mut sections),
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
            match fleet::run(&ctx, &fleet, args.p2_rounds, args.p5_rounds, args.load_secs).await {
                Ok(r) => {
                    if wants("p2") {
                        sections.push(r.p2);
                    }
                    p4.figures.extend(r.p4_qga);
                    if wants("p5") {
                        sections.push(r.p5);
                    }
                }
                Err(e) => fail("P2", e, &mut sections),
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
    if wants("p4") {
        p4.notes.push(format!(
            "RSS sampled every 10 ms while 50 workers each keep one request in flight for {} s (3 samples per backend); idle is read before any load. Targets: idle ≤ 20 MiB, under load ≤ 40 MiB.",
            args.load_secs
        ));
        sections.push(p4);
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
            "controller_env": args.controller_env,
        }),
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
    pub idle: Vec<f64>,
    pub idle_anon: Vec<f64>,
    pub peaks: Vec<Peak>,
    pub hwm: f64,
}

impl Footprint {
    /// `P4.<key>.*` figures; `load` says what the 50 concurrent requests were.
    pub fn figures(self, key: &str, backend: &str, load: &str) -> Vec<stats::Figure> {
        use stats::Figure;
        let idle = Figure::new(
            &format!("P4.{key}.idle"),
            &format!("shim RSS idle ({backend} backend)"),
            "MiB",
            self.idle,
        );
        let loaded = Figure::new(
            &format!("P4.{key}.load"),
            &format!("shim peak RSS under 50 concurrent {load} ({backend} backend)"),
            "MiB",
            self.peaks.iter().map(|p| p.rss).collect(),
        )
        .against(&idle)
        .max_at_most(40.0, "peak ≤ 40 MiB");
        let idle_anon = Figure::new(
            &format!("P4.{key}.idle_anon"),
            "  of which anonymous (RssAnon: heap, stacks; the rest is the binary and shared libraries)",
            "MiB",
            self.idle_anon,
        );
        let load_anon = Figure::new(
            &format!("P4.{key}.load_anon"),
            "  peak anonymous RSS under that load",
            "MiB",
            self.peaks.iter().map(|p| p.anon).collect(),
        )
        .against(&idle_anon);
        let hwm = Figure::new(
            &format!("P4.{key}.hwm"),
            "shim VmHWM at the end",
            "MiB",
            vec![self.hwm],
        );
        vec![
            idle.max_at_most(20.0, "≤ 20 MiB"),
            idle_anon,
            loaded,
            load_anon,
            hwm,
        ]
    }
}

/// Peaks seen while sampling.
pub struct Peak {
    pub rss: f64,
    pub anon: f64,
}

/// Peak RSS (and anonymous RSS) of `proc`, sampled every 10 ms while `workers` tasks each
/// keep calling `call` for `duration`. Fails if any call failed.
pub async fn sample_rss_under<F, Fut>(
    proc: &Proc,
    workers: usize,
    duration: Duration,
    call: F,
) -> anyhow::Result<Peak>
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
    let mut peak = Peak {
        rss: proc.rss_mib()?,
        anon: proc.anon_mib()?,
    };
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
        peak.rss = peak.rss.max(proc.rss_mib()?);
        peak.anon = peak.anon.max(proc.anon_mib()?);
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    tracing::info!(requests = done.load(Ordering::Relaxed), peak_mib = peak.rss, name = %proc.name, "load sample");
    Ok(peak)
}
