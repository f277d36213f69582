//! What one feed client asked for: a filter (nine keys, values OR'd within a key, keys AND'd),
//! a kind (windows, aggregates or both) and a replay (last N matching, since T, all, none),
//! read from the query string at connect or from a `subscribe` control message.
//!
//! Matching runs once per published item and subscriber (a thousand subscribers: a thousand
//! checks per window), so it reads the item's fields in place ([`FeedItem::attribute`])
//! and compares strings: no parsing, no allocation.

use serde::Serialize;
use serde_json::Value;

use super::FeedItem;

/// The filter keys, in the order frames list them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterKey {
    Namespace,
    Workload,
    Pod,
    Node,
    Profile,
    Direction,
    Route,
    Method,
    Process,
}

impl FilterKey {
    pub const ALL: [Self; 9] = [
        Self::Namespace,
        Self::Workload,
        Self::Pod,
        Self::Node,
        Self::Profile,
        Self::Direction,
        Self::Route,
        Self::Method,
        Self::Process,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Namespace => "namespace",
            Self::Workload => "workload",
            Self::Pod => "pod",
            Self::Node => "node",
            Self::Profile => "profile",
            Self::Direction => "direction",
            Self::Route => "route",
            Self::Method => "method",
            Self::Process => "process",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|key| key.name() == name)
    }
}

/// Values per filter key at most, and bytes per value: a filter is something a person
/// types or clicks, and every item is checked against it.
pub const MAX_VALUES_PER_KEY: usize = 64;
pub const MAX_VALUE_BYTES: usize = 256;

/// Allowed values per key; an empty list lets everything through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    values: [Vec<Box<str>>; 9],
}

impl Filter {
    pub fn values(&self, key: FilterKey) -> &[Box<str>] {
        &self.values[key as usize]
    }

    fn add(&mut self, key: FilterKey, value: &str) -> Result<(), SubscriptionError> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(SubscriptionError::bad_value(format!(
                "a `{}` value is {} bytes long; at most {MAX_VALUE_BYTES}",
                key.name(),
                value.len()
            )));
        }
        if key == FilterKey::Direction && value != "server" && value != "client" {
            return Err(SubscriptionError::bad_value(format!(
                "direction `{value}` is neither `server` nor `client`"
            )));
        }
        let values = &mut self.values[key as usize];
        if values.iter().any(|have| have.as_ref() == value) {
            return Ok(());
        }
        if values.len() >= MAX_VALUES_PER_KEY {
            return Err(SubscriptionError::bad_value(format!(
                "more than {MAX_VALUES_PER_KEY} values for `{}`",
                key.name()
            )));
        }
        values.push(value.into());
        Ok(())
    }

    /// Whether `item` passes: every key with values has the item's attribute among them.
    pub fn matches(&self, item: &FeedItem) -> bool {
        FilterKey::ALL.into_iter().all(|key| {
            let wanted = self.values(key);
            wanted.is_empty()
                || item
                    .attribute(key)
                    .is_some_and(|have| wanted.iter().any(|value| value.as_ref() == have))
        })
    }
}

impl Serialize for Filter {
    /// All nine keys, always: `[]` means any.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = serializer.serialize_map(Some(FilterKey::ALL.len()))?;
        for key in FilterKey::ALL {
            map.serialize_entry(key.name(), self.values(key))?;
        }
        map.end()
    }
}

/// Which items: agents' windows, merged aggregates, or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Kind {
    Windows,
    Aggregates,
    #[default]
    Both,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Windows => "windows",
            Self::Aggregates => "aggregates",
            Self::Both => "both",
        }
    }

    fn parse(value: &str) -> Result<Self, SubscriptionError> {
        match value {
            "windows" => Ok(Self::Windows),
            "aggregates" => Ok(Self::Aggregates),
            "both" => Ok(Self::Both),
            other => Err(SubscriptionError::bad_value(format!(
                "kind `{other}` is none of `windows`, `aggregates`, `both`"
            ))),
        }
    }
}

/// Which kept items to send before the live ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// Every kept matching item.
    All,
    /// The last N matching items.
    Last(usize),
    /// Matching items whose window ends at or after this Unix time (ms).
    Since(u64),
    /// Nothing (a `subscribe` message without `history`).
    Nothing,
}

/// The feed's frame encoding, chosen at connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Encoding {
    #[default]
    Json,
    Protobuf,
}

impl Encoding {
    pub fn name(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Protobuf => "protobuf",
        }
    }
}

/// A subscription in force: what passes, and which kinds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subscription {
    pub filter: Filter,
    pub kind: Kind,
}

impl Subscription {
    pub fn matches(&self, item: &FeedItem) -> bool {
        let kind_matches = match self.kind {
            Kind::Both => true,
            Kind::Windows => item.is_window(),
            Kind::Aggregates => !item.is_window(),
        };
        kind_matches && self.filter.matches(item)
    }
}

