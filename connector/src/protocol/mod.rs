//! SRI (v2, and v1 while upgrades need it), the connector ↔ function protocol (see `architecture.md`).
//!
//! One implementation used by both ends: the wire types ([`envelope`], [`events`]), the SSE
//! codec ([`sse`]), request signing ([`signing`]) and the names of the backwards-call wire
//! ([`relay`]).

pub mod envelope;
pub mod events;
pub mod relay;
pub mod signing;
pub mod sse;

/// Path of the invoke route on a function endpoint.
pub const INVOKE_PATH: &str = "/invoke";
/// Path of the health route on a function endpoint.
pub const HEALTH_PATH: &str = "/health";
/// Media type of the streaming response.
pub const EVENT_STREAM: &str = "text/event-stream";
/// Media type of the buffered response.
pub const JSON: &str = "application/json";
