//! The storage seam. A row records where its bytes live ([`Location`]); [`Storage`] is the
//! only code that acts on that: the `PENDING_UPLOADS_BACKEND` flag picks where *new* bytes
//! are written, while reads and deletes always follow the row, so flipping the flag forward
//! or back never strands a row. Every call is bounded by the dependency timeout.

pub mod bytea;
pub mod s3;

use std::{
    io,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{stream::BoxStream, Stream, StreamExt, TryStreamExt};
use uuid::Uuid;

use crate::{
    config::BackendMode,
    db::DbError,
    metrics,
    spool::{Hashing, MemoryBudget, RequestFile, Spool, SpoolWriter, READ_CHUNK},
};

pub use bytea::ByteaBackend;
use s3::PutFailure;
pub use s3::{ListedObject, S3Backend};

pub type ByteStream = BoxStream<'static, io::Result<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database: {0}")]
    Db(#[from] DbError),
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("stored bytes missing")]
    Missing,
    /// The bytes do not match what the row records (size or sha256).
    #[error("stored bytes do not match the row: {0}")]
    SourceCorrupt(String),
    /// A copy read back does not match what was written.
    #[error("copy does not verify: {0}")]
    CopyMismatch(String),
}

/// Where one row's bytes live, as the row records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file_id: Uuid,
    pub workspace_id: Uuid,
    pub size: u64,
    /// The row has its bytes in `content`.
    pub inline: bool,
    /// The row has its bytes in this object.
    pub s3_key: Option<String>,
}

/// An inclusive byte range `[start, end]` of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn full(size: u64) -> Self {
        ByteRange {
            start: 0,
            end: size.saturating_sub(1),
        }
    }
    /// Bytes in the range (never zero: the range is inclusive).
    pub fn byte_count(&self) -> u64 {
        self.end - self.start + 1
    }
}

/// The S3 PUT of a file that started with its receive ([`Storage::follow`]). Not taken by
/// [`Storage::put`] (the receive failed, the client went), it is stopped with
/// [`cancel`](Self::cancel), or when dropped, and an object it may have written is deleted: a
/// refused upload leaves nothing.
pub struct FollowedPut {
    pub file_id: Uuid,
    /// The size foreseen for the file.
    pub size: u64,
    key: String,
    s3: Arc<S3Backend>,
    /// The PUT was given the file's last byte (so an object may exist).
    released: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<Result<(), PutFailure>>>,
}

/// How a PUT alongside the receive ended.
enum Followed {
    Written,
    /// It failed (not stalled) after S3 had taken no bytes for `quiet`.
    Failed {
        quiet: Duration,
    },
}

impl FollowedPut {
    /// Whether the object is written, or how long S3 had taken no bytes when the PUT failed
    /// (what is left of DEPENDENCY_TIMEOUT is the put again's); an error when the server
    /// stalled (its PUT would too).
    async fn outcome(mut self) -> Result<Followed, StorageError> {
        let Some(task) = self.task.take() else {
            return Ok(Followed::Failed {
                quiet: Duration::ZERO,
            });
        };
        // What the upload waits on S3 once its receive is done.
        let started = Instant::now();
        let failed = match task.await {
            Ok(Ok(())) => {
                metrics::storage_observed("s3", "put", started, true);
                outcome("written");
                return Ok(Followed::Written);
            }
            Ok(Err(failed)) => failed,
            Err(e) => PutFailure {
                error: StorageError::Unavailable(e.to_string()),
                stalled: false,
                quiet: started.elapsed(),
            },
        };
        if failed.stalled {
            metrics::storage_observed("s3", "put", started, false);
            outcome("stalled");
            return Err(failed.error);
        }
        // A failure of that one attempt (the put after the receive has the SDK's retries):
        // not counted as the server's.
        outcome("put_again");
        tracing::debug!(key = %self.key, error = %failed.error, "PUT alongside the receive failed: put again");
        Ok(Followed::Failed {
            quiet: failed.quiet,
        })
    }

    /// Stops the PUT and, when it may have written its object, deletes it; returns once both
    /// are done, so an answer sent after it leaves nothing behind.
    pub async fn cancel(mut self) {
        if let Some(task) = self.task.take() {
            // In a task of its own: a caller dropped half-way still has the object deleted.
            let _ = tokio::spawn(self.stop(task, "stopped")).await;
        }
    }

    /// Stops the PUT because the file's size was foreseen wrong (a file before another): the
    /// file is put again after its receive, so it counts as `put_again`, not as a request
    /// that failed (`stopped`).
    pub async fn guessed_wrong(mut self) {
        if let Some(task) = self.task.take() {
            let _ = tokio::spawn(self.stop(task, "put_again")).await;
        }
    }

