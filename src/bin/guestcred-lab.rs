//! guestcred-lab: the test world (API-server emulator, real-guest lab). Never shipped.
use clap::{Parser, Subcommand};
use guestcred::lab::apiserver;
use guestcred::telemetry::{self, LogFormat};

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

#[derive(Subcommand)]
enum Command {
    /// Run the Kubernetes API-server emulator (plain HTTP, loopback) until killed.
    Apiserver(apiserver::ApiServerArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Apiserver(args) => apiserver::run(args).await?,
    }
    Ok(())
}
