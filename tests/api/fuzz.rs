//! Fuzz targets (issue 9, item 3): every parser a client reaches, as property tests that run
//! in the normal `cargo test`. Each target drives the real router in-process (handlers,
//! extractors, Postgres; no sockets) with generated and mutated inputs and checks after every
//! case: no panic, no 5xx, and nothing left behind unless the answer was 200, and then exactly
//! what it reported. Where an input is well-formed enough to know the answer, a model of SPEC
//! says which answer, and that is checked too.
//!
//! Cases per target: `FUZZ_CASES`, else `PROPTEST_CASES`, else 10,000. The cases of a target run
//! one after the other on one runtime, against one app and database. A failure is shrunk and
//! reported with its minimal input and the request it rendered to.

use std::{
    cmp::Ordering,
    collections::HashMap,
    fmt,
    future::Future,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode},
    Router,
};
use bytes::Bytes;
use http_body_util::BodyExt;
use memchr::memmem;
use pending_uploads::{
    app,
    http::error::ApiError,
    multipart::{self, Multipart},
    sanitize::sanitize,
    staging::{self, reduce_mimetype, RequestLimits},
};
use percent_encoding::{percent_encode, NON_ALPHANUMERIC};
use proptest::{
    prelude::*,
    sample::{select, Index},
    test_runner::{Config, TestCaseError, TestRunner},
};
use serde_json::{json, Map, Value};
use sqlx::PgPool;
use tokio::runtime::Runtime;
use tower::ServiceExt;
use uuid::Uuid;

use crate::common::{assert_totals_exact, fresh_db, open_spool_files, serve_args, ADMIN};

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

const DEFAULT_CASES: u32 = 10_000;
/// A case that takes longer than this is a hang (the slowest legitimate one is a 1 s long poll).
const CASE_DEADLINE: Duration = Duration::from_secs(30);

fn cases() -> u32 {
    ["FUZZ_CASES", "PROPTEST_CASES"]
        .iter()
        .find_map(|var| std::env::var(var).ok()?.trim().parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs the target's cases one after the other on `rt`; on failure, shrinks and panics with
/// the minimal input.
fn fuzz<S, F, Fut>(target: &str, rt: &Runtime, strategy: S, check: F)
where
    S: Strategy,
    F: Fn(S::Value) -> Fut,
    Fut: Future<Output = Result<(), TestCaseError>>,
{
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        max_shrink_iters: 4_000,
        max_shrink_time: 240_000,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config.clone());
    let started = Instant::now();
    let result = runner.run(&strategy, |case| rt.block_on(check(case)));
    eprintln!(
        "fuzz {target}: {} cases in {:.1}s",
        config.cases,
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("fuzz {target}: {e}");
    }
}

/// How often each kind of case and answer came up (printed after the run: what was covered).
#[derive(Default)]
struct Tally(std::sync::Mutex<std::collections::BTreeMap<String, (u32, Duration)>>);

impl Tally {
    fn add(&self, key: String) {
        self.add_timed(key, Duration::ZERO);
    }

    /// Counts a case of this kind and the time it took.
    fn add_timed(&self, key: String, took: Duration) {
        let mut map = self.0.lock().unwrap();
        let entry = map.entry(key).or_default();
        entry.0 += 1;
        entry.1 += took;
    }

    fn print(&self, target: &str) {
        for (key, (n, took)) in self.0.lock().unwrap().iter() {
            if took.is_zero() {
                eprintln!("fuzz {target}: {n:>6}  {key}");
            } else {
                eprintln!("fuzz {target}: {n:>6}  {key}  [{:.1}s]", took.as_secs_f64());
            }
        }
    }
}

/// The service in-process: the router `serve` would run, its database and spool directory.
struct App {
    router: Router,
    pool: PgPool,
    spool_dir: PathBuf,
    _spool: tempfile::TempDir,
}

/// One answer, read to its end.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl fmt::Debug for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = String::from_utf8_lossy(&self.body);
        let clipped: String = body.chars().take(600).collect();
        write!(f, "{} {clipped:?}", self.status)
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

impl App {
    async fn start(extra: &[&str]) -> App {
        let db_url = fresh_db().await;
        let spool = tempfile::tempdir().unwrap();
        let args = serve_args(&db_url, spool.path(), extra);
        let service = app::build(&args).await.expect("service builds");
        App {
            router: service.router,
            pool: service.state.db.pool().clone(),
            spool_dir: spool.path().to_path_buf(),
            _spool: spool,
        }
    }

    async fn call(&self, req: Request<Body>) -> Answer {
        let resp = tokio::time::timeout(CASE_DEADLINE, self.router.clone().oneshot(req))
            .await
            .expect("answered within the case deadline")
            .expect("the router is infallible");
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(CASE_DEADLINE, body.collect())
            .await
            .expect("body within the case deadline")
            .expect("body streams to its end")
            .to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// Creates a workspace as the admin; returns its id and token.
    async fn workspace(&self, body: Value) -> (Uuid, String) {
        let req = Request::post("/workspaces")
            .header(header::AUTHORIZATION, bearer(ADMIN))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let a = self.call(req).await;
        assert_eq!(a.status, StatusCode::OK, "{a:?}");
        let v = a.json();
        (
            v["id"].as_str().unwrap().parse().unwrap(),
            v["auth_token"].as_str().unwrap().to_string(),
        )
    }

    async fn poll_workspace(&self) -> Uuid {
        self.workspace(json!({"name": "fuzz", "delivery_mode": "poll"}))
            .await
            .0
    }

    /// Uploads (filename, content type, bytes) as the canvas does; returns the `files` entries.
    async fn upload(&self, ws: Uuid, files: &[(&str, &str, &[u8])]) -> Vec<Value> {
        let b = "fuzz-setup-boundary";
        let mut body = Vec::new();
        for (name, ct, data) in files {
            body.extend_from_slice(
                format!(
                    "--{b}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\nContent-Type: {ct}\r\n\r\n"
                )
                .as_bytes(),
            );
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{b}--\r\n").as_bytes());
        let req = Request::post(format!("/workspaces/{ws}/chat/uploads"))
            .header(header::AUTHORIZATION, bearer(ADMIN))
            .header(
                header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={b}"),
            )
            .body(Body::from(body))
            .unwrap();
        let a = self.call(req).await;
        assert_eq!(a.status, StatusCode::OK, "{a:?}");
        a.json()["files"].as_array().unwrap().clone()
    }

    /// Rows in pending_uploads and activity_logs.
    async fn counts(&self) -> (i64, i64) {
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM pending_uploads), (SELECT count(*) FROM activity_logs)",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    fn open_spool_files(&self) -> usize {
        open_spool_files(&self.spool_dir)
    }
}

/// A refusal is JSON `{"error": "<text>", ...}` (SPEC §4).
fn error_text(a: &Answer) -> Result<String, TestCaseError> {
    let v = a.json();
    match v.get("error").and_then(Value::as_str) {
        Some(e) => Ok(e.to_string()),
        None => Err(TestCaseError::fail(format!(
            "a refusal without a JSON error body: {a:?}"
        ))),
    }
}

/// Text with what breaks parsers: quotes, backslashes, separators, control characters, CR/LF,
/// NUL, path pieces, percent signs and Unicode (multi-byte, bidi, zero-width, wide).
fn nasty_text(max_pieces: usize) -> impl Strategy<Value = String> + Clone {
    let piece = prop_oneof![
        4 => "[a-zA-Z0-9._-]{1,8}",
        2 => any::<char>().prop_map(String::from),
        2 => select(&[
            "\"", "\\", ";", "/", "..", ".", " ", "\t", "'", "=", "%", "%22", "%00", "\r", "\n",
            "\r\n", "\0", "\u{7f}", "\u{1}", "\u{85}", "\u{a0}", "\u{2028}", "\u{202e}",
            "\u{200b}", "\u{feff}", "中文", "😀", "é", "C:\\dir\\", "../", ".txt", ".tar.gz",
            "*", "?", "<", ">", "|", ":", ",", "&", "+", "#", "filename*=", "name=\"x\"",
        ][..])
        .prop_map(String::from),
    ];
    proptest::collection::vec(piece, 0..max_pieces).prop_map(|v| v.concat())
}

// ---------------------------------------------------------------------------------------------
// Target 1: multipart uploads through the service's own path
// ---------------------------------------------------------------------------------------------

const MALFORMED: &str = "malformed multipart body";
const NO_FILES: &str = "no files field in request";
const TOO_MANY: &str = "too many files (limit 64)";
const EMPTY_FILE: &str = "file is empty";
const MAX_FILES: usize = 64;
const MAX_PREAMBLE: usize = 8 * 1024;
const MAX_PART_HEADER: usize = 8 * 1024;
const MAX_EPILOGUE: usize = 8 * 1024;
const MAX_PART_HEADERS: usize = 16;
const MAX_FIELD_BYTES: usize = 1024 * 1024;
const MAX_NAME_CHARS: usize = 100;
const MAX_FILE_BYTES: usize = 104_857_600;
/// The caps of the second app, small enough for fuzz bodies to cross them.
const SMALL_FILE_BYTES: usize = 256;
const SMALL_REQUEST_BYTES: usize = 4096;
const FILE_TOO_LARGE: &str = "file exceeds per-file cap";
const REQUEST_TOO_LARGE: &str = "request body exceeds per-request cap";

#[derive(Clone, Debug)]
enum Data {
    Bytes(Vec<u8>),
    /// `n` copies of one byte (big fields without generating megabytes).
    Fill(u8, usize),
}

impl Data {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Data::Bytes(b) => b.clone(),
            Data::Fill(b, n) => vec![*b; *n],
        }
    }
}

/// How a `filename` parameter is written.
#[derive(Clone, Debug)]
enum FilenameForm {
    /// A quoted string, `"` and `\` escaped.
    Quoted,
    /// Quoted, backslashes left raw (as browsers send Windows paths).
    RawBackslashes,
    /// Unquoted.
    Token,
}

/// How a `filename*` (RFC 5987) parameter is written.
#[derive(Clone, Debug)]
enum StarForm {
    Utf8,
    Utf8Lower,
    Utf8Lang,
    Latin1,
    /// `US-ASCII`, which Go's parser takes too (its bytes as UTF-8 here, as Go passes them on).
    UsAscii,
    Quoted,
    UnknownCharset,
    BadUtf8,
    NoQuotes,
}

#[derive(Clone, Debug)]
struct Disposition {
    header: &'static str,
    kind: &'static str,
    /// (value, quoted)
    name: Option<(&'static str, bool)>,
    filename: Option<(String, FilenameForm)>,
    star: Option<(String, StarForm)>,
    upper_keys: bool,
    spaced: bool,
    filename_first: bool,
}

#[derive(Clone, Debug)]
struct Part {
    /// Transport padding after the delimiter.
    padding: &'static str,
    disposition: Option<Disposition>,
    content_type: Option<String>,
    extra: Vec<(String, String)>,
    extra_first: bool,
    data: Data,
}

/// How the request's Content-Type is written.
#[derive(Clone, Debug)]
enum CtForm {
    Plain,
    Quoted,
    Cased,
    Charset,
    Missing,
    Mixed,
    Json,
    NoBoundary,
    Raw(String),
}

#[derive(Clone, Debug)]
struct Form {
    boundary: String,
    ct: CtForm,
    preamble: Vec<u8>,
    parts: Vec<Part>,
    /// The last part sent this many more times (the 64-file cap).
    repeat_last: usize,
    closed: bool,
    /// Unclosed bodies: a CRLF after the last part's data.
    trailing_crlf: bool,
    epilogue: Vec<u8>,
}

#[derive(Clone, Debug)]
enum Mutation {
    None,
    Truncate(Index),
    Flip(Vec<(Index, u8)>),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    /// A delimiter (or the close delimiter) spliced in.
    Delimiter(Index, bool),
    Random(Vec<u8>),
}

#[derive(Clone, Debug)]
struct UploadCase {
    form: Form,
    mutation: Mutation,
    /// Chunk sizes the body arrives in (cycled); empty: one chunk.
    chunks: Vec<usize>,
    /// The body stream ends with an error (the client went away).
    client_gone: bool,
    /// Sent to the app with small caps (SMALL_FILE_BYTES, SMALL_REQUEST_BYTES).
    small: bool,
    /// With a (truthful) Content-Length header.
    content_length: bool,
}

impl UploadCase {
    /// The per-request cap: a body over it is refused at once when its Content-Length says
    /// so, else when the chunk that crosses the cap arrives, unless the answer is settled
    /// before that.
    fn cap_request(&self, expect: Expect, body_len: usize) -> Expect {
        if !self.small || body_len <= SMALL_REQUEST_BYTES {
            return expect;
        }
        if self.content_length {
            return Expect::Refused {
                status: 413,
                error: REQUEST_TOO_LARGE.into(),
                filename: None,
                why: "Content-Length over the per-request cap",
            };
        }
        match expect {
            // The whole body is read before anything commits: its bytes past the cap count.
            Expect::Files(_) => Expect::Refused {
                status: 413,
                error: REQUEST_TOO_LARGE.into(),
                filename: None,
                why: "a body over the per-request cap",
            },
            Expect::Refused { status, .. } => Expect::OneOf(vec![status, 413]),
            Expect::BadRequest => Expect::OneOf(vec![400, 413]),
            Expect::OneOf(mut set) => {
                set.push(413);
                Expect::OneOf(set)
            }
            Expect::Differential => Expect::Differential,
        }
    }
}

#[derive(Clone)]
struct ExpectedFile {
    original: String,
    name: String,
    mime_type: String,
    data: Vec<u8>,
}

impl fmt::Debug for ExpectedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpectedFile")
            .field("original", &self.original)
            .field("name", &self.name)
            .field("mime_type", &self.mime_type)
            .field("data", &clip(&self.data))
            .finish()
    }
}

/// Bytes for a failure message: escaped, the first 4 KiB.
fn clip(bytes: &[u8]) -> String {
    if bytes.len() > 4096 {
        format!(
            "{:?}... ({} bytes)",
            Bytes::copy_from_slice(&bytes[..4096]),
            bytes.len()
        )
    } else {
        format!("{:?}", Bytes::copy_from_slice(bytes))
    }
}

