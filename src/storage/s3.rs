//! S3 / MinIO / LocalStack storage: one object per file, under `<prefix><workspace_id>/`: an
//! upload's is `<file_id>` (file ids are random v4 UUIDs: unguessable), a backfill copy's
//! `<file_id>.<attempt>`. Every key is written by one PUT only; a row records its key, and
//! reads and deletes take it from the row, never re-derive it.

use std::{
    io,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aws_sdk_s3::{
    config::{http::HttpResponse, RequestChecksumCalculation, ResponseChecksumValidation},
    error::{DisplayErrorContext, SdkError},
    primitives::ByteStream,
    types::ChecksumAlgorithm,
    Client,
};
use aws_smithy_types::{body::SdkBody, timeout::TimeoutConfig};
use base64::{engine::general_purpose::STANDARD, Engine};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt, TryStreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use super::{
    exactly, with_idle_timeout, ByteRange, ByteStream as OurStream, Location, StorageError,
};
use crate::{
    config::{S3Checksum, StorageArgs},
    digest::Digester,
    metrics,
    spool::{Spool, Tail},
};

/// S3's own maximum number of keys per ListObjectsV2 page.
pub const LIST_PAGE_MAX: i32 = 1000;

pub struct S3Backend {
    client: Client,
    bucket: String,
    prefix: String,
    /// How long an operation may make no progress (DEPENDENCY_TIMEOUT).
    stall: Duration,
    /// PUTs carry the spool's SHA-256 for the server to check (`S3Checksum::WhenSupported`).
    send_sha256: bool,
    /// Places for PUTs that run alongside their files' receive (`S3_PUTS_WHILE_RECEIVING`).
    while_receiving: Arc<Semaphore>,
}

/// An object under our prefix, as the orphan reconciliation sees it.
pub struct ListedObject {
    pub key: String,
    pub last_modified: Option<DateTime<Utc>>,
}

/// A PUT that failed; `stalled` when the server took no bytes for the dependency timeout
/// while it had bytes to take.
#[derive(Debug)]
pub struct PutFailure {
    pub error: StorageError,
    pub stalled: bool,
    /// How long the PUT had taken no bytes when it failed.
    pub quiet: Duration,
}

/// What a PUT sends: a received file, or one being received.
#[derive(Clone, Copy)]
enum Source<'a> {
    Spool(&'a Spool),
    Tail(&'a Tail),
}

type Chunks = std::pin::Pin<Box<dyn Stream<Item = io::Result<bytes::Bytes>> + Send + Sync>>;

impl Source<'_> {
    /// Records the file's digest once a reader (or the server) has it.
    fn recorder(self) -> Arc<dyn Fn([u8; 32]) + Send + Sync> {
        match self {
            Source::Spool(spool) => {
                let spool = spool.clone();
                Arc::new(move |d| spool.record_sha256(d))
            }
            Source::Tail(tail) => {
                let tail = tail.clone();
                Arc::new(move |d| tail.record_sha256(d))
            }
        }
    }

    /// A fresh reader of the file per attempt; a tail's tells `progress` when it waits on the
    /// client.
    fn reader(self, progress: &Arc<Progress>) -> Arc<dyn Fn() -> Chunks + Send + Sync> {
        match self {
            Source::Spool(spool) => {
                let spool = spool.clone();
                Arc::new(move || Box::pin(spool.chunks()))
            }
            Source::Tail(tail) => {
                let (tail, progress) = (tail.clone(), progress.clone());
                Arc::new(move || {
                    let progress = progress.clone();
                    Box::pin(tail.chunks(Arc::new(move |waiting| progress.waiting(waiting))))
                })
            }
        }
    }
}

/// A PUT's progress, for its watchdog: the furthest byte sent in any attempt, when that was
/// first reached (a retry re-sending old bytes is no progress), and whether the reader waits
/// on the client (the server is then not the one stalling).
struct Progress {
    started: Instant,
    furthest: AtomicU64,
    at_ms: AtomicU64,
    waiting: AtomicBool,
}

impl Progress {
    fn new() -> Self {
        Progress {
            started: Instant::now(),
            furthest: AtomicU64::new(0),
            at_ms: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        self.at_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn reached(&self, offset: u64) {
        if self.furthest.fetch_max(offset, Ordering::Relaxed) < offset {
            self.touch();
        }
    }

    fn waiting(&self, waiting: bool) {
        self.waiting.store(waiting, Ordering::Relaxed);
        self.touch();
    }

    /// How long the server has had bytes to take and taken none.
    fn stalled_for(&self) -> Duration {
        if self.waiting.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.at_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

fn unavailable<E: std::error::Error + Send + Sync + 'static, R: std::fmt::Debug>(
    e: SdkError<E, R>,
) -> StorageError {
    StorageError::Unavailable(DisplayErrorContext(&e).to_string())
}

/// The HTTP status S3 answered a failed request with (none when it did not answer).
fn status_of<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

impl S3Backend {
    /// Builds the client from the standard AWS chain plus our settings; `None` when no bucket
    /// is configured.
    pub async fn from_args(args: &StorageArgs, stall: Duration) -> Option<S3Backend> {
        let bucket = args.s3_bucket.clone().filter(|b| !b.is_empty())?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(endpoint) = &args.aws_endpoint_url {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(region) = &args.aws_region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let shared = loader.load().await;
        let mut conf = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(args.s3_force_path_style)
            // A frozen server must not hold a request longer than the dependency timeout:
            // every wait is bounded. PUTs, whose length scales with the file, lift the
            // attempt bound and are watched for progress instead (`put_key`).
            // The operation timeout covers every attempt: the SDK retries a timed-out attempt,
            // which alone would stretch a frozen server's cost to attempts × timeout.
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(stall.min(Duration::from_secs(3)))
                    .read_timeout(stall)
                    .operation_attempt_timeout(stall)
                    .operation_timeout(stall)
                    .build(),
            );
        if shared.region().is_none() {
            conf = conf.region(aws_config::Region::new("us-east-1"));
        }
        if args.s3_checksum == S3Checksum::WhenRequired {
            conf = conf
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        Some(S3Backend {
            client: Client::from_conf(conf.build()),
            bucket,
            prefix: args.s3_prefix.clone(),
            stall,
            send_sha256: args.s3_checksum == S3Checksum::WhenSupported,
            while_receiving: Arc::new(Semaphore::new(
                args.s3_puts_while_receiving.min(Semaphore::MAX_PERMITS),
            )),
        })
    }

    /// The orphan reconciliation lists and deletes under the prefix only when the prefix is
    /// a folder of its own: non-empty and ending in `/` (SPEC §10, bucket safety). With `""`
    /// or `pu` it would reach other applications' objects (`pu` also matches `public/…`).
    pub fn prefix_is_private(&self) -> bool {
        self.prefix.len() > 1 && self.prefix.ends_with('/')
    }

    /// An upload's key: its file id is fresh, so no other PUT ever writes it.
    pub fn key_for(&self, workspace_id: Uuid, file_id: Uuid) -> String {
        format!("{}{}/{}", self.prefix, workspace_id, file_id)
    }

    /// Whether `key` has a shape this service writes ([`S3Backend::key_for`],
    /// [`S3Backend::key_for_copy`]): any other key under the prefix is not ours to delete (a
    /// deployment under a longer prefix inside ours, an operator's file, the prefix's marker).
    pub fn writes_key(&self, key: &str) -> bool {
        let Some((workspace, file)) = key
            .strip_prefix(&self.prefix)
            .and_then(|rest| rest.split_once('/'))
        else {
            return false;
        };
        let canonical = |text: &str| Uuid::try_parse(text).is_ok_and(|u| u.to_string() == text);
        let (file, attempt) = match file.split_once('.') {
            Some((file, attempt)) => (file, Some(attempt)),
            None => (file, None),
        };
        let attempt_ok =
            attempt.is_none_or(|a| Uuid::try_parse(a).is_ok_and(|u| u.simple().to_string() == a));
        canonical(workspace) && canonical(file) && attempt_ok
    }

    /// The key of one backfill attempt's copy of a row: a key of its own per attempt. An
    /// attempt that dies between its PUT and pointing the row at the copy leaves an orphan,
    /// which the reconciliation deletes once it saw no row point at it. Were a later attempt
    /// to write that same key and point the row at it in between, the delete would still
    /// land, and the row would point at a deleted object: lost once `contract` releases the
    /// bytea copy (SPEC §7). An orphan's key is never pointed at later.
    pub fn key_for_copy(&self, workspace_id: Uuid, file_id: Uuid, attempt: Uuid) -> String {
        format!(
            "{}.{}",
            self.key_for(workspace_id, file_id),
            attempt.simple()
        )
    }

    /// A place for a PUT alongside its file's receive, when one is free.
    pub fn place_while_receiving(&self) -> Option<OwnedSemaphorePermit> {
        self.while_receiving.clone().try_acquire_owned().ok()
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The objects under our prefix, one listing page (at most `page_size` keys) at a time,
    /// so memory stays bounded however many objects the bucket holds; from the first key after
    /// `start_after` when given.
    pub fn list_pages(
        &self,
        page_size: i32,
        start_after: Option<String>,
    ) -> impl Stream<Item = Result<Vec<ListedObject>, StorageError>> + Send + '_ {
        let pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .set_start_after(start_after)
            .into_paginator()
            .page_size(page_size)
            .send();
        futures::stream::unfold(pages, |mut pages| async move {
            // The paginator's last `next()` sends no request: only pages are counted.
            let started = Instant::now();
            let page = pages.next().await?;
            metrics::storage_observed("s3", "list", started, page.is_ok());
            Some((
                page.map(|p| listed(p.contents())).map_err(unavailable),
                pages,
            ))
        })
    }

    /// Every object under our prefix (tests and small buckets; the sweep pages instead).
    pub async fn list(&self) -> Result<Vec<ListedObject>, StorageError> {
        self.list_pages(LIST_PAGE_MAX, None).try_concat().await
    }

    pub async fn delete_key(&self, key: &str) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Writes the spool to `key`. The body is read from the spool afresh on every retry
    /// (positional reads), and a watchdog cancels the PUT when the server takes no byte it
    /// had not taken before for the dependency timeout: a frozen server costs a request that
    /// long, not forever, and a retry re-sending old bytes is no progress.
    ///
    /// A spool whose digest is not known yet (a file on disk, [`Hashing::OnReadBack`]) is
    /// hashed as the PUT reads it back, so the receive does not wait on SHA-256: with optional
    /// checksums on, by the SDK into a trailer that the server checks and echoes in its
    /// answer; with them off, here, recorded once an attempt has read the last byte. A server
    /// that echoes none leaves the digest to be read back ([`Storage::put`]).
    ///
    /// [`Hashing::OnReadBack`]: crate::spool::Hashing::OnReadBack
    /// [`Storage::put`]: super::Storage::put
    pub async fn put_key(&self, key: &str, spool: &Spool) -> Result<(), StorageError> {
        self.put_key_within(key, spool, self.stall).await
    }

    /// [`put_key`](Self::put_key), failing once S3 takes no bytes for `stall` (at most
    /// DEPENDENCY_TIMEOUT: what an upload has left of it).
    pub async fn put_key_within(
        &self,
        key: &str,
        spool: &Spool,
        stall: Duration,
    ) -> Result<(), StorageError> {
        self.put(key, Source::Spool(spool), stall.min(self.stall))
            .await
            .map_err(|failed| failed.error)
    }

    /// How long an operation may make no progress (DEPENDENCY_TIMEOUT).
    pub fn stall(&self) -> Duration {
        self.stall
    }

    /// Writes a file to `key` while it is being received ([`Tail`]): the PUT takes its bytes
    /// as they reach the spool, so it ends soon after the receive instead of starting then.
    /// The watchdog does not count the time the PUT waits on the client.
    pub async fn put_followed(&self, key: &str, tail: &Tail) -> Result<(), PutFailure> {
        self.put(key, Source::Tail(tail), self.stall).await
    }

    /// A PUT's settings. Its length scales with the file, so no time bound covers the call:
    /// the watchdog watches progress instead (a read timeout would run from the first byte
    /// sent to the answer). A PUT alongside the receive, as long as the client's upload, makes
    /// one attempt: a failed one is put again after the receive, with the SDK's retries.
    ///
    /// The SDK's own stalled-stream protection is off for PUTs: the watchdog is the judge. The
    /// SDK's fired after its 5 s grace whatever DEPENDENCY_TIMEOUT said, counted a PUT that
    /// waited on its client as stalled, and failed as a plain error: a PUT alongside the
    /// receive that S3 stopped taking was put again, and the upload waited a second timeout
    /// (a black-box probe: 18.5 s for a 6 MB file with S3 frozen and a 10 s timeout).
    fn put_config(&self, alongside: bool) -> aws_sdk_s3::config::Builder {
        let mut config = aws_sdk_s3::config::Config::builder()
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(self.stall.min(Duration::from_secs(3)))
                    .disable_read_timeout()
                    .disable_operation_attempt_timeout()
                    .disable_operation_timeout()
                    .build(),
            )
            .stalled_stream_protection(
                aws_sdk_s3::config::StalledStreamProtectionConfig::disabled(),
            );
        if alongside {
            config = config.retry_config(
                aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(1),
            );
        }
        config
    }

    async fn put(&self, key: &str, source: Source<'_>, stall: Duration) -> Result<(), PutFailure> {
        let (size, known) = match source {
            Source::Spool(spool) => (spool.size, spool.known_sha256()),
            Source::Tail(tail) => (tail.size, None),
        };
        let sha256 = match self.send_sha256 {
            true => known.map(|d| STANDARD.encode(d)),
            false => None,
        };
        let trailer = (self.send_sha256 && known.is_none()).then_some(ChecksumAlgorithm::Sha256);
        let hash_here = known.is_none() && !self.send_sha256;
        let progress = Arc::new(Progress::new());
        let record = source.recorder();
        let chunks = source.reader(&progress);
        let body = {
            let (progress, record) = (progress.clone(), record.clone());
            SdkBody::retryable(move || {
                let (progress, record) = (progress.clone(), record.clone());
                let mut offset = 0u64;
                let mut digest = hash_here.then(Digester::default);
                let frames = chunks().map(move |chunk| {
                    if let Ok(c) = &chunk {
                        offset += c.len() as u64;
                        progress.reached(offset);
                        if let Some(d) = digest.as_mut() {
                            d.update(c);
                        }
                        // At the last byte, not at the stream's end: a sender that has
                        // Content-Length bytes need not ask for more.
                        if offset == size {
                            if let Some(d) = digest.take() {
                                record(d.finish());
                            }
                        }
                    }
                    chunk.map(http_body::Frame::data)
                });
                SdkBody::from_body_1_x(http_body_util::StreamBody::new(frames))
            })
        };
        let put = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(size as i64)
            // The server checks the object against a digest (end to end, spool to bucket):
            // one known before the PUT goes as a header, and the SDK, given a checksum,
            // computes none of its own, so the body goes as a plain PUT; otherwise the SDK's
            // own, as a trailer (aws-chunked).
            .set_checksum_sha256(sha256)
            .set_checksum_algorithm(trailer)
            .body(ByteStream::new(body))
            .customize()
            .config_override(self.put_config(matches!(source, Source::Tail(_))))
            .send();
        // Fires `stall` after the last progress (not on fixed ticks, which let it run a
        // quarter over).
        let watchdog = async {
            loop {
                let quiet = progress.stalled_for();
                if quiet >= stall {
                    return;
                }
                tokio::time::sleep((stall - quiet).max(Duration::from_millis(10))).await;
            }
        };
        tokio::select! {
            sent = put => {
                let out = sent.map_err(|e| PutFailure {
                    error: unavailable(e),
                    stalled: false,
                    quiet: progress.stalled_for(),
                })?;
                let echoed = out.checksum_sha256().and_then(|d| STANDARD.decode(d).ok());
                if let (None, Some(Ok(digest))) = (known, echoed.map(<[u8; 32]>::try_from)) {
                    record(digest);
                }
                Ok(())
            }
            () = watchdog => Err(PutFailure {
                error: StorageError::Unavailable(format!(
                    "S3 took no bytes of {key} for {stall:?}"
                )),
                stalled: true,
                quiet: stall,
            }),
        }
    }

    /// `range` of the object at `key`, which must be the `size` bytes a row records.
    async fn get_range(
        &self,
        key: &str,
        range: ByteRange,
        size: u64,
    ) -> Result<ByteStream, StorageError> {
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes={}-{}", range.start, range.end))
            // No checksum asked for, whatever `--s3-checksum` says: S3 sends none for a ranged
            // GET, while a server that does (LocalStack) had the SDK hash every byte read
            // (0.7 ms of CPU per MiB). Clients check the bytes against ETag / Repr-Digest.
            .customize()
            .config_override(
                aws_sdk_s3::Config::builder()
                    .response_checksum_validation(ResponseChecksumValidation::WhenRequired),
            )
            .send()
            .await
            .map_err(|e| match e.as_service_error() {
                Some(se) if se.is_no_such_key() => StorageError::Missing,
                _ => unavailable(e),
            })?;
        let length = resp.content_length().and_then(|n| u64::try_from(n).ok());
        let answer = Answer {
            length,
            range: resp.content_range(),
        };
        match answer.judged(range, size) {
            Judged::Fits => {}
            Judged::NotTheRows => {
                return Err(StorageError::SourceCorrupt(
                    answer.describe(key, range, size),
                ))
            }
            Judged::Unreadable => {
                return Err(StorageError::Unavailable(answer.describe(key, range, size)))
            }
        }
        Ok(resp.body)
    }
}

/// What a ranged GET answered, as far as its headers say.
struct Answer<'a> {
    length: Option<u64>,
    range: Option<&'a str>,
}

#[derive(Debug, PartialEq, Eq)]
enum Judged {
    /// The range asked for, of an object of the row's size (as far as the headers say; the
    /// body is held to its length as it streams, [`super::exactly`]).
    Fits,
    /// An object of another size than the row records (cut short or replaced out of band):
    /// not the row's bytes (in `dual`, its bytea copy is read instead).
    NotTheRows,
    /// An answer that says nothing sure (a whole object to a ranged GET, a range we cannot
    /// read): the server's trouble, not the object's.
    Unreadable,
}

impl Answer<'_> {
    fn judged(&self, asked: ByteRange, size: u64) -> Judged {
        match self.range.map(crate::api::content_range) {
            Some(Some((start, end, total))) => {
                if total.is_some_and(|t| t != size) || (start == asked.start && end < asked.end) {
                    // A total not the row's, or a range cut at an earlier end (S3 shortens
                    // one only where the object ends).
                    Judged::NotTheRows
                } else if (start, end) != (asked.start, asked.end)
                    || self.length.is_some_and(|n| n != asked.byte_count())
                {
                    Judged::Unreadable
                } else {
                    Judged::Fits
                }
            }
            Some(None) => Judged::Unreadable,
            // A whole object (200): its length, if given, is its size.
            None if self.length.is_some_and(|n| n != size) => Judged::NotTheRows,
            None if asked.start == 0 && asked.byte_count() == size => Judged::Fits,
            None => Judged::Unreadable,
        }
    }

    fn describe(&self, key: &str, asked: ByteRange, size: u64) -> String {
        format!(
            "object {key}, {size} bytes by its row: asked bytes={}-{}, answered {} bytes{}",
            asked.start,
            asked.end,
            self.length
                .map_or("an unknown number of".into(), |n| n.to_string()),
            self.range.map_or(String::new(), |r| format!(" ({r})")),
        )
    }
}

/// An object as HEAD describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub size: i64,
    pub sha256: Option<[u8; 32]>,
}

/// One listing page as the reconciliation sees it: keys and their last-modified times.
fn listed(objects: &[aws_sdk_s3::types::Object]) -> Vec<ListedObject> {
    objects
        .iter()
        .filter_map(|obj| {
            let key = obj.key()?.to_string();
            let last_modified = obj
                .last_modified()
                .and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos()));
            Some(ListedObject { key, last_modified })
        })
        .collect()
}

