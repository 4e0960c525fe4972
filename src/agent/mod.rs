//! The workspace side (`pending-uploads agent`): follows the activity feed (long polls where
//! the service offers them) and reconciles with the pending list, downloads each staged file
//! with bounded concurrency — resuming an interrupted download with `Range` — verifies it
//! against what the service offers (`Repr-Digest`, else a strong ETag, else the size: rows
//! written by the platform carry no digest), writes it to `DIR/<32 hex>-<name>` (0600,
//! create-exclusive, never a half file under the final name), records the
//! `platform-pending:` → `workspace:` URI mapping, and acks once both are durable.

pub mod index;

use std::{
    io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use base64::{engine::general_purpose::STANDARD, Engine};
use futures::StreamExt;
use reqwest::{header::HeaderMap, StatusCode};
use serde::{de::DeserializeOwned, Serialize};
use tokio::{
    fs::{self, OpenOptions},
    io::{AsyncSeekExt, AsyncWriteExt},
    sync::Mutex,
};
use uuid::Uuid;

use crate::{
    api::PendingUpload,
    config::MAX_FILE_BYTES,
    digest,
    retry::{
        pause, retry,
        Say::{Loud, Quiet},
    },
    sanitize::sanitize,
};
use index::{at, load_cursor, lock_dir, save_cursor, state_dir, sync_dir, UriIndex};

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
    /// How long a request (JSON, HEAD, ack) may take in all, a long poll's wait not counted;
    /// and the longest a download may wait on the platform for [`MIN_PROGRESS`] bytes.
    pub request_timeout: Duration,
}

/// Bytes a download must receive within every `request_timeout` of waiting on the platform:
/// a byte every few seconds passes any read timeout, and kept a pass (and the agent's lock)
/// for hours (a probe: 46 of 10,000 bytes after 4 minutes).
const MIN_PROGRESS: u64 = 1024;

/// One staged file the workspace should receive.
#[derive(Debug, Clone)]
struct Candidate {
    file_id: Uuid,
    name: String,
    uri: String,
    size: u64,
}

impl Candidate {
    /// The index key is the file's own URI, made here: the listed `uri` is the platform's
    /// word, and a wrong one (another workspace's file, a web address) would be rewritten
    /// to this file in chat messages.
    fn from_pending(p: PendingUpload, workspace_id: Uuid) -> Self {
        Candidate {
            file_id: p.file_id,
            name: p.name,
            uri: crate::api::platform_uri(workspace_id, p.file_id),
            size: p.size.max(0) as u64,
        }
    }
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
    /// Worth retrying, once the service's `Retry-After` has passed (a 429 or 503 that says
    /// when it can take the request).
    #[error("{0}")]
    RetryAfter(String, Duration),
    /// Retrying will not help: a conflicting local file, a local I/O error.
    #[error("{0}")]
    Fatal(String),
    /// The platform refused the token: revoked, or its workspace deleted. Nothing the agent
    /// does will change that, so the daemon stops (a supervisor restarts it once a new token
    /// is in place) rather than ask every few seconds for ever.
    #[error("{0}")]
    TokenRefused(String),
    /// The platform answered 400 to a long poll (`wait=`): it has none, or a proxy refuses
    /// the parameter. The pass asks again without it.
    #[error("the platform refused a long poll (wait=)")]
    NoLongPoll,
}

impl AgentError {
    /// `None` when retrying will not help, else the least wait before trying again.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            AgentError::Retry(_) => Some(Duration::ZERO),
            AgentError::RetryAfter(_, after) => Some(*after),
            AgentError::Fatal(_) | AgentError::TokenRefused(_) | AgentError::NoLongPoll => None,
        }
    }

    /// A refusal worth retrying (a 5xx, a 429), with the wait the service asked for.
    fn refused(what: &str, resp: &reqwest::Response) -> Self {
        let msg = format!("{what}: {}", resp.status());
        match retry_after_header(resp.headers()) {
            Some(after) => AgentError::RetryAfter(msg, after),
            None => AgentError::Retry(msg),
        }
    }
}

/// The most of a `Retry-After` the agent honours: a broken or hostile server must not park it
/// for days.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// `Retry-After` (RFC 9110 §10.2.3): delay-seconds, as the service sends, or an HTTP-date, as
/// a proxy or load balancer in front of it may (a date already past is no wait at all).
fn retry_after_header(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(RETRY_AFTER_MAX))
}

impl From<io::Error> for AgentError {
    fn from(e: io::Error) -> Self {
        AgentError::Fatal(format!("local I/O: {e}"))
    }
}

impl From<reqwest::Error> for AgentError {
    /// With its causes: reqwest's own text for a body cut by a timeout is only "error
    /// decoding response body".
    fn from(e: reqwest::Error) -> Self {
        let mut text = format!("platform request failed: {e}");
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            text.push_str(&format!(": {c}"));
            cause = c.source();
        }
        AgentError::Retry(text)
    }
}

enum Staged {
    New,
    AlreadyPresent,
    Gone,
}

/// What a download is checked against: the strongest proof the service offers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expected {
    Sha256([u8; 32]),
    /// A row without a digest (written by the platform or an older release): size only.
    Size,
}

