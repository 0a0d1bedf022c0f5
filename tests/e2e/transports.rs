//! The connector client's AWS transports against independent implementations:
//!
//! - Function URL: the SigV4 `Authorization` the client sends over real HTTP is recomputed by
//!   botocore's `SigV4Auth` (`.venv/moto`) from the captured request and must be identical.
//! - `InvokeWithResponseStream`: the SDK call is answered by a local fake writing real
//!   event-stream frames (`harness::eventstream`); the payload it receives must be an event the
//!   bootstrap accepts, with a valid SRI v1 signature.
//!
//! Everything listens on 127.0.0.1 with per-run ports; waits are bounded, and ordering is
//! established with channels, not sleeps.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use connector::client::{Client, ClientOptions, EventStream, InvokeError};
use connector::protocol::events::{Event, EventKind};
use connector::protocol::signing::{self, KeyRing};
use connector::transport::Target;
use futures_util::StreamExt;
use harness::eventstream::{FakeLambda, Script, Step, sdk_config};
use harness::*;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(30);

fn options() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(5),
        first_byte_timeout: Duration::from_secs(20),
        idle_timeout: Duration::from_secs(20),
        attempts: 3,
        backoff: Duration::from_millis(10),
        ..ClientOptions::default()
    }
}

/// The next item of `stream`, within [`WAIT`].
async fn next(stream: &mut EventStream) -> Option<Result<Event, InvokeError>> {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("the stream moved within 30 s")
}

/// All items of `stream` up to its end.
async fn drain(mut stream: EventStream) -> Vec<Result<Event, InvokeError>> {
    let mut out = Vec::new();
    while let Some(item) = next(&mut stream).await {
        out.push(item);
    }
    out
}

fn sse(kind: &str, id: Option<u64>, data: &Value) -> String {
    match id {
        Some(id) => format!("event: {kind}\nid: {id}\ndata: {data}\n\n"),
        None => format!("event: {kind}\ndata: {data}\n\n"),
    }
}

fn start_event(sid: &str) -> String {
    sse(
        "start",
        None,
        &json!({"session_id": sid, "request_id": "r-1", "cold_start": false}),
    )
}

fn end_event(sid: &str, id: u64) -> String {
    sse(
        "end",
        Some(id),
        &json!({"session_id": sid, "event": "session", "data": {"type": "end"}}),
    )
}

/// The `action` of a query string, decoded as the bootstrap decodes it (form encoding).
fn action_of(query: &str) -> String {
    reqwest::Url::parse(&format!("http://x/?{query}"))
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "action")
        .expect("an action")
        .1
        .into_owned()
}

fn prelude(status: u16) -> Vec<u8> {
    let mut p = serde_json::to_vec(&json!({
        "statusCode": status,
        "headers": {"content-type": "text/event-stream", "cache-control": "no-cache"},
        "cookies": [],
    }))
    .unwrap();
    p.extend_from_slice(&[0; 8]);
    p
}

// ---------------------------------------------------------------------------------------------
// Function URL + SigV4

