//! Decompression bombs against the real binary: small files that declare
//! huge planes. Each is refused with a clear status before it is decoded,
//! or accepted and then handled a row at a time; either way the server's
//! peak resident memory (VmHWM) stays under 1 GiB (a memory bound, not a
//! timing). Before rows were streamed, the DICOS bomb peaked at 2.4 GB and
//! the PNG bomb's analysis at 2.6 GB.

mod common;

use common::{Server, messages, new_id, push_messages, sha256, wait_analysed};
use dicom_core::value::{PixelFragmentSequence, Value};
use dicom_core::{DataElement, VR, dicom_value};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use niix_proto::v1::{PlaneDescriptor, PlaneEncoding, PlaneKind, ScanHeader, ScanMetadata};
use tonic::Code;

const DX_PROCESSING: &str = "1.2.840.10008.5.1.4.1.1.501.2.2";
const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";
/// The bound the server must stay under, MiB.
const PEAK_MIB: u64 = 1024;

/// PackBits of `n` copies of `value`: runs of 128 (two bytes each).
fn packbits_constant(n: usize, value: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(n / 64 + 2);
    let mut left = n;
    while left > 0 {
        let run = left.min(128);
        out.extend([(1 - run as i32) as u8, value]);
        left -= run;
    }
    out
}

/// A DICOS DX object, RLE Lossless, of `side x side` 16-bit samples all
/// equal to `sample`: a few MB that decode to `side² x 2` bytes.
fn dicos_rle_bomb(side: u16, sample: u16) -> Vec<u8> {
    let pixels = usize::from(side) * usize::from(side);
    let high = packbits_constant(pixels, (sample >> 8) as u8);
    let low = packbits_constant(pixels, sample as u8);
    let mut fragment = vec![0u8; 64];
    fragment[..4].copy_from_slice(&2u32.to_le_bytes());
    fragment[4..8].copy_from_slice(&64u32.to_le_bytes());
    fragment[8..12].copy_from_slice(&(64 + high.len() as u32).to_le_bytes());
    fragment.extend(high);
    fragment.extend(low);
    let mut obj = InMemDicomObject::new_empty();
    obj.put(DataElement::new(tags::SOP_CLASS_UID, VR::UI, DX_PROCESSING));
    obj.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, "1.2.3.4"));
    obj.put(DataElement::new(tags::MODALITY, VR::CS, "DX"));
    obj.put(DataElement::new(tags::IMAGE_TYPE, VR::CS, dicom_value!(Strs, ["ORIGINAL", "PRIMARY", "HIGH ENERGY"])));
    obj.put(DataElement::new(tags::ROWS, VR::US, dicom_value!(U16, [side])));
    obj.put(DataElement::new(tags::COLUMNS, VR::US, dicom_value!(U16, [side])));
    obj.put(DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, dicom_value!(U16, [1])));
    obj.put(DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"));
    obj.put(DataElement::new(tags::BITS_ALLOCATED, VR::US, dicom_value!(U16, [16])));
    obj.put(DataElement::new(tags::BITS_STORED, VR::US, dicom_value!(U16, [16])));
    obj.put(DataElement::new(tags::HIGH_BIT, VR::US, dicom_value!(U16, [15])));
    obj.put(DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, dicom_value!(U16, [0])));
    let sequence = PixelFragmentSequence::new(Vec::<u32>::new(), vec![fragment]);
    obj.put(DataElement::new(tags::PIXEL_DATA, VR::OB, Value::PixelSequence(sequence)));
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(RLE_LOSSLESS)
                .media_storage_sop_class_uid(DX_PROCESSING)
                .media_storage_sop_instance_uid("1.2.3.4"),
        )
        .unwrap();
    let mut out = Vec::new();
    file.write_all(&mut out).unwrap();
    out
}

/// A 16-bit grey PNG of `side x side` samples all equal to `sample`.
fn png_bomb(side: u32, sample: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, side, side);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Sixteen);
    enc.set_compression(png::Compression::Fast);
    let mut header = enc.write_header().unwrap();
    let mut writer = header.stream_writer().unwrap();
    let row: Vec<u8> = std::iter::repeat_n(sample.to_be_bytes(), side as usize).flatten().collect();
    for _ in 0..side {
        std::io::Write::write_all(&mut writer, &row).unwrap();
    }
    writer.finish().unwrap();
    header.finish().unwrap();
    out
}

