//! The minimal platform surface: registration, workspaces, tokens (SPEC §4 Registry).

use std::{
    net::IpAddr,
    sync::{Mutex, MutexGuard, PoisonError},
};

use axum::{extract::State, http::HeaderMap, Extension, Json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{
    error::ApiError,
    extract::{Admin, JsonBody, TokenId, WorkspaceCaller, WorkspaceId},
    peer::{client_address, counted_client, Peer},
    AppState,
};
use crate::{
    api::{
        self, CreateWorkspaceRequest, DeliveryMode, RegisterRequest, Registered, Removed, Revoked,
        TokenMinted,
    },
    auth::{self, new_token, AuthError, Caller},
    db::{
        self,
        tokens::Revocation,
        workspaces::{NewWorkspace, Workspace},
    },
    logfmt::clip,
    push_target::RegistrationCheck,
    stored::Counts,
};

fn validate_mode(mode: Option<&str>) -> Result<Option<DeliveryMode>, ApiError> {
    match mode {
        None => Ok(None),
        Some(m) => DeliveryMode::parse(m)
            .map(Some)
            .ok_or_else(|| ApiError::BadRequest("delivery_mode must be 'push' or 'poll'".into())),
    }
}

/// A new workspace's delivery mode when none is given: push with a URL, poll without.
fn initial_mode(mode: Option<DeliveryMode>, url: Option<&str>) -> DeliveryMode {
    mode.unwrap_or(if url.is_some() {
        DeliveryMode::Push
    } else {
        DeliveryMode::Poll
    })
}

fn non_empty(s: Option<&str>) -> Option<String> {
    s.map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Longest workspace name kept (characters): workspaces are never deleted, so a registration
/// without a claim must not write up to a whole JSON body's 64 KiB into one.
pub const NAME_MAX_CHARS: usize = 256;

/// The workspace name given, trimmed (`None` when absent or blank); 400 when longer than
/// [`NAME_MAX_CHARS`].
fn workspace_name(raw: Option<&str>) -> Result<Option<String>, ApiError> {
    let name = non_empty(raw);
    if name
        .as_ref()
        .is_some_and(|n| n.chars().count() > NAME_MAX_CHARS)
    {
        return Err(ApiError::BadRequest(format!(
            "name must be at most {NAME_MAX_CHARS} characters"
        )));
    }
    Ok(name)
}

/// The push callback URL, if one is given: one the proxy may call (SPEC §4: absolute
/// http(s), a host, no userinfo, query or fragment, no internal address unless allowed).
/// Caught here, a bad URL is a 400 at registration instead of a failure on every upload.
/// `url` is trimmed and not blank ([`non_empty`]).
/// `client`: the client a name lookup is counted under (`SLOT_SHARE_PER_CLIENT` of the
/// lookup places; `None`: not counted).
async fn callback_url(
    st: &AppState,
    url: Option<String>,
    client: Option<IpAddr>,
) -> Result<Option<String>, ApiError> {
    let Some(raw) = url else {
        return Ok(None);
    };
    match st.push.policy().check_registration(&raw, client).await {
        Ok(_) => Ok(Some(raw)),
        Err(RegistrationCheck::Refused(e)) => {
            tracing::info!(
                url = clip(&raw).as_str(),
                reason = e.reason,
                "push URL refused at registration"
            );
            Err(ApiError::UrlNotAllowed)
        }
        Err(RegistrationCheck::LookupsBusy) => Err(ApiError::LookupCapacity),
        Err(RegistrationCheck::ClientLookupsBusy) => Err(ApiError::ClientBusy),
    }
}

/// A workspace that exists and is not removed.
pub fn live_workspace(ws: Option<Workspace>) -> Result<Workspace, ApiError> {
    ws.filter(|w| !w.is_removed())
        .ok_or(ApiError::WorkspaceNotFound)
}

/// Issues a token for the workspace.
async fn issue_token(
    conn: &mut PgConnection,
    workspace_id: Uuid,
) -> sqlx::Result<(Uuid, auth::NewToken)> {
    let token = new_token();
    let id = db::tokens::insert(conn, workspace_id, &token.hash, &token.prefix).await?;
    tracing::info!(%workspace_id, token_id = %id, prefix = %token.prefix, "token issued");
    Ok((id, token))
}

fn registered(ws: &Workspace, token: Option<auth::NewToken>) -> Json<Registered> {
    Json(Registered {
        status: "registered".into(),
        id: ws.id,
        delivery_mode: ws.delivery_mode.clone(),
        auth_token: token.map(|t| t.token),
        platform_inbound_secret: ws.platform_inbound_secret.clone(),
    })
}

/// Whether the caller of a re-registration may change workspace `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    NoBearer,
    Refused,
    /// The workspace's own token (its id).
    Allowed(Uuid),
    Admin,
}

async fn claim(st: &AppState, headers: &HeaderMap, id: Uuid) -> Result<Claim, ApiError> {
    let bearer = match auth::bearer(headers) {
        Ok(Some(bearer)) => bearer,
        Ok(None) => return Ok(Claim::NoBearer),
        Err(_) => return Ok(Claim::Refused),
    };
    if st.auth.is_admin(bearer) {
        return Ok(Claim::Admin);
    }
    match st.auth.token_for(bearer, id).await {
        Ok(Caller::Workspace { token_id }) => Ok(Claim::Allowed(token_id)),
        Ok(Caller::Admin) => Ok(Claim::Admin),
        Err(AuthError::Invalid) => Ok(Claim::Refused),
        Err(e) => Err(e.into()),
    }
}

/// Which registration buckets a call takes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Counted {
    Nothing,
    Client,
    ClientAndReplica,
}