/// What the service must answer.
#[derive(Clone, Debug)]
enum Expect {
    Files(Vec<ExpectedFile>),
    Refused {
        status: u16,
        error: String,
        filename: Option<String>,
        /// Which rule refused it (for the tally).
        why: &'static str,
    },
    /// 400, text unknown (a truncated body).
    BadRequest,
    /// The model cannot say: ask the library's own parse (phase 1) of the same bytes.
    Differential,
    /// One of these statuses (where the per-request cap cuts in depends on the chunking).
    OneOf(Vec<u16>),
}

fn refused(error: &str) -> Expect {
    Expect::Refused {
        status: 400,
        error: error.into(),
        filename: None,
        why: "",
    }
}

fn malformed(why: &'static str) -> Expect {
    Expect::Refused {
        status: 400,
        error: MALFORMED.into(),
        filename: None,
        why,
    }
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A quoted string's content (no unescaped `"` inside) as Go's mime package reads it: `\`
/// escapes a tspecial only, any other backslash stays.
fn unquote_model(s: &str) -> String {
    const TSPECIALS: &str = "()<>@,;:\\\"/[]?=";
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\\' && i + 1 < chars.len() && TSPECIALS.contains(chars[i + 1]) {
            out.push(chars[i + 1]);
            i += 2;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

fn pct(bytes: &[u8]) -> String {
    percent_encode(bytes, NON_ALPHANUMERIC).to_string()
}

/// A value that survives unquoted in a parameter list (it is then trimmed).
fn token_safe(s: &str) -> bool {
    !s.contains([';', '"'])
}

/// What a part's headers must parse to.
enum Head {
    Ok {
        lines: Vec<(String, String)>,
        name: Option<String>,
        filename: Option<String>,
        content_type: Option<String>,
    },
    /// Refused by the parser (400 malformed), and why.
    Malformed(&'static str),
    /// CR or LF inside a header: the model cannot say.
    Unknown,
}

impl Disposition {
    /// The header value, the `name` and the filename the parser must see.
    fn render(&self) -> (String, Option<String>, Option<String>) {
        let key = |k: &str| {
            if self.upper_keys {
                k.to_ascii_uppercase()
            } else {
                k.to_string()
            }
        };
        let eq = if self.spaced { " = " } else { "=" };
        let mut name_param = None;
        let mut name = None;
        if let Some((n, quoted)) = &self.name {
            if *quoted || !token_safe(n) {
                name_param = Some(format!("{}{eq}{}", key("name"), quote(n)));
                name = Some(n.to_string());
            } else {
                name_param = Some(format!("{}{eq}{n}", key("name")));
                name = Some(n.trim().to_string());
            }
        }
        let mut file_params = Vec::new();
        let mut plain = None;
        if let Some((f, form)) = &self.filename {
            let (text, value) = match form {
                FilenameForm::Token if token_safe(f) => (f.clone(), f.trim().to_string()),
                // A trailing backslash would escape the closing quote.
                FilenameForm::RawBackslashes if !f.contains('"') && !f.ends_with('\\') => {
                    (format!("\"{f}\""), unquote_model(f))
                }
                _ => (quote(f), f.clone()),
            };
            file_params.push(format!("{}{eq}{text}", key("filename")));
            plain = Some(value);
        }
        let mut star = None;
        if let Some((f, form)) = &self.star {
            let utf8 = pct(f.as_bytes());
            let (text, decoded) = match form {
                StarForm::Utf8 => (format!("UTF-8''{utf8}"), Some(f.clone())),
                StarForm::Utf8Lower => (format!("utf-8''{utf8}"), Some(f.clone())),
                StarForm::Utf8Lang => (format!("UTF-8'en-US'{utf8}"), Some(f.clone())),
                StarForm::Quoted => (format!("\"UTF-8''{utf8}\""), Some(f.clone())),
                StarForm::Latin1 => {
                    let bytes: Vec<u8> = if f.chars().all(|c| (c as u32) < 256) {
                        f.chars().map(|c| c as u8).collect()
                    } else {
                        f.as_bytes().to_vec()
                    };
                    let decoded = bytes.iter().map(|&b| b as char).collect();
                    (format!("ISO-8859-1''{}", pct(&bytes)), Some(decoded))
                }
                StarForm::UsAscii => (format!("US-ASCII''{utf8}"), Some(f.clone())),
                StarForm::UnknownCharset => (format!("KOI8-R''{utf8}"), None),
                StarForm::BadUtf8 => (format!("UTF-8''%FF%FE{utf8}"), None),
                StarForm::NoQuotes => (utf8, None),
            };
            file_params.push(format!("{}{eq}{text}", key("filename*")));
            star = decoded;
        }
        let mut params: Vec<String> = Vec::new();
        if self.filename_first {
            params.extend(file_params);
            params.extend(name_param);
        } else {
            params.extend(name_param);
            params.extend(file_params);
        }
        let value = if params.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}; {}", self.kind, params.join("; "))
        };
        (value, name, star.or(plain))
    }
}

impl Part {
    fn head(&self) -> Head {
        let mut lines = Vec::new();
        let (mut name, mut filename, mut form_data) = (None, None, true);
        if let Some(d) = &self.disposition {
            let (value, n, f) = d.render();
            form_data = d.kind.trim().eq_ignore_ascii_case("form-data");
            lines.push((d.header.to_string(), value));
            name = n;
            filename = f;
        }
        if let Some(ct) = &self.content_type {
            lines.push(("Content-Type".to_string(), ct.clone()));
        }
        let extra = self.extra.iter().cloned();
        if self.extra_first {
            lines.splice(0..0, extra);
        } else {
            lines.extend(extra);
        }
        let overrides = self.extra.iter().any(|(n, _)| {
            n.eq_ignore_ascii_case("content-type") || n.eq_ignore_ascii_case("content-disposition")
        });
        if overrides || lines.iter().any(|(_, v)| v.contains(['\r', '\n'])) {
            return Head::Unknown;
        }
        // A control byte in a value is taken as sent (a browser sends a file's name as it is
        // but for CR, LF and `"`); it was a malformed part header until 2026-12-05.
        let block = lines
            .iter()
            .map(|(n, v)| n.len() + 2 + v.len() + 2)
            .sum::<usize>()
            + 2;
        if lines.len() > MAX_PART_HEADERS {
            return Head::Malformed("too many part headers");
        }
        if block > MAX_PART_HEADER {
            return Head::Malformed("part header too long");
        }
        if !form_data {
            return Head::Malformed("part is not form-data");
        }
        let content_type = self.content_type.clone();
        Head::Ok {
            lines,
            name,
            filename,
            content_type,
        }
    }
}

/// The boundary the request's Content-Type carries, if it is a valid multipart/form-data one
/// (SPEC: 1 to 70 characters, not ending in a space; the service takes any visible ASCII).
fn boundary_valid(b: &str) -> bool {
    (1..=70).contains(&b.len())
        && !b.ends_with(' ')
        && b.bytes().all(|c| c.is_ascii_graphic() || c == b' ')
}

struct Rendered {
    content_type: Option<String>,
    body: Vec<u8>,
    /// Where the close delimiter ends.
    close_end: Option<usize>,
    expect: Expect,
}

impl Form {
    fn content_type(&self) -> (Option<String>, bool) {
        let b = &self.boundary;
        let param = if b.trim() == b && !b.starts_with('"') && token_safe(b) {
            b.clone()
        } else {
            quote(b)
        };
        let valid = boundary_valid(b);
        match &self.ct {
            CtForm::Plain => (
                Some(format!("multipart/form-data; boundary={param}")),
                valid,
            ),
            CtForm::Quoted => (
                Some(format!("multipart/form-data; boundary={}", quote(b))),
                valid,
            ),
            CtForm::Cased => (
                Some(format!("Multipart/Form-Data; BOUNDARY={param}")),
                valid,
            ),
            CtForm::Charset => (
                Some(format!(
                    "multipart/form-data; charset=utf-8; boundary={param}; x=y"
                )),
                valid,
            ),
            CtForm::Missing => (None, false),
            CtForm::Mixed => (Some(format!("multipart/mixed; boundary={param}")), false),
            CtForm::Json => (Some("application/json".into()), false),
            CtForm::NoBoundary => (Some("multipart/form-data".into()), false),
            CtForm::Raw(raw) => (Some(raw.clone()), false),
        }
    }

    fn render(&self, max_file: usize) -> Rendered {
        let (content_type, boundary_ok) = self.content_type();
        let b = self.boundary.as_bytes();
        let delimiter = [b"\r\n--", b].concat();
        let mut parts = self.parts.clone();
        if let Some(last) = parts.last().cloned() {
            if matches!(&last.data, Data::Bytes(b) if b.len() <= 4096) {
                parts.extend(std::iter::repeat_n(last, self.repeat_last));
            }
        }
        let mut body = Vec::new();
        let mut conflict = false;
        if !self.preamble.is_empty() {
            body.extend_from_slice(&self.preamble);
            body.extend_from_slice(b"\r\n");
            let seen = [b"\r\n".as_slice(), &self.preamble].concat();
            conflict |= memmem::find(&seen, &delimiter).is_some();
        }
        let mut heads = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"--");
            body.extend_from_slice(b);
            body.extend_from_slice(part.padding.as_bytes());
            body.extend_from_slice(b"\r\n");
            let head = part.head();
            let lines: Vec<(String, String)> = match &head {
                Head::Ok { lines, .. } => lines.clone(),
                _ => raw_lines(part),
            };
            for (n, v) in &lines {
                body.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
            }
            body.extend_from_slice(b"\r\n");
            let data = part.data.bytes();
            conflict |= memmem::find(&data, &delimiter).is_some();
            body.extend_from_slice(&data);
            heads.push((head, data));
        }
        let mut close_end = None;
        if self.closed {
            if !parts.is_empty() {
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"--");
            body.extend_from_slice(b);
            body.extend_from_slice(b"--");
            close_end = Some(body.len());
            body.extend_from_slice(&self.epilogue);
        } else if self.trailing_crlf && !parts.is_empty() {
            body.extend_from_slice(b"\r\n");
        }
        let expect = if !boundary_ok {
            match self.ct {
                CtForm::Raw(_) => Expect::Differential,
                _ => malformed("no valid boundary"),
            }
        } else if conflict {
            Expect::Differential
        } else {
            self.model(heads, max_file)
        };
        Rendered {
            content_type,
            body,
            close_end,
            expect,
        }
    }

    /// SPEC §4 step 3 and §10 (bounded parsing), part by part in order: the first refusal
    /// wins.
    fn model(&self, heads: Vec<(Head, Vec<u8>)>, max_file: usize) -> Expect {
        if self.preamble.len() > MAX_PREAMBLE {
            return malformed("preamble too long");
        }
        if heads.is_empty() && !self.closed {
            return malformed("no delimiter");
        }
        let mut files = Vec::new();
        let mut field_bytes = 0usize;
        let n = heads.len();
        for (i, (head, data)) in heads.into_iter().enumerate() {
            let (lines, name, filename, content_type) = match head {
                Head::Ok {
                    lines,
                    name,
                    filename,
                    content_type,
                } => (lines, name, filename, content_type),
                Head::Malformed(why) => return malformed(why),
                Head::Unknown => return Expect::Differential,
            };
            let unterminated = i + 1 == n && !self.closed;
            let original = filename.filter(|f| !f.is_empty());
            match original {
                Some(original) if name.as_deref() == Some("files") => {
                    if files.len() == MAX_FILES {
                        return refused(TOO_MANY);
                    }
                    if data.len() > max_file {
                        if unterminated {
                            // Whether the cap or the missing delimiter is seen first depends
                            // on the bytes held back as a possible delimiter.
                            return Expect::OneOf(vec![400, 413]);
                        }
                        return Expect::Refused {
                            status: 413,
                            error: FILE_TOO_LARGE.into(),
                            filename: Some(original),
                            why: "per-file cap",
                        };
                    }
                    if unterminated {
                        return malformed("no close delimiter");
                    }
                    if data.is_empty() {
                        return Expect::Refused {
                            status: 400,
                            error: EMPTY_FILE.into(),
                            filename: Some(original),
                            why: "",
                        };
                    }
                    files.push(ExpectedFile {
                        name: sanitize(&original, MAX_NAME_CHARS),
                        mime_type: reduce_mimetype(content_type.as_deref()),
                        original,
                        data,
                    });
                }
                _ => {
                    let block = lines
                        .iter()
                        .map(|(n, v)| n.len() + 2 + v.len() + 2)
                        .sum::<usize>()
                        + 2;
                    field_bytes += block + data.len();
                    if unterminated {
                        return malformed("no close delimiter");
                    }
                    if field_bytes > MAX_FIELD_BYTES {
                        return malformed("form fields over 1 MiB");
                    }
                }
            }
        }
        if files.is_empty() {
            return refused(NO_FILES);
        }
        Expect::Files(files)
    }
}

/// A part's header lines as sent, whatever the model makes of them.
fn raw_lines(part: &Part) -> Vec<(String, String)> {
    let mut lines = Vec::new();
    if let Some(d) = &part.disposition {
        lines.push((d.header.to_string(), d.render().0));
    }
    if let Some(ct) = &part.content_type {
        lines.push(("Content-Type".to_string(), ct.clone()));
    }
    if part.extra_first {
        lines.splice(0..0, part.extra.iter().cloned());
    } else {
        lines.extend(part.extra.iter().cloned());
    }
    lines
}

impl UploadCase {
    /// The request's Content-Type, the body as sent, and what must come back.
    fn max_file(&self) -> usize {
        if self.small {
            SMALL_FILE_BYTES
        } else {
            MAX_FILE_BYTES
        }
    }

