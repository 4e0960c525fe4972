//! Work that many requests ask for and one statement does for all of them (long-poll
//! announcements, fetched_at stamps): requests queue a key, a background task takes what has
//! queued as one batch. Keys are bounded: past the queue's cap (`BATCH_MAX_KEYS`, default
//! [`BATCH_MAX`]) distinct keys the batch is marked overflowed and further keys are not kept
//! (its sender decides what that means).

use std::{
    collections::HashSet,
    hash::Hash,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::sync::Notify;

/// Distinct keys a batch holds at most, by default (`BATCH_MAX_KEYS`): a hash set of 16-byte
/// ids, about 280 KiB per queue when full.
pub const BATCH_MAX: usize = 10_000;

/// The most `BATCH_MAX_KEYS` may be.
pub const BATCH_MAX_LIMIT: usize = 1_000_000;

/// A batch starts at most this often: what is queued in between goes out together (a key
/// once), so a stream of requests costs the database a bounded number of statements.
pub const BATCH_EVERY: Duration = Duration::from_millis(5);

/// Keys taken together.
#[derive(Debug)]
pub struct Batch<K> {
    pub keys: HashSet<K>,
    /// More keys were queued than the cap; those past it are not in `keys`.
    pub overflowed: bool,
}

impl<K> Default for Batch<K> {
    fn default() -> Self {
        Batch {
            keys: HashSet::new(),
            overflowed: false,
        }
    }
}

impl<K: Hash + Eq> Batch<K> {
    fn add(&mut self, key: K, cap: usize) {
        if self.keys.len() < cap || self.keys.contains(&key) {
            self.keys.insert(key);
        } else {
            self.overflowed = true;
        }
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty() && !self.overflowed
    }
}

/// The queue: cloned into every request that adds to it and the task that takes from it.
pub struct Batcher<K> {
    inner: Arc<Queued<K>>,
}

struct Queued<K> {
    /// Distinct keys a batch holds at most.
    cap: usize,
    pending: Mutex<Batch<K>>,
    ready: Notify,
    /// When [`Batcher::next`] last handed out a batch (the pacing of [`BATCH_EVERY`]).
    last_taken: Mutex<Option<tokio::time::Instant>>,
}

impl<K> Clone for Batcher<K> {
    fn clone(&self) -> Self {
        Batcher {
            inner: self.inner.clone(),
        }
    }
}

impl<K: Hash + Eq> Batcher<K> {
    /// A queue whose batches hold at most `cap` distinct keys (at least one).
    pub fn new(cap: usize) -> Self {
        Batcher {
            inner: Arc::new(Queued {
                cap: cap.max(1),
                pending: Mutex::new(Batch::default()),
                ready: Notify::new(),
                last_taken: Mutex::new(None),
            }),
        }
    }

    /// Distinct keys a batch holds at most.
    pub fn cap(&self) -> usize {
        self.inner.cap
    }

    pub fn add(&self, key: K) {
        self.pending().add(key, self.inner.cap);
        self.inner.ready.notify_one();
    }

    /// Waits until something is queued and [`BATCH_EVERY`] has passed since the last batch,
    /// then takes all of it: what queues meanwhile goes out together.
    pub async fn next(&self) -> InFlight<K> {
        loop {
            self.inner.ready.notified().await;
            let last = *self.last_taken();
            if let Some(last) = last {
                tokio::time::sleep_until(last + BATCH_EVERY).await;
            }
            if let Some(batch) = self.take() {
                *self.last_taken() = Some(tokio::time::Instant::now());
                return InFlight {
                    queue: self.clone(),
                    batch,
                    done: false,
                };
            }
        }
    }

    /// Takes what is queued now; `None` when nothing is.
    pub fn take(&self) -> Option<Batch<K>> {
        let batch = std::mem::take(&mut *self.pending());
        (!batch.is_empty()).then_some(batch)
    }

    /// Queues a batch that could not be done again, ahead of the next [`Batcher::next`].
    pub fn put_back(&self, batch: Batch<K>) {
        {
            let mut pending = self.pending();
            pending.overflowed |= batch.overflowed;
            batch
                .keys
                .into_iter()
                .for_each(|k| pending.add(k, self.inner.cap));
        }
        self.inner.ready.notify_one();
    }

    fn pending(&self) -> MutexGuard<'_, Batch<K>> {
        self.inner.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn last_taken(&self) -> MutexGuard<'_, Option<tokio::time::Instant>> {
        self.inner
            .last_taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// A batch its writer is writing. Dropped before [`InFlight::done`] (the writer's task
/// aborted at shutdown, or the write failed), it goes back to its queue: the shutdown's final
/// flush, or the next batch, still writes it.
pub struct InFlight<K: Hash + Eq> {
    queue: Batcher<K>,
    batch: Batch<K>,
    done: bool,
}

impl<K: Hash + Eq> InFlight<K> {
    /// Written (or given up on): nothing goes back.
    pub fn done(mut self) {
        self.done = true;
    }
}

impl<K: Hash + Eq> std::ops::Deref for InFlight<K> {
    type Target = Batch<K>;
    fn deref(&self) -> &Batch<K> {
        &self.batch
    }
}

impl<K: Hash + Eq> Drop for InFlight<K> {
    fn drop(&mut self) {
        if !self.done {
            self.queue.put_back(std::mem::take(&mut self.batch));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_holds_each_key_once_up_to_the_cap_then_says_it_overflowed() {
        let q = Batcher::new(BATCH_MAX);
        q.add(1);
        q.add(1);
        q.add(2);
        let batch = q.next().await;
        let first = std::time::Instant::now();
        assert_eq!(batch.keys, HashSet::from([1, 2]));
        assert!(!batch.overflowed);
        batch.done();
        assert!(q.take().is_none(), "taken whole");
        q.add(3);
        let batch = q.next().await;
        assert_eq!(batch.keys, HashSet::from([3]));
        batch.done();
        assert!(
            first.elapsed() >= BATCH_EVERY,
            "the next batch waits out the pacing"
        );

        for k in 0..BATCH_MAX + 5 {
            q.add(k);
        }
        q.add(0);
        let batch = q.next().await;
        assert_eq!(batch.keys.len(), BATCH_MAX);
        assert!(batch.overflowed);
        batch.done();

        // A batch put back merges with what queued since, under the same cap.
        q.add(BATCH_MAX + 100);
        q.put_back(Batch {
            keys: HashSet::from([1, 2]),
            overflowed: false,
        });
        let batch = q.next().await;
        assert_eq!(batch.keys, HashSet::from([1, 2, BATCH_MAX + 100]));
        assert!(!batch.overflowed);
        batch.done();
        q.put_back(Batch {
            keys: HashSet::new(),
            overflowed: true,
        });
        let batch = q.next().await;
        assert!(batch.overflowed);
        batch.done();
    }

    #[tokio::test]
    async fn the_cap_is_the_queues_own() {
        let q = Batcher::new(2);
        assert_eq!(q.cap(), 2);
        [7, 8, 7, 9].into_iter().for_each(|k| q.add(k));
        let batch = q.next().await;
        assert_eq!(batch.keys, HashSet::from([7, 8]));
        assert!(batch.overflowed);
        batch.done();
        assert_eq!(
            Batcher::<u8>::new(0).cap(),
            1,
            "a queue keeps at least one key"
        );
    }

    /// A writer cut half way (its task aborted at shutdown) leaves its batch to the flush.
    #[tokio::test]
    async fn a_batch_dropped_before_it_is_done_goes_back_to_its_queue() {
        let q = Batcher::new(BATCH_MAX);
        q.add(1);
        let (taken, writing) = tokio::sync::oneshot::channel();
        let writer = tokio::spawn({
            let q = q.clone();
            async move {
                let _batch = q.next().await;
                let _ = taken.send(());
                std::future::pending::<()>().await
            }
        });
        writing.await.unwrap();
        assert!(q.take().is_none(), "the writer holds it");
        writer.abort();
        assert!(writer.await.unwrap_err().is_cancelled());
        let back = q.take().map(|b| b.keys);
        assert_eq!(back, Some(HashSet::from([1])));
    }
}
