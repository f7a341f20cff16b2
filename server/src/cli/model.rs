//! `niix model fit` (site calibration without Python) and `niix eval`
//! (detection figures on a generated, labelled set). Both run the tensor
//! core in this process; no server is needed.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array2, concatenate};
use niix_inference::decode::{Encoding, probe};
use niix_inference::fit::{
    FeatureGraph, ThresholdRule, Uncertainty, bank_scale, bootstrap, constant_bytes, coreset, cover_rows,
    fit_threshold, scans_to_show, threshold_for,
};
use niix_inference::manifest::Manifest;
use niix_inference::model::Model;
use niix_inference::onnx_graph::site;
use niix_inference::orientation::LengthAxis;
use niix_inference::pipeline::{
    Analysis, ModelInput, PlaneInput, Timings, analyze_oriented, decode_plane, model_input_oriented,
};
use niix_inference::regions::Region;
use niix_inference::runtime::Threads;
use niix_inference::site_fit::{
    CALIBRATION_SCANS, SiteGraphs, SiteOptions, SiteRecord, SiteTrainer, plan_budget, site_graphs, trained_model,
};
use niix_inference::site_head::{SiteHead, TrainReport};
use niix_inference::structure::StructureFit;
use niix_synth::truth::{GroundTruth, Orientation, TruthBox};

/// `niix model` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Fit a new model version to a site's normal scans.
    Fit(FitArgs),
}

/// Arguments of `niix model fit`.
#[derive(Debug, clap::Args)]
pub struct FitArgs {
    /// Directory of normal scans: `NAME.high.tif` + `NAME.low.tif` pairs or
    /// single-energy `NAME.tif` (a `NAME.json` ground truth listing
    /// anomalies excludes a scan; docs/models.md, "Ground truth").
    #[arg(long)]
    pub normal: PathBuf,
    /// The model to start from: a name in `--models` (its newest version),
    /// or a directory holding `model.toml` with a `[fit]` section.
    #[arg(long)]
    pub base: String,
    /// The model repository `--base` names a model of (default: `models`,
    /// or the bundled `fixtures/models` when `models` does not exist).
    #[arg(long, default_value_os_t = crate::config::default_models_dir())]
    pub models: PathBuf,
    /// The new version's directory, e.g. `models/cargo-patchcore/2`. Written
    /// whole under a temporary name, then renamed, so a running server never
    /// sees half a version.
    #[arg(long)]
    pub out: PathBuf,
    /// Share of the normal scans held out to set the threshold.
    #[arg(long, default_value_t = 0.3)]
    pub holdout: f64,
    /// More directories of normal scans from the same kind of scanner (a
    /// scan library) for the structure model, which needs many scans to
    /// learn where cargo never stands, and with `--bank-library` for the
    /// memory bank too; the threshold comes from held-out scans only.
    #[arg(long)]
    pub library: Vec<PathBuf>,
    /// Let the library scans feed the memory bank too (each gives as many
    /// sampled patches as a fitted scan), so that rare normal cargo the
    /// site's own scans do not show still has neighbours in the bank. The
    /// threshold still comes from held-out scans only.
    #[arg(long)]
    pub bank_library: bool,
    /// More directories of normal scans that are only held out: scored by
    /// the new version to set its threshold, never fitted. With at least
    /// `1 / false_alarm_rate` held-out scans in all (100 for 1 %), the
    /// threshold is their quantile and the fit records how far it lies
    /// above their median (`[fit] tail`), which later fits from this version
    /// with fewer held-out scans build on.
    #[arg(long, value_name = "DIR")]
    pub held_out: Vec<PathBuf>,
    /// Train the site head on these scans (docs/notes/site-training-plan.md):
    /// the base's heads are replaced by a small network over each cell's
    /// features and plane statistics, trained here on the fitted scans
    /// (negatives) and on windows of them with projected objects
    /// (positives), with hard negatives mined after a first round. Without
    /// it the base's heads are kept as they are.
    #[arg(long)]
    pub train_head: bool,
    /// With --train-head: epochs of the final round (the first runs half as many).
    #[arg(long, default_value_t = 20, requires = "train_head")]
    pub epochs: usize,
    /// With --train-head: the time the fit should take (e.g. `30m`). Past
    /// 80 % of it in projection the fit uses fewer windows and mines every
    /// second scan; training stops at it, keeping the weights it has.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration, requires = "train_head")]
    pub budget: std::time::Duration,
    /// With --train-head: windows with projected objects per fitted scan.
    #[arg(long, default_value_t = 12, requires = "train_head")]
    pub windows: usize,
    /// With --train-head: hard negatives mined per scan after the first round.
    #[arg(long, default_value_t = 24, requires = "train_head")]
    pub mine: usize,
    /// With --train-head: weight of the memory bank's distance term beside the site head.
    #[arg(long, default_value_t = 0.28, requires = "train_head")]
    pub distance_weight: f32,
    /// With --train-head: pixel spacing in mm of scans whose NAME.json
    /// gives none (`pixel_spacing_mm`); sizes the projected objects.
    #[arg(long, default_value_t = 2.0, requires = "train_head")]
    pub pixel_mm: f32,
    /// With --train-head: seed of the windows, objects, samples and the head's weights.
    #[arg(long, default_value_t = 0, requires = "train_head")]
    pub seed: u64,
}

/// Arguments of `niix eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Directory of labelled scans: `NAME.high.tif` and `NAME.low.tif` (or
    /// single-energy `NAME.tif`) and a
    /// `NAME.json` ground truth each (`niix synth` output, or a site's own
    /// labels; docs/models.md, "Ground truth").
    #[arg(long)]
    pub data: PathBuf,
    /// Model repository (default: `models`, or the bundled `fixtures/models`
    /// when `models` does not exist).
    #[arg(long, default_value_os_t = crate::config::default_models_dir())]
    pub models: PathBuf,
    /// Which model (default: the only one, or the first by name).
    #[arg(long)]
    pub model: Option<String>,
    /// Print the figures as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also write each scan's anomaly map, in raw score units, as
    /// `DIR/NAME.map.npy` (float32, one cell per stride pixels): for
    /// looking at why a normal scan scored high, or trying another decision
    /// on the maps without re-running the model.
    #[arg(long, value_name = "DIR")]
    pub maps: Option<PathBuf>,
    /// Also write a downsampled picture of each scan as `DIR/NAME.png`: the
    /// high-energy plane, ground-truth boxes in red, found regions in green.
    #[arg(long, value_name = "DIR")]
    pub previews: Option<PathBuf>,
    /// With --previews: how many times smaller than the scan.
    #[arg(long, default_value_t = 8, requires = "previews")]
    pub preview_factor: u32,
}

