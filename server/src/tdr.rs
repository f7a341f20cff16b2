//! Export of a report as a NEMA DICOS Threat Detection Report (TDR), SOP
//! class 1.2.840.10008.5.1.4.1.1.501.3, as DICOM Part 10 bytes (DICOS V03).
//!
//! The file carries every attribute the DICOS toolkit requires of a TDR
//! (checked by `pydicos` in the interop tests), with values that fit their
//! value representations; docs/protocol.md lists where each comes from.
//! Scanner facts niix does not know (calibration time, machine address) are
//! present and empty, as DICOS allows for them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dicom_core::value::{DataSetSequence, PrimitiveValue};
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
/// The DICOS version written, in the file meta group and in the data set.
pub const DICOS_VERSION: &str = "V03";
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
const ATD_ABILITY_ASSESSMENT: Tag = Tag(0x4010, 0x1014);
const ATD_ASSESSMENT_FLAG: Tag = Tag(0x4010, 0x1015);
const ATD_ASSESSMENT_PROBABILITY: Tag = Tag(0x4010, 0x1016);
const PTO_REPRESENTATION_SEQUENCE: Tag = Tag(0x4010, 0x1037);
const THREAT_ROI_VOXEL_SEQUENCE: Tag = Tag(0x4010, 0x1001);
const THREAT_ROI_BASE: Tag = Tag(0x4010, 0x1004);
const THREAT_ROI_EXTENTS: Tag = Tag(0x4010, 0x1005);
const OOI_TYPE: Tag = Tag(0x4010, 0x1042);
const DICOS_VERSION_TAG: Tag = Tag(0x4010, 0x103A);
const ACQUISITION_STATUS: Tag = Tag(0x4010, 0x1044);
const SCAN_TYPE: Tag = Tag(0x4010, 0x1048);
const ADDITIONAL_SCREENING_PERFORMED: Tag = Tag(0x4010, 0x106D);
const IMAGE_SCALE_REPRESENTATION: Tag = Tag(0x4010, 0x1075);
const PROCESSING_START: Tag = Tag(0x4010, 0x1080);
const PROCESSING_END: Tag = Tag(0x4010, 0x1081);
const PTO_PROCESSING_TIME: Tag = Tag(0x4010, 0x1082);
/// Hex digits of the model's SHA-256 in (4010,1029): as many as fit the
/// last LO value after "sha256=".
pub const MODEL_DIGEST_HEX: usize = 56;
/// File meta "DICOS Version" (0002,0004), which DICOS readers require.
const META_DICOS_VERSION: [u8; 4] = [0x02, 0x00, 0x04, 0x00];

/// The image a report's regions were found in.
#[derive(Debug, Clone, Default)]
pub struct ImageRef {
    /// Its SOP Instance UID (a pushed DX object's own, else derived).
    pub sop_instance_uid: String,
    /// The study (DICOS scan) of a pushed DX object; `None` for other planes.
    pub study_instance_uid: Option<String>,
}

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

/// Text that fits a string VR: at most `max` characters, no value separator
/// (`\`) and no control characters.
fn fit(s: &str, max: usize) -> String {
    s.chars()
        .map(|c| if c == '\\' || c.is_control() { ' ' } else { c })
        .take(max)
        .collect::<String>()
        .trim()
        .to_string()
}

fn cs(tag: Tag, v: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::CS, v)
}

fn text(tag: Tag, vr: VR, v: &str) -> DataElement<InMemDicomObject> {
    let max = match vr {
        VR::SH => 16,
        VR::LO => 64,
        VR::ST => 1024,
        _ => 10240,
    };
    let v = fit(v, max);
    if v.is_empty() { DataElement::new(tag, vr, PrimitiveValue::Empty) } else { DataElement::new(tag, vr, v) }
}

fn word(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix).unwrap_or(full).to_string()
}

