//! `GET /workspaces/:id/activity`: the feed a workspace's poll loop reads, optionally held
//! open until something new commits (`wait=`, see `longpoll`).

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    extract::{Query, State},
    http::{header, HeaderValue},
    response::Response,
    Extension,
};
use serde_json::Value;
use uuid::Uuid;

use super::{answer, conn::PeerWatch, error::ApiError, extract::WorkspaceClaim, AppState};
use crate::{
    api::{self, attachment_kind, ActivityRow, Attachment},
    auth::Credential,
    db::{self, activity::Filter, Checked},
    metrics::metrics,
    slots::{Refused, Slot},
};

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 500;
const MAX_WINDOW_SECS: i64 = 30 * 86_400;
const MAX_WAIT_SECS: u64 = 60;

/// The feed's query, parsed and checked (every field bounded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedQuery {
    pub activity_type: Option<String>,
    pub method: Option<String>,
    pub since_id: Option<Uuid>,
    pub since_secs: Option<i64>,
    pub limit: i64,
    pub peer_info: bool,
    /// How long to hold the request open when nothing is newer than `since_id`.
    pub wait: Option<Duration>,
}

fn bad(msg: &str) -> ApiError {
    ApiError::BadRequest(msg.to_string())
}

impl FeedQuery {
    /// Whether an upload's activity rows pass this query's filters.
    fn admits_upload_rows(&self) -> bool {
        self.activity_type
            .as_deref()
            .is_none_or(|t| t == db::activity::UPLOAD_ROW_TYPE)
            && self
                .method
                .as_deref()
                .is_none_or(|m| m == db::activity::UPLOAD_ROW_METHOD)
    }

    pub fn parse(q: &HashMap<String, String>) -> Result<FeedQuery, ApiError> {
        let get = |name: &str| q.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
        let text = |name: &str| match get(name) {
            Some(v) if v.contains('\0') => {
                Err(bad(&format!("{name} must not contain NUL characters")))
            }
            v => Ok(v.map(str::to_string)),
        };
        // As the platform's own handler reads it (workspace-server, handlers/activity.go): a
        // limit that is not a positive integer is the default, one over the maximum is the
        // maximum. Runtimes written against the platform send what it accepts.
        let limit = match get("limit").and_then(|v| v.parse::<i64>().ok()) {
            Some(n) if n > 0 => n.min(MAX_LIMIT),
            _ => DEFAULT_LIMIT,
        };
        let since_secs = match get("since_secs") {
            None => None,
            // A positive integer past 64 bits is over the maximum as any other is.
            Some(v) if positive_digits(v) => Some(
                v.parse::<i64>()
                    .map_or(MAX_WINDOW_SECS, |n| n.min(MAX_WINDOW_SECS)),
            ),
            Some(_) => return Err(bad("since_secs must be a positive integer")),
        };
        let since_id = match get("since_id") {
            None => None,
            Some(v) => Some(Uuid::parse_str(v).map_err(|_| bad("invalid since_id"))?),
        };
        let wait = match get("wait") {
            None => None,
            Some(v) => match v.parse::<u64>() {
                Ok(n) if (1..=MAX_WAIT_SECS).contains(&n) => Some(Duration::from_secs(n)),
                _ => return Err(bad("wait must be an integer from 1 to 60")),
            },
        };
        let peer_info =
            get("include").is_some_and(|v| v.split(',').any(|i| i.trim() == "peer_info"));
        Ok(FeedQuery {
            activity_type: text("type")?,
            method: text("method")?,
            since_id,
            since_secs,
            limit,
            peer_info,
            wait,
        })
    }
}

/// Digits only, not all zero: a positive integer, however long.
fn positive_digits(v: &str) -> bool {
    let v = v.strip_prefix('+').unwrap_or(v);
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) && v.bytes().any(|b| b != b'0')
}

