//! Export of a report as a NEMA DICOS Threat Detection Report (TDR), SOP
//! class 1.2.840.10008.5.1.4.1.1.501.3, as DICOM Part 10 bytes.

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, Tag, VR, dicom_value};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use niix_proto::v1::{AlarmDecision, AssessmentFlag, PlaneEncoding, ReportType, ThreatReport};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::ScanRecord;

/// SOP class of a DICOS TDR.
pub const TDR_SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.501.3";
/// SOP class of a DICOS DX image (for processing), which plane references use.
pub const DX_SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.501.2.2";
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

const TDR_TYPE: Tag = Tag(0x4010, 0x1027);
const ALARM_DECISION: Tag = Tag(0x4010, 0x1031);
const ALARM_DECISION_TIME: Tag = Tag(0x4010, 0x102B);
const ABORT_FLAG: Tag = Tag(0x4010, 0x1024);
const ABORT_REASON: Tag = Tag(0x4010, 0x1021);
const ALGORITHM_AND_VERSION: Tag = Tag(0x4010, 0x1029);
const TOTAL_OBJECTS: Tag = Tag(0x4010, 0x1033);
const ALARM_OBJECTS: Tag = Tag(0x4010, 0x1034);
const TOTAL_PROCESSING_TIME: Tag = Tag(0x4010, 0x1069);
const THREAT_SEQUENCE: Tag = Tag(0x4010, 0x1011);
const PTO_ID: Tag = Tag(0x4010, 0x1010);
const ATD_ASSESSMENT_SEQUENCE: Tag = Tag(0x4010, 0x1038);
const THREAT_CATEGORY: Tag = Tag(0x4010, 0x1012);
const ATD_ASSESSMENT_FLAG: Tag = Tag(0x4010, 0x1015);
const ATD_ASSESSMENT_PROBABILITY: Tag = Tag(0x4010, 0x1016);
const PTO_REPRESENTATION_SEQUENCE: Tag = Tag(0x4010, 0x1037);
const THREAT_ROI_BASE: Tag = Tag(0x4010, 0x1004);
const THREAT_ROI_EXTENTS: Tag = Tag(0x4010, 0x1005);
const OOI_TYPE: Tag = Tag(0x4010, 0x1042);

/// A DICOM UID from a UUID (the 2.25 root, ISO/IEC 9834-8).
pub fn uid_from_uuid(u: Uuid) -> String {
    format!("2.25.{}", u.as_u128())
}

/// A UID that is always the same for the same name (a UUID made from its SHA-256).
pub fn stable_uid(name: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(name.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uid_from_uuid(uuid::Builder::from_custom_bytes(bytes).into_uuid())
}

/// The SOP Instance UID of a stored plane: the DX object's own when the plane
/// was pushed as DICOS, otherwise a stable UID derived from its digest.
pub fn plane_instance_uid(record: &ScanRecord, plane: usize, dicos_uid: Option<String>) -> String {
    match record.header.planes.get(plane) {
        Some(d) if d.encoding == PlaneEncoding::Dicos as i32 => {
            dicos_uid.unwrap_or_else(|| stable_uid(&format!("niix plane {}", record.planes[plane].sha256)))
        }
        _ => stable_uid(&format!("niix plane {}", record.planes.get(plane).map(|p| p.sha256.as_str()).unwrap_or(""))),
    }
}

fn cs(tag: Tag, v: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::CS, v)
}

fn word(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix).unwrap_or(full).to_string()
}

fn dicom_datetime(t: Option<&prost_types::Timestamp>) -> String {
    let secs = t.map(|t| t.seconds).unwrap_or(0).max(0) as u64;
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    // RFC 3339 "2026-11-23T09:58:09Z" -> DICOM DT "20261123095809"
    humantime::format_rfc3339_seconds(at).to_string().chars().filter(|c| c.is_ascii_digit()).collect()
}