/// One scan on disk.
struct ScanFiles {
    name: String,
    /// The high-energy plane, or a single-energy scan's only plane.
    high: PathBuf,
    /// The low-energy plane; none for a single-energy scan.
    low: Option<PathBuf>,
    info: Option<GroundTruth>,
    /// `pixel_spacing_mm` of its `NAME.json`, if it gives one.
    pixel_mm: Option<f32>,
}

/// The scans of a directory, by name: `NAME.high.tif` / `NAME.low.tif`
/// pairs, and single-energy `NAME.tif`.
fn scan_files(dir: &Path) -> anyhow::Result<Vec<ScanFiles>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let Some(file) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let (name, low) = if let Some(name) = file.strip_suffix(".high.tif") {
            let low = dir.join(format!("{name}.low.tif"));
            anyhow::ensure!(low.exists(), "{} has no low-energy plane {}", path.display(), low.display());
            (name, Some(low))
        } else if let Some(name) = file.strip_suffix(".tif").filter(|n| !n.ends_with(".low")) {
            (name, None)
        } else {
            continue;
        };
        let json = dir.join(format!("{name}.json"));
        let info = json.exists().then(|| niix_synth::truth::read_truth(&json)).transpose()?;
        let pixel_mm = json.exists().then(|| pixel_spacing(&json)).flatten();
        out.push(ScanFiles { name: name.to_string(), high: path, low, info, pixel_mm });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The `pixel_spacing_mm` a `NAME.json` gives, if any (a positive number).
fn pixel_spacing(json: &Path) -> Option<f32> {
    let text = std::fs::read_to_string(json).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value.get("pixel_spacing_mm")?.as_f64().filter(|v| *v > 0.0).map(|v| v as f32)
}

/// The scans of a directory that are normal: those whose `NAME.json`, if
/// any, lists no anomaly; says how many it skipped.
fn normal_scans(dir: &Path) -> anyhow::Result<Vec<ScanFiles>> {
    let mut scans = scan_files(dir)?;
    let before = scans.len();
    scans.retain(|s| s.info.as_ref().is_none_or(GroundTruth::is_normal));
    if scans.len() < before {
        eprintln!("{}: skipping {} scans whose NAME.json lists anomalies", dir.display(), before - scans.len());
    }
    Ok(scans)
}

fn plane(path: &Path, kind: &str) -> anyhow::Result<PlaneInput> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let header = probe(&mut file, Encoding::Tiff).with_context(|| format!("reading {}", path.display()))?;
    file.seek(SeekFrom::Start(0))?;
    Ok(PlaneInput {
        kind: kind.into(),
        encoding: Encoding::Tiff,
        width: header.width,
        height: header.height,
        reader: Box::new(std::io::BufReader::new(file)),
    })
}

impl ScanFiles {
    fn planes(&self) -> anyhow::Result<Vec<PlaneInput>> {
        match &self.low {
            Some(low) => Ok(vec![plane(&self.high, "high_energy")?, plane(low, "low_energy")?]),
            None => Ok(vec![plane(&self.high, "single_energy")?]),
        }
    }

    /// The axis its `NAME.json` says the conveyance's length runs along, if it says.
    fn length_along(&self) -> Option<LengthAxis> {
        self.info.as_ref().and_then(|t| t.orientation).map(|o| match o {
            Orientation::LengthAlongX => LengthAxis::X,
            Orientation::LengthAlongY => LengthAxis::Y,
        })
    }

    /// The scan decoded and transformed into the model input `m` describes,
    /// in the model's frame (transposed when the scan runs along the other axis).
    fn input(&self, m: &Manifest) -> anyhow::Result<ModelInput> {
        model_input_oriented(m, &mut self.planes()?, self.length_along(), &mut Timings::default())
            .with_context(|| format!("decoding {}", self.name))
    }

    /// The scan analysed by `model` from `planes` (its own, opened), in the
    /// scan's own frame.
    fn analyze(&self, model: &Model, planes: Vec<PlaneInput>) -> anyhow::Result<Analysis> {
        analyze_oriented(model, planes, self.length_along()).with_context(|| format!("analysing {}", self.name))
    }
}

/// The directory `--base` means.
fn base_dir(base: &str, models: &Path) -> anyhow::Result<PathBuf> {
    let as_dir = PathBuf::from(base);
    if as_dir.join("model.toml").exists() {
        return Ok(as_dir);
    }
    let root = models.join(base);
    let newest = std::fs::read_dir(&root)
        .with_context(|| format!("--base {base}: neither a model directory nor a model in {}", models.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()))
        .max()
        .ok_or_else(|| anyhow::anyhow!("{} has no numbered versions", root.display()))?;
    Ok(root.join(newest.to_string()))
}

