//! Queries on our tables, one file per table; and [`Db`], the one way request paths reach the
//! database: every use is bounded in time and cannot be cancelled half way.
//!
//! Why the care: a sqlx query future dropped mid-flight (a client that disconnects, a
//! timeout) leaves its connection out of step with the server — half a COPY, a transaction
//! still open — and the pool hands that connection to the next request, which then reads
//! another query's answer (seen: valid tokens answered 401, "there is already a transaction
//! in progress"). So [`Db::run`] executes its work in a task of its own, which a departing
//! client cannot cancel, and a connection whose work is cut by the deadline is closed, never
//! returned to the pool.

pub mod activity;
mod conns;
pub mod leases;
pub mod tokens;
pub mod uploads;
pub mod workspaces;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    PgConnection, PgPool,
};
use uuid::Uuid;

use self::conns::Conns;
pub use self::conns::PING_IF_IDLE_FOR;
use crate::config::DbArgs;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub async fn connect(args: &DbArgs, dependency_timeout: Duration) -> Result<PgPool, sqlx::Error> {
    let options = connect_options(args, dependency_timeout)?;
    let pool = || {
        PgPoolOptions::new()
            .max_connections(args.database_max_connections)
            .acquire_timeout(dependency_timeout)
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE_FOR {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options.clone())
    };
    match pool().await {
        // The pool retried until its deadline and kept only that it ran out of time: one
        // more attempt says why (connection refused, a password, a database that is not),
        // or, when the database has just come up, is followed by the pool's again.
        Err(sqlx::Error::PoolTimedOut) => {
            let attempt = tokio::time::timeout(
                dependency_timeout,
                <PgConnection as sqlx::Connection>::connect_with(&options),
            )
            .await;
            match attempt {
                Ok(Ok(_up)) => pool().await,
                Ok(Err(cause)) => Err(cause),
                Err(_) => Err(sqlx::Error::PoolTimedOut),
            }
        }
        other => other,
    }
}

/// Where a connection string points, for log lines: host, port and database, never the user
/// or the password (`?` when the string does not parse: it fails where it is used, saying why).
pub fn describe(database_url: &str) -> String {
    match database_url.parse::<PgConnectOptions>() {
        Ok(o) => format!(
            "{}:{}/{}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or("")
        ),
        Err(_) => "?".to_string(),
    }
}

fn connect_options(
    args: &DbArgs,
    dependency_timeout: Duration,
) -> Result<PgConnectOptions, sqlx::Error> {
    let options: PgConnectOptions = args
        .database_url
        .0
        .parse::<PgConnectOptions>()?
        .options([
            // A transaction left open by a dead client process is ended by the server.
            ("idle_in_transaction_session_timeout", "60s"),
            // Uploads are announced to long polls after their commits (longpoll::Announcer).
            ("pending_uploads.notify", "after_commit"),
        ])
        // The wait for a workspace's lock (`pending_uploads_admit`) ends in an error, with
        // nothing written, while the caller still waits for the answer: a caller that gave up
        // first would leave the statement to commit after its 503.
        .options([(
            "pending_uploads.lock_wait",
            format!("{}ms", (dependency_timeout / 2).as_millis()),
        )]);
    Ok(options)
}

/// Applies our migrations. Migrations the database has and this binary does not know (a
/// newer release's) are no reason to refuse to start: every step is additive, so rolling
/// back, or a rolling deploy, runs an older binary against a schema that has moved on.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await
}

/// Why a database call failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database did not answer within {0:?}")]
    Timeout(Duration),
    /// No session could be opened: nothing reached the server.
    #[error("database connection failed: {0}")]
    Connect(#[source] sqlx::Error),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    #[error("database task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl DbError {
    /// The call was cut (its deadline, a broken connection, a crashed task) without an answer:
    /// a transaction may have committed on the server all the same.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            DbError::Timeout(_) | DbError::Task(_) => true,
            DbError::Connect(_) => false,
            DbError::Sql(e) => breaks_connection(e),
        }
    }

    /// The database is away, restarting or overloaded — nothing the request did: callers
    /// answer 503 and the client retries.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Timeout(_) => true,
            DbError::Task(_) => false,
            DbError::Connect(e) | DbError::Sql(e) => sql_unavailable(e),
        }
    }
}

