//! NEMA DICOS DX objects (DICOM Part 10 files, `.dcs`): reading the plane
//! they hold, with dicom-rs for the attributes.
//!
//! Transfer syntaxes (see `dicos_syntax` for the full list): uncompressed
//! (implicit or explicit VR, little or big endian), deflated explicit VR and
//! RLE Lossless are read row by row, whatever the plane's size; JPEG Lossless
//! (.57, .70), JPEG-LS Lossless (.80) and JPEG 2000 Lossless (.90) frames are
//! decoded whole, within [`DecodeLimits::max_frame_pixels`], after their
//! codestream header is checked against the object's attributes. Lossy
//! syntaxes, and lossy streams in a lossless syntax, are refused. So are CT
//! volumes: niix analyses DX projections only.

use std::cell::Cell;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::rc::Rc;

use dicom_core::Tag;
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::decode::{Decode, file_header_decoder};
use dicom_object::file::{OpenFileOptions, ReadPreamble};
use dicom_parser::dataset::{DataSetReader, DataToken};
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};

use crate::decode_shared::{DecodeError, DecodeLimits, RowSink, check_dims};
use crate::dicos_syntax::{Syntax, check_budget, decode_frame, max_frame_bytes, syntax_of};

/// SOP class of DX for presentation.
pub const DX_PRESENTATION: &str = "1.2.840.10008.5.1.4.1.1.501.2.1";
/// SOP class of DX for processing.
pub const DX_PROCESSING: &str = "1.2.840.10008.5.1.4.1.1.501.2.2";

/// SOP classes of CT volumes, refused by name: out of scope.
const CT_CLASSES: &[(&str, &str)] = &[
    ("1.2.840.10008.5.1.4.1.1.501.1", "DICOS CT Image"),
    ("1.2.840.10008.5.1.4.1.1.2", "CT Image"),
    ("1.2.840.10008.5.1.4.1.1.2.1", "Enhanced CT Image"),
    ("1.2.840.10008.5.1.4.1.1.2.2", "Legacy Converted Enhanced CT Image"),
];

/// Refuses a CT volume with a message that says so.
fn refuse_ct(sop_class: &str) -> Result<(), DecodeError> {
    match CT_CLASSES.iter().find(|(uid, _)| *uid == sop_class) {
        Some((uid, name)) => Err(DecodeError::Mismatch(format!(
            "SOP class {uid} is a {name}, a CT volume: niix analyses DICOS DX projection images only, and CT \
             volumes are out of scope (docs/protocol.md); send the scanner's DX projections"
        ))),
        None => Ok(()),
    }
}

/// Most bytes of attributes inflated from a deflated data set before its
/// pixel data: dicom-rs holds them in memory, so a deflate bomb in the
/// attributes is cut here. Real DX headers are a few kilobytes.
const MAX_DEFLATED_ATTRIBUTES: u64 = 16 << 20;

/// Plane names Image Type may carry, normalised.
const PLANE_NAMES: [&str; 5] = ["single_energy", "high_energy", "low_energy", "z_effective", "backscatter"];

/// The plane an Image Type names. DICOS puts it in value 3
/// (`ORIGINAL\PRIMARY\HIGH ENERGY`); the DICOS toolkit writes and requires
/// it in value 2 (`ORIGINAL\HIGH ENERGY`). The first of values 3 and 2 that
/// is a known plane name wins; otherwise value 3 as written (normalised),
/// so an unknown name still reaches the caller's message.
pub fn plane_kind_of_image_type(values: &[String]) -> Option<String> {
    let norm = |k: &String| k.trim().to_ascii_lowercase().replace([' ', '-'], "_");
    [values.get(2), values.get(1)]
        .into_iter()
        .flatten()
        .map(norm)
        .find(|k| PLANE_NAMES.contains(&k.as_str()))
        .or_else(|| values.get(2).map(norm))
}

/// What a DX object says about its plane.
#[derive(Debug, Clone, PartialEq)]
pub struct DxInfo {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Bits Stored.
    pub bits_stored: u32,
    /// The plane Image Type names, in lower case with `_` (e.g. `high_energy`):
    /// see [`plane_kind_of_image_type`].
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

/// Where the root data set's Pixel Data value lies, as offsets from the
/// start of the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PixelData {
    /// A native value of `len` bytes starting at `at`.
    Native { at: u64, len: u64 },
    /// Encapsulated: its items (offset table, then fragments) start at `at`.
    Encapsulated { at: u64 },
    /// A native value of `len` bytes at `at` in the inflated data set,
    /// whose deflate stream starts at `dataset_at` in the object.
    Deflated { dataset_at: u64, at: u64, len: u64 },
}

