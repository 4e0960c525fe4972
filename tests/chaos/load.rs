//! Client load: every request is recorded (operation, start, duration, outcome) so a scenario
//! can judge afterwards what each client saw during and outside its fault windows.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use rand::{rngs::StdRng, Rng, SeedableRng};
use reqwest::{header::RETRY_AFTER, multipart, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// What one request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP answer (for a download: with its whole body).
    Http {
        status: u16,
        retry_after: bool,
        /// The `code` of a JSON error body.
        code: Option<String>,
    },
    /// A download whose body ended short of its Content-Length.
    Cut,
    /// A download whose bytes differ from what was uploaded: always a failure.
    Corrupt,
    /// No HTTP answer: connection refused or reset.
    Transport,
    /// No answer within the client's own timeout: a hang.
    Timeout,
    /// A raw-socket client that hung up on purpose.
    Dropped,
}

impl Outcome {
    pub fn key(&self) -> String {
        match self {
            Outcome::Http { status, .. } => status.to_string(),
            Outcome::Cut => "cut".into(),
            Outcome::Corrupt => "corrupt".into(),
            Outcome::Transport => "transport".into(),
            Outcome::Timeout => "timeout".into(),
            Outcome::Dropped => "dropped".into(),
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Http { status, .. } if *status < 300)
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub op: &'static str,
    /// Since the recorder's start.
    pub start: Duration,
    pub elapsed: Duration,
    pub outcome: Outcome,
    /// For failures: what the client saw (body or error).
    pub detail: String,
}

impl Sample {
    pub fn end(&self) -> Duration {
        self.start + self.elapsed
    }
}

/// A time window of a fault, relative to the recorder's start.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub start: Duration,
    pub end: Duration,
}

impl Window {
    pub fn overlaps(&self, s: &Sample) -> bool {
        s.start <= self.end && s.end() >= self.start
    }
}

/// An upload the service answered 200: what must download byte-identical later.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub ws: Uuid,
    pub token: String,
    pub file_id: Uuid,
    pub name: String,
    pub size: usize,
    pub sha256: [u8; 32],
}

pub struct Recorder {
    pub t0: Instant,
    samples: Mutex<Vec<Sample>>,
    faults: Mutex<Vec<Window>>,
    open_fault: Mutex<Option<Duration>>,
    pub accepted: Mutex<Vec<Accepted>>,
    /// Requests retried after a failure, and retries that failed too.
    pub retried: std::sync::atomic::AtomicUsize,
    pub retry_failed: Mutex<Vec<String>>,
}

impl Recorder {
    pub fn new() -> Arc<Recorder> {
        Self::starting_at(Instant::now())
    }

    /// A second recorder on the same clock (its samples and windows compare with ours).
    pub fn sibling(&self) -> Arc<Recorder> {
        Self::starting_at(self.t0)
    }

    fn starting_at(t0: Instant) -> Arc<Recorder> {
        Arc::new(Recorder {
            t0,
            samples: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            open_fault: Mutex::new(None),
            accepted: Mutex::new(Vec::new()),
            retried: Default::default(),
            retry_failed: Mutex::new(Vec::new()),
        })
    }

    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    pub fn record(&self, op: &'static str, started: Instant, outcome: Outcome, detail: String) {
        let s = Sample {
            op,
            start: started - self.t0,
            elapsed: started.elapsed(),
            outcome,
            detail,
        };
        self.samples.lock().unwrap().push(s);
    }

    /// Marks the start of a fault (until `fault_end`).
    pub fn fault_begin(&self) {
        *self.open_fault.lock().unwrap() = Some(self.now());
    }

    /// Ends the fault window opened by `fault_begin`, `grace` from now (the time the service
    /// is given to notice the recovery).
    pub fn fault_end(&self, grace: Duration) {
        let start = self
            .open_fault
            .lock()
            .unwrap()
            .take()
            .expect("a fault began");
        self.faults.lock().unwrap().push(Window {
            start,
            end: self.now() + grace,
        });
    }

