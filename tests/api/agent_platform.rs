//! The agent against a platform that is broken or hostile: a fake platform in the test
//! process answers each route as a scenario says, and the agent binary runs one pass
//! (`--once`) against it. A laptop's disk, memory and index must not be the platform's to
//! spoil (a black-box probe found each of these).

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    body::Body,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use futures::StreamExt;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::*;

/// How the fake platform answers.
#[derive(Clone, Copy)]
enum Scenario {
    /// The pending list holds one file twice, under a `uri` that is not its own; its
    /// content is whole at the first GET and cut after 100 bytes at the next.
    Duplicate,
    /// The content never ends.
    EndlessContent,
    /// The file is listed as 10 GB, and its content never ends.
    HugeListing,
    /// A feed row with its id alone, and a pending entry that is no upload before the file.
    OddEntries,
    /// The pending list never ends.
    EndlessList,
    /// The activity feed answers 410 to everything, a cursor or none.
    AlwaysGone,
    /// One file, as the service lists and serves it.
    Plain,
    /// Nothing pending.
    Nothing,
    /// Every route answers 401, as for a revoked token.
    Revoked,
    /// One file, to the bearer `tok` only.
    Authed,
    /// The pending list comes a byte every 200 ms.
    DripList,
    /// The content comes a byte every 200 ms.
    DripContent,
    /// The feed answers 503 to its first 12 requests, then nothing new.
    DownThenUp,
    /// The pending list redirects to another host (`localhost`), which redirects to itself.
    RedirectList,
    /// The content redirects so.
    RedirectContent,
    /// The pending list is the file's entry followed by 30 MiB of `{"":0}` entries.
    AmplifiedList,
    /// One file, listed again after every ack.
    AckIgnored,
    /// One file, under a new name at every listing.
    Renamed,
    /// The feed answers 410 to every cursor, and a new row to none.
    ForgetfulFeed,
    /// The content answers 401 with words that look like log fields.
    FieldsInWords,
    /// The feed answers 401 with a body that never ends.
    RefusedFeedEndlessly,
    /// The content answers 401 with a body that never ends.
    RefusedContentEndlessly,
    /// The content answers 401 with a body that comes a byte every 200 ms.
    RefusedContentSlowly,
    /// The feed answers 400 to a long poll (`wait=`), a row to no cursor, nothing new else.
    NoLongPoll,
}

const DATA: &[u8] = &[7u8; 10_000];

#[derive(Clone)]
struct Fake {
    scenario: Scenario,
    ws: Uuid,
    file: Uuid,
    /// The fake's port: a redirect names it as `localhost`, another host to a client.
    port: u16,
    activity: Arc<AtomicUsize>,
    pending: Arc<AtomicUsize>,
    content: Arc<AtomicUsize>,
    /// Requests that followed a redirect.
    hops: Arc<AtomicUsize>,
    /// Feed requests that asked to wait (`wait=`).
    waits: Arc<AtomicUsize>,
}

fn entry(f: &Fake) -> Value {
    let size = match f.scenario {
        Scenario::HugeListing => 10_000_000_000u64,
        _ => DATA.len() as u64,
    };
    let name = match f.scenario {
        Scenario::Renamed => format!("name{}.txt", f.pending.load(Ordering::SeqCst)),
        _ => "one.txt".into(),
    };
    json!({
        "file_id": f.file,
        "name": name,
        "mimeType": "text/plain",
        "size": size,
        "uri": "https://attacker.example/steal",
        "created_at": "2026-12-05T00:00:00Z",
        "expires_at": "2099-12-05T00:00:00Z",
        "fetched_at": null,
    })
}

/// `piece`, a byte every 200 ms, then for ever nothing more.
fn drip(piece: &'static [u8]) -> Body {
    let bytes = futures::stream::iter(piece.iter().copied()).then(|b| async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b]))
    });
    Body::from_stream(bytes.chain(futures::stream::pending()))
}

/// A body of `piece` repeated for ever.
fn endless(piece: &'static [u8]) -> Body {
    let chunk = bytes::Bytes::from_static(piece);
    Body::from_stream(futures::stream::repeat_with(move || {
        Ok::<_, std::io::Error>(chunk.clone())
    }))
}

/// A 401 unless the scenario's bearer is sent (any bearer but for `Revoked` and `Authed`).
fn refused(f: &Fake, headers: &axum::http::HeaderMap) -> Option<Response> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let refuse = match f.scenario {
        Scenario::Revoked => true,
        Scenario::Authed => bearer != "Bearer tok",
        _ => false,
    };
    refuse.then(|| {
        (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid workspace auth token"})),
        )
            .into_response()
    })
}