#[utoipa::path(
    get,
    path = "/workspaces/{id}/activity",
    tag = "activity",
    summary = "The activity feed a workspace polls",
    params(
        ("id" = uuid::Uuid, Path, description = "workspace UUID"),
        ("type" = Option<String>, Query, description = "activity_type filter"),
        ("method" = Option<String>, Query, description = "method filter"),
        ("since_id" = Option<String>, Query, description = "cursor: rows after this one, oldest first"),
        ("since_secs" = Option<i64>, Query, description = "window (positive; max 30 days)"),
        ("limit" = Option<i64>, Query, description = "default 100 (also for a value that is not a positive integer), max 500"),
        ("include" = Option<String>, Query, description = "`peer_info` adds `attachments`, and `peer_name` and `peer_role` of the workspace a row came from"),
        ("wait" = Option<u64>, Query, minimum = 1, maximum = 60, description = "with since_id: hold the request up to this many seconds (1-60) until a row commits"),
    ),
    responses(
        (status = 200, description = "rows: after since_id oldest first, else newest first", body = Vec<ActivityRow>),
        (status = 400, description = "invalid parameter", body = api::ErrorBody),
        (status = 401, description = "missing or invalid bearer", body = api::ErrorBody),
        (status = 410, description = "since_id cursor not found", body = api::ErrorBody),
        (status = 429, description = "the workspace has MAX_LONG_POLLS_PER_WORKSPACE long polls waiting, or (an answer over 16 KiB) MAX_CONCURRENT_DOWNLOADS_PER_WORKSPACE downloads and large answers streaming, or this client address its SLOT_SHARE_PER_CLIENT of them (code client_busy) (Retry-After)", body = api::ErrorBody),
        (status = 503, description = "datastore unavailable, or MAX_LONG_POLLS long polls waiting, or (an answer over 16 KiB) MAX_CONCURRENT_DOWNLOADS downloads and large answers streaming (Retry-After)", body = api::ErrorBody),
    )
)]
pub async fn list(
    State(st): State<AppState>,
    who: WorkspaceClaim,
    peer: Option<Extension<PeerWatch>>,
    connection: Option<Extension<Arc<super::shed::Connection>>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let query = FeedQuery::parse(&q)?;
    // A connection whose read buffer grew and may not stay open does not wait: its answer
    // closes it, and its client polls again on a new one.
    let may_wait = connection.is_none_or(|Extension(c)| c.may_stay_open());
    drop(q);
    let (workspace_id, credential) = (who.workspace_id, who.credential);
    // The read is boxed, so the state a long poll holds while it waits (up to a minute, times
    // 10,000 pollers) is only the wait's, not the query's.
    let (Some(cursor), Some(wait)) = (query.since_id, query.wait) else {
        let rows = Box::pin(fetch(&st, workspace_id, credential, &query)).await?;
        return answer::json(&st, who, &project(rows, &query));
    };
    // Long poll: subscribe first, so a row committing between the query and the wait still
    // wakes us; a waiting request holds no database connection.
    let subscription = st.hub.subscribe(workspace_id);
    let deadline = tokio::time::Instant::now() + wait;
    // Only an upload's rows are announced (`longpoll`): a wait whose filter excludes them
    // cannot be answered by a wake, and does not read the feed again on each. 32 such waits
    // made every upload of their workspace 33 transactions (a black-box probe).
    let wakes_can_answer = query.admits_upload_rows();
    let m = metrics();
    let (queried, ignored) = (
        m.long_poll_wakes.with_label_values(&["queried"]),
        m.long_poll_wakes.with_label_values(&["ignored"]),
    );
    let peer = peer.as_ref().map(|Extension(p)| p);
    // When the client is next asked after: once per PEER_CHECK whatever wakes the wait
    // meanwhile (an upload a second must not put it off for the whole wait).
    let mut next_check = tokio::time::Instant::now() + PEER_CHECK;
    let mut slot = None;
    loop {
        let woken = subscription.notify().notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let rows = Box::pin(fetch(&st, workspace_id, credential, &query)).await?;
        // A replica shutting down does not start a wait (see `AppState::stop_accepting`).
        if !rows.is_empty()
            || tokio::time::Instant::now() >= deadline
            || !st.is_accepting()
            || !may_wait
        {
            // The wait's slot goes before a large answer takes a download slot.
            drop(slot);
            return answer::json(&st, who, &project(rows, &query));
        }
        // Taken once the caller is checked and there is nothing to answer; held to the end
        // of the request (released by drop, however it ends).
        if slot.is_none() {
            slot = Some(wait_slot(&st, who)?);
        }
        loop {
            match wait_for(woken.as_mut(), deadline, peer, &mut next_check).await {
                Waited::Woken => {}
                Waited::Ended => {
                    tracing::debug!(%workspace_id, %cursor, "long poll ended with nothing new");
                    break;
                }
                Waited::ClientGone => {
                    tracing::debug!(%workspace_id, %cursor, "long poll's client went: its place freed");
                    // Nobody reads it; the connection closes after it rather than go on to
                    // whatever the client left behind it.
                    let mut gone = super::ok_json(Vec::<ActivityRow>::new());
                    gone.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    return Ok(gone);
                }
            }
            if !wakes_can_answer {
                // Armed again before the shutdown is looked at: a wake between is seen.
                woken.set(subscription.notify().notified());
                woken.as_mut().enable();
            }
            // Woken by the shutdown: answer as an ended wait does, without one more query
            // per waiter (thousands at once, while the replica drains). The client's cursor
            // has not moved, so another replica answers it whatever committed meanwhile.
            if !st.is_accepting() {
                return Ok(super::ok_json(Vec::<ActivityRow>::new()));
            }
            if wakes_can_answer {
                queried.inc();
                break;
            }
            ignored.inc();
        }
    }
}

