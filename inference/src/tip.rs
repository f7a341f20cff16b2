//! Threat image projection (docs/notes/site-training-plan.md, §2.3): objects
//! rendered into a window of a site's own normal scan with transmission
//! physics, so the site head learns what an inserted object looks like on
//! that site's scanner, cargo and conveyances.
//!
//! Everything happens in attenuation `A = -ln(I / I0)`, read back from the
//! model's input units (`x * std + mean`; only the `neg_log` transform
//! qualifies). Attenuations add where transmissions multiply, so the scan's
//! own noise, row gain drift and dead lines stay under the object. An object
//! adds `dA_hi` to high-energy channels and `R_m(A_hi) dA_hi` to low-energy
//! ones, with the material ratio `R_m` read from the site's own scans
//! ([`Calibration`]); a partly covered pixel gets the mean transmission,
//! `-ln(1 - c + c e^-dA)`; a [1,2,1]/4 blur stands in for detector crosstalk;
//! noise is topped up to the site's `σ(A')` where the object made the pixel
//! darker.

use ndarray::{Array2, ArrayView3, ArrayViewMut3, s};

use crate::fit::Picker;
use crate::manifest::{Manifest, TransformKind};
use crate::site_head::Normal;

/// Attenuation range of the ratio calibration's samples.
const RATIO_RANGE: (f32, f32) = (0.3, 8.0);
/// Bins of the ratio calibration, log-spaced over [`RATIO_RANGE`].
const RATIO_BINS: usize = 12;
/// Width of a noise-calibration bin, in attenuation.
const NOISE_BIN: f32 = 0.1;

/// TIP cannot work on this model or scan.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TipError {
    /// Not attenuation input.
    #[error(
        "threat image projection needs the neg_log transform (attenuation); model input {0:?} is not: \
         site training is not available for this model"
    )]
    Transform(String),
}

/// What a channel carries, for the physics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Energy {
    /// The high-energy (or only) plane: gets `dA_hi`.
    High,
    /// The low-energy plane: gets `R_m dA_hi`.
    Low,
}

/// How model input maps to attenuation, per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Units {
    /// Per channel: `A = x * std + mean`.
    pub mean: Vec<f32>,
    /// Per channel.
    pub std: Vec<f32>,
    /// Largest attenuation the transform keeps (its clip).
    pub clip_hi: f32,
    /// Per channel, the energy it carries.
    pub energy: Vec<Energy>,
    /// Per channel, the scan plane that feeds it (`ModelInput.planes`):
    /// channels fed by one plane get the same object and noise.
    pub plane: Vec<usize>,
}

impl Units {
    /// From a model's manifest and the planes feeding its channels.
    pub fn from_manifest(m: &Manifest, planes: &[usize]) -> Result<Units, TipError> {
        if m.transform.kind != TransformKind::NegLog {
            return Err(TipError::Transform(format!("{:?}", m.transform.kind).to_lowercase()));
        }
        let channels = m.input.channels.len();
        let (mean, std) = (0..channels).map(|c| m.normalisation(c)).unzip();
        let energy = (0..channels)
            .map(|c| if m.channel_kinds(c).first() == Some(&"low_energy") { Energy::Low } else { Energy::High })
            .collect();
        let clip_hi = m.transform.clip.map_or(f32::INFINITY, |[_, hi]| hi);
        Ok(Units { mean, std, clip_hi, energy, plane: planes.to_vec() })
    }

    /// The first high-energy channel and, when a distinct plane feeds one,
    /// the first low-energy channel.
    fn hi_lo(&self) -> (usize, Option<usize>) {
        let hi = self.energy.iter().position(|e| *e == Energy::High).unwrap_or(0);
        let lo = (0..self.energy.len()).find(|&c| self.energy[c] == Energy::Low && self.plane[c] != self.plane[hi]);
        (hi, lo)
    }

    fn attenuation(&self, c: usize, x: f32) -> f32 {
        x * self.std[c] + self.mean[c]
    }
}

/// What an object is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Material {
    /// Water-like: the highest low/high ratio.
    Organic,
    /// Aluminium-like.
    LightMetal,
    /// Iron.
    Steel,
    /// Lead-like: below steel.
    LeadLike,
}

impl Material {
    /// Where the material sits between the site's steel (0) and organic (1) ratio.
    pub fn k(self) -> f32 {
        match self {
            Material::Organic => 1.0,
            Material::LightMetal => 0.7,
            Material::Steel => 0.0,
            Material::LeadLike => -0.7,
        }
    }

    /// The low/high attenuation ratio of `niix synth`'s XCOM tables weighted
    /// by its spectra, used when the site's own scans do not show it.
    pub fn ratio(self) -> f32 {
        match self {
            Material::Organic => 1.247,
            Material::LightMetal => 1.232,
            Material::Steel => 1.194,
            Material::LeadLike => 1.158,
        }
    }
}

/// The site's material ratio and noise, measured on its normal scans.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// Per bin of `A_hi` (log-spaced over 0.3-8), the 95th (organic) and 5th
    /// (steel) percentile of `A_lo / A_hi`; `None` where the scans did not
    /// show a gap of at least 0.01 (then the [`Material::ratio`] constants).
    pub ratio: Vec<Option<(f32, f32)>>,
    /// Per channel, the effective unattenuated counts `I0_eff` of the
    /// site's photon noise: `σ(A)² = e^A / I0_eff` ([`Calibration::sigma`]).
    pub photons: Vec<f32>,
}

