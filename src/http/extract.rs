//! Extractors: who is calling (SPEC §3), and JSON bodies under their size and time bounds.

use axum::{
    extract::{FromRequest, FromRequestParts, MatchedPath, Request},
    http::request::Parts,
};
use serde::de::DeserializeOwned;
use std::{net::IpAddr, sync::Arc};
use uuid::Uuid;

use super::{
    body,
    error::ApiError,
    peer::{self, Peer},
    shed, AppState,
};
use crate::auth::{Caller, Credential};

/// A caller allowed on `/workspaces/:id/...`: the admin, or a live token of that workspace.
/// Rejections: 401 (no or wrong bearer), 400 (`:id` not a UUID), 503 (datastore away).
#[derive(Debug, Clone, Copy)]
pub struct WorkspaceCaller {
    pub workspace_id: Uuid,
    pub caller: Caller,
}

impl FromRequestParts<AppState> for WorkspaceCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let raw_id = raw_workspace_id(parts)?;
        let (workspace_id, caller) = st.auth.workspace(&parts.headers, &raw_id).await?;
        Ok(WorkspaceCaller {
            workspace_id,
            caller,
        })
    }
}

/// The `:id` path parameter as sent.
fn raw_workspace_id(parts: &Parts) -> Result<String, ApiError> {
    path_param(parts, "id").ok_or(ApiError::InvalidWorkspaceId)
}

/// The route's path parameter `name`, percent-decoded, or `None` when its bytes are not UTF-8
/// (or the route has no such parameter). Each parameter is decoded on its own, so a bad one
/// is reported as itself, not as whichever the route names first (axum's own extractors
/// refuse the whole path).
fn path_param(parts: &Parts, name: &str) -> Option<String> {
    let template = parts.extensions.get::<MatchedPath>()?.as_str();
    param_in(template, parts.uri.path(), name)
}

/// The segment of `path` where `template` has `{name}`, percent-decoded.
fn param_in(template: &str, path: &str, name: &str) -> Option<String> {
    let param = format!("{{{name}}}");
    let at = template.split('/').position(|segment| segment == param)?;
    let raw = path.split('/').nth(at)?;
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// A route's `:file_id`; anything but a UUID is 400 `invalid file_id`.
#[derive(Debug, Clone, Copy)]
pub struct FileId(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for FileId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        uuid_param(parts, "file_id")
            .map(FileId)
            .ok_or(ApiError::InvalidFileId)
    }
}

/// A route's `:id`, for routes whose caller is not the workspace (the admin's); anything but
/// a UUID is 400 `invalid workspace ID`, bytes that are not UTF-8 too (axum's `Path` answered
/// those its own 400 `bad request`).
#[derive(Debug, Clone, Copy)]
pub struct WorkspaceId(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for WorkspaceId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        uuid_param(parts, "id")
            .map(WorkspaceId)
            .ok_or(ApiError::InvalidWorkspaceId)
    }
}

/// A route's `:token_id`; anything but a UUID is 400 `invalid token ID`.
#[derive(Debug, Clone, Copy)]
pub struct TokenId(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for TokenId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        uuid_param(parts, "token_id")
            .map(TokenId)
            .ok_or(ApiError::InvalidTokenId)
    }
}

fn uuid_param(parts: &Parts, name: &str) -> Option<Uuid> {
    Uuid::parse_str(&path_param(parts, name)?).ok()
}

/// The hot routes' caller: a bearer and the workspace it claims, parsed but not yet looked
/// up — the route's own query checks a workspace token (`db::tokens::CALLER`) and answers
/// [`db::Checked::Refused`] when it is not a live token of this workspace.
/// Rejections: 401 (no bearer), 400 (`:id` not a UUID).
#[derive(Debug, Clone, Copy)]
pub struct WorkspaceClaim {
    pub workspace_id: Uuid,
    pub credential: Credential,
    /// Who the request's slots are counted against besides the workspace
    /// ([`peer::slot_client`]).
    pub client: Option<IpAddr>,
}

impl FromRequestParts<AppState> for WorkspaceClaim {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let raw_id = raw_workspace_id(parts)?;
        let (workspace_id, credential) = st.auth.claim(&parts.headers, &raw_id)?;
        let peer = parts.extensions.get::<Peer>().map(|Peer(ip)| *ip);
        Ok(WorkspaceClaim {
            workspace_id,
            credential,
            client: peer::slot_client(peer, &parts.headers, &st.trusted_proxies),
        })
    }
}

/// The admin: routes only the platform may call.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        st.auth.admin(&parts.headers)?;
        Ok(Admin)
    }
}

/// A JSON body of at most 64 KiB (413), arriving whole within REQUEST_BODY_TIMEOUT (408).
/// Any Content-Type is accepted: clients in the field send JSON without one.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &AppState) -> Result<Self, ApiError> {
        // Nothing is done yet: a full replica may shed the connection while its client is slow.
        let connection = req.extensions().get::<Arc<shed::Connection>>().cloned();
        let _waiting = connection.as_ref().map(|c| c.waiting_on_body());
        let value = body::read_json(req.into_body(), st.deadlines.request_body).await?;
        Ok(JsonBody(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

    const CONTENT: &str = "/workspaces/{id}/pending-uploads/{file_id}/content";

    #[test]
    fn each_parameter_is_decoded_on_its_own() {
        let path = "/workspaces/a%20b/pending-uploads/%FF/content";
        assert_eq!(param_in(CONTENT, path, "id").as_deref(), Some("a b"));
        assert_eq!(param_in(CONTENT, path, "file_id"), None);
        assert_eq!(param_in(CONTENT, path, "token_id"), None);
        assert_eq!(param_in(CONTENT, "/workspaces", "file_id"), None);
    }

    proptest::proptest! {
        /// Whatever a client puts in one segment, percent-encoded, reads back as itself, and
        /// bytes that are not UTF-8 in the other segment do not change that.
        #[test]
        fn a_segment_reads_back_whatever_the_other_holds(
            id in "\\PC{0,40}",
            other in proptest::collection::vec(proptest::num::u8::ANY, 0..12),
        ) {
            let encoded_other: String = other.iter().map(|b| format!("%{b:02X}")).collect();
            let path = format!(
                "/workspaces/{}/pending-uploads/{encoded_other}/content",
                utf8_percent_encode(&id, NON_ALPHANUMERIC)
            );
            proptest::prop_assert_eq!(param_in(CONTENT, &path, "id"), Some(id));
            let want = String::from_utf8(other).ok();
            proptest::prop_assert_eq!(param_in(CONTENT, &path, "file_id"), want);
        }
    }
}
