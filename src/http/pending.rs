//! The workspace side of staged files: list, content (GET/HEAD, ranges), ack.

use crate::logfmt::clip;
use std::sync::Arc;

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use base64::{engine::general_purpose::STANDARD, Engine};
use futures::{StreamExt, TryStreamExt};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use super::{
    answer,
    error::ApiError,
    extract::{FileId, WorkspaceClaim},
    AppState,
};
use crate::{
    api::{self, platform_uri, Acked, PendingUpload},
    auth::Credential,
    db::{
        self,
        uploads::{Head, Live, Pieces, UploadRow},
        Checked, Db,
    },
    fetched::FetchedStamps,
    metrics::metrics,
    slots::Slot,
    storage::{
        bytea::{self, READ_CHUNK, WHOLE_PIECE, WHOLE_UP_TO},
        ByteRange, Storage, StorageError,
    },
};

fn pending_upload(row: &UploadRow) -> PendingUpload {
    PendingUpload {
        file_id: row.file_id,
        name: row.filename.clone(),
        mime_type: row.mimetype.clone(),
        size: row.size_bytes,
        uri: platform_uri(row.workspace_id, row.file_id),
        created_at: row.created_at,
        expires_at: row.expires_at,
        fetched_at: row.fetched_at,
    }
}

#[utoipa::path(
    get,
    path = "/workspaces/{id}/pending-uploads",
    tag = "pending",
    summary = "Unacked, unexpired uploads, oldest first",
    params(("id" = uuid::Uuid, Path, description = "workspace UUID")),
    responses(
        (status = 200, description = "OK", body = Vec<PendingUpload>),
        (status = 400, description = "invalid workspace ID", body = api::ErrorBody),
        (status = 401, description = "missing or invalid bearer", body = api::ErrorBody),
        (status = 429, description = "an answer over 16 KiB while the workspace has MAX_CONCURRENT_DOWNLOADS_PER_WORKSPACE downloads and large answers streaming, or this client address its SLOT_SHARE_PER_CLIENT of them (code client_busy) (Retry-After)", body = api::ErrorBody),
        (status = 503, description = "datastore unavailable, or an answer over 16 KiB while MAX_CONCURRENT_DOWNLOADS downloads and large answers are streaming (Retry-After)", body = api::ErrorBody),
    )
)]
pub async fn list(State(st): State<AppState>, who: WorkspaceClaim) -> Result<Response, ApiError> {
    let (workspace_id, credential) = (who.workspace_id, who.credential);
    // The first page before the answer starts, so a database failure is still a clean 503.
    let first = match page(&st.db, workspace_id, credential, None).await? {
        Checked::Refused => return Err(ApiError::InvalidToken),
        Checked::Allowed(rows) => rows,
    };
    if first.len() < LIST_PAGE as usize {
        // The common case, one page: a plain answer with its Content-Length.
        let items: Vec<PendingUpload> = first.iter().map(pending_upload).collect();
        return answer::json(&st, who, &items);
    }
    let slot = answer::download_slot(&st, who)?;
    let db = st.db.clone();
    let pages = futures::stream::try_unfold(Some((first, true)), move |state| {
        let db = db.clone();
        async move {
            let Some((rows, first)) = state else {
                return Ok(None);
            };
            let mut chunk = json_items(&rows, first);
            let next = match rows.last() {
                Some(last) if rows.len() == LIST_PAGE as usize => {
                    let after = (last.created_at, last.seq);
                    let rows = page(&db, workspace_id, credential, Some(after))
                        .await
                        .inspect_err(
                            |e| tracing::warn!(%workspace_id, error = %e, "pending list cut short"),
                        )?;
                    // The caller was allowed a moment ago; a token revoked since ends the list.
                    let rows = match rows {
                        Checked::Allowed(rows) => rows,
                        Checked::Refused => Vec::new(),
                    };
                    Some((rows, false))
                }
                _ => {
                    chunk.push(']');
                    None
                }
            };
            Ok::<_, db::DbError>(Some((Bytes::from(chunk), next)))
        }
    });
    let pieces = pages
        .map_ok(|page| {
            futures::stream::iter(answer::pieces(page).into_iter().map(Ok::<_, db::DbError>))
        })
        .try_flatten()
        .map(move |piece| {
            let _held = &slot;
            piece
        });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(pieces),
    )
        .into_response())
}

/// One page of the list as JSON array items; the first page opens the array.
fn json_items(rows: &[UploadRow], first: bool) -> String {
    let mut out = String::from(if first { "[" } else { "" });
    for (i, row) in rows.iter().enumerate() {
        if !(first && i == 0) {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(&pending_upload(row)).unwrap_or_default());
    }
    out
}