/// `niix model fit`.
pub fn fit(args: FitArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.holdout > 0.0 && args.holdout < 1.0, "--holdout must be between 0 and 1");
    anyhow::ensure!(!args.out.exists(), "{} exists already: versions are never overwritten", args.out.display());
    let base = base_dir(&args.base, &args.models)?;
    let graph = FeatureGraph::load(&base, Threads::default())?;
    let spec = graph.manifest().fit.clone().expect("FeatureGraph::load checks [fit]");
    // A template may use another template's graphs (`fit.graphs`); the version gets copies.
    let graphs = spec.graph_dir(&base);
    let scans = normal_scans(&args.normal)?;
    anyhow::ensure!(
        scans.len() >= 4,
        "{} holds {} normal scans; fit needs at least 4",
        args.normal.display(),
        scans.len()
    );
    // Every k-th scan is held out (deterministic, spread over the set).
    let every = (1.0 / args.holdout).round().max(2.0) as usize;
    let (held, fitted): (Vec<_>, Vec<_>) = scans.into_iter().enumerate().partition(|(i, _)| i % every == every - 1);
    let mut held: Vec<ScanFiles> = held.into_iter().map(|(_, s)| s).collect();
    let from_normal = held.len();
    // A scan counted twice, or both fitted and held out, would pull the
    // threshold towards what the bank has already seen.
    let mut seen: std::collections::HashSet<PathBuf> =
        held.iter().chain(fitted.iter().map(|(_, s)| s)).filter_map(|s| s.high.canonicalize().ok()).collect();
    for dir in &args.held_out {
        for scan in normal_scans(dir)? {
            let path = scan.high.canonicalize().with_context(|| format!("reading {}", scan.high.display()))?;
            anyhow::ensure!(
                seen.insert(path),
                "--held-out {}: {} is already among the scans of this fit (from --normal or another --held-out); \
                 held-out scans must be scans the fit has not seen",
                dir.display(),
                scan.name
            );
            held.push(scan);
        }
    }
    eprintln!(
        "fitting on {} normal scans, {} held out for the threshold ({from_normal} of {} and {} from --held-out)",
        fitted.len(),
        held.len(),
        args.normal.display(),
        held.len() - from_normal
    );

    let mut library = Vec::new();
    for dir in &args.library {
        let normal = normal_scans(dir)?;
        let uses = if args.bank_library { "the structure model and the memory bank" } else { "the structure model" };
        eprintln!("library {}: {} normal scans for {uses}", dir.display(), normal.len());
        library.extend(normal);
    }
    // The structure model reads the fitted scans and the library, if they are enough.
    let structure_scans = fitted.len() + library.len();
    let structure_spec = graph.manifest().structure.as_ref().filter(|st| {
        let enough = structure_scans >= st.min_scans;
        if !enough {
            eprintln!(
                "structure model skipped: {structure_scans} normal scans, it needs at least {} (add a scan library with --library)",
                st.min_scans
            );
        }
        enough
    });
    let mut structure_fit: Option<StructureFit> = None;
    let mut add_to_structure = |input: &ModelInput, name: &str| -> anyhow::Result<()> {
        let Some(st) = structure_spec else { return Ok(()) };
        let plane = input.data.index_axis(ndarray::Axis(0), 0);
        match &mut structure_fit {
            None => structure_fit = Some(StructureFit::new(plane, st.block, st.max_shift)),
            Some(fit) => {
                fit.add(plane).with_context(|| format!("structure model: {name}"))?;
            }
        }
        Ok(())
    };

    // With --train-head: the site head composed onto the base, and the
    // training graph every scan runs through instead of the features graph.
    let mut site = if args.train_head { Some(SiteFit::start(&graphs, graph.manifest(), &args)?) } else { None };
    let started = Instant::now();
    if let Some(site) = site.as_mut() {
        let mut bands = Vec::new();
        let mut planes = Vec::new();
        for (_, s) in fitted.iter().take(CALIBRATION_SCANS) {
            let input = s.input(graph.manifest())?;
            bands.push(SiteTrainer::calibration_band(&input));
            planes = input.planes.clone();
        }
        let cal = site.trainer.calibrate(&bands, &planes)?;
        eprintln!(
            "site head: material ratio measured in {} of {} attenuation bins, noise I0 {:?} (from {} scans)",
            cal.ratio.iter().filter(|r| r.is_some()).count(),
            cal.ratio.len(),
            cal.photons.iter().map(|p| p.round()).collect::<Vec<_>>(),
            bands.len()
        );
    }

    // Every scan is decoded once, for the structure model and, with the seed
    // of its patch sample, for the memory bank: each fitted scan, and with
    // --bank-library each library scan too. With --train-head the same pass
    // gives the site head's negatives, and each fitted scan its TIP windows.
    let mut pool: Vec<Array2<f32>> = Vec::new();
    let fitted_scans = fitted.iter().map(|(i, s)| (s, Some(*i as u64 + 1), true));
    let library_scans =
        library.iter().enumerate().map(|(j, s)| (s, args.bank_library.then_some(10_000 + j as u64), false));
    let bar = progress_bar(fitted.len() as u64, "features");
    let mut windows = args.windows;
    let mut mine_every = 1;
    let mut done = 0;
    for (s, bank_seed, is_fitted) in fitted_scans.chain(library_scans) {
        if bank_seed.is_none() && structure_spec.is_none() {
            continue;
        }
        let input = s.input(graph.manifest())?;
        if let Some(seed) = bank_seed {
            let features = match site.as_mut() {
                Some(site) => {
                    let features =
                        site.trainer.add_clean(&input, seed).with_context(|| format!("clean pass of {}", s.name))?;
                    if is_fitted {
                        let mm = s.pixel_mm.unwrap_or(args.pixel_mm);
                        site.trainer
                            .add_windows(&input, windows, mm, seed)
                            .with_context(|| format!("TIP windows of {}", s.name))?;
                    }
                    features
                }
                None => graph.scan_features(&input).with_context(|| format!("features of {}", s.name))?,
            };
            pool.push(cover_rows(features.view(), spec.samples_per_scan, seed));
            bar.suspend(|| eprintln!("  {} ({} cells)", s.name, features.nrows()));
        }
        add_to_structure(&input, &s.name)?;
        if is_fitted {
            done += 1;
            bar.inc(1);
            if done == 3 && args.train_head {
                let plan = plan_budget(started.elapsed(), done, fitted.len(), args.budget, windows);
                if plan.lowered {
                    bar.suspend(|| {
                        eprintln!(
                            "site head: the fit projects to {:.0} s, past 80 % of the budget {:.0} s: {} windows per scan from now on, mining every second scan",
                            plan.projected.as_secs_f64(),
                            args.budget.as_secs_f64(),
                            plan.windows
                        )
                    });
                }
                (windows, mine_every) = (plan.windows, plan.mine_every);
            }
        }
    }
    bar.finish_and_clear();
    let views: Vec<_> = pool.iter().map(|p| p.view()).collect();
    let pool = concatenate(ndarray::Axis(0), &views)?;
    let bank = coreset(pool.view(), spec.coreset, 7);
    eprintln!(
        "memory bank: {} of {} patch features ({:.1} s)",
        bank.nrows(),
        pool.nrows(),
        started.elapsed().as_secs_f64()
    );
    let structure = structure_spec.zip(structure_fit).map(|(st, fit)| {
        let model = fit.finish(st, graph.manifest().input.length_along);
        let fixed = model.limit.iter().filter(|v| v.is_finite()).count() as f64 / model.limit.len().max(1) as f64;
        eprintln!("structure model: {structure_scans} scans, {:.1} % of the blocks are fixed structure", fixed * 100.0);
        model
    });

    // The site head: a first round, hard negatives mined, a second round.
    let trained = match site.as_mut() {
        Some(site) => Some(train_site_head(site, &fitted, graph.manifest(), mine_every, started, &args)?),
        None => None,
    };

    // Write the version under a temporary name.
    let parent = args.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let leaf = args.out.file_name().and_then(|n| n.to_str()).unwrap_or("new");
    let tmp = parent.join(format!(".{leaf}.partial"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let mut manifest: Manifest = graph.manifest().clone();
    if let Some(fit) = manifest.fit.as_mut() {
        fit.graphs = None;
    }
    let name = args.out.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()).unwrap_or(&manifest.name);
    manifest.name = name.to_string();
    write_constant(&mut manifest, &tmp, &spec.bank, &bank)?;
    if let Some(name) = &spec.bank_scale {
        let (scale, spacing) = bank_scale(bank.view(), spec.scale_neighbours);
        write_constant(&mut manifest, &tmp, name, &scale)?;
        let (lo, hi) = scale.iter().fold((f32::INFINITY, 0f32), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        eprintln!(
            "bank scale: median spacing {spacing:.2} (distance from a row to its {}-th nearest other), scale {lo:.2}..{hi:.2}",
            spec.scale_neighbours
        );
    }
    match (&structure, manifest.structure.as_mut()) {
        (Some(model), Some(st)) => {
            let file = "structure.f32".to_string();
            std::fs::write(tmp.join(&file), model.to_bytes())?;
            (st.height, st.width) = model.size();
            st.file = Some(file);
        }
        // Too few scans this time: a structure model the base was fitted
        // with belongs to the base's scans, and its file is not copied.
        (None, Some(st)) => st.file = None,
        _ => {}
    }
    match site.as_ref().zip(trained.as_ref()) {
        Some((site, (head, epochs))) => {
            let record = SiteRecord { scans: fitted.len(), windows, epochs: *epochs, seed: args.seed };
            let model = trained_model(&site.graphs.composed, head, args.distance_weight, &record)
                .context("writing the trained site head into the graph")?;
            std::fs::write(tmp.join("model.onnx"), model.to_bytes())?;
            // The training graph gives `features` as the base's did, and `head_input`.
            std::fs::write(tmp.join(&spec.features), site.graphs.training.to_bytes())?;
            // A tail measured with other heads on other data says nothing of this one.
            if let Some(fit) = manifest.fit.as_mut() {
                (fit.tail, fit.tail_scans) = (None, None);
            }
            manifest.description = format!(
                "Site-trained detector: ImageNet EfficientNet-Lite0 features of both energy planes seen at 1/4 \
                 resolution (one cell per 32 px), scored by a site head (a 142-64-1 network over each cell's \
                 features, their 7x7 mean and 10 pooled plane statistics) trained by `niix model fit --train-head` \
                 on {} normal scans with {windows} windows of projected objects each ({} epochs, seed {}), plus {} x \
                 the nearest-neighbour distance to a memory bank of normal cargo patches, measured against the \
                 bank's own spacing around that patch",
                fitted.len(),
                epochs,
                args.seed,
                args.distance_weight
            );
        }
        None => {
            for file in ["model.onnx", spec.features.as_str()] {
                std::fs::copy(graphs.join(file), tmp.join(file))
                    .with_context(|| format!("copying {}", graphs.join(file).display()))?;
            }
        }
    }
    std::fs::write(tmp.join("model.toml"), toml::to_string(&manifest)?)?;

    // Threshold from the held-out scans, through the model as it will serve.
    let version = args.out.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse().ok()).unwrap_or(0);
    let model = Model::load(&tmp, &manifest.name, version, Threads::default())?;
    let mut scores = Vec::new();
    let mut cells = Vec::new();
    for s in &held {
        let a = s.analyze(&model, s.planes()?)?;
        // Back from the placeholder normalisation to raw map values.
        cells.extend(a.map.iter().map(|v| manifest.decision.raw(*v)));
        scores.push(a.raw_score);
        eprintln!("  held out {}: highest score {:.3}", s.name, a.raw_score);
    }
    // A site-trained head sets its threshold from its own held-out scans only.
    let tail = if trained.is_some() { None } else { spec.tail };
    let (threshold, rule) = fit_threshold(&scores, spec.false_alarm_rate, tail);
    let how = match rule {
        ThresholdRule::Quantile { tail } => {
            let fit = manifest.fit.as_mut().expect("FeatureGraph::load checks [fit]");
            (fit.tail, fit.tail_scans) = (Some(tail), Some(scores.len()));
            format!(
                "the {}% quantile of {} held-out scans, {tail:.3} above their median",
                100.0 - spec.false_alarm_rate * 100.0,
                scores.len()
            )
        }
        ThresholdRule::MedianPlusTail { raised } => {
            let (tail, tail_scans) = (spec.tail.unwrap_or_default(), spec.tail_scans.unwrap_or_default());
            let median_plus_tail = format!(
                "the median of {} held-out scans plus the tail {tail:.3} measured on {tail_scans} scans",
                scores.len()
            );
            if raised {
                format!("1% above the highest held-out scan, which lies above {median_plus_tail}")
            } else {
                median_plus_tail
            }
        }
        ThresholdRule::PastTheLargest { tail_estimate } => format!(
            "{} of {} held-out scans (fewer than {:.0} held out and no measured tail)",
            if tail_estimate {
                "a normal distribution's tail fitted to the upper half"
            } else {
                "1% above the highest"
            },
            scores.len(),
            1.0 / spec.false_alarm_rate
        ),
    };
    eprintln!("threshold {threshold:.3}: {how}");
    let uncertainty = bootstrap(&scores, spec.false_alarm_rate, tail, BOOTSTRAP_RESAMPLES, 0);
    eprintln!("{}", uncertainty_text(&uncertainty, spec.false_alarm_rate));
    if let Some(fit) = manifest.fit.as_mut() {
        fit.held_out_scans = Some(uncertainty.scans);
        let (lo, hi) = uncertainty.false_alarm_interval;
        fit.false_alarm_interval = (lo.is_finite() && hi.is_finite()).then_some([lo, hi]);
    }
    cells.sort_by(f32::total_cmp);
    let typical = cells.get(cells.len() / 2).copied().unwrap_or(0.0).min(threshold * 0.5);
    // Normalised score 0.5 is the threshold; 0 the typical normal cell.
    manifest.decision.score_min = typical;
    manifest.decision.score_max = typical + 2.0 * (threshold - typical);
    manifest.decision.threshold = 0.5;
    manifest.description = format!(
        "{}. Fitted by `niix model fit` on {} normal scans of {}; threshold {:.3} for a {}% false-alarm rate: {how}; \
         false-alarm rate {}.",
        manifest.description.split(". Fitted by").next().unwrap_or_default().trim_end_matches('.'),
        fitted.len(),
        args.normal.display(),
        threshold,
        spec.false_alarm_rate * 100.0,
        interval_text(&uncertainty)
    );
    if structure.is_some() {
        manifest.description = format!(
            "{} Structure model from {structure_scans} normal scans ({} and {} library scans).",
            manifest.description,
            fitted.len(),
            library.len()
        );
    }
    if args.bank_library && !library.is_empty() {
        manifest.description = format!(
            "{} Memory bank from {} fitted and {} library scans.",
            manifest.description,
            fitted.len(),
            library.len()
        );
    }
    drop(model);
    std::fs::write(tmp.join("model.toml"), toml::to_string(&manifest)?)?;
    std::fs::rename(&tmp, &args.out).with_context(|| format!("moving the new version to {}", args.out.display()))?;
    println!(
        "{}: memory bank {}x{}, threshold {threshold:.3} (typical normal {typical:.3})",
        args.out.display(),
        bank.nrows(),
        bank.ncols()
    );
    Ok(())
}

