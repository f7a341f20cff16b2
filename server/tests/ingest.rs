//! Ingest through a real gRPC server on loopback, backed by the real
//! embedded store: acceptance, duplicates, every rejection path, resume,
//! restart persistence and crash visibility.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use niix::client::{self, PushOptions, Quiet};
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::scan_ingest_client::ScanIngestClient;
use niix_proto::v1::upload_status::State;
use niix_proto::v1::{
    AbortUploadRequest, GetScanRequest, GetUploadStatusRequest, ListScansRequest, PlaneEncoding, PlaneKind,
    UploadStatus,
};
use tonic::Code;

async fn status_of(ch: &tonic::transport::Channel, id: &str) -> UploadStatus {
    ScanIngestClient::new(ch.clone())
        .get_upload_status(GetUploadStatusRequest { scan_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn listed(ch: &tonic::transport::Channel) -> Vec<String> {
    let page = FindingsClient::new(ch.clone()).list_scans(ListScansRequest::default()).await.unwrap().into_inner();
    page.scans.into_iter().map(|s| s.scan_id).collect()
}

async fn get_code(ch: &tonic::transport::Channel, id: &str) -> Code {
    match FindingsClient::new(ch.clone()).get_scan(GetScanRequest { scan_id: id.into() }).await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Expects a refusal with `code` whose message contains `needle`, and checks
/// that nothing became visible.
async fn refused(ch: &tonic::transport::Channel, msgs: Vec<niix_proto::v1::PushScanRequest>, code: Code, needle: &str) {
    let before = listed(ch).await;
    let err = push_messages(ch, msgs).await.expect_err("push must be refused");
    assert_eq!(err.code(), code, "{}", err.message());
    assert!(err.message().contains(needle), "{needle:?} not in {:?}", err.message());
    assert_eq!(listed(ch).await, before, "a refused push must not become visible");
}

#[tokio::test]
async fn a_dual_energy_tiff_scan_is_stored_with_exact_digests_and_repushes_are_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data")).await;
    let ch = channel(&server).await;
    let high = file(dir.path(), "scan.high.tif");
    let low = file(dir.path(), "scan.low.tif");
    let high_bytes = write_tiff(&high, 2048, 6144, 1);
    let low_bytes = write_tiff(&low, 2048, 6144, 2);

    let hints = client::PlaneHints { pixel_spacing_mm: (4.0, 4.0), ..Default::default() };
    let mut header = niix_proto::v1::ScanHeader {
        scan_id: new_id(),
        metadata: header("x", plane(PlaneEncoding::Tiff, 1, 1, b"x")).metadata,
        planes: vec![
            client::describe_plane(&high, PlaneKind::HighEnergy, &hints).unwrap(),
            client::describe_plane(&low, PlaneKind::LowEnergy, &hints).unwrap(),
        ],
    };
    assert_eq!((header.planes[0].width, header.planes[0].height), (2048, 6144));
    let files = vec![high.clone(), low.clone()];
    let options = PushOptions::default();
    let push =
        |h| client::push_files(client::authed(ch.clone(), None).unwrap(), h, files.clone(), &options, Arc::new(Quiet));

    let receipt = push(header.clone()).await.unwrap();
    assert!(!receipt.duplicate);
    assert_eq!(receipt.planes[0].sha256, sha256(&high_bytes));
    assert_eq!(receipt.planes[1].sha256, sha256(&low_bytes));
    assert_eq!(receipt.planes[1].byte_length, low_bytes.len() as u64);

    // Same push again: answered from the declared digests.
    let again = push(header.clone()).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.planes, receipt.planes);

    // Same push without declared digests: the server hashes and compares.
    for p in &mut header.planes {
        p.sha256.clear();
    }
    let bytes: [&[u8]; 2] = [&high_bytes, &low_bytes];
    let again = push_messages(&ch, messages(&header, &bytes, 1 << 20)).await.unwrap();
    assert!(again.duplicate);

    // The stored scan is listed and complete.
    assert_eq!(listed(&ch).await, vec![receipt.scan_id.clone()]);
    let scan = FindingsClient::new(ch.clone())
        .get_scan(GetScanRequest { scan_id: receipt.scan_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .scan
        .unwrap();
    assert_eq!(scan.planes.len(), 2);
    assert_eq!(scan.planes[0].sha256, receipt.planes[0].sha256);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_same_id_with_different_content_is_already_exists() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let ch = channel(&server).await;
    let id = new_id();
    let a = raw_bytes(16, 8, 1);
    let b = raw_bytes(16, 8, 2);
    let h = header(&id, plane(PlaneEncoding::RawU16le, 16, 8, &a));
    push_messages(&ch, messages(&h, &[&a], 100)).await.unwrap();

    // Different bytes, no declared digest: detected after hashing.
    let err = push_messages(&ch, messages(&h, &[&b], 100)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
    // Different bytes, declared digest: detected at once.
    let mut declared = h.clone();
    declared.planes[0].sha256 = sha256(&b);
    let err = push_messages(&ch, messages(&declared, &[&b], 100)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    // Different metadata.
    let mut other = h.clone();
    other.metadata.as_mut().unwrap().lane_id = "L9".into();
    let err = push_messages(&ch, messages(&other, &[&a], 100)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains("new scan_id"), "{}", err.message());
    server.shutdown().await.unwrap();
}

// The catalogue of refusals is server/tests/reliability.rs; these are the
// ones whose point is what the server says on the next attempt.
#[tokio::test]
async fn a_retry_after_a_refused_stream_is_told_what_the_server_holds() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let ch = channel(&server).await;
    let raw = raw_bytes(32, 16, 3);
    let good = header(&new_id(), plane(PlaneEncoding::RawU16le, 32, 16, &raw));

    // More bytes than declared: the bytes before the bad chunk were kept, so
    // starting over at 0 is out of order, and the server says why.
    let mut extra = raw.clone();
    extra.extend_from_slice(&[0, 0]);
    refused(&ch, messages(&good, &[&extra], 256), Code::InvalidArgument, "after every declared byte").await;
    refused(&ch, messages(&good, &[&raw], 256), Code::InvalidArgument, "earlier attempt").await;

    // Truncated stream: the status offers exactly the bytes received.
    let id = new_id();
    refused(&ch, messages(&header(&id, good.planes[0].clone()), &[&raw[..512]], 256), Code::DataLoss, "resume").await;
    let st = status_of(&ch, &id).await;
    assert_eq!(st.state, State::InProgress as i32);
    assert_eq!(st.planes[0].received_bytes, 512);
    assert_eq!(get_code(&ch, &id).await, Code::NotFound);

    // A declared digest the bytes do not match discards the upload.
    let id = new_id();
    let mut h = header(&id, good.planes[0].clone());
    h.planes[0].sha256 = sha256(b"something else");
    refused(&ch, messages(&h, &[&raw], 256), Code::DataLoss, "declared sha256").await;
    assert_eq!(status_of(&ch, &id).await.state, State::Unknown as i32);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_interrupted_push_resumes_to_the_same_digest() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data")).await;
    let ch = channel(&server).await;
    let path = file(dir.path(), "scan.tif");
    let bytes = write_tiff(&path, 512, 1024, 9);
    let mut header =
        header(&new_id(), client::describe_plane(&path, PlaneKind::SingleEnergy, &Default::default()).unwrap());
    header.metadata.as_mut().unwrap().container_numbers.clear();
    let id = header.scan_id.clone();

    // The client's connection dies mid-plane: its task is aborted while the
    // stream is open, so the server sees a broken stream, not an end.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut client = ScanIngestClient::new(ch.clone());
    let task = tokio::spawn(async move { client.push_scan(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    let msgs = messages(&header, &[&bytes[..bytes.len() / 3 + 100]], 64 << 10);
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    // Wait until the server holds everything sent, then cut the stream.
    let sent = (bytes.len() / 3 + 100) as u64;
    for _ in 0..200 {
        let st = status_of(&ch, &id).await;
        if st.planes.first().is_some_and(|p| p.received_bytes == sent) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    drop(tx);
    for _ in 0..200 {
        if !status_of(&ch, &id).await.active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = status_of(&ch, &id).await;
    assert_eq!(st.state, State::InProgress as i32);
    assert!(!st.active);
    assert_eq!(st.planes[0].received_bytes, sent);
    assert!(listed(&ch).await.is_empty(), "an unfinished scan is invisible");

    // Resume: the client asks where to continue and sends only the rest.
    struct Count(std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64);
    impl client::Progress for Count {
        fn start(&self, _: u64, held: u64) {
            self.0.store(held, std::sync::atomic::Ordering::SeqCst);
        }
        fn advance(&self, n: u64) {
            self.1.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        }
        fn retrying(&self, _: u32, _: &tonic::Status) {}
    }
    let count = Arc::new(Count(Default::default(), Default::default()));
    let receipt = client::push_files(
        client::authed(ch.clone(), None).unwrap(),
        header.clone(),
        vec![path],
        &PushOptions::default(),
        count.clone(),
    )
    .await
    .unwrap();
    assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), sent, "resumed from the server's offset");
    assert_eq!(count.1.load(std::sync::atomic::Ordering::SeqCst), bytes.len() as u64 - sent);
    assert!(!receipt.duplicate);
    assert_eq!(receipt.planes[0].sha256, sha256(&bytes));
    assert_eq!(status_of(&ch, &id).await.state, State::Complete as i32);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_resume_with_another_header_is_refused_until_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let ch = channel(&server).await;
    let raw = raw_bytes(32, 32, 4);
    let id = new_id();
    let h = header(&id, plane(PlaneEncoding::RawU16le, 32, 32, &raw));
    push_messages(&ch, messages(&h, &[&raw[..1000]], 500)).await.unwrap_err();

    let mut other = h.clone();
    other.metadata.as_mut().unwrap().site_id = "DEHAM-02".into();
    let err = push_messages(&ch, messages(&other, &[&raw], 500)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());

    let aborted = ScanIngestClient::new(ch.clone())
        .abort_upload(AbortUploadRequest { scan_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(aborted.aborted);
    assert_eq!(status_of(&ch, &id).await.state, State::Unknown as i32);
    let receipt = push_messages(&ch, messages(&other, &[&raw], 500)).await.unwrap();
    assert_eq!(receipt.planes[0].sha256, sha256(&raw));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_resume_cannot_change_or_drop_a_declared_digest_to_mix_two_files() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let ch = channel(&server).await;
    let a = raw_bytes(32, 32, 4);
    let b = raw_bytes(32, 32, 5);
    let id = new_id();
    let mut declared = header(&id, plane(PlaneEncoding::RawU16le, 32, 32, &a));
    declared.planes[0].sha256 = sha256(&a);
    let half = a.len() / 2;
    // Push 1 declares A's digest and sends half of A.
    let err = push_messages(&ch, messages(&declared, &[&a[..half]], 256)).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{}", err.message());
    assert_eq!(status_of(&ch, &id).await.planes[0].received_bytes, half as u64);

    // Push 2 drops the digest (or declares B's) and sends the rest of B.
    let rest_of_b = |h: &niix_proto::v1::ScanHeader| {
        let mut m = messages(h, &[&b], 256);
        m.retain(|r| match &r.part {
            Some(niix_proto::v1::push_scan_request::Part::Chunk(c)) => c.offset >= half as u64,
            _ => true,
        });
        m
    };
    let mut dropped = declared.clone();
    dropped.planes[0].sha256.clear();
    let mut swapped = declared.clone();
    swapped.planes[0].sha256 = sha256(&b);
    for resume in [&dropped, &swapped] {
        let err = push_messages(&ch, rest_of_b(resume)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
        assert!(err.message().contains("plane 0") && err.message().contains(&sha256(&a)), "{}", err.message());
        assert_eq!(get_code(&ch, &id).await, Code::NotFound, "nothing mixed may become visible");
        assert_eq!(status_of(&ch, &id).await.planes[0].received_bytes, half as u64, "the upload is kept");
    }
    // With A's digest, the rest of B is caught at completion.
    let err = push_messages(&ch, rest_of_b(&declared)).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{}", err.message());
    assert_eq!(get_code(&ch, &id).await, Code::NotFound);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn two_streams_of_one_scan_cannot_interleave() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let ch = channel(&server).await;
    let raw = raw_bytes(64, 64, 4);
    let h = header(&new_id(), plane(PlaneEncoding::RawU16le, 64, 64, &raw));
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut first = ScanIngestClient::new(ch.clone());
    let task = tokio::spawn(async move { first.push_scan(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    let mut msgs = messages(&h, &[&raw], 1024).into_iter();
    tx.send(msgs.next().unwrap()).await.unwrap();
    tx.send(msgs.next().unwrap()).await.unwrap();
    for _ in 0..200 {
        if status_of(&ch, &h.scan_id).await.active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = push_messages(&ch, messages(&h, &[&raw], 1024)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{}", err.message());
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    drop(tx);
    let receipt = task.await.unwrap().unwrap().into_inner();
    assert_eq!(receipt.planes[0].sha256, sha256(&raw));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn scans_survive_a_restart_and_unfinished_uploads_stay_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let raw = raw_bytes(40, 30, 8);
    let done = header(&new_id(), plane(PlaneEncoding::RawU16le, 40, 30, &raw));
    let half = header(&new_id(), plane(PlaneEncoding::RawU16le, 40, 30, &raw));
    {
        let server = start(&data).await;
        let ch = channel(&server).await;
        push_messages(&ch, messages(&done, &[&raw], 300)).await.unwrap();
        push_messages(&ch, messages(&half, &[&raw[..900]], 300)).await.unwrap_err();
        server.shutdown().await.unwrap();
    }
    let server = start(&data).await;
    let ch = channel(&server).await;
    assert_eq!(listed(&ch).await, vec![done.scan_id.clone()]);
    let st = status_of(&ch, &half.scan_id).await;
    assert_eq!((st.state, st.planes[0].received_bytes), (State::InProgress as i32, 900));
    let mut rest = vec![messages(&half, &[], 1).remove(0)];
    rest.push(chunk_msg(0, 900, &raw[900..]));
    let receipt = push_messages(&ch, rest).await.unwrap();
    assert_eq!(receipt.planes[0].sha256, sha256(&raw));
    assert_eq!(listed(&ch).await.len(), 2);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_abandons_an_open_upload_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data).await;
    let ch = channel(&server).await;
    let raw = raw_bytes(64, 64, 1);
    let h = header(&new_id(), plane(PlaneEncoding::RawU16le, 64, 64, &raw));
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut c = ScanIngestClient::new(ch.clone());
    let task = tokio::spawn(async move { c.push_scan(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    let mut msgs = messages(&h, &[&raw], 2048).into_iter();
    tx.send(msgs.next().unwrap()).await.unwrap();
    tx.send(msgs.next().unwrap()).await.unwrap();
    for _ in 0..200 {
        if status_of(&ch, &h.scan_id).await.planes.first().is_some_and(|p| p.received_bytes == 2048) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.shutdown().await.unwrap();
    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(err.code(), Code::Unavailable | Code::Unknown | Code::Cancelled), "{err:?}");
    drop(tx);

    let server = start(&data).await;
    let ch = channel(&server).await;
    let st = status_of(&ch, &h.scan_id).await;
    assert_eq!(st.planes[0].received_bytes, 2048, "the bytes received before shutdown are kept");
    assert!(listed(&ch).await.is_empty());
    server.shutdown().await.unwrap();
}
