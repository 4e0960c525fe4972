//! `POST /workspaces/:id/chat/uploads`: poll workspaces get their files staged (`staging`);
//! push workspaces get the request streamed through to them (`push`).

use axum::{
    body::Body,
    extract::State,
    http::{header, HeaderMap},
    response::{IntoResponse, Response},
    Json,
};

use super::{
    body::UploadBody, error::ApiError, extract::WorkspaceClaim, registry::live_workspace, AppState,
};
use crate::{
    api::{self, UploadResult},
    db::{self, uploads::PendingTotals, workspaces::Workspace, Checked},
    logfmt::Clip,
    metrics::metrics,
    multipart::{self, Multipart},
    slots::{self, Slot},
    staging::{self, RequestLimits},
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

/// The mode column as rows hold it: our binary writes `push`/`poll`, the platform's rows may
/// hold NULL or `''` (which mean push).
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
    request_body(content = api::UploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "OK", body = UploadResult),
        (status = 400, description = "invalid workspace ID, malformed multipart, no files, too many files, empty file, push URL not allowed", body = api::ErrorBody),
        (status = 401, description = "missing or invalid bearer", body = api::ErrorBody),
        (status = 404, description = "workspace not found", body = api::ErrorBody),
        (status = 408, description = "request body stalled or too slow", body = api::ErrorBody),
        (status = 413, description = "file or request over its cap", body = api::ErrorBody),
        (status = 422, description = "workspace has no callback URL", body = api::ErrorBody),
        (status = 429, description = "workspace pending-upload quota exceeded, or its upload slots taken, or this client address its SLOT_SHARE_PER_CLIENT of them (code client_busy), or staged its STORED_SHARE_PER_CLIENT of MAX_STORED_BYTES in the last day (code storage_share, Retry-After)", body = api::ErrorBody),
        (status = 502, description = "workspace unreachable", body = api::ErrorBody),
        (status = 503, description = "datastore, storage, spool or upload capacity unavailable; MAX_STORED_BYTES reached (code storage_full); or push URL not registered", body = api::ErrorBody),
    )
)]
pub async fn chat_upload(
    State(st): State<AppState>,
    who: WorkspaceClaim,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // The caller check, the workspace and its pending totals: one round trip.
    let (workspace_id, hash) = (who.workspace_id, who.credential.token_hash());
    let found = st
        .db
        .run(move |c| Box::pin(db::workspaces::for_upload(c, workspace_id, hash)))
        .await?;
    let (ws, pending) = match found {
        Checked::Refused => return Err(ApiError::InvalidToken),
        Checked::Allowed(None) => return Err(ApiError::WorkspaceNotFound),
        Checked::Allowed(Some((ws, pending))) => (live_workspace(Some(ws))?, pending),
    };
    let delivery = delivery(Some(&ws.delivery_mode), ws.url.as_deref());
    // Refused here, before its body: its line and count as a refusal further on has them (a
    // 413 by its Content-Length or a 429 for its slot wrote nothing; an audit).
    let staged_in = matches!(delivery, Delivery::Poll).then(|| st.storage.mode().as_str());
    let refused = |e| upload_rejected(ws.id, who.client, staged_in, e);
    let content_length = declared_length(&headers);
    let max_request_bytes = st.limits.max_request_bytes;
    if content_length.is_some_and(|len| len > max_request_bytes) {
        return Err(refused(ApiError::RequestTooLarge {
            max: max_request_bytes,
        }));
    }
    // Relays have slots of their own: a push workspace slow to answer (anyone can register
    // one) must not take the ones staged uploads need.
    let slots = match delivery {
        Delivery::Push { .. } => &st.push_slots,
        _ => &st.upload_slots,
    };
    // Held by whatever outlives this handler when the client goes: the staging commit (its
    // own task) or the relay.
    let slot = slots.acquire(ws.id, who.client).map_err(|no| {
        refused(match no {
            slots::Refused::Replica => ApiError::UploadCapacity,
            slots::Refused::Workspace => ApiError::WorkspaceBusy,
            slots::Refused::Client => ApiError::ClientBusy,
        })
    })?;
    let body = UploadBody::new(body, max_request_bytes, st.deadlines.upload, content_length);
    match delivery {
        Delivery::Poll => {
            let from = Upload {
                ws: &ws,
                token_hash: hash,
                client: who.client,
            };
            stage(&st, from, pending, &headers, body, slot).await
        }
        Delivery::Push { url } => {
            let secret = ws.platform_inbound_secret.as_deref();
            st.push
                .forward(ws.id, url, secret, &headers, body, slot)
                .await
        }
        Delivery::UrlNotRegistered => Err(ApiError::UrlNotRegistered),
        Delivery::NoCallbackUrl => Err(ApiError::NoCallbackUrl {
            detail: format!(
                "workspace {} has delivery_mode '{}' and no url: register a url (push) or switch to delivery_mode 'poll'",
                ws.id,
                Clip(&ws.delivery_mode)
            ),
        }),
    }
}