    fn stop(
        &mut self,
        task: tokio::task::JoinHandle<Result<(), PutFailure>>,
        counted_as: &'static str,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        task.abort();
        outcome(counted_as);
        let (s3, key, released) = (
            self.s3.clone(),
            std::mem::take(&mut self.key),
            self.released.clone(),
        );
        async move {
            let _ = task.await;
            // Its last byte sent, the server may store the object even if the answer never
            // came back; deleting a key that is not there is fine.
            if released.load(Ordering::Relaxed) {
                let _ = metrics::storage_op("s3", "delete", s3.delete_key(&key)).await;
            }
        }
    }
}

fn outcome(outcome: &str) {
    metrics::metrics()
        .puts_while_receiving
        .with_label_values(&[outcome])
        .inc();
}

impl Drop for FollowedPut {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else { return };
        let stop = self.stop(task, "stopped");
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(stop);
        }
    }
}

#[derive(Clone)]
pub struct Storage {
    mode: BackendMode,
    bytea: Arc<ByteaBackend>,
    s3: Option<Arc<S3Backend>>,
}

impl Storage {
    pub fn new(
        mode: BackendMode,
        bytea: ByteaBackend,
        s3: Option<S3Backend>,
    ) -> Result<Self, String> {
        if mode != BackendMode::Bytea && s3.is_none() {
            return Err(format!(
                "PENDING_UPLOADS_BACKEND={} needs PENDING_UPLOADS_S3_BUCKET",
                mode.as_str()
            ));
        }
        Ok(Storage {
            mode,
            bytea: Arc::new(bytea),
            s3: s3.map(Arc::new),
        })
    }

    pub fn mode(&self) -> BackendMode {
        self.mode
    }

    pub fn s3(&self) -> Option<&S3Backend> {
        self.s3.as_deref()
    }

    fn s3_or_err(&self) -> Result<&S3Backend, StorageError> {
        self.s3()
            .ok_or_else(|| StorageError::Unavailable("no S3 bucket configured".into()))
    }

    /// When an upload's spooled files are hashed: a PUT after the receive sends the digest
    /// before the bytes (a plain PUT: the aws-chunked trailer the SDK would otherwise use
    /// copies every byte twice and keeps those copies queued, about 7 MiB more with 16
    /// uploads at once), a COPY after them. A PUT alongside the receive cannot have it
    /// first, and hashes its file as it goes ([`Storage::follow`]).
    pub fn hashing(&self) -> Hashing {
        match self.mode {
            BackendMode::Bytea => Hashing::OnReadBack,
            BackendMode::Dual | BackendMode::S3 => Hashing::OnReceive,
        }
    }

    /// Whether new bytes go to S3 (where a PUT can follow the receive: [`Storage::follow`]).
    pub fn writes_s3(&self) -> bool {
        self.mode != BackendMode::Bytea && self.s3.is_some()
    }

    /// A spool for a file of `size` bytes that is still to be received, and its S3 PUT,
    /// started now and reading the spool as it is written, when the mode writes to S3 and one
    /// of the replica's places is free: the PUT then ends soon after the receive rather than
    /// starting there. [`Storage::put`] takes its outcome. The PUT hashes the file itself (it
    /// cannot send the digest first), so the spool does not.
    pub fn follow(
        &self,
        workspace_id: Uuid,
        size: u64,
        spool_dir: &Path,
        request: &RequestFile,
    ) -> Option<(SpoolWriter, FollowedPut)> {
        if !self.writes_s3() {
            return None;
        }
        let s3 = self.s3.clone()?;
        let place = s3.place_while_receiving()?;
        let (writer, tail) = SpoolWriter::followed(spool_dir, size, request).ok()?;
        let file_id = Uuid::new_v4();
        let key = s3.key_for(workspace_id, file_id);
        let released = tail.released();
        let task = {
            let (s3, key) = (s3.clone(), key.clone());
            tokio::spawn(async move {
                let _place = place;
                s3.put_followed(&key, &tail).await
            })
        };
        let put = FollowedPut {
            file_id,
            size,
            key,
            s3,
            released,
            task: Some(task),
        };
        Some((writer.hashing(Hashing::OnReadBack), put))
    }

