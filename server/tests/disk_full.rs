//! A full disk, for real: the data directory on a 48 MiB tmpfs. Audited
//! calls fail closed (UNAVAILABLE, never OK without their audit record),
//! AbortUpload frees staged bytes on a full disk, new uploads below
//! `storage.min_free_bytes` get RESOURCE_EXHAUSTED, and a start that cannot
//! write its Start record refuses. Skips (saying why) where mounting is not
//! permitted.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use niix::auth::Role;
use niix::client::authed;
use niix::config::Limits;
use niix::exchange::{Agreement, Content, ExchangeConfig, keys};
use niix_proto::v1::exchange_client::ExchangeClient;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::scan_ingest_client::ScanIngestClient;
use niix_proto::v1::*;
use tonic::Code;

/// A tmpfs mounted for the test; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            Ok(o) => {
                eprintln!("SKIPPED: cannot mount a tmpfs here ({})", String::from_utf8_lossy(&o.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

fn free_bytes(p: &Path) -> u64 {
    let st = rustix::fs::statvfs(p).unwrap();
    st.f_bavail * st.f_frsize
}

/// Writes to `file` until the disk has at most `leave` bytes free (0: until ENOSPC).
fn fill(dir: &Path, file: &str, leave: u64) -> PathBuf {
    let path = dir.join(file);
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
    for chunk in [1usize << 20, 64 << 10, 4 << 10, 512] {
        let zeros = vec![0u8; chunk];
        while free_bytes(dir) > leave + chunk as u64 || (leave == 0 && free_bytes(dir) > 0) {
            if f.write_all(&zeros).and_then(|_| f.sync_data()).is_err() {
                break;
            }
        }
    }
    path
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

async fn push(conn: &niix::client::Authed, msgs: Vec<PushScanRequest>) -> Result<ScanReceipt, tonic::Status> {
    ScanIngestClient::new(conn.clone()).push_scan(tokio_stream::iter(msgs)).await.map(|r| r.into_inner())
}

fn audited_ok(data: &Path, action: &str) -> i64 {
    rusqlite::Connection::open_with_flags(data.join("niix.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap()
        .query_row("SELECT count(*) FROM audit WHERE action = ?1 AND outcome = 'OK'", [action], |r| r.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_closed_and_aborting_still_frees_staged_bytes() {
    let Some(fs) = Tmpfs::mount("48m") else { return };
    let data = fs.path().join("data");
    let keys_dir = tempfile::tempdir().unwrap();
    let (key_file, _) = keys::init(keys_dir.path()).unwrap();
    let mut config = config(&data, Limits::default());
    config.storage.min_free_bytes = 8 << 20;
    config.auth = tokens(&[
        ("scanner", Role::Scanner, "t-scan"),
        ("officer", Role::Officer, "t-officer"),
        ("DE", Role::Partner, "t-de"),
    ]);
    config.exchange = ExchangeConfig {
        administration: "NL".into(),
        signing_key: Some(key_file.clone()),
        agreements: vec![Agreement {
            name: "NL-DE".into(),
            partner: "DE".into(),
            content: Content::Findings,
            ..Default::default()
        }],
        ..Default::default()
    };
    let server = niix::server::start(config.clone()).await.unwrap();
    let ch = niix::client::connect(&format!("http://{}", server.addr)).await.unwrap();
    let (scanner, officer, de) = (
        authed(ch.clone(), Some("t-scan")).unwrap(),
        authed(ch.clone(), Some("t-officer")).unwrap(),
        authed(ch.clone(), Some("t-de")).unwrap(),
    );
    let stored = push_container(&scanner, "NLRTM", "AB-1", true).await;
    let mut findings = FindingsClient::new(officer.clone());
    for _ in 0..600 {
        let f = findings.get_findings(GetFindingsRequest { scan_id: stored.clone() }).await.unwrap().into_inner();
        if f.status == ScanStatus::Analyzed as i32 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let list = || {
        let mut c = FindingsClient::new(officer.clone());
        async move { c.list_scans(ListScansRequest::default()).await.map(|r| r.into_inner()) }
    };
    let package = || {
        let mut c = ExchangeClient::new(de.clone());
        async move { c.get_package(GetPackageRequest { package_id: "NL.DE.1".into() }).await }
    };
    assert_eq!(list().await.unwrap().scans.len(), 1);
    package().await.expect("the package is served while there is room");

    // An upload is interrupted half-way: its bytes are staged.
    let raw = raw_bytes(1024, 1024, 7);
    let id = new_id();
    let h = header(&id, plane(PlaneEncoding::RawU16le, 1024, 1024, &raw));
    let err = push(&scanner, messages(&h, &[&raw[..1 << 20]], 1 << 18)).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{}", err.message());
    let staging = data.join("staging").join(&id);
    assert_eq!(std::fs::metadata(staging.join("plane-0")).unwrap().len(), 1 << 20);

    // Below the floor, a new upload is refused up front, naming the free space and the floor.
    let filler = fill(fs.path(), "filler", 4 << 20);
    let small = raw_bytes(64, 64, 1);
    let new = new_id();
    let err = push(&scanner, messages(&header(&new, plane(PlaneEncoding::RawU16le, 64, 64, &small)), &[&small], 4096))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(
        err.message().contains("bytes free") && err.message().contains("min_free_bytes keeps 8388608"),
        "{}",
        err.message()
    );
    assert!(!data.join("staging").join(&new).exists(), "nothing of the refused upload is staged");

    // Disk full: reads that cannot be audited are not answered.
    fill(fs.path(), "filler", 0);
    let (lists_ok, packages_ok) = (audited_ok(&data, "ListScans"), audited_ok(&data, "GetPackage"));
    let err = list().await.expect_err("no answer without an audit record");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(err.message().contains("audit log"), "{}", err.message());
    let err = package().await.expect_err("no package without an audit record");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert_eq!(audited_ok(&data, "ListScans"), lists_ok);
    assert_eq!(audited_ok(&data, "GetPackage"), packages_ok);
    // Reads arriving together share a group commit; the failed commit fails every caller in it.
    let (failed_before, commits_before) = (
        metric(&server, "niix_audit_write_failures_total").await,
        metric(&server, "niix_audit_group_commits_total").await,
    );
    let mut reads = tokio::task::JoinSet::new();
    for _ in 0..24 {
        reads.spawn(list());
    }
    while let Some(read) = reads.join_next().await {
        let err = read.unwrap().expect_err("no answer without an audit record");
        assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    }
    assert_eq!(metric(&server, "niix_audit_write_failures_total").await - failed_before, 24);
    let commits = metric(&server, "niix_audit_group_commits_total").await - commits_before;
    assert!(commits < 24, "{commits} group commits for 24 parallel reads: no grouping");
    assert_eq!(audited_ok(&data, "ListScans"), lists_ok);

    // Cleanup works on the full disk: the staged bytes go first, then the row and the audit record.
    let free_before = free_bytes(fs.path());
    let aborted = ScanIngestClient::new(scanner.clone())
        .abort_upload(AbortUploadRequest { scan_id: id.clone() })
        .await
        .expect("AbortUpload works on a full disk")
        .into_inner();
    assert!(aborted.aborted);
    assert!(!staging.exists(), "the staged bytes are gone");
    assert!(free_bytes(fs.path()) + (64 << 10) > free_before + (1 << 20) - (256 << 10), "about 1 MiB was freed");
    assert_eq!(audited_ok(&data, "AbortUpload"), 1);

    // With space again, everything answers (and is audited).
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(list().await.unwrap().scans.len(), 1);
    package().await.unwrap();
    assert_eq!(audited_ok(&data, "ListScans"), lists_ok + 1);
    server.shutdown().await.unwrap();

    // A start that cannot write its Start record refuses, saying why.
    let filler = fill(fs.path(), "filler", 0);
    let err = niix::server::start(config.clone()).await.err().expect("no start without an audit record");
    let msg = format!("{err:#}");
    assert!(msg.contains("cannot write the audit log") && msg.contains("audit trail"), "{msg}");
    // The same through the real binary: it exits with the reason instead of serving.
    let toml = keys_dir.path().join("niix.toml");
    std::fs::write(&toml, "[analysis]\nenabled = false\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_niix"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--web-listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&toml)
        .arg("--data")
        .arg(&data)
        .env("NIIX_LOG", "error")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut exited = None;
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if exited.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(exited.is_some_and(|s| !s.success()), "niix serve must refuse to start on a full disk: {stderr}");
    assert!(stderr.contains("cannot write the audit log"), "{stderr}");
    std::fs::remove_file(&filler).unwrap();
    let server = niix::server::start(config).await.expect("starts once there is room");
    server.shutdown().await.unwrap();
}
