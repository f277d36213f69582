//! The dashboard page (`/`) and its assets (`/assets/...`), embedded in the binary: no
//! external scripts, styles or fonts, so it works in clusters without internet access.
//!
//! The page is split by concern (`dashboard/`): `index.html` and `style.css`; `feed.js` (the
//! connection: filters, replay of the last 15 minutes, reconnects), `histogram.js` (exact
//! merging and percentiles, as `proto/src/histogram.rs`), `model.js` (windows grouped into
//! workloads, pods and points), `chart.js` (hand-written SVG charts) and `app.js` (the rest).
//! Authentication in front of these routes is the feed's (`collector/FEED.md`).

use axum::{
    Router,
    http::header::{CACHE_CONTROL, CONTENT_TYPE},
    response::IntoResponse,
    routing::get,
};

/// Every asset: path under `/assets/`, content type, content.
const ASSETS: [(&str, &str, &str); 6] = [
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("dashboard/style.css"),
    ),
    ("app.js", JS, include_str!("dashboard/app.js")),
    ("feed.js", JS, include_str!("dashboard/feed.js")),
    ("model.js", JS, include_str!("dashboard/model.js")),
    ("histogram.js", JS, include_str!("dashboard/histogram.js")),
    ("chart.js", JS, include_str!("dashboard/chart.js")),
];

const JS: &str = "text/javascript; charset=utf-8";

/// The page's routes, for any router state.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new().route("/", get(page));
    for (name, content_type, body) in ASSETS {
        router = router.route(
            &format!("/assets/{name}"),
            get(move || async move { asset(content_type, body) }),
        );
    }
    router
}

async fn page() -> impl IntoResponse {
    asset(
        "text/html; charset=utf-8",
        include_str!("dashboard/index.html"),
    )
}

/// Revalidated on every load, so a new collector's page never runs with old scripts.
fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-cache")],
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_the_page_imports_is_served() {
        let served: Vec<&str> = ASSETS.iter().map(|(name, _, _)| *name).collect();
        for (_, _, body) in
            ASSETS
                .iter()
                .chain([&("index.html", "", include_str!("dashboard/index.html"))])
        {
            for import in body
                .split(['"', '\''])
                .filter(|part| part.ends_with(".js") || part.ends_with(".css"))
            {
                let name = import.rsplit('/').next().unwrap_or(import);
                assert!(
                    served.contains(&name),
                    "{import} is imported but not served"
                );
            }
        }
    }
}
