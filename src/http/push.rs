//! The push proxy (SPEC §4 Upload, step 2): a push workspace's upload is streamed unchanged
//! to `POST <url>/internal/chat/uploads/ingest`, and its answer relayed. The client cannot be
//! turned against the service's own network: the URL is checked again here (a row may have
//! been written by anyone), every address is checked as it is resolved, no proxy is used and
//! no redirect is followed. Nor can a workspace (anyone can register one) hold the upload's
//! slot for `PUSH_TIMEOUT` at no cost: it must take the upload at `BODY_MIN_RATE`, and its
//! whole answer, at most `PUSH_ANSWER_MAX_BYTES`, must come within `PUSH_ANSWER_TIMEOUT` of
//! the upload's last byte (else 502). The answer is read whole before it is relayed.

use std::{sync::Arc, time::Duration};

use axum::{
    body::Body,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::Response,
};
use futures::{Stream, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    client::conn::http1::Connection,
};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tokio_rustls::rustls;
use url::Url;
use uuid::Uuid;

use super::{
    body::{Progress, UploadBody},
    error::ApiError,
    Relayed,
};
use crate::{
    logfmt::clip,
    push_client::{Io, OpenError, Opened, PushClient, RelayBody, RelaySocket},
    push_target::PushPolicy,
    slots::Slot,
};

/// How long and how much a push may take.
#[derive(Debug, Clone, Copy)]
pub struct PushLimits {
    /// The whole exchange (`PUSH_TIMEOUT`).
    pub timeout: Duration,
    /// From the upload's last byte to the answer's (`PUSH_ANSWER_TIMEOUT`).
    pub answer_timeout: Duration,
    /// The answer's body (`PUSH_ANSWER_MAX_BYTES`).
    pub answer_max_bytes: u64,
    /// The upload's (`MAX_REQUEST_BYTES`), for the 413 of one cut off over it.
    pub max_request_bytes: u64,
}

/// How far past the client's own rate deadline a workspace that stopped taking the upload is
/// cut: a client too slow itself is cut first (408, its fault), as its body is being read.
const CLIENT_FIRST: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Pusher {
    client: PushClient,
    limits: PushLimits,
}

