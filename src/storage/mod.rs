//! The storage seam. A `StorageBackend` keeps the bytes of staged files; `Storage` is the
//! policy on top: the `PENDING_UPLOADS_BACKEND` flag picks which backends *write* new bytes,
//! while reads and deletes always follow what the row records, so flipping the flag forward
//! or back never strands a row.

pub mod bytea;
pub mod s3;

use std::{io, sync::Arc};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use uuid::Uuid;

use crate::{config::BackendMode, metrics, spool::Spool};

pub use bytea::ByteaBackend;
pub use s3::S3Backend;

pub type ByteStream = BoxStream<'static, io::Result<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("stored bytes missing")]
    Missing,
}

/// Where one row's bytes live, as recorded in the row.
#[derive(Debug, Clone)]
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

#[async_trait]
pub trait StorageBackend: Send + Sync {
    /// The backend's name in logs and metrics.
    fn name(&self) -> &'static str;
    /// Stores a spooled file before its row is inserted. Returns the object key the row must
    /// record, or `None` when the bytes travel inside the row itself.
    async fn put(&self, loc: &Location, spool: &Spool) -> Result<Option<String>, StorageError>;
    /// Streams `range` of a stored file, in bounded chunks.
    async fn get(&self, loc: &Location, range: ByteRange) -> Result<ByteStream, StorageError>;
    /// Removes what `put` stored outside the row (idempotent).
    async fn delete(&self, loc: &Location) -> Result<(), StorageError>;
    /// Is the backend reachable?
    async fn check(&self) -> Result<(), StorageError>;
}

/// What a new row records about where `Storage::put` sent its bytes.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    pub inline: bool,
    pub s3_key: Option<String>,
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

    /// Writes a spooled file wherever the mode sends new bytes (S3 first in dual mode).
    pub async fn put(
        &self,
        workspace_id: Uuid,
        file_id: Uuid,
        spool: &Spool,
    ) -> Result<Placement, StorageError> {
        let loc = Location {
            file_id,
            workspace_id,
            size: spool.size,
            inline: false,
            s3_key: None,
        };
        let s3_key = match self.mode {
            BackendMode::Bytea => None,
            BackendMode::Dual | BackendMode::S3 => {
                let s3 = self.s3_or_err()?;
                metrics::storage_op("s3", "put", s3.put(&loc, spool)).await?
            }
        };
        let inline = match self.mode {
            BackendMode::Bytea | BackendMode::Dual => self.bytea.put(&loc, spool).await?.is_none(),
            BackendMode::S3 => false,
        };
        Ok(Placement { inline, s3_key })
    }

    /// Undoes `put` for rows whose transaction did not commit. Best effort: what is left is
    /// found by the sweep's orphan reconciliation.
    pub async fn discard(&self, placements: &[Placement]) {
        let Some(s3) = self.s3() else { return };
        for key in placements.iter().filter_map(|p| p.s3_key.as_deref()) {
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

    /// Opens a stored file; the row decides where from. A row with both copies falls back to
    /// its bytea copy when S3 fails.
    pub async fn get(&self, loc: &Location, range: ByteRange) -> Result<ByteStream, StorageError> {
        if loc.s3_key.is_none() {
            return metrics::storage_op("bytea", "get", self.bytea.get(loc, range)).await;
        }
        match metrics::storage_op("s3", "get", self.s3_or_err()?.get(loc, range)).await {
            Ok(stream) => Ok(stream),
            Err(e) if loc.inline => {
                metrics::metrics()
                    .storage_fallbacks
                    .with_label_values(&["get"])
                    .inc();
                tracing::warn!(
                    event = "fallback", file_id = %loc.file_id, workspace_id = %loc.workspace_id,
                    error = %e, "S3 read failed; serving the bytea copy"
                );
                metrics::storage_op("bytea", "get", self.bytea.get(loc, range)).await
            }
            Err(e) => Err(e),
        }
    }

    /// Removes a swept row's object (its bytea copy went with the row).
    pub async fn delete(&self, loc: &Location) -> Result<(), StorageError> {
        if loc.s3_key.is_none() {
            return Ok(());
        }
        metrics::storage_op("s3", "delete", self.s3_or_err()?.delete(loc)).await
    }

    /// The backend a read of this row goes to first, for logs and metrics.
    pub fn reader_name(&self, loc: &Location) -> &'static str {
        if loc.s3_key.is_some() {
            "s3"
        } else {
            "bytea"
        }
    }

    /// Readiness: the database, and the bucket when the mode writes to it.
    pub async fn check(&self) -> Result<(), StorageError> {
        self.bytea.check().await?;
        if self.mode != BackendMode::Bytea {
            self.s3_or_err()?.check().await?;
        }
        Ok(())
    }
}
