//! The one place where failures become SPEC status codes, error bodies and headers. Lower
//! layers have their own error types (`AuthError`, `DbError`, `StorageError`,
//! `StagingError`); the `From` impls below are the whole mapping.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};

use crate::{
    api::ErrorBody, auth::AuthError, db::DbError, staging::StagingError, storage::StorageError,
};

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
    #[error("workspace URL not allowed")]
    UrlNotAllowed,
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
    #[error("JSON body exceeds {max} bytes")]
    JsonTooLarge { max: u64 },
    #[error("request body stalled: no data received within the idle timeout")]
    BodyStalled,
    #[error("request body too slow: below the minimum upload rate")]
    BodyTooSlow,
    #[error("request body too slow: the service waited {secs} s in all for its bytes")]
    BodyOverdue { secs: u64 },
    #[error("too many uploads in progress — retry shortly")]
    UploadCapacity,
    #[error("too many uploads in progress for this workspace — retry shortly")]
    WorkspaceBusy,
    #[error("too many downloads in progress — retry shortly")]
    DownloadCapacity,
    #[error("too many downloads in progress for this workspace — retry shortly")]
    WorkspaceDownloadsBusy,
    #[error("too many long polls waiting for this workspace — retry shortly")]
    WorkspaceLongPollsBusy,
    /// The client address holds its SLOT_SHARE_PER_CLIENT of a slot kind (SPEC is silent).
    #[error("too many requests in progress from this client — retry shortly")]
    ClientBusy,
    /// Every long poll slot of this replica is taken (SPEC is silent).
    #[error("too many long polls waiting — retry shortly")]
    LongPollCapacity,
    /// Registration's push URL lookups are all in flight on this replica (SPEC is silent).
    #[error("too many push URL lookups in progress — retry shortly")]
    LookupCapacity,
    #[error("workspace pending-upload quota exceeded")]
    QuotaExceeded { pending_bytes: i64, max: u64 },
    #[error("workspace pending-upload quota exceeded")]
    FileQuotaExceeded { pending_files: i64, max: u64 },
    /// REGISTRATIONS_PER_MINUTE used up on this replica (SPEC is silent); retry after the
    /// seconds given.
    #[error("too many registrations — retry shortly")]
    RegistrationRate { retry_after_secs: u64 },
    /// MAX_TOKENS_PER_WORKSPACE live tokens already (SPEC is silent).
    #[error("too many live tokens for this workspace — revoke one first")]
    TokenLimit { max: u64 },
    #[error("since_id cursor not found (row may have been pruned or belongs to a different workspace); omit since_id to reset")]
    CursorGone,
    #[error("precondition failed: If-Match names no current ETag")]
    PreconditionFailed,
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
    #[error("upload spool unavailable — retry shortly")]
    SpoolUnavailable,
    /// MAX_STORED_BYTES reached ([`crate::stored`]).
    #[error("upload storage full — retry later")]
    StorageFull,
    /// MAX_WORKSPACES reached: a first registration without a claim creates nothing.
    #[error("workspace registry full — retry later")]
    RegistryFull,
    /// The client address staged its STORED_SHARE_PER_CLIENT of MAX_STORED_BYTES in the last
    /// day ([`crate::stored`]); retry after the seconds given.
    #[error("this client's share of upload storage is used up — retry later")]
    StorageShare { retry_after_secs: u64 },
    /// A framework-level rejection (bad path encoding, 405, 415, ...), with its own status.
    #[error("{message}")]
    Rejected { status: StatusCode, message: String },
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn internal(e: impl Into<anyhow::Error>) -> ApiError {
        ApiError::Internal(e.into())
    }

    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            MissingToken | InvalidToken => StatusCode::UNAUTHORIZED,
            InvalidWorkspaceId
            | InvalidFileId
            | InvalidTokenId
            | BadRequest(_)
            | UrlNotAllowed
            | NoFiles
            | TooManyFiles(_)
            | MalformedMultipart
            | EmptyFile { .. } => StatusCode::BAD_REQUEST,
            WorkspaceNotFound | UploadNotFound | TokenNotFound | NotFound => StatusCode::NOT_FOUND,
            WorkspaceExists | WorkspaceRemoved => StatusCode::CONFLICT,
            FileTooLarge { .. } | RequestTooLarge { .. } | JsonTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            QuotaExceeded { .. }
            | FileQuotaExceeded { .. }
            | TokenLimit { .. }
            | RegistrationRate { .. }
            | WorkspaceBusy
            | WorkspaceDownloadsBusy
            | WorkspaceLongPollsBusy
            | ClientBusy
            | StorageShare { .. } => StatusCode::TOO_MANY_REQUESTS,
            CursorGone => StatusCode::GONE,
            PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            NoCallbackUrl { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            BodyStalled | BodyTooSlow | BodyOverdue { .. } => StatusCode::REQUEST_TIMEOUT,
            UrlNotRegistered | DatastoreUnavailable | StorageUnavailable | SpoolUnavailable
            | StorageFull | RegistryFull | UploadCapacity | DownloadCapacity | LookupCapacity
            | LongPollCapacity => StatusCode::SERVICE_UNAVAILABLE,
            WorkspaceUnreachable => StatusCode::BAD_GATEWAY,
            Rejected { status, .. } => *status,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn body(&self) -> ErrorBody {
        let mut body = ErrorBody {
            error: self.to_string(),
            ..ErrorBody::default()
        };
        match self {
            ApiError::EmptyFile { filename } => body.filename = Some(filename.clone()),
            ApiError::FileTooLarge {
                filename,
                size,
                max,
            } => {
                body.filename = Some(filename.clone());
                body.size = Some(*size);
                body.max = Some(*max);
            }
            ApiError::RequestTooLarge { max } | ApiError::JsonTooLarge { max } => {
                body.max = Some(*max)
            }
            ApiError::TokenLimit { max } => {
                body.code = Some("token_limit".into());
                body.max = Some(*max);
            }
            ApiError::QuotaExceeded { pending_bytes, max } => {
                body.pending_bytes = Some(*pending_bytes);
                body.max = Some(*max);
            }
            // SPEC §10: "429 like the byte quota", whose body says `max`; `max_files` stays
            // for the clients that read it.
            ApiError::FileQuotaExceeded { pending_files, max } => {
                body.pending_files = Some(*pending_files);
                body.max = Some(*max);
                body.max_files = Some(*max);
            }
            ApiError::NoCallbackUrl { detail } => body.detail = Some(detail.clone()),
            ApiError::DatastoreUnavailable => body.code = Some("platform_unavailable".into()),
            ApiError::StorageUnavailable => body.code = Some("storage_unavailable".into()),
            ApiError::SpoolUnavailable => body.code = Some("spool_unavailable".into()),
            ApiError::StorageFull => body.code = Some("storage_full".into()),
            ApiError::RegistryFull => body.code = Some("registry_full".into()),
            ApiError::StorageShare { .. } => body.code = Some("storage_share".into()),
            ApiError::UploadCapacity => body.code = Some("upload_capacity".into()),
            ApiError::WorkspaceBusy
            | ApiError::WorkspaceDownloadsBusy
            | ApiError::WorkspaceLongPollsBusy => body.code = Some("workspace_busy".into()),
            ApiError::ClientBusy => body.code = Some("client_busy".into()),
            ApiError::DownloadCapacity => body.code = Some("download_capacity".into()),
            ApiError::LookupCapacity => body.code = Some("lookup_capacity".into()),
            ApiError::LongPollCapacity => body.code = Some("long_poll_capacity".into()),
            ApiError::RegistrationRate { .. } => body.code = Some("registration_rate".into()),
            _ => {}
        }
        body
    }

    /// Seconds a client should wait before retrying, where retrying is the remedy.
    fn retry_after(&self) -> Option<HeaderValue> {
        let secs = match self {
            ApiError::RegistrationRate { retry_after_secs }
            | ApiError::StorageShare { retry_after_secs } => {
                return Some(HeaderValue::from(*retry_after_secs))
            }
            ApiError::QuotaExceeded { .. }
            | ApiError::FileQuotaExceeded { .. }
            // Room comes back as the sweeper deletes expired and old acked rows.
            | ApiError::StorageFull
            // Room comes back when workspaces are removed or the bound is raised.
            | ApiError::RegistryFull => Some("60"),
            ApiError::DatastoreUnavailable
            | ApiError::StorageUnavailable
            | ApiError::SpoolUnavailable
            | ApiError::UrlNotRegistered
            // A place frees when a hanging lookup's resolver gives up: seconds, not less.
            | ApiError::LookupCapacity => Some("5"),
            ApiError::UploadCapacity
            | ApiError::WorkspaceBusy
            | ApiError::DownloadCapacity
            | ApiError::WorkspaceDownloadsBusy
            // A waiting poll frees its place when a row commits or its wait ends.
            | ApiError::WorkspaceLongPollsBusy
            | ApiError::ClientBusy
            | ApiError::LongPollCapacity => Some("2"),
            _ => None,
        };
        secs.map(HeaderValue::from_static)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // A full store refuses every upload until the sweeper makes room: its start and end
        // are logged once each (`crate::stored`), not every refusal. A transfer coding the
        // service does not take (501) is the client's doing, not a failure of the service's
        // (an ERROR line each; an audit); another framework 5xx still is one.
        let clients_doing = matches!(self, ApiError::StorageFull | ApiError::RegistryFull)
            || status == StatusCode::NOT_IMPLEMENTED;
        if status.is_server_error() && !clients_doing {
            tracing::error!(
                error = crate::logfmt::clip(&format!("{:#}", anyhow_chain(&self))).as_str(),
                status = status.as_u16(),
                "request failed"
            );
        }
        let mut resp = (status, Json(self.body())).into_response();
        if matches!(
            self,
            ApiError::BodyStalled | ApiError::BodyTooSlow | ApiError::BodyOverdue { .. }
        ) {
            resp.extensions_mut().insert(super::body::NoDrain);
        }
        let headers = resp.headers_mut();
        if let Some(secs) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, secs);
        }
        if let ApiError::RangeNotSatisfiable { size } = &self {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                headers.insert(header::CONTENT_RANGE, v);
            }
        }
        resp
    }
}

