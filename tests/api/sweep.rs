use std::time::Duration;

use pending_uploads::sweep::{Sweeper, Turn};
use reqwest::StatusCode;
use uuid::Uuid;

use crate::common::*;

async fn insert_rows(app: &TestApp, ws: Uuid, n: i64, expires: &str, acked: &str) {
    sqlx::query(&format!(
        "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename, expires_at, acked_at)
         SELECT $1, '\\x01', 1, 'f' || g, {expires}, {acked} FROM generate_series(1, $2) g"
    ))
    .bind(ws)
    .bind(n)
    .execute(&app.pool)
    .await
    .unwrap();
}

fn with_retention(s: &Sweeper, retention: Duration, batch: i64) -> Sweeper {
    Sweeper {
        ack_retention: retention,
        batch_size: batch,
        ..s.clone()
    }
}

/// A batch deletes at most SWEEP_BATCH_BYTES of inline bytes plus one row's (a row's bytes go
/// with it in the statement, so 500 large rows in one statement would outlast any deadline,
/// roll back and come back at every pass), and the pass goes on until all are swept.
#[tokio::test]
async fn sweep_batches_are_bounded_by_bytes_too() {
    let app = TestApp::start().await;
    let ws = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename, expires_at)
         SELECT $1, convert_to(repeat('x', 600000), 'UTF8'), 600000, 'f' || g,
                now() - interval '1 second'
         FROM generate_series(1, 5) g",
    )
    .bind(ws)
    .execute(&app.pool)
    .await
    .unwrap();
    let sweeper = Sweeper {
        batch_bytes: 1_000_000,
        ..with_retention(&app.sweeper, Duration::ZERO, 500)
    };
    let stats = sweeper.run_once().await.unwrap();
    assert_eq!(
        (stats.rows, stats.batches),
        (5, 3),
        "two rows per batch: the second crosses 1 MB"
    );
    assert_eq!(app.count("pending_uploads").await, 0);
}

#[tokio::test]
async fn sweeps_expired_and_old_acked_rows_only() {
    let app = TestApp::start().await;
    let ws = Uuid::new_v4();
    insert_rows(&app, ws, 3, "now() - interval '1 second'", "NULL").await; // expired, unacked
    insert_rows(&app, ws, 2, "now() - interval '1 second'", "now()").await; // expired, acked
    insert_rows(
        &app,
        ws,
        4,
        "now() + interval '1 hour'",
        "now() - interval '2 hours'",
    )
    .await; // acked long ago
    insert_rows(
        &app,
        ws,
        5,
        "now() + interval '1 hour'",
        "now() - interval '1 minute'",
    )
    .await; // acked recently
    insert_rows(&app, ws, 6, "now() + interval '1 hour'", "NULL").await; // live
    let stats = with_retention(&app.sweeper, Duration::from_secs(3600), 500)
        .run_once()
        .await
        .unwrap();
    assert_eq!(stats.rows, 9);
    assert_eq!(stats.bytes, 9);
    assert_eq!(app.count("pending_uploads").await, 11);
    // ACK_RETENTION=0: every acked row goes
    let stats = with_retention(&app.sweeper, Duration::ZERO, 500)
        .run_once()
        .await
        .unwrap();
    assert_eq!(stats.rows, 5);
    assert_eq!(app.count("pending_uploads").await, 6);
    assert_eq!(
        with_retention(&app.sweeper, Duration::ZERO, 500)
            .run_once()
            .await
            .unwrap()
            .rows,
        0
    );
}

#[tokio::test]
async fn sweeping_works_in_bounded_batches() {
    let app = TestApp::start().await;
    insert_rows(
        &app,
        Uuid::new_v4(),
        1234,
        "now() - interval '1 second'",
        "NULL",
    )
    .await;
    let stats = with_retention(&app.sweeper, Duration::from_secs(3600), 100)
        .run_once()
        .await
        .unwrap();
    assert_eq!(stats.rows, 1234);
    assert_eq!(app.count("pending_uploads").await, 0);
}

/// A sweep batch reads the rows it sweeps, not the table: its statement had no index to read
/// `expires_at <= now() OR (acked, long ago)` by, so each batch scanned the table until it had
/// its rows, and every pass ended with a scan of the whole table. Here 600 rows to sweep after
/// 20,000 live ones in the heap, in batches of 50: 261,640 rows read before, 1,200 now (each
/// swept row found, then deleted).
#[tokio::test]
async fn a_sweep_reads_the_rows_it_sweeps_not_the_table() {
    let app = TestApp::start().await;
    let ws = Uuid::new_v4();
    let live = "now() + interval '1 hour'";
    insert_rows(&app, ws, 20_000, live, "NULL").await;
    insert_rows(&app, ws, 200, "now() - interval '1 second'", "NULL").await; // expired
    insert_rows(&app, ws, 200, live, "now() - interval '2 hours'").await; // acked long ago
    let expired = "now() - interval '1 second'";
    insert_rows(&app, ws, 200, expired, "now() - interval '1 minute'").await; // acked, expired
    insert_rows(&app, ws, 200, live, "now() - interval '1 minute'").await; // acked recently
    analyze(&app.pool, "pending_uploads").await;
    let read = rows_read(&app.db_url, "pending_uploads").await;
    let stats = with_retention(&app.sweeper, Duration::from_secs(3600), 50)
        .run_once()
        .await
        .unwrap();
    assert_eq!((stats.rows, stats.batches), (600, 12));
    let read = rows_read(&app.db_url, "pending_uploads").await - read;
    assert!(read <= 3 * 600, "{read} rows read to sweep 600");
    assert_eq!(app.count("pending_uploads").await, 20_200);
    assert_totals_exact(&app.pool).await;
}

