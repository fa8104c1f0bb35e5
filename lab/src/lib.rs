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

/// The workspace root (scripts/, crds/, examples/, target/ and .lab/ live there).
pub fn repo_dir() -> PathBuf {
    let lab = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    lab.parent().map(PathBuf::from).unwrap_or(lab)
}
