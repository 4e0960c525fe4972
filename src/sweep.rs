//! The sweeper (SPEC §7): deletes acked rows past retention and every row past its TTL, in
//! bounded batches, then their objects; and reconciles objects that no row points at.
//! Every replica runs it; SKIP LOCKED keeps them from colliding, and deleting an object that
//! is already gone succeeds, so two sweepers never error on each other. The reconciliation
//! lists the whole prefix, so the fleet takes turns at it (`db::leases`), rather
//! than every replica listing and deleting the same objects.

use crate::logfmt::clip;
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{stream, StreamExt, TryStreamExt};
use uuid::Uuid;

use crate::{
    db::{self, Db, DbError},
    storage::Storage,
};

/// Object deletions in flight per sweeper.
const DELETE_CONCURRENCY: usize = 16;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepStats {
    pub rows: u64,
    /// Row batches (DELETE statements) that swept something.
    pub batches: u64,
    pub bytes: u64,
    pub objects_deleted: u64,
    pub object_errors: u64,
    pub orphans_deleted: u64,
    /// This service's upload activity rows past ACTIVITY_RETENTION.
    pub activity_rows: u64,
    /// The orphan reconciliation failed (logged): `orphans_deleted` counts what it deleted
    /// before.
    pub orphans_failed: bool,
}

#[derive(Clone)]
pub struct Sweeper {
    pub db: Db,
    pub storage: Storage,
    pub ack_retention: Duration,
    pub activity_retention: Duration,
    pub batch_size: i64,
    /// Inline bytes one batch may delete (`SWEEP_BATCH_BYTES`), plus one row's.
    pub batch_bytes: u64,
    pub orphan_grace: Duration,
    /// Objects per listing page of the orphan reconciliation.
    pub orphan_page_size: i32,
    /// Where the next reconciliation starts listing: after the key at which the last one
    /// gave up (see [`Sweeper::reconcile`]), or from the start.
    pub resume_after: Arc<Mutex<Option<String>>>,
    /// Who this sweeper is when it takes a turn of the fleet's ([`Sweeper::reconcile_in_turn`]).
    pub replica: Uuid,
    /// Told after every pass of [`Sweeper::run_forever`]: what the fleet keeps is read again
    /// (`MAX_STORED_BYTES`, [`crate::stored`]).
    pub after_pass: Arc<tokio::sync::Notify>,
}

/// The outcome of a reconciliation turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// This replica reconciled: the orphans it deleted.
    Ran(u64),
    /// Another replica holds the turn.
    Elsewhere,
    /// The turn could not be taken or the reconciliation failed (logged): try again. The
    /// orphans a failed walk deleted before it ended.
    Failed(u64),
}

/// A reconciliation that ended early: the orphans it deleted before, and why it ended.
#[derive(Debug)]
pub struct Unfinished {
    pub deleted: u64,
    pub error: crate::storage::StorageError,
}

/// What a reconciliation's walk did so far.
#[derive(Debug, Default)]
struct Walked {
    /// Orphans deleted.
    deleted: u64,
    /// Objects under the prefix whose keys this service does not write.
    left_alone: u64,
}

/// The name of the fleet's orphan reconciliation turns.
const RECONCILIATION_LEASE: &str = "orphan_reconciliation";

pub const ORPHAN_PAGE_SIZE: i32 = crate::storage::s3::LIST_PAGE_MAX;

/// Orphan deletes that may fail in a row before a reconciliation gives up until its next
/// turn: past this the store is taken to be down, not refusing a few objects.
const ORPHAN_FAILURES_IN_A_ROW_MAX: u32 = 16;

impl Sweeper {
    /// One pass: row batches until nothing is left to sweep, then old activity rows, then
    /// orphan reconciliation.
    pub async fn run_once(&self) -> Result<SweepStats, DbError> {
        let mut stats = self.sweep_rows().await?;
        let (deleted, failed) = match self.reconcile_or_warn().await {
            Ok(deleted) => (deleted, false),
            Err(deleted) => (deleted, true),
        };
        stats.orphans_deleted = deleted;
        stats.orphans_failed = failed;
        Ok(stats)
    }