/// Takes the places of a registration (REGISTRATIONS_PER_MINUTE_PER_CLIENT, then
/// REGISTRATIONS_PER_MINUTE), or 429 with the wait. A call refused by the replica's bucket
/// gives the client's place back.
fn take_registration(st: &AppState, client: IpAddr, counted: Counted) -> Result<(), ApiError> {
    if counted == Counted::Nothing {
        return Ok(());
    }
    let taken = st.registrations_per_client.take(client).and_then(|()| {
        if counted == Counted::Client {
            return Ok(());
        }
        st.registrations.take().inspect_err(|_| {
            st.registrations_per_client.give_back(client);
        })
    });
    taken.map_err(|wait| ApiError::RegistrationRate {
        retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
    })
}

/// MAX_WORKSPACES: how many workspaces the registry may hold before a first registration by
/// a caller with no claim is refused. Counted as MAX_STORED_BYTES counts bytes
/// ([`Counts`]): the last reading of the table, the registrations in their transactions, and
/// what this replica created that the reading may not hold. Read before a registration and
/// counted after its commit, 30 first registrations at once all passed a bound of 3; a
/// reading stored as the whole dropped what was created while it ran; the admin's creations
/// were not counted (an audit).
pub struct WorkspaceCap {
    max: u64,
    counts: Mutex<Counts>,
}

/// A place for one new workspace under the bound, taken before its registration's
/// transaction. It goes back when dropped, unless [`Place::created`].
pub struct Place<'a> {
    cap: &'a WorkspaceCap,
    created: bool,
}

impl WorkspaceCap {
    /// `max` 0: no bound.
    pub fn new(max: u64) -> WorkspaceCap {
        WorkspaceCap {
            max,
            counts: Mutex::default(),
        }
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // Whole after any panic: each update is one call.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for a new workspace, or `None` when the registry (with the places taken) is
    /// full.
    fn take(&self) -> Option<Place<'_>> {
        // Made only when held: dropping one gives a place back.
        let room = self.counts().hold(1, self.max);
        room.then(|| Place {
            cap: self,
            created: false,
        })
    }

    /// A reading of the table begins ([`WorkspaceCap::read`] with its figure).
    pub fn reading(&self) {
        self.counts().reading_begins();
    }

