//! The transfer syntaxes a DICOS DX object may arrive in, and the
//! whole-frame codecs (JPEG Lossless, JPEG-LS, JPEG 2000) that decode the
//! compressed ones.
//!
//! Every syntax is either read, or refused with a message naming it and
//! saying why: lossy syntaxes are refused because an analysis of pixels a
//! codec has altered is not evidence. A compressed frame is checked before
//! it is decoded: its size from the DICOM attributes against the
//! whole-frame pixel budget ([`DecodeLimits::max_frame_pixels`]), then its
//! codestream header (size, components, precision, and that the stream is
//! really lossless) against the attributes.

use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::decode_shared::{DecodeError, DecodeLimits};

/// How the pixel data of an accepted transfer syntax is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Syntax {
    /// Native pixel data, streamed row by row.
    Native { big_endian: bool },
    /// Deflated Explicit VR Little Endian: the data set after the file meta
    /// group is one raw deflate stream; native pixel data, streamed.
    Deflated,
    /// RLE Lossless, streamed row by row.
    Rle,
    /// A whole-frame codec.
    Frame(Codec),
}

/// A codec that decodes a whole frame at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Codec {
    /// JPEG Lossless, process 14 (any predictor, or selection value 1).
    JpegLossless,
    /// JPEG-LS Lossless (NEAR = 0).
    JpegLs,
    /// JPEG 2000 Lossless Only (reversible 5-3 wavelet).
    J2k,
}

impl Codec {
    fn name(self) -> &'static str {
        match self {
            Codec::JpegLossless => "JPEG Lossless",
            Codec::JpegLs => "JPEG-LS Lossless",
            Codec::J2k => "JPEG 2000 Lossless",
        }
    }
}

/// What the accepted syntaxes are, for messages.
pub(crate) const ACCEPTED: &str = "uncompressed (implicit or explicit VR), deflated explicit VR, RLE Lossless, \
     JPEG Lossless (.4.57, .4.70), JPEG-LS Lossless (.4.80) or JPEG 2000 Lossless (.4.90)";

/// Transfer syntaxes whose pixels may have been altered by the codec.
const LOSSY: &[(&str, &str)] = &[
    ("1.2.840.10008.1.2.4.50", "JPEG Baseline (Process 1)"),
    ("1.2.840.10008.1.2.4.51", "JPEG Extended (Process 2 & 4)"),
    ("1.2.840.10008.1.2.4.52", "JPEG Extended (Process 3 & 5)"),
    ("1.2.840.10008.1.2.4.53", "JPEG Spectral Selection, Non-Hierarchical (Process 6 & 8)"),
    ("1.2.840.10008.1.2.4.54", "JPEG Spectral Selection, Non-Hierarchical (Process 7 & 9)"),
    ("1.2.840.10008.1.2.4.55", "JPEG Full Progression, Non-Hierarchical (Process 10 & 12)"),
    ("1.2.840.10008.1.2.4.56", "JPEG Full Progression, Non-Hierarchical (Process 11 & 13)"),
    ("1.2.840.10008.1.2.4.59", "JPEG Extended, Hierarchical (Process 16 & 18)"),
    ("1.2.840.10008.1.2.4.60", "JPEG Extended, Hierarchical (Process 17 & 19)"),
    ("1.2.840.10008.1.2.4.61", "JPEG Spectral Selection, Hierarchical (Process 20 & 22)"),
    ("1.2.840.10008.1.2.4.62", "JPEG Spectral Selection, Hierarchical (Process 21 & 23)"),
    ("1.2.840.10008.1.2.4.63", "JPEG Full Progression, Hierarchical (Process 24 & 26)"),
    ("1.2.840.10008.1.2.4.64", "JPEG Full Progression, Hierarchical (Process 25 & 27)"),
    ("1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless"),
    ("1.2.840.10008.1.2.4.91", "JPEG 2000 (lossy allowed)"),
    ("1.2.840.10008.1.2.4.93", "JPEG 2000 Part 2 Multi-component (lossy allowed)"),
    ("1.2.840.10008.1.2.4.203", "High-Throughput JPEG 2000 (lossy allowed)"),
    ("1.2.840.10008.1.2.4.112", "JPEG XL (lossy allowed)"),
    ("1.2.840.10008.1.2.4.111", "JPEG XL JPEG Recompression (of a lossy JPEG)"),
    ("1.2.840.10008.1.2.4.100", "MPEG2 Main Profile / Main Level"),
    ("1.2.840.10008.1.2.4.101", "MPEG2 Main Profile / High Level"),
    ("1.2.840.10008.1.2.4.102", "MPEG-4 AVC/H.264 High Profile / Level 4.1"),
    ("1.2.840.10008.1.2.4.103", "MPEG-4 AVC/H.264 BD-compatible High Profile / Level 4.1"),
    ("1.2.840.10008.1.2.4.104", "MPEG-4 AVC/H.264 High Profile / Level 4.2 For 2D Video"),
    ("1.2.840.10008.1.2.4.105", "MPEG-4 AVC/H.264 High Profile / Level 4.2 For 3D Video"),
    ("1.2.840.10008.1.2.4.106", "MPEG-4 AVC/H.264 Stereo High Profile / Level 4.2"),
    ("1.2.840.10008.1.2.4.107", "HEVC/H.265 Main Profile / Level 5.1"),
    ("1.2.840.10008.1.2.4.108", "HEVC/H.265 Main 10 Profile / Level 5.1"),
];

