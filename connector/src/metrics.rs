//! Prometheus metrics for `GET /metrics`: invocations, errors by type, latency, active streams,
//! launches.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label: an action.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    /// The SRI action.
    pub action: String,
}

/// Label: an error type.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// `error_type` / `errorType`.
    pub error_type: String,
}

/// Label: a launch result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `success` or `failed`.
    pub result: String,
}

/// The connector's metrics.
pub struct Metrics {
    registry: Registry,
    /// Invocations through the gateway.
    pub invocations: Family<ActionLabel, Counter>,
    /// Failed invocations by error type.
    pub errors: Family<ErrorLabel, Counter>,
    /// Time to the first event.
    pub first_byte: Histogram,
    /// Whole invocation time.
    pub duration: Histogram,
    /// Streams open now.
    pub active_streams: Gauge,
    /// Launches by result.
    pub launches: Family<ResultLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sri");
        let invocations = Family::<ActionLabel, Counter>::default();
        let errors = Family::<ErrorLabel, Counter>::default();
        let first_byte = Histogram::new(exponential_buckets(0.0005, 2.0, 18));
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 20));
        let active_streams = Gauge::default();
        let launches = Family::<ResultLabel, Counter>::default();
        registry.register(
            "invocations",
            "Invocations through the gateway",
            invocations.clone(),
        );
        registry.register(
            "invocation_errors",
            "Failed invocations by error type",
            errors.clone(),
        );
        registry.register(
            "invocation_first_byte_seconds",
            "Time to the function's first event",
            first_byte.clone(),
        );
        registry.register(
            "invocation_duration_seconds",
            "Whole invocation time",
            duration.clone(),
        );
        registry.register(
            "active_streams",
            "Invocation streams open now",
            active_streams.clone(),
        );
        registry.register("launches", "Launches by result", launches.clone());
        Self {
            registry,
            invocations,
            errors,
            first_byte,
            duration,
            active_streams,
            launches,
        }
    }
}

impl Metrics {
    /// Counts an error.
    pub fn error(&self, error_type: &str) {
        self.errors
            .get_or_create(&ErrorLabel {
                error_type: error_type.to_owned(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("text encoding");
        out
    }
}
