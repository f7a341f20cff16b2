//! gRPC conventions and the Open Inference Protocol as stock clients see
//! them (issue #27 items 5 and 8): grpcio-reflection, grpcio-health-checking,
//! gzip, grpcio-status rich error details and tritonclient, against a real
//! server. The Python side lives in tests/python/.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use niix::config::Limits;
use niix_proto::v1::GetScanRequest;
use niix_proto::v1::findings_client::FindingsClient;
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
