//! Fitting a memory-bank detector (PatchCore-style) to a site's normal
//! scans, in Rust through ONNX Runtime: the model's feature graph turns
//! every normal scan into patch features, a greedy k-center coreset of them
//! becomes the memory bank, and the decision threshold is set on held-out
//! normal scans so that a chosen share of them would alarm.

use std::path::Path;
use std::sync::Mutex;

use ndarray::{Array1, Array2, Array4, ArrayView2, s};
use ort::session::Session;
use ort::value::TensorRef;

use crate::manifest::Manifest;
use crate::model::ModelError;
use crate::pipeline::{AnalysisError, ModelInput, fill_tile};
use crate::runtime::{Threads, environment};
use crate::tiling::Grid;

/// Rows of a scan's cells `[cells, D]` and each row's map cell (row, column).
pub type CellRows = (Array2<f32>, Vec<(usize, usize)>);

/// The feature graph of a fittable model.
pub struct FeatureGraph {
    manifest: Manifest,
    /// The graph output it reads.
    output: String,
    /// Tile pixels per feature cell, learnt at load.
    stride: usize,
    /// Feature dimension D.
    dim: usize,
    session: Mutex<Session>,
}

impl FeatureGraph {
    /// Loads `<fit.features>` for the manifest `dir/model.toml`, from `dir`
    /// or the directory its `fit.graphs` names.
    pub fn load(dir: &Path, threads: Threads) -> Result<FeatureGraph, ModelError> {
        let path = dir.join("model.toml");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ModelError::File { path: path.clone(), reason: e.to_string() })?;
        let manifest = Manifest::parse(&text)?;
        let spec = manifest.fit.clone().ok_or_else(|| ModelError::File {
            path,
            reason: "this model has no [fit] section: it cannot be fitted to a site".into(),
        })?;
        let graph = spec.graph_dir(dir).join(&spec.features);
        let bytes =
            std::fs::read(&graph).map_err(|e| ModelError::File { path: graph.clone(), reason: e.to_string() })?;
        FeatureGraph::from_bytes(manifest, &bytes, &spec.output, &graph, threads)
    }

    /// A feature graph held in memory (e.g. [`crate::onnx_graph::training_graph`]'s
    /// bytes), reading `output` (`[N, D, h, w]`); `origin` names it in errors.
    pub fn from_bytes(
        manifest: Manifest,
        bytes: &[u8],
        output: &str,
        origin: &Path,
        threads: Threads,
    ) -> Result<FeatureGraph, ModelError> {
        let graph = origin.to_path_buf();
        let env = environment()?;
        let build = || -> Result<Session, ort::Error> {
            Session::builder(&env)?
                .with_intra_threads(threads.intra_op)?
                .with_inter_threads(threads.inter_op)?
                .commit_from_memory(bytes)
        };
        let session = build().map_err(|e| ModelError::File {
            path: graph.clone(),
            reason: format!("ONNX Runtime cannot load it: {e}"),
        })?;
        // One run on a blank tile gives the output grid and dimension.
        let mut session = session;
        let side = manifest.input.tile;
        let blank = Array4::<f32>::zeros((1, manifest.input.channels.len(), side, side));
        let (stride, dim) = {
            let bad = |reason: String| ModelError::File { path: graph.clone(), reason };
            let input = TensorRef::from_array_view(blank.view()).map_err(|e| bad(e.to_string()))?;
            let out = session
                .run(ort::inputs![manifest.input.name.as_str() => input])
                .map_err(|e| bad(format!("a trial run failed: {e}")))?;
            let (shape, _) =
                out[output].try_extract_tensor::<f32>().map_err(|e| bad(format!("output {output:?}: {e}")))?;
            match shape.to_vec().as_slice() {
                [_, d, h, _] if *h > 0 && side.is_multiple_of(*h as usize) => (side / *h as usize, *d as usize),
                other => return Err(bad(format!("output {output:?} is {other:?}, not [N, D, h, w]"))),
            }
        };
        Ok(FeatureGraph { manifest, output: output.to_string(), stride, dim, session: Mutex::new(session) })
    }

    /// The manifest it was loaded with.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Tile pixels per map cell.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Values per cell.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The feature vector of every map cell of a scan (decoded by
    /// [`crate::pipeline::model_input`] with this graph's manifest), each taken from the tile
    /// that owns it under the stitching rule: `[cells, D]`.
    pub fn scan_features(&self, input: &ModelInput) -> Result<Array2<f32>, AnalysisError> {
        Ok(self.scan_cells(input)?.0)
    }

    /// [`FeatureGraph::scan_features`], with each row's map cell (row, column).
    pub fn scan_cells(&self, input: &ModelInput) -> Result<CellRows, AnalysisError> {
        let m = &self.manifest;
        let ModelInput { data, pad, size: (h, w), .. } = input;
        let (h, w) = (*h, *w);
        let side = m.input.tile;
        let channels = data.shape()[0];
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let (stride, dim) = (self.stride, self.dim);
        let mut rows: Vec<f32> = Vec::new();
        let mut cells = Vec::new();
        let grid = Grid::new(h, w, side, m.input.overlap, stride);
        let map_side = side / stride;
        let mut batch = Array4::<f32>::zeros((m.input.batch, channels, side, side));
        for group in grid.tiles().chunks(m.input.batch) {
            for (slot, tile) in group.iter().enumerate() {
                fill_tile(&mut batch, slot, data.view(), tile, pad);
            }
            let view = batch.slice(s![..group.len(), .., .., ..]);
            let out = session.run(ort::inputs![m.input.name.as_str() => TensorRef::from_array_view(view)?])?;
            let (_, values) = out[self.output.as_str()].try_extract_tensor::<f32>()?;
            let per_tile = dim * map_side * map_side;
            for (i, tile) in group.iter().enumerate() {
                let t = &values[i * per_tile..(i + 1) * per_tile];
                let (ty, tx) = (tile.y / stride, tile.x / stride);
                for my in tile.own_rows.0..tile.own_rows.1 {
                    for mx in tile.own_cols.0..tile.own_cols.1 {
                        let cell = (my - ty) * map_side + (mx - tx);
                        rows.extend((0..dim).map(|d| t[d * map_side * map_side + cell]));
                        cells.push((my, mx));
                    }
                }
            }
        }
        let count = rows.len() / dim;
        Ok((Array2::from_shape_vec((count, dim), rows).expect("whole rows pushed"), cells))
    }

    /// The output of whole tiles `[n, channels, side, side]`, run `batch` at
    /// a time: `[n, D, side / stride, side / stride]`.
    pub fn run_tiles(&self, tiles: ndarray::ArrayView4<'_, f32>) -> Result<Array4<f32>, AnalysisError> {
        let m = &self.manifest;
        let map_side = m.input.tile / self.stride;
        let n = tiles.shape()[0];
        let mut out = Array4::<f32>::zeros((n, self.dim, map_side, map_side));
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        for start in (0..n).step_by(m.input.batch.max(1)) {
            let end = (start + m.input.batch.max(1)).min(n);
            let view = tiles.slice(s![start..end, .., .., ..]);
            let result = session.run(ort::inputs![m.input.name.as_str() => TensorRef::from_array_view(view)?])?;
            let (_, values) = result[self.output.as_str()].try_extract_tensor::<f32>()?;
            let got = ndarray::ArrayView4::from_shape((end - start, self.dim, map_side, map_side), values)
                .expect("the output shape the trial run found");
            out.slice_mut(s![start..end, .., .., ..]).assign(&got);
        }
        Ok(out)
    }
}

