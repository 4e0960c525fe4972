//! One retry policy for the whole binary: exponential backoff with jitter, so many clients
//! retrying at once (agents after an outage, backfill workers) do not retry in lockstep.

use std::{future::Future, time::Duration};

use rand::Rng;

/// The pause before retry number `attempt` (1-based): 200 ms doubling to at most 30 s, plus
/// up to half again at random.
pub fn backoff(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.clamp(1, 8)).min(30_000) / 2;
    Duration::from_millis(base + rand::thread_rng().gen_range(0..=base / 2))
}

/// The pause before retry number `attempt` when the server asked for at least `at_least`
/// (its `Retry-After`): the backoff, or that wait plus up to a quarter again at random (many
/// clients refused at once must not all come back in the same second), whichever is longer.
pub fn pause(attempt: u32, at_least: Duration) -> Duration {
    let spread = at_least.as_millis() as u64 / 4;
    let asked = at_least + Duration::from_millis(rand::thread_rng().gen_range(0..=spread));
    backoff(attempt).max(asked)
}

/// How a retry is logged.
#[derive(Clone, Copy, PartialEq)]
pub enum Say {
    /// A WARN line per attempt.
    Loud,
    /// At DEBUG: the caller says what finally failed.
    Quiet,
}

/// Runs `op` until it succeeds, fails with an error `transient` rejects (`None`), or has been
/// retried `retries` times; `transient` gives the least wait the error asks for (the server's
/// `Retry-After`, or zero). `what` names it in the log.
pub async fn retry<T, E, F, Fut>(
    what: &str,
    retries: u32,
    say: Say,
    transient: impl Fn(&E) -> Option<Duration>,
    mut op: F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        let e = match op().await {
            Err(e) if attempt < retries => e,
            other => return other,
        };
        let Some(at_least) = transient(&e) else {
            return Err(e);
        };
        attempt += 1;
        let wait = pause(attempt, at_least);
        let wait_ms = wait.as_millis() as u64;
        match say {
            Say::Loud => tracing::warn!(what, attempt, error = %e, wait_ms, "retrying"),
            Say::Quiet => tracing::debug!(what, attempt, error = %e, wait_ms, "retrying"),
        }
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 1..20 {
            let d = backoff(attempt).as_millis() as u64;
            let base = (200u64 << attempt.clamp(1, 8)).min(30_000) / 2;
            assert!((base..=base + base / 2).contains(&d), "{attempt}: {d}");
        }
    }

    #[tokio::test]
    async fn retries_transient_errors_only() {
        let calls = AtomicU32::new(0);
        let r: Result<(), String> = retry(
            "t",
            2,
            Say::Quiet,
            |e: &String| (e == "again").then_some(Duration::ZERO),
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err("again".to_string())
            },
        )
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        calls.store(0, Ordering::SeqCst);
        let r: Result<(), String> = retry(
            "t",
            2,
            Say::Quiet,
            |e: &String| (e == "again").then_some(Duration::ZERO),
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err("fatal".to_string())
            },
        )
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_wait_the_server_asks_for_is_kept_and_spread() {
        for _ in 0..100 {
            let d = pause(1, Duration::from_secs(2)).as_millis();
            assert!((2000..=2500).contains(&d), "{d}");
        }
        // a shorter ask than the backoff leaves the backoff
        let d = pause(8, Duration::from_secs(1)).as_millis();
        assert!((15_000..=22_500).contains(&d), "{d}");
    }
}
