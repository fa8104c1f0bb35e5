//! Prometheus metrics (`prometheus-client`) for the shim and the controller, and the small
//! plain-HTTP router that serves them with `/healthz` and `/readyz`.
//!
//! Labels are closed sets (operation, backend, kind, result, reason). Never a VM, user,
//! namespace or secret: those would leak data and explode cardinality.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Content type of the OpenMetrics text format that `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Agent calls take from ~1 ms (ssh keys) to the agent timeout (seconds).
fn agent_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// A run takes from milliseconds to its deadline (minutes).
fn run_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 18))
}

fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::error!(error = %e, "encoding metrics");
    }
    text
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentCallLabels {
    operation: &'static str,
    backend: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentOpLabels {
    operation: &'static str,
    backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: &'static str,
}

/// Why the shim refused a request before any agent call (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The TLS handshake failed (no common ground, client cert from another CA, ...).
    TlsHandshake,
    /// No (or a wrong) credential: no client certificate, bad bearer token.
    Unauthenticated,
    /// A valid certificate whose identity is not an allowed client.
    ClientNotAllowed,
    /// The request names another node.
    WrongNode,
    /// The request names no node.
    MissingNode,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TlsHandshake => "tls_handshake",
            Self::Unauthenticated => "unauthenticated",
            Self::ClientNotAllowed => "client_not_allowed",
            Self::WrongNode => "wrong_node",
            Self::MissingNode => "missing_node",
        }
    }
}

/// The shim's metrics; one registry per shim instance.
#[derive(Debug)]
pub struct ShimMetrics {
    registry: Registry,
    agent_calls: Family<AgentCallLabels, Counter>,
    agent_call_duration: HistogramFamily<AgentOpLabels>,
    in_flight: Gauge<i64, AtomicI64>,
    refused: Family<RefusedLabels, Counter>,
    connections: Gauge<i64, AtomicI64>,
}

/// One open connection of the shim's API port; see [`ShimMetrics::connection_opened`].
pub struct OpenConnection(Gauge<i64, AtomicI64>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ShimMetrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let agent_calls = Family::<AgentCallLabels, Counter>::default();
        let agent_call_duration: HistogramFamily<AgentOpLabels> =
            Family::new_with_constructor(agent_histogram);
        let in_flight = Gauge::<i64, AtomicI64>::default();
        let refused = Family::<RefusedLabels, Counter>::default();
        let connections = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "guestcred_shim_open_connections",
            "Open connections of the API port, TLS handshakes included (capped by --max-connections)",
            connections.clone(),
        );
        registry.register(
            "guestcred_shim_agent_calls",
            "Guest agent calls by operation, backend and result (ok or the error reason)",
            agent_calls.clone(),
        );
        registry.register(
            "guestcred_shim_agent_call_duration_seconds",
            "Duration of guest agent calls",
            agent_call_duration.clone(),
        );
        registry.register(
            "guestcred_shim_in_flight_calls",
            "Guest agent calls in progress",
            in_flight.clone(),
        );
        registry.register(
            "guestcred_shim_requests_refused",
            "Requests refused before any agent call, by reason",
            refused.clone(),
        );
        Arc::new(Self {
            registry,
            agent_calls,
            agent_call_duration,
            in_flight,
            refused,
            connections,
        })
    }

    /// Count one open API connection until the returned guard is dropped.
    pub fn connection_opened(&self) -> OpenConnection {
        self.connections.inc();
        OpenConnection(self.connections.clone())
    }

    /// Start timing one agent call; the returned guard counts it as in flight until it is
    /// finished (or dropped, when the request is cancelled: counted as `cancelled`).
    pub fn start_call(
        self: &Arc<Self>,
        operation: &'static str,
        backend: &'static str,
    ) -> AgentCallGuard {
        self.in_flight.inc();
        AgentCallGuard {
            metrics: self.clone(),
            operation,
            backend,
            started: Instant::now(),
            done: false,
        }
    }

    pub fn refused(&self, why: Refusal) {
        self.refused
            .get_or_create(&RefusedLabels {
                reason: why.as_str(),
            })
            .inc();
    }

    /// Agent calls now in progress.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    /// The OpenMetrics text of every shim metric.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

/// One agent call in progress; see [`ShimMetrics::start_call`].
pub struct AgentCallGuard {
    metrics: Arc<ShimMetrics>,
    operation: &'static str,
    backend: &'static str,
    started: Instant,
    done: bool,
}

impl AgentCallGuard {
    /// Record the call's result: `"ok"` or a `ShimErrorReason` string.
    pub fn finish(mut self, result: &'static str) {
        self.record(result);
    }

    fn record(&mut self, result: &'static str) {
        if self.done {
            return;
        }
        self.done = true;
        self.metrics.in_flight.dec();
        let op = AgentOpLabels {
            operation: self.operation,
            backend: self.backend,
        };
        self.metrics
            .agent_call_duration
            .get_or_create(&op)
            .observe(self.started.elapsed().as_secs_f64());
        self.metrics
            .agent_calls
            .get_or_create(&AgentCallLabels {
                operation: self.operation,
                backend: self.backend,
                result,
            })
            .inc();
    }
}

