use std::time::Duration;

use futures::stream;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::common::*;

/// A multipart body built by hand, for parts reqwest will not write.
/// (field name, filename, Content-Type, bytes)
type RawPart<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

fn raw_multipart(parts: &[RawPart]) -> (String, Vec<u8>) {
    let boundary = "XBOUNDARYx7d2";
    let mut body = Vec::new();
    for (name, filename, ct, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let mut disp = format!("Content-Disposition: form-data; name=\"{name}\"");
        if let Some(f) = filename {
            disp.push_str(&format!("; filename=\"{f}\""));
        }
        body.extend_from_slice(disp.as_bytes());
        body.extend_from_slice(b"\r\n");
        if let Some(ct) = ct {
            body.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn post_raw(
    app: &TestApp,
    ws: Uuid,
    token: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    app.client
        .post(app.at(&format!("/workspaces/{ws}/chat/uploads")))
        .bearer_auth(token)
        .header("Content-Type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn staged_files_rows_and_activity_in_input_order() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let files = vec![
        ("hello world.pdf", "application/pdf", bytes(3000, 1)),
        (
            "../../etc/passwd",
            "text/plain; charset=utf-8",
            bytes(10, 2),
        ),
        (
            "中文.docx",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            bytes(1, 3),
        ),
    ];
    let out = app.upload_ok(ws, &token, &files).await;
    assert_eq!(out.len(), 3);
    let want = [
        ("hello_world.pdf", "application/pdf", 3000),
        ("passwd", "text/plain", 10),
        (
            "__.docx",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            1,
        ),
    ];
    for (entry, (name, mime, size)) in out.iter().zip(want) {
        let fid = file_id(entry);
        assert_eq!(
            entry,
            &json!({"uri": format!("platform-pending:{ws}/{fid}"), "name": name, "mimeType": mime, "size": size})
        );
        let (db_name, db_mime, db_size, content, sha): (String, String, i64, Vec<u8>, Vec<u8>) = sqlx::query_as(
            "SELECT filename, mimetype, size_bytes, content, content_sha256 FROM pending_uploads WHERE file_id = $1 AND workspace_id = $2",
        )
        .bind(fid)
        .bind(ws)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(
            (db_name.as_str(), db_mime.as_str(), db_size),
            (name, mime, size as i64)
        );
        assert_eq!(sha, Sha256::digest(&content).to_vec());
        let act: (String, Option<String>, Option<Uuid>, Option<String>, String, Value) = sqlx::query_as(
            "SELECT activity_type, method, target_id, summary, status, request_body FROM activity_logs
             WHERE workspace_id = $1 AND request_body->>'file_id' = $2",
        )
        .bind(ws)
        .bind(fid.to_string())
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(act.0, "a2a_receive");
        assert_eq!(act.1.as_deref(), Some("chat_upload_receive"));
        assert_eq!(act.2, Some(ws));
        assert_eq!(act.3.unwrap(), format!("chat_upload_receive: {name}"));
        assert_eq!(act.4, "ok");
        assert_eq!(
            act.5,
            json!({"file_id": fid, "name": name, "mimeType": mime, "size": size, "uri": format!("platform-pending:{ws}/{fid}")})
        );
    }
    let contents: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT content FROM pending_uploads ORDER BY size_bytes DESC")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        contents,
        vec![files[0].2.clone(), files[1].2.clone(), files[2].2.clone()]
    );
    assert_eq!(open_spool_files(&app.spool_dir), 0);
}

#[tokio::test]
async fn workspace_id_and_existence_checks_come_first() {
    let app = TestApp::start().await;
    let f = [("a.txt", "text/plain", b"a".to_vec())];
    let resp = app
        .client
        .post(app.at("/workspaces/nope/chat/uploads"))
        .bearer_auth(ADMIN)
        .multipart(reqwest::multipart::Form::new().text("files", "x"))
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, "invalid workspace ID").await;
    assert_error(
        app.upload(Uuid::new_v4(), ADMIN, &f).await,
        StatusCode::NOT_FOUND,
        "workspace not found",
    )
    .await;
    let (ws, _) = app.poll_workspace().await;
    let resp = app
        .client
        .post(app.at(&format!("/workspaces/{ws}/chat/uploads")))
        .send()
        .await
        .unwrap();
    assert_error(
        resp,
        StatusCode::UNAUTHORIZED,
        "missing workspace auth token",
    )
    .await;
    assert_eq!(
        app.upload(ws, ADMIN, &f).await.status(),
        StatusCode::OK,
        "admin may upload for any workspace"
    );
}

#[tokio::test]
async fn malformed_and_missing_parts() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let (ct, body) = raw_multipart(&[("other", None, None, b"value")]);
    assert_error(
        post_raw(&app, ws, &token, &ct, body).await,
        StatusCode::BAD_REQUEST,
        "no files field in request",
    )
    .await;
    let (ct, _) = raw_multipart(&[]);
    assert_error(
        post_raw(
            &app,
            ws,
            &token,
            &ct,
            b"--XBOUNDARYx7d2\r\nContent-Disposition: garbage\r\n".to_vec(),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "malformed multipart body",
    )
    .await;
    assert_error(
        post_raw(&app, ws, &token, "application/json", b"{}".to_vec()).await,
        StatusCode::BAD_REQUEST,
        "malformed multipart body",
    )
    .await;
    assert_error(
        post_raw(&app, ws, &token, "multipart/form-data", b"x".to_vec()).await,
        StatusCode::BAD_REQUEST,
        "malformed multipart body",
    )
    .await;
    // a truncated body: the closing boundary never comes
    let (ct, body) =
        raw_multipart(&[("files", Some("a.txt"), Some("text/plain"), b"complete file")]);
    let cut = body[..body.len() - 30].to_vec();
    assert_error(
        post_raw(&app, ws, &token, &ct, cut).await,
        StatusCode::BAD_REQUEST,
        "malformed multipart body",
    )
    .await;
    app.assert_nothing_staged().await;
}

#[tokio::test]
async fn too_many_files() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let files: Vec<(&str, &str, Vec<u8>)> = (0..65)
        .map(|i| ("f.txt", "text/plain", vec![i as u8 + 1]))
        .collect();
    assert_error(
        app.upload(ws, &token, &files).await,
        StatusCode::BAD_REQUEST,
        "too many files (limit 64)",
    )
    .await;
    app.assert_nothing_staged().await;
    assert_eq!(app.upload_ok(ws, &token, &files[..64]).await.len(), 64);

    let app = TestApp::start_with(&["--max-files-per-request", "2"]).await;
    let (ws, token) = app.poll_workspace().await;
    assert_error(
        app.upload(ws, &token, &files[..3]).await,
        StatusCode::BAD_REQUEST,
        "too many files (limit 2)",
    )
    .await;
    app.assert_nothing_staged().await;
}

