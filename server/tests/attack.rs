//! Attacks on the server's edges, through the real gRPC stack and the real
//! `/metrics` listener: made-up request paths, silent connections, upload
//! streams that hold slots or stall. docs/reliability.md ("Attacks") lists
//! them with what each test proves.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use niix::auth::Role;
use niix::config::Limits;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::scan_ingest_client::ScanIngestClient;
use niix_proto::v1::upload_status::State;
use niix_proto::v1::{GetUploadStatusRequest, ListScansRequest, PlaneEncoding, PushScanRequest};
use prost::bytes::{Buf, BufMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

/// Sends raw bytes and ignores what comes back: enough to call any path.
#[derive(Default)]
struct Raw;
struct RawEncoder;
struct RawDecoder;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put_slice(&item);
        Ok(())
    }
    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

impl Decoder for RawDecoder {
    type Item = ();
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        buf.advance(buf.remaining());
        Ok(Some(()))
    }
}

/// Calls `path` (any bytes the HTTP/2 client lets through) with an empty
/// message and no token.
async fn call_path(ch: &Channel, path: &str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(path).expect("a path the client can send");
    match grpc.unary(tonic::Request::new(Vec::new()), path, Raw).await {
        Ok(_) => panic!("a made-up path answered OK"),
        Err(s) => s,
    }
}

/// The `/metrics` page over plain HTTP/1.1.
async fn fetch_metrics(at: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(at).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: niix\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut page = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut page)).await.unwrap().unwrap();
    let page = String::from_utf8(page).expect("the metrics page is UTF-8");
    let (head, body) = page.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// One sample of the exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

/// Parses an OpenMetrics text page strictly: every line is a HELP, TYPE or
/// UNIT comment of a declared family, a sample of a declared family with
/// well-formed, correctly escaped labels and a number, and the page ends in
/// `# EOF`. Panics naming the first line that is not.
fn parse_openmetrics(page: &str) -> Vec<Sample> {
    let mut families: Vec<String> = Vec::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = page.strip_suffix('\n').expect("ends in a newline").split('\n').collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "the page ends in # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            assert!(matches!(kind, "HELP" | "TYPE" | "UNIT"), "unknown comment: {line}");
            assert!(is_name(name), "bad family name: {line}");
            if kind == "TYPE" {
                let t = parts.next().unwrap_or("");
                assert!(
                    matches!(t, "counter" | "gauge" | "histogram" | "summary" | "info" | "stateset" | "unknown"),
                    "{line}"
                );
                families.push(name.to_string());
            }
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or_else(|| panic!("no value: {line:.200}"));
        let name = &line[..end];
        assert!(is_name(name), "bad metric name: {line:.200}");
        assert!(
            families.iter().any(|f| name == f || name.strip_prefix(f.as_str()).is_some_and(|s| s.starts_with('_'))),
            "{name} belongs to no declared family"
        );
        let mut rest = &line[end..];
        let mut labels = BTreeMap::new();
        if let Some(r) = rest.strip_prefix('{') {
            rest = r;
            loop {
                let eq = rest.find('=').unwrap_or_else(|| panic!("label without '=': {line:.200}"));
                let key = &rest[..eq];
                assert!(is_name(key), "bad label name {key:?} in {line:.200}");
                rest = rest[eq + 1..].strip_prefix('"').unwrap_or_else(|| panic!("unquoted label: {line:.200}"));
                let mut value = String::new();
                let mut chars = rest.char_indices();
                let close = loop {
                    match chars.next() {
                        None => panic!("unterminated label value: {line:.200}"),
                        Some((i, '"')) => break i,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            Some((_, 'n')) => value.push('\n'),
                            other => panic!("bad escape {other:?} in {line:.200}"),
                        },
                        Some((_, c)) => value.push(c),
                    }
                };
                assert!(labels.insert(key.to_string(), value).is_none(), "label {key} twice: {line:.200}");
                rest = &rest[close + 1..];
                if let Some(r) = rest.strip_prefix(',') {
                    rest = r;
                } else {
                    rest = rest.strip_prefix('}').unwrap_or_else(|| panic!("junk after a label: {line:.200}"));
                    break;
                }
            }
        }
        let value = rest.strip_prefix(' ').unwrap_or_else(|| panic!("no space before the value: {line:.200}"));
        let value = value.split(' ').next().unwrap();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value {v:?} is not a number: {line:.200}")),
        };
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    samples
}

