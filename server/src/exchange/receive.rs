//! `Exchange.Receive`: packages pushed by a partner administration's niix.
//!
//! The caller must be an issuer configured in `[[exchange.issuers]]`; any
//! other identity is refused before a byte of its stream is read, and each
//! issuer has at most `max_receives_per_issuer` deliveries open at once.
//! A package is accepted only from the administration that issued it (the
//! caller's identity), signed with the public key configured for it, and
//! addressed to this administration. Its scan header passes the same checks
//! and limits as a pushed scan ([`crate::header::validate`]), and full planes
//! the same decoding checks. It is stored, with its reports and any image
//! content, as a foreign scan whose origin is the issuer and whose id is
//! namespaced by the issuer ([`foreign_scan_id`]), in one transaction; a
//! package id seen before changes nothing, so the sender may retry freely.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use niix_proto::v1::receive_request::Part;
use niix_proto::v1::{
    PackageContent, PlaneImage, ReceiveReceipt, ReceiveRequest, ResultPackage, ScanHeader, ScanStatus,
};
use prost::Message;
use sha2::{Digest, Sha256};
use tonic::Streaming;

use super::{ExchangeConfig, keys, package_id};
use crate::audit::Caller;
use crate::error::{Error, Result, blocking};
use crate::events::EventSignal;
use crate::header::{canonical_scan_id, fingerprint, is_sha256_hex};
use crate::ingest::planes::{PlaneSink, check_plane_bytes};
use crate::limits::Limits;
use crate::store::{BlobStore, MetadataStore, PlaneDigest, ReceiveOutcome, ReceivedPackage, ScanRecord};

/// Most pixels of an image a package carries (a downsampled plane or the
/// overlay): 16 Mi pixels, at most 48 MiB decoded.
pub const MAX_RECEIVED_IMAGE_PIXELS: u64 = 1 << 24;

/// The id under which a scan `scan_id` of `issuer` is kept here: a UUID
/// derived from both, so two issuers can never write the same record and an
/// issuer cannot choose the id of a scan of this administration's. The
/// issuer's own id stays in its stored package.
pub fn foreign_scan_id(issuer: &str, scan_id: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"niix foreign scan\0")
        .chain_update(issuer.as_bytes())
        .chain_update(b"\0")
        .chain_update(scan_id.to_ascii_lowercase().as_bytes())
        .finalize();
    let bytes: [u8; 16] = digest[..16].try_into().expect("a SHA-256 has 32 bytes");
    uuid::Builder::from_custom_bytes(bytes).into_uuid().hyphenated().to_string()
}

/// Deliveries in progress per issuer.
#[derive(Clone, Default)]
pub struct ReceiveSlots(Arc<Mutex<HashMap<String, usize>>>);

/// One delivery in progress; frees its slot when dropped.
pub struct ReceiveSlot {
    slots: ReceiveSlots,
    identity: String,
}

impl ReceiveSlots {
    /// Takes a slot for `identity` if it has fewer than `max` open.
    pub fn try_take(&self, identity: &str, max: usize) -> Option<ReceiveSlot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(identity.to_string()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ReceiveSlot { slots: self.clone(), identity: identity.to_string() })
    }

    /// Deliveries `identity` has open now.
    pub fn open(&self, identity: &str) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(identity).copied().unwrap_or(0)
    }
}

impl Drop for ReceiveSlot {
    fn drop(&mut self) {
        let mut open = self.slots.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.identity) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.identity);
            }
        }
    }
}

/// Where partners' pushed packages come in: checks who sends, verifies
/// each package's signature and content against this server's limits, and
/// stores its scan and reports as received.
#[derive(Clone)]
pub struct Inbox {
    meta: Arc<dyn MetadataStore>,
    blobs: Arc<dyn BlobStore>,
    config: Arc<ExchangeConfig>,
    /// Ingest limits, applied to received scans too.
    limits: Arc<Limits>,
    events: EventSignal,
    receive_slots: ReceiveSlots,
}

