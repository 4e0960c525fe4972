//! Attacks from the open internet (SPEC §10, issue 9), each reproduced over real HTTP against
//! the real binary as a child process, with `PUSH_ALLOWED_NETWORKS` empty unless a test
//! opens exactly the one address it needs.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{routing::any, Router};
use reqwest::{header, Method, StatusCode};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use uuid::Uuid;

use crate::common::*;

/// The service as a child process on its own database, configured by `env`.
struct Svc {
    base: String,
    addr: String,
    db: String,
    pool: sqlx::PgPool,
    running: Running,
}

impl Svc {
    async fn start(env: &[(&str, &str)]) -> Svc {
        // An older binary (TEST_SERVICE_BIN) migrates an empty database itself.
        let db = if std::env::var("TEST_SERVICE_BIN").is_ok() {
            empty_db().await
        } else {
            fresh_db().await
        };
        Self::start_on(db, env, None).await
    }

    /// `wrap`: a command to run the binary under (e.g. `unshare`), with its arguments.
    async fn start_on(db: String, env: &[(&str, &str)], wrap: Option<Vec<String>>) -> Svc {
        let port = free_port();
        let mut cmd = match wrap {
            Some(w) => {
                let mut c = std::process::Command::new(&w[0]);
                c.args(&w[1..]);
                c.env_clear()
                    .env("PATH", std::env::var("PATH").unwrap_or_default())
                    .env("DATABASE_URL", &db)
                    .env("LOG_FORMAT", "json");
                c
            }
            None => bin_command(&db),
        };
        cmd.arg("serve");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let running = spawn_service(cmd, port).await;
        let pool = sqlx::PgPool::connect(&db).await.unwrap();
        Svc {
            base: format!("http://127.0.0.1:{port}"),
            addr: format!("127.0.0.1:{port}"),
            db,
            pool,
            running,
        }
    }

    fn at(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    fn pid(&self) -> u32 {
        self.running.0.as_ref().unwrap().id()
    }

    /// Peak resident memory of the process so far, in KiB.
    fn peak_rss_kib(&self) -> u64 {
        self.memory_kib("VmHWM:")
    }

    /// One memory figure of the process's status (`VmRSS:`, `VmHWM:`), in KiB.
    fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

/// A loopback HTTP server that counts what reaches it and answers with `respond`.
async fn server_on(ip: &str, respond: Router) -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = respond.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                next.run(req).await
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, hits)
}

/// A push workspace on 127.0.0.2 that speaks raw TCP: `serve` has each connection, in a task
/// of its own (one that never returns holds its connection open).
async fn raw_workspace<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(serve(sock));
        }
    });
    addr
}

fn one_file(boundary: &str, name: &str, data: &[u8]) -> Vec<u8> {
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\nContent-Type: text/plain\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

async fn upload_raw(svc: &Svc, ws: Uuid, token: &str, body: Vec<u8>) -> reqwest::Response {
    reqwest::Client::new()
        .post(svc.at(&format!("/workspaces/{ws}/chat/uploads")))
        .bearer_auth(token)
        .header("Content-Type", "multipart/form-data; boundary=XB")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Uploads one text file, as `upload_raw` sends it.
async fn upload_file(
    svc: &Svc,
    ws: Uuid,
    token: &str,
    name: &str,
    data: &[u8],
) -> reqwest::Response {
    upload_raw(svc, ws, token, one_file("XB", name, data)).await
}

/// `POST …/pending-uploads/<fid>/ack` with the workspace's token.
async fn ack_file(svc: &Svc, ws: Uuid, token: &str, fid: Uuid) -> reqwest::Response {
    reqwest::Client::new()
        .post(svc.at(&format!("/workspaces/{ws}/pending-uploads/{fid}/ack")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// The head of an upload request written on a raw socket, announcing a `len`-byte body.
fn upload_head(svc: &Svc, ws: Uuid, token: &str, len: usize) -> String {
    format!(
        "POST /workspaces/{ws}/chat/uploads HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: multipart/form-data; boundary=XB\r\nContent-Length: {len}\r\n\r\n",
        svc.addr
    )
}

/// `POST /registry/register` with `body`, with `bearer` when given.
async fn register(
    client: &reqwest::Client,
    svc: &Svc,
    bearer: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut req = client.post(svc.at("/registry/register"));
    if let Some(bearer) = bearer {
        req = req.bearer_auth(bearer);
    }
    req.json(body).send().await.unwrap()
}

async fn admin_create(svc: &Svc, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(svc.at("/workspaces"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The platform deletes a workspace's row outright; its uploads and their activity rows stay
/// until they expire (SPEC §2). Registering the id again needed no bearer ("no workspace row
/// yet"), and the new token read the old owner's files and feed (found by a black-box probe).
/// Now only the admin may start such an id afresh; an id with no history is still free.
#[tokio::test]
async fn a_deleted_workspace_id_with_uploads_left_cannot_be_claimed_without_a_bearer() {
    let svc = Svc::start(&[]).await;
    let client = reqwest::Client::new();
    let (ws, token) = register_poll(&svc.base).await;
    let resp = upload_file(&svc, ws, &token, "secret.txt", b"the old owner's").await;
    assert_eq!(resp.status(), StatusCode::OK);
    sqlx::query("DELETE FROM workspaces WHERE id = $1")
        .bind(ws)
        .execute(&svc.pool)
        .await
        .unwrap();

    let resp = register(&client, &svc, None, &json!({"id": ws})).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "missing workspace auth token");
    let resp = register(&client, &svc, Some("guess"), &json!({"id": ws})).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid workspace auth token");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM workspaces WHERE id = $1")
        .bind(ws)
        .fetch_one(&svc.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "a refused claim leaves no row");

    // Its uploads acked and swept, its activity rows gone: still not free (its total stays).
    for gone in [
        "UPDATE pending_uploads SET acked_at = now() WHERE workspace_id = $1",
        "DELETE FROM pending_uploads WHERE workspace_id = $1",
        "DELETE FROM activity_logs WHERE workspace_id = $1",
    ] {
        sqlx::query(gone).bind(ws).execute(&svc.pool).await.unwrap();
        let resp = register(&client, &svc, None, &json!({"id": ws})).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "after {gone}");
    }

    // The admin may; an id nothing is left of is free to anyone, as before.
    let resp = register(&client, &svc, Some(ADMIN), &json!({"id": ws})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert!(body["auth_token"].is_string(), "{body}");
    let resp = register(&client, &svc, None, &json!({"id": Uuid::new_v4()})).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_push_redirect_to_an_internal_address_is_not_followed() {
    // The metadata server lives on 127.0.0.1; the attacker's server on 127.0.0.2, the one
    // address the operator allowed for pushes.
    let (meta, meta_hits) = server_on(
        "127.0.0.1",
        Router::new().fallback(any(|| async { "AKIA-SECRET-ROLE-CREDENTIALS" })),
    )
    .await;
    let target = format!("http://{meta}/latest/meta-data/iam/security-credentials/role");
    let (attacker, attacker_hits) = server_on(
        "127.0.0.2",
        Router::new().fallback(any(move || {
            let target = target.clone();
            async move { (StatusCode::SEE_OTHER, [("location", target)], "") }
        })),
    )
    .await;
    let svc = Svc::start(&[("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32")]).await;
    let resp = admin_create(
        &svc,
        json!({"name": "evil", "url": format!("http://{attacker}")}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let ws: Value = resp.json().await.unwrap();
    let (ws, token) = (
        ws["id"].as_str().unwrap().parse().unwrap(),
        ws["auth_token"].as_str().unwrap().to_string(),
    );
    let resp = upload_file(&svc, ws, &token, "a.txt", b"hi").await;
    let status = resp.status();
    let body = resp.text().await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (
            StatusCode::BAD_GATEWAY,
            r#"{"error":"workspace unreachable"}"#
        )
    );
    assert_eq!(
        attacker_hits.load(Ordering::SeqCst),
        1,
        "the push reached the attacker"
    );
    assert_eq!(
        meta_hits.load(Ordering::SeqCst),
        0,
        "the redirect was not followed"
    );
}

/// A push workspace on 127.0.0.2 answering with `respond`, for a service that lets pushes
/// reach that address: its id and token.
async fn push_workspace(svc: &Svc, respond: Router) -> (Uuid, String) {
    let (workspace, _) = server_on("127.0.0.2", respond).await;
    push_workspace_at(svc, workspace).await
}

/// A push workspace whose URL is `addr`: its id and token.
async fn push_workspace_at(svc: &Svc, addr: SocketAddr) -> (Uuid, String) {
    let resp = admin_create(
        svc,
        json!({"name": "pushed", "url": format!("http://{addr}")}),
    )
    .await;
    let ws: Value = resp.json().await.unwrap();
    (
        ws["id"].as_str().unwrap().parse().unwrap(),
        ws["auth_token"].as_str().unwrap().to_string(),
    )
}

/// Reads one relayed request of a small upload (boundary `XB`) up to its closing boundary;
/// false when the connection ended first.
async fn read_small_upload(sock: &mut TcpStream) -> bool {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(5).any(|w| w == b"--XB-") {
        match sock.read(&mut buf).await {
            Ok(n @ 1..) => got.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    }
    true
}

/// A 32 MiB upload written on a raw socket by a task of its own, which keeps its write half
/// open afterwards (an answer must come while the client still sends); the read half.
async fn big_raw_upload(svc: &Svc, ws: Uuid, token: &str) -> tokio::net::tcp::OwnedReadHalf {
    let body = one_file("XB", "big.bin", &vec![b'x'; 32 << 20]);
    let sock = TcpStream::connect(&svc.addr).await.unwrap();
    let (rx, mut tx) = sock.into_split();
    let head = upload_head(svc, ws, token, body.len());
    tokio::spawn(async move {
        let _ = tx.write_all(head.as_bytes()).await;
        let _ = tx.write_all(&body).await;
        std::future::pending::<()>().await;
        drop(tx);
    });
    rx
}

/// The head of the answer `rx` gets (and whatever came with it), within 20 s.
async fn answer_head(rx: &mut tokio::net::tcp::OwnedReadHalf) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), rx.read(&mut buf))
            .await
            .expect("an answer within 20 s")
            .unwrap();
        assert!(n > 0, "closed without an answer");
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// An answer whose body comes a byte every 100 ms, `bytes` of them.
fn trickled_answer(bytes: usize) -> Router {
    Router::new().fallback(any(move || async move {
        let trickle = futures::stream::unfold(0, move |sent| async move {
            (sent < bytes).then_some(())?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            Some((
                Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"x")),
                sent + 1,
            ))
        });
        (StatusCode::OK, axum::body::Body::from_stream(trickle))
    }))
}

/// A push workspace (anyone can register one) must not hold an upload's slot at no cost: its
/// whole answer must come within PUSH_ANSWER_TIMEOUT of the upload's last byte and be at most
/// PUSH_ANSWER_MAX_BYTES, else 502 and the slot is back. Before, one that read the upload
/// and never answered (or trickled its answer) held the slot for PUSH_TIMEOUT, 20 minutes:
/// sixteen such workspaces took all 64 of a replica's slots. An answer in time is read whole
/// and relayed, with the slot held while it is read.
#[tokio::test]
async fn a_push_workspace_must_answer_in_time_and_in_bounds() {
    let svc = Svc::start(&[
        ("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32"),
        ("MAX_CONCURRENT_UPLOADS_PER_WORKSPACE", "1"),
        ("PUSH_ANSWER_TIMEOUT", "1s"),
        ("PUSH_ANSWER_MAX_BYTES", "1000"),
    ])
    .await;
    let unreachable = json!({"error": "workspace unreachable"});
    let silent = Router::new().fallback(any(|body: axum::body::Bytes| async move {
        drop(body);
        std::future::pending::<()>().await
    }));
    let too_big_declared = Router::new().fallback(any(|| async { vec![b'x'; 1001] }));
    let too_big_streamed = Router::new().fallback(any(|| async {
        let chunks = futures::stream::iter(
            (0..3).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 400]))),
        );
        axum::body::Body::from_stream(chunks)
    }));
    for (case, respond) in [
        ("reads the upload, never answers", silent),
        ("trickles its answer past the deadline", trickled_answer(20)),
        ("answers over the cap (Content-Length)", too_big_declared),
        ("answers over the cap (chunked)", too_big_streamed),
    ] {
        let (ws, token) = push_workspace(&svc, respond).await;
        let started = Instant::now();
        let resp = tokio::time::timeout(
            Duration::from_secs(15),
            upload_file(&svc, ws, &token, "a.txt", b"a"),
        )
        .await
        .unwrap_or_else(|_| panic!("{case}: no answer in 15 s"));
        let took = started.elapsed();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "{case}");
        assert_eq!(resp.json::<Value>().await.unwrap(), unreachable, "{case}");
        assert!(took < Duration::from_secs(5), "{case}: took {took:?}");
        wait_for_metric(&svc.base, "pending_uploads_uploads_in_progress", 0.0).await;
    }

    // In time and in bounds: relayed whole, the slot held until then.
    let (ws, token) = push_workspace(&svc, trickled_answer(5)).await;
    let relaying = tokio::spawn({
        let (base, token) = (svc.base.clone(), token.clone());
        async move {
            reqwest::Client::new()
                .post(format!("{base}/workspaces/{ws}/chat/uploads"))
                .bearer_auth(token)
                .header("Content-Type", "multipart/form-data; boundary=XB")
                .body(one_file("XB", "a.txt", b"a"))
                .send()
                .await
                .unwrap()
        }
    });
    wait_for_metric(&svc.base, "pending_uploads_uploads_in_progress", 1.0).await;
    let resp = upload_file(&svc, ws, &token, "b.txt", b"b").await;
    assert_eq!(
        resp.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the first upload's answer is still being read"
    );
    let relayed = relaying.await.unwrap();
    assert_eq!(relayed.status(), StatusCode::OK);
    assert_eq!(&relayed.bytes().await.unwrap()[..], b"xxxxx");
    wait_for_metric(&svc.base, "pending_uploads_uploads_in_progress", 0.0).await;
    let resp = upload_file(&svc, ws, &token, "c.txt", b"c").await;
    assert_eq!(resp.status(), StatusCode::OK, "the slot came back");
}

/// A push workspace that reads an upload and never answers, and two uploads to it held in
/// their relays (their tasks): its id, its token and the tasks.
async fn two_relays_held(
    svc: &Svc,
) -> (
    Uuid,
    String,
    Vec<tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>>,
) {
    let silent = Router::new().fallback(any(|body: axum::body::Bytes| async move {
        drop(body);
        std::future::pending::<()>().await
    }));
    let (ws, token) = push_workspace(svc, silent).await;
    let held = (0..2)
        .map(|i| {
            let (base, token) = (svc.base.clone(), token.clone());
            tokio::spawn(async move {
                reqwest::Client::new()
                    .post(format!("{base}/workspaces/{ws}/chat/uploads"))
                    .bearer_auth(token)
                    .header("Content-Type", "multipart/form-data; boundary=XB")
                    .body(one_file("XB", &format!("{i}.txt"), b"a"))
                    .send()
                    .await
            })
        })
        .collect();
    wait_for_metric(&svc.base, "pending_uploads_uploads_in_progress", 2.0).await;
    (ws, token, held)
}

/// Relays to push workspaces have slots of their own (MAX_CONCURRENT_PUSH_UPLOADS): anyone can
/// register push workspaces that read an upload and answer only at PUSH_ANSWER_TIMEOUT, and
/// with one pool for both, a couple of tiny uploads a second to sixteen of them held every
/// upload slot of a replica, so staged uploads got 503 (review). Now those only fill the push
/// slots; a poll workspace's upload still goes through.
#[tokio::test]
async fn push_relays_cannot_take_the_slots_of_staged_uploads() {
    let svc = Svc::start(&[
        ("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32"),
        ("MAX_CONCURRENT_UPLOADS", "2"),
        ("MAX_CONCURRENT_PUSH_UPLOADS", "2"),
    ])
    .await;
    let (ws, token, waiting) = two_relays_held(&svc).await;
    let resp = upload_file(&svc, ws, &token, "third.txt", b"c").await;
    assert_eq!(
        resp.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the push slots are full"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "upload_capacity");
    let (poll_ws, poll_token) = register_poll(&svc.base).await;
    for name in ["a.txt", "b.txt"] {
        let resp = upload_file(&svc, poll_ws, &poll_token, name, b"staged").await;
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "a staged upload is not affected"
        );
    }
    for w in waiting {
        w.abort();
    }
}

/// MAX_CONCURRENT_UPLOADS_PER_WORKSPACE bounds a workspace's relays and staged uploads
/// together: they were counted apart, so a workspace holding its bound of relays, switched to
/// poll by its own token (a re-registration, at once), took as many staged uploads again (a
/// review: 8 in progress for one workspace under a bound of 4).
#[tokio::test]
async fn a_workspace_switched_between_push_and_poll_keeps_one_bound() {
    let svc = Svc::start(&[
        ("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32"),
        ("MAX_CONCURRENT_UPLOADS_PER_WORKSPACE", "2"),
    ])
    .await;
    let (ws, token, relays) = two_relays_held(&svc).await;
    let resp = register(
        &reqwest::Client::new(),
        &svc,
        Some(&token),
        &json!({"id": ws, "delivery_mode": "poll"}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK, "switched to poll");
    let resp = upload_file(&svc, ws, &token, "staged.txt", b"s").await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["code"],
        "workspace_busy"
    );
    assert_eq!(svc.count("pending_uploads").await, 0);
    for r in relays {
        r.abort();
    }
}

