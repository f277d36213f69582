//! The live feed at `/ws`: windows and merged aggregates to WebSocket subscribers, each with
//! its own filter, history replay and encoding (the protocol: `collector/FEED.md`).
//!
//! Publishing (on the ingest path) costs one lock, one history slot and one broadcast
//! send, whatever the number of subscribers: it never waits for one. Each connection has a
//! task that takes items from the broadcast ring, keeps those its subscription matches
//! ([`subscription`]; fields read in place, nothing parsed) and queues them in its own
//! bounded queue ([`connection`]), oldest dropped and counted when full; a second task
//! writes the queue to the socket. An item is encoded at most once per encoding
//! ([`frame`]), on first use, and the bytes are shared by every subscriber.

mod connection;
pub mod frame;
pub mod subscription;

use std::{
    collections::VecDeque,
    fmt::Write as _,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    extract::{
        RawQuery, State,
        ws::{Utf8Bytes, WebSocketUpgrade, rejection::WebSocketUpgradeRejection},
    },
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse as _, Response},
};
use bytes::Bytes;
use tokio::sync::broadcast;
use trazor_proto::v1::LatencyWindow;

use self::subscription::{FilterKey, Replay, Subscription};
use crate::{auth::ViewerAuth, merge::Aggregate, stats::CollectorStats};

/// The feed's limits and timers (flags `--feed-*`, `--history`).
#[derive(Clone, Debug)]
pub struct FeedConfig {
    /// Items (windows and aggregates) kept for replay.
    pub history: usize,
    /// Items queued per connection before the oldest are dropped.
    pub queue: usize,
    /// Connections open at once; more get HTTP 503.
    pub max_connections: usize,
    /// Largest frame or message a client may send, in bytes.
    pub max_frame_bytes: usize,
    /// Messages per second a client may send (sustained), and at once above that.
    pub message_rate: f64,
    pub message_burst: f64,
    /// A ping every `ping_interval`; a client silent for `ping_interval + pong_timeout`
    /// is closed.
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
}

impl Default for FeedConfig {
    fn default() -> Self {
        Self {
            history: 20_000,
            queue: 4_096,
            max_connections: 4_096,
            max_frame_bytes: 64 * 1024,
            message_rate: 5.0,
            message_burst: 20.0,
            ping_interval: Duration::from_secs(15),
            pong_timeout: Duration::from_secs(15),
        }
    }
}

/// Broadcast ring between publishers and connection tasks. Connection tasks only filter
/// and queue, so they keep up unless the runtime is starved; if one falls this far behind,
/// what it skipped is counted as missed like a queue drop.
const FANOUT_RING: usize = 16_384;

/// The feed's own counters (the subscriber gauge and the queue drops are in
/// [`CollectorStats`], where they were first).
#[derive(Debug, Default)]
pub struct FeedStats {
    pub connections: AtomicU64,
    pub refused_full: AtomicU64,
    pub unauthenticated: AtomicU64,
    pub auth_throttled: AtomicU64,
    pub subscriptions: AtomicU64,
    pub error_frames: AtomicU64,
    pub closed_bad_input: AtomicU64,
    pub closed_rate_limited: AtomicU64,
    pub closed_heartbeat: AtomicU64,
    pub frames_sent: AtomicU64,
}

impl FeedStats {
    fn render(&self, text: &mut String) {
        let metrics: [(&str, &str, &str, &AtomicU64); 10] = [
            (
                "trazor_collector_feed_connections_total",
                "counter",
                "WebSocket feed connections accepted (upgraded).",
                &self.connections,
            ),
            (
                "trazor_collector_feed_refused_full_total",
                "counter",
                "Feed connections refused with 503: the maximum was open.",
                &self.refused_full,
            ),
            (
                "trazor_collector_feed_unauthenticated_total",
                "counter",
                "Feed and dashboard requests refused for a missing or wrong token or session.",
                &self.unauthenticated,
            ),
            (
                "trazor_collector_feed_auth_throttled_total",
                "counter",
                "Feed and dashboard requests answered 429: too many wrong feed tokens lately.",
                &self.auth_throttled,
            ),
            (
                "trazor_collector_feed_subscriptions_total",
                "counter",
                "Subscriptions accepted (at connect and by subscribe messages).",
                &self.subscriptions,
            ),
            (
                "trazor_collector_feed_error_frames_total",
                "counter",
                "Error frames sent for bad subscriptions (bad JSON, unknown filter or type, bad value).",
                &self.error_frames,
            ),
            (
                "trazor_collector_feed_closed_bad_input_total",
                "counter",
                "Feed connections closed for a binary frame (1003), invalid UTF-8 (1007), an oversized frame (1009) or a bad query (1008).",
                &self.closed_bad_input,
            ),
            (
                "trazor_collector_feed_closed_rate_limited_total",
                "counter",
                "Feed connections closed for sending messages faster than the limit (1008).",
                &self.closed_rate_limited,
            ),
            (
                "trazor_collector_feed_closed_heartbeat_total",
                "counter",
                "Feed connections closed because the peer stayed silent past the heartbeat bound.",
                &self.closed_heartbeat,
            ),
            (
                "trazor_collector_feed_frames_sent_total",
                "counter",
                "Frames written to feed connections (items and control frames).",
                &self.frames_sent,
            ),
        ];
        for (name, kind, help, value) in metrics {
            let _ = writeln!(text, "# HELP {name} {help}");
            let _ = writeln!(text, "# TYPE {name} {kind}");
            let _ = writeln!(text, "{name} {}", value.load(Ordering::Relaxed));
        }
    }
}

