//! Upload spooling: each file part is written to an unnamed temp file (O_TMPFILE on Linux)
//! while its size and sha256 are computed. The kernel removes the file when the last handle
//! closes, so no path ever exists to leak — not on an error, not on a panic, not on SIGKILL.

use std::{fs::File, io, os::unix::fs::FileExt, path::Path, sync::Arc};

use bytes::Bytes;
use futures::Stream;
use tokio::io::AsyncWriteExt;

use crate::digest::Digester;

/// Chunk size for reading a spool back (into Postgres or S3).
pub const READ_CHUNK: usize = 256 * 1024;

pub struct SpoolWriter {
    file: tokio::fs::File,
    digest: Digester,
}

impl SpoolWriter {
    pub fn create(dir: &Path) -> io::Result<Self> {
        let file = tempfile::tempfile_in(dir)?;
        Ok(Self {
            file: tokio::fs::File::from_std(file),
            digest: Digester::default(),
        })
    }

    pub fn size(&self) -> u64 {
        self.digest.len()
    }

    pub async fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.file.write_all(chunk).await?;
        self.digest.update(chunk);
        Ok(())
    }

    /// Closes the file now. tokio writes in the background, so a plain drop could leave the
    /// descriptor open until an in-flight write finishes; flushing waits for it.
    pub async fn discard(mut self) {
        let _ = self.file.flush().await;
    }

    pub async fn finish(mut self) -> io::Result<Spool> {
        self.file.flush().await?;
        let file = self.file.into_std().await;
        Ok(Spool {
            file: Arc::new(file),
            size: self.digest.len(),
            sha256: self.digest.finish(),
        })
    }
}

/// A fully received file: its bytes on disk, its size and digest. Clones share the file.
#[derive(Clone)]
pub struct Spool {
    file: Arc<File>,
    pub size: u64,
    pub sha256: [u8; 32],
}

impl Spool {
    /// A path that opens this unnamed file afresh (Linux /proc), for readers that need one.
    pub fn proc_path(&self) -> std::path::PathBuf {
        use std::os::fd::AsRawFd;
        format!("/proc/self/fd/{}", self.file.as_raw_fd()).into()
    }

    /// The whole file (callers bound its size: small rows only).
    pub async fn read_all(&self) -> io::Result<Vec<u8>> {
        use futures::TryStreamExt;
        self.chunks().map_ok(Vec::from).try_concat().await
    }

    /// The bytes from the start, in chunks. Each call is an independent reader (positional
    /// reads), so a retried S3 PUT can simply read again.
    pub fn chunks(&self) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let file = self.file.clone();
        let size = self.size;
        futures::stream::try_unfold(0u64, move |offset| {
            let file = file.clone();
            async move {
                if offset >= size {
                    return Ok(None);
                }
                let len = READ_CHUNK.min((size - offset) as usize);
                let buf = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len];
                    file.read_exact_at(&mut buf, offset)?;
                    Ok::<_, io::Error>(buf)
                })
                .await
                .map_err(io::Error::other)??;
                Ok(Some((Bytes::from(buf), offset + len as u64)))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use sha2::{Digest, Sha256};

    #[tokio::test]
    async fn roundtrip_and_digest() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SpoolWriter::create(dir.path()).unwrap();
        let data: Vec<u8> = (0..READ_CHUNK * 2 + 17).map(|i| (i % 251) as u8).collect();
        for part in data.chunks(1000) {
            w.write(part).await.unwrap();
        }
        let spool = w.finish().await.unwrap();
        assert_eq!(spool.size, data.len() as u64);
        assert_eq!(spool.sha256, <[u8; 32]>::from(Sha256::digest(&data)));
        for _ in 0..2 {
            let back: Vec<Bytes> = spool.chunks().try_collect().await.unwrap();
            assert_eq!(back.len(), 3);
            assert_eq!(back.concat(), data);
        }
        // nothing is ever visible in the spool folder
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
