//! What every suite shares: the environment the bench was given, the service as a child
//! process (its peak RSS, its settings), throwaway databases, workspaces, uploads and
//! downloads through the service, and the small statistics helpers.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{future::join_all, stream, StreamExt};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

pub const ADMIN: &str = "bench-admin-token";

/// Settings the bench gives every service it starts unless the caller's environment sets
/// them: quotas out of the way of long runs, per-workspace upload slots above every
/// concurrency the suites use (uploads at concurrency 8 and 16 go to one workspace), no sweep
/// during a measurement.
pub const SERVICE_DEFAULTS: &[(&str, &str)] = &[
    ("MAX_PENDING_BYTES_PER_WORKSPACE", "1099511627776"),
    ("MAX_PENDING_FILES_PER_WORKSPACE", "100000000"),
    ("MAX_CONCURRENT_UPLOADS", "256"),
    ("MAX_CONCURRENT_UPLOADS_PER_WORKSPACE", "64"),
    ("SWEEP_INTERVAL", "1h"),
    ("RUST_LOG", "warn"),
    ("LOG_FORMAT", "text"),
];

/// The backends and tools scripts/bench.sh prepared (or the caller pointed at).
pub struct Env {
    /// A PostgreSQL server URL where databases may be created (BENCH_DATABASE_URL).
    pub server: String,
    /// S3 endpoint and bucket (BENCH_S3_ENDPOINT, BENCH_S3_BUCKET), if any.
    pub s3: Option<(String, String)>,
    /// The service binary under test, and an optional reference binary ("today's").
    pub bin: String,
    pub reference_bin: Option<String>,
    /// Service logs, spool files, scratch.
    pub work_dir: PathBuf,
    /// Direct clients: the bench virtualenv's python (psycopg, boto3), psql, the AWS CLI.
    pub python: Option<String>,
    pub psql: Option<String>,
    pub aws_cli: Option<String>,
    pub hey: Option<String>,
    /// oha: an open-loop generator that counts latency from when a request was due.
    pub oha: Option<String>,
}

impl Env {
    pub fn from_environment(reference_bin: Option<String>) -> Env {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let work_dir = var("BENCH_WORK_DIR").map(PathBuf::from).unwrap_or_else(|| {
            std::env::temp_dir().join(format!("pending-uploads-bench-{}", std::process::id()))
        });
        std::fs::create_dir_all(work_dir.join("spool")).expect("create the bench work dir");
        Env {
            server: var("BENCH_DATABASE_URL")
                .expect("set BENCH_DATABASE_URL (scripts/bench.sh does)"),
            s3: var("BENCH_S3_ENDPOINT").map(|e| {
                (
                    e,
                    var("BENCH_S3_BUCKET").expect("BENCH_S3_BUCKET goes with BENCH_S3_ENDPOINT"),
                )
            }),
            bin: env!("CARGO_BIN_EXE_pending-uploads").to_string(),
            reference_bin,
            work_dir,
            python: var("BENCH_PYTHON"),
            psql: var("BENCH_PSQL").or_else(|| which("psql")),
            aws_cli: var("BENCH_AWS_CLI"),
            hey: var("BENCH_HEY").or_else(|| which("hey")),
            oha: var("BENCH_OHA").or_else(|| which("oha")),
        }
    }
}

pub fn which(name: &str) -> Option<String> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
            .map(|p| p.display().to_string())
    })
}

/// A service process; killed when dropped.
pub struct Service {
    child: Child,
    pub base: String,
    pub log: PathBuf,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a service is started with.
pub struct Spec<'a> {
    pub bin: &'a str,
    pub db: &'a str,
    pub backend: &'a str,
    pub prefix: &'a str,
    pub extra: &'a [(&'a str, &'a str)],
}

