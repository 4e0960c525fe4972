use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::{postgres::PgArguments, Arguments, PgConnection, PgExecutor, Row};
use std::sync::LazyLock;
use uuid::Uuid;

use super::{
    tokens::{checked_rows, Checked, CALLER, CALLER_UNSTAMPED},
    Db,
};
use crate::{spool::Spool, storage::Location};

/// A row as the fetch, ack and sweep paths need it (never its bytes).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UploadRow {
    pub file_id: Uuid,
    pub workspace_id: Uuid,
    pub size_bytes: i64,
    pub filename: String,
    pub mimetype: String,
    pub content_sha256: Option<Vec<u8>>,
    pub s3_key: Option<String>,
    pub has_content: bool,
    pub created_at: DateTime<Utc>,
    pub fetched_at: Option<DateTime<Utc>>,
    pub acked_at: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
    /// Insertion order; with created_at, the key lists are ordered and paged by.
    pub seq: i64,
}

impl UploadRow {
    pub fn location(&self) -> Location {
        Location {
            file_id: self.file_id,
            workspace_id: self.workspace_id,
            size: self.size_bytes as u64,
            inline: self.has_content,
            s3_key: self.s3_key.clone(),
        }
    }
}

const COLUMNS: &str = "file_id, workspace_id, size_bytes, filename, mimetype, content_sha256, s3_key, \
                       content IS NOT NULL AS has_content, created_at, fetched_at, acked_at, expires_at, seq";

/// [`COLUMNS`] of a table aliased `p`.
const P_COLUMNS: &str = "p.file_id, p.workspace_id, p.size_bytes, p.filename, p.mimetype, p.content_sha256, \
                         p.s3_key, p.content IS NOT NULL AS has_content, p.created_at, p.fetched_at, \
                         p.acked_at, p.expires_at, p.seq";

/// The columns a new row is written with, in the order an INSERT sends them.
const WRITE_COLUMNS: &str =
    "file_id, workspace_id, size_bytes, filename, mimetype, content_sha256, s3_key, content";

/// [`WRITE_COLUMNS`] but the digest, as a COPY sends them: the digest is set afterwards
/// ([`set_digests`]), taken while the server stores the row.
const COPY_COLUMNS: &str = "file_id, workspace_id, size_bytes, filename, mimetype, s3_key, content";

pub struct NewUpload<'a> {
    pub file_id: Uuid,
    pub workspace_id: Uuid,
    pub filename: &'a str,
    pub mimetype: &'a str,
    pub spool: &'a Spool,
    pub location: &'a Location,
}

/// Rows whose inline bytes are spooled on disk go in with a plain INSERT up to this size,
/// read back whole; larger ones stream in with COPY. For small rows COPY's per-statement
/// setup dominates: with 1 KiB files pg_stat_statements showed a mean of 0.55 ms per COPY
/// against 0.16 ms per INSERT of the same rows. Rows held in memory always take the INSERT
/// (see [`NewUpload::inserts`]).
pub const INSERT_MAX_BYTES: u64 = 256 * 1024;

impl NewUpload<'_> {
    /// Whether the row goes in with an INSERT, its inline bytes one parameter: no inline
    /// bytes, bytes already in memory, or a few on disk. Otherwise a COPY streams them.
    /// For the same 1 MiB row Postgres spends about twice the CPU on a binary COPY as on an
    /// INSERT (here 6.9 vs 4.3 ms: the COPY copies the bytes through two more buffers).
    pub fn inserts(&self) -> bool {
        !self.location.inline
            || self.spool.in_memory().is_some()
            || self.spool.size <= INSERT_MAX_BYTES
    }
}

/// The quota verdict of an upload's commit (`pending_uploads_admit`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Admission {
    /// `bytes` or `files` when refused; nothing was written then.
    pub refused: Option<String>,
    pub pending_bytes: i64,
    pub pending_files: i64,
}

/// The per-workspace quotas an upload is admitted under.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    pub max_bytes: u64,
    pub max_files: u64,
}

/// Column arrays of an upload's rows, in input order.
struct Columns {
    ids: Vec<Uuid>,
    names: Vec<String>,
    mimes: Vec<String>,
    sizes: Vec<i64>,
}