/// One published item: an agent's window or a merged aggregate. Its frames are written
/// the first time a subscriber needs them, once per encoding, then shared.
#[derive(Debug)]
pub struct FeedItem {
    /// Publish order; a subscription's replay ends at a sequence and its live items start
    /// after it, so none is sent twice or skipped.
    sequence: u64,
    content: ItemContent,
    json: OnceLock<Utf8Bytes>,
    protobuf: OnceLock<Bytes>,
}

// Items live behind an `Arc`, one per publish: the variants' size difference costs
// nothing, while boxing the window would cost an allocation per window on ingest.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum ItemContent {
    Window {
        agent_id: Arc<str>,
        boot_id: Arc<str>,
        window: LatencyWindow,
        late: bool,
    },
    Aggregate(Box<Aggregate>),
}

impl FeedItem {
    pub fn is_window(&self) -> bool {
        matches!(self.content, ItemContent::Window { .. })
    }

    /// Unix ms at which the item's window ends (for `since`).
    fn end_unix_ms(&self) -> u64 {
        match &self.content {
            ItemContent::Window { window, .. } => window.end_unix_nanos / 1_000_000,
            ItemContent::Aggregate(aggregate) => aggregate.end_unix_nanos / 1_000_000,
        }
    }

    /// The item's value for a filter key, read in place; `None` when it has none (or it
    /// is empty: an empty route is "not captured", not a route).
    pub fn attribute(&self, key: FilterKey) -> Option<&str> {
        match &self.content {
            ItemContent::Window { window, .. } => {
                let source = window.source.as_ref();
                let pod = source.and_then(|source| source.pod.as_ref());
                match key {
                    FilterKey::Namespace => pod.and_then(|pod| non_empty(&pod.namespace)),
                    FilterKey::Workload => pod.and_then(|pod| non_empty(&pod.workload_name)),
                    FilterKey::Pod => pod.and_then(|pod| non_empty(&pod.name)),
                    FilterKey::Node => source.and_then(|source| non_empty(&source.node_name)),
                    FilterKey::Profile => non_empty(&window.profile),
                    FilterKey::Direction => Some(crate::view::direction_name(window.direction)),
                    FilterKey::Route => non_empty(&window.route),
                    FilterKey::Method => non_empty(&window.method),
                    FilterKey::Process => source.and_then(|source| non_empty(&source.process_name)),
                }
            }
            ItemContent::Aggregate(aggregate) => {
                use crate::merge::Subject;
                match (key, &aggregate.subject) {
                    (
                        FilterKey::Namespace,
                        Subject::Workload { namespace, .. } | Subject::Pod { namespace, .. },
                    ) => non_empty(namespace),
                    (FilterKey::Workload, Subject::Workload { workload_name, .. }) => {
                        non_empty(workload_name)
                    }
                    (FilterKey::Pod, Subject::Pod { name, .. })
                    | (FilterKey::Process, Subject::Process { name }) => non_empty(name),
                    (FilterKey::Profile, _) => non_empty(&aggregate.profile),
                    (FilterKey::Direction, _) => {
                        Some(crate::view::direction_name(aggregate.direction))
                    }
                    (FilterKey::Route, _) => non_empty(&aggregate.route),
                    (FilterKey::Method, _) => non_empty(&aggregate.method),
                    _ => None,
                }
            }
        }
    }

    /// The item as a JSON text frame's payload.
    pub fn json(&self) -> Utf8Bytes {
        self.json
            .get_or_init(|| match &self.content {
                ItemContent::Window {
                    agent_id,
                    boot_id,
                    window,
                    late,
                } => frame::window_json(agent_id, boot_id, window, *late),
                ItemContent::Aggregate(aggregate) => frame::aggregate_json(aggregate),
            })
            .clone()
    }