/// Lossless syntaxes niix does not decode.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("1.2.840.10008.1.2.4.58", "JPEG Lossless, Non-Hierarchical (Process 15)"),
    ("1.2.840.10008.1.2.4.65", "JPEG Lossless, Hierarchical (Process 28)"),
    ("1.2.840.10008.1.2.4.66", "JPEG Lossless, Hierarchical (Process 29)"),
    ("1.2.840.10008.1.2.4.92", "JPEG 2000 Part 2 Multi-component Lossless Only"),
    ("1.2.840.10008.1.2.4.110", "JPEG XL Lossless"),
    ("1.2.840.10008.1.2.4.201", "High-Throughput JPEG 2000 Lossless"),
    ("1.2.840.10008.1.2.4.202", "High-Throughput JPEG 2000 with RPCL Options Lossless"),
    ("1.2.840.10008.1.2.4.94", "JPIP Referenced (pixels not in the file)"),
    ("1.2.840.10008.1.2.4.95", "JPIP Referenced Deflate (pixels not in the file)"),
    ("1.2.840.10008.1.2.8.1", "Deflated Image Frame Compression"),
];

/// Classifies a transfer syntax: how to read it, or why it is refused.
pub(crate) fn syntax_of(uid: &str) -> Result<Syntax, DecodeError> {
    Ok(match uid {
        "1.2.840.10008.1.2" | "1.2.840.10008.1.2.1" => Syntax::Native { big_endian: false },
        "1.2.840.10008.1.2.2" => Syntax::Native { big_endian: true },
        "1.2.840.10008.1.2.1.99" => Syntax::Deflated,
        "1.2.840.10008.1.2.5" => Syntax::Rle,
        "1.2.840.10008.1.2.4.57" | "1.2.840.10008.1.2.4.70" => Syntax::Frame(Codec::JpegLossless),
        "1.2.840.10008.1.2.4.80" => Syntax::Frame(Codec::JpegLs),
        "1.2.840.10008.1.2.4.90" => Syntax::Frame(Codec::J2k),
        _ => {
            if let Some((_, name)) = LOSSY.iter().find(|(u, _)| *u == uid) {
                return Err(DecodeError::Mismatch(format!(
                    "transfer syntax {uid} ({name}) is lossy: niix refuses lossy pixel data, because an analysis \
                     of pixels a codec has altered is not evidence; send the image {ACCEPTED}"
                )));
            }
            let what = UNSUPPORTED.iter().find(|(u, _)| *u == uid).map_or("unknown to niix", |(_, n)| n);
            return Err(DecodeError::Mismatch(format!(
                "transfer syntax {uid} ({what}) is not accepted; send the image {ACCEPTED}"
            )));
        }
    })
}