/// An S3 body as a stream of chunks: the first chunk goes out before the last is read.
pub fn body_stream(body: ByteStream) -> OurStream {
    futures::stream::unfold(body, |mut body| async move {
        body.next()
            .await
            .map(|chunk| (chunk.map_err(io::Error::other), body))
    })
    .boxed()
}

impl S3Backend {
    /// Streams `range` of a row's object; each chunk must come within the dependency timeout.
    pub async fn open(&self, loc: &Location, range: ByteRange) -> Result<OurStream, StorageError> {
        let key = loc.s3_key.as_deref().ok_or(StorageError::Missing)?;
        self.open_key(key, range, loc.size).await
    }

    /// Streams `range` of the object at `key`, which must be the `size` bytes a row records.
    pub async fn open_key(
        &self,
        key: &str,
        range: ByteRange,
        size: u64,
    ) -> Result<OurStream, StorageError> {
        let body = body_stream(self.get_range(key, range, size).await?);
        Ok(exactly(
            with_idle_timeout(body, self.stall),
            range.byte_count(),
        ))
    }

    /// The SHA-256 of the object at `key`, read whole: it must be the `size` bytes a row
    /// records (`SourceCorrupt` when it is not; a read cut short is an I/O error).
    pub async fn sha256_of(&self, key: &str, size: u64) -> Result<[u8; 32], StorageError> {
        let bytes = self.open_key(key, ByteRange::full(size), size).await?;
        let (digest, _) = crate::digest::of_stream(bytes).await?;
        Ok(digest)
    }

