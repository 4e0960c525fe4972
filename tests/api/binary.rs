//! The binary itself, as a child process: subcommands, environment configuration, logs,
//! start-up errors, and SIGTERM.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

fn command(db_url: &str) -> Command {
    bin_command(db_url)
}

#[tokio::test]
async fn migrate_applies_the_schema_once() {
    let db = empty_db().await;
    for _ in 0..2 {
        run_ok(command(&db).arg("migrate"));
    }
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    // A newer release's migration in the database does not stop this binary (rollback).
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (29991231000000, 'from the future', true, '\\x00', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    run_ok(command(&db).arg("migrate"));
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        tables,
        [
            "activity_logs",
            "pending_upload_stored_deltas",
            "pending_upload_total_deltas",
            "pending_upload_totals",
            "pending_uploads",
            "pending_uploads_backlog",
            "pending_uploads_deployment",
            "pending_uploads_leases",
            "workspace_auth_tokens",
            "workspaces"
        ]
    );
    let checks: Vec<String> = sqlx::query_scalar(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'pending_uploads'::regclass AND contype = 'c' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        checks
            .iter()
            .any(|c| c.contains("size_bytes > 0") && c.contains("104857600")),
        "{checks:?}"
    );
    assert!(
        checks.iter().any(|c| c.contains("length(filename)")),
        "{checks:?}"
    );
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'pending_uploads' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let joined = indexes.join("\n");
    // the platform's names (SPEC §2)
    for (name, def) in [
        (
            "idx_pending_uploads_workspace_unacked",
            "(workspace_id, created_at) WHERE (acked_at IS NULL)",
        ),
        (
            "idx_pending_uploads_expires",
            "(expires_at) WHERE (acked_at IS NULL)",
        ),
        (
            "idx_pending_uploads_acked",
            "(acked_at) WHERE (acked_at IS NOT NULL)",
        ),
    ] {
        assert!(
            indexes
                .iter()
                .any(|i| i.contains(&format!("INDEX {name} ")) && i.contains(def)),
            "{name}: {joined}"
        );
    }
}