/// How often a waiting long poll asks whether its client is still there ([`PeerWatch`]):
/// about as long as a place is held after its client went where hyper cannot tell.
const PEER_CHECK: Duration = Duration::from_secs(3);

enum Waited {
    Woken,
    Ended,
    ClientGone,
}

/// Waits until `woken`, the `deadline`, or the client is found gone (asked at `next_check`,
/// then every [`PEER_CHECK`] after, without a query).
async fn wait_for(
    mut woken: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    deadline: tokio::time::Instant,
    peer: Option<&PeerWatch>,
    next_check: &mut tokio::time::Instant,
) -> Waited {
    loop {
        let check = deadline.min(*next_check);
        tokio::select! {
            _ = woken.as_mut() => return Waited::Woken,
            _ = tokio::time::sleep_until(check) => {
                if check >= deadline {
                    return Waited::Ended;
                }
                *next_check = check + PEER_CHECK;
                if peer.is_some_and(PeerWatch::gone) {
                    return Waited::ClientGone;
                }
            }
        }
    }
}

/// A place to wait (counted in `long_polls_waiting`): every commit in the workspace wakes
/// each waiting poll into a feed query, so one workspace's pollers are bounded
/// (`MAX_LONG_POLLS_PER_WORKSPACE`) or its uploads could take the connection pool from
/// everyone; the replica's are too (`MAX_LONG_POLLS`), below its connection cap.
fn wait_slot(st: &AppState, who: WorkspaceClaim) -> Result<Slot, ApiError> {
    st.long_poll_slots
        .acquire(who.workspace_id, who.client)
        .map_err(|refused| match refused {
            Refused::Replica => ApiError::LongPollCapacity,
            Refused::Workspace => ApiError::WorkspaceLongPollsBusy,
            Refused::Client => ApiError::ClientBusy,
        })
}

/// One read of the feed (one round trip, the caller check included; one more for the peers
/// of `include=peer_info` when a row has a source): after the cursor (oldest first), or the
/// newest rows.
async fn fetch(
    st: &AppState,
    workspace_id: Uuid,
    credential: Credential,
    q: &FeedQuery,
) -> Result<Vec<ActivityRow>, ApiError> {
    let q = q.clone();
    let hash = credential.token_hash();
    let rows = st
        .db
        .run(move |c| {
            Box::pin(async move {
                let filter = Filter {
                    activity_type: q.activity_type.as_deref(),
                    method: q.method.as_deref(),
                    since_secs: q.since_secs,
                    limit: q.limit,
                };
                let mut rows =
                    db::activity::feed(c, workspace_id, hash, q.since_id, &filter).await?;
                if let (true, Checked::Allowed(Some(rows))) = (q.peer_info, &mut rows) {
                    name_peers(c, rows).await?;
                }
                Ok(rows)
            })
        })
        .await?;
    match rows {
        Checked::Refused => Err(ApiError::InvalidToken),
        Checked::Allowed(None) => Err(ApiError::CursorGone),
        Checked::Allowed(Some(rows)) => Ok(rows),
    }
}

