//! SRI request signing: the key ring, HMAC-SHA256 signatures, and replay protection.
//!
//! SRI v2 (what the connector sends): `X-Dify-Plugin-Signature: v2=<hex>` with
//! `X-Dify-Plugin-Nonce: <≥ 96 random bits, hex>`; string to sign `"v2\n" + timestamp + "\n" +
//! nonce + "\n" + function_name + "\n" + session_id + "\n" + action + "\n" +
//! hex(sha256(body))`. The nonce makes every attempt unique, so a retry within the same second
//! is never a replay; the function name binds the request to the function it was made for.
//!
//! SRI v1 (still verified while `SRI_ACCEPT_V1` allows it, for a rolling upgrade): `v1=<hex>`
//! over `"v1\n" + timestamp + "\n" + session_id + "\n" + action + "\n" + hex(sha256(body))`.
//!
//! Keys come from `SRI_SIGNING_KEYS` (`kid:base64secret,…`); the first signs and all verify,
//! so keys rotate without downtime. Rejections say which check failed, never the expected
//! value.

use base64::Engine;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};
use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

use crate::Error;

type HmacSha256 = Hmac<Sha256>;

/// Header carrying the session id (must equal the envelope's).
pub const HEADER_SESSION: &str = "x-dify-plugin-session";
/// Header carrying the signing time, Unix seconds.
pub const HEADER_TIMESTAMP: &str = "x-dify-plugin-timestamp";
/// Header carrying `v1=<hex HMAC>`.
pub const HEADER_SIGNATURE: &str = "x-dify-plugin-signature";
/// Header carrying the per-attempt nonce of an SRI v2 request (hex).
pub const HEADER_NONCE: &str = "x-dify-plugin-nonce";
/// Fewest hex digits in a nonce (96 bits).
pub const MIN_NONCE_HEX: usize = 24;
/// Most hex digits in a nonce.
pub const MAX_NONCE_HEX: usize = 128;
/// Optional header naming the key that signed.
pub const HEADER_KEY_ID: &str = "x-dify-plugin-key-id";
/// The environment variable holding the key ring.
pub const KEYS_ENV: &str = "SRI_SIGNING_KEYS";
/// Shortest accepted secret, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;
/// Default accepted clock difference, in seconds.
pub const DEFAULT_MAX_SKEW_SECS: u64 = 300;

/// Why a request was refused. The text names the failed check and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// A required header is absent.
    #[error("missing header `{0}`: sign the request with SRI v2")]
    MissingHeader(&'static str),
    /// A header is present but unusable.
    #[error("malformed header `{0}`: {1}")]
    MalformedHeader(&'static str, &'static str),
    /// The key id is not in the function's key ring.
    #[error("unknown key id `{0}`: the function's SRI_SIGNING_KEYS has no such key")]
    UnknownKeyId(String),
    /// The timestamp is too far from the function's clock.
    #[error(
        "stale timestamp: {skew_secs} s away from the function's clock (at most {max_secs} s allowed); check both clocks"
    )]
    StaleTimestamp {
        /// How far off the timestamp was.
        skew_secs: u64,
        /// The allowed difference.
        max_secs: u64,
    },
    /// No configured key produced the signature.
    #[error(
        "bad signature: no key in the function's SRI_SIGNING_KEYS matches; check that both sides share the key ring and that the request was signed for this function"
    )]
    BadSignature,
    /// The nonce (v2) or signature (v1) was already accepted within the window.
    #[error(
        "replayed request: this nonce was already accepted; sign every attempt anew with a fresh nonce"
    )]
    Replay,
    /// An SRI v1 signature while the function accepts only v2.
    #[error(
        "SRI v1 signatures are no longer accepted by this function (SRI_ACCEPT_V1=false): upgrade the caller to SRI v2"
    )]
    V1Refused,
    /// The signed session differs from the envelope's.
    #[error(
        "session mismatch: header `x-dify-plugin-session` differs from the envelope's session_id"
    )]
    SessionMismatch,
}

/// A signing secret; never printed.
#[derive(Clone)]
struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.0.len())
    }
}

/// One key of a ring.
#[derive(Clone, Debug)]
pub struct Key {
    id: String,
    secret: Secret,
}

