//! The site head's trainer (docs/notes/site-training-plan.md, §2.5): a
//! 142-64-1 MLP over each map cell's `head_input`, trained in Rust with
//! hand-written backpropagation and Adam over ndarray, on cells of a site's
//! own normal scans (negatives) and of windows with projected threats
//! (positives, [`crate::tip`]).
//!
//! In the graph the MLP is two 1x1 convolutions
//! ([`crate::onnx_graph::compose_site_head`]); [`SiteHead::to_initializers`]
//! folds the input standardisation into the first one. Training is
//! deterministic for a seed: the shuffle and the initial weights come from
//! SplitMix64, and ndarray's matrix products run on one thread.

use std::f64::consts::PI;
use std::time::Instant;

use ndarray::{Array1, Array2, ArrayD, ArrayView1, ArrayView2, Axis, IxDyn, LinalgScalar, ScalarOperand, Zip};
use num_traits::Float;

use crate::fit::Picker;
use crate::onnx_graph::{OnnxModel, site};

/// How the head is trained.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Passes over the training cells.
    pub epochs: usize,
    /// Cells per Adam step.
    pub batch: usize,
    /// Peak learning rate; it falls to 0 along a cosine over all steps.
    pub learning_rate: f64,
    /// Decoupled weight decay (AdamW) on the weights, not the biases.
    pub weight_decay: f64,
    /// Share of the total loss weight the positives get.
    pub positive_share: f64,
    /// Seed of the initial weights and the shuffles.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 20,
            batch: 1024,
            learning_rate: 2e-3,
            weight_decay: 1e-4,
            positive_share: 1.0 / 3.0,
            seed: 0,
        }
    }
}

/// What a training run did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// Epochs completed (fewer than asked when the deadline came first).
    pub epochs: usize,
    /// Mean weighted loss of the last epoch.
    pub loss: f64,
    /// True when the deadline stopped it.
    pub stopped_early: bool,
}

/// The parameters of a 1-hidden-layer MLP: `logit = relu(x W1 + b1) w2 + b2`.
#[derive(Debug, Clone, PartialEq)]
pub struct Params<F> {
    /// `[inputs, hidden]`.
    pub w1: Array2<F>,
    /// `[hidden]`.
    pub b1: Array1<F>,
    /// `[hidden]`.
    pub w2: Array1<F>,
    /// The logit's bias.
    pub b2: F,
}

impl<F: Float + LinalgScalar + ScalarOperand + std::ops::AddAssign> Params<F> {
    fn zeros_like(&self) -> Params<F> {
        Params {
            w1: Array2::zeros(self.w1.raw_dim()),
            b1: Array1::zeros(self.b1.len()),
            w2: Array1::zeros(self.w2.len()),
            b2: F::zero(),
        }
    }

    /// The logits of rows `x` (`[n, inputs]`, already standardised).
    pub fn forward(&self, x: ArrayView2<'_, F>) -> Array1<F> {
        let mut hidden = x.dot(&self.w1);
        hidden += &self.b1;
        hidden.mapv_inplace(|v| v.max(F::zero()));
        hidden.dot(&self.w2) + self.b2
    }

    /// The weighted binary cross-entropy of logits against labels `y` (0 or
    /// 1), `sum(w_i l_i) / sum(w_i)`, and its gradient.
    pub fn loss_and_gradient(
        &self,
        x: ArrayView2<'_, F>,
        y: ArrayView1<'_, F>,
        w: ArrayView1<'_, F>,
    ) -> (F, Params<F>) {
        let mut z = x.dot(&self.w1);
        z += &self.b1;
        let h = z.mapv(|v| v.max(F::zero()));
        let logits = h.dot(&self.w2) + self.b2;
        let total = w.sum();
        let mut loss = F::zero();
        // dL/dlogit_i = w_i (sigmoid(logit_i) - y_i) / sum(w).
        let mut d_logit = Array1::<F>::zeros(logits.len());
        for i in 0..logits.len() {
            let (o, yi, wi) = (logits[i], y[i], w[i]);
            // max(o, 0) - o y + ln(1 + e^-|o|): no overflow for any o.
            loss += wi * (o.max(F::zero()) - o * yi + (-o.abs()).exp().ln_1p());
            d_logit[i] = wi * (sigmoid(o) - yi) / total;
        }
        let mut g = self.zeros_like();
        g.w2 = h.t().dot(&d_logit);
        g.b2 = d_logit.sum();
        // dL/dz = (d_logit w2^T) where z > 0.
        let mut dz = d_logit.insert_axis(Axis(1)).dot(&self.w2.view().insert_axis(Axis(0)));
        Zip::from(&mut dz).and(&z).for_each(|d, &zv| {
            if zv <= F::zero() {
                *d = F::zero();
            }
        });
        g.w1 = x.t().dot(&dz);
        g.b1 = dz.sum_axis(Axis(0));
        (loss / total, g)
    }
}

