//! The standard gRPC services and the metrics endpoint, asked by real clients.

mod common;

use common::*;
use niix_proto::v1::PlaneEncoding;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn health_answers_for_the_server_and_each_service() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut health = HealthClient::new(channel(&server).await);
    for service in ["", "niix.v1.ScanIngest", "niix.v1.Findings"] {
        let r = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let err = health.check(HealthCheckRequest { service: "nope.Service".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    server.shutdown().await.unwrap();
}

async fn reflect(server: &niix::server::RunningServer, req: MessageRequest) -> MessageResponse {
    let mut client = ServerReflectionClient::new(channel(server).await);
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(req) };
    let mut stream = client.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    stream.next().await.unwrap().unwrap().message_response.unwrap()
}

#[tokio::test]
async fn reflection_lists_and_describes_the_services() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let MessageResponse::ListServicesResponse(list) =
        reflect(&server, MessageRequest::ListServices(String::new())).await
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in ["niix.v1.ScanIngest", "niix.v1.Findings", "grpc.health.v1.Health"] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    let MessageResponse::FileDescriptorResponse(files) =
        reflect(&server, MessageRequest::FileContainingSymbol("niix.v1.ScanIngest".into())).await
    else {
        panic!("expected file descriptors");
    };
    use prost::Message;
    let names: Vec<String> = files
        .file_descriptor_proto
        .iter()
        .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).unwrap().name().to_string())
        .collect();
    assert!(names.contains(&"niix/v1/ingest.proto".to_string()), "{names:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn metrics_count_scans_bytes_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let ch = channel(&server).await;
    let raw = raw_bytes(16, 16, 1);
    push_messages(&ch, messages(&header(&new_id(), plane(PlaneEncoding::RawU16le, 16, 16, &raw)), &[&raw], 100))
        .await
        .unwrap();
    push_messages(&ch, vec![]).await.unwrap_err();

    let mut conn = tokio::net::TcpStream::connect(server.metrics_addr.unwrap()).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"), "{text}");
    for needle in [
        "niix_scans_received_total{duplicate=\"false\"} 1",
        &format!("niix_ingest_bytes_total {}", raw.len()),
        "niix_request_errors_total{rpc=\"PushScan\",code=\"InvalidArgument\"} 1",
        "niix_upload_duration_seconds_count 1",
    ] {
        assert!(text.contains(needle), "{needle} not in\n{text}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn every_call_is_audited_and_the_chain_verifies_until_tampered() {
    let dir = tempfile::tempdir().unwrap();
    let config_file = dir.path().join("niix.toml");
    let config_text = "shutdown_grace = \"500ms\"\n[limits]\nmax_planes = 4\n";
    std::fs::write(&config_file, config_text).unwrap();
    let loaded = niix::config::Config::load(Some(&config_file)).unwrap();
    let server = niix::server::start(niix::config::Config {
        source: loaded.source.clone(),
        limits: loaded.limits.clone(),
        ..config(dir.path(), Default::default())
    })
    .await
    .unwrap();
    let ch = channel(&server).await;
    let raw = raw_bytes(16, 16, 1);
    let receipt =
        push_messages(&ch, messages(&header(&new_id(), plane(PlaneEncoding::RawU16le, 16, 16, &raw)), &[&raw], 100))
            .await
            .unwrap();
    push_messages(&ch, vec![]).await.unwrap_err();
    let mut f = niix_proto::v1::findings_client::FindingsClient::new(ch.clone());
    f.get_scan(niix_proto::v1::GetScanRequest { scan_id: receipt.scan_id.clone() }).await.unwrap();
    server.shutdown().await.unwrap();

    let niix = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_niix")).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let data = dir.path().to_str().unwrap();
    let (ok, out, err) = niix(&["audit", "tail", "--data", data, "--json"]);
    assert!(ok, "{err}");
    let records: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let actions: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), r["object"].as_str().unwrap(), r["outcome"].as_str().unwrap()))
        .collect();
    assert!(actions.contains(&("PushScan", receipt.scan_id.as_str(), "OK")), "{actions:?}");
    assert!(actions.contains(&("PushScan", "", "InvalidArgument")), "refused calls are audited: {actions:?}");
    assert!(actions.contains(&("GetScan", receipt.scan_id.as_str(), "OK")), "reads are audited: {actions:?}");
    let config_read = format!("{} sha256={}", config_file.display(), sha256(config_text.as_bytes()));
    assert!(actions.contains(&("ReadConfig", config_read.as_str(), "OK")), "the config read is audited: {actions:?}");
    assert!(records.iter().all(|r| r["identity"].as_str().unwrap().starts_with("local@") || r["identity"] == "niix"));

    let (ok, out, err) = niix(&["audit", "verify", "--data", data]);
    assert!(ok && out.contains("intact"), "{out}{err}");
    rusqlite_edit(dir.path(), "UPDATE audit SET object = 'someone-elses-scan' WHERE action = 'GetScan'");
    let (ok, _, err) = niix(&["audit", "verify", "--data", data]);
    assert!(!ok && err.contains("is broken") && err.contains("edited"), "{err}");
}

fn rusqlite_edit(dir: &std::path::Path, sql: &str) {
    rusqlite::Connection::open(dir.join("niix.db")).unwrap().execute_batch(sql).unwrap();
}
