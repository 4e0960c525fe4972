use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::*;

async fn feed(app: &TestApp, ws: Uuid, token: &str, query: &str) -> Vec<Value> {
    let resp = app
        .get(&format!("/workspaces/{ws}/activity?{query}"), token)
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json::<Vec<Value>>().await.unwrap()
}

/// Pages through the whole feed after `cursor`, `limit` rows at a time.
async fn page_all(
    app: &TestApp,
    ws: Uuid,
    token: &str,
    mut cursor: String,
    limit: usize,
) -> Vec<Value> {
    let mut all = Vec::new();
    loop {
        let page = feed(app, ws, token, &format!("since_id={cursor}&limit={limit}")).await;
        if page.is_empty() {
            return all;
        }
        assert!(page.len() <= limit);
        cursor = page.last().unwrap()["id"].as_str().unwrap().to_string();
        all.extend(page);
    }
}

#[tokio::test]
async fn upload_rows_are_in_the_feed_with_all_columns() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let out = app
        .upload_ok(ws, &token, &[("a.txt", "text/plain", b"a".to_vec())])
        .await;
    let rows = feed(
        &app,
        ws,
        &token,
        "type=a2a_receive&method=chat_upload_receive",
    )
    .await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    let mut keys: Vec<&str> = row
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "activity_type",
            "created_at",
            "error_detail",
            "id",
            "method",
            "request_body",
            "response_body",
            "seq",
            "source_id",
            "status",
            "summary",
            "target_id",
            "workspace_id"
        ]
    );
    assert_eq!(row["request_body"]["uri"], out[0]["uri"]);
    assert_eq!(row["summary"], "chat_upload_receive: a.txt");
    assert_eq!(feed(&app, ws, &token, "type=other").await.len(), 0);
    assert_eq!(feed(&app, ws, &token, "method=other").await.len(), 0);
}

#[tokio::test]
async fn paging_never_skips_or_repeats_rows_that_share_a_timestamp() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    // 300 rows in one transaction: all share now(); ids are random, so neither created_at
    // nor id orders them.
    let mut tx = app.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO activity_logs (workspace_id, activity_type, summary) VALUES ($1, 'seed', 'seed')")
        .bind(ws)
        .execute(&mut *tx)
        .await
        .unwrap();
    for i in 0..300 {
        sqlx::query("INSERT INTO activity_logs (workspace_id, activity_type, summary) VALUES ($1, 'bulk', $2)")
            .bind(ws)
            .bind(format!("row {i:03}"))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let stamps: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT created_at) FROM activity_logs WHERE workspace_id = $1",
    )
    .bind(ws)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stamps, 1, "all rows share one created_at");
    let first = feed(&app, ws, &token, "type=seed").await;
    let seed: Uuid = first[0]["id"].as_str().unwrap().parse().unwrap();
    for limit in [1, 7, 100, 500] {
        let all = page_all(&app, ws, &token, seed.to_string(), limit).await;
        let summaries: Vec<String> = all
            .iter()
            .map(|r| r["summary"].as_str().unwrap().to_string())
            .collect();
        let want: Vec<String> = (0..300).map(|i| format!("row {i:03}")).collect();
        assert_eq!(
            summaries, want,
            "limit {limit}: every row once, oldest first"
        );
    }
}