    /// The item as a binary frame's payload (`trazor.v1.FeedFrame`).
    pub fn protobuf(&self) -> Bytes {
        self.protobuf
            .get_or_init(|| match &self.content {
                ItemContent::Window {
                    agent_id,
                    boot_id,
                    window,
                    late,
                } => frame::window_protobuf(agent_id, boot_id, window, *late),
                ItemContent::Aggregate(aggregate) => frame::aggregate_protobuf(aggregate),
            })
            .clone()
    }
}

fn non_empty(value: &str) -> Option<&str> {
    (!value.is_empty()).then_some(value)
}

#[derive(Debug)]
struct History {
    items: VecDeque<Arc<FeedItem>>,
    next_sequence: u64,
}

#[derive(Debug)]
pub struct WindowFeed {
    live: broadcast::Sender<Arc<FeedItem>>,
    history: Mutex<History>,
    config: FeedConfig,
    auth: Arc<ViewerAuth>,
    open_connections: AtomicUsize,
    stats: Arc<CollectorStats>,
    feed_stats: FeedStats,
}

impl WindowFeed {
    pub fn new(config: FeedConfig, auth: Arc<ViewerAuth>, stats: Arc<CollectorStats>) -> Self {
        Self {
            live: broadcast::channel(FANOUT_RING).0,
            history: Mutex::new(History {
                items: VecDeque::with_capacity(config.history.min(65_536)),
                next_sequence: 1,
            }),
            config,
            auth,
            open_connections: AtomicUsize::new(0),
            stats,
            feed_stats: FeedStats::default(),
        }
    }

    pub fn auth(&self) -> &Arc<ViewerAuth> {
        &self.auth
    }

    pub fn feed_stats(&self) -> &FeedStats {
        &self.feed_stats
    }

    /// The feed's counters in the Prometheus text format (appended to `/metrics`).
    pub fn render_metrics(&self) -> String {
        let mut text = String::new();
        self.feed_stats.render(&mut text);
        text
    }

    /// Publishes a window received from `agent_id`; `late` when it missed its aggregate.
    pub fn publish_window(
        &self,
        agent_id: &Arc<str>,
        boot_id: &Arc<str>,
        window: LatencyWindow,
        late: bool,
    ) {
        self.publish(ItemContent::Window {
            agent_id: agent_id.clone(),
            boot_id: boot_id.clone(),
            window,
            late,
        });
    }

    /// Publishes a closed aggregate.
    pub fn publish_aggregate(&self, aggregate: Aggregate) {
        self.publish(ItemContent::Aggregate(Box::new(aggregate)));
    }

    fn publish(&self, content: ItemContent) {
        {
            let mut history = self
                .history
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let item = Arc::new(FeedItem {
                sequence: history.next_sequence,
                content,
                json: OnceLock::new(),
                protobuf: OnceLock::new(),
            });
            history.next_sequence += 1;
            if self.config.history > 0 {
                if history.items.len() >= self.config.history {
                    history.items.pop_front();
                }
                history.items.push_back(item.clone());
            }
            // Sent under the lock, so a snapshot taken under it splits the items exactly:
            // those in it, and those after its last sequence.
            let _ = self.live.send(item);
        }
        self.stats.windows_published.fetch_add(1, Ordering::Relaxed);
    }

    /// A receiver of live items, and the sequence of the last published item.
    fn listen(&self) -> (broadcast::Receiver<Arc<FeedItem>>, u64) {
        let history = self
            .history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (self.live.subscribe(), history.next_sequence - 1)
    }

    /// The kept items `subscription` matches, as `replay` asks (oldest first), and the
    /// sequence of the last item published before the snapshot.
    ///
    /// Only the snapshot (reference counts) is taken under the history lock, which
    /// publishing also takes; the filter runs after, so a thousand clients subscribing at
    /// once (after a collector restart) delay ingest by well under a millisecond each
    /// (reference counts of `--history` items), not by a filter scan each.
    fn replay(&self, subscription: &Subscription, replay: Replay) -> (Vec<Arc<FeedItem>>, u64) {
        let (kept, last_sequence): (Vec<Arc<FeedItem>>, u64) = {
            let history = self
                .history
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let kept = match replay {
                Replay::Nothing | Replay::Last(0) => Vec::new(),
                _ => history.items.iter().cloned().collect(),
            };
            (kept, history.next_sequence - 1)
        };
        let mut items: Vec<_> = match replay {
            Replay::Nothing | Replay::Last(0) => Vec::new(),
            Replay::All => kept
                .into_iter()
                .filter(|item| subscription.matches(item))
                .collect(),
            Replay::Last(last) => {
                // From the newest back, so a narrow "last 100" stops early.
                let mut newest_first: Vec<_> = kept
                    .into_iter()
                    .rev()
                    .filter(|item| subscription.matches(item))
                    .take(last)
                    .collect();
                newest_first.reverse();
                newest_first
            }
            Replay::Since(since) => kept
                .into_iter()
                .filter(|item| item.end_unix_ms() >= since && subscription.matches(item))
                .collect(),
        };
        items.shrink_to_fit();
        (items, last_sequence)
    }
}

