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