impl Key {
    /// Creates a key; the secret must have at least [`MIN_SECRET_BYTES`] bytes.
    pub fn new(id: impl Into<String>, secret: impl Into<Vec<u8>>) -> Result<Self, Error> {
        let id = id.into();
        let secret = secret.into();
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(Error::KeyRing(format!(
                "key id `{id}` must be non-empty and use only letters, digits, `.`, `_` or `-`"
            )));
        }
        if secret.len() < MIN_SECRET_BYTES {
            return Err(Error::KeyRing(format!(
                "key `{id}`: the secret has {} bytes, at least {MIN_SECRET_BYTES} are required \
                 (e.g. `openssl rand -base64 32`)",
                secret.len()
            )));
        }
        Ok(Self {
            id,
            secret: Secret(secret),
        })
    }

    /// The key id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A secret for another purpose derived from this key (HMAC-SHA256 of `label`), so that
    /// one configured secret can key several things without any of them revealing the key.
    pub fn derive(&self, label: &str) -> [u8; 32] {
        self.mac(label.as_bytes()).finalize().into_bytes().into()
    }

    fn mac(&self, to_sign: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.secret.0).expect("HMAC takes any key size");
        mac.update(to_sign);
        mac
    }
}

/// The SRI v2 string to sign for a request.
pub fn string_to_sign_v2(
    timestamp: u64,
    nonce: &str,
    function: &str,
    session_id: &str,
    action: &str,
    body: &[u8],
) -> String {
    let digest = hex::encode(Sha256::digest(body));
    format!("v2\n{timestamp}\n{nonce}\n{function}\n{session_id}\n{action}\n{digest}")
}

/// The SRI v1 string to sign for a request.
pub fn string_to_sign(timestamp: u64, session_id: &str, action: &str, body: &[u8]) -> String {
    let digest = hex::encode(Sha256::digest(body));
    format!("v1\n{timestamp}\n{session_id}\n{action}\n{digest}")
}

/// The headers of a signed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedHeaders {
    /// Session id.
    pub session_id: String,
    /// Unix seconds.
    pub timestamp: u64,
    /// `v2=<hex>` (or `v1=<hex>`).
    pub signature: String,
    /// The signing key's id.
    pub key_id: String,
    /// The nonce (SRI v2 only).
    pub nonce: Option<String>,
}

impl SignedHeaders {
    /// Adds the headers to a request. Fails when the session id cannot be a header value
    /// (it must be visible ASCII; Dify's are UUIDs).
    pub fn apply(&self, headers: &mut HeaderMap) -> Result<(), Error> {
        let visible = |b: u8| (0x20..0x7f).contains(&b);
        let session = Some(&self.session_id)
            .filter(|s| s.bytes().all(visible))
            .and_then(|s| HeaderValue::from_str(s).ok())
            .ok_or_else(|| {
                Error::Envelope("session_id must be visible ASCII to be sent in a header".into())
            })?;
        let value = |s: &str| HeaderValue::from_str(s).expect("ASCII by construction");
        headers.insert(HEADER_SESSION, session);
        headers.insert(HEADER_TIMESTAMP, value(&self.timestamp.to_string()));
        headers.insert(HEADER_SIGNATURE, value(&self.signature));
        headers.insert(HEADER_KEY_ID, value(&self.key_id));
        match &self.nonce {
            Some(n) => headers.insert(HEADER_NONCE, value(n)),
            None => headers.remove(HEADER_NONCE),
        };
        Ok(())
    }
}

/// What a successful verification established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The signed session id.
    pub session_id: String,
    /// The signed timestamp.
    pub timestamp: u64,
    /// The id of the key that matched.
    pub key_id: String,
    /// The protocol version that verified (1 or 2).
    pub version: u8,
    /// What the replay guard remembers: the nonce's digest (v2) or the signature (v1).
    replay_key: [u8; 32],
}

/// The keys a side signs and verifies with. The first key signs.
#[derive(Clone, Debug)]
pub struct KeyRing {
    keys: Vec<Key>,
}

impl KeyRing {
    /// A ring of the given keys (at least one, unique ids).
    pub fn new(keys: Vec<Key>) -> Result<Self, Error> {
        if keys.is_empty() {
            return Err(Error::KeyRing(format!(
                "no keys: set {KEYS_ENV} to `kid:base64secret[,kid2:base64secret2…]`"
            )));
        }
        let mut seen = HashSet::new();
        for k in &keys {
            if !seen.insert(k.id.as_str()) {
                return Err(Error::KeyRing(format!("key id `{}` appears twice", k.id)));
            }
        }
        Ok(Self { keys })
    }

