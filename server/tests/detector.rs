//! The trained detector end to end on real files: `niix synth` writes
//! labelled scans (the same seed giving the same bytes), `niix model fit`
//! fits the PatchCore graphs to the normal ones through ONNX Runtime, and
//! `niix eval` ranks anomalous scans above normal ones.

mod common;

use std::path::Path;
use std::process::Command;

use common::fixtures;

fn niix(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_niix")).args(args).env("NIIX_LOG", "warn").output().unwrap();
    assert!(out.status.success(), "niix {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn synth(out: &Path, seed: &str, count: &str, rate: &str) {
    let out = out.to_str().unwrap();
    niix(&[
        "synth",
        "--out",
        out,
        "--seed",
        seed,
        "--count",
        count,
        "--anomaly-rate",
        rate,
        "--width",
        "512",
        "--height",
        "1536",
    ]);
}

#[test]
fn synth_is_deterministic_fit_learns_normal_cargo_and_eval_separates_anomalies() {
    let tmp = tempfile::tempdir().unwrap();
    let (normal, test, again) = (tmp.path().join("normal"), tmp.path().join("test"), tmp.path().join("again"));

    // Same seed, same bytes; ground truth alongside.
    synth(&test, "5", "16", "0.5");
    synth(&again, "5", "2", "0.5");
    for f in ["synth-5-00000.high.tif", "synth-5-00001.low.tif", "synth-5-00001.json"] {
        assert_eq!(std::fs::read(test.join(f)).unwrap(), std::fs::read(again.join(f)).unwrap(), "{f}");
    }
    let info = niix_synth::read_info(&test.join("synth-5-00000.json")).unwrap();
    assert_eq!((info.width, info.height), (512, 1536));

    // Fit on normal scans of other seeds, into a fresh repository.
    synth(&normal, "6", "12", "0");
    let models = tmp.path().join("models");
    let version = models.join("cargo-patchcore/1");
    let out = niix(&[
        "model",
        "fit",
        "--normal",
        normal.to_str().unwrap(),
        "--base",
        fixtures().join("patchcore").to_str().unwrap(),
        "--out",
        version.to_str().unwrap(),
    ]);
    assert!(out.contains("memory bank"), "{out}");
    for f in ["model.onnx", "features.onnx", "memory_bank.f32", "model.toml"] {
        assert!(version.join(f).exists(), "{f} missing");
    }
    let manifest = std::fs::read_to_string(version.join("model.toml")).unwrap();
    assert!(manifest.contains("Fitted by `niix model fit` on 8 normal scans"), "{manifest}");
    // Versions are never overwritten.
    let again = Command::new(env!("CARGO_BIN_EXE_niix"))
        .args(["model", "fit", "--normal", normal.to_str().unwrap(), "--base", "cargo-patchcore"])
        .args(["--models", models.to_str().unwrap(), "--out", version.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!again.status.success());

    // Anomalous scans rank above normal ones.
    let report: serde_json::Value = serde_json::from_str(&niix(&[
        "eval",
        "--data",
        test.to_str().unwrap(),
        "--models",
        models.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["scans"], 16);
    let auroc = report["auroc"].as_f64().unwrap();
    assert!(auroc > 0.7, "anomalous scans must score higher than normal ones: {report}");
    assert!(report["seconds_per_scan"].as_f64().unwrap() > 0.0);
}