/// One page of the workspace's pending rows after `after` (a row's `(created_at, seq)`).
async fn page(
    db: &Db,
    workspace_id: Uuid,
    credential: Credential,
    after: Option<(chrono::DateTime<chrono::Utc>, i64)>,
) -> Result<Checked<Vec<UploadRow>>, db::DbError> {
    let hash = credential.token_hash();
    db.run(move |c| {
        Box::pin(db::uploads::list_pending_page(
            c,
            workspace_id,
            hash,
            after,
            LIST_PAGE,
        ))
    })
    .await
}

/// Rows per page of the list (about 170 KB of JSON at most). The answer is streamed a page at
/// a time, so its memory does not grow with the number of pending uploads (small files can
/// make that hundreds of thousands), and one longer than a page holds a download slot
/// (`answer`): a client that stops reading keeps a page or two, and only so many of them.
const LIST_PAGE: i64 = 200;

/// The caller's row, with its first bytes when they were read with it, the pieces that
/// follow them when the file is read whole with it, and the read-ahead room reserved for them.
struct Found {
    row: UploadRow,
    head: Option<Bytes>,
    rest: Option<Pieces>,
    reserved: Option<OwnedSemaphorePermit>,
}

/// Finds the caller's live row (a foreign row is as missing): the caller check, the row and a
/// small file's bytes in one round trip. Given the replica's `read_ahead` budget, it reads the
/// first slice of the row's inline content with it, or all of a file of up to
/// [`WHOLE_UP_TO`] when the budget has room: reserved once the connection is in hand (a
/// request waiting for one holds none of it) and returned with the row. It returns once the
/// row and its first piece came: the other pieces follow in `rest` while the response is sent.
async fn find(
    st: &AppState,
    who: WorkspaceClaim,
    file_id: Uuid,
    read_ahead: Option<Arc<Semaphore>>,
) -> Result<Found, ApiError> {
    let (workspace_id, hash) = (who.workspace_id, who.credential.token_hash());
    let (found_tx, mut found_rx) = tokio::sync::oneshot::channel();
    // Unbounded, but it never holds more than the file's pieces after the first (a whole read
    // is at most WHOLE_UP_TO): a bounded one would have the read wait on the client while it
    // holds a connection (SPEC §10).
    let (rest_tx, rest) = futures::channel::mpsc::unbounded();
    let run = st.db.run(move |c| {
        let mut reserved = read_ahead.as_ref().and_then(bytea::reserve_whole);
        let head = read_ahead.is_some().then(|| Head {
            len: READ_CHUNK,
            whole_up_to: reserved.is_some().then_some(WHOLE_UP_TO),
            piece: WHOLE_PIECE,
        });
        // Half the room is for sqlx's read buffer, held until the last piece is read; the
        // other half goes with the row, for the pieces (`bytea::reserve_whole`).
        let reading = reserved.as_mut().and_then(|r| r.split(r.num_permits() / 2));
        let found = move |found| {
            let _ = found_tx.send((found, reserved));
        };
        let read = db::uploads::get_live_for(c, workspace_id, hash, file_id, head, found, rest_tx);
        let read = crate::arena::big_blocks(crate::arena::read_buffer(WHOLE_PIECE), read);
        Box::pin(async move {
            let _reading = reading;
            read.await
        })
    });
    let mut run = std::pin::pin!(run);
    let lost = || ApiError::internal(anyhow::anyhow!("the row's read ended without it"));
    // The work goes on in its own task once the row came (`Db::run`).
    let found = tokio::select! {
        found = &mut found_rx => match found {
            Ok(found) => found,
            // Dropped unsent: the work failed, or was cut, before the row came.
            Err(_) => {
                run.await?;
                return Err(lost());
            }
        },
        ran = &mut run => {
            ran?;
            found_rx.await.map_err(|_| lost())?
        }
    };
    let (checked, reserved) = found;
    match checked {
        Checked::Refused => Err(ApiError::InvalidToken),
        Checked::Allowed(None) => Err(ApiError::UploadNotFound),
        Checked::Allowed(Some(Live { row, head, whole })) => Ok(Found {
            row,
            head: head.map(Bytes::from),
            rest: whole.then_some(rest),
            reserved,
        }),
    }
}

