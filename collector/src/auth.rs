//! Auth: agents present `authorization: Bearer <token>` on their stream; the collector
//! compares it, in constant time, with the token it was given.
//!
//! In a cluster the token comes from a Kubernetes Secret mounted as a file
//! (`--token-file`); locally it can come from the `TRAZOR_TOKEN` environment variable.
//! Without a token the collector accepts every stream (and says so at start).
//!
//! [`ServerTls`] adds TLS to the gRPC port, and mutual TLS when given a client CA.
//!
//! [`ViewerAuth`] guards the live feed (`/ws`) and the dashboard (`/`) with a separate
//! token (`--feed-token-file` or `TRAZOR_FEED_TOKEN`): people who watch do not hold the
//! agents' write credential. Programs send it as a bearer header; browsers post it once to
//! `/login` and get an HttpOnly session cookie, so it never appears in a URL or a log.
//! Guessing is throttled: after a burst of [`FAILED_AUTH_BURST`] wrong tokens (at `/login`
//! or as a bearer), one guess per second is answered and the rest get 429 with
//! `Retry-After`, without the token being looked at.

use std::{
    path::Path,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use tonic::{Request, Status, service::Interceptor};

use crate::{Error, Result, stats::CollectorStats};

/// TLS for the gRPC port: the collector's certificate and key (PEM), and with
/// `client_ca_pem` mutual TLS: only agents with a certificate signed by that CA connect.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        formatter
            .debug_struct("ServerTls")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads the PEM files named by the flags.
    pub fn from_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| Error::TokenFile {
                path: path.to_owned(),
                source,
            })
        };
        Ok(Self {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: client_ca.map(read).transpose()?,
        })
    }

    pub(crate) fn server_config(&self) -> tonic::transport::ServerTlsConfig {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let config =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        match &self.client_ca_pem {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }
}

/// Token reading is shared with the other side of the stream.
pub use trazor_proto::auth::{TOKEN_ENV, load_token};
use trazor_proto::auth::{TokenError, load_secret};

/// Equal-length comparison that takes the same time wherever the first difference is.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The gRPC interceptor: refuses streams whose bearer token does not match.
#[derive(Clone)]
pub struct BearerAuth {
    expected: Option<Arc<[u8]>>,
    stats: Arc<CollectorStats>,
}

impl BearerAuth {
    pub fn new(token: Option<&str>, stats: Arc<CollectorStats>) -> Self {
        Self {
            expected: token.map(|token| Arc::from(token.as_bytes())),
            stats,
        }
    }

    fn refuse(&self, request: &Request<()>, reason: &str) -> Status {
        self.stats
            .streams_unauthenticated
            .fetch_add(1, Ordering::Relaxed);
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |address| address.to_string());
        tracing::warn!(%peer, "refused an agent stream: {reason}");
        Status::unauthenticated(reason)
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let Some(header) = request.metadata().get("authorization") else {
            return Err(self.refuse(
                &request,
                "missing `authorization: Bearer <token>` metadata; give the agent the \
                 collector's token (--token-file or TRAZOR_TOKEN)",
            ));
        };
        let presented = header
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .unwrap_or_default();
        if constant_time_eq(presented, expected) {
            Ok(request)
        } else {
            Err(self.refuse(
                &request,
                "the bearer token does not match the collector's; check that agent and \
                 collector read the same Secret",
            ))
        }
    }
}

/// Name of the dashboard's session cookie.
pub const SESSION_COOKIE: &str = "trazor_session";
/// Environment variable holding the feed's token (`--feed-token-file` wins).
pub const FEED_TOKEN_ENV: &str = "TRAZOR_FEED_TOKEN";
/// How long a browser session lasts.
pub const SESSION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(12 * 3600);
/// Wrong feed tokens answered in a burst; after it, one per [`FAILED_AUTH_REFILL`].
pub const FAILED_AUTH_BURST: f64 = 20.0;
pub const FAILED_AUTH_REFILL: Duration = Duration::from_secs(1);

/// A token bucket of wrong-token answers, shared by every client: guessing the feed token
/// gets one answer per second after a burst, however many connections ask. (One bucket for
/// all, not one per address: behind a port-forward or a proxy every client has the same
/// address.) While it is empty, holders of the right token wait too; sessions already made
/// and bearer-less page loads are not affected.
#[derive(Debug)]
struct FailureThrottle {
    bucket: Mutex<(f64, Instant)>,
}

impl FailureThrottle {
    fn new() -> Self {
        Self {
            bucket: Mutex::new((FAILED_AUTH_BURST, Instant::now())),
        }
    }

