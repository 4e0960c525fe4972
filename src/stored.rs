//! `MAX_STORED_BYTES`: a bound on every upload byte the fleet keeps, whatever its workspace
//! and state (SPEC §10: every resource a client can consume is bounded).
//!
//! The per-workspace quotas count unacked files only, and registration is open: a client
//! that acks as it uploads keeps its bytes for ACK_RETENTION outside any quota (a probe
//! stored 43 MB in 1.7 s under a 1 MiB quota), and one that registers workspaces gets a
//! quota for each. This bound holds whatever the client does: past it, uploads get 503
//! `storage_full` until the sweeper has made room.
//!
//! What the fleet keeps is read from the database (the sums its triggers keep,
//! `db::uploads::stored`) every `GAUGE_REFRESH` and after every sweep pass, plus what
//! this replica has in flight or committed since the reading began. The bound is checked
//! before an upload's body is read ([`Stored::admit`]), and the upload reserves its bytes
//! once received ([`Stored::try_reserve`]), so a replica does not pass it; a fleet may, by
//! what the other replicas staged since their last reading.
//!
//! One client could still fill the bound for everyone (103 MB/s, acking as it went, fills
//! 100 GiB in 17 minutes): `STORED_SHARE_PER_CLIENT` percent of it is what one client
//! address may stage a day ([`SHARE_PERIOD`], the longest an unacked row lives), all at once
//! or spread over it. Past its share a client gets 429 `storage_share` until it has refilled;
//! the others are not held back.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    time::{Duration, Instant},
};

use crate::db::uploads::stored_cost;

pub struct Stored {
    /// 0: no bound.
    max: u64,
    /// What a file's activity row costs a share beyond its weight: the row lives
    /// ACTIVITY_RETENTION, the share refills over [`SHARE_PERIOD`] (see
    /// [`Stored::with_activity_retention`]).
    activity_extra: u64,
    counts: Mutex<Counts>,
    full: AtomicBool,
    shares: Mutex<Shares>,
}

/// Why an upload may not stage its bytes.
#[derive(Debug, PartialEq)]
pub enum Refused {
    /// MAX_STORED_BYTES reached.
    Full,
    /// The client's STORED_SHARE_PER_CLIENT is used up: whole enough again in this long.
    Share { retry_after: Duration },
}

/// A client's share refills over this: a row lives at most a day unacked (SPEC: expires_at).
pub const SHARE_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// Clients whose shares are tracked at once (about 1 MiB). A share refilled to the brim says
/// nothing a new one would not, so those go first when the table is full, then the fullest
/// [`EVICTED`] at once: one at a time, every new client past a full table scanned it all
/// (3× the CPU per upload, a red team).
const MAX_CLIENTS: usize = 16_384;
const EVICTED: usize = MAX_CLIENTS / 16;

/// The least an upload costs (one byte, its row and its activity row): a client with less
/// left is refused before its body is read.
const LEAST_COST: u64 = stored_cost(1);

/// Per client ([`crate::networks::client_key`]), bytes it may still stage: `capacity` at
/// most, refilled at `capacity` per [`SHARE_PERIOD`].
struct Shares {
    /// 0: no shares.
    capacity: f64,
    left: HashMap<IpAddr, Share>,
}

struct Share {
    /// Below 0 after an upload larger than what was left: a whole share always takes one.
    bytes: f64,
    at: Instant,
}

impl Shares {
    fn refilled(&mut self, client: IpAddr, now: Instant) -> &mut Share {
        if !self.left.contains_key(&client) && self.left.len() >= MAX_CLIENTS {
            self.make_room(now);
        }
        let capacity = self.capacity;
        let tracked = self.left.len();
        let share = self.left.entry(client).or_insert_with(|| {
            crate::metrics::metrics()
                .storage_share_clients
                .set(tracked as i64 + 1);
            Share {
                bytes: capacity,
                at: now,
            }
        });
        let per_sec = capacity / SHARE_PERIOD.as_secs_f64();
        let since = now.saturating_duration_since(share.at).as_secs_f64();
        share.bytes = (share.bytes + since * per_sec).min(capacity);
        share.at = now;
        share
    }

