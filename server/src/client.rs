//! Client side of the niix protocol: connecting, pushing a scan from files
//! with resume and retry, and describing image files as planes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use niix_inference::decode::{self, Encoding};
use niix_proto::v1::push_scan_request::Part;
use niix_proto::v1::scan_ingest_client::ScanIngestClient;
use niix_proto::v1::upload_status::State;
use niix_proto::v1::{
    GetUploadStatusRequest, PlaneChunk, PlaneDescriptor, PlaneEncoding, PlaneKind, PushScanRequest, ScanHeader,
    ScanReceipt,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::digest::sha256_hex;

/// Default server URL of the CLI.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";
/// Bytes of plane data per chunk message (well under gRPC's 4 MiB limit).
pub const CHUNK_BYTES: usize = 1 << 20;

/// Connects to a niix server.
pub async fn connect(url: &str) -> anyhow::Result<Channel> {
    connect_tls(url, None).await
}

/// TLS settings of a client: the CA that signed the server's certificate,
/// and optionally this client's certificate and key (mutual TLS).
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// CA certificate, PEM.
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate, PEM.
    pub cert: Option<std::path::PathBuf>,
    /// Client key, PEM.
    pub key: Option<std::path::PathBuf>,
    /// Name to check the server certificate against (default: the URL's host).
    pub domain: Option<String>,
}

/// Connects, over TLS when `tls` is given (use an `https://` URL).
pub async fn connect_tls(url: &str, tls: Option<&ClientTls>) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("invalid server URL {url:?} (expected e.g. {DEFAULT_SERVER})"))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    if let Some(t) = tls {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let mut c = ClientTlsConfig::new();
        if let Some(ca) = &t.ca {
            c = c.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
            c = c.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(d) = &t.domain {
            c = c.domain_name(d.clone());
        }
        endpoint = endpoint.tls_config(c).context("configuring TLS")?;
    }
    endpoint.connect().await.with_context(|| format!("cannot reach niix server at {url}: is `niix serve` running?"))
}

/// Adds `authorization: Bearer <token>` to every call, when there is a token.
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl Bearer {
    /// From a token (e.g. `--token` or `NIIX_TOKEN`).
    pub fn new(token: Option<&str>) -> anyhow::Result<Bearer> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Bearer(None)),
            Some(t) => Ok(Bearer(Some(
                format!("Bearer {t}").parse().map_err(|_| anyhow::anyhow!("the token must be printable ASCII"))?,
            ))),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel that authenticates its calls.
pub type Authed = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// Wraps a channel so its calls carry `token`.
pub fn authed(channel: Channel, token: Option<&str>) -> anyhow::Result<Authed> {
    Ok(tonic::service::interceptor::InterceptedService::new(channel, Bearer::new(token)?))
}

/// The encoding a file's name and first bytes suggest.
pub fn guess_encoding(path: &Path) -> anyhow::Result<PlaneEncoding> {
    let mut head = Vec::with_capacity(132);
    File::open(path)
        .and_then(|f| f.take(132).read_to_end(&mut head))
        .with_context(|| format!("cannot read {}", path.display()))?;
    if head.len() == 132 && &head[128..132] == b"DICM" {
        return Ok(PlaneEncoding::Dicos);
    }
    let magic = &head[..head.len().min(8)];
    if magic.starts_with(b"II*\0") || magic.starts_with(b"MM\0*") {
        return Ok(PlaneEncoding::Tiff);
    }
    if magic.starts_with(b"\x89PNG") {
        return Ok(PlaneEncoding::Png);
    }
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("raw" | "u16" | "bin") => Ok(PlaneEncoding::RawU16le),
        _ => bail!(
            "{} is neither a TIFF nor a PNG; name a raw little-endian u16 plane *.raw and give --width/--height",
            path.display()
        ),
    }
}

/// What the user says about a plane file beyond what the file says itself.
#[derive(Debug, Clone, Default)]
pub struct PlaneHints {
    /// Required for raw planes.
    pub width: Option<u32>,
    /// Required for raw planes.
    pub height: Option<u32>,
    /// Overrides the file's bits per sample.
    pub bits_stored: Option<u32>,
    /// Pixel size in millimetres (x, y).
    pub pixel_spacing_mm: (f64, f64),
}

