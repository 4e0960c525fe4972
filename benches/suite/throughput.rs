//! `throughput`: upload and download MB/s through the service (multipart POST as the canvas
//! sends it; GET content read fully) next to the direct ceiling measured in the same run,
//! interleaved (service upload, direct upload, service download, direct download), per
//! backend × size × concurrency, with the service's peak RSS per direction. With
//! `--reference-bin`, that binary's service (a database of its own) moves the same files in
//! every round too, next to this one's, and a table compares the two: a change's before and
//! after in one run, against the same ceilings.

use crate::{
    direct::{self, Chosen, Dir, Target},
    harness::{
        download, drop_db, fresh_db, http_client, human, in_lanes, lane_http, mb_per_s, median,
        payload, settle, sweep_all, upload_nth, workspaces, Env, Lanes, Service, Spec,
    },
};

/// How the direct clients are picked.
#[derive(Clone, Debug)]
pub enum DirectMode {
    /// Calibrate every candidate on the calibration cells, then use the fastest.
    Auto,
    /// Run every candidate in every cell and report the best (slower; the strictest ceiling).
    All,
    /// These clients only (names as in the calibration table, or direct.py's client names).
    Named(Vec<String>),
}

pub struct Opts {
    pub backends: Vec<String>,
    pub sizes: Vec<usize>,
    pub concurrency: Vec<usize>,
    /// Bytes a cell aims to move per direction (files = this / size, at least one per lane,
    /// rounded up to a multiple of the concurrency).
    pub cell_bytes: usize,
    /// A fixed number of files per cell instead (smoke tests).
    pub files: Option<usize>,
    pub rounds: usize,
    pub workspaces: usize,
    pub direct: DirectMode,
    pub calibrate: Vec<(usize, usize)>,
    pub calibrate_rounds: usize,
}

impl Opts {
    pub fn files_for(&self, size: usize, conc: usize) -> usize {
        Self::files_rule(self.cell_bytes, self.files)(size, conc)
    }

    /// Files per cell of `size` at `conc`: `files` if given, else `cell_bytes` worth, at least
    /// one per lane, rounded up to a multiple of the concurrency.
    pub fn files_rule(cell_bytes: usize, files: Option<usize>) -> impl Fn(usize, usize) -> usize {
        move |size, conc| {
            if let Some(n) = files {
                return n.max(1);
            }
            let n = cell_bytes.div_ceil(size).max(conc);
            n.div_ceil(conc) * conc
        }
    }
}

