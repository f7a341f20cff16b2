//! Validation of a pushed [`ScanHeader`] before any byte of it is stored.

use niix_proto::v1::{
    ConveyanceType, IntensityRelationship, Orientation, PlaneDescriptor, PlaneEncoding, PlaneKind, ScanHeader,
};
use prost::Message;
use sha2::{Digest, Sha256};

pub use crate::digest::is_sha256_hex;
use crate::error::{Error, Result};
use crate::iso6346;
use crate::limits::Limits;

/// Parses a scan id and returns it in canonical form (lowercase, hyphenated).
pub fn canonical_scan_id(id: &str) -> Result<String> {
    if id.is_empty() {
        return Err(Error::InvalidField {
            field: "scan_id".into(),
            message: "scan_id is empty: the client chooses a UUID for every scan".into(),
        });
    }
    match uuid::Uuid::try_parse(id) {
        Ok(u) if u.hyphenated().to_string() == id.to_ascii_lowercase() => Ok(u.hyphenated().to_string()),
        _ => Err(Error::InvalidField {
            field: "scan_id".into(),
            message: format!(
                "scan_id {id:?} is not a UUID in hyphenated form, e.g. 0f8e4b1c-2d3a-4e5f-8a9b-0c1d2e3f4a5b"
            ),
        }),
    }
}

/// A container number in the form niix stores and matches: trimmed,
/// upper-cased, and valid ISO 6346 (check digit included).
pub fn container_number(n: &str) -> Result<String> {
    let n = n.trim().to_ascii_uppercase();
    iso6346::validate(&n).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    Ok(n)
}

/// Puts the fields officers search by into the one form niix stores and
/// matches (the same rules apply to `ListScans` filters): site, lane and
/// declaration references trimmed, container numbers trimmed and upper-cased
/// (their ISO 6346 check follows in [`validate`]).
pub fn normalise(header: &mut ScanHeader) {
    if let Some(m) = header.metadata.as_mut() {
        m.site_id = m.site_id.trim().to_string();
        m.lane_id = m.lane_id.trim().to_string();
        for n in &mut m.container_numbers {
            *n = n.trim().to_ascii_uppercase();
        }
        for d in &mut m.declarations {
            d.value = d.value.trim().to_string();
        }
    }
}

/// The decoder for a plane encoding (`None` for UNSPECIFIED or unknown).
pub fn decoder_encoding(encoding: i32) -> Option<niix_inference::decode::Encoding> {
    use niix_inference::decode::Encoding;
    match PlaneEncoding::try_from(encoding).ok()? {
        PlaneEncoding::RawU16le => Some(Encoding::RawU16Le),
        PlaneEncoding::Tiff => Some(Encoding::Tiff),
        PlaneEncoding::Png => Some(Encoding::Png),
        PlaneEncoding::Dicos => Some(Encoding::Dicos),
        PlaneEncoding::Unspecified => None,
    }
}

/// Bytes a raw u16 plane of this size must have.
pub fn raw_plane_bytes(d: &PlaneDescriptor) -> u64 {
    u64::from(d.width) * u64::from(d.height) * 2
}

fn check_enum<T: TryFrom<i32>>(value: i32, what: &str, plane: Option<usize>) -> Result<T> {
    T::try_from(value).map_err(|_| {
        let at = plane.map(|i| format!("plane {i}: ")).unwrap_or_default();
        Error::InvalidArgument(format!("{at}unknown {what} value {value}; see docs/protocol.md for the defined values"))
    })
}

