//! The benchmark suite, against real backends (PostgreSQL 15 with pg_stat_statements, and an
//! S3 server), the service run as its release binary. Every suite prints markdown tables on
//! stdout (progress on stderr):
//!
//! - `throughput`: upload/download MB/s through the service next to the direct ceiling (the
//!   fastest client at hand per backend, direction and size, calibrated in the same run), interleaved,
//!   at 1 MiB / 20 MiB / 100 MB × concurrency 1 / 8, with the service's peak RSS;
//! - `roundtrips`: database statements per request (pg_stat_statements);
//! - `small`: 1 KiB uploads/s (one workspace, 8 workspaces) and downloads/s at concurrency 8;
//! - `latency`: p50/p99 at ~1,000 req/s offered (open loop, evenly paced; oha; hey) for the activity poll, pending list,
//!   1 KiB content GET and ack;
//! - `longpoll`: upload-to-poller latency (one replica, two replicas), and 10,000 waiting
//!   pollers (RSS, busy database connections, delivery);
//! - `memory`: peak RSS with 16 × 20 MiB, 4 × 20 MiB and 4 × 100 MB in flight, both ways;
//! - `push`: upload MB/s relayed to a push workspace next to the same uploads sent straight to
//!   it, at the throughput suite's sizes and concurrencies;
//! - `maintenance`: sweep and backfill throughput.
//!
//! `scripts/bench.sh [--suite …] [options]` installs and starts what it needs and runs this
//! with `cargo bench --bench suite`; BENCH_DATABASE_URL, BENCH_S3_ENDPOINT, BENCH_S3_BUCKET,
//! BENCH_PYTHON, BENCH_PSQL, BENCH_AWS_CLI and BENCH_HEY point it at what is already running or
//! installed. Without `--bench` (a plain `cargo test`) it does nothing.

mod direct;
mod harness;
mod latency;
mod longpoll;
mod maintenance;
mod memory;
mod paced;
mod push;
mod roundtrips;
mod small;
mod throughput;
mod wire;

use std::time::{Duration, Instant};

use clap::Parser;
use harness::{parse_size, Env};
use sqlx::{Connection, PgConnection};

const SUITES: &[&str] = &[
    "roundtrips",
    "small",
    "latency",
    "longpoll",
    "memory",
    "throughput",
    "push",
    "maintenance",
];

