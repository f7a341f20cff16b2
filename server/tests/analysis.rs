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