fn ratio_bin(a_hi: f32) -> usize {
    let (lo, hi) = RATIO_RANGE;
    let t = (a_hi.clamp(lo, hi).ln() - lo.ln()) / (hi.ln() - lo.ln());
    ((t * RATIO_BINS as f32) as usize).min(RATIO_BINS - 1)
}

fn percentile(v: &mut [f32], q: f32) -> f32 {
    let i = ((v.len() - 1) as f32 * q).round() as usize;
    *v.select_nth_unstable_by(i, f32::total_cmp).1
}

impl Calibration {
    /// A calibration that knows no site: the constant ratios, and photon
    /// noise of `photons` effective counts per channel.
    pub fn fixed(photons: Vec<f32>) -> Calibration {
        Calibration { ratio: vec![None; RATIO_BINS], photons }
    }

    /// Measures ratio and noise on scans in model units (`[channels, h, w]`).
    /// The ratio is read from 20,000 4x4-block means per scan (a block, not a
    /// pixel, so the scan's noise does not widen the percentiles).
    pub fn measure(scans: &[ArrayView3<'_, f32>], units: &Units, seed: u64) -> Calibration {
        let (hi, lo) = units.hi_lo();
        let mut bins: Vec<Vec<f32>> = vec![Vec::new(); RATIO_BINS];
        let mut pick = Picker(seed);
        if let Some(lo) = lo {
            for scan in scans {
                let (_, h, w) = scan.dim();
                if h < 4 || w < 4 {
                    continue;
                }
                for _ in 0..20_000 {
                    let (y, x) = (pick.next(h - 3), pick.next(w - 3));
                    let mean = |c: usize| scan.slice(s![c, y..y + 4, x..x + 4]).mean().unwrap_or(0.0);
                    let (a_hi, a_lo) = (units.attenuation(hi, mean(hi)), units.attenuation(lo, mean(lo)));
                    if a_hi >= RATIO_RANGE.0 && a_hi <= RATIO_RANGE.1 && a_lo < units.clip_hi {
                        bins[ratio_bin(a_hi)].push(a_lo / a_hi);
                    }
                }
            }
        }
        let ratio = bins
            .iter_mut()
            .map(|b| {
                if b.len() < 50 {
                    return None;
                }
                let (org, steel) = (percentile(b, 0.95), percentile(b, 0.05));
                (org - steel >= 0.01).then_some((org, steel))
            })
            .collect();
        let photons = (0..units.std.len()).map(|c| photon_counts(scans, units, c)).collect();
        Calibration { ratio, photons }
    }

    /// `R_m` at `a_hi`: the site's steel and organic ratios of that bin (or
    /// the nearest measured bin), interpolated by the material's `k`.
    pub fn ratio(&self, material: Material, a_hi: f32) -> f32 {
        let b = ratio_bin(a_hi);
        let near = (0..RATIO_BINS).filter_map(|i| self.ratio[i].map(|r| (i.abs_diff(b), r))).min_by_key(|(d, _)| *d);
        match near {
            Some((_, (org, steel))) => steel + material.k() * (org - steel),
            None => material.ratio(),
        }
    }

    /// `σ(A)` of channel `c`: photon noise after the log, `sqrt(e^A / I0_eff)`.
    pub fn sigma(&self, c: usize, a: f32) -> f32 {
        let photons = self.photons.get(c).or(self.photons.last()).copied().unwrap_or(f32::INFINITY);
        (a.max(0.0).exp() / photons).sqrt()
    }
}

/// The effective counts `I0_eff` of one channel's photon noise. Per 8x8
/// block, `σ = 1.4826 median|ΔA| / √2` over neighbouring pixels along x and,
/// separately, along y, the smaller of the two (the detector array's fixed
/// gain pattern lies along one axis and inflates differences across
/// detectors; it stays under an object, so it is no part of the noise to
/// add). Blocks are binned by mean attenuation (0.1 wide) and each bin with
/// at least 32 blocks gives its 20th percentile (the flattest blocks:
/// texture inflates the rest). Photon noise after the log has `σ² = e^A /
/// I0`, so each bin estimates `I0_eff = e^A / σ²`; the median over bins is
/// the result. One parameter, not a table per bin: on four small scans the
/// bins above A = 2 hold few flat blocks and read 30-45 % high, and a
/// monotone table carries the worst of them to every bin above.
fn photon_counts(scans: &[ArrayView3<'_, f32>], units: &Units, c: usize) -> f32 {
    let top = if units.clip_hi.is_finite() { units.clip_hi } else { 10.0 };
    let n = (top / NOISE_BIN).ceil() as usize + 1;
    let mut bins: Vec<Vec<f32>> = vec![Vec::new(); n];
    let (mut along_x, mut along_y) = (Vec::with_capacity(56), Vec::with_capacity(56));
    for scan in scans {
        let (_, h, w) = scan.dim();
        for by in (0..h.saturating_sub(7)).step_by(8) {
            for bx in (0..w.saturating_sub(7)).step_by(8) {
                let block = scan.slice(s![c, by..by + 8, bx..bx + 8]);
                along_x.clear();
                along_y.clear();
                let sum = block.sum();
                for i in 0..8 {
                    for j in 0..7 {
                        along_x.push(((block[[i, j + 1]] - block[[i, j]]) * units.std[c]).abs());
                        along_y.push(((block[[j + 1, i]] - block[[j, i]]) * units.std[c]).abs());
                    }
                }
                let a = units.attenuation(c, sum / 64.0);
                if a >= top - 0.05 {
                    continue; // Clipped: no noise to see.
                }
                let mad = percentile(&mut along_x, 0.5).min(percentile(&mut along_y, 0.5));
                let sigma = 1.4826 * mad / std::f32::consts::SQRT_2;
                bins[((a.max(0.0) / NOISE_BIN) as usize).min(n - 1)].push(sigma);
            }
        }
    }
    let mut estimates: Vec<f32> = bins
        .iter_mut()
        .enumerate()
        .filter(|(i, b)| b.len() >= 32 && *i >= 2)
        .filter_map(|(i, b)| {
            let sigma = percentile(b, 0.2);
            let a = (i as f32 + 0.5) * NOISE_BIN;
            (sigma > 0.0).then(|| a.exp() / (sigma * sigma))
        })
        .collect();
    if estimates.is_empty() {
        return f32::INFINITY; // No noise seen: add none.
    }
    percentile(&mut estimates, 0.5)
}

/// An object's outline.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// A box `height x width` (pixels), turned by `angle` (radians).
    Box {
        /// Along y before turning.
        height: f32,
        /// Along x before turning.
        width: f32,
        /// Turn.
        angle: f32,
    },
    /// An ellipse with semi-axes (pixels), turned by `angle`.
    Ellipse {
        /// Semi-axis along y before turning.
        ry: f32,
        /// Semi-axis along x before turning.
        rx: f32,
        /// Turn.
        angle: f32,
    },
    /// Overlapping ellipses (centre offsets from the object's centre).
    Blob(Vec<(f32, f32, f32, f32, f32)>),
    /// A lying cylinder: a box whose thickness follows the chord across its
    /// `width` (`sqrt(1 - r²)`).
    Cylinder {
        /// Length along y before turning.
        length: f32,
        /// Diameter along x before turning.
        width: f32,
        /// Turn.
        angle: f32,
    },
}

/// One projected object.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// Centre (y, x) in window pixels.
    pub center: (f32, f32),
    /// Outline.
    pub shape: Shape,
    /// What it is made of.
    pub material: Material,
    /// Peak high-energy attenuation it adds.
    pub d_a_hi: f32,
    /// Thickness gradient along the object's own x (±), 0 for uniform.
    pub gradient: f32,
}