fn malformed(codec: Codec, detail: impl std::fmt::Display) -> DecodeError {
    DecodeError::Malformed { encoding: "DICOS DX object", detail: format!("its {} frame: {detail}", codec.name()) }
}

/// A frame as the codestream header declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    width: u32,
    height: u32,
    components: u32,
    precision: u32,
    /// Samples are signed (JPEG 2000 only).
    signed: bool,
}

/// The most compressed bytes one frame may hold: four times its
/// uncompressed size (the worst expansion of the lossless codecs on noise)
/// plus 64 KiB of markers.
pub(crate) fn max_frame_bytes(pixels: u64, bytes_per_sample: u64) -> u64 {
    pixels * bytes_per_sample * 4 + (64 << 10)
}

/// Checks a frame's declared size against the whole-frame budget, before
/// any of its bytes are read.
pub(crate) fn check_budget(width: u32, height: u32, codec: Codec, limits: &DecodeLimits) -> Result<(), DecodeError> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_frame_pixels {
        return Err(DecodeError::TooLarge(format!(
            "a {} frame is decoded whole: {width}x{height} = {pixels} pixels is over the {} pixel limit for \
             compressed frames; send a plane this large uncompressed or RLE Lossless (read row by row)",
            codec.name(),
            limits.max_frame_pixels
        )));
    }
    Ok(())
}

/// Decodes one compressed frame of `width x height` samples with at most
/// `bits_allocated` bits each, after checking its codestream header against
/// them. Returns the samples, row-major.
pub(crate) fn decode_frame(
    codec: Codec,
    data: &[u8],
    width: u32,
    height: u32,
    bits_allocated: u32,
) -> Result<Vec<u16>, DecodeError> {
    let header = match codec {
        Codec::JpegLossless | Codec::JpegLs => jpeg_header(codec, data)?,
        Codec::J2k => j2k_header(j2k_codestream(data)?)?,
    };
    if (header.width, header.height) != (width, height) {
        return Err(DecodeError::Mismatch(format!(
            "the {} codestream is {}x{} pixels but the object's Columns and Rows say {width}x{height}",
            codec.name(),
            header.width,
            header.height
        )));
    }
    if header.components != 1 {
        return Err(DecodeError::Mismatch(format!(
            "the {} codestream has {} components; a DX plane has one",
            codec.name(),
            header.components
        )));
    }
    if header.precision > bits_allocated {
        return Err(DecodeError::Mismatch(format!(
            "the {} codestream has {}-bit samples but Bits Allocated is {bits_allocated}",
            codec.name(),
            header.precision
        )));
    }
    let pixels = width as usize * height as usize;
    // The decoders are third-party code fed hostile bytes: a panic in one
    // is a malformed frame, not a crashed server.
    let samples = catch_unwind(AssertUnwindSafe(|| match codec {
        Codec::JpegLossless => decode_jpeg(data, pixels),
        Codec::JpegLs => {
            jpegls::decode(data, width, height).map(|(samples, _, _)| samples).map_err(|e| malformed(codec, e))
        }
        Codec::J2k => decode_j2k(data, width, height, header.signed),
    }))
    .map_err(|_| malformed(codec, "the decoder failed on this stream"))??;
    if samples.len() != pixels {
        return Err(malformed(codec, format!("it decodes to {} samples for {width}x{height} pixels", samples.len())));
    }
    Ok(samples)
}