#[derive(Parser, Debug)]
#[command(about = "pending-uploads benchmark suite (run through scripts/bench.sh)")]
struct Args {
    /// Comma-separated: all, throughput, push, roundtrips, small, latency, longpoll, memory,
    /// maintenance.
    #[arg(long, default_value = "all", value_delimiter = ',')]
    suite: Vec<String>,
    /// Backends for throughput, roundtrips, small and memory (s3 needs BENCH_S3_ENDPOINT).
    #[arg(long, default_value = "bytea,s3", value_delimiter = ',')]
    backends: Vec<String>,
    /// throughput and push: file sizes. The largest is 100 MB (10^8 bytes): a 100 MiB file and its
    /// multipart framing exceed the service's 100 MiB per-request cap, as they would from the
    /// canvas.
    #[arg(long, default_value = "1MiB,20MiB,100MB", value_delimiter = ',', value_parser = parse_size)]
    sizes: Vec<usize>,
    /// throughput and push: requests in flight.
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// throughput and push: bytes each cell moves per direction (files = this / size, at least one per
    /// request in flight, rounded up to a multiple of the concurrency).
    #[arg(long, default_value = "400MiB", value_parser = parse_size)]
    cell_bytes: usize,
    /// throughput and push: a fixed number of files per cell instead (smoke tests).
    #[arg(long)]
    files: Option<usize>,
    /// throughput and push: interleaved rounds per cell (medians reported).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// throughput: workspaces a cell's uploads are spread over, round-robin.
    #[arg(long, default_value_t = 1)]
    workspaces: usize,
    /// throughput: direct clients: `auto` (calibrate, then the fastest), `all` (every
    /// candidate in every cell, the best reported), or client names (comma-separated).
    #[arg(long, default_value = "auto")]
    direct: String,
    /// throughput: calibration cells, SIZE:CONCURRENCY, comma-separated (each cell's fastest
    /// client becomes a ceiling; every one runs in every cell, the best reported).
    #[arg(long, default_value = "1MiB:8,20MiB:8", value_delimiter = ',')]
    calibrate: Vec<String>,
    /// throughput: calibration rounds (each candidate's best counts).
    #[arg(long, default_value_t = 2)]
    calibrate_rounds: usize,
    /// roundtrips: requests per kind.
    #[arg(long, default_value_t = 200)]
    roundtrip_requests: usize,
    /// small: requests per figure.
    #[arg(long, default_value_t = 3000)]
    small_requests: usize,
    /// latency: seconds per route (after the warm-up).
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// latency: warm-up seconds per route.
    #[arg(long, default_value_t = 3)]
    latency_warmup: u64,
    /// latency: offered requests per second.
    #[arg(long, default_value_t = 1024)]
    latency_rate: u64,
    /// latency: hey workers (each offers rate/workers per second), and oha connections.
    #[arg(long, default_value_t = 32)]
    latency_workers: u64,
    /// longpoll: pollers (one per workspace) for the delivery latency.
    #[arg(long, default_value_t = 100)]
    pollers: usize,
    /// longpoll: uploads for the delivery latency.
    #[arg(long, default_value_t = 200)]
    poll_uploads: usize,
    /// longpoll: milliseconds between uploads.
    #[arg(long, default_value_t = 50)]
    poll_interval_ms: u64,
    /// longpoll: waiting pollers on one replica.
    #[arg(long, default_value_t = 10_000)]
    idle_pollers: usize,
    /// longpoll: workspaces the waiting pollers are spread over.
    #[arg(long, default_value_t = 1000)]
    idle_workspaces: usize,
    /// memory: FILESxSIZE cells, all files of a cell in flight at once.
    #[arg(
        long,
        default_value = "16x20MiB,4x20MiB,4x100MB",
        value_delimiter = ','
    )]
    memory: Vec<String>,
    /// throughput, roundtrips, small and latency: also measure this binary (e.g. the build
    /// before a change) in the same run.
    #[arg(long, env = "BENCH_REFERENCE_BIN")]
    reference_bin: Option<String>,
    /// cargo bench passes --bench (checked before parsing).
    #[arg(long, hide = true)]
    #[allow(dead_code)]
    bench: bool,
}

fn size_conc(s: &str) -> (usize, usize) {
    let (size, conc) = s
        .split_once(':')
        .unwrap_or_else(|| panic!("--calibrate {s:?}: want SIZE:CONCURRENCY"));
    (parse_size(size).unwrap(), conc.parse().unwrap())
}

