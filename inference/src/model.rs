//! One model version: its ONNX session, checked against its manifest.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ndarray::{Array4, ArrayD, IxDyn};
use ort::session::{Session, SessionInputValue};
use ort::value::{TensorElementType, TensorRef, ValueType};
use sha2::{Digest, Sha256};

use crate::manifest::{Manifest, ManifestError};
use crate::runtime::{RuntimeError, Threads, environment};
use crate::structure::Structure;

/// Why a model version was refused.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// ONNX Runtime is not available.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A file is missing or unreadable.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The manifest is invalid on its own.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The manifest does not fit the ONNX model, or the model does not run.
    #[error("model {name} version {version}: {reason}")]
    Mismatch {
        /// Model name.
        name: String,
        /// Version.
        version: u64,
        /// What does not fit.
        reason: String,
    },
}

/// A loaded, checked model version, ready to run.
pub struct Model {
    /// Model name (its directory).
    pub name: String,
    /// Version (its numeric sub-directory).
    pub version: u64,
    /// Lowercase hex SHA-256 of `model.onnx` followed by the manifest's
    /// constant files in order and the structure file (of `model.onnx` alone
    /// when there are none), so a refitted memory bank is a different model.
    pub sha256: String,
    /// The manifest.
    pub manifest: Manifest,
    /// Ratio of tile side to output map side (1 = full resolution).
    pub stride: usize,
    /// The version directory.
    pub dir: PathBuf,
    /// The fitted structure model, when the manifest has one.
    pub structure: Option<Structure>,
    constants: Vec<(String, ArrayD<f32>)>,
    session: Mutex<Session>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("name", &self.name).field("version", &self.version).finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ModelError> {
    std::fs::read(path).map_err(|e| ModelError::File { path: path.to_path_buf(), reason: e.to_string() })
}

fn tensor_shape(t: &ValueType) -> Option<(TensorElementType, Vec<i64>)> {
    match t {
        ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.to_vec())),
        _ => None,
    }
}

/// True when dimension `d` is dynamic or equals `want`.
fn fits(d: i64, want: usize) -> bool {
    d < 0 || d as usize == want
}