    /// Writes a spooled file wherever the mode sends new bytes, before its row exists (S3
    /// first in dual mode); returns what the row must record. Inline bytes are written with
    /// the row itself (`db::uploads::insert` streams them from the spool). A file whose PUT
    /// followed its receive (`followed`, whose file id the caller passes) is written once
    /// that PUT is; a PUT that failed for another reason than a stalled server is made again.
    pub async fn put(
        &self,
        workspace_id: Uuid,
        file_id: Uuid,
        spool: &Spool,
        followed: Option<FollowedPut>,
    ) -> Result<Location, StorageError> {
        let s3_key = match self.mode {
            BackendMode::Bytea => None,
            BackendMode::Dual | BackendMode::S3 => {
                let s3 = self.s3_or_err()?;
                let key = s3.key_for(workspace_id, file_id);
                let followed = match followed {
                    Some(followed) => followed.outcome().await?,
                    None => Followed::Failed {
                        quiet: Duration::ZERO,
                    },
                };
                if let Followed::Failed { quiet } = followed {
                    // An upload waits on a silent S3 for DEPENDENCY_TIMEOUT in all: a PUT that
                    // failed after S3 had taken nothing for a while leaves its put again only
                    // the rest (before, a whole one more). Under a quarter of it is too little
                    // to connect and send: 503 now.
                    let left = s3.stall().saturating_sub(quiet);
                    if left < s3.stall() / 4 {
                        return Err(StorageError::Unavailable(format!(
                            "S3 failed the PUT of {key} and left no time to put it again"
                        )));
                    }
                    metrics::storage_op("s3", "put", s3.put_key_within(&key, spool, left)).await?;
                }
                // Recorded by the PUT as it read the file back; were it not, read now, before
                // the row's transaction holds a connection.
                spool.sha256().await?;
                Some(key)
            }
        };
        Ok(Location {
            file_id,
            workspace_id,
            size: spool.size,
            inline: self.mode != BackendMode::S3,
            s3_key,
        })
    }

    /// Undoes `put` for rows whose transaction did not commit. Best effort: what is left is
    /// found by the sweep's orphan reconciliation.
    pub async fn discard(&self, locations: &[Location]) {
        let Some(s3) = self.s3() else { return };
        for key in locations.iter().filter_map(|p| p.s3_key.as_deref()) {
            match s3.delete_key(key).await {
                Ok(()) => tracing::info!(
                    event = "discarded",
                    key,
                    "object of a failed upload removed"
                ),
                Err(e) => {
                    tracing::warn!(key, error = %e, "could not remove object of a failed upload")
                }
            }
        }
    }

    /// Opens a stored file; the row decides where from. The first chunk is read before this
    /// returns, so a row whose bytes vanished is `Missing` (a 404), never a short 200. A row
    /// with both copies falls back to its bytea copy when S3 fails, a missing object included
    /// (SPEC §6). A row swept meanwhile is still `Missing`: the sweep deletes the row before
    /// its object, so the fallback finds no bytea copy either. Returns the stream and the
    /// backend it reads from.
    pub async fn open(
        &self,
        loc: &Location,
        range: ByteRange,
    ) -> Result<(ByteStream, &'static str), StorageError> {
        if loc.s3_key.is_none() {
            let stream = metrics::storage_op("bytea", "get", self.bytea.open(loc, range)).await?;
            return Ok((stream, "bytea"));
        }
        let from_s3 = async { self.s3_or_err()?.open(loc, range).await };
        match metrics::storage_op("s3", "get", from_s3).await {
            Ok(stream) => Ok((stream, "s3")),
            Err(e) if loc.inline => {
                metrics::metrics()
                    .storage_fallbacks
                    .with_label_values(&["get"])
                    .inc();
                tracing::warn!(
                    event = "fallback", file_id = %loc.file_id, workspace_id = %loc.workspace_id,
                    error = %e, "S3 read failed; serving the bytea copy"
                );
                let stream =
                    metrics::storage_op("bytea", "get", self.bytea.open(loc, range)).await?;
                Ok((stream, "bytea"))
            }
            Err(e) => Err(e),
        }
    }

    /// The key [`Storage::check_present`] asks the bucket about: an S3-only row's. A row
    /// with an inline copy has its bytes whatever S3 says (the read falls back to it).
    pub fn presence_key(loc: &Location) -> Option<&str> {
        loc.s3_key.as_deref().filter(|_| !loc.inline)
    }

