//! `GET /workspaces/:id/activity`: the feed a workspace's poll loop reads.

use std::collections::HashMap;

use axum::{
    extract::{Path, Query, State},
    http::HeaderMap,
    Json,
};
use uuid::Uuid;

use super::{error::ApiError, AppState};
use crate::db::{self, activity::ActivityRow};

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 500;
const MAX_WINDOW_SECS: i64 = 30 * 86_400;

fn int_param(q: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    match q.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse::<i64>()
            .map(Some)
            .map_err(|_| ApiError::BadRequest(format!("{name} must be an integer"))),
    }
}

fn str_param<'a>(q: &'a HashMap<String, String>, name: &str) -> Result<Option<&'a str>, ApiError> {
    match q.get(name).map(|v| v.as_str()).filter(|v| !v.is_empty()) {
        Some(v) if v.contains('\0') => Err(ApiError::BadRequest(format!(
            "{name} must not contain NUL characters"
        ))),
        v => Ok(v),
    }
}

#[utoipa::path(
    get,
    path = "/workspaces/{id}/activity",
    tag = "activity",
    summary = "The activity feed a workspace polls",
    params(("id" = uuid::Uuid, Path, description = "workspace UUID"), ("type" = Option<String>, Query, description = "activity_type filter"), ("method" = Option<String>, Query, description = "method filter"), ("since_id" = Option<String>, Query, description = "cursor: rows after this one"), ("since_secs" = Option<i64>, Query, description = "window without a cursor (max 30 days)"), ("limit" = Option<i64>, Query, description = "default 100, max 500")),
    responses(
        (status = 200, description = "rows: after since_id oldest first, else newest first", body = Vec<crate::http::openapi::ActivityRow>),
        (status = 400, description = "invalid parameter", body = crate::http::openapi::ErrorBody),
        (status = 410, description = "since_id cursor not found", body = crate::http::openapi::ErrorBody),
        (status = 401, description = "missing or invalid bearer", body = crate::http::openapi::ErrorBody),
        (status = 503, description = "datastore unavailable", body = crate::http::openapi::ErrorBody),
    )
)]
pub async fn list(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Vec<ActivityRow>>, ApiError> {
    let (workspace_id, _) = st.auth.workspace(&headers, &id).await?;
    let limit = int_param(&q, "limit")?
        .unwrap_or(DEFAULT_LIMIT)
        .clamp(1, MAX_LIMIT);
    let since_secs = int_param(&q, "since_secs")?.map(|s| s.clamp(1, MAX_WINDOW_SECS));
    let filter = db::activity::Filter {
        activity_type: str_param(&q, "type")?,
        method: str_param(&q, "method")?,
        limit,
    };
    let rows = match str_param(&q, "since_id")? {
        Some(raw) => {
            let cursor = Uuid::parse_str(raw)
                .map_err(|_| ApiError::BadRequest("invalid since_id".into()))?;
            let seq = db::activity::cursor_seq(&st.pool, workspace_id, cursor)
                .await?
                .ok_or(ApiError::CursorGone)?;
            db::activity::after(&st.pool, workspace_id, seq, &filter).await?
        }
        None => db::activity::newest(&st.pool, workspace_id, since_secs, &filter).await?,
    };
    Ok(Json(rows))
}
