//! `Exchange.Receive`: packages pushed by a partner administration's niix.
//!
//! A package is accepted only from the administration that issued it (the
//! caller's identity), signed with the public key configured for it in
//! `[[exchange.issuers]]`, and addressed to this administration. It is
//! stored, with its reports and any image content, as a foreign scan marked
//! with its origin, in one transaction; a package id seen before changes
//! nothing, so the sender may retry freely.

use std::sync::Arc;
use std::time::SystemTime;

use niix_proto::v1::receive_request::Part;
use niix_proto::v1::{
    PackageContent, PlaneImage, ReceiveReceipt, ReceiveRequest, ResultPackage, ScanHeader, ScanStatus,
};
use prost::Message;
use tonic::Streaming;

use super::{ExchangeConfig, ExchangeService, keys, package_id};
use crate::audit::Caller;
use crate::error::{Error, Result, blocking};
use crate::header::{canonical_scan_id, fingerprint, is_sha256_hex};
use crate::ingest::planes::PlaneSink;
use crate::store::{PlaneDigest, ReceiveOutcome, ReceivedPackage, ScanRecord};

/// Handles one `Receive` call; returns the result and the object to audit
/// (the package id, once known).
pub async fn receive(
    svc: &ExchangeService,
    caller: &Caller,
    mut stream: Streaming<ReceiveRequest>,
) -> (Result<ReceiveReceipt>, String) {
    let package = match stream.message().await {
        Ok(Some(ReceiveRequest { part: Some(Part::Package(p)) })) => p,
        Ok(_) => return (Err(Error::InvalidArgument("the first message must be the package".into())), String::new()),
        Err(s) => return (Err(Error::broken_stream(s, "receiving the package")), String::new()),
    };
    let content = match verify_package(svc.config(), &caller.identity, &package) {
        Ok(c) => c,
        Err(e) => return (Err(e), String::new()),
    };
    let id = content.package_id.clone();
    (store(svc, package, content, stream).await, id)
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
    svc: &ExchangeService,
    package: ResultPackage,
    content: PackageContent,
    mut stream: Streaming<ReceiveRequest>,
) -> Result<ReceiveReceipt> {
    let (pid, sid) = (content.package_id.clone(), content.scan_id.clone());
    let receipt = move |duplicate| ReceiveReceipt { package_id: pid.clone(), duplicate, scan_id: sid.clone() };
    let (meta, blobs) = (svc.meta.clone(), svc.blobs.clone());
    // A retry of a package stored before: answer before any plane is read.
    let (m, scan_id, id) = (meta.clone(), content.scan_id.clone(), content.package_id.clone());
    if blocking(move || Ok(m.received_packages(&scan_id)?.iter().any(|p| p.package_id == id))).await? {
        return Ok(receipt(true));
    }
    let planes = if content.full_planes {
        receive_planes(blobs.clone(), &content, &mut stream).await?
    } else {
        store_images(blobs.clone(), &content).await?
    };
    let origin = if content.origin.is_empty() { content.issuer.clone() } else { content.origin.clone() };
    let header =
        ScanHeader { scan_id: content.scan_id.clone(), metadata: content.metadata.clone(), planes: content.planes };
    let record = ScanRecord {
        scan_id: content.scan_id.clone(),
        header_sha256: fingerprint(&header, &content.scan_id),
        header,
        planes,
        status: ScanStatus::Analyzed,
        received_at: SystemTime::now(),
        decision: 0,
        score: None,
        origin,
    };
    let reports = content.reports;
    let received = ReceivedPackage {
        package_id: content.package_id.clone(),
        issuer: content.issuer.clone(),
        sequence: content.sequence,
        scan_id: content.scan_id.clone(),
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
