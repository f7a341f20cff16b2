//! Shared harness code for the niix fuzz targets (`fuzz_targets/*.rs`).
//!
//! Each target hands libFuzzer's bytes to one of the functions here; they
//! call the library exactly as the server does and assert what must hold for
//! every input (rows in order, a signed package verifies, ...). A panic, a
//! sanitizer report, a timeout or going over `-rss_limit_mb` is a finding.

use std::io::Cursor;

use ed25519_dalek::SigningKey;
use niix::config::Limits;
use niix::exchange::receive::{check_image, verify_package};
use niix::exchange::{ExchangeConfig, Issuer, keys};
use niix::{header, iso6346};
use niix_inference::decode::{self, DecodeLimits, Encoding, decode_rows};
use niix_inference::dicos;
use niix_proto::v1::{PackageContent, ResultPackage, ScanHeader};
use prost::Message;

/// Decoder limits for the plane targets: 1 MiB per TIFF strip, band of tiles
/// or PNG row, so that a decompression bomb must be refused by these limits
/// long before the fuzzer's 2 GiB RSS limit.
pub const PLANE_LIMITS: DecodeLimits = DecodeLimits { max_chunk_bytes: 1 << 20, max_frame_pixels: 1 << 20 };

/// Samples (rows, for zero-width planes) a plane target accepts before its
/// sink stops the decode, as the server's sink stops at a write error: keeps
/// each run short however large a plane the file legitimately describes.
pub const SAMPLE_BUDGET: u64 = 1 << 22;

/// The administration that issues packages in [`package_verify`].
pub const ISSUER: &str = "NL";
/// The administration that receives them.
pub const RECIPIENT: &str = "BE";

/// Probes a plane file of `encoding`, then decodes it at the size it
/// declares, checking that rows arrive in order, one plane width each, and
/// that a successful decode delivered every row.
pub fn plane(data: &[u8], encoding: Encoding) {
    let Ok(found) = decode::probe(Cursor::new(data), encoding) else { return };
    let width = found.width as usize;
    let mut next = 0u32;
    let mut spent = 0u64;
    let result = decode_rows(Cursor::new(data), encoding, found.width, found.height, &PLANE_LIMITS, |y, row| {
        assert_eq!(y, next, "rows must arrive in order");
        assert_eq!(row.len(), width, "every row must be one plane width");
        next += 1;
        spent += row.len().max(1) as u64;
        if spent > SAMPLE_BUDGET { Err("the fuzz sample budget is spent".into()) } else { Ok(()) }
    });
    if let Ok(info) = result {
        assert_eq!(next, found.height, "a successful decode must deliver every row");
        assert_eq!(info.bits_per_sample, found.bits_per_sample, "probe and decode must agree on the depth");
    }
}

/// Reads a DICOS DX object: its attributes, its whole plane, and its rows
/// through [`plane`].
pub fn dicos_object(data: &[u8]) {
    let probed = dicos::probe(Cursor::new(data));
    if let Ok((info, samples)) = dicos::decode(Cursor::new(data)) {
        assert_eq!(samples.len() as u64, u64::from(info.width) * u64::from(info.height), "one sample per pixel");
        assert_eq!(probed.as_ref().ok(), Some(&info), "probe and decode must read the same attributes");
    }
    plane(data, Encoding::Dicos);
}

/// Parses a `ScanHeader` and validates it with the server's default limits;
/// a valid header's id is canonical and its container numbers pass ISO 6346.
pub fn scan_header(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        container_number(text);
        if let Ok(id) = header::canonical_scan_id(text) {
            assert_eq!(header::canonical_scan_id(&id).ok().as_deref(), Some(id.as_str()), "canonical is a fixpoint");
        }
    }
    let Ok(h) = ScanHeader::decode(data) else { return };
    for n in h.metadata.iter().flat_map(|m| &m.container_numbers) {
        container_number(n);
    }
    for d in &h.planes {
        header::decoder_encoding(d.encoding);
        header::raw_plane_bytes(d);
    }
    if let Ok(id) = header::validate(&h, &Limits::default()) {
        assert_eq!(header::canonical_scan_id(&id).ok().as_deref(), Some(id.as_str()), "the id must be canonical");
        for n in h.metadata.iter().flat_map(|m| &m.container_numbers) {
            assert!(iso6346::validate(n).is_ok(), "a valid header has valid container numbers");
        }
        let fingerprint = header::fingerprint(&h, &id);
        assert!(header::is_sha256_hex(&fingerprint), "the fingerprint is a SHA-256");
    }
}

/// Checks a container number; a valid one has 11 ASCII characters and no
/// other final digit validates.
fn container_number(n: &str) {
    if iso6346::validate(n).is_ok() {
        assert_eq!(n.len(), 11, "ISO 6346 numbers are 11 characters");
        let (first10, last) = n.split_at(10);
        for d in ('0'..='9').filter(|d| !last.starts_with(*d)) {
            assert!(iso6346::validate(&format!("{first10}{d}")).is_err(), "one check digit per number");
        }
    }
}