#[tokio::test]
async fn start_up_refuses_bad_configuration_clearly() {
    let db = fresh_db().await;
    let cases: [(&str, &str, &str); 34] = [
        (
            "PENDING_UPLOADS_BACKEND",
            "s3",
            "PENDING_UPLOADS_BACKEND=s3 needs PENDING_UPLOADS_S3_BUCKET",
        ),
        (
            "PENDING_UPLOADS_BACKEND",
            "floppy",
            "invalid value 'floppy'",
        ),
        (
            "MAX_FILE_BYTES",
            "104857601",
            "MAX_FILE_BYTES=104857601 is out of range",
        ),
        ("SWEEP_INTERVAL", "5 parsecs", "invalid duration"),
        ("BATCH_MAX_KEYS", "0", "0 is not in 1..=1000000"),
        ("SWEEP_BATCH_BYTES", "0", "0 is not in 1..=1099511627776"),
        (
            "MAX_CONCURRENT_REGISTRATION_LOOKUPS",
            "257",
            "257 is not in 1..=256",
        ),
        // Durations the parser takes but a clock cannot add: before, a panic ("overflow when
        // adding duration to instant") at start-up, or in every upload for BODY_IDLE_TIMEOUT.
        (
            "DEPENDENCY_TIMEOUT",
            "18446744073709551615",
            "DEPENDENCY_TIMEOUT=18446744073709551615s is longer than 7d",
        ),
        // Half of it is the lock wait, in whole milliseconds: 0 would be no limit at all.
        (
            "DEPENDENCY_TIMEOUT",
            "1ms",
            "DEPENDENCY_TIMEOUT=1ms is shorter than 10ms",
        ),
        // A zero deadline cut every upload (BODY_IDLE_TIMEOUT) or made every push a 502.
        (
            "BODY_IDLE_TIMEOUT",
            "0",
            "BODY_IDLE_TIMEOUT=0ns is shorter than 100ms",
        ),
        (
            "PUSH_ANSWER_TIMEOUT",
            "0",
            "PUSH_ANSWER_TIMEOUT=0ns is shorter than 100ms",
        ),
        (
            "BODY_IDLE_TIMEOUT",
            "8d",
            "BODY_IDLE_TIMEOUT=691200s is longer than 7d",
        ),
        (
            "ORPHAN_GRACE",
            "3651d",
            "ORPHAN_GRACE=315446400s is longer than 3650d",
        ),
        (
            "UPLOAD_BODY_TIMEOUT",
            "1500ms",
            "UPLOAD_BODY_TIMEOUT=1.5s must be a whole number of seconds",
        ),
        // Before, each of these panicked (exit 101 and a backtrace) or started as if unset.
        (
            "CORS_ALLOWED_ORIGINS",
            "*",
            "CORS_ALLOWED_ORIGINS entry \"*\" is a wildcard",
        ),
        (
            "CORS_ALLOWED_ORIGINS",
            "https://canvas.example,not an origin",
            "CORS_ALLOWED_ORIGINS entry \"not an origin\" is not an origin",
        ),
        (
            "CORS_ALLOWED_ORIGINS",
            "https://canvas.example/app",
            "CORS_ALLOWED_ORIGINS entry \"https://canvas.example/app\" is not an origin",
        ),
        // Userinfo is no part of an origin: it was taken as https://a.example.com.
        (
            "CORS_ALLOWED_ORIGINS",
            "https://user:pw@a.example.com",
            "CORS_ALLOWED_ORIGINS entry \"https://user:pw@a.example.com\" is not an origin",
        ),
        (
            "CORS_ALLOWED_ORIGINS",
            "https://@a.example.com",
            "CORS_ALLOWED_ORIGINS entry \"https://@a.example.com\" is not an origin",
        ),
        ("DATABASE_MAX_CONNECTIONS", "0", "0 is not in 1..=10000"),
        // Places and quotas of 0 were taken: one connection for everyone, every upload 429.
        (
            "MAX_CONNECTIONS",
            "0",
            "MAX_CONNECTIONS=0: it must be at least 1",
        ),
        (
            "MAX_CONCURRENT_UPLOADS",
            "0",
            "MAX_CONCURRENT_UPLOADS=0: it must be at least 1",
        ),
        (
            "MAX_PENDING_BYTES_PER_WORKSPACE",
            "0",
            "MAX_PENDING_BYTES_PER_WORKSPACE=0: it must be at least 1",
        ),
        (
            "MAX_PENDING_FILES_PER_WORKSPACE",
            "0",
            "MAX_PENDING_FILES_PER_WORKSPACE=0: it must be at least 1",
        ),
        // And each has a top: a quota of 2^63 wrapped negative in the database (every upload
        // 429 again), slot and connection counts that large stopped the start-up with a panic.
        (
            "MAX_PENDING_BYTES_PER_WORKSPACE",
            "9223372036854775808",
            "MAX_PENDING_BYTES_PER_WORKSPACE=9223372036854775808: it must be at most 9223372036854775807",
        ),
        (
            "MAX_PENDING_FILES_PER_WORKSPACE",
            "18446744073709551615",
            "MAX_PENDING_FILES_PER_WORKSPACE=18446744073709551615: it must be at most 9223372036854775807",
        ),
        (
            "MAX_CONCURRENT_DOWNLOADS",
            "2305843009213693952",
            "MAX_CONCURRENT_DOWNLOADS=2305843009213693952: it must be at most 1000000",
        ),
        (
            "MAX_CONNECTIONS",
            "18446744073709551615",
            "MAX_CONNECTIONS=18446744073709551615: it must be at most 1000000",
        ),
        ("SWEEP_BATCH_SIZE", "-5", "-5 is not in 1..=100000"),
        // Taken before: every upload spooled to disk then answered 503 for ever.
        (
            "SPOOL_DIR",
            "/proc",
            "SPOOL_DIR /proc cannot hold spool files",
        ),
        ("LOG_FORMAT", "xml", "invalid value 'xml'"),
        // Each taken before, and failing only as it was used (an audit): S3 requests 503 at
        // every upload, a MySQL URL sent to PostgreSQL's connect. A URL's password is not shown.
        (
            "AWS_ENDPOINT_URL",
            "notaurl",
            "invalid value 'notaurl' for '--aws-endpoint-url <AWS_ENDPOINT_URL>': not an absolute http or https URL",
        ),
        (
            "AWS_ENDPOINT_URL",
            "ftp://127.0.0.1:21",
            "not an absolute http or https URL",
        ),
        (
            "DATABASE_URL",
            "mysql://app:hunter2@127.0.0.1:3306/app",
            "DATABASE_URL must be a postgres:// or postgresql:// URL",
        ),
    ];
    for (var, value, message) in cases {
        let mut serve = command(&db);
        serve
            .arg("serve")
            .env("BIND_ADDR", format!("127.0.0.1:{}", free_port()))
            .env(var, value);
        // A setting taken by mistake starts the service, which then serves for good: that is
        // this test's failure, not a hang (the child is killed when dropped).
        let running = tokio::process::Command::from(serve)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), running)
            .await
            .unwrap_or_else(|_| panic!("{var}={value} must not start: it ran for 30 s"))
            .unwrap();
        assert!(!out.status.success(), "{var}={value} must not start");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("hunter2"), "{var}: a password shown: {err}");
        // clap's own refusals are plain text; ours, under LOG_FORMAT=json, one `fatal` line.
        let fatal = log_lines(&out.stderr)
            .iter()
            .filter(|l| l["message"] == "fatal")
            .filter_map(|l| l["error"].as_str().map(String::from))
            .collect::<Vec<_>>();
        assert!(
            err.contains(message) || fatal.iter().any(|e| e.contains(message)),
            "{var}={value}: {err}"
        );
    }
}

