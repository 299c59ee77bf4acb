//! `serve` on loopback against raw TCP clients: slow headers and idle
//! connections are closed while real requests are served, a slow body is
//! cut off, connections over the cap get a JSON 503, and the access
//! policy refuses foreign hosts, origins and keys.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::routing::{get, post};
use ollamacron_http::{AccessPolicy, HttpLimits, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest any wait of these tests may take on loopback.
const DEADLINE: Duration = Duration::from_secs(20);

const LIMITS: HttpLimits = HttpLimits {
    header_read_timeout: Duration::from_millis(300),
    body_read_timeout: Duration::from_millis(300),
    idle_timeout: Duration::from_millis(600),
    max_connections: 64,
};

fn app() -> Router {
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/echo",
            post(
                |body: Result<Bytes, axum::extract::rejection::BytesRejection>| async move {
                    match body {
                        Ok(b) => (axum::http::StatusCode::OK, b),
                        Err(e) => (e.status(), Bytes::from(e.body_text())),
                    }
                },
            ),
        )
}

async fn start(app: Router, limits: HttpLimits) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, app, limits, async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

/// Read until the server closes the connection; what it sent.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut seen = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut seen))
        .await
        .expect("the server closes the connection")
        .ok();
    String::from_utf8_lossy(&seen).into_owned()
}

async fn request(addr: SocketAddr, raw: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    read_to_close(&mut stream).await
}