/// A DX object's attributes, read up to its pixel data (not the pixels).
struct Object {
    obj: dicom_object::DefaultDicomObject,
    /// Where the reader was when the object was opened.
    start: u64,
    /// Where the pixel data lies, if the object has any.
    pixels: Option<PixelData>,
}

/// Parses a DICOM file after [`check_lengths`] has found every value it
/// declares before the pixel data within the bytes that follow it. The pixel
/// data is not read: [`decode_rows`] streams it from where the walk found it.
fn open(mut reader: impl Read + Seek) -> Result<Object, DecodeError> {
    let start = reader.stream_position()?;
    let size = reader.seek(SeekFrom::End(0))?.saturating_sub(start);
    reader.seek(SeekFrom::Start(start))?;
    let pixels = check_lengths(BufReader::new(&mut reader), size)?;
    reader.seek(SeekFrom::Start(start))?;
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Auto)
        .read_until(tags::PIXEL_DATA)
        .from_reader(BufReader::new(reader))
        .map_err(malformed)?;
    Ok(Object { obj, start, pixels })
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
/// headers up to the root data set's Pixel Data, keeping no value, and
/// refuses the file if a header declares a value longer than the bytes left
/// after it (`size` is the file's length). Returns where the pixel data lies.
///
/// dicom-rs allocates each value at its declared length before reading it,
/// so without this check a few hundred bytes declaring a 4 GiB element make
/// it allocate 4 GiB. The walk reads the file as dicom-object does (same
/// preamble detection, group length, transfer syntax and token reader);
/// what it cannot parse is left to dicom-object to report.
fn check_lengths(mut src: impl BufRead, size: u64) -> Result<Option<PixelData>, DecodeError> {
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
    let truncated = || malformed("the file meta group is truncated");
    let meta_fits = |tag: Tag, len: u32| {
        let (len, left) = (u64::from(len), size.saturating_sub(read.get()));
        if len > left {
            return Err(malformed(format!("element {tag} declares {len} bytes but only {left} follow it")));
        }
        Ok(())
    };
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
    let (mut ts_uid, mut sop_class) = (String::new(), String::new());
    while read.get() < group_end {
        let (header, _) = decoder.decode_header(&mut src).map_err(malformed)?;
        let Some(len) = header.len.get() else { return Err(malformed("a file meta element has no length")) };
        meta_fits(header.tag, len)?;
        let mut value = Vec::new();
        (&mut src).take(u64::from(len)).read_to_end(&mut value)?;
        if value.len() != len as usize {
            return Err(truncated());
        }
        let uid = || String::from_utf8_lossy(&value).trim_end_matches(|c: char| c.is_whitespace() || c == '\0').into();
        match header.tag {
            tags::TRANSFER_SYNTAX_UID => ts_uid = uid(),
            tags::MEDIA_STORAGE_SOP_CLASS_UID => sop_class = uid(),
            _ => {}
        }
    }
    refuse_ct(&sop_class)?;
    let syntax = syntax_of(&ts_uid)?;
    if syntax == Syntax::Deflated {
        // The rest of the file is one raw deflate stream holding an explicit
        // VR little endian data set: walk it inflated, with the attributes
        // before the pixel data bounded, since its length is unknown.
        let dataset_at = read.get();
        let inflated = Rc::new(Cell::new(0u64));
        let inner = flate2::read::DeflateDecoder::new(src).take(MAX_DEFLATED_ATTRIBUTES);
        let src = Counted { inner, read: inflated.clone() };
        let ts = TransferSyntaxRegistry.get(uids::EXPLICIT_VR_LITTLE_ENDIAN).expect("explicit VR LE is built in");
        let room = || (MAX_DEFLATED_ATTRIBUTES.saturating_sub(inflated.get()), "inflated attribute bytes niix reads");
        // dicom-object inflates the same stream up to the pixel data: where
        // the walk found none within the bound, it must not start.
        return match walk(src, ts, &inflated, room, false)? {
            Some(PixelData::Native { at, len }) => Ok(Some(PixelData::Deflated { dataset_at, at, len })),
            Some(other) => Ok(Some(other)),
            None => Err(malformed(format!(
                "the deflated data set holds no Pixel Data within its first {} MiB",
                MAX_DEFLATED_ATTRIBUTES >> 20
            ))),
        };
    }
    let Some(ts) = TransferSyntaxRegistry.get(&ts_uid) else { return Ok(None) };
    let room = || (size.saturating_sub(read.get()), "follow it");
    walk(src, ts, &read, room, true)
}

