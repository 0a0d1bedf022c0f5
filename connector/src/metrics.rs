//! Prometheus metrics for `GET /metrics`: invocations, errors by type, latency, active streams,
//! launches.
//!
//! Label values come only from closed sets ([`ACTIONS`], [`ERROR_TYPES`], and `other`): actions
//! and error types are chosen by callers and plugins, and a series per distinct value would let
//! anyone grow the registry (and every scrape) without bound.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The label value for anything outside a closed set.
pub const OTHER: &str = "other";

/// The daemon's actions (`PluginAccessAction` in the daemon's `access_types` package).
pub const ACTIONS: &[&str] = &[
    "invoke_tool",
    "validate_tool_credentials",
    "get_tool_runtime_parameters",
    "invoke_llm",
    "invoke_text_embedding",
    "invoke_multimodal_embedding",
    "invoke_rerank",
    "invoke_multimodal_rerank",
    "invoke_tts",
    "invoke_speech2text",
    "invoke_moderation",
    "validate_provider_credentials",
    "validate_model_credentials",
    "invoke_endpoint",
    "get_tts_model_voices",
    "get_text_embedding_num_tokens",
    "get_ai_model_schemas",
    "get_llm_num_tokens",
    "invoke_agent_strategy",
    "get_authorization_url",
    "get_credentials",
    "refresh_credentials",
    "validate_datasource_credentials",
    "invoke_website_datasource_get_crawl",
    "invoke_online_document_datasource_get_pages",
    "invoke_online_document_datasource_get_page_content",
    "invoke_online_drive_browse_files",
    "invoke_online_drive_download_file",
    "fetch_parameter_options",
    "invoke_trigger_event",
    "dispatch_trigger_event",
    "subscribe_trigger",
    "unsubscribe_trigger",
    "refresh_trigger",
    "validate_trigger_credentials",
];

/// The error types the gateway, the client and the bootstrap report (a plugin's own error
/// types are counted as `other`).
pub const ERROR_TYPES: &[&str] = &[
    "BadRequest",
    "PayloadTooLarge",
    "RequestTimeout",
    "FunctionNotFound",
    "FunctionUnreachable",
    "FunctionFailed",
    "FunctionProtocolError",
    "FunctionStreamBroken",
    "FunctionStreamTruncated",
    "PluginNotReady",
    "PluginProcessExited",
    "PluginTimeout",
    "PluginOutputTooLarge",
    "PluginProtocolError",
    "Sri.Unauthorized",
    "NotFound",
];

/// `value` when it is in `set`, else [`OTHER`].
fn closed(set: &'static [&'static str], value: &str) -> &'static str {
    set.iter().find(|v| **v == value).copied().unwrap_or(OTHER)
}

/// Label: an action.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    /// One of [`ACTIONS`], or [`OTHER`].
    pub action: &'static str,
}

impl ActionLabel {
    /// The label of a caller's action.
    pub fn of(action: &str) -> Self {
        Self {
            action: closed(ACTIONS, action),
        }
    }
}

/// Label: an error type.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// One of [`ERROR_TYPES`], or [`OTHER`].
    pub error_type: &'static str,
}

/// Label: a launch result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `success` or `failed`.
    pub result: String,
}

/// Label of a backwards call through the relay (never a session id).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackwardsLabel {
    /// One of `relay::TYPES`, or [`OTHER`].
    pub r#type: &'static str,
    /// `ok`, `unauthorized`, `forbidden`, `bad_request`, `daemon_error`,
    /// `daemon_unreachable`, `daemon_timeout` or `broken`.
    pub outcome: &'static str,
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
    /// The plugin sandbox's mechanisms: 1 in use, 0 not (see [`Metrics::sandbox`]).
    pub sandbox: Family<MechanismLabel, Gauge>,
    /// Backwards calls through the relay by type and outcome.
    pub backwards: Family<BackwardsLabel, Counter>,
}

/// Label: a sandbox mechanism.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MechanismLabel {
    /// One of [`crate::sandbox::MECHANISMS`], or [`OTHER`].
    pub mechanism: &'static str,
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
        let sandbox = Family::<MechanismLabel, Gauge>::default();
        registry.register(
            "sandbox_mechanism",
            "Plugin sandbox mechanisms on the local backend: 1 in use, 0 not available",
            sandbox.clone(),
        );
        let backwards = Family::<BackwardsLabel, Counter>::default();
        registry.register(
            "backwards_calls",
            "Backwards invocations through the relay by type and outcome",
            backwards.clone(),
        );
        Self {
            registry,
            invocations,
            errors,
            first_byte,
            duration,
            active_streams,
            launches,
            sandbox,
            backwards,
        }
    }
}

impl Metrics {
    /// Counts an error (types outside [`ERROR_TYPES`] as `other`).
    pub fn error(&self, error_type: &str) {
        self.errors
            .get_or_create(&ErrorLabel {
                error_type: closed(ERROR_TYPES, error_type),
            })
            .inc();
    }

    /// Counts an invocation (actions outside [`ACTIONS`] as `other`).
    pub fn invocation(&self, action: &str) {
        self.invocations
            .get_or_create(&ActionLabel::of(action))
            .inc();
    }

    /// Records which sandbox mechanisms are in use (none reported when the sandbox is off).
    pub fn sandbox(&self, report: &crate::sandbox::Report) {
        if report.mode == crate::sandbox::Mode::Off {
            return;
        }
        for m in crate::sandbox::MECHANISMS {
            let on = report.active.iter().any(|a| a == m);
            self.sandbox
                .get_or_create(&MechanismLabel { mechanism: m })
                .set(i64::from(on));
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("text encoding");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_only_from_closed_sets() {
        let m = Metrics::default();
        for i in 0..1000 {
            m.invocation(&format!("junk_{i}"));
            m.error(&format!("Junk{i}"));
        }
        m.invocation("invoke_tool");
        m.error("PluginTimeout");
        let text = m.render();
        let series = text.lines().filter(|l| !l.starts_with('#')).count();
        assert!(series < 100, "{series} series:\n{text}");
        assert!(
            text.contains(r#"sri_invocations_total{action="other"} 1000"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sri_invocations_total{action="invoke_tool"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sri_invocation_errors_total{error_type="other"} 1000"#),
            "{text}"
        );
        assert!(!text.contains("junk_") && !text.contains("Junk"), "{text}");
    }
}