    /// Whether [`Storage::open`] would find the row's bytes, without reading them (a HEAD
    /// answers as its GET would): `Missing` for an S3-only row whose object is not in the
    /// bucket ([`Storage::presence_key`]).
    pub async fn check_present(&self, loc: &Location) -> Result<(), StorageError> {
        let Some(key) = Self::presence_key(loc) else {
            return Ok(());
        };
        let head = async { self.s3_or_err()?.head_key(key).await };
        match metrics::storage_op("s3", "head", head).await? {
            Some(stored) if u64::try_from(stored.size).ok() == Some(loc.size) => Ok(()),
            Some(stored) => Err(StorageError::SourceCorrupt(format!(
                "object {key} holds {} bytes where the row records {}",
                stored.size, loc.size
            ))),
            None => Err(StorageError::Missing),
        }
    }

    /// The read-ahead budget of inline reads ([`bytea::reserve_whole`]).
    pub fn read_ahead_budget(&self) -> Arc<tokio::sync::Semaphore> {
        self.bytea.budget()
    }

    /// [`Storage::open`], for a read whose first slice of inline bytes came with the row
    /// (`head`, read from offset 0, under the room `reserved` for it if any,
    /// [`bytea::reserve_whole`]), and `rest`, the pieces that follow it when the file is read
    /// whole with its row and `range` is all of it: a small file costs no further round trip.
    pub async fn open_from(
        &self,
        loc: &Location,
        range: ByteRange,
        head: Option<Bytes>,
        rest: Option<crate::db::uploads::Pieces>,
        reserved: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<(ByteStream, &'static str), StorageError> {
        match head {
            Some(first) if loc.s3_key.is_none() && range.start == 0 && !first.is_empty() => {
                let first = first.slice(..(range.byte_count().min(first.len() as u64) as usize));
                // Counted as the bytea read it is; its time was spent in the row's query.
                let open = async {
                    Ok::<_, StorageError>(match rest {
                        Some(rest) => ByteaBackend::whole_from(range, first, rest, reserved),
                        None => self.bytea.continue_from(loc, range, first, reserved),
                    })
                };
                Ok((metrics::storage_op("bytea", "get", open).await?, "bytea"))
            }
            _ => {
                // No inline bytes came with the row: no room is kept while S3 answers.
                drop(reserved);
                self.open(loc, range).await
            }
        }
    }

    /// Removes a swept row's object (its bytea copy went with the row).
    pub async fn delete(&self, loc: &Location) -> Result<(), StorageError> {
        let Some(key) = loc.s3_key.as_deref() else {
            return Ok(());
        };
        metrics::storage_op("s3", "delete", self.s3_or_err()?.delete_key(key)).await
    }

    /// Deletes one object by key (idempotent).
    pub async fn delete_object(&self, key: &str) -> Result<(), StorageError> {
        metrics::storage_op("s3", "delete", self.s3_or_err()?.delete_key(key)).await
    }

    /// The deployment the bucket prefix belongs to ([`S3Backend::claim_prefix`]).
    pub async fn claim_prefix(&self, ours: Uuid) -> Result<Uuid, StorageError> {
        self.s3_or_err()?.claim_prefix(ours).await
    }

    /// Whether an object key has a shape this service writes ([`S3Backend::writes_key`]).
    pub fn writes_key(&self, key: &str) -> bool {
        self.s3().is_some_and(|s3| s3.writes_key(key))
    }

    /// The objects the orphan reconciliation may judge, a listing page at a time: `None`
    /// without a bucket, and without a prefix of our own (SPEC §10: a shared prefix would
    /// reach other applications' objects).
    pub fn orphan_candidates(
        &self,
        page_size: i32,
        start_after: Option<String>,
    ) -> Option<impl Stream<Item = Result<Vec<ListedObject>, StorageError>> + Send + '_> {
        let s3 = self.s3().filter(|s3| s3.prefix_is_private())?;
        Some(s3.list_pages(page_size, start_after))
    }

