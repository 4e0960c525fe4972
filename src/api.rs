//! The wire types of the HTTP API (SPEC §4): what handlers answer, what clients (our own
//! agent included) parse, and what the OpenAPI document describes — one definition each, so
//! the three cannot disagree. Field names are the contract's, camelCase where it says so.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

/// Every error: `error` is the text; some carry more fields.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
    /// `platform_unavailable`, `storage_unavailable`, `spool_unavailable`, `upload_capacity`,
    /// `workspace_busy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The bound that was passed: bytes (a file, a request, the byte quota, a JSON body),
    /// files (the file quota) or tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_bytes: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_files: Option<i64>,
    /// The file quota, as `max` says it too (its earlier name, kept for clients that read it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_files: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentCard {
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RegisterRequest {
    pub id: Uuid,
    /// `push` or `poll`.
    pub delivery_mode: Option<String>,
    pub url: Option<String>,
    pub agent_card: Option<AgentCard>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateWorkspaceRequest {
    pub id: Option<Uuid>,
    pub name: Option<String>,
    /// `push` or `poll`.
    pub delivery_mode: Option<String>,
    pub url: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Registered {
    /// Always `registered`.
    pub status: String,
    pub id: Uuid,
    /// `push` or `poll`.
    pub delivery_mode: String,
    /// Only when a token is issued (first registration, creation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_token: Option<String>,
    /// The bearer this service sends to the workspace's push endpoint.
    pub platform_inbound_secret: Option<String>,
}

/// How a workspace receives uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum DeliveryMode {
    Push,
    Poll,
}

impl DeliveryMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryMode::Push => "push",
            DeliveryMode::Poll => "poll",
        }
    }

    /// `push` / `poll`; anything else is refused with SPEC's text.
    pub fn parse(s: &str) -> Option<DeliveryMode> {
        match s {
            "push" => Some(DeliveryMode::Push),
            "poll" => Some(DeliveryMode::Poll),
            _ => None,
        }
    }
}

/// A workspace's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum WorkspaceStatus {
    Online,
    Removed,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Workspace {
    pub id: Uuid,
    pub name: String,
    /// `push` or `poll`; rows written by the platform may hold other values.
    pub delivery_mode: String,
    pub url: Option<String>,
    /// `online` or `removed`.
    pub status: String,
    /// `null` only for a platform row without one (its column is nullable).
    pub created_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Removed {
    /// Always `removed`.
    pub status: String,
    pub id: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenMinted {
    pub id: Uuid,
    pub auth_token: String,
    pub prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Revoked {
    pub revoked: bool,
}

/// One staged file as the upload answers it, and as its activity row records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StagedFile {
    /// `platform-pending:<workspace_id>/<file_id>`.
    pub uri: String,
    pub name: String,
    #[serde(rename = "mimeType")]
    #[schema(rename = "mimeType")]
    pub mime_type: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UploadResult {
    pub files: Vec<StagedFile>,
}

/// One upload request: one or more parts named `files`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UploadForm {
    #[schema(value_type = Vec<String>, format = Binary)]
    pub files: Vec<Vec<u8>>,
}

/// The activity row's `request_body` for a staged file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UploadReceived {
    pub file_id: Uuid,
    #[serde(flatten)]
    pub file: StagedFile,
}

/// A file an activity row refers to (`include=peer_info`), as the runtimes read it; empty
/// fields are left out, as the platform does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Attachment {
    /// `image`, `audio`, `video` (from the mimetype's prefix) or `file`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct ActivityRow {
    pub id: Uuid,
    pub workspace_id: Uuid,
    pub activity_type: String,
    pub source_id: Option<Uuid>,
    pub target_id: Option<Uuid>,
    pub method: Option<String>,
    pub summary: Option<String>,
    pub request_body: Option<Value>,
    pub response_body: Option<Value>,
    /// `""` for a platform row whose status is NULL (its column is nullable, SPEC §2).
    pub status: String,
    pub error_detail: Option<String>,
    /// `null` only for a platform row without one (its column is nullable, SPEC §2).
    pub created_at: Option<DateTime<Utc>>,
    /// The paging key: strictly increasing in commit order within a workspace.
    pub seq: i64,
    /// With `include=peer_info`, when non-empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[sqlx(skip)]
    pub attachments: Option<Vec<Attachment>>,
    /// With `include=peer_info`: the name of the workspace the row came from (`source_id`),
    /// when it has one (rows of uploads have no source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[sqlx(skip)]
    pub peer_name: Option<String>,
    /// With `include=peer_info`: the role of the workspace the row came from, when the
    /// platform's table gives it one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[sqlx(skip)]
    pub peer_role: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PendingUpload {
    pub file_id: Uuid,
    pub name: String,
    #[serde(rename = "mimeType")]
    #[schema(rename = "mimeType")]
    pub mime_type: String,
    pub size: i64,
    pub uri: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub fetched_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Acked {
    pub acked: bool,
    /// Present (true) when the sweeper removed the row first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raced: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Limits {
    pub per_file_bytes: u64,
    pub per_request_bytes: u64,
    pub max_files_per_request: u64,
    /// The platform's name for `max_files_per_request`.
    pub max_attachments_per_message: u64,
    pub max_filename_chars: u64,
    pub max_pending_bytes_per_workspace: u64,
    pub max_pending_files_per_workspace: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// `ok`, `unavailable` or `shutting down`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

/// The URI a staged file is known by: `platform-pending:<workspace_id>/<file_id>`.
pub fn platform_uri(workspace_id: Uuid, file_id: Uuid) -> String {
    format!("platform-pending:{workspace_id}/{file_id}")
}

/// The attachment kind the runtimes expect for a mimetype (the platform's projection: a
/// case-sensitive prefix match).
pub fn attachment_kind(mime_type: &str) -> &'static str {
    if mime_type.starts_with("image/") {
        "image"
    } else if mime_type.starts_with("audio/") {
        "audio"
    } else if mime_type.starts_with("video/") {
        "video"
    } else {
        "file"
    }
}

/// The first and last byte and the total (`None` for `*`) of a `Content-Range: bytes
/// a-b/total`, as the service sends it and S3 does (the agent reads ours, the S3 backend S3's).
pub fn content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let (span, total) = value.strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = span.split_once('-')?;
    let number = |s: &str| s.trim().parse::<u64>().ok();
    let total = match total.trim() {
        "*" => None,
        t => Some(number(t)?),
    };
    Some((number(first)?, number(last)?, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_are_read_whole_or_not_at_all() {
        assert_eq!(
            content_range("bytes 500-999/1000"),
            Some((500, 999, Some(1000)))
        );
        assert_eq!(content_range("bytes 0-0/1"), Some((0, 0, Some(1))));
        assert_eq!(content_range("bytes 500-999/*"), Some((500, 999, None)));
        for odd in [
            "bytes */1000",
            "500-999/1000",
            "bytes 5-/9",
            "bytes 1-2/x",
            "",
        ] {
            assert_eq!(content_range(odd), None, "{odd:?}");
        }
    }
}
