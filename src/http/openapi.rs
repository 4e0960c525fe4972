//! The OpenAPI 3 description of the HTTP surface, generated from the handlers' `#[utoipa::path]`
//! annotations and the schemas below; served at `/openapi.json` and committed as
//! `deploy/openapi.json` (a test keeps the two identical).

#![allow(dead_code)] // the structs below exist to describe JSON, not to be built

use chrono::{DateTime, Utc};
use serde_json::Value;
use utoipa::{
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    Modify, OpenApi, ToSchema,
};
use uuid::Uuid;

/// Every error: `error` is the text; some carry more fields.
#[derive(ToSchema)]
pub struct ErrorBody {
    error: String,
    /// `platform_unavailable`, `storage_unavailable`, `upload_capacity`.
    code: Option<String>,
    detail: Option<String>,
    filename: Option<String>,
    size: Option<u64>,
    max: Option<u64>,
    pending_bytes: Option<i64>,
}

#[derive(ToSchema)]
pub struct AgentCard {
    name: Option<String>,
}

#[derive(ToSchema)]
pub struct RegisterRequest {
    id: Uuid,
    /// `push` or `poll`.
    delivery_mode: Option<String>,
    url: Option<String>,
    agent_card: Option<AgentCard>,
}

#[derive(ToSchema)]
pub struct CreateWorkspaceRequest {
    id: Option<Uuid>,
    name: String,
    delivery_mode: Option<String>,
    url: Option<String>,
}

#[derive(ToSchema)]
pub struct Registered {
    /// Always `registered`.
    status: String,
    id: Uuid,
    delivery_mode: String,
    /// Only when a token is issued (first registration, creation).
    auth_token: Option<String>,
    platform_inbound_secret: Option<String>,
}

#[derive(ToSchema)]
pub struct Workspace {
    id: Uuid,
    name: String,
    delivery_mode: String,
    url: Option<String>,
    /// `online` or `removed`.
    status: String,
    created_at: DateTime<Utc>,
}

#[derive(ToSchema)]
pub struct Removed {
    status: String,
    id: Uuid,
}

#[derive(ToSchema)]
pub struct TokenMinted {
    id: Uuid,
    auth_token: String,
    prefix: String,
}

#[derive(ToSchema)]
pub struct Revoked {
    revoked: bool,
}

#[derive(ToSchema)]
pub struct StagedFile {
    /// `platform-pending:<workspace_id>/<file_id>`.
    uri: String,
    name: String,
    #[schema(rename = "mimeType")]
    mime_type: String,
    size: u64,
}

#[derive(ToSchema)]
pub struct UploadResult {
    files: Vec<StagedFile>,
}

/// One upload request: one or more parts named `files`.
#[derive(ToSchema)]
pub struct UploadForm {
    #[schema(value_type = Vec<String>, format = Binary)]
    files: Vec<Vec<u8>>,
}

#[derive(ToSchema)]
pub struct ActivityRow {
    id: Uuid,
    workspace_id: Uuid,
    activity_type: String,
    source_id: Option<Uuid>,
    target_id: Option<Uuid>,
    method: Option<String>,
    summary: Option<String>,
    request_body: Option<Value>,
    response_body: Option<Value>,
    status: String,
    error_detail: Option<String>,
    created_at: DateTime<Utc>,
}

#[derive(ToSchema)]
pub struct PendingUpload {
    file_id: Uuid,
    name: String,
    #[schema(rename = "mimeType")]
    mime_type: String,
    size: i64,
    uri: String,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    fetched_at: Option<DateTime<Utc>>,
}

#[derive(ToSchema)]
pub struct Acked {
    acked: bool,
    /// Present (true) when the sweeper removed the row first.
    raced: Option<bool>,
}

#[derive(ToSchema)]
pub struct Limits {
    per_file_bytes: u64,
    per_request_bytes: u64,
    max_files_per_request: u64,
    max_filename_chars: u64,
    max_pending_bytes_per_workspace: u64,
}

#[derive(ToSchema)]
pub struct Health {
    status: String,
}

#[derive(ToSchema)]
pub struct Readiness {
    status: String,
    database: Option<String>,
    storage: Option<String>,
    backend: Option<String>,
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "pending-uploads", description = "Stages chat file uploads for agent workspaces behind NAT."),
    paths(
        super::ops::healthz,
        super::ops::readyz,
        super::ops::limits,
        super::ops::metrics,
        super::registry::register,
        super::registry::create,
        super::registry::get_workspace,
        super::registry::delete_workspace,
        super::registry::mint_token,
        super::registry::revoke_token,
        super::uploads::chat_upload,
        super::activity::list,
        super::pending::list,
        super::pending::content,
        super::pending::content_head,
        super::pending::ack,
    ),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

/// The document as served and committed (pretty JSON, trailing newline).
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let mut text = doc.to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}

pub async fn serve() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        document(),
    )
}
