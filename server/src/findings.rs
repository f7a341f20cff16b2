//! The `Findings` service: what officers use. Query scans, read findings,
//! see overlays, adjudicate, watch new results live, export DICOS TDRs.
//!
//! An officer scoped to sites (see [`crate::scope`]) sees only their scans:
//! listings and watch streams leave the others out, and asking for one by
//! id answers NOT_FOUND, exactly as for a scan that does not exist, so the
//! scope does not reveal which scan ids exist elsewhere.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::Stream;
use niix_proto::v1::findings_server::Findings;
use niix_proto::v1::{
    AdjudicateRequest, AlarmDecision, ExportTdrRequest, ExportTdrResponse, FindingsEvent, FindingsEventKind,
    GetFindingsRequest, GetScanRequest, ListScansRequest, ListScansResponse, PackageContent, Plane, PlaneEncoding,
    PlaneKind, RenderOverlayRequest, RenderOverlayResponse, ReportType, ResultPackage, Scan, ScanDetail, ScanFindings,
    ScanStatus, ThreatReport, WatchFindingsRequest,
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::adjudication::operator_report;
use crate::audit::{Caller, Gate};
use crate::error::{Error, Result, blocking};
use crate::events::{EventSignal, timestamp, wait_for_events};
use crate::header::canonical_scan_id;
use crate::overlay::{OverlayOptions, render_plane};
use crate::plane::decode_map_png;
use crate::scope::SiteScope;
use crate::store::{BlobStore, MetadataStore, ScanQuery, ScanRecord, StoredEvent};

/// Default page of `ListScans`.
pub const DEFAULT_PAGE: usize = 100;
/// Largest page of `ListScans`.
pub const MAX_PAGE: usize = 1000;
/// Largest overlay PNG: the 4 MiB message limit stock gRPC clients apply,
/// less room for the response's other fields.
pub const MAX_OVERLAY_PNG_BYTES: usize = niix_proto::MAX_MESSAGE_BYTES - 4096;
/// Most bytes of scans in one `ListScans` page: 4 MiB less room for the
/// page token.
const MAX_LIST_BYTES: usize = niix_proto::MAX_MESSAGE_BYTES - 4096;
/// Tag and length of one scan in a `ListScansResponse`.
const SCAN_FRAMING: usize = 6;
/// Narrower renderings tried before an overlay is given up on.
const OVERLAY_ROUNDS: usize = 6;
/// Events read from the store per round by a watcher.
const WATCH_BATCH: usize = 256;

/// `niix.v1.Findings` over the store.
#[derive(Clone)]
pub struct FindingsService {
    meta: Arc<dyn MetadataStore>,
    blobs: Arc<dyn BlobStore>,
    gate: Gate,
    events: EventSignal,
    stop: watch::Receiver<bool>,
    /// Received packages read and decoded at once (each costs about three
    /// times its size, up to the exchange's 64 MiB message cap).
    package_reads: Arc<tokio::sync::Semaphore>,
}

/// Received packages read at once, over every caller.
const PACKAGE_READS: usize = 2;

fn system_time(t: &prost_types::Timestamp) -> SystemTime {
    UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.clamp(0, 999_999_999) as u32)
}

/// The wire form of a stored scan.
pub fn scan_message(r: &ScanRecord) -> Scan {
    Scan {
        scan_id: r.scan_id.clone(),
        metadata: r.header.metadata.clone(),
        planes: r
            .header
            .planes
            .iter()
            .zip(&r.planes)
            .enumerate()
            .map(|(i, (d, p))| Plane {
                index: i as u32,
                descriptor: Some(d.clone()),
                sha256: p.sha256.clone(),
                byte_length: p.byte_length,
                downsampled: p.downsampled,
            })
            .collect(),
        status: r.status as i32,
        received_at: Some(timestamp(r.received_at)),
        decision: r.decision,
        score: r.score.unwrap_or(0.0),
        origin: r.origin.clone(),
    }
}

