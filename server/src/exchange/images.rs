//! Downsampled planes for agreements that share image content but not the
//! full planes: each plane averaged over `factor` x `factor` blocks and
//! written as a 16-bit grayscale PNG.

use ndarray::Array2;
use niix_inference::decode::{DecodeError, DecodeLimits, decode_rows};
use niix_inference::pipeline::PlaneInput;
use niix_proto::v1::PlaneImage;

use crate::error::{Error, Result};
use crate::plane::stored_plane;
use crate::store::{BlobStore, ScanRecord};

/// The smallest integer factor that brings `width` down to at most `max_width`.
pub fn factor_for(width: u32, max_width: u32) -> u32 {
    width.div_ceil(max_width.max(1)).max(1)
}

/// Averages `plane` over `factor` x `factor` blocks (edge blocks average
/// the pixels they have).
pub fn downsample(plane: &Array2<u16>, factor: u32) -> Array2<u16> {
    let f = factor.max(1) as usize;
    let (h, w) = plane.dim();
    let (oh, ow) = (h.div_ceil(f), w.div_ceil(f));
    let mut sums = vec![0u64; ow];
    let mut counts = vec![0u64; ow];
    let mut out = Array2::<u16>::zeros((oh, ow));
    for oy in 0..oh {
        sums.iter_mut().for_each(|s| *s = 0);
        counts.iter_mut().for_each(|c| *c = 0);
        for row in plane.rows().into_iter().skip(oy * f).take(f) {
            for (x, &v) in row.iter().enumerate() {
                sums[x / f] += u64::from(v);
                counts[x / f] += 1;
            }
        }
        for (ox, px) in out.row_mut(oy).iter_mut().enumerate() {
            *px = ((sums[ox] + counts[ox] / 2) / counts[ox].max(1)) as u16;
        }
    }
    out
}

/// Encodes a 16-bit grayscale PNG.
pub fn encode_png16(plane: &Array2<u16>) -> Result<Vec<u8>> {
    let (h, w) = plane.dim();
    let mut bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut bytes, w as u32, h as u32);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Sixteen);
    enc.set_compression(png::Compression::Fast);
    let fail = |e: png::EncodingError| Error::Internal(format!("downsampled plane PNG: {e}"));
    let mut writer = enc.write_header().map_err(fail)?;
    let be: Vec<u8> = plane.iter().flat_map(|v| v.to_be_bytes()).collect();
    writer.write_image_data(&be).map_err(fail)?;
    writer.finish().map_err(fail)?;
    Ok(bytes)
}

/// Every plane of a stored scan, downsampled to at most `max_width` pixels
/// wide. Planes are decoded row by row: memory holds one band of `factor`
/// rows' sums and the small result, not the plane.
pub fn plane_images(blobs: &dyn BlobStore, record: &ScanRecord, max_width: u32) -> Result<Vec<PlaneImage>> {
    (0..record.planes.len())
        .map(|i| {
            let input = stored_plane(record, i, blobs)?;
            // Always a reduction: a partner that may see more gets `full_planes`.
            let factor = factor_for(input.width, max_width).max(2);
            let small =
                downsample_rows(input, factor).map_err(|e| Error::Internal(format!("decoding plane {i}: {e}")))?;
            Ok(PlaneImage {
                plane_index: i as u32,
                factor,
                width: small.ncols() as u32,
                height: small.nrows() as u32,
                png: encode_png16(&small)?,
            })
        })
        .collect()
}

/// [`downsample`] of a plane decoded row by row.
pub fn downsample_rows(input: PlaneInput, factor: u32) -> std::result::Result<Array2<u16>, DecodeError> {
    let f = factor.max(1) as usize;
    let (w, h) = (input.width as usize, input.height as usize);
    let (oh, ow) = (h.div_ceil(f), w.div_ceil(f));
    let mut out = Array2::<u16>::zeros((oh, ow));
    let mut sums = vec![0u64; ow];
    let mut counts = vec![0u64; ow];
    decode_rows(input.reader, input.encoding, input.width, input.height, &DecodeLimits::default(), |y, row| {
        for (x, &v) in row.iter().enumerate() {
            sums[x / f] += u64::from(v);
            counts[x / f] += 1;
        }
        let y = y as usize;
        if (y + 1).is_multiple_of(f) || y + 1 == h {
            for (ox, px) in out.row_mut(y / f).iter_mut().enumerate() {
                *px = ((sums[ox] + counts[ox] / 2) / counts[ox].max(1)) as u16;
            }
            sums.iter_mut().for_each(|s| *s = 0);
            counts.iter_mut().for_each(|c| *c = 0);
        }
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_averaged_and_edges_keep_their_pixels() {
        let plane = Array2::from_shape_fn((3, 5), |(y, x)| (y * 10 + x) as u16);
        let small = downsample(&plane, 2);
        assert_eq!(small.dim(), (2, 3));
        // (0+1+10+11)/4 = 5.5 -> 6; right edge (4+14)/2 = 9; bottom-right corner 24 alone.
        assert_eq!(small[[0, 0]], 6);
        assert_eq!(small[[0, 2]], 9);
        assert_eq!(small[[1, 2]], 24);
        assert_eq!(factor_for(2048, 512), 4);
        assert_eq!(factor_for(2049, 512), 5);
        assert_eq!(factor_for(300, 512), 1);
    }

    #[test]
    fn downsampling_row_by_row_gives_the_same_blocks() {
        let plane = Array2::from_shape_fn((7, 9), |(y, x)| (y * 1000 + x * 37) as u16);
        let raw: Vec<u8> = plane.iter().flat_map(|v| v.to_le_bytes()).collect();
        for factor in [2, 3, 4] {
            let input = PlaneInput {
                kind: "high_energy".into(),
                encoding: niix_inference::decode::Encoding::RawU16Le,
                width: 9,
                height: 7,
                reader: Box::new(std::io::Cursor::new(raw.clone())),
            };
            assert_eq!(downsample_rows(input, factor).unwrap(), downsample(&plane, factor), "factor {factor}");
        }
    }

    #[test]
    fn the_png_keeps_all_sixteen_bits() {
        let plane = Array2::from_shape_fn((4, 6), |(y, x)| (y * 6 + x) as u16 * 2731);
        let png = encode_png16(&plane).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height, info.bit_depth), (6, 4, png::BitDepth::Sixteen));
        let back: Vec<u16> = buf.chunks(2).map(|b| u16::from_be_bytes([b[0], b[1]])).collect();
        assert_eq!(back, plane.iter().copied().collect::<Vec<_>>());
    }
}
