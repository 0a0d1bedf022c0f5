//! The operations against a running `sri serve` from a terminal: `deploy`, `invoke`, `list`,
//! `remove`, `gc`, all through its control plane with the API key.

use clap::Args;
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

use super::load;
use crate::secret::{self, Secret};
use crate::server::API_KEY_ENV;

/// Where a running connector is.
#[derive(Debug, Args)]
pub struct Remote {
    /// The connector's URL.
    #[arg(long, env = "SRI_URL", default_value = "http://127.0.0.1:5004")]
    pub url: String,
    /// Its API key.
    #[arg(long, env = API_KEY_ENV, hide_env_values = true, value_parser = secret::parse)]
    pub api_key: Option<Secret>,
}

/// Options of `sri invoke`.
#[derive(Debug, Args)]
pub struct InvokeOptions {
    /// Function name (see `sri list`).
    pub name: String,
    /// Dify action.
    #[arg(long, default_value = "invoke_tool")]
    pub action: String,
    /// Tool provider.
    #[arg(long)]
    pub provider: String,
    /// Tool name.
    #[arg(long, default_value = "")]
    pub tool: String,
    /// Tool parameters (JSON object).
    #[arg(long, default_value = "{}")]
    pub params: String,
    /// Credentials (JSON object).
    #[arg(long, default_value = "{}")]
    pub credentials: String,
    /// Print the daemon's raw NDJSON objects.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: Remote,
}

fn request(remote: &Remote, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    let mut req = reqwest::Client::new().request(
        method,
        format!("{}{path}", remote.url.trim_end_matches('/')),
    );
    if let Some(k) = &remote.api_key {
        req = req.header("authorization", &k.0);
    }
    req
}

pub(super) async fn deploy(path: &Path, remote: &Remote) -> anyhow::Result<()> {
    let pkg = load(path)?;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(format!("launching {}", pkg.unique_identifier()));
    let form = reqwest::multipart::Form::new()
        .part(
            "context",
            reqwest::multipart::Part::bytes(pkg.bytes.to_vec()).file_name(pkg.filename()),
        )
        .text("verified", "false")
        .text(
            "metadata",
            json!({"plugin_unique_identifier": pkg.unique_identifier()}).to_string(),
        );
    let resp = request(remote, reqwest::Method::POST, "/v1/launch")
        .multipart(form)
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "launch answered {}: {}",
        resp.status(),
        resp.text().await.unwrap_or_default()
    );
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut endpoint = None;
    let mut failure = None;
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(v) = line
                .trim()
                .strip_prefix("data:")
                .and_then(|j| serde_json::from_str::<Value>(j.trim()).ok())
            else {
                continue;
            };
            let (stage, state, msg) = (
                v["Stage"].as_str().unwrap_or(""),
                v["State"].as_str().unwrap_or(""),
                v["Message"].as_str().unwrap_or(""),
            );
            bar.suspend(|| eprintln!("[{stage}] {state}: {msg}"));
            bar.set_message(format!("{stage}: {msg}"));
            if state == "failed" && stage != "end" {
                failure = Some(msg.to_owned());
            }
            if stage == "run" && state == "success" {
                endpoint = Some(msg.to_owned());
            }
        }
    }
    bar.finish_and_clear();
    if let Some(f) = failure {
        anyhow::bail!("launch failed: {f}");
    }
    println!(
        "{}",
        endpoint.ok_or_else(|| anyhow::anyhow!("the launch ended without an endpoint"))?
    );
    Ok(())
}