#[tokio::test]
async fn per_file_cap_default_is_the_canvas_100_mb() {
    let app = TestApp::start().await;
    let limits = app.limits().await;
    assert_eq!(limits["per_file_bytes"], 104_857_600);
    assert_eq!(limits["per_request_bytes"], 104_857_600);
    // a 60 MB file passes the canvas's check, and ours
    let (ws, token) = app.poll_workspace().await;
    let out = app
        .upload_ok(
            ws,
            &token,
            &[("video.mp4", "video/mp4", bytes(60_000_000, 9))],
        )
        .await;
    assert_eq!(out[0]["size"], 60_000_000);
}

#[tokio::test]
async fn one_oversize_file_stores_nothing() {
    let app = TestApp::start_with(&["--max-file-bytes", "26214400"]).await;
    let (ws, token) = app.poll_workspace().await;
    let max = 26_214_400usize;
    let resp = app
        .upload(
            ws,
            &token,
            &[
                ("ok.txt", "text/plain", bytes(100, 1)),
                (
                    "big file.bin",
                    "application/octet-stream",
                    bytes(max + 1, 2),
                ),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"], "file exceeds per-file cap");
    assert_eq!(v["filename"], "big file.bin", "the name as sent");
    assert_eq!(v["max"], max);
    let seen = v["size"].as_u64().unwrap();
    assert!(
        seen > max as u64 && seen <= max as u64 + 1,
        "size is the bytes seen: {seen}"
    );
    app.assert_nothing_staged().await;
    // exactly at the cap is fine
    let out = app
        .upload_ok(
            ws,
            &token,
            &[("max.bin", "application/octet-stream", bytes(max, 3))],
        )
        .await;
    assert_eq!(out[0]["size"], max);
}

#[tokio::test]
async fn per_file_cap_is_configurable_downward() {
    let app = TestApp::start_with(&["--max-file-bytes", "1000"]).await;
    let (ws, token) = app.poll_workspace().await;
    let resp = app
        .upload(ws, &token, &[("a.txt", "text/plain", bytes(1001, 1))])
        .await;
    assert_json(
        resp,
        StatusCode::PAYLOAD_TOO_LARGE,
        json!({"error": "file exceeds per-file cap", "filename": "a.txt", "size": 1001, "max": 1000}),
    )
    .await;
    app.assert_nothing_staged().await;
    let limits = app.limits().await;
    assert_eq!(limits["per_file_bytes"], 1000);
}

#[tokio::test]
async fn per_request_cap_with_and_without_content_length() {
    let app = TestApp::start_with(&["--max-request-bytes", "10000"]).await;
    let (ws, token) = app.poll_workspace().await;
    let files = [
        ("a.bin", "application/octet-stream", bytes(6000, 1)),
        ("b.bin", "application/octet-stream", bytes(6000, 2)),
    ];
    let want = json!({"error": "request body exceeds per-request cap", "max": 10000});
    // with Content-Length: refused before reading
    assert_json(
        app.upload(ws, &token, &files).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        want.clone(),
    )
    .await;
    // chunked: refused once the cap is crossed
    let (ct, body) = raw_multipart(&[
        ("files", Some("a.bin"), None, &bytes(6000, 1)),
        ("files", Some("b.bin"), None, &bytes(6000, 2)),
    ]);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(1000).map(|c| Ok(c.to_vec())).collect();
    let resp = post_raw(
        &app,
        ws,
        &token,
        &ct,
        reqwest::Body::wrap_stream(stream::iter(chunks)),
    )
    .await;
    assert_json(resp, StatusCode::PAYLOAD_TOO_LARGE, want).await;
    app.assert_nothing_staged().await;
    let limits = app.limits().await;
    assert_eq!(limits["per_request_bytes"], 10000);
}

#[tokio::test]
async fn empty_file_is_400_and_stores_nothing() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let resp = app
        .upload(
            ws,
            &token,
            &[
                ("good.txt", "text/plain", b"fine".to_vec()),
                ("empty.txt", "text/plain", vec![]),
            ],
        )
        .await;
    assert_json(
        resp,
        StatusCode::BAD_REQUEST,
        json!({"error": "file is empty", "filename": "empty.txt"}),
    )
    .await;
    app.assert_nothing_staged().await;
}

#[tokio::test]
async fn mimetypes_are_reduced_and_odd_ones_neutralized() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let (ct, body) = raw_multipart(&[
        (
            "files",
            Some("a.html"),
            Some("text/html; charset=\"utf-8\""),
            b"<p>",
        ),
        ("files", Some("b.bin"), Some("not a mime"), b"b"),
        ("files", Some("c.bin"), Some("noslash"), b"c"),
        ("files", Some("d.bin"), None, b"d"),
        (
            "files",
            Some("semi;colon (2).txt"),
            Some("text/plain"),
            b"e",
        ),
        // Sent raw, as a browser sends a file's name (HTML escapes only CR, LF and `"`):
        // SPEC §5 and §4 say what becomes of them; it was a 400 before.
        (
            "files",
            Some("ctl\x01name\x7f.txt"),
            Some("text/pl\x00ain"),
            b"f",
        ),
        ("ignored", None, None, b"other fields are skipped"),
    ]);
    let resp = post_raw(&app, ws, &token, &ct, body).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    let got: Vec<(String, String)> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().into(),
                f["mimeType"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("a.html", "text/html"),
        ("b.bin", "application/octet-stream"),
        ("c.bin", "application/octet-stream"),
        ("d.bin", ""),
        ("semi_colon__2_.txt", "text/plain"),
        ("ctl_name_.txt", "application/octet-stream"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn pending_quota_is_429_with_retry_after_and_frees_on_ack() {
    let app = TestApp::start_with(&["--max-pending-bytes-per-workspace", "1000"]).await;
    let (ws, token) = app.poll_workspace().await;
    let first = app
        .upload_ok(
            ws,
            &token,
            &[("a.bin", "application/octet-stream", bytes(600, 1))],
        )
        .await;
    // One file that would cross it, then two that would together: one file's bytes are staged
    // as a `bytea`, several files' as a `bytea[]`, and both refusals delete what they inserted.
    let one = vec![("b.bin", "application/octet-stream", bytes(600, 2))];
    let two = vec![
        ("b.bin", "application/octet-stream", bytes(200, 2)),
        ("c.bin", "application/octet-stream", bytes(201, 3)),
    ];
    for files in [one, two] {
        let resp = app.upload(ws, &token, &files).await;
        assert_eq!(resp.headers().get("retry-after").unwrap(), "60");
        assert_json(
            resp,
            StatusCode::TOO_MANY_REQUESTS,
            json!({"error": "workspace pending-upload quota exceeded", "pending_bytes": 600, "max": 1000}),
        )
        .await;
        assert_eq!(app.count("pending_uploads").await, 1);
        assert_eq!(app.count("activity_logs").await, 1);
        assert_totals_exact(&app.pool).await;
    }
    // another workspace is not affected
    let (ws2, token2) = app.poll_workspace().await;
    app.upload_ok(
        ws2,
        &token2,
        &[("b.bin", "application/octet-stream", bytes(600, 2))],
    )
    .await;
    // acking frees the quota
    let fid = file_id(&first[0]);
    assert_eq!(
        app.post(
            &format!("/workspaces/{ws}/pending-uploads/{fid}/ack"),
            &token
        )
        .await
        .status(),
        StatusCode::OK
    );
    app.upload_ok(
        ws,
        &token,
        &[("b.bin", "application/octet-stream", bytes(600, 2))],
    )
    .await;
}

/// The quota reads a trigger-kept total; it must follow every writer and every transition.
/// The workspace's unacked bytes as the quota check sees them (committed rows).
async fn pending_bytes(pool: &sqlx::PgPool, ws: Uuid) -> i64 {
    pending_uploads::db::uploads::pending_totals(pool, ws)
        .await
        .unwrap()
        .bytes
}

#[tokio::test]
async fn the_quota_total_follows_every_writer() {
    let app = TestApp::start().await;
    let (a, a_token) = app.poll_workspace().await;
    let (b, b_token) = app.poll_workspace().await;
    let quota = |ws: Uuid| pending_bytes(&app.pool, ws);
    let exec = |sql: &'static str, id: Uuid| {
        let pool = app.pool.clone();
        async move {
            sqlx::query(sql).bind(id).execute(&pool).await.unwrap();
        }
    };
    let files = app
        .upload_ok(
            a,
            &a_token,
            &[
                ("1.bin", "application/octet-stream", bytes(100, 1)),
                ("2.bin", "application/octet-stream", bytes(200, 2)),
                ("3.bin", "application/octet-stream", bytes(400, 3)),
                ("4.bin", "application/octet-stream", bytes(800, 4)),
            ],
        )
        .await;
    app.upload_ok(b, &b_token, &[("b.bin", "text/plain", bytes(50, 5))])
        .await;
    let fid: Vec<Uuid> = files.iter().map(file_id).collect();
    assert_eq!((quota(a).await, quota(b).await), (1500, 50));
    assert_totals_exact(&app.pool).await;

    // ack, twice (idempotent)
    for _ in 0..2 {
        let path = format!("/workspaces/{a}/pending-uploads/{}/ack", fid[0]);
        assert_eq!(app.post(&path, &a_token).await.status(), StatusCode::OK);
    }
    assert_eq!(quota(a).await, 1400);
    // expiry frees quota at once, before any sweep
    exec(
        "UPDATE pending_uploads SET expires_at = now() - interval '1 second' WHERE file_id = $1",
        fid[1],
    )
    .await;
    assert_eq!(quota(a).await, 1200);
    assert_totals_exact(&app.pool).await;
    // the sweep removes the expired row; the total follows
    app.sweeper.run_once().await.unwrap();
    assert_eq!(app.count("pending_uploads").await, 4);
    assert_eq!(quota(a).await, 1200);
    assert_totals_exact(&app.pool).await;
    // an operator's DELETE, and an un-ack
    exec("DELETE FROM pending_uploads WHERE file_id = $1", fid[2]).await;
    assert_eq!(quota(a).await, 800);
    exec(
        "UPDATE pending_uploads SET acked_at = NULL WHERE file_id = $1",
        fid[0],
    )
    .await;
    assert_eq!(quota(a).await, 900);
    assert_totals_exact(&app.pool).await;
    // another writer's insert (the platform, a previous binary), and an insert settled in
    // its own transaction
    exec(
        "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename) VALUES ($1, '\\x00', 7, 'x')",
        b,
    )
    .await;
    assert_eq!(quota(b).await, 57);
    let mut tx = app.pool.begin().await.unwrap();
    let c = Uuid::new_v4();
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename) VALUES ($1, '\\x00', 9, 'y') RETURNING file_id",
    )
    .bind(c)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    sqlx::query("UPDATE pending_uploads SET acked_at = now() WHERE file_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(quota(c).await, 0);
    // a rolled-back upload never counted
    let mut tx = app.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename) VALUES ($1, '\\x00', 11, 'z')",
    )
    .bind(b)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(quota(b).await, 57);
    assert_totals_exact(&app.pool).await;
    // bulk statements over several workspaces (an insert parks a delta per row, the others
    // settle once per statement)
    for sql in [
        "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename)
         SELECT md5((g % 5)::text)::uuid, '\\x00', 3, 'bulk' || g FROM generate_series(1, 5000) g",
        "UPDATE pending_uploads SET acked_at = now() WHERE filename LIKE 'bulk%' AND right(filename, 1) < '5'",
        "UPDATE pending_uploads SET fetched_at = now()",
        "DELETE FROM pending_uploads WHERE filename LIKE 'bulk%' AND right(filename, 1) IN ('2', '7')",
    ] {
        sqlx::query(sql).execute(&app.pool).await.unwrap();
        assert_totals_exact(&app.pool).await;
    }
    assert_eq!(app.count("pending_upload_total_deltas").await, 0);
}