#[tokio::test]
async fn without_a_cursor_the_newest_rows_newest_first() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    sqlx::query("INSERT INTO activity_logs (workspace_id, activity_type, summary, created_at) VALUES ($1, 'old', 'old', now() - interval '2 hours')")
        .bind(ws)
        .execute(&app.pool)
        .await
        .unwrap();
    for i in 0..5 {
        app.upload_ok(
            ws,
            &token,
            &[(&format!("{i}.txt"), "text/plain", b"x".to_vec())],
        )
        .await;
    }
    let rows = feed(&app, ws, &token, "limit=2").await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["summary"], "chat_upload_receive: 4.txt");
    assert_eq!(rows[1]["summary"], "chat_upload_receive: 3.txt");
    assert_eq!(feed(&app, ws, &token, "").await.len(), 6);
    assert_eq!(
        feed(&app, ws, &token, "since_secs=3600").await.len(),
        5,
        "the window excludes the old row"
    );
    assert_eq!(
        feed(&app, ws, &token, "limit=100000").await.len(),
        6,
        "limit is clamped, not refused"
    );
    // So is a window past 64 bits (it was a 400, while one just inside them was clamped).
    assert_eq!(
        feed(&app, ws, &token, "since_secs=9223372036854775808")
            .await
            .len(),
        6,
        "since_secs is clamped to 30 days"
    );
    // What the platform's handler does with a limit that is not a positive integer: the
    // default (100 rows; here all 6), not an error and not one row.
    for odd in ["abc", "0", "-3"] {
        assert_eq!(
            feed(&app, ws, &token, &format!("limit={odd}")).await.len(),
            6,
            "limit={odd}"
        );
    }
    // other workspaces' rows never appear
    let (other, other_token) = app.poll_workspace().await;
    assert_eq!(feed(&app, other, &other_token, "").await.len(), 0);
}

/// "Newest" is the order rows commit in, which cursors page by: a row whose transaction began
/// before others committed (a large upload's, whose created_at is its transaction's start)
/// was listed below them, and a reader that took the first row as its cursor then got it
/// again (SPEC §4: never repeat a row).
#[tokio::test]
async fn the_newest_row_is_the_last_committed_and_a_cursor_from_it_repeats_nothing() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    for name in ["a.txt", "b.txt"] {
        app.upload_ok(ws, &token, &[(name, "text/plain", b"x".to_vec())])
            .await;
    }
    // Committed last, with the created_at of a transaction begun a minute before.
    sqlx::query("INSERT INTO activity_logs (workspace_id, activity_type, summary, created_at) VALUES ($1, 'platform', 'late', now() - interval '1 minute')")
        .bind(ws)
        .execute(&app.pool)
        .await
        .unwrap();
    let newest = feed(&app, ws, &token, "").await;
    let summaries: Vec<&str> = newest
        .iter()
        .map(|r| r["summary"].as_str().unwrap())
        .collect();
    assert_eq!(
        summaries,
        [
            "late",
            "chat_upload_receive: b.txt",
            "chat_upload_receive: a.txt"
        ]
    );
    let cursor = newest[0]["id"].as_str().unwrap();
    assert!(feed(&app, ws, &token, &format!("since_id={cursor}"))
        .await
        .is_empty());
}

/// SPEC §4: paging with since_id never skips a row, and §2: the platform writes activity rows
/// too. Its row, inserted first in a transaction that commits late, took a lower `seq` than an
/// upload's row that committed meanwhile: a reader whose cursor moved to the upload's row
/// never saw it. A row now takes its `seq` under its workspace's lock, held to its
/// transaction's end, so the upload's row waits for the platform's to commit.
#[tokio::test]
async fn a_row_another_writer_commits_late_is_not_skipped_by_a_cursor() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    app.upload_ok(ws, &token, &[("a.txt", "text/plain", b"a".to_vec())])
        .await;
    let cursor = feed(&app, ws, &token, "").await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut platform = app.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO activity_logs (workspace_id, activity_type, summary) VALUES ($1, 'platform', 'slow')")
        .bind(ws)
        .execute(&mut *platform)
        .await
        .unwrap();
    let upload = {
        let app_url = app.at(&format!("/workspaces/{ws}/chat/uploads"));
        let req = app.client.post(app_url).bearer_auth(&token).multipart(
            reqwest::multipart::Form::new().part(
                "files",
                reqwest::multipart::Part::bytes(b"b".to_vec()).file_name("b.txt"),
            ),
        );
        tokio::spawn(async move { req.send().await.unwrap() })
    };
    // A reader polls while the platform's transaction is open: whatever it sees then...
    tokio::time::sleep(Duration::from_millis(700)).await;
    let first = feed(&app, ws, &token, &format!("since_id={cursor}")).await;
    platform.commit().await.unwrap();
    assert_eq!(upload.await.unwrap().status(), StatusCode::OK);
    // ...and what it sees after, from where it got to, is every row once, in commit order.
    let moved_to = first
        .last()
        .map_or(cursor.clone(), |r| r["id"].as_str().unwrap().to_string());
    let then = feed(&app, ws, &token, &format!("since_id={moved_to}")).await;
    let seen: Vec<&str> = first
        .iter()
        .chain(&then)
        .map(|r| r["summary"].as_str().unwrap())
        .collect();
    assert_eq!(seen, ["slow", "chat_upload_receive: b.txt"]);
}

