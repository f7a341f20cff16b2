//! What outside clients and toolkits see (issue #27): Python grpcio stubs
//! generated from proto/, the DICOS toolkit (pydicos) and pydicom, against a
//! real server. The Python side lives in tests/python/ and fixtures/dicos/.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use niix::config::Limits;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::scan_ingest_client::ScanIngestClient;
use niix_proto::v1::{
    AdjudicateRequest, ExportTdrRequest, GetUploadStatusRequest, PlaneEncoding, PlaneKind, PushScanRequest,
    RegionVerdict, ReportType, Scanner,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The Python with the interop packages (`make pyenv`); `NIIX_PYTHON`
/// overrides it.
fn python_exe() -> PathBuf {
    std::env::var_os("NIIX_PYTHON").map(PathBuf::from).unwrap_or_else(python)
}

/// The repository root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a Python script and parses the JSON it prints.
fn run_json(script: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(python_exe()).arg(script).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}: {}\n{stdout}", script.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(name)
}

/// A raw scan plane of `cargo_samples` (a dense block the demo model flags).
fn cargo_raw(w: u32, h: u32, block: Option<(u32, u32, u32, u32)>) -> Vec<u8> {
    cargo_samples(w, h, block, false).iter().flat_map(|v| v.to_le_bytes()).collect()
}

async fn metrics_text(server: &niix::server::RunningServer) -> String {
    let mut conn = tokio::net::TcpStream::connect(server.metrics_addr.unwrap()).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).await.unwrap();
    text
}

fn png_size(bytes: &[u8]) -> (u32, u32) {
    let info = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
    (info.info().width, info.info().height)
}

