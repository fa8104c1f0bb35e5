//! guestcred-shim: the node shim alone, as the DaemonSet's image runs it. The same flags as
//! `guestcred shim`; a binary of its own so a node maps none of the controller's code (a
//! smaller resident set: see docs/benchmarks.md, P4).
use clap::Parser;
use guestcred::shim::{self, ShimArgs};

fn main() -> anyhow::Result<()> {
    shim::main(ShimArgs::parse())
}
