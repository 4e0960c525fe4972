//! A token bucket: at most `per_minute` events a minute on average, as many at once.
//! Registration (SPEC §4) needs no credential, so every one a stranger makes adds rows that
//! nothing removes; the bucket bounds how fast that can happen on a replica.

use std::{
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
            state: Mutex::new(Bucket {
                tokens: per_minute as f64,
                at: Instant::now(),
            }),
        }
    }

    /// Takes one event's place now, or says how long until there is one.
    pub fn take(&self) -> Result<(), Duration> {
        self.take_at(Instant::now())
    }

    fn take_at(&self, now: Instant) -> Result<(), Duration> {
        let per_sec = self.per_minute as f64 / 60.0;
        let mut b = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let refilled = now.saturating_duration_since(b.at).as_secs_f64() * per_sec;
        b.tokens = (b.tokens + refilled).min(self.per_minute as f64);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - b.tokens) / per_sec))
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
}
