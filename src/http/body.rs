//! Request bodies under deadlines and caps (SPEC §10, slow clients and bounded parsing):
//! the upload body as a guarded stream, and small JSON bodies read whole.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::body::{Body, Bytes};
use futures::{Stream, StreamExt};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::error::ApiError;

/// How an upload body must keep coming.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Longest silence between chunks.
    pub idle: Duration,
    /// Average bytes per second required once `grace` has passed.
    pub min_rate: u64,
    pub grace: Duration,
    /// How long the body's reader may wait for its bytes, in all.
    pub whole: Duration,
}

/// Why we cut a body off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    OverCap,
    Stalled,
    TooSlow,
    /// Its reader waited `Pace::whole` (its seconds) in all.
    Overdue(u64),
    /// The client's body failed: it closed the connection before Content-Length's bytes,
    /// or sent bad chunked framing. A relay that reads it says so, rather than blaming the
    /// workspace it relays to.
    Broken,
}

impl Cut {
    pub fn answer(self, max_request_bytes: u64) -> ApiError {
        match self {
            Cut::OverCap => ApiError::RequestTooLarge {
                max: max_request_bytes,
            },
            Cut::Stalled => ApiError::BodyStalled,
            Cut::TooSlow => ApiError::BodyTooSlow,
            Cut::Overdue(secs) => ApiError::BodyOverdue { secs },
            // As a poll upload's truncated body (SPEC §4 Upload: unparseable body).
            Cut::Broken => ApiError::MalformedMultipart,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("request body cut off: {0:?}")]
pub struct CutError(pub Cut);

/// The upload body as a stream that fails once more than `max` bytes have arrived, when
/// nothing arrives for `pace.idle`, when it averages under `pace.min_rate` after the grace
/// period, or when its reader has waited `pace.whole` in all for its bytes: a client
/// trickling bytes cannot hold an upload slot.
pub struct UploadBody {
    inner: axum::body::BodyDataStream,
    max: u64,
    idle_timer: Pin<Box<tokio::time::Sleep>>,
    rate_timer: Pin<Box<tokio::time::Sleep>>,
    cut: Arc<Mutex<Option<Cut>>>,
    progress: Progress,
    waited: Waited,
}

/// How long the body's reader has waited for its bytes: the client's share of the time, and
/// what `Pace::whole` bounds. The time a slow reader (a push workspace taking the upload
/// slowly, S3) spends elsewhere is not the client's, and is not counted.
#[derive(Default)]
struct Waited {
    /// Waits that ended.
    before: Duration,
    /// The wait going on, if any.
    since: Option<Instant>,
}

/// Shared view of an [`UploadBody`]'s cut, readable after the body has been moved away.
#[derive(Clone)]
pub struct CutFlag(Arc<Mutex<Option<Cut>>>);

impl CutFlag {
    pub fn get(&self) -> Option<Cut> {
        self.0.lock().ok().and_then(|c| *c)
    }
}

/// How far whoever reads an [`UploadBody`] has got, readable while it reads: a push relay
/// watches it to tell a workspace that stopped taking the upload.
#[derive(Clone)]
pub struct Progress {
    read: Arc<ProgressCounts>,
    pace: Pace,
    started: Instant,
    /// What the request's Content-Length declares.
    length: Option<u64>,
}

#[derive(Default)]
struct ProgressCounts {
    seen: AtomicU64,
    ended: AtomicBool,
}

impl Progress {
    /// Bytes read so far.
    fn seen(&self) -> u64 {
        self.read.seen.load(Ordering::Relaxed)
    }

    /// Whether the whole body has been read: its end seen, or as many bytes as its
    /// Content-Length declared (a reader that knows the length stops reading there, before
    /// the end).
    pub fn ended(&self) -> bool {
        self.read.ended.load(Ordering::Relaxed) || self.length.is_some_and(|len| self.seen() >= len)
    }

    /// When the bytes read so far, less `held_back` of them not yet taken by whoever they go
    /// to, stop meeting `pace.min_rate` (never before the grace period ends; never without a
    /// minimum rate).
    pub fn rate_due_at(&self, held_back: u64) -> Option<Instant> {
        if self.pace.min_rate == 0 {
            return None;
        }
        let taken = self.seen().saturating_sub(held_back);
        let covered = Duration::from_secs_f64(taken as f64 / self.pace.min_rate as f64);
        Some(self.started + covered.max(self.pace.grace))
    }
}

impl UploadBody {
    /// `length`: what the request's Content-Length declares.
    pub fn new(body: Body, max: u64, pace: Pace, length: Option<u64>) -> Self {
        UploadBody {
            inner: body.into_data_stream(),
            max,
            idle_timer: Box::pin(tokio::time::sleep(pace.idle)),
            rate_timer: Box::pin(tokio::time::sleep(pace.grace)),
            cut: Arc::new(Mutex::new(None)),
            waited: Waited::default(),
            progress: Progress {
                read: Arc::default(),
                pace,
                started: Instant::now(),
                length,
            },
        }
    }

    /// What the request's Content-Length declares.
    pub fn declared_length(&self) -> Option<u64> {
        self.progress.length
    }

    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    pub fn cut_flag(&self) -> CutFlag {
        CutFlag(self.cut.clone())
    }

    /// When the body is cut if nothing more arrives during the wait that began `since`, and
    /// why: the rate rule, or the reader's whole wait.
    fn due(&self, since: Instant) -> (Instant, Cut) {
        let pace = self.progress.pace;
        let whole = (
            since + pace.whole.saturating_sub(self.waited.before),
            Cut::Overdue(pace.whole.as_secs()),
        );
        match self.progress.rate_due_at(0) {
            Some(at) if at < whole.0 => (at, Cut::TooSlow),
            _ => whole,
        }
    }

    /// Pending until the rate check or the deadline fails (then the cut), during the wait
    /// that began `since`.
    fn poll_rate(&mut self, cx: &mut Context<'_>, since: Instant) -> Poll<Cut> {
        loop {
            let (due, why) = self.due(since);
            if due <= Instant::now() {
                return Poll::Ready(why);
            }
            if self.rate_timer.deadline() != due {
                self.rate_timer.as_mut().reset(due);
            }
            if self.rate_timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    fn fail(&mut self, why: Cut) -> Poll<Option<<Self as Stream>::Item>> {
        if let Ok(mut cut) = self.cut.lock() {
            *cut = Some(why);
        }
        Poll::Ready(Some(Err(Box::new(CutError(why)))))
    }
}

impl Stream for UploadBody {
    type Item = Result<Bytes, Box<dyn std::error::Error + Send + Sync>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.cut.lock().map(|c| c.is_some()).unwrap_or(true) {
            return Poll::Ready(None);
        }
        let polled = self.inner.poll_next_unpin(cx);
        if polled.is_ready() {
            if let Some(since) = self.waited.since.take() {
                self.waited.before += since.elapsed();
            }
        }
        match polled {
            Poll::Ready(Some(Ok(chunk))) => {
                let len = chunk.len() as u64;
                let seen = self.progress.read.seen.fetch_add(len, Ordering::Relaxed) + len;
                if seen > self.max {
                    return self.fail(Cut::OverCap);
                }
                let idle_at = Instant::now() + self.progress.pace.idle;
                self.idle_timer.as_mut().reset(idle_at);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                if let Ok(mut cut) = self.cut.lock() {
                    *cut = Some(Cut::Broken);
                }
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                self.progress.read.ended.store(true, Ordering::Relaxed);
                Poll::Ready(None)
            }
            Poll::Pending => {
                let since = *self.waited.since.get_or_insert_with(Instant::now);
                if self.idle_timer.as_mut().poll(cx).is_ready() {
                    return self.fail(Cut::Stalled);
                }
                match self.poll_rate(cx, since) {
                    Poll::Ready(cut) => self.fail(cut),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

/// Largest JSON request body (SPEC §10).
pub const MAX_JSON_BYTES: usize = 64 * 1024;

/// Reads a small request body whole: at most [`MAX_JSON_BYTES`] (413 beyond) and within
/// `deadline` (408 after), then parses it as JSON (400).
pub async fn read_json<T: DeserializeOwned>(body: Body, deadline: Duration) -> Result<T, ApiError> {
    // A declared length over the bound is refused before a byte is asked for: a client waiting
    // for `100 Continue` is then not invited to send it (see `drain_unread`).
    if http_body::Body::size_hint(&body).lower() > MAX_JSON_BYTES as u64 {
        return Err(ApiError::JsonTooLarge {
            max: MAX_JSON_BYTES as u64,
        });
    }
    let limited = http_body_util::Limited::new(body, MAX_JSON_BYTES);
    let bytes = match tokio::time::timeout(deadline, limited.collect()).await {
        // The whole body's deadline, whether it stalled or trickled ("stalled" misled a client
        // that kept sending).
        Err(_) => {
            let secs = deadline.as_secs() + u64::from(deadline.subsec_nanos() > 0);
            return Err(ApiError::BodyOverdue { secs });
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::JsonTooLarge {
                max: MAX_JSON_BYTES as u64,
            })
        }
        Ok(Err(_)) => {
            return Err(ApiError::BadRequest(
                "could not read the request body".into(),
            ))
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    parse_json(&bytes)
}

pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let bad = |e: serde_json::Error| ApiError::BadRequest(format!("invalid JSON body: {e}"));
    let value: serde_json::Value = serde_json::from_slice(body).map_err(bad)?;
    // Postgres text cannot hold NUL; JSON can carry one, escaped.
    if has_nul(&value) {
        return Err(ApiError::BadRequest(
            "strings must not contain NUL characters".into(),
        ));
    }
    serde_json::from_value(value).map_err(bad)
}

fn has_nul(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_characters_are_refused_wherever_they_are_but_only_real_ones() {
        #[derive(serde::Deserialize)]
        struct Any {}
        for body in [
            r#"{"a":"x\u0000"}"#,
            r#"{"a":["\u0000"]}"#,
            r#"{"\u0000":1}"#,
        ] {
            assert!(
                matches!(parse_json::<Any>(body.as_bytes()), Err(ApiError::BadRequest(m)) if m.contains("NUL")),
                "{body}"
            );
        }
        // an escaped backslash followed by the text u0000 is no NUL
        assert!(parse_json::<Any>(br#"{"a":"my \\u0000 notes"}"#).is_ok());
    }
}

/// The rest of a request body that its handler did not read, handed back when the handler
/// drops it, and whether the client was told to send it (`Expect: 100-continue`).
pub struct Leftover {
    slot: Arc<Mutex<Option<Unread>>>,
    expects_continue: bool,
}

struct Unread {
    body: Body,
    /// Whether the handler asked for any of it: hyper answers `100 Continue` then, not before.
    asked: bool,
}

/// A request body that returns itself to a [`Leftover`] slot when dropped unfinished.
struct Reclaim {
    inner: Option<Body>,
    slot: Arc<Mutex<Option<Unread>>>,
    ended: bool,
    asked: bool,
}

impl http_body::Body for Reclaim {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        self.asked = true;
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = Pin::new(inner).poll_frame(cx);
        if matches!(frame, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_else(|| http_body::SizeHint::with_exact(0))
    }
}

impl Drop for Reclaim {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        if let Some(body) = self
            .inner
            .take()
            .filter(|b| !http_body::Body::is_end_stream(b))
        {
            if let Ok(mut slot) = self.slot.lock() {
                *slot = Some(Unread {
                    body,
                    asked: self.asked,
                });
            }
        }
    }
}

/// Marks an answer whose request body must not be drained (the client was cut off for being
/// slow: reading on would wait on it again).
#[derive(Debug, Clone, Copy)]
pub struct NoDrain;

/// How much of an unread request body is read before answering, and for how long.
const DRAIN_MAX_BYTES: u64 = 128 * 1024 * 1024;
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// A request refused before its body was read (auth, a datastore outage, a quota) has the
/// rest of the body read, bounded, before the answer goes out, so the client, still sending,
/// reads our answer instead of a broken pipe, and the connection stays usable. Beyond the
/// bound, the answer says `Connection: close`.
///
/// `watch_unread` wraps the request's body so that whatever the handler leaves unread lands in
/// the returned slot; [`drain_unread`] then reads it before the answer goes out.
pub fn watch_unread(req: axum::extract::Request) -> (axum::extract::Request, Leftover) {
    // hyper honours `Expect` on HTTP/1.1 only; an HTTP/1.0 client sends its body at once.
    let expects_continue = req.version() == axum::http::Version::HTTP_11
        && req
            .headers()
            .get(axum::http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let slot = Arc::new(Mutex::new(None));
    let req = req.map(|body| {
        Body::new(Reclaim {
            inner: Some(body),
            slot: slot.clone(),
            ended: false,
            asked: false,
        })
    });
    let leftover = Leftover {
        slot,
        expects_continue,
    };
    (req, leftover)
}

/// See [`watch_unread`].
pub async fn drain_unread(
    mut resp: axum::response::Response,
    leftover: Leftover,
    connection: Option<Arc<super::shed::Connection>>,
) -> axum::response::Response {
    let unread = leftover.slot.lock().ok().and_then(|mut s| s.take());
    let Some(Unread { body, asked }) = unread else {
        return resp;
    };
    // A client waiting for `100 Continue` before it sends its body (curl does for bodies over
    // 1 MiB), that was never asked for it, has sent nothing: the answer goes out at once and
    // the connection closes, rather than invite a body only to throw it away. (A client that
    // gave up waiting and sent it anyway, curl after 1 s, may see the close as a reset.)
    let unsent = leftover.expects_continue && !asked;
    // A refused request waits on its client for a body it does not need: while it does, a
    // full replica may shed the connection. Not an answer of work done (a 200 to a request
    // whose route did not read its body): that one must reach its client.
    let refused = resp.status().is_client_error() || resp.status().is_server_error();
    let _waiting = connection
        .as_ref()
        .filter(|_| refused && !unsent)
        .map(|c| c.waiting_on_body());
    // A body declared longer than a drain may read cannot be drained: waiting out the drain's
    // deadline only held the refusal back (a 413 for a 200 MB upload came after 5 s, with 25
    // MB sent meanwhile; a red team).
    let drainable = http_body::Body::size_hint(&body).lower() <= DRAIN_MAX_BYTES;
    // boxed: the drain's state (a timer, a stream) is only allocated for requests that need it
    let drained = !unsent
        && drainable
        && resp.extensions().get::<NoDrain>().is_none()
        && Box::pin(drain(body)).await;
    if !drained {
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// Reads and discards `body`; false when it was longer or slower than the drain allows.
async fn drain(body: Body) -> bool {
    let mut stream = body.into_data_stream();
    let mut seen = 0u64;
    let read = async {
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => {
                    seen += c.len() as u64;
                    if seen > DRAIN_MAX_BYTES {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_DEADLINE, read)
        .await
        .unwrap_or(false)
}
