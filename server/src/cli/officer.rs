//! The image analyst's commands: `overlay`, `adjudicate`, `watch`, `export-tdr`.

use std::path::PathBuf;

use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::{
    AdjudicateRequest, ExportTdrRequest, FindingsEventKind, PlaneKind, RegionVerdict, RenderOverlayRequest, ReportType,
    ScanStatus, Verdict, WatchFindingsRequest,
};
use serde_json::json;
use tokio_stream::StreamExt;

use super::ServerArg;
use super::findings::report_json;
use crate::client::StatusError;

/// Which plane, as the CLI spells it.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PlaneArg {
    /// High-energy plane.
    High,
    /// Low-energy plane.
    Low,
    /// Single-energy plane.
    Single,
    /// Z-effective plane.
    Zeff,
    /// Backscatter plane.
    Backscatter,
}

impl From<PlaneArg> for PlaneKind {
    fn from(p: PlaneArg) -> Self {
        match p {
            PlaneArg::High => PlaneKind::HighEnergy,
            PlaneArg::Low => PlaneKind::LowEnergy,
            PlaneArg::Single => PlaneKind::SingleEnergy,
            PlaneArg::Zeff => PlaneKind::ZEffective,
            PlaneArg::Backscatter => PlaneKind::Backscatter,
        }
    }
}

/// Arguments of `niix overlay`.
#[derive(Debug, clap::Args)]
pub struct OverlayArgs {
    /// The scan.
    pub scan_id: String,
    /// Where to write the PNG.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Which plane (default: the first).
    #[arg(long, value_enum)]
    pub plane: Option<PlaneArg>,
    /// Largest width in pixels.
    #[arg(long, default_value_t = 1600)]
    pub max_width: u32,
    /// Display window in raw values, e.g. 2000:45000 (default: automatic).
    #[arg(long)]
    pub window: Option<String>,
    /// Leave out the heat layer.
    #[arg(long)]
    pub no_heat: bool,
    /// Leave out the region boxes.
    #[arg(long)]
    pub no_boxes: bool,
    #[command(flatten)]
    pub server: ServerArg,
}

/// Verdicts as the CLI spells them.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum VerdictArg {
    /// The alarm is real.
    Confirmed,
    /// A false alarm.
    Dismissed,
    /// Physical inspection decides.
    Inconclusive,
}

impl From<VerdictArg> for Verdict {
    fn from(v: VerdictArg) -> Self {
        match v {
            VerdictArg::Confirmed => Verdict::Confirmed,
            VerdictArg::Dismissed => Verdict::Dismissed,
            VerdictArg::Inconclusive => Verdict::Inconclusive,
        }
    }
}

/// Arguments of `niix adjudicate`.
#[derive(Debug, clap::Args)]
pub struct AdjudicateArgs {
    /// The scan.
    pub scan_id: String,
    /// The verdict (on the scan, and on each --region given).
    #[arg(long, value_enum)]
    pub verdict: VerdictArg,
    /// A region of the machine report the verdict is about (repeatable).
    #[arg(long = "region")]
    pub regions: Vec<u32>,
    /// Why.
    #[arg(long, default_value = "")]
    pub comment: String,
    /// Who decides (default: $NIIX_OFFICER, else the login name).
    #[arg(long, env = "NIIX_OFFICER")]
    pub officer: Option<String>,
    /// Print the OPERATOR report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerArg,
}

/// Arguments of `niix watch`.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Resume after this cursor (from a previous event); default: only new events.
    #[arg(long)]
    pub cursor: Option<u64>,
    /// Only scans of this site.
    #[arg(long)]
    pub site: Option<String>,
    /// One JSON object per event.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerArg,
}

/// Report types as the CLI spells them.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ReportArg {
    /// The algorithm's report.
    Machine,
    /// The latest officer's report.
    Operator,
}

/// Arguments of `niix export-tdr`.
#[derive(Debug, clap::Args)]
pub struct ExportTdrArgs {
    /// The scan.
    pub scan_id: String,
    /// Where to write the .dcs file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Which report.
    #[arg(long, value_enum, default_value = "machine")]
    pub report: ReportArg,
    #[command(flatten)]
    pub server: ServerArg,
}

fn parse_window(w: &str) -> anyhow::Result<(u32, u32)> {
    let (a, b) = w.split_once(':').ok_or_else(|| anyhow::anyhow!("--window {w:?}: write LOW:HIGH, e.g. 2000:45000"))?;
    Ok((a.trim().parse()?, b.trim().parse()?))
}

