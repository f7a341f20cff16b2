//! Sharing agreements: what one partner administration is entitled to,
//! and which fields are withheld before signing.

use std::path::PathBuf;

use niix_proto::v1::{AlarmDecision, ConveyanceType, ReportType, ScanMetadata, ThreatReport};
use serde::{Deserialize, Serialize};

use crate::store::ScanRecord;

/// What a partner receives besides the findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    /// Metadata and reports only.
    #[default]
    Findings,
    /// Plus the overlay PNG (1024 px wide) of the analysed plane.
    FindingsOverlay,
    /// Plus every plane downsampled (16-bit PNG, at most `plane_width` wide).
    FindingsPlanes,
    /// Plus every plane's original bytes (fetched with `GetPlane`, or pushed
    /// after the package), checked against the signed digests.
    FullPlanes,
}

/// Metadata fields an agreement can withhold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Redact {
    /// `metadata.vehicle_plate`.
    VehiclePlate,
    /// `metadata.declarations` (UCR/MRN).
    Declarations,
    /// `operator_id` and `operator_name` of OPERATOR reports.
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
    /// Largest width of downsampled planes (`content = "findings_planes"`).
    #[serde(default = "default_plane_width")]
    pub plane_width: u32,
    /// Re-share scans this administration received from other partners
    /// (never, unless set).
    #[serde(default)]
    pub share_foreign: bool,
    /// Push packages to the partner's niix (`Exchange.Receive`) instead of
    /// waiting for it to pull them.
    #[serde(default)]
    pub push: Option<PushTarget>,
}

fn default_plane_width() -> u32 {
    512
}

impl Default for Agreement {
    /// An agreement that shares everything, findings only, with nobody yet.
    fn default() -> Self {
        Agreement {
            name: String::new(),
            partner: String::new(),
            sites: Vec::new(),
            conveyances: Vec::new(),
            decisions: Vec::new(),
            content: Content::default(),
            redact: Vec::new(),
            operator_reports: false,
            plane_width: default_plane_width(),
            share_foreign: false,
            push: None,
        }
    }
}

/// Where and how to push packages to a partner's niix.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PushTarget {
    /// The partner's niix, e.g. "https://niix.douane.example:50051".
    pub endpoint: String,
    /// CA certificate (PEM) of the partner's server certificate.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// This administration's client certificate (PEM) for mutual TLS.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Server name to expect in the partner's certificate, if not the endpoint's host.
    #[serde(default)]
    pub domain: Option<String>,
    /// File holding a bearer token the partner issued, instead of (or besides) a certificate.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

fn lower_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix).unwrap_or(full).to_ascii_lowercase()
}

impl Agreement {
    /// True when a report event on `scan` is shared under this agreement.
    pub fn entitles(&self, scan: &ScanRecord, report: &ThreatReport) -> bool {
        if !scan.origin.is_empty() && !self.share_foreign {
            return false;
        }
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
                Redact::OfficerIds => reports.iter_mut().for_each(|rep| {
                    rep.operator_id.clear();
                    rep.operator_name.clear();
                }),
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
            plane_width: default_plane_width(),
            share_foreign: false,
            push: None,
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
            origin: String::new(),
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
        let b = Agreement { operator_reports: true, ..a.clone() };
        assert!(b.entitles(&scan("NLRTM", ConveyanceType::Container, alarm), &operator));
        // A scan received from another administration is not passed on...
        let foreign = ScanRecord { origin: "BE".into(), ..scan("NLRTM", ConveyanceType::Container, alarm) };
        assert!(!a.entitles(&foreign, &machine(alarm)));
        // ...unless the agreement says so.
        let c = Agreement { share_foreign: true, ..a };
        assert!(c.entitles(&foreign, &machine(alarm)));
    }

    #[test]
    fn agreements_parse_from_toml_with_defaults() {
        let a: Agreement = toml::from_str(
            "name = \"NL-DE\"\npartner = \"DE\"\ncontent = \"full_planes\"\nredact = [\"vehicle_plate\"]\n\
             [push]\nendpoint = \"https://de:50051\"\nca = \"de-ca.pem\"\n",
        )
        .unwrap();
        assert_eq!(a.content, Content::FullPlanes);
        assert_eq!(a.redact, vec![Redact::VehiclePlate]);
        assert_eq!(a.plane_width, 512);
        assert!(!a.share_foreign);
        assert_eq!(a.push.unwrap().endpoint, "https://de:50051");
        let e = toml::from_str::<Agreement>("name = \"x\"\npartner = \"DE\"\ncontent = \"everything\"\n").unwrap_err();
        assert!(e.to_string().contains("everything"), "{e}");
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
            operator_name: "J. Jansen".into(),
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
            (Redact::OfficerIds, |_, r| r.operator_id.is_empty() && r.operator_name.is_empty()),
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