/// An insert or a delete by a transaction that says its caller counts the rows itself, under
/// the workspace lock (`pending_uploads.totals_now = 'caller'`, what `pending_uploads_stage`
/// sets), leaves the totals alone; any other insert parks a delta that is folded in at commit
/// (so a long COPY before the lock does not hold the total row).
#[tokio::test]
async fn writers_that_count_their_own_rows_leave_the_totals_alone() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let committed = |ws: Uuid| pending_bytes(&app.pool, ws);
    for caller in [false, true] {
        let before = committed(ws).await;
        let mut tx = app.pool.begin().await.unwrap();
        if caller {
            sqlx::query("SELECT set_config('pending_uploads.totals_now', 'caller', true)")
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        let id: Uuid = sqlx::query_scalar("INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename) VALUES ($1, '\\x00', 5, 'x') RETURNING file_id")
            .bind(ws)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_upload_total_deltas")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(parked, i64::from(!caller), "caller {caller}");
        if caller {
            // a refused upload's rows go again, uncounted
            sqlx::query("DELETE FROM pending_uploads WHERE file_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        let added = if caller { 0 } else { 5 };
        assert_eq!(committed(ws).await - before, added, "caller {caller}");
        assert_totals_exact(&app.pool).await;
    }
    assert_eq!(app.count("pending_upload_total_deltas").await, 0);
    // The small-upload path sets it: with deltas refused outright, a 1 KiB upload still
    // commits, and counts.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_deltas() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'no deltas here'; END $$;
         CREATE TRIGGER refuse_deltas BEFORE INSERT ON pending_upload_total_deltas
         FOR EACH ROW EXECUTE FUNCTION refuse_deltas();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    app.upload_ok(ws, &token, &[("s.bin", "text/plain", bytes(1024, 7))])
        .await;
    assert_eq!(committed(ws).await, 5 + 1024);
    assert_totals_exact(&app.pool).await;
}

/// The quota check looks up a workspace's expired-but-unswept rows through the
/// (workspace_id, expires_at) index, also before the table has statistics: through the
/// (workspace_id, created_at) one it read every pending row of the workspace, twice per upload.
#[tokio::test]
async fn the_quota_check_reads_only_expired_rows() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    // no statistics for the planner: as in a new deployment
    sqlx::raw_sql("ALTER TABLE pending_uploads SET (autovacuum_enabled = false)")
        .execute(&app.pool)
        .await
        .unwrap();
    let held = 5000;
    sqlx::query(
        "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename)
         SELECT $1, '\\x00', 1, 'held' FROM generate_series(1, $2)",
    )
    .bind(ws)
    .bind(held)
    .execute(&app.pool)
    .await
    .unwrap();
    const BY_EXPIRY: &str = "pending_uploads_workspace_expiry_unacked_idx";
    const BY_CREATED: &str = "idx_pending_uploads_workspace_unacked";
    let (expiry_scans, _) = index_use(&app.pool, BY_EXPIRY).await;
    let (_, created_read) = index_use(&app.pool, BY_CREATED).await;
    let uploads = 10;
    for i in 0..uploads {
        app.upload_ok(ws, &token, &[("s.bin", "text/plain", bytes(10, i as u8))])
            .await;
    }
    // each upload's two quota reads (caller query, admission) probe the expiry index once
    assert!(
        wait_for_index_scans(&app.pool, BY_EXPIRY, expiry_scans + 2 * uploads).await,
        "the quota reads did not use {BY_EXPIRY}: {:?} scans, {:?} via {BY_CREATED}",
        index_use(&app.pool, BY_EXPIRY).await,
        index_use(&app.pool, BY_CREATED).await
    );
    let read = index_use(&app.pool, BY_CREATED).await.1 - created_read;
    assert!(read < held, "{read} rows read through {BY_CREATED}");
    assert_eq!(pending_bytes(&app.pool, ws).await, held + uploads * 10);
}

#[tokio::test]
async fn concurrent_uploads_cannot_overrun_the_quota() {
    let app = TestApp::start_with(&["--max-pending-bytes-per-workspace", "1000"]).await;
    let (ws, token) = app.poll_workspace().await;
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let (client, url, token) = (
            app.client.clone(),
            app.at(&format!("/workspaces/{ws}/chat/uploads")),
            token.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let part = reqwest::multipart::Part::bytes(bytes(300, i)).file_name("f.bin");
            client
                .post(url)
                .bearer_auth(token)
                .multipart(reqwest::multipart::Form::new().part("files", part))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, 3, "exactly three 300-byte files fit under 1000");
    let total: i64 = sqlx::query_scalar("SELECT sum(size_bytes)::bigint FROM pending_uploads")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(total, 900);
    assert_totals_exact(&app.pool).await;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_upload_leaves_nothing() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let (ct, body) = raw_multipart(&[
        (
            "files",
            Some("a.txt"),
            Some("text/plain"),
            b"first file, complete",
        ),
        // a body over SPOOL_MEMORY_PER_REQUEST: its files go to disk
        ("files", Some("b.bin"), None, &bytes(3_000_000, 9)),
    ]);
    let addr = app.url.trim_start_matches("http://").to_string();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /workspaces/{ws}/chat/uploads HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(&body[..1_000_000]).await.unwrap();
    // wait until the server has a spool file open for the second part, then vanish
    for _ in 0..500 {
        if open_spool_files(&app.spool_dir) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        open_spool_files(&app.spool_dir) > 0,
        "upload was being spooled"
    );
    drop(sock);
    for _ in 0..500 {
        if open_spool_files(&app.spool_dir) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.assert_nothing_staged().await;
}

#[tokio::test]
async fn a_storage_failure_mid_transaction_rolls_everything_back() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    // Make the second row's insert fail inside the transaction (after the first row and its
    // activity row were written): a trigger refusing one filename.
    app.refuse_inserts_of("refused.txt").await;
    let resp = app
        .upload(
            ws,
            &token,
            &[
                ("fine.txt", "text/plain", b"ok".to_vec()),
                ("refused.txt", "text/plain", b"no".to_vec()),
            ],
        )
        .await;
    assert_error(resp, StatusCode::INTERNAL_SERVER_ERROR, "internal error").await;
    app.assert_nothing_staged().await;
}

#[tokio::test]
async fn raw_response_headers_are_title_case() {
    let app = TestApp::start().await;
    let addr = app.url.trim_start_matches("http://").to_string();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    sock.write_all(
        format!("GET /uploads/limits HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    sock.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    assert!(
        raw.contains("\r\nContent-Type: application/json\r\n"),
        "{raw}"
    );
    assert!(raw.contains("\r\nContent-Length: "), "{raw}");
    let body = raw.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(
        body,
        r#"{"per_file_bytes":104857600,"per_request_bytes":104857600,"max_files_per_request":64,"max_attachments_per_message":64,"max_filename_chars":100,"max_pending_bytes_per_workspace":1073741824,"max_pending_files_per_workspace":10000}"#,
        "compact JSON"
    );
}

/// SPOOL_MEMORY_PER_REQUEST=0 spools every file to disk: with the folder gone even 1 KiB gets
/// the 503; above its cap the setting is refused at start.
#[tokio::test]
async fn spool_memory_per_request_is_a_setting() {
    let app = TestApp::start_with(&["--spool-memory-per-request", "0"]).await;
    let (ws, token) = app.poll_workspace().await;
    std::fs::remove_dir(&app.spool_dir).unwrap();
    let resp = app
        .upload(ws, &token, &[("a.txt", "text/plain", bytes(1024, 1))])
        .await;
    assert_spool_unavailable(resp).await;
    app.assert_nothing_staged().await;
    let too_big = <pending_uploads::cli::Cli as clap::Parser>::try_parse_from([
        "pending-uploads",
        "serve",
        "--spool-memory-per-request",
        "16777217",
    ]);
    let err = too_big.expect_err("16777217 is refused").to_string();
    assert!(
        err.contains("16777217") && err.contains("0..=16777216"),
        "{err}"
    );
}

/// A request whose body (Content-Length) is at most SPOOL_MEMORY_PER_REQUEST keeps its files
/// in memory, so it stages while the spool folder is gone; a longer body goes to disk and gets
/// a clean 503 that leaves nothing behind. A body without Content-Length keeps that much in
/// memory and spills what outgrows it.
#[tokio::test]
async fn small_bodies_stage_without_the_spool_folder_and_larger_ones_get_503() {
    let app = TestApp::start_with(&["--spool-memory-per-request", "65536"]).await;
    let (ws, token) = app.poll_workspace().await;
    std::fs::remove_dir(&app.spool_dir).unwrap();
    for files in [
        vec![("big.bin", bytes(64 * 1024 + 1, 1))],
        vec![
            ("a.bin", bytes(40 * 1024, 2)),
            ("b.bin", bytes(40 * 1024, 3)),
        ],
        // the files alone fit, the body with its framing does not
        vec![("edge.bin", bytes(64 * 1024 - 10, 4))],
    ] {
        let parts: Vec<_> = files
            .iter()
            .map(|(n, b)| (*n, "application/octet-stream", b.clone()))
            .collect();
        let resp = app.upload(ws, &token, &parts).await;
        assert_spool_unavailable(resp).await;
        app.assert_nothing_staged().await;
    }
    let chunked = |parts: &[RawPart]| {
        let (ct, body) = raw_multipart(parts);
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            body.chunks(4096).map(|c| Ok(c.to_vec())).collect();
        (ct, reqwest::Body::wrap_stream(stream::iter(chunks)))
    };
    // chunked: the first file fits in memory, the second outgrows what is left
    let (ct, body) = chunked(&[
        ("files", Some("a.bin"), None, &bytes(40 * 1024, 5)),
        ("files", Some("b.bin"), None, &bytes(40 * 1024, 6)),
    ]);
    let resp = post_raw(&app, ws, &token, &ct, body).await;
    assert_spool_unavailable(resp).await;
    app.assert_nothing_staged().await;
    let small = [
        ("a.txt", "text/plain", bytes(30 * 1024, 7)),
        ("b.txt", "text/plain", bytes(20 * 1024, 8)),
    ];
    let mut staged = app.upload_ok(ws, &token, &small).await;
    let chunked_small = bytes(60 * 1024, 9);
    let (ct, body) = chunked(&[("files", Some("c.bin"), None, &chunked_small)]);
    let resp = post_raw(&app, ws, &token, &ct, body).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    staged.extend(body["files"].as_array().unwrap().iter().cloned());
    let sent = [&small[0].2, &small[1].2, &chunked_small];
    for (entry, sent) in staged.iter().zip(sent) {
        let got = app
            .get(
                &format!(
                    "/workspaces/{ws}/pending-uploads/{}/content",
                    file_id(entry)
                ),
                &token,
            )
            .await;
        assert_eq!(got.status(), StatusCode::OK);
        assert_eq!(got.bytes().await.unwrap(), sent.as_slice());
    }
}

/// RFC 2046 makes a part's body optional, and some senders leave it out of an empty part:
/// the head is followed at once by the next delimiter. That delimiter, the next part's head
/// and its bytes were stored as the empty part's content, under a 200, and the next file was
/// lost (a red team). An empty file is now the 400 it is, and an empty field before two files
/// leaves both.
#[tokio::test]
async fn a_part_sent_without_a_body_is_empty_not_the_next_part() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let ct = "multipart/form-data; boundary=BND";
    let head = |field: &str, file: Option<&str>| {
        let file = file
            .map(|f| format!("; filename=\"{f}\""))
            .unwrap_or_default();
        format!("--BND\r\nContent-Disposition: form-data; name=\"{field}\"{file}\r\nContent-Type: text/plain\r\n\r\n")
    };
    let body = format!(
        "{}{}BBBB\r\n--BND--\r\n",
        head("files", Some("empty.txt")),
        head("files", Some("b.txt"))
    );
    let resp = post_raw(&app, ws, &token, ct, body).await;
    assert_json(
        resp,
        StatusCode::BAD_REQUEST,
        json!({"error": "file is empty", "filename": "empty.txt"}),
    )
    .await;
    app.assert_nothing_staged().await;

    let body = format!(
        "{}{}AAAA\r\n{}BBBB\r\n--BND--\r\n",
        head("note", None),
        head("files", Some("a.txt")),
        head("files", Some("b.txt"))
    );
    let staged = post_raw(&app, ws, &token, ct, body).await;
    assert_eq!(staged.status(), StatusCode::OK);
    let staged: Value = staged.json().await.unwrap();
    let files = staged["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "{staged}");
    for (entry, (name, sent)) in files.iter().zip([("a.txt", "AAAA"), ("b.txt", "BBBB")]) {
        assert_eq!(entry["name"], name);
        let path = format!(
            "/workspaces/{ws}/pending-uploads/{}/content",
            file_id(entry)
        );
        let got = app.get(&path, &token).await;
        assert_eq!(got.bytes().await.unwrap(), sent.as_bytes());
    }
}