/// Walks a data set's element, sequence and item headers up to the root
/// Pixel Data, refusing a declared length over what `room` allows (the
/// bytes left, and what they are, for the message); `read` counts the bytes
/// taken from `src`. Pixel Data's own length is checked only if
/// `check_pixels` (a deflated one is streamed, never allocated).
fn walk(
    src: impl Read,
    ts: &dicom_encoding::TransferSyntax,
    read: &Cell<u64>,
    room: impl Fn() -> (u64, &'static str),
    check_pixels: bool,
) -> Result<Option<PixelData>, DecodeError> {
    let fits = |tag: Tag, len: Option<u32>| {
        let (len, (left, what)) = (u64::from(len.unwrap_or(0)), room());
        if len > left {
            return Err(malformed(format!("element {tag} declares {len} bytes but only {left} {what}")));
        }
        Ok(())
    };
    let Ok(tokens) = DataSetReader::new_with_ts(src, ts) else { return Ok(None) };
    // Sequences open around the current token: Pixel Data inside one (an
    // icon image) is not the plane.
    let mut depth = 0usize;
    for token in tokens {
        match token {
            Ok(DataToken::ElementHeader(h)) => {
                if check_pixels || depth != 0 || h.tag != tags::PIXEL_DATA {
                    fits(h.tag, h.len.get())?;
                }
                if depth == 0 && h.tag == tags::PIXEL_DATA {
                    let len = u64::from(h.len.get().unwrap_or(0));
                    return Ok(Some(PixelData::Native { at: read.get(), len }));
                }
            }
            Ok(DataToken::PixelSequenceStart) if depth == 0 => {
                return Ok(Some(PixelData::Encapsulated { at: read.get() }));
            }
            Ok(DataToken::SequenceStart { tag, len }) => {
                fits(tag, len.get())?;
                depth += 1;
            }
            Ok(DataToken::SequenceEnd) => depth = depth.saturating_sub(1),
            Ok(DataToken::ItemStart { len }) => fits(Tag(0xFFFE, 0xE000), len.get())?,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(None)
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
        .and_then(|v| plane_kind_of_image_type(&v));
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
    info_of(&open(reader)?.obj)
}

/// Streams the plane of a DX object to `emit`, row by row, top to bottom,
/// as 16-bit samples; returns its attributes.
///
/// The object's size is checked against the descriptor's `width x height`
/// before any pixel is read. Uncompressed, deflated and RLE Lossless pixels
/// are decoded a row at a time (RLE with its segments read side by side),
/// so memory stays at a few rows whatever size the object declares. A JPEG
/// Lossless, JPEG-LS or JPEG 2000 frame is decoded whole: its size is
/// checked against `limits.max_frame_pixels` first, and its codestream
/// header against the object's attributes, before it is decoded.
pub fn decode_rows<R: Read + Seek>(
    mut reader: R,
    width: u32,
    height: u32,
    limits: &DecodeLimits,
    emit: &mut RowSink<'_>,
) -> Result<DxInfo, DecodeError> {
    let Object { obj, start, pixels } = open(&mut reader)?;
    let info = info_of(&obj)?;
    check_dims((info.width, info.height), width, height, "DICOS image")?;
    let int = |tag, default: u64| match obj.element_opt(tag) {
        Ok(Some(e)) => e.to_int::<u64>().map_err(malformed),
        _ => Ok(default),
    };
    let (frames, samples) = (int(tags::NUMBER_OF_FRAMES, 1)?, int(tags::SAMPLES_PER_PIXEL, 1)?);
    if frames != 1 || samples != 1 {
        return Err(DecodeError::Mismatch(format!(
            "a DX plane has one frame of one sample per pixel; this one has {frames} frames of {samples} samples"
        )));
    }
    let bits = int(tags::BITS_ALLOCATED, 16)?;
    if bits != 8 && bits != 16 {
        return Err(DecodeError::Mismatch(format!(
            "pixel data of {bits} bits allocated cannot be decoded; niix reads 8 or 16 bits per sample"
        )));
    }
    let ts_uid = obj.meta().transfer_syntax().trim_end_matches('\0').trim().to_string();
    let syntax = syntax_of(&ts_uid)?;
    let end = reader.seek(SeekFrom::End(0))?;
    let pixel_count = u64::from(width) * u64::from(height);
    let rows = Rows { width: width as usize, height, bytes: bits as usize / 8 };
    let short = |len: u64| {
        DecodeError::Mismatch(format!(
            "pixel data holds {len} bytes for {width}x{height} pixels of {bits} bits allocated"
        ))
    };
    match (pixels, syntax) {
        (Some(PixelData::Native { at, len }), Syntax::Native { big_endian }) => {
            if len < pixel_count * (bits / 8) {
                return Err(short(len));
            }
            reader.seek(SeekFrom::Start(start + at))?;
            rows.native(BufReader::with_capacity(1 << 20, reader), big_endian, emit)?;
        }
        (Some(PixelData::Deflated { dataset_at, at, len }), Syntax::Deflated) => {
            if len < pixel_count * (bits / 8) {
                return Err(short(len));
            }
            reader.seek(SeekFrom::Start(start + dataset_at))?;
            let mut inflated =
                BufReader::with_capacity(1 << 20, flate2::read::DeflateDecoder::new(BufReader::new(reader)));
            if std::io::copy(&mut (&mut inflated).take(at), &mut std::io::sink())? != at {
                return Err(malformed("the deflated data set ends before its pixel data"));
            }
            rows.native(inflated, false, emit)?;
        }
        (Some(PixelData::Encapsulated { at }), Syntax::Rle) => {
            let (from, len) = rle_fragment(&mut reader, start + at, end)?;
            rows.rle(&mut reader, from, len, emit)?;
        }
        (Some(PixelData::Encapsulated { at }), Syntax::Frame(codec)) => {
            check_budget(width, height, codec, limits)?;
            let data = frame_bytes(&mut reader, start + at, end, max_frame_bytes(pixel_count, bits / 8))?;
            let samples = decode_frame(codec, &data, width, height, bits as u32)?;
            drop(data);
            for (y, row) in samples.chunks_exact(width as usize).enumerate() {
                emit(y as u32, row)?;
            }
        }
        (None, _) => return Err(malformed("the object has no Pixel Data")),
        (Some(_), _) => {
            return Err(DecodeError::Mismatch(format!(
                "the pixel data is not encoded as transfer syntax {ts_uid} says (native where it should be \
                 encapsulated, or the reverse)"
            )));
        }
    }
    Ok(info)
}

/// Decodes the whole plane of a DX object into memory (for small objects:
/// tests and fuzzing; the server streams with [`decode_rows`]).
pub fn decode(mut reader: impl Read + Seek) -> Result<(DxInfo, Vec<u16>), DecodeError> {
    let start = reader.stream_position()?;
    let info = probe(&mut reader)?;
    reader.seek(SeekFrom::Start(start))?;
    let mut samples = Vec::new();
    decode_rows(reader, info.width, info.height, &DecodeLimits::default(), &mut |_, row| {
        samples.extend_from_slice(row);
        Ok(())
    })?;
    Ok((info, samples))
}

/// Walks the items of encapsulated pixel data that start at `at`, up to
/// its delimiter; `end` is the end of the file. Each item's declared length
/// is checked against the bytes left before `on_item(index, offset,
/// length, reader)` sees it (index 0 is the Basic Offset Table); `on_item`
/// consumes exactly `length` bytes. Returns how many items there were.
fn encapsulated_items<R: Read + Seek>(
    reader: &mut R,
    at: u64,
    end: u64,
    mut on_item: impl FnMut(u64, u64, u64, &mut BufReader<&mut R>) -> Result<(), DecodeError>,
) -> Result<u64, DecodeError> {
    reader.seek(SeekFrom::Start(at))?;
    let mut src = BufReader::new(reader);
    let (mut pos, mut items) = (at, 0u64);
    loop {
        let mut head = [0u8; 8];
        src.read_exact(&mut head).map_err(|_| malformed("the encapsulated pixel data ends before its delimiter"))?;
        pos += 8;
        let tag = Tag(u16::from_le_bytes([head[0], head[1]]), u16::from_le_bytes([head[2], head[3]]));
        let len = u64::from(u32::from_le_bytes([head[4], head[5], head[6], head[7]]));
        match (tag.group(), tag.element()) {
            (0xFFFE, 0xE0DD) => return Ok(items),
            (0xFFFE, 0xE000) => {
                let left = end.saturating_sub(pos);
                if len > left {
                    return Err(malformed(format!("element {tag} declares {len} bytes but only {left} follow it")));
                }
                on_item(items, pos, len, &mut src)?;
                items += 1;
                pos += len;
            }
            _ => return Err(malformed(format!("the encapsulated pixel data holds {tag} where an item belongs"))),
        }
    }
}

/// The compressed bytes of the one frame of encapsulated pixel data whose
/// items start at `at`: its fragments joined, since toolkits may split a
/// frame's codestream across fragments. `end` is the end of the file; more
/// than `max` bytes in all are refused before they are read.
fn frame_bytes<R: Read + Seek>(reader: &mut R, at: u64, end: u64, max: u64) -> Result<Vec<u8>, DecodeError> {
    let mut data = Vec::new();
    let items = encapsulated_items(reader, at, end, |index, _, len, src| {
        if index == 0 {
            // The Basic Offset Table.
            src.seek_relative(len as i64)?;
            return Ok(());
        }
        if data.len() as u64 + len > max {
            return Err(malformed(format!(
                "its compressed frame holds more than {max} bytes, more than a lossless frame of its size needs"
            )));
        }
        let before = data.len();
        src.take(len).read_to_end(&mut data)?;
        if (data.len() - before) as u64 != len {
            return Err(malformed("the encapsulated pixel data ends inside a fragment"));
        }
        Ok(())
    })?;
    if items < 2 {
        return Err(malformed("the encapsulated pixel data holds no fragment"));
    }
    Ok(data)
}

/// Finds the one fragment of encapsulated pixel data whose items start at
/// `at` (after the Basic Offset Table item); `end` is the end of the file.
/// Returns its offset and length.
fn rle_fragment<R: Read + Seek>(reader: &mut R, at: u64, end: u64) -> Result<(u64, u64), DecodeError> {
    let mut first = None;
    let items = encapsulated_items(reader, at, end, |index, pos, len, src| {
        // The first item is the Basic Offset Table; fragments follow.
        if index == 1 {
            first = Some((pos, len));
        }
        src.seek_relative(len as i64)?;
        Ok(())
    })?;
    match (items.saturating_sub(1), first) {
        (1, Some(fragment)) => Ok(fragment),
        (n, _) => Err(DecodeError::Mismatch(format!("a DX plane has one frame; this one has {n} RLE fragments"))),
    }
}

/// The shape of the rows a plane is decoded into.
struct Rows {
    width: usize,
    height: u32,
    /// Bytes allocated per sample: 1 or 2.
    bytes: usize,
}

impl Rows {
    /// Native pixel data: rows of `width` samples, one after the other.
    fn native(&self, mut src: impl Read, big_endian: bool, emit: &mut RowSink<'_>) -> Result<(), DecodeError> {
        let mut bytes = vec![0u8; self.width * self.bytes];
        let mut row = vec![0u16; self.width];
        for y in 0..self.height {
            src.read_exact(&mut bytes).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    malformed(format!("the pixel data ends at row {y} of {}", self.height))
                }
                _ => DecodeError::Io(e),
            })?;
            match (self.bytes, big_endian) {
                (1, _) => row.iter_mut().zip(&bytes).for_each(|(s, &b)| *s = u16::from(b)),
                (_, false) => {
                    row.iter_mut().zip(bytes.chunks_exact(2)).for_each(|(s, b)| *s = u16::from_le_bytes([b[0], b[1]]))
                }
                (_, true) => {
                    row.iter_mut().zip(bytes.chunks_exact(2)).for_each(|(s, b)| *s = u16::from_be_bytes([b[0], b[1]]))
                }
            }
            emit(y, &row)?;
        }
        Ok(())
    }

    /// RLE Lossless pixel data (DICOM PS3.5 Annex G) in the fragment of
    /// `len` bytes at `from`: one PackBits segment per byte of a sample,
    /// most significant first, each read through a buffer of its own.
    fn rle<R: Read + Seek>(
        &self,
        reader: &mut R,
        from: u64,
        len: u64,
        emit: &mut RowSink<'_>,
    ) -> Result<(), DecodeError> {
        if len < 64 {
            return Err(malformed(format!("an RLE fragment of {len} bytes is shorter than its 64-byte header")));
        }
        let mut header = [0u8; 64];
        reader.seek(SeekFrom::Start(from))?;
        reader.read_exact(&mut header)?;
        let word = |i: usize| {
            u64::from(u32::from_le_bytes([header[4 * i], header[4 * i + 1], header[4 * i + 2], header[4 * i + 3]]))
        };
        let (count, needed) = (word(0), self.bytes as u64);
        if count > 15 || count < needed {
            return Err(malformed(format!("the RLE header declares {count} segments where the image has {needed}")));
        }
        let bounds: Vec<u64> = (1..=count as usize).map(word).chain([len]).collect();
        let mut segments = Vec::with_capacity(self.bytes);
        for (segment, range) in bounds.windows(2).take(self.bytes).enumerate() {
            if range[0] > range[1] || range[1] > len {
                return Err(malformed(format!("RLE segment {segment} lies outside its {len}-byte fragment")));
            }
            segments.push(Segment::new(from + range[0], from + range[1]));
        }
        let pixels = self.width as u64 * u64::from(self.height);
        let mut planes = vec![vec![0u8; self.width]; self.bytes];
        let mut row = vec![0u16; self.width];
        for y in 0..self.height {
            for (segment, (seg, plane)) in segments.iter_mut().zip(&mut planes).enumerate() {
                if seg.fill(reader, plane)? < self.width {
                    return Err(malformed(format!(
                        "RLE segment {segment} decodes to {} bytes for {pixels} pixels",
                        seg.decoded
                    )));
                }
            }
            match planes.as_slice() {
                [low] => row.iter_mut().zip(low).for_each(|(s, &b)| *s = u16::from(b)),
                [high, low] => {
                    row.iter_mut().zip(high.iter().zip(low)).for_each(|(s, (&h, &l))| *s = u16::from_be_bytes([h, l]))
                }
                _ => unreachable!("one or two bytes per sample"),
            }
            emit(y, &row)?;
        }
        Ok(())
    }
}

