//! `POST /workspaces/:id/chat/uploads`: poll workspaces get their files staged; push
//! workspaces get the request streamed through to them unchanged.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::{Path, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use futures::{Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use super::{error::ApiError, pending::platform_uri, registry::live_workspace, AppState};
use crate::{
    db::{self, activity::NewActivity, uploads::NewUpload, workspaces::Workspace},
    metrics::metrics,
    sanitize::sanitize,
    spool::{Spool, SpoolWriter},
    storage::Placement,
};

/// Where an upload for this workspace goes (SPEC §4 Upload, step 2).
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery<'a> {
    Poll,
    Push {
        url: &'a str,
    },
    /// Neither poll nor push with a URL: nothing can receive the file.
    NoCallbackUrl,
    /// Push mode, but the workspace has not told us its URL yet.
    UrlNotRegistered,
}

pub fn delivery<'a>(mode: Option<&str>, url: Option<&'a str>) -> Delivery<'a> {
    let url = url.map(str::trim).filter(|u| !u.is_empty());
    match (mode.map(str::trim).unwrap_or(""), url) {
        ("poll", _) => Delivery::Poll,
        ("push" | "", Some(url)) => Delivery::Push { url },
        ("push", None) => Delivery::UrlNotRegistered,
        _ => Delivery::NoCallbackUrl,
    }
}

#[utoipa::path(
    post,
    path = "/workspaces/{id}/chat/uploads",
    tag = "uploads",
    summary = "Upload files (poll: staged; push: streamed to the workspace)",
    params(("id" = uuid::Uuid, Path, description = "workspace UUID")),
    request_body(content = crate::http::openapi::UploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "OK", body = crate::http::openapi::UploadResult),
        (status = 400, description = "invalid workspace ID, malformed multipart, no files, too many files, empty file", body = crate::http::openapi::ErrorBody),
        (status = 404, description = "workspace not found", body = crate::http::openapi::ErrorBody),
        (status = 408, description = "request body stalled", body = crate::http::openapi::ErrorBody),
        (status = 413, description = "file or request over its cap", body = crate::http::openapi::ErrorBody),
        (status = 422, description = "workspace has no callback URL", body = crate::http::openapi::ErrorBody),
        (status = 429, description = "workspace pending-upload quota exceeded", body = crate::http::openapi::ErrorBody),
        (status = 500, description = "internal error", body = crate::http::openapi::ErrorBody),
        (status = 502, description = "workspace unreachable", body = crate::http::openapi::ErrorBody),
        (status = 503, description = "datastore, storage or upload capacity unavailable; or push URL not registered", body = crate::http::openapi::ErrorBody),
        (status = 401, description = "missing or invalid bearer", body = crate::http::openapi::ErrorBody),
    )
)]
pub async fn chat_upload(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (workspace_id, _) = st.auth.workspace(&headers, &id).await?;
    let ws = live_workspace(&st.pool, workspace_id).await?;
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if content_length.is_some_and(|len| len > st.limits.max_request_bytes) {
        return Err(ApiError::RequestTooLarge {
            max: st.limits.max_request_bytes,
        });
    }
    let _slot = UploadSlot::acquire(&st.upload_slots)?;
    let body = CappedBody::new(body, st.limits.max_request_bytes, st.body_idle_timeout);
    match delivery(Some(&ws.delivery_mode), ws.url.as_deref()) {
        Delivery::Poll => stage(&st, &ws, &headers, body).await,
        Delivery::Push { url } => forward(&st, &ws, url, &headers, body).await,
        Delivery::UrlNotRegistered => Err(ApiError::UrlNotRegistered),
        Delivery::NoCallbackUrl => Err(ApiError::NoCallbackUrl {
            detail: format!(
                "workspace {} has delivery_mode {:?} and no url: register a url (push) or switch to delivery_mode 'poll'",
                ws.id, ws.delivery_mode
            ),
        }),
    }
}

/// One of the `MAX_CONCURRENT_UPLOADS` slots; counted in `uploads_in_progress` while held.
struct UploadSlot {
    _permit: OwnedSemaphorePermit,
}

impl UploadSlot {
    fn acquire(slots: &Arc<Semaphore>) -> Result<UploadSlot, ApiError> {
        let permit = slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::UploadCapacity)?;
        metrics().uploads_in_progress.inc();
        Ok(UploadSlot { _permit: permit })
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        metrics().uploads_in_progress.dec();
    }
}

/// One file part, fully received.
struct Received {
    original: String,
    name: String,
    mimetype: String,
    spool: Spool,
}