/// The platform's own `activity_logs` (SPEC §2) has status and created_at nullable, and our
/// `CREATE TABLE IF NOT EXISTS` keeps it: a row with both NULL is served (status `""`,
/// created_at `null`) in either order of the feed, and the rows around it too. Before, it
/// failed to decode and the workspace's whole feed was a 500, so its agent could not move on.
#[tokio::test]
async fn a_platform_row_without_status_or_created_at_is_served() {
    let app = TestApp::start().await;
    sqlx::query(
        "ALTER TABLE activity_logs ALTER status DROP NOT NULL, ALTER created_at DROP NOT NULL",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let (ws, token) = app.poll_workspace().await;
    app.upload_ok(ws, &token, &[("a.txt", "text/plain", b"a".to_vec())])
        .await;
    sqlx::query(
        "INSERT INTO activity_logs (workspace_id, activity_type, summary, status, created_at)
         VALUES ($1, 'platform', 'odd', NULL, NULL)",
    )
    .bind(ws)
    .execute(&app.pool)
    .await
    .unwrap();
    app.upload_ok(ws, &token, &[("b.txt", "text/plain", b"b".to_vec())])
        .await;
    let newest_first = feed(&app, ws, &token, "").await;
    assert_eq!(newest_first.len(), 3);
    let odd: Vec<&Value> = newest_first
        .iter()
        .filter(|r| r["summary"] == "odd")
        .collect();
    assert_eq!(odd.len(), 1);
    assert_eq!(
        (&odd[0]["status"], &odd[0]["created_at"]),
        (&json!(""), &Value::Null)
    );
    let cursor = feed(&app, ws, &token, "type=a2a_receive")
        .await
        .into_iter()
        .find(|r| r["summary"] == "chat_upload_receive: a.txt")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let after: Vec<Value> = feed(&app, ws, &token, &format!("since_id={cursor}")).await;
    let summaries: Vec<&str> = after
        .iter()
        .map(|r| r["summary"].as_str().unwrap())
        .collect();
    assert_eq!(summaries, ["odd", "chat_upload_receive: b.txt"]);
}

#[tokio::test]
async fn an_unknown_or_foreign_cursor_is_410() {
    let app = TestApp::start().await;
    let (a, a_token) = app.poll_workspace().await;
    let (b, b_token) = app.poll_workspace().await;
    app.upload_ok(a, &a_token, &[("a.txt", "text/plain", b"a".to_vec())])
        .await;
    let a_row = feed(&app, a, &a_token, "").await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let gone = json!({"error": "since_id cursor not found (row may have been pruned or belongs to a different workspace); omit since_id to reset"});
    for (ws, token, cursor) in [
        (a, &a_token, Uuid::new_v4().to_string()),
        (b, &b_token, a_row.clone()),
    ] {
        let resp = app
            .get(
                &format!("/workspaces/{ws}/activity?since_id={cursor}"),
                token,
            )
            .await;
        assert_json(resp, StatusCode::GONE, gone.clone()).await;
    }
    let resp = app
        .get(&format!("/workspaces/{a}/activity?type=a%00b"), &a_token)
        .await;
    assert_error(
        resp,
        StatusCode::BAD_REQUEST,
        "type must not contain NUL characters",
    )
    .await;
    let resp = app
        .get(&format!("/workspaces/{a}/activity?since_id=xyz"), &a_token)
        .await;
    assert_error(resp, StatusCode::BAD_REQUEST, "invalid since_id").await;
    assert_eq!(
        feed(&app, a, &a_token, &format!("since_id={a_row}"))
            .await
            .len(),
        0
    );
}

/// A long poll on one replica is answered when an upload commits on another: the uploading
/// replica announces it after the commit (its transaction sends no notification), and the
/// waiting replica's listener hears it. Two real binaries on one database.
#[tokio::test]
async fn a_long_poll_hears_of_an_upload_committed_on_another_replica() {
    let db = fresh_db().await;
    let (port_a, port_b) = (free_port(), free_port());
    let _a = spawn_service(bin_command(&db), port_a).await;
    let _b = spawn_service(bin_command(&db), port_b).await;
    let (a, b) = (
        format!("http://127.0.0.1:{port_a}"),
        format!("http://127.0.0.1:{port_b}"),
    );
    let (ws, token) = register_poll(&a).await;
    let client = reqwest::Client::new();
    let upload = |name: &'static str| {
        let (client, url, token) = (
            client.clone(),
            format!("{b}/workspaces/{ws}/chat/uploads"),
            token.clone(),
        );
        async move {
            let part = reqwest::multipart::Part::bytes(bytes(64, 1)).file_name(name);
            let form = reqwest::multipart::Form::new().part("files", part);
            let resp = client
                .post(url)
                .bearer_auth(token)
                .multipart(form)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
        }
    };
    upload("first.bin").await;
    let rows: Vec<Value> = client
        .get(format!("{a}/workspaces/{ws}/activity?limit=1"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cursor = rows[0]["id"].as_str().unwrap().to_string();
    let waiting = tokio::spawn({
        let (client, url, token) = (
            client.clone(),
            format!("{a}/workspaces/{ws}/activity?since_id={cursor}&wait=30"),
            token.clone(),
        );
        async move {
            let resp = client.get(url).bearer_auth(token).send().await.unwrap();
            (
                std::time::Instant::now(),
                resp.json::<Vec<Value>>().await.unwrap(),
            )
        }
    });
    // The poll is waiting (it holds no row to answer with) before the upload starts.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "nothing new yet: the long poll waits"
    );
    let uploaded = std::time::Instant::now();
    upload("second.bin").await;
    let (answered, rows) = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
        .await
        .expect("answered within 5 s of the upload, not at the end of its 30 s wait")
        .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["summary"], "chat_upload_receive: second.bin");
    assert!(answered.duration_since(uploaded) < std::time::Duration::from_secs(5));
}

