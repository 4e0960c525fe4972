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
//! this replica has in flight or committed since the reading began. The bound is checked before an upload's
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

/// What this replica knows is kept: the last reading's figure, and what it staged that the
/// figure may not hold. Commits in flight count whatever the readings say, so a failed one
/// is given back exactly once, and one that lands while a reading is under way is never
/// dropped with it.
#[derive(Default)]
struct Counts {
    /// Bytes of every row at the last reading.
    read: u64,
    /// Reserved by uploads whose commit has not ended.
    in_flight: u64,
    /// Committed before the latest reading began: in its figure once it is done.
    committed_before: u64,
    /// Committed since the latest reading began: maybe not in its figure.
    committed_since: u64,
}

impl Counts {
    fn kept(&self) -> u64 {
        self.read
            .saturating_add(self.in_flight)
            .saturating_add(self.committed_before)
            .saturating_add(self.committed_since)
    }
}

/// Bytes an upload is about to commit: counted as committed when dropped, unless the commit
/// failed and they were [`Reservation::release`]d.
#[must_use]
pub struct Reservation<'a> {
    stored: &'a Stored,
    bytes: u64,
    committed: bool,
}

impl Reservation<'_> {
    /// The commit failed: nothing of it is kept.
    pub fn release(mut self) {
        self.committed = false;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut c = self.stored.counts();
        c.in_flight = c.in_flight.saturating_sub(self.bytes);
        if self.committed {
            c.committed_since = c.committed_since.saturating_add(self.bytes);
        }
        drop(c);
        self.stored.show();
    }
}

/// A reading under way: what this replica commits from its start on counts on top of it.
pub struct Reading<'a> {
    stored: &'a Stored,
}

impl Reading<'_> {
    /// The database's figure, taken since [`Stored::reading`].
    pub fn done(self, bytes: u64) {
        let mut c = self.stored.counts();
        c.read = bytes;
        c.committed_before = 0;
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
    pub fn try_reserve(&self, bytes: u64) -> Option<Reservation<'_>> {
        let mut c = self.counts();
        let fits = self.max == 0 || c.kept().saturating_add(bytes) <= self.max;
        if fits {
            c.in_flight = c.in_flight.saturating_add(bytes);
        }
        drop(c);
        self.note(!fits);
        self.show();
        // Built only when it fits: dropping one counts it as committed.
        fits.then(|| Reservation {
            stored: self,
            bytes,
            committed: true,
        })
    }

    /// A reading of every row's bytes begins: [`Reading::done`] with its figure. One that
    /// fails changes nothing: what was committed since the last one done still counts.
    pub fn reading(&self) -> Reading<'_> {
        let mut c = self.counts();
        c.committed_before = c.committed_before.saturating_add(c.committed_since);
        c.committed_since = 0;
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
        forty.release();
        assert_eq!(s.full(), None, "a failed commit gives its bytes back");
        drop(sixty);
        assert_eq!(s.kept(), 60, "committed: kept until a reading holds it");
        s.reading().done(30);
        assert_eq!(s.full(), None, "swept meanwhile");
        // Committed while a reading is under way counts on top of its figure.
        let reading = s.reading();
        drop(s.try_reserve(70).unwrap());
        reading.done(30);
        assert_eq!(s.full(), Some(100));
        s.reading().done(150);
        assert_eq!(s.full(), Some(150), "other replicas staged");
        let off = Stored::new(0);
        let (all, one) = (off.try_reserve(u64::MAX), off.try_reserve(1));
        assert!(all.is_some() && one.is_some());
        assert_eq!(off.full(), None, "0: no bound");
    }

    /// A commit that failed while a reading was under way was given back twice, and the
    /// count wrapped: every upload was refused (the S3 chaos scenario in `dual`).
    #[test]
    fn a_commit_failing_during_a_reading_is_given_back_once() {
        let s = Stored::new(100);
        let failed = s.try_reserve(50).unwrap();
        let reading = s.reading();
        failed.release();
        reading.done(20);
        assert_eq!(s.kept(), 20);
        assert_eq!(s.full(), None);
    }

    /// A commit in flight when a reading began may land after its figure was taken: it
    /// counts until a reading that began after it ended.
    #[test]
    fn a_commit_landing_during_a_reading_is_kept_counted() {
        let s = Stored::new(100);
        let landing = s.try_reserve(50).unwrap();
        let reading = s.reading();
        drop(landing);
        reading.done(0);
        assert_eq!(s.kept(), 50, "the figure may not hold it");
        let _failed_reading = s.reading();
        assert_eq!(s.kept(), 50, "a reading that was not done changes nothing");
        s.reading().done(50);
        assert_eq!(s.kept(), 50, "now in the figure, and counted once");
    }
}
