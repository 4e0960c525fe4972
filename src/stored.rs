//! `MAX_STORED_BYTES`: a bound on every upload byte the fleet keeps, whatever its workspace
//! and state (SPEC §10: every resource a client can consume is bounded).
//!
//! The per-workspace quotas count unacked files only, and registration is open: a client
//! that acks as it uploads keeps its bytes for ACK_RETENTION outside any quota (a probe
//! stored 43 MB in 1.7 s under a 1 MiB quota), and one that registers workspaces gets a
//! quota for each. This bound holds whatever the client does: past it, uploads get 503
//! `storage_full` until the sweeper has made room.
//!
//! What the fleet keeps is read from the database (every row's size,
//! `db::uploads::stored_bytes`) every `GAUGE_REFRESH` and after every sweep pass, plus what
//! this replica reserved since the reading began. The bound is checked before an upload's
//! body is read ([`Stored::admit`]), and the upload reserves its bytes once received
//! ([`Stored::try_reserve`]), so a replica does not pass it; a fleet may, by what the other
//! replicas staged since their last reading.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub struct Stored {
    /// 0: no bound.
    max: u64,
    /// Bytes of every row at the last reading.
    read: AtomicU64,
    /// Bytes this replica reserved since that reading.
    since: AtomicU64,
    full: AtomicBool,
}

/// A reading under way: what this replica staged from its start on counts on top of it.
pub struct Reading<'a> {
    stored: &'a Stored,
    staged_before: u64,
}

impl Reading<'_> {
    /// The database's figure, taken since [`Stored::reading`].
    pub fn done(self, bytes: u64) {
        let s = self.stored;
        s.read.store(bytes, Ordering::Relaxed);
        // Staged before the reading began is in its figure; staged since is not.
        s.since.fetch_sub(self.staged_before, Ordering::Relaxed);
        s.show();
    }
}

impl Stored {
    pub fn new(max: u64) -> Stored {
        crate::metrics::metrics()
            .stored_bytes_max
            .set(max.min(i64::MAX as u64) as i64);
        Stored {
            max,
            read: AtomicU64::new(0),
            since: AtomicU64::new(0),
            full: AtomicBool::new(false),
        }
    }

    /// Whether an upload may start: not when what is kept has reached the bound.
    pub fn admit(&self) -> bool {
        let full = self.full().is_some();
        if full {
            self.note(true);
        }
        !full
    }

    /// Bytes kept as far as this replica knows, when they have reached the bound.
    pub fn full(&self) -> Option<u64> {
        let kept = self.kept();
        (self.max > 0 && kept >= self.max).then_some(kept)
    }

    /// Counts `bytes` an upload received is about to commit, unless they would pass the
    /// bound: the check before its body only sees what the others committed, and twenty
    /// uploads admitted together went 7× over it (a probe). [`Stored::release`] them if the
    /// commit fails.
    pub fn try_reserve(&self, bytes: u64) -> bool {
        let read = self.read.load(Ordering::Relaxed);
        let reserved = self
            .since
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |since| {
                let kept = read.saturating_add(since).saturating_add(bytes);
                (self.max == 0 || kept <= self.max).then_some(since.saturating_add(bytes))
            })
            .is_ok();
        self.note(!reserved);
        self.show();
        reserved
    }

    /// Bytes reserved for a commit that failed.
    pub fn release(&self, bytes: u64) {
        let _ = self
            .since
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |since| {
                Some(since.saturating_sub(bytes))
            });
        self.show();
    }

    /// A reading of every row's bytes begins: [`Reading::done`] with its figure.
    pub fn reading(&self) -> Reading<'_> {
        Reading {
            stored: self,
            staged_before: self.since.load(Ordering::Relaxed),
        }
    }

    fn kept(&self) -> u64 {
        self.read
            .load(Ordering::Relaxed)
            .saturating_add(self.since.load(Ordering::Relaxed))
    }

    /// The gauge operators watch (`stored_bytes`, with `stored_bytes_max`).
    fn show(&self) {
        let kept = self.kept().min(i64::MAX as u64) as i64;
        crate::metrics::metrics().stored_bytes.set(kept);
    }

    /// Uploads are refused (`full`) or taken again: one line when that changes, so an
    /// operator sees when refusals start and when they end, not each refusal.
    fn note(&self, full: bool) {
        if self.full.swap(full, Ordering::Relaxed) != full {
            let (kept, max) = (self.kept(), self.max);
            match full {
                true => tracing::warn!(
                    event = "storage_full",
                    kept,
                    max,
                    "MAX_STORED_BYTES reached: uploads refused until the sweeper makes room"
                ),
                false => tracing::info!(
                    event = "storage_room",
                    kept,
                    max,
                    "below MAX_STORED_BYTES again: uploads taken"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_bytes_count_until_the_next_reading() {
        let s = Stored::new(100);
        assert_eq!(s.full(), None);
        assert!(s.try_reserve(60));
        assert!(!s.try_reserve(41), "would pass the bound");
        assert!(s.try_reserve(40));
        assert_eq!(s.full(), Some(100));
        s.release(40);
        assert_eq!(s.full(), None, "a failed commit gives its bytes back");
        s.reading().done(30);
        assert_eq!(s.full(), None, "swept meanwhile");
        // Reserved while a reading is under way counts on top of its figure.
        let reading = s.reading();
        assert!(s.try_reserve(70));
        reading.done(30);
        assert_eq!(s.full(), Some(100));
        s.reading().done(150);
        assert_eq!(s.full(), Some(150), "other replicas staged");
        let off = Stored::new(0);
        assert!(off.try_reserve(u64::MAX) && off.try_reserve(1));
        assert_eq!(off.full(), None, "0: no bound");
    }
}