impl Object {
    /// Half-extent of its bounding box (y, x), pixels.
    fn reach(&self) -> (f32, f32) {
        let turned = |h: f32, w: f32, a: f32| {
            let (sa, ca) = (a.sin().abs(), a.cos().abs());
            (0.5 * (h * ca + w * sa), 0.5 * (h * sa + w * ca))
        };
        match &self.shape {
            Shape::Box { height, width, angle } => turned(*height, *width, *angle),
            Shape::Cylinder { length, width, angle } => turned(*length, *width, *angle),
            Shape::Ellipse { ry, rx, angle } => turned(2.0 * ry, 2.0 * rx, *angle),
            Shape::Blob(parts) => parts.iter().fold((0.0f32, 0.0f32), |acc, &(dy, dx, ry, rx, _)| {
                let r = ry.max(rx);
                (acc.0.max(dy.abs() + r), acc.1.max(dx.abs() + r))
            }),
        }
    }

    /// Whether the point (pixel coordinates) lies inside, and the relative
    /// thickness there (1 inside a uniform object).
    fn at(&self, y: f32, x: f32) -> Option<f32> {
        let (dy, dx) = (y - self.center.0, x - self.center.1);
        let local = |a: f32| {
            let (s, c) = a.sin_cos();
            (dy * c - dx * s, dy * s + dx * c)
        };
        let inside_ellipse = |v: f32, u: f32, ry: f32, rx: f32| (v / ry).powi(2) + (u / rx).powi(2) <= 1.0;
        let (thick, u_rel) = match &self.shape {
            Shape::Box { height, width, angle } => {
                let (v, u) = local(*angle);
                if v.abs() > height / 2.0 || u.abs() > width / 2.0 {
                    return None;
                }
                (1.0, u / (width / 2.0))
            }
            Shape::Cylinder { length, width, angle } => {
                let (v, u) = local(*angle);
                let r = u / (width / 2.0);
                if v.abs() > length / 2.0 || r.abs() > 1.0 {
                    return None;
                }
                ((1.0 - r * r).max(0.0).sqrt(), r)
            }
            Shape::Ellipse { ry, rx, angle } => {
                let (v, u) = local(*angle);
                if !inside_ellipse(v, u, *ry, *rx) {
                    return None;
                }
                (1.0, u / rx)
            }
            Shape::Blob(parts) => {
                let hit = parts.iter().any(|&(py, px, ry, rx, a)| {
                    let (qy, qx) = (dy - py, dx - px);
                    let (s, c) = a.sin_cos();
                    inside_ellipse(qy * c - qx * s, qy * s + qx * c, ry, rx)
                });
                if !hit {
                    return None;
                }
                (1.0, 0.0)
            }
        };
        Some(thick * (1.0 + self.gradient * u_rel.clamp(-1.0, 1.0)))
    }

