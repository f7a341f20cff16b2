//! Training the site head during `niix model fit --train-head`
//! (docs/notes/site-training-plan.md, §2.4 and §2.6): per fitted scan a clean
//! pass through the training graph gives every cell's `head_input` (its
//! first channels are the memory bank's `features`) and 1000 negatives, and
//! threat-image-projection windows give positives with the negatives around
//! them; a first round of training, hard negatives mined from each scan's
//! highest cells, and a second round from the same seed on everything. The
//! trained head is then written into the composed graph.
//!
//! A module of its own, not part of [`crate::fit`]: it builds on
//! [`crate::site_head`] and [`crate::tip`], which take `fit`'s random stream.

use std::time::{Duration, Instant};

use ndarray::{Array2, Array3, Array4, ArrayD, ArrayView2, IxDyn, s};
use sha2::{Digest, Sha256};

use crate::fit::{FeatureGraph, Picker};
use crate::model::ModelError;
use crate::onnx_graph::{GraphError, OnnxModel, SITE_HIDDEN, compose_site_head, site, training_graph};
use crate::pipeline::{AnalysisError, ModelInput, fill_tile};
use crate::site_head::{SiteHead, TrainConfig, TrainError, TrainReport};
use crate::tiling::Tile;
use crate::tip::{self, Calibration, Energy, Label, Render, TipError, Units};

/// Clean cells per scan taken uniformly as negatives.
pub const UNIFORM_NEGATIVES: usize = 600;
/// Clean cells per scan taken as negatives among dense ones (`A_hi` > [`DENSE`]).
pub const DENSE_NEGATIVES: usize = 400;
/// Mean high-energy attenuation of a dense cell (structure, dense cargo).
pub const DENSE: f32 = 2.0;
/// Negatives sampled per TIP window, around its objects.
pub const WINDOW_NEGATIVES: usize = 48;
/// Added mass (attenuation x cm²) that makes a touched cell positive: about 400 g of steel.
pub const MIN_MASS: f32 = 16.0;
/// Weight of a mined hard negative.
pub const HARD_WEIGHT: f32 = 2.0;
/// Only cells the first round scores above this logit are mined.
pub const MINE_LOGIT: f32 = -1.0;
/// Mined cells lie at least this many cells apart (Chebyshev).
pub const MINE_SPACING: usize = 4;
/// Fitted scans the material ratio and noise are measured on.
pub const CALIBRATION_SCANS: usize = 16;
/// Rows of each calibration scan kept (a band through its middle).
pub const CALIBRATION_ROWS: usize = 1024;
/// Fewest Adam steps per epoch (smaller batches on small sets).
pub const MIN_STEPS: usize = 50;
/// Smallest batch.
pub const MIN_BATCH: usize = 64;
/// The budget planner's trigger: the projected fit passes this share of the budget.
pub const BUDGET_SHARE: f64 = 0.8;
/// Fewest windows per scan the budget planner goes down to.
pub const MIN_WINDOWS: usize = 4;

/// How the site head is trained (the `--train-head` flags).
#[derive(Debug, Clone, PartialEq)]
pub struct SiteOptions {
    /// TIP windows per fitted scan.
    pub windows: usize,
    /// Epochs of the second round (the first runs half).
    pub epochs: usize,
    /// Hard negatives mined per scan.
    pub mine: usize,
    /// Weight of the distance term beside the site head.
    pub distance_weight: f32,
    /// Seed of windows, objects, samples and the head.
    pub seed: u64,
}

impl Default for SiteOptions {
    fn default() -> Self {
        SiteOptions { windows: 12, epochs: 20, mine: 24, distance_weight: 0.28, seed: 0 }
    }
}