/// What a client asks for at connect (query) or later (`subscribe`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeRequest {
    pub subscription: Subscription,
    pub replay: Replay,
}

/// Why a subscription was refused; `code` is the `error` frame's code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionError {
    pub code: &'static str,
    pub message: String,
}

impl SubscriptionError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn bad_value(message: impl Into<String>) -> Self {
        Self::new("bad_value", message)
    }

    fn unknown_filter(key: &str) -> Self {
        let known: Vec<_> = FilterKey::ALL.iter().map(|key| key.name()).collect();
        Self::new(
            "unknown_filter",
            format!("unknown filter `{key}`; filters are {}", known.join(", ")),
        )
    }
}

fn parse_count(name: &str, value: &str) -> Result<u64, SubscriptionError> {
    value.parse::<u64>().map_err(|_| {
        SubscriptionError::bad_value(format!(
            "`{name}` must be a whole number ≥ 0, not `{value}`"
        ))
    })
}

/// Reads the query string of `GET /ws` (see FEED.md): filters, `kind`, `history`/`since`,
/// `encoding`. Repeated keys and comma-separated values both add values.
pub fn parse_query(query: &str) -> Result<(SubscribeRequest, Encoding), SubscriptionError> {
    let mut filter = Filter::default();
    let mut kind = Kind::Both;
    let mut encoding = Encoding::Json;
    let mut history = None;
    let mut since = None;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "kind" => kind = Kind::parse(&value)?,
            "history" => history = Some(parse_count("history", &value)?),
            "since" => since = Some(parse_count("since", &value)?),
            "encoding" => {
                encoding = match value.as_ref() {
                    "json" => Encoding::Json,
                    "protobuf" => Encoding::Protobuf,
                    other => {
                        return Err(SubscriptionError::bad_value(format!(
                            "encoding `{other}` is neither `json` nor `protobuf`"
                        )));
                    }
                }
            }
            other => {
                let key = FilterKey::from_name(other)
                    .ok_or_else(|| SubscriptionError::unknown_filter(other))?;
                for part in value.split(',').filter(|part| !part.is_empty()) {
                    filter.add(key, part)?;
                }
            }
        }
    }
    let replay = match (history, since) {
        (Some(_), Some(_)) => {
            return Err(SubscriptionError::bad_value(
                "`history` and `since` together; give one (last N items, or since a time)",
            ));
        }
        (Some(last), None) => Replay::Last(usize::try_from(last).unwrap_or(usize::MAX)),
        (None, Some(since)) => Replay::Since(since),
        (None, None) => Replay::All,
    };
    Ok((
        SubscribeRequest {
            subscription: Subscription { filter, kind },
            replay,
        },
        encoding,
    ))
}

