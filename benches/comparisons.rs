//! niix against the raw limit and against what users would use instead, as
//! ratios measured in one run on one machine. Prints `name: value` lines at
//! the end. Run with `make bench` (it builds the release binary and the
//! Python baseline's environment first).
//!
//! - `overhead_vs_raw_ort`: push to findings available through gRPC for one
//!   2048x6144 dual-energy scan, divided by the time ONNX Runtime alone
//!   spends on the same tiles (same model, same process run).
//! - `speedup_vs_python`: `benches/baselines/pipeline.py` (Pillow + numpy +
//!   onnxruntime) on the same scan and model, divided by niix's analysis.
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

/// The Python baseline's best time on the scan with the demo model it mirrors.
fn python_seconds(high: &Path, low: &Path) -> Option<f64> {
    let py = workspace().join(".niix/venv/bin/python");
    let out = Command::new(py)
        .arg(workspace().join("benches/baselines/pipeline.py"))
        .args(["--model", workspace().join("fixtures/models/demo-local-contrast/1").to_str()?])
        .args(["--plane", high.to_str()?, "--plane", low.to_str()?, "--repeat", "5", "--json"])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("python baseline failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["seconds"].as_f64()
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
/// (comma-separated: `analysis`, `ingest`, `concurrent`).
fn section(name: &str) -> bool {
    match std::env::var("NIIX_BENCH_ONLY") {
        Ok(only) => only.split(',').any(|s| s.trim() == name),
        Err(_) => true,
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let tmp = tempfile::tempdir_in(workspace().join("target")).expect("temp dir");
    let mut figures: Vec<(&str, String)> = Vec::new();

    // --- Analysis: niix vs raw ONNX Runtime, niix vs Python.
    if section("analysis") {
        let (high, low) = synth_planes(
            &tmp.path().join("scan"),
            1,
            0,
            &niix_synth::Options { anomaly_rate: 1.0, ..Default::default() },
        );
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
        figures.push(("end_to_end_seconds", format!("{e2e:.3}")));
        figures.push(("raw_ort_seconds", format!("{raw:.3}")));
        figures.push(("overhead_vs_raw_ort", format!("{:.2}", e2e / raw)));

        let demo = Model::load(
            &workspace().join("fixtures/models/demo-local-contrast/1"),
            "demo-local-contrast",
            1,
            Threads::default(),
        )
        .expect("the demo model");
        let runs: Vec<_> = (0..5)
            .map(|_| {
                let t0 = Instant::now();
                let a = analyze(&demo, planes(&high, &low)).expect("analysis");
                (t0.elapsed().as_secs_f64(), a.timings)
            })
            .collect();
        let (niix_demo, t) = runs.into_iter().min_by(|a, b| a.0.total_cmp(&b.0)).expect("five runs");
        figures.push(("niix_analysis_seconds", format!("{niix_demo:.3}")));
        // Where niix's time goes, in the best run (decode includes the transform).
        for (stage, d) in [
            ("decode", t.decode),
            ("tile", t.tile),
            ("infer", t.infer),
            ("stitch", t.stitch),
            ("postprocess", t.postprocess),
            ("total", t.total),
        ] {
            println!("niix_{stage}_seconds: {:.3}", d.as_secs_f64());
        }
        match python_seconds(&high, &low) {
            Some(py) => {
                figures.push(("python_analysis_seconds", format!("{py:.3}")));
                figures.push(("speedup_vs_python", format!("{:.2}", py / niix_demo)));
            }
            None => figures.push(("speedup_vs_python", "n/a (run make bench to set up the Python baseline)".into())),
        }
        drop(model);
        drop(demo);
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
        figures.push(("ingest_mib_s", format!("{:.0}", gib / push)));
        figures.push(("raw_copy_mib_s", format!("{:.0}", gib / copy)));
        figures.push(("ingest_vs_raw_copy", format!("{:.2}", copy / push)));
        figures.push(("ingest_peak_rss_mib", format!("{:.0}", serve.memory_mib("VmHWM"))));
        // Where the time goes: CPU seconds per GiB on each side (two cores: both
        // sides together cannot use more than 2x the push's wall time).
        figures.push(("ingest_server_cpu_s_per_gib", format!("{:.2}", server.seconds)));
        figures.push(("ingest_client_cpu_s_per_gib", format!("{:.2}", client.seconds)));
        figures.push(("ingest_server_minor_faults_per_gib", format!("{}", server.minor_faults)));
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
        figures.push(("concurrent_ingest_efficiency", format!("{:.2}", (8.0 / eight) / (1.0 / one))));
        drop(serve);
    }

    println!();
    for (name, value) in figures {
        println!("{name}: {value}");
    }
}
