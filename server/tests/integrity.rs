//! Tampering outside the audit table: reports and plane digests are sealed
//! in the audit chain, stored plane bytes are re-hashed before they are
//! sent, signed checkpoints catch truncation and re-chaining, and the server
//! refuses to start on a log that does not verify. Every attack here edits
//! the real files of a real data directory.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use niix::auth::Role;
use niix::client::{Authed, authed};
use niix::config::Limits;
use niix::exchange::{Agreement, Content, ExchangeConfig, keys};
use niix::store::{AuditEntry, MetadataStore, SqliteMetadata};
use niix_proto::v1::exchange_client::ExchangeClient;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::*;
use prost::Message;
use tokio_stream::StreamExt;

/// Runs the `niix` binary.
fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_niix")).args(args).env("NIIX_LOG", "warn").output().unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// NL's server sharing with DE under one agreement, with its scanner,
/// officer and DE connected.
struct Nl {
    server: niix::server::RunningServer,
    scanner: Authed,
    officer: Authed,
    de: Authed,
}

async fn nl(dir: &Path, content: Content) -> Nl {
    let (key_file, _) = keys::init(&dir.join("keys")).unwrap();
    let mut config = config(&dir.join("data"), Limits::default());
    config.auth = tokens(&[
        ("scanner", Role::Scanner, "t-scan"),
        ("officer", Role::Officer, "t-officer"),
        ("DE", Role::Partner, "t-de"),
    ]);
    let agreement = Agreement { name: "NL-DE".into(), partner: "DE".into(), content, ..Default::default() };
    config.exchange = ExchangeConfig {
        administration: "NL".into(),
        signing_key: Some(key_file),
        agreements: vec![agreement],
        ..Default::default()
    };
    let server = niix::server::start(config).await.unwrap();
    let ch = niix::client::connect(&format!("http://{}", server.addr)).await.unwrap();
    let conn = |token| authed(ch.clone(), Some(token)).unwrap();
    Nl { scanner: conn("t-scan"), officer: conn("t-officer"), de: conn("t-de"), server }
}

async fn analysed(conn: &Authed, id: &str) {
    let mut c = FindingsClient::new(conn.clone());
    for _ in 0..600 {
        let f = c.get_findings(GetFindingsRequest { scan_id: id.into() }).await.unwrap().into_inner();
        if f.status == ScanStatus::Analyzed as i32 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{id} not analysed");
}

/// The first package of DE's feed.
async fn first_package(de: &Authed) -> PackageContent {
    let mut s = ExchangeClient::new(de.clone()).subscribe(SubscribeRequest { cursor: 0 }).await.unwrap().into_inner();
    let pkg = tokio::time::timeout(Duration::from_secs(30), s.next()).await.unwrap().unwrap().unwrap();
    PackageContent::decode(pkg.content.as_slice()).unwrap()
}

/// The `niix_integrity_failures_total` value on the server's `/metrics`.
async fn integrity_failures(server: &niix::server::RunningServer) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server.metrics_addr.unwrap()).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    let line = body.lines().find(|l| l.starts_with("niix_integrity_failures_total")).expect("metric exported");
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Audit records of `action` with `outcome`.
fn audited(data: &Path, action: &str, outcome: &str) -> i64 {
    rusqlite::Connection::open(data.join("niix.db"))
        .unwrap()
        .query_row("SELECT count(*) FROM audit WHERE action = ?1 AND outcome = ?2", [action, outcome], |r| r.get(0))
        .unwrap()
}