impl Service {
    pub async fn start(env: &Env, spec: Spec<'_>) -> Service {
        let port = free_port();
        let log = env.work_dir.join(format!("service-{port}.log"));
        let mut cmd = base_command(env, spec.bin, spec.db, spec.backend, spec.prefix);
        cmd.env("BIND_ADDR", format!("127.0.0.1:{port}"))
            .env("ADMIN_TOKEN", ADMIN)
            .env("SPOOL_DIR", env.work_dir.join("spool"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the service log"));
        for (k, v) in spec.extra {
            cmd.env(k, v);
        }
        die_with_the_bench(&mut cmd);
        let mut svc = Service {
            child: cmd.spawn().expect("start the service"),
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        let client = reqwest::Client::new();
        for _ in 0..600 {
            if client
                .get(format!("{}/readyz", svc.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return svc;
            }
            if let Ok(Some(status)) = svc.child.try_wait() {
                panic!(
                    "the service exited ({status}) before it was ready; log:\n{}",
                    std::fs::read_to_string(&svc.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("service did not become ready; log in {}", svc.log.display());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn status_mib(&self, field: &str) -> f64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }

    /// Peak resident set size since the last reset (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        self.status_mib("VmHWM:")
    }

    /// Resident set size now (VmRSS), in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.status_mib("VmRSS:")
    }

    /// CPU time the service process has used (user + system), in ms.
    pub fn cpu_ms(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // The fields after the command name, which may itself hold spaces: state is field 3,
        // utime and stime are fields 14 and 15.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let field = |n: usize| {
            after
                .split_whitespace()
                .nth(n - 3)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        (field(14) + field(15)) * 1000.0 / clock_ticks()
    }

    /// Resets VmHWM to the current RSS (Linux `clear_refs` 5).
    pub fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5");
    }
}

/// Has `cmd`'s process killed when the bench's thread that starts it goes (an interrupted
/// bench, which drops nothing): its services otherwise outlived it, idle, on their ports.
pub fn die_with_the_bench(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// The whole machine's busy CPU time since boot, in ms (`/proc/stat`: user, nice, system, irq
/// and softirq; not idle, iowait or steal): the service, PostgreSQL, LocalStack, the direct
/// clients and this bench alike.
pub fn machine_cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let busy = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| ticks.get(i).copied().unwrap_or(f64::NAN))
        .sum::<f64>();
    busy * 1000.0 / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a constant of the system's.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// The binary with the database, backend and S3 settings, and the bench's defaults where the
/// caller's environment does not set them (a subcommand or a server).
pub fn base_command(env: &Env, bin: &str, db: &str, backend: &str, prefix: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env("DATABASE_URL", db)
        .env("PENDING_UPLOADS_BACKEND", backend)
        .env("PENDING_UPLOADS_S3_PREFIX", prefix)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in SERVICE_DEFAULTS {
        if std::env::var_os(k).is_none() {
            cmd.env(k, v);
        }
    }
    if let Some((endpoint, bucket)) = &env.s3 {
        cmd.env("PENDING_UPLOADS_S3_BUCKET", bucket)
            .env("AWS_ENDPOINT_URL", endpoint);
    }
    cmd
}

/// The settings a service runs with in this bench, for the report's header.
pub fn service_settings() -> String {
    SERVICE_DEFAULTS
        .iter()
        .map(|(k, v)| {
            let v = std::env::var(k).unwrap_or_else(|_| v.to_string());
            format!("{k}={v}")
        })
        .chain(
            ["DATABASE_MAX_CONNECTIONS", "PENDING_UPLOADS_S3_CHECKSUM"]
                .iter()
                .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}"))),
        )
        .collect::<Vec<_>>()
        .join(" ")
}

/// Expires every row of `db` and runs one sweep (rows and their objects go), so cells do not
/// pile data up.
pub async fn sweep_all(env: &Env, bin: &str, db: &str, backend: &str, prefix: &str) {
    let mut c = PgConnection::connect(db).await.unwrap();
    sqlx::query("UPDATE pending_uploads SET expires_at = now() - interval '1 second'")
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    let mut sweep = tokio::process::Command::from(base_command(env, bin, db, backend, prefix));
    let out = sweep.arg("sweep").output().await.unwrap();
    assert!(out.status.success(), "sweep failed");
}

/// Brings the database to the same state before every measured phase, whoever moves the bytes:
/// what earlier phases deleted (the service's swept rows, hundreds of MiB of TOAST) is
/// vacuumed now instead of by autovacuum during whichever phase comes next, and dirty pages
/// are written out now instead of by a checkpoint in the middle of one. The direct table is
/// dropped and created again before each direct upload; without this the service's uploads
/// alone went into a table full of dead rows while autovacuum cleaned it.
pub async fn settle(db: &str) {
    let mut c = PgConnection::connect(db).await.unwrap();
    sqlx::query("VACUUM").execute(&mut c).await.unwrap();
    // CHECKPOINT needs superuser or pg_checkpoint: without either the phases still get the
    // vacuum.
    let _ = sqlx::query("CHECKPOINT").execute(&mut c).await;
    c.close().await.unwrap();
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn fresh_db(server: &str) -> String {
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

pub fn db_name(db: &str) -> &str {
    db.rsplit('/').next().unwrap()
}

pub async fn drop_db(server: &str, db: &str) {
    let mut conn = PgConnection::connect(server).await.unwrap();
    let _ = sqlx::query(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        db_name(db)
    ))
    .execute(&mut conn)
    .await;
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .build()
        .unwrap()
}

/// A poll workspace: its id and its own token (downloads, acks and polls use it; uploads use
/// the admin token, as the canvas does).
#[derive(Clone)]
pub struct Ws {
    pub id: String,
    pub token: String,
}

pub async fn workspace(http: &reqwest::Client, base: &str) -> Ws {
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
    Ws {
        id: ws["id"].as_str().unwrap().to_string(),
        token: ws["auth_token"].as_str().unwrap().to_string(),
    }
}

pub async fn workspaces(http: &reqwest::Client, base: &str, n: usize) -> Vec<Ws> {
    concurrently(n, 8, |_| workspace(http, base)).await
}

/// The bench's payload: byte i is i % 251 (the direct clients send the same).
pub fn payload(size: usize) -> Bytes {
    Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

/// One multipart upload of one file, as the canvas sends it; returns the file id.
pub async fn upload(
    http: &reqwest::Client,
    base: &str,
    ws: &str,
    payload: &Bytes,
    name: &str,
) -> String {
    let part = reqwest::multipart::Part::stream_with_length(
        reqwest::Body::from(payload.clone()),
        payload.len() as u64,
    )
    .file_name(name.to_string())
    .mime_str("application/octet-stream")
    .unwrap();
    let resp = http
        .post(format!("{base}/workspaces/{ws}/chat/uploads"))
        .bearer_auth(ADMIN)
        .multipart(reqwest::multipart::Form::new().part("files", part))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    assert!(status.is_success(), "upload: {status} {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    file_id(&v["files"][0])
}

/// The file id of an upload answer's entry (`platform-pending:<ws>/<file>`).
pub fn file_id(entry: &Value) -> String {
    entry["uri"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string()
}

/// `GET {base}/workspaces/{ws}/{path}` with the workspace's token; a non-2xx panics.
pub async fn ws_get(http: &reqwest::Client, base: &str, ws: &Ws, path: &str) -> reqwest::Response {
    let resp = http
        .get(format!("{base}/workspaces/{}/{path}", ws.id))
        .bearer_auth(&ws.token)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
    resp
}

/// The rows of `GET …/activity?{query}` (newest first unless `since_id` is given).
pub async fn activity(http: &reqwest::Client, base: &str, ws: &Ws, query: &str) -> Vec<Value> {
    ws_get(http, base, ws, &format!("activity?{query}"))
        .await
        .json()
        .await
        .unwrap()
}

/// GET content, read fully; returns the bytes read.
pub async fn download(http: &reqwest::Client, base: &str, ws: &Ws, id: &str) -> usize {
    let mut resp = ws_get(http, base, ws, &format!("pending-uploads/{id}/content")).await;
    let mut n = 0;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        n += chunk.len();
    }
    n
}

pub async fn ack(http: &reqwest::Client, base: &str, ws: &Ws, id: &str) {
    let resp = http
        .post(format!(
            "{base}/workspaces/{}/pending-uploads/{id}/ack",
            ws.id
        ))
        .bearer_auth(&ws.token)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "ack: {}", resp.status());
}

/// Uploads `files` copies of `payload` with `concurrency` in flight, file `i` to workspace
/// `i % wss.len()`; returns (workspace index, file id) pairs.
pub async fn upload_all(
    http: &reqwest::Client,
    base: &str,
    wss: &[Ws],
    payload: &Bytes,
    files: usize,
    concurrency: usize,
) -> Vec<(usize, String)> {
    concurrently(files, concurrency, |i| {
        upload_nth(http, base, wss, payload, i)
    })
    .await
}

/// Uploads file `i` (`f{i}.bin`) to workspace `i % wss.len()`; returns that index and the file
/// id.
pub async fn upload_nth(
    http: &reqwest::Client,
    base: &str,
    wss: &[Ws],
    payload: &Bytes,
    i: usize,
) -> (usize, String) {
    let w = i % wss.len();
    (
        w,
        upload(http, base, &wss[w].id, payload, &format!("f{i}.bin")).await,
    )
}

/// Downloads every file with `concurrency` in flight; returns the bytes read.
pub async fn download_all(
    http: &reqwest::Client,
    base: &str,
    wss: &[Ws],
    ids: &[(usize, String)],
    concurrency: usize,
) -> usize {
    concurrently(ids.len(), concurrency, |i| {
        let (w, id) = &ids[i];
        download(http, base, &wss[*w], id)
    })
    .await
    .iter()
    .sum()
}

/// Runs `f(0)`, …, `f(n - 1)` with `concurrency` in flight; results in completion order.
pub async fn concurrently<T, F, Fut>(n: usize, concurrency: usize, f: F) -> Vec<T>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    stream::iter(0..n)
        .map(f)
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await
}

/// Runs `work(lane.clone(), i)` for `i` in `0..n` over `concurrency` lanes, each lane with a
/// client and connection of its own (`setup`, which opens it), on a thread per core: the
/// lanes are dealt out to at most as many OS threads as the machine has cores, each with a
/// current-thread runtime, so a transfer's reads, writes and wake-ups stay on one thread.
/// The clock starts once every lane is set up.
///
/// Before, one multi-threaded runtime drove every transfer and handed chunks between its
/// threads: one 100 MB download through the service read 344–359 MB/s with reqwest so (7 of 8
/// runs; one 431) and 427–478 with reqwest on a thread of its own (curl: 357–480), an S3
/// download's ratio set by the bench's client rather than by the service. A thread per lane
/// instead (as benches/direct.py runs its clients) made the eight lanes of a 1 MiB cell
/// contend for the two cores: S3 1 MiB x 8 downloads through the service 141 MB/s against 167.
pub async fn in_lanes<S, T, SetupFut, WorkFut>(
    n: usize,
    concurrency: usize,
    setup: impl Fn() -> SetupFut + Sync,
    work: impl Fn(S, usize) -> WorkFut + Sync,
) -> Lanes<T>
where
    S: Clone,
    SetupFut: std::future::Future<Output = S>,
    WorkFut: std::future::Future<Output = T>,
    T: Send,
{
    let lanes = concurrency.clamp(1, n.max(1));
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let threads = lanes.min(cores);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let ready = std::sync::Barrier::new(threads + 1);
    let (next, ready, setup, work) = (&next, &ready, &setup, &work);
    let lane = move |state: S| async move {
        let mut out = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= n {
                return out;
            }
            out.push(work(state.clone(), i).await);
        }
    };
    tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    // lanes t, t + threads, …
                    let mine = (t..lanes).step_by(threads).count();
                    scope.spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap();
                        let mut arrival = Arrival(Some(ready));
                        rt.block_on(async {
                            let states = join_all((0..mine).map(|_| setup())).await;
                            arrival.arrive();
                            join_all(states.into_iter().map(lane)).await
                        })
                    })
                })
                .collect();
            ready.wait();
            let (started, cpu) = (Instant::now(), machine_cpu_ms());
            let out: Vec<T> = handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .flatten()
                .collect();
            Lanes {
                out,
                secs: started.elapsed().as_secs_f64(),
                machine_cpu_ms: machine_cpu_ms() - cpu,
            }
        })
    })
}