/// Bootstrap resamples of the held-out scores behind the threshold's uncertainty.
const BOOTSTRAP_RESAMPLES: usize = 2000;

/// A share as a percentage for people: "0", "1", "7.7".
fn percent(share: f64) -> String {
    format!("{:.1}", share * 100.0).trim_end_matches(".0").to_string()
}

/// The false-alarm interval and bound of a fitted threshold: "90 % interval
/// 0-7.7 % from 26 held-out scans, at most 10.9 % with 95 % confidence (0 of
/// 26 alarm)".
fn interval_text(u: &Uncertainty) -> String {
    let (lo, hi) = u.false_alarm_interval;
    let interval = if lo.is_finite() && hi.is_finite() {
        format!("90 % interval {}-{} %", percent(lo), percent(hi))
    } else {
        "no interval".into()
    };
    format!(
        "{interval} from {n} held-out scans, at most {} % with 95 % confidence ({} of {n} alarm)",
        percent(u.false_alarm_bound),
        u.alarms,
        n = u.scans
    )
}

/// What `niix model fit` says of its threshold's uncertainty, e.g.
/// "threshold 9.84 (90 % interval 9.51-10.70); false-alarm rate aimed 1 %,
/// 90 % interval 0-7.7 % from 26 held-out scans, ...; to show <= 1 % hold
/// out >= 299 scans none of which alarm".
fn uncertainty_text(u: &Uncertainty, rate: f64) -> String {
    let (t_lo, t_hi) = u.threshold_interval;
    let mut text = format!(
        "threshold {:.2} (90 % interval {t_lo:.2}-{t_hi:.2}); false-alarm rate aimed {} %, {}",
        u.threshold,
        percent(rate),
        interval_text(u)
    );
    if u.false_alarm_bound > rate {
        text +=
            &format!("; to show <= {} % hold out >= {} scans none of which alarm", percent(rate), scans_to_show(rate));
    }
    text
}

