//! `sri serve`: Dify's serverless-connector control plane, the gateway, health and metrics.
//!
//! Control plane exactly as the daemon calls it (`dify-wire.md`): `POST /ping` → `"pong"`,
//! `GET /v1/runner/instances`, `POST /v1/launch` (a stream of stage lines closed right after
//! `end`). Every control call carries the raw API key in `Authorization`.

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use bytes::Bytes;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::backend::{Backend, Function};
use crate::client::Client;
use crate::intake::Intake;
use crate::launch::{Launcher, StageLine};
use crate::metrics::{Metrics, ResultLabel};
use crate::package;
use crate::{Error, gateway};

/// The variable holding the control-plane API key.
pub const API_KEY_ENV: &str = "DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY";

/// The shortest API key `sri serve` starts with: `/v1/launch` runs code on this host.
pub const MIN_API_KEY_BYTES: usize = 16;

/// Refuses an API key too short to guard the control plane.
pub fn check_api_key(key: Option<&str>) -> Result<&str, Error> {
    match key {
        Some(k) if k.len() >= MIN_API_KEY_BYTES => Ok(k),
        given => Err(Error::Config(format!(
            "{API_KEY_ENV} is {}: it guards /v1/launch, which runs code on this host, so it must \
             have at least {MIN_API_KEY_BYTES} bytes; make one with `openssl rand -hex 32` and \
             set the same value on the Dify plugin daemon",
            match given {
                None => "not set".to_owned(),
                Some("") => "empty".to_owned(),
                Some(k) => format!("{} bytes long", k.len()),
            }
        ))),
    }
}

/// Deadlines and caps of `sri serve`'s listener (every value far above what the daemon needs).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request head (and a new connection's first bytes) must arrive within this.
    pub header_read_timeout: std::time::Duration,
    /// An invoke body must arrive whole within this.
    pub body_read_timeout: std::time::Duration,
    /// A launch upload (the .difypkg) must arrive whole within this.
    pub upload_timeout: std::time::Duration,
    /// Connections open at once (every open daemon stream is one).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: std::time::Duration::from_secs(30),
            body_read_timeout: std::time::Duration::from_secs(60),
            upload_timeout: std::time::Duration::from_secs(240),
            max_connections: 25_000,
        }
    }
}

/// Shared state of the server.
pub struct AppState {
    /// Where functions run.
    pub backend: Arc<dyn Backend>,
    /// Deployments.
    pub launcher: Arc<Launcher>,
    /// Signs and calls functions.
    pub client: Client,
    /// Metrics.
    pub metrics: Metrics,
    /// The control plane's key.
    pub api_key: String,
    /// The package intake (limits, unpack directory, concurrency).
    pub intake: Arc<Intake>,
    /// Refuse packages whose signature the daemon did not verify (`SRI_REQUIRE_VERIFIED`).
    pub require_verified: bool,
    /// Largest invoke body.
    pub max_request_bytes: usize,
    /// How long an invocation waits for a function that is (re)starting.
    pub start_wait: std::time::Duration,
    /// Deadlines and caps.
    pub limits: Limits,
    /// Serve the token-less endpoints of functions launched before capability endpoints.
    pub legacy_endpoints: bool,
    /// Sessions in flight through the gateway, which the relay accepts backwards calls for.
    pub relay_sessions: Arc<crate::relay::sessions::Sessions>,
}

/// The router: control plane (authenticated), gateway, health, metrics.
pub fn router(state: Arc<AppState>) -> Router {
    let control = Router::new()
        .route("/ping", post(ping))
        .route("/v1/runner/instances", get(instances))
        .route(
            "/v1/launch",
            post(launch).layer(DefaultBodyLimit::max(
                state.intake.limits().max_package_bytes + 1024 * 1024,
            )),
        )
        .route("/v1/functions/{name}", delete(remove))
        .route("/v1/gc", post(gc))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .merge(control)
        .route("/v1/functions/{name}/{token}/invoke", post(gateway::invoke))
        .route("/v1/functions/{name}/invoke", post(gateway::invoke_legacy))
        .route(
            "/healthz",
            get(|State(s): State<Arc<AppState>>| async move {
                let mut body = serde_json::json!({"status": "ok"});
                if let Some(report) = s.backend.sandbox() {
                    body["sandbox"] = serde_json::json!(report);
                }
                ([("content-type", "application/json")], body.to_string())
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<Arc<AppState>>| async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    s.metrics.render(),
                )
            }),
        )
        .with_state(state)
}

