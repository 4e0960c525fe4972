//! Upload spooling: each file part is written to an unnamed temp file (O_TMPFILE on Linux),
//! one per request that its files share ([`RequestFile`]), while its size is counted and its
//! sha256 computed (or, see [`Hashing`], left to whoever reads it back). The kernel removes
//! the file when the last handle closes, so no path ever exists to leak — not on an error,
//! not on a panic, not on SIGKILL.
//!
//! A small upload never reaches the disk: its files are kept in memory, within a
//! [`MemoryBudget`] the request reserves from the replica's total ([`SpoolMemory`]), and only
//! a file that outgrows the budget gets a temp file. Such a file then skips the file's
//! creation and its blocking-thread hops (writes and a read back), goes into
//! Postgres as one INSERT parameter instead of a COPY (which costs Postgres about twice the
//! CPU for the same row), and still stages while the spool folder is full.

use std::{
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock,
    },
};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::{digest::Digester, metrics::metrics};

/// Chunk size for reading a spool back (into Postgres or S3).
pub const READ_CHUNK: usize = 128 * 1024;

/// Upload bodies up to this size keep their files in memory, by default
/// (`SPOOL_MEMORY_PER_REQUEST`): 1 MiB files with their multipart framing.
pub const MEMORY_PER_REQUEST: usize = 2 * 1024 * 1024;

/// The most `SPOOL_MEMORY_PER_REQUEST` may be.
pub const MEMORY_PER_REQUEST_MAX: usize = 16 * 1024 * 1024;

/// File bytes all upload requests of a replica may keep in memory at once, by default
/// (`SPOOL_MEMORY_TOTAL`).
pub const MEMORY_TOTAL: usize = 16 * 1024 * 1024;

/// The replica's spool memory: what each request may reserve, out of what total.
#[derive(Clone)]
pub struct SpoolMemory {
    per_request: usize,
    total: Arc<Semaphore>,
}

impl SpoolMemory {
    pub fn new(per_request: usize, total: usize) -> Self {
        SpoolMemory {
            per_request: per_request.min(MEMORY_PER_REQUEST_MAX),
            total: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
        }
    }

    /// The memory an upload request may spool into. A body of known length (`Content-Length`)
    /// reserves exactly that when it is at most the per-request size, and nothing when it is
    /// larger (its files go to disk from their first byte); a body of unknown length reserves
    /// the per-request size and spills what outgrows it. Never waits: with the total taken, a
    /// request spools to disk.
    pub fn reserve(&self, body_len: Option<u64>) -> MemoryBudget {
        let want = match body_len {
            Some(len) if len <= self.per_request as u64 => len as usize,
            Some(_) => return MemoryBudget::default(),
            None => self.per_request,
        };
        if want == 0 {
            return MemoryBudget::default();
        }
        match self.total.clone().try_acquire_many_owned(want as u32) {
            Ok(permit) => {
                metrics().spool_memory_reserved.add(want as i64);
                MemoryBudget {
                    left: want,
                    reservation: Some(Arc::new(Reservation(permit))),
                }
            }
            Err(_) => MemoryBudget::default(),
        }
    }

    /// Bytes of the total not reserved by a request now.
    #[cfg(test)]
    fn available(&self) -> usize {
        self.total.available_permits()
    }
}

/// A request's share of the replica's spool memory, counted in `spool_memory_reserved_bytes`.
struct Reservation(OwnedSemaphorePermit);

impl Drop for Reservation {
    fn drop(&mut self) {
        metrics()
            .spool_memory_reserved
            .sub(self.0.num_permits() as i64);
    }
}

/// Memory one request may still spool into. Its reservation returns to the replica's total
/// when the budget and every file spooled into it are gone.
#[derive(Clone, Default)]
pub struct MemoryBudget {
    left: usize,
    reservation: Option<Arc<Reservation>>,
}

impl MemoryBudget {
    /// A budget of `bytes`, not counted against any total (a single copy, e.g. the backfill).
    pub fn unreserved(bytes: usize) -> Self {
        MemoryBudget {
            left: bytes,
            reservation: None,
        }
    }

    /// Nothing is left: files go to disk from their first byte.
    pub fn is_empty(&self) -> bool {
        self.left == 0
    }

    /// Takes what a finished file holds in memory out of what is left.
    pub fn spend(&mut self, spool: &Spool) {
        self.left -= spool.memory_bytes();
    }
}

pub struct SpoolWriter {
    dir: PathBuf,
    /// The request's file this one's bytes go to when they spill, if it shares one.
    shared: Option<RequestFile>,
    /// Where this file's bytes start in its temp file (0 unless it is shared).
    base: u64,
    /// Set once the file's space is given back: shared with every reader of it.
    given_back: Arc<AtomicBool>,
    /// The bytes so far while they fit in the budget; empty once spilled to `file`.
    memory: BytesMut,
    budget: MemoryBudget,
    file: Option<Arc<File>>,
    /// Bytes written so far.
    len: u64,
    /// Bytes for the file not yet handed to the blocking thread. A copy, not the chunks: a
    /// client sending one-byte chunks must not make a batch hold a buffer per byte.
    batch: Vec<u8>,
    /// Where the batch goes in the file.
    offset: u64,
    /// What memory held when the file was created, written with the next batch.
    held: Option<Bytes>,
    job: Job,
    hashing: Hashing,
    /// Shared with the finished [`Spool`] and with a [`Tail`] that records it.
    sha256: Arc<OnceLock<[u8; 32]>>,
    /// Told what the file holds, for a [`Tail`] ([`SpoolWriter::followed`]).
    written: Option<Arc<watch::Sender<Written>>>,
}

