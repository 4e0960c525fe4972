//! The bytea → S3 backfill (SPEC §6): copies bytea-only rows to S3, verifies each copy, and
//! points each row at it; resumable, bounded concurrency, progress, `--dry-run`.

use crate::logfmt::clip;
use std::{
    path::Path,
    time::{Duration, Instant},
};

use futures::{stream, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use uuid::Uuid;

use crate::{
    db::{self, uploads::UploadRow, Db, DbError},
    retry::{retry, Say},
    storage::{Storage, StorageError},
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
    /// Why the run stopped before the end (`s3_unavailable`); null when it went through.
    pub stopped: Option<&'static str>,
}

/// `BackfillReport::stopped` when S3 stopped answering.
pub const S3_UNAVAILABLE: &str = "s3_unavailable";

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("database: {0}")]
    Db(#[from] DbError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
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
    let Some(s3) = storage.s3() else {
        anyhow::bail!("backfill needs PENDING_UPLOADS_S3_BUCKET");
    };
    s3.require_bucket().await?;
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
    // never repeats; a rerun after a kill starts over on what is still bytea-only. A copy the
    // killed run wrote but pointed no row at is not reused: it is an orphan, left to the
    // sweep's reconciliation, and each new copy goes to a key of its own.
    let backfilled = &crate::metrics::metrics().backfill_rows;
    let mut cursor = Uuid::nil();
    // Rows in a row that found S3 unavailable (after their retries).
    let mut unavailable = 0usize;
    loop {
        let limit = opts.batch_size;
        let batch = db
            .run(move |c| Box::pin(db::uploads::bytea_only_after(c, cursor, limit)))
            .await?;
        let Some(last) = batch.last() else { break };
        cursor = last.file_id;
        // Each row counted as it ends, not when its batch does: with large rows a batch of
        // 200 is minutes, and the bar stood still for them.
        let mut results = stream::iter(batch)
            .map(|row| async move {
                let result = copy_with_retries(db, storage, spool_dir, &row, opts.retries).await;
                (row, result)
            })
            .buffer_unordered(opts.concurrency.max(1));
        while let Some((row, result)) = results.next().await {
            match &result {
                Ok(_) => unavailable = 0,
                Err(CopyError::Storage(StorageError::Unavailable(_))) => unavailable += 1,
                Err(_) => {}
            }
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
            // S3 down: every row would wait out its retries of DEPENDENCY_TIMEOUT (hours for a
            // large table, a red team). The run stops; rows copied so far stay copied, and a
            // rerun takes up the rest.
            if unavailable >= opts.concurrency.max(1) {
                // Said once, by the command's error (with the counts), after the summary.
                report.stopped = Some(S3_UNAVAILABLE);
                break;
            }
            bar.inc(row.size_bytes as u64);
            bar.set_message(format!(
                "rows {}/{}",
                report.migrated + report.skipped + report.failed,
                rows_total
            ));
        }
        if report.stopped.is_some() {
            break;
        }
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
    spool_dir: &Path,
    row: &UploadRow,
    retries: u32,
) -> Result<Copied, CopyError> {
    // A row whose own bytes do not match its digest will not get better by retrying.
    let transient = |e: &CopyError| {
        (!matches!(e, CopyError::Storage(StorageError::SourceCorrupt(_)))).then_some(Duration::ZERO)
    };
    retry("backfill copy", retries, Say::Loud, transient, || {
        copy_one(db, storage, spool_dir, row)
    })
    .await
}

/// Copies one row (bytea → spool → S3 → read back and verify, in `Storage::copy_to_s3`) and
/// points the row at the verified copy.
async fn copy_one(
    db: &Db,
    storage: &Storage,
    spool_dir: &Path,
    row: &UploadRow,
) -> Result<Copied, CopyError> {
    let file_id = row.file_id;
    let current = || async move {
        let row = db
            .run(move |c| Box::pin(db::uploads::get_any(c, file_id)))
            .await?;
        Ok::<_, CopyError>(row)
    };
    let (key, digest) = match storage
        .copy_to_s3(&row.location(), row.content_sha256.as_deref(), spool_dir)
        .await
    {
        Ok(copied) => copied,
        // swept before or while we read it
        Err(_) if current().await?.is_none() => return Ok(Copied::Skipped),
        Err(e) => return Err(e.into()),
    };
    let k = key.clone();
    let pointed = db
        .run(move |c| {
            Box::pin(async move { db::uploads::set_s3_key(c, file_id, &k, &digest).await })
        })
        .await?;
    if pointed {
        tracing::info!(
            event = "backfilled", workspace_id = %row.workspace_id, %file_id,
            size = row.size_bytes, name = clip(&row.filename).as_str(), backend = "s3", "row copied to S3"
        );
        return Ok(Copied::Migrated(row.size_bytes as u64));
    }
    // The row is gone, or someone else pointed it at a key meanwhile.
    match current().await? {
        Some(now) if now.s3_key.as_deref() == Some(key.as_str()) => {}
        _ => storage.delete_object(&key).await?,
    }
    Ok(Copied::Skipped)
}
