//! `niix synth`: synthetic dual-energy cargo scans with ground truth.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use niix_synth::{Conveyance, Options};

/// Arguments of `niix synth`.
#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Directory for `NAME.high.tif`, `NAME.low.tif` and `NAME.json`.
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
    /// Width in pixels.
    #[arg(long, default_value_t = 2048)]
    pub width: u32,
    /// Height in pixels (the conveyance runs along the longer side).
    #[arg(long, default_value_t = 6144)]
    pub height: u32,
    /// What is scanned.
    #[arg(long, value_enum, default_value_t = ConveyanceArg::Container)]
    pub conveyance: ConveyanceArg,
    /// Also write `NAME.preview.png`, downsampled this many times, ground truth in red.
    #[arg(long)]
    pub preview: Option<u32>,
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
    anyhow::ensure!(args.width >= 64 && args.height >= 64, "--width and --height must be at least 64");
    let options = Options {
        width: args.width,
        height: args.height,
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
                        let kinds: Vec<String> =
                            scan.info.anomalies.iter().map(|a| format!("{:?}", a.kind).to_lowercase()).collect();
                        println!("{} {:?} [{}]", scan.info.name, scan.info.cargo, kinds.join(","));
                    }
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| h.join().map_err(|_| anyhow::anyhow!("a generator thread panicked"))?)
    })
}