/// For the TCP connect and the TLS handshake together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Pusher {
    pub fn new(policy: PushPolicy, limits: PushLimits) -> Result<Pusher, rustls::Error> {
        Ok(Pusher {
            client: PushClient::new(policy, CONNECT_TIMEOUT, limits.answer_timeout)?,
            limits,
        })
    }

    pub fn policy(&self) -> &PushPolicy {
        self.client.policy()
    }

    /// Streams the upload body to the workspace and relays its status, Content-Type and body.
    pub async fn forward(
        &self,
        workspace_id: Uuid,
        url: &str,
        secret: Option<&str>,
        headers: &HeaderMap,
        body: UploadBody,
        slot: Slot,
    ) -> Result<Response, ApiError> {
        let refused = |reason: &str| {
            tracing::warn!(%workspace_id, url = clip(url).as_str(), reason, "push URL refused");
            ApiError::UrlNotAllowed
        };
        let base = self
            .client
            .policy()
            .check_url(url)
            .map_err(|e| refused(e.reason))?;
        let target_url = Url::parse(&format!(
            "{}/internal/chat/uploads/ingest",
            base.as_str().trim_end_matches('/')
        ))
        .map_err(|_| refused("not an absolute URL"))?;
        let (cut, progress) = (body.cut_flag(), body.progress());
        let request = ingest_request(&target_url, headers, secret, body)?;
        // Held by the relay's connection and by the relayed answer both: a workspace that
        // answers before it has taken the whole upload holds the slot while the relay goes on
        // sending it, and the answer (up to PUSH_ANSWER_MAX_BYTES, in memory) holds it until
        // sent.
        let slot = Arc::new(slot);
        let ends_by = tokio::time::Instant::now() + self.limits.timeout;
        let target = target_url.as_str();
        // The relay's socket once it is open, for the watchdog to see what it still holds.
        let opened = std::sync::OnceLock::<Arc<RelaySocket>>::new();
        let held_back = || opened.get().map_or(0, |socket| socket.unsent());
        let exchange = async {
            let Opened { mut sender, connection, socket } =
                self.client.open(&target_url).await.map_err(|e| match e {
                    OpenError::Refused(r) => {
                        tracing::warn!(%workspace_id, url = clip(target).as_str(), reason = r.reason, "push address refused at connect time");
                        ApiError::UrlNotAllowed
                    }
                    OpenError::Failed(why) => unreachable_at(workspace_id, target, &why),
                })?;
            let socket = Arc::new(socket);
            let _ = opened.set(socket.clone());
            let relay = Relay::spawn(
                connection,
                socket,
                slot.clone(),
                ends_by,
                progress.clone(),
                workspace_id,
            );
            let sent = async {
                sender.ready().await?;
                sender.send_request(request).await
            };
            let resp = sent.await.map_err(|e| {
                match cut.get() {
                    // Our own cut of the client's body (cap, deadline) is its fault.
                    Some(cut) => cut.answer(self.limits.max_request_bytes),
                    None => unreachable_at(workspace_id, target, &causes(e)),
                }
            })?;
            let answer = self.read_answer(workspace_id, resp).await?;
            Ok::<_, ApiError>((answer, relay))
        };
        let (mut answer, relay) = tokio::select! {
            answer = exchange => answer?,
            why = falls_behind(&progress, self.limits.answer_timeout, held_back) => {
                return Err(unreachable_at(workspace_id, target, why));
            }
            _ = tokio::time::sleep_until(ends_by) => {
                return Err(unreachable_at(workspace_id, target, "the push ran past PUSH_TIMEOUT"));
            }
        };
        if !progress.ended() {
            // An answer before the whole upload was taken (a refusal, say): the client's
            // connection closes after it, so the rest of its upload ends there, and the relay
            // of it within PUSH_TIMEOUT and BODY_MIN_RATE (`Relay`).
            answer
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        relay.answered();
        // The answer is read whole: it goes out with its length, not chunked as the slot's
        // stream would send it (an HTTP/1.0 client cannot take a chunked answer on a connection
        // it keeps: its next request was dropped; the protocol red team). Not a 204's, which
        // has no length (RFC 9110 §8.6; hyper writes one set here as it is).
        let has_length = answer.status() != StatusCode::NO_CONTENT;
        if let Some(len) = http_body::Body::size_hint(answer.body())
            .exact()
            .filter(|_| has_length)
        {
            answer
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        tracing::info!(event = "pushed", %workspace_id, status = answer.status().as_u16(), "upload forwarded to workspace");
        Ok(answer.map(|body| Body::from_stream(holding(body.into_data_stream(), slot))))
    }

    /// The workspace's answer, read whole (at most `answer_max_bytes`), as the client gets it:
    /// its status and Content-Type, and its body.
    async fn read_answer(
        &self,
        workspace_id: Uuid,
        mut resp: hyper::Response<Incoming>,
    ) -> Result<Response, ApiError> {
        let code = resp.status().as_u16();
        let unreachable = |reason: &str| {
            tracing::warn!(%workspace_id, status = code, reason, "push answer not relayed");
            ApiError::WorkspaceUnreachable
        };
        let Some(status) = relayed_status(code) else {
            return Err(unreachable("not a final HTTP status"));
        };
        if status.is_redirection() {
            return Err(unreachable("a redirect: not followed"));
        }
        // Only Content-Type is relayed, so an encoded body reached the client as bytes it
        // could not read (a red team's gzip answer). The relay asks for `identity`: a
        // workspace that encodes anyway is answering something else. So is one that codes its
        // body in transfer (`Transfer-Encoding: gzip, chunked`): the connection takes the
        // chunks off, not the gzip (an audit).
        if codings(resp.headers(), header::CONTENT_ENCODING).any(|c| c != "identity")
            || super::unsupported_transfer_coding(resp.headers())
        {
            return Err(unreachable("an encoded answer: the relay asks for none"));
        }
        let max = self.limits.answer_max_bytes;
        if http_body::Body::size_hint(resp.body())
            .exact()
            .is_some_and(|len| len > max)
        {
            return Err(unreachable("answer over PUSH_ANSWER_MAX_BYTES"));
        }
        let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
        let mut body = bytes::BytesMut::new();
        loop {
            match resp.body_mut().frame().await {
                Some(Ok(frame)) => {
                    let Ok(chunk) = frame.into_data() else {
                        continue; // trailers: not relayed
                    };
                    if (body.len() + chunk.len()) as u64 > max {
                        return Err(unreachable("answer over PUSH_ANSWER_MAX_BYTES"));
                    }
                    body.extend_from_slice(&chunk);
                }
                None => break,
                Some(Err(_)) => return Err(unreachable("answer cut off")),
            }
        }
        // A 205 has no content (RFC 9110 §15.3.6): a workspace's bytes after one, relayed,
        // would be read by a client as the start of its connection's next answer (an audit).
        if status == StatusCode::RESET_CONTENT {
            body.clear();
        }
        let mut out = Response::builder().status(status).extension(Relayed);
        if let Some(ct) = content_type {
            out = out.header(header::CONTENT_TYPE, ct);
        }
        out.body(Body::from(body.freeze()))
            .map_err(ApiError::internal)
    }
}

/// `stream`, holding `slot` until it is dropped.
fn holding<S: Stream>(stream: S, slot: Arc<Slot>) -> impl Stream<Item = S::Item> {
    stream.map(move |chunk| {
        let _held = &slot;
        chunk
    })
}

/// The codings a header lists (RFC 9110 §8.4, §10.1.4: comma-separated, case-insensitive),
/// lowercased, empty elements left out.
fn codings(headers: &HeaderMap, name: header::HeaderName) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|c| String::from_utf8_lossy(c.trim_ascii()).to_ascii_lowercase())
        .filter(|c| !c.is_empty())
}

