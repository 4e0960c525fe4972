//! Real processes for the chaos scenarios: a throwaway PostgreSQL 15 cluster, s3s-fs, the
//! service binary, HAProxy. Every process is started on a free loopback port, its output goes
//! to a log file in the scenario's scratch folder, and it is stopped by its own PID when its
//! handle drops (also when a scenario fails half way).

use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use sqlx::{postgres::PgPoolOptions, PgPool};

pub const ADMIN: &str = "chaos-admin-token-0123456789";
/// DEPENDENCY_TIMEOUT of every service in the suite (keeps faults short).
pub const DEP_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEP_TIMEOUT_ENV: &str = "2s";
pub const BUCKET: &str = "chaos";
pub const PREFIX: &str = "chaos-uploads/";
pub const S3_ACCESS_KEY: &str = "chaos-access";
pub const S3_SECRET_KEY: &str = "chaos-secret-key-0123";

const BIN: &str = env!("CARGO_BIN_EXE_pending-uploads");

pub use crate::ports::free_port;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Sends a signal to one process we started.
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with a PID of a child this test started.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// The last `lines` lines of a log file (for failure messages).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A scenario's scratch folder; traversable by the `postgres` user. Removed at the end
/// unless `CHAOS_KEEP` is set (then its path is printed, logs included).
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("pu-chaos-{name}-"))
            .tempdir()
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        Scratch { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    pub fn sub(&self, name: &str) -> PathBuf {
        let p = self.path().join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("CHAOS_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                println!("CHAOS_KEEP: scratch kept at {}", dir.keep().display());
            }
        }
    }
}

// ---------------------------------------------------------------- PostgreSQL

fn pg_bindir() -> PathBuf {
    let preferred = PathBuf::from("/usr/lib/postgresql/15/bin");
    if preferred.join("initdb").exists() {
        return preferred;
    }
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for e in entries.flatten() {
            let bin = e.path().join("bin");
            if bin.join("initdb").exists() {
                return bin;
            }
        }
    }
    panic!("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (apt-get install -y postgresql)");
}

/// A command run as the `postgres` user when we are root (initdb and postgres refuse root).
fn as_pg(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Runs a command to its end (at most 60 s), failing the test with its output unless it
/// succeeded; returns its stdout. Output goes to unnamed files, not pipes: a server it starts
/// (pg_ctl) keeps its inherited descriptors open, and a pipe would never reach EOF.
fn run(cmd: &mut Command, what: &str) -> String {
    use std::io::{Read, Seek};
    let mut out = tempfile::tempfile().unwrap();
    let mut err = tempfile::tempfile().unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |f: &mut fs::File| {
        let mut text = String::new();
        f.rewind().unwrap();
        let _ = f.read_to_string(&mut text);
        text
    };
    let (stdout, stderr) = (read(&mut out), read(&mut err));
    match status {
        Some(s) if s.success() => stdout,
        Some(s) => panic!("{what} failed ({s}):\n{stdout}\n{stderr}"),
        None => panic!("{what} did not finish within 60 s:\n{stdout}\n{stderr}"),
    }
}

/// Unmounts a filesystem a scenario mounted (lazily when it is still busy).
pub fn unmount(dir: &Path) {
    let ok = Command::new("umount")
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = Command::new("umount").arg("-l").arg(dir).status();
    }
}

/// A throwaway PostgreSQL cluster of the scenario.
pub struct Pg {
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
}