/// When a spooled file's sha256 is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hashing {
    /// As its bytes arrive: a PUT after the receive sends the digest first (and the
    /// backfill's copy is checked against its row before its PUT).
    OnReceive,
    /// As its bytes arrive while they are in memory; once they go to a file, when the file is
    /// read back ([`Spool::sha256`]): after a COPY into Postgres has sent it, while the server
    /// stores the row (the digest is set by a statement of its own before the commit), or by
    /// an S3 PUT that runs alongside the receive (a SHA-256 trailer). Hashing a large file
    /// then holds up nothing: it is not in the receive (here 20 MiB took 31-34 ms to receive
    /// with it, 18-20 without), and it is not in the COPY's send either.
    OnReadBack,
}

/// Bytes for a file are written (and hashed, with [`Hashing::OnReceive`]) on a blocking
/// thread, this many at a time, while the request goes on receiving the next ones.
const BATCH: usize = 128 * 1024;

/// What one write on the blocking thread takes: the batch, or a chunk as it came (with the
/// batch's buffer, handed back for the next batch).
enum Out {
    Batch(Vec<u8>),
    Whole(Bytes, Vec<u8>),
}

impl Out {
    fn bytes(&self) -> &[u8] {
        match self {
            Out::Batch(batch) => batch,
            Out::Whole(chunk, _) => chunk,
        }
    }

    fn into_spare(self) -> Vec<u8> {
        match self {
            Out::Batch(batch) | Out::Whole(_, batch) => batch,
        }
    }
}

/// The write of the last batch, and the digest of every byte before the current batch.
enum Job {
    /// Nothing in flight.
    Idle { digest: Digester, spare: Vec<u8> },
    /// A batch being written (and hashed); it hands back its buffer for the next one.
    Busy(tokio::task::JoinHandle<(Digester, Vec<u8>, io::Result<()>)>),
    /// While [`SpoolWriter::settle`] waits, and after a batch failed (reported once).
    Failed,
}

impl SpoolWriter {
    /// A spool for one file that keeps its bytes in memory while they fit in `budget`; a
    /// larger file goes to an unnamed temp file in `dir`, created when the bytes outgrow it.
    pub fn create(dir: &Path, budget: MemoryBudget) -> Self {
        Self {
            dir: dir.to_path_buf(),
            shared: None,
            base: 0,
            given_back: Arc::new(AtomicBool::new(false)),
            memory: BytesMut::new(),
            budget,
            file: None,
            len: 0,
            batch: Vec::new(),
            offset: 0,
            held: None,
            job: Job::Idle {
                digest: Digester::default(),
                spare: Vec::new(),
            },
            hashing: Hashing::OnReceive,
            sha256: Arc::new(OnceLock::new()),
            written: None,
        }
    }

    /// A spool on disk from its first byte, in the request's temp file, whose bytes a
    /// [`Tail`] reads while they are written, for a file expected to be `size` bytes long.
    /// (A file of its own each, a wrong guess of which part is the last kept one open per
    /// part until the commit: a review's find.)
    pub fn followed(dir: &Path, size: u64, request: &RequestFile) -> io::Result<(Self, Tail)> {
        let (file, base) = request.region(dir)?;
        let (tx, rx) = watch::channel(Written::default());
        let mut writer = Self::create(dir, MemoryBudget::default()).sharing(request);
        writer.file = Some(file.clone());
        writer.base = base;
        writer.written = Some(Arc::new(tx));
        let tail = Tail {
            region: writer.region(file),
            written: rx,
            sha256: writer.sha256.clone(),
            size,
            released: Arc::new(AtomicBool::new(false)),
        };
        Ok((writer, tail))
    }

    /// Where `file` (this writer's) holds its bytes.
    fn region(&self, file: Arc<File>) -> Region {
        Region {
            file,
            base: self.base,
            shared: self.shared.is_some(),
            given_back: self.given_back.clone(),
        }
    }

    /// The same writer, spilling to the request's one temp file (see [`RequestFile`]).
    pub fn sharing(self, request: &RequestFile) -> Self {
        let mut writer = self;
        writer.shared = Some(request.clone());
        writer
    }

    /// The same writer, hashing as `hashing` says.
    pub fn hashing(self, hashing: Hashing) -> Self {
        let mut writer = self;
        writer.hashing = hashing;
        writer
    }

    pub fn size(&self) -> u64 {
        self.len
    }