/// `GET /ws`: checks the token (401), the connection limit (503), then upgrades; the query
/// is checked after the upgrade so that browsers can read what was wrong.
pub async fn websocket(
    State(feed): State<Arc<WindowFeed>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if let Some(refusal) = feed.auth.refuse_websocket(&headers) {
        let counter = if refusal.status() == http::StatusCode::TOO_MANY_REQUESTS {
            &feed.feed_stats.auth_throttled
        } else {
            &feed.feed_stats.unauthenticated
        };
        counter.fetch_add(1, Ordering::Relaxed);
        return refusal;
    }
    let Some(slot) = ConnectionSlot::claim(&feed) else {
        feed.feed_stats.refused_full.fetch_add(1, Ordering::Relaxed);
        let mut response = (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the feed has its maximum of {} connections open; retry later\n",
                feed.config.max_connections
            ),
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return response;
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let request = subscription::parse_query(query.as_deref().unwrap_or_default());
    let max_frame = feed.config.max_frame_bytes;
    upgrade
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        // Clients send a few small control messages: no need for tungstenite's 128 KiB
        // read buffer per connection (a thousand subscribers would hold 128 MiB).
        .read_buffer_size(4 * 1024)
        // Frames queued together are written together (see `connection::write_frames`);
        // a small buffer keeps an idle connection small.
        .write_buffer_size(8 * 1024)
        .on_upgrade(move |socket| connection::serve(socket, feed, slot, request))
}

/// One of `max_connections`, held for the connection's life.
#[derive(Debug)]
struct ConnectionSlot {
    feed: Arc<WindowFeed>,
}

impl ConnectionSlot {
    fn claim(feed: &Arc<WindowFeed>) -> Option<Self> {
        let open = feed.open_connections.fetch_add(1, Ordering::AcqRel);
        if open >= feed.config.max_connections {
            feed.open_connections.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self { feed: feed.clone() })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.feed.open_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use trazor_proto::v1::{PodIdentity, Source};

    use super::{subscription::parse_query, *};

    fn window(namespace: &str, end_ms: u64) -> LatencyWindow {
        LatencyWindow {
            sequence: 1,
            source: Some(Source {
                node_name: "n1".into(),
                process_name: "app".into(),
                pod: (!namespace.is_empty()).then(|| PodIdentity {
                    namespace: namespace.into(),
                    name: format!("{namespace}-pod"),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            end_unix_nanos: end_ms * 1_000_000,
            ..Default::default()
        }
    }

    fn feed(history: usize) -> WindowFeed {
        WindowFeed::new(
            FeedConfig {
                history,
                ..Default::default()
            },
            Arc::new(ViewerAuth::new(None)),
            Arc::default(),
        )
    }

    fn namespaces(items: &[Arc<FeedItem>]) -> Vec<&str> {
        items
            .iter()
            .map(|item| item.attribute(FilterKey::Namespace).unwrap_or("-"))
            .collect()
    }

    #[test]
    fn history_is_bounded_and_replays_the_last_matching() {
        let feed = feed(4);
        let agent: Arc<str> = "a".into();
        for (namespace, end) in [("x", 1), ("shop", 2), ("x", 3), ("shop", 4), ("", 5)] {
            feed.publish_window(&agent, &agent, window(namespace, end), false);
        }
        let everything = Subscription::default();
        let (all, last) = feed.replay(&everything, Replay::All);
        assert_eq!(
            namespaces(&all),
            ["shop", "x", "shop", "-"],
            "oldest dropped"
        );
        assert_eq!(last, 5);
        let shop = parse_query("namespace=shop").unwrap().0.subscription;
        let (last_one, _) = feed.replay(&shop, Replay::Last(1));
        assert_eq!(last_one.len(), 1);
        assert_eq!(last_one[0].end_unix_ms(), 4);
        let (since, _) = feed.replay(&everything, Replay::Since(4));
        assert_eq!(since.len(), 2);
        // A window without pod identity matches only without pod-side filters.
        let (none, _) = feed.replay(&shop, Replay::All);
        assert!(
            none.iter()
                .all(|item| item.attribute(FilterKey::Namespace) == Some("shop"))
        );
        assert!(feed.replay(&everything, Replay::Nothing).0.is_empty());
    }
}
