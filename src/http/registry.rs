//! The minimal platform surface: registration, workspaces, tokens (SPEC §4 Registry).

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::HeaderMap,
    Json,
};
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::{json, Map, Value};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{error::ApiError, AppState};
use crate::{
    auth::{self, new_token},
    db::{self, workspaces::NewWorkspace},
};

#[derive(Deserialize)]
pub struct RegisterReq {
    id: Uuid,
    delivery_mode: Option<String>,
    url: Option<String>,
    agent_card: Option<AgentCard>,
}

#[derive(Deserialize)]
struct AgentCard {
    name: Option<String>,
}

#[derive(Deserialize)]
pub struct CreateReq {
    id: Option<Uuid>,
    name: Option<String>,
    delivery_mode: Option<String>,
    url: Option<String>,
}

pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Postgres text cannot hold NUL; JSON can only carry one escaped.
    if body.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000")) {
        return Err(ApiError::BadRequest(
            "strings must not contain NUL characters".into(),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

fn validate_mode(mode: Option<&str>) -> Result<Option<&'static str>, ApiError> {
    match mode {
        None => Ok(None),
        Some("push") => Ok(Some("push")),
        Some("poll") => Ok(Some("poll")),
        Some(_) => Err(ApiError::BadRequest(
            "delivery_mode must be 'push' or 'poll'".into(),
        )),
    }
}

/// A new workspace's delivery mode when none is given: push with a URL, poll without.
fn initial_mode(mode: Option<&'static str>, url: Option<&str>) -> &'static str {
    mode.unwrap_or(if url.is_some() { "push" } else { "poll" })
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// The push callback URL, if one is given. It must be one the proxy can call (absolute
/// http(s) with a host): caught here, a typo is a 400 at registration instead of a 502 on
/// every later upload.
fn callback_url(url: &Option<String>) -> Result<Option<&str>, ApiError> {
    let Some(raw) = non_empty(url) else {
        return Ok(None);
    };
    match reqwest::Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => Ok(Some(raw)),
        _ => Err(ApiError::BadRequest(
            "url must be an absolute http:// or https:// URL".into(),
        )),
    }
}

/// A workspace that exists and is not removed.
pub async fn live_workspace(
    db: impl sqlx::PgExecutor<'_>,
    id: Uuid,
) -> Result<db::workspaces::Workspace, ApiError> {
    db::workspaces::get(db, id)
        .await?
        .filter(|w| w.status != "removed")
        .ok_or(ApiError::WorkspaceNotFound)
}

/// Issues a token for the workspace; returns the fields to add to the answer.
async fn issue_token(
    conn: &mut PgConnection,
    workspace_id: Uuid,
) -> Result<(Uuid, auth::NewToken), ApiError> {
    let token = new_token();
    let id = db::tokens::insert(conn, workspace_id, &token.hash, &token.prefix).await?;
    tracing::info!(%workspace_id, token_id = %id, prefix = %token.prefix, "token issued");
    Ok((id, token))
}

fn registered(ws: &db::workspaces::Workspace, token: Option<auth::NewToken>) -> Json<Value> {
    let mut body = Map::new();
    body.insert("status".into(), json!("registered"));
    body.insert("id".into(), json!(ws.id));
    body.insert("delivery_mode".into(), json!(ws.delivery_mode));
    if let Some(t) = token {
        body.insert("auth_token".into(), json!(t.token));
        body.insert(
            "platform_inbound_secret".into(),
            json!(ws.platform_inbound_secret),
        );
    }
    Json(Value::Object(body))
}

#[utoipa::path(
    post,
    path = "/registry/register",
    tag = "registry",
    summary = "Register (upsert) a workspace",
    request_body = crate::http::openapi::RegisterRequest,
    responses(
        (status = 200, description = "OK", body = crate::http::openapi::Registered),
        (status = 400, description = "invalid body, delivery_mode or url", body = crate::http::openapi::ErrorBody),
        (status = 401, description = "re-registration without its bearer", body = crate::http::openapi::ErrorBody),
        (status = 409, description = "workspace was removed", body = crate::http::openapi::ErrorBody),
        (status = 503, description = "datastore unavailable", body = crate::http::openapi::ErrorBody),
    )
)]
pub async fn register(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: RegisterReq = parse_json(&body)?;
    let mode = validate_mode(req.delivery_mode.as_deref())?;
    let url = callback_url(&req.url)?;
    let name = req.agent_card.as_ref().and_then(|c| c.name.as_deref());

    let mut tx = st.pool.begin().await?;
    let secret = auth::new_secret();
    let created = db::workspaces::insert(
        &mut tx,
        &NewWorkspace {
            id: req.id,
            name: name.unwrap_or(""),
            delivery_mode: initial_mode(mode, url),
            url,
            platform_inbound_secret: &secret,
        },
    )
    .await?;
    // Row lock: two first registrations racing cannot both be handed a token.
    let ws = db::workspaces::get_for_update(&mut tx, req.id)
        .await?
        .ok_or(ApiError::WorkspaceNotFound)?;
    if ws.status == "removed" {
        return Err(ApiError::WorkspaceRemoved);
    }
    let (ws, token) = if created {
        let (_, token) = issue_token(&mut tx, ws.id).await?;
        (ws, Some(token))
    } else {
        let has_token = db::tokens::has_live(&mut tx, ws.id).await?;
        if has_token {
            let bearer = auth::bearer(&headers).ok_or(ApiError::MissingToken)?;
            if !st.auth.is_admin(bearer) {
                st.auth.token_for(bearer, ws.id).await?;
            }
        }
        let ws = db::workspaces::update(&mut tx, ws.id, name, mode, url).await?;
        let token = if has_token {
            None
        } else {
            Some(issue_token(&mut tx, ws.id).await?.1)
        };
        (ws, token)
    };
    tx.commit().await?;
    tracing::info!(workspace_id = %ws.id, delivery_mode = %ws.delivery_mode, created, "workspace registered");
    Ok(registered(&ws, token))
}