    /// Appends a chunk. A failure to write the file may be reported by a later call.
    pub async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        self.len += chunk.len() as u64;
        if self.file.is_none() && self.memory.len() + chunk.len() <= self.budget.left {
            if self.memory.capacity() == 0 {
                // The whole budget at once: a budget from Content-Length is what the body
                // holds, and only the pages written count (no regrowth, no copies). From the
                // upload arena, which keeps a freed buffer's pages for the next upload.
                let size = self.budget.left;
                crate::arena::big_block(size, || self.memory.reserve(size));
            }
            // Nothing is in flight before the spool has a file.
            debug_assert!(matches!(self.job, Job::Idle { .. }));
            if let Job::Idle { digest, .. } = &mut self.job {
                digest.update(&chunk);
            }
            self.memory.extend_from_slice(&chunk);
            return Ok(());
        }
        if self.file.is_none() {
            self.spill()?;
        }
        // A batch never outgrows BATCH (its buffer is reused from batch to batch, and a
        // grown one would stay grown); a chunk of a batch's size or more goes as it came, no
        // copy: it holds at most the read buffer it is part of.
        if !self.batch.is_empty() && self.batch.len() + chunk.len() > BATCH {
            self.dispatch(None).await?;
        }
        if chunk.len() >= BATCH {
            return self.dispatch(Some(chunk)).await;
        }
        if self.batch.capacity() == 0 {
            self.batch.reserve_exact(BATCH);
        }
        self.batch.extend_from_slice(&chunk);
        // What memory held goes to the file at once: the budget it came from is free again.
        if self.batch.len() >= BATCH || self.held.is_some() {
            self.dispatch(None).await?;
        }
        Ok(())
    }

    /// A new temp file, which takes every later byte, and what memory held so far (written
    /// to it first). The budget goes back: this file no longer holds memory.
    fn spill(&mut self) -> io::Result<()> {
        let (file, base) = match &self.shared {
            Some(request) => request.region(&self.dir)?,
            None => (Arc::new(tempfile::tempfile_in(&self.dir)?), 0),
        };
        self.file = Some(file);
        self.base = base;
        self.budget = MemoryBudget::default();
        let held = std::mem::take(&mut self.memory).freeze();
        self.offset = held.len() as u64;
        self.held = (!held.is_empty()).then_some(held);
        Ok(())
    }

    /// Hands the batch, or `whole` (a chunk as it came, when the batch is empty), to a
    /// blocking thread once the one before it is done: one write is in flight while the next
    /// bytes are received.
    async fn dispatch(&mut self, whole: Option<Bytes>) -> io::Result<()> {
        let Some(file) = self.file.clone() else {
            return Ok(());
        };
        debug_assert!(whole.is_none() || self.batch.is_empty());
        if self.batch.is_empty() && self.held.is_none() && whole.is_none() {
            return Ok(());
        }
        let (mut digest, mut spare) = self.settle().await?;
        let out = match whole {
            Some(chunk) => Out::Whole(chunk, spare),
            None => {
                spare.clear();
                Out::Batch(std::mem::replace(&mut self.batch, spare))
            }
        };
        let (held, offset, base) = (self.held.take(), self.offset, self.base);
        self.offset += out.bytes().len() as u64;
        if let Some(request) = &self.shared {
            // Taken from now on, written or not: the next file starts after it.
            request.taken_to(base + self.offset);
        }
        let hash = self.hashing == Hashing::OnReceive;
        let told = self.written.clone();
        self.job = Job::Busy(tokio::task::spawn_blocking(move || {
            let bytes = out.bytes();
            let written = match held {
                Some(held) => file.write_all_at(&held, base),
                None => Ok(()),
            }
            .and_then(|()| file.write_all_at(bytes, base + offset));
            if let (Some(told), Ok(())) = (&told, &written) {
                told.send_modify(|w| w.bytes = offset + bytes.len() as u64);
            }
            if hash {
                digest.update(bytes);
            }
            (digest, out.into_spare(), written)
        }));
        Ok(())
    }

    /// The digest of every dispatched byte and a buffer for the next batch, once the last
    /// batch is written.
    async fn settle(&mut self) -> io::Result<(Digester, Vec<u8>)> {
        match std::mem::replace(&mut self.job, Job::Failed) {
            Job::Idle { digest, spare } => Ok((digest, spare)),
            Job::Busy(job) => {
                let (digest, spare, written) = job.await.map_err(io::Error::other)?;
                written.map(|()| (digest, spare))
            }
            Job::Failed => Err(io::Error::other("the spool failed earlier")),
        }
    }

    /// Closes the file once its last batch is done (the kernel frees an unnamed file with
    /// its last descriptor), its space given back at once ([`Drop`]).
    pub async fn discard(mut self) {
        let _ = self.settle().await;
    }

    pub async fn finish(mut self) -> io::Result<Spool> {
        self.dispatch(None).await?;
        let (digest, _) = self.settle().await?;
        let sha256 = self.sha256.clone();
        if self.file.is_none() || self.hashing == Hashing::OnReceive {
            let _ = sha256.set(digest.finish());
        }
        if let Some(told) = &self.written {
            told.send_modify(|w| w.end = Some(self.len));
        }
        let backing = match self.file.take() {
            Some(file) => Backing::File(self.region(file)),
            None => Backing::Memory {
                // A file much smaller than the capacity reserved for it keeps only its size:
                // the next file of the request reserves what is left again.
                bytes: match self.memory.capacity() > 2 * self.memory.len() {
                    true => Bytes::copy_from_slice(&self.memory),
                    false => std::mem::take(&mut self.memory).freeze(),
                },
                _reservation: self.budget.reservation.take(),
            },
        };
        Ok(Spool {
            backing,
            size: self.len,
            sha256,
        })
    }
}

/// A file never finished (its part failed, or its request went): its space is given back now,
/// as [`Spool::release_disk`] does for a finished one. A PUT reading it alongside the receive
/// may hold the file open long after (S3 frozen), and with it the space.
impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            self.region(file).give_back(self.offset);
        }
    }
}

/// The one unnamed temp file that the files of a request that spill to disk share, each in
/// a region of its own after the one before (the parts of a request arrive one after
/// another). A file each held a descriptor each until the commit: 64 files a request, and
/// with 16 such uploads one client held 1,040 descriptors, where the open-file check counted
/// two an upload (a red team ran a replica out of them below MAX_CONNECTIONS: accepts failed).
#[derive(Clone, Default)]
pub struct RequestFile(Arc<Mutex<Option<Shared>>>);

/// The shared file, and where the next region starts.
type Shared = (Arc<File>, u64);

impl RequestFile {
    /// The file, created in `dir` at its first use, and where the next region starts: at a
    /// block's start, so that freeing a region frees its last block too and never touches the
    /// next region's first (a partial block is only zeroed).
    fn region(&self, dir: &Path) -> io::Result<(Arc<File>, u64)> {
        let mut shared = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (file, end) = match shared.as_ref() {
            Some(known) => known.clone(),
            None => shared
                .insert((Arc::new(tempfile::tempfile_in(dir)?), 0))
                .clone(),
        };
        Ok((file, end.next_multiple_of(REGION_ALIGN)))
    }