    /// Reads the ring from `SRI_SIGNING_KEYS`.
    pub fn from_env() -> Result<Self, Error> {
        std::env::var(KEYS_ENV)
            .map_err(|_| {
                Error::KeyRing(format!(
                    "{KEYS_ENV} is not set: set it to `kid:base64secret[,…]` (secrets ≥ {MIN_SECRET_BYTES} bytes)"
                ))
            })?
            .parse()
    }

    /// The keys, signing key first.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// Signs a request with the first key.
    pub fn sign(
        &self,
        timestamp: u64,
        session_id: &str,
        action: &str,
        body: &[u8],
    ) -> SignedHeaders {
        let key = &self.keys[0];
        let sig = key
            .mac(string_to_sign(timestamp, session_id, action, body).as_bytes())
            .finalize()
            .into_bytes();
        SignedHeaders {
            session_id: session_id.to_owned(),
            timestamp,
            signature: format!("v1={}", hex::encode(sig)),
            key_id: key.id.clone(),
            nonce: None,
        }
    }

    /// Signs an SRI v2 request for `function` with the first key. `nonce` must be fresh for
    /// every attempt (at least [`MIN_NONCE_HEX`] hex digits of randomness).
    pub fn sign_v2(
        &self,
        timestamp: u64,
        nonce: &str,
        function: &str,
        session_id: &str,
        action: &str,
        body: &[u8],
    ) -> SignedHeaders {
        let key = &self.keys[0];
        let to_sign = string_to_sign_v2(timestamp, nonce, function, session_id, action, body);
        let sig = key.mac(to_sign.as_bytes()).finalize().into_bytes();
        SignedHeaders {
            session_id: session_id.to_owned(),
            timestamp,
            signature: format!("v2={}", hex::encode(sig)),
            key_id: key.id.clone(),
            nonce: Some(nonce.to_owned()),
        }
    }

    /// Verifies a request's signature headers against this function's `function` name,
    /// `action`, `body` and the clock `now` (Unix seconds). SRI v2 always; v1 only when
    /// `accept_v1`. Does not check replays or the envelope: see [`ReplayGuard`] and
    /// [`check_session`].
    pub fn verify(
        &self,
        headers: &HeaderMap,
        request: &Expected<'_>,
        now: u64,
        max_skew_secs: u64,
    ) -> Result<Verified, Rejection> {
        let session_id = header(headers, HEADER_SESSION)?;
        if session_id.is_empty() {
            return Err(Rejection::MalformedHeader(HEADER_SESSION, "it is empty"));
        }
        let timestamp: u64 = header(headers, HEADER_TIMESTAMP)?
            .parse()
            .map_err(|_| Rejection::MalformedHeader(HEADER_TIMESTAMP, "expected Unix seconds"))?;
        let signature = header(headers, HEADER_SIGNATURE)?;
        let (version, hex_sig) = if let Some(rest) = signature.strip_prefix("v2=") {
            (2, rest)
        } else if let Some(rest) = signature.strip_prefix("v1=") {
            (1, rest)
        } else {
            return Err(Rejection::MalformedHeader(
                HEADER_SIGNATURE,
                "expected `v2=<hex>`",
            ));
        };
        let mut sig = [0u8; 32];
        hex::decode_to_slice(hex_sig, &mut sig).map_err(|_| {
            Rejection::MalformedHeader(HEADER_SIGNATURE, "expected 64 hex digits after `v2=`")
        })?;
        if version == 1 && !request.accept_v1 {
            return Err(Rejection::V1Refused);
        }
        let nonce = if version == 2 {
            let nonce = header(headers, HEADER_NONCE)?;
            if !(MIN_NONCE_HEX..=MAX_NONCE_HEX).contains(&nonce.len())
                || !nonce.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(Rejection::MalformedHeader(
                    HEADER_NONCE,
                    "expected 24 to 128 hex digits (at least 96 random bits), fresh for every attempt",
                ));
            }
            Some(nonce)
        } else {
            None
        };
        let skew = now.abs_diff(timestamp);
        if skew > max_skew_secs {
            return Err(Rejection::StaleTimestamp {
                skew_secs: skew,
                max_secs: max_skew_secs,
            });
        }
        let candidates: Vec<&Key> = match headers.get(HEADER_KEY_ID) {
            Some(v) => {
                let kid = v
                    .to_str()
                    .map_err(|_| Rejection::MalformedHeader(HEADER_KEY_ID, "not visible ASCII"))?;
                let key = self
                    .keys
                    .iter()
                    .find(|k| k.id == kid)
                    .ok_or_else(|| Rejection::UnknownKeyId(kid.chars().take(64).collect()))?;
                vec![key]
            }
            None => self.keys.iter().collect(),
        };
        let to_sign = match nonce {
            Some(nonce) => string_to_sign_v2(
                timestamp,
                nonce,
                request.function,
                session_id,
                request.action,
                request.body,
            ),
            None => string_to_sign(timestamp, session_id, request.action, request.body),
        };
        let key = candidates
            .into_iter()
            .find(|k| k.mac(to_sign.as_bytes()).verify_slice(&sig).is_ok())
            .ok_or(Rejection::BadSignature)?;
        let replay_key = match nonce {
            // Keyed by the nonce alone: a nonce is accepted once, whatever it was sent with.
            Some(nonce) => Sha256::digest(nonce.to_ascii_lowercase().as_bytes()).into(),
            None => sig,
        };
        Ok(Verified {
            session_id: session_id.to_owned(),
            timestamp,
            key_id: key.id.clone(),
            version,
            replay_key,
        })
    }
}

