//! `niix scans`.

use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::{ListScansRequest, Scan, ScanStatus};
use serde_json::json;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::{ServerArg, enum_word};
use crate::client::{Authed, StatusError};
use crate::server::ANALYSIS_HEALTH;

/// Arguments of `niix scans`.
#[derive(Debug, clap::Args)]
pub struct ScansArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Only scans from this site.
    #[arg(long)]
    site: Option<String>,
    /// At most this many scans (newest first); 0 for all.
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

fn status_word(s: i32) -> String {
    let name = ScanStatus::try_from(s).map(|s| s.as_str_name()).unwrap_or("SCAN_STATUS_UNSPECIFIED");
    enum_word(name, "SCAN_STATUS_")
}

fn received_at(scan: &Scan) -> String {
    scan.received_at
        .as_ref()
        .map(|t| {
            let at = std::time::UNIX_EPOCH + std::time::Duration::new(t.seconds as u64, t.nanos as u32);
            humantime::format_rfc3339_millis(at).to_string()
        })
        .unwrap_or_default()
}

/// The JSON line of one scan.
pub fn scan_json(scan: &Scan) -> serde_json::Value {
    let meta = scan.metadata.clone().unwrap_or_default();
    json!({
        "scan_id": scan.scan_id,
        "status": status_word(scan.status),
        "received_at": received_at(scan),
        "site_id": meta.site_id,
        "lane_id": meta.lane_id,
        "container_numbers": meta.container_numbers,
        "planes": scan.planes.len(),
        "bytes": scan.planes.iter().map(|p| p.byte_length).sum::<u64>(),
    })
}

/// Prints a warning line on stderr when the server reports that scans are
/// not being analysed ([`ANALYSIS_HEALTH`] NOT_SERVING). A server that does
/// not answer the health check gets no warning: the listing says the rest.
async fn warn_if_not_analysing(conn: &Authed) {
    let mut health = HealthClient::new(conn.clone());
    let asked = health.check(HealthCheckRequest { service: ANALYSIS_HEALTH.into() }).await;
    if asked.is_ok_and(|r| r.into_inner().status == ServingStatus::NotServing as i32) {
        eprintln!(
            "warning: the server is not analysing scans ({ANALYSIS_HEALTH} is NOT_SERVING): it has no servable model, \
             so new scans wait in its queue; add a model to its model repository (`niix doctor` checks it)"
        );
    }
}

/// Lists scans, following pages.
pub async fn run(args: ScansArgs) -> anyhow::Result<()> {
    let conn = args.server.connect().await?;
    warn_if_not_analysing(&conn).await;
    let mut client = FindingsClient::new(conn);
    let mut token = String::new();
    let mut shown = 0usize;
    if !args.json {
        println!("{:<36}  {:<10}  {:<24}  {:<12}  planes", "scan_id", "status", "received_at", "site");
    }
    loop {
        let want = if args.limit == 0 { 1000 } else { (args.limit - shown).min(1000) };
        let page = client
            .list_scans(ListScansRequest {
                page_size: want as u32,
                page_token: token.clone(),
                site_id: args.site.clone().unwrap_or_default(),
                ..Default::default()
            })
            .await
            .map_err(StatusError)?
            .into_inner();
        for scan in &page.scans {
            if args.json {
                println!("{}", scan_json(scan));
            } else {
                let meta = scan.metadata.clone().unwrap_or_default();
                println!(
                    "{:<36}  {:<10}  {:<24}  {:<12}  {}",
                    scan.scan_id,
                    status_word(scan.status),
                    received_at(scan),
                    meta.site_id,
                    scan.planes.len()
                );
            }
        }
        shown += page.scans.len();
        token = page.next_page_token;
        if token.is_empty() || (args.limit != 0 && shown >= args.limit) {
            return Ok(());
        }
    }
}