/// Compressed bytes of an RLE segment read per refill.
const SEGMENT_BUFFER: usize = 64 << 10;

/// One RLE segment decoded as a stream of bytes (PackBits, PS3.5 G.3.1).
struct Segment {
    /// Next compressed byte to read from the file, and the segment's end.
    pos: u64,
    end: u64,
    buf: Vec<u8>,
    at: usize,
    /// Literal bytes still to copy.
    literal: usize,
    /// Copies of `value` still to write.
    repeat: usize,
    value: u8,
    /// Bytes decoded so far.
    decoded: u64,
}

impl Segment {
    fn new(pos: u64, end: u64) -> Segment {
        Segment { pos, end, buf: Vec::new(), at: 0, literal: 0, repeat: 0, value: 0, decoded: 0 }
    }

    /// Makes compressed bytes available; false at the end of the segment.
    fn refill<R: Read + Seek>(&mut self, reader: &mut R) -> Result<bool, DecodeError> {
        if self.at < self.buf.len() {
            return Ok(true);
        }
        if self.pos >= self.end {
            return Ok(false);
        }
        let n = (self.end - self.pos).min(SEGMENT_BUFFER as u64) as usize;
        self.buf.resize(n, 0);
        reader.seek(SeekFrom::Start(self.pos))?;
        reader.read_exact(&mut self.buf)?;
        (self.pos, self.at) = (self.pos + n as u64, 0);
        Ok(true)
    }