fn sql_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|c| transient_sqlstate(&c)) || session_refused(db.as_ref())
        }
        _ => false,
    }
}

/// A FATAL (or PANIC) error ends the session: the server will not serve this connection, not
/// that the request asked something wrong. E.g. a new connection to a database that is not
/// accepting connections (`ALTER DATABASE … ALLOW_CONNECTIONS false`, SQLSTATE 55000), which
/// was a 500 whenever the pool had to open a connection while the database was closed.
fn session_refused(db: &dyn sqlx::error::DatabaseError) -> bool {
    use sqlx::postgres::{PgDatabaseError, PgSeverity};
    db.try_downcast_ref::<PgDatabaseError>()
        .is_some_and(|e| matches!(e.severity(), PgSeverity::Fatal | PgSeverity::Panic))
}

/// Errors after which a connection may be mid-message: it is closed, never pooled again (a
/// ping on it, against a frozen server, would wait without end).
fn breaks_connection(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed
    )
}

/// SQLSTATEs that mean "not now" rather than "never": connection exceptions (08), server
/// shutting down or restarting (57P01-57P03), cancelled by a timeout (57014), out of disk,
/// memory or connections (53), system errors (58), serialization failures and deadlocks, a
/// workspace's lock not taken in time (55P03, `pending_uploads.lock_wait`).
fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("58")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "57014" | "40001" | "40P01" | "25P03" | "55P03"
        )
}

/// The request paths' handle on the database (see the module comment). Its work runs on
/// connections of its own ([`conns`]); the sqlx pool it was made from serves the migrations
/// and the long-poll listener.
#[derive(Clone)]
pub struct Db {
    pool: PgPool,
    conns: Arc<Conns>,
    timeout: Duration,
    answered: Arc<LastAnswer>,
}

/// When the database last finished a piece of work, on any connection: a sign of life for a
/// request whose own connection is waiting on it.
struct LastAnswer {
    since: Instant,
    /// Milliseconds after `since`.
    at_ms: AtomicU64,
    /// A probe ([`Db::probe`]) is out.
    probing: AtomicBool,
}

impl LastAnswer {
    fn mark(&self) {
        let now = self.since.elapsed().as_millis() as u64;
        self.at_ms.fetch_max(now, Ordering::Relaxed);
    }

    fn at(&self) -> Instant {
        self.since + Duration::from_millis(self.at_ms.load(Ordering::Relaxed))
    }
}

/// The one probe out, while it is: cleared when dropped, also half-way (the wait that started
/// it ended first).
struct Probing<'a>(&'a LastAnswer);

impl<'a> Probing<'a> {
    fn start(answered: &'a LastAnswer) -> Option<Self> {
        let idle =
            answered
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire);
        idle.is_ok().then_some(Probing(answered))
    }
}

impl Drop for Probing<'_> {
    fn drop(&mut self) {
        self.0.probing.store(false, Ordering::Release);
    }
}

impl Db {
    pub fn new(pool: PgPool, timeout: Duration) -> Db {
        let answered = LastAnswer {
            since: Instant::now(),
            at_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        };
        let conns = Conns::new(
            (*pool.connect_options()).clone(),
            pool.options().get_max_connections(),
        );
        Db {
            pool,
            conns: Arc::new(conns),
            timeout,
            answered: Arc::new(answered),
        }
    }

    /// How long the database has answered nothing, on any connection, counted from `from`
    /// at the earliest.
    pub fn silent_since(&self, from: Instant) -> Duration {
        from.max(self.answered.at()).elapsed()
    }

