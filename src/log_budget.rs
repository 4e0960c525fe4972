//! `LOG_LINES_PER_SECOND`: a bound on the lines one log statement writes per second (SPEC §10:
//! log lines are a resource clients consume). A refused request costs its client nothing and
//! wrote a line (an upload rejected, a 503 while the uploads' slots are full), so a flood of
//! them wrote as fast as they came. Past the budget a statement's lines are dropped until the
//! next second, counted in `log_lines_dropped_total` and summed up by one line a second
//! ([`report_drops_forever`]).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use tracing::{callsite::Identifier, subscriber::Interest, Metadata};
use tracing_subscriber::layer::{Context, Filter};

/// Lines dropped since the last report.
static DROPPED: AtomicU64 = AtomicU64::new(0);

pub struct LineBudget {
    per_second: u64,
    /// Per log statement: the second its count is for, and the count.
    spent: Mutex<HashMap<Identifier, (Instant, u64)>>,
}

impl LineBudget {
    /// `per_second` 0: no budget.
    pub fn new(per_second: u64) -> LineBudget {
        LineBudget {
            per_second,
            spent: Mutex::new(HashMap::new()),
        }
    }

    fn take(&self, meta: &Metadata<'_>) -> bool {
        if self.per_second == 0 || !meta.is_event() {
            return true;
        }
        let mut spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // One entry per log statement in the binary: the map cannot grow past them.
        let (since, count) = spent.entry(meta.callsite()).or_insert((now, 0));
        if now.duration_since(*since) >= Duration::from_secs(1) {
            (*since, *count) = (now, 0);
        }
        *count += 1;
        let within = *count <= self.per_second;
        drop(spent);
        if !within {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            crate::metrics::metrics().log_lines_dropped.inc();
        }
        within
    }
}

impl<S> Filter<S> for LineBudget {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        self.take(meta)
    }

    /// Asked for every event, not once per statement: the answer changes with the second.
    fn callsite_enabled(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::sometimes()
    }
}

/// Every second with drops, one line saying how many.
pub async fn report_drops_forever() {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticker.tick().await;
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "log lines dropped: their statements passed LOG_LINES_PER_SECOND"
            );
        }
    }
}
