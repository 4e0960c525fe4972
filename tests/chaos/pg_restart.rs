//! Scenario 2: PostgreSQL restarted (`pg_ctl restart -m fast`) under load, then stopped for a
//! while (multi-MB uploads arrive meanwhile) and started again. While it is away: only
//! successes or clean 503s with Retry-After; afterwards the service recovers by itself within
//! RECOVERY, and nothing is lost, half-written or orphaned.

use std::{collections::HashSet, sync::Arc, time::Duration};

use rand::{rngs::StdRng, SeedableRng};
use uuid::Uuid;

use crate::{
    harness::{
        bounded, settled_spool_leaks, Pg, S3s, Scratch, Service, ServiceConfig, DEP_TIMEOUT,
    },
    load::{probe_readyz, Api, Fleet, Outcome, Recorder, Retry, Summary, Worker},
    verify,
};

/// How long after the restart the service may still answer 503 (no manual step).
const RECOVERY: Duration = Duration::from_secs(4);
const WORKERS: usize = 6;
/// 8 MiB uploads sent while the database is stopped.
const BIG_WHILE_DOWN: usize = 3;

async fn run(mode: &'static str) {
    let name = format!("pg_restart_{mode}");
    let scratch = Scratch::new(&name);
    let pg = Pg::start(&scratch);
    let s3 = match mode {
        "bytea" => None,
        _ => Some(S3s::start(&scratch).await),
    };
    let spool = scratch.sub("spool");
    let mut config = ServiceConfig::new(&pg.url(), spool.clone());
    if let Some(s3) = &s3 {
        config = config.s3(mode, s3);
    }
    let service = Service::start(config.clone(), scratch.path().join("service.log")).await;
    let rec = Recorder::new();
    let api = Api::new(&service.base(), &rec);
    let probes = rec.sibling();
    let stop_probe = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = probe_readyz(Api::new(&service.base(), &probes), stop_probe.clone());

    let fleet = Fleet::start(&api, WORKERS, |i, ws, token| Worker {
        api: api.clone(),
        ws,
        token,
        seed: 200 + i as u64,
        sizes: 1..400_000,
        files: 1..=2,
        retry: Retry::Never,
        ack_every: 4,
        page: 50,
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    rec.fault_begin();
    probes.fault_begin();
    let restart_started = rec.now();
    let pg = tokio::task::spawn_blocking(move || {
        pg.restart_fast();
        pg
    })
    .await
    .unwrap();
    let restart_took = rec.now() - restart_started;
    let back_at = rec.now();
    rec.fault_end(RECOVERY);
    probes.fault_end(RECOVERY);
    tokio::time::sleep(RECOVERY).await;

    // Then down for a while (stop, start): the load goes on, and multi-MB uploads arrive
    // while it is down. Each must be told 503 + Retry-After, not have its connection reset.
    let (ws, token) = api.register().await;
    let stop_begins = rec.now();
    rec.fault_begin();
    probes.fault_begin();
    let pg = tokio::task::spawn_blocking(move || {
        pg.stop_fast();
        pg
    })
    .await
    .unwrap();
    let down_from = rec.now();
    let mut rng = StdRng::seed_from_u64(290);
    for i in 0..BIG_WHILE_DOWN {
        let data = crate::load::payload(&mut rng, 8 << 20);
        api.upload_as("upload_big", ws, &token, &[(format!("down-{i}.bin"), data)])
            .await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let down_until = rec.now();
    let pg = tokio::task::spawn_blocking(move || {
        pg.start_again();
        pg
    })
    .await
    .unwrap();
    let back_again_at = rec.now();
    rec.fault_end(RECOVERY);
    probes.fault_end(RECOVERY);
    tokio::time::sleep(RECOVERY + Duration::from_millis(500)).await;
    let feeds = fleet.stop().await;
    stop_probe.store(true, std::sync::atomic::Ordering::Relaxed);
    prober.await.unwrap();

    // ---- checks
    let samples = rec.samples();
    let codes: &[&str] = match mode {
        "bytea" => &["platform_unavailable"],
        _ => &["platform_unavailable", "storage_unavailable"],
    };
    let bad = verify::violations(&samples, |s| {
        if s.outcome.is_ok() {
            return Ok(());
        }
        if !rec.during_fault(s) {
            return Err(format!(
                "{} outside the fault window (restart + {RECOVERY:?})",
                s.outcome.key()
            ));
        }
        match &s.outcome {
            // A download already streaming when the database went away is cut, never padded.
            Outcome::Cut if s.op == "download" => Ok(()),
            Outcome::Transport => Err(verify::RESET_NOT_503.into()),
            o => verify::clean_503(o, codes),
        }
    });
    // Requests must not wait on the dead database longer than DEPENDENCY_TIMEOUT (+ margin).
    let slow = verify::violations(&samples, |s| {
        if s.elapsed > DEP_TIMEOUT + Duration::from_millis(1500) {
            Err("slower than DEPENDENCY_TIMEOUT + 1.5 s".into())
        } else {
            Ok(())
        }
    });
    let probe_samples = probes.samples();
    let bad_probes = verify::violations(&probe_samples, |s| {
        if s.elapsed > Duration::from_secs(2) {
            return Err("/readyz took more than 2 s".into());
        }
        // Entirely inside the stop (after a moment to notice): must be 503.
        let surely_down =
            s.start >= down_from + Duration::from_millis(100) && s.end() <= down_until;
        match s.outcome.status() {
            Some(200) if !surely_down => Ok(()),
            Some(503) if probes.during_fault(s) => Ok(()),
            _ => Err(format!(
                "/readyz answered {} (database down: {surely_down})",
                s.outcome.key()
            )),
        }
    });
    // Recovery: the last failed request (before the next fault) ended this long after the
    // database was back.
    let recovered_after = |from: Duration, until: Duration| {
        samples
            .iter()
            .filter(|s| !s.outcome.is_ok() && s.end() < until)
            .map(|s| s.end().saturating_sub(from))
            .max()
            .unwrap_or_default()
    };
    let recovered_restart = recovered_after(back_at, stop_begins);
    let recovered_stop = recovered_after(back_again_at, Duration::MAX);
    let big_while_down: Vec<String> = samples
        .iter()
        .filter(|s| s.op == "upload_big")
        .map(|s| s.outcome.key())
        .collect();

    let pool = pg.pool().await;
    let accepted = rec.accepted();
    let lost = verify::lost_uploads(&api, &accepted, &HashSet::new()).await;
    let half = verify::half_states(&pool, &HashSet::<Uuid>::new()).await;
    let (mut orphaned, mut missing, mut sweep) = (Vec::new(), Vec::new(), None);
    if let Some(s3) = &s3 {
        sweep = Some(config.sweep());
        (orphaned, missing) = verify::orphans(&pool, s3).await;
    }
    let idle_tx = verify::idle_in_transaction(&pool).await;
    let (spool_files, spool_fds) =
        settled_spool_leaks(&spool, service.pid(), Duration::from_secs(5)).await;
    let bugs = service.bug_lines();

    let summary = Summary::of(&rec);
    println!(
        "{}",
        summary.line(
            &name,
            lost.len() + missing.len(),
            half.len() + orphaned.len(),
            spool_files + spool_fds + idle_tx as usize
        )
    );
    let probe_summary = Summary::of(&probes);
    println!(
        "CHAOS-DETAIL {name}: restart_at={:.2}s restart_took_ms={} down={:.2}-{:.2}s recovered_after_restart_ms={} recovered_after_stop_start_ms={} uploads_8mib_while_down={big_while_down:?} readyz={:?} uploads_accepted={} acked={} sweep={} bug_log_lines={}",
        restart_started.as_secs_f64(),
        restart_took.as_millis(),
        down_from.as_secs_f64(),
        down_until.as_secs_f64(),
        recovered_restart.as_millis(),
        recovered_stop.as_millis(),
        probe_summary.statuses,
        accepted.len(),
        feeds.iter().map(|f| f.acked.len()).sum::<usize>(),
        sweep.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
        bugs.len()
    );

    let mut checks = verify::Checks::default();
    checks.none("statuses during/after the restart", &bad);
    checks.none("requests slower than the dependency timeout", &slow);
    checks.none("/readyz", &bad_probes);
    checks.none("accepted uploads that do not download intact", &lost);
    checks.none("rows whose object is missing", &missing);
    checks.none("half states", &half);
    checks.none("objects without a row after sweep", &orphaned);
    checks.none("service log: bugs", &bugs);
    checks.that(
        idle_tx == 0,
        format!("{idle_tx} sessions left idle in transaction"),
    );
    checks.that(
        (spool_files, spool_fds) == (0, 0),
        format!("spool files left: {spool_files} entries, {spool_fds} open descriptors"),
    );
    checks.that(
        samples
            .iter()
            .any(|s| rec.during_fault(s) && !s.outcome.is_ok()),
        "the restart was not noticed by any request: the fault did not bite",
    );
    checks.that(
        samples
            .iter()
            .any(|s| s.op == "upload" && s.outcome.is_ok() && s.start > back_again_at + RECOVERY),
        "no upload succeeded after the recovery window",
    );
    checks.finish(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_2a_postgres_restart_bytea() {
    bounded("pg_restart_bytea", Duration::from_secs(120), run("bytea")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_2b_postgres_restart_s3() {
    bounded("pg_restart_s3", Duration::from_secs(120), run("s3")).await;
}