async fn stage(
    st: &AppState,
    ws: &Workspace,
    headers: &HeaderMap,
    body: CappedBody,
) -> Result<Response, ApiError> {
    let quota = st.limits.max_pending_bytes_per_workspace;
    // Cheap early refusal before reading any body; the binding check is in the transaction.
    let pending = db::uploads::pending_bytes(&st.pool, ws.id).await?;
    if pending as u64 >= quota {
        return Err(ApiError::QuotaExceeded {
            pending_bytes: pending,
            max: quota,
        });
    }

    let cut = body.cut.clone();
    let files = match receive(st, headers, body).await {
        Ok(files) => files,
        Err(e) => {
            let e = cut_reason(&cut, &st.limits).unwrap_or(e);
            tracing::info!(event = "failed", workspace_id = %ws.id, status = e.status().as_u16(), error = %e, "upload rejected");
            metrics()
                .files_staged
                .with_label_values(&[st.storage.mode().as_str(), "rejected"])
                .inc();
            return Err(e);
        }
    };

    let mut placements = Vec::with_capacity(files.len());
    let out = match commit(st, ws, &files, &mut placements).await {
        Ok(out) => out,
        Err(e) => {
            st.storage.discard(&placements).await;
            metrics()
                .files_staged
                .with_label_values(&[st.storage.mode().as_str(), "failed"])
                .inc_by(files.len() as u64);
            tracing::warn!(event = "failed", workspace_id = %ws.id, files = files.len(), error = %e, "upload not staged");
            return Err(e);
        }
    };
    let backend = st.storage.mode().as_str();
    for ((file_id, _), f) in out.iter().zip(&files) {
        let m = metrics();
        m.files_staged.with_label_values(&[backend, "ok"]).inc();
        m.bytes_staged
            .with_label_values(&[backend])
            .inc_by(f.spool.size);
        m.upload_size.observe(f.spool.size as f64);
        tracing::info!(
            event = "staged", workspace_id = %ws.id, %file_id, size = f.spool.size,
            name = %f.name, original = %f.original, backend = st.storage.mode().as_str(),
            "upload staged"
        );
    }
    let files: Vec<Value> = out.into_iter().map(|(_, e)| e).collect();
    Ok(Json(json!({ "files": files })).into_response())
}

/// Stores every file and its activity row in one transaction. `placements` collects what
/// was written outside the database, so the caller can remove it if this fails.
async fn commit(
    st: &AppState,
    ws: &Workspace,
    files: &[Received],
    placements: &mut Vec<Placement>,
) -> Result<Vec<(Uuid, Value)>, ApiError> {
    let quota = st.limits.max_pending_bytes_per_workspace;
    let incoming: u64 = files.iter().map(|f| f.spool.size).sum();
    let mut tx = st.pool.begin().await?;
    // The bytes go in first, without the workspace lock: the rows stay invisible to everyone
    // else until commit, so concurrent uploads to one workspace copy in parallel.
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let file_id = Uuid::new_v4();
        let placement = st.storage.put(ws.id, file_id, &f.spool).await?;
        placements.push(placement.clone());
        db::uploads::insert(
            &mut tx,
            &NewUpload {
                file_id,
                workspace_id: ws.id,
                filename: &f.name,
                mimetype: &f.mimetype,
                spool: &f.spool,
                placement: &placement,
            },
        )
        .await?;
        let entry = json!({
            "uri": platform_uri(ws.id, file_id),
            "name": f.name,
            "mimeType": f.mimetype,
            "size": f.spool.size,
        });
        out.push((file_id, entry));
    }
    // Then, under the lock until commit: the quota check (it sees every committed upload;
    // ours count when we commit, before the lock is released) and the activity rows (so
    // `seq` follows commit order).
    db::lock_workspace(&mut tx, ws.id).await?;
    let pending = db::uploads::pending_bytes(&mut *tx, ws.id).await?;
    if pending as u64 + incoming > quota {
        return Err(ApiError::QuotaExceeded {
            pending_bytes: pending,
            max: quota,
        });
    }
    for ((file_id, entry), f) in out.iter().zip(files) {
        let mut request_body = entry.clone();
        request_body["file_id"] = json!(file_id);
        db::activity::insert(
            &mut tx,
            &NewActivity {
                workspace_id: ws.id,
                activity_type: "a2a_receive",
                target_id: Some(ws.id),
                method: "chat_upload_receive",
                summary: format!("chat_upload_receive: {}", f.name),
                request_body,
            },
        )
        .await?;
    }
    tx.commit().await?;
    Ok(out)
}

