//! The bad-input catalogue: every kind of malformed push a scanner (or an
//! attacker) can send, through the real gRPC stack into the real embedded
//! store. Each case asserts the exact status, the message
//! docs/reliability.md promises for it (its quoted fragments), that the
//! server still answers real calls within a deadline, that nothing became
//! visible under the scan id the case actually sent, and, for a push kept
//! for resume, the offset to resume from. The catalogue in
//! docs/reliability.md lists the same cases, with the same status; this test
//! checks that it does.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::*;
use niix::config::Limits;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::scan_ingest_client::ScanIngestClient;
use niix_proto::v1::upload_status::State;
use niix_proto::v1::{
    AbortUploadRequest, GetScanRequest, GetUploadStatusRequest, ListScansRequest, PlaneDescriptor, PlaneEncoding,
    PlaneKind, ScanHeader, ScanReceipt,
};
use prost::Message;
use prost::bytes::BufMut;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// A codec that sends bytes as they are, so a case can send what no
/// well-behaved client would (invalid UTF-8, broken protobuf).
#[derive(Default)]
struct Verbatim;

struct VerbatimEncoder;
struct ReceiptDecoder;

impl Codec for Verbatim {
    type Encode = Vec<u8>;
    type Decode = ScanReceipt;
    type Encoder = VerbatimEncoder;
    type Decoder = ReceiptDecoder;
    fn encoder(&mut self) -> VerbatimEncoder {
        VerbatimEncoder
    }
    fn decoder(&mut self) -> ReceiptDecoder {
        ReceiptDecoder
    }
}

impl Encoder for VerbatimEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

impl Decoder for ReceiptDecoder {
    type Item = ScanReceipt;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<ScanReceipt>, Status> {
        ScanReceipt::decode(buf).map(Some).map_err(|e| Status::internal(e.to_string()))
    }
}

/// Pushes already-encoded PushScanRequest messages.
async fn push_frames(ch: &Channel, frames: Vec<Vec<u8>>) -> Result<ScanReceipt, Status> {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/niix.v1.ScanIngest/PushScan");
    grpc.client_streaming(tonic::Request::new(tokio_stream::iter(frames)), path, Verbatim).await.map(|r| r.into_inner())
}

/// One bad input: what is sent, and what the server must answer.
struct Case {
    /// Its name in docs/reliability.md.
    name: &'static str,
    /// The scan id the frames carry, exactly as sent (checked to be
    /// invisible afterwards); `None` when they carry none (no header, or
    /// one that does not parse).
    id: Option<String>,
    frames: Vec<Vec<u8>>,
    code: Code,
    /// A part of the message that tells the sender what to fix.
    needle: &'static str,
    /// The bytes received are kept (invisible) for a resume from this offset
    /// of plane 0.
    staged: Option<u64>,
}

impl Case {
    /// The server keeps what arrived before the fault, `offset` bytes of
    /// plane 0, for a resume.
    fn staged(mut self, offset: u64) -> Case {
        self.staged = Some(offset);
        self
    }
}

fn encode(msgs: Vec<niix_proto::v1::PushScanRequest>) -> Vec<Vec<u8>> {
    msgs.iter().map(|m| m.encode_to_vec()).collect()
}

/// A case whose frames are `h` followed by `planes` in chunks of `chunk`.
fn pushed(
    name: &'static str,
    h: &ScanHeader,
    planes: &[&[u8]],
    chunk: usize,
    code: Code,
    needle: &'static str,
) -> Case {
    Case { name, id: Some(h.scan_id.clone()), frames: encode(messages(h, planes, chunk)), code, needle, staged: None }
}

/// A case whose header is refused before any plane byte is read.
fn header_case(name: &'static str, code: Code, needle: &'static str, edit: impl FnOnce(&mut ScanHeader)) -> Case {
    let raw = raw_bytes(32, 16, 3);
    let mut h = header(&new_id(), plane(PlaneEncoding::RawU16le, 32, 16, &raw));
    edit(&mut h);
    pushed(name, &h, &[&raw], 256, code, needle)
}