struct Row {
    backend: String,
    size: usize,
    conc: usize,
    files: usize,
    /// Through the service.
    this: Figures,
    up_direct: (f64, &'static str),
    down_direct: (f64, &'static str),
    /// Each round's service / direct ratio (lowest, highest): how far one round strays.
    up_ratios: (f64, f64),
    down_ratios: (f64, f64),
    /// The direct client's CPU ms per MiB moved (medians).
    up_direct_cpu: f64,
    down_direct_cpu: f64,
    reference: Option<Reference>,
}

/// A service's figures in a cell (medians): MB/s, CPU per MiB and peak RSS each way.
struct Figures {
    up: f64,
    down: f64,
    up_cpu: Cpu,
    down_cpu: Cpu,
    rss_up: f64,
    rss_down: f64,
}

/// The reference binary's figures in a cell, and each round's this / reference ratio
/// (lowest, highest).
struct Reference {
    figures: Figures,
    up_ratios: (f64, f64),
    down_ratios: (f64, f64),
}

/// CPU time per MiB moved through the service, in ms: the whole machine's (the bench's HTTP
/// client, the service, PostgreSQL or LocalStack, the kernel), and the service process's.
#[derive(Clone, Copy, Default)]
struct Cpu {
    machine: f64,
    service: f64,
}

/// `lanes`' results and seconds, with the CPU they took per MiB of `bytes`: the machine's
/// over the clocked window, the service process's over the whole (its lanes' set-up costs it
/// one /healthz each).
async fn with_cpu<T>(
    svc: &Service,
    bytes: usize,
    lanes: impl std::future::Future<Output = Lanes<T>>,
) -> ((Vec<T>, f64), Cpu) {
    let service = svc.cpu_ms();
    let lanes = lanes.await;
    let mib = bytes as f64 / (1 << 20) as f64;
    let cpu = Cpu {
        machine: lanes.machine_cpu_ms / mib,
        service: (svc.cpu_ms() - service) / mib,
    };
    ((lanes.out, lanes.secs), cpu)
}

pub async fn run(env: &Env, o: &Opts) {
    let mut rows = Vec::new();
    let mut used = Vec::new();
    for backend in &o.backends {
        let this = Instance::start(env, &env.bin, backend).await;
        let target = Target {
            backend: backend.clone(),
            db: this.db.clone(),
            key_prefix: format!("{}direct/", this.prefix),
        };
        let chosen = match &o.direct {
            DirectMode::Auto => {
                let (chosen, trials) =
                    direct::calibrate(env, &target, &o.calibrate, o.calibrate_rounds, |s, c| {
                        o.files_for(s, c)
                    })
                    .await;
                direct::print_calibration(
                    backend,
                    &o.calibrate,
                    o.calibrate_rounds,
                    &trials,
                    &chosen,
                );
                chosen
            }
            DirectMode::All => Chosen {
                up: direct::candidates(env, backend, Dir::Up),
                down: direct::candidates(env, backend, Dir::Down),
            },
            DirectMode::Named(names) => Chosen {
                up: direct::by_name(env, backend, Dir::Up, names),
                down: direct::by_name(env, backend, Dir::Down, names),
            },
        };
        assert!(
            !chosen.up.is_empty() && !chosen.down.is_empty(),
            "no direct client for {backend} matches --direct"
        );
        used.push((backend.clone(), chosen_names(&chosen)));
        // The reference's own database: an older binary refuses one with migrations it
        // does not know.
        let reference = match &env.reference_bin {
            Some(bin) => Some(Instance::start(env, bin, backend).await),
            None => None,
        };
        for &size in &o.sizes {
            let data = payload(size);
            for &conc in &o.concurrency {
                let files = o.files_for(size, conc);
                let through = this.through(o.workspaces).await;
                let other = match &reference {
                    Some(r) => Some(r.through(o.workspaces).await),
                    None => None,
                };
                let mut m = Measured::default();
                for round in 0..o.rounds.max(1) {
                    let cell = Cell {
                        data: &data,
                        files,
                        conc,
                    };
                    m.round(
                        env,
                        &target,
                        &chosen,
                        (&through, other.as_ref()),
                        round,
                        cell,
                    )
                    .await;
                    this.sweep(env, backend).await;
                    if let Some(r) = &reference {
                        r.sweep(env, backend).await;
                    }
                    target.cleanup(env, files).await;
                }
                let row = m.row(backend, size, conc, files);
                eprintln!(
                    "throughput {backend} {} c{conc} x{files}: up {:.1} / {:.1} MB/s, down {:.1} / {:.1} MB/s, RSS {:.0} / {:.0} MiB",
                    human(size),
                    row.this.up,
                    row.up_direct.0,
                    row.this.down,
                    row.down_direct.0,
                    row.this.rss_up,
                    row.this.rss_down
                );
                rows.push(row);
            }
        }
        this.stop(env).await;
        if let Some(r) = reference {
            r.stop(env).await;
        }
    }
    print(o, &rows, &used);
}

/// A binary's service for one backend, on a database and under a key prefix of its own.
struct Instance {
    svc: Service,
    bin: String,
    db: String,
    prefix: String,
}

impl Instance {
    async fn start(env: &Env, bin: &str, backend: &str) -> Instance {
        let db = fresh_db(&env.server).await;
        let prefix = format!("bench-{}/", uuid::Uuid::new_v4().simple());
        let spec = Spec {
            bin,
            db: &db,
            backend,
            prefix: &prefix,
            extra: &[],
        };
        let svc = Service::start(env, spec).await;
        Instance {
            svc,
            bin: bin.to_string(),
            db,
            prefix,
        }
    }

    /// `workspaces` new workspaces of this service, for a cell's files.
    async fn through(&self, workspaces_n: usize) -> Through<'_> {
        Through {
            svc: &self.svc,
            db: &self.db,
            wss: workspaces(&http_client(), &self.svc.base, workspaces_n.max(1)).await,
        }
    }

    /// Every row expired and swept, with the objects of S3 rows (between rounds).
    async fn sweep(&self, env: &Env, backend: &str) {
        sweep_all(env, &self.bin, &self.db, backend, &self.prefix).await;
    }

    async fn stop(self, env: &Env) {
        drop(self.svc);
        drop_db(&env.server, &self.db).await;
    }
}

/// A service a cell's files go through, its database and its workspaces.
struct Through<'a> {
    svc: &'a Service,
    db: &'a str,
    wss: Vec<crate::harness::Ws>,
}

