//! The checks every scenario runs once its load has stopped.

use std::{collections::HashSet, path::Path, time::Duration};

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    harness::{settled_spool_leaks, S3s, Service, ServiceConfig, PREFIX},
    load::{Accepted, Api, Outcome, Recorder, Sample},
};

/// Accepted uploads that do not download byte-identical now (each one is described).
pub async fn lost_uploads(api: &Api, accepted: &[Accepted], skip: &HashSet<Uuid>) -> Vec<String> {
    use futures::StreamExt;
    let api = &api.verifier();
    futures::stream::iter(accepted.iter().filter(|a| !skip.contains(&a.file_id)))
        .map(|a| async move {
            let outcome = api.download_as("verify", a).await;
            (!outcome.is_ok()).then(|| {
                format!(
                    "{} ({}, {} bytes, ws {}): {}",
                    a.file_id,
                    a.name,
                    a.size,
                    a.ws,
                    outcome.key()
                )
            })
        })
        .buffer_unordered(8)
        .filter_map(|lost| async move { lost })
        .collect()
        .await
}

/// Upload rows without their activity row, and upload activity rows without their row
/// (except for files in `swept`, acked and removed by a sweeper on purpose), and what
/// MAX_STORED_BYTES counts when its deltas disagree with the tables.
pub async fn half_states(pool: &PgPool, swept: &HashSet<Uuid>) -> Vec<String> {
    let mut out = stored_disagrees(pool).await;
    out.extend(rows_without_each_other(pool, swept).await);
    out
}

/// The sums the stored-deltas triggers keep against the tables' own, in one snapshot.
async fn stored_disagrees(pool: &PgPool) -> Vec<String> {
    let (kept, held): (Vec<i64>, Vec<i64>) = sqlx::query_as(
        "SELECT ARRAY[COALESCE(sum(d.bytes), 0), COALESCE(sum(d.files), 0),
                      COALESCE(sum(d.activity_rows), 0)]::bigint[],
                ARRAY[(SELECT COALESCE(sum(size_bytes), 0) FROM pending_uploads),
                      (SELECT count(*) FROM pending_uploads),
                      (SELECT count(*) FROM activity_logs WHERE method = 'chat_upload_receive')]::bigint[]
         FROM pending_upload_stored_deltas d",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    match kept == held {
        true => Vec::new(),
        false => vec![format!(
            "the stored deltas sum to {kept:?} (bytes, rows, activity rows), the tables hold {held:?}"
        )],
    }
}

async fn rows_without_each_other(pool: &PgPool, swept: &HashSet<Uuid>) -> Vec<String> {
    let rows_alone: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT p.file_id, p.filename FROM pending_uploads p
         WHERE NOT EXISTS (SELECT 1 FROM activity_logs a
                           WHERE a.request_body->>'file_id' = p.file_id::text)",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let activity_alone: Vec<(Uuid, Option<String>)> = sqlx::query_as(
        "SELECT a.id, a.request_body->>'file_id' FROM activity_logs a
         WHERE a.method = 'chat_upload_receive'
           AND NOT EXISTS (SELECT 1 FROM pending_uploads p
                           WHERE p.file_id::text = a.request_body->>'file_id')",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut out: Vec<String> = rows_alone
        .into_iter()
        .map(|(id, name)| format!("row {id} ({name}) has no activity row"))
        .collect();
    out.extend(
        activity_alone
            .into_iter()
            .filter(|(_, file)| {
                !file
                    .as_deref()
                    .and_then(|f| f.parse::<Uuid>().ok())
                    .is_some_and(|f| swept.contains(&f))
            })
            .map(|(id, file)| format!("activity row {id} (file {file:?}) has no upload row")),
    );
    out
}

/// Objects under the prefix that no row points at (run after a sweep with ORPHAN_GRACE=0),
/// and rows whose object is missing.
pub async fn orphans(pool: &PgPool, s3: &S3s) -> (Vec<String>, Vec<String>) {
    let keys: HashSet<String> = s3.keys().await.into_iter().collect();
    let row_keys: HashSet<String> =
        sqlx::query_scalar("SELECT s3_key FROM pending_uploads WHERE s3_key IS NOT NULL")
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let mut objects_alone: Vec<String> = keys.difference(&row_keys).cloned().collect();
    let mut rows_alone: Vec<String> = row_keys
        .difference(&keys)
        .filter(|k| k.starts_with(PREFIX))
        .cloned()
        .collect();
    objects_alone.sort();
    rows_alone.sort();
    (objects_alone, rows_alone)
}

