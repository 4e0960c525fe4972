//! The workspace side (`pending-uploads agent`): polls the activity feed (and reconciles with
//! the pending list), downloads each staged file with bounded concurrency — resuming an
//! interrupted download with `Range` — verifies size and sha256 (the ETag), writes it to
//! `DIR/<32 hex>-<name>` (0600, create-exclusive, never a half file under the final name),
//! acks, and records the `platform-pending:` → `workspace:` URI mapping.

pub mod index;

use std::{
    collections::BTreeMap,
    fs::OpenOptions,
    io::{self, Read, Seek, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use futures::StreamExt;
use rand::Rng;
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::sanitize::sanitize;
use index::{load_cursor, save_cursor, state_dir, UriIndex};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub platform_url: String,
    pub workspace_id: Uuid,
    pub token: String,
    pub dir: PathBuf,
    pub concurrency: usize,
    /// Download rate cap in bytes per second (a laptop's link is shared), if any.
    pub max_rate: Option<u64>,
    /// Attempts after the first, per request or download, within one pass.
    pub retries: u32,
}

/// One staged file the workspace should receive.
#[derive(Debug, Clone)]
struct Candidate {
    file_id: Uuid,
    name: String,
    uri: String,
    size: u64,
}

#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct PassReport {
    pub staged: u64,
    pub already_present: u64,
    pub gone: u64,
    pub failed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Worth retrying: network trouble, a 5xx, a truncated or corrupt transfer.
    #[error("{0}")]
    Retry(String),
    /// Retrying will not help: auth refused, a conflicting local file, a local I/O error.
    #[error("{0}")]
    Fatal(String),
}

impl From<io::Error> for AgentError {
    fn from(e: io::Error) -> Self {
        AgentError::Fatal(format!("local I/O: {e}"))
    }
}

impl From<reqwest::Error> for AgentError {
    fn from(e: reqwest::Error) -> Self {
        AgentError::Retry(format!("platform request failed: {e}"))
    }
}

enum Staged {
    New,
    AlreadyPresent,
    Gone,
}

pub struct Agent {
    cfg: AgentConfig,
    http: reqwest::Client,
    index: Mutex<UriIndex>,
}