/// Edits the scan's first stored report from ALARM to CLEAR behind the
/// server's back, as an attacker with the database would; returns its
/// sequence number and the edited report.
fn clear_first_report(db: &rusqlite::Connection, id: &str) -> (i64, ThreatReport) {
    let (seq, bytes): (i64, Vec<u8>) = db
        .query_row("SELECT seq, report FROM reports WHERE scan_id = ?1 ORDER BY seq LIMIT 1", [id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let mut report = ThreatReport::decode(bytes.as_slice()).unwrap();
    report.decision = AlarmDecision::Clear as i32;
    db.execute("UPDATE reports SET report = ?1 WHERE seq = ?2", rusqlite::params![report.encode_to_vec(), seq])
        .unwrap();
    (seq, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_edited_from_alarm_to_clear_is_detected_and_never_shipped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Nl { server, scanner, officer, de } = nl(dir.path(), Content::Findings).await;
    let id = push_container(&scanner, "NLRTM", "AB-1", true).await;
    analysed(&officer, &id).await;
    let content = first_package(&de).await;
    assert_eq!(content.reports[0].decision, AlarmDecision::Alarm as i32);
    let get = |id: String| {
        let mut c = ExchangeClient::new(de.clone());
        async move { c.get_package(GetPackageRequest { package_id: id }).await }
    };
    get(content.package_id.clone()).await.expect("the untouched package is served");
    let ok = cli(&["audit", "verify", "--data", data.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", text(&ok));

    // The attacker turns the machine's ALARM into CLEAR, in the report and the listing column.
    let db = rusqlite::Connection::open(data.join("niix.db")).unwrap();
    let (seq, report) = clear_first_report(&db, &id);
    db.execute("UPDATE scans SET decision = ?1 WHERE scan_id = ?2", rusqlite::params![report.decision, id]).unwrap();
    drop(db);

    let err = get(content.package_id.clone()).await.expect_err("an altered report must not be signed and shipped");
    assert_eq!(err.code(), tonic::Code::DataLoss, "{}", err.message());
    assert!(err.message().contains(&format!("{id} report {seq}")), "{}", err.message());
    assert!(integrity_failures(&server).await >= 1, "the refusal is metered");
    assert!(audited(&data, "GetPackage", "DataLoss") >= 1, "the refusal is audited");

    let bad = cli(&["audit", "verify", "--data", data.to_str().unwrap()]);
    assert!(!bad.status.success(), "verify must fail: {}", text(&bad));
    assert!(text(&bad).contains(&format!("{id} report {seq}")), "{}", text(&bad));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_of_a_stored_plane_are_refused_with_data_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Nl { server, scanner, officer, de } = nl(dir.path(), Content::FullPlanes).await;
    let id = push_container(&scanner, "NLRTM", "AB-1", true).await;
    analysed(&officer, &id).await;
    let content = first_package(&de).await;
    let digest = content.planes[0].sha256.clone();
    let fetch = || {
        let mut c = ExchangeClient::new(de.clone());
        let req = GetPlaneRequest { package_id: content.package_id.clone(), plane_index: 0, offset: 0 };
        async move {
            let mut s = c.get_plane(req).await?.into_inner();
            let mut bytes = Vec::new();
            while let Some(chunk) = s.next().await {
                bytes.extend(chunk?.data);
            }
            Ok::<_, tonic::Status>(bytes)
        }
    };
    assert_eq!(sha256(&fetch().await.unwrap()), digest);

    let blob = data.join("blobs").join(&digest[..2]).join(&digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 0xff;
    bytes[101] ^= 0x55;
    std::fs::write(&blob, &bytes).unwrap();

    let err = fetch().await.expect_err("altered plane bytes must not be sent");
    assert_eq!(err.code(), tonic::Code::DataLoss, "{}", err.message());
    assert!(err.message().contains("plane 0") && err.message().contains(&digest), "{}", err.message());
    assert!(integrity_failures(&server).await >= 1, "the refusal is metered");
    assert!(audited(&data, "GetPlane", "DataLoss") >= 1, "the refusal is audited");
    server.shutdown().await.unwrap();
}

fn entry(i: u32) -> AuditEntry {
    AuditEntry {
        at: std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + u64::from(i)),
        identity: format!("officer-{i}"),
        role: "officer".into(),
        action: "GetScan".into(),
        object: format!("scan-{i}"),
        outcome: "OK".into(),
    }
}

/// Re-computes every record's links and hashes, as an attacker with the
/// database (and the published hash rule) can.
fn rechain(data: &Path) {
    let db = SqliteMetadata::open(&data.join("niix.db")).unwrap();
    let records = db.audit_records(0, 10_000).unwrap();
    drop(db);
    let conn = rusqlite::Connection::open(data.join("niix.db")).unwrap();
    conn.execute("DELETE FROM audit", []).unwrap();
    let mut prev = niix::audit::GENESIS.to_string();
    for (i, r) in records.iter().enumerate() {
        let seq = i as u64 + 1;
        let sha = niix::audit::record_hash(seq, &r.entry, &prev);
        let at = r.entry.at.duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64;
        conn.execute(
            "INSERT INTO audit (seq, at_us, identity, role, action, object, outcome, prev_sha256, sha256)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            rusqlite::params![
                seq as i64,
                at,
                r.entry.identity,
                r.entry.role,
                r.entry.action,
                r.entry.object,
                r.entry.outcome,
                prev,
                sha
            ],
        )
        .unwrap();
        prev = sha;
    }
}

#[test]
fn a_checkpoint_catches_a_deleted_and_rechained_record_and_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let db = SqliteMetadata::open(&data.join("niix.db")).unwrap();
    for i in 0..8 {
        db.append_audit(&entry(i)).unwrap();
    }
    drop(db);
    let (key, public) = keys::init(&dir.path().join("keys")).unwrap();
    let cp = dir.path().join("cp.json");
    let (d, c, k) = (data.to_str().unwrap(), cp.to_str().unwrap(), key.to_str().unwrap());
    let out = cli(&["audit", "checkpoint", "--data", d, "--key", k, "--administration", "NL", "-o", c]);
    assert!(out.status.success(), "{}", text(&out));
    let ok = cli(&["audit", "verify", "--data", d, "--checkpoint", c, "--public-key", &public]);
    assert!(ok.status.success(), "{}", text(&ok));
    let saved = std::fs::copy(data.join("niix.db"), dir.path().join("clean.db")).unwrap();
    assert!(saved > 0);

    // Delete a middle record and re-chain: the chain alone verifies again...
    rusqlite::Connection::open(data.join("niix.db")).unwrap().execute("DELETE FROM audit WHERE seq = 4", []).unwrap();
    rechain(&data);
    let fooled = cli(&["audit", "verify", "--data", d]);
    assert!(fooled.status.success(), "a re-chained log verifies on its own: {}", text(&fooled));
    // ...but not against the checkpoint.
    let caught = cli(&["audit", "verify", "--data", d, "--checkpoint", c, "--public-key", &public]);
    assert!(!caught.status.success());
    assert!(text(&caught).contains("truncated"), "seven records where eight were signed: {}", text(&caught));
    // With a record appended to hide the count, the hash at the position gives it away.
    let db = SqliteMetadata::open(&data.join("niix.db")).unwrap();
    db.append_audit(&entry(99)).unwrap();
    drop(db);
    let caught = cli(&["audit", "verify", "--data", d, "--checkpoint", c, "--public-key", &public]);
    assert!(!caught.status.success());
    assert!(text(&caught).contains("record 8 no longer has the hash"), "{}", text(&caught));

    // Truncating the newest records is caught too.
    std::fs::copy(dir.path().join("clean.db"), data.join("niix.db")).unwrap();
    rusqlite::Connection::open(data.join("niix.db")).unwrap().execute("DELETE FROM audit WHERE seq > 6", []).unwrap();
    assert!(cli(&["audit", "verify", "--data", d]).status.success(), "a cut log verifies on its own");
    let caught = cli(&["audit", "verify", "--data", d, "--checkpoint", c]);
    assert!(!caught.status.success());
    assert!(text(&caught).contains("truncated") && text(&caught).contains("records 7..=8"), "{}", text(&caught));

    // A checkpoint re-signed with another key is refused when the key is pinned.
    let (other, _) = keys::init(&dir.path().join("other")).unwrap();
    let forged = dir.path().join("forged.json");
    let f = forged.to_str().unwrap();
    assert!(cli(&["audit", "checkpoint", "--data", d, "--key", other.to_str().unwrap(), "-o", f]).status.success());
    let refused = cli(&["audit", "verify", "--data", d, "--checkpoint", f, "--public-key", &public]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("signed by key"), "{}", text(&refused));
}

/// `niix serve` over `data`: its exit status and output if it stops within
/// 30 s, else `None` (it is then killed).
fn serve_exits(data: &Path, extra: &[&str]) -> Option<(bool, String)> {
    let port = free_port().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_niix"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            "127.0.0.1:0",
            "--web-listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(data)
        .args(["--models"])
        .arg(fixtures().join("models"))
        .args(extra)
        .env("NIIX_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return Some((status.success(), text(&out)));
        }
        if std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn the_server_refuses_to_start_on_a_broken_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let db = SqliteMetadata::open(&data.join("niix.db")).unwrap();
    for i in 0..5 {
        db.append_audit(&entry(i)).unwrap();
    }
    drop(db);
    let config = dir.path().join("niix.toml");
    std::fs::write(&config, "[analysis]\nenabled = false\n").unwrap();
    let args = ["--config", config.to_str().unwrap()];
    assert_eq!(serve_exits(&data, &args), None, "an intact log starts");

    rusqlite::Connection::open(data.join("niix.db"))
        .unwrap()
        .execute("UPDATE audit SET outcome = 'PermissionDenied' WHERE seq = 3", [])
        .unwrap();
    let before: i64 = rusqlite::Connection::open(data.join("niix.db"))
        .unwrap()
        .query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
        .unwrap();
    let (ok, out) = serve_exits(&data, &args).expect("the server must refuse to start");
    assert!(!ok);
    assert!(out.contains("audit record 3 is broken") && out.contains("niix audit verify"), "{out}");
    let after: i64 = rusqlite::Connection::open(data.join("niix.db"))
        .unwrap()
        .query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
        .unwrap();
    assert_eq!(after, before, "nothing is appended to a broken log");
}

#[test]
fn the_server_refuses_to_start_on_a_log_rechained_behind_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (key, _) = keys::init(&dir.path().join("keys")).unwrap();
    let config = dir.path().join("niix.toml");
    std::fs::write(
        &config,
        format!("[analysis]\nenabled = false\n[exchange]\nadministration = \"NL\"\nsigning_key = {key:?}\n"),
    )
    .unwrap();
    let c = config.to_str().unwrap();
    // The first run signs its log's head into the data directory.
    assert_eq!(serve_exits(&data, &["--config", c]), None);
    let cp = data.join(niix::server::CHECKPOINT_FILE);
    assert!(cp.exists(), "the server keeps a signed checkpoint");
    let signed = keys::read_checkpoint(&cp).unwrap();
    assert!(signed.seq >= 2, "{signed:?}");

    rusqlite::Connection::open(data.join("niix.db")).unwrap().execute("DELETE FROM audit WHERE seq = 1", []).unwrap();
    rechain(&data);
    assert!(cli(&["audit", "verify", "--data", data.to_str().unwrap()]).status.success());
    let (ok, out) = serve_exits(&data, &["--config", c]).expect("the server must refuse to start");
    assert!(!ok);
    assert!(out.contains("does not match its checkpoint") && out.contains("niix audit verify"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn officers_are_not_shown_an_edited_report_or_header() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Nl { server, scanner, officer, .. } = nl(dir.path(), Content::Findings).await;
    let id = push_container(&scanner, "NLRTM", "AB-1", true).await;
    analysed(&officer, &id).await;
    let mut c = FindingsClient::new(officer.clone());
    c.get_scan(GetScanRequest { scan_id: id.clone() }).await.expect("the untouched scan is shown");

    // The attacker turns the machine's ALARM into CLEAR in the stored report.
    let db = rusqlite::Connection::open(data.join("niix.db")).unwrap();
    let (seq, _) = clear_first_report(&db, &id);
    drop(db);

    let data_loss = |r: Result<(), tonic::Status>, rpc: &str| {
        let e = r.expect_err(&format!("{rpc} must not show an edited report"));
        assert_eq!(e.code(), tonic::Code::DataLoss, "{rpc}: {}", e.message());
        assert!(e.message().contains(&format!("{id} report {seq}")), "{rpc}: {}", e.message());
    };
    let scan_id = id.clone();
    data_loss(c.get_scan(GetScanRequest { scan_id: scan_id.clone() }).await.map(drop), "GetScan");
    data_loss(c.get_findings(GetFindingsRequest { scan_id: scan_id.clone() }).await.map(drop), "GetFindings");
    let overlay = RenderOverlayRequest { scan_id: scan_id.clone(), max_width: 256, ..Default::default() };
    data_loss(c.render_overlay(overlay).await.map(drop), "RenderOverlay");
    data_loss(
        c.export_tdr(ExportTdrRequest { scan_id: scan_id.clone(), ..Default::default() }).await.map(drop),
        "ExportTdr",
    );
    let verdict = AdjudicateRequest { scan_id, verdict: Verdict::Dismissed as i32, ..Default::default() };
    data_loss(c.adjudicate(verdict).await.map(drop), "Adjudicate");
    assert!(integrity_failures(&server).await >= 5, "each refusal is metered");
    assert!(audited(&data, "GetFindings", "DataLoss") >= 1, "the refusal is audited");

    // An edited header (the site in the scan row) is refused the same way.
    let other = push_container(&scanner, "NLRTM", "AB-2", false).await;
    analysed(&officer, &other).await;
    let db = rusqlite::Connection::open(data.join("niix.db")).unwrap();
    let header: Vec<u8> = db.query_row("SELECT header FROM scans WHERE scan_id = ?1", [&other], |r| r.get(0)).unwrap();
    let mut h = ScanHeader::decode(header.as_slice()).unwrap();
    h.metadata.as_mut().unwrap().vehicle_plate = "ZZ-9".into();
    db.execute("UPDATE scans SET header = ?1 WHERE scan_id = ?2", rusqlite::params![h.encode_to_vec(), other]).unwrap();
    drop(db);
    let e = c.get_scan(GetScanRequest { scan_id: other.clone() }).await.expect_err("an edited header is refused");
    assert_eq!(e.code(), tonic::Code::DataLoss, "{}", e.message());
    server.shutdown().await.unwrap();
}

/// A counter of the server's `/metrics`.
async fn metric(server: &niix::server::RunningServer, name: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server.metrics_addr.unwrap()).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    let line = body.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} is exported"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Officers' reads arriving together are committed to the audit log in
/// groups: each read has exactly one record, fewer commits than records
/// were made, and the chain verifies with `niix audit verify`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_reads_are_each_audited_once_in_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut config = config(&data, Limits::default());
    config.analysis.enabled = false;
    let server = niix::server::start(config).await.unwrap();
    let conn = authed(channel(&server).await, None).unwrap();
    let id = push_container(&conn, "NLRTM", "AB-1", false).await;
    let records_before = audited_all(&data);
    let commits_before = metric(&server, "niix_audit_group_commits_total").await;

    const PER_RPC: usize = 40;
    let mut reads = tokio::task::JoinSet::new();
    for i in 0..3 * PER_RPC {
        let (conn, scan_id) = (conn.clone(), id.clone());
        reads.spawn(async move {
            let mut c = FindingsClient::new(conn);
            match i % 3 {
                0 => c.list_scans(ListScansRequest::default()).await.map(drop),
                1 => c.get_scan(GetScanRequest { scan_id }).await.map(drop),
                _ => c.get_findings(GetFindingsRequest { scan_id }).await.map(drop),
            }
        });
    }
    while let Some(read) = reads.join_next().await {
        read.unwrap().expect("an audited read succeeds");
    }
    for action in ["ListScans", "GetScan", "GetFindings"] {
        assert_eq!(audited(&data, action, "OK"), PER_RPC as i64, "one record per {action}");
    }
    assert_eq!(audited_all(&data) - records_before, 3 * PER_RPC as i64, "no other record, none twice");
    let commits = metric(&server, "niix_audit_group_commits_total").await - commits_before;
    assert!(commits < 3 * PER_RPC as u64, "{commits} commits for {} parallel reads: no grouping", 3 * PER_RPC);
    server.shutdown().await.unwrap();
    let ok = cli(&["audit", "verify", "--data", data.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", text(&ok));
}

/// Every audit record.
fn audited_all(data: &Path) -> i64 {
    rusqlite::Connection::open(data.join("niix.db"))
        .unwrap()
        .query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
        .unwrap()
}
