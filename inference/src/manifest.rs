//! `model.toml`: what a model expects and how to read its output.
//! The format is documented in `docs/models.md`.

use serde::{Deserialize, Serialize};

use crate::orientation::LengthAxis;

/// Plane kinds a manifest may name (lowercase protocol names).
pub const PLANE_KINDS: &[&str] = &["single_energy", "high_energy", "low_energy", "z_effective", "backscatter"];
/// DICOS threat categories a model's regions may carry.
pub const THREAT_CATEGORIES: &[&str] =
    &["ANOMALY", "CONTRABAND", "EXPLOSIVE", "PI", "PHARMACEUTICAL", "LAPTOP", "OTHER"];

/// A parsed `model.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Model name; must equal its directory name.
    pub name: String,
    /// What the model does, for people.
    #[serde(default)]
    pub description: String,
    /// Who made it.
    #[serde(default)]
    pub manufacturer: String,
    /// True for a demonstration model that is not a trained detector.
    #[serde(default)]
    pub demo: bool,
    /// The model's input.
    pub input: InputSpec,
    /// Raw pixel values to model input.
    pub transform: Transform,
    /// The model's output.
    pub output: OutputSpec,
    /// From the anomaly map to regions and an alarm.
    pub decision: Decision,
    /// Constant tensors fed to further graph inputs from files beside
    /// `model.onnx` (e.g. a fitted memory bank).
    #[serde(default)]
    pub constants: Vec<Constant>,
    /// How `niix model fit` makes a new version from a site's normal scans.
    #[serde(default)]
    pub fit: Option<FitSpec>,
    /// A per-position model of the conveyance's own structure, which raises
    /// the anomaly map where a scan exceeds it ([`crate::structure`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structure: Option<StructureSpec>,
}

/// The structure model: how `niix model fit` builds it and how it scores.
/// Values are in model-input units (after the transform).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StructureSpec {
    /// The fitted model in the version directory (written by `niix model
    /// fit`); none in a base model that has not been fitted yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Height of the scans it was fitted on, pixels.
    #[serde(default)]
    pub height: usize,
    /// Width of the scans it was fitted on, pixels.
    #[serde(default)]
    pub width: usize,
    /// Block side, pixels.
    #[serde(default = "default_block")]
    pub block: usize,
    /// Largest registration shift searched, pixels.
    #[serde(default = "default_max_shift")]
    pub max_shift: usize,
    /// Fit: fewer normal scans than this (fitted and library together)
    /// give no structure model: with few scans, a place that cargo merely
    /// did not reach in any of them would pass for structure.
    #[serde(default = "default_min_scans")]
    pub min_scans: usize,
    /// Fit: a block is structure only if every normal scan is at least this dense there.
    pub min_density: f32,
    /// Fit: ... and if its standard deviation across the normal scans is below this.
    pub max_spread: f32,
    /// Excess over the normal limit that is still ignored.
    pub margin: f32,
    /// Map units added per unit of excess beyond the margin.
    pub weight: f32,
    /// Cargo that runs on into the structure (a pallet against the doors
    /// overlaps the corner posts in the image) is not an excess. From a
    /// structure block, the first non-structure block within this many
    /// blocks along the conveyance's length (`[input] length_along`) is
    /// found; if cargo then runs on for this many blocks, its smallest
    /// density there (above the lightest normal scan) is discounted.
    /// 0 turns the discount off.
    #[serde(default = "default_reach")]
    pub reach: usize,
}

fn default_reach() -> usize {
    12
}

fn default_block() -> usize {
    8
}

fn default_max_shift() -> usize {
    48
}

fn default_min_scans() -> usize {
    100
}

/// A constant input: raw little-endian float32 values in a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constant {
    /// Input name in the ONNX graph.
    pub name: String,
    /// File name in the version directory.
    pub file: String,
    /// Tensor shape; the file holds exactly their product of values.
    pub shape: Vec<usize>,
}

