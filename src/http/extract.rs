//! Extractors: who is calling (SPEC §3), and JSON bodies under their size and time bounds.

use axum::{
    extract::{FromRequest, FromRequestParts, RawPathParams, Request},
    http::request::Parts,
};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::{body, error::ApiError, AppState};
use crate::auth::Caller;

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
        let params = RawPathParams::from_request_parts(parts, st)
            .await
            .map_err(|_| ApiError::InvalidWorkspaceId)?;
        let raw_id = params
            .iter()
            .find(|(name, _)| *name == "id")
            .map(|(_, v)| v.to_string())
            .unwrap_or_default();
        let (workspace_id, caller) = st.auth.workspace(&parts.headers, &raw_id).await?;
        Ok(WorkspaceCaller {
            workspace_id,
            caller,
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