    /// `Err(how long until a guess is answered)` while the bucket is empty.
    fn check(&self, now: Instant) -> std::result::Result<(), Duration> {
        let mut bucket = self
            .bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (tokens, last) = &mut *bucket;
        let refilled =
            now.saturating_duration_since(*last).as_secs_f64() / FAILED_AUTH_REFILL.as_secs_f64();
        *tokens = (*tokens + refilled).min(FAILED_AUTH_BURST);
        *last = now;
        if *tokens >= 1.0 {
            Ok(())
        } else {
            Err(FAILED_AUTH_REFILL.mul_f64(1.0 - *tokens))
        }
    }

    /// A wrong token was presented.
    fn record_failure(&self) {
        let mut bucket = self
            .bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        bucket.0 = (bucket.0 - 1.0).max(0.0);
    }
}

/// What a request's credentials give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Allowed,
    Refused,
    /// Too many wrong tokens lately: try again after this long.
    Throttled(Duration),
}

/// Whole seconds for `Retry-After` (at least 1).
fn retry_after_seconds(retry_after: Duration) -> u64 {
    retry_after.as_secs_f64().ceil().max(1.0) as u64
}

/// The 429 for a throttled guess.
pub fn throttled(retry_after: Duration) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let seconds = retry_after_seconds(retry_after);
    (
        http::StatusCode::TOO_MANY_REQUESTS,
        [(http::header::RETRY_AFTER, seconds.to_string())],
        format!("too many wrong feed tokens lately: try again in {seconds} s\n"),
    )
        .into_response()
}

/// Who may read the live feed and the dashboard: holders of the feed token (bearer header)
/// or of a session cookie made from it. `None`: everyone (the collector warns at start).
///
/// A session cookie is `<expiry unix s>.<hex HMAC-SHA256(token, "trazor-session-v1.<expiry>")>`:
/// no state on the server, so sessions survive a collector restart and all end when the
/// token changes.
pub struct ViewerAuth {
    token: Option<Arc<[u8]>>,
    session_key: Option<ring::hmac::Key>,
    failures: FailureThrottle,
}

impl std::fmt::Debug for ViewerAuth {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        formatter
            .debug_struct("ViewerAuth")
            .field("open", &self.token.is_none())
            .finish_non_exhaustive()
    }
}

impl ViewerAuth {
    pub fn new(token: Option<&str>) -> Self {
        Self {
            token: token.map(|token| Arc::from(token.as_bytes())),
            session_key: token
                .map(|token| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes())),
            failures: FailureThrottle::new(),
        }
    }

    /// No token: the feed and dashboard are open.
    pub fn is_open(&self) -> bool {
        self.token.is_none()
    }

    /// The bearer token's verdict: `Refused` also when none was sent (no guess, nothing
    /// counted); a wrong one counts toward the throttle, and none is looked at while it is
    /// on.
    fn bearer(&self, headers: &http::HeaderMap) -> Access {
        let Some(expected) = &self.token else {
            return Access::Allowed;
        };
        let mut presented = headers
            .get_all(http::header::AUTHORIZATION)
            .iter()
            .filter_map(|value| value.as_bytes().strip_prefix(b"Bearer "))
            .peekable();
        if presented.peek().is_none() {
            return Access::Refused;
        }
        if let Err(retry_after) = self.failures.check(Instant::now()) {
            return Access::Throttled(retry_after);
        }
        if presented.any(|token| constant_time_eq(token, expected)) {
            Access::Allowed
        } else {
            self.failures.record_failure();
            Access::Refused
        }
    }

    fn session_ok(&self, headers: &http::HeaderMap) -> bool {
        let Some(key) = &self.session_key else {
            return true;
        };
        let now = unix_seconds();
        session_cookies(headers).any(|value| {
            let Some((expiry, mac)) = value.split_once('.') else {
                return false;
            };
            let (Ok(expiry_secs), Some(mac)) = (expiry.parse::<u64>(), decode_hex(mac)) else {
                return false;
            };
            expiry_secs > now
                && ring::hmac::verify(key, session_message(expiry).as_bytes(), &mac).is_ok()
        })
    }

    /// Whether this request may see the dashboard (session cookie or bearer header).
    pub fn access(&self, headers: &http::HeaderMap) -> Access {
        if self.is_open() || self.session_ok(headers) {
            return Access::Allowed;
        }
        self.bearer(headers)
    }

    /// Checks a `/ws` upgrade; the refusal to send, if any: 401 without a valid token or
    /// session; 403 for a session cookie sent by a page of another origin (cross-site
    /// WebSocket hijacking: the browser attaches cookies whoever opens the socket).
    pub fn refuse_websocket(&self, headers: &http::HeaderMap) -> Option<axum::response::Response> {
        use axum::response::IntoResponse as _;
        if self.is_open() {
            return None;
        }
        match self.bearer(headers) {
            Access::Allowed => return None,
            Access::Throttled(retry_after) => return Some(throttled(retry_after)),
            Access::Refused => {}
        }
        if !self.session_ok(headers) {
            return Some(unauthorized(
                "a feed token is required: send `Authorization: Bearer <token>`, or log in at / (session cookie)\n",
            ));
        }
        let host = headers
            .get(http::header::HOST)
            .and_then(|host| host.to_str().ok());
        let origin_host = headers
            .get(http::header::ORIGIN)
            .and_then(|origin| origin.to_str().ok())
            .map(|origin| origin.split_once("://").map_or(origin, |(_, rest)| rest));
        match (origin_host, host) {
            (Some(origin), Some(host)) if !origin.eq_ignore_ascii_case(host) => Some(
                (
                    http::StatusCode::FORBIDDEN,
                    "a session cookie from a page of another origin; open the feed from the collector's own dashboard\n",
                )
                    .into_response(),
            ),
            _ => None,
        }
    }

    /// The session cookie for a browser that presented the right token; `Secure` when the
    /// page came over HTTPS (a TLS-terminating ingress or proxy in front of the collector,
    /// which says so in `X-Forwarded-Proto`), so that the browser never sends it in clear.
    fn session_cookie(&self, secure: bool) -> Option<String> {
        let key = self.session_key.as_ref()?;
        let expiry = (unix_seconds() + SESSION_LIFETIME.as_secs()).to_string();
        let tag = ring::hmac::sign(key, session_message(&expiry).as_bytes());
        let hex: String = tag
            .as_ref()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        Some(format!(
            "{SESSION_COOKIE}={expiry}.{hex}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
            SESSION_LIFETIME.as_secs(),
            if secure { "; Secure" } else { "" }
        ))
    }

    /// Whether `token` is the feed token (constant time).
    fn token_matches(&self, token: &str) -> bool {
        self.token
            .as_ref()
            .is_some_and(|expected| constant_time_eq(token.as_bytes(), expected))
    }
}

