//! Session claims: how any relay replica knows a session went through a gateway, without
//! shared state.
//!
//! With each invocation the gateway sends the function a claim,
//! `v1.{expiry}.{kid}.{hex HMAC-SHA256(k, "sri relay claim v1\n{expiry}\n{function}\n{session}")}`
//! where `k` is derived from the signing ring's key `kid` (the first key issues, every key
//! verifies, so claims follow the ring's rotation). The bootstrap presents it back with each
//! backwards call of that session; a relay that did not see the session itself accepts the call
//! only with a claim for exactly that session and function that has not expired. The claim
//! is not a secret (it is useless without the function's signing key, which signs the call),
//! only proof that a connector holding the ring made the invocation.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::protocol::signing::{Key, KeyRing};

type HmacSha256 = Hmac<Sha256>;

/// The label claim keys are derived with (changing it invalidates every claim).
const DERIVATION_LABEL: &str = "sri relay claim key v1";
/// Longest claim accepted (an expiry, a key id and 64 hex digits fit well within it).
const MAX_CLAIM_LEN: usize = 256;

/// Why a claim was refused; each says what to check.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// No claim was presented.
    #[error(
        "the session is not in flight through this connector's gateway (no session claim \
         presented, header `x-sri-relay-claim`): backwards calls are accepted only during an \
         invocation made through the gateway"
    )]
    Missing,
    /// The claim is not `v1.{expiry}.{kid}.{hex}`.
    #[error(
        "malformed session claim (header `x-sri-relay-claim`): pass on the one the gateway sent"
    )]
    Malformed,
    /// The claim names a key the ring does not hold.
    #[error(
        "the session claim was made with a key this connector's SRI_SIGNING_KEYS does not hold"
    )]
    UnknownKey,
    /// The claim is for another session or function, or forged.
    #[error(
        "the session claim does not match: the session belongs to another function, or the \
         claim was not made by a connector sharing this ring"
    )]
    Mismatch,
    /// The claim's lifetime is over.
    #[error(
        "the session is no longer in flight (its claim expired {0} s ago; SRI_RELAY_SESSION_TTL_SECS)"
    )]
    Expired(u64),
}

fn mac(key: &Key, expiry: u64, function: &str, session: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(&key.derive(DERIVATION_LABEL)).expect("any size");
    mac.update(format!("sri relay claim v1\n{expiry}\n{function}\n{session}").as_bytes());
    mac
}

/// The claim that `session` of `function` is in flight until `expiry` (Unix seconds).
pub fn issue(ring: &KeyRing, function: &str, session: &str, expiry: u64) -> String {
    let key = &ring.keys()[0];
    let tag = mac(key, expiry, function, session).finalize().into_bytes();
    format!("v1.{expiry}.{}.{}", key.id(), hex::encode(tag))
}

/// Checks `claim` for `session` of `function` at `now` (Unix seconds).
pub fn verify(
    ring: &KeyRing,
    claim: Option<&str>,
    function: &str,
    session: &str,
    now: u64,
) -> Result<(), ClaimError> {
    let claim = claim.ok_or(ClaimError::Missing)?;
    if claim.len() > MAX_CLAIM_LEN {
        return Err(ClaimError::Malformed);
    }
    let mut parts = claim.splitn(4, '.');
    let (Some("v1"), Some(expiry), Some(kid), Some(tag)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ClaimError::Malformed);
    };
    let expiry: u64 = expiry.parse().map_err(|_| ClaimError::Malformed)?;
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(tag, &mut bytes).map_err(|_| ClaimError::Malformed)?;
    let key = ring
        .keys()
        .iter()
        .find(|k| k.id() == kid)
        .ok_or(ClaimError::UnknownKey)?;
    mac(key, expiry, function, session)
        .verify_slice(&bytes)
        .map_err(|_| ClaimError::Mismatch)?;
    if now > expiry {
        return Err(ClaimError::Expired(now - expiry));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn ring(seed: u8) -> KeyRing {
        let s = base64::engine::general_purpose::STANDARD.encode([seed; 32]);
        format!("k{seed}:{s}").parse().unwrap()
    }

    #[test]
    fn a_claim_binds_session_function_expiry_and_ring() {
        let r = ring(1);
        let c = issue(&r, "fn-a", "sess", 1000);
        assert_eq!(crate::protocol::relay::claim_expiry(&c), Some(1000));
        assert_eq!(verify(&r, Some(&c), "fn-a", "sess", 999), Ok(()));
        assert_eq!(verify(&r, Some(&c), "fn-a", "sess", 1000), Ok(()));
        assert_eq!(
            verify(&r, Some(&c), "fn-b", "sess", 999),
            Err(ClaimError::Mismatch)
        );
        assert_eq!(
            verify(&r, Some(&c), "fn-a", "other", 999),
            Err(ClaimError::Mismatch)
        );
        assert_eq!(
            verify(&r, Some(&c), "fn-a", "sess", 1010),
            Err(ClaimError::Expired(10))
        );
        // A later expiry cannot be written in: it is under the MAC.
        let forged = c.replacen("1000", "9999", 1);
        assert_eq!(
            verify(&r, Some(&forged), "fn-a", "sess", 1010),
            Err(ClaimError::Mismatch)
        );
        assert_eq!(
            verify(&ring(2), Some(&c), "fn-a", "sess", 999),
            Err(ClaimError::UnknownKey)
        );
        assert_eq!(
            verify(&r, None, "fn-a", "sess", 999),
            Err(ClaimError::Missing)
        );
        for bad in [
            "",
            "v1",
            "v2.1.k1.00",
            "v1.x.k1.00",
            "v1.1.k1.zz",
            &"v1.1.k1.".repeat(99),
        ] {
            assert_eq!(
                verify(&r, Some(bad), "fn-a", "sess", 0),
                Err(ClaimError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn claims_follow_the_rings_rotation() {
        let old = ring(1);
        let rotated = KeyRing::new(vec![ring(2).keys()[0].clone(), old.keys()[0].clone()]).unwrap();
        let c = issue(&old, "f", "s", 50);
        assert_eq!(verify(&rotated, Some(&c), "f", "s", 1), Ok(()));
        let c = issue(&rotated, "f", "s", 50);
        assert!(c.starts_with("v1.50.k2."), "{c}");
    }
}
