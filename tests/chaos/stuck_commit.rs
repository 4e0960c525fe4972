//! Commits that do not come back. A commit waits in PostgreSQL after it is durable locally
//! when the session has `synchronous_commit = on` and `synchronous_standby_names` names a
//! standby that never connects (`SyncRep`); these scenarios use that to hold a commit open.
//!
//! Scenario 8: a commit elsewhere on the cluster is stuck while holding PostgreSQL's NOTIFY
//! lock. PostgreSQL serializes the commits of all transactions that called NOTIFY (one
//! cluster-wide lock, `PreCommit_Notify`, held until the commit is done, WAL flush and
//! synchronous replication included). An upload transaction that notified waited behind every
//! such commit: here it got a 503 after DEPENDENCY_TIMEOUT. Uploads now commit without
//! notifying and are announced afterwards (longpoll::Announcer): they succeed while the lock
//! is held, and a long poll waiting on the workspace is answered once it is released. The
//! service's sessions keep the cluster's `synchronous_commit = off`, so only the blocker
//! waits.
//!
//! Scenario 9: the service's own upload commits are stuck (its sessions have
//! `synchronous_commit = on`), past DEPENDENCY_TIMEOUT: the uploads get 503, yet their rows
//! are in once the standby requirement goes. Their S3 objects must still be there: the
//! service deleted them as for a failed commit, which left rows without bytes.

use std::time::{Duration, Instant};

use rand::{rngs::StdRng, SeedableRng};
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::{
    harness::{bounded, Pg, S3s, Scratch, Service, ServiceConfig, DEP_TIMEOUT, PREFIX},
    load::{payload, sha256, Accepted, Api, Recorder},
};

/// The bigger upload goes through COPY (more than the one-statement path's 1 MiB).
const BIG: usize = 3 * 1024 * 1024;

