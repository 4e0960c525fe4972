//! End to end, all real processes over loopback: the service binary, the agent binary,
//! PostgreSQL, and (for the s3 backend) the S3 server. The canvas uploads; the agent stages,
//! verifies and acks; a sweep leaves nothing behind.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use pending_uploads::{
    config::{BackendMode, S3Checksum, StorageArgs},
    storage::S3Backend,
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::*;

struct Env {
    db: String,
    port: u16,
    backend: &'static str,
    prefix: String,
    spool: tempfile::TempDir,
}

impl Env {
    async fn new(backend: &'static str) -> Env {
        Env {
            db: fresh_db().await,
            port: free_port(),
            backend,
            prefix: test_prefix(),
            spool: tempfile::tempdir().unwrap(),
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The binary with this environment's database, backend and S3 settings.
    fn command(&self) -> Command {
        let mut cmd = bin_command(&self.db);
        cmd.env("PENDING_UPLOADS_BACKEND", self.backend)
            .env("SPOOL_DIR", self.spool.path());
        if self.backend != "bytea" {
            let (endpoint, bucket) = s3_endpoint();
            cmd.env("PENDING_UPLOADS_S3_BUCKET", bucket)
                .env("PENDING_UPLOADS_S3_PREFIX", &self.prefix)
                .env("AWS_ENDPOINT_URL", endpoint)
                .env("AWS_REGION", "us-east-1");
            if let Ok(c) = std::env::var("TEST_S3_CHECKSUM") {
                cmd.env("PENDING_UPLOADS_S3_CHECKSUM", c);
            }
        }
        cmd
    }

    async fn service(&self) -> Running {
        spawn_service(self.command(), self.port).await
    }

    fn agent(&self, ws: Uuid, token_file: &Path, dir: &Path, extra: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("LOG_FORMAT", "json")
            .args([
                "agent",
                "--platform-url",
                &self.base(),
                "--workspace-id",
                &ws.to_string(),
            ])
            .arg("--token-file")
            .arg(token_file)
            .arg("--dir")
            .arg(dir)
            .args(extra);
        cmd
    }

    /// The agent running with `extra`; its log kept (stderr piped, to be read when it
    /// ends) when `log`, else dropped (a piped log nobody reads would fill and stall it).
    fn spawn_agent(
        &self,
        ws: Uuid,
        token_file: &Path,
        dir: &Path,
        extra: &[&str],
        log: bool,
    ) -> Running {
        let stderr = match log {
            true => Stdio::piped(),
            false => Stdio::null(),
        };
        Running(Some(
            self.agent(ws, token_file, dir, extra)
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap(),
        ))
    }

    /// `agent --once`: its output, and its JSON report.
    fn agent_once(&self, ws: Uuid, token_file: &Path, dir: &Path) -> (std::process::Output, Value) {
        let out = run_ok(&mut self.agent(ws, token_file, dir, &["--once"]));
        let report = stdout_json(&out);
        (out, report)
    }

    async fn objects(&self) -> Vec<String> {
        let (endpoint, bucket) = s3_endpoint();
        let args = StorageArgs {
            pending_uploads_backend: BackendMode::S3,
            download_read_ahead_bytes: pending_uploads::config::DOWNLOAD_READ_AHEAD_BYTES,
            s3_bucket: Some(bucket),
            s3_prefix: self.prefix.clone(),
            s3_force_path_style: true,
            s3_checksum: S3Checksum::WhenSupported,
            s3_puts_while_receiving: 0,
            aws_endpoint_url: Some(endpoint),
            aws_region: Some("us-east-1".into()),
        };
        let s3 = S3Backend::from_args(&args, std::time::Duration::from_secs(10))
            .await
            .unwrap();
        // Upload objects: the prefix's marker (which deployment it is) is not one.
        let marker = s3.marker_key();
        s3.list()
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .filter(|k| *k != marker)
            .collect()
    }
}

/// A laptop: a home folder holding the inbox (not created: the agent makes it) and the token
/// file of a freshly registered poll workspace. Keep the TempDir alive for the test.
async fn laptop(env: &Env) -> (tempfile::TempDir, PathBuf, Uuid, PathBuf) {
    let home = tempfile::tempdir().unwrap();
    let (ws, token) = register_poll(&env.base()).await;
    let token_file = home.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let inbox = home.path().join("inbox");
    (home, inbox, ws, token_file)
}

/// Uploads as the canvas does (admin bearer); returns (file_id, sanitized name, bytes).
async fn canvas_upload(
    base: &str,
    ws: Uuid,
    files: &[(&str, Vec<u8>)],
) -> Vec<(Uuid, String, Vec<u8>)> {
    let mut form = reqwest::multipart::Form::new();
    for (name, data) in files {
        form = form.part(
            "files",
            reqwest::multipart::Part::bytes(data.clone()).file_name(name.to_string()),
        );
    }
    let resp = reqwest::Client::new()
        .post(format!("{base}/workspaces/{ws}/chat/uploads"))
        .bearer_auth(ADMIN)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    v["files"]
        .as_array()
        .unwrap()
        .iter()
        .zip(files)
        .map(|(f, (_, data))| {
            (
                file_id(f),
                f["name"].as_str().unwrap().to_string(),
                data.clone(),
            )
        })
        .collect()
}

fn staged_path(dir: &Path, fid: Uuid, name: &str) -> PathBuf {
    dir.join(format!("{}-{name}", fid.simple()))
}

/// Regular files in DIR (the agent's state folder excluded).
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != ".pending-uploads")
        .collect();
    names.sort();
    names
}

