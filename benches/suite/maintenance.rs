//! `maintenance`: sweep throughput on 100,000 expired rows, and the backfill (bytea → S3,
//! with read-back verification) on 2,000 rows of 64 KiB.

use std::time::Instant;

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::{base_command, drop_db, fresh_db, Env};

pub async fn run(env: &Env) {
    let server = env.server.as_str();
    let with_s3 = env.s3.is_some();
    println!("\nMaintenance:\n");
    println!("| job | rows | bytes | seconds | rows/s | MB/s |");
    println!("|---|---|---|---|---|---|");
    // sweep: 100,000 expired rows
    let db = fresh_db(server).await;
    assert!(base_command(env, &env.bin, &db, "bytea", "unused/")
        .arg("migrate")
        .status()
        .unwrap()
        .success());
    let pool = PgPool::connect(&db).await.unwrap();
    sqlx::query(
        "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename, expires_at)
         SELECT gen_random_uuid(), '\\x0102'::bytea, 2, 'f' || g, now() - interval '1 second'
         FROM generate_series(1, 100000) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let started = Instant::now();
    let out = base_command(env, &env.bin, &db, "bytea", "unused/")
        .arg("sweep")
        .output()
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["swept_rows"], 100_000);
    println!(
        "| sweep (expired, batches of 500) | 100000 | 200000 | {secs:.2} | {:.0} | - |",
        100_000.0 / secs
    );
    pool.close().await;
    drop_db(server, &db).await;

    if !with_s3 {
        return;
    }
    // backfill: 2,000 bytea rows of 64 KiB
    let db = fresh_db(server).await;
    let prefix = format!("bench-{}/", Uuid::new_v4().simple());
    assert!(base_command(env, &env.bin, &db, "bytea", &prefix)
        .arg("migrate")
        .status()
        .unwrap()
        .success());
    let pool = PgPool::connect(&db).await.unwrap();
    sqlx::query(
        "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename)
         SELECT gen_random_uuid(), decode(repeat(lpad(to_hex(g % 256), 2, '0'), 65536), 'hex'), 65536, 'f' || g
         FROM generate_series(1, 2000) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE pending_uploads SET content_sha256 = sha256(content)")
        .execute(&pool)
        .await
        .unwrap();
    let started = Instant::now();
    let out = base_command(env, &env.bin, &db, "bytea", &prefix)
        .args(["backfill", "--no-progress", "--concurrency", "8"])
        .output()
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["migrated"], 2000, "{report}");
    let bytes = 2000.0 * 65536.0;
    println!(
        "| backfill (copy + read-back verify, concurrency 8) | 2000 | {} | {secs:.2} | {:.0} | {:.1} |",
        bytes as u64,
        2000.0 / secs,
        bytes / 1e6 / secs
    );
    sqlx::query("UPDATE pending_uploads SET expires_at = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert!(base_command(env, &env.bin, &db, "bytea", &prefix)
        .arg("sweep")
        .status()
        .unwrap()
        .success());
    drop_db(server, &db).await;
}
