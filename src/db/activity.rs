use serde_json::Value;
use sqlx::{PgConnection, PgExecutor, QueryBuilder};
use uuid::Uuid;

pub use crate::api::ActivityRow;

/// The channel an upload's commit notifies (payload: the workspace id); long polls listen.
pub const CHANNEL: &str = "pending_uploads_activity";

pub struct NewActivity<'a> {
    pub workspace_id: Uuid,
    pub activity_type: &'a str,
    pub target_id: Option<Uuid>,
    pub method: &'a str,
    pub summary: String,
    pub request_body: Value,
}

/// Callers hold the workspace lock (`db::lock_workspace`) so `seq` follows commit order.
pub async fn insert(conn: &mut PgConnection, a: &NewActivity<'_>) -> sqlx::Result<Uuid> {
    sqlx::query_scalar(
        "INSERT INTO activity_logs (workspace_id, activity_type, target_id, method, summary, request_body, status)
         VALUES ($1, $2, $3, $4, $5, $6, 'ok') RETURNING id",
    )
    .bind(a.workspace_id)
    .bind(a.activity_type)
    .bind(a.target_id)
    .bind(a.method)
    .bind(&a.summary)
    .bind(&a.request_body)
    .fetch_one(conn)
    .await
}

pub struct Filter<'a> {
    pub activity_type: Option<&'a str>,
    pub method: Option<&'a str>,
    /// Only rows created within this many seconds.
    pub since_secs: Option<i64>,
    pub limit: i64,
}

const COLUMNS: &str = "id, workspace_id, activity_type, source_id, target_id, method, summary, \
                       request_body, response_body, status, error_detail, created_at, seq";

fn push_filter<'a>(q: &mut QueryBuilder<'a, sqlx::Postgres>, workspace_id: Uuid, f: &Filter<'a>) {
    q.push(" WHERE workspace_id = ").push_bind(workspace_id);
    if let Some(t) = f.activity_type {
        q.push(" AND activity_type = ").push_bind(t);
    }
    if let Some(m) = f.method {
        q.push(" AND method = ").push_bind(m);
    }
    if let Some(secs) = f.since_secs {
        q.push(" AND created_at >= now() - make_interval(secs => ")
            .push_bind(secs as f64)
            .push(")");
    }
}

/// The cursor row's `seq`, if the row belongs to this workspace.
pub async fn cursor_seq(
    db: impl PgExecutor<'_>,
    workspace_id: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar("SELECT seq FROM activity_logs WHERE id = $1 AND workspace_id = $2")
        .bind(id)
        .bind(workspace_id)
        .fetch_optional(db)
        .await
}

/// Rows after the cursor, oldest first.
pub async fn after(
    db: impl PgExecutor<'_>,
    workspace_id: Uuid,
    after_seq: i64,
    f: &Filter<'_>,
) -> sqlx::Result<Vec<ActivityRow>> {
    let mut q = QueryBuilder::new(format!("SELECT {COLUMNS} FROM activity_logs"));
    push_filter(&mut q, workspace_id, f);
    q.push(" AND seq > ").push_bind(after_seq);
    q.push(" ORDER BY seq ASC LIMIT ").push_bind(f.limit);
    q.build_query_as().fetch_all(db).await
}

/// The newest rows within the window, newest first.
pub async fn newest(
    db: impl PgExecutor<'_>,
    workspace_id: Uuid,
    f: &Filter<'_>,
) -> sqlx::Result<Vec<ActivityRow>> {
    let mut q = QueryBuilder::new(format!("SELECT {COLUMNS} FROM activity_logs"));
    push_filter(&mut q, workspace_id, f);
    q.push(" ORDER BY created_at DESC, seq DESC LIMIT ")
        .push_bind(f.limit);
    q.build_query_as().fetch_all(db).await
}

/// Tells every replica's listener that the workspace has new rows (delivered at commit).
pub async fn notify(conn: &mut PgConnection, workspace_id: Uuid) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(workspace_id.to_string())
        .execute(conn)
        .await?;
    Ok(())
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
