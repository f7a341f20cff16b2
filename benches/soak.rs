//! A bounded soak: a release `niix serve` child on loopback (embedded store,
//! the shipped detector `cargo-patchcore` unless `--model` says otherwise),
//! several scanner clients pushing
//! distinct dual-energy scans while officers list scans and fetch findings,
//! for a set time; then it stops by itself, lets the analysis queue drain and
//! prints operation counts, errors, p50/p99/max latencies, the server's
//! resident memory over time and the disk used, with `name: value` lines at
//! the end. Exits non-zero on any error, on an analysis backlog left after
//! the drain, or when resident memory grew by more than `--max-rss-growth-mib`
//! between the second and the last quarter of the load.
//!
//! ```text
//! cargo build --release -p niix-server && \
//!   cargo run --release -p niix-benches --bin soak -- --duration 600
//! ```

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use niix::client::{Authed, PlaneHints, PushOptions, Quiet, StatusError, authed, connect, push_files};
use niix_benches::{Serve, fixtures, percentile, scan_header, synth_planes, workspace};
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::{
    AlarmDecision, GetFindingsRequest, GetScanRequest, ListScansRequest, PlaneKind, RenderOverlayRequest, ScanStatus,
};
use niix_synth::rng::Rng;
use tokio::sync::watch;

/// Series of the synthetic scans (each scan is a distinct index in it).
const SEED: u64 = 0x50a4;
/// Sites the pushers pretend to be, and officers filter on.
const SITES: [&str; 4] = ["NLRTM", "DEHAM", "BEANR", "FRLEH"];
/// Error messages kept for the report.
const FIRST_ERRORS: usize = 10;

/// A bounded soak of a `niix serve` child on loopback.
#[derive(Debug, Parser)]
#[command(name = "soak")]
struct Args {
    /// Seconds of load (then it stops by itself).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Concurrent scanner clients pushing scans.
    #[arg(long, default_value_t = 4)]
    pushers: u64,
    /// Concurrent officer clients querying.
    #[arg(long, default_value_t = 2)]
    officers: u64,
    /// Width of the generated scans in pixels.
    #[arg(long, default_value_t = 1024)]
    width: u32,
    /// Height of the generated scans in pixels.
    #[arg(long, default_value_t = 2048)]
    height: u32,
    /// Pause of each pusher between two pushes, in milliseconds. With the
    /// defaults, about one scan a second in all (8 MiB each, ~6 GB in 10
    /// minutes), which the analysis keeps up with on 2 cores.
    #[arg(long, default_value_t = 3000)]
    push_pause_ms: u64,
    /// Pause of each officer between two rounds of queries, in milliseconds.
    #[arg(long, default_value_t = 100)]
    think_ms: u64,
    /// Officers render an overlay every this many rounds (0: never).
    #[arg(long, default_value_t = 10)]
    overlay_every: u64,
    /// Seconds between two progress lines.
    #[arg(long, default_value_t = 30)]
    report_every: u64,
    /// Seconds between two samples of the server's resident memory.
    #[arg(long, default_value_t = 5)]
    sample_every: u64,
    /// Longest wait, after the load, for the analysis queue to empty (seconds).
    #[arg(long, default_value_t = 300)]
    drain_timeout: u64,
    /// Data directory of the server (kept). Default: a temporary directory
    /// under target/, removed at the end.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Model of fixtures/models that analyses the scans.
    #[arg(long, default_value = "cargo-patchcore")]
    model: String,
    /// Most growth of resident memory (mean of the last quarter of the load
    /// minus mean of the second quarter, MiB) before the soak fails: memory
    /// that keeps growing under steady load is a leak.
    #[arg(long, default_value_t = 64.0)]
    max_rss_growth_mib: f64,
}

/// Latencies and errors of one kind of operation.
#[derive(Default)]
struct OpStats {
    latencies: Vec<Duration>,
    errors: u64,
}

/// What all clients observed.
#[derive(Default)]
struct Stats {
    ops: BTreeMap<&'static str, OpStats>,
    first_errors: Vec<String>,
    errors: u64,
}

impl Stats {
    fn error(&mut self, at: Duration, what: String) {
        self.errors += 1;
        if self.first_errors.len() < FIRST_ERRORS {
            self.first_errors.push(format!("[{:>5.0}s] {what}", at.as_secs_f64()));
        }
    }
}

