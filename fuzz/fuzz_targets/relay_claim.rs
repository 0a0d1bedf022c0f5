//! The relay's session claims (`connector::relay::claim`): the `x-sri-relay-claim` header of a
//! backwards call comes from the network, and the bootstrap parses the claims it is handed
//! (`connector::protocol::relay::claim_expiry`).
//!
//! Oracle: an independent check written here from the module's text (`hmac` and `sha2`
//! directly: the key derived as HMAC(secret, label), the tag over the claim's fields). A claim
//! is accepted exactly when the reference says its tag is right for this session and function
//! and it has not expired; every claim the relay issues verifies until its expiry and not after;
//! the bootstrap's expiry parse agrees with the relay's wherever the relay got that far.
#![no_main]

use arbitrary::Arbitrary;
use connector::protocol::relay::claim_expiry;
use connector::protocol::signing::{Key, KeyRing};
use connector::relay::claim::{ClaimError, issue, verify};
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

#[derive(Arbitrary, Debug)]
struct Input {
    claim: Option<String>,
    function: String,
    session: String,
    now: u64,
    expiry: u64,
    /// Issue a claim here (for this function/session, or another) instead of taking `claim`.
    issue_for: Option<(bool, bool)>,
}

const SECRETS: [(&str, [u8; 32]); 2] = [("k1", [7; 32]), ("k2", [9; 32])];
const LABEL: &str = "sri relay claim key v1";

fn ring(first: usize) -> KeyRing {
    let mut keys: Vec<Key> = SECRETS
        .iter()
        .map(|(id, s)| Key::new(*id, s.to_vec()).unwrap())
        .collect();
    keys.rotate_left(first);
    KeyRing::new(keys).unwrap()
}

fn hmac(key: &[u8], text: &[u8]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    m.update(text);
    m.finalize().into_bytes().into()
}

/// The reference: `Some(expiry)` when `claim`'s tag is right for (function, session).
fn reference(claim: &str, function: &str, session: &str) -> Option<u64> {
    if claim.len() > 256 {
        return None;
    }
    let rest = claim.strip_prefix("v1.")?;
    let (expiry, rest) = rest.split_once('.')?;
    let (kid, tag) = rest.split_once('.')?;
    let expiry: u64 = expiry.parse().ok()?;
    let secret = SECRETS.iter().find(|(id, _)| *id == kid)?.1;
    let key = hmac(&secret, LABEL.as_bytes());
    let text = format!("sri relay claim v1\n{expiry}\n{function}\n{session}");
    let want = hmac(&key, text.as_bytes());
    let got = hex::decode(tag).ok()?;
    (got == want).then_some(expiry)
}

fuzz_target!(|input: Input| {
    let ring = ring(usize::from(input.now % 2 == 1));
    let claim = match input.issue_for {
        Some((same_function, same_session)) => {
            let f = if same_function {
                input.function.clone()
            } else {
                format!("{}x", input.function)
            };
            let s = if same_session {
                input.session.clone()
            } else {
                format!("{}x", input.session)
            };
            let c = issue(&ring, &f, &s, input.expiry);
            assert_eq!(claim_expiry(&c), Some(input.expiry), "{c}");
            // What the relay issues, it (and any replica with the ring) verifies, until expiry.
            let got = verify(&ring, Some(&c), &f, &s, input.now);
            if input.now <= input.expiry {
                assert_eq!(got, Ok(()), "{c}");
            } else {
                assert_eq!(
                    got,
                    Err(ClaimError::Expired(input.now - input.expiry)),
                    "{c}"
                );
            }
            Some(c)
        }
        None => input.claim.clone(),
    };
    let got = verify(
        &ring,
        claim.as_deref(),
        &input.function,
        &input.session,
        input.now,
    );
    let Some(claim) = claim else {
        assert_eq!(got, Err(ClaimError::Missing));
        return;
    };
    match reference(&claim, &input.function, &input.session) {
        Some(expiry) if input.now <= expiry => assert_eq!(got, Ok(()), "{claim}"),
        Some(expiry) => assert_eq!(got, Err(ClaimError::Expired(input.now - expiry)), "{claim}"),
        None => assert!(
            got.is_err(),
            "accepted a claim the reference refuses: {claim}"
        ),
    }
    // The bootstrap keeps claims by the expiry it parses: the relay's own reading of it.
    if matches!(
        got,
        Ok(())
            | Err(ClaimError::Expired(_))
            | Err(ClaimError::Mismatch)
            | Err(ClaimError::UnknownKey)
    ) {
        let expiry = claim.split('.').nth(1).and_then(|e| e.parse::<u64>().ok());
        assert_eq!(claim_expiry(&claim), expiry, "{claim}");
    }
});