/// What [`Scenario::FieldsInWords`] says: a log line's fields of its own, once unquoted.
const FORGED: &str = "revoked event=agent_forged file_id=00000000-0000-0000-0000-000000000000";

/// A 401 whose body never ends.
fn refused_endlessly() -> Response {
    (StatusCode::UNAUTHORIZED, endless(&[b'x'; 16 * 1024])).into_response()
}

/// A redirect to the fake itself under another host name (`localhost`): reqwest drops the
/// token on that hop, and sent it again on the next one, to that host's own `/hop2`.
fn redirect_away(f: &Fake) -> Response {
    let to = format!("http://localhost:{}/hop", f.port);
    (StatusCode::FOUND, [("location", to)]).into_response()
}

async fn hop(State(f): State<Fake>) -> Response {
    f.hops.fetch_add(1, Ordering::SeqCst);
    (StatusCode::FOUND, [("location", "/hop2")]).into_response()
}

async fn activity(
    State(f): State<Fake>,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let nth = f.activity.fetch_add(1, Ordering::SeqCst);
    if let Some(no) = refused(&f, &headers) {
        return no;
    }
    let cursor = uri.query().is_some_and(|q| q.contains("since_id="));
    let waits = uri.query().is_some_and(|q| q.contains("wait="));
    if waits {
        f.waits.fetch_add(1, Ordering::SeqCst);
    }
    match f.scenario {
        Scenario::RefusedFeedEndlessly => refused_endlessly(),
        Scenario::NoLongPoll if waits => (StatusCode::BAD_REQUEST, "{}").into_response(),
        Scenario::NoLongPoll if !cursor => axum::Json(json!([{"id": f.file}])).into_response(),
        Scenario::ForgetfulFeed if cursor => (StatusCode::GONE, "{}").into_response(),
        Scenario::ForgetfulFeed => axum::Json(json!([{"id": Uuid::new_v4()}])).into_response(),
        Scenario::DownThenUp if nth < 12 => (StatusCode::SERVICE_UNAVAILABLE, "{}").into_response(),
        Scenario::AlwaysGone => (StatusCode::GONE, "{}").into_response(),
        Scenario::OddEntries => axum::Json(json!([{"id": f.file}])).into_response(),
        _ => axum::Json(json!([])).into_response(),
    }
}

async fn pending(State(f): State<Fake>, headers: axum::http::HeaderMap) -> Response {
    if let Some(no) = refused(&f, &headers) {
        return no;
    }
    let listed = entry(&f);
    f.pending.fetch_add(1, Ordering::SeqCst);
    match f.scenario {
        Scenario::RedirectList => redirect_away(&f),
        Scenario::AmplifiedList => {
            let mut list = format!("[{listed}");
            while list.len() < 30 << 20 {
                list.push_str(r#",{"":0}"#);
            }
            list.push(']');
            ([("content-type", "application/json")], list).into_response()
        }
        Scenario::Renamed => axum::Json(json!([listed])).into_response(),
        Scenario::Nothing => axum::Json(json!([])).into_response(),
        Scenario::Duplicate => axum::Json(json!([entry(&f), entry(&f)])).into_response(),
        Scenario::OddEntries => {
            axum::Json(json!([{"file_id": "not-a-uuid", "size": "big"}, entry(&f)])).into_response()
        }
        Scenario::DripList => drip(b"[                                        ]").into_response(),
        Scenario::EndlessList => {
            let mut resp = endless(b"[[[[[[[[[[[[[[[[                ").into_response();
            resp.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            resp
        }
        _ => axum::Json(json!([entry(&f)])).into_response(),
    }
}

async fn content(State(f): State<Fake>, headers: axum::http::HeaderMap) -> Response {
    let nth = f.content.fetch_add(1, Ordering::SeqCst);
    if let Some(no) = refused(&f, &headers) {
        return no;
    }
    match f.scenario {
        Scenario::EndlessContent | Scenario::HugeListing => {
            endless(&[7u8; 16 * 1024]).into_response()
        }
        Scenario::DripContent => drip(DATA).into_response(),
        Scenario::RedirectContent => redirect_away(&f),
        Scenario::FieldsInWords => (StatusCode::UNAUTHORIZED, FORGED).into_response(),
        Scenario::RefusedContentEndlessly => refused_endlessly(),
        Scenario::RefusedContentSlowly => (StatusCode::UNAUTHORIZED, drip(DATA)).into_response(),
        Scenario::Duplicate if nth > 0 => {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let cut = futures::stream::iter([
                Ok(bytes::Bytes::from_static(&DATA[..100])),
                Err(std::io::Error::other("cut")),
            ]);
            Body::from_stream(cut).into_response()
        }
        _ => DATA.into_response(),
    }
}

async fn ack() -> StatusCode {
    StatusCode::OK
}

/// The fake platform for `scenario`, and its state.
async fn fake_platform(scenario: Scenario) -> (String, Fake) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake = Fake {
        scenario,
        ws: Uuid::new_v4(),
        file: Uuid::new_v4(),
        port: listener.local_addr().unwrap().port(),
        activity: Default::default(),
        pending: Default::default(),
        content: Default::default(),
        hops: Default::default(),
        waits: Default::default(),
    };
    let app = Router::new()
        .route("/workspaces/{ws}/activity", get(activity))
        .route("/workspaces/{ws}/pending-uploads", get(pending))
        .route(
            "/workspaces/{ws}/pending-uploads/{file}/content",
            get(content),
        )
        .route("/workspaces/{ws}/pending-uploads/{file}/ack", post(ack))
        .route("/hop", get(hop))
        .route("/hop2", get(hop))
        .with_state(fake.clone());
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, fake)
}

