//! Who may use a server: the `Host` it is asked by (DNS rebinding), the
//! `Origin` of a browser page (cross-site requests, CORS preflights), and
//! bearer keys.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// The environment variable of extra allowed origins that Ollama reads
/// (comma-separated); the gateway honours it too.
pub const OLLAMA_ORIGINS_VAR: &str = "OLLAMA_ORIGINS";

/// The origins a server allows by default, as Ollama does: pages served
/// from this machine (`localhost`, `127.0.0.1`, `[::1]`, `0.0.0.0`, any
/// port, http or https) and desktop apps' own schemes.
#[must_use]
pub fn default_allowed_origins() -> Vec<String> {
    let mut origins = Vec::new();
    for host in ["localhost", "127.0.0.1", "[::1]", "0.0.0.0"] {
        for scheme in ["http", "https"] {
            origins.push(format!("{scheme}://{host}"));
            origins.push(format!("{scheme}://{host}:*"));
        }
    }
    for scheme in ["app", "file", "tauri", "vscode-webview", "vscode-file"] {
        origins.push(format!("{scheme}://*"));
    }
    origins
}

/// The headers a trusted page may send when its preflight asks for none in
/// particular.
const DEFAULT_ALLOWED_HEADERS: &str =
    "authorization, content-type, user-agent, accept, x-requested-with";

/// The methods a trusted page may use.
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// How long a browser may cache a preflight's answer, in seconds.
const PREFLIGHT_MAX_AGE_SECS: &str = "600";

/// A server's access rules, applied to a router by [`AccessPolicy::apply`].
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    name: &'static str,
    listen: SocketAddr,
    hosts: Vec<String>,
    origins: Vec<String>,
    keys: Vec<[u8; 32]>,
    keys_setting: &'static str,
    hosts_setting: &'static str,
    origins_setting: &'static str,
    open_paths: Vec<&'static str>,
}

impl AccessPolicy {
    /// The rules of the server `name` (`"gateway"`, `"API"`) listening on
    /// `listen`: loopback `Host`s and [`default_allowed_origins`] only, no
    /// key.
    #[must_use]
    pub fn new(name: &'static str, listen: SocketAddr) -> Self {
        Self {
            name,
            listen,
            hosts: Vec::new(),
            origins: default_allowed_origins(),
            keys: Vec::new(),
            keys_setting: "api keys",
            hosts_setting: "allowed hosts",
            origins_setting: "allowed origins",
            open_paths: Vec::new(),
        }
    }

    /// Also allow these `Host` names (without a port; `*` allows any),
    /// configured as `setting`.
    #[must_use]
    pub fn with_hosts(mut self, setting: &'static str, hosts: &[String]) -> Self {
        self.hosts = hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        self.hosts_setting = setting;
        self
    }

    /// Also allow these origins, besides [`default_allowed_origins`] (`*`
    /// matches any run of characters, so `http://localhost:*` is every
    /// port), configured as `setting`.
    #[must_use]
    pub fn with_origins(mut self, setting: &'static str, origins: &[String]) -> Self {
        self.origins
            .extend(origins.iter().map(|o| o.to_ascii_lowercase()));
        self.origins_setting = setting;
        self
    }

    /// Require `Authorization: Bearer <one of keys>` (none: no key needed),
    /// configured as `setting`. Only the keys' SHA-256 digests are kept.
    #[must_use]
    pub fn with_keys(mut self, setting: &'static str, keys: &[String]) -> Self {
        self.keys = keys.iter().map(|k| Sha256::digest(k).into()).collect();
        self.keys_setting = setting;
        self
    }