    fn render(&self) -> (Option<String>, Vec<u8>, Expect) {
        let r = self.form.render(self.max_file());
        let mut body = r.body;
        let expect = match &self.mutation {
            Mutation::None => r.expect,
            Mutation::Truncate(at) => {
                let cut = at.index(body.len() + 1);
                let intact = cut == body.len() || r.close_end.is_some_and(|end| cut >= end);
                body.truncate(cut);
                match r.expect {
                    e if intact => e,
                    Expect::Differential => Expect::Differential,
                    // A file over the small per-file cap may come before the cut.
                    _ if self.small => Expect::OneOf(vec![400, 413]),
                    _ => Expect::BadRequest,
                }
            }
            Mutation::Flip(flips) => {
                if !body.is_empty() {
                    for (at, byte) in flips {
                        let i = at.index(body.len());
                        body[i] = *byte;
                    }
                }
                Expect::Differential
            }
            Mutation::Insert(at, bytes) => {
                let i = at.index(body.len() + 1);
                body.splice(i..i, bytes.iter().copied());
                Expect::Differential
            }
            Mutation::Delete(at, n) => {
                let i = at.index(body.len() + 1);
                let end = (i + n).min(body.len());
                body.drain(i..end);
                Expect::Differential
            }
            Mutation::Delimiter(at, close) => {
                let i = at.index(body.len() + 1);
                let mut d = format!("\r\n--{}", self.form.boundary).into_bytes();
                d.extend_from_slice(if *close { b"--" } else { b"\r\n" });
                body.splice(i..i, d);
                Expect::Differential
            }
            Mutation::Random(bytes) => {
                body = bytes.clone();
                Expect::Differential
            }
        };
        // More than 8 KiB after the closing delimiter: what only the end decides (the files
        // are taken, or there were none) is a 400 instead.
        let epilogue = r.close_end.map_or(0, |end| body.len().saturating_sub(end));
        let expect = match expect {
            Expect::Files(_) if epilogue > MAX_EPILOGUE => malformed("epilogue too long"),
            Expect::Refused { error, .. } if epilogue > MAX_EPILOGUE && error == NO_FILES => {
                malformed("epilogue too long")
            }
            e => e,
        };
        (r.content_type, body, expect)
    }

    fn chunks(&self, body: &[u8]) -> Vec<Bytes> {
        if self.chunks.is_empty() {
            return vec![Bytes::copy_from_slice(body)];
        }
        let mut out = Vec::new();
        let mut rest = body;
        let mut sizes = self.chunks.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap()).clamp(1, rest.len());
            out.push(Bytes::copy_from_slice(&rest[..n]));
            rest = &rest[n..];
        }
        out
    }
}

type Items = Vec<Result<Bytes, std::io::Error>>;

fn stream_items(chunks: &[Bytes], client_gone: bool) -> Items {
    let mut items: Items = chunks.iter().cloned().map(Ok).collect();
    if client_gone {
        items.push(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "client went away",
        )));
    }
    items
}

/// What the library's own phase 1 (the parser and `staging::receive`) makes of the same bytes,
/// arriving the same way: the answer the HTTP path must agree with.
async fn library_outcome(
    content_type: Option<&str>,
    items: Items,
    max_file: usize,
    scratch: &Path,
) -> Expect {
    let boundary = content_type
        .and_then(|ct| HeaderValue::from_bytes(ct.as_bytes()).ok())
        .and_then(|v| v.to_str().ok().and_then(multipart::boundary));
    let Some(boundary) = boundary else {
        return refused(MALFORMED);
    };
    let limits = RequestLimits {
        max_files: MAX_FILES,
        max_file_bytes: max_file as u64,
        max_filename_chars: MAX_NAME_CHARS,
    };
    // Small enough that generated files take both paths: memory, and spilled to disk.
    let memory = pending_uploads::spool::MemoryBudget::unreserved(64 * 1024);
    let mut parts = Multipart::new(
        futures::stream::iter(items),
        &boundary,
        multipart::Limits::default(),
    );
    let hashing = pending_uploads::spool::Hashing::OnReadBack;
    match staging::receive(&mut parts, &limits, scratch, memory, hashing, None).await {
        Ok(received) => {
            let mut files = Vec::new();
            for r in received {
                let mut data = Vec::new();
                let mut chunks = std::pin::pin!(r.spool.chunks());
                while let Some(chunk) = futures::StreamExt::next(&mut chunks).await {
                    data.extend_from_slice(&chunk.unwrap());
                }
                files.push(ExpectedFile {
                    original: r.original.clone(),
                    name: r.name.clone(),
                    mime_type: r.mimetype.clone(),
                    data,
                });
            }
            Expect::Files(files)
        }
        Err(e) => {
            let e = ApiError::from(e);
            let body = e.body();
            Expect::Refused {
                status: e.status().as_u16(),
                error: body.error,
                filename: body.filename,
                why: "",
            }
        }
    }
}

struct UploadTarget {
    app: App,
    ws: Uuid,
    /// The same service with small caps.
    small: App,
    small_ws: Uuid,
    scratch: tempfile::TempDir,
    tally: Tally,
}

/// A name as SPEC §5 leaves it: 1 to 100 of `[A-Za-z0-9._-]`, never `.` or `..`.
fn sane_name(name: &str) -> bool {
    (1..=MAX_NAME_CHARS).contains(&name.chars().count())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && name != "."
        && name != ".."
}

/// A stored mimetype: "" (none sent), or `type/subtype` of visible ASCII, at most 255 long.
fn sane_mime(m: &str) -> bool {
    m.is_empty()
        || (m.len() <= 255
            && m.bytes().all(|b| b.is_ascii_graphic())
            && m.split_once('/')
                .is_some_and(|(t, s)| !t.is_empty() && !s.is_empty() && !s.contains('/')))
}

type UploadRowT = (Uuid, Uuid, String, String, i64, Option<Vec<u8>>);
type ActivityRowT = (
    Uuid,
    String,
    Option<String>,
    Option<Uuid>,
    Option<String>,
    String,
    Option<Value>,
);

impl UploadTarget {
    async fn start() -> UploadTarget {
        let app = App::start(&[]).await;
        let ws = app.poll_workspace().await;
        let (file, request) = (
            SMALL_FILE_BYTES.to_string(),
            SMALL_REQUEST_BYTES.to_string(),
        );
        let small = App::start(&["--max-file-bytes", &file, "--max-request-bytes", &request]).await;
        let small_ws = small.poll_workspace().await;
        UploadTarget {
            app,
            ws,
            small,
            small_ws,
            scratch: tempfile::tempdir().unwrap(),
            tally: Tally::default(),
        }
    }

    async fn check(&self, case: UploadCase) -> Result<(), TestCaseError> {
        let started = Instant::now();
        let open_before = self.app.open_spool_files() + self.small.open_spool_files();
        let (content_type, body, expect) = case.render();
        let chunks = case.chunks(&body);
        let oracle = if matches!(expect, Expect::Differential) {
            "library parse"
        } else {
            "model"
        };
        let expect = match expect {
            Expect::Differential => {
                let items = stream_items(&chunks, case.client_gone);
                let max_file = case.max_file();
                library_outcome(
                    content_type.as_deref(),
                    items,
                    max_file,
                    self.scratch.path(),
                )
                .await
            }
            e => e,
        };
        // A body that fails after all its bytes (the client gone before its end) is cut short:
        // what only the end decides (its files are taken, or it had none) is a 400 instead.
        let expect = match expect {
            Expect::Files(_) if case.client_gone => malformed("the body failed at its end"),
            Expect::Refused { error, .. } if case.client_gone && error == NO_FILES => {
                malformed("the body failed at its end")
            }
            e => e,
        };
        let expect = case.cap_request(expect, body.len());
        let (app, ws) = if case.small {
            (&self.small, self.small_ws)
        } else {
            (&self.app, self.ws)
        };
        let mut req = Request::post(format!("/workspaces/{ws}/chat/uploads"))
            .header(header::AUTHORIZATION, bearer(ADMIN));
        if case.content_length {
            req = req.header(header::CONTENT_LENGTH, body.len());
        }
        if let Some(ct) = &content_type {
            req = req.header(
                header::CONTENT_TYPE,
                HeaderValue::from_bytes(ct.as_bytes()).unwrap(),
            );
        }
        let req = req
            .body(Body::from_stream(futures::stream::iter(stream_items(
                &chunks,
                case.client_gone,
            ))))
            .unwrap();
        let a = app.call(req).await;
        let ctx = || {
            format!(
                "small caps {}\nrequest Content-Type {content_type:?}\nrequest body {}\nanswer {a:?}\nexpected {expect:?}",
                case.small,
                clip(&body)
            )
        };
        let kind = match &expect {
            Expect::Files(f) => format!("{} file(s)", f.len().min(3)),
            Expect::Refused { error, why, .. } if !why.is_empty() => format!("{error} ({why})"),
            Expect::Refused { error, .. } => error.clone(),
            Expect::BadRequest => "truncated".into(),
            Expect::OneOf(set) => format!("one of {set:?}"),
            Expect::Differential => unreachable!(),
        };
        let kind = if case.small {
            format!("{kind} [small caps]")
        } else {
            kind
        };
        let verdict = self.verify(app, ws, &a, &expect, open_before, &ctx).await;
        if a.status == StatusCode::OK || verdict.is_err() {
            // The next case starts from empty tables.
            sqlx::raw_sql("DELETE FROM activity_logs; DELETE FROM pending_uploads")
                .execute(&app.pool)
                .await
                .unwrap();
        }
        self.tally.add_timed(
            format!("{} {oracle}: {kind}", a.status.as_u16()),
            started.elapsed(),
        );
        verdict
    }

    async fn verify(
        &self,
        app: &App,
        ws: Uuid,
        a: &Answer,
        expect: &Expect,
        open_before: usize,
        ctx: &dyn Fn() -> String,
    ) -> Result<(), TestCaseError> {
        prop_assert!(
            matches!(a.status.as_u16(), 200 | 400 | 413),
            "status {} is not 200/400/413\n{}",
            a.status,
            ctx()
        );
        if a.status == StatusCode::OK {
            check_staged(app, ws, a, ctx).await?;
        } else {
            // Nothing left behind by a refusal.
            prop_assert_eq!(app.counts().await, (0, 0), "rows left behind\n{}", ctx());
            if a.status == StatusCode::PAYLOAD_TOO_LARGE {
                let v = a.json();
                let error = error_text(a)?;
                prop_assert!(
                    error == FILE_TOO_LARGE || error == REQUEST_TOO_LARGE,
                    "413 {:?}\n{}",
                    error,
                    ctx()
                );
                if error == FILE_TOO_LARGE {
                    let max = v["max"].as_u64().unwrap_or(0);
                    prop_assert!(v["filename"].is_string(), "\n{}", ctx());
                    prop_assert!(v["size"].as_u64().unwrap_or(0) > max, "\n{}", ctx());
                }
            }
        }
        // Measured against the count before the case, so that a leak fails the case that
        // leaked (and shrinks to it); the end of the run checks for none at all.
        let open = self.app.open_spool_files() + self.small.open_spool_files();
        prop_assert!(
            open <= open_before,
            "spool files left open: {} before, {} after\n{}",
            open_before,
            open,
            ctx()
        );
        match expect {
            Expect::Files(files) => {
                prop_assert_eq!(a.status, StatusCode::OK, "\n{}", ctx());
                check_expected(app, a, files, ctx).await?;
            }
            Expect::Refused {
                status,
                error,
                filename,
                ..
            } => {
                prop_assert_eq!(a.status.as_u16(), *status, "\n{}", ctx());
                prop_assert_eq!(&error_text(a)?, error, "\n{}", ctx());
                if filename.is_some() {
                    let v = a.json();
                    prop_assert_eq!(v["filename"].as_str(), filename.as_deref(), "\n{}", ctx());
                }
            }
            Expect::BadRequest => {
                prop_assert_eq!(a.status, StatusCode::BAD_REQUEST, "\n{}", ctx());
                error_text(a)?;
            }
            Expect::OneOf(set) => {
                prop_assert!(
                    set.contains(&a.status.as_u16()),
                    "not one of {:?}\n{}",
                    set,
                    ctx()
                );
            }
            Expect::Differential => unreachable!("resolved before the request"),
        }
        Ok(())
    }
}

/// The staged files are the expected ones: names, types and bytes, in input order.
async fn check_expected(
    app: &App,
    a: &Answer,
    expected: &[ExpectedFile],
    ctx: &dyn Fn() -> String,
) -> Result<(), TestCaseError> {
    let files = a.json()["files"].as_array().cloned().unwrap_or_default();
    prop_assert_eq!(files.len(), expected.len(), "file count\n{}", ctx());
    let rows: Vec<(String, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT filename, content FROM pending_uploads ORDER BY seq")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    for ((f, e), (_, content)) in files.iter().zip(expected).zip(&rows) {
        let name = f["name"].as_str().unwrap_or_default();
        prop_assert_eq!(name, sanitize(&e.original, MAX_NAME_CHARS), "\n{}", ctx());
        prop_assert_eq!(name, e.name.as_str(), "\n{}", ctx());
        prop_assert_eq!(
            f["mimeType"].as_str(),
            Some(e.mime_type.as_str()),
            "\n{}",
            ctx()
        );
        prop_assert_eq!(f["size"].as_u64(), Some(e.data.len() as u64), "\n{}", ctx());
        prop_assert!(
            content.as_deref() == Some(e.data.as_slice()),
            "stored bytes differ\n{}",
            ctx()
        );
    }
    Ok(())
}

