//! What the tests of the live feed and its clients (feed, feed_schema, dashboard,
//! watch_terminal) share: a real collector on loopback, in this process ([`Running`]) or as
//! the `trazor-collector` binary that a test can stop and start again on the same ports
//! ([`CollectorProcess`]); test windows ([`TestWindow`]); a test agent streaming them over
//! gRPC and waiting for each ack; WebSocket clients of the feed; `/metrics` read over HTTP.
// Each test crate uses its own subset (of the re-exports too).
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

mod process;
mod window;

pub use process::{CollectorProcess, free_port};
pub use window::{SECOND, TestWindow, bucket_lower, expected_point, unix_ms, unix_nanos};

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::{SinkExt as _, StreamExt as _};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest as _, protocol::frame::coding::CloseCode},
};
use trazor_collector::{BoundCollector, CollectorConfig, stats::CollectorStats};
use trazor_proto::v1::{
    AgentHello, AgentMessage, CollectorMessage, LatencyWindow, agent_message, collector_message,
    latency_ingest_client::LatencyIngestClient,
};

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A collector serving in the background.
pub struct Running {
    pub grpc: String,
    pub http: SocketAddr,
    pub stats: Arc<CollectorStats>,
}

impl Running {
    pub async fn start(config: CollectorConfig) -> Self {
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let collector = BoundCollector::bind(&CollectorConfig {
            grpc_listen: loopback,
            http_listen: loopback,
            ..config
        })
        .await
        .unwrap();
        let running = Self {
            grpc: format!("http://{}", collector.grpc_addr()),
            http: collector.http_addr(),
            stats: collector.stats(),
        };
        tokio::spawn(collector.serve());
        running
    }

    pub fn url(&self, query: &str) -> String {
        if query.is_empty() {
            format!("ws://{}/ws", self.http)
        } else {
            format!("ws://{}/ws?{query}", self.http)
        }
    }

    /// A feed client with these query parameters.
    pub async fn feed(&self, query: &str) -> Feed {
        Feed::connect(&self.url(query), &[]).await.unwrap()
    }

    /// One metric's value from `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        metric(self.http, name).await
    }
}

/// The value of metric `name` (no labels) on the `/metrics` of the collector at `address`.
pub async fn metric(address: SocketAddr, name: &str) -> u64 {
    let (_, _, body) = http_request(address, "GET", "/metrics", &[], "").await;
    body.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
        .trim()
        .parse()
        .unwrap()
}

/// A test agent: one gRPC stream, windows numbered 1, 2, 3, ...
pub struct Agent {
    sender: mpsc::Sender<AgentMessage>,
    acks: tonic::Streaming<CollectorMessage>,
    next_sequence: u64,
}

impl Agent {
    pub async fn connect(grpc: &str, agent_id: &str) -> Self {
        let mut client = LatencyIngestClient::connect(grpc.to_owned()).await.unwrap();
        let (sender, receiver) = mpsc::channel(64);
        sender
            .send(AgentMessage {
                kind: Some(agent_message::Kind::Hello(AgentHello {
                    node_name: "node-a".into(),
                    agent_id: agent_id.into(),
                    boot_id: "boot-1".into(),
                    version: "test".into(),
                    capabilities: vec![],
                })),
            })
            .await
            .unwrap();
        let acks = client
            .stream(ReceiverStream::new(receiver))
            .await
            .unwrap()
            .into_inner();
        Self {
            sender,
            acks,
            next_sequence: 1,
        }
    }

    /// Sends `window` numbered next and waits for its ack; returns its sequence.
    pub async fn send(&mut self, mut window: LatencyWindow) -> u64 {
        window.sequence = self.next_sequence;
        self.send_numbered(window).await
    }

    /// Sends `window` with the sequence it has (numbering goes on after it) and waits for
    /// its ack; returns its sequence.
    pub async fn send_numbered(&mut self, window: LatencyWindow) -> u64 {
        let sequence = window.sequence;
        self.next_sequence = sequence + 1;
        self.sender
            .send(AgentMessage {
                kind: Some(agent_message::Kind::Window(window)),
            })
            .await
            .unwrap();
        loop {
            let message = tokio::time::timeout(TIMEOUT, self.acks.message())
                .await
                .expect("an ack within 10 s: ingest must not be slowed by the feed")
                .unwrap()
                .unwrap();
            let Some(collector_message::Kind::Ack(ack)) = message.kind else {
                panic!("expected an ack, got {message:?}");
            };
            if ack.acked_through >= sequence {
                return sequence;
            }
        }
    }

