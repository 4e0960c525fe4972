//! Scenario 4: the service SIGKILLed mid-uploads (multi-file requests, S3 mode) and started
//! again. No half state: each request's rows are all there or none; objects the dead process
//! wrote without a row are removed by a sweep with ORPHAN_GRACE=0.

use std::{collections::HashMap, collections::HashSet, time::Duration};

use uuid::Uuid;

use crate::{
    harness::{bounded, settled_spool_leaks, Pg, S3s, Scratch, Service, ServiceConfig},
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
    let bad = verify::violations(&samples, |s| {
        if s.outcome.is_ok() {
            return Ok(());
        }
        if !rec.during_fault(s) {
            return Err(format!("{} outside the kill windows", s.outcome.key()));
        }
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
    let lost = verify::lost_uploads(&api, &accepted, &HashSet::new()).await;
    let half = verify::half_states(&pool, &HashSet::<Uuid>::new()).await;
    let keys_before_sweep = s3.keys().await.len();
    let rows_with_keys: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pending_uploads WHERE s3_key IS NOT NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    let sweep = config.sweep();
    let (orphaned, missing) = verify::orphans(&pool, &s3).await;
    let idle_tx = verify::idle_in_transaction(&pool).await;
    let (spool_files, spool_fds) =
        settled_spool_leaks(&spool, service.pid(), Duration::from_secs(5)).await;
    let bugs = service.bug_lines();

    let summary = Summary::of(&rec);
    println!(
        "{}",
        summary.line(
            name,
            lost.len() + missing.len(),
            half.len() + orphaned.len() + partial.len(),
            spool_files + spool_fds + idle_tx as usize
        )
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
            .any(|s| s.op == "upload" && s.outcome == Outcome::Transport),
        "no upload was in flight at a kill: the fault did not bite",
    );
    checks.finish(name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_4_service_sigkill_mid_upload() {
    bounded("service_sigkill", Duration::from_secs(120), run()).await;
}