/// The error with its sources, for the log line.
fn anyhow_chain(e: &ApiError) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing => ApiError::MissingToken,
            AuthError::Invalid => ApiError::InvalidToken,
            AuthError::BadWorkspaceId => ApiError::InvalidWorkspaceId,
            AuthError::Lookup(db) => db.into(),
        }
    }
}

/// An unreachable or restarting database is 503; anything else is our bug: 500.
impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "database unavailable");
            ApiError::DatastoreUnavailable
        } else {
            ApiError::internal(e)
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Db(db) => db.into(),
            StorageError::Unavailable(_) => {
                tracing::warn!(error = %e, "storage unavailable");
                ApiError::StorageUnavailable
            }
            // An object that is not the row's bytes is as good as gone (logged by the read
            // that found it).
            StorageError::Missing | StorageError::SourceCorrupt(_) => ApiError::UploadNotFound,
            StorageError::Io(_) | StorageError::CopyMismatch(_) => ApiError::internal(e),
        }
    }
}

impl From<StagingError> for ApiError {
    fn from(e: StagingError) -> Self {
        match e {
            StagingError::NoFiles => ApiError::NoFiles,
            StagingError::TooManyFiles(n) => ApiError::TooManyFiles(n),
            StagingError::Malformed(_) => ApiError::MalformedMultipart,
            StagingError::EmptyFile { filename } => ApiError::EmptyFile { filename },
            StagingError::FileTooLarge {
                filename,
                size,
                max,
            } => ApiError::FileTooLarge {
                filename,
                size,
                max,
            },
            StagingError::QuotaBytes { pending, max } => ApiError::QuotaExceeded {
                pending_bytes: pending,
                max,
            },
            StagingError::QuotaFiles { pending, max } => ApiError::FileQuotaExceeded {
                pending_files: pending,
                max,
            },
            StagingError::Spool(io) => {
                tracing::warn!(error = %io, "spool unavailable");
                ApiError::SpoolUnavailable
            }
            StagingError::Storage(s) => s.into(),
            StagingError::Db(db) => db.into(),
            StagingError::ClientGone(_) => ApiError::MalformedMultipart,
            StagingError::TokenRevoked => ApiError::InvalidToken,
            StagingError::WorkspaceRemoved => ApiError::WorkspaceNotFound,
            StagingError::Task(e) => ApiError::internal(e),
        }
    }
}

impl From<crate::stored::Refused> for ApiError {
    fn from(r: crate::stored::Refused) -> Self {
        match r {
            crate::stored::Refused::Full => ApiError::StorageFull,
            crate::stored::Refused::Share { retry_after } => ApiError::StorageShare {
                retry_after_secs: retry_after.as_secs(),
            },
        }
    }
}
