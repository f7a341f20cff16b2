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

/// `count` scans of `seed` into `out`; `size` = Some((width, height)), or the default 2048x6144.
fn synth(out: &Path, seed: &str, count: &str, rate: &str, size: Option<(&str, &str)>) {
    let mut args = vec!["synth", "--out", out.to_str().unwrap(), "--seed", seed, "--count", count];
    args.extend(["--anomaly-rate", rate]);
    if let Some((w, h)) = size {
        args.extend(["--width", w, "--height", h]);
    }
    niix(&args);
}

#[test]
fn synth_is_deterministic_fit_learns_normal_cargo_and_eval_separates_anomalies() {
    let tmp = tempfile::tempdir().unwrap();
    let (normal, test, again) = (tmp.path().join("normal"), tmp.path().join("test"), tmp.path().join("again"));

    // Same seed, same bytes; ground truth alongside (small scans: this is about bytes).
    let small = Some(("512", "1536"));
    synth(&again, "5", "2", "0.5", small);
    let first = tmp.path().join("first");
    synth(&first, "5", "2", "0.5", small);
    for f in ["synth-5-00000.high.tif", "synth-5-00001.low.tif", "synth-5-00001.json"] {
        assert_eq!(std::fs::read(first.join(f)).unwrap(), std::fs::read(again.join(f)).unwrap(), "{f}");
    }
    let info = niix_synth::read_info(&first.join("synth-5-00000.json")).unwrap();
    assert_eq!((info.width, info.height), (512, 1536));

    // Detection at the scanner's own pixel pitch: the default 2048x6144. The
    // head was trained at that pitch; on 4x smaller scans every object is 4x
    // smaller than anything it has seen.
    synth(&test, "5", "12", "0.5", None);
    // Fit on normal scans of other seeds, into a fresh repository.
    synth(&normal, "6", "8", "0", None);
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
    for f in ["model.onnx", "features.onnx", "memory_bank.f32", "bank_scale.f32", "model.toml"] {
        assert!(version.join(f).exists(), "{f} missing");
    }
    let manifest = std::fs::read_to_string(version.join("model.toml")).unwrap();
    assert!(manifest.contains("Fitted by `niix model fit` on 6 normal scans"), "{manifest}");
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
    assert_eq!(report["scans"], 12);
    let auroc = report["auroc"].as_f64().unwrap();
    assert!(auroc > 0.8, "anomalous scans must score higher than normal ones: {report}");
    assert!(report["seconds_per_scan"].as_f64().unwrap() > 0.0);

    // The per-scan records are the ones the figures were computed from.
    let per_scan = report["per_scan"].as_array().unwrap();
    assert_eq!(per_scan.len(), 12);
    let names: Vec<&str> = per_scan.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
    let score = |r: &serde_json::Value| r["score"].as_f64().unwrap();
    let (anomalous, normal): (Vec<_>, Vec<_>) =
        per_scan.iter().partition(|r| !r["anomalies"].as_array().unwrap().is_empty());
    assert_eq!(report["anomalous"].as_u64().unwrap() as usize, anomalous.len());
    let wins: f64 = anomalous
        .iter()
        .flat_map(|a| normal.iter().map(move |n| (score(a), score(n))))
        .map(|(a, n)| {
            if a > n {
                1.0
            } else if a == n {
                0.5
            } else {
                0.0
            }
        })
        .sum();
    let recomputed = wins / (anomalous.len() * normal.len()) as f64;
    assert!((recomputed - auroc).abs() < 1e-9, "AUROC {auroc} from the figures, {recomputed} from per_scan");
    let boxes: Vec<&serde_json::Value> = anomalous.iter().flat_map(|r| r["anomalies"].as_array().unwrap()).collect();
    let hit = boxes.iter().filter(|b| b["hit"].as_bool().unwrap()).count();
    let localization = report["localization"].as_f64().unwrap();
    assert!((hit as f64 / boxes.len() as f64 - localization).abs() < 1e-9, "{report}");
    for b in &boxes {
        assert!(report["by_kind"][b["kind"].as_str().unwrap()].is_array(), "{b} not in by_kind");
    }
    for r in &anomalous {
        // On the same raw scale as the score, and never above the scan's highest cell.
        for b in r["anomalies"].as_array().unwrap() {
            assert!(b["in_box"].as_f64().unwrap() <= score(r) + 1e-3, "{r}");
        }
        assert!(r["seconds"].as_f64().unwrap() > 0.0, "{r}");
    }
}