/// `Repr-Digest: sha-256=:<base64>:` (RFC 9530), else a strong ETag holding the hex sha256.
fn expected_from(headers: &HeaderMap) -> Expected {
    let digest = headers
        .get("repr-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(',').find_map(|item| {
                item.trim()
                    .strip_prefix("sha-256=:")?
                    .strip_suffix(':')
                    .map(str::to_string)
            })
        })
        .and_then(|b64| STANDARD.decode(b64).ok())
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok());
    let strong_etag = || {
        let tag = headers.get(reqwest::header::ETAG)?.to_str().ok()?;
        let hex_digest = tag.strip_prefix('"')?.strip_suffix('"')?;
        <[u8; 32]>::try_from(hex::decode(hex_digest).ok()?).ok()
    };
    match digest.or_else(strong_etag) {
        Some(d) => Expected::Sha256(d),
        None => Expected::Size,
    }
}

/// Does the file at `path` match?
async fn verify(path: &Path, size: u64, expected: &Expected) -> io::Result<bool> {
    let (got, len) = digest::of_file(path).await.map_err(at(path))?;
    Ok(len == size
        && match expected {
            Expected::Sha256(want) => got == *want,
            Expected::Size => true,
        })
}

/// What the agent reads of a feed row: the feed only says when to look, and a row it cannot
/// otherwise read (a platform's, with a field missing) must not fail the pass.
#[derive(serde::Deserialize)]
struct FeedRow {
    id: Uuid,
}

/// Pages of the activity feed one pass reads at most (500 rows each) before it reads the
/// pending list anyway: the feed only says when to look.
const MAX_FEED_PAGES: usize = 200;

/// Largest JSON answer the agent reads (a pending list of the service's 10,000 files is
/// about 3 MB): a platform that sends more, or never ends, must not take the laptop's memory.
const MAX_JSON_BYTES: usize = 32 << 20;

/// The pending list's uploads, read entry by entry straight from the answer's bytes: an
/// entry that is no upload is passed over as it is read. Read as a `serde_json::Value` tree
/// first, a 32 MiB list of `{"":0}`s took 3.2 GB at every pass (a probe).
struct PendingList {
    uploads: Vec<PendingUpload>,
    skipped: usize,
    /// Why the first entry passed over was.
    first_error: Option<String>,
}

impl<'de> serde::Deserialize<'de> for PendingList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = PendingList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of pending uploads")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<PendingList, A::Error> {
                let mut list = PendingList {
                    uploads: Vec::new(),
                    skipped: 0,
                    first_error: None,
                };
                // Borrowed: an entry costs nothing until it is read as an upload.
                while let Some(raw) = seq.next_element::<&'de serde_json::value::RawValue>()? {
                    match serde_json::from_str::<PendingUpload>(raw.get()) {
                        Ok(upload) => list.uploads.push(upload),
                        Err(e) => {
                            list.skipped += 1;
                            list.first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                Ok(list)
            }
        }
        d.deserialize_seq(Entries)
    }
}