/// A push workspace must take the upload at BODY_MIN_RATE, as a client must send it: one
/// that accepts the connection and never reads held the upload's slot for PUSH_TIMEOUT
/// once the socket buffers were full (the client's own deadlines only run while its body is
/// being read). Now 502 soon after the rate falls behind; the client, which sent at full
/// speed, is not blamed (no 408). The slot comes back then: the relay resets its connection to
/// the workspace (until stop 57, only TCP_USER_TIMEOUT, PUSH_ANSWER_TIMEOUT, ended it).
#[tokio::test]
async fn a_push_workspace_that_stops_reading_the_upload_is_cut() {
    let svc = Svc::start(&[
        ("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32"),
        ("BODY_RATE_GRACE", "1s"),
        ("BODY_MIN_RATE", "4000000"),
        ("PUSH_ANSWER_TIMEOUT", "1s"),
    ])
    .await;
    // Accepts, and never reads.
    let tarpit_addr = raw_workspace(|sock| async move {
        let _held = sock;
        std::future::pending::<()>().await
    })
    .await;
    let (ws, token) = push_workspace_at(&svc, tarpit_addr).await;
    let mut rx = big_raw_upload(&svc, ws, &token).await;
    let started = Instant::now();
    let answer = answer_head(&mut rx).await;
    let took = started.elapsed();
    assert!(
        answer.starts_with("HTTP/1.1 502"),
        "after {took:?}: {answer}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
    wait_for_metric(&svc.base, "pending_uploads_uploads_in_progress", 0.0).await;
}

/// An upload whose caller loses its claim while it runs (its token revoked, or its workspace
/// removed) is refused at its commit, as it would have been at its start, and leaves nothing.
/// Before, the claim was checked only when the request began: a revoked token went on
/// uploading for as long as UPLOAD_BODY_TIMEOUT allows, and a removed workspace got rows no
/// token could fetch (a black-box probe: 16 of 16 such uploads committed).
#[tokio::test]
async fn a_claim_lost_during_an_upload_stops_it_at_the_commit() {
    let svc = Svc::start(&[]).await;
    let client = reqwest::Client::new();
    // Written but for its last bytes; `lose` runs; then the rest: the answer.
    async fn upload_across(
        svc: &Svc,
        ws: Uuid,
        bearer: &str,
        lose: impl std::future::Future<Output = ()>,
    ) -> String {
        let body = one_file("XB", "late.bin", &[b'x'; 200_000]);
        let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
        sock.write_all(upload_head(svc, ws, bearer, body.len()).as_bytes())
            .await
            .unwrap();
        sock.write_all(&body[..body.len() - 10]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        lose.await;
        sock.write_all(&body[body.len() - 10..]).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        String::from_utf8_lossy(&answer[..n]).into_owned()
    }
    let staged = |ws: Uuid| {
        let pool = svc.pool.clone();
        async move {
            let rows: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM pending_uploads WHERE workspace_id = $1)
                      + (SELECT count(*) FROM activity_logs WHERE workspace_id = $1)",
            )
            .bind(ws)
            .fetch_one(&pool)
            .await
            .unwrap();
            rows
        }
    };

    // The token revoked (by the workspace's other token) mid-upload: 401.
    let (ws, token) = register_poll(&svc.base).await;
    let minted: Value = mint_token(&svc, ws, &token).await.json().await.unwrap();
    let other = minted["auth_token"].as_str().unwrap().to_string();
    let own_id: Uuid = sqlx::query_scalar(
        "SELECT id FROM workspace_auth_tokens WHERE workspace_id = $1 ORDER BY created_at LIMIT 1",
    )
    .bind(ws)
    .fetch_one(&svc.pool)
    .await
    .unwrap();
    let revoke = async {
        let resp = client
            .delete(svc.at(&format!("/workspaces/{ws}/tokens/{own_id}")))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    };
    let answer = upload_across(&svc, ws, &token, revoke).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert_eq!(staged(ws).await, 0, "nothing staged");

    // The workspace removed mid-upload, the admin uploading (as the canvas does): 404.
    let (ws, _) = register_poll(&svc.base).await;
    let remove = async {
        let resp = client
            .delete(svc.at(&format!("/workspaces/{ws}")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    };
    let answer = upload_across(&svc, ws, ADMIN, remove).await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert_eq!(staged(ws).await, 0, "nothing staged");

    // A claim that holds still uploads.
    let (ws, token) = register_poll(&svc.base).await;
    let answer = upload_across(&svc, ws, &token, async {}).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// A push workspace's answer is relayed with the type it chose (`text/html` here), and served
/// files with theirs: every answer says `nosniff`, so a browser never reads one as something
/// else (a black-box probe found the relayed answer without it).
#[tokio::test]
async fn every_answer_says_nosniff_a_relayed_one_included() {
    let svc = Svc::start(&[("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32")]).await;
    let html = Router::new().fallback(any(|| async {
        (
            [(header::CONTENT_TYPE, "text/html")],
            "<script>alert(1)</script>",
        )
    }));
    let (ws, token) = push_workspace(&svc, html).await;
    let relayed = upload_file(&svc, ws, &token, "a.txt", b"hi").await;
    assert_eq!(relayed.status(), StatusCode::OK);
    assert_eq!(relayed.headers()[header::CONTENT_TYPE], "text/html");
    assert_eq!(relayed.headers()["x-content-type-options"], "nosniff");
    let limits = reqwest::get(svc.at("/uploads/limits")).await.unwrap();
    assert_eq!(limits.headers()["x-content-type-options"], "nosniff");
}

/// A client that sends less than its Content-Length and closes its side is the client's fault:
/// a poll upload answers 400, and so does a push one now. Before, the relay's failure was
/// taken for the workspace's: 502 `workspace unreachable`, logged as a workspace outage (a
/// black-box probe).
#[tokio::test]
async fn a_push_upload_whose_client_cuts_its_body_short_is_a_400() {
    let svc = Svc::start(&[("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32")]).await;
    let reads_all = Router::new().fallback(any(|body: axum::body::Bytes| async move {
        format!("took {} bytes", body.len())
    }));
    let (ws, token) = push_workspace(&svc, reads_all).await;
    let body = one_file("XB", "short.bin", &[b'x'; 200]);
    let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
    sock.write_all(upload_head(&svc, ws, &token, 100_000).as_bytes())
        .await
        .unwrap();
    sock.write_all(&body).await.unwrap();
    sock.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), sock.read_to_end(&mut answer))
        .await
        .expect("an answer within 20 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.ends_with(r#"{"error":"malformed multipart body"}"#),
        "{answer}"
    );
}

/// A push workspace may answer before it has taken the whole upload (a refusal, say) and then
/// stop reading. Before, the rest of the upload sat in the relay with no deadline: the answer
/// went out, the slot came back, and both connections stayed open for good (review: three such
/// uploads in a row, each past a per-workspace cap of 1, all still open 15 s later). Now the
/// slot is held until the relay lets go of the upload, the client's connection closes after
/// the answer (`Connection: close`), and a workspace that stops reading is cut (at BODY_MIN_RATE,
/// or by TCP_USER_TIMEOUT, PUSH_ANSWER_TIMEOUT).
#[tokio::test]
async fn a_push_workspace_that_answers_early_cannot_keep_the_relay() {
    let svc = Svc::start(&[
        ("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32"),
        ("PUSH_ANSWER_TIMEOUT", "1s"),
    ])
    .await;
    let early_addr = raw_workspace(|mut sock| async move {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match sock.read(&mut buf).await {
                Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let _ = sock
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await;
        // Not a byte more is read.
        std::future::pending::<()>().await
    })
    .await;
    let (ws, token) = push_workspace_at(&svc, early_addr).await;
    let mut rx = big_raw_upload(&svc, ws, &token).await;
    // The answer, and then the client's connection closes (before: it stayed open).
    let mut answer = Vec::new();
    let read_all = tokio::time::timeout(Duration::from_secs(15), async {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = rx.read(&mut buf).await {
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(
        read_all.is_ok(),
        "the client's connection is still open after 15 s: {answer}"
    );
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    assert!(answer.contains("\r\ncontent-length: 2\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
    // The relay lets go of the rest of the upload (the client's side ended, or the workspace
    // is cut for not reading), and the slot it held comes back.
    let started = Instant::now();
    loop {
        let metrics = scrape_metrics(&svc.base).await;
        if metric_value(&metrics, "pending_uploads_uploads_in_progress") == Some(0.0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the relay never let go of the upload"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A push workspace's connection is not kept once its answer is in. The push client kept each
/// finished connection for reuse, one per workspace address and no bound on how many, for
/// 90 s: a client that re-registered its workspace's URL to a new port (its own token, an
/// address literal: no lookup, no rate) before each upload held a socket of the replica's per
/// upload, and 20,000 of them used up its open files. Every accept and every spool file then
/// failed, for everyone (a red team).
#[tokio::test]
async fn a_push_workspace_keeps_no_connection_of_the_replicas_open() {
    let svc = Svc::start(&[("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32")]).await;
    let closed = Arc::new(AtomicUsize::new(0));
    // Each answers its upload and keeps the connection open until the service closes it.
    let workspace = |closed: Arc<AtomicUsize>| {
        raw_workspace(move |mut sock| {
            let closed = closed.clone();
            async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let whole = |got: &[u8]| {
                    let end = got.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
                    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))?
                        .trim()
                        .parse()
                        .ok()?;
                    (got.len() >= end + len).then_some(())
                };
                while whole(&got).is_none() {
                    match sock.read(&mut buf).await {
                        Ok(n @ 1..) => got.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if sock.write_all(answer).await.is_err() {
                    return;
                }
                while let Ok(1..) = sock.read(&mut buf).await {}
                closed.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let (ws, token) = push_workspace_at(&svc, workspace(closed.clone()).await).await;
    let client = reqwest::Client::new();
    const UPLOADS: usize = 20;
    for i in 0..UPLOADS {
        if i > 0 {
            let url = format!("http://{}", workspace(closed.clone()).await);
            let body = json!({"id": ws, "delivery_mode": "push", "url": url});
            let resp = register(&client, &svc, Some(&token), &body).await;
            assert_eq!(resp.status(), StatusCode::OK);
        }
        let resp = upload_file(&svc, ws, &token, "a.txt", b"a").await;
        assert_eq!(resp.status(), StatusCode::OK, "upload {i}");
        assert_eq!(resp.text().await.unwrap(), "ok");
    }
    let started = Instant::now();
    while closed.load(Ordering::SeqCst) < UPLOADS && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        closed.load(Ordering::SeqCst),
        UPLOADS,
        "connections of the replica's still open to workspaces that answered"
    );
}

/// Each relay has a connection of its own. A connection kept from an earlier relay went to
/// the next upload for the same address, and a workspace server that takes one request per
/// connection (it answers, then reads nothing more and keeps the connection open) left that
/// upload waiting PUSH_ANSWER_TIMEOUT for a 502: the red team's "answered and reset" upload,
/// sent on the connection another workspace of its host had left (two workspaces behind one
/// host share a pool entry), and the 502 of an upload sent on a kept connection just as its
/// server closed it.
#[tokio::test]
async fn a_relay_never_goes_out_on_a_connection_an_earlier_one_left() {
    let svc = Svc::start(&[
        ("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32"),
        ("PUSH_ANSWER_TIMEOUT", "20s"),
    ])
    .await;
    let addr = raw_workspace(|mut sock| async move {
        // One request: its head and its (small) body; then nothing more is read.
        if !read_small_upload(&mut sock).await {
            return;
        }
        let _ = sock
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await;
        std::future::pending::<()>().await
    })
    .await;
    let (ws, token) = push_workspace_at(&svc, addr).await;
    for i in 0..3 {
        let started = Instant::now();
        let resp = upload_file(&svc, ws, &token, "a.txt", b"a").await;
        let (status, took) = (resp.status(), started.elapsed());
        assert!(
            status == StatusCode::OK && took < Duration::from_secs(5),
            "upload {i}: {status} after {took:?}"
        );
    }
}

/// A push workspace's status reaches the client (and the metrics' status label) only as a
/// known code: an unrecognised one as the x00 of its class (RFC 9110 §15), anything past 599
/// as 502. Before, a workspace answering 700, 701, … made each a new series and a status the
/// canvas cannot read.
#[tokio::test]
async fn a_push_workspace_answers_only_known_statuses() {
    let svc = Svc::start(&[("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32")]).await;
    for (answered, relayed) in [(700, 502), (999, 502), (299, 200), (418, 418), (599, 500)] {
        let status = StatusCode::from_u16(answered).unwrap();
        let (ws, token) = push_workspace(
            &svc,
            Router::new().fallback(any(move || async move { status })),
        )
        .await;
        let resp = upload_file(&svc, ws, &token, "a.txt", b"a").await;
        assert_eq!(resp.status().as_u16(), relayed, "answered {answered}");
    }
    let metrics = scrape_metrics(&svc.base).await;
    for odd in ["700", "999", "299", "599"] {
        assert!(
            !metrics.contains(&format!("status=\"{odd}\"")),
            "a series for status {odd}"
        );
    }
}

/// Of a push workspace's answer only its status, Content-Type and body are relayed: an
/// encoded body (a red team's `Content-Encoding: gzip`) reached the client as bytes it could
/// not read, labelled `application/json`. The relay asks for `identity` (a request without
/// Accept-Encoding takes any coding), so an encoded answer is a 502.
#[tokio::test]
async fn a_push_workspace_answer_in_an_encoding_is_not_relayed() {
    let svc = Svc::start(&[("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32")]).await;
    for (encoding, relayed) in [
        ("gzip", StatusCode::BAD_GATEWAY),
        ("br", StatusCode::BAD_GATEWAY),
        ("identity", StatusCode::OK),
    ] {
        // The relay asks for no coding: without Accept-Encoding any would do (RFC 9110).
        let answer = move |asked: axum::http::HeaderMap| async move {
            let status = match asked.get(header::ACCEPT_ENCODING) {
                Some(v) if v == "identity" => StatusCode::OK,
                _ => StatusCode::NOT_ACCEPTABLE,
            };
            (
                status,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::CONTENT_ENCODING, encoding),
                ],
                "{}",
            )
        };
        let (ws, token) = push_workspace(&svc, Router::new().fallback(any(answer))).await;
        let resp = upload_file(&svc, ws, &token, "a.txt", b"a").await;
        assert_eq!(resp.status(), relayed, "{encoding}");
        assert!(
            !resp.headers().contains_key(header::CONTENT_ENCODING),
            "{encoding}"
        );
    }
}

/// A body coded in transfer is coded too: `Transfer-Encoding: gzip, chunked` has the
/// connection take off the chunks and leave the gzip, and the relay sent those bytes on as the
/// answer (an audit). Now a 502, as for `Content-Encoding`; plain chunked is relayed.
#[tokio::test]
async fn a_push_workspace_answer_coded_in_transfer_is_not_relayed() {
    let svc = Svc::start(&[("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32")]).await;
    for (coding, relayed) in [
        ("gzip, chunked", StatusCode::BAD_GATEWAY),
        ("GZIP,chunked", StatusCode::BAD_GATEWAY),
        ("chunked", StatusCode::OK),
        ("Chunked", StatusCode::OK),
    ] {
        let addr = raw_workspace(move |mut sock| async move {
            if read_small_upload(&mut sock).await {
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                     Transfer-Encoding: {coding}\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"
                );
                let _ = sock.write_all(answer.as_bytes()).await;
            }
        })
        .await;
        let (ws, token) = push_workspace_at(&svc, addr).await;
        let resp = upload_file(&svc, ws, &token, "a.txt", b"a").await;
        assert_eq!(resp.status(), relayed, "{coding}");
        let body = resp.text().await.unwrap();
        match relayed {
            StatusCode::OK => assert_eq!(body, "{}", "{coding}"),
            _ => assert_eq!(body, r#"{"error":"workspace unreachable"}"#, "{coding}"),
        }
    }
}

/// A push workspace's own empty 400 reaches the client as the workspace sent it. Relayed
/// answers now carry their length, and such an answer, a connection's first, read as hyper's
/// own rejection of a malformed request: the client got `{"error":"malformed HTTP request"}`,
/// blamed for the workspace's refusal (a white-box audit).
#[tokio::test]
async fn a_push_workspaces_empty_refusal_is_relayed_as_it_came() {
    let svc = Svc::start(&[("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32")]).await;
    let refuse = || async { (StatusCode::BAD_REQUEST, "") };
    let (ws, token) = push_workspace(&svc, Router::new().fallback(any(refuse))).await;
    let resp = upload_file(&svc, ws, &token, "a.txt", b"a").await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let types: Vec<_> = resp
        .headers()
        .get_all(header::CONTENT_TYPE)
        .iter()
        .collect();
    assert_eq!(types, ["text/plain; charset=utf-8"]);
    assert_eq!(resp.text().await.unwrap(), "");
    // A 204 goes out without a length, as it must (RFC 9110 §8.6; the review of the change
    // that gave relayed answers their length).
    let taken = || async { StatusCode::NO_CONTENT };
    let (ws, token) = push_workspace(&svc, Router::new().fallback(any(taken))).await;
    let resp = upload_file(&svc, ws, &token, "a.txt", b"a").await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(!resp.headers().contains_key(header::CONTENT_LENGTH));
    assert!(!resp.headers().contains_key(header::TRANSFER_ENCODING));
    // A 205 has no content (RFC 9110 §15.3.6): what a workspace sends after one was relayed,
    // and a client would read it as its connection's next answer (an audit).
    let addr = raw_workspace(|mut sock| async move {
        if !read_small_upload(&mut sock).await {
            return;
        }
        let _ = sock
            .write_all(b"HTTP/1.1 205 Reset Content\r\nContent-Length: 5\r\n\r\nhello")
            .await;
    })
    .await;
    let (ws, token) = push_workspace_at(&svc, addr).await;
    let resp = upload_file(&svc, ws, &token, "a.txt", b"a").await;
    assert_eq!(resp.status(), StatusCode::RESET_CONTENT);
    assert_eq!(resp.headers()[header::CONTENT_LENGTH], "0");
    assert_eq!(resp.text().await.unwrap(), "");
}

#[tokio::test]
async fn push_urls_to_internal_addresses_are_refused_in_every_form() {
    let svc = Svc::start(&[]).await;
    let refused = [
        "http://127.0.0.1:9/",
        "http://localhost:8080",
        "http://127.1/",
        "http://2130706433/",
        "http://[::1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://169.254.169.254/latest/meta-data",
        "http://[fd00::1]/",
        "http://10.0.0.5/",
        "http://172.16.0.1/",
        "http://192.168.1.10/",
        "http://0.0.0.0/",
        "http://user:pass@example.com/",
        "http://example.com/hook?x=1",
        "http://169.254.169.254/x?y=",
        "http://example.com/#frag",
        "ftp://example.com/",
    ];
    let client = reqwest::Client::new();
    for url in refused {
        let body = json!({"id": Uuid::new_v4(), "url": url});
        let resp = register(&client, &svc, None, &body).await;
        assert_error(resp, StatusCode::BAD_REQUEST, "workspace URL not allowed").await;
        let resp = admin_create(&svc, json!({"name": "x", "url": url})).await;
        assert_error(resp, StatusCode::BAD_REQUEST, "workspace URL not allowed").await;
    }
    assert_eq!(svc.count("workspaces").await, 0, "nothing registered");
    // A public address is fine.
    let resp = admin_create(
        &svc,
        json!({"name": "ok", "url": "http://93.184.216.34:8443/base"}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_url_written_by_someone_else_is_checked_again_before_connecting() {
    // Rows may be written by the platform or an older binary: the proxy checks the URL itself.
    let (receiver, hits) =
        server_on("127.0.0.1", Router::new().fallback(any(|| async { "ok" }))).await;
    let svc = Svc::start(&[]).await;
    for url in [
        format!("http://{receiver}"),
        "http://169.254.169.254/x?y=".to_string(),
    ] {
        let ws = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO workspaces (id, name, delivery_mode, url) VALUES ($1, 'old', 'push', $2)",
        )
        .bind(ws)
        .bind(&url)
        .execute(&svc.pool)
        .await
        .unwrap();
        let resp = upload_file(&svc, ws, ADMIN, "a.txt", b"hi").await;
        assert_error(resp, StatusCode::BAD_REQUEST, "workspace URL not allowed").await;
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

/// The binary under `unshare --mount` with its own /etc/hosts: the name `rebind.test`
/// resolves to whatever the test writes into that file (in place, so the bind mount sees it).
#[tokio::test]
async fn a_name_that_rebinds_to_loopback_is_refused_at_connect_time() {
    let (receiver, hits) =
        server_on("127.0.0.1", Router::new().fallback(any(|| async { "ok" }))).await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    let write_hosts = |ip: &str| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .create(true)
            .open(&hosts)
            .unwrap();
        writeln!(f, "127.0.0.1 localhost\n{ip} rebind.test").unwrap();
    };
    write_hosts("93.184.216.34");
    let script = format!(
        "mount --bind {} /etc/hosts && exec {} \"$@\"",
        hosts.display(),
        service_bin()
    );
    let wrap = vec![
        "unshare".to_string(),
        "--mount".to_string(),
        "sh".to_string(),
        "-c".to_string(),
        script,
        "sh".to_string(),
    ];
    let svc = Svc::start_on(fresh_db().await, &[], Some(wrap)).await;
    let url = format!("http://rebind.test:{}", receiver.port());
    // At registration the name resolves to a public address: accepted.
    let resp = admin_create(&svc, json!({"name": "r", "url": url})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let ws: Uuid = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // Then it rebinds to loopback; a registration now is refused up front...
    write_hosts("127.0.0.1");
    let resp = admin_create(&svc, json!({"name": "r2", "url": url})).await;
    assert_error(resp, StatusCode::BAD_REQUEST, "workspace URL not allowed").await;
    // ...and the registered workspace's push is refused when the proxy resolves it.
    let resp = upload_file(&svc, ws, ADMIN, "a.txt", b"hi").await;
    assert_error(resp, StatusCode::BAD_REQUEST, "workspace URL not allowed").await;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "nothing reached the loopback receiver"
    );
}

/// A resolver that never answers: a UDP socket on port 53 of a loopback address of its own
/// that takes queries and never replies. Returns it with the address.
async fn silent_nameserver() -> (tokio::net::UdpSocket, std::net::Ipv4Addr) {
    for _ in 0..20 {
        let [_, b, c] = Uuid::new_v4().as_bytes()[..3] else {
            unreachable!()
        };
        let ip = std::net::Ipv4Addr::new(127, b, c, 53);
        if let Ok(socket) = tokio::net::UdpSocket::bind((ip, 53)).await {
            return (socket, ip);
        }
    }
    panic!("no free loopback address for a nameserver");
}

/// Registration resolves a push URL's name (SPEC §4 Registry) on tokio's blocking pool, which
/// spool writes share; a timeout abandons the wait, not the thread. Unauthenticated clients
/// must not be able to fill that pool with lookups a resolver leaves hanging: beyond
/// MAX_CONCURRENT_REGISTRATION_LOOKUPS a registration is 503 at once, and a lookup keeps its
/// place until the resolver really gives up, not until the registration stops waiting.
/// `serve` with `env`, whose resolver asks a nameserver that never answers (its own mount
/// namespace's /etc/resolv.conf): the service and that nameserver's socket.
async fn service_with_a_silent_resolver(env: &[(&str, &str)]) -> (Arc<Svc>, tokio::net::UdpSocket) {
    let (dns, dns_ip) = silent_nameserver().await;
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    let nsswitch = dir.path().join("nsswitch.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {dns_ip}\noptions timeout:30 attempts:1\n"),
    )
    .unwrap();
    std::fs::write(&nsswitch, "hosts: files dns\n").unwrap();
    let script = format!(
        "mount --bind {} /etc/resolv.conf && mount --bind {} /etc/nsswitch.conf && exec {} \"$@\"",
        resolv.display(),
        nsswitch.display(),
        service_bin()
    );
    let wrap = ["unshare", "--mount", "sh", "-c", &script, "sh"]
        .map(String::from)
        .to_vec();
    let svc = Arc::new(Svc::start_on(fresh_db().await, env, Some(wrap)).await);
    (svc, dns)
}

/// Waits until the nameserver has been asked for every name of `labels`.
async fn asked_for(dns: &tokio::net::UdpSocket, labels: &[&str]) {
    let mut asked = vec![false; labels.len()];
    let mut packet = [0u8; 512];
    while asked.iter().any(|a| !a) {
        let n = tokio::time::timeout(Duration::from_secs(10), dns.recv(&mut packet))
            .await
            .expect("the lookups reach the nameserver")
            .unwrap();
        for (i, label) in labels.iter().enumerate() {
            asked[i] |= packet[..n]
                .windows(label.len())
                .any(|w| w == label.as_bytes());
        }
    }
}

#[tokio::test]
async fn registrations_cannot_fill_the_blocking_pool_with_hanging_lookups() {
    let env = [("MAX_CONCURRENT_REGISTRATION_LOOKUPS", "2")];
    let (svc, dns) = service_with_a_silent_resolver(&env).await;
    let client = reqwest::Client::new();
    let register_at = |host: &str| {
        let (svc, client) = (svc.clone(), client.clone());
        let body = json!({"id": Uuid::new_v4(), "url": format!("http://{host}/")});
        async move {
            let started = Instant::now();
            let resp = register(&client, &svc, None, &body).await;
            (resp, started.elapsed())
        }
    };
    let first = tokio::spawn(register_at("first-lookup.test"));
    let second = tokio::spawn(register_at("second-lookup.test"));
    // Both lookups are in flight once the nameserver has been asked for both names.
    asked_for(&dns, &["first-lookup", "second-lookup"]).await;
    let (resp, took) = register_at("third-lookup.test").await;
    assert!(took < Duration::from_secs(1), "the third waited {took:?}");
    assert_eq!(resp.headers().get("retry-after").unwrap(), "5");
    assert_json(
        resp,
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "too many push URL lookups in progress — retry shortly", "code": "lookup_capacity"}),
    )
    .await;
    // The first two give up waiting (a name that does not resolve yet is accepted)...
    for task in [first, second] {
        let (resp, took) = task.await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(took >= Duration::from_millis(1500), "answered in {took:?}");
    }
    // ...but their lookups still hang on the resolver, and still count.
    let (resp, _) = register_at("fourth-lookup.test").await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    // A URL with an address needs no lookup, and is not refused.
    let (resp, _) = register_at("93.184.216.34").await;
    assert_eq!(resp.status(), StatusCode::OK);
}

/// One client's registrations may hold SLOT_SHARE_PER_CLIENT of the lookup places: its
/// registration bucket let it start 60 at once against 64 places, and names that never
/// resolve held them for everyone else's (a review). Past its share it gets 429 at once, and
/// another client still gets a place.
#[tokio::test]
async fn one_client_cannot_hold_every_lookup_place() {
    let env = [
        ("MAX_CONCURRENT_REGISTRATION_LOOKUPS", "4"),
        ("SLOT_SHARE_PER_CLIENT", "50"),
        ("TRUSTED_PROXIES", "127.0.0.0/8"),
    ];
    let (svc, dns) = service_with_a_silent_resolver(&env).await;
    let register_from = |client: &'static str, host: &'static str| {
        let svc = svc.clone();
        async move {
            reqwest::Client::new()
                .post(svc.at("/registry/register"))
                .header("x-forwarded-for", client)
                .json(&json!({"id": Uuid::new_v4(), "url": format!("http://{host}/")}))
                .send()
                .await
                .unwrap()
        }
    };
    let held = [
        tokio::spawn(register_from("8.8.4.66", "one-lookup.test")),
        tokio::spawn(register_from("8.8.4.66", "two-lookup.test")),
    ];
    asked_for(&dns, &["one-lookup", "two-lookup"]).await;
    let resp = register_from("8.8.4.66", "three-lookup.test").await;
    assert_eq!(resp.headers().get("retry-after").unwrap(), "2");
    assert_json(
        resp,
        StatusCode::TOO_MANY_REQUESTS,
        json!({"error": "too many requests in progress from this client — retry shortly", "code": "client_busy"}),
    )
    .await;
    let other = tokio::spawn(register_from("8.8.4.67", "other-lookup.test"));
    asked_for(&dns, &["other-lookup"]).await;
    assert_eq!(other.await.unwrap().status(), StatusCode::OK);
    for h in held {
        assert_eq!(h.await.unwrap().status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn a_workspace_whose_tokens_are_revoked_cannot_be_taken_over() {
    let svc = Svc::start(&[]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let client = reqwest::Client::new();
    // a pending file the attacker would like to read
    let resp = upload_file(&svc, ws, ADMIN, "secret.txt", b"private").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let token_id: Uuid =
        sqlx::query_scalar("SELECT id FROM workspace_auth_tokens WHERE workspace_id = $1")
            .bind(ws)
            .fetch_one(&svc.pool)
            .await
            .unwrap();
    let resp = client
        .delete(svc.at(&format!("/workspaces/{ws}/tokens/{token_id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_json(resp, StatusCode::OK, json!({"revoked": true})).await;

    // The takeover: knowing the id is no longer enough.
    let takeover = json!({"id": ws, "delivery_mode": "push", "url": "http://93.184.216.34/"});
    let resp = register(&client, &svc, None, &takeover).await;
    assert_error(
        resp,
        StatusCode::UNAUTHORIZED,
        "missing workspace auth token",
    )
    .await;
    for bearer in ["made-up", token.as_str()] {
        let resp = register(&client, &svc, Some(bearer), &takeover).await;
        assert_error(
            resp,
            StatusCode::UNAUTHORIZED,
            "invalid workspace auth token",
        )
        .await;
    }
    assert_eq!(
        mode_and_live_tokens(&svc, ws).await,
        ("poll".to_string(), 0),
        "unchanged, no token issued"
    );
    // The admin (the platform) can still re-register it and mint a token.
    let body = json!({"id": ws, "delivery_mode": "poll"});
    let resp = register(&client, &svc, Some(ADMIN), &body).await;
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "registered");
    assert!(
        v.get("auth_token").is_none(),
        "re-registration issues no token"
    );
    assert!(v["platform_inbound_secret"].is_string());
    let resp = mint_token(&svc, ws, ADMIN).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

/// Workspace `ws`'s delivery mode and how many live tokens it has.
async fn mode_and_live_tokens(svc: &Svc, ws: Uuid) -> (String, i64) {
    sqlx::query_as(
        "SELECT delivery_mode, (SELECT count(*) FROM workspace_auth_tokens t WHERE t.workspace_id = w.id AND revoked_at IS NULL)
         FROM workspaces w WHERE id = $1",
    )
    .bind(ws)
    .fetch_one(&svc.pool)
    .await
    .unwrap()
}

/// Takes a lock on `conn` with `statement` (its `$1` the workspace `ws`); returns the
/// connection's backend pid, for [`until_blocked_by`].
async fn holding(conn: &mut sqlx::PgConnection, statement: &str, ws: Uuid) -> i32 {
    let pid = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    sqlx::query(statement)
        .bind(ws)
        .execute(&mut *conn)
        .await
        .unwrap();
    pid
}

/// Waits (20 s at most) until a backend is blocked by a lock `holder` (a backend's pid)
/// holds: other tests' waits, in other databases, do not count.
async fn until_blocked_by(svc: &Svc, holder: i32, what: &str) {
    eventually(what, Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid)))",
        )
        .bind(holder)
        .fetch_one(&svc.pool)
        .await
        .unwrap()
    })
    .await;
}

/// A token is checked before the transaction that uses it, and revoking one did not take
/// the workspace's row lock: a token revoked while its re-registration (or its mint) waited
/// for that lock still redirected the workspace's uploads (or minted a fresh token that
/// outlived the revocation), and one revoked just after its check still revoked another of
/// the workspace's tokens. Now each of these takes the workspace's row, then holds the
/// caller's token live or refuses it.
#[tokio::test]
async fn a_token_revoked_while_its_request_waits_claims_nothing() {
    let svc = Svc::start(&[]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let token_id: Uuid = sqlx::query_scalar(
        "SELECT id FROM workspace_auth_tokens WHERE workspace_id = $1 AND prefix = $2",
    )
    .bind(ws)
    .bind(&token[..8])
    .fetch_one(&svc.pool)
    .await
    .unwrap();
    let takeover = json!({"id": ws, "delivery_mode": "push", "url": "http://93.184.216.34/"});
    let http = reqwest::Client::new();
    let requests = [
        (
            "re-registration",
            http.post(svc.at("/registry/register")).json(&takeover),
        ),
        (
            "mint",
            http.post(svc.at(&format!("/workspaces/{ws}/tokens"))),
        ),
        (
            "revocation of the workspace's other token",
            http.delete(svc.at(&format!("/workspaces/{ws}/tokens/{token_id}"))),
        ),
    ];
    for (what, request) in requests {
        // A live token for the round, revoked while its request waits.
        let resp = mint_token(&svc, ws, ADMIN).await;
        let minted: Value = resp.json().await.unwrap();
        let bearer = minted["auth_token"].as_str().unwrap().to_string();
        let mut lock = svc.pool.begin().await.unwrap();
        let workspace_row = "SELECT 1 FROM workspaces WHERE id = $1 FOR UPDATE";
        let holder = holding(&mut lock, workspace_row, ws).await;
        let sent = tokio::spawn(request.bearer_auth(&bearer).send());
        let waits = format!("the {what} waits for the workspace's row");
        until_blocked_by(&svc, holder, &waits).await;
        sqlx::query("UPDATE workspace_auth_tokens SET revoked_at = now() WHERE id = $1::uuid")
            .bind(minted["id"].as_str().unwrap())
            .execute(&svc.pool)
            .await
            .unwrap();
        lock.rollback().await.unwrap();
        let resp = sent.await.unwrap().unwrap();
        assert_error(
            resp,
            StatusCode::UNAUTHORIZED,
            "invalid workspace auth token",
        )
        .await;
        assert_eq!(
            mode_and_live_tokens(&svc, ws).await,
            ("poll".to_string(), 1),
            "{what}: nothing changed, no token issued or revoked"
        );
    }
    // The workspace's own live token still does all three.
    let resp = mint_token(&svc, ws, &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = json!({"id": ws, "delivery_mode": "poll"});
    let resp = register(&http, &svc, Some(&token), &body).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let minted: Value = mint_token(&svc, ws, &token).await.json().await.unwrap();
    let resp = http
        .delete(svc.at(&format!(
            "/workspaces/{ws}/tokens/{}",
            minted["id"].as_str().unwrap()
        )))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_json(resp, StatusCode::OK, json!({"revoked": true})).await;
}

/// A mint that waited for its workspace's row while the workspace was removed (its tokens
/// revoked with it) answered 404 `workspace not found` to the workspace's token, where the
/// revocation and the re-registration answer 401, as the same request sent afterwards does.
/// Now 401 to the token, and 404 to the admin; nothing minted either way.
#[tokio::test]
async fn a_mint_waiting_while_its_workspace_is_removed_answers_as_a_later_one_would() {
    let svc = Svc::start(&[]).await;
    for (bearer_is_admin, status, error) in [
        (
            false,
            StatusCode::UNAUTHORIZED,
            "invalid workspace auth token",
        ),
        (true, StatusCode::NOT_FOUND, "workspace not found"),
    ] {
        let (ws, token) = register_poll(&svc.base).await;
        let bearer = if bearer_is_admin {
            ADMIN
        } else {
            token.as_str()
        };
        let mut lock = svc.pool.begin().await.unwrap();
        let workspace_row = "SELECT 1 FROM workspaces WHERE id = $1 FOR UPDATE";
        let holder = holding(&mut lock, workspace_row, ws).await;
        let mint = reqwest::Client::new().post(svc.at(&format!("/workspaces/{ws}/tokens")));
        let sent = tokio::spawn(mint.bearer_auth(bearer).send());
        until_blocked_by(&svc, holder, "the mint waits for the workspace's row").await;
        // The removal DELETE /workspaces/:id makes, committed while the mint waits.
        let removed = pending_uploads::db::workspaces::remove(&mut lock, ws).await;
        assert!(removed.unwrap(), "the workspace was there to remove");
        lock.commit().await.unwrap();
        let resp = sent.await.unwrap().unwrap();
        assert_error(resp, status, error).await;
        assert_eq!(
            mode_and_live_tokens(&svc, ws).await,
            ("poll".to_string(), 0),
            "nothing minted"
        );
        let later = mint_token(&svc, ws, bearer).await;
        assert_error(later, status, error).await;
    }
}

/// An upload's claim is checked again in the statement that commits it, but as of that
/// statement's start: one that then waited for the workspace's lock (up to half of
/// DEPENDENCY_TIMEOUT) while its token was revoked was staged all the same, after the
/// revocation had committed (a review). An admission that waited for the lock now checks the
/// token again once it holds it, for a small file's single statement and for a large file's
/// COPY and admission alike.
#[tokio::test]
async fn an_upload_waiting_for_its_workspace_when_its_token_is_revoked_stages_nothing() {
    let svc = Svc::start(&[]).await;
    for (what, size) in [("a small file", 1024), ("a large file", 20 << 20)] {
        let (ws, token) = register_poll(&svc.base).await;
        let mut lock = svc.pool.acquire().await.unwrap();
        let workspace_lock = "SELECT pg_advisory_lock(pending_uploads_lock_key($1))";
        let holder = holding(&mut lock, workspace_lock, ws).await;
        let sent = {
            let (base, token) = (svc.base.clone(), token.clone());
            tokio::spawn(async move {
                let part = reqwest::multipart::Part::bytes(vec![b'x'; size]).file_name("late.bin");
                reqwest::Client::new()
                    .post(format!("{base}/workspaces/{ws}/chat/uploads"))
                    .bearer_auth(token)
                    .multipart(reqwest::multipart::Form::new().part("files", part))
                    .send()
                    .await
                    .unwrap()
            })
        };
        let waits = format!("{what}'s upload waits for its workspace's lock");
        until_blocked_by(&svc, holder, &waits).await;
        sqlx::query("UPDATE workspace_auth_tokens SET revoked_at = now() WHERE workspace_id = $1")
            .bind(ws)
            .execute(&svc.pool)
            .await
            .unwrap();
        sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut *lock)
            .await
            .unwrap();
        let resp = sent.await.unwrap();
        assert_error(
            resp,
            StatusCode::UNAUTHORIZED,
            "invalid workspace auth token",
        )
        .await;
        let staged: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM pending_uploads WHERE workspace_id = $1)
                  + (SELECT count(*) FROM activity_logs WHERE workspace_id = $1)",
        )
        .bind(ws)
        .fetch_one(&svc.pool)
        .await
        .unwrap();
        assert_eq!(staged, 0, "{what}: nothing staged after the revocation");
    }
    assert_totals_exact(&svc.pool).await;
}

/// `POST /workspaces/{ws}/tokens` with `bearer`.
async fn mint_token(svc: &Svc, ws: Uuid, bearer: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(svc.at(&format!("/workspaces/{ws}/tokens")))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap()
}

/// Anyone can register a workspace and so hold a token, and minting was unbounded: 500 mints
/// made 501 token rows, and mint-and-revoke grew the table forever. Now a workspace holds at
/// most MAX_TOKENS_PER_WORKSPACE live tokens (minting more: 429 `token_limit`, nothing
/// written, until one is revoked), concurrent mints included, and as many revoked ones (the
/// newest; older ones are deleted).
#[tokio::test]
async fn tokens_per_workspace_are_bounded() {
    let svc = Svc::start(&[("MAX_TOKENS_PER_WORKSPACE", "3")]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let client = reqwest::Client::new();
    let mint = || {
        client
            .post(svc.at(&format!("/workspaces/{ws}/tokens")))
            .bearer_auth(&token)
            .send()
    };
    let tokens = |revoked: bool| {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM workspace_auth_tokens
             WHERE workspace_id = $1 AND (revoked_at IS NOT NULL) = $2",
        )
        .bind(ws)
        .bind(revoked)
        .fetch_one(&svc.pool)
    };
    // The registration's token and ten concurrent mints: two of them fit.
    let answers = futures::future::join_all((0..10).map(|_| mint())).await;
    let mut minted = Vec::new();
    for resp in answers {
        let resp = resp.unwrap();
        if resp.status() == StatusCode::OK {
            let v: Value = resp.json().await.unwrap();
            minted.push(v["id"].as_str().unwrap().to_string());
        } else {
            assert_json(
                resp,
                StatusCode::TOO_MANY_REQUESTS,
                json!({"error": "too many live tokens for this workspace — revoke one first", "code": "token_limit", "max": 3}),
            )
            .await;
        }
    }
    assert_eq!(minted.len(), 2, "the cap holds under concurrent mints");
    assert_eq!(
        (tokens(false).await.unwrap(), tokens(true).await.unwrap()),
        (3, 0)
    );
    // Revoke one, mint one, many times over: never more than 3 live and 3 revoked.
    for round in 0..8 {
        let id = minted.pop().unwrap();
        let resp = client
            .delete(svc.at(&format!("/workspaces/{ws}/tokens/{id}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "round {round}");
        let resp = mint().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "round {round}: room again");
        let v: Value = resp.json().await.unwrap();
        minted.push(v["id"].as_str().unwrap().to_string());
        let resp = mint().await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "round {round}"
        );
    }
    assert_eq!(
        (tokens(false).await.unwrap(), tokens(true).await.unwrap()),
        (3, 3)
    );
    // Revoking a token that is not there deletes nothing.
    let resp = client
        .delete(svc.at(&format!("/workspaces/{ws}/tokens/{}", Uuid::new_v4())))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        (tokens(false).await.unwrap(), tokens(true).await.unwrap()),
        (3, 3)
    );
    // The prune finds a workspace's revoked tokens through an index, not by reading every
    // workspace's (anyone who registers may call it).
    sqlx::query(
        "WITH w AS (INSERT INTO workspaces (id, name, delivery_mode)
                    SELECT gen_random_uuid(), 'other', 'poll' FROM generate_series(1, 500)
                    RETURNING id)
         INSERT INTO workspace_auth_tokens (workspace_id, token_hash, prefix, revoked_at)
         SELECT w.id, sha256((w.id::text || g)::bytea), 'x', now()
         FROM w, generate_series(1, 10) g",
    )
    .execute(&svc.pool)
    .await
    .unwrap();
    analyze(&svc.pool, "workspace_auth_tokens").await;
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT id FROM workspace_auth_tokens
         WHERE workspace_id = $1 AND revoked_at IS NOT NULL ORDER BY revoked_at DESC, id LIMIT 3",
    )
    .bind(ws)
    .fetch_all(&svc.pool)
    .await
    .unwrap();
    assert!(
        plan.iter()
            .any(|l| l.contains("workspace_auth_tokens_revoked_idx")),
        "{plan:#?}"
    );
    // The live tokens all still work.
    let resp = client
        .get(svc.at(&format!("/workspaces/{ws}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// A request that waits for a pooled connection and then for its query shares one
/// DEPENDENCY_TIMEOUT between them (SPEC §10). Before, each wait had a deadline of its own:
/// with the pool's connections stuck behind a lock, a request that got one freed by a query
/// that timed out then waited in its own query (3 s against a 2 s timeout).
#[tokio::test]
async fn the_wait_for_a_connection_counts_against_the_dependency_timeout() {
    let svc = Svc::start(&[
        ("DATABASE_MAX_CONNECTIONS", "2"),
        ("DEPENDENCY_TIMEOUT", "2s"),
    ])
    .await;
    let (ws, token) = register_poll(&svc.base).await;
    // The database stalls for our tables: a lock every query of the route waits on.
    let mut locker = svc.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE pending_uploads IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let list = || async {
        let started = Instant::now();
        let resp = client
            .get(svc.at(&format!("/workspaces/{ws}/pending-uploads")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        (resp.status(), started.elapsed())
    };
    // Twice the pool: two wait in their queries; a second later two more wait for a
    // connection, which the first two's timeouts free half way through their wait.
    let later = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        futures::future::join(list(), list()).await
    };
    let (first, (third, fourth)) =
        futures::future::join(futures::future::join(list(), list()), later).await;
    locker.rollback().await.unwrap();
    let answers = [first.0, first.1, third, fourth];
    for (status, took) in &answers {
        assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{answers:?}");
        // The later two answer about 2 s after they were sent; before, they waited 1 s for
        // a connection and then 2 s more in their query.
        assert!(
            *took < Duration::from_millis(2900),
            "a request waited {took:?} against a 2 s DEPENDENCY_TIMEOUT: {answers:?}"
        );
    }
    let (status, _) = list().await;
    assert_eq!(status, StatusCode::OK, "the database is back");
}

/// Registration needs no credential, and each first one adds a workspace and a token that
/// nothing removes: a stranger could add them as fast as the database takes them. Now a
/// replica takes REGISTRATIONS_PER_MINUTE from callers with no claim on the workspace (no
/// bearer, a made-up one, another workspace's token); beyond, 429 `registration_rate` with a
/// Retry-After, and nothing written. The admin and a workspace's own token are not counted.
#[tokio::test]
async fn registrations_without_a_claim_are_rate_limited() {
    let svc = Svc::start(&[("REGISTRATIONS_PER_MINUTE", "3")]).await;
    let client = reqwest::Client::new();
    let fresh = || json!({"id": Uuid::new_v4(), "delivery_mode": "poll"});
    let resp = register(&client, &svc, None, &fresh()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let own: Value = resp.json().await.unwrap();
    let (own_id, own_token) = (
        own["id"].clone(),
        own["auth_token"].as_str().unwrap().to_string(),
    );
    for bearer in [None, Some("made-up")] {
        let resp = register(&client, &svc, bearer, &fresh()).await;
        assert_eq!(resp.status(), StatusCode::OK, "{bearer:?}");
    }
    for bearer in [None, Some("made-up"), Some(own_token.as_str())] {
        let resp = register(&client, &svc, bearer, &fresh()).await;
        assert_eq!(
            resp.headers()["retry-after"],
            "20",
            "{bearer:?}: 3 a minute"
        );
        assert_json(
            resp,
            StatusCode::TOO_MANY_REQUESTS,
            json!({"error": "too many registrations — retry shortly", "code": "registration_rate"}),
        )
        .await;
    }
    assert_eq!(
        svc.count("workspaces").await,
        3,
        "nothing written when refused"
    );
    // A claim on the workspace is not limited: its own token, or the admin's.
    let again = json!({"id": own_id, "delivery_mode": "poll"});
    let resp = register(&client, &svc, Some(&own_token), &again).await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "re-registration with its own token"
    );
    let resp = register(&client, &svc, Some(ADMIN), &fresh()).await;
    assert_eq!(resp.status(), StatusCode::OK, "the admin");
    assert_eq!(svc.count("workspaces").await, 4);
}

/// The bound on the wait for a workspace's lock (DEPENDENCY_TIMEOUT/2) is for that wait
/// only. A first version left it on for the rest of the transaction: an upload whose commit
/// then met the workspace's totals row locked a little longer (an ack, a sweep, here the
/// test) failed with 503 and lost its bytes, a 2 MiB one at COMMIT (the deferred totals
/// fold), a small one at its totals update. Both wait for the row now, as they always did.
#[tokio::test]
async fn the_lock_wait_bound_does_not_cut_the_rest_of_the_commit() {
    let svc = Svc::start(&[("DEPENDENCY_TIMEOUT", "4s")]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let resp = upload_file(&svc, ws, &token, "first.txt", b"makes the totals row").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let large = bytes(2 << 20, 9);
    for (name, data) in [("small.txt", &b"small"[..]), ("large.bin", &large[..])] {
        let mut totals = svc.pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM pending_upload_totals WHERE workspace_id = $1 FOR UPDATE")
            .bind(ws)
            .execute(&mut *totals)
            .await
            .unwrap();
        let (resp, ()) = tokio::join!(upload_file(&svc, ws, &token, name, data), async {
            tokio::time::sleep(Duration::from_millis(3000)).await;
            totals.commit().await.unwrap();
        });
        assert_eq!(resp.status(), StatusCode::OK, "{name}");
    }
    assert_eq!(svc.count("pending_uploads").await, 3);
}

/// One stranger could use up a replica's REGISTRATIONS_PER_MINUTE and keep every new
/// workspace out. Each client address now has REGISTRATIONS_PER_MINUTE_PER_CLIENT of them (an
/// IPv6 client by its /48), and a refused one takes none of the replica's. Behind a proxy in
/// TRUSTED_PROXIES the client is the first untrusted hop of X-Forwarded-For from the right;
/// from any other peer the header is ignored, so no client can pose as many.
#[tokio::test]
async fn one_client_cannot_use_up_the_registrations_of_others() {
    async fn from(svc: &Svc, forwarded_for: &str) -> reqwest::Response {
        reqwest::Client::new()
            .post(svc.at("/registry/register"))
            .header("x-forwarded-for", forwarded_for)
            .json(&json!({"id": Uuid::new_v4(), "delivery_mode": "poll"}))
            .send()
            .await
            .unwrap()
    }
    async fn refused(resp: reqwest::Response, retry_after: &str) {
        assert_retry_later(
            resp,
            StatusCode::TOO_MANY_REQUESTS,
            retry_after,
            json!({"error": "too many registrations — retry shortly", "code": "registration_rate"}),
        )
        .await;
    }
    let limits = [
        ("REGISTRATIONS_PER_MINUTE_PER_CLIENT", "2"),
        ("REGISTRATIONS_PER_MINUTE", "7"),
    ];
    let direct = Svc::start(&limits).await;
    assert_eq!(from(&direct, "203.0.113.1").await.status(), StatusCode::OK);
    assert_eq!(from(&direct, "203.0.113.2").await.status(), StatusCode::OK);
    refused(from(&direct, "203.0.113.3").await, "30").await;
    assert_eq!(direct.count("workspaces").await, 2);

    let svc = Svc::start(&[limits[0], limits[1], ("TRUSTED_PROXIES", "127.0.0.0/8")]).await;
    for _ in 0..2 {
        assert_eq!(from(&svc, "203.0.113.1").await.status(), StatusCode::OK);
    }
    refused(from(&svc, "203.0.113.1").await, "30").await;
    refused(from(&svc, "198.51.100.7, 203.0.113.1").await, "30").await;
    assert_eq!(
        from(&svc, "203.0.113.2").await.status(),
        StatusCode::OK,
        "another client is not held back"
    );
    for hop in ["2001:db8::1", "[2001:db8::2]:4711"] {
        assert_eq!(from(&svc, hop).await.status(), StatusCode::OK, "{hop}");
    }
    refused(from(&svc, "2001:db8::3").await, "30").await;
    // Another /56 of the same /48 is the same site: 256 of them each had a client's share,
    // and eleven used up the replica's (a resource probe). Another /48 is another client.
    refused(from(&svc, "2001:db8:0:100::1").await, "30").await;
    assert_eq!(from(&svc, "2001:db8:1::1").await.status(), StatusCode::OK);
    // Six taken; the refused took none of the replica's seven.
    assert_eq!(from(&svc, "198.51.100.9").await.status(), StatusCode::OK);
    refused(from(&svc, "198.51.100.10").await, "9").await;
    assert_eq!(svc.count("workspaces").await, 7);
}

/// One client could open MAX_CONNECTIONS connections (idle ones live for the header read
/// timeout, long polls longer) and leave every other client in the listen backlog. A client
/// address now holds at most MAX_CONNECTIONS_PER_CLIENT; more are answered 429 and closed,
/// and other addresses (here 127.0.0.2) are served. A proxy in TRUSTED_PROXIES is not
/// counted.
#[tokio::test]
async fn one_client_cannot_hold_every_connection() {
    async fn connect_from(svc: &Svc, local: &str) -> TcpStream {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{local}:0").parse().unwrap()).unwrap();
        sock.connect(svc.addr.parse().unwrap()).await.unwrap()
    }
    async fn get(mut sock: TcpStream, path: &str) -> String {
        let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        sock.write_all(head.as_bytes()).await.unwrap();
        read_all(sock).await
    }
    async fn read_all(mut sock: TcpStream) -> String {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut answer))
            .await
            .expect("answered and closed")
            .unwrap();
        String::from_utf8(answer).unwrap()
    }
    let svc = Svc::start(&[("MAX_CONNECTIONS_PER_CLIENT", "3")]).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from(&svc, "127.0.0.1").await);
    }
    let refused = read_all(connect_from(&svc, "127.0.0.1").await).await;
    assert!(
        refused.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
        "{refused}"
    );
    assert!(refused.contains("\r\nRetry-After: 1\r\n"), "{refused}");
    let body: Value = serde_json::from_str(refused.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(
        body,
        json!({"error": "too many connections from this client — retry shortly", "code": "connection_limit"})
    );
    let other = get(connect_from(&svc, "127.0.0.2").await, "/healthz").await;
    assert!(
        other.starts_with("HTTP/1.1 200 OK"),
        "another client: {other}"
    );
    let metrics = get(connect_from(&svc, "127.0.0.2").await, "/metrics").await;
    assert_eq!(
        metric_value(&metrics, "pending_uploads_connections_refused_total"),
        Some(1.0)
    );
    // A closed connection gives its place back (once the service has seen it close).
    drop(held.pop());
    eventually(
        "the closed connection's place came back",
        Duration::from_secs(5),
        || async {
            get(connect_from(&svc, "127.0.0.1").await, "/healthz")
                .await
                .starts_with("HTTP/1.1 200 OK")
        },
    )
    .await;

    let behind_proxy = Svc::start(&[
        ("MAX_CONNECTIONS_PER_CLIENT", "1"),
        ("TRUSTED_PROXIES", "127.0.0.1/32"),
    ])
    .await;
    let _open = connect_from(&behind_proxy, "127.0.0.1").await;
    let proxied = get(connect_from(&behind_proxy, "127.0.0.1").await, "/healthz").await;
    assert!(
        proxied.starts_with("HTTP/1.1 200 OK"),
        "a trusted proxy: {proxied}"
    );
}

/// A feed filter that matches few of a workspace's rows reads those rows only. With the
/// workspace's `seq` index alone, a `type`, `method` or `since_secs` that matched nothing
/// read every row of the workspace (55 ms at 244,000 rows), as often as its owner asked, on
/// the database every client shares.
#[tokio::test]
async fn a_feed_filter_reads_only_the_rows_it_matches() {
    const ROWS: i64 = 20_000;
    const BY_SEQ: &str = "activity_logs_workspace_seq_idx";
    // One pooled connection, which runs each feed statement past the five runs after which
    // PostgreSQL may plan it once for every parameter value (a generic plan).
    let svc = Svc::start(&[("DATABASE_MAX_CONNECTIONS", "1")]).await;
    let (ws, token) = register_poll(&svc.base).await;
    sqlx::query(
        "INSERT INTO activity_logs (workspace_id, activity_type, method, summary, created_at)
         SELECT $1, 'a2a_receive', 'message/send', 'row ' || g, now() - interval '2 hours'
         FROM generate_series(1, $2) g",
    )
    .bind(ws)
    .bind(ROWS)
    .execute(&svc.pool)
    .await
    .unwrap();
    analyze(&svc.pool, "activity_logs").await;
    let cursor: Uuid = sqlx::query_scalar(
        "SELECT id FROM activity_logs WHERE workspace_id = $1 ORDER BY seq LIMIT 1",
    )
    .bind(ws)
    .fetch_one(&svc.pool)
    .await
    .unwrap();
    let feeds = [
        "type=zzz".to_string(),
        "method=zzz".to_string(),
        format!("type=zzz&since_id={cursor}"),
        format!("type=a2a_receive&method=zzz&since_id={cursor}"),
        "type=zzz&since_secs=3600".to_string(),
        "since_secs=1".to_string(),
    ];
    let client = reqwest::Client::new();
    let read = |query: String| {
        let req = client
            .get(svc.at(&format!("/workspaces/{ws}/activity?{query}")))
            .bearer_auth(&token);
        async move { req.send().await.unwrap() }
    };
    // Every read here scans exactly one of these indexes (a cursor's own lookup goes by the
    // primary key), so their scans count the reads PostgreSQL has reported: a session reports
    // all it has pending at once, at most once a second.
    let indexes = [
        BY_SEQ,
        "activity_logs_workspace_type_seq_idx",
        "activity_logs_workspace_method_seq_idx",
        "activity_logs_workspace_created_idx",
    ];
    let scans = || async {
        let sum: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(idx_scan), 0)::bigint FROM pg_stat_user_indexes
             WHERE indexrelname = ANY($1)",
        )
        .bind(&indexes[..])
        .fetch_one(&svc.pool)
        .await
        .unwrap();
        sum
    };
    let reported = |reads: i64| async move {
        let what = "the reads reported, each through one of the feed's indexes (not a read \
                    of the whole table)";
        eventually(what, Duration::from_secs(30), || async {
            scans().await >= reads
        })
        .await
    };
    // First reads that may settle a statement on a generic plan, one planned once for every
    // parameter value, which every later read on the connection takes: unfiltered ones, as a
    // workspace's own polls are, and an age window that takes many rows.
    let warm_up = [
        format!("since_id={cursor}&limit=1"),
        "limit=1".to_string(),
        "since_secs=10800&limit=500".to_string(),
    ];
    let before = scans().await;
    for query in warm_up.iter().flat_map(|q| std::iter::repeat_n(q, 8)) {
        assert_eq!(
            read(query.clone()).await.status(),
            StatusCode::OK,
            "{query}"
        );
    }
    reported(before + (warm_up.len() * 8) as i64).await;
    let (read_before, before) = (index_use(&svc.pool, BY_SEQ).await.1, scans().await);
    for feed in feeds.iter().flat_map(|f| std::iter::repeat_n(f, 8)) {
        let resp = read(format!("{feed}&limit=10")).await;
        assert_eq!(resp.status(), StatusCode::OK, "{feed}");
        assert_eq!(resp.json::<Value>().await.unwrap(), json!([]), "{feed}");
    }
    // The workspace's rows were not read through its `seq` index, but through the indexes
    // that lead with the filtered column.
    reported(before + (feeds.len() * 8) as i64).await;
    let by_seq = index_use(&svc.pool, BY_SEQ).await.1 - read_before;
    assert!(by_seq < ROWS / 10, "{by_seq} rows read through {BY_SEQ}");
    for index in &indexes[1..] {
        let (scans, _) = index_use(&svc.pool, index).await;
        assert!(scans > 0, "{index}");
    }
    // Matching rows are still found, newest first and after a cursor.
    let newest = read("type=a2a_receive&method=message/send&limit=2".into()).await;
    let newest: Value = newest.json().await.unwrap();
    assert_eq!(newest[0]["summary"], format!("row {ROWS}"));
    assert_eq!(newest[1]["summary"], format!("row {}", ROWS - 1));
    let after = read(format!("method=message/send&since_id={cursor}&limit=1")).await;
    let after: Value = after.json().await.unwrap();
    assert_eq!(after[0]["summary"], "row 2");
}

/// The newest activity row of a workspace: a cursor a long poll waits after.
async fn newest_activity(svc: &Svc, ws: Uuid, token: &str) -> String {
    let feed: Value = reqwest::Client::new()
        .get(svc.at(&format!("/workspaces/{ws}/activity")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    feed[0]["id"].as_str().expect("an activity row").to_string()
}

/// A new client, on a connection of its own, is answered within 3 s although every
/// connection place is held (a connection is shed once idle for a second).
async fn a_new_client_is_answered_at_once(svc: &Svc) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let started = Instant::now();
    let resp = client.get(svc.at("/healthz")).send().await;
    let resp = resp.expect("answered while every place was held");
    assert_eq!(resp.status(), StatusCode::OK);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
}

/// What the service sends on `sock` until it closes it, within `secs`.
async fn answer_on(sock: &mut TcpStream, secs: u64, what: &str) -> String {
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(secs), sock.read_to_string(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("{what}"))
        .unwrap();
    answer
}

/// Whether the service closed `sock` (within a second) without sending anything more.
async fn closed_by_the_service(sock: &mut TcpStream) -> bool {
    let mut rest = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(1), sock.read(&mut rest)).await;
    matches!(read, Ok(Ok(0)) | Ok(Err(_)))
}

const GET_HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

/// What one read on `sock` gets within 5 s (a short answer on a kept-alive connection).
async fn read_answer(sock: &mut TcpStream) -> String {
    let mut raw = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut raw))
        .await
        .expect("answered")
        .unwrap();
    String::from_utf8_lossy(&raw[..n]).to_string()
}

/// `n` connections that each sent `head`, opened 50 ms apart: the first has waited longest.
async fn connections_that_sent(svc: &Svc, n: usize, head: &[u8]) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
        sock.write_all(head).await.unwrap();
        held.push(sock);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    held
}

/// A connection that sent `GET /healthz` with a 200 KB body at once (the body drained by the
/// service), and the answer.
async fn a_grown_connection(svc: &Svc) -> (TcpStream, String) {
    let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
    let body = vec![b'x'; 200_000];
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(&[head.as_bytes(), &body].concat())
        .await
        .unwrap();
    let answer = read_answer(&mut sock).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    (sock, answer)
}

/// hyper grows a connection's read buffer whenever a read fills it (up to 256 KiB) and keeps
/// it while the connection lives: one client sent each of 15,000 keep-alive connections a
/// 200 KB body and held them with a cheap request every few seconds, 3.1 GiB of one replica
/// (a red team). Such connections are kept alive up to MAX_LARGE_BUFFER_CONNECTIONS; past
/// it each is closed after its answer, and a long poll on one answers at once.
#[tokio::test]
async fn connections_whose_read_buffer_grew_are_kept_alive_only_up_to_a_bound() {
    let svc = Svc::start(&[("MAX_LARGE_BUFFER_CONNECTIONS", "4")]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let cursor = upload_file(&svc, ws, &token, "a.txt", b"a").await;
    assert_eq!(cursor.status(), StatusCode::OK);
    let before = svc.memory_kib("VmRSS:");
    let mut kept = Vec::new();
    let mut closed = 0;
    for _ in 0..300 {
        let (mut sock, answer) = a_grown_connection(&svc).await;
        if answer.contains("\r\nConnection: close\r\n") {
            assert!(closed_by_the_service(&mut sock).await);
            closed += 1;
        } else {
            kept.push(sock);
        }
    }
    assert_eq!((kept.len(), closed), (4, 296));
    let metrics = scrape_metrics(&svc.base).await;
    assert_eq!(
        metric_value(&metrics, "pending_uploads_large_buffer_closes_total"),
        Some(296.0)
    );
    let grew = svc.memory_kib("VmRSS:").saturating_sub(before);
    // 300 × ~210 KiB before (63 MB).
    assert!(grew < 16 * 1024, "RSS grew {grew} KiB");
    for sock in &mut kept {
        sock.write_all(GET_HEALTHZ).await.unwrap();
        let answer = read_answer(sock).await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && !answer.contains("Connection: close"),
            "{answer}"
        );
    }

    // A head that arrives in pieces grows the buffer too, without one large read (the
    // diff's review): a 60 KiB header, 2 KiB at a time.
    let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(60 * 1024)
    );
    for piece in head.as_bytes().chunks(2048) {
        sock.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let answer = read_answer(&mut sock).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\r\nConnection: close\r\n"), "{answer}");

    // A long poll whose own request grew its connection's buffer past the bound does not
    // wait (a body on a GET is drained, as any unread body is).
    let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
    let rows = reqwest::Client::new()
        .get(svc.at(&format!("/workspaces/{ws}/activity")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json::<Vec<Value>>()
        .await
        .unwrap();
    let newest = rows[0]["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    let head = format!(
        "GET /workspaces/{ws}/activity?since_id={newest}&wait=30 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 200000\r\n\r\n"
    );
    sock.write_all(&[head.as_bytes(), &[b'x'; 200_000]].concat())
        .await
        .unwrap();
    let answer = answer_on(&mut sock, 10, "the long poll answered and closed").await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("[]"),
        "{answer}"
    );
    assert!(answer.contains("\r\nConnection: close\r\n"), "{answer}");

    // The kept ones' places come back when they close (once the service has seen them close).
    drop(kept);
    eventually(
        "the closed connections' places came back",
        Duration::from_secs(5),
        || async {
            let (_sock, answer) = a_grown_connection(&svc).await;
            !answer.contains("Connection: close")
        },
    )
    .await;
}

/// A long poll of `ws` on a raw connection of its own, waiting after its newest activity row
/// for `wait` seconds; returned once the service counts it.
async fn raw_long_poll(svc: &Svc, ws: Uuid, token: &str, wait: u32) -> TcpStream {
    let poll = raw_long_poll_sent(svc, ws, token, wait).await;
    wait_for_metric(&svc.base, "pending_uploads_long_polls_waiting", 1.0).await;
    poll
}

/// The same, returned once its request is sent (where no place is left for a scrape).
async fn raw_long_poll_sent(svc: &Svc, ws: Uuid, token: &str, wait: u32) -> TcpStream {
    let newest = newest_activity(svc, ws, token).await;
    let mut poll = TcpStream::connect(&svc.addr).await.unwrap();
    let head = format!(
        "GET /workspaces/{ws}/activity?since_id={newest}&wait={wait} HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    poll.write_all(head.as_bytes()).await.unwrap();
    poll
}

/// A client that waits for `100 Continue` before sending its body (curl does, over 1 MiB)
/// and is refused before the body is asked for gets its answer at once, and no invitation
/// to send a body that would only be drained (up to 128 MiB, 5 s): the drain used to ask
/// for it. An upload that is taken still gets its `100 Continue`, and a JSON body declared
/// over 64 KiB is refused from its Content-Length alone.
#[tokio::test]
async fn a_refused_client_waiting_for_100_continue_is_not_invited_to_send() {
    let svc = Svc::start(&[]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let head = |token: &str, len: usize| {
        upload_head(&svc, ws, token, len).replace("\r\n\r\n", "\r\nExpect: 100-continue\r\n\r\n")
    };
    let mut refused = TcpStream::connect(&svc.addr).await.unwrap();
    refused
        .write_all(head("not-a-token", 50_000_000).as_bytes())
        .await
        .unwrap();
    let answer = answer_on(
        &mut refused,
        5,
        "the refusal came and the connection closed",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 401 Unauthorized\r\n"),
        "{answer}"
    );
    assert!(answer.contains("Connection: close\r\n"), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");

    let body = one_file("XB", "continued.txt", b"sent after 100 Continue");
    let mut taken = TcpStream::connect(&svc.addr).await.unwrap();
    taken
        .write_all(head(&token, body.len()).as_bytes())
        .await
        .unwrap();
    let interim = read_answer(&mut taken).await;
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "{interim}"
    );
    taken.write_all(&body).await.unwrap();
    let mut answer = interim;
    for _ in 0..10 {
        if answer.contains("continued.txt") {
            break;
        }
        answer.push_str(&read_answer(&mut taken).await);
    }
    assert!(answer.contains("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("continued.txt"), "{answer}");

    // A JSON body declared over 64 KiB is refused from its Content-Length, not read first.
    let mut json = TcpStream::connect(&svc.addr).await.unwrap();
    json.write_all(
        format!(
            "POST /registry/register HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: 100000000\r\nExpect: 100-continue\r\n\r\n",
            svc.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let answer = answer_on(
        &mut json,
        5,
        "the JSON refusal came and the connection closed",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
}

/// A request head is at most 64 KiB (SECURITY.md), start line included, and at most 100
/// headers: 431 beyond. The byte bound did not hold: a head that arrived in one read was
/// parsed whatever its size up to hyper's ~400 KiB buffer default.
#[tokio::test]
async fn request_heads_are_bounded() {
    let svc = Svc::start(&[]).await;
    let status_of = |head: String| {
        let addr = svc.addr.clone();
        async move {
            let mut sock = TcpStream::connect(&addr).await.unwrap();
            sock.write_all(head.as_bytes()).await.unwrap();
            let answer = read_answer(&mut sock).await;
            answer.lines().next().unwrap_or_default().to_string()
        }
    };
    let padded = |bytes: usize| {
        let start = "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ";
        let pad = "p".repeat(bytes - start.len() - 4);
        format!("{start}{pad}\r\n\r\n")
    };
    assert_eq!(status_of(padded(60 * 1024)).await, "HTTP/1.1 200 OK");
    for bytes in [64 * 1024 + 1, 100 * 1024] {
        assert_eq!(
            status_of(padded(bytes)).await,
            "HTTP/1.1 431 Request Header Fields Too Large",
            "a {bytes}-byte head"
        );
    }
    let headers = |n: usize| {
        let extra: String = (0..n - 1).map(|i| format!("X-H{i}: v\r\n")).collect();
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{extra}\r\n")
    };
    assert_eq!(status_of(headers(100)).await, "HTTP/1.1 200 OK");
    assert_eq!(
        status_of(headers(101)).await,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
}

/// A body in a transfer coding besides `chunked` (`Transfer-Encoding: gzip, chunked`): hyper
/// takes off the chunks and hands on the rest, so the service parsed and stored it as if it
/// were plain (200; a compressed upload's bytes would have been taken for multipart). RFC 9112
/// §6.1 answers 501, as Go's server, the platform's, does; nothing is stored, and the
/// connection serves its next request. A listed origin gets its CORS headers on the 501, as
/// on every other answer (none before: a browser read it as a network error).
#[tokio::test]
async fn a_body_in_an_unsupported_transfer_coding_is_a_501() {
    let canvas = "https://canvas.example.com";
    let svc = Svc::start(&[("CORS_ALLOWED_ORIGINS", canvas)]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let body = one_file("XB", "a.txt", b"hello");
    let chunked = [
        format!("{:x}\r\n", body.len()).into_bytes(),
        body,
        b"\r\n0\r\n\r\n".to_vec(),
    ]
    .concat();
    for coding in ["gzip, chunked", "chunked, chunked", "identity, chunked"] {
        let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
        let head = format!(
            "POST /workspaces/{ws}/chat/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Origin: {canvas}\r\n\
             Content-Type: multipart/form-data; boundary=XB\r\nTransfer-Encoding: {coding}\r\n\r\n"
        );
        sock.write_all(&[head.as_bytes(), &chunked].concat())
            .await
            .unwrap();
        let answer = read_answer(&mut sock).await;
        assert!(
            answer.starts_with("HTTP/1.1 501 Not Implemented\r\n"),
            "{coding}: {answer}"
        );
        for field in [
            format!("access-control-allow-origin: {canvas}\r\n"),
            "access-control-allow-credentials: true\r\n".to_string(),
            "x-content-type-options: nosniff\r\n".to_string(),
        ] {
            assert!(
                answer.to_ascii_lowercase().contains(&field),
                "{coding}: {field}{answer}"
            );
        }
        assert!(
            answer.ends_with("{\"error\":\"unsupported transfer encoding\"}"),
            "{coding}: {answer}"
        );
        // The chunks were read past: the connection takes its next request.
        sock.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let next = read_answer(&mut sock).await;
        assert!(next.starts_with("HTTP/1.1 200 OK\r\n"), "{coding}: {next}");
    }
    assert_eq!(svc.count("pending_uploads").await, 0);
    // Plain chunked is taken.
    let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
    let head = format!(
        "POST /workspaces/{ws}/chat/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: multipart/form-data; boundary=XB\r\nTransfer-Encoding: Chunked\r\n\r\n"
    );
    sock.write_all(&[head.as_bytes(), &chunked].concat())
        .await
        .unwrap();
    let answer = read_answer(&mut sock).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert_eq!(svc.count("pending_uploads").await, 1);
    // The client's framing, not the service's failure: no ERROR line (one each before).
    let mut svc = svc;
    let out = svc.running.terminate().await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("\"level\":\"ERROR\""), "{log}");
}

/// What hyper refuses before the router sees a request (a malformed request line or header,
/// a head over 64 KiB or with over 100 headers) is answered in JSON like every other error
/// (SPEC §10), with its Content-Length, and the connection closed: the bodies were empty.
#[tokio::test]
async fn requests_hyper_cannot_parse_are_answered_in_json() {
    let svc = Svc::start(&[]).await;
    let answer_to = |request: Vec<u8>| {
        let addr = svc.addr.clone();
        async move {
            let mut sock = TcpStream::connect(&addr).await.unwrap();
            sock.write_all(&request).await.unwrap();
            let mut answer = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut answer))
                .await
                .expect("answered and closed");
            // A head hyper stopped reading half way is closed with bytes unread: a reset may
            // follow the answer.
            if let Err(e) = read {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
            }
            String::from_utf8(answer).unwrap()
        }
    };
    let many_headers: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases = [
        (
            b"GET /he llo HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "400 Bad Request",
            "malformed HTTP request",
        ),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n".to_vec(),
            "400 Bad Request",
            "malformed HTTP request",
        ),
        (
            b"GARBAGE\r\n\r\n".to_vec(),
            "400 Bad Request",
            "malformed HTTP request",
        ),
        (
            format!(
                "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
                "p".repeat(70_000)
            )
            .into_bytes(),
            "431 Request Header Fields Too Large",
            "request header fields too large",
        ),
        (
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n").into_bytes(),
            "431 Request Header Fields Too Large",
            "request header fields too large",
        ),
    ];
    for (request, status, error) in cases {
        let answer = answer_to(request).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}\r\n")),
            "{answer}"
        );
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let fields: Vec<&str> = head.lines().skip(1).collect();
        let length = format!("Content-Length: {}", body.len());
        for field in [
            "Content-Type: application/json",
            "Connection: close",
            &length,
        ] {
            assert!(fields.contains(&field), "{field}: {head}");
        }
        assert_eq!(
            serde_json::from_str::<Value>(body).unwrap(),
            json!({"error": error})
        );
    }
    // The router's own answers are untouched (a 400 with its body, a HEAD's 404 without).
    let bad_json =
        "POST /registry/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                    Content-Length: 1\r\nConnection: close\r\n\r\n{";
    let answer = answer_to(bad_json.as_bytes().to_vec()).await;
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(!answer.contains("malformed HTTP request"), "{answer}");
    let answer =
        answer_to(b"HEAD /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()).await;
    assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n"), "no body: {answer}");
    // A HEAD's rejection has the fields a GET's has and no body, which its client would
    // take for the next answer.
    let get =
        answer_to(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n".to_vec()).await;
    let fields = |a: &str| -> Vec<String> {
        a.lines()
            .take_while(|l| !l.is_empty())
            .filter(|l| !l.starts_with("date:") && !l.starts_with("Date:"))
            .map(str::to_string)
            .collect()
    };
    // Empty lines before a request line are skipped (RFC 9112 §2.2), by hyper and here.
    for lead in ["", "\r\n", "\r\n\r\n"] {
        let head = format!("{lead}HEAD /healthz HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n");
        let answer = answer_to(head.into_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{lead:?}: {answer}"
        );
        assert!(answer.ends_with("\r\n\r\n"), "{lead:?}: no body: {answer}");
        assert_eq!(fields(&answer), fields(&get));
    }
    // A file that ends like one of hyper's rejections is downloaded as it is, whole and in a
    // range, and the connection's next answer is in step: its last 256 KiB slice, read after
    // the others went, is a write of its own.
    let (ws, token) = register_poll(&svc.base).await;
    let lookalike = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    let mut data = vec![0u8; 2 << 20];
    data.extend_from_slice(lookalike);
    let v: Value = upload_file(&svc, ws, &token, "x.http", &data)
        .await
        .json()
        .await
        .unwrap();
    let fid = file_id(&v["files"][0]);
    let client = reqwest::Client::new();
    let content = svc.at(&format!("/workspaces/{ws}/pending-uploads/{fid}/content"));
    let tail = format!("bytes={}-", 2 << 20);
    for (range, want) in [(None, &data[..]), (Some(tail.as_str()), &lookalike[..])] {
        let mut req = client.get(&content).bearer_auth(&token);
        if let Some(range) = range {
            req = req.header("range", range);
        }
        let resp = req.send().await.unwrap();
        assert!(resp.bytes().await.unwrap()[..] == *want, "{range:?}");
        let next = client.get(svc.at("/healthz")).send().await.unwrap();
        assert_eq!(next.status(), StatusCode::OK);
    }
}

/// With every MAX_CONNECTIONS place held by connections that never finish their request
/// heads (each lives HEADER_READ_TIMEOUT; a client opens the next as one is cut), a new client
/// waited in the listen backlog until one was cut: here 30 s. The oldest connection that has
/// not begun a request is now closed to make room, so the new client is answered at once; a
/// connection whose request has begun (a long poll here) is never the one closed.
#[tokio::test]
async fn connections_that_never_send_a_request_cannot_hold_every_place() {
    let svc = Svc::start(&[("MAX_CONNECTIONS", "4"), ("HEADER_READ_TIMEOUT", "30s")]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let cursor = upload_file(&svc, ws, &token, "a.txt", b"a").await;
    assert_eq!(cursor.status(), StatusCode::OK);
    let mut poll = raw_long_poll(&svc, ws, &token, 20).await;
    let mut slow =
        connections_that_sent(&svc, 3, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").await;
    for _ in 0..3 {
        a_new_client_is_answered_at_once(&svc).await;
    }
    // Each new connection (the three GETs', then the scrape's) shed the oldest of the slow
    // ones; the long poll was never a candidate and is still waiting.
    let metrics = reqwest::Client::new()
        .get(svc.at("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metric_value(&metrics, "pending_uploads_connections_shed_total") >= Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "pending_uploads_long_polls_waiting"),
        Some(1.0)
    );
    assert!(
        closed_by_the_service(&mut slow[0]).await,
        "the oldest slow one was closed"
    );
    let upload = upload_file(&svc, ws, &token, "b.txt", b"b").await;
    assert_eq!(upload.status(), StatusCode::OK);
    let answer = answer_on(&mut poll, 10, "the long poll answered").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains("b.txt"), "{answer}");
}

/// The same with connections kept alive between requests: one cheap request per
/// HEADER_READ_TIMEOUT kept a place each, and a new client waited in the backlog (here until
/// the 5 s client timeout; the places were held for 30 s). The connection idle longest is now
/// closed once its answer is out, and the new client is answered at once.
#[tokio::test]
async fn idle_kept_alive_connections_cannot_hold_every_place() {
    let svc = Svc::start(&[("MAX_CONNECTIONS", "3"), ("HEADER_READ_TIMEOUT", "30s")]).await;
    let mut idle = connections_that_sent(&svc, 3, GET_HEALTHZ).await;
    for sock in &mut idle {
        let answer = read_answer(sock).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with('}'), "the whole answer: {answer}");
    }
    a_new_client_is_answered_at_once(&svc).await;
    // The oldest was closed cleanly, after its answer; the newest is still open.
    assert!(closed_by_the_service(&mut idle[0]).await);
    idle[2]
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = answer_on(&mut idle[2], 5, "the newest idle connection still serves").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
}

/// Acked files stay ACK_RETENTION outside every quota, and registration is open: a client
/// that acked each file as it uploaded stored 43 MB in 1.7 s under a 1 MiB quota (a resource
/// probe), without bound. MAX_STORED_BYTES bounds what the fleet keeps, acked or not: past
/// it, uploads get 503 `storage_full`, store nothing, and are taken again once the sweeper
/// has made room.
#[tokio::test]
async fn what_the_fleet_keeps_is_bounded_whatever_the_quotas() {
    let svc = Svc::start(&[
        ("MAX_STORED_BYTES", "7200"),
        ("MAX_PENDING_BYTES_PER_WORKSPACE", "2500"),
        ("ACK_RETENTION", "1h"),
        ("SWEEP_INTERVAL", "1s"),
    ])
    .await;
    let (ws, token) = register_poll(&svc.base).await;
    for _ in 0..2 {
        let (fid, _) = stage_file(&svc, ws, &token, 2000).await;
        let resp = ack_file(&svc, ws, &token, fid).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let resp = upload_file(&svc, ws, &token, "third.bin", &bytes(2000, 3)).await;
    assert_eq!(resp.headers()["retry-after"], "60");
    assert_json(
        resp,
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "upload storage full — retry later", "code": "storage_full"}),
    )
    .await;
    assert_eq!(
        svc.count("pending_uploads").await,
        2,
        "the refused one stored nothing"
    );
    // What operators watch: two files of 2,000 bytes and their four rows.
    let metrics = scrape_metrics(&svc.base).await;
    assert_eq!(
        metric_value(&metrics, "pending_uploads_stored_bytes_max"),
        Some(7200.0)
    );
    assert_eq!(
        metric_value(&metrics, "pending_uploads_stored_bytes"),
        Some(7072.0)
    );
    // The acked rows go after ACK_RETENTION (here made past by hand: a short one could pass
    // before the counts above on a slow machine); the next sweep pass makes room.
    sqlx::query("UPDATE pending_uploads SET acked_at = now() - interval '2 hours'")
        .execute(&svc.pool)
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        let resp = upload_file(&svc, ws, &token, "later.bin", &bytes(2000, 4)).await;
        if resp.status() == StatusCode::OK {
            break;
        }
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "room came back"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut svc = svc;
    let out = svc.running.terminate().await;
    let log = String::from_utf8_lossy(&out.stderr);
    // One line when refusals start and one when they end, not an error per refusal.
    assert_eq!(
        log.matches("\"event\":\"storage_full\"").count(),
        1,
        "{log}"
    );
    assert!(log.contains("\"event\":\"storage_room\""), "{log}");
    assert!(!log.contains("request failed"), "{log}");
}

/// The bound was checked only before a body is read, so uploads admitted together all
/// committed: twenty at once took a 1 MiB bound to 7 MB (a probe). Each now reserves its
/// bytes once received, and those that would pass the bound get 503.
#[tokio::test]
async fn uploads_admitted_together_cannot_pass_the_bound_together() {
    let svc = Svc::start(&[("MAX_STORED_BYTES", "600000")]).await;
    let mut uploads = Vec::new();
    for _ in 0..3 {
        let (ws, token) = register_poll(&svc.base).await;
        for i in 0..4 {
            let (svc, token) = (&svc, token.clone());
            uploads.push(async move {
                upload_file(svc, ws, &token, &format!("f{i}.bin"), &bytes(100_000, 7)).await
            });
        }
    }
    let answers = futures::future::join_all(uploads).await;
    let taken = answers
        .iter()
        .filter(|r| r.status() == StatusCode::OK)
        .count();
    assert!(
        answers
            .iter()
            .all(|r| r.status() == StatusCode::OK || r.status() == StatusCode::SERVICE_UNAVAILABLE),
        "each taken or refused as storage_full"
    );
    // 100,000 bytes and two rows of 512 each: five fit in 600,000.
    assert_eq!(taken, 5, "{taken} of 12 taken");
    let stored: i64 =
        sqlx::query_scalar("SELECT COALESCE(sum(size_bytes), 0)::bigint FROM pending_uploads")
            .fetch_one(&svc.pool)
            .await
            .unwrap();
    assert_eq!(stored, 500_000);
}

/// A commit that failed while the bytes stored were being read was given back twice: the
/// count wrapped, and every upload was refused as `storage_full` until the next reading (CI,
/// the S3 chaos scenario in `dual`). Here a trigger holds a commit until a reading has begun,
/// then fails it.
#[tokio::test]
async fn a_commit_failing_while_the_bytes_stored_are_read_is_given_back_once() {
    // No sweep pass to read again soon after (and mend the count): GAUGE_REFRESH is 15 s.
    let svc = Svc::start(&[("DEPENDENCY_TIMEOUT", "60s")]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let mut gate = svc.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(4242)")
        .execute(&mut *gate)
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE FUNCTION held() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.filename = 'held.bin' THEN
           PERFORM pg_advisory_xact_lock(4242); RAISE EXCEPTION 'held, then refused';
         END IF; RETURN NEW; END $$;
         CREATE TRIGGER held BEFORE INSERT ON pending_uploads FOR EACH ROW EXECUTE FUNCTION held();",
    )
    .execute(&svc.pool)
    .await
    .unwrap();
    let held = {
        let (base, token) = (svc.base.clone(), token.clone());
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{base}/workspaces/{ws}/chat/uploads"))
                .bearer_auth(token)
                .multipart(reqwest::multipart::Form::new().part(
                    "files",
                    reqwest::multipart::Part::bytes(vec![7; 1000]).file_name("held.bin"),
                ))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    waiting_in_pg(
        &svc.pool,
        "wait_event = 'advisory'",
        "the commit, in its trigger",
    )
    .await;
    // A table lock queued behind the commit holds the next reading until the commit failed.
    let blocker = {
        let pool = svc.pool.clone();
        tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("LOCK TABLE pending_upload_stored_deltas IN ACCESS EXCLUSIVE MODE")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx
        })
    };
    waiting_in_pg(
        &svc.pool,
        "query = 'SELECT * FROM pending_uploads_stored()'",
        "a reading of the bytes stored",
    )
    .await;
    sqlx::query("SELECT pg_advisory_unlock(4242)")
        .execute(&mut *gate)
        .await
        .unwrap();
    assert_eq!(held.await.unwrap(), StatusCode::INTERNAL_SERVER_ERROR);
    blocker.await.unwrap().commit().await.unwrap();
    let reading = "query = 'SELECT * FROM pending_uploads_stored()' AND state = 'active'";
    eventually("the reading ends", Duration::from_secs(10), || async {
        backends(&svc.pool, reading).await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let metrics = scrape_metrics(&svc.base).await;
    let stored = metric_value(&metrics, "pending_uploads_stored_bytes").unwrap();
    assert!(stored < 1e6, "stored_bytes {stored}");
    let resp = upload_file(&svc, ws, &token, "after.bin", b"after").await;
    assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.text().await);
}

/// What MAX_STORED_BYTES counts came from aggregates over both tables, read with the backlog
/// gauges': their time grows with the tables (86 ms at 520,000 upload rows), and from some tens
/// of millions of rows every reading outlasted DEPENDENCY_TIMEOUT. Cut there, every reading
/// failed, and the figure kept adding what the replica committed without ever learning what
/// the sweeper deleted: `storage_full` early, until the tables shrank. Now the figure is the
/// sum of what triggers keep, read apart from the gauges, and the gauges' read has a deadline
/// of its own. Here a table lock holds the gauges' read for four times DEPENDENCY_TIMEOUT:
/// meanwhile the figure still follows what is stored, and the gauges' read still lands.
#[tokio::test]
async fn the_stored_figure_and_the_gauges_outlast_a_read_longer_than_the_dependency_timeout() {
    // A sweep pass every second asks for a reading after it.
    let svc = Svc::start(&[("DEPENDENCY_TIMEOUT", "1s"), ("SWEEP_INTERVAL", "1s")]).await;
    let stored = || async {
        let metrics = scrape_metrics(&svc.base).await;
        metric_value(&metrics, "pending_uploads_stored_bytes")
    };
    assert_eq!(stored().await, Some(0.0));
    // A file another writer stages while the table is locked: only a reading learns of it.
    let mut tx = svc.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE pending_uploads IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO pending_uploads (workspace_id, size_bytes, filename, content)
         VALUES (gen_random_uuid(), 5000, 'other.bin', decode(repeat('07', 5000), 'hex'))",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    waiting_in_pg(
        &svc.pool,
        "query LIKE '%FROM pending_uploads_backlog($1, $2)'",
        "the backlog gauges' read",
    )
    .await;
    // Meanwhile an upload's activity row (1,024) is counted.
    sqlx::query(
        "INSERT INTO activity_logs (workspace_id, activity_type, method)
         VALUES (gen_random_uuid(), 'a2a_receive', 'chat_upload_receive')",
    )
    .execute(&svc.pool)
    .await
    .unwrap();
    eventually("the figure follows", Duration::from_secs(5), || async {
        stored().await == Some(1024.0)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    tx.commit().await.unwrap();
    // The file and its row (512) besides.
    eventually("the figure follows", Duration::from_secs(5), || async {
        stored().await == Some(6536.0)
    })
    .await;
    eventually("the gauges' read lands", Duration::from_secs(5), || async {
        let metrics = scrape_metrics(&svc.base).await;
        metric_value(
            &metrics,
            "pending_uploads_pending_rows{state=\"unfetched\"}",
        ) == Some(1.0)
    })
    .await;
    let mut svc = svc;
    let out = svc.running.terminate().await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("could not read"), "{log}");
}

/// The backlog gauges are fleet-wide figures, and every replica used to read them itself: an
/// aggregate over the whole upload table (86 ms at 520,000 rows) every 15 s on each replica.
/// Now the fleet reads it once: a replica shows the fleet's last reading while it is fresh
/// (younger than 14 s, and than 21 times what it took), or while another replica is reading
/// the table again; it reads the table itself only when the reading is stale and no one else
/// is. Before, every replica here showed the table's own figures.
#[tokio::test]
async fn the_fleet_reads_the_backlog_once_and_every_replica_shows_it() {
    let first = Svc::start(&[]).await;
    let pool = &first.pool;
    let unfetched = |svc: &Svc| {
        let base = svc.base.clone();
        async move {
            let metrics = scrape_metrics(&base).await;
            metric_value(
                &metrics,
                "pending_uploads_pending_rows{state=\"unfetched\"}",
            )
        }
    };
    let reading = || async {
        sqlx::query_as::<_, (i64, f64)>(
            "SELECT unfetched_rows, EXTRACT(EPOCH FROM now() - read_at)::float8
             FROM pending_uploads_backlog",
        )
        .fetch_optional(pool)
        .await
        .unwrap()
    };
    eventually(
        "the first replica reads the backlog",
        Duration::from_secs(10),
        || async { reading().await.is_some() },
    )
    .await;
    sqlx::query(
        "INSERT INTO pending_uploads (workspace_id, size_bytes, filename, content)
         SELECT gen_random_uuid(), 1, 'f', '\\x01' FROM generate_series(1, 3)",
    )
    .execute(pool)
    .await
    .unwrap();
    // A reading 30 s old that took 2 s: older than 14 s, but not than 21 × 2 s.
    let set = |sql: &'static str| async move {
        sqlx::query(sql).execute(pool).await.unwrap();
    };
    set("UPDATE pending_uploads_backlog
         SET unfetched_rows = 777, read_at = now() - interval '30 s', took = interval '2 s'")
    .await;
    // A replica started on the same database, once its gauge shows `rows`.
    let showing = |rows: f64, what: &'static str| {
        let db = first.db.clone();
        async move {
            let svc = Svc::start_on(db, &[], None).await;
            eventually(what, Duration::from_secs(10), || async {
                unfetched(&svc).await == Some(rows)
            })
            .await;
            svc
        }
    };
    let second = showing(777.0, "the second replica shows the fleet's reading").await;
    // A stale reading while another call reads the table (it holds the try-lock, taken
    // first: a replica's refresh between the two would read the table itself).
    let mut reader = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(1885689203, 2)")
        .execute(&mut *reader)
        .await
        .unwrap();
    set("UPDATE pending_uploads_backlog
         SET unfetched_rows = 555, read_at = now() - interval '1 hour'")
    .await;
    let third = showing(555.0, "the third replica shows the last reading").await;
    assert_eq!(reading().await.map(|r| r.0), Some(555));
    sqlx::query("SELECT pg_advisory_unlock(1885689203, 2)")
        .execute(&mut *reader)
        .await
        .unwrap();
    drop(reader);
    // No one reading: the next replica reads the table for the fleet.
    let fourth = showing(3.0, "the fourth replica reads the table").await;
    let (rows, age) = reading().await.unwrap();
    assert_eq!(rows, 3);
    assert!(age < 10.0, "{age}");
    for mut svc in [first, second, third, fourth] {
        let out = svc.running.terminate().await;
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!log.contains("could not read"), "{log}");
    }
}

/// What MAX_STORED_BYTES counts, as the triggers keep it, is what the tables hold, whoever
/// wrote them and however: the service's uploads, acks and sweeps, another writer's inserts
/// (acked or not), a resize, deletes, activity rows inserted, re-typed and swept, and a
/// TRUNCATE; with readings (each folds the deltas) in between.
#[tokio::test]
async fn the_stored_figure_is_what_the_tables_hold() {
    let svc = Svc::start(&[
        ("ACK_RETENTION", "0"),
        ("SWEEP_INTERVAL", "1s"),
        ("MAX_PENDING_BYTES_PER_WORKSPACE", "4194304"),
    ])
    .await;
    let pool = &svc.pool;
    // One statement, one snapshot: the sweeper and the service's readings (which fold the
    // deltas) run meanwhile.
    let check = |what: &'static str| async move {
        let (kept, held): (Vec<i64>, Vec<i64>) = sqlx::query_as(
            "SELECT ARRAY[COALESCE(sum(d.bytes), 0), COALESCE(sum(d.files), 0),
                          COALESCE(sum(d.activity_rows), 0)]::bigint[],
                    ARRAY[(SELECT COALESCE(sum(size_bytes), 0) FROM pending_uploads),
                          (SELECT count(*) FROM pending_uploads),
                          (SELECT count(*) FROM activity_logs
                           WHERE method = 'chat_upload_receive')]::bigint[]
             FROM pending_upload_stored_deltas d",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(kept, held, "after {what}");
    };
    let (ws, token) = register_poll(&svc.base).await;
    let mut staged = Vec::new();
    for size in [1, 700, 5000] {
        staged.push(stage_file(&svc, ws, &token, size).await.0);
    }
    check("three uploads").await;
    // One from disk (past SPOOL_MEMORY_PER_REQUEST: a COPY, then the admission), then a file
    // from memory and one from disk that the quota refuses.
    let big = bytes(3 << 20, 5);
    let resp = upload_file(&svc, ws, &token, "big.bin", &big).await;
    assert_eq!(resp.status(), StatusCode::OK);
    check("an upload from disk").await;
    for size in [1 << 20, 3 << 20] {
        let resp = upload_file(&svc, ws, &token, "over.bin", &bytes(size, 6)).await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    }
    check("refused uploads").await;
    // Two files in one request (staged together), then two that the quota refuses together.
    for (size, status) in [
        (300, StatusCode::OK),
        (600 << 10, StatusCode::TOO_MANY_REQUESTS),
    ] {
        let part = |n: u8| reqwest::multipart::Part::bytes(vec![n; size]).file_name("two.bin");
        let resp = reqwest::Client::new()
            .post(svc.at(&format!("/workspaces/{ws}/chat/uploads")))
            .bearer_auth(&token)
            .multipart(
                reqwest::multipart::Form::new()
                    .part("files", part(1))
                    .part("files", part(2)),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status);
    }
    check("two files at once, taken and refused").await;
    let other = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO pending_uploads (workspace_id, size_bytes, filename, content, acked_at)
         SELECT $1, n, 'raw.bin', decode(repeat('07', n), 'hex'),
                CASE WHEN n % 2 = 0 THEN now() END
         FROM generate_series(1, 1200) n",
    )
    .bind(other)
    .execute(pool)
    .await
    .unwrap();
    check("another writer's inserts").await;
    // Past 1,000 deltas a reading (the service's, or this one) folds them into one row.
    let mut conn = pool.acquire().await.unwrap();
    pending_uploads::db::uploads::stored(&mut conn)
        .await
        .unwrap();
    let deltas: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_upload_stored_deltas")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(deltas < 10, "{deltas} deltas after a reading");
    drop(conn);
    check("a fold").await;
    sqlx::query(
        "UPDATE pending_uploads SET size_bytes = size_bytes + 3
         WHERE workspace_id = $1 AND size_bytes < 10",
    )
    .bind(other)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("DELETE FROM pending_uploads WHERE workspace_id = $1 AND size_bytes > 30")
        .bind(other)
        .execute(pool)
        .await
        .unwrap();
    check("a resize and a delete").await;
    sqlx::query(
        "INSERT INTO activity_logs (workspace_id, activity_type, method)
         SELECT $1, 'a2a_receive', CASE WHEN n % 3 = 0 THEN 'other' ELSE 'chat_upload_receive' END
         FROM generate_series(1, 30) n",
    )
    .bind(other)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE activity_logs SET method = CASE WHEN method = 'other' THEN 'chat_upload_receive'
                                               ELSE NULL END
         WHERE workspace_id = $1 AND seq % 4 = 0",
    )
    .bind(other)
    .execute(pool)
    .await
    .unwrap();
    check("activity rows inserted and re-typed").await;
    // The service's acks, then its sweeper (ACK_RETENTION 0) deletes the acked rows.
    for fid in &staged[..2] {
        assert_eq!(
            ack_file(&svc, ws, &token, *fid).await.status(),
            StatusCode::OK
        );
    }
    eventually(
        "the sweeper deletes the acked rows",
        Duration::from_secs(10),
        || async {
            let acked: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pending_uploads WHERE acked_at IS NOT NULL",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            acked == 0
        },
    )
    .await;
    check("acks and a sweep").await;
    sqlx::query("DELETE FROM activity_logs WHERE workspace_id = $1 AND seq % 2 = 0")
        .bind(other)
        .execute(pool)
        .await
        .unwrap();
    check("activity rows deleted").await;
    sqlx::query("TRUNCATE pending_uploads")
        .execute(pool)
        .await
        .unwrap();
    check("a TRUNCATE of the uploads").await;
    sqlx::query("TRUNCATE activity_logs")
        .execute(pool)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let read = pending_uploads::db::uploads::stored(&mut conn)
        .await
        .unwrap();
    assert_eq!(read, Default::default());
}

/// Waits until a backend of the service's database waits on a lock, `which` (a condition
/// on pg_stat_activity) tells which: `what`, for the failure.
async fn waiting_in_pg(pool: &sqlx::PgPool, which: &str, what: &str) {
    let waiting = format!("wait_event_type = 'Lock' AND {which}");
    eventually(
        &format!("{what} never waited"),
        Duration::from_secs(30),
        || async { backends(pool, &waiting).await > 0 },
    )
    .await;
}

/// Backends of this database (not another test's) for which `condition` holds.
async fn backends(pool: &sqlx::PgPool, condition: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND {condition}"
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A Teredo client (`2001::/32`) is the IPv4 client its address carries: it was not counted
/// at all (push URLs may not name such addresses, so they were taken for the operator's own),
/// and could take every upload slot and all of MAX_STORED_BYTES under as many addresses as it
/// had ports. A 6to4 site (`2002::/16`) is too: one IPv4 address was 256 clients.
#[tokio::test]
async fn a_teredo_client_is_counted_as_its_ipv4_address() {
    let svc = Svc::start(&[
        ("MAX_STORED_BYTES", "1000000"),
        ("STORED_SHARE_PER_CLIENT", "10"),
        ("TRUSTED_PROXIES", "127.0.0.0/8"),
    ])
    .await;
    let (ws, token) = register_poll(&svc.base).await;
    let from = |client: &'static str, name: String| {
        let req = reqwest::Client::new()
            .post(svc.at(&format!("/workspaces/{ws}/chat/uploads")))
            .bearer_auth(&token)
            .header("Content-Type", "multipart/form-data; boundary=XB")
            .header("x-forwarded-for", client)
            .body(one_file("XB", &name, &bytes(40_000, 5)));
        async move { req.send().await.unwrap().status() }
    };
    let (taken, refused) = (StatusCode::OK, StatusCode::TOO_MANY_REQUESTS);
    let uploads = [
        // 8.8.4.77 (f7f7:fbb2 inverted) behind Teredo server 65.54.227.120, from three
        // ports: one client, whose share (100,000 bytes) takes two of these uploads.
        ("2001:0:4136:e378:8000:63bf:f7f7:fbb2", taken),
        ("2001:0:4136:e378:8000:1234:f7f7:fbb2", taken),
        ("2001:0:4136:e378:8000:4321:f7f7:fbb2", refused),
        ("8.8.4.77", refused),
        // A 6to4 site of that address, whatever its subnet (it was counted by /56).
        ("2002:808:44d:ff00::1", refused),
        // Another Teredo client is another client.
        ("2001:0:4136:e378:8000:63bf:f7f7:fbb1", taken),
    ];
    for (n, (client, status)) in uploads.into_iter().enumerate() {
        assert_eq!(from(client, format!("f{n}.bin")).await, status, "{client}");
    }
    assert_eq!(svc.count("pending_uploads").await, 3);
}

/// One client could fill MAX_STORED_BYTES for everyone: acking as it uploaded, 103 MB/s
/// filled 100 GiB in 17 minutes, and every upload was refused until the sweeper made room.
/// A client address may now stage STORED_SHARE_PER_CLIENT percent of it a day; past that its
/// uploads get 429 `storage_share` and store nothing, and the others' are taken.
#[tokio::test]
async fn one_client_cannot_take_the_storage_of_everyone() {
    // Public addresses (documentation ranges are not counted, as internal ones).
    let svc = Svc::start(&[
        ("MAX_STORED_BYTES", "1000000"),
        ("STORED_SHARE_PER_CLIENT", "10"),
        ("TRUSTED_PROXIES", "127.0.0.0/8"),
    ])
    .await;
    let (ws, token) = register_poll(&svc.base).await;
    let from = |client: Option<&'static str>, name: &'static str| {
        let mut req = reqwest::Client::new()
            .post(svc.at(&format!("/workspaces/{ws}/chat/uploads")))
            .bearer_auth(&token)
            .header("Content-Type", "multipart/form-data; boundary=XB")
            .body(one_file("XB", name, &bytes(40_000, 5)));
        if let Some(client) = client {
            req = req.header("x-forwarded-for", client);
        }
        async move { req.send().await.unwrap() }
    };
    // 40,000 bytes, its row (512) and its activity row (1,024, and 6,144 more for the six
    // more days it lives than the share takes to refill): two fit in a 100,000-byte share.
    for name in ["a1.bin", "a2.bin"] {
        let resp = from(Some("8.8.4.77"), name).await;
        assert_eq!(resp.status(), StatusCode::OK, "{name}");
    }
    let resp = from(Some("8.8.4.77"), "a3.bin").await;
    assert_eq!(
        resp.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        resp.headers()
    );
    // Refused before its body, for its length and a file's rows: with 4,640 bytes left
    // of 100,000 a day, what it lacks at 1.157 bytes a second, rounded up.
    let wait = |cost: usize| ((cost - 4_640) as f64 * 0.864).ceil() as u64;
    let body = one_file("XB", "a3.bin", &bytes(40_000, 5)).len();
    let retry_after = |h: &reqwest::header::HeaderMap| -> u64 {
        h["retry-after"].to_str().unwrap().parse().unwrap()
    };
    let given = retry_after(resp.headers());
    assert!(
        (wait(body + 7680) - 5..=wait(body + 7680)).contains(&given),
        "{given}"
    );
    assert_json(
        resp,
        StatusCode::TOO_MANY_REQUESTS,
        json!({"error": "this client's share of upload storage is used up — retry later", "code": "storage_share"}),
    )
    .await;
    assert_eq!(
        svc.count("pending_uploads").await,
        2,
        "the refused one stored nothing"
    );
    // Another client, and the operator's own (a trusted proxy forwarding no client).
    assert_eq!(
        from(Some("8.8.4.78"), "b.bin").await.status(),
        StatusCode::OK
    );
    for name in ["own1.bin", "own2.bin", "own3.bin"] {
        assert_eq!(from(None, name).await.status(), StatusCode::OK, "{name}");
    }
    assert_eq!(svc.count("pending_uploads").await, 6);
    // A body the share cannot pay for is refused before it is sent (a client waiting for
    // `100 Continue` is answered at once), with the wait it needs; the least cost's wait,
    // 886 s, was given before.
    let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
    let head = format!(
        "POST /workspaces/{ws}/chat/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         X-Forwarded-For: 8.8.4.77\r\nContent-Type: multipart/form-data; boundary=XB\r\n\
         Content-Length: 50000\r\nExpect: 100-continue\r\n\r\n"
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let answer = read_answer(&mut sock).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    let given: u64 = answer
        .to_ascii_lowercase()
        .split("retry-after: ")
        .nth(1)
        .and_then(|v| v.split("\r\n").next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (wait(57_680) - 5..=wait(57_680)).contains(&given),
        "{answer}"
    );
    // What operators watch: two refusals, two clients' shares kept.
    let metrics = scrape_metrics(&svc.base).await;
    let series = |name: &str| metric_value(&metrics, &format!("pending_uploads_{name}"));
    assert_eq!(series("storage_share_refusals_total"), Some(2.0));
    assert_eq!(series("storage_share_clients"), Some(2.0));
    let mut svc = svc;
    let out = svc.running.terminate().await;
    let log = String::from_utf8_lossy(&out.stderr);
    // The operator is told a share below a request lets a whole one take a request over it,
    // and each refusal names its client.
    assert!(log.contains("is below MAX_REQUEST_BYTES"), "{log}");
    assert!(log.contains("\"client\":\"8.8.4.77\""), "{log}");
}

/// One-byte files cost the database a row and an activity row each (the latter kept 7 days):
/// a client sending them made 244,544 activity rows in two minutes (a resource probe), which
/// a bound on bytes alone did not stop. Each row counts against MAX_STORED_BYTES (512 bytes an
/// upload row, 1,024 an activity row).
#[tokio::test]
async fn tiny_files_count_their_rows_against_what_the_fleet_keeps() {
    let svc = Svc::start(&[("MAX_STORED_BYTES", "5000")]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let mut taken = 0;
    loop {
        let resp = upload_file(&svc, ws, &token, "tiny.txt", b"x").await;
        if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert_eq!(resp.status(), StatusCode::OK);
        taken += 1;
        assert!(
            taken < 50,
            "{taken} one-byte files under a 5,000-byte bound"
        );
    }
    // 1 byte + a row (512) + an activity row (1,024), 1,537 each: a fourth would pass 5,000.
    assert_eq!(taken, 3);
}

/// What the fleet keeps counts rows past their expiry too: their bytes stay until the
/// sweeper deletes them (an interval, or longer while sweeps fail).
#[tokio::test]
async fn the_bytes_stored_count_expired_rows_until_they_are_swept() {
    let pool = sqlx::PgPool::connect(&fresh_db().await).await.unwrap();
    let ws = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename, expires_at)
         VALUES ($1, '\\x0102', 2, 'live', now() + interval '1 hour'),
                ($1, '\\x010203', 3, 'expired', now() - interval '1 hour')",
    )
    .bind(ws)
    .execute(&pool)
    .await
    .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let bytes = pending_uploads::db::uploads::stored(&mut conn)
        .await
        .unwrap()
        .stored_bytes();
    assert_eq!(bytes, 5 + 2 * pending_uploads::db::uploads::ROW_WEIGHT);
}

/// A descriptor limit below what MAX_CONNECTIONS needs made accepts fail long before it,
/// each failure logged every 50 ms, with nothing at start-up to say why (a resource probe).
#[tokio::test]
async fn too_low_an_open_file_limit_is_said_at_start_up() {
    let wrap = vec![
        "prlimit".to_string(),
        "--nofile=512:512".to_string(),
        service_bin(),
    ];
    let mut svc = Svc::start_on(fresh_db().await, &[], Some(wrap)).await;
    let out = svc.running.terminate().await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("the open-file limit is below what MAX_CONNECTIONS needs")
            && log.contains("\"limit\":512"),
        "{log}"
    );
}

/// Sends `signal` (`-TERM`, `-HUP`) to the service.
fn signal(svc: &Svc, signal: &str) {
    let sent = std::process::Command::new("kill")
        .args([signal, &svc.pid().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// An upload whose body stops half-way: it holds its connection through a drain.
async fn stalled_upload(svc: &Svc) -> TcpStream {
    let (ws, token) = register_poll(&svc.base).await;
    let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
    sock.write_all(upload_head(svc, ws, &token, 1 << 20).as_bytes())
        .await
        .unwrap();
    sock.write_all(
        b"--XB\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a\"\r\n\r\nab",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    sock
}

/// A second SIGTERM during the drain ends it at once: it was ignored, and an operator's second
/// Ctrl-C waited out the 30 s deadline. The same signal again within a second is one event
/// delivered twice (a wrapper forwarding the Ctrl-C the terminal sent) and does not.
#[tokio::test]
async fn a_second_signal_ends_the_drain_and_a_repeat_does_not() {
    let mut svc = Svc::start(&[]).await;
    let _held = stalled_upload(&svc).await;
    signal(&svc, "-TERM");
    tokio::time::sleep(Duration::from_millis(50)).await;
    signal(&svc, "-TERM");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let alive = std::path::Path::new(&format!("/proc/{}", svc.pid())).exists()
        && std::fs::read_to_string(format!("/proc/{}/stat", svc.pid()))
            .is_ok_and(|stat| !stat.contains(") Z "));
    assert!(alive, "a repeat within a second ended the drain");
    let started = Instant::now();
    signal(&svc, "-TERM");
    let out = svc.running.terminate_wait().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "still draining {:?} after the second signal",
        started.elapsed()
    );
    assert!(out.status.success());
    let lines = log_lines(&out.stderr);
    assert!(lines
        .iter()
        .any(|l| l["message"] == "a second shutdown signal: closing remaining connections now"));
    // The upload the drain's end dropped is not said to be its client's doing alone.
    assert!(
        lines.iter().any(|l| l["message"] == "upload abandoned"
            && l["error"]
                == "the client went away, or the shutdown's drain ended, before its answer"),
        "{lines:#?}"
    );
}

/// SIGHUP (a closed terminal) drains as SIGTERM does: it killed the process with no drain
/// (exit 129; a red team). Under `nohup`, which ignores SIGHUP, it stays ignored: a handler
/// would replace the ignore, and closing the terminal would stop the service.
#[tokio::test]
async fn a_hangup_drains_unless_it_was_ignored() {
    // The first service must start with SIGHUP at its default, whatever this test runner
    // was started with (a CI job under `nohup` would pass its ignore on).
    // SAFETY: sets a disposition; no handler of this process relies on SIGHUP.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_DFL);
    }
    let mut svc = Svc::start(&[]).await;
    signal(&svc, "-HUP");
    let out = svc.running.terminate_wait().await;
    assert_eq!(out.status.code(), Some(0), "drained and stopped");
    assert!(log_lines(&out.stderr)
        .iter()
        .any(|l| l["message"] == "stopped"));

    let wrap = vec!["nohup".to_string(), service_bin()];
    let mut svc = Svc::start_on(fresh_db().await, &[], Some(wrap)).await;
    signal(&svc, "-HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let health = reqwest::get(svc.at("/healthz")).await.unwrap();
    assert_eq!(
        health.status(),
        StatusCode::OK,
        "still serving after the hangup"
    );
    signal(&svc, "-TERM");
    let out = svc.running.terminate_wait().await;
    assert_eq!(out.status.code(), Some(0));
}

/// The series the alert rules take `increase`/`rate` of are there at 0 from the start: a
/// labelled family showed nothing until its first event (an operator probe), so
/// `PendingUploadsSweepStalled` (`sum(increase(sweep_runs_total[30m])) == 0`) could not
/// fire for a replica whose sweeper never ran, and a first error was no increase.
#[tokio::test]
async fn the_series_alerts_watch_are_exported_before_their_first_event() {
    let svc = Svc::start(&[("SWEEP_INTERVAL", "1h")]).await;
    let text = scrape_metrics(&svc.base).await;
    for series in [
        r#"pending_uploads_sweep_runs_total{outcome="error"}"#,
        r#"pending_uploads_storage_errors_total{backend="bytea",operation="get"}"#,
        r#"pending_uploads_storage_errors_total{backend="s3",operation="put"}"#,
        r#"pending_uploads_storage_errors_total{backend="s3",operation="list"}"#,
        r#"pending_uploads_storage_fallbacks_total{operation="get"}"#,
    ] {
        assert_eq!(metric_value(&text, series), Some(0.0), "{series}:\n{text}");
    }
}

/// MAX_LONG_POLLS at or above MAX_CONNECTIONS lets waiting polls hold every connection
/// (README: keep it below); it was taken without a word (a red team). Said at start-up now.
#[tokio::test]
async fn long_polls_that_can_take_every_connection_are_said_at_start_up() {
    let message = "MAX_LONG_POLLS is not below MAX_CONNECTIONS: waiting long polls can hold every connection, and other requests then wait";
    for (long_polls, said) in [("200", true), ("99", false)] {
        let mut svc =
            Svc::start(&[("MAX_CONNECTIONS", "100"), ("MAX_LONG_POLLS", long_polls)]).await;
        let out = svc.running.terminate().await;
        let warned = log_lines(&out.stderr)
            .iter()
            .any(|l| l["message"] == message);
        assert_eq!(warned, said, "MAX_LONG_POLLS={long_polls}");
    }
}

/// An empty RUST_LOG (a deployment template's blank value) enabled no log line at all, errors
/// included; one that cannot be read fell back to the default without a word (a red team).
/// Blank is unset now, and an unreadable one is said.
#[tokio::test]
async fn a_blank_or_unreadable_rust_log_keeps_the_default_lines() {
    for (value, said) in [("", false), ("  ", false), ("nonsense[[[", true)] {
        let mut svc = Svc::start(&[("RUST_LOG", value)]).await;
        let out = svc.running.terminate().await;
        let lines = log_lines(&out.stderr);
        assert!(
            lines
                .iter()
                .any(|l| l["message"] == "pending-uploads listening"),
            "RUST_LOG={value:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let warned = lines
            .iter()
            .any(|l| l["message"] == "RUST_LOG could not be read: the default filter is used");
        assert_eq!(warned, said, "RUST_LOG={value:?}");
    }
}

/// Connections past MAX_CONNECTIONS wait in the listen backlog, and it was 128 (mio's
/// `bind`): a connect past it had its SYN dropped and tried again a second later (3,000
/// connects took 5 s, a probe). Here the only place is held by a long poll and 400 clients
/// connect at once: each is taken into the backlog at once.
#[tokio::test]
async fn connections_past_every_place_wait_in_a_deep_backlog() {
    let svc = Svc::start(&[("MAX_CONNECTIONS", "1")]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let resp = upload_file(&svc, ws, &token, "first.txt", b"1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let poll = raw_long_poll_sent(&svc, ws, &token, 30).await;
    let addr: SocketAddr = svc.base.trim_start_matches("http://").parse().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connects = (0..400).map(|_| async move {
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr))
            .await
            .ok()
            .and_then(Result::ok)
    });
    let connected = futures::future::join_all(connects).await;
    let waiting = connected.iter().filter(|c| c.is_some()).count();
    assert_eq!(waiting, 400, "connections taken into the backlog at once");
    drop(poll);
}

/// A download whose client reads steadily but slowly has its writes refused for a second
/// and more at a time (the kernel wakes a writer once much of its buffer has drained). A
/// build that made such a connection one to drop for a new client had healthy downloads cut
/// mid-body by a flood of bare connects (a probe: 5.7 of 20 MB at 800 KB/s). Here the
/// download must arrive whole while connects come and go at every place.
#[tokio::test]
async fn a_slow_but_steady_download_is_not_dropped_for_new_connections() {
    let svc = Svc::start(&[("MAX_CONNECTIONS", "8")]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let (file, data) = stage_file(&svc, ws, &token, 8 << 20).await;
    let addr: SocketAddr = svc.base.trim_start_matches("http://").parse().unwrap();
    let flood = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            if let Ok(conn) = TcpStream::connect(addr).await {
                held.push(conn);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut conn = socket.connect(addr).await.unwrap();
    let head = format!(
        "GET /workspaces/{ws}/pending-uploads/{file}/content HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    flood.abort();
    let body_at = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(got.len() - body_at, data.len(), "the whole file");
    assert!(got[body_at..] == data[..]);
}

/// And with requests whose short bodies never come (a JSON body, which has
/// REQUEST_BODY_TIMEOUT: 30 s here): each waited on its client with nothing done yet and held
/// its place that long, so a flood of them kept a new client in the backlog. A full replica
/// now drops the one that has waited longest; nothing was done for it.
#[tokio::test]
async fn requests_waiting_on_short_bodies_cannot_hold_every_place() {
    let svc = Svc::start(&[("MAX_CONNECTIONS", "3"), ("REQUEST_BODY_TIMEOUT", "30s")]).await;
    let head = "POST /registry/register HTTP/1.1\r\nHost: x\r\n\
                Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"id\":";
    let mut slow = connections_that_sent(&svc, 3, head.as_bytes()).await;
    a_new_client_is_answered_at_once(&svc).await;
    assert!(closed_by_the_service(&mut slow[0]).await);
    assert_eq!(svc.count("workspaces").await, 0);
}

/// A connection refused for its client's MAX_CONNECTIONS_PER_CLIENT took a place first, and
/// when none was free closed another client's idle connection for a refusal. It now never
/// sheds anyone (and is closed unanswered when no place is free).
#[tokio::test]
async fn a_refused_connection_sheds_no_one() {
    async fn connect_from(svc: &Svc, local: &str) -> TcpStream {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{local}:0").parse().unwrap()).unwrap();
        sock.connect(svc.addr.parse().unwrap()).await.unwrap()
    }
    async fn served(sock: &mut TcpStream) -> String {
        sock.write_all(GET_HEALTHZ).await.unwrap();
        read_answer(sock).await
    }
    let svc = Svc::start(&[
        ("MAX_CONNECTIONS", "2"),
        ("MAX_CONNECTIONS_PER_CLIENT", "1"),
        ("HEADER_READ_TIMEOUT", "30s"),
    ])
    .await;
    let mut other = connect_from(&svc, "127.0.0.2").await;
    assert!(served(&mut other).await.starts_with("HTTP/1.1 200"));
    let mut mine = connect_from(&svc, "127.0.0.3").await;
    assert!(served(&mut mine).await.starts_with("HTTP/1.1 200"));
    // Both idle past the shed's minimum; a second connection from 127.0.0.3 is over its limit.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut refused = connect_from(&svc, "127.0.0.3").await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), refused.read_to_end(&mut raw)).await;
    assert!(
        !String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"),
        "refused"
    );
    let answer = served(&mut other).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the other client's connection: {answer}"
    );
}

/// A request refused before its body was read has the rest of it drained (5 s at most), and
/// meanwhile a full replica may drop its connection. That also took answers of work done: an
/// upload committed while its chunked body's last chunk had not come lost its 200 with the
/// connection (a retry stored it twice; such a body is now read to its end before the commit).
/// Only refusals may be dropped: a 200 whose request's unread body is still being drained
/// keeps its place and its answer while a newcomer waits for one.
#[tokio::test]
async fn an_answer_of_work_done_keeps_its_connection_on_a_full_replica() {
    let svc = Svc::start(&[("MAX_CONNECTIONS", "2")]).await;
    // One place: a long poll (a request under way, never shed).
    let (polled, poll_token) = register_poll(&svc.base).await;
    let first = upload_file(&svc, polled, &poll_token, "a.txt", b"a").await;
    assert_eq!(first.status(), StatusCode::OK);
    let poll = raw_long_poll(&svc, polled, &poll_token, 30).await;
    // The other: a 200 to a request whose route does not read its body, a chunked one
    // whose last chunk never comes, drained before the answer goes out.
    let mut done = TcpStream::connect(&svc.addr).await.unwrap();
    done.write_all(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A new client while both places are held: it waits for a place, and takes nothing's.
    let newcomer = tokio::spawn(TcpStream::connect(svc.addr.clone()));
    let answer = answer_on(&mut done, 10, "the 200 came after its drain").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains("Connection: close"), "{answer}");
    newcomer.await.unwrap().unwrap();
    drop(poll);
}

/// /readyz needs no credential, and each probe pinged the database on a pooled connection of
/// its own: a flood of probes took the pool (and the database's backends) from everyone else.
/// Probes that arrive while a check runs now share its answer: 300 at once open no more
/// connections than a few.
#[tokio::test]
async fn a_flood_of_readiness_probes_shares_one_check() {
    let svc = Svc::start(&[("DATABASE_MAX_CONNECTIONS", "20")]).await;
    let backends = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid()",
        )
        .fetch_one(&svc.pool)
        .await
        .unwrap()
    };
    let client = reqwest::Client::new();
    assert_eq!(
        client.get(svc.at("/readyz")).send().await.unwrap().status(),
        StatusCode::OK
    );
    let before = backends().await;
    let probes =
        (0..300).map(|_| async { client.get(svc.at("/readyz")).send().await.unwrap().status() });
    let statuses = futures::future::join_all(probes).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let after = backends().await;
    assert!(
        after <= before + 2,
        "{before} database connections before, {after} after"
    );
}

/// A workspace id is its registrant's choice, and an upload's commit holds its workspace's
/// lock. The lock's key was the XOR of the id's halves: a stranger who knew another
/// workspace's id registered twins folding to the same key (any number do), and the other
/// workspace's uploads then queued behind the twins' commits, 503 past the dependency
/// timeout. Here a transaction holds the twin's lock as its commits do, through the admission
/// function with the key the previous binary passes; the other workspace's upload goes
/// through, and the twin's own waits (what shows the lock is held).
#[tokio::test]
async fn a_chosen_workspace_id_cannot_share_another_workspaces_lock() {
    let svc = Svc::start(&[("DEPENDENCY_TIMEOUT", "2s")]).await;
    let (victim, victim_token) = register_poll(&svc.base).await;
    let (hi, lo) = victim.as_u64_pair();
    let twin_hi = hi ^ 0x00ff_00ff_00ff_00ff;
    let twin = Uuid::from_u64_pair(twin_hi, twin_hi ^ hi ^ lo);
    let resp = register(
        &reqwest::Client::new(),
        &svc,
        None,
        &json!({"id": twin, "delivery_mode": "poll"}),
    )
    .await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "first registration of the twin"
    );
    let twin_token = resp.json::<Value>().await.unwrap()["auth_token"]
        .as_str()
        .unwrap()
        .to_string();
    let folded = (twin_hi ^ (twin_hi ^ hi ^ lo)) as i64;
    for id in [victim, twin] {
        let key: i64 = sqlx::query_scalar("SELECT pending_uploads_lock_key($1)")
            .bind(id)
            .fetch_one(&svc.pool)
            .await
            .unwrap();
        assert_eq!(
            key,
            pending_uploads::db::workspace_lock_key(id),
            "one key, both sides"
        );
    }
    let mut twin_commit = svc.pool.begin().await.unwrap();
    sqlx::query("SELECT refused FROM pending_uploads_admit($1, $2, 0, 0, 1, 1)")
        .bind(twin)
        .bind(folded)
        .execute(&mut *twin_commit)
        .await
        .unwrap();
    let started = Instant::now();
    let resp = upload_file(&svc, victim, &victim_token, "mine.txt", b"not yours").await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "after {:?}",
        started.elapsed()
    );
    // The twin's own upload waits for the lock half the dependency timeout, then fails with
    // nothing written. (It used to wait out the whole timeout, be answered 503, and commit
    // when the lock came free: the client, told it failed, would send the file twice.)
    let started = Instant::now();
    let resp = upload_file(&svc, twin, &twin_token, "twin.txt", b"waits").await;
    let waited = started.elapsed();
    assert_platform_unavailable(resp).await;
    assert!(
        waited >= Duration::from_secs(1),
        "the lock is held: {waited:?}"
    );
    twin_commit.rollback().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        svc.count("pending_uploads").await,
        1,
        "nothing of the refused upload"
    );
    let resp = upload_file(&svc, twin, &twin_token, "twin.txt", b"free").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(svc.count("pending_uploads").await, 2);
}

/// Sends `head` then `body`, `piece` bytes every `interval`, until the server answers;
/// returns the answer and how long it took.
async fn trickle(
    addr: &str,
    head: String,
    body: Vec<u8>,
    piece: usize,
    interval: Duration,
) -> (String, Duration) {
    let started = Instant::now();
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(head.as_bytes()).await.unwrap();
    for piece in body.chunks(piece) {
        if sock.write_all(piece).await.is_err() {
            break;
        }
        // Stop as soon as the server answers.
        let mut peek = [0u8; 1];
        match tokio::time::timeout(interval, sock.peek(&mut peek)).await {
            Ok(Ok(n)) if n > 0 => break,
            Ok(_) => break,
            Err(_) => {}
        }
    }
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), sock.read_to_end(&mut raw)).await;
    (String::from_utf8_lossy(&raw).to_string(), started.elapsed())
}

#[tokio::test]
async fn trickling_and_stalled_bodies_are_cut_and_free_their_slots() {
    let svc = Svc::start(&[
        ("BODY_RATE_GRACE", "2s"),
        ("BODY_MIN_RATE", "1024"),
        ("REQUEST_BODY_TIMEOUT", "2s"),
        ("MAX_CONCURRENT_UPLOADS", "64"),
    ])
    .await;
    let (ws, token) = register_poll(&svc.base).await;
    let body = one_file("XB", "slow.bin", &vec![b'x'; 4096]);
    let head = upload_head(&svc, ws, &token, body.len());
    // 1 byte every 100 ms (10 B/s) is far under the 1 KiB/s floor: cut after the grace.
    let (answer, took) = trickle(&svc.addr, head, body, 1, Duration::from_millis(100)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("below the minimum upload rate"), "{answer}");
    assert!(
        took < Duration::from_secs(8),
        "cut after the grace, took {took:?}"
    );
    assert_eq!(svc.count("pending_uploads").await, 0);

    // A JSON body that stalls half way is cut by the request body deadline.
    let partial = r#"{"id":"#;
    let head = format!(
        "POST /registry/register HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{partial}",
        svc.addr
    );
    let started = Instant::now();
    let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
    sock.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), sock.read_to_end(&mut raw))
        .await
        .expect("the server answered and closed")
        .unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 408"), "{raw}");
    let overdue =
        r#"{"error":"request body too slow: the service waited 2 s in all for its bytes"}"#;
    assert!(raw.ends_with(overdue), "{raw}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    // One that keeps coming, a byte every 200 ms, is cut by the same deadline, and says so:
    // it was told its body had stalled.
    let head = format!(
        "POST /registry/register HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n",
        svc.addr
    );
    let (answer, took) = trickle(
        &svc.addr,
        head,
        vec![b' '; 100],
        1,
        Duration::from_millis(200),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.ends_with(overdue), "{answer}");
    assert!(took < Duration::from_secs(6), "{took:?}");
    // A request head that never finishes is cut too (HEADER_READ_TIMEOUT, default 10 s).
    let started = Instant::now();
    let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
    sock.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), sock.read_to_end(&mut raw))
        .await
        .expect("the head was cut off")
        .ok();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

/// A body that keeps BODY_MIN_RATE but takes longer than UPLOAD_BODY_TIMEOUT is cut with 408
/// and leaves nothing, to a poll workspace or on its way to a push one: before the deadline,
/// a 100 MiB body at the minimum rate could hold its upload slot for 3.6 hours.
#[tokio::test]
async fn an_upload_body_must_arrive_whole_within_its_deadline() {
    let svc = Svc::start(&[
        ("UPLOAD_BODY_TIMEOUT", "2s"),
        ("BODY_RATE_GRACE", "1s"),
        ("BODY_MIN_RATE", "1024"),
        ("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32"),
    ])
    .await;
    let (ws, token) = register_poll(&svc.base).await;
    let body = one_file("XB", "steady.bin", &vec![b's'; 64 * 1024]);
    // 2 KiB every 100 ms: ~20 KiB/s, twenty times the minimum rate, whole after ~3.3 s.
    let steady = |ws, token: &str| {
        let head = upload_head(&svc, ws, token, body.len());
        trickle(
            &svc.addr,
            head,
            body.clone(),
            2048,
            Duration::from_millis(100),
        )
    };
    let overdue = "request body too slow: the service waited 2 s in all for its bytes";

    let (answer, took) = steady(ws, &token).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(overdue), "{answer}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "cut at the deadline, took {took:?}"
    );
    assert_eq!(svc.count("pending_uploads").await, 0);
    assert_eq!(svc.count("activity_logs").await, 0);

    // A push workspace that takes every byte and would answer at the end.
    let sink_addr = raw_workspace(|mut sock| async move {
        let mut buf = vec![0u8; 64 * 1024];
        while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    let (pushed, pushed_token) = push_workspace_at(&svc, sink_addr).await;
    let (answer, _) = steady(pushed, &pushed_token).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(overdue), "{answer}");
    wait_for_metric(&svc.base, "pending_uploads_uploads_in_progress", 0.0).await;
    // The same workspace uploads at once afterwards, a body that takes less.
    let resp = upload_file(&svc, ws, &token, "quick.txt", b"in time").await;
    assert_eq!(resp.status(), StatusCode::OK);
}

/// UPLOAD_BODY_TIMEOUT is the client's deadline: a push workspace that takes a fast client's
/// upload slowly (above BODY_MIN_RATE) holds the body up past it, and the upload still goes
/// through. A first version counted wall time, and answered this client 408 "too slow" at the
/// deadline for bytes that had long arrived.
#[tokio::test]
async fn a_slow_push_workspace_does_not_make_its_client_overdue() {
    let svc = Svc::start(&[
        ("UPLOAD_BODY_TIMEOUT", "3s"),
        ("BODY_RATE_GRACE", "1s"),
        ("BODY_MIN_RATE", "1024"),
        ("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32"),
    ])
    .await;
    // Reads the upload at ~4 MiB/s, then answers with how much it read.
    let slow_reader = Router::new().fallback(any(|body: axum::body::Body| async move {
        let mut chunks = body.into_data_stream();
        let mut read = 0usize;
        while let Some(Ok(chunk)) = futures::StreamExt::next(&mut chunks).await {
            read += chunk.len();
            let pause = chunk.len() as f64 / (4 << 20) as f64;
            tokio::time::sleep(Duration::from_secs_f64(pause)).await;
        }
        (StatusCode::OK, format!("{{\"read\":{read}}}"))
    }));
    let (addr, _) = server_on("127.0.0.2", slow_reader).await;
    let (ws, token) = push_workspace_at(&svc, addr).await;
    // 32 MiB: more than the sockets between client, service and workspace buffer.
    let body = one_file("XB", "big.bin", &vec![b'b'; 32 << 20]);
    let len = body.len();
    let started = Instant::now();
    let resp = upload_raw(&svc, ws, &token, body).await;
    let took = started.elapsed();
    let status = resp.status();
    let answer = resp.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "after {took:?}: {answer}");
    assert_eq!(answer, format!("{{\"read\":{len}}}"));
    assert!(took > Duration::from_secs(5), "the reader took {took:?}");
}

/// PUSH_ANSWER_TIMEOUT runs from when the workspace has taken the upload's last byte (its
/// socket acknowledged it), not from when the relay handed it to its own socket: that socket's
/// queue (up to 4 MiB) was then still on its way, and a workspace reading at 1 MiB/s, answering
/// once it had read everything, got its client a 502 for an answer it could not give yet (a
/// review). What sits in the workspace's own receive buffer the relay cannot see: a small one
/// here.
#[tokio::test]
async fn a_push_workspace_still_reading_the_last_bytes_is_not_late_to_answer() {
    let svc = Svc::start(&[
        ("PUSH_ANSWER_TIMEOUT", "1s"),
        ("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32"),
    ])
    .await;
    // A small receive buffer: what is on its way sits in the relay's socket, not in this one.
    let listener = small_window_listener(16 << 10);
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        // Reads at ~1 MiB/s until the upload's closing boundary, then answers.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 16 << 10];
        while !got.ends_with(b"--XB--\r\n") {
            match sock.read(&mut buf).await {
                Ok(n @ 1..) => got.extend_from_slice(&buf[..n]),
                _ => return,
            }
            let tail = got.len().saturating_sub(16);
            got.drain(..tail);
            tokio::time::sleep(Duration::from_millis(16)).await;
        }
        let answer =
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
        let _ = sock.write_all(answer.as_bytes()).await;
    });
    let (ws, token) = push_workspace_at(&svc, addr).await;
    let resp = upload_raw(
        &svc,
        ws,
        &token,
        one_file("XB", "big.bin", &vec![b'b'; 8 << 20]),
    )
    .await;
    let status = resp.status();
    let answer = resp.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer, "{}");
}

/// BODY_MIN_RATE counts what the workspace took, not what the relay handed to its socket: the
/// socket's queue (up to 4 MiB) and hyper's buffer (400 KiB) gave a workspace a head start of
/// minutes at the rate, and one reading in bursts at half of it, after an early answer, held
/// its slot for two minutes against a cut due in half a minute (a review; PUSH_TIMEOUT 300 s,
/// BODY_MIN_RATE 64 KiB/s). Here it is cut within seconds, not at PUSH_TIMEOUT.
#[tokio::test]
async fn a_push_workspace_taking_the_upload_below_the_rate_is_cut_for_it() {
    let settings = [("BODY_MIN_RATE", "65536"), ("PUSH_TIMEOUT", "60s")];
    // 32 KiB/s, in bursts.
    let held = relay_after_an_early_answer(&settings, 65536, Duration::from_secs(2)).await;
    assert!(
        held < Duration::from_secs(20),
        "the relay went on for {held:?} at half BODY_MIN_RATE"
    );
}

/// A push workspace that answers at once and then takes the rest of the upload slowly (above
/// BODY_MIN_RATE, from a fast client) holds the upload's slot only until PUSH_TIMEOUT, at the
/// latest: the relay after the answer was once out of every deadline, and a 32 MiB upload read
/// at 2 MiB/s held its slot for 16 s against a PUSH_TIMEOUT of 2 s (at BODY_MIN_RATE, 3.6 hours
/// for 100 MiB).
#[tokio::test]
async fn a_push_workspace_that_answers_early_and_reads_slowly_lets_go_at_push_timeout() {
    let svc = Svc::start(&[
        ("PUSH_TIMEOUT", "2s"),
        ("BODY_RATE_GRACE", "1s"),
        ("BODY_MIN_RATE", "1024"),
        ("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32"),
    ])
    .await;
    let addr = raw_workspace(|mut sock| async move {
        let mut buf = vec![0u8; 64 * 1024];
        let _ = sock.read(&mut buf[..4096]).await;
        let answer =
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
        let _ = sock.write_all(answer.as_bytes()).await;
        // ~2 MiB/s: at most 64 KiB every 31 ms.
        while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {
            tokio::time::sleep(Duration::from_millis(31)).await;
        }
    })
    .await;
    let (ws, token) = push_workspace_at(&svc, addr).await;
    let mut rx = big_raw_upload(&svc, ws, &token).await;
    let answer = answer_head(&mut rx).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // wait_for_metric gives up after ~6 s.
    wait_for_metric(&svc.base, "pending_uploads_uploads_in_progress", 0.0).await;
}

/// What a push workspace receives, head and body, as its own server reads it: the relay writes
/// its own request (its own connection, not a pooled client's), so each header is pinned here —
/// the target's path under the URL's, a Host with the port and an IPv6 address in brackets, the
/// workspace's secret, no coding asked for, the client's Content-Type and Content-Length.
#[tokio::test]
async fn a_push_workspace_receives_the_upload_as_sent() {
    let svc = Svc::start(&[("PUSH_ALLOWED_NETWORKS", "::1/128")]).await;
    let listener = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (got, seen) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while !req.windows(6).any(|w| w == b"--XB--") {
            match sock.read(&mut buf).await {
                Ok(n @ 1..) => req.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let answer = "HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}";
        sock.write_all(answer.as_bytes()).await.unwrap();
        let _ = got.send(req);
    });
    let resp = admin_create(
        &svc,
        json!({"name": "six", "url": format!("http://{addr}/base/")}),
    )
    .await;
    let created: Value = resp.json().await.unwrap();
    let ws: Uuid = created["id"].as_str().unwrap().parse().unwrap();
    let token = created["auth_token"].as_str().unwrap();
    let secret = created["platform_inbound_secret"].as_str().unwrap();
    let body = one_file("XB", "six.txt", b"over IPv6");
    let resp = upload_raw(&svc, ws, token, body.clone()).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let req = tokio::time::timeout(Duration::from_secs(10), seen)
        .await
        .unwrap()
        .unwrap();
    let split = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(req[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    assert_eq!(
        lines.next(),
        Some("POST /base/internal/chat/uploads/ingest HTTP/1.1")
    );
    let mut headers: Vec<String> = lines.map(|l| l.to_ascii_lowercase()).collect();
    headers.sort();
    let mut want = vec![
        format!("host: [::1]:{}", addr.port()),
        "accept: */*".to_string(),
        "accept-encoding: identity".to_string(),
        format!("authorization: bearer {}", secret.to_ascii_lowercase()),
        "content-type: multipart/form-data; boundary=xb".to_string(),
        format!("content-length: {}", body.len()),
    ];
    want.sort();
    assert_eq!(headers, want);
    assert_eq!(&req[split + 4..], &body[..], "the body byte for byte");
}

/// An `https` push URL is spoken to in TLS (a ClientHello first), and a workspace that cannot
/// complete the handshake is 502 `workspace unreachable`.
#[tokio::test]
async fn an_https_push_workspace_is_spoken_to_in_tls() {
    let svc = Svc::start(&[("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32")]).await;
    let (first, firsts) = tokio::sync::mpsc::unbounded_channel();
    let addr = raw_workspace(move |mut sock| {
        let first = first.clone();
        async move {
            let mut buf = [0u8; 16];
            if let Ok(n @ 1..) = sock.read(&mut buf).await {
                let _ = first.send(buf[..n].to_vec());
            }
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    })
    .await;
    let resp = admin_create(
        &svc,
        json!({"name": "tls", "url": format!("https://{addr}")}),
    )
    .await;
    let created: Value = resp.json().await.unwrap();
    let ws: Uuid = created["id"].as_str().unwrap().parse().unwrap();
    let token = created["auth_token"].as_str().unwrap();
    let resp = upload_raw(&svc, ws, token, one_file("XB", "a.txt", b"a")).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"error":"workspace unreachable"}"#
    );
    let mut firsts = firsts;
    let hello = firsts.recv().await.unwrap();
    // A TLS record of type handshake (22), version 3.x.
    assert_eq!(&hello[..2], &[22, 3], "{hello:?}");
}

/// A raw push workspace that answers 200 as soon as the upload's head is in, then reads the
/// rest `chunk` bytes every `every` (never, for 0). Each connection's end, as the workspace
/// sees it (its read gives 0 or fails), is sent on the receiver: when, and whether it was
/// reset.
async fn answers_at_once_then_reads(
    chunk: usize,
    every: Duration,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(Instant, bool)>,
) {
    let (closed, closes) = tokio::sync::mpsc::unbounded_channel();
    // Its receive buffer fixed (64 KiB): grown by the kernel, it held MBs the relay counted
    // as taken, by how fast this workspace read in its bursts.
    let listener = small_window_listener(64 << 10);
    let addr = listener.local_addr().unwrap();
    let serve = move |mut sock: TcpStream| {
        let closed = closed.clone();
        async move {
            let mut buf = vec![0u8; chunk.max(4096)];
            let _ = sock.read(&mut buf[..4096]).await;
            let answer =
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
            let _ = sock.write_all(answer.as_bytes()).await;
            let reset = |e: std::io::Error| e.kind() == std::io::ErrorKind::ConnectionReset;
            let mut was_reset = false;
            if chunk == 0 {
                // Reads nothing more; sees the connection end as an error on a write.
                let started = Instant::now();
                while started.elapsed() < Duration::from_secs(60) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if let Err(e) = sock.write_all(b"x").await {
                        was_reset = reset(e);
                        break;
                    }
                }
            } else {
                loop {
                    match sock.read(&mut buf[..chunk]).await {
                        Ok(1..) => tokio::time::sleep(every).await,
                        Ok(0) => break,
                        Err(e) => {
                            was_reset = reset(e);
                            break;
                        }
                    }
                }
            }
            let _ = closed.send((Instant::now(), was_reset));
        }
    };
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(serve(sock));
        }
    });
    (addr, closes)
}

