//! Extractors: who is calling (SPEC §3), and JSON bodies under their size and time bounds.

use axum::{
    extract::{FromRequest, FromRequestParts, RawPathParams, Request},
    http::request::Parts,
};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::{body, error::ApiError, AppState};
use crate::auth::{Caller, Credential};

/// A caller allowed on `/workspaces/:id/...`: the admin, or a live token of that workspace.
/// Rejections: 401 (no or wrong bearer), 400 (`:id` not a UUID), 503 (datastore away).
#[derive(Debug, Clone, Copy)]
pub struct WorkspaceCaller {
    pub workspace_id: Uuid,
    pub caller: Caller,
}

impl FromRequestParts<AppState> for WorkspaceCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let raw_id = raw_workspace_id(parts, st).await?;
        let (workspace_id, caller) = st.auth.workspace(&parts.headers, &raw_id).await?;
        Ok(WorkspaceCaller {
            workspace_id,
            caller,
        })
    }
}

/// The `:id` path parameter as sent.
async fn raw_workspace_id(parts: &mut Parts, st: &AppState) -> Result<String, ApiError> {
    let params = RawPathParams::from_request_parts(parts, st)
        .await
        .map_err(|_| ApiError::InvalidWorkspaceId)?;
    Ok(params
        .iter()
        .find(|(name, _)| *name == "id")
        .map(|(_, v)| v.to_string())
        .unwrap_or_default())
}

/// The hot routes' caller: a bearer and the workspace it claims, parsed but not yet looked
/// up — the route's own query checks a workspace token (`db::tokens::CALLER`) and answers
/// [`db::Checked::Refused`] when it is not a live token of this workspace.
/// Rejections: 401 (no bearer), 400 (`:id` not a UUID).
#[derive(Debug, Clone, Copy)]
pub struct WorkspaceClaim {
    pub workspace_id: Uuid,
    pub credential: Credential,
}

impl FromRequestParts<AppState> for WorkspaceClaim {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let raw_id = raw_workspace_id(parts, st).await?;
        let (workspace_id, credential) = st.auth.claim(&parts.headers, &raw_id)?;
        Ok(WorkspaceClaim {
            workspace_id,
            credential,
        })
    }
}

/// The admin: routes only the platform may call.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        st.auth.admin(&parts.headers)?;
        Ok(Admin)
    }
}

/// A JSON body of at most 64 KiB (413), arriving whole within REQUEST_BODY_TIMEOUT (408).
/// Any Content-Type is accepted: clients in the field send JSON without one.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &AppState) -> Result<Self, ApiError> {
        let value = body::read_json(req.into_body(), st.deadlines.request_body).await?;
        Ok(JsonBody(value))
    }
}