/// Sessions that do not say they announce after commit (an older binary during a rolling
/// deploy, hand-written SQL) still notify from the upload's transaction; the service's own
/// sessions (`pending_uploads.notify = after_commit`) do not.
#[tokio::test]
async fn only_sessions_that_announce_after_commit_skip_the_transactions_notification() {
    use sqlx::{postgres::PgListener, Connection, PgConnection};
    let app = TestApp::start().await;
    let (ws, _) = app.poll_workspace().await;
    let mut listener = PgListener::connect(&app.db_url).await.unwrap();
    listener.listen("pending_uploads_activity").await.unwrap();
    let log = "SELECT pending_uploads_log($1, ARRAY[gen_random_uuid()], ARRAY['a.bin'], \
               ARRAY['application/octet-stream'], ARRAY[1::bigint])";
    for (setting, notifies) in [(None, true), (Some("after_commit"), false)] {
        let mut conn = PgConnection::connect(&app.db_url).await.unwrap();
        if let Some(value) = setting {
            sqlx::query("SELECT set_config('pending_uploads.notify', $1, false)")
                .bind(value)
                .execute(&mut conn)
                .await
                .unwrap();
        }
        sqlx::query(log).bind(ws).execute(&mut conn).await.unwrap();
        let heard =
            tokio::time::timeout(std::time::Duration::from_millis(500), listener.recv()).await;
        match notifies {
            true => assert_eq!(
                heard.expect("a notification").unwrap().payload(),
                ws.to_string()
            ),
            false => assert!(
                heard.is_err(),
                "no notification from {setting:?}: {heard:?}"
            ),
        }
    }
}