/// The issuer's signing key: fixed, so that findings reproduce.
pub fn issuer_key() -> SigningKey {
    SigningKey::from_bytes(&[0x42; 32])
}

/// The receiving side's configuration: it accepts packages from [`ISSUER`]
/// signed by [`issuer_key`].
pub fn receiver_config(key: &SigningKey) -> ExchangeConfig {
    ExchangeConfig {
        administration: RECIPIENT.into(),
        issuers: vec![Issuer { administration: ISSUER.into(), public_key: keys::public_hex(key) }],
        ..Default::default()
    }
}

/// Verifies packages as `niix verify`, `niix partner pull` and
/// `Exchange.Receive` do. The first byte chooses what the rest is:
///
/// * 0: an encoded `ResultPackage`, verified as received (almost always a bad
///   signature: this covers parsing of keys, signatures and packages);
/// * 1: the content of a package, which is signed with the issuer's key and
///   must then verify, and go through `Receive`'s checks and image checks;
/// * 2: content signed and then altered in one byte, which must not verify.
pub fn package_verify(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let key = issuer_key();
    let public = keys::public_hex(&key);
    let config = receiver_config(&key);
    match mode % 3 {
        0 => {
            let Ok(package) = ResultPackage::decode(rest) else { return };
            if let Ok(content) = keys::verify(&package, &public) {
                receive(&config, &package, &content);
            }
            let _ = verify_package(&config, ISSUER, &package);
        }
        1 => {
            let signed = sign_raw(&key, rest.to_vec());
            match PackageContent::decode(rest) {
                Ok(decoded) => {
                    let content = keys::verify(&signed, &public).expect("a package signed by the issuer verifies");
                    // Compared encoded: a NaN in the content is not equal to itself.
                    assert_eq!(content.encode_to_vec(), decoded.encode_to_vec(), "verify returns the signed content");
                    receive(&config, &signed, &content);
                }
                Err(_) => assert!(keys::verify(&signed, &public).is_err(), "content that does not parse is refused"),
            }
        }
        _ => {
            let Some((&at, content)) = rest.split_first() else { return };
            if content.is_empty() {
                return;
            }
            let mut signed = sign_raw(&key, content.to_vec());
            let i = usize::from(at) % content.len();
            signed.content[i] ^= 1 << (at % 8);
            assert!(keys::verify(&signed, &public).is_err(), "an altered package must not verify");
            assert!(verify_package(&config, ISSUER, &signed).is_err(), "Receive must refuse an altered package");
        }
    }
}

/// Signs raw content bytes as [`keys::sign`] signs encoded content.
fn sign_raw(key: &SigningKey, content: Vec<u8>) -> ResultPackage {
    use ed25519_dalek::Signer;
    let signature = key.sign(&content).to_bytes().to_vec();
    ResultPackage { content, signature, signer_public_key: keys::public_hex(key) }
}

/// What `Exchange.Receive` checks of a verified package before storing it.
fn receive(config: &ExchangeConfig, package: &ResultPackage, content: &PackageContent) {
    if verify_package(config, ISSUER, package).is_ok() {
        assert_eq!(content.recipient, RECIPIENT, "Receive accepts only packages addressed to it");
    }
    assert!(verify_package(config, "XX", package).is_err(), "only the issuer may deliver its packages");
    for (im, d) in content.plane_images.iter().zip(&content.planes) {
        let _ = check_image(im, d.width, d.height);
    }
}

/// Every committed seed through its target's body, on the stable toolchain:
/// `make test` runs these (`make fuzz-check`) so that the harness keeps
/// compiling against the library and its assertions hold on the seeds.
#[cfg(test)]
mod seeds {
    use std::path::Path;

    /// Runs `body` on each file of `corpus/<target>`; there must be seeds.
    fn each_seed(target: &str, body: impl Fn(&[u8])) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            body(&std::fs::read(&path).unwrap());
            seen += 1;
        }
        assert!(seen > 0, "{} holds no seeds", dir.display());
    }

    #[test]
    fn tiff_plane() {
        each_seed("tiff_plane", |d| super::plane(d, super::Encoding::Tiff));
    }

    #[test]
    fn png_plane() {
        each_seed("png_plane", |d| super::plane(d, super::Encoding::Png));
    }

    #[test]
    fn dicos() {
        each_seed("dicos", super::dicos_object);
    }

    #[test]
    fn scan_header() {
        each_seed("scan_header", super::scan_header);
    }

    #[test]
    fn package_verify() {
        each_seed("package_verify", |d| {
            // Each seed in each of the three modes.
            for mode in 0..3u8 {
                let mut input = vec![mode];
                input.extend_from_slice(d.get(1..).unwrap_or_default());
                super::package_verify(&input);
            }
        });
    }
}