/// `include=peer_info`: rows from another workspace (`source_id`) get its name and role, as
/// the platform gives them (enteros-core `activity.go`, a join on `workspaces`): one more
/// round trip, only when a row has a source (an upload's rows have none).
async fn name_peers(c: &mut sqlx::PgConnection, rows: &mut [ActivityRow]) -> sqlx::Result<()> {
    let mut sources: Vec<Uuid> = rows.iter().filter_map(|r| r.source_id).collect();
    if sources.is_empty() {
        return Ok(());
    }
    sources.sort_unstable();
    sources.dedup();
    let peers: HashMap<Uuid, db::activity::Peer> = db::activity::peers(c, &sources)
        .await?
        .into_iter()
        .map(|p| (p.id, p))
        .collect();
    for row in rows {
        if let Some(peer) = row.source_id.and_then(|id| peers.get(&id)) {
            row.peer_name = peer.name.clone();
            row.peer_role = peer.role.clone();
        }
    }
    Ok(())
}

/// `include=peer_info`: each row gets `attachments` when it refers to files, as the platform
/// projects them (enteros-core `extractAttachmentsFromRequestBody`), so a feed over a database
/// the platform also writes shows the files of its `message/send` rows too: the file parts of
/// an A2A message, else a flat upload manifest.
fn project(mut rows: Vec<ActivityRow>, q: &FeedQuery) -> Vec<ActivityRow> {
    if q.peer_info {
        for row in &mut rows {
            row.attachments = row.request_body.as_ref().and_then(attachments_of);
        }
    }
    rows
}

fn attachments_of(body: &Value) -> Option<Vec<Attachment>> {
    let from_parts = message_part_attachments(body);
    if !from_parts.is_empty() {
        return Some(from_parts);
    }
    manifest_attachment(body).map(|a| vec![a])
}

/// A non-empty string field of `v`.
fn text<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// The file, image, audio and video parts of `params.message.parts` (the A2A message shape):
/// the kind from `kind` (`type` in older senders), the fields from the part's `file` object
/// or the part itself; a part with neither uri nor name says nothing and is left out.
fn message_part_attachments(body: &Value) -> Vec<Attachment> {
    let Some(parts) = body
        .pointer("/params/message/parts")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    parts
        .iter()
        .filter_map(|part| {
            let kind = text(part, "kind").or_else(|| text(part, "type"))?;
            if !matches!(kind, "file" | "image" | "audio" | "video") {
                return None;
            }
            let file = part.get("file").filter(|f| f.is_object()).unwrap_or(part);
            let (uri, name) = (text(file, "uri"), text(file, "name"));
            if uri.is_none() && name.is_none() {
                return None;
            }
            Some(Attachment {
                kind: kind.to_string(),
                uri: uri.map(str::to_string),
                name: name.map(str::to_string),
                mime_type: text(file, "mime_type").map(str::to_string),
            })
        })
        .collect()
}