fn columns(rows: &[NewUpload<'_>]) -> Columns {
    Columns {
        ids: rows.iter().map(|r| r.file_id).collect(),
        names: rows.iter().map(|r| r.filename.to_string()).collect(),
        mimes: rows.iter().map(|r| r.mimetype.to_string()).collect(),
        sizes: rows.iter().map(|r| r.spool.size as i64).collect(),
    }
}

/// A whole upload of small rows in one statement, its own transaction
/// (`pending_uploads_stage`, or `pending_uploads_stage_one` for one file): rows, then under
/// the workspace lock admission, totals, activity rows, notification (a refused upload's rows
/// are deleted again). `contents` holds each row's inline bytes (rows that
/// [`NewUpload::inserts`]), `None` for S3-only rows, and `digests` each row's sha256; the caller is
/// the workspace and its token's hash, and `lock_wait` bounds the wait for the workspace lock.
pub async fn stage(
    conn: &mut PgConnection,
    (workspace_id, token_hash): (Uuid, Option<[u8; 32]>),
    quota: Quota,
    rows: &[NewUpload<'_>],
    contents: &[Option<Bytes>],
    digests: &[[u8; 32]],
    lock_wait: Option<Duration>,
) -> sqlx::Result<Admission> {
    // The parameters' buffer sized for the bytes at once: grown by doubling it would copy them
    // again at every step.
    let content_bytes: usize = contents.iter().flatten().map(|c| c.len()).sum();
    let mut args = PgArguments::default();
    args.reserve(13, content_bytes + PARAMETERS_SLACK * (rows.len() + 1));
    add(&mut args, workspace_id)?;
    add(&mut args, super::workspace_lock_key(workspace_id))?;
    add(&mut args, quota.max_bytes as i64)?;
    add(&mut args, quota.max_files as i64)?;
    let statement = match (rows, contents, digests) {
        // One file's bytes as a `bytea`, not a one-element `bytea[]`: PostgreSQL copies an
        // array's bytes twice more (see the migration that added this function).
        ([row], [content], [digest]) => {
            add(&mut args, row.file_id)?;
            add(&mut args, row.filename)?;
            add(&mut args, row.mimetype)?;
            add(&mut args, row.spool.size as i64)?;
            add(&mut args, &digest[..])?;
            add(&mut args, row.location.s3_key.as_deref())?;
            add(&mut args, content.as_deref())?;
            add(&mut args, token_hash.as_ref().map(|h| &h[..]))?;
            add(&mut args, lock_wait.map(wait_setting))?;
            &STAGE_ONE
        }
        _ => {
            let c = columns(rows);
            let contents: Vec<Option<&[u8]>> = contents.iter().map(|c| c.as_deref()).collect();
            let digests: Vec<&[u8]> = digests.iter().map(|d| &d[..]).collect();
            let keys: Vec<Option<&str>> =
                rows.iter().map(|r| r.location.s3_key.as_deref()).collect();
            add(&mut args, c.ids)?;
            add(&mut args, c.names)?;
            add(&mut args, c.mimes)?;
            add(&mut args, c.sizes)?;
            add(&mut args, digests)?;
            add(&mut args, keys)?;
            add(&mut args, contents)?;
            add(&mut args, token_hash.as_ref().map(|h| &h[..]))?;
            add(&mut args, lock_wait.map(wait_setting))?;
            &STAGE
        }
    };
    sqlx::query_as_with(statement.as_str(), args)
        .fetch_one(conn)
        .await
}

static STAGE: LazyLock<String> = LazyLock::new(|| {
    while_caller_holds(
        "pending_uploads_stage($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        12,
    )
});

static STAGE_ONE: LazyLock<String> = LazyLock::new(|| {
    while_caller_holds(
        "pending_uploads_stage_one($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        12,
    )
});

static ADMIT: LazyLock<String> =
    LazyLock::new(|| while_caller_holds("pending_uploads_admit($1, $2, $3, $4, $5, $6)", 7));

/// `call` (a staging function answering refused, pending_bytes, pending_files), made only
/// while the caller still may upload: the workspace ($1) not removed and, for a workspace
/// token (its hash the `hash`-th parameter, NULL for the admin), the token not revoked.
/// Otherwise the function is not called (nothing written) and the answer is refused
/// `caller`. The request's own check was at its start, and an upload may take
/// UPLOAD_BODY_TIMEOUT: a revoked token or a removed workspace went on uploading until then
/// (a black-box probe). Checked in the committing statement itself, no extra round trip.
/// The parameter after the hash, when not NULL, bounds this transaction's wait for the
/// workspace lock (`pending_uploads.lock_wait`, [`wait_setting`]) below the connection's.
/// The caller is named in `pending_uploads.caller` too (its token's hash in hex, or `admin`):
/// an admission that had to wait for the lock checks it again once it holds it, since a
/// revocation may have committed meanwhile (migration `20261208100000`).
fn while_caller_holds(call: &str, hash: usize) -> String {
    let wait = hash + 1;
    // The call takes its workspace from `caller`: a lateral reference, so every plan checks
    // (and sets the lock wait) before it calls, not only the one the planner picks today.
    let call = call.replacen("($1,", "(caller.ws,", 1);
    format!(
        "WITH caller AS (
             SELECT $1::uuid AS ws,
                    (${wait}::text IS NULL
                     OR set_config('pending_uploads.lock_wait', ${wait}, true) IS NOT NULL)
                    AND set_config('pending_uploads.caller',
                                   COALESCE(encode(${hash}::bytea, 'hex'), 'admin'), true) IS NOT NULL
                    AND EXISTS (SELECT 1 FROM workspaces w
                                WHERE w.id = $1 AND w.status IS DISTINCT FROM 'removed')
                    AND (${hash}::bytea IS NULL
                         OR EXISTS (SELECT 1 FROM workspace_auth_tokens t
                                    WHERE t.workspace_id = $1 AND t.token_hash = ${hash}
                                      AND t.revoked_at IS NULL)) AS ok)
         SELECT s.refused, s.pending_bytes, s.pending_files
           FROM caller, LATERAL {call} s WHERE caller.ok
         UNION ALL
         SELECT 'caller', 0::bigint, 0::bigint FROM caller WHERE NOT caller.ok"
    )
}

/// A wait for the workspace lock as `pending_uploads.lock_wait` takes it (at least 1 ms: 0
/// would be no bound at all).
fn wait_setting(wait: Duration) -> String {
    format!("{}ms", wait.as_millis().max(1))
}

/// Room per row for everything but its bytes: id, name, mimetype, size, digest, key and the
/// array framing.
const PARAMETERS_SLACK: usize = 1024;

fn add<'q, T>(args: &mut PgArguments, value: T) -> sqlx::Result<()>
where
    T: sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + 'q,
{
    args.add(value).map_err(sqlx::Error::Encode)
}

/// Takes the workspace lock and checks the quotas for the rows this transaction inserted.
pub async fn admit(
    conn: &mut PgConnection,
    workspace_id: Uuid,
    token_hash: Option<[u8; 32]>,
    quota: Quota,
    rows: &[NewUpload<'_>],
    lock_wait: Option<Duration>,
) -> sqlx::Result<Admission> {
    let bytes: i64 = rows.iter().map(|r| r.spool.size as i64).sum();
    sqlx::query_as(ADMIT.as_str())
        .bind(workspace_id)
        .bind(super::workspace_lock_key(workspace_id))
        .bind(rows.len() as i64)
        .bind(bytes)
        .bind(quota.max_bytes as i64)
        .bind(quota.max_files as i64)
        .bind(token_hash.as_ref().map(|h| &h[..]))
        .bind(lock_wait.map(wait_setting))
        .fetch_one(conn)
        .await
}

/// The activity rows of the admitted rows, and the notification (`pending_uploads_log`).
pub async fn log_staged(
    conn: &mut PgConnection,
    workspace_id: Uuid,
    rows: &[NewUpload<'_>],
) -> sqlx::Result<()> {
    let c = columns(rows);
    sqlx::query("SELECT pending_uploads_log($1, $2, $3, $4, $5)")
        .bind(workspace_id)
        .bind(c.ids)
        .bind(c.names)
        .bind(c.mimes)
        .bind(c.sizes)
        .execute(conn)
        .await?;
    Ok(())
}

/// Inserts one row. Inline bytes on disk and larger than [`INSERT_MAX_BYTES`] stream from the
/// spool into `content` with a binary COPY: the service never holds more than one read chunk
/// of such a file in memory. Each chunk must be taken by the server within `step`: a stalled
/// server fails the insert (as an I/O error: the connection is then closed, not reused).
///
/// A COPY's row goes in without its digest, which [`set_digests`] sets before the commit.
pub async fn insert(conn: &mut PgConnection, row: &NewUpload<'_>, db: &Db) -> sqlx::Result<()> {
    let step = db.timeout();
    if row.inserts() {
        return in_step(step, "an INSERT", insert_whole(conn, row)).await;
    }
    let statement = format!("COPY pending_uploads ({COPY_COLUMNS}) FROM STDIN (FORMAT binary)");
    let mut copy = in_step(step, "a COPY", conn.copy_in_raw(&statement)).await?;
    let mut head = BytesMut::with_capacity(256);
    head.put_slice(b"PGCOPY\n\xff\r\n\0");
    head.put_i32(0); // flags
    head.put_i32(0); // header extension length
    head.put_i16(7); // fields in the tuple
    put_field(&mut head, row.file_id.as_bytes());
    put_field(&mut head, row.workspace_id.as_bytes());
    put_field(&mut head, &(row.spool.size as i64).to_be_bytes());
    put_field(&mut head, row.filename.as_bytes());
    put_field(&mut head, row.mimetype.as_bytes());
    match &row.location.s3_key {
        Some(key) => put_field(&mut head, key.as_bytes()),
        None => head.put_i32(-1), // NULL
    }
    // Every row here has inline bytes: one without takes the INSERT (`NewUpload::inserts`).
    head.put_i32(row.spool.size as i32); // content length, then the bytes themselves
    copy.send(head.freeze()).await?;
    let mut chunks = std::pin::pin!(row.spool.chunks_ahead());
    while let Some(chunk) = chunks.try_next().await? {
        tokio::time::timeout(step, copy.send(chunk))
            .await
            .map_err(|_| stalled(step))??;
    }
    // The end of data. The server stores the row only now, its TOAST and WAL, for a while
    // (100 MB: ~375 ms here) during which the service waits: the digest
    // (`spool::Hashing::OnReadBack`) is taken then, on the spool read once more, instead of
    // on the bytes as they went.
    copy.send(&(-1i16).to_be_bytes()[..]).await?;
    let digest = async { row.spool.sha256().await.map_err(sqlx::Error::Io) };
    tokio::try_join!(finish_copy(copy, db), digest)?;
    Ok(())
}

/// Sets the digests of rows that [`insert`] copied in (those that do not
/// [`NewUpload::inserts`]), one statement for them all; the spools know their digests by then.
pub async fn set_digests(conn: &mut PgConnection, rows: &[NewUpload<'_>]) -> sqlx::Result<()> {
    let (mut ids, mut digests) = (Vec::new(), Vec::new());
    for row in rows.iter().filter(|r| !r.inserts()) {
        ids.push(row.file_id);
        digests.push(row.spool.sha256().await?.to_vec());
    }
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE pending_uploads p SET content_sha256 = d.sha256
         FROM unnest($1::uuid[], $2::bytea[]) AS d(file_id, sha256) WHERE p.file_id = d.file_id",
    )
    .bind(ids)
    .bind(digests)
    .execute(conn)
    .await?;
    Ok(())
}

/// Ends a COPY and waits for the answer. The server stores a row only once its last byte is
/// in (a large one's TOAST and WAL come now), which on a busy server can take longer than
/// `step`: eight 100 MB rows at once did in the bench (503s). So the wait goes on while the
/// database answers anything on another connection (probed when it has answered nothing for
/// `step` / 4), and ends once it has answered nothing for `step`: a stalled server still fails
/// within `step` (SPEC §10), a working one has the transaction's deadline.
async fn finish_copy(
    copy: sqlx::postgres::PgCopyIn<&mut PgConnection>,
    db: &Db,
) -> sqlx::Result<()> {
    let (last_byte, step) = (Instant::now(), db.timeout());
    let tick = step / 4;
    // Never ends: it only keeps `silent_since` fresh while the database answers.
    let probing = async {
        loop {
            tokio::time::sleep(tick).await;
            // Other requests' answers count as well: a probe only when they are quiet.
            if db.silent_since(last_byte) >= tick {
                db.probe(step).await;
            }
        }
    };
    let watchdog = async {
        loop {
            let silent = db.silent_since(last_byte);
            if silent >= step {
                return;
            }
            tokio::time::sleep(tick.min(step - silent)).await;
        }
    };
    tokio::select! {
        done = copy.finish() => done.map(drop),
        () = probing => Ok(()),
        () = watchdog => Err(timed_out(format!(
            "database answered nothing for {step:?} after a COPY's last byte"
        ))),
    }
}

/// The bytes per second a database taking a COPY is assumed to manage at worst. A stalled one
/// is caught by `step` (no data taken for that long, and the answer after the last byte
/// within it: SPEC §10); this bounds one that keeps taking data, only slowly. Per
/// transaction, not per server: eight 100 MB uploads at once, each at an eighth of a busy
/// server's rate, ran close to the 8 MiB/s this was before (a 503 in the bench).
const WORST_COPY_RATE: u64 = 1024 * 1024;

/// How long work that writes `bytes` through COPY may take: `step`, plus `bytes` at
/// [`WORST_COPY_RATE`].
pub fn copy_deadline(step: Duration, bytes: u64) -> Duration {
    step + Duration::from_secs(bytes / WORST_COPY_RATE)
}

/// A statement of a transaction whose deadline scales with its bytes, bounded by `step` on
/// its own: only the COPY's data may take longer, never a wait for a frozen server's answer
/// (SPEC §10). Cut, it is an I/O error: the connection is closed, and the caller answers 503.
pub async fn in_step<T>(
    step: Duration,
    what: &str,
    work: impl std::future::Future<Output = sqlx::Result<T>>,
) -> sqlx::Result<T> {
    tokio::time::timeout(step, work)
        .await
        .map_err(|_| timed_out(format!("database did not answer {what} for {step:?}")))?
}

fn stalled(step: Duration) -> sqlx::Error {
    timed_out(format!("database took no data for {step:?}"))
}

/// A wait on the database cut by its deadline: an I/O error, so callers answer 503.
fn timed_out(what: String) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}

/// The INSERT path of [`insert`]: no bytes (they are in S3), or bytes bounded by
/// [`NewUpload::inserts`].
async fn insert_whole(conn: &mut PgConnection, row: &NewUpload<'_>) -> sqlx::Result<()> {
    let content: Option<Bytes> = if row.location.inline {
        Some(row.spool.read_all().await?)
    } else {
        None
    };
    sqlx::query(&format!(
        "INSERT INTO pending_uploads ({WRITE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
    ))
    .bind(row.file_id)
    .bind(row.workspace_id)
    .bind(row.spool.size as i64)
    .bind(row.filename)
    .bind(row.mimetype)
    .bind(&row.spool.sha256().await?[..])
    .bind(row.location.s3_key.as_deref())
    .bind(content.as_deref())
    .execute(conn)
    .await?;
    Ok(())
}

fn put_field(buf: &mut BytesMut, value: &[u8]) {
    buf.put_i32(value.len() as i32);
    buf.put_slice(value);
}

/// Unacked, unexpired bytes and files of a workspace's committed uploads (the quotas).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct PendingTotals {
    pub bytes: i64,
    pub files: i64,
}

/// The workspace's [`PendingTotals`]. A transaction's own inserts are not in them: they count
/// when it commits.
pub async fn pending_totals(
    db: impl PgExecutor<'_>,
    workspace_id: Uuid,
) -> sqlx::Result<PendingTotals> {
    // The trigger-kept totals (committed rows), less what has expired but is not swept yet.
    // ORDER BY expires_at: see 20261202200000_expired_through_expiry_index.sql.
    sqlx::query_as(
        "SELECT GREATEST(0, COALESCE(t.unacked_bytes, 0) - COALESCE(x.bytes, 0))::bigint AS bytes,
                GREATEST(0, COALESCE(t.unacked_files, 0) - COALESCE(x.files, 0))::bigint AS files
         FROM (SELECT 1) one
         LEFT JOIN pending_upload_totals t ON t.workspace_id = $1
         LEFT JOIN (SELECT sum(size_bytes) AS bytes, count(*) AS files FROM (
                        SELECT size_bytes FROM pending_uploads
                        WHERE workspace_id = $1 AND acked_at IS NULL AND expires_at <= now()
                        ORDER BY expires_at) expired) x ON true",
    )
    .bind(workspace_id)
    .fetch_one(db)
    .await
}

/// How much of a row's inline bytes [`get_live_for`] reads with it: the first `len` bytes, or
/// all of them, in pieces of `piece`, when there are at most `whole_up_to`.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub len: u64,
    pub whole_up_to: Option<u64>,
    pub piece: u64,
}