/// A deterministic pseudo-random stream (SplitMix64), seeded by its field.
pub(crate) struct Picker(pub(crate) u64);

impl Picker {
    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// An index below `n`.
    pub(crate) fn next(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A uniform value in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `n` rows of `features` that cover them: a greedy coreset of a random
/// subset of at most `8 n` rows (so rare patches, e.g. a landing gear seen
/// in a few cells of each scan, are kept rather than left to chance).
pub fn cover_rows(features: ArrayView2<'_, f32>, n: usize, seed: u64) -> Array2<f32> {
    let subset = sample_rows(features, n.saturating_mul(8), seed);
    coreset(subset.view(), n, seed)
}

/// `n` rows of `features` chosen at random without replacement (all if fewer).
pub fn sample_rows(features: ArrayView2<'_, f32>, n: usize, seed: u64) -> Array2<f32> {
    let total = features.nrows();
    if total <= n {
        return features.to_owned();
    }
    let mut order: Vec<usize> = (0..total).collect();
    let mut pick = Picker(seed);
    for i in 0..n {
        let j = i + pick.next(total - i);
        order.swap(i, j);
    }
    let mut chosen = order[..n].to_vec();
    chosen.sort_unstable();
    features.select(ndarray::Axis(0), &chosen)
}

fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Greedy k-center coreset of `pool` (PatchCore's memory-bank reduction):
/// starting from one row, repeatedly adds the row farthest from those chosen.
/// The result covers the pool with the smallest largest gap a greedy choice
/// gives. Uses every core.
pub fn coreset(pool: ArrayView2<'_, f32>, k: usize, seed: u64) -> Array2<f32> {
    let n = pool.nrows();
    if n <= k {
        return pool.to_owned();
    }
    let pool = pool.as_standard_layout().into_owned();
    let dim = pool.ncols();
    let flat = pool.as_slice().expect("standard layout");
    let mut nearest = vec![f32::INFINITY; n];
    let mut chosen = Vec::with_capacity(k);
    let mut next = Picker(seed).next(n);
    let workers = std::thread::available_parallelism().map_or(1, |c| c.get()).max(1);
    let chunk = n.div_ceil(workers);
    for _ in 0..k {
        chosen.push(next);
        let center = &flat[next * dim..(next + 1) * dim];
        // Update distances and find the farthest row, in parallel chunks.
        let best = std::thread::scope(|s| {
            let handles: Vec<_> = nearest
                .chunks_mut(chunk)
                .enumerate()
                .map(|(c, part)| {
                    s.spawn(move || {
                        let mut best = (0usize, f32::NEG_INFINITY);
                        for (i, d) in part.iter_mut().enumerate() {
                            let row = c * chunk + i;
                            let dist = sq_dist(&flat[row * dim..(row + 1) * dim], center);
                            if dist < *d {
                                *d = dist;
                            }
                            if *d > best.1 {
                                best = (row, *d);
                            }
                        }
                        best
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("coreset worker"))
                .fold((0, f32::NEG_INFINITY), |a, b| if b.1 > a.1 { b } else { a })
        });
        next = best.0;
    }
    pool.select(ndarray::Axis(0), &chosen)
}

/// The raw threshold that lets at most `rate` of `scores` (image scores of
/// held-out normal scans) alarm: their `1 - rate` quantile, taken as the
/// largest when there are too few scans to estimate it, raised by `margin`
/// (relative) so the scan that set it does not itself alarm.
pub fn threshold_for(scores: &[f32], rate: f64, margin: f32) -> f32 {
    let (sorted, allowed) = ranked(scores, rate);
    if sorted.is_empty() {
        return f32::INFINITY;
    }
    let at = sorted.len() - 1 - allowed.min(sorted.len() - 1);
    sorted[at] * (1.0 + margin)
}

/// The finite `scores` in ascending order, and how many of them a
/// false-alarm `rate` lets alarm (`rate` of them, rounded down).
fn ranked(scores: &[f32], rate: f64) -> (Vec<f32>, usize) {
    let mut sorted: Vec<f32> = scores.iter().copied().filter(|s| s.is_finite()).collect();
    sorted.sort_by(f32::total_cmp);
    let allowed = (rate * sorted.len() as f64).floor() as usize;
    (sorted, allowed)
}

/// How [`fit_threshold`] set a threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ThresholdRule {
    /// Enough held-out scans to see the rate (at least `1 / rate`): the
    /// `1 - rate` quantile of their scores, read off. `tail` is how far it
    /// lies above their median; the fit records it for later fits.
    Quantile {
        /// The quantile minus the median held-out score.
        tail: f32,
    },
    /// Too few to see the rate, but a tail measured before (on enough
    /// normal scans, by a fit of the version fitted from): the median
    /// held-out score plus that tail, or 1 % above the largest held-out
    /// score if that is higher (`raised`).
    MedianPlusTail {
        /// True when the largest held-out score, not the tail, set it.
        raised: bool,
    },
    /// Too few and no tail known: 1 % above the largest held-out score, or
    /// the normal-tail estimate if that is higher (`tail_estimate`).
    PastTheLargest {
        /// True when the normal-tail estimate, not the largest score, set it.
        tail_estimate: bool,
    },
}

/// The threshold `niix model fit` sets from the image scores of held-out
/// normal scans for a false-alarm `rate`, and the rule that set it.
///
/// Normal image scores are a tight bulk with a sparse tail: most scans
/// score within a few tenths of the median, and a few in a hundred (rare
/// cargo, such as the bare end of a pallet on a two-tier drum load) well
/// above it. Ten held-out scans show that tail or not by chance, so the
/// largest of them says little about the `1 - rate` quantile. Hence:
/// - with at least `1 / rate` scans the quantile is read off
///   ([`ThresholdRule::Quantile`]): the midpoint between the highest score
///   that may not alarm and the lowest that may, so that `rate` of them
///   alarm;
/// - with fewer, and a `tail` measured on enough scans before, the
///   threshold is their median (the bulk, which ten scans do estimate)
///   plus that tail ([`ThresholdRule::MedianPlusTail`]), and at least 1 %
///   above the largest held-out score, so that none of them alarms;
/// - with fewer and no tail, 1 % above the largest score, or, if higher,
///   where a normal distribution fitted to the upper half would put the
///   `1 - rate` quantile: `median + z(1 - rate) x (q75 - median) / 0.6745`
///   ([`ThresholdRule::PastTheLargest`]). None of the held-out scans alarms,
///   and a broad bulk is extrapolated rather than doubled: on 26 held-out
///   scans of a site-trained head the earlier rule (the largest plus its
///   excess over the median) sat above most anomalous scans. How uncertain
///   the result is, [`bootstrap`] says.
pub fn fit_threshold(scores: &[f32], rate: f64, tail: Option<f32>) -> (f32, ThresholdRule) {
    let (sorted, allowed) = ranked(scores, rate);
    let n = sorted.len();
    if n == 0 {
        return (f32::INFINITY, ThresholdRule::PastTheLargest { tail_estimate: false });
    }
    let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
    let max = sorted[n - 1];
    if allowed >= 1 && allowed < n {
        let quantile = (sorted[n - 1 - allowed] + sorted[n - allowed]) / 2.0;
        return (quantile, ThresholdRule::Quantile { tail: (quantile - median).max(0.0) });
    }
    match tail {
        Some(tail) => {
            let clear = max + 0.01 * max.abs();
            ((median + tail).max(clear), ThresholdRule::MedianPlusTail { raised: clear > median + tail })
        }
        None => {
            let clear = max + 0.01 * max.abs();
            let at = |q: f64| {
                let x = q * (n - 1) as f64;
                let (i, f) = (x.floor() as usize, x.fract() as f32);
                sorted[i] + f * (sorted[(i + 1).min(n - 1)] - sorted[i])
            };
            let spread = (at(0.75) - median).max(0.0) / 0.6745;
            let estimate = median + normal_quantile(1.0 - rate) as f32 * spread;
            (clear.max(estimate), ThresholdRule::PastTheLargest { tail_estimate: estimate > clear })
        }
    }
}

/// The standard normal distribution's `p` quantile (Abramowitz and Stegun
/// 26.2.23, absolute error below 4.5e-4), for 0 < p < 1.
fn normal_quantile(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    let upper = |q: f64| {
        let t = (-2.0 * q.ln()).sqrt();
        t - (2.515517 + 0.802853 * t + 0.010328 * t * t)
            / (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t)
    };
    if p >= 0.5 { upper(1.0 - p) } else { -upper(p) }
}

/// How uncertain a fitted threshold is, from the held-out scores it was
/// set on ([`bootstrap`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Uncertainty {
    /// Held-out scans (finite scores).
    pub scans: usize,
    /// The threshold [`fit_threshold`] sets from them.
    pub threshold: f32,
    /// Of them, how many score at or above it (alarm).
    pub alarms: usize,
    /// 5 % and 95 % points of the threshold over the resamples.
    pub threshold_interval: (f32, f32),
    /// 5 % and 95 % points of the out-of-bag false-alarm rate over the
    /// resamples: the share of the scans a resample did not draw that reach
    /// its threshold.
    pub false_alarm_interval: (f64, f64),
    /// The exact one-sided 95 % upper bound (Clopper-Pearson) of the
    /// false-alarm rate at `threshold`, with `alarms` of `scans` alarming.
    pub false_alarm_bound: f64,
    /// Resamples taken.
    pub resamples: usize,
}

/// The uncertainty of the threshold [`fit_threshold`] sets from `scores`
/// (held-out normal image scores) for a false-alarm `rate`, by the bootstrap:
/// `resamples` times, the n scores are drawn n times with replacement (from
/// a SplitMix64 stream seeded by `seed`, so the result is a function of the
/// arguments), the same rule sets a threshold `t_b` on the draw, and the
/// scores not drawn (about 37 % of them) give its false-alarm rate, the share
/// reaching `t_b`. A resample that drew every score gives no rate. Reports
/// the 5-95 % points of both, and the exact one-sided 95 % bound of the
/// false-alarm rate at the threshold set on all the scores
/// ([`clopper_pearson_upper`]).
pub fn bootstrap(scores: &[f32], rate: f64, tail: Option<f32>, resamples: usize, seed: u64) -> Uncertainty {
    let finite: Vec<f32> = scores.iter().copied().filter(|s| s.is_finite()).collect();
    let n = finite.len();
    let (threshold, _) = fit_threshold(&finite, rate, tail);
    let alarms = finite.iter().filter(|s| **s >= threshold).count();
    let mut thresholds = Vec::with_capacity(resamples);
    let mut rates = Vec::with_capacity(resamples);
    let mut pick = Picker(seed);
    let mut drawn = vec![0usize; n];
    let mut sample = Vec::with_capacity(n);
    for _ in 0..if n == 0 { 0 } else { resamples } {
        drawn.iter_mut().for_each(|d| *d = 0);
        sample.clear();
        for _ in 0..n {
            let i = pick.next(n);
            drawn[i] += 1;
            sample.push(finite[i]);
        }
        let (t, _) = fit_threshold(&sample, rate, tail);
        thresholds.push(t);
        let out_of_bag: Vec<f32> = finite.iter().zip(&drawn).filter(|(_, d)| **d == 0).map(|(s, _)| *s).collect();
        if !out_of_bag.is_empty() {
            rates.push(out_of_bag.iter().filter(|s| **s >= t).count() as f64 / out_of_bag.len() as f64);
        }
    }
    let thresholds: Vec<f64> = thresholds.into_iter().map(f64::from).collect();
    let (t_lo, t_hi) = percentiles(thresholds, 0.05, 0.95);
    Uncertainty {
        scans: n,
        threshold,
        alarms,
        threshold_interval: (t_lo as f32, t_hi as f32),
        false_alarm_interval: percentiles(rates, 0.05, 0.95),
        false_alarm_bound: clopper_pearson_upper(alarms, n, 0.05),
        resamples,
    }
}

/// The `lo` and `hi` quantiles of `values` (linear between order
/// statistics); NaN for none.
fn percentiles(mut values: Vec<f64>, lo: f64, hi: f64) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let x = q * (values.len() - 1) as f64;
        let (i, f) = (x.floor() as usize, x.fract());
        values[i] + f * (values[(i + 1).min(values.len() - 1)] - values[i])
    };
    (at(lo), at(hi))
}

/// The exact (Clopper-Pearson) one-sided `1 - alpha` upper bound of a rate
/// of which `k` of `n` trials were seen: the rate `p` at which seeing at
/// most `k` has probability `alpha`. For `k = 0` that is
/// `1 - alpha^(1/n)`: 10.9 % for 26 scans at 95 %. 1 for no trials or `k = n`.
pub fn clopper_pearson_upper(k: usize, n: usize, alpha: f64) -> f64 {
    if n == 0 || k >= n {
        return 1.0;
    }
    if k == 0 {
        return 1.0 - alpha.powf(1.0 / n as f64);
    }
    // P(X <= k | n, p) falls as p rises: bisect for alpha.
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..100 {
        let p = 0.5 * (lo + hi);
        if binomial_cdf(k, n, p) > alpha {
            lo = p;
        } else {
            hi = p;
        }
    }
    0.5 * (lo + hi)
}

/// P(X <= k) for X ~ Binomial(n, p), summed in log space (no underflow for
/// large n).
fn binomial_cdf(k: usize, n: usize, p: f64) -> f64 {
    if p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return if k >= n { 1.0 } else { 0.0 };
    }
    let (lp, lq) = (p.ln(), (-p).ln_1p());
    // ln C(n, i) built up term by term.
    let mut ln_choose = 0.0f64;
    let mut terms = Vec::with_capacity(k + 1);
    for i in 0..=k.min(n) {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        terms.push(ln_choose + i as f64 * lp + (n - i) as f64 * lq);
    }
    let top = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (top + terms.iter().map(|t| (t - top).exp()).sum::<f64>().ln()).min(0.0).exp()
}

/// The fewest held-out scans that, with none of them alarming, show a
/// false-alarm rate of at most `rate` with 95 % confidence (Clopper-Pearson):
/// 299 for 1 %, 59 for 5 %.
pub fn scans_to_show(rate: f64) -> usize {
    if !(rate > 0.0 && rate < 1.0) {
        return usize::MAX;
    }
    let mut n = (0.05f64.ln() / (-rate).ln_1p()).ceil().max(1.0) as usize;
    // Guard the rounding of the closed form.
    while n > 1 && clopper_pearson_upper(0, n - 1, 0.05) <= rate {
        n -= 1;
    }
    while clopper_pearson_upper(0, n, 0.05) > rate {
        n += 1;
    }
    n
}

/// The scale of each memory-bank row's distance, from the bank's own
/// spacing (local-outlier-factor style): with `r_k` the distance from row `k`
/// to its `neighbours`-th nearest other row and `m` the median `r_k`,
/// `scale_k = m / max(r_k, m / 2)`.
///
/// The model multiplies a cell's distance to its nearest row by that row's
/// scale. Where normal patches are rare (a cargo seen in few scans) the bank's
/// rows lie far apart, so a new patch of that cargo is far from all of them
/// without being foreign; there the scale is below 1. Where the bank is dense
/// it is above 1, at most 2 (the floor `m / 2` keeps a tight cluster of
/// near-identical rows from making every small distance count as huge).
/// Also returns `m`. A bank of one row gets scale 1.
pub fn bank_scale(bank: ArrayView2<'_, f32>, neighbours: usize) -> (Array1<f32>, f32) {
    let k = bank.nrows();
    if k < 2 {
        return (Array1::ones(k), 0.0);
    }
    let n = neighbours.clamp(1, k - 1);
    // Squared distances ||a||^2 + ||b||^2 - 2 a.b from the products of a
    // block of rows with the whole bank at a time (a K x K matrix would be
    // 17 GB for K = 65536). The squared norms are the diagonal of each
    // block's product with itself, computed as the products are.
    const BLOCK: usize = 512;
    let blocks = || (0..k).step_by(BLOCK).map(|start| (start, bank.slice(s![start..(start + BLOCK).min(k), ..])));
    let norms: Vec<f32> = blocks().flat_map(|(_, rows)| rows.dot(&rows.t()).into_diag().to_vec()).collect();
    let mut spacing = Vec::with_capacity(k);
    let mut d2 = Vec::with_capacity(k);
    for (start, rows) in blocks() {
        let products = rows.dot(&bank.t());
        for (offset, row) in products.rows().into_iter().enumerate() {
            let i = start + offset;
            d2.clear();
            d2.extend((0..k).filter(|&j| j != i).map(|j| (norms[i] + norms[j] - 2.0 * row[j]).max(0.0)));
            let (_, nth, _) = d2.select_nth_unstable_by(n - 1, f32::total_cmp);
            spacing.push(nth.sqrt());
        }
    }
    let mut sorted = spacing.clone();
    sorted.sort_by(f32::total_cmp);
    let median = sorted[k / 2];
    if median <= 0.0 {
        return (Array1::ones(k), median);
    }
    (spacing.iter().map(|r| median / r.max(median / 2.0)).collect(), median)
}

/// Writes a constant (a memory bank, its scale) as raw little-endian
/// float32, the `constants` format.
pub fn constant_bytes<D: ndarray::Dimension>(values: &ndarray::Array<f32, D>) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coreset_covers_every_cluster() {
        // Four tight clusters of 100 points; a 4-point coreset takes one of each.
        let centers = [[0.0f32, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]];
        let mut pts = Vec::new();
        for (c, [x, y]) in centers.iter().enumerate() {
            for i in 0..100 {
                let j = (i * 7 + c * 13) % 100;
                pts.extend([x + j as f32 * 0.001, y - j as f32 * 0.001]);
            }
        }
        let pool = Array2::from_shape_vec((400, 2), pts).unwrap();
        let core = coreset(pool.view(), 4, 5);
        let mut hit = [false; 4];
        for row in core.rows() {
            let c = centers.iter().position(|[x, y]| (row[0] - x).abs() < 1.0 && (row[1] - y).abs() < 1.0).unwrap();
            hit[c] = true;
        }
        assert_eq!(hit, [true; 4]);
        assert_eq!(coreset(pool.view(), 1000, 5).nrows(), 400, "a small pool is kept whole");
    }