impl Inbox {
    /// An inbox over the store, under `config`'s issuers and sizes.
    pub fn new(
        meta: Arc<dyn MetadataStore>,
        blobs: Arc<dyn BlobStore>,
        config: Arc<ExchangeConfig>,
        limits: Arc<Limits>,
        events: EventSignal,
    ) -> Self {
        Inbox { meta, blobs, config, limits, events, receive_slots: ReceiveSlots::default() }
    }

    fn config(&self) -> &ExchangeConfig {
        &self.config
    }

    /// Handles one `Receive` call; returns the result and the object to
    /// audit (the package id, once known).
    pub async fn receive(
        &self,
        caller: &Caller,
        stream: Streaming<ReceiveRequest>,
    ) -> (Result<ReceiveReceipt>, String) {
        receive(self, caller, stream).await
    }
}

/// Handles one `Receive` call; returns the result and the object to audit
/// (the package id, once known).
async fn receive(
    svc: &Inbox,
    caller: &Caller,
    mut stream: Streaming<ReceiveRequest>,
) -> (Result<ReceiveReceipt>, String) {
    // Who may send at all is decided before any byte of the stream is read.
    let config = svc.config();
    if !config.issuers.iter().any(|i| i.administration == caller.identity) {
        return (
            Err(Error::PermissionDenied(format!(
                "{} is not an issuer whose packages are accepted here: add it to [[exchange.issuers]] with its public key",
                caller.identity
            ))),
            String::new(),
        );
    }
    let Some(_slot) = svc.receive_slots.try_take(&caller.identity, config.max_receives_per_issuer) else {
        return (
            Err(Error::ResourceExhausted(format!(
                "{} already has {} deliveries in progress (exchange.max_receives_per_issuer); retry when one ends",
                caller.identity, config.max_receives_per_issuer
            ))),
            String::new(),
        );
    };
    let package = match stream.message().await {
        Ok(Some(ReceiveRequest { part: Some(Part::Package(p)) })) => p,
        Ok(_) => return (Err(Error::InvalidArgument("the first message must be the package".into())), String::new()),
        Err(s) if matches!(s.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted) => {
            return (
                Err(Error::ResourceExhausted(format!(
                    "receiving the package: {}; this server accepts Receive messages of at most {} bytes \
                     (exchange.max_receive_message_bytes)",
                    s.message(),
                    config.max_receive_message_bytes
                ))),
                String::new(),
            );
        }
        Err(s) => return (Err(Error::broken_stream(s, "receiving the package")), String::new()),
    };
    let content = match verify_package(config, &caller.identity, &package).and_then(|c| {
        check_content(&c, &svc.limits)?;
        Ok(c)
    }) {
        Ok(c) => c,
        Err(e) => return (Err(e), String::new()),
    };
    let id = content.package_id.clone();
    (store(svc, package, content, stream).await, id)
}

/// Checks a verified package's scan as a pushed scan is checked: its header
/// (the scan id, metadata, every plane descriptor) with the ingest rules and
/// this server's `limits`, and its images' sizes.
pub fn check_content(content: &PackageContent, limits: &Limits) -> Result<()> {
    let header = ScanHeader {
        scan_id: content.scan_id.clone(),
        metadata: content.metadata.clone(),
        planes: content.planes.clone(),
    };
    crate::header::validate(&header, limits)
        .map_err(|e| with_message(e, |m| format!("package {}: {m}", content.package_id)))?;
    if !content.overlay_png.is_empty() {
        let info = png::Decoder::new(std::io::Cursor::new(&content.overlay_png))
            .read_info()
            .map_err(|e| Error::InvalidArgument(format!("the overlay is not a PNG: {e}")))?;
        let (w, h) = (info.info().width, info.info().height);
        if u64::from(w) * u64::from(h) > MAX_RECEIVED_IMAGE_PIXELS {
            return Err(Error::ResourceExhausted(format!(
                "the overlay is {w}x{h} pixels, over this server's limit of {MAX_RECEIVED_IMAGE_PIXELS} for received images"
            )));
        }
    }
    Ok(())
}

