//! The agent's persistent state in DIR/.pending-uploads: the lock that keeps one agent per
//! DIR, the activity cursor and the URI index (`platform-pending:<ws>/<file>` →
//! `workspace:<absolute path>`). The cursor and the index are written atomically and durably
//! (temp file, fsync, rename, fsync of the folder).

use std::{
    collections::BTreeMap,
    io,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
};

use tokio::io::AsyncWriteExt;

use serde_json::Value;

pub const STATE_DIR: &str = ".pending-uploads";

pub fn state_dir(dir: &Path) -> PathBuf {
    dir.join(STATE_DIR)
}

/// Takes the exclusive lock on `DIR/.pending-uploads/lock`, held while the returned file is
/// open (the process's life; the kernel drops it when the process dies, even by SIGKILL).
/// Two agents on one DIR would resume the same partial file at different offsets, write into
/// a file already published (the hard link shares the inode) and each save its own stale
/// index: a second agent — a cron `--once` overlapping another, or beside the daemon — fails
/// at once instead of waiting, so an overlapping cron run ends rather than piling up.
pub fn lock_dir(dir: &Path) -> io::Result<std::fs::File> {
    let path = state_dir(dir).join("lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(at(&path))?;
    // flock(2), not `File::try_lock` (Rust 1.89): the crate's MSRV is 1.85. Same lock: BSD
    // style, tied to this open file, released when it closes or the process dies.
    // SAFETY: flock only reads the descriptor, which `file` keeps open for the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(file);
    }
    match io::Error::last_os_error() {
        e if e.kind() == io::ErrorKind::WouldBlock => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "another agent is already working on {}: it holds the lock {} (one agent per folder)",
                dir.display(),
                path.display()
            ),
        )),
        e => Err(at(&path)(e)),
    }
}

/// Names `path` in an I/O error, keeping its kind: "No space left on device" alone does not
/// say which disk (an operator probe).
pub fn at(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Writes `bytes` to `path` atomically and durably: when it returns, a crash leaves the new
/// contents under `path` (the rename is only durable once its directory is synced).
pub async fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    if let Err(e) = write_synced(&tmp, bytes).await {
        // A half-written file would hold the space the next attempt needs.
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(at(&tmp)(e));
    }
    tokio::fs::rename(&tmp, path).await.map_err(at(path))?;
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent).await,
        _ => sync_dir(Path::new(".")).await,
    }
}

async fn write_synced(tmp: &Path, bytes: &[u8]) -> io::Result<()> {
    // The owner's only, as the received files are: the state names every file received.
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        // never write through a symlink planted at the temporary name
        .custom_flags(libc::O_NOFOLLOW)
        .open(tmp)
        .await?;
    f.write_all(bytes).await?;
    // tokio's `write_all` hands the bytes to a blocking write and returns; its error
    // (ENOSPC) comes back from the next flush, and `sync_all` does not report it: an empty
    // file was renamed over the index on a full disk, and the pass acked.
    f.flush().await?;
    f.sync_all().await
}

/// fsyncs the directory `dir`: names created, linked or renamed in it survive a crash (a
/// file's own fsync covers its bytes, not its name).
pub async fn sync_dir(dir: &Path) -> io::Result<()> {
    async { tokio::fs::File::open(dir).await?.sync_all().await }
        .await
        .map_err(at(dir))
}

/// The persisted cursor, when it is one (an activity row id). Anything else (a torn write, a
/// hand edit) is as no cursor: the feed answered it 400 on every pass, and the agent
/// received nothing until someone mended the file (a black-box probe).
pub fn load_cursor(dir: &Path) -> Option<String> {
    let raw = std::fs::read_to_string(state_dir(dir).join("cursor")).ok()?;
    let raw = raw.trim();
    match raw.parse::<uuid::Uuid>() {
        Ok(id) => Some(id.to_string()),
        Err(_) if raw.is_empty() => None,
        Err(_) => {
            tracing::warn!(
                cursor = crate::logfmt::clip(raw).as_str(),
                "activity cursor file holds no row id: starting from a recent window"
            );
            None
        }
    }
}