/// One pass, as [`agent_once`], that must end within 30 s and succeed.
async fn passed_once(base: &str, ws: Uuid, dir: &Path) -> std::process::Output {
    let out = agent_once(base, ws, dir, Duration::from_secs(30))
        .await
        .expect("the pass ended");
    assert_passed(&out);
    out
}

/// One `agent --once --retries 0` against `base`; `None` when it had not ended within
/// `within` (it is killed).
async fn agent_once(
    base: &str,
    ws: Uuid,
    dir: &Path,
    within: Duration,
) -> Option<std::process::Output> {
    agent_once_with(base, ws, dir, within, &[]).await
}

async fn agent_once_with(
    base: &str,
    ws: Uuid,
    dir: &Path,
    within: Duration,
    extra: &[&str],
) -> Option<std::process::Output> {
    let token_file = dir.parent().unwrap().join("token");
    std::fs::write(&token_file, "tok").unwrap();
    let mut cmd = agent(base, ws, &token_file, dir);
    cmd.args(["--once", "--retries", "0"]).args(extra);
    finished_within(cmd, within).await
}

/// The agent daemon for workspace `ws` of the platform at `base`, with the token `tok` in a
/// file under `home` and its folder `dir`, polling every `interval`.
fn daemon(
    base: &str,
    ws: Uuid,
    home: &Path,
    dir: &Path,
    interval: &str,
) -> tokio::process::Command {
    let token_file = home.join("token");
    std::fs::write(&token_file, "tok").unwrap();
    let mut cmd = agent(base, ws, &token_file, dir);
    cmd.args(["--poll-interval", interval]);
    cmd
}

/// The agent binary for workspace `ws` of the platform at `base`, logging JSON, with the
/// token in `token_file` and its folder `dir`.
fn agent(base: &str, ws: Uuid, token_file: &Path, dir: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.env_clear()
        .env("LOG_FORMAT", "json")
        .args(["agent", "--platform-url", base])
        .arg("--workspace-id")
        .arg(ws.to_string())
        .arg("--token-file")
        .arg(token_file)
        .arg("--dir")
        .arg(dir);
    cmd
}

/// `cmd`'s output; `None` when it had not ended within `within` (it is killed).
async fn finished_within(
    mut cmd: tokio::process::Command,
    within: Duration,
) -> Option<std::process::Output> {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(within, child.wait_with_output())
        .await
        .ok()
        .map(Result::unwrap)
}