    #[test]
    fn the_bank_scale_follows_the_banks_own_spacing() {
        // Twelve rows 1 apart and twelve 4 apart, far from each other. The
        // distance to the second nearest other row: 1 inside the dense run
        // (2 at its ends), 4 inside the sparse one (8 at its ends); the
        // median of those 24 is 4.
        let mut rows = Vec::new();
        for i in 0..12 {
            rows.extend([i as f32, 0.0]);
        }
        for i in 0..12 {
            rows.extend([1000.0 + 4.0 * i as f32, 0.0]);
        }
        let bank = Array2::from_shape_vec((24, 2), rows).unwrap();
        let (scale, median) = bank_scale(bank.view(), 2);
        assert_eq!(median, 4.0);
        let want: Vec<f32> = [[2.0; 12].as_slice(), &[0.5], &[1.0; 10], &[0.5]].concat();
        let got: Vec<f32> = scale.iter().map(|v| (v * 1000.0).round() / 1000.0).collect();
        assert_eq!(got, want, "dense rows capped at 2, the sparse run's ends at 4 / 8");
        // Tiny banks: one row keeps its distance; neighbours beyond the bank are clamped.
        assert_eq!(bank_scale(bank.slice(s![..1, ..]), 10).0.to_vec(), vec![1.0]);
        assert_eq!(bank_scale(bank.slice(s![..3, ..]), 10).0.len(), 3);
    }