    /// A region reaches `end`: the next one starts there.
    fn taken_to(&self, end: u64) {
        let mut shared = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, next)) = shared.as_mut() {
            *next = (*next).max(end);
        }
    }
}

/// Regions of a shared spool file start at a multiple of this (the file systems' block).
const REGION_ALIGN: u64 = 4096;

/// Where a spooled file's bytes are: its temp file, from `base` on.
#[derive(Clone)]
struct Region {
    file: Arc<File>,
    base: u64,
    /// The file holds other files of the request too.
    shared: bool,
    /// Set before the space goes: a read that ends after it fails, as a short read of a
    /// file emptied did (a PUT given up on must not write what a freed region reads as).
    given_back: Arc<AtomicBool>,
}

impl Region {
    /// `buf.len()` bytes from `offset` in the region (blocking).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, self.base + offset)?;
        self.still_held()
    }

    /// Bytes just read are the file's only while its space was not given back: a freed
    /// region reads as zeros.
    fn still_held(&self) -> io::Result<()> {
        match self.given_back.load(Ordering::SeqCst) {
            true => Err(io::Error::other("the spooled file was given back")),
            false => Ok(()),
        }
    }

    /// As many of `buf.len()` bytes from `offset` as the page cache holds, without blocking
    /// (`preadv2` with `RWF_NOWAIT`): none when a read would wait on the disk.
    #[cfg(target_os = "linux")]
    fn read_cached_at(&self, buf: &mut [u8], offset: u64) -> usize {
        use std::os::fd::AsRawFd;
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let Ok(at) = libc::off_t::try_from(self.base + offset) else {
            return 0;
        };
        // SAFETY: `iov` describes `buf`, which outlives the call; the descriptor is the
        // region's file, which `self.file` keeps open.
        let read = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
        usize::try_from(read).unwrap_or(0).min(buf.len())
    }

    #[cfg(not(target_os = "linux"))]
    fn read_cached_at(&self, _buf: &mut [u8], _offset: u64) -> usize {
        0
    }

    /// The sha256 of the region's first `size` bytes (blocking). A region given back
    /// meanwhile fails the next read, so a hash nobody waits for any more stops there.
    fn sha256(&self, size: u64) -> io::Result<[u8; 32]> {
        let mut d = Digester::default();
        let mut buf = vec![0u8; READ_CHUNK];
        let mut at = 0;
        while at < size {
            let len = READ_CHUNK.min((size - at) as usize);
            self.read_exact_at(&mut buf[..len], at)?;
            d.update(&buf[..len]);
            at += len as u64;
        }
        Ok(d.finish())
    }

    /// Gives the disk space of the region's first `len` bytes back, and fails every read of
    /// it that ends from now on. A file of its own is emptied; a shared one has the region's
    /// blocks freed (`FALLOC_FL_PUNCH_HOLE`), where the file system can, else they go when
    /// the request's last file does.
    fn give_back(&self, len: u64) {
        self.given_back.store(true, Ordering::SeqCst);
        if !self.shared {
            let _ = self.file.set_len(0);
            return;
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // To the region's last block's end: the next region starts no earlier.
            let len = len.next_multiple_of(REGION_ALIGN);
            let (Ok(base), Ok(len)) = (i64::try_from(self.base), i64::try_from(len)) else {
                return;
            };
            // SAFETY: fallocate(2) on a descriptor `self.file` keeps open; no memory passed.
            unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    base,
                    len,
                );
            }
        }
    }
}

/// What a followed spool's file holds so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Written {
    /// Bytes written to the file.
    bytes: u64,
    /// The file's size, once the writer finished.
    end: Option<u64>,
}

/// Reads a spool's file while it is written ([`SpoolWriter::followed`]): an S3 PUT that
/// starts with the receive, instead of after it.
#[derive(Clone)]
pub struct Tail {
    region: Region,
    written: watch::Receiver<Written>,
    sha256: Arc<OnceLock<[u8; 32]>>,
    /// The size the file is expected to have.
    pub size: u64,
    /// Set once a reader was given the last byte: from then on the PUT may have written an
    /// object, whatever its caller hears.
    released: Arc<AtomicBool>,
}

impl Tail {
    /// The file's bytes from the start, as they are written. The last byte comes only once
    /// the writer finished at exactly [`size`](Self::size), so a reader that took `size`
    /// bytes has the whole file; the stream fails when the writer failed, went, or finished
    /// at another size. `waiting` is told when the reader starts and stops waiting on the
    /// writer.
    pub fn chunks(
        &self,
        waiting: Arc<dyn Fn(bool) + Send + Sync>,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let (region, size) = (self.region.clone(), self.size);
        let start = (0u64, self.written.clone(), Buffers::default());
        let released = self.released.clone();
        futures::stream::try_unfold(start, move |(at, mut written, buffers)| {
            let (region, waiting, released) = (region.clone(), waiting.clone(), released.clone());
            async move {
                let Some(until) = next_ready(at, size, &mut written, &*waiting).await? else {
                    return Ok(None);
                };
                if until == size {
                    released.store(true, Ordering::Relaxed);
                }
                let len = READ_CHUNK.min((until - at) as usize);
                let chunk = read_at(&region, &buffers, at, len).await?;
                Ok(Some((chunk, (at + len as u64, written, buffers))))
            }
        })
    }

    /// Records the file's digest, computed by its reader.
    pub fn record_sha256(&self, sha256: [u8; 32]) {
        let _ = self.sha256.set(sha256);
    }