    fn byte<R: Read + Seek>(&mut self, reader: &mut R) -> Result<Option<u8>, DecodeError> {
        if !self.refill(reader)? {
            return Ok(None);
        }
        self.at += 1;
        Ok(Some(self.buf[self.at - 1]))
    }

    /// Fills `out` with the next decoded bytes; fewer only where the
    /// segment ends. Returns how many.
    fn fill<R: Read + Seek>(&mut self, reader: &mut R, out: &mut [u8]) -> Result<usize, DecodeError> {
        let mut k = 0;
        while k < out.len() {
            if self.repeat > 0 {
                let n = self.repeat.min(out.len() - k);
                out[k..k + n].fill(self.value);
                (self.repeat, k) = (self.repeat - n, k + n);
            } else if self.literal > 0 {
                if !self.refill(reader)? {
                    self.literal = 0;
                    break;
                }
                let n = self.literal.min(out.len() - k).min(self.buf.len() - self.at);
                out[k..k + n].copy_from_slice(&self.buf[self.at..self.at + n]);
                (self.literal, self.at, k) = (self.literal - n, self.at + n, k + n);
            } else {
                let Some(header) = self.byte(reader)? else { break };
                match header as i8 {
                    literal @ 0..=127 => self.literal = literal as usize + 1,
                    -128 => {}
                    repeat => {
                        let Some(value) = self.byte(reader)? else { break };
                        (self.value, self.repeat) = (value, (1 - isize::from(repeat)) as usize);
                    }
                }
            }
        }
        self.decoded += k as u64;
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use dicom_core::value::{PixelFragmentSequence, Value};
    use dicom_core::{DataElement, PrimitiveValue, VR, dicom_value};
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

    use super::*;

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

    /// PackBits with both kinds of run: repeats of equal bytes (up to 128),
    /// literals of the rest (up to 128), so runs cross row boundaries.
    fn packbits(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let same = bytes[i..].iter().take(128).take_while(|&&b| b == bytes[i]).count();
            if same >= 2 {
                out.extend([(1 - same as i32) as u8, bytes[i]]);
                i += same;
            } else {
                let n = (bytes.len() - i).min(128).min(
                    (i..bytes.len())
                        .find(|&j| j + 1 < bytes.len() && bytes[j] == bytes[j + 1])
                        .map_or(128, |j| (j - i).max(1)),
                );
                out.push(n as u8 - 1);
                out.extend(&bytes[i..i + n]);
                i += n;
            }
        }
        out
    }

