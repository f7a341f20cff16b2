//! Shared helpers of the integration tests: a real server on loopback, real
//! image files, hand-made push streams.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use niix::config::{Config, Limits};
use niix::server::{self, RunningServer};
use niix_proto::v1::push_scan_request::Part;
use niix_proto::v1::scan_ingest_client::ScanIngestClient;
use niix_proto::v1::{
    PlaneChunk, PlaneDescriptor, PlaneEncoding, PlaneKind, PushScanRequest, ScanHeader, ScanMetadata, ScanReceipt,
};
use tonic::transport::Channel;

/// The repository's fixtures/ directory.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// A server on an ephemeral loopback port over `data`.
pub async fn start(data: &Path) -> RunningServer {
    start_with(data, Limits::default()).await
}

/// Same with custom limits.
pub async fn start_with(data: &Path, limits: Limits) -> RunningServer {
    server::start(config(data, limits)).await.expect("server starts")
}

/// The configuration the test servers use.
pub fn config(data: &Path, limits: Limits) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: data.to_path_buf(),
        models_dir: fixtures().join("models"),
        shutdown_grace: Duration::from_millis(500),
        limits,
        // The tests' small scans and expectations are made for the demo model.
        analysis: niix::config::AnalysisConfig { model: Some("demo-local-contrast".into()), ..Default::default() },
        web: niix::config::WebConfig { listen: Some("127.0.0.1:0".parse().unwrap()), ..Default::default() },
        ..Config::default()
    }
}

/// A client channel to a running server.
pub async fn channel(server: &RunningServer) -> Channel {
    niix::client::connect(&format!("http://{}", server.addr)).await.unwrap()
}

/// Deterministic 16-bit samples that look nothing like a constant.
pub fn samples(width: u32, height: u32, seed: u32) -> Vec<u16> {
    (0..width * height).map(|i| ((i ^ seed).wrapping_mul(2654435761) >> 9) as u16).collect()
}

/// Writes a 16-bit grey TIFF and returns its bytes.
pub fn write_tiff(path: &Path, width: u32, height: u32, seed: u32) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    tiff::encoder::TiffEncoder::new(&mut buf)
        .unwrap()
        .write_image::<tiff::encoder::colortype::Gray16>(width, height, &samples(width, height, seed))
        .unwrap();
    let bytes = buf.into_inner();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// Writes a 16-bit grey PNG and returns its bytes.
pub fn write_png(path: &Path, width: u32, height: u32, seed: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Sixteen);
    let mut w = enc.write_header().unwrap();
    let bytes: Vec<u8> = samples(width, height, seed).iter().flat_map(|v| v.to_be_bytes()).collect();
    w.write_image_data(&bytes).unwrap();
    w.finish().unwrap();
    std::fs::write(path, &out).unwrap();
    out
}

