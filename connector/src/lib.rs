//! The Dify serverless connector.
//!
//! The library behind `sri`: the control plane and gateway ([`server`], [`gateway`]), the one
//! package intake ([`intake`], [`package`]), the backends, packaging and the CLI. Without its
//! default features it is only what both binaries share — [`protocol`] (SRI, the signed,
//! streaming protocol between the connector and a plugin function), the manifest and the
//! secret handling — which the `bootstrap` uses with `default-features = false`, so the
//! protocol exists once.

#[cfg(feature = "accept")]
pub mod accept;
#[cfg(feature = "lambda")]
pub mod aws;
#[cfg(feature = "server")]
pub mod backend;
#[cfg(feature = "server")]
pub mod capability;
#[cfg(feature = "server")]
pub mod child;
// The command line offers every backend, the Lambda ones included.
#[cfg(feature = "lambda")]
pub mod cli;
#[cfg(feature = "server")]
pub mod client;
pub mod error;
#[cfg(feature = "server")]
pub mod gateway;
#[cfg(feature = "harden")]
pub mod harden;
#[cfg(feature = "server")]
pub mod intake;
#[cfg(feature = "server")]
pub mod launch;
#[cfg(feature = "logging")]
pub mod logging;
pub mod manifest;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod names;
#[cfg(feature = "server")]
pub mod package;
#[cfg(feature = "server")]
pub mod packaging;
pub mod protocol;
#[cfg(feature = "server")]
pub mod relay;
#[cfg(feature = "server")]
pub mod requirements;
#[cfg(feature = "server")]
pub mod sandbox;
pub mod secret;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod transport;

pub use error::Error;