/// Binds the listen address (before the public URL is known when the port is 0).
pub async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::Backend(format!("cannot listen on {listen} (SRI_LISTEN): {e}")))
}

/// How long open streams may run on after a shutdown signal before they are cut.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves until `shutdown` completes, lets open streams finish (up to [`DRAIN`]), then stops the
/// backend's functions.
///
/// HTTP/1.1 only (the daemon speaks nothing else), on hyper's connection builder rather than
/// `axum::serve`: that one runs every connection through the HTTP/1-or-2 detector, which with
/// axum's per-connection wrapping cost ~9 KiB more per open stream (measured: 20.7 vs 11.5 KiB
/// per idle streaming connection), and idle streams are what a gateway mostly holds.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    use hyper_util::rt::TokioTimer;
    let local = listener
        .local_addr()
        .map_err(|e| Error::Backend(e.to_string()))?;
    tracing::info!(listen = %local, "sri listening");
    let backend = state.backend.clone();
    let limits = state.limits;
    let app = router(state);
    let mut http = hyper::server::conn::http1::Builder::new();
    // The timer lets hyper drop connections that never finish sending their request head.
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let accept = crate::accept::Limits {
        max_connections: limits.max_connections,
        first_bytes_timeout: limits.header_read_timeout,
    };
    crate::accept::serve_until(listener, shutdown, DRAIN, accept, |io| {
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        http.serve_connection(io, service)
    })
    .await;
    backend.shutdown().await;
    Ok(())
}