/// The in-process app listens as `serve` does: a waiting poll is answered by the commit, not
/// by the end of its wait.
#[tokio::test]
async fn a_waiting_poll_is_answered_when_an_upload_commits() {
    let app = TestApp::start().await;
    let (ws, token) = app.poll_workspace().await;
    let part = [("a.bin", "application/octet-stream", bytes(64, 1))];
    app.upload_ok(ws, &token, &part).await;
    let cursor = feed(&app, ws, &token, "limit=1").await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let started = std::time::Instant::now();
    let query = format!("since_id={cursor}&wait=20");
    let waiting = feed(&app, ws, &token, &query);
    let upload = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        app.upload_ok(
            ws,
            &token,
            &[("b.bin", "application/octet-stream", bytes(64, 2))],
        )
        .await;
    };
    let (rows, ()) = tokio::join!(waiting, upload);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["request_body"]["name"], "b.bin");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "answered at the commit, not after {:?}",
        started.elapsed()
    );
}

/// A child service's workspace with a cursor to long-poll after.
struct Poller {
    base: String,
    ws: Uuid,
    token: String,
    cursor: Uuid,
}

impl Poller {
    async fn new(base: &str, pool: &sqlx::PgPool) -> Poller {
        let (ws, token) = register_poll(base).await;
        let cursor = sqlx::query_scalar(
            "INSERT INTO activity_logs (workspace_id, activity_type, summary) \
             VALUES ($1, 'seed', 'seed') RETURNING id",
        )
        .bind(ws)
        .fetch_one(pool)
        .await
        .unwrap();
        Poller {
            base: base.to_string(),
            ws,
            token,
            cursor,
        }
    }

    /// A long poll of up to a minute, answered in its own task.
    fn wait(&self) -> tokio::task::JoinHandle<reqwest::Response> {
        let url = format!(
            "{}/workspaces/{}/activity?since_id={}&wait=60",
            self.base, self.ws, self.cursor
        );
        let token = self.token.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
        })
    }

    /// A long poll that must be refused at once.
    async fn refused(&self) -> reqwest::Response {
        tokio::time::timeout(std::time::Duration::from_secs(5), self.wait())
            .await
            .expect("refused at once, not held")
            .unwrap()
    }

    async fn upload(&self, name: &'static str) {
        let part = reqwest::multipart::Part::bytes(bytes(64, 1)).file_name(name);
        let resp = reqwest::Client::new()
            .post(format!("{}/workspaces/{}/chat/uploads", self.base, self.ws))
            .bearer_auth(&self.token)
            .multipart(reqwest::multipart::Form::new().part("files", part))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
}

const WAITING: &str = "pending_uploads_long_polls_waiting";

/// One workspace holds at most MAX_LONG_POLLS_PER_WORKSPACE waiting long polls: beyond, 429
/// at once (an upload would otherwise wake any number of them into a query each, and take the
/// pool from every other workspace). Other workspaces still wait, and a place comes back when
/// a poll ends, whether answered or dropped. Waiting polls are counted exactly.
#[tokio::test]
async fn long_polls_beyond_the_workspace_bound_get_429() {
    let db = fresh_db().await;
    let port = free_port();
    let mut cmd = bin_command(&db);
    cmd.env("MAX_LONG_POLLS_PER_WORKSPACE", "2");
    let _service = spawn_service(cmd, port).await;
    let base = format!("http://127.0.0.1:{port}");
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let (mut a, b) = (
        Poller::new(&base, &pool).await,
        Poller::new(&base, &pool).await,
    );

    let first = a.wait();
    let second = a.wait();
    wait_for_metric(&base, WAITING, 2.0).await;
    assert_retry_later(
        a.refused().await,
        StatusCode::TOO_MANY_REQUESTS,
        "2",
        json!({"error": "too many long polls waiting for this workspace — retry shortly", "code": "workspace_busy"}),
    )
    .await;
    let other = b.wait();
    wait_for_metric(&base, WAITING, 3.0).await;

    // A poll whose client goes frees its place.
    first.abort();
    wait_for_metric(&base, WAITING, 2.0).await;
    let third = a.wait();
    wait_for_metric(&base, WAITING, 3.0).await;
    assert!(!second.is_finished() && !third.is_finished() && !other.is_finished());

    // An upload answers the workspace's polls, and frees their places.
    a.upload("new.bin").await;
    for poll in [second, third] {
        let resp = tokio::time::timeout(std::time::Duration::from_secs(5), poll)
            .await
            .expect("answered by the upload")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let rows: Vec<Value> = resp.json().await.unwrap();
        assert_eq!(rows[0]["summary"], "chat_upload_receive: new.bin");
        a.cursor = rows[0]["id"].as_str().unwrap().parse().unwrap();
    }
    wait_for_metric(&base, WAITING, 1.0).await;
    let again = a.wait();
    wait_for_metric(&base, WAITING, 2.0).await;
    assert!(!again.is_finished() && !other.is_finished());
}