// Multi-threaded: the test blocks on Python and the CLI while the in-process server serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlays_of_a_noisy_2048x6144_scan_fit_stock_clients() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data")).await;
    let ch = channel(&server).await;
    let (w, h) = (2048, 6144);
    let raw = raw_bytes(w, h, 7);
    let id = new_id();
    push_messages(&ch, messages(&header(&id, plane(PlaneEncoding::RawU16le, w, h, &raw)), &[&raw], 1 << 20))
        .await
        .unwrap();

    // Python grpcio, default channel options (4 MiB receive limit), default request.
    let out_png = dir.path().join("python.png");
    let target = server.addr.to_string();
    let r = run_json(&script("overlay.py"), &[&target, &id, out_png.to_str().unwrap()]);
    assert_eq!(r["ok"], true, "{r}");
    let bytes = r["bytes"].as_u64().unwrap() as usize;
    assert!(bytes <= niix::findings::MAX_OVERLAY_PNG_BYTES, "{r}");
    assert!(r["message_bytes"].as_u64().unwrap() as usize <= niix_proto::MAX_MESSAGE_BYTES, "{r}");
    assert_eq!(r["signature_ok"], true);
    assert_eq!((r["png_width"].clone(), r["png_height"].clone()), (r["width"].clone(), r["height"].clone()));
    // 1600 px wide would be ~12 MB of noise: narrower, aspect ratio kept, still useful.
    assert_eq!(r["shrunk_to_fit"], true, "{r}");
    let width = r["width"].as_u64().unwrap();
    assert!((300..1600).contains(&width), "{r}");
    let height = r["height"].as_u64().unwrap();
    assert!((height as f64 / width as f64 - 3.0).abs() < 0.02, "{r}");
    assert_eq!(png_size(&std::fs::read(&out_png).unwrap()), (width as u32, height as u32));

    // `niix overlay` with its defaults.
    let cli_png = dir.path().join("cli.png");
    let out = Command::new(env!("CARGO_BIN_EXE_niix"))
        .args(["overlay", &id, "-o", cli_png.to_str().unwrap(), "--server", &format!("http://{target}")])
        .env("NIIX_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("narrower than --max-width 1600"));
    let png = std::fs::read(&cli_png).unwrap();
    assert!(png.len() <= niix::findings::MAX_OVERLAY_PNG_BYTES);
    assert_eq!(png_size(&png), (width as u32, height as u32), "the same rendering for every client");

    // A width that fits is kept as asked.
    let small = FindingsClient::new(ch.clone())
        .render_overlay(niix_proto::v1::RenderOverlayRequest {
            scan_id: id.clone(),
            max_width: 256,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((small.width, small.height, small.shrunk_to_fit), (256, 768, false));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_chunk_of_the_documented_maximum_is_taken_and_one_byte_more_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let ch = channel(&server).await;
    let max = niix_proto::MAX_CHUNK_DATA;
    assert_eq!(max, 4_194_277, "docs/protocol.md and ingest.proto state this number");
    let raw = raw_bytes(1500, 1500, 3);
    let push = |data: &[u8]| {
        let id = new_id();
        let mut msgs = messages(&header(&id, plane(PlaneEncoding::RawU16le, 1500, 1500, &raw)), &[], 1);
        msgs.push(chunk_msg(0, 0, data));
        (id, msgs)
    };

    // The largest chunk is taken: the stream then ends early, with its bytes held for a resume.
    let (id, msgs) = push(&raw[..max]);
    let err = push_messages(&ch, msgs).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss, "{}", err.message());
    let status = ScanIngestClient::new(ch.clone())
        .get_upload_status(GetUploadStatusRequest { scan_id: id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.planes[0].received_bytes, max as u64);

    // One byte more is refused, and the message says the limit.
    let (_, msgs) = push(&raw[..max + 1]);
    let err = push_messages(&ch, msgs).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{}", err.message());
    assert!(err.message().contains("at most 4194277 data bytes"), "{}", err.message());
    assert!(err.message().contains("this one has 4194278"), "{}", err.message());
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_tdrs_pass_the_dicos_toolkit_and_pydicom_without_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data")).await;
    let ch = channel(&server).await;
    let mut c = FindingsClient::new(ch.clone());

    // A DICOS DX with a dense block (an ALARM with regions), with long scanner
    // strings that must be cut to their value representations.
    let dx = dir.path().join("scan.dcs");
    let study = "1.2.826.0.1.3680043.8.498.777";
    run_python(
        "dicos/make_dx.py",
        &[
            dx.to_str().unwrap(),
            "--width",
            "400",
            "--height",
            "300",
            "--block",
            "200",
            "100",
            "48",
            "40",
            "--rle",
            "--uid",
            "1.2.826.0.1.3680043.8.498.778",
            "--study-uid",
            study,
        ],
    );
    let d = niix::client::describe_plane(&dx, PlaneKind::HighEnergy, &Default::default()).unwrap();
    let bytes = std::fs::read(&dx).unwrap();
    let alarm = new_id();
    let mut h = header(&alarm, d);
    let m = h.metadata.as_mut().unwrap();
    m.lane_id = "LANE-0000000000000017".into();
    m.scanner = Some(Scanner {
        manufacturer: format!("Acme\\Imaging {}", "x".repeat(80)),
        model: "M60".into(),
        serial_number: "SN-1".into(),
        software_version: "4.2".into(),
    });
    push_messages(&ch, messages(&h, &[&bytes], 1 << 16)).await.unwrap();
    // A raw scan of open cargo: CLEAR, no regions, no DX study.
    let raw = cargo_raw(256, 128, None);
    let clear = new_id();
    push_messages(&ch, messages(&header(&clear, plane(PlaneEncoding::RawU16le, 256, 128, &raw)), &[&raw], 1 << 16))
        .await
        .unwrap();

    let machine = wait_analysed(&ch, &alarm).await.reports[0].clone();
    assert!(!machine.regions.is_empty(), "{machine:?}");
    wait_analysed(&ch, &clear).await;
    let region = RegionVerdict { region_id: machine.regions[0].id, verdict: 2, comment: "a pallet".into() };
    c.adjudicate(AdjudicateRequest {
        scan_id: alarm.clone(),
        verdict: 2,
        regions: vec![region],
        officer_id: "officer.with.a.long.id@customs.example".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    let cases = [
        (&alarm, ReportType::Machine, machine.regions.len()),
        (&alarm, ReportType::Operator, machine.regions.len()),
        (&clear, ReportType::Machine, 0),
    ];
    for (id, kind, regions) in cases {
        let tdr =
            c.export_tdr(ExportTdrRequest { scan_id: id.to_string(), report: kind as i32 }).await.unwrap().into_inner();
        let path = dir.path().join(format!("{id}-{}.dcs", kind.as_str_name()));
        std::fs::write(&path, &tdr.dicos).unwrap();
        let r = run_json(&repo().join("fixtures/dicos/check_tdr.py"), &[path.to_str().unwrap()]);
        let (toolkit, pydicom) = (&r["toolkit"], &r["pydicom"]);
        assert_eq!(toolkit["read"], true, "{kind:?}: {}", toolkit["log"]);
        assert_eq!(
            (toolkit["errors"].as_u64(), toolkit["warnings"].as_u64()),
            (Some(0), Some(0)),
            "{}",
            toolkit["log"]
        );
        assert_eq!(toolkit["loader"], "TDRLoader");
        assert_eq!(pydicom["warnings"], serde_json::json!([]), "{kind:?}");
        assert_eq!(pydicom["meta_dicos_version"], "V03");
        assert_eq!(toolkit["ptos"].as_array().unwrap().len(), regions);
        let want_study = if id == &alarm { study.to_string() } else { niix::tdr::uid_from_uuid(id.parse().unwrap()) };
        assert_eq!(pydicom["study_instance_uid"], want_study.as_str(), "the report joins its image's study");
        assert_eq!(toolkit["scan_instance_uid"], want_study.as_str());
        assert_eq!(toolkit["ooi_id"], "CSQU3054383");
        if regions > 0 {
            assert_eq!(toolkit["ptos"][0]["id"], machine.regions[0].id);
            let (p, g) = (&pydicom["ptos"][0], &machine.regions[0]);
            assert_eq!(p["base"], serde_json::json!([g.x as f64, g.y as f64]));
            assert_eq!(p["extent"], serde_json::json!([g.width as f64, g.height as f64]));
        }
        if kind == ReportType::Machine {
            let algorithm = pydicom["algorithm"].as_array().unwrap().clone();
            assert!(algorithm.iter().all(|v| v.as_str().unwrap().chars().count() <= 64), "{algorithm:?}");
            let sha256 = &machine.algorithm.as_ref().unwrap().sha256;
            assert_eq!(algorithm[2], format!("sha256={}", &sha256[..56]).as_str());
            assert_eq!(toolkit["atr_parameters"]["sha256"], &sha256[..56]);
        }
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_clients_meet_the_same_validation_and_normalisation_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let ch = channel(&server).await;
    let raw = cargo_raw(256, 128, Some((100, 40, 40, 30)));
    let id = new_id();
    push_messages(&ch, messages(&header(&id, plane(PlaneEncoding::RawU16le, 256, 128, &raw)), &[&raw], 1 << 16))
        .await
        .unwrap();
    // A second scan, so that a listing has a second page.
    let other = cargo_raw(64, 32, None);
    push_messages(
        &ch,
        messages(&header(&new_id(), plane(PlaneEncoding::RawU16le, 64, 32, &other)), &[&other], 1 << 16),
    )
    .await
    .unwrap();
    let machine = wait_analysed(&ch, &id).await.reports[0].clone();
    let region = machine.regions[0].id.to_string();
    let r = run_json(&script("validation.py"), &[&server.addr.to_string(), &id, &region]);

    let refused = |key: &str, needle: &str| {
        assert_eq!(r[key]["code"], "INVALID_ARGUMENT", "{key}: {}", r[key]);
        assert!(r[key]["message"].as_str().unwrap().contains(needle), "{key}: {}", r[key]);
    };
    refused("unspecified_region_verdict", "verdict is required");
    refused("conflicting_region_verdicts", "given more than once");
    assert_eq!(r["one_region_verdict"]["value"], "REPORT_TYPE_OPERATOR");
    // Container numbers: upper-cased and checked, like ingest.
    assert_eq!(r["lowercase_container"]["value"].as_array().unwrap().len(), 2, "{}", r["lowercase_container"]);
    assert_eq!(r["uppercase_container"]["value"], r["lowercase_container"]["value"]);
    refused("bad_check_digit", "check digit");
    // A page token continues only the listing it came from.
    assert_eq!(r["token_same_filters"]["code"], "OK", "{}", r["token_same_filters"]);
    refused("token_other_filters", "different filters");
    // Scan ids are case-insensitive and answered in lower case.
    assert_eq!(r["uppercase_get"]["value"], id.as_str());
    let pushed = &r["pushed"];
    let sent = pushed["sent_id"].as_str().unwrap();
    assert_ne!(sent, sent.to_lowercase());
    assert_eq!(pushed["receipt_id"], sent.to_lowercase().as_str());
    assert_eq!(pushed["stored_id"], pushed["receipt_id"]);
    assert_eq!(pushed["containers"], serde_json::json!(["MSKU9070323"]));
    assert_eq!(pushed["site"], "NLRTM-01");
    // Without scan_time the scan is placed by its received time.
    assert_eq!(pushed["has_scan_time"], false);
    assert_eq!(r["found_by_received_time"]["value"], serde_json::json!([pushed["receipt_id"]]));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_of_scans_with_large_headers_fit_stock_clients() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let ch = channel(&server).await;
    // 80 scans with 60 KB of remarks each: 4.8 MB, more than one 4 MiB response.
    let raw = cargo_raw(16, 8, None);
    let mut pushed = Vec::new();
    for _ in 0..80 {
        let id = new_id();
        let mut h = header(&id, plane(PlaneEncoding::RawU16le, 16, 8, &raw));
        h.metadata.as_mut().unwrap().remarks = "r".repeat(60_000);
        push_messages(&ch, messages(&h, &[&raw], 1 << 16)).await.unwrap();
        pushed.push(id);
    }
    let r = run_json(&script("pages.py"), &[&server.addr.to_string()]);
    let pages: Vec<u64> = r["pages"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(pages.len() >= 2 && pages.iter().all(|&n| n > 0), "{pages:?}");
    let mut ids: Vec<String> = r["ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 80, "none missed or repeated: {pages:?}");
    ids.sort();
    pushed.sort();
    assert_eq!(ids, pushed);
    server.shutdown().await.unwrap();
}

/// A push that sends its header and one chunk, then waits (the sender is
/// returned so the stream stays open).
fn hanging_push(
    ch: &tonic::transport::Channel,
    timeout: Option<Duration>,
) -> (String, tokio::sync::mpsc::Sender<PushScanRequest>, tokio::task::JoinHandle<Result<(), tonic::Status>>) {
    let raw = raw_bytes(64, 64, 1);
    let id = new_id();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let first = messages(&header(&id, plane(PlaneEncoding::RawU16le, 64, 64, &raw)), &[&raw[..1024]], 1024);
    for m in first {
        tx.try_send(m).unwrap();
    }
    let mut client = ScanIngestClient::new(ch.clone());
    let task = tokio::spawn(async move {
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(t) = timeout {
            request.set_timeout(t);
        }
        client.push_scan(request).await.map(drop)
    });
    (id, tx, task)
}

async fn wait_active(ch: &tonic::transport::Channel, id: &str) {
    let mut client = ScanIngestClient::new(ch.clone());
    for _ in 0..200 {
        let s = client.get_upload_status(GetUploadStatusRequest { scan_id: id.into() }).await.unwrap().into_inner();
        if s.active {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("push {id} never became active");
}

async fn wait_gauge_zero(server: &niix::server::RunningServer) -> String {
    let mut text = String::new();
    for _ in 0..100 {
        text = metrics_text(server).await;
        if text.lines().any(|l| l == "niix_uploads_active 0") {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("niix_uploads_active did not return to 0:\n{text}");
}

#[tokio::test]
async fn uploads_active_returns_to_zero_after_cancelled_and_timed_out_pushes() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), Limits { max_concurrent_uploads: 2, ..Limits::default() }).await;
    let ch = channel(&server).await;

    // Both slots taken: one push runs into its deadline, one is cancelled.
    let (a, _keep_a, timed_out) = hanging_push(&ch, Some(Duration::from_millis(600)));
    let (b, _keep_b, cancelled) = hanging_push(&ch, None);
    wait_active(&ch, &a).await;
    wait_active(&ch, &b).await;
    assert!(metrics_text(&server).await.lines().any(|l| l == "niix_uploads_active 2"));
    cancelled.abort();
    let err = timed_out.await.unwrap().unwrap_err();
    assert!(matches!(err.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{err:?}");
    // A third, cancelled too.
    let (c, _keep_c, third) = hanging_push(&ch, None);
    wait_active(&ch, &c).await;
    third.abort();

    wait_gauge_zero(&server).await;
    // Both slots are free again: two pushes at once go through.
    let raw = raw_bytes(32, 32, 2);
    let one =
        push_messages(&ch, messages(&header(&new_id(), plane(PlaneEncoding::RawU16le, 32, 32, &raw)), &[&raw], 512));
    let two =
        push_messages(&ch, messages(&header(&new_id(), plane(PlaneEncoding::RawU16le, 32, 32, &raw)), &[&raw], 512));
    let (one, two) = tokio::join!(one, two);
    one.unwrap();
    two.unwrap();
    wait_gauge_zero(&server).await;
    server.shutdown().await.unwrap();
}

/// The Python quick start of docs/protocol.md, run verbatim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_quick_start_in_the_protocol_doc_runs() {
    let doc = std::fs::read_to_string(repo().join("docs/protocol.md")).unwrap();
    let marker = doc.find("<!-- quickstart -->").expect("the quick start is marked in docs/protocol.md");
    let block = &doc[marker..];
    let code_start = block.find("```python\n").unwrap() + "```python\n".len();
    let code = &block[code_start..code_start + block[code_start..].find("```").unwrap()];

    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data")).await;
    let file = dir.path().join("quickstart.py");
    std::fs::write(&file, code).unwrap();
    let out = Command::new(python_exe())
        .arg(&file)
        .current_dir(repo())
        .env("NIIX_SERVER", format!("http://{}", server.addr))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("stored, sha256 "), "{stdout}");
    assert!(stdout.contains("ANALYZED: ALARM"), "{stdout}");
    assert!(stdout.contains("region 1 at"), "{stdout}");
    server.shutdown().await.unwrap();
}

/// Reports the live tests do not reach: failed analyses (ABORT), a scan
/// without scan_time or container number, an officer with a short id.
#[test]
fn aborted_and_sparse_reports_pass_the_dicos_toolkit_too() {
    use niix::store::{PlaneDigest, ScanRecord};
    use niix_proto::v1::{AlarmDecision, Algorithm, ScanHeader, ScanMetadata, ScanStatus, ThreatReport};

    let dir = tempfile::tempdir().unwrap();
    let raw = raw_bytes(64, 32, 5);
    let record = ScanRecord {
        scan_id: new_id(),
        header: ScanHeader {
            scan_id: String::new(),
            metadata: Some(ScanMetadata {
                site_id: "NLRTM-01".into(),
                vehicle_plate: "AB-123-C".into(),
                ..Default::default()
            }),
            planes: vec![plane(PlaneEncoding::RawU16le, 64, 32, &raw)],
        },
        planes: vec![PlaneDigest::full(sha256(&raw), raw.len() as u64)],
        header_sha256: String::new(),
        status: ScanStatus::Failed,
        received_at: std::time::SystemTime::now(),
        decision: 0,
        score: None,
        origin: String::new(),
    };
    let algorithm = Algorithm {
        name: "demo-local-contrast".into(),
        version: "1".into(),
        sha256: "ab".repeat(32),
        ..Default::default()
    };
    let aborted = |reason: &str| ThreatReport {
        r#type: ReportType::Machine as i32,
        decision: AlarmDecision::Unknown as i32,
        decision_time: Some(prost_types::Timestamp { seconds: 1_790_000_000, nanos: 0 }),
        aborted: true,
        abort_reason: reason.into(),
        processing_seconds: 30.0,
        algorithm: Some(algorithm.clone()),
        ..Default::default()
    };
    let operator = ThreatReport {
        r#type: ReportType::Operator as i32,
        decision: AlarmDecision::Clear as i32,
        decision_time: Some(prost_types::Timestamp { seconds: 1_790_000_100, nanos: 0 }),
        operator_id: "NL-7".into(),
        verdict: 2,
        ..Default::default()
    };
    let image =
        niix::tdr::ImageRef { sop_instance_uid: niix::tdr::plane_instance_uid(&record, 0, None), ..Default::default() };
    let cases = [
        (aborted("the analysis timed out after 30 s"), "TIMEOUT"),
        (aborted("plane 0 cannot be decoded: not a decodable TIFF"), "UNKNOWN_DATATYPE"),
        (operator, ""),
    ];
    for (i, (report, reason)) in cases.iter().enumerate() {
        let (bytes, _) = niix::tdr::export(&record, report, i, &image).unwrap();
        let path = dir.path().join(format!("{i}.dcs"));
        std::fs::write(&path, &bytes).unwrap();
        let r = run_json(&repo().join("fixtures/dicos/check_tdr.py"), &[path.to_str().unwrap()]);
        let (toolkit, pydicom) = (&r["toolkit"], &r["pydicom"]);
        assert_eq!(toolkit["read"], true, "{i}: {}", toolkit["log"]);
        assert_eq!(
            (toolkit["errors"].as_u64(), toolkit["warnings"].as_u64()),
            (Some(0), Some(0)),
            "{}",
            toolkit["log"]
        );
        assert_eq!(pydicom["warnings"], serde_json::json!([]), "{i}");
        assert_eq!(toolkit["ooi_id"], "AB-123-C");
        assert_eq!(pydicom["abort_reason"], *reason, "{i}");
    }
}

/// Issue #27, item 4: a DICOS DX plane in every transfer syntax the issue
/// names, written by outside encoders (the DICOS toolkit's default JPEG
/// Lossless, pydicom with CharLS, OpenJPEG and its own RLE and deflate,
/// libjpeg-turbo for JPEG Lossless with predictors 7 and 1), is described by
/// `niix push`'s probe, ingested and analysed by the real server, and
/// decodes to the source samples exactly. Lossy syntaxes, lossy streams in a
/// lossless syntax, a codestream whose size disagrees with Rows and Columns,
/// and the toolkit's CT volume are refused with INVALID_ARGUMENT and a
/// message that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dicos_in_every_lossless_syntax_decodes_exactly_and_lossy_or_ct_is_refused() {
    use niix_inference::decode::{DecodeError, DecodeLimits, Encoding, decode_rows};
    use niix_proto::v1::ScanStatus;
    use std::io::Cursor;

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("syntaxes");
    let m = run_json(&repo().join("fixtures/dicos/make_syntaxes.py"), &[out.to_str().unwrap()]);
    let (w, h) = (m["width"].as_u64().unwrap() as u32, m["height"].as_u64().unwrap() as u32);
    let source: Vec<u16> = std::fs::read(out.join("source.u16"))
        .unwrap()
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    assert_eq!(source.len(), (w * h) as usize);
    let files = m["files"].as_object().unwrap();
    let exact: Vec<&str> =
        files.values().filter(|f| f["expect"] == "exact").map(|f| f["ts"].as_str().unwrap()).collect();
    let named = ["1.2", "1.2.1", "1.2.1.99", "1.2.5", "1.2.4.57", "1.2.4.70", "1.2.4.80", "1.2.4.90"];
    for ts in named.map(|s| format!("1.2.840.10008.{s}")) {
        assert!(exact.contains(&ts.as_str()), "no file in {ts}: {exact:?}");
    }
    assert_eq!(files["pydicos"]["ts"], "1.2.840.10008.1.2.4.70", "the DICOS toolkit's default syntax");

    let server = start(&dir.path().join("data")).await;
    let ch = channel(&server).await;
    for (name, f) in files {
        let (path, ts) = (Path::new(f["path"].as_str().unwrap()), f["ts"].as_str().unwrap());
        let bytes = std::fs::read(path).unwrap();
        let id = new_id();
        if f["expect"] == "exact" {
            let (_, samples) =
                niix_inference::dicos::decode(Cursor::new(&bytes)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(samples == source, "{name} ({ts}) does not decode to the source samples");
            let d = niix::client::describe_plane(path, PlaneKind::HighEnergy, &Default::default())
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert_eq!((d.width, d.height, d.bits_stored), (w, h, 16), "{name}");
            push_messages(&ch, messages(&header(&id, d), &[&bytes], 1 << 16))
                .await
                .unwrap_or_else(|e| panic!("{name} ({ts}): {}", e.message()));
            let f = wait_analysed(&ch, &id).await;
            assert_eq!(f.status, ScanStatus::Analyzed as i32, "{name} ({ts}): {f:?}");
        } else {
            // As a client that does not probe the file would describe it;
            // the size lie as the object itself declares it (64x96).
            let (dw, dh) = if name == "j2k-size-lie" { (h, w) } else { (w, h) };
            let d = plane(PlaneEncoding::Dicos, dw, dh, &bytes);
            let err = push_messages(&ch, messages(&header(&id, d), &[&bytes], 1 << 16)).await.unwrap_err();
            let want = match name.as_str() {
                "ct" => "a DICOS CT Image, a CT volume: niix analyses DICOS DX projection images only",
                "j2k-size-lie" => "codestream is 96x64 pixels but the object's Columns and Rows say 64x96",
                _ => "niix refuses lossy pixel data, because an analysis of pixels a codec has altered is not evidence",
            };
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {}", err.message());
            assert!(err.message().contains(want), "{name} ({ts}): {}", err.message());
            if !name.ends_with("-as-lossless") && name != "j2k-size-lie" {
                // The transfer syntax (or SOP class) alone refuses it: niix
                // push says so before sending a byte.
                let err = niix::client::describe_plane(path, PlaneKind::HighEnergy, &Default::default()).unwrap_err();
                assert!(format!("{err:#}").contains(want), "{name}: {err:#}");
            }
        }
    }
    let lossy = std::fs::read(files["jpeg-baseline"]["path"].as_str().unwrap()).unwrap();
    let err = niix_inference::dicos::probe(Cursor::new(lossy)).unwrap_err();
    assert!(err.to_string().contains("transfer syntax 1.2.840.10008.1.2.4.50 (JPEG Baseline (Process 1)) is lossy"));

    // A compressed frame is decoded whole: over the whole-frame budget it is
    // refused from the object's attributes, before a byte of it is read.
    let toolkit = std::fs::read(files["pydicos"]["path"].as_str().unwrap()).unwrap();
    let small = DecodeLimits { max_frame_pixels: u64::from(w * h) - 1, ..Default::default() };
    let err = decode_rows(Cursor::new(&toolkit), Encoding::Dicos, w, h, &small, |_, _| panic!("no row")).unwrap_err();
    assert!(matches!(err, DecodeError::TooLarge(ref m) if m.contains("pixel limit for compressed frames")), "{err}");
    server.shutdown().await.unwrap();
}
