//! Sharing results with partner administrations: sharing agreements,
//! redaction, signed result packages and the pull feed (`niix.v1.Exchange`).
//!
//! Packages are derived from the event log: every MACHINE or OPERATOR report
//! stored is an event, and a partner's feed is the events its agreement
//! entitles it to, each redacted and signed. A package's sequence number is
//! its event's, so a partner resumes from the last sequence it saw.

pub mod keys;

use std::pin::Pin;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use futures_util::Stream;
use niix_proto::v1::exchange_server::Exchange;
use niix_proto::v1::{
    AlarmDecision, ConveyanceType, GetPackageRequest, PackageContent, RenderOverlayRequest, ReportType, ResultPackage,
    ScanMetadata, SubscribeRequest, ThreatReport,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::audit::{Caller, Gate};
use crate::error::{Error, Result, blocking};
use crate::findings::{EventSignal, render_scan, timestamp, wait_for_events};
use crate::store::{BlobStore, MetadataStore, ScanRecord, StoredEvent};

/// What a partner receives besides the findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    /// Metadata and reports only.
    #[default]
    Findings,
    /// Plus the overlay PNG (1024 px wide) of the analysed plane.
    FindingsOverlay,
}

/// Metadata fields an agreement can withhold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Redact {
    /// `metadata.vehicle_plate`.
    VehiclePlate,
    /// `metadata.declarations` (UCR/MRN).
    Declarations,
    /// `operator_id` of OPERATOR reports.
    OfficerIds,
    /// Free text: `metadata.remarks`, report and region comments.
    FreeText,
    /// `metadata.container_numbers`.
    ContainerNumbers,
    /// `metadata.scanner` (make, model, serial).
    Scanner,
}

/// One sharing agreement with one partner administration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Agreement {
    /// Agreement reference, e.g. "NL-DE-2026-01".
    pub name: String,
    /// The partner's identity (an `[[auth.tokens]]` identity with role partner).
    pub partner: String,
    /// Only scans from these sites (empty: all).
    #[serde(default)]
    pub sites: Vec<String>,
    /// Only these conveyances: container, truck, rail_wagon, parcel, baggage, vehicle (empty: all).
    #[serde(default)]
    pub conveyances: Vec<String>,
    /// Only these machine decisions: alarm, clear, unknown (empty: all).
    #[serde(default)]
    pub decisions: Vec<String>,
    /// What is shared besides metadata and reports.
    #[serde(default)]
    pub content: Content,
    /// Fields withheld.
    #[serde(default)]
    pub redact: Vec<Redact>,
    /// Share officers' OPERATOR reports too.
    #[serde(default)]
    pub operator_reports: bool,
}

/// The `[exchange]` section of the configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ExchangeConfig {
    /// This administration's id in packages, e.g. "NL".
    pub administration: String,
    /// The Ed25519 signing key (`niix keys init`).
    pub signing_key: Option<std::path::PathBuf>,
    /// One entry per partner.
    pub agreements: Vec<Agreement>,
}

fn lower_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix).unwrap_or(full).to_ascii_lowercase()
}

impl Agreement {
    /// True when a report event on `scan` is shared under this agreement.
    pub fn entitles(&self, scan: &ScanRecord, report: &ThreatReport) -> bool {
        let meta = scan.header.metadata.clone().unwrap_or_default();
        if !self.sites.is_empty() && !self.sites.contains(&meta.site_id) {
            return false;
        }
        let conveyance = ConveyanceType::try_from(meta.conveyance).map(|c| c.as_str_name()).unwrap_or("");
        if !self.conveyances.is_empty() && !self.conveyances.contains(&lower_name(conveyance, "CONVEYANCE_TYPE_")) {
            return false;
        }
        let is_operator = report.r#type == ReportType::Operator as i32;
        if is_operator && !self.operator_reports {
            return false;
        }
        let machine_decision = if is_operator { scan.decision } else { report.decision };
        let decision = AlarmDecision::try_from(machine_decision).map(|d| d.as_str_name()).unwrap_or("");
        self.decisions.is_empty() || self.decisions.contains(&lower_name(decision, "ALARM_DECISION_"))
    }