impl Drop for AgentCallGuard {
    fn drop(&mut self) {
        self.record("cancelled");
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindResultLabels {
    kind: &'static str,
    result: &'static str,
}

/// How a target ended, as the `result` label of `guestcred_targets_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetResult {
    Succeeded,
    Failed,
    /// Not started: the failure budget ran out.
    Skipped,
    /// A succeeded target's change undone when its TTL ran out.
    Expired,
}

impl TargetResult {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
            Self::Expired => "expired",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    kind: &'static str,
    result: &'static str,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// The `kind` label: one of the two resource kinds (a closed set, whatever is passed).
fn kind_label(kind: &str) -> &'static str {
    match kind {
        "GuestPasswordReset" => "GuestPasswordReset",
        "KeypairRebuild" => "KeypairRebuild",
        _ => "other",
    }
}

/// The controller's metrics: one registry per controller, carried in its context and
/// served on its admin port.
#[derive(Debug)]
pub struct ControllerMetrics {
    registry: Registry,
    reconciles: Family<KindResultLabels, Counter>,
    targets: Family<TargetLabels, Counter>,
    targets_in_flight: Family<KindLabels, Gauge<i64, AtomicI64>>,
    run_duration: HistogramFamily<KindLabels>,
    sealed_held: Gauge<i64, AtomicI64>,
    ready: AtomicBool,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControllerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let reconciles = Family::<KindResultLabels, Counter>::default();
        let targets = Family::<TargetLabels, Counter>::default();
        let targets_in_flight = Family::<KindLabels, Gauge<i64, AtomicI64>>::default();
        let run_duration: HistogramFamily<KindLabels> = Family::new_with_constructor(run_histogram);
        let sealed_held = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "guestcred_sealed_values_held",
            "Plaintexts of sealed generated passwords held in memory for retries (each erased when its target finishes)",
            sealed_held.clone(),
        );
        registry.register(
            "guestcred_reconciles",
            "Reconciles by kind and result (ok or error)",
            reconciles.clone(),
        );
        registry.register(
            "guestcred_targets",
            "Finished targets by kind, result (succeeded, failed, skipped, expired) and condition reason",
            targets.clone(),
        );
        registry.register(
            "guestcred_targets_in_flight",
            "Targets being worked on now",
            targets_in_flight.clone(),
        );
        registry.register(
            "guestcred_run_duration_seconds",
            "Duration of one drive of an object's targets (a reconcile's agent work)",
            run_duration.clone(),
        );
        // Series that exist from the start, so rate() and alerts see zeros, not gaps.
        for kind in ["GuestPasswordReset", "KeypairRebuild"] {
            for result in ["ok", "error"] {
                let _ = reconciles.get_or_create(&KindResultLabels { kind, result });
            }
            let _ = targets_in_flight.get_or_create(&KindLabels { kind });
        }
        Self {
            registry,
            reconciles,
            targets,
            targets_in_flight,
            run_duration,
            sealed_held,
            ready: AtomicBool::new(false),
        }
    }

    /// How many sealed plaintexts the controller holds now (`controller::sealed`).
    pub fn set_sealed_values_held(&self, n: usize) {
        self.sealed_held.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Count one reconcile of `kind` (`GuestPasswordReset`, `KeypairRebuild`).
    pub fn reconcile(&self, kind: &str, ok: bool) {
        self.reconciles
            .get_or_create(&KindResultLabels {
                kind: kind_label(kind),
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// Count one finished target; `reason` is a condition reason (CamelCase constant).
    pub fn target(&self, kind: &str, result: TargetResult, reason: &str) {
        self.targets
            .get_or_create(&TargetLabels {
                kind: kind_label(kind),
                result: result.as_str(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Count a target as in flight until the guard drops.
    pub fn target_started(&self, kind: &str) -> InFlightGuard {
        let gauge = self
            .targets_in_flight
            .get_or_create(&KindLabels {
                kind: kind_label(kind),
            })
            .clone();
        gauge.inc();
        InFlightGuard { gauge }
    }

    /// Time one run; the duration is recorded when the guard drops.
    pub fn run_started(&self, kind: &str) -> RunTimer {
        RunTimer {
            run_duration: self.run_duration.clone(),
            kind: kind_label(kind),
            started: Instant::now(),
        }
    }

    /// Ready once the controller's caches synced; reported by `/readyz`.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

/// Decrements the in-flight gauge when dropped (also when a target's future is dropped).
pub struct InFlightGuard {
    gauge: Gauge<i64, AtomicI64>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Records `guestcred_run_duration_seconds` when dropped.
pub struct RunTimer {
    run_duration: HistogramFamily<KindLabels>,
    kind: &'static str,
    started: Instant,
}

impl Drop for RunTimer {
    fn drop(&mut self) {
        self.run_duration
            .get_or_create(&KindLabels { kind: self.kind })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_call_is_counted_with_its_result_and_leaves_flight() {
        let m = ShimMetrics::new();
        let call = m.start_call("set-password", "qga-socket");
        assert_eq!(m.in_flight(), 1);
        call.finish("UserNotFound");
        assert_eq!(m.in_flight(), 0);
        let text = m.encode();
        assert!(
            text.contains(r#"guestcred_shim_agent_calls_total{operation="set-password",backend="qga-socket",result="UserNotFound"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("guestcred_shim_agent_call_duration_seconds_count"),
            "{text}"
        );
    }

    #[test]
    fn dropped_agent_call_counts_as_cancelled() {
        let m = ShimMetrics::new();
        drop(m.start_call("probe", "libvirt"));
        assert_eq!(m.in_flight(), 0);
        assert!(m.encode().contains(r#"result="cancelled"} 1"#));
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let m = ShimMetrics::new();
        m.refused(Refusal::WrongNode);
        m.refused(Refusal::WrongNode);
        assert!(
            m.encode()
                .contains(r#"guestcred_shim_requests_refused_total{reason="wrong_node"} 2"#)
        );
    }
}
