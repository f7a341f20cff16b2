//! What every plane decoder shares ([`crate::decode`] for raw, TIFF and
//! PNG, [`crate::dicos`] for DICOS DX objects): the error they return and
//! the check of a file's size against the plane descriptor. It lives apart
//! from both so that `decode` can use `dicos` without `dicos` importing
//! `decode` back.

/// Why a plane could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a valid file of the declared encoding.
    #[error("not a decodable {encoding}: {detail}")]
    Malformed {
        /// "TIFF", "PNG" or "raw u16 plane".
        encoding: &'static str,
        /// What the decoder said.
        detail: String,
    },
    /// The file is valid but does not match what was declared.
    #[error("{0}")]
    Mismatch(String),
    /// The file is valid but would need more memory than allowed.
    #[error("{0}")]
    TooLarge(String),
    /// Reading the bytes failed.
    #[error("reading plane bytes: {0}")]
    Io(#[from] std::io::Error),
    /// The sink refused a row.
    #[error("{0}")]
    Sink(String),
}

/// Limits that protect the decoder from hostile files.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest decoded TIFF strip or band of tiles, or PNG row (with its
    /// ancillary chunks), in bytes.
    pub max_chunk_bytes: usize,
    /// Most pixels in one DICOS frame compressed with a codec that decodes
    /// a frame whole (JPEG Lossless, JPEG-LS, JPEG 2000). Such a frame is
    /// held in memory while it is decoded: its compressed bytes (at most
    /// 4 bytes per pixel are accepted, about 1 in practice), the decoded
    /// 16-bit samples and the codec's working buffers. Measured peaks for a
    /// 2048x4096 frame: JPEG 2000 137 MiB (about 16 bytes a pixel: it works
    /// in 32-bit floats), JPEG Lossless 63 MiB, JPEG-LS 29 MiB. The
    /// default, 16 Mi pixels (e.g. 4096x4096 or 2048x8192), bounds one
    /// JPEG 2000 frame to about 270 MiB. Uncompressed, deflated and RLE
    /// planes are read row by row and are not bound by it.
    pub max_frame_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits { max_chunk_bytes: 64 << 20, max_frame_pixels: 16 << 20 }
    }
}

/// Refuses a file whose size (`found`, width x height, read from its
/// header) is not the `width x height` the plane descriptor declared. Every
/// decoder calls it before it allocates anything for the pixels, so a file
/// cannot make the server allocate for more pixels than the descriptor
/// (checked against the server's limits) allows.
pub fn check_dims(found: (u32, u32), width: u32, height: u32, what: &str) -> Result<(), DecodeError> {
    if found != (width, height) {
        return Err(DecodeError::Mismatch(format!(
            "the {what} is {}x{} pixels but the plane descriptor says {width}x{height}",
            found.0, found.1
        )));
    }
    Ok(())
}

/// Where a decoder hands each row, in order: `(row index, samples)`.
pub type RowSink<'a> = dyn FnMut(u32, &[u16]) -> Result<(), DecodeError> + 'a;