/// A request as it arrived on the wire.
#[derive(Clone, Debug)]
struct Captured {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

/// What the capture server answers, in order (then 200 + a small valid stream).
type Answers = Arc<Mutex<VecDeque<(u16, Vec<(&'static str, &'static str)>, &'static str)>>>;

#[derive(Clone, Default)]
struct CaptureState {
    seen: Arc<Mutex<Vec<Captured>>>,
    answers: Answers,
}

/// A loopback server that records every request and answers like a Function URL.
async fn capture_server(state: CaptureState) -> (String, tokio::task::JoinHandle<()>) {
    async fn any(
        State(state): State<CaptureState>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let sid = serde_json::from_slice::<Value>(&body).unwrap_or_default()["session_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        state.seen.lock().unwrap().push(Captured {
            method,
            uri,
            headers,
            body,
        });
        if let Some((status, headers, body)) = state.answers.lock().unwrap().pop_front() {
            let mut resp = Response::builder().status(status);
            for (k, v) in headers {
                resp = resp.header(k, v);
            }
            return resp.body(body.into()).unwrap();
        }
        let stream = format!("{}{}", start_event(&sid), end_event(&sid, 1));
        (
            StatusCode::OK,
            [("content-type", "text/event-stream")],
            stream,
        )
            .into_response()
    }
    let app = Router::new().fallback(any).with_state(state);
    let (addr, task) = harness::serve_loopback(app).await;
    (format!("http://{addr}/"), task)
}

/// The SigV4 `Authorization` botocore computes for `req` (same date, same credentials).
async fn botocore_authorization(
    base: &str,
    req: &Captured,
    creds: &aws_credential_types::Credentials,
    region: &str,
) -> String {
    let auth = req.headers["authorization"].to_str().unwrap();
    let signed: Vec<&str> = auth
        .split("SignedHeaders=")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .split(';')
        .collect();
    // botocore adds host, X-Amz-Date and X-Amz-Security-Token itself, and is given the
    // unsigned traceparent too (it must leave it out on its own).
    let headers: serde_json::Map<String, Value> = req
        .headers
        .iter()
        .filter(|(k, _)| signed.contains(&k.as_str()) || k.as_str() == "traceparent")
        .filter(|(k, _)| !["host", "x-amz-date", "x-amz-security-token"].contains(&k.as_str()))
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().into()))
        .collect();
    use base64::Engine;
    let input = json!({
        "method": req.method.as_str(),
        "url": format!("{}{}", base.trim_end_matches('/'), req.uri),
        "headers": headers,
        "body": base64::engine::general_purpose::STANDARD.encode(&req.body),
        "access_key": creds.access_key_id(),
        "secret_key": creds.secret_access_key(),
        "token": creds.session_token(),
        "region": region,
        "amz_date": req.headers["x-amz-date"].to_str().unwrap(),
    });
    const SCRIPT: &str = r#"
import base64, datetime, json, sys
from unittest import mock
import botocore.auth
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
i = json.load(sys.stdin)
when = datetime.datetime.strptime(i["amz_date"], "%Y%m%dT%H%M%SZ")
req = AWSRequest(method=i["method"], url=i["url"], headers=i["headers"],
                 data=base64.b64decode(i["body"]))
with mock.patch.object(botocore.auth, "get_current_datetime", return_value=when):
    SigV4Auth(Credentials(i["access_key"], i["secret_key"], i["token"]), "lambda",
              i["region"]).add_auth(req)
print(json.dumps({"authorization": req.headers["Authorization"],
                  "date": req.headers["X-Amz-Date"],
                  "token": req.headers.get("X-Amz-Security-Token")}))
"#;
    let python = root().join(".venv/moto/bin/python");
    assert!(python.exists(), "{} is missing", python.display());
    let mut child = tokio::process::Command::new(python)
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python runs");
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("botocore answered within 30 s")
        .unwrap();
    assert!(
        out.status.success(),
        "botocore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["date"], input["amz_date"]);
    assert_eq!(v["token"].as_str(), creds.session_token());
    v["authorization"].as_str().unwrap().to_owned()
}

async fn function_url_client(creds: aws_credential_types::Credentials, region: &str) -> Client {
    let config = aws_config::SdkConfig::builder()
        .region(aws_config::Region::new(region.to_owned()))
        .credentials_provider(aws_credential_types::provider::SharedCredentialsProvider::new(creds))
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build();
    Client::new(signer("k1", SECRET_A), options()).with_aws(&config)
}