/// State shared by the clients.
struct Soak {
    args: Args,
    url: String,
    start: Instant,
    stats: Mutex<Stats>,
    /// Ids of the scans stored so far (officers pick from them).
    scans: Mutex<Vec<String>>,
    /// Plane bytes pushed.
    bytes: Mutex<u64>,
    /// Files of scans waiting to be pushed.
    work: PathBuf,
    /// The server's data directory.
    data: PathBuf,
}

impl Soak {
    /// Times `call` as operation `op`; records its latency, or its error.
    async fn timed<T, E: Display>(&self, op: &'static str, call: impl Future<Output = Result<T, E>>) -> Option<T> {
        let t = Instant::now();
        let result = call.await;
        let elapsed = t.elapsed();
        let mut stats = self.stats.lock().unwrap();
        let entry = stats.ops.entry(op).or_default();
        match result {
            Ok(v) => {
                entry.latencies.push(elapsed);
                Some(v)
            }
            Err(e) => {
                entry.errors += 1;
                stats.error(self.start.elapsed(), format!("{op}: {e:#}"));
                None
            }
        }
    }

    /// A client channel carrying `token`.
    async fn channel(&self, token: &str) -> Authed {
        authed(connect(&self.url).await.expect("connecting to niix serve"), Some(token)).expect("token")
    }
}

/// Sleeps `d`, or less if the load stops meanwhile.
async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

/// Pushes distinct scans until the load stops: scan `k` of pusher `n` is
/// number `k * pushers + n` of the synthetic series. No retries, so every
/// broken push counts as an error.
async fn pusher(soak: Arc<Soak>, n: u64, token: String, mut stop: watch::Receiver<bool>) {
    let channel = soak.channel(&token).await;
    let options = niix_synth::Options { width: soak.args.width, height: soak.args.height, ..Default::default() };
    let push = PushOptions { retries: 0, ..Default::default() };
    let dir = soak.work.join(format!("pusher-{n}"));
    for k in 0.. {
        if *stop.borrow() {
            break;
        }
        let index = k * soak.args.pushers + n;
        let d = dir.clone();
        let (mut header, files) = tokio::task::spawn_blocking(move || {
            let (high, low) = synth_planes(&d, SEED, index, &options);
            let hints = PlaneHints { pixel_spacing_mm: (3.0, 3.0), ..Default::default() };
            let header = scan_header(&[(&high, PlaneKind::HighEnergy), (&low, PlaneKind::LowEnergy)], &hints);
            (header, vec![high, low])
        })
        .await
        .expect("generating a scan");
        let m = header.metadata.as_mut().expect("scan_header sets metadata");
        m.site_id = SITES[(index % SITES.len() as u64) as usize].into();
        m.lane_id = format!("L{n}");
        m.scan_time = Some(SystemTime::now().into());
        let id = header.scan_id.clone();
        let bytes: u64 = header.planes.iter().map(|p| p.byte_length).sum();
        let receipt = soak.timed("push", push_files(channel.clone(), header, files, &push, Arc::new(Quiet))).await;
        if let Some(r) = receipt {
            if r.duplicate || r.scan_id != id {
                soak.stats.lock().unwrap().error(soak.start.elapsed(), format!("push: receipt {r:?} for scan {id}"));
            }
            soak.scans.lock().unwrap().push(id);
            *soak.bytes.lock().unwrap() += bytes;
        }
        let _ = std::fs::remove_dir_all(&dir);
        pause(&mut stop, Duration::from_millis(soak.args.push_pause_ms)).await;
    }
}