/// A case with one plane of `bytes` declared as `encoding`, `width` x `height`.
fn image_case(
    name: &'static str,
    encoding: PlaneEncoding,
    (width, height): (u32, u32),
    bytes: &[u8],
    code: Code,
    needle: &'static str,
) -> Case {
    let h = header(&new_id(), plane(encoding, width, height, bytes));
    pushed(name, &h, &[bytes], 4096, code, needle)
}

/// A PNG of 1x1 whose IHDR is rewritten to claim `side` x `side` 16-bit
/// pixels: a few dozen bytes that would inflate to gigabytes.
fn png_bomb(dir: &Path, side: u32) -> Vec<u8> {
    let mut png = write_png(&dir.join("bomb.png"), 1, 1, 1);
    // Signature (8), IHDR length (4) and type (4), then width and height.
    png[16..20].copy_from_slice(&side.to_be_bytes());
    png[20..24].copy_from_slice(&side.to_be_bytes());
    let crc = crc32fast::hash(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// A little-endian TIFF whose one strip claims `side` x `side` 16-bit
/// deflate-compressed pixels, in a few hundred bytes.
fn tiff_bomb(side: u32) -> Vec<u8> {
    const LONG: u16 = 4;
    const SHORT: u16 = 3;
    let strip = vec![0x78, 0x9c, 0x63, 0x60, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01];
    let entries: [(u16, u16, u32); 9] = [
        (256, LONG, side),               // ImageWidth
        (257, LONG, side),               // ImageLength
        (258, SHORT, 16),                // BitsPerSample
        (259, SHORT, 8),                 // Compression: deflate
        (262, SHORT, 1),                 // PhotometricInterpretation: black is zero
        (273, LONG, 8 + 2 + 9 * 12 + 4), // StripOffsets: right after the IFD
        (277, SHORT, 1),                 // SamplesPerPixel
        (278, LONG, side),               // RowsPerStrip
        (279, LONG, strip.len() as u32), // StripByteCounts
    ];
    let mut out = b"II*\0".to_vec();
    out.extend_from_slice(&8u32.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for (tag, kind, value) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        let mut v = [0u8; 4];
        if kind == SHORT {
            v[..2].copy_from_slice(&(value as u16).to_le_bytes());
        } else {
            v.copy_from_slice(&value.to_le_bytes());
        }
        out.extend_from_slice(&v);
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&strip);
    out
}

/// An 8-bit grey PNG.
fn png8(width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().unwrap();
    w.write_image_data(&vec![128u8; (width * height) as usize]).unwrap();
    w.finish().unwrap();
    out
}

/// Every case of the catalogue, in the order of docs/reliability.md.
fn catalogue(dir: &Path) -> Vec<Case> {
    use Code::{DataLoss, InvalidArgument as Invalid, ResourceExhausted as Exhausted};
    let raw = raw_bytes(32, 16, 3);
    let fresh = || header(&new_id(), plane(PlaneEncoding::RawU16le, 32, 16, &raw));
    vec![
        Case {
            name: "empty-stream",
            id: None,
            frames: vec![],
            code: Invalid,
            needle: "must be a ScanHeader",
            staged: None,
        },
        Case {
            name: "chunk-before-header",
            id: None,
            frames: encode(vec![chunk_msg(0, 0, &raw)]),
            code: Invalid,
            needle: "first message of a push must be a ScanHeader",
            staged: None,
        },
        {
            let h = fresh();
            let mut msgs = messages(&h, &[&raw], 256);
            msgs.insert(2, msgs[0].clone());
            Case {
                name: "second-header",
                id: Some(h.scan_id),
                frames: encode(msgs),
                code: Invalid,
                needle: "only one ScanHeader",
                staged: Some(256),
            }
        },
        {
            // Field 1 of PushScanRequest (header), holding field 1 of
            // ScanHeader (scan_id) with two bytes that are not UTF-8.
            let frames = vec![vec![0x0a, 0x04, 0x0a, 0x02, 0xff, 0xfe]];
            Case { name: "non-utf8-string", id: None, frames, code: Invalid, needle: "UTF-8", staged: None }
        },
        {
            // A length-delimited field whose length runs past the message.
            let frames = vec![vec![0x0a, 0x7f, 0x01]];
            Case {
                name: "broken-protobuf",
                id: None,
                frames,
                code: Invalid,
                needle: "not valid protobuf",
                staged: None,
            }
        },
        header_case("invalid-uuid", Invalid, "not a UUID", |h| h.scan_id = "scan-1".into()),
        header_case("empty-scan-id", Invalid, "scan_id is empty", |h| h.scan_id.clear()),
        header_case("invalid-iso6346", Invalid, "check digit", |h| {
            h.metadata.as_mut().unwrap().container_numbers = vec!["CSQU3054384".into()]
        }),
        header_case("missing-metadata", Invalid, "no metadata", |h| h.metadata = None),
        header_case("empty-site", Invalid, "site_id is empty", |h| h.metadata.as_mut().unwrap().site_id = " ".into()),
        header_case("bad-timestamp", Invalid, "nanos", |h| {
            h.metadata.as_mut().unwrap().scan_time = Some(prost_types::Timestamp { seconds: 0, nanos: -1 })
        }),
        header_case("unknown-conveyance", Invalid, "unknown conveyance type value 42", |h| {
            h.metadata.as_mut().unwrap().conveyance = 42
        }),
        header_case("no-planes", Invalid, "no image planes", |h| h.planes.clear()),
        header_case("too-many-planes", Exhausted, "limit of 8", |h| h.planes = vec![h.planes[0].clone(); 9]),
        header_case("oversize-header", Exhausted, "scan header is", |h| {
            h.metadata.as_mut().unwrap().remarks = "x".repeat(70_000)
        }),
        header_case("unknown-plane-kind", Invalid, "unknown plane kind value 77", |h| h.planes[0].kind = 77),
        header_case("unset-plane-kind", Invalid, "kind is not set", |h| h.planes[0].kind = 0),
        header_case("unknown-encoding", Invalid, "unknown plane encoding value 9", |h| h.planes[0].encoding = 9),
        header_case("unknown-intensity", Invalid, "unknown intensity relationship", |h| h.planes[0].intensity = 5),
        header_case("zero-dimension", Invalid, "must be positive", |h| h.planes[0].width = 0),
        header_case("huge-dimension", Exhausted, "pixels per side", |h| h.planes[0].height = 1 << 20),
        header_case("too-many-pixels", Exhausted, "pixels exceeds", |h| {
            (h.planes[0].width, h.planes[0].height) = (100_000, 100_000)
        }),
        header_case("bits-stored-out-of-range", Invalid, "bits_stored must be 1..16", |h| h.planes[0].bits_stored = 0),
        header_case("bad-pixel-spacing", Invalid, "pixel_spacing_y_mm", |h| h.planes[0].pixel_spacing_y_mm = -1.0),
        header_case("empty-plane", Invalid, "byte_length is 0", |h| h.planes[0].byte_length = 0),
        header_case("raw-size-lies", Invalid, "byte_length says 1022", |h| h.planes[0].byte_length = 1022),
        header_case("plane-over-limit", Exhausted, "bytes per plane", |h| {
            (h.planes[0].width, h.planes[0].height, h.planes[0].byte_length) = (2048, 2049, 2048 * 2049 * 2)
        }),
        header_case("malformed-digest", Invalid, "64 lowercase hex", |h| h.planes[0].sha256 = "ABC".into()),
        header_case("duplicate-plane-kind", Invalid, "a scan carries each kind of plane once", |h| {
            h.planes.push(h.planes[0].clone())
        }),
        header_case("mismatched-plane-sizes", Invalid, "must have the same size", |h| {
            let low = PlaneDescriptor {
                kind: PlaneKind::LowEnergy as i32,
                width: 16,
                byte_length: 512,
                ..h.planes[0].clone()
            };
            h.planes.push(low)
        }),
        {
            let h = fresh();
            let mut msgs = messages(&h, &[&raw], 256);
            msgs.swap(1, 2);
            Case {
                name: "chunk-out-of-order",
                id: Some(h.scan_id),
                frames: encode(msgs),
                code: Invalid,
                needle: "expected plane 0 at offset 0",
                staged: Some(0),
            }
        },
        {
            let h = fresh();
            let mut msgs = messages(&h, &[&raw], 256);
            msgs.insert(1, chunk_msg(3, 0, &raw[..256]));
            Case {
                name: "chunk-for-undeclared-plane",
                id: Some(h.scan_id),
                frames: encode(msgs),
                code: Invalid,
                needle: "got plane 3",
                staged: Some(0),
            }
        },
        {
            let mut extra = raw.clone();
            extra.extend_from_slice(&[0, 0]);
            pushed("more-bytes-than-declared", &fresh(), &[&extra], 300, Invalid, "runs past the declared byte_length")
                .staged(900)
        },
        {
            let mut extra = raw.clone();
            extra.extend_from_slice(&[0, 0]);
            pushed("chunk-after-last-byte", &fresh(), &[&extra], 256, Invalid, "after every declared byte").staged(1024)
        },
        {
            let h = fresh();
            pushed("truncated-stream", &h, &[&raw[..512]], 256, DataLoss, "call GetUploadStatus and resume").staged(512)
        },
        {
            let mut h = fresh();
            h.planes[0].sha256 = sha256(b"something else");
            pushed("wrong-digest", &h, &[&raw], 256, DataLoss, "declared sha256")
        },
        {
            let mut h = fresh();
            h.planes[0].bits_stored = 12;
            pushed("sample-over-bits-stored", &h, &[&raw], 256, Invalid, "does not fit in bits_stored = 12")
        },
        image_case("corrupt-tiff", PlaneEncoding::Tiff, (32, 16), &[7u8; 3000], Invalid, "not a decodable TIFF"),
        {
            let tif = write_tiff(&dir.join("t.tif"), 32, 16, 5);
            image_case("truncated-tiff", PlaneEncoding::Tiff, (32, 16), &tif[..tif.len() / 2], Invalid, "TIFF")
        },
        image_case("tiff-bomb", PlaneEncoding::Tiff, (64, 64), &tiff_bomb(60_000), Invalid, "60000x60000"),
        {
            let tif = write_tiff(&dir.join("b.tif"), 32, 16, 5);
            let mut h = header(&new_id(), plane(PlaneEncoding::Tiff, 32, 16, &tif));
            h.planes[0].bits_stored = 12;
            pushed("tiff-declared-bit-depth", &h, &[&tif], 4096, Invalid, "does not fit in bits_stored = 12")
        },
        image_case(
            "corrupt-png",
            PlaneEncoding::Png,
            (32, 16),
            &[0x89, b'P', b'N', b'G', 1, 2, 3],
            Invalid,
            "not a decodable PNG",
        ),
        {
            let mut png = write_png(&dir.join("c.png"), 32, 16, 4);
            let n = png.len();
            png[n - 20] ^= 0xff; // inside the IDAT data: its CRC no longer matches
            image_case("png-bad-crc", PlaneEncoding::Png, (32, 16), &png, Invalid, "PNG")
        },
        image_case("png-bomb", PlaneEncoding::Png, (64, 64), &png_bomb(dir, 60_000), Invalid, "60000x60000"),
        {
            let png = write_png(&dir.join("d.png"), 64, 48, 1);
            image_case("wrong-dimensions", PlaneEncoding::Png, (48, 64), &png, Invalid, "64x48")
        },
        image_case("wrong-bit-depth", PlaneEncoding::Png, (32, 16), &png8(32, 16), Invalid, "8-bit"),
        image_case("corrupt-dicos", PlaneEncoding::Dicos, (32, 16), &[7u8; 3000], Invalid, "DICOS"),
        {
            let dx = dir.join("t.dcs");
            run_python(
                "dicos/make_dx.py",
                &[dx.to_str().unwrap(), "--width", "64", "--height", "48", "--kind", "HIGH ENERGY"],
            );
            let bytes = std::fs::read(&dx).unwrap();
            image_case(
                "truncated-dicos",
                PlaneEncoding::Dicos,
                (64, 48),
                &bytes[..bytes.len() - 1000],
                Invalid,
                "DICOS",
            )
        },
        {
            // One message over gRPC's 4 MiB frame limit.
            let big = raw_bytes(1024, 2048, 1);
            let h = header(&new_id(), plane(PlaneEncoding::RawU16le, 1024, 2048, &big));
            pushed("oversize-message", &h, &[&big], big.len(), Exhausted, "message length too large").staged(0)
        },
        {
            // A chunk one byte over the documented limit, in a message under 4 MiB.
            let big = raw_bytes(1024, 2048, 1);
            let h = header(&new_id(), plane(PlaneEncoding::RawU16le, 1024, 2048, &big));
            let chunk = niix_proto::MAX_CHUNK_DATA + 1;
            pushed("oversize-chunk", &h, &[&big], chunk, Exhausted, "at most 4194277 data bytes").staged(0)
        },
    ]
}

/// Blob and staging files under the data directory.
fn stored_files(data: &Path) -> usize {
    fn walk(p: &Path) -> usize {
        std::fs::read_dir(p)
            .map_or(0, |rd| rd.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum())
    }
    walk(&data.join("blobs")) + walk(&data.join("staging"))
}

/// What docs/reliability.md promises for one case.
struct Promise {
    code: Code,
    /// "kept for resume".
    kept: bool,
    /// The `quoted` fragments of "the message says": each must be in the message.
    fragments: Vec<String>,
}

/// The rows of the bad-input table of docs/reliability.md, by case name.
fn promises() -> BTreeMap<String, Promise> {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reliability.md")).unwrap();
    let section = doc.split("\n## Bad input\n").nth(1).expect("a Bad input section");
    let section = section.split("\n## ").next().unwrap();
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        assert_eq!(cells.len(), 4, "a catalogue row has four cells: {line}");
        let name = cells[0].trim_matches('`').to_string();
        let (status, kept) = match cells[2].strip_suffix(", kept for resume") {
            Some(s) => (s, true),
            None => (cells[2], false),
        };
        let code = match status {
            "INVALID_ARGUMENT" => Code::InvalidArgument,
            "RESOURCE_EXHAUSTED" => Code::ResourceExhausted,
            "DATA_LOSS" => Code::DataLoss,
            other => panic!("{name}: unexpected status {other} in the docs"),
        };
        let fragments: Vec<String> = cells[3].split('`').skip(1).step_by(2).map(String::from).collect();
        assert!(rows.insert(name.clone(), Promise { code, kept, fragments }).is_none(), "{name} listed twice");
    }
    rows
}

/// A request that fails instead of hanging if the server is wedged.
fn within<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(Duration::from_secs(5));
    r
}

