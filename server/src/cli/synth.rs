//! `niix synth`: synthetic dual- or single-energy cargo scans with ground
//! truth, of two independent scene families.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use niix_synth::{Conveyance, Family, Options};

/// Arguments of `niix synth`.
#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Directory for `NAME.high.tif`, `NAME.low.tif` and `NAME.json`
    /// (single-energy: `NAME.tif` and `NAME.json`).
    #[arg(long)]
    pub out: PathBuf,
    /// How many scans.
    #[arg(long, default_value_t = 10)]
    pub count: u64,
    /// Series seed: the same seed gives the same scans, byte for byte.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Index of the first scan in the series (to extend a set).
    #[arg(long, default_value_t = 0)]
    pub first: u64,
    /// Share of scans with anomalies, 0 to 1.
    #[arg(long, default_value_t = 0.5)]
    pub anomaly_rate: f64,
    /// Scene family: `trailer` (containers on trailers and box trucks, 6/4 MV,
    /// length along the longer side) or `portal` (rail wagons and flatbed
    /// trucks, 9/6 MV, length along x). The same seed gives unrelated scans
    /// in the two.
    #[arg(long, value_enum, default_value_t = FamilyArg::Trailer)]
    pub family: FamilyArg,
    /// Width in pixels (default: 2048 for `trailer`, 5760 for `portal`).
    #[arg(long)]
    pub width: Option<u32>,
    /// Height in pixels (default: 6144 for `trailer`, 1280 for `portal`).
    /// `trailer`: the conveyance runs along the longer side; `portal`: along
    /// the width, which must be at least the height.
    #[arg(long)]
    pub height: Option<u32>,
    /// What is scanned (family `trailer`; `portal` mixes its own conveyances).
    #[arg(long, value_enum, default_value_t = ConveyanceArg::Container)]
    pub conveyance: ConveyanceArg,
    /// 2: high- and low-energy planes; 1: the high-energy plane alone, as a
    /// single-energy scanner's `NAME.tif`.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub energies: u8,
    /// Also write `NAME.preview.png`, downsampled this many times, ground truth in red.
    #[arg(long)]
    pub preview: Option<u32>,
}

/// Scene families as the CLI spells them.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FamilyArg {
    /// Containers on trailers and box trucks, 6/4 MV.
    Trailer,
    /// Rail wagons and flatbed trucks at a 9/6 MV portal.
    Portal,
}

/// Conveyances as the CLI spells them.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ConveyanceArg {
    /// A 40 ft container on a trailer.
    Container,
    /// A rigid box truck.
    Truck,
}

/// Runs `niix synth`, on every core.
pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    anyhow::ensure!((0.0..=1.0).contains(&args.anomaly_rate), "--anomaly-rate must be between 0 and 1");
    let family = match args.family {
        FamilyArg::Trailer => Family::Trailer,
        FamilyArg::Portal => Family::Portal,
    };
    let (width, height) = family.default_size();
    let (width, height) = (args.width.unwrap_or(width), args.height.unwrap_or(height));
    anyhow::ensure!(width >= 64 && height >= 64, "--width and --height must be at least 64");
    anyhow::ensure!(
        family == Family::Trailer || width >= height,
        "--family portal scans run along x: --width ({width}) must be at least --height ({height})"
    );
    anyhow::ensure!(
        (u64::from(width) * u64::from(height)) <= 1 << 28,
        "--width x --height must be at most 268 million pixels"
    );
    let options = Options {
        width,
        height,
        family,
        energies: args.energies,
        conveyance: match args.conveyance {
            ConveyanceArg::Container => Conveyance::Container,
            ConveyanceArg::Truck => Conveyance::Truck,
        },
        anomaly_rate: args.anomaly_rate,
    };
    let next = AtomicU64::new(args.first);
    let end = args.first + args.count;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(args.count.max(1) as usize);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        if index >= end {
                            return Ok(());
                        }
                        let scan = niix_synth::generate(args.seed, index, &options);
                        niix_synth::write(&args.out, &scan)?;
                        if let Some(f) = args.preview {
                            let path = args.out.join(format!("{}.preview.png", scan.info.name));
                            std::fs::write(&path, niix_synth::preview_png(&scan, f))?;
                        }
                        let kinds: Vec<String> = scan
                            .info
                            .anomalies
                            .iter()
                            .map(|a| serde_json::to_value(a.kind).map(|v| v.as_str().unwrap_or_default().to_string()))
                            .collect::<Result<_, _>>()?;
                        println!("{} {:?} [{}]", scan.info.name, scan.info.cargo, kinds.join(","));
                    }
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| h.join().map_err(|_| anyhow::anyhow!("a generator thread panicked"))?)
    })
}
