//! Operating under load and faults: the upload cap, slow clients, SIGTERM with work in flight.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use uuid::Uuid;

use crate::common::*;

/// Starts an upload over raw TCP and sends only `sent` bytes of its body.
async fn partial_upload(addr: &str, ws: Uuid, token: &str, body: &[u8], sent: usize) -> TcpStream {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /workspaces/{ws}/chat/uploads HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: multipart/form-data; boundary=XB\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(&body[..sent]).await.unwrap();
    sock
}

fn one_file_body(len: usize) -> Vec<u8> {
    let mut body =
        b"--XB\r\nContent-Disposition: form-data; name=\"files\"; filename=\"slow.bin\"\r\n\r\n"
            .to_vec();
    body.extend(bytes(len, 4));
    body.extend_from_slice(b"\r\n--XB--\r\n");
    body
}

async fn read_response(mut sock: TcpStream) -> String {
    let mut raw = Vec::new();
    sock.read_to_end(&mut raw).await.unwrap();
    String::from_utf8_lossy(&raw).to_string()
}

#[tokio::test]
async fn uploads_beyond_the_concurrency_cap_get_503_with_retry_after() {
    let app = TestApp::start_with(&["--max-concurrent-uploads", "1"]).await;
    let (ws, token) = app.poll_workspace().await;
    let addr = app.url.trim_start_matches("http://").to_string();
    let body = one_file_body(100_000);
    let mut holder = partial_upload(&addr, ws, &token, &body, 1000).await;
    // The holder and a probe race for the one slot: a probe refused with 503 proves the holder
    // has it. A probe that gets through may instead have refused the holder, which then has
    // an answer waiting; start a new holder then (bounded).
    let mut refused = None;
    for _ in 0..100 {
        // Let the holder reach its slot (auth and workspace lookups come first).
        tokio::time::sleep(Duration::from_millis(150)).await;
        let resp = app
            .upload(ws, &token, &[("b.txt", "text/plain", b"b".to_vec())])
            .await;
        if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
            refused = Some(resp);
            break;
        }
        assert_eq!(resp.status(), StatusCode::OK);
        let mut peek = [0u8; 1];
        if holder.try_read(&mut peek).is_ok() {
            holder = partial_upload(&addr, ws, &token, &body, 1000).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = refused.expect("the second upload hit the cap");
    assert_eq!(resp.headers()["retry-after"], "2");
    assert_json(
        resp,
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "too many uploads in progress — retry shortly", "code": "upload_capacity"}),
    )
    .await;
    drop(holder);
    let mut ok = false;
    for _ in 0..200 {
        if app
            .upload(ws, &token, &[("c.txt", "text/plain", b"c".to_vec())])
            .await
            .status()
            == StatusCode::OK
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the slot frees when the first upload goes away");
}

#[tokio::test]
async fn a_client_that_stops_sending_is_cut_off_with_408() {
    let app = TestApp::start_with(&["--body-idle-timeout", "300ms"]).await;
    let (ws, token) = app.poll_workspace().await;
    let addr = app.url.trim_start_matches("http://").to_string();
    let body = one_file_body(100_000);
    let sock = partial_upload(&addr, ws, &token, &body, 50_000).await;
    let raw = tokio::time::timeout(Duration::from_secs(10), read_response(sock))
        .await
        .expect("answered");
    assert!(raw.starts_with("HTTP/1.1 408"), "{raw}");
    assert!(
        raw.ends_with(
            r#"{"error":"request body stalled: no data received within the idle timeout"}"#
        ),
        "{raw}"
    );
    app.assert_nothing_staged().await;
}

/// Reads until the server closes (or resets) the connection; returns the bytes read.
async fn drain(sock: &mut TcpStream) -> usize {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    while let Ok(n) = sock.read(&mut buf).await {
        if n == 0 {
            break;
        }
        total += n;
    }
    total
}