/// Sessions of the service left inside a transaction (a cut request that leaked one).
pub async fn idle_in_transaction(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A failure list for a scenario: the samples that break `rule`, described.
pub fn violations<F>(samples: &[Sample], mut rule: F) -> Vec<String>
where
    F: FnMut(&Sample) -> Result<(), String>,
{
    samples
        .iter()
        .filter_map(|s| {
            rule(s).err().map(|why| {
                format!(
                    "{} at {:.2}s ({} ms): {} — {}",
                    s.op,
                    s.start.as_secs_f64(),
                    s.elapsed.as_millis(),
                    why,
                    s.detail
                )
            })
        })
        .collect()
}

/// The failed samples: outside every fault window of `rec` (`<outcome> outside <windows>`),
/// or inside one and breaking `rule` (which sees only those).
pub fn fault_violations<F>(
    rec: &Recorder,
    samples: &[Sample],
    windows: &str,
    mut rule: F,
) -> Vec<String>
where
    F: FnMut(&Sample) -> Result<(), String>,
{
    violations(samples, |s| {
        if s.outcome.is_ok() {
            return Ok(());
        }
        if !rec.during_fault(s) {
            return Err(format!("{} outside {windows}", s.outcome.key()));
        }
        rule(s)
    })
}

/// The samples that took longer than `limit`, each described as `why`.
pub fn slower_than(samples: &[Sample], limit: Duration, why: &str) -> Vec<String> {
    violations(samples, |s| {
        if s.elapsed > limit {
            Err(why.to_string())
        } else {
            Ok(())
        }
    })
}

/// `/readyz` probes (`samples` of the `probes` recorder) that took more than 2 s or answered
/// wrong: 503 is right inside the probes' fault windows, 200 unless `dependency` was surely
/// down (the probe entirely inside one of the `down` windows, from 100 ms after its start),
/// anything else is wrong.
pub fn readyz_violations(
    probes: &Recorder,
    samples: &[Sample],
    down: &[(Duration, Duration)],
    dependency: &str,
) -> Vec<String> {
    violations(samples, |s| {
        if s.elapsed > Duration::from_secs(2) {
            return Err("/readyz took more than 2 s".into());
        }
        // Entirely inside a window where it was down (after a moment to notice): must be 503.
        let surely_down = down
            .iter()
            .any(|(a, b)| s.start >= *a + Duration::from_millis(100) && s.end() <= *b);
        match s.outcome.status() {
            Some(503) if surely_down || probes.during_fault(s) => Ok(()),
            Some(200) if !surely_down => Ok(()),
            _ => Err(format!(
                "/readyz answered {} ({dependency} down: {surely_down})",
                s.outcome.key()
            )),
        }
    })
}

/// What became of a scenario's accepted uploads: the problem lists of the checks every
/// scenario runs (empty where a scenario does not look, e.g. orphans without S3).
#[derive(Default)]
pub struct Findings {
    /// Accepted uploads that do not download intact.
    pub lost: Vec<String>,
    /// Rows whose object is missing (after `sweep`).
    pub missing: Vec<String>,
    /// Half states (see `half_states`).
    pub half: Vec<String>,
    /// Objects without a row (after `sweep`).
    pub orphaned: Vec<String>,
}

impl Findings {
    /// Every accepted upload downloaded and compared, then the half states (no file skipped:
    /// a scenario whose files are swept on purpose fills the lists itself).
    pub async fn of_uploads(api: &Api, pool: &PgPool, accepted: &[Accepted]) -> Findings {
        Findings {
            lost: lost_uploads(api, accepted, &HashSet::new()).await,
            half: half_states(pool, &HashSet::new()).await,
            ..Findings::default()
        }
    }

    /// One `sweep` with ORPHAN_GRACE=0, then the objects and rows without each other; returns
    /// the sweep's report.
    pub async fn sweep(&mut self, config: &ServiceConfig, pool: &PgPool, s3: &S3s) -> Value {
        let report = config.sweep();
        (self.orphaned, self.missing) = orphans(pool, s3).await;
        report
    }

    /// The summary line's `lost`: uploads lost, rows whose object is missing.
    pub fn lost_count(&self) -> usize {
        self.lost.len() + self.missing.len()
    }

    /// The summary line's `orphaned`: half states, objects without a row.
    pub fn orphaned_count(&self) -> usize {
        self.half.len() + self.orphaned.len()
    }

    /// The four checks, in this order.
    pub fn check(&self, checks: &mut Checks) {
        checks.none("accepted uploads that do not download intact", &self.lost);
        checks.none("rows whose object is missing", &self.missing);
        checks.none("half states", &self.half);
        checks.none("objects without a row after sweep", &self.orphaned);
    }
}

/// What a service left behind: sessions idle in transaction, entries and open descriptors in
/// its spool folder.
pub struct Leaks {
    pub idle_tx: i64,
    pub spool_files: usize,
    pub spool_fds: usize,
}

impl Leaks {
    /// Sessions idle in transaction now, then the spool once it settled (5 s at most).
    pub async fn settled(pool: &PgPool, spool: &Path, service: &Service) -> Leaks {
        let idle_tx = idle_in_transaction(pool).await;
        let (spool_files, spool_fds) =
            settled_spool_leaks(spool, service.pid(), Duration::from_secs(5)).await;
        Leaks {
            idle_tx,
            spool_files,
            spool_fds,
        }
    }

    /// The summary line's `leaked`.
    pub fn count(&self) -> usize {
        self.spool_files + self.spool_fds + self.idle_tx as usize
    }

    /// The two checks: no session idle in transaction, nothing in the spool.
    pub fn check(&self, checks: &mut Checks) {
        let Leaks {
            idle_tx,
            spool_files,
            spool_fds,
        } = self;
        checks.that(
            *idle_tx == 0,
            format!("{idle_tx} sessions left idle in transaction"),
        );
        checks.that(
            (*spool_files, *spool_fds) == (0, 0),
            format!("spool files left: {spool_files} entries, {spool_fds} open descriptors"),
        );
    }
}

/// What a connection reset in place of an answer is, while a dependency is down.
///
/// Defect D1 (found by this suite, fixed; see tests/chaos/README.md): an upload refused
/// before its body is read (database unavailable at the token, workspace or quota lookup)
/// was answered 503 without `Connection: close`, and the server then closed the connection
/// with the rest of the body unread: a client still sending got EPIPE/ECONNRESET instead of
/// the 503. The check stays so that it cannot come back.
pub const RESET_NOT_503: &str =
    "connection reset instead of a 503 with Retry-After (defect D1: early upload refusal closes the connection unannounced)";

/// A 503 as SPEC §10 wants it during a fault: Retry-After and one of the expected codes.
pub fn clean_503(o: &Outcome, codes: &[&str]) -> Result<(), String> {
    match o {
        Outcome::Http {
            status: 503,
            retry_after,
            code,
        } => {
            if !retry_after {
                return Err("503 without Retry-After".into());
            }
            match code.as_deref() {
                Some(c) if codes.contains(&c) => Ok(()),
                other => Err(format!(
                    "503 with code {other:?}, expected one of {codes:?}"
                )),
            }
        }
        other => Err(format!("unexpected {}", other.key())),
    }
}

/// A scenario's failed checks, collected so that one failure does not hide the others; the
/// test fails at `finish` with all of them.
#[derive(Default)]
pub struct Checks {
    failed: Vec<String>,
}

impl Checks {
    /// Fails the check `what` with up to 15 of `problems` (and their count) unless empty.
    pub fn none(&mut self, what: &str, problems: &[String]) {
        if problems.is_empty() {
            return;
        }
        let shown: Vec<&str> = problems.iter().take(15).map(|s| s.as_str()).collect();
        self.failed.push(format!(
            "{what}: {} problem(s):\n    {}",
            problems.len(),
            shown.join("\n    ")
        ));
    }

    pub fn that(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.failed.push(what.into());
        }
    }

    pub fn finish(self, scenario: &str) {
        assert!(
            self.failed.is_empty(),
            "CHAOS {scenario}: {} check(s) failed:\n  {}",
            self.failed.len(),
            self.failed.join("\n  ")
        );
    }
}
