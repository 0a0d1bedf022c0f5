//! The Dify serverless connector.
//!
//! Today this crate holds [`protocol`]: SRI v1, the signed, streaming protocol between the
//! connector and a plugin function. It has no AWS or server dependencies so that the
//! `bootstrap` binary can use it with `default-features = false`; the protocol exists once.

pub mod error;
pub mod protocol;

pub use error::Error;
