//! The platform's own clients, replayed from their sources (EnterOS-AI/enteros-core and its
//! runtime and MCP plugin; see the requests quoted in each test): the workspace runtime's poll
//! loop, fetch and ack; the MCP plugin's startup probe and registration; the platform's e2e
//! script, which greps raw headers and compact JSON; and a database the platform migrated.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::common::*;

/// A request as the runtime and the plugin send it: the bearer (platform_auth.py
/// `auth_headers`), and `Origin: <PLATFORM_URL>`, which its register and heartbeat add
/// (mcp_heartbeat.py), sent here on every call: an Origin is never a reason to refuse.
async fn runtime_send(app: &TestApp, method: Method, path: &str, token: &str) -> reqwest::Response {
    app.client
        .request(method, app.at(path))
        .bearer_auth(token)
        .header("Origin", app.url.clone())
        .send()
        .await
        .unwrap()
}

async fn runtime_get(app: &TestApp, path: &str, token: &str) -> reqwest::Response {
    runtime_send(app, Method::GET, path, token).await
}

/// The activity rows a runtime `GET` of `path` answers.
async fn runtime_rows(app: &TestApp, path: &str, token: &str) -> Vec<Value> {
    runtime_get(app, path, token).await.json().await.unwrap()
}

/// `GET /workspaces/<ws>/pending-uploads/<file>/content` as the e2e script's curl sends it.
async fn content(
    app: &TestApp,
    ws: Uuid,
    file: impl std::fmt::Display,
    token: &str,
) -> reqwest::Response {
    app.get(
        &format!("/workspaces/{ws}/pending-uploads/{file}/content"),
        token,
    )
    .await
}

#[tokio::test]
async fn the_runtime_poll_fetch_and_ack_loop() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let out = app
        .upload_ok(
            ws,
            &token,
            &[
                ("photo.png", "image/png", bytes(10, 1)),
                ("notes.txt", "text/plain", bytes(20, 2)),
                ("clip.mp4", "video/mp4", bytes(30, 3)),
            ],
        )
        .await;
    // inbox.py `_poll_once` without a cursor: since_secs=600, include=peer_info, newest first
    // (it reverses the rows itself).
    let rows = runtime_rows(
        &app,
        &format!("/workspaces/{ws}/activity?type=a2a_receive&include=peer_info&since_secs=600"),
        &token,
    )
    .await;
    assert_eq!(rows.len(), 3);
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["request_body"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["clip.mp4", "notes.txt", "photo.png"],
        "newest first"
    );
    let seqs: Vec<i64> = rows
        .iter()
        .map(|r| r["seq"].as_i64().expect("seq is an integer"))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] > w[1]));
    for (row, (kind, mime)) in rows.iter().zip([
        ("video", "video/mp4"),
        ("file", "text/plain"),
        ("image", "image/png"),
    ]) {
        assert_eq!(row["method"], "chat_upload_receive");
        let body = &row["request_body"];
        assert_eq!(
            row["attachments"],
            json!([{"kind": kind, "uri": body["uri"], "name": body["name"], "mime_type": mime}])
        );
    }
    // Without include=peer_info there is no attachments key.
    let plain = runtime_rows(
        &app,
        &format!("/workspaces/{ws}/activity?type=a2a_receive"),
        &token,
    )
    .await;
    assert!(plain.iter().all(|r| r.get("attachments").is_none()));
    // With the cursor (the newest row it saw, once reversed: the last delivered), oldest
    // first and nothing repeated.
    let oldest = rows.last().unwrap()["id"].as_str().unwrap();
    let after = runtime_rows(
        &app,
        &format!("/workspaces/{ws}/activity?type=a2a_receive&include=peer_info&since_id={oldest}"),
        &token,
    )
    .await;
    let names: Vec<&str> = after
        .iter()
        .map(|r| r["request_body"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["notes.txt", "clip.mp4"]);

    // `_fetch_and_stage_with_client`: GET content, read Content-Type, POST ack (no body).
    let fid = file_id(&out[1]);
    let resp = runtime_get(
        &app,
        &format!("/workspaces/{ws}/pending-uploads/{fid}/content"),
        &token,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/plain");
    assert_eq!(resp.bytes().await.unwrap().to_vec(), bytes(20, 2));
    for _ in 0..2 {
        let resp = runtime_send(
            &app,
            Method::POST,
            &format!("/workspaces/{ws}/pending-uploads/{fid}/ack"),
            &token,
        )
        .await;
        assert_json(resp, StatusCode::OK, json!({"acked": true})).await;
    }
    // a missing file is 404 ("already gone"), which the runtime skips
    let resp = runtime_get(
        &app,
        &format!(
            "/workspaces/{ws}/pending-uploads/{}/content",
            Uuid::new_v4()
        ),
        &token,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

/// A feed over a database the platform also writes: its A2A `message/send` rows carry their
/// files as message parts, which the platform projects into `attachments` (enteros-core
/// `extractAttachmentsFromRequestBody`); the service projected only upload manifests, so a
/// client that reads `attachments` alone lost them (the compatibility audit).
#[tokio::test]
async fn a_platform_message_rows_files_are_its_attachments() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let body = json!({"jsonrpc": "2.0", "method": "message/send", "params": {"message": {
    "role": "user", "messageId": "m1",
    "parts": [
        {"kind": "text", "text": "here"},
        {"kind": "file", "file": {"uri": "platform-pending:w/f", "mime_type": "image/png", "name": "a.png"}}
    ]}}});
    sqlx::query(
        "INSERT INTO activity_logs (workspace_id, activity_type, method, summary, request_body)
         VALUES ($1, 'a2a_receive', 'message/send', 'message/send', $2)",
    )
    .bind(ws)
    .bind(&body)
    .execute(&app.pool)
    .await
    .unwrap();
    let rows = runtime_rows(
        &app,
        &format!("/workspaces/{ws}/activity?type=a2a_receive&include=peer_info&since_secs=600"),
        &token,
    )
    .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0]["attachments"],
        json!([{"kind": "file", "uri": "platform-pending:w/f", "name": "a.png", "mime_type": "image/png"}])
    );
}

