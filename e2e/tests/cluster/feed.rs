//! A subscriber of the collector's WebSocket feed, as a user's browser is: through the API
//! server's port-forward to a collector pod, reconnecting (with history replay) when that
//! pod goes away, and keeping every window it saw once, keyed by (agent, boot, sequence).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest as _, http};

use crate::kube_io::running_pods;

/// (agent id, boot id, sequence): what identifies a window end to end.
pub type WindowKey = (String, String, u64);

/// Everything the feed delivered so far.
#[derive(Default)]
pub struct FeedLog {
    /// Windows by key, first arrival kept.
    pub windows: BTreeMap<WindowKey, Value>,
    /// Windows that arrived again (a replay after reconnecting to the same collector, or a
    /// resend a new collector accepted).
    pub repeats: u64,
    /// Connections made to a collector pod (1 + reconnects).
    pub connections: u64,
    /// Collector pods the feed was read from, in order.
    pub collectors: Vec<String>,
}

/// The running subscriber; stops when dropped.
pub struct FeedRecorder {
    pub log: Arc<Mutex<FeedLog>>,
    task: JoinHandle<()>,
}

impl Drop for FeedRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FeedRecorder {
    /// Subscribes to the feed of the collector pods matching `selector` in `namespace`
    /// (port `port`, path `/ws?history=N`), presenting the feed `token` as a bearer token.
    pub fn start(
        client: Client,
        namespace: String,
        selector: String,
        port: u16,
        token: String,
    ) -> Self {
        let log = Arc::new(Mutex::new(FeedLog::default()));
        let source = FeedSource {
            client,
            namespace,
            selector,
            port,
            token,
        };
        let task = tokio::spawn(follow(source, log.clone()));
        Self { log, task }
    }

    /// Windows that satisfy `keep`, cloned.
    pub fn windows(&self, keep: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .windows
            .values()
            .filter(|window| keep(window))
            .cloned()
            .collect()
    }

    pub fn with_log<T>(&self, read: impl FnOnce(&FeedLog) -> T) -> T {
        read(
            &self
                .log
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }
}

/// Where the feed is read from, and with what credential.
struct FeedSource {
    client: Client,
    namespace: String,
    selector: String,
    port: u16,
    token: String,
}

async fn follow(source: FeedSource, log: Arc<Mutex<FeedLog>>) {
    let mut last_error = String::new();
    loop {
        if let Err(error) = read_one_collector(&source, &log).await {
            let error = format!("{error:#}");
            if error != last_error {
                eprintln!("    (feed: {error}; reconnecting)");
            }
            last_error = error;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn read_one_collector(source: &FeedSource, log: &Mutex<FeedLog>) -> Result<()> {
    let FeedSource {
        client,
        namespace,
        selector,
        port,
        token,
    } = source;
    let port = *port;
    let pods = running_pods(client, namespace, selector).await?;
    let (name, _) = pods
        .iter()
        .find(|(_, pod)| crate::kube_io::is_ready(pod))
        .ok_or_else(|| anyhow!("no Ready collector pod yet"))?;
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut forwarder = api.portforward(name, &[port]).await?;
    let stream = forwarder
        .take_stream(port)
        .ok_or_else(|| anyhow!("no port-forward stream"))?;
    let mut request = "ws://localhost/ws?history=100000".into_client_request()?;
    request.headers_mut().insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_str(&format!("Bearer {token}"))?,
    );
    let (mut socket, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .context("WebSocket handshake with the collector")?;
    {
        let mut log = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        log.connections += 1;
        log.collectors.push(name.clone());
    }
    while let Some(message) = socket.next().await {
        let text = match message? {
            Message::Text(text) => text,
            Message::Close(_) => break,
            _ => continue,
        };
        let Ok(document) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if document["type"] != "window" {
            continue;
        }
        let key = (
            document["agent_id"].as_str().unwrap_or_default().to_owned(),
            document["boot_id"].as_str().unwrap_or_default().to_owned(),
            document["sequence"].as_u64().unwrap_or_default(),
        );
        let mut log = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match log.windows.entry(key) {
            std::collections::btree_map::Entry::Occupied(_) => log.repeats += 1,
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(document);
            }
        }
    }
    Ok(())
}
