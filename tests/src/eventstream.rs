//! A local fake of Lambda's `InvokeWithResponseStream`
//! (`POST /2021-11-15/functions/{name}/response-streaming-invocations?Qualifier=…`), because
//! neither `cargo lambda watch` (cargo-lambda #898) nor moto serves it.
//!
//! It answers the way Lambda does: HTTP 200 `application/vnd.amazon.eventstream` whose body is
//! real event-stream frames (prelude, headers, CRCs) written by `aws-smithy-eventstream` —
//! `PayloadChunk` events carrying the function's bytes, then `InvokeComplete` — or an AWS error
//! answer (`x-amzn-ErrorType`, `{"Message"}`). Each request plays the next [`Script`]; a step
//! can wait for the test's go-ahead, so tests synchronise on channels, never on sleeps. A script
//! can also relay the payload to a real function (the emulator's direct `Invoke` route, which
//! streams) and frame its answer as Lambda would. Every request is recorded for the test to
//! inspect.

use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// One step of a scripted answer.
pub enum Step {
    /// A `PayloadChunk` event with these bytes.
    Chunk(Bytes),
    /// Wait until the test sends (or drops) the other end before the next step.
    WaitFor(oneshot::Receiver<()>),
    /// Pause (for tests that want real gaps; synchronise with [`Step::WaitFor`] instead).
    Delay(Duration),
    /// The `InvokeComplete` event (the body ends after it).
    Complete {
        /// `ErrorCode` (absent on success).
        error_code: Option<String>,
        /// `ErrorDetails`.
        error_details: Option<String>,
        /// `LogResult` (base64 log tail).
        log_result: Option<String>,
    },
}

impl Step {
    /// A `PayloadChunk` of `bytes`.
    pub fn chunk(bytes: impl Into<Bytes>) -> Self {
        Self::Chunk(bytes.into())
    }

    /// A successful `InvokeComplete`.
    pub fn complete() -> Self {
        Self::Complete {
            error_code: None,
            error_details: None,
            log_result: None,
        }
    }

    /// An `InvokeComplete` reporting a function error.
    pub fn failed(code: &str, details: &str) -> Self {
        Self::Complete {
            error_code: Some(code.into()),
            error_details: Some(details.into()),
            log_result: Some("U1RBUlQgUmVxdWVzdElkOiAx".into()),
        }
    }
}

/// What one request is answered with.
pub enum Script {
    /// 200 and an event stream played step by step.
    Stream(Vec<Step>),
    /// 200 and an event stream relaying, chunk by chunk, what `POST invoke_url` with the
    /// payload answers (`cargo lambda watch`'s `/2015-03-31/functions/{name}/invocations`);
    /// `InvokeComplete` when it ends, with `ErrorCode` `Unhandled` if it breaks off.
    Relay {
        /// The direct-invoke URL of the function.
        invoke_url: String,
    },
    /// An AWS error answer before any stream.
    Error {
        /// HTTP status.
        status: u16,
        /// `x-amzn-ErrorType` (e.g. `AccessDeniedException`).
        error_type: String,
        /// `{"Message": …}`.
        message: String,
    },
}

/// A request the fake received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// `{name}` of the path.
    pub function: String,
    /// The raw query (`Qualifier=…`).
    pub query: Option<String>,
    /// Headers.
    pub headers: HeaderMap,
    /// The invocation payload.
    pub payload: Bytes,
}

#[derive(Default)]
struct FakeState {
    scripts: Mutex<VecDeque<Script>>,
    requests: Mutex<Vec<Recorded>>,
}

/// A running fake, on a free loopback port.
pub struct FakeLambda {
    /// Its address.
    pub addr: SocketAddr,
    state: Arc<FakeState>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeLambda {
    /// Starts a fake answering successive requests with `scripts` (500 once they run out).
    pub async fn start(scripts: Vec<Script>) -> Self {
        let state = Arc::new(FakeState {
            scripts: Mutex::new(scripts.into()),
            requests: Mutex::default(),
        });
        let app = Router::new()
            .route(
                "/2021-11-15/functions/{name}/response-streaming-invocations",
                post(invoke),
            )
            .with_state(state.clone());
        let (addr, task) = crate::serve_loopback(app).await;
        Self { addr, state, task }
    }

    /// The endpoint URL to give the SDK.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeLambda {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An `SdkConfig` pointing at `endpoint` with static test credentials in `us-east-1`.
pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_credential_types::Credentials::new(
            "AKIDTESTFAKE",
            "test-secret-key",
            None,
            None,
            "fake-lambda",
        ))
        .load()
        .await
}

