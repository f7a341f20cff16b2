//! Peak memory of a release `niix serve` child (its VmHWM), one scenario
//! per fresh server. Prints `name: value` lines at the end.
//!
//! - `analysis_peak_rss_mib`: a 16384x32768 dual-energy scan (two 1 GiB raw
//!   planes) pushed and analysed by the shipped model (`cargo-patchcore`);
//!   the analysis streams by tile rows, so this stays far below the 2 GiB
//!   of samples (or 4 GiB of f32) the scan holds.
//! - `analysis_seconds`: push done to findings available, same scan.
//! - `dicos_rle_bomb_peak_rss_mib`: a 17 MB DICOS RLE object declaring
//!   23168x23168, pushed and analysed (demo model).
//! - `png_bomb_peak_rss_mib`: a 16384x16384 dual-energy PNG scan of ~5 MB,
//!   pushed and analysed (demo model).
//!
//! `NIIX_BENCH_ONLY=analysis` (or `bombs`) runs one part.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use niix::client::{PlaneHints, PushOptions, Quiet, authed, connect, push_files};
use niix_benches::{Serve, dicos_rle_bomb, fixtures, png_bomb, scan_header, workspace};
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::{GetFindingsRequest, PlaneKind, ScanStatus};

fn section(name: &str) -> bool {
    match std::env::var("NIIX_BENCH_ONLY") {
        Ok(only) => only.split(',').any(|s| s.trim() == name),
        Err(_) => true,
    }
}

/// A server analysing with `model` from the bundled models.
fn serve(data: &Path, model: &str) -> Serve {
    let config = format!("[analysis]\nmodel = {model:?}\n");
    Serve::start(data, &config, &["--models".into(), fixtures().join("models").into()])
}

/// A raw little-endian u16 plane of `w x h` cargo-like samples.
fn raw_plane(path: &Path, w: u32, h: u32, low: bool) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut row = vec![0u8; w as usize * 2];
    for y in 0..h {
        for (x, b) in row.chunks_exact_mut(2).enumerate() {
            let v = 30000 + ((x as u32).wrapping_mul(7919) ^ y.wrapping_mul(104729)) % 997;
            let v = if low { v * 3 / 5 } else { v } as u16;
            b.copy_from_slice(&v.to_le_bytes());
        }
        f.write_all(&row).unwrap();
    }
    f.flush().unwrap();
}

/// Pushes plane files as one scan and waits for its analysis; seconds from
/// the end of the push to findings, and whether the analysis was aborted.
async fn push_and_wait(url: &str, files: &[(&Path, PlaneKind)], hints: &PlaneHints) -> (f64, bool, String) {
    let header = scan_header(files, hints);
    let id = header.scan_id.clone();
    let channel = authed(connect(url).await.expect("server"), None).expect("channel");
    let paths = files.iter().map(|(p, _)| p.to_path_buf()).collect();
    push_files(channel, header, paths, &PushOptions::default(), Arc::new(Quiet)).await.expect("push");
    let t0 = Instant::now();
    let mut findings = FindingsClient::new(connect(url).await.expect("server"));
    loop {
        let f = findings.get_findings(GetFindingsRequest { scan_id: id.clone() }).await.expect("findings").into_inner();
        if matches!(ScanStatus::try_from(f.status), Ok(ScanStatus::Analyzed | ScanStatus::Failed)) {
            let report = f.reports.iter().find(|r| r.algorithm.is_some()).cloned().unwrap_or_default();
            return (t0.elapsed().as_secs_f64(), report.aborted, report.abort_reason);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let tmp = tempfile::tempdir_in(workspace().join("target")).expect("temp dir");
    let mut figures: Vec<(&str, String)> = Vec::new();

    if section("analysis") {
        let (w, h) = (16_384u32, 32_768u32);
        let (high, low) = (tmp.path().join("high.raw"), tmp.path().join("low.raw"));
        raw_plane(&high, w, h, false);
        raw_plane(&low, w, h, true);
        let server = serve(&tmp.path().join("analysis"), "cargo-patchcore");
        let hints = PlaneHints { width: Some(w), height: Some(h), ..Default::default() };
        let files = [(high.as_path(), PlaneKind::HighEnergy), (low.as_path(), PlaneKind::LowEnergy)];
        let (seconds, aborted, reason) = push_and_wait(&server.url, &files, &hints).await;
        assert!(!aborted, "the analysis was aborted: {reason}");
        figures.push(("analysis_seconds", format!("{seconds:.1}")));
        figures.push(("analysis_peak_rss_mib", format!("{:.0}", server.memory_mib("VmHWM"))));
        drop(server);
        let _ = std::fs::remove_dir_all(tmp.path().join("analysis"));
        let _ = (std::fs::remove_file(high), std::fs::remove_file(low));
    }

    if section("bombs") {
        let dcs = tmp.path().join("bomb.dcs");
        std::fs::write(&dcs, dicos_rle_bomb(23168, 30000)).unwrap();
        let server = serve(&tmp.path().join("dicos"), "demo-local-contrast");
        let (_, _, reason) = push_and_wait(&server.url, &[(&dcs, PlaneKind::HighEnergy)], &PlaneHints::default()).await;
        println!("dicos bomb: {reason}");
        figures.push(("dicos_rle_bomb_peak_rss_mib", format!("{:.0}", server.memory_mib("VmHWM"))));
        drop(server);

        let (high, low) = (tmp.path().join("high.png"), tmp.path().join("low.png"));
        std::fs::write(&high, png_bomb(16384, 30000)).unwrap();
        std::fs::write(&low, png_bomb(16384, 18000)).unwrap();
        let server = serve(&tmp.path().join("png"), "demo-local-contrast");
        let files = [(high.as_path(), PlaneKind::HighEnergy), (low.as_path(), PlaneKind::LowEnergy)];
        let (_, _, reason) = push_and_wait(&server.url, &files, &PlaneHints::default()).await;
        println!("png bomb: {reason}");
        figures.push(("png_bomb_peak_rss_mib", format!("{:.0}", server.memory_mib("VmHWM"))));
    }

    println!();
    for (name, value) in figures {
        println!("{name}: {value}");
    }
}
