//! `niix push`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use niix_proto::v1::declaration_reference::Kind as DeclarationKind;
use niix_proto::v1::{
    ConveyanceType, DeclarationReference, Orientation, PlaneKind, ScanHeader, ScanMetadata, ScanReceipt, Scanner,
    SourceEnergy,
};
use serde_json::json;

use super::{ServerArg, enum_word};
use crate::client::{self, PlaneHints, Progress, PushOptions, Quiet};
use crate::events::timestamp;

/// What was scanned, as the CLI spells it.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Conveyance {
    /// Shipping container.
    Container,
    /// Truck or lorry.
    Truck,
    /// Rail wagon.
    RailWagon,
    /// Parcel.
    Parcel,
    /// Baggage.
    Baggage,
    /// Passenger vehicle.
    Vehicle,
}

impl From<Conveyance> for ConveyanceType {
    fn from(c: Conveyance) -> Self {
        match c {
            Conveyance::Container => ConveyanceType::Container,
            Conveyance::Truck => ConveyanceType::Truck,
            Conveyance::RailWagon => ConveyanceType::RailWagon,
            Conveyance::Parcel => ConveyanceType::Parcel,
            Conveyance::Baggage => ConveyanceType::Baggage,
            Conveyance::Vehicle => ConveyanceType::Vehicle,
        }
    }
}

/// Which image axis the conveyance's length runs along, as the CLI spells it.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LengthAlong {
    /// Across the columns (a side-on view, usually the wider side).
    X,
    /// Down the rows.
    Y,
}

/// Arguments of `niix push`.
#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The (high-energy or single-energy) plane: 16-bit grey TIFF or PNG, or raw
    /// little-endian u16 (*.raw, with --width and --height).
    pub file: PathBuf,
    /// The low-energy plane of a dual-energy scan.
    #[arg(long)]
    pub low_energy: Option<PathBuf>,
    #[command(flatten)]
    pub server: ServerArg,
    /// Scan id (UUID). Default: derived from the files and metadata, so the
    /// same push repeated is recognised as a duplicate and an interrupted
    /// push resumes.
    #[arg(long)]
    pub scan_id: Option<String>,
    /// Customs site that scanned.
    #[arg(long, env = "NIIX_SITE", default_value = "LOCAL")]
    pub site: String,
    /// Lane or portal at the site.
    #[arg(long, default_value = "")]
    pub lane: String,
    /// ISO 6346 container number (repeatable).
    #[arg(long = "container")]
    pub containers: Vec<String>,
    /// Vehicle registration plate.
    #[arg(long, default_value = "")]
    pub plate: String,
    /// Movement Reference Number of a declaration (repeatable).
    #[arg(long)]
    pub mrn: Vec<String>,
    /// Unique Consignment Reference (repeatable).
    #[arg(long)]
    pub ucr: Vec<String>,
    /// What was scanned (default: container if --container is given).
    #[arg(long, value_enum)]
    pub conveyance: Option<Conveyance>,
    /// The image axis the conveyance's length runs along (default: unstated,
    /// so the analysis takes the image's longer side).
    #[arg(long, value_enum)]
    pub length_along: Option<LengthAlong>,
    /// Acquisition time, RFC 3339 (default: the file's modification time).
    #[arg(long)]
    pub scan_time: Option<String>,
    /// Source peak energy in kV.
    #[arg(long, default_value_t = 0.0)]
    pub energy_kv: f64,
    /// Low energy in kV of a dual-energy source.
    #[arg(long, default_value_t = 0.0)]
    pub low_energy_kv: f64,
    /// Pixel size in millimetres (both axes).
    #[arg(long, default_value_t = 0.0)]
    pub pixel_spacing: f64,
    /// Width of raw planes.
    #[arg(long)]
    pub width: Option<u32>,
    /// Height of raw planes.
    #[arg(long)]
    pub height: Option<u32>,
    /// Significant bits per sample (default: the file's depth).
    #[arg(long)]
    pub bits_stored: Option<u32>,
    /// Scanner manufacturer.
    #[arg(long, default_value = "")]
    pub manufacturer: String,
    /// Scanner model.
    #[arg(long, default_value = "")]
    pub scanner_model: String,
    /// Attempts after the first if the connection breaks (resuming each time).
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// Wait for the analysis and print the findings too.
    #[arg(long)]
    pub wait: bool,
    /// Longest wait for the analysis, e.g. "2m".
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    /// Print the receipt as JSON.
    #[arg(long)]
    pub json: bool,
}