fn sigmoid<F: Float>(v: F) -> F {
    if v >= F::zero() {
        F::one() / (F::one() + (-v).exp())
    } else {
        let e = v.exp();
        e / (F::one() + e)
    }
}

/// Adam's running moments for one parameter set.
struct Adam {
    m: Params<f32>,
    v: Params<f32>,
    step: i32,
}

impl Adam {
    fn new(p: &Params<f32>) -> Adam {
        Adam { m: p.zeros_like(), v: p.zeros_like(), step: 0 }
    }

    fn update(&mut self, p: &mut Params<f32>, g: &Params<f32>, lr: f32, decay: f32) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        const EPS: f32 = 1e-8;
        self.step += 1;
        let c1 = 1.0 - B1.powi(self.step);
        let c2 = 1.0 - B2.powi(self.step);
        let apply = |w: &mut f32, g: f32, m: &mut f32, v: &mut f32, decay: f32| {
            *m = B1 * *m + (1.0 - B1) * g;
            *v = B2 * *v + (1.0 - B2) * g * g;
            *w -= lr * ((*m / c1) / ((*v / c2).sqrt() + EPS) + decay * *w);
        };
        Zip::from(&mut p.w1)
            .and(&g.w1)
            .and(&mut self.m.w1)
            .and(&mut self.v.w1)
            .for_each(|w, &g, m, v| apply(w, g, m, v, decay));
        Zip::from(&mut p.w2)
            .and(&g.w2)
            .and(&mut self.m.w2)
            .and(&mut self.v.w2)
            .for_each(|w, &g, m, v| apply(w, g, m, v, decay));
        Zip::from(&mut p.b1)
            .and(&g.b1)
            .and(&mut self.m.b1)
            .and(&mut self.v.b1)
            .for_each(|w, &g, m, v| apply(w, g, m, v, 0.0));
        apply(&mut p.b2, g.b2, &mut self.m.b2, &mut self.v.b2, 0.0);
    }
}

/// The site head: input standardisation and the MLP's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteHead {
    /// Per input channel, the training cells' mean.
    pub mean: Array1<f32>,
    /// Per input channel, the training cells' standard deviation plus 1e-3.
    pub std: Array1<f32>,
    /// The MLP over standardised inputs.
    pub params: Params<f32>,
}

/// The training cells could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainError {
    /// Rows, labels and weights disagree in number, or the rows' width is not the head's.
    #[error("{0}")]
    Shape(String),
    /// Training needs both kinds of cell.
    #[error("the training cells hold {positives} positives and {negatives} negatives; both are needed")]
    OneClass {
        /// Cells labelled 1.
        positives: usize,
        /// Cells labelled 0.
        negatives: usize,
    },
}

impl SiteHead {
    /// A head for `inputs` channels and `hidden` units, standardisation from
    /// the rows `x`, He-normal weights from `seed`, biases 0.
    pub fn new(x: ArrayView2<'_, f32>, hidden: usize, seed: u64) -> SiteHead {
        let inputs = x.ncols();
        let (mean, std) = standardisation(x);
        let mut normal = Normal(Picker(seed ^ 0x5173_e4ead), None);
        let he = |fan_in: usize| (2.0 / fan_in as f64).sqrt();
        let s1 = he(inputs);
        let w1 = Array2::from_shape_simple_fn((inputs, hidden), || (normal.sample() * s1) as f32);
        let s2 = he(hidden);
        let w2 = Array1::from_shape_simple_fn(hidden, || (normal.sample() * s2) as f32);
        SiteHead { mean, std, params: Params { w1, b1: Array1::zeros(hidden), w2, b2: 0.0 } }
    }

