//! Streaming scan ingest: the `ScanIngest` gRPC service.
//!
//! A push is a header followed by plane chunks. Each chunk is hashed by one
//! blocking thread and appended to the plane's staging area by another, both
//! fed through small bounded channels, so hashing and writing overlap and
//! memory per upload stays at a few chunks. When every byte is in, the
//! planes are checked (declared digest, decodable image of the declared
//! size), made durable under their digests, and only then is the scan
//! committed to the metadata store: a crash at any moment leaves either no
//! scan or the whole scan. Staged bytes survive a broken stream or a restart,
//! and [`Ingest::upload_status`] tells a client where to resume.

pub mod planes;
mod service;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::{Stream, StreamExt};
use niix_proto::v1::push_scan_request::Part;
use niix_proto::v1::upload_status::State;
use niix_proto::v1::{PlaneProgress, PlaneReceipt, PushScanRequest, ScanHeader, ScanReceipt, ScanStatus, UploadStatus};
use tokio::sync::{Notify, Semaphore, watch};

use crate::error::{Error, Result, blocking};
use crate::header;
use crate::limits::Limits;
use crate::metrics::{GaugeGuard, Metrics, ReceivedLabels};
use crate::model_choice::ModelChoice;
use crate::scope::SiteScope;
use crate::store::{BlobStore, CommitOutcome, MetadataStore, PendingUpload, PlaneDigest, ScanRecord};
use planes::{PlaneSink, check_plane_bytes};
pub use service::IngestService;

/// The ingest engine shared by every push stream.
pub struct Ingest {
    meta: Arc<dyn MetadataStore>,
    blobs: Arc<dyn BlobStore>,
    limits: Limits,
    metrics: Metrics,
    active: Mutex<HashSet<String>>,
    /// Uploads streaming per uploader identity.
    per_identity: Mutex<HashMap<String, usize>>,
    slots: Semaphore,
    abandon: watch::Receiver<bool>,
    analysis: Option<Arc<Notify>>,
    /// Free bytes the data disk keeps once a new upload is in.
    min_free_bytes: u64,
    /// Whether the serving model can read a pushed scan's planes.
    readable: Option<ReadableCheck>,
}

/// Checks a pushed scan's planes against the models that may analyse it.
pub struct ReadableCheck {
    /// The configured analysis model and its fallbacks.
    pub choice: ModelChoice,
    /// Refuse an unreadable scan (FAILED_PRECONDITION); else store it with
    /// a warning in the receipt.
    pub refuse: bool,
}

/// Marks a scan id as streaming; released on drop.
struct Claim<'a> {
    ingest: &'a Ingest,
    id: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.ingest.active.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

/// One of an identity's upload slots; released on drop.
struct IdentitySlot<'a> {
    ingest: &'a Ingest,
    identity: String,
}

impl Drop for IdentitySlot<'_> {
    fn drop(&mut self) {
        let mut counts = self.ingest.per_identity.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.identity);
            }
        }
    }
}

/// Who pushes: the identity whose uploads are counted against
/// `limits.max_uploads_per_identity`, and the sites it may push for.
#[derive(Debug, Clone)]
pub struct Uploader {
    /// The caller's identity.
    pub identity: String,
    /// The sites it may push scans of.
    pub scope: SiteScope,
}

/// Builds the receipt of a stored scan.
pub fn receipt_of(record: &ScanRecord, duplicate: bool) -> ScanReceipt {
    ScanReceipt {
        scan_id: record.scan_id.clone(),
        planes: record
            .planes
            .iter()
            .enumerate()
            .map(|(i, p)| PlaneReceipt { index: i as u32, sha256: p.sha256.clone(), byte_length: p.byte_length })
            .collect(),
        duplicate,
        status: record.status as i32,
        warnings: Vec::new(),
    }
}

