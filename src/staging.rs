//! Staging an upload for a poll workspace (SPEC §4 Upload, steps 3-5), in two phases:
//!
//! 1. [`receive`]: the multipart body is parsed as a stream and each `files` part spooled to
//!    an unnamed temp file (small ones to memory, see `spool`) while its size and (unless the
//!    COPY takes it, `spool::Hashing`) its sha256 are computed; every cap is enforced as bytes arrive. Nothing touches the database
//!    meanwhile, so a slow client holds no connection and no lock.
//! 2. [`Stager::commit`]: runs in a task of its own, so a client that disconnects cannot cut
//!    it half way. Objects are written first (S3 modes), then one short transaction writes
//!    every row and activity row under the workspace lock (quota checked there); if anything
//!    fails, the objects it wrote are removed. All or nothing.

use std::{
    io,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::Stream;
use uuid::Uuid;

pub use crate::db::uploads::Quota;
use crate::{
    api::{platform_uri, StagedFile, UploadReceived},
    db::{
        self,
        uploads::{in_step, NewUpload},
        Db, DbError,
    },
    logfmt::clip,
    longpoll::Announcer,
    metrics::metrics,
    multipart::{BoxError, Multipart, MultipartError},
    sanitize::sanitize,
    slots::Slot,
    spool::{Hashing, MemoryBudget, RequestFile, Spool, SpoolWriter},
    storage::{FollowedPut, Location, Storage, StorageError},
    stored::Reservation,
};

/// Why an upload was not staged.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("no files field in request")]
    NoFiles,
    #[error("too many files (limit {0})")]
    TooManyFiles(usize),
    #[error("malformed multipart body: {0}")]
    Malformed(&'static str),
    #[error("file is empty")]
    EmptyFile { filename: String },
    #[error("file exceeds per-file cap")]
    FileTooLarge {
        filename: String,
        size: u64,
        max: u64,
    },
    #[error("pending bytes quota exceeded ({pending} of {max})")]
    QuotaBytes { pending: i64, max: u64 },
    #[error("pending files quota exceeded ({pending} of {max})")]
    QuotaFiles { pending: i64, max: u64 },
    /// The caller's token was revoked, or its workspace removed, while the upload ran.
    #[error("the caller's token was revoked during the upload")]
    TokenRevoked,
    /// The workspace was removed while the admin's upload ran.
    #[error("the workspace was removed during the upload")]
    WorkspaceRemoved,
    #[error("spool: {0}")]
    Spool(#[source] io::Error),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Db(#[from] DbError),
    /// The request body failed under us: the client went away, or our own cap or deadline
    /// cut it (the HTTP layer knows which).
    #[error("request body failed: {0}")]
    ClientGone(#[source] BoxError),
    #[error("staging task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl StagingError {
    /// The commit was cut without an answer: its rows may be in.
    fn outcome_unknown(&self) -> bool {
        matches!(self, StagingError::Db(e) if e.outcome_unknown())
    }
}

impl From<MultipartError> for StagingError {
    fn from(e: MultipartError) -> Self {
        match e {
            MultipartError::Malformed(why) => StagingError::Malformed(why),
            MultipartError::Body(e) => StagingError::ClientGone(e),
        }
    }
}

/// Caps of one upload request (SPEC §9, §10).
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_files: usize,
    pub max_file_bytes: u64,
    pub max_filename_chars: usize,
}

/// Non-file form fields are read and thrown away, at most this many bytes per request.
pub const MAX_FORM_FIELD_BYTES: usize = 1024 * 1024;

/// Longest mimetype kept; a longer one is stored as application/octet-stream.
pub const MAX_MIMETYPE_CHARS: usize = 255;

/// One file part, fully received.
pub struct Received {
    /// The filename as sent (for error answers and clipped logs).
    pub original: String,
    pub name: String,
    pub mimetype: String,
    pub spool: Spool,
    /// Its S3 PUT, when one started with the receive.
    pub followed: Option<FollowedPut>,
}

/// The request is done with the file, staged or not: its bytes are in the database or the
/// bucket, or nowhere. Its disk space goes now, not when the last reader lets go.
impl Drop for Received {
    fn drop(&mut self) {
        self.spool.release_disk();
    }
}

/// Where a request's last file may be written while it arrives ([`Storage::follow`]): a
/// body of known length whose files go to disk, for a mode that writes to S3.
pub struct Follow<'a> {
    pub storage: &'a Storage,
    pub workspace_id: Uuid,
    /// The body's Content-Length.
    pub body_len: u64,
}

/// Phase 1: parses the body, spooling every `files` part. On error the body may still have
/// unread bytes: see [`drain`]. A PUT that began with a file's receive and is not to be
/// taken is stopped (and what it wrote deleted) before this returns.
pub async fn receive<S, E>(
    multipart: &mut Multipart<S>,
    limits: &RequestLimits,
    spool_dir: &Path,
    memory: MemoryBudget,
    hashing: Hashing,
    follow: Option<Follow<'_>>,
) -> Result<Vec<Received>, StagingError>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: Into<BoxError>,
{
    let mut files = Vec::new();
    let received = receive_into(
        &mut files, multipart, limits, spool_dir, memory, hashing, follow,
    )
    .await;
    match received {
        Ok(()) if !files.is_empty() => Ok(files),
        Ok(()) => Err(StagingError::NoFiles),
        Err(e) => {
            for f in &mut files {
                if let Some(put) = f.followed.take() {
                    put.cancel().await;
                }
            }
            Err(e)
        }
    }
}

async fn receive_into<S, E>(
    files: &mut Vec<Received>,
    multipart: &mut Multipart<S>,
    limits: &RequestLimits,
    spool_dir: &Path,
    mut memory: MemoryBudget,
    hashing: Hashing,
    follow: Option<Follow<'_>>,
) -> Result<(), StagingError>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: Into<BoxError>,
{
    let mut field_bytes = 0usize;
    let spilled = RequestFile::default();
    while let Some(head) = multipart.next_part().await? {
        let filename = head.filename.clone().filter(|f| !f.is_empty());
        let Some(original) = filename.filter(|_| head.name.as_deref() == Some("files")) else {
            // A plain form field (a `files` part without a filename is one too): drained,
            // not kept, and bounded.
            field_bytes += head.header_bytes;
            while let Some(chunk) = multipart.next_chunk().await? {
                field_bytes += chunk.len();
                if field_bytes > MAX_FORM_FIELD_BYTES {
                    return Err(StagingError::Malformed("form fields too large"));
                }
            }
            if field_bytes > MAX_FORM_FIELD_BYTES {
                return Err(StagingError::Malformed("form fields too large"));
            }
            continue;
        };
        if files.len() == limits.max_files {
            return Err(StagingError::TooManyFiles(limits.max_files));
        }
        let mimetype = reduce_mimetype(head.content_type.as_deref());
        let followed = follow_part(
            follow.as_ref(),
            multipart,
            limits,
            spool_dir,
            &memory,
            &spilled,
        );
        let (writer, followed) = match followed {
            Some((writer, put)) => (writer, Some(put)),
            None => (
                SpoolWriter::create(spool_dir, memory.clone())
                    .sharing(&spilled)
                    .hashing(hashing),
                None,
            ),
        };
        let spool = match spool_part(multipart, writer, &original, limits.max_file_bytes).await {
            Ok(spool) => spool,
            Err(e) => {
                if let Some(put) = followed {
                    put.cancel().await;
                }
                return Err(e);
            }
        };
        // A wrong guess (a file before another): its PUT stops now, and gives back its place
        // for the part that is the last.
        let followed = match followed {
            Some(put) if put.size != spool.size => {
                put.guessed_wrong().await;
                None
            }
            kept => kept,
        };
        memory.spend(&spool);
        files.push(Received {
            name: sanitize(&original, limits.max_filename_chars),
            original,
            mimetype,
            spool,
            followed,
        });
    }
    Ok(())
}

/// When the request may have its PUT run alongside the receive (a body of known length whose
/// files go to disk) and the part whose head was just read is the last one as far as the
/// body's length says: the part's spool and that PUT. The size is foreseen now; a guess that
/// turns out wrong stops the PUT.
fn follow_part<S>(
    follow: Option<&Follow<'_>>,
    multipart: &Multipart<S>,
    limits: &RequestLimits,
    spool_dir: &Path,
    memory: &MemoryBudget,
    spilled: &RequestFile,
) -> Option<(SpoolWriter, FollowedPut)> {
    let f = follow.filter(|_| memory.is_empty())?;
    let size = multipart
        .last_part_size(f.body_len)
        .filter(|&size| size > 0 && size <= limits.max_file_bytes)?;
    f.storage.follow(f.workspace_id, size, spool_dir, spilled)
}

/// Copies one file part into its spool, enforcing the per-file cap; an empty part is refused.
async fn spool_part<S, E>(
    multipart: &mut Multipart<S>,
    mut writer: SpoolWriter,
    original: &str,
    max_file_bytes: u64,
) -> Result<Spool, StagingError>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: Into<BoxError>,
{
    let result = async {
        while let Some(chunk) = multipart.next_chunk().await? {
            let seen = writer.size() + chunk.len() as u64;
            if seen > max_file_bytes {
                return Err(StagingError::FileTooLarge {
                    filename: original.to_string(),
                    size: seen,
                    max: max_file_bytes,
                });
            }
            writer.write(chunk).await.map_err(StagingError::Spool)?;
        }
        if writer.size() == 0 {
            return Err(StagingError::EmptyFile {
                filename: original.to_string(),
            });
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => writer.finish().await.map_err(StagingError::Spool),
        Err(e) => {
            // Closed before we answer: a refused upload leaves no open temp file behind.
            writer.discard().await;
            Err(e)
        }
    }
}

/// Reads what the client is still sending (bounded by the request cap and the body's
/// deadlines) so it sees our answer instead of a reset connection.
pub async fn drain<S, E>(multipart: &mut Multipart<S>)
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: Into<BoxError>,
{
    multipart.drain().await;
}

/// A part's Content-Type reduced to `type/subtype`; anything odd (control characters,
/// spaces, no slash, longer than 255) becomes application/octet-stream, a missing one "".
pub fn reduce_mimetype(value: Option<&str>) -> String {
    match value {
        None => String::new(),
        Some(raw) => media_type(raw).unwrap_or("application/octet-stream").into(),
    }
}

/// The `type/subtype` a Content-Type value names, when it names one: visible ASCII, one
/// slash between two non-empty names, at most 255 characters; parameters after it are not
/// looked at.
pub fn media_type(raw: &str) -> Option<&str> {
    // Spaces and tabs only: `str::trim` takes VT and FF too, control characters that make
    // the value no media type.
    let essence = raw
        .split(';')
        .next()
        .unwrap_or("")
        .trim_matches([' ', '\t']);
    let (t, s) = essence.split_once('/')?;
    let valid = !t.is_empty()
        && !s.is_empty()
        && !s.contains('/')
        && essence.len() <= MAX_MIMETYPE_CHARS
        && essence.chars().all(|c| c.is_ascii_graphic());
    valid.then_some(essence)
}

/// Phase 2 (see the module comment).
#[derive(Clone)]
pub struct Stager {
    pub db: Db,
    pub storage: Storage,
    pub quota: Quota,
    /// Tells the long polls of every replica, after the commit.
    pub announcer: Announcer,
    /// ORPHAN_GRACE: an upload's objects must have their rows before the orphan
    /// reconciliation may take them for orphans ([`commit_by`]).
    pub orphan_grace: Duration,
}

impl Stager {
    /// Commits the received files in a task of their own, started before this returns, which
    /// the caller's cancellation cannot stop; the future is its outcome. The task holds the
    /// upload's `slot` to its end (a client that goes after its last byte must not free a
    /// slot while its commit still holds a connection and its spool), and logs the outcome:
    /// a staged line per file, or a failed one, whether the client is still there or not
    /// (its handler, dropped with its connection, logged nothing: a red team).
    /// `began` is when the upload's receive began: its first object is no older.
    pub fn commit(
        &self,
        workspace_id: Uuid,
        token_hash: Option<[u8; 32]>,
        files: Vec<Received>,
        began: Instant,
        slot: Slot,
        reserved: Reservation,
    ) -> impl std::future::Future<Output = Result<Vec<UploadReceived>, StagingError>> {
        let stager = self.clone();
        // The reservation is the commit's, as its slot is: a client gone meanwhile does not
        // end it, and counting it committed before its rows landed let a reading drop it.
        let task = tokio::spawn(async move {
            // What each file's failed line says if the commit fails (SPEC §8: one line per
            // file; it has no file_id then, nothing was staged).
            let described: Vec<(String, u64)> = files
                .iter()
                .map(|f| (f.name.clone(), f.spool.size))
                .collect();
            let staged = stager
                .commit_now(workspace_id, token_hash, files, began)
                .await;
            match &staged {
                // Rows that may be in stay counted until a reading has them.
                Err(e) if !e.outcome_unknown() => reserved.release(),
                _ => drop(reserved),
            }
            drop(slot);
            if let Err(e) = &staged {
                let backend = stager.storage.mode().as_str();
                metrics()
                    .files_staged
                    .with_label_values(&[backend, "failed"])
                    .inc_by(described.len() as u64);
                for (name, size) in &described {
                    tracing::warn!(
                        event = "failed", %workspace_id, name = clip(name).as_str(), size,
                        backend, error = %e, "upload not staged"
                    );
                }
            }
            staged
        });
        async move { task.await? }
    }

    async fn commit_now(
        &self,
        workspace_id: Uuid,
        token_hash: Option<[u8; 32]>,
        mut files: Vec<Received>,
        began: Instant,
    ) -> Result<Vec<UploadReceived>, StagingError> {
        // Objects before the transaction: no connection waits on S3.
        let mut placed: Vec<Location> = Vec::with_capacity(files.len());
        for f in &mut files {
            let followed = f.followed.take();
            let file_id = followed.as_ref().map_or_else(Uuid::new_v4, |p| p.file_id);
            match self
                .storage
                .put(workspace_id, file_id, &f.spool, followed)
                .await
            {
                Ok(p) => placed.push(p),
                Err(e) => {
                    self.discard(&placed).await;
                    return Err(e.into());
                }
            }
        }
        // Only bytes the database takes make its work longer (an S3-only row is a few
        // hundred bytes): S3 mode gets DEPENDENCY_TIMEOUT, whatever the files' size.
        let bytes: u64 = files
            .iter()
            .zip(&placed)
            .filter(|(_, at)| at.inline)
            .map(|(f, _)| f.spool.size)
            .sum();
        let own = db::uploads::copy_deadline(self.db.timeout(), bytes);
        let grace = commit_by(began, self.orphan_grace)
            .filter(|_| placed.iter().any(|at| at.s3_key.is_some()));
        if grace.is_some_and(|by| by <= Instant::now()) {
            self.discard(&placed).await;
            return Err(StorageError::Unavailable(format!(
                "the upload's objects waited three quarters of ORPHAN_GRACE={:?} for their \
                 rows: the orphan reconciliation may take them for orphans",
                self.orphan_grace
            ))
            .into());
        }
        // The grace cuts the commit when it comes before the commit's own deadline. Cut here,
        // the commit's statement would go on waiting for the workspace lock in the database
        // and could commit after its 503: that wait ends there first ([`lock_wait`]).
        let now = Instant::now();
        let lock_by = grace.filter(|by| by.saturating_duration_since(now) < own);
        let deadline = lock_by.map_or(own, |by| by.saturating_duration_since(now));
        let quota = self.quota;
        let rows = placed.clone();
        let files = Arc::new(files);
        let in_tx = files.clone();
        let db = self.db.clone();
        let result = self
            .db
            .run_within(deadline, move |c| {
                Box::pin(async move {
                    let ws = (workspace_id, token_hash);
                    write_rows(c, ws, &in_tx, &rows, quota, lock_by, &db).await
                })
            })
            .await;
        match result {
            Ok(Ok(staged)) => {
                self.announcer.announce(workspace_id);
                record_staged(workspace_id, self.storage.mode().as_str(), &files, &staged);
                Ok(staged)
            }
            Ok(Err(quota)) => {
                self.discard(&placed).await;
                Err(quota)
            }
            Err(e) if e.outcome_unknown() => {
                // Cut without an answer (e.g. its deadline ran out in COMMIT): the rows may
                // be in. Their objects stay, for the rows or, past ORPHAN_GRACE without them,
                // for the orphan reconciliation; waiting polls are told in case.
                tracing::warn!(
                    %workspace_id, error = %e,
                    deadline = if lock_by.is_some() { "orphan_grace" } else { "dependency_timeout" },
                    "upload commit outcome unknown: objects left to the orphan reconciliation"
                );
                self.announcer.announce(workspace_id);
                Err(e.into())
            }
            Err(e) => {
                self.discard(&placed).await;
                Err(e.into())
            }
        }
    }

    /// Removes the objects of a commit that failed, in the background: the answer does not
    /// wait on S3 a second time (it may be the very dependency that failed), and what a
    /// failed delete leaves the sweep's orphan reconciliation removes.
    async fn discard(&self, placed: &[Location]) {
        if placed.iter().all(|l| l.s3_key.is_none()) {
            return;
        }
        let (storage, placed) = (self.storage.clone(), placed.to_vec());
        tokio::spawn(async move { storage.discard(&placed).await });
    }
}

/// Uploads whose rows all go in with INSERTs ([`NewUpload::inserts`]) go in as one
/// statement, its own transaction (`db::uploads::stage`): one round trip. Their bytes travel
/// as parameters: those in memory already, and at most this many read back from disk.
const ONE_STATEMENT_READ_BACK_MAX: u64 = 1024 * 1024;

/// A connection that sent more than this in one statement gives back its buffer's growth
/// (sqlx keeps a connection's write buffer at its largest otherwise: up to a whole file).
const KEEP_BUFFER_MAX: u64 = 256 * 1024;

/// When an upload whose receive began at `began` must have written its rows, if it stored
/// objects: the orphan reconciliation takes an object older than ORPHAN_GRACE that no row
/// points at for an orphan, and an upload still committing has exactly such objects. Its
/// commit is cut (503, its objects deleted or left to the reconciliation) rather than end
/// with rows pointing at deleted objects: a commit that waited on the workspace lock past
/// the grace answered 200 for a file the reconciliation had already deleted (a red team,
/// with UPLOAD_BODY_TIMEOUT=1s and ORPHAN_GRACE=2s). A quarter of the grace is left for
/// the clocks of S3 and of the replicas to differ.
fn commit_by(began: Instant, grace: Duration) -> Option<Instant> {
    began.checked_add(grace.mul_f64(0.75))
}

/// How long a statement sent now may wait for the workspace lock when the grace cuts the
/// commit at `lock_by`, if that is shorter than the connection's own bound (half of
/// DEPENDENCY_TIMEOUT): most of what is left, so the database gives up first. Sized when the
/// statement goes out: a wait for a pooled connection has used some of the deadline.
fn lock_wait(lock_by: Option<Instant>, db: &Db) -> Option<Duration> {
    let wait = lock_by?
        .saturating_duration_since(Instant::now())
        .mul_f64(0.8);
    (wait < db.timeout() / 2).then_some(wait)
}

/// The database half of [`Stager::commit`]: every row and activity row, admitted under the
/// workspace's quotas, or nothing. `lock_by`: when the commit is cut, if the orphan grace
/// cuts it ([`lock_wait`]).
async fn write_rows(
    conn: &mut sqlx::PgConnection,
    (workspace_id, token_hash): (Uuid, Option<[u8; 32]>),
    files: &[Received],
    placed: &[Location],
    quota: Quota,
    lock_by: Option<Instant>,
    db: &Db,
) -> sqlx::Result<Result<Vec<UploadReceived>, StagingError>> {
    let rows: Vec<NewUpload> = files
        .iter()
        .zip(placed)
        .map(|(f, location)| NewUpload {
            file_id: location.file_id,
            workspace_id,
            filename: &f.name,
            mimetype: &f.mimetype,
            spool: &f.spool,
            location,
        })
        .collect();
    let read_back: u64 = rows
        .iter()
        .filter(|r| r.location.inline && r.spool.in_memory().is_none())
        .map(|r| r.spool.size)
        .sum();
    let one_statement =
        read_back <= ONE_STATEMENT_READ_BACK_MAX && rows.iter().all(NewUpload::inserts);
    let admission = if one_statement {
        let mut contents = Vec::with_capacity(rows.len());
        let mut digests = Vec::with_capacity(rows.len());
        for r in &rows {
            contents.push(match r.location.inline {
                true => Some(r.spool.read_all().await?),
                false => None,
            });
            digests.push(r.spool.sha256().await?);
        }
        // The bytes are copied twice on their way (sqlx's parameter buffer, the connection's
        // write buffer): blocks from the upload arena, whose pages stay mapped.
        let size = contents.iter().flatten().map(bytes::Bytes::len).sum();
        let stage = db::uploads::stage(
            conn,
            (workspace_id, token_hash),
            quota,
            &rows,
            &contents,
            &digests,
            lock_wait(lock_by, db),
        );
        crate::arena::big_blocks(size, stage).await?
    } else {
        // Rows first, without the workspace lock: they stay invisible until commit, so
        // concurrent large uploads to one workspace copy in parallel. Then admission (the
        // lock) and the activity rows.
        // The deadline grew with the bytes for the COPYs alone: every other statement gets
        // DEPENDENCY_TIMEOUT of its own (the admission may wait on the workspace lock).
        let step = db.timeout();
        let mut tx = in_step(step, "BEGIN", sqlx::Connection::begin(&mut *conn)).await?;
        for row in &rows {
            db::uploads::insert(&mut tx, row, db).await?;
        }
        let digests = db::uploads::set_digests(&mut tx, &rows);
        in_step(step, "the digests", digests).await?;
        let wait = lock_wait(lock_by, db);
        let admit = db::uploads::admit(&mut tx, workspace_id, token_hash, quota, &rows, wait);
        let admission = in_step(step, "the admission", admit).await?;
        if admission.refused.is_some() {
            in_step(step, "ROLLBACK", tx.rollback()).await?;
        } else {
            let log = db::uploads::log_staged(&mut tx, workspace_id, &rows);
            in_step(step, "the activity rows", log).await?;
            in_step(step, "COMMIT", tx.commit()).await?;
        }
        admission
    };
    let sent_as_parameters: u64 = rows
        .iter()
        .filter(|r| r.location.inline && r.inserts())
        .map(|r| r.spool.size)
        .sum();
    if sent_as_parameters > KEEP_BUFFER_MAX {
        sqlx::Connection::shrink_buffers(&mut *conn);
    }
    let refusal = match admission.refused.as_deref() {
        None => None,
        // As the request's own check at its start would answer now.
        Some("caller") => Some(match token_hash {
            Some(_) => StagingError::TokenRevoked,
            None => StagingError::WorkspaceRemoved,
        }),
        Some("files") => Some(StagingError::QuotaFiles {
            pending: admission.pending_files,
            max: quota.max_files,
        }),
        Some(_) => Some(StagingError::QuotaBytes {
            pending: admission.pending_bytes,
            max: quota.max_bytes,
        }),
    };
    if let Some(refusal) = refusal {
        return Ok(Err(refusal));
    }
    let staged = rows
        .iter()
        .map(|r| UploadReceived {
            file_id: r.file_id,
            file: StagedFile {
                uri: platform_uri(workspace_id, r.file_id),
                name: r.filename.to_string(),
                mime_type: r.mimetype.to_string(),
                size: r.spool.size,
            },
        })
        .collect();
    Ok(Ok(staged))
}

/// Logs and counts a committed upload, one line per file (SPEC §8).
fn record_staged(workspace_id: Uuid, backend: &str, files: &[Received], staged: &[UploadReceived]) {
    let m = metrics();
    for (f, s) in files.iter().zip(staged) {
        m.files_staged.with_label_values(&[backend, "ok"]).inc();
        m.bytes_staged
            .with_label_values(&[backend])
            .inc_by(f.spool.size);
        m.upload_size.observe(f.spool.size as f64);
        tracing::info!(
            event = "staged", %workspace_id, file_id = %s.file_id, size = f.spool.size,
            name = clip(&f.name).as_str(), original = clip(&f.original).as_str(), mimetype = clip(&f.mimetype).as_str(), backend,
            "upload staged"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mimetypes() {
        let cases = [
            ("text/plain", "text/plain"),
            ("text/plain; charset=utf-8", "text/plain"),
            ("Application/PDF", "Application/PDF"),
            ("image/svg+xml", "image/svg+xml"),
            ("textplain", "application/octet-stream"),
            ("text/ plain", "application/octet-stream"),
            ("text/pl ain", "application/octet-stream"),
            ("text/plain\u{b}", "application/octet-stream"),
            ("\u{c}text/plain", "application/octet-stream"),
            (" text/plain\t", "text/plain"),
            ("text/plain/x", "application/octet-stream"),
            ("/plain", "application/octet-stream"),
            ("text/", "application/octet-stream"),
            ("text/pl\tain", "application/octet-stream"),
            ("text/pl\u{e9}in", "application/octet-stream"),
        ];
        for (input, want) in cases {
            assert_eq!(reduce_mimetype(Some(input)), want, "{input:?}");
        }
        assert_eq!(reduce_mimetype(None), "");
        let long = format!("application/{}", "x".repeat(MAX_MIMETYPE_CHARS));
        assert_eq!(reduce_mimetype(Some(&long)), "application/octet-stream");
        let edge = format!("a/{}", "x".repeat(MAX_MIMETYPE_CHARS - 2));
        assert_eq!(reduce_mimetype(Some(&edge)), edge);
    }
}
