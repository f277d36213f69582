//! Frames the server sends, in both encodings: JSON text (the `WindowView`/`AggregateView`
//! documents and the `subscribed`/`error`/`missed` frames) and protobuf binary
//! (`trazor.v1.FeedFrame`). Items are encoded once each, on first use, and the bytes are
//! shared by every subscriber (see [`FeedItem`](super::FeedItem)).

use axum::extract::ws::{Message, Utf8Bytes};
use bytes::Bytes;
use prost::Message as _;
use serde::Serialize;
use trazor_proto::v1::{
    FeedAggregate, FeedError, FeedFilter, FeedFrame, FeedMissed, FeedSubscribed, FeedWindow,
    LatencyStats, LatencyWindow, PodSubject, ProcessSubject, Quantile, WorkloadSubject,
    feed_aggregate, feed_frame,
};

use super::subscription::{Encoding, Filter, FilterKey, Kind};
use crate::merge::{Aggregate, Subject};

/// A frame that is not an item: acknowledgement, error, missed count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlFrame {
    Subscribed {
        filter: Filter,
        kind: Kind,
        encoding: Encoding,
        replayed: u64,
    },
    Error {
        code: &'static str,
        message: String,
    },
    Missed {
        missed: u64,
        missed_total: u64,
    },
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ControlJson<'a> {
    Subscribed {
        filter: &'a Filter,
        kind: &'static str,
        encoding: &'static str,
        replayed: u64,
    },
    Error {
        code: &'static str,
        message: &'a str,
    },
    Missed {
        missed: u64,
        missed_total: u64,
    },
}

impl ControlFrame {
    pub fn message(&self, encoding: Encoding) -> Message {
        match encoding {
            Encoding::Json => {
                let json = match self {
                    Self::Subscribed {
                        filter,
                        kind,
                        encoding,
                        replayed,
                    } => ControlJson::Subscribed {
                        filter,
                        kind: kind.name(),
                        encoding: encoding.name(),
                        replayed: *replayed,
                    },
                    Self::Error { code, message } => ControlJson::Error { code, message },
                    Self::Missed {
                        missed,
                        missed_total,
                    } => ControlJson::Missed {
                        missed: *missed,
                        missed_total: *missed_total,
                    },
                };
                // Plain structs of strings and numbers: serialising cannot fail.
                Message::Text(serde_json::to_string(&json).unwrap_or_default().into())
            }
            Encoding::Protobuf => {
                let kind = match self {
                    Self::Subscribed {
                        filter,
                        kind,
                        encoding,
                        replayed,
                    } => feed_frame::Kind::Subscribed(FeedSubscribed {
                        filter: Some(filter_message(filter)),
                        kind: kind.name().into(),
                        encoding: encoding.name().into(),
                        replayed: *replayed,
                    }),
                    Self::Error { code, message } => feed_frame::Kind::Error(FeedError {
                        code: (*code).into(),
                        message: message.clone(),
                    }),
                    Self::Missed {
                        missed,
                        missed_total,
                    } => feed_frame::Kind::Missed(FeedMissed {
                        missed: *missed,
                        missed_total: *missed_total,
                    }),
                };
                Message::Binary(FeedFrame { kind: Some(kind) }.encode_to_vec().into())
            }
        }
    }
}

fn filter_message(filter: &Filter) -> FeedFilter {
    let values = |key| -> Vec<String> {
        filter
            .values(key)
            .iter()
            .map(|value| value.to_string())
            .collect()
    };
    FeedFilter {
        namespace: values(FilterKey::Namespace),
        workload: values(FilterKey::Workload),
        pod: values(FilterKey::Pod),
        node: values(FilterKey::Node),
        profile: values(FilterKey::Profile),
        direction: values(FilterKey::Direction),
        route: values(FilterKey::Route),
        method: values(FilterKey::Method),
        process: values(FilterKey::Process),
    }
}

/// A window's JSON document (`"type":"window"`).
pub fn window_json(agent_id: &str, boot_id: &str, window: &LatencyWindow, late: bool) -> Utf8Bytes {
    let mut view = crate::view::WindowView::new(agent_id, boot_id, window);
    view.late = late;
    json_text(&view)
}

/// An aggregate's JSON document (`"type":"aggregate"`).
pub fn aggregate_json(aggregate: &Aggregate) -> Utf8Bytes {
    json_text(&aggregate.view())
}

fn json_text(view: &impl Serialize) -> Utf8Bytes {
    match serde_json::to_string(view) {
        Ok(json) => json.into(),
        Err(error) => {
            // Views are strings and finite numbers; this is a broken invariant, logged
            // rather than a subscriber's connection lost.
            tracing::error!(%error, "could not encode a feed item as JSON");
            Utf8Bytes::from_static(
                r#"{"type":"error","code":"internal","message":"encoding failed"}"#,
            )
        }
    }
}

pub fn window_protobuf(agent_id: &str, boot_id: &str, window: &LatencyWindow, late: bool) -> Bytes {
    FeedFrame {
        kind: Some(feed_frame::Kind::Window(FeedWindow {
            agent_id: agent_id.into(),
            boot_id: boot_id.into(),
            late,
            window: Some(window.clone()),
        })),
    }
    .encode_to_vec()
    .into()
}

pub fn aggregate_protobuf(aggregate: &Aggregate) -> Bytes {
    let subject = match &aggregate.subject {
        Subject::Workload {
            namespace,
            workload_kind,
            workload_name,
        } => feed_aggregate::Subject::Workload(WorkloadSubject {
            namespace: namespace.clone(),
            workload_kind: workload_kind.clone(),
            workload_name: workload_name.clone(),
        }),
        Subject::Pod {
            namespace,
            name,
            uid,
        } => feed_aggregate::Subject::Pod(PodSubject {
            namespace: namespace.clone(),
            name: name.clone(),
            uid: uid.clone(),
        }),
        Subject::Process { name } => {
            feed_aggregate::Subject::Process(ProcessSubject { name: name.clone() })
        }
    };
    let min_nanos = if aggregate.count == 0 {
        0
    } else {
        aggregate.min_nanos
    };
    let quantiles = aggregate
        .quantiles
        .iter()
        .filter_map(|&quantile| {
            let value = aggregate.histogram.quantile(quantile)?;
            Some(Quantile {
                quantile,
                value_nanos: (value as u64).clamp(min_nanos, aggregate.max_nanos.max(min_nanos)),
            })
        })
        .collect();
    FeedFrame {
        kind: Some(feed_frame::Kind::Aggregate(FeedAggregate {
            subject: Some(subject),
            direction: aggregate.direction,
            profile: aggregate.profile.clone(),
            route: aggregate.route.clone(),
            method: aggregate.method.clone(),
            start_unix_nanos: aggregate.start_unix_nanos,
            end_unix_nanos: aggregate.end_unix_nanos,
            windows: aggregate.windows,
            stats: Some(LatencyStats {
                count: aggregate.count,
                error_count: aggregate.error_count,
                sum_nanos: aggregate.sum_nanos,
                min_nanos,
                max_nanos: aggregate.max_nanos,
                quantiles,
            }),
            status_class_counts: aggregate.status_class_counts.clone(),
            histogram: Some(aggregate.histogram.clone()),
            peer: aggregate.peer.clone(),
        })),
    }
    .encode_to_vec()
    .into()
}