/// Parses the multipart body as a stream, spooling each `files` part to disk.
async fn receive(
    st: &AppState,
    headers: &HeaderMap,
    body: CappedBody,
) -> Result<Vec<Received>, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or(ApiError::MalformedMultipart)?;
    let boundary =
        multer::parse_boundary(content_type).map_err(|_| ApiError::MalformedMultipart)?;
    let mut multipart = multer::Multipart::new(body, boundary);
    let result = receive_parts(st, &mut multipart).await;
    if result.is_err() {
        // Read what the client is still sending (bounded by the request cap) so it sees our
        // answer instead of a reset connection.
        drain(&mut multipart).await;
    }
    result
}

async fn receive_parts(
    st: &AppState,
    multipart: &mut multer::Multipart<'_>,
) -> Result<Vec<Received>, ApiError> {
    let limits = &st.limits;
    let mut files = Vec::new();
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|_| ApiError::MalformedMultipart)?
    {
        if field.name() != Some("files") {
            while field
                .chunk()
                .await
                .map_err(|_| ApiError::MalformedMultipart)?
                .is_some()
            {}
            continue;
        }
        if files.len() == limits.max_files_per_request {
            return Err(ApiError::TooManyFiles(limits.max_files_per_request));
        }
        let original = field.file_name().unwrap_or("").to_string();
        let mimetype = reduce_mimetype(field.headers().get(header::CONTENT_TYPE));
        let mut writer =
            SpoolWriter::create(&st.spool_dir).map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Err(e) = spool_field(&mut field, &mut writer, &original, limits.max_file_bytes).await
        {
            // Closed before we answer: a refused upload leaves no open temp file behind.
            writer.discard().await;
            return Err(e);
        }
        let spool = writer
            .finish()
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        files.push(Received {
            name: sanitize(&original, limits.max_filename_chars),
            original,
            mimetype,
            spool,
        });
    }
    if files.is_empty() {
        return Err(ApiError::NoFiles);
    }
    Ok(files)
}

/// Copies one file part into its spool, enforcing the per-file cap; an empty part is refused.
async fn spool_field(
    field: &mut multer::Field<'_>,
    writer: &mut SpoolWriter,
    original: &str,
    max_file_bytes: u64,
) -> Result<(), ApiError> {
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|_| ApiError::MalformedMultipart)?
    {
        let seen = writer.size() + chunk.len() as u64;
        if seen > max_file_bytes {
            return Err(ApiError::FileTooLarge {
                filename: original.to_string(),
                size: seen,
                max: max_file_bytes,
            });
        }
        writer
            .write(&chunk)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
    }
    if writer.size() == 0 {
        return Err(ApiError::EmptyFile {
            filename: original.to_string(),
        });
    }
    Ok(())
}

async fn drain(multipart: &mut multer::Multipart<'_>) {
    while let Ok(Some(mut field)) = multipart.next_field().await {
        while let Ok(Some(_)) = field.chunk().await {}
    }
}

/// A part's Content-Type reduced to `type/subtype`; anything odd becomes
/// application/octet-stream, a missing one "".
pub fn reduce_mimetype(value: Option<&HeaderValue>) -> String {
    const FALLBACK: &str = "application/octet-stream";
    let Some(value) = value else {
        return String::new();
    };
    let Ok(raw) = std::str::from_utf8(value.as_bytes()) else {
        return FALLBACK.into();
    };
    let essence = raw.split(';').next().unwrap_or("").trim();
    let valid = match essence.split_once('/') {
        Some((t, s)) => {
            !t.is_empty()
                && !s.is_empty()
                && !s.contains('/')
                && essence.chars().all(|c| c.is_ascii_graphic())
        }
        None => false,
    };
    if valid {
        essence.to_string()
    } else {
        FALLBACK.into()
    }
}

/// Streams the request body unchanged to a push workspace and relays its answer.
async fn forward(
    st: &AppState,
    ws: &Workspace,
    url: &str,
    headers: &HeaderMap,
    body: CappedBody,
) -> Result<Response, ApiError> {
    let target = format!("{}/internal/chat/uploads/ingest", url.trim_end_matches('/'));
    let cut = body.cut.clone();
    let mut req = st.http.post(&target).body(reqwest::Body::wrap_stream(body));
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    if let Some(secret) = ws
        .platform_inbound_secret
        .as_deref()
        .filter(|s| !s.is_empty())
    {
        req = req.bearer_auth(secret);
    }
    let resp = match req.send().await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::warn!(workspace_id = %ws.id, %target, error = %e, "push delivery failed");
            // our own cut (cap, stalled client) is the client's fault, not the workspace's
            return Err(cut_reason(&cut, &st.limits).unwrap_or(ApiError::WorkspaceUnreachable));
        }
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    tracing::info!(event = "pushed", workspace_id = %ws.id, status = status.as_u16(), "upload forwarded to workspace");
    let mut out = Response::builder().status(status);
    if let Some(ct) = resp.headers().get(header::CONTENT_TYPE) {
        out = out.header(header::CONTENT_TYPE, ct.as_bytes());
    }
    out.body(Body::from_stream(resp.bytes_stream()))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// The request body as a stream that fails once more than `max` bytes have arrived, or