/// Reads the feed token from `file` (trimmed), else from `TRAZOR_FEED_TOKEN`; `None` when
/// neither is set. An empty token is an error, never an open feed by accident.
pub fn load_feed_token(file: Option<&Path>) -> Result<Option<String>> {
    load_secret(file, FEED_TOKEN_ENV).map_err(|error| match error {
        TokenError::File { path, source } => Error::TokenFile { path, source },
        TokenError::Empty { env } => Error::Config(format!(
            "the feed token is empty; put it in --feed-token-file (or {env}), or set neither \
             for an open feed"
        )),
    })
}

fn session_message(expiry: &str) -> String {
    format!("trazor-session-v1.{expiry}")
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

fn session_cookies(headers: &http::HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == SESSION_COOKIE).then_some(value)
        })
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

fn unauthorized(message: &'static str) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    (
        http::StatusCode::UNAUTHORIZED,
        [(http::header::WWW_AUTHENTICATE, "Bearer")],
        message,
    )
        .into_response()
}

/// The login page: a form that posts the token to `/login` (never in a URL).
pub fn login_page(status: http::StatusCode, notice: &str) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let page = format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Trazor: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:15px system-ui,sans-serif;margin:4rem auto;max-width:24rem;color:#222}}
input,button{{font:inherit;padding:.4rem;margin:.3rem 0;width:100%;box-sizing:border-box}}
.notice{{color:#b00}}</style></head>
<body><h1>Trazor</h1><p>This collector's live feed needs its feed token.</p>
<p class="notice" id="notice">{notice}</p>
<form method="post" action="/login"><label for="token">Feed token</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus required>
<button type="submit">Log in</button></form></body></html>
"#
    );
    (
        status,
        [(http::header::CACHE_CONTROL, "no-store")],
        axum::response::Html(page),
    )
        .into_response()
}