    fn make_room(&mut self, now: Instant) {
        let (capacity, per_sec) = (self.capacity, self.capacity / SHARE_PERIOD.as_secs_f64());
        let refilled =
            |s: &Share| s.bytes + now.saturating_duration_since(s.at).as_secs_f64() * per_sec;
        self.left.retain(|_, s| refilled(s) < capacity);
        if self.left.len() >= MAX_CLIENTS {
            let mut by_fill: Vec<(f64, IpAddr)> =
                self.left.iter().map(|(ip, s)| (refilled(s), *ip)).collect();
            // The fullest first: they owe least.
            by_fill.select_nth_unstable_by(EVICTED, |a, b| b.0.total_cmp(&a.0));
            for (_, ip) in &by_fill[..EVICTED] {
                self.left.remove(ip);
            }
        }
    }

    /// Takes `bytes` of `client`'s share, or says how long until it has them (all of it,
    /// at most).
    fn take(&mut self, client: IpAddr, bytes: u64, now: Instant) -> Result<(), Duration> {
        let capacity = self.capacity;
        let share = self.refilled(client, now);
        let needed = (bytes as f64).min(capacity);
        if share.bytes >= needed {
            share.bytes -= bytes as f64;
            return Ok(());
        }
        let secs = (needed - share.bytes) / capacity * SHARE_PERIOD.as_secs_f64();
        crate::metrics::metrics().storage_share_refusals.inc();
        Err(Duration::from_secs_f64(secs.ceil().max(1.0)))
    }

    /// Whether `client` has at least `bytes` left, or how long until it has.
    fn has(&mut self, client: IpAddr, bytes: u64, now: Instant) -> Result<(), Duration> {
        self.take(client, bytes, now)?;
        self.give_back(client, bytes);
        Ok(())
    }

    fn give_back(&mut self, client: IpAddr, bytes: u64) {
        let capacity = self.capacity;
        if let Some(share) = self.left.get_mut(&client) {
            share.bytes = (share.bytes + bytes as f64).min(capacity);
        }
    }
}

/// What this replica knows is kept: the last reading's figure, and what it staged that the
/// figure may not hold. Commits in flight count whatever the readings say, so a failed one
/// is given back exactly once, and one that lands while a reading is under way is never
/// dropped with it. MAX_WORKSPACES counts its workspaces so too
/// ([`crate::http::registry::WorkspaceCap`]).
#[derive(Default)]
pub struct Counts {
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
    pub fn kept(&self) -> u64 {
        self.read
            .saturating_add(self.in_flight)
            .saturating_add(self.committed_before)
            .saturating_add(self.committed_since)
    }

    /// `n` more in flight, unless with them what is kept would pass `max` (0: no bound).
    pub fn hold(&mut self, n: u64, max: u64) -> bool {
        let fits = max == 0 || self.kept().saturating_add(n) <= max;
        if fits {
            self.in_flight = self.in_flight.saturating_add(n);
        }
        fits
    }

    /// `n` held in flight are done with: committed (counted until a reading holds them), or
    /// given back.
    pub fn settle(&mut self, n: u64, committed: bool) {
        self.in_flight = self.in_flight.saturating_sub(n);
        if committed {
            self.committed(n);
        }
    }

    /// `n` committed that were not held.
    pub fn committed(&mut self, n: u64) {
        self.committed_since = self.committed_since.saturating_add(n);
    }

    /// A reading begins: what was committed so far may be in its figure, what comes after
    /// may not.
    pub fn reading_begins(&mut self) {
        self.committed_before = self.committed_before.saturating_add(self.committed_since);
        self.committed_since = 0;
    }

    /// The reading's figure, taken since [`Counts::reading_begins`].
    pub fn reading_done(&mut self, figure: u64) {
        self.read = figure;
        self.committed_before = 0;
    }
}