fn assert_passed(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bytes of the fake's file as the agent published it.
fn published(dir: &Path, fake: &Fake) -> Vec<u8> {
    std::fs::read(dir.join(format!("{}-one.txt", fake.file.simple()))).unwrap()
}

fn inbox() -> (tempfile::TempDir, PathBuf) {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("Inbox");
    (home, dir)
}

/// Bytes of every file under `dir`, the agent's state folder included.
fn bytes_under(dir: &Path) -> u64 {
    walk(dir).iter().map(|p| p.metadata().unwrap().len()).sum()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// One file listed twice was downloaded twice at once into one partial file; the second
/// download's restart truncated the first's published (and acked) file through their hard
/// link: 100 bytes of 10,000 were left. And the listed `uri` became the index key, so a
/// platform could have any URI rewritten to this file.
#[tokio::test]
async fn a_file_listed_twice_is_fetched_once_and_indexed_under_its_own_uri() {
    let (base, fake) = fake_platform(Scenario::Duplicate).await;
    let (_home, dir) = inbox();
    passed_once(&base, fake.ws, &dir).await;
    assert_eq!(fake.content.load(Ordering::SeqCst), 1, "one download");
    assert_eq!(published(&dir, &fake), DATA);
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join(".pending-uploads/index.json")).unwrap())
            .unwrap();
    let keys: Vec<&String> = index.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [&format!("platform-pending:{}/{}", fake.ws, fake.file)],
        "{index}"
    );
}

/// A content answer longer than the listed size was written to the disk for as long as it
/// came (3 GB in 20 s, a probe); it stops at the size now.
#[tokio::test]
async fn content_past_the_listed_size_is_not_written() {
    let (base, fake) = fake_platform(Scenario::EndlessContent).await;
    let (_home, dir) = inbox();
    let out = agent_once(&base, fake.ws, &dir, Duration::from_secs(30))
        .await
        .expect("the pass ended");
    assert!(!out.status.success());
    let report = stdout_json(&out);
    assert_eq!(report["failed"], 1, "{report}");
    let kept = bytes_under(&dir);
    assert!(kept < 64 * 1024, "{kept} bytes under DIR");
}

/// The listed size bounded the download, and a platform could list any: a file is never
/// larger than the per-file cap (SPEC §9), so a larger listing is refused unread.
#[tokio::test]
async fn a_file_listed_over_the_per_file_cap_is_not_downloaded() {
    let (base, fake) = fake_platform(Scenario::HugeListing).await;
    let (_home, dir) = inbox();
    let out = agent_once(&base, fake.ws, &dir, Duration::from_secs(30))
        .await
        .expect("the pass ended");
    assert!(!out.status.success());
    assert_eq!(fake.content.load(Ordering::SeqCst), 0, "never asked for");
    assert!(bytes_under(&dir) < 64 * 1024);
}

/// A JSON answer was read whole into memory, however long (8 GB of RSS, a probe).
#[tokio::test]
async fn an_endless_json_answer_is_cut_off() {
    let (base, fake) = fake_platform(Scenario::EndlessList).await;
    let (_home, dir) = inbox();
    let out = agent_once(&base, fake.ws, &dir, Duration::from_secs(60))
        .await
        .expect("the pass ended");
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("answer over"), "{log}");
}

/// A feed that answers 410 with no cursor to reset was asked again at once, thousands of
/// times a second, for ever.
#[tokio::test]
async fn a_feed_that_answers_410_to_no_cursor_fails_the_pass() {
    let (base, fake) = fake_platform(Scenario::AlwaysGone).await;
    let (_home, dir) = inbox();
    let out = agent_once(&base, fake.ws, &dir, Duration::from_secs(30))
        .await
        .expect("the pass ended");
    assert!(!out.status.success());
    let asked = fake.activity.load(Ordering::SeqCst);
    assert!(asked <= 3, "the feed was asked {asked} times");
}

/// A byte every 200 ms passes any read timeout: the pending list and a download each kept a
/// pass (and the agent's lock, so every later cron run failed) for hours (a probe: 46 of
/// 10,000 bytes after 4 minutes). A request now has `--request-timeout` in all, and a
/// download must get 1 KiB within it.
#[tokio::test]
async fn a_platform_that_drips_cannot_hold_a_pass() {
    for (scenario, why) in [
        (Scenario::DripList, "timed out"),
        (
            Scenario::DripContent,
            "download stalled: under 1024 bytes in 2s",
        ),
    ] {
        let (base, fake) = fake_platform(scenario).await;
        let (_home, dir) = inbox();
        let out = agent_once_with(
            &base,
            fake.ws,
            &dir,
            Duration::from_secs(30),
            &["--request-timeout", "2s"],
        )
        .await
        .expect("the pass ended");
        assert!(!out.status.success());
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains(why), "{log}");
    }
}

/// The feed only says when to look, and one pending entry is one file: a feed row without
/// every field, or a pending entry that is no upload, failed the whole pass, and no file was
/// received (a probe).
#[tokio::test]
async fn odd_feed_rows_and_pending_entries_do_not_stop_the_other_files() {
    let (base, fake) = fake_platform(Scenario::OddEntries).await;
    let (_home, dir) = inbox();
    let out = passed_once(&base, fake.ws, &dir).await;
    assert_eq!(stdout_json(&out)["staged"], 1);
    assert_eq!(published(&dir, &fake), DATA);
}