    /// Whether a reader was given the last byte (see `released`).
    pub fn released(&self) -> Arc<AtomicBool> {
        self.released.clone()
    }
}

/// How far a [`Tail`] reader at `at` may read: `None` at the end, an error when the file will
/// not be what was expected.
async fn next_ready(
    at: u64,
    size: u64,
    written: &mut watch::Receiver<Written>,
    waiting: &(dyn Fn(bool) + Send + Sync),
) -> io::Result<Option<u64>> {
    if at == size {
        return Ok(None);
    }
    // Told once the wait ends, however it ends (bytes, an error, the reader dropped): a PUT's
    // watchdog must not stay blind to the server after the client is done.
    let mut wait: Option<WaitGuard<'_>> = None;
    loop {
        let now = *written.borrow_and_update();
        match now.end {
            Some(end) if end == size => return Ok(Some(size)),
            Some(end) => {
                return Err(io::Error::other(format!(
                    "the file is {end} bytes, not the {size} foreseen"
                )))
            }
            None => {}
        }
        // Held back: the last byte, until the file is known to end there.
        let until = now.bytes.min(size - 1);
        if until > at {
            return Ok(Some(until));
        }
        if wait.is_none() {
            waiting(true);
            wait = Some(WaitGuard(waiting));
        }
        if written.changed().await.is_err() && written.borrow().end.is_none() {
            return Err(io::Error::other("the spool was not finished"));
        }
    }
}

struct WaitGuard<'a>(&'a (dyn Fn(bool) + Send + Sync));

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        (self.0)(false);
    }
}

#[derive(Clone)]
enum Backing {
    Memory {
        bytes: Bytes,
        /// Held while the bytes are: the request's share of the replica's spool memory.
        _reservation: Option<Arc<Reservation>>,
    },
    File(Region),
}

/// A fully received file: its bytes (on disk, or in memory when small), its size and digest.
/// Clones share the bytes.
#[derive(Clone)]
pub struct Spool {
    backing: Backing,
    pub size: u64,
    /// Known once computed: as the bytes arrived, or when they were read back.
    sha256: Arc<OnceLock<[u8; 32]>>,
}

impl Spool {
    /// The sha256, when it is known already (see [`Hashing`]).
    pub fn known_sha256(&self) -> Option<[u8; 32]> {
        self.sha256.get().copied()
    }

    /// Records the sha256 of the bytes, computed by a reader that read them all back.
    pub(crate) fn record_sha256(&self, sha256: [u8; 32]) {
        let _ = self.sha256.set(sha256);
    }

    /// The sha256, read back from the file when it is not known yet: on one blocking thread
    /// into one buffer (a chunk stream's thread hop and buffer per 128 KiB cost a 100 MB
    /// upload's COPY ~10 % more service CPU when it hashed the file once more).
    pub async fn sha256(&self) -> io::Result<[u8; 32]> {
        if let Some(known) = self.known_sha256() {
            return Ok(known);
        }
        let sha256 = match &self.backing {
            Backing::Memory { bytes, .. } => {
                let mut d = Digester::default();
                d.update(bytes);
                d.finish()
            }
            Backing::File(region) => {
                let (region, size) = (region.clone(), self.size);
                tokio::task::spawn_blocking(move || region.sha256(size))
                    .await
                    .map_err(io::Error::other)??
            }
        };
        self.record_sha256(sha256);
        Ok(sha256)
    }

    /// Bytes of this file held in memory (0 when it is on disk).
    pub fn memory_bytes(&self) -> usize {
        self.in_memory().map_or(0, Bytes::len)
    }

    /// Gives a spool file's disk space back now, whoever still holds the file: a PUT to a
    /// frozen S3 that the upload gave up on keeps its reader, and so the unnamed file, open
    /// until its connection dies, which could be long after the 503 (a black-box probe saw
    /// the spool disk fill up that way: every retry pinned another file). A reader left
    /// then fails ([`Region::give_back`]). Called when the request is done with the file.
    pub fn release_disk(&self) {
        if let Backing::File(region) = &self.backing {
            region.give_back(self.size);
        }
    }

    /// The bytes, when the file is held in memory.
    pub fn in_memory(&self) -> Option<&Bytes> {
        match &self.backing {
            Backing::Memory { bytes, .. } => Some(bytes),
            Backing::File(_) => None,
        }
    }

    /// The whole file (callers bound its size: files in memory, or small ones on disk).
    pub async fn read_all(&self) -> io::Result<Bytes> {
        let file = match &self.backing {
            Backing::Memory { bytes, .. } => return Ok(bytes.clone()),
            Backing::File(region) => region.clone(),
        };
        let size = usize::try_from(self.size).map_err(io::Error::other)?;
        let hash = self.known_sha256().is_none();
        let (whole, sha256) = tokio::task::spawn_blocking(move || {
            let mut whole = vec![0u8; size];
            file.read_exact_at(&mut whole, 0)?;
            // Read whole anyway: its digest, when not known yet, without reading it again.
            let sha256 = hash.then(|| {
                let mut d = Digester::default();
                d.update(&whole);
                d.finish()
            });
            Ok::<_, io::Error>((whole, sha256))
        })
        .await
        .map_err(io::Error::other)??;
        if let Some(sha256) = sha256 {
            self.record_sha256(sha256);
        }
        Ok(Bytes::from(whole))
    }

