//! The dashboard at the API's root: one page, its script and its style,
//! built into the binary (nothing fetched at run time). The page holds no
//! data; its script polls the API (`/v1/status`, `/v1/peers`,
//! `/v1/models`, `/metrics`), with the API's key when one is set, so the
//! assets are served without a key and the data is not.

use axum::http::header;
use axum::response::IntoResponse;

/// The page's paths, served without a key (they hold no data).
pub(crate) const DASHBOARD_PATHS: [&str; 3] = ["/", "/dashboard.js", "/dashboard.css"];

const INDEX_HTML: &str = include_str!("index.html");
const DASHBOARD_JS: &str = include_str!("dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard.css");

/// Only this server's own script, style and API: no inline script, no
/// other origin, no framing (clickjacking).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // A new binary may bring new assets: ask again each time.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

pub(crate) async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

pub(crate) async fn script() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", DASHBOARD_JS)
}

pub(crate) async fn style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", DASHBOARD_CSS)
}