/// On a database the platform also writes, rows another workspace sent (`source_id`) carry
/// that workspace's name and role with `include=peer_info`, as the platform's feed gives them
/// (enteros-core `activity.go`); a source that is gone, or has neither, adds nothing.
#[tokio::test]
async fn a_platform_rows_peer_is_named() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    // The platform's table has a role column; this service's subset of it does not.
    sqlx::query("ALTER TABLE workspaces ADD COLUMN role text")
        .execute(&app.pool)
        .await
        .unwrap();
    let (peer, unnamed, gone) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    sqlx::query("INSERT INTO workspaces (id, name, role) VALUES ($1, 'Researcher', 'analyst'), ($2, '', NULL)")
        .bind(peer)
        .bind(unnamed)
        .execute(&app.pool)
        .await
        .unwrap();
    for source in [peer, unnamed, gone] {
        sqlx::query(
            "INSERT INTO activity_logs (workspace_id, activity_type, source_id, method, summary)
             VALUES ($1, 'a2a_receive', $2, 'message/send', 'hi')",
        )
        .bind(ws)
        .bind(source)
        .execute(&app.pool)
        .await
        .unwrap();
    }
    let feed = |include: &'static str| {
        let (app, token) = (&app, &token);
        async move {
            runtime_rows(
                app,
                &format!("/workspaces/{ws}/activity?since_secs=600{include}"),
                token,
            )
            .await
        }
    };
    let rows = feed("&include=peer_info").await;
    let by_source = |id: Uuid| {
        rows.iter()
            .find(|r| r["source_id"] == json!(id))
            .unwrap()
            .as_object()
            .unwrap()
            .clone()
    };
    let named = by_source(peer);
    assert_eq!(named["peer_name"], "Researcher");
    assert_eq!(named["peer_role"], "analyst");
    for other in [unnamed, gone] {
        let row = by_source(other);
        assert!(
            !row.contains_key("peer_name") && !row.contains_key("peer_role"),
            "{row:?}"
        );
    }
    // Without the include, nothing is added.
    let plain = feed("").await;
    assert_eq!(plain.len(), 3);
    assert!(plain.iter().all(|r| r.get("peer_name").is_none()));
    // This service's own schema has no role column: the name alone.
    sqlx::query("ALTER TABLE workspaces DROP COLUMN role")
        .execute(&app.pool)
        .await
        .unwrap();
    let rows = feed("&include=peer_info").await;
    let named = rows.iter().find(|r| r["source_id"] == json!(peer)).unwrap();
    assert_eq!(named["peer_name"], "Researcher");
    assert!(named.get("peer_role").is_none(), "{named}");
}