/// What an officer asks, round after round, until the load stops: a listing
/// (latest, by site, analysed, alarms, high scores), then the scan, findings
/// and now and then the overlay of a random stored scan.
async fn officer(soak: Arc<Soak>, n: u64, token: String, mut stop: watch::Receiver<bool>) {
    let mut client = FindingsClient::new(soak.channel(&token).await);
    let mut rng = Rng::new(SEED, 1_000_000 + n);
    for round in 0u64.. {
        if *stop.borrow() {
            break;
        }
        let mut list = ListScansRequest { page_size: 50, ..Default::default() };
        match round % 5 {
            0 => {}
            1 => list.site_id = SITES[(round / 5 % SITES.len() as u64) as usize].into(),
            2 => list.status = ScanStatus::Analyzed as i32,
            3 => list.decision = AlarmDecision::Alarm as i32,
            _ => list.min_score = Some(0.5),
        }
        soak.timed("list", async { client.list_scans(list).await.map_err(StatusError) }).await;
        let id = {
            let scans = soak.scans.lock().unwrap();
            (!scans.is_empty()).then(|| scans[rng.int(0, scans.len() as i64 - 1) as usize].clone())
        };
        if let Some(id) = id {
            let findings = soak
                .timed("findings", async {
                    client.get_findings(GetFindingsRequest { scan_id: id.clone() }).await.map_err(StatusError)
                })
                .await;
            soak.timed("scan", async {
                client.get_scan(GetScanRequest { scan_id: id.clone() }).await.map_err(StatusError)
            })
            .await;
            let analysed = findings.is_some_and(|f| f.get_ref().status == ScanStatus::Analyzed as i32);
            if analysed && soak.args.overlay_every > 0 && round % soak.args.overlay_every == 0 {
                let req = RenderOverlayRequest { scan_id: id, max_width: 800, ..Default::default() };
                soak.timed("overlay", async { client.render_overlay(req).await.map_err(StatusError) }).await;
            }
        }
        pause(&mut stop, Duration::from_millis(soak.args.think_ms)).await;
    }
}

/// How many stored scans have `status` (all scans when `None`).
async fn count(client: &mut FindingsClient<Authed>, status: Option<ScanStatus>) -> Result<usize, StatusError> {
    let (mut n, mut page_token) = (0, String::new());
    loop {
        let req = ListScansRequest {
            page_size: 1000,
            page_token,
            status: status.map_or(0, |s| s as i32),
            ..Default::default()
        };
        let page = client.list_scans(req).await.map_err(StatusError)?.into_inner();
        n += page.scans.len();
        if page.next_page_token.is_empty() {
            return Ok(n);
        }
        page_token = page.next_page_token;
    }
}

/// Scans queued or being analysed.
async fn backlog(client: &mut FindingsClient<Authed>) -> Result<usize, StatusError> {
    Ok(count(client, Some(ScanStatus::Queued)).await? + count(client, Some(ScanStatus::Analyzing)).await?)
}

/// Bytes the files under `dir` occupy on disk.
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() { 0.0 } else { xs.iter().sum::<f64>() / xs.len() as f64 }
}

/// An `[auth]` section with one bearer token per identity and role; returns
/// it with the tokens, in the same order.
fn auth_section(who: &[(String, niix::auth::Role)]) -> (String, Vec<String>) {
    let (mut toml, mut tokens) = (String::new(), Vec::new());
    for (identity, role) in who {
        let token = format!("soak-{}", uuid::Uuid::new_v4().simple());
        let hash = niix::auth::token_hash(&token);
        toml += &format!("[[auth.tokens]]\nidentity = {identity:?}\nrole = {:?}\nsha256 = {hash:?}\n\n", role.name());
        tokens.push(token);
    }
    (toml, tokens)
}

fn main() {
    let args = Args::parse();
    let target = workspace().join("target");
    let temp = match &args.data {
        Some(_) => None,
        None => Some(tempfile::Builder::new().prefix("soak-").tempdir_in(&target).expect("temp dir under target/")),
    };
    let data = args.data.clone().unwrap_or_else(|| temp.as_ref().expect("temp dir").path().join("data"));
    let work = tempfile::Builder::new().prefix("soak-work-").tempdir_in(&target).expect("temp dir under target/");

    let mut who = Vec::new();
    who.extend((0..args.pushers).map(|n| (format!("soak-scanner-{n}"), niix::auth::Role::Scanner)));
    who.extend((0..args.officers + 1).map(|n| (format!("soak-officer-{n}"), niix::auth::Role::Officer)));
    let (config, tokens) = auth_section(&who);
    let models: OsString = fixtures().join("models").into();
    let serve_args = ["--models".into(), models, "--model".into(), args.model.clone().into()];
    let serve = Serve::start(&data, &config, &serve_args);
    let pid = serve.pid();
    eprintln!(
        "soak: niix serve pid {pid} at {} over {}; model {}; {} pushers, {} officers, {}x{} scans, {} s",
        serve.url,
        data.display(),
        args.model,
        args.pushers,
        args.officers,
        args.width,
        args.height,
        args.duration
    );

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let serve = Arc::new(Mutex::new(serve));
    let soak = Arc::new(Soak {
        url: serve.lock().unwrap().url.clone(),
        args,
        start: Instant::now(),
        stats: Mutex::default(),
        scans: Mutex::default(),
        bytes: Mutex::default(),
        work: work.path().to_path_buf(),
        data,
    });
    let code = runtime.block_on(run(soak.clone(), serve.clone(), tokens));
    drop(serve);
    drop(work);
    drop(temp);
    std::process::exit(code);
}