/// The status relayed for a workspace's: a final status, an unrecognised one as the x00 of
/// its class (RFC 9110 §15), so the client and the metrics' status label only ever see known
/// codes; `None` for anything else (a 1xx as the answer, or past 599).
fn relayed_status(code: u16) -> Option<StatusCode> {
    if !(200..600).contains(&code) {
        return None;
    }
    let status = StatusCode::from_u16(code).ok()?;
    match status.canonical_reason() {
        Some(_) => Some(status),
        None => StatusCode::from_u16(code / 100 * 100).ok(),
    }
}

/// Resolves when a push workspace falls behind: it takes the upload slower than the client
/// must send it (past [`CLIENT_FIRST`]), or its whole answer has not come `answer_timeout`
/// after it took the upload's last byte. `held_back`: what the relay's socket still holds.
async fn falls_behind(
    progress: &Progress,
    answer_timeout: Duration,
    held_back: impl Fn() -> u64,
) -> &'static str {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let held = held_back();
        // Every byte sent on, and acknowledged: the answer's clock starts (it started when
        // the last byte was sent on, and a workspace reading the last MBs at BODY_MIN_RATE
        // was 502 for an answer it could not yet give).
        if progress.ended() && held == 0 {
            tokio::time::sleep(answer_timeout).await;
            return "no whole answer within PUSH_ANSWER_TIMEOUT";
        }
        if stopped_taking(progress, held) {
            return STOPPED_TAKING;
        }
    }
}

const STOPPED_TAKING: &str = "the workspace stopped taking the upload";

/// Has the workspace taken the upload slower than the client must send it, past
/// [`CLIENT_FIRST`]? `held_back` of the bytes sent on are still in the relay's socket, not
/// taken. (A client too slow itself is cut first, as its body is being read.)
fn stopped_taking(progress: &Progress, held_back: u64) -> bool {
    let late = |due| tokio::time::Instant::now() > due + CLIENT_FIRST;
    progress.rate_due_at(held_back).is_some_and(late)
}

/// The relay's connection to a push workspace, driven in a task of its own. Until the answer
/// is in, the exchange's own bounds apply and dropping this ends the connection at once (the
/// socket reset, the rest of the upload dropped, the slot let go). After, the relay of what is
/// left of the upload goes on alone until it ends, PUSH_TIMEOUT passes, the workspace takes it
/// slower than BODY_MIN_RATE, or TCP_USER_TIMEOUT ends a connection it stopped reading.
struct Relay {
    task: tokio::task::JoinHandle<()>,
    socket: Arc<RelaySocket>,
    answered: Option<oneshot::Sender<()>>,
}