/// Reads a client's control message: `{"type":"subscribe","filter":{..},"kind":..,"history":..}`.
pub fn parse_control(text: &str) -> Result<SubscribeRequest, SubscriptionError> {
    let value: Value = serde_json::from_str(text).map_err(|error| {
        SubscriptionError::new("bad_json", format!("the message is not JSON: {error}"))
    })?;
    let Value::Object(fields) = value else {
        return Err(SubscriptionError::new(
            "bad_json",
            "the message must be a JSON object, e.g. {\"type\":\"subscribe\",\"filter\":{}}",
        ));
    };
    match fields.get("type") {
        Some(Value::String(kind)) if kind == "subscribe" => {}
        Some(other) => {
            return Err(SubscriptionError::new(
                "unknown_type",
                format!("unknown message type {other}; the only one is \"subscribe\""),
            ));
        }
        None => {
            return Err(SubscriptionError::new(
                "unknown_type",
                "the message has no `type`; send {\"type\":\"subscribe\",...}",
            ));
        }
    }
    if let Some(unknown) = fields
        .keys()
        .find(|name| !matches!(name.as_str(), "type" | "filter" | "kind" | "history"))
    {
        return Err(SubscriptionError::new(
            "unknown_field",
            format!(
                "unknown field `{unknown}`; a subscribe message has type, filter, kind, history"
            ),
        ));
    }
    let mut filter = Filter::default();
    match fields.get("filter") {
        None | Some(Value::Null) => {}
        Some(Value::Object(keys)) => {
            for (name, values) in keys {
                let key = FilterKey::from_name(name)
                    .ok_or_else(|| SubscriptionError::unknown_filter(name))?;
                let Value::Array(values) = values else {
                    return Err(SubscriptionError::bad_value(format!(
                        "filter `{name}` must be an array of strings, not {values}"
                    )));
                };
                for value in values {
                    let Value::String(value) = value else {
                        return Err(SubscriptionError::bad_value(format!(
                            "filter `{name}` holds {value}, not a string"
                        )));
                    };
                    filter.add(key, value)?;
                }
            }
        }
        Some(other) => {
            return Err(SubscriptionError::bad_value(format!(
                "`filter` must be an object of arrays of strings, not {other}"
            )));
        }
    }
    let kind = match fields.get("kind") {
        None | Some(Value::Null) => Kind::Both,
        Some(Value::String(kind)) => Kind::parse(kind)?,
        Some(other) => {
            return Err(SubscriptionError::bad_value(format!(
                "`kind` must be a string, not {other}"
            )));
        }
    };
    let replay = match fields.get("history") {
        None | Some(Value::Null) => Replay::Nothing,
        Some(Value::Object(history)) => {
            let number = |name: &str| -> Result<Option<u64>, SubscriptionError> {
                match history.get(name) {
                    None => Ok(None),
                    Some(value) => value.as_u64().map(Some).ok_or_else(|| {
                        SubscriptionError::bad_value(format!(
                            "history `{name}` must be a whole number ≥ 0, not {value}"
                        ))
                    }),
                }
            };
            if let Some(unknown) = history
                .keys()
                .find(|name| !matches!(name.as_str(), "last" | "since_unix_ms"))
            {
                return Err(SubscriptionError::bad_value(format!(
                    "history has `{unknown}`; give {{\"last\":N}} or {{\"since_unix_ms\":T}}"
                )));
            }
            match (number("last")?, number("since_unix_ms")?) {
                (Some(last), None) => Replay::Last(usize::try_from(last).unwrap_or(usize::MAX)),
                (None, Some(since)) => Replay::Since(since),
                _ => {
                    return Err(SubscriptionError::bad_value(
                        "history needs exactly one of {\"last\":N} or {\"since_unix_ms\":T}",
                    ));
                }
            }
        }
        Some(other) => {
            return Err(SubscriptionError::bad_value(format!(
                "`history` must be an object, not {other}"
            )));
        }
    };
    Ok(SubscribeRequest {
        subscription: Subscription { filter, kind },
        replay,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_repeat_or_split_on_commas() {
        let (request, encoding) = parse_query(
            "namespace=shop&namespace=ops,dev&kind=aggregates&since=5&encoding=protobuf",
        )
        .unwrap();
        let names: Vec<_> = request
            .subscription
            .filter
            .values(FilterKey::Namespace)
            .iter()
            .map(|value| value.to_string())
            .collect();
        assert_eq!(names, ["shop", "ops", "dev"]);
        assert_eq!(request.subscription.kind, Kind::Aggregates);
        assert_eq!(request.replay, Replay::Since(5));
        assert_eq!(encoding, Encoding::Protobuf);
        assert_eq!(parse_query("").unwrap().0.replay, Replay::All);
    }

    #[test]
    fn bad_queries_say_what_is_wrong() {
        for (query, code) in [
            ("namspace=shop", "unknown_filter"),
            ("history=1&since=2", "bad_value"),
            ("history=-1", "bad_value"),
            ("kind=traces", "bad_value"),
            ("direction=sideways", "bad_value"),
            ("encoding=xml", "bad_value"),
        ] {
            assert_eq!(parse_query(query).unwrap_err().code, code, "{query}");
        }
        let long = format!("pod={}", "x".repeat(MAX_VALUE_BYTES + 1));
        assert_eq!(parse_query(&long).unwrap_err().code, "bad_value");
    }

    #[test]
    fn control_messages_and_their_errors() {
        let request = parse_control(
            r#"{"type":"subscribe","filter":{"method":["GET"]},"kind":"windows","history":{"last":3}}"#,
        )
        .unwrap();
        assert_eq!(request.replay, Replay::Last(3));
        assert_eq!(request.subscription.kind, Kind::Windows);
        assert_eq!(
            parse_control(r#"{"type":"subscribe"}"#).unwrap().replay,
            Replay::Nothing
        );
        for (text, code) in [
            ("{", "bad_json"),
            ("[1]", "bad_json"),
            (r#"{"type":"unsubscribe"}"#, "unknown_type"),
            (r#"{"filter":{}}"#, "unknown_type"),
            (r#"{"type":"subscribe","encoding":"json"}"#, "unknown_field"),
            (
                r#"{"type":"subscribe","filter":{"colour":["red"]}}"#,
                "unknown_filter",
            ),
            (r#"{"type":"subscribe","filter":{"pod":"a"}}"#, "bad_value"),
            (r#"{"type":"subscribe","filter":{"pod":[1]}}"#, "bad_value"),
            (
                r#"{"type":"subscribe","history":{"last":1,"since_unix_ms":2}}"#,
                "bad_value",
            ),
            (r#"{"type":"subscribe","history":{"last":-1}}"#, "bad_value"),
            (r#"{"type":"subscribe","kind":"all"}"#, "bad_value"),
        ] {
            assert_eq!(parse_control(text).unwrap_err().code, code, "{text}");
        }
    }
}