impl PushArgs {
    /// Builds the scan header (reads and hashes the files).
    pub fn header(&self) -> anyhow::Result<(ScanHeader, Vec<PathBuf>)> {
        let hints = PlaneHints {
            width: self.width,
            height: self.height,
            bits_stored: self.bits_stored,
            pixel_spacing_mm: (self.pixel_spacing, self.pixel_spacing),
        };
        let mut planes = Vec::new();
        let mut files = vec![self.file.clone()];
        let first_kind = if self.low_energy.is_some() { PlaneKind::HighEnergy } else { PlaneKind::SingleEnergy };
        planes.push(client::describe_plane(&self.file, first_kind, &hints)?);
        if let Some(low) = &self.low_energy {
            planes.push(client::describe_plane(low, PlaneKind::LowEnergy, &hints)?);
            files.push(low.clone());
        }
        let scan_time = match &self.scan_time {
            Some(t) => {
                humantime::parse_rfc3339_weak(t).with_context(|| format!("--scan-time {t:?} is not RFC 3339"))?
            }
            // The file's modification time is when the scanner wrote it, and
            // stays the same when the push is repeated.
            None => std::fs::metadata(&self.file).and_then(|m| m.modified()).unwrap_or_else(|_| SystemTime::now()),
        };
        let conveyance = match (self.conveyance, self.containers.is_empty()) {
            (Some(c), _) => ConveyanceType::from(c),
            (None, false) => ConveyanceType::Container,
            (None, true) => ConveyanceType::Unspecified,
        };
        let declarations = self
            .mrn
            .iter()
            .map(|v| (DeclarationKind::Mrn, v))
            .chain(self.ucr.iter().map(|v| (DeclarationKind::Ucr, v)))
            .map(|(k, v)| DeclarationReference { kind: k as i32, value: v.clone() })
            .collect();
        let metadata = ScanMetadata {
            scanner: Some(Scanner {
                manufacturer: self.manufacturer.clone(),
                model: self.scanner_model.clone(),
                ..Default::default()
            }),
            site_id: self.site.clone(),
            lane_id: self.lane.clone(),
            scan_time: Some(timestamp(scan_time)),
            conveyance: conveyance as i32,
            container_numbers: self.containers.clone(),
            vehicle_plate: self.plate.clone(),
            declarations,
            source: Some(SourceEnergy { peak_kv: self.energy_kv, low_kv: self.low_energy_kv }),
            remarks: String::new(),
            orientation: match self.length_along {
                None => Orientation::Unspecified,
                Some(LengthAlong::X) => Orientation::LengthAlongX,
                Some(LengthAlong::Y) => Orientation::LengthAlongY,
            } as i32,
        };
        let mut header = ScanHeader { scan_id: String::new(), metadata: Some(metadata), planes };
        header.scan_id = match &self.scan_id {
            Some(id) => id.clone(),
            None => client::content_scan_id(&header),
        };
        Ok((header, files))
    }
}

struct Bar(ProgressBar);

impl Bar {
    /// A note above the bar, or on stderr when there is no terminal.
    fn note(&self, text: String) {
        if self.0.is_hidden() { eprintln!("{text}") } else { self.0.println(text) }
    }
}

impl Progress for Bar {
    fn start(&self, total: u64, held: u64) {
        self.0.set_length(total);
        self.0.set_position(held);
        if held > 0 {
            self.note(format!("resuming: the server already holds {held} of {total} bytes"));
        }
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn retrying(&self, attempt: u32, error: &tonic::Status) {
        self.note(format!("connection broke ({}), retry {attempt}", error.message()));
    }
}

/// The JSON form of a receipt.
pub fn receipt_json(r: &ScanReceipt) -> serde_json::Value {
    let status = niix_proto::v1::ScanStatus::try_from(r.status).map(|s| s.as_str_name()).unwrap_or("");
    json!({
        "scan_id": r.scan_id,
        "duplicate": r.duplicate,
        "status": enum_word(status, "SCAN_STATUS_"),
        "planes": r.planes.iter().map(|p| json!({
            "index": p.index,
            "sha256": p.sha256,
            "bytes": p.byte_length,
        })).collect::<Vec<_>>(),
    })
}

/// Pushes the scan and prints the receipt.
pub async fn run(args: PushArgs) -> anyhow::Result<()> {
    let (header, files) = args.header()?;
    let channel = args.server.connect().await?;
    let progress: Arc<dyn Progress> = if args.json {
        Arc::new(Quiet)
    } else {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("static template"),
        );
        Arc::new(Bar(bar))
    };
    let options = PushOptions { retries: args.retries, ..Default::default() };
    let receipt = client::push_files(channel.clone(), header, files, &options, progress).await?;
    if args.wait {
        let f = super::findings::fetch(channel, &receipt.scan_id, true, args.timeout).await?;
        if args.json {
            let mut out = receipt_json(&receipt);
            out["findings"] = super::findings::findings_json(&f);
            println!("{out}");
        } else {
            let what = if receipt.duplicate { "already stored (duplicate)" } else { "stored" };
            println!("scan {} {what}", receipt.scan_id);
            super::findings::print_findings(&f);
        }
        return Ok(());
    }
    if args.json {
        println!("{}", receipt_json(&receipt));
    } else {
        let what = if receipt.duplicate { "already stored (duplicate)" } else { "stored" };
        println!("scan {} {what}", receipt.scan_id);
        for p in &receipt.planes {
            println!("  plane {}  {}  {} bytes", p.index, p.sha256, p.byte_length);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(clap::Parser)]
    struct Push {
        #[command(flatten)]
        args: PushArgs,
    }

    #[test]
    fn length_along_states_the_orientation_and_without_it_none_is_stated() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("scan.raw");
        std::fs::write(&raw, vec![0u8; 2 * 6 * 4]).unwrap();
        let orientation = |extra: &[&str]| {
            let base =
                ["push", raw.to_str().unwrap(), "--width", "6", "--height", "4", "--scan-time", "2026-01-01T00:00:00Z"];
            let push = Push::try_parse_from(base.iter().chain(extra)).unwrap();
            push.args.header().unwrap().0.metadata.unwrap().orientation
        };
        assert_eq!(orientation(&[]), Orientation::Unspecified as i32);
        assert_eq!(orientation(&["--length-along", "x"]), Orientation::LengthAlongX as i32);
        assert_eq!(orientation(&["--length-along", "y"]), Orientation::LengthAlongY as i32);
    }
}