/// Bytes an upload is about to commit: counted as committed when dropped, unless the commit
/// failed and they were [`Reservation::release`]d.
#[must_use]
pub struct Reservation {
    stored: Arc<Stored>,
    bytes: u64,
    /// What its client's share paid (`bytes` and its activity rows' longer life).
    shared: u64,
    /// Whose share they came from.
    client: Option<IpAddr>,
    committed: bool,
}

impl Reservation {
    /// The commit failed: nothing of it is kept, and the client has its share back.
    pub fn release(mut self) {
        self.committed = false;
        if let Some(client) = self.client {
            self.stored.shares().give_back(client, self.shared);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.stored.counts().settle(self.bytes, self.committed);
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
        self.stored.counts().reading_done(bytes);
        self.stored.show();
    }
}

impl Stored {
    /// `share_percent` of `max` is what one client may stage per [`SHARE_PERIOD`] (0: no
    /// shares).
    pub fn new(max: u64, share_percent: u64) -> Stored {
        crate::metrics::metrics()
            .stored_bytes_max
            .set(max.min(i64::MAX as u64) as i64);
        Stored {
            max,
            activity_extra: 0,
            counts: Mutex::new(Counts::default()),
            full: AtomicBool::new(false),
            shares: Mutex::new(Shares {
                capacity: max as f64 * share_percent.min(100) as f64 / 100.0,
                left: HashMap::new(),
            }),
        }
    }

    /// A share pays for a file's activity row as long as the row lives: ACTIVITY_RETENTION (7
    /// days) against the share's day, the row's weight × retention / day. It paid for one day
    /// only, so an address spending its share daily held up to seven shares of activity rows
    /// (a red team's arithmetic).
    pub fn with_activity_retention(mut self, retention: Duration) -> Stored {
        let days = retention.as_secs_f64() / SHARE_PERIOD.as_secs_f64();
        let weight = crate::db::uploads::ACTIVITY_ROW_WEIGHT as f64;
        self.activity_extra = (weight * (days - 1.0)).max(0.0).ceil() as u64;
        self
    }

    /// Whether an upload from `client` (`None`: not counted, the operator's own) may start:
    /// not when what is kept has reached the bound, nor when the client's share cannot pay
    /// for its `declared` length and one file's rows (a body is its files' bytes and their
    /// framing), or, without one, for the least an upload costs. Retry-After then says when
    /// it can: the least cost's wait, given to a large upload, had it refused again (a red
    /// team).
    pub fn admit(&self, client: Option<IpAddr>, declared: Option<u64>) -> Result<(), Refused> {
        if self.full().is_some() {
            self.note(true);
            return Err(Refused::Full);
        }
        match self.share_key(client) {
            Some(key) => self
                .shares()
                .has(
                    key,
                    declared.map_or(LEAST_COST, stored_cost) + self.activity_extra,
                    Instant::now(),
                )
                .map_err(|retry_after| Refused::Share { retry_after }),
            None => Ok(()),
        }
    }

    /// A client's share in bytes (0: none), for the start-up check of its settings.
    pub fn share(&self) -> u64 {
        self.shares().capacity as u64
    }

    /// Bytes kept as far as this replica knows, when they have reached the bound.
    pub fn full(&self) -> Option<u64> {
        let kept = self.kept();
        (self.max > 0 && kept >= self.max).then_some(kept)
    }

    /// Counts `bytes` an upload received is about to commit, unless they would pass the
    /// bound: the check before its body only sees what the others committed, and twenty
    /// uploads admitted together went 7× over it (a probe). `client`'s share pays for them
    /// too, and for its `files`' activity rows as long as they live.
    pub fn try_reserve(
        self: &Arc<Self>,
        bytes: u64,
        files: u64,
        client: Option<IpAddr>,
    ) -> Result<Reservation, Refused> {
        let client = self.share_key(client);
        let shared = bytes.saturating_add(files.saturating_mul(self.activity_extra));
        if let Some(key) = client {
            self.shares()
                .take(key, shared, Instant::now())
                .map_err(|retry_after| Refused::Share { retry_after })?;
        }
        let fits = self.counts().hold(bytes, self.max);
        self.note(!fits);
        self.show();
        if !fits {
            if let Some(key) = client {
                self.shares().give_back(key, shared);
            }
            return Err(Refused::Full);
        }
        // Built only when it fits: dropping one counts it as committed.
        Ok(Reservation {
            stored: self.clone(),
            bytes,
            shared,
            client,
            committed: true,
        })
    }

