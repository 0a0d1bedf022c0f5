//! SRI signature verification (`connector::protocol::signing`): the session, timestamp,
//! signature, nonce and key-id headers come from the network.
//!
//! Oracle: an independent verifier written here from the protocol text (`hmac` and `sha2`
//! directly). The ring accepts a request exactly when the reference does, with the same key and
//! version; what the ring signs, it verifies. The key-ring parser is fuzzed too: what it
//! accepts is well-formed, and its errors never show a secret.
#![no_main]

use arbitrary::Arbitrary;
use connector::protocol::signing::{
    self, Expected, HEADER_KEY_ID, HEADER_NONCE, HEADER_SESSION, HEADER_SIGNATURE,
    HEADER_TIMESTAMP, Key, KeyRing,
};
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

#[derive(Arbitrary, Debug)]
struct Input {
    ring_text: String,
    session: Vec<u8>,
    timestamp: Vec<u8>,
    signature: Vec<u8>,
    nonce: Option<Vec<u8>>,
    key_id: Option<Vec<u8>>,
    function: String,
    action: String,
    body: Vec<u8>,
    now: u64,
    skew: u16,
    accept_v1: bool,
    /// Sign the request here (with this key and version) instead of taking `signature`.
    sign_with: Option<(bool, bool)>,
}

const SECRETS: [(&str, [u8; 32]); 2] = [("k1", [7; 32]), ("k2", [9; 32])];

fn ring() -> KeyRing {
    KeyRing::new(
        SECRETS
            .iter()
            .map(|(id, s)| Key::new(*id, s.to_vec()).unwrap())
            .collect(),
    )
    .unwrap()
}

fn hmac(secret: &[u8], text: &str) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    m.update(text.as_bytes());
    m.finalize().into_bytes().into()
}

fn to_sign(
    version: u8,
    ts: u64,
    nonce: &str,
    function: &str,
    session: &str,
    req: &Input,
) -> String {
    let digest = hex::encode(Sha256::digest(&req.body));
    if version == 2 {
        format!(
            "v2\n{ts}\n{nonce}\n{function}\n{session}\n{}\n{digest}",
            req.action
        )
    } else {
        format!("v1\n{ts}\n{session}\n{}\n{digest}", req.action)
    }
}

/// The protocol, read independently: `Some((key id, version))` when the request must verify.
fn reference(h: &HeaderMap, req: &Input, max_skew: u64) -> Option<(String, u8)> {
    let get = |n: &str| h.get(n).map(|v| v.to_str().ok());
    let session = get(HEADER_SESSION)??;
    if session.is_empty() {
        return None;
    }
    let ts: u64 = get(HEADER_TIMESTAMP)??.parse().ok()?;
    let sig = get(HEADER_SIGNATURE)??;
    let (version, hex_sig) = match sig.split_at_checked(3)? {
        ("v2=", rest) => (2, rest),
        ("v1=", rest) if req.accept_v1 => (1, rest),
        _ => return None,
    };
    let sig = hex::decode(hex_sig).ok().filter(|s| s.len() == 32)?;
    let nonce = if version == 2 {
        let n = get(HEADER_NONCE)??;
        ((24..=128).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_hexdigit())).then_some(n)?
    } else {
        ""
    };
    if ts.abs_diff(req.now) > max_skew {
        return None;
    }
    let text = to_sign(version, ts, nonce, &req.function, session, req);
    let kid = get(HEADER_KEY_ID).map(|k| k.ok_or(()));
    SECRETS
        .iter()
        .filter(|(id, _)| match &kid {
            None => true,
            Some(Ok(k)) => k == id,
            Some(Err(())) => false,
        })
        .find(|(_, secret)| hmac(secret, &text)[..] == sig[..])
        .map(|(id, _)| ((*id).to_owned(), version))
}

fuzz_target!(|input: Input| {
    // The ring parser: accepted rings have usable keys; a refusal never echoes a secret.
    match input.ring_text.parse::<KeyRing>() {
        Ok(r) => assert!(r.keys().iter().all(|k| !k.id().is_empty())),
        Err(e) => {
            let msg = e.to_string();
            for item in input.ring_text.split(',') {
                if let Some((_, secret)) = item.split_once(':') {
                    let secret = secret.trim();
                    let b64 = |c: char| c.is_ascii_alphanumeric() || "+/=".contains(c);
                    let in_an_id = input
                        .ring_text
                        .split(',')
                        .any(|it| it.split_once(':').map_or(it, |(i, _)| i).contains(secret));
                    if secret.len() >= 16 && secret.chars().all(b64) && !in_an_id {
                        assert!(!msg.contains(secret), "ring error shows a secret: {msg}");
                    }
                }
            }
        }
    }

    let ring = ring();
    let max_skew = u64::from(input.skew);
    let mut h = HeaderMap::new();
    let mut put = |name: &'static str, v: &[u8]| {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            h.insert(name, v);
        }
    };
    put(HEADER_SESSION, &input.session);
    put(HEADER_TIMESTAMP, &input.timestamp);
    put(HEADER_SIGNATURE, &input.signature);
    if let Some(n) = &input.nonce {
        put(HEADER_NONCE, n);
    }
    if let Some(k) = &input.key_id {
        put(HEADER_KEY_ID, k);
    }
    // Signed here: the verifying side must agree on the accepted cases too, not only refusals.
    let text = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (session, ts, nonce) = (
        text(HEADER_SESSION),
        text(HEADER_TIMESTAMP),
        text(HEADER_NONCE),
    );
    if let Some((second_key, v2)) = input.sign_with
        && let (Some(session), Some(ts)) = (session, ts)
        && let Ok(ts) = ts.parse::<u64>()
    {
        let (_, secret) = SECRETS[usize::from(second_key)];
        let version = if v2 { 2 } else { 1 };
        let nonce = nonce.unwrap_or_default();
        let text = to_sign(version, ts, &nonce, &input.function, &session, &input);
        let sig = format!("v{version}={}", hex::encode(hmac(&secret, &text)));
        h.insert(HEADER_SIGNATURE, HeaderValue::from_str(&sig).unwrap());
    }
    let expected = Expected {
        function: &input.function,
        action: &input.action,
        body: &input.body,
        accept_v1: input.accept_v1,
    };
    let got = ring.verify(&h, &expected, input.now, max_skew);
    let want = reference(&h, &input, max_skew);
    match (&got, &want) {
        (Ok(v), Some((kid, version))) => {
            assert_eq!((&v.key_id, v.version), (kid, *version));
            assert_eq!(
                Some(v.session_id.as_str()),
                h.get(HEADER_SESSION).and_then(|s| s.to_str().ok())
            );
            assert!(v.timestamp.abs_diff(input.now) <= max_skew);
        }
        (Err(_), None) => {}
        _ => panic!("verify says {got:?}, the reference {want:?}"),
    }

    // What the ring signs (v2, visible-ASCII session), it verifies.
    let session: String = input
        .function
        .chars()
        .filter(|c| (' '..='~').contains(c))
        .collect();
    if !session.is_empty() {
        let nonce = hex::encode(Sha256::digest(&input.body));
        let signed = ring.sign_v2(
            input.now,
            &nonce,
            &input.function,
            &session,
            &input.action,
            &input.body,
        );
        let mut h = HeaderMap::new();
        signed.apply(&mut h).expect("visible ASCII session");
        let v = ring
            .verify(&h, &expected, input.now, 0)
            .expect("own signature verifies");
        assert_eq!(
            (v.version, v.session_id.as_str(), v.key_id.as_str()),
            (2, session.as_str(), "k1")
        );
        signing::check_session(&v, &session).unwrap();
    }
});