/// The oldest-unacked gauge (read every GAUGE_REFRESH for the fleet) reads one row, not every
/// unacked row: the live unacked upload that expires first. Here 20,000 live rows, the oldest
/// 10,000 s old: 20,000 rows read before, 1 now.
#[tokio::test]
async fn the_oldest_unacked_age_reads_one_row() {
    let app = TestApp::start().await;
    let ws = Uuid::new_v4();
    // every row lives 24 h from when it was made, as the column defaults make it
    let inserted = std::time::Instant::now();
    sqlx::query(
        "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename, created_at,
                                      expires_at, acked_at)
         SELECT $1, '\\x01', 1, 'f', t, t + interval '24 hours', acked
         FROM (SELECT now() - g * interval '500 milliseconds' AS t, NULL::timestamptz AS acked
               FROM generate_series(1, 20000) g
               UNION ALL SELECT now() - interval '5 hours', now()
               UNION ALL SELECT now() - interval '25 hours', NULL) r",
    )
    .bind(ws)
    .execute(&app.pool)
    .await
    .unwrap();
    analyze(&app.pool, "pending_uploads").await;
    let read = rows_read(&app.db_url, "pending_uploads").await;
    let age: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM now() - pending_uploads_oldest_unacked_at())::float8",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    // the oldest live one, 10,000 s old when inserted
    let since = inserted.elapsed().as_secs_f64();
    assert!((9_999.0..10_001.0 + since).contains(&age), "{age}");
    let read = rows_read(&app.db_url, "pending_uploads").await - read;
    assert!(read <= 10, "{read} rows read for the oldest unacked upload");
}

#[tokio::test]
async fn two_replicas_sweeping_at_once_neither_collide_nor_double_count() {
    let app = TestApp::start().await;
    // 20 workspaces, their rows interleaved: each batch settles the totals of several
    // workspaces, so the two sweepers contend for the same total rows.
    sqlx::query(
        "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename, expires_at)
         SELECT md5((g % 20)::text)::uuid, '\\x01', 1 + g % 7, 'f' || g, now() - interval '1 second'
         FROM generate_series(1, 3000) g",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let a = with_retention(&app.sweeper, Duration::from_secs(3600), 50);
    let b = a.clone();
    let (ra, rb) = tokio::join!(a.run_once(), b.run_once());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(
        ra.rows + rb.rows,
        3000,
        "every row swept exactly once: {} + {}",
        ra.rows,
        rb.rows
    );
    assert_eq!(app.count("pending_uploads").await, 0);
    assert_totals_exact(&app.pool).await;
}

#[tokio::test]
async fn a_swept_upload_is_gone_for_the_workspace() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let fid = file_id(
        &app.upload_ok(ws, &token, &[("a.txt", "text/plain", b"bye".to_vec())])
            .await[0],
    );
    assert_eq!(
        app.post(
            &format!("/workspaces/{ws}/pending-uploads/{fid}/ack"),
            &token
        )
        .await
        .status(),
        StatusCode::OK
    );
    assert_eq!(
        with_retention(&app.sweeper, Duration::ZERO, 10)
            .run_once()
            .await
            .unwrap()
            .rows,
        1
    );
    let resp = app
        .get(
            &format!("/workspaces/{ws}/pending-uploads/{fid}/content"),
            &token,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

/// Every replica listed the whole prefix at each of its reconciliation turns (a LIST per 1,000
/// objects), and two at once deleted, and counted, the same orphans. Replicas now take turns: a
/// turn one has taken is skipped by everyone, itself included (a holder that kept retaking it
/// after failures would keep the others out), until the asker's period has passed.
#[tokio::test]
async fn replicas_take_turns_at_the_orphan_reconciliation() {
    let app = TestApp::start().await;
    let a = app.sweeper.clone();
    let b = Sweeper {
        replica: Uuid::new_v4(),
        ..a.clone()
    };
    let period = Duration::from_secs(2);
    assert_eq!(a.reconcile_in_turn(period).await, Turn::Ran(0));
    assert_eq!(b.reconcile_in_turn(period).await, Turn::Elsewhere);
    assert_eq!(
        a.reconcile_in_turn(period).await,
        Turn::Elsewhere,
        "no claim on its own next turn"
    );
    tokio::time::sleep(period).await;
    assert_eq!(
        b.reconcile_in_turn(period).await,
        Turn::Ran(0),
        "a turn left to end is free"
    );
    assert_eq!(a.reconcile_in_turn(period).await, Turn::Elsewhere);
    // A replica with a shorter cycle (a shorter ORPHAN_GRACE, after a restart) judges the
    // last turn by its own.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = Sweeper {
        replica: Uuid::new_v4(),
        ..a.clone()
    };
    assert_eq!(
        c.reconcile_in_turn(Duration::from_millis(200)).await,
        Turn::Ran(0)
    );
}
