//! Inline Postgres storage: the bytes live in `pending_uploads.content`. They are written
//! with the row (see `db::uploads::insert`); reads fetch bounded slices (a range of up to
//! [`WHOLE_UP_TO`] in one, while the read-ahead budget has room), which touch only the TOAST
//! chunks they need because the column is stored uncompressed (STORAGE EXTERNAL). Each slice
//! is its own short database call: a download holds no connection between slices, however
//! slowly its client reads.

use std::{io, sync::Arc};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use super::{ByteRange, ByteStream, Location, StorageError};
use crate::db::{self, uploads::Pieces, Db};

/// Bytes per slice: bounds memory per download, beyond what the read-ahead budget lends.
pub const READ_CHUNK: u64 = 256 * 1024;

/// Slices of one download being fetched at once: one ahead of the one being sent.
const PREFETCH: usize = 2;

/// A range up to this long is read in one statement when the read-ahead budget has room (a
/// whole file of this size comes with its row): one wait instead of one per slice.
pub const WHOLE_UP_TO: u64 = 1024 * 1024;

/// A file read whole with its row comes in rows of this many bytes, which the server sends as
/// it makes them: the first goes to the client while the next is read. 1 MiB downloads, `hey`
/// against a release build of the one-row read, three interleaved runs of 5,000: at
/// concurrency 1 +12 % (662-670 against 586-617 a second), at 8 within noise (1,120-1,290
/// against 1,103-1,172); in rows of 256 KiB +14 % at 1, but -3 % at 8 (a row's cost, four
/// times over).
pub const WHOLE_PIECE: u64 = 512 * 1024;

pub struct ByteaBackend {
    db: Db,
    read_ahead: Arc<Semaphore>,
}

impl ByteaBackend {
    /// `read_ahead_bytes` (`DOWNLOAD_READ_AHEAD_BYTES`): what ranges read whole may hold at
    /// once across the replica; beyond it a download reads slices as larger ones do. A reader
    /// that stops reading holds what was read for it: without this budget, up to 1 MiB per
    /// download slot instead of a slice or two.
    pub fn new(db: Db, read_ahead_bytes: u64) -> Self {
        let kib = usize::try_from(read_ahead_bytes / 1024).unwrap_or(usize::MAX);
        ByteaBackend {
            db,
            read_ahead: Arc::new(Semaphore::new(kib.min(Semaphore::MAX_PERMITS))),
        }
    }

    /// One slice at `offset`, exactly as long as `size` says once the connection is in hand
    /// (with the read-ahead room it reads under, if any), or `None` when the row or its bytes
    /// are gone.
    async fn slice(
        db: &Db,
        file_id: Uuid,
        offset: u64,
        size: impl FnOnce() -> (u64, Option<OwnedSemaphorePermit>) + Send + 'static,
    ) -> Result<(Option<Bytes>, Option<OwnedSemaphorePermit>), StorageError> {
        let (chunk, len, reserved) = db
            .run(move |c| {
                let (len, reserved) = size();
                let read = db::uploads::read_slice(c, file_id, offset, len);
                Box::pin(async move {
                    let read = crate::arena::big_blocks(crate::arena::read_buffer(len), read);
                    Ok((read.await?, len, reserved))
                })
            })
            .await?;
        let chunk = chunk.filter(|c| c.len() as u64 == len).map(Bytes::from);
        Ok((chunk, reserved))
    }

    /// The read-ahead budget, from which a range of up to [`WHOLE_UP_TO`] read whole takes
    /// its room ([`reserve_whole`]).
    pub fn budget(&self) -> Arc<Semaphore> {
        self.read_ahead.clone()
    }