fn decode_jpeg(data: &[u8], pixels: usize) -> Result<Vec<u16>, DecodeError> {
    let codec = Codec::JpegLossless;
    let mut decoder = jpeg_decoder::Decoder::new(data);
    decoder.set_max_decoding_buffer_size(pixels * 2);
    let bytes = decoder.decode().map_err(|e| malformed(codec, e))?;
    match decoder.info().map(|i| i.pixel_format) {
        Some(jpeg_decoder::PixelFormat::L16) => {
            Ok(bytes.chunks_exact(2).map(|b| u16::from_ne_bytes([b[0], b[1]])).collect())
        }
        Some(jpeg_decoder::PixelFormat::L8) => Ok(bytes.into_iter().map(u16::from).collect()),
        other => Err(malformed(codec, format!("it decodes to {other:?} pixels, not grey"))),
    }
}

fn decode_j2k(data: &[u8], width: u32, height: u32, signed: bool) -> Result<Vec<u16>, DecodeError> {
    let codec = Codec::J2k;
    let settings = hayro_jpeg2000::DecodeSettings { resolve_palette_indices: false, ..Default::default() };
    let image = hayro_jpeg2000::Image::new(data, &settings).map_err(|e| malformed(codec, e))?;
    if (image.width(), image.height()) != (width, height) {
        return Err(malformed(codec, format!("the decoder sees {}x{} pixels", image.width(), image.height())));
    }
    let mut context = hayro_jpeg2000::DecoderContext::default();
    let decoded = image.decode(&mut context).map_err(|e| malformed(codec, e))?;
    let [component] = decoded.components() else {
        return Err(malformed(codec, format!("it decodes to {} components", decoded.components().len())));
    };
    // The reversible wavelet's integer lifting is exact in f32 for these
    // magnitudes: every sample must come out a whole number in range.
    let (low, high) = if signed { (-32768.0, 32767.0) } else { (0.0, 65535.0) };
    component
        .samples()
        .iter()
        .map(|&v| {
            if v.fract() != 0.0 || !(low..=high).contains(&v) {
                return Err(malformed(codec, format!("it decodes to a sample of {v}, not a 16-bit integer")));
            }
            Ok(v as i32 as u16)
        })
        .collect()
}

