//! A plane of a stored scan as the services read it back: opened for the
//! decoders of the tensor core ([`stored_plane`]), its kind as model
//! manifests name it, and the 8-bit PNG form its anomaly map is stored in.
//! It sits between the store and the services (analysis, findings,
//! exchange), which all read planes and none of which owns them.

use ndarray::Array2;
use niix_inference::pipeline::PlaneInput;
use niix_proto::v1::PlaneKind;

use crate::error::{Error, Result};
use crate::store::{BlobStore, ScanRecord};

/// Lowercase plane kind name as model manifests use it, e.g. `high_energy`.
pub fn plane_kind_name(kind: i32) -> String {
    let name = PlaneKind::try_from(kind).map(|k| k.as_str_name()).unwrap_or("PLANE_KIND_UNSPECIFIED");
    name.strip_prefix("PLANE_KIND_").unwrap_or(name).to_ascii_lowercase()
}

/// Opens one stored plane of a scan for the tensor core.
pub fn stored_plane(record: &ScanRecord, index: usize, blobs: &dyn BlobStore) -> Result<PlaneInput> {
    let (Some(d), Some(stored)) = (record.header.planes.get(index), record.planes.get(index)) else {
        return Err(Error::InvalidArgument(format!(
            "plane {index} does not exist; the scan has {}",
            record.planes.len()
        )));
    };
    let (encoding, width, height) = match stored.downsampled {
        // A partner's downsampled share: a PNG of the plane averaged over f x f.
        f if f > 1 => (niix_inference::decode::Encoding::Png, d.width.div_ceil(f), d.height.div_ceil(f)),
        _ => {
            let encoding = crate::header::decoder_encoding(d.encoding)
                .ok_or_else(|| Error::Internal(format!("stored plane with encoding {}", d.encoding)))?;
            (encoding, d.width, d.height)
        }
    };
    Ok(PlaneInput {
        kind: plane_kind_name(d.kind),
        encoding,
        width,
        height,
        reader: Box::new(blobs.open(&stored.sha256)?),
    })
}

/// The stored anomaly map: score 0..1 as 8-bit grey.
pub fn encode_map_png(map: &Array2<f32>) -> Vec<u8> {
    let (h, w) = map.dim();
    let bytes: Vec<u8> = map.iter().map(|s| (s.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().expect("writing PNG to memory");
    writer.write_image_data(&bytes).expect("writing PNG to memory");
    writer.finish().expect("writing PNG to memory");
    out
}

/// Reads a stored anomaly map back (values 0..255).
pub fn decode_map_png(bytes: &[u8]) -> Result<Array2<u8>> {
    let bad = |e: png::DecodingError| Error::Internal(format!("stored anomaly map: {e}"));
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().map_err(bad)?;
    let mut buf = vec![0u8; reader.output_buffer_size().unwrap_or(0)];
    let info = reader.next_frame(&mut buf).map_err(bad)?;
    buf.truncate(info.buffer_size());
    Array2::from_shape_vec((info.height as usize, info.width as usize), buf)
        .map_err(|e| Error::Internal(format!("stored anomaly map: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plane_kinds_use_manifest_names() {
        assert_eq!(plane_kind_name(PlaneKind::HighEnergy as i32), "high_energy");
        assert_eq!(plane_kind_name(PlaneKind::SingleEnergy as i32), "single_energy");
        assert_eq!(plane_kind_name(99), "unspecified");
    }

    #[test]
    fn maps_round_trip_through_png() {
        let m = Array2::from_shape_fn((3, 4), |(y, x)| (y * 4 + x) as f32 / 11.0);
        let back = decode_map_png(&encode_map_png(&m)).unwrap();
        assert_eq!(back.dim(), (3, 4));
        assert_eq!(back[[2, 3]], 255);
        assert_eq!(back[[0, 0]], 0);
    }
}