#[utoipa::path(
    post,
    path = "/workspaces",
    tag = "registry",
    summary = "Create a workspace (admin)",
    request_body = crate::http::openapi::CreateWorkspaceRequest,
    responses(
        (status = 200, description = "OK", body = crate::http::openapi::Registered),
        (status = 400, description = "invalid body, delivery_mode or url", body = crate::http::openapi::ErrorBody),
        (status = 401, description = "not the admin", body = crate::http::openapi::ErrorBody),
        (status = 409, description = "workspace already exists", body = crate::http::openapi::ErrorBody),
        (status = 503, description = "datastore unavailable", body = crate::http::openapi::ErrorBody),
    )
)]
pub async fn create(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    st.auth.admin(&headers)?;
    let req: CreateReq = parse_json(&body)?;
    let name =
        non_empty(&req.name).ok_or_else(|| ApiError::BadRequest("name is required".into()))?;
    let mode = validate_mode(req.delivery_mode.as_deref())?;
    let url = callback_url(&req.url)?;
    let id = req.id.unwrap_or_else(Uuid::new_v4);
    let secret = auth::new_secret();
    let mut tx = st.pool.begin().await?;
    let created = db::workspaces::insert(
        &mut tx,
        &NewWorkspace {
            id,
            name,
            delivery_mode: initial_mode(mode, url),
            url,
            platform_inbound_secret: &secret,
        },
    )
    .await?;
    if !created {
        return Err(ApiError::WorkspaceExists);
    }
    let (_, token) = issue_token(&mut tx, id).await?;
    let ws = db::workspaces::get(&mut *tx, id)
        .await?
        .ok_or(ApiError::WorkspaceNotFound)?;
    tx.commit().await?;
    tracing::info!(workspace_id = %id, delivery_mode = %ws.delivery_mode, "workspace created");
    Ok(registered(&ws, Some(token)))
}

