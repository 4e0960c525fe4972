//! Connections between requests (none begun yet, or idle after a response), by how long they
//! have been so. When every `MAX_CONNECTIONS` place is taken and another client connects, the
//! one idle longest is closed to make room. Without it, a client that opens connections and
//! never finishes their heads (each lives `HEADER_READ_TIMEOUT`, then it opens another), or
//! keeps them alive with one cheap request per `HEADER_READ_TIMEOUT`, held every place and
//! kept all other clients in the listen backlog. A connection is never shed while a request
//! of it is under way (its response body not yet done): the long-lived ones hold slots, whose
//! kinds together stay below `MAX_CONNECTIONS` by default. Except while such a request waits
//! on its client for a short body (a JSON body, the rest of a refused upload's): a flood of
//! those held places for as long as their deadlines, and nothing is lost by dropping one.
//!
//! Not while a response waits on its client to read (tried, and undone): a healthy slow
//! download's writes are refused for a second and more at a time, since the kernel wakes a
//! writer only once much of its buffer has drained, so a flood of bare connects had such
//! downloads dropped mid-body, the oldest waiter first (a probe).

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

/// A connection idle for less than this is not shed: a new client's first head, or the next
/// request of a client that just had its answer, is most likely on its way.
pub const MIN_IDLE: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Idle {
    next: AtomicU64,
    /// By when they became idle, oldest first.
    waiting: Mutex<BTreeMap<u64, (Instant, Arc<Signal>)>>,
    /// Open connections whose read buffer grew, kept alive after their answers; at most
    /// `grown_max` (MAX_LARGE_BUFFER_CONNECTIONS).
    grown: AtomicUsize,
    grown_max: usize,
}

/// How a connection is told to close; once told, it is no longer a candidate.
#[derive(Default)]
struct Signal {
    notify: Notify,
    closing: AtomicBool,
}

/// How a connection is to be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// It never began a request (most likely a head that is never finished): drop it.
    Drop,
    /// It served requests: close it once whatever it is writing is out (a response whose
    /// body just ended may still be in the connection's buffer).
    Close,
}

/// One connection's standing: held by its task, its request hook and its responses.
pub struct Connection {
    owner: Arc<Idle>,
    /// Its place in the idle map while it is idle.
    seq: AtomicU64,
    served: AtomicBool,
    in_request: AtomicUsize,
    /// While its request waits on the client for a short body ([`Connection::waiting_on_body`]).
    on_body: AtomicBool,
    shed: Arc<Signal>,
    /// Set by its socket once its read buffer grew (`conn::LARGE_READ`).
    large_reads: Arc<AtomicBool>,
    /// A TRUSTED_PROXIES peer's: kept alive whatever its buffer (the proxy bounds its pool).
    proxy: bool,
    /// Counted in its owner's `grown`, until it is dropped.
    kept_grown: AtomicBool,
}

impl Idle {
    /// `grown_max`: how many connections whose read buffer grew may be kept alive.
    pub fn new(grown_max: usize) -> Idle {
        Idle {
            grown_max,
            ..Idle::default()
        }
    }

    /// A new connection, idle until its first request begins; `large_reads` is set by its
    /// socket once its read buffer has grown; `proxy`: a TRUSTED_PROXIES peer's.
    pub fn add(self: &Arc<Self>, large_reads: Arc<AtomicBool>, proxy: bool) -> Arc<Connection> {
        let shed = Arc::new(Signal::default());
        let seq = {
            let mut waiting = self.lock();
            let seq = self.next.fetch_add(1, Ordering::Relaxed);
            waiting.insert(seq, (Instant::now(), shed.clone()));
            seq
        };
        Arc::new(Connection {
            owner: self.clone(),
            seq: AtomicU64::new(seq),
            served: AtomicBool::new(false),
            in_request: AtomicUsize::new(0),
            on_body: AtomicBool::new(false),
            shed,
            large_reads,
            proxy,
            kept_grown: AtomicBool::new(false),
        })
    }

