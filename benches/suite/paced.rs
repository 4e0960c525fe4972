//! An open-loop load generator with even pacing (wrk2-style). Request `i` is due at
//! `t0 + i / rate`; a pacing thread (std sleep, not the 1 ms tokio timer) hands it to the
//! runtime at that instant, where it goes out on an idle keep-alive connection (a new one when
//! none is idle). Its latency counts from when it was *due*, so a stall in the service shows
//! in every request scheduled behind it (no coordinated omission), and the load never
//! arrives in bursts the way hey's synchronised workers send it.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{mpsc, Semaphore},
};

/// Connections the generator may open at most; past that a due request waits for one (and
/// the wait counts in its latency).
const MAX_CONNECTIONS: usize = 512;

pub struct Outcome {
    /// Latency of every answered request in ms (due → last byte), sorted.
    pub ms: Vec<f64>,
    /// Answers that were not 2xx, and requests that got no answer.
    pub failed: usize,
    pub sent: usize,
    pub seconds: f64,
    pub connections: usize,
    /// Share of the machine's CPU time taken by the hypervisor during the run (/proc/stat
    /// `steal`), in %: a vCPU that is not running stalls every request on it.
    pub steal_pct: f64,
    /// Share of the machine's CPU time spent working (service, PostgreSQL and this generator
    /// together), in %: near 100 any hiccup queues every request behind it.
    pub busy_pct: f64,
}

/// Offers `rate` requests per second of `request` (a whole HTTP/1.1 request) to `addr` for
/// `seconds`.
pub async fn run(addr: &str, request: &str, rate: u64, seconds: f64) -> Outcome {
    let total = (rate as f64 * seconds).round() as u64;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let shared = Arc::new(Shared {
        addr: addr.to_string(),
        request: request.as_bytes().into(),
        idle: Mutex::new(Vec::new()),
        slots: Semaphore::new(MAX_CONNECTIONS),
        opened: Mutex::new(0),
    });
    let (tx, mut rx) = mpsc::unbounded_channel::<Option<f64>>();
    let runtime = tokio::runtime::Handle::current();
    let cpu_before = cpu_times();
    let pacer = {
        let shared = shared.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now() + Duration::from_millis(10);
            for i in 0..total {
                let due = t0 + period * i as u32;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                runtime.spawn(one(shared.clone(), due, tx.clone()));
            }
            t0
        })
    };
    let mut ms = Vec::with_capacity(total as usize);
    let mut failed = 0;
    while let Some(answer) = rx.recv().await {
        match answer {
            Some(latency) => ms.push(latency),
            None => failed += 1,
        }
    }
    let t0 = pacer.join().expect("the pacing thread");
    ms.sort_by(f64::total_cmp);
    let connections = *shared.opened.lock().unwrap();
    let (steal_pct, busy_pct) = match (cpu_before, cpu_times()) {
        (Some(before), Some(after)) if after.all > before.all => {
            let pct = |a: u64, b: u64| (a - b) as f64 * 100.0 / (after.all - before.all) as f64;
            (pct(after.steal, before.steal), pct(after.busy, before.busy))
        }
        _ => (f64::NAN, f64::NAN),
    };
    Outcome {
        ms,
        failed,
        sent: total as usize,
        seconds: t0.elapsed().as_secs_f64(),
        connections,
        steal_pct,
        busy_pct,
    }
}

/// Ticks of all CPUs so far (/proc/stat).
struct CpuTicks {
    /// user, nice, system, irq, softirq
    busy: u64,
    steal: u64,
    all: u64,
}

fn cpu_times() -> Option<CpuTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = ticks.get(..3)?.iter().sum::<u64>() + ticks.get(5..7)?.iter().sum::<u64>();
    Some(CpuTicks {
        busy,
        steal: *ticks.get(7)?,
        all: ticks.iter().take(8).sum(),
    })
}

struct Shared {
    addr: String,
    request: Box<[u8]>,
    idle: Mutex<Vec<TcpStream>>,
    slots: Semaphore,
    opened: Mutex<usize>,
}

/// Sends one request and reports its latency from `due` (None: no 2xx answer).
async fn one(shared: Arc<Shared>, due: Instant, tx: mpsc::UnboundedSender<Option<f64>>) {
    let Ok(_slot) = shared.slots.acquire().await else {
        return;
    };
    let idle = shared.idle.lock().unwrap().pop();
    let mut conn = match idle {
        Some(c) => c,
        None => match TcpStream::connect(&shared.addr).await {
            Ok(c) => {
                let _ = c.set_nodelay(true);
                *shared.opened.lock().unwrap() += 1;
                c
            }
            Err(_) => {
                let _ = tx.send(None);
                return;
            }
        },
    };
    let answer = exchange(&mut conn, &shared.request).await;
    let latency = due.elapsed().as_secs_f64() * 1000.0;
    match answer {
        Some((ok, keep)) => {
            if keep {
                shared.idle.lock().unwrap().push(conn);
            }
            let _ = tx.send(ok.then_some(latency));
        }
        None => {
            let _ = tx.send(None);
        }
    }
}

/// Writes the request and reads the whole answer: (2xx, connection reusable).
async fn exchange(conn: &mut TcpStream, request: &[u8]) -> Option<(bool, bool)> {
    conn.write_all(request).await.ok()?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(head) = crate::harness::whole_response(&buf) {
            return Some((head.status / 100 == 2, !head.close));
        }
    }
}
