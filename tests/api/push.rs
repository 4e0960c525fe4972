use std::sync::{Arc, Mutex};

use axum::{body::Bytes, extract::State, http::HeaderMap, routing::post, Router};
use reqwest::StatusCode;
use serde_json::json;

use crate::common::*;

/// What the workspace received: Authorization, Content-Type, body.
type Received = (Option<String>, Option<String>, Vec<u8>);

#[derive(Default, Clone)]
struct Seen {
    requests: Arc<Mutex<Vec<Received>>>,
}

/// A real HTTP server standing in for a push-mode workspace.
async fn fake_workspace() -> (String, Seen) {
    let seen = Seen::default();
    let app = Router::new()
        .route(
            "/internal/chat/uploads/ingest",
            post(
                |State(seen): State<Seen>, headers: HeaderMap, body: Bytes| async move {
                    let h = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_string());
                    seen.requests.lock().unwrap().push((
                        h("authorization"),
                        h("content-type"),
                        body.to_vec(),
                    ));
                    (
                        StatusCode::CREATED,
                        [("content-type", "application/json")],
                        r#"{"files":[{"uri":"workspace:/x"}]}"#,
                    )
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

#[tokio::test]
async fn push_uploads_stream_through_unchanged_and_relay_the_answer() {
    let app = TestApp::start().await;
    let (ws_url, seen) = fake_workspace().await;
    let resp = app
        .client
        .post(app.at("/workspaces"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "pushy", "url": format!("{ws_url}/")}))
        .send()
        .await
        .unwrap();
    let created: serde_json::Value = resp.json().await.unwrap();
    let ws: uuid::Uuid = created["id"].as_str().unwrap().parse().unwrap();
    let secret = created["platform_inbound_secret"]
        .as_str()
        .unwrap()
        .to_string();

    let body = b"--b0\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.txt\"\r\n\r\nhello push\r\n--b0--\r\n".to_vec();
    let resp = app
        .client
        .post(app.at(&format!("/workspaces/{ws}/chat/uploads")))
        .bearer_auth(ADMIN)
        .header("Content-Type", "multipart/form-data; boundary=b0")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::CREATED,
        "the workspace's status is relayed"
    );
    assert_eq!(resp.headers()["content-type"], "application/json");
    // With its length, not chunked: an HTTP/1.0 keep-alive client cannot take a chunked
    // answer, and its next request was dropped (the protocol red team).
    assert_eq!(resp.headers()["content-length"], "34");
    assert!(!resp.headers().contains_key("transfer-encoding"));
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"files":[{"uri":"workspace:/x"}]}"#
    );
    let reqs = seen.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        reqs[0].0.as_deref(),
        Some(format!("Bearer {secret}").as_str())
    );
    assert_eq!(
        reqs[0].1.as_deref(),
        Some("multipart/form-data; boundary=b0")
    );
    assert_eq!(reqs[0].2, body, "body forwarded byte for byte");
    assert_eq!(
        app.count("pending_uploads").await,
        0,
        "push mode stages nothing"
    );
}

#[tokio::test]
async fn push_without_url_and_unreachable_workspace() {
    let app = TestApp::start().await;
    // push mode, url not registered yet
    let (ws, token) = app.workspace("push", None).await;
    let f = [("a.txt", "text/plain", b"a".to_vec())];
    assert_error(
        app.upload(ws, &token, &f).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "workspace url not registered yet",
    )
    .await;
    // a URL where nothing listens
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (ws, token) = app
        .workspace("push", Some(&format!("http://{closed}")))
        .await;
    assert_error(
        app.upload(ws, &token, &f).await,
        StatusCode::BAD_GATEWAY,
        "workspace unreachable",
    )
    .await;
    assert_eq!(app.count("pending_uploads").await, 0);
}

