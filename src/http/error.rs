//! The one place where failures become SPEC status codes and error bodies.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{json, Value};

use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing workspace auth token")]
    MissingToken,
    #[error("invalid workspace auth token")]
    InvalidToken,
    #[error("invalid workspace ID")]
    InvalidWorkspaceId,
    #[error("invalid file_id")]
    InvalidFileId,
    #[error("invalid token ID")]
    InvalidTokenId,
    #[error("workspace not found")]
    WorkspaceNotFound,
    #[error("pending upload not found or expired")]
    UploadNotFound,
    #[error("token not found")]
    TokenNotFound,
    #[error("not found")]
    NotFound,
    #[error("workspace already exists")]
    WorkspaceExists,
    #[error("workspace has been removed")]
    WorkspaceRemoved,
    #[error("{0}")]
    BadRequest(String),
    #[error("no files field in request")]
    NoFiles,
    #[error("too many files (limit {0})")]
    TooManyFiles(usize),
    #[error("malformed multipart body")]
    MalformedMultipart,
    #[error("file is empty")]
    EmptyFile { filename: String },
    #[error("file exceeds per-file cap")]
    FileTooLarge {
        filename: String,
        size: u64,
        max: u64,
    },
    #[error("request body exceeds per-request cap")]
    RequestTooLarge { max: u64 },
    #[error("request body stalled: no data received within the idle timeout")]
    BodyStalled,
    #[error("too many uploads in progress — retry shortly")]
    UploadCapacity,
    #[error("workspace pending-upload quota exceeded")]
    QuotaExceeded { pending_bytes: i64, max: u64 },
    #[error("since_id cursor not found in this workspace; omit since_id to reset")]
    CursorGone,
    #[error("requested range not satisfiable")]
    RangeNotSatisfiable { size: u64 },
    #[error("workspace has no callback URL — chat upload requires push-mode + public URL")]
    NoCallbackUrl { detail: String },
    #[error("workspace url not registered yet")]
    UrlNotRegistered,
    #[error("workspace unreachable")]
    WorkspaceUnreachable,
    #[error("platform datastore unavailable — retry shortly")]
    DatastoreUnavailable,
    #[error("storage backend unavailable — retry shortly")]
    StorageUnavailable,
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            MissingToken | InvalidToken => StatusCode::UNAUTHORIZED,
            InvalidWorkspaceId
            | InvalidFileId
            | InvalidTokenId
            | BadRequest(_)
            | NoFiles
            | TooManyFiles(_)
            | MalformedMultipart
            | EmptyFile { .. } => StatusCode::BAD_REQUEST,
            WorkspaceNotFound | UploadNotFound | TokenNotFound | NotFound => StatusCode::NOT_FOUND,
            WorkspaceExists | WorkspaceRemoved => StatusCode::CONFLICT,
            FileTooLarge { .. } | RequestTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            CursorGone => StatusCode::GONE,
            RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            NoCallbackUrl { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            BodyStalled => StatusCode::REQUEST_TIMEOUT,
            UrlNotRegistered | DatastoreUnavailable | StorageUnavailable | UploadCapacity => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            WorkspaceUnreachable => StatusCode::BAD_GATEWAY,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn body(&self) -> Value {
        let error = self.to_string();
        match self {
            ApiError::EmptyFile { filename } => json!({"error": error, "filename": filename}),
            ApiError::FileTooLarge {
                filename,
                size,
                max,
            } => {
                json!({"error": error, "filename": filename, "size": size, "max": max})
            }
            ApiError::RequestTooLarge { max } => json!({"error": error, "max": max}),
            ApiError::QuotaExceeded { pending_bytes, max } => {
                json!({"error": error, "pending_bytes": pending_bytes, "max": max})
            }
            ApiError::NoCallbackUrl { detail } => json!({"error": error, "detail": detail}),
            ApiError::DatastoreUnavailable => {
                json!({"error": error, "code": "platform_unavailable"})
            }
            ApiError::StorageUnavailable => json!({"error": error, "code": "storage_unavailable"}),
            ApiError::UploadCapacity => json!({"error": error, "code": "upload_capacity"}),
            _ => json!({ "error": error }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = ?self, status = status.as_u16(), "request failed");
        }
        let mut resp = (status, Json(self.body())).into_response();
        let headers = resp.headers_mut();
        match &self {
            ApiError::QuotaExceeded { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            }
            ApiError::DatastoreUnavailable | ApiError::StorageUnavailable => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            ApiError::UploadCapacity => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            }
            ApiError::RangeNotSatisfiable { size } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
            }
            _ => {}
        }
        resp
    }
}

/// Database errors: an unreachable datastore is 503, anything else a 500.
impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => ApiError::DatastoreUnavailable,
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Db(db) => db.into(),
            StorageError::Unavailable(_) => ApiError::StorageUnavailable,
            StorageError::Io(e) => ApiError::Internal(e.to_string()),
            StorageError::Missing => ApiError::UploadNotFound,
        }
    }
}
