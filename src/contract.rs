//! The contract step of the bytea → S3 migration (SPEC §6): releases the bytea copies of rows
//! whose S3 copy is there and holds their bytes, and refuses while any row still has its bytes
//! only in Postgres.

use futures::{stream, StreamExt};
use serde::Serialize;
use uuid::Uuid;

use crate::{
    db::{self, uploads::DualCopy, Db, DbError},
    storage::{s3::Stored, S3Backend, StorageError},
};

/// Objects checked at once.
const CONCURRENCY: usize = 8;

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ContractReport {
    pub released_rows: u64,
    /// Rows whose object was gone or was not their bytes: they kept their bytea copy and are
    /// bytea-only again (the backfill copies them anew).
    pub missing_copies: u64,
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
    /// S3 did not answer a check: earlier batches stay released, this one is not.
    #[error("S3: {0} (earlier batches were released; run contract again)")]
    Storage(StorageError),
}

/// Releases the bytea copies of rows whose S3 object is there with their size and, where the
/// server stored one, their SHA-256: a copy deleted out of band or cut short must not become
/// a file's only one. Batches of `batch_size` rows, in file_id order.
pub async fn contract(
    db: &Db,
    s3: &S3Backend,
    batch_size: i64,
) -> Result<ContractReport, ContractError> {
    let (rows, bytes) = db
        .run(|c| Box::pin(db::uploads::bytea_only_totals(c)))
        .await?;
    if rows > 0 {
        return Err(ContractError::Refused { rows, bytes });
    }
    let mut report = ContractReport {
        released_rows: 0,
        missing_copies: 0,
    };
    let mut after: Option<Uuid> = None;
    loop {
        let batch = db
            .run(move |c| Box::pin(db::uploads::dual_copies_after(c, after, batch_size)))
            .await?;
        let Some(last) = batch.last() else {
            break;
        };
        after = Some(last.file_id);
        let checked: Vec<(DualCopy, Result<Option<Stored>, StorageError>)> = stream::iter(batch)
            .map(|row| async move {
                let head = s3.head_key(&row.s3_key).await;
                (row, head)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let (mut held, mut gone) = (Checked::default(), Checked::default());
        for (row, head) in checked {
            match head.map_err(ContractError::Storage)? {
                Some(stored) if holds(&stored, &row) => held.add(row),
                stored => {
                    tracing::warn!(
                        file_id = %row.file_id, key = %row.s3_key, size = row.size_bytes,
                        found = ?stored.map(|s| s.size),
                        "S3 copy missing or not the row's bytes: its bytea copy is kept"
                    );
                    gone.add(row)
                }
            }
        }
        report.released_rows += db
            .run(move |c| {
                Box::pin(async move { db::uploads::release_inline(c, &held.ids, &held.keys).await })
            })
            .await?;
        report.missing_copies += db
            .run(move |c| {
                Box::pin(
                    async move { db::uploads::forget_s3_copies(c, &gone.ids, &gone.keys).await },
                )
            })
            .await?;
        tracing::info!(
            released = report.released_rows,
            missing = report.missing_copies,
            "contract progress"
        );
    }
    tracing::info!(
        event = "contracted",
        released = report.released_rows,
        missing = report.missing_copies,
        "bytea copies released"
    );
    Ok(report)
}

/// Whether the object is the row's bytes: its size, and its SHA-256 where both have one.
fn holds(stored: &Stored, row: &DualCopy) -> bool {
    let digest_agrees = match (&stored.sha256, &row.content_sha256) {
        (Some(object), Some(recorded)) => &object[..] == recorded.as_slice(),
        _ => true,
    };
    stored.size == row.size_bytes && digest_agrees
}

/// Rows of one outcome, as the statements take them.
#[derive(Default)]
struct Checked {
    ids: Vec<Uuid>,
    keys: Vec<String>,
}

impl Checked {
    fn add(&mut self, row: DualCopy) {
        self.ids.push(row.file_id);
        self.keys.push(row.s3_key);
    }
}
