//! A minimal Chrome DevTools protocol client: one WebSocket to the browser target of a
//! `Chromium::with_devtools()`, one page attached in flat mode, commands answered by id, events
//! kept until asked for, and `evaluate` of an expression whose (awaited) value comes back as
//! JSON. Every step is bounded and panics with the end of Chromium's log.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::browser::{log_tail, Chromium};

pub struct DevTools {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// The attached page's session; commands without one go to the browser target.
    session: Option<String>,
    /// Events read while waiting for a command's answer.
    events: VecDeque<Value>,
    /// The bound for each command or event.
    limit: Duration,
    log: PathBuf,
}

impl DevTools {
    /// Connects to `chromium`'s browser target once it listens, waiting at most `limit` (which
    /// then bounds every later step too).
    pub async fn connect(chromium: &mut Chromium, limit: Duration) -> DevTools {
        // Polls for the file Chromium writes once its DevTools socket listens.
        const POLL: Duration = Duration::from_millis(50);
        let deadline = Instant::now() + limit;
        let mut endpoint = None;
        for _ in 0..=limit.as_millis() / POLL.as_millis() {
            endpoint = chromium.devtools_endpoint();
            if endpoint.is_some() || Instant::now() > deadline {
                break;
            }
            if let Some(status) = chromium.exited() {
                panic!(
                    "Chromium exited ({status}) before DevTools listened; its log:\n{}",
                    chromium.log_tail()
                );
            }
            tokio::time::sleep(POLL).await;
        }
        let Some(endpoint) = endpoint else {
            panic!(
                "Chromium's DevTools did not listen within {limit:?}; its log:\n{}",
                chromium.log_tail()
            );
        };
        // No Origin header: Chromium refuses DevTools WebSockets from web origins.
        let ws =
            match tokio::time::timeout(limit, tokio_tungstenite::connect_async(&endpoint)).await {
                Ok(Ok((ws, _))) => ws,
                Ok(Err(err)) => panic!(
                    "DevTools at {endpoint}: {err}; Chromium's log:\n{}",
                    chromium.log_tail()
                ),
                Err(_) => panic!("DevTools at {endpoint}: no handshake within {limit:?}"),
            };
        DevTools {
            ws,
            next_id: 1,
            session: None,
            events: VecDeque::new(),
            limit,
            log: chromium.log_path(),
        }
    }

    /// Opens a new page, attaches to it, and navigates it to `url`; returns after its `load`
    /// event, so that its scripts have run once.
    pub async fn open_page(&mut self, url: &str) {
        let target = self
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let target_id = target["targetId"].clone();
        let attached = self
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await;
        let session = attached["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("Target.attachToTarget: {attached}"))
            .to_owned();
        self.session = Some(session);
        self.call("Page.enable", json!({})).await;
        let navigated = self.call("Page.navigate", json!({ "url": url })).await;
        if let Some(error) = navigated.get("errorText") {
            panic!("Chromium could not load {url}: {error}");
        }
        self.event("Page.loadEventFired").await;
    }

    /// The value of `expression` in the page (a promise is awaited), as JSON; panics when it
    /// throws.
    pub async fn evaluate(&mut self, expression: &str) -> Value {
        let params = json!({
            "expression": expression,
            "awaitPromise": true,
            "returnByValue": true,
        });
        let mut result = self.call("Runtime.evaluate", params).await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("the page threw: {exception}\nevaluating: {expression}");
        }
        result["result"]["value"].take()
    }

    /// Sends one command and returns its result, keeping the events that arrive meanwhile.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = &self.session {
            command["sessionId"] = json!(session);
        }
        let sent =
            tokio::time::timeout(self.limit, self.ws.send(Message::text(command.to_string())));
        if !matches!(sent.await, Ok(Ok(()))) {
            self.fail(&format!("sending {method}"));
        }
        let deadline = Instant::now() + self.limit;
        loop {
            let mut message = self.next_message(deadline, method).await;
            if message["id"] == json!(id) {
                if let Some(error) = message.get("error") {
                    panic!("DevTools {method}: {error}");
                }
                return message["result"].take();
            }
            if message.get("method").is_some() {
                self.events.push_back(message);
            }
        }
    }

    /// The next event called `method` (of the attached page), kept or still to come.
    pub async fn event(&mut self, method: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["method"] == method) {
            return self.events.remove(i).expect("a kept event")["params"].take();
        }
        let deadline = Instant::now() + self.limit;
        loop {
            let mut message = self.next_message(deadline, method).await;
            if message["method"] == method {
                return message["params"].take();
            }
            if message.get("method").is_some() {
                self.events.push_back(message);
            }
        }
    }

    async fn next_message(&mut self, deadline: Instant, waiting_for: &str) -> Value {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let text = match tokio::time::timeout(left, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => text,
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_)) | None) => self.fail(&format!("DevTools closed: {waiting_for}")),
                Err(_) => self.fail(&format!("no {waiting_for} within {:?}", self.limit)),
            };
            return serde_json::from_str(&text)
                .unwrap_or_else(|err| panic!("DevTools sent {text:?}: {err}"));
        }
    }

    fn fail(&self, what: &str) -> ! {
        panic!("{what}; Chromium's log:\n{}", log_tail(&self.log));
    }
}