    /// Input channels.
    pub fn inputs(&self) -> usize {
        self.mean.len()
    }

    /// Rows standardised with the head's mean and std.
    pub fn standardise(&self, x: ArrayView2<'_, f32>) -> Array2<f32> {
        let mut z = x.to_owned();
        z -= &self.mean;
        z /= &self.std;
        z
    }

    /// Logits of raw (unstandardised) rows `[n, inputs]`.
    pub fn logits(&self, x: ArrayView2<'_, f32>) -> Array1<f32> {
        self.params.forward(self.standardise(x).view())
    }

    /// Trains on rows `x` with labels `y` (1 = an object, 0 = normal) and
    /// per-row weights `w` (1, or e.g. 2 for hard negatives); the positives'
    /// weights are rescaled to `positive_share` of the total. Stops at the end
    /// of the epoch that passes `deadline`, keeping the weights it has.
    /// `progress` hears each finished epoch and its mean loss.
    pub fn train(
        &mut self,
        x: ArrayView2<'_, f32>,
        y: &[f32],
        w: &[f32],
        config: &TrainConfig,
        deadline: Option<Instant>,
        progress: &mut dyn FnMut(usize, f64),
    ) -> Result<TrainReport, TrainError> {
        let n = x.nrows();
        if y.len() != n || w.len() != n {
            return Err(TrainError::Shape(format!("{n} rows, {} labels and {} weights", y.len(), w.len())));
        }
        if x.ncols() != self.inputs() {
            return Err(TrainError::Shape(format!("rows of {} values; the head takes {}", x.ncols(), self.inputs())));
        }
        let positives = y.iter().filter(|&&v| v > 0.5).count();
        if positives == 0 || positives == n {
            return Err(TrainError::OneClass { positives, negatives: n - positives });
        }
        let weights = balanced(y, w, config.positive_share);
        let batch = config.batch.max(1);
        let steps_per_epoch = n.div_ceil(batch);
        let total_steps = (steps_per_epoch * config.epochs).max(1);
        let mut adam = Adam::new(&self.params);
        let mut order: Vec<usize> = (0..n).collect();
        let mut pick = Picker(config.seed);
        let mut report = TrainReport { epochs: 0, loss: f64::NAN, stopped_early: false };
        let mut step = 0usize;
        for epoch in 0..config.epochs {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                report.stopped_early = true;
                break;
            }
            for i in 0..n.saturating_sub(1) {
                let j = i + pick.next(n - i);
                order.swap(i, j);
            }
            let (mut sum, mut weight) = (0.0f64, 0.0f64);
            for chunk in order.chunks(batch) {
                let xb = self.standardise(x.select(Axis(0), chunk).view());
                let yb: Array1<f32> = chunk.iter().map(|&i| y[i]).collect();
                let wb: Array1<f32> = chunk.iter().map(|&i| weights[i]).collect();
                let (loss, grad) = self.params.loss_and_gradient(xb.view(), yb.view(), wb.view());
                let wsum = wb.sum() as f64;
                sum += loss as f64 * wsum;
                weight += wsum;
                let lr = config.learning_rate * 0.5 * (1.0 + (PI * step as f64 / total_steps as f64).cos());
                adam.update(&mut self.params, &grad, lr as f32, config.weight_decay as f32);
                step += 1;
            }
            report.epochs = epoch + 1;
            report.loss = sum / weight.max(f64::MIN_POSITIVE);
            progress(epoch + 1, report.loss);
        }
        Ok(report)
    }

    /// The head's weights as the graph's initializers, standardisation folded
    /// into the first layer: `site_w1 [hidden, inputs, 1, 1]`, `site_b1`,
    /// `site_w2 [1, hidden, 1, 1]`, `site_b2 [1]`.
    pub fn to_initializers(&self) -> Vec<(&'static str, ArrayD<f32>)> {
        let (inputs, hidden) = self.params.w1.dim();
        let mut w1 = ArrayD::<f32>::zeros(IxDyn(&[hidden, inputs, 1, 1]));
        let mut b1 = Array1::<f32>::zeros(hidden);
        for j in 0..hidden {
            // W1'[i, j] = W1[i, j] / std_i; b1'_j = b1_j - sum_i mean_i W1'[i, j], in f64.
            let mut shift = 0.0f64;
            for i in 0..inputs {
                let folded = self.params.w1[[i, j]] as f64 / self.std[i] as f64;
                w1[[j, i, 0, 0]] = folded as f32;
                shift += self.mean[i] as f64 * folded;
            }
            b1[j] = (self.params.b1[j] as f64 - shift) as f32;
        }
        let w2 = self.params.w2.clone().into_shape_with_order(IxDyn(&[1, hidden, 1, 1])).expect("hidden values");
        vec![
            (site::W1, w1),
            (site::B1, b1.into_dyn()),
            (site::W2, w2),
            (site::B2, ArrayD::from_elem(IxDyn(&[1]), self.params.b2)),
        ]
    }

    /// Writes the head into a graph composed with
    /// [`crate::onnx_graph::compose_site_head`].
    pub fn write_into(&self, model: &mut OnnxModel) -> Result<(), crate::onnx_graph::GraphError> {
        for (name, values) in self.to_initializers() {
            model.set_initializer(name, &values)?;
        }
        Ok(())
    }
}