/// A lane thread's place at [`in_lanes`]' start: taken when its lanes are set up, or when a
/// set-up panics (on drop), so the other threads and the clock do not wait for it forever and
/// the panic reaches the caller through `join`.
struct Arrival<'a>(Option<&'a std::sync::Barrier>);

impl Arrival<'_> {
    fn arrive(&mut self) {
        if let Some(barrier) = self.0.take() {
            barrier.wait();
        }
    }
}

impl Drop for Arrival<'_> {
    fn drop(&mut self) {
        self.arrive();
    }
}

/// What [`in_lanes`] did: each call's result (grouped by lane, not in the order of `i`), and
/// the seconds and the whole machine's busy CPU ms from the start of the clock to the last
/// lane's end.
pub struct Lanes<T> {
    pub out: Vec<T>,
    pub secs: f64,
    pub machine_cpu_ms: f64,
}

/// A lane's HTTP client for the service, its connection open (`in_lanes`).
pub async fn lane_http(base: &str) -> reqwest::Client {
    let http = http_client();
    let status = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "healthz: {status}");
    http
}

/// Times `f`; returns its output and the seconds it took.
pub async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, f64) {
    let started = Instant::now();
    let out = f.await;
    (out, started.elapsed().as_secs_f64())
}

pub fn mb_per_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