/// A 200: every reported file is one row (name, type, size) and one activity row, and
/// nothing else was written.
async fn check_staged(
    app: &App,
    ws: Uuid,
    a: &Answer,
    ctx: &dyn Fn() -> String,
) -> Result<(), TestCaseError> {
    let v = a.json();
    let files = v["files"].as_array().cloned().unwrap_or_default();
    let rows: Vec<UploadRowT> = sqlx::query_as(
        "SELECT file_id, workspace_id, filename, mimetype, size_bytes, content
             FROM pending_uploads ORDER BY seq",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let acts: Vec<ActivityRowT> = sqlx::query_as(
        "SELECT workspace_id, activity_type, method, target_id, summary, status, request_body
             FROM activity_logs ORDER BY seq",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    prop_assert!(!files.is_empty(), "a 200 without files\n{}", ctx());
    prop_assert_eq!(rows.len(), files.len(), "rows vs reported files\n{}", ctx());
    prop_assert_eq!(acts.len(), files.len(), "activity rows vs files\n{}", ctx());
    for (i, f) in files.iter().enumerate() {
        let (file_id, row_ws, filename, mimetype, size, content) = &rows[i];
        let name = f["name"].as_str().unwrap_or_default();
        let mime = f["mimeType"].as_str().unwrap_or_default();
        let uri = format!("platform-pending:{ws}/{file_id}");
        prop_assert_eq!(*row_ws, ws, "\n{}", ctx());
        prop_assert_eq!(f["uri"].as_str(), Some(uri.as_str()), "\n{}", ctx());
        prop_assert_eq!(name, filename.as_str(), "\n{}", ctx());
        prop_assert_eq!(mime, mimetype.as_str(), "\n{}", ctx());
        prop_assert_eq!(f["size"].as_i64(), Some(*size), "\n{}", ctx());
        prop_assert!(sane_name(name), "name {:?} breaks SPEC §5\n{}", name, ctx());
        prop_assert!(sane_mime(mime), "mimeType {:?}\n{}", mime, ctx());
        let stored = content.as_deref().map_or(0, <[u8]>::len) as i64;
        prop_assert_eq!(stored, *size, "\n{}", ctx());
        let (aws, kind, method, target, summary, status, request_body) = &acts[i];
        prop_assert_eq!(*aws, ws, "\n{}", ctx());
        prop_assert_eq!(kind.as_str(), "a2a_receive", "\n{}", ctx());
        prop_assert_eq!(
            method.as_deref(),
            Some("chat_upload_receive"),
            "\n{}",
            ctx()
        );
        prop_assert_eq!(*target, Some(ws), "\n{}", ctx());
        let want_summary = format!("chat_upload_receive: {name}");
        prop_assert_eq!(
            summary.as_deref(),
            Some(want_summary.as_str()),
            "\n{}",
            ctx()
        );
        prop_assert_eq!(status.as_str(), "ok", "\n{}", ctx());
        let want_body =
            json!({"file_id": file_id, "name": name, "mimeType": mime, "size": size, "uri": uri});
        prop_assert_eq!(request_body.as_ref(), Some(&want_body), "\n{}", ctx());
    }
    Ok(())
}

fn filename() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "\\PC{0,24}",
        3 => nasty_text(10),
        1 => (80usize..300, "[a-z]{0,20}")
            .prop_map(|(n, ext)| format!("{}.{ext}", "n".repeat(n))),
        1 => (1usize..120, select(&['a', '中', '😀', ' ', '.'][..]), select(&["", ".pdf", ".thisisaverylongextension"][..]))
            .prop_map(|(n, c, ext)| format!("{}{ext}", c.to_string().repeat(n))),
        1 => select(&[
            "", " ", ".", "..", "...", "/", "a/", "../../etc/passwd", "C:\\dir\\a.txt",
            "a\"b.txt", "x\\\"y", "hello world.pdf", "中文.docx", "file (1).pdf", "\u{202e}fdp.exe",
        ][..])
        .prop_map(String::from),
    ]
}

fn disposition() -> impl Strategy<Value = Disposition> {
    let header = select(
        &[
            "Content-Disposition",
            "content-disposition",
            "CONTENT-DISPOSITION",
        ][..],
    );
    let kind = prop_oneof![
        30 => Just("form-data"),
        1 => select(&["Form-Data", " form-data", "FORM-DATA ", "attachment", "inline", "", "form-data2", "form data"][..]),
    ];
    let name = prop_oneof![
        8 => Just("files"),
        2 => select(&["file", "Files", "files ", " files", "", "note", "files[]", "fi\"les", "fi;les"][..]),
    ];
    let filename_form = prop_oneof![
        6 => Just(FilenameForm::Quoted),
        1 => Just(FilenameForm::RawBackslashes),
        1 => Just(FilenameForm::Token),
    ];
    let star_form = select(
        &[
            StarForm::Utf8,
            StarForm::Utf8Lower,
            StarForm::Utf8Lang,
            StarForm::Latin1,
            StarForm::UsAscii,
            StarForm::Quoted,
            StarForm::UnknownCharset,
            StarForm::BadUtf8,
            StarForm::NoQuotes,
        ][..],
    );
    (
        header,
        kind,
        proptest::option::weighted(0.95, (name, proptest::bool::weighted(0.8))),
        proptest::option::weighted(0.85, (filename(), filename_form)),
        proptest::option::weighted(0.2, (filename(), star_form)),
        proptest::bool::weighted(0.1),
        proptest::bool::weighted(0.1),
        proptest::bool::weighted(0.2),
    )
        .prop_map(
            |(header, kind, name, filename, star, upper_keys, spaced, filename_first)| {
                Disposition {
                    header,
                    kind,
                    name,
                    filename,
                    star,
                    upper_keys,
                    spaced,
                    filename_first,
                }
            },
        )
}

fn part_content_type() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        3 => Just(None),
        4 => select(&[
            "text/plain", "application/octet-stream", "image/png", "text/plain; charset=utf-8",
            "IMAGE/JPEG", "application/pdf", "video/mp4", "audio/ogg; codecs=opus",
            "image/svg+xml", "text", "/plain", "text/", "text/plain/x", "text/ plain",
            " text/plain ", "", ";", "a/b;c", "*/*", "x/y\tz", "text/plain\u{e9}",
        ][..])
        .prop_map(|s| Some(s.to_string())),
        1 => (240usize..300).prop_map(|n| Some(format!("application/{}", "x".repeat(n - 12)))),
        1 => (250usize..260).prop_map(|n| Some(format!("a/{}", "y".repeat(n - 2)))),
        1 => nasty_text(8).prop_map(Some),
        1 => "[ -~]{0,40}".prop_map(Some),
    ]
}

fn extra_headers() -> impl Strategy<Value = Vec<(String, String)>> {
    let header = ("[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}", "[ -~]{0,20}");
    prop_oneof![
        30 => proptest::collection::vec(header, 0..3),
        1 => proptest::collection::vec(header, 13..20),
        1 => (6000usize..9000).prop_map(|n| vec![("X-Pad".to_string(), "p".repeat(n))]),
    ]
}

fn data() -> impl Strategy<Value = Data> {
    prop_oneof![
        160 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Data::Bytes),
        20 => proptest::collection::vec(any::<u8>(), 0..3000).prop_map(Data::Bytes),
        20 => Just(Data::Bytes(Vec::new())),
        30 => select(vec![&b"\r\n"[..], b"--", b"\r\n--", b"\r\n\r\n", b"-", b"\r", b"x\r\n-"])
            .prop_map(|b| Data::Bytes(b.to_vec())),
        1 => (1_048_000usize..1_049_200).prop_map(|n| Data::Fill(b'f', n)),
    ]
}

fn part() -> impl Strategy<Value = Part> {
    (
        prop_oneof![12 => Just(""), 1 => select(&[" ", "\t", "  \t"][..])],
        proptest::option::weighted(0.93, disposition()),
        part_content_type(),
        extra_headers(),
        proptest::bool::weighted(0.2),
        data(),
    )
        .prop_map(
            |(padding, disposition, content_type, extra, extra_first, data)| Part {
                padding,
                disposition,
                content_type,
                extra,
                extra_first,
                data,
            },
        )
}

fn boundary() -> impl Strategy<Value = String> {
    prop_oneof![
        24 => "[0-9A-Za-z'()+_,./:=?-]{1,40}",
        3 => "[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z]",
        3 => "[!-~]{1,70}",
        1 => "[a-z]{71,90}",
        1 => Just(String::new()),
        1 => "[a-z]{1,10} ",
        1 => "[a-z]{1,5}[\t\u{e9}][a-z]{1,5}",
        2 => select(&["-", "--", "b", "\"b\"", "\\", ";"][..]).prop_map(String::from),
    ]
}

fn ct_form() -> impl Strategy<Value = CtForm> {
    prop_oneof![
        40 => Just(CtForm::Plain),
        3 => Just(CtForm::Quoted),
        2 => Just(CtForm::Cased),
        2 => Just(CtForm::Charset),
        1 => Just(CtForm::Missing),
        1 => Just(CtForm::Mixed),
        1 => Just(CtForm::Json),
        1 => Just(CtForm::NoBoundary),
        1 => "[ -~]{0,80}".prop_map(CtForm::Raw),
    ]
}

fn form() -> impl Strategy<Value = Form> {
    (
        boundary(),
        ct_form(),
        prop_oneof![
            24 => Just(Vec::new()),
            12 => proptest::collection::vec(any::<u8>(), 0..100),
            1 => (8190usize..8200).prop_map(|n| vec![b'p'; n]),
        ],
        prop_oneof![1 => Just(Vec::new()), 8 => proptest::collection::vec(part(), 1..5)],
        prop_oneof![30 => Just(0usize), 1 => 55usize..70],
        proptest::bool::weighted(0.9),
        any::<bool>(),
        prop_oneof![
            30 => Just(b"\r\n".to_vec()),
            10 => Just(Vec::new()),
            10 => proptest::collection::vec(any::<u8>(), 0..40),
            1 => (MAX_EPILOGUE - 2..MAX_EPILOGUE + 4).prop_map(|n| vec![b'e'; n]),
        ],
    )
        .prop_map(
            |(boundary, ct, preamble, parts, repeat_last, closed, trailing_crlf, epilogue)| Form {
                boundary,
                ct,
                preamble,
                parts,
                repeat_last,
                closed,
                trailing_crlf,
                epilogue,
            },
        )
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let inserted = prop_oneof![
        proptest::collection::vec(any::<u8>(), 1..8),
        select(vec![
            &b"\r\n"[..],
            b"\r\n\r\n",
            b"--",
            b"\r\n--",
            b";",
            b"\"",
            b"\0",
            b"\n"
        ])
        .prop_map(|b| b.to_vec()),
    ];
    prop_oneof![
        16 => Just(Mutation::None),
        4 => any::<Index>().prop_map(Mutation::Truncate),
        2 => proptest::collection::vec((any::<Index>(), any::<u8>()), 1..4).prop_map(Mutation::Flip),
        2 => (any::<Index>(), inserted).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), 1usize..20).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (any::<Index>(), any::<bool>()).prop_map(|(i, c)| Mutation::Delimiter(i, c)),
        1 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(Mutation::Random),
    ]
}

fn upload_case() -> impl Strategy<Value = UploadCase> {
    (
        form(),
        mutation(),
        prop_oneof![2 => Just(Vec::new()), 3 => proptest::collection::vec(1usize..512, 1..8)],
        proptest::bool::weighted(0.1),
        proptest::bool::weighted(0.25),
        proptest::bool::weighted(0.5),
    )
        .prop_map(
            |(form, mutation, chunks, client_gone, small, content_length)| UploadCase {
                form,
                mutation,
                chunks,
                client_gone,
                small,
                content_length,
            },
        )
}

#[test]
fn fuzz_multipart_uploads() {
    let rt = runtime();
    let target = rt.block_on(UploadTarget::start());
    fuzz("multipart uploads", &rt, upload_case(), |case| {
        target.check(case)
    });
    target.tally.print("multipart uploads");
    rt.block_on(assert_totals_exact(&target.app.pool));
    rt.block_on(assert_totals_exact(&target.small.pool));
    assert_eq!(target.app.open_spool_files(), 0, "spool files left open");
    assert_eq!(target.small.open_spool_files(), 0, "spool files left open");
}

// ---------------------------------------------------------------------------------------------
// Target 2: Range on GET and HEAD .../content
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct RangeCase {
    file: Index,
    head: bool,
    /// Range header values, in order (none: no header).
    ranges: Vec<Vec<u8>>,
}

impl fmt::Debug for RangeCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ranges: Vec<Bytes> = self.ranges.iter().map(|r| Bytes::from(r.clone())).collect();
        f.debug_struct("RangeCase")
            .field("file", &self.file)
            .field("head", &self.head)
            .field("ranges", &ranges)
            .finish()
    }
}

/// What a Range header asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RangeExp {
    Full,
    Part(u64, u64),
    Unsatisfiable,
    /// first-pos > last-pos: an invalid range-spec, which RFC 9110 §14.2 lets a server
    /// ignore (200) or reject (416).
    Invalid,
}

/// A decimal digit string against a u64 (any length: past 64 bits is past every u64).
fn dec_cmp(digits: &str, n: u64) -> Ordering {
    let d = digits.trim_start_matches('0');
    if d.len() > 20 {
        return Ordering::Greater;
    }
    let v: u128 = if d.is_empty() { 0 } else { d.parse().unwrap() };
    v.cmp(&(n as u128))
}

fn dec_min(digits: &str, n: u64) -> u64 {
    if dec_cmp(digits, n) == Ordering::Greater {
        n
    } else {
        digits.trim_start_matches('0').parse().unwrap_or(0)
    }
}

fn dec_cmp_str(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    a.len().cmp(&b.len()).then(a.cmp(b))
}

/// SPEC §4 (single `bytes=` range; a malformed or multi-range header serves the whole file;
/// positions past 64 bits clamp like any past-the-end position), RFC 9110 §14.
fn range_model(raw: Option<&[u8]>, size: u64) -> RangeExp {
    let Some(raw) = raw else {
        return RangeExp::Full;
    };
    // A value that is not visible ASCII is not read as text at all.
    if !raw.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        return RangeExp::Full;
    }
    let s = std::str::from_utf8(raw).unwrap().trim();
    // The unit name is case-insensitive (RFC 9110 §14.1).
    let Some(spec) = s
        .get(..6)
        .filter(|unit| unit.eq_ignore_ascii_case("bytes="))
        .map(|_| &s[6..])
    else {
        return RangeExp::Full;
    };
    if spec.contains(',') {
        return RangeExp::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeExp::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    match (a.is_empty(), b.is_empty()) {
        (true, false) if digits(b) => {
            if dec_cmp(b, 0) == Ordering::Equal {
                RangeExp::Unsatisfiable
            } else {
                let n = dec_min(b, size);
                RangeExp::Part(size - n, size - 1)
            }
        }
        (false, true) if digits(a) => {
            if dec_cmp(a, size) == Ordering::Less {
                RangeExp::Part(dec_min(a, size), size - 1)
            } else {
                RangeExp::Unsatisfiable
            }
        }
        (false, false) if digits(a) && digits(b) => {
            if dec_cmp_str(a, b) == Ordering::Greater {
                RangeExp::Invalid
            } else if dec_cmp(a, size) != Ordering::Less {
                RangeExp::Unsatisfiable
            } else {
                RangeExp::Part(dec_min(a, size), dec_min(b, size - 1))
            }
        }
        _ => RangeExp::Full,
    }
}