    /// Paths answered to `GET`/`HEAD` without a key (liveness checks such
    /// as `/healthz`); `Host` and `Origin` are still checked.
    #[must_use]
    pub fn with_open_paths(mut self, paths: &[&'static str]) -> Self {
        self.open_paths = paths.to_vec();
        self
    }

    /// Whether a request needs a key.
    #[must_use]
    pub fn requires_key(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Whether the server listens beyond loopback.
    #[must_use]
    pub fn beyond_loopback(&self) -> bool {
        !self.listen.ip().is_loopback()
    }

    /// `router` behind these rules.
    pub fn apply(self, router: Router) -> Router {
        router.layer(axum::middleware::from_fn_with_state(
            Arc::new(self),
            check_access,
        ))
    }

    fn host_allowed(&self, headers: &HeaderMap) -> Result<(), String> {
        let Some(host) = headers.get(header::HOST) else {
            // HTTP/1.0 without a Host: no browser sends that.
            return Ok(());
        };
        let host = host.to_str().unwrap_or_default().to_ascii_lowercase();
        let name = host_name(&host);
        let allowed = name == "localhost"
            || name.ends_with(".localhost")
            || self.hosts.iter().any(|h| h == "*" || *h == name)
            || name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| {
                    // An address cannot be rebound: this server's own, or
                    // any when it listens on all of them.
                    ip.is_loopback() || ip == self.listen.ip() || self.listen.ip().is_unspecified()
                });
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "the {} does not answer requests for host {host:?} (it may be a DNS rebinding page); add the name to {} to allow it",
                self.name, self.hosts_setting
            ))
        }
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        self.origins.iter().any(|p| glob_match(p, &origin))
    }

    fn key_accepted(&self, headers: &HeaderMap) -> Result<(), String> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, key) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(key)
            })
        else {
            return Err(format!(
                "the {} requires an API key: send Authorization: Bearer <key> with a key from {}",
                self.name, self.keys_setting
            ));
        };
        let given: [u8; 32] = Sha256::digest(given.trim()).into();
        // Every key is compared, each in constant time, so the time taken
        // says nothing about which bytes or which key matched.
        let matched = self.keys.iter().fold(0u8, |found, key| {
            found | u8::from(constant_time_eq(key, &given))
        });
        if matched == 1 {
            Ok(())
        } else {
            Err(format!(
                "the API key is not one of the {}'s {}",
                self.name, self.keys_setting
            ))
        }
    }
}

/// The host of a `Host` header value, without its port.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        // `[v6]` or `[v6]:port`; anything else stays whole, and is no address.
        return match host.split_once(']') {
            Some((v6, "")) => &host[..=v6.len()],
            Some((v6, port))
                if port
                    .strip_prefix(':')
                    .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit())) =>
            {
                &host[..=v6.len()]
            }
            _ => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `pattern` with `*` standing for any run of characters.
fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return text.is_empty();
    };
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

fn refusal(status: StatusCode, message: &str) -> Response {
    let mut response =
        (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

async fn check_access(
    State(policy): State<Arc<AccessPolicy>>,
    request: Request,
    next: Next,
) -> Response {
    if let Err(message) = policy.host_allowed(request.headers()) {
        tracing::info!(server = policy.name, "refused a request for a foreign Host");
        return refusal(StatusCode::FORBIDDEN, &message);
    }
    let origin = request.headers().get(header::ORIGIN).cloned();
    if let Some(origin) = &origin {
        let text = origin.to_str().unwrap_or_default();
        if !policy.origin_allowed(text) {
            tracing::info!(
                server = policy.name,
                origin = text,
                "refused a request from a foreign Origin"
            );
            return refusal(
                StatusCode::FORBIDDEN,
                &format!(
                    "the {} does not answer pages from origin {text:?}; add it to {} to allow it",
                    policy.name, policy.origins_setting
                ),
            );
        }
    }
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if let (true, Some(origin)) = (preflight, &origin) {
        let mut response = StatusCode::NO_CONTENT.into_response();
        let allowed_headers = request
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
            .unwrap_or(HeaderValue::from_static(DEFAULT_ALLOWED_HEADERS));
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOWED_METHODS),
        );
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allowed_headers);
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(PREFLIGHT_MAX_AGE_SECS),
        );
        headers.insert(header::VARY, HeaderValue::from_static("origin"));
        return response;
    }
    let open = matches!(*request.method(), Method::GET | Method::HEAD)
        && policy.open_paths.contains(&request.uri().path());
    if !open && let Err(message) = policy.key_accepted(request.headers()) {
        return with_cors(refusal(StatusCode::UNAUTHORIZED, &message), origin);
    }
    with_cors(next.run(request).await, origin)
}