/// Every `rpc` label is a method the server has, or `unknown`.
fn check_rpc_labels(samples: &[Sample]) {
    for s in samples {
        if let Some(rpc) = s.labels.get("rpc") {
            assert!(
                rpc == "unknown" || niix::metrics::rpc_label(rpc) == rpc,
                "{}: rpc label {rpc:?} is outside the closed set",
                s.name
            );
        }
    }
}

/// With `NIIX_PROM_PYTHON` naming a Python that has `prometheus_client`
/// (`make attack` sets it), also parses the page with Prometheus' own
/// OpenMetrics parser and returns how many samples it read.
fn python_parse(page: &str) -> Option<usize> {
    let python = std::env::var_os("NIIX_PROM_PYTHON")?;
    let script = "import sys\n\
from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
print(sum(len(f.samples) for f in text_string_to_metric_families(sys.stdin.read())))\n";
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("NIIX_PROM_PYTHON runs");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), page.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "prometheus_client refused the page: {}", String::from_utf8_lossy(&out.stderr));
    Some(String::from_utf8(out.stdout).unwrap().trim().parse().unwrap())
}

fn value(samples: &[Sample], name: &str) -> f64 {
    samples.iter().filter(|s| s.name == name).map(|s| s.value).sum()
}

/// Deterministic "random" path bytes the HTTP/2 client accepts.
fn random_path(seed: u64, len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@\"{}";
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    let mut p = String::from("/");
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p.push(ALPHABET[(x % ALPHABET.len() as u64) as usize] as char);
        if p.len() % 97 == 0 {
            p.push('/');
        }
    }
    p
}

#[tokio::test]
async fn made_up_paths_are_refused_without_touching_labels_or_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Limits::default());
    config.analysis.enabled = false;
    config.auth = tokens(&[("officer-1", Role::Officer, "tok-officer")]);
    let server = niix::server::start(config).await.unwrap();
    let ch = channel(&server).await;
    let metrics_at = server.metrics_addr.unwrap();

    // A known method without a token: refused, audited, labelled by its name.
    let denied = FindingsClient::new(ch.clone()).list_scans(ListScansRequest::default()).await.unwrap_err();
    assert_eq!(denied.code(), Code::Unauthenticated);
    let before = fetch_metrics(metrics_at).await;
    let samples = parse_openmetrics(&before);
    check_rpc_labels(&samples);
    assert!(before.contains("niix_request_errors_total{rpc=\"ListScans\",code=\"Unauthenticated\"} 1"), "{before}");

    let mut paths = vec![
        "/x/inj\"}{".to_string(),
        "/niix.v1.Findings/Nope".into(),
        "/niix.v1.Findings/ListScans/more".into(),
        "/grpc.health.v1.Health/List".into(),
    ];
    paths.extend((0..40).map(|i| random_path(i, 12 * 1024)));
    for p in &paths {
        let s = call_path(&ch, p).await;
        assert_eq!(s.code(), Code::Unimplemented, "{:.80}: {}", p, s.message());
        assert!(s.message().contains("no such method"), "{}", s.message());
        assert!(s.message().len() < 200, "the reply does not echo the path");
    }

    let after = fetch_metrics(metrics_at).await;
    let samples = parse_openmetrics(&after);
    check_rpc_labels(&samples);
    if let Some(n) = python_parse(&after) {
        assert_eq!(n, samples.len(), "prometheus_client and the strict parser read the same samples");
    }
    assert_eq!(value(&samples, "niix_unknown_rpc_requests_total"), paths.len() as f64);
    assert!(!after.contains("inj"), "a made-up path reached the page");
    assert!(
        after.len() < before.len() + 256,
        "the page grew from {} to {} bytes with {} made-up paths",
        before.len(),
        after.len(),
        paths.len()
    );
    // The server still answers a real call.
    let authed = niix::client::authed(ch.clone(), Some("tok-officer")).unwrap();
    let mut list = tonic::Request::new(ListScansRequest::default());
    list.set_timeout(Duration::from_secs(2));
    FindingsClient::new(authed).list_scans(list).await.unwrap();
    server.shutdown().await.unwrap();

    // Nothing of the made-up calls is in the audit log; every field is bounded.
    let db = niix::store::SqliteMetadata::open(&dir.path().join("niix.db")).unwrap();
    let log = niix::store::MetadataStore::audit_tail(&db, 100_000).unwrap();
    let actions: Vec<&str> = log.iter().map(|r| r.entry.action.as_str()).collect();
    assert_eq!(actions, ["Start", "ReadConfig", "ListScans", "ListScans"], "{log:?}");
    for r in &log {
        for f in [&r.entry.identity, &r.entry.role, &r.entry.action, &r.entry.object, &r.entry.outcome] {
            assert!(f.len() <= niix::audit::MAX_FIELD_BYTES, "{f:.80}");
        }
    }
}