    /// The bytes from the start, in chunks. Each call is an independent reader (positional
    /// reads), so a retried S3 PUT can simply read again.
    pub fn chunks(&self) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        self.read_chunks(1)
    }

    /// [`chunks`](Self::chunks) with the next chunk read while the current one is sent: a
    /// COPY into Postgres then does not wait a disk read between chunks
    /// (1 MiB rows: mean COPY 9.6 → 8.5 ms). S3 PUTs do not use it: there the extra chunk in
    /// flight cost 4 MiB of peak RSS with 16 uploads and LocalStack sets the pace.
    pub fn chunks_ahead(&self) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        self.read_chunks(2)
    }

    fn read_chunks(
        &self,
        in_flight: usize,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let size = self.size;
        let file = match &self.backing {
            Backing::Memory { bytes, .. } => {
                let bytes = bytes.clone();
                let slices = (0..bytes.len()).step_by(READ_CHUNK).map(move |offset| {
                    Ok(bytes.slice(offset..bytes.len().min(offset + READ_CHUNK)))
                });
                return futures::stream::iter(slices).left_stream();
            }
            Backing::File(region) => region.clone(),
        };
        let buffers = Buffers::default();
        futures::stream::iter((0..size).step_by(READ_CHUNK))
            .map(move |offset| {
                let (region, buffers) = (file.clone(), buffers.clone());
                let len = READ_CHUNK.min((size - offset) as usize);
                async move { read_at(&region, &buffers, offset, len).await }
            })
            .buffered(in_flight)
            .right_stream()
    }
}

/// `len` bytes of `region` from `offset`, into one of `buffers`: on the caller's thread what
/// the page cache holds (a file just spooled, as a rule), the rest on a blocking thread. Every
/// chunk went through the blocking pool before: two context switches per 128 KiB, half of the
/// service's switches on 20 MiB uploads (20 MiB × 8 with `hey`, three alternating runs: 15–17
/// switches per MiB against 30–38, 2.33–2.57 ms of CPU per MiB against 2.49–2.74).
async fn read_at(region: &Region, buffers: &Buffers, offset: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = buffers.take();
    let cached = region.read_cached_at(&mut buf[..len], offset);
    let buf = if cached == len {
        region.still_held()?;
        buf
    } else {
        let region = region.clone();
        tokio::task::spawn_blocking(move || {
            region.read_exact_at(&mut buf[cached..len], offset + cached as u64)?;
            Ok::<_, io::Error>(buf)
        })
        .await
        .map_err(io::Error::other)??
    };
    Ok(Bytes::from_owner(Chunk {
        buf,
        len,
        home: buffers.clone(),
    }))
}

/// The read buffers of one reader of a spool, used in turn: a chunk's buffer comes back when
/// the chunk is dropped (sent on), so reading a file back allocates a few buffers, not one per
/// chunk. A fresh buffer per chunk went back to the kernel when freed (`madvise`, which flushes
/// the TLB of every CPU) and was faulted in again for the next: 763 `madvise` calls per
/// 100 MB upload.
#[derive(Clone, Default)]
struct Buffers(Arc<Mutex<Vec<Vec<u8>>>>);

/// Buffers a reader keeps for reuse: the chunks in flight, and the one being sent.
const BUFFERS_KEPT: usize = 3;

impl Buffers {
    fn take(&self) -> Vec<u8> {
        let kept = self.0.lock().ok().and_then(|mut kept| kept.pop());
        kept.unwrap_or_else(|| vec![0u8; READ_CHUNK])
    }

    fn give_back(&self, buf: Vec<u8>) {
        if let Ok(mut kept) = self.0.lock() {
            if kept.len() < BUFFERS_KEPT {
                kept.push(buf);
            }
        }
    }
}

/// A chunk read back, in one of its reader's [`Buffers`].
struct Chunk {
    buf: Vec<u8>,
    len: usize,
    home: Buffers,
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.home.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use sha2::{Digest, Sha256};

    const BUDGET: usize = 64 * 1024;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    async fn spooled(dir: &Path, budget: MemoryBudget, data: &[u8]) -> io::Result<Spool> {
        let mut w = SpoolWriter::create(dir, budget);
        for part in data.chunks(1000) {
            w.write(Bytes::copy_from_slice(part)).await?;
        }
        let spool = w.finish().await?;
        let want = <[u8; 32]>::from(Sha256::digest(data));
        assert_eq!(spool.known_sha256(), Some(want), "hashed as received");
        Ok(spool)
    }