fn check_plane(i: usize, d: &PlaneDescriptor, limits: &Limits) -> Result<()> {
    let bad = |msg: String| Err(Error::InvalidArgument(format!("plane {i}: {msg}")));
    let kind: PlaneKind = check_enum(d.kind, "plane kind", Some(i))?;
    if kind == PlaneKind::Unspecified {
        return bad("kind is not set (HIGH_ENERGY, LOW_ENERGY, SINGLE_ENERGY, ...)".into());
    }
    let encoding: PlaneEncoding = check_enum(d.encoding, "plane encoding", Some(i))?;
    if encoding == PlaneEncoding::Unspecified {
        return bad("encoding is not set (RAW_U16LE, TIFF, PNG or DICOS)".into());
    }
    check_enum::<IntensityRelationship>(d.intensity, "intensity relationship", Some(i))?;
    if d.width == 0 || d.height == 0 {
        return bad(format!("width and height must be positive, got {}x{}", d.width, d.height));
    }
    if d.width > limits.max_dimension || d.height > limits.max_dimension {
        return Err(Error::ResourceExhausted(format!(
            "plane {i}: {}x{} exceeds the server's limit of {} pixels per side",
            d.width, d.height, limits.max_dimension
        )));
    }
    let pixels = u64::from(d.width) * u64::from(d.height);
    if pixels > limits.max_plane_pixels {
        return Err(Error::ResourceExhausted(format!(
            "plane {i}: {pixels} pixels exceeds the server's limit of {} per plane",
            limits.max_plane_pixels
        )));
    }
    if !(1..=16).contains(&d.bits_stored) {
        return bad(format!("bits_stored must be 1..16, got {}", d.bits_stored));
    }
    for (axis, v) in [("x", d.pixel_spacing_x_mm), ("y", d.pixel_spacing_y_mm)] {
        if !v.is_finite() || v < 0.0 {
            return bad(format!("pixel_spacing_{axis}_mm must be a finite non-negative number, got {v}"));
        }
    }
    if d.byte_length == 0 {
        return bad("byte_length is 0: every plane must carry bytes".into());
    }
    if d.byte_length > limits.max_plane_bytes {
        return Err(Error::ResourceExhausted(format!(
            "plane {i}: {} bytes exceeds the server's limit of {} bytes per plane",
            d.byte_length, limits.max_plane_bytes
        )));
    }
    if encoding == PlaneEncoding::RawU16le && d.byte_length != raw_plane_bytes(d) {
        return bad(format!(
            "a raw u16 plane of {}x{} has {} bytes, but byte_length says {}",
            d.width,
            d.height,
            raw_plane_bytes(d),
            d.byte_length
        ));
    }
    if !d.sha256.is_empty() && !is_sha256_hex(&d.sha256) {
        return bad(format!("sha256 {:?} is not 64 lowercase hex digits", d.sha256));
    }
    Ok(())
}

/// Planes of one scan: each kind at most once, and the transmission planes
/// (single, high and low energy, Z-effective) pixel-aligned, so that the
/// dual-energy pair can be combined pixel by pixel.
fn check_plane_set(planes: &[PlaneDescriptor]) -> Result<()> {
    let transmission = |k: i32| k != PlaneKind::Backscatter as i32;
    for (i, d) in planes.iter().enumerate() {
        if let Some(j) = planes[..i].iter().position(|e| e.kind == d.kind) {
            let kind = PlaneKind::try_from(d.kind).map(|k| k.as_str_name()).unwrap_or("?");
            return Err(Error::InvalidArgument(format!(
                "planes {j} and {i} are both {kind}: a scan carries each kind of plane once"
            )));
        }
        if let Some(j) = planes[..i]
            .iter()
            .position(|e| transmission(e.kind) && transmission(d.kind) && (e.width, e.height) != (d.width, d.height))
        {
            return Err(Error::InvalidArgument(format!(
                "plane {i} is {}x{} but plane {j} is {}x{}: the transmission planes of a scan must have the same size",
                d.width, d.height, planes[j].width, planes[j].height
            )));
        }
    }
    Ok(())
}