    pub fn faults(&self) -> Vec<Window> {
        self.faults.lock().unwrap().clone()
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    pub fn accepted(&self) -> Vec<Accepted> {
        self.accepted.lock().unwrap().clone()
    }

    pub fn during_fault(&self, s: &Sample) -> bool {
        self.faults.lock().unwrap().iter().any(|w| w.overlaps(s))
    }

    /// Did the request start before a fault began (so it was in flight when it hit)?
    pub fn in_flight_at_fault_start(&self, s: &Sample, slack: Duration) -> bool {
        self.faults
            .lock()
            .unwrap()
            .iter()
            .any(|w| s.start <= w.start + slack && s.end() >= w.start)
    }

    /// The slowest request of each operation, in ms.
    pub fn max_latency_by_op(&self) -> BTreeMap<&'static str, u128> {
        let mut out = BTreeMap::new();
        for s in self.samples.lock().unwrap().iter() {
            let e = out.entry(s.op).or_insert(0);
            *e = (*e).max(s.elapsed.as_millis());
        }
        out
    }
}

/// The numbers of a scenario's summary line.
pub struct Summary {
    pub sent: usize,
    pub during_fault: usize,
    pub statuses: BTreeMap<String, usize>,
    /// Max latency of requests in a fault window (of all requests when there was none).
    pub max_latency: Duration,
}

impl Summary {
    pub fn of(rec: &Recorder) -> Summary {
        let samples = rec.samples();
        let faults = rec.faults();
        let mut statuses = BTreeMap::new();
        let mut during_fault = 0;
        let mut max_latency = Duration::ZERO;
        for s in &samples {
            *statuses.entry(s.outcome.key()).or_insert(0) += 1;
            let in_fault = faults.iter().any(|w| w.overlaps(s));
            if in_fault {
                during_fault += 1;
            }
            if (in_fault || faults.is_empty()) && s.outcome != Outcome::Dropped {
                max_latency = max_latency.max(s.elapsed);
            }
        }
        Summary {
            sent: samples.len(),
            during_fault,
            statuses,
            max_latency,
        }
    }

    /// Prints the summary line (`line`) of `rec`'s requests so far.
    pub fn print(rec: &Recorder, scenario: &str, lost: usize, orphaned: usize, leaked: usize) {
        println!(
            "{}",
            Summary::of(rec).line(scenario, lost, orphaned, leaked)
        );
    }

    /// `CHAOS <scenario>: sent=N during_fault=M statuses={200:a,503:b} lost=0 orphaned=0 leaked=0 max_latency_ms=X`
    pub fn line(&self, scenario: &str, lost: usize, orphaned: usize, leaked: usize) -> String {
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        format!(
            "CHAOS {scenario}: sent={} during_fault={} statuses={{{}}} lost={lost} orphaned={orphaned} leaked={leaked} max_latency_ms={}",
            self.sent,
            self.during_fault,
            statuses.join(","),
            self.max_latency.as_millis()
        )
    }
}

/// Deterministic pseudo-random file bytes.
pub fn payload(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// An HTTP client of the service (or of the balancer), recording into `rec`.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
    pub rec: Arc<Recorder>,
}

/// The client's own deadline: anything longer is recorded as a hang.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

fn transport(e: &reqwest::Error) -> Outcome {
    if e.is_timeout() {
        Outcome::Timeout
    } else {
        Outcome::Transport
    }
}

async fn http_outcome(resp: reqwest::Response) -> (Outcome, Result<Vec<u8>, reqwest::Error>) {
    let status = resp.status().as_u16();
    let retry_after = resp.headers().contains_key(RETRY_AFTER);
    let body = resp.bytes().await.map(|b| b.to_vec());
    let code = body
        .as_ref()
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        .and_then(|v| v["code"].as_str().map(str::to_string));
    (
        Outcome::Http {
            status,
            retry_after,
            code,
        },
        body,
    )
}

fn text(body: &Result<Vec<u8>, reqwest::Error>) -> String {
    match body {
        Ok(b) => String::from_utf8_lossy(&b[..b.len().min(300)]).to_string(),
        Err(e) => format!("body error: {e}"),
    }
}

impl Api {
    pub fn new(base: &str, rec: &Arc<Recorder>) -> Api {
        Api {
            base: base.to_string(),
            http: reqwest::Client::builder()
                .timeout(CLIENT_TIMEOUT)
                // The service closes a connection idle for HEADER_READ_TIMEOUT (10 s); a
                // client reusing one at that moment loses its request to the close (seen
                // once: an upload's body write met EPIPE 10 s after the connection's last
                // use). A client drops idle connections sooner, as README advises.
                .pool_idle_timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
            rec: rec.clone(),
        }
    }

