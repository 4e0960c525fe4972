//! Scenario 2: PostgreSQL restarted (`pg_ctl restart -m fast`) under load, then stopped for a
//! while (multi-MB uploads arrive meanwhile) and started again. While it is away: only
//! successes or clean 503s with Retry-After; afterwards the service recovers by itself within
//! RECOVERY, and nothing is lost, half-written or orphaned.

use std::{sync::Arc, time::Duration};

use rand::{rngs::StdRng, SeedableRng};

use crate::{
    harness::{bounded, Pg, S3s, Scratch, Service, ServiceConfig, DEP_TIMEOUT},
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
    // Long enough for every worker to start an upload after the recovery window (checked
    // below), however slow its iterations on a loaded machine.
    tokio::time::sleep(RECOVERY + Duration::from_secs(2)).await;
    let feeds = fleet.stop().await;
    stop_probe.store(true, std::sync::atomic::Ordering::Relaxed);
    prober.await.unwrap();

    // ---- checks
    let samples = rec.samples();
    let codes: &[&str] = match mode {
        "bytea" => &["platform_unavailable"],
        _ => &["platform_unavailable", "storage_unavailable"],
    };
    let windows = format!("the fault window (restart + {RECOVERY:?})");
    let bad = verify::fault_violations(&rec, &samples, &windows, |s| match &s.outcome {
        // A download already streaming when the database went away is cut, never padded.
        Outcome::Cut if s.op == "download" => Ok(()),
        Outcome::Transport => Err(verify::RESET_NOT_503.into()),
        o => verify::clean_503(o, codes),
    });
    // Requests must not wait on the dead database longer than DEPENDENCY_TIMEOUT (+ margin).
    let slow = verify::slower_than(
        &samples,
        DEP_TIMEOUT + Duration::from_millis(1500),
        "slower than DEPENDENCY_TIMEOUT + 1.5 s",
    );
    // Entirely inside the stop (after a moment to notice): must be 503.
    let bad_probes = verify::readyz_violations(
        &probes,
        &probes.samples(),
        &[(down_from, down_until)],
        "database",
    );
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
    let mut found = verify::Findings::of_uploads(&api, &pool, &accepted).await;
    let mut sweep = None;
    if let Some(s3) = &s3 {
        sweep = Some(found.sweep(&config, &pool, s3).await);
    }
    let leaks = verify::Leaks::settled(&pool, &spool, &service).await;
    let bugs = service.bug_lines();

    Summary::print(
        &rec,
        &name,
        found.lost_count(),
        found.orphaned_count(),
        leaks.count(),
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
    found.check(&mut checks);
    checks.none("service log: bugs", &bugs);
    leaks.check(&mut checks);
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