    /// Coverage (0-1) and mean relative thickness of pixel (py, px): exact
    /// for an unturned box, 4x4 samples on other outlines' boundaries.
    fn pixel(&self, py: usize, px: usize) -> (f32, f32) {
        if let Shape::Box { height, width, angle } = &self.shape
            && *angle == 0.0
            && self.gradient == 0.0
        {
            let overlap = |lo: f32, hi: f32, p: f32| (hi.min(p + 1.0) - lo.max(p)).clamp(0.0, 1.0);
            let (cy, cx) = self.center;
            let c = overlap(cy - height / 2.0, cy + height / 2.0, py as f32)
                * overlap(cx - width / 2.0, cx + width / 2.0, px as f32);
            return (c, 1.0);
        }
        let (y, x) = (py as f32 + 0.5, px as f32 + 0.5);
        // Centre and corners agree: no boundary crosses the pixel (for
        // objects much larger than a pixel), so one sample says it.
        let probes = [(0.0, 0.0), (-0.5, -0.5), (-0.5, 0.5), (0.5, -0.5), (0.5, 0.5)];
        let inside: Vec<bool> = probes.iter().map(|(a, b)| self.at(y + a, x + b).is_some()).collect();
        if inside.iter().all(|&v| v) {
            return (1.0, self.at(y, x).unwrap_or(1.0));
        }
        let (mut hits, mut thick) = (0.0f32, 0.0f32);
        for i in 0..4 {
            for j in 0..4 {
                if let Some(t) = self.at(py as f32 + (i as f32 + 0.5) / 4.0, px as f32 + (j as f32 + 0.5) / 4.0) {
                    hits += 1.0;
                    thick += t;
                }
            }
        }
        if hits == 0.0 { (0.0, 0.0) } else { (hits / 16.0, thick / hits) }
    }
}

/// Rendering switches (tests turn the stochastic and smoothing parts off).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Render {
    /// [1,2,1]/4 blur of the added attenuation on both axes.
    pub blur: bool,
    /// Noise topped up to the site's `σ(A')`.
    pub noise: bool,
}

impl Default for Render {
    fn default() -> Self {
        Render { blur: true, noise: true }
    }
}

/// What one rendered object left in the window.
#[derive(Debug, Clone, PartialEq)]
pub struct Footprint {
    /// Bounding box rows and columns (half-open), clipped to the window.
    pub rows: (usize, usize),
    /// See `rows`.
    pub cols: (usize, usize),
    /// Per pixel of the box, its coverage.
    pub cover: Array2<f32>,
    /// Per pixel of the box, the high-energy attenuation it added after clipping and noise.
    pub added: Array2<f32>,
    /// At least 0.05 added on half the object's pixels: an object a
    /// detector could see (not one hidden by saturated structure).
    pub visible: bool,
}

/// Renders `objects` into `window` (`[channels, h, w]`, model units), one
/// after the other, and says what each left there.
pub fn render(
    mut window: ArrayViewMut3<'_, f32>,
    objects: &[Object],
    units: &Units,
    calibration: &Calibration,
    options: Render,
    seed: u64,
) -> Vec<Footprint> {
    let mut normal = Normal(Picker(seed), None);
    objects.iter().map(|o| render_one(window.view_mut(), o, units, calibration, options, &mut normal)).collect()
}

fn blur(a: &mut Array2<f32>) {
    let (h, w) = a.dim();
    let src = a.clone();
    for y in 0..h {
        for x in 0..w {
            let l = src[[y, x.saturating_sub(1)]];
            let r = src[[y, (x + 1).min(w - 1)]];
            a[[y, x]] = 0.25 * l + 0.5 * src[[y, x]] + 0.25 * r;
        }
    }
    let src = a.clone();
    for y in 0..h {
        for x in 0..w {
            let u = src[[y.saturating_sub(1), x]];
            let d = src[[(y + 1).min(h - 1), x]];
            a[[y, x]] = 0.25 * u + 0.5 * src[[y, x]] + 0.25 * d;
        }
    }
}

fn render_one(
    mut window: ArrayViewMut3<'_, f32>,
    o: &Object,
    units: &Units,
    cal: &Calibration,
    options: Render,
    normal: &mut Normal,
) -> Footprint {
    let (channels, h, w) = window.dim();
    let (ry, rx) = o.reach();
    // One pixel of margin for the blur.
    let margin = 2.0;
    let clampi = |v: f32, hi: usize| (v.floor().max(0.0) as usize).min(hi);
    let rows = (clampi(o.center.0 - ry - margin, h), clampi(o.center.0 + ry + margin + 1.0, h));
    let cols = (clampi(o.center.1 - rx - margin, w), clampi(o.center.1 + rx + margin + 1.0, w));
    let (bh, bw) = (rows.1 - rows.0, cols.1 - cols.0);
    let mut cover = Array2::<f32>::zeros((bh, bw));
    let mut thick = Array2::<f32>::zeros((bh, bw));
    for y in 0..bh {
        for x in 0..bw {
            let (c, t) = o.pixel(rows.0 + y, cols.0 + x);
            cover[[y, x]] = c;
            thick[[y, x]] = t;
        }
    }
    let (hi, _) = units.hi_lo();
    let a_hi = window.slice(s![hi, rows.0..rows.1, cols.0..cols.1]).mapv(|v| units.attenuation(hi, v));
    let mut added = Array2::<f32>::zeros((bh, bw));
    // Per distinct plane: the attenuation the object adds, then noise, then
    // every channel of that plane gets the same result.
    let mut done: Vec<(usize, Array2<f32>)> = Vec::new();
    for c in 0..channels {
        let plane = units.plane[c];
        if let Some((_, new)) = done.iter().find(|(p, _)| *p == plane) {
            write_channel(window.view_mut(), c, new, rows, cols, units);
            continue;
        }
        let low = units.energy[c] == Energy::Low && units.plane[c] != units.plane[hi];
        let mut delta = Array2::<f32>::zeros((bh, bw));
        for y in 0..bh {
            for x in 0..bw {
                let cov = cover[[y, x]];
                if cov <= 0.0 {
                    continue;
                }
                let mut d = o.d_a_hi * thick[[y, x]];
                if low {
                    d *= cal.ratio(o.material, a_hi[[y, x]]);
                }
                // The mean transmission of the pixel, not the mean attenuation.
                delta[[y, x]] = -(1.0 - cov + cov * (-d).exp()).ln();
            }
        }
        if options.blur {
            blur(&mut delta);
        }
        let before = window.slice(s![c, rows.0..rows.1, cols.0..cols.1]).mapv(|v| units.attenuation(c, v));
        let mut after = &before + &delta;
        if options.noise {
            for ((a, &b), &d) in after.iter_mut().zip(&before).zip(&delta) {
                if d > 1e-4 {
                    let extra = cal.sigma(c, *a).powi(2) - cal.sigma(c, b).powi(2);
                    if extra > 0.0 {
                        *a += extra.sqrt() * normal.sample() as f32;
                    }
                }
            }
        }
        after.mapv_inplace(|v| v.clamp(0.0, units.clip_hi));
        if c == hi {
            added = &after - &before.mapv(|v| v.min(units.clip_hi));
        }
        write_channel(window.view_mut(), c, &after, rows, cols, units);
        done.push((plane, after));
    }
    let object_pixels = cover.iter().filter(|&&c| c >= 0.5).count();
    let seen = cover.iter().zip(&added).filter(|&(&c, &a)| c >= 0.5 && a >= 0.05).count();
    let visible = object_pixels > 0 && 2 * seen >= object_pixels;
    Footprint { rows, cols, cover, added, visible }
}