#[tokio::test]
async fn a_workspace_with_neither_mode_nor_url_is_422_and_an_empty_mode_with_url_is_push() {
    let app = TestApp::start().await;
    // The platform's own workspaces table has no CHECK on delivery_mode, and rows from
    // before delivery modes existed carry ''. Recreate that here.
    sqlx::query("ALTER TABLE workspaces DROP CONSTRAINT workspaces_delivery_mode_check")
        .execute(&app.pool)
        .await
        .unwrap();
    let (ws, token) = app.workspace("push", None).await;
    sqlx::query("UPDATE workspaces SET delivery_mode = '' WHERE id = $1")
        .bind(ws)
        .execute(&app.pool)
        .await
        .unwrap();
    let f = [("a.txt", "text/plain", b"a".to_vec())];
    let resp = app.upload(ws, &token, &f).await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        body["error"],
        "workspace has no callback URL — chat upload requires push-mode + public URL"
    );
    assert_eq!(
        body["detail"],
        format!("workspace {ws} has delivery_mode '' and no url: register a url (push) or switch to delivery_mode 'poll'")
    );
    app.assert_nothing_staged().await;

    // A mode the platform wrote that is neither: shown once escaped (controls as `\n`, as in
    // logs), not escaped a second time as a Rust string (`\\n`, `\"`).
    let (odd, odd_token) = app.workspace("push", None).await;
    sqlx::query("UPDATE workspaces SET delivery_mode = E'we\"ird\\n' WHERE id = $1")
        .bind(odd)
        .execute(&app.pool)
        .await
        .unwrap();
    let resp = app.upload(odd, &odd_token, &f).await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains(r#"has delivery_mode 'we"ird\n' and no url"#)),
        "{body}"
    );

    // '' with a URL is the legacy push workspace: streamed through.
    let (ws_url, seen) = fake_workspace().await;
    sqlx::query("UPDATE workspaces SET url = $2 WHERE id = $1")
        .bind(ws)
        .bind(&ws_url)
        .execute(&app.pool)
        .await
        .unwrap();
    let resp = app.upload(ws, &token, &f).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(seen.requests.lock().unwrap().len(), 1);
    app.assert_nothing_staged().await;
}

/// The platform's own `workspaces` table (SPEC §2) declares name, delivery_mode and status
/// without NOT NULL or CHECK, and our `CREATE TABLE IF NOT EXISTS` keeps it: NULLs there mean
/// what their empty values mean (a NULL mode is push, SPEC §4 Upload step 2; a NULL status is
/// not removed), and are shown as `""`; its created_at may be NULL too, shown as `null`.
#[tokio::test]
async fn null_columns_of_a_platform_workspace_row_mean_what_empty_ones_do() {
    let app = TestApp::start().await;
    sqlx::query(
        "ALTER TABLE workspaces DROP CONSTRAINT workspaces_delivery_mode_check,
             ALTER name DROP NOT NULL, ALTER delivery_mode DROP NOT NULL,
             ALTER status DROP NOT NULL",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let (ws_url, seen) = fake_workspace().await;
    let (ws, token) = app.workspace("push", Some(&ws_url)).await;
    let set_null = |column: &'static str| {
        let pool = app.pool.clone();
        async move {
            sqlx::query(&format!(
                "UPDATE workspaces SET {column} = NULL WHERE id = $1"
            ))
            .bind(ws)
            .execute(&pool)
            .await
        }
    };
    let f = [("a.txt", "text/plain", b"a".to_vec())];

    // A NULL mode with a URL is a push workspace: relayed, not a 500.
    set_null("delivery_mode").await.unwrap();
    let resp = app.upload(ws, ADMIN, &f).await;
    assert_eq!(resp.status(), StatusCode::CREATED, "NULL delivery_mode");
    assert_eq!(seen.requests.lock().unwrap().len(), 1);

    // A NULL name is served as "".
    set_null("name").await.unwrap();
    let resp = app.get(&format!("/workspaces/{ws}"), ADMIN).await;
    assert_eq!(resp.status(), StatusCode::OK, "NULL name");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!((&v["name"], &v["delivery_mode"]), (&json!(""), &json!("")));

    // A NULL status is not removed: the workspace's own token still works everywhere.
    set_null("status").await.unwrap();
    let resp = app.get(&format!("/workspaces/{ws}"), &token).await;
    assert_eq!(resp.status(), StatusCode::OK, "NULL status, own token");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "");
    let resp = app.upload(ws, &token, &f).await;
    assert_eq!(resp.status(), StatusCode::CREATED, "upload with own token");
    assert_eq!(seen.requests.lock().unwrap().len(), 2);
    // Re-registration with its own token keeps the (NULL) mode and answers.
    let resp = app
        .client
        .post(app.at("/registry/register"))
        .bearer_auth(&token)
        .json(&json!({"id": ws, "url": ws_url}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "re-registration");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["delivery_mode"], "");

    // A NULL created_at is served as null (no instant to make up), not a 500.
    sqlx::query("ALTER TABLE workspaces ALTER created_at DROP NOT NULL")
        .execute(&app.pool)
        .await
        .unwrap();
    set_null("created_at").await.unwrap();
    let resp = app.get(&format!("/workspaces/{ws}"), &token).await;
    assert_eq!(resp.status(), StatusCode::OK, "NULL created_at");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["created_at"], serde_json::Value::Null);
    let resp = app.upload(ws, &token, &f).await;
    assert_eq!(
        resp.status(),
        StatusCode::CREATED,
        "upload, NULL created_at"
    );
    app.assert_nothing_staged().await;
}
