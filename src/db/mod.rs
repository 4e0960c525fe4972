//! Queries on our tables, one file per table.

pub mod activity;
pub mod tokens;
pub mod uploads;
pub mod workspaces;

use std::time::Duration;

use sqlx::{postgres::PgPoolOptions, PgConnection, PgPool};
use uuid::Uuid;

use crate::config::DbArgs;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub async fn connect(args: &DbArgs) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(args.database_max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&args.database_url.0)
        .await
}

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Serializes writers of one workspace's uploads and activity rows until the transaction
/// ends: the quota check cannot be raced, and activity `seq` order equals commit order.
pub async fn lock_workspace(conn: &mut PgConnection, workspace_id: Uuid) -> sqlx::Result<()> {
    let (hi, lo) = workspace_id.as_u64_pair();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind((hi ^ lo) as i64)
        .execute(conn)
        .await?;
    Ok(())
}
