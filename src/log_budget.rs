//! `LOG_LINES_PER_SECOND`: a bound on the lines one log statement writes per second (SPEC §10:
//! log lines are a resource clients consume). A refused request costs its client nothing and
//! wrote a line (an upload rejected, a 503 while the uploads' slots are full), so a flood of
//! them wrote as fast as they came. Past the budget a statement's lines are dropped until the
//! next second, counted in `log_lines_dropped_total` and summed up by one line a second
//! ([`report_drops_forever`]).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use tracing::{callsite::Identifier, subscriber::Interest, Metadata};
use tracing_subscriber::layer::{Context, Filter};

/// Lines dropped since the last report, per statement (its `file:line` name): the summary
/// says which kinds of line went missing, not only how many. One entry per statement in the
/// binary at most.
static DROPPED_BY: Mutex<Vec<(&'static str, u64)>> = Mutex::new(Vec::new());

/// The statements named in a summary, most dropped first.
const NAMED: usize = 5;

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
            crate::metrics::metrics().log_lines_dropped.inc();
            let mut by = DROPPED_BY.lock().unwrap_or_else(|p| p.into_inner());
            match by.iter_mut().find(|(name, _)| *name == meta.name()) {
                Some((_, n)) => *n += 1,
                None => by.push((meta.name(), 1)),
            }
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
        let by = std::mem::take(&mut *DROPPED_BY.lock().unwrap_or_else(|p| p.into_inner()));
        let dropped: u64 = by.iter().map(|(_, n)| n).sum();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                statements = most_dropped(by).as_str(),
                "log lines dropped: their statements passed LOG_LINES_PER_SECOND"
            );
        }
    }
}

/// `event src/http/uploads.rs:120 ×4000, …`: the [`NAMED`] statements that dropped most.
fn most_dropped(mut by: Vec<(&'static str, u64)>) -> String {
    by.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut named: Vec<String> = by
        .iter()
        .take(NAMED)
        .map(|(name, n)| format!("{name} ×{n}"))
        .collect();
    if by.len() > NAMED {
        named.push(format!("{} more", by.len() - NAMED));
    }
    named.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_the_statements_that_dropped_most() {
        let by = vec![("a.rs:1", 3), ("b.rs:2", 9), ("c.rs:3", 1)];
        assert_eq!(most_dropped(by), "b.rs:2 ×9, a.rs:1 ×3, c.rs:3 ×1");
        let many: Vec<_> = ["1", "2", "3", "4", "5", "6", "7"]
            .iter()
            .map(|n| (*n, 1))
            .collect();
        assert_eq!(most_dropped(many), "1 ×1, 2 ×1, 3 ×1, 4 ×1, 5 ×1, 2 more");
    }
}
