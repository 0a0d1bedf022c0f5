//! The published signing vectors (`tests/vectors/sri-v1-signing.json`, made independently with
//! Python's `hmac`) must match this implementation in both directions.

use connector::protocol::signing::{self, Key, KeyRing};
use serde_json::Value;

fn vectors() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/vectors/sri-v1-signing.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("vector file")).expect("JSON")
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
            ring.verify(&headers, action, body, ts, 300).unwrap().key_id,
            kid
        );
        headers.remove(signing::HEADER_KEY_ID);
        assert_eq!(
            ring.verify(&headers, action, body, ts, 300).unwrap().key_id,
            kid
        );
        // One flipped body byte fails.
        let mut tampered = body.to_vec();
        tampered.push(b' ');
        assert!(ring.verify(&headers, action, &tampered, ts, 300).is_err());
    }
}
