//! Operational routes: health, readiness, published limits.

use axum::{extract::State, http::StatusCode, response::IntoResponse, Json};
use serde_json::json;

use super::{error::ApiError, AppState};

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    summary = "Process is up",
    security(),
    responses(
        (status = 200, description = "OK", body = crate::http::openapi::Health),
    )
)]
pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Ready when accepting, the database answers and the active storage backend is reachable.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    summary = "Database and active storage backend reachable",
    security(),
    responses(
        (status = 200, description = "OK", body = crate::http::openapi::Readiness),
        (status = 503, description = "not ready", body = crate::http::openapi::Readiness),
    )
)]
pub async fn readyz(State(st): State<AppState>) -> impl IntoResponse {
    if !st.is_accepting() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting down"})),
        );
    }
    let database = sqlx::query("SELECT 1").execute(&st.pool).await.is_ok();
    let storage = st.storage.check().await.is_ok();
    let status = if database && storage {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    (
        status,
        Json(json!({
            "status": word(database && storage),
            "database": word(database),
            "storage": word(storage),
            "backend": st.storage.mode().as_str(),
        })),
    )
}

#[utoipa::path(
    get,
    path = "/uploads/limits",
    tag = "operations",
    summary = "Upload caps every client reads",
    security(),
    responses(
        (status = 200, description = "OK", body = crate::http::openapi::Limits),
    )
)]
pub async fn limits(State(st): State<AppState>) -> impl IntoResponse {
    Json(json!({
        "per_file_bytes": st.limits.max_file_bytes,
        "per_request_bytes": st.limits.max_request_bytes,
        "max_files_per_request": st.limits.max_files_per_request,
        "max_filename_chars": st.limits.max_filename_chars,
        "max_pending_bytes_per_workspace": st.limits.max_pending_bytes_per_workspace,
    }))
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