/// The site head could not be trained.
#[derive(Debug, thiserror::Error)]
pub enum SiteFitError {
    /// The base graph cannot take a site head.
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// ONNX Runtime refused the training graph.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A scan could not be run through the training graph.
    #[error(transparent)]
    Analysis(#[from] AnalysisError),
    /// The model's input is not attenuation.
    #[error(transparent)]
    Tip(#[from] TipError),
    /// The training cells could not be used.
    #[error(transparent)]
    Train(#[from] TrainError),
}

/// The base detector with the site head composed in, and the graph a fit runs.
pub struct SiteGraphs {
    /// The detector to serve once the head's weights are written in.
    pub composed: OnnxModel,
    /// Cut to `features` and `head_input`: the version's feature graph.
    pub training: OnnxModel,
}

/// Composes the site head onto a base `model.onnx` and cuts the training graph from it.
pub fn site_graphs(base_model: &[u8]) -> Result<SiteGraphs, GraphError> {
    let composed = compose_site_head(&OnnxModel::from_bytes(base_model)?)?;
    let training = training_graph(&composed)?;
    Ok(SiteGraphs { composed, training })
}

/// What the budget planner decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetPlan {
    /// TIP windows per scan from now on.
    pub windows: usize,
    /// Mine every n-th scan.
    pub mine_every: usize,
    /// The fit's projected length under the old settings.
    pub projected: Duration,
    /// True when the settings were lowered.
    pub lowered: bool,
}

/// The budget planner (§2.6): after a few scans, `elapsed` since the fit
/// started and `done` of `scans` scans through clean pass and windows, it
/// projects the fit (the remaining scans, then a mining pass costing about
/// half a scan each). Past [`BUDGET_SHARE`] of `budget` it lowers the windows
/// to [`MIN_WINDOWS`] and mines every second scan.
pub fn plan_budget(elapsed: Duration, done: usize, scans: usize, budget: Duration, windows: usize) -> BudgetPlan {
    let per_scan = elapsed.as_secs_f64() / done.max(1) as f64;
    let left = scans.saturating_sub(done) as f64;
    let projected = Duration::from_secs_f64(elapsed.as_secs_f64() + per_scan * (left + 0.5 * scans as f64));
    if projected.as_secs_f64() > BUDGET_SHARE * budget.as_secs_f64() {
        BudgetPlan { windows: windows.min(MIN_WINDOWS), mine_every: 2, projected, lowered: true }
    } else {
        BudgetPlan { windows, mine_every: 1, projected, lowered: false }
    }
}

/// The training cells: rows of `head_input`, labels and weights.
#[derive(Debug, Default)]
struct Cells {
    x: Vec<f32>,
    y: Vec<f32>,
    w: Vec<f32>,
}

impl Cells {
    fn push(&mut self, row: ndarray::ArrayView1<'_, f32>, label: f32, weight: f32) {
        self.x.extend(row.iter());
        self.y.push(label);
        self.w.push(weight);
    }
}

/// What the training cells hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CellCounts {
    /// Clean negatives.
    pub negatives: usize,
    /// Positive cells of TIP windows.
    pub positives: usize,
    /// Negatives of TIP windows.
    pub window_negatives: usize,
    /// Mined hard negatives.
    pub hard: usize,
    /// TIP windows rendered.
    pub windows: usize,
}

/// Gathers the site head's training cells and trains it.
pub struct SiteTrainer {
    graph: FeatureGraph,
    options: SiteOptions,
    calibration: Option<Calibration>,
    cells: Cells,
    counts: CellCounts,
}

impl SiteTrainer {
    /// A trainer running `graph` (the training graph, read at `head_input`).
    /// Refuses a model whose input is not attenuation.
    pub fn new(graph: FeatureGraph, options: SiteOptions) -> Result<SiteTrainer, SiteFitError> {
        let channels: Vec<usize> = (0..graph.manifest().input.channels.len()).collect();
        Units::from_manifest(graph.manifest(), &channels)?;
        Ok(SiteTrainer { graph, options, calibration: None, cells: Cells::default(), counts: CellCounts::default() })
    }

    /// The options it trains with.
    pub fn options(&self) -> &SiteOptions {
        &self.options
    }

    /// What the training cells hold so far.
    pub fn counts(&self) -> CellCounts {
        self.counts
    }

    /// Width of the memory bank's `features` within `head_input` (66 of 142:
    /// features, their 7x7 mean, then 10 plane statistics).
    pub fn feature_dim(&self) -> usize {
        (self.graph.dim() - 10) / 2
    }

    /// The band of a scan the calibration reads: at most [`CALIBRATION_ROWS`] rows through its middle.
    pub fn calibration_band(input: &ModelInput) -> Array3<f32> {
        let h = input.size.0;
        let rows = h.min(CALIBRATION_ROWS);
        let y0 = (h - rows) / 2;
        input.data.slice(s![.., y0..y0 + rows, ..]).to_owned()
    }