#[tokio::test]
async fn function_url_sigv4_matches_botocore() {
    let cases = [
        (
            "plain credentials, ASCII envelope",
            aws_credential_types::Credentials::new("AKIDEXAMPLE", "secret/key+1", None, None, "t"),
            "invoke_tool",
            json!({"text": "hello"}),
            None,
        ),
        (
            "session token, encoded query, non-ASCII envelope, traceparent",
            aws_credential_types::Credentials::new(
                "ASIAEXAMPLE",
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                Some("IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJH+token=".into()),
                None,
                "t",
            ),
            "invoke tool/é~x",
            json!({"text": "héllo wörld ✓ 日本語", "quote": "\" \\ \n"}),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ),
    ];
    let state = CaptureState::default();
    let (base, _server) = capture_server(state.clone()).await;
    let region = "eu-central-1";
    for (case, creds, action, data, traceparent) in cases {
        let client = function_url_client(creds.clone(), region).await;
        let target = Target::FunctionUrl {
            url: base.clone(),
            region: region.into(),
            function: "sri-test".into(),
        };
        let sid = session_id("sigv4");
        let body = envelope(&sid, data);
        let stream = client
            .invoke_target(&target, action, body.clone(), traceparent)
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let events = drain(stream).await;
        let kinds: Vec<_> = events.iter().map(|e| e.as_ref().unwrap().kind).collect();
        assert_eq!(kinds, [EventKind::Start, EventKind::End], "{case}");

        let req = state.seen.lock().unwrap().pop().expect("captured");
        assert_eq!(req.body, body, "{case}: the envelope is sent byte for byte");
        assert_eq!(req.uri.path(), "/invoke");
        // The SRI v1 signature is intact under SigV4.
        assert_eq!(action_of(req.uri.query().unwrap()), action, "{case}");
        let expected = signing::Expected {
            function: "sri-test",
            action,
            body: &req.body,
            accept_v1: false,
        };
        signer("k1", SECRET_A)
            .verify(&req.headers, &expected, now(), 300)
            .unwrap_or_else(|e| panic!("{case}: {e}"));

        let auth = req.headers["authorization"].to_str().unwrap();
        let mut expected_signed = vec![
            "accept",
            "content-type",
            "host",
            "x-amz-date",
            "x-dify-plugin-key-id",
            "x-dify-plugin-session",
            "x-dify-plugin-nonce",
            "x-dify-plugin-signature",
            "x-dify-plugin-timestamp",
        ];
        if let Some(tp) = traceparent {
            assert_eq!(
                req.headers["traceparent"], tp,
                "{case}: propagated, unsigned"
            );
        }
        if creds.session_token().is_some() {
            expected_signed.push("x-amz-security-token");
            assert_eq!(
                req.headers["x-amz-security-token"],
                creds.session_token().unwrap()
            );
        }
        expected_signed.sort();
        assert!(
            auth.contains(&format!("SignedHeaders={},", expected_signed.join(";"))),
            "{case}: {auth}"
        );
        assert!(
            auth.contains(&format!("/{region}/lambda/aws4_request")),
            "{case}: {auth}"
        );
        // Everything on the wire that is not signed belongs to the HTTP client.
        for name in req.headers.keys() {
            assert!(
                expected_signed.contains(&name.as_str())
                    || ["authorization", "content-length", "traceparent"].contains(&name.as_str()),
                "{case}: `{name}` is sent but not signed"
            );
        }
        let want = botocore_authorization(&base, &req, &creds, region).await;
        assert_eq!(auth, want, "{case}: botocore computes another signature");
    }
}