/// The site head being trained in a fit: the composed graphs and the trainer.
struct SiteFit {
    graphs: SiteGraphs,
    trainer: SiteTrainer,
}

impl SiteFit {
    /// Composes the site head onto `graph_dir/model.onnx` and loads its training graph.
    fn start(graph_dir: &Path, manifest: &Manifest, args: &FitArgs) -> anyhow::Result<SiteFit> {
        anyhow::ensure!(args.epochs > 0, "--epochs must be at least 1");
        anyhow::ensure!(args.pixel_mm > 0.0, "--pixel-mm must be positive");
        let path = graph_dir.join("model.onnx");
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let graphs = site_graphs(&bytes).with_context(|| format!("adding the site head to {}", path.display()))?;
        let graph = FeatureGraph::from_bytes(
            manifest.clone(),
            &graphs.training.to_bytes(),
            site::HEAD_INPUT,
            &path,
            Threads::default(),
        )?;
        let options = SiteOptions {
            windows: args.windows,
            epochs: args.epochs,
            mine: args.mine,
            distance_weight: args.distance_weight,
            seed: args.seed,
        };
        let trainer = SiteTrainer::new(graph, options).context("--train-head")?;
        Ok(SiteFit { graphs, trainer })
    }
}

/// A bar on stderr (drawn on a terminal only) for one phase of the fit.
fn progress_bar(len: u64, phase: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template("{msg} {pos}/{len} [{eta}]").expect("static template"));
    bar.set_message(phase.to_string());
    bar
}