#[tokio::test]
async fn the_mcp_plugin_startup_probe_and_registration() {
    let app = TestApp::start().await;
    let ws = Uuid::new_v4();
    // server.ts `registerAsPoll`: first registration (no workspace yet) with its card.
    let body = json!({"id": ws, "delivery_mode": "poll", "agent_card": {"name": "claude", "description": "channel"}});
    let resp = app
        .client
        .post(app.at("/registry/register"))
        .header("Origin", app.url.clone())
        .json(&body)
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["delivery_mode"], "poll");
    let token = v["auth_token"].as_str().unwrap().to_string();
    // ...and again on the next start, with its own bearer.
    let resp = app
        .client
        .post(app.at("/registry/register"))
        .bearer_auth(&token)
        .header("Origin", app.url.clone())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // The startup probe: the zero cursor must answer 410 (200 makes the plugin exit), even
    // for a workspace with no rows at all.
    let probe = format!(
        "/workspaces/{ws}/activity?type=a2a_receive&since_id=00000000-0000-0000-0000-000000000000&limit=1"
    );
    let resp = runtime_get(&app, &probe, &token).await;
    assert_eq!(resp.status(), StatusCode::GONE);
    let text = resp.text().await.unwrap();
    assert!(text.contains("since_id"), "{text}");
    // the plugin's poll: limit=100, include=peer_info, since_secs=30 without a cursor
    let resp = runtime_get(
        &app,
        &format!(
            "/workspaces/{ws}/activity?type=a2a_receive&limit=100&include=peer_info&since_secs=30"
        ),
        &token,
    )
    .await;
    assert_json(resp, StatusCode::OK, json!([])).await;
}