struct RangeTarget {
    app: App,
    ws: Uuid,
    files: Vec<(Uuid, Vec<u8>)>,
    tally: Tally,
}

impl RangeTarget {
    async fn start() -> RangeTarget {
        let app = App::start(&[]).await;
        let ws = app.poll_workspace().await;
        let mut files = Vec::new();
        for (i, size) in [1usize, 2, 10, 1000].into_iter().enumerate() {
            let data: Vec<u8> = (0..size).map(|j| (j * 7 + i) as u8).collect();
            let entry = app
                .upload(ws, &[("f.bin", "application/octet-stream", &data)])
                .await;
            let uri = entry[0]["uri"].as_str().unwrap();
            files.push((uri.rsplit('/').next().unwrap().parse().unwrap(), data));
        }
        RangeTarget {
            app,
            ws,
            files,
            tally: Tally::default(),
        }
    }

    async fn check(&self, case: RangeCase) -> Result<(), TestCaseError> {
        let (file_id, data) = &self.files[case.file.index(self.files.len())];
        let size = data.len() as u64;
        let method = if case.head { Method::HEAD } else { Method::GET };
        let mut req = Request::builder()
            .method(method)
            .uri(format!(
                "/workspaces/{}/pending-uploads/{file_id}/content",
                self.ws
            ))
            .header(header::AUTHORIZATION, bearer(ADMIN));
        for r in &case.ranges {
            req = req.header(header::RANGE, HeaderValue::from_bytes(r).unwrap());
        }
        let a = self.app.call(req.body(Body::empty()).unwrap()).await;
        // Range is a singleton field: sent twice, there is no one range to serve.
        let want = match case.ranges.as_slice() {
            [_, _, ..] => RangeExp::Full,
            ranges => range_model(ranges.first().map(Vec::as_slice), size),
        };
        let shape = match want {
            RangeExp::Part(..) => "Part",
            RangeExp::Full if case.ranges.is_empty() => "no Range",
            w => match w {
                RangeExp::Full => "Full",
                RangeExp::Unsatisfiable => "Unsatisfiable",
                _ => "Invalid",
            },
        };
        let method = if case.head { "HEAD" } else { "GET" };
        self.tally
            .add(format!("{method} {}: model {shape}", a.status.as_u16()));
        let ctx = || {
            format!(
                "{case:?} size {size}\nanswer {a:?}\nheaders {:?}\nmodel {want:?}",
                a.headers
            )
        };
        prop_assert!(
            matches!(a.status.as_u16(), 200 | 206 | 416),
            "status {} is not 200/206/416\n{}",
            a.status,
            ctx()
        );
        let length: Option<u64> = a
            .header(header::CONTENT_LENGTH)
            .and_then(|v| v.parse().ok());
        let got = match a.status {
            StatusCode::OK => RangeExp::Full,
            StatusCode::PARTIAL_CONTENT => {
                let cr = a.header(header::CONTENT_RANGE).unwrap_or_default();
                let parsed = cr
                    .strip_prefix("bytes ")
                    .and_then(|r| r.split_once('/'))
                    .and_then(|(r, total)| {
                        let (s, e) = r.split_once('-')?;
                        Some((s.parse::<u64>().ok()?, e.parse::<u64>().ok()?, total))
                    });
                let Some((s, e, total)) = parsed else {
                    return Err(TestCaseError::fail(format!(
                        "bad Content-Range {cr:?}\n{}",
                        ctx()
                    )));
                };
                prop_assert_eq!(total, size.to_string(), "\n{}", ctx());
                prop_assert!(
                    s <= e && e < size,
                    "range {}-{} of {}\n{}",
                    s,
                    e,
                    size,
                    ctx()
                );
                prop_assert_eq!(length, Some(e - s + 1), "\n{}", ctx());
                if !case.head {
                    prop_assert!(
                        a.body.as_ref() == &data[s as usize..=e as usize],
                        "206 body is not bytes {}-{}\n{}",
                        s,
                        e,
                        ctx()
                    );
                }
                RangeExp::Part(s, e)
            }
            _ => {
                let want_range = format!("bytes */{size}");
                prop_assert_eq!(
                    a.header(header::CONTENT_RANGE),
                    Some(want_range.as_str()),
                    "\n{}",
                    ctx()
                );
                if !case.head {
                    prop_assert_eq!(
                        error_text(&a)?,
                        "requested range not satisfiable",
                        "\n{}",
                        ctx()
                    );
                }
                RangeExp::Unsatisfiable
            }
        };
        if a.status == StatusCode::OK {
            prop_assert_eq!(length, Some(size), "\n{}", ctx());
            prop_assert_eq!(a.header(header::CONTENT_RANGE), None, "\n{}", ctx());
            if !case.head {
                prop_assert!(
                    a.body.as_ref() == data.as_slice(),
                    "200 body differs\n{}",
                    ctx()
                );
            }
        }
        if a.status != StatusCode::RANGE_NOT_SATISFIABLE {
            prop_assert_eq!(
                a.header(header::ACCEPT_RANGES),
                Some("bytes"),
                "\n{}",
                ctx()
            );
            prop_assert!(a.header(header::ETAG).is_some(), "no ETag\n{}", ctx());
        }
        if case.head {
            prop_assert!(a.body.is_empty(), "a HEAD answer with a body\n{}", ctx());
        } else if let Some(len) = length {
            prop_assert_eq!(
                a.body.len() as u64,
                len,
                "body vs Content-Length\n{}",
                ctx()
            );
        }
        let agrees = match want {
            RangeExp::Invalid => matches!(got, RangeExp::Full | RangeExp::Unsatisfiable),
            w => got == w,
        };
        prop_assert!(
            agrees,
            "answered {:?}, SPEC says {:?}\n{}",
            got,
            want,
            ctx()
        );
        prop_assert_eq!(self.app.counts().await, (4, 4), "rows changed\n{}", ctx());
        prop_assert_eq!(self.app.open_spool_files(), 0, "\n{}", ctx());
        Ok(())
    }
}

fn range_number() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (0u64..12).prop_map(|n| n.to_string()),
        3 => (0u64..1100).prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        2 => "[0-9]{19,40}",
        2 => select(&[
            "", "-1", "+1", "0x10", "1e3", " 5", "5 ", "0000000000000000000000000000001",
            "\u{661}\u{662}", "1.0", "18446744073709551615", "18446744073709551616", "0", "00",
        ][..])
        .prop_map(String::from),
    ]
}

fn structured_range() -> impl Strategy<Value = String> {
    let unit = prop_oneof![
        10 => Just("bytes="),
        1 => select(&["Bytes=", "bytes =", "bytes", "items=", "bytes=bytes=", " bytes=", "bytes=\t", "BYTES="][..]),
    ];
    let spec = (
        proptest::option::weighted(0.8, range_number()),
        prop_oneof![10 => Just("-"), 1 => select(&["--", "", " - ", "\u{2014}", "_"][..])],
        proptest::option::weighted(0.7, range_number()),
    )
        .prop_map(|(a, sep, b)| format!("{}{sep}{}", a.unwrap_or_default(), b.unwrap_or_default()))
        .boxed();
    (
        unit,
        prop_oneof![6 => proptest::collection::vec(spec.clone(), 1..2), 1 => proptest::collection::vec(spec, 2..4)],
        select(&[",", ", ", " ,"][..]),
        select(&["", " ", "\t"][..]),
    )
        .prop_map(|(unit, specs, comma, ws)| format!("{ws}{unit}{}{ws}", specs.join(comma)))
}

fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..30).prop_map(|v| {
        v.into_iter()
            .map(|b| {
                if b == b'\t' || (b >= 0x20 && b != 0x7f) {
                    b
                } else {
                    b'?'
                }
            })
            .collect()
    })
}

fn range_case() -> impl Strategy<Value = RangeCase> {
    let value = prop_oneof![
        6 => structured_range().prop_map(String::into_bytes),
        1 => "[ -~]{0,30}".prop_map(String::into_bytes),
        1 => header_bytes(),
    ];
    (
        any::<Index>(),
        proptest::bool::weighted(0.3),
        prop_oneof![
            1 => Just(Vec::new()),
            12 => proptest::collection::vec(value.clone(), 1..2),
            1 => proptest::collection::vec(value, 2..3),
        ],
    )
        .prop_map(|(file, head, ranges)| RangeCase { file, head, ranges })
}

#[test]
fn fuzz_range_headers() {
    let rt = runtime();
    let target = rt.block_on(RangeTarget::start());
    fuzz("range headers", &rt, range_case(), |case| {
        target.check(case)
    });
    target.tally.print("range headers");
}

// ---------------------------------------------------------------------------------------------
// Target 3: the activity feed's query
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum QVal {
    Text(String),
    /// One of the workspace's own rows, written in one of the UUID forms.
    Row(Index, u8),
    /// A row of another workspace.
    Foreign,
    RandomUuid(u128, u8),
}

/// How a pair is written into the query string.
#[derive(Clone, Debug)]
enum Enc {
    Raw,
    Pct,
    Form,
    /// Percent-encoded, with a broken escape spliced in.
    Bad(Index, &'static str),
}

#[derive(Clone, Debug)]
struct Pair {
    key: String,
    val: QVal,
    enc: Enc,
    /// `key` alone, without `=`.
    bare: bool,
}

#[derive(Clone, Debug)]
enum QueryCase {
    Pairs(Vec<Pair>),
    Raw(String),
}

fn uuid_form(id: Uuid, form: u8) -> String {
    match form % 6 {
        0 => id.hyphenated().to_string(),
        1 => id.simple().to_string(),
        2 => id.braced().to_string(),
        3 => id.urn().to_string(),
        4 => id.hyphenated().to_string().to_uppercase(),
        _ => format!(" {id} "),
    }
}

/// Characters a query string may carry as they are.
fn query_safe(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$'()*,;:@/?".contains(c)
}

fn encode(s: &str, enc: &Enc) -> String {
    match enc {
        Enc::Raw if s.chars().all(query_safe) => s.to_string(),
        Enc::Form => url::form_urlencoded::byte_serialize(s.as_bytes()).collect(),
        Enc::Bad(at, junk) => {
            let mut out = pct(s.as_bytes());
            let i = at.index(out.len() + 1);
            out.insert_str(i, junk);
            out
        }
        _ => pct(s.as_bytes()),
    }
}

/// One of the workspace's activity rows, as the feed must list it.
#[derive(Clone, Debug)]
struct FeedRow {
    id: Uuid,
    activity_type: String,
    method: Option<String>,
    upload: bool,
}

struct ActivityTarget {
    app: App,
    ws: Uuid,
    /// Oldest first (seq order).
    rows: Vec<FeedRow>,
    /// Newest first, as the feed lists them without a cursor.
    newest: Vec<Uuid>,
    foreign: Uuid,
    /// When the rows were written (bounds of their created_at).
    written: (Instant, Instant),
    tally: Tally,
}

/// The feed's query as SPEC §4 and the handler's contract read it.
#[derive(Debug)]
enum FeedExp {
    BadRequest,
    Gone,
    Rows {
        limit: usize,
        type_: Option<String>,
        method: Option<String>,
        cursor: Option<Uuid>,
        since_secs: Option<i64>,
        peer_info: bool,
    },
}

fn feed_model(q: &HashMap<String, String>) -> FeedExp {
    let get = |k: &str| q.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let text = |k: &str| get(k).map(str::to_string);
    if [text("type"), text("method")]
        .iter()
        .flatten()
        .any(|v| v.contains('\0'))
    {
        return FeedExp::BadRequest;
    }
    // As the platform reads it: not a positive integer is the default.
    let limit = match get("limit").and_then(|v| v.parse::<i64>().ok()) {
        Some(n) if n > 0 => n.min(500),
        _ => 100,
    };
    // A positive integer, however many digits, clamped to 30 days.
    let positive = |v: &str| {
        let digits = v.strip_prefix('+').unwrap_or(v);
        !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && digits.bytes().any(|b| b != b'0')
    };
    let since_secs = match get("since_secs") {
        None => None,
        Some(v) if positive(v) => {
            Some(v.parse::<i64>().map_or(30 * 86_400, |n| n.min(30 * 86_400)))
        }
        Some(_) => return FeedExp::BadRequest,
    };
    let cursor = match get("since_id").map(Uuid::try_parse) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => return FeedExp::BadRequest,
    };
    match get("wait").map(str::parse::<u64>) {
        None | Some(Ok(1..=60)) => {}
        Some(_) => return FeedExp::BadRequest,
    }
    let peer_info = get("include").is_some_and(|v| v.split(',').any(|i| i.trim() == "peer_info"));
    FeedExp::Rows {
        limit: limit as usize,
        type_: text("type"),
        method: text("method"),
        cursor,
        since_secs,
        peer_info,
    }
}