/// Round 1, mining every `mine_every`-th fitted scan, round 2 from the same
/// seed on everything; training stops at `started + --budget`. The head and
/// the epochs round 2 ran.
fn train_site_head(
    site: &mut SiteFit,
    fitted: &[(usize, ScanFiles)],
    manifest: &Manifest,
    mine_every: usize,
    started: Instant,
    args: &FitArgs,
) -> anyhow::Result<(SiteHead, usize)> {
    let deadline = started + args.budget;
    let c = site.trainer.counts();
    eprintln!(
        "site head: {} clean negatives; {} positive and {} negative cells from {} TIP windows",
        c.negatives, c.positives, c.window_negatives, c.windows
    );
    let round = |site: &SiteFit, number: usize, epochs: usize| -> anyhow::Result<(SiteHead, TrainReport)> {
        let bar = progress_bar(epochs as u64, &format!("train {number}/2 epoch"));
        let mut progress = |epoch: usize, loss: f64| {
            bar.set_position(epoch as u64);
            bar.set_message(format!("train {number}/2 loss {loss:.3} epoch"));
        };
        let result = site.trainer.train(epochs, Some(deadline), &mut progress).context("training the site head")?;
        bar.finish_and_clear();
        eprintln!("site head: round {number}, {} of {epochs} epochs, loss {:.4}", result.1.epochs, result.1.loss);
        Ok(result)
    };
    let (first, _) = round(site, 1, (args.epochs / 2).max(1))?;
    let bar = progress_bar(fitted.len() as u64, "mining");
    let mut hard = 0;
    let mut mined = 0;
    for (k, (_, s)) in fitted.iter().enumerate() {
        bar.inc(1);
        if k % mine_every != 0 || Instant::now() >= deadline {
            continue;
        }
        let input = s.input(manifest)?;
        hard += site.trainer.mine(&first, &input, args.mine).with_context(|| format!("mining {}", s.name))?;
        mined += 1;
    }
    bar.finish_and_clear();
    eprintln!("site head: {hard} hard negatives mined from {mined} of {} scans", fitted.len());
    let (head, report) = round(site, 2, args.epochs)?;
    let spent = started.elapsed();
    eprintln!(
        "site head trained {} the budget of {}: {:.1} s since the fit began{}",
        if report.stopped_early { "up to" } else { "within" },
        humantime::format_duration(args.budget),
        spent.as_secs_f64(),
        if report.stopped_early { ", stopped at the deadline with the last weights" } else { "" }
    );
    Ok((head, report.epochs))
}

/// Writes constant `name`'s values into `dir` and sets its shape in `manifest` to theirs.
fn write_constant<D: ndarray::Dimension>(
    manifest: &mut Manifest,
    dir: &Path,
    name: &str,
    values: &ndarray::Array<f32, D>,
) -> anyhow::Result<()> {
    let constant = manifest.constants.iter_mut().find(|c| c.name == name).expect("checked by the manifest");
    constant.shape = values.shape().to_vec();
    std::fs::write(dir.join(&constant.file), constant_bytes(values))?;
    Ok(())
}

/// Image-level AUROC of `positive` against `negative` scores (ties count half).
pub fn auroc(negative: &[f32], positive: &[f32]) -> f64 {
    let scores: Vec<f32> = negative.iter().chain(positive).copied().collect();
    let labels: Vec<f32> = negative.iter().map(|_| 0.0).chain(positive.iter().map(|_| 1.0)).collect();
    niix_inference::site_head::auroc(&scores, &labels)
}

/// True when a region's box overlaps a ground-truth box.
fn overlaps(r: &Region, a: &TruthBox) -> bool {
    r.x < a.x + a.width && a.x < r.x + r.width && r.y < a.y + a.height && a.y < r.y + r.height
}

/// The figures `niix eval` reports.
#[derive(Debug, serde::Serialize)]
pub struct EvalReport {
    /// Model name, version and digest.
    pub model: String,
    /// Scans evaluated.
    pub scans: usize,
    /// Of which anomalous.
    pub anomalous: usize,
    /// Image-level AUROC of the highest map value.
    pub auroc: f64,
    /// Share of anomalous scans above the threshold that lets 1% of normal scans through.
    pub detection_at_1pct_fa: f64,
    /// Same at 5%.
    pub detection_at_5pct_fa: f64,
    /// At the model's own threshold: share of normal scans that alarm.
    pub false_alarm_rate: f64,
    /// At the model's own threshold: share of anomalous scans that alarm.
    pub detection_rate: f64,
    /// Share of ground-truth anomalies overlapped by a region of the model's findings.
    pub localization: f64,
    /// Mean analysis time per scan (decode to regions), seconds.
    pub seconds_per_scan: f64,
    /// Points of the image-level ROC curve: at a few false-alarm rates of
    /// this set's normal scans, the score threshold and what it detects.
    pub operating_points: Vec<OperatingPoint>,
    /// Per anomaly kind, whatever kinds the ground truth names.
    pub by_kind: std::collections::BTreeMap<String, KindReport>,
    /// Every scan's result, in name order: what a site needs to see which
    /// normal scans score high and which anomalies were missed.
    pub per_scan: Vec<ScanResult>,
}

/// One point of the image-level ROC curve in `niix eval`.
#[derive(Debug, serde::Serialize)]
pub struct OperatingPoint {
    /// The false-alarm rate asked for.
    pub target_false_alarm_rate: f64,
    /// The raw score a scan must exceed to alarm: the highest threshold
    /// that lets at most that share of this set's normal scans through.
    pub threshold: f32,
    /// Share of normal scans above it (at most the target; with few normal
    /// scans, often less).
    pub false_alarm_rate: f64,
    /// Share of anomalous scans above it.
    pub detection_rate: f64,
}