fn write_channel(
    mut window: ArrayViewMut3<'_, f32>,
    c: usize,
    attenuation: &Array2<f32>,
    rows: (usize, usize),
    cols: (usize, usize),
    units: &Units,
) {
    let mut dst = window.slice_mut(s![c, rows.0..rows.1, cols.0..cols.1]);
    dst.zip_mut_with(attenuation, |x, &a| *x = (a - units.mean[c]) / units.std[c]);
}

/// A map cell's training label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// Normal: trained as 0.
    Negative,
    /// An object: trained as 1.
    Positive,
    /// Touched by an object but not clearly one, or next to one: not trained on.
    Ignore,
}

/// Labels of a `[h / cell, w / cell]` map for the footprints in a window.
/// A cell is positive when a visible object covers a quarter of it or adds
/// at least `min_mass` (attenuation x cm², 16 is about 400 g of steel) in
/// it; any other cell an object touches, and the ring of cells around each
/// object's box, is ignored.
pub fn labels(
    footprints: &[Footprint],
    (h, w): (usize, usize),
    cell: usize,
    pixel_mm: f32,
    min_mass: f32,
) -> Array2<Label> {
    let (mh, mw) = (h.div_ceil(cell), w.div_ceil(cell));
    let mut out = Array2::from_elem((mh, mw), Label::Negative);
    let mut positive = Array2::from_elem((mh, mw), false);
    let pixel_cm2 = (pixel_mm / 10.0).powi(2);
    for f in footprints {
        let mut cover = Array2::<f32>::zeros((mh, mw));
        let mut mass = Array2::<f32>::zeros((mh, mw));
        let mut touched = Array2::from_elem((mh, mw), false);
        let (mut lo, mut hi) = ((usize::MAX, usize::MAX), (0usize, 0usize));
        for ((y, x), &c) in f.cover.indexed_iter() {
            if c <= 0.0 {
                continue;
            }
            let (gy, gx) = ((f.rows.0 + y) / cell, (f.cols.0 + x) / cell);
            cover[[gy, gx]] += c;
            mass[[gy, gx]] += f.added[[y, x]].max(0.0) * pixel_cm2;
            touched[[gy, gx]] = true;
            lo = (lo.0.min(gy), lo.1.min(gx));
            hi = (hi.0.max(gy), hi.1.max(gx));
        }
        if lo.0 == usize::MAX {
            continue;
        }
        // The ring around the object's box.
        for gy in lo.0.saturating_sub(1)..=(hi.0 + 1).min(mh - 1) {
            for gx in lo.1.saturating_sub(1)..=(hi.1 + 1).min(mw - 1) {
                touched[[gy, gx]] = true;
            }
        }
        let area = (cell * cell) as f32;
        for ((gy, gx), &t) in touched.indexed_iter() {
            if !t {
                continue;
            }
            if f.visible && (cover[[gy, gx]] >= 0.25 * area || mass[[gy, gx]] >= min_mass) {
                positive[[gy, gx]] = true;
            }
            out[[gy, gx]] = Label::Ignore;
        }
    }
    for (o, &p) in out.iter_mut().zip(&positive) {
        if p {
            *o = Label::Positive;
        }
    }
    out
}

/// Where an object is put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Empty space inside the conveyance.
    FreeSpace,
    /// Inside cargo.
    InCargo,
    /// Against or inside the conveyance's structure.
    Structure,
    /// A thin partition across the load.
    Partition,
    /// A cluster of drums or blocks on one floor band.
    Cluster,
    /// A large slab or drum.
    Large,
}