    /// Streams `range` of a row's inline bytes. Its first slice (all of it, up to
    /// [`WHOLE_UP_TO`], while the budget has room) is read before this returns: a row swept
    /// since it was looked up is `Missing` here (a 404), not a short 200.
    pub async fn open(&self, loc: &Location, range: ByteRange) -> Result<ByteStream, StorageError> {
        let count = range.byte_count();
        let budget = (count <= WHOLE_UP_TO).then(|| self.read_ahead.clone());
        let size = move || match budget.as_ref().and_then(reserve_whole) {
            Some(reserved) => (count, Some(reserved)),
            None => (READ_CHUNK.min(count), None),
        };
        let (first, reserved) = Self::slice(&self.db, loc.file_id, range.start, size).await?;
        let first = first.ok_or(StorageError::Missing)?;
        Ok(self.continue_from(loc, range, first, reserved))
    }

    /// The stream of `range` whose first slice the caller already read (with the row, or in
    /// [`ByteaBackend::open`]), with the room it was read under ([`reserve_whole`]), if any:
    /// kept for what was read when that is the whole range. The next slice is fetched while
    /// the current one is being sent ([`PREFETCH`] in flight), so a download does not wait a
    /// round trip per slice.
    pub fn continue_from(
        &self,
        loc: &Location,
        range: ByteRange,
        first: Bytes,
        reserved: Option<OwnedSemaphorePermit>,
    ) -> ByteStream {
        let start = range.start + first.len() as u64;
        let held = kept_of(reserved, range, first.len() as u64);
        let offsets = (start..=range.end).step_by(READ_CHUNK as usize);
        let (db, file_id) = (self.db.clone(), loc.file_id);
        let rest = futures::stream::iter(offsets)
            .map(move |offset| {
                let db = db.clone();
                let len = READ_CHUNK.min(range.end - offset + 1);
                async move {
                    match Self::slice(&db, file_id, offset, move || (len, None)).await {
                        Ok((Some(chunk), _)) => Ok(chunk),
                        // Swept (or released) mid-stream: end with an error so the client sees
                        // a truncated transfer, never wrong bytes.
                        Ok((None, _)) => Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "stored bytes vanished during read",
                        )),
                        Err(e) => Err(io::Error::other(e)),
                    }
                }
            })
            .buffered(PREFETCH)
            .map(move |slice| {
                // The room a whole read kept is held as long as the stream.
                let _held = &held;
                slice
            });
        futures::stream::once(async { Ok(first) })
            .chain(rest)
            .boxed()
    }

    /// The stream of a whole `range` read in pieces with its row (`db::uploads::get_live_for`):
    /// `first`, then the `rest` as they come, with the room they were read under kept as long
    /// as the stream. A read that ends short (failed, or cut at its deadline) ends the stream
    /// with an error, so the client sees a truncated transfer; bytes past the range (a row
    /// holding more than its size_bytes) are not sent.
    pub fn whole_from(
        range: ByteRange,
        first: Bytes,
        rest: Pieces,
        reserved: Option<OwnedSemaphorePermit>,
    ) -> ByteStream {
        let pieces = futures::stream::once(async { Ok(first) }).chain(rest);
        Whole {
            pieces: pieces.boxed(),
            left: range.byte_count(),
            _held: kept_of(reserved, range, range.byte_count()),
        }
        .boxed()
    }

    pub async fn check(&self) -> Result<(), StorageError> {
        self.db.run(|c| Box::pin(db::ping(c))).await?;
        Ok(())
    }
}

/// Room for a range of up to [`WHOLE_UP_TO`] read whole, from the read-ahead `budget`, or
/// `None` when it has none (its first slice then comes alone). About twice the bytes while
/// they are read (sqlx's read buffer, and the copy taken of it); the download then keeps what
/// it read ([`kept_of`]).
pub fn reserve_whole(budget: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    budget
        .clone()
        .try_acquire_many_owned((2 * WHOLE_UP_TO).div_ceil(1024) as u32)
        .ok()
}

