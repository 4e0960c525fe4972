//! The S3 backend against a real S3 server (LocalStack, then s3s-fs): every mode end to end,
//! the flag flips, S3 outages, backfill, contract, and object sweeping. Each test works under
//! its own key prefix and ends by proving no object leaked.

use std::{
    collections::BTreeSet,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use pending_uploads::{
    storage::{ByteRange, Location, StorageError},
    sweep::Sweeper,
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_pending-uploads");

fn zero_retention(app: &TestApp) -> Sweeper {
    Sweeper {
        ack_retention: Duration::ZERO,
        orphan_grace: Duration::from_secs(3600),
        ..app.sweeper.clone()
    }
}

/// Sweeps with zero ack retention until `rows` rows went, or 50 runs: (rows, objects deleted)
/// in all. A download stamps `fetched_at` in a task of its own after its response, and a sweep
/// leaves a row that such a stamp holds locked to its next run (SKIP LOCKED).
async fn sweep_acked(app: &TestApp, rows: u64) -> (u64, u64) {
    let sweeper = zero_retention(app);
    let mut swept = (0, 0);
    for _ in 0..50 {
        let stats = sweeper.run_once().await.unwrap();
        swept = (swept.0 + stats.rows, swept.1 + stats.objects_deleted);
        if swept.0 >= rows {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    swept
}

/// Expires every row and sweeps; the bucket prefix must end empty.
async fn sweep_all_and_assert_bucket_empty(app: &TestApp) {
    sqlx::query("UPDATE pending_uploads SET expires_at = now() - interval '1 second'")
        .execute(&app.pool)
        .await
        .unwrap();
    // A download's fetched_at stamp (batched, after the response) can hold a row locked for
    // a moment, and a sweep skips locked rows (SKIP LOCKED): sweep until none is left.
    for _ in 0..50 {
        let stats = zero_retention(app).run_once().await.unwrap();
        assert_eq!(stats.object_errors, 0);
        if app.count("pending_uploads").await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.count("pending_uploads").await, 0);
    assert_eq!(
        app.object_keys().await,
        Vec::<String>::new(),
        "no object leaked"
    );
}

async fn fetch(app: &TestApp, ws: Uuid, token: &str, fid: Uuid) -> reqwest::Response {
    app.get(
        &format!("/workspaces/{ws}/pending-uploads/{fid}/content"),
        token,
    )
    .await
}

async fn row_placement(app: &TestApp, fid: Uuid) -> (bool, Option<String>) {
    sqlx::query_as("SELECT content IS NOT NULL, s3_key FROM pending_uploads WHERE file_id = $1")
        .bind(fid)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn s3_and_dual_modes_end_to_end() {
    for mode in ["s3", "dual"] {
        let prefix = test_prefix();
        let app = TestApp::start_s3(fresh_db().await, mode, &prefix).await;
        let (ws, token) = app.poll_workspace().await;
        let big = bytes(3 * 1024 * 1024 + 7, 5);
        let out = app
            .upload_ok(
                ws,
                &token,
                &[
                    ("big.bin", "application/octet-stream", big.clone()),
                    ("s.txt", "text/plain", b"small".to_vec()),
                ],
            )
            .await;
        let fid = file_id(&out[0]);
        let (inline, key) = row_placement(&app, fid).await;
        assert_eq!(inline, mode == "dual", "{mode}: bytea copy only in dual");
        let key = key.expect("an object key");
        assert_eq!(
            key,
            format!("{prefix}{ws}/{fid}"),
            "namespaced by workspace, keyed by the random file id"
        );
        assert_eq!(app.object_keys().await.len(), 2);

        let resp = fetch(&app, ws, &token, fid).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()["etag"],
            format!("\"{}\"", hex::encode(Sha256::digest(&big))).as_str()
        );
        assert!(resp.bytes().await.unwrap() == big, "{mode}: byte-identical");
        let resp = app
            .client
            .get(app.at(&format!("/workspaces/{ws}/pending-uploads/{fid}/content")))
            .bearer_auth(&token)
            .header("Range", "bytes=1048570-2097160")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes 1048570-2097160/{}", big.len()).as_str()
        );
        assert!(
            resp.bytes().await.unwrap() == big[1_048_570..=2_097_160],
            "{mode}: ranged read from S3"
        );

        assert_eq!(
            app.post(
                &format!("/workspaces/{ws}/pending-uploads/{fid}/ack"),
                &token
            )
            .await
            .status(),
            StatusCode::OK
        );
        assert_eq!(
            sweep_acked(&app, 1).await,
            (1, 1),
            "{mode}: the acked row and its object"
        );
        assert_eq!(app.object_keys().await.len(), 1);
        sweep_all_and_assert_bucket_empty(&app).await;
    }
}

/// Every object carries its SHA-256 and the server checks it: a file held in memory, hashed
/// as it arrived, sends it as a header (`x-amz-checksum-sha256`, no CRC32 trailer); a file on
/// disk is hashed as the PUT reads it back, by the SDK into a trailer that the server echoes.
/// With `--s3-checksum when-required` nothing optional is sent and the service hashes the file
/// itself on the way. Either way the row records the digest of the bytes.
#[tokio::test]
async fn objects_are_put_with_their_sha256() {
    use base64::{engine::general_purpose::STANDARD, Engine};
    let (endpoint, bucket) = s3_endpoint();
    for checksum in ["when-supported", "when-required"] {
        let prefix = test_prefix();
        let mut flags = s3_flags("s3", &prefix, &endpoint);
        // This test sets it, whatever TEST_S3_CHECKSUM says (added last by `s3_flags`).
        if let Some(at) = flags.iter().position(|f| f == "--s3-checksum") {
            flags.truncate(at);
        }
        flags.extend(["--s3-checksum".to_string(), checksum.to_string()]);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let app = TestApp::start_on(fresh_db().await, &flags).await;
        let (ws, token) = app.poll_workspace().await;
        // One request each: the small one fits the request's spool memory, the big one not.
        let small = bytes(1000, 8);
        let big = bytes(2 * 1024 * 1024 + 5, 9);
        for (name, data) in [("small.bin", small), ("big.bin", big)] {
            let out = app
                .upload_ok(
                    ws,
                    &token,
                    &[(name, "application/octet-stream", data.clone())],
                )
                .await;
            let fid = file_id(&out[0]);
            let (_, key) = row_placement(&app, fid).await;
            let head = s3_client(&endpoint)
                .head_object()
                .bucket(&bucket)
                .key(key.unwrap())
                .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
                .send()
                .await
                .unwrap();
            let digest = Sha256::digest(&data);
            let sent = (checksum == "when-supported").then(|| STANDARD.encode(digest));
            assert_eq!(
                head.checksum_sha256(),
                sent.as_deref(),
                "{checksum}: {name}"
            );
            assert_eq!(
                head.checksum_crc32(),
                None,
                "no CRC32 of the SDK's own: {checksum}: {name}"
            );
            let (recorded,): (Vec<u8>,) =
                sqlx::query_as("SELECT content_sha256 FROM pending_uploads WHERE file_id = $1")
                    .bind(fid)
                    .fetch_one(&app.pool)
                    .await
                    .unwrap();
            assert_eq!(recorded, digest.to_vec(), "{checksum}: {name}");
        }
        sweep_all_and_assert_bucket_empty(&app).await;
    }
}

/// In S3 mode a row carries no bytes, so its statement gets `DEPENDENCY_TIMEOUT` whatever the
/// file's size: a database that does not answer it (here: the workspace's lock, held by the
/// test) costs a 30 MiB upload 2 s, not 2 s plus a second per MiB. The wait for the lock ends
/// in PostgreSQL at half that, with nothing written, so the object goes at once. (It used to
/// be cut on our side only: the statement then ran once the lock was free, a row for an
/// upload answered 503.)
#[tokio::test]
async fn an_s3_upload_waits_on_the_database_no_longer_than_the_dependency_timeout() {
    let (endpoint, _) = s3_endpoint();
    let app = s3_app_with_dependency_timeout(&endpoint, "2s").await;
    let (ws, token) = app.poll_workspace().await;
    let lock = hold_workspace_lock(&app.pool, ws).await;
    let started = std::time::Instant::now();
    let resp = app
        .upload(
            ws,
            &token,
            &[("big.bin", "application/octet-stream", bytes(30 << 20, 4))],
        )
        .await;
    let took = started.elapsed();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(took < Duration::from_secs(8), "503 after {took:?}");
    lock.release().await;
    let mut objects = app.object_keys().await;
    for _ in 0..100 {
        if objects.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        objects = app.object_keys().await;
    }
    assert_eq!(
        objects,
        Vec::<String>::new(),
        "the refused upload's object was removed"
    );
    assert_eq!(
        app.count("pending_uploads").await,
        0,
        "nothing committed later"
    );
    assert_eq!(app.count("activity_logs").await, 0);
}

/// A download asks S3 for no checksum. S3 sends none for a ranged GET, and every GET of ours
/// is one; a server that sends one anyway (LocalStack) had the SDK hash every byte it read
/// (0.7 ms of CPU per MiB), while the client checks the bytes against `ETag`/`Repr-Digest`.
#[tokio::test]
async fn downloads_ask_s3_for_no_checksum() {
    let (endpoint, _) = s3_endpoint();
    let (proxy, sent) = recording_proxy(&endpoint).await;
    let app = TestApp::start_s3_at(fresh_db().await, "s3", &test_prefix(), &proxy).await;
    let (ws, token) = app.poll_workspace().await;
    let data = bytes(300_000, 3);
    let out = app
        .upload_ok(
            ws,
            &token,
            &[("f.bin", "application/octet-stream", data.clone())],
        )
        .await;
    let resp = fetch(&app, ws, &token, file_id(&out[0])).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.bytes().await.unwrap() == data, "the bytes uploaded");
    let sent = String::from_utf8_lossy(&sent.lock().unwrap()).to_ascii_lowercase();
    assert!(
        sent.contains("\r\nrange: bytes=0-299999\r\n"),
        "the GET went through the proxy"
    );
    assert!(
        !sent.contains("x-amz-checksum-mode"),
        "a GET asked for the object's checksum"
    );
    sweep_all_and_assert_bucket_empty(&app).await;
}

/// What a test proxy does with each piece of a request it reads from a client, before it
/// passes the piece on to the server.
type ProxyHook = Arc<dyn Fn(&[u8]) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// A TCP proxy in front of `endpoint` that runs `hook` on every piece of every request, as it
/// goes over the wire; its URL.
async fn proxy(endpoint: &str, hook: ProxyHook) -> String {
    answering_proxy(endpoint, hook, Arc::new(|_| None)).await
}

/// What a test proxy answers itself to a piece of a request, instead of passing it on
/// (`None`: passed on); the connection is closed after the answer.
type ProxyAnswer = Arc<dyn Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync>;

/// [`proxy`], which answers the pieces `answer` answers itself.
async fn answering_proxy(endpoint: &str, hook: ProxyHook, answer: ProxyAnswer) -> String {
    let upstream = endpoint
        .strip_prefix("http://")
        .expect("an http:// endpoint")
        .trim_end_matches('/')
        .to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (upstream, hook, answer) = (upstream.clone(), hook.clone(), answer.clone());
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut from_client, to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let to_client = Arc::new(tokio::sync::Mutex::new(to_client));
                let answers = to_client.clone();
                let up = async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n @ 1..) = from_client.read(&mut buf).await {
                        hook(&buf[..n]).await;
                        if let Some(ours) = answer(&buf[..n]) {
                            let mut to_client = answers.lock().await;
                            let _ = to_client.write_all(&ours).await;
                            let _ = to_client.shutdown().await;
                            break;
                        }
                        if to_server.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = to_server.shutdown().await;
                };
                let down = async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                        if to_client.lock().await.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = to_client.lock().await.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    url
}

/// A proxy in front of `endpoint` that keeps every byte its clients send (the requests, as
/// they went over the wire); its URL and those bytes.
async fn recording_proxy(endpoint: &str) -> (String, Arc<Mutex<Vec<u8>>>) {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let kept = sent.clone();
    let hook: ProxyHook = Arc::new(move |piece: &[u8]| {
        kept.lock().unwrap().extend_from_slice(piece);
        Box::pin(async {})
    });
    (proxy(endpoint, hook).await, sent)
}

/// A proxy in front of `endpoint` that holds every DELETE until `true` is sent on the
/// returned sender; its URL, and a receiver that turns `true` when the first DELETE is held.
async fn delete_holding_proxy(
    endpoint: &str,
) -> (
    String,
    tokio::sync::watch::Receiver<bool>,
    tokio::sync::watch::Sender<bool>,
) {
    let (held_tx, held) = tokio::sync::watch::channel(false);
    let (release, released) = tokio::sync::watch::channel(false);
    let held_tx = Arc::new(held_tx);
    let hook: ProxyHook = Arc::new(move |piece: &[u8]| {
        let is_delete = piece.windows(7).any(|w| w == b"DELETE ");
        let (held_tx, mut released) = (held_tx.clone(), released.clone());
        Box::pin(async move {
            if is_delete {
                held_tx.send_replace(true);
                let _ = released.wait_for(|r| *r).await;
            }
        })
    });
    (proxy(endpoint, hook).await, held, release)
}

#[tokio::test]
async fn flipping_the_flag_forward_and_back_keeps_every_row_readable() {
    let prefix = test_prefix();
    let db = fresh_db().await;
    let mut written: Vec<(Uuid, Vec<u8>)> = Vec::new();
    let mut creds: Option<(Uuid, String)> = None;
    for (step, mode) in ["bytea", "dual", "s3", "dual", "bytea"].iter().enumerate() {
        // bytea mode still knows the bucket: rows that have a key are read from S3.
        let app = TestApp::start_s3(db.clone(), mode, &prefix).await;
        let (ws, token) = match &creds {
            Some(c) => c.clone(),
            None => app.poll_workspace().await,
        };
        creds = Some((ws, token.clone()));
        let data = bytes(200_000 + step * 1000, step as u8);
        let out = app
            .upload_ok(
                ws,
                &token,
                &[(
                    &format!("step{step}.bin"),
                    "application/octet-stream",
                    data.clone(),
                )],
            )
            .await;
        written.push((file_id(&out[0]), data));
        for (fid, data) in &written {
            let resp = fetch(&app, ws, &token, *fid).await;
            assert_eq!(resp.status(), StatusCode::OK, "step {step} ({mode})");
            assert!(
                resp.bytes().await.unwrap() == data[..],
                "step {step} ({mode}): row {fid} byte-identical"
            );
        }
        if *mode == "bytea" && step == 4 {
            sweep_all_and_assert_bucket_empty(&app).await;
        }
    }
}

/// In `s3` mode with S3 fine and the database gone, /readyz blamed storage as well (its
/// storage check queried the database too; a black-box probe): storage is where uploads are
/// written, here the bucket.
#[tokio::test]
async fn readyz_in_s3_mode_blames_the_database_alone_when_it_alone_is_down() {
    let app = TestApp::start_s3(fresh_db().await, "s3", &test_prefix()).await;
    let _closed = ClosedDatabase::close(&app.db_url).await;
    let ready = app.client.get(app.at("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(
        (ready["database"].as_str(), ready["storage"].as_str()),
        (Some("unavailable"), Some("ok")),
        "{ready}"
    );
}

#[tokio::test]
async fn s3_down_uploads_503_with_nothing_left_and_dual_reads_fall_back() {
    let prefix = test_prefix();
    let db = fresh_db().await;
    let down = closed_endpoint();

    // s3 mode, S3 unreachable: 503, no row, no activity row, not ready
    let broken = TestApp::start_s3_at(db.clone(), "s3", &prefix, &down).await;
    let (ws, token) = broken.poll_workspace().await;
    let resp = broken
        .upload(ws, &token, &[("a.txt", "text/plain", b"a".to_vec())])
        .await;
    assert_json(
        resp,
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "storage backend unavailable — retry shortly", "code": "storage_unavailable"}),
    )
    .await;
    broken.assert_nothing_staged().await;
    let ready = broken
        .client
        .get(broken.at("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        ready.headers()["retry-after"],
        "5",
        "every 503 says when to retry"
    );
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(
        (ready["database"].as_str(), ready["storage"].as_str()),
        (Some("ok"), Some("unavailable"))
    );

    // rows written while S3 was up, in dual and in s3 mode
    let up_dual = TestApp::start_s3(db.clone(), "dual", &prefix).await;
    let dual_fid = file_id(
        &up_dual
            .upload_ok(
                ws,
                &token,
                &[("d.txt", "text/plain", b"dual copy".to_vec())],
            )
            .await[0],
    );
    let up_s3 = TestApp::start_s3(db.clone(), "s3", &prefix).await;
    let s3_fid = file_id(
        &up_s3
            .upload_ok(ws, &token, &[("s.txt", "text/plain", b"s3 only".to_vec())])
            .await[0],
    );

    // S3 goes down: the dual row falls back to its bytea copy; the s3-only row cannot be served
    let down_dual = TestApp::start_s3_at(db.clone(), "dual", &prefix, &down).await;
    let resp = fetch(&down_dual, ws, &token, dual_fid).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(&resp.bytes().await.unwrap()[..], b"dual copy");
    assert_json(
        fetch(&down_dual, ws, &token, s3_fid).await,
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "storage backend unavailable — retry shortly", "code": "storage_unavailable"}),
    )
    .await;
    sweep_all_and_assert_bucket_empty(&up_s3).await;
}

