//! Finding and starting ONNX Runtime.
//!
//! niix loads `libonnxruntime.so.1.31.1` at run time (ort's `load-dynamic`),
//! taken from the PyPI wheel `onnxruntime==1.31.1` by
//! `scripts/fetch-onnxruntime.sh`. [`environment`] finds it without the user
//! setting anything, and says in one line how to get it when it is missing.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

/// The ONNX Runtime version niix is built against.
pub const ORT_VERSION: &str = "1.31.1";
/// File name of the shared library.
pub const ORT_LIBRARY: &str = "libonnxruntime.so.1.31.1";

/// ONNX Runtime could not be started.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    /// `ORT_DYLIB_PATH` names a file that does not exist.
    #[error("ORT_DYLIB_PATH is {0} but there is no such file: fix it, or unset it and run `make onnxruntime`")]
    BadOverride(PathBuf),
    /// The shared library is nowhere to be found.
    #[error(
        "ONNX Runtime {ORT_VERSION} not found ({ORT_LIBRARY}): run `make onnxruntime` (takes it from the PyPI wheel \
         onnxruntime=={ORT_VERSION} with pip) or set ORT_DYLIB_PATH to the library"
    )]
    Missing,
    /// The library exists but could not be loaded.
    #[error("cannot load ONNX Runtime from {path}: {reason}")]
    Load {
        /// The file tried.
        path: PathBuf,
        /// What the loader said.
        reason: String,
    },
}

/// Where to look for the library, in order: `ORT_DYLIB_PATH`, then
/// `$NIIX_ORT_DIR`, then `.niix/onnxruntime/` in the working directory, then
/// next to the executable, then `.niix/onnxruntime/` in any directory above
/// the executable (a binary inside a checkout's `target/`).
pub fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        out.push(PathBuf::from(p));
    }
    if let Some(d) = std::env::var_os("NIIX_ORT_DIR") {
        out.push(Path::new(&d).join(ORT_LIBRARY));
    }
    if let Ok(cwd) = std::env::current_dir() {
        out.push(cwd.join(".niix/onnxruntime").join(ORT_LIBRARY));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            out.push(dir.join(ORT_LIBRARY));
        }
        for dir in exe.ancestors().skip(1) {
            out.push(dir.join(".niix/onnxruntime").join(ORT_LIBRARY));
        }
    }
    out
}

/// The first candidate that exists. An explicit `ORT_DYLIB_PATH` is the
/// only candidate: if it is wrong, that is said rather than worked around.
pub fn locate() -> Result<PathBuf, RuntimeError> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(RuntimeError::BadOverride(p)) };
    }
    candidates().into_iter().find(|p| p.is_file()).ok_or(RuntimeError::Missing)
}

static ENVIRONMENT: OnceLock<Result<Environment, RuntimeError>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, loaded on first use.
pub fn environment() -> Result<Environment, RuntimeError> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = locate()?;
            let builder = ort::init_from(&path).map_err(|e| RuntimeError::Load {
                path: path.clone(),
                reason: match &e {
                    ort::LoadDynamicError::Dlopen { error, .. } => {
                        std::error::Error::source(error).map(|s| s.to_string()).unwrap_or_else(|| e.to_string())
                    }
                    other => other.to_string(),
                },
            })?;
            let env = builder
                .with_name("niix")
                .with_telemetry(false)
                .build()
                .map_err(|e| RuntimeError::Load { path: path.clone(), reason: e.to_string() })?;
            tracing::info!(library = %path.display(), "ONNX Runtime loaded");
            Ok(env)
        })
        .clone()
}

/// Threads ONNX Runtime may use per model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threads {
    /// Threads inside one operator (e.g. a convolution).
    pub intra_op: usize,
    /// Threads running independent operators in parallel.
    pub inter_op: usize,
}

impl Default for Threads {
    /// Suits a 2-core machine: both cores inside operators, operators in sequence.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        Threads { intra_op: cores, inter_op: 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_missing_library_message_is_one_actionable_line() {
        let msg = RuntimeError::Missing.to_string();
        assert!(!msg.contains('\n'));
        assert!(msg.contains("make onnxruntime") && msg.contains("ORT_DYLIB_PATH"), "{msg}");
    }

    #[test]
    fn candidates_include_the_checkout_cache_above_the_executable() {
        let exe = std::env::current_exe().unwrap();
        let all = candidates();
        assert!(all.iter().any(|c| c.ends_with(Path::new(".niix/onnxruntime").join(ORT_LIBRARY))));
        assert!(all.iter().any(|c| c.parent() == exe.parent()));
    }

    #[test]
    fn the_library_loads_from_the_project_cache() {
        // `make test` fetches it; a plain `cargo test` finds it above target/.
        let env = environment().expect("ONNX Runtime must be available for the test suite");
        drop(env);
        assert!(environment().is_ok(), "the environment is shared");
    }
}