/// The agent refuses a poll interval that would have it poll without pause (0) or never.
#[test]
fn the_agent_refuses_a_poll_interval_out_of_range() {
    for (value, message) in [
        (
            "0",
            "PENDING_UPLOADS_POLL_INTERVAL=0ns is shorter than 100ms",
        ),
        (
            "8d",
            "PENDING_UPLOADS_POLL_INTERVAL=691200s is longer than 7d",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_pending-uploads"))
            .args(["agent", "--platform-url", "http://127.0.0.1:9"])
            .args(["--workspace-id", "00000000-0000-0000-0000-000000000001"])
            .args(["--dir", "/nonexistent", "--poll-interval", value])
            .env("PENDING_UPLOADS_TOKEN", "t")
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "--poll-interval {value} must not run"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(message), "--poll-interval {value}: {err}");
    }
}

#[tokio::test]
async fn serve_configured_by_environment_then_sweep_subcommand_then_sigterm() {
    let db = fresh_db().await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut cmd = command(&db);
    cmd.env("MAX_FILES_PER_REQUEST", "3")
        .env("SWEEP_INTERVAL", "1h");
    let mut child = spawn_service(cmd, port).await;
    let client = reqwest::Client::new();
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let limits: Value = client
        .get(format!("{base}/uploads/limits"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        limits["max_files_per_request"], 3,
        "configured from the environment"
    );

    // the poll flow, as the README walk-through does it
    let (ws, token) = register_poll(&base).await;
    let form = reqwest::multipart::Form::new().part(
        "files",
        reqwest::multipart::Part::bytes(b"hello".to_vec())
            .file_name("hi there.txt")
            .mime_str("text/plain")
            .unwrap(),
    );
    let up: Value = client
        .post(format!("{base}/workspaces/{ws}/chat/uploads"))
        .bearer_auth(ADMIN)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let fid = file_id(&up["files"][0]);
    let got = downloaded(&client, &base, ws, fid, &token).await;
    assert_eq!(&got[..], b"hello");
    let ack = client
        .post(format!("{base}/workspaces/{ws}/pending-uploads/{fid}/ack"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(ack.status(), StatusCode::OK);

    // a rejected upload: a `failed` transition
    let empty = reqwest::multipart::Form::new().part(
        "files",
        reqwest::multipart::Part::bytes(Vec::new()).file_name("empty.txt"),
    );
    let resp = client
        .post(format!("{base}/workspaces/{ws}/chat/uploads"))
        .bearer_auth(ADMIN)
        .multipart(empty)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // metrics moved exactly as the traffic above
    let text = scrape_metrics(&base).await;
    let metric = |series: &str| -> f64 {
        metric_value(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(
        metric(r#"pending_uploads_files_staged_total{backend="bytea",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        metric(r#"pending_uploads_files_staged_total{backend="bytea",outcome="rejected"}"#),
        1.0
    );
    assert_eq!(
        metric(r#"pending_uploads_bytes_staged_total{backend="bytea"}"#),
        5.0
    );
    assert_eq!(
        metric(r#"pending_uploads_files_fetched_total{backend="bytea",outcome="ok"}"#),
        1.0
    );
    assert_eq!(metric("pending_uploads_uploads_in_progress"), 0.0);
    assert_eq!(
        metric(r#"pending_uploads_bytes_served_total{backend="bytea"}"#),
        5.0
    );
    assert_eq!(
        metric(r#"pending_uploads_files_acked_total{backend="bytea",outcome="acked"}"#),
        1.0
    );
    assert_eq!(metric("pending_uploads_upload_size_bytes_count"), 1.0);
    assert_eq!(
        metric(
            r#"pending_uploads_http_request_duration_seconds_count{method="POST",route="/workspaces/{id}/chat/uploads",status="200"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            r#"pending_uploads_storage_operation_duration_seconds_count{backend="bytea",operation="get"}"#
        ),
        1.0
    );

    // one sweep pass from the CLI, zero retention
    let out = run_ok(command(&db).arg("sweep").env("ACK_RETENTION", "0"));
    let printed = stdout_json(&out);
    assert_eq!(
        printed,
        json!({"swept_rows": 1, "swept_bytes": 5, "objects_deleted": 0, "object_errors": 0, "orphans_deleted": 0, "orphan_reconciliation_failed": false, "activity_rows_deleted": 0})
    );
    let swept = log_lines(&out.stderr);
    let line = swept
        .iter()
        .find(|l| l["event"] == "swept")
        .expect("a swept log line");
    assert_eq!(line["file_id"], fid.to_string());
    assert_eq!(line["workspace_id"], ws.to_string());
    assert_eq!(line["size"], 5);
    assert_eq!(line["name"], "hi_there.txt");
    assert_eq!(line["backend"], "bytea");
    let short_retention = |lines: &[Value]| {
        lines.iter().any(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("ACTIVITY_RETENTION is shorter than"))
        })
    };
    assert!(!short_retention(&swept), "the default keeps them 7 days");
    // An activity retention shorter than an upload's life is said (it was taken silently).
    let out = run_ok(command(&db).arg("sweep").env("ACTIVITY_RETENTION", "1h"));
    assert!(short_retention(&log_lines(&out.stderr)));

    // SIGTERM: exits cleanly
    let started = Instant::now();
    let out = child.terminate().await;
    assert!(out.status.success(), "clean exit on SIGTERM");
    assert!(started.elapsed() < Duration::from_secs(10));
    let lines = log_lines(&out.stderr);
    for event in ["staged", "fetched", "acked"] {
        let line = lines
            .iter()
            .find(|l| l["event"] == event)
            .unwrap_or_else(|| panic!("no {event} line"));
        // SPEC §8: workspace_id, file_id, size, sanitized name and backend on each.
        assert_eq!(line["file_id"], fid.to_string(), "{event}");
        assert_eq!(line["workspace_id"], ws.to_string(), "{event}");
        assert_eq!(
            (&line["size"], &line["name"], &line["backend"]),
            (&json!(5), &json!("hi_there.txt"), &json!("bytea")),
            "{event}"
        );
    }
    let failed = lines
        .iter()
        .find(|l| l["event"] == "failed")
        .expect("a failed line");
    assert_eq!(failed["workspace_id"], ws.to_string());
    assert_eq!(failed["status"], 400);
    let staged = lines.iter().find(|l| l["event"] == "staged").unwrap();
    assert_eq!(
        (
            staged["size"].clone(),
            staged["name"].clone(),
            staged["backend"].clone()
        ),
        (json!(5), json!("hi_there.txt"), json!("bytea"))
    );
    let all = String::from_utf8_lossy(&out.stderr);
    assert!(!all.contains(ADMIN), "the admin token is never logged");
    assert!(!all.contains(&token), "workspace tokens are never logged");
}

/// The memory figures in README (10,000 waiting long polls, 16 × 20 MiB in flight) depend on
/// jemalloc being the allocator with the service's own `malloc_conf`; an operator's
/// `MALLOC_CONF` is read on top of it.
#[test]
fn the_allocator_is_jemalloc_with_the_service_settings() {
    let stats = |conf: &str| {
        let out = Command::new(BIN)
            .arg("--help")
            .env("MALLOC_CONF", conf)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let defaults = stats("stats_print:true");
    for setting in [
        "opt.background_thread: true",
        "opt.narenas: 2",
        "opt.dirty_decay_ms: 1000",
        "opt.muzzy_decay_ms: 0",
        "opt.oversize_threshold: 524288",
    ] {
        assert!(defaults.contains(setting), "{setting} missing:\n{defaults}");
    }
    let overridden = stats("stats_print:true,narenas:3");
    assert!(overridden.contains("opt.narenas: 3"), "{overridden}");
}

/// SPEC §3: without an admin token there is no admin access. A blank ADMIN_TOKEN (an env file's
/// `ADMIN_TOKEN=` or a stray space) gave none, but the start-up line said `admin=true`; it says
/// false now, with a warning.
#[tokio::test]
async fn a_blank_admin_token_is_no_admin_and_says_so() {
    let db = fresh_db().await;
    let port = free_port();
    let mut cmd = command(&db);
    // The flag wins over the ADMIN_TOKEN spawn_service sets.
    cmd.args(["serve", "--admin-token", " "]);
    let mut running = spawn_service(cmd, port).await;
    for bearer in [" ", ADMIN] {
        let resp = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/workspaces"))
            .header("Authorization", format!("Bearer {bearer}"))
            .json(&json!({"name": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{bearer:?}");
    }
    let out = running.terminate().await;
    let lines = log_lines(&out.stderr);
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "ADMIN_TOKEN is set but blank: no admin access"),
        "{lines:?}"
    );
    let listening = lines
        .iter()
        .find(|l| l["message"] == "pending-uploads listening")
        .expect("the start-up line");
    assert_eq!(listening["admin"], false);
}

/// A database that cannot be reached at start-up: the error says why. Before, sqlx's pool
/// retried until DEPENDENCY_TIMEOUT and kept only "pool timed out while waiting for an open
/// connection", with no word of the refused connection behind it (a black-box probe); and the
/// error came out twice.
#[test]
fn an_unreachable_database_at_start_up_says_why() {
    let closed = free_port();
    let out = Command::new(service_bin())
        .env_clear()
        .env(
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{closed}/none"),
        )
        .env("DEPENDENCY_TIMEOUT", "1s")
        .env("BIND_ADDR", format!("127.0.0.1:{}", free_port()))
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("connecting to DATABASE_URL") && err.contains("refused"),
        "{err}"
    );
    assert_eq!(
        err.matches("connecting to DATABASE_URL").count(),
        1,
        "{err}"
    );
}

/// A database that is down at start-up is waited for up to DEPENDENCY_TIMEOUT; before, the
/// process said nothing for all that time (10 s by default, up to 7 days), then exited. Now a
/// line says it is waiting, and for what, within seconds, naming no password.
#[test]
fn a_start_up_waiting_on_the_database_says_so() {
    use std::io::BufRead;
    let closed = free_port();
    let mut child = Command::new(service_bin())
        .env_clear()
        .env(
            "DATABASE_URL",
            format!("postgres://postgres:sekret@127.0.0.1:{closed}/none"),
        )
        .env("DEPENDENCY_TIMEOUT", "60s")
        .env("BIND_ADDR", format!("127.0.0.1:{}", free_port()))
        .arg("serve")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let line = std::iter::from_fn(|| {
        let left = Duration::from_secs(10).saturating_sub(started.elapsed());
        rx.recv_timeout(left).ok()
    })
    .find(|l| l.contains("event=\"database_waiting\""));
    let still_waiting = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("a line while waiting on the database");
    assert!(still_waiting && started.elapsed() < Duration::from_secs(10));
    assert!(
        line.contains(&format!("database=127.0.0.1:{closed}/none")),
        "{line}"
    );
    assert!(line.contains("timeout=60s"), "{line}");
    assert!(!line.contains("sekret"), "{line}");
}

/// A platform URL that is none is refused at start, saying so. Before, it came out as
/// reqwest's "builder error" after a pass of retries (a black-box probe).
#[test]
fn the_agent_refuses_a_platform_url_that_is_none() {
    for bad in [
        "localhost:8080",
        "htp:/x",
        "ftp://platform.example",
        "http://a/?q=1",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_pending-uploads"))
            .args(["agent", "--platform-url", bad])
            .args(["--workspace-id", "00000000-0000-0000-0000-000000000001"])
            .args(["--dir", "/nonexistent", "--once"])
            .env("PENDING_UPLOADS_TOKEN", "t")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--platform-url") && err.contains("must be an http(s) URL"),
            "{bad}: {err}"
        );
    }
    // reqwest sent the user and password as Basic auth beside the Bearer, and the service
    // answered a valid token 401 (a probe).
    let out = Command::new(env!("CARGO_BIN_EXE_pending-uploads"))
        .args(["agent", "--platform-url", "http://proxy:hunter2@a.example"])
        .args(["--workspace-id", "00000000-0000-0000-0000-000000000001"])
        .args(["--dir", "/nonexistent", "--once"])
        .env("PENDING_UPLOADS_TOKEN", "t")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must not hold a user or password"), "{err}");
}

/// Before, any grace started: one under an upload's time had the orphan reconciliation delete
/// the objects of uploads still being received, whose rows then committed pointing at
/// nothing. With a bucket, serve refuses it; without one nothing is reconciled, and it starts.
#[tokio::test]
async fn an_orphan_grace_shorter_than_an_upload_is_refused_where_objects_are_reconciled() {
    let db = fresh_db().await;
    let out = command(&db)
        .arg("serve")
        .env("BIND_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("PENDING_UPLOADS_S3_BUCKET", "any")
        .env("ORPHAN_GRACE", "30m")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let fatal: Vec<String> = log_lines(&out.stderr)
        .iter()
        .filter_map(|l| l["error"].as_str().map(String::from))
        .collect();
    assert!(
        fatal
            .iter()
            .any(|e| e
                .contains("ORPHAN_GRACE=1800s is shorter than twice UPLOAD_BODY_TIMEOUT=1200s")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let mut cmd = command(&db);
    cmd.arg("serve").env("ORPHAN_GRACE", "30m");
    let _running = spawn_service(cmd, port).await;
}

/// An admin token read from a mounted secret ends in a newline; bearers are compared trimmed,
/// so it never matched (and the start-up line said admin=true). It is trimmed now.
#[tokio::test]
async fn an_admin_token_with_a_trailing_newline_works() {
    let db = fresh_db().await;
    let port = free_port();
    let mut cmd = command(&db);
    cmd.args(["serve", "--admin-token", "mounted-secret-token\n"]);
    let _running = spawn_service(cmd, port).await;
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/workspaces"))
        .bearer_auth("mounted-secret-token")
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// A fatal error is printed once; under LOG_FORMAT=json as a log line, unless RUST_LOG hides
/// errors, when it is printed plainly rather than not at all.
#[test]
fn a_fatal_error_is_printed_even_when_logs_are_off() {
    let out = Command::new(service_bin())
        .env_clear()
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "off")
        .env("CORS_ALLOWED_ORIGINS", "*")
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a wildcard"), "{err}");
}

/// A PostgreSQL cluster of its own that speaks TLS only (`hostssl`), its certificate issued
/// for `localhost` and 127.0.0.1 by a CA of its own (`ca.crt`); stopped when dropped.
struct TlsPostgres {
    dir: tempfile::TempDir,
    port: u16,
}

impl TlsPostgres {
    fn start() -> TlsPostgres {
        let dir = tempfile::Builder::new()
            .prefix("pu-tls-pg")
            .tempdir_in("/tmp")
            .unwrap();
        let port = free_port();
        let script = format!(
            r#"set -e
            . {root}/scripts/pg.sh
            cd {dir}
            openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=pu-test-ca \
              -keyout ca.key -out ca.crt 2>/dev/null
            openssl req -newkey rsa:2048 -nodes -subj /CN=localhost \
              -keyout server.key -out server.csr 2>/dev/null
            printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > server.ext
            openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 \
              -extfile server.ext -out server.crt 2>/dev/null
            chmod 600 server.key
            [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1 && chown postgres server.key server.crt
            PG_EXTRA_OPTS="-c ssl=on -c ssl_cert_file={dir}/server.crt -c ssl_key_file={dir}/server.key" \
              pg_start {dir}/pg {port}
            # Plain TCP refused: only hostssl lines.
            sed -i 's/^host /hostssl /' {dir}/pg/data/pg_hba.conf
            as_pg "$(pg_bindir)/pg_ctl" -D {dir}/pg/data reload >/dev/null"#,
            root = env!("CARGO_MANIFEST_DIR"),
            dir = dir.path().display(),
        );
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "TLS cluster: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TlsPostgres { dir, port }
    }

    fn url(&self, params: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?{params}",
            self.port
        )
    }

    fn ca(&self) -> String {
        self.dir.path().join("ca.crt").display().to_string()
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg("-c")
            .arg(format!(
                ". {}/scripts/pg.sh; pg_stop {}/pg",
                env!("CARGO_MANIFEST_DIR"),
                self.dir.path().display()
            ))
            .status();
    }
}

/// scripts/test.sh and scripts/bench.sh stop their PostgreSQL from an EXIT trap. A run that
/// failed left it running, its directory deleted under it: inside a trap, `pg_bindir`'s bare
/// `return` returned the status the script was exiting with, so `pg_stop` took it for
/// "no binaries" and stopped nothing.
#[test]
fn a_failed_script_run_stops_its_postgres() {
    let dir = tempfile::Builder::new()
        .prefix("pu-trap-pg")
        .tempdir_in("/tmp")
        .unwrap();
    let script = format!(
        r#". {root}/scripts/pg.sh
        trap 'pg_stop {dir}/pg' EXIT
        pg_start {dir}/pg {port} >/dev/null
        exit 3"#,
        root = env!("CARGO_MANIFEST_DIR"),
        dir = dir.path().display(),
        port = free_port(),
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid_file = dir.path().join("pg/data/postmaster.pid");
    let left = std::fs::read_to_string(&pid_file).ok();
    if let Some(pid) = left.as_deref().and_then(|p| p.lines().next()) {
        let _ = Command::new("kill").arg(pid.trim()).status();
    }
    assert!(
        left.is_none(),
        "PostgreSQL still runs after the script's failed exit"
    );
}

/// LocalStack gives its gateway 15 s to open its port; past that it logs "gave up waiting for
/// gateway server" and stays up without S3 for good. On a busy machine (a bench beside it) it
/// once started so, and localstack/start.sh, which scripts/test.sh and scripts/bench.sh run,
/// waited out its two minutes and failed. Here the gateway's port is held (bound, not
/// listening: the gateway cannot open it, and a connect to it is refused) until LocalStack
/// gives up; start.sh starts it again and succeeds.
#[test]
fn localstack_starts_again_when_its_gateway_gave_up() {
    let dir = tempfile::Builder::new()
        .prefix("pu-ls-retry")
        .tempdir_in("/tmp")
        .unwrap();
    let port = free_port();
    let held = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    held.bind(&addr.into()).unwrap();
    // Let go once LocalStack has given up (however long its start took on a busy machine),
    // before start.sh has stopped it and started it again; or once start.sh is done.
    let log_file = dir.path().join("localstack.log");
    let (done, start_sh_ran) = std::sync::mpsc::channel::<()>();
    let release = std::thread::spawn(move || {
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            start_sh_ran.recv_timeout(Duration::from_millis(50))
        {
            let log = std::fs::read_to_string(&log_file).unwrap_or_default();
            if log.contains("gave up waiting for gateway server") {
                break;
            }
        }
        drop(held);
    });
    let script = |name: &str| format!("{}/localstack/{name}", env!("CARGO_MANIFEST_DIR"));
    let started = Instant::now();
    let out = Command::new(script("start.sh"))
        .args([
            &dir.path().display().to_string(),
            &port.to_string(),
            "pu-retry",
        ])
        .output()
        .unwrap();
    let took = started.elapsed();
    drop(done);
    // The bucket start.sh made (a listing of it, with curl as start.sh checks).
    let listed = Command::new("curl")
        .args(["-fs", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}/pu-retry"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let _ = Command::new(script("stop.sh")).arg(dir.path()).status();
    release.join().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "start.sh failed after {took:?}: {log}"
    );
    assert!(
        log.contains("gave up waiting for gateway server") && log.contains("attempt 1 of 3"),
        "the first start did not give up (the port was not held?): {log}"
    );
    assert_eq!(
        listed.ok().as_deref(),
        Some("200"),
        "the bucket after the start"
    );
}

/// A database that takes TLS only (managed PostgreSQL often does) could not be used: the
/// binary was built without TLS, so `sslmode=require` stopped it ("SQLx was built without TLS
/// support enabled") and the default `prefer` always spoke plain TCP (a red team). The
/// server's certificate is checked with `verify-full` against `sslrootcert` (or the system's
/// roots).
#[test]
fn the_database_may_require_tls() {
    let pg = TlsPostgres::start();
    // The reload that took plain TCP away is asynchronous: wait until it is refused.
    let started = Instant::now();
    loop {
        let plain = command(&pg.url("sslmode=disable"))
            .arg("migrate")
            .output()
            .unwrap();
        if !plain.status.success() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "plain TCP taken"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for params in [
        // The default: TLS when the server offers it.
        "sslmode=prefer".to_string(),
        "sslmode=require".to_string(),
        format!("sslmode=verify-full&sslrootcert={}", pg.ca()),
    ] {
        let out = command(&pg.url(&params)).arg("migrate").output().unwrap();
        assert!(
            out.status.success(),
            "{params}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // verify-full checks the certificate: this one is issued by no root the system trusts.
    let out = command(&pg.url("sslmode=verify-full"))
        .arg("migrate")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unknown issuer is refused");
    assert!(err.contains("invalid peer certificate"), "{err}");
}

/// `openapi` into a full or closed stdout panicked (exit 101 and a backtrace; a red team's
/// `openapi > /dev/full`): it says why and exits 1.
#[test]
fn openapi_into_a_full_stdout_fails_plainly() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = command("postgres://unused")
        .arg("openapi")
        .stdout(full)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("writing the OpenAPI document to stdout"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