    /// The reading found `workspaces`; true when it has reached the bound.
    pub fn read(&self, workspaces: u64) -> bool {
        self.counts().reading_done(workspaces);
        self.max > 0 && workspaces >= self.max
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// A workspace this replica created without a place (the admin's, or a workspace's own
    /// re-registration that found its row gone).
    fn created(&self) {
        self.counts().committed(1);
    }
}

impl Place<'_> {
    fn created(mut self) {
        self.created = true;
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.cap.counts().settle(1, self.created);
    }
}

fn give_back_registration(st: &AppState, client: IpAddr, counted: Counted) {
    if counted != Counted::Nothing {
        st.registrations_per_client.give_back(client);
    }
    if counted == Counted::ClientAndReplica {
        st.registrations.give_back();
    }
}

/// What a registration transaction decided.
enum Registration {
    Done(Box<Workspace>, Option<auth::NewToken>, bool),
    /// MAX_WORKSPACES reached: a new row for a caller with no claim was rolled back.
    Full,
    Removed,
    Unauthorized(Claim),
}

#[utoipa::path(
    post,
    path = "/registry/register",
    tag = "registry",
    summary = "Register (upsert) a workspace",
    request_body = RegisterRequest,
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "OK", body = Registered),
        (status = 400, description = "invalid body, delivery_mode, name (over 256 characters) or url (over 2048 bytes, or not allowed)", body = api::ErrorBody),
        (status = 401, description = "re-registration (of a removed workspace too) without the workspace's own token or the admin token", body = api::ErrorBody),
        (status = 408, description = "request body too slow", body = api::ErrorBody),
        (status = 409, description = "workspace was removed (told the admin only: anyone else gets 401)", body = api::ErrorBody),
        (status = 413, description = "body over 64 KiB", body = api::ErrorBody),
        (status = 429, description = "REGISTRATIONS_PER_MINUTE used up on this replica by callers without a claim on the workspace, or REGISTRATIONS_PER_MINUTE_PER_CLIENT by this client address (callers without a claim, and re-registrations whose push url names a host) (code registration_rate, Retry-After); or this client address holds its SLOT_SHARE_PER_CLIENT of the replica's push URL lookups (code client_busy, Retry-After)", body = api::ErrorBody),
        (status = 503, description = "datastore unavailable, or push URL lookups all in progress, or (a first registration without the admin token) the registry holds MAX_WORKSPACES workspaces (code registry_full, Retry-After)", body = api::ErrorBody),
    )
)]
pub async fn register(
    State(st): State<AppState>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<RegisterRequest>,
) -> Result<Json<Registered>, ApiError> {
    let mode = validate_mode(req.delivery_mode.as_deref())?;
    let name = workspace_name(req.agent_card.as_ref().and_then(|c| c.name.as_deref()))?;
    // Decided before the transaction (a token check is a query of its own); it matters
    // only if the workspace exists.
    let claim = claim(&st, &headers, req.id).await?;
    // Without a claim this may create a workspace and a token that nothing removes: at most
    // REGISTRATIONS_PER_MINUTE of those (before the URL's name lookup, which costs too). A
    // workspace's own re-registration is not counted, unless its push URL names a host: the
    // lookup holds a place of MAX_CONCURRENT_REGISTRATION_LOOKUPS until the resolver answers,
    // so those count against the client's bucket (the admin's never). The client's bucket
    // first: a client refused there uses none of the replica's.
    let raw_url = non_empty(req.url.as_deref());
    let lookup = raw_url
        .as_deref()
        .is_some_and(|u| st.push.policy().needs_lookup(u));
    let counted = match claim {
        Claim::Admin => Counted::Nothing,
        Claim::Allowed(_) if !lookup => Counted::Nothing,
        Claim::Allowed(_) => Counted::Client,
        Claim::NoBearer | Claim::Refused => Counted::ClientAndReplica,
    };
    // A request without a peer came from inside the process (tests): one unknown client.
    let peer = peer.map_or(IpAddr::from([0, 0, 0, 0]), |Extension(Peer(ip))| ip);
    let client = client_address(peer, &headers, &st.trusted_proxies);
    // Its lookup's place counts against its client's share, the admin's against nobody's.
    let looked_up_for =
        counted_client(client, &st.trusted_proxies).filter(|_| claim != Claim::Admin);
    take_registration(&st, client, counted)?;
    let url = callback_url(&st, raw_url, looked_up_for)
        .await
        .inspect_err(|e| {
            // No lookup was made: the places taken for it go back.
            if matches!(e, ApiError::LookupCapacity | ApiError::ClientBusy) {
                give_back_registration(&st, client, counted);
            }
        })?;
    let id = req.id;
    let secret = auth::new_secret();
    // Only a new row is refused: a stranger's re-registration of an existing workspace gets
    // its 401, as before, not a 503 to retry.
    let place = match counted {
        Counted::ClientAndReplica => st.workspace_cap.take(),
        _ => None,
    };
    let refuse_new = counted == Counted::ClientAndReplica && place.is_none();
    let outcome = st
        .db
        .run(move |c| {
            Box::pin(async move {
                let mut tx = sqlx::Connection::begin(&mut *c).await?;
                let created = db::workspaces::insert(
                    &mut tx,
                    &NewWorkspace {
                        id,
                        name: name.as_deref().unwrap_or(""),
                        delivery_mode: initial_mode(mode, url.as_deref()),
                        url: url.as_deref(),
                        platform_inbound_secret: &secret,
                    },
                )
                .await?;
                // Only the admin learns that a workspace was removed; to anyone else it is an
                // existing workspace they have no claim on (its tokens are all revoked).
                let removed = match claim {
                    Claim::Admin => Registration::Removed,
                    other => Registration::Unauthorized(other),
                };
                // Row lock: two first registrations racing cannot both be handed a token.
                let Some(ws) = db::workspaces::get_for_update(&mut tx, id).await? else {
                    return Ok(removed);
                };
                if ws.is_removed() {
                    return Ok(removed);
                }
                // The token was checked before the transaction: one revoked since is no
                // claim (the workspace's row lock does not order a revocation; this does).
                let claim = match claim {
                    Claim::Allowed(token) if !db::tokens::hold_live(&mut tx, token).await? => {
                        Claim::Refused
                    }
                    other => other,
                };
                // A new row for an id whose old row the platform deleted: the old
                // workspace's uploads and activity are still there, and knowing the id is
                // no claim on them either. Only the admin starts it afresh.
                if created
                    && !matches!(claim, Claim::Allowed(_) | Claim::Admin)
                    && db::workspaces::has_history(&mut tx, id).await?
                {
                    return Ok(Registration::Unauthorized(claim));
                }
                if created && refuse_new {
                    return Ok(Registration::Full);
                }
                if created {
                    let (_, token) = issue_token(&mut tx, id).await?;
                    tx.commit().await?;
                    return Ok(Registration::Done(Box::new(ws), Some(token), true));
                }
                // An existing workspace is changed only by its own token or the admin's, even
                // when all its tokens are revoked: knowing an id is no claim on it.
                if !matches!(claim, Claim::Allowed(_) | Claim::Admin) {
                    return Ok(Registration::Unauthorized(claim));
                }
                let ws = db::workspaces::update(
                    &mut tx,
                    id,
                    name.as_deref(),
                    mode,
                    url.as_deref(),
                    &secret,
                )
                .await?;
                tx.commit().await?;
                Ok(Registration::Done(Box::new(ws), None, false))
            })
        })
        .await?;
    match outcome {
        Registration::Done(ws, token, created) => {
            if created {
                match place {
                    Some(place) => place.created(),
                    None => st.workspace_cap.created(),
                }
            }
            tracing::info!(workspace_id = %ws.id, delivery_mode = clip(&ws.delivery_mode).as_str(), created, "workspace registered");
            Ok(registered(&ws, token))
        }
        Registration::Full => {
            give_back_registration(&st, client, counted);
            Err(ApiError::RegistryFull)
        }
        Registration::Removed => Err(ApiError::WorkspaceRemoved),
        Registration::Unauthorized(Claim::NoBearer) => Err(ApiError::MissingToken),
        Registration::Unauthorized(_) => Err(ApiError::InvalidToken),
    }
}