/// Page tokens are "<scan time micros>.<scan id>.<filters>" of the last scan
/// returned, `<filters>` a digest of the (normalised) filters it was issued
/// for: a token only continues the listing it came from.
fn encode_token(r: &ScanRecord, filters: &str) -> String {
    let us = r.sort_time().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros();
    format!("{us}.{}.{filters}", r.scan_id)
}

fn decode_token(token: &str, filters: &str) -> Result<(SystemTime, String)> {
    let bad = || Error::InvalidArgument(format!("page_token {token:?} is not one this server issued"));
    let mut parts = token.splitn(3, '.');
    let (Some(us), Some(id), Some(issued_for)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let us: u64 = us.parse().map_err(|_| bad())?;
    if issued_for != filters {
        return Err(Error::InvalidArgument(
            "page_token was issued for different filters: send the same filters with it, \
             or start again without a page_token"
                .into(),
        ));
    }
    Ok((UNIX_EPOCH + Duration::from_micros(us), id.to_string()))
}

/// A short digest of a query's filters (not its position or page size).
fn filters_digest(query: &ScanQuery) -> String {
    use sha2::Digest;
    let filters = ScanQuery { limit: 0, before: None, ..query.clone() };
    hex::encode(&sha2::Sha256::digest(format!("{filters:?}").as_bytes())[..8])
}

/// Longest vehicle plate filter, in characters.
const MAX_PLATE_FILTER: usize = 32;

/// The store key of a ListScans plate filter: `None` when none was given.
/// A plate with no letter or digit cannot match any scan, and saying so
/// beats dropping the filter and answering with every scan.
fn plate_filter(plate: &str) -> Result<Option<String>> {
    if plate.trim().is_empty() {
        return Ok(None);
    }
    if plate.chars().count() > MAX_PLATE_FILTER {
        return Err(Error::InvalidArgument(format!(
            "vehicle_plate filter is longer than {MAX_PLATE_FILTER} characters"
        )));
    }
    let key = crate::store::plate_key(plate);
    if key.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "vehicle_plate filter {plate:?} has no letter or digit; plates are matched on their letters and digits"
        )));
    }
    Ok(Some(key))
}

