//! niix against the raw limit and against what users would use instead, as
//! ratios measured in one run on one machine. Prints `name: value` lines at
//! the end. Run with `make bench` (it builds the release binary and the
//! Python baseline's environment first).
//!
//! - `overhead_vs_raw_ort`: push to findings available through gRPC for one
//!   2048x6144 dual-energy scan, divided by the time ONNX Runtime alone
//!   spends on the same tiles (same model, same process run).
//! - `speedup_vs_python` (demo model) and `speedup_vs_python_shipped`
//!   (`cargo-patchcore`): `benches/baselines/pipeline.py` (Pillow, numpy,
//!   scipy.ndimage, onnxruntime with the same threads) on the same scan and
//!   model, divided by niix's `analyze`. Printed only when
//!   `benches/baselines/check_equal.py` finds the two results equal (scores
//!   within 1e-4, identical boxes, score maps equal at 8 bits); otherwise the
//!   figure says REFUSED and the differences are printed.
//! - `niix_own_seconds_*`: niix's analysis wall time outside ONNX Runtime
//!   (total minus the time inside `Model::run`), and
//!   `own_vs_python_non_onnx_*` the same against the baseline's; `niix_vs_raw_ort_*`
//!   the analysis against ONNX Runtime alone on the same tiles, which also
//!   counts what the overlapped stages take from ONNX Runtime's cores.
//! - `cpu_vs_python_*`: CPU seconds (all threads, ONNX Runtime's included)
//!   per analysis, niix over the baseline: the work each side does, which
//!   other tenants of a shared machine disturb less than wall time.
//! - `ingest_vs_raw_copy`: push throughput of a 1 GiB plane to a `niix serve`
//!   child over loopback (hashing and fsync included), divided by a plain
//!   loopback TCP socket-to-file copy of the same bytes with fsync.
//! - `ingest_peak_rss_mib`: the server's peak resident memory meanwhile.
//! - `ingest_server_cpu_s_per_gib`, `ingest_client_cpu_s_per_gib`,
//!   `ingest_server_minor_faults_per_gib`: the CPU each side spent on that
//!   push (and the server's page faults), to tell what limits it.
//! - `concurrent_ingest_efficiency`: 8 concurrent pushers' total throughput
//!   divided by one pusher's.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::Array4;
use niix::client::{PlaneHints, PushOptions, Quiet, authed, connect, push_files};
use niix_benches::{ProcessCpu, Serve, scan_header, synth_planes, workspace};
use niix_inference::model::Model;
use niix_inference::pipeline::{Timings, analyze, fill_tile, model_input};
use niix_inference::runtime::Threads;
use niix_inference::tiling::Grid;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::{GetFindingsRequest, PlaneKind, ScanStatus};

const MODEL: &str = "cargo-patchcore";
const REPEAT: usize = 3;

fn planes(high: &Path, low: &Path) -> Vec<niix_inference::pipeline::PlaneInput> {
    let plane = |p: &Path, kind: &str| niix_inference::pipeline::PlaneInput {
        kind: kind.into(),
        encoding: niix_inference::decode::Encoding::Tiff,
        width: 2048,
        height: 6144,
        reader: Box::new(std::io::BufReader::new(std::fs::File::open(p).expect("plane file"))),
    };
    vec![plane(high, "high_energy"), plane(low, "low_energy")]
}

/// ONNX Runtime alone on the scan's tiles: the sum of `Model::run` times.
fn raw_ort_seconds(model: &Model, high: &Path, low: &Path) -> f64 {
    let m = &model.manifest;
    let input = model_input(m, &mut planes(high, low), &mut Timings::default()).expect("model input");
    let (h, w) = input.size;
    let tiles = Grid::new(h, w, m.input.tile, m.input.overlap, model.stride).tiles();
    let batches: Vec<Array4<f32>> = tiles
        .chunks(m.input.batch)
        .map(|group| {
            let mut b = Array4::<f32>::zeros((group.len(), input.data.shape()[0], m.input.tile, m.input.tile));
            for (slot, t) in group.iter().enumerate() {
                fill_tile(&mut b, slot, input.data.view(), t, &input.pad);
            }
            b
        })
        .collect();
    let t0 = Instant::now();
    for b in &batches {
        model.run(b, |_, _| ()).expect("ONNX Runtime");
    }
    t0.elapsed().as_secs_f64()
}

