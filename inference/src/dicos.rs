//! NEMA DICOS DX objects (DICOM Part 10 files, `.dcs`): reading the plane
//! they hold, uncompressed or RLE lossless, with dicom-rs.

use std::cell::Cell;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::rc::Rc;

use dicom_core::Tag;
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::decode::{Decode, file_header_decoder};
use dicom_object::file::{OpenFileOptions, ReadPreamble};
use dicom_parser::dataset::{DataSetReader, DataToken};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};

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
    /// Study Instance UID (the DICOS scan), so reports join the image's study.
    pub study_instance_uid: String,
}

fn malformed(detail: impl std::fmt::Display) -> DecodeError {
    DecodeError::Malformed { encoding: "DICOS DX object", detail: detail.to_string() }
}

/// Parses a DICOM file after [`check_lengths`] has found every value it
/// declares within the bytes that follow it.
fn open(mut reader: impl Read + Seek) -> Result<dicom_object::DefaultDicomObject, DecodeError> {
    let start = reader.stream_position()?;
    let size = reader.seek(SeekFrom::End(0))?.saturating_sub(start);
    reader.seek(SeekFrom::Start(start))?;
    check_lengths(BufReader::new(&mut reader), size)?;
    reader.seek(SeekFrom::Start(start))?;
    OpenFileOptions::new().read_preamble(ReadPreamble::Auto).from_reader(BufReader::new(reader)).map_err(malformed)
}