#[tokio::test]
async fn function_url_refusals_say_what_to_fix_and_retries_are_signed_anew() {
    let state = CaptureState::default();
    state.answers.lock().unwrap().extend([
        // Lambda's front end refusing the caller.
        (
            403,
            vec![
                ("x-amzn-errortype", "AccessDeniedException"),
                ("content-type", "application/json"),
            ],
            r#"{"Message":"Forbidden. For troubleshooting Function URL authorization issues, see: https://docs.aws.amazon.com/lambda/latest/dg/urls-auth.html"}"#,
        ),
        // Throttled, then accepted: the retry happens before the first byte.
        (
            429,
            vec![("x-amzn-errortype", "TooManyRequestsException")],
            r#"{"Message":"Rate Exceeded."}"#,
        ),
    ]);
    let (base, _server) = capture_server(state.clone()).await;
    let creds = aws_credential_types::Credentials::new("AKIDEXAMPLE", "secret", None, None, "t");
    let client = function_url_client(creds.clone(), "us-west-2").await;
    let target = Target::FunctionUrl {
        url: base.clone(),
        region: "us-west-2".into(),
        function: "sri-test".into(),
    };
    let sid = session_id("deny");
    let err = match client
        .invoke_target(&target, "invoke_tool", envelope(&sid, json!({})), None)
        .await
    {
        Err(e) => e,
        Ok(_) => panic!("a 403 must be refused"),
    };
    let InvokeError::Rejected {
        status,
        error_type,
        message,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(
        (*status, error_type.as_str()),
        (403, "AccessDeniedException")
    );
    assert!(
        message.contains("lambda:InvokeFunctionUrl and lambda:InvokeFunction")
            && message.contains("clock")
            && message.contains("Forbidden"),
        "{message}"
    );
    assert!(!err.to_string().contains("secret"), "{err}");
    assert_eq!(state.seen.lock().unwrap().len(), 1, "a 403 is not retried");

    let stream = client
        .invoke_target(&target, "invoke_tool", envelope(&sid, json!({})), None)
        .await
        .expect("the retry after 429 succeeds");
    assert_eq!(drain(stream).await.len(), 2);
    let seen = state.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "403, then 429 + retry");
    for req in &seen[1..] {
        let auth = req.headers["authorization"].to_str().unwrap();
        assert_eq!(
            auth,
            botocore_authorization(&base, req, &creds, "us-west-2").await,
            "every attempt carries its own valid signature"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// InvokeWithResponseStream

const FUNCTION: &str = "sri-plugin-fn";
const QUALIFIER: &str = "live";

fn stream_target() -> Target {
    Target::InvokeStream {
        function: FUNCTION.into(),
        qualifier: QUALIFIER.into(),
    }
}

async fn stream_client(fake: &FakeLambda) -> Client {
    Client::new(signer("k1", SECRET_A), options()).with_aws(&sdk_config(&fake.url()).await)
}

/// Checks a received payload the way the bootstrap reads its events (`bootstrap/src/lambda.rs`:
/// `parse_event` + `route`) and verifies its SRI v1 signature; returns (action, body).
fn accept_like_the_bootstrap(payload: &[u8], ring: &KeyRing) -> (String, Bytes) {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct UrlEvent {
        raw_path: Option<String>,
        raw_query_string: Option<String>,
        #[serde(default)]
        headers: std::collections::HashMap<String, String>,
        body: Option<String>,
        #[serde(default)]
        is_base64_encoded: bool,
        request_context: Option<Value>,
    }
    let ev: UrlEvent = serde_json::from_slice(payload).expect("a Function URL event");
    let method = ev
        .request_context
        .as_ref()
        .and_then(|c| c["http"]["method"].as_str())
        .unwrap_or("POST");
    assert!(method.eq_ignore_ascii_case("POST"));
    let path = ev.raw_path.unwrap_or_else(|| "/invoke".into());
    assert!(path.trim_end_matches('/').ends_with("/invoke"), "{path}");
    let mut headers = HeaderMap::new();
    for (k, v) in &ev.headers {
        headers.insert(
            http::HeaderName::try_from(k.as_str()).unwrap(),
            http::HeaderValue::try_from(v.as_str()).unwrap(),
        );
    }
    let body = match (ev.body, ev.is_base64_encoded) {
        (None, _) => Bytes::new(),
        (Some(b), false) => Bytes::from(b),
        (Some(b), true) => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .unwrap()
                .into()
        }
    };
    let action = action_of(&ev.raw_query_string.unwrap_or_default());
    assert_eq!(headers["accept"], "text/event-stream");
    assert_eq!(headers["content-type"], "application/json");
    let expected = signing::Expected {
        function: FUNCTION,
        action: &action,
        body: &body,
        accept_v1: false,
    };
    let verified = ring
        .verify(&headers, &expected, now(), 300)
        .expect("a valid SRI v2 signature for the target function");
    let sid = serde_json::from_slice::<Value>(&body).unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    signing::check_session(&verified, &sid).expect("signed for the envelope's session");
    (action, body)
}

#[tokio::test]
async fn invoke_stream_delivers_chunks_as_they_come() {
    let sid = session_id("iwrs");
    let chunk = sse(
        "chunk",
        Some(1),
        &json!({"session_id": sid, "event": "session", "data": {"type": "stream", "n": 1}}),
    );
    let (go1, wait1) = oneshot::channel();
    let (go2, wait2) = oneshot::channel();
    let fake = FakeLambda::start(vec![Script::Stream(vec![
        // The prelude and its separator as separate chunks, as the bootstrap writes them.
        Step::chunk(prelude(200)[..prelude(200).len() - 8].to_vec()),
        Step::chunk(vec![0u8; 8]),
        Step::chunk(start_event(&sid)),
        Step::WaitFor(wait1),
        Step::chunk(chunk),
        Step::WaitFor(wait2),
        Step::chunk(end_event(&sid, 2)),
        Step::complete(),
    ])])
    .await;
    let client = stream_client(&fake).await;
    let body = envelope(&sid, json!({"text": "héllo ✓", "q": "\"\\"}));
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut stream = client
        .invoke_target(&stream_target(), "invoke_tool", body.clone(), Some(tp))
        .await
        .expect("stream starts");

    // `start` arrives while the fake is still holding the next chunk back.
    let first = next(&mut stream).await.unwrap().unwrap();
    assert_eq!(first.kind, EventKind::Start);
    go1.send(()).unwrap();
    let second = next(&mut stream).await.unwrap().unwrap();
    assert_eq!(second.kind, EventKind::Chunk);
    assert_eq!(second.json().unwrap()["data"]["n"], 1);
    go2.send(()).unwrap();
    let third = next(&mut stream).await.unwrap().unwrap();
    assert_eq!(third.kind, EventKind::End);
    assert!(next(&mut stream).await.is_none(), "nothing after `end`");

    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].function, FUNCTION);
    assert_eq!(reqs[0].query.as_deref(), Some("Qualifier=live"));
    assert!(
        reqs[0].headers["authorization"]
            .to_str()
            .unwrap()
            .contains("/us-east-1/lambda/aws4_request"),
        "the SDK call is SigV4-signed"
    );
    let (action, sent) = accept_like_the_bootstrap(&reqs[0].payload, &signer("k1", SECRET_A));
    assert_eq!(action, "invoke_tool");
    assert_eq!(sent, body, "the envelope travels byte for byte");
    let event: Value = serde_json::from_slice(&reqs[0].payload).unwrap();
    assert_eq!(event["headers"]["traceparent"], tp);
}