/// Upload commits waiting on the standby (a reading of what the fleet stores may commit a
/// fold of its deltas, and the backlog gauges' call a new reading, and wait there too).
async fn stuck_sessions(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'
           AND query <> 'SELECT * FROM pending_uploads_stored()'
           AND query NOT LIKE '%FROM pending_uploads_backlog($1, $2)'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn set_standby(pool: &sqlx::PgPool, names: Option<&str>) {
    let sql = match names {
        Some(n) => format!("ALTER SYSTEM SET synchronous_standby_names = '{n}'"),
        None => "ALTER SYSTEM RESET synchronous_standby_names".to_string(),
    };
    sqlx::query(&sql).execute(pool).await.unwrap();
    sqlx::query("SELECT pg_reload_conf()")
        .execute(pool)
        .await
        .unwrap();
}

/// The newest activity row's id of the workspace (the long poll's cursor).
async fn newest_activity(api: &Api, ws: Uuid, token: &str) -> String {
    let (outcome, rows) = api.activity(ws, token, None, 1).await;
    assert!(outcome.is_ok(), "the feed: {outcome:?}");
    rows[0]["id"].as_str().expect("an activity row").to_string()
}

/// Names a standby that never connects, and waits until new sessions see it.
async fn require_absent_standby(pg: &Pg, admin: &sqlx::PgPool) {
    set_standby(admin, Some("chaos_absent_standby")).await;
    let mut probe = PgConnection::connect(&pg.url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let names: String = sqlx::query_scalar("SHOW synchronous_standby_names")
            .fetch_one(&mut probe)
            .await
            .unwrap();
        if names == "chaos_absent_standby" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the reload did not reach new sessions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn notify_lock() {
    let scratch = Scratch::new("notify_lock");
    let pg = Pg::start(&scratch);
    let config = ServiceConfig::new(&pg.url(), scratch.sub("spool"));
    let service = Service::start(config, scratch.path().join("service.log")).await;
    let base = service.base();
    let rec = Recorder::new();
    let api = Api::new(&base, &rec);
    let http = reqwest::Client::new();
    let mut rng = StdRng::seed_from_u64(8);
    let (a, a_token) = api.register().await;
    let (b, b_token) = api.register().await;
    let (first, _) = api
        .upload(a, &a_token, &[("first.bin".into(), payload(&mut rng, 100))])
        .await;
    assert!(first.is_ok(), "an upload before the fault: {first:?}");
    let cursor = newest_activity(&api, a, &a_token).await;

    // A long poll on workspace A, waiting for the next row.
    let poll = {
        let (http, url, token) = (
            http.clone(),
            format!("{base}/workspaces/{a}/activity?since_id={cursor}&wait=30"),
            a_token.clone(),
        );
        tokio::spawn(async move {
            let resp = http.get(url).bearer_auth(token).send().await.unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap(), Instant::now())
        })
    };

    // The stuck commit.
    let admin = pg.pool().await;
    sqlx::query("CREATE TABLE chaos_scratch (x int)")
        .execute(&admin)
        .await
        .unwrap();
    require_absent_standby(&pg, &admin).await;
    let mut blocker = PgConnection::connect(&pg.url()).await.unwrap();
    for sql in [
        "SET synchronous_commit = on",
        "BEGIN",
        "INSERT INTO chaos_scratch VALUES (1)",
        "NOTIFY chaos_unrelated_channel",
    ] {
        sqlx::query(sql).execute(&mut blocker).await.unwrap();
    }
    let commit = tokio::spawn(async move {
        sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while stuck_sessions(&admin).await == 0 {
        assert!(
            Instant::now() < deadline,
            "the blocker's commit is not waiting on SyncRep"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Uploads while the lock is held: a small one (one statement) and a bigger one (COPY).
    let small_started = Instant::now();
    let (small, _) = api
        .upload(
            b,
            &b_token,
            &[("small.bin".into(), payload(&mut rng, 1024))],
        )
        .await;
    let small_took = small_started.elapsed();
    let big_started = Instant::now();
    let (big, big_files) = api
        .upload(a, &a_token, &[("big.bin".into(), payload(&mut rng, BIG))])
        .await;
    let big_took = big_started.elapsed();
    let still_stuck = stuck_sessions(&admin).await;
    let poll_waiting = !poll.is_finished();

    // Released: the stuck commit finishes and the long poll hears of the upload.
    let released = Instant::now();
    set_standby(&admin, None).await;
    tokio::time::timeout(Duration::from_secs(10), commit)
        .await
        .expect("the stuck commit finishes once no standby is required")
        .unwrap();
    let (status, rows, answered) = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("the long poll is answered after the release")
        .unwrap();
    let names: Vec<&str> = rows
        .as_array()
        .map(|r| r.iter().filter_map(|r| r["summary"].as_str()).collect())
        .unwrap_or_default();
    println!(
        "CHAOS notify_lock: stuck commits {still_stuck}; small upload {small:?} in {:.0} ms, \
         3 MiB upload {big:?} in {:.0} ms (DEPENDENCY_TIMEOUT {DEP_TIMEOUT:?}); long poll \
         waiting while stuck: {poll_waiting}; answered {status} {:.0} ms after the release: {names:?}",
        small_took.as_secs_f64() * 1e3,
        big_took.as_secs_f64() * 1e3,
        answered.saturating_duration_since(released).as_secs_f64() * 1e3,
    );
    assert_eq!(
        still_stuck, 1,
        "the blocker stayed stuck through the uploads"
    );
    assert!(
        small.is_ok(),
        "a small upload commits beside a stuck NOTIFY commit: {small:?}"
    );
    assert!(
        big.is_ok(),
        "a COPY upload commits beside a stuck NOTIFY commit: {big:?}"
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        names,
        ["chat_upload_receive: big.bin"],
        "the long poll answers with the upload made while the lock was held"
    );
    let fetched = api.verifier().download(&big_files[0]).await;
    assert!(fetched.is_ok(), "the bytes are whole: {fetched:?}");
}

async fn outcome_unknown() {
    let scratch = Scratch::new("commit_outcome_unknown");
    let pg = Pg::start(&scratch);
    let s3 = S3s::start(&scratch).await;
    let url = format!("{}?options=-c%20synchronous_commit%3Don", pg.url());
    let config = ServiceConfig::new(&url, scratch.sub("spool")).s3("s3", &s3);
    let service = Service::start(config, scratch.path().join("service.log")).await;
    let base = service.base();
    let rec = Recorder::new();
    let api = Api::new(&base, &rec);
    let mut rng = StdRng::seed_from_u64(9);
    // One workspace per upload (one upload's stuck commit holds its workspace's lock), each
    // token used once first: the first use stamps `last_used_at`, a write that would wait too.
    let mut uploaders = Vec::new();
    for (name, len) in [("small.bin", 1024), ("big.bin", BIG)] {
        let (ws, token) = api.register().await;
        let (first_use, _) = api.activity(ws, &token, None, 1).await;
        assert!(first_use.is_ok(), "{first_use:?}");
        uploaders.push((ws, token, name.to_string(), payload(&mut rng, len)));
    }

    let admin = pg.pool().await;
    require_absent_standby(&pg, &admin).await;
    let mut outcomes = Vec::new();
    for (ws, token, name, bytes) in &uploaders {
        let started = Instant::now();
        let (outcome, _) = api
            .upload(*ws, token, &[(name.clone(), bytes.clone())])
            .await;
        outcomes.push((outcome, started.elapsed()));
    }
    let stuck = stuck_sessions(&admin).await;
    // What the service does after answering (it deleted the objects in the background).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let keys_while_stuck = s3.keys().await.len();
    set_standby(&admin, None).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stuck_sessions(&admin).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the stuck commits finish once no standby is required"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A released backend leaves the wait before its commit is visible to others: the rows
    // are read until both are there (or 10 s have passed).
    let mut rows: Vec<(Uuid, String, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rows.len() < 2 && Instant::now() < deadline {
        rows = sqlx::query_as(
            "SELECT file_id, filename, s3_key FROM pending_uploads ORDER BY filename",
        )
        .fetch_all(&admin)
        .await
        .unwrap();
        if rows.len() < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let keys = s3.keys().await;
    let mut served = Vec::new();
    for (file_id, name, _) in &rows {
        let Some((ws, token, _, bytes)) = uploaders.iter().find(|u| &u.2 == name) else {
            panic!("a row nobody uploaded: {name}");
        };
        let row = Accepted {
            ws: *ws,
            token: token.clone(),
            file_id: *file_id,
            name: name.clone(),
            size: bytes.len(),
            sha256: sha256(bytes),
        };
        served.push((name.clone(), api.download(&row).await));
    }
    println!(
        "CHAOS commit_outcome_unknown: uploads {:?}; commits stuck {stuck}; objects while stuck \
         {keys_while_stuck}; rows after the release {}; objects {}; served {served:?}",
        outcomes
            .iter()
            .map(|(o, t)| format!("{} in {:.1} s", o.key(), t.as_secs_f64()))
            .collect::<Vec<_>>(),
        rows.len(),
        keys.len(),
    );
    for (outcome, _) in &outcomes {
        assert_eq!(
            outcome.status(),
            Some(503),
            "a commit cut by its deadline: {outcome:?}"
        );
    }
    assert_eq!(stuck, 2, "both uploads' commits waited on the standby");
    assert_eq!(rows.len(), 2, "both commits went through once released");
    for (_, name, key) in &rows {
        assert!(key.starts_with(PREFIX));
        assert!(
            keys.contains(key),
            "{name}: its row's object is still there: {keys:?}"
        );
    }
    for (name, outcome) in &served {
        // `download` checks the size and SHA-256 of what it read against the upload.
        assert!(outcome.is_ok(), "{name}: the bytes uploaded: {outcome:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_8_commit_stuck_holding_the_notify_lock() {
    bounded("notify_lock", Duration::from_secs(90), notify_lock()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_9_upload_commit_outcome_unknown_keeps_its_objects() {
    bounded(
        "commit_outcome_unknown",
        Duration::from_secs(90),
        outcome_unknown(),
    )
    .await;
}
