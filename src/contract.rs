//! The contract step of the bytea → S3 migration (SPEC §6): releases the bytea copies of rows
//! whose S3 copy is there and holds their bytes, and refuses while any row still has its bytes
//! only in Postgres.

use futures::{stream, StreamExt, TryStreamExt};
use serde::Serialize;
use uuid::Uuid;

use crate::{
    db::{self, uploads::DualCopy, Db, DbError},
    storage::{S3Backend, StorageError},
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

/// Releases the bytea copies of rows whose S3 object is there with their size and their
/// SHA-256 ([`verdict`]): a copy deleted out of band, cut short or overwritten must not become
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
    let mut after = Uuid::nil();
    loop {
        let batch = db
            .run(move |c| Box::pin(db::uploads::dual_copies_after(c, after, batch_size)))
            .await?;
        let Some(last) = batch.last() else {
            break;
        };
        after = last.file_id;
        // The first S3 error ends the batch: S3 down, each of the batch's checks would wait
        // out DEPENDENCY_TIMEOUT, eight at a time (ten minutes a batch, a red team).
        let checked: Vec<(DualCopy, Verdict)> = stream::iter(batch)
            .map(|row| async move {
                let verdict = verdict(s3, &row).await?;
                Ok::<_, StorageError>((row, verdict))
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await
            .map_err(ContractError::Storage)?;
        let (mut held, mut gone) = (Checked::default(), Checked::default());
        for (row, verdict) in checked {
            match verdict {
                Verdict::Holds => held.add(row),
                Verdict::Not { found } => {
                    tracing::warn!(
                        file_id = %row.file_id, key = %row.s3_key, size = row.size_bytes,
                        found = ?found,
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

/// What the bucket holds for a row.
enum Verdict {
    Holds,
    /// Gone, or not the row's bytes (`found`: the object's size, if there is one).
    Not {
        found: Option<i64>,
    },
}

/// Whether the object is the row's bytes: its size, and the row's SHA-256 — the one the
/// server stored for the object, or, where it has none (an object written without one: the
/// AWS CLI's CRC checksums, `--s3-checksum when-required`), the object's own, read whole. By
/// size alone, an object overwritten out of band with other bytes of the same length was
/// released as the file's only copy (a red team). A row without a digest is not released:
/// nothing says what its bytes are (the backfill copies it again, and records one).
async fn verdict(s3: &S3Backend, row: &DualCopy) -> Result<Verdict, StorageError> {
    let Some(stored) = s3.head_key(&row.s3_key).await? else {
        return Ok(Verdict::Not { found: None });
    };
    let not = Verdict::Not {
        found: Some(stored.size),
    };
    let (Some(recorded), Ok(size)) = (&row.content_sha256, u64::try_from(row.size_bytes)) else {
        return Ok(not);
    };
    if stored.size != row.size_bytes {
        return Ok(not);
    }
    let object = match stored.sha256 {
        Some(object) => object,
        // A read cut short or failed is judged as a failed HEAD would be.
        None => match s3.sha256_of(&row.s3_key, size).await {
            Ok(object) => object,
            Err(StorageError::Missing | StorageError::SourceCorrupt(_)) => return Ok(not),
            Err(e) => return Err(e),
        },
    };
    Ok(match &object[..] == recorded.as_slice() {
        true => Verdict::Holds,
        false => not,
    })
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
