//! Streaming plane decoders.
//!
//! [`decode_rows`] reads a plane of any supported [`Encoding`] and hands its
//! rows, top to bottom, to a sink as `&[u16]`. Memory stays bounded by one
//! TIFF strip (or band of tiles) or one PNG row, whatever the image size, so
//! validating a multi-gigabyte plane does not load it.

use std::io::{BufReader, Read, Seek};

/// How a plane's bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Row-major little-endian u16 samples, nothing else.
    RawU16Le,
    /// Single-image, single-channel grey TIFF, 8 or 16 bits.
    Tiff,
    /// Non-interlaced single-channel grey PNG, 8 or 16 bits.
    Png,
    /// A NEMA DICOS DX object (DICOM Part 10) in a lossless transfer syntax
    /// (see [`crate::dicos`]): uncompressed, deflated and RLE are read row by
    /// row; JPEG Lossless, JPEG-LS and JPEG 2000 frames are decoded whole,
    /// within [`DecodeLimits::max_frame_pixels`].
    Dicos,
}

pub use crate::decode_shared::{DecodeError, DecodeLimits};
use crate::decode_shared::{RowSink, check_dims};

fn tiff_err(e: tiff::TiffError, limits: &DecodeLimits) -> DecodeError {
    match e {
        tiff::TiffError::LimitsExceeded => DecodeError::TooLarge(format!(
            "a TIFF strip or tile needs more than {} MiB to decode; write the TIFF with smaller strips (fewer rows per strip)",
            limits.max_chunk_bytes >> 20
        )),
        tiff::TiffError::IoError(io) if io.kind() != std::io::ErrorKind::UnexpectedEof => DecodeError::Io(io),
        other => DecodeError::Malformed { encoding: "TIFF", detail: other.to_string() },
    }
}

/// What the file itself says about its samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlaneInfo {
    /// Bits per sample in the file: 8 or 16.
    pub bits_per_sample: u8,
}

/// Decodes a whole plane, calling `sink(row, samples)` for each row in order.
///
/// `width` and `height` are what the plane descriptor declared: a file whose
/// real size differs is a [`DecodeError::Mismatch`]. A sink error stops the
/// decode and comes back as [`DecodeError::Sink`].
pub fn decode_rows<R, F>(
    reader: R,
    encoding: Encoding,
    width: u32,
    height: u32,
    limits: &DecodeLimits,
    sink: F,
) -> Result<PlaneInfo, DecodeError>
where
    R: Read + Seek,
    F: FnMut(u32, &[u16]) -> Result<(), String>,
{
    decode_rows_from(reader, encoding, width, height, limits, 0, sink)
}

/// Like [`decode_rows`], from row `first` on: raw planes and TIFF strips or
/// tiles are read from the first one holding that row (earlier rows are
/// neither read nor decoded), so a region far down a plane costs its own
/// rows; PNG and DICOS are decoded from the top and only rows from `first`
/// on reach the sink. The sink may still see a few rows before `first` (the
/// rest of the strip or tile band holding it).
pub fn decode_rows_from<R, F>(
    reader: R,
    encoding: Encoding,
    width: u32,
    height: u32,
    limits: &DecodeLimits,
    first: u32,
    mut sink: F,
) -> Result<PlaneInfo, DecodeError>
where
    R: Read + Seek,
    F: FnMut(u32, &[u16]) -> Result<(), String>,
{
    let mut emit =
        |row: u32, samples: &[u16]| if row < first { Ok(()) } else { sink(row, samples).map_err(DecodeError::Sink) };
    match encoding {
        Encoding::RawU16Le => decode_raw(reader, width, height, first.min(height), &mut emit),
        Encoding::Tiff => decode_tiff(reader, width, height, limits, first, &mut emit),
        Encoding::Png => decode_png(reader, width, height, limits, &mut emit),
        Encoding::Dicos => {
            crate::dicos::decode_rows(reader, width, height, limits, &mut emit)?;
            Ok(PlaneInfo { bits_per_sample: 16 })
        }
    }
}

/// Size and sample depth of a TIFF or PNG file, read from its header only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// Pixels per row.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Bits per sample: 8 or 16.
    pub bits_per_sample: u8,
}