/// What a download keeps of the room `reserved` for its first read ([`reserve_whole`]): as
/// much as the `first` bytes read (in KiB, rounded up) when they are the whole range; nothing
/// when they are only its first slice.
fn kept_of(
    reserved: Option<OwnedSemaphorePermit>,
    range: ByteRange,
    first: u64,
) -> Option<OwnedSemaphorePermit> {
    let mut permit = reserved.filter(|_| first >= range.byte_count())?;
    let keep = first.div_ceil(1024) as usize;
    if let Some(excess) = permit.num_permits().checked_sub(keep) {
        drop(permit.split(excess));
    }
    (keep > 0).then_some(permit)
}

/// See [`ByteaBackend::whole_from`].
struct Whole {
    pieces: ByteStream,
    left: u64,
    _held: Option<OwnedSemaphorePermit>,
}

impl futures::Stream for Whole {
    type Item = io::Result<Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.left == 0 {
            return Poll::Ready(None);
        }
        match std::task::ready!(self.pieces.poll_next_unpin(cx)) {
            Some(Ok(mut piece)) => {
                piece.truncate(self.left.min(piece.len() as u64) as usize);
                self.left -= piece.len() as u64;
                Poll::Ready(Some(Ok(piece)))
            }
            Some(Err(e)) => {
                self.left = 0;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                self.left = 0;
                Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the read of the stored bytes ended short",
                ))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    #[test]
    fn a_whole_read_keeps_only_what_it_read() {
        let budget = Arc::new(Semaphore::new(4096));
        let reserved = || reserve_whole(&budget);
        let file = |len: u64| range(0, len - 1);
        // 300 KiB and a byte, the whole file: 301 KiB kept, the rest of the 2 MiB back.
        let kept = kept_of(reserved(), file(300 * 1024 + 1), 300 * 1024 + 1).unwrap();
        assert_eq!(kept.num_permits(), 301);
        assert_eq!(budget.available_permits(), 4096 - 301);
        drop(kept);
        // Only the first slice of a larger file: nothing kept.
        assert!(kept_of(reserved(), file(WHOLE_UP_TO + 1), READ_CHUNK).is_none());
        assert_eq!(budget.available_permits(), 4096);
        // Two reservations take the budget; a third finds no room.
        let (a, b) = (reserved(), reserved());
        assert!(reserved().is_none());
        drop((a, b));
        assert_eq!(budget.available_permits(), 4096);
    }

    /// What a whole read's pieces become: the range's bytes, then its end; an error where the
    /// read failed or ended short (never a short body that looks whole); no byte past the
    /// range; the room kept until the stream goes.
    #[tokio::test]
    async fn a_whole_read_streams_its_pieces_and_nothing_else() {
        let budget = Arc::new(Semaphore::new(4096));
        let read = |pieces: Vec<io::Result<&'static [u8]>>, len: u64| {
            let (tx, rx) = futures::channel::mpsc::unbounded();
            for p in pieces {
                tx.unbounded_send(p.map(Bytes::from_static)).unwrap();
            }
            let stream = ByteaBackend::whole_from(
                range(0, len - 1),
                Bytes::from_static(b"ab"),
                rx,
                reserve_whole(&budget),
            );
            async move { stream.collect::<Vec<_>>().await }
        };
        let ok = |items: Vec<io::Result<Bytes>>| -> Vec<u8> {
            items.into_iter().flat_map(|i| i.unwrap()).collect()
        };
        // Whole: every piece, then the end.
        assert_eq!(ok(read(vec![Ok(b"cd"), Ok(b"e")], 5).await), b"abcde");
        // A row holding more than its size: the range only.
        assert_eq!(ok(read(vec![Ok(b"cdef")], 3).await), b"abc");
        // The read ended short: the bytes it had, then an error.
        let short = read(vec![Ok(b"cd")], 6).await;
        assert_eq!(short.len(), 3);
        assert_eq!(
            short[2].as_ref().unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        // The read failed: its error, and nothing after it.
        let failed = read(vec![Err(io::Error::other("gone")), Ok(b"cde")], 5).await;
        assert_eq!(failed.len(), 2);
        assert!(failed[1].is_err());
        assert_eq!(budget.available_permits(), 4096);
    }
}