/// A listener on 127.0.0.2 whose connections have a receive buffer of `bytes`, fixed.
fn small_window_listener(bytes: u32) -> tokio::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(bytes).unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    socket.listen(64).unwrap()
}

/// A client that goes (its connection reset) while its upload is still being relayed after
/// the workspace's early answer: the relay's read of its body fails, and the workspace's
/// connection is reset, not ended: before, it was closed as if whole, and the workspace took
/// what was queued for it of the cut-short upload (a review: 6.26 MB of 20 MB, for 14 s after,
/// and then a clean end).
#[tokio::test]
async fn a_client_gone_after_an_early_answer_resets_the_relay() {
    let svc = Svc::start(&[("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32")]).await;
    // 640 KB/s.
    let (addr, mut closes) = answers_at_once_then_reads(65536, Duration::from_millis(100)).await;
    let (ws, token) = push_workspace_at(&svc, addr).await;
    let body = one_file("XB", "big.bin", &vec![b'x'; 32 << 20]);
    let sock = TcpStream::connect(&svc.addr).await.unwrap();
    socket2::SockRef::from(&sock)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    let (mut rx, mut tx) = sock.into_split();
    let head = upload_head(&svc, ws, &token, body.len());
    let sending = tokio::spawn(async move {
        let _ = tx.write_all(head.as_bytes()).await;
        let _ = tx.write_all(&body).await;
        std::future::pending::<()>().await;
    });
    let answer = answer_head(&mut rx).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    sending.abort();
    let _ = sending.await;
    drop(rx); // SO_LINGER 0: a reset
    let (_, was_reset) = tokio::time::timeout(Duration::from_secs(30), closes.recv())
        .await
        .expect("the relay's connection ended")
        .unwrap();
    assert!(
        was_reset,
        "the workspace's connection ended as if the upload were whole"
    );
    wait_for_metric(&svc.base, "pending_uploads_uploads_in_progress", 0.0).await;
}