/// Push to findings available through the gRPC stack of an in-process server.
async fn end_to_end_seconds(url: &str, high: &Path, low: &Path) -> f64 {
    let hints = PlaneHints { pixel_spacing_mm: (2.0, 2.0), ..Default::default() };
    let h = scan_header(&[(high, PlaneKind::HighEnergy), (low, PlaneKind::LowEnergy)], &hints);
    let id = h.scan_id.clone();
    let channel = authed(connect(url).await.expect("server"), None).expect("channel");
    let t0 = Instant::now();
    push_files(channel.clone(), h, vec![high.into(), low.into()], &PushOptions::default(), Arc::new(Quiet))
        .await
        .expect("push");
    let mut findings = FindingsClient::new(channel);
    loop {
        let f = findings.get_findings(GetFindingsRequest { scan_id: id.clone() }).await.expect("findings");
        if f.get_ref().status == ScanStatus::Analyzed as i32 {
            return t0.elapsed().as_secs_f64();
        }
        assert_ne!(f.get_ref().status, ScanStatus::Failed as i32, "analysis failed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn best(xs: impl IntoIterator<Item = f64>) -> f64 {
    xs.into_iter().fold(f64::INFINITY, f64::min)
}

/// One model's analysis by niix and by the Python baseline on the same scan.
struct Compared {
    /// niix's best `analyze` wall time, and the part of it outside ONNX Runtime.
    niix: f64,
    niix_own: f64,
    /// ONNX Runtime alone on the same tiles (best of [`REPEAT`]).
    raw_ort: f64,
    /// The baseline's best time, and the part outside ONNX Runtime; `None`
    /// when it could not run.
    python: Option<(f64, f64)>,
    /// Mean process CPU seconds (all threads, ONNX Runtime's included) per
    /// analysis on each side; the baseline's when it ran.
    niix_cpu: f64,
    python_cpu: Option<f64>,
    /// `Some(why)` when the two disagree (or the check could not run).
    differs: Option<String>,
    timings: Timings,
}

/// niix's findings as `check_equal.py` reads them.
fn findings_json(a: &niix_inference::pipeline::Analysis) -> serde_json::Value {
    let regions: Vec<serde_json::Value> = a
        .regions
        .iter()
        .map(|r| {
            serde_json::json!({"id": r.id, "x": r.x, "y": r.y, "width": r.width, "height": r.height,
                "area_px": r.area, "max_score": r.max_score, "mean_score": r.mean_score})
        })
        .collect();
    serde_json::json!({"decision": if a.alarm { "ALARM" } else { "CLEAR" }, "score": a.score, "regions": regions})
}

/// Runs `model` through niix (best of 5 `analyze` calls) and through
/// `benches/baselines/pipeline.py` (best of 5 in one process), then
/// `check_equal.py` on their findings and score maps (scores within 1e-4,
/// identical boxes, maps equal at 8 bits): a ratio between the two is only
/// worth printing if they found the same.
fn compare_with_python(name: &str, high: &Path, low: &Path, work: &Path) -> Compared {
    let dir = workspace().join(format!("fixtures/models/{name}/1"));
    let model = Model::load(&dir, name, 1, Threads::default()).expect("a bundled model");
    let raw_ort = best((0..REPEAT).map(|_| raw_ort_seconds(&model, high, low)));
    let cpu0 = ProcessCpu::of("self");
    let runs: Vec<_> = (0..5)
        .map(|_| {
            let t0 = Instant::now();
            let a = analyze(&model, planes(high, low)).expect("analysis");
            (t0.elapsed().as_secs_f64(), a)
        })
        .collect();
    let niix_cpu = ProcessCpu::of("self").since(cpu0).seconds / runs.len() as f64;
    let (niix, a) = runs.into_iter().min_by(|x, y| x.0.total_cmp(&y.0)).expect("five runs");
    let niix_own = (a.timings.total - a.timings.infer).as_secs_f64();
    let mut out = Compared {
        niix,
        niix_own,
        raw_ort,
        python: None,
        niix_cpu,
        python_cpu: None,
        differs: None,
        timings: a.timings,
    };
    drop(model);

    std::fs::create_dir_all(work).expect("work dir");
    let (niix_json, niix_map) = (work.join("niix.json"), work.join("niix-map.png"));
    let (py_json, py_map) = (work.join("python.json"), work.join("python-map.npy"));
    std::fs::write(&niix_json, findings_json(&a).to_string()).expect("writing niix.json");
    std::fs::write(&niix_map, niix::plane::encode_map_png(&a.map)).expect("writing the niix map");
    let py = workspace().join(".niix/venv/bin/python");
    let baseline = Command::new(&py)
        .arg(workspace().join("benches/baselines/pipeline.py"))
        .arg("--model")
        .arg(&dir)
        .arg("--plane")
        .arg(high)
        .arg("--plane")
        .arg(low)
        .args(["--repeat", "5", "--json", "--save-map"])
        .arg(&py_map)
        .output();
    let baseline = match baseline {
        Ok(o) if o.status.success() => o.stdout,
        Ok(o) => {
            out.differs = Some(format!("the Python baseline failed: {}", String::from_utf8_lossy(&o.stderr)));
            return out;
        }
        Err(e) => {
            out.differs = Some(format!("the Python baseline did not start ({e}): run make bench to set it up"));
            return out;
        }
    };
    std::fs::write(&py_json, &baseline).expect("writing python.json");
    let v: serde_json::Value = serde_json::from_slice(&baseline).expect("pipeline.py --json prints JSON");
    let (total, infer) = (v["seconds"].as_f64(), v["timings"]["infer"].as_f64());
    out.python = total.zip(infer).map(|(t, i)| (t, t - i));
    out.python_cpu = v["cpu_seconds_mean"].as_f64();
    let check = Command::new(&py)
        .arg(workspace().join("benches/baselines/check_equal.py"))
        .args([&niix_json, &py_json])
        .args(["--score-tol", "1e-4", "--niix-map"])
        .arg(&niix_map)
        .arg("--python-map")
        .arg(&py_map)
        .output()
        .expect("check_equal.py runs");
    let said = format!("{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr))
        .trim()
        .to_string();
    println!("check_equal ({name}): {said}");
    if !check.status.success() {
        out.differs = Some(said);
    }
    out
}

/// An ingest-only server (analysis off), so its memory is the ingest path's.
fn ingest_server(data: &Path) -> Serve {
    Serve::start(data, "[analysis]\nenabled = false\n", &[])
}

/// A raw little-endian u16 plane file of `bytes` bytes (a textured ramp).
fn raw_file(path: &Path, bytes: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut row = vec![0u8; 1 << 20];
    for i in 0..bytes / row.len() as u64 {
        for (j, b) in row.iter_mut().enumerate() {
            *b = ((j as u64).wrapping_mul(2654435761).wrapping_add(i) >> 7) as u8;
        }
        f.write_all(&row).unwrap();
    }
    f.flush().unwrap();
}

/// Pushes a raw plane of `side x rows` pixels; returns seconds.
async fn push_raw(url: &str, file: &Path, width: u32, height: u32) -> f64 {
    let hints = PlaneHints { width: Some(width), height: Some(height), ..Default::default() };
    let h = scan_header(&[(file, PlaneKind::SingleEnergy)], &hints);
    let channel = authed(connect(url).await.expect("server"), None).expect("channel");
    let t0 = Instant::now();
    push_files(channel, h, vec![file.into()], &PushOptions::default(), Arc::new(Quiet)).await.expect("push");
    t0.elapsed().as_secs_f64()
}

/// A plain loopback TCP copy of `file` into `out`, fsync included; seconds.
fn raw_copy_seconds(file: &Path, out: &Path) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let out = out.to_path_buf();
    let t0 = Instant::now();
    let receiver = std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        let mut f = std::fs::File::create(out).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = sock.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            f.write_all(&buf[..n]).unwrap();
        }
        f.sync_all().unwrap();
    });
    let mut sock = TcpStream::connect(addr).unwrap();
    let mut src = std::fs::File::open(file).unwrap();
    std::io::copy(&mut src, &mut sock).unwrap();
    drop(sock);
    receiver.join().unwrap();
    t0.elapsed().as_secs_f64()
}