    /// The key `client`'s share is kept under, when shares are kept.
    fn share_key(&self, client: Option<IpAddr>) -> Option<IpAddr> {
        let client = client?;
        (self.shares().capacity > 0.0).then(|| crate::networks::client_key(client))
    }

    fn shares(&self) -> MutexGuard<'_, Shares> {
        self.shares.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A reading of every row's bytes begins: [`Reading::done`] with its figure. One that
    /// fails changes nothing: what was committed since the last one done still counts.
    pub fn reading(&self) -> Reading<'_> {
        self.counts().reading_begins();
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
        let s = Arc::new(Stored::new(100, 0));
        assert_eq!(s.full(), None);
        let sixty = s.try_reserve(60, 1, None).unwrap();
        assert!(s.try_reserve(41, 1, None).is_err(), "would pass the bound");
        let forty = s.try_reserve(40, 1, None).unwrap();
        assert_eq!(s.full(), Some(100));
        forty.release();
        assert_eq!(s.full(), None, "a failed commit gives its bytes back");
        drop(sixty);
        assert_eq!(s.kept(), 60, "committed: kept until a reading holds it");
        s.reading().done(30);
        assert_eq!(s.full(), None, "swept meanwhile");
        // Committed while a reading is under way counts on top of its figure.
        let reading = s.reading();
        drop(s.try_reserve(70, 1, None).unwrap());
        reading.done(30);
        assert_eq!(s.full(), Some(100));
        s.reading().done(150);
        assert_eq!(s.full(), Some(150), "other replicas staged");
        let off = Arc::new(Stored::new(0, 0));
        let (all, one) = (
            off.try_reserve(u64::MAX, 1, None),
            off.try_reserve(1, 1, None),
        );
        assert!(all.is_ok() && one.is_ok());
        assert_eq!(off.full(), None, "0: no bound");
    }