    /// What the bucket holds at `key`: its size and, when the server stored one for it, its
    /// SHA-256; `None` when there is no such object.
    pub async fn head_key(&self, key: &str) -> Result<Option<Stored>, StorageError> {
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
            .send()
            .await;
        let out = match head {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|se| se.is_not_found()) => return Ok(None),
            Err(e) => return Err(unavailable(e)),
        };
        // A multipart object's checksum is a composite (`<digest>-<parts>`): not the file's.
        let sha256 = out
            .checksum_sha256()
            .and_then(|d| STANDARD.decode(d).ok())
            .and_then(|d| <[u8; 32]>::try_from(d).ok());
        Ok(Some(Stored {
            size: out.content_length().unwrap_or(-1),
            sha256,
        }))
    }

    /// The key of the prefix's marker: the deployment whose objects are under it. Not of a
    /// shape this service writes for files ([`S3Backend::writes_key`]), so no walk deletes
    /// it.
    pub fn marker_key(&self) -> String {
        format!("{}.deployment", self.prefix)
    }

    /// The deployment the prefix's marker names, written as `ours` first when there is none
    /// (a deployment's first reconciliation claims its prefix). The write is conditional
    /// (`If-None-Match: *`): of two deployments claiming at once, the second's write fails
    /// with 412 (or 409 while the first's is in flight) and both read back the first's marker.
    /// A server that ignores the condition lets the later write win; the read-back then
    /// names the one whose marker stayed.
    pub async fn claim_prefix(&self, ours: Uuid) -> Result<Uuid, StorageError> {
        if let Some(found) = self.read_marker().await? {
            return Ok(found);
        }
        let conditional = self.put_marker(ours, true).await;
        let status = conditional.as_ref().err().and_then(status_of);
        match conditional {
            Ok(()) => {}
            // Another deployment's marker is there (412), or its write is in flight (409).
            Err(_) if matches!(status, Some(409 | 412)) => {}
            // A server that does not take the condition: written plainly, the read-back
            // decides.
            Err(_) if matches!(status, Some(400 | 501)) => {
                self.put_marker(ours, false).await.map_err(unavailable)?
            }
            Err(e) => return Err(unavailable(e)),
        }
        self.read_marker().await?.ok_or_else(|| {
            StorageError::Unavailable(
                "the prefix's marker was not there after it was written (or while another deployment's write was in flight): the next walk claims it again".into(),
            )
        })
    }

    /// Writes the prefix's marker naming `ours`, `If-None-Match: *` when `conditional`.
    async fn put_marker(
        &self,
        ours: Uuid,
        conditional: bool,
    ) -> Result<(), SdkError<aws_sdk_s3::operation::put_object::PutObjectError, HttpResponse>> {
        let mut put = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.marker_key())
            .content_type("text/plain")
            .body(ByteStream::from(ours.to_string().into_bytes()));
        if conditional {
            put = put.if_none_match("*");
        }
        put.send().await.map(|_| ())
    }

    /// The deployment the marker names (nil when it holds anything but an id), `None` without
    /// one. Its first bytes only: whatever someone wrote there is not read whole.
    async fn read_marker(&self) -> Result<Option<Uuid>, StorageError> {
        let got = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.marker_key())
            .range("bytes=0-63")
            .send()
            .await;
        let out = match got {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|se| se.is_no_such_key()) => {
                return Ok(None)
            }
            Err(e) => return Err(unavailable(e)),
        };
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| StorageError::Unavailable(e.to_string()))?
            .into_bytes();
        let id = std::str::from_utf8(&body)
            .ok()
            .and_then(|text| Uuid::try_parse(text.trim()).ok());
        Ok(Some(id.unwrap_or(Uuid::nil())))
    }

    /// Stops a migration run whose bucket is not there: every row then failed as if S3 were
    /// down for a moment (`S3 unavailable for N rows in a row`), with the cause only in the
    /// logs. Other failures are left to the run's own handling of an unavailable S3.
    pub async fn require_bucket(&self) -> anyhow::Result<()> {
        match self.head_bucket().await {
            Err(e) if status_of(&e) == Some(404) => {
                anyhow::bail!(
                    "the bucket {} does not exist: check PENDING_UPLOADS_S3_BUCKET and the endpoint",
                    self.bucket
                )
            }
            _ => Ok(()),
        }
    }

    pub async fn check(&self) -> Result<(), StorageError> {
        self.head_bucket().await.map_err(unavailable)
    }

    async fn head_bucket(
        &self,
    ) -> Result<(), SdkError<aws_sdk_s3::operation::head_bucket::HeadBucketError, HttpResponse>>
    {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_the_rows_bytes_another_objects_or_unsure() {
        let asked = |start, end| ByteRange { start, end };
        let judged = |length: Option<u64>, range: Option<&str>, a: ByteRange| {
            Answer { length, range }.judged(a, 1000)
        };
        use Judged::*;
        // 206 as S3 answers, with or without a length or a known total.
        assert_eq!(
            judged(Some(100), Some("bytes 0-99/1000"), asked(0, 99)),
            Fits
        );
        assert_eq!(judged(None, Some("bytes 0-99/1000"), asked(0, 99)), Fits);
        assert_eq!(judged(Some(100), Some("bytes 0-99/*"), asked(0, 99)), Fits);
        // A whole object (200), with its length or chunked.
        assert_eq!(judged(Some(1000), None, asked(0, 999)), Fits);
        assert_eq!(judged(None, None, asked(0, 999)), Fits);
        // Another object: another total, a range cut short, a whole one of another size.
        assert_eq!(
            judged(Some(100), Some("bytes 0-99/300"), asked(0, 99)),
            NotTheRows
        );
        assert_eq!(
            judged(Some(500), Some("bytes 500-999/*"), asked(500, 1499)),
            NotTheRows
        );
        assert_eq!(judged(Some(300), None, asked(0, 999)), NotTheRows);
        assert_eq!(judged(Some(300), None, asked(0, 99)), NotTheRows);
        // Unsure: the whole object to a ranged GET, another range, a length not the range's.
        assert_eq!(judged(Some(1000), None, asked(0, 99)), Unreadable);
        assert_eq!(judged(None, None, asked(100, 199)), Unreadable);
        assert_eq!(
            judged(Some(100), Some("bytes 1-100/1000"), asked(0, 99)),
            Unreadable
        );
        assert_eq!(
            judged(Some(7), Some("bytes 0-99/1000"), asked(0, 99)),
            Unreadable
        );
        assert_eq!(judged(Some(100), Some("bytes x"), asked(0, 99)), Unreadable);
    }
}