    /// The same client recording into a recorder of its own: the checks after a scenario
    /// do not count as its load.
    pub fn verifier(&self) -> Api {
        Api {
            base: self.base.clone(),
            http: self.http.clone(),
            rec: self.rec.sibling(),
        }
    }

    /// A new poll workspace, as a laptop registers (not recorded: set-up, not load).
    pub async fn register(&self) -> (Uuid, String) {
        let ws = Uuid::new_v4();
        let resp = self
            .http
            .post(format!("{}/registry/register", self.base))
            .json(&json!({"id": ws, "delivery_mode": "poll"}))
            .send()
            .await
            .expect("register");
        assert_eq!(resp.status(), StatusCode::OK, "register");
        let v: Value = resp.json().await.unwrap();
        (ws, v["auth_token"].as_str().expect("a token").to_string())
    }

    /// One upload of `files` (name, bytes); on 200 each file is recorded as accepted.
    pub async fn upload(
        &self,
        ws: Uuid,
        token: &str,
        files: &[(String, Vec<u8>)],
    ) -> (Outcome, Vec<Accepted>) {
        self.upload_as("upload", ws, token, files).await
    }

    /// `upload`, recorded under operation `op`.
    pub async fn upload_as(
        &self,
        op: &'static str,
        ws: Uuid,
        token: &str,
        files: &[(String, Vec<u8>)],
    ) -> (Outcome, Vec<Accepted>) {
        let mut form = multipart::Form::new();
        for (name, bytes) in files {
            let part = multipart::Part::bytes(bytes.clone())
                .file_name(name.clone())
                .mime_str("application/octet-stream")
                .unwrap();
            form = form.part("files", part);
        }
        let started = Instant::now();
        let resp = self
            .http
            .post(format!("{}/workspaces/{ws}/chat/uploads", self.base))
            .bearer_auth(token)
            .multipart(form)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => return (self.no_answer(op, started, &e), Vec::new()),
        };
        let (outcome, body) = http_outcome(resp).await;
        let mut accepted = Vec::new();
        if outcome.is_ok() {
            let v: Value = serde_json::from_slice(body.as_ref().unwrap()).unwrap();
            let entries = v["files"].as_array().expect("files in a 200");
            assert_eq!(entries.len(), files.len(), "one entry per file: {v}");
            for (entry, (name, bytes)) in entries.iter().zip(files) {
                let uri = entry["uri"].as_str().unwrap();
                accepted.push(Accepted {
                    ws,
                    token: token.to_string(),
                    file_id: uri.rsplit('/').next().unwrap().parse().unwrap(),
                    name: name.clone(),
                    size: bytes.len(),
                    sha256: sha256(bytes),
                });
            }
            self.rec
                .accepted
                .lock()
                .unwrap()
                .extend(accepted.iter().cloned());
        }
        self.rec.record(op, started, outcome.clone(), text(&body));
        (outcome, accepted)
    }

    /// Downloads a file and compares it with what was uploaded.
    pub async fn download(&self, a: &Accepted) -> Outcome {
        self.download_as("download", a).await
    }

    pub async fn download_as(&self, op: &'static str, a: &Accepted) -> Outcome {
        let started = Instant::now();
        let resp = self
            .http
            .get(self.file_url(a, "content"))
            .bearer_auth(&a.token)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => return self.no_answer(op, started, &e),
        };
        let status = resp.status();
        let (mut outcome, body) = http_outcome(resp).await;
        let mut detail = text(&body);
        if status == StatusCode::OK {
            detail = format!("{} ({} bytes)", a.name, a.size);
            match &body {
                Err(e) if e.is_timeout() => outcome = Outcome::Timeout,
                Err(e) => {
                    detail = format!("{}: body cut: {e:?}", a.name);
                    outcome = Outcome::Cut;
                }
                Ok(bytes) if bytes.len() != a.size || sha256(bytes) != a.sha256 => {
                    detail = format!(
                        "{} bytes, expected {} ({}): digest mismatch",
                        bytes.len(),
                        a.size,
                        a.name
                    );
                    outcome = Outcome::Corrupt;
                }
                Ok(_) => {}
            }
        }
        self.rec.record(op, started, outcome.clone(), detail);
        outcome
    }

    /// One page of the feed after `since` (or the newest `limit` rows).
    pub async fn activity(
        &self,
        ws: Uuid,
        token: &str,
        since: Option<Uuid>,
        limit: usize,
    ) -> (Outcome, Vec<Value>) {
        let mut url = format!(
            "{}/workspaces/{ws}/activity?type=a2a_receive&limit={limit}",
            self.base
        );
        if let Some(id) = since {
            url.push_str(&format!("&since_id={id}"));
        }
        let started = Instant::now();
        let resp = match self.http.get(url).bearer_auth(token).send().await {
            Ok(r) => r,
            Err(e) => return (self.no_answer("activity", started, &e), Vec::new()),
        };
        let (outcome, body) = http_outcome(resp).await;
        let rows = if outcome.is_ok() {
            serde_json::from_slice::<Vec<Value>>(body.as_ref().unwrap()).expect("activity rows")
        } else {
            Vec::new()
        };
        self.rec
            .record("activity", started, outcome.clone(), text(&body));
        (outcome, rows)
    }

    pub async fn ack(&self, a: &Accepted) -> Outcome {
        let started = Instant::now();
        let resp = self
            .http
            .post(self.file_url(a, "ack"))
            .bearer_auth(&a.token)
            .send()
            .await;
        self.record_answer("ack", started, resp).await
    }

    /// `/readyz`, recorded as op `readyz`.
    pub async fn readyz(&self) -> Outcome {
        let started = Instant::now();
        let resp = self.http.get(format!("{}/readyz", self.base)).send().await;
        self.record_answer("readyz", started, resp).await
    }

    /// `<base>/workspaces/<ws>/pending-uploads/<file_id>/<action>` of an accepted file.
    fn file_url(&self, a: &Accepted, action: &str) -> String {
        format!(
            "{}/workspaces/{}/pending-uploads/{}/{action}",
            self.base, a.ws, a.file_id
        )
    }

    /// Records a request `op` that got no HTTP answer; its outcome.
    fn no_answer(&self, op: &'static str, started: Instant, e: &reqwest::Error) -> Outcome {
        self.rec.record(op, started, transport(e), format!("{e:?}"));
        transport(e)
    }

    /// Reads the answer to a request `op` (its body is only a failure's detail), records it;
    /// its outcome.
    async fn record_answer(
        &self,
        op: &'static str,
        started: Instant,
        resp: reqwest::Result<reqwest::Response>,
    ) -> Outcome {
        let resp = match resp {
            Ok(r) => r,
            Err(e) => return self.no_answer(op, started, &e),
        };
        let (outcome, body) = http_outcome(resp).await;
        self.rec.record(op, started, outcome.clone(), text(&body));
        outcome
    }
}