/// What a function expects of a request it verifies.
#[derive(Clone, Copy, Debug)]
pub struct Expected<'a> {
    /// This function's own name (bound by SRI v2 signatures).
    pub function: &'a str,
    /// The request's `action` query parameter.
    pub action: &'a str,
    /// The request body.
    pub body: &'a [u8],
    /// Whether SRI v1 signatures (no nonce, no function name) are still accepted.
    pub accept_v1: bool,
}

/// Checks that the signed session is the envelope's.
pub fn check_session(verified: &Verified, envelope_session_id: &str) -> Result<(), Rejection> {
    if verified.session_id == envelope_session_id {
        Ok(())
    } else {
        Err(Rejection::SessionMismatch)
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, Rejection> {
    headers
        .get(name)
        .ok_or(Rejection::MissingHeader(name))?
        .to_str()
        .map_err(|_| Rejection::MalformedHeader(name, "not visible ASCII"))
}

impl FromStr for KeyRing {
    type Err = Error;

    /// Parses `kid:base64secret[,kid:base64secret…]`. Errors name the key, never the secret.
    fn from_str(s: &str) -> Result<Self, Error> {
        let mut keys = Vec::new();
        for (i, item) in s.split(',').map(str::trim).enumerate() {
            if item.is_empty() {
                continue;
            }
            let (id, b64) = item.split_once(':').ok_or_else(|| {
                Error::KeyRing(format!(
                    "entry {} has no `:`; each entry is `kid:base64secret`",
                    i + 1
                ))
            })?;
            let secret = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64.trim()))
                .map_err(|_| {
                    Error::KeyRing(format!(
                        "key `{}`: the secret is not valid base64",
                        id.trim()
                    ))
                })?;
            keys.push(Key::new(id.trim(), secret)?);
        }
        Self::new(keys)
    }
}

/// Remembers the nonces (v1: signatures) of accepted requests within the clock window, so that
/// each is accepted once. Only requests the function accepted are recorded: a refused attempt
/// (plugin not ready, bad envelope) never makes its retry a "replay".
///
/// Memory is bounded: entries expire with the window, and at most `capacity` are kept (the
/// oldest are forgotten first; a forgotten one is by then far older than most traffic).
#[derive(Debug)]
pub struct ReplayGuard {
    window_secs: u64,
    capacity: usize,
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    set: HashSet<[u8; 32]>,
    order: VecDeque<(u64, [u8; 32])>,
}

impl ReplayGuard {
    /// A guard for signatures valid `window_secs` either side of now.
    pub fn new(window_secs: u64, capacity: usize) -> Self {
        Self {
            window_secs,
            capacity: capacity.max(1),
            seen: Mutex::new(Seen::default()),
        }
    }

    /// Whether `verified` was already accepted (without recording it).
    pub fn check(&self, verified: &Verified) -> Result<(), Rejection> {
        let seen = self.seen.lock().expect("replay guard lock");
        if seen.set.contains(&verified.replay_key) {
            Err(Rejection::Replay)
        } else {
            Ok(())
        }
    }