    /// Files of one request share its temp file, each in its own region: each reads back as
    /// written (one that began in memory too), one given back leaves the others whole, and
    /// the file's blocks go with it.
    #[tokio::test]
    async fn a_requests_files_share_one_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let request = RequestFile::default();
        let sizes = [300_000, 1, BUDGET / 2 + 5_000, 200_000];
        let mut spools = Vec::new();
        for (i, size) in sizes.into_iter().enumerate() {
            let budget = match i {
                2 => MemoryBudget::unreserved(BUDGET / 2),
                _ => MemoryBudget::default(),
            };
            let mut w = SpoolWriter::create(dir.path(), budget).sharing(&request);
            let bytes: Vec<u8> = data(size).iter().map(|b| b ^ i as u8).collect();
            for part in bytes.chunks(7_000) {
                w.write(Bytes::copy_from_slice(part)).await.unwrap();
            }
            spools.push((w.finish().await.unwrap(), bytes));
        }
        let file = match &spools[0].0.backing {
            Backing::File(region) => region.file.clone(),
            Backing::Memory { .. } => panic!("on disk"),
        };
        for (spool, bytes) in &spools {
            match &spool.backing {
                Backing::File(region) => assert!(Arc::ptr_eq(&region.file, &file)),
                Backing::Memory { .. } => panic!("on disk"),
            }
            assert_reads_back(spool, bytes, bytes.len().div_ceil(READ_CHUNK)).await;
        }
        use std::os::unix::fs::MetadataExt;
        let blocks = file.metadata().unwrap().blocks();
        spools[0].0.release_disk();
        assert!(
            file.metadata().unwrap().blocks() < blocks,
            "the region's blocks went"
        );
        // A reader left of a file given back fails, as one of an emptied file did (it
        // would read zeros from the freed region).
        assert!(spools[0].0.read_all().await.is_err());
        let left: Vec<io::Result<Bytes>> = spools[0].0.chunks().collect().await;
        assert!(left.iter().any(Result::is_err));
        for (spool, bytes) in &spools[1..] {
            assert_eq!(spool.read_all().await.unwrap(), bytes[..]);
        }
    }

    /// Reads back the same bytes, in `chunks` chunks, through every reader, twice.
    async fn assert_reads_back(spool: &Spool, data: &[u8], chunks: usize) {
        assert_eq!(spool.size, data.len() as u64);
        assert_eq!(
            spool.sha256().await.unwrap(),
            <[u8; 32]>::from(Sha256::digest(data))
        );
        for _ in 0..2 {
            let back: Vec<Bytes> = spool.chunks().try_collect().await.unwrap();
            assert_eq!(back.len(), chunks);
            assert_eq!(back.concat(), data);
        }
        let ahead: Vec<Bytes> = spool.chunks_ahead().try_collect().await.unwrap();
        assert_eq!(ahead.len(), chunks);
        assert_eq!(ahead.concat(), data);
        assert_eq!(spool.read_all().await.unwrap(), data);
    }

    /// A file the page cache holds reads back on the reader's thread: with the runtime's one
    /// blocking thread taken, a file just spooled to disk still reads back whole, through
    /// each reader that goes by chunks (each chunk waited for that thread before).
    #[test]
    fn a_cached_file_reads_back_without_the_blocking_pool() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(1)
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let bytes = data(3 * READ_CHUNK + 5);
            let spool = spooled(dir.path(), MemoryBudget::default(), &bytes)
                .await
                .unwrap();
            assert!(matches!(spool.backing, Backing::File(_)), "on disk");
            let (release, taken) = std::sync::mpsc::channel::<()>();
            let holder = tokio::task::spawn_blocking(move || taken.recv());
            let read = async {
                let back: Vec<Bytes> = spool.chunks().try_collect().await?;
                let ahead: Vec<Bytes> = spool.chunks_ahead().try_collect().await?;
                Ok::<_, io::Error>((back.concat(), ahead.concat()))
            };
            let read = tokio::time::timeout(std::time::Duration::from_secs(10), read).await;
            release.send(()).unwrap();
            holder.await.unwrap().unwrap();
            let (back, ahead) = read.expect("read without a blocking thread").unwrap();
            assert_eq!(back, bytes);
            assert_eq!(ahead, bytes);
        });
    }

    /// A chunk's buffer goes back to its reader when the chunk is dropped, and the next read
    /// takes it: a file read back reuses a few buffers whatever its size.
    #[tokio::test]
    async fn a_readers_buffers_come_back_with_its_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let data = data(READ_CHUNK * 5 + 3);
        let spool = spooled(dir.path(), MemoryBudget::default(), &data)
            .await
            .unwrap();
        let buffers = Buffers::default();
        let first = buffers.take();
        let at = first.as_ptr();
        drop(Bytes::from_owner(Chunk {
            buf: first,
            len: 7,
            home: buffers.clone(),
        }));
        let again = buffers.take();
        assert_eq!(again.as_ptr(), at, "the dropped chunk's buffer is reused");
        for _ in 0..BUFFERS_KEPT + 2 {
            buffers.give_back(vec![0; READ_CHUNK]);
        }
        assert_eq!(
            buffers.0.lock().unwrap().len(),
            BUFFERS_KEPT,
            "and only a few are kept"
        );
        // one chunk at a time: the same buffer, whatever the file's size
        let mut seen = std::collections::HashSet::new();
        let mut chunks = std::pin::pin!(spool.chunks());
        while let Some(chunk) = chunks.try_next().await.unwrap() {
            seen.insert(chunk.as_ptr());
        }
        assert_eq!(seen.len(), 1, "{seen:?}");
    }

    #[tokio::test]
    async fn on_disk_roundtrip_and_digest() {
        let dir = tempfile::tempdir().unwrap();
        let data = data(READ_CHUNK * 2 + 17);
        let spool = spooled(dir.path(), MemoryBudget::unreserved(BUDGET), &data)
            .await
            .unwrap();
        assert_eq!(spool.memory_bytes(), 0);
        assert!(spool.in_memory().is_none());
        assert_reads_back(&spool, &data, 3).await;
        // nothing is ever visible in the spool folder
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// Chunks as hyper hands them on (up to its 256 KiB read buffer) of a batch or more go to
    /// the file as they came, and the batch buffer never grows past a batch. It used to take
    /// every chunk and grow to twice the largest, with two such buffers per upload: 16 uploads
    /// of 20 MiB at once peaked 7-8 MiB higher. A spill from memory still goes first.
    #[tokio::test]
    async fn large_chunks_go_as_they_came_and_batches_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [1000, BATCH + 7, 200 * 1024, 17, BATCH - 1, 256 * 1024, 5];
        for budget in [0, 4096] {
            let data = data(BATCH * 9);
            let mut w = SpoolWriter::create(dir.path(), MemoryBudget::unreserved(budget));
            let (mut at, mut i) = (0, 0);
            while at < data.len() {
                let n = sizes[i % sizes.len()].min(data.len() - at);
                w.write(Bytes::copy_from_slice(&data[at..at + n]))
                    .await
                    .unwrap();
                let capacity = w.batch.capacity();
                assert!(capacity <= BATCH, "the batch grew to {capacity}");
                (at, i) = (at + n, i + 1);
            }
            let spool = w.finish().await.unwrap();
            assert_eq!(spool.memory_bytes(), 0);
            let want = <[u8; 32]>::from(Sha256::digest(&data));
            assert_eq!(spool.known_sha256(), Some(want), "hashed as received");
            assert_reads_back(&spool, &data, data.len().div_ceil(READ_CHUNK)).await;
        }
    }

    /// A file on disk written with `Hashing::OnReadBack` is hashed when read back, with the
    /// same digest; a file in memory is hashed as it arrives either way.
    #[tokio::test]
    async fn a_file_on_disk_may_be_hashed_when_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let want = |data: &[u8]| <[u8; 32]>::from(Sha256::digest(data));
        for (len, budget) in [(BATCH * 3 + 5, 0), (10_500, 4096), (BATCH + 1, BATCH)] {
            let data = data(len);
            let mut w = SpoolWriter::create(dir.path(), MemoryBudget::unreserved(budget))
                .hashing(Hashing::OnReadBack);
            for part in data.chunks(1000) {
                w.write(Bytes::copy_from_slice(part)).await.unwrap();
            }
            let spool = w.finish().await.unwrap();
            assert_eq!((spool.memory_bytes(), spool.known_sha256()), (0, None));
            assert_eq!(spool.sha256().await.unwrap(), want(&data));
            assert_eq!(spool.clone().known_sha256(), Some(want(&data)), "and kept");
            assert_reads_back(&spool, &data, len.div_ceil(READ_CHUNK)).await;
        }
        // A reader that reads the whole file back records its digest on the way.
        let whole = data(10_000);
        let mut w =
            SpoolWriter::create(dir.path(), MemoryBudget::default()).hashing(Hashing::OnReadBack);
        w.write(Bytes::copy_from_slice(&whole)).await.unwrap();
        let spool = w.finish().await.unwrap();
        assert_eq!(spool.read_all().await.unwrap(), whole);
        assert_eq!(spool.known_sha256(), Some(want(&whole)));
        let small = data(5000);
        let budget = MemoryBudget::unreserved(small.len());
        let mut w = SpoolWriter::create(dir.path(), budget).hashing(Hashing::OnReadBack);
        w.write(Bytes::copy_from_slice(&small)).await.unwrap();
        let spool = w.finish().await.unwrap();
        assert_eq!(spool.known_sha256(), Some(want(&small)));
        // A file given back before its digest was taken has none: an error, not the digest
        // of what the freed space reads as.
        let mut w =
            SpoolWriter::create(dir.path(), MemoryBudget::default()).hashing(Hashing::OnReadBack);
        w.write(Bytes::copy_from_slice(&whole)).await.unwrap();
        let spool = w.finish().await.unwrap();
        spool.release_disk();
        assert!(spool.sha256().await.is_err());
        assert_eq!(spool.known_sha256(), None);
    }

    #[tokio::test]
    async fn files_within_the_budget_stay_in_memory_and_need_no_folder() {
        let missing = Path::new("/nonexistent/pending-uploads-spool");
        let data = data(READ_CHUNK * 3 + 5);
        let budget = MemoryBudget::unreserved(data.len());
        let spool = spooled(missing, budget.clone(), &data).await.unwrap();
        assert_eq!(spool.memory_bytes(), data.len());
        assert_eq!(spool.in_memory().unwrap(), &data[..]);
        assert_reads_back(&spool, &data, 4).await;
        // one byte more than the budget needs the folder
        let over = [data.as_slice(), b"x"].concat();
        assert!(spooled(missing, budget, &over).await.is_err());
    }

    #[tokio::test]
    async fn spills_to_disk_with_what_memory_held() {
        let dir = tempfile::tempdir().unwrap();
        let data = data(10_500);
        let spool = spooled(dir.path(), MemoryBudget::unreserved(4096), &data)
            .await
            .unwrap();
        assert_eq!(spool.memory_bytes(), 0);
        assert_reads_back(&spool, &data, 1).await;
        let no_budget = spooled(dir.path(), MemoryBudget::default(), &data)
            .await
            .unwrap();
        assert_eq!(no_budget.memory_bytes(), 0);
        assert_reads_back(&no_budget, &data, 1).await;
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn requests_reserve_from_the_total_until_their_files_are_gone() {
        let memory = SpoolMemory::new(100_000, 150_000);
        let dir = tempfile::tempdir().unwrap();
        // a known length within the per-request size reserves exactly that
        let mut first = memory.reserve(Some(90_000));
        assert_eq!((first.left, memory.available()), (90_000, 60_000));
        // a longer body reserves nothing; an unknown length the per-request size, if free
        assert_eq!(memory.reserve(Some(100_001)).left, 0);
        assert_eq!(memory.reserve(None).left, 0, "only 60,000 free");
        assert_eq!(memory.reserve(Some(0)).left, 0);
        let spool = spooled(dir.path(), first.clone(), &data(50_000))
            .await
            .unwrap();
        first.spend(&spool);
        assert_eq!(first.left, 40_000);
        // the reservation returns with the budget and the last file held in it
        drop(first);
        assert_eq!(memory.available(), 60_000);
        let copy = spool.clone();
        drop(spool);
        assert_eq!(memory.available(), 60_000);
        drop(copy);
        assert_eq!(memory.available(), 150_000);
        let unknown = memory.reserve(None);
        assert_eq!((unknown.left, memory.available()), (100_000, 50_000));
        // a file that spills gives its share back at once
        let spilled = spooled(dir.path(), unknown, &data(100_001)).await.unwrap();
        assert_eq!(spilled.memory_bytes(), 0);
        assert_eq!(memory.available(), 150_000);
    }
}