/// Random objects for one window: 1-3 placements inside `inner` (rows and
/// columns, half-open), sized with `pixel_mm`, placed by what the window
/// holds there (§2.3).
pub fn sample_objects(
    window: ArrayView3<'_, f32>,
    units: &Units,
    inner: ((usize, usize), (usize, usize)),
    pixel_mm: f32,
    seed: u64,
) -> Vec<(Placement, Object)> {
    let mut pick = Picker(seed);
    let (hi, _) = units.hi_lo();
    let ((y0, y1), (x0, x1)) = inner;
    let a_at =
        |y: usize, x: usize| units.attenuation(hi, window[[hi, y.min(window.dim().1 - 1), x.min(window.dim().2 - 1)]]);
    let mut out = Vec::new();
    let count = 1 + pick.next(3);
    for _ in 0..count {
        let placement = choose(
            &mut pick,
            &[
                (Placement::FreeSpace, 0.25),
                (Placement::InCargo, 0.30),
                (Placement::Structure, 0.15),
                (Placement::Partition, 0.10),
                (Placement::Cluster, 0.10),
                (Placement::Large, 0.10),
            ],
        );
        // A spot matching the placement, from 64 tries (else the last try).
        let wanted = |a: f32| match placement {
            Placement::FreeSpace => a < 0.2,
            Placement::InCargo | Placement::Partition | Placement::Cluster | Placement::Large => {
                (0.5..4.0).contains(&a)
            }
            Placement::Structure => a > 2.0,
        };
        let mut spot = (y0, x0);
        for _ in 0..64 {
            spot = (y0 + pick.next((y1 - y0).max(1)), x0 + pick.next((x1 - x0).max(1)));
            if wanted(a_at(spot.0, spot.1)) {
                break;
            }
        }
        let px = |mm: f32| mm / pixel_mm;
        let log_uniform =
            |pick: &mut Picker, lo: f32, hi: f32| (lo.ln() + pick.unit() as f32 * (hi.ln() - lo.ln())).exp();
        let material = choose(
            &mut pick,
            &[
                (Material::Organic, 0.3),
                (Material::LightMetal, 0.2),
                (Material::Steel, 0.35),
                (Material::LeadLike, 0.15),
            ],
        );
        let angle = (pick.unit() as f32) * std::f32::consts::PI;
        let center = (spot.0 as f32 + 0.5, spot.1 as f32 + 0.5);
        let gradient = if pick.unit() < 0.5 { 0.0 } else { 0.1 * (2.0 * pick.unit() as f32 - 1.0) };
        let d_a_hi = log_uniform(&mut pick, 0.08, 6.0);
        match placement {
            Placement::Partition => {
                // Thin along the length axis (y), 0.3-1.2 m across, organic.
                let thick = px(8.0 + 32.0 * pick.unit() as f32);
                let across = px(300.0 + 900.0 * pick.unit() as f32);
                // 60-200 g/cm² of organic along the beam; water's mass
                // attenuation at 6 MV is about 0.049 cm²/g (steel's 0.0412
                // scaled by Z/A, Compton-dominated), capped at the range's 6.
                let d = (0.049 * (60.0 + 140.0 * pick.unit() as f32)).min(6.0);
                let shape = Shape::Box { height: thick.max(2.0), width: across, angle: 0.0 };
                out.push((placement, Object { center, shape, material: Material::Organic, d_a_hi: d, gradient: 0.0 }));
            }
            Placement::Cluster => {
                // In a row along the length axis (y), inside the inner region.
                let n = 3 + pick.next(6);
                let gap = px(50.0 * pick.unit() as f32);
                let room = (y1 - y0) as f32 / n as f32 - gap;
                let size = px(log_uniform(&mut pick, 100.0, 400.0)).min(room).max(4.0);
                let drums = pick.unit() < 0.5;
                let half = n as f32 * (size + gap) / 2.0;
                let middle = center.0.clamp(y0 as f32 + half, (y1 as f32 - half).max(y0 as f32 + half));
                for i in 0..n {
                    let offset = (i as f32 - (n as f32 - 1.0) / 2.0) * (size + gap);
                    let c = (middle + offset, center.1);
                    let shape = if drums {
                        Shape::Cylinder { length: size, width: size, angle: std::f32::consts::FRAC_PI_2 }
                    } else {
                        Shape::Box { height: size, width: size, angle: 0.0 }
                    };
                    out.push((placement, Object { center: c, shape, material, d_a_hi, gradient: 0.0 }));
                }
            }
            _ => {
                let (lo, hi_mm) = if placement == Placement::Large { (300.0, 1000.0) } else { (10.0, 1000.0) };
                let a = px(log_uniform(&mut pick, lo, hi_mm)).max(1.0);
                let b = px(log_uniform(&mut pick, lo, hi_mm)).max(1.0);
                let shape = match pick.next(if placement == Placement::Large { 2 } else { 4 }) {
                    0 => Shape::Box { height: a, width: b, angle },
                    1 => Shape::Cylinder { length: a, width: b, angle },
                    2 => Shape::Ellipse { ry: a / 2.0, rx: b / 2.0, angle },
                    _ => Shape::Blob(
                        (0..2 + pick.next(3))
                            .map(|_| {
                                let r = a.min(b) / 2.0;
                                let off = |p: &mut Picker| (p.unit() as f32 - 0.5) * r;
                                (
                                    off(&mut pick),
                                    off(&mut pick),
                                    r * (0.5 + pick.unit() as f32 * 0.5),
                                    r * (0.5 + pick.unit() as f32 * 0.5),
                                    angle,
                                )
                            })
                            .collect(),
                    ),
                };
                out.push((placement, Object { center, shape, material, d_a_hi, gradient }));
            }
        }
    }
    out
}

