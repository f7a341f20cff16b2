//! NEMA DICOS DX objects (DICOM Part 10 files, `.dcs`): reading the plane
//! they hold, uncompressed or RLE lossless, with dicom-rs.

use std::io::{BufReader, Read};

use dicom_dictionary_std::tags;
use dicom_object::file::{OpenFileOptions, ReadPreamble};
use dicom_pixeldata::PixelDecoder;

use crate::decode::DecodeError;

/// SOP class of DX for presentation.
pub const DX_PRESENTATION: &str = "1.2.840.10008.5.1.4.1.1.501.2.1";
/// SOP class of DX for processing.
pub const DX_PROCESSING: &str = "1.2.840.10008.5.1.4.1.1.501.2.2";

/// What a DX object says about its plane.
#[derive(Debug, Clone, PartialEq)]
pub struct DxInfo {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Bits Stored.
    pub bits_stored: u32,
    /// Image Type value 3 in lower case with `_` (e.g. `high_energy`), if present.
    pub kind: Option<String>,
    /// Pixel Spacing (row spacing = y, column spacing = x), millimetres.
    pub pixel_spacing_mm: Option<(f64, f64)>,
    /// Pixel Intensity Relationship: `LIN` or `LOG`.
    pub intensity: Option<String>,
    /// SOP Instance UID, for reports that reference the image.
    pub sop_instance_uid: String,
}

fn malformed(detail: impl std::fmt::Display) -> DecodeError {
    DecodeError::Malformed { encoding: "DICOS DX object", detail: detail.to_string() }
}

fn open(reader: impl Read) -> Result<dicom_object::DefaultDicomObject, DecodeError> {
    OpenFileOptions::new().read_preamble(ReadPreamble::Auto).from_reader(BufReader::new(reader)).map_err(malformed)
}

fn text(obj: &dicom_object::DefaultDicomObject, tag: dicom_core::Tag) -> Option<String> {
    obj.element_opt(tag).ok().flatten().and_then(|e| e.to_str().ok()).map(|s| s.trim().to_string())
}

fn info_of(obj: &dicom_object::DefaultDicomObject) -> Result<DxInfo, DecodeError> {
    let sop_class = obj.meta().media_storage_sop_class_uid().trim_end_matches('\0').trim().to_string();
    if sop_class != DX_PRESENTATION && sop_class != DX_PROCESSING {
        return Err(DecodeError::Mismatch(format!(
            "SOP class {sop_class} is not DICOS DX ({DX_PRESENTATION} or {DX_PROCESSING})"
        )));
    }
    let int =
        |tag| -> Result<u32, DecodeError> { obj.element(tag).map_err(malformed)?.to_int::<u32>().map_err(malformed) };
    let kind = obj
        .element_opt(tags::IMAGE_TYPE)
        .ok()
        .flatten()
        .and_then(|e| e.to_multi_str().ok().map(|v| v.to_vec()))
        .and_then(|v| v.get(2).cloned())
        .map(|k| k.trim().to_ascii_lowercase().replace([' ', '-'], "_"));
    let pixel_spacing_mm = obj
        .element_opt(tags::PIXEL_SPACING)
        .ok()
        .flatten()
        .and_then(|e| e.to_multi_float64().ok())
        .and_then(|v| (v.len() == 2).then(|| (v[1], v[0])));
    Ok(DxInfo {
        width: int(tags::COLUMNS)?,
        height: int(tags::ROWS)?,
        bits_stored: int(tags::BITS_STORED)?,
        kind,
        pixel_spacing_mm,
        intensity: text(obj, tags::PIXEL_INTENSITY_RELATIONSHIP),
        sop_instance_uid: text(obj, tags::SOP_INSTANCE_UID).unwrap_or_default(),
    })
}

/// Reads the attributes of a DX object (the pixel data is not decoded).
pub fn probe(reader: impl Read) -> Result<DxInfo, DecodeError> {
    info_of(&open(reader)?)
}

/// Decodes the plane of a DX object: rows of 16-bit samples.
pub fn decode(reader: impl Read) -> Result<(DxInfo, Vec<u16>), DecodeError> {
    let obj = open(reader)?;
    let info = info_of(&obj)?;
    let pixels = obj.decode_pixel_data().map_err(|e| {
        let text = e.to_string();
        if text.contains("ransfer syntax") || text.contains("nsupported") {
            DecodeError::Mismatch(format!(
                "pixel data cannot be decoded ({text}); niix reads uncompressed and RLE lossless DICOS"
            ))
        } else {
            malformed(text)
        }
    })?;
    if pixels.samples_per_pixel() != 1 || pixels.number_of_frames() != 1 {
        return Err(DecodeError::Mismatch(format!(
            "a DX plane has one frame of one sample per pixel; this one has {} frames of {} samples",
            pixels.number_of_frames(),
            pixels.samples_per_pixel()
        )));
    }
    let n = info.width as usize * info.height as usize;
    let data = pixels.data();
    let samples: Vec<u16> = match pixels.bits_allocated() {
        16 if data.len() >= n * 2 => data.chunks_exact(2).take(n).map(|b| u16::from_le_bytes([b[0], b[1]])).collect(),
        8 if data.len() >= n => data[..n].iter().map(|&b| u16::from(b)).collect(),
        bits => {
            return Err(DecodeError::Mismatch(format!(
                "pixel data holds {} bytes for {}x{} pixels of {bits} bits allocated",
                data.len(),
                info.width,
                info.height
            )));
        }
    };
    Ok((info, samples))
}