/// Largest overlay `niix overlay` accepts from the server. A 2048x6144
/// container scan at the default 1600 px width is a PNG of about 8 MB, past
/// tonic's default of 4 MiB; a long scan's can be many times that.
const MAX_OVERLAY_BYTES: usize = 256 << 20;

/// `niix overlay`.
pub async fn overlay(args: OverlayArgs) -> anyhow::Result<()> {
    let (window_low, window_high) = match &args.window {
        Some(w) => parse_window(w)?,
        None => (0, 0),
    };
    let mut client = FindingsClient::new(args.server.connect().await?).max_decoding_message_size(MAX_OVERLAY_BYTES);
    let r = client
        .render_overlay(RenderOverlayRequest {
            scan_id: args.scan_id.clone(),
            plane_kind: args.plane.map(|p| PlaneKind::from(p) as i32).unwrap_or(0),
            plane_index: 0,
            max_width: args.max_width,
            window_low,
            window_high,
            hide_heat: args.no_heat,
            hide_boxes: args.no_boxes,
        })
        .await
        .map_err(StatusError)?
        .into_inner();
    std::fs::write(&args.output, &r.png)?;
    eprintln!("wrote {} ({}x{}, window {}..{})", args.output.display(), r.width, r.height, r.window_low, r.window_high);
    if r.shrunk_to_fit {
        eprintln!(
            "(narrower than --max-width {}: at that width the PNG would not fit a 4 MiB response)",
            args.max_width
        );
    }
    Ok(())
}

/// `niix adjudicate`.
pub async fn adjudicate(args: AdjudicateArgs) -> anyhow::Result<()> {
    let officer = args
        .officer
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .ok_or_else(|| anyhow::anyhow!("say who adjudicates: --officer ID or NIIX_OFFICER"))?;
    let verdict = Verdict::from(args.verdict) as i32;
    let regions = args
        .regions
        .iter()
        .map(|&id| RegionVerdict { region_id: id, verdict, comment: args.comment.clone() })
        .collect();
    let mut client = FindingsClient::new(args.server.connect().await?);
    let report = client
        .adjudicate(AdjudicateRequest {
            scan_id: args.scan_id.clone(),
            verdict,
            regions,
            comment: args.comment.clone(),
            officer_id: officer,
        })
        .await
        .map_err(StatusError)?
        .into_inner();
    if args.json {
        println!("{}", report_json(&report));
    } else {
        println!("scan {} adjudicated {:?} by {}", args.scan_id, args.verdict, report.operator_id);
    }
    Ok(())
}

/// `niix watch`: prints events until interrupted.
pub async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let mut client = FindingsClient::new(args.server.connect().await?);
    let request = WatchFindingsRequest {
        cursor: args.cursor.unwrap_or(0),
        live_only: args.cursor.is_none(),
        site_id: args.site.clone().unwrap_or_default(),
    };
    let mut stream = client.watch_findings(request).await.map_err(StatusError)?.into_inner();
    while let Some(event) = stream.next().await {
        let e = event.map_err(StatusError)?;
        let kind = FindingsEventKind::try_from(e.kind).map(|k| k.as_str_name()).unwrap_or("");
        let kind = kind.strip_prefix("FINDINGS_EVENT_KIND_").unwrap_or(kind).to_ascii_lowercase();
        let status = ScanStatus::try_from(e.status).map(|s| s.as_str_name()).unwrap_or("");
        let status = status.strip_prefix("SCAN_STATUS_").unwrap_or(status).to_ascii_lowercase();
        let report = e.report.as_ref().map(report_json).unwrap_or_default();
        if args.json {
            println!(
                "{}",
                json!({"cursor": e.cursor, "kind": kind, "scan_id": e.scan_id, "site_id": e.site_id,
                       "status": status, "report": report})
            );
        } else {
            println!(
                "{:>8}  {:<11}  {}  {:<10}  {}  score {}",
                e.cursor, kind, e.scan_id, e.site_id, report["decision"], report["score"]
            );
        }
    }
    Ok(())
}

/// `niix export-tdr`.
pub async fn export_tdr(args: ExportTdrArgs) -> anyhow::Result<()> {
    let report = match args.report {
        ReportArg::Machine => ReportType::Machine,
        ReportArg::Operator => ReportType::Operator,
    };
    let mut client = FindingsClient::new(args.server.connect().await?);
    let r = client
        .export_tdr(ExportTdrRequest { scan_id: args.scan_id.clone(), report: report as i32 })
        .await
        .map_err(StatusError)?
        .into_inner();
    std::fs::write(&args.output, &r.dicos)?;
    eprintln!("wrote {} (DICOS TDR, SOP Instance UID {})", args.output.display(), r.sop_instance_uid);
    Ok(())
}