impl Pg {
    pub fn start(scratch: &Scratch) -> Pg {
        let bin = pg_bindir();
        let dir = scratch.sub("pg");
        if is_root() {
            run(
                Command::new("chown").args(["-R", "postgres"]).arg(&dir),
                "chown pg dir",
            );
        }
        run(
            as_pg(&bin.join("initdb"))
                .arg("-D")
                .arg(dir.join("data"))
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ]),
            "initdb",
        );
        let pg = Pg {
            bin,
            dir,
            port: free_port(),
        };
        pg.ctl_start();
        pg
    }

    fn ctl(&self) -> Command {
        let mut c = as_pg(&self.bin.join("pg_ctl"));
        c.arg("-D").arg(self.dir.join("data"));
        c
    }

    fn options(&self) -> String {
        format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300",
            self.port,
            self.dir.display()
        )
    }

    fn ctl_start(&self) {
        run(
            self.ctl().arg("-l").arg(self.dir.join("server.log")).args([
                "-w",
                "-t",
                "30",
                "-o",
                &self.options(),
                "start",
            ]),
            "pg_ctl start",
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl restart -m fast`: every session is cut, the server is back when this returns.
    pub fn restart_fast(&self) {
        run(
            self.ctl().arg("-l").arg(self.dir.join("server.log")).args([
                "restart",
                "-m",
                "fast",
                "-w",
                "-t",
                "30",
                "-o",
                &self.options(),
            ]),
            "pg_ctl restart",
        );
    }

    /// `pg_ctl stop -m fast`: the server is down until `start_again`.
    pub fn stop_fast(&self) {
        run(
            self.ctl().args(["stop", "-m", "fast", "-w", "-t", "30"]),
            "pg_ctl stop",
        );
    }

    pub fn start_again(&self) {
        self.ctl_start();
    }

    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.url())
            .await
            .expect("connect to the chaos cluster")
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = self
            .ctl()
            .args(["stop", "-m", "immediate", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// ---------------------------------------------------------------- s3s-fs

/// The s3s-fs binary (`CHAOS_S3S_FS`, set by scripts/chaos.sh): the suite fails without it.
pub fn s3s_fs_bin() -> PathBuf {
    let path = std::env::var("CHAOS_S3S_FS").unwrap_or_else(|_| {
        panic!(
            "CHAOS_S3S_FS is not set: the chaos suite needs s3s-fs 0.14.1 \
             (scripts/chaos.sh builds it into ~/.cache/pending-uploads/s3s-fs-0.14.1 and sets it)"
        )
    });
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "CHAOS_S3S_FS={} is not a file (scripts/chaos.sh builds it)",
        path.display()
    );
    path
}

/// An s3s-fs server over a folder of the scenario, with the bucket created.
pub struct S3s {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    pub port: u16,
    child: Option<Child>,
    starts: u32,
}

impl S3s {
    pub async fn start(scratch: &Scratch) -> S3s {
        let data = scratch.sub("s3");
        fs::create_dir_all(data.join(BUCKET)).unwrap();
        let mut s = S3s {
            bin: s3s_fs_bin(),
            data,
            log: scratch.path().join("s3s-fs.log"),
            port: free_port(),
            child: None,
            starts: 0,
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        self.starts += 1;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(&self.bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(&self.data)
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start s3s-fs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not listen on {}: {}",
                self.port,
                tail(&self.log, 20)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The file s3s-fs keeps an object of the bucket in.
    pub fn data_path(&self, key: &str) -> PathBuf {
        self.data.join(BUCKET).join(key)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("s3s-fs running").id()
    }

    /// SIGSTOP: the socket still accepts connections, nothing answers.
    pub fn freeze(&self) {
        signal(self.pid(), libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        signal(self.pid(), libc::SIGCONT);
    }

    /// SIGKILL: connections are refused until `restart`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and folder.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// An S3 client of the test itself (listing the bucket), independent of the service.
    pub fn client(&self) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .endpoint_url(self.endpoint())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                S3_ACCESS_KEY,
                S3_SECRET_KEY,
                None,
                None,
                "chaos",
            ))
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    /// Every key under the service's prefix but its marker.
    pub async fn keys(&self) -> Vec<String> {
        let client = self.client();
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = client
                .list_objects_v2()
                .bucket(BUCKET)
                .prefix(PREFIX)
                .set_continuation_token(token.clone())
                .send()
                .await
                .expect("list the chaos bucket");
            // The prefix's marker (which deployment it is) is no upload's object.
            let marker = format!("{PREFIX}.deployment");
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_string))
                    .filter(|k| *k != marker),
            );
            token = page.next_continuation_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        keys
    }
}

impl Drop for S3s {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            signal(c.id(), libc::SIGCONT);
        }
        self.kill();
    }
}

// ---------------------------------------------------------------- the service

/// How one service process is configured (everything reaches it through its environment).
#[derive(Clone)]
pub struct ServiceConfig {
    pub db_url: String,
    /// bytea, dual or s3.
    pub mode: &'static str,
    /// The S3 endpoint, for dual and s3.
    pub s3_endpoint: Option<String>,
    pub spool_dir: PathBuf,
    pub env: Vec<(String, String)>,
}

impl ServiceConfig {
    pub fn new(db_url: &str, spool_dir: PathBuf) -> ServiceConfig {
        ServiceConfig {
            db_url: db_url.to_string(),
            mode: "bytea",
            s3_endpoint: None,
            spool_dir,
            env: Vec::new(),
        }
    }

    pub fn s3(mut self, mode: &'static str, s3: &S3s) -> ServiceConfig {
        self.mode = mode;
        self.s3_endpoint = Some(s3.endpoint());
        self
    }

    pub fn with(mut self, key: &str, value: &str) -> ServiceConfig {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// The binary with a clean environment: only this configuration reaches it.
    fn command(&self, sub: &str) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg(sub)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &self.db_url)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info,sqlx=warn")
            .env("DEPENDENCY_TIMEOUT", DEP_TIMEOUT_ENV)
            .env("PENDING_UPLOADS_BACKEND", self.mode)
            .env("PENDING_UPLOADS_S3_BUCKET", BUCKET)
            .env("PENDING_UPLOADS_S3_PREFIX", PREFIX)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
            .env("SPOOL_DIR", &self.spool_dir);
        if let Some(endpoint) = &self.s3_endpoint {
            cmd.env("AWS_ENDPOINT_URL", endpoint);
        }
        if let Ok(checksum) = std::env::var("CHAOS_S3_CHECKSUM") {
            cmd.env("PENDING_UPLOADS_S3_CHECKSUM", checksum);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// One `sweep` pass with ORPHAN_GRACE=0 (every object without a row goes); its JSON report.
    pub fn sweep(&self) -> Value {
        let stdout = run(
            self.command("sweep").env("ORPHAN_GRACE", "0"),
            "pending-uploads sweep",
        );
        serde_json::from_str(&stdout)
            .unwrap_or_else(|_| panic!("sweep printed no JSON report: {stdout}"))
    }
}

/// A `serve` process.
pub struct Service {
    pub config: ServiceConfig,
    pub port: u16,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Service {
    /// Starts `serve` on a free port; ready (`/readyz` 200) when this returns.
    pub async fn start(config: ServiceConfig, log: PathBuf) -> Service {
        let mut s = Service {
            config,
            port: free_port(),
            log,
            child: None,
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = self
            .config
            .command("serve")
            .env("BIND_ADDR", format!("127.0.0.1:{}", self.port))
            .env("ADMIN_TOKEN", ADMIN)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the service");
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30)).await;
    }

    pub async fn wait_ready(&mut self, within: Duration) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "service exited ({status}) before it was ready:\n{}",
                    tail(&self.log, 30)
                );
            }
            if client
                .get(format!("{}/readyz", self.base()))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "service not ready on port {} within {within:?}:\n{}",
                self.port,
                tail(&self.log, 30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One series of its `/metrics` (name with labels, as exposed), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.base()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, no warning.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// The JSON log lines written so far.
    pub fn log_lines(&self) -> Vec<Value> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Log lines that show a bug rather than a fault: panics, 5xx other than 503.
    pub fn bug_lines(&self) -> Vec<String> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|l| {
                l.contains("panicked")
                    || serde_json::from_str::<Value>(l).is_ok_and(|v| {
                        let status = v["status"].as_u64().unwrap_or(0);
                        status >= 500 && status != 503
                    })
            })
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------- HAProxy

/// The haproxy binary from PATH; installed with apt-get when missing (as scripts/chaos.sh
/// does); a clear failure when that is impossible.
pub fn haproxy_bin() -> PathBuf {
    fn find() -> Option<PathBuf> {
        std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .chain(["/usr/sbin", "/usr/local/sbin"])
            .map(|d| Path::new(d).join("haproxy"))
            .find(|p| p.is_file())
    }
    if let Some(p) = find() {
        return p;
    }
    let install = || {
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "-o",
                "DPkg::Lock::Timeout=300",
                "haproxy",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get").args(["update", "-q"]).status();
        install();
    }
    find().unwrap_or_else(|| {
        panic!("haproxy is not installed and `apt-get install -y haproxy` failed: install HAProxy (Debian package haproxy) and put it on PATH")
    })
}

/// HAProxy in front of some replicas, health-checking `/readyz`.
pub struct Haproxy {
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
}

impl Haproxy {
    pub async fn start(scratch: &Scratch, backends: &[u16]) -> Haproxy {
        let bin = haproxy_bin();
        let port = free_port();
        let mut cfg = format!(
            "global\n  maxconn 2000\n\n\
             defaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n  \
             timeout http-request 30s\n  timeout check 2s\n  retries 2\n  option redispatch\n\n\
             frontend chaos\n  bind 127.0.0.1:{port}\n  default_backend replicas\n\n\
             backend replicas\n  balance roundrobin\n  option httpchk GET /readyz\n  \
             default-server inter 300ms fall 2 rise 2\n"
        );
        for (i, p) in backends.iter().enumerate() {
            cfg.push_str(&format!("  server r{i} 127.0.0.1:{p} check\n"));
        }
        let cfg_path = scratch.path().join("haproxy.cfg");
        fs::File::create(&cfg_path)
            .unwrap()
            .write_all(cfg.as_bytes())
            .unwrap();
        run(
            Command::new(&bin).arg("-c").arg("-f").arg(&cfg_path),
            "haproxy -c",
        );
        let log = scratch.path().join("haproxy.log");
        let out = fs::File::create(&log).unwrap();
        let child = Command::new(&bin)
            .arg("-db")
            .arg("-f")
            .arg(&cfg_path)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start haproxy");
        let h = Haproxy {
            child: Some(child),
            port,
            log,
        };
        // Ready when every backend passed its health check: requests through it succeed.
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut ok_in_a_row = 0;
        while ok_in_a_row < backends.len() * 2 {
            let up = client
                .get(format!("{}/readyz", h.base()))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            ok_in_a_row = if up { ok_in_a_row + 1 } else { 0 };
            assert!(
                Instant::now() < deadline,
                "haproxy not passing requests:\n{}",
                tail(&h.log, 20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        h
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------- the spool

/// Files left in a spool folder, plus descriptors a live process holds into it (unnamed
/// O_TMPFILE spools show up only there, as `<dir>/#inode (deleted)`).
pub fn spool_leaks(dir: &Path, pid: Option<u32>) -> (usize, usize) {
    let entries = fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let open = pid.map_or(0, |pid| {
        let prefix = dir.to_string_lossy().to_string();
        fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
                    .filter(|t| t.to_string_lossy().starts_with(&prefix))
                    .count()
            })
            .unwrap_or(0)
    });
    (entries, open)
}

/// Waits (bounded) until nothing is left in the spool: requests still finishing may hold a
/// spool for a moment after the load stops.
pub async fn settled_spool_leaks(dir: &Path, pid: Option<u32>, within: Duration) -> (usize, usize) {
    let deadline = Instant::now() + within;
    loop {
        let leaks = spool_leaks(dir, pid);
        if leaks == (0, 0) || Instant::now() >= deadline {
            return leaks;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs a scenario with a deadline: a hang fails the test (and drops, so stops, every
/// process the scenario started) instead of holding the suite. Prints the scenario's wall
/// time (set-up and checks included) however it ends.
pub async fn bounded(name: &str, limit: Duration, scenario: impl std::future::Future<Output = ()>) {
    struct Timer<'a>(&'a str, Instant);
    impl Drop for Timer<'_> {
        fn drop(&mut self) {
            println!(
                "CHAOS-TIME {}: {:.1}s",
                self.0,
                self.1.elapsed().as_secs_f64()
            );
        }
    }
    let _timer = Timer(name, Instant::now());
    if tokio::time::timeout(limit, scenario).await.is_err() {
        panic!("scenario {name} did not finish within {limit:?}: something hangs");
    }
}