    /// A commit that failed while a reading was under way was given back twice, and the
    /// count wrapped: every upload was refused (the S3 chaos scenario in `dual`).
    #[test]
    fn a_commit_failing_during_a_reading_is_given_back_once() {
        let s = Arc::new(Stored::new(100, 0));
        let failed = s.try_reserve(50, 1, None).unwrap();
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
        let s = Arc::new(Stored::new(100, 0));
        let landing = s.try_reserve(50, 1, None).unwrap();
        let reading = s.reading();
        drop(landing);
        reading.done(0);
        assert_eq!(s.kept(), 50, "the figure may not hold it");
        let _failed_reading = s.reading();
        assert_eq!(s.kept(), 50, "a reading that was not done changes nothing");
        s.reading().done(50);
        assert_eq!(s.kept(), 50, "now in the figure, and counted once");
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    /// One client may stage its share (here 10 % of 100,000 bytes) a day; the others, and
    /// the operator's own (`None`), are not held back by it.
    #[test]
    fn a_client_stages_its_share_and_the_others_theirs() {
        let s = Arc::new(Stored::new(100_000, 10));
        let a = ip("203.0.113.7");
        drop(s.try_reserve(6_000, 1, a).unwrap());
        let Err(Refused::Share { retry_after }) = s.try_reserve(6_000, 1, a) else {
            panic!("past its share")
        };
        // 2,000 bytes short of 10,000 a day: a fifth of a day.
        let fifth = SHARE_PERIOD.as_secs() / 5;
        assert!(
            (fifth - 1..=fifth).contains(&retry_after.as_secs()),
            "{retry_after:?}"
        );
        assert!(s.admit(a, None).is_ok(), "4,000 left: room for a small one");
        drop(s.try_reserve(6_000, 1, ip("203.0.113.8")).unwrap());
        drop(s.try_reserve(40_000, 1, None).unwrap());
        // A failed commit gives the share back.
        s.try_reserve(4_000, 1, a).unwrap().release();
        drop(s.try_reserve(4_000, 1, a).unwrap());
        // Spent: refused before its body, until the least an upload costs is back.
        let Err(Refused::Share { retry_after }) = s.admit(a, None) else {
            panic!("spent")
        };
        let least = (LEAST_COST * SHARE_PERIOD.as_secs()).div_ceil(10_000);
        assert!(
            (least - 1..=least).contains(&retry_after.as_secs()),
            "{retry_after:?}"
        );
        // An IPv6 client by its /48.
        drop(s.try_reserve(10_000, 1, ip("2001:db8:0:1::1")).unwrap());
        assert!(s.try_reserve(1, 1, ip("2001:db8:0:2::1")).is_err());
        // A whole share takes one upload larger than it.
        drop(s.try_reserve(30_000, 1, ip("198.51.100.1")).unwrap());
        // Past the bound: refused as full, and the share is not charged.
        let b = ip("198.51.100.2");
        assert_eq!(s.try_reserve(10_000, 1, b).err(), Some(Refused::Full));
        s.reading().done(0);
        drop(s.try_reserve(10_000, 1, b).unwrap());
    }

    /// Before its body, an upload is held to its declared length: one refused for lack of
    /// the least cost alone was told a wait that was too short for it.
    #[test]
    fn the_declared_length_is_what_the_share_must_pay_before_the_body() {
        let s = Arc::new(Stored::new(100_000, 10));
        let a = ip("8.8.4.1");
        drop(s.try_reserve(5_000, 1, a).unwrap());
        assert!(s.admit(a, Some(3_000)).is_ok(), "4,536 of 5,000");
        // 9,536 needed: 4,536 short, at 10,000 a day.
        let Err(Refused::Share { retry_after }) = s.admit(a, Some(8_000)) else {
            panic!("4,536 short")
        };
        let wait = (4_536 * SHARE_PERIOD.as_secs()).div_ceil(10_000);
        assert!(
            (wait - 1..=wait).contains(&retry_after.as_secs()),
            "{retry_after:?}"
        );
    }

    /// A file's activity row lives ACTIVITY_RETENTION (7 days), its share refills in a day:
    /// the share pays the row's weight once a day it lives; the bound counts it once.
    #[test]
    fn a_share_pays_for_an_activity_row_as_long_as_it_lives() {
        let week = Duration::from_secs(7 * 24 * 3600);
        let s = Arc::new(Stored::new(1_000_000, 10).with_activity_retention(week));
        let a = ip("8.8.4.2");
        let one = stored_cost(1);
        drop(s.try_reserve(one, 1, a).unwrap());
        let left = s
            .shares()
            .left
            .get(&crate::networks::client_key(a.unwrap()))
            .map(|l| l.bytes);
        // 100,000 less a file's bytes and rows, and six more days of its activity row.
        let spent = 100_000.0 - left.unwrap();
        assert!((spent - (one + 6 * 1024) as f64).abs() < 1.0, "{spent}");
        assert_eq!(s.kept(), one, "the bound counts the row once");
        // Retention of a day or less: nothing more.
        let day = Arc::new(Stored::new(1_000_000, 10).with_activity_retention(SHARE_PERIOD));
        assert_eq!(day.activity_extra, 0);
    }

    #[test]
    fn the_share_table_is_bounded() {
        let s = Arc::new(Stored::new(1 << 30, 10));
        for n in 0..MAX_CLIENTS as u32 + 10 {
            let client = IpAddr::V4(n.into());
            // A 4,000th of a share: refilled in 22 s, and 16,394 of them within the bound.
            drop(s.try_reserve(26_843, 1, Some(client)).unwrap());
        }
        // The fullest went to make room, EVICTED at once: the first (longest refilling).
        assert_eq!(s.shares().left.len(), MAX_CLIENTS - EVICTED + 10);
        assert!(!s.shares().left.contains_key(&IpAddr::V4(0.into())));
        assert!(s
            .shares()
            .left
            .contains_key(&IpAddr::V4((MAX_CLIENTS as u32).into())));
    }
}