/// The figures of one anomaly kind in `niix eval`.
#[derive(Debug, serde::Serialize)]
pub struct KindReport {
    /// Ground-truth boxes of this kind.
    pub anomalies: usize,
    /// Of which overlapped by a region of the findings.
    pub hit: usize,
    /// `hit / anomalies`.
    pub hit_rate: f64,
    /// Scans holding at least one box of this kind.
    pub scans: usize,
    /// Image-level AUROC of those scans against the normal scans; null
    /// when the set has no normal scans.
    pub auroc: Option<f64>,
    /// Share of those scans above the threshold that lets 1% of normal
    /// scans through; null when the set has no normal scans.
    pub detection_at_1pct_fa: Option<f64>,
    /// At the model's own threshold: share of those scans that alarm.
    pub detection_rate: f64,
}

/// The false-alarm rates `niix eval` reports ROC operating points at.
const OPERATING_RATES: [f64; 6] = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2];

/// One scan's result in `niix eval`.
#[derive(Debug, serde::Serialize)]
pub struct ScanResult {
    /// The scan's file name stem.
    pub name: String,
    /// Its image score: the highest raw map value.
    pub score: f32,
    /// Whether it alarms at the model's own threshold.
    pub alarm: bool,
    /// Image pixel (x, y) of the highest map cell's corner.
    pub peak: (usize, usize),
    /// Regions of its findings.
    pub regions: usize,
    /// Its ground-truth anomalies (none for a normal scan).
    pub anomalies: Vec<AnomalyResult>,
    /// Analysis time, decode to regions, seconds.
    pub seconds: f64,
}

/// One ground-truth anomaly's result in `niix eval`.
#[derive(Debug, serde::Serialize)]
pub struct AnomalyResult {
    /// Its kind, as in `by_kind`.
    pub kind: String,
    /// The highest raw map value inside its box.
    pub in_box: f32,
    /// Whether a region of the findings overlaps it.
    pub hit: bool,
}

/// A 2-D float32 array in NumPy's `.npy` format (version 1.0, C order).
fn npy(a: &Array2<f32>) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}", a.nrows(), a.ncols());
    // Magic (6) + version (2) + length (2) + header + newline: a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * a.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in a.iter() {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// `niix eval`.
pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let repo = niix_inference::repository::Repository::new(&args.models, Threads::default());
    repo.reload();
    for (path, why) in repo.refused() {
        eprintln!("refused {}: {why}", path.display());
    }
    let model = match &args.model {
        Some(n) => {
            repo.get(n).ok_or_else(|| anyhow::anyhow!("no servable model {n:?} in {}", args.models.display()))?
        }
        None => repo
            .serving()
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no servable model in {}", args.models.display()))?,
    };
    let scans = scan_files(&args.data)?;
    anyhow::ensure!(scans.iter().all(|s| s.info.is_some()), "every scan in --data needs its NAME.json ground truth");
    anyhow::ensure!(!scans.is_empty(), "{} holds no scans", args.data.display());
    // From the map's normalised values back to raw ones.
    let decision = &model.manifest.decision;
    for dir in [&args.maps, &args.previews].into_iter().flatten() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut per_scan = Vec::with_capacity(scans.len());
    for s in &scans {
        let truth = &s.info.as_ref().expect("checked above").anomalies;
        let planes = s.planes()?;
        let (width, height) = (planes[0].width, planes[0].height);
        if let Some((i, t)) = truth.iter().enumerate().find(|(_, t)| {
            u64::from(t.x) + u64::from(t.width) > u64::from(width)
                || u64::from(t.y) + u64::from(t.height) > u64::from(height)
        }) {
            anyhow::bail!(
                "{}.json: anomaly {i} ({}) at x {} y {} of {}x{} px reaches outside the {width}x{height} image",
                s.name,
                t.kind,
                t.x,
                t.y,
                t.width,
                t.height
            );
        }
        let t0 = Instant::now();
        let a = s.analyze(&model, planes)?;
        let seconds = t0.elapsed().as_secs_f64();
        let st = a.stride as u32;
        let anomalies = truth
            .iter()
            .map(|t| {
                // The highest raw map value inside the ground-truth box.
                let (nrows, ncols) = a.map.dim();
                let r1 = ((t.y + t.height).div_ceil(st) as usize).min(nrows);
                let c1 = ((t.x + t.width).div_ceil(st) as usize).min(ncols);
                let (r0, c0) = (((t.y / st) as usize).min(r1), ((t.x / st) as usize).min(c1));
                let m = a.map.slice(ndarray::s![r0..r1, c0..c1]).iter().copied().fold(0.0f32, f32::max);
                AnomalyResult {
                    kind: t.kind.clone(),
                    in_box: decision.raw(m),
                    hit: a.regions.iter().any(|r| overlaps(r, t)),
                }
            })
            .collect();
        if let Some(dir) = &args.maps {
            let raw = a.map.mapv(|v| decision.raw(v));
            let path = dir.join(format!("{}.map.npy", s.name));
            std::fs::write(&path, npy(&raw)).with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(dir) = &args.previews {
            let path = dir.join(format!("{}.png", s.name));
            std::fs::write(&path, preview(s, truth, &a.regions, args.preview_factor)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let peak = a.map.indexed_iter().fold(((0, 0), f32::MIN), |b, (i, v)| if *v > b.1 { (i, *v) } else { b });
        let result = ScanResult {
            name: s.name.clone(),
            score: a.raw_score,
            alarm: a.alarm,
            peak: (peak.0.1 * a.stride, peak.0.0 * a.stride),
            regions: a.regions.len(),
            anomalies,
            seconds,
        };
        if !args.json {
            let inside: Vec<String> = result.anomalies.iter().map(|r| format!("{:.1}", r.in_box)).collect();
            let hits: Vec<bool> = result.anomalies.iter().map(|r| r.hit).collect();
            let kinds: Vec<&str> = result.anomalies.iter().map(|r| r.kind.as_str()).collect();
            eprintln!(
                "{} {:>8.3} at ({},{}) {} regions={} truth={kinds:?} in-box={inside:?} hit={hits:?} {:.2}s",
                result.name,
                result.score,
                result.peak.0,
                result.peak.1,
                if result.alarm { "ALARM" } else { "clear" },
                result.regions,
                result.seconds
            );
        }
        per_scan.push(result);
    }

    // The figures, from the per-scan records.
    let (anomalous_scans, normal_scans): (Vec<&ScanResult>, Vec<&ScanResult>) =
        per_scan.iter().partition(|r| !r.anomalies.is_empty());
    let scores = |set: &[&ScanResult]| set.iter().map(|r| r.score).collect::<Vec<f32>>();
    let (normal, anomalous) = (scores(&normal_scans), scores(&anomalous_scans));
    let alarm_rate = |set: &[&ScanResult]| set.iter().filter(|r| r.alarm).count() as f64 / set.len().max(1) as f64;
    let above = |scores: &[f32], t: f32| scores.iter().filter(|s| **s > t).count() as f64 / scores.len().max(1) as f64;
    let at = |scores: &[f32], rate: f64| above(scores, threshold_for(&normal, rate, 0.0));
    let operating_points = OPERATING_RATES
        .iter()
        .map(|&rate| {
            let threshold = threshold_for(&normal, rate, 0.0);
            OperatingPoint {
                target_false_alarm_rate: rate,
                threshold,
                false_alarm_rate: above(&normal, threshold),
                detection_rate: above(&anomalous, threshold),
            }
        })
        .collect();
    let mut kinds: Vec<&str> = per_scan.iter().flat_map(|r| &r.anomalies).map(|b| b.kind.as_str()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    let by_kind: std::collections::BTreeMap<String, KindReport> = kinds
        .into_iter()
        .map(|kind| {
            let boxes: Vec<&AnomalyResult> =
                per_scan.iter().flat_map(|r| &r.anomalies).filter(|b| b.kind == kind).collect();
            let holding: Vec<&ScanResult> =
                anomalous_scans.iter().copied().filter(|r| r.anomalies.iter().any(|b| b.kind == kind)).collect();
            let hit = boxes.iter().filter(|b| b.hit).count();
            let with_normal = |v: f64| (!normal.is_empty()).then_some(v);
            let report = KindReport {
                anomalies: boxes.len(),
                hit,
                hit_rate: hit as f64 / boxes.len() as f64,
                scans: holding.len(),
                auroc: with_normal(auroc(&normal, &scores(&holding))),
                detection_at_1pct_fa: with_normal(at(&scores(&holding), 0.01)),
                detection_rate: alarm_rate(&holding),
            };
            (kind.to_string(), report)
        })
        .collect();
    let (hit, total) = by_kind.values().fold((0, 0), |(h, t), k| (h + k.hit, t + k.anomalies));
    let report = EvalReport {
        model: model.label(),
        scans: scans.len(),
        anomalous: anomalous.len(),
        auroc: auroc(&normal, &anomalous),
        detection_at_1pct_fa: at(&anomalous, 0.01),
        detection_at_5pct_fa: at(&anomalous, 0.05),
        false_alarm_rate: alarm_rate(&normal_scans),
        detection_rate: alarm_rate(&anomalous_scans),
        localization: hit as f64 / total.max(1) as f64,
        seconds_per_scan: per_scan.iter().map(|r| r.seconds).sum::<f64>() / per_scan.len() as f64,
        operating_points,
        by_kind,
        per_scan,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// `niix eval --previews`: the scan's high-energy plane with its ground
/// truth (red) and the regions found (green).
fn preview(s: &ScanFiles, truth: &[TruthBox], regions: &[Region], factor: u32) -> anyhow::Result<Vec<u8>> {
    use niix_synth::{PreviewBox, TRUTH_RGB};
    let high = decode_plane(&mut plane(&s.high, "high_energy")?)?;
    let (height, width) = high.dim();
    let high = high.into_raw_vec_and_offset().0;
    // The brightest value stands in for the unattenuated beam.
    let i0 = f64::from(high.iter().copied().max().unwrap_or(1).max(1));
    let found =
        regions.iter().map(|r| PreviewBox { x: r.x, y: r.y, width: r.width, height: r.height, rgb: [40, 200, 60] });
    let truth = truth.iter().map(|t| PreviewBox { x: t.x, y: t.y, width: t.width, height: t.height, rgb: TRUTH_RGB });
    let boxes: Vec<PreviewBox> = found.chain(truth).collect();
    Ok(niix_synth::render_preview(&high, width as u32, height as u32, i0, factor, &boxes))
}

/// `niix eval`'s figures as text.
fn print_report(report: &EvalReport) {
    let or_none = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
    println!("model: {}", report.model);
    println!("scans: {} ({} anomalous)", report.scans, report.anomalous);
    println!("auroc: {:.3}", report.auroc);
    println!("detection_at_1pct_fa: {:.3}", report.detection_at_1pct_fa);
    println!("detection_at_5pct_fa: {:.3}", report.detection_at_5pct_fa);
    println!("operating_point: {:.3} detection at {:.3} false alarms", report.detection_rate, report.false_alarm_rate);
    println!("roc (threshold on this set's normal scans):");
    println!("  {:>9} {:>10} {:>11} {:>9}", "target_fa", "threshold", "false_alarm", "detection");
    for p in &report.operating_points {
        println!(
            "  {:>9.3} {:>10.3} {:>11.3} {:>9.3}",
            p.target_false_alarm_rate, p.threshold, p.false_alarm_rate, p.detection_rate
        );
    }
    println!("localization: {:.3}", report.localization);
    println!("by kind:");
    for (kind, k) in &report.by_kind {
        println!(
            "  {kind}: {}/{} hit ({:.3}), {} scans, auroc {}, detection_at_1pct_fa {}, detection {:.3}",
            k.hit,
            k.anomalies,
            k.hit_rate,
            k.scans,
            or_none(k.auroc),
            or_none(k.detection_at_1pct_fa),
            k.detection_rate
        );
    }
    println!("seconds_per_scan: {:.2}", report.seconds_per_scan);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_counts_pairs_and_ties() {
        assert_eq!(auroc(&[1.0, 2.0], &[3.0, 4.0]), 1.0);
        assert_eq!(auroc(&[3.0, 4.0], &[1.0, 2.0]), 0.0);
        assert_eq!(auroc(&[1.0, 3.0], &[2.0, 3.0]), 0.625);
    }
}
