//! guestcred: the operator's controller, the node shim, and the CRD generator.
use clap::{Parser, Subcommand};
use guestcred::{controller, shim};
use std::path::PathBuf;

/// Rust's allocations in this binary go to jemalloc instead of glibc's malloc. Bench P6 on
/// the real control plane (100,000 targets) had ~30% of the controller's CPU in glibc
/// malloc/free, much of it in consolidating and unlinking free chunks (`malloc_consolidate`,
/// `unlink_chunk`): each target's short-lived request and answer buffers land between
/// long-lived cache entries. The same runs with jemalloc (first preloaded, then built in)
/// used less CPU per target: docs/benchmarks.md. C libraries (libvirt in `guestcred shim`)
/// keep glibc's malloc: the crate's symbols are prefixed.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "guestcred",
    version,
    about = "Reset guest passwords and rotate SSH keys in running KubeVirt-style VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile GuestPasswordReset and KeypairRebuild objects (runs in the cluster).
    Controller(controller::ControllerArgs),
    /// Serve the node-local agent API (one per virtualization node, a DaemonSet).
    Shim(shim::ShimArgs),
    /// Write the CustomResourceDefinitions generated from the Rust types.
    Crdgen {
        /// Directory to write one YAML file per CRD into; without it, print all to stdout.
        #[arg(long, env = "GUESTCRED_CRDGEN_OUT")]
        out: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Controller(args) => controller::main(args),
        Command::Shim(args) => shim::main(args),
        Command::Crdgen { out } => crdgen(out),
    }
}

/// Runs before (without) any async runtime, so its file writes block nobody.
#[allow(clippy::disallowed_methods)] // no runtime here
fn crdgen(out: Option<PathBuf>) -> anyhow::Result<()> {
    for (file, crd) in guestcred::api::crds() {
        let yaml = guestcred::api::crd_yaml(&crd)?;
        match &out {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                std::fs::write(dir.join(file), yaml)?;
            }
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}
