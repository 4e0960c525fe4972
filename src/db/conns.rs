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
        let conn = self.options.connect().await?;
        Ok(Taken::new(conn, Instant::now(), place))
    }

    fn pop(&self) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // The oldest idle ones are at the bottom of the stack.
        let stale = idle
            .iter()
            .take_while(|i| i.since.elapsed() >= IDLE_TIMEOUT)
            .count();
        let closing: Vec<Idle> = idle.drain(..stale).collect();
        let top = idle.pop();
        drop(idle);
        close_all(closing);
        top
    }

    fn push(&self, conn: PgConnection, born: Instant) {
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

fn close_all(idle: Vec<Idle>) {
    if idle.is_empty() {
        return;
    }
    tokio::spawn(async move {
        for i in idle {
            let _ = i.conn.close().await;
        }
    });
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
    /// nothing was queued.
    pub async fn give_back(mut self, conns: &Conns) {
        let flushed = self.conn.flush().await;
        if flushed.is_err() || self.conn.is_in_transaction() {
            return;
        }
        if self.born.elapsed() >= MAX_LIFETIME {
            let _ = self.conn.close().await;
            return;
        }
        conns.push(self.conn, self.born);
    }
}
