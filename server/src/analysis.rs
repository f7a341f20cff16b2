//! Analysis of stored scans: a durable queue (the scans' QUEUED status in
//! the metadata store), workers that take one scan at a time, and the
//! conversion of the tensor core's result into a DICOS-aligned MACHINE
//! report.
//!
//! Pushes never wait for analysis: a committed scan is QUEUED and a worker
//! is woken. However many scans are queued, only `workers` are decoded at a
//! time, so memory stays bounded. Scans left ANALYZING by a crash go back to
//! the queue at start.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use niix_inference::model::Model;
use niix_inference::orientation::LengthAxis;
use niix_inference::pipeline::{self, Analysis, PlaneInput};
use niix_proto::v1::{
    AlarmDecision, Algorithm, AssessmentFlag, Orientation, Region, ReportType, ScanStatus, ThreatReport,
};
use tokio::sync::{Notify, watch};

use crate::error::{Error, Result, blocking};
use crate::events::{EventSignal, timestamp};
use crate::metrics::{AnalysisLabels, Metrics};
use crate::model_choice::{Chosen, FellBack, ModelChoice};
use crate::plane::{encode_map_png, plane_kind_name, stored_plane};
use crate::store::{BlobStore, MetadataStore, ScanRecord};

/// How long an idle worker sleeps before looking at the queue again (it is
/// also woken at once by every new scan).
const IDLE_POLL: Duration = Duration::from_secs(2);
/// Scores at or above this are HIGH_THREAT rather than THREAT.
pub const HIGH_THREAT_SCORE: f32 = 0.9;

/// Takes queued scans and analyses each with the model [`ModelChoice`]
/// picks for its planes.
pub struct Analyzer {
    meta: Arc<dyn MetadataStore>,
    blobs: Arc<dyn BlobStore>,
    choice: Arc<ModelChoice>,
    wake: Arc<Notify>,
    metrics: Metrics,
    events: EventSignal,
}

impl Analyzer {
    /// Creates an analyzer; `wake` is notified by ingest for each new scan.
    pub fn new(
        meta: Arc<dyn MetadataStore>,
        blobs: Arc<dyn BlobStore>,
        choice: Arc<ModelChoice>,
        wake: Arc<Notify>,
        metrics: Metrics,
        events: EventSignal,
    ) -> Self {
        Analyzer { meta, blobs, choice, wake, metrics, events }
    }

    /// The model that analyses the scans it can read now: the configured
    /// one, else the only (or first by name) serving model. Scans wait in
    /// the queue while there is none.
    pub fn model(&self) -> Option<Arc<Model>> {
        self.choice.primary()
    }

    async fn update_queue_depth(&self) {
        let meta = self.meta.clone();
        if let Ok(n) = blocking(move || Ok(meta.count_status(ScanStatus::Queued)?)).await {
            self.metrics.analysis_queue_depth.set(n as i64);
        }
    }