impl Ingest {
    /// Creates the engine. When `abandon` turns true (shutdown grace over),
    /// open streams stop, keep what they received, and answer UNAVAILABLE.
    /// With `analysis`, committed scans are QUEUED and it is notified;
    /// without, they stay RECEIVED.
    pub fn new(
        meta: Arc<dyn MetadataStore>,
        blobs: Arc<dyn BlobStore>,
        limits: Limits,
        metrics: Metrics,
        abandon: watch::Receiver<bool>,
        analysis: Option<Arc<Notify>>,
    ) -> Self {
        let slots = Semaphore::new(limits.max_concurrent_uploads);
        Ingest {
            meta,
            blobs,
            limits,
            metrics,
            active: Mutex::new(HashSet::new()),
            per_identity: Mutex::new(HashMap::new()),
            slots,
            abandon,
            analysis,
            min_free_bytes: 0,
            readable: None,
        }
    }

    /// Takes one of `identity`'s upload slots, or refuses when it streams
    /// `max_uploads_per_identity` already.
    fn identity_slot(&self, identity: &str) -> Result<IdentitySlot<'_>> {
        let mut counts = self.per_identity.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(identity.to_string()).or_insert(0);
        if *n >= self.limits.max_uploads_per_identity {
            return Err(Error::ResourceExhausted(format!(
                "{identity} is streaming {n} uploads already, its limit (limits.max_uploads_per_identity); \
                 finish or cancel one, or retry shortly"
            )));
        }
        *n += 1;
        Ok(IdentitySlot { ingest: self, identity: identity.to_string() })
    }

    /// The next message of a push, or DEADLINE_EXCEEDED when the client
    /// sends nothing for `limits.upload_stall_timeout`.
    /// `kept` says what the server keeps of it.
    async fn next_or_stall<S>(
        &self,
        stream: &mut S,
        kept: impl FnOnce() -> String,
    ) -> Result<Option<Result<PushScanRequest, tonic::Status>>>
    where
        S: Stream<Item = Result<PushScanRequest, tonic::Status>> + Unpin + Send,
    {
        let stall = self.limits.upload_stall_timeout;
        tokio::time::timeout(stall, stream.next()).await.map_err(|_| {
            Error::DeadlineExceeded(format!(
                "the push sent nothing for {}; the server cut it{}",
                humanize(stall),
                kept()
            ))
        })
    }

    /// Refuses new uploads that would leave less than `bytes` free on the
    /// blob store's disk (`storage.min_free_bytes`).
    pub fn with_min_free_bytes(mut self, bytes: u64) -> Self {
        self.min_free_bytes = bytes;
        self
    }

    /// Checks each pushed scan's planes against the serving model.
    pub fn with_readable_check(mut self, check: ReadableCheck) -> Self {
        self.readable = Some(check);
        self
    }

    /// Nothing when the serving model, or a fallback it allows, reads the
    /// scan's planes (or no model serves: the scan then queues); else the
    /// refusal, or with `refuse = false` the warning for the receipt.
    fn check_readable(&self, header: &ScanHeader) -> Result<Option<String>> {
        let Some(check) = &self.readable else { return Ok(None) };
        let Some(model) = check.choice.primary() else { return Ok(None) };
        let kinds: Vec<String> = header.planes.iter().map(|p| crate::plane::plane_kind_name(p.kind)).collect();
        let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
        let Err(e) = check.choice.for_planes(&model, &kinds) else { return Ok(None) };
        let why = format!(
            "{e} ({} reads {:?}; ModelMetadata of inference.GRPCInferenceService lists a model's inputs)",
            model.name, model.manifest.input.channels
        );
        if check.refuse {
            return Err(Error::FailedPrecondition(format!(
                "{why}; push the planes it needs, or ask the operator to serve a model for these planes"
            )));
        }
        Ok(Some(format!(
            "{why}; the scan is stored, and its analysis fails unless a model that reads it serves by then"
        )))
    }

    /// RESOURCE_EXHAUSTED when receiving `needed` more bytes would take the
    /// disk below the free-space floor.
    async fn check_free_space(&self, needed: u64) -> Result<()> {
        if self.min_free_bytes == 0 {
            return Ok(());
        }
        let blobs = self.blobs.clone();
        let Some(free) = blocking(move || Ok(blobs.free_bytes()?)).await? else { return Ok(()) };
        if free.saturating_sub(needed) < self.min_free_bytes {
            return Err(Error::ResourceExhausted(format!(
                "the server's data disk has {free} bytes free; this scan needs {needed} more and \
                 storage.min_free_bytes keeps {} free: retry when the operator has freed space",
                self.min_free_bytes
            )));
        }
        Ok(())
    }

    fn claim(&self, id: &str) -> Result<Claim<'_>> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if !active.insert(id.to_string()) {
            return Err(Error::Aborted(format!(
                "another push of scan {id} is streaming right now; wait for it or retry later"
            )));
        }
        Ok(Claim { ingest: self, id: id.to_string() })
    }

    fn is_active(&self, id: &str) -> bool {
        self.active.lock().unwrap_or_else(|p| p.into_inner()).contains(id)
    }

    /// Receives one push stream and returns the receipt.
    pub async fn push<S>(&self, uploader: &Uploader, stream: S) -> Result<ScanReceipt>
    where
        S: Stream<Item = Result<PushScanRequest, tonic::Status>> + Unpin + Send,
    {
        let started = Instant::now();
        // Dropped on every exit, including a cancelled or timed-out call
        // (tonic then drops this future mid-await).
        let active = GaugeGuard::hold(&self.metrics.uploads_active);
        let result = self.push_inner(uploader, stream).await;
        drop(active);
        if let Ok(receipt) = &result {
            self.metrics.upload_seconds.observe(started.elapsed().as_secs_f64());
            let labels = ReceivedLabels { duplicate: receipt.duplicate.to_string() };
            self.metrics.scans_received.get_or_create(&labels).inc();
            tracing::info!(scan_id = %receipt.scan_id, duplicate = receipt.duplicate,
                seconds = started.elapsed().as_secs_f64(), "scan received");
        }
        result
    }

    async fn push_inner<S>(&self, uploader: &Uploader, mut stream: S) -> Result<ScanReceipt>
    where
        S: Stream<Item = Result<PushScanRequest, tonic::Status>> + Unpin + Send,
    {
        let header = match self.next_or_stall(&mut stream, || " before its ScanHeader arrived".into()).await? {
            None => {
                return Err(Error::InvalidArgument("empty push stream: the first message must be a ScanHeader".into()));
            }
            Some(Err(status)) => {
                return Err(Error::broken_stream(status, "push stream broke before the header"));
            }
            Some(Ok(PushScanRequest { part: Some(Part::Header(mut h)) })) => {
                header::normalise(&mut h);
                h
            }
            Some(Ok(_)) => {
                return Err(Error::InvalidArgument("the first message of a push must be a ScanHeader".into()));
            }
        };
        let id = header::validate(&header, &self.limits)?;
        let unreadable = self.check_readable(&header)?;
        let site = header.metadata.as_ref().map_or("", |m| m.site_id.as_str());
        if !uploader.scope.allows(site) {
            return Err(Error::PermissionDenied(format!(
                "{} may push scans of the sites {:?} only, and this scan is from site {site}",
                uploader.identity,
                uploader.scope.sites().unwrap_or_default()
            )));
        }
        let _identity_slot = self.identity_slot(&uploader.identity)?;
        let fingerprint = header::fingerprint(&header, &id);

        let meta = self.meta.clone();
        let lookup = id.clone();
        if let Some(existing) = blocking(move || Ok(meta.get_scan(&lookup)?)).await? {
            return self.repeat_push(existing, &header, &fingerprint, stream).await;
        }

        let _slot = self.slots.try_acquire().map_err(|_| {
            Error::Busy(format!(
                "the server is receiving {} scans already; retry shortly",
                self.limits.max_concurrent_uploads
            ))
        })?;
        let _claim = self.claim(&id)?;
        let held = self.upload_held(&id, &header).await?;
        let total: u64 = header.planes.iter().map(|p| p.byte_length).sum();
        self.check_free_space(total.saturating_sub(held)).await?;
        let offsets = self.open_upload(&id, &header, &fingerprint).await?;
        if offsets.iter().any(|&o| o > 0) {
            tracing::info!(scan_id = %id, ?offsets, "resuming upload");
        }

        let held = offsets.clone();
        let make_sink = |i: usize| PlaneSink::staged(self.blobs.clone(), &id, i as u32, held[i] > 0);
        let digests = self.receive(&mut stream, &header, offsets, make_sink).await?;
        let mut receipt = self.finish(id, header, fingerprint, digests).await?;
        receipt.warnings.extend(unreadable);
        Ok(receipt)
    }

    /// Bytes already staged for this upload (0 for a new one).
    async fn upload_held(&self, id: &str, header: &ScanHeader) -> Result<u64> {
        let (blobs, id, planes) = (self.blobs.clone(), id.to_string(), header.planes.len() as u32);
        blocking(move || (0..planes).map(|i| Ok(blobs.staged_len(&id, i)?)).sum()).await
    }

    /// Records the upload (or checks a resumed one) and returns the bytes held per plane.
    async fn open_upload(&self, id: &str, header: &ScanHeader, fingerprint: &str) -> Result<Vec<u64>> {
        let (meta, blobs) = (self.meta.clone(), self.blobs.clone());
        let pending = PendingUpload {
            scan_id: id.to_string(),
            header: header.clone(),
            header_sha256: fingerprint.to_string(),
            started_at: SystemTime::now(),
        };
        let planes: Vec<u64> = header.planes.iter().map(|p| p.byte_length).collect();
        blocking(move || {
            match meta.get_upload(&pending.scan_id)? {
                Some(u) if u.header_sha256 != pending.header_sha256 => {
                    return Err(Error::FailedPrecondition(format!(
                        "an unfinished upload of scan {} has a different header; resume it with the same header, \
                         or call AbortUpload first, or use a new scan_id",
                        pending.scan_id
                    )));
                }
                Some(u) => check_declared_digests(&pending.scan_id, &u.header, &pending.header)?,
                None => {
                    // Bytes staged without a record (left by a crash) belong to nobody.
                    blobs.discard_staged(&pending.scan_id)?;
                    meta.put_upload(&pending)?;
                }
            }
            let mut offsets = Vec::with_capacity(planes.len());
            for (i, len) in planes.iter().enumerate() {
                let held = blobs.staged_len(&pending.scan_id, i as u32)?;
                if held > *len {
                    return Err(Error::Internal(format!("staged plane {i} holds {held} bytes, more than {len}")));
                }
                offsets.push(held);
            }
            Ok(offsets)
        })
        .await
    }

    /// Reads chunks in order, feeding each plane's sink, and returns each
    /// plane's digest. Sinks start when their plane's first chunk arrives and
    /// finish when the next plane starts, so an upload holds one hasher and
    /// one writer thread at a time; planes complete before this stream
    /// (resume) are re-hashed from their staged bytes at the end.
    async fn receive<S, M>(
        &self,
        stream: &mut S,
        header: &ScanHeader,
        mut received: Vec<u64>,
        make_sink: M,
    ) -> Result<Vec<PlaneDigest>>
    where
        S: Stream<Item = Result<PushScanRequest, tonic::Status>> + Unpin + Send,
        M: Fn(usize) -> PlaneSink,
    {
        let lengths: Vec<u64> = header.planes.iter().map(|p| p.byte_length).collect();
        let hint = if received.iter().any(|&r| r > 0) {
            " (the server holds bytes of this scan from an earlier attempt: resume from the offsets \
             GetUploadStatus gives, or AbortUpload to start over)"
        } else {
            ""
        };
        let mut digests: Vec<Option<String>> = vec![None; lengths.len()];
        let mut open: Option<(usize, PlaneSink)> = None;
        let mut abandon = self.abandon.clone();
        let outcome: Result<()> = async {
            loop {
                let next = tokio::select! {
                    m = self.next_or_stall(stream, || format!(
                        " and keeps the {} bytes received: call GetUploadStatus and resume",
                        received.iter().sum::<u64>()
                    )) => m?,
                    _ = abandon.wait_for(|a| *a) => {
                        return Err(Error::Unavailable(
                            "the server is shutting down; the bytes received are kept: resume this upload later".into(),
                        ));
                    }
                };
                let chunk = match next {
                    None => return Ok(()),
                    Some(Err(status)) => {
                        return Err(Error::broken_stream(status, "push stream broke"));
                    }
                    Some(Ok(PushScanRequest { part: Some(Part::Chunk(c)) })) => c,
                    Some(Ok(_)) => return Err(Error::InvalidArgument("only one ScanHeader per push stream".into())),
                };
                let Some(p) = (0..lengths.len()).find(|&i| received[i] < lengths[i]) else {
                    return Err(Error::InvalidArgument(format!(
                        "chunk for plane {} after every declared byte was received{hint}",
                        chunk.plane_index
                    )));
                };
                if chunk.plane_index as usize != p || chunk.offset != received[p] {
                    return Err(Error::InvalidArgument(format!(
                        "chunk out of order: expected plane {p} at offset {}, got plane {} at offset {}{hint}",
                        received[p], chunk.plane_index, chunk.offset
                    )));
                }
                if chunk.data.len() > niix_proto::MAX_CHUNK_DATA {
                    return Err(Error::ResourceExhausted(chunk_too_large(chunk.data.len())));
                }
                let n = chunk.data.len() as u64;
                if received[p] + n > lengths[p] {
                    return Err(Error::InvalidArgument(format!(
                        "plane {p}: chunk at offset {} with {n} bytes runs past the declared byte_length {}",
                        chunk.offset, lengths[p]
                    )));
                }
                if n == 0 {
                    continue;
                }
                if open.as_ref().is_some_and(|(q, _)| *q != p)
                    && let Some((q, sink)) = open.take()
                {
                    digests[q] = Some(sink.finish().await?);
                }
                let (_, sink) = open.get_or_insert_with(|| (p, make_sink(p)));
                received[p] += n;
                self.metrics.bytes_received.inc_by(n);
                sink.send(chunk.data).await?;
            }
        }
        .await;

        // Always drain the open writer, so whatever arrived is durable for a resume.
        if let Some((q, sink)) = open.take() {
            // A writer failure is the root cause of any "writer stopped" error.
            let digest = sink.finish().await?;
            if outcome.is_ok() {
                digests[q] = Some(digest);
            }
        }
        outcome?;
        if let Some(p) = (0..lengths.len()).find(|&i| received[i] < lengths[i]) {
            let held: u64 = received.iter().sum();
            return Err(Error::DataLoss(format!(
                "push stream ended after {} of {} bytes of plane {p}; the server keeps the {held} bytes received: \
                 call GetUploadStatus and resume",
                received[p], lengths[p]
            )));
        }
        let mut out = Vec::with_capacity(lengths.len());
        for (i, d) in digests.into_iter().enumerate() {
            let sha256 = match d {
                Some(d) => d,
                None => make_sink(i).finish().await?,
            };
            out.push(PlaneDigest::full(sha256, lengths[i]));
        }
        Ok(out)
    }

    /// Checks the complete planes, makes them durable and commits the scan.
    async fn finish(
        &self,
        id: String,
        mut header: ScanHeader,
        fingerprint: String,
        digests: Vec<PlaneDigest>,
    ) -> Result<ScanReceipt> {
        let (meta, blobs) = (self.meta.clone(), self.blobs.clone());
        for (d, got) in header.planes.iter_mut().zip(&digests) {
            if !d.sha256.is_empty() && d.sha256 != got.sha256 {
                let msg = format!(
                    "plane bytes do not match the declared sha256 (declared {}, received {}); \
                     the upload was discarded: push it again",
                    d.sha256, got.sha256
                );
                self.discard(&id).await?;
                return Err(Error::DataLoss(msg));
            }
            d.sha256 = got.sha256.clone();
        }
        let check_header = header.clone();
        let check_id = id.clone();
        let check_blobs = blobs.clone();
        let checked = blocking(move || {
            for (i, d) in check_header.planes.iter().enumerate() {
                check_plane_bytes(check_blobs.as_ref(), &check_id, i as u32, d)?;
            }
            Ok(())
        })
        .await;
        if let Err(e) = checked {
            self.discard(&id).await?;
            return Err(e);
        }
        let record = ScanRecord {
            scan_id: id.clone(),
            header,
            planes: digests,
            header_sha256: fingerprint,
            status: if self.analysis.is_some() { ScanStatus::Queued } else { ScanStatus::Received },
            received_at: SystemTime::now(),
            decision: 0,
            score: None,
            origin: String::new(),
        };
        let outcome = blocking(move || {
            for (i, p) in record.planes.iter().enumerate() {
                blobs.promote(&record.scan_id, i as u32, &p.sha256)?;
            }
            let outcome = meta.commit_scan(&record)?;
            blobs.discard_staged(&record.scan_id)?;
            Ok((outcome, record))
        })
        .await?;
        match outcome {
            (CommitOutcome::Committed, record) => {
                if let Some(wake) = &self.analysis {
                    wake.notify_one();
                }
                Ok(receipt_of(&record, false))
            }
            (CommitOutcome::Existing(existing), record) => same_scan(&existing, &record.header_sha256, &record.planes),
        }
    }

    async fn discard(&self, id: &str) -> Result<()> {
        let (meta, blobs, id) = (self.meta.clone(), self.blobs.clone(), id.to_string());
        blocking(move || {
            // Bytes first: on a full disk the database write below may need them.
            blobs.discard_staged(&id)?;
            meta.delete_upload(&id)?;
            Ok(())
        })
        .await
    }

    /// A push of a scan id that is already stored: a duplicate if the content
    /// is the same, ALREADY_EXISTS otherwise.
    async fn repeat_push<S>(
        &self,
        existing: ScanRecord,
        header: &ScanHeader,
        fingerprint: &str,
        mut stream: S,
    ) -> Result<ScanReceipt>
    where
        S: Stream<Item = Result<PushScanRequest, tonic::Status>> + Unpin + Send,
    {
        if existing.header_sha256 != fingerprint {
            return Err(Error::AlreadyExists(format!(
                "scan {} is already stored with different metadata or planes; use a new scan_id for a new scan",
                existing.scan_id
            )));
        }
        let declared: Vec<PlaneDigest> =
            header.planes.iter().map(|p| PlaneDigest::full(p.sha256.clone(), p.byte_length)).collect();
        if declared.iter().all(|d| !d.sha256.is_empty()) {
            // The client told us the digests: no need to receive the bytes again.
            return same_scan(&existing, fingerprint, &declared);
        }
        let _slot = self
            .slots
            .try_acquire()
            .map_err(|_| Error::Busy("the server is receiving too many scans; retry shortly".into()))?;
        let offsets = vec![0; header.planes.len()];
        let digests = self.receive(&mut stream, header, offsets, |_| PlaneSink::hash_only()).await?;
        same_scan(&existing, fingerprint, &digests)
    }

    /// Where an upload stands, for a client deciding whether to resume.
    pub async fn upload_status(&self, scan_id: &str) -> Result<UploadStatus> {
        let id = header::canonical_scan_id(scan_id)?;
        let active = self.is_active(&id);
        let (meta, blobs) = (self.meta.clone(), self.blobs.clone());
        blocking(move || {
            let mut status = UploadStatus { scan_id: id.clone(), active, ..Default::default() };
            if let Some(scan) = meta.get_scan(&id)? {
                status.state = State::Complete as i32;
                status.receipt = Some(receipt_of(&scan, false));
            } else if let Some(upload) = meta.get_upload(&id)? {
                status.state = State::InProgress as i32;
                for (i, p) in upload.header.planes.iter().enumerate() {
                    status.planes.push(PlaneProgress {
                        index: i as u32,
                        received_bytes: blobs.staged_len(&id, i as u32)?,
                        byte_length: p.byte_length,
                    });
                }
            } else {
                status.state = State::Unknown as i32;
            }
            Ok(status)
        })
        .await
    }

    /// The site of the stored scan or unfinished upload `scan_id`; `None`
    /// when the server holds neither.
    pub async fn site_of(&self, scan_id: &str) -> Result<Option<String>> {
        let id = header::canonical_scan_id(scan_id)?;
        let meta = self.meta.clone();
        blocking(move || {
            let header = match meta.get_scan(&id)? {
                Some(scan) => Some(scan.header),
                None => meta.get_upload(&id)?.map(|u| u.header),
            };
            Ok(header.map(|h| h.metadata.map(|m| m.site_id).unwrap_or_default()))
        })
        .await
    }

    /// Throws away an unfinished upload; false if there was none.
    pub async fn abort_upload(&self, scan_id: &str) -> Result<bool> {
        let id = header::canonical_scan_id(scan_id)?;
        let _claim = self.claim(&id)?;
        let (meta, blobs) = (self.meta.clone(), self.blobs.clone());
        blocking(move || {
            // Free the staged bytes before touching the database: on a full
            // disk the row's deletion (and the audit record) needs the space.
            // A crash in between leaves an upload with nothing staged, which
            // resumes from offset 0 or is swept.
            blobs.discard_staged(&id)?;
            let existed = meta.delete_upload(&id)?;
            Ok(existed)
        })
        .await
    }

    /// Deletes unfinished uploads older than the staging TTL, and staged bytes
    /// that no upload owns. Returns how many uploads were removed.
    pub async fn sweep_staging(&self) -> Result<usize> {
        let cutoff = SystemTime::now() - self.limits.staging_ttl;
        let (meta, blobs) = (self.meta.clone(), self.blobs.clone());
        let active: HashSet<String> = self.active.lock().unwrap_or_else(|p| p.into_inner()).clone();
        blocking(move || {
            let mut removed = 0;
            for id in meta.uploads_started_before(cutoff)? {
                if !active.contains(&id) {
                    blobs.discard_staged(&id)?;
                    meta.delete_upload(&id)?;
                    removed += 1;
                }
            }
            for id in blobs.staged_uploads()? {
                if !active.contains(&id) && meta.get_upload(&id)?.is_none() {
                    blobs.discard_staged(&id)?;
                }
            }
            Ok(removed)
        })
        .await
    }
}