/// Describes an image file as a plane: size, depth, encoding, byte length and
/// SHA-256 of the exact file bytes.
pub fn describe_plane(path: &Path, kind: PlaneKind, hints: &PlaneHints) -> anyhow::Result<PlaneDescriptor> {
    let encoding = guess_encoding(path)?;
    let open = || File::open(path).with_context(|| format!("cannot open {}", path.display()));
    let (width, height, bits) = match encoding {
        PlaneEncoding::RawU16le => match (hints.width, hints.height) {
            (Some(w), Some(h)) => (w, h, 16),
            _ => bail!("{} is a raw plane: give --width and --height", path.display()),
        },
        PlaneEncoding::Dicos => {
            // The DX object describes itself: size, depth, plane kind, spacing.
            let info =
                niix_inference::dicos::probe(open()?).with_context(|| format!("cannot read {}", path.display()))?;
            let byte_length = open()?.metadata()?.len();
            let sha256 = sha256_hex(open()?).with_context(|| format!("cannot read {}", path.display()))?;
            let file_kind = info
                .kind
                .as_deref()
                .and_then(|k| PlaneKind::from_str_name(&format!("PLANE_KIND_{}", k.to_ascii_uppercase())))
                .unwrap_or(kind);
            let (sx, sy) = info.pixel_spacing_mm.unwrap_or(hints.pixel_spacing_mm);
            let intensity = match info.intensity.as_deref() {
                Some("LOG") => niix_proto::v1::IntensityRelationship::Log,
                _ => niix_proto::v1::IntensityRelationship::Linear,
            };
            return Ok(PlaneDescriptor {
                kind: file_kind as i32,
                width: info.width,
                height: info.height,
                bits_stored: hints.bits_stored.unwrap_or(info.bits_stored),
                pixel_spacing_x_mm: sx,
                pixel_spacing_y_mm: sy,
                intensity: intensity as i32,
                encoding: encoding as i32,
                byte_length,
                sha256,
            });
        }
        _ => {
            let enc = if encoding == PlaneEncoding::Tiff { Encoding::Tiff } else { Encoding::Png };
            let h = decode::probe(open()?, enc).with_context(|| format!("cannot read {}", path.display()))?;
            (h.width, h.height, u32::from(h.bits_per_sample))
        }
    };
    let byte_length = open()?.metadata()?.len();
    let sha256 = sha256_hex(open()?).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(PlaneDescriptor {
        kind: kind as i32,
        width,
        height,
        bits_stored: hints.bits_stored.unwrap_or(bits),
        pixel_spacing_x_mm: hints.pixel_spacing_mm.0,
        pixel_spacing_y_mm: hints.pixel_spacing_mm.1,
        intensity: niix_proto::v1::IntensityRelationship::Linear as i32,
        encoding: encoding as i32,
        byte_length,
        sha256,
    })
}

/// A UUID derived from the scan's content, so pushing the same files twice
/// (or re-running an interrupted push) names the same scan.
pub fn content_scan_id(header: &ScanHeader) -> String {
    use prost::Message;
    use sha2::Digest;
    let mut h = header.clone();
    h.scan_id.clear();
    let digest = sha2::Sha256::digest(h.encode_to_vec());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid().hyphenated().to_string()
}

/// Observes a push's progress (e.g. a progress bar).
pub trait Progress: Send + Sync {
    /// Total bytes to send and bytes the server already held.
    fn start(&self, total: u64, held: u64);
    /// More bytes were handed to the transport.
    fn advance(&self, bytes: u64);
    /// The stream broke; a retry follows.
    fn retrying(&self, attempt: u32, error: &tonic::Status);
}

/// No progress reporting.
pub struct Quiet;

impl Progress for Quiet {
    fn start(&self, _: u64, _: u64) {}
    fn advance(&self, _: u64) {}
    fn retrying(&self, _: u32, _: &tonic::Status) {}
}

