//! `make demo`: starts `bootstrap serve` with the template's sample plugin on the real SDK,
//! sends it a signed SRI v1 invocation of the streaming tool, prints each chunk as it arrives,
//! and shuts everything down.

use connector::protocol::events::EventKind;
use futures_util::StreamExt;
use harness::*;
use serde_json::json;
use std::time::Instant;

#[tokio::main]
async fn main() {
    println!("starting bootstrap serve with template/plugin (Python 3.12, dify-plugin 0.10)…");
    let b = Bootstrap::start(Options::new("sample"));
    let health = b.wait_ready().await;
    println!("ready: {health}");
    let ring = signer("k1", SECRET_A);
    let body = envelope(
        &session_id("demo"),
        tool_data("sample", "stream", json!({"n": 5, "delay_ms": 400}), None),
    );
    let started = Instant::now();
    let resp = Call {
        base: &b.url(),
        action: "invoke_tool",
        body,
        ring: Some(&ring),
        accept: "text/event-stream",
    }
    .send()
    .await;
    println!(
        "POST {}/invoke?action=invoke_tool → {}",
        b.url(),
        resp.status()
    );
    let mut events = connector::protocol::sse::decode(Box::pin(resp.bytes_stream()));
    while let Some(ev) = events.next().await {
        let ev = ev.expect("valid SSE");
        let at = started.elapsed().as_millis();
        match ev.kind {
            EventKind::Chunk => {
                let v = ev.json().unwrap();
                println!(
                    "{at:>6} ms  chunk  {}",
                    v["data"]["data"]["message"]["text"]
                );
            }
            kind => println!(
                "{at:>6} ms  {kind:<6} {}",
                String::from_utf8_lossy(&ev.data)
            ),
        }
    }
    drop(b);
    println!("done: bootstrap and plugin stopped");
}