/// What [`get_live_for`] found: the caller refused, or its live row (if any) with the first
/// bytes read with it.
pub type LiveFound = Checked<Option<Live>>;

/// The caller's live row, the first bytes read with it, and whether they are the first piece
/// of the whole file (the others follow in [`Pieces`]).
pub struct Live {
    pub row: UploadRow,
    pub head: Option<Vec<u8>>,
    pub whole: bool,
}

/// The pieces after the first of a file [`get_live_for`] reads whole, as they come (an error
/// if the read failed half way; cut short, without one, at the deadline).
pub type Pieces = futures::channel::mpsc::UnboundedReceiver<std::io::Result<Bytes>>;

/// The caller's live row and, when `head` is given and the bytes are inline, the start of its
/// content: a whole download of a small file in this one round trip. A file read whole comes
/// in pieces of `head.piece`, rows of one statement that the server sends as it makes them:
/// `found` gets the row and the first piece as soon as they come, `rest` each further piece,
/// so the caller sends one while the next is read (a 1 MiB file whole in one row reached its
/// client only after the server had read all of it). Pieces nobody takes are read all the
/// same: the statement runs to its end, and the connection stays in step. The caller's token
/// is stamped after the rows (a data-modifying CTE would hold every row back until the last).
pub async fn get_live_for(
    conn: &mut PgConnection,
    workspace_id: Uuid,
    token_hash: Option<[u8; 32]>,
    file_id: Uuid,
    head: Option<Head>,
    found: impl FnOnce(LiveFound),
    rest: futures::channel::mpsc::UnboundedSender<std::io::Result<Bytes>>,
) -> sqlx::Result<()> {
    let sql = format!(
        "{CALLER_UNSTAMPED}
         SELECT caller.ok AS caller_ok, caller.stale_token, {P_COLUMNS}, piece.head,
                COALESCE(w.whole, false) AS whole
         FROM caller
         LEFT JOIN pending_uploads p ON caller.ok AND p.file_id = $3 AND p.workspace_id = $1
                                        AND p.expires_at > now()
         CROSS JOIN LATERAL (SELECT $4::int IS NOT NULL AND p.s3_key IS NULL
                                    AND p.content IS NOT NULL
                                    AND p.size_bytes <= $5::int AS whole) w
         CROSS JOIN LATERAL (
             SELECT CASE WHEN $4::int IS NULL OR p.s3_key IS NOT NULL THEN NULL
                         WHEN w.whole THEN substring(p.content FROM k * $6::int + 1 FOR $6::int)
                         ELSE substring(p.content FROM 1 FOR $4::int) END AS head
             FROM generate_series(0, CASE WHEN w.whole
                                          THEN ((p.size_bytes - 1) / $6::int)::int ELSE 0 END) k
         ) piece"
    );
    let mut rows = sqlx::query(&sql)
        .bind(workspace_id)
        .bind(token_hash.as_ref().map(|h| &h[..]))
        .bind(file_id)
        .bind(head.map(|h| h.len as i32))
        .bind(head.and_then(|h| h.whole_up_to).map(|w| w as i32))
        .bind(head.map(|h| h.piece as i32))
        .fetch(&mut *conn);
    let Some(first) = rows.try_next().await? else {
        found(Checked::Allowed(None));
        return Ok(());
    };
    let stale_token: Option<Uuid> = first.try_get("stale_token")?;
    let checked = checked_rows::<UploadRow>(std::slice::from_ref(&first), "file_id")?;
    let bytes: Option<Vec<u8>> = first.try_get("head")?;
    let whole: bool = first.try_get("whole")?;
    drop(first);
    let mut most = bytes.as_ref().map_or(0, Vec::len);
    found(match checked {
        Checked::Refused => Checked::Refused,
        Checked::Allowed(row) => Checked::Allowed(row.into_iter().next().map(|row| Live {
            row,
            head: bytes,
            whole,
        })),
    });
    let read = async {
        while let Some(row) = rows.try_next().await? {
            let piece: Option<Vec<u8>> = row.try_get("head")?;
            let piece = Bytes::from(piece.unwrap_or_default());
            most = most.max(piece.len());
            // A receiver gone (its client left) takes nothing: the rows are read all the same.
            rest.unbounded_send(Ok(piece)).ok();
        }
        Ok::<(), sqlx::Error>(())
    };
    if let Err(e) = read.await {
        rest.unbounded_send(Err(std::io::Error::other(e.to_string())))
            .ok();
        return Err(e);
    }
    drop(rows);
    give_back_read_buffer(conn, most);
    if let Some(token) = stale_token {
        super::tokens::stamp(conn, token).await?;
    }
    Ok(())
}