#[utoipa::path(
    head,
    path = "/workspaces/{id}/pending-uploads/{file_id}/content",
    tag = "pending",
    summary = "Headers of a file",
    params(("id" = uuid::Uuid, Path, description = "workspace UUID"), ("file_id" = uuid::Uuid, Path, description = "file UUID"), ("Range" = Option<String>, Header, description = "bytes=a-b"), ("If-Range" = Option<String>, Header, description = "the strong ETag of the copy being resumed: the Range is served only while it is current, else the whole file"), ("If-None-Match" = Option<String>, Header, description = "entity-tags of copies the client holds (or *): 304 when one is current"), ("If-Match" = Option<String>, Header, description = "entity-tags the bytes must have (or *): 412 when none is current, strongly compared")),
    responses(
        (status = 200, description = "headers only"),
        (status = 206, description = "headers of one range"),
        (status = 304, description = "If-None-Match names the current ETag: no bytes"),
        (status = 400, description = "invalid workspace ID or file_id"),
        (status = 401, description = "missing or invalid bearer"),
        (status = 404, description = "pending upload not found or expired"),
        (status = 412, description = "If-Match names no current ETag"),
        (status = 416, description = "range not satisfiable"),
        (status = 429, description = "a file only in S3, whose object is looked up under a download slot: the workspace has MAX_CONCURRENT_DOWNLOADS_PER_WORKSPACE downloads streaming, or this client address its SLOT_SHARE_PER_CLIENT of them (code client_busy) (Retry-After)"),
        (status = 503, description = "datastore or storage unavailable, or (a file only in S3) MAX_CONCURRENT_DOWNLOADS downloads streaming (Retry-After)"),
    )
)]
pub async fn content_head(
    State(st): State<AppState>,
    who: WorkspaceClaim,
    FileId(file_id): FileId,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let row = find(&st, who, file_id, None).await?.row;
    if let Some(answer) = preconditions(&headers, &row)? {
        return Ok(answer);
    }
    let (status, range) = requested_range(&headers, &row)?;
    // As its GET would answer: a row whose object was deleted out of band is a 404 here too,
    // not a 200 whose GET then fails. The bucket is asked under a download slot, as a GET
    // reads it: HEADs cannot have any number of S3 requests in flight.
    let loc = row.location();
    if Storage::presence_key(&loc).is_some() {
        let _slot = answer::download_slot(&st, who)?;
        if let Err(e) = st.storage.check_present(&loc).await {
            return Err(not_served(&row, st.storage.reader_name(&loc), e));
        }
    }
    Ok(respond(&row, status, range, Body::empty()))
}

#[utoipa::path(
    get,
    path = "/workspaces/{id}/pending-uploads/{file_id}/content",
    tag = "pending",
    summary = "Stream a file (Range supported)",
    params(("id" = uuid::Uuid, Path, description = "workspace UUID"), ("file_id" = uuid::Uuid, Path, description = "file UUID"), ("Range" = Option<String>, Header, description = "bytes=a-b"), ("If-Range" = Option<String>, Header, description = "the strong ETag of the copy being resumed: the Range is served only while it is current, else the whole file"), ("If-None-Match" = Option<String>, Header, description = "entity-tags of copies the client holds (or *): 304 when one is current"), ("If-Match" = Option<String>, Header, description = "entity-tags the bytes must have (or *): 412 when none is current, strongly compared")),
    responses(
        (status = 200, description = "the bytes", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 206, description = "one range of the bytes", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 304, description = "If-None-Match names the current ETag: no bytes"),
        (status = 400, description = "invalid workspace ID or file_id", body = api::ErrorBody),
        (status = 401, description = "missing or invalid bearer", body = api::ErrorBody),
        (status = 404, description = "pending upload not found or expired", body = api::ErrorBody),
        (status = 412, description = "If-Match names no current ETag", body = api::ErrorBody),
        (status = 416, description = "range not satisfiable", body = api::ErrorBody),
        (status = 429, description = "the workspace has MAX_CONCURRENT_DOWNLOADS_PER_WORKSPACE downloads streaming, or this client address its SLOT_SHARE_PER_CLIENT of them (code client_busy) (Retry-After)", body = api::ErrorBody),
        (status = 503, description = "datastore or storage unavailable, or MAX_CONCURRENT_DOWNLOADS downloads streaming (Retry-After)", body = api::ErrorBody),
    )
)]
pub async fn content(
    State(st): State<AppState>,
    who: WorkspaceClaim,
    FileId(file_id): FileId,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // Without a Range the first slice comes with the row (a file of up to 1 MiB whole, while
    // the read-ahead budget has room); a browser revalidating its copy (If-None-Match) most
    // likely needs no bytes at all, and a workspace with no download slot free gets its 429
    // without them. An If-Match names the file its client knows, which it most likely gets:
    // read ahead (a 412 drops what was read).
    let conditional = [header::RANGE, header::IF_NONE_MATCH]
        .iter()
        .any(|h| headers.contains_key(h));
    let refused = st.download_slots.would_refuse(who.workspace_id, who.client);
    let read_ahead = (!conditional && !refused).then(|| st.storage.read_ahead_budget());
    let Found {
        row,
        head,
        rest,
        reserved,
    } = find(&st, who, file_id, read_ahead).await?;
    if let Some(answer) = preconditions(&headers, &row)? {
        return Ok(answer);
    }
    let (status, range) = requested_range(&headers, &row)?;
    let rest = rest.filter(|_| range.start == 0 && range.byte_count() == row.size_bytes as u64);
    // Taken after the caller check (a stranger cannot take a workspace's slots) and held
    // until the body is dropped: a client that stops reading keeps its slot and the slice
    // in flight, not more.
    let slot = answer::download_slot(&st, who)?;
    let loc = row.location();
    let m = metrics();
    let (stream, backend) = match st
        .storage
        .open_from(&loc, range, head, rest, reserved)
        .await
    {
        Ok(opened) => opened,
        Err(e) => {
            let backend = st.storage.reader_name(&loc);
            m.files_fetched.with_label_values(&[backend, "error"]).inc();
            return Err(not_served(&row, backend, e));
        }
    };
    // The backend that serves it: a dual row's bytea copy when S3 failed.
    let served = m.bytes_served.with_label_values(&[backend]);
    let stream = stream.inspect_ok(move |chunk| served.inc_by(chunk.len() as u64));
    let handed_over = HandedOver {
        stamps: st.fetched.clone(),
        row: row.clone(),
        range,
        backend,
    };
    let body = Body::from_stream(CountedBody {
        inner: stream.boxed(),
        sent: 0,
        failed: false,
        done: Some(handed_over),
        _slot: slot,
    });
    Ok(respond(&row, status, range, body))
}

