//! `kubectl-guestcred`: run as `kubectl guestcred …` (kubectl finds it on PATH).
use clap::Parser;
use kubectl_guestcred::{Cli, exit_code, follow, run, runtime};

fn main() {
    let cli = Cli::parse();
    follow::init_colours();
    let code = exit_code(runtime().block_on(run(cli)));
    std::process::exit(code);
}