    pub async fn send_test(&mut self, window: &TestWindow) -> u64 {
        self.send(window.window()).await
    }
}

/// Sends `windows` (numbered already, e.g. by [`TestWindow::message`]) from agent
/// `agent_id` over a new stream, and waits until each is acknowledged.
pub async fn send(grpc: &str, agent_id: &str, windows: Vec<AgentMessage>) {
    let mut agent = Agent::connect(grpc, agent_id).await;
    for message in windows {
        let Some(agent_message::Kind::Window(window)) = message.kind else {
            panic!("not a window: {message:?}");
        };
        agent.send_numbered(window).await;
    }
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A feed client.
pub struct Feed {
    pub socket: Socket,
}

/// What a frame was, read by a test.
#[derive(Debug)]
pub enum Frame {
    Json(serde_json::Value),
    Binary(Vec<u8>),
    Closed(Option<(u16, String)>),
}

impl Feed {
    /// Connects with extra request headers; the HTTP status when refused before upgrade.
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Result<Self, (u16, String)> {
        let mut request = url.into_client_request().unwrap();
        for (name, value) in headers {
            request.headers_mut().append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => Ok(Self { socket }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let body = response
                    .body()
                    .as_ref()
                    .map(|body| String::from_utf8_lossy(body).into_owned())
                    .unwrap_or_default();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|value| format!(" retry-after={}", value.to_str().unwrap()))
                    .unwrap_or_default();
                Err((response.status().as_u16(), format!("{body}{retry_after}")))
            }
            Err(error) => panic!("connecting to {url}: {error}"),
        }
    }

    /// The next data or close frame (pings are answered by tungstenite and skipped).
    pub async fn frame(&mut self) -> Frame {
        loop {
            let message = tokio::time::timeout(TIMEOUT, self.socket.next())
                .await
                .expect("a frame within 10 s");
            match message {
                None => return Frame::Closed(None),
                Some(Err(error)) => panic!("feed failed: {error}"),
                Some(Ok(Message::Text(text))) => {
                    return Frame::Json(serde_json::from_str(&text).unwrap());
                }
                Some(Ok(Message::Binary(bytes))) => return Frame::Binary(bytes.to_vec()),
                Some(Ok(Message::Close(frame))) => {
                    return Frame::Closed(
                        frame.map(|frame| (u16::from(frame.code), frame.reason.to_string())),
                    );
                }
                Some(Ok(_)) => {}
            }
        }
    }

    pub async fn json(&mut self) -> serde_json::Value {
        match self.frame().await {
            Frame::Json(json) => json,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The `subscribed` frame that opens every subscription.
    pub async fn subscribed(&mut self) -> serde_json::Value {
        let json = self.json().await;
        assert_eq!(json["type"], "subscribed", "{json}");
        json
    }

    /// `count` item frames, skipping nothing.
    pub async fn items(&mut self, count: usize) -> Vec<serde_json::Value> {
        let mut items = Vec::new();
        while items.len() < count {
            items.push(self.json().await);
        }
        items
    }

    /// Asserts nothing arrives for `quiet`.
    pub async fn nothing_for(&mut self, quiet: Duration) {
        let next = tokio::time::timeout(quiet, async {
            loop {
                match self.socket.next().await {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => return other,
                }
            }
        })
        .await;
        assert!(next.is_err(), "expected nothing, got {next:?}");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.socket.send(Message::text(text)).await.unwrap();
    }

    /// Reads until the server closes; the close code and reason.
    pub async fn close_code(&mut self) -> (u16, String) {
        loop {
            match self.frame().await {
                Frame::Closed(Some(close)) => return close,
                Frame::Closed(None) => panic!("closed without a close frame"),
                _ => {}
            }
        }
    }
}

pub fn close_code(code: CloseCode) -> u16 {
    u16::from(code)
}

/// One HTTP/1.1 request over a fresh connection: status, headers (lower-case names), body.
pub async fn http_request(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// A WebSocket upgrade by hand over a plain TCP stream, for peers that must not answer
/// pings (tungstenite always answers the ones it reads). Returns the stream after the
/// `101` response head.
pub async fn raw_upgrade(address: SocketAddr, query: &str) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = format!(
        "GET /ws?{query} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}
