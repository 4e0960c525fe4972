//! SHA-256 of stored and received bytes, one way: a [`Digester`] fed chunk by chunk (the
//! spool hashes as it writes; verifiers hash as they read), so no file is ever held whole.

use std::path::Path;

use futures::{Stream, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

/// Bytes and their digest, fed in order.
#[derive(Default, Clone)]
pub struct Digester {
    hasher: Sha256,
    len: u64,
}

impl Digester {
    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.len += chunk.len() as u64;
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> [u8; 32] {
        self.hasher.finalize().into()
    }
}

/// Digest and length of a stream of chunks.
pub async fn of_stream<S, B, E>(stream: S) -> Result<([u8; 32], u64), E>
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
{
    let mut d = Digester::default();
    let mut stream = std::pin::pin!(stream);
    while let Some(chunk) = stream.try_next().await? {
        d.update(chunk.as_ref());
    }
    let len = d.len();
    Ok((d.finish(), len))
}

/// Digest and length of a file, read a buffer at a time.
pub async fn of_file(path: &Path) -> std::io::Result<([u8; 32], u64)> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut d = Digester::default();
    let mut buf = vec![0u8; crate::spool::READ_CHUNK];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            let len = d.len();
            return Ok((d.finish(), len));
        }
        d.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn all_three_ways_agree() {
        let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        let want: [u8; 32] = Sha256::digest(&data).into();
        let chunks = data
            .chunks(4096)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()));
        assert_eq!(
            of_stream(futures::stream::iter(chunks)).await.unwrap(),
            (want, data.len() as u64)
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, &data).unwrap();
        assert_eq!(of_file(&path).await.unwrap(), (want, data.len() as u64));
    }
}