impl Relay {
    fn spawn(
        connection: Connection<TokioIo<Box<dyn Io>>, RelayBody>,
        socket: Arc<RelaySocket>,
        slot: Arc<Slot>,
        ends_by: tokio::time::Instant,
        progress: Progress,
        workspace_id: Uuid,
    ) -> Relay {
        let (answered, answer_in) = oneshot::channel::<()>();
        let held = socket.clone();
        let task = tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                ended = connection => if let Err(e) = ended {
                    // The client's body failed (it went), or the workspace's side did: what is
                    // still queued for the workspace is a cut-short upload, not to be sent.
                    held.reset_on_close();
                    tracing::warn!(%workspace_id, error = clip(&causes(e)).as_str(), "push relay failed after the workspace's answer");
                },
                reason = after_the_answer(answer_in, ends_by, &progress, &held) => {
                    held.reset_on_close();
                    tracing::warn!(%workspace_id, reason, "push relay cut after the workspace's answer");
                }
            }
        });
        Relay {
            task,
            socket,
            answered: Some(answered),
        }
    }

    /// The workspace's answer is in: the relay goes on by itself, within its bounds.
    fn answered(mut self) {
        if let Some(tx) = self.answered.take() {
            let _ = tx.send(());
        }
    }
}

/// Resolves when the relay, its answer in, must stop: PUSH_TIMEOUT passed, or the workspace
/// takes the rest slower than BODY_MIN_RATE. Never, if the answer never came (the exchange
/// failed, and the relay's task is aborted).
async fn after_the_answer(
    answer_in: oneshot::Receiver<()>,
    ends_by: tokio::time::Instant,
    progress: &Progress,
    socket: &RelaySocket,
) -> &'static str {
    if answer_in.await.is_err() {
        return std::future::pending().await;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(ends_by) => return "the push ran past PUSH_TIMEOUT",
            _ = tick.tick() => if stopped_taking(progress, socket.unsent()) { return STOPPED_TAKING },
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.answered.is_some() {
            self.socket.reset_on_close();
            self.task.abort();
        }
    }
}

/// The request to a workspace's ingest endpoint: the upload as the client sent it (its
/// Content-Type and Content-Length), no coding asked for, the workspace's secret.
fn ingest_request(
    target: &Url,
    headers: &HeaderMap,
    secret: Option<&str>,
    body: UploadBody,
) -> Result<hyper::Request<RelayBody>, ApiError> {
    let host = target.host_str().unwrap_or_default();
    let authority = match target.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    let mut req = hyper::Request::post(target.path())
        .header(header::HOST, authority)
        .header(header::ACCEPT, "*/*")
        // Said, not left to the default: a request without Accept-Encoding takes any coding
        // (RFC 9110 §12.5.3), and an encoded answer is not relayed (`read_answer`).
        .header(header::ACCEPT_ENCODING, "identity");
    for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
        if let Some(v) = headers.get(&name) {
            req = req.header(name, v);
        }
    }
    if let Some(secret) = secret.filter(|s| !s.is_empty()) {
        let bearer =
            HeaderValue::try_from(format!("Bearer {secret}")).map_err(ApiError::internal)?;
        req = req.header(header::AUTHORIZATION, bearer);
    }
    let body = StreamBody::new(body.map(|chunk| chunk.map(Frame::data)));
    req.body(body.boxed_unsync()).map_err(ApiError::internal)
}

/// A push that could not be delivered: logged (the target clipped: SPEC §10, at most 256 chars
/// of a client's string per line), and 502 for the client. The URL goes in `url`: a field named
/// `target` was a second `target` key in the JSON line, beside the module's, and a reader kept
/// one of the two (a review).
fn unreachable_at(workspace_id: Uuid, target: &str, why: &str) -> ApiError {
    tracing::warn!(%workspace_id, url = clip(target).as_str(), reason = clip(why).as_str(), "push delivery failed");
    ApiError::WorkspaceUnreachable
}

/// A push client error for the log: its causes.
fn causes(e: hyper::Error) -> String {
    format!("{:#}", anyhow::Error::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_statuses_are_relayed() {
        let relayed = |code| relayed_status(code).map(|s| s.as_u16());
        for (code, want) in [
            (200, Some(200)),
            (201, Some(201)),
            (299, Some(200)),
            (418, Some(418)),
            (499, Some(400)),
            (503, Some(503)),
            (599, Some(500)),
            (100, None),
            (199, None),
            (600, None),
            (999, None),
        ] {
            assert_eq!(relayed(code), want, "{code}");
        }
    }
}
