//! The HTTP surface: one file per resource, the router, and the server loop.

pub mod activity;
pub mod error;
pub mod openapi;
pub mod ops;
pub mod pending;
pub mod registry;
pub mod uploads;

use std::{
    future::Future,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    http::{header, HeaderName, HeaderValue, Method},
    routing::{delete, get, post},
    Router,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_io_timeout::TimeoutStream;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{auth::Auth, config::LimitArgs, storage::Storage};

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub auth: Auth,
    pub storage: Storage,
    pub limits: LimitArgs,
    pub spool_dir: PathBuf,
    pub http: reqwest::Client,
    /// False once shutdown starts: /readyz answers 503 so load balancers drain us first.
    pub accepting: Arc<AtomicBool>,
    /// One permit per upload in progress (MAX_CONCURRENT_UPLOADS).
    pub upload_slots: Arc<tokio::sync::Semaphore>,
    /// An upload body idle this long is cut off (BODY_IDLE_TIMEOUT).
    pub body_idle_timeout: Duration,
}

impl AppState {
    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }
}

pub fn router(state: AppState, cors_origins: &[String]) -> Router {
    let router = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(openapi::serve))
        .route("/uploads/limits", get(ops::limits))
        .route("/registry/register", post(registry::register))
        .route("/workspaces", post(registry::create))
        .route(
            "/workspaces/{id}",
            get(registry::get_workspace).delete(registry::delete_workspace),
        )
        .route("/workspaces/{id}/tokens", post(registry::mint_token))
        .route(
            "/workspaces/{id}/tokens/{token_id}",
            delete(registry::revoke_token),
        )
        .route("/workspaces/{id}/chat/uploads", post(uploads::chat_upload))
        .route("/workspaces/{id}/activity", get(activity::list))
        .route("/workspaces/{id}/pending-uploads", get(pending::list))
        .route(
            "/workspaces/{id}/pending-uploads/{file_id}/content",
            get(pending::content).head(pending::content_head),
        )
        .route(
            "/workspaces/{id}/pending-uploads/{file_id}/ack",
            post(pending::ack),
        )
        .fallback(ops::not_found)
        .layer(axum::middleware::from_fn(record_latency))
        .with_state(state);
    match cors_layer(cors_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// Request latency by route template (never the raw path: ids would explode the labels).
async fn record_latency(
    matched: Option<axum::extract::MatchedPath>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = matched
        .as_ref()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    crate::metrics::metrics()
        .http_request_duration
        .with_label_values(&[&route, &method, resp.status().as_str()])
        .observe(started.elapsed().as_secs_f64());
    resp
}

fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    let origins: Vec<HeaderValue> = origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([
                Method::GET,
                Method::HEAD,
                Method::POST,
                Method::DELETE,
                Method::OPTIONS,
            ])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::RANGE])
            .expose_headers([
                header::CONTENT_DISPOSITION,
                header::CONTENT_LENGTH,
                header::CONTENT_RANGE,
                header::ETAG,
                HeaderName::from_static("retry-after"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// Connection-level timeouts of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct ServeTimeouts {
    /// After shutdown starts, in-flight requests get this long to finish.
    pub drain_deadline: Duration,
    /// A write to a client that has stopped reading fails after this long.
    pub response_idle: Duration,
}

/// Serves HTTP/1.1 with Title-Case header names (SPEC §4: client scripts grep them
/// case-sensitively), until `shutdown` resolves; then drains in-flight requests for at most
/// `drain_deadline`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
    timeouts: ServeTimeouts,
) -> std::io::Result<()> {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .title_case_headers(true)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // The write timeout is idle time: it restarts whenever the client takes more bytes.
        let mut io = TimeoutStream::new(stream);
        io.set_write_timeout(Some(timeouts.response_idle));
        let service = TowerToHyperService::new(app.clone());
        let conn = builder.serve_connection(TokioIo::new(Box::pin(io)), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            match conn.await {
                Err(e) if is_timeout(&e) => {
                    tracing::info!(event = "response_cut", %peer, "client stopped reading: response cut off");
                }
                Err(e) => tracing::debug!(%peer, error = %e, "connection ended with error"),
                Ok(()) => {}
            }
        });
    }
    drop(listener);
    tracing::info!(in_flight = graceful.count(), "draining connections");
    if tokio::time::timeout(timeouts.drain_deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed; closing remaining connections");
    }
    Ok(())
}

fn is_timeout(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::TimedOut;
        }
        source = err.source();
    }
    false
}
