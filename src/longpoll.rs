//! Long poll of the activity feed (SPEC §4 Activity, `wait=`): one `LISTEN` connection per
//! replica fans commit notifications out to waiting requests, so a waiting request holds no
//! database connection, and an upload reaches a waiting poller on any replica as soon as it
//! commits.
//!
//! A waiter subscribes *before* it queries, so a row that commits between its query and its
//! wait still wakes it. When the listener loses its connection, notifications sent meanwhile
//! are lost: every waiter is woken to query again.
//!
//! The notifications are sent by an [`Announcer`] after the uploads' commits, in batches, not
//! by the upload transactions: PostgreSQL serializes the commits of all transactions that
//! notify (see migration 20261203200000). A replica that dies between an upload's commit and
//! the batch that announces it leaves that upload to the waiters' next query (at the latest
//! when their wait ends).
//!
//! A listener's connection can stall without closing (a NAT or firewall that dropped it, a
//! database host gone): nothing arrives and nothing fails. So every `DEPENDENCY_TIMEOUT` the
//! listener notifies a channel of its own, through the pool, and a listener that has not
//! heard it within the next `DEPENDENCY_TIMEOUT` is dropped and connected again, on a new
//! connection of its own ([`own_connection`]).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use sqlx::{
    postgres::{PgListener, PgPoolOptions},
    PgPool,
};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::{
    batch::{Batch, Batcher},
    db::{
        self,
        activity::{CHANNEL, EVERYONE},
        Db,
    },
};

/// Pause after an announcement failed, before it is tried again.
const ANNOUNCE_RETRY: Duration = Duration::from_secs(1);

/// Sends the notifications of committed uploads, each a workspace id, in batches
/// ([`crate::batch`]: a workspace once per batch, a batch at most every
/// [`crate::batch::BATCH_EVERY`]; one transaction, one pooled connection at a time). Past
/// the queue's cap (`BATCH_MAX_KEYS`) workspaces in one batch, one notification wakes every
/// waiter.
#[derive(Clone)]
pub struct Announcer {
    queue: Batcher<Uuid>,
}

/// What a batch is sent as.
fn payloads(batch: &Batch<Uuid>) -> Vec<String> {
    match batch.overflowed {
        true => vec![EVERYONE.to_owned()],
        false => batch.keys.iter().map(Uuid::to_string).collect(),
    }
}

impl Announcer {
    pub fn new(cap: usize) -> Self {
        Announcer {
            queue: Batcher::new(cap),
        }
    }

    /// Queues the announcement of a commit in `workspace_id` (call it after the commit).
    pub fn announce(&self, workspace_id: Uuid) {
        self.queue.add(workspace_id);
    }

    /// Sends what is queued, batch after batch, until the task is dropped.
    pub async fn run_forever(self, db: Db) {
        loop {
            let batch = self.queue.next().await;
            match send(&db, &batch).await {
                Ok(()) => batch.done(),
                Err(e) => {
                    tracing::warn!(error = %e, "could not announce uploads; retrying");
                    // Back in the queue, for the next batch.
                    drop(batch);
                    tokio::time::sleep(ANNOUNCE_RETRY).await;
                }
            }
        }
    }

    /// Sends what is queued now, once (at shutdown, after the last upload committed).
    pub async fn flush(&self, db: &Db) {
        let Some(batch) = self.queue.take() else {
            return;
        };
        if let Err(e) = send(db, &batch).await {
            tracing::warn!(error = %e, "could not announce the last uploads");
        }
    }
}

async fn send(db: &Db, batch: &Batch<Uuid>) -> Result<(), db::DbError> {
    let payloads = payloads(batch);
    db.run(move |c| Box::pin(async move { db::activity::announce(c, &payloads).await }))
        .await
}

#[derive(Clone, Default)]
pub struct Hub {
    /// One wake-up per workspace with waiters; entries die with their last waiter.
    waiters: Arc<Mutex<HashMap<Uuid, Weak<Notify>>>>,
}

/// A waiter's handle: holds its workspace's entry alive.
pub struct Subscription {
    notify: Arc<Notify>,
}

impl Subscription {
    pub fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Hub {
    pub fn subscribe(&self, workspace_id: Uuid) -> Subscription {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(notify) = waiters.get(&workspace_id).and_then(Weak::upgrade) {
            return Subscription { notify };
        }
        // Amortised clean-up of entries whose waiters are gone (no wake-up came for them).
        if waiters.len() >= 1024 && waiters.len().is_power_of_two() {
            waiters.retain(|_, w| w.strong_count() > 0);
        }
        let notify = Arc::new(Notify::new());
        waiters.insert(workspace_id, Arc::downgrade(&notify));
        Subscription { notify }
    }

    /// Wakes the workspace's waiters; drops entries nobody holds any more.
    pub fn wake(&self, workspace_id: Uuid) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        match waiters.get(&workspace_id).map(Weak::upgrade) {
            Some(Some(notify)) => notify.notify_waiters(),
            Some(None) => {
                waiters.remove(&workspace_id);
            }
            None => {}
        }
    }

