//! What the feed tests share: a real collector on loopback, a test agent streaming windows
//! to it over gRPC (waiting for each ack), and WebSocket clients of its feed.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

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
    AgentHello, AgentMessage, CollectorMessage, Direction, Exemplar, ExponentialHistogram,
    LatencyStats, LatencyWindow, Peer, PodIdentity, Quantile, Source, agent_message,
    collector_message, latency_ingest_client::LatencyIngestClient,
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
        let (_, _, body) = http_request(self.http, "GET", "/metrics", &[], "").await;
        body.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
            .trim()
            .parse()
            .unwrap()
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A window's identity and figures, made into a `LatencyWindow`.
#[derive(Clone, Debug)]
pub struct TestWindow {
    pub namespace: &'static str,
    pub workload: &'static str,
    pub pod: &'static str,
    pub node: &'static str,
    pub process: &'static str,
    pub profile: &'static str,
    pub direction: Direction,
    pub route: &'static str,
    pub method: &'static str,
    pub end_ms: u64,
    pub count: u64,
    /// Histogram buckets (dense); more make bigger frames.
    pub buckets: usize,
}

impl Default for TestWindow {
    fn default() -> Self {
        Self {
            namespace: "shop",
            workload: "checkout",
            pod: "checkout-1",
            node: "node-a",
            process: "app",
            profile: "shop/latency",
            direction: Direction::Server,
            route: "/cart/{id}",
            method: "GET",
            end_ms: unix_ms(),
            count: 10,
            buckets: 8,
        }
    }
}

impl TestWindow {
    pub fn window(&self) -> LatencyWindow {
        LatencyWindow {
            sequence: 0,
            source: Some(Source {
                node_name: self.node.into(),
                cgroup_id: 42,
                cgroup_path: "/kubepods/pod-1/c1".into(),
                pid: 7,
                process_name: self.process.into(),
                pod: (!self.namespace.is_empty()).then(|| PodIdentity {
                    namespace: self.namespace.into(),
                    name: self.pod.into(),
                    uid: format!("uid-{}", self.pod),
                    container: "app".into(),
                    workload_kind: if self.workload.is_empty() {
                        String::new()
                    } else {
                        "Deployment".into()
                    },
                    workload_name: self.workload.into(),
                }),
            }),
            direction: self.direction as i32,
            start_unix_nanos: (self.end_ms - 1_000) * 1_000_000,
            end_unix_nanos: self.end_ms * 1_000_000,
            stats: Some(LatencyStats {
                count: self.count,
                error_count: 1,
                sum_nanos: self.count * 2_000_000,
                min_nanos: 1_000_000,
                max_nanos: 3_000_000,
                quantiles: vec![
                    Quantile {
                        quantile: 0.5,
                        value_nanos: 2_000_000,
                    },
                    Quantile {
                        quantile: 0.99,
                        value_nanos: 2_900_000,
                    },
                ],
            }),
            histogram: Some(ExponentialHistogram {
                scale: 6,
                offset: 1_300,
                bucket_counts: (0..self.buckets as u64)
                    .map(|bucket| u64::from(bucket == 0) * (self.count - 1) + 1)
                    .collect(),
            }),
            status_class_counts: vec![0, 0, self.count - 1, 0, 0, 1],
            profile: self.profile.into(),
            route: self.route.into(),
            peer: (self.direction == Direction::Client).then(|| Peer {
                address: "10.0.0.9".into(),
                port: 8080,
            }),
            exemplars: vec![Exemplar {
                start_unix_nanos: (self.end_ms - 500) * 1_000_000,
                duration_nanos: 3_000_000,
                method: self.method.into(),
                status_code: 503,
                path: "/cart/17".into(),
                tid: 8,
            }],
            method: self.method.into(),
        }
    }
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

    /// Sends `window` and waits for its ack; returns its sequence.
    pub async fn send(&mut self, mut window: LatencyWindow) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        window.sequence = sequence;
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
