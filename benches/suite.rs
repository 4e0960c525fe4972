//! The benchmark suite, against the real backends (PostgreSQL, and an S3 server for s3):
//!
//! - `throughput`: N files of one size at one concurrency (defaults: 100 x 20 MiB, 8);
//! - `matrix`: 1 KiB / 1 MiB / 25 MiB at concurrency 1 / 8 / 32;
//!   both print upload and download MB/s through the service next to the same transfer
//!   straight to the backend with the same client library (sqlx, aws-sdk-s3), in the same run,
//!   as a ratio, with the service's peak RSS (VmHWM, reset per cell);
//! - `latency`: ack, pending list and activity feed p50/p99 and req/s under concurrent load;
//! - `maintenance`: sweep throughput on 100,000 expired rows, backfill on 2,000 bytea rows.
//!
//! `scripts/bench.sh [--suite all|throughput|matrix|latency|maintenance] [...]` starts
//! PostgreSQL and LocalStack and runs it; BENCH_DATABASE_URL, BENCH_S3_ENDPOINT and
//! BENCH_S3_BUCKET point it at running ones instead.

use std::{
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use clap::Parser;
use futures::{stream, StreamExt};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

#[derive(Parser, Debug)]
struct Args {
    /// all, throughput, matrix, latency or maintenance.
    #[arg(long, default_value = "all")]
    suite: String,
    /// throughput: files per direction.
    #[arg(long, default_value_t = 100)]
    files: usize,
    /// throughput: file size in bytes.
    #[arg(long, default_value_t = 20 * 1024 * 1024)]
    size: usize,
    /// throughput: requests in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// throughput: workspaces the files are spread over, round-robin (uploads to one
    /// workspace serialize their commits on its lock; different workspaces do not).
    #[arg(long, default_value_t = 1)]
    workspaces: usize,
    #[arg(long, default_value = "bytea,s3", value_delimiter = ',')]
    backends: Vec<String>,
    /// cargo bench passes --bench; without it (cargo test) nothing is measured.
    #[arg(long, hide = true)]
    bench: bool,
}

const ADMIN: &str = "bench-admin-token";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pending-uploads")
}