    /// Tells the connection idle longest, for `min_idle` at least, to close; false when none
    /// has been.
    pub fn shed_oldest(&self, min_idle: Duration) -> bool {
        let mut waiting = self.lock();
        match waiting.first_key_value() {
            Some((_, (since, _))) if since.elapsed() >= min_idle => {}
            _ => return false,
        }
        let Some((_, (_, shed))) = waiting.pop_first() else {
            return false;
        };
        shed.closing.store(true, Ordering::Release);
        shed.notify.notify_one();
        true
    }

    /// Makes `connection` a candidate from now, the newest, unless it is closing already.
    fn enter(
        &self,
        waiting: &mut BTreeMap<u64, (Instant, Arc<Signal>)>,
        shed: &Arc<Signal>,
    ) -> u64 {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        if !shed.closing.load(Ordering::Acquire) {
            waiting.insert(seq, (Instant::now(), shed.clone()));
        }
        seq
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, (Instant, Arc<Signal>)>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

impl Connection {
    /// Whether a request of it has reached the router.
    pub fn served(&self) -> bool {
        self.served.load(Ordering::Acquire)
    }

    /// A request of this connection began: it is not idle until the request ends.
    pub fn begin(&self) {
        let mut waiting = self.owner.lock();
        self.served.store(true, Ordering::Release);
        if self.in_request.fetch_add(1, Ordering::AcqRel) == 0 {
            waiting.remove(&self.seq.load(Ordering::Acquire));
        }
    }

    /// A request ended (its response body is done or dropped): idle from now, the newest.
    pub fn end(&self) {
        let mut waiting = self.owner.lock();
        if self.in_request.fetch_sub(1, Ordering::AcqRel) == 1 {
            let seq = self.owner.enter(&mut waiting, &self.shed);
            self.seq.store(seq, Ordering::Release);
        }
    }

    /// While the returned guard lives, the request waits on its client for a body with a
    /// short deadline of its own, and nothing is lost if the connection goes meanwhile: it
    /// may be shed like an idle one (dropped, request and all), the newest.
    pub fn waiting_on_body(self: &Arc<Self>) -> BodyWait {
        let mut waiting = self.owner.lock();
        self.on_body.store(true, Ordering::Release);
        let seq = self.owner.enter(&mut waiting, &self.shed);
        BodyWait {
            connection: self.clone(),
            seq,
        }
    }

    /// Whether the connection may stay open after its answer. One whose read buffer grew (up
    /// to 256 KiB, kept while it lives) only while fewer than MAX_LARGE_BUFFER_CONNECTIONS
    /// such are kept: a client that grew the buffers of thousands of idle keep-alive
    /// connections (a large body to each, then one cheap request a while) held 3 GiB of one
    /// replica (a red team).
    ///
    /// A proxy's are not counted: behind a load balancer every pooled connection soon carried
    /// an upload, and the proxy bounds how many it keeps.
    pub fn may_stay_open(&self) -> bool {
        if self.proxy || !self.large_reads.load(Ordering::Relaxed) {
            return true;
        }
        // Claimed before it is counted: a place is counted once, and given back once (Drop).
        if self
            .kept_grown
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return true;
        }
        let (grown, max) = (&self.owner.grown, self.owner.grown_max);
        let kept = grown
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if !kept {
            self.kept_grown.store(false, Ordering::Release);
        }
        kept
    }

    /// Resolves when the connection is to be closed, and how. A shed that raced the first
    /// request's head, or the end of a body wait, closes the connection as one that served
    /// requests: after its answer.
    pub async fn shed(&self) -> Shed {
        self.shed.notify.notified().await;
        let served = self.served.load(Ordering::Acquire);
        match served && !self.on_body.load(Ordering::Acquire) {
            true => Shed::Close,
            false => Shed::Drop,
        }
    }
}

/// See [`Connection::waiting_on_body`].
pub struct BodyWait {
    connection: Arc<Connection>,
    seq: u64,
}

impl Drop for BodyWait {
    fn drop(&mut self) {
        let owner = &self.connection.owner;
        let mut waiting = owner.lock();
        self.connection.on_body.store(false, Ordering::Release);
        waiting.remove(&self.seq);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.kept_grown.load(Ordering::Acquire) {
            self.owner.grown.fetch_sub(1, Ordering::AcqRel);
        }
        if self.in_request.load(Ordering::Acquire) == 0 {
            self.owner.lock().remove(&self.seq.load(Ordering::Acquire));
        }
    }
}

/// A response body that ends its connection's request when it is done or dropped.
pub struct Tracked {
    body: axum::body::Body,
    connection: Arc<Connection>,
}

impl Tracked {
    pub fn new(body: axum::body::Body, connection: Arc<Connection>) -> Tracked {
        Tracked { body, connection }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.connection.end();
    }
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn the_connection_idle_longest_goes_first() {
        let idle = Arc::new(Idle::default());
        let (a, b, c) = (
            idle.add(Default::default(), false),
            idle.add(Default::default(), false),
            idle.add(Default::default(), false),
        );
        a.begin();
        assert_eq!(idle.len(), 2);
        assert!(idle.shed_oldest(Duration::ZERO));
        assert_eq!(b.shed().now_or_never(), Some(Shed::Drop), "b, never served");
        assert_eq!(c.shed().now_or_never(), None);
        // a's request ends: it is idle now, after c.
        a.end();
        assert!(idle.shed_oldest(Duration::ZERO));
        assert_eq!(c.shed().now_or_never(), Some(Shed::Drop));
        assert!(idle.shed_oldest(Duration::ZERO));
        assert_eq!(
            a.shed().now_or_never(),
            Some(Shed::Close),
            "a served a request"
        );
        assert!(!idle.shed_oldest(Duration::ZERO));
        drop((b, c));
        assert_eq!(idle.len(), 0);
    }

