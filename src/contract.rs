//! The contract step of the bytea → S3 migration (SPEC §6): releases the bytea copies of rows
//! that have a verified S3 copy, and refuses while any row still has its bytes only in
//! Postgres.

use serde::Serialize;

use crate::db::{self, Db, DbError};

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ContractReport {
    pub released_rows: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error(
        "refusing to contract: {rows} rows ({bytes} bytes) still have their bytes only in Postgres; \
         run `pending-uploads backfill` (or wait for them to expire) and try again"
    )]
    Refused { rows: i64, bytes: i64 },
    #[error("database: {0}")]
    Db(#[from] DbError),
}

/// Releases the bytea copies of rows that have a verified S3 copy, in batches.
pub async fn contract(db: &Db, batch_size: i64) -> Result<ContractReport, ContractError> {
    let (rows, bytes) = db
        .run(|c| Box::pin(db::uploads::bytea_only_totals(c)))
        .await?;
    if rows > 0 {
        return Err(ContractError::Refused { rows, bytes });
    }
    let mut released = 0;
    loop {
        let n = db
            .run(move |c| Box::pin(db::uploads::release_bytea_batch(c, batch_size)))
            .await?;
        released += n;
        if n == 0 {
            break;
        }
        tracing::info!(released, "contract progress");
    }
    tracing::info!(event = "contracted", released, "bytea copies released");
    Ok(ContractReport {
        released_rows: released,
    })
}