/// SPEC §6: in `dual` a row is read from S3, falling back to its bytea copy if S3 fails, and
/// an object that is missing is such a failure. A row with neither copy is still a 404.
#[tokio::test]
async fn dual_reads_fall_back_when_the_object_is_missing() {
    let prefix = test_prefix();
    let app = TestApp::start_s3(fresh_db().await, "dual", &prefix).await;
    let (ws, token) = app.poll_workspace().await;
    let out = app
        .upload_ok(
            ws,
            &token,
            &[
                ("kept.txt", "text/plain", b"bytea copy".to_vec()),
                ("gone.txt", "text/plain", b"no copy".to_vec()),
            ],
        )
        .await;
    let (kept, gone) = (file_id(&out[0]), file_id(&out[1]));
    let (endpoint, bucket) = s3_endpoint();
    let s3 = s3_client(&endpoint);
    for fid in [kept, gone] {
        let (inline, key) = row_placement(&app, fid).await;
        assert!(inline, "dual keeps a bytea copy");
        s3.delete_object()
            .bucket(&bucket)
            .key(key.expect("an object key"))
            .send()
            .await
            .unwrap();
    }
    sqlx::query("UPDATE pending_uploads SET content = NULL WHERE file_id = $1")
        .bind(gone)
        .execute(&app.pool)
        .await
        .unwrap();

    let resp = fetch(&app, ws, &token, kept).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(&resp.bytes().await.unwrap()[..], b"bytea copy");
    assert_json(
        fetch(&app, ws, &token, gone).await,
        StatusCode::NOT_FOUND,
        json!({"error": "pending upload not found or expired"}),
    )
    .await;
    // Its bytea copy vanished after the lookup saw it (a sweep deletes the row, then its
    // object): the fallback finds nothing either, never a short or empty 200.
    let (_, key) = row_placement(&app, gone).await;
    let seen = Location {
        file_id: gone,
        workspace_id: ws,
        size: 7,
        inline: true,
        s3_key: key,
    };
    assert!(matches!(
        app.storage
            .open(&seen, ByteRange::full(seen.size))
            .await
            .map(|(stream, _)| stream),
        Err(StorageError::Missing)
    ));
    sweep_all_and_assert_bucket_empty(&app).await;
}

#[tokio::test]
async fn a_failed_upload_removes_the_objects_it_wrote() {
    let prefix = test_prefix();
    let app = TestApp::start_s3(fresh_db().await, "s3", &prefix).await;
    let (ws, token) = app.poll_workspace().await;
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
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    app.assert_nothing_staged().await;
    // Removed in the background (the answer does not wait on S3 again).
    let mut keys = app.object_keys().await;
    for _ in 0..100 {
        if keys.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        keys = app.object_keys().await;
    }
    assert_eq!(
        keys,
        Vec::<String>::new(),
        "both objects written before the failure are gone"
    );
}

/// Writes an object under the workspace's prefix that no row points at (what a crashed
/// upload or a killed backfill leaves); returns its key.
async fn put_orphan(s3: &pending_uploads::storage::S3Backend, ws: Uuid) -> String {
    let key = s3.key_for(ws, Uuid::new_v4());
    put_object_at(s3, &key).await;
    key
}

/// Writes a small object at `key`.
async fn put_object_at(s3: &pending_uploads::storage::S3Backend, key: &str) {
    let spool_dir = tempfile::tempdir().unwrap();
    let mut w = pending_uploads::spool::SpoolWriter::create(
        spool_dir.path(),
        pending_uploads::spool::MemoryBudget::unreserved(1024),
    );
    w.write(bytes::Bytes::from_static(b"orphaned"))
        .await
        .unwrap();
    s3.put_key(key, &w.finish().await.unwrap()).await.unwrap();
}

#[tokio::test]
async fn sweeper_reconciles_orphans_and_two_sweepers_do_not_collide() {
    let prefix = test_prefix();
    let app = TestApp::start_s3(fresh_db().await, "s3", &prefix).await;
    let (ws, token) = app.poll_workspace().await;
    let files: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| (format!("{i}.bin"), bytes(1000 + i, i as u8)))
        .collect();
    let parts: Vec<(&str, &str, Vec<u8>)> = octet_parts(&files);
    app.upload_ok(ws, &token, &parts).await;
    // an orphan: an object no row points at (a crashed upload, a killed backfill)
    let s3 = app.storage.s3().unwrap();
    let orphan = put_orphan(s3, ws).await;
    assert_eq!(app.object_keys().await.len(), 31);

    // within the grace period the orphan stays (it may be an upload about to commit)
    assert_eq!(zero_retention(&app).reconcile().await.unwrap(), 0);
    // two replicas sweep the expired rows at once
    sqlx::query("UPDATE pending_uploads SET expires_at = now() - interval '1 second'")
        .execute(&app.pool)
        .await
        .unwrap();
    let a = Sweeper {
        batch_size: 4,
        ..zero_retention(&app)
    };
    let b = a.clone();
    let (ra, rb) = tokio::join!(a.run_once(), b.run_once());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.rows + rb.rows, 30);
    assert_eq!(ra.objects_deleted + rb.objects_deleted, 30);
    assert_eq!(ra.object_errors + rb.object_errors, 0);
    assert_eq!(app.object_keys().await, vec![orphan.clone()]);
    // past the grace period orphans go, page after page of the listing, and objects that
    // rows point at stay
    let live = app
        .upload_ok(ws, &token, &parts[..3])
        .await
        .iter()
        .map(|e| s3.key_for(ws, file_id(e)))
        .collect::<BTreeSet<_>>();
    let mut orphans = vec![orphan];
    for _ in 0..4 {
        orphans.push(put_orphan(s3, ws).await);
    }
    let eager = Sweeper {
        orphan_grace: Duration::ZERO,
        orphan_page_size: 2,
        ..zero_retention(&app)
    };
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        eager.run_once().await.unwrap().orphans_deleted,
        orphans.len() as u64
    );
    let left: BTreeSet<String> = app.object_keys().await.into_iter().collect();
    assert_eq!(left, live, "only the orphans went");
    sweep_all_and_assert_bucket_empty(&app).await;
}