/// `resp`'s body as JSON, read to at most [`MAX_JSON_BYTES`].
async fn json_within<T: DeserializeOwned>(
    resp: reqwest::Response,
    what: &str,
) -> Result<T, AgentError> {
    let mut body = Vec::new();
    let mut chunks = resp.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        if body.len() + chunk.len() > MAX_JSON_BYTES {
            return Err(AgentError::Retry(format!(
                "{what}: answer over {MAX_JSON_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body)
        .map_err(|e| AgentError::Retry(format!("{what}: answer is not the expected JSON: {e}")))
}

/// What of an answer's body an error quotes: a log line keeps 256 characters of it.
const WORDS_MAX: usize = 4096;

/// The start of `resp`'s body, at most [`WORDS_MAX`] bytes, as much as came `within`.
async fn first_words(resp: reqwest::Response, within: Duration) -> String {
    let mut words = Vec::new();
    let mut chunks = resp.bytes_stream();
    let read = async {
        while let Some(Ok(chunk)) = chunks.next().await {
            let room = WORDS_MAX - words.len();
            words.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if words.len() == WORDS_MAX {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(within, read).await;
    String::from_utf8_lossy(&words).into_owned()
}

/// A partial file untouched this long belongs to an upload that no longer exists.
const PARTIAL_MAX_AGE: Duration = Duration::from_secs(48 * 3600);

/// How long a long poll waits for a new row. An empty answer long before that (a service
/// without long polls, or a replica shutting down) is followed by the poll interval.
const LONG_POLL: Duration = Duration::from_secs(25);
pub struct Agent {
    cfg: AgentConfig,
    http: reqwest::Client,
    index: Mutex<Recorded>,
    /// `Recorded::changes` as the index on disk holds them. Locked through a save: one at a
    /// time, and each covers every entry recorded before it began, so files staged together
    /// share a save (the index was written whole once per file: 10,000 one-byte files wrote
    /// 8.8 GB, a probe).
    saved: Mutex<u64>,
    /// `--max-rate`, shared by the downloads under way.
    pacer: Option<Pacer>,
    /// False once the platform refused a long poll: it is polled every interval from then on
    /// (a pass that failed at every second turn before, a WARN each, for ever).
    long_poll: AtomicBool,
    /// One agent per DIR (`index::lock_dir`): held, never read, until the agent is dropped.
    _lock: std::fs::File,
}

/// The URI index in memory, and how many times it has changed since the agent started (one
/// at start when it was pruned or made again: saved with the first file).
struct Recorded {
    index: UriIndex,
    changes: u64,
}

/// A rate all of an agent's downloads share (`--max-rate`): a laptop's link is one link, and
/// `--concurrency 4` must not make the cap four times the rate.
struct Pacer {
    bytes_per_sec: f64,
    /// When the bytes taken so far fit in the rate; never behind `now` by more than an idle
    /// spell's start (no saving up while nothing downloads).
    free_at: std::sync::Mutex<Instant>,
}

impl Pacer {
    fn new(bytes_per_sec: u64) -> Pacer {
        Pacer {
            bytes_per_sec: bytes_per_sec as f64,
            free_at: std::sync::Mutex::new(Instant::now()),
        }
    }

    /// Waits until `bytes` more, every download's counted, fit in the rate.
    async fn take(&self, bytes: u64) {
        let due = {
            let mut free_at = self.free_at.lock().unwrap_or_else(|p| p.into_inner());
            let from = (*free_at).max(Instant::now());
            *free_at = from + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
            *free_at
        };
        tokio::time::sleep_until(due.into()).await;
    }
}

impl Agent {
    /// Fails (`ErrorKind::WouldBlock`) while another agent works on the same DIR.
    pub fn new(cfg: AgentConfig) -> io::Result<Agent> {
        let partial = state_dir(&cfg.dir).join("partial");
        std::fs::create_dir_all(&partial).map_err(at(&partial))?;
        // The agent writes its state and partial files there: a symlink would take them
        // elsewhere (a probe's partial files landed outside DIR).
        for dir in [state_dir(&cfg.dir), partial] {
            if std::fs::symlink_metadata(&dir)
                .map_err(at(&dir))?
                .file_type()
                .is_symlink()
            {
                return Err(io::Error::other(format!(
                    "{} is a symlink: refusing to write the agent's state through it",
                    dir.display()
                )));
            }
        }
        let dir = std::fs::canonicalize(&cfg.dir).map_err(at(&cfg.dir))?;
        // locked before the index is loaded: no other agent saves it after this
        let lock = lock_dir(&dir)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(LONG_POLL + Duration::from_secs(35))
            // Below the service's HEADER_READ_TIMEOUT, after which it closes an idle
            // connection: reusing one just then would lose the request to the close.
            .pool_idle_timeout(Duration::from_secs(5))
            // The service sends no redirect, and reqwest drops the token on a hop to another
            // host but sends it again on that host's next hop to itself (a probe's second
            // host got it): none is followed, the answer says where it pointed.
            .redirect(reqwest::redirect::Policy::none())
            .referer(false)
            .build()
            .map_err(io::Error::other)?;
        let (mut index, rebuilt) = UriIndex::load_or_rebuild(&dir, cfg.workspace_id);
        let pruned = index.prune_missing();
        if pruned > 0 {
            tracing::info!(
                pruned,
                "index entries of files no longer in DIR dropped (saved with the next file)"
            );
        }
        Ok(Agent {
            index: Mutex::new(Recorded {
                index,
                changes: u64::from(rebuilt || pruned > 0),
            }),
            saved: Mutex::new(0),
            pacer: cfg.max_rate.filter(|r| *r > 0).map(Pacer::new),
            long_poll: AtomicBool::new(true),
            cfg: AgentConfig { dir, ..cfg },
            http,
            _lock: lock,
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

    /// A JSON GET: `None` for a 410 (the caller decides), an error for anything unexpected.
    /// It may take `request_timeout` in all, plus `wait` (a long poll's).
    async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        wait: Duration,
    ) -> Result<Option<T>, AgentError> {
        let resp = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.cfg.token)
            .timeout(self.cfg.request_timeout + wait)
            .send()
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(Some(json_within(resp, path).await?)),
            StatusCode::GONE => Ok(None),
            StatusCode::BAD_REQUEST if !wait.is_zero() => Err(AgentError::NoLongPoll),
            _ => {
                let what = format!(
                    "{} (is --platform-url the platform's base URL?)",
                    without_credentials(&self.url(path))
                );
                Err(self.unexpected(&what, resp).await)
            }
        }
    }

    /// Any other answer to `what`: a refused token stops the agent, a 5xx or 429 is tried
    /// again (once its Retry-After has passed), anything else fails.
    async fn unexpected(&self, what: &str, resp: reqwest::Response) -> AgentError {
        match resp.status() {
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                self.token_refused(s, resp).await
            }
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                AgentError::refused(what, &resp)
            }
            s if s.is_redirection() => {
                let to = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|to| resp.url().join(to).ok())
                    .map_or_else(
                        || "no readable place".into(),
                        |to| without_credentials(to.as_str()),
                    );
                AgentError::Fatal(format!(
                    "{what}: the platform redirected ({s}) to {}: the agent follows no redirect \
                     (it would carry the token there); if that is the platform, give its \
                     address as --platform-url",
                    crate::logfmt::clip(&to).as_str()
                ))
            }
            s => AgentError::Fatal(format!("{what}: unexpected {s}")),
        }
    }

    /// The error for a refused token, with the platform's own words: the start of them, read
    /// within the request's deadline (read whole, an endless 401 took 2.3 GB in 6 s, and one
    /// that trickled held a download for ever; an audit).
    async fn token_refused(&self, status: StatusCode, resp: reqwest::Response) -> AgentError {
        let said = first_words(resp, self.cfg.request_timeout).await;
        // What to do first: a log line keeps 256 characters, and long words cut it off.
        AgentError::TokenRefused(format!(
            "the platform refused the token for workspace {} ({status}): it was revoked, or \
             the workspace deleted; mint a new token and restart the agent. It said: {}",
            self.cfg.workspace_id,
            crate::logfmt::clip(said.trim()).as_str()
        ))
    }

    async fn get_json_retrying<T: DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
        wait: Duration,
    ) -> Result<Option<T>, AgentError> {
        // Said once by the pass that fails (`Outage`), not at every attempt.
        retry(
            what,
            self.cfg.retries,
            Quiet,
            AgentError::retry_after,
            || self.get_json(path, wait),
        )
        .await
    }

    /// Reads the activity feed to its end (advancing the persisted cursor; with `wait`, the
    /// first request is a long poll), then returns what the pending list holds.
    ///
    /// The feed only says *when* to look: the pending list, read after it, is every unacked
    /// upload, those the feed announced included. A feed row whose file is not in it was acked
    /// (here, in an earlier pass) or expired; fetching it again would bring back a file its
    /// owner deleted, as it did after every cursor reset (a 410 rewinds to a 24 h window).
    async fn discover(&self, mut wait: Option<Duration>) -> Result<Vec<Candidate>, AgentError> {
        let filter = "type=a2a_receive&method=chat_upload_receive&limit=500";
        let mut cursor = load_cursor(&self.cfg.dir);
        let mut pages_seen: std::collections::HashSet<String> = cursor.iter().cloned().collect();
        let mut reset = false;
        loop {
            let (path, waits) = match (&cursor, wait.take()) {
                (Some(c), Some(w)) => (
                    format!("/activity?{filter}&since_id={c}&wait={}", w.as_secs()),
                    w,
                ),
                (Some(c), None) => (format!("/activity?{filter}&since_id={c}"), Duration::ZERO),
                (None, _) => (
                    format!("/activity?{filter}&since_secs=86400"),
                    Duration::ZERO,
                ),
            };
            let asked = self.get_json_retrying::<Vec<FeedRow>>("activity", &path, waits);
            let Some(rows) = (match asked.await {
                Err(AgentError::NoLongPoll) => {
                    self.long_poll.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        event = "agent_no_long_poll",
                        "the platform answered 400 to a long poll (wait=): polling every interval from now on"
                    );
                    // `wait` was taken: the same page again, without it.
                    continue;
                }
                asked => asked?,
            }) else {
                if cursor.is_none() {
                    // Nothing to reset: asked again at once, it spun (thousands a second).
                    return Err(AgentError::Retry(
                        "activity feed answered 410 to no cursor".into(),
                    ));
                }
                tracing::warn!(cursor = ?cursor, "activity cursor no longer known: resetting to a recent window");
                save_cursor(&self.cfg.dir, None).await?;
                cursor = None;
                // Once a pass: a feed that forgets every cursor it gives had the agent page
                // and reset 400 times a pass (a probe). The pending list is read anyway.
                if std::mem::replace(&mut reset, true) {
                    break;
                }
                continue;
            };
            // with a cursor the rows come oldest first; without, newest first
            let newest = if cursor.is_some() {
                rows.last()
            } else {
                rows.first()
            };
            let Some(next) = newest.map(|r| r.id.to_string()) else {
                break;
            };
            // A feed that gives a cursor back, or rows it gave before, is at its end (or
            // broken): paging on would never reach the pending list.
            if !pages_seen.insert(next.clone()) {
                break;
            }
            if pages_seen.len() > MAX_FEED_PAGES {
                tracing::warn!(
                    pages = MAX_FEED_PAGES,
                    "activity feed still paging: reading the pending list"
                );
                break;
            }
            // from here on page forward (oldest first) after the newest row seen
            save_cursor(&self.cfg.dir, Some(&next)).await?;
            cursor = Some(next);
        }
        let Some(list) = self
            .get_json_retrying::<PendingList>("pending list", "/pending-uploads", Duration::ZERO)
            .await?
        else {
            return Ok(Vec::new());
        };
        // One entry the agent cannot read must not keep it from the others; said once a
        // pass, not once an entry (a list of a million would be a million lines).
        if let Some(error) = &list.first_error {
            tracing::warn!(
                skipped = list.skipped,
                first_error = crate::logfmt::clip(error).as_str(),
                "pending list entries skipped: not uploads"
            );
        }
        let pending = list.uploads;
        // Once each: two downloads of one file shared its partial file, and the second's
        // restart truncated the first's published file through their hard link.
        let mut seen = std::collections::HashSet::new();
        Ok(pending
            .into_iter()
            .filter(|p| seen.insert(p.file_id))
            .map(|p| Candidate::from_pending(p, self.cfg.workspace_id))
            .collect())
    }

    /// One pass: discover, stage everything with bounded concurrency, ack.
    pub async fn run_once(&self) -> Result<PassReport, AgentError> {
        self.pass(None).await
    }

    async fn pass(&self, wait: Option<Duration>) -> Result<PassReport, AgentError> {
        let candidates = self.discover(wait).await?;
        self.remove_unlisted_partials(&candidates).await;
        let outcomes: Vec<(Candidate, Result<Staged, AgentError>)> =
            futures::stream::iter(candidates)
                .map(|c| async move {
                    let r = retry(
                        "download",
                        self.cfg.retries,
                        Loud,
                        AgentError::retry_after,
                        || self.stage(&c),
                    )
                    .await;
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
                    // A `&str` field: the text format quotes it, and the error may quote
                    // the platform (a refused token's answer), whose words written as they
                    // came read as fields of the line.
                    let error = crate::logfmt::clip(&e.to_string());
                    tracing::error!(file_id = %c.file_id, error = error.as_str(), "could not stage file");
                }
            }
        }
        Ok(report)
    }

    /// Passes forever. Between passes it long-polls the feed, so a new upload is fetched as
    /// soon as it commits; against a service without long polls it sleeps `interval`. Backs
    /// off (with jitter) while the platform is down, and waits `interval` after a pass in
    /// which a file failed (a file that fails every time must not spin the loop); the pass
    /// after a failure does not long-poll.
    /// Ends only when the platform refuses the token ([`AgentError::TokenRefused`]).
    pub async fn run_forever(&self, interval: Duration) -> Result<(), AgentError> {
        let mut failures = 0;
        let mut failed_file = false;
        let mut outage = Outage::default();
        loop {
            let started = Instant::now();
            // A long poll needs a cursor (SPEC: `wait` with `since_id`): a fresh directory
            // polls plainly until the feed has a first row. Every pass with a cursor asks to
            // wait; a service that does not answers at once, and the interval is slept then.
            // Not after a failure: what failed is still pending, and a long poll would try it
            // again only when news or the end of its wait answered it (up to 30 s).
            let wait = match failures > 0 || failed_file || !self.long_poll.load(Ordering::Relaxed)
            {
                true => None,
                false => load_cursor(&self.cfg.dir).map(|_| LONG_POLL),
            };
            let pause = match self.pass(wait).await {
                Ok(r) => {
                    failures = 0;
                    outage.over();
                    failed_file = r.failed > 0;
                    if r != PassReport::default() {
                        tracing::info!(
                            staged = r.staged,
                            present = r.already_present,
                            gone = r.gone,
                            failed = r.failed,
                            "agent pass"
                        );
                    }
                    pause_after(&r, wait.is_some(), started.elapsed(), interval)
                }
                Err(e @ AgentError::TokenRefused(_)) => return Err(e),
                Err(e) => {
                    failures += 1;
                    let asked = e.retry_after().unwrap_or_default();
                    let wait = pause(failures, asked).max(interval);
                    outage.failed(&e, wait);
                    wait
                }
            };
            tokio::time::sleep(pause).await;
        }
    }

    fn final_path(&self, c: &Candidate) -> PathBuf {
        self.cfg
            .dir
            .join(format!("{}-{}", c.file_id.simple(), sanitize(&c.name, 100)))
    }

    /// Removes the partial files of uploads the pending list no longer holds: acked by another
    /// agent, deleted or expired while this one was stopped mid-download. No pass asks for
    /// them again (they stayed for ever; then 48 h; a probe's 5.9 MB one after every later
    /// pass). Those untouched for longer than an upload lives are said to be stale. Best
    /// effort.
    async fn remove_unlisted_partials(&self, listed: &[Candidate]) {
        let dir = state_dir(&self.cfg.dir).join("partial");
        let Ok(mut entries) = fs::read_dir(&dir).await else {
            return;
        };
        let listed: std::collections::HashSet<String> = listed
            .iter()
            .map(|c| format!("{}.part", c.file_id.simple()))
            .collect();
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".part") || listed.contains(&name) {
                continue;
            }
            let stale = entry
                .metadata()
                .await
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > PARTIAL_MAX_AGE);
            if fs::remove_file(entry.path()).await.is_ok() {
                match stale {
                    true => {
                        tracing::info!(
                            path = logged_path(&entry.path()).as_str(),
                            "stale partial file removed"
                        )
                    }
                    false => {
                        tracing::info!(
                            path = logged_path(&entry.path()).as_str(),
                            "partial file of an upload no longer pending removed"
                        )
                    }
                }
            }
        }
    }

    fn partial_path(&self, c: &Candidate) -> PathBuf {
        state_dir(&self.cfg.dir)
            .join("partial")
            .join(format!("{}.part", c.file_id.simple()))
    }

    fn content_url(&self, c: &Candidate) -> String {
        self.url(&format!("/pending-uploads/{}/content", c.file_id))
    }

    async fn stage(&self, c: &Candidate) -> Result<Staged, AgentError> {
        // The listed size bounds what a download may write: no file is larger than the
        // service's per-file cap (SPEC §9, the table's CHECK), whatever a platform lists.
        // SPEC §9: the per-file cap, which deployments may only lower.
        if c.size > MAX_FILE_BYTES {
            return Err(AgentError::Fatal(format!(
                "listed as {} bytes, over the {MAX_FILE_BYTES} a file may have",
                c.size
            )));
        }
        // A file received before under another name (the listed name is the platform's word,
        // and a platform that renamed a file at every pass had it downloaded again at every
        // pass, a probe) is confirmed where it is.
        let recorded = self.index.lock().await.index.path_of(&c.uri);
        let final_path = match recorded {
            Some(known)
                if fs::symlink_metadata(&known)
                    .await
                    .is_ok_and(|m| m.is_file()) =>
            {
                known
            }
            _ => self.final_path(c),
        };
        if let Ok(meta) = fs::symlink_metadata(&final_path).await {
            // Read back only a file: a symlink to /dev/zero was hashed for ever, a FIFO
            // waited for ever (a probe).
            if !meta.file_type().is_file() {
                return Err(AgentError::Fatal(format!(
                    "{} exists and is not a regular file",
                    final_path.display()
                )));
            }
            return self.confirm_present(c, &final_path).await;
        }
        let partial_path = self.partial_path(c);
        let Some(expected) = self.download(c, &partial_path).await? else {
            return Ok(Staged::Gone);
        };
        if !verify(&partial_path, c.size, &expected).await? {
            fs::remove_file(&partial_path)
                .await
                .map_err(at(&partial_path))?;
            let digest = match &expected {
                Expected::Sha256(d) => format!("sha256 {}", hex::encode(d)),
                Expected::Size => "no digest".into(),
            };
            return Err(AgentError::Retry(format!(
                "downloaded bytes do not match (expected {} bytes, {digest})",
                c.size
            )));
        }
        self.publish(&partial_path, &final_path).await?;
        tracing::info!(event = "agent_staged", file_id = %c.file_id, path = logged_path(&final_path).as_str(), "file received");
        self.record_then_ack(c, &final_path).await?;
        Ok(Staged::New)
    }

    /// Publishes the verified partial file under its final name, durably.
    async fn publish(&self, partial_path: &Path, final_path: &Path) -> Result<(), AgentError> {
        // A hard link fails if anything (file or symlink) is there already, so it is
        // create-exclusive and never shows a half-written file.
        match fs::hard_link(partial_path, final_path).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_file(partial_path)
                    .await
                    .map_err(at(partial_path))?;
                return Err(AgentError::Retry("final file appeared meanwhile".into()));
            }
            Err(e) => return Err(at(final_path)(e).into()),
        }
        // The bytes were synced by `download`; the new name is durable only once DIR is.
        sync_dir(&self.cfg.dir).await?;
        fs::remove_file(partial_path)
            .await
            .map_err(at(partial_path))?;
        Ok(())
    }

    /// The index entry first, the ack last. Once acked, the row leaves the pending list and
    /// no later pass fetches it again: a crash (or an index write error) after the ack would
    /// lose the file's mapping for good (SPEC §10: no lost acknowledged upload), and the
    /// file's name too had DIR not been synced before. A crash before the ack is harmless:
    /// the next pass finds the file, records it again (the same entry) and acks it.
    async fn record_then_ack(&self, c: &Candidate, path: &Path) -> Result<(), AgentError> {
        self.record(c, path).await?;
        self.ack(c).await
    }

    /// A file written by an earlier run that stopped before its ack: verify, record, ack.
    async fn confirm_present(&self, c: &Candidate, path: &Path) -> Result<Staged, AgentError> {
        let head = self
            .http
            .head(self.content_url(c))
            .bearer_auth(&self.cfg.token)
            .timeout(self.cfg.request_timeout)
            .send()
            .await?;
        // As the GET's answers are taken: a refusal's Retry-After is waited out, a refused
        // token is fatal.
        match head.status() {
            StatusCode::NOT_FOUND => {
                self.record(c, path).await?;
                return Ok(Staged::Gone);
            }
            s if s.is_success() => {}
            _ => return Err(self.unexpected("content HEAD", head).await),
        }
        if !verify(path, c.size, &expected_from(head.headers())).await? {
            return Err(AgentError::Fatal(format!(
                "{} exists with other content",
                path.display()
            )));
        }
        // the run that linked it may have died before syncing DIR
        sync_dir(&self.cfg.dir).await?;
        self.record_then_ack(c, path).await?;
        Ok(Staged::AlreadyPresent)
    }

    /// Downloads into the partial file, resuming what an earlier attempt left there; returns
    /// what the bytes must match, or `None` when the upload is gone (expired or swept).
    async fn download(
        &self,
        c: &Candidate,
        partial_path: &Path,
    ) -> Result<Option<Expected>, AgentError> {
        let mut partial = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // never write through a symlink planted at the partial path
            .custom_flags(libc::O_NOFOLLOW)
            .open(partial_path)
            .await
            .map_err(at(partial_path))?;
        let have = partial.metadata().await.map_err(at(partial_path))?.len();
        // A partial file as long as the upload (the agent stopped between its last byte and
        // publishing it) asks for the last byte again: the answer's validators check the
        // whole. A range from its end was a 416, and the whole file downloaded again.
        let from = match have {
            h if h > 0 && h >= c.size && c.size > 0 => c.size - 1,
            h => h,
        };
        if from < have {
            partial.set_len(from).await?;
        }
        let mut req = self
            .http
            .get(self.content_url(c))
            .bearer_auth(&self.cfg.token);
        if from > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
        }
        // Its head within the timeout; its body is watched for progress below.
        let resp = match tokio::time::timeout(self.cfg.request_timeout, req.send()).await {
            Ok(sent) => sent?,
            Err(_) => {
                return Err(AgentError::Retry(format!(
                    "content: no answer within {:?}",
                    self.cfg.request_timeout
                )))
            }
        };
        let resp_is_whole = resp.status() == StatusCode::OK;
        match resp.status() {
            StatusCode::NOT_FOUND => {
                drop(partial);
                let _ = fs::remove_file(partial_path).await;
                tracing::info!(file_id = %c.file_id, "upload expired or swept before fetch: skipped");
                return Ok(None);
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                partial.set_len(0).await?;
                return Err(AgentError::Retry(
                    "partial file longer than the upload: restarting".into(),
                ));
            }
            StatusCode::OK => {
                partial.set_len(0).await?;
                partial.seek(io::SeekFrom::Start(0)).await?;
            }
            StatusCode::PARTIAL_CONTENT => {
                let starts_at = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(crate::api::content_range)
                    .map(|(start, _, _)| start);
                if starts_at != Some(from) {
                    partial.set_len(0).await?;
                    return Err(AgentError::Retry(
                        "unexpected Content-Range: restarting".into(),
                    ));
                }
                partial.seek(io::SeekFrom::End(0)).await?;
                tracing::info!(file_id = %c.file_id, offset = from, "resuming download");
            }
            // A 429: the workspace has its downloads' worth streaming (a higher
            // --concurrency than the service allows, or another reader of the workspace).
            _ => return Err(self.unexpected("content", resp).await),
        }
        let expected = expected_from(resp.headers());
        let mut body = resp.bytes_stream();
        // No more than the upload's size reaches the disk, whatever the answer sends.
        let mut room = match resp_is_whole {
            true => c.size,
            false => c.size.saturating_sub(from),
        };
        // Time spent waiting on the platform (not on --max-rate) and bytes, since the
        // download last had MIN_PROGRESS bytes.
        let (mut waited, mut got) = (Duration::ZERO, 0u64);
        loop {
            let asked = Instant::now();
            let left = self.cfg.request_timeout.saturating_sub(waited);
            let Ok(next) = tokio::time::timeout(left, body.next()).await else {
                return Err(AgentError::Retry(format!(
                    "download stalled: under {MIN_PROGRESS} bytes in {:?}",
                    self.cfg.request_timeout
                )));
            };
            let Some(chunk) = next else { break };
            let chunk = chunk?;
            waited += asked.elapsed();
            got += chunk.len() as u64;
            if got >= MIN_PROGRESS {
                (waited, got) = (Duration::ZERO, 0);
            }
            if chunk.len() as u64 > room {
                drop(partial);
                let _ = fs::remove_file(partial_path).await;
                return Err(AgentError::Retry(format!(
                    "content longer than the listed {} bytes",
                    c.size
                )));
            }
            room -= chunk.len() as u64;
            partial.write_all(&chunk).await.map_err(at(partial_path))?;
            if let Some(pacer) = &self.pacer {
                pacer.take(chunk.len() as u64).await;
            }
        }
        // The last write's error (ENOSPC) comes back here, not from `sync_all`.
        partial.flush().await.map_err(at(partial_path))?;
        partial.sync_all().await.map_err(at(partial_path))?;
        Ok(Some(expected))
    }

    async fn ack(&self, c: &Candidate) -> Result<(), AgentError> {
        let resp = self
            .http
            .post(self.url(&format!("/pending-uploads/{}/ack", c.file_id)))
            .bearer_auth(&self.cfg.token)
            .timeout(self.cfg.request_timeout)
            .send()
            .await?;
        match resp.status() {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            _ => Err(self.unexpected("ack", resp).await),
        }
    }

    /// Saves the mapping durably (`write_atomic` syncs the state folder) before it returns.
    /// A save writes the whole index, so an entry a failed save left in memory is written by
    /// the next one; an entry already on disk (a file confirmed again) writes nothing.
    async fn record(&self, c: &Candidate, path: &Path) -> Result<(), AgentError> {
        let wanted = {
            let mut recorded = self.index.lock().await;
            if recorded.index.insert(c.uri.clone(), path) {
                recorded.changes += 1;
            }
            recorded.changes
        };
        let mut saved = self.saved.lock().await;
        if *saved >= wanted {
            return Ok(());
        }
        let (index, changes) = {
            let recorded = self.index.lock().await;
            (recorded.index.clone(), recorded.changes)
        };
        index.save(&self.cfg.dir).await?;
        *saved = changes;
        Ok(())
    }

    /// The URI index as it stands (for `rewrite`).
    pub async fn index(&self) -> UriIndex {
        self.index.lock().await.index.clone()
    }
}

