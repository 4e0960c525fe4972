use sqlx::{PgConnection, PgExecutor, Row};
use uuid::Uuid;

use super::tokens::{checked_rows, Checked, CALLER};

pub use crate::api::ActivityRow;

/// The channel an upload's commit is announced on (payload: the workspace id); long polls
/// listen.
pub const CHANNEL: &str = "pending_uploads_activity";

/// A payload that is no workspace id: every listener wakes all its waiters.
pub const EVERYONE: &str = "*";

/// Announces committed uploads on [`CHANNEL`], one notification per payload, in one
/// transaction of notifications only (it writes no WAL, so its commit waits on no flush).
pub async fn announce(db: impl PgExecutor<'_>, payloads: &[String]) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) p")
        .bind(CHANNEL)
        .bind(payloads)
        .execute(db)
        .await?;
    Ok(())
}

pub struct Filter<'a> {
    pub activity_type: Option<&'a str>,
    pub method: Option<&'a str>,
    /// Only rows created within this many seconds.
    pub since_secs: Option<i64>,
    pub limit: i64,
}

/// The platform's own table (SPEC §2; `CREATE TABLE IF NOT EXISTS` keeps it) has status and
/// created_at nullable: a NULL status reads as `''` (strings stay strings, as for workspaces),
/// a NULL created_at as `null`. One such row must not fail its workspace's whole feed.
const COLUMNS: &str = "id, workspace_id, activity_type, source_id, target_id, method, summary, \
                       request_body, response_body, COALESCE(status, '') AS status, error_detail, \
                       created_at, seq";

/// The type and method of the activity rows this service writes (an upload's, see
/// `pending_uploads_log`), the only rows whose commits are announced to long polls.
pub const UPLOAD_ROW_TYPE: &str = "a2a_receive";
pub const UPLOAD_ROW_METHOD: &str = "chat_upload_receive";

/// The filters given, as `$4`-`$6` of the feed queries (always bound; only those given are
/// in the text), so each filter has a statement, and a plan, of its own: one statement of the
/// form `($4 IS NULL OR activity_type = $4)` for every filter could settle on a generic plan
/// (PostgreSQL's, after five runs), and that one cannot use the indexes on the filtered
/// columns (`activity_logs_workspace_*`, see their migration).
fn filters(f: &Filter<'_>) -> String {
    let mut sql = String::from("true");
    if f.activity_type.is_some() {
        sql.push_str(" AND activity_type = $4");
    }
    if f.method.is_some() {
        sql.push_str(" AND method = $5");
    }
    if f.since_secs.is_some() {
        sql.push_str(" AND created_at >= now() - make_interval(secs => $6)");
    }
    sql
}

/// One read of a workspace's feed, the caller check and the cursor lookup included (one
/// round trip): with a cursor the rows after it, oldest first; without, the newest rows,
/// newest first. `Allowed(None)`: the cursor is not a row of this workspace (any more).
pub async fn feed(
    conn: &mut PgConnection,
    workspace_id: Uuid,
    token_hash: Option<[u8; 32]>,
    cursor: Option<Uuid>,
    f: &Filter<'_>,
) -> sqlx::Result<Checked<Option<Vec<ActivityRow>>>> {
    let filters = filters(f);
    let rows_sql = match cursor {
        Some(_) => format!(
            "SELECT {COLUMNS} FROM activity_logs
             WHERE caller.ok AND workspace_id = $1 AND seq > (SELECT seq FROM cur) AND {filters}
             ORDER BY seq ASC LIMIT $7"
        ),
        // Newest by `seq`, the order rows commit in and cursors page by: by created_at (a
        // transaction's start), a large upload's row, begun first and committed last, sat
        // below rows committed before it, and a reader that took the first row as its
        // cursor then got it again.
        None => format!(
            "SELECT {COLUMNS} FROM activity_logs
             WHERE caller.ok AND workspace_id = $1 AND {filters}
             ORDER BY seq DESC LIMIT $7"
        ),
    };
    let rows = sqlx::query(&format!(
        "{CALLER},
         cur AS (SELECT a.seq FROM activity_logs a, caller
                 WHERE caller.ok AND a.id = $3 AND a.workspace_id = $1)
         SELECT caller.ok AS caller_ok, EXISTS (SELECT 1 FROM cur) AS cursor_found, r.*
         FROM caller LEFT JOIN LATERAL ({rows_sql}) r ON true"
    ))
    .bind(workspace_id)
    .bind(token_hash.as_ref().map(|h| &h[..]))
    .bind(cursor)
    .bind(f.activity_type)
    .bind(f.method)
    .bind(f.since_secs.map(|s| s as f64))
    .bind(f.limit)
    .fetch_all(conn)
    .await?;
    let found = match rows.first() {
        Some(r) => r.try_get::<bool, _>("cursor_found")?,
        None => false,
    };
    Ok(match checked_rows::<ActivityRow>(&rows, "id")? {
        Checked::Refused => Checked::Refused,
        Checked::Allowed(_) if cursor.is_some() && !found => Checked::Allowed(None),
        Checked::Allowed(rows) => Checked::Allowed(Some(rows)),
    })
}

/// Deletes up to `limit` of this service's own upload activity rows older than
/// `retention_secs` (SPEC §10); returns how many went.
pub async fn sweep_upload_rows(
    db: impl PgExecutor<'_>,
    retention_secs: f64,
    limit: i64,
) -> sqlx::Result<u64> {
    let r = sqlx::query(
        "DELETE FROM activity_logs WHERE id IN (
             SELECT id FROM activity_logs
             WHERE method = 'chat_upload_receive'
               AND created_at < now() - make_interval(secs => $1)
             LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(retention_secs)
    .bind(limit)
    .execute(db)
    .await?;
    Ok(r.rows_affected())
}

/// A workspace an activity row came from, for `include=peer_info`: its name and role, each
/// `None` when empty.
#[derive(sqlx::FromRow)]
pub struct Peer {
    pub id: Uuid,
    pub name: Option<String>,
    pub role: Option<String>,
}

/// The workspaces among `ids` that exist. `role` is read through the row's JSON: the
/// platform's table has the column, this service's subset of it (SPEC §2) does not.
pub async fn peers(conn: &mut PgConnection, ids: &[Uuid]) -> sqlx::Result<Vec<Peer>> {
    sqlx::query_as(
        "SELECT id, NULLIF(name, '') AS name, NULLIF(to_jsonb(w) ->> 'role', '') AS role
         FROM workspaces w WHERE id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(conn)
    .await
}