fn choose<T: Copy>(pick: &mut Picker, items: &[(T, f64)]) -> T {
    let total: f64 = items.iter().map(|(_, w)| w).sum();
    let mut r = pick.unit() * total;
    for &(item, w) in items {
        if r < w {
            return item;
        }
        r -= w;
    }
    items[items.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    /// Dual-energy units as the shipped model has them: A / 2.5, clip 10.
    fn dual() -> Units {
        Units {
            mean: vec![0.0, 0.0],
            std: vec![2.5, 2.5],
            clip_hi: 10.0,
            energy: vec![Energy::High, Energy::Low],
            plane: vec![0, 1],
        }
    }

    /// A Poisson detector with I0 = 60000 on both planes.
    fn poisson_noise() -> Vec<f32> {
        vec![60000.0; 2]
    }

    /// A flat window of attenuation `a` on both planes (low = 1.22 a), with
    /// the site's noise or none.
    fn flat(a: f32, noisy: bool, seed: u64) -> Array3<f32> {
        let mut normal = Normal(Picker(seed), None);
        let cal = Calibration::fixed(poisson_noise());
        Array3::from_shape_fn((2, 512, 512), |(c, _, _)| {
            let base = if c == 0 { a } else { 1.22 * a };
            let n = if noisy { cal.sigma(c, base) * normal.sample() as f32 } else { 0.0 };
            (base + n) / 2.5
        })
    }

    fn square(center: (f32, f32), side: f32, material: Material, d: f32) -> Object {
        Object {
            center,
            shape: Shape::Box { height: side, width: side, angle: 0.0 },
            material,
            d_a_hi: d,
            gradient: 0.0,
        }
    }

    fn mean_var(v: impl Iterator<Item = f32>) -> (f64, f64) {
        let v: Vec<f64> = v.map(f64::from).collect();
        let m = v.iter().sum::<f64>() / v.len() as f64;
        (m, v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64)
    }

    #[test]
    fn a_slab_on_a_flat_field_adds_its_attenuation_ratio_and_noise() {
        let cal = Calibration::fixed(poisson_noise());
        let units = dual();
        let d = 0.5;
        let before = flat(1.0, true, 1);
        let mut window = before.clone();
        let steel = square((256.0, 256.0), 200.0, Material::Steel, d);
        let f = render(window.view_mut(), &[steel], &units, &cal, Render::default(), 7);
        assert!(f[0].visible);
        // The interior, away from the blurred edge.
        let inner = s![176..336, 176..336];
        let diff = |c: usize| (&window.slice(s![c, .., ..]) - &before.slice(s![c, .., ..])).mapv(|v| v * 2.5);
        let (hi, lo) = (diff(0), diff(1));
        let (mean_hi, _) = mean_var(hi.slice(inner).iter().copied());
        let (mean_lo, _) = mean_var(lo.slice(inner).iter().copied());
        assert!((mean_hi - d as f64).abs() < 0.02 * d as f64, "ΔA_hi {mean_hi}");
        let r = (mean_lo / mean_hi) as f32;
        assert!((r - Material::Steel.ratio()).abs() < 0.005, "ratio {r}");
        // The result's variance is the site's at A + dA.
        let after_hi = window.slice(s![0, 176..336, 176..336]).mapv(|v| v * 2.5);
        let (_, var) = mean_var(after_hi.iter().copied());
        let want = cal.sigma(0, 1.0 + d).powi(2) as f64;
        assert!((var / want - 1.0).abs() < 0.1, "variance {var} vs σ² {want}");
        // Outside the object nothing changed.
        assert_eq!(window.slice(s![.., ..100, ..]), before.slice(s![.., ..100, ..]));
    }

    #[test]
    fn a_half_covered_pixel_gets_the_mean_transmission() {
        let cal = Calibration::fixed(poisson_noise());
        let units = dual();
        let before = flat(1.0, false, 1);
        let mut window = before.clone();
        let d = 2.0;
        // Box from x = 100.5 to 200.5: pixel 100 is half covered.
        let o = Object {
            center: (150.0, 150.5),
            shape: Shape::Box { height: 100.0, width: 100.0, angle: 0.0 },
            material: Material::Organic,
            d_a_hi: d,
            gradient: 0.0,
        };
        render(window.view_mut(), &[o], &units, &cal, Render { blur: false, noise: false }, 1);
        let added = |x: usize| (window[[0, 150, x]] - before[[0, 150, x]]) * 2.5;
        let want = -((1.0 + (-d).exp()) / 2.0).ln();
        assert!((added(100) - want).abs() < 1e-4, "{} vs {want}", added(100));
        assert!((added(150) - d).abs() < 1e-4);
        assert_eq!(added(99), 0.0);
        // A rotated box's boundary pixels are sampled: coverage between 0 and 1.
        let turned = Object {
            shape: Shape::Box { height: 100.0, width: 100.0, angle: 0.3 },
            ..square((300.0, 300.0), 1.0, Material::Steel, d)
        };
        let partial = (250..350).flat_map(|y| (250..350).map(move |x| (y, x))).map(|(y, x)| turned.pixel(y, x).0);
        assert!(partial.clone().any(|c| c > 0.1 && c < 0.9));
        let area: f32 =
            (200..400).flat_map(|y| (200..400).map(move |x| (y, x))).map(|(y, x)| turned.pixel(y, x).0).sum();
        assert!((area - 10_000.0).abs() < 50.0, "area {area}");
    }

    #[test]
    fn an_object_behind_saturated_structure_is_ignored() {
        let cal = Calibration::fixed(poisson_noise());
        let units = dual();
        // Saturated (clipped) on the left half, air on the right.
        let mut window = Array3::from_shape_fn((2, 256, 256), |(_, _, x)| if x < 128 { 10.0 / 2.5 } else { 0.0 });
        let hidden = square((64.0, 48.0), 40.0, Material::Steel, 1.0);
        let seen = square((64.0, 200.0), 40.0, Material::Steel, 1.0);
        let f = render(window.view_mut(), &[hidden, seen], &units, &cal, Render::default(), 3);
        assert!(!f[0].visible && f[1].visible);
        let l = labels(&f, (256, 256), 32, 2.0, 16.0);
        assert_eq!(l[[2, 1]], Label::Ignore, "the hidden object's cell");
        assert_eq!(l[[2, 6]], Label::Positive);
    }

    #[test]
    fn a_known_box_gets_known_labels() {
        let cal = Calibration::fixed(poisson_noise());
        let units = dual();
        let mut window = flat(1.0, false, 1);
        // Rows 320..384 and columns 320..400 in 32 px cells: rows 10-11
        // wholly, columns 10-11 wholly and 12 half.
        let o = Object {
            center: (352.0, 360.0),
            shape: Shape::Box { height: 64.0, width: 80.0, angle: 0.0 },
            material: Material::Steel,
            d_a_hi: 1.0,
            gradient: 0.0,
        };
        let f = render(window.view_mut(), &[o], &units, &cal, Render { blur: false, noise: false }, 1);
        let l = labels(&f, (512, 512), 32, 2.0, 1e9);
        for (gy, gx) in [(10, 10), (10, 11), (11, 10), (11, 11), (10, 12), (11, 12)] {
            assert_eq!(l[[gy, gx]], Label::Positive, "cell {gy},{gx}");
        }
        for (gy, gx) in [(9, 9), (9, 13), (12, 13), (12, 10)] {
            assert_eq!(l[[gy, gx]], Label::Ignore, "ring cell {gy},{gx}");
        }
        assert_eq!(l.iter().filter(|v| **v == Label::Positive).count(), 6);
        assert_eq!(l.iter().filter(|v| **v != Label::Negative).count(), 4 * 5);
        // A small dense object counts by its mass: 8x8 px of 4 mm pixels
        // (10.24 cm²) at dA 2 is 20 dA·cm², above 16, covering 6 % of a cell.
        let mut w2 = flat(1.0, false, 1);
        let small = square((100.0, 100.0), 8.0, Material::Steel, 2.0);
        let f = render(w2.view_mut(), &[small], &units, &cal, Render { blur: false, noise: false }, 1);
        assert_eq!(labels(&f, (512, 512), 32, 4.0, 16.0)[[3, 3]], Label::Positive);
        assert_eq!(labels(&f, (512, 512), 32, 2.0, 16.0)[[3, 3]], Label::Ignore, "at 2 mm it is 5 dA·cm²");
    }

    #[test]
    fn sampled_objects_sit_where_their_placement_says_inside_the_window() {
        let units = dual();
        // Air on the left half, cargo (A = 1.5) on the right.
        let window = Array3::from_shape_fn((2, 1024, 1024), |(_, _, x)| if x < 512 { 0.05 } else { 1.5 } / 2.5);
        let inner = ((224, 800), (224, 800));
        let a = sample_objects(window.view(), &units, inner, 2.0, 5);
        assert_eq!(a, sample_objects(window.view(), &units, inner, 2.0, 5), "deterministic per seed");
        let mut seen = Vec::new();
        for seed in 0..200 {
            let objects = sample_objects(window.view(), &units, inner, 2.0, seed);
            assert!(!objects.is_empty());
            for (placement, o) in objects {
                seen.push(placement);
                assert!((0.08..=6.0001).contains(&o.d_a_hi), "{o:?}");
                let (y, x) = o.center;
                assert!((224.0..=800.0).contains(&x), "{placement:?} {o:?}");
                assert!((224.0..=800.0).contains(&y) || placement == Placement::Cluster, "{placement:?} {o:?}");
                assert!((0.0..1024.0).contains(&y), "{placement:?} {o:?}");
                match placement {
                    Placement::FreeSpace => assert!(x < 512.0, "free space in air: {o:?}"),
                    Placement::InCargo => assert!(x >= 512.0, "in cargo: {o:?}"),
                    _ => {}
                }
            }
        }
        for p in [Placement::FreeSpace, Placement::InCargo, Placement::Partition, Placement::Cluster, Placement::Large]
        {
            assert!(seen.contains(&p), "{p:?} never drawn");
        }
    }

    #[test]
    fn the_calibration_reads_the_synth_scanners_ratio_and_noise() {
        use niix_synth::{Options, generate};
        let units = dual();
        let options = Options { width: 512, height: 1536, anomaly_rate: 0.0, ..Options::default() };
        let scans: Vec<Array3<f32>> = (0..4)
            .map(|i| {
                let scan = generate(3, i, &options);
                let (w, h) = (scan.info.width as usize, scan.info.height as usize);
                let att = |v: &u16| (-(f32::from((*v).max(1)) / 60000.0).ln()).clamp(0.0, 10.0) / 2.5;
                let hi: Vec<f32> = scan.high.iter().map(att).collect();
                let lo: Vec<f32> = scan.low.iter().map(att).collect();
                Array3::from_shape_vec((2, h, w), [hi, lo].concat()).unwrap()
            })
            .collect();
        let views: Vec<_> = scans.iter().map(|s| s.view()).collect();
        let cal = Calibration::measure(&views, &units, 0);
        let measured: Vec<(f32, f32)> = cal.ratio.iter().flatten().copied().collect();
        assert!(measured.len() >= 4, "ratio bins measured: {:?}", cal.ratio);
        let org = cal.ratio(Material::Organic, 1.5);
        let steel = cal.ratio(Material::Steel, 1.5);
        assert!((org - 1.25).abs() <= 0.03, "R_org {org}");
        assert!((steel - 1.19).abs() <= 0.03, "R_steel {steel}");
        for a in [0.3f32, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0] {
            let want = (a.exp() / 60000.0).sqrt();
            for c in 0..2 {
                let got = cal.sigma(c, a);
                assert!((got / want - 1.0).abs() <= 0.2, "channel {c}: σ({a}) = {got}, Poisson {want}");
            }
        }
    }
}
