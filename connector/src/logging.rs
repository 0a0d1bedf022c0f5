//! Structured logs: text on a terminal, JSON on Lambda (`AWS_LAMBDA_LOG_FORMAT=JSON`).
//!
//! The level comes from `RUST_LOG` (`info`, or `warn,sri_bootstrap=debug`), else
//! `AWS_LAMBDA_LOG_LEVEL`, else `info`. Parsed as static targets: no regex engine in the binary.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber (stderr).
pub fn init(format: LogFormat) {
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| {
            std::env::var("AWS_LAMBDA_LOG_LEVEL")
                .ok()
                .map(|l| l.to_lowercase())
        })
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| "info".parse().expect("valid filter"));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Json => registry
            .with(layer.json().flatten_event(true).with_current_span(false))
            .try_init(),
        LogFormat::Text => registry.with(layer).try_init(),
    };
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (CloudWatch).
    Json,
}

/// Parses `text` or `json` (any case), as `AWS_LAMBDA_LOG_FORMAT` holds it.
pub fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s.to_ascii_lowercase().as_str() {
        "text" | "" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("`{other}` is not a log format: use text or json")),
    }
}
