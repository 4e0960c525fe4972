//! Test harness: one fresh database per test (cloned from a migrated template), the real
//! service on a loopback port, and helpers that speak the HTTP API as clients do.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use pending_uploads::{
    app,
    cli::{Cli, Command},
    config::ServeArgs,
    http,
    sweep::Sweeper,
};
use reqwest::{multipart, Method, StatusCode};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::OnceCell;
use uuid::Uuid;

pub const ADMIN: &str = "test-admin-token-0123456789";

/// The server's base URL (a server where tests may create databases).
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .expect("set TEST_DATABASE_URL (scripts/test.sh starts a PostgreSQL and sets it)")
}

fn db_url(name: &str) -> String {
    let base = server_url();
    let (prefix, rest) = base.rsplit_once('/').expect("database URL has a path");
    let query = rest
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!("{prefix}/{name}{query}")
}

static TEMPLATE: OnceCell<String> = OnceCell::const_new();

/// A migrated template database, created once per test run (guarded across test processes
/// by an advisory lock) and named for the migrations it holds.
async fn template() -> String {
    TEMPLATE
        .get_or_init(|| async {
            let mut digest = 0u64;
            for m in pending_uploads::db::MIGRATOR.iter() {
                for b in m.checksum.iter() {
                    digest = digest.wrapping_mul(31).wrapping_add(*b as u64);
                }
            }
            let name = format!("pu_template_{digest:016x}");
            let mut admin = PgConnection::connect(&server_url())
                .await
                .expect("connect to test server");
            sqlx::query("SELECT pg_advisory_lock(727274)")
                .execute(&mut admin)
                .await
                .unwrap();
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                    .bind(&name)
                    .fetch_one(&mut admin)
                    .await
                    .unwrap();
            if !exists {
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut admin)
                    .await
                    .unwrap();
                let mut conn = PgConnection::connect(&db_url(&name)).await.unwrap();
                pending_uploads::db::MIGRATOR
                    .run(&mut conn)
                    .await
                    .expect("migrate template");
                conn.close().await.unwrap();
            }
            drop_stale_test_dbs(&mut admin).await;
            sqlx::query("SELECT pg_advisory_unlock(727274)")
                .execute(&mut admin)
                .await
                .unwrap();
            admin.close().await.unwrap();
            name
        })
        .await
        .clone()
}

/// A per-test database name that carries its creation time, so a later run can drop it.
fn test_db_name() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    format!("pu_test_{now}_{}", Uuid::new_v4().simple())
}

/// Per-test databases are not dropped when their test ends (no async drop); against a
/// long-lived server (`TEST_DATABASE_URL`) each run drops those over an hour old instead.
async fn drop_stale_test_dbs(admin: &mut PgConnection) {
    let cutoff = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3600;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'pu\\_test\\_%'",
    )
    .fetch_all(&mut *admin)
    .await
    .unwrap();
    for name in names {
        let created = name
            .strip_prefix("pu_test_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        if created.is_some_and(|secs| secs < cutoff) {
            // Best effort: a database still in use stays for the next run.
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                .execute(&mut *admin)
                .await;
        }
    }
}

