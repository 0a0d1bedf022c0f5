//! Launches: package → function, reported as the daemon's stage lines, idempotent per checksum.
//!
//! A deployment runs in its own task and records its lines; every launch of the same checksum
//! (concurrent, or a retry after the daemon's 240 s deadline cut its stream) follows the same
//! record from the start, so ten concurrent launches make one function and a slow one finishes
//! in the background for a later `instances` call to find.

use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};

use crate::backend::{Backend, Function};
use crate::capability::Capabilities;
use crate::package::Package;

/// One line of the launch stream: `{"Stage","State","Obj","Message"}`, all strings.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StageLine {
    /// `healthz|start|build|run|end`.
    #[serde(rename = "Stage")]
    pub stage: String,
    /// `running|success|failed`.
    #[serde(rename = "State")]
    pub state: String,
    /// Always `""`.
    #[serde(rename = "Obj")]
    pub obj: String,
    /// Human text; on `run`/`success`: `endpoint=…,name=…,id=…`.
    #[serde(rename = "Message")]
    pub message: String,
}

impl StageLine {
    /// A line.
    pub fn new(stage: &str, state: &str, message: impl Into<String>) -> Self {
        Self {
            stage: stage.into(),
            state: state.into(),
            obj: String::new(),
            message: message.into(),
        }
    }

    /// The line as the daemon reads it (`data: {…}` and a blank line).
    pub fn to_sse(&self) -> String {
        format!("data: {}\n\n", serde_json::to_string(self).expect("JSON"))
    }

    /// Whether this is the last line of a launch.
    pub fn is_end(&self) -> bool {
        self.stage == "end"
    }
}

/// The record of one deployment.
type Record = watch::Receiver<Vec<StageLine>>;

/// Runs launches against a backend.
pub struct Launcher {
    backend: Arc<dyn Backend>,
    public_url: String,
    capabilities: Capabilities,
    inflight: Mutex<HashMap<String, Record>>,
}

impl Launcher {
    /// A launcher whose endpoints are `{public_url}/v1/functions/{name}/{token}`.
    pub fn new(backend: Arc<dyn Backend>, public_url: String, capabilities: Capabilities) -> Self {
        Self {
            backend,
            public_url: public_url.trim_end_matches('/').to_owned(),
            capabilities,
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// The endpoint the daemon is given for a function: it carries the function's capability
    /// token (the daemon appends `/invoke`).
    pub fn endpoint(&self, name: &str) -> String {
        format!(
            "{}/v1/functions/{name}/{}",
            self.public_url,
            self.capabilities.token(name)
        )
    }

    /// What makes and checks the endpoints' tokens.
    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// The success line for a function.
    pub fn run_line(&self, f: &Function) -> StageLine {
        // The daemon splits this on every `,` and `=`: names and URLs never contain them.
        StageLine::new(
            "run",
            "success",
            format!(
                "endpoint={},name={},id={}",
                self.endpoint(&f.name),
                f.name,
                f.name
            ),
        )
    }

    /// Starts (or joins) the deployment of `pkg`; the receiver's value grows line by line and
    /// ends with an `end` line.
    pub fn launch(self: &Arc<Self>, pkg: Package) -> Record {
        if let Some(f) = self.backend.find(&pkg.checksum) {
            let lines = vec![
                self.run_line(&f),
                StageLine::new("end", "success", "already deployed"),
            ];
            return watch::channel(lines).1;
        }
        let mut inflight = self.inflight.lock().expect("inflight lock");
        if let Some(rec) = inflight.get(&pkg.checksum) {
            return rec.clone();
        }
        let (tx, rx) = watch::channel(vec![StageLine::new(
            "healthz",
            "success",
            format!("package {} checked", pkg.unique_identifier()),
        )]);
        inflight.insert(pkg.checksum.clone(), rx.clone());
        drop(inflight);
        let this = self.clone();
        tokio::spawn(async move {
            let (ptx, mut prx) = mpsc::unbounded_channel::<(&'static str, String)>();
            let push = |line: StageLine| tx.send_modify(|v| v.push(line));
            push(StageLine::new("start", "running", "deploying"));
            let deploy = this.backend.deploy(&pkg, ptx);
            tokio::pin!(deploy);
            let result = loop {
                tokio::select! {
                    Some((stage, msg)) = prx.recv() => push(StageLine::new(stage, "running", msg)),
                    r = &mut deploy => break r,
                }
            };
            while let Ok((stage, msg)) = prx.try_recv() {
                push(StageLine::new(stage, "running", msg));
            }
            match result {
                Ok(f) => {
                    tracing::info!(function = %f.name, identifier = %f.identifier, "launched");
                    push(this.run_line(&f));
                    push(StageLine::new("end", "success", "deployed"));
                }
                Err(e) => {
                    tracing::warn!(identifier = %pkg.unique_identifier(), error = %e, "launch failed");
                    push(StageLine::new("build", "failed", e.to_string()));
                    push(StageLine::new("end", "failed", "launch failed"));
                }
            }
            this.inflight
                .lock()
                .expect("inflight lock")
                .remove(&pkg.checksum);
        });
        rx
    }
}
