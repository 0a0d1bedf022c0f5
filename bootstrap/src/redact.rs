//! Keeps plugin credentials out of logs and error messages.
//!
//! Every invocation registers the credential values of its envelope; text the runtime logs or
//! reports from the plugin (stderr, log events, stderr tails) has them replaced by `***`.
//! Recent secrets are remembered (bounded) because a plugin may print one after its session ended.

use std::collections::VecDeque;
use std::sync::RwLock;

/// Secrets shorter than this are not redacted: they would mangle ordinary text.
const MIN_SECRET_LEN: usize = 4;
/// How many distinct secrets are remembered.
const CAPACITY: usize = 256;

/// The set of secrets to hide.
#[derive(Debug, Default)]
pub struct Redactor {
    secrets: RwLock<VecDeque<String>>,
}

impl Redactor {
    /// Remembers `secrets` (most recent first to be kept).
    pub fn register<'a>(&self, secrets: impl IntoIterator<Item = &'a String>) {
        let mut held = self.secrets.write().expect("redactor lock");
        for s in secrets {
            if s.len() < MIN_SECRET_LEN || held.contains(s) {
                continue;
            }
            if held.len() == CAPACITY {
                held.pop_front();
            }
            held.push_back(s.clone());
        }
    }

    /// `text` with every remembered secret replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let held = self.secrets.read().expect("redactor lock");
        let mut out = text.to_owned();
        for s in held.iter() {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hides_registered_secrets_only() {
        let r = Redactor::default();
        r.register(&["sk-live-123".to_string(), "ab".to_string()]);
        assert_eq!(r.redact("key=sk-live-123 ab"), "key=*** ab");
        for i in 0..CAPACITY + 10 {
            r.register(&[format!("secret-{i:04}")]);
        }
        assert_eq!(r.secrets.read().unwrap().len(), CAPACITY);
        assert_eq!(r.redact("secret-0265"), "***");
    }
}