/// A second deployment given the same bucket and prefix (or a `sweep` run against the wrong
/// database) took the first one's live objects for orphans, no row of its own pointing at
/// them, and deleted them: the first's downloads then answered 404 (a red team). The first
/// reconciliation of a deployment claims the prefix (a marker naming its database); another
/// database's walks end there, each saying why, whatever workspaces the two share. Keys of
/// shapes the service does not write are left alone; an orphan of a workspace the database
/// does not know (the platform deleted its row) is still an orphan.
#[tokio::test]
async fn a_deployment_sharing_the_prefix_leaves_the_others_objects_alone() {
    let prefix = test_prefix();
    let first = TestApp::start_s3(fresh_db().await, "s3", &prefix).await;
    let (ws, token) = first.poll_workspace().await;
    let data = bytes(5000, 1);
    let out = first
        .upload_ok(
            ws,
            &token,
            &[("a.bin", "application/octet-stream", data.clone())],
        )
        .await;
    let fid = file_id(&out[0]);
    let s3 = first.storage.s3().unwrap();
    let eager = |app: &TestApp| Sweeper {
        orphan_grace: Duration::ZERO,
        ..zero_retention(app)
    };
    assert_eq!(
        eager(&first).reconcile().await.unwrap(),
        0,
        "claims the prefix"
    );

    // The second: a database of its own, the same bucket and prefix, and the same workspace
    // (ids are the registrant's to choose), with an orphan of that workspace.
    let second = TestApp::start_s3(fresh_db().await, "s3", &prefix).await;
    let resp = second
        .client
        .post(second.at("/registry/register"))
        .json(&json!({"id": ws, "delivery_mode": "poll"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let shared_orphan = put_orphan(s3, ws).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let refused = eager(&second).reconcile().await.unwrap_err();
    assert_eq!(refused.deleted, 0);
    assert!(
        refused.error.to_string().contains("belongs to deployment"),
        "{}",
        refused.error
    );
    let left: BTreeSet<String> = first.object_keys().await.into_iter().collect();
    assert!(left.contains(&s3.key_for(ws, fid)), "{left:?}");
    let resp = fetch(&first, ws, &token, fid).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.bytes().await.unwrap() == data);

    // The first's own walk: its orphans go, one of a workspace it does not know too; an
    // operator's file and a deployment's under a longer prefix inside ours stay.
    let strangers = [
        format!("{prefix}README.txt"),
        format!("{prefix}inner/{}/{}", Uuid::new_v4(), Uuid::new_v4()),
    ];
    for key in &strangers {
        put_object_at(s3, key).await;
    }
    let unknown_workspace = put_orphan(s3, Uuid::new_v4()).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(eager(&first).reconcile().await.unwrap(), 2);
    let left: BTreeSet<String> = first.object_keys().await.into_iter().collect();
    assert!(!left.contains(&shared_orphan) && !left.contains(&unknown_workspace));
    for key in &strangers {
        assert!(left.contains(key), "{key}: {left:?}");
        first.storage.delete_object(key).await.unwrap();
    }
    sweep_all_and_assert_bucket_empty(&first).await;
}

/// Two deployments whose first walks run at once: both read "no marker", and the later
/// write replaced the earlier's marker, so both reconciled (each took the other's objects
/// for orphans) until the loser's next walk. The write is conditional now: the later one
/// finds the marker there and deletes nothing.
#[tokio::test]
async fn two_first_walks_at_once_leave_the_prefix_to_one() {
    let prefix = test_prefix();
    let first = TestApp::start_s3(fresh_db().await, "s3", &prefix).await;
    let first_id = Uuid::new_v4();
    // The second's marker write waits until the first's marker is there: the first claims
    // between the second's read and its write.
    let claimed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storage = first.storage.clone();
    let hook: ProxyHook = Arc::new(move |piece: &[u8]| {
        let marker_write =
            piece.starts_with(b"PUT ") && piece.windows(11).any(|w| w == b".deployment");
        let first_claims = marker_write && !claimed.swap(true, std::sync::atomic::Ordering::SeqCst);
        let storage = storage.clone();
        Box::pin(async move {
            if first_claims {
                assert_eq!(storage.claim_prefix(first_id).await.unwrap(), first_id);
            }
        })
    });
    let (endpoint, _) = s3_endpoint();
    let flags = s3_flags("s3", &prefix, &proxy(&endpoint, hook).await);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let second = TestApp::start_on(fresh_db().await, &flags).await;
    let (ws, _) = second.poll_workspace().await;
    let orphan = put_orphan(first.storage.s3().unwrap(), ws).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let refused = Sweeper {
        orphan_grace: Duration::ZERO,
        ..zero_retention(&second)
    }
    .reconcile()
    .await
    .unwrap_err();
    assert_eq!(refused.deleted, 0);
    let said = refused.error.to_string();
    assert!(
        said.contains(&format!("belongs to deployment {first_id}")),
        "{said}"
    );
    assert_eq!(
        first.storage.claim_prefix(Uuid::new_v4()).await.unwrap(),
        first_id,
        "the first's marker stayed"
    );
    assert!(first.object_keys().await.contains(&orphan));
    first.storage.delete_object(&orphan).await.unwrap();
    first
        .storage
        .delete_object(&first.storage.s3().unwrap().marker_key())
        .await
        .unwrap();
}

/// A server that does not take `If-None-Match: *` on a PUT (S3-compatible servers from
/// before conditional writes answer 501 NotImplemented, some 400) gets the prefix's marker
/// written plainly, and the read-back names it; the next claim reads it. Both servers here
/// take the condition, so a proxy refuses it as such a server would.
#[tokio::test]
async fn a_server_without_conditional_writes_gets_the_marker_written_plainly() {
    for (status, code) in [
        ("501 Not Implemented", "NotImplemented"),
        ("400 Bad Request", "InvalidArgument"),
    ] {
        let prefix = test_prefix();
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = refused.clone();
        let answer: ProxyAnswer = Arc::new(move |piece: &[u8]| {
            let head = String::from_utf8_lossy(piece).to_ascii_lowercase();
            if !(head.starts_with("put ") && head.contains("\r\nif-none-match: *\r\n")) {
                return None;
            }
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
                 <Message>A header you provided implies functionality that is not implemented</Message></Error>"
            );
            Some(
                format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes(),
            )
        });
        let (endpoint, _) = s3_endpoint();
        let refusing = answering_proxy(&endpoint, Arc::new(|_| Box::pin(async {})), answer).await;
        let flags = s3_flags("s3", &prefix, &refusing);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let app = TestApp::start_on(fresh_db().await, &flags).await;
        let ours = Uuid::new_v4();
        assert_eq!(
            app.storage.claim_prefix(ours).await.unwrap(),
            ours,
            "{status}"
        );
        assert!(
            refused.load(std::sync::atomic::Ordering::SeqCst) >= 1,
            "{status}"
        );
        assert_eq!(
            app.storage.claim_prefix(Uuid::new_v4()).await.unwrap(),
            ours,
            "{status}: the marker stayed"
        );
        app.storage
            .delete_object(&app.storage.s3().unwrap().marker_key())
            .await
            .unwrap();
    }
}

/// A reconciliation that deleted orphans and then failed said it deleted none
/// (`orphans_deleted: 0` in a `sweep` run's report): what it deleted before counts.
#[tokio::test]
async fn a_reconciliation_that_fails_half_way_counts_what_it_deleted() {
    let prefix = test_prefix();
    let db = fresh_db().await;
    let app = TestApp::start_s3(db.clone(), "s3", &prefix).await;
    let (ws, _) = app.poll_workspace().await;
    let s3 = app.storage.s3().unwrap();
    for _ in 0..3 {
        put_orphan(s3, ws).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // S3 freezes half-way through the walk: its third listing page never comes (the first
    // holds the prefix's marker, which sorts first; the second an orphan).
    let lists = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = lists.clone();
    let hook: ProxyHook = Arc::new(move |piece: &[u8]| {
        let listing = piece.windows(11).any(|w| w == b"list-type=2");
        let frozen = listing && counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 2;
        Box::pin(async move {
            if frozen {
                std::future::pending::<()>().await;
            }
        })
    });
    let (endpoint, _) = s3_endpoint();
    let mut flags = s3_flags("s3", &prefix, &proxy(&endpoint, hook).await);
    flags.extend(["--dependency-timeout".to_string(), "1s".to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let freezing = TestApp::start_on(db, &flags).await;
    let sweeper = Sweeper {
        orphan_grace: Duration::ZERO,
        orphan_page_size: 1,
        ..zero_retention(&freezing)
    };
    let stats = sweeper.run_once().await.unwrap();
    assert!(lists.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    assert_eq!((stats.orphans_deleted, stats.orphans_failed), (1, true));
    assert_eq!(app.object_keys().await.len(), 2, "one orphan went");
    let eager = Sweeper {
        orphan_grace: Duration::ZERO,
        ..zero_retention(&app)
    };
    assert_eq!(eager.reconcile().await.unwrap(), 2);
    assert_eq!(app.object_keys().await, Vec::<String>::new());
}

fn cli(db: &str, prefix: &str, args: &[&str]) -> Command {
    let (endpoint, bucket) = s3_endpoint();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("DATABASE_URL", db)
        .env("PENDING_UPLOADS_S3_BUCKET", bucket)
        .env("PENDING_UPLOADS_S3_PREFIX", prefix)
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_REGION", "us-east-1")
        .env("LOG_FORMAT", "json")
        .env_remove("PENDING_UPLOADS_BACKEND");
    if let Ok(checksum) = std::env::var("TEST_S3_CHECKSUM") {
        cmd.env("PENDING_UPLOADS_S3_CHECKSUM", checksum);
    }
    cmd
}

fn backfilled_lines(stderr: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["event"] == "backfilled")
        .map(|l| l["file_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn backfill_killed_half_way_resumes_and_contract_gates_on_it() {
    let prefix = test_prefix();
    let db = fresh_db().await;
    let app = TestApp::start_s3(db.clone(), "bytea", &prefix).await;
    let (ws, token) = app.poll_workspace().await;
    let mut sent: Vec<(Uuid, Vec<u8>)> = Vec::new();
    for batch in 0..6u8 {
        let parts: Vec<(String, Vec<u8>)> = (0..10u8)
            .map(|i| {
                (
                    format!("{batch}-{i}.bin"),
                    bytes(400_000 + i as usize * 997, batch * 10 + i),
                )
            })
            .collect();
        let parts_ref: Vec<(&str, &str, Vec<u8>)> = octet_parts(&parts);
        let out = app.upload_ok(ws, &token, &parts_ref).await;
        sent.extend(out.iter().zip(parts).map(|(e, (_, b))| (file_id(e), b)));
    }
    let total = sent.len();

    // contract refuses while rows are bytea-only
    let out = cli(&db, &prefix, &["contract"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("refusing to contract: {total} rows")),
        "{err}"
    );

    // dry run: counts, touches nothing
    let report = stdout_json(&run_ok(&mut cli(&db, &prefix, &["backfill", "--dry-run"])));
    assert_eq!(
        (
            report["dry_run"].as_bool(),
            report["rows_total"].as_u64(),
            report["migrated"].as_u64()
        ),
        (Some(true), Some(total as u64), Some(0))
    );
    assert_eq!(app.object_keys().await.len(), 0);
    // ...and applies no migration either: on an empty database it fails, and leaves it empty.
    let empty = empty_db().await;
    let out = cli(&empty, &prefix, &["backfill", "--dry-run"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "nothing to count without the schema");
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&empty)
        .await
        .unwrap();
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(tables, 0, "a dry run created tables");

    // first run, killed half-way
    let mut child = cli(
        &db,
        &prefix,
        &[
            "backfill",
            "--concurrency",
            "1",
            "--batch-size",
            "5",
            "--no-progress",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut done_before_kill = 0;
    for _ in 0..1000 {
        done_before_kill = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pending_uploads WHERE s3_key IS NOT NULL",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if done_before_kill >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap();
    let first = child.wait_with_output().unwrap();
    let done_at_kill: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pending_uploads WHERE s3_key IS NOT NULL")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(
        done_before_kill >= 5 && (done_at_kill as usize) < total,
        "killed half-way: {done_at_kill}/{total}"
    );

    // What the killed run committed, read from the rows: SIGKILL can land between a row's
    // commit and its log line, so the first run's log may miss its last row, never add one.
    let migrated_first: BTreeSet<String> = sqlx::query_scalar::<_, Uuid>(
        "SELECT file_id FROM pending_uploads WHERE s3_key IS NOT NULL",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|id| id.to_string())
    .collect();
    assert_eq!(migrated_first.len(), done_at_kill as usize);
    let logged_first = backfilled_lines(&first.stderr);
    assert!(
        logged_first.iter().all(|id| migrated_first.contains(id)),
        "the killed run logged only rows it committed"
    );

    // resumed: finishes the rest, each row once
    let out = run_ok(&mut cli(&db, &prefix, &["backfill", "--no-progress"]));
    let report = stdout_json(&out);
    assert_eq!(report["failed"], 0);
    assert_eq!(
        report["migrated"].as_u64().unwrap() as usize,
        total - done_at_kill as usize
    );
    let resumed = backfilled_lines(&out.stderr);
    let resumed_set: BTreeSet<String> = resumed.iter().cloned().collect();
    assert_eq!(resumed.len(), resumed_set.len(), "no row copied twice");
    assert!(
        resumed_set.is_disjoint(&migrated_first),
        "the resumed run re-copied none of the killed run's rows"
    );
    let all: BTreeSet<String> = sent.iter().map(|(id, _)| id.to_string()).collect();
    let union: BTreeSet<String> = migrated_first.union(&resumed_set).cloned().collect();
    assert_eq!(union, all, "every row migrated exactly once");
    let again: Value = serde_json::from_slice(
        &cli(&db, &prefix, &["backfill", "--no-progress"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(again["rows_total"], 0, "nothing left to do");

    // A copy the killed run wrote but pointed no row at is an orphan (each copy has a key of
    // its own); past the grace a reconciliation removes it, and every row's copy stays.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let eager = Sweeper {
        orphan_grace: Duration::ZERO,
        ..zero_retention(&app)
    };
    let orphans = eager.reconcile().await.unwrap();
    assert!(
        orphans <= 1,
        "one copy in flight at the kill, {orphans} orphans"
    );
    // every copy verifies
    assert_eq!(app.object_keys().await.len(), total);
    let s3 = app.storage.s3().unwrap();
    for (fid, data) in &sent {
        let (inline, key) = row_placement(&app, *fid).await;
        assert!(inline);
        let key = key.unwrap();
        assert!(
            key.starts_with(&format!("{}.", s3.key_for(ws, *fid))),
            "{key}: the row's own copy, beside where an upload's object would be"
        );
        let loc = Location {
            file_id: *fid,
            workspace_id: ws,
            size: data.len() as u64,
            inline: false,
            s3_key: Some(key),
        };
        let object: Vec<bytes::Bytes> = s3
            .open(&loc, ByteRange::full(loc.size))
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert!(
            object.concat() == *data,
            "{fid}: the object holds exactly the row's bytes"
        );
    }

    // contract: releases every bytea copy; reads keep working from S3
    let report = stdout_json(&run_ok(&mut cli(&db, &prefix, &["contract"])));
    assert_eq!(report, json!({"released_rows": total, "missing_copies": 0}));
    let with_content: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pending_uploads WHERE content IS NOT NULL")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(with_content, 0);
    for (fid, data) in &sent {
        let resp = fetch(&app, ws, &token, *fid).await;
        assert!(
            resp.bytes().await.unwrap() == data[..],
            "{fid} readable after contract"
        );
    }
    sweep_all_and_assert_bucket_empty(&app).await;
}

/// `serve` as a child process with this test's S3 settings and `env`; its base URL.
async fn child_service(db: &str, prefix: &str, env: &[(&str, &str)]) -> (Running, String) {
    let port = free_port();
    let mut cmd = cli(db, prefix, &["serve"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    (
        spawn_service(cmd, port).await,
        format!("http://127.0.0.1:{port}"),
    )
}

/// POSTs a multipart `body` (boundary `XB`) to the workspace's uploads.
async fn post_upload(base: &str, ws: Uuid, token: &str, body: &'static str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/workspaces/{ws}/chat/uploads"))
        .bearer_auth(token)
        .header("Content-Type", "multipart/form-data; boundary=XB")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// SPEC §8: a failed transition is logged like the others, one line per file with its
/// workspace_id, size, sanitized name and backend (no file_id: nothing was staged). It was one
/// line per request with a count of files.
#[tokio::test]
async fn a_failed_upload_logs_a_line_for_each_file() {
    let prefix = test_prefix();
    let db = fresh_db().await;
    let (endpoint, _) = s3_endpoint();
    // S3 answers everything but PUTs, which it takes and never answers.
    let hook: ProxyHook = Arc::new(|piece: &[u8]| {
        let put = piece.starts_with(b"PUT ");
        Box::pin(async move {
            if put {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        })
    });
    let stalling = proxy(&endpoint, hook).await;
    let (mut svc, base) = child_service(
        &db,
        &prefix,
        &[
            ("PENDING_UPLOADS_BACKEND", "s3"),
            ("AWS_ENDPOINT_URL", &stalling),
            ("DEPENDENCY_TIMEOUT", "1s"),
        ],
    )
    .await;
    let (ws, token) = register_poll(&base).await;
    let body = "--XB\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a b.txt\"\r\n\r\nabc\r\n\
                --XB\r\nContent-Disposition: form-data; name=\"files\"; filename=\"c.txt\"\r\n\r\nccccc\r\n--XB--\r\n";
    let resp = post_upload(&base, ws, &token, body).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let out = svc.terminate().await;
    let failed: Vec<(Value, Value, Value, Value)> = log_lines(&out.stderr)
        .into_iter()
        .filter(|l| l["event"] == "failed")
        .map(|l| {
            (
                l["workspace_id"].clone(),
                l["name"].clone(),
                l["size"].clone(),
                l["backend"].clone(),
            )
        })
        .collect();
    let ws = json!(ws.to_string());
    assert_eq!(
        failed,
        vec![
            (ws.clone(), json!("a_b.txt"), json!(3), json!("s3")),
            (ws, json!("c.txt"), json!(5), json!("s3")),
        ]
    );
}

/// `RUST_LOG=debug` does not write the S3 access key id: the SDK's request machinery
/// (`aws_smithy_runtime`) prints its configuration, credentials included (the secret key
/// redacted), at debug and trace, into every request's lines (an operator red team), and its
/// signer (`aws_sigv4`) its credentials at trace (an audit). The SDK's lines past info come
/// only when RUST_LOG names their crate.
#[tokio::test]
async fn debug_logs_leave_the_access_key_id_out() {
    let prefix = test_prefix();
    for (rust_log, shown) in [
        ("debug", false),
        ("trace", false),
        ("debug,aws_smithy_runtime=debug", true),
        ("info,aws_sigv4=trace", true),
    ] {
        let db = fresh_db().await;
        let log = tempfile::NamedTempFile::new().unwrap();
        let port = free_port();
        let mut cmd = cli(&db, &prefix, &["serve"]);
        cmd.env("PENDING_UPLOADS_BACKEND", "s3")
            .env("RUST_LOG", rust_log);
        let stderr = std::process::Stdio::from(log.reopen().unwrap());
        let mut svc = spawn_service_logging_to(cmd, port, stderr).await;
        let base = format!("http://127.0.0.1:{port}");
        let (ws, token) = register_poll(&base).await;
        let body = "--XB\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.txt\"\r\n\r\nabc\r\n--XB--\r\n";
        let resp = post_upload(&base, ws, &token, body).await;
        assert_eq!(resp.status(), StatusCode::OK);
        svc.terminate().await;
        let lines = std::fs::read_to_string(log.path()).unwrap();
        assert!(
            lines.contains("\"level\":\"DEBUG\"") || lines.contains("\"level\":\"TRACE\""),
            "{rust_log}: no debug lines"
        );
        assert_eq!(lines.contains("access_key_id"), shown, "{rust_log}");
    }
}

/// SPEC §8: transitions and counts by backend. A dual row served from its bytea copy because
/// S3 failed was counted and logged as served by S3 (the backend a read tries first).
#[tokio::test]
async fn a_fallback_read_is_counted_and_logged_as_the_bytea_read_it_is() {
    let prefix = test_prefix();
    let db = fresh_db().await;
    let (mut svc, base) = child_service(&db, &prefix, &[("PENDING_UPLOADS_BACKEND", "dual")]).await;
    let (ws, token) = register_poll(&base).await;
    let client = reqwest::Client::new();
    let body = "--XB\r\nContent-Disposition: form-data; name=\"files\"; filename=\"f.txt\"\r\n\r\nboth copies\r\n--XB--\r\n";
    let up: Value = post_upload(&base, ws, &token, body)
        .await
        .json()
        .await
        .unwrap();
    let fid = file_id(&up["files"][0]);
    // Its object deleted out of band: the read falls back to the row's bytea copy.
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let key: String = sqlx::query_scalar("SELECT s3_key FROM pending_uploads WHERE file_id = $1")
        .bind(fid)
        .fetch_one(&pool)
        .await
        .unwrap();
    let (endpoint, bucket) = s3_endpoint();
    s3_client(&endpoint)
        .delete_object()
        .bucket(&bucket)
        .key(&key)
        .send()
        .await
        .unwrap();
    let resp = client
        .get(format!(
            "{base}/workspaces/{ws}/pending-uploads/{fid}/content"
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.unwrap(), "both copies");
    // A HEAD answers as the GET did: the bytea copy is there to be read.
    let head = client
        .head(format!(
            "{base}/workspaces/{ws}/pending-uploads/{fid}/content"
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    wait_for_metric(
        &base,
        r#"pending_uploads_files_fetched_total{backend="bytea",outcome="ok"}"#,
        1.0,
    )
    .await;
    let text = scrape_metrics(&base).await;
    assert_eq!(
        metric_value(
            &text,
            r#"pending_uploads_bytes_served_total{backend="bytea"}"#
        ),
        Some(11.0)
    );
    assert_eq!(
        metric_value(
            &text,
            r#"pending_uploads_files_fetched_total{backend="s3",outcome="ok"}"#
        ),
        None,
        "{text}"
    );
    let out = svc.terminate().await;
    let lines = log_lines(&out.stderr);
    let fetched = lines
        .iter()
        .find(|l| l["event"] == "fetched")
        .expect("a fetched line");
    assert_eq!(fetched["backend"], "bytea");
    assert!(lines.iter().any(|l| l["event"] == "fallback"));
}

/// SPEC §6: contract drops a row's bytes from Postgres only once nothing depends on them. It
/// released every row with a key, so a row whose object was deleted out of band (or cut
/// short) lost its last copy: 200 before contract, 404 after. Each object is now checked
/// (HEAD: size, and SHA-256: the server's, or the object read and hashed where the server
/// stored none; an object overwritten with bytes of its length passed on its size alone, a
/// red team): such a row keeps its bytes, stops pointing at the object, and the backfill
/// copies it anew.
#[tokio::test]
async fn contract_keeps_the_bytes_of_a_row_whose_s3_copy_is_gone_or_wrong() {
    let prefix = test_prefix();
    let db = fresh_db().await;
    let app = TestApp::start_s3(db.clone(), "dual", &prefix).await;
    let (ws, token) = app.poll_workspace().await;
    let files: Vec<(&str, &str, Vec<u8>)> = vec![
        ("kept.bin", "application/octet-stream", bytes(4321, 1)),
        ("deleted.bin", "application/octet-stream", bytes(5000, 2)),
        ("cut.bin", "application/octet-stream", bytes(6000, 3)),
        ("swapped.bin", "application/octet-stream", bytes(7000, 4)),
    ];
    let out = app.upload_ok(ws, &token, &files).await;
    let ids: Vec<Uuid> = out.iter().map(file_id).collect();
    let (endpoint, bucket) = s3_endpoint();
    let s3 = s3_client(&endpoint);
    let deleted = row_placement(&app, ids[1]).await.1.expect("a key");
    let cut = row_placement(&app, ids[2]).await.1.expect("a key");
    let swapped = row_placement(&app, ids[3]).await.1.expect("a key");
    // One object deleted, one overwritten with a shorter body, one with other bytes of its
    // length (stored with the SDK's CRC32, no SHA-256 to compare: read and hashed), out of
    // band.
    s3.delete_object()
        .bucket(&bucket)
        .key(deleted)
        .send()
        .await
        .unwrap();
    s3.put_object()
        .bucket(&bucket)
        .key(cut)
        .body(aws_sdk_s3::primitives::ByteStream::from(
            files[2].2[..100].to_vec(),
        ))
        .send()
        .await
        .unwrap();
    s3.put_object()
        .bucket(&bucket)
        .key(swapped)
        .body(aws_sdk_s3::primitives::ByteStream::from(bytes(7000, 9)))
        .send()
        .await
        .unwrap();

    let out = cli(&db, &prefix, &["contract"]).output().unwrap();
    assert!(!out.status.success(), "missing copies fail the run");
    assert_eq!(
        stdout_json(&out),
        json!({"released_rows": 1, "missing_copies": 3})
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("run `pending-uploads backfill`"), "{err}");
    assert!(!row_placement(&app, ids[0]).await.0, "released");
    for fid in [ids[1], ids[2], ids[3]] {
        assert_eq!(
            row_placement(&app, fid).await,
            (true, None),
            "kept its bytes, bytea-only again"
        );
    }
    for (fid, (_, _, data)) in ids.iter().zip(&files) {
        let resp = fetch(&app, ws, &token, *fid).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.bytes().await.unwrap() == data[..], "{fid}");
    }

    // The gate now sends the operator to the backfill, which copies them anew.
    let out = cli(&db, &prefix, &["contract"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refusing to contract: 3 rows"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = stdout_json(&run_ok(&mut cli(
        &db,
        &prefix,
        &["backfill", "--no-progress"],
    )));
    assert_eq!(report["migrated"], 3);
    let report = stdout_json(&run_ok(&mut cli(&db, &prefix, &["contract"])));
    assert_eq!(report, json!({"released_rows": 3, "missing_copies": 0}));
    for (fid, (_, _, data)) in ids.iter().zip(&files) {
        let resp = fetch(&app, ws, &token, *fid).await;
        assert!(
            resp.bytes().await.unwrap() == data[..],
            "{fid} after the second contract"
        );
    }
}

/// The contract reads each row once: its batches had a statement of the form `($1 IS NULL OR
/// file_id > $1)`, whose generic plan (PostgreSQL's, from a connection's sixth run) cannot
/// bound the primary key's scan by it, so each batch read the table from the first row. Here
/// 600 rows to check among 20,000 whose bytes are in S3 only, in batches of 50: 126,229 rows
/// read before, 21,201 since.
#[tokio::test]
async fn contract_reads_each_row_once() {
    let prefix = test_prefix();
    let db = fresh_db().await;
    let app = TestApp::start_s3(db.clone(), "dual", &prefix).await;
    let (checked, elsewhere) = (600, 20_000);
    // rows with both copies whose objects are gone (each is checked, then kept), among rows
    // whose bytes are in S3 only (passed over)
    sqlx::query(
        "INSERT INTO pending_uploads (workspace_id, content, size_bytes, filename, s3_key)
         SELECT gen_random_uuid(), CASE WHEN g <= $2 THEN '\\x01'::bytea END, 1, 'f',
                $1 || 'gone-' || g
         FROM generate_series(1, $2 + $3) g",
    )
    .bind(&prefix)
    .bind(checked)
    .bind(elsewhere)
    .execute(&app.pool)
    .await
    .unwrap();
    analyze(&app.pool, "pending_uploads").await;
    let read = rows_read(&db, "pending_uploads").await;
    let out = cli(&db, &prefix, &["contract", "--batch-size", "50"])
        .output()
        .unwrap();
    assert_eq!(
        stdout_json(&out),
        json!({"released_rows": 0, "missing_copies": checked})
    );
    let read = rows_read(&db, "pending_uploads").await - read;
    let rows = i64::from(checked + elsewhere);
    assert!(
        read <= 2 * rows,
        "{read} rows read to contract a table of {rows}"
    );
}

/// SPEC §7: a backfill killed between its verified copy and pointing the row at it leaves an
/// object no row points at, and the reconciliation deletes such an orphan without looking
/// again. A rerun must not write that key: were it to, and point the row at it between the
/// reconciliation's look-up and its delete, the row would point at a deleted object, and
/// `contract` would then drop the file's last copy.
#[tokio::test]
async fn a_backfill_rerun_never_points_a_row_at_what_a_killed_run_left() {
    let prefix = test_prefix();
    let db = fresh_db().await;
    let app = TestApp::start_s3(db.clone(), "bytea", &prefix).await;
    let (ws, token) = app.poll_workspace().await;
    let data = bytes(300_000, 7);
    let out = app
        .upload_ok(
            ws,
            &token,
            &[("f.bin", "application/octet-stream", data.clone())],
        )
        .await;
    let fid = file_id(&out[0]);

    // What the killed run left: the backfill's own copy step, and no row pointed at it.
    let loc = Location {
        file_id: fid,
        workspace_id: ws,
        size: data.len() as u64,
        inline: true,
        s3_key: None,
    };
    let spool_dir = tempfile::tempdir().unwrap();
    let (leftover, _) = app
        .storage
        .copy_to_s3(&loc, None, spool_dir.path())
        .await
        .unwrap();
    assert_eq!(row_placement(&app, fid).await, (true, None));
    // past ORPHAN_GRACE=0 (object times are whole seconds)
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // A reconciliation judges it an orphan; its DELETE is held on the way to S3...
    let (endpoint, _) = s3_endpoint();
    let (proxy, mut held, release) = delete_holding_proxy(&endpoint).await;
    let mut flags = s3_flags("bytea", &prefix, &proxy);
    flags.extend(["--dependency-timeout".to_string(), "60s".to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let reconciling = TestApp::start_on(db.clone(), &flags).await;
    let reconciler = Sweeper {
        orphan_grace: Duration::ZERO,
        ..zero_retention(&reconciling)
    };
    let reconcile = tokio::spawn(async move { reconciler.reconcile().await });
    tokio::time::timeout(Duration::from_secs(30), held.wait_for(|h| *h))
        .await
        .expect("the reconciliation deletes the leftover")
        .unwrap();

    // ...while a rerun copies the row and points it at its copy.
    let report = stdout_json(&run_ok(&mut cli(
        &db,
        &prefix,
        &["backfill", "--no-progress"],
    )));
    assert_eq!(
        (report["migrated"].as_u64(), report["failed"].as_u64()),
        (Some(1), Some(0))
    );
    let (_, key) = row_placement(&app, fid).await;
    let key = key.expect("the row points at its copy");
    assert_ne!(key, leftover, "the rerun wrote a key of its own");

    // The delete lands: it takes the leftover, and the row's copy stays.
    release.send_replace(true);
    assert_eq!(reconcile.await.unwrap().unwrap(), 1, "the leftover went");
    assert_eq!(app.object_keys().await, vec![key]);

    // contract releases the bytea copy; the file is served from its object
    let report = stdout_json(&run_ok(&mut cli(&db, &prefix, &["contract"])));
    assert_eq!(report, json!({"released_rows": 1, "missing_copies": 0}));
    let resp = fetch(&app, ws, &token, fid).await;
    assert_eq!(resp.status(), StatusCode::OK, "served after contract");
    assert!(resp.bytes().await.unwrap() == data, "the bytes uploaded");
    sweep_all_and_assert_bucket_empty(&app).await;
}

/// The background sweeper lists the bucket in its first pass and then once per quarter of
/// ORPHAN_GRACE, not in every pass: a full listing is the costliest call a pass makes, on
/// every replica (three replicas listing every second were what timed out in the chaos
/// suite's replica scenario). With a short grace it still lists in every pass.
#[tokio::test]
async fn the_background_sweeper_lists_the_bucket_once_per_quarter_of_the_grace() {
    let (endpoint, bucket) = s3_endpoint();
    let passes_series = "pending_uploads_sweep_runs_total{outcome=\"ok\"}";
    let lists_series = "pending_uploads_storage_operation_duration_seconds_count{backend=\"s3\",operation=\"list\"}";
    for grace in ["1h", "2s"] {
        // A database each: the fleet's turn at the listing, which the first service took
        // for a quarter of its grace, would keep the second from listing.
        let db = fresh_db().await;
        let port = free_port();
        let mut cmd = bin_command(&db);
        cmd.env("PENDING_UPLOADS_BACKEND", "s3")
            .env("PENDING_UPLOADS_S3_BUCKET", &bucket)
            .env("PENDING_UPLOADS_S3_PREFIX", test_prefix())
            .env("AWS_ENDPOINT_URL", &endpoint)
            .env("AWS_REGION", "us-east-1")
            .env("SWEEP_INTERVAL", "1s")
            .env("ORPHAN_GRACE", grace)
            // a grace this short needs uploads this short (`ServeArgs::validate`)
            .env("UPLOAD_BODY_TIMEOUT", "1s");
        let _service = spawn_service(cmd, port).await;
        let base = format!("http://127.0.0.1:{port}");
        let mut text = String::new();
        for _ in 0..100 {
            text = scrape_metrics(&base).await;
            if metric_value(&text, passes_series).unwrap_or(0.0) >= 4.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let passes = metric_value(&text, passes_series).unwrap_or(0.0);
        let lists = metric_value(&text, lists_series).unwrap_or(0.0);
        assert!(
            passes >= 4.0,
            "ORPHAN_GRACE={grace}: {passes} passes in 10 s"
        );
        if grace == "1h" {
            assert_eq!(lists, 1.0, "ORPHAN_GRACE=1h: listings in {passes} passes");
        } else {
            // The scrape may fall between a pass's listing and its count.
            assert!(
                lists == passes || lists == passes + 1.0,
                "ORPHAN_GRACE=2s: {lists} listings in {passes} passes"
            );
        }
    }
}

/// An s3-mode app on a fresh database and prefix, reaching S3 at `endpoint`, with
/// DEPENDENCY_TIMEOUT `timeout`.
async fn s3_app_with_dependency_timeout(endpoint: &str, timeout: &str) -> TestApp {
    let mut flags = s3_flags("s3", &test_prefix(), endpoint);
    flags.extend(["--dependency-timeout".to_string(), timeout.to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    TestApp::start_on(fresh_db().await, &flags).await
}

/// A multipart body with `files`, ended by `closing` after the last delimiter (clients send
/// `--\r\n`).
fn raw_multipart(boundary: &str, files: &[(&str, &[u8])], closing: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        out.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}").as_bytes());
    out.extend_from_slice(closing);
    out
}

/// `body` sent up to `at`, then the rest after a pause of `ms`.
fn paused_at(body: Vec<u8>, at: usize, ms: u64) -> reqwest::Body {
    // Timed from when the rest is due (the first part sent), not from now.
    paused_until(body, at, async move {
        tokio::time::sleep(Duration::from_millis(ms)).await
    })
}

/// `body` sent up to `at`, the rest once `released` is done.
fn paused_until(
    body: Vec<u8>,
    at: usize,
    released: impl std::future::Future + Send + 'static,
) -> reqwest::Body {
    let body = bytes::Bytes::from(body);
    let (first, rest) = (body.slice(..at), body.slice(at..));
    let rest = async move {
        released.await;
        Ok::<_, std::io::Error>(rest)
    };
    let stream = futures::stream::iter([Ok(first)]).chain(futures::stream::once(rest));
    reqwest::Body::wrap_stream(stream)
}

/// A raw multipart body (boundary `XqzBound`) of `len` bytes, posted to the service at `base`.
async fn post_raw(
    base: &str,
    ws: Uuid,
    token: &str,
    body: reqwest::Body,
    len: usize,
) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/workspaces/{ws}/chat/uploads"))
        .bearer_auth(token)
        .header("content-type", "multipart/form-data; boundary=XqzBound")
        .header("content-length", len.to_string())
        .body(body)
        .send()
        .await
        .unwrap()
}

/// The keys the rows point at, sorted.
async fn row_keys(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar("SELECT s3_key FROM pending_uploads ORDER BY s3_key")
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

/// Waits (up to 5 s) for the bucket to hold no key of this app's but `keep`.
async fn assert_objects_settle_to(app: &TestApp, keep: &[String]) {
    let mut keys = app.object_keys().await;
    for _ in 0..100 {
        if keys == keep {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        keys = app.object_keys().await;
    }
    assert_eq!(keys, keep);
}

/// A body of known length whose last file goes to disk has its PUT start with the receive
/// (the size foreseen from Content-Length). A guess that turns out wrong — a file before
/// another, a body closed without the final CRLF — costs a second PUT, never a wrong or extra
/// object: every file reads back whole, and the bucket holds the rows' objects only.
#[tokio::test]
async fn a_put_alongside_the_receive_writes_each_file_once() {
    for mode in ["s3", "dual"] {
        let prefix = test_prefix();
        let app = TestApp::start_s3(fresh_db().await, mode, &prefix).await;
        let (ws, token) = app.poll_workspace().await;
        let (a, b, c) = (
            bytes(3 << 20, 1),
            bytes((5 << 19) + 3, 2),
            bytes(3 << 20, 3),
        );
        let bodies = [
            raw_multipart("XqzBound", &[("a.bin", &a)], b"--\r\n"),
            raw_multipart("XqzBound", &[("a.bin", &a), ("b.bin", &b)], b"--\r\n"),
            raw_multipart("XqzBound", &[("c.bin", &c)], b"--"),
        ];
        let mut sent = Vec::new();
        for body in bodies {
            let len = body.len();
            let resp = post_raw(&app.url, ws, &token, body.into(), len).await;
            let status = resp.status();
            let out: Value = resp.json().await.unwrap();
            assert_eq!(status, StatusCode::OK, "{mode}: {out}");
            sent.extend(out["files"].as_array().unwrap().iter().map(file_id));
        }
        for (fid, data) in sent.iter().zip([&a, &a, &b, &c]) {
            let got = fetch(&app, ws, &token, *fid).await.bytes().await.unwrap();
            assert!(got == data.as_slice(), "{mode}: {fid} reads back whole");
        }
        let keys = row_keys(&app).await;
        assert_eq!(keys.len(), 4);
        assert_objects_settle_to(&app, &keys).await;
        sweep_all_and_assert_bucket_empty(&app).await;
    }
}

/// A PUT that started with the receive may have the whole file before the body turns out
/// bad (here, the last file exactly where foreseen, then a malformed close): the 400 leaves no
/// object behind. Neither does a client that goes mid-body.
#[tokio::test]
async fn a_refused_body_leaves_nothing_of_its_early_put() {
    let prefix = test_prefix();
    let app = TestApp::start_s3(fresh_db().await, "s3", &prefix).await;
    let (ws, token) = app.poll_workspace().await;
    let data = bytes(3 << 20, 4);
    let body = raw_multipart("XqzBound", &[("a.bin", &data)], b"XY\r\n");
    let len = body.len();
    // The bad close comes once the file (and so its PUT) is whole.
    let resp = post_raw(&app.url, ws, &token, paused_at(body, len - 4, 1000), len).await;
    assert_error(resp, StatusCode::BAD_REQUEST, "malformed multipart body").await;
    app.assert_nothing_staged().await;
    assert_objects_settle_to(&app, &[]).await;

    // Half the body, then the connection goes.
    let body = raw_multipart("XqzBound", &[("a.bin", &data)], b"--\r\n");
    let addr = app.url.trim_start_matches("http://").to_string();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /workspaces/{ws}/chat/uploads HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: multipart/form-data; boundary=XqzBound\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(&body[..body.len() / 2]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(sock);
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.assert_nothing_staged().await;
    assert_objects_settle_to(&app, &[]).await;
}

/// The watchdog that cancels a PUT the server stopped taking bytes for does not count the
/// time a PUT alongside the receive waits on the client: a client that pauses mid-body longer
/// than DEPENDENCY_TIMEOUT (within the body's own deadlines) still gets its upload staged.
#[tokio::test]
async fn a_client_pausing_mid_body_is_not_a_stalled_server() {
    let (endpoint, _) = s3_endpoint();
    let app = s3_app_with_dependency_timeout(&endpoint, "1s").await;
    let (ws, token) = app.poll_workspace().await;
    let data = bytes(3 << 20, 6);
    let body = raw_multipart("XqzBound", &[("a.bin", &data)], b"--\r\n");
    let len = body.len();
    let resp = post_raw(&app.url, ws, &token, paused_at(body, len / 2, 2500), len).await;
    let status = resp.status();
    let out: Value = resp.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{out}");
    let fid = file_id(&out["files"][0]);
    let got = fetch(&app, ws, &token, fid).await.bytes().await.unwrap();
    assert!(got == data.as_slice());
    sweep_all_and_assert_bucket_empty(&app).await;
}

/// PUTs alongside the receive hold buffers of their own on top of the receive's, so a
/// replica runs at most S3_PUTS_WHILE_RECEIVING of them (the others put their file after the
/// receive, as before), and 0 runs none.
#[tokio::test]
async fn puts_while_receiving_are_bounded() {
    let (endpoint, _) = s3_endpoint();
    let written = "pending_uploads_s3_puts_while_receiving_total{outcome=\"written\"}";
    for places in [1, 0] {
        let prefix = test_prefix();
        let port = free_port();
        let mut cmd = bin_command(&fresh_db().await);
        cmd.arg("serve")
            .args(s3_flags("s3", &prefix, &endpoint))
            .env("S3_PUTS_WHILE_RECEIVING", places.to_string());
        let _svc = spawn_service(cmd, port).await;
        let base = format!("http://127.0.0.1:{port}");
        let (ws, token) = register_poll(&base).await;
        let body = raw_multipart("XqzBound", &[("a.bin", &bytes(3 << 20, 7))], b"--\r\n");
        // The first holds the replica's place through its pause, which lasts until the second
        // has been answered and counted.
        let len = body.len();
        let (release, released) = tokio::sync::oneshot::channel();
        let first = async {
            let paused = paused_until(body.clone(), len / 2, async { released.await.ok() });
            post_raw(&base, ws, &token, paused, len).await.status()
        };
        let second = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let whole = body.clone().into();
            let status = post_raw(&base, ws, &token, whole, len).await.status();
            let counted = metric_value(&scrape_metrics(&base).await, written);
            let _ = release.send(());
            (status, counted)
        };
        let (first, (second, after_second)) = tokio::join!(first, second);
        assert_eq!((first, second), (StatusCode::OK, StatusCode::OK));
        assert_eq!(
            after_second, None,
            "{places}: the second upload found no place"
        );
        let total = metric_value(&scrape_metrics(&base).await, written);
        assert_eq!(total, (places > 0).then_some(1.0), "{places}");
    }
}

/// A file whose size was foreseen wrong (it is not the last) is put again after its receive:
/// `put_again`, as README says, not `stopped` (a request that failed), which it was counted
/// as before (a black-box probe). The file after it is foreseen right: `written`.
#[tokio::test]
async fn a_wrong_size_guess_counts_as_put_again() {
    let (endpoint, _) = s3_endpoint();
    let prefix = test_prefix();
    let port = free_port();
    let mut cmd = bin_command(&fresh_db().await);
    cmd.arg("serve").args(s3_flags("s3", &prefix, &endpoint));
    let _svc = spawn_service(cmd, port).await;
    let base = format!("http://127.0.0.1:{port}");
    let (ws, token) = register_poll(&base).await;
    let (a, b) = (bytes(3 << 20, 1), bytes(3 << 20, 2));
    let body = raw_multipart("XqzBound", &[("a.bin", &a), ("b.bin", &b)], b"--\r\n");
    let len = body.len();
    let resp = post_raw(&base, ws, &token, body.into(), len).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = scrape_metrics(&base).await;
    let count = |outcome: &str| {
        metric_value(
            &text,
            &format!("pending_uploads_s3_puts_while_receiving_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(
        (count("put_again"), count("written"), count("stopped")),
        (Some(1.0), Some(1.0), None),
        "{text}"
    );
}

/// Two things only the log can tell an operator (a black-box probe):
/// - a live row whose object was deleted out of band answers 404, to a GET and to a HEAD
///   (which said 200 from the row alone), and now logs its failed transition (SPEC §8)
///   instead of nothing;
/// - a replica rolled back to bytea without the bucket, over rows whose bytes live only in
///   S3, says so at start-up instead of only answering 503 for each.
#[tokio::test]
async fn lost_objects_and_an_unreadable_bucket_are_logged() {
    let (endpoint, bucket) = s3_endpoint();
    let db = fresh_db().await;
    let prefix = test_prefix();
    let port = free_port();
    let mut cmd = bin_command(&db);
    cmd.arg("serve").args(s3_flags("s3", &prefix, &endpoint));
    let mut svc = spawn_service(cmd, port).await;
    let base = format!("http://127.0.0.1:{port}");
    let (ws, token) = register_poll(&base).await;
    let body = raw_multipart("XqzBound", &[("lost.bin", &bytes(1000, 3))], b"--\r\n");
    let len = body.len();
    let resp = post_raw(&base, ws, &token, body.into(), len).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let fid = file_id(&resp.json::<Value>().await.unwrap()["files"][0]);
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let key: String = sqlx::query_scalar("SELECT s3_key FROM pending_uploads WHERE file_id = $1")
        .bind(fid)
        .fetch_one(&pool)
        .await
        .unwrap();
    s3_client(&endpoint)
        .delete_object()
        .bucket(&bucket)
        .key(&key)
        .send()
        .await
        .unwrap();
    // HEAD answers as its GET does (it said 200 from the row alone), and is logged as well.
    let content = format!("{base}/workspaces/{ws}/pending-uploads/{fid}/content");
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let resp = reqwest::Client::new()
            .request(method.clone(), &content)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method}");
    }
    let out = svc.terminate().await;
    let failed: Vec<Value> = log_lines(&out.stderr)
        .into_iter()
        .filter(|l| l["message"] == "upload not served")
        .collect();
    assert_eq!(failed.len(), 2, "the GET and the HEAD are logged");
    for line in &failed {
        assert_eq!(line["event"], "failed");
        assert_eq!(line["file_id"], fid.to_string());
    }

    let port = free_port();
    let mut cmd = bin_command(&db);
    cmd.arg("serve");
    let mut svc = spawn_service(cmd, port).await;
    let out = svc.terminate().await;
    assert!(
        log_lines(&out.stderr).iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("some rows' bytes live only in S3"))),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A proxy to `endpoint` that holds every byte from the moment the flag is set (S3 frozen, as
/// a SIGSTOPped server is): its URL and the flag.
async fn freezable_proxy(endpoint: &str) -> (String, Arc<std::sync::atomic::AtomicBool>) {
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holds = frozen.clone();
    let hook: ProxyHook = Arc::new(move |_piece: &[u8]| {
        let hold = holds.load(std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            if hold {
                std::future::pending::<()>().await;
            }
        })
    });
    (proxy(endpoint, hook).await, frozen)
}

/// Bytes of the files `pid` holds open under `dir` (its spool files: unnamed, so only open
/// descriptors show them).
fn spool_bytes_held(pid: u32, dir: &std::path::Path) -> u64 {
    let prefix = dir.to_string_lossy().to_string();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let path = e.ok()?.path();
            let target = std::fs::read_link(&path).ok()?;
            target
                .to_string_lossy()
                .starts_with(&prefix)
                .then_some(path)
        })
        .filter_map(|fd| std::fs::metadata(fd).ok())
        // The disk space, not the length: a request's files share one file, and each one's
        // region is freed by punching it out.
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .sum()
}

/// S3 frozen for a whole upload (a black-box probe SIGSTOPped LocalStack):
/// - the 503 comes within DEPENDENCY_TIMEOUT. Before, a PUT alongside the receive that
///   failed late without stalling (here the connection closes; with LocalStack stopped, the
///   SDK's own stalled-stream check after its 5 s grace) was put again with a whole new
///   timeout: 13.5 s here, 18.5 s for the probe's 6 MB with a 10 s timeout;
/// - the spool file's disk space is given back with the 503. Before, the abandoned PUT's
///   connection kept the unnamed file open until S3 came back: each retry pinned another
///   file, and the spool disk filled up.
#[tokio::test]
async fn a_frozen_s3_costs_an_upload_one_timeout_and_no_spool_space() {
    let (endpoint, _) = s3_endpoint();
    let (via, frozen) = freezable_proxy(&endpoint).await;
    let spool = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cmd = bin_command(&fresh_db().await);
    cmd.arg("serve")
        .args(s3_flags("s3", &test_prefix(), &via))
        .env("DEPENDENCY_TIMEOUT", "6s")
        .env("SPOOL_DIR", spool.path());
    let svc = spawn_service(cmd, port).await;
    let pid = svc.0.as_ref().unwrap().id();
    let base = format!("http://127.0.0.1:{port}");
    let (ws, token) = register_poll(&base).await;
    frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    let body = raw_multipart("XqzBound", &[("six.bin", &bytes(6_000_000, 6))], b"--\r\n");
    let len = body.len();
    let started = std::time::Instant::now();
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        post_raw(&base, ws, &token, body.into(), len),
    )
    .await
    .expect("an answer");
    let took = started.elapsed();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    // DEPENDENCY_TIMEOUT, the receive, and the watchdog's quarter-timeout steps.
    assert!(took < Duration::from_secs(9), "503 after {took:?}");
    let held = spool_bytes_held(pid, spool.path());
    assert_eq!(held, 0, "spool bytes still held after the 503");

    // A client that goes half way through its file, its PUT alongside already sending: the
    // unfinished spool file's space goes too (a review found the fix above missed it).
    let body = raw_multipart(
        "XqzBound",
        &[("gone.bin", &bytes(20_000_000, 7))],
        b"--\r\n",
    );
    let head = format!(
        "POST /workspaces/{ws}/chat/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: multipart/form-data; boundary=XqzBound\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut sock, head.as_bytes())
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut sock, &body[..19_000_000])
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while spool_bytes_held(pid, spool.path()) == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        spool_bytes_held(pid, spool.path()) > 0,
        "the part is being spooled"
    );
    drop(sock);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while spool_bytes_held(pid, spool.path()) > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = spool_bytes_held(pid, spool.path());
    assert_eq!(held, 0, "spool bytes still held after the client went");
    frozen.store(false, std::sync::atomic::Ordering::SeqCst);
}

/// A PUT alongside the receive that the server stops taking bytes from just as the client
/// finishes (every byte after the client's pause is held by a proxy) is a 503 within
/// DEPENDENCY_TIMEOUT: the watchdog counts the server's stall again once the PUT no longer
/// waits on the client (a first version left it blind from then on).
#[tokio::test]
async fn a_server_that_stalls_when_the_client_is_done_is_a_503() {
    let (endpoint, _) = s3_endpoint();
    let (via, frozen) = freezable_proxy(&endpoint).await;
    let app = s3_app_with_dependency_timeout(&via, "1s").await;
    let (ws, token) = app.poll_workspace().await;
    let body = raw_multipart("XqzBound", &[("a.bin", &bytes(3 << 20, 8))], b"--\r\n");
    let len = body.len();
    let body = bytes::Bytes::from(body);
    let (first, rest) = (body.slice(..len - 100), body.slice(len - 100..));
    let freeze = frozen.clone();
    let stream = futures::stream::iter([first, rest])
        .enumerate()
        .then(move |(i, chunk)| {
            let freeze = freeze.clone();
            async move {
                if i == 1 {
                    // The PUT has all but the held-back tail and waits on the client.
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    freeze.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                Ok::<_, std::io::Error>(chunk)
            }
        });
    let started = std::time::Instant::now();
    let resp = tokio::time::timeout(
        Duration::from_secs(15),
        post_raw(
            &app.url,
            ws,
            &token,
            reqwest::Body::wrap_stream(stream),
            len,
        ),
    )
    .await
    .expect("an answer, not a wait on a stalled server");
    let took = started.elapsed();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(took < Duration::from_secs(6), "503 after {took:?}");
    app.assert_nothing_staged().await;
}

/// A HEAD of a file whose bytes are only in S3 asks the bucket, so it takes a download slot
/// as its GET does: with the workspace's slots held by readers that stopped reading it is a
/// 429, with the replica's a 503 (both with Retry-After), and it is answered once they go.
#[tokio::test]
async fn a_head_that_asks_s3_waits_for_no_slot_it_cannot_have() {
    let (endpoint, _) = s3_endpoint();
    let db = fresh_db().await;
    let prefix = test_prefix();
    let port = free_port();
    let mut cmd = bin_command(&db);
    cmd.arg("serve")
        .args(s3_flags("s3", &prefix, &endpoint))
        .env("MAX_CONCURRENT_DOWNLOADS", "2")
        .env("MAX_CONCURRENT_DOWNLOADS_PER_WORKSPACE", "1")
        // Held by the slots alone: the rate rule would cut these readers on its own.
        .env("RESPONSE_MIN_RATE", "0");
    let mut svc = spawn_service(cmd, port).await;
    let addr = format!("127.0.0.1:{port}");
    let base = format!("http://{addr}");
    let mut staged = Vec::new();
    for seed in 0..3 {
        let (ws, token) = register_poll(&base).await;
        let body = raw_multipart(
            "XqzBound",
            &[("big.bin", &bytes(16 << 20, seed))],
            b"--\r\n",
        );
        let len = body.len();
        let resp = post_raw(&base, ws, &token, body.into(), len).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let fid = file_id(&resp.json::<Value>().await.unwrap()["files"][0]);
        staged.push((ws, token, fid));
    }
    let content = |i: usize| {
        let (ws, _, fid) = &staged[i];
        format!("{base}/workspaces/{ws}/pending-uploads/{fid}/content")
    };
    let head = |i: usize| {
        reqwest::Client::new()
            .head(content(i))
            .bearer_auth(&staged[i].1)
            .send()
    };
    // A GET whose reader takes 4 KiB and then nothing.
    let stalled = |i: usize| {
        let (ws, token, fid) = &staged[i];
        let request = format!(
            "GET /workspaces/{ws}/pending-uploads/{fid}/content HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        let addr = addr.clone();
        async move {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.set_recv_buffer_size(4096).unwrap();
            let mut sock = sock.connect(addr.parse().unwrap()).await.unwrap();
            sock.write_all(request.as_bytes()).await.unwrap();
            sock
        }
    };
    let in_progress = "pending_uploads_downloads_in_progress";
    let a = stalled(0).await;
    wait_for_metric(&base, in_progress, 1.0).await;
    let resp = head(0).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "2");
    let b = stalled(1).await;
    wait_for_metric(&base, in_progress, 2.0).await;
    let resp = head(2).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "2");
    drop((a, b));
    wait_for_metric(&base, in_progress, 0.0).await;
    for i in 0..3 {
        let resp = head(i).await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "HEAD {i} once the slots are back"
        );
        assert_eq!(resp.headers()["content-length"], (16u64 << 20).to_string());
    }
    svc.terminate().await;
    let app = TestApp::start_s3(db, "s3", &prefix).await;
    sweep_all_and_assert_bucket_empty(&app).await;
}

/// The files of a request that go to disk share one temp file in the S3 modes too. There a
/// part whose size the body's length foretells as the last one's has its PUT run alongside
/// its receive, and that guess is right only for the last part: each earlier part had a file
/// of its own, open until the commit (64 for 64 files, a review's find). Here 64 files held in
/// flight keep one spool descriptor, and every file comes back byte for byte.
#[tokio::test]
async fn a_requests_files_share_one_spool_file_in_s3_mode() {
    let (endpoint, _) = s3_endpoint();
    let db = fresh_db().await;
    let prefix = test_prefix();
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("spool");
    std::fs::create_dir(&dir).unwrap();
    let port = free_port();
    let mut cmd = bin_command(&db);
    cmd.arg("serve")
        .args(s3_flags("s3", &prefix, &endpoint))
        .env("SPOOL_DIR", &dir)
        .env("SPOOL_MEMORY_PER_REQUEST", "65536");
    let mut svc = spawn_service(cmd, port).await;
    let pid = svc.0.as_ref().unwrap().id().to_string();
    let addr = format!("127.0.0.1:{port}");
    let (ws, token) = register_poll(&format!("http://{addr}")).await;
    let open = sixty_four_files_held(&addr, ws, &token, &pid, &dir).await;
    assert_eq!(open, 1, "spool files open for one request");
    assert_eq!(files_open_in(&pid, &dir), 0, "the spool file closed");
    svc.terminate().await;
    let app = TestApp::start_s3(db, "s3", &prefix).await;
    sweep_all_and_assert_bucket_empty(&app).await;
}

/// SPEC §10 (no lost acknowledged upload): an upload's objects wait for its rows, and the
/// orphan reconciliation takes an object older than ORPHAN_GRACE that no row points at for an
/// orphan. A commit that waited on its workspace's lock past the grace answered 200 for a file
/// whose object the reconciliation had just deleted (a red team: UPLOAD_BODY_TIMEOUT=1s,
/// ORPHAN_GRACE=2s, the lock held 4.5 s, under the 5 s a commit waits for it). It is cut at
/// three quarters of the grace now: 503, and no row without its object.
#[tokio::test]
async fn a_commit_never_outlasts_the_grace_its_objects_have() {
    let prefix = test_prefix();
    let db = fresh_db().await;
    let (mut svc, base) = child_service(
        &db,
        &prefix,
        &[
            ("PENDING_UPLOADS_BACKEND", "s3"),
            ("UPLOAD_BODY_TIMEOUT", "1s"),
            ("ORPHAN_GRACE", "2s"),
            ("SWEEP_INTERVAL", "1s"),
        ],
    )
    .await;
    let (ws, token) = register_poll(&base).await;
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let lock = hold_workspace_lock(&pool, ws).await;
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(4500)).await;
        lock.release().await;
    });
    let body = "--XB\r\nContent-Disposition: form-data; name=\"files\"; filename=\"late.txt\"\r\n\r\nlate bytes\r\n--XB--\r\n";
    let resp = post_upload(&base, ws, &token, body).await;
    let status = resp.status();
    let text = resp.text().await.unwrap();
    release.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    // Whatever the reconciliation did meanwhile, no row points at a deleted object.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT file_id, s3_key FROM pending_uploads WHERE workspace_id = $1")
            .bind(ws)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(rows.is_empty(), "a refused upload leaves no row: {rows:?}");
    let out = svc.terminate().await;
    // Its wait for the lock ended in the database too (else the statement would have gone
    // on waiting there, and committed after the 503): nothing written, its object deleted.
    let lines = log_lines(&out.stderr);
    let said = |message: &str| lines.iter().filter(|l| l["message"] == message).count();
    assert_eq!(
        said("upload not staged"),
        1,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(said("object of a failed upload removed"), 1);
    assert_eq!(
        said("upload commit outcome unknown: objects left to the orphan reconciliation"),
        0
    );
}

/// SPEC §4 (never a 200 with a short body) and §6 (`dual` falls back to its bytea copy when
/// S3 fails): an object cut short out of band answered 200 with its row's Content-Length and
/// no bytes, a Range inside what was left 206 with none either, in every mode, and `dual`
/// never read its intact bytea copy (a red team). S3's answer is checked against the range
/// asked for now: a `dual` row is served from its copy, an S3-only row is a 404 (GET, Range
/// and HEAD alike), and a body that ends short is its source's failure.
#[tokio::test]
async fn an_object_cut_short_out_of_band_is_not_the_rows_bytes() {
    let prefix = test_prefix();
    let app = TestApp::start_s3(fresh_db().await, "dual", &prefix).await;
    let (ws, token) = app.poll_workspace().await;
    let files = vec![
        ("copy.bin", "application/octet-stream", bytes(300_000, 5)),
        ("only.bin", "application/octet-stream", bytes(300_000, 6)),
    ];
    let out = app.upload_ok(ws, &token, &files).await;
    let (copy, only) = (file_id(&out[0]), file_id(&out[1]));
    let (endpoint, bucket) = s3_endpoint();
    let s3 = s3_client(&endpoint);
    for fid in [copy, only] {
        let key = row_placement(&app, fid).await.1.expect("an object key");
        s3.put_object()
            .bucket(&bucket)
            .key(key)
            .body(aws_sdk_s3::primitives::ByteStream::from(vec![0u8; 1000]))
            .send()
            .await
            .unwrap();
    }
    sqlx::query("UPDATE pending_uploads SET content = NULL WHERE file_id = $1")
        .bind(only)
        .execute(&app.pool)
        .await
        .unwrap();
    let content = |fid: Uuid| format!("/workspaces/{ws}/pending-uploads/{fid}/content");
    let get = |fid: Uuid, range: Option<&'static str>| {
        let mut req = app.client.get(app.at(&content(fid))).bearer_auth(&token);
        if let Some(range) = range {
            req = req.header("Range", range);
        }
        req.send()
    };

    let resp = get(copy, None).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.bytes().await.unwrap() == files[0].2[..],
        "the bytea copy, whole"
    );
    let resp = get(copy, Some("bytes=500-1499")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert!(
        resp.bytes().await.unwrap() == files[0].2[500..1500],
        "the bytea copy's range"
    );

    for range in [None, Some("bytes=500-1499"), Some("bytes=0-99")] {
        assert_json(
            get(only, range).await.unwrap(),
            StatusCode::NOT_FOUND,
            json!({"error": "pending upload not found or expired"}),
        )
        .await;
    }
    let head = app
        .client
        .head(app.at(&content(only)))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
}

/// A `sweep` run by cron whose orphan reconciliation failed said `orphans_deleted: 0` and
/// exited 0 (a red team): cron could not tell. Its report says so now, and it exits 1.
#[tokio::test]
async fn a_sweep_whose_reconciliation_failed_says_so_and_fails() {
    let prefix = test_prefix();
    let db = fresh_db().await;
    let unreachable = closed_endpoint();
    let out = cli(&db, &prefix, &["migrate"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&db, &prefix, &["sweep"])
        .env("AWS_ENDPOINT_URL", &unreachable)
        .env("ORPHAN_GRACE", "0")
        .env("DEPENDENCY_TIMEOUT", "1s")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = stdout_json(&out);
    assert_eq!(report["orphan_reconciliation_failed"], true, "{report}");
    assert_eq!(report["swept_rows"], 0);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the orphan reconciliation failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `backfill` and `contract` against a bucket that is not there failed every row as if S3
/// were down for a moment (`S3 unavailable for 4 rows in a row`; an operator red team): they
/// say so and stop before the first row.
#[tokio::test]
async fn migration_runs_against_a_missing_bucket_say_so() {
    let prefix = test_prefix();
    let db = fresh_db().await;
    let app = TestApp::start_on(db.clone(), &[]).await;
    let (ws, token) = app.poll_workspace().await;
    app.upload_ok(ws, &token, &[("a.txt", "text/plain", bytes(10, 1))])
        .await;
    let missing = format!("no-such-bucket-{}", Uuid::new_v4().simple());
    for args in [&["backfill", "--no-progress"][..], &["contract"]] {
        let out = cli(&db, &prefix, args)
            .env("PENDING_UPLOADS_S3_BUCKET", &missing)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("the bucket {missing} does not exist")),
            "{args:?}: {stderr}"
        );
    }
    let copied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pending_uploads WHERE s3_key IS NOT NULL")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(copied, 0);
}

/// A `sweep` run without the bucket setting swept rows whose objects it could not delete
/// and exited 0 (a red team): its report's `object_errors` was the only sign. It exits 1 now.
#[tokio::test]
async fn a_sweep_that_left_objects_behind_fails() {
    let prefix = test_prefix();
    let db = fresh_db().await;
    let app = TestApp::start_s3(db.clone(), "s3", &prefix).await;
    let (ws, token) = app.poll_workspace().await;
    let out = app
        .upload_ok(
            ws,
            &token,
            &[("a.bin", "application/octet-stream", bytes(100, 2))],
        )
        .await;
    let key = app.storage.s3().unwrap().key_for(ws, file_id(&out[0]));
    sqlx::query("UPDATE pending_uploads SET expires_at = now() - interval '1 second'")
        .execute(&app.pool)
        .await
        .unwrap();
    let out = cli(&db, &prefix, &["sweep"])
        .env_remove("PENDING_UPLOADS_S3_BUCKET")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let report = stdout_json(&out);
    assert_eq!(
        (
            report["swept_rows"].as_u64(),
            report["object_errors"].as_u64()
        ),
        (Some(1), Some(1)),
        "{report}"
    );
    assert!(
        stderr.contains("1 swept rows' S3 objects could not be deleted"),
        "{stderr}"
    );
    assert!(app.object_keys().await.contains(&key));
    app.storage.delete_object(&key).await.unwrap();
}

/// SPEC §8, counts by backend: a row with both copies was counted `dual` staged and acked,
/// and `s3` swept (a red team), so acked minus swept drifted per backend on a dashboard.
#[tokio::test]
async fn a_dual_row_is_swept_as_dual() {
    let swept = || {
        pending_uploads::metrics::metrics()
            .files_swept
            .with_label_values(&["dual", "expired"])
            .get()
    };
    let before = swept();
    let app = TestApp::start_s3(fresh_db().await, "dual", &test_prefix()).await;
    let (ws, token) = app.poll_workspace().await;
    app.upload_ok(ws, &token, &[("d.txt", "text/plain", b"both".to_vec())])
        .await;
    sweep_all_and_assert_bucket_empty(&app).await;
    assert!(swept() > before, "counted as the dual row it was");
}

/// `backfill` spools each copy through a file, as `serve` spools uploads: in SPOOL_DIR, which
/// it ignored for the system temp dir (a red team), so a host with a small /tmp that set
/// SPOOL_DIR for the service ran its backfill out of space. A SPOOL_DIR it cannot make is
/// named at once.
#[tokio::test]
async fn backfill_spools_where_spool_dir_says() {
    let prefix = test_prefix();
    let db = fresh_db().await;
    let out = cli(&db, &prefix, &["migrate"]).output().unwrap();
    assert!(out.status.success());
    let out = cli(&db, &prefix, &["backfill", "--no-progress"])
        .env("SPOOL_DIR", "/dev/null/spool")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("creating SPOOL_DIR /dev/null/spool"), "{err}");
    let here = tempfile::tempdir().unwrap();
    let out = cli(&db, &prefix, &["backfill", "--no-progress"])
        .env("SPOOL_DIR", here.path().join("made"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(here.path().join("made").is_dir(), "made as serve makes it");
}

/// S3 frozen (a server that takes connections and never answers): `contract` checked a whole
/// batch of 500, eight at a time, each waiting out DEPENDENCY_TIMEOUT, before it looked at an
/// error (about ten minutes a batch at the default), and `backfill` let every row wait out
/// its retries (a red team). The first S3 error now ends contract's batch, and backfill stops
/// after as many rows in a row as it copies at once found S3 unavailable; what was done stays
/// done, and a rerun takes up the rest.
#[tokio::test]
async fn contract_and_backfill_give_up_on_a_frozen_s3_at_once() {
    let prefix = test_prefix();
    let db = fresh_db().await;
    let app = TestApp::start_s3(db.clone(), "dual", &prefix).await;
    let (ws, token) = app.poll_workspace().await;
    let files: Vec<(String, Vec<u8>)> = (0..64)
        .map(|i| (format!("f{i}.txt"), bytes(100, i as u8)))
        .collect();
    let parts: Vec<(&str, &str, Vec<u8>)> = files
        .iter()
        .map(|(n, b)| (n.as_str(), "text/plain", b.clone()))
        .collect();
    app.upload_ok(ws, &token, &parts).await;
    let (endpoint, _) = s3_endpoint();
    let (frozen_s3, frozen) = freezable_proxy(&endpoint).await;
    frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    let timed = |args: &'static [&'static str]| {
        let mut cmd = cli(&db, &prefix, args);
        cmd.env("AWS_ENDPOINT_URL", &frozen_s3)
            .env("DEPENDENCY_TIMEOUT", "1s")
            .env("BACKFILL_RETRIES", "0");
        async move {
            let started = std::time::Instant::now();
            let out = tokio::process::Command::from(cmd).output().await.unwrap();
            (out, started.elapsed())
        }
    };
    let (out, took) = timed(&["contract"]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("run contract again"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 64 checks, eight at a time, each its DEPENDENCY_TIMEOUT: 8 s and more before.
    assert!(took < Duration::from_secs(5), "contract took {took:?}");
    assert_eq!(row_keys(&app).await.len(), 64, "nothing released");

    sqlx::query("UPDATE pending_uploads SET s3_key = NULL")
        .execute(&app.pool)
        .await
        .unwrap();
    let (out, took) = timed(&["backfill", "--no-progress", "--concurrency", "4"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("S3 unavailable for 4 rows in a row"), "{err}");
    // 64 rows, four at a time, each its DEPENDENCY_TIMEOUT: 16 s and more before.
    assert!(took < Duration::from_secs(8), "backfill took {took:?}");
    // Its summary on stdout all the same (before: stdout empty, the counts only in the error).
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: stdout {:?}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(report["stopped"], "s3_unavailable", "{report}");
    assert_eq!(report["rows_total"], 64, "{report}");
    assert_eq!(report["migrated"], 0, "{report}");
}
