//! Where the local Ollama listens: `ollama_url`, else `OLLAMA_HOST` read
//! the way the `ollama` CLI reads it, else `http://127.0.0.1:11434`.

use std::fmt;

use crate::OllamaError;

/// Ollama's default port.
pub const DEFAULT_OLLAMA_PORT: u16 = 11434;
/// Ollama's default URL.
pub const DEFAULT_OLLAMA_URL: &str = "http://127.0.0.1:11434";
/// The environment variable Ollama reads.
pub const OLLAMA_HOST_VAR: &str = "OLLAMA_HOST";

/// The base URL of an Ollama server (`http://host:port`, no path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OllamaEndpoint {
    host: String,
    port: u16,
}

impl OllamaEndpoint {
    /// The endpoint from a configured URL, else `OLLAMA_HOST` (as given in
    /// `ollama_host`), else the default.
    ///
    /// # Errors
    /// The value is not an `http://` URL or `host[:port]`.
    pub fn resolve(
        configured: Option<&str>,
        ollama_host: Option<&str>,
    ) -> Result<Self, OllamaError> {
        match (configured, ollama_host.filter(|h| !h.trim().is_empty())) {
            (Some(url), _) => Self::parse(url),
            (None, Some(host)) => Self::parse(host),
            (None, None) => Self::parse(DEFAULT_OLLAMA_URL),
        }
    }

    /// Parse `http://host:port`, `host:port`, `host` or `:port` (as
    /// `OLLAMA_HOST` allows). A listen-everything host (`0.0.0.0`, `::`)
    /// means this machine.
    ///
    /// # Errors
    /// Another scheme, a path, or a bad port.
    pub fn parse(value: &str) -> Result<Self, OllamaError> {
        let bad = |reason: &str| OllamaError::Endpoint {
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let trimmed = value.trim();
        let rest = if let Some(rest) = trimmed.strip_prefix("http://") {
            rest
        } else if trimmed.contains("://") {
            return Err(bad("only http:// is supported for the local Ollama"));
        } else {
            trimmed
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(bad("a path is not allowed; give only host and port"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed `[`"))?;
            (host.to_owned(), after.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host.to_owned(), Some(port)),
                None => (rest.to_owned(), None),
            }
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("the port must be 1-65535"))?,
            None => DEFAULT_OLLAMA_PORT,
        };
        let host = match host.as_str() {
            "" | "0.0.0.0" => "127.0.0.1".to_owned(),
            "::" => "::1".to_owned(),
            _ => host,
        };
        if host
            .chars()
            .any(|c| c.is_whitespace() || c == '@' || c == '?' || c == '#')
        {
            return Err(bad("the host is not a host name or address"));
        }
        Ok(Self { host, port })
    }

    /// The URL of `path` (which starts with `/`) on this server.
    #[must_use]
    pub fn url(&self, path: &str) -> String {
        format!("{self}{path}")
    }
}

impl fmt::Display for OllamaEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "http://{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ollama_host_forms_are_read_as_ollama_reads_them() {
        for (input, expected) in [
            ("http://127.0.0.1:11434", "http://127.0.0.1:11434"),
            ("http://gpu-box:8080/", "http://gpu-box:8080"),
            ("gpu-box", "http://gpu-box:11434"),
            ("gpu-box:9000", "http://gpu-box:9000"),
            (":9000", "http://127.0.0.1:9000"),
            ("0.0.0.0", "http://127.0.0.1:11434"),
            ("[::1]:9000", "http://[::1]:9000"),
        ] {
            assert_eq!(
                OllamaEndpoint::parse(input).unwrap().to_string(),
                expected,
                "{input}"
            );
        }
        for bad in [
            "https://x",
            "http://x/api",
            "x:0",
            "x:99999",
            "x:port",
            "[::1",
        ] {
            let e = OllamaEndpoint::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn configuration_wins_over_the_environment_which_wins_over_the_default() {
        let env = Some("envhost:1");
        assert_eq!(
            OllamaEndpoint::resolve(Some("http://cfg:2"), env)
                .unwrap()
                .to_string(),
            "http://cfg:2"
        );
        assert_eq!(
            OllamaEndpoint::resolve(None, env).unwrap().to_string(),
            "http://envhost:1"
        );
        assert_eq!(
            OllamaEndpoint::resolve(None, Some(" "))
                .unwrap()
                .to_string(),
            DEFAULT_OLLAMA_URL
        );
        assert_eq!(
            OllamaEndpoint::resolve(None, None).unwrap().to_string(),
            DEFAULT_OLLAMA_URL
        );
    }
}