    #[test]
    fn the_bank_scale_of_a_bank_larger_than_one_block_matches_brute_force() {
        let mut pick = Picker(3);
        let bank = Array2::from_shape_fn((1100, 3), |_| pick.next(1000) as f32 / 10.0);
        let (scale, median) = bank_scale(bank.view(), 4);
        let spacing = |i: usize| {
            let mut d: Vec<f32> = (0..bank.nrows())
                .filter(|&j| j != i)
                .map(|j| sq_dist(bank.row(i).as_slice().unwrap(), bank.row(j).as_slice().unwrap()).sqrt())
                .collect();
            d.sort_by(f32::total_cmp);
            d[3]
        };
        for i in [0, 511, 512, 1023, 1024, 1099] {
            let want = median / spacing(i).max(median / 2.0);
            assert!((scale[i] - want).abs() < 1e-3 * want, "row {i}: {} vs {want}", scale[i]);
        }
    }

    #[test]
    fn constants_are_little_endian_float32() {
        let bank = Array2::from_shape_vec((1, 2), vec![1.0f32, -2.5]).unwrap();
        let bytes = constant_bytes(&bank);
        assert_eq!(bytes[..4], 1.0f32.to_le_bytes());
        assert_eq!(bytes[4..], (-2.5f32).to_le_bytes());
    }