/// Reads the header of a grey TIFF, PNG or DICOS DX object (not the pixels).
pub fn probe<R: Read + Seek>(reader: R, encoding: Encoding) -> Result<ImageHeader, DecodeError> {
    let limits = DecodeLimits::default();
    match encoding {
        Encoding::RawU16Le => Err(DecodeError::Mismatch("a raw plane has no header: give its width and height".into())),
        Encoding::Dicos => {
            let info = crate::dicos::probe(reader)?;
            Ok(ImageHeader { width: info.width, height: info.height, bits_per_sample: 16 })
        }
        Encoding::Tiff => {
            let terr = |e| tiff_err(e, &limits);
            let mut dec = tiff::decoder::Decoder::new(BufReader::new(reader)).map_err(terr)?;
            let (width, height) = dec.dimensions().map_err(terr)?;
            match dec.colortype().map_err(terr)? {
                tiff::ColorType::Gray(b @ (8 | 16)) => Ok(ImageHeader { width, height, bits_per_sample: b }),
                other => Err(DecodeError::Mismatch(format!(
                    "the TIFF image is {other:?}; niix planes are single-channel grey, 8 or 16 bits"
                ))),
            }
        }
        Encoding::Png => {
            let reader = png::Decoder::new(BufReader::new(reader))
                .read_info()
                .map_err(|e| DecodeError::Malformed { encoding: "PNG", detail: e.to_string() })?;
            let info = reader.info();
            let bits_per_sample = match (info.color_type, info.bit_depth) {
                (png::ColorType::Grayscale, png::BitDepth::Sixteen) => 16,
                (png::ColorType::Grayscale, png::BitDepth::Eight) => 8,
                (c, b) => {
                    return Err(DecodeError::Mismatch(format!(
                        "the PNG image is {c:?} with {b:?}-bit samples; niix planes are single-channel grey, 8 or 16 bits"
                    )));
                }
            };
            Ok(ImageHeader { width: info.width, height: info.height, bits_per_sample })
        }
    }
}

fn decode_raw<R: Read + Seek>(
    mut reader: R,
    width: u32,
    height: u32,
    first: u32,
    emit: &mut RowSink<'_>,
) -> Result<PlaneInfo, DecodeError> {
    if first > 0 {
        reader.seek(std::io::SeekFrom::Current(i64::from(first) * i64::from(width) * 2)).map_err(DecodeError::Io)?;
    }
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let mut bytes = vec![0u8; width as usize * 2];
    let mut row = vec![0u16; width as usize];
    for y in first..height {
        reader.read_exact(&mut bytes).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                DecodeError::Malformed { encoding: "raw u16 plane", detail: format!("ends at row {y} of {height}") }
            }
            _ => DecodeError::Io(e),
        })?;
        for (s, b) in row.iter_mut().zip(bytes.chunks_exact(2)) {
            *s = u16::from_le_bytes([b[0], b[1]]);
        }
        emit(y, &row)?;
    }
    Ok(PlaneInfo { bits_per_sample: 16 })
}

/// Widens a decoded TIFF chunk to u16 samples.
fn tiff_samples(result: tiff::decoder::DecodingResult) -> Result<Vec<u16>, DecodeError> {
    use tiff::decoder::DecodingResult;
    match result {
        DecodingResult::U16(v) => Ok(v),
        DecodingResult::U8(v) => Ok(v.into_iter().map(u16::from).collect()),
        _ => Err(DecodeError::Mismatch("TIFF samples must be unsigned 8- or 16-bit integers".into())),
    }
}

