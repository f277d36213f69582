//! Routes: the path a request went to, as a low-cardinality name.
//!
//! The kernel hashes each path with id-like segments folded (see `route_hash` in the common
//! crate) and tells us the path text when a connection first uses a route we have not
//! learnt (its announcement). Here the text gets the same folding (`/users/42` →
//! `/users/{id}`), then the profile's route templates (first match wins; `{name}` matches
//! one segment, a trailing `*` any rest). A per-source cap bounds the number of series;
//! beyond it requests go to the `other` route and are counted.

use std::collections::HashMap;

/// The route of requests whose path was not captured.
pub const UNKNOWN_ROUTE: &str = "";
/// The route of requests beyond a source's series cap.
pub const OVERFLOW_ROUTE: &str = "other";

/// A route template such as `/users/{id}/orders` or `/static/*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTemplate {
    text: String,
    segments: Vec<TemplateSegment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TemplateSegment {
    Literal(String),
    Parameter,
    Rest,
}

impl RouteTemplate {
    /// Parses a template; it must start with `/`, and `*` may only end it.
    pub fn parse(text: &str) -> Result<Self, String> {
        if !text.starts_with('/') {
            return Err(format!("route template {text:?} must start with '/'"));
        }
        let parts: Vec<&str> = text[1..].split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (index, part) in parts.iter().enumerate() {
            let segment = if *part == "*" {
                if index + 1 != parts.len() {
                    return Err(format!("route template {text:?}: '*' may only be last"));
                }
                TemplateSegment::Rest
            } else if part.starts_with('{') && part.ends_with('}') && part.len() > 2 {
                TemplateSegment::Parameter
            } else if part.contains(['{', '}', '*']) {
                return Err(format!(
                    "route template {text:?}: segment {part:?} mixes text and a parameter"
                ));
            } else {
                TemplateSegment::Literal((*part).to_owned())
            };
            segments.push(segment);
        }
        Ok(Self {
            text: text.to_owned(),
            segments,
        })
    }

    fn matches(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        for (index, segment) in self.segments.iter().enumerate() {
            match segment {
                TemplateSegment::Rest => return true,
                TemplateSegment::Parameter => {
                    if parts.get(index).is_none_or(|part| part.is_empty()) {
                        return false;
                    }
                }
                TemplateSegment::Literal(literal) => {
                    if parts.get(index) != Some(&literal.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.len() == self.segments.len()
    }
}

/// Folds id-like segments, exactly as the kernel's hash does, and drops the query.
pub fn normalize_path(raw: &[u8]) -> String {
    let end = raw
        .iter()
        .position(|byte| matches!(byte, b'?' | b'#' | b' ' | b'\r' | b'\n' | 0))
        .unwrap_or(raw.len());
    let text = String::from_utf8_lossy(&raw[..end]);
    text.split('/')
        .map(|segment| {
            let digits = !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit());
            let hexish =
                segment.len() >= 16 && segment.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
            if digits || hexish { "{id}" } else { segment }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Names routes and enforces the per-source series cap.
#[derive(Debug)]
pub struct RouteNamer {
    templates: Vec<RouteTemplate>,
    max_series_per_source: usize,
    /// Kernel route hash → (folded path, route name), learned from the kernel's
    /// announcements. The folded path is kept so that new templates can rename it: the
    /// kernel announces a route once, not every window.
    names: HashMap<u32, (String, String)>,
    /// Times `names` was emptied (it is bounded).
    forgotten: u64,
}

impl RouteNamer {
    pub fn new(templates: Vec<RouteTemplate>, max_series_per_source: usize) -> Self {
        Self {
            templates,
            max_series_per_source: max_series_per_source.max(1),
            names: HashMap::new(),
            forgotten: 0,
        }
    }

    /// Takes new templates and cap, keeping every route learnt (renamed by the new
    /// templates).
    pub fn reconfigure(&mut self, templates: Vec<RouteTemplate>, max_series_per_source: usize) {
        self.templates = templates;
        self.max_series_per_source = max_series_per_source.max(1);
        let mut names = std::mem::take(&mut self.names);
        for (path, name) in names.values_mut() {
            *name = self.name_of(path);
        }
        self.names = names;
    }

    fn name_of(&self, normalized: &str) -> String {
        self.templates
            .iter()
            .find(|template| template.matches(normalized))
            .map_or_else(|| normalized.to_owned(), |template| template.text.clone())
    }

    pub fn max_series_per_source(&self) -> usize {
        self.max_series_per_source
    }

    /// Records the path text a kernel route hash stands for.
    pub fn learn(&mut self, hash: u32, raw_path: &[u8]) {
        if hash == 0 || self.names.contains_key(&hash) {
            return;
        }
        // Bounded: hashes are ids of folded paths, but a scanner can still make many.
        if self.names.len() >= 100_000 {
            self.names.clear();
            self.forgotten += 1;
        }
        let normalized = normalize_path(raw_path);
        let name = self.name_of(&normalized);
        self.names.insert(hash, (normalized, name));
    }

    /// How many times the namer forgot every name (it is bounded): routes the kernel was
    /// told are known must then be announced again.
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// The route name of a kernel route hash ("" when unknown).
    pub fn name(&self, hash: u32) -> &str {
        self.names
            .get(&hash)
            .map_or(UNKNOWN_ROUTE, |(_, name)| name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_ids_like_the_kernel() {
        assert_eq!(
            normalize_path(b"/users/123/orders?x=1"),
            "/users/{id}/orders"
        );
        assert_eq!(
            normalize_path(b"/o/3f2b8c1e-1d2c-4b5a-9e8f-0123456789ab"),
            "/o/{id}"
        );
        assert_eq!(normalize_path(b"/v1/items HTTP/1.1"), "/v1/items");
        assert_eq!(normalize_path(b"/"), "/");
    }

    #[test]
    fn templates_match_segments_and_rest() {
        let user = RouteTemplate::parse("/users/{user}").unwrap();
        assert!(user.matches("/users/alice"));
        assert!(!user.matches("/users/alice/orders"));
        assert!(!user.matches("/users/"));
        let rest = RouteTemplate::parse("/static/*").unwrap();
        assert!(rest.matches("/static/css/site.css"));
        assert!(!rest.matches("/api/x"));
        assert!(RouteTemplate::parse("users").is_err());
        assert!(RouteTemplate::parse("/a/*/b").is_err());
        assert!(RouteTemplate::parse("/a/x{id}").is_err());
    }

    #[test]
    fn namer_prefers_templates_then_folded_paths() {
        let mut namer = RouteNamer::new(vec![RouteTemplate::parse("/users/{name}").unwrap()], 10);
        namer.learn(1, b"/users/alice");
        namer.learn(2, b"/items/42");
        assert_eq!(namer.name(1), "/users/{name}");
        assert_eq!(namer.name(2), "/items/{id}");
        assert_eq!(namer.name(3), UNKNOWN_ROUTE);

        // New templates rename what was learnt: the kernel does not announce it again.
        namer.reconfigure(vec![RouteTemplate::parse("/items/*").unwrap()], 10);
        assert_eq!(namer.name(1), "/users/alice");
        assert_eq!(namer.name(2), "/items/*");
    }
}