/// A read that brought more than this through a connection gives back its read buffer's
/// growth.
const KEEP_READ_BUFFER_MAX: usize = 256 * 1024;

/// sqlx keeps the spare read buffer a large row came through, its size or more, for the
/// connection's next message: memory of the pool's, not of the download that read it.
fn give_back_read_buffer(conn: &mut PgConnection, read: usize) {
    if read > KEEP_READ_BUFFER_MAX {
        sqlx::Connection::shrink_buffers(conn);
    }
}

/// A row whatever its state (the backfill's "is it still there?").
pub async fn get_any(db: impl PgExecutor<'_>, file_id: Uuid) -> sqlx::Result<Option<UploadRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM pending_uploads WHERE file_id = $1"
    ))
    .bind(file_id)
    .fetch_optional(db)
    .await
}

/// One page of the workspace's unacked, unexpired uploads, oldest first: the first `limit`
/// rows after `after` (a row's `(created_at, seq)`), or from the start.
///
/// Every page has the bound, the first from `('-infinity', 0)` (seq starts at 1), so that
/// PostgreSQL's generic plan (a connection's sixth run) bounds the scan of
/// `pending_uploads_workspace_list_idx` by it too: with a `$3 IS NULL OR` form each page read
/// the workspace's rows from the first, and a list of n rows read n² / 400.
pub async fn list_pending_page(
    conn: &mut PgConnection,
    workspace_id: Uuid,
    token_hash: Option<[u8; 32]>,
    after: Option<(DateTime<Utc>, i64)>,
    limit: i64,
) -> sqlx::Result<Checked<Vec<UploadRow>>> {
    let (after_created, after_seq) = after.unzip();
    let rows = sqlx::query(&format!(
        "{CALLER}
         SELECT caller.ok AS caller_ok, page.* FROM caller
         LEFT JOIN LATERAL (
             SELECT {COLUMNS} FROM pending_uploads
             WHERE caller.ok AND workspace_id = $1 AND acked_at IS NULL AND expires_at > now()
               AND (created_at, seq) > (COALESCE($3, '-infinity'::timestamptz), COALESCE($4, 0))
             ORDER BY created_at, seq
             LIMIT $5) page ON true"
    ))
    .bind(workspace_id)
    .bind(token_hash.as_ref().map(|h| &h[..]))
    .bind(after_created)
    .bind(after_seq)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    checked_rows(&rows, "file_id")
}

