use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor, QueryBuilder};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ActivityRow {
    pub id: Uuid,
    pub workspace_id: Uuid,
    pub activity_type: String,
    pub source_id: Option<Uuid>,
    pub target_id: Option<Uuid>,
    pub method: Option<String>,
    pub summary: Option<String>,
    pub request_body: Option<Value>,
    pub response_body: Option<Value>,
    pub status: String,
    pub error_detail: Option<String>,
    pub created_at: DateTime<Utc>,
}

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
    pub limit: i64,
}

const COLUMNS: &str = "id, workspace_id, activity_type, source_id, target_id, method, summary, \
                       request_body, response_body, status, error_detail, created_at";

fn push_filter<'a>(q: &mut QueryBuilder<'a, sqlx::Postgres>, workspace_id: Uuid, f: &Filter<'a>) {
    q.push(" WHERE workspace_id = ").push_bind(workspace_id);
    if let Some(t) = f.activity_type {
        q.push(" AND activity_type = ").push_bind(t);
    }
    if let Some(m) = f.method {
        q.push(" AND method = ").push_bind(m);
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
    since_secs: Option<i64>,
    f: &Filter<'_>,
) -> sqlx::Result<Vec<ActivityRow>> {
    let mut q = QueryBuilder::new(format!("SELECT {COLUMNS} FROM activity_logs"));
    push_filter(&mut q, workspace_id, f);
    if let Some(secs) = since_secs {
        q.push(" AND created_at >= now() - make_interval(secs => ")
            .push_bind(secs as f64)
            .push(")");
    }
    q.push(" ORDER BY created_at DESC, seq DESC LIMIT ")
        .push_bind(f.limit);
    q.build_query_as().fetch_all(db).await
}
