//! The ceilings: the same bytes sent straight to the backend, by every client at hand, at the
//! same concurrency, every response read fully. Rust clients run here (sqlx, aws-sdk-s3 with
//! the service's settings and tuned); psycopg, psql, boto3 and the AWS CLI run in
//! benches/direct.py. `calibrate` runs each candidate on calibration cells and picks the
//! fastest per backend and direction.

use std::{sync::Arc, time::Instant};

use aws_sdk_s3::{
    config::{RequestChecksumCalculation, ResponseChecksumValidation},
    primitives::ByteStream,
};
use bytes::Bytes;
use sqlx::{postgres::PgPoolOptions, PgPool};

use crate::harness::{concurrently, human, machine_cpu_ms, mb_per_s, Env};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dir {
    Up,
    Down,
}

impl Dir {
    pub fn as_str(self) -> &'static str {
        match self {
            Dir::Up => "upload",
            Dir::Down => "download",
        }
    }
}

/// One way of moving the bytes straight to a backend.
#[derive(Clone, Debug)]
pub struct Client {
    pub name: &'static str,
    kind: Kind,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Sqlx,
    /// aws-sdk-s3; `tuned` turns optional checksums off (no CRC32 computed or verified).
    Sdk {
        tuned: bool,
    },
    /// benches/direct.py with this `--client`.
    Python(&'static str),
}

/// Every client that can run here for this backend and direction.
pub fn candidates(env: &Env, backend: &str, dir: Dir) -> Vec<Client> {
    let py = |name: &'static str, client: &'static str| Client {
        name,
        kind: Kind::Python(client),
    };
    let mut out = Vec::new();
    match (backend, dir) {
        ("bytea", Dir::Up) => {
            out.push(Client {
                name: "sqlx INSERT",
                kind: Kind::Sqlx,
            });
            if env.python.is_some() {
                out.push(py("psycopg INSERT (binary param)", "psycopg-insert"));
                out.push(py("psycopg COPY FROM STDIN (binary)", "psycopg-copy"));
            }
            if env.python.is_some() && env.psql.is_some() {
                out.push(py("psql \\copy (binary)", "psql-copy"));
            }
        }
        ("bytea", Dir::Down) => {
            out.push(Client {
                name: "sqlx SELECT",
                kind: Kind::Sqlx,
            });
            if env.python.is_some() {
                out.push(py("psycopg SELECT (binary result)", "psycopg-select"));
                out.push(py("psycopg COPY TO STDOUT (binary)", "psycopg-copy"));
            }
            if env.python.is_some() && env.psql.is_some() {
                out.push(py("psql \\copy (binary)", "psql-copy"));
            }
        }
        (_, dir) => {
            out.push(Client {
                name: "aws-sdk-s3 (SDK default checksums: CRC32 trailer)",
                kind: Kind::Sdk { tuned: false },
            });
            out.push(Client {
                name: "aws-sdk-s3 (no optional checksums)",
                kind: Kind::Sdk { tuned: true },
            });
            if env.python.is_some() {
                out.push(match dir {
                    Dir::Up => py("boto3 put_object", "boto3-put"),
                    Dir::Down => py("boto3 get_object", "boto3-get"),
                });
                out.push(py(
                    "boto3 transfer manager (8 MiB parts x 10)",
                    "boto3-transfer",
                ));
            }
            if env.python.is_some() && env.aws_cli.is_some() {
                out.push(py("AWS CLI s3 cp --recursive", "aws-cli"));
            }
        }
    }
    out
}

/// Picks clients by the names given with `--direct` (matching either the display name or the
/// direct.py client name).
pub fn by_name(env: &Env, backend: &str, dir: Dir, names: &[String]) -> Vec<Client> {
    candidates(env, backend, dir)
        .into_iter()
        .filter(|c| {
            names.iter().any(|n| {
                c.name.eq_ignore_ascii_case(n)
                    || matches!(c.kind, Kind::Python(p) if p == n)
                    || (n == "sqlx" && matches!(c.kind, Kind::Sqlx))
                    || (n == "aws-sdk-s3" && matches!(c.kind, Kind::Sdk { tuned: false }))
                    || (n == "aws-sdk-s3-tuned" && matches!(c.kind, Kind::Sdk { tuned: true }))
            })
        })
        .collect()
}

/// Where the direct bytes go: a table `direct` (ids 1..N) in the run's database, or keys
/// `<prefix>direct/0..N` in the bucket.
pub struct Target {
    pub backend: String,
    pub db: String,
    pub key_prefix: String,
}

impl Target {
    /// Empties the destination before an upload (psql's rows take their ids from the
    /// identity, which restarts at 1).
    pub async fn reset(&self) {
        if self.backend != "bytea" {
            return; // keys are overwritten
        }
        let pool = PgPool::connect(&self.db).await.unwrap();
        for q in [
            "DROP TABLE IF EXISTS direct",
            "CREATE TABLE direct (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, content bytea NOT NULL)",
            // as pending_uploads.content: uncompressed TOAST, no compression attempt
            "ALTER TABLE direct ALTER COLUMN content SET STORAGE EXTERNAL",
        ] {
            sqlx::query(q).execute(&pool).await.unwrap();
        }
        pool.close().await;
    }