/// The same error with its message rewritten.
fn with_message(e: Error, f: impl FnOnce(&str) -> String) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(f(&m)),
        Error::ResourceExhausted(m) => Error::ResourceExhausted(f(&m)),
        other => other,
    }
}

/// Checks who sent a pushed package (`caller_identity`, the authenticated
/// caller), who signed it (an issuer in `config.issuers`, with its public
/// key) and whom it is for (`config.administration`); returns its verified
/// content. Needs no server or store: `Exchange.Receive` calls it on the
/// first message of the stream, before anything is stored.
pub fn verify_package(
    config: &ExchangeConfig,
    caller_identity: &str,
    package: &ResultPackage,
) -> Result<PackageContent> {
    let claimed = PackageContent::decode(package.content.as_slice())
        .map_err(|e| Error::InvalidArgument(format!("not a niix result package: {e}")))?;
    let issuer = config.issuers.iter().find(|i| i.administration == claimed.issuer).ok_or_else(|| {
        Error::PermissionDenied(format!(
            "packages issued by {:?} are not accepted here: add it to [[exchange.issuers]] with its public key",
            claimed.issuer
        ))
    })?;
    if caller_identity != issuer.administration {
        return Err(Error::PermissionDenied(format!(
            "{caller_identity} may not deliver packages issued by {}",
            issuer.administration
        )));
    }
    let content = keys::verify(package, &issuer.public_key).map_err(|e| match e {
        keys::VerifyError::BadSignature => Error::DataLoss(format!("package from {}: {e}", issuer.administration)),
        other => Error::PermissionDenied(format!("package from {}: {other}", issuer.administration)),
    })?;
    if content.recipient != config.administration {
        return Err(Error::FailedPrecondition(format!(
            "package {} is addressed to {:?}; this is {:?}",
            content.package_id, content.recipient, config.administration
        )));
    }
    if content.package_id != package_id(&content.issuer, &content.recipient, content.sequence) {
        return Err(Error::InvalidArgument(format!(
            "package id {:?} does not match its issuer, recipient and sequence",
            content.package_id
        )));
    }
    canonical_scan_id(&content.scan_id)?;
    if let Some(bad) = content.planes.iter().position(|p| !is_sha256_hex(&p.sha256)) {
        return Err(Error::InvalidArgument(format!("plane {bad} has no SHA-256 of the original")));
    }
    Ok(content)
}

async fn store(
    svc: &Inbox,
    package: ResultPackage,
    content: PackageContent,
    mut stream: Streaming<ReceiveRequest>,
) -> Result<ReceiveReceipt> {
    // The issuer is the authenticated caller (checked in `verify_package`):
    // it is the origin, and it namespaces the scan id.
    let scan_id = foreign_scan_id(&content.issuer, &canonical_scan_id(&content.scan_id)?);
    let (pid, sid) = (content.package_id.clone(), scan_id.clone());
    let receipt = move |duplicate| ReceiveReceipt { package_id: pid.clone(), duplicate, scan_id: sid.clone() };
    let (meta, blobs) = (svc.meta.clone(), svc.blobs.clone());
    // A retry of a package stored before: answer before any plane is read.
    let (m, sid, id) = (meta.clone(), scan_id.clone(), content.package_id.clone());
    if blocking(move || Ok(m.received_packages(&sid)?.iter().any(|p| p.package_id == id))).await? {
        return Ok(receipt(true));
    }
    let planes = if content.full_planes {
        receive_planes(blobs.clone(), &content, &mut stream).await?
    } else {
        store_images(blobs.clone(), &content).await?
    };
    let header = ScanHeader { scan_id: scan_id.clone(), metadata: content.metadata.clone(), planes: content.planes };
    let record = ScanRecord {
        scan_id: scan_id.clone(),
        header_sha256: fingerprint(&header, &scan_id),
        header,
        planes,
        status: ScanStatus::Analyzed,
        received_at: SystemTime::now(),
        decision: 0,
        score: None,
        origin: content.issuer.clone(),
    };
    let reports = content.reports;
    let received = ReceivedPackage {
        package_id: content.package_id.clone(),
        issuer: content.issuer.clone(),
        sequence: content.sequence,
        scan_id: scan_id.clone(),
        package_sha256: String::new(),
    };
    let events = svc.events.clone();
    blocking(move || {
        let package_sha256 = blobs.put_blob(&package.encode_to_vec())?;
        let received = ReceivedPackage { package_sha256, ..received };
        match meta.receive_package(&received, &record, &reports)? {
            ReceiveOutcome::Stored => {
                events.send_replace(meta.last_event()?);
                Ok(receipt(false))
            }
            ReceiveOutcome::Duplicate => Ok(receipt(true)),
            ReceiveOutcome::Conflict(why) => Err(Error::AlreadyExists(why)),
        }
    })
    .await
}

