//! Inline Postgres storage: the bytes live in `pending_uploads.content`. They are written
//! with the row (see `db::uploads::insert`); reads fetch bounded slices (a file of up to
//! [`WHOLE_UP_TO`] whole with its row, while the read-ahead budget has room), which touch only
//! the TOAST chunks they need because the column is stored uncompressed (STORAGE EXTERNAL).
//! Each slice is its own short database call: a download holds no connection between
//! slices, however slowly its client reads.

use std::{io, sync::Arc};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use super::{ByteRange, ByteStream, Location, StorageError};
use crate::db::{self, Db};

/// Bytes per slice: bounds memory per download, beyond what the read-ahead budget lends.
pub const READ_CHUNK: u64 = 256 * 1024;

/// Slices of one download being fetched at once: one ahead of the one being sent.
const PREFETCH: usize = 2;

/// A range up to this long may have the rest of its slices fetched all at once, after the
/// first: one wait instead of one per [`PREFETCH`] slices.
const ALL_AHEAD_UP_TO: u64 = 1024 * 1024;

/// A file up to this long is read whole with its row when the budget has room: one statement
/// for the whole download.
pub const WHOLE_UP_TO: u64 = ALL_AHEAD_UP_TO;

/// What downloads reading whole or fetching all ahead may hold at once, in KiB, across the
/// replica; beyond it a download fetches [`PREFETCH`] slices as larger ones do. A reader that
/// stops reading holds what was fetched for it: without this budget, up to 1 MiB per download
/// slot instead of a slice or two.
const ALL_AHEAD_KIB: usize = 16 * 1024;

pub struct ByteaBackend {
    db: Db,
    all_ahead: Arc<Semaphore>,
}

impl ByteaBackend {
    pub fn new(db: Db) -> Self {
        ByteaBackend {
            db,
            all_ahead: Arc::new(Semaphore::new(ALL_AHEAD_KIB)),
        }
    }

    /// One slice, exactly `len` bytes long, or `None` when the row or its bytes are gone.
    async fn slice(
        db: &Db,
        file_id: Uuid,
        offset: u64,
        len: u64,
    ) -> Result<Option<Bytes>, StorageError> {
        let chunk = db
            .run(move |c| {
                let read = db::uploads::read_slice(c, file_id, offset, len);
                Box::pin(crate::arena::big_blocks(
                    crate::arena::read_buffer(len),
                    read,
                ))
            })
            .await?;
        Ok(chunk.filter(|c| c.len() as u64 == len).map(Bytes::from))
    }

    /// The read-ahead budget, from which a file of up to [`WHOLE_UP_TO`] read whole with its
    /// row takes its room ([`reserve_whole`]).
    pub fn budget(&self) -> Arc<Semaphore> {
        self.all_ahead.clone()
    }

    /// Streams `range` of a row's inline bytes. The first slice is read before this returns:
    /// a row swept since it was looked up is `Missing` here (a 404), not a short 200.
    pub async fn open(&self, loc: &Location, range: ByteRange) -> Result<ByteStream, StorageError> {
        let first_len = READ_CHUNK.min(range.byte_count());
        let first = Self::slice(&self.db, loc.file_id, range.start, first_len)
            .await?
            .ok_or(StorageError::Missing)?;
        Ok(self.continue_from(loc, range, first, None))
    }