/// The flat manifest an upload's row holds (`uri`, `file_id`, `name`, `mimeType`): one
/// attachment, its kind from the mimetype; none without a uri or file_id, or with neither a
/// uri nor a name.
fn manifest_attachment(body: &Value) -> Option<Attachment> {
    let uri = text(body, "uri");
    if uri.is_none() && text(body, "file_id").is_none() {
        return None;
    }
    let name = text(body, "name");
    if uri.is_none() && name.is_none() {
        return None;
    }
    let mime_type = text(body, "mimeType").or_else(|| text(body, "mime_type"));
    Some(Attachment {
        kind: attachment_kind(mime_type.unwrap_or("")).to_string(),
        uri: uri.map(str::to_string),
        name: name.map(str::to_string),
        mime_type: mime_type.map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn q(pairs: &[(&str, &str)]) -> Result<FeedQuery, ApiError> {
        FeedQuery::parse(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn query_rules() {
        let d = q(&[]).unwrap();
        assert_eq!(
            (d.limit, d.since_secs, d.wait, d.peer_info),
            (100, None, None, false)
        );
        assert_eq!(q(&[("limit", "9999")]).unwrap().limit, 500);
        for odd in ["-4", "0", "ten", "1.5"] {
            assert_eq!(q(&[("limit", odd)]).unwrap().limit, 100, "limit={odd}");
        }
        for huge in [
            "99999999999",
            "9223372036854775808",
            "+000123456789012345678901234567890",
        ] {
            assert_eq!(
                q(&[("since_secs", huge)]).unwrap().since_secs,
                Some(MAX_WINDOW_SECS),
                "since_secs={huge}"
            );
        }
        for (k, v) in [
            ("since_secs", "0"),
            ("since_secs", "-1"),
            ("since_secs", "x"),
            ("since_id", "nope"),
            ("wait", "0"),
            ("wait", "61"),
            ("type", "a\0b"),
        ] {
            assert!(q(&[(k, v)]).is_err(), "{k}={v}");
        }
        assert!(q(&[("include", "x,peer_info")]).unwrap().peer_info);
        assert_eq!(
            q(&[("wait", "60")]).unwrap().wait,
            Some(Duration::from_secs(60))
        );
    }

    fn one(kind: &str, uri: Option<&str>, name: Option<&str>, mime: Option<&str>) -> Attachment {
        Attachment {
            kind: kind.into(),
            uri: uri.map(Into::into),
            name: name.map(Into::into),
            mime_type: mime.map(Into::into),
        }
    }

    #[test]
    fn attachments_follow_the_platform_projection() {
        let body = json!({"file_id": "f", "uri": "platform-pending:w/f", "name": "a.png", "mimeType": "image/png", "size": 1});
        assert_eq!(
            attachments_of(&body),
            Some(vec![one(
                "image",
                Some("platform-pending:w/f"),
                Some("a.png"),
                Some("image/png")
            )])
        );
        let plain = json!({"uri": "u", "name": "n", "mimeType": ""});
        let a = &attachments_of(&plain).unwrap()[0];
        assert_eq!((a.kind.as_str(), &a.mime_type), ("file", &None));
        assert_eq!(attachments_of(&json!({"text": "hi"})), None);
        // A manifest with a file_id alone says nothing: no bare {"kind"} (the platform's rule).
        assert_eq!(attachments_of(&json!({"file_id": "f"})), None);
        assert_eq!(
            attachments_of(&json!({"file_id": "f", "name": "n.txt"})),
            Some(vec![one("file", None, Some("n.txt"), None)])
        );
        assert_eq!(attachment_kind("video/mp4"), "video");
        assert_eq!(attachment_kind("audio/ogg"), "audio");
    }

    /// The platform's message-parts arm: an A2A `message/send` row's file parts (v1 `kind`
    /// with a `file` object, v0 `type` with the fields inline), text parts and parts with
    /// nothing to say left out; the parts win over a manifest at the root.
    #[test]
    fn attachments_of_a_message_are_its_file_parts() {
        let body = json!({"method": "message/send", "uri": "ignored", "params": {"message": {"parts": [
            {"kind": "text", "text": "see these"},
            {"kind": "file", "file": {"uri": "platform-pending:w/1", "mime_type": "application/pdf", "name": "a.pdf"}},
            {"type": "image", "uri": "workspace:b.png", "mime_type": "image/png", "name": "b.png"},
            {"kind": "audio", "file": {"mime_type": "audio/ogg"}},
            {"kind": "video", "file": {"name": "c.mp4"}},
            "not an object",
            {"kind": "data", "data": {}}
        ]}}});
        assert_eq!(
            attachments_of(&body),
            Some(vec![
                one(
                    "file",
                    Some("platform-pending:w/1"),
                    Some("a.pdf"),
                    Some("application/pdf")
                ),
                one(
                    "image",
                    Some("workspace:b.png"),
                    Some("b.png"),
                    Some("image/png")
                ),
                one("video", None, Some("c.mp4"), None),
            ])
        );
        let text_only = json!({"params": {"message": {"parts": [{"kind": "text", "text": "hi"}]}}});
        assert_eq!(attachments_of(&text_only), None);
    }
}