/// The same, read slower than the bytes buffered between the relay and the workspace (hyper's
/// write buffer and the sockets', most of a MB) drain: the relay ran in a pooled client's
/// connection task, which went on sending them after PUSH_TIMEOUT and held the slot meanwhile
/// (an audit: 30 MB read at 6.5 KB/s held it ~130 s against PUSH_TIMEOUT=20s). The relay owns
/// its connection now, and closes it at PUSH_TIMEOUT.
#[tokio::test]
async fn a_push_workspace_reading_slowly_after_its_answer_loses_the_relay_at_push_timeout() {
    let settings = [("PUSH_TIMEOUT", "2s"), ("BODY_MIN_RATE", "1024")];
    // 40 KB/s, well above BODY_MIN_RATE.
    let held = relay_after_an_early_answer(&settings, 4096, Duration::from_millis(100)).await;
    assert!(
        held < Duration::from_secs(5),
        "the relay went on for {held:?} against PUSH_TIMEOUT=2s"
    );
}

/// A push workspace that answers at once and then stops reading the rest is cut as one that
/// stops before answering is: at BODY_MIN_RATE (after BODY_RATE_GRACE, plus a second), not
/// when TCP_USER_TIMEOUT (PUSH_ANSWER_TIMEOUT, 30 s here) or PUSH_TIMEOUT ends its connection.
#[tokio::test]
async fn a_push_workspace_that_stops_reading_after_its_answer_loses_the_relay() {
    let settings = [("BODY_MIN_RATE", "4000000")];
    let held = relay_after_an_early_answer(&settings, 0, Duration::ZERO).await;
    assert!(
        held < Duration::from_secs(8),
        "the relay went on for {held:?} after the workspace stopped reading"
    );
}