#[tokio::test]
async fn every_bad_input_gets_its_status_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let limits = Limits { max_plane_bytes: 8 << 20, ..Limits::default() };
    let server = start_with(&data, limits).await;
    let ch = channel(&server).await;
    let cases = catalogue(dir.path());
    assert!(cases.len() >= 25, "the catalogue has {} cases", cases.len());
    let names: BTreeSet<_> = cases.iter().map(|c| c.name.to_string()).collect();
    assert_eq!(names.len(), cases.len(), "case names are unique");
    // The catalogue in the docs lists exactly these cases.
    let promised = promises();
    assert_eq!(
        promised.keys().cloned().collect::<BTreeSet<_>>(),
        names,
        "docs/reliability.md lists the catalogue's cases"
    );

    let mut findings = FindingsClient::new(ch.clone());
    let mut ingest = ScanIngestClient::new(ch.clone());
    let mut broken_promises = Vec::new();
    for case in cases {
        let promise = &promised[case.name];
        assert_eq!(promise.code, case.code, "{}: the docs give another status", case.name);
        assert_eq!(promise.kept, case.staged.is_some(), "{}: the docs disagree on \"kept for resume\"", case.name);
        let files = stored_files(&data);
        let err = push_frames(&ch, case.frames).await.expect_err(case.name);
        println!("{}: {:?}: {}", case.name, err.code(), err.message());
        assert_eq!(err.code(), case.code, "{}: {}", case.name, err.message());
        assert!(err.message().contains(case.needle), "{}: {:?} not in {:?}", case.name, case.needle, err.message());
        if !promise.fragments.iter().any(|f| f.len() >= 10) {
            broken_promises.push(format!("{}: the docs quote no `fragment` of 10 bytes or more", case.name));
        }
        for f in promise.fragments.iter().filter(|f| !err.message().contains(f.as_str())) {
            broken_promises.push(format!("{}: the docs quote {f:?}, the message is {:?}", case.name, err.message()));
        }

        // The server still answers calls that go through the store, in time.
        let listed = findings.list_scans(within(ListScansRequest::default())).await;
        let listed = listed.unwrap_or_else(|e| panic!("{}: the server stopped answering: {e}", case.name));
        assert!(listed.into_inner().scans.is_empty(), "{}: a refused push became visible", case.name);
        let probe = ingest.get_upload_status(within(GetUploadStatusRequest { scan_id: new_id() })).await;
        let probe = probe.unwrap_or_else(|e| panic!("{}: the server stopped answering: {e}", case.name));
        assert_eq!(probe.into_inner().state, State::Unknown as i32);

        // Nothing under the id the case sent.
        if let Some(id) = &case.id {
            let scan = findings.get_scan(within(GetScanRequest { scan_id: id.clone() })).await.unwrap_err();
            let upload = ingest.get_upload_status(within(GetUploadStatusRequest { scan_id: id.clone() })).await;
            if header_id_is_valid(id) {
                assert_eq!(scan.code(), Code::NotFound, "{}: {}", case.name, scan.message());
                let upload = upload.unwrap().into_inner();
                match case.staged {
                    Some(offset) => {
                        // Kept (invisible) for a resume from where the bytes stopped.
                        assert_eq!(upload.state, State::InProgress as i32, "{}", case.name);
                        assert!(!upload.active, "{}: the refused stream still holds its upload", case.name);
                        assert_eq!(upload.planes[0].received_bytes, offset, "{}: resume offset", case.name);
                        // Aborting removes every byte of it.
                        ingest.abort_upload(AbortUploadRequest { scan_id: id.clone() }).await.unwrap();
                    }
                    None => assert_eq!(upload.state, State::Unknown as i32, "{}", case.name),
                }
            } else {
                // No scan can be stored under an id that is not a UUID: the
                // server refuses to look it up at all.
                assert_eq!(scan.code(), Code::InvalidArgument, "{}: {}", case.name, scan.message());
                assert_eq!(upload.unwrap_err().code(), Code::InvalidArgument, "{}", case.name);
            }
        }
        assert_eq!(stored_files(&data), files, "{}: a refused push left files", case.name);
    }
    assert!(
        broken_promises.is_empty(),
        "docs/reliability.md promises messages the server does not give:\n{}",
        broken_promises.join("\n")
    );

    // And a good scan still goes in.
    let raw = raw_bytes(32, 16, 3);
    let good = header(&new_id(), plane(PlaneEncoding::RawU16le, 32, 16, &raw));
    let receipt = push_frames(&ch, encode(messages(&good, &[&raw], 256))).await.unwrap();
    assert_eq!(receipt.planes[0].sha256, sha256(&raw));
    server.shutdown().await.unwrap();
}

/// True for a scan id the server can store a scan under (a hyphenated UUID).
fn header_id_is_valid(id: &str) -> bool {
    niix::header::canonical_scan_id(id).is_ok()
}