/// Reads the frame header of a JPEG (process 14) or JPEG-LS stream, and
/// every scan header, refusing what is not lossless: a DCT process, a point
/// transform (it drops low bits), or a JPEG-LS NEAR above 0.
fn jpeg_header(codec: Codec, data: &[u8]) -> Result<Header, DecodeError> {
    if !data.starts_with(&[0xFF, 0xD8]) {
        return Err(malformed(codec, "it does not start with an SOI marker"));
    }
    let mut header = None;
    let mut scans = 0;
    let mut pos = 2;
    loop {
        // Skip to the next marker (fill bytes, or entropy-coded data after
        // a scan header: there 0xFF is followed by a stuffed byte below 0x80
        // or by a restart marker).
        while pos + 1 < data.len() && !(data[pos] == 0xFF && data[pos + 1] >= 0x80 && data[pos + 1] != 0xFF) {
            pos += 1;
        }
        if pos + 1 >= data.len() {
            return Err(malformed(codec, "it ends before its EOI marker"));
        }
        let marker = data[pos + 1];
        pos += 2;
        match marker {
            0xD0..=0xD7 => continue,
            0xD9 => break,
            _ => {}
        }
        let Some(&[a, b]) = data.get(pos..pos + 2).map(|s| <&[u8; 2]>::try_from(s).unwrap()) else {
            return Err(malformed(codec, "it ends inside a marker segment"));
        };
        let len = usize::from(u16::from_be_bytes([a, b]));
        let Some(seg) = data.get(pos + 2..pos + len).filter(|_| len >= 2) else {
            return Err(malformed(codec, format!("its marker FF{marker:02X} declares {len} bytes past the end")));
        };
        pos += len;
        match marker {
            // Start of frame.
            0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF | 0xF7 | 0xF9 => {}
            0xDA => {
                scans += 1;
                // Ns, Ns x (component, table), then Ss, Se, Ah|Al: for
                // JPEG-LS, NEAR, ILV, Al (the point transform).
                let ns = usize::from(*seg.first().unwrap_or(&0));
                let Some(&[ss, _se, ahal]) = seg.get(1 + 2 * ns..4 + 2 * ns).map(|s| <&[u8; 3]>::try_from(s).unwrap())
                else {
                    return Err(malformed(codec, "a scan header is short"));
                };
                if codec == Codec::JpegLs && ss != 0 {
                    return Err(DecodeError::Mismatch(format!(
                        "the JPEG-LS stream is near-lossless (NEAR = {ss}) though the transfer syntax says lossless: \
                         niix refuses lossy pixel data, because an analysis of pixels a codec has altered is not evidence"
                    )));
                }
                if ahal & 0x0F != 0 {
                    return Err(DecodeError::Mismatch(format!(
                        "the {} stream has a point transform of {} bits, which drops low-order bits: niix refuses \
                         lossy pixel data, because an analysis of pixels a codec has altered is not evidence",
                        codec.name(),
                        ahal & 0x0F
                    )));
                }
                continue;
            }
            _ => continue,
        }
        // A frame header: P, Y, X, Nf.
        let want = if codec == Codec::JpegLs { 0xF7 } else { 0xC3 };
        if marker != want {
            let why = match marker {
                0xC0..=0xC2 | 0xC5 | 0xC6 | 0xC9 | 0xCA | 0xCD | 0xCE => {
                    "a DCT process, which is lossy: niix refuses lossy pixel data, because an analysis of pixels \
                     a codec has altered is not evidence"
                }
                _ => "a process niix does not decode",
            };
            return Err(DecodeError::Mismatch(format!(
                "the {} transfer syntax holds a JPEG frame of type SOF{} ({why})",
                codec.name(),
                match marker {
                    0xF7 => 55,
                    0xF9 => 57,
                    m => m - 0xC0,
                }
            )));
        }
        if header.is_some() {
            return Err(malformed(codec, "it has more than one frame header"));
        }
        let Some(&[p, y0, y1, x0, x1, nf]) = seg.get(..6).map(|s| <&[u8; 6]>::try_from(s).unwrap()) else {
            return Err(malformed(codec, "its frame header is short"));
        };
        header = Some(Header {
            width: u32::from(u16::from_be_bytes([x0, x1])),
            height: u32::from(u16::from_be_bytes([y0, y1])),
            components: u32::from(nf),
            precision: u32::from(p),
            signed: false,
        });
    }
    match (header, scans) {
        (Some(h), 1..) => Ok(h),
        (None, _) => Err(malformed(codec, "it has no frame header")),
        (Some(_), _) => Err(malformed(codec, "it has no scan")),
    }
}

/// The J2K codestream of a fragment: the fragment itself, or the `jp2c`
/// box of a JP2 file (which some toolkits write in place of a bare
/// codestream).
fn j2k_codestream(data: &[u8]) -> Result<&[u8], DecodeError> {
    let codec = Codec::J2k;
    if data.starts_with(&[0xFF, 0x4F, 0xFF, 0x51]) {
        return Ok(data);
    }
    if !data.starts_with(b"\x00\x00\x00\x0CjP  ") {
        return Err(malformed(codec, "it is neither a JPEG 2000 codestream nor a JP2 file"));
    }
    let mut pos = 0usize;
    while pos + 8 <= data.len() {
        let len = u32::from_be_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
        let kind = &data[pos + 4..pos + 8];
        let (head, len) = match len {
            0 => (8, data.len() - pos),
            1 if pos + 16 <= data.len() => {
                (16, usize::try_from(u64::from_be_bytes(data[pos + 8..pos + 16].try_into().unwrap())).unwrap_or(0))
            }
            _ => (8, len),
        };
        if len < head || pos + len > data.len() {
            return Err(malformed(codec, "a JP2 box runs past the end of the fragment"));
        }
        if kind == b"jp2c" {
            return Ok(&data[pos + head..pos + len]);
        }
        pos += len;
    }
    Err(malformed(codec, "the JP2 file has no codestream box"))
}

