//! Which model analyses a scan: the configured one (`analysis.model`) when
//! the scan's planes can feed it, else one `analysis.fallback` allows, so
//! that a single-energy scan sent to a site whose detector needs two planes
//! is analysed by a single-energy model instead of failing.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use niix_inference::model::Model;
use niix_inference::pipeline::{AnalysisError, select_planes};
use niix_inference::repository::Repository;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `analysis.fallback`: which models may analyse a scan the configured
/// model cannot read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Fallback {
    /// The serving models that are not demonstration models and can read
    /// the scan, those using more distinct planes first (dual-energy before
    /// single-energy), then by name.
    #[default]
    Auto,
    /// None: the scan fails.
    None,
    /// These models, in this order (the first serving one that reads the scan).
    Models(Vec<String>),
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fallback::Auto => f.write_str("\"auto\""),
            Fallback::None => f.write_str("\"none\""),
            Fallback::Models(names) => write!(f, "{names:?}"),
        }
    }
}

impl FromStr for Fallback {
    type Err = String;

    /// `auto`, `none`, or model names separated by commas (the form of the
    /// command line and the environment).
    fn from_str(s: &str) -> Result<Fallback, String> {
        match s.trim() {
            "auto" => Ok(Fallback::Auto),
            "none" => Ok(Fallback::None),
            list => {
                let names: Vec<String> =
                    list.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_string).collect();
                if names.is_empty() {
                    return Err(format!("{s:?} is not \"auto\", \"none\" or a comma-separated list of model names"));
                }
                Ok(Fallback::Models(names))
            }
        }
    }
}

impl Serialize for Fallback {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Fallback::Auto => s.serialize_str("auto"),
            Fallback::None => s.serialize_str("none"),
            Fallback::Models(names) => names.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Fallback {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Fallback, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Fallback;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"auto\", \"none\" or a list of model names")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Fallback, E> {
                match v {
                    "auto" => Ok(Fallback::Auto),
                    "none" => Ok(Fallback::None),
                    other => Err(E::custom(format!(
                        "{other:?} is not \"auto\" or \"none\"; a list of model names is written [\"a\", \"b\"]"
                    ))),
                }
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Fallback, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    if name.trim().is_empty() {
                        return Err(serde::de::Error::custom("an empty model name in the list"));
                    }
                    names.push(name);
                }
                Ok(Fallback::Models(names))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Why another model than the configured one analysed a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FellBack {
    /// The configured model's name.
    pub from: String,
    /// Why it could not analyse the scan.
    pub reason: String,
}

/// The model chosen for one scan.
#[derive(Debug, Clone)]
pub struct Chosen {
    /// The model that analyses it.
    pub model: Arc<Model>,
    /// Set when it is not the configured model.
    pub fell_back: Option<FellBack>,
}

/// Chooses the model for each scan from the repository's serving models.
pub struct ModelChoice {
    repo: Arc<Repository>,
    model: Option<String>,
    fallback: Fallback,
}

impl fmt::Debug for ModelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelChoice")
            .field("models", &self.repo.root())
            .field("model", &self.model)
            .field("fallback", &self.fallback)
            .finish()
    }
}

/// Why the scan's planes cannot feed `model`, or the planes that feed each
/// of its channels.
fn reads(model: &Model, kinds: &[&str]) -> Result<Vec<usize>, String> {
    select_planes(&model.manifest, kinds).map_err(|e| match e {
        AnalysisError::MissingPlane { wanted, channel, .. } => {
            format!("it needs a {wanted} plane for input channel {channel}")
        }
        other => other.to_string(),
    })
}

impl ModelChoice {
    /// `model` is `analysis.model` (unset: the first serving model by name).
    pub fn new(repo: Arc<Repository>, model: Option<String>, fallback: Fallback) -> ModelChoice {
        ModelChoice { repo, model, fallback }
    }

    /// The model repository.
    pub fn repo(&self) -> &Arc<Repository> {
        &self.repo
    }

    /// The configured model when it serves (unset: the only, or first by
    /// name, serving model). Scans wait in the queue while there is none.
    pub fn primary(&self) -> Option<Arc<Model>> {
        match &self.model {
            Some(name) => self.repo.get(name),
            None => self.repo.serving().into_iter().next(),
        }
    }

