//! Fleet-wide maintenance turns (`pending_uploads_leases`): who took one last, and when.

use sqlx::PgExecutor;
use uuid::Uuid;

/// Takes the turn `name` for `holder` when it was last taken at least `secs` ago (by anyone:
/// a holder has no claim on the next turn, so one that keeps failing cannot keep the others
/// out); whether it was taken. One statement: two replicas asking at once get one answer each,
/// and one of them the turn.
pub async fn take(
    db: impl PgExecutor<'_>,
    name: &str,
    holder: Uuid,
    secs: f64,
) -> sqlx::Result<bool> {
    let taken: Option<bool> = sqlx::query_scalar(
        "INSERT INTO pending_uploads_leases (name, holder, taken_at)
         VALUES ($1, $2, now())
         ON CONFLICT (name) DO UPDATE
            SET holder = EXCLUDED.holder, taken_at = EXCLUDED.taken_at
            WHERE pending_uploads_leases.taken_at <= now() - make_interval(secs => $3)
         RETURNING true",
    )
    .bind(name)
    .bind(holder)
    .bind(secs)
    .fetch_optional(db)
    .await?;
    Ok(taken.is_some())
}

/// Gives back the turn `name` if `holder` has it (its work failed: the next asker, whoever
/// it is, may take it at once).
pub async fn give_back(db: impl PgExecutor<'_>, name: &str, holder: Uuid) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM pending_uploads_leases WHERE name = $1 AND holder = $2")
        .bind(name)
        .bind(holder)
        .execute(db)
        .await?;
    Ok(())
}

/// This database's deployment id (`pending_uploads_deployment`), made with `fresh` when it has
/// none yet. Two makers at once: one row wins, and the other reads it.
pub async fn deployment(db: &mut sqlx::PgConnection, fresh: Uuid) -> sqlx::Result<Uuid> {
    sqlx::query("INSERT INTO pending_uploads_deployment (id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(fresh)
        .execute(&mut *db)
        .await?;
    sqlx::query_scalar("SELECT id FROM pending_uploads_deployment")
        .fetch_one(db)
        .await
}