/// One slice of a row's inline bytes (`offset` 0-based); `None` when the row or its bytes are
/// gone.
pub async fn read_slice(
    conn: &mut PgConnection,
    file_id: Uuid,
    offset: u64,
    len: u64,
) -> sqlx::Result<Option<Vec<u8>>> {
    // substring() positions are 1-based.
    let chunk: Option<Option<Vec<u8>>> = sqlx::query_scalar(
        "SELECT substring(content FROM $2::int FOR $3::int) FROM pending_uploads WHERE file_id = $1",
    )
    .bind(file_id)
    .bind(offset as i64 + 1)
    .bind(len as i64)
    .fetch_optional(&mut *conn)
    .await?;
    let chunk = chunk.flatten();
    give_back_read_buffer(conn, chunk.as_ref().map_or(0, Vec::len));
    Ok(chunk)
}

/// Stamps fetched_at on rows whose bodies have been handed over (best effort, SPEC §4 Fetch).
/// A deadlock with another replica's batch (two plans locking rows in different orders) costs
/// that batch's stamps, logged: they are best effort.
pub async fn mark_fetched(db: impl PgExecutor<'_>, file_ids: &[Uuid]) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE pending_uploads SET fetched_at = now() \
         WHERE file_id = ANY($1) AND expires_at > now()",
    )
    .bind(file_ids)
    .execute(db)
    .await?;
    Ok(())
}