fn non_empty(s: String) -> Option<String> {
    let s = s.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// The newest report of a type.
pub fn latest(reports: &[ThreatReport], kind: ReportType) -> Option<(usize, &ThreatReport)> {
    reports.iter().enumerate().rev().find(|(_, r)| r.r#type == kind as i32)
}

fn event_message(e: StoredEvent) -> FindingsEvent {
    let kind = if e.report.r#type == ReportType::Operator as i32 {
        FindingsEventKind::Adjudicated
    } else {
        FindingsEventKind::Analyzed
    };
    FindingsEvent {
        cursor: e.seq,
        kind: kind as i32,
        scan_id: e.scan_id,
        site_id: e.site_id,
        status: e.status as i32,
        report: Some(e.report),
        at: Some(timestamp(e.at)),
    }
}

impl FindingsService {
    /// Creates the service. Watch streams end when `stop` turns true.
    pub fn new(
        meta: Arc<dyn MetadataStore>,
        blobs: Arc<dyn BlobStore>,
        gate: Gate,
        events: EventSignal,
        stop: watch::Receiver<bool>,
    ) -> Self {
        FindingsService {
            meta,
            blobs,
            gate,
            events,
            stop,
            package_reads: Arc::new(tokio::sync::Semaphore::new(PACKAGE_READS)),
        }
    }

    async fn record(&self, scan_id: &str, scope: &SiteScope) -> Result<(ScanRecord, Vec<ThreatReport>)> {
        let id = canonical_scan_id(scan_id)?;
        let meta = self.meta.clone();
        let lookup = id.clone();
        let scope = scope.clone();
        let found = blocking(move || {
            let Some(scan) = meta.get_scan(&lookup)? else { return Ok(None) };
            if !scope.allows(scan.header.metadata.as_ref().map_or("", |m| m.site_id.as_str())) {
                return Ok(None);
            }
            // Officers decide on what was stored: header, plane digests and
            // reports must match their seals in the audit chain.
            let scan = meta.verify_scan(&lookup)?;
            let reports = meta.reports(&lookup)?;
            Ok(Some((scan, reports)))
        })
        .await
        .inspect_err(|e| {
            if matches!(e, Error::Store(crate::store::StoreError::Tampered(_))) {
                self.gate.metrics().integrity_failures.inc();
            }
        })?;
        found.ok_or_else(|| Error::Missing {
            resource_type: "scan",
            message: format!("no scan {id} is stored"),
            name: id.to_string(),
        })
    }

    /// Lists scans (used by the gRPC method).
    pub async fn list(&self, req: ListScansRequest, scope: &SiteScope) -> Result<ListScansResponse> {
        let site_id = non_empty(req.site_id);
        if let Some(site) = &site_id
            && !scope.allows(site)
        {
            return Err(Error::PermissionDenied(format!(
                "you may see scans of the sites {:?} only, and site_id {site} is not among them",
                scope.sites().unwrap_or_default()
            )));
        }
        let limit = match req.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let status = match ScanStatus::try_from(req.status) {
            Ok(ScanStatus::Unspecified) => None,
            Ok(s) => Some(s),
            Err(_) => return Err(Error::InvalidArgument(format!("unknown scan status value {}", req.status))),
        };
        let decision = match AlarmDecision::try_from(req.decision) {
            Ok(AlarmDecision::Unspecified) => None,
            Ok(d) => Some(d as i32),
            Err(_) => return Err(Error::InvalidArgument(format!("unknown decision value {}", req.decision))),
        };
        if let Some(s) = req.min_score
            && !(0.0..=1.0).contains(&s)
        {
            return Err(Error::InvalidArgument(format!("min_score {s} is outside 0..1")));
        }
        let container_number = match non_empty(req.container_number) {
            Some(n) => Some(crate::header::container_number(&n).map_err(|e| match e {
                Error::InvalidArgument(m) => Error::InvalidArgument(format!("container_number filter: {m}")),
                other => other,
            })?),
            None => None,
        };
        if let (Some(from), Some(to)) = (&req.scan_time_from, &req.scan_time_to)
            && system_time(to) <= system_time(from)
        {
            return Err(Error::InvalidArgument(
                "scan_time_to must be after scan_time_from (the range is from inclusive, to exclusive)".into(),
            ));
        }
        let mut query = ScanQuery {
            limit: limit + 1,
            before: None,
            site_id,
            sites: scope.sites().map(<[String]>::to_vec),
            lane_id: non_empty(req.lane_id),
            status,
            received_after: req.received_after.as_ref().map(system_time),
            scan_time_from: req.scan_time_from.as_ref().map(system_time),
            scan_time_to: req.scan_time_to.as_ref().map(system_time),
            decision,
            min_score: req.min_score,
            container_number,
            declaration_reference: non_empty(req.declaration_reference),
            vehicle_plate: plate_filter(&req.vehicle_plate)?,
        };
        let filters = filters_digest(&query);
        if !req.page_token.is_empty() {
            query.before = Some(decode_token(&req.page_token, &filters)?);
        }
        let meta = self.meta.clone();
        let mut rows = blocking(move || Ok(meta.list_scans(&query)?)).await?;
        rows.truncate(limit + 1);
        // A page ends early rather than outgrow a 4 MiB response (headers
        // may carry up to 64 KiB of metadata each).
        let mut scans = Vec::with_capacity(rows.len().min(limit));
        let mut bytes = 0;
        for r in rows.iter().take(limit) {
            let scan = scan_message(r);
            let len = scan.encoded_len() + SCAN_FRAMING;
            if !scans.is_empty() && bytes + len > MAX_LIST_BYTES {
                break;
            }
            bytes += len;
            scans.push(scan);
        }
        let more = rows.len() > scans.len();
        let next_page_token = match (more, scans.len().checked_sub(1).map(|i| &rows[i])) {
            (true, Some(last)) => encode_token(last, &filters),
            _ => String::new(),
        };
        Ok(ListScansResponse { scans, next_page_token })
    }

    /// A scan with its findings.
    pub async fn get(&self, scan_id: &str, scope: &SiteScope) -> Result<ScanDetail> {
        let (record, reports) = self.record(scan_id, scope).await?;
        let findings = ScanFindings { scan_id: record.scan_id.clone(), status: record.status as i32, reports };
        Ok(ScanDetail { scan: Some(scan_message(&record)), findings: Some(findings) })
    }

    /// A stored scan and its reports, scope-checked like every read (the
    /// officer console renders tiles from it through [`Self::open_plane`]).
    pub async fn scan_record(&self, scan_id: &str, scope: &SiteScope) -> Result<(ScanRecord, Vec<ThreatReport>)> {
        self.record(scan_id, scope).await
    }

    /// How a foreign scan was shared: the newest package its partner sent,
    /// without its image bytes; `None` for this administration's own scans.
    /// `record` comes from [`Self::scan_record`], which checked the scope.
    pub async fn shared(&self, record: &ScanRecord) -> Result<Option<Shared>> {
        if record.origin.is_empty() {
            return Ok(None);
        }
        let (meta, blobs, scan_id) = (self.meta.clone(), self.blobs.clone(), record.scan_id.clone());
        let _permit = self.package_read().await?;
        blocking(move || {
            let Some(p) = meta.received_packages(&scan_id)?.pop() else { return Ok(None) };
            let content = read_package(blobs.as_ref(), &p)?;
            Ok(Some(Shared {
                package_id: content.package_id,
                issuer: content.issuer,
                agreement: content.agreement,
                issued_at: content.issued_at,
                full_planes: content.full_planes,
                downsampled: content.plane_images.iter().map(|i| i.factor).max(),
                overlay: !content.overlay_png.is_empty(),
                first_origin: content.origin,
            }))
        })
        .await
    }

    /// A turn to read a received package ([`PACKAGE_READS`] at once).
    async fn package_read(&self) -> Result<tokio::sync::SemaphorePermit<'_>> {
        self.package_reads.acquire().await.map_err(|_| Error::Unavailable("the server is shutting down".into()))
    }

    /// Opens stored plane `index` of a scan for reading by rows (blocking).
    pub fn open_plane(&self, record: &ScanRecord, index: usize) -> Result<niix_inference::pipeline::PlaneInput> {
        crate::plane::stored_plane(record, index, self.blobs.as_ref())
    }

    /// The anomaly map of a scan's newest MACHINE report (8-bit, one value
    /// per `stride` pixels of the analysed plane) with its stride, when the
    /// server holds one (a foreign scan's map stays with its issuer).
    pub async fn anomaly_map(&self, scan_id: &str, scope: &SiteScope) -> Result<Option<(ndarray::Array2<u8>, u32)>> {
        let (_, reports) = self.record(scan_id, scope).await?;
        let Some((_, m)) = latest(&reports, ReportType::Machine) else { return Ok(None) };
        if m.anomaly_map_sha256.is_empty() {
            return Ok(None);
        }
        let (blobs, sha, stride) = (self.blobs.clone(), m.anomaly_map_sha256.clone(), m.anomaly_map_stride);
        blocking(move || {
            if blobs.blob_len(&sha)?.is_none() {
                return Ok(None);
            }
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut blobs.open(&sha)?, &mut bytes)
                .map_err(|e| Error::Internal(format!("reading anomaly map: {e}")))?;
            Ok(Some((decode_map_png(&bytes)?, stride)))
        })
        .await
    }

    /// A scan's status and reports.
    pub async fn findings(&self, scan_id: &str, scope: &SiteScope) -> Result<ScanFindings> {
        let (record, reports) = self.record(scan_id, scope).await?;
        Ok(ScanFindings { scan_id: record.scan_id, status: record.status as i32, reports })
    }

    /// Renders a plane with its findings.
    pub async fn overlay(&self, req: RenderOverlayRequest, scope: &SiteScope) -> Result<RenderOverlayResponse> {
        let (record, reports) = self.record(&req.scan_id, scope).await?;
        let (meta, blobs) = (self.meta.clone(), self.blobs.clone());
        let _permit = match !record.origin.is_empty() && record.planes.is_empty() {
            true => Some(self.package_read().await?),
            false => None,
        };
        blocking(move || {
            if !record.origin.is_empty()
                && record.planes.is_empty()
                && let Some(shared) = shared_overlay(meta.as_ref(), blobs.as_ref(), &record.scan_id)?
            {
                return Ok(shared);
            }
            render_scan(blobs.as_ref(), &record, &reports, &req)
        })
        .await
    }

    /// Stores an officer's verdict and returns the OPERATOR report.
    /// `officer` is the caller's authenticated identity (`None` without
    /// authentication), the officer of record.
    pub async fn adjudicate(
        &self,
        req: AdjudicateRequest,
        officer: Option<&str>,
        scope: &SiteScope,
    ) -> Result<ThreatReport> {
        let (record, reports) = self.record(&req.scan_id, scope).await?;
        let report = operator_report(latest(&reports, ReportType::Machine).map(|(_, r)| r), &req, officer)?;
        let meta = self.meta.clone();
        let stored = report.clone();
        let seq = blocking(move || Ok(meta.add_report(&record.scan_id, &stored, None)?)).await?;
        self.events.send_replace(seq);
        tracing::info!(scan_id = %req.scan_id, officer = %report.operator_id, name = %report.operator_name,
            verdict = report.verdict, "scan adjudicated");
        Ok(report)
    }

    /// The stream of new reports after a cursor.
    pub async fn watch(
        &self,
        req: WatchFindingsRequest,
        scope: &SiteScope,
    ) -> Result<ReceiverStream<std::result::Result<FindingsEvent, Status>>> {
        let scope = scope.clone();
        let meta = self.meta.clone();
        let mut cursor = if req.live_only { blocking(move || Ok(meta.last_event()?)).await? } else { req.cursor };
        let site = non_empty(req.site_id);
        let (tx, rx) = mpsc::channel(64);
        let meta = self.meta.clone();
        let mut signal = self.events.subscribe();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let (m, s) = (meta.clone(), site.clone());
                let batch = match blocking(move || Ok(m.events_after(cursor, s.as_deref(), WATCH_BATCH)?)).await {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let caught_up = batch.len() < WATCH_BATCH;
                for e in batch {
                    cursor = e.seq;
                    if !scope.allows(&e.site_id) {
                        continue;
                    }
                    if tx.send(Ok(event_message(e))).await.is_err() {
                        return; // the watcher went away
                    }
                }
                if caught_up && !wait_for_events(&mut signal, &tx, &mut stop).await {
                    return;
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    /// A report as a DICOS TDR.
    pub async fn export_tdr(&self, req: ExportTdrRequest, scope: &SiteScope) -> Result<ExportTdrResponse> {
        let (record, reports) = self.record(&req.scan_id, scope).await?;
        let kind = match ReportType::try_from(req.report) {
            Ok(ReportType::Unspecified) => ReportType::Machine,
            Ok(k) => k,
            Err(_) => return Err(Error::InvalidArgument(format!("unknown report type {}", req.report))),
        };
        let Some((index, report)) = latest(&reports, kind) else {
            return Err(Error::NotFound(format!("scan {} has no {} report", record.scan_id, kind.as_str_name())));
        };
        let report = report.clone();
        let blobs = self.blobs.clone();
        blocking(move || {
            let plane = report.plane_index as usize;
            let dx = match record.header.planes.get(plane) {
                Some(d) if d.encoding == PlaneEncoding::Dicos as i32 => {
                    niix_inference::dicos::probe(blobs.open(&record.planes[plane].sha256)?).ok()
                }
                _ => None,
            };
            let dicos_uid = dx.as_ref().map(|i| i.sop_instance_uid.clone()).filter(|u| !u.is_empty());
            let image = crate::tdr::ImageRef {
                sop_instance_uid: crate::tdr::plane_instance_uid(&record, plane, dicos_uid),
                study_instance_uid: dx.map(|i| i.study_instance_uid).filter(|u| !u.is_empty()),
            };
            let (dicos, sop_instance_uid) = crate::tdr::export(&record, &report, index, &image)?;
            Ok(ExportTdrResponse { dicos, sop_instance_uid })
        })
        .await
    }
}

/// Renders a plane of a stored scan with its latest MACHINE findings
/// (blocking: decodes the plane).
pub fn render_scan(
    blobs: &dyn BlobStore,
    record: &ScanRecord,
    reports: &[ThreatReport],
    req: &RenderOverlayRequest,
) -> Result<RenderOverlayResponse> {
    if !record.origin.is_empty() && record.planes.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "scan {} came from {} without its planes (the sharing agreement does not include image content)",
            record.scan_id, record.origin
        )));
    }
    let planes = &record.header.planes;
    let index = match PlaneKind::try_from(req.plane_kind) {
        Ok(PlaneKind::Unspecified) => req.plane_index as usize,
        Ok(kind) => planes
            .iter()
            .position(|p| p.kind == kind as i32)
            .ok_or_else(|| Error::NotFound(format!("scan {} has no {} plane", record.scan_id, kind.as_str_name())))?,
        Err(_) => return Err(Error::InvalidArgument(format!("unknown plane kind {}", req.plane_kind))),
    };
    let Some(descriptor) = planes.get(index).cloned() else {
        return Err(Error::InvalidArgument(format!("plane {index} does not exist; the scan has {}", planes.len())));
    };
    if req.window_high != 0 && req.window_high <= req.window_low || req.window_high > 65535 {
        return Err(Error::InvalidArgument(format!(
            "window {}..{} is empty or beyond 16 bits",
            req.window_low, req.window_high
        )));
    }
    let machine = latest(reports, ReportType::Machine).map(|(_, r)| r.clone());
    // A partner's downsampled share is drawn at its size, regions scaled down.
    let factor = record.planes.get(index).map_or(1, |p| p.downsampled.max(1));
    let mut input = crate::plane::stored_plane(record, index, blobs)?;
    // Regions and map are in the coordinates of the analysed plane; planes
    // of one scan share them when they have the same size.
    let analysed = machine.as_ref().and_then(|m| planes_size(record, m.plane_index as usize));
    let same_grid = analysed == Some((descriptor.width, descriptor.height));
    let map = match (&machine, same_grid) {
        // A foreign scan's map stays with its issuer.
        (Some(m), true) if !m.anomaly_map_sha256.is_empty() && blobs.blob_len(&m.anomaly_map_sha256)?.is_some() => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut blobs.open(&m.anomaly_map_sha256)?, &mut bytes)
                .map_err(|e| Error::Internal(format!("reading anomaly map: {e}")))?;
            Some((decode_map_png(&bytes)?, m.anomaly_map_stride))
        }
        _ => None,
    };
    let mut regions = match (&machine, same_grid) {
        (Some(m), true) => m.regions.clone(),
        _ => Vec::new(),
    };
    if factor > 1 {
        for r in &mut regions {
            (r.x, r.y) = (r.x / factor, r.y / factor);
            (r.width, r.height) = (r.width.div_ceil(factor).max(1), r.height.div_ceil(factor).max(1));
        }
    }
    let map = map.filter(|_| factor == 1);
    let window = (req.window_high != 0).then_some((req.window_low as u16, req.window_high as u16));
    let mut options = OverlayOptions { max_width: req.max_width, window, heat: !req.hide_heat, boxes: !req.hide_boxes };
    let map = map.as_ref().map(|(m, s)| (m, *s));
    let mut o = render_plane(&mut input, map, &regions, &options)?;
    // Over budget: render narrower (same window) until it fits. A PNG's size
    // grows about with its pixel count, so each round aims at the budget by
    // the square root of the ratio, with a margin.
    let mut shrunk = false;
    for _ in 0..OVERLAY_ROUNDS {
        if o.png.len() <= MAX_OVERLAY_PNG_BYTES || o.width <= 1 {
            break;
        }
        let ratio = (MAX_OVERLAY_PNG_BYTES as f64 / o.png.len() as f64).sqrt() * 0.92;
        options.max_width = ((f64::from(o.width) * ratio) as u32).clamp(1, o.width - 1);
        options.window = Some(o.window);
        o = render_plane(&mut input, map, &regions, &options)?;
        shrunk = true;
    }
    if o.png.len() > MAX_OVERLAY_PNG_BYTES {
        return Err(Error::Internal(format!("overlay of {} bytes does not fit the response limit", o.png.len())));
    }
    if shrunk {
        tracing::debug!(scan_id = %record.scan_id, width = o.width, bytes = o.png.len(), "overlay narrowed to fit 4 MiB");
    }
    Ok(RenderOverlayResponse {
        png: o.png,
        width: o.width,
        height: o.height,
        window_low: u32::from(o.window.0),
        window_high: u32::from(o.window.1),
        shrunk_to_fit: shrunk,
    })
}