fn get_request(path: &str, headers: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_headers_are_closed_while_real_requests_are_served() {
    let (addr, _stop) = start(app(), LIMITS).await;
    let mut slow = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ")
            .await
            .unwrap();
        slow.push(s);
    }
    // Served while the slow ones hang.
    let answer = request(addr, &get_request("/", "")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("hello"), "{answer}");
    // Each slow one is closed, without an answer to its half request.
    for s in &mut slow {
        let seen = read_to_close(s).await;
        assert!(!seen.contains("200 OK"), "{seen}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_keep_alive_works_within_the_limit() {
    let (addr, _stop) = start(app(), LIMITS).await;
    // Connected, never sent a byte: closed after the idle timeout.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_to_close(&mut silent).await, "");
    // Two requests on one connection, then it idles and is closed.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    for _ in 0..2 {
        kept.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(DEADLINE, kept.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("hello"),
            "{text}"
        );
    }
    assert_eq!(read_to_close(&mut kept).await, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_is_refused() {
    let (addr, _stop) = start(app(), LIMITS).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nonly part",
        )
        .await
        .unwrap();
    let answer = read_to_close(&mut stream).await;
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A whole body in time is echoed.
    let answer = request(
        addr,
        "POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_get_a_json_503() {
    let limits = HttpLimits {
        max_connections: 2,
        idle_timeout: Duration::from_secs(30),
        header_read_timeout: Duration::from_secs(30),
        ..LIMITS
    };
    let (addr, _stop) = start(app(), limits).await;
    let _held: Vec<TcpStream> = vec![
        TcpStream::connect(addr).await.unwrap(),
        TcpStream::connect(addr).await.unwrap(),
    ];
    let answer = request(addr, &get_request("/", "")).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains("application/json") && answer.contains("http_max_connections"),
        "{answer}"
    );
    drop(_held);
    // A slot frees when a held connection closes.
    let served = async {
        loop {
            let answer = request(addr, &get_request("/", "")).await;
            if answer.starts_with("HTTP/1.1 200") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(DEADLINE, served)
        .await
        .expect("served once a slot is free");
}

fn guarded(listen: SocketAddr) -> Router {
    AccessPolicy::new("test server", listen)
        .with_keys("test_keys", &["s3cret-key".to_owned()])
        .with_open_paths(&["/healthz"])
        .apply(app())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_hosts_origins_and_keys_are_refused() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        listener,
        guarded(addr),
        LIMITS,
        std::future::pending(),
    ));
    let key = "Authorization: Bearer s3cret-key\r\n";
    let ok = request(addr, &get_request("/", key)).await;
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.ends_with("hello"),
        "{ok}"
    );
    // A DNS-rebinding page: its Host is its own name.
    let rebound = request(
        addr,
        &format!(
            "GET / HTTP/1.1\r\nHost: evil.example:{}\r\n{key}Connection: close\r\n\r\n",
            addr.port()
        ),
    )
    .await;
    assert!(
        rebound.starts_with("HTTP/1.1 403") && rebound.contains("evil.example"),
        "{rebound}"
    );
    // A cross-site simple POST.
    let cross = request(
        addr,
        &format!("POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://evil.example\r\n{key}Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"),
    )
    .await;
    assert!(
        cross.starts_with("HTTP/1.1 403") && cross.contains("origin"),
        "{cross}"
    );
    // A trusted page's preflight, then its request, readable by it.
    let preflight = request(
        addr,
        "OPTIONS /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://localhost:3000\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\nConnection: close\r\n\r\n",
    )
    .await;
    let lower = preflight.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 204"), "{preflight}");
    assert!(
        lower.contains("access-control-allow-origin: http://localhost:3000"),
        "{preflight}"
    );
    assert!(
        lower.contains("access-control-allow-headers: authorization, content-type"),
        "{preflight}"
    );
    let trusted = request(
        addr,
        &format!("POST /echo HTTP/1.1\r\nHost: localhost\r\nOrigin: http://localhost:3000\r\n{key}Content-Length: 2\r\nConnection: close\r\n\r\nhi"),
    )
    .await;
    assert!(
        trusted.starts_with("HTTP/1.1 200") && trusted.ends_with("hi"),
        "{trusted}"
    );
    assert!(
        trusted
            .to_ascii_lowercase()
            .contains("access-control-allow-origin: http://localhost:3000"),
        "{trusted}"
    );
    // Keys: missing and wrong are 401 JSON; the open path needs none.
    let missing = request(addr, &get_request("/", "")).await;
    assert!(
        missing.starts_with("HTTP/1.1 401") && missing.contains("test_keys"),
        "{missing}"
    );
    assert!(
        missing
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{missing}"
    );
    let wrong = request(
        addr,
        &get_request("/", "Authorization: Bearer s3cret-kez\r\n"),
    )
    .await;
    assert!(
        wrong.starts_with("HTTP/1.1 401") && wrong.contains("application/json"),
        "{wrong}"
    );
    let health = request(addr, &get_request("/healthz", "")).await;
    assert!(
        health.starts_with("HTTP/1.1 200") && health.ends_with("ok"),
        "{health}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_accepts_no_more() {
    let (addr, stop) = start(app(), LIMITS).await;
    let answer = request(addr, &get_request("/", "")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    stop.send(()).unwrap();
    let refused = async {
        loop {
            if TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(DEADLINE, refused)
        .await
        .expect("the listener is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_answer_is_closed() {
    // An endless answer that says when the server drops it.
    let (dropped_tx, dropped) = tokio::sync::oneshot::channel::<()>();
    let dropped_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(dropped_tx)));
    let app = Router::new().route(
        "/forever",
        get(move || {
            let dropped_tx = dropped_tx.clone();
            async move {
                struct Tell(Option<tokio::sync::oneshot::Sender<()>>);
                impl Drop for Tell {
                    fn drop(&mut self) {
                        if let Some(tx) = self.0.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                let tell = Tell(dropped_tx.lock().unwrap().take());
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                let stream = futures_stream(chunk, tell);
                axum::body::Body::from_stream(stream)
            }
        }),
    );
    let (addr, _stop) = start(app, LIMITS).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /forever HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    // Never read: once the socket's buffers are full the server waits,
    // and after the idle timeout it closes the connection.
    tokio::time::timeout(DEADLINE, dropped)
        .await
        .expect("the answer is dropped")
        .unwrap();
}

/// `chunk` for ever, holding `guard` until dropped.
fn futures_stream<G: Send + 'static>(
    chunk: Bytes,
    guard: G,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    futures::stream::unfold((chunk, guard), |(chunk, guard)| async move {
        Some((Ok(chunk.clone()), (chunk, guard)))
    })
}
