//! The connections [`super::Db::run`] works on: a stack of idle connections under a semaphore
//! of `DATABASE_MAX_CONNECTIONS` places.
//!
//! Why not sqlx's pool: it pings every connection it takes back (a `Sync` and a wait for the
//! server's answer), so every statement a request runs cost two round trips, and the
//! connection stayed busy until the second came back. Here a connection goes back as soon as
//! its work has left it in step: whatever the work queued (the `ROLLBACK` of a transaction
//! dropped unfinished) is flushed first, and a connection still in a transaction, or whose
//! flush fails, is closed instead. A connection idle for [`PING_IF_IDLE_FOR`] is pinged
//! before use, so a restarted server is noticed there rather than by a request's statement.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sqlx::{postgres::PgConnectOptions, ConnectOptions, Connection, PgConnection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Has the server check, while it runs a statement on `conn`, that the service is still there
/// (`client_connection_check_interval`, PostgreSQL 14 and later, on the systems that have
/// it), so a statement given up on at its deadline, whose connection is then closed, ends on
/// the server within a second. Before, one waiting on a row lock another writer held waited
/// on until the lock freed, then did its work (an ack answered 503 stamped its file all the
/// same), and each retry left one more backend waiting, toward the server's
/// max_connections. Set on each connection, not in the start-up packet: a server (or a
/// pooler) that does not know the setting would refuse the connection there; here the
/// connection goes on without it. Behind a pooler the check watches the pooler.
async fn check_for_gone_clients(conn: &mut PgConnection) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    // A plain string goes in the simple protocol: one round trip, no statement prepared.
    let set = "SET client_connection_check_interval = '1s'";
    if let Err(e) = sqlx::Executor::execute(&mut *conn, set).await {
        if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::info!(error = %e, "the database cannot check for clients that went away: a statement given up on runs to its end there");
        }
    }
}

/// Pooled connections idle longer than this are pinged before use; busier ones skip the
/// round trip.
pub const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// An idle connection older than this is closed rather than kept (sqlx's default): a quiet
/// service gives its connections back to the server.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// A connection is replaced after this long (sqlx's default), so a fleet follows a server
/// whose address or settings changed, and a backend's memory does not grow without end.
const MAX_LIFETIME: Duration = Duration::from_secs(1800);

pub struct Conns {
    options: PgConnectOptions,
    places: Arc<Semaphore>,
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    conn: PgConnection,
    born: Instant,
    since: Instant,
}

/// A connection taken from [`Conns`], with its place. Dropped, it is closed; [`Taken::give_back`]
/// returns it for the next request.
pub struct Taken {
    conn: PgConnection,
    born: Instant,
    _place: OwnedSemaphorePermit,
}

impl Conns {
    pub fn new(options: PgConnectOptions, max: u32) -> Conns {
        Conns {
            options,
            places: Arc::new(Semaphore::new(max as usize)),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// A connection in step with the server: the most recently used idle one (pinged if it
    /// idled long), or a new one. The caller bounds the wait.
    pub async fn take(&self) -> sqlx::Result<Taken> {
        let place = self
            .places
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        while let Some(idle) = self.pop() {
            if idle.since.elapsed() < PING_IF_IDLE_FOR {
                return Ok(Taken::new(idle.conn, idle.born, place));
            }
            let mut conn = idle.conn;
            match conn.ping().await {
                Ok(()) => return Ok(Taken::new(conn, idle.born, place)),
                Err(e) => tracing::debug!(error = %e, "idle database connection dropped"),
            }
        }
        let conn = self.connect().await?;
        Ok(Taken::new(conn, Instant::now(), place))
    }

    /// A new session. A server restarting, refusing connections or at its
    /// `max_connections` is asked again, after a growing pause, for as long as the caller
    /// waits (as sqlx's pool did): a short restart costs a request time, not a 503.
    async fn connect(&self) -> sqlx::Result<PgConnection> {
        let mut pause = Duration::from_millis(10);
        loop {
            match self.options.connect().await {
                Err(e) if worth_retrying(&e) => {
                    tracing::debug!(error = %e, "database connection refused: retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Ok(mut conn) => {
                    check_for_gone_clients(&mut conn).await;
                    return Ok(conn);
                }
                failed => return failed,
            }
        }
    }

    /// The most recently used idle connection that is neither idle too long nor too old;
    /// those are closed.
    fn pop(&self) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // The oldest idle ones are at the bottom of the stack.
        let stale = idle
            .iter()
            .take_while(|i| i.since.elapsed() >= IDLE_TIMEOUT)
            .count();
        let mut closing: Vec<Idle> = idle.drain(..stale).collect();
        let mut top = None;
        while let Some(i) = idle.pop() {
            if i.born.elapsed() < MAX_LIFETIME {
                top = Some(i);
                break;
            }
            closing.push(i);
        }
        drop(idle);
        close_all(closing);
        top
    }

    fn push(&self, conn: PgConnection, born: Instant) {
        if self.places.is_closed() {
            // Shut down: no one takes it again.
            tokio::spawn(conn.close());
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.push(Idle {
            conn,
            born,
            since: Instant::now(),
        });
    }

    /// Closes the idle connections and refuses new takers (shutdown; the busy ones were
    /// drained first).
    pub async fn close(&self) {
        self.places.close();
        let idle: Vec<Idle> =
            std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        for i in idle {
            let _ = i.conn.close().await;
        }
    }
}

/// Errors of a connection attempt that a later attempt may not meet: the server unreachable
/// (restarting, or a network blip), too many connections (53300), starting up (57P03).
fn worth_retrying(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("53300" | "57P03")),
        _ => false,
    }
}

/// Closes connections no one will take, without waiting on them.
fn close_all(idle: Vec<Idle>) {
    for i in idle {
        tokio::spawn(i.conn.close());
    }
}

impl Taken {
    fn new(conn: PgConnection, born: Instant, place: OwnedSemaphorePermit) -> Taken {
        Taken {
            conn,
            born,
            _place: place,
        }
    }

    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// The work finished in step: what it queued goes out, and the connection serves the next
    /// request, unless it is still in a transaction or past its lifetime. No round trip when
    /// nothing was queued and the work succeeded. Work that failed may have left an answer
    /// sqlx does not wait for (a `CopyFail` queued by a COPY dropped half way): a ping reads
    /// past it before the connection is trusted again.
    pub async fn give_back(mut self, conns: &Conns, failed: bool) {
        let flushed = self.conn.flush().await;
        if flushed.is_err() || self.conn.is_in_transaction() {
            return;
        }
        if failed && self.conn.ping().await.is_err() {
            return;
        }
        if self.born.elapsed() >= MAX_LIFETIME {
            let _ = self.conn.close().await;
            return;
        }
        conns.push(self.conn, self.born);
    }
}