/// Passes failing in a row: a line when they start, each time the error changes and at
/// least every [`OUTAGE_REMINDER`], and one when a pass works again. The same error every
/// backoff while the platform was down filled a laptop's log with nothing new (an operator
/// probe).
#[derive(Default)]
struct Outage {
    since: Option<Instant>,
    passes: u32,
    said: String,
    said_at: Option<Instant>,
}

const OUTAGE_REMINDER: Duration = Duration::from_secs(3600);

impl Outage {
    fn failed(&mut self, e: &AgentError, wait: Duration) {
        self.since.get_or_insert_with(Instant::now);
        self.passes += 1;
        let error = e.to_string();
        let wait_ms = wait.as_millis() as u64;
        let recently = self
            .said_at
            .is_some_and(|at| at.elapsed() < OUTAGE_REMINDER);
        if error == self.said && recently {
            tracing::debug!(
                error,
                wait_ms,
                passes = self.passes,
                "agent pass failed again"
            );
            return;
        }
        tracing::warn!(
            event = "agent_pass_failed",
            error,
            wait_ms,
            passes = self.passes,
            "agent pass failed (the same error again is logged hourly, until a pass works)"
        );
        self.said = error;
        self.said_at = Some(Instant::now());
    }

    fn over(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                event = "agent_recovered",
                failed_passes = self.passes,
                secs = since.elapsed().as_secs(),
                "agent pass worked again"
            );
        }
        *self = Outage::default();
    }
}

