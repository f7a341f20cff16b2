//! gRPC conventions and the Open Inference Protocol as stock clients see
//! them (issue #27 items 5 and 8): grpcio-reflection, grpcio-health-checking,
//! gzip, grpcio-status rich error details and tritonclient, against a real
//! server. The Python side lives in tests/python/.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use niix::config::Limits;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::{GetScanRequest, PlaneDescriptor, PlaneEncoding, PlaneKind};
use tonic::codec::CompressionEncoding::Gzip;

/// The Python with the interop packages (`make pyenv`); `NIIX_PYTHON`
/// overrides it.
fn python_exe() -> PathBuf {
    std::env::var_os("NIIX_PYTHON").map(PathBuf::from).unwrap_or_else(python)
}

/// Runs a Python script of tests/python and parses the JSON line it prints last.
fn run_json(name: &str, args: &[&str]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(name);
    let out = Command::new(python_exe()).arg(&script).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}: {}\n{stdout}", script.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

// Multi-threaded: the test blocks on Python while the in-process server serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_python_clients_use_reflection_health_gzip_and_error_details() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(&dir.path().join("data"), Limits { max_concurrent_uploads: 1, ..Limits::default() }).await;
    let r = run_json("grpc_conventions.py", &[&server.addr.to_string()]);

    // grpcio-reflection speaks v1alpha only.
    let services = r["reflection"]["services"].as_array().unwrap();
    for s in [
        "niix.v1.ScanIngest",
        "niix.v1.Findings",
        "niix.v1.Exchange",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.iter().any(|x| x == s), "{s} not listed: {r}");
    }
    assert_eq!(r["reflection"]["push_input"], "niix.v1.PushScanRequest", "{r}");
    assert_eq!(r["reflection"]["health_file"], "grpc/health/v1/health.proto", "{r}");
    let one = r["reflection"]["one_stream"].as_array().unwrap();
    assert_eq!(one.len(), 3, "the stream goes on after an unknown symbol: {r}");
    assert_eq!(one[0]["kind"], "error_response");
    assert_eq!(one[0]["code"], tonic::Code::NotFound as i32);
    assert!(one[0]["message"].as_str().unwrap().contains("niix.v1.NoSuchService"), "{r}");
    assert_eq!(one[1]["kind"], "file_descriptor_response");
    assert_eq!(one[2]["kind"], "list_services_response");

    // Health: Watch on an unknown service answers and stays open.
    assert_eq!(r["health"]["server"], "SERVING");
    assert_eq!(r["health"]["unknown_watch_first"], "SERVICE_UNKNOWN");
    assert_eq!(r["health"]["unknown_watch_then"], "DEADLINE_EXCEEDED", "{r}");

    // Rich error details.
    let d = &r["details"];
    assert_eq!(d["bad_scan_id"]["code"], "INVALID_ARGUMENT");
    assert_eq!(d["bad_scan_id"]["bad_request"][0]["field"], "scan_id", "{r}");
    assert!(d["bad_scan_id"]["bad_request"][0]["description"].as_str().unwrap().contains("not a UUID"));
    assert_eq!(d["missing_scan"]["code"], "NOT_FOUND");
    assert_eq!(d["missing_scan"]["resource_info"]["resource_type"], "scan", "{r}");
    assert_eq!(d["missing_scan"]["resource_info"]["resource_name"], d["missing_id"]);
    assert_eq!(d["busy"]["code"], "RESOURCE_EXHAUSTED", "{r}");
    assert_eq!(d["busy"]["retry_info"], niix::error::RETRY_AFTER.as_secs_f64(), "{r}");
    assert_eq!(d["held_push_ok"], true);
    assert_eq!(d["after_busy"]["code"], "OK", "a retry after the slot is free succeeds: {r}");

    // gzip both ways: the pushed plane is stored as sent.
    let g = &r["gzip"];
    assert_eq!(g["receipt_id"], g["scan_id"]);
    assert_eq!(g["stored_id"], g["scan_id"]);
    assert_eq!(g["received_sha256"], g["sent_sha256"], "{r}");

    // The server compresses its answers for a client that accepts gzip, and
    // only for one that does.
    let ch = channel(&server).await;
    let ask = || GetScanRequest { scan_id: g["scan_id"].as_str().unwrap().into() };
    let zipped = FindingsClient::new(ch.clone()).accept_compressed(Gzip).get_scan(ask()).await.unwrap();
    assert_eq!(zipped.metadata().get("grpc-encoding").unwrap(), "gzip");
    assert_eq!(zipped.into_inner().scan.unwrap().scan_id, g["scan_id"].as_str().unwrap());
    let plain = FindingsClient::new(ch).get_scan(ask()).await.unwrap();
    assert!(plain.metadata().get("grpc-encoding").is_none());
    server.shutdown().await.unwrap();
}