#[utoipa::path(
    post,
    path = "/workspaces",
    tag = "registry",
    summary = "Create a workspace (admin)",
    request_body = CreateWorkspaceRequest,
    responses(
        (status = 200, description = "OK", body = Registered),
        (status = 400, description = "invalid body, delivery_mode, name (over 256 characters) or url (over 2048 bytes, or not allowed)", body = api::ErrorBody),
        (status = 401, description = "not the admin", body = api::ErrorBody),
        (status = 408, description = "request body too slow", body = api::ErrorBody),
        (status = 409, description = "workspace already exists", body = api::ErrorBody),
        (status = 413, description = "body over 64 KiB", body = api::ErrorBody),
        (status = 503, description = "datastore unavailable, or push URL lookups all in progress", body = api::ErrorBody),
    )
)]
pub async fn create(
    State(st): State<AppState>,
    _: Admin,
    JsonBody(req): JsonBody<CreateWorkspaceRequest>,
) -> Result<Json<Registered>, ApiError> {
    let name = workspace_name(req.name.as_deref())?
        .ok_or_else(|| ApiError::BadRequest("name is required".into()))?;
    let mode = validate_mode(req.delivery_mode.as_deref())?;
    // The admin's own lookups are not counted as a client's.
    let url = callback_url(&st, non_empty(req.url.as_deref()), None).await?;
    let id = req.id.unwrap_or_else(Uuid::new_v4);
    let secret = auth::new_secret();
    let created = st
        .db
        .run(move |c| {
            Box::pin(async move {
                let mut tx = sqlx::Connection::begin(&mut *c).await?;
                let new = NewWorkspace {
                    id,
                    name: &name,
                    delivery_mode: initial_mode(mode, url.as_deref()),
                    url: url.as_deref(),
                    platform_inbound_secret: &secret,
                };
                if !db::workspaces::insert(&mut tx, &new).await? {
                    return Ok(None);
                }
                let (_, token) = issue_token(&mut tx, id).await?;
                let ws = db::workspaces::get(&mut *tx, id).await?;
                tx.commit().await?;
                Ok(ws.map(|ws| (ws, token)))
            })
        })
        .await?;
    let (ws, token) = created.ok_or(ApiError::WorkspaceExists)?;
    st.workspace_cap.created();
    tracing::info!(workspace_id = %id, delivery_mode = %ws.delivery_mode, "workspace created");
    Ok(registered(&ws, Some(token)))
}