/// How a partner shared a foreign scan ([`FindingsService::shared`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Shared {
    /// The newest package's id.
    pub package_id: String,
    /// The administration that signed it.
    pub issuer: String,
    /// The sharing agreement it names.
    pub agreement: String,
    /// When it was issued.
    pub issued_at: Option<prost_types::Timestamp>,
    /// The agreement shares the planes as scanned.
    pub full_planes: bool,
    /// The agreement shares the planes averaged over n x n blocks: the largest n.
    pub downsampled: Option<u32>,
    /// The agreement shares an overlay PNG (and no planes).
    pub overlay: bool,
    /// The administration that scanned it, when the issuer re-shared it.
    pub first_origin: String,
}

/// The signed content of a stored received package.
fn read_package(blobs: &dyn BlobStore, p: &crate::store::ReceivedPackage) -> Result<PackageContent> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut blobs.open(&p.package_sha256)?, &mut bytes)
        .map_err(|e| Error::Internal(format!("reading received package {}: {e}", p.package_id)))?;
    ResultPackage::decode(bytes.as_slice())
        .and_then(|pkg| PackageContent::decode(pkg.content.as_slice()))
        .map_err(|e| Error::Internal(format!("stored package {} does not decode: {e}", p.package_id)))
}

/// The newest overlay PNG a partner shared for a foreign scan held without
/// its planes (agreement content `findings_overlay`), as it was signed.
fn shared_overlay(
    meta: &dyn MetadataStore,
    blobs: &dyn BlobStore,
    scan_id: &str,
) -> Result<Option<RenderOverlayResponse>> {
    for p in meta.received_packages(scan_id)?.iter().rev() {
        let content = read_package(blobs, p)?;
        if content.overlay_png.is_empty() {
            continue;
        }
        let info = png::Decoder::new(std::io::Cursor::new(&content.overlay_png))
            .read_info()
            .map_err(|e| Error::Internal(format!("shared overlay of {}: {e}", p.package_id)))?;
        let (width, height) = (info.info().width, info.info().height);
        return Ok(Some(RenderOverlayResponse { png: content.overlay_png, width, height, ..Default::default() }));
    }
    Ok(None)
}