async fn invoke(
    State(state): State<Arc<FakeState>>,
    Path(function): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    payload: Bytes,
) -> Response {
    state.requests.lock().unwrap().push(Recorded {
        function,
        query,
        headers,
        payload: payload.clone(),
    });
    let script = state.scripts.lock().unwrap().pop_front();
    let steps = match script {
        Some(Script::Relay { invoke_url }) => return relay(invoke_url, payload).await,
        None => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the fake has no script left",
            )
                .into_response();
        }
        Some(Script::Error {
            status,
            error_type,
            message,
        }) => {
            return Response::builder()
                .status(status)
                .header("x-amzn-errortype", error_type)
                .header("content-type", "application/json")
                .body(Body::from(json!({ "Message": message }).to_string()))
                .expect("response");
        }
        Some(Script::Stream(steps)) => steps,
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::convert::Infallible>>(4);
    tokio::spawn(async move {
        for step in steps {
            let frame = match step {
                Step::WaitFor(go) => {
                    let _ = go.await;
                    continue;
                }
                Step::Delay(d) => {
                    tokio::time::sleep(d).await;
                    continue;
                }
                Step::Chunk(bytes) => event("PayloadChunk", "application/octet-stream", bytes),
                Step::Complete {
                    error_code,
                    error_details,
                    log_result,
                } => {
                    let mut body = serde_json::Map::new();
                    for (k, v) in [
                        ("ErrorCode", error_code),
                        ("ErrorDetails", error_details),
                        ("LogResult", log_result),
                    ] {
                        if let Some(v) = v {
                            body.insert(k.into(), v.into());
                        }
                    }
                    event(
                        "InvokeComplete",
                        "application/json",
                        serde_json::to_vec(&body).expect("JSON").into(),
                    )
                }
            };
            if tx.send(Ok(frame)).await.is_err() {
                return; // the client went away
            }
        }
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/vnd.amazon.eventstream")
        .header("x-amz-executed-version", "7")
        .body(Body::from_stream(tokio_stream_from(rx)))
        .expect("response")
}

async fn relay(invoke_url: String, payload: Bytes) -> Response {
    let upstream = match reqwest::Client::new()
        .post(&invoke_url)
        .body(payload)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_GATEWAY,
                format!("relay to {invoke_url}: {e}"),
            )
                .into_response();
        }
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::convert::Infallible>>(4);
    tokio::spawn(async move {
        use futures_util::StreamExt;
        let mut body = upstream.bytes_stream();
        let complete = loop {
            match body.next().await {
                Some(Ok(chunk)) => {
                    let frame = event("PayloadChunk", "application/octet-stream", chunk);
                    if tx.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    break json!({"ErrorCode": "Unhandled", "ErrorDetails": e.to_string()});
                }
                None => break json!({}),
            }
        };
        let frame = event(
            "InvokeComplete",
            "application/json",
            serde_json::to_vec(&complete).expect("JSON").into(),
        );
        let _ = tx.send(Ok(frame)).await;
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/vnd.amazon.eventstream")
        .body(Body::from_stream(tokio_stream_from(rx)))
        .expect("response")
}

/// One event-stream frame: `:message-type=event`, `:event-type`, `:content-type`, CRCs.
fn event(event_type: &'static str, content_type: &'static str, payload: Bytes) -> Bytes {
    let message = Message::new(payload)
        .add_header(Header::new(
            ":message-type",
            HeaderValue::String("event".into()),
        ))
        .add_header(Header::new(
            ":event-type",
            HeaderValue::String(event_type.into()),
        ))
        .add_header(Header::new(
            ":content-type",
            HeaderValue::String(content_type.into()),
        ));
    let mut out = Vec::new();
    aws_smithy_eventstream::frame::write_message_to(&message, &mut out).expect("frame");
    out.into()
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