/// Fitting a memory-bank detector (PatchCore-style) to normal scans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitSpec {
    /// The feature graph (same input as the model), in the version directory.
    pub features: String,
    /// Its output: float32 `[N, D, tile/stride, tile/stride]`.
    pub output: String,
    /// The constant that holds the memory bank, shape `[K, D]`.
    pub bank: String,
    /// Rows of the memory bank (greedy coreset of the normal features).
    #[serde(default = "default_coreset")]
    pub coreset: usize,
    /// Feature cells sampled from each normal scan before the coreset.
    #[serde(default = "default_samples")]
    pub samples_per_scan: usize,
    /// Share of held-out normal scans allowed to alarm.
    #[serde(default = "default_far")]
    pub false_alarm_rate: f64,
    /// The constant, shape `[K]`, that scales the distance to each bank row
    /// by the bank's own spacing around it ([`crate::fit::bank_scale`]);
    /// none for a graph that takes the plain distance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bank_scale: Option<String>,
    /// The spacing around a bank row: the distance to its n-th nearest other row.
    #[serde(default = "default_scale_neighbours")]
    pub scale_neighbours: usize,
    /// How far above the median normal scan the `false_alarm_rate` quantile
    /// of normal image scores lies, measured by a fit that held out enough
    /// normal scans to read that quantile off (see
    /// [`crate::fit::fit_threshold`]). A later fit from this version with
    /// fewer held-out scans sets its threshold at their median plus this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<f32>,
    /// How many held-out normal scans `tail` was measured on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_scans: Option<usize>,
    /// How many held-out normal scans the fit set the threshold on
    /// (written by `niix model fit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out_scans: Option<usize>,
    /// The 5-95 % bootstrap interval of the false-alarm rate at the fitted
    /// threshold, from those scans ([`crate::fit::bootstrap`]; written by
    /// `niix model fit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub false_alarm_interval: Option<[f64; 2]>,
    /// A template only: the directory holding `model.onnx` and `features`,
    /// relative to the manifest's own directory, when they are another
    /// template's (`fixtures/patchcore-se` uses `fixtures/patchcore`'s).
    /// `niix model fit` copies the graphs into the version it writes, which
    /// never has this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graphs: Option<String>,
}

impl FitSpec {
    /// The directory holding the graphs of a model whose manifest lies in `dir`.
    pub fn graph_dir(&self, dir: &std::path::Path) -> std::path::PathBuf {
        match &self.graphs {
            Some(g) => dir.join(g),
            None => dir.to_path_buf(),
        }
    }
}

fn default_coreset() -> usize {
    4096
}

fn default_samples() -> usize {
    3000
}

fn default_far() -> f64 {
    0.01
}

fn default_scale_neighbours() -> usize {
    10
}

/// The model's input tensor: float32 `[N, channels, tile, tile]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Input name in the ONNX graph.
    pub name: String,
    /// Per channel, which plane feeds it: a plane kind, or alternatives
    /// separated by `|` tried in order (e.g. `"low_energy|single_energy"`).
    pub channels: Vec<String>,
    /// Tile side in pixels.
    pub tile: usize,
    /// Overlap between neighbouring tiles in pixels (even).
    pub overlap: usize,
    /// Tiles per ONNX Runtime call.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// The image axis the conveyance's length runs along in the scans the
    /// model was made for (default `y`). A scan whose length runs along the
    /// other axis is transposed into this frame for the analysis
    /// ([`crate::orientation`]).
    #[serde(default, skip_serializing_if = "LengthAxis::is_y")]
    pub length_along: LengthAxis,
}

fn default_batch() -> usize {
    4
}

/// How raw 16-bit values become model input, per channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transform {
    /// `neg_log`: -ln(max(v,1)/i0) (attenuation); `ratio`: v/i0; `raw`: v.
    pub kind: TransformKind,
    /// Unattenuated intensity (air), for `neg_log` and `ratio`.
    #[serde(default = "default_i0")]
    pub i0: f32,
    /// Clip to [lo, hi] after the transform.
    #[serde(default)]
    pub clip: Option<[f32; 2]>,
    /// Subtracted after clipping (one value, or one per channel).
    #[serde(default)]
    pub mean: Vec<f32>,
    /// Divided by after subtracting the mean (one value, or one per channel).
    #[serde(default)]
    pub std: Vec<f32>,
}

fn default_i0() -> f32 {
    65535.0
}

/// The intensity transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransformKind {
    /// -ln(v / i0): attenuation, what detectors on transmission images see.
    NegLog,
    /// v / i0.
    Ratio,
    /// The value itself.
    Raw,
}