    /// Asks the database for a sign of life (`SELECT 1` on a pooled connection) within
    /// `window`; an answer counts for [`Db::silent_since`]. One probe at a time: while one is
    /// out, this returns at once, and every request waiting on the database shares its answer
    /// instead of taking a pooled connection to ask the same.
    pub async fn probe(&self, window: Duration) {
        let Some(_probing) = Probing::start(&self.answered) else {
            return;
        };
        let ping = self.run_within(window, |c| Box::pin(ping(c)));
        let _ = tokio::time::timeout(window, ping).await;
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `work` on one pooled connection, in its own task, within the deadline. The
    /// caller may go away: the work still completes (or times out) and its connection goes
    /// back to the pool in step, or is closed.
    pub async fn run<T, F>(&self, work: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, sqlx::Result<T>> + Send + 'static,
    {
        self.run_within(self.timeout, work).await
    }

    /// [`Db::run`] with its own deadline (work whose size scales with its input). The deadline
    /// covers the wait for a pooled connection too (SPEC §10: no request waits on a stalled
    /// database for more than DEPENDENCY_TIMEOUT): a request that waited most of it for a
    /// connection freed by a stalled query must not then wait as long again in its own.
    pub async fn run_within<T, F>(&self, deadline: Duration, work: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, sqlx::Result<T>> + Send + 'static,
    {
        let (conns, answered) = (self.conns.clone(), self.answered.clone());
        let task = tokio::spawn(async move {
            let due = tokio::time::Instant::now() + deadline;
            // No connection in time is the pool's own timeout: nothing reached the server, so
            // the outcome is known (unlike a cut query), and the caller cleans up at once.
            let mut conn = tokio::time::timeout_at(due, conns.take())
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)?
                .map_err(DbError::Connect)?;
            if tokio::time::Instant::now() >= due {
                // Unused and in step: back to the pool, not closed by a query cut at once.
                conn.give_back(&conns, false).await;
                return Err(sqlx::Error::PoolTimedOut.into());
            }
            // Dropped half way (the deadline), the connection is out of step: it is closed,
            // never given back.
            let result = tokio::time::timeout_at(due, async move {
                let out = work(conn.conn()).await;
                (out, conn)
            })
            .await;
            match result {
                Ok((out, conn)) => {
                    // Finished in step: an SQL error still leaves the protocol in step, a wait
                    // the work cut itself (a stalled COPY) or a broken stream does not.
                    if out.as_ref().err().is_none_or(|e| !breaks_connection(e)) {
                        answered.mark();
                        tokio::time::timeout_at(due, conn.give_back(&conns, out.is_err()))
                            .await
                            .ok();
                    }
                    Ok(out?)
                }
                Err(_) => Err(DbError::Timeout(deadline)),
            }
        });
        task.await?
    }

    /// Closes the idle connections (shutdown, after the drain).
    pub async fn close(&self) {
        self.conns.close().await;
        self.pool.close().await;
    }
}

pub use tokens::Checked;

/// The advisory lock key of a workspace, as `pending_uploads_lock_key` computes it: the first
/// 8 bytes of the id's SHA-256. Writers of one workspace's uploads and activity rows serialize
/// on it until their transaction ends (`pending_uploads_admit`), so the quota check cannot be
/// raced and activity `seq` order equals commit order. Ids are their registrants' choice: a key
/// one could pick to match another workspace's would let it queue that workspace's uploads.
/// The function computes the key itself (the previous binary passed another); this one is
/// passed all the same, so a schema without that migration locks on the same key.
pub fn workspace_lock_key(workspace_id: Uuid) -> i64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(workspace_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// Is the database reachable? (Readiness.)
pub async fn ping(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query("SELECT 1").execute(conn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_states() {
        for code in [
            "08006", "57P01", "57P03", "53100", "53300", "40P01", "57014", "55P03",
        ] {
            assert!(transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "22P02", "42P01", "23514"] {
            assert!(!transient_sqlstate(code), "{code}");
        }
    }
}