    /// Wakes every waiter (after notifications may have been lost).
    pub fn wake_all(&self) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        waiters.retain(|_, w| match w.upgrade() {
            Some(notify) => {
                notify.notify_waiters();
                true
            }
            None => false,
        });
    }

    /// Workspaces with waiters (a gauge and tests).
    pub fn workspaces_waiting(&self) -> usize {
        let waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        waiters.values().filter(|w| w.strong_count() > 0).count()
    }

    /// Listens until the task is dropped, reconnecting with a pause after failures; `beat` is
    /// how often it checks that its connection still hears (DEPENDENCY_TIMEOUT).
    pub async fn listen_forever(self, pool: PgPool, beat: Duration) {
        loop {
            if let Err(e) = self.listen(&pool, beat).await {
                tracing::warn!(error = %e, "activity listener lost its connection; reconnecting");
            }
            self.wake_all();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn listen(&self, pool: &PgPool, beat: Duration) -> sqlx::Result<()> {
        let mut listener = PgListener::connect_with(&own_connection(pool, beat)).await?;
        // A channel of this listener's own: its heartbeat wakes no one, here or elsewhere.
        let own = format!("pending_uploads_beat_{}", Uuid::new_v4().simple());
        listener.listen_all([CHANNEL, own.as_str()]).await?;
        // Rows may have committed while nobody listened.
        self.wake_all();
        let heard = AtomicBool::new(true);
        let receive = async {
            loop {
                match listener.try_recv().await? {
                    Some(n) if n.channel() == own => heard.store(true, Ordering::Relaxed),
                    Some(n) => match n.payload().parse::<Uuid>() {
                        Ok(ws) => self.wake(ws),
                        Err(_) => self.wake_all(),
                    },
                    // The connection dropped and was re-established: anything may be missed.
                    None => self.wake_all(),
                }
            }
        };
        // Dropping `receive` mid-read leaves the listener's stream out of step; it is dropped
        // with it.
        let watch = async {
            loop {
                tokio::time::sleep(beat).await;
                heard.store(false, Ordering::Relaxed);
                let sent = sqlx::query("SELECT pg_notify($1, '')")
                    .bind(&own)
                    .execute(pool);
                if !matches!(tokio::time::timeout(beat, sent).await, Ok(Ok(_))) {
                    // The pool's trouble, not the listener's: no verdict this time.
                    heard.store(true, Ordering::Relaxed);
                    continue;
                }
                tokio::time::sleep(beat).await;
                if !heard.load(Ordering::Relaxed) {
                    return sqlx::Error::Protocol(format!(
                        "heard nothing on its connection for {beat:?}, its own heartbeat included"
                    ));
                }
            }
        };
        tokio::select! {
            failed = receive => failed,
            stalled = watch => Err(stalled),
        }
    }
}

/// A pool of one new connection for one listener, made with `pool`'s settings. Not `pool`'s
/// own: a listener dropped unheard runs `UNLISTEN *` on its connection before giving it back
/// (sqlx's `Drop`), which on a stalled connection waits until TCP gives up on it (about 15
/// minutes of retransmissions) or the server answers again, so each stall
/// held one of `pool`'s places, and the heartbeat, which needs one, gave no verdict once they
/// were gone: long polls then waited out their `wait`. And its replacement took the pool's
/// idle connection, made before the stall and as likely to share its fate, not a new one.
fn own_connection(pool: &PgPool, beat: Duration) -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(beat)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_lazy_with((*pool.connect_options()).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_only_the_workspace_and_forgets_idle_entries() {
        let hub = Hub::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let sa = hub.subscribe(a);
        let sb = hub.subscribe(b);
        {
            let wa = sa.notify().notified();
            let wb = sb.notify().notified();
            tokio::pin!(wa, wb);
            wa.as_mut().enable();
            wb.as_mut().enable();
            hub.wake(a);
            tokio::time::timeout(Duration::from_secs(1), wa)
                .await
                .unwrap();
            assert!(tokio::time::timeout(Duration::from_millis(50), wb)
                .await
                .is_err());
        }
        assert_eq!(hub.workspaces_waiting(), 2);
        drop(sa);
        drop(sb);
        hub.wake_all();
        assert!(hub.waiters.lock().unwrap().is_empty());
    }

    #[test]
    fn an_overflowed_batch_is_announced_to_everyone() {
        let a = Uuid::new_v4();
        let named = Batch {
            keys: [a].into(),
            overflowed: false,
        };
        assert_eq!(payloads(&named), [a.to_string()]);
        let overflowed = Batch {
            keys: [a].into(),
            overflowed: true,
        };
        assert_eq!(payloads(&overflowed), [EVERYONE]);
        assert!(
            EVERYONE.parse::<Uuid>().is_err(),
            "listeners read it as no workspace"
        );
    }
}