/// What an ack found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// No live row of this workspace.
    Missing,
    /// Acked before, or by a concurrent ack that held the row while this one waited.
    Repeat { backend: &'static str },
    /// Live when looked up, gone (swept) before the stamp.
    Raced { backend: &'static str },
    Acked {
        size: i64,
        name: String,
        backend: &'static str,
    },
}

/// Where a row's bytes live, named as the backends are in logs and metrics.
pub fn placement(in_s3: bool, inline: bool) -> &'static str {
    match (in_s3, inline) {
        (true, true) => "dual",
        (true, false) => "s3",
        (false, _) => "bytea",
    }
}

/// Stamps acked_at on the workspace's live row, keeping an earlier stamp, in one round trip
/// (the caller check included); a second one only when a concurrent transaction changed the
/// row under the stamp ([`lost_stamp`]).
pub async fn ack(
    conn: &mut PgConnection,
    workspace_id: Uuid,
    token_hash: Option<[u8; 32]>,
    file_id: Uuid,
) -> sqlx::Result<Checked<AckOutcome>> {
    type Found = (
        bool,
        Option<bool>,
        Option<bool>,
        Option<i64>,
        Option<String>,
        Option<bool>,
        Option<bool>,
    );
    let row: Found = sqlx::query_as(&format!(
        "{CALLER},
         target AS (
             SELECT file_id, acked_at, size_bytes, filename, s3_key IS NOT NULL AS in_s3,
                    content IS NOT NULL AS inline
             FROM pending_uploads, caller
             WHERE caller.ok AND file_id = $3 AND workspace_id = $1 AND expires_at > now()),
         stamped AS (
             UPDATE pending_uploads p SET acked_at = now()
             FROM target t WHERE p.file_id = t.file_id AND p.acked_at IS NULL
             RETURNING p.file_id)
         SELECT caller.ok, t.acked_at IS NOT NULL, EXISTS (SELECT 1 FROM stamped), t.size_bytes,
                t.filename, t.in_s3, t.inline
         FROM caller LEFT JOIN target t ON true"
    ))
    .bind(workspace_id)
    .bind(token_hash.as_ref().map(|h| &h[..]))
    .bind(file_id)
    .fetch_one(&mut *conn)
    .await?;
    let backend = placement(row.5.unwrap_or(false), row.6.unwrap_or(false));
    Ok(match row {
        (false, ..) => Checked::Refused,
        (true, None, ..) | (true, _, _, None, ..) => Checked::Allowed(AckOutcome::Missing),
        (true, Some(true), ..) => Checked::Allowed(AckOutcome::Repeat { backend }),
        (true, Some(false), Some(true), Some(size), Some(name), ..) => {
            Checked::Allowed(AckOutcome::Acked {
                size,
                name,
                backend,
            })
        }
        (true, Some(false), ..) => Checked::Allowed(lost_stamp(conn, file_id, backend).await?),
    })
}