/// A model repository with the demo model and `dual-only`, the same model
/// made to read dual-energy scans only (no single-energy fallback).
fn models_with_dual_only(dir: &Path) -> PathBuf {
    common::demo_model_variants(dir, &[("dual-only", r#"channels = ["high_energy", "low_energy"]"#)], true)
}

fn le_bytes(samples: &[u16]) -> Vec<u8> {
    samples.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn kind(mut p: PlaneDescriptor, kind: PlaneKind) -> PlaneDescriptor {
    p.kind = kind as i32;
    p
}

// Multi-threaded: the test blocks on Python while the in-process server serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_lists_models_and_analyses_planes_like_the_server_does() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("data"), Limits::default());
    cfg.models_dir = models_with_dual_only(dir.path());
    let server = niix::server::start(cfg).await.unwrap();
    let ch = channel(&server).await;

    // The same dual-energy planes, pushed and analysed by the server...
    let (w, h) = (640u32, 768u32);
    let block = (300, 400, 56, 44);
    let (high, low) =
        (le_bytes(&cargo_samples(w, h, Some(block), false)), le_bytes(&cargo_samples(w, h, Some(block), true)));
    let id = new_id();
    let mut hdr = header(&id, plane(PlaneEncoding::RawU16le, w, h, &high));
    hdr.planes.push(kind(plane(PlaneEncoding::RawU16le, w, h, &low), PlaneKind::LowEnergy));
    push_messages(&ch, messages(&hdr, &[&high, &low], 1 << 20)).await.unwrap();
    let findings = wait_analysed(&ch, &id).await;
    let report = &findings.reports[0];

    // ...and sent by tritonclient through ModelInfer.
    let (hp, lp) = (dir.path().join("high.raw"), dir.path().join("low.raw"));
    std::fs::write(&hp, &high).unwrap();
    std::fs::write(&lp, &low).unwrap();
    let args = [
        &server.addr.to_string(),
        "demo-local-contrast",
        &w.to_string(),
        &h.to_string(),
        hp.to_str().unwrap(),
        lp.to_str().unwrap(),
    ];
    let r = run_json("oip_client.py", &args.each_ref().map(|s| s.as_ref()));

    assert_eq!(
        (r["live"].clone(), r["ready"].clone(), r["model_ready"].clone()),
        (true.into(), true.into(), true.into()),
        "{r}"
    );
    assert_eq!(r["server"]["name"], "niix");
    let index = r["index"]["models"].as_array().unwrap();
    for name in ["demo-local-contrast", "dual-only"] {
        assert!(index.iter().any(|m| m["name"] == name && m["state"] == "READY"), "{name}: {r}");
    }
    let meta = &r["metadata"];
    let inputs: Vec<_> =
        meta["inputs"].as_array().unwrap().iter().map(|i| (i["name"].clone(), i["datatype"].clone())).collect();
    assert_eq!(inputs, vec![("high_energy".into(), "UINT16".into()), ("low_energy".into(), "UINT16".into())], "{r}");
    let outputs: Vec<_> = meta["outputs"].as_array().unwrap().iter().map(|o| o["name"].clone()).collect();
    assert_eq!(outputs, vec!["anomaly_map", "score", "alarm", "regions"]);

    let infer = &r["infer"];
    assert_eq!(infer["model_version"], "1");
    let score = infer["score"].as_f64().unwrap();
    assert!((score - f64::from(report.score)).abs() < 1e-6, "ModelInfer {score} vs analysis {}", report.score);
    assert_eq!(infer["alarm"], true, "the dense block alarms: {r}");
    let regions = infer["regions"].as_array().unwrap();
    assert_eq!(regions.len(), report.regions.len(), "{r}");
    for (got, want) in regions.iter().zip(&report.regions) {
        let got: Vec<f64> = got.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(&got[..4], &[want.x, want.y, want.width, want.height].map(f64::from), "{r}");
        assert!((got[4] - f64::from(want.max_score)).abs() < 1e-6);
    }
    let stride = infer["stride"].as_u64().unwrap();
    assert_eq!(
        infer["map_shape"],
        serde_json::json!([u64::from(h).div_ceil(stride), u64::from(w).div_ceil(stride)]),
        "{r}"
    );
    assert_eq!(r["only_score"], serde_json::json!(["score"]));

    // Refusals name what to fix.
    assert!(r["missing_plane"]["code"].as_str().unwrap().contains("INVALID_ARGUMENT"), "{r}");
    assert!(r["missing_plane"]["message"].as_str().unwrap().contains("low_energy"), "{r}");
    assert!(r["float_plane"]["code"].as_str().unwrap().contains("INVALID_ARGUMENT"), "{r}");
    assert!(r["float_plane"]["message"].as_str().unwrap().contains("UINT16"), "{r}");
    assert!(r["unknown_model"]["code"].as_str().unwrap().contains("NOT_FOUND"), "{r}");
    assert!(r["unknown_output"]["code"].as_str().unwrap().contains("INVALID_ARGUMENT"), "{r}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn ingest_refuses_or_warns_about_a_scan_the_serving_model_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let models = models_with_dual_only(dir.path());
    let (w, h) = (64u32, 32u32);
    let high = le_bytes(&cargo_samples(w, h, None, false));
    for refuse in [true, false] {
        let mut cfg = config(&dir.path().join(format!("data-{refuse}")), Limits::default());
        cfg.models_dir = models.clone();
        cfg.analysis.model = Some("dual-only".into());
        cfg.analysis.refuse_unreadable = refuse;
        let server = niix::server::start(cfg).await.unwrap();
        let ch = channel(&server).await;
        let id = new_id();
        // A high-energy plane alone: dual-only needs a low-energy one too.
        let pushed =
            push_messages(&ch, messages(&header(&id, plane(PlaneEncoding::RawU16le, w, h, &high)), &[&high], 1 << 20))
                .await;
        let stored = FindingsClient::new(ch.clone()).get_scan(GetScanRequest { scan_id: id.clone() }).await;
        if refuse {
            let e = pushed.unwrap_err();
            assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
            assert!(e.message().contains("dual-only") && e.message().contains("low_energy"), "{}", e.message());
            assert_eq!(stored.unwrap_err().code(), tonic::Code::NotFound, "nothing of a refused scan is stored");
        } else {
            let receipt = pushed.unwrap();
            assert_eq!(receipt.warnings.len(), 1, "{receipt:?}");
            assert!(receipt.warnings[0].contains("cannot read this scan"), "{receipt:?}");
            assert_eq!(stored.unwrap().into_inner().scan.unwrap().scan_id, id);
        }
        // A dual-energy scan is read either way.
        let id = new_id();
        let mut hdr = header(&id, plane(PlaneEncoding::RawU16le, w, h, &high));
        hdr.planes.push(kind(plane(PlaneEncoding::RawU16le, w, h, &high), PlaneKind::LowEnergy));
        let receipt = push_messages(&ch, messages(&hdr, &[&high, &high], 1 << 20)).await.unwrap();
        assert!(receipt.warnings.is_empty());
        server.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn a_gzip_message_that_inflates_past_the_limit_is_refused_while_decompressing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data")).await;
    let ch = channel(&server).await;
    // 8 MiB of one letter: a few KiB on the wire, twice the 4 MiB limit inflated.
    let bomb = GetScanRequest { scan_id: "a".repeat(8 << 20) };
    let e = FindingsClient::new(ch.clone()).send_compressed(Gzip).get_scan(bomb).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("decompressing"), "{}", e.message());
    // The connection and the server go on.
    let small = GetScanRequest { scan_id: new_id() };
    let e = FindingsClient::new(ch).send_compressed(Gzip).get_scan(small).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn model_infer_holds_planes_to_the_ingest_limits() {
    use niix_proto::oip::grpc_inference_service_client::GrpcInferenceServiceClient;
    use niix_proto::oip::model_infer_request::InferInputTensor;
    use niix_proto::oip::{InferTensorContents, ModelInferRequest};
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(&dir.path().join("data"), Limits { max_dimension: 100, ..Limits::default() }).await;
    let mut oip = GrpcInferenceServiceClient::new(channel(&server).await);
    let request = |w: i64, h: i64| ModelInferRequest {
        model_name: "demo-local-contrast".into(),
        inputs: vec![InferInputTensor {
            name: "high_energy".into(),
            datatype: "UINT16".into(),
            shape: vec![h, w],
            contents: Some(InferTensorContents { uint_contents: vec![30000; (w * h) as usize], ..Default::default() }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let e = oip.model_infer(request(128, 64)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("limit of 100 pixels per side"), "{}", e.message());
    // Within the limits, in typed contents rather than raw bytes: analysed.
    let ok = oip.model_infer(request(96, 64)).await.unwrap().into_inner();
    assert_eq!(ok.outputs.len(), 4);
    assert_eq!(ok.raw_output_contents[1].len(), 4, "one FP32 score");
    server.shutdown().await.unwrap();
}