/// Checks everything that can be checked before the plane bytes arrive.
/// Returns the canonical scan id.
pub fn validate(header: &ScanHeader, limits: &Limits) -> Result<String> {
    let encoded = header.encoded_len();
    if encoded > limits.max_header_bytes {
        return Err(Error::ResourceExhausted(format!(
            "scan header is {encoded} bytes, over the server's limit of {}",
            limits.max_header_bytes
        )));
    }
    let id = canonical_scan_id(&header.scan_id)?;
    let Some(meta) = &header.metadata else {
        return Err(Error::InvalidArgument(
            "header has no metadata: site_id is required (scan_time too, when the scanner knows it)".into(),
        ));
    };
    if meta.site_id.trim().is_empty() {
        return Err(Error::InvalidArgument("metadata.site_id is empty: say which customs site scanned this".into()));
    }
    check_enum::<ConveyanceType>(meta.conveyance, "conveyance type", None)?;
    check_enum::<Orientation>(meta.orientation, "orientation", None)?;
    for n in &meta.container_numbers {
        iso6346::validate(n).map_err(|e| Error::InvalidArgument(format!("metadata.container_numbers: {e}")))?;
    }
    if let Some(t) = &meta.scan_time
        && !(0..1_000_000_000).contains(&t.nanos)
    {
        return Err(Error::InvalidArgument(format!("metadata.scan_time has nanos {} outside 0..1e9", t.nanos)));
    }
    if header.planes.is_empty() {
        return Err(Error::InvalidArgument("header declares no image planes".into()));
    }
    if header.planes.len() > limits.max_planes as usize {
        return Err(Error::ResourceExhausted(format!(
            "header declares {} planes, over the server's limit of {}",
            header.planes.len(),
            limits.max_planes
        )));
    }
    for (i, d) in header.planes.iter().enumerate() {
        check_plane(i, d, limits)?;
    }
    check_plane_set(&header.planes)?;
    let total: u64 = header.planes.iter().map(|d| d.byte_length).sum();
    if total > limits.max_scan_bytes {
        return Err(Error::ResourceExhausted(format!(
            "scan totals {total} bytes, over the server's limit of {} per scan",
            limits.max_scan_bytes
        )));
    }
    Ok(id)
}

/// SHA-256 of the header with the scan id canonicalised and the optional
/// plane digests cleared: two pushes of the same scan agree on it whether or
/// not they declared digests.
pub fn fingerprint(header: &ScanHeader, canonical_id: &str) -> String {
    let mut h = header.clone();
    h.scan_id = canonical_id.to_string();
    for p in &mut h.planes {
        p.sha256.clear();
    }
    hex::encode(Sha256::digest(h.encode_to_vec()))
}

#[cfg(test)]
mod tests {
    use niix_proto::v1::ScanMetadata;

    use super::*;

    pub(crate) fn header() -> ScanHeader {
        ScanHeader {
            scan_id: "0f8e4b1c-2d3a-4e5f-8a9b-0c1d2e3f4a5b".into(),
            metadata: Some(ScanMetadata {
                site_id: "NLRTM-01".into(),
                container_numbers: vec!["CSQU3054383".into()],
                ..Default::default()
            }),
            planes: vec![PlaneDescriptor {
                kind: PlaneKind::HighEnergy as i32,
                width: 4,
                height: 2,
                bits_stored: 16,
                encoding: PlaneEncoding::RawU16le as i32,
                byte_length: 16,
                ..Default::default()
            }],
        }
    }

    fn err_of(h: &ScanHeader) -> Error {
        validate(h, &Limits::default()).unwrap_err()
    }

    #[test]
    fn a_good_header_passes_and_the_id_is_canonical() {
        let mut h = header();
        h.scan_id = h.scan_id.to_uppercase();
        assert_eq!(validate(&h, &Limits::default()).unwrap(), "0f8e4b1c-2d3a-4e5f-8a9b-0c1d2e3f4a5b");
    }