/// A long poll whose client goes with bytes left unread behind its request frees its place
/// too: a stray CRLF after the head, a pipelined request, a body it declared and never sent.
/// hyper, holding those bytes, stops reading the connection and never sees the close; the
/// poll asks the socket itself (every 3 s). Before, it held its place for its whole wait (a
/// black-box probe: 59 s of a `wait=60`, the workspace's own poller refused meanwhile).
#[tokio::test]
async fn a_long_poll_whose_client_left_bytes_behind_frees_its_place() {
    use tokio::io::AsyncWriteExt;
    let db = fresh_db().await;
    let port = free_port();
    let mut cmd = bin_command(&db);
    cmd.env("MAX_LONG_POLLS_PER_WORKSPACE", "1");
    let _service = spawn_service(cmd, port).await;
    let base = format!("http://127.0.0.1:{port}");
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let a = Poller::new(&base, &pool).await;
    let poll = |filter: &str| {
        format!(
            "GET /workspaces/{}/activity?since_id={}&wait=60{filter} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n",
            a.ws, a.cursor, a.token
        )
    };
    let left_behind = [
        format!("{}\r\n\r\n", poll("")),
        format!("{}\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", poll("")),
        format!("{}Content-Length: 1\r\n\r\n", poll("")),
    ];
    for request in left_behind {
        let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        client.write_all(request.as_bytes()).await.unwrap();
        wait_for_metric(&base, WAITING, 1.0).await;
        drop(client);
        freed(&base).await;
        // The workspace's next poll has the place.
        let next = a.wait();
        wait_for_metric(&base, WAITING, 1.0).await;
        next.abort();
        wait_for_metric(&base, WAITING, 0.0).await;
    }

    // Woken meanwhile by uploads its filter excludes, one every half second: they do not put
    // the check off (they did, a review found: the place was held for the whole wait).
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!("{}\r\n\r\n", poll("&type=zzz"));
    client.write_all(request.as_bytes()).await.unwrap();
    wait_for_metric(&base, WAITING, 1.0).await;
    let uploads = {
        let (base, ws, token) = (base.clone(), a.ws, a.token.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let part = reqwest::multipart::Part::bytes(vec![1]).file_name("tick.bin");
                let _ = reqwest::Client::new()
                    .post(format!("{base}/workspaces/{ws}/chat/uploads"))
                    .bearer_auth(&token)
                    .multipart(reqwest::multipart::Form::new().part("files", part))
                    .send()
                    .await;
            }
        })
    };
    drop(client);
    freed(&base).await;
    uploads.abort();
}

/// Waits until no long poll waits: a client that went is found within 3 s, given 15.
async fn freed(base: &str) {
    let waiting = || async { metric_value(&scrape_metrics(base).await, WAITING) == Some(0.0) };
    eventually(
        "the gone client's place freed",
        Duration::from_secs(15),
        waiting,
    )
    .await;
}