/// An answer to an allowed page, readable by it.
fn with_cors(mut response: Response, origin: Option<HeaderValue>) -> Response {
    if let Some(origin) = origin {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.append(header::VARY, HeaderValue::from_static("origin"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_origins_need() {
        assert!(glob_match("http://localhost:*", "http://localhost:3000"));
        assert!(!glob_match(
            "http://localhost:*",
            "http://localhost.evil.example"
        ));
        assert!(!glob_match("http://localhost", "http://localhost:3000"));
        assert!(glob_match("http://localhost", "http://localhost"));
        assert!(glob_match("app://*", "app://anything"));
        assert!(glob_match("*", "whatever"));
        assert!(glob_match("https://*.example.com", "https://a.example.com"));
        assert!(!glob_match("https://*.example.com", "https://example.com"));
        assert!(!glob_match("a*b*c", "acb"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("ab*ba", "aba"));
    }

    #[test]
    fn host_names_lose_their_port() {
        assert_eq!(host_name("localhost:11435"), "localhost");
        assert_eq!(host_name("[::1]:11435"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
        assert_eq!(host_name("evil.example"), "evil.example");
        assert_eq!(host_name("[::1]evil.example"), "[::1]evil.example");
    }

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                name.clone(),
                HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("")),
            );
        }
        map
    }

    #[test]
    fn hosts_are_loopback_the_listen_address_or_configured() {
        let loopback = AccessPolicy::new("gateway", SocketAddr::from(([127, 0, 0, 1], 11435)));
        for ok in [
            "localhost:11435",
            "127.0.0.1:11435",
            "[::1]:11435",
            "app.localhost",
            "127.0.0.2",
        ] {
            assert!(
                loopback
                    .host_allowed(&headers(&[(header::HOST, ok)]))
                    .is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "[::1]evil.example",
            "evil.example",
            "evil.example:11435",
            "192.168.1.5:11435",
            "localhost.evil.example",
        ] {
            let e = loopback
                .host_allowed(&headers(&[(header::HOST, bad)]))
                .unwrap_err();
            assert!(e.contains("allowed hosts"), "{e}");
        }
        let lan = AccessPolicy::new("gateway", SocketAddr::from(([192, 168, 1, 5], 11435)))
            .with_hosts("gateway_allowed_hosts", &["Box.LAN".to_owned()]);
        assert!(
            lan.host_allowed(&headers(&[(header::HOST, "192.168.1.5:11435")]))
                .is_ok()
        );
        assert!(
            lan.host_allowed(&headers(&[(header::HOST, "box.lan:11435")]))
                .is_ok()
        );
        assert!(
            lan.host_allowed(&headers(&[(header::HOST, "10.0.0.1")]))
                .is_err()
        );
        let any = AccessPolicy::new("gateway", SocketAddr::from(([0, 0, 0, 0], 11435)));
        assert!(
            any.host_allowed(&headers(&[(header::HOST, "10.0.0.1:11435")]))
                .is_ok()
        );
        assert!(
            any.host_allowed(&headers(&[(header::HOST, "evil.example")]))
                .is_err()
        );
    }

    #[test]
    fn keys_are_checked() {
        let policy = AccessPolicy::new("API", SocketAddr::from(([127, 0, 0, 1], 1))).with_keys(
            "api_keys",
            &["first-key".to_owned(), "second-key".to_owned()],
        );
        assert!(policy.requires_key());
        assert!(
            policy
                .key_accepted(&headers(&[(header::AUTHORIZATION, "Bearer second-key")]))
                .is_ok()
        );
        assert!(
            policy
                .key_accepted(&headers(&[(header::AUTHORIZATION, "Bearer first-key")]))
                .is_ok()
        );
        let wrong = policy
            .key_accepted(&headers(&[(header::AUTHORIZATION, "Bearer first-kez")]))
            .unwrap_err();
        assert!(wrong.contains("not one of"), "{wrong}");
        let missing = policy.key_accepted(&HeaderMap::new()).unwrap_err();
        assert!(
            missing.contains("requires an API key") && missing.contains("api_keys"),
            "{missing}"
        );
        assert!(
            policy
                .key_accepted(&headers(&[(header::AUTHORIZATION, "BEARER first-key")]))
                .is_ok()
        );
        let basic = policy
            .key_accepted(&headers(&[(header::AUTHORIZATION, "Basic Zmlyc3Qta2V5")]))
            .unwrap_err();
        assert!(basic.contains("requires an API key"), "{basic}");
    }
}
