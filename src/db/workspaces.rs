use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::{
    tokens::{checked_rows, Checked, CALLER},
    uploads::PendingTotals,
};
use crate::api::{self, DeliveryMode, WorkspaceStatus};

/// A workspace row. Mode and status stay text here: rows written by the platform may hold
/// values this binary never writes (`''`, `offline`, ...), and must still be served. The
/// platform's own table (SPEC §2; `CREATE TABLE IF NOT EXISTS` keeps it) has name, mode and
/// status nullable: they are read as `''` ([`COLUMNS`]), which means the same (a push mode,
/// SPEC §4 Upload step 2; not removed) and keeps the API's strings strings. Its created_at
/// may be NULL too.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Workspace {
    pub id: Uuid,
    pub name: String,
    pub delivery_mode: String,
    pub url: Option<String>,
    pub platform_inbound_secret: Option<String>,
    pub status: String,
    /// NULL in a platform row is served as `null`: no instant to make up.
    pub created_at: Option<DateTime<Utc>>,
}

impl Workspace {
    pub fn is_removed(&self) -> bool {
        self.status == "removed"
    }
}

impl From<Workspace> for api::Workspace {
    fn from(w: Workspace) -> Self {
        api::Workspace {
            id: w.id,
            name: w.name,
            delivery_mode: w.delivery_mode,
            url: w.url,
            status: w.status,
            created_at: w.created_at,
        }
    }
}

/// The columns of [`Workspace`], NULLs read as `''` (a platform row may hold them).
const COLUMNS: &str =
    "id, COALESCE(name, '') AS name, COALESCE(delivery_mode, '') AS delivery_mode,
     url, platform_inbound_secret, COALESCE(status, '') AS status, created_at";

pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<Workspace>> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM workspaces WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await
}

/// Everything an upload needs to know before it reads a byte, in one round trip: whether the
/// caller may upload to this workspace, the workspace, and its pending totals (the quotas).
pub async fn for_upload(
    conn: &mut PgConnection,
    id: Uuid,
    token_hash: Option<[u8; 32]>,
) -> sqlx::Result<Checked<Option<(Workspace, PendingTotals)>>> {
    #[derive(sqlx::FromRow)]
    struct Found {
        #[sqlx(flatten)]
        ws: Workspace,
        #[sqlx(flatten)]
        totals: PendingTotals,
    }
    let rows = sqlx::query(&format!(
        "{CALLER}
         SELECT caller.ok AS caller_ok, w.id, COALESCE(w.name, '') AS name,
                COALESCE(w.delivery_mode, '') AS delivery_mode, w.url,
                w.platform_inbound_secret, COALESCE(w.status, '') AS status, w.created_at,
                GREATEST(0, COALESCE(t.unacked_bytes, 0) - COALESCE(x.b, 0))::bigint AS bytes,
                GREATEST(0, COALESCE(t.unacked_files, 0) - COALESCE(x.f, 0))::bigint AS files
         FROM caller
         LEFT JOIN workspaces w ON caller.ok AND w.id = $1
         LEFT JOIN pending_upload_totals t ON caller.ok AND t.workspace_id = $1
         LEFT JOIN LATERAL (
             SELECT sum(size_bytes) AS b, count(*) AS f FROM (
                 SELECT size_bytes FROM pending_uploads
                 WHERE caller.ok AND workspace_id = $1 AND acked_at IS NULL AND expires_at <= now()
                 -- see 20261202200000_expired_through_expiry_index.sql
                 ORDER BY expires_at) expired) x ON true"
    ))
    .bind(id)
    .bind(token_hash.as_ref().map(|h| &h[..]))
    .fetch_all(conn)
    .await?;
    Ok(match checked_rows::<Found>(&rows, "id")? {
        Checked::Refused => Checked::Refused,
        Checked::Allowed(found) => {
            Checked::Allowed(found.into_iter().next().map(|f| (f.ws, f.totals)))
        }
    })
}

pub async fn get_for_update(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<Workspace>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM workspaces WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Every workspace row, removed ones included (MAX_WORKSPACES).
pub async fn count(conn: &mut PgConnection) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM workspaces")
        .fetch_one(conn)
        .await
}

/// Whether an id has a history its workspace row did not take with it (the platform deleted
/// the row; SPEC §2: uploads and their activity rows stay until they expire): activity rows,
/// or a per-workspace total, which the first upload creates and nothing deletes (so it
/// stands for every upload the id ever had, acked and swept ones included). Two index
/// lookups: registration is unauthenticated, and a scan of acked uploads (no index by
/// workspace) for every fresh id would be a cost anyone could ask for.
pub async fn has_history(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pending_upload_totals WHERE workspace_id = $1)
             OR EXISTS (SELECT 1 FROM activity_logs WHERE workspace_id = $1)",
    )
    .bind(id)
    .fetch_one(conn)
    .await
}

pub struct NewWorkspace<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub delivery_mode: DeliveryMode,
    pub url: Option<&'a str>,
    pub platform_inbound_secret: &'a str,
}

/// Inserts the workspace; false when the id already exists.
pub async fn insert(conn: &mut PgConnection, ws: &NewWorkspace<'_>) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "INSERT INTO workspaces (id, name, delivery_mode, url, platform_inbound_secret)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
    )
    .bind(ws.id)
    .bind(ws.name)
    .bind(ws.delivery_mode)
    .bind(ws.url)
    .bind(ws.platform_inbound_secret)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Re-registration: updates only what was sent; a row without an inbound secret (written by
/// the platform, which mints them lazily) gets `secret`.
pub async fn update(
    conn: &mut PgConnection,
    id: Uuid,
    name: Option<&str>,
    delivery_mode: Option<DeliveryMode>,
    url: Option<&str>,
    secret: &str,
) -> sqlx::Result<Workspace> {
    sqlx::query_as(&format!(
        "UPDATE workspaces SET name = COALESCE($2, name), delivery_mode = COALESCE($3, delivery_mode),
                url = COALESCE($4, url),
                platform_inbound_secret = COALESCE(NULLIF(platform_inbound_secret, ''), $5)
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(name)
    .bind(delivery_mode)
    .bind(url)
    .bind(secret)
    .fetch_one(conn)
    .await
}

/// Marks the workspace removed and revokes its tokens; false when it does not exist.
pub async fn remove(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<bool> {
    let r = sqlx::query("UPDATE workspaces SET status = $2 WHERE id = $1")
        .bind(id)
        .bind(WorkspaceStatus::Removed)
        .execute(&mut *conn)
        .await?;
    if r.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query(
        "UPDATE workspace_auth_tokens SET revoked_at = now() WHERE workspace_id = $1 AND revoked_at IS NULL",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(true)
}