/// Something at a file's final name that is not a file was read back to confirm it: a
/// symlink to /dev/zero was hashed for ever (a probe). And a symlinked state folder took the
/// agent's partial files out of DIR.
#[tokio::test]
async fn the_agent_reads_and_writes_only_its_own_regular_files() {
    let (base, fake) = fake_platform(Scenario::Plain).await;
    let (_home, dir) = inbox();
    std::fs::create_dir_all(&dir).unwrap();
    let final_name = dir.join(format!("{}-one.txt", fake.file.simple()));
    std::os::unix::fs::symlink("/dev/zero", &final_name).unwrap();
    let out = agent_once(&base, fake.ws, &dir, Duration::from_secs(30))
        .await
        .expect("the pass ended");
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("is not a regular file"), "{log}");

    let (_home, dir) = inbox();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.join(".pending-uploads")).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), dir.join(".pending-uploads/partial")).unwrap();
    let out = agent_once(&base, fake.ws, &dir, Duration::from_secs(30))
        .await
        .expect("the agent ended");
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("is a symlink"), "{log}");
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
}

/// A revoked token (or a deleted workspace) made the daemon ask again every few seconds for
/// ever, saying only "platform refused the token (401)" (a probe). It now stops, with the
/// platform's words and what to do.
#[tokio::test]
async fn the_daemon_stops_when_the_platform_refuses_its_token() {
    let (base, fake) = fake_platform(Scenario::Revoked).await;
    let (home, dir) = inbox();
    let daemon = daemon(&base, fake.ws, home.path(), &dir, "1s");
    let out = finished_within(daemon, Duration::from_secs(20))
        .await
        .expect("the daemon stopped");
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("mint a new token") && log.contains("invalid workspace auth token"),
        "{log}"
    );
}

/// A refused token's answer was read whole to quote its start: an endless 401 took the
/// agent's memory (2.3 GB in 6 s), and one that trickled held a download past every deadline
/// (an audit). Its first 4 KiB are read, within the request's deadline.
#[tokio::test]
async fn a_refusals_words_are_read_only_so_far() {
    for (scenario, extra, quoted) in [
        (Scenario::RefusedFeedEndlessly, &[][..], Some("xxxx")),
        (Scenario::RefusedContentEndlessly, &[][..], Some("xxxx")),
        (
            Scenario::RefusedContentSlowly,
            &["--request-timeout", "2s"][..],
            None,
        ),
    ] {
        let (base, fake) = fake_platform(scenario).await;
        let (_home, dir) = inbox();
        let out = agent_once_with(&base, fake.ws, &dir, Duration::from_secs(20), extra)
            .await
            .expect("the pass ended");
        assert!(!out.status.success());
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains("mint a new token"), "{log}");
        // A trickle's first bytes, if any came within the deadline, are not asserted on.
        if let Some(quoted) = quoted {
            assert!(log.contains(quoted), "the start of its words: {log}");
        }
    }
}

/// A platform (or a proxy) that answers 400 to a long poll had the daemon fail every second
/// pass for ever, a WARN each (an audit): it long-polled again after each pass that
/// recovered. One refusal and it polls every interval, each pass a success.
#[tokio::test]
async fn a_platform_refusing_long_polls_is_polled_plainly() {
    let (base, fake) = fake_platform(Scenario::NoLongPoll).await;
    let (home, dir) = inbox();
    let daemon = daemon(&base, fake.ws, home.path(), &dir, "1s");
    assert!(finished_within(daemon, Duration::from_secs(7))
        .await
        .is_none());
    assert_eq!(fake.waits.load(Ordering::SeqCst), 1, "asked to wait once");
    assert!(fake.activity.load(Ordering::SeqCst) >= 5, "polled on");
    assert!(
        fake.pending.load(Ordering::SeqCst) >= 4,
        "every pass read the list"
    );
}

/// The token file's byte-order mark went to the platform (a bare 401), and
/// PENDING_UPLOADS_TOKEN won over an explicit --token-file (a probe).
#[tokio::test]
async fn the_token_file_wins_and_its_byte_order_mark_is_not_the_token() {
    let (base, fake) = fake_platform(Scenario::Authed).await;
    let (home, dir) = inbox();
    let token_file = home.path().join("token");
    std::fs::write(&token_file, "\u{feff}tok\r\n").unwrap();
    let mut once = agent(&base, fake.ws, &token_file, &dir);
    once.env("PENDING_UPLOADS_TOKEN", "stale").arg("--once");
    let out = finished_within(once, Duration::from_secs(30))
        .await
        .expect("the pass ended");
    assert_passed(&out);
    assert_eq!(published(&dir, &fake), DATA);
}

