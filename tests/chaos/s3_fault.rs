//! Scenario 3: S3 frozen (SIGSTOP longer than DEPENDENCY_TIMEOUT, then SIGCONT), then killed
//! and restarted, under load, in `s3` and `dual` mode. Uploads get 503 within the timeout,
//! dual-mode downloads of rows with a bytea copy keep working, /readyz says 503 within 2 s,
//! and nothing is orphaned afterwards.

use std::{
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::{
    harness::{bounded, Pg, S3s, Scratch, Service, ServiceConfig, DEP_TIMEOUT},
    load::{
        payload, probe_readyz, Accepted, Api, Fleet, Outcome, Recorder, Retry, Summary, Worker,
    },
    verify,
};

/// What a request may take beyond DEPENDENCY_TIMEOUT (the PUT watchdog checks every quarter
/// of it; two shared cores add scheduling noise).
const MARGIN: Duration = Duration::from_millis(1500);
/// Longer than the SDK's three attempts of DEPENDENCY_TIMEOUT each (see D2 in README.md), so
/// the run shows where a stalled read actually ends.
const FREEZE: Duration = Duration::from_secs(8);
const KILLED: Duration = Duration::from_secs(3);
/// How long after S3 is back the service may still answer 503.
const RECOVERY: Duration = Duration::from_secs(3);
const WORKERS: usize = 4;
const READERS: usize = 2;

/// Downloads files uploaded before the faults, over and over (dual: each has a bytea copy).
async fn reader(api: Api, files: Vec<Accepted>, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let a = &files[rng.gen_range(0..files.len())];
        api.download_as("read", a).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run(mode: &'static str) {
    let name = format!("s3_fault_{mode}");
    let scratch = Scratch::new(&name);
    let pg = Pg::start(&scratch);
    let mut s3 = S3s::start(&scratch).await;
    let spool = scratch.sub("spool");
    let config = ServiceConfig::new(&pg.url(), spool.clone()).s3(mode, &s3);
    let service = Service::start(config.clone(), scratch.path().join("service.log")).await;
    let rec = Recorder::new();
    let api = Api::new(&service.base(), &rec);

    // Files to read throughout (uploaded before any fault).
    let (ws, token) = api.register().await;
    let mut rng = StdRng::seed_from_u64(300);
    let mut stored = Vec::new();
    for i in 0..8 {
        let len = rng.gen_range(1000..300_000);
        let (o, acc) = api
            .upload(
                ws,
                &token,
                &[(format!("stored-{i}.bin"), payload(&mut rng, len))],
            )
            .await;
        assert!(o.is_ok(), "set-up upload: {o:?}");
        stored.extend(acc);
    }

    let probes = rec.sibling();
    let stop = Arc::new(AtomicBool::new(false));
    let prober = probe_readyz(Api::new(&service.base(), &probes), stop.clone());
    let readers: Vec<_> = (0..READERS)
        .map(|i| tokio::spawn(reader(api.clone(), stored.clone(), stop.clone(), i as u64)))
        .collect();
    let fleet = Fleet::start(&api, WORKERS, |i, ws, token| Worker {
        api: api.clone(),
        ws,
        token,
        seed: 310 + i as u64,
        sizes: 1..300_000,
        files: 1..=2,
        retry: Retry::Never,
        ack_every: 0,
        page: 50,
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Frozen. The fault windows (judging statuses) are wide: from just before the fault to
    // RECOVERY after it is lifted. The `down` windows (judging /readyz) are narrow: from just
    // after the fault is applied to just before it is lifted.
    rec.fault_begin();
    probes.fault_begin();
    s3.freeze();
    let frozen_at = rec.now();
    tokio::time::sleep(FREEZE).await;
    let thawing_at = rec.now();
    s3.thaw();
    rec.fault_end(RECOVERY);
    probes.fault_end(RECOVERY);
    tokio::time::sleep(RECOVERY).await;

    // Killed, then started again.
    rec.fault_begin();
    probes.fault_begin();
    s3.kill();
    let killed_at = rec.now();
    tokio::time::sleep(KILLED).await;
    let restarting_at = rec.now();
    s3.restart().await;
    rec.fault_end(RECOVERY);
    probes.fault_end(RECOVERY);
    tokio::time::sleep(RECOVERY + Duration::from_millis(500)).await;

    let _feeds = fleet.stop().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    prober.await.unwrap();

    // ---- checks
    let samples = rec.samples();
    let bad = verify::fault_violations(&rec, &samples, "the fault windows", |s| {
        let is_read = s.op == "download" || s.op == "read";
        // A download already streaming when its source fails is cut, never padded (SPEC
        // §10), also in dual mode.
        let was_streaming = rec.in_flight_at_fault_start(s, Duration::from_millis(20));
        if s.outcome == Outcome::Cut && is_read && was_streaming {
            return Ok(());
        }
        if mode == "dual" && is_read {
            return Err(format!(
                "dual-mode download failed ({}) although the row has a bytea copy",
                s.outcome.key()
            ));
        }
        match &s.outcome {
            Outcome::Cut if is_read => Ok(()),
            Outcome::Transport => Err(verify::RESET_NOT_503.into()),
            o => verify::clean_503(o, &["storage_unavailable"]),
        }
    });
    let slow = verify::slower_than(
        &samples,
        DEP_TIMEOUT + MARGIN,
        &format!("slower than DEPENDENCY_TIMEOUT + {MARGIN:?}"),
    );
    let probe_samples = probes.samples();
    let down = [(frozen_at, thawing_at), (killed_at, restarting_at)];
    let bad_probes = verify::readyz_violations(&probes, &probe_samples, &down, "S3");
    let readyz_503 = probe_samples
        .iter()
        .filter(|s| s.outcome.status() == Some(503))
        .count();
    let uploads_refused = samples
        .iter()
        .filter(|s| s.op == "upload" && s.outcome.status() == Some(503))
        .count();
    let reads_in_fault = samples
        .iter()
        .filter(|s| (s.op == "read" || s.op == "download") && rec.during_fault(s))
        .count();

    let pool = pg.pool().await;
    let accepted = rec.accepted();
    let mut found = verify::Findings::of_uploads(&api, &pool, &accepted).await;
    let sweep = found.sweep(&config, &pool, &s3).await;
    let leaks = verify::Leaks::settled(&pool, &spool, &service).await;
    let bugs = service.bug_lines();
    let log = service.log_lines();
    let events = |m: &str| log.iter().filter(|l| l["message"] == m).count();
    let (fallbacks, discarded, discard_failed) = (
        events("S3 read failed; serving the bytea copy"),
        events("object of a failed upload removed"),
        events("could not remove object of a failed upload"),
    );

    Summary::print(
        &rec,
        &name,
        found.lost_count(),
        found.orphaned_count(),
        leaks.count(),
    );
    println!(
        "CHAOS-DETAIL {name}: frozen={:.2}-{:.2}s killed={:.2}-{:.2}s max_ms_by_op={:?} uploads_503={uploads_refused} reads_during_fault={reads_in_fault} readyz={:?} readyz_max_ms={} uploads_accepted={} log_fallbacks={fallbacks} log_discarded={discarded} log_discard_failed={discard_failed} sweep={sweep} bug_log_lines={}",
        frozen_at.as_secs_f64(),
        thawing_at.as_secs_f64(),
        killed_at.as_secs_f64(),
        restarting_at.as_secs_f64(),
        rec.max_latency_by_op(),
        Summary::of(&probes).statuses,
        probe_samples.iter().map(|s| s.elapsed).max().unwrap_or_default().as_millis(),
        accepted.len(),
        bugs.len()
    );

    let mut checks = verify::Checks::default();
    checks.none("statuses during/after the S3 faults", &bad);
    checks.none("requests slower than DEPENDENCY_TIMEOUT + margin", &slow);
    checks.none("/readyz", &bad_probes);
    found.check(&mut checks);
    checks.none("service log: bugs", &bugs);
    leaks.check(&mut checks);
    checks.that(
        uploads_refused > 0,
        "no upload was refused while S3 was down: the fault did not bite",
    );
    checks.that(readyz_503 > 0, "/readyz never said 503 while S3 was down");
    checks.that(
        reads_in_fault > 0,
        "no download ran while S3 was down: the fallback went untested",
    );
    checks.finish(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_3a_s3_frozen_and_killed_s3_mode() {
    bounded("s3_fault_s3", Duration::from_secs(120), run("s3")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_3b_s3_frozen_and_killed_dual_mode() {
    bounded("s3_fault_dual", Duration::from_secs(120), run("dual")).await;
}