/// when nothing arrives for `idle` (a client trickling bytes cannot hold a slot forever).
pub struct CappedBody {
    inner: axum::body::BodyDataStream,
    seen: u64,
    max: u64,
    idle: Duration,
    idle_deadline: Pin<Box<tokio::time::Sleep>>,
    /// Why the stream failed, if it was our doing.
    cut: Arc<Mutex<Option<Cut>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    OverCap,
    Stalled,
}

#[derive(Debug, thiserror::Error)]
#[error("request body cut off: {0:?}")]
struct CutError(Cut);

impl CappedBody {
    fn new(body: Body, max: u64, idle: Duration) -> Self {
        CappedBody {
            inner: body.into_data_stream(),
            seen: 0,
            max,
            idle,
            idle_deadline: Box::pin(tokio::time::sleep(idle)),
            cut: Arc::new(Mutex::new(None)),
        }
    }

    fn fail(&mut self, why: Cut) -> Poll<Option<<Self as Stream>::Item>> {
        if let Ok(mut cut) = self.cut.lock() {
            *cut = Some(why);
        }
        Poll::Ready(Some(Err(Box::new(CutError(why)))))
    }
}

/// Our reason for a failed body, if it was ours: the error answer to give instead.
fn cut_reason(
    cut: &Arc<Mutex<Option<Cut>>>,
    limits: &crate::config::LimitArgs,
) -> Option<ApiError> {
    match cut.lock().ok().and_then(|c| *c) {
        Some(Cut::OverCap) => Some(ApiError::RequestTooLarge {
            max: limits.max_request_bytes,
        }),
        Some(Cut::Stalled) => Some(ApiError::BodyStalled),
        None => None,
    }
}

impl Stream for CappedBody {
    type Item = Result<Bytes, Box<dyn std::error::Error + Send + Sync>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.cut.lock().map(|c| c.is_some()).unwrap_or(true) {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                self.seen += chunk.len() as u64;
                if self.seen > self.max {
                    return self.fail(Cut::OverCap);
                }
                let next = tokio::time::Instant::now() + self.idle;
                self.idle_deadline.as_mut().reset(next);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.idle_deadline.as_mut().poll(cx) {
                Poll::Ready(()) => self.fail(Cut::Stalled),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_routes() {
        assert_eq!(delivery(Some("poll"), None), Delivery::Poll);
        assert_eq!(delivery(Some("poll"), Some("http://x")), Delivery::Poll);
        assert_eq!(
            delivery(Some("push"), Some("http://x")),
            Delivery::Push { url: "http://x" }
        );
        assert_eq!(
            delivery(None, Some("http://x")),
            Delivery::Push { url: "http://x" }
        );
        assert_eq!(
            delivery(Some(""), Some(" http://x ")),
            Delivery::Push { url: "http://x" }
        );
        assert_eq!(delivery(Some("push"), None), Delivery::UrlNotRegistered);
        assert_eq!(
            delivery(Some("push"), Some("  ")),
            Delivery::UrlNotRegistered
        );
        assert_eq!(delivery(None, None), Delivery::NoCallbackUrl);
        assert_eq!(delivery(Some(""), Some("")), Delivery::NoCallbackUrl);
    }

    #[test]
    fn no_callback_url_answer() {
        let resp = ApiError::NoCallbackUrl { detail: "d".into() }.into_response();
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }

    #[test]
    fn mimetypes() {
        let hv = |s: &str| HeaderValue::from_str(s).unwrap();
        let cases = [
            ("text/plain", "text/plain"),
            ("text/plain; charset=utf-8", "text/plain"),
            ("Application/PDF", "Application/PDF"),
            ("image/svg+xml", "image/svg+xml"),
            ("textplain", "application/octet-stream"),
            ("text/ plain", "application/octet-stream"),
            ("text/pl ain", "application/octet-stream"),
            ("text/plain/x", "application/octet-stream"),
            ("/plain", "application/octet-stream"),
            ("text/", "application/octet-stream"),
            ("text/pl\tain", "application/octet-stream"),
        ];
        for (input, want) in cases {
            assert_eq!(reduce_mimetype(Some(&hv(input))), want, "{input:?}");
        }
        assert_eq!(reduce_mimetype(None), "");
        let non_ascii = HeaderValue::from_bytes(b"text/pl\xe9in").unwrap();
        assert_eq!(
            reduce_mimetype(Some(&non_ascii)),
            "application/octet-stream"
        );
    }
}