/// A reader that counts the bytes taken from it into a shared cell.
struct Counted<R> {
    inner: R,
    read: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

/// Walks the file meta group and the data set's element, sequence and item
/// headers, keeping no value, and refuses the file if a header declares a
/// value longer than the bytes left after it (`size` is the file's length).
///
/// dicom-rs allocates each value at its declared length before reading it,
/// so without this check a few hundred bytes declaring a 4 GiB element make
/// it allocate 4 GiB. The walk reads the file as dicom-object does (same
/// preamble detection, group length, transfer syntax and token reader);
/// what it cannot parse is left to dicom-object to report.
fn check_lengths(mut src: impl BufRead, size: u64) -> Result<(), DecodeError> {
    let head = src.fill_buf()?;
    let skip = if head.len() >= 132 && &head[128..132] == b"DICM" {
        132
    } else if head.len() >= 4 && &head[..4] == b"DICM" {
        4
    } else {
        return Err(malformed("no DICM magic code: not a DICOM Part 10 file"));
    };
    src.consume(skip);
    let read = Rc::new(Cell::new(skip as u64));
    let mut src = Counted { inner: src, read: read.clone() };
    let fits = |tag: Tag, len: Option<u32>| {
        let (len, left) = (u64::from(len.unwrap_or(0)), size.saturating_sub(read.get()));
        if len > left {
            return Err(malformed(format!("element {tag} declares {len} bytes but only {left} follow it")));
        }
        Ok(())
    };
    let truncated = || malformed("the file meta group is truncated");
    // The meta group is read as dicom-object reads it: its group length
    // first, then elements until that many bytes are read.
    let decoder = file_header_decoder();
    let (header, _) = decoder.decode_header(&mut src).map_err(malformed)?;
    if header.tag != tags::FILE_META_INFORMATION_GROUP_LENGTH || header.len.get() != Some(4) {
        return Err(malformed("the file meta group does not start with its group length"));
    }
    let mut group = [0u8; 4];
    src.read_exact(&mut group).map_err(|_| truncated())?;
    let group_end = read.get() + u64::from(u32::from_le_bytes(group));
    let mut ts_uid = String::new();
    while read.get() < group_end {
        let (header, _) = decoder.decode_header(&mut src).map_err(malformed)?;
        let Some(len) = header.len.get() else { return Err(malformed("a file meta element has no length")) };
        fits(header.tag, Some(len))?;
        let mut value = Vec::new();
        (&mut src).take(u64::from(len)).read_to_end(&mut value)?;
        if value.len() != len as usize {
            return Err(truncated());
        }
        if header.tag == tags::TRANSFER_SYNTAX_UID {
            ts_uid = String::from_utf8_lossy(&value).trim_end_matches(|c: char| c.is_whitespace() || c == '\0').into();
        }
    }
    let Some(ts) = TransferSyntaxRegistry.get(&ts_uid) else { return Ok(()) };
    if !ts.is_codec_free() && !ts.is_encapsulated_pixel_data() {
        return Err(DecodeError::Mismatch(format!(
            "transfer syntax {ts_uid} ({}) is not accepted; niix reads uncompressed and RLE lossless DICOS",
            ts.name()
        )));
    }
    let Ok(tokens) = DataSetReader::new_with_ts(src, ts) else { return Ok(()) };
    for token in tokens {
        match token {
            Ok(DataToken::ElementHeader(h)) => fits(h.tag, h.len.get())?,
            Ok(DataToken::SequenceStart { tag, len }) => fits(tag, len.get())?,
            Ok(DataToken::ItemStart { len }) => fits(Tag(0xFFFE, 0xE000), len.get())?,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

fn text(obj: &dicom_object::DefaultDicomObject, tag: Tag) -> Option<String> {
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
    let (width, height) = (int(tags::COLUMNS)?, int(tags::ROWS)?);
    if width == 0 || height == 0 {
        return Err(malformed(format!("the image is {width}x{height} pixels: a DX plane has rows and columns")));
    }
    Ok(DxInfo {
        width,
        height,
        bits_stored: int(tags::BITS_STORED)?,
        kind,
        pixel_spacing_mm,
        intensity: text(obj, tags::PIXEL_INTENSITY_RELATIONSHIP),
        sop_instance_uid: text(obj, tags::SOP_INSTANCE_UID).unwrap_or_default(),
        study_instance_uid: text(obj, tags::STUDY_INSTANCE_UID).unwrap_or_default(),
    })
}

/// Reads the attributes of a DX object (the pixel data is not decoded).
pub fn probe(reader: impl Read + Seek) -> Result<DxInfo, DecodeError> {
    info_of(&open(reader)?)
}

/// Decodes the plane of a DX object: rows of 16-bit samples.
pub fn decode(reader: impl Read + Seek) -> Result<(DxInfo, Vec<u16>), DecodeError> {
    let obj = open(reader)?;
    let info = info_of(&obj)?;
    if obj.meta().transfer_syntax() == uids::RLE_LOSSLESS {
        check_rle(&obj, &info)?;
    }
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
        16 if data.len() / 2 >= n => data.chunks_exact(2).take(n).map(|b| u16::from_le_bytes([b[0], b[1]])).collect(),
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

/// Checks RLE Lossless pixel data (DICOM PS3.5 Annex G) before dicom-rs
/// decodes it: its decoder indexes the RLE header and the decoded segments
/// without checking their lengths, and panics on a header shorter than the
/// segment count it declares or on a segment that decodes to fewer bytes
/// than the image has pixels.
fn check_rle(obj: &dicom_object::DefaultDicomObject, info: &DxInfo) -> Result<(), DecodeError> {
    let int = |tag| obj.element(tag).ok().and_then(|e| e.to_int::<u64>().ok());
    let needed = int(tags::SAMPLES_PER_PIXEL).unwrap_or(1) * int(tags::BITS_ALLOCATED).unwrap_or(16).div_ceil(8);
    let pixels = u64::from(info.width) * u64::from(info.height);
    let Some(fragments) = obj.element(tags::PIXEL_DATA).map_err(malformed)?.value().fragments() else {
        return Err(malformed("RLE Lossless pixel data is not encapsulated"));
    };
    if fragments.len() != 1 {
        return Err(DecodeError::Mismatch(format!(
            "a DX plane has one frame; this one has {} RLE fragments",
            fragments.len()
        )));
    }
    let fragment = &fragments[0];
    if fragment.len() < 64 {
        return Err(malformed(format!(
            "an RLE fragment of {} bytes is shorter than its 64-byte header",
            fragment.len()
        )));
    }
    let word = |i: usize| {
        u64::from(u32::from_le_bytes([fragment[4 * i], fragment[4 * i + 1], fragment[4 * i + 2], fragment[4 * i + 3]]))
    };
    let count = word(0);
    if count > 15 || count < needed {
        return Err(malformed(format!("the RLE header declares {count} segments where the image has {needed}")));
    }
    let len = fragment.len() as u64;
    let bounds: Vec<u64> = (1..=count as usize).map(word).chain([len]).collect();
    for (segment, range) in bounds.windows(2).take(needed as usize).enumerate() {
        if range[0] > range[1] || range[1] > len {
            return Err(malformed(format!("RLE segment {segment} lies outside its {len}-byte fragment")));
        }
        let decoded = packbits_len(&fragment[range[0] as usize..range[1] as usize]);
        if decoded < pixels {
            return Err(malformed(format!("RLE segment {segment} decodes to {decoded} bytes for {pixels} pixels")));
        }
    }
    Ok(())
}

/// How many bytes a PackBits segment decodes to (DICOM PS3.5 G.3.1).
fn packbits_len(mut data: &[u8]) -> u64 {
    let mut n = 0u64;
    while let Some((&header, rest)) = data.split_first() {
        match header as i8 {
            literal @ 0..=127 => {
                let k = (literal as usize + 1).min(rest.len());
                n += k as u64;
                data = &rest[k..];
            }
            -128 => data = rest,
            repeat => {
                if rest.is_empty() {
                    break;
                }
                n += (1 - i64::from(repeat)) as u64;
                data = &rest[1..];
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use dicom_core::value::{PixelFragmentSequence, Value};
    use dicom_core::{DataElement, PrimitiveValue, VR, dicom_value};
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

    use super::*;
    use crate::decode::{DecodeLimits, Encoding, decode_rows};

    /// A DX object for processing, explicit VR little endian, 16-bit samples.
    fn dx(width: u16, height: u16, samples: &[u16]) -> Vec<u8> {
        let mut obj = InMemDicomObject::new_empty();
        obj.put(DataElement::new(tags::SOP_CLASS_UID, VR::UI, DX_PROCESSING));
        obj.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, "1.2.3.4"));
        obj.put(DataElement::new(tags::MODALITY, VR::CS, "DX"));
        obj.put(DataElement::new(tags::IMAGE_TYPE, VR::CS, dicom_value!(Strs, ["ORIGINAL", "PRIMARY", "HIGH ENERGY"])));
        obj.put(DataElement::new(tags::ROWS, VR::US, dicom_value!(U16, [height])));
        obj.put(DataElement::new(tags::COLUMNS, VR::US, dicom_value!(U16, [width])));
        obj.put(DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, dicom_value!(U16, [1])));
        obj.put(DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"));
        obj.put(DataElement::new(tags::BITS_ALLOCATED, VR::US, dicom_value!(U16, [16])));
        obj.put(DataElement::new(tags::BITS_STORED, VR::US, dicom_value!(U16, [16])));
        obj.put(DataElement::new(tags::HIGH_BIT, VR::US, dicom_value!(U16, [15])));
        obj.put(DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, dicom_value!(U16, [0])));
        obj.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(samples.iter().copied().collect())));
        file_bytes(obj, "1.2.840.10008.1.2.1")
    }

    /// A DX dataset written as a DICOS file in `transfer_syntax`.
    fn file_bytes(obj: InMemDicomObject, transfer_syntax: &str) -> Vec<u8> {
        let file = obj
            .with_meta(
                FileMetaTableBuilder::new()
                    .transfer_syntax(transfer_syntax)
                    .media_storage_sop_class_uid(DX_PROCESSING)
                    .media_storage_sop_instance_uid("1.2.3.4"),
            )
            .unwrap();
        let mut out = Vec::new();
        file.write_all(&mut out).unwrap();
        out
    }

    /// Offset of the 32-bit length of the Pixel Data element.
    fn pixel_data_length_at(bytes: &[u8]) -> usize {
        bytes.windows(8).position(|w| w == [0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0]).unwrap() + 8
    }

    #[test]
    fn a_dx_object_decodes_to_its_samples() {
        let px: Vec<u16> = (0..12u16).map(|i| 30000 + i * 7).collect();
        let bytes = dx(4, 3, &px);
        let info = probe(Cursor::new(&bytes)).unwrap();
        assert_eq!((info.width, info.height, info.kind.as_deref()), (4, 3, Some("high_energy")));
        assert_eq!(decode(Cursor::new(&bytes)).unwrap().1, px);
    }

    /// Found by the `dicos` fuzz target: 770 bytes whose Pixel Data declared
    /// 4059165168 bytes made dicom-rs allocate (and zero) 4 GiB before
    /// finding the file too short.
    #[test]
    fn a_length_beyond_the_end_of_the_file_is_refused_before_allocating() {
        let mut bytes = dx(4, 3, &[1; 12]);
        let at = pixel_data_length_at(&bytes);
        bytes[at..at + 4].copy_from_slice(&0xF1F1_F1F0u32.to_le_bytes());
        for err in [probe(Cursor::new(&bytes)).unwrap_err(), decode(Cursor::new(&bytes)).unwrap_err()] {
            assert!(
                matches!(err, DecodeError::Malformed { ref detail, .. } if detail.contains("declares 4059165168 bytes")),
                "{err}"
            );
        }
        // The same in the file meta group (its group length is the first element).
        let mut bytes = dx(4, 3, &[1; 12]);
        let uid = bytes.windows(4).position(|w| w == [2, 0, 0x10, 0]).unwrap();
        bytes[uid + 6..uid + 8].copy_from_slice(&0xFFF0u16.to_le_bytes());
        let err = probe(Cursor::new(&bytes)).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { ref detail, .. } if detail.contains("declares 65520")), "{err}");
        // Found next: a meta element with an unknown VR, which dicom-rs reads
        // with a 32-bit length (here 3543029042) where a UI has a 16-bit one.
        let mut bytes = dx(4, 3, &[1; 12]);
        bytes[uid + 4..uid + 6].copy_from_slice(b"1\x14");
        bytes[uid + 8..uid + 12].copy_from_slice(&3_543_029_042u32.to_le_bytes());
        let err = probe(Cursor::new(&bytes)).unwrap_err();
        assert!(
            matches!(err, DecodeError::Malformed { ref detail, .. } if detail.contains("declares 3543029042")),
            "{err}"
        );
    }

    /// The same object with its plane RLE Lossless encoded: one fragment of
    /// two segments (high bytes, low bytes), each one literal run.
    fn dx_rle(width: u16, height: u16, samples: &[u16], mangle: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let run = |bytes: Vec<u8>| [vec![bytes.len() as u8 - 1], bytes].concat();
        let high = run(samples.iter().map(|s| (s >> 8) as u8).collect());
        let low = run(samples.iter().map(|s| *s as u8).collect());
        let mut fragment = vec![0u8; 64];
        fragment[..4].copy_from_slice(&2u32.to_le_bytes());
        fragment[4..8].copy_from_slice(&64u32.to_le_bytes());
        fragment[8..12].copy_from_slice(&(64 + high.len() as u32).to_le_bytes());
        fragment.extend(high);
        fragment.extend(low);
        mangle(&mut fragment);
        if fragment.len() % 2 == 1 {
            fragment.push(0);
        }
        let plain = dx(width, height, samples);
        let mut obj = OpenFileOptions::new().from_reader(Cursor::new(&plain[128..])).unwrap().into_inner();
        let sequence = PixelFragmentSequence::new(Vec::<u32>::new(), vec![fragment]);
        obj.put(DataElement::new(tags::PIXEL_DATA, VR::OB, Value::PixelSequence(sequence)));
        file_bytes(obj, uids::RLE_LOSSLESS)
    }

    #[test]
    fn an_rle_object_decodes_to_its_samples() {
        let px: Vec<u16> = (0..12u16).map(|i| 30000 + i * 257).collect();
        assert_eq!(decode(Cursor::new(dx_rle(4, 3, &px, |_| {}))).unwrap().1, px);
    }

    /// Found by the `dicos` fuzz target: dicom-rs 0.10 indexes past the end
    /// of an RLE segment that decodes to fewer bytes than the image has
    /// pixels, and past the end of an RLE header that declares more segments
    /// than it holds, and panics.
    #[test]
    fn short_rle_segments_and_headers_are_malformed() {
        let px = [30000u16; 12];
        type Case = (&'static str, fn(&mut Vec<u8>));
        let cases: [Case; 4] = [
            ("decodes to 6 bytes for 12 pixels", |f| f.truncate(64 + 13 + 7)),
            ("declares 1073741824 segments", |f| f[..4].copy_from_slice(&(1u32 << 30).to_le_bytes())),
            ("shorter than its 64-byte header", |f| f.truncate(8)),
            ("outside its", |f| f[8..12].copy_from_slice(&9999u32.to_le_bytes())),
        ];
        for (needle, mangle) in cases {
            let err = decode(Cursor::new(dx_rle(4, 3, &px, mangle))).unwrap_err();
            assert!(matches!(err, DecodeError::Malformed { ref detail, .. } if detail.contains(needle)), "{err}");
        }
    }

    #[test]
    fn a_truncated_object_is_malformed() {
        let bytes = dx(4, 3, &[1; 12]);
        let err = decode(Cursor::new(&bytes[..bytes.len() - 3])).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");
        let err = probe(Cursor::new(b"DICM".to_vec())).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");
    }

    #[test]
    fn an_empty_plane_is_refused() {
        let bytes = dx(0, 0, &[]);
        let err = decode_rows(Cursor::new(&bytes), Encoding::Dicos, 0, 0, &DecodeLimits::default(), |_, _| Ok(()))
            .unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");
    }
}