/// The model's output tensor: float32 `[N, 1, h, w]` (or `[N, h, w]`), `h`
/// and `w` the tile side divided by a whole stride.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Output name in the ONNX graph.
    pub name: String,
}

/// Score normalisation, threshold and region rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// Raw map value that scores 0.
    pub score_min: f32,
    /// Raw map value that scores 1.
    pub score_max: f32,
    /// Normalised score at or above which a pixel is anomalous, in (0, 1].
    pub threshold: f32,
    /// Smallest region kept, in image pixels.
    #[serde(default)]
    pub min_region_area: u64,
    /// Mean over a `smooth x smooth` window of map cells before scoring
    /// (odd; 1 = none), e.g. to keep single noisy cells from alarming.
    #[serde(default = "default_smooth")]
    pub smooth: usize,
    /// Share of the scan's own background level taken off every cell
    /// before scoring (0 = none, below 1): a cell then scores by how far
    /// it stands out of its scan, so cargo that is unusual all over (a hold
    /// of varied machinery) does not outrank one object that stands out.
    #[serde(default)]
    pub background_weight: f32,
    /// The background level: this quantile of the scan's raw map cells.
    #[serde(default = "default_background_quantile")]
    pub background_quantile: f32,
    /// DICOS threat category of the regions.
    #[serde(default = "default_category")]
    pub category: String,
}

impl Decision {
    /// The raw map value a normalised score stands for: the inverse of the
    /// pipeline's normalisation (`score_min` at 0, `score_max` at 1), so a
    /// value clamped at 1 comes back as `score_max`.
    pub fn raw(&self, normalised: f32) -> f32 {
        self.score_min + normalised * (self.score_max - self.score_min)
    }
}

fn default_smooth() -> usize {
    1
}

fn default_background_quantile() -> f32 {
    0.99
}

fn default_category() -> String {
    "ANOMALY".into()
}

