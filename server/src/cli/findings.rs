//! `niix findings`.

use std::time::Duration;

use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::{AlarmDecision, GetFindingsRequest, ReportType, ScanFindings, ScanStatus, ThreatReport};
use serde_json::{Value, json};

use super::{ServerArg, enum_word};
use crate::client::StatusError;

/// Arguments of `niix findings`.
#[derive(Debug, clap::Args)]
pub struct FindingsArgs {
    /// The scan.
    pub scan_id: String,
    #[command(flatten)]
    pub server: ServerArg,
    /// Wait until the analysis is finished.
    #[arg(long)]
    pub wait: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn word<T: TryFrom<i32>>(v: i32, name: impl Fn(T) -> &'static str, prefix: &str) -> String {
    T::try_from(v).map(|t| enum_word(name(t), prefix)).unwrap_or_else(|_| "unspecified".into())
}

/// True once analysis can no longer change the findings.
pub fn settled(f: &ScanFindings) -> bool {
    matches!(ScanStatus::try_from(f.status), Ok(ScanStatus::Analyzed | ScanStatus::Failed | ScanStatus::Received))
}

/// The newest MACHINE report.
pub fn machine_report(f: &ScanFindings) -> Option<&ThreatReport> {
    f.reports.iter().rev().find(|r| r.r#type == ReportType::Machine as i32)
}

/// The JSON form of one report.
pub fn report_json(r: &ThreatReport) -> Value {
    let algo = r.algorithm.clone().unwrap_or_default();
    json!({
        "type": word::<ReportType>(r.r#type, |t| t.as_str_name(), "REPORT_TYPE_"),
        "decision": word::<AlarmDecision>(r.decision, |t| t.as_str_name(), "ALARM_DECISION_"),
        "score": r.score,
        "aborted": r.aborted,
        "abort_reason": r.abort_reason,
        "processing_seconds": r.processing_seconds,
        "plane_index": r.plane_index,
        "model": {
            "name": algo.name, "version": algo.version, "sha256": algo.sha256, "demo": algo.demo,
            "fallback_from": (!r.fallback_from.is_empty()).then_some(&r.fallback_from),
            "fallback_reason": (!r.fallback_reason.is_empty()).then_some(&r.fallback_reason),
        },
        "operator_id": r.operator_id,
        "operator_name": r.operator_name,
        "verdict": word::<niix_proto::v1::Verdict>(r.verdict, |t| t.as_str_name(), "VERDICT_"),
        "comment": r.comment,
        "regions": r.regions.iter().map(|g| json!({
            "id": g.id, "x": g.x, "y": g.y, "width": g.width, "height": g.height,
            "x_mm": g.x_mm, "y_mm": g.y_mm, "width_mm": g.width_mm, "height_mm": g.height_mm,
            "area_px": g.area_px, "score": g.max_score, "mean_score": g.mean_score,
            "category": g.threat_category,
            "flag": word::<niix_proto::v1::AssessmentFlag>(g.assessment_flag, |t| t.as_str_name(), "ASSESSMENT_FLAG_"),
            "verdict": word::<niix_proto::v1::Verdict>(g.verdict, |t| t.as_str_name(), "VERDICT_"),
        })).collect::<Vec<_>>(),
    })
}

/// The JSON of a scan's findings: the newest MACHINE report's fields at the
/// top, every report under `reports`.
pub fn findings_json(f: &ScanFindings) -> Value {
    let mut out = json!({
        "scan_id": f.scan_id,
        "status": word::<ScanStatus>(f.status, |t| t.as_str_name(), "SCAN_STATUS_"),
        "reports": f.reports.iter().map(report_json).collect::<Vec<_>>(),
    });
    if let Some(r) = machine_report(f) {
        let top = report_json(r);
        for key in ["decision", "score", "model", "regions", "aborted", "abort_reason", "processing_seconds"] {
            out[key] = top[key].clone();
        }
    }
    out
}

/// Prints findings for people.
pub fn print_findings(f: &ScanFindings) {
    let status = word::<ScanStatus>(f.status, |t| t.as_str_name(), "SCAN_STATUS_");
    println!("scan {}  status {status}", f.scan_id);
    let Some(r) = machine_report(f) else {
        println!("  no analysis yet");
        return;
    };
    let algo = r.algorithm.clone().unwrap_or_default();
    let demo = if algo.demo { " [DEMO model, not a trained detector]" } else { "" };
    println!("  model {} version {} sha256 {}{demo}", algo.name, algo.version, algo.sha256);
    if !r.fallback_from.is_empty() {
        println!("  in place of {}: {}", r.fallback_from, r.fallback_reason);
    }
    if r.aborted {
        println!("  analysis aborted: {}", r.abort_reason);
        return;
    }
    let decision = word::<AlarmDecision>(r.decision, |t| t.as_str_name(), "ALARM_DECISION_");
    println!(
        "  decision {}  score {:.3}  {} regions  {:.2} s",
        decision.to_uppercase(),
        r.score,
        r.regions.len(),
        r.processing_seconds
    );
    for g in &r.regions {
        println!(
            "  region {:>3}  x {:>5} y {:>5}  {:>4}x{:<4} px  ({:.0}x{:.0} mm)  score {:.3}  {}",
            g.id, g.x, g.y, g.width, g.height, g.width_mm, g.height_mm, g.max_score, g.threat_category
        );
    }
    for o in f.reports.iter().filter(|o| o.r#type == ReportType::Operator as i32) {
        let verdict = word::<niix_proto::v1::Verdict>(o.verdict, |t| t.as_str_name(), "VERDICT_");
        let decision = word::<AlarmDecision>(o.decision, |t| t.as_str_name(), "ALARM_DECISION_");
        let name = if o.operator_name.is_empty() { String::new() } else { format!(" ({})", o.operator_name) };
        println!("  officer {}{name}: {verdict} ({}) {}", o.operator_id, decision.to_uppercase(), o.comment);
    }
}

/// Fetches findings, waiting for the analysis when `wait` (up to `timeout`).
pub async fn fetch(
    channel: crate::client::Authed,
    scan_id: &str,
    wait: bool,
    timeout: Duration,
) -> anyhow::Result<ScanFindings> {
    let mut client = FindingsClient::new(channel);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let f = client
            .get_findings(GetFindingsRequest { scan_id: scan_id.to_string() })
            .await
            .map_err(StatusError)?
            .into_inner();
        if !wait || settled(&f) {
            return Ok(f);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "scan {scan_id} is still {} after {timeout:?}",
                word::<ScanStatus>(f.status, |t| t.as_str_name(), "SCAN_STATUS_")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Shows a scan's findings.
pub async fn run(args: FindingsArgs) -> anyhow::Result<()> {
    let f = fetch(args.server.connect().await?, &args.scan_id, args.wait, Duration::from_secs(600)).await?;
    if args.json {
        println!("{}", findings_json(&f));
    } else {
        print_findings(&f);
    }
    Ok(())
}
