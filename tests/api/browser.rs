//! The canvas's requests in a real browser (headless Chromium): SPEC §4 "Operations", CORS.
//!
//! The service runs in-process on one loopback port; a page is served from a second loopback
//! port (another origin, so the browser applies CORS). The page runs the Molecule canvas's
//! request code as the canvas does (notes/compat-brief.md §1: `credentials: "include"`,
//! `Authorization: Bearer <admin token>`, `X-Molecule-Org-Slug`, FormData upload, preview read
//! as a blob), writes what it saw as JSON into `<pre id="result">` and posts it back to the
//! page server, where the test takes it. Chromium is required: the test fails, never skips,
//! without it (scripts/ensure-chromium.sh installs it).

use std::{
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    response::Html,
    routing::{get, post},
    Router,
};
use base64::Engine;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::common::*;

/// What the page uploads: (filename as the browser has it, type, bytes). The first name has
/// a space and non-ASCII characters; the second file holds every byte value.
fn page_files() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    vec![
        (
            "r\u{e9}sum\u{e9} draft.txt",
            "text/plain",
            "hello, w\u{f6}rld \u{2014} from the canvas\n"
                .as_bytes()
                .to_vec(),
        ),
        ("pixels.png", "image/png", (0..=255u8).collect()),
    ]
}

/// The names SPEC §5 makes of them.
const SANITIZED: [&str; 2] = ["r_sum__draft.txt", "pixels.png"];

const PRESTAGED_BYTES: &[u8] = b"staged by the test, not the page";

/// The page. Placeholders: __SERVICE__, __ADMIN__, __WORKSPACE__, __PRESTAGED__. The script
/// follows canvas/src/lib/api.ts (platformAuthHeaders) and
/// canvas/src/components/tabs/chat/uploads.ts (upload, content URL, download/preview).
const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>canvas requests</title></head>
<body><pre id="result">pending</pre>
<script>
const PLATFORM_URL = "__SERVICE__";
const ADMIN_TOKEN = "__ADMIN__";
const WORKSPACE = "__WORKSPACE__";
const PRESTAGED = "__PRESTAGED__";

// canvas/src/lib/api.ts
function platformAuthHeaders() {
  const headers = {};
  const slug = "acme";
  if (slug) headers["X-Molecule-Org-Slug"] = slug;
  const adminToken = ADMIN_TOKEN;
  if (adminToken) headers["Authorization"] = `Bearer ${adminToken}`;
  return headers;
}
// canvas/src/components/tabs/chat/uploads.ts
function computeUploadTimeoutMs(totalBytes) { return Math.max(60000, totalBytes / 100); }
function contentUrl(uri) {
  if (!uri.startsWith("platform-pending:")) throw new Error("not a platform-pending uri: " + uri);
  const rest = uri.slice("platform-pending:".length);
  const slash = rest.indexOf("/");
  const wsid = rest.slice(0, slash), fileID = rest.slice(slash + 1);
  return `${PLATFORM_URL}/workspaces/${wsid}/pending-uploads/${fileID}/content`;
}

function hex(buf) {
  return Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, "0")).join("");
}
function b64(buf) {
  let s = "";
  for (const b of new Uint8Array(buf)) s += String.fromCharCode(b);
  return btoa(s);
}
async function sha256Hex(buf) {
  if (!window.isSecureContext || !crypto.subtle) return null;
  return hex(await crypto.subtle.digest("SHA-256", buf));
}
function pick(res, names) {
  const h = {};
  for (const n of names) h[n] = res.headers.get(n);
  return h;
}
const errorText = (e) => String(e);

