//! The live feed: every published window, as JSON, to every WebSocket subscriber.
//!
//! A subscriber first gets the recent history (bounded), then live windows. Each subscriber
//! has a bounded queue; one that falls behind misses windows, is told how many in a
//! `{"type":"lagged","missed":N}` message, and the count is exported. It never slows the
//! ingest path or other subscribers.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, OnceLock, atomic::Ordering},
};

use axum::{
    extract::{
        Query, State,
        ws::{Message, WebSocket, WebSocketUpgrade},
    },
    response::Response,
};
use serde::Deserialize;
use tokio::sync::broadcast;
use trazor_proto::v1::LatencyWindow;

use crate::{stats::CollectorStats, view::WindowView};

/// One feed document. A window's JSON is written the first time someone reads it (a
/// subscriber, or the history replay), so ingest does not pay for JSON nobody reads.
#[derive(Debug)]
pub struct FeedItem {
    json: OnceLock<Arc<str>>,
    window: Option<PendingWindow>,
}

#[derive(Debug)]
struct PendingWindow {
    agent_id: Arc<str>,
    boot_id: Arc<str>,
    window: LatencyWindow,
    late: bool,
}

impl FeedItem {
    /// The document's JSON text.
    pub fn json(&self) -> Arc<str> {
        self.json
            .get_or_init(|| {
                let Some(pending) = &self.window else {
                    return Arc::from("{}");
                };
                let mut view =
                    WindowView::new(&pending.agent_id, &pending.boot_id, &pending.window);
                view.late = pending.late;
                match serde_json::to_string(&view) {
                    Ok(json) => json.into(),
                    Err(error) => {
                        tracing::error!(%error, "could not encode a window as JSON");
                        Arc::from(r#"{"type":"error"}"#)
                    }
                }
            })
            .clone()
    }
}

/// Windows queued per subscriber before it starts missing some.
const SUBSCRIBER_QUEUE: usize = 4_096;

#[derive(Debug)]
pub struct WindowFeed {
    live: broadcast::Sender<Arc<FeedItem>>,
    history: Mutex<VecDeque<Arc<FeedItem>>>,
    history_capacity: usize,
    stats: Arc<CollectorStats>,
}

impl WindowFeed {
    pub fn new(history_capacity: usize, stats: Arc<CollectorStats>) -> Self {
        Self {
            live: broadcast::channel(SUBSCRIBER_QUEUE).0,
            history: Mutex::new(VecDeque::with_capacity(history_capacity.min(65_536))),
            history_capacity,
            stats,
        }
    }

    /// Publishes one JSON document to history and every subscriber.
    pub fn publish(&self, json: String) {
        self.publish_item(FeedItem {
            json: OnceLock::from(Arc::from(json)),
            window: None,
        });
    }

    /// Publishes a window received from `agent_id`; `late` when it missed its aggregate.
    pub fn publish_window(
        &self,
        agent_id: &Arc<str>,
        boot_id: &Arc<str>,
        window: LatencyWindow,
        late: bool,
    ) {
        self.publish_item(FeedItem {
            json: OnceLock::new(),
            window: Some(PendingWindow {
                agent_id: agent_id.clone(),
                boot_id: boot_id.clone(),
                window,
                late,
            }),
        });
    }

    fn publish_item(&self, item: FeedItem) {
        let json = Arc::new(item);
        {
            let mut history = self
                .history
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if self.history_capacity > 0 {
                if history.len() >= self.history_capacity {
                    history.pop_front();
                }
                history.push_back(json.clone());
            }
            // Sent under the lock, so a new subscriber sees each window exactly once:
            // either in its history snapshot or live, never both, never neither.
            let _ = self.live.send(json);
        }
        self.stats.windows_published.fetch_add(1, Ordering::Relaxed);
    }

    fn subscribe(
        &self,
        history_limit: usize,
    ) -> (Vec<Arc<FeedItem>>, broadcast::Receiver<Arc<FeedItem>>) {
        let history = self
            .history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let skip = history.len().saturating_sub(history_limit);
        let snapshot = history.iter().skip(skip).cloned().collect();
        (snapshot, self.live.subscribe())
    }
}

#[derive(Debug, Deserialize)]
pub struct SubscribeParams {
    /// How many past windows to send first (default: all kept).
    history: Option<usize>,
}

pub async fn websocket(
    upgrade: WebSocketUpgrade,
    Query(params): Query<SubscribeParams>,
    State(feed): State<Arc<WindowFeed>>,
) -> Response {
    upgrade.on_upgrade(move |socket| serve_subscriber(socket, feed, params))
}

async fn serve_subscriber(mut socket: WebSocket, feed: Arc<WindowFeed>, params: SubscribeParams) {
    let stats = feed.stats.clone();
    stats.feed_subscribers.fetch_add(1, Ordering::Relaxed);
    let (history, mut live) = feed.subscribe(params.history.unwrap_or(usize::MAX));
    let result: Result<(), axum::Error> = async {
        for item in history {
            socket.send(Message::text(item.json().as_ref())).await?;
        }
        loop {
            tokio::select! {
                received = live.recv() => match received {
                    Ok(item) => socket.send(Message::text(item.json().as_ref())).await?,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        stats.feed_dropped.fetch_add(missed, Ordering::Relaxed);
                        let notice = format!(r#"{{"type":"lagged","missed":{missed}}}"#);
                        socket.send(Message::text(notice)).await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                incoming = socket.recv() => match incoming {
                    // Subscribers only listen; anything but a close is ignored.
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ok(()),
                    Some(Ok(_)) => {}
                },
            }
        }
    }
    .await;
    if let Err(error) = result {
        tracing::debug!(%error, "feed subscriber went away");
    }
    stats.feed_subscribers.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_and_newest_last() {
        let feed = WindowFeed::new(2, Arc::default());
        for n in 0..3 {
            feed.publish(format!("{n}"));
        }
        let (history, _) = feed.subscribe(usize::MAX);
        assert_eq!(
            history
                .iter()
                .map(|s| s.json().to_string())
                .collect::<Vec<_>>(),
            ["1", "2"]
        );
        let (limited, _) = feed.subscribe(1);
        assert_eq!(limited.len(), 1);
        assert_eq!(limited[0].json().as_ref(), "2");
    }
}