/// Why a stamp did not take on a row the ack's snapshot saw unacked. The UPDATE waited on
/// the row lock of a concurrent transaction, then re-checked `acked_at IS NULL` against what
/// that transaction committed (READ COMMITTED): the row is gone (the sweeper took it first:
/// raced) or carries the other's stamp (a concurrent ack: a repeat, the file lives on). The
/// statement's snapshot cannot tell which; this statement's own, newer one can.
async fn lost_stamp(
    conn: &mut PgConnection,
    file_id: Uuid,
    backend: &'static str,
) -> sqlx::Result<AckOutcome> {
    let alive: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pending_uploads WHERE file_id = $1)")
            .bind(file_id)
            .fetch_one(conn)
            .await?;
    Ok(if alive {
        AckOutcome::Repeat { backend }
    } else {
        AckOutcome::Raced { backend }
    })
}

/// One sweep batch: deletes up to `limit` rows that are expired, or acked longer ago than
/// `ack_retention_secs`, and of their inline bytes no more than `max_bytes` plus one row's
/// (the first row always goes). Deleting a row deletes its TOAST chunks in the statement, so
/// a batch's cost grows with its bytes: 500 rows of 100 MB in one statement would outlast
/// any deadline, roll back, and be picked again at every pass. SKIP LOCKED lets replicas
/// sweep at once without waiting on or double-deleting each other's rows.
///
/// The candidates are read in three parts, each through an index in order (expired unacked
/// rows, rows acked before the retention, rows acked since but expired), so a batch reads the
/// rows it sweeps: one condition with an OR had no index to read it by, and each batch scanned
/// the table until it had its rows. A part runs only while those before it left the batch
/// short; FOR UPDATE sits in each part because PostgreSQL refuses it on a UNION.
pub async fn sweep_batch(
    db: impl PgExecutor<'_>,
    ack_retention_secs: f64,
    limit: i64,
    max_bytes: u64,
) -> sqlx::Result<Vec<UploadRow>> {
    const INLINE: &str = "file_id, CASE WHEN content IS NULL THEN 0 ELSE size_bytes END AS inline";
    sqlx::query_as(&format!(
        "WITH candidates AS (
             SELECT * FROM (
                 SELECT {INLINE} FROM pending_uploads
                 WHERE acked_at IS NULL AND expires_at <= now()
                 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED) expired
             UNION ALL
             SELECT * FROM (
                 SELECT {INLINE} FROM pending_uploads
                 WHERE acked_at IS NOT NULL AND acked_at <= now() - make_interval(secs => $1)
                 ORDER BY acked_at LIMIT $2 FOR UPDATE SKIP LOCKED) acked
             UNION ALL
             SELECT * FROM (
                 SELECT {INLINE} FROM pending_uploads
                 WHERE acked_at IS NOT NULL AND expires_at <= now()
                   AND acked_at > now() - make_interval(secs => $1)
                 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED) acked_expired
             LIMIT $2),
         chosen AS (
             SELECT file_id FROM (
                 SELECT file_id, sum(inline) OVER (ORDER BY file_id) - inline AS before
                 FROM candidates) c
             WHERE before < $3)
         DELETE FROM pending_uploads WHERE file_id IN (SELECT file_id FROM chosen)
         RETURNING {COLUMNS}"
    ))
    .bind(ack_retention_secs)
    .bind(limit)
    .bind(max_bytes.min(i64::MAX as u64) as i64)
    .fetch_all(db)
    .await
}

/// Rows whose bytes live only in Postgres, after `after` in file_id order (the backfill).
pub async fn bytea_only_after(
    db: impl PgExecutor<'_>,
    after: Uuid,
    limit: i64,
) -> sqlx::Result<Vec<UploadRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM pending_uploads
         WHERE s3_key IS NULL AND content IS NOT NULL AND file_id > $1
         ORDER BY file_id LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Rows and bytes that exist only in Postgres.
pub async fn bytea_only_totals(db: impl PgExecutor<'_>) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(
        "SELECT count(*), COALESCE(sum(size_bytes), 0)::bigint FROM pending_uploads
         WHERE s3_key IS NULL AND content IS NOT NULL",
    )
    .fetch_one(db)
    .await
}

/// Points a row at its verified S3 copy; false when the row is gone or already has a key.
pub async fn set_s3_key(
    db: impl PgExecutor<'_>,
    file_id: Uuid,
    key: &str,
    sha256: &[u8],
) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "UPDATE pending_uploads SET s3_key = $2, content_sha256 = COALESCE(content_sha256, $3)
         WHERE file_id = $1 AND s3_key IS NULL",
    )
    .bind(file_id)
    .bind(key)
    .bind(sha256)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// A row that has its bytes both inline and in S3: what the contract step checks the object
/// against before it releases the inline copy.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DualCopy {
    pub file_id: Uuid,
    pub s3_key: String,
    pub size_bytes: i64,
    pub content_sha256: Option<Vec<u8>>,
}