async function main() {
  const out = { origin: location.origin, secure_context: window.isSecureContext };

  // (a) the limits, with the canvas's credentials and headers
  try {
    const res = await fetch(`${PLATFORM_URL}/uploads/limits`, {
      headers: platformAuthHeaders(), credentials: "include" });
    const json = await res.json();
    out.limits = { ok: res.ok, status: res.status, per_file_bytes: json.per_file_bytes };
  } catch (e) { out.limits = { ok: false, error: errorText(e) }; }

  // (b) the upload, as uploadChatFiles does it
  const files = [
    new File(["hello, w\u00f6rld \u2014 from the canvas\n"], "r\u00e9sum\u00e9 draft.txt", { type: "text/plain" }),
    new File([Uint8Array.from({ length: 256 }, (_, i) => i)], "pixels.png", { type: "image/png" }),
  ];
  out.sent = [];
  for (const f of files) {
    const buf = await f.arrayBuffer();
    out.sent.push({ name: f.name, type: f.type, size: f.size, sha256: await sha256Hex(buf) });
  }
  let uploaded = null;
  try {
    const totalBytes = files.reduce((n, f) => n + f.size, 0);
    const form = new FormData();
    for (const f of files) form.append("files", f, f.name);
    const res = await fetch(`${PLATFORM_URL}/workspaces/${WORKSPACE}/chat/uploads`, {
      method: "POST", headers: platformAuthHeaders(), body: form, credentials: "include",
      signal: AbortSignal.timeout(computeUploadTimeoutMs(totalBytes)) });
    if (!res.ok) {
      const text = await res.text().catch(() => "");
      throw new Error(`upload failed: ${res.status} ${text}`);
    }
    const json = await res.json();
    uploaded = json.files ?? [];
    out.upload = { ok: true, status: res.status,
      files: uploaded.map((f) => ({ uri: f.uri, name: f.name, mimeType: f.mimeType, size: f.size })) };
  } catch (e) { out.upload = { ok: false, error: errorText(e) }; }

  // (c) the previews, read as blobs (a file the test staged when the upload failed)
  const targets = uploaded ? uploaded.map((f) => f.uri) : [PRESTAGED];
  out.previews = [];
  for (const uri of targets) {
    const p = { uri };
    try {
      const res = await fetch(contentUrl(uri), {
        headers: platformAuthHeaders(), credentials: "include", signal: AbortSignal.timeout(30000) });
      if (!res.ok) throw new Error(`download failed: ${res.status}`);
      const blob = await res.blob();
      const buf = await blob.arrayBuffer();
      Object.assign(p, { ok: true, status: res.status, blob_size: blob.size, blob_type: blob.type,
        sha256: await sha256Hex(buf), bytes_b64: b64(buf),
        headers: pick(res, ["Content-Disposition", "ETag", "Repr-Digest", "Content-Length", "Content-Type"]) });
    } catch (e) { p.ok = false; p.error = errorText(e); }
    out.previews.push(p);
  }

  // (d) a Range request, read as text
  try {
    const res = await fetch(contentUrl(targets[0]), {
      headers: { ...platformAuthHeaders(), Range: "bytes=0-3" }, credentials: "include" });
    out.range = { ok: res.ok, status: res.status, text: await res.text(),
      content_range: res.headers.get("Content-Range"), content_length: res.headers.get("Content-Length") };
  } catch (e) { out.range = { ok: false, error: errorText(e) }; }

  // (e) a revalidation of the first preview: its ETag in If-None-Match (set by hand, so the
  // browser hands the 304 itself to the page rather than answering from its cache)
  try {
    const etag = String(out.previews[0]?.headers?.ETag);
    const res = await fetch(contentUrl(targets[0]), {
      headers: { ...platformAuthHeaders(), "If-None-Match": etag }, credentials: "include" });
    out.revalidate = { status: res.status, etag: res.headers.get("ETag"), text: await res.text() };
  } catch (e) { out.revalidate = { ok: false, error: errorText(e) }; }

  // Which CORS rule a failure comes from (ENVIRONMENT.md: the browser says nothing more):
  // the limits again, plain / with credentials only / with the canvas headers only.
  out.probes = {};
  const probes = {
    plain: {},
    credentials_only: { credentials: "include" },
    headers_only: { headers: platformAuthHeaders() },
  };
  for (const [name, init] of Object.entries(probes)) {
    try {
      const res = await fetch(`${PLATFORM_URL}/uploads/limits`, init);
      out.probes[name] = { ok: res.ok, status: res.status };
    } catch (e) { out.probes[name] = { ok: false, error: errorText(e) }; }
  }
  return out;
}