/// A fresh, migrated database for one test.
pub async fn fresh_db() -> String {
    let template = template().await;
    let name = test_db_name();
    let mut admin = PgConnection::connect(&server_url()).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
        .execute(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    db_url(&name)
}

/// The `serve` configuration of a test app: its database and spool directory, the admin
/// token, loopback allowed as a push target (unless `extra` says otherwise), then `extra`.
pub fn serve_args(db_url: &str, spool_dir: &std::path::Path, extra: &[&str]) -> ServeArgs {
    let mut argv: Vec<String> = [
        "pending-uploads",
        "serve",
        "--database-url",
        db_url,
        "--database-max-connections",
        "8",
        "--bind-addr",
        "127.0.0.1:0",
        "--spool-dir",
        spool_dir.to_str().unwrap(),
        "--ack-retention",
        "1h",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !extra.contains(&"--admin-token") {
        argv.extend(["--admin-token".to_string(), ADMIN.to_string()]);
    }
    // The push tests' fake workspaces listen on loopback, which SPEC refuses as a push
    // target unless allowed (attack tests run the binary without this).
    if !extra.contains(&"--push-allowed-networks") {
        argv.extend([
            "--push-allowed-networks".to_string(),
            "127.0.0.0/8".to_string(),
        ]);
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    let Some(Command::Serve(args)) = Cli::try_parse_from(argv).expect("valid test flags").command
    else {
        panic!("not serve")
    };
    *args
}

pub struct TestApp {
    pub url: String,
    pub db_url: String,
    pub pool: PgPool,
    pub client: reqwest::Client,
    pub sweeper: Sweeper,
    pub spool_dir: PathBuf,
    pub storage: pending_uploads::storage::Storage,
    _spool: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
    /// The long polls' LISTEN connection, as `serve` holds it.
    listen: tokio::task::JoinHandle<()>,
    /// fetched_at stamps and long-poll announcements, written as `serve` writes them.
    _batches: app::Batches,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
        self.listen.abort();
    }
}

impl TestApp {
    pub async fn start() -> TestApp {
        Self::start_with(&[]).await
    }

    /// Starts the service with extra `serve` flags (e.g. `["--max-files-per-request", "2"]`).
    pub async fn start_with(extra: &[&str]) -> TestApp {
        let db_url = fresh_db().await;
        Self::start_on(db_url, extra).await
    }

    pub async fn start_on(db_url: String, extra: &[&str]) -> TestApp {
        let spool = tempfile::tempdir().unwrap();
        let spool_dir = spool.path().to_path_buf();
        let args = serve_args(&db_url, &spool_dir, extra);
        let service = app::build(&args).await.expect("service builds");
        let batches = app::Batches::start(&service.state);
        let pool = service.state.db.pool().clone();
        let listen = tokio::spawn(
            service
                .state
                .hub
                .clone()
                .listen_forever(pool.clone(), service.state.db.timeout()),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let router = service.router.clone();
        let opts = app::serve_options(&args, Duration::from_secs(1));
        let server = tokio::spawn(async move {
            http::serve(
                listener,
                router,
                std::future::pending(),
                std::future::pending(),
                opts,
            )
            .await
            .unwrap();
        });
        TestApp {
            url,
            db_url,
            pool,
            client: reqwest::Client::new(),
            sweeper: service.sweeper,
            storage: service.state.storage.clone(),
            spool_dir,
            _spool: spool,
            server,
            listen,
            _batches: batches,
        }
    }

    pub fn at(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    /// Creates a workspace as the admin; returns (id, token).
    pub async fn workspace(&self, mode: &str, url: Option<&str>) -> (Uuid, String) {
        let mut body = json!({"name": "test ws", "delivery_mode": mode});
        if let Some(u) = url {
            body["url"] = json!(u);
        }
        let resp = self
            .client
            .post(self.at("/workspaces"))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let v: Value = resp.json().await.unwrap();
        (
            v["id"].as_str().unwrap().parse().unwrap(),
            v["auth_token"].as_str().unwrap().to_string(),
        )
    }

    pub async fn poll_workspace(&self) -> (Uuid, String) {
        self.workspace("poll", None).await
    }

    /// Uploads files as the canvas does: (filename, content type, bytes).
    pub async fn upload(
        &self,
        ws: Uuid,
        token: &str,
        files: &[(&str, &str, Vec<u8>)],
    ) -> reqwest::Response {
        let mut form = multipart::Form::new();
        for (name, ct, bytes) in files {
            let part = multipart::Part::bytes(bytes.clone())
                .file_name(name.to_string())
                .mime_str(ct)
                .unwrap();
            form = form.part("files", part);
        }
        self.client
            .post(self.at(&format!("/workspaces/{ws}/chat/uploads")))
            .bearer_auth(token)
            .multipart(form)
            .send()
            .await
            .unwrap()
    }

    /// Uploads and returns the `files` entries of a 200.
    pub async fn upload_ok(
        &self,
        ws: Uuid,
        token: &str,
        files: &[(&str, &str, Vec<u8>)],
    ) -> Vec<Value> {
        let resp = self.upload(ws, token, files).await;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        body["files"].as_array().unwrap().clone()
    }

    /// One request with the bearer, as a client sends it.
    pub async fn send(&self, method: Method, path: &str, token: &str) -> reqwest::Response {
        self.client
            .request(method, self.at(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.send(Method::GET, path, token).await
    }

    pub async fn post(&self, path: &str, token: &str) -> reqwest::Response {
        self.send(Method::POST, path, token).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> reqwest::Response {
        self.send(Method::DELETE, path, token).await
    }

    /// `GET /uploads/limits` (public).
    pub async fn limits(&self) -> Value {
        let resp = self
            .client
            .get(self.at("/uploads/limits"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json().await.unwrap()
    }

    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Nothing staged: no upload row, no activity row, no open spool file.
    pub async fn assert_nothing_staged(&self) {
        assert_eq!(
            self.count("pending_uploads").await,
            0,
            "pending_uploads rows left"
        );
        assert_eq!(self.count("activity_logs").await, 0, "activity rows left");
        assert_eq!(
            open_spool_files(&self.spool_dir),
            0,
            "spool files still open"
        );
    }
}

/// File handles this process holds open inside `dir` (unnamed spool files show up as
/// `<dir>/#inode (deleted)`).
pub fn open_spool_files(dir: &std::path::Path) -> usize {
    files_open_in("self", dir)
}

/// 64 files of about 40 KB (`f<i>.bin`) uploaded to workspace `ws` in one request to the
/// service at `addr` (process `pid`, spooling to `dir`) with `bearer`: the body is held back
/// by its last 200 bytes until every earlier file is on disk, and then sent; every file must
/// come back byte for byte. The spool files the service held open meanwhile.
pub async fn sixty_four_files_held(
    addr: &str,
    ws: Uuid,
    bearer: &str,
    pid: &str,
    dir: &std::path::Path,
) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let files: Vec<Vec<u8>> = (0..64).map(|i| bytes(40_000 + i, i as u8)).collect();
    let mut body = Vec::new();
    for (i, data) in files.iter().enumerate() {
        let head = format!(
            "--XB\r\nContent-Disposition: form-data; name=\"files\"; filename=\"f{i}.bin\"\r\n\r\n"
        );
        body.extend_from_slice(head.as_bytes());
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--XB--\r\n");
    let head = format!(
        "POST /workspaces/{ws}/chat/uploads HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\n\
         Content-Type: multipart/form-data; boundary=XB\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let mut held = tokio::net::TcpStream::connect(addr).await.unwrap();
    held.write_all(head.as_bytes()).await.unwrap();
    let (sent, rest) = body.split_at(body.len() - 200);
    held.write_all(sent).await.unwrap();
    eventually("a file spooled", Duration::from_secs(10), || {
        let open = files_open_in(pid, dir);
        async move { open > 0 }
    })
    .await;
    // All but the last 200 bytes are on the socket: a moment, and every file is on disk.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let open = files_open_in(pid, dir);
    held.write_all(rest).await.unwrap();
    let mut raw = Vec::new();
    held.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    let answer: Value = serde_json::from_str(raw.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let staged = answer["files"].as_array().unwrap();
    assert_eq!(staged.len(), 64);
    let client = reqwest::Client::new();
    for (entry, data) in staged.iter().zip(&files) {
        let fid = file_id(entry);
        let got = downloaded(&client, &format!("http://{addr}"), ws, fid, bearer).await;
        assert!(got == data[..], "{} came back changed", entry["name"]);
    }
    open
}

/// The body of `GET {base}/workspaces/{ws}/pending-uploads/{fid}/content` with `bearer`.
pub async fn downloaded(
    client: &reqwest::Client,
    base: &str,
    ws: Uuid,
    fid: Uuid,
    bearer: &str,
) -> bytes::Bytes {
    client
        .get(format!(
            "{base}/workspaces/{ws}/pending-uploads/{fid}/content"
        ))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
}

/// A connection of `pool` holding workspace `ws`'s lock (the one its commits take) until
/// [`WorkspaceLock::release`]. A session lock: dropped without it, the connection goes back
/// to the pool still holding it.
pub async fn hold_workspace_lock(pool: &sqlx::PgPool, ws: Uuid) -> WorkspaceLock {
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(pending_uploads_lock_key($1))")
        .bind(ws)
        .execute(&mut *conn)
        .await
        .unwrap();
    WorkspaceLock(conn)
}

pub struct WorkspaceLock(sqlx::pool::PoolConnection<sqlx::Postgres>);

impl WorkspaceLock {
    pub async fn release(mut self) {
        sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut *self.0)
            .await
            .unwrap();
    }
}

/// File handles process `pid` (or `self`) holds open inside `dir`.
pub fn files_open_in(pid: &str, dir: &std::path::Path) -> usize {
    let prefix = dir.to_string_lossy().to_string();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with(&prefix))
        .count()
}

/// Asserts status and JSON body exactly.
pub async fn assert_json(resp: reqwest::Response, status: StatusCode, body: Value) {
    let got_status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(got_status, status, "body: {text}");
    let got: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    assert_eq!(got, body);
}

/// SPEC §3's 503 while the database cannot answer.
pub async fn assert_platform_unavailable(resp: reqwest::Response) {
    assert_retry_later(
        resp,
        StatusCode::SERVICE_UNAVAILABLE,
        "5",
        json!({"error": "platform datastore unavailable — retry shortly", "code": "platform_unavailable"}),
    )
    .await;
}

/// SPEC §10's 503 when an upload cannot be spooled.
pub async fn assert_spool_unavailable(resp: reqwest::Response) {
    assert_retry_later(
        resp,
        StatusCode::SERVICE_UNAVAILABLE,
        "5",
        json!({"error": "upload spool unavailable — retry shortly", "code": "spool_unavailable"}),
    )
    .await;
}

/// A refusal to retry later: status, `Retry-After` and the exact JSON body.
pub async fn assert_retry_later(
    resp: reqwest::Response,
    status: StatusCode,
    retry_after: &str,
    body: Value,
) {
    assert_eq!(resp.headers()["retry-after"], retry_after);
    assert_json(resp, status, body).await;
}

/// Asserts status and a body that is exactly `{"error": error}`.
pub async fn assert_error(resp: reqwest::Response, status: StatusCode, error: &str) {
    assert_json(resp, status, json!({ "error": error })).await;
}

/// Named byte buffers as `upload` parts, all `application/octet-stream`.
pub fn octet_parts(files: &[(String, Vec<u8>)]) -> Vec<(&str, &str, Vec<u8>)> {
    files
        .iter()
        .map(|(n, b)| (n.as_str(), "application/octet-stream", b.clone()))
        .collect()
}

/// Deterministic test bytes.
pub fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The file_id out of a `platform-pending:<ws>/<file>` URI.
pub fn file_id(entry: &Value) -> Uuid {
    entry["uri"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A fresh database with no schema at all.
pub async fn empty_db() -> String {
    let name = test_db_name();
    let mut admin = PgConnection::connect(&server_url()).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    db_url(&name)
}

/// The S3 server the tests use (scripts/test.sh starts LocalStack, then s3s-fs).
pub fn s3_endpoint() -> (String, String) {
    let endpoint = std::env::var("TEST_S3_ENDPOINT")
        .expect("set TEST_S3_ENDPOINT and TEST_S3_BUCKET (scripts/test.sh starts an S3 server and sets them)");
    let bucket = std::env::var("TEST_S3_BUCKET").expect("set TEST_S3_BUCKET");
    (endpoint, bucket)
}

/// A plain S3 client of the test server (the tests' own view of the bucket).
pub fn s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::new()
            .behavior_version_latest()
            .endpoint_url(endpoint)
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                std::env::var("AWS_ACCESS_KEY_ID").unwrap(),
                std::env::var("AWS_SECRET_ACCESS_KEY").unwrap(),
                None,
                None,
                "test",
            ))
            .build(),
    )
}

/// `serve` flags for an S3-capable app writing in `mode`, under `prefix`, at `endpoint`.
pub fn s3_flags(mode: &str, prefix: &str, endpoint: &str) -> Vec<String> {
    let (_, bucket) = s3_endpoint();
    let mut flags: Vec<String> = [
        "--pending-uploads-backend",
        mode,
        "--s3-bucket",
        &bucket,
        "--s3-prefix",
        prefix,
        "--aws-endpoint-url",
        endpoint,
        "--aws-region",
        "us-east-1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Ok(checksum) = std::env::var("TEST_S3_CHECKSUM") {
        flags.extend(["--s3-checksum".to_string(), checksum]);
    }
    flags
}

impl TestApp {
    /// An app on `db_url` writing in `mode` to the test bucket under `prefix`.
    pub async fn start_s3(db_url: String, mode: &str, prefix: &str) -> TestApp {
        let (endpoint, _) = s3_endpoint();
        Self::start_s3_at(db_url, mode, prefix, &endpoint).await
    }

    pub async fn start_s3_at(db_url: String, mode: &str, prefix: &str, endpoint: &str) -> TestApp {
        let flags = s3_flags(mode, prefix, endpoint);
        let flags: Vec<&str> = flags.iter().map(|s| s.as_str()).collect();
        Self::start_on(db_url, &flags).await
    }

    /// Makes inserting a row named `filename` fail inside the upload transaction (after the
    /// rows before it were written): a storage failure mid-request.
    pub async fn refuse_inserts_of(&self, filename: &str) {
        sqlx::raw_sql(&format!(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN IF NEW.filename = '{filename}' THEN RAISE EXCEPTION 'disk on fire'; END IF; RETURN NEW; END $$;
             CREATE TRIGGER refuse BEFORE INSERT ON pending_uploads FOR EACH ROW EXECUTE FUNCTION refuse();"
        ))
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// Keys under this app's prefix.
    /// The objects under the app's prefix, but for the prefix's marker (which deployment
    /// the prefix is, written by its first reconciliation): upload objects only.
    pub async fn object_keys(&self) -> Vec<String> {
        let s3 = self.storage.s3().expect("app has S3 configured");
        let marker = s3.marker_key();
        let mut keys: Vec<String> = s3
            .list()
            .await
            .expect("list bucket")
            .into_iter()
            .map(|o| o.key)
            .filter(|k| *k != marker)
            .collect();
        keys.sort();
        keys
    }
}

/// A unique key prefix per test: listings see only that test's objects.
pub fn test_prefix() -> String {
    format!("test-{}/", Uuid::new_v4().simple())
}

/// An address where nothing listens.
pub fn closed_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

pub const BIN: &str = env!("CARGO_BIN_EXE_pending-uploads");

/// The binary child-process tests run: this build's, or `TEST_SERVICE_BIN` (to show a test
/// fails against an older release).
pub fn service_bin() -> String {
    std::env::var("TEST_SERVICE_BIN").unwrap_or_else(|_| BIN.to_string())
}

/// A child process that is killed if the test ends (or fails) before stopping it.
pub struct Running(pub Option<std::process::Child>);

impl Running {
    /// SIGTERM, then the exit status and captured output.
    pub async fn terminate(&mut self) -> std::process::Output {
        self.signal("-TERM");
        let child = self.0.take().expect("running");
        tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap()
    }

    /// SIGSTOP: the process keeps what it holds (its locks, its sockets) and does nothing
    /// until it is thawed or killed.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT: a frozen process goes on.
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let child = self.0.as_ref().expect("running");
        let status = std::process::Command::new("kill")
            .args([which, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for a process already told to stop.
    pub async fn terminate_wait(&mut self) -> std::process::Output {
        let child = self.0.take().expect("running");
        tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap()
    }

    pub fn kill(&mut self) -> std::process::Output {
        let mut child = self.0.take().expect("running");
        child.kill().unwrap();
        child.wait_with_output().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub use crate::ports::free_port;

/// The binary with a clean environment: only what a test passes reaches it.
pub fn bin_command(db_url: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(service_bin());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db_url)
        .env("LOG_FORMAT", "json");
    for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        if let Ok(v) = std::env::var(var) {
            cmd.env(var, v);
        }
    }
    cmd
}

/// `serve` as a child process on a free port, ready when this returns.
pub async fn spawn_service(cmd: std::process::Command, port: u16) -> Running {
    spawn_service_logging_to(cmd, port, std::process::Stdio::piped()).await
}

/// [`spawn_service`] with its log lines (stderr) going to `stderr`: a file, for a service
/// that writes more than a pipe holds before it is read.
pub async fn spawn_service_logging_to(
    cmd: std::process::Command,
    port: u16,
    stderr: std::process::Stdio,
) -> Running {
    let mut cmd = cmd;
    cmd.env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("ADMIN_TOKEN", ADMIN)
        .stdout(std::process::Stdio::null())
        .stderr(stderr);
    let running = Running(Some(cmd.spawn().unwrap()));
    let client = reqwest::Client::new();
    for _ in 0..300 {
        // `Connection: close`: the service ends the probe's connection itself once it has
        // answered, so the probe holds no per-client connection place after this returns (an
        // idle pooled one, closed by the client later, was still counted when a test opened
        // MAX_CONNECTIONS_PER_CLIENT connections at once under load).
        if client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .header("connection", "close")
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return running;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("service did not become ready on port {port}");
}

/// The trigger-kept per-workspace totals (bytes and files) equal the sums over every unacked
/// row, expired or not (no drift, whoever wrote the rows).
pub async fn assert_totals_exact(pool: &sqlx::PgPool) {
    let drift: Vec<(Uuid, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT COALESCE(t.workspace_id, r.workspace_id),
                COALESCE(t.unacked_bytes, 0), COALESCE(r.bytes, 0)::bigint,
                COALESCE(t.unacked_files, 0), COALESCE(r.files, 0)
         FROM pending_upload_totals t
         FULL JOIN (SELECT workspace_id, sum(size_bytes) AS bytes, count(*) AS files
                    FROM pending_uploads WHERE acked_at IS NULL GROUP BY workspace_id) r
           ON r.workspace_id = t.workspace_id
         WHERE COALESCE(t.unacked_bytes, 0) <> COALESCE(r.bytes, 0)
            OR COALESCE(t.unacked_files, 0) <> COALESCE(r.files, 0)",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(
        drift.is_empty(),
        "(workspace, total bytes, rows' bytes, total files, rows): {drift:?}"
    );
}

/// A child service's `/metrics` text.
pub async fn scrape_metrics(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one series (name and labels, as exposed) in a Prometheus text exposition.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

/// Polls `holds` every 20 ms until it is true; fails saying `what` once `within` has passed.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut holds: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !holds().await {
        assert!(started.elapsed() < within, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until a child service's `/metrics` shows `series` at `value`.
pub async fn wait_for_metric(base: &str, series: &str, value: f64) {
    let mut last = String::new();
    for _ in 0..300 {
        last = scrape_metrics(base).await;
        if metric_value(&last, series) == Some(value) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{series} never reached {value}:\n{last}");
}

/// Runs a subcommand to the end; fails the test with its stderr unless it succeeded.
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        cmd.get_args().collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The JSON report a successful subcommand prints on stdout.
pub fn stdout_json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).expect("a JSON report on stdout")
}

/// JSON log lines of a finished process.
pub fn log_lines(stderr: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Registers a new poll workspace over HTTP, as a laptop does; returns its id and token.
pub async fn register_poll(base: &str) -> (Uuid, String) {
    let ws = Uuid::new_v4();
    let v: Value = reqwest::Client::new()
        .post(format!("{base}/registry/register"))
        .json(&json!({"id": ws, "delivery_mode": "poll"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (ws, v["auth_token"].as_str().expect("a token").to_string())
}

/// (scans, rows read) of one index, as PostgreSQL's statistics report them.
pub async fn index_use(pool: &PgPool, index: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT idx_scan, idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = $1",
    )
    .bind(index)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until `index` has been scanned at least `scans` times in all: the service's sessions
/// report their counters when they go idle, or up to 10 s later when they reported less than
/// a second before (PostgreSQL 15). False after 30 s.
pub async fn wait_for_index_scans(pool: &PgPool, index: &str, scans: i64) -> bool {
    for _ in 0..300 {
        if index_use(pool, index).await.0 >= scans {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Gives the planner `table`'s statistics now, as autovacuum would soon.
pub async fn analyze(pool: &PgPool, table: &str) {
    sqlx::query(&format!("ANALYZE {table}"))
        .execute(pool)
        .await
        .unwrap();
}

/// The rows of `table` read so far (sequentially and through its indexes), all reported:
/// every other session of the database (the service's pooled connections, which report their
/// counters up to 10 s late) is ended first, and a session reports what it has pending as it
/// ends. Read on a connection of its own. The ended connections stay in the service's pools;
/// it pings one idle for `PING_IF_IDLE_FOR` before using it (and drops it when dead), so this
/// returns only once that much has passed: the service's next request works.
pub async fn rows_read(db_url: &str, table: &str) -> i64 {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(db_url)
        .await
        .unwrap();
    let others: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND backend_type = 'client backend'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid")
        .bind(&others)
        .execute(&mut conn)
        .await
        .unwrap();
    for _ in 0..100 {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)")
                .bind(&others)
                .fetch_one(&mut conn)
                .await
                .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(pending_uploads::db::PING_IF_IDLE_FOR + Duration::from_millis(100)).await;
    sqlx::query_scalar(
        "SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables
         WHERE relname = $1",
    )
    .bind(table)
    .fetch_one(&mut conn)
    .await
    .unwrap()
}

/// A database cut off from its service: no new connections, existing ones terminated. Opened
/// again when dropped (the test's end, a failed assertion included).
pub struct ClosedDatabase {
    name: String,
}

impl ClosedDatabase {
    pub async fn close(db_url: &str) -> ClosedDatabase {
        let name = db_url.rsplit('/').next().unwrap().to_string();
        let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&server_url())
            .await
            .unwrap();
        sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
            .execute(&mut admin)
            .await
            .unwrap();
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
            .bind(&name)
            .execute(&mut admin)
            .await
            .unwrap();
        ClosedDatabase { name }
    }
}

impl Drop for ClosedDatabase {
    fn drop(&mut self) {
        let (url, name) = (server_url(), self.name.clone());
        // Drop cannot await: a thread of its own, joined.
        let reopened = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
                    .await
                    .unwrap();
                sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
                    .execute(&mut admin)
                    .await
                    .unwrap();
            })
        });
        let _ = reopened.join();
    }
}
