//! The bytea → S3 migration tools (SPEC §6): `backfill` copies bytea-only rows to S3 and
//! points each row at its verified copy; `contract` then releases the bytea copies, and
//! refuses while any row still has its bytes only in Postgres.

use std::{path::Path, time::Instant};

use futures::{stream, StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use uuid::Uuid;

use crate::{
    db::{self, uploads::UploadRow, Db, DbError},
    spool::SpoolWriter,
    storage::{ByteRange, Location, S3Backend, Storage},
};

#[derive(Debug, Clone)]
pub struct BackfillOptions {
    pub concurrency: usize,
    pub batch_size: i64,
    pub retries: u32,
    pub dry_run: bool,
    pub progress: bool,
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct BackfillReport {
    pub dry_run: bool,
    /// bytea-only rows and bytes when the run started.
    pub rows_total: i64,
    pub bytes_total: i64,
    pub migrated: u64,
    pub bytes_migrated: u64,
    /// Rows that vanished (swept) or were migrated by someone else meanwhile.
    pub skipped: u64,
    pub failed: u64,
    pub elapsed_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("database: {0}")]
    Db(#[from] DbError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("bytea content does not match its recorded sha256")]
    SourceCorrupt,
    #[error("S3 copy does not verify: {0}")]
    Verify(String),
}

enum Copied {
    Migrated(u64),
    Skipped,
}

pub async fn backfill(
    db: &Db,
    storage: &Storage,
    spool_dir: &Path,
    opts: &BackfillOptions,
) -> anyhow::Result<BackfillReport> {
    let s3 = storage
        .s3()
        .ok_or_else(|| anyhow::anyhow!("backfill needs PENDING_UPLOADS_S3_BUCKET"))?;
    let started = Instant::now();
    let (rows_total, bytes_total) = db
        .run(|c| Box::pin(db::uploads::bytea_only_totals(c)))
        .await?;
    let mut report = BackfillReport {
        dry_run: opts.dry_run,
        rows_total,
        bytes_total,
        ..Default::default()
    };
    tracing::info!(
        rows = rows_total,
        bytes = bytes_total,
        dry_run = opts.dry_run,
        "backfill starting"
    );
    if opts.dry_run {
        return Ok(report);
    }
    let bar = if opts.progress {
        ProgressBar::new(bytes_total as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // Keyset paging by file_id: rows copied (or failed) are behind the cursor, so a batch
    // never repeats; a rerun after a kill starts over on what is still bytea-only.
    let backfilled = &crate::metrics::metrics().backfill_rows;
    let mut cursor = Uuid::nil();
    loop {
        let limit = opts.batch_size;
        let batch = db
            .run(move |c| Box::pin(db::uploads::bytea_only_after(c, cursor, limit)))
            .await?;
        let Some(last) = batch.last() else { break };
        cursor = last.file_id;
        let results: Vec<(UploadRow, Result<Copied, CopyError>)> = stream::iter(batch)
            .map(|row| async move {
                let result =
                    copy_with_retries(db, storage, s3, spool_dir, &row, opts.retries).await;
                (row, result)
            })
            .buffer_unordered(opts.concurrency.max(1))
            .collect()
            .await;
        for (row, result) in results {
            match result {
                Ok(Copied::Migrated(bytes)) => {
                    backfilled.with_label_values(&["migrated"]).inc();
                    report.migrated += 1;
                    report.bytes_migrated += bytes;
                }
                Ok(Copied::Skipped) => {
                    backfilled.with_label_values(&["skipped"]).inc();
                    report.skipped += 1;
                }
                Err(e) => {
                    backfilled.with_label_values(&["failed"]).inc();
                    report.failed += 1;
                    tracing::error!(file_id = %row.file_id, error = %e, "backfill of row failed");
                }
            }
            bar.inc(row.size_bytes as u64);
        }
        bar.set_message(format!(
            "rows {}/{}",
            report.migrated + report.skipped + report.failed,
            rows_total
        ));
        tracing::info!(
            migrated = report.migrated,
            skipped = report.skipped,
            failed = report.failed,
            "backfill progress"
        );
    }
    bar.finish_and_clear();
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

async fn copy_with_retries(
    db: &Db,
    storage: &Storage,
    s3: &S3Backend,
    spool_dir: &Path,
    row: &UploadRow,
    retries: u32,
) -> Result<Copied, CopyError> {
    let mut attempt = 0;
    loop {
        match copy_one(db, storage, s3, spool_dir, row).await {
            Err(CopyError::SourceCorrupt) => return Err(CopyError::SourceCorrupt),
            Err(e) if attempt < retries => {
                attempt += 1;
                tracing::warn!(file_id = %row.file_id, attempt, error = %e, "backfill copy failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200 * 2u64.pow(attempt))).await;
            }
            other => return other,
        }
    }
}

/// Copies one row: bytea → spool (digest) → S3 → read back and verify → point the row at it.
async fn copy_one(
    db: &Db,
    storage: &Storage,
    s3: &S3Backend,
    spool_dir: &Path,
    row: &UploadRow,
) -> Result<Copied, CopyError> {
    let size = row.size_bytes as u64;
    let source = Location {
        s3_key: None,
        ..row.location()
    };
    let mut writer = SpoolWriter::create(spool_dir)?;
    let file_id = row.file_id;
    let gone = || async move {
        let row = db
            .run(move |c| Box::pin(db::uploads::get_any(c, file_id)))
            .await?;
        Ok::<_, CopyError>(row.is_none())
    };
    let mut chunks = match storage.open(&source, ByteRange::full(size)).await {
        Ok(chunks) => chunks,
        Err(_) if gone().await? => return Ok(Copied::Skipped),
        Err(e) => return Err(e.into()),
    };
    loop {
        match chunks.try_next().await {
            Ok(Some(chunk)) => writer.write(&chunk).await?,
            Ok(None) => break,
            // swept while we read it
            Err(_) if gone().await? => return Ok(Copied::Skipped),
            Err(e) => return Err(e.into()),
        }
    }
    let spool = writer.finish().await?;
    if spool.size != size
        || row
            .content_sha256
            .as_deref()
            .is_some_and(|d| d != spool.sha256)
    {
        return Err(CopyError::SourceCorrupt);
    }
    let key = s3.key_for(row.workspace_id, row.file_id);
    s3.put_key(&key, &spool).await?;
    verify(s3, &key, size, &spool.sha256).await?;
    let (k, digest) = (key.clone(), spool.sha256);
    let pointed = db
        .run(move |c| {
            Box::pin(async move { db::uploads::set_s3_key(c, file_id, &k, &digest).await })
        })
        .await?;
    if pointed {
        tracing::info!(
            event = "backfilled", workspace_id = %row.workspace_id, file_id = %row.file_id,
            size, name = %row.filename, backend = "s3", "row copied to S3"
        );
        return Ok(Copied::Migrated(size));
    }
    // The row is gone, or someone else pointed it at a key meanwhile.
    let now = db
        .run(move |c| Box::pin(db::uploads::get_any(c, file_id)))
        .await?;
    match now {
        Some(now) if now.s3_key.as_deref() == Some(key.as_str()) => {}
        _ => s3.delete_key(&key).await?,
    }
    Ok(Copied::Skipped)
}

/// Reads the object back and checks its size and sha256.
async fn verify(s3: &S3Backend, key: &str, size: u64, sha256: &[u8; 32]) -> Result<(), CopyError> {
    use sha2::{Digest, Sha256};
    let mut body = s3.open_key(key, ByteRange::full(size)).await?;
    let mut hasher = Sha256::new();
    let mut seen = 0u64;
    while let Some(chunk) = body.try_next().await? {
        seen += chunk.len() as u64;
        hasher.update(&chunk);
    }
    let digest: [u8; 32] = hasher.finalize().into();
    if seen != size || &digest != sha256 {
        let _ = s3.delete_key(key).await;
        return Err(CopyError::Verify(format!(
            "{key}: {seen} bytes, sha256 {}",
            hex::encode(digest)
        )));
    }
    Ok(())
}

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
