//! guestcred-lab: the test world (API-server emulator, real-guest lab). Never shipped.
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use guestcred::runtime::logging::{self as telemetry, LogFormat};
use guestcred_lab::apiserver;
use guestcred_lab::cluster::{self, ExtraVm, LabStatus, UpOptions, UpOutcome};
use guestcred_lab::guest::default_cache_dir;

#[derive(Parser)]
#[command(
    name = "guestcred-lab",
    version,
    about = "guestcred's test world: a Kubernetes API-server emulator and a lab of real QEMU guests"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "GUESTCRED_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone, Debug)]
struct StateDir {
    /// Where the lab keeps lab.json, kubeconfig, logs and the nodes' trees
    /// (default <repo>/.lab/run).
    #[arg(long, env = "GUESTCRED_LAB_STATE")]
    state_dir: Option<PathBuf>,
}

impl StateDir {
    fn path(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(cluster::default_state_dir)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the Kubernetes API-server emulator (plain HTTP, loopback) until killed.
    Apiserver(apiserver::ApiServerArgs),
    /// Start the lab in the background: API server + kubevirt-lite, one libvirtd and K
    /// guests per node, a real shim per node, optionally the real controller.
    Up(UpArgs),
    /// Stop everything the lab started and remove its run state.
    Down(DownArgs),
    /// Show the lab: kubeconfig, nodes, shims, guests and their agents.
    Status(StatusArgs),
    /// Run a command in a lab guest (through its agent) and exit with its exit code.
    Exec(ExecArgs),
    /// Pause a lab guest's domain (the VMI shows Paused=True).
    Pause(VmArgs),
    /// Resume a paused lab guest.
    Resume(VmArgs),
    /// (internal) The lab's API server, kubevirt-lite, libvirtds and guests; started by `up`.
    #[command(hide = true)]
    Serve(StateDir),
}

#[derive(Args)]
struct UpArgs {
    #[command(flatten)]
    state: StateDir,
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    #[arg(long, default_value_t = 2)]
    vms_per_node: usize,
    /// A special guest: NAME:NODE[:agent=on|off|hung|old] (old = no guest-ssh-*). Repeatable.
    #[arg(long = "extra-vm", value_name = "NAME:NODE[:agent=MODE]")]
    extra_vms: Vec<String>,
    /// Also run the real controller against the lab.
    #[arg(long)]
    with_controller: bool,
    /// Controller replicas (leader-elected on the chart's Lease when more than one).
    #[arg(long, default_value_t = 1)]
    controller_replicas: usize,
    /// The API server: the project's emulator, or a real kube-apiserver + etcd +
    /// kube-controller-manager (lab/controlplane, built by scripts/build-controlplane.sh)
    /// with the Helm chart installed and the controller running as its ServiceAccount.
    #[arg(long, value_enum, default_value_t = cluster::ControlPlane::Emulator)]
    control_plane: cluster::ControlPlane,
    /// Namespaced mode: the controller watches only these namespaces (comma-separated), and
    /// on a real control plane the chart is installed with them as `watchNamespaces`.
    #[arg(long, value_delimiter = ',')]
    watch_namespaces: Vec<String>,
    /// Port every shim listens on (0: pick a free one, for labs side by side).
    #[arg(long, default_value_t = 8443)]
    shim_port: u16,
    /// Guest image cache (default $GUESTCRED_LAB_CACHE or <repo>/.lab/cache).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// The guestcred binary (default: next to this one, else target/debug).
    #[arg(long, env = "GUESTCRED_BIN")]
    guestcred_bin: Option<PathBuf>,
    /// Do not run scripts/install-deps.sh when a host tool is missing.
    #[arg(long)]
    no_install_deps: bool,
    /// Take the lab down (and delete the state dir) once this process exits.
    #[arg(long)]
    owner_pid: Option<u32>,
}

#[derive(Args)]
struct DownArgs {
    #[command(flatten)]
    state: StateDir,
    /// Keep the logs and node trees (remove only lab.json, kubeconfig and the TLS keys).
    #[arg(long)]
    keep_logs: bool,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    state: StateDir,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ExecArgs {
    #[command(flatten)]
    state: StateDir,
    /// The VM: NAME (namespace default) or NAMESPACE/NAME.
    vm: String,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Args)]
struct VmArgs {
    #[command(flatten)]
    state: StateDir,
    /// The VM: NAME (namespace default) or NAMESPACE/NAME.
    vm: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match run(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("guestcred-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Apiserver(args) => apiserver::run(args).await?,
        Command::Serve(state) => cluster::serve::run(&state.path()).await?,
        Command::Up(args) => up(args).await?,
        Command::Down(args) => {
            let dir = args.state.path();
            let report = cluster::down(&dir, !args.keep_logs).await?;
            if report.was_up {
                for what in &report.stopped {
                    println!("stopped {what}");
                }
                println!("lab down ({})", dir.display());
            } else {
                println!("no lab is up in {}", dir.display());
            }
        }
        Command::Status(args) => {
            let status = cluster::status(&args.state.path()).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            // Do not wait for a probe still stuck on a hung agent.
            let _ = std::io::stdout().flush();
            std::process::exit(0);
        }
        Command::Exec(args) => {
            let out = cluster::exec(&args.state.path(), &args.vm, &args.command).await?;
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            let _ = std::io::stdout().flush();
            let code = u8::try_from(out.exit_code.clamp(0, 255)).unwrap_or(1);
            return Ok(ExitCode::from(code));
        }
        Command::Pause(args) => {
            cluster::pause(&args.state.path(), &args.vm).await?;
            println!("paused {}", args.vm);
        }
        Command::Resume(args) => {
            cluster::resume(&args.state.path(), &args.vm).await?;
            println!("resumed {}", args.vm);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let extra_vms = args
        .extra_vms
        .iter()
        .map(|s| s.parse::<ExtraVm>())
        .collect::<Result<Vec<_>, _>>()?;
    let opts = UpOptions {
        nodes: args.nodes,
        vms_per_node: args.vms_per_node,
        extra_vms,
        state_dir: args.state.path(),
        cache_dir: args.cache_dir.unwrap_or_else(default_cache_dir),
        with_controller: args.with_controller,
        shim_port: args.shim_port,
        guestcred_bin: args.guestcred_bin,
        lab_bin: None,
        install_deps: !args.no_install_deps,
        owner_pid: args.owner_pid,
        control_plane: args.control_plane,
        controller_replicas: args.controller_replicas,
        watch_namespaces: args.watch_namespaces,
    };
    let state = match cluster::up(&opts).await? {
        UpOutcome::AlreadyUp(state) => {
            eprintln!(
                "the lab is already up in {} (stop it with: guestcred-lab down)",
                state.state_dir.display()
            );
            state
        }
        UpOutcome::Started(state) => {
            eprintln!(
                "lab up: {} nodes, {} VMs, {} API server {}{}",
                state.nodes.len(),
                state.vms.len(),
                state.control_plane.as_str(),
                state.apiserver_url.as_deref().unwrap_or("?"),
                if state.controller.is_some() {
                    ", controller running"
                } else {
                    ""
                }
            );
            state
        }
    };
    println!("export KUBECONFIG={}", state.kubeconfig.display());
    Ok(())
}

fn print_status(status: &LabStatus) {
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!("{}", status.export_line());
    println!(
        "phase {:?}; API server {} ({}); controller {}",
        status.phase,
        status.apiserver_url.as_deref().unwrap_or("-"),
        if status.serve_running {
            "running"
        } else {
            "NOT running"
        },
        match status.controller_running {
            None => "not started",
            Some(true) => "running",
            Some(false) => "NOT running",
        }
    );
    println!();
    println!(
        "{:<10} {:<10} {:<22} {:<8}",
        "NODE", "LIBVIRTD", "SHIM", "HEALTHZ"
    );
    for n in &status.nodes {
        println!(
            "{:<10} {:<10} {:<22} {:<8}",
            n.name,
            if n.libvirtd_running {
                "running"
            } else {
                "down"
            },
            n.shim_address,
            if n.shim_healthy { "ok" } else { "no" }
        );
    }
    println!();
    println!(
        "{:<24} {:<8} {:<10} {:<6} {:<6}",
        "VM", "NODE", "DOMAIN", "AGENT", "MODE"
    );
    for vm in &status.vms {
        println!(
            "{:<24} {:<8} {:<10} {:<6} {:<6}",
            format!("{}/{}", vm.namespace, vm.name),
            vm.node,
            vm.domain_state,
            yes(vm.agent_connected),
            vm.agent_mode.as_str()
        );
    }
}