    /// Withholds the agreed fields, before signing.
    pub fn redact(&self, meta: &mut ScanMetadata, reports: &mut [ThreatReport]) {
        for r in &self.redact {
            match r {
                Redact::VehiclePlate => meta.vehicle_plate.clear(),
                Redact::Declarations => meta.declarations.clear(),
                Redact::ContainerNumbers => meta.container_numbers.clear(),
                Redact::Scanner => meta.scanner = None,
                Redact::OfficerIds => reports.iter_mut().for_each(|rep| rep.operator_id.clear()),
                Redact::FreeText => {
                    meta.remarks.clear();
                    for rep in reports.iter_mut() {
                        rep.comment.clear();
                        rep.regions.iter_mut().for_each(|g| g.comment.clear());
                    }
                }
            }
        }
    }
}

/// Package id of a partner's package at a sequence.
pub fn package_id(issuer: &str, recipient: &str, sequence: u64) -> String {
    format!("{issuer}.{recipient}.{sequence}")
}

/// Makes and signs packages, and serves the feed.
#[derive(Clone)]
pub struct ExchangeService {
    meta: Arc<dyn MetadataStore>,
    blobs: Arc<dyn BlobStore>,
    config: Arc<ExchangeConfig>,
    key: Option<Arc<SigningKey>>,
    gate: Gate,
    events: EventSignal,
    stop: watch::Receiver<bool>,
}

impl ExchangeService {
    /// Creates the service; loads the signing key if one is configured.
    pub fn new(
        meta: Arc<dyn MetadataStore>,
        blobs: Arc<dyn BlobStore>,
        config: ExchangeConfig,
        gate: Gate,
        events: EventSignal,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let key = match &config.signing_key {
            Some(p) => Some(Arc::new(keys::load(p)?)),
            None => None,
        };
        if !config.agreements.is_empty() {
            anyhow::ensure!(
                key.is_some(),
                "[exchange] has agreements but no signing_key (make one with `niix keys init`)"
            );
            anyhow::ensure!(!config.administration.is_empty(), "[exchange] administration is not set (e.g. \"NL\")");
        }
        Ok(ExchangeService { meta, blobs, config: Arc::new(config), key, gate, events, stop })
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
    fn package(&self, agreement: &Agreement, event: &StoredEvent) -> Result<Option<ResultPackage>> {
        let Some(record) = self.meta.get_scan(&event.scan_id)? else { return Ok(None) };
        if !agreement.entitles(&record, &event.report) {
            return Ok(None);
        }
        let key = self.key.as_ref().ok_or_else(|| Error::FailedPrecondition("no signing key configured".into()))?;
        let mut meta = record.header.metadata.clone().unwrap_or_default();
        let mut reports = vec![event.report.clone()];
        agreement.redact(&mut meta, &mut reports);
        let overlay_png = match agreement.content {
            Content::Findings => Vec::new(),
            Content::FindingsOverlay => {
                let all = self.meta.reports(&record.scan_id)?;
                let req = RenderOverlayRequest {
                    scan_id: record.scan_id.clone(),
                    plane_index: event.report.plane_index,
                    max_width: 1024,
                    ..Default::default()
                };
                render_scan(self.blobs.as_ref(), &record, &all, &req)?.png
            }
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
            planes: record.header.planes.clone(),
            reports,
            overlay_png,
        };
        Ok(Some(keys::sign(key, &content)))
    }

    /// One package by id, for its partner.
    pub async fn get_package(&self, caller: &Caller, id: &str) -> Result<ResultPackage> {
        let agreement = self.agreement_of(caller)?;
        let prefix = format!("{}.{}.", self.config.administration, agreement.partner);
        let seq: u64 = id
            .strip_prefix(&prefix)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::NotFound(format!("no package {id} for {}", agreement.partner)))?;
        let this = self.clone();
        let id = id.to_string();
        blocking(move || {
            let event = this.meta.events_after(seq - 1, None, 1)?.into_iter().find(|e| e.seq == seq);
            match event {
                Some(e) => this.package(&agreement, &e)?.ok_or_else(|| Error::NotFound(format!("no package {id}"))),
                None => Err(Error::NotFound(format!("no package {id}"))),
            }
        })
        .await
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
                let (t, a) = (this.clone(), agreement.clone());
                let batch = blocking(move || {
                    let events = t.meta.events_after(cursor, None, 64)?;
                    let full = events.len() == 64;
                    let mut out = Vec::new();
                    for e in events {
                        let seq = e.seq;
                        out.push((seq, t.package(&a, &e)?));
                    }
                    Ok((out, full))
                })
                .await;
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
}

type PackageStream = Pin<Box<dyn Stream<Item = std::result::Result<ResultPackage, Status>> + Send>>;

#[tonic::async_trait]
impl Exchange for ExchangeService {
    type SubscribeStream = PackageStream;

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
}

#[cfg(test)]
mod tests {
    use niix_proto::v1::{DeclarationReference, Region, ScanHeader, Scanner};

