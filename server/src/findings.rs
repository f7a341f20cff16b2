//! The `Findings` service: what officers use. Query scans, read findings,
//! see overlays, adjudicate, watch new results live, export DICOS TDRs.

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
use crate::header::canonical_scan_id;
use crate::overlay::{OverlayOptions, decode_map_png, render_plane};
use crate::store::{BlobStore, MetadataStore, ScanQuery, ScanRecord, StoredEvent};

/// Default page of `ListScans`.
pub const DEFAULT_PAGE: usize = 100;
/// Largest page of `ListScans`.
pub const MAX_PAGE: usize = 1000;
/// Events read from the store per round by a watcher.
const WATCH_BATCH: usize = 256;

/// Tells watchers the newest event's sequence number.
pub type EventSignal = Arc<watch::Sender<u64>>;

/// How long a caught-up stream waits before looking at the event log again
/// even without a signal.
const EVENT_POLL: Duration = Duration::from_secs(5);

/// Waits, for a caught-up stream, until a new event is signalled. Returns
/// false when the stream must end: its client went away, or the server is
/// shutting down (the client is told to resume from its cursor).
pub async fn wait_for_events<T>(
    signal: &mut watch::Receiver<u64>,
    tx: &mpsc::Sender<std::result::Result<T, Status>>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        _ = signal.changed() => true,
        _ = tx.closed() => false,
        _ = async { drop(stop.wait_for(|s| *s).await) } => {
            let _ = tx.send(Err(Status::unavailable("the server is shutting down; resume from your cursor"))).await;
            false
        }
        _ = tokio::time::sleep(EVENT_POLL) => true,
    }
}

/// `niix.v1.Findings` over the store.
#[derive(Clone)]
pub struct FindingsService {
    meta: Arc<dyn MetadataStore>,
    blobs: Arc<dyn BlobStore>,
    gate: Gate,
    events: EventSignal,
    stop: watch::Receiver<bool>,
}

/// Converts a time to a protobuf timestamp.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

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

/// Page tokens are "<scan time micros>.<scan id>" of the last scan returned.
fn encode_token(r: &ScanRecord) -> String {
    let us = r.sort_time().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros();
    format!("{us}.{}", r.scan_id)
}