    /// Writes the files with the Rust client (sqlx, aws-sdk-s3): what the downloads read when
    /// the chosen upload client failed.
    pub async fn fill(&self, env: &Env, payload: &Bytes, files: usize, concurrency: usize) {
        self.reset().await;
        let rust = Client {
            name: "fill",
            kind: if self.backend == "bytea" {
                Kind::Sqlx
            } else {
                Kind::Sdk { tuned: false }
            },
        };
        run(env, &rust, self, Dir::Up, payload, files, concurrency)
            .await
            .expect("the Rust client writes the direct files");
    }

    /// Removes what the direct transfers left.
    pub async fn cleanup(&self, env: &Env, files: usize) {
        if self.backend == "bytea" {
            let pool = PgPool::connect(&self.db).await.unwrap();
            sqlx::query("DROP TABLE IF EXISTS direct")
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
            return;
        }
        let (client, bucket) = s3_client(env, false).await;
        concurrently(files, 16, |i| {
            let delete = client
                .delete_object()
                .bucket(bucket.as_str())
                .key(format!("{}{i}", self.key_prefix));
            async move { delete.send().await.is_ok() }
        })
        .await;
    }
}

/// A direct transfer: its rate, and the whole machine's busy CPU time over its timed window
/// (the backend's, the client's and the kernel's alike).
#[derive(Clone, Copy, Debug)]
pub struct Moved {
    pub mb_per_s: f64,
    pub cpu_ms: f64,
}

/// One direct transfer of `files` x `size` bytes at `concurrency`, or why it failed.
pub async fn run(
    env: &Env,
    client: &Client,
    t: &Target,
    dir: Dir,
    payload: &Bytes,
    files: usize,
    concurrency: usize,
) -> Result<Moved, String> {
    match client.kind {
        Kind::Sqlx => Ok(sqlx_run(&t.db, dir, payload, files, concurrency).await),
        Kind::Sdk { tuned } => {
            Ok(sdk_run(env, tuned, &t.key_prefix, dir, payload, files, concurrency).await)
        }
        Kind::Python(name) => {
            python_run(env, name, t, dir, payload.len(), files, concurrency).await
        }
    }
}

async fn sqlx_run(db: &str, dir: Dir, payload: &Bytes, files: usize, concurrency: usize) -> Moved {
    let pool = PgPoolOptions::new()
        .max_connections(concurrency as u32)
        .connect(db)
        .await
        .unwrap();
    // every lane's connection is open before the clock starts
    let held = concurrently(concurrency, concurrency, |_| pool.acquire()).await;
    drop(held);
    let total = payload.len() * files;
    let (started, cpu) = (Instant::now(), machine_cpu_ms());
    match dir {
        Dir::Up => {
            concurrently(files, concurrency, |i| {
                let pool = &pool;
                async move {
                    sqlx::query("INSERT INTO direct (id, content) VALUES ($1, $2)")
                        .bind(i as i64 + 1)
                        .bind(&payload[..])
                        .execute(pool)
                        .await
                        .unwrap()
                }
            })
            .await;
        }
        Dir::Down => {
            let lens = concurrently(files, concurrency, |i| {
                let pool = &pool;
                async move {
                    let c: Vec<u8> = sqlx::query_scalar("SELECT content FROM direct WHERE id = $1")
                        .bind(i as i64 + 1)
                        .fetch_one(pool)
                        .await
                        .unwrap();
                    c.len()
                }
            })
            .await;
            assert_eq!(lens.iter().sum::<usize>(), total);
        }
    }
    let moved = Moved {
        mb_per_s: mb_per_s(total, started.elapsed().as_secs_f64()),
        cpu_ms: machine_cpu_ms() - cpu,
    };
    pool.close().await;
    moved
}

async fn s3_client(env: &Env, tuned: bool) -> (aws_sdk_s3::Client, Arc<String>) {
    let (endpoint, bucket) = env.s3.clone().expect("S3 endpoint");
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .load()
        .await;
    let mut b = aws_sdk_s3::config::Builder::from(&conf).force_path_style(true);
    if tuned {
        b = b
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    }
    (aws_sdk_s3::Client::from_conf(b.build()), Arc::new(bucket))
}

async fn sdk_run(
    env: &Env,
    tuned: bool,
    prefix: &str,
    dir: Dir,
    payload: &Bytes,
    files: usize,
    concurrency: usize,
) -> Moved {
    let (client, bucket) = s3_client(env, tuned).await;
    // a connection per lane before the clock starts
    concurrently(concurrency, concurrency, |_| {
        client.head_bucket().bucket(bucket.as_str()).send()
    })
    .await;
    let total = payload.len() * files;
    let key = |i: usize| format!("{prefix}{i}");
    let (started, cpu) = (Instant::now(), machine_cpu_ms());
    match dir {
        Dir::Up => {
            concurrently(files, concurrency, |i| {
                let put = client
                    .put_object()
                    .bucket(bucket.as_str())
                    .key(key(i))
                    .body(ByteStream::from(payload.clone()));
                async move { put.send().await.unwrap() }
            })
            .await;
        }
        Dir::Down => {
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
        }
    }
    Moved {
        mb_per_s: mb_per_s(total, started.elapsed().as_secs_f64()),
        cpu_ms: machine_cpu_ms() - cpu,
    }
}

async fn python_run(
    env: &Env,
    client: &str,
    t: &Target,
    dir: Dir,
    size: usize,
    files: usize,
    concurrency: usize,
) -> Result<Moved, String> {
    let python = env.python.as_deref().ok_or("no BENCH_PYTHON")?;
    let op = match (t.backend.as_str(), dir) {
        ("bytea", Dir::Up) => "pg-up",
        ("bytea", Dir::Down) => "pg-down",
        (_, Dir::Up) => "s3-up",
        (_, Dir::Down) => "s3-down",
    };
    let mut cmd = tokio::process::Command::new(python);
    // glibc's default thresholds map every buffer of 128 KiB or more fresh and unmap it when
    // freed (its dynamic threshold stops at 32 MiB), so each 1 MiB value a client receives
    // costs it page faults: psycopg read a 1 MiB row in 1.6-1.8 ms with them and in 0.9-1.0
    // ms with these (the service has its own allocator tuning, PostgreSQL raised thresholds
    // too: scripts/pg.sh). 32 MiB is the largest threshold glibc takes (a larger one is
    // ignored).
    cmd.env("MALLOC_MMAP_THRESHOLD_", "33554432")
        .env("MALLOC_TRIM_THRESHOLD_", "67108864");
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/direct.py"))
        .args([op, "--client", client])
        .args(["--size", &size.to_string()])
        .args(["--files", &files.to_string()])
        .args(["--concurrency", &concurrency.to_string()]);
    if t.backend == "bytea" {
        cmd.args(["--dsn", &t.db, "--table", "direct"]);
        if let Some(psql) = &env.psql {
            cmd.args(["--psql", psql]);
        }
    } else {
        let (endpoint, bucket) = env.s3.as_ref().ok_or("no S3")?;
        cmd.args(["--endpoint", endpoint, "--bucket", bucket])
            .args(["--prefix", &t.key_prefix]);
        if let Some(aws) = &env.aws_cli {
            cmd.args(["--aws", aws]);
        }
    }
    let out = cmd.output().await.map_err(|e| e.to_string())?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(format!("{client} failed: {last}"));
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.lines().last().unwrap_or(""))
        .map_err(|e| format!("{client}: unreadable answer {line:?}: {e}"))?;
    let (secs, bytes) = (v["seconds"].as_f64(), v["bytes"].as_u64());
    let cpu_ms = v["cpu_ms"].as_f64().unwrap_or(f64::NAN);
    match (secs, bytes) {
        (Some(s), Some(b)) if b as usize == size * files => Ok(Moved {
            mb_per_s: mb_per_s(b as usize, s),
            cpu_ms,
        }),
        _ => Err(format!(
            "{client}: moved {bytes:?} bytes, expected {}",
            size * files
        )),
    }
}