    /// Row batches until nothing is left to sweep, then old activity rows.
    async fn sweep_rows(&self) -> Result<SweepStats, DbError> {
        let mut stats = SweepStats::default();
        loop {
            // Rows go first, objects after: no row ever points at a deleted object. An object
            // whose delete fails is left to the reconciliation.
            let (retention, limit) = (self.ack_retention.as_secs_f64(), self.batch_size);
            let max_bytes = self.batch_bytes;
            // A batch deletes at most `batch_bytes` of inline bytes plus one row's.
            let deadline = db::uploads::copy_deadline(
                self.db.timeout(),
                max_bytes.saturating_add(crate::config::MAX_FILE_BYTES),
            );
            let batch = self
                .db
                .run_within(deadline, move |c| {
                    Box::pin(db::uploads::sweep_batch(c, retention, limit, max_bytes))
                })
                .await?;
            let inline: u64 = batch
                .iter()
                .filter(|r| r.has_content)
                .map(|r| r.size_bytes as u64)
                .sum();
            let more_left = batch.len() as i64 >= self.batch_size || inline >= max_bytes;
            stats.batches += u64::from(!batch.is_empty());
            let results: Vec<_> = stream::iter(batch)
                .map(|row| {
                    let storage = self.storage.clone();
                    async move {
                        let deleted = storage.delete(&row.location()).await;
                        (row, deleted)
                    }
                })
                .buffer_unordered(DELETE_CONCURRENCY)
                .collect()
                .await;
            for (row, deleted) in results {
                let reason = if row.acked_at.is_some() {
                    "acked"
                } else {
                    "expired"
                };
                // As the upload and its ack were counted: a row with both copies is `dual`.
                let loc = row.location();
                let backend = db::uploads::placement(loc.s3_key.is_some(), loc.inline);
                match (&row.s3_key, deleted) {
                    (Some(_), Ok(())) => stats.objects_deleted += 1,
                    (Some(key), Err(e)) => {
                        stats.object_errors += 1;
                        tracing::warn!(file_id = %row.file_id, key, error = %e, "object delete failed; left to reconciliation");
                    }
                    (None, _) => {}
                }
                tracing::info!(
                    event = "swept", workspace_id = %row.workspace_id, file_id = %row.file_id,
                    size = row.size_bytes, name = clip(&row.filename).as_str(),
                    backend, reason, "upload swept"
                );
                crate::metrics::metrics()
                    .files_swept
                    .with_label_values(&[backend, reason])
                    .inc();
                stats.rows += 1;
                stats.bytes += row.size_bytes as u64;
            }
            if !more_left {
                break;
            }
        }
        stats.activity_rows = self.sweep_activity().await?;
        Ok(stats)
    }

    /// The reconciliation's count of deleted orphans: `Err` when it failed (logged; the next
    /// reconciliation tries again), with those it deleted before.
    async fn reconcile_or_warn(&self) -> Result<u64, u64> {
        self.reconcile().await.map_err(|u| {
            tracing::warn!(error = %u.error, deleted = u.deleted, "orphan reconciliation failed");
            u.deleted
        })
    }

    /// Reconciles when the fleet's last turn was taken `period` ago or more: one replica lists
    /// the prefix per period, whichever asks first. The period is the asker's, so a replica
    /// that died, or ran with a longer one, holds nobody back; one whose walk failed gives
    /// its turn back.
    pub async fn reconcile_in_turn(&self, period: Duration) -> Turn {
        let (replica, secs) = (self.replica, period.as_secs_f64());
        let taken = self
            .db
            .run(move |c| Box::pin(db::leases::take(c, RECONCILIATION_LEASE, replica, secs)))
            .await;
        match taken {
            Ok(true) => match self.reconcile_or_warn().await {
                Ok(n) => Turn::Ran(n),
                Err(deleted) => {
                    let back = self
                        .db
                        .run(move |c| {
                            Box::pin(db::leases::give_back(c, RECONCILIATION_LEASE, replica))
                        })
                        .await;
                    if let Err(e) = back {
                        tracing::warn!(error = %e, "orphan reconciliation: could not give the turn back");
                    }
                    Turn::Failed(deleted)
                }
            },
            Ok(false) => {
                tracing::debug!("orphan reconciliation: another replica's turn");
                Turn::Elsewhere
            }
            Err(e) => {
                tracing::warn!(error = %e, "orphan reconciliation: could not take the turn");
                Turn::Failed(0)
            }
        }
    }