/// The gateway endpoint of function `name`, as the connector hands it out (its capability
/// token included), on the connector's URL as this command reaches it (the public URL it hands
/// the daemon may not resolve here).
async fn endpoint_of(remote: &Remote, name: &str) -> anyhow::Result<String> {
    crate::names::check(name)?;
    let resp = request(remote, reqwest::Method::GET, "/v1/runner/instances")
        .send()
        .await?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or_default();
    anyhow::ensure!(
        status.is_success(),
        "listing the functions answered HTTP {status}: {} (the gateway endpoint carries a \
         token only the control plane hands out: set {API_KEY_ENV})",
        v["error"].as_str().unwrap_or_default()
    );
    let endpoint = v["Items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["Name"] == name)
        .and_then(|i| i["Endpoint"].as_str())
        .ok_or_else(|| anyhow::anyhow!("no function named `{name}` (see `sri list`)"))?;
    let path = endpoint
        .find("/v1/functions/")
        .map(|i| &endpoint[i..])
        .ok_or_else(|| anyhow::anyhow!("the endpoint {endpoint} is not a gateway endpoint"))?;
    Ok(format!("{}{path}", remote.url.trim_end_matches('/')))
}

pub(super) async fn invoke(o: InvokeOptions) -> anyhow::Result<()> {
    let params: Value = serde_json::from_str(&o.params)
        .map_err(|e| anyhow::anyhow!("--params is not JSON: {e}"))?;
    let credentials: Value = serde_json::from_str(&o.credentials)
        .map_err(|e| anyhow::anyhow!("--credentials is not JSON: {e}"))?;
    let session = format!("cli-{:016x}", rand::random::<u64>());
    let envelope = json!({
        "session_id": session, "conversation_id": null, "message_id": null, "app_id": null, "endpoint_id": null,
        "context": {}, "event": "request",
        "data": {"action": o.action, "credential_type": "api-key", "credentials": credentials, "provider": o.provider,
                 "tool": o.tool, "tool_parameters": params, "type": "tool", "user_id": "sri-cli"},
    });
    let url = format!(
        "{}/invoke?{}",
        endpoint_of(&o.remote, &o.name).await?,
        crate::transport::invoke_query(&o.action)
    );
    let resp = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(envelope.to_string())
        .send()
        .await?;
    if !resp.status().is_success() {
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or_default();
        anyhow::bail!(
            "HTTP {status}: {}: {}",
            v["errorType"].as_str().unwrap_or(""),
            v["errorMessage"].as_str().unwrap_or("")
        );
    }
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut failed = false;
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if o.json {
                print!("{}", String::from_utf8_lossy(&line));
                continue;
            }
            let v: Value = serde_json::from_slice(&line).unwrap_or_default();
            let data = &v["data"];
            match (v["event"].as_str(), data["type"].as_str()) {
                (Some("session"), Some("stream")) => {
                    let m = &data["data"];
                    match m["type"].as_str() {
                        Some("text") => {
                            println!("{}", m["message"]["text"].as_str().unwrap_or_default())
                        }
                        _ => println!("{}", m),
                    }
                }
                (Some("session"), Some("error")) => {
                    failed = true;
                    eprintln!(
                        "error: {}: {}",
                        data["data"]["error_type"].as_str().unwrap_or(""),
                        data["data"]["message"].as_str().unwrap_or("")
                    );
                }
                (Some("log"), _) => {
                    eprintln!("log: {}", data["message"].as_str().unwrap_or_default())
                }
                _ => {}
            }
        }
    }
    anyhow::ensure!(!failed, "the invocation failed");
    Ok(())
}

/// `sri list`: every function, as a table or the raw answer.
pub(super) async fn list(remote: &Remote, json: bool) -> anyhow::Result<()> {
    let v: Value = request(remote, reqwest::Method::GET, "/v1/runner/instances")
        .send()
        .await?
        .json()
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for i in v["Items"].as_array().into_iter().flatten() {
            println!(
                "{:<48} {:<60} {}",
                i["Name"].as_str().unwrap_or(""),
                i["Identifier"].as_str().unwrap_or(""),
                i["Endpoint"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

/// `sri remove`: deletes a function and everything it owns.
pub(super) async fn remove(name: &str, remote: &Remote) -> anyhow::Result<()> {
    crate::names::check(name)?;
    let resp = request(
        remote,
        reqwest::Method::DELETE,
        &format!("/v1/functions/{name}"),
    )
    .send()
    .await?;
    let ok = resp.status().is_success();
    let v: Value = resp.json().await.unwrap_or_default();
    anyhow::ensure!(ok, "{}", v["error"].as_str().unwrap_or("remove failed"));
    println!("removed {name}");
    Ok(())
}

/// `sri gc`: deletes leftovers and superseded functions, keeping `keep` per plugin.
pub(super) async fn gc(keep: usize, remote: &Remote) -> anyhow::Result<()> {
    let v: Value = request(
        remote,
        reqwest::Method::POST,
        &format!("/v1/gc?keep={keep}"),
    )
    .send()
    .await?
    .json()
    .await?;
    for r in v["removed"].as_array().into_iter().flatten() {
        println!("removed {}", r.as_str().unwrap_or_default());
    }
    anyhow::ensure!(
        v["error"].as_str().unwrap_or_default().is_empty(),
        "{}",
        v["error"]
    );
    Ok(())
}