    use super::*;

    fn agreement(redact: Vec<Redact>) -> Agreement {
        Agreement {
            name: "NL-DE".into(),
            partner: "DE".into(),
            sites: vec!["NLRTM".into()],
            conveyances: vec!["container".into()],
            decisions: vec!["alarm".into()],
            content: Content::Findings,
            redact,
            operator_reports: false,
        }
    }

    fn scan(site: &str, conveyance: ConveyanceType, decision: AlarmDecision) -> ScanRecord {
        ScanRecord {
            scan_id: "s".into(),
            header: ScanHeader {
                scan_id: "s".into(),
                metadata: Some(ScanMetadata {
                    site_id: site.into(),
                    conveyance: conveyance as i32,
                    ..Default::default()
                }),
                planes: vec![],
            },
            planes: vec![],
            header_sha256: String::new(),
            status: niix_proto::v1::ScanStatus::Analyzed,
            received_at: std::time::SystemTime::now(),
            decision: decision as i32,
            score: None,
        }
    }

    fn machine(decision: AlarmDecision) -> ThreatReport {
        ThreatReport { r#type: ReportType::Machine as i32, decision: decision as i32, ..Default::default() }
    }

    #[test]
    fn entitlement_follows_site_conveyance_decision_and_report_type() {
        let a = agreement(vec![]);
        let alarm = AlarmDecision::Alarm;
        assert!(a.entitles(&scan("NLRTM", ConveyanceType::Container, alarm), &machine(alarm)));
        assert!(!a.entitles(&scan("DEHAM", ConveyanceType::Container, alarm), &machine(alarm)));
        assert!(!a.entitles(&scan("NLRTM", ConveyanceType::Truck, alarm), &machine(alarm)));
        assert!(!a.entitles(&scan("NLRTM", ConveyanceType::Container, alarm), &machine(AlarmDecision::Clear)));
        let operator = ThreatReport { r#type: ReportType::Operator as i32, ..Default::default() };
        assert!(!a.entitles(&scan("NLRTM", ConveyanceType::Container, alarm), &operator));
        let b = Agreement { operator_reports: true, ..a };
        assert!(b.entitles(&scan("NLRTM", ConveyanceType::Container, alarm), &operator));
    }

    #[test]
    fn each_redaction_removes_exactly_its_field() {
        let full = ScanMetadata {
            site_id: "NLRTM".into(),
            vehicle_plate: "XX-123-Y".into(),
            declarations: vec![DeclarationReference { kind: 2, value: "MRN1".into() }],
            container_numbers: vec!["CSQU3054383".into()],
            scanner: Some(Scanner { serial_number: "S1".into(), ..Default::default() }),
            remarks: "seal broken".into(),
            ..Default::default()
        };
        let report = ThreatReport {
            operator_id: "NL-4711".into(),
            comment: "looks like a weapon".into(),
            regions: vec![Region { comment: "barrel".into(), ..Default::default() }],
            ..Default::default()
        };
        type Removed = fn(&ScanMetadata, &ThreatReport) -> bool;
        let cases: [(Redact, Removed); 6] = [
            (Redact::VehiclePlate, |m, _| m.vehicle_plate.is_empty()),
            (Redact::Declarations, |m, _| m.declarations.is_empty()),
            (Redact::ContainerNumbers, |m, _| m.container_numbers.is_empty()),
            (Redact::Scanner, |m, _| m.scanner.is_none()),
            (Redact::OfficerIds, |_, r| r.operator_id.is_empty()),
            (Redact::FreeText, |m, r| m.remarks.is_empty() && r.comment.is_empty() && r.regions[0].comment.is_empty()),
        ];
        for (field, removed) in cases {
            let mut m = full.clone();
            let mut r = [report.clone()];
            agreement(vec![field]).redact(&mut m, &mut r);
            assert!(removed(&m, &r[0]), "{field:?} not removed");
            // Every other field is untouched.
            for (other, gone) in cases {
                if other != field {
                    assert!(!gone(&m, &r[0]), "{field:?} also removed {other:?}");
                }
            }
            assert_eq!(m.site_id, "NLRTM");
        }
    }
}
