//! What both binaries (controller and shim) run on, in one place: structured logging
//! ([`logging`]), graceful stop on SIGTERM ([`signals`]), and the admin port with
//! `/metrics`, `/healthz` and `/readyz` ([`admin`]). The metric registries themselves are
//! values (`crate::metrics`) handed to the parts that record into them, not globals.
pub mod admin;
pub mod logging;
pub mod signals;

pub use logging::LogFormat;
