//! The push proxy (SPEC §4 Upload, step 2): a push workspace's upload is streamed unchanged
//! to `POST <url>/internal/chat/uploads/ingest`, and its answer relayed. The client cannot be
//! turned against the service's own network: the URL is checked again here (a row may have
//! been written by anyone), every address is checked as it is resolved, no proxy is used and
//! no redirect is followed.

use std::time::Duration;

use axum::{
    body::Body,
    http::{header, HeaderMap, StatusCode},
    response::Response,
};
use uuid::Uuid;

use super::{
    body::{CutFlag, UploadBody},
    error::ApiError,
    Relayed,
};
use crate::{
    logfmt::Clip,
    push_target::{is_refusal, PushPolicy},
};

#[derive(Clone)]
pub struct Pusher {
    client: reqwest::Client,
    policy: PushPolicy,
}

impl Pusher {
    pub fn new(policy: PushPolicy, timeout: Duration) -> reqwest::Result<Pusher> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve names itself, out of reach of the address check.
            .no_proxy()
            .dns_resolver(policy.clone().resolver())
            .build()?;
        Ok(Pusher { client, policy })
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
        max_request_bytes: u64,
    ) -> Result<Response, ApiError> {
        let base = self.policy.check_url(url).map_err(|e| {
            tracing::warn!(%workspace_id, url = %Clip(url), reason = e.reason, "push URL refused");
            ApiError::UrlNotAllowed
        })?;
        let target = format!(
            "{}/internal/chat/uploads/ingest",
            base.as_str().trim_end_matches('/')
        );
        let cut = body.cut_flag();
        let mut req = self
            .client
            .post(&target)
            .body(reqwest::Body::wrap_stream(body));
        for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
            if let Some(v) = headers.get(&name) {
                req = req.header(name, v);
            }
        }
        if let Some(secret) = secret.filter(|s| !s.is_empty()) {
            req = req.bearer_auth(secret);
        }
        let resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) => {
                return Err(send_failure(
                    workspace_id,
                    &target,
                    &cut,
                    e,
                    max_request_bytes,
                ))
            }
        };
        let status =
            StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        if status.is_redirection() {
            tracing::warn!(%workspace_id, status = status.as_u16(), "push workspace answered a redirect: not followed");
            return Err(ApiError::WorkspaceUnreachable);
        }
        tracing::info!(event = "pushed", %workspace_id, status = status.as_u16(), "upload forwarded to workspace");
        let mut out = Response::builder().status(status).extension(Relayed);
        if let Some(ct) = resp.headers().get(header::CONTENT_TYPE) {
            out = out.header(header::CONTENT_TYPE, ct.as_bytes());
        }
        out.body(Body::from_stream(resp.bytes_stream()))
            .map_err(ApiError::internal)
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
        tracing::warn!(%workspace_id, target = %Clip(target), "push address refused at connect time");
        return ApiError::UrlNotAllowed;
    }
    tracing::warn!(%workspace_id, target = %Clip(target), error = %Clip(&causes(e)), "push delivery failed");
    ApiError::WorkspaceUnreachable
}

/// A push client error for the log: its causes, without the URL. reqwest's own text is the
/// kind and the whole URL ("error sending request for url (...)"), and the URL is the
/// client's (up to the 64 KiB registration body), so it goes; `target` carries it clipped
/// (SPEC §10: at most 256 chars of a client's string per line).
fn causes(e: reqwest::Error) -> String {
    format!("{:#}", anyhow::Error::new(e.without_url()))
}