pub async fn save_cursor(dir: &Path, cursor: Option<&str>) -> io::Result<()> {
    let path = state_dir(dir).join("cursor");
    match cursor {
        Some(c) => write_atomic(&path, c.as_bytes()).await,
        None => match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// `platform-pending:` URI → `workspace:` URI.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UriIndex {
    pub map: BTreeMap<String, String>,
}

impl UriIndex {
    pub fn load(dir: &Path) -> UriIndex {
        let path = state_dir(dir).join("index.json");
        let map = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        UriIndex { map }
    }

    /// The index of `dir`, for `workspace_id`'s files. One that cannot be read (a torn write,
    /// a hand edit) is copied aside as `index.json.unreadable` and the index made again from
    /// the files in DIR (`<32 hex file id>-<name>`): before, it was dropped without a word, and
    /// the next save lost the mapping of every file already received. With whether it was
    /// made again (and so is not on disk).
    pub fn load_or_rebuild(dir: &Path, workspace_id: uuid::Uuid) -> (UriIndex, bool) {
        let path = state_dir(dir).join("index.json");
        let Ok(bytes) = std::fs::read(&path) else {
            return (UriIndex::default(), false);
        };
        if let Ok(map) = serde_json::from_slice(&bytes) {
            return (UriIndex { map }, false);
        }
        let aside = state_dir(dir).join("index.json.unreadable");
        // Copied, not moved: it stays until the next save replaces it, so an agent stopped
        // before then makes the index again at its next start.
        let _ = std::fs::copy(&path, &aside);
        let mut index = UriIndex::default();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.get(..32).filter(|_| n.as_bytes().get(32) == Some(&b'-')))
                .and_then(|hex| uuid::Uuid::try_parse(hex).ok())
            else {
                continue;
            };
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                index.insert(crate::api::platform_uri(workspace_id, id), &entry.path());
            }
        }
        tracing::warn!(
            kept_aside = super::logged_path(&aside).as_str(),
            entries = index.map.len(),
            "index.json could not be read: made again from the files in DIR"
        );
        (index, true)
    }

    pub async fn save(&self, dir: &Path) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.map).map_err(io::Error::other)?;
        write_atomic(&state_dir(dir).join("index.json"), &bytes).await
    }

    /// Maps `platform_uri` to `path`; whether that changed the index.
    pub fn insert(&mut self, platform_uri: String, path: &Path) -> bool {
        let local = format!("workspace:{}", path.display());
        self.map.insert(platform_uri, local.clone()).as_ref() != Some(&local)
    }

    /// The local file `platform_uri` was received as, if the index knows it.
    pub fn path_of(&self, platform_uri: &str) -> Option<PathBuf> {
        let local = self.map.get(platform_uri)?;
        Some(PathBuf::from(
            local.strip_prefix("workspace:").unwrap_or(local),
        ))
    }

    /// Drops the entries whose local file is gone (moved or deleted by its owner), so the index
    /// holds what DIR holds rather than every file ever received: it does not grow without
    /// bound, and each save rewrites only that. A file that cannot be looked at for another
    /// reason keeps its entry. Returns how many went.
    pub fn prune_missing(&mut self) -> usize {
        let before = self.map.len();
        self.map.retain(|_, local| {
            let path = local.strip_prefix("workspace:").unwrap_or(local);
            !matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound)
        });
        before - self.map.len()
    }

    /// Rewrites `uri` fields of chat message parts (`parts`, `params.parts`,
    /// `params.message.parts`; a part's own `uri` or its `file.uri`) that this index knows;
    /// unknown URIs stay as they are. Returns how many were rewritten.
    pub fn rewrite(&self, message: &mut Value) -> usize {
        let mut n = 0;
        for pointer in ["/parts", "/params/parts", "/params/message/parts"] {
            if let Some(Value::Array(parts)) = message.pointer_mut(pointer) {
                for part in parts {
                    for uri_pointer in ["/uri", "/file/uri"] {
                        if let Some(uri) = part.pointer_mut(uri_pointer) {
                            if let Some(local) = uri.as_str().and_then(|u| self.map.get(u)) {
                                *uri = Value::String(local.clone());
                                n += 1;
                            }
                        }
                    }
                }
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rewrite_known_uris_in_every_part_location() {
        let mut index = UriIndex::default();
        index.insert(
            "platform-pending:w/1".into(),
            Path::new("/data/in/aa-a.txt"),
        );
        let mut msg = json!({
            "parts": [{"kind": "file", "uri": "platform-pending:w/1"}, {"kind": "text", "text": "hi"}],
            "params": {
                "parts": [{"file": {"uri": "platform-pending:w/1"}}],
                "message": {"parts": [{"uri": "platform-pending:w/2"}, {"uri": "https://example/x"}]}
            }
        });
        assert_eq!(index.rewrite(&mut msg), 2);
        assert_eq!(msg["parts"][0]["uri"], "workspace:/data/in/aa-a.txt");
        assert_eq!(
            msg["params"]["parts"][0]["file"]["uri"],
            "workspace:/data/in/aa-a.txt"
        );
        assert_eq!(
            msg["params"]["message"]["parts"][0]["uri"], "platform-pending:w/2",
            "unknown: untouched"
        );
        assert_eq!(
            msg["params"]["message"]["parts"][1]["uri"],
            "https://example/x"
        );
        assert_eq!(index.rewrite(&mut json!({"parts": "not an array"})), 0);
    }

    #[tokio::test]
    async fn index_and_cursor_persist() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(state_dir(dir.path())).unwrap();
        let mut index = UriIndex::default();
        index.insert("platform-pending:a/b".into(), Path::new("/x/y"));
        index.save(dir.path()).await.unwrap();
        assert_eq!(UriIndex::load(dir.path()), index);
        assert_eq!(load_cursor(dir.path()), None);
        let id = "0b5a6a8e-7c4e-4b8e-9f1e-3c2d1a0b9e8f";
        save_cursor(dir.path(), Some(id)).await.unwrap();
        assert_eq!(load_cursor(dir.path()).as_deref(), Some(id));
        // Not a row id (a torn write): as no cursor.
        save_cursor(dir.path(), Some("0b5a6a8e-7c4e"))
            .await
            .unwrap();
        assert_eq!(load_cursor(dir.path()), None);
        save_cursor(dir.path(), None).await.unwrap();
        assert_eq!(load_cursor(dir.path()), None);
        let leftovers: Vec<_> = std::fs::read_dir(state_dir(dir.path()))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains("tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn entries_of_files_no_longer_there_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, gone) = (dir.path().join("kept.txt"), dir.path().join("gone.txt"));
        std::fs::write(&kept, b"k").unwrap();
        let mut index = UriIndex::default();
        index.insert("platform-pending:w/1".into(), &kept);
        assert!(index.insert("platform-pending:w/2".into(), &gone));
        assert!(
            !index.insert("platform-pending:w/2".into(), &gone),
            "the same entry"
        );
        assert_eq!(index.path_of("platform-pending:w/2"), Some(gone.clone()));
        assert_eq!(index.path_of("platform-pending:w/3"), None);
        assert_eq!(index.prune_missing(), 1);
        assert_eq!(
            index.map.keys().collect::<Vec<_>>(),
            vec!["platform-pending:w/1"]
        );
        assert_eq!(index.prune_missing(), 0);
    }

    #[test]
    fn one_lock_per_dir_until_its_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(state_dir(dir.path())).unwrap();
        let held = lock_dir(dir.path()).unwrap();
        let e = lock_dir(dir.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(e.to_string().contains(&dir.path().display().to_string()));
        drop(held);
        lock_dir(dir.path()).unwrap();
    }
}
