//! Crash safety with the real `niix` binary: SIGKILL in the middle of an
//! upload leaves no visible scan, keeps the staged bytes for a resume, and
//! never loses an acknowledged scan.

mod common;

use std::time::Duration;

use common::*;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::scan_ingest_client::ScanIngestClient;
use niix_proto::v1::upload_status::State;
use niix_proto::v1::{GetScanRequest, GetUploadStatusRequest, ListScansRequest, PlaneEncoding};

#[tokio::test]
async fn sigkill_mid_upload_leaves_nothing_visible_and_the_upload_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let raw = raw_bytes(512, 512, 11);
    let acked = header(&new_id(), plane(PlaneEncoding::RawU16le, 512, 512, &raw));
    let h = header(&new_id(), plane(PlaneEncoding::RawU16le, 512, 512, &raw));

    let server = Server::spawn(&data).await;
    let ch = niix::client::connect(&server.url).await.unwrap();
    let receipt = push_messages(&ch, messages(&acked, &[&raw], 64 << 10)).await.unwrap();

    // Open a push, send part of the plane, and kill the server while the stream is open.
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut client = ScanIngestClient::new(ch.clone());
    let task = tokio::spawn(async move { client.push_scan(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    let msgs = messages(&h, &[&raw[..300_000]], 50_000);
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    let mut status = ScanIngestClient::new(ch.clone());
    for _ in 0..200 {
        let st = status.get_upload_status(GetUploadStatusRequest { scan_id: h.scan_id.clone() }).await.unwrap();
        if st.into_inner().planes.first().is_some_and(|p| p.received_bytes == 300_000) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill9();
    assert!(task.await.unwrap().is_err());

    let server = Server::spawn(&data).await;
    let ch = niix::client::connect(&server.url).await.unwrap();
    let mut findings = FindingsClient::new(ch.clone());
    let listed = findings.list_scans(ListScansRequest::default()).await.unwrap().into_inner().scans;
    assert_eq!(listed.len(), 1, "only the acknowledged scan is visible");
    assert_eq!(listed[0].scan_id, receipt.scan_id);
    assert_eq!(listed[0].planes[0].sha256, sha256(&raw));
    let err = findings.get_scan(GetScanRequest { scan_id: h.scan_id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // What reached the disk before the kill is offered for resume (at most what was sent).
    let st = ScanIngestClient::new(ch.clone())
        .get_upload_status(GetUploadStatusRequest { scan_id: h.scan_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.state, State::InProgress as i32);
    let held = st.planes[0].received_bytes as usize;
    assert!(held <= 300_000);
    let mut rest = vec![messages(&h, &[], 1).remove(0)];
    for (k, piece) in raw[held..].chunks(50_000).enumerate() {
        rest.push(chunk_msg(0, (held + k * 50_000) as u64, piece));
    }
    let done = push_messages(&ch, rest).await.unwrap();
    assert_eq!(done.planes[0].sha256, sha256(&raw));
    server.kill9();
}
