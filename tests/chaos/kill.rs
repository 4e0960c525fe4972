//! Scenario 4: the service SIGKILLed mid-uploads (multi-file requests, S3 mode) and started
//! again. No half state: each request's rows are all there or none; objects the dead process
//! wrote without a row are removed by a sweep with ORPHAN_GRACE=0.

use std::{collections::HashMap, time::Duration};

use crate::{
    harness::{bounded, Pg, S3s, Scratch, Service, ServiceConfig},
    load::{Api, Fleet, Outcome, Recorder, Retry, Summary, Worker},
    verify,
};

const WORKERS: usize = 6;
/// Kills, each followed by a restart on the same port.
const KILLS: usize = 2;

async fn run() {
    let name = "service_sigkill";
    let scratch = Scratch::new(name);
    let pg = Pg::start(&scratch);
    let s3 = S3s::start(&scratch).await;
    let spool = scratch.sub("spool");
    let config = ServiceConfig::new(&pg.url(), spool.clone()).s3("s3", &s3);
    let mut service = Service::start(config.clone(), scratch.path().join("service.log")).await;
    let rec = Recorder::new();
    let api = Api::new(&service.base(), &rec);

    let fleet = Fleet::start(&api, WORKERS, |i, ws, token| Worker {
        api: api.clone(),
        ws,
        token,
        seed: 400 + i as u64,
        // Multi-MB, multi-file requests: a kill lands inside bodies, PUTs and transactions.
        sizes: 1..1_500_000,
        files: 1..=3,
        retry: Retry::Never,
        ack_every: 0,
        page: 50,
    })
    .await;
    let mut restart_took = Vec::new();
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_secs(2)).await;
        rec.fault_begin();
        service.kill9();
        let t = std::time::Instant::now();
        service.restart().await;
        restart_took.push(t.elapsed().as_millis());
        rec.fault_end(Duration::from_millis(500));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _feeds = fleet.stop().await;

    // ---- checks
    let samples = rec.samples();
    let bad = verify::fault_violations(&rec, &samples, "the kill windows", |s| {
        match &s.outcome {
            // A killed process answers nothing: its connections are reset or refused.
            Outcome::Transport => Ok(()),
            Outcome::Cut if s.op == "download" => Ok(()),
            o => verify::clean_503(o, &["platform_unavailable", "storage_unavailable"]),
        }
    });
    let pool = pg.pool().await;
    // All or nothing per request: files are named w<seed>-r<round>-f<i>of<n>.bin.
    let names: Vec<String> = sqlx::query_scalar("SELECT filename FROM pending_uploads")
        .fetch_all(&pool)
        .await
        .unwrap();
    let mut per_request: HashMap<String, (usize, usize)> = HashMap::new();
    for n in &names {
        let Some((req, rest)) = n.split_once("-f") else {
            continue;
        };
        let want: usize = rest
            .split_once("of")
            .and_then(|(_, r)| r.strip_suffix(".bin"))
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        let e = per_request.entry(req.to_string()).or_insert((0, want));
        e.0 += 1;
    }
    let partial: Vec<String> = per_request
        .iter()
        .filter(|(_, (got, want))| got != want)
        .map(|(req, (got, want))| format!("request {req}: {got} of {want} files committed"))
        .collect();
    let accepted = rec.accepted();
    let mut found = verify::Findings::of_uploads(&api, &pool, &accepted).await;
    let keys_before_sweep = s3.keys().await.len();
    let rows_with_keys: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pending_uploads WHERE s3_key IS NOT NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    let sweep = found.sweep(&config, &pool, &s3).await;
    let leaks = verify::Leaks::settled(&pool, &spool, &service).await;
    let bugs = service.bug_lines();

    Summary::print(
        &rec,
        name,
        found.lost_count(),
        found.orphaned_count() + partial.len(),
        leaks.count(),
    );
    println!(
        "CHAOS-DETAIL {name}: kills={KILLS} restart_ms={restart_took:?} requests_with_rows={} uploads_accepted={} objects_before_sweep={keys_before_sweep} rows_with_keys={rows_with_keys} sweep={sweep} bug_log_lines={}",
        per_request.len(),
        accepted.len(),
        bugs.len()
    );

    let mut checks = verify::Checks::default();
    checks.none("statuses around the kills", &bad);
    checks.none("requests committed in part", &partial);
    found.check(&mut checks);
    checks.none("service log: bugs", &bugs);
    leaks.check(&mut checks);
    checks.that(
        samples
            .iter()
            .any(|s| s.op == "upload" && s.outcome == Outcome::Transport),
        "no upload was in flight at a kill: the fault did not bite",
    );
    checks.finish(name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_4_service_sigkill_mid_upload() {
    bounded("service_sigkill", Duration::from_secs(120), run()).await;
}
