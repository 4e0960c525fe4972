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

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Mutex, MutexGuard, PoisonError,
};

pub struct Stored {
    /// 0: no bound.
    max: u64,
    counts: Mutex<Counts>,
    full: AtomicBool,
}

#[derive(Default)]
struct Counts {
    /// Bytes of every row at the last reading.
    read: u64,
    /// Reserved since the latest reading began: not in any figure yet.
    newer: u64,
    /// Reserved before the latest reading began: its figure holds those committed by then,
    /// and they are dropped when it is done.
    older: u64,
    /// Readings begun: which of the two a reservation is in.
    readings: u64,
}

impl Counts {
    fn kept(&self) -> u64 {
        self.read
            .saturating_add(self.newer)
            .saturating_add(self.older)
    }
}

/// Bytes an upload is about to commit, counted until the reading after it; give them back
/// with [`Stored::release`] if the commit fails.
#[must_use]
pub struct Reservation {
    bytes: u64,
    reading: u64,
}

/// A reading under way: what this replica reserves from its start on counts on top of it.
pub struct Reading<'a> {
    stored: &'a Stored,
}

impl Reading<'_> {
    /// The database's figure, taken since [`Stored::reading`].
    pub fn done(self, bytes: u64) {
        let mut c = self.stored.counts();
        c.read = bytes;
        c.older = 0;
        drop(c);
        self.stored.show();
    }
}

impl Stored {
    pub fn new(max: u64) -> Stored {
        crate::metrics::metrics()
            .stored_bytes_max
            .set(max.min(i64::MAX as u64) as i64);
        Stored {
            max,
            counts: Mutex::new(Counts::default()),
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
    /// uploads admitted together went 7× over it (a probe).
    pub fn try_reserve(&self, bytes: u64) -> Option<Reservation> {
        let mut c = self.counts();
        let fits = self.max == 0 || c.kept().saturating_add(bytes) <= self.max;
        let reserved = fits.then(|| {
            c.newer = c.newer.saturating_add(bytes);
            Reservation {
                bytes,
                reading: c.readings,
            }
        });
        drop(c);
        self.note(reserved.is_none());
        self.show();
        reserved
    }

    /// Gives back what a commit that failed reserved. Reserved before the latest reading
    /// began, its bytes go from what that reading drops: subtracting them again once it is
    /// done wrapped the count, and every upload was refused as `storage_full` (the S3 chaos
    /// scenario in `dual`). Reserved before an earlier one, they are gone already.
    pub fn release(&self, r: Reservation) {
        let mut c = self.counts();
        if r.reading == c.readings {
            c.newer = c.newer.saturating_sub(r.bytes);
        } else if r.reading + 1 == c.readings {
            c.older = c.older.saturating_sub(r.bytes);
        }
        drop(c);
        self.show();
    }

    /// A reading of every row's bytes begins: [`Reading::done`] with its figure. One that
    /// fails leaves its reservations counted until a later one is done.
    pub fn reading(&self) -> Reading<'_> {
        let mut c = self.counts();
        c.older = c.older.saturating_add(c.newer);
        c.newer = 0;
        c.readings += 1;
        Reading { stored: self }
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // The counts are whole after any panic: each update is one assignment.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn kept(&self) -> u64 {
        self.counts().kept()
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
        let sixty = s.try_reserve(60).unwrap();
        assert!(s.try_reserve(41).is_none(), "would pass the bound");
        let forty = s.try_reserve(40).unwrap();
        assert_eq!(s.full(), Some(100));
        s.release(forty);
        assert_eq!(s.full(), None, "a failed commit gives its bytes back");
        let _ = sixty;
        s.reading().done(30);
        assert_eq!(s.full(), None, "swept meanwhile");
        // Reserved while a reading is under way counts on top of its figure.
        let reading = s.reading();
        let _seventy = s.try_reserve(70).unwrap();
        reading.done(30);
        assert_eq!(s.full(), Some(100));
        s.reading().done(150);
        assert_eq!(s.full(), Some(150), "other replicas staged");
        let off = Stored::new(0);
        assert!(off.try_reserve(u64::MAX).is_some() && off.try_reserve(1).is_some());
        assert_eq!(off.full(), None, "0: no bound");
    }

    /// A commit that failed while a reading was under way was given back twice, and the
    /// count wrapped: every upload was refused (the S3 chaos scenario in `dual`).
    #[test]
    fn a_commit_failing_during_a_reading_is_given_back_once() {
        let s = Stored::new(100);
        let failed = s.try_reserve(50).unwrap();
        let committed = s.try_reserve(20).unwrap();
        let reading = s.reading();
        s.release(failed);
        assert_eq!(s.kept(), 20, "until the reading is done, the other counts");
        reading.done(20);
        assert_eq!(s.kept(), 20);
        assert_eq!(s.full(), None);
        // Given back after a later reading: the figure never held it.
        let late = s.try_reserve(30).unwrap();
        s.reading().done(20);
        s.release(late);
        s.release(committed);
        assert_eq!(s.kept(), 20);
        // Across a reading that failed, it is still counted until one is done.
        let across = s.try_reserve(10).unwrap();
        let _failed = s.reading();
        let _next = s.reading();
        s.release(across);
        assert_eq!(s.kept(), 30);
    }
}
