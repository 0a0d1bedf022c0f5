//! The published signing vectors (`tests/vectors/sri-v1-signing.json` and
//! `sri-v2-signing.json`, made independently with Python's `hmac`) must match this
//! implementation in both directions, and an HMAC computed here without the library.

use connector::protocol::signing::{self, Key, KeyRing};
use serde_json::Value;

fn vectors() -> Value {
    vector_file("sri-v1-signing.json")
}

fn vector_file(name: &str) -> Value {
    let path = format!("{}/../tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("vector file")).expect("JSON")
}

fn expected<'a>(function: &'a str, action: &'a str, body: &'a [u8]) -> signing::Expected<'a> {
    signing::Expected {
        function,
        action,
        body,
        accept_v1: true,
    }
}

#[test]
fn signatures_match_the_published_vectors() {
    let v = vectors();
    let ring: KeyRing = v["signing_keys_env"]
        .as_str()
        .unwrap()
        .parse()
        .expect("ring parses");
    assert!(v["vectors"].as_array().unwrap().len() >= 4);
    for t in v["vectors"].as_array().unwrap() {
        let (kid, ts, sid, action) = (
            t["key_id"].as_str().unwrap(),
            t["timestamp"].as_u64().unwrap(),
            t["session_id"].as_str().unwrap(),
            t["action"].as_str().unwrap(),
        );
        let body = t["body"].as_str().unwrap().as_bytes();
        assert_eq!(
            signing::string_to_sign(ts, sid, action, body),
            t["string_to_sign"].as_str().unwrap()
        );
        let key: &Key = ring.keys().iter().find(|k| k.id() == kid).unwrap();
        let single = KeyRing::new(vec![key.clone()]).unwrap();
        let signed = single.sign(ts, sid, action, body);
        assert_eq!(
            signed.signature,
            t["signature"].as_str().unwrap(),
            "vector {sid}"
        );
        // And the whole ring verifies it, with or without the key id.
        let mut headers = http::HeaderMap::new();
        signed.apply(&mut headers).unwrap();
        assert_eq!(
            ring.verify(&headers, &expected("any", action, body), ts, 300)
                .unwrap()
                .key_id,
            kid
        );
        headers.remove(signing::HEADER_KEY_ID);
        assert_eq!(
            ring.verify(&headers, &expected("any", action, body), ts, 300)
                .unwrap()
                .key_id,
            kid
        );
        // One flipped body byte fails.
        let mut tampered = body.to_vec();
        tampered.push(b' ');
        assert!(
            ring.verify(&headers, &expected("any", action, &tampered), ts, 300)
                .is_err()
        );
    }
}

/// HMAC-SHA256 by its definition (RFC 2104) over SHA-256, without the `hmac` crate or the
/// library's string builder: an independent check of the published v2 vectors.
fn independent_hmac(key: &[u8], message: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::digest([pad(0x36), message.to_vec()].concat());
    let outer = Sha256::digest([pad(0x5c), inner.to_vec()].concat());
    hex::encode(outer)
}

#[test]
fn v2_signatures_match_the_published_vectors_and_an_independent_hmac() {
    use base64::Engine;
    let v = vector_file("sri-v2-signing.json");
    let ring: KeyRing = v["signing_keys_env"].as_str().unwrap().parse().unwrap();
    let cases = v["vectors"].as_array().unwrap();
    assert!(cases.len() >= 4);
    for t in cases {
        let s = |k: &str| t[k].as_str().unwrap();
        let (kid, nonce, function, sid, action) = (
            s("key_id"),
            s("nonce"),
            s("function_name"),
            s("session_id"),
            s("action"),
        );
        let ts = t["timestamp"].as_u64().unwrap();
        let body = s("body").as_bytes();
        // Independently: the string by the spec's words, the HMAC by its definition.
        let by_hand = format!(
            "v2\n{ts}\n{nonce}\n{function}\n{sid}\n{action}\n{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body))
        );
        assert_eq!(by_hand, s("string_to_sign"), "vector {sid}");
        let secret = base64::engine::general_purpose::STANDARD
            .decode(v["keys"][kid].as_str().unwrap())
            .unwrap();
        assert_eq!(
            format!("v2={}", independent_hmac(&secret, by_hand.as_bytes())),
            s("signature"),
            "independent HMAC of vector {sid}"
        );
        // The library agrees, in both directions.
        assert_eq!(
            signing::string_to_sign_v2(ts, nonce, function, sid, action, body),
            by_hand
        );
        let key: &Key = ring.keys().iter().find(|k| k.id() == kid).unwrap();
        let single = KeyRing::new(vec![key.clone()]).unwrap();
        let signed = single.sign_v2(ts, nonce, function, sid, action, body);
        assert_eq!(signed.signature, s("signature"), "vector {sid}");
        let mut headers = http::HeaderMap::new();
        signed.apply(&mut headers).unwrap();
        assert_eq!(headers[signing::HEADER_NONCE], nonce);
        let mut e = expected(function, action, body);
        e.accept_v1 = false;
        assert_eq!(ring.verify(&headers, &e, ts, 300).unwrap().version, 2);
        // Another function refuses it.
        let other = format!("{function}-other");
        assert_eq!(
            ring.verify(&headers, &expected(&other, action, body), ts, 300),
            Err(signing::Rejection::BadSignature)
        );
    }
}
