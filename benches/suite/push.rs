//! `push`: upload MB/s relayed through the service to a push workspace, next to the same
//! multipart POSTs sent straight to that workspace (the ceiling: the bench's own client and
//! the same receiver, minus the service's hop), interleaved, at each size × concurrency of the
//! throughput suite, with the CPU per MiB and the service's peak RSS.
//!
//! The workspace is a receiver in this process, on a runtime of its own: it reads every body
//! to its end and answers with the byte count, which the client checks (relayed back by the
//! service). The service reaches it on loopback through `PUSH_ALLOWED_NETWORKS=127.0.0.0/8`.
//! Where HAProxy is installed, the same requests also go through it to the same receiver: what
//! one hop through a mature proxy (HTTP mode, its defaults) costs on this machine.

use axum::{body::Body, http::StatusCode, Json};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::harness::{
    drop_db, fresh_db, http_client, human, in_lanes, lane_http, machine_cpu_ms, mb_per_s, median,
    payload, Env, Service, Spec, ADMIN,
};

pub struct Opts {
    pub sizes: Vec<usize>,
    pub concurrency: Vec<usize>,
    pub rounds: usize,
    /// Files per cell for a size and concurrency (the throughput suite's rule).
    pub files_for: Box<dyn Fn(usize, usize) -> usize>,
}

/// One phase's figures: MB/s, machine CPU ms per MiB, service CPU ms per MiB.
#[derive(Clone, Copy, Default)]
struct Phase {
    rate: f64,
    machine: f64,
    service: f64,
}

struct Row {
    size: usize,
    conc: usize,
    files: usize,
    service: Phase,
    direct: Phase,
    haproxy: Option<Phase>,
    ratios: (f64, f64),
    rss: f64,
}

pub async fn run(env: &Env, o: &Opts) {
    let receiver = Receiver::start();
    let db = fresh_db(&env.server).await;
    let svc = Service::start(
        env,
        Spec {
            bin: &env.bin,
            db: &db,
            backend: "bytea",
            prefix: "bench-push/",
            extra: &[("PUSH_ALLOWED_NETWORKS", "127.0.0.0/8")],
        },
    )
    .await;
    let ws = push_workspace(&svc.base, &receiver.base).await;
    let haproxy = Haproxy::start(&receiver.base);
    if haproxy.is_none() {
        eprintln!("push: no haproxy (apt-get install haproxy): its column stays empty");
    }
    let through = format!("{}/workspaces/{ws}/chat/uploads", svc.base);
    let straight = format!("{}/internal/chat/uploads/ingest", receiver.base);
    let mut rows = Vec::new();
    for &size in &o.sizes {
        let data = payload(size);
        for &conc in &o.concurrency {
            let files = (o.files_for)(size, conc);
            let (mut service, mut direct, mut proxied, mut rss) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..o.rounds.max(1) {
                svc.reset_peak();
                let before = svc.cpu_ms();
                let mut p = send_all(&svc.base, &through, &data, files, conc).await;
                p.service = (svc.cpu_ms() - before) / mib(size * files);
                rss.push(svc.peak_rss_mib());
                service.push(p);
                direct.push(send_all(&receiver.base, &straight, &data, files, conc).await);
                if let Some(h) = &haproxy {
                    let url = format!("{}/internal/chat/uploads/ingest", h.base);
                    proxied.push(send_all(&h.base, &url, &data, files, conc).await);
                }
            }
            let ratios = service
                .iter()
                .zip(&direct)
                .map(|(s, d)| s.rate / d.rate)
                .fold((f64::INFINITY, 0.0f64), |(lo, hi), r| {
                    (lo.min(r), hi.max(r))
                });
            let row = Row {
                size,
                conc,
                files,
                service: medians(&service),
                direct: medians(&direct),
                haproxy: (!proxied.is_empty()).then(|| medians(&proxied)),
                ratios,
                rss: median(rss),
            };
            eprintln!(
                "push {} c{conc} x{files}: {:.1} / {:.1} MB/s",
                human(size),
                row.service.rate,
                row.direct.rate
            );
            rows.push(row);
        }
    }
    drop(haproxy);
    drop(svc);
    drop_db(&env.server, &db).await;
    print(o.rounds, &rows);
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn medians(v: &[Phase]) -> Phase {
    let of = |f: fn(&Phase) -> f64| median(v.iter().map(f).collect());
    Phase {
        rate: of(|p| p.rate),
        machine: of(|p| p.machine),
        service: of(|p| p.service),
    }
}

/// A push workspace (registered by the admin, as the platform does) whose URL is `receiver`.
async fn push_workspace(base: &str, receiver: &str) -> String {
    let resp = http_client()
        .post(format!("{base}/workspaces"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "bench-push", "delivery_mode": "push", "url": receiver}))
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "push workspace: {}",
        resp.status()
    );
    let ws: Value = resp.json().await.unwrap();
    ws["id"].as_str().unwrap().to_string()
}