/// A push that sends its header (and `first` bytes of its plane) and then
/// holds the stream open until `hold` is dropped.
async fn hanging_push(
    ch: &Channel,
    token: &str,
    first: usize,
) -> (String, mpsc::Sender<PushScanRequest>, tokio::task::JoinHandle<Result<(), tonic::Status>>) {
    let raw = raw_bytes(32, 16, 7);
    let h = header(&new_id(), plane(PlaneEncoding::RawU16le, 32, 16, &raw));
    let (tx, rx) = mpsc::channel(4);
    let mut msgs = messages(&h, &[&raw[..first.max(1)]], 256);
    if first == 0 {
        msgs.truncate(1);
    }
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    let client = niix::client::authed(ch.clone(), Some(token)).unwrap();
    let call =
        tokio::spawn(async move { ScanIngestClient::new(client).push_scan(ReceiverStream::new(rx)).await.map(drop) });
    (h.scan_id, tx, call)
}

/// Waits until the server reports an upload of `id` as streaming.
async fn wait_streaming(ch: &Channel, token: &str, id: &str) {
    let mut c = ScanIngestClient::new(niix::client::authed(ch.clone(), Some(token)).unwrap());
    for _ in 0..200 {
        let s = c.get_upload_status(GetUploadStatusRequest { scan_id: id.into() }).await.unwrap().into_inner();
        if s.active {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the upload of {id} never started");
}

#[tokio::test]
async fn idle_uploads_of_one_scanner_do_not_block_another_scanner() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits { max_concurrent_uploads: 4, max_uploads_per_identity: 2, ..Limits::default() };
    let mut config = config(dir.path(), limits);
    config.analysis.enabled = false;
    config.auth = tokens(&[("scanner-a", Role::Scanner, "tok-a"), ("scanner-b", Role::Scanner, "tok-b")]);
    let server = niix::server::start(config).await.unwrap();
    let ch = channel(&server).await;

    // Scanner A opens more idle uploads than it may: two hold a slot, the
    // rest are refused at once, naming the per-scanner limit.
    let mut held = Vec::new();
    for _ in 0..2 {
        let (id, tx, call) = hanging_push(&ch, "tok-a", 256).await;
        wait_streaming(&ch, "tok-a", &id).await;
        held.push((tx, call));
    }
    for _ in 0..4 {
        let (_, _tx, call) = hanging_push(&ch, "tok-a", 256).await;
        let e = tokio::time::timeout(Duration::from_secs(10), call).await.unwrap().unwrap().unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
        assert!(e.message().contains("scanner-a is streaming 2 uploads already"), "{}", e.message());
    }
    // Scanner B's push goes through while A's uploads hang.
    let raw = raw_bytes(32, 16, 9);
    let h = header(&new_id(), plane(PlaneEncoding::RawU16le, 32, 16, &raw));
    let b = niix::client::authed(ch.clone(), Some("tok-b")).unwrap();
    let receipt = tokio::time::timeout(
        Duration::from_secs(10),
        ScanIngestClient::new(b).push_scan(tokio_stream::iter(messages(&h, &[&raw], 256))),
    )
    .await
    .expect("scanner B's push is not blocked")
    .unwrap()
    .into_inner();
    assert_eq!(receipt.planes[0].sha256, sha256(&raw));
    drop(held);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stalled_upload_is_cut_and_resumes_from_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits { upload_stall_timeout: Duration::from_millis(400), ..Limits::default() };
    let mut config = config(dir.path(), limits);
    config.analysis.enabled = false;
    config.auth = tokens(&[("scanner-a", Role::Scanner, "tok-a")]);
    let server = niix::server::start(config).await.unwrap();
    let ch = channel(&server).await;

    let (id, _hold, call) = hanging_push(&ch, "tok-a", 512).await;
    let e = tokio::time::timeout(Duration::from_secs(10), call).await.unwrap().unwrap().unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    assert!(
        e.message().contains("sent nothing for 400ms") && e.message().contains("GetUploadStatus and resume"),
        "{}",
        e.message()
    );
    // A push that never sends its header is cut the same way.
    let (tx, rx) = mpsc::channel::<PushScanRequest>(1);
    let client = niix::client::authed(ch.clone(), Some("tok-a")).unwrap();
    let mut silent = ScanIngestClient::new(client);
    let e = tokio::time::timeout(Duration::from_secs(10), silent.push_scan(ReceiverStream::new(rx)))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    drop(tx);

    // The 512 bytes that arrived are kept, and the upload resumes from them.
    let mut ingest = ScanIngestClient::new(niix::client::authed(ch.clone(), Some("tok-a")).unwrap());
    let status = ingest.get_upload_status(GetUploadStatusRequest { scan_id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(status.state, State::InProgress as i32);
    assert!(!status.active);
    assert_eq!(status.planes[0].received_bytes, 512);
    let raw = raw_bytes(32, 16, 7);
    let h = header(&id, plane(PlaneEncoding::RawU16le, 32, 16, &raw));
    let mut rest = vec![PushScanRequest { part: messages(&h, &[], 256)[0].part.clone() }];
    rest.extend(raw[512..].chunks(256).enumerate().map(|(k, c)| chunk_msg(0, 512 + (k * 256) as u64, c)));
    let receipt = ingest.push_scan(tokio_stream::iter(rest)).await.unwrap().into_inner();
    assert_eq!(receipt.planes[0].sha256, sha256(&raw));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn silent_connections_are_closed_and_health_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        handshake_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(1500),
        keepalive_interval: Duration::from_millis(300),
        keepalive_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let mut config = config(dir.path(), limits);
    config.analysis.enabled = false;
    let server = niix::server::start(config).await.unwrap();
    let metrics_at = server.metrics_addr.unwrap();
    // A live client connects before the flood and then stays quiet.
    let ch = channel(&server).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let check = || {
        let mut r = tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: String::new() });
        r.set_timeout(Duration::from_secs(1));
        r
    };
    health.check(check()).await.unwrap();

    let mut silent = Vec::new();
    for i in 0..60 {
        let at = if i % 6 == 0 { metrics_at } else { server.addr };
        silent.push(tokio::net::TcpStream::connect(at).await.unwrap());
    }
    health.check(check()).await.expect("health answers while silent connections are open");
    // Each is closed by the server within the handshake timeout (plus slack):
    // reading reaches the end of the stream (after the server's HTTP/2 SETTINGS).
    let started = std::time::Instant::now();
    for mut s in silent {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => panic!("a silent connection stayed open"),
            }
        }
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // The quiet live client outlives the idle timeout: it answers pings.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    health.check(check()).await.unwrap();
    let page = fetch_metrics(metrics_at).await;
    let samples = parse_openmetrics(&page);
    assert_eq!(value(&samples, "niix_connections_timed_out_total"), 60.0, "{page}");
    server.shutdown().await.unwrap();
}

