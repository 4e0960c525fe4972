//! Inline Postgres storage: the bytes live in `pending_uploads.content`. They are written
//! with the row (see `db::uploads::insert`); reads fetch bounded slices, which touch only the
//! TOAST chunks they need because the column is stored uncompressed (STORAGE EXTERNAL).
//! Each slice is its own short database call: a download holds no connection between
//! slices, however slowly its client reads.

use std::io;

use bytes::Bytes;
use futures::StreamExt;
use uuid::Uuid;

use super::{ByteRange, ByteStream, Location, StorageError};
use crate::db::{self, Db};

/// Bytes per slice: bounds memory per download.
pub const READ_CHUNK: u64 = 256 * 1024;

/// Slices of one download being fetched at once: one ahead of the one being sent.
const PREFETCH: usize = 2;

/// A range up to this long has the rest of its slices fetched all at once, after the first:
/// it holds no more than the whole range would, and waits one round trip instead of one per
/// [`PREFETCH`] slices.
const ALL_AHEAD_UP_TO: u64 = 1024 * 1024;

pub struct ByteaBackend {
    db: Db,
}

impl ByteaBackend {
    pub fn new(db: Db) -> Self {
        ByteaBackend { db }
    }

    /// One slice, exactly `len` bytes long, or `None` when the row or its bytes are gone.
    async fn slice(
        &self,
        file_id: Uuid,
        offset: u64,
        len: u64,
    ) -> Result<Option<Bytes>, StorageError> {
        let chunk = self
            .db
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

    /// Streams `range` of a row's inline bytes. The first slice is read before this returns:
    /// a row swept since it was looked up is `Missing` here (a 404), not a short 200.
    pub async fn open(&self, loc: &Location, range: ByteRange) -> Result<ByteStream, StorageError> {
        let first_len = READ_CHUNK.min(range.byte_count());
        let first = self
            .slice(loc.file_id, range.start, first_len)
            .await?
            .ok_or(StorageError::Missing)?;
        Ok(self.continue_from(loc, range, first))
    }

    /// The stream of `range` whose first slice the caller already read (with the row). The
    /// next slice is fetched while the current one is being sent ([`PREFETCH`] in flight), so
    /// a download does not wait a round trip per slice.
    pub fn continue_from(&self, loc: &Location, range: ByteRange, first: Bytes) -> ByteStream {
        let start = range.start + first.len() as u64;
        let offsets = (start..=range.end).step_by(READ_CHUNK as usize);
        let ahead = if range.byte_count() <= ALL_AHEAD_UP_TO {
            ((range.end + 1).saturating_sub(start).div_ceil(READ_CHUNK) as usize).max(1)
        } else {
            PREFETCH
        };
        let (db, file_id) = (self.db.clone(), loc.file_id);
        let rest = futures::stream::iter(offsets)
            .map(move |offset| {
                let this = ByteaBackend { db: db.clone() };
                let len = READ_CHUNK.min(range.end - offset + 1);
                async move {
                    match this.slice(file_id, offset, len).await {
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
            .buffered(ahead);
        futures::stream::once(async { Ok(first) })
            .chain(rest)
            .boxed()
    }

    pub async fn check(&self) -> Result<(), StorageError> {
        self.db.run(|c| Box::pin(db::ping(c))).await?;
        Ok(())
    }
}