/// A path as logged: a `&str` field (quoted in the text format; DIR is the user's to name).
pub(crate) fn logged_path(path: &Path) -> String {
    crate::logfmt::clip(&path.display().to_string())
}

/// `url` as logged: a user or password in it is not for the logs.
pub fn without_credentials(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Err(_) => "(not a URL)".into(),
    }
}

/// The pause before the next pass: none after new files were received (more may be
/// waiting) or after a long poll that waited (news answered it, or its wait ended);
/// `interval` after a failed file, after a pass that received nothing new (only files it
/// had, or gone ones: a platform that kept listing an acked file had the agent hash it and
/// ack it again 20 times a second, a probe), and after an empty answer that came at once
/// (no cursor yet, or a service without long polls).
fn pause_after(r: &PassReport, waited: bool, took: Duration, interval: Duration) -> Duration {
    if r.failed > 0 {
        interval
    } else if r.staged > 0 || (waited && took >= LONG_POLL / 2) {
        Duration::ZERO
    } else {
        interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_is_read_in_seconds_and_capped() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(reqwest::header::RETRY_AFTER, HeaderValue::from_static(v));
            retry_after_header(&h)
        };
        assert_eq!(with("2"), Some(Duration::from_secs(2)));
        assert_eq!(with(" 60 "), Some(Duration::from_secs(60)));
        assert_eq!(with("99999999999"), Some(RETRY_AFTER_MAX));
        assert_eq!(with("-1"), None);
        assert_eq!(with("soon"), None);
        assert_eq!(retry_after_header(&HeaderMap::new()), None);
    }

    #[test]
    fn retry_after_may_be_an_http_date() {
        let at = |t: std::time::SystemTime| {
            let mut h = HeaderMap::new();
            let date = httpdate::fmt_http_date(t);
            h.insert(reqwest::header::RETRY_AFTER, date.parse().unwrap());
            retry_after_header(&h)
        };
        let now = std::time::SystemTime::now();
        let wait = at(now + Duration::from_secs(60)).unwrap();
        // The date has whole seconds: 59 s and a fraction to 60 s from now.
        assert!(
            wait > Duration::from_secs(58) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert_eq!(at(now - Duration::from_secs(60)), Some(Duration::ZERO));
        assert_eq!(at(now + Duration::from_secs(86_400)), Some(RETRY_AFTER_MAX));
        let mut h = HeaderMap::new();
        // RFC 9110's obsolete forms are HTTP-dates too.
        h.insert(
            reqwest::header::RETRY_AFTER,
            HeaderValue::from_static("Sunday, 06-Nov-94 08:49:37 GMT"),
        );
        assert_eq!(retry_after_header(&h), Some(Duration::ZERO));
    }

    proptest::proptest! {
        /// Whatever a server sends, the wait is read without a panic and never past the cap;
        /// delay-seconds are taken as they are.
        #[test]
        fn any_retry_after_is_read_within_the_cap(value in "[ -~]{0,40}", secs in 0u64..1_000) {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(reqwest::header::RETRY_AFTER, v);
                proptest::prop_assert!(retry_after_header(&h).is_none_or(|w| w <= RETRY_AFTER_MAX));
            }
            h.insert(reqwest::header::RETRY_AFTER, HeaderValue::from(secs));
            let want = Duration::from_secs(secs).min(RETRY_AFTER_MAX);
            proptest::prop_assert_eq!(retry_after_header(&h), Some(want));
        }
    }

    #[test]
    fn the_pause_between_passes() {
        let (early, full, interval) =
            (Duration::from_millis(50), LONG_POLL, Duration::from_secs(5));
        let nothing = PassReport::default();
        let staged = PassReport {
            staged: 1,
            ..PassReport::default()
        };
        let failed = PassReport {
            failed: 1,
            ..staged.clone()
        };
        // Files received: straight on; a wait that ended: straight on.
        assert_eq!(pause_after(&staged, true, early, interval), Duration::ZERO);
        assert_eq!(pause_after(&nothing, true, full, interval), Duration::ZERO);
        // Only files it had, or gone ones: nothing new, the interval.
        let seen = PassReport {
            already_present: 3,
            gone: 1,
            ..PassReport::default()
        };
        assert_eq!(pause_after(&seen, true, early, interval), interval);
        assert_eq!(pause_after(&seen, false, early, interval), interval);
        // No cursor yet, a service without long polls, a replica shutting down, a file
        // failing every time: the interval, never a spin.
        assert_eq!(pause_after(&nothing, false, early, interval), interval);
        assert_eq!(pause_after(&nothing, true, early, interval), interval);
        assert_eq!(pause_after(&failed, true, full, interval), interval);
    }

    #[test]
    fn what_a_download_is_checked_against() {
        let digest = [7u8; 32];
        let mut h = HeaderMap::new();
        assert_eq!(expected_from(&h), Expected::Size);
        h.insert(
            "etag",
            HeaderValue::from_static("W/\"0b9c1f5e-0000-4000-8000-000000000000\""),
        );
        assert_eq!(
            expected_from(&h),
            Expected::Size,
            "a weak tag proves nothing"
        );
        h.insert(
            "etag",
            HeaderValue::from_str(&format!("\"{}\"", hex::encode(digest))).unwrap(),
        );
        assert_eq!(expected_from(&h), Expected::Sha256(digest));
        let other = [9u8; 32];
        h.insert(
            "repr-digest",
            HeaderValue::from_str(&format!(
                "sha-512=:AAAA:, sha-256=:{}:",
                STANDARD.encode(other)
            ))
            .unwrap(),
        );
        assert_eq!(
            expected_from(&h),
            Expected::Sha256(other),
            "Repr-Digest wins"
        );
    }
}