/// A file name inside the version directory: no path, not hidden.
fn plain_file_name(name: &str) -> bool {
    !(name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.'))
}

/// A manifest that makes no sense on its own.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("model.toml: {0}")]
pub struct ManifestError(pub String);

impl Manifest {
    /// Parses and checks a manifest (without the ONNX model).
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let m: Manifest = toml::from_str(text).map_err(|e| ManifestError(e.to_string()))?;
        m.check()?;
        Ok(m)
    }

    /// The plane kinds that may feed channel `c`, in preference order.
    pub fn channel_kinds(&self, c: usize) -> Vec<&str> {
        self.input.channels[c].split('|').map(str::trim).collect()
    }

    /// Per-channel mean and std (a single value applies to every channel).
    pub fn normalisation(&self, c: usize) -> (f32, f32) {
        let pick = |v: &[f32], default: f32| match v.len() {
            0 => default,
            1 => v[0],
            _ => v[c],
        };
        (pick(&self.transform.mean, 0.0), pick(&self.transform.std, 1.0))
    }

    fn check(&self) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError(m));
        if self.name.trim().is_empty() {
            return bad("name is empty".into());
        }
        let i = &self.input;
        if i.channels.is_empty() {
            return bad("input.channels is empty: name the plane kind feeding each input channel".into());
        }
        for (c, _) in i.channels.iter().enumerate() {
            for kind in self.channel_kinds(c) {
                if !PLANE_KINDS.contains(&kind) {
                    return bad(format!("input.channels[{c}]: unknown plane kind {kind:?}; known: {PLANE_KINDS:?}"));
                }
            }
        }
        if i.tile < 8 || i.tile > 8192 {
            return bad(format!("input.tile {} is outside 8..8192", i.tile));
        }
        if !i.overlap.is_multiple_of(2) || i.overlap >= i.tile {
            return bad(format!("input.overlap {} must be even and smaller than the tile ({})", i.overlap, i.tile));
        }
        if i.batch == 0 || i.batch > 256 {
            return bad(format!("input.batch {} is outside 1..256", i.batch));
        }
        let t = &self.transform;
        if !(t.i0.is_finite() && t.i0 > 0.0) {
            return bad(format!("transform.i0 {} must be positive", t.i0));
        }
        if let Some([lo, hi]) = t.clip
            && lo.partial_cmp(&hi) != Some(std::cmp::Ordering::Less)
        {
            return bad(format!("transform.clip [{lo}, {hi}] is empty"));
        }
        for (what, v) in [("mean", &t.mean), ("std", &t.std)] {
            if v.len() > 1 && v.len() != i.channels.len() {
                return bad(format!("transform.{what} has {} values for {} channels", v.len(), i.channels.len()));
            }
        }
        if t.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return bad("transform.std values must be positive".into());
        }
        let d = &self.decision;
        if d.score_max.partial_cmp(&d.score_min) != Some(std::cmp::Ordering::Greater) {
            return bad(format!("decision.score_max {} must exceed score_min {}", d.score_max, d.score_min));
        }
        if !(d.threshold > 0.0 && d.threshold <= 1.0) {
            return bad(format!("decision.threshold {} must be in (0, 1]", d.threshold));
        }
        if d.smooth == 0 || d.smooth.is_multiple_of(2) || d.smooth > 15 {
            return bad(format!("decision.smooth {} must be odd, 1..15", d.smooth));
        }
        if !(0.0..1.0).contains(&d.background_weight) {
            return bad(format!("decision.background_weight {} must be at least 0 and below 1", d.background_weight));
        }
        if !(d.background_quantile > 0.0 && d.background_quantile < 1.0) {
            return bad(format!("decision.background_quantile {} must be between 0 and 1", d.background_quantile));
        }
        if let Some(st) = &self.structure {
            if !(2..=64).contains(&st.block) {
                return bad(format!("structure.block {} is outside 2..64", st.block));
            }
            if st.min_scans < 2 {
                return bad(format!("structure.min_scans {} must be at least 2", st.min_scans));
            }
            if st.reach > 256 {
                return bad(format!("structure.reach {} is above 256 blocks", st.reach));
            }
            let values = [st.min_density, st.max_spread, st.margin, st.weight];
            if values.iter().any(|v| !(v.is_finite() && *v >= 0.0)) {
                return bad(
                    "structure: min_density, max_spread, margin and weight must be finite and not negative".into()
                );
            }
            if let Some(file) = &st.file {
                if !plain_file_name(file) {
                    return bad(format!("structure.file {file:?} must be a plain file name"));
                }
                if st.height < 2 * st.block || st.width < 2 * st.block {
                    return bad(format!(
                        "structure: {}x{} scans are too small for {}-pixel blocks",
                        st.height, st.width, st.block
                    ));
                }
            }
        }
        for c in &self.constants {
            if !plain_file_name(&c.file) {
                return bad(format!("constants {:?}: file {:?} must be a plain file name", c.name, c.file));
            }
            if c.shape.is_empty() || c.shape.contains(&0) {
                return bad(format!("constants {:?}: shape {:?} must be non-empty and positive", c.name, c.shape));
            }
        }
        if let Some(f) = &self.fit {
            if !self.constants.iter().any(|c| c.name == f.bank && c.shape.len() == 2) {
                return bad(format!("fit.bank {:?} is not a two-dimensional entry of constants", f.bank));
            }
            if !(f.false_alarm_rate > 0.0 && f.false_alarm_rate < 1.0) || f.coreset == 0 || f.samples_per_scan == 0 {
                return bad("fit: false_alarm_rate must be in (0, 1); coreset and samples_per_scan positive".into());
            }
            if let Some(scale) = &f.bank_scale {
                if scale == &f.bank || !self.constants.iter().any(|c| &c.name == scale && c.shape.len() == 1) {
                    return bad(format!(
                        "fit.bank_scale {scale:?} is not a one-dimensional entry of constants (other than fit.bank)"
                    ));
                }
                if f.scale_neighbours == 0 {
                    return bad("fit.scale_neighbours must be at least 1".into());
                }
            }
            if f.tail.is_some_and(|t| !(t.is_finite() && t >= 0.0)) {
                return bad("fit.tail must be a finite score excess of at least 0".into());
            }
            if f.graphs.as_deref().is_some_and(|g| g.trim().is_empty()) {
                return bad("fit.graphs is empty: name the directory holding the graphs, or leave it out".into());
            }
            if !plain_file_name(&f.features) {
                return bad(format!("fit.features {:?} must be a plain file name", f.features));
            }
        }
        if !THREAT_CATEGORIES.contains(&d.category.as_str()) {
            return bad(format!(
                "decision.category {:?} is not a DICOS threat category {THREAT_CATEGORIES:?}",
                d.category
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const DEMO: &str = r#"
name = "demo"
demo = true
[input]
name = "planes"
channels = ["high_energy|single_energy", "low_energy|single_energy"]
tile = 256
overlap = 32
[transform]
kind = "neg_log"
clip = [0.0, 10.0]
[output]
name = "anomaly_map"
[decision]
score_min = 0.0
score_max = 2.0
threshold = 0.5
min_region_area = 16
"#;

    #[test]
    fn a_good_manifest_parses_with_defaults() {
        let m = Manifest::parse(DEMO).unwrap();
        assert_eq!(m.input.batch, 4);
        assert_eq!(m.transform.i0, 65535.0);
        assert_eq!(m.decision.category, "ANOMALY");
        assert_eq!((m.decision.background_weight, m.decision.background_quantile), (0.0, 0.99));
        assert_eq!(m.channel_kinds(1), vec!["low_energy", "single_energy"]);
        assert_eq!(m.normalisation(1), (0.0, 1.0));
        assert_eq!(m.input.length_along, LengthAxis::Y);
        // Written only when it is not the default.
        assert!(!toml::to_string(&m).unwrap().contains("length_along"));
        let along_x = Manifest::parse(&DEMO.replace("overlap = 32", "overlap = 32\nlength_along = \"x\"")).unwrap();
        assert_eq!(along_x.input.length_along, LengthAxis::X);
        assert!(toml::to_string(&along_x).unwrap().contains("length_along = \"x\""));
    }

    #[test]
    fn each_inconsistency_is_named() {
        let cases = [
            ("tile = 256", "tile = 4", "outside 8..8192"),
            ("overlap = 32", "overlap = 31", "must be even"),
            ("overlap = 32", "overlap = 256", "smaller than the tile"),
            ("\"low_energy|single_energy\"", "\"x_ray\"", "unknown plane kind"),
            ("threshold = 0.5", "threshold = 1.5", "threshold"),
            ("score_max = 2.0", "score_max = 0.0", "must exceed"),
            ("clip = [0.0, 10.0]", "clip = [3.0, 1.0]", "is empty"),
            ("min_region_area = 16", "min_region_area = 16\ncategory = \"GUNS\"", "DICOS threat category"),
            ("min_region_area = 16", "min_region_area = 16\nbackground_weight = 1.0", "background_weight"),
            ("min_region_area = 16", "min_region_area = 16\nbackground_quantile = 1.0", "background_quantile"),
            ("demo = true", "demo = true\nspeed = 3", "unknown field"),
            ("overlap = 32", "overlap = 32\nlength_along = \"z\"", "unknown variant"),
            ("[output]\nname = \"anomaly_map\"", "", "missing field"),
        ];
        assert_each_refused(DEMO, &cases);
    }

    /// Each `(from, to, needle)`: `base` with `from` replaced by `to` is
    /// refused with an error that contains `needle`.
    fn assert_each_refused(base: &str, cases: &[(&str, &str, &str)]) {
        for (from, to, needle) in cases {
            let text = base.replace(from, to);
            assert_ne!(text, base, "{from}");
            let e = Manifest::parse(&text).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle:?} not in {e}");
        }
    }

    #[test]
    fn a_fit_section_names_its_constants() {
        let fittable = format!(
            "{DEMO}{}",
            r#"
[[constants]]
name = "memory_bank"
file = "memory_bank.f32"
shape = [1, 66]
[[constants]]
name = "bank_scale"
file = "bank_scale.f32"
shape = [1]
[fit]
features = "features.onnx"
output = "features"
bank = "memory_bank"
bank_scale = "bank_scale"
"#
        );
        let m = Manifest::parse(&fittable).unwrap();
        let fit = m.fit.as_ref().unwrap();
        assert_eq!((fit.bank_scale.as_deref(), fit.scale_neighbours, fit.coreset), (Some("bank_scale"), 10, 4096));
        // It survives the round trip `niix model fit` makes.
        assert_eq!(Manifest::parse(&toml::to_string(&m).unwrap()).unwrap(), m);
        let cases = [
            ("bank = \"memory_bank\"", "bank = \"bank_scale\"", "fit.bank"),
            ("bank_scale = \"bank_scale\"", "bank_scale = \"memory_bank\"", "fit.bank_scale"),
            ("bank_scale = \"bank_scale\"", "bank_scale = \"nowhere\"", "fit.bank_scale"),
            ("bank_scale = \"bank_scale\"", "bank_scale = \"bank_scale\"\nscale_neighbours = 0", "scale_neighbours"),
            ("bank_scale = \"bank_scale\"", "bank_scale = \"bank_scale\"\ntail = -1.0", "fit.tail"),
            ("bank_scale = \"bank_scale\"", "bank_scale = \"bank_scale\"\ntail = nan", "fit.tail"),
        ];
        assert_each_refused(&fittable, &cases);
        // Without bank_scale the plain distance: nothing else is asked for.
        let plain = fittable.replace("bank_scale = \"bank_scale\"\n", "");
        assert_eq!(Manifest::parse(&plain).unwrap().fit.unwrap().bank_scale, None);
        // A measured tail is kept, with the number of scans it came from.
        let tailed =
            fittable.replace("bank = \"memory_bank\"\n", "bank = \"memory_bank\"\ntail = 1.75\ntail_scans = 230\n");
        let fit = Manifest::parse(&tailed).unwrap().fit.unwrap();
        assert_eq!((fit.tail, fit.tail_scans), (Some(1.75), Some(230)));
        assert_eq!(m.fit.as_ref().unwrap().tail, None);
        // The fit's record of its held-out scans, and a template's graphs elsewhere.
        let recorded = fittable.replace(
            "bank = \"memory_bank\"\n",
            "bank = \"memory_bank\"\nheld_out_scans = 26\nfalse_alarm_interval = [0.0, 0.077]\ngraphs = \"../patchcore\"\n",
        );
        let m2 = Manifest::parse(&recorded).unwrap();
        let fit = m2.fit.as_ref().unwrap();
        assert_eq!((fit.held_out_scans, fit.false_alarm_interval), (Some(26), Some([0.0, 0.077])));
        assert_eq!(
            fit.graph_dir(std::path::Path::new("fixtures/patchcore-se")),
            std::path::Path::new("fixtures/patchcore-se/../patchcore")
        );
        assert_eq!(m.fit.as_ref().unwrap().graph_dir(std::path::Path::new("d")), std::path::Path::new("d"));
        assert_eq!(Manifest::parse(&toml::to_string(&m2).unwrap()).unwrap(), m2);
        assert_each_refused(
            &recorded,
            &[
                ("graphs = \"../patchcore\"", "graphs = \" \"", "fit.graphs"),
                ("features = \"features.onnx\"", "features = \"../features.onnx\"", "fit.features"),
            ],
        );
    }

    #[test]
    fn a_structure_section_takes_defaults_and_refuses_nonsense() {
        let base = format!("{DEMO}\n[structure]\nmin_density = 0.12\nmax_spread = 0.04\nmargin = 0.6\nweight = 16.0\n");
        let m = Manifest::parse(&base).unwrap();
        let st = m.structure.as_ref().unwrap();
        assert_eq!((st.block, st.max_shift, st.min_scans, st.reach, st.file.as_deref()), (8, 48, 100, 12, None));
        assert_eq!(Manifest::parse(&toml::to_string(&m).unwrap()).unwrap(), m, "round trip through the fit");
        let fitted = base.replace("min_density", "file = \"structure.f32\"\nheight = 6144\nwidth = 2048\nmin_density");
        assert_eq!(Manifest::parse(&fitted).unwrap().structure.unwrap().width, 2048);
        let cases = [
            ("margin = 0.6", "margin = -1.0", "not negative"),
            ("weight = 16.0", "weight = nan", "finite"),
            ("min_density", "block = 1\nmin_density", "structure.block"),
            ("min_density", "min_scans = 1\nmin_density", "structure.min_scans"),
            ("min_density", "reach = 1000\nmin_density", "structure.reach"),
            ("min_density", "file = \"../s.f32\"\nheight = 64\nwidth = 64\nmin_density", "plain file name"),
            ("min_density", "file = \"s.f32\"\nmin_density", "too small"),
        ];
        assert_each_refused(&base, &cases);
    }
}
