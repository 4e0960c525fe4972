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

/// Lines of a statement a workspace may write in a second once the statement's budget is
/// spent (from a second pool as large): its events carry its `workspace_id`, and one
/// workspace's flood must not silence the others' (a red team: one workspace re-fetching its
/// file 5,600 times a second left 9 of another's 50 `upload served` lines, state
/// transitions SPEC §8 wants).
const FAIR_LINES: u32 = 5;

/// Workspaces counted per statement per second: past it, a new one has no fair lines.
const FAIR_KEYS: usize = 4096;

pub struct LineBudget {
    per_second: u64,
    /// Per log statement: the current second's count.
    spent: Mutex<HashMap<Identifier, Spent>>,
}

/// One statement's second.
struct Spent {
    since: Instant,
    /// Lines from the shared pool (`per_second`).
    count: u64,
    /// Lines from the fair pool (as large): [`FAIR_LINES`] at most per workspace.
    fair: u64,
    /// Fair-pool lines written this second, by workspace (a hash of its id).
    by_workspace: HashMap<u64, u32>,
}

impl LineBudget {
    /// `per_second` 0: no budget.
    pub fn new(per_second: u64) -> LineBudget {
        LineBudget {
            per_second,
            spent: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the event may be written: from the shared pool while it lasts, then, for a
    /// workspace that took fewer than [`FAIR_LINES`] of the fair one this second, from it.
    fn take(&self, meta: &Metadata<'_>, workspace: Option<u64>) -> bool {
        let mut spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // One entry per log statement in the binary: the map cannot grow past them.
        let s = spent.entry(meta.callsite()).or_insert_with(|| Spent {
            since: now,
            count: 0,
            fair: 0,
            by_workspace: HashMap::new(),
        });
        if now.duration_since(s.since) >= Duration::from_secs(1) {
            (s.since, s.count, s.fair) = (now, 0, 0);
            s.by_workspace.clear();
        }
        let within = if s.count < self.per_second {
            s.count += 1;
            true
        } else if s.fair < self.per_second && workspace.is_some_and(|w| s.fair_line(w)) {
            s.fair += 1;
            true
        } else {
            false
        };
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

impl Spent {
    /// Whether workspace `w` may write one more line from the fair pool: fewer than
    /// [`FAIR_LINES`] this second. Workspaces are counted only once the shared pool is spent,
    /// so strangers naming random ids (a refusal logs the path's) cannot use up the
    /// [`FAIR_KEYS`] before a flood begins.
    fn fair_line(&mut self, w: u64) -> bool {
        let room = self.by_workspace.len() < FAIR_KEYS;
        match self.by_workspace.get_mut(&w) {
            Some(n) if *n < FAIR_LINES => {
                *n += 1;
                true
            }
            Some(_) => false,
            None if room => {
                self.by_workspace.insert(w, 1);
                true
            }
            None => false,
        }
    }
}

/// The hash of an event's `workspace_id` field, as it would be written.
#[derive(Default)]
struct WorkspaceOf(Option<u64>);

impl tracing::field::Visit for WorkspaceOf {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "workspace_id" {
            use std::hash::Hasher;
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            let _ =
                std::fmt::Write::write_fmt(&mut HashWriter(&mut hasher), format_args!("{value:?}"));
            self.0 = Some(hasher.finish());
        }
    }
}

/// Feeds what is formatted into a hasher, without a string.
struct HashWriter<'a>(&'a mut std::collections::hash_map::DefaultHasher);

impl std::fmt::Write for HashWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        std::hash::Hasher::write(self.0, s.as_bytes());
        Ok(())
    }
}

impl<S> Filter<S> for LineBudget {
    fn enabled(&self, _: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        true
    }

    /// Counted here, where the event's fields are known.
    fn event_enabled(&self, event: &tracing::Event<'_>, _: &Context<'_, S>) -> bool {
        if self.per_second == 0 {
            return true;
        }
        let mut workspace = WorkspaceOf::default();
        event.record(&mut workspace);
        self.take(event.metadata(), workspace.0)
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