/// Per-column mean and standard deviation (+1e-3) of rows `x`, in f64.
fn standardisation(x: ArrayView2<'_, f32>) -> (Array1<f32>, Array1<f32>) {
    let n = x.nrows().max(1) as f64;
    let mut sum = Array1::<f64>::zeros(x.ncols());
    let mut sq = Array1::<f64>::zeros(x.ncols());
    for row in x.rows() {
        Zip::from(&mut sum).and(&mut sq).and(&row).for_each(|s, q, &v| {
            *s += v as f64;
            *q += v as f64 * v as f64;
        });
    }
    let mean = sum.mapv(|s| s / n);
    let std = Zip::from(&sq).and(&mean).map_collect(|&q, &m| ((q / n - m * m).max(0.0).sqrt() + 1e-3) as f32);
    (mean.mapv(|m| m as f32), std)
}

/// Row weights with the positives' total scaled to `share` of all weight.
fn balanced(y: &[f32], w: &[f32], share: f64) -> Vec<f32> {
    let (mut pos, mut neg) = (0.0f64, 0.0f64);
    for (&yi, &wi) in y.iter().zip(w) {
        if yi > 0.5 { pos += wi as f64 } else { neg += wi as f64 }
    }
    // pos' / (pos' + neg) = share.
    let factor = share / (1.0 - share) * neg / pos.max(f64::MIN_POSITIVE);
    // Then a mean weight of 1, so the learning rate means the same at any size.
    let total = neg + pos * factor;
    let norm = y.len() as f64 / total.max(f64::MIN_POSITIVE);
    y.iter().zip(w).map(|(&yi, &wi)| (wi as f64 * if yi > 0.5 { factor } else { 1.0 } * norm) as f32).collect()
}

/// Standard normal samples (Box-Muller) from a SplitMix64 stream.
pub(crate) struct Normal(pub(crate) Picker, pub(crate) Option<f64>);

impl Normal {
    pub(crate) fn sample(&mut self) -> f64 {
        if let Some(v) = self.1.take() {
            return v;
        }
        let (u1, u2) = (self.0.unit(), self.0.unit());
        let r = (-2.0 * (1.0 - u1).ln()).sqrt();
        self.1 = Some(r * (2.0 * PI * u2).sin());
        r * (2.0 * PI * u2).cos()
    }
}