    #[test]
    fn sampling_is_deterministic_and_without_repeats() {
        let pool = Array2::from_shape_fn((50, 3), |(r, c)| (r * 3 + c) as f32);
        let a = sample_rows(pool.view(), 10, 9);
        assert_eq!(a, sample_rows(pool.view(), 10, 9));
        let mut firsts: Vec<i32> = a.column(0).iter().map(|v| *v as i32).collect();
        firsts.dedup();
        assert_eq!(firsts.len(), 10);
    }

    #[test]
    fn the_threshold_lets_the_agreed_share_alarm() {
        let scores: Vec<f32> = (1..=200).map(|i| i as f32).collect();
        // 1% of 200: two may alarm, so the threshold sits on the third highest.
        assert_eq!(threshold_for(&scores, 0.01, 0.0), 198.0);
        // Ten scans cannot estimate a 1% quantile: the largest, plus the margin.
        assert_eq!(threshold_for(&scores[..10], 0.01, 0.1), 11.0);
    }

    #[test]
    fn the_fitted_threshold_reaches_past_a_lone_high_normal_scan() {
        // Nine typical scans and one with a rarer pattern, no tail known:
        // 1 % above the largest, which lies above the normal-tail estimate
        // (median 10.5, q75 10.75: 10.5 + 2.326 x 0.25 / 0.6745 = 11.36).
        let mut held = vec![10.0f32, 10.2, 10.4, 10.4, 10.5, 10.5, 10.6, 10.8, 11.0, 16.0];
        let (t, rule) = fit_threshold(&held, 0.01, None);
        assert!((t - 16.16).abs() < 1e-4 && rule == ThresholdRule::PastTheLargest { tail_estimate: false });
        // Order does not matter, nor does a non-finite score.
        held.reverse();
        held.push(f32::NAN);
        assert_eq!(fit_threshold(&held, 0.01, None).0, t);
        // A broad bulk: the tail estimate lies past the largest.
        let broad = [4.0f32, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        let (t, rule) = fit_threshold(&broad, 0.01, None);
        let want = 8.0 + 2.3263 * 2.0 / 0.6745;
        assert!((t - want).abs() < 3e-3 && rule == ThresholdRule::PastTheLargest { tail_estimate: true }, "{t}");
        // All alike: 1 % above the largest.
        assert!((fit_threshold(&[4.0; 10], 0.01, None).0 - 4.04).abs() < 1e-6);
        assert_eq!(fit_threshold(&[], 0.01, None).0, f32::INFINITY);
        assert!((normal_quantile(0.99) - 2.3263).abs() < 5e-4 && (normal_quantile(0.05) + 1.6449).abs() < 5e-4);
    }

    #[test]
    fn enough_held_out_scans_give_the_quantile_and_measure_the_tail() {
        // 1 % of 200: two may alarm, so the threshold lies between the third
        // highest (198) and the second (199); the median is 100.5.
        let many: Vec<f32> = (1..=200).map(|i| i as f32).collect();
        let (t, rule) = fit_threshold(&many, 0.01, Some(50.0));
        assert_eq!(t, 198.5);
        assert_eq!(rule, ThresholdRule::Quantile { tail: 98.0 });
        assert_eq!(many.iter().filter(|s| **s >= t).count(), 2);
        // Five scans see a 20 % rate: one may alarm.
        let few = [10.0f32, 10.2, 10.4, 10.6, 11.0];
        assert!((fit_threshold(&few, 0.2, None).0 - 10.8).abs() < 1e-5);
    }

    #[test]
    fn the_bootstrap_is_deterministic_per_seed() {
        let scores: Vec<f32> = (0..26).map(|i| 10.0 + (i * 7 % 26) as f32 * 0.1).collect();
        let a = bootstrap(&scores, 0.01, None, 2000, 4);
        assert_eq!(a, bootstrap(&scores, 0.01, None, 2000, 4));
        assert_ne!(a.threshold_interval, bootstrap(&scores, 0.01, None, 2000, 5).threshold_interval);
        assert_eq!((a.scans, a.alarms, a.resamples), (26, 0, 2000));
        assert_eq!(a.threshold, fit_threshold(&scores, 0.01, None).0);
        let (lo, hi) = a.threshold_interval;
        assert!(lo <= a.threshold && lo < hi, "{a:?}");
        let (lo, hi) = a.false_alarm_interval;
        assert!(0.0 <= lo && lo <= hi && hi <= 1.0, "{a:?}");
        assert!((a.false_alarm_bound - 0.109).abs() < 5e-4, "{a:?}");
        // Nothing to resample: no interval, and no bound below 1.
        let none = bootstrap(&[], 0.01, None, 10, 0);
        assert!(none.false_alarm_interval.0.is_nan() && none.false_alarm_bound == 1.0);
    }

    #[test]
    fn the_bootstrap_interval_covers_the_rate_of_iid_scores() {
        // 200 scores drawn from one distribution (a sum of four uniforms):
        // at a 5 % rate the quantile rule holds, and the out-of-bag
        // false-alarm interval covers 5 %.
        let mut pick = Picker(11);
        let scores: Vec<f32> = (0..200).map(|_| (0..4).map(|_| pick.unit() as f32).sum::<f32>()).collect();
        let u = bootstrap(&scores, 0.05, None, 2000, 1);
        let (lo, hi) = u.false_alarm_interval;
        assert!(lo < 0.05 && 0.05 < hi, "{u:?}");
        assert!(hi < 0.15, "200 scans pin the rate down: {u:?}");
        assert_eq!(u.alarms, 10);
        assert!(u.false_alarm_bound > 0.05 && u.false_alarm_bound < 0.1, "{u:?}");
    }

    #[test]
    fn clopper_pearson_bounds_match_their_closed_forms_and_tables() {
        // k = 0: 1 - 0.05^(1/n).
        assert!((clopper_pearson_upper(0, 26, 0.05) - 0.1088).abs() < 1e-4);
        assert!((clopper_pearson_upper(0, 100, 0.05) - 0.0295).abs() < 1e-4);
        // k = 1 of 10: the 95 % quantile of Beta(2, 9), 0.3942 (tables).
        assert!((clopper_pearson_upper(1, 10, 0.05) - 0.3942).abs() < 1e-4);
        // k = 2 of 200: Beta(3, 198)'s 95 % quantile, 0.0311.
        assert!((clopper_pearson_upper(2, 200, 0.05) - 0.0311).abs() < 1e-4);
        assert_eq!(clopper_pearson_upper(5, 5, 0.05), 1.0);
        assert_eq!(clopper_pearson_upper(0, 0, 0.05), 1.0);
        assert_eq!(scans_to_show(0.01), 299);
        assert_eq!(scans_to_show(0.05), 59);
    }

    #[test]
    fn few_held_out_scans_borrow_a_measured_tail() {
        // Ten typical scans (median 10.5): the median plus the tail, whether
        // or not a rare scan happened to be among them, as long as the
        // threshold clears every held-out scan.
        let typical = [10.0f32, 10.2, 10.4, 10.4, 10.5, 10.5, 10.6, 10.8, 11.0, 11.1];
        let (t, rule) = fit_threshold(&typical, 0.01, Some(1.8));
        assert_eq!(rule, ThresholdRule::MedianPlusTail { raised: false });
        assert!((t - 12.3).abs() < 1e-5);
        let mut rare = typical;
        rare[9] = 11.9;
        assert!((fit_threshold(&rare, 0.01, Some(1.8)).0 - 12.3).abs() < 1e-5);
        // A held-out scan above the median plus the tail does not alarm.
        rare[9] = 16.0;
        let (t, rule) = fit_threshold(&rare, 0.01, Some(1.8));
        assert!((t - 16.16).abs() < 1e-4);
        assert_eq!(rule, ThresholdRule::MedianPlusTail { raised: true });
    }
}