#[tokio::test]
async fn invoke_stream_strips_the_prelude_however_it_is_split() {
    let sid = session_id("split");
    let sri = format!("{}{}", start_event(&sid), end_event(&sid, 1)).into_bytes();
    let mut with_prelude = prelude(200);
    with_prelude.extend_from_slice(&sri);
    let p = prelude(200).len();
    // (what, payload, cut points)
    let cases: Vec<(&str, Vec<u8>, Vec<usize>)> = vec![
        ("one chunk", with_prelude.clone(), vec![]),
        ("split inside the JSON", with_prelude.clone(), vec![5, 20]),
        ("split inside the NULs", with_prelude.clone(), vec![p - 5]),
        (
            "byte by byte",
            with_prelude.clone(),
            (1..with_prelude.len()).collect(),
        ),
        (
            "prelude and SSE together, NULs apart",
            with_prelude.clone(),
            vec![p - 8, p],
        ),
        ("no prelude", sri.clone(), vec![3]),
    ];
    let mut scripts = Vec::new();
    for (_, payload, cuts) in &cases {
        let mut steps = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain([payload.len()].iter()) {
            steps.push(Step::chunk(payload[from..cut].to_vec()));
            from = cut;
        }
        steps.push(Step::complete());
        scripts.push(Script::Stream(steps));
    }
    let fake = FakeLambda::start(scripts).await;
    let client = stream_client(&fake).await;
    for (case, _, _) in &cases {
        let stream = client
            .invoke_target(
                &stream_target(),
                "invoke_tool",
                envelope(&sid, json!({})),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let events: Vec<Event> = drain(stream)
            .await
            .into_iter()
            .map(|e| e.unwrap_or_else(|e| panic!("{case}: {e}")))
            .collect();
        let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::Start, EventKind::End], "{case}");
    }
}