    /// Measures the site's material ratio and noise on bands of the first fitted scans.
    pub fn calibrate(&mut self, bands: &[Array3<f32>], planes: &[usize]) -> Result<&Calibration, SiteFitError> {
        let units = Units::from_manifest(self.graph.manifest(), planes)?;
        let views: Vec<_> = bands.iter().map(|b| b.view()).collect();
        Ok(self.calibration.insert(Calibration::measure(&views, &units, self.options.seed ^ 0xca11)))
    }

    /// The clean pass of one scan: its negatives join the training cells
    /// (seeded by `scan_seed`), and its cells' `features` `[cells, 66]` are returned for the memory bank.
    pub fn add_clean(&mut self, input: &ModelInput, scan_seed: u64) -> Result<Array2<f32>, SiteFitError> {
        let (rows, cells) = self.graph.scan_cells(input)?;
        let units = Units::from_manifest(self.graph.manifest(), &input.planes)?;
        let stride = self.graph.stride();
        let dense: Vec<bool> = cells.iter().map(|&c| cell_attenuation(input, &units, c, stride) > DENSE).collect();
        for i in clean_negatives(&dense, self.options.seed ^ scan_seed.wrapping_mul(0x9e37)) {
            self.cells.push(rows.row(i), 0.0, 1.0);
            self.counts.negatives += 1;
        }
        Ok(rows.slice(s![.., ..self.feature_dim()]).to_owned())
    }

    /// `count` TIP windows of one scan (1024x1024, 1-3 placements inside the
    /// inner 576x576, flush with the scan's edge at its borders): every
    /// positive cell, and [`WINDOW_NEGATIVES`] negatives each.
    pub fn add_windows(
        &mut self,
        input: &ModelInput,
        count: usize,
        pixel_mm: f32,
        scan_seed: u64,
    ) -> Result<(), SiteFitError> {
        let m = self.graph.manifest();
        let units = Units::from_manifest(m, &input.planes)?;
        let calibration = match &self.calibration {
            Some(c) => c.clone(),
            None => Calibration::measure(&[input.data.view()], &units, self.options.seed ^ 0xca11),
        };
        let (side, stride, batch) = (m.input.tile, self.graph.stride(), m.input.batch.max(1));
        let (h, w) = input.size;
        let channels = input.data.shape()[0];
        let reach = (7 * stride).min(side / 2);
        // Window origin and the inner region, in window pixels.
        let inner = |origin: usize, len: usize| {
            let valid = (len - origin).min(side);
            let lo = if origin == 0 { 0 } else { reach };
            let hi = if origin + side >= len { valid } else { side - reach };
            (lo, hi.min(valid))
        };
        let mut pick = Picker(self.options.seed ^ scan_seed.wrapping_mul(0x5851_f42d) ^ 0x719);
        let mut done = 0;
        while done < count {
            let n = batch.min(count - done);
            let mut tiles = Array4::<f32>::zeros((n, channels, side, side));
            let mut regions = Vec::with_capacity(n);
            let mut label_maps = Vec::with_capacity(n);
            for slot in 0..n {
                let oy = if h > side { pick.next(h - side + 1) } else { 0 };
                let ox = if w > side { pick.next(w - side + 1) } else { 0 };
                let tile = Tile { y: oy, x: ox, own_rows: (0, 0), own_cols: (0, 0) };
                fill_tile(&mut tiles, slot, input.data.view(), &tile, &input.pad);
                let region = (inner(oy, h), inner(ox, w));
                let seed = pick.next_u64();
                let objects: Vec<tip::Object> =
                    tip::sample_objects(tiles.slice(s![slot, .., .., ..]), &units, region, pixel_mm, seed)
                        .into_iter()
                        .map(|(_, o)| o)
                        .collect();
                let window = tiles.slice_mut(s![slot, .., .., ..]);
                let footprints = tip::render(window, &objects, &units, &calibration, Render::default(), seed);
                label_maps.push(tip::labels(&footprints, (side, side), stride, pixel_mm, MIN_MASS));
                regions.push(region);
            }
            let out = self.graph.run_tiles(tiles.view())?;
            for slot in 0..n {
                let ((y0, y1), (x0, x1)) = regions[slot];
                let labels = &label_maps[slot];
                let mut negatives = Vec::new();
                for ((cy, cx), label) in labels.indexed_iter() {
                    let (py, px) = (cy * stride, cx * stride);
                    if py < y0 || py >= y1 || px < x0 || px >= x1 {
                        continue;
                    }
                    match label {
                        Label::Positive => {
                            self.cells.push(out.slice(s![slot, .., cy, cx]), 1.0, 1.0);
                            self.counts.positives += 1;
                        }
                        Label::Negative => negatives.push((cy, cx)),
                        Label::Ignore => {}
                    }
                }
                for k in 0..negatives.len().min(WINDOW_NEGATIVES) {
                    let j = k + pick.next(negatives.len() - k);
                    negatives.swap(k, j);
                    let (cy, cx) = negatives[k];
                    self.cells.push(out.slice(s![slot, .., cy, cx]), 0.0, 1.0);
                    self.counts.window_negatives += 1;
                }
            }
            done += n;
            self.counts.windows += n;
        }
        Ok(())
    }