fn decode_token(token: &str) -> Result<(SystemTime, String)> {
    let bad = || Error::InvalidArgument(format!("page_token {token:?} is not one this server issued"));
    let (us, id) = token.split_once('.').ok_or_else(bad)?;
    let us: u64 = us.parse().map_err(|_| bad())?;
    Ok((UNIX_EPOCH + Duration::from_micros(us), id.to_string()))
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
        FindingsService { meta, blobs, gate, events, stop }
    }

    async fn record(&self, scan_id: &str) -> Result<(ScanRecord, Vec<ThreatReport>)> {
        let id = canonical_scan_id(scan_id)?;
        let meta = self.meta.clone();
        let lookup = id.clone();
        let found = blocking(move || {
            let Some(scan) = meta.get_scan(&lookup)? else { return Ok(None) };
            let reports = meta.reports(&lookup)?;
            Ok(Some((scan, reports)))
        })
        .await?;
        found.ok_or_else(|| Error::NotFound(format!("no scan {id} is stored")))
    }

    /// Lists scans (used by the gRPC method).
    pub async fn list(&self, req: ListScansRequest) -> Result<ListScansResponse> {
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
        let query = ScanQuery {
            limit: limit + 1,
            before: if req.page_token.is_empty() { None } else { Some(decode_token(&req.page_token)?) },
            site_id: non_empty(req.site_id),
            lane_id: non_empty(req.lane_id),
            status,
            received_after: req.received_after.as_ref().map(system_time),
            scan_time_from: req.scan_time_from.as_ref().map(system_time),
            scan_time_to: req.scan_time_to.as_ref().map(system_time),
            decision,
            min_score: req.min_score,
            container_number: non_empty(req.container_number),
            declaration_reference: non_empty(req.declaration_reference),
        };
        let meta = self.meta.clone();
        let mut rows = blocking(move || Ok(meta.list_scans(&query)?)).await?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => encode_token(last),
            _ => String::new(),
        };
        Ok(ListScansResponse { scans: rows.iter().map(scan_message).collect(), next_page_token })
    }

    /// A scan with its findings.
    pub async fn get(&self, scan_id: &str) -> Result<ScanDetail> {
        let (record, reports) = self.record(scan_id).await?;
        let findings = ScanFindings { scan_id: record.scan_id.clone(), status: record.status as i32, reports };
        Ok(ScanDetail { scan: Some(scan_message(&record)), findings: Some(findings) })
    }

    /// A scan's status and reports.
    pub async fn findings(&self, scan_id: &str) -> Result<ScanFindings> {
        let (record, reports) = self.record(scan_id).await?;
        Ok(ScanFindings { scan_id: record.scan_id, status: record.status as i32, reports })
    }

    /// Renders a plane with its findings.
    pub async fn overlay(&self, req: RenderOverlayRequest) -> Result<RenderOverlayResponse> {
        let (record, reports) = self.record(&req.scan_id).await?;
        let (meta, blobs) = (self.meta.clone(), self.blobs.clone());
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
    pub async fn adjudicate(&self, req: AdjudicateRequest) -> Result<ThreatReport> {
        let (record, reports) = self.record(&req.scan_id).await?;
        let report = operator_report(latest(&reports, ReportType::Machine).map(|(_, r)| r), &req)?;
        let meta = self.meta.clone();
        let stored = report.clone();
        let seq = blocking(move || Ok(meta.add_report(&record.scan_id, &stored, None)?)).await?;
        self.events.send_replace(seq);
        tracing::info!(scan_id = %req.scan_id, officer = %report.operator_id, verdict = report.verdict, "scan adjudicated");
        Ok(report)
    }

    /// The stream of new reports after a cursor.
    pub async fn watch(
        &self,
        req: WatchFindingsRequest,
    ) -> Result<ReceiverStream<std::result::Result<FindingsEvent, Status>>> {
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
    pub async fn export_tdr(&self, req: ExportTdrRequest) -> Result<ExportTdrResponse> {
        let (record, reports) = self.record(&req.scan_id).await?;
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
            let dicos_uid = match record.header.planes.get(plane) {
                Some(d) if d.encoding == PlaneEncoding::Dicos as i32 => {
                    niix_inference::dicos::probe(blobs.open(&record.planes[plane].sha256)?)
                        .ok()
                        .map(|i| i.sop_instance_uid)
                        .filter(|u| !u.is_empty())
                }
                _ => None,
            };
            let image_uid = crate::tdr::plane_instance_uid(&record, plane, dicos_uid);
            let (dicos, sop_instance_uid) = crate::tdr::export(&record, &report, index, &image_uid)?;
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
    let mut input = crate::analysis::stored_plane(record, index, blobs)?;
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
    let options = OverlayOptions { max_width: req.max_width, window, heat: !req.hide_heat, boxes: !req.hide_boxes };
    let o = render_plane(&mut input, map.as_ref().map(|(m, s)| (m, *s)), &regions, &options)?;
    Ok(RenderOverlayResponse {
        png: o.png,
        width: o.width,
        height: o.height,
        window_low: u32::from(o.window.0),
        window_high: u32::from(o.window.1),
    })
}

/// The newest overlay PNG a partner shared for a foreign scan held without
/// its planes (agreement content `findings_overlay`), as it was signed.
fn shared_overlay(
    meta: &dyn MetadataStore,
    blobs: &dyn BlobStore,
    scan_id: &str,
) -> Result<Option<RenderOverlayResponse>> {
    for p in meta.received_packages(scan_id)?.iter().rev() {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut blobs.open(&p.package_sha256)?, &mut bytes)
            .map_err(|e| Error::Internal(format!("reading received package {}: {e}", p.package_id)))?;
        let content = ResultPackage::decode(bytes.as_slice())
            .and_then(|pkg| PackageContent::decode(pkg.content.as_slice()))
            .map_err(|e| Error::Internal(format!("stored package {} does not decode: {e}", p.package_id)))?;
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
        let req = request.into_inner();
        let object = format!("site={}", req.site_id);
        let result = self.list(req).await;
        self.gate.reply(&caller, "ListScans", &object, result).await
    }

    async fn get_scan(&self, request: Request<GetScanRequest>) -> std::result::Result<Response<ScanDetail>, Status> {
        let caller = Caller::of(&request);
        let id = request.into_inner().scan_id;
        let result = self.get(&id).await;
        self.gate.reply(&caller, "GetScan", &id, result).await
    }

    async fn get_findings(
        &self,
        request: Request<GetFindingsRequest>,
    ) -> std::result::Result<Response<ScanFindings>, Status> {
        let caller = Caller::of(&request);
        let id = request.into_inner().scan_id;
        let result = self.findings(&id).await;
        self.gate.reply(&caller, "GetFindings", &id, result).await
    }

    async fn render_overlay(
        &self,
        request: Request<RenderOverlayRequest>,
    ) -> std::result::Result<Response<RenderOverlayResponse>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let id = req.scan_id.clone();
        let result = self.overlay(req).await;
        self.gate.reply(&caller, "RenderOverlay", &id, result).await
    }

    async fn adjudicate(
        &self,
        request: Request<AdjudicateRequest>,
    ) -> std::result::Result<Response<ThreatReport>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let id = req.scan_id.clone();
        let result = self.adjudicate(req).await;
        self.gate.reply(&caller, "Adjudicate", &id, result).await
    }

    type WatchFindingsStream = EventStream;

    async fn watch_findings(
        &self,
        request: Request<WatchFindingsRequest>,
    ) -> std::result::Result<Response<Self::WatchFindingsStream>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let object = format!("cursor={}", req.cursor);
        let result = self.watch(req).await.map(|s| Box::pin(s) as EventStream);
        self.gate.reply(&caller, "WatchFindings", &object, result).await
    }

    async fn export_tdr(
        &self,
        request: Request<ExportTdrRequest>,
    ) -> std::result::Result<Response<ExportTdrResponse>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        let id = req.scan_id.clone();
        let result = self.export_tdr(req).await;
        self.gate.reply(&caller, "ExportTdr", &id, result).await
    }
}
