//! Inline Postgres storage: the bytes live in `pending_uploads.content`. Writes stream into
//! the row through `COPY ... FROM STDIN (FORMAT binary)` (see `db::uploads::insert`); reads
//! fetch bounded slices with `substring()`, which touches only the TOAST chunks it needs
//! because the column is stored uncompressed (STORAGE EXTERNAL).

use std::io;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use sqlx::PgPool;

use super::{ByteRange, ByteStream, Location, StorageBackend, StorageError};
use crate::spool::Spool;

/// Bytes per `substring()` read: bounds memory per download.
pub const READ_CHUNK: u64 = 1024 * 1024;

pub struct ByteaBackend {
    pool: PgPool,
}

impl ByteaBackend {
    pub fn new(pool: PgPool) -> Self {
        ByteaBackend { pool }
    }
}

#[async_trait]
impl StorageBackend for ByteaBackend {
    fn name(&self) -> &'static str {
        "bytea"
    }

    /// The bytes travel inside the row: `db::uploads::insert` streams them from the spool.
    async fn put(&self, _loc: &Location, _spool: &Spool) -> Result<Option<String>, StorageError> {
        Ok(None)
    }

    /// The bytes go with the row.
    async fn delete(&self, _loc: &Location) -> Result<(), StorageError> {
        Ok(())
    }

    async fn get(&self, loc: &Location, range: ByteRange) -> Result<ByteStream, StorageError> {
        let pool = self.pool.clone();
        let file_id = loc.file_id;
        let stream = futures::stream::try_unfold(range.start, move |offset| {
            let pool = pool.clone();
            async move {
                if offset > range.end {
                    return Ok(None);
                }
                let len = READ_CHUNK.min(range.end - offset + 1);
                // substring() positions are 1-based.
                let chunk: Option<Vec<u8>> = sqlx::query_scalar(
                    "SELECT substring(content FROM $2 FOR $3) FROM pending_uploads WHERE file_id = $1",
                )
                .bind(file_id)
                .bind(offset as i32 + 1)
                .bind(len as i32)
                .fetch_optional(&pool)
                .await
                .map_err(io::Error::other)?
                .flatten();
                match chunk {
                    Some(c) if c.len() as u64 == len => Ok(Some((Bytes::from(c), offset + len))),
                    // The row was swept (or its bytes released) mid-stream: end with an error
                    // so the client sees a truncated transfer, never wrong bytes.
                    _ => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stored bytes vanished during read",
                    )),
                }
            }
        });
        Ok(stream.boxed())
    }

    async fn check(&self) -> Result<(), StorageError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
