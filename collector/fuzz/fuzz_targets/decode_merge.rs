//! Arbitrary bytes as an agent's message: decode as the collector does, validate, and merge
//! every decodable window (and each histogram with the previous one) as ingest does. Must
//! never panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use trazor_collector::{
    merge::{WindowMerger, validate},
    view::WindowView,
};
use trazor_proto::v1::{AgentMessage, ExponentialHistogram, agent_message};

fuzz_target!(|data: &[u8]| {
    let merger = WindowMerger::new(std::time::Duration::from_secs(30));
    let mut running = ExponentialHistogram::default();
    // The input may hold several messages: split it like a stream of frames.
    for chunk in data.split(|byte| *byte == 0xfe) {
        let Ok(message) = AgentMessage::decode(chunk) else {
            continue;
        };
        let Some(agent_message::Kind::Window(window)) = message.kind else {
            continue;
        };
        if let Some(histogram) = &window.histogram {
            let _ = running.merge(histogram);
            let _ = running.quantile(0.99);
            let _ = running.total();
        }
        let _ = serde_json::to_string(&WindowView::new("agent", "boot", &window));
        if validate(&window).is_ok() {
            let now = window.end_unix_nanos;
            merger.accept(&window, now);
            merger.accept(&window, now);
        }
    }
    for aggregate in merger.close_due(u64::MAX) {
        let _ = aggregate.view();
    }
});