    /// Trains a head from the seed on all cells gathered so far, for
    /// `epochs`, stopping at `deadline`; `progress` hears each epoch.
    pub fn train(
        &self,
        epochs: usize,
        deadline: Option<Instant>,
        progress: &mut dyn FnMut(usize, f64),
    ) -> Result<(SiteHead, TrainReport), SiteFitError> {
        let dim = self.graph.dim();
        let x = ArrayView2::from_shape((self.cells.y.len(), dim), &self.cells.x).expect("whole rows pushed");
        let mut head = SiteHead::new(x, SITE_HIDDEN, self.options.seed);
        // At least MIN_STEPS Adam steps an epoch: a small site's few thousand
        // cells in batches of 1024 would give the head a handful of steps.
        let n = self.cells.y.len();
        let batch = (n / MIN_STEPS).clamp(MIN_BATCH, TrainConfig::default().batch);
        let config = TrainConfig { epochs, batch, seed: self.options.seed, ..TrainConfig::default() };
        let report = head.train(x, &self.cells.y, &self.cells.w, &config, deadline, progress)?;
        Ok((head, report))
    }

    /// Hard negatives of one scan: its clean cells scored by `head`, the
    /// highest `top` above [`MINE_LOGIT`], at least [`MINE_SPACING`] cells
    /// apart, join the cells at weight [`HARD_WEIGHT`]. Returns how many.
    pub fn mine(&mut self, head: &SiteHead, input: &ModelInput, top: usize) -> Result<usize, SiteFitError> {
        let (rows, cells) = self.graph.scan_cells(input)?;
        let logits = head.logits(rows.view());
        let chosen = hardest(logits.as_slice().expect("contiguous"), &cells, top);
        for &i in &chosen {
            self.cells.push(rows.row(i), 0.0, HARD_WEIGHT);
        }
        self.counts.hard += chosen.len();
        Ok(chosen.len())
    }
}

/// The mean high-energy attenuation of map cell `(row, col)`.
fn cell_attenuation(input: &ModelInput, units: &Units, (row, col): (usize, usize), stride: usize) -> f32 {
    let hi = units.energy.iter().position(|e| *e == Energy::High).unwrap_or(0);
    let (h, w) = input.size;
    let (y0, x0) = ((row * stride).min(h), (col * stride).min(w));
    let (y1, x1) = ((y0 + stride).min(h), (x0 + stride).min(w));
    let mean = input.data.slice(s![hi, y0..y1, x0..x1]).mean().unwrap_or(0.0);
    mean * units.std[hi] + units.mean[hi]
}

/// The clean negatives of a scan: [`UNIFORM_NEGATIVES`] cells at random and
/// [`DENSE_NEGATIVES`] more among the dense ones, no cell twice.
fn clean_negatives(dense: &[bool], seed: u64) -> Vec<usize> {
    let n = dense.len();
    let mut order: Vec<usize> = (0..n).collect();
    let mut pick = Picker(seed);
    for i in 0..n.saturating_sub(1) {
        let j = i + pick.next(n - i);
        order.swap(i, j);
    }
    let uniform = UNIFORM_NEGATIVES.min(n);
    let mut out = order[..uniform].to_vec();
    out.extend(order[uniform..].iter().copied().filter(|&i| dense[i]).take(DENSE_NEGATIVES));
    out
}

/// The indices of the highest `top` logits above [`MINE_LOGIT`], each at
/// least [`MINE_SPACING`] cells (Chebyshev) from those taken before it.
fn hardest(logits: &[f32], cells: &[(usize, usize)], top: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..logits.len()).filter(|&i| logits[i] > MINE_LOGIT).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let mut taken: Vec<usize> = Vec::new();
    for i in order {
        if taken.len() >= top {
            break;
        }
        let (r, c) = cells[i];
        let apart = |&j: &usize| {
            let (r2, c2) = cells[j];
            r.abs_diff(r2).max(c.abs_diff(c2)) >= MINE_SPACING
        };
        if taken.iter().all(apart) {
            taken.push(i);
        }
    }
    taken
}