/// How a push behaves.
#[derive(Clone)]
pub struct PushOptions {
    /// Attempts after the first when the stream breaks.
    pub retries: u32,
    /// Bytes per chunk message.
    pub chunk_bytes: usize,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions { retries: 5, chunk_bytes: CHUNK_BYTES }
    }
}

fn transient(status: &tonic::Status) -> bool {
    use tonic::Code::*;
    matches!(status.code(), Unavailable | Unknown | Cancelled | Aborted | DeadlineExceeded)
}

/// Pushes a scan whose planes are `files` (same order as `header.planes`),
/// resuming from what the server already holds and retrying broken streams.
pub async fn push_files(
    channel: Authed,
    header: ScanHeader,
    files: Vec<PathBuf>,
    options: &PushOptions,
    progress: Arc<dyn Progress>,
) -> anyhow::Result<ScanReceipt> {
    if files.len() != header.planes.len() {
        bail!("{} files for {} planes", files.len(), header.planes.len());
    }
    let mut client = ScanIngestClient::new(channel);
    let mut attempt = 0;
    loop {
        let status = client
            .get_upload_status(GetUploadStatusRequest { scan_id: header.scan_id.clone() })
            .await
            .map(|r| r.into_inner());
        let offsets: Vec<u64> = match &status {
            Ok(s) if s.state == State::InProgress as i32 && !s.active && s.planes.len() == files.len() => {
                s.planes.iter().map(|p| p.received_bytes).collect()
            }
            _ => vec![0; files.len()],
        };
        let total: u64 = header.planes.iter().map(|p| p.byte_length).sum();
        progress.start(total, offsets.iter().sum());
        let stream = spawn_reader(header.clone(), files.clone(), offsets, options.chunk_bytes, progress.clone());
        match client.push_scan(stream).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(e) if transient(&e) && attempt < options.retries => {
                attempt += 1;
                progress.retrying(attempt, &e);
                tokio::time::sleep(Duration::from_millis(200 * (1 << attempt.min(5)))).await;
            }
            Err(e) => return Err(anyhow::Error::new(StatusError(e))),
        }
    }
}

/// A gRPC status as an error, printed as "CODE: message".
#[derive(Debug)]
pub struct StatusError(pub tonic::Status);

impl std::fmt::Display for StatusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.0.code(), self.0.message())
    }
}

impl std::error::Error for StatusError {}

/// Streams the header and the plane bytes from `offsets` on, reading files on
/// a blocking thread, at most a few chunks ahead of the network.
fn spawn_reader(
    header: ScanHeader,
    files: Vec<PathBuf>,
    offsets: Vec<u64>,
    chunk_bytes: usize,
    progress: Arc<dyn Progress>,
) -> ReceiverStream<PushScanRequest> {
    let (tx, rx) = mpsc::channel(4);
    let lengths: Vec<u64> = header.planes.iter().map(|p| p.byte_length).collect();
    tokio::task::spawn_blocking(move || {
        if tx.blocking_send(PushScanRequest { part: Some(Part::Header(header)) }).is_err() {
            return;
        }
        for (i, path) in files.iter().enumerate() {
            let Ok(mut file) = File::open(path) else { return };
            let mut offset = offsets[i];
            if file.seek(SeekFrom::Start(offset)).is_err() {
                return;
            }
            while offset < lengths[i] {
                let want = chunk_bytes.min((lengths[i] - offset) as usize);
                // Read into spare capacity: no zero-filling of a buffer the read overwrites.
                let mut data = Vec::with_capacity(want);
                if (&mut file).take(want as u64).read_to_end(&mut data).is_err() || data.len() < want {
                    return; // the server reports the truncated plane
                }
                let chunk = PlaneChunk { plane_index: i as u32, offset, data: data.into() };
                offset += want as u64;
                if tx.blocking_send(PushScanRequest { part: Some(Part::Chunk(chunk)) }).is_err() {
                    return;
                }
                progress.advance(want as u64);
            }
        }
    });
    ReceiverStream::new(rx)
}