/// A partial file of an upload no longer pending (acked by another agent, deleted) stayed
/// for 48 hours, however large (a probe).
#[tokio::test]
async fn partial_files_of_uploads_no_longer_pending_go() {
    let (base, fake) = fake_platform(Scenario::Plain).await;
    let (_home, dir) = inbox();
    let partial = dir.join(".pending-uploads/partial");
    std::fs::create_dir_all(&partial).unwrap();
    let stray = partial.join(format!("{}.part", Uuid::new_v4().simple()));
    std::fs::write(&stray, [1u8; 4096]).unwrap();
    passed_once(&base, fake.ws, &dir).await;
    assert!(!stray.exists(), "the stray partial file went");
    assert_eq!(published(&dir, &fake), DATA);
}

/// An index that could not be read was dropped without a word, and the next save lost the
/// mapping of every file received (a probe). It is kept aside and made again from DIR.
#[tokio::test]
async fn an_unreadable_index_is_made_again_from_the_files() {
    let (base, fake) = fake_platform(Scenario::Plain).await;
    let (_home, dir) = inbox();
    passed_once(&base, fake.ws, &dir).await;
    let index = dir.join(".pending-uploads/index.json");
    std::fs::write(&index, b"{broken").unwrap();
    let (base, _) = fake_platform(Scenario::Nothing).await;
    let out = passed_once(&base, fake.ws, &dir).await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("index.json could not be read"), "{log}");
    assert!(dir.join(".pending-uploads/index.json.unreadable").exists());
    // Saved with the next file; here, read back as the agent would.
    let (rebuilt, _) = pending_uploads::agent::index::UriIndex::load_or_rebuild(&dir, fake.ws);
    let uri = format!("platform-pending:{}/{}", fake.ws, fake.file);
    assert!(rebuilt.map.contains_key(&uri), "{:?}", rebuilt.map);
}

/// The daemon said nothing until a file came, and nothing when stopped: one could not be told
/// from one that hangs (an operator probe). It says both.
#[tokio::test]
async fn the_daemon_says_when_it_starts_and_when_a_signal_stops_it() {
    let (base, fake) = fake_platform(Scenario::Nothing).await;
    let (home, dir) = inbox();
    let child = spawn_piped(daemon(&base, fake.ws, home.path(), &dir, "1s"));
    requests_reach(&fake, 1).await;
    terminate(&child);
    let out = ended(child).await;
    assert_passed(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    let started = log
        .lines()
        .find(|l| l.contains("\"event\":\"agent_started\""))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(started.contains(&fake.ws.to_string()), "{started}");
    assert!(log.contains("\"event\":\"agent_stopped\""), "{log}");
}

/// While the platform was down, every backoff logged the same failure again, and every
/// attempt within a pass a `retrying` line (an operator probe): one line when passes start
/// failing, and one when a pass works again.
#[tokio::test]
async fn a_platform_down_is_said_once_and_its_return_once() {
    let (base, fake) = fake_platform(Scenario::DownThenUp).await;
    let (home, dir) = inbox();
    let mut daemon = daemon(&base, fake.ws, home.path(), &dir, "100ms");
    daemon.args(["--retries", "2"]);
    let child = spawn_piped(daemon);
    // Four passes of three attempts fail, the fifth works (and the sixth has begun).
    requests_reach(&fake, 14).await;
    terminate(&child);
    let out = ended(child).await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        log.matches("\"event\":\"agent_pass_failed\"").count(),
        1,
        "{log}"
    );
    assert!(!log.contains("retrying"), "{log}");
    assert!(log.contains("503"), "the failure says what: {log}");
    let back = log
        .lines()
        .find(|l| l.contains("\"event\":\"agent_recovered\""))
        .unwrap_or_else(|| panic!("{log}"));
    let back: Value = serde_json::from_str(back).unwrap();
    assert_eq!(back["failed_passes"], 4, "{back}");
}

/// Waits until the fake's feed has had `n` requests.
async fn requests_reach(fake: &Fake, n: usize) {
    let what = format!("{n} feed requests");
    eventually(&what, Duration::from_secs(30), || async {
        fake.activity.load(Ordering::SeqCst) >= n
    })
    .await;
}