/// Up to `limit` rows with both copies, after `after` in file_id order (from
/// `Uuid::nil()`, like [`bytea_only_after`]: an `$1 IS NULL OR` form settles on a generic plan
/// that reads every row from the first on each batch).
pub async fn dual_copies_after(
    db: impl PgExecutor<'_>,
    after: Uuid,
    limit: i64,
) -> sqlx::Result<Vec<DualCopy>> {
    sqlx::query_as(
        "SELECT file_id, s3_key, size_bytes, content_sha256 FROM pending_uploads
         WHERE content IS NOT NULL AND s3_key IS NOT NULL AND file_id > $1
         ORDER BY file_id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The contract step for rows whose S3 copy was checked: releases their inline bytes, each
/// only while the row still points at the object that was checked.
pub async fn release_inline(
    db: impl PgExecutor<'_>,
    ids: &[Uuid],
    keys: &[String],
) -> sqlx::Result<u64> {
    update_checked(db, "content = NULL", ids, keys).await
}

/// Rows whose S3 object is gone or is not their bytes stop pointing at it and keep their
/// inline bytes: bytea-only again, for the backfill to copy anew.
pub async fn forget_s3_copies(
    db: impl PgExecutor<'_>,
    ids: &[Uuid],
    keys: &[String],
) -> sqlx::Result<u64> {
    update_checked(db, "s3_key = NULL", ids, keys).await
}

/// `set` on the rows (`ids[i]`, `keys[i]`) that still have both copies, that object's key.
async fn update_checked(
    db: impl PgExecutor<'_>,
    set: &'static str,
    ids: &[Uuid],
    keys: &[String],
) -> sqlx::Result<u64> {
    let r = sqlx::query(&format!(
        "UPDATE pending_uploads p SET {set}
         FROM unnest($1::uuid[], $2::text[]) AS checked(file_id, s3_key)
         WHERE p.file_id = checked.file_id AND p.s3_key = checked.s3_key
           AND p.content IS NOT NULL"
    ))
    .bind(ids)
    .bind(keys)
    .execute(db)
    .await?;
    Ok(r.rows_affected())
}

/// Which of these keys some row still points at.
/// Of `keys`, those no row points at: orphans, once they are older than the grace.
pub async fn unpointed(db: impl PgExecutor<'_>, keys: &[String]) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT k.key FROM unnest($1::text[]) AS k(key)
         WHERE NOT EXISTS (SELECT 1 FROM pending_uploads p WHERE p.s3_key = k.key)",
    )
    .bind(keys)
    .fetch_all(db)
    .await
}

/// Rows and bytes by state, and the age of the oldest unacked row: the backlog gauges, as the
/// fleet last read them.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Backlog {
    /// Rows and bytes of the live rows neither fetched nor acked, fetched and not acked, acked.
    pub unfetched_rows: i64,
    pub unfetched_bytes: i64,
    pub fetched_rows: i64,
    pub fetched_bytes: i64,
    pub acked_rows: i64,
    pub acked_bytes: i64,
    pub oldest_unacked_secs: Option<f64>,
}

/// What `MAX_STORED_BYTES` counts ([`crate::stored`]), as the triggers keep it (migration
/// 20261206400000): every upload row's bytes, expired rows included, the rows themselves, and
/// this service's upload activity rows (kept `ACTIVITY_RETENTION`, 7 days).
#[derive(Debug, Clone, Copy, Default, PartialEq, sqlx::FromRow)]
pub struct StoredRows {
    pub total_bytes: i64,
    pub total_files: i64,
    pub total_activity_rows: i64,
}

impl StoredRows {
    /// The file bytes plus [`ROW_WEIGHT`] for each upload row and [`ACTIVITY_ROW_WEIGHT`] for
    /// each activity row.
    pub fn stored_bytes(&self) -> i64 {
        self.total_bytes
            + self.total_files * ROW_WEIGHT
            + self.total_activity_rows * ACTIVITY_ROW_WEIGHT
    }
}

/// The sum of the stored deltas (one replica at a time folds them first; see the migration):
/// a few rows, whatever the tables hold.
pub async fn stored(conn: &mut PgConnection) -> sqlx::Result<StoredRows> {
    sqlx::query_as("SELECT * FROM pending_uploads_stored()")
        .fetch_one(conn)
        .await
}

/// What a row costs the database besides its file's bytes, as `MAX_STORED_BYTES` counts it: a
/// client sending one-byte files made 244,544 activity rows (125 MB) in two minutes (a
/// resource probe), which bytes alone would not have bounded. Measured with 100-character
/// names (the longest), after a VACUUM: 446 bytes an upload row, 918 an activity row (its
/// JSON body and summary repeat the name; three indexes), so an activity row weighs 1024
/// (it weighed 512 as well until a red team measured it).
pub const ROW_WEIGHT: i64 = 512;
pub const ACTIVITY_ROW_WEIGHT: i64 = 1024;

/// What staging a file of `size` bytes adds to [`Backlog::stored_bytes`]: its bytes, its row
/// and its activity row.
pub const fn stored_cost(size: u64) -> u64 {
    size + (ROW_WEIGHT + ACTIVITY_ROW_WEIGHT) as u64
}

/// The backlog gauges' figures as the fleet last read them. The call that finds that reading
/// older than `lasts` (and than `share` + 1 times what it took) reads the upload table again
/// for the fleet, one call at a time (migration 20261207100000): an aggregate over every row,
/// so its time grows with the table (paced, with a deadline of its own:
/// `app::refresh_backlog_gauges_forever`). `None` before any reading landed.
pub async fn backlog(
    conn: &mut PgConnection,
    lasts: std::time::Duration,
    share: u32,
) -> sqlx::Result<Option<Backlog>> {
    sqlx::query_as(
        "SELECT unfetched_rows, unfetched_bytes, fetched_rows, fetched_bytes, acked_rows,
                acked_bytes, EXTRACT(EPOCH FROM now() - oldest_unacked_at)::float8
                    AS oldest_unacked_secs
         FROM pending_uploads_backlog($1, $2)",
    )
    .bind(lasts.as_secs_f64())
    .bind(share as i32)
    .fetch_optional(conn)
    .await
}