/// The clients a backend's direct cells use, per direction.
pub struct Chosen {
    pub up: Vec<Client>,
    pub down: Vec<Client>,
}

/// One calibration measurement: client, direction, cell, MB/s or error.
pub struct Trial {
    pub client: &'static str,
    pub dir: Dir,
    pub cell: (usize, usize),
    pub rate: Result<f64, String>,
}

/// Runs every candidate on each calibration cell, `rounds` times (the order reversed every
/// other round, so no candidate always goes first), uploads then downloads (of what the last
/// successful upload wrote), and picks, per direction, each cell's fastest client (by its
/// best rate). Every pick then runs in every throughput cell and the best is reported.
pub async fn calibrate(
    env: &Env,
    t: &Target,
    cells: &[(usize, usize)],
    rounds: usize,
    files_for: impl Fn(usize, usize) -> usize,
) -> (Chosen, Vec<Trial>) {
    let mut trials = Vec::new();
    for &(size, conc) in cells {
        let files = files_for(size, conc);
        let payload = crate::harness::payload(size);
        for round in 0..rounds.max(1) {
            // whether the table/keys hold every file (the last upload candidate succeeded)
            let mut written = false;
            for dir in [Dir::Up, Dir::Down] {
                let mut order = candidates(env, &t.backend, dir);
                if round % 2 == 1 {
                    order.reverse();
                }
                for c in order {
                    if dir == Dir::Up {
                        t.reset().await;
                    }
                    crate::harness::settle(&t.db).await;
                    let rate = run(env, &c, t, dir, &payload, files, conc)
                        .await
                        .map(|m| m.mb_per_s);
                    if dir == Dir::Up {
                        written = rate.is_ok();
                    }
                    eprintln!(
                        "  calibrate {} {} {} x{files} c{conc}: {}: {}",
                        t.backend,
                        dir.as_str(),
                        human(size),
                        c.name,
                        match &rate {
                            Ok(r) => format!("{r:.1} MB/s"),
                            Err(e) => e.clone(),
                        }
                    );
                    trials.push(Trial {
                        client: c.name,
                        dir,
                        cell: (size, conc),
                        rate,
                    });
                }
                if dir == Dir::Up && !written {
                    t.fill(env, &payload, files, conc).await;
                    written = true;
                }
            }
        }
        t.cleanup(env, files).await;
    }
    // Every cell's fastest client, per direction: at 1 MiB an INSERT beats the COPY that wins
    // at 20 MiB, and a ceiling must be the fastest client at each size.
    let pick = |dir: Dir| -> Vec<Client> {
        let all = candidates(env, &t.backend, dir);
        let mut winners: Vec<Client> = Vec::new();
        for &cell in cells {
            let fastest = all
                .iter()
                .filter_map(|c| best_of(&trials, dir, cell, c.name).map(|rate| (c, rate)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((c, _)) = fastest {
                if !winners.iter().any(|w| w.name == c.name) {
                    winners.push(c.clone());
                }
            }
        }
        winners
    };
    (
        Chosen {
            up: pick(Dir::Up),
            down: pick(Dir::Down),
        },
        trials,
    )
}

/// A client's best rate in a cell over the calibration rounds.
fn best_of(trials: &[Trial], dir: Dir, cell: (usize, usize), name: &str) -> Option<f64> {
    trials
        .iter()
        .filter(|x| x.dir == dir && x.cell == cell && x.client == name)
        .filter_map(|x| x.rate.as_ref().ok().copied())
        .reduce(f64::max)
}

/// The calibration's table: every candidate's best MB/s per cell, the winner marked.
pub fn print_calibration(
    backend: &str,
    cells: &[(usize, usize)],
    rounds: usize,
    trials: &[Trial],
    chosen: &Chosen,
) {
    println!(
        "\nDirect-client calibration, {backend} (each candidate moves the cell's files, best of {rounds} rounds; each cell's fastest becomes a ceiling, and every throughput cell reports the best of them):\n"
    );
    let heads: Vec<String> = cells
        .iter()
        .map(|&(s, c)| format!("{} x c{c} MB/s", human(s)))
        .collect();
    println!("| direction | client | {} | chosen |", heads.join(" | "));
    println!("|---|---|{}---|", "---|".repeat(cells.len()));
    for dir in [Dir::Up, Dir::Down] {
        let winners = match dir {
            Dir::Up => &chosen.up,
            Dir::Down => &chosen.down,
        };
        let mut names: Vec<&str> = Vec::new();
        for t in trials.iter().filter(|t| t.dir == dir) {
            if !names.contains(&t.client) {
                names.push(t.client);
            }
        }
        for name in names {
            let figures: Vec<String> = cells
                .iter()
                .map(|&cell| match best_of(trials, dir, cell, name) {
                    Some(r) => format!("{r:.1}"),
                    None => match trials
                        .iter()
                        .find(|t| t.dir == dir && t.cell == cell && t.client == name)
                        .map(|t| &t.rate)
                    {
                        Some(Err(e)) => format!("failed ({})", e.replace('|', "/")),
                        _ => "-".into(),
                    },
                })
                .collect();
            let won = winners.iter().any(|w| w.name == name);
            println!(
                "| {} | {name} | {} | {} |",
                dir.as_str(),
                figures.join(" | "),
                if won { "**yes**" } else { "" }
            );
        }
    }
}