/// How a worker treats a failed request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    Never,
    /// One more attempt after a transport error, 502 or 503 (a client of a balancer).
    Once,
}

fn retryable(o: &Outcome) -> bool {
    matches!(
        o,
        Outcome::Transport
            | Outcome::Cut
            | Outcome::Http {
                status: 502 | 503,
                ..
            }
    )
}

/// A normal client of one workspace: upload 1-2 files, poll the feed with its cursor,
/// download (and verify) a file it uploaded, ack some. One request at a time, so it never
/// runs into the per-workspace upload slots.
pub struct Worker {
    pub api: Api,
    pub ws: Uuid,
    pub token: String,
    pub seed: u64,
    /// File sizes are drawn from this range.
    pub sizes: std::ops::Range<usize>,
    /// Files per upload request are drawn from this range.
    pub files: std::ops::RangeInclusive<usize>,
    pub retry: Retry,
    /// Ack every n-th verified download (0: never).
    pub ack_every: usize,
    /// Activity page size.
    pub page: usize,
}

/// What a worker saw of its own feed.
#[derive(Debug, Default, Clone)]
pub struct FeedLog {
    pub ws: Uuid,
    pub token: String,
    pub cursor: Option<Uuid>,
    /// file_ids in the order the feed returned them.
    pub seen: Vec<Uuid>,
    pub acked: Vec<Uuid>,
}