    #[test]
    fn rle_runs_that_cross_rows_decode_row_by_row() {
        let (w, h) = (37u16, 29u16);
        let px: Vec<u16> = (0..u32::from(w) * u32::from(h))
            .map(|i| if (i / 50) % 2 == 0 { 30000 } else { (i * 7919 % 65536) as u16 })
            .collect();
        let high = packbits(&px.iter().map(|s| (s >> 8) as u8).collect::<Vec<_>>());
        let bytes = dx_rle(w, h, &px, |f| {
            // Re-encode both segments with mixed runs instead of one literal each.
            let low = packbits(&px.iter().map(|s| *s as u8).collect::<Vec<_>>());
            f.truncate(64);
            f[8..12].copy_from_slice(&(64 + high.len() as u32).to_le_bytes());
            f.extend(&high);
            f.extend(low);
        });
        let mut rows = 0;
        let mut got = Vec::new();
        decode_rows(Cursor::new(&bytes), w.into(), h.into(), &DecodeLimits::default(), &mut |y, row| {
            assert_eq!((y, row.len()), (rows, usize::from(w)));
            rows += 1;
            got.extend_from_slice(row);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, px);
    }

    /// An object declaring far more pixels than its descriptor is refused
    /// from its attributes: its pixel data is never read.
    #[test]
    fn a_declared_size_other_than_the_descriptor_is_refused_before_decoding() {
        // 60000x60000 with a pixel data of 12 samples: decoding would fail,
        // so a Mismatch proves it was never tried.
        let bytes = dx(60000, 60000, &[1; 12]);
        let err = decode_rows(Cursor::new(&bytes), 64, 64, &DecodeLimits::default(), &mut |_, _| panic!("no row"))
            .unwrap_err();
        assert!(
            matches!(err, DecodeError::Mismatch(ref m) if m.contains("60000x60000 pixels but the plane descriptor says 64x64")),
            "{err}"
        );
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
        let err = decode_rows(Cursor::new(&bytes), 0, 0, &DecodeLimits::default(), &mut |_, _| Ok(())).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");
    }

    #[test]
    fn the_plane_kind_is_read_from_image_type_value_3_or_the_toolkits_value_2() {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            plane_kind_of_image_type(&v(&["ORIGINAL", "PRIMARY", "HIGH ENERGY"])).as_deref(),
            Some("high_energy")
        );
        assert_eq!(plane_kind_of_image_type(&v(&["ORIGINAL", "LOW ENERGY"])).as_deref(), Some("low_energy"));
        assert_eq!(plane_kind_of_image_type(&v(&["ORIGINAL", "LOW ENERGY", "PRIMARY"])).as_deref(), Some("low_energy"));
        assert_eq!(plane_kind_of_image_type(&v(&["ORIGINAL", "PRIMARY", "MYSTERY"])).as_deref(), Some("mystery"));
        assert_eq!(plane_kind_of_image_type(&v(&["ORIGINAL", "PRIMARY"])), None);
    }
}