/// A 32 MiB upload to a push workspace that answers at once, then reads as
/// [`answers_at_once_then_reads`] does: how long from the upload's start until the workspace
/// saw its connection end (at most 40 s), once the upload's slot is back too. With
/// `BODY_RATE_GRACE=1s` and `settings`.
async fn relay_after_an_early_answer(
    settings: &[(&str, &str)],
    chunk: usize,
    every: Duration,
) -> Duration {
    let mut settings = settings.to_vec();
    settings.extend([
        ("BODY_RATE_GRACE", "1s"),
        ("PUSH_ALLOWED_NETWORKS", "127.0.0.2/32"),
    ]);
    let svc = Svc::start(&settings).await;
    let (addr, mut closes) = answers_at_once_then_reads(chunk, every).await;
    let (ws, token) = push_workspace_at(&svc, addr).await;
    let started = Instant::now();
    let mut rx = big_raw_upload(&svc, ws, &token).await;
    let answer = answer_head(&mut rx).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (closed, _) = tokio::time::timeout(Duration::from_secs(40), closes.recv())
        .await
        .expect("the relay's connection closed")
        .unwrap();
    wait_for_metric(&svc.base, "pending_uploads_uploads_in_progress", 0.0).await;
    closed - started
}

#[tokio::test]
async fn one_workspace_cannot_hold_every_upload_slot() {
    let svc = Svc::start(&[("MAX_CONCURRENT_UPLOADS_PER_WORKSPACE", "4")]).await;
    let (flooded, flood_token) = register_poll(&svc.base).await;
    let (other, other_token) = register_poll(&svc.base).await;
    // Four uploads to one workspace hold its four slots (headers and part of a body sent).
    let body = one_file("XB", "held.bin", &vec![b'y'; 100_000]);
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
        let head = upload_head(&svc, flooded, &flood_token, body.len());
        sock.write_all(head.as_bytes()).await.unwrap();
        sock.write_all(&body[..1000]).await.unwrap();
        held.push(sock);
    }
    wait_for_metric(&svc.base, "pending_uploads_uploads_in_progress", 4.0).await;
    let resp = upload_file(&svc, flooded, &flood_token, "fifth.txt", b"5").await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "2");
    assert_json(
        resp,
        StatusCode::TOO_MANY_REQUESTS,
        json!({"error": "too many uploads in progress for this workspace — retry shortly", "code": "workspace_busy"}),
    )
    .await;
    // Another workspace is unaffected.
    let resp = upload_file(&svc, other, &other_token, "fine.txt", b"ok").await;
    assert_eq!(resp.status(), StatusCode::OK);
    drop(held);
    wait_for_metric(&svc.base, "pending_uploads_uploads_in_progress", 0.0).await;
    let resp = upload_file(&svc, flooded, &flood_token, "later.txt", b"6").await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "slots come back when their clients go"
    );
}