impl ActivityTarget {
    async fn start() -> ActivityTarget {
        let app = App::start(&[]).await;
        let ws = app.poll_workspace().await;
        let other = app.poll_workspace().await;
        let t0 = Instant::now();
        app.upload(ws, &[("a.png", "image/png", b"png")]).await;
        app.upload(
            ws,
            &[
                ("b.txt", "text/plain", b"text"),
                ("c.ogg", "audio/ogg", b"ogg"),
            ],
        )
        .await;
        sqlx::query(
            "INSERT INTO activity_logs (workspace_id, activity_type, method, summary, request_body)
             VALUES ($1, 'a2a_send', 'message/send', 'hello', '{\"text\":\"hi\"}')",
        )
        .bind(ws)
        .execute(&app.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO activity_logs (workspace_id, activity_type) VALUES ($1, 'task_update')",
        )
        .bind(ws)
        .execute(&app.pool)
        .await
        .unwrap();
        app.upload(ws, &[("d.bin", "application/octet-stream", b"bin")])
            .await;
        app.upload(other, &[("e.bin", "application/octet-stream", b"x")])
            .await;
        let t1 = Instant::now();
        let rows: Vec<(Uuid, String, Option<String>, bool)> = sqlx::query_as(
            "SELECT id, activity_type, method, method IS NOT DISTINCT FROM 'chat_upload_receive'
             FROM activity_logs WHERE workspace_id = $1 ORDER BY seq",
        )
        .bind(ws)
        .fetch_all(&app.pool)
        .await
        .unwrap();
        let newest: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM activity_logs WHERE workspace_id = $1 ORDER BY created_at DESC, seq DESC",
        )
        .bind(ws)
        .fetch_all(&app.pool)
        .await
        .unwrap();
        let foreign = sqlx::query_scalar("SELECT id FROM activity_logs WHERE workspace_id = $1")
            .bind(other)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        ActivityTarget {
            app,
            ws,
            rows: rows
                .into_iter()
                .map(|(id, activity_type, method, upload)| FeedRow {
                    id,
                    activity_type,
                    method,
                    upload,
                })
                .collect(),
            newest,
            foreign,
            written: (t0, t1),
            tally: Tally::default(),
        }
    }

    fn value(&self, v: &QVal) -> String {
        match v {
            QVal::Text(s) => s.clone(),
            QVal::Row(i, form) => uuid_form(self.rows[i.index(self.rows.len())].id, *form),
            QVal::Foreign => self.foreign.to_string(),
            QVal::RandomUuid(u, form) => uuid_form(Uuid::from_u128(*u), *form),
        }
    }

    fn query(&self, case: &QueryCase) -> String {
        match case {
            QueryCase::Raw(raw) => raw
                .chars()
                .map(|c| {
                    if query_safe(c) || "%&=+".contains(c) {
                        c.to_string()
                    } else {
                        pct(c.to_string().as_bytes())
                    }
                })
                .collect(),
            QueryCase::Pairs(pairs) => pairs
                .iter()
                .map(|p| {
                    let key = encode(&p.key, &p.enc);
                    if p.bare {
                        key
                    } else {
                        format!("{key}={}", encode(&self.value(&p.val), &p.enc))
                    }
                })
                .collect::<Vec<_>>()
                .join("&"),
        }
    }

    /// The rows the feed must answer, or None when the since_secs window's edge is too close
    /// to when the rows were written to say.
    fn expected_rows(
        &self,
        limit: usize,
        type_: Option<&str>,
        method: Option<&str>,
        cursor: Option<Uuid>,
        since_secs: Option<i64>,
    ) -> Option<Vec<Uuid>> {
        let in_window = match since_secs {
            None => true,
            Some(secs) => {
                let (oldest, newest) = (
                    self.written.0.elapsed().as_secs_f64(),
                    self.written.1.elapsed().as_secs_f64(),
                );
                if secs as f64 > oldest + 2.0 {
                    true
                } else if (secs as f64) < newest - 2.0 {
                    false
                } else {
                    return None;
                }
            }
        };
        let matches = |r: &FeedRow| {
            in_window
                && type_.is_none_or(|t| r.activity_type == t)
                && method.is_none_or(|m| r.method.as_deref() == Some(m))
        };
        let by_id: HashMap<Uuid, &FeedRow> = self.rows.iter().map(|r| (r.id, r)).collect();
        let ids: Vec<Uuid> = match cursor {
            Some(c) => {
                let at = self.rows.iter().position(|r| r.id == c)?;
                self.rows[at + 1..]
                    .iter()
                    .filter(|r| matches(r))
                    .map(|r| r.id)
                    .collect()
            }
            None => self
                .newest
                .iter()
                .filter(|id| matches(by_id[id]))
                .copied()
                .collect(),
        };
        Some(ids.into_iter().take(limit).collect())
    }

    /// The `wait` to append when the query is a long poll on one of the workspace's rows that
    /// could hold the request longer than a moment.
    fn long_poll(&self, query: &str) -> Option<&'static str> {
        let decoded: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let FeedExp::Rows {
            limit,
            ref type_,
            ref method,
            cursor: Some(cursor),
            since_secs,
            ..
        } = feed_model(&decoded)
        else {
            return None;
        };
        let wait = decoded
            .get("wait")
            .map(|w| w.trim())
            .filter(|w| !w.is_empty())?;
        let rows = self.expected_rows(
            limit,
            type_.as_deref(),
            method.as_deref(),
            Some(cursor),
            since_secs,
        );
        match rows {
            // Answers at once; still, never wait over 1 s should the model be wrong.
            Some(rows) if !rows.is_empty() => (wait != "1").then_some("&wait=1"),
            // Nothing newer (or the cursor is not this workspace's: 410 at once).
            _ if !self.rows.iter().any(|r| r.id == cursor) => None,
            _ if query.len() % 8 == 0 => (wait != "1").then_some("&wait=1"),
            _ => Some("&wait="),
        }
    }

    async fn check(&self, case: QueryCase) -> Result<(), TestCaseError> {
        let mut query = self.query(&case);
        if let Some(wait) = self.long_poll(&query) {
            // A long poll on a known cursor with nothing newer holds the request for its whole
            // wait. Keep cases fast: one in eight such cases waits 1 s, the others do not wait
            // (the last `wait` wins; an empty one is none).
            query.push_str(wait);
        }
        let uri = format!("/workspaces/{}/activity?{query}", self.ws);
        let Ok(req) = Request::get(&uri)
            .header(header::AUTHORIZATION, bearer(ADMIN))
            .body(Body::empty())
        else {
            // Not a request-target HTTP can carry: nothing reaches the service.
            return Ok(());
        };
        let decoded: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let mut want = feed_model(&decoded);
        let known = |c: Uuid| self.rows.iter().any(|r| r.id == c);
        if let FeedExp::Rows {
            cursor: Some(c), ..
        } = want
        {
            if !known(c) {
                want = FeedExp::Gone;
            }
        }
        let a = self.app.call(req).await;
        let kind = match &want {
            FeedExp::BadRequest => "bad request".to_string(),
            FeedExp::Gone => "gone".to_string(),
            FeedExp::Rows {
                cursor, peer_info, ..
            } => format!(
                "rows{}{}",
                if cursor.is_some() {
                    " after cursor"
                } else {
                    ""
                },
                if *peer_info { " +peer_info" } else { "" }
            ),
        };
        let listed = a.json().as_array().map_or(0, Vec::len).min(2);
        self.tally.add(format!(
            "{} model {kind}, {listed}+ rows",
            a.status.as_u16()
        ));
        let ctx = || format!("query {query:?}\ndecoded {decoded:?}\nanswer {a:?}\nmodel {want:?}");
        prop_assert!(
            matches!(a.status.as_u16(), 200 | 400 | 410),
            "status {} is not 200/400/410\n{}",
            a.status,
            ctx()
        );
        match want {
            FeedExp::BadRequest => {
                prop_assert_eq!(a.status, StatusCode::BAD_REQUEST, "\n{}", ctx());
                error_text(&a)?;
            }
            FeedExp::Gone => {
                prop_assert_eq!(a.status, StatusCode::GONE, "\n{}", ctx());
                prop_assert!(
                    error_text(&a)?.starts_with("since_id cursor not found"),
                    "\n{}",
                    ctx()
                );
            }
            FeedExp::Rows {
                limit,
                ref type_,
                ref method,
                cursor,
                since_secs,
                peer_info,
            } => {
                prop_assert_eq!(a.status, StatusCode::OK, "\n{}", ctx());
                let v = a.json();
                let Some(list) = v.as_array() else {
                    return Err(TestCaseError::fail(format!("not a JSON array\n{}", ctx())));
                };
                prop_assert!(list.len() <= limit, "more rows than the limit\n{}", ctx());
                let by_id: HashMap<Uuid, &FeedRow> = self.rows.iter().map(|r| (r.id, r)).collect();
                let mut got = Vec::new();
                for row in list {
                    let id: Option<Uuid> = row["id"].as_str().and_then(|s| s.parse().ok());
                    let Some(r) = id.and_then(|id| by_id.get(&id)) else {
                        return Err(TestCaseError::fail(format!(
                            "a row that is not this workspace's: {row}\n{}",
                            ctx()
                        )));
                    };
                    let ws = self.ws.to_string();
                    prop_assert_eq!(
                        row["workspace_id"].as_str(),
                        Some(ws.as_str()),
                        "\n{}",
                        ctx()
                    );
                    prop_assert!(row["seq"].is_i64(), "no seq\n{}", ctx());
                    let attachments = row.get("attachments");
                    if peer_info && r.upload {
                        let list = attachments.and_then(Value::as_array);
                        prop_assert_eq!(list.map(Vec::len), Some(1), "\n{}", ctx());
                        let att = &list.unwrap()[0];
                        prop_assert!(
                            att["uri"]
                                .as_str()
                                .is_some_and(|u| u.starts_with("platform-pending:")),
                            "\n{}",
                            ctx()
                        );
                        let mime = att["mime_type"].as_str().unwrap_or("");
                        let kind = ["image", "audio", "video"]
                            .into_iter()
                            .find(|k| mime.starts_with(&format!("{k}/")))
                            .unwrap_or("file");
                        prop_assert_eq!(att["kind"].as_str(), Some(kind), "\n{}", ctx());
                    } else {
                        prop_assert!(
                            attachments.is_none(),
                            "attachments not asked for\n{}",
                            ctx()
                        );
                    }
                    got.push(r.id);
                }
                if let Some(want_ids) = self.expected_rows(
                    limit,
                    type_.as_deref(),
                    method.as_deref(),
                    cursor,
                    since_secs,
                ) {
                    prop_assert_eq!(got, want_ids, "rows\n{}", ctx());
                }
            }
        }
        prop_assert_eq!(self.app.counts().await, (5, 7), "rows changed\n{}", ctx());
        prop_assert_eq!(self.app.open_spool_files(), 0, "\n{}", ctx());
        Ok(())
    }
}

const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "+5",
    "5",
    "100",
    "500",
    "501",
    "9999999999",
    "99999999999999999999",
    "1.5",
    " 7 ",
    "",
    " ",
    "2592000",
    "2592001",
    "0x10",
    "1e3",
    "\u{661}",
    "3600",
    "86400",
    "60",
    "61",
];

fn text_of(s: &'static [&'static str]) -> impl Strategy<Value = QVal> {
    select(s).prop_map(|s| QVal::Text(s.to_string()))
}

/// A value for `key`: mostly one meant for it, sometimes any.
fn query_value(key: &str) -> BoxedStrategy<QVal> {
    let any_value = prop_oneof![
        4 => text_of(NUMBERS),
        1 => any::<i64>().prop_map(|n| QVal::Text(n.to_string())),
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, f)| QVal::Row(i, f)),
        1 => Just(QVal::Foreign),
        1 => (any::<u128>(), any::<u8>()).prop_map(|(u, f)| QVal::RandomUuid(u, f)),
        3 => text_of(&[
            "peer_info", "x,peer_info", " peer_info ", "PEER_INFO", "peer_info,,", ",",
            "a2a_receive", "chat_upload_receive", "message/send", "a2a_send", "task_update",
            "a\0b", "\0", "nope", "{00000000-0000-0000-0000-000000000000}",
        ]),
        2 => nasty_text(5).prop_map(QVal::Text),
    ]
    .boxed();
    let meant: BoxedStrategy<QVal> = match key {
        "since_id" => prop_oneof![
            6 => (any::<Index>(), any::<u8>()).prop_map(|(i, f)| QVal::Row(i, f)),
            1 => Just(QVal::Foreign),
            1 => (any::<u128>(), any::<u8>()).prop_map(|(u, f)| QVal::RandomUuid(u, f)),
            1 => text_of(&["nope", "", "0", "{00000000-0000-0000-0000-000000000000}", "urn:uuid:"]),
        ]
        .boxed(),
        "limit" | "since_secs" => prop_oneof![
            4 => text_of(NUMBERS),
            1 => any::<i64>().prop_map(|n| QVal::Text(n.to_string())),
        ]
        .boxed(),
        "wait" => text_of(&["0", "1", " 1 ", "+1", "61", "-1", "x", "", "1.0"]).boxed(),
        "include" => text_of(&[
            "peer_info",
            "x,peer_info",
            " peer_info ",
            "PEER_INFO",
            "peer_info,,",
            ",",
            "",
            "peer_info\0",
            "peer",
            "x, peer_info",
            "peer_info ,x",
            "x,\tpeer_info",
        ])
        .boxed(),
        "type" | "method" => prop_oneof![
            4 => text_of(&[
                "a2a_receive", "chat_upload_receive", "message/send", "a2a_send", "task_update",
                "a\0b", "\0", "", " a2a_receive ", "A2A_RECEIVE",
            ]),
            1 => nasty_text(4).prop_map(QVal::Text),
        ]
        .boxed(),
        _ => return any_value,
    };
    prop_oneof![3 => meant, 1 => any_value].boxed()
}

fn query_case() -> impl Strategy<Value = QueryCase> {
    let key = prop_oneof![
        12 => select(&["since_id", "since_secs", "limit", "include", "type", "method", "wait"][..]).prop_map(String::from),
        1 => "[a-z_]{0,10}",
        1 => select(&["since_id ", " limit", "LIMIT", "type[]", "include\0", ""][..]).prop_map(String::from),
        1 => nasty_text(3),
    ];
    let enc = prop_oneof![
        4 => Just(Enc::Raw),
        3 => Just(Enc::Pct),
        2 => Just(Enc::Form),
        2 => (any::<Index>(), select(&[
            "%", "%G", "%zz", "%FF", "%C3", "%E2%82", "%00", "%%", "%2", "+", "&", "=", "&&",
            "%26", "%3D", "%C0%80", "%ED%A0%80",
        ][..]))
            .prop_map(|(i, j)| Enc::Bad(i, j)),
    ];
    let pair = (key, enc, proptest::bool::weighted(0.05)).prop_flat_map(|(key, enc, bare)| {
        query_value(&key).prop_map(move |val| Pair {
            key: key.clone(),
            val,
            enc: enc.clone(),
            bare,
        })
    });
    prop_oneof![
        8 => proptest::collection::vec(pair, 0..6).prop_map(QueryCase::Pairs),
        1 => "[ -~]{0,60}".prop_map(QueryCase::Raw),
    ]
}

