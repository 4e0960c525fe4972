use sqlx::{postgres::PgRow, FromRow, PgConnection, PgExecutor, Row};
use uuid::Uuid;

/// The caller's live token: `$1` is the workspace id, `$2` the caller's token hash.
/// `IS DISTINCT FROM`: a platform row's status may be NULL, which is not removed (`<>` would
/// be NULL, and refuse a live token).
macro_rules! live_token {
    () => {
        "WITH live AS (
        SELECT t.id, t.last_used_at IS NULL OR t.last_used_at < now() - interval '60 seconds' AS stale
        FROM workspace_auth_tokens t JOIN workspaces w ON w.id = t.workspace_id
        WHERE $2::bytea IS NOT NULL AND t.token_hash = $2 AND t.workspace_id = $1
          AND t.revoked_at IS NULL AND w.status IS DISTINCT FROM 'removed')"
    };
}

/// The stamp of a token whose last one is over a minute old (its WHERE settles concurrent
/// stamps).
macro_rules! stamp_token {
    ($ids:literal) => {
        concat!(
            "UPDATE workspace_auth_tokens SET last_used_at = now() WHERE id IN (",
            $ids,
            ") AND (last_used_at IS NULL OR last_used_at < now() - interval '60 seconds')"
        )
    };
}

/// The caller check a hot route's query begins with, so it costs no round trip of its own:
/// `$1` is the workspace id, `$2` the caller's token hash (NULL for the admin, whom the
/// service has already recognised). It yields `caller(ok)`: the admin, or a live token of
/// this very workspace; and it stamps last_used_at when the stamp is over a minute old.
/// Queries continue with `, name AS (...)` CTEs and select `caller.ok AS caller_ok`.
pub const CALLER: &str = concat!(
    live_token!(),
    ", touched AS (",
    stamp_token!("SELECT id FROM live WHERE stale"),
    "), caller AS (SELECT $2::bytea IS NULL OR EXISTS (SELECT 1 FROM live) AS ok)"
);

/// [`CALLER`] without the stamp, for a query whose rows should stream: PostgreSQL runs a
/// query with a data-modifying CTE to its end, into a store, before it sends the first row.
/// `caller(stale_token)` is the token to [`stamp`] once the rows are read.
pub const CALLER_UNSTAMPED: &str = concat!(
    live_token!(),
    ", caller AS (SELECT $2::bytea IS NULL OR EXISTS (SELECT 1 FROM live) AS ok,
                         (SELECT id FROM live WHERE stale) AS stale_token)"
);

/// Stamps last_used_at on the token [`CALLER_UNSTAMPED`] found stale.
pub async fn stamp(conn: &mut PgConnection, token_id: Uuid) -> sqlx::Result<()> {
    sqlx::query(stamp_token!("$1"))
        .bind(token_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// A hot route's answer: the caller was refused, or the rows it may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked<T> {
    Refused,
    Allowed(T),
}

/// Rows of a [`CALLER`] query: `caller_ok` on every row, and the route's columns, NULL on the
/// one row a caller who sees nothing gets (`present` names a column that is never NULL in a
/// real row).
pub fn checked_rows<T: for<'r> FromRow<'r, PgRow>>(
    rows: &[PgRow],
    present: &str,
) -> sqlx::Result<Checked<Vec<T>>> {
    let allowed = match rows.first() {
        Some(r) => r.try_get::<bool, _>("caller_ok")?,
        None => true,
    };
    if !allowed {
        return Ok(Checked::Refused);
    }
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        if r.try_get::<Option<Uuid>, _>(present)?.is_some() {
            out.push(T::from_row(r)?);
        }
    }
    Ok(Checked::Allowed(out))
}

pub struct TokenRow {
    pub id: Uuid,
    pub workspace_id: Uuid,
}