impl Worker {
    async fn with_retry<F, Fut, T>(&self, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = (Outcome, T)>,
    {
        let (o, t) = f().await;
        if self.retry == Retry::Once && retryable(&o) {
            self.api.rec.retried.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (again, t) = f().await;
            if !again.is_ok() {
                self.api.rec.retry_failed.lock().unwrap().push(format!(
                    "ws {}: {} then, retried, {}",
                    self.ws,
                    o.key(),
                    again.key()
                ));
            }
            return t;
        }
        t
    }

    /// Pages the feed from the cursor to its end. Without a cursor yet, the feed answers its
    /// newest rows (newest first): the first read takes them all (at most 500, far more than a
    /// scenario writes to one workspace) and pages forward from the newest.
    pub async fn catch_up(&self, log: &mut FeedLog) {
        loop {
            let limit = if log.cursor.is_none() { 500 } else { self.page };
            let mut rows = self
                .with_retry(|| self.api.activity(self.ws, &self.token, log.cursor, limit))
                .await;
            if log.cursor.is_none() {
                assert!(
                    rows.len() < 500,
                    "a workspace with 500 feed rows: page it from a cursor"
                );
                rows.reverse();
            }
            if rows.is_empty() {
                return;
            }
            for row in &rows {
                if let Some(id) = row["request_body"]["file_id"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                {
                    log.seen.push(id);
                }
            }
            log.cursor = rows
                .last()
                .and_then(|r| r["id"].as_str())
                .and_then(|s| s.parse().ok());
            if rows.len() < limit {
                return;
            }
        }
    }

    pub async fn run(self, stop: Arc<AtomicBool>, cursor: Option<Uuid>) -> FeedLog {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut log = FeedLog {
            ws: self.ws,
            token: self.token.clone(),
            cursor,
            ..FeedLog::default()
        };
        let mut mine: Vec<Accepted> = Vec::new();
        let mut verified = 0usize;
        let mut round = 0u64;
        while !stop.load(Ordering::Relaxed) {
            round += 1;
            let n = rng.gen_range(self.files.clone());
            let files: Vec<(String, Vec<u8>)> = (0..n)
                .map(|i| {
                    let len = rng.gen_range(self.sizes.clone());
                    (
                        format!("w{}-r{round}-f{i}of{n}.bin", self.seed),
                        payload(&mut rng, len),
                    )
                })
                .collect();
            let accepted = self
                .with_retry(|| self.api.upload(self.ws, &self.token, &files))
                .await;
            mine.extend(accepted);
            if round % 2 == 0 && self.page > 0 {
                self.catch_up(&mut log).await;
            }
            if let Some(a) = (!mine.is_empty())
                .then(|| mine[rng.gen_range(0..mine.len())].clone())
                .filter(|a| !log.acked.contains(&a.file_id))
            {
                self.with_retry(|| async { (self.api.download(&a).await, ()) })
                    .await;
                verified += 1;
                if self.ack_every > 0 && verified % self.ack_every == 0 {
                    let o = self
                        .with_retry(|| async {
                            let o = self.api.ack(&a).await;
                            (o.clone(), o)
                        })
                        .await;
                    if o.is_ok() {
                        log.acked.push(a.file_id);
                    }
                }
            }
        }
        log
    }
}

/// Normal clients, one per workspace, running until stopped.
pub struct Fleet {
    stop: Arc<AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<FeedLog>>,
}

impl Fleet {
    /// Registers `n` workspaces on `api` and starts `make(i, ws, token)` on each.
    pub async fn start<F>(api: &Api, n: usize, make: F) -> Fleet
    where
        F: Fn(usize, Uuid, String) -> Worker,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for i in 0..n {
            let (ws, token) = api.register().await;
            let worker = make(i, ws, token);
            handles.push(tokio::spawn(worker.run(stop.clone(), None)));
        }
        Fleet { stop, handles }
    }

    /// Stops every worker after its current request; what each saw of its feed.
    pub async fn stop(self) -> Vec<FeedLog> {
        self.stop.store(true, Ordering::Relaxed);
        let mut logs = Vec::new();
        for h in self.handles {
            logs.push(h.await.expect("a worker panicked"));
        }
        logs
    }
}

/// Polls `/readyz` every 200 ms (recorded as `readyz` in the api's recorder) until stopped.
pub fn probe_readyz(api: Api, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            api.readyz().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}