fn planes_size(record: &ScanRecord, index: usize) -> Option<(u32, u32)> {
    record.header.planes.get(index).map(|d| (d.width, d.height))
}

type EventStream = Pin<Box<dyn Stream<Item = std::result::Result<FindingsEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Findings for FindingsService {
    async fn list_scans(
        &self,
        request: Request<ListScansRequest>,
    ) -> std::result::Result<Response<ListScansResponse>, Status> {
        let caller = Caller::of(&request);
        let scope = SiteScope::of(&request);
        let req = request.into_inner();
        // Searches for a container, declaration or plate are what an audit
        // of who looked for whom needs; the gate bounds the record's size.
        let object = [
            ("site", &req.site_id),
            ("container", &req.container_number),
            ("declaration", &req.declaration_reference),
            ("plate", &req.vehicle_plate),
        ]
        .iter()
        .filter(|(name, v)| *name == "site" || !v.is_empty())
        .map(|(name, v)| format!("{name}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
        let result = self.list(req, &scope).await;
        self.gate.reply(&caller, "ListScans", &object, result).await
    }

    async fn get_scan(&self, request: Request<GetScanRequest>) -> std::result::Result<Response<ScanDetail>, Status> {
        let caller = Caller::of(&request);
        let scope = SiteScope::of(&request);
        let id = request.into_inner().scan_id;
        let result = self.get(&id, &scope).await;
        self.gate.reply(&caller, "GetScan", &id, result).await
    }

    async fn get_findings(
        &self,
        request: Request<GetFindingsRequest>,
    ) -> std::result::Result<Response<ScanFindings>, Status> {
        let caller = Caller::of(&request);
        let scope = SiteScope::of(&request);
        let id = request.into_inner().scan_id;
        let result = self.findings(&id, &scope).await;
        self.gate.reply(&caller, "GetFindings", &id, result).await
    }

    async fn render_overlay(
        &self,
        request: Request<RenderOverlayRequest>,
    ) -> std::result::Result<Response<RenderOverlayResponse>, Status> {
        let caller = Caller::of(&request);
        let scope = SiteScope::of(&request);
        let req = request.into_inner();
        let id = req.scan_id.clone();
        let result = self.overlay(req, &scope).await;
        self.gate.reply(&caller, "RenderOverlay", &id, result).await
    }

    async fn adjudicate(
        &self,
        request: Request<AdjudicateRequest>,
    ) -> std::result::Result<Response<ThreatReport>, Status> {
        let caller = Caller::of(&request);
        let scope = SiteScope::of(&request);
        // The officer of record is who authenticated, never a name the client sends.
        let officer = request.extensions().get::<Caller>().map(|c| c.identity.clone());
        let req = request.into_inner();
        let id = req.scan_id.clone();
        let result = self.adjudicate(req, officer.as_deref(), &scope).await;
        self.gate.reply(&caller, "Adjudicate", &id, result).await
    }

    type WatchFindingsStream = EventStream;

    async fn watch_findings(
        &self,
        request: Request<WatchFindingsRequest>,
    ) -> std::result::Result<Response<Self::WatchFindingsStream>, Status> {
        let caller = Caller::of(&request);
        let scope = SiteScope::of(&request);
        let req = request.into_inner();
        let object = format!("cursor={}", req.cursor);
        let result = self.watch(req, &scope).await.map(|s| Box::pin(s) as EventStream);
        self.gate.reply(&caller, "WatchFindings", &object, result).await
    }

    async fn export_tdr(
        &self,
        request: Request<ExportTdrRequest>,
    ) -> std::result::Result<Response<ExportTdrResponse>, Status> {
        let caller = Caller::of(&request);
        let scope = SiteScope::of(&request);
        let req = request.into_inner();
        let id = req.scan_id.clone();
        let result = self.export_tdr(req, &scope).await;
        self.gate.reply(&caller, "ExportTdr", &id, result).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plate_filters_are_normalised_bounded_and_never_dropped_silently() {
        assert_eq!(plate_filter("").unwrap(), None);
        assert_eq!(plate_filter(" ").unwrap(), None);
        assert_eq!(plate_filter("ab-12 cd").unwrap(), Some(crate::store::plate_key("AB12CD")));
        assert!(matches!(plate_filter("---"), Err(Error::InvalidArgument(_))));
        assert!(matches!(plate_filter(&"A".repeat(MAX_PLATE_FILTER + 1)), Err(Error::InvalidArgument(_))));
    }
}