#[utoipa::path(
    get,
    path = "/workspaces/{id}",
    tag = "registry",
    summary = "A workspace",
    params(("id" = uuid::Uuid, Path, description = "workspace UUID")),
    responses(
        (status = 200, description = "OK", body = api::Workspace),
        (status = 400, description = "invalid workspace ID", body = api::ErrorBody),
        (status = 401, description = "missing or invalid bearer", body = api::ErrorBody),
        (status = 404, description = "workspace not found", body = api::ErrorBody),
        (status = 503, description = "datastore unavailable", body = api::ErrorBody),
    )
)]
pub async fn get_workspace(
    State(st): State<AppState>,
    who: WorkspaceCaller,
) -> Result<Json<api::Workspace>, ApiError> {
    let id = who.workspace_id;
    let ws = st
        .db
        .run(move |c| Box::pin(db::workspaces::get(c, id)))
        .await?
        .ok_or(ApiError::WorkspaceNotFound)?;
    Ok(Json(ws.into()))
}

#[utoipa::path(
    delete,
    path = "/workspaces/{id}",
    tag = "registry",
    summary = "Remove a workspace (admin); revokes its tokens",
    params(("id" = uuid::Uuid, Path, description = "workspace UUID")),
    responses(
        (status = 200, description = "OK", body = Removed),
        (status = 400, description = "invalid workspace ID", body = api::ErrorBody),
        (status = 401, description = "missing or invalid bearer", body = api::ErrorBody),
        (status = 404, description = "workspace not found", body = api::ErrorBody),
        (status = 503, description = "datastore unavailable", body = api::ErrorBody),
    )
)]
pub async fn delete_workspace(
    State(st): State<AppState>,
    _: Admin,
    WorkspaceId(id): WorkspaceId,
) -> Result<Json<Removed>, ApiError> {
    let removed = st
        .db
        .run(move |c| {
            Box::pin(async move {
                let mut tx = sqlx::Connection::begin(&mut *c).await?;
                let removed = db::workspaces::remove(&mut tx, id).await?;
                tx.commit().await?;
                Ok(removed)
            })
        })
        .await?;
    if !removed {
        return Err(ApiError::WorkspaceNotFound);
    }
    tracing::info!(workspace_id = %id, "workspace removed");
    Ok(Json(Removed {
        status: "removed".into(),
        id,
    }))
}