#[test]
fn fuzz_activity_query() {
    let rt = runtime();
    let target = rt.block_on(ActivityTarget::start());
    fuzz("activity query", &rt, query_case(), |case| {
        target.check(case)
    });
    target.tally.print("activity query");
}

// ---------------------------------------------------------------------------------------------
// Target 4: registry JSON bodies
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Route {
    Register,
    Create,
}

#[derive(Clone, Debug)]
enum Auth {
    None,
    /// A raw Authorization value; `{admin}` and `{own}` stand for the admin token and the live
    /// workspace's own token.
    Value(&'static str),
}

#[derive(Clone, Debug)]
enum IdVal {
    Missing,
    Fresh(u128, u8),
    Live(u8),
    Removed(u8),
    Other(Value),
}

#[derive(Clone, Debug)]
enum Pad {
    Field(usize),
    Name(usize),
    Url(usize),
}

/// A registration body close to what clients send; `None` fields are left out.
#[derive(Clone, Debug)]
struct NearBody {
    id: IdVal,
    delivery_mode: Option<Value>,
    url: Option<Value>,
    agent_card: Option<Value>,
    name: Option<Value>,
    extra: Vec<(String, Value)>,
    pad: Option<Pad>,
}

#[derive(Clone, Debug)]
enum RegBody {
    Near(NearBody),
    Json(Value),
    Raw(Vec<u8>),
}

#[derive(Clone, Debug)]
struct RegCase {
    route: Route,
    auth: Auth,
    body: RegBody,
}

/// What a registration must answer.
#[derive(Debug, Clone, PartialEq)]
enum RegExp {
    Status(u16, Option<&'static str>),
    /// 400 with a serde message.
    BadJson,
    /// 200 creating `id` with this mode, url and name.
    Created {
        id: Option<Uuid>,
        mode: &'static str,
        url: Option<String>,
        name: String,
    },
    /// 200 re-registration (no new rows).
    Updated(Uuid),
    /// The model cannot say (a top-level array, a URL whose host needs a name lookup).
    Unknown,
}

fn v4_internal(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    a == 0 // unspecified, "this network"
        || a == 10 // private
        || a == 127 // loopback
        || (a == 169 && b == 254) // link-local (cloud metadata)
        || (a == 172 && (16..32).contains(&b)) // private
        || (a == 192 && b == 168) // private
        || (a == 100 && (64..128).contains(&b)) // shared address space
        || matches!((a, b, ip.octets()[2]), (192, 0, 0 | 2) | (198, 51, 100) | (203, 0, 113) | (192, 88, 99)) // assignments, documentation, 6to4 relay
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 224 // multicast, reserved, broadcast
}

fn v6_internal(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
    if s[..5] == [0; 5] && s[5] == 0xffff {
        return v4_internal(v4(s[6], s[7])); // IPv4-mapped
    }
    ip.is_unspecified()
        || ip.is_loopback()
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0 // site-local
        || (s[0] & 0xff00) == 0xff00 // multicast
        || (s[..6] == [0; 6] && v4_internal(v4(s[6], s[7]))) // IPv4-compatible
        || (s[..6] == [0, 0, 0, 0, 0xffff, 0] && v4_internal(v4(s[6], s[7]))) // IPv4-translated
        || (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && v4_internal(v4(s[6], s[7]))) // NAT64
        || s[..3] == [0x64, 0xff9b, 1] // local-use NAT64
        || (s[0] == 0x2002 && v4_internal(v4(s[1], s[2]))) // 6to4
        || s[..4] == [0x100, 0, 0, 0] // discard-only
        || s[..2] == [0x2001, 0xdb8] // documentation
        || (s[0] == 0x3fff && s[1] >> 12 == 0) // documentation 3fff::/20 (RFC 9637)
        || s[..3] == [0x2001, 2, 0] // benchmarking
        || s[..2] == [0x2001, 0] // Teredo
        || (s[0] == 0x2001 && matches!(s[1] >> 4, 1 | 2)) // ORCHID, ORCHIDv2
}

/// SPEC §4's push URL rule: Some(allowed), or None when it depends on a name lookup.
fn url_verdict(raw: &str) -> Option<bool> {
    // At most 2048 bytes (workspace rows are never deleted).
    if raw.len() > 2048 {
        return Some(false);
    }
    // An authority right after `scheme://` (RFC 3986; the WHATWG parser would find a host in
    // `http:x` or `http:///x`), and no backslash or control character (which it would read
    // as `/` or drop; Go refuses them).
    let raw = raw.trim();
    let authority = raw
        .split_once("://")
        .filter(|(scheme, _)| !scheme.contains(':'))
        .map(|(_, rest)| rest);
    if raw.chars().any(|c| c.is_ascii_control())
        || raw.contains('\\')
        || authority.is_none_or(|a| a.starts_with('/'))
    {
        return Some(false);
    }
    let Ok(u) = url::Url::parse(raw) else {
        return Some(false);
    };
    // Userinfo, empty too (`http://@host`): any `@` before the path.
    let userinfo = authority.is_some_and(|a| {
        a.split(['/', '?', '#'])
            .next()
            .is_some_and(|a| a.contains('@'))
    });
    if !matches!(u.scheme(), "http" | "https")
        || userinfo
        || !u.username().is_empty()
        || u.password().is_some()
        || u.query().is_some()
        || u.fragment().is_some()
    {
        return Some(false);
    }
    match u.host() {
        None => Some(false),
        Some(url::Host::Ipv4(ip)) => Some(!v4_internal(ip)),
        Some(url::Host::Ipv6(ip)) => Some(!v6_internal(ip)),
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            if d == "localhost" || d.ends_with(".localhost") {
                Some(false)
            } else if d.ends_with(".invalid") {
                // Never resolves (RFC 6761): accepted, checked again when connecting.
                Some(true)
            } else {
                None
            }
        }
    }
}

fn opt_string(v: Option<&Value>) -> Result<Option<String>, ()> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(()),
    }
}

/// The registration body as serde reads it: Err = refused as invalid JSON, None = unknown.
struct RegRequest {
    id: Option<Uuid>,
    mode: Option<String>,
    url: Option<String>,
    name: Option<String>,
}

fn read_request(v: &Value, route: &Route) -> Option<Result<RegRequest, ()>> {
    let obj = match v {
        Value::Object(o) => o,
        // serde reads a struct from a sequence too, positionally.
        Value::Array(_) => return None,
        _ => return Some(Err(())),
    };
    let id = match (obj.get("id"), route) {
        (Some(Value::String(s)), _) => match Uuid::try_parse(s) {
            Ok(id) => Some(id),
            Err(_) => return Some(Err(())),
        },
        (None | Some(Value::Null), Route::Create) => None,
        _ => return Some(Err(())),
    };
    let field = |k: &str| opt_string(obj.get(k));
    let (Ok(mode), Ok(url)) = (field("delivery_mode"), field("url")) else {
        return Some(Err(()));
    };
    let name = match route {
        Route::Create => match field("name") {
            Ok(n) => n,
            Err(()) => return Some(Err(())),
        },
        Route::Register => match obj.get("agent_card") {
            None | Some(Value::Null) => None,
            Some(Value::Object(card)) => match opt_string(card.get("name")) {
                Ok(n) => n,
                Err(()) => return Some(Err(())),
            },
            Some(Value::Array(_)) => return None,
            Some(_) => return Some(Err(())),
        },
    };
    Some(Ok(RegRequest {
        id,
        mode,
        url,
        name,
    }))
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// The bearer token of an Authorization value (SPEC §3).
fn bearer_of(value: Option<&str>) -> Option<&str> {
    let (scheme, token) = value?.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A workspace row's state before the case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WsState {
    Absent,
    Live,
    Removed,
}

struct RegistryTarget {
    app: App,
    live: Uuid,
    own_token: String,
    removed: Uuid,
    tally: Tally,
}

impl RegistryTarget {
    async fn start() -> RegistryTarget {
        // No push target is allowed on internal networks (SPEC's default). Thousands of
        // cases register without a claim: REGISTRATIONS_PER_MINUTE and its per-client share
        // have tests of their own.
        let app = App::start(&[
            "--push-allowed-networks",
            "",
            "--registrations-per-minute",
            "1000000",
            "--registrations-per-minute-per-client",
            "1000000",
        ])
        .await;
        let (live, own_token) = app
            .workspace(json!({"name": "live", "delivery_mode": "poll"}))
            .await;
        let (removed, _) = app
            .workspace(json!({"name": "gone", "delivery_mode": "poll"}))
            .await;
        let req = Request::delete(format!("/workspaces/{removed}"))
            .header(header::AUTHORIZATION, bearer(ADMIN))
            .body(Body::empty())
            .unwrap();
        assert_eq!(app.call(req).await.status, StatusCode::OK);
        RegistryTarget {
            app,
            live,
            own_token,
            removed,
            tally: Tally::default(),
        }
    }

    fn auth(&self, auth: &Auth) -> Option<String> {
        match auth {
            Auth::None => None,
            Auth::Value(v) => Some(
                v.replace("{admin}", ADMIN)
                    .replace("{own}", &self.own_token),
            ),
        }
    }

    fn body(&self, body: &RegBody) -> Vec<u8> {
        let near = match body {
            RegBody::Raw(b) => return b.clone(),
            RegBody::Json(v) => return serde_json::to_vec(v).unwrap(),
            RegBody::Near(n) => n,
        };
        let mut obj = Map::new();
        match &near.id {
            IdVal::Missing => {}
            IdVal::Fresh(u, f) => {
                obj.insert(
                    "id".into(),
                    json!(uuid_form(Uuid::from_u128(*u), *f).trim()),
                );
            }
            IdVal::Live(f) => {
                obj.insert("id".into(), json!(uuid_form(self.live, *f).trim()));
            }
            IdVal::Removed(f) => {
                obj.insert("id".into(), json!(uuid_form(self.removed, *f).trim()));
            }
            IdVal::Other(v) => {
                obj.insert("id".into(), v.clone());
            }
        }
        for (k, v) in [
            ("delivery_mode", &near.delivery_mode),
            ("url", &near.url),
            ("agent_card", &near.agent_card),
            ("name", &near.name),
        ] {
            if let Some(v) = v {
                obj.insert(k.into(), v.clone());
            }
        }
        for (k, v) in &near.extra {
            obj.insert(k.clone(), v.clone());
        }
        match near.pad {
            Some(Pad::Field(n)) => {
                obj.insert("padding".into(), json!("x".repeat(n)));
            }
            Some(Pad::Name(n)) => {
                obj.insert("name".into(), json!("n".repeat(n)));
                obj.insert("agent_card".into(), json!({"name": "n".repeat(n)}));
            }
            Some(Pad::Url(n)) => {
                obj.insert(
                    "url".into(),
                    json!(format!("http://8.8.8.8/{}", "a".repeat(n))),
                );
            }
            None => {}
        }
        serde_json::to_vec(&Value::Object(obj)).unwrap()
    }

    async fn state(&self, id: Uuid) -> WsState {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM workspaces WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.app.pool)
                .await
                .unwrap();
        match status.as_deref() {
            None => WsState::Absent,
            Some("removed") => WsState::Removed,
            Some(_) => WsState::Live,
        }
    }

    async fn counts(&self) -> (i64, i64) {
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM workspaces), (SELECT count(*) FROM workspace_auth_tokens)",
        )
        .fetch_one(&self.app.pool)
        .await
        .unwrap()
    }

    /// SPEC §4 Registry and §10 (JSON bodies over 64 KiB get 413), in the order the checks
    /// apply.
    async fn model(&self, route: &Route, auth: Option<&str>, body: &[u8], raw: bool) -> RegExp {
        let token = bearer_of(auth);
        if matches!(route, Route::Create) {
            match token {
                None => return RegExp::Status(401, Some("missing workspace auth token")),
                Some(t) if t != ADMIN => {
                    return RegExp::Status(401, Some("invalid workspace auth token"))
                }
                _ => {}
            }
        }
        if body.len() > 64 * 1024 {
            return RegExp::Status(413, Some("JSON body exceeds 65536 bytes"));
        }
        let Ok(value) = serde_json::from_slice::<Value>(body) else {
            return RegExp::BadJson;
        };
        // A NUL in any decoded string or key (an escaped backslash before `u0000` is none).
        fn has_nul(v: &Value) -> bool {
            match v {
                Value::String(s) => s.contains('\0'),
                Value::Array(items) => items.iter().any(has_nul),
                Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
                _ => false,
            }
        }
        if has_nul(&value) {
            return RegExp::Status(400, Some("strings must not contain NUL characters"));
        }
        if raw {
            // Raw bytes may repeat a key, which serde refuses for a struct but not for a Value.
            return RegExp::Unknown;
        }
        let req = match read_request(&value, route) {
            None => return RegExp::Unknown,
            Some(Err(())) => return RegExp::BadJson,
            Some(Ok(r)) => r,
        };
        let name = non_empty(req.name);
        // Names are at most 256 characters (workspace rows are never deleted); checked first
        // on the admin route, after the delivery mode on registration.
        let too_long = || RegExp::Status(400, Some("name must be at most 256 characters"));
        let long_name = name.as_ref().is_some_and(|n| n.chars().count() > 256);
        if matches!(route, Route::Create) && long_name {
            return too_long();
        }
        if matches!(route, Route::Create) && name.is_none() {
            return RegExp::Status(400, Some("name is required"));
        }
        let mode = match req.mode.as_deref() {
            None => None,
            Some(m @ ("push" | "poll")) => Some(if m == "push" { "push" } else { "poll" }),
            Some(_) => return RegExp::Status(400, Some("delivery_mode must be 'push' or 'poll'")),
        };
        if long_name {
            return too_long();
        }
        let url = non_empty(req.url);
        if let Some(u) = &url {
            match url_verdict(u) {
                Some(true) => {}
                Some(false) => return RegExp::Status(400, Some("workspace URL not allowed")),
                None => return RegExp::Unknown,
            }
        }
        let initial = mode.unwrap_or(if url.is_some() { "push" } else { "poll" });
        let Some(id) = req.id else {
            return RegExp::Created {
                id: None,
                mode: initial,
                url,
                name: name.unwrap_or_default(),
            };
        };
        match (self.state(id).await, route) {
            (WsState::Absent, _) => RegExp::Created {
                id: Some(id),
                mode: initial,
                url,
                name: name.unwrap_or_default(),
            },
            (_, Route::Create) => RegExp::Status(409, Some("workspace already exists")),
            (WsState::Removed, Route::Register) => match token {
                None => RegExp::Status(401, Some("missing workspace auth token")),
                Some(t) if t == ADMIN => RegExp::Status(409, Some("workspace has been removed")),
                Some(_) => RegExp::Status(401, Some("invalid workspace auth token")),
            },
            (WsState::Live, Route::Register) => match token {
                None => RegExp::Status(401, Some("missing workspace auth token")),
                Some(t) if t == ADMIN || (t == self.own_token && id == self.live) => {
                    RegExp::Updated(id)
                }
                Some(_) => RegExp::Status(401, Some("invalid workspace auth token")),
            },
        }
    }

    async fn check(&self, case: RegCase) -> Result<(), TestCaseError> {
        let auth = self.auth(&case.auth);
        let body = self.body(&case.body);
        let raw = matches!(case.body, RegBody::Raw(_));
        let want = self.model(&case.route, auth.as_deref(), &body, raw).await;
        let before = self.counts().await;
        let path = match case.route {
            Route::Register => "/registry/register",
            Route::Create => "/workspaces",
        };
        let mut req = Request::post(path).header(header::CONTENT_TYPE, "application/json");
        if let Some(v) = &auth {
            req = req.header(header::AUTHORIZATION, v.as_str());
        }
        let a = self
            .app
            .call(req.body(Body::from(body.clone())).unwrap())
            .await;
        let after = self.counts().await;
        let kind = match &want {
            RegExp::Status(s, Some(t)) => format!("{s} {t}"),
            RegExp::Status(s, None) => s.to_string(),
            RegExp::BadJson => "invalid JSON".into(),
            RegExp::Created { .. } => "created".into(),
            RegExp::Updated(_) => "updated".into(),
            RegExp::Unknown => "unknown".into(),
        };
        self.tally.add(format!(
            "{:?} {}: model {kind}",
            case.route,
            a.status.as_u16()
        ));
        let shown = clip(&body);
        let ctx = || {
            format!(
                "{:?} auth {auth:?}\nbody ({} bytes) {shown:?}\nanswer {a:?}\nmodel {want:?}",
                case.route,
                body.len()
            )
        };
        prop_assert!(
            matches!(a.status.as_u16(), 200 | 400 | 401 | 409 | 413),
            "status {} is not 200/400/401/409/413\n{}",
            a.status,
            ctx()
        );
        let v = a.json();
        let created = a.status == StatusCode::OK && v.get("auth_token").is_some();
        // Nothing left behind: rows appear only with a 200 that issued a token, and then
        // exactly one workspace and one token.
        let grown = (after.0 - before.0, after.1 - before.1);
        prop_assert_eq!(
            grown,
            if created { (1, 1) } else { (0, 0) },
            "rows written\n{}",
            ctx()
        );
        if a.status == StatusCode::OK {
            prop_assert_eq!(v["status"].as_str(), Some("registered"), "\n{}", ctx());
            prop_assert!(v["platform_inbound_secret"].is_string(), "\n{}", ctx());
            let id: Option<Uuid> = v["id"].as_str().and_then(|s| s.parse().ok());
            prop_assert!(id.is_some(), "no id\n{}", ctx());
            if created {
                prop_assert_eq!(
                    v["auth_token"].as_str().map(str::len),
                    Some(43),
                    "\n{}",
                    ctx()
                );
                let row: Option<(String, Option<String>, Option<String>)> =
                    sqlx::query_as("SELECT delivery_mode, url, name FROM workspaces WHERE id = $1")
                        .bind(id.unwrap())
                        .fetch_optional(&self.app.pool)
                        .await
                        .unwrap();
                prop_assert!(row.is_some(), "the created row is missing\n{}", ctx());
                if let RegExp::Created {
                    id: want_id,
                    mode,
                    url,
                    name,
                } = &want
                {
                    let (got_mode, got_url, got_name) = row.unwrap();
                    if let Some(want_id) = want_id {
                        prop_assert_eq!(id, Some(*want_id), "\n{}", ctx());
                    }
                    prop_assert_eq!(v["delivery_mode"].as_str(), Some(*mode), "\n{}", ctx());
                    prop_assert_eq!(got_mode.as_str(), *mode, "\n{}", ctx());
                    prop_assert_eq!(&got_url, url, "\n{}", ctx());
                    prop_assert_eq!(got_name.unwrap_or_default(), name.clone(), "\n{}", ctx());
                }
            }
        } else {
            let error = error_text(&a)?;
            if let RegExp::Status(_, Some(text)) = &want {
                prop_assert_eq!(error.as_str(), *text, "\n{}", ctx());
            }
            if want == RegExp::BadJson {
                prop_assert!(error.starts_with("invalid JSON body"), "\n{}", ctx());
            }
        }
        match &want {
            RegExp::Status(status, _) => {
                prop_assert_eq!(a.status.as_u16(), *status, "\n{}", ctx())
            }
            RegExp::BadJson => prop_assert_eq!(a.status, StatusCode::BAD_REQUEST, "\n{}", ctx()),
            RegExp::Created { .. } => prop_assert!(created, "not created\n{}", ctx()),
            RegExp::Updated(id) => {
                prop_assert_eq!(a.status, StatusCode::OK, "\n{}", ctx());
                prop_assert!(!created, "a token issued on re-registration\n{}", ctx());
                let id = id.to_string();
                prop_assert_eq!(v["id"].as_str(), Some(id.as_str()), "\n{}", ctx());
            }
            RegExp::Unknown => {}
        }
        Ok(())
    }
}