fn plane(kind: PlaneKind, encoding: PlaneEncoding, (w, h): (u32, u32), bytes: &[u8]) -> PlaneDescriptor {
    PlaneDescriptor {
        kind: kind as i32,
        width: w,
        height: h,
        bits_stored: 16,
        pixel_spacing_x_mm: 4.0,
        pixel_spacing_y_mm: 4.0,
        intensity: 1,
        encoding: encoding as i32,
        byte_length: bytes.len() as u64,
        sha256: sha256(bytes),
    }
}

fn header(planes: Vec<PlaneDescriptor>) -> ScanHeader {
    ScanHeader {
        scan_id: new_id(),
        metadata: Some(ScanMetadata { site_id: "NLRTM-01".into(), lane_id: "L1".into(), ..Default::default() }),
        planes,
    }
}

/// A 19 MB RLE object declaring 23168x23168 pushed with a descriptor that
/// says 2048x2048: refused from the object's header, nothing decoded.
#[tokio::test(flavor = "multi_thread")]
async fn a_dicos_rle_bomb_that_is_not_what_its_descriptor_says_is_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::spawn(dir.path()).await;
    let ch = niix::client::connect(&server.url).await.unwrap();
    let bomb = dicos_rle_bomb(23168, 30000);
    assert!(bomb.len() < 32 << 20, "{} bytes", bomb.len());
    let h = header(vec![plane(PlaneKind::HighEnergy, PlaneEncoding::Dicos, (2048, 2048), &bomb)]);
    let status = push_messages(&ch, messages(&h, &[&bomb], 1 << 20)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("the DICOS image is 23168x23168 pixels but the plane descriptor says 2048x2048"),
        "{}",
        status.message()
    );
    let peak = server.peak_rss_mib();
    println!("dicos_rle_bomb_refused_peak_rss_mib {peak}");
    assert!(peak < PEAK_MIB, "peak RSS {peak} MiB");
}

/// Bombs that are what they declare, within the server's limits: a
/// 23168x23168 DICOS RLE plane and a 16384x16384 dual-energy PNG scan are
/// checked row by row at ingest and accepted; the demo model's map (one
/// cell per pixel) would exceed what the analysis holds, so the analysis is
/// refused with a reason instead of allocating for it.
#[tokio::test(flavor = "multi_thread")]
async fn bombs_within_the_limits_are_decoded_row_by_row_under_a_gib() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::spawn(dir.path()).await;
    let ch = niix::client::connect(&server.url).await.unwrap();

    let bomb = dicos_rle_bomb(23168, 30000);
    let h = header(vec![plane(PlaneKind::HighEnergy, PlaneEncoding::Dicos, (23168, 23168), &bomb)]);
    push_messages(&ch, messages(&h, &[&bomb], 1 << 20)).await.unwrap();
    let findings = wait_analysed(&ch, &h.scan_id).await;
    let report = findings.reports.iter().find(|r| r.algorithm.is_some()).expect("a MACHINE report");
    assert!(report.aborted && report.abort_reason.contains("anomaly map"), "{}", report.abort_reason);
    let peak = server.peak_rss_mib();
    println!("dicos_rle_bomb_accepted_peak_rss_mib {peak}");
    assert!(peak < PEAK_MIB, "peak RSS {peak} MiB after the DICOS bomb");

    let (high, low) = (png_bomb(16384, 30000), png_bomb(16384, 18000));
    assert!(high.len() < 4 << 20, "{} bytes", high.len());
    let h = header(vec![
        plane(PlaneKind::HighEnergy, PlaneEncoding::Png, (16384, 16384), &high),
        plane(PlaneKind::LowEnergy, PlaneEncoding::Png, (16384, 16384), &low),
    ]);
    push_messages(&ch, messages(&h, &[&high, &low], 1 << 20)).await.unwrap();
    let findings = wait_analysed(&ch, &h.scan_id).await;
    let report = findings.reports.iter().find(|r| r.algorithm.is_some()).expect("a MACHINE report");
    assert!(report.aborted && report.abort_reason.contains("16384x16384 scan"), "{}", report.abort_reason);
    let peak = server.peak_rss_mib();
    println!("png_bomb_peak_rss_mib {peak}");
    assert!(peak < PEAK_MIB, "peak RSS {peak} MiB after the PNG bomb");
}