    /// The stream of `range` whose first slice the caller already read (with the row), with
    /// the budget it was read under ([`ByteaBackend::reserve_whole`]), if any: kept for what
    /// was read when that is the whole range. The next slice is fetched while the current one
    /// is being sent ([`PREFETCH`] in flight, or all of a small range, see [`fetch_ahead`]),
    /// so a download does not wait a round trip per slice.
    pub fn continue_from(
        &self,
        loc: &Location,
        range: ByteRange,
        first: Bytes,
        reserved: Option<OwnedSemaphorePermit>,
    ) -> ByteStream {
        let start = range.start + first.len() as u64;
        let whole = kept_of(reserved, range, first.len() as u64);
        let offsets = (start..=range.end).step_by(READ_CHUNK as usize);
        let (ahead, budget) = fetch_ahead(&self.all_ahead, range, start);
        // A whole read left nothing to fetch ahead: at most one of the two is taken.
        let held = whole.or(budget);
        let (db, file_id) = (self.db.clone(), loc.file_id);
        let rest = futures::stream::iter(offsets)
            .map(move |offset| {
                let db = db.clone();
                let len = READ_CHUNK.min(range.end - offset + 1);
                async move {
                    match Self::slice(&db, file_id, offset, len).await {
                        Ok(Some(chunk)) => Ok(chunk),
                        // Swept (or released) mid-stream: end with an error so the client sees
                        // a truncated transfer, never wrong bytes.
                        Ok(None) => Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "stored bytes vanished during read",
                        )),
                        Err(e) => Err(io::Error::other(e)),
                    }
                }
            })
            .buffered(ahead)
            .map(move |slice| {
                // The budget taken is held as long as the stream.
                let _held = &held;
                slice
            });
        futures::stream::once(async { Ok(first) })
            .chain(rest)
            .boxed()
    }

    pub async fn check(&self) -> Result<(), StorageError> {
        self.db.run(|c| Box::pin(db::ping(c))).await?;
        Ok(())
    }
}

/// Room for a file of up to [`WHOLE_UP_TO`] read whole with its row, from the read-ahead
/// `budget`, or `None` when it has none (the first slice then comes alone). About twice the
/// bytes while the row is read (sqlx's read buffer, and the copy taken of it); the download
/// then keeps what it read ([`kept_of`]).
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

/// How many slices after the first a download of `range`, whose next byte is at `start`,
/// fetches at once: all of them for a range up to [`ALL_AHEAD_UP_TO`] while `budget` has their
/// bytes (held by the permit), else [`PREFETCH`].
fn fetch_ahead(
    budget: &Arc<Semaphore>,
    range: ByteRange,
    start: u64,
) -> (usize, Option<OwnedSemaphorePermit>) {
    let rest = (range.end + 1).saturating_sub(start);
    if range.byte_count() > ALL_AHEAD_UP_TO || rest <= READ_CHUNK {
        return (PREFETCH, None);
    }
    match budget
        .clone()
        .try_acquire_many_owned(rest.div_ceil(1024) as u32)
    {
        Ok(permit) => (rest.div_ceil(READ_CHUNK) as usize, Some(permit)),
        Err(_) => (PREFETCH, None),
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

    #[test]
    fn small_ranges_fetch_all_ahead_within_the_budget() {
        let budget = Arc::new(Semaphore::new(1024));
        // A 1 MiB file after its first slice: the other three at once, 768 KiB held.
        let (ahead, first) = fetch_ahead(&budget, range(0, (1 << 20) - 1), READ_CHUNK);
        assert_eq!(ahead, 3);
        assert_eq!(budget.available_permits(), 1024 - 768);
        // The next one finds the budget short: one slice ahead, as a large file.
        let (ahead, second) = fetch_ahead(&budget, range(0, (1 << 20) - 1), READ_CHUNK);
        assert_eq!((ahead, second.is_none()), (PREFETCH, true));
        drop(first);
        let (ahead, third) = fetch_ahead(&budget, range(0, (1 << 20) - 1), READ_CHUNK);
        assert_eq!((ahead, third.is_some()), (3, true));
        // Larger ranges, and what fits in one slice, take nothing from it.
        drop(third);
        let (ahead, none) = fetch_ahead(&budget, range(0, 1 << 20), READ_CHUNK);
        assert_eq!((ahead, none.is_none()), (PREFETCH, true));
        let (ahead, none) = fetch_ahead(&budget, range(0, 2 * READ_CHUNK - 1), READ_CHUNK);
        assert_eq!((ahead, none.is_none()), (PREFETCH, true));
        assert_eq!(budget.available_permits(), 1024);
    }
}
