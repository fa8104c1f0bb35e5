//! What both binaries (controller and shim) run on, in one place: the async runtime of a
//! fixed size ([`start`]), structured logging ([`logging`]), graceful stop on SIGTERM
//! ([`signals`]), and the admin port with
//! `/metrics`, `/healthz` and `/readyz` ([`admin`]). The metric registries themselves are
//! values (`crate::metrics`) handed to the parts that record into them, not globals.
pub mod admin;
pub mod logging;
pub mod signals;

pub use logging::LogFormat;

/// A multi-threaded tokio runtime with `workers` async workers and at most
/// `max_blocking` threads for blocking calls (`None`: tokio's default), its threads named
/// `name`. Both binaries size it by flag instead of tokio's one worker per core.
pub fn start(
    workers: u16,
    max_blocking: Option<u16>,
    name: &str,
) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(usize::from(workers));
    if let Some(n) = max_blocking {
        builder.max_blocking_threads(usize::from(n));
    }
    builder.thread_name(name).enable_all().build()
}