/// The 429 a client over SLOT_SHARE_PER_CLIENT gets, as it goes on the wire.
const CLIENT_BUSY: &str = r#"{"error":"too many requests in progress from this client — retry shortly","code":"client_busy"}"#;

/// Registration is open, so one client could register workspaces until their slots (each
/// within its workspace's bound) filled the replica: here two workspaces' 4 + 4 trickling
/// uploads held all 8 slots, and every other client's upload got 503 for as long as the
/// trickles lasted. A client address now holds at most SLOT_SHARE_PER_CLIENT percent of each
/// slot kind (2 of 8 here), whatever its workspaces; the rest are answered 429 at once. Other
/// clients are served, and so is a request from the proxy itself or a local address.
#[tokio::test]
async fn one_client_cannot_take_every_slot_through_many_workspaces() {
    const ATTACKER: &str = "8.8.4.66";
    let svc = Svc::start(&[
        ("MAX_CONCURRENT_UPLOADS", "8"),
        ("MAX_CONCURRENT_UPLOADS_PER_WORKSPACE", "4"),
        ("MAX_LONG_POLLS", "8"),
        ("SLOT_SHARE_PER_CLIENT", "25"),
        ("TRUSTED_PROXIES", "127.0.0.0/8"),
        ("BODY_RATE_GRACE", "60s"),
    ])
    .await;
    let own = [
        register_poll(&svc.base).await,
        register_poll(&svc.base).await,
    ];
    let body = one_file("XB", "held.bin", &vec![b'y'; 100_000]);
    let mut attempts = Vec::new();
    for (ws, token) in own
        .iter()
        .chain(own.iter())
        .chain(own.iter())
        .chain(own.iter())
    {
        let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
        let head = upload_head(&svc, *ws, token, body.len()).replacen(
            "\r\n\r\n",
            &format!("\r\nX-Forwarded-For: {ATTACKER}\r\n\r\n"),
            1,
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        sock.write_all(&body[..1000]).await.unwrap();
        attempts.push(sock);
    }
    // Each attempt is either refused (answered once the rest of its body has had its 5 s to
    // arrive) or held, waiting for the rest of its body.
    let answers = futures::future::join_all(attempts.iter_mut().map(|sock| async move {
        let mut raw = vec![0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(8), sock.read(&mut raw)).await {
            Ok(Ok(n)) => Some(String::from_utf8_lossy(&raw[..n]).to_string()),
            _ => None,
        }
    }))
    .await;
    let refused: Vec<&String> = answers.iter().flatten().collect();
    assert_eq!(refused.len(), 6, "{answers:?}");
    for answer in &refused {
        assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
        assert!(answer.contains("\r\nRetry-After: 2\r\n"), "{answer}");
        assert!(answer.ends_with(CLIENT_BUSY), "{answer}");
    }
    wait_for_metric(&svc.base, "pending_uploads_uploads_in_progress", 2.0).await;

    // Another client, the proxy itself, and the attacker's own third workspace from elsewhere.
    let (victim, victim_token) = register_poll(&svc.base).await;
    let from = |forwarded_for: Option<&'static str>| {
        let mut req = reqwest::Client::new()
            .post(svc.at(&format!("/workspaces/{victim}/chat/uploads")))
            .bearer_auth(&victim_token)
            .header("Content-Type", "multipart/form-data; boundary=XB")
            .body(one_file("XB", "fine.txt", b"ok"));
        if let Some(f) = forwarded_for {
            req = req.header("x-forwarded-for", f);
        }
        req.send()
    };
    assert_eq!(
        from(Some("198.51.100.7")).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        from(None).await.unwrap().status(),
        StatusCode::OK,
        "the proxy itself"
    );
    assert_eq!(
        from(Some("10.1.2.3")).await.unwrap().status(),
        StatusCode::OK,
        "a local client"
    );
    assert_retry_later(
        from(Some(ATTACKER)).await.unwrap(),
        StatusCode::TOO_MANY_REQUESTS,
        "2",
        serde_json::from_str(CLIENT_BUSY).unwrap(),
    )
    .await;
    assert_eq!(
        svc.count("pending_uploads").await,
        3,
        "a refusal stores nothing"
    );

    // Long polls the same way: the attacker's two uploads still hold its two upload slots, and
    // long polls are a kind of their own (2 of MAX_LONG_POLLS 8).
    let cursor = newest_activity(&svc, victim, &victim_token).await;
    let poll = |forwarded_for: &'static str| {
        reqwest::Client::new()
            .get(svc.at(&format!(
                "/workspaces/{victim}/activity?since_id={cursor}&wait=30"
            )))
            .bearer_auth(&victim_token)
            .header("x-forwarded-for", forwarded_for)
            .send()
    };
    let waiting = [tokio::spawn(poll(ATTACKER)), tokio::spawn(poll(ATTACKER))];
    wait_for_metric(&svc.base, "pending_uploads_long_polls_waiting", 2.0).await;
    let resp = poll(ATTACKER).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "client_busy");
    let other = tokio::spawn(poll("198.51.100.7"));
    wait_for_metric(&svc.base, "pending_uploads_long_polls_waiting", 3.0).await;
    // An IPv6 client by its /48, the most one site is handed (a free tunnel broker's): by
    // /56, its 256 subnets each had a client's share, and four of them held every slot of a
    // kind, another client then 503 (a review).
    let site = [
        tokio::spawn(poll("2a01:4f8:100::1")),
        tokio::spawn(poll("2a01:4f8:100:100::1")),
    ];
    wait_for_metric(&svc.base, "pending_uploads_long_polls_waiting", 5.0).await;
    let resp = poll("2a01:4f8:100:200::1").await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "client_busy");
    for w in waiting.into_iter().chain(site) {
        w.abort();
    }
    other.abort();

    drop(attempts);
    wait_for_metric(&svc.base, "pending_uploads_uploads_in_progress", 0.0).await;
    let resp = from(Some(ATTACKER)).await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "its slots come back when its uploads end"
    );
}