/// Reads the planes' chunks that follow the package, in order, and keeps
/// each plane only if it matches the signed length and SHA-256.
async fn receive_planes(
    blobs: Arc<dyn crate::store::BlobStore>,
    content: &PackageContent,
    stream: &mut Streaming<ReceiveRequest>,
) -> Result<Vec<PlaneDigest>> {
    let staging = uuid::Uuid::new_v4().hyphenated().to_string();
    let result = stage_planes(blobs.clone(), &staging, content, stream).await;
    if result.is_err() {
        let (b, s) = (blobs.clone(), staging.clone());
        let _ = blocking(move || Ok(b.discard_staged(&s)?)).await;
        return result;
    }
    let digests = result?;
    let (b, d) = (blobs, digests.clone());
    blocking(move || {
        for (i, p) in d.iter().enumerate() {
            b.promote(&staging, i as u32, &p.sha256)?;
        }
        Ok(b.discard_staged(&staging)?)
    })
    .await?;
    Ok(digests)
}

async fn stage_planes(
    blobs: Arc<dyn crate::store::BlobStore>,
    staging: &str,
    content: &PackageContent,
    stream: &mut Streaming<ReceiveRequest>,
) -> Result<Vec<PlaneDigest>> {
    let mut digests = Vec::new();
    for (i, d) in content.planes.iter().enumerate() {
        let sink = PlaneSink::staged(blobs.clone(), staging, i as u32, false);
        let mut have = 0u64;
        while have < d.byte_length {
            let chunk = match stream.message().await {
                Ok(Some(ReceiveRequest { part: Some(Part::Chunk(c)) })) => c,
                Ok(Some(_)) => return Err(Error::InvalidArgument("only plane chunks may follow the package".into())),
                Ok(None) => {
                    return Err(Error::DataLoss(format!(
                        "the stream ended in plane {i} after {have} of {} bytes",
                        d.byte_length
                    )));
                }
                Err(s) => return Err(Error::broken_stream(s, &format!("receiving plane {i}"))),
            };
            if chunk.plane_index as usize != i || chunk.offset != have {
                return Err(Error::InvalidArgument(format!(
                    "expected plane {i} at offset {have}, got plane {} at offset {}",
                    chunk.plane_index, chunk.offset
                )));
            }
            have += chunk.data.len() as u64;
            if have > d.byte_length {
                return Err(Error::InvalidArgument(format!(
                    "plane {i} is longer than its signed {} bytes",
                    d.byte_length
                )));
            }
            sink.send(chunk.data).await?;
        }
        let sha256 = sink.finish().await?;
        if sha256 != d.sha256 {
            return Err(Error::DataLoss(format!("plane {i}: SHA-256 {sha256} is not the signed {}", d.sha256)));
        }
        // The bytes must be the image the descriptor says, as for a pushed scan.
        let (b, s, d) = (blobs.clone(), staging.to_string(), d.clone());
        blocking(move || check_plane_bytes(b.as_ref(), &s, i as u32, &d)).await?;
        digests.push(PlaneDigest::full(sha256, have));
    }
    Ok(digests)
}

