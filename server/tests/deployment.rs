//! What an operator meets first, through the real binary and a real server:
//! the defaults work from the repository root, a server without a servable
//! model says so (health and `niix scans`), and `niix doctor` checks a
//! deployment and says what to fix.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use niix::server::ANALYSIS_HEALTH;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The repository root (where `make run` runs).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

fn niix_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_niix")).current_dir(dir).args(args).env("NIIX_LOG", "warn").output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The status `service` reports in the health check at `url`.
async fn health_of(url: &str, service: &str) -> i32 {
    let mut health = HealthClient::new(niix::client::connect(url).await.unwrap());
    health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status
}

/// `niix serve` as a child process in `cwd`, with no `--models`.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn serve_in(cwd: &Path, data: &Path) -> (Child, String) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_niix"))
        .current_dir(cwd)
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
        .env("NIIX_LOG", "warn")
        .env_remove("NIIX_MODELS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = Child(child);
    for _ in 0..800 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return (child, format!("http://127.0.0.1:{port}"));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("niix serve did not come up");
}

#[tokio::test]
async fn serve_from_the_repository_root_serves_the_bundled_model() {
    let root = repo_root();
    assert!(!root.join("models").exists(), "this test needs a checkout without a models/ directory");
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve_in(&root, &dir.path().join("data")).await;
    assert_eq!(health_of(&url, ANALYSIS_HEALTH).await, ServingStatus::Serving as i32);
    let out = niix_in(&root, &["scans", "--server", &url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("warning"), "{}", text(&out.stderr));
}

#[tokio::test]
async fn a_server_without_a_model_says_so_in_health_and_in_scans() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("models");
    std::fs::create_dir(&empty).unwrap();
    let server = Server::spawn_args(
        free_port(),
        &["--data".into(), dir.path().join("data").into(), "--models".into(), empty.into()],
    )
    .await;
    assert_eq!(health_of(&server.url, ANALYSIS_HEALTH).await, ServingStatus::NotServing as i32);
    // Ingest itself still serves: scans are accepted and queue.
    assert_eq!(health_of(&server.url, "niix.v1.ScanIngest").await, ServingStatus::Serving as i32);
    let out = niix_in(dir.path(), &["scans", "--server", &server.url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("warning: the server is not analysing scans") && err.contains("NOT_SERVING"), "{err}");
    assert!(text(&out.stdout).starts_with("scan_id"), "the listing still follows: {}", text(&out.stdout));
}

#[tokio::test]
async fn analysis_health_turns_serving_when_a_model_is_added() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    let mut config = config(&dir.path().join("data"), Default::default());
    config.models_dir = models.clone();
    config.analysis.reload_interval = Duration::from_millis(100);
    let server = niix::server::start(config).await.unwrap();
    let url = format!("http://{}", server.addr);
    assert_eq!(health_of(&url, ANALYSIS_HEALTH).await, ServingStatus::NotServing as i32);

    // Copied beside the repository, then renamed in, as a deployment adds one.
    let staged = dir.path().join("staged");
    std::fs::create_dir_all(staged.join("1")).unwrap();
    let bundled = fixtures().join("models/demo-local-contrast/1");
    for f in std::fs::read_dir(&bundled).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), staged.join("1").join(f.file_name())).unwrap();
    }
    std::fs::rename(&staged, models.join("demo-local-contrast")).unwrap();
    let started = Instant::now();
    while health_of(&url, ANALYSIS_HEALTH).await != ServingStatus::Serving as i32 {
        assert!(started.elapsed() < Duration::from_secs(30), "the reloaded model never made analysis SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await.unwrap();
}

#[test]
fn doctor_passes_a_working_deployment() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let models = fixtures().join("models");
    let out = niix_in(dir.path(), &["doctor", "--data", data.to_str().unwrap(), "--models", models.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    for check in ["config", "bind", "auth", "tls", "data", "runtime", "models"] {
        let line =
            stdout.lines().find(|l| l.split_whitespace().nth(1) == Some(check)).unwrap_or_else(|| panic!("{stdout}"));
        // A machine with little free disk gets a WARN about it; that is the
        // host's state, not the deployment's.
        let low_disk = check == "data" && line.starts_with("WARN") && line.contains("free");
        assert!(line.starts_with("OK") || low_disk, "{check}: {stdout}");
    }
    assert!(stdout.contains("cargo-patchcore v1") && stdout.contains("demo-local-contrast v1"), "{stdout}");
    assert!(!data.exists(), "doctor must not create the data directory");
}

/// The FAIL line of `check`, and the fix line after it.
fn failure<'a>(stdout: &'a str, check: &str) -> (&'a str, &'a str) {
    let lines: Vec<&str> = stdout.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.starts_with("FAIL") && l.split_whitespace().nth(1) == Some(check))
        .unwrap_or_else(|| panic!("no FAIL for {check}:\n{stdout}"));
    let fix = lines.get(i + 1).copied().unwrap_or_default();
    assert!(fix.trim_start().starts_with("fix:"), "{check} says what to fix:\n{stdout}");
    (lines[i], fix)
}

#[test]
fn doctor_fails_a_broken_deployment_and_says_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki { dir: dir.path().to_path_buf() };
    let (ca_cert, issuer) = ca("doctor CA");
    let (server_cert, _its_key) = leaf("localhost", &issuer);
    let (_other_cert, other_key) = leaf("other", &issuer);
    let cert = pki.write("server.pem", &server_cert.pem());
    let wrong_key = pki.write("other.key", &other_key.serialize_pem());
    let client_ca = pki.write("ca.pem", &ca_cert.pem());
    let empty = dir.path().join("models");
    std::fs::create_dir(&empty).unwrap();
    let config = dir.path().join("niix.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"0.0.0.0:50051\"\nmodels_dir = {:?}\n[tls]\ncert = {cert:?}\nkey = {wrong_key:?}\nclient_ca = {client_ca:?}\n\
             [[auth.tokens]]\nidentity = \"scanner-1\"\nrole = \"scanner\"\nsha256 = \"abc\"\n",
            empty
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let out = niix_in(dir.path(), &["doctor", "--config", config.to_str().unwrap(), "--data", data.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(text(&out.stderr).contains("checks failed"), "{}", text(&out.stderr));
    let (line, _) = failure(&stdout, "auth");
    assert!(line.contains("64 lowercase hex"), "{line}");
    let (line, fix) = failure(&stdout, "tls");
    assert!(line.contains("does not belong to the certificate"), "{line}");
    assert!(fix.contains("key the certificate was issued for"), "{fix}");
    let (line, _) = failure(&stdout, "models");
    assert!(line.contains("serves no version"), "{line}");
    assert!(
        stdout
            .lines()
            .any(|l| (l.starts_with("OK") || l.starts_with("WARN") && l.contains("free")) && l.contains("data")),
        "{stdout}"
    );

    // The same deployment without ONNX Runtime, and with a public address and
    // no authentication at all.
    std::fs::write(&config, "listen = \"0.0.0.0:50051\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_niix"))
        .current_dir(dir.path())
        .args(["doctor", "--config", config.to_str().unwrap(), "--data", data.to_str().unwrap()])
        .env("ORT_DYLIB_PATH", dir.path().join("no-such-libonnxruntime.so"))
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let (line, fix) = failure(&stdout, "runtime");
    assert!(line.contains("ORT_DYLIB_PATH"), "{line}");
    assert!(fix.contains("make onnxruntime"), "{fix}");
    let (line, _) = failure(&stdout, "bind");
    assert!(line.contains("0.0.0.0:50051") && line.contains("refuses it"), "{line}");
}
