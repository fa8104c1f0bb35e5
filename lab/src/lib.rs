//! The test world: never shipped in product images.
pub mod apiserver;
pub mod cluster;
pub mod guest;
pub mod hostkubevirt;
pub mod hostqga;
pub mod kubevirt;
pub mod replicas;
pub mod simagent;
pub mod testing;
pub mod world;

use std::path::PathBuf;

/// The environment the chart's controller Deployment gives the controller besides its
/// settings (tests/helm_chart.rs checks the chart sets it): processes the lab and the
/// bench start as "the deployed controller" get it too.
///
/// `MALLOC_ARENA_MAX=1`: one glibc malloc arena instead of one per thread that allocates.
/// With several, a freshly started controller's RSS varied by up to 9 MiB from one start
/// to the next (45-54 MiB synced against 1,000 nodes, bench P6 on the real control plane,
/// four starts); with one it stayed within 0.4 MiB (44.2-44.6 MiB, five starts), at the
/// same CPU per target. Since then the binary's Rust allocations go to jemalloc
/// (src/bin/guestcred.rs); the setting still governs glibc's malloc for the C code linked in.
pub const DEPLOYED_CONTROLLER_ENV: &[(&str, &str)] = &[("MALLOC_ARENA_MAX", "1")];

/// The workspace root (scripts/, crds/, examples/, target/ and .lab/ live there).
pub fn repo_dir() -> PathBuf {
    let lab = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    lab.parent().map(PathBuf::from).unwrap_or(lab)
}
