//! Results do not drift: a fixed `niix synth` scan (seed and index below)
//! is pushed through the real server and analysed by the shipped model
//! (`cargo-patchcore`) and by the demo model; their scores and regions must
//! match the reference stored in `fixtures/reference/analysis.json` (scores
//! within 1e-4, identical boxes).
//!
//! The reference was written by this test against the code before the
//! analysis was made to stream by tile rows. A deliberate change of results
//! (a new model version) rewrites it with `NIIX_BLESS_REFERENCE=1`.

mod common;

use std::path::PathBuf;

use common::{channel, config, fixtures, messages, new_id, push_messages, sha256, wait_analysed};
use niix::config::{AnalysisConfig, Limits};
use niix_proto::v1::{PlaneDescriptor, PlaneEncoding, PlaneKind, ScanHeader, ScanMetadata};
use serde_json::{Value, json};

/// The scan: `niix synth --seed 31 --count 3`, its third scan (index 2).
const SEED: u64 = 31;
const INDEX: u64 = 2;

fn reference_path() -> PathBuf {
    fixtures().join("reference/analysis.json")
}

fn plane(kind: PlaneKind, encoding: PlaneEncoding, w: u32, h: u32, bytes: &[u8]) -> PlaneDescriptor {
    PlaneDescriptor {
        kind: kind as i32,
        width: w,
        height: h,
        bits_stored: 16,
        pixel_spacing_x_mm: 4.0,
        pixel_spacing_y_mm: 4.0,
        intensity: 1,
        encoding: encoding as i32,
        byte_length: bytes.len() as u64,
        sha256: sha256(bytes),
    }
}

fn png16(w: u32, h: u32, samples: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Sixteen);
    let mut wr = enc.write_header().unwrap();
    let bytes: Vec<u8> = samples.iter().flat_map(|v| v.to_be_bytes()).collect();
    wr.write_image_data(&bytes).unwrap();
    wr.finish().unwrap();
    out
}

/// Pushes the fixed scan (raw planes, or PNG planes) to a server analysing
/// with `model`; the score and regions of its MACHINE report.
async fn analyse(model: &str, encoding: PlaneEncoding) -> Value {
    let scan = niix_synth::generate(SEED, INDEX, &niix_synth::Options { anomaly_rate: 1.0, ..Default::default() });
    let (w, h) = (scan.info.width, scan.info.height);
    let encode = |s: &[u16]| match encoding {
        PlaneEncoding::Png => png16(w, h, s),
        _ => s.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let (high, low) = (encode(&scan.high), encode(&scan.low));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), Limits::default());
    cfg.analysis = AnalysisConfig { model: Some(model.into()), ..Default::default() };
    let server = niix::server::start(cfg).await.expect("server starts");
    let ch = channel(&server).await;
    let header = ScanHeader {
        scan_id: new_id(),
        metadata: Some(ScanMetadata { site_id: "NLRTM-01".into(), lane_id: "L1".into(), ..Default::default() }),
        planes: vec![
            plane(PlaneKind::HighEnergy, encoding, w, h, &high),
            plane(PlaneKind::LowEnergy, encoding, w, h, &low),
        ],
    };
    push_messages(&ch, messages(&header, &[&high, &low], 1 << 20)).await.unwrap();
    let findings = wait_analysed(&ch, &header.scan_id).await;
    let report = findings.reports.iter().find(|r| r.algorithm.is_some()).expect("a MACHINE report");
    assert!(!report.aborted, "{model}: {}", report.abort_reason);
    let regions: Vec<Value> = report
        .regions
        .iter()
        .map(|r| {
            json!({"id": r.id, "x": r.x, "y": r.y, "width": r.width, "height": r.height,
            "area_px": r.area_px, "max_score": r.max_score, "mean_score": r.mean_score})
        })
        .collect();
    server.shutdown().await.unwrap();
    json!({"score": report.score, "decision": report.decision, "regions": regions})
}

fn same(model: &str, got: &Value, want: &Value) {
    let close = |a: &Value, b: &Value, what: &str| {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        assert!((a - b).abs() <= 1e-4, "{model}: {what} is {a}, the reference says {b}");
    };
    close(&got["score"], &want["score"], "score");
    assert_eq!(got["decision"], want["decision"], "{model}: decision");
    let (g, w) = (got["regions"].as_array().unwrap(), want["regions"].as_array().unwrap());
    assert_eq!(g.len(), w.len(), "{model}: {} regions, the reference has {}: {got}", g.len(), w.len());
    for (a, b) in g.iter().zip(w) {
        for key in ["id", "x", "y", "width", "height", "area_px"] {
            assert_eq!(a[key], b[key], "{model}: region {} {key}: {a} vs {b}", b["id"]);
        }
        close(&a["max_score"], &b["max_score"], "a region's max_score");
        close(&a["mean_score"], &b["mean_score"], "a region's mean_score");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_and_demo_models_give_the_stored_reference_results() {
    let shipped = analyse("cargo-patchcore", PlaneEncoding::RawU16le).await;
    let demo = analyse("demo-local-contrast", PlaneEncoding::Png).await;
    let got = json!({"seed": SEED, "index": INDEX, "cargo-patchcore": shipped, "demo-local-contrast": demo});
    if std::env::var_os("NIIX_BLESS_REFERENCE").is_some() {
        std::fs::create_dir_all(reference_path().parent().unwrap()).unwrap();
        std::fs::write(reference_path(), serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
        return;
    }
    let text = std::fs::read_to_string(reference_path()).expect("fixtures/reference/analysis.json");
    let want: Value = serde_json::from_str(&text).unwrap();
    assert_eq!((want["seed"].as_u64(), want["index"].as_u64()), (Some(SEED), Some(INDEX)));
    for model in ["cargo-patchcore", "demo-local-contrast"] {
        same(model, &got[model], &want[model]);
    }
    // The reference is worth something only if it has regions to compare.
    assert!(!want["cargo-patchcore"]["regions"].as_array().unwrap().is_empty());
}