/// The request's Content-Length, when it declares one.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Says that an upload's client went before its answer: hyper drops the request's future
/// when it reads the client's end of the connection (a close, or a half-close, once the body
/// is in), and before this nothing said so (a red team: 0 lines, where SPEC §8 wants one).
/// Disarmed once the upload's answer is decided or its commit has begun (which says itself
/// how it ends).
struct Unanswered {
    workspace_id: uuid::Uuid,
    client: Option<std::net::IpAddr>,
    backend: &'static str,
    armed: std::sync::atomic::AtomicBool,
    /// The replica's `accepting` flag: false once a shutdown began, whose drain's end also
    /// drops an unanswered upload.
    accepting: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Unanswered {
    fn disarm(&self) {
        self.armed
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.armed.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let client = self.client.map(|c| c.to_string());
        let error = match self.accepting.load(std::sync::atomic::Ordering::SeqCst) {
            true => "the client went away before its answer",
            false => "the client went away, or the shutdown's drain ended, before its answer",
        };
        tracing::info!(
            event = "failed", workspace_id = %self.workspace_id, client = client.as_deref(),
            error, "upload abandoned"
        );
        metrics()
            .files_staged
            .with_label_values(&[self.backend, "rejected"])
            .inc();
    }
}

/// An upload's refusal, its one line (SPEC §8), counted when its files were to be staged
/// (`staged_in`, the backend; a push workspace's relay counts nothing here).
fn upload_rejected(
    workspace_id: uuid::Uuid,
    client: Option<std::net::IpAddr>,
    staged_in: Option<&'static str>,
    e: ApiError,
) -> ApiError {
    let client = client.map(|c| c.to_string());
    tracing::info!(
        event = "failed", %workspace_id, client = client.as_deref(),
        status = e.status().as_u16(), error = %e, "upload rejected"
    );
    if let Some(backend) = staged_in {
        metrics()
            .files_staged
            .with_label_values(&[backend, "rejected"])
            .inc();
    }
    e
}

/// Whose upload it is: the workspace, the token it came with, and the client address its
/// share of MAX_STORED_BYTES is counted under (`None`: not counted).
struct Upload<'a> {
    ws: &'a Workspace,
    token_hash: Option<[u8; 32]>,
    client: Option<std::net::IpAddr>,
}

async fn stage(
    st: &AppState,
    from: Upload<'_>,
    pending: PendingTotals,
    headers: &HeaderMap,
    body: UploadBody,
    slot: Slot,
) -> Result<Response, ApiError> {
    let Upload {
        ws,
        token_hash,
        client,
    } = from;
    let backend = st.storage.mode().as_str();
    let unanswered = Unanswered {
        workspace_id: ws.id,
        client,
        backend,
        armed: std::sync::atomic::AtomicBool::new(true),
        accepting: st.accepting.clone(),
    };
    // Every refusal below goes through here: it is the upload's one line.
    let rejected = |e: ApiError| {
        unanswered.disarm();
        upload_rejected(ws.id, client, Some(backend), e)
    };
    // Cheap early refusal before reading any body; the binding check is in the transaction.
    let quota = st.stager.quota;
    if pending.bytes as u64 >= quota.max_bytes {
        return Err(rejected(ApiError::QuotaExceeded {
            pending_bytes: pending.bytes,
            max: quota.max_bytes,
        }));
    }
    if pending.files as u64 >= quota.max_files {
        return Err(rejected(ApiError::FileQuotaExceeded {
            pending_files: pending.files,
            max: quota.max_files,
        }));
    }
    let body_len = body.declared_length();
    st.stored
        .admit(client, body_len)
        .map_err(|r| rejected(r.into()))?;

    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(multipart::boundary)
        .ok_or_else(|| rejected(ApiError::MalformedMultipart))?;
    let limits = RequestLimits {
        max_files: st.limits.max_files_per_request,
        max_file_bytes: st.limits.max_file_bytes,
        max_filename_chars: st.limits.max_filename_chars,
    };
    let memory = st.spool_memory.reserve(body_len);
    let hashing = st.storage.hashing();
    let cut = body.cut_flag();
    let mut parts = Multipart::new(body, &boundary, multipart::Limits::default());
    let follow = body_len
        .filter(|_| st.storage.writes_s3())
        .map(|body_len| staging::Follow {
            storage: &st.storage,
            workspace_id: ws.id,
            body_len,
        });
    // No object of this upload is older than this.
    let began = std::time::Instant::now();
    let received = staging::receive(&mut parts, &limits, &st.spool_dir, memory, hashing, follow);
    let files = match received.await {
        Ok(files) => files,
        Err(e) => {
            // A cut while parsing (over the cap, too slow, the body broken) is the answer; one
            // while draining after the parse failed is not: the parse's error is what the
            // client did wrong first.
            let cut_in_parse = cut.get();
            if cut_in_parse.is_none() {
                staging::drain(&mut parts).await;
            }
            let e = match cut_in_parse {
                Some(cut) => cut.answer(st.limits.max_request_bytes),
                None => e.into(),
            };
            return Err(rejected(e));
        }
    };
    drop(parts);
    let reserved: u64 = files
        .iter()
        .map(|f| db::uploads::stored_cost(f.spool.size))
        .sum();
    let reservation = st
        .stored
        .try_reserve(reserved, files.len() as u64, client)
        .map_err(|r| rejected(r.into()))?;
    // The commit's task says how it ends from here, whether the client waits for it or not.
    let committed = st
        .stager
        .commit(ws.id, token_hash, files, began, slot, reservation);
    unanswered.disarm();
    let staged = committed.await?;
    let files = staged.into_iter().map(|s| s.file).collect();
    Ok(Json(UploadResult { files }).into_response())
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
        assert_eq!(resp.status(), axum::http::StatusCode::UNPROCESSABLE_ENTITY);
    }
}