/// What the `site_head` metadata of a trained graph records.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteRecord {
    /// Fitted scans the head trained on.
    pub scans: usize,
    /// TIP windows per scan (after the budget planner).
    pub windows: usize,
    /// Epochs of the second round actually run.
    pub epochs: usize,
    /// Seed.
    pub seed: u64,
}

/// The detector to serve: `composed` with the trained head's weights, the
/// distance term's weight, subnormal weights flushed, `site_head` metadata
/// (with the weights' sha256) and producer `niix model fit`.
pub fn trained_model(
    composed: &OnnxModel,
    head: &SiteHead,
    distance_weight: f32,
    record: &SiteRecord,
) -> Result<OnnxModel, GraphError> {
    let mut m = composed.clone();
    head.write_into(&mut m)?;
    let shape = m.initializer("distance_weight")?.shape().to_vec();
    m.set_initializer("distance_weight", &ArrayD::from_elem(IxDyn(&shape), distance_weight))?;
    m.flush_subnormals();
    let mut digest = Sha256::new();
    for name in [site::W1, site::B1, site::W2, site::B2] {
        for v in m.initializer(name)?.iter() {
            digest.update(v.to_le_bytes());
        }
    }
    let SiteRecord { scans, windows, epochs, seed } = record;
    m.set_metadata(
        "site_head",
        &format!(
            "scans={scans} windows={windows} epochs={epochs} seed={seed} distance_weight={distance_weight} \
             weights_sha256={}",
            hex::encode(digest.finalize())
        ),
    );
    m.0.producer_name = Some("niix model fit".into());
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_planner_lowers_windows_and_mining_only_past_80_percent() {
        let minute = Duration::from_secs(60);
        // 3 of 100 scans in 6 s: 200 s for the rest and 100 s of mining, 306 s in all.
        let easy = plan_budget(Duration::from_secs(6), 3, 100, 10 * minute, 12);
        assert_eq!((easy.windows, easy.mine_every, easy.lowered), (12, 1, false));
        assert!((easy.projected.as_secs_f64() - 300.0).abs() < 1e-6 + 6.0, "{easy:?}");
        let tight = plan_budget(Duration::from_secs(6), 3, 100, 6 * minute, 12);
        assert_eq!((tight.windows, tight.mine_every, tight.lowered), (4, 2, true));
    }

    #[test]
    fn clean_negatives_are_distinct_and_favour_dense_cells() {
        let dense: Vec<bool> = (0..5000).map(|i| i % 10 == 0).collect();
        let picked = clean_negatives(&dense, 3);
        assert_eq!(picked.len(), UNIFORM_NEGATIVES + DENSE_NEGATIVES);
        let mut unique = picked.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), picked.len());
        // 10 % of cells are dense: about 60 uniform and all 400 extra ones.
        let dense_taken = picked.iter().filter(|&&i| dense[i]).count();
        assert!((430..=500).contains(&dense_taken), "{dense_taken}");
        // Small scans give what they have.
        assert_eq!(clean_negatives(&[true; 10], 1).len(), 10);
    }

    #[test]
    fn mining_takes_the_highest_cells_apart_and_above_the_floor() {
        let cells: Vec<(usize, usize)> = (0..10).flat_map(|r| (0..10).map(move |c| (r, c))).collect();
        let mut logits = vec![-5.0f32; 100];
        logits[0] = 3.0; // (0,0)
        logits[1] = 2.0; // (0,1): too close to (0,0)
        logits[44] = 1.0; // (4,4)
        logits[99] = -0.5; // (9,9)
        logits[55] = -2.0; // below the floor
        assert_eq!(hardest(&logits, &cells, 24), vec![0, 44, 99]);
        assert_eq!(hardest(&logits, &cells, 2), vec![0, 44]);
    }
}