fn url_text() -> impl Strategy<Value = String> {
    let scheme = prop_oneof![
        8 => select(&["http://", "https://"][..]),
        1 => select(&["HTTP://", "ftp://", "file://", "javascript:", "ws://", "http:/", "http:", "//"][..]),
    ];
    let userinfo =
        prop_oneof![8 => Just(""), 1 => select(&["user@", "user:pw@", "@", ":@", ":pw@"][..])];
    let host = prop_oneof![
        4 => select(&[
            "8.8.8.8", "1.1.1.1", "93.184.216.34", "[2606:4700:4700::1111]",
            "[2001:4860:4860::8888]", "example.invalid", "hooks.example.invalid.",
            "127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "10.0.0.1",
            "172.16.5.4", "172.31.255.255", "172.32.0.1", "192.168.1.1", "169.254.169.254",
            "0.0.0.0", "0", "100.64.0.1", "100.128.0.1", "224.0.0.1", "239.255.255.250",
            "255.255.255.255", "240.0.0.1", "[::1]", "[::]", "[fe80::1]", "[fc00::1]",
            "[fd12:3456::1]", "[ff02::1]", "[fec0::1]", "[::ffff:127.0.0.1]",
            "[::ffff:10.0.0.1]", "[::ffff:8.8.8.8]", "[64:ff9b::7f00:1]", "[64:ff9b::808:808]",
            "[2002:7f00:1::]", "[2002:808:808::]", "[::127.0.0.1]", "localhost", "LOCALHOST.",
            "api.localhost", "", "[::1", "8.8.8.8:", "%31%32%37.0.0.1",
            "[::ffff:0:a9fe:a9fe]", "[64:ff9b:1::a9fe:a9fe]", "198.18.0.1", "192.0.2.1",
            "203.0.113.5", "192.0.3.1", "[2001:db8::1]", "[100::1]", "[2001:10::1]",
        ][..])
        .prop_map(String::from),
        1 => any::<[u8; 4]>().prop_map(|o| Ipv4Addr::from(o).to_string()),
        1 => any::<[u16; 8]>().prop_map(|s| format!("[{}]", Ipv6Addr::from(s))),
    ];
    let port = prop_oneof![6 => Just(""), 1 => select(&[":80", ":8080", ":0", ":65535", ":65536", ":x"][..])];
    let path = select(&["", "/", "/hook", "/a b", "/%2e%2e/", "/\u{e9}"][..]);
    let tail = prop_oneof![8 => Just(""), 1 => select(&["?", "?a=b", "#", "#x"][..])];
    let ws = prop_oneof![8 => Just(""), 1 => select(&[" ", "\t", "\n"][..])];
    prop_oneof![
        8 => (ws.clone(), scheme, userinfo, host, port, path, tail, ws)
            .prop_map(|(w1, s, u, h, p, pa, t, w2)| format!("{w1}{s}{u}{h}{p}{pa}{t}{w2}")),
        1 => nasty_text(6),
        1 => select(&["", "   ", "not a url", "/relative", "http://", "http:///x"][..]).prop_map(String::from),
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        nasty_text(6).prop_map(Value::String),
        any::<u128>().prop_map(|u| json!(Uuid::from_u128(u))),
        select(&["push", "poll", "http://8.8.8.8/", "http://127.0.0.1/"][..])
            .prop_map(|s| json!(s)),
    ];
    let key = prop_oneof![
        3 => select(&["id", "delivery_mode", "url", "agent_card", "name", "status"][..]).prop_map(String::from),
        1 => nasty_text(3),
    ];
    leaf.prop_recursive(3, 24, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn field_value<S: Strategy<Value = String> + 'static>(
    text: S,
) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(Value::Null)),
        8 => text.prop_map(|s| Some(Value::String(s))),
        1 => select(vec![json!(1), json!(true), json!([]), json!({}), json!(["push"])]).prop_map(Some),
    ]
}

fn reg_case() -> impl Strategy<Value = RegCase> {
    let id = prop_oneof![
        1 => Just(IdVal::Missing),
        8 => (any::<u128>(), any::<u8>()).prop_map(|(u, f)| IdVal::Fresh(u, f)),
        2 => any::<u8>().prop_map(IdVal::Live),
        2 => any::<u8>().prop_map(IdVal::Removed),
        1 => select(vec![
            json!(null), json!(""), json!("nope"), json!(" 6f9619ff-8b86-d011-b42d-00c04fc964ff"),
            json!("6f9619ff-8b86-d011-b42d-00c04fc964f"), json!(42), json!([1, 2]), json!({}),
            json!("00000000-0000-0000-0000-000000000000"),
        ])
        .prop_map(IdVal::Other),
    ];
    let mode = field_value(prop_oneof![
        8 => select(&["poll", "push"][..]).prop_map(String::from),
        1 => select(&["Poll", "PUSH", " poll", "push ", "", "pull", "poll\0"][..]).prop_map(String::from),
        1 => nasty_text(3),
    ]);
    let url = field_value(url_text());
    let card_name = prop_oneof![
        4 => "[a-zA-Z0-9 ._-]{0,20}",
        2 => nasty_text(6),
        1 => select(&["\0", "a\0b", "\\u0000", " ", ""][..]).prop_map(String::from),
    ];
    let agent_card = prop_oneof![
        3 => Just(None),
        1 => Just(Some(Value::Null)),
        6 => field_value(card_name.clone()).prop_map(|n| {
            let mut card = Map::new();
            if let Some(n) = n {
                card.insert("name".into(), n);
            }
            Some(Value::Object(card))
        }),
        1 => select(vec![json!("card"), json!(7), json!([]), json!(["x"])]).prop_map(Some),
    ];
    let name = field_value(card_name);
    let extra = proptest::collection::vec(
        (
            prop_oneof![
                select(
                    &[
                        "status",
                        "auth_token",
                        "platform_inbound_secret",
                        "Id",
                        "ID"
                    ][..]
                )
                .prop_map(String::from),
                nasty_text(3)
            ],
            arb_json(),
        ),
        0..2,
    );
    let pad = prop_oneof![
        12 => Just(None),
        1 => (65_400usize..65_700).prop_map(|n| Some(Pad::Field(n))),
        1 => (60_000usize..72_000).prop_map(|n| Some(Pad::Name(n / 2))),
        1 => (60_000usize..72_000).prop_map(|n| Some(Pad::Url(n))),
    ];
    let near = (id, mode, url, agent_card, name, extra, pad).prop_map(
        |(id, delivery_mode, url, agent_card, name, extra, pad)| {
            RegBody::Near(NearBody {
                id,
                delivery_mode,
                url,
                agent_card,
                name,
                extra,
                pad,
            })
        },
    );
    let raw = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..80),
        select(&[
            "", "{", "}", "null", "[]", "{}", "\"x\"", "{\"id\":", "{\"id\":\"a\",\"id\":\"b\"}",
            "{\"id\":\"6f9619ff-8b86-d011-b42d-00c04fc964ff\",\"id\":\"6f9619ff-8b86-d011-b42d-00c04fc964ff\"}",
            "{\"name\":\"\\ud800\"}", "{\"name\":\"\\u0000\"}", "{\"name\":\"\\U0000\"}",
            "{\"url\":\"x\"}garbage", "\u{feff}{}", "{\"name\":\"a\"} ",
        ][..])
        .prop_map(|s| s.as_bytes().to_vec()),
    ];
    let body = prop_oneof![
        10 => near,
        3 => arb_json().prop_map(RegBody::Json),
        1 => raw.prop_map(RegBody::Raw),
    ];
    let auth = prop_oneof![
        3 => Just(Auth::None),
        5 => Just(Auth::Value("Bearer {admin}")),
        2 => Just(Auth::Value("Bearer {own}")),
        2 => select(&[
            "bearer {admin}", "Bearer  {admin} ", "Bearer garbage", "Basic {admin}", "Bearer ",
            "{admin}", "Bearer {admin}x", "BEARER {own}",
        ][..])
        .prop_map(Auth::Value),
    ];
    (
        prop_oneof![3 => Just(Route::Register), 2 => Just(Route::Create)],
        auth,
        body,
    )
        .prop_map(|(route, auth, body)| RegCase { route, auth, body })
}

#[test]
fn fuzz_registry_bodies() {
    let rt = runtime();
    let target = rt.block_on(RegistryTarget::start());
    fuzz("registry bodies", &rt, reg_case(), |case| {
        target.check(case)
    });
    target.tally.print("registry bodies");
}
