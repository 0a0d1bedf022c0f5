//! Values that must never be printed: signing keys, API keys.

/// A secret string; `Debug` shows `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A clap value parser for secrets (keeps clap from echoing the value in errors).
pub fn parse(s: &str) -> Result<Secret, String> {
    Ok(Secret(s.to_owned()))
}
