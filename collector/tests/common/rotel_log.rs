//! Reads Rotel's detailed debug log. Rotel (PyPI `rotel`, installed by scripts/setup.sh) is
//! a third-party OpenTelemetry collector; with `--debug-log metrics --debug-log traces
//! --debug-log-verbosity detailed` it prints every resource it receives in the
//! OpenTelemetry Collector debug exporter's layout. Shared, std only, by the collector's
//! OTLP tests and the cluster suite (`e2e/tests/cluster/otlp.rs` includes this file).

/// One `ResourceMetrics` or `ResourceSpans` block as Rotel printed it.
#[derive(Clone, Debug, Default)]
pub struct ResourceBlock {
    /// "metrics" or "spans".
    pub signal: &'static str,
    /// Resource attributes, `key` → printed value (`Str(x)` → `x`).
    pub resource: Vec<(String, String)>,
    /// Metric names, or span names.
    pub names: Vec<String>,
    /// `(metric name, unit)` of each metric.
    pub units: Vec<(String, String)>,
    /// The `Count` of each histogram data point, in order.
    pub counts: Vec<u64>,
    /// The attributes of each histogram data point, in the same order as `counts`.
    pub point_attributes: Vec<Vec<(String, String)>>,
}

impl ResourceBlock {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.resource
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the log's lines (ANSI colours already stripped):
///
/// ```text
/// ResourceMetrics #0
/// Resource attributes:
///      -> k8s.pod.name: Str(p1)
/// ...
/// Descriptor:
///      -> Name: http.server.request.duration
///      -> Description: ...
///      -> Unit: s
///      -> DataType: ExponentialHistogram
/// ExponentialHistogramDataPoints #0
/// Count: 7
/// Bucket (1.11, 1.12], Count: 3
/// ResourceSpans #0
/// Resource attributes:
///      -> service.name: Str(checkout)
/// ...
///     Name           : GET /
/// ```
pub fn parse_debug_log(lines: &[String]) -> Vec<ResourceBlock> {
    let mut blocks: Vec<ResourceBlock> = Vec::new();
    let mut in_resource = false;
    let mut in_descriptor = false;
    let mut in_point_attributes = false;
    let mut point_attributes: Vec<(String, String)> = Vec::new();
    for line in lines {
        let trimmed = line.trim();
        if trimmed.starts_with("ResourceMetrics #") || trimmed.starts_with("ResourceSpans #") {
            blocks.push(ResourceBlock {
                signal: if trimmed.starts_with("ResourceMetrics") {
                    "metrics"
                } else {
                    "spans"
                },
                ..ResourceBlock::default()
            });
            in_resource = false;
            in_descriptor = false;
            continue;
        }
        let Some(block) = blocks.last_mut() else {
            continue;
        };
        if trimmed == "Resource attributes:" {
            in_resource = true;
            continue;
        }
        if trimmed == "Descriptor:" {
            in_descriptor = true;
            continue;
        }
        if trimmed.contains("DataPoints #") {
            point_attributes.clear();
            in_point_attributes = false;
            continue;
        }
        if trimmed == "Data point attributes:" {
            in_point_attributes = true;
            continue;
        }
        if let Some(entry) = trimmed.strip_prefix("-> ") {
            let Some((key, value)) = entry.split_once(": ") else {
                continue;
            };
            if in_resource {
                block.resource.push((key.to_owned(), printed_value(value)));
            } else if in_point_attributes {
                point_attributes.push((key.to_owned(), printed_value(value)));
            } else if in_descriptor && key == "Name" {
                block.names.push(value.to_owned());
            } else if in_descriptor && key == "Unit" {
                let name = block.names.last().cloned().unwrap_or_default();
                block.units.push((name, value.to_owned()));
            } else if in_descriptor && key == "DataType" {
                in_descriptor = false;
            }
            continue;
        }
        in_resource = false;
        in_point_attributes = false;
        if block.signal == "metrics"
            && let Some(count) = trimmed.strip_prefix("Count: ")
            && let Ok(count) = count.trim().parse()
        {
            block.counts.push(count);
            block.point_attributes.push(point_attributes.clone());
        }
        if block.signal == "spans"
            && let Some(name) = trimmed.strip_prefix("Name")
            && let Some((_, name)) = name.split_once(':')
        {
            block.names.push(name.trim().to_owned());
        }
    }
    blocks
}

/// `Str(x)` → `x`; `Int(3)` → `3`.
fn printed_value(value: &str) -> String {
    value
        .split_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or(value)
        .to_owned()
}

/// `line` without ANSI colour sequences (`ESC [ ... m`).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