/// A row's bytes that could not be read from `backend`, logged and answered. SPEC §8: a
/// failed transition logs its line; a live row whose bytes are gone (an object deleted out of
/// band) answered 404 and said nothing to the operator.
fn not_served(row: &UploadRow, backend: &str, e: StorageError) -> ApiError {
    tracing::warn!(
        event = "failed", workspace_id = %row.workspace_id, file_id = %row.file_id,
        size = row.size_bytes, name = clip(&row.filename).as_str(), backend,
        error = %e, "upload not served"
    );
    e.into()
}

/// What to do once a download's last byte has been handed to the connection: stamp
/// fetched_at (best effort, SPEC §4 Fetch; batched, see `fetched`) when the range reached the
/// file's last byte, and log the transition. A range that stops short hands over part of the
/// body, not the body: a one-byte probe (`bytes=0-0`) stamped a file its client never had,
/// and the pending list then said it was fetched. A download resumed to its end stamps.
struct HandedOver {
    stamps: FetchedStamps,
    row: UploadRow,
    range: ByteRange,
    backend: &'static str,
}

impl HandedOver {
    fn run(self) {
        let HandedOver {
            stamps,
            row,
            range,
            backend,
        } = self;
        if range.end + 1 >= row.size_bytes as u64 {
            stamps.stamp(row.file_id);
        }
        metrics()
            .files_fetched
            .with_label_values(&[backend, "ok"])
            .inc();
        tracing::info!(
            event = "fetched", workspace_id = %row.workspace_id, file_id = %row.file_id,
            size = row.size_bytes, name = clip(&row.filename).as_str(), backend,
            range_start = range.start, range_end = range.end, "upload served"
        );
    }
}

/// A download body that runs [`HandedOver`] when hyper drops it after the whole range went
/// out (hyper stops polling a body once its Content-Length is written, so the end of the
/// stream is never observed; its drop is), and counts one that ended short: `error` when its
/// source failed, `cut` when its client went.
struct CountedBody {
    inner: futures::stream::BoxStream<'static, std::io::Result<Bytes>>,
    sent: u64,
    failed: bool,
    done: Option<HandedOver>,
    _slot: Slot,
}

impl futures::Stream for CountedBody {
    type Item = std::io::Result<Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let next = self.inner.poll_next_unpin(cx);
        match &next {
            std::task::Poll::Ready(Some(Ok(chunk))) => self.sent += chunk.len() as u64,
            std::task::Poll::Ready(Some(Err(_))) => self.failed = true,
            _ => {}
        }
        next
    }
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        let Some(done) = self.done.take() else {
            return;
        };
        if self.sent == done.range.byte_count() {
            return done.run();
        }
        let outcome = if self.failed { "error" } else { "cut" };
        metrics()
            .files_fetched
            .with_label_values(&[done.backend, outcome])
            .inc();
        let row = &done.row;
        if self.failed {
            tracing::warn!(
                event = "failed", workspace_id = %row.workspace_id, file_id = %row.file_id,
                size = row.size_bytes, name = clip(&row.filename).as_str(), backend = done.backend,
                sent = self.sent, "download cut short: its source failed"
            );
        }
    }
}