enum Minted {
    Issued(Uuid, auth::NewToken),
    NoWorkspace,
    /// MAX_TOKENS_PER_WORKSPACE live tokens already.
    AtLimit,
    /// The caller's token was revoked after its check.
    Revoked,
}

#[utoipa::path(
    post,
    path = "/workspaces/{id}/tokens",
    tag = "registry",
    summary = "Mint an extra workspace token",
    params(("id" = uuid::Uuid, Path, description = "workspace UUID")),
    responses(
        (status = 200, description = "OK", body = TokenMinted),
        (status = 400, description = "invalid workspace ID", body = api::ErrorBody),
        (status = 401, description = "missing or invalid bearer", body = api::ErrorBody),
        (status = 404, description = "workspace not found", body = api::ErrorBody),
        (status = 429, description = "MAX_TOKENS_PER_WORKSPACE live tokens already: revoke one first (code token_limit)", body = api::ErrorBody),
        (status = 503, description = "datastore unavailable", body = api::ErrorBody),
    )
)]
pub async fn mint_token(
    State(st): State<AppState>,
    who: WorkspaceCaller,
) -> Result<Json<TokenMinted>, ApiError> {
    let id = who.workspace_id;
    let max = st.limits.max_tokens_per_workspace;
    let minted = st
        .db
        .run(move |c| {
            Box::pin(async move {
                let mut tx = sqlx::Connection::begin(&mut *c).await?;
                // Row lock: two mints racing cannot both pass the cap.
                let live = db::workspaces::get_for_update(&mut tx, id)
                    .await?
                    .is_some_and(|w| !w.is_removed());
                // The caller's token was checked before the transaction: one revoked since
                // mints nothing. Checked before the workspace, as a request sent now would
                // be: a workspace removed meanwhile (its tokens revoked with it) is 401 to
                // its token, as to the revocation and the re-registration, and 404 to the
                // admin.
                if let Caller::Workspace { token_id } = who.caller {
                    if !db::tokens::hold_live(&mut tx, token_id).await? {
                        return Ok(Minted::Revoked);
                    }
                }
                if !live {
                    return Ok(Minted::NoWorkspace);
                }
                if db::tokens::live_count(&mut tx, id).await? as u64 >= max {
                    return Ok(Minted::AtLimit);
                }
                let (token_id, token) = issue_token(&mut tx, id).await?;
                tx.commit().await?;
                Ok(Minted::Issued(token_id, token))
            })
        })
        .await?;
    let (token_id, token) = match minted {
        Minted::Issued(token_id, token) => (token_id, token),
        Minted::NoWorkspace => return Err(ApiError::WorkspaceNotFound),
        Minted::AtLimit => return Err(ApiError::TokenLimit { max }),
        Minted::Revoked => return Err(ApiError::InvalidToken),
    };
    Ok(Json(TokenMinted {
        id: token_id,
        auth_token: token.token,
        prefix: token.prefix,
    }))
}

