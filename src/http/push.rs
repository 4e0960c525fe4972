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
use uuid::Uuid;

use super::{
    body::{CutFlag, Progress, UploadBody},
    error::ApiError,
    Relayed,
};
use crate::{
    logfmt::clip,
    push_target::{is_refusal, PushPolicy},
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
    client: reqwest::Client,
    policy: PushPolicy,
    limits: PushLimits,
}

impl Pusher {
    pub fn new(policy: PushPolicy, limits: PushLimits) -> reqwest::Result<Pusher> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(limits.timeout)
            // Sent bytes unacknowledged, or a zero window, for this long end the connection:
            // what is left of an upload after the answer is out of the watchdog's reach.
            .tcp_user_timeout(limits.answer_timeout)
            .redirect(reqwest::redirect::Policy::none())
            // No connection is kept for reuse once its answer is in: the pool would keep one
            // per workspace address, however many, for 90 s. A client re-registering its URL
            // to a new port before each upload held a socket per upload, and 20,000 used up
            // the replica's open files (a red team). A relay's own connection is bounded by
            // MAX_CONCURRENT_PUSH_UPLOADS; a handshake per upload is its price.
            .pool_max_idle_per_host(0)
            // A proxy would resolve names itself, out of reach of the address check.
            .no_proxy()
            .dns_resolver(policy.clone().resolver())
            .build()?;
        Ok(Pusher {
            client,
            policy,
            limits,
        })
    }

    pub fn policy(&self) -> &PushPolicy {
        &self.policy
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
        let max_request_bytes = self.limits.max_request_bytes;
        let base = self.policy.check_url(url).map_err(|e| {
            tracing::warn!(%workspace_id, url = clip(url).as_str(), reason = e.reason, "push URL refused");
            ApiError::UrlNotAllowed
        })?;
        let target = format!(
            "{}/internal/chat/uploads/ingest",
            base.as_str().trim_end_matches('/')
        );
        let (cut, progress) = (body.cut_flag(), body.progress());
        // Held by the upload's body and by the relayed answer both: a workspace that answers
        // before it has taken the whole upload holds the slot while the relay goes on sending
        // it, and the answer (up to PUSH_ANSWER_MAX_BYTES, in memory) holds it until sent.
        let slot = Arc::new(slot);
        let ends_by = tokio::time::Instant::now() + self.limits.timeout;
        let mut req = self
            .client
            .post(&target)
            .body(reqwest::Body::wrap_stream(holding(
                until(body, ends_by),
                slot.clone(),
            )));
        for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
            if let Some(v) = headers.get(&name) {
                req = req.header(name, v);
            }
        }
        // Said, not left to the default: a request without Accept-Encoding takes any coding
        // (RFC 9110 §12.5.3), and an encoded answer is not relayed (`read_answer`).
        req = req.header(header::ACCEPT_ENCODING, "identity");
        if let Some(secret) = secret.filter(|s| !s.is_empty()) {
            req = req.bearer_auth(secret);
        }
        let exchange = async {
            let resp = req
                .send()
                .await
                .map_err(|e| send_failure(workspace_id, &target, &cut, e, max_request_bytes))?;
            self.read_answer(workspace_id, resp).await
        };
        let mut answer = tokio::select! {
            answer = exchange => answer?,
            why = falls_behind(progress.clone(), self.limits.answer_timeout) => {
                tracing::warn!(%workspace_id, target = clip(&target).as_str(), reason = why, "push delivery failed");
                return Err(ApiError::WorkspaceUnreachable);
            }
        };
        if !progress.ended() {
            // An answer before the whole upload was taken (a refusal, say): the client's
            // connection closes after it, so the rest of its upload ends there and the relay
            // of it (in the client's connection task, out of this watchdog's reach) with it.
            // A workspace that stops reading the rest is cut by TCP_USER_TIMEOUT.
            answer
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
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
        mut resp: reqwest::Response,
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
        // workspace that encodes anyway is answering something else.
        if resp
            .headers()
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .any(|v| !matches!(v.as_bytes().trim_ascii(), b"" | b"identity"))
        {
            return Err(unreachable("an encoded answer: the relay asks for none"));
        }
        let max = self.limits.answer_max_bytes;
        if resp.content_length().is_some_and(|len| len > max) {
            return Err(unreachable("answer over PUSH_ANSWER_MAX_BYTES"));
        }
        let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
        let mut body = bytes::BytesMut::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) if (body.len() + chunk.len()) as u64 > max => {
                    return Err(unreachable("answer over PUSH_ANSWER_MAX_BYTES"))
                }
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(_) => return Err(unreachable("answer cut off")),
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

/// The upload `body` relayed until `deadline` (PUSH_TIMEOUT after the relay began), then an
/// error: reqwest's own timeout ends with the workspace's answer, and what is left of an
/// upload after an early answer, taken slowly by its workspace, would otherwise hold the slot
/// for as long as the client keeps BODY_MIN_RATE. An error, not an end: a chunked body must
/// not look whole to the workspace.
fn until(
    body: UploadBody,
    deadline: tokio::time::Instant,
) -> impl Stream<Item = <UploadBody as Stream>::Item> {
    futures::stream::unfold(Some(body), move |body| async move {
        let mut body = body?;
        // Checked first: a body whose bytes are there when asked (its workspace, not its
        // client, being the slow side) would otherwise never time out.
        let next = match tokio::time::Instant::now() < deadline {
            true => tokio::time::timeout_at(deadline, body.next()).await.ok(),
            false => None,
        };
        match next {
            Some(item) => item.map(|item| (item, Some(body))),
            None => Some((Err("the push ran past PUSH_TIMEOUT".into()), None)),
        }
    })
}

/// `stream`, holding `slot` until it is dropped.
fn holding<S: Stream>(stream: S, slot: Arc<Slot>) -> impl Stream<Item = S::Item> {
    stream.map(move |chunk| {
        let _held = &slot;
        chunk
    })
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
/// after the upload's last byte was taken.
async fn falls_behind(progress: Progress, answer_timeout: Duration) -> &'static str {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        if progress.ended() {
            tokio::time::sleep(answer_timeout).await;
            return "no whole answer within PUSH_ANSWER_TIMEOUT";
        }
        let late = |due| tokio::time::Instant::now() > due + CLIENT_FIRST;
        if progress.rate_due_at().is_some_and(late) {
            return "the workspace stopped taking the upload";
        }
    }
}

/// Why a push could not be delivered, as the client should hear it: our own cut of its body
/// (cap, deadline) is its fault; an address the policy refused is a 400; else 502.
fn send_failure(
    workspace_id: Uuid,
    target: &str,
    cut: &CutFlag,
    e: reqwest::Error,
    max_request_bytes: u64,
) -> ApiError {
    if let Some(cut) = cut.get() {
        return cut.answer(max_request_bytes);
    }
    if is_refusal(&e) {
        tracing::warn!(%workspace_id, target = clip(target).as_str(), "push address refused at connect time");
        return ApiError::UrlNotAllowed;
    }
    tracing::warn!(%workspace_id, target = clip(target).as_str(), error = clip(&causes(e)).as_str(), "push delivery failed");
    ApiError::WorkspaceUnreachable
}

/// A push client error for the log: its causes, without the URL. reqwest's own text is the
/// kind and the whole URL ("error sending request for url (...)"), and the URL is the
/// client's (up to the 64 KiB registration body), so it goes; `target` carries it clipped
/// (SPEC §10: at most 256 chars of a client's string per line).
fn causes(e: reqwest::Error) -> String {
    format!("{:#}", anyhow::Error::new(e.without_url()))
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