#[tokio::test]
async fn a_client_that_stops_reading_a_download_is_cut_off() {
    // Long enough that a busy test machine never stalls the full-speed reader this long.
    let app = TestApp::start_with(&["--response-idle-timeout", "500ms"]).await;
    let (ws, token) = app.poll_workspace().await;
    let size = 16 * 1024 * 1024;
    let out = app
        .upload_ok(
            ws,
            &token,
            &[("big.bin", "application/octet-stream", bytes(size, 6))],
        )
        .await;
    let fid = file_id(&out[0]);
    let addr = app.url.trim_start_matches("http://");
    let request = format!(
        "GET /workspaces/{ws}/pending-uploads/{fid}/content HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let connect = || async {
        // A small fixed receive buffer (no autotuning): what the server can park in socket
        // buffers stays far below the file size.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(64 * 1024).unwrap();
        let mut sock = sock.connect(addr.parse().unwrap()).await.unwrap();
        sock.write_all(request.as_bytes()).await.unwrap();
        sock
    };

    // A reader that keeps reading gets every byte, however long the whole transfer takes.
    let mut reader = connect().await;
    let whole = tokio::time::timeout(Duration::from_secs(60), drain(&mut reader))
        .await
        .expect("the download finished");
    assert!(whole > size, "all {size} bytes and the head, got {whole}");

    // A reader that stops: the response is cut off once the server's writes stall.
    let mut stalled = connect().await;
    let mut first = [0u8; 1024];
    stalled.read_exact(&mut first).await.unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rest = tokio::time::timeout(Duration::from_secs(60), drain(&mut stalled))
        .await
        .expect("the server closed the connection");
    assert!(
        first.len() + rest < size / 2,
        "cut off: {} of {size} bytes arrived",
        first.len() + rest
    );
}

#[tokio::test]
async fn sigterm_finishes_an_upload_in_flight_then_exits() {
    let db = fresh_db().await;
    let port = free_port();
    let mut service = spawn_service(bin_command(&db), port).await;
    let base = format!("http://127.0.0.1:{port}");
    let (ws, token) = register_poll(&base).await;
    let addr = format!("127.0.0.1:{port}");
    let body = one_file_body(2_000_000);
    let mut sock = partial_upload(&addr, ws, &token, &body, 1_000_000).await;
    wait_for_metric(&base, "pending_uploads_uploads_in_progress", 1.0).await;

    let pid = service.0.as_ref().unwrap().id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // new connections are refused once draining starts
    let mut refused = false;
    for _ in 0..250 {
        if TcpStream::connect(&addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "listener closed on SIGTERM");
    // the upload in flight still completes
    sock.write_all(&body[1_000_000..]).await.unwrap();
    let raw = read_response(sock).await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let out = service.terminate_wait().await;
    assert!(out.status.success(), "clean exit");
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_uploads")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 1, "the in-flight upload was staged");
}

/// SIGTERM ends the wait of every waiting long poll: it answers `[]` at once, as a wait that
/// ended does, so its client asks another replica, and the process exits without waiting out
/// the drain deadline (30 s, after which the poll used to be cut without an answer).
#[tokio::test]
async fn sigterm_answers_waiting_long_polls_at_once_then_exits() {
    let db = fresh_db().await;
    let port = free_port();
    let mut service = spawn_service(bin_command(&db), port).await;
    let base = format!("http://127.0.0.1:{port}");
    let (ws, token) = register_poll(&base).await;
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let cursor: Uuid = sqlx::query_scalar(
        "INSERT INTO activity_logs (workspace_id, activity_type, summary) \
         VALUES ($1, 'seed', 'seed') RETURNING id",
    )
    .bind(ws)
    .fetch_one(&pool)
    .await
    .unwrap();
    let poll = tokio::spawn(
        reqwest::Client::new()
            .get(format!(
                "{base}/workspaces/{ws}/activity?since_id={cursor}&wait=60"
            ))
            .bearer_auth(token)
            .send(),
    );
    wait_for_metric(&base, "pending_uploads_long_polls_waiting", 1.0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let pid = service.0.as_ref().unwrap().id().to_string();
    let signalled = std::time::Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let resp = tokio::time::timeout(Duration::from_secs(3), poll)
        .await
        .expect("the waiting poll answered within 3 s of SIGTERM")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<serde_json::Value>().await.unwrap(), json!([]));
    let out = tokio::time::timeout(Duration::from_secs(10), service.terminate_wait())
        .await
        .expect("the process exited within 10 s of SIGTERM, not after the drain deadline");
    assert!(out.status.success(), "clean exit");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "exited {:?} after SIGTERM",
        signalled.elapsed()
    );
}