// ASCII-only JSON without <, > or &: it reads the same in the DOM and in the POST.
const safeJson = (v) => JSON.stringify(v).replace(/[^\x20-\x7e]|[<>&]/g,
  (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
main()
  .catch((e) => ({ page_error: errorText(e) }))
  .then((out) => {
    const el = document.getElementById("result");
    el.textContent = safeJson(out);
    el.setAttribute("data-done", "1");
    // to the test, on the page's own origin (no CORS involved)
    return fetch("/result", { method: "POST", body: safeJson(out) });
  });
</script>
</body></html>
"#;

/// Serves `page` at `/` of a loopback listener (the page's origin), and takes the page's
/// result at `POST /result`.
fn serve_page(
    listener: tokio::net::TcpListener,
    page: String,
    result: oneshot::Sender<String>,
) -> tokio::task::JoinHandle<()> {
    let result = Arc::new(Mutex::new(Some(result)));
    let router = Router::new()
        .route("/", get(move || async move { Html(page) }))
        .route(
            "/result",
            post(move |body: String| async move {
                if let Some(tx) = result.lock().unwrap().take() {
                    let _ = tx.send(body);
                }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() })
}

fn chromium_path() -> String {
    let bin = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_string());
    assert!(
        Path::new(&bin).is_file(),
        "Chromium not found at {bin}: the browser test needs it (it fails rather than skips). \
         Run scripts/ensure-chromium.sh (apt-get install chromium) or set CHROMIUM=/path/to/chromium"
    );
    bin
}

/// Loads `url` in headless Chromium and returns the result JSON the page posts back.
///
/// Real time, not `--virtual-time-budget` + `--dump-dom`: virtual time runs ahead while the
/// renderer waits on Chromium's network process, and with the api suite loading both cores
/// the budget (20 s or 90 s virtual) ran out after 2 s with the page still waiting.
async fn run_page(bin: &str, url: &str, result: oneshot::Receiver<String>) -> Value {
    let profile = tempfile::tempdir().unwrap();
    // a file, not a pipe nobody reads while the page runs (a full pipe would stall Chromium)
    let log_path = profile.path().join("chromium.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = tokio::process::Command::new(bin)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("could not run {bin}: {e}"));
    // Awaited on the test's runtime, so the in-process service and page server keep serving.
    let json = tokio::select! {
        posted = tokio::time::timeout(Duration::from_secs(120), result) => posted
            .expect("the page posted its result within 120 s")
            .expect("the page server kept the result channel"),
        status = child.wait() => panic!(
            "Chromium exited ({status:?}) before the page posted its result; stderr:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        ),
    };
    let _ = child.kill().await;
    let v: Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("page result is not JSON ({e}): {json}"));
    assert!(v.get("page_error").is_none(), "page script failed: {v}");
    v
}

/// One run: the service with `allowed` origins (`None`: the page's own origin), a poll
/// workspace, one file staged by the test itself, the page loaded in Chromium.
/// Returns (app, workspace, prestaged uri, page result).
async fn browse(allowed: Option<&str>) -> (TestApp, Uuid, String, Value) {
    let bin = chromium_path();
    let page_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page_origin = format!("http://{}", page_listener.local_addr().unwrap());
    let origins = allowed.map_or(page_origin.clone(), str::to_string);
    let app = TestApp::start_with(&["--cors-allowed-origins", &origins]).await;
    let (ws, _token) = app.poll_workspace().await;
    let staged = app
        .upload_ok(
            ws,
            ADMIN,
            &[("staged.txt", "text/plain", PRESTAGED_BYTES.to_vec())],
        )
        .await;
    let prestaged = staged[0]["uri"].as_str().unwrap().to_string();
    let page = PAGE
        .replace("__SERVICE__", &app.url)
        .replace("__ADMIN__", ADMIN)
        .replace("__WORKSPACE__", &ws.to_string())
        .replace("__PRESTAGED__", &prestaged);
    let (posted, result) = oneshot::channel();
    let page_server = serve_page(page_listener, page, posted);
    let started = std::time::Instant::now();
    let result = run_page(&bin, &format!("{page_origin}/"), result).await;
    eprintln!("Chromium run took {:.1?}", started.elapsed());
    page_server.abort();
    assert_eq!(result["origin"], page_origin.as_str(), "{result}");
    assert_ne!(
        page_origin, app.url,
        "the page must be cross-origin to the service"
    );
    (app, ws, prestaged, result)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn canvas_requests_work_from_a_listed_origin_in_a_real_browser() {
    let (app, ws, _prestaged, r) = browse(None).await;
    println!("BROWSER RESULT: {r}");
    let files = page_files();

    // (a) limits
    assert_eq!(r["limits"]["ok"], true, "limits: {r}");
    assert_eq!(r["limits"]["status"], 200);
    assert_eq!(
        r["limits"]["per_file_bytes"],
        app.limits().await["per_file_bytes"]
    );

    // (b) upload: what the page sent is what the test expects, and the answer names the
    // sanitized files
    assert_eq!(r["secure_context"], true, "127.0.0.1 is a secure context");
    for (sent, (name, ct, bytes)) in r["sent"].as_array().unwrap().iter().zip(&files) {
        assert_eq!(sent["name"], *name);
        assert_eq!(sent["type"], *ct);
        assert_eq!(sent["size"], bytes.len());
        assert_eq!(sent["sha256"], sha256_hex(bytes).as_str());
    }
    assert_eq!(r["upload"]["ok"], true, "upload: {r}");
    assert_eq!(r["upload"]["status"], 200);
    let uploaded = r["upload"]["files"].as_array().unwrap();
    assert_eq!(uploaded.len(), 2, "{r}");
    let mut file_ids = Vec::new();
    for (i, f) in uploaded.iter().enumerate() {
        let (_, ct, bytes) = &files[i];
        assert_eq!(f["name"], SANITIZED[i], "{r}");
        assert_eq!(f["mimeType"], *ct);
        assert_eq!(f["size"], bytes.len());
        let uri = f["uri"].as_str().unwrap();
        let rest = uri
            .strip_prefix(&format!("platform-pending:{ws}/"))
            .unwrap_or_else(|| panic!("uri {uri}"));
        file_ids.push(rest.parse::<Uuid>().expect("file id is a UUID"));
    }
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT filename FROM pending_uploads WHERE file_id = ANY($1) ORDER BY filename",
    )
    .bind(&file_ids)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(names, ["pixels.png", "r_sum__draft.txt"]);

    // (c) previews: the bytes round-trip, and the exposed headers are readable
    let previews = r["previews"].as_array().unwrap();
    assert_eq!(previews.len(), 2, "{r}");
    for (i, p) in previews.iter().enumerate() {
        let (_, ct, bytes) = &files[i];
        let digest = Sha256::digest(bytes);
        assert_eq!(p["ok"], true, "preview {i}: {r}");
        assert_eq!(p["status"], 200);
        assert_eq!(p["uri"], uploaded[i]["uri"]);
        assert_eq!(p["blob_size"], bytes.len());
        assert_eq!(p["blob_type"], *ct);
        assert_eq!(
            p["sha256"],
            hex::encode(digest).as_str(),
            "digest of the blob"
        );
        assert_eq!(p["bytes_b64"], b64(bytes).as_str(), "bytes of the blob");
        let h = &p["headers"];
        let name = SANITIZED[i];
        assert_eq!(
            h["Content-Disposition"],
            format!("attachment; filename=\"{name}\"; filename*=UTF-8''{name}").as_str()
        );
        assert_eq!(h["ETag"], format!("\"{}\"", hex::encode(digest)).as_str());
        assert_eq!(
            h["Repr-Digest"],
            format!("sha-256=:{}:", b64(&digest)).as_str()
        );
        assert_eq!(h["Content-Length"], bytes.len().to_string().as_str());
        assert_eq!(h["Content-Type"], *ct);
    }

    // (d) the Range read: the first 4 bytes
    let text_len = files[0].2.len();
    assert_eq!(r["range"]["ok"], true, "range: {r}");
    assert_eq!(r["range"]["status"], 206);
    assert_eq!(r["range"]["text"], "hell");
    assert_eq!(
        r["range"]["content_range"],
        format!("bytes 0-3/{text_len}").as_str()
    );
    assert_eq!(r["range"]["content_length"], "4");

    // (e) the revalidation: 304, the same ETag, no bytes
    assert_eq!(r["revalidate"]["status"], 304, "revalidate: {r}");
    assert_eq!(r["revalidate"]["etag"], previews[0]["headers"]["ETag"]);
    assert_eq!(r["revalidate"]["text"], "");

    for probe in ["plain", "credentials_only", "headers_only"] {
        assert_eq!(r["probes"][probe]["ok"], true, "probe {probe}: {r}");
    }
}

#[tokio::test]
async fn the_browser_refuses_the_canvas_requests_from_an_unlisted_origin() {
    // Another origin is listed, so CORS is on, just not for the page.
    let (app, _ws, prestaged, r) = browse(Some("https://canvas.example.com")).await;
    println!("BROWSER RESULT (page origin not allowed): {r}");
    const BLOCKED: &str = "TypeError: Failed to fetch";
    assert_eq!(r["limits"]["error"], BLOCKED, "{r}");
    assert_eq!(r["upload"]["error"], BLOCKED, "{r}");
    let previews = r["previews"].as_array().unwrap();
    assert_eq!(previews.len(), 1, "{r}");
    assert_eq!(previews[0]["uri"], prestaged.as_str());
    assert_eq!(previews[0]["error"], BLOCKED, "{r}");
    assert_eq!(r["range"]["error"], BLOCKED, "{r}");
    assert_eq!(r["revalidate"]["error"], BLOCKED, "{r}");
    for probe in ["plain", "credentials_only", "headers_only"] {
        assert_eq!(r["probes"][probe]["error"], BLOCKED, "probe {probe}: {r}");
    }
    // The preflight failed, so the browser never sent the upload itself.
    assert_eq!(app.count("pending_uploads").await, 1);
}