fn system_time(t: Option<&prost_types::Timestamp>) -> SystemTime {
    let secs = t.map(|t| t.seconds).unwrap_or(0).max(0) as u64;
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// DICOM DA ("YYYYMMDD"), TM ("HHMMSS") and DT ("YYYYMMDDHHMMSS") of a UTC time.
fn dicom_times(at: SystemTime) -> (String, String, String) {
    // RFC 3339 "2026-11-23T09:58:09Z" -> "20261123095809"
    let digits: String =
        humantime::format_rfc3339_seconds(at).to_string().chars().filter(|c| c.is_ascii_digit()).collect();
    (digits[..8].to_string(), digits[8..14].to_string(), digits)
}

/// The date and time elements `(date_tag, time_tag)` of `at`.
fn date_time(date: Tag, time: Tag, at: SystemTime) -> [DataElement<InMemDicomObject>; 2] {
    let (da, tm, _) = dicom_times(at);
    [DataElement::new(date, VR::DA, da.as_str()), DataElement::new(time, VR::TM, tm.as_str())]
}

/// DICOS Abort Reason of a failed analysis: TIMEOUT when it ran out of time,
/// otherwise UNKNOWN_DATATYPE (the algorithm could not use the scan); the
/// reason in words goes to Image Comments.
fn abort_reason(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("timeout") || r.contains("timed out") || r.contains("deadline") {
        "TIMEOUT"
    } else {
        "UNKNOWN_DATATYPE"
    }
}

/// The object of inspection's id, who assigned it, for OOI ID (0010,0020)
/// and its assigning authority (0010,0021): the first container number
/// (ISO 6346), else the vehicle plate, else the scan id (niix).
fn ooi_id(record: &ScanRecord) -> (String, &'static str) {
    let meta = record.header.metadata.clone().unwrap_or_default();
    if let Some(n) = meta.container_numbers.first() {
        (n.clone(), "ISO 6346")
    } else if !meta.vehicle_plate.trim().is_empty() {
        (meta.vehicle_plate.trim().to_string(), "VEHICLE PLATE")
    } else {
        (record.scan_id.clone(), "NIIX")
    }
}

/// The Operator Identification Sequence of an OPERATOR report: the
/// officer's id as a Person Identification Code (id, then id type TEXT), the
/// organisation (the customs site), and the id as Operators' Name. Code
/// Value is SH (16 characters; DICOS readers do not take Long Code Value):
/// a longer id is there as the first 16 hex digits of its SHA-256, and in
/// full in Code Meaning.
fn operator_identification(officer: &str, site: &str) -> DataElement<InMemDicomObject> {
    use sha2::Digest;
    let id = fit(officer, 64);
    let value =
        if id.chars().count() <= 16 { id.clone() } else { hex::encode(&sha2::Sha256::digest(officer.as_bytes())[..8]) };
    let code = InMemDicomObject::from_element_iter([
        DataElement::new(tags::CODE_VALUE, VR::SH, value.as_str()),
        DataElement::new(tags::CODING_SCHEME_DESIGNATOR, VR::SH, "99NIIX"),
        DataElement::new(tags::CODE_MEANING, VR::LO, id.as_str()),
    ]);
    let id_type = InMemDicomObject::from_element_iter([
        DataElement::new(tags::CODE_VALUE, VR::SH, "TEXT"),
        DataElement::new(tags::CODING_SCHEME_DESIGNATOR, VR::SH, "DCS"),
        DataElement::new(tags::CODE_MEANING, VR::LO, "Text"),
    ]);
    let person = InMemDicomObject::from_element_iter([
        text(tags::INSTITUTION_NAME, VR::LO, site),
        DataElement::new(tags::OPERATORS_NAME, VR::PN, id.as_str()),
        DataElement::new(tags::PERSON_IDENTIFICATION_CODE_SEQUENCE, VR::SQ, DataSetSequence::from(vec![code, id_type])),
    ]);
    DataElement::new(tags::OPERATOR_IDENTIFICATION_SEQUENCE, VR::SQ, DataSetSequence::from(vec![person]))
}

/// Writes `report` of the scan as a DICOS TDR. `image` is the plane the
/// regions refer to. Returns the bytes and the TDR's SOP Instance UID.
pub fn export(
    record: &ScanRecord,
    report: &ThreatReport,
    report_index: usize,
    image: &ImageRef,
) -> Result<(Vec<u8>, String)> {
    let scan_uuid = Uuid::parse_str(&record.scan_id).map_err(|e| Error::Internal(format!("scan id: {e}")))?;
    let sop_uid = stable_uid(&format!("niix tdr {} {report_index}", record.scan_id));
    let report_type = ReportType::try_from(report.r#type).unwrap_or(ReportType::Unspecified);
    let decision = AlarmDecision::try_from(report.decision).unwrap_or(AlarmDecision::Unknown);
    let meta = record.header.metadata.clone().unwrap_or_default();
    let scanner = meta.scanner.clone().unwrap_or_default();
    let decided = system_time(report.decision_time.as_ref());
    let processing_ms = (report.processing_seconds * 1000.0) as f32;
    let started = decided.checked_sub(Duration::from_secs_f64(report.processing_seconds.max(0.0))).unwrap_or(decided);
    let study_uid =
        image.study_instance_uid.clone().filter(|u| !u.is_empty()).unwrap_or_else(|| uid_from_uuid(scan_uuid));

    let mut obj = InMemDicomObject::new_empty();
    // SOP Common and General Scan (DICOS names the study "scan").
    obj.put(DataElement::new(tags::SOP_CLASS_UID, VR::UI, TDR_SOP_CLASS));
    obj.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, sop_uid.as_str()));
    for e in date_time(tags::INSTANCE_CREATION_DATE, tags::INSTANCE_CREATION_TIME, decided) {
        obj.put(e);
    }
    obj.put(DataElement::new(tags::STUDY_INSTANCE_UID, VR::UI, study_uid.as_str()));
    for e in date_time(tags::STUDY_DATE, tags::STUDY_TIME, record.sort_time()) {
        obj.put(e);
    }
    // Scan ID is SH (16 characters): the scan UUID's first 16 hex digits.
    obj.put(DataElement::new(tags::STUDY_ID, VR::SH, &scan_uuid.simple().to_string()[..16]));
    // Object of inspection.
    let (ooi, authority) = ooi_id(record);
    obj.put(text(tags::PATIENT_ID, VR::LO, &ooi));
    obj.put(text(tags::ISSUER_OF_PATIENT_ID, VR::LO, authority));
    obj.put(cs(tags::TYPE_OF_PATIENT_ID, "TEXT"));
    obj.put(cs(OOI_TYPE, "CARGO"));
    obj.put(cs(SCAN_TYPE, "OPERATIONAL"));
    // Series.
    obj.put(DataElement::new(
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        stable_uid(&format!("niix tdr series {}", record.scan_id)).as_str(),
    ));
    for e in date_time(tags::SERIES_DATE, tags::SERIES_TIME, decided) {
        obj.put(e);
    }
    obj.put(cs(tags::MODALITY, "TDR"));
    obj.put(cs(ACQUISITION_STATUS, "SUCCESSFUL"));
    obj.put(DataElement::new(
        tags::FRAME_OF_REFERENCE_UID,
        VR::UI,
        stable_uid(&format!("niix frame {}", record.scan_id)).as_str(),
    ));
    obj.put(DataElement::new(tags::POSITION_REFERENCE_INDICATOR, VR::LO, PrimitiveValue::Empty));
    // General equipment: the scanner as the scan's metadata describes it.
    obj.put(text(tags::MANUFACTURER, VR::LO, &scanner.manufacturer));
    obj.put(text(tags::INSTITUTION_NAME, VR::LO, &meta.site_id));
    obj.put(DataElement::new(tags::INSTITUTION_ADDRESS, VR::ST, PrimitiveValue::Empty));
    obj.put(text(tags::STATION_NAME, VR::SH, &meta.lane_id));
    obj.put(text(tags::MANUFACTURER_MODEL_NAME, VR::LO, &scanner.model));
    obj.put(text(tags::DEVICE_SERIAL_NUMBER, VR::LO, &scanner.serial_number));
    obj.put(text(tags::SOFTWARE_VERSIONS, VR::LO, &scanner.software_version));
    obj.put(DataElement::new(tags::DATE_OF_LAST_CALIBRATION, VR::DA, PrimitiveValue::Empty));
    obj.put(DataElement::new(tags::TIME_OF_LAST_CALIBRATION, VR::TM, PrimitiveValue::Empty));
    // The scan's image the report judges.
    let reference = || {
        InMemDicomObject::from_element_iter([
            DataElement::new(tags::REFERENCED_SOP_CLASS_UID, VR::UI, DX_SOP_CLASS),
            DataElement::new(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, image.sop_instance_uid.as_str()),
        ])
    };
    obj.put(DataElement::new(tags::REFERENCED_STUDY_SEQUENCE, VR::SQ, DataSetSequence::from(vec![reference()])));

    // Threat Detection Report.
    obj.put(DataElement::new(tags::INSTANCE_NUMBER, VR::IS, (report_index + 1).to_string().as_str()));
    for e in date_time(tags::CONTENT_DATE, tags::CONTENT_TIME, decided) {
        obj.put(e);
    }
    obj.put(cs(DICOS_VERSION_TAG, DICOS_VERSION));
    obj.put(cs(TDR_TYPE, &word(report_type.as_str_name(), "REPORT_TYPE_")));
    obj.put(cs(ALARM_DECISION, &word(decision.as_str_name(), "ALARM_DECISION_")));
    obj.put(DataElement::new(ALARM_DECISION_TIME, VR::DT, dicom_times(decided).2.as_str()));
    obj.put(cs(ABORT_FLAG, if report.aborted { "ABORT" } else { "SUCCESS" }));
    if report.aborted {
        obj.put(cs(ABORT_REASON, abort_reason(&report.abort_reason)));
        obj.put(text(tags::IMAGE_COMMENTS, VR::LT, &report.abort_reason));
    }
    obj.put(cs(ADDITIONAL_SCREENING_PERFORMED, "NO"));
    obj.put(DataElement::new(IMAGE_SCALE_REPRESENTATION, VR::FD, dicom_value!(F64, [1.0])));
    if let Some(a) = &report.algorithm {
        // Parameters are "name=value" and an LO value holds 64 characters,
        // 63 for the last one (the element is padded to an even length): the
        // model file's SHA-256 goes in as its first 56 hex digits (224 bits).
        let manufacturer =
            if a.manufacturer.is_empty() { a.name.clone() } else { format!("{} {}", a.manufacturer, a.name) };
        let digest = format!("sha256={}", a.sha256.get(..MODEL_DIGEST_HEX).unwrap_or(&a.sha256));
        let values = [fit(&manufacturer, 64), fit(&a.version, 64), fit(&digest, 63)];
        obj.put(DataElement::new(
            ALGORITHM_AND_VERSION,
            VR::LO,
            dicom_value!(Strs, [values[0].as_str(), values[1].as_str(), values[2].as_str()]),
        ));
    }
    if report_type == ReportType::Operator {
        obj.put(operator_identification(&report.operator_id, &meta.site_id));
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
    obj.put(DataElement::new(TOTAL_PROCESSING_TIME, VR::FL, dicom_value!(F32, [processing_ms])));

    let (start_dt, end_dt) = (dicom_times(started).2, dicom_times(decided).2);
    let ptos: Vec<InMemDicomObject> = report
        .regions
        .iter()
        .map(|r| {
            let flag = AssessmentFlag::try_from(r.assessment_flag).unwrap_or(AssessmentFlag::Unknown);
            let flag = match flag {
                AssessmentFlag::Unspecified => "UNKNOWN".to_string(),
                f => word(f.as_str_name(), "ASSESSMENT_FLAG_"),
            };
            let category = if r.threat_category.is_empty() { "ANOMALY" } else { r.threat_category.as_str() };
            let assessment = InMemDicomObject::from_element_iter([
                cs(THREAT_CATEGORY, category),
                cs(ATD_ABILITY_ASSESSMENT, "NO_INTERFERENCE"),
                cs(ATD_ASSESSMENT_FLAG, &flag),
                DataElement::new(ATD_ASSESSMENT_PROBABILITY, VR::FL, dicom_value!(F32, [r.assessment_probability])),
            ]);
            let voxels = InMemDicomObject::from_element_iter([
                DataElement::new(THREAT_ROI_BASE, VR::FL, dicom_value!(F32, [r.x as f32, r.y as f32, 0.0])),
                DataElement::new(THREAT_ROI_EXTENTS, VR::FL, dicom_value!(F32, [r.width as f32, r.height as f32, 0.0])),
            ]);
            let representation = InMemDicomObject::from_element_iter([
                DataElement::new(tags::REFERENCED_INSTANCE_SEQUENCE, VR::SQ, DataSetSequence::from(vec![reference()])),
                DataElement::new(THREAT_ROI_VOXEL_SEQUENCE, VR::SQ, DataSetSequence::from(vec![voxels])),
            ]);
            InMemDicomObject::from_element_iter([
                DataElement::new(PTO_ID, VR::US, dicom_value!(U16, [r.id as u16])),
                DataElement::new(ATD_ASSESSMENT_SEQUENCE, VR::SQ, DataSetSequence::from(vec![assessment])),
                DataElement::new(PTO_REPRESENTATION_SEQUENCE, VR::SQ, DataSetSequence::from(vec![representation])),
                DataElement::new(PROCESSING_START, VR::DT, start_dt.as_str()),
                DataElement::new(PROCESSING_END, VR::DT, end_dt.as_str()),
                DataElement::new(PTO_PROCESSING_TIME, VR::FL, dicom_value!(F32, [processing_ms])),
            ])
        })
        .collect();
    obj.put(DataElement::new(THREAT_SEQUENCE, VR::SQ, DataSetSequence::from(ptos)));

    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(EXPLICIT_VR_LE)
                .implementation_class_uid(stable_uid("niix implementation"))
                .implementation_version_name(fit(&format!("NIIX_{}", env!("CARGO_PKG_VERSION")), 16)),
        )
        .map_err(|e| Error::Internal(format!("TDR meta: {e}")))?;
    let mut out = Vec::new();
    file.write_all(&mut out).map_err(|e| Error::Internal(format!("writing TDR: {e}")))?;
    Ok((with_dicos_version(out)?, sop_uid))
}