/// Only an upload's rows wake a long poll (they alone are announced): a wait whose filter
/// excludes them no longer reads the feed again at every upload in its workspace (a black-box
/// probe: 32 waits with `type=zzz` made each upload 33 transactions, and another workspace's
/// downloads' p99 five times slower). A wait whose filter admits them is answered as before.
#[tokio::test]
async fn a_wake_that_cannot_answer_a_long_polls_filter_reads_nothing() {
    let db = fresh_db().await;
    let port = free_port();
    let _service = spawn_service(bin_command(&db), port).await;
    let base = format!("http://127.0.0.1:{port}");
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let a = Poller::new(&base, &pool).await;
    let poll = |cursor: Uuid, filter: &str| {
        let request = reqwest::Client::new()
            .get(format!(
                "{base}/workspaces/{}/activity?since_id={cursor}&wait=30&{filter}",
                a.ws
            ))
            .bearer_auth(&a.token);
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    let wakes = |text: &str, outcome: &str| {
        metric_value(
            text,
            &format!("pending_uploads_long_poll_wakes_total{{outcome=\"{outcome}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let excluded: Vec<_> = [
        "type=zzz",
        "method=message/send",
        "type=a2a_receive&method=zzz",
    ]
    .into_iter()
    .map(|filter| poll(a.cursor, filter))
    .collect();
    wait_for_metric(&base, WAITING, 3.0).await;
    for name in ["1.bin", "2.bin", "3.bin", "4.bin", "5.bin"] {
        a.upload(name).await;
    }
    let started = std::time::Instant::now();
    let text = loop {
        let text = scrape_metrics(&base).await;
        if wakes(&text, "ignored") >= 3.0 {
            break text;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(wakes(&text, "queried"), 0.0, "{text}");
    assert_eq!(metric_value(&text, WAITING), Some(3.0));
    assert!(excluded.iter().all(|p| !p.is_finished()));

    // A wait that admits an upload's rows reads the feed when woken, and is answered.
    let newest = reqwest::Client::new()
        .get(format!("{base}/workspaces/{}/activity?limit=1", a.ws))
        .bearer_auth(&a.token)
        .send()
        .await
        .unwrap()
        .json::<Vec<Value>>()
        .await
        .unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let admitted = poll(newest, "type=a2a_receive&method=chat_upload_receive");
    wait_for_metric(&base, WAITING, 4.0).await;
    a.upload("6.bin").await;
    let resp = tokio::time::timeout(Duration::from_secs(5), admitted)
        .await
        .expect("answered by the upload")
        .unwrap();
    let rows: Vec<Value> = resp.json().await.unwrap();
    assert_eq!(rows[0]["summary"], "chat_upload_receive: 6.bin");
    assert!(wakes(&scrape_metrics(&base).await, "queried") >= 1.0);
    for p in excluded {
        p.abort();
    }
}

/// The replica holds at most MAX_LONG_POLLS waiting long polls, whatever the workspaces:
/// beyond, 503 at once, so waiting polls never take the connections other requests need.
#[tokio::test]
async fn long_polls_beyond_the_replica_bound_get_503() {
    let db = fresh_db().await;
    let port = free_port();
    let mut cmd = bin_command(&db);
    cmd.env("MAX_LONG_POLLS", "2");
    let _service = spawn_service(cmd, port).await;
    let base = format!("http://127.0.0.1:{port}");
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let (a, b, c) = (
        Poller::new(&base, &pool).await,
        Poller::new(&base, &pool).await,
        Poller::new(&base, &pool).await,
    );
    let _a = a.wait();
    let b_waits = b.wait();
    wait_for_metric(&base, WAITING, 2.0).await;
    assert_retry_later(
        c.refused().await,
        StatusCode::SERVICE_UNAVAILABLE,
        "2",
        json!({"error": "too many long polls waiting — retry shortly", "code": "long_poll_capacity"}),
    )
    .await;
    b_waits.abort();
    wait_for_metric(&base, WAITING, 1.0).await;
    let _c = c.wait();
    wait_for_metric(&base, WAITING, 2.0).await;
}
