//! Operational routes: health, readiness, metrics, published limits.

use std::time::{Duration, Instant};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};

use super::{error::ApiError, AppState};
use crate::api::{Health, Limits, Readiness};

/// /readyz answers within 2 s whatever its dependencies do (SPEC §10): each check gets this.
const READY_CHECK_TIMEOUT: Duration = Duration::from_millis(1500);

/// The last readiness check, shared: /readyz needs no credential, and each check takes a
/// pooled database connection (and an S3 call), so callers that arrive while one runs wait
/// for its answer instead of starting their own. A flood of probes then costs the database
/// one ping at a time, not one connection each.
#[derive(Default)]
pub struct ReadyCheck(tokio::sync::Mutex<Option<Checked>>);

#[derive(Clone, Copy)]
struct Checked {
    at: Instant,
    database: bool,
    storage: bool,
}

impl ReadyCheck {
    /// Whether the database and the storage answer: the result of a check that ended after
    /// this call began (this call's own, or one that was running when it came).
    async fn run(&self, st: &AppState) -> (bool, bool) {
        let asked = Instant::now();
        let mut last = self.0.lock().await;
        if let Some(c) = last.filter(|c| c.at >= asked) {
            return (c.database, c.storage);
        }
        let database = tokio::time::timeout(
            READY_CHECK_TIMEOUT,
            st.db.run(|c| Box::pin(crate::db::ping(c))),
        );
        let storage = tokio::time::timeout(READY_CHECK_TIMEOUT, st.storage.check());
        let (database, storage) = tokio::join!(database, storage);
        let checked = Checked {
            at: Instant::now(),
            database: matches!(database, Ok(Ok(()))),
            storage: matches!(storage, Ok(Ok(()))),
        };
        *last = Some(checked);
        (checked.database, checked.storage)
    }
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    summary = "Process is up",
    security(),
    responses(
        (status = 200, description = "OK", body = Health),
    )
)]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Ready when accepting, the database answers and the active storage backend is reachable.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    summary = "Database and active storage backend reachable",
    security(),
    responses(
        (status = 200, description = "OK", body = Readiness),
        (status = 503, description = "not ready", body = Readiness),
    )
)]
pub async fn readyz(State(st): State<AppState>) -> Response {
    if !st.is_accepting() {
        let body = Readiness {
            status: "shutting down".into(),
            database: None,
            storage: None,
            backend: None,
        };
        return not_ready(body);
    }
    let (database, storage) = st.ready.run(&st).await;
    let word = |ok: bool| if ok { "ok" } else { "unavailable" }.to_string();
    let body = Readiness {
        status: word(database && storage),
        database: Some(word(database)),
        storage: Some(word(storage)),
        backend: Some(st.storage.mode().as_str().into()),
    };
    match database && storage {
        true => Json(body).into_response(),
        false => not_ready(body),
    }
}

/// A 503 with `Retry-After`, as every 503 of this service (SPEC §10).
fn not_ready(body: Readiness) -> Response {
    let retry = [(header::RETRY_AFTER, "5")];
    (StatusCode::SERVICE_UNAVAILABLE, retry, Json(body)).into_response()
}

#[utoipa::path(
    get,
    path = "/uploads/limits",
    tag = "operations",
    summary = "Upload caps, for a client to check before it sends",
    security(),
    responses(
        (status = 200, description = "OK", body = Limits),
    )
)]
pub async fn limits(State(st): State<AppState>) -> Json<Limits> {
    let l = &st.limits;
    Json(Limits {
        per_file_bytes: l.max_file_bytes,
        per_request_bytes: l.max_request_bytes,
        max_files_per_request: l.max_files_per_request as u64,
        max_attachments_per_message: l.max_files_per_request as u64,
        max_filename_chars: l.max_filename_chars as u64,
        max_pending_bytes_per_workspace: l.max_pending_bytes_per_workspace,
        max_pending_files_per_workspace: l.max_pending_files_per_workspace,
    })
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus metrics",
    security(),
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
    )
)]
pub async fn metrics() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        crate::metrics::render(),
    )
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound
}