/// `POST /login` (form field `token`): a session cookie and `303` to `/`, or the login page
/// again with `401`.
pub async fn login(
    axum::extract::State(feed): axum::extract::State<Arc<crate::feed::WindowFeed>>,
    headers: http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let auth = feed.auth();
    let token = form_urlencoded::parse(&body)
        .find(|(name, _)| name == "token")
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default();
    if auth.is_open() {
        return axum::response::Redirect::to("/").into_response();
    }
    if let Err(retry_after) = auth.failures.check(Instant::now()) {
        feed.feed_stats()
            .auth_throttled
            .fetch_add(1, Ordering::Relaxed);
        let mut page = login_page(
            http::StatusCode::TOO_MANY_REQUESTS,
            "Too many wrong tokens lately: try again in a few seconds.",
        );
        page.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from(retry_after_seconds(retry_after)),
        );
        return page;
    }
    let over_https = headers
        .get("x-forwarded-proto")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"));
    match auth
        .session_cookie(over_https)
        .filter(|_| auth.token_matches(&token))
    {
        Some(cookie) => (
            [(http::header::SET_COOKIE, cookie)],
            axum::response::Redirect::to("/"),
        )
            .into_response(),
        None => {
            auth.failures.record_failure();
            feed.feed_stats()
                .unauthenticated
                .fetch_add(1, Ordering::Relaxed);
            login_page(
                http::StatusCode::UNAUTHORIZED,
                "That is not the feed token.",
            )
        }
    }
}

/// `POST /logout`: clears the session cookie.
pub async fn logout() -> axum::response::Response {
    use axum::response::IntoResponse as _;
    (
        [(
            http::header::SET_COOKIE,
            format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
        )],
        axum::response::Redirect::to("/"),
    )
        .into_response()
}

/// Middleware for the dashboard's routes: without a token or session, `/` shows the login
/// page and anything else answers 401.
pub async fn require_viewer(
    axum::extract::State(feed): axum::extract::State<Arc<crate::feed::WindowFeed>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match feed.auth().access(request.headers()) {
        Access::Allowed => return next.run(request).await,
        Access::Throttled(retry_after) => {
            feed.feed_stats()
                .auth_throttled
                .fetch_add(1, Ordering::Relaxed);
            return throttled(retry_after);
        }
        Access::Refused => {}
    }
    feed.feed_stats()
        .unauthenticated
        .fetch_add(1, Ordering::Relaxed);
    if request.uri().path() == "/" {
        login_page(http::StatusCode::UNAUTHORIZED, "")
    } else {
        unauthorized("log in at / first\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(authorization: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        request
    }

    #[test]
    fn the_feed_token_file_is_read_trimmed_and_an_empty_one_names_its_flag() {
        let path = std::env::temp_dir().join(format!("trazor-feed-token-{}", std::process::id()));
        std::fs::write(&path, "viewer\n").unwrap();
        assert_eq!(
            load_feed_token(Some(&path)).unwrap().as_deref(),
            Some("viewer")
        );
        std::fs::write(&path, "\n").unwrap();
        let empty = load_feed_token(Some(&path)).unwrap_err().to_string();
        assert!(
            empty.contains("--feed-token-file") && empty.contains(FEED_TOKEN_ENV),
            "{empty}"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            load_feed_token(Some(Path::new("/nonexistent/feed-token"))),
            Err(Error::TokenFile { .. })
        ));
    }

    #[test]
    fn only_the_exact_bearer_token_passes() {
        let stats = Arc::new(CollectorStats::default());
        let mut auth = BearerAuth::new(Some("s3cret"), stats.clone());
        assert!(auth.call(request(Some("Bearer s3cret"))).is_ok());
        for bad in [
            None,
            Some("Bearer s3cre"),
            Some("s3cret"),
            Some("Bearer s3cret2"),
        ] {
            let status = auth.call(request(bad)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert_eq!(stats.streams_unauthenticated.load(Ordering::Relaxed), 4);
        let mut open = BearerAuth::new(None, stats);
        assert!(open.call(request(None)).is_ok());
    }

    #[test]
    fn the_failure_throttle_answers_a_burst_then_one_guess_a_second() {
        let throttle = FailureThrottle::new();
        let start = Instant::now();
        for _ in 0..FAILED_AUTH_BURST as usize {
            assert_eq!(throttle.check(start), Ok(()));
            throttle.record_failure();
        }
        assert_eq!(throttle.check(start), Err(FAILED_AUTH_REFILL));
        // Half a refill later: half a second more to wait.
        let half = start + FAILED_AUTH_REFILL / 2;
        assert_eq!(throttle.check(half), Err(FAILED_AUTH_REFILL / 2));
        // A refill later, one guess; its failure empties the bucket again.
        let later = start + FAILED_AUTH_REFILL;
        assert_eq!(throttle.check(later), Ok(()));
        throttle.record_failure();
        assert!(throttle.check(later).is_err());
        // Quiet for a long while: the burst again, no more.
        let much_later = later + FAILED_AUTH_REFILL * 1_000;
        for _ in 0..FAILED_AUTH_BURST as usize {
            assert_eq!(throttle.check(much_later), Ok(()));
            throttle.record_failure();
        }
        assert!(throttle.check(much_later).is_err());
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