/// `files` multipart uploads of `data` to `url`, `conc` at a time, each lane on a connection
/// of its own to `base` opened before the clock; every answer must count the body whole.
async fn send_all(base: &str, url: &str, data: &Bytes, files: usize, conc: usize) -> Phase {
    let cpu = machine_cpu_ms();
    let lanes = in_lanes(
        files,
        conc,
        || lane_http(base),
        |http, i| async move { send(&http, url, data, i).await },
    )
    .await;
    let machine = machine_cpu_ms() - cpu;
    let body: u64 = lanes.out.iter().sum();
    assert!(
        body >= (data.len() * files) as u64,
        "the receiver counted {body} bytes of {files} files"
    );
    let total = data.len() * files;
    Phase {
        rate: mb_per_s(total, lanes.secs),
        machine: machine / mib(total),
        service: f64::NAN,
    }
}

/// One upload as the canvas sends it; returns the body length the receiver counted.
async fn send(http: &reqwest::Client, url: &str, data: &Bytes, i: usize) -> u64 {
    let part = reqwest::multipart::Part::stream_with_length(
        reqwest::Body::from(data.clone()),
        data.len() as u64,
    )
    .file_name(format!("f{i}.bin"))
    .mime_str("application/octet-stream")
    .unwrap();
    let resp = http
        .post(url)
        .bearer_auth(ADMIN)
        .multipart(reqwest::multipart::Form::new().part("files", part))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK, "push upload");
    let answer: Value = resp.json().await.unwrap();
    answer["received"].as_u64().expect("the receiver's count")
}

/// The push workspace: an HTTP server on its own runtime (every core) that reads each
/// request's body to its end and answers `{"received": <bytes>}`.
struct Receiver {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let app = axum::Router::new().fallback(receive);
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Receiver {
            base,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// HAProxy in HTTP mode with its defaults, in front of the receiver; killed when dropped.
struct Haproxy {
    child: std::process::Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(receiver: &str) -> Option<Haproxy> {
        let bin = crate::harness::which("haproxy")
            .or_else(|| Some("/usr/sbin/haproxy".to_string()))
            .filter(|b| std::path::Path::new(b).exists())?;
        let dir = tempfile::tempdir().ok()?;
        let port = crate::harness::free_port();
        let server = receiver.trim_start_matches("http://");
        let config = format!(
            "defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend in\n  bind 127.0.0.1:{port}\n  default_backend out\n\
             backend out\n  server receiver {server}\n"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).ok()?;
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        crate::harness::die_with_the_bench(&mut cmd);
        let child = cmd.spawn().ok()?;
        let mut h = Haproxy {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(h);
            }
            if let Ok(Some(_)) = h.child.try_wait() {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = h.child.kill();
        None
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn receive(body: Body) -> (StatusCode, Json<Value>) {
    let mut stream = body.into_data_stream();
    let mut received = 0usize;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => received += bytes.len(),
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": e.to_string()})),
                )
            }
        }
    }
    (StatusCode::OK, Json(json!({"received": received})))
}

fn print(rounds: usize, rows: &[Row]) {
    println!(
        "\nPush relay: multipart uploads through the service to a push workspace vs the same requests straight to it (the bench's client, the same receiver; {}):\n",
        if rounds > 1 {
            format!("median of {rounds} interleaved rounds; ratio with each round's lowest–highest")
        } else {
            "service and direct interleaved".to_string()
        }
    );
    println!("| size | conc | files | MB/s through the service | MB/s straight to the workspace | ratio | MB/s through HAProxy (ratio) | CPU ms/MiB, machine: service / direct / HAProxy | CPU ms/MiB, service process | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let ratio = r.service.rate / r.direct.rate;
        let ratio = match rounds > 1 {
            true => format!("{ratio:.2} ({:.2}–{:.2})", r.ratios.0, r.ratios.1),
            false => format!("{ratio:.2}"),
        };
        let (proxied, proxied_cpu) = match r.haproxy {
            Some(h) => (
                format!("{:.1} ({:.2})", h.rate, h.rate / r.direct.rate),
                format!("{:.2}", h.machine),
            ),
            None => ("-".to_string(), "-".to_string()),
        };
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {} | {} | {:.2} / {:.2} / {} | {:.2} | {:.0} |",
            human(r.size),
            r.conc,
            r.files,
            r.service.rate,
            r.direct.rate,
            ratio,
            proxied,
            r.service.machine,
            r.direct.machine,
            proxied_cpu,
            r.service.service,
            r.rss
        );
    }
}
