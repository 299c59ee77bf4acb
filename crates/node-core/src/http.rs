//! The node's local HTTP listener (`api_listen`): `/metrics` and `/healthz`.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::MetricsEndpoint;
use crate::state::NodeState;

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
struct ApiState {
    metrics: MetricsEndpoint,
    state: watch::Receiver<NodeState>,
}

fn router(metrics: MetricsEndpoint, state: watch::Receiver<NodeState>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(serve_health))
        .with_state(ApiState { metrics, state })
}

async fn serve_metrics(State(api): State<ApiState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        api.metrics.encode(),
    )
}

async fn serve_health(State(api): State<ApiState>) -> impl IntoResponse {
    let state = *api.state.borrow();
    let status = if state == NodeState::Running {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, format!("{state}\n"))
}

/// Serve the API on `listener` until the node reaches a terminal state.
pub(crate) fn spawn_api(
    listener: TcpListener,
    metrics: MetricsEndpoint,
    state: watch::Receiver<NodeState>,
) {
    let mut until = state.clone();
    let app = router(metrics, state);
    tokio::spawn(async move {
        let stopped = async move {
            let _ = until.wait_for(|s| s.is_terminal()).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::warn!(error = %e, "HTTP API server failed");
        }
    });
}