/// Whether to run a section: all of them unless `NIIX_BENCH_ONLY` lists some
/// (comma-separated: `analysis`, `python`, `ingest`, `concurrent`).
fn section(name: &str) -> bool {
    match std::env::var("NIIX_BENCH_ONLY") {
        Ok(only) => only.split(',').any(|s| s.trim() == name),
        Err(_) => true,
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let tmp = tempfile::tempdir_in(workspace().join("target")).expect("temp dir");
    let mut figures: Vec<(String, String)> = Vec::new();

    let scan = || {
        synth_planes(&tmp.path().join("scan"), 1, 0, &niix_synth::Options { anomaly_rate: 1.0, ..Default::default() })
    };
    // --- Analysis: niix end to end vs raw ONNX Runtime.
    if section("analysis") {
        let (high, low) = scan();
        let model_dir = workspace().join(format!("fixtures/models/{MODEL}/1"));
        let model = Model::load(&model_dir, MODEL, 1, Threads::default()).expect("the bundled model");
        let raw = best((0..REPEAT).map(|_| raw_ort_seconds(&model, &high, &low)));
        let mut config = niix::config::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
            web: niix::config::WebConfig { listen: None, ..Default::default() },
            data_dir: tmp.path().join("data"),
            models_dir: workspace().join("fixtures/models"),
            ..Default::default()
        };
        config.analysis.model = Some(MODEL.into());
        let server = niix::server::start(config).await.expect("server");
        let url = format!("http://{}", server.addr);
        let e2e = best({
            let mut v = Vec::new();
            for _ in 0..REPEAT {
                v.push(end_to_end_seconds(&url, &high, &low).await);
            }
            v
        });
        server.shutdown().await.expect("shutdown");
        figures.push(("end_to_end_seconds".into(), format!("{e2e:.3}")));
        figures.push(("raw_ort_seconds".into(), format!("{raw:.3}")));
        figures.push(("overhead_vs_raw_ort".into(), format!("{:.2}", e2e / raw)));
        drop(model);
    }
    // --- niix's analysis vs the Python baseline, each model on both sides.
    if section("python") {
        let (high, low) = scan();
        for (label, name) in [("demo", "demo-local-contrast"), ("shipped", MODEL)] {
            let c = compare_with_python(name, &high, &low, &tmp.path().join(format!("compare-{label}")));
            let t = c.timings;
            // Where niix's time goes, in the best run (decode includes the
            // transform; decode and tile overlap ONNX Runtime).
            for (stage, d) in [
                ("decode", t.decode),
                ("tile", t.tile),
                ("infer", t.infer),
                ("stitch", t.stitch),
                ("postprocess", t.postprocess),
                ("total", t.total),
            ] {
                println!("niix_{stage}_seconds_{label}: {:.3}", d.as_secs_f64());
            }
            figures.push((format!("niix_analysis_seconds_{label}"), format!("{:.3}", c.niix)));
            figures.push((format!("niix_own_seconds_{label}"), format!("{:.3}", c.niix_own)));
            figures.push((
                format!("niix_vs_raw_ort_{label}"),
                format!("{:.2} (raw {:.3} s)", c.niix / c.raw_ort, c.raw_ort),
            ));
            let ratio = if label == "demo" { "speedup_vs_python" } else { "speedup_vs_python_shipped" };
            match (c.python, &c.differs) {
                (Some((py, py_own)), None) => {
                    figures.push((format!("python_analysis_seconds_{label}"), format!("{py:.3}")));
                    figures.push((format!("python_non_onnx_seconds_{label}"), format!("{py_own:.3}")));
                    figures.push((ratio.into(), format!("{:.2}", py / c.niix)));
                    figures.push((format!("own_vs_python_non_onnx_{label}"), format!("{:.2}", c.niix_own / py_own)));
                    if let Some(py_cpu) = c.python_cpu {
                        figures.push((
                            format!("cpu_vs_python_{label}"),
                            format!(
                                "{:.2} (niix {:.3} s, Python {py_cpu:.3} s of CPU per analysis)",
                                c.niix_cpu / py_cpu,
                                c.niix_cpu
                            ),
                        ));
                    }
                }
                (_, Some(why)) => {
                    eprintln!("\n!!! {name}: niix and the Python baseline DIFFER; no ratio is printed:\n{why}\n");
                    figures.push((
                        ratio.into(),
                        format!("REFUSED: niix and Python differ on {name} (see check_equal above)"),
                    ));
                }
                (None, None) => figures.push((ratio.into(), "n/a (the Python baseline gave no time)".into())),
            }
        }
    }
    // --- Ingest: 1 GiB over loopback vs a plain socket-to-file copy.
    if section("ingest") {
        let (width, height) = (16_384u32, 32_768u32);
        let big = tmp.path().join("big.raw");
        raw_file(&big, u64::from(width) * u64::from(height) * 2);
        let gib = 1024.0;
        let copy = best((0..2).map(|_| {
            let s = raw_copy_seconds(&big, &tmp.path().join("copy.raw"));
            let _ = std::fs::remove_file(tmp.path().join("copy.raw"));
            s
        }));
        let serve = ingest_server(&tmp.path().join("ingest"));
        let (server_before, client_before) = (serve.cpu(), ProcessCpu::of("self"));
        let push = push_raw(&serve.url, &big, width, height).await;
        let (server, client) = (serve.cpu().since(server_before), ProcessCpu::of("self").since(client_before));
        figures.push(("ingest_mib_s".into(), format!("{:.0}", gib / push)));
        figures.push(("raw_copy_mib_s".into(), format!("{:.0}", gib / copy)));
        figures.push(("ingest_vs_raw_copy".into(), format!("{:.2}", copy / push)));
        figures.push(("ingest_peak_rss_mib".into(), format!("{:.0}", serve.memory_mib("VmHWM"))));
        // Where the time goes: CPU seconds per GiB on each side (two cores: both
        // sides together cannot use more than 2x the push's wall time).
        figures.push(("ingest_server_cpu_s_per_gib".into(), format!("{:.2}", server.seconds)));
        figures.push(("ingest_client_cpu_s_per_gib".into(), format!("{:.2}", client.seconds)));
        figures.push(("ingest_server_minor_faults_per_gib".into(), format!("{}", server.minor_faults)));
        drop(serve);
        let _ = std::fs::remove_dir_all(tmp.path().join("ingest"));
    }
    // --- 8 concurrent pushers vs one, 128 MiB each.
    if section("concurrent") {
        let (w8, h8) = (8_192u32, 8_192u32);
        let small = tmp.path().join("small.raw");
        raw_file(&small, u64::from(w8) * u64::from(h8) * 2);
        let serve = ingest_server(&tmp.path().join("concurrent"));
        let one = push_raw(&serve.url, &small, w8, h8).await;
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (url, file) = (serve.url.clone(), small.clone());
            tasks.push(tokio::spawn(async move { push_raw(&url, &file, w8, h8).await }));
        }
        for t in tasks {
            t.await.expect("a pusher failed");
        }
        let eight = t0.elapsed().as_secs_f64();
        figures.push(("concurrent_ingest_efficiency".into(), format!("{:.2}", (8.0 / eight) / (1.0 / one))));
        drop(serve);
    }

    println!();
    for (name, value) in figures {
        println!("{name}: {value}");
    }
}
