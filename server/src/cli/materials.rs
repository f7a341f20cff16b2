//! `niix materials calibrate`: a scanner's material calibration (a
//! `[[web.materials]]` entry, see [`crate::material`]) fitted to a
//! dual-energy scan of step wedges of known materials.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use niix_inference::decode::{DecodeLimits, decode_rows};
use niix_proto::v1::PlaneKind;

use crate::client::{PlaneHints, describe_plane};
use crate::material::Calibration;

/// `niix materials` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum MaterialsCommand {
    /// Fit a scanner's material calibration to a scan of step wedges and
    /// print it as a `[[web.materials]]` entry for the server's config.
    Calibrate(CalibrateArgs),
}

/// A rectangle of a plane in pixels: `X,Y,WIDTH,HEIGHT`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    x: u32,
    y: u32,
    width: u32,
    height: u32,
}

impl std::str::FromStr for Rect {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let v: Vec<u32> = s
            .split(',')
            .map(|p| p.trim().parse::<u32>())
            .collect::<Result<_, _>>()
            .map_err(|_| format!("{s:?} is not a rectangle X,Y,WIDTH,HEIGHT in pixels (four whole numbers)"))?;
        match v[..] {
            [x, y, width, height] if width > 0 && height > 0 => Ok(Rect { x, y, width, height }),
            _ => Err(format!("{s:?} is not a rectangle X,Y,WIDTH,HEIGHT in pixels with a width and a height")),
        }
    }
}

/// Arguments of `niix materials calibrate`.
#[derive(Debug, clap::Args)]
pub struct CalibrateArgs {
    /// The high-energy plane of the calibration scan (16-bit TIFF, PNG, raw or DICOS).
    #[arg(long)]
    pub high: PathBuf,
    /// The low-energy plane.
    #[arg(long)]
    pub low: PathBuf,
    /// Width of raw planes.
    #[arg(long)]
    pub width: Option<u32>,
    /// Height of raw planes.
    #[arg(long)]
    pub height: Option<u32>,
    /// One step of an organic wedge (polyethylene, water, wood): X,Y,WIDTH,HEIGHT; give each step.
    #[arg(long, required = true)]
    pub organic: Vec<Rect>,
    /// One step of a light inorganic wedge (aluminium).
    #[arg(long, required = true)]
    pub mixed: Vec<Rect>,
    /// One step of a metal wedge (steel).
    #[arg(long, required = true)]
    pub inorganic: Vec<Rect>,
    /// Open beam (nothing between source and detector); default: each
    /// plane's 99.5th percentile, as the console takes it.
    #[arg(long)]
    pub air: Option<Rect>,
    /// The calibration's name, shown in the viewer.
    #[arg(long)]
    pub name: String,
    /// For scans whose scanner manufacturer is this.
    #[arg(long, default_value = "")]
    pub manufacturer: String,
    /// For scans whose scanner model is this.
    #[arg(long, default_value = "")]
    pub model: String,
    /// For scans at this peak (high) energy in kV.
    #[arg(long, default_value_t = 0.0)]
    pub peak_kv: f64,
    /// For scans at this low energy in kV.
    #[arg(long, default_value_t = 0.0)]
    pub low_kv: f64,
}

/// One plane read once: the mean sample of each rectangle, and the 99.5th
/// percentile of all samples (from a histogram: memory bounded by it, not
/// by the plane).
fn measure(path: &Path, kind: PlaneKind, args: &CalibrateArgs, rects: &[Rect]) -> anyhow::Result<(Vec<f64>, u16)> {
    let hints = PlaneHints { width: args.width, height: args.height, bits_stored: None, pixel_spacing_mm: (0.0, 0.0) };
    let d = describe_plane(path, kind, &hints)?;
    for r in rects {
        if u64::from(r.x) + u64::from(r.width) > u64::from(d.width)
            || u64::from(r.y) + u64::from(r.height) > u64::from(d.height)
        {
            bail!("{r:?} lies outside the {}x{} plane {}", d.width, d.height, path.display());
        }
    }
    let encoding = crate::header::decoder_encoding(d.encoding).context("an encoding the decoders read")?;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut sums = vec![0u64; rects.len()];
    let mut histogram = vec![0u64; 1 << 16];
    decode_rows(std::io::BufReader::new(file), encoding, d.width, d.height, &DecodeLimits::default(), |y, row| {
        for &v in row {
            histogram[usize::from(v)] += 1;
        }
        for (sum, r) in sums.iter_mut().zip(rects) {
            if (r.y..r.y + r.height).contains(&y) {
                *sum += row[r.x as usize..(r.x + r.width) as usize].iter().map(|&v| u64::from(v)).sum::<u64>();
            }
        }
        Ok(())
    })
    .with_context(|| format!("cannot decode {}", path.display()))?;
    let means = sums.iter().zip(rects).map(|(s, r)| *s as f64 / (f64::from(r.width) * f64::from(r.height))).collect();
    let (_, p995) = crate::overlay::window_of(&histogram);
    Ok((means, p995))
}

/// `niix materials calibrate`: prints the fitted `[[web.materials]]` entry.
pub fn calibrate(args: CalibrateArgs) -> anyhow::Result<()> {
    let groups = [&args.organic, &args.mixed, &args.inorganic];
    let rects: Vec<Rect> = groups.iter().flat_map(|g| g.iter().copied()).chain(args.air).collect();
    let (high, high_p995) = measure(&args.high, PlaneKind::HighEnergy, &args, &rects)?;
    let (low, low_p995) = measure(&args.low, PlaneKind::LowEnergy, &args, &rects)?;
    let air = match args.air {
        Some(_) => (high[rects.len() - 1], low[rects.len() - 1]),
        None => (f64::from(high_p995), f64::from(low_p995)),
    };
    let p = |air: f64, v: f64| (air.max(1.0) / v.max(1.0)).ln() as f32;
    let mut rays = Vec::new();
    let mut at = 0;
    for g in groups {
        rays.push((at..at + g.len()).map(|i| (p(air.0, high[i]), p(air.1, low[i]))).collect::<Vec<_>>());
        at += g.len();
    }
    let c = Calibration::derive(&args.name, &rays[0], &rays[1], &rays[2]).map_err(anyhow::Error::msg)?;
    let c = Calibration {
        manufacturer: args.manufacturer,
        model: args.model,
        peak_kv: args.peak_kv,
        low_kv: args.low_kv,
        ..c
    };
    eprintln!(
        "air levels {:.0} (high) and {:.0} (low); steps (p_high, R): organic {}; mixed {}; inorganic {}",
        air.0,
        air.1,
        steps(&rays[0]),
        steps(&rays[1]),
        steps(&rays[2])
    );
    println!("[[web.materials]]\n{}", toml::to_string(&c)?);
    Ok(())
}

fn steps(rays: &[(f32, f32)]) -> String {
    rays.iter().map(|(h, l)| format!("({h:.2}, {:.3})", l / h)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rectangles_parse_or_say_what_they_should_be() {
        assert_eq!("1,2,30,40".parse::<Rect>().unwrap(), Rect { x: 1, y: 2, width: 30, height: 40 });
        assert!("1,2,3".parse::<Rect>().unwrap_err().contains("X,Y,WIDTH,HEIGHT"));
        assert!("1,2,0,4".parse::<Rect>().is_err());
        assert!("a,b,c,d".parse::<Rect>().is_err());
    }
}