/// Local I/O errors said what failed, not where: "Is a directory (os error 21)" (an operator
/// probe). They name their path.
#[tokio::test]
async fn a_local_io_error_names_its_path() {
    let (base, fake) = fake_platform(Scenario::Plain).await;
    let (_home, dir) = inbox();
    let partial = dir
        .join(".pending-uploads/partial")
        .join(format!("{}.part", fake.file.simple()));
    std::fs::create_dir_all(&partial).unwrap();
    let out = agent_once(&base, fake.ws, &dir, Duration::from_secs(30))
        .await
        .expect("the pass ended");
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    let canonical = std::fs::canonicalize(&partial).unwrap();
    assert!(
        log.contains(&format!("{}: Is a directory", canonical.display())),
        "{log}"
    );
}

/// The platform's words reach the agent's text log (a refused token's answer is quoted in
/// the error) as one field's value: a line's own fields are the agent's alone. They were
/// written as they came, so `event=agent_forged` read as a field of the line.
#[tokio::test]
async fn the_platforms_words_stay_inside_one_log_field() {
    let (base, fake) = fake_platform(Scenario::FieldsInWords).await;
    let (home, dir) = inbox();
    let token_file = home.path().join("token");
    std::fs::write(&token_file, "tok").unwrap();
    let mut cmd = agent(&base, fake.ws, &token_file, &dir);
    cmd.env("LOG_FORMAT", "text")
        .args(["--once", "--retries", "0"]);
    let out = finished_within(cmd, Duration::from_secs(30))
        .await
        .expect("the pass ended");
    let log = String::from_utf8_lossy(&out.stderr);
    let quoted = log
        .lines()
        .filter(|l| l.contains("event=agent_forged"))
        .count();
    assert!(quoted > 0, "the words were logged: {log}");
    for line in log.lines() {
        let fields = text_fields(line);
        assert!(
            !fields.iter().any(|f| f.starts_with("event=agent_forged")),
            "a field of the platform's: {line}"
        );
    }
}

/// A text-format log line's space-separated words, a quoted value (with its `\"` escapes)
/// one word with its key.
fn text_fields(line: &str) -> Vec<String> {
    let (mut fields, mut word, mut quoted, mut escaped) = (Vec::new(), String::new(), false, false);
    for c in line.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                fields.push(std::mem::take(&mut word));
                continue;
            }
            _ => {}
        }
        word.push(c);
    }
    fields.push(word);
    fields
}

/// `--concurrency` took any number: 0 ran nothing at all and 100,000 asked for that many
/// downloads at once (the service answers past 16 per workspace 429). It takes 1..=64.
#[tokio::test]
async fn the_agents_concurrency_is_bounded() {
    let (home, dir) = inbox();
    for n in ["0", "65"] {
        let mut cmd = daemon(
            "http://127.0.0.1:9",
            Uuid::new_v4(),
            home.path(),
            &dir,
            "1s",
        );
        cmd.args(["--once", "--concurrency", n]);
        let out = finished_within(cmd, Duration::from_secs(10)).await.unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{n} is not in 1..=64")), "{err}");
    }
}