/// Runs the load, drains, reports; returns the exit code.
async fn run(soak: Arc<Soak>, serve: Arc<Mutex<Serve>>, tokens: Vec<String>) -> i32 {
    let args = &soak.args;
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = Vec::new();
    for n in 0..args.pushers {
        tasks.push(tokio::spawn(pusher(soak.clone(), n, tokens[n as usize].clone(), stop.clone())));
    }
    for n in 0..args.officers {
        let token = tokens[(args.pushers + n) as usize].clone();
        tasks.push(tokio::spawn(officer(soak.clone(), n, token, stop.clone())));
    }
    // The last officer token watches the queue for the progress lines and the drain.
    let mut watcher = FindingsClient::new(soak.channel(&tokens[tokens.len() - 1]).await);

    // Sample memory and print progress until the duration is over.
    let rss = |s: &Arc<Mutex<Serve>>| s.lock().unwrap().memory_mib("VmRSS");
    let mut samples: Vec<(f64, f64)> = vec![(0.0, rss(&serve))];
    let end = soak.start + Duration::from_secs(args.duration);
    let mut next_report = args.report_every;
    let mut server_died = None;
    let every = Duration::from_secs(args.sample_every.max(1));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(end.into()) => break,
        }
        if let Some(status) = serve.lock().unwrap().exited() {
            server_died = Some(status);
            break;
        }
        let t = soak.start.elapsed().as_secs_f64();
        samples.push((t, rss(&serve)));
        if t + 0.5 >= next_report as f64 {
            next_report += args.report_every;
            let queued = backlog(&mut watcher).await.map_or_else(|e| e.to_string(), |n| n.to_string());
            let stats = soak.stats.lock().unwrap();
            let counts: Vec<String> =
                stats.ops.iter().map(|(op, s)| format!("{op} {}", s.latencies.len() + s.errors as usize)).collect();
            eprintln!(
                "[{t:>5.0}s] {}  errors {}  backlog {queued}  rss {:.1} MiB",
                counts.join("  "),
                stats.errors,
                samples.last().expect("a sample").1
            );
        }
    }

    // Stop, let in-flight calls finish, then let the analysis queue empty.
    let _ = stop_tx.send(true);
    for t in tasks {
        t.await.expect("a client task panicked");
    }
    let load_seconds = soak.start.elapsed().as_secs_f64();
    let drain_start = Instant::now();
    let mut left = 0;
    if server_died.is_none() {
        loop {
            match backlog(&mut watcher).await {
                Ok(0) => {
                    left = 0;
                    break;
                }
                Ok(n) => left = n,
                Err(e) => soak.stats.lock().unwrap().error(soak.start.elapsed(), format!("backlog: {e}")),
            }
            if drain_start.elapsed() > Duration::from_secs(args.drain_timeout) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let drain_seconds = drain_start.elapsed().as_secs_f64();
    let rss_after_drain = rss(&serve);
    let peak = serve.lock().unwrap().memory_mib("VmHWM");

    let mut stats = std::mem::take(&mut *soak.stats.lock().unwrap());
    if let Some(status) = server_died {
        stats.error(soak.start.elapsed(), format!("niix serve exited: {status}"));
    }
    let pushed = soak.scans.lock().unwrap().len();
    let (stored, analysed, failed) = if server_died.is_none() {
        (
            count(&mut watcher, None).await.unwrap_or(0),
            count(&mut watcher, Some(ScanStatus::Analyzed)).await.unwrap_or(0),
            count(&mut watcher, Some(ScanStatus::Failed)).await.unwrap_or(0),
        )
    } else {
        (0, 0, 0)
    };
    if stored != pushed {
        stats.error(soak.start.elapsed(), format!("{pushed} scans pushed but {stored} listed"));
    }
    if failed > 0 {
        stats.error(soak.start.elapsed(), format!("{failed} analyses FAILED"));
    }
    let disk = disk_bytes(&soak.data);

    // The report.
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut lines: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: String| lines.push((k.to_string(), v));
    put("soak_seconds", format!("{load_seconds:.0}"));
    put("model", args.model.clone());
    put("pushers", args.pushers.to_string());
    put("officers", args.officers.to_string());
    put("scan_pixels", format!("{}x{} dual-energy 16-bit", args.width, args.height));
    put("scans_pushed", pushed.to_string());
    put("scans_stored", stored.to_string());
    put("scans_analyzed", analysed.to_string());
    put("scans_failed", failed.to_string());
    put("analysis_backlog_end", left.to_string());
    put("drain_seconds", format!("{drain_seconds:.1}"));
    let bytes = *soak.bytes.lock().unwrap();
    put("pushed_mib", format!("{:.0}", mib(bytes)));
    put("push_mib_s", format!("{:.1}", mib(bytes) / load_seconds));
    println!("\n{:<10} {:>8} {:>7} {:>9} {:>9} {:>9}", "operation", "count", "errors", "p50_ms", "p99_ms", "max_ms");
    for (op, s) in &mut stats.ops {
        s.latencies.sort();
        let (p50, p99) = (percentile(&s.latencies, 0.50), percentile(&s.latencies, 0.99));
        let max = s.latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        println!("{op:<10} {:>8} {:>7} {p50:>9.1} {p99:>9.1} {max:>9.1}", s.latencies.len(), s.errors);
        put(&format!("{op}_count"), s.latencies.len().to_string());
        put(&format!("{op}_errors"), s.errors.to_string());
        put(&format!("{op}_p50_ms"), format!("{p50:.1}"));
        put(&format!("{op}_p99_ms"), format!("{p99:.1}"));
        put(&format!("{op}_max_ms"), format!("{max:.1}"));
    }
    if !stats.first_errors.is_empty() {
        println!("\nfirst errors:");
        for e in &stats.first_errors {
            println!("  {e}");
        }
    }
    println!("\nserver RSS (MiB), one sample every {} s from the start:", args.sample_every);
    for row in samples.chunks(10) {
        let values: Vec<String> = row.iter().map(|(_, m)| format!("{m:7.1}")).collect();
        println!("  {:>5.0}s {}", row[0].0, values.join(" "));
    }
    // Warm-up (caches, allocator arenas, the model) is over by the second
    // quarter; memory that keeps growing shows between it and the last one.
    let quarter = |q: usize| {
        let (from, to) = (load_seconds * q as f64 / 4.0, load_seconds * (q + 1) as f64 / 4.0);
        let xs: Vec<f64> = samples.iter().filter(|(t, _)| *t >= from && *t < to).map(|(_, m)| *m).collect();
        mean(&xs)
    };
    let (q2, q4) = (quarter(1), quarter(3));
    put("rss_start_mib", format!("{:.1}", samples[0].1));
    put("rss_end_mib", format!("{:.1}", samples.last().expect("a sample").1));
    put("rss_after_drain_mib", format!("{rss_after_drain:.1}"));
    put("rss_peak_mib", format!("{peak:.1}"));
    put("rss_q2_mean_mib", format!("{q2:.1}"));
    put("rss_q4_mean_mib", format!("{q4:.1}"));
    put("rss_growth_mib", format!("{:.1}", q4 - q2));
    put("rss_growth_limit_mib", format!("{:.1}", args.max_rss_growth_mib));
    let leaking = q4 - q2 > args.max_rss_growth_mib;
    if leaking {
        stats.error(
            soak.start.elapsed(),
            format!("resident memory grew {:.1} MiB under steady load (limit {:.1})", q4 - q2, args.max_rss_growth_mib),
        );
    }
    put("disk_used_mib", format!("{:.0}", mib(disk)));
    put("disk_per_scan_mib", format!("{:.2}", if stored > 0 { mib(disk) / stored as f64 } else { 0.0 }));
    put("soak_errors", stats.errors.to_string());
    println!();
    for (k, v) in &lines {
        println!("{k}: {v}");
    }
    if leaking {
        println!("resident memory grew more than {:.1} MiB under steady load", args.max_rss_growth_mib);
    }
    let pass = stats.errors == 0 && left == 0;
    println!("soak: {}", if pass { "PASS" } else { "FAIL" });
    i32::from(!pass)
}