/// Adds DICOS Version (0002,0004) to the file meta group of Part 10 bytes
/// (in tag order, group length updated). dicom-rs writes only the meta
/// elements DICOM defines; DICOS readers require this one as well.
fn with_dicos_version(file: Vec<u8>) -> Result<Vec<u8>> {
    let bad = |what: &str| Error::Internal(format!("TDR meta group: {what}"));
    // Preamble (128) + "DICM" + (0002,0000) UL: tag, VR, length 4, value.
    const GROUP_LENGTH_VALUE: usize = 132 + 8;
    const META_START: usize = GROUP_LENGTH_VALUE + 4;
    let value = file.get(GROUP_LENGTH_VALUE..META_START).ok_or_else(|| bad("too short"))?;
    let group_length = u32::from_le_bytes(value.try_into().map_err(|_| bad("length"))?) as usize;
    let meta_end = META_START + group_length;
    // Find the first meta element after (0002,0004).
    let mut at = META_START;
    while at < meta_end {
        let element = u16::from_le_bytes([file[at + 2], file[at + 3]]);
        if element > 0x0004 {
            break;
        }
        let vr = &file[at + 4..at + 6];
        let (header, length) = if matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT" | b"UC" | b"UR") {
            (12, u32::from_le_bytes([file[at + 8], file[at + 9], file[at + 10], file[at + 11]]) as usize)
        } else {
            (8, usize::from(u16::from_le_bytes([file[at + 6], file[at + 7]])))
        };
        at += header + length;
    }
    if at > meta_end {
        return Err(bad("element runs past the group"));
    }
    let mut element = META_DICOS_VERSION.to_vec();
    element.extend_from_slice(b"CS");
    element.extend_from_slice(&4u16.to_le_bytes());
    element.extend_from_slice(b"V03 ");
    let mut out = Vec::with_capacity(file.len() + element.len());
    out.extend_from_slice(&file[..GROUP_LENGTH_VALUE]);
    out.extend_from_slice(&((group_length + element.len()) as u32).to_le_bytes());
    out.extend_from_slice(&file[META_START..at]);
    out.extend_from_slice(&element);
    out.extend_from_slice(&file[at..]);
    Ok(out)
}