    /// Records `verified` as accepted; refuses one already recorded (atomically, so two
    /// concurrent copies of a request cannot both be accepted).
    pub fn record(&self, verified: &Verified, now: u64) -> Result<(), Rejection> {
        let mut seen = self.seen.lock().expect("replay guard lock");
        // A signature is acceptable until timestamp + window; forget it after that.
        while let Some(&(expiry, sig)) = seen.order.front() {
            if expiry >= now && seen.order.len() < self.capacity {
                break;
            }
            seen.order.pop_front();
            seen.set.remove(&sig);
        }
        if !seen.set.insert(verified.replay_key) {
            return Err(Rejection::Replay);
        }
        let expiry = verified.timestamp.saturating_add(self.window_secs);
        seen.order.push_back((expiry, verified.replay_key));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: &str = "0123456789abcdef01234567";

    fn ring() -> KeyRing {
        let a = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        let b = base64::engine::general_purpose::STANDARD.encode([2u8; 48]);
        format!("k1:{a}, k2:{b}").parse().unwrap()
    }

    fn headers(s: &SignedHeaders) -> HeaderMap {
        let mut h = HeaderMap::new();
        s.apply(&mut h).unwrap();
        h
    }

    fn expect<'a>(function: &'a str, action: &'a str, body: &'a [u8]) -> Expected<'a> {
        Expected {
            function,
            action,
            body,
            accept_v1: true,
        }
    }

    #[test]
    fn sign_then_verify() {
        let r = ring();
        let s = r.sign_v2(1000, NONCE, "fn-a", "sess", "invoke_tool", b"{}");
        assert_eq!(s.key_id, "k1");
        assert!(s.signature.starts_with("v2="));
        let v = r
            .verify(
                &headers(&s),
                &expect("fn-a", "invoke_tool", b"{}"),
                1100,
                300,
            )
            .unwrap();
        assert_eq!((v.session_id.as_str(), v.key_id.as_str()), ("sess", "k1"));
        assert_eq!(v.version, 2);
    }

    #[test]
    fn a_v2_signature_is_bound_to_its_function_and_nonce() {
        let r = ring();
        let s = r.sign_v2(1000, NONCE, "fn-a", "sess", "invoke_tool", b"{}");
        let h = headers(&s);
        assert_eq!(
            r.verify(&h, &expect("fn-b", "invoke_tool", b"{}"), 1000, 300),
            Err(Rejection::BadSignature)
        );
        let mut h2 = h.clone();
        h2.insert(
            HEADER_NONCE,
            HeaderValue::from_static("ffffffffffffffffffffffff"),
        );
        assert_eq!(
            r.verify(&h2, &expect("fn-a", "invoke_tool", b"{}"), 1000, 300),
            Err(Rejection::BadSignature)
        );
        for bad in ["", "abc", "zzzzzzzzzzzzzzzzzzzzzzzzzz"] {
            let mut h2 = h.clone();
            h2.insert(HEADER_NONCE, HeaderValue::from_str(bad).unwrap());
            assert!(matches!(
                r.verify(&h2, &expect("fn-a", "invoke_tool", b"{}"), 1000, 300),
                Err(Rejection::MalformedHeader(HEADER_NONCE, _))
            ));
        }
        let mut h2 = h.clone();
        h2.remove(HEADER_NONCE);
        assert_eq!(
            r.verify(&h2, &expect("fn-a", "invoke_tool", b"{}"), 1000, 300),
            Err(Rejection::MissingHeader(HEADER_NONCE))
        );
    }

    #[test]
    fn v1_is_accepted_only_while_allowed() {
        let r = ring();
        let h = headers(&r.sign(1000, "sess", "invoke_tool", b"{}"));
        let mut e = expect("fn-a", "invoke_tool", b"{}");
        let v = r.verify(&h, &e, 1000, 300).unwrap();
        assert_eq!(v.version, 1);
        e.accept_v1 = false;
        assert_eq!(r.verify(&h, &e, 1000, 300), Err(Rejection::V1Refused));
    }

    #[test]
    fn rejections_name_the_check() {
        let r = ring();
        let s = r.sign_v2(1000, NONCE, "f", "sess", "invoke_tool", b"{}");
        let h = headers(&s);
        assert_eq!(
            r.verify(&h, &expect("f", "invoke_tool", b"{x}"), 1000, 300),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            r.verify(&h, &expect("f", "other", b"{}"), 1000, 300),
            Err(Rejection::BadSignature)
        );
        assert!(matches!(
            r.verify(&h, &expect("f", "invoke_tool", b"{}"), 1301, 300),
            Err(Rejection::StaleTimestamp { skew_secs: 301, .. })
        ));
        for name in [HEADER_SESSION, HEADER_TIMESTAMP, HEADER_SIGNATURE] {
            let mut h2 = h.clone();
            h2.remove(name);
            assert_eq!(
                r.verify(&h2, &expect("f", "invoke_tool", b"{}"), 1000, 300),
                Err(Rejection::MissingHeader(name))
            );
        }
        let mut h2 = h.clone();
        h2.insert(HEADER_SIGNATURE, HeaderValue::from_static("v3=00"));
        assert!(matches!(
            r.verify(&h2, &expect("f", "invoke_tool", b"{}"), 1000, 300),
            Err(Rejection::MalformedHeader(HEADER_SIGNATURE, _))
        ));
        let mut h2 = h.clone();
        h2.insert(HEADER_KEY_ID, HeaderValue::from_static("nope"));
        assert_eq!(
            r.verify(&h2, &expect("f", "invoke_tool", b"{}"), 1000, 300),
            Err(Rejection::UnknownKeyId("nope".into()))
        );
        // Without a key id every key is tried.
        let mut h2 = h.clone();
        h2.remove(HEADER_KEY_ID);
        assert!(
            r.verify(&h2, &expect("f", "invoke_tool", b"{}"), 1000, 300)
                .is_ok()
        );
    }

    #[test]
    fn non_ascii_sessions_cannot_be_sent() {
        let s = ring().sign_v2(1, NONCE, "f", "sess-\u{fc}", "a", b"");
        assert!(s.apply(&mut HeaderMap::new()).is_err());
    }

    #[test]
    fn second_key_verifies_after_rotation() {
        let r = ring();
        let rotated = KeyRing::new(vec![r.keys()[1].clone()]).unwrap();
        let s = rotated.sign_v2(5, NONCE, "f", "s", "a", b"b");
        assert_eq!(
            r.verify(&headers(&s), &expect("f", "a", b"b"), 5, 300)
                .unwrap()
                .key_id,
            "k2"
        );
    }

    #[test]
    fn ring_errors_never_show_secrets() {
        let short = base64::engine::general_purpose::STANDARD.encode(b"tooshort-secret");
        let err = format!("k1:{short}")
            .parse::<KeyRing>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("k1") && err.contains("32") && !err.contains(&short),
            "{err}"
        );
        assert!(
            "k1".parse::<KeyRing>()
                .unwrap_err()
                .to_string()
                .contains("kid:base64secret")
        );
        assert!(
            "k1:***"
                .parse::<KeyRing>()
                .unwrap_err()
                .to_string()
                .contains("base64")
        );
        assert!(
            "".parse::<KeyRing>()
                .unwrap_err()
                .to_string()
                .contains(KEYS_ENV)
        );
        let ok = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        let dup = format!("a:{ok},a:{ok}")
            .parse::<KeyRing>()
            .unwrap_err()
            .to_string();
        assert!(dup.contains("twice"));
        assert!(!format!("{:?}", ring()).contains(&ok));
    }

    #[test]
    fn replay_guard_records_only_what_was_accepted() {
        let r = ring();
        let g = ReplayGuard::new(300, 1000);
        let verify = |nonce: &str, ts: u64| {
            r.verify(
                &headers(&r.sign_v2(ts, nonce, "f", "s", "a", b"")),
                &expect("f", "a", b""),
                1000,
                300,
            )
            .unwrap()
        };
        let v = verify(NONCE, 1000);
        // Checked but not accepted (e.g. the plugin was not ready): the retry still passes.
        assert_eq!(g.check(&v), Ok(()));
        assert_eq!(g.check(&v), Ok(()));
        assert_eq!(g.record(&v, 1000), Ok(()));
        assert_eq!(g.check(&v), Err(Rejection::Replay));
        assert_eq!(g.record(&v, 1001), Err(Rejection::Replay));
        // A retry in the same second carries a new nonce: never a replay.
        assert_eq!(
            g.record(&verify("abcdefabcdefabcdefabcdef", 1000), 1000),
            Ok(())
        );
        // After the window the timestamp check refuses it anyway; the guard forgets it.
        assert_eq!(g.record(&v, 1400), Ok(()));
        let g = ReplayGuard::new(300, 2);
        for n in 0..5u8 {
            g.record(&verify(&hex::encode([n; 12]), 1000), 1000)
                .unwrap();
        }
        assert!(g.seen.lock().unwrap().order.len() <= 2);
    }
}