#[tokio::test]
async fn invoke_complete_errors_are_reported_with_code_and_details() {
    let sid = session_id("fail");
    let fake = FakeLambda::start(vec![
        // Mid-stream: the function started, then Lambda reports its failure.
        Script::Stream(vec![
            Step::chunk(prelude(200)),
            Step::chunk(start_event(&sid)),
            Step::failed("Runtime.ExitError", "RequestId: 1 Error: Runtime exited with error: signal: killed"),
        ]),
        // Before any byte: a refusal (the function failed before streaming).
        Script::Stream(vec![Step::failed("Sandbox.Timedout", "Task timed out after 3.00 seconds")]),
        // The function's own refusal, in the prelude.
        Script::Stream(vec![
            Step::chunk(prelude(401)),
            Step::chunk(r#"{"errorType":"Sri.Unauthorized","errorMessage":"bad signature: no key matches"}"#),
            Step::complete(),
        ]),
        // A clean completion without `end` is still a failure.
        Script::Stream(vec![
            Step::chunk(prelude(200)),
            Step::chunk(start_event(&sid)),
            Step::complete(),
        ]),
    ])
    .await;
    let client = stream_client(&fake).await;
    let target = stream_target();
    let call = || client.invoke_target(&target, "invoke_tool", envelope(&sid, json!({})), None);

    let items = drain(call().await.expect("started")).await;
    assert_eq!(items[0].as_ref().unwrap().kind, EventKind::Start);
    let Err(InvokeError::Broken(why)) = &items[1] else {
        panic!("{items:?}")
    };
    assert!(
        why.contains("Runtime.ExitError") && why.contains("signal: killed"),
        "{why}"
    );
    assert_eq!(items.len(), 2);

    let Err(InvokeError::Rejected {
        status,
        error_type,
        message,
    }) = call().await
    else {
        panic!("an error before any byte is a refusal")
    };
    assert_eq!((status, error_type.as_str()), (500, "Sandbox.Timedout"));
    assert!(
        message.contains("Task timed out") && message.contains("CloudWatch"),
        "{message}"
    );

    let Err(InvokeError::Rejected {
        status,
        error_type,
        message,
    }) = call().await
    else {
        panic!("a 401 prelude is a refusal")
    };
    assert_eq!((status, error_type.as_str()), (401, "Sri.Unauthorized"));
    assert_eq!(message, "bad signature: no key matches");

    let items = drain(call().await.expect("started")).await;
    assert_eq!(items[0].as_ref().unwrap().kind, EventKind::Start);
    let Err(InvokeError::Broken(why)) = &items[1] else {
        panic!("{items:?}")
    };
    assert!(why.contains("without an `end`"), "{why}");
    assert_eq!(fake.requests().len(), 4, "none of these is retried");
}

#[tokio::test]
async fn invoke_stream_api_errors_say_what_to_fix_and_throttling_is_retried() {
    let sid = session_id("api");
    let fake = FakeLambda::start(vec![
        Script::Error {
            status: 403,
            error_type: "AccessDeniedException".into(),
            message:
                "User: arn:aws:iam::1:user/c is not authorized to perform: lambda:InvokeFunction"
                    .into(),
        },
        Script::Error {
            status: 404,
            error_type: "ResourceNotFoundException".into(),
            message: "Function not found: arn:aws:lambda:us-east-1:1:function:sri-plugin-fn:live"
                .into(),
        },
        Script::Error {
            status: 429,
            error_type: "TooManyRequestsException".into(),
            message: "Rate Exceeded.".into(),
        },
        Script::Stream(vec![
            Step::chunk(start_event(&sid)),
            Step::chunk(end_event(&sid, 1)),
            Step::complete(),
        ]),
    ])
    .await;
    let client = stream_client(&fake).await;
    let target = stream_target();
    let call = || client.invoke_target(&target, "invoke_tool", envelope(&sid, json!({})), None);
    let Err(InvokeError::Rejected {
        status,
        error_type,
        message,
    }) = call().await
    else {
        panic!("403 is a refusal")
    };
    assert_eq!(
        (status, error_type.as_str()),
        (403, "AccessDeniedException")
    );
    assert!(
        message.contains("not authorized")
            && message.contains("lambda:InvokeFunction on sri-plugin-fn:live"),
        "{message}"
    );
    let Err(InvokeError::Rejected {
        status, message, ..
    }) = call().await
    else {
        panic!("404 is a refusal")
    };
    assert_eq!(status, 404);
    assert!(message.contains("redeploy"), "{message}");
    assert_eq!(fake.requests().len(), 2, "refusals are not retried");

    let stream = call().await.expect("throttling is retried");
    let events = drain(stream).await;
    assert!(events.iter().all(Result::is_ok), "{events:?}");
    assert_eq!(fake.requests().len(), 4, "429, then a successful retry");
    // Each attempt is signed anew (SRI v1) and still verifies.
    for req in &fake.requests()[2..] {
        accept_like_the_bootstrap(&req.payload, &signer("k1", SECRET_A));
    }
}

#[tokio::test]
async fn invoke_stream_without_aws_configuration_says_so() {
    let client = Client::new(signer("k1", SECRET_A), options());
    let Err(InvokeError::Unreachable(why)) = client
        .invoke_target(
            &stream_target(),
            "invoke_tool",
            envelope(&session_id("x"), json!({})),
            None,
        )
        .await
    else {
        panic!("no AWS configuration")
    };
    assert!(why.contains("with_aws"), "{why}");
}

#[tokio::test]
async fn a_silent_invoke_stream_times_out() {
    let sid = session_id("idle");
    // The fake holds the stream open after `start` until the test ends.
    let (_hold, wait) = oneshot::channel::<()>();
    let fake = FakeLambda::start(vec![Script::Stream(vec![
        Step::chunk(prelude(200)),
        Step::chunk(start_event(&sid)),
        Step::chunk(": keepalive\n\n"),
        Step::WaitFor(wait),
        Step::complete(),
    ])])
    .await;
    let client = Client::new(
        signer("k1", SECRET_A),
        ClientOptions {
            idle_timeout: Duration::from_millis(300),
            ..options()
        },
    )
    .with_aws(&sdk_config(&fake.url()).await);
    let items = drain(
        client
            .invoke_target(
                &stream_target(),
                "invoke_tool",
                envelope(&sid, json!({})),
                None,
            )
            .await
            .expect("started"),
    )
    .await;
    assert_eq!(items[0].as_ref().unwrap().kind, EventKind::Start);
    let Err(InvokeError::Broken(why)) = &items[1] else {
        panic!("{items:?}")
    };
    assert!(why.contains("no event or keepalive"), "{why}");
}

/// End to end: client → SDK → the fake relaying to `cargo lambda watch` → the real bootstrap and
/// the sample plugin. The bootstrap accepts the Function URL event, verifies the signature, and
/// its prelude + SSE come back through event-stream frames, incrementally.
#[tokio::test]
async fn invoke_stream_reaches_a_real_bootstrap() {
    // Lambda tells a function its name; SRI v2 signatures bind it.
    let lambda = harness::emulator::Lambda::start(
        Options::new("sample")
            .env("AWS_LAMBDA_FUNCTION_NAME", FUNCTION)
            .env("SRI_ACCEPT_V1", "false"),
    );
    let fake = FakeLambda::start(vec![
        Script::Relay {
            invoke_url: lambda.invoke_url(),
        },
        Script::Relay {
            invoke_url: lambda.invoke_url(),
        },
    ])
    .await;
    let client = stream_client(&fake).await;
    let delay_ms = 300;
    let data = tool_data(
        "sample",
        "stream",
        json!({"n": 3, "delay_ms": delay_ms}),
        None,
    );
    let stream = client
        .invoke_target(
            &stream_target(),
            "invoke_tool",
            envelope(&session_id("e2e"), data),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}; bootstrap logs:\n{}", lambda.logs().join("\n")));
    let started = std::time::Instant::now();
    let mut events = Vec::new();
    let mut stream = stream;
    while let Some(item) = next(&mut stream).await {
        events.push((started.elapsed(), item.expect("a complete stream")));
    }
    assert_well_formed(&events);
    assert_eq!(texts(&events), ["chunk 0", "chunk 1", "chunk 2"]);
    let chunk_times: Vec<Duration> = events
        .iter()
        .filter(|(_, e)| e.kind == EventKind::Chunk)
        .map(|(t, _)| *t)
        .collect();
    for w in chunk_times.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(delay_ms * 2 / 3),
            "chunks arrived together: {chunk_times:?}"
        );
    }

    // A signature from another key ring is refused by the bootstrap, through the prelude.
    let forged =
        Client::new(signer("k1", [0x44; 32]), options()).with_aws(&sdk_config(&fake.url()).await);
    let Err(InvokeError::Rejected {
        status,
        error_type,
        message,
    }) = forged
        .invoke_target(
            &stream_target(),
            "invoke_tool",
            envelope(&session_id("e2e"), json!({})),
            None,
        )
        .await
    else {
        panic!("a forged signature must be refused")
    };
    assert_eq!(
        (status, error_type.as_str()),
        (401, "Sri.Unauthorized"),
        "{message}"
    );
    assert!(message.contains("bad signature"), "{message}");
}