/// A duration as an operator writes it in the configuration ("400ms", "1m").
fn humanize(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// What a client sending an oversized chunk is told.
pub fn chunk_too_large(bytes: usize) -> String {
    format!(
        "a PlaneChunk carries at most {} data bytes (the 4 MiB message limit less framing), this one has {bytes}; \
         send smaller chunks (niix push sends 1 MiB)",
        niix_proto::MAX_CHUNK_DATA
    )
}

/// A resume must declare exactly the plane digests the first attempt
/// declared: the first attempt's header is what the upload is checked
/// against at completion, so a resume that changed or dropped a digest could
/// otherwise finish the plane with other bytes (half of one file, half of
/// another) under a digest nobody declared.
fn check_declared_digests(scan_id: &str, first: &ScanHeader, resume: &ScanHeader) -> Result<()> {
    for (i, (a, b)) in first.planes.iter().zip(&resume.planes).enumerate() {
        if a.sha256 != b.sha256 {
            let shown = |d: &str| if d.is_empty() { "none".to_string() } else { d.to_string() };
            return Err(Error::FailedPrecondition(format!(
                "plane {i}: this resume declares sha256 {} but the unfinished upload of scan {} declared {}; \
                 resume with the digests of the first attempt, or call AbortUpload to start over",
                shown(&b.sha256),
                scan_id,
                shown(&a.sha256)
            )));
        }
    }
    Ok(())
}

/// Compares a push with the stored scan of the same id.
fn same_scan(existing: &ScanRecord, fingerprint: &str, digests: &[PlaneDigest]) -> Result<ScanReceipt> {
    if existing.header_sha256 == fingerprint && existing.planes == digests {
        Ok(receipt_of(existing, true))
    } else {
        Err(Error::AlreadyExists(format!(
            "scan {} is already stored with different plane bytes; use a new scan_id for a new scan",
            existing.scan_id
        )))
    }
}