/// 200 with the whole file, or 206 with one satisfiable range. A malformed, multi-range or
/// repeated header is ignored (RFC 9110 allows serving the whole representation), and so is a Range
/// whose If-Range does not name the current representation ([`if_range_holds`]).
fn requested_range(
    headers: &HeaderMap,
    row: &UploadRow,
) -> Result<(StatusCode, ByteRange), ApiError> {
    let size = row.size_bytes as u64;
    let full = (StatusCode::OK, ByteRange::full(size));
    // A singleton field (RFC 9110 §14.2), like If-Range: sent twice, no one range was asked.
    let mut fields = headers.get_all(header::RANGE).iter();
    let (Some(raw), None) = (fields.next(), fields.next()) else {
        return Ok(full);
    };
    let Ok(raw) = raw.to_str() else {
        return Ok(full);
    };
    if !if_range_holds(headers, &etag(row)) {
        return Ok(full);
    }
    match parse_range(raw, size) {
        RangeAnswer::Full => Ok(full),
        RangeAnswer::Partial(r) => Ok((StatusCode::PARTIAL_CONTENT, r)),
        RangeAnswer::Unsatisfiable => Err(ApiError::RangeNotSatisfiable { size }),
    }
}

/// RFC 9110 §13.1.5: a client resuming a partial copy sends the validator it has in
/// If-Range, and gets the rest only while that is still the current representation; any
/// other validator gets the whole file (no second round trip for a stale copy). Only a
/// strong ETag can match, compared strongly: a weak tag (ours or the client's) never does,
/// nor an HTTP-date (we send no Last-Modified), nor anything unparseable. If-Range is a
/// singleton: sent twice, there is no one validator to hold.
fn if_range_holds(headers: &HeaderMap, etag: &str) -> bool {
    let mut values = headers.get_all(header::IF_RANGE).iter();
    match (values.next(), values.next()) {
        (None, _) => true,
        (Some(v), None) => {
            let sent = v.as_bytes().trim_ascii();
            !etag.starts_with("W/") && sent == etag.as_bytes()
        }
        (Some(_), Some(_)) => false,
    }
}

/// The answer a GET or HEAD gets from its preconditions instead of the file's (RFC 9110
/// §13.2.2: If-Match, then If-None-Match, both before Range), if any: 412 or 304. A request
/// with neither pays nothing, not even the ETag's formatting.
fn preconditions(headers: &HeaderMap, row: &UploadRow) -> Result<Option<Response>, ApiError> {
    if !headers.contains_key(header::IF_MATCH) && !headers.contains_key(header::IF_NONE_MATCH) {
        return Ok(None);
    }
    let current = etag(row);
    if match_fails(headers, &current) {
        return Err(ApiError::PreconditionFailed);
    }
    Ok(none_match_fails(headers, &current).then(|| not_modified(row)))
}

/// RFC 9110 §13.1.2: a client holding a copy (a browser revalidating a cached preview) sends
/// its entity-tags in If-None-Match; when one names the `current` entity-tag, or the field
/// is `*`, the condition fails and a GET or HEAD answers 304 with no bytes. Weak comparison:
/// `W/"x"` and `"x"` name the same bytes here, as rows never change.
fn none_match_fails(headers: &HeaderMap, current: &str) -> bool {
    let opaque = current.strip_prefix("W/").unwrap_or(current);
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .any(|v| names_entity_tag(v.as_bytes(), opaque.as_bytes(), Comparison::Weak))
}

/// How entity-tags compare (RFC 9110 §8.8.3.2).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Comparison {
    /// Same opaque part, either tag weak or not (If-None-Match).
    Weak,
    /// Both tags strong and the same (If-Match).
    Strong,
}

/// Whether one If-None-Match or If-Match field value (`*`, or a comma-separated list of
/// entity-tags) names the entity-tag whose opaque part (quotes included) is `opaque`,
/// compared as `comparison` says. The list is read up to its first malformed member: what
/// follows names nothing.
fn names_entity_tag(value: &[u8], opaque: &[u8], comparison: Comparison) -> bool {
    let is_separator = |b: &u8| matches!(b, b' ' | b'\t' | b',');
    if value.trim_ascii() == b"*" {
        return true;
    }
    let mut rest = value;
    loop {
        let skip = rest.iter().take_while(|b| is_separator(b)).count();
        rest = &rest[skip..];
        let weak = rest.starts_with(b"W/");
        let tagged = rest.strip_prefix(b"W/").unwrap_or(rest);
        let Some(inner) = tagged.strip_prefix(b"\"") else {
            return false;
        };
        let Some(close) = inner.iter().position(|&b| b == b'"') else {
            return false;
        };
        let comparable = comparison == Comparison::Weak || !weak;
        if comparable && &tagged[..close + 2] == opaque {
            return true;
        }
        rest = &inner[close + 1..];
    }
}