/// What a cell moves: `files` copies of `data` at concurrency `conc`.
#[derive(Clone, Copy)]
struct Cell<'a> {
    data: &'a bytes::Bytes,
    files: usize,
    conc: usize,
}

impl Through<'_> {
    /// Uploads the cell's files (after a `VACUUM` and a `CHECKPOINT`): their ids, MB/s, CPU
    /// and the service's peak RSS.
    async fn upload(&self, cell: Cell<'_>) -> (Vec<(usize, String)>, f64, Cpu, f64) {
        let total = cell.data.len() * cell.files;
        let (base, wss, data) = (self.svc.base.as_str(), &self.wss, cell.data);
        settle(self.db).await;
        self.svc.reset_peak();
        let upload = in_lanes(
            cell.files,
            cell.conc,
            || lane_http(base),
            |http, i| async move { upload_nth(&http, base, wss, data, i).await },
        );
        let ((ids, secs), cpu) = with_cpu(self.svc, total, upload).await;
        (ids, mb_per_s(total, secs), cpu, self.svc.peak_rss_mib())
    }

    /// Downloads `ids` (read fully, every byte counted; after a `VACUUM` and a
    /// `CHECKPOINT`): MB/s, CPU and peak RSS.
    async fn download(&self, ids: &[(usize, String)], cell: Cell<'_>) -> (f64, Cpu, f64) {
        let total = cell.data.len() * cell.files;
        let (base, wss) = (self.svc.base.as_str(), &self.wss);
        settle(self.db).await;
        self.svc.reset_peak();
        let download = in_lanes(
            ids.len(),
            cell.conc,
            || lane_http(base),
            |http, i| async move {
                let (w, id) = &ids[i];
                download(&http, base, &wss[*w], id).await
            },
        );
        let ((lens, secs), cpu) = with_cpu(self.svc, total, download).await;
        let read: usize = lens.iter().sum();
        assert_eq!(read, total, "service download read fewer bytes");
        (mb_per_s(total, secs), cpu, self.svc.peak_rss_mib())
    }
}

fn chosen_names(c: &Chosen) -> String {
    let names = |v: &[direct::Client]| v.iter().map(|c| c.name).collect::<Vec<_>>().join(" / ");
    format!("upload {}; download {}", names(&c.up), names(&c.down))
}