/// Keeps the downsampled planes of a package, when it has one per plane.
async fn store_images(blobs: Arc<dyn crate::store::BlobStore>, content: &PackageContent) -> Result<Vec<PlaneDigest>> {
    let images = content.plane_images.clone();
    let planes = content.planes.clone();
    if images.is_empty() {
        return Ok(Vec::new());
    }
    if images.len() != planes.len() || images.iter().enumerate().any(|(i, im)| im.plane_index as usize != i) {
        return Err(Error::InvalidArgument("plane_images must hold one image per plane, in order".into()));
    }
    blocking(move || {
        images
            .iter()
            .zip(&planes)
            .map(|(im, d)| {
                check_image(im, d.width, d.height)?;
                let sha256 = blobs.put_blob(&im.png)?;
                Ok(PlaneDigest { sha256, byte_length: im.png.len() as u64, downsampled: im.factor })
            })
            .collect()
    })
    .await
}

/// Checks a received downsampled plane: it must be a 16-bit PNG of the
/// plane's size (`width` x `height`) divided by its factor, rounded up.
pub fn check_image(im: &PlaneImage, width: u32, height: u32) -> Result<()> {
    let bad = |why: String| Error::InvalidArgument(format!("plane image {}: {why}", im.plane_index));
    if im.factor < 2 {
        return Err(bad(format!("factor {} is not a reduction; send full planes instead", im.factor)));
    }
    let expected = (width.div_ceil(im.factor), height.div_ceil(im.factor));
    if u64::from(expected.0) * u64::from(expected.1) > MAX_RECEIVED_IMAGE_PIXELS {
        return Err(Error::ResourceExhausted(format!(
            "plane image {}: {}x{} pixels, over this server's limit of {MAX_RECEIVED_IMAGE_PIXELS} for received images",
            im.plane_index, expected.0, expected.1
        )));
    }
    let info =
        png::Decoder::new(std::io::Cursor::new(&im.png)).read_info().map_err(|e| bad(format!("not a PNG: {e}")))?;
    let got = (info.info().width, info.info().height);
    if got != expected || info.info().bit_depth != png::BitDepth::Sixteen {
        return Err(bad(format!(
            "{}x{} {:?}-bit, expected {}x{} 16-bit",
            got.0,
            got.1,
            info.info().bit_depth,
            expected.0,
            expected.1
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_ids_are_uuids_of_their_issuer_and_scan() {
        let scan = "0f8e4b1c-2d3a-4e5f-8a9b-0c1d2e3f4a5b";
        let nl = foreign_scan_id("NL", scan);
        assert_eq!(canonical_scan_id(&nl).unwrap(), nl, "a canonical UUID");
        assert_eq!(foreign_scan_id("NL", &scan.to_uppercase()), nl, "the same scan whatever its case");
        assert_ne!(foreign_scan_id("BE", scan), nl, "another issuer, another record");
        assert_ne!(foreign_scan_id("NL", "0f8e4b1c-2d3a-4e5f-8a9b-0c1d2e3f4a5c"), nl);
        assert_ne!(nl, scan, "never the issuer's own id");
    }

    #[test]
    fn each_identity_has_its_own_slots_freed_when_a_delivery_ends() {
        let slots = ReceiveSlots::default();
        let a = slots.try_take("NL", 2).unwrap();
        let _b = slots.try_take("NL", 2).unwrap();
        assert!(slots.try_take("NL", 2).is_none());
        let _be = slots.try_take("BE", 2).unwrap();
        drop(a);
        assert_eq!(slots.open("NL"), 1);
        assert!(slots.try_take("NL", 2).is_some());
    }
}