    #[test]
    fn a_request_waiting_on_a_short_body_may_be_dropped() {
        let idle = Arc::new(Idle::default());
        let a = idle.add(Default::default(), false);
        a.begin();
        let wait = a.waiting_on_body();
        assert_eq!(idle.len(), 1);
        assert!(idle.shed_oldest(Duration::ZERO));
        assert_eq!(a.shed().now_or_never(), Some(Shed::Drop));
        drop(wait);
        let again = a.waiting_on_body();
        drop(again);
        assert_eq!(idle.len(), 0, "a body that came is no longer a candidate");
        assert!(!idle.shed_oldest(Duration::ZERO));
    }

    #[test]
    fn a_connection_in_a_request_is_not_a_candidate() {
        let idle = Arc::new(Idle::default());
        let a = idle.add(Default::default(), false);
        a.begin();
        assert!(!idle.shed_oldest(Duration::ZERO));
        // A shed that raced the first request's head: closed after its answer.
        let b = idle.add(Default::default(), false);
        assert!(idle.shed_oldest(Duration::ZERO));
        b.begin();
        assert_eq!(b.shed().now_or_never(), Some(Shed::Close));
        b.end();
        assert_eq!(idle.len(), 0, "a closing connection is no candidate again");
        drop(b);
        a.end();
        assert_eq!(idle.len(), 1);
        drop(a);
        assert_eq!(idle.len(), 0);
    }

    #[test]
    fn a_connection_idle_for_less_than_the_minimum_is_not_shed() {
        let idle = Arc::new(Idle::default());
        let a = idle.add(Default::default(), false);
        assert!(!idle.shed_oldest(Duration::from_secs(60)));
        assert_eq!(a.shed().now_or_never(), None);
        assert!(idle.shed_oldest(Duration::ZERO));
        assert_eq!(a.shed().now_or_never(), Some(Shed::Drop));
    }
}