/// The area under the ROC curve of `scores` for labels (1 = positive), ties
/// counting half: the chance a random positive scores above a random negative.
pub fn auroc(scores: &[f32], labels: &[f32]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Mid-ranks of tied scores, then Mann-Whitney U.
    let mut rank = vec![0.0f64; scores.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        for k in i..=j {
            rank[order[k]] = (i + j) as f64 / 2.0 + 1.0;
        }
        i = j + 1;
    }
    let pos = labels.iter().filter(|&&l| l > 0.5).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return f64::NAN;
    }
    let rank_sum: f64 = labels.iter().zip(&rank).filter(|(l, _)| **l > 0.5).map(|(_, r)| r).sum();
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use ndarray::Array4;
    use ort::session::Session;
    use ort::value::TensorRef;

    use super::*;
    use crate::onnx_graph::{HEAD_INPUT_CHANNELS, SITE_HIDDEN, compose_site_head};
    use crate::runtime::environment;

    /// Rows from a fixed stream: `n` rows of `d` values in about -2..2.
    fn rows(n: usize, d: usize, seed: u64) -> Array2<f32> {
        let mut normal = Normal(Picker(seed), None);
        Array2::from_shape_simple_fn((n, d), || normal.sample() as f32)
    }

    #[test]
    fn the_gradient_matches_finite_differences() {
        // In f64, so the check measures the backward pass, not rounding.
        let x = rows(40, 7, 1).mapv(f64::from);
        let head = SiteHead::new(rows(40, 7, 1).view(), 5, 3);
        let p = Params {
            w1: head.params.w1.mapv(f64::from),
            b1: Array1::from_vec(vec![0.1, -0.2, 0.05, 0.3, -0.1]),
            w2: head.params.w2.mapv(f64::from),
            b2: 0.2,
        };
        let y: Array1<f64> = (0..40).map(|i| (i % 3 == 0) as u8 as f64).collect();
        let w: Array1<f64> = (0..40).map(|i| 1.0 + (i % 4) as f64 * 0.5).collect();
        let (_, g) = p.loss_and_gradient(x.view(), y.view(), w.view());
        let loss = |q: &Params<f64>| q.loss_and_gradient(x.view(), y.view(), w.view()).0;
        let eps = 1e-6;
        let check = |analytic: f64, plus: Params<f64>, minus: Params<f64>, what: String| {
            let numeric = (loss(&plus) - loss(&minus)) / (2.0 * eps);
            let rel = (analytic - numeric).abs() / analytic.abs().max(numeric.abs()).max(1e-8);
            assert!(rel < 1e-3 || (analytic - numeric).abs() < 1e-9, "{what}: {analytic} vs {numeric}");
        };
        for (i, j) in [(0, 0), (3, 2), (6, 4), (2, 1), (5, 3)] {
            let (mut a, mut b) = (p.clone(), p.clone());
            a.w1[[i, j]] += eps;
            b.w1[[i, j]] -= eps;
            check(g.w1[[i, j]], a, b, format!("w1[{i},{j}]"));
        }
        for j in 0..5 {
            let (mut a, mut b) = (p.clone(), p.clone());
            a.b1[j] += eps;
            b.b1[j] -= eps;
            check(g.b1[j], a, b, format!("b1[{j}]"));
            let (mut a, mut b) = (p.clone(), p.clone());
            a.w2[j] += eps;
            b.w2[j] -= eps;
            check(g.w2[j], a, b, format!("w2[{j}]"));
        }
        let (mut a, mut b) = (p.clone(), p.clone());
        a.b2 += eps;
        b.b2 -= eps;
        check(g.b2, a, b, "b2".into());
    }

    #[test]
    fn a_separable_set_is_learnt_perfectly_and_deterministically() {
        // Label 1 where two channels together pass a threshold (not
        // separable by one channel alone), with uninformative channels
        // beside; rows within 0.2 of the boundary are left out, so the
        // classes are separable with a margin.
        let separable = |n: usize, seed: u64| {
            let all = rows(n, 20, seed);
            let keep: Vec<usize> = (0..n).filter(|&i| (all[[i, 0]] + 0.5 * all[[i, 3]] - 1.0).abs() > 0.2).collect();
            let x = all.select(Axis(0), &keep);
            let y: Vec<f32> = x.rows().into_iter().map(|r| ((r[0] + 0.5 * r[3] > 1.0) as u8) as f32).collect();
            (x, y)
        };
        let (x, y) = separable(4000, 7);
        let w = vec![1.0; y.len()];
        let config = TrainConfig { epochs: 40, batch: 256, learning_rate: 1e-2, seed: 4, ..TrainConfig::default() };
        let train = || {
            let mut head = SiteHead::new(x.view(), 16, 4);
            let mut seen = Vec::new();
            let report = head.train(x.view(), &y, &w, &config, None, &mut |e, l| seen.push((e, l))).unwrap();
            (head, report, seen)
        };
        let (head, report, seen) = train();
        assert_eq!(report.epochs, 40);
        assert_eq!(seen.len(), 40);
        assert!(seen[39].1 < seen[0].1, "the loss falls: {seen:?}");
        let scores = head.logits(x.view());
        assert_eq!(auroc(scores.as_slice().unwrap(), &y), 1.0);
        // Unseen rows of the same rule.
        let (test, ty) = separable(2000, 8);
        assert!(auroc(head.logits(test.view()).as_slice().unwrap(), &ty) > 0.995);
        let (again, _, _) = train();
        assert_eq!(again, head, "the same seed gives the same weights, bit for bit");
        // A passed deadline stops it before the first epoch, keeping the weights.
        let mut late = SiteHead::new(x.view(), 16, 4);
        let before = late.clone();
        let r = late.train(x.view(), &y, &w, &config, Some(Instant::now()), &mut |_, _| {}).unwrap();
        assert!(r.stopped_early && r.epochs == 0 && late == before);
        // One class alone is refused.
        let zeros = vec![0.0; y.len()];
        assert!(matches!(
            late.train(x.view(), &zeros, &w, &config, None, &mut |_, _| {}),
            Err(TrainError::OneClass { .. })
        ));
    }

    #[test]
    fn auroc_counts_ties_half() {
        assert_eq!(auroc(&[0.1, 0.2, 0.9, 0.8], &[0.0, 0.0, 1.0, 1.0]), 1.0);
        assert_eq!(auroc(&[0.5, 0.5], &[0.0, 1.0]), 0.5);
        assert_eq!(auroc(&[0.9, 0.1], &[0.0, 1.0]), 0.0);
    }

    #[test]
    fn the_rust_forward_equals_onnx_runtimes_site_logit() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/patchcore/model.onnx");
        let base = OnnxModel::from_bytes(&std::fs::read(path).unwrap()).unwrap();
        let mut m = compose_site_head(&base).unwrap();
        m.prune(&[site::HEAD_INPUT, site::LOGIT]).unwrap();
        // A random tile in the graph's units.
        let mut normal = Normal(Picker(21), None);
        let tile = Array4::from_shape_fn((1, 2, 1024, 1024), |(_, c, y, x)| {
            let block = if (200..330).contains(&y) && (600..800).contains(&x) { 1.0 } else { 0.0 };
            (0.5 + 0.2 * c as f32 + block + 0.2 * normal.sample() as f32).clamp(0.0, 4.0)
        });
        let env = environment().expect("ONNX Runtime for the test suite");
        let run = |m: &OnnxModel| {
            let mut s = Session::builder(&env).unwrap().commit_from_memory(&m.to_bytes()).unwrap();
            let out = s.run(ort::inputs!["planes" => TensorRef::from_array_view(tile.view()).unwrap()]).unwrap();
            let get = |name: &str| out[name].try_extract_tensor::<f32>().unwrap().1.to_vec();
            (get(site::HEAD_INPUT), get(site::LOGIT))
        };
        let (head_input, _) = run(&m);
        // Cells as rows: [1024 cells, 142].
        let cells = Array2::from_shape_vec((HEAD_INPUT_CHANNELS, 32 * 32), head_input).unwrap().reversed_axes();
        // A head with random weights and the tile's own standardisation.
        let mut head = SiteHead::new(cells.view(), SITE_HIDDEN, 9);
        let mut normal = Normal(Picker(5), None);
        head.params.b1.mapv_inplace(|_| 0.1 * normal.sample() as f32);
        head.params.b2 = -0.3;
        head.write_into(&mut m).unwrap();
        let (_, logit) = run(&m);
        let rust = head.logits(cells.view());
        let worst = rust.iter().zip(&logit).map(|(a, b)| (a - b).abs() / a.abs().max(1.0)).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "Rust and ONNX Runtime logits differ by {worst}");
        assert!(rust.std(0.0) > 0.1, "the logits vary over the tile");
    }
}