fn spawn_piped(mut cmd: tokio::process::Command) -> tokio::process::Child {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

fn terminate(child: &tokio::process::Child) {
    let pid = child.id().unwrap() as i32;
    // SAFETY: kill(2) with our own child's pid; no memory is touched.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
}

async fn ended(child: tokio::process::Child) -> std::process::Output {
    tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("ended after SIGTERM")
        .unwrap()
}

/// reqwest followed redirects: it dropped the token on a hop to another host and sent it
/// again on that host's next hop to itself (a probe's second host got it). The service sends
/// none, so none is followed, and the pass says where it was sent.
#[tokio::test]
async fn no_redirect_is_followed() {
    for (scenario, what) in [
        (Scenario::RedirectList, "pending-uploads"),
        (Scenario::RedirectContent, "content"),
    ] {
        let (base, fake) = fake_platform(scenario).await;
        let (_home, dir) = inbox();
        let out = agent_once(&base, fake.ws, &dir, Duration::from_secs(30))
            .await
            .expect("the pass ended");
        assert!(!out.status.success(), "{what}");
        let log = String::from_utf8_lossy(&out.stderr);
        let said = format!(
            "redirected (302 Found) to http://localhost:{}/hop: the agent follows no redirect",
            fake.port
        );
        assert!(log.contains(&said), "{what}: {log}");
        assert!(log.contains(what), "{what}: {log}");
        assert_eq!(
            fake.hops.load(Ordering::SeqCst),
            0,
            "{what}: a hop was taken"
        );
        assert!(walk(&dir).iter().all(|p| !p.ends_with("one.txt")));
    }
}

/// The pending list was read into a `serde_json::Value` tree before its entries were looked
/// at: 32 MiB of `{"":0}` entries took 3.2 GB of memory at every pass (a probe). Here the
/// agent runs under a 2 GiB address-space limit (its own use is a few hundred MiB of it), and
/// takes the one upload among 30 MiB of such entries.
#[tokio::test]
async fn a_pending_list_costs_its_bytes_not_a_hundred_times_them() {
    let (base, fake) = fake_platform(Scenario::AmplifiedList).await;
    let (home, dir) = inbox();
    let token_file = home.path().join("token");
    std::fs::write(&token_file, "tok").unwrap();
    let mut cmd = agent(&base, fake.ws, &token_file, &dir);
    cmd.args(["--once", "--retries", "0"]);
    // SAFETY: setrlimit(2) only, between fork and exec, touching no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 2 << 30,
                rlim_max: 2 << 30,
            };
            match libc::setrlimit(libc::RLIMIT_AS, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let out = finished_within(cmd, Duration::from_secs(60))
        .await
        .expect("the pass ended");
    assert_passed(&out);
    assert_eq!(stdout_json(&out)["staged"], 1);
    assert_eq!(published(&dir, &fake), DATA);
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        log.matches("pending list entries skipped").count(),
        1,
        "one line for all of them: {}",
        &log[..log.len().min(2000)]
    );
}

/// A platform that kept listing a file after its ack had the daemon confirm it (a HEAD, the
/// file hashed again, an ack) about 20 times a second (a probe): a pass that received nothing
/// new waits the poll interval. And the index, rewritten by every confirmation, is written
/// only when an entry changed.
#[tokio::test]
async fn a_file_listed_after_its_ack_is_not_confirmed_in_a_loop() {
    let (base, fake) = fake_platform(Scenario::AckIgnored).await;
    let (home, dir) = inbox();
    passed_once(&base, fake.ws, &dir).await;
    let index = dir.join(".pending-uploads/index.json");
    let written = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&index).unwrap());
    let out = passed_once(&base, fake.ws, &dir).await;
    assert_eq!(stdout_json(&out)["already_present"], 1);
    let now = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&index).unwrap());
    assert_eq!(written, now, "an unchanged index was written again");
    let before = fake.content.load(Ordering::SeqCst);
    let child = spawn_piped(daemon(&base, fake.ws, home.path(), &dir, "1s"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    terminate(&child);
    ended(child).await;
    let asked = fake.content.load(Ordering::SeqCst) - before;
    assert!(
        (1..=5).contains(&asked),
        "{asked} content requests in 3 s at a 1 s interval"
    );
}

/// A file is one file whatever it is called: a platform that listed it under a new name at
/// every pass had it downloaded again at every pass (107 copies in 10 s, a probe). One
/// received before is confirmed where the index says it is.
#[tokio::test]
async fn a_renamed_file_is_not_downloaded_again() {
    let (base, fake) = fake_platform(Scenario::Renamed).await;
    let (_home, dir) = inbox();
    passed_once(&base, fake.ws, &dir).await;
    let out = passed_once(&base, fake.ws, &dir).await;
    assert_eq!(
        stdout_json(&out)["already_present"],
        1,
        "{}",
        stdout_json(&out)
    );
    let received: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(
        received,
        [format!("{}-name0.txt", fake.file.simple())],
        "one copy"
    );
}

/// A feed that forgets every cursor it gives had each pass page and reset 400 times (a
/// probe): the cursor is reset once a pass, and the pending list read anyway.
#[tokio::test]
async fn a_feed_that_forgets_its_cursors_is_reset_once_a_pass() {
    let (base, fake) = fake_platform(Scenario::ForgetfulFeed).await;
    let (_home, dir) = inbox();
    std::fs::create_dir_all(dir.join(".pending-uploads")).unwrap();
    std::fs::write(
        dir.join(".pending-uploads/cursor"),
        Uuid::new_v4().to_string(),
    )
    .unwrap();
    let out = passed_once(&base, fake.ws, &dir).await;
    assert_eq!(stdout_json(&out)["staged"], 1);
    let asked = fake.activity.load(Ordering::SeqCst);
    assert!(asked <= 4, "the feed was asked {asked} times in one pass");
}
