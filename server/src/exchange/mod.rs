//! Sharing results with partner administrations (`niix.v1.Exchange`):
//! sharing agreements, redaction, signed result packages, the pull feed, and
//! push federation (an outbox on the sending side, `Receive` on the other).
//!
//! Packages are derived from the event log: every MACHINE or OPERATOR report
//! stored is an event, and a partner's feed is the events its agreement
//! entitles it to, each redacted and signed. A package's sequence number is
//! its event's, so a partner resumes from the last sequence it saw, and a
//! package fetched again is the same package.

pub mod agreement;
pub mod images;
pub mod keys;
pub mod outbox;
pub mod receive;
pub mod render;
pub mod terms;

use std::pin::Pin;
use std::sync::Arc;

pub use agreement::{Agreement, Content, PushTarget, Redact};
use ed25519_dalek::SigningKey;
use futures_util::Stream;
use niix_proto::v1::exchange_server::Exchange;
use niix_proto::v1::{
    GetPackageRequest, GetPlaneRequest, PackageContent, PlaneChunk, ReceiveReceipt, ReceiveRequest, ResultPackage,
    SubscribeRequest,
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub use terms::{
    CHUNK_BYTES, DEFAULT_MAX_RECEIVE_MESSAGE_BYTES, DEFAULT_MAX_RECEIVES_PER_ISSUER, ExchangeConfig, Issuer,
    MAX_MESSAGE_BYTES, package_id,
};

use crate::audit::{Caller, Gate};
use crate::error::{Error, Result, blocking};
use crate::events::{EventSignal, timestamp, wait_for_events};
use crate::limits::Limits;
use crate::store::{BlobStore, MetadataStore, StoredEvent};

/// Makes and signs packages, serves the feed, and receives pushed packages.
#[derive(Clone)]
pub struct ExchangeService {
    meta: Arc<dyn MetadataStore>,
    blobs: Arc<dyn BlobStore>,
    config: Arc<ExchangeConfig>,
    key: Option<Arc<SigningKey>>,
    gate: Gate,
    events: EventSignal,
    stop: watch::Receiver<bool>,
    renderings: Arc<render::Renderings>,
    inbox: receive::Inbox,
}

impl ExchangeService {
    /// Creates the service; loads the signing key if one is configured.
    /// Received scans are held to the ingest `limits`.
    pub fn new(
        meta: Arc<dyn MetadataStore>,
        blobs: Arc<dyn BlobStore>,
        config: ExchangeConfig,
        limits: Limits,
        gate: Gate,
        events: EventSignal,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let key = match &config.signing_key {
            Some(p) => Some(Arc::new(keys::load(p)?)),
            None => None,
        };
        if !config.agreements.is_empty() || !config.issuers.is_empty() {
            anyhow::ensure!(!config.administration.is_empty(), "[exchange] administration is not set (e.g. \"NL\")");
        }
        if !config.agreements.is_empty() {
            anyhow::ensure!(
                key.is_some(),
                "[exchange] has agreements but no signing_key (make one with `niix keys init`)"
            );
        }
        for i in &config.issuers {
            keys::parse_public(&i.public_key)
                .map_err(|e| anyhow::anyhow!("[[exchange.issuers]] {}: {e}", i.administration))?;
        }
        anyhow::ensure!(config.max_receives_per_issuer > 0, "[exchange] max_receives_per_issuer must be at least 1");
        anyhow::ensure!(
            config.max_receive_message_bytes > CHUNK_BYTES,
            "[exchange] max_receive_message_bytes must be more than a 1 MiB plane chunk"
        );
        let renderings = Arc::new(render::Renderings::new(gate.metrics().package_renders.clone()));
        let config = Arc::new(config);
        let inbox = receive::Inbox::new(meta.clone(), blobs.clone(), config.clone(), Arc::new(limits), events.clone());
        Ok(ExchangeService { meta, blobs, config, key, gate, events, stop, renderings, inbox })
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &ExchangeConfig {
        &self.config
    }

    fn agreement_of(&self, caller: &Caller) -> Result<Agreement> {
        self.config
            .agreements
            .iter()
            .find(|a| a.partner == caller.identity)
            .cloned()
            .ok_or_else(|| Error::FailedPrecondition(format!("no sharing agreement with {}", caller.identity)))
    }

    /// The signed package of one event for one agreement, if it entitles.
    pub fn package(&self, agreement: &Agreement, event: &StoredEvent) -> Result<Option<ResultPackage>> {
        let Some(record) = self.meta.get_scan(&event.scan_id)? else { return Ok(None) };
        // Nothing is signed and shipped that differs from what was stored:
        // the scan and its reports are checked against their seals before
        // entitlement is decided (an edited decision must not quietly
        // change what a partner gets), and rendered planes' bytes below.
        let record = self.untampered(self.meta.verify_scan(&record.scan_id))?;
        if !agreement.entitles(&record, &event.report) {
            return Ok(None);
        }
        if matches!(agreement.content, Content::FindingsOverlay | Content::FindingsPlanes) {
            for (i, p) in record.planes.iter().enumerate() {
                self.untampered(crate::store::check_plane(self.blobs.as_ref(), &record.scan_id, i, p))?;
            }
        }
        let key = self.key.as_ref().ok_or_else(|| Error::FailedPrecondition("no signing key configured".into()))?;
        let mut meta = record.header.metadata.clone().unwrap_or_default();
        let mut reports = vec![event.report.clone()];
        agreement.redact(&mut meta, &mut reports);
        let overlay_png = match agreement.content {
            Content::FindingsOverlay => {
                self.renderings.overlay(self.meta.as_ref(), self.blobs.as_ref(), &record, event.report.plane_index)?
            }
            _ => Vec::new(),
        };
        let plane_images = match agreement.content {
            Content::FindingsPlanes => {
                self.renderings.plane_images(self.blobs.as_ref(), &record, agreement.plane_width)?
            }
            _ => Vec::new(),
        };
        let full_planes = agreement.content == Content::FullPlanes
            && record.planes.len() == record.header.planes.len()
            && record.planes.iter().all(|p| p.downsampled <= 1);
        // Full planes go out as pixels only, and the package signs what goes out.
        let planes = match full_planes {
            true => (0..record.planes.len())
                .map(|i| {
                    Ok(render::pixel_descriptor(
                        &record.header.planes[i],
                        &self.renderings.pixel_plane(self.blobs.as_ref(), &record, i)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?,
            false => record.header.planes.clone(),
        };
        let issuer = &self.config.administration;
        let content = PackageContent {
            package_id: package_id(issuer, &agreement.partner, event.seq),
            issuer: issuer.clone(),
            recipient: agreement.partner.clone(),
            sequence: event.seq,
            issued_at: Some(timestamp(event.at)),
            agreement: agreement.name.clone(),
            scan_id: record.scan_id.clone(),
            metadata: Some(meta),
            planes,
            reports,
            overlay_png,
            plane_images,
            full_planes,
            origin: record.origin.clone(),
        };
        Ok(Some(keys::sign(key, &content)))
    }

    /// Counts (and logs) stored data found altered; the error refuses the
    /// request with DATA_LOSS.
    fn untampered<T>(&self, r: crate::store::StoreResult<T>) -> Result<T> {
        r.map_err(|e| {
            if matches!(e, crate::store::StoreError::Tampered(_)) {
                self.gate.metrics().integrity_failures.inc();
                tracing::error!(error = %e, "stored data was altered; refusing to send it to a partner");
            }
            e.into()
        })
    }

    /// The package with this id for `agreement`'s partner, with its scan's
    /// event (for the planes).
    fn find_package(&self, agreement: &Agreement, id: &str) -> Result<(ResultPackage, StoredEvent)> {
        let prefix = format!("{}.{}.", self.config.administration, agreement.partner);
        let missing = || Error::NotFound(format!("no package {id} for {}", agreement.partner));
        let seq: u64 = id.strip_prefix(&prefix).and_then(|s| s.parse().ok()).filter(|s| *s > 0).ok_or_else(missing)?;
        let event = self.meta.events_after(seq - 1, None, 1)?.into_iter().find(|e| e.seq == seq).ok_or_else(missing)?;
        let package = self.package(agreement, &event)?.ok_or_else(missing)?;
        Ok((package, event))
    }

    /// One package by id, for its partner.
    pub async fn get_package(&self, caller: &Caller, id: &str) -> Result<ResultPackage> {
        let agreement = self.agreement_of(caller)?;
        let this = self.clone();
        let id = id.to_string();
        blocking(move || Ok(this.find_package(&agreement, &id)?.0)).await
    }

    /// The bytes of one plane of a full-planes package, from `offset`.
    pub async fn get_plane(
        &self,
        caller: &Caller,
        req: GetPlaneRequest,
    ) -> Result<ReceiverStream<std::result::Result<PlaneChunk, Status>>> {
        let agreement = self.agreement_of(caller)?;
        if agreement.content != Content::FullPlanes {
            return Err(Error::PermissionDenied(format!(
                "agreement {} does not share full planes (content is {:?})",
                agreement.name, agreement.content
            )));
        }
        let this = self.clone();
        let id = req.package_id.clone();
        let reader = blocking(move || {
            // The bytes sent are the ones the package signs (pixels only).
            let (package, event) = this.find_package(&agreement, &id)?;
            let content = PackageContent::decode(package.content.as_slice())
                .map_err(|e| Error::Internal(format!("decoding package {id}: {e}")))?;
            if !content.full_planes {
                return Err(Error::FailedPrecondition(format!("package {id} does not carry full planes")));
            }
            let index = req.plane_index as usize;
            let plane = content.planes.get(index).ok_or_else(|| {
                Error::InvalidArgument(format!("plane {index} does not exist; the scan has {}", content.planes.len()))
            })?;
            if req.offset > plane.byte_length {
                return Err(Error::InvalidArgument(format!(
                    "offset {} is past the plane's {} bytes",
                    req.offset, plane.byte_length
                )));
            }
            // Re-hash before sending: bytes changed on disk are refused, not shipped.
            let sent = crate::store::PlaneDigest {
                sha256: plane.sha256.clone(),
                byte_length: plane.byte_length,
                downsampled: 1,
            };
            this.untampered(crate::store::check_plane(this.blobs.as_ref(), &event.scan_id, index, &sent))?;
            let mut reader = this.blobs.open(&plane.sha256)?;
            std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(req.offset))
                .map_err(|e| Error::Internal(format!("seeking plane {index}: {e}")))?;
            Ok(reader)
        })
        .await?;
        Ok(stream_plane(reader, req.plane_index, req.offset))
    }

    /// The feed after `cursor`.
    pub fn subscribe(
        &self,
        caller: &Caller,
        mut cursor: u64,
    ) -> Result<ReceiverStream<std::result::Result<ResultPackage, Status>>> {
        let agreement = self.agreement_of(caller)?;
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        let mut signal = self.events.subscribe();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let batch = this.next_packages(&agreement, cursor).await;
                let (packages, full) = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                for (seq, pkg) in packages {
                    cursor = seq;
                    if let Some(p) = pkg
                        && tx.send(Ok(p)).await.is_err()
                    {
                        return;
                    }
                }
                if !full && !wait_for_events(&mut signal, &tx, &mut stop).await {
                    return;
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    /// The next events after `cursor` with their packages for `agreement`
    /// (`None` where it is not entitled), and whether there may be more.
    pub async fn next_packages(
        &self,
        agreement: &Agreement,
        cursor: u64,
    ) -> Result<(Vec<(u64, Option<ResultPackage>)>, bool)> {
        const BATCH: usize = 64;
        let (t, a) = (self.clone(), agreement.clone());
        blocking(move || {
            let events = t.meta.events_after(cursor, None, BATCH)?;
            let full = events.len() == BATCH;
            let out = events.iter().map(|e| Ok((e.seq, t.package(&a, e)?))).collect::<Result<Vec<_>>>()?;
            Ok((out, full))
        })
        .await
    }
}

/// Streams a plane's bytes from a positioned reader in [`CHUNK_BYTES`] chunks.
pub fn stream_plane(
    mut reader: Box<dyn crate::store::ReadSeek>,
    plane_index: u32,
    mut offset: u64,
) -> ReceiverStream<std::result::Result<PlaneChunk, Status>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        loop {
            let mut data = vec![0u8; CHUNK_BYTES];
            let n = match read_full(&mut reader, &mut data) {
                Ok(n) => n,
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::internal(format!("reading plane {plane_index}: {e}"))));
                    return;
                }
            };
            if n == 0 {
                return;
            }
            data.truncate(n);
            let chunk = PlaneChunk { plane_index, offset, data: data.into() };
            offset += n as u64;
            if tx.blocking_send(Ok(chunk)).is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Reads until `buf` is full or the input ends.
fn read_full(reader: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

type PackageStream = Pin<Box<dyn Stream<Item = std::result::Result<ResultPackage, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = std::result::Result<PlaneChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Exchange for ExchangeService {
    type SubscribeStream = PackageStream;
    type GetPlaneStream = ChunkStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> std::result::Result<Response<Self::SubscribeStream>, Status> {
        let caller = Caller::of(&request);
        let cursor = request.into_inner().cursor;
        let result = ExchangeService::subscribe(self, &caller, cursor).map(|s| Box::pin(s) as PackageStream);
        self.gate.reply(&caller, "Subscribe", &format!("cursor={cursor}"), result).await
    }

    async fn get_package(
        &self,
        request: Request<GetPackageRequest>,
    ) -> std::result::Result<Response<ResultPackage>, Status> {
        let caller = Caller::of(&request);
        let id = request.into_inner().package_id;
        let result = ExchangeService::get_package(self, &caller, &id).await;
        self.gate.reply(&caller, "GetPackage", &id, result).await
    }

    async fn get_plane(
        &self,
        request: Request<GetPlaneRequest>,
    ) -> std::result::Result<Response<Self::GetPlaneStream>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let object = format!("{}#plane{}", req.package_id, req.plane_index);
        let result = ExchangeService::get_plane(self, &caller, req).await.map(|s| Box::pin(s) as ChunkStream);
        self.gate.reply(&caller, "GetPlane", &object, result).await
    }

    async fn receive(
        &self,
        request: Request<Streaming<ReceiveRequest>>,
    ) -> std::result::Result<Response<ReceiveReceipt>, Status> {
        let caller = Caller::of(&request);
        let (result, object) = self.inbox.receive(&caller, request.into_inner()).await;
        self.gate.reply(&caller, "Receive", &object, result).await
    }
}