fn backoff(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.min(8)).min(30_000);
    Duration::from_millis(base + rand::thread_rng().gen_range(0..=base / 2))
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> io::Result<Agent> {
        std::fs::create_dir_all(state_dir(&cfg.dir).join("partial"))?;
        let dir = std::fs::canonicalize(&cfg.dir)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(io::Error::other)?;
        Ok(Agent {
            index: Mutex::new(UriIndex::load(&dir)),
            cfg: AgentConfig { dir, ..cfg },
            http,
        })
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}/workspaces/{}{}",
            self.cfg.platform_url.trim_end_matches('/'),
            self.cfg.workspace_id,
            path
        )
    }

    async fn get_json(&self, path: &str) -> Result<(StatusCode, Value), AgentError> {
        let resp = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.cfg.token)
            .send()
            .await?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(AgentError::Fatal(format!(
                "platform refused the token ({status})"
            )));
        }
        if status.is_server_error() {
            return Err(AgentError::Retry(format!("platform answered {status}")));
        }
        let body = if status.is_success() {
            resp.json().await?
        } else {
            Value::Null
        };
        Ok((status, body))
    }

    async fn with_retries<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, AgentError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, AgentError>>,
    {
        let mut attempt = 0;
        loop {
            match f().await {
                Err(AgentError::Retry(e)) if attempt < self.cfg.retries => {
                    attempt += 1;
                    let wait = backoff(attempt);
                    tracing::warn!(what, attempt, error = %e, wait_ms = wait.as_millis() as u64, "retrying");
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    /// New files from the activity feed (advancing the persisted cursor), plus everything the
    /// pending list still holds (recovers whatever a lost cursor missed).
    async fn discover(&self) -> Result<Vec<Candidate>, AgentError> {
        let mut found: BTreeMap<Uuid, Candidate> = BTreeMap::new();
        let filter = "type=a2a_receive&method=chat_upload_receive&limit=500";
        let mut cursor = load_cursor(&self.cfg.dir);
        loop {
            let path = match &cursor {
                Some(c) => format!("/activity?{filter}&since_id={c}"),
                None => format!("/activity?{filter}&since_secs=86400"),
            };
            let (status, rows) = self
                .with_retries("activity", || self.get_json(&path))
                .await?;
            if status == StatusCode::GONE {
                tracing::warn!(cursor = ?cursor, "activity cursor no longer known: resetting to a recent window");
                save_cursor(&self.cfg.dir, None)?;
                cursor = None;
                continue;
            }
            let rows = rows.as_array().cloned().unwrap_or_default();
            for row in &rows {
                if let Some(c) = candidate(&row["request_body"]) {
                    found.insert(c.file_id, c);
                }
            }
            // with a cursor the rows come oldest first; without, newest first
            let newest = if cursor.is_some() {
                rows.last()
            } else {
                rows.first()
            };
            let Some(next) = newest.and_then(|r| r["id"].as_str()) else {
                break;
            };
            // from here on page forward (oldest first) after the newest row seen
            cursor = Some(next.to_string());
            save_cursor(&self.cfg.dir, cursor.as_deref())?;
        }
        let (_, pending) = self
            .with_retries("pending list", || self.get_json("/pending-uploads"))
            .await?;
        for item in pending.as_array().cloned().unwrap_or_default() {
            if let Some(c) = candidate(&item) {
                found.insert(c.file_id, c);
            }
        }
        Ok(found.into_values().collect())
    }

    /// One pass: discover, stage everything with bounded concurrency, ack.
    pub async fn run_once(&self) -> Result<PassReport, AgentError> {
        let candidates = self.discover().await?;
        let outcomes: Vec<(Candidate, Result<Staged, AgentError>)> =
            futures::stream::iter(candidates)
                .map(|c| async move {
                    let r = self.with_retries("download", || self.stage(&c)).await;
                    (c, r)
                })
                .buffer_unordered(self.cfg.concurrency.max(1))
                .collect()
                .await;
        let mut report = PassReport::default();
        for (c, outcome) in outcomes {
            match outcome {
                Ok(Staged::New) => report.staged += 1,
                Ok(Staged::AlreadyPresent) => report.already_present += 1,
                Ok(Staged::Gone) => report.gone += 1,
                Err(e) => {
                    report.failed += 1;
                    tracing::error!(file_id = %c.file_id, error = %e, "could not stage file");
                }
            }
        }
        Ok(report)
    }

    /// Passes forever, `interval` apart; backs off (with jitter) while the platform is down.
    pub async fn run_forever(&self, interval: Duration) {
        let mut failures = 0;
        loop {
            let wait = match self.run_once().await {
                Ok(r) => {
                    failures = 0;
                    if r != PassReport::default() {
                        tracing::info!(
                            staged = r.staged,
                            present = r.already_present,
                            gone = r.gone,
                            failed = r.failed,
                            "agent pass"
                        );
                    }
                    interval
                }
                Err(e) => {
                    failures += 1;
                    let wait = backoff(failures).max(interval);
                    tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "agent pass failed");
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    fn final_path(&self, c: &Candidate) -> PathBuf {
        self.cfg
            .dir
            .join(format!("{}-{}", c.file_id.simple(), sanitize(&c.name, 100)))
    }

    fn partial_path(&self, c: &Candidate) -> PathBuf {
        state_dir(&self.cfg.dir)
            .join("partial")
            .join(format!("{}.part", c.file_id.simple()))
    }

    async fn stage(&self, c: &Candidate) -> Result<Staged, AgentError> {
        let final_path = self.final_path(c);
        let content = format!("/pending-uploads/{}/content", c.file_id);
        if std::fs::symlink_metadata(&final_path).is_ok() {
            // Written by an earlier run that stopped before its ack: verify, then ack.
            let head = self
                .http
                .head(self.url(&content))
                .bearer_auth(&self.cfg.token)
                .send()
                .await?;
            if head.status() == StatusCode::NOT_FOUND {
                self.record(c, &final_path).await?;
                return Ok(Staged::Gone);
            }
            let etag = etag(head.headers()).ok_or_else(|| AgentError::Retry("no ETag".into()))?;
            let digest = file_sha256(&final_path)?;
            if digest != etag {
                return Err(AgentError::Fatal(format!(
                    "{} exists with other content",
                    final_path.display()
                )));
            }
            self.ack(c).await?;
            self.record(c, &final_path).await?;
            return Ok(Staged::AlreadyPresent);
        }

        let partial_path = self.partial_path(c);
        let mut partial = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // never write through a symlink planted at the partial path
            .custom_flags(libc::O_NOFOLLOW)
            .open(&partial_path)?;
        let have = partial.metadata()?.len();
        let mut req = self
            .http
            .get(self.url(&content))
            .bearer_auth(&self.cfg.token);
        if have > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let resp = req.send().await?;
        let status = resp.status();
        match status {
            StatusCode::NOT_FOUND => {
                drop(partial);
                let _ = std::fs::remove_file(&partial_path);
                tracing::info!(file_id = %c.file_id, "upload expired or swept before fetch: skipped");
                return Ok(Staged::Gone);
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                partial.set_len(0)?;
                return Err(AgentError::Retry(
                    "partial file longer than the upload: restarting".into(),
                ));
            }
            s if s.is_server_error() => return Err(AgentError::Retry(format!("content: {s}"))),
            StatusCode::OK => {
                partial.set_len(0)?;
                partial.seek(io::SeekFrom::Start(0))?;
            }
            StatusCode::PARTIAL_CONTENT => {
                let starts_at = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if starts_at != Some(have) {
                    partial.set_len(0)?;
                    return Err(AgentError::Retry(
                        "unexpected Content-Range: restarting".into(),
                    ));
                }
                partial.seek(io::SeekFrom::End(0))?;
                tracing::info!(file_id = %c.file_id, offset = have, "resuming download");
            }
            s => return Err(AgentError::Fatal(format!("content: unexpected {s}"))),
        }
        let etag = etag(resp.headers()).ok_or_else(|| AgentError::Retry("no ETag".into()))?;
        let mut body = resp.bytes_stream();
        let started = Instant::now();
        let mut received = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            partial.write_all(&chunk)?;
            received += chunk.len() as u64;
            if let Some(rate) = self.cfg.max_rate.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(received as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        partial.sync_all()?;
        let got = partial.metadata()?.len();
        drop(partial);
        if got != c.size {
            std::fs::remove_file(&partial_path)?;
            return Err(AgentError::Retry(format!(
                "received {got} bytes, expected {}",
                c.size
            )));
        }
        if file_sha256(&partial_path)? != etag {
            std::fs::remove_file(&partial_path)?;
            return Err(AgentError::Retry(
                "downloaded bytes do not match the ETag digest".into(),
            ));
        }
        // Publish under the final name: a hard link fails if anything (file or symlink) is
        // there already, so it is create-exclusive and never shows a half-written file.
        match std::fs::hard_link(&partial_path, &final_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                std::fs::remove_file(&partial_path)?;
                return Err(AgentError::Retry("final file appeared meanwhile".into()));
            }
            Err(e) => return Err(e.into()),
        }
        std::fs::remove_file(&partial_path)?;
        tracing::info!(event = "agent_staged", file_id = %c.file_id, path = %final_path.display(), "file received");
        self.ack(c).await?;
        self.record(c, &final_path).await?;
        Ok(Staged::New)
    }

    async fn ack(&self, c: &Candidate) -> Result<(), AgentError> {
        let resp = self
            .http
            .post(self.url(&format!("/pending-uploads/{}/ack", c.file_id)))
            .bearer_auth(&self.cfg.token)
            .send()
            .await?;
        match resp.status() {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            s if s.is_server_error() => Err(AgentError::Retry(format!("ack: {s}"))),
            s => Err(AgentError::Fatal(format!("ack: {s}"))),
        }
    }

    async fn record(&self, c: &Candidate, path: &Path) -> Result<(), AgentError> {
        let mut index = self.index.lock().await;
        index.insert(c.uri.clone(), path);
        index.save(&self.cfg.dir)?;
        Ok(())
    }

    /// The URI index as it stands (for `rewrite`).
    pub async fn index(&self) -> UriIndex {
        self.index.lock().await.clone()
    }
}

fn candidate(v: &Value) -> Option<Candidate> {
    Some(Candidate {
        file_id: v["file_id"].as_str()?.parse().ok()?,
        name: v["name"].as_str()?.to_string(),
        uri: v["uri"].as_str()?.to_string(),
        size: v["size"].as_u64()?,
    })
}

fn etag(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let v = headers.get(reqwest::header::ETAG)?.to_str().ok()?;
    Some(v.trim_matches('"').to_string())
}

fn file_sha256(path: &Path) -> io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}
