//! Shared inputs of the niix benchmarks.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use niix_inference::decode::Encoding;
use niix_inference::pipeline::PlaneInput;

/// The repository's fixtures/ directory.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Width and height of the reference scan (a 20-foot container at ~3 mm).
pub const SCAN: (u32, u32) = (2048, 6144);

/// 16-bit samples of a textured cargo scene with a few dense blocks.
/// `low` gives the low-energy plane (more attenuation).
pub fn cargo_plane(w: u32, h: u32, low: bool) -> Vec<u16> {
    (0..w * h)
        .map(|i| {
            let (x, y) = (i % w, i / w);
            let wall = 2000 * u32::from((x / 7) % 2 == 0);
            let block = u32::from((x / 300 + y / 500) % 7 == 0) * 18000;
            let v = 40000u32.saturating_sub(wall + block) + (i.wrapping_mul(2654435761) >> 22);
            (if low { v * 3 / 5 } else { v }).min(65535) as u16
        })
        .collect()
}

/// The plane as an uncompressed 16-bit TIFF (64 rows per strip).
pub fn tiff_bytes(w: u32, h: u32, px: &[u16]) -> Vec<u8> {
    let mut buf = Cursor::new(Vec::new());
    let mut enc = tiff::encoder::TiffEncoder::new(&mut buf).expect("in-memory TIFF");
    let mut img = enc.new_image::<tiff::encoder::colortype::Gray16>(w, h).expect("in-memory TIFF");
    img.rows_per_strip(64).expect("in-memory TIFF");
    img.write_data(px).expect("in-memory TIFF");
    buf.into_inner()
}

/// A dual-energy scan as pipeline input, from TIFF bytes.
pub fn dual_energy(high: &[u8], low: &[u8]) -> Vec<PlaneInput> {
    let (w, h) = SCAN;
    [("high_energy", high), ("low_energy", low)]
        .into_iter()
        .map(|(kind, bytes)| PlaneInput {
            kind: kind.into(),
            encoding: Encoding::Tiff,
            width: w,
            height: h,
            reader: Box::new(Cursor::new(bytes.to_vec())),
        })
        .collect()
}
