//! Connections that have not sent a whole request head yet, oldest first. When every
//! `MAX_CONNECTIONS` place is taken and another client connects, the oldest of them is closed
//! to make room. Without it a client that opens connections and never finishes their heads
//! (each lives `HEADER_READ_TIMEOUT`, then it opens another) held every place and kept all
//! other clients in the listen backlog. A connection is never shed once a request of it has
//! begun, so a long poll, a download or a slow upload keeps its place as before.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use tokio::sync::Notify;

#[derive(Default)]
pub struct Unstarted {
    next: AtomicU64,
    /// By the order they were opened in.
    waiting: Mutex<BTreeMap<u64, Arc<Notify>>>,
}

/// One connection's standing: held by its task and by its request hook.
pub struct Connection {
    seq: u64,
    owner: Arc<Unstarted>,
    started: AtomicBool,
    shed: Arc<Notify>,
}

impl Unstarted {
    /// A new connection, counted until its first request begins.
    pub fn add(self: &Arc<Self>) -> Arc<Connection> {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let shed = Arc::new(Notify::new());
        self.lock().insert(seq, shed.clone());
        Arc::new(Connection {
            seq,
            owner: self.clone(),
            started: AtomicBool::new(false),
            shed,
        })
    }

    /// Tells the oldest connection without a request to close; false when there is none.
    pub fn shed_oldest(&self) -> bool {
        match self.lock().pop_first() {
            Some((_, shed)) => {
                shed.notify_one();
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Notify>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

impl Connection {
    /// A request of this connection began: it is no longer one to shed.
    pub fn started(&self) {
        if !self.started.swap(true, Ordering::AcqRel) {
            self.owner.lock().remove(&self.seq);
        }
    }

    /// Resolves when the connection is to be closed; never once a request has begun (a shed
    /// that raced the first request's head is ignored).
    pub async fn shed(&self) {
        loop {
            self.shed.notified().await;
            if !self.started.load(Ordering::Acquire) {
                return;
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if !self.started.load(Ordering::Acquire) {
            self.owner.lock().remove(&self.seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn the_oldest_without_a_request_goes_first() {
        let unstarted = Arc::new(Unstarted::default());
        let (a, b, c) = (unstarted.add(), unstarted.add(), unstarted.add());
        a.started();
        assert_eq!(unstarted.len(), 2);
        assert!(unstarted.shed_oldest());
        assert!(b.shed().now_or_never().is_some(), "b, the oldest unstarted");
        assert!(c.shed().now_or_never().is_none());
        drop(c);
        assert!(
            !unstarted.shed_oldest(),
            "a closed connection is not counted"
        );
        assert_eq!(unstarted.len(), 0);
        drop((a, b));
    }

    #[test]
    fn a_shed_that_raced_the_first_request_is_ignored() {
        let unstarted = Arc::new(Unstarted::default());
        let a = unstarted.add();
        assert!(unstarted.shed_oldest());
        a.started();
        assert!(a.shed().now_or_never().is_none());
    }
}
