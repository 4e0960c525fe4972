use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Workspace {
    pub id: Uuid,
    pub name: String,
    pub delivery_mode: String,
    pub url: Option<String>,
    #[serde(skip)]
    pub platform_inbound_secret: Option<String>,
    pub status: String,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, name, delivery_mode, url, platform_inbound_secret, status, created_at";

pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<Workspace>> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM workspaces WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await
}

pub async fn get_for_update(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<Workspace>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM workspaces WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await
}

pub struct NewWorkspace<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub delivery_mode: &'a str,
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

/// Re-registration: updates only what was sent.
pub async fn update(
    conn: &mut PgConnection,
    id: Uuid,
    name: Option<&str>,
    delivery_mode: Option<&str>,
    url: Option<&str>,
) -> sqlx::Result<Workspace> {
    sqlx::query_as(&format!(
        "UPDATE workspaces SET name = COALESCE($2, name), delivery_mode = COALESCE($3, delivery_mode),
                url = COALESCE($4, url)
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(name)
    .bind(delivery_mode)
    .bind(url)
    .fetch_one(conn)
    .await
}

/// Marks the workspace removed and revokes its tokens; false when it does not exist.
pub async fn remove(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<bool> {
    let r = sqlx::query("UPDATE workspaces SET status = 'removed' WHERE id = $1")
        .bind(id)
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