impl Model {
    /// Loads `dir/model.onnx` with `dir/model.toml`, checks one against the
    /// other, and runs the model once on a blank tile to learn its output
    /// resolution. `name` and `version` come from the directory layout.
    pub fn load(dir: &Path, name: &str, version: u64, threads: Threads) -> Result<Model, ModelError> {
        let text = String::from_utf8(read(&dir.join("model.toml"))?)
            .map_err(|_| ModelError::File { path: dir.join("model.toml"), reason: "not UTF-8 text".into() })?;
        let manifest = Manifest::parse(&text)?;
        let mismatch = |reason: String| ModelError::Mismatch { name: name.to_string(), version, reason };
        if manifest.name != name {
            return Err(mismatch(format!("model.toml names {:?} but the directory is {name:?}", manifest.name)));
        }
        let bytes = read(&dir.join("model.onnx"))?;
        let mut digest = Sha256::new();
        digest.update(&bytes);
        let mut constants = Vec::new();
        for c in &manifest.constants {
            let path = dir.join(&c.file);
            let raw = read(&path)?;
            let want = c.shape.iter().product::<usize>() * 4;
            if raw.len() != want {
                return Err(ModelError::File {
                    path,
                    reason: format!("holds {} bytes; shape {:?} of float32 needs {want}", raw.len(), c.shape),
                });
            }
            digest.update(&raw);
            let values: Vec<f32> = raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            let array = ArrayD::from_shape_vec(IxDyn(&c.shape), values).expect("length checked above");
            constants.push((c.name.clone(), array));
        }
        let mut structure = None;
        if let Some(spec) = &manifest.structure
            && let Some(file) = &spec.file
        {
            let path = dir.join(file);
            let raw = read(&path)?;
            digest.update(&raw);
            let fitted = Structure::from_bytes(spec, manifest.input.length_along, &raw)
                .map_err(|e| ModelError::File { path: path.clone(), reason: e.to_string() })?;
            structure = Some(fitted);
        }
        let sha256 = hex::encode(digest.finalize());
        let env = environment()?;
        let configure = || -> Result<ort::session::builder::SessionBuilder, ort::Error> {
            Ok(Session::builder(&env)?.with_intra_threads(threads.intra_op)?.with_inter_threads(threads.inter_op)?)
        };
        let session = configure()
            .map_err(|e| mismatch(format!("configuring ONNX Runtime: {e}")))?
            .commit_from_memory(&bytes)
            .map_err(|e| mismatch(format!("ONNX Runtime cannot load model.onnx: {e}")))?;

        let input = &manifest.input;
        let channels = input.channels.len();
        let names = |outlets: &[ort::value::Outlet]| outlets.iter().map(|o| o.name().to_string()).collect::<Vec<_>>();
        let Some(inp) = session.inputs().iter().find(|o| o.name() == input.name) else {
            return Err(mismatch(format!(
                "no input {:?}; the model's inputs are {:?}",
                input.name,
                names(session.inputs())
            )));
        };
        match tensor_shape(inp.dtype()) {
            Some((TensorElementType::Float32, s))
                if s.len() == 4 && fits(s[1], channels) && fits(s[2], input.tile) && fits(s[3], input.tile) => {}
            _ => {
                return Err(mismatch(format!(
                    "input {:?} is {}, but the manifest needs float32 [N, {channels}, {t}, {t}]",
                    input.name,
                    inp.dtype(),
                    t = input.tile
                )));
            }
        }
        for (c, _) in &constants {
            if !session.inputs().iter().any(|o| o.name() == c) {
                return Err(mismatch(format!(
                    "constants names input {c:?}; the model's inputs are {:?}",
                    names(session.inputs())
                )));
            }
        }
        // Every other graph input must be fed, or each scan would fail at run time.
        if let Some(unfed) = session
            .inputs()
            .iter()
            .map(|o| o.name())
            .find(|n| *n != input.name && !constants.iter().any(|(c, _)| c == n))
        {
            return Err(mismatch(format!(
                "model.onnx takes input {unfed:?}, which neither input.name nor a [[constants]] entry feeds"
            )));
        }
        let out_name = &manifest.output.name;
        let Some(out) = session.outputs().iter().find(|o| o.name() == *out_name) else {
            return Err(mismatch(format!(
                "no output {out_name:?}; the model's outputs are {:?}",
                names(session.outputs())
            )));
        };
        match tensor_shape(out.dtype()) {
            Some((TensorElementType::Float32, s)) if s.len() == 3 || (s.len() == 4 && fits(s[1], 1)) => {}
            _ => {
                return Err(mismatch(format!(
                    "output {out_name:?} is {}, but niix needs float32 [N, 1, h, w] or [N, h, w]",
                    out.dtype()
                )));
            }
        }
        let mut model = Model {
            name: name.to_string(),
            version,
            sha256,
            manifest,
            stride: 1,
            dir: dir.to_path_buf(),
            structure,
            constants,
            session: Mutex::new(session),
        };
        let blank = Array4::<f32>::zeros((1, channels, model.manifest.input.tile, model.manifest.input.tile));
        let (h, w) = model.run(&blank, |_, _| ()).map_err(|e| mismatch(format!("a trial run failed: {e}")))?;
        let tile = model.manifest.input.tile;
        if h != w || h == 0 || !tile.is_multiple_of(h) {
            return Err(mismatch(format!(
                "a {tile}x{tile} tile gives a {h}x{w} map; niix needs a square map whose side divides the tile"
            )));
        }
        model.stride = tile / h;
        if !model.manifest.input.overlap.is_multiple_of(2 * model.stride) {
            return Err(mismatch(format!(
                "input.overlap {} must be a multiple of twice the map stride {}",
                model.manifest.input.overlap, model.stride
            )));
        }
        Ok(model)
    }

    /// Runs one batch `[n, channels, tile, tile]` and hands each tile's map
    /// (row-major `side x side` values) to `each(index, map)`. Returns the map
    /// side (height, width).
    pub fn run<F>(&self, batch: &Array4<f32>, mut each: F) -> Result<(usize, usize), ort::Error>
    where
        F: FnMut(usize, &[f32]),
    {
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let mut inputs: Vec<(&str, SessionInputValue<'_>)> =
            vec![(self.manifest.input.name.as_str(), TensorRef::from_array_view(batch.view())?.into())];
        for (name, value) in &self.constants {
            inputs.push((name.as_str(), TensorRef::from_array_view(value.view())?.into()));
        }
        let outputs = session.run(inputs)?;
        let (shape, data) = outputs[self.manifest.output.name.as_str()].try_extract_tensor::<f32>()?;
        let dims: Vec<i64> = shape.to_vec();
        let (h, w) = match dims.as_slice() {
            [_, 1, h, w] | [_, h, w] => (*h as usize, *w as usize),
            other => return Err(ort::Error::new(format!("unexpected output shape {other:?}"))),
        };
        let n = batch.shape()[0];
        if data.len() != n * h * w {
            return Err(ort::Error::new(format!("output holds {} values, expected {}", data.len(), n * h * w)));
        }
        for (i, map) in data.chunks_exact(h * w).enumerate() {
            each(i, map);
        }
        Ok((h, w))
    }

    /// A one-line identity: `name version N (sha256 …)`.
    pub fn label(&self) -> String {
        format!("{} version {} (sha256 {})", self.name, self.version, &self.sha256[..12])
    }
}
