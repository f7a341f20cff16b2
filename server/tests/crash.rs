//! Crash safety with the real `niix` binary: SIGKILL in the middle of an
//! upload leaves no visible scan, keeps the staged bytes for a resume, and
//! never loses an acknowledged scan; SIGKILL at random moments of uploads
//! and analyses, many times over, loses nothing and leaves nothing half done.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::scan_ingest_client::ScanIngestClient;
use niix_proto::v1::upload_status::State;
use niix_proto::v1::{
    GetScanRequest, GetUploadStatusRequest, ListScansRequest, PlaneEncoding, ReportType, Scan, ScanStatus,
};

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
    let mut staged_before_kill = 0;
    for _ in 0..500 {
        let st = status.get_upload_status(GetUploadStatusRequest { scan_id: h.scan_id.clone() }).await.unwrap();
        staged_before_kill = st.into_inner().planes.first().map_or(0, |p| p.received_bytes);
        if staged_before_kill == 300_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(staged_before_kill, 300_000, "the kill must land with the sent bytes staged");
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
    // SIGKILL loses no written byte (the page cache survives the process):
    // the resume starts from the staged bytes, not from zero.
    assert!(held > 0 && held <= 300_000, "staged bytes after the kill: {held}");
    let staged = std::fs::metadata(data.join("staging").join(&h.scan_id).join("plane-0")).unwrap().len();
    assert_eq!(staged, held as u64, "the offset offered is what is on disk");
    let mut rest = vec![messages(&h, &[], 1).remove(0)];
    for (k, piece) in raw[held..].chunks(50_000).enumerate() {
        rest.push(chunk_msg(0, (held + k * 50_000) as u64, piece));
    }
    let done = push_messages(&ch, rest).await.unwrap();
    assert_eq!(done.planes[0].sha256, sha256(&raw));
    assert_eq!(stored_digest(&data, &done.planes[0].sha256), sha256(&raw), "the stored blob holds the scan's bytes");
    server.kill9();
}

/// SHA-256 of the blob stored under `sha256`, re-computed from the file
/// (a listing's digest is only what the database says).
fn stored_digest(data: &std::path::Path, sha256_hex: &str) -> String {
    let path = data.join("blobs").join(&sha256_hex[..2]).join(sha256_hex);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("blob {} unreadable: {e}", path.display()));
    sha256(&bytes)
}