/// Raw little-endian u16 bytes.
pub fn raw_bytes(width: u32, height: u32, seed: u32) -> Vec<u8> {
    samples(width, height, seed).iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Hex SHA-256.
pub fn sha256(bytes: &[u8]) -> String {
    niix::digest::sha256_hex(bytes).unwrap()
}

/// A fresh random scan id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A header for one plane.
pub fn header(id: &str, plane: PlaneDescriptor) -> ScanHeader {
    ScanHeader {
        scan_id: id.to_string(),
        metadata: Some(ScanMetadata {
            site_id: "NLRTM-01".into(),
            lane_id: "L1".into(),
            container_numbers: vec!["CSQU3054383".into()],
            ..Default::default()
        }),
        planes: vec![plane],
    }
}

/// A plane descriptor for `bytes` in `encoding`.
pub fn plane(encoding: PlaneEncoding, width: u32, height: u32, bytes: &[u8]) -> PlaneDescriptor {
    PlaneDescriptor {
        kind: PlaneKind::HighEnergy as i32,
        width,
        height,
        bits_stored: 16,
        pixel_spacing_x_mm: 4.0,
        pixel_spacing_y_mm: 4.0,
        intensity: 1,
        encoding: encoding as i32,
        byte_length: bytes.len() as u64,
        sha256: String::new(),
    }
}

/// The header message followed by each plane's bytes in chunks of `chunk`.
pub fn messages(header: &ScanHeader, planes: &[&[u8]], chunk: usize) -> Vec<PushScanRequest> {
    let mut out = vec![PushScanRequest { part: Some(Part::Header(header.clone())) }];
    for (i, bytes) in planes.iter().enumerate() {
        for (k, piece) in bytes.chunks(chunk).enumerate() {
            out.push(chunk_msg(i as u32, (k * chunk) as u64, piece));
        }
    }
    out
}

/// One chunk message.
pub fn chunk_msg(plane: u32, offset: u64, data: &[u8]) -> PushScanRequest {
    PushScanRequest { part: Some(Part::Chunk(PlaneChunk { plane_index: plane, offset, data: data.to_vec().into() })) }
}

/// Pushes hand-made messages.
pub async fn push_messages(channel: &Channel, msgs: Vec<PushScanRequest>) -> Result<ScanReceipt, tonic::Status> {
    let mut client = ScanIngestClient::new(channel.clone());
    client.push_scan(tokio_stream::iter(msgs)).await.map(|r| r.into_inner())
}

/// Path of a file in a temp dir.
pub fn file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `niix serve` as a child process.
pub struct Server {
    child: Child,
    /// Its gRPC URL.
    pub url: String,
}

impl Server {
    /// Starts it on a free port over `data` and waits until it answers.
    pub async fn spawn(data: &Path) -> Server {
        let port = free_port();
        let mut args: Vec<std::ffi::OsString> = vec!["--data".into(), data.into(), "--models".into()];
        args.push(fixtures().join("models").into());
        args.extend(["--model".into(), "demo-local-contrast".into()]);
        Server::spawn_args(port, &args).await
    }

    /// `niix serve --listen 127.0.0.1:<port> <args>`, once the port accepts
    /// connections (plain TCP, so it works for TLS servers too).
    pub async fn spawn_args(port: u16, args: &[std::ffi::OsString]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_niix"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--metrics-listen",
                "127.0.0.1:0",
                "--web-listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .env("NIIX_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Server { child, url };
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("niix serve did not come up");
    }

    /// The server's peak resident memory so far (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/PID/status");
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(self) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        // Drop reaps it.
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The project's Python with pydicom and numpy (`make pyenv`), for checking
/// DICOS files against an independent implementation.
pub fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.niix/venv/bin/python");
    assert!(p.exists(), "{} is missing: run `make pyenv` (make test does)", p.display());
    p
}

/// Runs a Python script from fixtures/ and returns its stdout.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let out = Command::new(python()).arg(fixtures().join(script)).args(args).output().unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Open cargo (~30000 counts with a fine texture) with an optional dense
/// block `(x, y, width, height)` at 3000 counts; `low` gives the low-energy
/// plane (60 %).
pub fn cargo_samples(w: u32, h: u32, block: Option<(u32, u32, u32, u32)>, low: bool) -> Vec<u16> {
    (0..w * h)
        .map(|i| {
            let (x, y) = (i % w, i / w);
            let inside = block.is_some_and(|(bx, by, bw, bh)| x >= bx && x < bx + bw && y >= by && y < by + bh);
            let base: u32 = if inside { 3000 } else { 30000 + (i.wrapping_mul(7919) % 97) };
            (if low { base * 3 / 5 } else { base }) as u16
        })
        .collect()
}

/// Waits until a scan is ANALYZED or FAILED and returns its findings.
pub async fn wait_analysed(ch: &Channel, id: &str) -> niix_proto::v1::ScanFindings {
    use niix_proto::v1::{GetFindingsRequest, ScanStatus};
    let mut client = niix_proto::v1::findings_client::FindingsClient::new(ch.clone());
    for _ in 0..600 {
        let f = client.get_findings(GetFindingsRequest { scan_id: id.into() }).await.unwrap().into_inner();
        if matches!(ScanStatus::try_from(f.status), Ok(ScanStatus::Analyzed | ScanStatus::Failed)) {
            return f;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("scan {id} was not analysed in time");
}

/// A directory of test certificates and keys (PEM).
pub struct Pki {
    /// Where the files go.
    pub dir: std::path::PathBuf,
}

impl Pki {
    /// Writes one PEM file; returns its path.
    pub fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// A self-signed CA.
pub fn ca(name: &str) -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert, rcgen::Issuer::new(params, key))
}

/// A certificate for `name` (also its DNS name) signed by `issuer`.
pub fn leaf(name: &str, issuer: &rcgen::Issuer<'static, rcgen::KeyPair>) -> (rcgen::Certificate, rcgen::KeyPair) {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().unwrap();
    (params.signed_by(&key, issuer).unwrap(), key)
}

/// Pushes a 256x128 container scan from `site` with plate `plate`; an
/// `alarm` scan has a dense block the demo model flags. Returns its id.
pub async fn push_container(conn: &niix::client::Authed, site: &str, plate: &str, alarm: bool) -> String {
    use niix_proto::v1::ConveyanceType;
    let raw: Vec<u8> = cargo_samples(256, 128, alarm.then_some((100, 40, 40, 30)), false)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mut h = header(&new_id(), plane(PlaneEncoding::RawU16le, 256, 128, &raw));
    let m = h.metadata.as_mut().unwrap();
    m.site_id = site.into();
    m.vehicle_plate = plate.into();
    m.conveyance = ConveyanceType::Container as i32;
    let receipt = ScanIngestClient::new(conn.clone())
        .push_scan(tokio_stream::iter(messages(&h, &[&raw], 1 << 16)))
        .await
        .unwrap();
    receipt.into_inner().scan_id
}

/// An `[auth]` section with one bearer token per `(identity, role, token)`.
pub fn tokens(entries: &[(&str, niix::auth::Role, &str)]) -> niix::auth::AuthConfig {
    niix::auth::AuthConfig {
        tokens: entries
            .iter()
            .map(|(id, role, tok)| niix::auth::TokenConfig {
                identity: id.to_string(),
                role: *role,
                sha256: niix::auth::token_hash(tok),
                sites: vec![],
            })
            .collect(),
        ..Default::default()
    }
}

/// A model repository under `dir`: the demo model as it is, and its graph
/// again under each `(name, channels line)` of `variants`, marked as a
/// demonstration (`demo = true`, never chosen by an `"auto"` fallback) or
/// not as `demo` says.
pub fn demo_model_variants(dir: &Path, variants: &[(&str, &str)], demo: bool) -> PathBuf {
    let models = dir.join("models");
    let source = fixtures().join("models/demo-local-contrast/1");
    let copy = |name: &str| {
        let v = models.join(name).join("1");
        std::fs::create_dir_all(&v).unwrap();
        std::fs::copy(source.join("model.onnx"), v.join("model.onnx")).unwrap();
        v
    };
    let toml = std::fs::read_to_string(source.join("model.toml")).unwrap();
    std::fs::write(copy("demo-local-contrast").join("model.toml"), &toml).unwrap();
    for (name, channels) in variants {
        let mut t = toml.replace(r#"name = "demo-local-contrast""#, &format!("name = \"{name}\""));
        if !demo {
            t = t.replace("demo = true", "demo = false");
        }
        let line = t.lines().find(|l| l.starts_with("channels")).unwrap().to_string();
        std::fs::write(copy(name).join("model.toml"), t.replace(&line, channels)).unwrap();
    }
    models
}
