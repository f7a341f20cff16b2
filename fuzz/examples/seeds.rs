//! Writes the small seed inputs of the Rust-encoded fuzz corpora into
//! `corpus/<target>/seed-*` (run from `fuzz/`: `cargo run --example seeds`).
//! The DICOS seeds come from `fixtures/dicos/make_dx.py` (see `README.md`).

use std::io::Cursor;
use std::path::Path;

use niix_proto::v1::{
    AlarmDecision, PackageContent, PlaneDescriptor, PlaneEncoding, PlaneImage, PlaneKind, Region, ReportType,
    ScanHeader, ScanMetadata, ThreatReport,
};
use prost::Message;
use tiff::encoder::{Compression, TiffEncoder, colortype};

const SCAN_ID: &str = "0f8e4b1c-2d3a-4e5f-8a9b-0c1d2e3f4a5b";

fn pattern(w: u32, h: u32) -> Vec<u16> {
    (0..w * h).map(|i| 30000u16.wrapping_add((i.wrapping_mul(7919) % 97) as u16)).collect()
}

fn tiff16(w: u32, h: u32, rows_per_strip: u32, compression: Compression) -> Vec<u8> {
    let mut buf = Cursor::new(Vec::new());
    let mut enc = TiffEncoder::new(&mut buf).unwrap().with_compression(compression);
    let mut img = enc.new_image::<colortype::Gray16>(w, h).unwrap();
    img.rows_per_strip(rows_per_strip).unwrap();
    img.write_data(&pattern(w, h)).unwrap();
    buf.into_inner()
}

fn tiff8(w: u32, h: u32) -> Vec<u8> {
    let px: Vec<u8> = pattern(w, h).iter().map(|v| (v >> 8) as u8).collect();
    let mut buf = Cursor::new(Vec::new());
    TiffEncoder::new(&mut buf).unwrap().write_image::<colortype::Gray8>(w, h, &px).unwrap();
    buf.into_inner()
}

fn png(w: u32, h: u32, depth: png::BitDepth) -> Vec<u8> {
    let px = pattern(w, h);
    let bytes: Vec<u8> = match depth {
        png::BitDepth::Sixteen => px.iter().flat_map(|v| v.to_be_bytes()).collect(),
        _ => px.iter().map(|v| (v >> 8) as u8).collect(),
    };
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(depth);
    let mut wr = enc.write_header().unwrap();
    wr.write_image_data(&bytes).unwrap();
    wr.finish().unwrap();
    out
}

fn plane(kind: PlaneKind, encoding: PlaneEncoding, w: u32, h: u32, byte_length: u64, sha256: &str) -> PlaneDescriptor {
    PlaneDescriptor {
        kind: kind as i32,
        width: w,
        height: h,
        bits_stored: 16,
        encoding: encoding as i32,
        byte_length,
        pixel_spacing_x_mm: 2.0,
        pixel_spacing_y_mm: 2.0,
        sha256: sha256.into(),
        ..Default::default()
    }
}

fn header() -> ScanHeader {
    ScanHeader {
        scan_id: SCAN_ID.into(),
        metadata: Some(ScanMetadata {
            site_id: "NLRTM-01".into(),
            container_numbers: vec!["CSQU3054383".into(), "TGHU5679118".into()],
            ..Default::default()
        }),
        planes: vec![
            plane(PlaneKind::HighEnergy, PlaneEncoding::RawU16le, 4, 2, 16, ""),
            plane(PlaneKind::LowEnergy, PlaneEncoding::Tiff, 4, 2, 300, &"ab".repeat(32)),
        ],
    }
}

fn content() -> PackageContent {
    let planes = vec![plane(PlaneKind::HighEnergy, PlaneEncoding::Png, 8, 6, 120, &"cd".repeat(32))];
    let image = PlaneImage { plane_index: 0, factor: 2, width: 4, height: 3, png: png(4, 3, png::BitDepth::Sixteen) };
    let report = ThreatReport {
        r#type: ReportType::Machine as i32,
        decision: AlarmDecision::Alarm as i32,
        score: 0.5,
        regions: vec![Region { id: 1, x: 2, y: 1, width: 3, height: 2, max_score: 0.5, ..Default::default() }],
        ..Default::default()
    };
    PackageContent {
        package_id: format!("{}.{}.7", niix_fuzz::ISSUER, niix_fuzz::RECIPIENT),
        issuer: niix_fuzz::ISSUER.into(),
        recipient: niix_fuzz::RECIPIENT.into(),
        sequence: 7,
        agreement: "findings".into(),
        scan_id: SCAN_ID.into(),
        metadata: header().metadata,
        planes,
        reports: vec![report],
        plane_images: vec![image],
        ..Default::default()
    }
}

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend_from_slice(bytes);
    out
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn main() {
    assert!(Path::new("fuzz_targets").is_dir(), "run from the fuzz/ directory");
    write("tiff_plane", "gray16-strips", &tiff16(8, 6, 2, Compression::Uncompressed));
    write("tiff_plane", "gray16-lzw", &tiff16(8, 6, 3, Compression::Lzw));
    write("tiff_plane", "gray16-deflate", &tiff16(8, 6, 6, Compression::Deflate(Default::default())));
    write("tiff_plane", "gray8", &tiff8(5, 3));
    write("png_plane", "gray16", &png(8, 6, png::BitDepth::Sixteen));
    write("png_plane", "gray8", &png(5, 3, png::BitDepth::Eight));
    write("scan_header", "header", &header().encode_to_vec());
    write("scan_header", "scan-id", SCAN_ID.as_bytes());
    write("scan_header", "container", b"CSQU3054383");
    let key = niix_fuzz::issuer_key();
    let content = content();
    let signed = niix::exchange::keys::sign(&key, &content);
    write("package_verify", "signed", &with_mode(0, &signed.encode_to_vec()));
    write("package_verify", "content", &with_mode(1, &content.encode_to_vec()));
    write("package_verify", "altered", &with_mode(2, &with_mode(17, &content.encode_to_vec())));
}