    /// Deletes this service's own upload activity rows past ACTIVITY_RETENTION, in batches
    /// (SPEC §10: a workspace that never polls cannot grow the table without bound).
    async fn sweep_activity(&self) -> Result<u64, DbError> {
        let (retention, limit) = (self.activity_retention.as_secs_f64(), self.batch_size);
        let mut total = 0;
        loop {
            let n = self
                .db
                .run(move |c| Box::pin(db::activity::sweep_upload_rows(c, retention, limit)))
                .await?;
            total += n;
            if (n as i64) < limit {
                break;
            }
        }
        if total > 0 {
            tracing::info!(
                event = "activity_swept",
                rows = total,
                "old upload activity rows removed"
            );
        }
        Ok(total)
    }

    /// Deletes objects under our prefix that no row points at and that are older than the
    /// grace period (younger ones may belong to an upload whose row is not committed yet).
    /// An object whose delete fails is logged and passed over: one the store will not delete
    /// (a permission, a lock) must not stall every orphan listed after it, pass after pass.
    /// [`ORPHAN_FAILURES_IN_A_ROW_MAX`] failures in a row end the walk (the store is down, or
    /// a run of objects it will not delete); the next walk then lists from after the last of
    /// them to the end, and the one after that from the start again, so such a run cannot
    /// keep the orphans listed after it forever either.
    /// Only under a prefix of our own (SPEC §10, bucket safety). The delete does not look
    /// again: no PUT writes a key twice (`storage::s3`), so an old object that no row pointed
    /// at when it looked is never pointed at later.
    pub async fn reconcile(&self) -> Result<u64, Unfinished> {
        let mut walked = Walked::default();
        let result = self.walk(&mut walked).await;
        if walked.left_alone > 0 {
            tracing::warn!(
                event = "foreign_objects",
                objects = walked.left_alone,
                prefix = self.storage.s3().map(|s3| s3.prefix()),
                "objects under the prefix whose keys this service does not write were left alone"
            );
        }
        let deleted = walked.deleted;
        result
            .map(|()| deleted)
            .map_err(|error| Unfinished { deleted, error })
    }

    /// Whether the bucket prefix is this database's: its marker names this deployment, or it
    /// had none and now does. A second deployment given the same bucket and prefix (or a
    /// `sweep` run against the wrong database) knew none of the first's rows and deleted every
    /// live object of the first as an orphan (a red team): its walks now end here, each saying
    /// why.
    async fn own_the_prefix(&self, marker: &str) -> Result<(), crate::storage::StorageError> {
        let fresh = Uuid::new_v4();
        let ours = self
            .db
            .run(move |c| Box::pin(db::leases::deployment(c, fresh)))
            .await?;
        let owner = self.storage.claim_prefix(ours).await?;
        if owner != ours {
            return Err(crate::storage::StorageError::Unavailable(format!(
                "the bucket prefix belongs to deployment {owner} (its marker object {marker}), not to this database's {ours}: another deployment uses the same PENDING_UPLOADS_S3_BUCKET and PENDING_UPLOADS_S3_PREFIX, and nothing under it is deleted"
            )));
        }
        Ok(())
    }