    /// The model for a scan with planes of `kinds`: `primary` if they can
    /// feed it, else the first fallback that they can feed. Without one,
    /// why not, naming the planes and every model tried.
    pub fn for_planes(&self, primary: &Arc<Model>, kinds: &[&str]) -> Result<Chosen, String> {
        let why = match reads(primary, kinds) {
            Ok(_) => return Ok(Chosen { model: primary.clone(), fell_back: None }),
            Err(why) => why,
        };
        let cannot = format!("the analysis model {} cannot read this scan's planes {kinds:?}: {why}", primary.label());
        let mut tried = Vec::new();
        let candidates: Vec<Arc<Model>> = match &self.fallback {
            Fallback::None => return Err(format!("{cannot}; analysis.fallback is \"none\"")),
            Fallback::Auto => {
                let mut able: Vec<(usize, Arc<Model>)> = Vec::new();
                for m in self.repo.serving().into_iter().filter(|m| !m.manifest.demo && m.name != primary.name) {
                    match reads(&m, kinds) {
                        Ok(mut planes) => {
                            planes.sort_unstable();
                            planes.dedup();
                            able.push((planes.len(), m));
                        }
                        Err(e) => tried.push(format!("{} ({e})", m.name)),
                    }
                }
                able.sort_by(|(a, m), (b, n)| b.cmp(a).then_with(|| m.name.cmp(&n.name)));
                able.into_iter().map(|(_, m)| m).collect()
            }
            Fallback::Models(names) => {
                let mut able = Vec::new();
                for name in names.iter().filter(|n| **n != primary.name) {
                    match self.repo.get(name) {
                        None => tried.push(format!("{name} (not serving)")),
                        Some(m) => match reads(&m, kinds) {
                            Ok(_) => able.push(m),
                            Err(e) => tried.push(format!("{name} ({e})")),
                        },
                    }
                }
                able
            }
        };
        match candidates.into_iter().next() {
            Some(model) => {
                Ok(Chosen { model, fell_back: Some(FellBack { from: primary.name.clone(), reason: cannot }) })
            }
            None if tried.is_empty() => Err(format!(
                "{cannot}; no other serving model may analyse it (analysis.fallback {}{})",
                self.fallback,
                if self.fallback == Fallback::Auto { ": non-demo models only" } else { "" }
            )),
            None => Err(format!(
                "{cannot}; nor can a fallback (analysis.fallback {}): tried {}",
                self.fallback,
                tried.join(", ")
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Section {
        #[serde(default)]
        fallback: Fallback,
    }

    #[test]
    fn the_fallback_reads_from_toml_and_the_command_line() {
        let parse = |t: &str| toml::from_str::<Section>(t).map(|s| s.fallback).map_err(|e| e.to_string());
        assert_eq!(parse("").unwrap(), Fallback::Auto);
        assert_eq!(parse("fallback = \"auto\"").unwrap(), Fallback::Auto);
        assert_eq!(parse("fallback = \"none\"").unwrap(), Fallback::None);
        assert_eq!(parse("fallback = [\"a\", \"b\"]").unwrap(), Fallback::Models(vec!["a".into(), "b".into()]));
        assert!(parse("fallback = \"cargo-patchcore-se\"").unwrap_err().contains("[\"a\", \"b\"]"));
        assert!(parse("fallback = 3").unwrap_err().contains("a list of model names"));
        assert!(parse("fallback = [\"\"]").unwrap_err().contains("empty model name"));
        assert_eq!("none".parse::<Fallback>().unwrap(), Fallback::None);
        assert_eq!("a, b".parse::<Fallback>().unwrap(), Fallback::Models(vec!["a".into(), "b".into()]));
        assert!(" , ".parse::<Fallback>().is_err());
        // What serialises reads back.
        for f in [Fallback::Auto, Fallback::None, Fallback::Models(vec!["x".into()])] {
            #[derive(Serialize)]
            struct Out<'a> {
                fallback: &'a Fallback,
            }
            assert_eq!(parse(&toml::to_string(&Out { fallback: &f }).unwrap()).unwrap(), f);
        }
    }
}
