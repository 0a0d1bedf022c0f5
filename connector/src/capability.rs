//! Capability endpoints: the gateway URL handed to the daemon carries a token only the
//! connector can make, so that reaching the port is not enough to run a plugin.
//!
//! The daemon cannot authenticate its data-plane calls (it sends no key), but it stores the
//! endpoint it is given at launch and calls `{endpoint}/invoke`: the endpoint is
//! `{SRI_PUBLIC_URL}/v1/functions/{name}/{token}`, with `token` = base64url (no padding, so no
//! `=` for the daemon's launch parser to split on) of the first 24 bytes (192 bits) of
//! HMAC-SHA256(endpoint key, name). It is derived rather than stored, so every replica and a
//! restarted connector agree, and it is checked with one HMAC per key in constant time.
//!
//! Endpoint keys are `SRI_ENDPOINT_SECRET` (`secret[,older…]`: the first issues, all are
//! accepted) or, by default, one derived from each key of the signing ring: the first issues,
//! all are accepted, so endpoints follow the ring's rotation.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::Error;
use crate::protocol::signing::KeyRing;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of HMAC output a token carries (192 bits).
const TOKEN_BYTES: usize = 24;

/// The shortest `SRI_ENDPOINT_SECRET` accepted.
pub const MIN_SECRET_BYTES: usize = 32;

/// The label a ring key is derived with (changing it would change every endpoint).
const DERIVATION_LABEL: &str = "sri endpoint token key v1";

/// Makes and checks endpoint tokens.
#[derive(Clone)]
pub struct Capabilities {
    /// Keyed HMAC states; the first issues tokens, every one is accepted.
    keys: Vec<HmacSha256>,
}

impl std::fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Capabilities(<{} keys redacted>)", self.keys.len())
    }
}

impl Capabilities {
    /// Keys derived from every key of the signing ring (the first issues).
    pub fn from_ring(ring: &KeyRing) -> Self {
        let keys = ring
            .keys()
            .iter()
            .map(|k| HmacSha256::new_from_slice(&k.derive(DERIVATION_LABEL)).expect("any size"))
            .collect();
        Self { keys }
    }

    /// Keys from `SRI_ENDPOINT_SECRET`: comma-separated secrets of at least
    /// [`MIN_SECRET_BYTES`] bytes each; the first issues, all are accepted.
    pub fn from_secrets(list: &str) -> Result<Self, Error> {
        let mut keys = Vec::new();
        for (i, s) in list.split(',').map(str::trim).enumerate() {
            if s.len() < MIN_SECRET_BYTES {
                return Err(Error::Config(format!(
                    "SRI_ENDPOINT_SECRET: secret #{} has {} bytes, at least {MIN_SECRET_BYTES} are \
                     required (make one with `openssl rand -hex 32`)",
                    i + 1,
                    s.len()
                )));
            }
            keys.push(HmacSha256::new_from_slice(s.as_bytes()).expect("any size"));
        }
        Ok(Self { keys })
    }

    /// The token of function `name`.
    pub fn token(&self, name: &str) -> String {
        let mut mac = self.keys[0].clone();
        mac.update(name.as_bytes());
        URL_SAFE_NO_PAD.encode(&mac.finalize().into_bytes()[..TOKEN_BYTES])
    }

    /// Whether `token` is the token of `name` under any accepted key (constant time in the
    /// token's bytes).
    pub fn check(&self, name: &str, token: &str) -> bool {
        // A token of the wrong length cannot be right; its length is not a secret.
        if token.len() != TOKEN_BYTES.div_ceil(3) * 4 {
            return false;
        }
        let Ok(given) = URL_SAFE_NO_PAD.decode(token) else {
            return false;
        };
        // Every key is tried, so the time does not say which one matched.
        self.keys.iter().fold(false, |ok, key| {
            let mut mac = key.clone();
            mac.update(name.as_bytes());
            mac.verify_truncated_left(&given).is_ok() | ok
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::signing::Key;

    fn ring(secrets: &[u8]) -> KeyRing {
        KeyRing::new(
            secrets
                .iter()
                .enumerate()
                .map(|(i, s)| Key::new(format!("k{i}"), vec![*s; 32]).unwrap())
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn tokens_are_stable_unguessable_and_bound_to_the_name() {
        let caps = Capabilities::from_ring(&ring(&[1]));
        let t = caps.token("fn1");
        assert_eq!(
            t,
            Capabilities::from_ring(&ring(&[1])).token("fn1"),
            "a restart agrees"
        );
        assert_eq!(t.len(), 32);
        assert!(
            !t.contains(',') && !t.contains('=') && !t.contains('/'),
            "{t}"
        );
        assert!(caps.check("fn1", &t));
        assert!(!caps.check("fn2", &t), "another function's token");
        assert!(!caps.check("fn1", &caps.token("fn2")));
        assert!(!caps.check("fn1", ""));
        assert!(!caps.check("fn1", "invoke"));
        let mut wrong = t.clone().into_bytes();
        wrong[5] = if wrong[5] == b'A' { b'B' } else { b'A' };
        assert!(!caps.check("fn1", std::str::from_utf8(&wrong).unwrap()));
        assert!(
            !Capabilities::from_ring(&ring(&[2])).check("fn1", &t),
            "another ring"
        );
    }

    #[test]
    fn tokens_follow_the_rings_rotation() {
        let old = Capabilities::from_ring(&ring(&[1]));
        let rotated = Capabilities::from_ring(&ring(&[2, 1]));
        assert!(
            rotated.check("fn1", &old.token("fn1")),
            "old endpoints keep working"
        );
        assert_ne!(
            rotated.token("fn1"),
            old.token("fn1"),
            "new ones use the new key"
        );
        assert!(!Capabilities::from_ring(&ring(&[2])).check("fn1", &old.token("fn1")));
    }

    #[test]
    fn explicit_secrets_are_checked_and_rotate() {
        let short = Capabilities::from_secrets("tooshort")
            .unwrap_err()
            .to_string();
        assert!(
            short.contains("SRI_ENDPOINT_SECRET") && short.contains("openssl rand"),
            "{short}"
        );
        let a = "a".repeat(32);
        let b = "b".repeat(32);
        let old = Capabilities::from_secrets(&a).unwrap();
        let both = Capabilities::from_secrets(&format!("{b},{a}")).unwrap();
        assert!(both.check("f", &old.token("f")));
        assert!(both.check("f", &both.token("f")));
        assert_ne!(both.token("f"), old.token("f"));
    }
}
