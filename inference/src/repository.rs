//! The model repository: `<root>/<name>/<version>/{model.onnx,model.toml}`,
//! like Triton's. For each name the newest version that loads and passes
//! its checks serves; a broken newer version is refused (and logged) while
//! the one serving keeps serving. [`Repository::reload`] re-reads the
//! directory; the server calls it periodically, so new versions are picked up
//! without a restart.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use crate::model::Model;
use crate::runtime::Threads;

/// What identifies a version's files on disk: sizes and modification times.
type Fingerprint = Vec<(u64, Option<SystemTime>)>;

fn fingerprint(dir: &Path) -> Fingerprint {
    ["model.onnx", "model.toml"]
        .iter()
        .map(|f| match std::fs::metadata(dir.join(f)) {
            Ok(m) => (m.len(), m.modified().ok()),
            Err(_) => (u64::MAX, None),
        })
        .collect()
}

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReloadReport {
    /// Versions newly serving, as `name version N (sha256 …)`.
    pub loaded: Vec<String>,
    /// Versions refused, with the reason.
    pub refused: Vec<(PathBuf, String)>,
    /// Names no longer in the directory.
    pub removed: Vec<String>,
}

#[derive(Default)]
struct State {
    serving: BTreeMap<String, Arc<Model>>,
    /// Versions refused, with the fingerprint they had then (not retried
    /// until their files change).
    refused: HashMap<PathBuf, (Fingerprint, String)>,
}

/// Models on disk and the versions serving.
pub struct Repository {
    root: PathBuf,
    threads: Threads,
    state: RwLock<State>,
    reloading: Mutex<()>,
}

fn numbered_dirs(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok().map(|v| (v, e.path())))
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    out
}

impl Repository {
    /// A repository over `root`; nothing is loaded until [`Self::reload`].
    pub fn new(root: impl Into<PathBuf>, threads: Threads) -> Repository {
        Repository { root: root.into(), threads, state: RwLock::new(State::default()), reloading: Mutex::new(()) }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Re-reads the directory and swaps in newer valid versions.
    pub fn reload(&self) -> ReloadReport {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let mut report = ReloadReport::default();
        let names: Vec<(String, PathBuf)> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| Some((e.file_name().to_str()?.to_string(), e.path())))
            .filter(|(_, p)| !numbered_dirs(p).is_empty())
            .collect();
        for (name, dir) in &names {
            let current = self.get(name);
            for (version, vdir) in numbered_dirs(dir) {
                if let Some(cur) = &current
                    && cur.version >= version
                {
                    break; // the serving version is at least as new
                }
                let print = fingerprint(&vdir);
                let known_bad = {
                    let state = self.state.read().unwrap_or_else(|p| p.into_inner());
                    state.refused.get(&vdir).is_some_and(|(f, _)| *f == print)
                };
                if known_bad {
                    continue;
                }
                match Model::load(&vdir, name, version, self.threads) {
                    Ok(model) => {
                        let model = Arc::new(model);
                        tracing::info!(model = %model.label(), demo = model.manifest.demo, "model serving");
                        report.loaded.push(model.label());
                        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
                        state.refused.remove(&vdir);
                        state.serving.insert(name.clone(), model);
                        break;
                    }
                    Err(e) => {
                        let reason = e.to_string();
                        tracing::warn!(dir = %vdir.display(), error = %reason, "model version refused");
                        report.refused.push((vdir.clone(), reason.clone()));
                        self.state.write().unwrap_or_else(|p| p.into_inner()).refused.insert(vdir, (print, reason));
                    }
                }
            }
        }
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<String> = state.serving.keys().filter(|k| !names.iter().any(|(n, _)| n == *k)).cloned().collect();
        for name in gone {
            state.serving.remove(&name);
            tracing::warn!(model = %name, "model directory removed; no longer serving");
            report.removed.push(name);
        }
        report
    }

    /// The serving version of `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Model>> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).serving.get(name).cloned()
    }

    /// Every serving model, by name.
    pub fn serving(&self) -> Vec<Arc<Model>> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).serving.values().cloned().collect()
    }

    /// Versions refused so far, with reasons.
    pub fn refused(&self) -> Vec<(PathBuf, String)> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        state.refused.iter().map(|(p, (_, r))| (p.clone(), r.clone())).collect()
    }
}