fn decode_tiff<R: Read + Seek>(
    reader: R,
    width: u32,
    height: u32,
    limits: &DecodeLimits,
    first: u32,
    emit: &mut RowSink<'_>,
) -> Result<PlaneInfo, DecodeError> {
    use tiff::ColorType;
    use tiff::decoder::{ChunkType, Decoder, Limits};

    let terr = |e| tiff_err(e, limits);
    let mut tl = Limits::default();
    tl.decoding_buffer_size = limits.max_chunk_bytes;
    tl.intermediate_buffer_size = limits.max_chunk_bytes;
    let mut dec = Decoder::new(BufReader::with_capacity(1 << 20, reader)).map_err(terr)?.with_limits(tl);
    check_dims(dec.dimensions().map_err(terr)?, width, height, "TIFF image")?;
    let bits_per_sample = match dec.colortype().map_err(terr)? {
        ColorType::Gray(b @ (8 | 16)) => b,
        other => {
            return Err(DecodeError::Mismatch(format!(
                "the TIFF image is {other:?}; niix planes are single-channel grey, 8 or 16 bits"
            )));
        }
    };
    let w = width as usize;
    match dec.get_chunk_type() {
        ChunkType::Strip => {
            // Every strip but the last holds `per_strip` rows.
            let per_strip = dec.chunk_dimensions().1.max(1);
            let skip = (first.min(height) / per_strip).min(dec.strip_count().map_err(terr)?);
            let mut y = skip * per_strip;
            for i in skip..dec.strip_count().map_err(terr)? {
                let samples = tiff_samples(dec.read_chunk(i).map_err(terr)?)?;
                for row in samples.chunks_exact(w) {
                    if y < height {
                        emit(y, row)?;
                        y += 1;
                    }
                }
            }
            if y != height {
                return Err(DecodeError::Malformed {
                    encoding: "TIFF",
                    detail: format!("its strips hold {y} rows, not {height}"),
                });
            }
        }
        ChunkType::Tile => {
            let (tw, th) = dec.chunk_dimensions();
            let (tw, th) = (tw as usize, th as usize);
            let across = w.div_ceil(tw);
            let bands = (height as usize).div_ceil(th);
            if across * bands != dec.tile_count().map_err(terr)? as usize {
                return Err(DecodeError::Malformed {
                    encoding: "TIFF",
                    detail: "tile count does not cover the image".into(),
                });
            }
            if th.saturating_mul(w).saturating_mul(2) > limits.max_chunk_bytes {
                return Err(tiff_err(tiff::TiffError::LimitsExceeded, limits));
            }
            let mut band = vec![0u16; th * w];
            for b in (first.min(height) as usize / th)..bands {
                let rows = th.min(height as usize - b * th);
                for t in 0..across {
                    let idx = (b * across + t) as u32;
                    let (dw, dh) = dec.chunk_data_dimensions(idx);
                    let samples = tiff_samples(dec.read_chunk(idx).map_err(terr)?)?;
                    let (dw, dh) = (dw as usize, dh as usize);
                    if samples.len() < dw * dh || dh < rows {
                        return Err(DecodeError::Malformed {
                            encoding: "TIFF",
                            detail: format!("tile {idx} is short"),
                        });
                    }
                    for r in 0..rows {
                        let x0 = t * tw;
                        let n = dw.min(w - x0);
                        band[r * w + x0..r * w + x0 + n].copy_from_slice(&samples[r * dw..r * dw + n]);
                    }
                }
                for r in 0..rows {
                    emit((b * th + r) as u32, &band[r * w..(r + 1) * w])?;
                }
            }
        }
    }
    Ok(PlaneInfo { bits_per_sample })
}