    /// [`Sweeper::reconcile`]'s walk, counting into `walked` as it goes: a walk that ends in
    /// an error deleted those too.
    async fn walk(&self, walked: &mut Walked) -> Result<(), crate::storage::StorageError> {
        let start_after = self.resume_after().clone();
        let Some(pages) = self
            .storage
            .orphan_candidates(self.orphan_page_size, start_after)
        else {
            return Ok(());
        };
        let marker = self
            .storage
            .s3()
            .map(|s3| s3.marker_key())
            .unwrap_or_default();
        self.own_the_prefix(&marker).await?;
        let cutoff =
            chrono::Utc::now() - chrono::Duration::from_std(self.orphan_grace).unwrap_or_default();
        let mut failed_in_a_row = 0;
        let mut pages = std::pin::pin!(pages);
        while let Some(objects) = pages.try_next().await? {
            let old: Vec<String> = objects
                .into_iter()
                .filter(|o| o.last_modified.is_some_and(|t| t <= cutoff))
                .map(|o| o.key)
                .collect();
            if old.is_empty() {
                continue;
            }
            // Only keys of the shapes this service writes: an operator's file, or a
            // deployment's under a longer prefix inside ours, is not an orphan of ours.
            let (keys, others): (Vec<String>, Vec<String>) =
                old.into_iter().partition(|k| self.storage.writes_key(k));
            walked.left_alone += others.iter().filter(|k| **k != marker).count() as u64;
            let orphans = self
                .db
                .run(move |c| Box::pin(async move { db::uploads::unpointed(c, &keys).await }))
                .await?;
            for key in &orphans {
                match self.storage.delete_object(key).await {
                    Ok(()) => {
                        failed_in_a_row = 0;
                        crate::metrics::metrics().orphans_deleted.inc();
                        tracing::info!(
                            event = "orphan_deleted",
                            key,
                            "object without a row removed"
                        );
                        walked.deleted += 1;
                    }
                    Err(e) if failed_in_a_row + 1 >= ORPHAN_FAILURES_IN_A_ROW_MAX => {
                        tracing::warn!(
                            event = "orphan_walk_ended",
                            key,
                            failures = ORPHAN_FAILURES_IN_A_ROW_MAX,
                            "deletes failed in a row: the next reconciliation lists after this key"
                        );
                        *self.resume_after() = Some(key.clone());
                        return Err(e);
                    }
                    Err(e) => {
                        failed_in_a_row += 1;
                        tracing::warn!(
                            event = "orphan_delete_failed",
                            key,
                            error = %e,
                            "object without a row could not be removed: passed over"
                        );
                    }
                }
            }
        }
        // The end of the listing: the next walk starts from the beginning again. (A walk
        // that fails otherwise, a listing or the database, keeps where it started.)
        *self.resume_after() = None;
        Ok(())
    }

    fn resume_after(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // A panic while holding it cannot leave a half-written key: take the value as it is.
        self.resume_after
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every how many passes the background sweeper reconciles: listing the whole prefix is
    /// its costliest work (a LIST per 1,000 objects, on every replica), and an orphan only has
    /// to go within a quarter of its grace, not within one sweep interval.
    fn reconcile_every(&self, interval: Duration) -> u64 {
        let passes = (self.orphan_grace / 4).as_secs_f64() / interval.as_secs_f64().max(1.0);
        (passes.ceil() as u64).max(1)
    }

    /// Runs at start-up and every `interval` until the task is dropped; reconciles in the
    /// first pass and then every `reconcile_every` passes when the fleet's turn is free (after
    /// a failed one, in the next pass).
    pub async fn run_forever(self, interval: Duration) {
        let interval = interval.max(Duration::from_secs(1));
        let reconcile_every = self.reconcile_every(interval);
        // A little shorter than this replica's own cycle: a turn another replica took within
        // it is skipped, whatever the tickers' drift.
        let period = interval.mul_f64(reconcile_every as f64 - 0.5);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut passes_since_reconciled = reconcile_every;
        loop {
            ticker.tick().await;
            let mut result = self.sweep_rows().await;
            if let Ok(stats) = &mut result {
                passes_since_reconciled += 1;
                if passes_since_reconciled >= reconcile_every {
                    match self.reconcile_in_turn(period).await {
                        Turn::Ran(n) => {
                            stats.orphans_deleted = n;
                            passes_since_reconciled = 0;
                        }
                        // Asked again next pass (one statement): should the replica that
                        // has the turn die, the walk is late by a pass, not by a cycle.
                        Turn::Failed(n) => stats.orphans_deleted = n,
                        Turn::Elsewhere => {}
                    }
                }
            }
            let outcome = if result.is_ok() { "ok" } else { "error" };
            crate::metrics::metrics()
                .sweep_runs
                .with_label_values(&[outcome])
                .inc();
            match result {
                Ok(s) if s.rows > 0 || s.orphans_deleted > 0 => tracing::info!(
                    rows = s.rows,
                    bytes = s.bytes,
                    objects = s.objects_deleted,
                    object_errors = s.object_errors,
                    orphans = s.orphans_deleted,
                    "sweep pass done"
                ),
                Ok(_) => tracing::debug!("sweep pass: nothing to do"),
                Err(e) => tracing::warn!(error = %e, "sweep pass failed"),
            }
            self.after_pass.notify_one();
        }
    }
}