/// tests/e2e/test_poll_mode_chat_upload_e2e.sh, request by request: it greps raw curl output,
/// so header names must be Title-Case and JSON compact.
#[tokio::test]
async fn the_platform_e2e_script_greps_what_it_expects() {
    let app = TestApp::start().await;
    let reg = |id: Uuid| {
        app.client
            .post(app.at("/registry/register"))
            .json(&json!({"id": id, "delivery_mode": "poll", "agent_card": {"name": "poll-chat-upload-test-a"}}))
            .send()
    };
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let text = reg(a).await.unwrap().text().await.unwrap();
    assert!(text.contains(r#""status":"registered""#), "{text}");
    let tok_a = serde_json::from_str::<Value>(&text).unwrap()["auth_token"]
        .as_str()
        .unwrap()
        .to_string();
    let tok_b = reg(b).await.unwrap().json::<Value>().await.unwrap()["auth_token"]
        .as_str()
        .unwrap()
        .to_string();
    let out = app
        .upload_ok(
            a,
            &tok_a,
            &[
                ("alpha.txt", "text/plain", b"alpha\n".to_vec()),
                ("beta.txt", "text/plain", b"beta\n".to_vec()),
            ],
        )
        .await;
    let (f1, f2) = (file_id(&out[0]), file_id(&out[1]));
    let feed = app
        .get(
            &format!("/workspaces/{a}/activity?type=a2a_receive&limit=20"),
            &tok_a,
        )
        .await
        .text()
        .await
        .unwrap();
    for needle in [f1.to_string(), f2.to_string()] {
        assert!(feed.contains(&needle));
    }
    assert!(feed.contains(r#""method":"chat_upload_receive""#));
    assert!(
        feed.contains(r#""mimeType":"text/plain""#),
        "request_body compact: {feed}"
    );
    assert_eq!(feed.matches(r#""method":"chat_upload_receive""#).count(), 2);
    // curl -s -D - : raw header lines
    let addr = app.url.trim_start_matches("http://").to_string();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    sock.write_all(
        format!(
            "GET /workspaces/{a}/pending-uploads/{f1}/content HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {tok_a}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    sock.read_to_string(&mut raw).await.unwrap();
    assert!(raw.contains("\r\nContent-Type: text/plain\r\n"), "{raw}");
    assert!(raw.contains(r#"filename="alpha.txt""#), "{raw}");
    assert!(raw.ends_with("\r\n\r\nalpha\n"), "{raw}");
    // ack; re-ack is 200 too; the content is still readable after the ack
    for _ in 0..2 {
        let text = app
            .post(&format!("/workspaces/{a}/pending-uploads/{f1}/ack"), &tok_a)
            .await
            .text()
            .await
            .unwrap();
        assert!(text.contains(r#""acked":true"#));
    }
    let resp = content(&app, a, f1, &tok_a).await;
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"alpha\n");
    // B's bearer and URL, A's file: 404; B's bearer on A's URL: 401; not a UUID: 400
    let resp = content(&app, b, f2, &tok_b).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = content(&app, a, f2, &tok_b).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = content(&app, a, "not-a-uuid", &tok_a).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // test_poll_mode_e2e.sh: an unknown delivery mode is a 400 that names it
    let resp = app
        .client
        .post(app.at("/registry/register"))
        .json(&json!({"id": Uuid::new_v4(), "delivery_mode": "webhook"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(resp.text().await.unwrap().contains("delivery_mode"));
    // test_chat_upload_e2e.sh: an upload without a bearer is 401
    let resp = app
        .client
        .post(app.at(&format!("/workspaces/{a}/chat/uploads")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

/// The platform's own migrations (workspace-server/migrations), as they leave the table: its
/// index names, its retention index, its raised cap. Ours then run on top without leaving
/// a duplicate index or a second CHECK.
#[tokio::test]
async fn a_database_the_platform_migrated_ends_up_without_duplicates() {
    let db = empty_db().await;
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE pending_uploads (
             file_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
             workspace_id uuid NOT NULL,
             content bytea NOT NULL,
             size_bytes bigint NOT NULL CHECK (size_bytes > 0 AND size_bytes <= 26214400),
             filename text NOT NULL CHECK (length(filename) > 0 AND length(filename) <= 100),
             mimetype text NOT NULL DEFAULT '',
             created_at timestamptz NOT NULL DEFAULT now(),
             fetched_at timestamptz,
             acked_at timestamptz,
             expires_at timestamptz NOT NULL DEFAULT (now() + interval '24 hours'));
         CREATE INDEX IF NOT EXISTS idx_pending_uploads_workspace_unacked
             ON pending_uploads (workspace_id, created_at) WHERE acked_at IS NULL;
         CREATE INDEX IF NOT EXISTS idx_pending_uploads_expires
             ON pending_uploads (expires_at) WHERE acked_at IS NULL;
         CREATE INDEX IF NOT EXISTS idx_pending_uploads_acked
             ON pending_uploads (acked_at) WHERE acked_at IS NOT NULL;
         ALTER TABLE pending_uploads DROP CONSTRAINT IF EXISTS pending_uploads_size_bytes_check;
         ALTER TABLE pending_uploads ADD CONSTRAINT pending_uploads_size_bytes_check
             CHECK (size_bytes > 0 AND size_bytes <= 104857600);
         INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename)
             VALUES (gen_random_uuid(), 'x', 1, 'platform.txt');",
    )
    .execute(&pool)
    .await
    .unwrap();
    run_ok(bin_command(&db).arg("migrate"));
    let defs: Vec<(String, String)> = sqlx::query_as(
        "SELECT indexname::text, regexp_replace(indexdef, '^.* USING ', '') FROM pg_indexes WHERE tablename = 'pending_uploads'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut seen = std::collections::HashMap::new();
    for (name, def) in &defs {
        assert!(
            seen.insert(def.clone(), name.clone()).is_none(),
            "duplicate index {def}: {defs:?}"
        );
    }
    let names: Vec<&str> = defs.iter().map(|(n, _)| n.as_str()).collect();
    for platform_name in [
        "idx_pending_uploads_workspace_unacked",
        "idx_pending_uploads_expires",
        "idx_pending_uploads_acked",
    ] {
        assert!(names.contains(&platform_name), "{names:?}");
    }
    let size_checks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'pending_uploads'::regclass AND pg_get_constraintdef(oid) LIKE '%size_bytes%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(size_checks, 1);
    // The platform's row is still there and counted.
    let totals: (i64, i64) = sqlx::query_as(
        "SELECT sum(unacked_bytes)::bigint, sum(unacked_files)::bigint FROM pending_upload_totals",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(totals, (1, 1));
}