/// Reads a J2K codestream's SIZ, and the wavelet of every COD and COC in
/// its main and tile-part headers, refusing the irreversible (9-7) one:
/// lossy even where the syntax says lossless. Precision and sign are the
/// first component's.
fn j2k_header(data: &[u8]) -> Result<Header, DecodeError> {
    let codec = Codec::J2k;
    let u16_at = |i: usize| data.get(i..i + 2).map(|s| u16::from_be_bytes([s[0], s[1]]));
    let u32_at = |i: usize| data.get(i..i + 4).map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]));
    let short = || malformed(codec, "its header is truncated");
    let mut header = None;
    let mut csiz = 0usize;
    let mut pos = 2; // after SOC
    // Marker segments until SOD (tile data) or EOC; at SOT, note where the
    // next tile-part starts.
    let mut next_tile = None;
    loop {
        let marker = u16_at(pos).ok_or_else(short)?;
        match marker {
            0xFFD9 => break,
            0xFF93 => {
                // SOD: skip this tile-part's data.
                match next_tile.take() {
                    Some(at) if at > pos => {
                        pos = at;
                        continue;
                    }
                    _ => break, // Psot = 0: the last tile-part runs to EOC
                }
            }
            _ => {}
        }
        let len = usize::from(u16_at(pos + 2).ok_or_else(short)?);
        let seg = data.get(pos + 4..pos + 2 + len).filter(|_| len >= 2).ok_or_else(short)?;
        match marker {
            0xFF51 => {
                // SIZ: Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz, Csiz, Ssiz...
                let at = |i| u32_at(pos + 4 + i).ok_or_else(short);
                let (x, y, x0, y0) = (at(2)?, at(6)?, at(10)?, at(14)?);
                csiz = usize::from(u16_at(pos + 4 + 34).ok_or_else(short)?);
                let ssiz = *seg.get(36).ok_or_else(short)?;
                header = Some(Header {
                    width: x.saturating_sub(x0),
                    height: y.saturating_sub(y0),
                    components: csiz as u32,
                    precision: u32::from(ssiz & 0x7F) + 1,
                    signed: ssiz & 0x80 != 0,
                });
            }
            0xFF52 | 0xFF53 => {
                // COD: Scod, SGcod (4), SPcod: levels, xcb, ycb, style, transform.
                // COC: Ccoc (1 or 2), Scoc, SPcoc: the same five.
                let at = if marker == 0xFF52 { 9 } else { usize::from(csiz >= 257) + 1 + 1 + 4 };
                if *seg.get(at).ok_or_else(short)? != 1 {
                    return Err(DecodeError::Mismatch(
                        "the JPEG 2000 codestream uses the irreversible (9-7) wavelet, which is lossy, though the \
                         transfer syntax says lossless: niix refuses lossy pixel data, because an analysis of pixels \
                         a codec has altered is not evidence"
                            .into(),
                    ));
                }
            }
            0xFF90 => {
                // SOT: Isot, Psot (this tile-part's length from SOT).
                let psot = u32_at(pos + 6).ok_or_else(short)? as usize;
                next_tile = (psot > 0).then(|| pos + psot);
            }
            _ => {}
        }
        pos += 2 + len;
    }
    header.ok_or_else(|| malformed(codec, "it has no SIZ marker"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lossy_and_unknown_syntaxes_are_refused_by_name() {
        for (uid, needle) in [
            ("1.2.840.10008.1.2.4.50", "JPEG Baseline (Process 1)) is lossy"),
            ("1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless) is lossy"),
            ("1.2.840.10008.1.2.4.91", "is lossy"),
            ("1.2.840.10008.1.2.4.201", "not accepted"),
            ("1.2.3", "unknown to niix"),
        ] {
            let err = syntax_of(uid).unwrap_err();
            assert!(matches!(err, DecodeError::Mismatch(ref m) if m.contains(needle) && m.contains(uid)), "{err}");
        }
        assert_eq!(syntax_of("1.2.840.10008.1.2.4.90").unwrap(), Syntax::Frame(Codec::J2k));
    }

    #[test]
    fn a_frame_over_the_budget_is_too_large_before_decoding() {
        let limits = DecodeLimits { max_frame_pixels: 1000, ..Default::default() };
        assert!(check_budget(40, 25, Codec::JpegLs, &limits).is_ok());
        let err = check_budget(40, 26, Codec::JpegLs, &limits).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge(ref m) if m.contains("1040 pixels")), "{err}");
    }

    /// Hand-written headers: the walk finds the frame size, refuses a
    /// point transform, NEAR > 0 and a DCT frame, and never reads past the
    /// end of a truncated stream.
    #[test]
    fn jpeg_headers_are_read_and_lossy_streams_refused() {
        let stream = |sof: u8, ss: u8, al: u8| {
            let mut s = vec![0xFF, 0xD8];
            s.extend([0xFF, sof, 0, 11, 16, 0, 3, 0, 4, 1, 1, 0x11, 0]);
            s.extend([0xFF, 0xDA, 0, 8, 1, 1, 0, ss, 0, al]);
            s.extend([0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD9]);
            s
        };
        let h = jpeg_header(Codec::JpegLossless, &stream(0xC3, 1, 0)).unwrap();
        assert_eq!(h, Header { width: 4, height: 3, components: 1, precision: 16, signed: false });
        assert_eq!(jpeg_header(Codec::JpegLs, &stream(0xF7, 0, 0)).unwrap(), h);
        for (codec, s, needle) in [
            (Codec::JpegLossless, stream(0xC3, 1, 2), "point transform of 2 bits"),
            (Codec::JpegLs, stream(0xF7, 3, 0), "NEAR = 3"),
            (Codec::JpegLossless, stream(0xC1, 0, 0), "SOF1 (a DCT process, which is lossy"),
            (Codec::JpegLossless, stream(0xF7, 0, 0), "SOF55"),
        ] {
            let err = jpeg_header(codec, &s).unwrap_err();
            assert!(matches!(err, DecodeError::Mismatch(ref m) if m.contains(needle)), "{err}");
        }
        let s = stream(0xC3, 1, 0);
        for cut in 0..s.len() - 2 {
            assert!(jpeg_header(Codec::JpegLossless, &s[..cut]).is_err(), "{cut}");
        }
    }

    #[test]
    fn j2k_headers_are_read_and_the_irreversible_wavelet_refused() {
        let stream = |transform: u8| {
            let mut s = vec![0xFF, 0x4F, 0xFF, 0x51, 0, 41, 0, 0];
            for v in [7u32, 5, 0, 0, 7, 5, 0, 0] {
                s.extend(v.to_be_bytes());
            }
            s.extend([0, 1, 15, 1, 1]);
            s.extend([0xFF, 0x52, 0, 12, 0, 0, 0, 1, 0, 5, 4, 4, 0, transform]);
            s.extend([0xFF, 0x90, 0, 10, 0, 0, 0, 0, 0, 0, 0, 1, 0xFF, 0x93, 1, 2, 3, 0xFF, 0xD9]);
            s
        };
        let h = j2k_header(&stream(1)).unwrap();
        assert_eq!(h, Header { width: 7, height: 5, components: 1, precision: 16, signed: false });
        let err = j2k_header(&stream(0)).unwrap_err();
        assert!(matches!(err, DecodeError::Mismatch(ref m) if m.contains("irreversible")), "{err}");
        let s = stream(1);
        for cut in 2..s.len() - 10 {
            let _ = j2k_header(&s[..cut]);
        }
    }
}