fn files_size(s: &str) -> (usize, usize) {
    let (files, size) = s
        .split_once('x')
        .unwrap_or_else(|| panic!("--memory {s:?}: want FILESxSIZE"));
    (files.parse().unwrap(), parse_size(size).unwrap())
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs this too, with the test harness's arguments: measure
    // only under `cargo bench`, which passes --bench.
    if !std::env::args().any(|a| a == "--bench") {
        println!("suite: run with `cargo bench` or scripts/bench.sh to measure");
        return;
    }
    let args = Args::parse();
    let nofile = harness::raise_nofile();
    let env = Env::from_environment(args.reference_bin.clone());
    let backends: Vec<String> = args
        .backends
        .iter()
        .filter(|b| {
            let ok = *b == "bytea" || env.s3.is_some();
            if !ok {
                eprintln!("skipping backend {b}: no BENCH_S3_ENDPOINT");
            }
            ok
        })
        .cloned()
        .collect();
    let want = |s: &str| args.suite.iter().any(|x| x == s || x == "all");
    for s in &args.suite {
        assert!(
            s == "all" || SUITES.contains(&s.as_str()),
            "unknown suite {s}; one of all, {}",
            SUITES.join(", ")
        );
    }
    header(&env, nofile).await;
    let started = Instant::now();
    let mut times = Vec::new();
    for suite in SUITES.iter().filter(|s| want(s)) {
        let t = Instant::now();
        match *suite {
            "roundtrips" => roundtrips::run(&env, &backends, args.roundtrip_requests).await,
            "small" => small::run(&env, &backends, args.small_requests).await,
            "latency" => {
                latency::run(
                    &env,
                    &latency::Opts {
                        seconds: args.latency_seconds,
                        warmup: args.latency_warmup,
                        rate: args.latency_rate,
                        workers: args.latency_workers,
                    },
                )
                .await
            }
            "longpoll" => {
                let mut idle = args.idle_pollers;
                if (nofile as usize) < idle + 512 {
                    idle = (nofile as usize).saturating_sub(512);
                    eprintln!("open-file limit {nofile}: only {idle} waiting pollers");
                }
                longpoll::run(
                    &env,
                    &longpoll::Opts {
                        pollers: args.pollers,
                        uploads: args.poll_uploads,
                        interval: Duration::from_millis(args.poll_interval_ms),
                        idle_pollers: idle,
                        idle_workspaces: args.idle_workspaces.min(idle.max(1)),
                    },
                )
                .await
            }
            "memory" => {
                let cells: Vec<_> = args.memory.iter().map(|s| files_size(s)).collect();
                memory::run(&env, &backends, &cells).await
            }
            "throughput" => {
                let direct = match args.direct.as_str() {
                    "auto" => throughput::DirectMode::Auto,
                    "all" => throughput::DirectMode::All,
                    names => throughput::DirectMode::Named(
                        names.split(',').map(|s| s.trim().to_string()).collect(),
                    ),
                };
                throughput::run(
                    &env,
                    &throughput::Opts {
                        backends: backends.clone(),
                        sizes: args.sizes.clone(),
                        concurrency: args.concurrency.clone(),
                        cell_bytes: args.cell_bytes,
                        files: args.files,
                        rounds: args.rounds,
                        workspaces: args.workspaces,
                        direct,
                        calibrate: args.calibrate.iter().map(|s| size_conc(s)).collect(),
                        calibrate_rounds: args.calibrate_rounds,
                    },
                )
                .await
            }
            "push" => {
                let files = throughput::Opts::files_rule(args.cell_bytes, args.files);
                push::run(
                    &env,
                    &push::Opts {
                        sizes: args.sizes.clone(),
                        concurrency: args.concurrency.clone(),
                        rounds: args.rounds,
                        files_for: Box::new(files),
                    },
                )
                .await
            }
            "maintenance" => maintenance::run(&env).await,
            _ => unreachable!(),
        }
        times.push((*suite, t.elapsed().as_secs_f64()));
    }
    let total = started.elapsed().as_secs_f64();
    let list: Vec<String> = times.iter().map(|(s, t)| format!("{s} {t:.0} s")).collect();
    println!("\nWall time: {total:.0} s ({}).", list.join(", "));
    let _ = std::fs::remove_dir_all(&env.work_dir);
}

/// What the figures were measured on and with.
async fn header(env: &Env, nofile: u64) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024 / 1024);
    let pg = match PgConnection::connect(&env.server).await {
        Ok(mut c) => sqlx::query_scalar::<_, String>("SELECT version()")
            .fetch_one(&mut c)
            .await
            .unwrap_or_default(),
        Err(e) => panic!("cannot connect to BENCH_DATABASE_URL: {e}"),
    };
    println!("# pending-uploads benchmark\n");
    println!("- machine: {cores} cores, {mem_gib} GiB RAM; everything on loopback; open-file limit {nofile}");
    println!(
        "- service: {} (release){}",
        env.bin,
        std::env::var("BENCH_GIT")
            .map(|g| format!(", built from {g}"))
            .unwrap_or_default()
    );
    if let Some(r) = &env.reference_bin {
        println!("- reference binary (throughput, roundtrips, small, latency): {r}");
    }
    println!("- service settings: {}", harness::service_settings());
    println!("- PostgreSQL: {}", pg.split(" on ").next().unwrap_or(&pg));
    println!(
        "- S3: {}",
        env.s3
            .as_ref()
            .map_or("none (s3 backend skipped)".to_string(), |(e, b)| format!(
                "{e}, bucket {b}{}",
                std::env::var("BENCH_S3_SERVER")
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default()
            ))
    );
    if let Some(py) = &env.python {
        let out = std::process::Command::new(py)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/direct.py"))
            .arg("versions")
            .output();
        if let Ok(o) = out {
            println!(
                "- direct clients (python): {}",
                String::from_utf8_lossy(&o.stdout).trim()
            );
        }
    } else {
        println!("- direct clients: Rust only (no BENCH_PYTHON: psycopg, psql, boto3 and the AWS CLI are not tried)");
    }
    println!(
        "- psql: {}; AWS CLI: {}; hey: {}",
        env.psql.as_deref().unwrap_or("none"),
        env.aws_cli.as_deref().unwrap_or("none"),
        env.hey.as_deref().unwrap_or("none")
    );
}