    #[test]
    fn each_defect_is_named() {
        type Case = (fn(&mut ScanHeader), &'static str, tonic::Code);
        let cases: Vec<Case> = vec![
            (|h| h.scan_id = "nope".into(), "not a UUID", tonic::Code::InvalidArgument),
            (|h| h.scan_id = "0f8e4b1c2d3a4e5f8a9b0c1d2e3f4a5b".into(), "hyphenated", tonic::Code::InvalidArgument),
            (|h| h.metadata = None, "no metadata", tonic::Code::InvalidArgument),
            (|h| h.metadata.as_mut().unwrap().site_id.clear(), "site_id", tonic::Code::InvalidArgument),
            (
                |h| h.metadata.as_mut().unwrap().container_numbers = vec!["CSQU3054384".into()],
                "check digit",
                tonic::Code::InvalidArgument,
            ),
            (|h| h.metadata.as_mut().unwrap().conveyance = 42, "unknown conveyance", tonic::Code::InvalidArgument),
            (|h| h.metadata.as_mut().unwrap().orientation = 3, "unknown orientation", tonic::Code::InvalidArgument),
            (|h| h.planes.clear(), "no image planes", tonic::Code::InvalidArgument),
            (|h| h.planes[0].kind = 77, "unknown plane kind", tonic::Code::InvalidArgument),
            (|h| h.planes[0].kind = 0, "kind is not set", tonic::Code::InvalidArgument),
            (|h| h.planes[0].encoding = 0, "encoding is not set", tonic::Code::InvalidArgument),
            (|h| h.planes[0].width = 0, "must be positive", tonic::Code::InvalidArgument),
            (|h| h.planes[0].bits_stored = 17, "bits_stored", tonic::Code::InvalidArgument),
            (|h| h.planes[0].pixel_spacing_x_mm = f64::NAN, "pixel_spacing_x_mm", tonic::Code::InvalidArgument),
            (|h| h.planes[0].byte_length = 15, "byte_length says 15", tonic::Code::InvalidArgument),
            (|h| h.planes[0].byte_length = 0, "byte_length is 0", tonic::Code::InvalidArgument),
            (|h| h.planes[0].sha256 = "XYZ".into(), "64 lowercase hex", tonic::Code::InvalidArgument),
            (|h| h.planes[0].width = 1 << 20, "pixels per side", tonic::Code::ResourceExhausted),
            (|h| h.planes.push(h.planes[0].clone()), "both PLANE_KIND_HIGH_ENERGY", tonic::Code::InvalidArgument),
            (
                |h| {
                    let low = PlaneDescriptor {
                        kind: PlaneKind::LowEnergy as i32,
                        width: 2,
                        byte_length: 8,
                        ..h.planes[0].clone()
                    };
                    h.planes.push(low);
                },
                "must have the same size",
                tonic::Code::InvalidArgument,
            ),
            (|h| h.planes = vec![h.planes[0].clone(); 9], "limit of 8", tonic::Code::ResourceExhausted),
            (
                |h| h.metadata.as_mut().unwrap().remarks = "x".repeat(70_000),
                "scan header is",
                tonic::Code::ResourceExhausted,
            ),
        ];
        for (mutate, needle, code) in cases {
            let mut h = header();
            mutate(&mut h);
            let e = err_of(&h);
            assert_eq!(e.code(), code, "{e}");
            assert!(e.to_string().contains(needle), "{needle:?} not in {e}");
        }
    }

    #[test]
    fn search_fields_are_normalised_and_container_numbers_checked() {
        let mut h = header();
        let m = h.metadata.as_mut().unwrap();
        m.container_numbers = vec![" csqu3054383 ".into()];
        m.site_id = " NLRTM-01 ".into();
        normalise(&mut h);
        let m = h.metadata.as_ref().unwrap();
        assert_eq!((m.container_numbers[0].as_str(), m.site_id.as_str()), ("CSQU3054383", "NLRTM-01"));
        assert!(validate(&h, &Limits::default()).is_ok());
        assert_eq!(container_number("csqu3054383 ").unwrap(), "CSQU3054383");
        assert!(container_number("csqu3054384").unwrap_err().to_string().contains("check digit"));
    }

    #[test]
    fn fingerprint_ignores_declared_digests_and_id_case() {
        let h = header();
        let mut h2 = h.clone();
        h2.planes[0].sha256 = "ab".repeat(32);
        h2.scan_id = h.scan_id.to_uppercase();
        let id = canonical_scan_id(&h.scan_id).unwrap();
        assert_eq!(fingerprint(&h, &id), fingerprint(&h2, &id));
        let mut h3 = h.clone();
        h3.metadata.as_mut().unwrap().lane_id = "L2".into();
        assert_ne!(fingerprint(&h, &id), fingerprint(&h3, &id));
    }
}
