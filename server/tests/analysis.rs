//! Analysis end to end: push over gRPC, the real ONNX Runtime runs the
//! bundled model, findings come back through the Findings service and CLI.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use niix::client::{self, PushOptions, Quiet};
use niix::config::Limits;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::{
    AlarmDecision, GetFindingsRequest, Orientation, PlaneDescriptor, PlaneEncoding, PlaneKind, ReportType, ScanHeader,
    ScanStatus, ThreatReport,
};

fn write_tiff_px(path: &Path, w: u32, h: u32, px: &[u16]) {
    let mut buf = std::io::Cursor::new(Vec::new());
    tiff::encoder::TiffEncoder::new(&mut buf)
        .unwrap()
        .write_image::<tiff::encoder::colortype::Gray16>(w, h, px)
        .unwrap();
    std::fs::write(path, buf.into_inner()).unwrap();
}

#[tokio::test]
async fn a_full_size_dual_energy_scan_is_analysed_and_the_block_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data")).await;
    let ch = channel(&server).await;
    let (w, h) = (2048u32, 6144u32);
    let block = (1501, 4203, 56, 44);
    let (high, low) = (dir.path().join("h.tif"), dir.path().join("l.tif"));
    write_tiff_px(&high, w, h, &cargo_samples(w, h, Some(block), false));
    write_tiff_px(&low, w, h, &cargo_samples(w, h, Some(block), true));
    let hints = client::PlaneHints { pixel_spacing_mm: (4.0, 5.0), ..Default::default() };
    let header = ScanHeader {
        scan_id: new_id(),
        metadata: header("x", plane(PlaneEncoding::Tiff, 1, 1, b"x")).metadata,
        planes: vec![
            client::describe_plane(&high, PlaneKind::HighEnergy, &hints).unwrap(),
            client::describe_plane(&low, PlaneKind::LowEnergy, &hints).unwrap(),
        ],
    };
    let receipt = client::push_files(
        client::authed(ch.clone(), None).unwrap(),
        header,
        vec![high, low],
        &PushOptions::default(),
        std::sync::Arc::new(Quiet),
    )
    .await
    .unwrap();
    assert_eq!(receipt.status, ScanStatus::Queued as i32);

    let f = wait_analysed(&ch, &receipt.scan_id).await;
    assert_eq!(f.status, ScanStatus::Analyzed as i32);
    assert_eq!(f.reports.len(), 1);
    let r = &f.reports[0];
    assert_eq!(r.r#type, ReportType::Machine as i32);
    assert_eq!(r.decision, AlarmDecision::Alarm as i32);
    assert!(!r.aborted);
    let algo = r.algorithm.as_ref().unwrap();
    let model_bytes = std::fs::read(fixtures().join("models/demo-local-contrast/1/model.onnx")).unwrap();
    assert_eq!(algo.sha256, sha256(&model_bytes));
    assert_eq!((algo.name.as_str(), algo.version.as_str(), algo.demo), ("demo-local-contrast", "1", true));
    assert_eq!(r.regions.len(), 1, "{:?}", r.regions);
    let g = &r.regions[0];
    let (bx, by, bw, bh) = block;
    assert!(g.x <= bx && g.y <= by && g.x + g.width >= bx + bw && g.y + g.height >= by + bh, "{g:?}");
    assert_eq!(g.x_mm, f64::from(g.x) * 4.0);
    assert_eq!(g.y_mm, f64::from(g.y) * 5.0);
    assert_eq!(g.width_mm, f64::from(g.width) * 4.0);
    assert_eq!(g.height_mm, f64::from(g.height) * 5.0);
    assert_eq!(g.threat_category, "ANOMALY");
    assert!(r.score >= g.max_score && r.processing_seconds > 0.0);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_scan_the_model_cannot_read_is_recorded_as_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    // Ingest refuses such a scan by default (interop_grpc.rs); stored anyway, it aborts.
    let mut config = config(dir.path(), Limits::default());
    config.analysis.refuse_unreadable = false;
    let server = niix::server::start(config).await.unwrap();
    let ch = channel(&server).await;
    let raw = raw_bytes(64, 32, 1);
    let mut p = plane(PlaneEncoding::RawU16le, 64, 32, &raw);
    p.kind = PlaneKind::ZEffective as i32;
    let receipt = push_messages(&ch, messages(&header(&new_id(), p), &[&raw], 1024)).await.unwrap();
    assert!(receipt.warnings[0].contains("cannot read this scan"), "{receipt:?}");
    let f = wait_analysed(&ch, &receipt.scan_id).await;
    assert_eq!(f.status, ScanStatus::Failed as i32);
    let r = &f.reports[0];
    assert!(r.aborted);
    assert_eq!(r.decision, AlarmDecision::Unknown as i32);
    assert!(r.abort_reason.contains("high_energy|single_energy"), "{}", r.abort_reason);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn scans_queue_until_a_model_appears_and_new_versions_are_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let mut config = config(&dir.path().join("data"), Limits::default());
    config.models_dir = models.clone();
    config.analysis.reload_interval = Duration::from_millis(100);
    let server = niix::server::start(config).await.unwrap();
    let ch = channel(&server).await;
    let raw = raw_bytes(64, 32, 1);
    let receipt =
        push_messages(&ch, messages(&header(&new_id(), plane(PlaneEncoding::RawU16le, 64, 32, &raw)), &[&raw], 1024))
            .await
            .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut client = FindingsClient::new(ch.clone());
    let f = client.get_findings(GetFindingsRequest { scan_id: receipt.scan_id.clone() }).await.unwrap().into_inner();
    assert_eq!(f.status, ScanStatus::Queued as i32, "no model yet: the scan waits");
    assert!(f.reports.is_empty());

    // Drop the model in: the reloader picks it up and the queued scan is analysed.
    let v1 = models.join("demo-local-contrast/1");
    std::fs::create_dir_all(&v1).unwrap();
    for file in ["model.onnx", "model.toml"] {
        std::fs::copy(fixtures().join("models/demo-local-contrast/1").join(file), v1.join(file)).unwrap();
    }
    let f = wait_analysed(&ch, &receipt.scan_id).await;
    assert_eq!(f.status, ScanStatus::Analyzed as i32);
    assert_eq!(f.reports[0].algorithm.as_ref().unwrap().version, "1");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_scans_have_no_findings() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut client = FindingsClient::new(channel(&server).await);
    let err = client.get_findings(GetFindingsRequest { scan_id: new_id() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = client.get_findings(GetFindingsRequest { scan_id: "x".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    server.shutdown().await.unwrap();
}

/// A model repository for the fallback tests: the demo model's graph under
/// four manifests that differ in the planes they read, three of them not
/// marked as demonstrations (only those may be chosen by `"auto"`).
fn models_for_fallback(dir: &Path) -> std::path::PathBuf {
    let variants = [
        ("dual-only", r#"channels = ["high_energy", "low_energy"]"#),
        ("single-se", r#"channels = ["single_energy|high_energy", "single_energy|high_energy"]"#),
        ("backscatter-only", r#"channels = ["backscatter", "backscatter"]"#),
    ];
    common::demo_model_variants(dir, &variants, false)
}

/// A server over `models` analysing with `model`, falling back as `fallback` says.
async fn fallback_server(
    dir: &Path,
    models: &Path,
    model: &str,
    fallback: niix::model_choice::Fallback,
    refuse_unreadable: bool,
) -> niix::server::RunningServer {
    let mut config = config(&dir.join(format!("data-{}", new_id())), Limits::default());
    config.models_dir = models.to_path_buf();
    config.analysis.model = Some(model.into());
    config.analysis.fallback = fallback;
    config.analysis.refuse_unreadable = refuse_unreadable;
    niix::server::start(config).await.unwrap()
}

/// Pushes a 64x32 scan with one plane of each kind in `kinds`.
async fn push_kinds(
    ch: &tonic::transport::Channel,
    kinds: &[PlaneKind],
) -> Result<niix_proto::v1::ScanReceipt, tonic::Status> {
    let raw = raw_bytes(64, 32, 1);
    let mut hdr = header(&new_id(), plane(PlaneEncoding::RawU16le, 64, 32, &raw));
    hdr.planes = kinds
        .iter()
        .map(|k| {
            let mut p = plane(PlaneEncoding::RawU16le, 64, 32, &raw);
            p.kind = *k as i32;
            p
        })
        .collect();
    let bytes: Vec<&[u8]> = kinds.iter().map(|_| raw.as_slice()).collect();
    push_messages(ch, messages(&hdr, &bytes, 1024)).await
}

#[tokio::test]
async fn a_single_energy_scan_falls_back_to_a_model_that_reads_it_or_fails_without_a_fallback() {
    use niix::model_choice::Fallback;
    let dir = tempfile::tempdir().unwrap();
    let models = models_for_fallback(dir.path());

    // "auto": the dual-energy model cannot read a single-energy scan, so the
    // single-energy model analyses it (the demo model, first by name, may
    // not be chosen), and the report says so. Ingest accepts the scan.
    let server = fallback_server(dir.path(), &models, "dual-only", Fallback::Auto, true).await;
    let ch = channel(&server).await;
    let receipt = push_kinds(&ch, &[PlaneKind::SingleEnergy]).await.unwrap();
    assert!(receipt.warnings.is_empty(), "{receipt:?}");
    let f = wait_analysed(&ch, &receipt.scan_id).await;
    assert_eq!(f.status, ScanStatus::Analyzed as i32, "{f:?}");
    let r = &f.reports[0];
    assert!(!r.aborted);
    assert_eq!(r.algorithm.as_ref().unwrap().name, "single-se");
    assert_eq!(r.fallback_from, "dual-only");
    assert!(
        r.fallback_reason.contains("[\"single_energy\"]") && r.fallback_reason.contains("needs a high_energy plane"),
        "{}",
        r.fallback_reason
    );
    // A dual-energy scan is the configured model's, with no fallback recorded.
    let receipt = push_kinds(&ch, &[PlaneKind::HighEnergy, PlaneKind::LowEnergy]).await.unwrap();
    let r = &wait_analysed(&ch, &receipt.scan_id).await.reports[0];
    assert_eq!((r.algorithm.as_ref().unwrap().name.as_str(), r.fallback_from.as_str()), ("dual-only", ""));
    // A scan no model reads fails, naming its planes and the models tried.
    let receipt = push_kinds(&ch, &[PlaneKind::ZEffective]);
    let e = receipt.await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    for name in ["[\"z_effective\"]", "dual-only", "single-se", "backscatter-only"] {
        assert!(e.message().contains(name), "{name} not in {}", e.message());
    }
    assert!(!e.message().contains("demo-local-contrast ("), "demo models are not tried: {}", e.message());
    server.shutdown().await.unwrap();

    // "none": today's behaviour. Refused at the push by default; stored
    // (refuse_unreadable = false), it fails with a message that says why.
    let server = fallback_server(dir.path(), &models, "dual-only", Fallback::None, true).await;
    let e = push_kinds(&channel(&server).await, &[PlaneKind::SingleEnergy]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("analysis.fallback is \"none\""), "{}", e.message());
    server.shutdown().await.unwrap();
    let server = fallback_server(dir.path(), &models, "dual-only", Fallback::None, false).await;
    let ch = channel(&server).await;
    let receipt = push_kinds(&ch, &[PlaneKind::SingleEnergy]).await.unwrap();
    assert!(receipt.warnings[0].contains("cannot read this scan"), "{receipt:?}");
    let f = wait_analysed(&ch, &receipt.scan_id).await;
    assert_eq!(f.status, ScanStatus::Failed as i32);
    let r = &f.reports[0];
    assert!(r.aborted && r.fallback_from.is_empty());
    assert_eq!(r.algorithm.as_ref().unwrap().name, "dual-only");
    for part in [
        "the analysis model dual-only version 1",
        "cannot read this scan's planes [\"single_energy\"]",
        "it needs a high_energy plane for input channel 0",
        "analysis.fallback is \"none\"",
    ] {
        assert!(r.abort_reason.contains(part), "{part:?} not in {}", r.abort_reason);
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn auto_prefers_a_model_using_more_planes_and_a_list_is_tried_in_order() {
    use niix::model_choice::Fallback;
    let dir = tempfile::tempdir().unwrap();
    let models = models_for_fallback(dir.path());
    let dual = [PlaneKind::HighEnergy, PlaneKind::LowEnergy];
    // Both the dual-energy and the single-energy model read a dual-energy
    // scan; "auto" takes the one that uses both planes.
    let server = fallback_server(dir.path(), &models, "backscatter-only", Fallback::Auto, true).await;
    let ch = channel(&server).await;
    let receipt = push_kinds(&ch, &dual).await.unwrap();
    let r = &wait_analysed(&ch, &receipt.scan_id).await.reports[0];
    assert_eq!(
        (r.algorithm.as_ref().unwrap().name.as_str(), r.fallback_from.as_str()),
        ("dual-only", "backscatter-only")
    );
    server.shutdown().await.unwrap();
    // A list: the first serving model that reads the scan, demo or not.
    let list = Fallback::Models(vec!["nowhere".into(), "single-se".into(), "dual-only".into()]);
    let server = fallback_server(dir.path(), &models, "backscatter-only", list, true).await;
    let ch = channel(&server).await;
    let receipt = push_kinds(&ch, &dual).await.unwrap();
    let r = &wait_analysed(&ch, &receipt.scan_id).await.reports[0];
    assert_eq!(
        (r.algorithm.as_ref().unwrap().name.as_str(), r.fallback_from.as_str()),
        ("single-se", "backscatter-only")
    );
    // `niix findings` shows the model used and what it stands in for (run
    // off the runtime thread, which serves the server it asks).
    let findings = |extra: &'static [&'static str]| {
        let args = [
            vec!["findings".to_string(), receipt.scan_id.clone(), "--server".into(), format!("http://{}", server.addr)],
            extra.iter().map(|a| a.to_string()).collect(),
        ]
        .concat();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_niix")).args(&args).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap()
        })
    };
    let json = findings(&["--json"]).await.unwrap();
    let json: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(json["model"]["name"], "single-se");
    assert_eq!(json["model"]["fallback_from"], "backscatter-only");
    assert!(json["model"]["fallback_reason"].as_str().unwrap().contains("backscatter"), "{json}");
    let text = findings(&[]).await.unwrap();
    assert!(text.contains("model single-se version 1") && text.contains("in place of backscatter-only: "), "{text}");
    // A listed model that cannot read the scan either is named as tried.
    let e = push_kinds(&ch, &[PlaneKind::ZEffective]).await.unwrap_err();
    assert!(e.message().contains("tried nowhere (not serving), single-se ("), "{}", e.message());
    server.shutdown().await.unwrap();
}

/// Pushes a dual-energy scan of raw planes, `width x height`, with pixel
/// spacing `(x, y)` and `orientation`, to `ch`; its MACHINE report.
async fn push_raw_dual(
    ch: &tonic::transport::Channel,
    (high, low): (&[u16], &[u16]),
    (width, height): (u32, u32),
    (sx, sy): (f64, f64),
    orientation: Orientation,
) -> ThreatReport {
    let (high, low): (Vec<u8>, Vec<u8>) =
        (high.iter().flat_map(|v| v.to_le_bytes()).collect(), low.iter().flat_map(|v| v.to_le_bytes()).collect());
    let descriptor = |kind: PlaneKind, bytes: &[u8]| PlaneDescriptor {
        kind: kind as i32,
        pixel_spacing_x_mm: sx,
        pixel_spacing_y_mm: sy,
        ..plane(PlaneEncoding::RawU16le, width, height, bytes)
    };
    let mut h = header(&new_id(), descriptor(PlaneKind::HighEnergy, &high));
    h.planes.push(descriptor(PlaneKind::LowEnergy, &low));
    h.metadata.as_mut().unwrap().orientation = orientation as i32;
    push_messages(ch, messages(&h, &[&high, &low], 1 << 20)).await.unwrap();
    let f = wait_analysed(ch, &h.scan_id).await;
    assert_eq!(f.status, ScanStatus::Analyzed as i32, "{:?}", f.reports);
    f.reports.into_iter().find(|r| r.r#type == ReportType::Machine as i32).expect("a MACHINE report")
}

/// A scan stored across (the conveyance's length along x, as a portal
/// writes it) is analysed in the model's frame (length along y) and its
/// findings come back in its own: through the real server, the planes of a
/// tall scan transposed give the same score and the same regions with x and
/// y swapped, in pixels and in millimetres, whether the header says
/// LENGTH_ALONG_X or the longer side does. The model input is the same bit
/// for bit, so the figures are equal, not close; with the shipped model
/// this also runs its structure model, fitted for the tall size.
#[tokio::test(flavor = "multi_thread")]
async fn a_scan_stored_across_gives_the_same_findings_with_x_and_y_swapped() {
    let scan = niix_synth::generate(31, 2, &niix_synth::Options { anomaly_rate: 1.0, ..Default::default() });
    let (w, h) = (scan.info.width, scan.info.height);
    let across = |p: &[u16]| niix_inference::orientation::transpose(p, h as usize, w as usize);
    let (wide_high, wide_low) = (across(&scan.high), across(&scan.low));
    for model in ["cargo-patchcore", "demo-local-contrast"] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), Limits::default());
        cfg.analysis.model = Some(model.into());
        let server = niix::server::start(cfg).await.unwrap();
        let ch = channel(&server).await;
        let tall = push_raw_dual(&ch, (&scan.high, &scan.low), (w, h), (4.0, 5.0), Orientation::Unspecified).await;
        assert!(!tall.regions.is_empty(), "{model}: the reference scan has regions");
        for orientation in [Orientation::LengthAlongX, Orientation::Unspecified] {
            let wide = push_raw_dual(&ch, (&wide_high, &wide_low), (h, w), (5.0, 4.0), orientation).await;
            let what = format!("{model}, {orientation:?}");
            assert_eq!(algorithm_sha(&wide), algorithm_sha(&tall), "{what}");
            assert_eq!((wide.score, wide.decision), (tall.score, tall.decision), "{what}");
            assert_eq!(wide.regions.len(), tall.regions.len(), "{what}");
            for (a, b) in wide.regions.iter().zip(&tall.regions) {
                assert_eq!((a.id, a.x, a.y, a.width, a.height), (b.id, b.y, b.x, b.height, b.width), "{what}");
                assert_eq!((a.x_mm, a.y_mm, a.width_mm, a.height_mm), (b.y_mm, b.x_mm, b.height_mm, b.width_mm));
                assert_eq!((a.area_px, a.max_score, a.mean_score), (b.area_px, b.max_score, b.mean_score), "{what}");
            }
            assert_eq!(wide.anomaly_map_stride, tall.anomaly_map_stride);
        }
        server.shutdown().await.unwrap();
    }
}

fn algorithm_sha(r: &ThreatReport) -> &str {
    r.algorithm.as_ref().map_or("", |a| a.sha256.as_str())
}