#[utoipa::path(
    get,
    path = "/workspaces/{id}",
    tag = "registry",
    summary = "A workspace",
    params(("id" = uuid::Uuid, Path, description = "workspace UUID")),
    responses(
        (status = 200, description = "OK", body = crate::http::openapi::Workspace),
        (status = 400, description = "invalid workspace ID", body = crate::http::openapi::ErrorBody),
        (status = 404, description = "workspace not found", body = crate::http::openapi::ErrorBody),
        (status = 401, description = "missing or invalid bearer", body = crate::http::openapi::ErrorBody),
        (status = 503, description = "datastore unavailable", body = crate::http::openapi::ErrorBody),
    )
)]
pub async fn get_workspace(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<db::workspaces::Workspace>, ApiError> {
    let (id, _) = st.auth.workspace(&headers, &id).await?;
    let ws = db::workspaces::get(&st.pool, id)
        .await?
        .ok_or(ApiError::WorkspaceNotFound)?;
    Ok(Json(ws))
}

#[utoipa::path(
    delete,
    path = "/workspaces/{id}",
    tag = "registry",
    summary = "Remove a workspace (admin); revokes its tokens",
    params(("id" = uuid::Uuid, Path, description = "workspace UUID")),
    responses(
        (status = 200, description = "OK", body = crate::http::openapi::Removed),
        (status = 400, description = "invalid workspace ID", body = crate::http::openapi::ErrorBody),
        (status = 404, description = "workspace not found", body = crate::http::openapi::ErrorBody),
        (status = 401, description = "missing or invalid bearer", body = crate::http::openapi::ErrorBody),
        (status = 503, description = "datastore unavailable", body = crate::http::openapi::ErrorBody),
    )
)]
pub async fn delete_workspace(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    st.auth.admin(&headers)?;
    let id = auth::parse_workspace_id(&id)?;
    let mut tx = st.pool.begin().await?;
    if !db::workspaces::remove(&mut tx, id).await? {
        return Err(ApiError::WorkspaceNotFound);
    }
    tx.commit().await?;
    tracing::info!(workspace_id = %id, "workspace removed");
    Ok(Json(json!({"status": "removed", "id": id})))
}

#[utoipa::path(
    post,
    path = "/workspaces/{id}/tokens",
    tag = "registry",
    summary = "Mint an extra workspace token",
    params(("id" = uuid::Uuid, Path, description = "workspace UUID")),
    responses(
        (status = 200, description = "OK", body = crate::http::openapi::TokenMinted),
        (status = 400, description = "invalid workspace ID", body = crate::http::openapi::ErrorBody),
        (status = 404, description = "workspace not found", body = crate::http::openapi::ErrorBody),
        (status = 401, description = "missing or invalid bearer", body = crate::http::openapi::ErrorBody),
        (status = 503, description = "datastore unavailable", body = crate::http::openapi::ErrorBody),
    )
)]
pub async fn mint_token(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let (id, _) = st.auth.workspace(&headers, &id).await?;
    let mut tx = st.pool.begin().await?;
    live_workspace(&mut *tx, id).await?;
    let (token_id, token) = issue_token(&mut tx, id).await?;
    tx.commit().await?;
    Ok(Json(
        json!({"id": token_id, "auth_token": token.token, "prefix": token.prefix}),
    ))
}

#[utoipa::path(
    delete,
    path = "/workspaces/{id}/tokens/{token_id}",
    tag = "registry",
    summary = "Revoke one token",
    params(("id" = uuid::Uuid, Path, description = "workspace UUID"), ("token_id" = uuid::Uuid, Path, description = "token UUID")),
    responses(
        (status = 200, description = "OK", body = crate::http::openapi::Revoked),
        (status = 400, description = "invalid workspace or token ID", body = crate::http::openapi::ErrorBody),
        (status = 404, description = "token not found", body = crate::http::openapi::ErrorBody),
        (status = 401, description = "missing or invalid bearer", body = crate::http::openapi::ErrorBody),
        (status = 503, description = "datastore unavailable", body = crate::http::openapi::ErrorBody),
    )
)]
pub async fn revoke_token(
    State(st): State<AppState>,
    Path((id, token_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let (id, _) = st.auth.workspace(&headers, &id).await?;
    let token_id = Uuid::parse_str(&token_id).map_err(|_| ApiError::InvalidTokenId)?;
    if !db::tokens::revoke(&st.pool, id, token_id).await? {
        return Err(ApiError::TokenNotFound);
    }
    tracing::info!(workspace_id = %id, %token_id, "token revoked");
    Ok(Json(json!({"revoked": true})))
}
