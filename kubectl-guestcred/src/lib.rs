//! `kubectl guestcred`: the imperative front door to guestcred. Every command creates or
//! reads the same GuestPasswordReset / KeypairRebuild objects a `kubectl apply` would, through
//! the API server only (never a shim), with the user's kubeconfig and permissions.
#![forbid(unsafe_code)]
pub mod cli;
pub mod complete;
pub mod follow;
pub mod keys;
pub mod password;
pub mod rotate;
pub mod status;
pub mod targets;
pub mod util;

/// kubectl's label selector syntax, shared with the lab's API server.
pub use guestcred_api::selector;

pub use cli::Cli;
use cli::Command;

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::SetPassword(a) => password::set_password(g, a).await,
        Command::Status(a) => status::status(g, a).await,
        Command::ShowPassword(a) => password::show_password(g, a).await,
        Command::Rotate(a) => rotate::rotate(g, a).await,
        Command::AddKey(a) => keys::add_key(g, a).await,
        Command::RemoveKey(a) => keys::remove_key(g, a).await,
        Command::ListKeys(a) => keys::list_keys(g, a).await,
        Command::Completion(a) => {
            let mut script = Vec::new();
            complete::script(a.shell, &mut script);
            // A closed pipe (`… | head`) is not an error worth a panic.
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
    }
}

/// The process's exit code for a result, after printing the error kubectl-style.
pub fn exit_code(result: anyhow::Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            let code = e
                .downcast_ref::<util::Exit>()
                .map_or(util::exit::FAILED, |x| x.code);
            eprintln!("error: {e:#}");
            code
        }
    }
}

/// A runtime for one command (one thread is plenty for a handful of API calls).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}