/// Writes `report` of the scan as a DICOS TDR. `image_uid` is the SOP
/// Instance UID of the plane the regions refer to. Returns the bytes and the
/// TDR's SOP Instance UID.
pub fn export(
    record: &ScanRecord,
    report: &ThreatReport,
    report_index: usize,
    image_uid: &str,
) -> Result<(Vec<u8>, String)> {
    let scan_uuid = Uuid::parse_str(&record.scan_id).map_err(|e| Error::Internal(format!("scan id: {e}")))?;
    let sop_uid = stable_uid(&format!("niix tdr {} {report_index}", record.scan_id));
    let report_type = ReportType::try_from(report.r#type).unwrap_or(ReportType::Unspecified);
    let decision = AlarmDecision::try_from(report.decision).unwrap_or(AlarmDecision::Unknown);
    let mut obj = InMemDicomObject::new_empty();
    obj.put(DataElement::new(tags::SOP_CLASS_UID, VR::UI, TDR_SOP_CLASS));
    obj.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, sop_uid.as_str()));
    obj.put(DataElement::new(tags::STUDY_INSTANCE_UID, VR::UI, uid_from_uuid(scan_uuid).as_str()));
    obj.put(DataElement::new(
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        stable_uid(&format!("niix tdr series {}", record.scan_id)).as_str(),
    ));
    obj.put(cs(tags::MODALITY, "TDR"));
    obj.put(DataElement::new(tags::INSTANCE_NUMBER, VR::IS, (report_index + 1).to_string().as_str()));
    obj.put(cs(TDR_TYPE, &word(report_type.as_str_name(), "REPORT_TYPE_")));
    obj.put(cs(ALARM_DECISION, &word(decision.as_str_name(), "ALARM_DECISION_")));
    obj.put(DataElement::new(ALARM_DECISION_TIME, VR::DT, dicom_datetime(report.decision_time.as_ref()).as_str()));
    obj.put(cs(ABORT_FLAG, if report.aborted { "ABORT" } else { "SUCCESS" }));
    if report.aborted {
        obj.put(cs(ABORT_REASON, "FAILED_PROCESSING"));
        obj.put(DataElement::new(tags::IMAGE_COMMENTS, VR::LT, report.abort_reason.as_str()));
    }
    if let Some(a) = &report.algorithm {
        let params = format!("sha256={}", a.sha256);
        let manufacturer =
            if a.manufacturer.is_empty() { a.name.clone() } else { format!("{} {}", a.manufacturer, a.name) };
        obj.put(DataElement::new(
            ALGORITHM_AND_VERSION,
            VR::LO,
            dicom_value!(Strs, [manufacturer.as_str(), a.version.as_str(), params.as_str()]),
        ));
    }
    if report_type == ReportType::Operator {
        let person = DataSetSequence::from(vec![InMemDicomObject::from_element_iter([DataElement::new(
            tags::OPERATORS_NAME,
            VR::PN,
            report.operator_id.as_str(),
        )])]);
        obj.put(DataElement::new(tags::OPERATOR_IDENTIFICATION_SEQUENCE, VR::SQ, person));
    }
    let alarms = report
        .regions
        .iter()
        .filter(|r| {
            matches!(
                AssessmentFlag::try_from(r.assessment_flag),
                Ok(AssessmentFlag::Threat | AssessmentFlag::HighThreat)
            )
        })
        .count();
    obj.put(DataElement::new(TOTAL_OBJECTS, VR::US, dicom_value!(U16, [report.regions.len() as u16])));
    obj.put(DataElement::new(ALARM_OBJECTS, VR::US, dicom_value!(U16, [alarms as u16])));
    obj.put(DataElement::new(
        TOTAL_PROCESSING_TIME,
        VR::FL,
        dicom_value!(F32, [(report.processing_seconds * 1000.0) as f32]),
    ));
    obj.put(cs(OOI_TYPE, "CARGO"));

    let ptos: Vec<InMemDicomObject> = report
        .regions
        .iter()
        .map(|r| {
            let flag = AssessmentFlag::try_from(r.assessment_flag).unwrap_or(AssessmentFlag::Unknown);
            let flag = match flag {
                AssessmentFlag::Unspecified => "UNKNOWN".to_string(),
                f => word(f.as_str_name(), "ASSESSMENT_FLAG_"),
            };
            let assessment = InMemDicomObject::from_element_iter([
                cs(THREAT_CATEGORY, &r.threat_category),
                cs(ATD_ASSESSMENT_FLAG, &flag),
                DataElement::new(ATD_ASSESSMENT_PROBABILITY, VR::FL, dicom_value!(F32, [r.assessment_probability])),
            ]);
            let reference = InMemDicomObject::from_element_iter([
                DataElement::new(tags::REFERENCED_SOP_CLASS_UID, VR::UI, DX_SOP_CLASS),
                DataElement::new(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, image_uid),
            ]);
            let representation = InMemDicomObject::from_element_iter([
                DataElement::new(THREAT_ROI_BASE, VR::FL, dicom_value!(F32, [r.x as f32, r.y as f32, 0.0])),
                DataElement::new(THREAT_ROI_EXTENTS, VR::FL, dicom_value!(F32, [r.width as f32, r.height as f32, 0.0])),
                DataElement::new(tags::REFERENCED_INSTANCE_SEQUENCE, VR::SQ, DataSetSequence::from(vec![reference])),
            ]);
            InMemDicomObject::from_element_iter([
                DataElement::new(PTO_ID, VR::US, dicom_value!(U16, [r.id as u16])),
                DataElement::new(ATD_ASSESSMENT_SEQUENCE, VR::SQ, DataSetSequence::from(vec![assessment])),
                DataElement::new(PTO_REPRESENTATION_SEQUENCE, VR::SQ, DataSetSequence::from(vec![representation])),
            ])
        })
        .collect();
    obj.put(DataElement::new(THREAT_SEQUENCE, VR::SQ, DataSetSequence::from(ptos)));

    let file = obj
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(EXPLICIT_VR_LE))
        .map_err(|e| Error::Internal(format!("TDR meta: {e}")))?;
    let mut out = Vec::new();
    file.write_all(&mut out).map_err(|e| Error::Internal(format!("writing TDR: {e}")))?;
    Ok((out, sop_uid))
}
