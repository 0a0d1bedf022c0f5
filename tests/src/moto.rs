//! `moto_server` as the AWS control plane for the Lambda backend's tests: started per test on a
//! loopback port, Lambda in its no-Docker mode, killed on drop.
//!
//! moto does not check signatures, so the few resources a test needs before the connector runs
//! (the execution role, the signing secret) are made with plain, unsigned API calls.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::root;

/// How long moto may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The region every moto test uses.
pub const REGION: &str = "us-east-1";

/// A running `moto_server`.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Where moto records requests once [`Moto::start_recording`] is called.
    recording: std::path::PathBuf,
}

/// One file per moto, so that tests running side by side keep their recordings apart.
fn recording(port: u16) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sri-moto-{}-{port}.jsonl", std::process::id()))
}

/// The `moto_server` of the test tooling (`make tools`).
pub fn moto_bin() -> std::path::PathBuf {
    let bin = root().join(".venv/moto/bin/moto_server");
    assert!(
        bin.exists(),
        "{} is missing: run `make tools` (make test does)",
        bin.display()
    );
    bin
}

impl Moto {
    /// Starts one on a free loopback port and waits until it answers.
    pub async fn start() -> Self {
        let mut last_err = String::new();
        // The port is chosen by binding :0 and released before moto binds it; another process
        // can take it in between, so a failed start is retried on a new port.
        for _ in 0..3 {
            let port = crate::emulator::free_port();
            let mut child = Command::new(moto_bin())
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("MOTO_RECORDER_FILEPATH", recording(port))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn moto_server");
            let url = format!("http://127.0.0.1:{port}");
            let http = reqwest::Client::new();
            let started = Instant::now();
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_err = format!("moto_server exited with {status}");
                    break;
                }
                match http.get(format!("{url}/moto-api/")).send().await {
                    Ok(r) if r.status().is_success() => {
                        let moto = Self {
                            child,
                            url,
                            recording: recording(port),
                        };
                        moto.configure().await;
                        return moto;
                    }
                    Ok(r) => last_err = format!("HTTP {}", r.status()),
                    Err(e) => last_err = e.to_string(),
                }
                if started.elapsed() > START_TIMEOUT {
                    let _ = child.kill();
                    panic!("moto_server did not answer within {START_TIMEOUT:?}: {last_err}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("moto_server would not start: {last_err}");
    }

    /// Lambda without Docker (there is no engine here).
    async fn configure(&self) {
        let r = reqwest::Client::new()
            .post(format!("{}/moto-api/config", self.url))
            .json(&serde_json::json!({"lambda": {"use_docker": false}}))
            .send()
            .await
            .expect("moto config");
        assert!(r.status().is_success(), "moto config: {}", r.status());
    }

    /// Environment that points the AWS SDK (and the connector) at this moto.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.url.as_str()),
            ("AWS_REGION", REGION),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// An SDK configuration for this moto (what the tests inspect AWS with).
    pub async fn sdk(&self) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(REGION))
            .endpoint_url(&self.url)
            .credentials_provider(aws_credential_types::Credentials::for_tests())
            .load()
            .await
    }

    /// Records every AWS request from now on (moto's recorder).
    pub async fn start_recording(&self) {
        let r = reqwest::Client::new()
            .post(format!("{}/moto-api/recorder/start-recording", self.url))
            .send()
            .await
            .expect("moto recorder");
        assert!(r.status().is_success(), "moto recorder: {}", r.status());
    }

    /// The requests recorded so far: (method, URL path, body as text).
    pub fn recorded(&self) -> Vec<(String, String, String)> {
        use base64::Engine;
        let text = std::fs::read_to_string(&self.recording).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                let body = v["body"].as_str().unwrap_or_default();
                let body = if v["body_encoded"] == true {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(body)
                        .unwrap_or_default();
                    String::from_utf8_lossy(&raw).into_owned()
                } else {
                    body.to_owned()
                };
                (
                    v["method"].as_str().unwrap_or_default().to_owned(),
                    v["url"].as_str().unwrap_or_default().to_owned(),
                    body,
                )
            })
            .collect()
    }

    /// Creates an IAM role Lambda can assume; returns its ARN.
    pub async fn create_role(&self, name: &str) -> String {
        let trust = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"lambda.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;
        let body = reqwest::Client::new()
            .post(&self.url)
            .header(
                "authorization",
                "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0",
            )
            .form(&[
                ("Action", "CreateRole"),
                ("Version", "2010-05-08"),
                ("RoleName", name),
                ("AssumeRolePolicyDocument", trust),
            ])
            .send()
            .await
            .expect("CreateRole")
            .text()
            .await
            .expect("CreateRole body");
        let arn = body
            .split("<Arn>")
            .nth(1)
            .and_then(|s| s.split("</Arn>").next())
            .unwrap_or_else(|| panic!("CreateRole answered without an Arn: {body}"));
        arn.to_owned()
    }

    /// Creates a Secrets Manager secret; returns its ARN.
    pub async fn create_secret(&self, name: &str, value: &str) -> String {
        let v = self
            .secrets_call(
                "CreateSecret",
                serde_json::json!({"Name": name, "SecretString": value}),
            )
            .await;
        v["ARN"]
            .as_str()
            .unwrap_or_else(|| panic!("CreateSecret answered {v}"))
            .to_owned()
    }

    /// Creates an S3 bucket (path-style, as the connector addresses moto).
    pub async fn create_bucket(&self, name: &str) {
        let r = reqwest::Client::new()
            .put(format!("{}/{name}", self.url))
            .send()
            .await
            .expect("CreateBucket");
        assert!(
            r.status().is_success(),
            "CreateBucket {name}: {}",
            r.status()
        );
    }

    /// Stores a new value in a secret (what a key rotation does).
    pub async fn put_secret(&self, id: &str, value: &str) {
        let v = self
            .secrets_call(
                "PutSecretValue",
                serde_json::json!({"SecretId": id, "SecretString": value}),
            )
            .await;
        assert!(v["VersionId"].is_string(), "PutSecretValue answered {v}");
    }

    async fn secrets_call(&self, op: &str, body: serde_json::Value) -> serde_json::Value {
        reqwest::Client::new()
            .post(&self.url)
            .header("x-amz-target", format!("secretsmanager.{op}"))
            .header("content-type", "application/x-amz-json-1.1")
            .header(
                "authorization",
                "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/secretsmanager/aws4_request, SignedHeaders=host, Signature=0",
            )
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{op}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("{op} body: {e}"))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.recording);
    }
}