    /// The backfill's step (SPEC §6): copies a row's inline bytes to a new S3 object through a
    /// spool (size and sha256 checked against the row: `expected`, when it records one), then
    /// reads the object back and checks it again. Returns the key and the digest; the caller
    /// points the row at it. A copy that does not verify is deleted. Each call writes a key
    /// of its own ([`S3Backend::key_for_copy`]): what an earlier, killed call left is an
    /// orphan the reconciliation may be deleting, never this copy.
    pub async fn copy_to_s3(
        &self,
        loc: &Location,
        expected: Option<&[u8]>,
        spool_dir: &Path,
    ) -> Result<(String, [u8; 32]), StorageError> {
        let s3 = self.s3_or_err()?;
        let inline = Location {
            s3_key: None,
            ..loc.clone()
        };
        // One row at a time: a row up to one read chunk skips the temp file.
        let mut writer = SpoolWriter::create(spool_dir, MemoryBudget::unreserved(READ_CHUNK));
        let (mut chunks, _) = self.open(&inline, ByteRange::full(loc.size)).await?;
        while let Some(chunk) = chunks.try_next().await? {
            writer.write(chunk).await?;
        }
        let spool = writer.finish().await?;
        let sha256 = spool.sha256().await?;
        if spool.size != loc.size || expected.is_some_and(|d| d != sha256) {
            return Err(StorageError::SourceCorrupt(format!(
                "{} bytes, sha256 {}",
                spool.size,
                hex::encode(sha256)
            )));
        }
        let key = s3.key_for_copy(loc.workspace_id, loc.file_id, Uuid::new_v4());
        metrics::storage_op("s3", "put", s3.put_key(&key, &spool)).await?;
        // The copy read back: one that is not what was written is this copy's failure (the
        // row's bytes were checked above), and goes; so does one whose read failed.
        let read_back = match s3.sha256_of(&key, loc.size).await {
            Ok(digest) if digest == sha256 => return Ok((key, sha256)),
            Ok(digest) => {
                StorageError::CopyMismatch(format!("{key}: sha256 {}", hex::encode(digest)))
            }
            Err(StorageError::SourceCorrupt(what)) => StorageError::CopyMismatch(what),
            Err(e) => e,
        };
        let _ = s3.delete_key(&key).await;
        Err(read_back)
    }

    /// The backend a read of this row goes to first, for logs and metrics.
    pub fn reader_name(&self, loc: &Location) -> &'static str {
        if loc.s3_key.is_some() {
            "s3"
        } else {
            "bytea"
        }
    }

    /// Readiness of where uploads are written: the database in `bytea` mode, the bucket in
    /// `dual` and `s3` (the database has its own line in /readyz; checked here too, a
    /// database outage read as a storage one in `s3` mode, where S3 was fine).
    pub async fn check(&self) -> Result<(), StorageError> {
        match self.mode {
            BackendMode::Bytea => self.bytea.check().await,
            BackendMode::Dual | BackendMode::S3 => self.s3_or_err()?.check().await,
        }
    }
}

/// `stream` as the `len` bytes it must carry: one that ends short, or runs past them, ends in
/// an error there (the download is cut and counted as its source's failure), never in a body
/// shorter or longer than its Content-Length. An object cut short out of band answered 200
/// with no bytes at all (a red team).
pub fn exactly(stream: ByteStream, len: u64) -> ByteStream {
    futures::stream::unfold(Some((stream, len)), |state| async move {
        let (mut stream, left) = state?;
        match stream.next().await {
            Some(Ok(chunk)) if chunk.len() as u64 <= left => {
                let left = left - chunk.len() as u64;
                Some((Ok(chunk), Some((stream, left))))
            }
            Some(Ok(_)) => Some((Err(not_as_long("more")), None)),
            Some(Err(e)) => Some((Err(e), None)),
            None if left > 0 => Some((Err(not_as_long("fewer")), None)),
            None => None,
        }
    })
    .boxed()
}

fn not_as_long(than: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("storage sent {than} bytes than the range holds"),
    )
}

/// A stream of chunks, each of which must arrive within `idle` of the one before: a storage
/// server that freezes mid-transfer cuts the download (the client sees a short body against
/// Content-Length) instead of holding it forever.
pub fn with_idle_timeout(stream: ByteStream, idle: Duration) -> ByteStream {
    futures::stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(item)) => Some((item, Some(stream))),
            Ok(None) => None,
            Err(_) => Some((
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("storage sent nothing for {idle:?}"),
                )),
                None,
            )),
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(chunks: &[&'static [u8]], len: u64) -> Vec<io::Result<usize>> {
        let stream = futures::stream::iter(
            chunks
                .iter()
                .map(|c| Ok(Bytes::from_static(c)))
                .collect::<Vec<_>>(),
        )
        .boxed();
        exactly(stream, len)
            .map(|item| item.map(|chunk| chunk.len()))
            .collect()
            .await
    }

    #[tokio::test]
    async fn a_stream_carries_exactly_its_range_or_ends_in_an_error() {
        let ok: Vec<usize> = read(&[b"abc", b"de"], 5)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(ok, [3, 2]);
        let short = read(&[b"abc"], 5).await;
        assert!(
            matches!(short.as_slice(), [Ok(3), Err(e)] if e.kind() == io::ErrorKind::UnexpectedEof)
        );
        let long = read(&[b"abc", b"def"], 5).await;
        assert!(matches!(long.as_slice(), [Ok(3), Err(_)]));
    }
}