struct Service {
    child: Child,
    base: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    /// Peak resident set size since the last reset, in MiB.
    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }

    /// Resets VmHWM to the current RSS (Linux clear_refs 5).
    fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn fresh_db(server: &str) -> String {
    let name = format!("bench_{}", Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(server)
        .await
        .expect("connect BENCH_DATABASE_URL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let (prefix, _) = server.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

async fn drop_db(server: &str, db: &str) {
    let name = db.rsplit('/').next().unwrap();
    let mut conn = PgConnection::connect(server).await.unwrap();
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await;
}

fn command(db: &str, backend: &str, prefix: &str) -> Command {
    let mut cmd = Command::new(bin());
    cmd.env("DATABASE_URL", db)
        .env("PENDING_UPLOADS_BACKEND", backend)
        .env("PENDING_UPLOADS_S3_PREFIX", prefix)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let (Ok(bucket), Ok(endpoint)) = (
        std::env::var("BENCH_S3_BUCKET"),
        std::env::var("BENCH_S3_ENDPOINT"),
    ) {
        cmd.env("PENDING_UPLOADS_S3_BUCKET", bucket)
            .env("AWS_ENDPOINT_URL", endpoint);
    }
    cmd
}

async fn start_service(db: &str, backend: &str, prefix: &str) -> Service {
    let port = free_port();
    let mut cmd = command(db, backend, prefix);
    cmd.env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("ADMIN_TOKEN", ADMIN)
        .env("MAX_PENDING_BYTES_PER_WORKSPACE", (1u64 << 40).to_string())
        .env("MAX_CONCURRENT_UPLOADS", "256")
        .env("SWEEP_INTERVAL", "1h")
        .stdout(Stdio::null());
    let svc = Service {
        child: cmd.spawn().expect("start the service"),
        base: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if client
            .get(format!("{}/readyz", svc.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return svc;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("service did not become ready");
}

async fn workspace(http: &reqwest::Client, base: &str) -> (String, String) {
    let ws: Value = http
        .post(format!("{base}/workspaces"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "bench", "delivery_mode": "poll"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        ws["id"].as_str().unwrap().to_string(),
        ws["auth_token"].as_str().unwrap().to_string(),
    )
}

fn mb_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

fn human(size: usize) -> String {
    match size {
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

struct Cell {
    backend: String,
    size: usize,
    files: usize,
    concurrency: usize,
    up: f64,
    down: f64,
    direct_up: f64,
    direct_down: f64,
    rss: f64,
}

/// Uploads `files` files of `size` bytes with `concurrency` in flight, file `i` to workspace
/// `i % wss.len()`; returns (workspace index, file id) pairs.
async fn upload_all(
    http: &reqwest::Client,
    base: &str,
    wss: &[(String, String)],
    payload: &Bytes,
    files: usize,
    concurrency: usize,
) -> Vec<(usize, String)> {
    concurrently(files, concurrency, |i| {
        let (http, payload) = (http.clone(), payload.clone());
        let w = i % wss.len();
        let ws = &wss[w].0;
        let url = format!("{base}/workspaces/{ws}/chat/uploads");
        async move {
            let part = reqwest::multipart::Part::stream_with_length(
                reqwest::Body::from(payload.clone()),
                payload.len() as u64,
            )
            .file_name(format!("f{i}.bin"))
            .mime_str("application/octet-stream")
            .unwrap();
            let resp = http
                .post(url)
                .bearer_auth(ADMIN)
                .multipart(reqwest::multipart::Form::new().part("files", part))
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success(), "upload: {}", resp.status());
            let v: Value = resp.json().await.unwrap();
            let id = v["files"][0]["uri"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_string();
            (w, id)
        }
    })
    .await
}

async fn download_all(
    http: &reqwest::Client,
    base: &str,
    wss: &[(String, String)],
    ids: Vec<(usize, String)>,
    concurrency: usize,
) -> usize {
    let lens = concurrently(ids.len(), concurrency, |i| {
        let http = http.clone();
        let (w, id) = &ids[i];
        let (ws, token) = &wss[*w];
        let url = format!("{base}/workspaces/{ws}/pending-uploads/{id}/content");
        let token = token.to_string();
        async move {
            let mut resp = http.get(url).bearer_auth(token).send().await.unwrap();
            let mut n = 0;
            while let Some(chunk) = resp.chunk().await.unwrap() {
                n += chunk.len();
            }
            n
        }
    })
    .await;
    lens.iter().sum()
}

/// Where a run's bytes go: the backend, its database, its key prefix.
struct Target {
    backend: String,
    db: String,
    prefix: String,
}

/// One cell: through the service, then straight to the backend, same files and concurrency.
async fn cell(
    svc: &Service,
    http: &reqwest::Client,
    t: &Target,
    (size, files, concurrency): (usize, usize, usize),
    workspaces: usize,
) -> Cell {
    let (backend, db, prefix) = (t.backend.as_str(), t.db.as_str(), t.prefix.as_str());
    let payload = Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let total = size * files;
    let mut wss = Vec::new();
    for _ in 0..workspaces.max(1) {
        wss.push(workspace(http, &svc.base).await);
    }
    svc.reset_peak();
    let started = Instant::now();
    let ids = upload_all(http, &svc.base, &wss, &payload, files, concurrency).await;
    let up = mb_per_s(total, started.elapsed());
    let started = Instant::now();
    assert_eq!(
        download_all(http, &svc.base, &wss, ids, concurrency).await,
        total
    );
    let down = mb_per_s(total, started.elapsed());
    let rss = svc.peak_rss_mib();
    let (direct_up, direct_down) = match backend {
        "bytea" => direct_bytea(db, &payload, files, concurrency).await,
        _ => direct_s3(prefix, &payload, files, concurrency).await,
    };
    // keep the database and bucket small between cells
    let pool = PgPool::connect(db).await.unwrap();
    sqlx::query("UPDATE pending_uploads SET expires_at = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let out = command(db, backend, prefix).arg("sweep").output().unwrap();
    assert!(out.status.success());
    Cell {
        backend: backend.into(),
        size,
        files,
        concurrency,
        up,
        down,
        direct_up,
        direct_down,
        rss,
    }
}

fn print_cells(title: &str, cells: &[Cell]) {
    println!("\n{title}");
    println!("| backend | size | files | conc | upload MB/s service / direct (ratio) | download MB/s service / direct (ratio) | service peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|");
    for c in cells {
        println!(
            "| {} | {} | {} | {} | {:.1} / {:.1} ({:.2}) | {:.1} / {:.1} ({:.2}) | {:.0} |",
            c.backend,
            human(c.size),
            c.files,
            c.concurrency,
            c.up,
            c.direct_up,
            c.up / c.direct_up,
            c.down,
            c.direct_down,
            c.down / c.direct_down,
            c.rss
        );
    }
}

async fn run_cells(
    server: &str,
    backends: &[String],
    grid: &[(usize, usize, usize)],
    workspaces: usize,
) -> Vec<Cell> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let mut cells = Vec::new();
    for backend in backends {
        let t = Target {
            backend: backend.clone(),
            db: fresh_db(server).await,
            prefix: format!("bench-{}/", Uuid::new_v4().simple()),
        };
        let svc = start_service(&t.db, backend, &t.prefix).await;
        for &dims in grid {
            let c = cell(&svc, &http, &t, dims, workspaces).await;
            eprintln!(
                "{backend} {} x{} c{}: up {:.1} MB/s, down {:.1} MB/s",
                human(c.size),
                c.files,
                c.concurrency,
                c.up,
                c.down
            );
            cells.push(c);
        }
        drop(svc);
        drop_db(server, &t.db).await;
    }
    cells
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Runs `requests` concurrently, `concurrency` in flight; returns (p50 ms, p99 ms, req/s).
async fn measure<F, Fut>(requests: usize, concurrency: usize, f: F) -> (f64, f64, f64)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    let mut times: Vec<Duration> = stream::iter(0..requests)
        .map(|i| {
            let fut = f(i);
            async move {
                let t = Instant::now();
                fut.await;
                t.elapsed()
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let rate = requests as f64 / started.elapsed().as_secs_f64();
    times.sort();
    (percentile(&times, 0.5), percentile(&times, 0.99), rate)
}

async fn latency(server: &str) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let db = fresh_db(server).await;
    let svc = start_service(&db, "bytea", "unused/").await;
    let (ws, token) = workspace(&http, &svc.base).await;
    // 2,000 staged files (64 per request), then 100 others left pending in a second workspace
    let mut ids = Vec::new();
    for batch in 0..32 {
        let mut form = reqwest::multipart::Form::new();
        for i in 0..64 {
            form = form.part(
                "files",
                reqwest::multipart::Part::bytes(vec![1u8; 1024])
                    .file_name(format!("{batch}-{i}.txt")),
            );
        }
        let v: Value = http
            .post(format!("{}/workspaces/{ws}/chat/uploads", svc.base))
            .bearer_auth(ADMIN)
            .multipart(form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for f in v["files"].as_array().unwrap() {
            ids.push(
                f["uri"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_string(),
            );
        }
    }
    let feed: Vec<Value> = http
        .get(format!("{}/workspaces/{ws}/activity?limit=500", svc.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cursors: Vec<String> = feed
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let (ws2, token2) = workspace(&http, &svc.base).await;
    let mut form = reqwest::multipart::Form::new();
    for i in 0..64 {
        form = form.part(
            "files",
            reqwest::multipart::Part::bytes(vec![2u8; 1024]).file_name(format!("p{i}.txt")),
        );
    }
    http.post(format!("{}/workspaces/{ws2}/chat/uploads", svc.base))
        .bearer_auth(ADMIN)
        .multipart(form)
        .send()
        .await
        .unwrap();

    let conc = 32;
    let base = svc.base.clone();
    let activity = measure(4000, conc, |i| {
        let req = http
            .get(format!(
                "{base}/workspaces/{ws}/activity?since_id={}&limit=100",
                cursors[i % cursors.len()]
            ))
            .bearer_auth(&token);
        async move {
            assert!(req.send().await.unwrap().status().is_success());
        }
    })
    .await;
    let list = measure(2000, conc, |_| {
        let req = http
            .get(format!("{base}/workspaces/{ws2}/pending-uploads"))
            .bearer_auth(&token2);
        async move {
            assert!(req.send().await.unwrap().status().is_success());
        }
    })
    .await;
    let ack = measure(ids.len(), conc, |i| {
        let req = http
            .post(format!(
                "{base}/workspaces/{ws}/pending-uploads/{}/ack",
                ids[i]
            ))
            .bearer_auth(&token);
        async move {
            assert!(req.send().await.unwrap().status().is_success());
        }
    })
    .await;
    println!("\nAPI latency under load (concurrency {conc}, bytea, workspace-token auth on every request)");
    println!("| request | requests | p50 ms | p99 ms | req/s |");
    println!("|---|---|---|---|---|");
    for (name, n, (p50, p99, rate)) in [
        ("GET activity (since_id, limit 100)", 4000, activity),
        ("GET pending-uploads (64 pending)", 2000, list),
        ("POST ack", ids.len(), ack),
    ] {
        println!("| {name} | {n} | {p50:.1} | {p99:.1} | {rate:.0} |");
    }
    drop(svc);
    drop_db(server, &db).await;
}

async fn maintenance(server: &str, with_s3: bool) {
    println!("\nMaintenance");
    println!("| job | rows | bytes | seconds | rows/s | MB/s |");
    println!("|---|---|---|---|---|---|");
    // sweep: 100,000 expired rows
    let db = fresh_db(server).await;
    assert!(command(&db, "bytea", "unused/")
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
    let out = command(&db, "bytea", "unused/")
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
    assert!(command(&db, "bytea", &prefix)
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
    let out = command(&db, "bytea", &prefix)
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
    assert!(command(&db, "bytea", &prefix)
        .arg("sweep")
        .status()
        .unwrap()
        .success());
    drop_db(server, &db).await;
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if !args.bench {
        println!("suite: run with `cargo bench` or scripts/bench.sh to measure");
        return;
    }
    let server = std::env::var("BENCH_DATABASE_URL")
        .expect("set BENCH_DATABASE_URL (scripts/bench.sh does)");
    let with_s3 = std::env::var("BENCH_S3_ENDPOINT").is_ok();
    let backends: Vec<String> = args
        .backends
        .iter()
        .filter(|b| *b == "bytea" || with_s3)
        .cloned()
        .collect();
    println!(
        "pending-uploads benchmark: {} cores, {} GiB RAM, loopback PostgreSQL{}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m
                .lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok()))
            .map(|kb| kb / 1024 / 1024)
            .unwrap_or(0),
        if with_s3 { " and S3 server" } else { "" }
    );
    let all = args.suite == "all";
    if all || args.suite == "throughput" {
        let cells = run_cells(
            &server,
            &backends,
            &[(args.size, args.files, args.concurrency)],
            args.workspaces,
        )
        .await;
        print_cells(
            &format!("Throughput ({} workspace(s))", args.workspaces.max(1)),
            &cells,
        );
    }
    if all || args.suite == "matrix" {
        let mut grid = Vec::new();
        for (size, files) in [(1024, 2000), (1 << 20, 200), (25 << 20, 24)] {
            for conc in [1, 8, 32] {
                grid.push((size, files, conc));
            }
        }
        let cells = run_cells(&server, &backends, &grid, 1).await;
        print_cells("Throughput matrix", &cells);
    }
    if all || args.suite == "latency" {
        latency(&server).await;
    }
    if all || args.suite == "maintenance" {
        maintenance(&server, with_s3).await;
    }
}

/// Runs `f(0)`, …, `f(n - 1)` with `concurrency` in flight; results in completion order.
async fn concurrently<T, F, Fut>(n: usize, concurrency: usize, f: F) -> Vec<T>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    stream::iter(0..n)
        .map(f)
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// INSERT and SELECT of the same bytes with sqlx (the service's client library).
async fn direct_bytea(db: &str, payload: &Bytes, files: usize, concurrency: usize) -> (f64, f64) {
    let pool = PgPool::connect(db).await.unwrap();
    sqlx::query("DROP TABLE IF EXISTS direct")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE direct (id bigint PRIMARY KEY, content bytea NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("ALTER TABLE direct ALTER COLUMN content SET STORAGE EXTERNAL")
        .execute(&pool)
        .await
        .unwrap();
    let total = payload.len() * files;
    let started = Instant::now();
    concurrently(files, concurrency, |i| {
        let (pool, payload) = (pool.clone(), payload.clone());
        async move {
            sqlx::query("INSERT INTO direct (id, content) VALUES ($1, $2)")
                .bind(i as i64)
                .bind(&payload[..])
                .execute(&pool)
                .await
                .unwrap()
        }
    })
    .await;
    let up = mb_per_s(total, started.elapsed());
    let started = Instant::now();
    let lens = concurrently(files, concurrency, |i| {
        let pool = pool.clone();
        async move {
            let c: Vec<u8> = sqlx::query_scalar("SELECT content FROM direct WHERE id = $1")
                .bind(i as i64)
                .fetch_one(&pool)
                .await
                .unwrap();
            c.len()
        }
    })
    .await;
    assert_eq!(lens.iter().sum::<usize>(), total);
    let down = mb_per_s(total, started.elapsed());
    sqlx::query("DROP TABLE direct")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    (up, down)
}

/// PutObject and GetObject of the same bytes with aws-sdk-s3 (the service's client library).
async fn direct_s3(prefix: &str, payload: &Bytes, files: usize, concurrency: usize) -> (f64, f64) {
    let endpoint = std::env::var("BENCH_S3_ENDPOINT").unwrap();
    let bucket = Arc::new(std::env::var("BENCH_S3_BUCKET").unwrap());
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .load()
        .await;
    let client = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&conf)
            .force_path_style(true)
            .build(),
    );
    let total = payload.len() * files;
    let key = |i: usize| format!("{prefix}direct/{i}");
    let started = Instant::now();
    concurrently(files, concurrency, |i| {
        let put = client
            .put_object()
            .bucket(bucket.as_str())
            .key(key(i))
            .body(ByteStream::from(payload.clone()));
        async move { put.send().await.unwrap() }
    })
    .await;
    let up = mb_per_s(total, started.elapsed());
    let started = Instant::now();
    let lens = concurrently(files, concurrency, |i| {
        let get = client.get_object().bucket(bucket.as_str()).key(key(i));
        async move {
            let mut body = get.send().await.unwrap().body;
            let mut n = 0;
            while let Some(chunk) = body.next().await {
                n += chunk.unwrap().len();
            }
            n
        }
    })
    .await;
    assert_eq!(lens.iter().sum::<usize>(), total);
    let down = mb_per_s(total, started.elapsed());
    concurrently(files, concurrency, |i| {
        let delete = client.delete_object().bucket(bucket.as_str()).key(key(i));
        async move { delete.send().await.is_ok() }
    })
    .await;
    (up, down)
}
