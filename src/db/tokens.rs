use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

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

/// A live token (not revoked, its workspace not removed), in one round trip that also
/// stamps last_used_at when the stamp is over a minute old (auth stays read-mostly; the
/// UPDATE's own WHERE settles concurrent stamps).
pub async fn find_live(
    db: impl PgExecutor<'_>,
    token_hash: &[u8],
) -> sqlx::Result<Option<TokenRow>> {
    let row: Option<(Uuid, Uuid)> = sqlx::query_as(
        "WITH live AS (
             SELECT t.id, t.workspace_id,
                    t.last_used_at IS NULL OR t.last_used_at < now() - interval '60 seconds' AS stale
             FROM workspace_auth_tokens t
             JOIN workspaces w ON w.id = t.workspace_id
             WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND w.status <> 'removed'),
         touched AS (
             UPDATE workspace_auth_tokens SET last_used_at = now()
             WHERE id IN (SELECT id FROM live WHERE stale)
               AND (last_used_at IS NULL OR last_used_at < now() - interval '60 seconds'))
         SELECT id, workspace_id FROM live",
    )
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

/// Revokes one token of the workspace (idempotent); false when the workspace has no such token.
pub async fn revoke(
    db: impl PgExecutor<'_>,
    workspace_id: Uuid,
    token_id: Uuid,
) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "UPDATE workspace_auth_tokens SET revoked_at = COALESCE(revoked_at, now())
         WHERE id = $1 AND workspace_id = $2",
    )
    .bind(token_id)
    .bind(workspace_id)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}