    /// Runs one worker until `stop` turns true.
    pub async fn run_worker(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut warned = false;
        loop {
            if *stop.borrow() {
                return;
            }
            let model = self.model();
            if model.is_none() && !warned {
                tracing::warn!(models = %self.choice.repo().root().display(), "no model serving: scans stay queued until one is");
                warned = true;
            }
            let claimed = match &model {
                Some(_) => {
                    let meta = self.meta.clone();
                    match blocking(move || Ok(meta.claim_next_queued()?)).await {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot read the analysis queue");
                            None
                        }
                    }
                }
                None => None,
            };
            match (model, claimed) {
                (Some(model), Some(scan_id)) => {
                    warned = false;
                    self.update_queue_depth().await;
                    if let Err(e) = self.analyze_one(model, &scan_id).await {
                        tracing::error!(%scan_id, error = %e, "could not record the analysis");
                    }
                    self.update_queue_depth().await;
                }
                _ => {
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(IDLE_POLL) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
    }

    /// Analyses one claimed scan with `model` (the configured model), or
    /// the fallback its planes call for, and stores its MACHINE report.
    pub async fn analyze_one(&self, model: Arc<Model>, scan_id: &str) -> Result<()> {
        let started = Instant::now();
        let (meta, blobs, id) = (self.meta.clone(), self.blobs.clone(), scan_id.to_string());
        let (choice, configured) = (self.choice.clone(), model.clone());
        let outcome = blocking(move || {
            let Some(record) = meta.get_scan(&id)? else {
                return Err(Error::NotFound(format!("scan {id} vanished before analysis")));
            };
            let kinds: Vec<String> = record.header.planes.iter().map(|p| plane_kind_name(p.kind)).collect();
            let chosen = match choice.for_planes(&configured, &kinds.iter().map(String::as_str).collect::<Vec<_>>()) {
                Ok(chosen) => chosen,
                Err(why) => return Ok(Err(why)),
            };
            if let Some(f) = &chosen.fell_back {
                tracing::info!(scan_id = %id, model = %chosen.model.label(), fallback_from = %f.from,
                    reason = %f.reason, "the configured model cannot read this scan: a fallback analyses it");
            }
            let planes = plane_inputs(&record, blobs.as_ref())?;
            let result = pipeline::analyze_oriented(&chosen.model, planes, length_along(&record));
            // Keep the anomaly map for overlays: 8-bit grey PNG, content-addressed.
            let map = match &result {
                Ok(a) => Some(blobs.put_blob(&encode_map_png(&a.map))?),
                Err(_) => None,
            };
            Ok(Ok((record, chosen, result.map(|a| (a, map)))))
        })
        .await;
        let elapsed = started.elapsed();
        let (report, status) = match outcome {
            Ok(Ok((record, Chosen { model, fell_back }, Ok((analysis, map))))) => {
                let t = &analysis.timings;
                tracing::info!(%scan_id, model = %model.label(), score = analysis.score, regions = analysis.regions.len(),
                    seconds = elapsed.as_secs_f64(), decode_s = t.decode.as_secs_f64(), infer_s = t.infer.as_secs_f64(),
                    stitch_s = t.stitch.as_secs_f64(), "scan analysed");
                let mut report = machine_report(&model, &record, &analysis, elapsed);
                report.anomaly_map_sha256 = map.unwrap_or_default();
                report.anomaly_map_stride = analysis.stride as u32;
                (with_fallback(report, fell_back), ScanStatus::Analyzed)
            }
            Ok(Ok((_, Chosen { model, fell_back }, Err(e)))) => {
                tracing::warn!(%scan_id, error = %e, "analysis aborted");
                (with_fallback(abort_report(&model, e.to_string(), elapsed), fell_back), ScanStatus::Failed)
            }
            // No model may read the scan's planes.
            Ok(Err(why)) => {
                tracing::warn!(%scan_id, error = %why, "analysis aborted");
                (abort_report(&model, why, elapsed), ScanStatus::Failed)
            }
            Err(e) => {
                tracing::warn!(%scan_id, error = %e, "analysis aborted");
                (abort_report(&model, e.to_string(), elapsed), ScanStatus::Failed)
            }
        };
        self.record(scan_id, report, status, elapsed).await
    }

    /// Counts a finished analysis and stores its report.
    async fn record(&self, scan_id: &str, report: ThreatReport, status: ScanStatus, elapsed: Duration) -> Result<()> {
        let outcome = if status == ScanStatus::Analyzed { "analyzed" } else { "failed" };
        self.metrics.analyses.get_or_create(&AnalysisLabels { outcome: outcome.into() }).inc();
        self.metrics.analysis_seconds.observe(elapsed.as_secs_f64());
        let (meta, id) = (self.meta.clone(), scan_id.to_string());
        let seq = blocking(move || Ok(meta.add_report(&id, &report, Some(status))?)).await?;
        self.events.send_replace(seq);
        Ok(())
    }
}

/// A report of a scan another model than the configured one analysed says so.
fn with_fallback(mut report: ThreatReport, fell_back: Option<FellBack>) -> ThreatReport {
    if let Some(FellBack { from, reason }) = fell_back {
        (report.fallback_from, report.fallback_reason) = (from, reason);
    }
    report
}

/// The axis the scan's metadata says its conveyance's length runs along,
/// if it says (otherwise the analysis takes the image's longer side).
pub fn length_along(record: &ScanRecord) -> Option<LengthAxis> {
    let stated = record.header.metadata.as_ref().map_or(0, |m| m.orientation);
    match Orientation::try_from(stated) {
        Ok(Orientation::LengthAlongX) => Some(LengthAxis::X),
        Ok(Orientation::LengthAlongY) => Some(LengthAxis::Y),
        Ok(Orientation::Unspecified) | Err(_) => None,
    }
}

/// Opens every stored plane of a scan for the pipeline.
fn plane_inputs(record: &ScanRecord, blobs: &dyn BlobStore) -> Result<Vec<PlaneInput>> {
    (0..record.planes.len()).map(|i| stored_plane(record, i, blobs)).collect()
}

fn algorithm(model: &Model) -> Algorithm {
    Algorithm {
        name: model.name.clone(),
        version: model.version.to_string(),
        sha256: model.sha256.clone(),
        manufacturer: model.manifest.manufacturer.clone(),
        description: model.manifest.description.clone(),
        demo: model.manifest.demo,
    }
}

/// The MACHINE report of a finished analysis. Boxes in millimetres follow
/// the pixel spacing of the plane the regions refer to, along each axis of
/// the scan as stored (a scan analysed transposed has its regions back in
/// that frame).
pub fn machine_report(model: &Model, record: &ScanRecord, a: &Analysis, elapsed: Duration) -> ThreatReport {
    let plane_index = a.planes.first().copied().unwrap_or(0);
    let (sx, sy) = record
        .header
        .planes
        .get(plane_index)
        .map(|d| (d.pixel_spacing_x_mm, d.pixel_spacing_y_mm))
        .unwrap_or((0.0, 0.0));
    let category = model.manifest.decision.category.clone();
    let regions = a
        .regions
        .iter()
        .map(|r| Region {
            id: r.id,
            x: r.x,
            y: r.y,
            width: r.width,
            height: r.height,
            x_mm: f64::from(r.x) * sx,
            y_mm: f64::from(r.y) * sy,
            width_mm: f64::from(r.width) * sx,
            height_mm: f64::from(r.height) * sy,
            area_px: r.area,
            max_score: r.max_score,
            mean_score: r.mean_score,
            threat_category: category.clone(),
            assessment_flag: if r.max_score >= HIGH_THREAT_SCORE {
                AssessmentFlag::HighThreat
            } else {
                AssessmentFlag::Threat
            } as i32,
            assessment_probability: r.max_score,
            ..Default::default()
        })
        .collect();
    ThreatReport {
        r#type: ReportType::Machine as i32,
        decision: if a.alarm { AlarmDecision::Alarm } else { AlarmDecision::Clear } as i32,
        decision_time: Some(timestamp(SystemTime::now())),
        score: a.score,
        aborted: false,
        abort_reason: String::new(),
        processing_seconds: elapsed.as_secs_f64(),
        algorithm: Some(algorithm(model)),
        regions,
        plane_index: plane_index as u32,
        ..Default::default()
    }
}

/// The MACHINE report of an analysis that could not be done.
pub fn abort_report(model: &Model, reason: String, elapsed: Duration) -> ThreatReport {
    ThreatReport {
        r#type: ReportType::Machine as i32,
        decision: AlarmDecision::Unknown as i32,
        decision_time: Some(timestamp(SystemTime::now())),
        aborted: true,
        abort_reason: reason,
        processing_seconds: elapsed.as_secs_f64(),
        algorithm: Some(algorithm(model)),
        ..Default::default()
    }
}