pub async fn insert(
    conn: &mut PgConnection,
    workspace_id: Uuid,
    token_hash: &[u8],
    prefix: &str,
) -> sqlx::Result<Uuid> {
    sqlx::query_scalar(
        "INSERT INTO workspace_auth_tokens (workspace_id, token_hash, prefix) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(workspace_id)
    .bind(token_hash)
    .bind(prefix)
    .fetch_one(conn)
    .await
}

/// A live token (not revoked, its workspace not removed: a NULL status is live, as in
/// [`CALLER`]), in one round trip that also stamps last_used_at when the stamp is over a
/// minute old (auth stays read-mostly; the UPDATE's own WHERE settles concurrent stamps).
pub async fn find_live(
    db: impl PgExecutor<'_>,
    token_hash: &[u8],
) -> sqlx::Result<Option<TokenRow>> {
    let row: Option<(Uuid, Uuid)> = sqlx::query_as(concat!(
        "WITH live AS (
             SELECT t.id, t.workspace_id,
                    t.last_used_at IS NULL OR t.last_used_at < now() - interval '60 seconds' AS stale
             FROM workspace_auth_tokens t
             JOIN workspaces w ON w.id = t.workspace_id
             WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND w.status IS DISTINCT FROM 'removed'),
         touched AS (",
        stamp_token!("SELECT id FROM live WHERE stale"),
        ") SELECT id, workspace_id FROM live"
    ))
    .bind(token_hash)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(id, workspace_id)| TokenRow { id, workspace_id }))
}

pub async fn has_live(conn: &mut PgConnection, workspace_id: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM workspace_auth_tokens WHERE workspace_id = $1 AND revoked_at IS NULL)",
    )
    .bind(workspace_id)
    .fetch_one(conn)
    .await
}

/// Whether token `id` is still live, held so until the transaction ends: a revocation that
/// committed since the caller's check refuses it, and one that comes later waits for the commit.
pub async fn hold_live(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<bool> {
    let live: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM workspace_auth_tokens WHERE id = $1 AND revoked_at IS NULL FOR SHARE",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?;
    Ok(live.is_some())
}

/// What [`revoke`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    Revoked,
    /// The workspace has no such token.
    NoSuchToken,
    /// The caller's own token was revoked after its check.
    CallerRevoked,
}

/// Revokes one token of the workspace (idempotent), for `caller` (a token's id; `None` for
/// the admin). Of its revoked tokens, the newest `keep` stay (for support: their prefixes);
/// older ones go, in the same transaction (`workspace_auth_tokens_revoked_idx` finds them).
pub async fn revoke(
    conn: &mut PgConnection,
    workspace_id: Uuid,
    token_id: Uuid,
    keep: i64,
    caller: Option<Uuid>,
) -> sqlx::Result<Revocation> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    // The workspace's row first, as a mint, a re-registration and a removal take it: two
    // tokens revoking each other queue here instead of deadlocking on each other's row.
    super::workspaces::get_for_update(&mut tx, workspace_id).await?;
    // The caller's token was checked before the transaction: one revoked since revokes nothing.
    if let Some(caller) = caller {
        if !hold_live(&mut tx, caller).await? {
            return Ok(Revocation::CallerRevoked);
        }
    }
    let r = sqlx::query(
        "UPDATE workspace_auth_tokens SET revoked_at = COALESCE(revoked_at, now())
         WHERE id = $1 AND workspace_id = $2",
    )
    .bind(token_id)
    .bind(workspace_id)
    .execute(&mut *tx)
    .await?;
    if r.rows_affected() != 1 {
        return Ok(Revocation::NoSuchToken);
    }
    sqlx::query(
        "DELETE FROM workspace_auth_tokens WHERE workspace_id = $1 AND revoked_at IS NOT NULL
           AND id NOT IN (SELECT id FROM workspace_auth_tokens
                          WHERE workspace_id = $1 AND revoked_at IS NOT NULL
                          ORDER BY revoked_at DESC, id LIMIT $2)",
    )
    .bind(workspace_id)
    .bind(keep)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Revocation::Revoked)
}

/// The workspace's live tokens. Under a cap, call it with the workspace row locked
/// (`workspaces::get_for_update`) and as a statement of its own: counted in the locking
/// statement, it would read the snapshot from before a concurrent mint committed.
pub async fn live_count(conn: &mut PgConnection, workspace_id: Uuid) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM workspace_auth_tokens WHERE workspace_id = $1 AND revoked_at IS NULL",
    )
    .bind(workspace_id)
    .fetch_one(conn)
    .await
}