/// A download its client left half way was counted `ok` (the count was taken when the
/// stream opened): `files_fetched_total` now counts a download when it ends, `ok` only when
/// its last byte went out, `cut` when its client went first.
#[tokio::test]
async fn a_download_left_half_way_is_counted_cut_not_ok() {
    let svc = Svc::start(&[]).await;
    let (ws, token) = register_poll(&svc.base).await;
    // Larger than what the socket buffers between the two can take: the service is still
    // sending when the client goes.
    let data = vec![7u8; 16 << 20];
    let resp = upload_file(&svc, ws, &token, "big.bin", &data).await;
    let v: Value = resp.json().await.unwrap();
    let fid = file_id(&v["files"][0]);
    let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
    sock.write_all(
        format!(
            "GET /workspaces/{ws}/pending-uploads/{fid}/content HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut first = vec![0u8; 64 * 1024];
    sock.read_exact(&mut first).await.unwrap();
    drop(sock);
    let cut = r#"pending_uploads_files_fetched_total{backend="bytea",outcome="cut"}"#;
    wait_for_metric(&svc.base, cut, 1.0).await;
    let text = scrape_metrics(&svc.base).await;
    assert_eq!(
        metric_value(
            &text,
            r#"pending_uploads_files_fetched_total{backend="bytea",outcome="ok"}"#
        ),
        None,
        "{text}"
    );
    // A whole one is `ok`.
    let resp = reqwest::Client::new()
        .get(svc.at(&format!("/workspaces/{ws}/pending-uploads/{fid}/content")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap().len(), data.len());
    wait_for_metric(
        &svc.base,
        r#"pending_uploads_files_fetched_total{backend="bytea",outcome="ok"}"#,
        1.0,
    )
    .await;
}

/// SPEC §9: a truncated body gets a clear 4xx and leaves nothing. A body whose multipart is
/// whole but that ends short of its Content-Length (the client half-closes), or a chunked one
/// without its last chunk, is truncated: they were committed, 200, as soon as the closing
/// delimiter came. And the bytes after that delimiter are bounded like a preamble (they were
/// drained after the answer, outside MAX_REQUEST_BYTES).
#[tokio::test]
async fn an_upload_body_that_ends_short_or_runs_on_past_its_close_stores_nothing() {
    let svc = Svc::start(&[]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let activity = svc.count("activity_logs").await;
    let body = one_file("XB", "cut.txt", b"a whole multipart in a short body");
    let chunked_head = format!(
        "POST /workspaces/{ws}/chat/uploads HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: multipart/form-data; boundary=XB\r\nTransfer-Encoding: chunked\r\n\r\n",
        svc.addr
    );
    let chunk = |data: &[u8]| {
        [
            format!("{:x}\r\n", data.len()).into_bytes(),
            data.to_vec(),
            b"\r\n".to_vec(),
        ]
        .concat()
    };
    let cases = [
        (
            "a Content-Length one byte over",
            [
                upload_head(&svc, ws, &token, body.len() + 1).into_bytes(),
                body.clone(),
            ]
            .concat(),
        ),
        (
            "a Content-Length 50 MB over",
            [
                upload_head(&svc, ws, &token, body.len() + 50_000_000).into_bytes(),
                body.clone(),
            ]
            .concat(),
        ),
        (
            "chunked without its last chunk",
            [chunked_head.into_bytes(), chunk(&body)].concat(),
        ),
    ];
    for (what, raw) in cases {
        let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
        sock.write_all(&raw).await.unwrap();
        // Half-closed: nothing more comes, and the answer can still be read.
        sock.shutdown().await.unwrap();
        let answer = answer_on(&mut sock, 10, what).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");
        assert!(
            answer.ends_with(r#"{"error":"malformed multipart body"}"#),
            "{what}: {answer}"
        );
    }
    // 64 KiB after the closing delimiter: over the 8 KiB an epilogue may hold.
    let runs_on = [body.clone(), vec![b'e'; 64 * 1024]].concat();
    let resp = upload_raw(&svc, ws, &token, runs_on).await;
    assert_error(resp, StatusCode::BAD_REQUEST, "malformed multipart body").await;
    assert_eq!(svc.count("pending_uploads").await, 0, "nothing was staged");
    assert_eq!(svc.count("activity_logs").await, activity);
    // The same bytes, whole, are taken.
    let resp = upload_raw(&svc, ws, &token, body).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

/// A client that sends its whole body and goes does not free its slot while its commit goes
/// on without it (holding a database connection, its spool, the workspace's lock queue):
/// otherwise "send, close, repeat" takes unbounded commits past every slot cap.
#[tokio::test]
async fn a_client_gone_after_its_body_keeps_its_slot_until_the_commit_ends() {
    let svc = Svc::start(&[("MAX_CONCURRENT_UPLOADS_PER_WORKSPACE", "1")]).await;
    let (ws, token) = register_poll(&svc.base).await;
    // The test holds the workspace's lock: the upload's commit waits for it.
    let lock = hold_workspace_lock(&svc.pool, ws).await;
    let body = one_file("XB", "gone.txt", b"sent whole");
    let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
    sock.write_all(upload_head(&svc, ws, &token, body.len()).as_bytes())
        .await
        .unwrap();
    sock.write_all(&body).await.unwrap();
    wait_for_metric(&svc.base, "pending_uploads_uploads_in_progress", 1.0).await;
    drop(sock);
    // Time for the service to see the client go (it did, before: the slot came back at once).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        upload_file(&svc, ws, &token, "second.txt", b"2"),
    )
    .await
    .expect("the second upload was taken and waits on the lock: the first one's slot was freed");
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    lock.release().await;
    wait_for_metric(&svc.base, "pending_uploads_uploads_in_progress", 0.0).await;
    assert_eq!(
        svc.count("pending_uploads").await,
        1,
        "the first commit ended"
    );
    let resp = upload_file(&svc, ws, &token, "third.txt", b"3").await;
    assert_eq!(resp.status(), StatusCode::OK, "the slot came back");
}

/// SPOOL_MEMORY_TOTAL bounds the file bytes all upload requests of a replica keep in memory
/// together. While one request holds its share (its body half sent), another whose body does
/// not fit in what is left goes to disk (here a missing folder: a clean 503), a small one still
/// fits, and the share comes back when the first request is done.
#[tokio::test]
async fn spool_memory_total_is_shared_by_the_requests_in_flight() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("spool");
    let svc = Svc::start(&[
        ("SPOOL_DIR", dir.to_str().unwrap()),
        ("SPOOL_MEMORY_PER_REQUEST", "65536"),
        ("SPOOL_MEMORY_TOTAL", "100000"),
    ])
    .await;
    std::fs::remove_dir(&dir).unwrap();
    let (ws, token) = register_poll(&svc.base).await;
    let reserved = "pending_uploads_spool_memory_reserved_bytes";
    let held_body = one_file("XB", "held.bin", &[b'h'; 60_000]);
    let head = upload_head(&svc, ws, &token, held_body.len())
        .replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
    let mut held = TcpStream::connect(&svc.addr).await.unwrap();
    held.write_all(head.as_bytes()).await.unwrap();
    held.write_all(&held_body[..1000]).await.unwrap();
    wait_for_metric(&svc.base, reserved, held_body.len() as f64).await;

    let resp = upload_file(&svc, ws, &token, "b.bin", &[b'b'; 50_000]).await;
    assert_spool_unavailable(resp).await;
    let resp = upload_file(&svc, ws, &token, "c.txt", b"small").await;
    assert_eq!(resp.status(), StatusCode::OK);

    held.write_all(&held_body[1000..]).await.unwrap();
    let mut raw = Vec::new();
    held.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    wait_for_metric(&svc.base, reserved, 0.0).await;
    let resp = upload_file(&svc, ws, &token, "b.bin", &[b'b'; 50_000]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT filename FROM pending_uploads WHERE workspace_id = $1 ORDER BY seq",
    )
    .bind(ws)
    .fetch_all(&svc.pool)
    .await
    .unwrap();
    assert_eq!(names, ["c.txt", "held.bin", "b.bin"]);
}

/// The upload arena (small uploads' and bytea reads' big buffers, `arena.rs`) keeps freed
/// pages only for jemalloc's decay: after a burst of 1 MiB uploads and downloads `/metrics`
/// shows them kept, and a little after the decay (2 s here, set through `MALLOC_CONF`) none.
#[tokio::test]
async fn the_upload_arena_returns_what_a_burst_left_within_its_decay() {
    let svc = Svc::start(&[("MALLOC_CONF", "dirty_decay_ms:2000")]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let staged =
        futures::future::join_all((0..4).map(|_| stage_file(&svc, ws, &token, 1 << 20))).await;
    let (svc, token) = (&svc, &token);
    let downloads = staged.iter().map(|(file, data)| async move {
        let body = download(svc, ws, token, *file).await;
        assert!(body == data[..], "file {file} came back changed");
    });
    futures::future::join_all(downloads).await;
    let kept = "pending_uploads_upload_arena_bytes{state=\"kept\"}";
    let after_burst = metric_value(&scrape_metrics(&svc.base).await, kept).unwrap();
    assert!(
        after_burst >= (1 << 20) as f64,
        "the burst's pages are kept for the next requests: {after_burst}"
    );
    let started = Instant::now();
    loop {
        let now = metric_value(&scrape_metrics(&svc.base).await, kept).unwrap();
        if now == 0.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{now} bytes still kept {:?} after the burst",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a test's proxy in front of the database does to the traffic it passes.
#[derive(Clone, Copy)]
enum DbProxy {
    /// Passes what clients send at this many bytes per second (answers unthrottled): a
    /// database that takes data steadily, but slowly.
    Throttle(f64),
    /// On a connection whose client has sent this many bytes, holds the server's next answer
    /// this long: a database busy storing a large row after its last byte.
    HoldAnswerAfter(u64, Duration),
    /// Once any client has sent this many bytes, passes no answer on any connection: a
    /// database that froze after a large row's last byte.
    FreezeAfter(u64),
    /// Passes nothing more to a connection that sent `LISTEN` and was opened before the
    /// latest [`Freeze::now`]: a listener's connection that a NAT or firewall dropped.
    FreezeListeners(&'static Freeze),
}

/// Which connections [`DbProxy::FreezeListeners`] freezes: those numbered below `before`.
#[derive(Default)]
struct Freeze {
    opened: AtomicU64,
    before: AtomicU64,
    /// Connections that have sent `LISTEN` so far.
    listens: AtomicU64,
}

impl Freeze {
    /// Freezes the listening connections open now (not the ones opened later).
    fn now(&self) {
        self.before
            .store(self.opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// A TCP proxy in front of the database of `db_url` doing `mode`; the URL through it.
async fn database_proxy(db_url: &str, mode: DbProxy) -> String {
    let (scheme_user, rest) = db_url.split_once('@').expect("a user in the database URL");
    let (authority, path) = rest.split_once('/').expect("a database in the URL");
    let upstream = tokio::net::lookup_host(authority)
        .await
        .unwrap()
        .next()
        .unwrap();
    // A small receive buffer, so little of what the service sent waits in the proxy's socket
    // when it thinks the database has it all.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(64).unwrap();
    let proxy = listener.local_addr().unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    tokio::spawn(async move {
        let mut opened = 0u64;
        while let Ok((client, _)) = listener.accept().await {
            let frozen = frozen.clone();
            let number = opened;
            opened += 1;
            if let DbProxy::FreezeListeners(freeze) = mode {
                freeze.opened.store(opened, Ordering::SeqCst);
            }
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let sent = Arc::new(AtomicU64::new(0));
                let listening = Arc::new(AtomicBool::new(false));
                let up = {
                    let (sent, frozen, listening) =
                        (sent.clone(), frozen.clone(), listening.clone());
                    async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n @ 1..) = from_client.read(&mut buf).await {
                            if buf[..n].windows(7).any(|w| w == b"LISTEN ")
                                && !listening.swap(true, Ordering::SeqCst)
                            {
                                if let DbProxy::FreezeListeners(freeze) = mode {
                                    freeze.listens.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            if to_server.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            let total = sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                            match mode {
                                DbProxy::Throttle(rate) => {
                                    tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate))
                                        .await
                                }
                                DbProxy::FreezeAfter(after) if total >= after => {
                                    frozen.store(true, Ordering::SeqCst)
                                }
                                _ => {}
                            }
                        }
                        let _ = to_server.shutdown().await;
                    }
                };
                let down = async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut held = false;
                    while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                        if frozen.load(Ordering::SeqCst) {
                            std::future::pending::<()>().await;
                        }
                        if let DbProxy::FreezeListeners(freeze) = mode {
                            if listening.load(Ordering::SeqCst)
                                && number < freeze.before.load(Ordering::SeqCst)
                            {
                                std::future::pending::<()>().await;
                            }
                        }
                        if let DbProxy::HoldAnswerAfter(after, hold) = mode {
                            if !held && sent.load(Ordering::SeqCst) >= after {
                                held = true;
                                tokio::time::sleep(hold).await;
                            }
                        }
                        if to_client.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::join!(up, down);
            });
        }
    });
    format!("{scheme_user}@{proxy}/{path}")
}

/// A replica's LISTEN connection that stalls without closing (a NAT or firewall dropped it)
/// was never noticed: every long poll on that replica waited out its `wait`, and uploads
/// reached their pollers only then. The listener checks its connection with a heartbeat of
/// its own every DEPENDENCY_TIMEOUT, and connects again when it hears nothing.
#[tokio::test]
async fn a_stalled_listener_connection_is_replaced_and_long_polls_wake_again() {
    let freeze: &'static Freeze = Box::leak(Box::default());
    let proxied = database_proxy(&fresh_db().await, DbProxy::FreezeListeners(freeze)).await;
    let svc = Svc::start_on(proxied, &[("DEPENDENCY_TIMEOUT", "1s")], None).await;
    let (ws, token) = register_poll(&svc.base).await;
    let resp = upload_file(&svc, ws, &token, "first.txt", b"1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let cursor = newest_activity(&svc, ws, &token).await;
    let listening = freeze.listens.load(Ordering::SeqCst);
    assert!(listening >= 1, "the replica listens through the proxy");
    freeze.now();
    // Heard nothing for a beat after its heartbeat: it listens again on a new connection
    // (about three seconds; bounded generously for a loaded machine).
    let mut again = false;
    for _ in 0..600 {
        if freeze.listens.load(Ordering::SeqCst) > listening {
            again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again, "the stalled listener was replaced");
    // Its new LISTEN is under way: let it take effect.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let poll = {
        let req = reqwest::Client::new()
            .get(svc.at(&format!(
                "/workspaces/{ws}/activity?since_id={cursor}&wait=30"
            )))
            .bearer_auth(&token);
        tokio::spawn(async move { req.send().await.unwrap().json::<Value>().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let resp = upload_file(&svc, ws, &token, "second.txt", b"2").await;
    assert_eq!(resp.status(), StatusCode::OK);
    // Well inside the poll's own 30 s: a stalled listener never replaced is heard of only
    // when the wait ends. (This took over 5 s now and then on a loaded machine: the
    // replacement took the pool's idle connection, opened before the freeze, which the proxy
    // froze too; see the next test.)
    let rows = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the waiting poll heard of the upload")
        .unwrap();
    assert_eq!(rows[0]["summary"], "chat_upload_receive: second.txt");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// The listener took its connection from the pool its heartbeat uses, and a stalled one never
/// went back: dropped, sqlx runs `UNLISTEN *` on it first, which waits on the stalled
/// connection for as long as TCP keeps it. With two places, the second stall left the
/// heartbeat none: it gave no verdict, and the frozen listener stayed for good (every long
/// poll waited out its `wait`). Each replacement also took the pool's idle connection, made
/// before the stall, not a new one. Three stalls in a row here, each replaced.
#[tokio::test]
async fn a_listener_stalled_again_and_again_is_replaced_each_time() {
    let freeze: &'static Freeze = Box::leak(Box::default());
    let proxied = database_proxy(&fresh_db().await, DbProxy::FreezeListeners(freeze)).await;
    let svc = Svc::start_on(
        proxied,
        &[
            ("DEPENDENCY_TIMEOUT", "1s"),
            ("DATABASE_MAX_CONNECTIONS", "2"),
        ],
        None,
    )
    .await;
    let (ws, token) = register_poll(&svc.base).await;
    let resp = upload_file(&svc, ws, &token, "first.txt", b"1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let cursor = newest_activity(&svc, ws, &token).await;
    for stall in 1..=3 {
        let listening = freeze.listens.load(Ordering::SeqCst);
        assert!(listening >= 1, "the replica listens through the proxy");
        freeze.now();
        let replaced = async {
            while freeze.listens.load(Ordering::SeqCst) <= listening {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), replaced)
            .await
            .unwrap_or_else(|_| panic!("stalled listener {stall} was replaced"));
    }
    // The last replacement's LISTEN is under way: let it take effect.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let poll = {
        let req = reqwest::Client::new()
            .get(svc.at(&format!(
                "/workspaces/{ws}/activity?since_id={cursor}&wait=30"
            )))
            .bearer_auth(&token);
        tokio::spawn(async move { req.send().await.unwrap().json::<Value>().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resp = upload_file(&svc, ws, &token, "second.txt", b"2").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let rows = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the waiting poll heard of the upload")
        .unwrap();
    assert_eq!(rows[0]["summary"], "chat_upload_receive: second.txt");
}

/// A database that keeps taking a large file's bytes, only slowly, is not a stalled one: the
/// upload completes. Here 4 MiB/s, so a 40 MiB COPY takes ~10 s against a 3 s
/// `DEPENDENCY_TIMEOUT`; the transaction's deadline grew with its bytes at an assumed 8 MiB/s
/// at worst (3 + 5 s: a 503), now 1 MiB/s (3 + 40 s). Eight 100 MB uploads at once met that
/// 503 in the bench.
#[tokio::test]
async fn a_slow_but_moving_database_still_takes_a_large_upload() {
    let db = fresh_db().await;
    let slow = database_proxy(&db, DbProxy::Throttle(4.0 * 1024.0 * 1024.0)).await;
    upload_40_mib_through(slow, "3s", Duration::from_secs(8)).await;
}

/// Stages one 40 MiB file through a service whose database is at `db_url` (a proxy), checks
/// that it took at least `at_least` (the proxy's doing) and that it downloads unchanged.
async fn upload_40_mib_through(db_url: String, dependency_timeout: &str, at_least: Duration) {
    let svc = Svc::start_on(db_url, &[("DEPENDENCY_TIMEOUT", dependency_timeout)], None).await;
    let (ws, token) = register_poll(&svc.base).await;
    let started = Instant::now();
    let (file, data) = stage_file(&svc, ws, &token, 40 << 20).await;
    assert!(
        started.elapsed() >= at_least,
        "the proxy slowed it: {:?}",
        started.elapsed()
    );
    let body = download(&svc, ws, &token, file).await;
    assert!(body == data[..], "the file came back changed");
}

/// PostgreSQL stores a row only once its last byte is in, so a large row's TOAST and WAL come
/// after the COPY's data: on a busy server, longer than `DEPENDENCY_TIMEOUT`. Eight 100 MB
/// uploads at once met a 503 ("database took no data for 10s") in the bench that way. Here the
/// answer to the COPY's end is held 5 s against a 2 s `DEPENDENCY_TIMEOUT` while the database
/// answers other connections: the upload completes.
#[tokio::test]
async fn a_database_busy_after_a_large_rows_last_byte_still_takes_it() {
    let db = fresh_db().await;
    let hold = Duration::from_secs(5);
    let busy = database_proxy(&db, DbProxy::HoldAnswerAfter(30 << 20, hold)).await;
    upload_40_mib_through(busy, "2s", hold).await;
}

/// An upload costs the database the disk its row takes, and no more: the trigger that counts
/// a workspace's pending bytes once kept a copy of each inserted row, whole and before TOAST
/// (a statement trigger's transition table), which past `work_mem` (4 MB) spilled to a temp
/// file on the database server and was read back at the statement's end: a 100 MB upload
/// wrote and read 100 MB more. Here the service's sessions may write at most 1 MiB of temp
/// files (`temp_file_limit`): before, the 12 MiB upload failed with 503; now it stages.
#[tokio::test]
async fn a_large_upload_costs_the_database_no_temp_file() {
    let db = fresh_db().await;
    let capped = format!("{db}?options=-c%20temp_file_limit%3D1024");
    let svc = Svc::start_on(capped, &[], None).await;
    let (ws, token) = register_poll(&svc.base).await;
    let (file, data) = stage_file(&svc, ws, &token, 12 << 20).await;
    let body = download(&svc, ws, &token, file).await;
    assert!(body == data[..], "the file came back changed");
    let (bytes, files): (i64, i64) = sqlx::query_as(
        "SELECT unacked_bytes, unacked_files FROM pending_upload_totals WHERE workspace_id = $1",
    )
    .bind(ws)
    .fetch_one(&svc.pool)
    .await
    .unwrap();
    assert_eq!((bytes, files), (12 << 20, 1), "the upload is counted");
}

/// A `Db` over a fresh database with one connection (5 s timeout).
async fn one_connection_db() -> pending_uploads::db::Db {
    one_connection_db_at(&fresh_db().await)
}

fn one_connection_db_at(url: &str) -> pending_uploads::db::Db {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy(url)
        .unwrap();
    pending_uploads::db::Db::new(pool, Duration::from_secs(5))
}

/// Holds `db`'s one connection, in work of its own, until the sender is dropped.
async fn hold_the_only_connection(
    db: &pending_uploads::db::Db,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let (taken, is_taken) = tokio::sync::oneshot::channel::<()>();
    let db = db.clone();
    let holding = tokio::spawn(async move {
        db.run(|_c| {
            Box::pin(async move {
                let _ = taken.send(());
                let _ = released.await;
                Ok(())
            })
        })
        .await
        .unwrap()
    });
    is_taken.await.unwrap();
    (release, holding)
}

async fn backend_pid(db: &pending_uploads::db::Db) -> i32 {
    db.run(|c| Box::pin(sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(c)))
        .await
        .unwrap()
}

/// No pooled connection within the deadline is the pool's timeout: unavailable (503), but
/// with a known outcome, since nothing reached the server. An upload's commit that got no
/// connection then removes the objects it wrote at once and announces nothing. For a while
/// the shared deadline made it an unknown outcome (a cut query), and such a commit left its
/// objects for the orphan sweep, an hour later.
#[tokio::test]
async fn no_connection_in_time_is_a_known_outcome() {
    let db = one_connection_db().await;
    let (release, holding) = hold_the_only_connection(&db).await;
    let started = Instant::now();
    let err = db
        .run_within(Duration::from_millis(300), |c| {
            Box::pin(sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(c))
        })
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(err.is_unavailable(), "{err}");
    assert!(!err.outcome_unknown(), "nothing reached the server: {err}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    drop(release);
    holding.await.unwrap();
}

/// A database not accepting connections yet (restarting) is asked again for as long as the
/// work may wait, as sqlx's pool did: here it comes up 400 ms into a 5 s wait, and the work
/// runs. Failing that, no session is a known outcome: nothing reached the server, so an
/// upload's commit removes what it wrote at once (an `Io` error used to count as "may have
/// committed").
#[tokio::test]
async fn a_database_coming_up_is_waited_for_and_no_session_is_a_known_outcome() {
    let url = fresh_db().await;
    let real: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let port = free_port();
    let db = pending_uploads::db::Db::new(
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(real.clone().host("127.0.0.1").port(port)),
        Duration::from_secs(5),
    );
    let never = db
        .run_within(Duration::from_millis(300), |c| {
            Box::pin(sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(c))
        })
        .await
        .unwrap_err();
    assert!(never.is_unavailable(), "{never}");
    assert!(
        !never.outcome_unknown(),
        "nothing reached the server: {never}"
    );

    let (host, pg_port) = (real.get_host().to_string(), real.get_port());
    let comes_up = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let (mut client, _) = listener.accept().await.unwrap();
        let mut server = tokio::net::TcpStream::connect((host.as_str(), pg_port))
            .await
            .unwrap();
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    });
    let started = Instant::now();
    let answer: i32 = db
        .run(|c| Box::pin(sqlx::query_scalar("SELECT 7").fetch_one(c)))
        .await
        .unwrap();
    assert_eq!(answer, 7);
    assert!(started.elapsed() >= Duration::from_millis(400));
    comes_up.abort();
}

/// A connection whose work finished in step serves the next work as it is (no ping, no new
/// session); work that cuts its own wait on the database (as a stalled COPY does) leaves its
/// connection mid-message, so `Db` closes it instead (a ping on it, against a frozen server,
/// would wait without end), and the next work gets a fresh one.
#[tokio::test]
async fn a_database_wait_cut_half_way_closes_its_connection() {
    let db = one_connection_db().await;
    let first = backend_pid(&db).await;
    assert_eq!(
        backend_pid(&db).await,
        first,
        "a connection in step is kept"
    );
    let cut = db
        .run(|c| {
            Box::pin(async move {
                let sleep = sqlx::query("SELECT pg_sleep(1)").execute(c);
                match tokio::time::timeout(Duration::from_millis(100), sleep).await {
                    Ok(done) => done.map(drop),
                    Err(_) => Err(sqlx::Error::Io(std::io::ErrorKind::TimedOut.into())),
                }
            })
        })
        .await;
    assert!(cut.is_err(), "the wait was cut");
    assert_ne!(backend_pid(&db).await, first, "the cut connection was kept");
}

/// A transaction dropped unfinished queues its ROLLBACK: it goes out before the connection
/// serves other work, so no lock it took outlives the work.
#[tokio::test]
async fn a_transaction_dropped_unfinished_ends_before_its_connection_is_reused() {
    let url = fresh_db().await;
    let db = one_connection_db_at(&url);
    let first = backend_pid(&db).await;
    db.run(|c| {
        Box::pin(async move {
            let mut tx = sqlx::Connection::begin(c).await?;
            sqlx::query("SELECT pg_advisory_xact_lock(4242)")
                .execute(&mut *tx)
                .await?;
            Ok(())
        })
    })
    .await
    .unwrap();
    let other = sqlx::PgPool::connect(&url).await.unwrap();
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(4242)")
        .fetch_one(&other)
        .await
        .unwrap();
    assert!(free, "the dropped transaction still holds its lock");
    assert_eq!(
        backend_pid(&db).await,
        first,
        "a rolled back connection is kept"
    );
}

/// Requests waiting on a busy database (large COPYs after their last byte) probe it for a
/// sign of life; one probe is out at a time and the others share its answer, so the waits do
/// not each take a pooled connection. A probe dropped half-way (its wait ended) lets the next
/// one go out.
#[tokio::test]
async fn waits_on_the_database_share_one_probe() {
    let db = one_connection_db().await;
    let window = Duration::from_secs(5);
    let (release, holding) = hold_the_only_connection(&db).await;
    // A probe in a task of its own, seen waiting on the held connection.
    async fn waiting_probe(
        db: &pending_uploads::db::Db,
        window: Duration,
        why: &str,
    ) -> tokio::task::JoinHandle<()> {
        let db = db.clone();
        let probe = tokio::spawn(async move { db.probe(window).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!probe.is_finished(), "{why}");
        probe
    }
    let first = waiting_probe(&db, window, "the first probe waits for the connection").await;
    let second = tokio::time::timeout(Duration::from_millis(200), db.probe(window)).await;
    assert!(second.is_ok(), "a second probe shares the first's answer");
    first.abort();
    let _ = first.await;
    let before = Instant::now();
    let third = waiting_probe(
        &db,
        window,
        "after the first was dropped, the next one goes out",
    )
    .await;
    drop(release);
    holding.await.unwrap();
    third.await.unwrap();
    assert!(
        db.silent_since(before) + Duration::from_millis(50) < before.elapsed(),
        "its answer counts as a sign of life"
    );
}

/// ... but a database that answers nothing at all after the last byte (no connection gets an
/// answer) still costs the upload no more than `DEPENDENCY_TIMEOUT`: 503, nothing staged.
#[tokio::test]
async fn a_database_frozen_after_a_large_rows_last_byte_fails_within_the_dependency_timeout() {
    let db = fresh_db().await;
    let frozen = database_proxy(&db, DbProxy::FreezeAfter(40 << 20)).await;
    let svc = Svc::start_on(frozen, &[("DEPENDENCY_TIMEOUT", "2s")], None).await;
    let (ws, token) = register_poll(&svc.base).await;
    let started = Instant::now();
    let resp = upload_file(&svc, ws, &token, "big.bin", &bytes(40 << 20, 5)).await;
    let took = started.elapsed();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "platform_unavailable", "{body}");
    // Receiving and copying 40 MiB through the proxy come first; without the bound the
    // wait was the COPY's own deadline, tens of seconds.
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "503 after {took:?}"
    );
    // Past the proxy: its answers are frozen.
    let direct = sqlx::PgPool::connect(&db).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_uploads")
        .fetch_one(&direct)
        .await
        .unwrap();
    assert_eq!(rows, 0);
}

/// A large upload's deadline grows with its bytes for their COPY only: a database that then
/// does not answer the admission (here: the workspace's lock, held by the test) costs it
/// `DEPENDENCY_TIMEOUT`, not that plus a second per MiB.
#[tokio::test]
async fn a_large_upload_waits_on_its_admission_no_longer_than_the_dependency_timeout() {
    let svc = Svc::start(&[
        ("DEPENDENCY_TIMEOUT", "2s"),
        ("SPOOL_MEMORY_PER_REQUEST", "0"),
    ])
    .await;
    let (ws, token) = register_poll(&svc.base).await;
    let lock = hold_workspace_lock(&svc.pool, ws).await;
    let started = Instant::now();
    let resp = upload_file(&svc, ws, &token, "big.bin", &bytes(30 << 20, 6)).await;
    let took = started.elapsed();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "platform_unavailable", "{body}");
    assert!(took < Duration::from_secs(8), "503 after {took:?}");
    lock.release().await;
    assert_eq!(svc.count("pending_uploads").await, 0);
    assert_eq!(svc.count("activity_logs").await, 0);
}

/// A list or feed answer is as large as the workspace makes it (1,000 rows of long names
/// were 0.85 MB, built whole), and a client that does not read keeps it in memory until
/// RESPONSE_MIN_RATE cuts it: 800 such requests took the service from 35 to 698 MB. Answers
/// over 16 KiB now go out in pieces under a download slot (the list a page of 200 rows at a
/// time), so only MAX_CONCURRENT_DOWNLOADS(_PER_WORKSPACE) of them are out at once; small
/// answers need none.
#[tokio::test]
async fn large_list_answers_are_bounded_like_downloads() {
    // No log line per file: thousands would fill the pipe the test reads the log from.
    let svc = Svc::start(&[
        ("MAX_CONCURRENT_DOWNLOADS_PER_WORKSPACE", "1"),
        ("RESPONSE_MIN_RATE", "0"),
        ("RUST_LOG", "warn"),
    ])
    .await;
    let (ws, token) = register_poll(&svc.base).await;
    let name = format!("{}.txt", "n".repeat(200));
    // 8,000 rows, 5.6 MB of list: more than the kernel takes into the socket's buffers.
    for batch in 0..160 {
        let mut body = Vec::new();
        for i in 0..50 {
            body.extend_from_slice(
                format!(
                    "--XB\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{batch}-{i}-{name}\"\r\n\
                     Content-Type: text/plain\r\n\r\nx\r\n"
                )
                .as_bytes(),
            );
        }
        body.extend_from_slice(b"--XB--\r\n");
        assert_eq!(
            upload_raw(&svc, ws, &token, body).await.status(),
            StatusCode::OK
        );
    }
    let list = svc.at(&format!("/workspaces/{ws}/pending-uploads"));
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stalled = sock.connect(svc.addr.parse().unwrap()).await.unwrap();
    let head = format!(
        "GET /workspaces/{ws}/pending-uploads HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\r\n",
        svc.addr
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    wait_for_metric(&svc.base, "pending_uploads_downloads_in_progress", 1.0).await;
    let client = reqwest::Client::new();
    assert_retry_later(
        client.get(&list).bearer_auth(&token).send().await.unwrap(),
        StatusCode::TOO_MANY_REQUESTS,
        "2",
        json!({"error": "too many downloads in progress for this workspace — retry shortly", "code": "workspace_busy"}),
    )
    .await;
    let feed = svc.at(&format!("/workspaces/{ws}/activity?limit=500"));
    let resp = client.get(&feed).bearer_auth(&token).send().await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "a large feed answer"
    );
    let small = svc.at(&format!("/workspaces/{ws}/activity?limit=1"));
    let resp = client.get(&small).bearer_auth(&token).send().await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "a small answer needs no slot"
    );
    drop(stalled);
    wait_for_metric(&svc.base, "pending_uploads_downloads_in_progress", 0.0).await;
    let array_len = |url: String| {
        let get = client.get(url).bearer_auth(&token).send();
        async move { get.await.unwrap().json::<Vec<Value>>().await.unwrap().len() }
    };
    assert_eq!(array_len(list).await, 8000);
    assert_eq!(array_len(feed).await, 500);
}

/// A GET of a file's content on a raw socket with a 4 KiB receive buffer that never reads: the
/// service fills the socket and its body stream waits, holding a download slot.
async fn stalled_download(svc: &Svc, ws: Uuid, token: &str, file: Uuid) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut sock = sock.connect(svc.addr.parse().unwrap()).await.unwrap();
    let head = format!(
        "GET /workspaces/{ws}/pending-uploads/{file}/content HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\r\n",
        svc.addr
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock
}

/// Uploads one file of `len` bytes to `ws`: its file_id and bytes.
async fn stage_file(svc: &Svc, ws: Uuid, token: &str, len: usize) -> (Uuid, Vec<u8>) {
    let data = bytes(len, 5);
    let resp = upload_file(svc, ws, token, "big.bin", &data).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    (file_id(&body["files"][0]), data)
}

/// A file's whole content, as the workspace downloads it.
async fn download(svc: &Svc, ws: Uuid, token: &str, file: Uuid) -> bytes::Bytes {
    downloaded(&reqwest::Client::new(), &svc.base, ws, file, token).await
}

/// A new workspace with one uploaded file of `len` bytes.
async fn one_staged_file(svc: &Svc, len: usize) -> (Uuid, String, Uuid, Vec<u8>) {
    let (ws, token) = register_poll(&svc.base).await;
    let (file, data) = stage_file(svc, ws, &token, len).await;
    (ws, token, file, data)
}

/// A download holds a slot while its body streams, so clients that stop reading (each keeps
/// a slice in memory) are bounded: one workspace gets at most
/// MAX_CONCURRENT_DOWNLOADS_PER_WORKSPACE (then 429), the replica MAX_CONCURRENT_DOWNLOADS
/// (then 503), HEAD needs no slot, and the slots come back when the clients go.
#[tokio::test]
async fn stalled_downloads_are_bounded_per_workspace_and_per_replica() {
    // Held by the slots alone: the rate rule would cut these readers on its own.
    let svc = Svc::start(&[
        ("MAX_CONCURRENT_DOWNLOADS", "3"),
        ("MAX_CONCURRENT_DOWNLOADS_PER_WORKSPACE", "2"),
        ("RESPONSE_MIN_RATE", "0"),
    ])
    .await;
    let (a, a_token, a_file, big) = one_staged_file(&svc, 16 << 20).await;
    let (b, b_token, b_file, _) = one_staged_file(&svc, 16 << 20).await;
    let in_progress = "pending_uploads_downloads_in_progress";
    let content =
        |ws: Uuid, file: Uuid| svc.at(&format!("/workspaces/{ws}/pending-uploads/{file}/content"));
    let client = reqwest::Client::new();
    let get =
        |ws: Uuid, token: &str, file: Uuid| client.get(content(ws, file)).bearer_auth(token).send();
    let mut held = vec![
        stalled_download(&svc, a, &a_token, a_file).await,
        stalled_download(&svc, a, &a_token, a_file).await,
    ];
    wait_for_metric(&svc.base, in_progress, 2.0).await;
    assert_retry_later(
        get(a, &a_token, a_file).await.unwrap(),
        StatusCode::TOO_MANY_REQUESTS,
        "2",
        json!({"error": "too many downloads in progress for this workspace — retry shortly", "code": "workspace_busy"}),
    )
    .await;
    held.push(stalled_download(&svc, b, &b_token, b_file).await);
    wait_for_metric(&svc.base, in_progress, 3.0).await;
    assert_retry_later(
        get(b, &b_token, b_file).await.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE,
        "2",
        json!({"error": "too many downloads in progress — retry shortly", "code": "download_capacity"}),
    )
    .await;
    let resp = client
        .head(content(b, b_file))
        .bearer_auth(&b_token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "HEAD streams nothing and needs no slot"
    );
    drop(held);
    wait_for_metric(&svc.base, in_progress, 0.0).await;
    let resp = get(a, &a_token, a_file).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.bytes().await.unwrap() == big,
        "the whole file once slots are back"
    );
    wait_for_metric(&svc.base, in_progress, 0.0).await;
}

/// A content GET reads the file's first slice with the caller check, in one round trip. It
/// used to do that before asking for a download slot, so a workspace over its slots had
/// PostgreSQL read 128 KiB for every 429. A workspace with no slot free now gets its 429
/// after the caller check alone: what PostgreSQL sends is counted by a proxy in front of it.
#[tokio::test]
async fn a_download_refused_a_slot_reads_no_bytes() {
    // An older binary (TEST_SERVICE_BIN) migrates an empty database itself.
    let db = if std::env::var("TEST_SERVICE_BIN").is_ok() {
        empty_db().await
    } else {
        fresh_db().await
    };
    let (upstream, via) = crate::wire::split_host(&db);
    let proxy = crate::wire::Proxy::start(upstream).await;
    let env = [
        ("MAX_CONCURRENT_DOWNLOADS_PER_WORKSPACE", "1"),
        ("RESPONSE_MIN_RATE", "0"),
    ];
    let svc = Svc::start_on(via(proxy.port), &env, None).await;
    let (ws, token, file, _) = one_staged_file(&svc, 16 << 20).await;
    let _held = stalled_download(&svc, ws, &token, file).await;
    wait_for_metric(&svc.base, "pending_uploads_downloads_in_progress", 1.0).await;
    // The stalled download's slices fetched ahead may still be on their way: counted from
    // when nothing has come for a second (a slow database's next slice can be 200 ms late).
    let mut before = proxy.bytes_down();
    let mut quiet = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = proxy.bytes_down();
        quiet = if now == before { quiet + 1 } else { 0 };
        if quiet == 5 {
            break;
        }
        before = now;
    }
    let client = reqwest::Client::new();
    let url = svc.at(&format!("/workspaces/{ws}/pending-uploads/{file}/content"));
    for _ in 0..50 {
        let resp = client.get(&url).bearer_auth(&token).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    }
    let sent = proxy.bytes_down() - before;
    // A caller check and its row are well under 2 KiB; a first slice is 256 KiB.
    assert!(
        sent < 50 * 2048,
        "PostgreSQL sent {sent} bytes for 50 refused downloads"
    );
}

/// A slow reader used to keep its download slot (and the slice in flight) until the idle
/// timeout, 60 s, whatever it read. Now, while a response waits on its client, the client
/// must take RESPONSE_MIN_RATE per second of that waiting: the trickle is cut after a window
/// and its slot comes back, while a reader that keeps up gets the whole file through the
/// same tiny receive buffer (what the kernel's send buffer hides from our writes still
/// counts: the client's TCP acknowledgements).
#[tokio::test]
async fn a_download_read_in_a_trickle_is_cut_and_a_steady_reader_is_not() {
    let svc = Svc::start(&[
        ("MAX_CONCURRENT_DOWNLOADS_PER_WORKSPACE", "1"),
        ("RESPONSE_MIN_RATE", "65536"),
        ("RESPONSE_RATE_WINDOW", "1s"),
        ("RESPONSE_IDLE_TIMEOUT", "60s"),
    ])
    .await;
    let (ws, token, file, _) = one_staged_file(&svc, 8 << 20).await;
    let in_progress = "pending_uploads_downloads_in_progress";

    // 1 KiB every 100 ms: never idle, far under 64 KiB/s.
    let mut trickle = stalled_download(&svc, ws, &token, file).await;
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        let mut taken = 0;
        loop {
            match trickle.read(&mut buf).await {
                Ok(0) | Err(_) => return taken,
                Ok(n) => taken += n,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    wait_for_metric(&svc.base, in_progress, 1.0).await;
    wait_for_metric(
        &svc.base,
        "pending_uploads_responses_cut_total{reason=\"too_slow\"}",
        1.0,
    )
    .await;
    wait_for_metric(&svc.base, in_progress, 0.0).await;
    assert!(
        !reader.is_finished(),
        "the slot came back while the trickle still reads"
    );
    reader.abort();

    // Through the same 4 KiB receive buffer, a read every 10 ms keeps up (~400 KiB/s, six
    // times the bound, so a loaded machine's late wake-ups do not matter) over seconds of
    // waiting.
    let (file, data) = stage_file(&svc, ws, &token, 1 << 20).await;
    let mut steady = stalled_download(&svc, ws, &token, file).await;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    let body_at = loop {
        let n = steady.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "the steady reader was cut off after {} bytes",
            got.len()
        );
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got[..body_at])
    );
    while got.len() - body_at < data.len() {
        let n = steady.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "the steady reader was cut off after {} bytes",
            got.len() - body_at
        );
        got.extend_from_slice(&buf[..n]);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        got[body_at..] == data[..],
        "the steady reader got the file whole"
    );
    let metrics = scrape_metrics(&svc.base).await;
    assert_eq!(
        metric_value(
            &metrics,
            "pending_uploads_responses_cut_total{reason=\"too_slow\"}"
        ),
        Some(1.0),
        "only the trickle was cut"
    );

    // Waiting on the service is not waiting on the client: a long poll outlasts the window.
    let client = reqwest::Client::new();
    let feed = client.get(svc.at(&format!("/workspaces/{ws}/activity")));
    let feed: Vec<Value> = feed
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let newest = feed[0]["id"].as_str().unwrap();
    let started = Instant::now();
    let resp = client
        .get(svc.at(&format!(
            "/workspaces/{ws}/activity?since_id={newest}&wait=2"
        )))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.bytes().await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(2), "it waited");
}

/// A download whose client takes nothing at all is cut after RESPONSE_IDLE_TIMEOUT (also with
/// the rate rule off), and its slot comes back.
#[tokio::test]
async fn a_download_never_read_is_cut_after_the_idle_timeout() {
    let svc = Svc::start(&[
        ("MAX_CONCURRENT_DOWNLOADS_PER_WORKSPACE", "1"),
        ("RESPONSE_MIN_RATE", "0"),
        ("RESPONSE_IDLE_TIMEOUT", "1s"),
    ])
    .await;
    let (ws, token, file, data) = one_staged_file(&svc, 8 << 20).await;
    let in_progress = "pending_uploads_downloads_in_progress";
    let started = Instant::now();
    let held = stalled_download(&svc, ws, &token, file).await;
    wait_for_metric(&svc.base, in_progress, 1.0).await;
    wait_for_metric(
        &svc.base,
        "pending_uploads_responses_cut_total{reason=\"idle\"}",
        1.0,
    )
    .await;
    wait_for_metric(&svc.base, in_progress, 0.0).await;
    assert!(started.elapsed() >= Duration::from_secs(1));
    drop(held);
    let resp = reqwest::Client::new()
        .get(svc.at(&format!("/workspaces/{ws}/pending-uploads/{file}/content")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.bytes().await.unwrap() == data,
        "the file whole after the cut"
    );
}

#[tokio::test]
async fn huge_part_headers_and_preambles_are_refused_without_buffering_them() {
    let svc = Svc::start(&[]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let before = svc.peak_rss_kib();
    let forty_mib = 40 * 1024 * 1024;
    // A part header line of 40 MiB.
    let mut body =
        b"--XB\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.txt\"\r\nX-Pad: "
            .to_vec();
    body.extend(std::iter::repeat_n(b'h', forty_mib));
    body.extend_from_slice(b"\r\n\r\ndata\r\n--XB--\r\n");
    let resp = upload_raw(&svc, ws, &token, body).await;
    assert_error(resp, StatusCode::BAD_REQUEST, "malformed multipart body").await;
    // A preamble of 40 MiB.
    let mut body = vec![b'p'; forty_mib];
    body.extend(one_file("XB", "a.txt", b"data"));
    let resp = upload_raw(&svc, ws, &token, body).await;
    assert_error(resp, StatusCode::BAD_REQUEST, "malformed multipart body").await;
    // Non-file fields are drained, not kept, and bounded (1 MiB in all).
    let mut body = b"--XB\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\n".to_vec();
    body.extend(vec![b'n'; 2 * 1024 * 1024]);
    body.extend_from_slice(b"\r\n");
    body.extend(one_file("XB", "a.txt", b"data"));
    let resp = upload_raw(&svc, ws, &token, body).await;
    assert_error(resp, StatusCode::BAD_REQUEST, "malformed multipart body").await;
    let grown = svc.peak_rss_kib().saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "peak RSS grew {grown} KiB: a header was buffered"
    );
    assert_eq!(svc.count("pending_uploads").await, 0);
    // A long mimetype is neutralized, not stored and served back.
    let long_type = format!("text/{}", "x".repeat(300));
    let body = format!(
        "--XB\r\nContent-Disposition: form-data; name=\"files\"; filename=\"t.txt\"\r\nContent-Type: {long_type}\r\n\r\nhello\r\n--XB--\r\n"
    );
    let resp = upload_raw(&svc, ws, &token, body.into_bytes()).await;
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["files"][0]["mimeType"], "application/octet-stream");
}

/// An upload refused before its body, by a Content-Length over MAX_REQUEST_BYTES or for its
/// workspace's upload slots, wrote no line and was not counted, as every refusal after it is
/// (SPEC §8; an audit: the same body sent chunked was).
#[tokio::test]
async fn an_upload_refused_before_its_body_is_logged_and_counted() {
    let svc = Svc::start(&[
        ("MAX_REQUEST_BYTES", "1000"),
        ("MAX_CONCURRENT_UPLOADS_PER_WORKSPACE", "1"),
    ])
    .await;
    let (ws, token) = register_poll(&svc.base).await;
    let resp = upload_raw(&svc, ws, &token, one_file("XB", "big.bin", &[b'b'; 2000])).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // One upload holds the workspace's slot, its body half sent.
    let body = one_file("XB", "held.bin", &[b'h'; 500]);
    let mut held = TcpStream::connect(&svc.addr).await.unwrap();
    let head = upload_head(&svc, ws, &token, body.len());
    held.write_all(head.as_bytes()).await.unwrap();
    held.write_all(&body[..100]).await.unwrap();
    wait_for_metric(&svc.base, "pending_uploads_uploads_in_progress", 1.0).await;
    let resp = upload_raw(&svc, ws, &token, one_file("XB", "second.bin", b"two")).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let metrics = scrape_metrics(&svc.base).await;
    let rejected = r#"pending_uploads_files_staged_total{backend="bytea",outcome="rejected"}"#;
    assert_eq!(metric_value(&metrics, rejected), Some(2.0), "{metrics}");
    drop(held);
    let mut svc = svc;
    let out = svc.running.terminate().await;
    let log = String::from_utf8_lossy(&out.stderr);
    let statuses: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "upload rejected")
        .map(|l| l["status"].clone())
        .collect();
    assert_eq!(statuses[..2], [json!(413), json!(429)], "{log}");
}

/// A refused request costs its client nothing and wrote a line: a flood of them wrote as
/// fast as they came (a resource probe: 492,097 lines, 120 MB, from one client in two
/// minutes). One log statement now writes at most LOG_LINES_PER_SECOND lines a second; the
/// rest are counted and summed up in a line a second.
#[tokio::test]
async fn a_flood_of_refused_requests_cannot_flood_the_log() {
    let svc = Svc::start(&[("LOG_LINES_PER_SECOND", "5")]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let started = Instant::now();
    for _ in 0..60 {
        let resp = upload_raw(&svc, ws, &token, b"not multipart at all".to_vec()).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    }
    let secs = started.elapsed().as_secs();
    // The line a second that sums up the drops.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics = scrape_metrics(&svc.base).await;
    let dropped = metric_value(&metrics, "pending_uploads_log_lines_dropped_total").unwrap_or(0.0);
    let mut svc = svc;
    let out = svc.running.terminate().await;
    let log = String::from_utf8_lossy(&out.stderr);
    let rejected = log.matches("upload rejected").count() as u64;
    // A second's lines: the shared 5, then the workspace's 5 of the fair pool.
    assert!(
        rejected <= 2 * 5 * (secs + 2),
        "{rejected} lines in {secs} s with 5 a second"
    );
    assert!(rejected >= 5, "the first five were written");
    assert!(dropped >= 60.0 - rejected as f64, "{dropped} counted");
    let summary = log
        .lines()
        .find(|l| l.contains("log lines dropped"))
        .unwrap_or_else(|| panic!("{log}"));
    // It says which statement: the rejected uploads' line, in src/http/.
    assert!(summary.contains("src/http/"), "{summary}");
}

/// Behind a load balancer every pooled connection soon carried an upload: a TRUSTED_PROXIES
/// peer's connections are kept alive whatever their buffers (the diff's review: past the
/// bound, the proxy's long polls would all have answered at once).
#[tokio::test]
async fn a_proxys_grown_connections_are_kept_alive() {
    let svc = Svc::start(&[
        ("MAX_LARGE_BUFFER_CONNECTIONS", "0"),
        ("TRUSTED_PROXIES", "127.0.0.0/8"),
    ])
    .await;
    let (mut sock, answer) = a_grown_connection(&svc).await;
    assert!(!answer.contains("Connection: close"), "{answer}");
    sock.write_all(GET_HEALTHZ).await.unwrap();
    assert!(read_answer(&mut sock).await.starts_with("HTTP/1.1 200"));
}

/// A refusal decided from the head alone of a request whose declared body is longer than a
/// drain may read waited out the drain's deadline: a 413 for a 200 MB upload came after 5 s,
/// with 25 MB sent meanwhile (a red team). It is answered at once, and the connection closes.
#[tokio::test]
async fn a_refusal_of_a_body_too_long_to_drain_is_answered_at_once() {
    let svc = Svc::start(&[]).await;
    let (ws, token) = register_poll(&svc.base).await;
    for bearer in [token.as_str(), "wrong"] {
        let mut sock = TcpStream::connect(&svc.addr).await.unwrap();
        let head = format!(
            "POST /workspaces/{ws}/chat/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bearer}\r\n\
             Content-Type: multipart/form-data; boundary=XB\r\nContent-Length: 200000000\r\n\r\n"
        );
        let started = Instant::now();
        sock.write_all(head.as_bytes()).await.unwrap();
        let answer = answer_on(&mut sock, 10, "answered and closed").await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let status = if bearer == "wrong" { "401" } else { "413" };
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
        assert!(answer.contains("\r\nConnection: close\r\n"), "{answer}");
    }
}

/// Registration had a rate and no total: each first registration adds rows nothing removes
/// (~3.6 KB with the longest name and URL), ~3 GB a replica a day at the default rate, for
/// ever (a red team). Past MAX_WORKSPACES a first registration without a claim is refused
/// before it spends any rate; the admin's, and a workspace's own, still work.
#[tokio::test]
async fn the_registry_holds_at_most_max_workspaces_strangers_can_create() {
    let svc = Svc::start(&[("MAX_WORKSPACES", "3"), ("SWEEP_INTERVAL", "1s")]).await;
    let client = reqwest::Client::new();
    let mut tokens = Vec::new();
    for _ in 0..3 {
        tokens.push(register_poll(&svc.base).await);
    }
    let resp = register(&client, &svc, None, &json!({"id": Uuid::new_v4()})).await;
    assert_eq!(resp.headers()["retry-after"], "60");
    assert_json(
        resp,
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "workspace registry full — retry later", "code": "registry_full"}),
    )
    .await;
    assert_eq!(svc.count("workspaces").await, 3);
    // A stranger's re-registration of an existing workspace is still the 401 it was.
    let resp = register(&client, &svc, None, &json!({"id": tokens[1].0})).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // The admin's registration and creation, and a workspace's own re-registration.
    let resp = register(&client, &svc, Some(ADMIN), &json!({"id": Uuid::new_v4()})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = admin_create(&svc, json!({"name": "by the platform"})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let (ws, token) = &tokens[0];
    let resp = register(
        &client,
        &svc,
        Some(token),
        &json!({"id": ws, "delivery_mode": "poll"}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(svc.count("workspaces").await, 5);
    // One line when refusals start (read after a sweep pass), not one per refusal.
    for _ in 0..5 {
        let resp = register(&client, &svc, None, &json!({"id": Uuid::new_v4()})).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut svc = svc;
    let out = svc.running.terminate().await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        log.matches("\"event\":\"registry_full\"").count(),
        1,
        "{log}"
    );
    assert!(!log.contains("request failed"), "{log}");
}

/// The admin's `POST /workspaces` was left out of the replica's count: strangers passed
/// MAX_WORKSPACES by as many workspaces as the admin created between two readings (an audit).
#[tokio::test]
async fn workspaces_the_admin_creates_count_against_max_workspaces() {
    let svc = Svc::start(&[("MAX_WORKSPACES", "3")]).await;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let resp = admin_create(&svc, json!({"name": "by the platform"})).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let resp = register(&client, &svc, None, &json!({"id": Uuid::new_v4()})).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(svc.count("workspaces").await, 3);
}

/// MAX_WORKSPACES was read before a registration's transaction and counted after its commit:
/// 30 first registrations at once all passed a bound of 3 (a red team). Each takes its place
/// before its transaction now, and one that creates nothing gives it back.
#[tokio::test]
async fn first_registrations_at_once_do_not_pass_max_workspaces() {
    let svc = Svc::start(&[
        ("MAX_WORKSPACES", "3"),
        ("REGISTRATIONS_PER_MINUTE", "1000"),
        ("REGISTRATIONS_PER_MINUTE_PER_CLIENT", "1000"),
    ])
    .await;
    let client = reqwest::Client::new();
    let (ws, _) = register_poll(&svc.base).await;
    // Strangers' re-registrations of it: each takes a place, is refused 401, gives it back.
    let again = json!({"id": ws});
    let answers =
        futures::future::join_all((0..10).map(|_| register(&client, &svc, None, &again))).await;
    assert!(answers
        .iter()
        .all(|r| r.status() == StatusCode::UNAUTHORIZED));
    let new: Vec<Value> = (0..30).map(|_| json!({"id": Uuid::new_v4()})).collect();
    let answers =
        futures::future::join_all(new.iter().map(|b| register(&client, &svc, None, b))).await;
    let statuses: Vec<StatusCode> = answers.iter().map(|r| r.status()).collect();
    let created = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let full = statuses
        .iter()
        .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    assert_eq!((created, full), (2, 28), "{statuses:?}");
    assert_eq!(svc.count("workspaces").await, 3);
    let resp = register(&client, &svc, Some(ADMIN), &json!({"id": Uuid::new_v4()})).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

/// The budget was one per statement for everyone: one workspace re-fetching its own file
/// 5,600 times a second took every `upload served` line, and another's downloads went
/// unlogged (9 of 50 written; a red team), state transitions SPEC §8 wants. Each workspace's
/// first five lines of a statement a second now come from a second pool, as large.
#[tokio::test]
async fn one_workspaces_flood_does_not_silence_anothers_transitions() {
    let svc = Arc::new(Svc::start(&[("LOG_LINES_PER_SECOND", "20")]).await);
    let (loud, loud_token) = register_poll(&svc.base).await;
    let (quiet, quiet_token) = register_poll(&svc.base).await;
    let (loud_file, _) = stage_file(&svc, loud, &loud_token, 10).await;
    let (quiet_file, _) = stage_file(&svc, quiet, &quiet_token, 10).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let flood: Vec<_> = (0..16)
        .map(|_| {
            let (svc, token, stop) = (svc.clone(), loud_token.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    download(&svc, loud, &token, loud_file).await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Four a second: within its five.
    for _ in 0..10 {
        download(&svc, quiet, &quiet_token, quiet_file).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut flooded = 0;
    for task in flood {
        flooded += task.await.unwrap();
    }
    let secs = started.elapsed().as_secs();
    let mut svc = Arc::into_inner(svc).unwrap();
    let out = svc.running.terminate().await;
    let lines = log_lines(&out.stderr);
    let served = |ws: Uuid| {
        lines
            .iter()
            .filter(|l| l["message"] == "upload served" && l["workspace_id"] == ws.to_string())
            .count() as u64
    };
    assert!(flooded > 200, "{flooded} downloads: no flood");
    assert_eq!(served(quiet), 10, "the quiet workspace's every download");
    let loud_lines = served(loud);
    assert!(
        loud_lines <= 25 * (secs + 2),
        "{loud_lines} of {flooded} in {secs} s with 20 a second"
    );
}

#[tokio::test]
async fn hostile_methods_and_filenames_cannot_bloat_metrics_or_logs() {
    let svc = Svc::start(&[]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let client = reqwest::Client::new();
    for i in 0..150 {
        let method = Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
        let _ = client
            .request(method, svc.at("/healthz"))
            .send()
            .await
            .unwrap();
    }
    let text = scrape_metrics(&svc.base).await;
    assert!(!text.contains("MADEUP"), "a made-up method became a label");
    assert!(text.contains(r#"method="other""#));
    let series = text
        .lines()
        .filter(|l| l.starts_with("pending_uploads_http_request_duration_seconds_count"))
        .count();
    assert!(series < 20, "{series} latency series");
    // A 7,000-character filename (under the 8 KiB part-header bound) is logged clipped.
    let long_name = format!("{}.txt", "n".repeat(7000));
    let resp = upload_file(&svc, ws, &token, &long_name, b"x").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut svc = svc;
    let out = svc.running.terminate().await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let longest = stderr.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2000, "a {longest}-byte log line");
    assert!(
        stderr.contains("…(+"),
        "the original name was clipped, not dropped"
    );
}

/// The text log (the default format) is read on terminals and by line-based tools: a client's
/// string in it (an upload's original filename, a refused push URL) must not end its line
/// and start a forged one, nor carry terminal escapes. The JSON format escapes by itself.
#[tokio::test]
async fn client_strings_cannot_forge_text_log_lines_or_reach_the_terminal() {
    let svc = Svc::start(&[("LOG_FORMAT", "text"), ("RUST_LOG", "info")]).await;
    let forged = "2026-12-05T00:00:00.000000Z  WARN pending_uploads::auth: admin token accepted";
    // Unauthenticated: a first registration whose URL is refused is logged with the URL.
    let resp = register(
        &reqwest::Client::new(),
        &svc,
        None,
        &json!({"id": Uuid::new_v4(), "url": format!("http://10.0.0.1/a\r\n{forged} url\u{1b}[2J\u{1b}[31m")}),
    )
    .await;
    assert_error(resp, StatusCode::BAD_REQUEST, "workspace URL not allowed").await;
    // An upload's original name (RFC 5987 `filename*`, so any byte can be sent) is logged.
    let (ws, token) = register_poll(&svc.base).await;
    let name = format!(
        "a.txt%0A{}%20name%1B%5B2J%E2%80%AE",
        forged.replace(' ', "%20")
    );
    let body = format!(
        "--XB\r\nContent-Disposition: form-data; name=\"files\"; filename*=UTF-8''{name}\r\n\r\nhi\r\n--XB--\r\n"
    );
    let resp = upload_raw(&svc, ws, &token, body.into_bytes()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // Fields of its own: a plain name with spaces and `=` was written unquoted, so a logfmt
    // parser (or a grep for event=acked) read a second event (a black-box probe).
    let spoof =
        "x event=acked file_id=00000000-0000-0000-0000-000000000000 size=999 name=spoof.txt";
    let resp = upload_file(&svc, ws, &token, spoof, b"hi").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut svc = svc;
    let out = svc.running.terminate().await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("push URL refused at registration") && log.contains("upload staged"),
        "both strings were logged: {log}"
    );
    let staged: Vec<&str> = log.lines().filter(|l| l.contains("spoof.txt")).collect();
    assert!(!staged.is_empty(), "the spoof upload was logged: {log}");
    for line in staged {
        let fields = unquoted(line);
        assert_eq!(fields.matches("event=").count(), 1, "{line}");
        assert!(!fields.contains("size=999"), "{line}");
    }
    for line in log.lines() {
        assert!(
            line.starts_with("20"),
            "a line that is not one of the service's own: {line:?}"
        );
        assert!(
            !line.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "a control character reached the log: {line:?}"
        );
    }
    assert_eq!(
        log.matches("admin token accepted").count(),
        2,
        "both strings are in the log, escaped, on their own lines: {log}"
    );
}

/// A text log line without its quoted values (`"…"`, with `\"` and `\\` inside): what a logfmt
/// parser reads as keys and bare values.
fn unquoted(line: &str) -> String {
    let (mut out, mut quoted, mut escaped) = (String::new(), false, false);
    for c in line.chars() {
        match (quoted, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (_, false, '"') => quoted = !quoted,
            (true, false, _) => {}
            (false, _, c) => out.push(c),
        }
    }
    out
}

/// Registration is unauthenticated and a URL may be 2048 bytes (it could fill the 64 KiB JSON
/// body before that bound): when its push fails, the log line must not carry it whole
/// (reqwest's error text quotes the URL).
#[tokio::test]
async fn a_huge_push_url_that_fails_is_logged_clipped() {
    let svc = Svc::start(&[("PUSH_ALLOWED_NETWORKS", "127.0.0.0/8")]).await;
    // Port 9 (discard): nothing listens, so the connection is refused.
    let url = format!("http://127.0.0.1:9/{}", "a".repeat(2048 - 19));
    assert_eq!(url.len(), 2048);
    let ws = Uuid::new_v4();
    let resp = register(
        &reqwest::Client::new(),
        &svc,
        None,
        &json!({"id": ws, "url": url}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let token = resp.json::<Value>().await.unwrap()["auth_token"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = upload_file(&svc, ws, &token, "a.txt", b"hi").await;
    assert_error(resp, StatusCode::BAD_GATEWAY, "workspace unreachable").await;
    let mut svc = svc;
    let out = svc.running.terminate().await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("push delivery failed"),
        "the failure was logged"
    );
    let longest = stderr.lines().map(str::len).max().unwrap_or(0);
    assert!(
        longest < 2000,
        "a {longest}-byte log line: the URL was not clipped"
    );
    // The URL in a key of its own: as `target` it was a second key beside the module's, and a
    // JSON reader kept the module's.
    let failed = log_lines(&out.stderr)
        .into_iter()
        .find(|l| l["message"] == "push delivery failed")
        .expect("a JSON line");
    let logged = failed["url"].as_str().unwrap_or_default();
    assert!(logged.starts_with("http://127.0.0.1:9/aaaa"), "{failed}");
    assert!(logged.len() < 400, "{failed}");
}

#[tokio::test]
async fn ten_thousand_and_one_files_hit_the_file_quota() {
    // Quiet: 10,000 "staged" lines would fill the stderr pipe nobody reads until the end.
    let svc = Svc::start(&[("RUST_LOG", "warn")]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let batch = |n: usize| {
        let mut body = Vec::new();
        for i in 0..n {
            body.extend(
                format!("--XB\r\nContent-Disposition: form-data; name=\"files\"; filename=\"f{i}\"\r\n\r\nz\r\n").as_bytes(),
            );
        }
        body.extend_from_slice(b"--XB--\r\n");
        body
    };
    for _ in 0..156 {
        let resp = upload_raw(&svc, ws, &token, batch(64)).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let resp = upload_raw(&svc, ws, &token, batch(16)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(svc.count("pending_uploads").await, 10_000);
    let resp = upload_raw(&svc, ws, &token, batch(1)).await;
    assert_eq!(resp.headers()["retry-after"], "60");
    assert_json(
        resp,
        StatusCode::TOO_MANY_REQUESTS,
        json!({"error": "workspace pending-upload quota exceeded", "pending_files": 10000, "max": 10000, "max_files": 10000}),
    )
    .await;
    assert_eq!(svc.count("pending_uploads").await, 10_000, "stores nothing");
    // Acking frees quota.
    let fid: Uuid = sqlx::query_scalar("SELECT file_id FROM pending_uploads LIMIT 1")
        .fetch_one(&svc.pool)
        .await
        .unwrap();
    let resp = ack_file(&svc, ws, &token, fid).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        upload_raw(&svc, ws, &token, batch(1)).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn old_upload_activity_rows_are_swept_and_their_cursor_is_gone() {
    // The service's own sweeper (its first pass runs at start-up) must not take the row
    // before the `sweep` command below does: it keeps activity rows for 30 days.
    let svc = Svc::start(&[("ACTIVITY_RETENTION", "30d")]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let resp = upload_file(&svc, ws, &token, "a.txt", b"a").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let client = reqwest::Client::new();
    let activity = |query: String| {
        client
            .get(svc.at(&format!("/workspaces/{ws}/activity?{query}")))
            .bearer_auth(&token)
            .send()
    };
    let resp = activity("type=a2a_receive".into()).await.unwrap();
    let rows: Vec<Value> = resp.json().await.unwrap();
    let cursor = rows[0]["id"].as_str().unwrap().to_string();
    // Someone else's activity row, just as old, is not ours to remove.
    sqlx::query("INSERT INTO activity_logs (workspace_id, activity_type, method) VALUES ($1, 'a2a_send', 'message/send')")
        .bind(ws)
        .execute(&svc.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE activity_logs SET created_at = now() - interval '8 days'")
        .execute(&svc.pool)
        .await
        .unwrap();
    let out = run_ok(bin_command(&svc.db).arg("sweep"));
    assert_eq!(stdout_json(&out)["activity_rows_deleted"], 1);
    let methods: Vec<String> = sqlx::query_scalar("SELECT method FROM activity_logs")
        .fetch_all(&svc.pool)
        .await
        .unwrap();
    assert_eq!(methods, ["message/send"]);
    let resp = activity(format!("since_id={cursor}")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::GONE);
}

#[tokio::test]
async fn out_of_range_positions_and_framework_rejections() {
    let svc = Svc::start(&[]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let resp = upload_file(&svc, ws, &token, "r.txt", b"0123456789").await;
    let v: Value = resp.json().await.unwrap();
    let fid = file_id(&v["files"][0]);
    let client = reqwest::Client::new();
    let get = |range: &str| {
        client
            .get(svc.at(&format!("/workspaces/{ws}/pending-uploads/{fid}/content")))
            .bearer_auth(&token)
            .header("Range", range)
            .send()
    };
    let resp = get("bytes=5-123456789012345678901").await.unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(resp.headers()["content-range"], "bytes 5-9/10");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"56789");
    let resp = get("bytes=123456789012345678901-").await.unwrap();
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(resp.headers()["content-range"], "bytes */10");

    // Rejections from the framework answer JSON like every other error.
    let resp = client
        .get(svc.at("/workspaces/%FF%FE/activity"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.headers()["content-type"], "application/json");
    // A bad encoding is reported as the parameter it is in (before: every one of them was
    // `invalid workspace ID`, whichever segment held it), in the same order as any other bad
    // id (after the caller check where the route makes one first).
    for (method, path, bearer, want) in [
        (
            "GET",
            format!("/workspaces/%FF%FE/pending-uploads/{fid}/content"),
            token.as_str(),
            (400, "invalid workspace ID"),
        ),
        (
            "GET",
            format!("/workspaces/{ws}/pending-uploads/%FF/content"),
            token.as_str(),
            (400, "invalid file_id"),
        ),
        (
            "POST",
            format!("/workspaces/{ws}/pending-uploads/%FF/ack"),
            token.as_str(),
            (400, "invalid file_id"),
        ),
        (
            "DELETE",
            format!("/workspaces/{ws}/tokens/%FF"),
            "made-up",
            (401, "invalid workspace auth token"),
        ),
        (
            "DELETE",
            format!("/workspaces/{ws}/tokens/%FF"),
            token.as_str(),
            (400, "invalid token ID"),
        ),
        (
            "GET",
            format!("/workspaces/{ws}/pending-uploads/%E2%82%AC/content"),
            token.as_str(),
            (400, "invalid file_id"),
        ),
    ] {
        let resp = client
            .request(method.parse().unwrap(), svc.at(&path))
            .bearer_auth(bearer)
            .send()
            .await
            .unwrap();
        let (status, text) = want;
        assert_eq!(resp.status().as_u16(), status, "{method} {path}");
        assert_error(resp, StatusCode::from_u16(status).unwrap(), text).await;
    }
    let resp = client.put(svc.at("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(resp.headers().contains_key("allow"));
    assert_error(resp, StatusCode::METHOD_NOT_ALLOWED, "method not allowed").await;
    let big = format!(
        r#"{{"id":"{}","agent_card":{{"name":"{}"}}}}"#,
        Uuid::new_v4(),
        "x".repeat(2_000_000)
    );
    let resp = client
        .post(svc.at("/registry/register"))
        .header("Content-Type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_json(
        resp,
        StatusCode::PAYLOAD_TOO_LARGE,
        json!({"error": "JSON body exceeds 65536 bytes", "max": 65536}),
    )
    .await;
    assert_eq!(svc.count("workspaces").await, 1);
}

#[tokio::test]
async fn orphan_reconciliation_never_reaches_outside_a_private_prefix() {
    let (endpoint, bucket) = s3_endpoint();
    let db = fresh_db().await;
    // Another application's object in the shared bucket, old enough to look orphaned.
    let foreign = format!("other-app-{}/keep.bin", Uuid::new_v4().simple());
    let aws = s3_client(&endpoint);
    aws.put_object()
        .bucket(&bucket)
        .key(&foreign)
        .body(b"not yours".to_vec().into())
        .send()
        .await
        .unwrap();
    for prefix in ["", "other-app"] {
        let out = run_ok(
            bin_command(&db)
                .arg("sweep")
                .env("PENDING_UPLOADS_S3_BUCKET", &bucket)
                .env("PENDING_UPLOADS_S3_PREFIX", prefix)
                .env("AWS_ENDPOINT_URL", &endpoint)
                .env("AWS_REGION", "us-east-1")
                .env("ORPHAN_GRACE", "0"),
        );
        assert_eq!(stdout_json(&out)["orphans_deleted"], 0, "prefix {prefix:?}");
        let logged = String::from_utf8_lossy(&out.stderr);
        assert!(
            logged.contains("orphan reconciliation will not run"),
            "{logged}"
        );
    }
    let still = aws.head_object().bucket(&bucket).key(&foreign).send().await;
    assert!(still.is_ok(), "the other application's object survived");
    aws.delete_object()
        .bucket(&bucket)
        .key(&foreign)
        .send()
        .await
        .unwrap();
}

/// Every file of an upload that went to disk had an unnamed temp file of its own, open until
/// the commit: 64 files a request, and 16 such uploads from one client held 1,040
/// descriptors, where the open-file check counted two an upload — a red team ran a replica
/// out of them well below MAX_CONNECTIONS, and accepts failed. A request's files now share
/// one temp file, each in a region of its own: here 64 files held in flight keep one spool
/// descriptor, and every file comes back byte for byte.
#[tokio::test]
async fn a_request_of_many_files_holds_one_spool_file() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("spool");
    std::fs::create_dir(&dir).unwrap();
    let svc = Svc::start(&[
        ("SPOOL_DIR", dir.to_str().unwrap()),
        ("SPOOL_MEMORY_PER_REQUEST", "65536"),
    ])
    .await;
    let (ws, token) = register_poll(&svc.base).await;
    let pid = svc.pid().to_string();
    let open = sixty_four_files_held(&svc.addr, ws, &token, &pid, &dir).await;
    assert_eq!(open, 1, "spool files open for one request");
    assert_eq!(files_open_in(&pid, &dir), 0, "the spool file closed");
}

/// SPEC §8: every upload ends in one line. One whose client went before its answer ended in
/// none: hyper drops the request's future when it reads the client's close (or half-close)
/// after the body, and the handler logged both a refusal and a failed commit (a red team:
/// uploads closed after their last byte, 0 lines; some were staged, most not). A commit that
/// fails after its client went now says so itself, and an upload dropped before its commit
/// says it was abandoned: each of 20 uploads closed after their last byte has one line.
#[tokio::test]
async fn an_upload_whose_client_went_still_says_how_it_ended() {
    let in_progress = "pending_uploads_uploads_in_progress";
    let mut svc = Svc::start(&[("DEPENDENCY_TIMEOUT", "2s")]).await;
    // An upload sent whole, its last byte once its slot is taken (the caller checked);
    // the socket, for the caller to close.
    let send = |ws: Uuid, token: String, name: String| {
        let (svc, addr) = (&svc, svc.addr.clone());
        async move {
            let body = one_file("XB", &name, name.as_bytes());
            let mut sock = TcpStream::connect(&addr).await.unwrap();
            let head = upload_head(svc, ws, &token, body.len());
            let (most, last) = body.split_at(body.len() - 1);
            sock.write_all(&[head.as_bytes(), most].concat())
                .await
                .unwrap();
            wait_for_metric(&svc.base, in_progress, 1.0).await;
            sock.write_all(last).await.unwrap();
            sock
        }
    };
    // Its commit waits on the workspace's lock past the wait's bound (1 s) while its client
    // is gone.
    let (ws, token) = register_poll(&svc.base).await;
    let lock = hold_workspace_lock(&svc.pool, ws).await;
    let sock = send(ws, token.clone(), "gone.txt".into()).await;
    let pool = svc.pool.clone();
    eventually(
        "the commit waits on the lock",
        Duration::from_secs(10),
        || {
            let pool = pool.clone();
            async move {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
                 WHERE d.datname = current_database() AND l.locktype = 'advisory' \
                 AND NOT l.granted",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                waiting > 0
            }
        },
    )
    .await;
    drop(sock);
    wait_for_metric(&svc.base, in_progress, 0.0).await;
    lock.release().await;
    assert_eq!(svc.count("pending_uploads").await, 0);

    let (other, other_token) = register_poll(&svc.base).await;
    for i in 0..20 {
        let sock = send(other, other_token.clone(), format!("f{i}.txt")).await;
        drop(sock);
        wait_for_metric(&svc.base, in_progress, 0.0).await;
    }
    let staged = svc.count("pending_uploads").await;
    let out = svc.running.terminate().await;
    let lines = log_lines(&out.stderr);
    let of = |ws: Uuid| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| l["workspace_id"] == ws.to_string() && l["event"].is_string())
            .collect()
    };
    let gone: Vec<&Value> = of(ws);
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert_eq!(gone[0]["message"], "upload not staged");
    assert_eq!(gone[0]["event"], "failed");
    assert_eq!(gone[0]["name"], "gone.txt");
    let ended = of(other);
    assert_eq!(ended.len(), 20, "one line each: {ended:?}");
    let staged_lines = ended.iter().filter(|l| l["event"] == "staged").count();
    assert_eq!(staged_lines as i64, staged, "{ended:?}");
    for line in ended.iter().filter(|l| l["event"] != "staged") {
        assert_eq!(line["message"], "upload abandoned", "{line}");
    }
}

/// A statement the service gave up on (its DEPENDENCY_TIMEOUT) ends on the server too. Before,
/// an ack waiting on a row lock another writer held (an operator's open transaction, a
/// platform's) was answered 503 after its deadline, its connection closed, but its backend
/// waited on until the lock freed and then stamped the file acked: every retry left one
/// more waiting backend, toward the server's max_connections, for everyone. The server now
/// checks that its client is still there (client_connection_check_interval, PostgreSQL 14+).
#[tokio::test]
async fn a_statement_given_up_on_ends_on_the_server() {
    let svc = Svc::start(&[("DEPENDENCY_TIMEOUT", "1s")]).await;
    let (ws, token) = register_poll(&svc.base).await;
    let (fid, _) = stage_file(&svc, ws, &token, 100).await;
    let mut holder = svc.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM pending_uploads WHERE file_id = $1 FOR UPDATE")
        .bind(fid)
        .execute(&mut *holder)
        .await
        .unwrap();
    let resp = ack_file(&svc, ws, &token, fid).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let waiting = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&svc.pool)
        .await
        .unwrap()
    };
    let started = Instant::now();
    while waiting().await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the ack's backend still waits on the lock"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    holder.commit().await.unwrap();
    let acked: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT acked_at FROM pending_uploads WHERE file_id = $1")
            .bind(fid)
            .fetch_one(&svc.pool)
            .await
            .unwrap();
    assert_eq!(acked, None, "an ack answered 503 took effect after all");
}