fn decode_png<R: Read + Seek>(
    reader: R,
    width: u32,
    height: u32,
    limits: &DecodeLimits,
    emit: &mut RowSink<'_>,
) -> Result<PlaneInfo, DecodeError> {
    let malformed = |e: png::DecodingError| match e {
        png::DecodingError::IoError(io) if io.kind() != std::io::ErrorKind::UnexpectedEof => DecodeError::Io(io),
        png::DecodingError::LimitsExceeded => DecodeError::TooLarge(format!(
            "a PNG row or chunk needs more than {} MiB to decode",
            limits.max_chunk_bytes >> 20
        )),
        other => DecodeError::Malformed { encoding: "PNG", detail: other.to_string() },
    };
    let mut decoder = png::Decoder::new_with_limits(
        BufReader::with_capacity(1 << 20, reader),
        png::Limits { bytes: limits.max_chunk_bytes },
    );
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(malformed)?;
    let info = reader.info();
    check_dims((info.width, info.height), width, height, "PNG image")?;
    if info.color_type != png::ColorType::Grayscale {
        return Err(DecodeError::Mismatch(format!(
            "the PNG image is {:?}; niix planes are single-channel grey, 8 or 16 bits",
            info.color_type
        )));
    }
    let sixteen = match info.bit_depth {
        png::BitDepth::Sixteen => true,
        png::BitDepth::Eight => false,
        other => return Err(DecodeError::Mismatch(format!("the PNG has {other:?}-bit samples; niix accepts 8 or 16"))),
    };
    if info.interlaced {
        return Err(DecodeError::Mismatch("interlaced PNG is not accepted; write the plane non-interlaced".into()));
    }
    let mut samples = vec![0u16; width as usize];
    let mut y = 0u32;
    while let Some(row) = reader.next_row().map_err(malformed)? {
        let data = row.data();
        if sixteen {
            for (s, b) in samples.iter_mut().zip(data.chunks_exact(2)) {
                *s = u16::from_be_bytes([b[0], b[1]]);
            }
        } else {
            for (s, b) in samples.iter_mut().zip(data) {
                *s = u16::from(*b);
            }
        }
        emit(y, &samples)?;
        y += 1;
    }
    if y != height {
        return Err(DecodeError::Malformed { encoding: "PNG", detail: format!("it holds {y} rows, not {height}") });
    }
    Ok(PlaneInfo { bits_per_sample: if sixteen { 16 } else { 8 } })
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn pattern(w: u32, h: u32) -> Vec<u16> {
        (0..w * h).map(|i| (i.wrapping_mul(2654435761) >> 7) as u16).collect()
    }

    fn collect(bytes: &[u8], enc: Encoding, w: u32, h: u32) -> Result<Vec<u16>, DecodeError> {
        let mut out = Vec::new();
        let mut next = 0;
        decode_rows(Cursor::new(bytes), enc, w, h, &DecodeLimits::default(), |y, row| {
            assert_eq!(y, next);
            next += 1;
            out.extend_from_slice(row);
            Ok(())
        })?;
        assert_eq!(next, h);
        Ok(out)
    }

    fn tiff_bytes(w: u32, h: u32, px: &[u16], rows_per_strip: Option<u32>) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        let mut enc = tiff::encoder::TiffEncoder::new(&mut buf).unwrap();
        let mut img = enc.new_image::<tiff::encoder::colortype::Gray16>(w, h).unwrap();
        if let Some(r) = rows_per_strip {
            img.rows_per_strip(r).unwrap();
        }
        img.write_data(px).unwrap();
        buf.into_inner()
    }

    fn png_bytes(w: u32, h: u32, px: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Sixteen);
        let mut wr = enc.write_header().unwrap();
        let bytes: Vec<u8> = px.iter().flat_map(|v| v.to_be_bytes()).collect();
        wr.write_image_data(&bytes).unwrap();
        wr.finish().unwrap();
        out
    }

    #[test]
    fn raw_tiff_and_png_give_the_same_samples() {
        let (w, h) = (37, 23);
        let px = pattern(w, h);
        let raw: Vec<u8> = px.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(collect(&raw, Encoding::RawU16Le, w, h).unwrap(), px);
        assert_eq!(collect(&tiff_bytes(w, h, &px, Some(5)), Encoding::Tiff, w, h).unwrap(), px);
        assert_eq!(collect(&tiff_bytes(w, h, &px, None), Encoding::Tiff, w, h).unwrap(), px);
        assert_eq!(collect(&png_bytes(w, h, &px), Encoding::Png, w, h).unwrap(), px);
    }

    /// Counts the bytes read through it.
    struct Counted<R>(R, std::rc::Rc<std::cell::Cell<u64>>);
    impl<R: Read> Read for Counted<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.read(buf)?;
            self.1.set(self.1.get() + n as u64);
            Ok(n)
        }
    }
    impl<R: Seek> Seek for Counted<R> {
        fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
            self.0.seek(to)
        }
    }

    #[test]
    fn decoding_from_a_row_skips_the_rows_above_it() {
        let (w, h) = (40, 300);
        let px = pattern(w, h);
        let raw: Vec<u8> = px.iter().flat_map(|v| v.to_le_bytes()).collect();
        let files = [
            (Encoding::RawU16Le, raw.clone()),
            (Encoding::Tiff, tiff_bytes(w, h, &px, Some(16))),
            (Encoding::Tiff, tiff_bytes(w, h, &px, None)),
            (Encoding::Png, png_bytes(w, h, &px)),
        ];
        for (encoding, bytes) in files {
            for first in [0, 1, 250, 299, 300, 1000] {
                let read = std::rc::Rc::new(std::cell::Cell::new(0));
                let (mut rows, mut out) = (Vec::new(), Vec::new());
                let counted = Counted(Cursor::new(&bytes), read.clone());
                decode_rows_from(counted, encoding, w, h, &DecodeLimits::default(), first, |y, row| {
                    rows.push(y);
                    out.extend_from_slice(row);
                    Ok(())
                })
                .unwrap();
                let from = first.min(h);
                assert_eq!(rows, (from..h).collect::<Vec<_>>(), "{encoding:?} from {first}");
                assert_eq!(out, px[(from * w) as usize..], "{encoding:?} from {first}");
                if encoding == Encoding::RawU16Le {
                    assert_eq!(read.get(), u64::from((h - from) * w * 2), "raw from {first}: only its rows are read");
                }
            }
        }
    }

    #[test]
    fn probe_reads_size_and_depth() {
        let px = pattern(9, 7);
        let want = ImageHeader { width: 9, height: 7, bits_per_sample: 16 };
        assert_eq!(probe(Cursor::new(tiff_bytes(9, 7, &px, None)), Encoding::Tiff).unwrap(), want);
        assert_eq!(probe(Cursor::new(png_bytes(9, 7, &px)), Encoding::Png).unwrap(), want);
        assert!(probe(Cursor::new(b"junk".to_vec()), Encoding::Png).is_err());
    }

    #[test]
    fn declared_size_must_match_the_file() {
        let px = pattern(8, 4);
        let err = collect(&tiff_bytes(8, 4, &px, None), Encoding::Tiff, 4, 8).unwrap_err();
        assert!(matches!(err, DecodeError::Mismatch(ref m) if m.contains("8x4")), "{err}");
        let err = collect(&png_bytes(8, 4, &px), Encoding::Png, 8, 5).unwrap_err();
        assert!(matches!(err, DecodeError::Mismatch(_)), "{err}");
    }

    #[test]
    fn truncated_and_garbage_files_are_malformed() {
        let px = pattern(64, 64);
        let t = tiff_bytes(64, 64, &px, Some(8));
        let err = collect(&t[..t.len() / 2], Encoding::Tiff, 64, 64).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");
        let p = png_bytes(64, 64, &px);
        let err = collect(&p[..p.len() / 2], Encoding::Png, 64, 64).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");
        let err = collect(b"definitely not an image", Encoding::Tiff, 64, 64).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");
        let err = collect(&[0u8; 10], Encoding::RawU16Le, 64, 64).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");
    }

    #[test]
    fn a_strip_beyond_the_limit_is_too_large() {
        let px = pattern(64, 64);
        let t = tiff_bytes(64, 64, &px, Some(64));
        let limits = DecodeLimits { max_chunk_bytes: 1024, ..Default::default() };
        let err = decode_rows(Cursor::new(t), Encoding::Tiff, 64, 64, &limits, |_, _| Ok(())).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge(_)), "{err}");
    }

    #[test]
    fn a_png_row_beyond_the_limit_is_too_large() {
        let px = pattern(1024, 2);
        let limits = DecodeLimits { max_chunk_bytes: 1024, ..Default::default() };
        let p = png_bytes(1024, 2, &px);
        let err = decode_rows(Cursor::new(p), Encoding::Png, 1024, 2, &limits, |_, _| Ok(())).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge(_)), "{err}");
    }

    /// Found by the `tiff_plane` fuzz target: a SampleFormat tag with no
    /// values made tiff 0.10 index an empty list and panic.
    #[test]
    fn an_empty_sample_format_tag_is_malformed() {
        let mut t = tiff_bytes(8, 4, &pattern(8, 4), None);
        // SampleFormat (339), SHORT, count 1 -> count 0.
        let at = t.windows(8).position(|w| w == [0x53, 0x01, 3, 0, 1, 0, 0, 0]).expect("a SampleFormat entry");
        t[at + 4] = 0;
        let err = probe(Cursor::new(t.clone()), Encoding::Tiff).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");
        let err = collect(&t, Encoding::Tiff, 8, 4).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");
    }

    #[test]
    fn colour_images_are_refused() {
        let mut buf = Cursor::new(Vec::new());
        let mut enc = tiff::encoder::TiffEncoder::new(&mut buf).unwrap();
        enc.write_image::<tiff::encoder::colortype::RGB8>(2, 2, &[0u8; 12]).unwrap();
        let err = collect(&buf.into_inner(), Encoding::Tiff, 2, 2).unwrap_err();
        assert!(matches!(err, DecodeError::Mismatch(ref m) if m.contains("RGB")), "{err}");
    }
}