/// One cell's rounds: every figure of every round, medians taken at the end.
#[derive(Default)]
struct Measured {
    this: Samples,
    /// The reference binary's, when there is one.
    reference: Samples,
    up_direct: Vec<(f64, &'static str)>,
    down_direct: Vec<(f64, &'static str)>,
    up_direct_cpu: Vec<f64>,
    down_direct_cpu: Vec<f64>,
}

/// A service's figures of every round of a cell.
#[derive(Default)]
struct Samples {
    up: Vec<f64>,
    down: Vec<f64>,
    up_cpu: Vec<Cpu>,
    down_cpu: Vec<Cpu>,
    rss_up: Vec<f64>,
    rss_down: Vec<f64>,
}

impl Samples {
    /// Uploads the cell's files through `service`, keeping its figures; their ids.
    async fn upload(&mut self, service: &Through<'_>, cell: Cell<'_>) -> Vec<(usize, String)> {
        let (ids, rate, cpu, rss) = service.upload(cell).await;
        self.up.push(rate);
        self.up_cpu.push(cpu);
        self.rss_up.push(rss);
        ids
    }

    /// Downloads `ids` through `service`, keeping its figures.
    async fn download(&mut self, service: &Through<'_>, ids: &[(usize, String)], cell: Cell<'_>) {
        let (rate, cpu, rss) = service.download(ids, cell).await;
        self.down.push(rate);
        self.down_cpu.push(cpu);
        self.rss_down.push(rss);
    }

    fn figures(&self) -> Figures {
        let cpu = |v: &[Cpu]| Cpu {
            machine: median(v.iter().map(|c| c.machine).collect()),
            service: median(v.iter().map(|c| c.service).collect()),
        };
        Figures {
            up: median(self.up.clone()),
            down: median(self.down.clone()),
            up_cpu: cpu(&self.up_cpu),
            down_cpu: cpu(&self.down_cpu),
            rss_up: median(self.rss_up.clone()),
            rss_down: median(self.rss_down.clone()),
        }
    }
}

impl Measured {
    /// One round of a cell: uploads through the service (and the reference, in turn first
    /// and second from round to round), straight to the backend; then downloads the same way.
    async fn round(
        &mut self,
        env: &Env,
        target: &Target,
        chosen: &Chosen,
        (this, reference): (&Through<'_>, Option<&Through<'_>>),
        round: usize,
        cell: Cell<'_>,
    ) {
        let (data, files, conc) = (cell.data, cell.files, cell.conc);
        let total = data.len() * files;
        let reference_first = round % 2 == 1;
        let mut ref_ids = Vec::new();
        if let (Some(r), true) = (reference, reference_first) {
            ref_ids = self.reference.upload(r, cell).await;
        }
        let ids = self.this.upload(this, cell).await;
        if let (Some(r), false) = (reference, reference_first) {
            ref_ids = self.reference.upload(r, cell).await;
        }

        let mut best = Best::NONE;
        let mut written = false;
        for c in &chosen.up {
            target.reset().await;
            settle(&target.db).await;
            let moved = direct::run(env, c, target, Dir::Up, data, files, conc).await;
            written = moved.is_ok();
            best = best.or(c.name, moved, total);
        }
        if !written {
            target.fill(env, data, files, conc).await;
        }
        self.up_direct.push((best.rate, best.name));
        self.up_direct_cpu.push(best.cpu_ms_per_mib);

        if let (Some(r), true) = (reference, reference_first) {
            self.reference.download(r, &ref_ids, cell).await;
        }
        self.this.download(this, &ids, cell).await;
        if let (Some(r), false) = (reference, reference_first) {
            self.reference.download(r, &ref_ids, cell).await;
        }

        let mut best = Best::NONE;
        for c in &chosen.down {
            settle(&target.db).await;
            let moved = direct::run(env, c, target, Dir::Down, data, files, conc).await;
            best = best.or(c.name, moved, total);
        }
        self.down_direct.push((best.rate, best.name));
        self.down_direct_cpu.push(best.cpu_ms_per_mib);
    }

    fn row(self, backend: &str, size: usize, conc: usize, files: usize) -> Row {
        let med_named = |v: Vec<(f64, &'static str)>| {
            let m = median(v.iter().map(|x| x.0).collect());
            let name = v
                .iter()
                .min_by(|a, b| (a.0 - m).abs().total_cmp(&(b.0 - m).abs()))
                .map(|x| x.1)
                .unwrap_or("none");
            (m, name)
        };
        let spread = |service: &[f64], direct: &[(f64, &'static str)]| {
            let ratios = service.iter().zip(direct).map(|(s, d)| s / d.0);
            ratios.fold((f64::INFINITY, 0.0f64), |(lo, hi), r| {
                (lo.min(r), hi.max(r))
            })
        };
        let (this, other) = (&self.this, &self.reference);
        let unnamed = |v: &[f64]| v.iter().map(|&x| (x, "reference")).collect::<Vec<_>>();
        let reference = (!other.up.is_empty()).then(|| Reference {
            figures: other.figures(),
            up_ratios: spread(&this.up, &unnamed(&other.up)),
            down_ratios: spread(&this.down, &unnamed(&other.down)),
        });
        Row {
            up_ratios: spread(&this.up, &self.up_direct),
            down_ratios: spread(&this.down, &self.down_direct),
            this: this.figures(),
            reference,
            up_direct_cpu: median(self.up_direct_cpu),
            down_direct_cpu: median(self.down_direct_cpu),
            backend: backend.into(),
            size,
            conc,
            files,
            up_direct: med_named(self.up_direct),
            down_direct: med_named(self.down_direct),
        }
    }
}

/// The fastest direct client of a cell so far, and the CPU its transfer took.
#[derive(Clone, Copy)]
struct Best {
    rate: f64,
    name: &'static str,
    cpu_ms_per_mib: f64,
}

impl Best {
    const NONE: Best = Best {
        rate: 0.0,
        name: "none",
        cpu_ms_per_mib: f64::NAN,
    };

    /// This or client `name`'s transfer of `bytes`, whichever was faster.
    fn or(self, name: &'static str, moved: Result<direct::Moved, String>, bytes: usize) -> Best {
        match moved {
            Ok(m) if m.mb_per_s > self.rate => Best {
                rate: m.mb_per_s,
                name,
                cpu_ms_per_mib: m.cpu_ms / (bytes as f64 / (1 << 20) as f64),
            },
            Ok(_) => self,
            Err(e) => {
                eprintln!("  direct {name} failed: {e}");
                self
            }
        }
    }
}

fn print(o: &Opts, rows: &[Row], used: &[(String, String)]) {
    let per_cell = !matches!(o.direct, DirectMode::Auto | DirectMode::Named(_))
        || used.iter().any(|(_, n)| n.contains(" / "));
    println!(
        "\nThroughput, service vs direct (same bytes, same concurrency, same run; {}; uploads to {} workspace(s); peak RSS = service VmHWM reset per direction{}):\n",
        if o.rounds > 1 {
            format!(
                "median of {} interleaved rounds; ratios with each round's lowest–highest",
                o.rounds
            )
        } else {
            "service and direct interleaved".to_string()
        },
        o.workspaces.max(1),
        if per_cell { "; direct = the best client in each cell" } else { "" }
    );
    println!("| backend | size | conc | files | upload MB/s service | upload MB/s direct | upload ratio | download MB/s service | download MB/s direct | download ratio | peak RSS MiB up / down |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let ratio = |median: f64, spread: (f64, f64)| ratio(o.rounds, median, spread);
    for r in rows {
        let name = |n: &str| {
            if per_cell {
                format!(" ({n})")
            } else {
                String::new()
            }
        };
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.1}{} | {} | {:.1} | {:.1}{} | {} | {:.0} / {:.0} |",
            r.backend,
            human(r.size),
            r.conc,
            r.files,
            r.this.up,
            r.up_direct.0,
            name(r.up_direct.1),
            ratio(r.this.up / r.up_direct.0, r.up_ratios),
            r.this.down,
            r.down_direct.0,
            name(r.down_direct.1),
            ratio(r.this.down / r.down_direct.0, r.down_ratios),
            r.this.rss_up,
            r.this.rss_down
        );
    }
    println!(
        "\nCPU per MiB moved, ms (medians): the whole machine's busy time over each transfer (`/proc/stat`; the HTTP client, the service, PostgreSQL or LocalStack and the kernel through the service; the client, the backend and the kernel direct, the fastest client's), and the service process's own:\n"
    );
    println!("| backend | size | conc | upload machine: service / direct | upload: service process | download machine: service / direct | download: service process |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.2} / {:.2} | {:.2} | {:.2} / {:.2} | {:.2} |",
            r.backend,
            human(r.size),
            r.conc,
            r.this.up_cpu.machine,
            r.up_direct_cpu,
            r.this.up_cpu.service,
            r.this.down_cpu.machine,
            r.down_direct_cpu,
            r.this.down_cpu.service
        );
    }
    print_reference(o, rows);
    println!();
    for (backend, names) in used {
        println!("Direct clients, {backend}: {names}.");
    }
}

/// This binary against the reference (`--reference-bin`), cell by cell, with the service
/// process's CPU per MiB each way.
fn print_reference(o: &Opts, rows: &[Row]) {
    if rows.iter().all(|r| r.reference.is_none()) {
        return;
    }
    println!(
        "\nThis binary against the reference binary (each with a database of its own; the same files, in turn first and second from round to round; ratio = this / reference{}):\n",
        if o.rounds > 1 { ", with each round's lowest–highest" } else { "" }
    );
    println!("| backend | size | conc | upload MB/s this / reference | upload ratio | download MB/s this / reference | download ratio | service CPU ms/MiB up: this / reference | down: this / reference |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let ratio = |median: f64, spread: (f64, f64)| ratio(o.rounds, median, spread);
    for r in rows {
        let Some(x) = &r.reference else { continue };
        println!(
            "| {} | {} | {} | {:.1} / {:.1} | {} | {:.1} / {:.1} | {} | {:.2} / {:.2} | {:.2} / {:.2} |",
            r.backend,
            human(r.size),
            r.conc,
            r.this.up,
            x.figures.up,
            ratio(r.this.up / x.figures.up, x.up_ratios),
            r.this.down,
            x.figures.down,
            ratio(r.this.down / x.figures.down, x.down_ratios),
            r.this.up_cpu.service,
            x.figures.up_cpu.service,
            r.this.down_cpu.service,
            x.figures.down_cpu.service
        );
    }
}

/// A ratio, with its rounds' lowest–highest when there were several.
fn ratio(rounds: usize, median: f64, (lo, hi): (f64, f64)) -> String {
    match rounds > 1 {
        true => format!("{median:.2} ({lo:.2}–{hi:.2})"),
        false => format!("{median:.2}"),
    }
}