async fn authorize(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    let ok = given.is_some_and(|g| {
        let g = g.strip_prefix("Bearer ").unwrap_or(g);
        constant_time_eq(g.as_bytes(), state.api_key.as_bytes())
    });
    if ok {
        return next.run(req).await;
    }
    let why = if given.is_none() { "missing" } else { "wrong" };
    let message = format!(
        "{why} API key: the Authorization header must carry the connector's key; set \
         {API_KEY_ENV} to the same value on the Dify plugin daemon and on the connector"
    );
    (
        StatusCode::UNAUTHORIZED,
        [("content-type", "application/json")],
        serde_json::to_string(
            &json!({"error": message, "errorType": "Unauthorized", "errorMessage": message}),
        )
        .expect("JSON"),
    )
        .into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn ping() -> impl IntoResponse {
    ([("content-type", "application/json")], "\"pong\"")
}

fn item(launcher: &Launcher, f: &Function) -> Value {
    json!({"ID": f.name, "Name": f.name, "Endpoint": launcher.endpoint(&f.name), "ResourceName": f.name,
           "Identifier": f.identifier, "Status": {"State": "running"}})
}

async fn instances(
    State(s): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let items: Vec<Value> = match q.get("filename") {
        Some(filename) => match package::checksum_of_filename(filename) {
            Some(checksum) => s
                .backend
                .find(checksum)
                .iter()
                .map(|f| item(&s.launcher, f))
                .collect(),
            None => {
                let msg =
                    format!("filename `{filename}` is not `author@name@version@checksum.difypkg`");
                return axum::Json(json!({"error": msg, "Items": []})).into_response();
            }
        },
        None => s
            .backend
            .list()
            .iter()
            .map(|f| item(&s.launcher, f))
            .collect(),
    };
    axum::Json(json!({"error": "", "Items": items})).into_response()
}

async fn launch(State(s): State<Arc<AppState>>, form: Multipart) -> Response {
    let upload = tokio::time::timeout(s.limits.upload_timeout, read_upload(form)).await;
    let Upload {
        context,
        filename,
        metadata,
        verified,
    } = match upload {
        Ok(Ok(parts)) => parts,
        Ok(Err(line)) => return lines(vec![line]),
        Err(_) => {
            return lines(vec![failed(
                "healthz",
                &format!(
                    "the upload did not arrive within {} s (SRI_UPLOAD_TIMEOUT_SECS)",
                    s.limits.upload_timeout.as_secs()
                ),
            )]);
        }
    };
    let Some(bytes) = context else {
        return lines(vec![failed(
            "healthz",
            "the upload has no `context` part holding the .difypkg",
        )]);
    };
    let refused = |message: String| {
        s.metrics
            .launches
            .get_or_create(&ResultLabel {
                result: "failed".into(),
            })
            .inc();
        lines(vec![failed("healthz", &message)])
    };
    if s.require_verified && !verified {
        return refused(
            "the daemon did not verify this package's signature, and SRI_REQUIRE_VERIFIED=true \
             refuses unverified packages; install it from the marketplace or a signed package, \
             or set SRI_REQUIRE_VERIFIED=false"
                .into(),
        );
    }
    let pkg = match s.intake.read(bytes).await.and_then(|p| {
        p.check_claims(filename.as_deref(), metadata.as_deref())
            .map(|()| p)
    }) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "package refused");
            return refused(e.to_string());
        }
    };
    tracing::info!(identifier = %pkg.unique_identifier(), verified, "launch requested");
    let record = s.launcher.launch(pkg);
    let metrics = s.clone();
    // Follow the deployment's record from its first line; close right after `end`.
    let stream = futures_util::stream::unfold((0usize, false), move |(sent, done)| {
        let mut record = record.clone();
        let metrics = metrics.clone();
        async move {
            if done {
                return None;
            }
            let _ = record.wait_for(|v| v.len() > sent).await;
            let lines = record.borrow().clone();
            let new: Vec<StageLine> = lines[sent..].to_vec();
            let end = new.iter().find(|l| l.is_end());
            if let Some(end) = end {
                let result = if end.state == "failed" {
                    "failed"
                } else {
                    "success"
                };
                metrics
                    .metrics
                    .launches
                    .get_or_create(&ResultLabel {
                        result: result.into(),
                    })
                    .inc();
            }
            let text: String = new.iter().map(StageLine::to_sse).collect();
            Some((
                Ok::<_, std::convert::Infallible>(Bytes::from(text)),
                (lines.len(), end.is_some()),
            ))
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .expect("response")
}

/// The launch form's `context` (the package) and `verified` parts, or the line saying why not.
/// The parts of a launch upload the connector reads.
#[derive(Debug, Default)]
pub struct Upload {
    /// The `.difypkg`.
    pub context: Option<Bytes>,
    /// The `context` part's filename (`author@name@version@checksum.difypkg`).
    pub filename: Option<String>,
    /// `{"plugin_unique_identifier":…}`.
    pub metadata: Option<String>,
    /// Whether the daemon verified the package's signature.
    pub verified: bool,
}

/// Reads the launch form (public for the fuzz target in `fuzz/`).
pub async fn read_upload(mut form: Multipart) -> Result<Upload, StageLine> {
    let mut up = Upload::default();
    loop {
        match form.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or_default().to_owned();
                if name == "context" {
                    up.filename = field.file_name().map(str::to_owned);
                }
                match field.bytes().await {
                    Ok(b) if name == "context" => up.context = Some(b),
                    Ok(b) if name == "verified" => up.verified = b.as_ref() == b"true",
                    Ok(b) if name == "metadata" => {
                        up.metadata = Some(String::from_utf8_lossy(&b).into_owned())
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Err(failed("healthz", &format!("cannot read the upload: {e}")));
                    }
                }
            }
            Ok(None) => return Ok(up),
            Err(e) => {
                return Err(failed(
                    "healthz",
                    &format!("the upload is not valid multipart: {e}"),
                ));
            }
        }
    }
}

fn failed(stage: &str, message: &str) -> StageLine {
    StageLine::new(stage, "failed", message)
}

/// A finished launch stream: the given lines and `end`.
fn lines(mut v: Vec<StageLine>) -> Response {
    v.push(StageLine::new("end", "failed", "launch failed"));
    let text: String = v.iter().map(StageLine::to_sse).collect();
    ([("content-type", "text/event-stream")], text).into_response()
}

async fn remove(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    if let Err(e) = crate::names::check(&name) {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": e.to_string()})),
        )
            .into_response();
    }
    match s.backend.remove(&name).await {
        Ok(()) => axum::Json(json!({"error": "", "removed": [name]})).into_response(),
        Err(e) => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

async fn gc(State(s): State<Arc<AppState>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let keep = q.get("keep").and_then(|k| k.parse().ok()).unwrap_or(2);
    match s.backend.gc(keep).await {
        Ok(removed) => axum::Json(json!({"error": "", "removed": removed})).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}