/// RFC 9110 §13.1.1: a client that wants these bytes only if they are still the ones it knows
/// (a download resumed by a tool that checks before it appends) sends their entity-tag in
/// If-Match; when none names the `current` entity-tag, strongly compared, the answer is 412
/// and no bytes. `*` holds for any file there is. A row without a digest has only a weak tag,
/// which no If-Match but `*` names. It was ignored: such a client got the bytes whatever they
/// were.
fn match_fails(headers: &HeaderMap, current: &str) -> bool {
    let mut values = headers.get_all(header::IF_MATCH).iter().peekable();
    if values.peek().is_none() {
        return false;
    }
    let strong = (!current.starts_with("W/")).then_some(current.as_bytes());
    !values.any(|v| match strong {
        Some(tag) => names_entity_tag(v.as_bytes(), tag, Comparison::Strong),
        None => v.as_bytes().trim_ascii() == b"*",
    })
}

/// 304: no bytes, and of the headers a 200 would carry only what RFC 9110 §15.4.5 asks for
/// (ETag; `Vary` comes from the CORS layer).
fn not_modified(row: &UploadRow) -> Response {
    // A body of no known length: axum gives a HEAD answer the Content-Length of its body
    // (here 0, where the 200's is the file's, RFC 9110 §8.6), and hyper sends none for a 304.
    let none = futures::stream::empty::<Result<Bytes, std::io::Error>>();
    let mut resp = Response::new(Body::from_stream(none));
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    if let Ok(v) = HeaderValue::from_str(&etag(row)) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

#[derive(Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    Full,
    Partial(ByteRange),
    Unsatisfiable,
}

pub fn parse_range(raw: &str, size: u64) -> RangeAnswer {
    let raw = raw.trim();
    // The unit name is case-insensitive (RFC 9110 §14.1).
    let Some(spec) = raw
        .get(..6)
        .filter(|unit| unit.eq_ignore_ascii_case("bytes="))
        .map(|_| &raw[6..])
    else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    // Digits only. A position past 64 bits is past any end, so it saturates (then clamps or
    // is unsatisfiable like any other position past the end); 128 bits keep `first > last`
    // exact for any position a client could mean.
    let num = |s: &str| {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse::<u128>().unwrap_or(u128::MAX))
    };
    let size128 = size as u128;
    let clamp = |n: u128| n.min(size128.saturating_sub(1)) as u64;
    match (a.is_empty(), b.is_empty()) {
        // bytes=-N: the last N bytes
        (true, false) => match num(b) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Partial(ByteRange {
                start: size128.saturating_sub(n) as u64,
                end: size - 1,
            }),
            None => RangeAnswer::Full,
        },
        // bytes=A-
        (false, true) => match num(a) {
            Some(start) if start < size128 => RangeAnswer::Partial(ByteRange {
                start: start as u64,
                end: size - 1,
            }),
            Some(_) => RangeAnswer::Unsatisfiable,
            None => RangeAnswer::Full,
        },
        // bytes=A-B
        (false, false) => match (num(a), num(b)) {
            (Some(start), Some(end)) if start > end => RangeAnswer::Full,
            (Some(start), Some(_)) if start >= size128 => RangeAnswer::Unsatisfiable,
            (Some(start), Some(end)) => RangeAnswer::Partial(ByteRange {
                start: start as u64,
                end: clamp(end),
            }),
            _ => RangeAnswer::Full,
        },
        (true, true) => RangeAnswer::Full,
    }
}

/// RFC 5987 attr-char: everything else is percent-encoded in `filename*`.
const ATTR_CHAR: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'+')
    .remove(b'-')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

/// `attachment; filename="<escaped>"; filename*=UTF-8''<percent-encoded>`, control
/// characters and those that reorder or hide text dropped (a row another writer stored may
/// name `invoice\u{202e}fdp.exe`, which a browser saves showing `invoiceexe.pdf`; a
/// white-box audit), `"` and `\` escaped, non-ASCII left to the `filename*` form.
pub fn content_disposition(name: &str) -> String {
    let mut clean: String = name
        .chars()
        .filter(|&c| !crate::logfmt::hidden(c))
        .collect();
    if clean.is_empty() {
        // SPEC §5 rule 4: a name with nothing left is `file`.
        clean = "file".to_string();
    }
    let mut quoted = String::with_capacity(clean.len());
    for c in clean.chars() {
        match c {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            c if c.is_ascii() => quoted.push(c),
            _ => quoted.push('_'),
        }
    }
    let encoded = utf8_percent_encode(&clean, ATTR_CHAR);
    format!("attachment; filename=\"{quoted}\"; filename*=UTF-8''{encoded}")
}

/// A strong ETag from the content's sha256 when the row has one; rows written by the
/// platform or an older binary have none: a weak tag then (SPEC §4 Fetch).
fn etag(row: &UploadRow) -> String {
    match &row.content_sha256 {
        Some(d) => format!("\"{}\"", hex::encode(d)),
        None => format!("W/\"{}\"", row.file_id.hyphenated()),
    }
}