/// Scans left ANALYZING in the database of a killed server: the analyses
/// the kill interrupted (read from the file, before any restart re-queues them).
fn interrupted_analyses(data: &std::path::Path) -> Vec<String> {
    let db = rusqlite::Connection::open(data.join("niix.db")).unwrap();
    let mut stmt = db.prepare("SELECT scan_id FROM scans WHERE status = ?1").unwrap();
    stmt.query_map([ScanStatus::Analyzing as i32], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
}

/// Every stored scan, page by page.
async fn all_scans(ch: &tonic::transport::Channel) -> Vec<Scan> {
    let mut findings = FindingsClient::new(ch.clone());
    let (mut out, mut token) = (Vec::new(), String::new());
    loop {
        let req = ListScansRequest { page_size: 500, page_token: token, ..Default::default() };
        let page = findings.list_scans(req).await.unwrap().into_inner();
        out.extend(page.scans);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Rounds of: start the server, push scans from three clients (each scan
/// is analysed as soon as it is stored), SIGKILL the server at a random
/// moment, restart it and check the store. `make test` runs 4 rounds;
/// `make reliability` runs 50 (NIIX_CRASH_ROUNDS).
#[tokio::test(flavor = "multi_thread")]
async fn random_sigkills_during_uploads_and_analyses_lose_nothing() {
    let rounds = env_or("NIIX_CRASH_ROUNDS", 4);
    let seed = env_or("NIIX_CRASH_SEED", 0x6e69_6978);
    println!("crash test: {rounds} rounds, NIIX_CRASH_SEED={seed}");
    // The kill moments come from a seed, so a failing run can be replayed.
    let mut rng = niix_synth::rng::Rng::new(seed, 0);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Every scan ever sent, acknowledged or not, with its plane digest.
    let sent: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut acked: HashMap<String, String> = HashMap::new();
    let mut interrupted: Vec<String> = Vec::new();

    for round in 0..rounds {
        let server = Server::spawn(&data).await;
        let ch = niix::client::connect(&server.url).await.unwrap();
        let sent_so_far = sent.lock().unwrap().clone();
        check_store(&ch, &data, &acked, &sent_so_far, round).await;

        let pushers: Vec<_> = (0..3u64)
            .map(|p| {
                let (ch, sent) = (ch.clone(), sent.clone());
                let seed = rng.next_u64();
                tokio::spawn(async move {
                    let mut done = Vec::new();
                    for k in 0u32.. {
                        // 1024x1024 raw planes (2 MiB) in 256 KiB chunks.
                        let raw = raw_bytes(1024, 1024, (seed as u32) ^ (k << 8) ^ p as u32);
                        let h = header(&new_id(), plane(PlaneEncoding::RawU16le, 1024, 1024, &raw));
                        sent.lock().unwrap().insert(h.scan_id.clone(), sha256(&raw));
                        match push_messages(&ch, messages(&h, &[&raw], 256 << 10)).await {
                            Ok(receipt) => done.push((receipt.scan_id, receipt.planes[0].sha256.clone())),
                            Err(_) => return done, // the server is gone
                        }
                    }
                    done
                })
            })
            .collect();

        // Kill at a random moment, but once an analysis is running (up to 5 s
        // more), so the kills test re-queueing and not only uploads.
        let delay = Duration::from_millis(100 + rng.next_u64() % 1500);
        tokio::time::sleep(delay).await;
        let mut findings = FindingsClient::new(ch.clone());
        for _ in 0..500 {
            let req = ListScansRequest { status: ScanStatus::Analyzing as i32, ..Default::default() };
            if findings.list_scans(req).await.is_ok_and(|r| !r.into_inner().scans.is_empty()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.kill9();
        for p in pushers {
            acked.extend(p.await.unwrap());
        }
        let cut = interrupted_analyses(&data);
        println!(
            "round {round}: killed after {delay:?} with {} analyses running, {} scans acknowledged so far",
            cut.len(),
            acked.len()
        );
        interrupted.extend(cut);
    }

    // Last start: every interrupted analysis was re-queued and completes.
    let server = Server::spawn(&data).await;
    let ch = niix::client::connect(&server.url).await.unwrap();
    let sent = sent.lock().unwrap().clone();
    check_store(&ch, &data, &acked, &sent, rounds).await;
    for scan in all_scans(&ch).await {
        let f = wait_analysed(&ch, &scan.scan_id).await;
        assert_eq!(f.status, ScanStatus::Analyzed as i32, "{}: {:?}", scan.scan_id, f.status);
        // Exactly once: an interrupted analysis stored nothing, its re-run one report.
        let machine = f.reports.iter().filter(|r| r.r#type == ReportType::Machine as i32).count();
        assert_eq!(machine, 1, "{}: {machine} machine reports", scan.scan_id);
    }
    println!("{} acknowledged scans, {} analyses interrupted by a kill", acked.len(), interrupted.len());
    assert!(!interrupted.is_empty(), "no kill landed during an analysis: the test did not test re-queueing");
}

/// Every acknowledged scan is there with its digest, and every visible scan
/// is one that was sent, complete, with the digest of what was sent.
async fn check_store(
    ch: &tonic::transport::Channel,
    data: &std::path::Path,
    acked: &HashMap<String, String>,
    sent: &HashMap<String, String>,
    round: u64,
) {
    let visible: HashMap<String, Scan> = all_scans(ch).await.into_iter().map(|s| (s.scan_id.clone(), s)).collect();
    for (id, sha) in acked {
        let scan = visible.get(id).unwrap_or_else(|| panic!("round {round}: acknowledged scan {id} is missing"));
        assert_eq!(&scan.planes[0].sha256, sha, "round {round}: {id}");
    }
    for (id, scan) in &visible {
        let sha = sent.get(id).unwrap_or_else(|| panic!("round {round}: {id} was never sent"));
        assert_eq!(scan.planes.len(), 1, "round {round}: {id}");
        assert_eq!(&scan.planes[0].sha256, sha, "round {round}: {id} is visible with other bytes");
        assert_eq!(&stored_digest(data, sha), sha, "round {round}: {id}'s stored blob holds other bytes");
    }
}