#[utoipa::path(
    delete,
    path = "/workspaces/{id}/tokens/{token_id}",
    tag = "registry",
    summary = "Revoke one token",
    params(("id" = uuid::Uuid, Path, description = "workspace UUID"), ("token_id" = uuid::Uuid, Path, description = "token UUID")),
    responses(
        (status = 200, description = "OK", body = Revoked),
        (status = 400, description = "invalid workspace or token ID", body = api::ErrorBody),
        (status = 401, description = "missing or invalid bearer", body = api::ErrorBody),
        (status = 404, description = "token not found", body = api::ErrorBody),
        (status = 503, description = "datastore unavailable", body = api::ErrorBody),
    )
)]
pub async fn revoke_token(
    State(st): State<AppState>,
    who: WorkspaceCaller,
    TokenId(token_id): TokenId,
) -> Result<Json<Revoked>, ApiError> {
    let id = who.workspace_id;
    let keep = st.limits.max_tokens_per_workspace as i64;
    let caller = match who.caller {
        Caller::Workspace { token_id } => Some(token_id),
        Caller::Admin => None,
    };
    let revoked = st
        .db
        .run(move |c| Box::pin(db::tokens::revoke(c, id, token_id, keep, caller)))
        .await?;
    match revoked {
        Revocation::Revoked => {}
        Revocation::NoSuchToken => return Err(ApiError::TokenNotFound),
        Revocation::CallerRevoked => return Err(ApiError::InvalidToken),
    }
    tracing::info!(workspace_id = %id, %token_id, "token revoked");
    Ok(Json(Revoked { revoked: true }))
}

#[cfg(test)]
mod tests {
    use super::WorkspaceCap;

    #[test]
    fn places_in_flight_count_against_the_bound_until_given_back() {
        let cap = WorkspaceCap::new(3);
        cap.reading();
        assert!(!cap.read(1));
        let a = cap.take().expect("room for two");
        let b = cap.take().expect("room for one");
        assert!(cap.take().is_none(), "two in flight fill it");
        drop(b);
        let c = cap.take().expect("a place given back is free again");
        a.created();
        assert!(cap.take().is_none(), "one created, one in flight");
        drop(c);
        let d = cap.take().expect("two counted, room for one");
        d.created();
        assert!(cap.take().is_none(), "the created ones stay counted");
        cap.reading();
        assert!(!cap.read(2), "a reading below the bound");
        assert!(cap.take().is_some());
        cap.reading();
        assert!(cap.read(3), "a reading at the bound");
        assert!(cap.take().is_none());
        let unbounded = WorkspaceCap::new(0);
        let places: Vec<_> = (0..10).map(|_| unbounded.take()).collect();
        assert!(places.iter().all(Option::is_some), "0: no bound");
    }

    /// A reading stored as the whole dropped what was created while it ran: 20 workspaces
    /// created during a slow count had their room handed out again (an audit).
    #[test]
    fn what_is_created_while_a_reading_runs_stays_counted() {
        let cap = WorkspaceCap::new(10);
        cap.reading();
        assert!(!cap.read(5));
        cap.reading();
        for _ in 0..5 {
            cap.take().expect("room").created();
        }
        // The count's snapshot came before those commits: it says 5 still.
        assert!(!cap.read(5));
        assert!(cap.take().is_none(), "5 read and 5 created since its mark");
        // The next reading sees them.
        cap.reading();
        assert!(cap.read(10));
        assert!(cap.take().is_none());
        cap.reading();
        assert!(!cap.read(9), "one removed by the platform");
        assert!(cap.take().is_some());
    }
}