fn respond(row: &UploadRow, status: StatusCode, range: ByteRange, body: Body) -> Response {
    let size = row.size_bytes as u64;
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    // Rows written by others may hold anything: only a media type (as an upload's is
    // reduced to, its parameters kept) becomes the header; a header value may carry bytes
    // past ASCII, a media type may not.
    let content_type = HeaderValue::from_str(&row.mimetype)
        .ok()
        .filter(|_| {
            crate::staging::media_type(&row.mimetype).is_some()
                && row.mimetype.is_ascii()
                && row.mimetype.len() <= crate::staging::MAX_MIMETYPE_CHARS
        })
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_TYPE, content_type);
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(range.byte_count()),
    );
    if let Ok(v) = HeaderValue::from_str(&content_disposition(&row.filename)) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&etag(row)) {
        h.insert(header::ETAG, v);
    }
    // RFC 9530, from the same sha256 as the strong ETag.
    let digest = row
        .content_sha256
        .as_ref()
        .map(|d| format!("sha-256=:{}:", STANDARD.encode(d)));
    if let Some(v) = digest.and_then(|d| HeaderValue::from_str(&d).ok()) {
        h.insert(HeaderName::from_static("repr-digest"), v);
    }
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", range.start, range.end))
        {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    resp
}

#[utoipa::path(
    post,
    path = "/workspaces/{id}/pending-uploads/{file_id}/ack",
    tag = "pending",
    summary = "Ack a file (idempotent)",
    params(("id" = uuid::Uuid, Path, description = "workspace UUID"), ("file_id" = uuid::Uuid, Path, description = "file UUID")),
    responses(
        (status = 200, description = "OK", body = Acked),
        (status = 400, description = "invalid workspace ID or file_id", body = api::ErrorBody),
        (status = 401, description = "missing or invalid bearer", body = api::ErrorBody),
        (status = 404, description = "pending upload not found or expired", body = api::ErrorBody),
        (status = 503, description = "datastore unavailable", body = api::ErrorBody),
    )
)]
pub async fn ack(
    State(st): State<AppState>,
    who: WorkspaceClaim,
    FileId(file_id): FileId,
) -> Result<Json<Acked>, ApiError> {
    let (workspace_id, hash) = (who.workspace_id, who.credential.token_hash());
    let outcome = st
        .db
        .run(move |c| Box::pin(db::uploads::ack(c, workspace_id, hash, file_id)))
        .await?;
    let Checked::Allowed(outcome) = outcome else {
        return Err(ApiError::InvalidToken);
    };
    let acked = &metrics().files_acked;
    let raced = match outcome {
        db::uploads::AckOutcome::Missing => return Err(ApiError::UploadNotFound),
        db::uploads::AckOutcome::Repeat { backend } => {
            acked.with_label_values(&[backend, "repeat"]).inc();
            None
        }
        db::uploads::AckOutcome::Raced { backend } => {
            // The row was live a moment ago and is gone now: the sweeper took it first.
            tracing::info!(event = "acked", %workspace_id, %file_id, backend, raced = true, "ack raced the sweeper");
            acked.with_label_values(&[backend, "raced"]).inc();
            Some(true)
        }
        db::uploads::AckOutcome::Acked {
            size,
            ref name,
            backend,
        } => {
            tracing::info!(
                event = "acked", %workspace_id, %file_id, size, name = clip(name).as_str(), backend, "upload acked"
            );
            acked.with_label_values(&[backend, "acked"]).inc();
            None
        }
    };
    Ok(Json(Acked { acked: true, raced }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64) -> RangeAnswer {
        RangeAnswer::Partial(ByteRange { start, end })
    }

    #[test]
    fn ranges() {
        let cases = [
            ("bytes=0-0", r(0, 0)),
            ("bytes=0-9", r(0, 9)),
            ("bytes=5-", r(5, 9)),
            ("bytes=-3", r(7, 9)),
            ("bytes=-30", r(0, 9)),
            ("bytes=2-100", r(2, 9)),
            ("bytes=9-9", r(9, 9)),
            ("bytes=10-", RangeAnswer::Unsatisfiable),
            ("bytes=10-12", RangeAnswer::Unsatisfiable),
            ("bytes=-0", RangeAnswer::Unsatisfiable),
            ("bytes=5-2", RangeAnswer::Full),
            ("bytes=0-1,3-4", RangeAnswer::Full),
            ("items=0-1", RangeAnswer::Full),
            ("bytes=a-b", RangeAnswer::Full),
            ("bytes=-", RangeAnswer::Full),
            ("bytes=+1-2", RangeAnswer::Full),
            // positions past 64 bits clamp like any position past the end
            ("bytes=5-123456789012345678901", r(5, 9)),
            ("bytes=123456789012345678901-", RangeAnswer::Unsatisfiable),
            (
                "bytes=123456789012345678901-123456789012345678902",
                RangeAnswer::Unsatisfiable,
            ),
            ("bytes=-123456789012345678901", r(0, 9)),
            ("Bytes=0-1", r(0, 1)),
            ("BYTES=2-", r(2, 9)),
            (
                "bytes=18446744073709551616-18446744073709551615",
                RangeAnswer::Full,
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_range(raw, 10), want, "{raw}");
        }
    }

    #[test]
    fn if_ranges() {
        let strong = "\"ab12\"";
        let holds = |etag: &str, sent: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in sent {
                h.append(header::IF_RANGE, HeaderValue::from_static(v));
            }
            if_range_holds(&h, etag)
        };
        assert!(holds(strong, &[]), "no If-Range: the Range stands");
        assert!(holds(strong, &["\"ab12\""]));
        assert!(holds(strong, &[" \"ab12\" "]), "optional whitespace");
        assert!(!holds(strong, &["\"AB12\""]), "opaque tags compare exactly");
        assert!(!holds(strong, &["W/\"ab12\""]), "a weak tag never matches");
        assert!(
            !holds("W/\"ab12\"", &["W/\"ab12\""]),
            "nor does ours when weak"
        );
        assert!(
            !holds(strong, &["Wed, 21 Oct 2015 07:28:00 GMT"]),
            "no Last-Modified"
        );
        assert!(
            !holds(strong, &["\"ab12\"", "\"ab12\""]),
            "a singleton sent twice"
        );
    }

    #[test]
    fn if_matches_compare_strongly() {
        let names = |v: &str| names_entity_tag(v.as_bytes(), b"\"ab12\"", Comparison::Strong);
        assert!(names("\"ab12\"") && names("\"x\", \"ab12\"") && names("*"));
        assert!(!names("W/\"ab12\""), "a weak tag never matches strongly");
        assert!(!names("W/\"ab12\", \"x\""));
    }

    #[test]
    fn if_none_matches() {
        let names = |v: &str| names_entity_tag(v.as_bytes(), b"\"ab12\"", Comparison::Weak);
        assert!(names("\"ab12\""));
        assert!(names("W/\"ab12\""), "weak comparison");
        assert!(names(" \"x\", W/\"y\" ,\t\"ab12\""), "a list");
        assert!(names("\"a,b\", \"ab12\""), "a comma inside a tag");
        assert!(names("*") && names(" * "));
        assert!(!names("\"AB12\""), "opaque tags compare exactly");
        assert!(!names("\"x\", *"), "* stands alone");
        assert!(!names("ab12") && !names("\"ab12") && !names(""));
        assert!(
            !names("\"x\" junk, \"ab12\""),
            "read up to the first malformed member"
        );
    }

    proptest::proptest! {
        #[test]
        fn an_if_none_match_list_names_its_tags_and_no_other(
            tags in proptest::collection::vec((proptest::bool::ANY, "[!#-~]{0,12}"), 1..6),
            seps in proptest::collection::vec("[ \t]{0,2},[ \t]{0,2}", 6),
            absent in "[!#-~]{0,12}",
        ) {
            let list: Vec<String> = tags
                .iter()
                .map(|(weak, t)| format!("{}\"{t}\"", if *weak { "W/" } else { "" }))
                .collect();
            let mut value = String::new();
            for (i, tag) in list.iter().enumerate() {
                if i > 0 {
                    value.push_str(&seps[i]);
                }
                value.push_str(tag);
            }
            let quoted = |t: &str| format!("\"{t}\"");
            for (_, t) in &tags {
                let named = names_entity_tag(value.as_bytes(), quoted(t).as_bytes(), Comparison::Weak);
                proptest::prop_assert!(named, "{} in {}", t, value);
            }
            if tags.iter().all(|(_, t)| *t != absent) {
                let named = names_entity_tag(value.as_bytes(), quoted(&absent).as_bytes(), Comparison::Weak);
                proptest::prop_assert!(!named, "{} not in {}", absent, value);
            }
        }

        #[test]
        fn any_if_none_match_bytes_are_read_without_panic(value in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            names_entity_tag(&value, b"\"ab12\"", Comparison::Weak);
            names_entity_tag(&value, b"\"ab12\"", Comparison::Strong);
        }
    }

    #[test]
    fn dispositions() {
        assert_eq!(
            content_disposition("report.pdf"),
            "attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"
        );
        assert_eq!(
            content_disposition("a\"b\\c\r\nd é.txt"),
            "attachment; filename=\"a\\\"b\\\\cd _.txt\"; filename*=UTF-8''a%22b%5Ccd%20%C3%A9.txt"
        );
        assert_eq!(
            content_disposition("invoice\u{202e}fdp.exe\u{200b}"),
            "attachment; filename=\"invoicefdp.exe\"; filename*=UTF-8''invoicefdp.exe"
        );
        assert_eq!(
            content_disposition("\u{061c}\u{206a}\u{e0041}\u{00ad}"),
            "attachment; filename=\"file\"; filename*=UTF-8''file"
        );
    }
}