pub fn human(size: usize) -> String {
    match size {
        s if s >= 1 << 20 && s % (1 << 20) == 0 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 && s % (1 << 10) == 0 => format!("{} KiB", s >> 10),
        s if s >= 1_000_000 && s % 1_000_000 == 0 => format!("{} MB", s / 1_000_000),
        s => format!("{s} B"),
    }
}

/// `1024`, `1KiB`, `20MiB`, `1GiB` (also KB/MB = 1000-based).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    let n: usize = n.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1000,
        "mb" => 1_000_000,
        _ => return Err(format!("bad size unit in {s:?}")),
    };
    Ok(n * mult)
}

/// The head of an HTTP/1.1 answer read so far.
pub struct Head {
    /// Bytes of the head, blank line included.
    pub len: usize,
    pub status: u16,
    pub body_len: usize,
    /// `Connection: close`: the connection ends with this answer.
    pub close: bool,
    /// `Transfer-Encoding: chunked` (answers over 16 KiB stream): `body_len` is only known
    /// once the last chunk is in.
    pub chunked: bool,
}

/// Parses an answer's head once `buf` holds all of it (the bench's raw clients).
fn response_head(buf: &[u8]) -> Option<Head> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let field = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    Some(Head {
        len: end + 4,
        status: head.split_whitespace().nth(1)?.parse().ok()?,
        body_len: field("content-length:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        close: field("connection:") == Some("close"),
        chunked: field("transfer-encoding:") == Some("chunked"),
    })
}

/// The head of the answer in `buf` once `buf` holds all of it, body included (Content-Length,
/// or a chunked body's last chunk).
pub fn whole_response(buf: &[u8]) -> Option<Head> {
    let head = response_head(buf)?;
    if head.chunked {
        let body_len = chunked_len(&buf[head.len..])?;
        return Some(Head { body_len, ..head });
    }
    (buf.len() >= head.len + head.body_len).then_some(head)
}

/// The length of a whole chunked body at the start of `body` (its last chunk and the blank
/// line after it included; no trailers), or `None` while it is not all there.
fn chunked_len(body: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let line_end = at + body[at..].windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[at..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        at = line_end + 2 + size + 2;
        if body.len() < at {
            return None;
        }
        if size == 0 {
            return Some(at);
        }
    }
}

/// The value at quantile `p` of sorted milliseconds (nearest rank).
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    quantile(&xs, 0.5)
}

/// Raises this process's open-file limit to its hard limit (the long-poll suite holds 10,000
/// sockets; services started afterwards inherit it).
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur as u64
}