/// Reads `s` until the server closes it; false if it stays open for `wait`.
async fn closed_within(s: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 256];
    let until = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn a_burst_of_silent_connections_is_capped_and_health_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    // The handshake timeout is far away: only the connection cap can help.
    let limits = Limits { max_connections: 16, handshake_timeout: Duration::from_secs(60), ..Limits::default() };
    let mut config = config(dir.path(), limits);
    config.analysis.enabled = false;
    let server = niix::server::start(config).await.unwrap();
    let metrics_at = server.metrics_addr.unwrap();

    // Four times the cap of sockets that never send a byte, on both ports.
    let mut silent = Vec::new();
    for i in 0..64 {
        let at = if i % 8 == 0 { metrics_at } else { server.addr };
        silent.push(tokio::net::TcpStream::connect(at).await.unwrap());
    }
    // A new client gets in at once (they never sent a byte), and its health
    // check answers within a second.
    let ch = channel(&server).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let mut r = tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: String::new() });
    r.set_timeout(Duration::from_secs(1));
    health.check(r).await.expect("health answers past a burst of silent connections");

    // At most the cap stay open: each connection past the cap closed the
    // oldest silent one (or was refused while closed ones still held their
    // handles); all well before the handshake timeout.
    let mut closed = 0;
    for s in &mut silent {
        if closed_within(s, Duration::from_millis(300)).await {
            closed += 1;
        }
    }
    // 64 silent + 1 health client (+ the metrics fetch below) under a cap of 16.
    assert!(closed >= 64 + 1 - 16, "only {closed} of 64 silent connections were closed");
    let page = fetch_metrics(metrics_at).await;
    let samples = parse_openmetrics(&page);
    let (evicted, refused) =
        (value(&samples, "niix_connections_evicted_total"), value(&samples, "niix_connections_refused_total"));
    assert!(evicted >= 1.0 && evicted + refused >= 49.0, "{page}");
    assert_eq!(value(&samples, "niix_connections_timed_out_total"), 0.0, "{page}");
    server.shutdown().await.unwrap();
}