fn partials(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join(".pending-uploads/partial"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

async fn unacked(db: &str) -> i64 {
    let pool = sqlx::PgPool::connect(db).await.unwrap();
    let n = sqlx::query_scalar("SELECT count(*) FROM pending_uploads WHERE acked_at IS NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

#[tokio::test]
async fn the_agent_receives_everything_and_a_sweep_leaves_nothing() {
    for backend in ["bytea", "s3"] {
        let env = Env::new(backend).await;
        let _service = env.service().await;
        let (_home, dir, ws, token_file) = laptop(&env).await;
        let sent = canvas_upload(
            &env.base(),
            ws,
            &[
                ("one byte", vec![7]),
                ("notes (1).txt", bytes(1000, 1)),
                ("photo.jpg", bytes(1024 * 1024 + 3, 2)),
                ("../../escape.bin", bytes(5 * 1024 * 1024, 3)),
            ],
        )
        .await;

        let (_, report) = env.agent_once(ws, &token_file, &dir);
        assert_eq!(
            report,
            json!({"staged": 4, "already_present": 0, "gone": 0, "failed": 0}),
            "{backend}"
        );

        let index: Value = serde_json::from_slice(
            &std::fs::read(dir.join(".pending-uploads/index.json")).unwrap(),
        )
        .unwrap();
        let dir = std::fs::canonicalize(&dir).unwrap();
        for (fid, name, data) in &sent {
            let path = staged_path(&dir, *fid, name);
            assert!(
                std::fs::read(&path).unwrap() == *data,
                "{backend}: {name} byte-identical"
            );
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            assert_eq!(
                index[format!("platform-pending:{ws}/{fid}")],
                format!("workspace:{}", path.display())
            );
        }
        assert_eq!(files_in(&dir).len(), 4, "{backend}: nothing else in DIR");
        assert!(partials(&dir).is_empty());
        assert_eq!(unacked(&env.db).await, 0, "{backend}: every row acked");

        // a second pass has nothing to do
        let (_, report) = env.agent_once(ws, &token_file, &dir);
        assert_eq!(report["staged"], 0);

        // sweep with zero retention: no row, no object, no spool file
        let swept = stdout_json(&run_ok(
            env.command().arg("sweep").env("ACK_RETENTION", "0"),
        ));
        assert_eq!(swept["swept_rows"], 4);
        let pool = sqlx::PgPool::connect(&env.db).await.unwrap();
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_uploads")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(rows, 0);
        if backend == "s3" {
            assert_eq!(swept["objects_deleted"], 4);
            assert_eq!(env.objects().await, Vec::<String>::new(), "bucket empty");
        }
        assert_eq!(
            std::fs::read_dir(env.spool.path()).unwrap().count(),
            0,
            "spool folder empty"
        );
    }
}

#[tokio::test]
async fn an_agent_killed_mid_download_resumes_with_range_and_writes_one_correct_file() {
    let env = Env::new("bytea").await;
    let _service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    let data = bytes(8 * 1024 * 1024, 9);
    let sent = canvas_upload(&env.base(), ws, &[("big.bin", data.clone())]).await;
    let (fid, name, _) = &sent[0];

    // throttled to 2 MB/s, so the 8 MiB download takes ~4 s; kill it part-way
    let mut agent = env.spawn_agent(
        ws,
        &token_file,
        &dir,
        &["--once", "--max-rate", "2000000"],
        false,
    );
    for _ in 0..400 {
        if let Some(p) = std::fs::read_dir(dir.join(".pending-uploads/partial"))
            .ok()
            .and_then(|mut d| d.next())
        {
            if std::fs::metadata(p.unwrap().path())
                .map(|m| m.len())
                .unwrap_or(0)
                > 1024 * 1024
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    agent.kill();
    let partial = partials(&dir);
    assert_eq!(partial.len(), 1);
    let at_kill = std::fs::metadata(&partial[0]).unwrap().len();
    assert!(
        at_kill > 1024 * 1024 && at_kill < data.len() as u64,
        "killed half-way: {at_kill}"
    );
    assert!(
        files_in(&dir).is_empty(),
        "no half file under the final name"
    );
    assert_eq!(unacked(&env.db).await, 1);

    let (out, _) = env.agent_once(ws, &token_file, &dir);
    let resumed = log_lines(&out.stderr)
        .into_iter()
        .find(|l| l["message"] == "resuming download")
        .expect("the restarted agent resumed with Range");
    assert!(resumed["offset"].as_u64().unwrap() >= at_kill);
    let dir = std::fs::canonicalize(&dir).unwrap();
    assert_eq!(
        files_in(&dir),
        vec![format!("{}-{name}", fid.simple())],
        "one file, no duplicate"
    );
    assert!(std::fs::read(staged_path(&dir, *fid, name)).unwrap() == data);
    assert!(partials(&dir).is_empty());
    assert_eq!(unacked(&env.db).await, 0);
}

#[tokio::test]
async fn the_service_restarting_while_the_agent_polls_loses_nothing() {
    let env = Env::new("bytea").await;
    let mut service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    let mut agent = env.spawn_agent(ws, &token_file, &dir, &["--poll-interval", "200ms"], false);
    let wait_for = |n: usize, dir: PathBuf| async move {
        for _ in 0..300 {
            if dir.exists() && files_in(&dir).len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("agent did not stage {n} files");
    };
    let mut sent = canvas_upload(
        &env.base(),
        ws,
        &[("a1", bytes(100, 1)), ("a2", bytes(200, 2))],
    )
    .await;
    wait_for(2, dir.clone()).await;

    let out = service.terminate().await;
    assert!(out.status.success());
    tokio::time::sleep(Duration::from_millis(700)).await; // the agent polls a dead service meanwhile
    let _service = env.service().await;
    sent.extend(
        canvas_upload(
            &env.base(),
            ws,
            &[
                ("b1", bytes(300, 3)),
                ("b2", bytes(400, 4)),
                ("b3", bytes(500, 5)),
            ],
        )
        .await,
    );
    wait_for(5, dir.clone()).await;
    for _ in 0..300 {
        if unacked(&env.db).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(unacked(&env.db).await, 0);
    agent.kill();
    let dir = std::fs::canonicalize(&dir).unwrap();
    for (fid, name, data) in &sent {
        assert!(
            std::fs::read(staged_path(&dir, *fid, name)).unwrap() == *data,
            "{name}"
        );
    }
    assert_eq!(files_in(&dir).len(), 5);
}

/// An agent asking for more downloads at once than the service lets one workspace stream gets
/// 429 for the rest, retries them and still stages every file (before, a 429 was fatal). Each
/// retry waits out the refusal's `Retry-After: 2` (before, the agent came back after its own
/// 200 ms backoff, and every agent of a busy service hammered it five times a second).
#[tokio::test]
async fn an_agent_over_the_download_slots_retries_and_stages_everything() {
    let env = Env::new("bytea").await;
    let mut cmd = env.command();
    cmd.env("MAX_CONCURRENT_DOWNLOADS_PER_WORKSPACE", "1");
    let _service = spawn_service(cmd, env.port).await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| (format!("f{i}.bin"), bytes(3 << 20, i as u8)))
        .collect();
    let named: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let sent = canvas_upload(&env.base(), ws, &named).await;
    let out = run_ok(&mut env.agent(ws, &token_file, &dir, &["--once", "--concurrency", "4"]));
    assert_eq!(
        stdout_json(&out),
        json!({"staged": 4, "already_present": 0, "gone": 0, "failed": 0})
    );
    let waits: Vec<u64> = log_lines(&out.stderr)
        .iter()
        .filter(|l| l["error"].as_str().is_some_and(|e| e.contains("429")))
        .map(|l| l["wait_ms"].as_u64().unwrap())
        .collect();
    assert!(
        !waits.is_empty(),
        "the service refused some downloads, which the agent retried"
    );
    assert!(
        waits.iter().all(|w| (2000..=2500).contains(w)),
        "each retry waits the 2 s the service asked for, a little spread: {waits:?}"
    );
    for (fid, name, data) in &sent {
        assert!(std::fs::read(staged_path(&dir, *fid, name)).unwrap() == *data);
    }
}

/// A file already in the folder but not acked (the agent died between publishing it and
/// acking it) is confirmed with a HEAD first. A 429 or 503 to that HEAD was retried after the
/// agent's own short backoff, not after the `Retry-After` the service sent (the GET, the feed
/// and the ack waited it out).
#[tokio::test]
async fn the_head_of_a_file_already_present_waits_out_retry_after() {
    let env = Env::new("bytea").await;
    let _service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    let sent = canvas_upload(&env.base(), ws, &[("here.txt", b"already here".to_vec())]).await;
    env.agent_once(ws, &token_file, &dir);
    // Unacked, not in the agent's index, no cursor: as if it had died after publishing.
    let pool = sqlx::PgPool::connect(&env.db).await.unwrap();
    sqlx::query("UPDATE pending_uploads SET acked_at = NULL WHERE file_id = $1")
        .bind(sent[0].0)
        .execute(&pool)
        .await
        .unwrap();
    std::fs::remove_file(dir.join(".pending-uploads/cursor")).unwrap();
    std::fs::remove_file(dir.join(".pending-uploads/index.json")).unwrap();
    // In front of the service, a proxy that refuses the first two HEADs: 429, Retry-After 2.
    let upstream = env.base();
    let refused = Arc::new(AtomicUsize::new(0));
    let counted = refused.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (upstream, counted) = (upstream.clone(), counted.clone());
        async move {
            if req.method() == axum::http::Method::HEAD
                && counted.fetch_add(1, Ordering::SeqCst) < 2
            {
                return axum::response::Response::builder()
                    .status(429)
                    .header("Retry-After", "2")
                    .body(axum::body::Body::empty())
                    .unwrap();
            }
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let resp = reqwest::Client::new()
                .request(parts.method, format!("{upstream}{}", parts.uri))
                .headers(parts.headers)
                .body(body)
                .send()
                .await
                .unwrap();
            let mut out = axum::response::Response::builder().status(resp.status());
            for (k, v) in resp.headers() {
                out = out.header(k, v);
            }
            out.body(axum::body::Body::from(resp.bytes().await.unwrap()))
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut agent = Command::new(BIN);
    agent
        .env_clear()
        .env("LOG_FORMAT", "json")
        .args(["agent", "--once", "--platform-url", &proxy])
        .args(["--workspace-id", &ws.to_string()])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--dir")
        .arg(&dir);
    let out = tokio::task::spawn_blocking(move || agent.output().unwrap())
        .await
        .unwrap();
    let waits: Vec<u64> = log_lines(&out.stderr)
        .iter()
        .filter(|l| {
            l["error"]
                .as_str()
                .is_some_and(|e| e.contains("content HEAD") && e.contains("429"))
        })
        .map(|l| l["wait_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(waits.len(), 2, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        waits.iter().all(|w| (2000..=2500).contains(w)),
        "each retry waits the 2 s the service asked for, a little spread: {waits:?}"
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout_json(&out)["already_present"], 1);
}

/// The agent's state (its cursor, its index of received files) is its owner's only, as the
/// received files are (it was 0644). A partial file nothing has written to for twice an
/// upload's life is removed: its upload expired, or was acked elsewhere, before the agent
/// finished it, and no pass asks for it again (it stayed forever).
#[tokio::test]
async fn the_agents_state_is_private_and_stale_partial_files_go() {
    let env = Env::new("bytea").await;
    let _service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    canvas_upload(&env.base(), ws, &[("a.txt", b"a".to_vec())]).await;
    env.agent_once(ws, &token_file, &dir);
    for name in ["cursor", "index.json"] {
        let mode = std::fs::metadata(dir.join(".pending-uploads").join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    let partial = |id: Uuid| dir.join(format!(".pending-uploads/partial/{}.part", id.simple()));
    let (stale, recent) = (partial(Uuid::new_v4()), partial(Uuid::new_v4()));
    std::fs::write(&stale, b"half").unwrap();
    std::fs::write(&recent, b"half").unwrap();
    let three_days_ago = std::time::SystemTime::now() - Duration::from_secs(72 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(three_days_ago)
        .unwrap();
    let (out, _) = env.agent_once(ws, &token_file, &dir);
    assert!(!stale.exists(), "the stale partial file was removed");
    // A recent one of an upload the pending list no longer holds goes too (it was kept
    // until 48 h old).
    assert!(
        !recent.exists(),
        "a recent one of an upload not pending was removed"
    );
    let lines = log_lines(&out.stderr);
    assert!(lines
        .iter()
        .any(|l| l["message"] == "stale partial file removed"));
    assert!(lines
        .iter()
        .any(|l| l["message"] == "partial file of an upload no longer pending removed"));
}

/// `--max-rate` caps the agent's downloads together, as a laptop's link is one link: with
/// `--concurrency 4` each download was paced on its own, so four files came at four times
/// the rate.
#[tokio::test]
async fn max_rate_caps_all_downloads_together() {
    let env = Env::new("bytea").await;
    let _service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| (format!("r{i}.bin"), bytes(1_000_000, i as u8)))
        .collect();
    let named: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    canvas_upload(&env.base(), ws, &named).await;
    let started = std::time::Instant::now();
    let out = run_ok(&mut env.agent(
        ws,
        &token_file,
        &dir,
        &["--once", "--concurrency", "4", "--max-rate", "2000000"],
    ));
    assert_eq!(stdout_json(&out)["staged"], 4);
    // 4 MB at 2 MB/s: two seconds at least (each paced alone, all four took half a second).
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
}

/// A file listed as pending that expires before the agent gets to it (here while the agent,
/// one download at a time and rate-capped, is busy with the file before it) is counted gone
/// and leaves no partial file; a file already expired when the pass lists is not listed.
#[tokio::test]
async fn a_file_that_expires_before_fetch_is_skipped_cleanly() {
    let env = Env::new("bytea").await;
    let _service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    let sent = canvas_upload(
        &env.base(),
        ws,
        &[
            ("slow.bin", bytes(1_000_000, 7)),
            ("late.txt", b"too late".to_vec()),
            ("expired.txt", b"long gone".to_vec()),
        ],
    )
    .await;
    let pool = sqlx::PgPool::connect(&env.db).await.unwrap();
    let expire = |fid: Uuid| {
        sqlx::query(
            "UPDATE pending_uploads SET expires_at = now() - interval '1 second' WHERE file_id = $1",
        )
        .bind(fid)
        .execute(&pool)
    };
    expire(sent[2].0).await.unwrap();
    let agent = env
        .agent(
            ws,
            &token_file,
            &dir,
            &["--once", "--concurrency", "1", "--max-rate", "500000"],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let first_partial = dir.join(format!(
        ".pending-uploads/partial/{}.part",
        sent[0].0.simple()
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !first_partial.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first download never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    expire(sent[1].0).await.unwrap();
    let out = agent.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout_json(&out),
        json!({"staged": 1, "already_present": 0, "gone": 1, "failed": 0})
    );
    let dir = std::fs::canonicalize(&dir).unwrap();
    assert_eq!(
        files_in(&dir),
        vec![format!("{}-slow.bin", sent[0].0.simple())]
    );
    assert!(partials(&dir).is_empty());
}

/// The URI index holds what DIR holds: an entry whose file its owner deleted or moved is
/// dropped when the agent starts, and the next save leaves it out (before, the index only grew,
/// and every received file rewrote all of it).
#[tokio::test]
async fn the_index_forgets_files_no_longer_in_the_folder() {
    let env = Env::new("bytea").await;
    let _service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    let first = canvas_upload(
        &env.base(),
        ws,
        &[("a.txt", b"aaa".to_vec()), ("b.txt", b"bbb".to_vec())],
    )
    .await;
    env.agent_once(ws, &token_file, &dir);
    let index = |dir: &Path| -> Value {
        serde_json::from_slice(&std::fs::read(dir.join(".pending-uploads/index.json")).unwrap())
            .unwrap()
    };
    assert_eq!(index(&dir).as_object().unwrap().len(), 2);
    let dir = std::fs::canonicalize(&dir).unwrap();
    std::fs::remove_file(staged_path(&dir, first[0].0, &first[0].1)).unwrap();
    let second = canvas_upload(&env.base(), ws, &[("c.txt", b"ccc".to_vec())]).await;
    let (out, report) = env.agent_once(ws, &token_file, &dir);
    assert_eq!(report["staged"], 1);
    let uri = |fid: Uuid| format!("platform-pending:{ws}/{fid}");
    let kept: Vec<String> = index(&dir).as_object().unwrap().keys().cloned().collect();
    let mut want = vec![uri(first[1].0), uri(second[0].0)];
    want.sort();
    assert_eq!(kept, want, "the deleted file's entry is gone");
    assert!(
        log_lines(&out.stderr).iter().any(|l| l["pruned"] == 1),
        "the agent says what it dropped"
    );
}

#[tokio::test]
async fn a_lost_or_unknown_cursor_resets_and_nothing_is_missed() {
    let env = Env::new("bytea").await;
    let _service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    let first = canvas_upload(&env.base(), ws, &[("one.txt", b"first".to_vec())]).await;
    env.agent_once(ws, &token_file, &dir);
    let cursor = std::fs::read_to_string(dir.join(".pending-uploads/cursor")).unwrap();
    assert!(
        cursor.parse::<Uuid>().is_ok(),
        "the cursor persists: {cursor}"
    );

    // a cursor the platform does not know (pruned feed, another platform): 410, then reset
    std::fs::write(
        dir.join(".pending-uploads/cursor"),
        Uuid::new_v4().to_string(),
    )
    .unwrap();
    let second = canvas_upload(&env.base(), ws, &[("two.txt", b"second".to_vec())]).await;
    let (out, report) = env.agent_once(ws, &token_file, &dir);
    assert_eq!(report["staged"], 1);
    assert!(log_lines(&out.stderr)
        .iter()
        .any(|l| l["message"].as_str().unwrap_or("").contains("resetting")));

    // no cursor at all: the pending list alone recovers what is unacked
    std::fs::remove_file(dir.join(".pending-uploads/cursor")).unwrap();
    let third = canvas_upload(&env.base(), ws, &[("three.txt", b"third".to_vec())]).await;
    let (_, report) = env.agent_once(ws, &token_file, &dir);
    assert_eq!(report["staged"], 1);
    let dir = std::fs::canonicalize(&dir).unwrap();
    for (fid, name, data) in first.iter().chain(&second).chain(&third) {
        assert!(std::fs::read(staged_path(&dir, *fid, name)).unwrap() == *data);
    }
    assert_eq!(files_in(&dir).len(), 3);
    assert_eq!(unacked(&env.db).await, 0);
}

/// An agent stopped between a download's last byte and publishing it leaves a partial file
/// as long as the upload. The next pass asks for the last byte only and publishes the file;
/// before, its range from the end was a 416, logged as "partial file longer than the
/// upload", and the whole file was downloaded again (a black-box probe).
#[tokio::test]
async fn a_partial_file_already_whole_is_finished_with_its_last_byte() {
    let env = Env::new("bytea").await;
    let _service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    let sent = canvas_upload(&env.base(), ws, &[("whole.bin", bytes(3_000_000, 5))]).await;
    let (fid, name, data) = &sent[0];
    let partial_dir = dir.join(".pending-uploads/partial");
    std::fs::create_dir_all(&partial_dir).unwrap();
    std::fs::write(partial_dir.join(format!("{}.part", fid.simple())), data).unwrap();
    let (out, report) = env.agent_once(ws, &token_file, &dir);
    assert_eq!(report["staged"], 1);
    let lines = log_lines(&out.stderr);
    let resumed = lines
        .iter()
        .find(|l| l["message"] == "resuming download")
        .expect("a resumed download");
    assert_eq!(resumed["offset"], 2_999_999);
    assert!(
        !lines.iter().any(|l| l.to_string().contains("restarting")),
        "{lines:?}"
    );
    let dir = std::fs::canonicalize(&dir).unwrap();
    assert!(std::fs::read(staged_path(&dir, *fid, name)).unwrap() == *data);
}

/// A cursor file that holds no row id (a torn write, a hand edit): the feed refused it (400)
/// on every pass, and the agent received nothing, for good. It is read as no cursor now.
#[tokio::test]
async fn a_cursor_file_that_is_no_row_id_is_as_no_cursor() {
    let env = Env::new("bytea").await;
    let _service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    env.agent_once(ws, &token_file, &dir);
    std::fs::write(dir.join(".pending-uploads/cursor"), "not-a-uuid").unwrap();
    let sent = canvas_upload(&env.base(), ws, &[("after.txt", b"after".to_vec())]).await;
    let (out, report) = env.agent_once(ws, &token_file, &dir);
    assert_eq!(
        report["staged"],
        1,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = std::fs::canonicalize(&dir).unwrap();
    assert!(std::fs::read(staged_path(&dir, sent[0].0, &sent[0].1)).unwrap() == sent[0].2);
    let cursor = std::fs::read_to_string(dir.join(".pending-uploads/cursor")).unwrap();
    assert!(
        cursor.trim().parse::<Uuid>().is_ok(),
        "a real cursor again: {cursor}"
    );
}

/// A cursor reset rewinds the feed 24 h, over files this agent received and acked long ago.
/// They are no longer pending, so they are not fetched again: before, an acked file its owner
/// had deleted came back (acked rows stay readable until swept), and every file still there
/// cost a HEAD and a second ack.
#[tokio::test]
async fn a_cursor_reset_does_not_bring_back_files_the_owner_deleted() {
    let env = Env::new("bytea").await;
    let _service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    let old = canvas_upload(
        &env.base(),
        ws,
        &[
            ("deleted.txt", b"gone".to_vec()),
            ("kept.txt", b"kept".to_vec()),
        ],
    )
    .await;
    env.agent_once(ws, &token_file, &dir);
    let dir = std::fs::canonicalize(&dir).unwrap();
    std::fs::remove_file(staged_path(&dir, old[0].0, &old[0].1)).unwrap();

    std::fs::write(
        dir.join(".pending-uploads/cursor"),
        Uuid::new_v4().to_string(),
    )
    .unwrap();
    let new = canvas_upload(&env.base(), ws, &[("new.txt", b"new".to_vec())]).await;
    let (out, report) = env.agent_once(ws, &token_file, &dir);
    assert!(log_lines(&out.stderr)
        .iter()
        .any(|l| l["message"].as_str().unwrap_or("").contains("resetting")));
    assert_eq!(
        report,
        json!({"staged": 1, "already_present": 0, "gone": 0, "failed": 0})
    );
    let mut want = vec![
        format!("{}-{}", old[1].0.simple(), old[1].1),
        format!("{}-{}", new[0].0.simple(), new[0].1),
    ];
    want.sort();
    assert_eq!(files_in(&dir), want);
}

/// Rows written the way the platform (or our previous release) writes them: no digest. The
/// service answers a weak ETag and no Repr-Digest; the agent checks the size and delivers.
#[tokio::test]
async fn the_agent_delivers_rows_the_platform_wrote_without_a_digest() {
    let env = Env::new("bytea").await;
    let _service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    let pool = sqlx::PgPool::connect(&env.db).await.unwrap();
    let mut sent = Vec::new();
    for (i, name) in ["alpha.txt", "beta.bin"].iter().enumerate() {
        let data = bytes(1000 + i * 4096, i as u8);
        let fid = Uuid::new_v4();
        let uri = format!("platform-pending:{ws}/{fid}");
        // As the platform's uploadPollMode does: the row, then its activity row.
        sqlx::query(
            "INSERT INTO pending_uploads (file_id, workspace_id, content, size_bytes, filename, mimetype)
             VALUES ($1, $2, $3, $4, $5, 'text/plain')",
        )
        .bind(fid)
        .bind(ws)
        .bind(&data)
        .bind(data.len() as i64)
        .bind(name)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO activity_logs (workspace_id, activity_type, target_id, method, summary, request_body, status)
             VALUES ($1, 'a2a_receive', $1, 'chat_upload_receive', $2, $3, 'ok')",
        )
        .bind(ws)
        .bind(format!("chat_upload_receive: {name}"))
        .bind(json!({"file_id": fid.to_string(), "name": name, "mimeType": "text/plain", "size": data.len(), "uri": uri}))
        .execute(&pool)
        .await
        .unwrap();
        sent.push((fid, name.to_string(), data));
    }
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let head = reqwest::Client::new()
        .head(format!(
            "{}/workspaces/{ws}/pending-uploads/{}/content",
            env.base(),
            sent[0].0
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.headers()["etag"],
        format!("W/\"{}\"", sent[0].0).as_str()
    );
    assert!(head.headers().get("repr-digest").is_none());

    let (_, report) = env.agent_once(ws, &token_file, &dir);
    assert_eq!(
        report,
        json!({"staged": 2, "already_present": 0, "gone": 0, "failed": 0})
    );
    for (fid, name, data) in &sent {
        assert_eq!(&std::fs::read(staged_path(&dir, *fid, name)).unwrap(), data);
    }
    assert_eq!(unacked(&env.db).await, 0, "acked");
    // A second pass finds nothing to do: no re-download loop.
    let (_, report) = env.agent_once(ws, &token_file, &dir);
    assert_eq!(
        report,
        json!({"staged": 0, "already_present": 0, "gone": 0, "failed": 0})
    );
}

/// An agent started before any upload long-polls once the feed has a first row. Before, its
/// first pass (no cursor yet, so no `wait`) came back empty at once, and it concluded for good
/// that the service had no long polls: every later upload waited for its poll interval.
#[tokio::test]
async fn an_agent_started_before_any_upload_long_polls_after_the_first() {
    let env = Env::new("bytea").await;
    let _service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    let _agent = env.spawn_agent(ws, &token_file, &dir, &["--poll-interval", "1s"], false);
    // Its first pass: an empty feed, no cursor, an empty answer at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    canvas_upload(&env.base(), ws, &[("first.txt", bytes(10, 1))]).await;
    for _ in 0..200 {
        if dir.exists() && files_in(&dir).len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(files_in(&dir).len(), 1, "the first file was staged");
    // With a cursor now, the agent waits on the feed between uploads.
    wait_for_metric(&env.base(), "pending_uploads_long_polls_waiting", 1.0).await;
}

/// A file that fails every pass (here: a different file already under its final name) does
/// not spin the agent: it waits its poll interval between passes. Before, a pass with a failed
/// file was followed by the next one at once, as fast as the service answered.
#[tokio::test]
async fn a_file_that_keeps_failing_does_not_spin_the_agent() {
    let env = Env::new("bytea").await;
    let _service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    let mut agent = env.spawn_agent(ws, &token_file, &dir, &["--poll-interval", "1s"], true);
    // Its first pass finds nothing (and, before, gave up long polls); the file and the clash
    // come within its interval, the agent frozen meanwhile (a slow first pass could read the
    // pending list after the upload and stage the file before the clash is there).
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.freeze();
    let sent = canvas_upload(&env.base(), ws, &[("clash.txt", bytes(10, 2))]).await;
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(staged_path(&dir, sent[0].0, "clash.txt"), b"someone else's").unwrap();
    agent.thaw();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = agent.terminate().await;
    let failures = log_lines(&out.stderr)
        .into_iter()
        .filter(|l| l["message"] == "could not stage file")
        .count();
    assert!(
        (1..=5).contains(&failures),
        "{failures} failed attempts in 3 s with a 1 s interval"
    );
    assert_eq!(unacked(&env.db).await, 1, "never acked");
}

/// A file that failed is tried again after the poll interval. Before, the pass after it
/// long-polled the feed, which had no news: the file waited out the whole wait (30 s).
#[tokio::test]
async fn a_file_that_failed_is_tried_again_after_the_interval_not_a_long_poll() {
    let env = Env::new("bytea").await;
    let _service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    let mut agent = env.spawn_agent(ws, &token_file, &dir, &["--poll-interval", "1s"], true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Frozen until the clash is there (as in the test above).
    agent.freeze();
    let data = bytes(10, 3);
    let sent = canvas_upload(&env.base(), ws, &[("clash.txt", data.clone())]).await;
    let staged = staged_path(&dir, sent[0].0, "clash.txt");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&staged, b"someone else's").unwrap();
    agent.thaw();
    // The agent's first pass after the upload fails on the clash; then the clash goes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    std::fs::remove_file(&staged).unwrap();
    let gone = std::time::Instant::now();
    while unacked(&env.db).await > 0 && gone.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = agent.terminate().await;
    assert_eq!(unacked(&env.db).await, 0, "staged and acked within 10 s");
    assert_eq!(std::fs::read(&staged).unwrap(), data);
    let failures = log_lines(&out.stderr)
        .into_iter()
        .filter(|l| l["message"] == "could not stage file")
        .count();
    assert!(failures >= 1, "the clash failed first");
}

/// DIR on a filesystem of its own, `size` large (a tmpfs; tests run as root); unmounted when
/// dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs needs root");
        SmallDisk(dir.to_path_buf())
    }

    /// Fills it up with 4 KiB files, then frees one: a page is left.
    fn fill_but_a_page(&self) {
        let filler = self.0.join("filler");
        std::fs::create_dir_all(&filler).unwrap();
        let mut n = 0;
        while std::fs::write(filler.join(n.to_string()), [0u8; 4096]).is_ok() {
            n += 1;
        }
        std::fs::remove_file(filler.join((n - 1).to_string())).unwrap();
        let _ = std::fs::remove_file(filler.join(n.to_string()));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// On a full disk the agent's state writes failed unseen: tokio's `write_all` returns before
/// the write, whose error `sync_all` does not report, so an empty file was renamed over the
/// index (every mapping gone) and the pass acked the new file (a black-box probe). Now the
/// write fails, the pass fails, and nothing more is acked.
#[tokio::test]
async fn a_full_disk_fails_the_pass_and_keeps_the_index() {
    let env = Env::new("bytea").await;
    let _service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    let disk = SmallDisk::mount(&dir, "1m");
    let first = canvas_upload(&env.base(), ws, &[("first.txt", bytes(11, 1))]).await;
    let (_, report) = env.agent_once(ws, &token_file, &dir);
    assert_eq!(report["staged"], 1, "{report}");
    let index_path = dir.join(".pending-uploads/index.json");
    let uri = format!("platform-pending:{ws}/{}", first[0].0);
    let index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    assert!(index.get(&uri).is_some(), "{index}");

    disk.fill_but_a_page();
    canvas_upload(&env.base(), ws, &[("second.txt", bytes(11, 2))]).await;
    let out = env
        .agent(ws, &token_file, &dir, &["--once", "--retries", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the pass failed");
    let index: Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).expect("the index is whole");
    assert!(index.get(&uri).is_some(), "{index}");
    assert_eq!(unacked(&env.db).await, 1, "the second file is not acked");
    let left: Vec<_> = std::fs::read_dir(dir.join(".pending-uploads"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

/// Every file under `dir` (the agent's state folder included) with its bytes.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(tree(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}

/// One agent per DIR: an `agent --once` beside a running daemon on the same DIR fails at once,
/// naming DIR and the lock, and touches nothing; once the daemon is gone it works. Before, both
/// ran: they could resume one partial file at different offsets, write into a file already
/// published and acked (the hard link shares the inode), and drop each other's index entries.
#[tokio::test]
async fn a_second_agent_on_the_same_dir_fails_at_once_and_touches_nothing() {
    let env = Env::new("bytea").await;
    let _service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    let mut daemon = env.spawn_agent(ws, &token_file, &dir, &["--poll-interval", "200ms"], false);
    // The daemon has staged and acked a file: it is past its start, holding the lock.
    let first = canvas_upload(&env.base(), ws, &[("first.txt", bytes(100, 1))]).await;
    for _ in 0..200 {
        if unacked(&env.db).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(unacked(&env.db).await, 0, "the daemon acked the first file");
    // Frozen, it still holds the lock but writes nothing more: a daemon whose pass read the
    // feed just before the upload and the pending list just after acks the file first and
    // saves its feed cursor at its next pass, which a CI run caught between the two trees.
    daemon.freeze();
    let dir = std::fs::canonicalize(&dir).unwrap();
    let before = tree(&dir);

    let out = env
        .agent(ws, &token_file, &dir, &["--once"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second agent ran: {stderr}");
    let lock = dir.join(".pending-uploads/lock");
    let lines = log_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "one log line: {stderr}");
    let error = lines[0]["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("working on {}", dir.display()))
            && error.contains(&lock.display().to_string()),
        "names DIR and the lock: {error}"
    );
    assert!(out.stdout.is_empty(), "no report: it did no pass");
    assert_eq!(tree(&dir), before, "DIR untouched");

    // The daemon gone (even by SIGKILL), the lock is free.
    daemon.kill();
    let second = canvas_upload(&env.base(), ws, &[("second.txt", bytes(200, 2))]).await;
    let (_, report) = env.agent_once(ws, &token_file, &dir);
    assert_eq!(
        report,
        json!({"staged": 1, "already_present": 0, "gone": 0, "failed": 0})
    );
    for (fid, name, data) in first.iter().chain(&second) {
        assert!(std::fs::read(staged_path(&dir, *fid, name)).unwrap() == *data);
    }
    assert_eq!(unacked(&env.db).await, 0);
}

/// The agent records a file's index entry before it acks, so an ack that fails (here the
/// service's database refuses it: 5xx) finds the file published and mapped, and the next run
/// acks it without downloading it again. Before, the ack came first and the index entry after
/// it: a crash or an index write error after the ack lost the mapping for good, the row having
/// left the pending list. (The fsync of DIR before the ack is checked by hand with strace.)
#[tokio::test]
async fn a_failed_ack_finds_the_file_already_published_and_indexed() {
    let env = Env::new("bytea").await;
    let _service = env.service().await;
    let (_home, dir, ws, token_file) = laptop(&env).await;
    let sent = canvas_upload(&env.base(), ws, &[("report.pdf", bytes(5000, 4))]).await;
    let (fid, name, data) = &sent[0];
    let pool = sqlx::PgPool::connect(&env.db).await.unwrap();
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_ack() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'disk on fire'; END $$;
         CREATE TRIGGER refuse_ack BEFORE UPDATE ON pending_uploads FOR EACH ROW
         WHEN (OLD.acked_at IS NULL AND NEW.acked_at IS NOT NULL) EXECUTE FUNCTION refuse_ack();",
    )
    .execute(&pool)
    .await
    .unwrap();

    let out = env
        .agent(ws, &token_file, &dir, &["--once", "--retries", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the ack failed");
    assert_eq!(
        stdout_json(&out),
        json!({"staged": 0, "already_present": 0, "gone": 0, "failed": 1})
    );
    assert_eq!(unacked(&env.db).await, 1, "not acked");
    let dir = std::fs::canonicalize(&dir).unwrap();
    let path = staged_path(&dir, *fid, name);
    assert!(std::fs::read(&path).unwrap() == *data, "published");
    let uri = format!("platform-pending:{ws}/{fid}");
    let index = || -> Value {
        serde_json::from_slice(&std::fs::read(dir.join(".pending-uploads/index.json")).unwrap())
            .unwrap()
    };
    assert_eq!(
        index()[&uri],
        format!("workspace:{}", path.display()),
        "mapped before the ack"
    );

    sqlx::raw_sql("DROP TRIGGER refuse_ack ON pending_uploads")
        .execute(&pool)
        .await
        .unwrap();
    let (out, report) = env.agent_once(ws, &token_file, &dir);
    assert_eq!(
        report,
        json!({"staged": 0, "already_present": 1, "gone": 0, "failed": 0}),
        "found present, not downloaded again: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(unacked(&env.db).await, 0, "acked now");
    assert_eq!(index()[&uri], format!("workspace:{}", path.display()));
    assert_eq!(files_in(&dir), vec![format!("{}-{name}", fid.simple())]);
    assert!(partials(&dir).is_empty());
}
