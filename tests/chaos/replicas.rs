//! Scenario 5: three replicas (one database, one bucket) behind HAProxy health-checking
//! `/readyz`; one replica SIGKILLed mid-load. Clients retry a failed request once. Paging the
//! activity feed with `since_id` through the balancer returns each upload exactly once, and
//! the replicas' sweepers (SWEEP_INTERVAL=1s, ACK_RETENTION=0: acked rows go at once) run
//! concurrently without errors.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use uuid::Uuid;

use crate::{
    harness::{bounded, spool_leaks, Haproxy, Pg, S3s, Scratch, Service, ServiceConfig},
    load::{Api, Fleet, Outcome, Recorder, Retry, Summary, Worker},
    verify,
};

const REPLICAS: usize = 3;
const WORKERS: usize = 6;
const PAGE: usize = 7;

async fn run() {
    let name = "replicas_haproxy";
    let scratch = Scratch::new(name);
    let pg = Pg::start(&scratch);
    let s3 = S3s::start(&scratch).await;
    let mut replicas = Vec::new();
    let mut configs = Vec::new();
    for r in 0..REPLICAS {
        let spool = scratch.sub(&format!("spool-{r}"));
        let config = ServiceConfig::new(&pg.url(), spool)
            .s3("s3", &s3)
            .with("SWEEP_INTERVAL", "1s")
            .with("ACK_RETENTION", "0");
        configs.push(config.clone());
        replicas
            .push(Service::start(config, scratch.path().join(format!("replica-{r}.log"))).await);
    }
    let ports: Vec<u16> = replicas.iter().map(|s| s.port).collect();
    let lb = Haproxy::start(&scratch, &ports).await;
    let rec = Recorder::new();
    let api = Api::new(&lb.base(), &rec);

    let fleet = Fleet::start(&api, WORKERS, |i, ws, token| Worker {
        api: api.clone(),
        ws,
        token,
        seed: 500 + i as u64,
        sizes: 1..400_000,
        files: 1..=2,
        retry: Retry::Once,
        ack_every: 2,
        page: PAGE,
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    rec.fault_begin();
    replicas[1].kill9();
    // HAProxy needs `fall 2` failed checks (inter 300 ms) to take it out.
    tokio::time::sleep(Duration::from_secs(1)).await;
    rec.fault_end(Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let feeds = fleet.stop().await;

    // Every workspace pages its feed to the end through the balancer.
    let mut duplicates = Vec::new();
    let mut missing_from_feed = Vec::new();
    let accepted = rec.accepted();
    let mut feeds_final = Vec::new();
    for mut log in feeds {
        let worker = Worker {
            api: api.clone(),
            ws: log.ws,
            token: log.token.clone(),
            seed: 0,
            sizes: 1..2,
            files: 1..=1,
            retry: Retry::Once,
            ack_every: 0,
            page: PAGE,
        };
        worker.catch_up(&mut log).await;
        // The first page started after nothing: check from the first row the feed holds.
        let mut count: HashMap<Uuid, usize> = HashMap::new();
        for id in &log.seen {
            *count.entry(*id).or_insert(0) += 1;
        }
        duplicates.extend(
            count
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(id, n)| format!("ws {}: file {id} returned {n} times", log.ws)),
        );
        for a in accepted.iter().filter(|a| a.ws == log.ws) {
            if !count.contains_key(&a.file_id) {
                missing_from_feed.push(format!(
                    "ws {}: accepted file {} never paged",
                    a.ws, a.file_id
                ));
            }
        }
        feeds_final.push(log);
    }

    // ---- checks
    let samples = rec.samples();
    // Failures may only come from the kill (requests the dead replica held): transport
    // errors or the balancer's 502; each is retried once, and the retry must succeed.
    let bad = verify::fault_violations(&rec, &samples, "the kill window", |s| match &s.outcome {
        Outcome::Transport | Outcome::Http { status: 502, .. } => Ok(()),
        Outcome::Cut if s.op == "download" => Ok(()),
        o => verify::clean_503(o, &["platform_unavailable", "storage_unavailable"]),
    });
    let retried = rec.retried.load(std::sync::atomic::Ordering::Relaxed);
    let retry_failed = rec.retry_failed.lock().unwrap().clone();

    let pool = pg.pool().await;
    let acked: HashSet<Uuid> = feeds_final.iter().flat_map(|f| f.acked.clone()).collect();
    let mut found = verify::Findings {
        lost: verify::lost_uploads(&api, &accepted, &acked).await,
        ..Default::default()
    };
    // Rows acked in the run's last second wait for the survivors' next sweep pass (1 s).
    let acked_ids: Vec<Uuid> = acked.iter().copied().collect();
    let mut still_there: i64 = 0;
    for _ in 0..50 {
        still_there =
            sqlx::query_scalar("SELECT count(*) FROM pending_uploads WHERE file_id = ANY($1)")
                .bind(&acked_ids)
                .fetch_one(&pool)
                .await
                .unwrap();
        if still_there == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    found.half = verify::half_states(&pool, &acked).await;
    let sweep = found.sweep(&configs[0], &pool, &s3).await;
    let idle_tx = verify::idle_in_transaction(&pool).await;
    let mut spool_left = 0;
    for (r, s) in replicas.iter().enumerate() {
        let (files, fds) = spool_leaks(&configs[r].spool_dir, s.pid());
        spool_left += files + fds;
    }
    // The sweepers: no failed pass, no failed delete, on any replica.
    let mut sweep_errors = Vec::new();
    let mut passes = 0;
    for (r, s) in replicas.iter().enumerate() {
        for line in s.log_lines() {
            let msg = line["message"].as_str().unwrap_or("");
            if msg.contains("sweep pass failed")
                || msg.contains("orphan reconciliation failed")
                || msg.contains("object delete failed")
            {
                sweep_errors.push(format!("replica {r}: {line}"));
            }
            if msg == "sweep pass done" {
                passes += 1;
            }
        }
    }
    let mut metrics_errors = Vec::new();
    let mut sweep_runs_ok = Vec::new();
    for (r, s) in replicas.iter().enumerate().filter(|(r, _)| *r != 1) {
        let ok = s
            .metric("pending_uploads_sweep_runs_total{outcome=\"ok\"}")
            .await;
        let errors = s
            .metric("pending_uploads_sweep_runs_total{outcome=\"error\"}")
            .await;
        sweep_runs_ok.push(ok);
        if errors > 0.0 {
            metrics_errors.push(format!("replica {r}: {errors} failed sweep passes"));
        }
        // SWEEP_INTERVAL=1s over the whole run: a replica that swept less did not run its
        // sweeper concurrently with the others.
        if ok < 5.0 {
            metrics_errors.push(format!("replica {r}: only {ok} sweep passes"));
        }
    }
    let bugs: Vec<String> = replicas.iter().flat_map(|s| s.bug_lines()).collect();

    Summary::print(
        &rec,
        name,
        found.lost_count() + missing_from_feed.len(),
        found.orphaned_count() + duplicates.len(),
        spool_left + idle_tx as usize,
    );
    println!(
        "CHAOS-DETAIL {name}: replicas={REPLICAS} killed=1 retried={retried} retry_failed={} uploads_accepted={} acked={} acked_rows_left={still_there} paged_rows={} sweep_passes_with_work={passes} sweep_runs_ok_survivors={sweep_runs_ok:?} final_sweep={sweep} bug_log_lines={}",
        retry_failed.len(),
        accepted.len(),
        acked.len(),
        feeds_final.iter().map(|f| f.seen.len()).sum::<usize>(),
        bugs.len()
    );

    let mut checks = verify::Checks::default();
    checks.none("statuses through the balancer", &bad);
    checks.none("requests that failed again when retried", &retry_failed);
    checks.none("files paged more than once", &duplicates);
    checks.none("accepted files never paged", &missing_from_feed);
    found.check(&mut checks);
    checks.none("sweeper errors in the replicas' logs", &sweep_errors);
    checks.none("sweeper errors in /metrics", &metrics_errors);
    checks.none("service logs: bugs", &bugs);
    checks.that(
        idle_tx == 0,
        format!("{idle_tx} sessions left idle in transaction"),
    );
    checks.that(spool_left == 0, format!("{spool_left} spool files left"));
    checks.that(
        still_there == 0,
        format!("{still_there} acked rows not swept by the replicas' sweepers (ACK_RETENTION=0)"),
    );
    checks.finish(name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_5_replicas_behind_haproxy() {
    bounded("replicas_haproxy", Duration::from_secs(150), run()).await;
}
