//! An officer's verdict as an OPERATOR report. The MACHINE report it judges
//! is never changed: reports are only ever appended.
//!
//! The officer of record (`operator_id`) is the caller's authenticated
//! identity; the `officer_id` the client sends is only a display name
//! (`operator_name`). Without authentication (one workstation on loopback)
//! there is no identity to trust, and the `officer_id` sent is the officer
//! of record.

use std::time::SystemTime;

use niix_proto::v1::{AdjudicateRequest, AlarmDecision, AssessmentFlag, ReportType, ThreatReport, Verdict};

use crate::error::{Error, Result};
use crate::events::timestamp;

/// Longest comment kept.
pub const MAX_COMMENT: usize = 4096;
/// Longest officer display name kept.
pub const MAX_OFFICER_NAME: usize = 256;

fn verdict_of(v: i32, what: &str) -> Result<Verdict> {
    Verdict::try_from(v).map_err(|_| Error::InvalidArgument(format!("{what}: unknown verdict value {v}")))
}

/// Builds the OPERATOR report for `req`, judging `machine` (the latest
/// MACHINE report, if any). `officer` is the caller's authenticated
/// identity, `None` on a server without authentication.
pub fn operator_report(
    machine: Option<&ThreatReport>,
    req: &AdjudicateRequest,
    officer: Option<&str>,
) -> Result<ThreatReport> {
    let verdict = verdict_of(req.verdict, "verdict")?;
    if verdict == Verdict::Unspecified {
        return Err(Error::InvalidArgument("verdict is required: CONFIRMED, DISMISSED or INCONCLUSIVE".into()));
    }
    let name = req.officer_id.trim();
    if name.len() > MAX_OFFICER_NAME {
        return Err(Error::InvalidArgument(format!("officer_id is limited to {MAX_OFFICER_NAME} bytes")));
    }
    let (operator_id, operator_name) = match officer {
        Some(identity) => (identity.to_string(), name.to_string()),
        None if name.is_empty() => {
            return Err(Error::InvalidArgument(
                "officer_id is required on a server without authentication: say who adjudicates".into(),
            ));
        }
        None => (name.to_string(), String::new()),
    };
    if req.comment.len() > MAX_COMMENT || req.regions.iter().any(|r| r.comment.len() > MAX_COMMENT) {
        return Err(Error::InvalidArgument(format!("comments are limited to {MAX_COMMENT} bytes")));
    }
    let mut regions = machine.map(|m| m.regions.clone()).unwrap_or_default();
    for (i, rv) in req.regions.iter().enumerate() {
        let v = verdict_of(rv.verdict, &format!("region {}", rv.region_id))?;
        if v == Verdict::Unspecified {
            return Err(Error::InvalidArgument(format!(
                "region {}: verdict is required: CONFIRMED, DISMISSED or INCONCLUSIVE (leave a region out to not judge it)",
                rv.region_id
            )));
        }
        if req.regions[..i].iter().any(|earlier| earlier.region_id == rv.region_id) {
            return Err(Error::InvalidArgument(format!(
                "region {} is given more than once: send one verdict per region",
                rv.region_id
            )));
        }
        let Some(region) = regions.iter_mut().find(|r| r.id == rv.region_id) else {
            let ids: Vec<u32> = regions.iter().map(|r| r.id).collect();
            return Err(Error::InvalidArgument(format!(
                "region {} is not in the machine report (its regions are {ids:?})",
                rv.region_id
            )));
        };
        region.verdict = v as i32;
        region.comment = rv.comment.clone();
        region.assessment_flag = match v {
            Verdict::Confirmed if region.assessment_flag == AssessmentFlag::HighThreat as i32 => region.assessment_flag,
            Verdict::Confirmed => AssessmentFlag::Threat as i32,
            Verdict::Dismissed => AssessmentFlag::NoThreat as i32,
            Verdict::Inconclusive | Verdict::Unspecified => AssessmentFlag::Unknown as i32,
        };
    }
    Ok(ThreatReport {
        r#type: ReportType::Operator as i32,
        decision: match verdict {
            Verdict::Confirmed => AlarmDecision::Alarm,
            Verdict::Dismissed => AlarmDecision::Clear,
            _ => AlarmDecision::Unknown,
        } as i32,
        decision_time: Some(timestamp(SystemTime::now())),
        score: machine.map(|m| m.score).unwrap_or(0.0),
        plane_index: machine.map(|m| m.plane_index).unwrap_or(0),
        operator_id,
        operator_name,
        verdict: verdict as i32,
        comment: req.comment.clone(),
        regions,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use niix_proto::v1::{Region, RegionVerdict};

    use super::*;

    fn machine() -> ThreatReport {
        ThreatReport {
            r#type: ReportType::Machine as i32,
            decision: AlarmDecision::Alarm as i32,
            score: 0.8,
            regions: vec![
                Region { id: 1, assessment_flag: AssessmentFlag::HighThreat as i32, ..Default::default() },
                Region { id: 2, assessment_flag: AssessmentFlag::Threat as i32, ..Default::default() },
            ],
            ..Default::default()
        }
    }

    fn req(verdict: Verdict, regions: Vec<RegionVerdict>) -> AdjudicateRequest {
        AdjudicateRequest {
            scan_id: String::new(),
            verdict: verdict as i32,
            regions,
            comment: "seal intact".into(),
            officer_id: "NL-4711".into(),
        }
    }

    #[test]
    fn verdicts_set_decision_and_flags() {
        let m = machine();
        let rv = |id, v: Verdict| RegionVerdict { region_id: id, verdict: v as i32, comment: String::new() };
        let r = operator_report(
            Some(&m),
            &req(Verdict::Confirmed, vec![rv(1, Verdict::Confirmed), rv(2, Verdict::Dismissed)]),
            None,
        )
        .unwrap();
        assert_eq!(r.r#type, ReportType::Operator as i32);
        assert_eq!(r.decision, AlarmDecision::Alarm as i32);
        assert_eq!(r.regions[0].assessment_flag, AssessmentFlag::HighThreat as i32);
        assert_eq!(r.regions[1].assessment_flag, AssessmentFlag::NoThreat as i32);
        assert_eq!(r.regions[1].verdict, Verdict::Dismissed as i32);
        assert_eq!((r.operator_id.as_str(), r.comment.as_str()), ("NL-4711", "seal intact"));
        let r = operator_report(Some(&m), &req(Verdict::Dismissed, vec![]), None).unwrap();
        assert_eq!(r.decision, AlarmDecision::Clear as i32);
        let r = operator_report(None, &req(Verdict::Inconclusive, vec![]), None).unwrap();
        assert_eq!(r.decision, AlarmDecision::Unknown as i32);
    }

    #[test]
    fn bad_requests_are_named() {
        let m = machine();
        let e = operator_report(Some(&m), &req(Verdict::Unspecified, vec![]), None).unwrap_err();
        assert!(e.to_string().contains("verdict is required"));
        let mut r = req(Verdict::Confirmed, vec![]);
        r.officer_id = " ".into();
        assert!(operator_report(Some(&m), &r, None).unwrap_err().to_string().contains("officer_id"));
        let r = req(Verdict::Confirmed, vec![RegionVerdict { region_id: 9, verdict: 1, comment: String::new() }]);
        assert!(operator_report(Some(&m), &r, None).unwrap_err().to_string().contains("region 9 is not in"));
        let rv = |v: Verdict| RegionVerdict { region_id: 1, verdict: v as i32, comment: String::new() };
        let r = req(Verdict::Confirmed, vec![rv(Verdict::Unspecified)]);
        assert!(operator_report(Some(&m), &r, None).unwrap_err().to_string().contains("region 1: verdict is required"));
        let r = req(Verdict::Confirmed, vec![rv(Verdict::Confirmed), rv(Verdict::Dismissed)]);
        assert!(
            operator_report(Some(&m), &r, None).unwrap_err().to_string().contains("region 1 is given more than once")
        );
        let mut r = req(Verdict::Confirmed, vec![]);
        r.verdict = 42;
        assert!(operator_report(Some(&m), &r, None).unwrap_err().to_string().contains("unknown verdict"));
        let mut r = req(Verdict::Confirmed, vec![]);
        r.officer_id = "n".repeat(MAX_OFFICER_NAME + 1);
        assert!(operator_report(Some(&m), &r, Some("officer-1")).unwrap_err().to_string().contains("256 bytes"));
    }

    #[test]
    fn the_authenticated_officer_is_of_record_and_officer_id_a_display_name() {
        let m = machine();
        let mut r = req(Verdict::Dismissed, vec![]);
        r.officer_id = "officer-b".into();
        let report = operator_report(Some(&m), &r, Some("officer-a")).unwrap();
        assert_eq!((report.operator_id.as_str(), report.operator_name.as_str()), ("officer-a", "officer-b"));
        // With authentication the display name is optional.
        r.officer_id = " ".into();
        let report = operator_report(Some(&m), &r, Some("officer-a")).unwrap();
        assert_eq!((report.operator_id.as_str(), report.operator_name.as_str()), ("officer-a", ""));
    }
}
