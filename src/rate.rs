//! Token buckets: at most `per_minute` events a minute on average, as many at once.
//! Registration (SPEC §4) needs no credential, so every one a stranger makes adds rows that
//! nothing removes; a replica's bucket bounds how fast that can happen, and a bucket per
//! client address keeps one stranger from using up the replica's for everyone else.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

pub struct RateLimit {
    per_minute: u64,
    state: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    pub fn per_minute(per_minute: u64) -> Self {
        RateLimit {
            per_minute,
            state: Mutex::new(Bucket::full(per_minute, Instant::now())),
        }
    }

    /// Takes one event's place now, or says how long until there is one.
    pub fn take(&self) -> Result<(), Duration> {
        self.take_at(Instant::now())
    }

    fn take_at(&self, now: Instant) -> Result<(), Duration> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(self.per_minute, now)
    }
}

impl RateLimit {
    /// Returns a place taken for an event that did not happen after all.
    pub fn give_back(&self) {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .give_back(self.per_minute);
    }
}

impl Bucket {
    fn full(per_minute: u64, now: Instant) -> Bucket {
        Bucket {
            tokens: per_minute as f64,
            at: now,
        }
    }

    fn refill(&mut self, per_minute: u64, now: Instant) {
        let per_sec = per_minute as f64 / 60.0;
        let refilled = now.saturating_duration_since(self.at).as_secs_f64() * per_sec;
        self.tokens = (self.tokens + refilled).min(per_minute as f64);
        self.at = now;
    }

    fn give_back(&mut self, per_minute: u64) {
        self.tokens = (self.tokens + 1.0).min(per_minute as f64);
    }

    fn take(&mut self, per_minute: u64, now: Instant) -> Result<(), Duration> {
        self.refill(per_minute, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64(
            (1.0 - self.tokens) * 60.0 / per_minute as f64,
        ))
    }
}

/// Client addresses tracked at once: about 1.6 MiB of buckets. A bucket refilled to the brim
/// says nothing a new one would not, so those go first when it is full; past that (as many
/// clients as this, each within a minute of its last registration) a new address waits.
const MAX_CLIENTS: usize = 16_384;

/// A full table is scanned for full buckets at most this often (a scan takes about a
/// millisecond, under the lock every registration takes).
const SCAN_EVERY: Duration = Duration::from_secs(1);

/// A bucket per client ([`crate::networks::client_key`]: an IPv4 address, an IPv6 /48),
/// each `per_minute`.
pub struct PerClient {
    per_minute: u64,
    clients: Mutex<Clients>,
    max_clients: usize,
}

struct Clients {
    buckets: HashMap<IpAddr, Bucket>,
    /// When a full table was last scanned ([`SCAN_EVERY`]).
    scanned_at: Option<Instant>,
}

impl PerClient {
    pub fn per_minute(per_minute: u64) -> Self {
        Self::bounded(per_minute, MAX_CLIENTS)
    }

    fn bounded(per_minute: u64, max_clients: usize) -> Self {
        PerClient {
            per_minute,
            clients: Mutex::new(Clients {
                buckets: HashMap::new(),
                scanned_at: None,
            }),
            max_clients,
        }
    }

    /// Takes one of `client`'s places now, or says how long until there is one.
    pub fn take(&self, client: IpAddr) -> Result<(), Duration> {
        self.take_at(crate::networks::client_key(client), Instant::now())
    }

    /// Returns a place taken for `client` whose event did not happen after all (the
    /// replica's own bucket refused it): a client is not charged for the replica being busy.
    pub fn give_back(&self, client: IpAddr) {
        let key = crate::networks::client_key(client);
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(b) = clients.buckets.get_mut(&key) {
            b.give_back(self.per_minute);
        }
    }

    fn take_at(&self, key: IpAddr, now: Instant) -> Result<(), Duration> {
        let per_minute = self.per_minute;
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !clients.buckets.contains_key(&key) && clients.buckets.len() >= self.max_clients {
            if let Some(next) = clients.scanned_at.map(|t| t + SCAN_EVERY) {
                if now < next {
                    return Err(next - now);
                }
            }
            clients.scanned_at = Some(now);
            clients.buckets.retain(|_, b| {
                b.refill(per_minute, now);
                b.tokens < per_minute as f64
            });
            if clients.buckets.len() >= self.max_clients {
                // The soonest any bucket is full again and can go.
                let wait = clients
                    .buckets
                    .values()
                    .map(|b| (per_minute as f64 - b.tokens) * 60.0 / per_minute as f64)
                    .fold(f64::INFINITY, f64::min);
                return Err(Duration::from_secs_f64(wait.min(60.0)).max(SCAN_EVERY));
            }
        }
        clients
            .buckets
            .entry(key)
            .or_insert_with(|| Bucket::full(per_minute, now))
            .take(per_minute, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minutes_worth_at_once_then_at_the_rate() {
        let limit = RateLimit::per_minute(60);
        let t0 = Instant::now();
        for _ in 0..60 {
            assert_eq!(limit.take_at(t0), Ok(()));
        }
        let wait = limit.take_at(t0).unwrap_err();
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        assert_eq!(limit.take_at(t0 + Duration::from_millis(1001)), Ok(()));
        assert!(limit.take_at(t0 + Duration::from_millis(1500)).is_err());
        // Idle for an hour: a minute's worth again, no more.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..60 {
            assert_eq!(limit.take_at(later), Ok(()));
        }
        assert!(limit.take_at(later).is_err());
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_client_has_its_own_bucket() {
        let limit = PerClient::per_minute(2);
        let t0 = Instant::now();
        let (a, b) = (ip("203.0.113.1"), ip("203.0.113.2"));
        assert_eq!(limit.take_at(a, t0), Ok(()));
        assert_eq!(limit.take_at(a, t0), Ok(()));
        let wait = limit.take_at(a, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 30.0).abs() < 1e-6, "{wait:?}");
        assert_eq!(limit.take_at(b, t0), Ok(()), "another client is not held");
        assert_eq!(limit.take_at(a, t0 + Duration::from_secs(30)), Ok(()));
    }

    #[test]
    fn the_table_is_bounded_and_full_buckets_make_room() {
        let limit = PerClient::bounded(1, 2);
        let t0 = Instant::now();
        assert_eq!(limit.take_at(ip("192.0.2.1"), t0), Ok(()));
        assert_eq!(limit.take_at(ip("192.0.2.2"), t0), Ok(()));
        let wait = limit.take_at(ip("192.0.2.3"), t0).unwrap_err();
        assert!((wait.as_secs_f64() - 60.0).abs() < 1e-6, "{wait:?}");
        let soon = limit.take_at(ip("192.0.2.3"), t0 + Duration::from_millis(400));
        assert_eq!(
            soon,
            Err(Duration::from_millis(600)),
            "no second scan within a second"
        );
        assert!(limit
            .take_at(ip("192.0.2.3"), t0 + Duration::from_secs(30))
            .is_err());
        // A minute on, both buckets are full again: they make room.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(limit.take_at(ip("192.0.2.3"), later), Ok(()));
        assert_eq!(limit.clients.lock().unwrap().buckets.len(), 1);
    }
}
