//! Server configuration: a TOML file, overridden by command-line flags.
//!
//! Every field has a default, so an empty file (or none) gives a working
//! single-workstation server on loopback. See `docs/operations.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::limits::Limits;
use crate::limits::humantime_serde_compat;

/// Everything `niix serve` needs to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address; absent to disable.
    pub metrics_listen: Option<SocketAddr>,
    /// Directory for the embedded store (SQLite metadata and plane blobs).
    pub data_dir: PathBuf,
    /// Model repository directory (`<name>/<version>/model.onnx`); default
    /// [`default_models_dir`].
    pub models_dir: PathBuf,
    /// Accept unauthenticated clients on a non-loopback address.
    pub insecure: bool,
    /// How long in-flight uploads may run on after SIGTERM/SIGINT before they
    /// are abandoned (they stay resumable).
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_grace: Duration,
    /// Input limits.
    pub limits: Limits,
    /// The data directory's disk.
    pub storage: StorageConfig,
    /// Analysis of received scans.
    pub analysis: AnalysisConfig,
    /// Who may call (bearer tokens and their roles).
    pub auth: crate::auth::AuthConfig,
    /// Sharing with partner administrations.
    pub exchange: crate::exchange::ExchangeConfig,
    /// TLS for the gRPC port (and mutual TLS when `client_ca` is set).
    pub tls: Option<TlsConfig>,
    /// The officer console (HTTP).
    pub web: WebConfig,
    /// The file this was read from and the SHA-256 of its bytes (set by
    /// [`Config::load`]; audited at start).
    #[serde(skip)]
    pub source: Option<(PathBuf, String)>,
}

/// The `[tls]` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain, PEM.
    pub cert: PathBuf,
    /// Server private key, PEM.
    pub key: PathBuf,
    /// CA whose client certificates are accepted (mutual TLS), PEM. Clients
    /// without a certificate may still authenticate with a token.
    pub client_ca: Option<PathBuf>,
}

/// The `[web]` section: the officer console (see docs/officers.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// HTTP listen address of the console; absent to disable.
    pub listen: Option<SocketAddr>,
    /// How long a console sign-in lasts.
    #[serde(with = "humantime_serde_compat")]
    pub session_ttl: Duration,
    /// Material calibrations of the scanners whose scans the console colours
    /// (`[[web.materials]]`), tried in order; a scan no entry matches is
    /// coloured with the built-in 6/4 MV calibration (docs/officers.md).
    pub materials: Vec<crate::material::Calibration>,
    /// Bytes of decoded pyramid levels the console keeps for the scans being
    /// viewed (`decoded_cache_mib`, in MiB), least recently used first out.
    pub decoded_cache_mib: u64,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            listen: Some("127.0.0.1:8080".parse().expect("static address")),
            session_ttl: Duration::from_secs(8 * 3600),
            materials: Vec::new(),
            decoded_cache_mib: 256,
        }
    }
}

/// How scans are analysed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalysisConfig {
    /// Analyse scans at all (needs ONNX Runtime and a model).
    pub enabled: bool,
    /// Which model of the repository analyses scans; unset: the only one, or
    /// the first by name.
    pub model: Option<String>,
    /// Which model analyses a scan whose planes cannot feed `model` (e.g. a
    /// single-energy scan and a dual-energy model): `"auto"`, `"none"` or a
    /// list of model names ([`crate::model_choice::Fallback`]).
    pub fallback: crate::model_choice::Fallback,
    /// Scans analysed at once.
    pub workers: usize,
    /// How often the model repository is re-read for new versions.
    #[serde(with = "humantime_serde_compat")]
    pub reload_interval: Duration,
    /// ONNX Runtime threads per model.
    pub threads: niix_inference::runtime::Threads,
    /// Refuse a pushed scan whose planes the serving model cannot read
    /// (FAILED_PRECONDITION, e.g. a single-energy scan for a dual-energy
    /// model); false: store it with a warning in the receipt.
    pub refuse_unreadable: bool,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        AnalysisConfig {
            enabled: true,
            model: None,
            fallback: crate::model_choice::Fallback::Auto,
            workers: 1,
            reload_interval: Duration::from_secs(10),
            threads: niix_inference::runtime::Threads::default(),
            refuse_unreadable: true,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:50051".parse().expect("static address"),
            metrics_listen: Some("127.0.0.1:9464".parse().expect("static address")),
            data_dir: PathBuf::from("data"),
            models_dir: default_models_dir(),
            insecure: false,
            shutdown_grace: Duration::from_secs(10),
            limits: Limits::default(),
            storage: StorageConfig::default(),
            analysis: AnalysisConfig::default(),
            auth: crate::auth::AuthConfig::default(),
            exchange: crate::exchange::ExchangeConfig::default(),
            tls: None,
            web: WebConfig::default(),
            source: None,
        }
    }
}

/// The model repository used when neither the config file nor `--models`
/// names one: `models/` when that directory exists (a deployment's own
/// repository), otherwise the bundled `fixtures/models` when it exists (a
/// checkout of the niix repository), otherwise `models/` (which then reports
/// that it holds no model).
pub fn default_models_dir() -> PathBuf {
    let own = PathBuf::from("models");
    let bundled = PathBuf::from("fixtures/models");
    if !own.is_dir() && bundled.is_dir() { bundled } else { own }
}

/// The `[storage]` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// New uploads are refused (RESOURCE_EXHAUSTED) while the data
    /// directory's disk has less than this many bytes free once the scan is
    /// in, so the disk never fills and the audit log can always be written.
    pub min_free_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { min_free_bytes: 1 << 30 }
    }
}

impl Config {
    /// Reads a TOML file; a missing `path` gives the defaults.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let Some(path) = path else { return Ok(Config::default()) };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        let mut config: Config =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", path.display()))?;
        config.source = Some((path.to_path_buf(), crate::digest::sha256_hex(text.as_bytes())?));
        Ok(config)
    }
}

/// Durations written as "10s", "24h", "1h 30m" in TOML.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.listen, Config::default().listen);
        assert_eq!(c.limits, Limits::default());
    }

    #[test]
    fn fields_and_durations_parse() {
        let c: Config = toml::from_str(
            "listen = \"0.0.0.0:6000\"\nshutdown_grace = \"3s\"\n[limits]\nmax_planes = 2\nstaging_ttl = \"1h 30m\"\n\
             [analysis]\nmodel = \"m\"\nthreads = { intra_op = 2, inter_op = 1 }\n",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 6000);
        assert_eq!(c.shutdown_grace, Duration::from_secs(3));
        assert_eq!(c.limits.max_planes, 2);
        assert_eq!(c.limits.staging_ttl, Duration::from_secs(5400));
        assert_eq!(c.limits.max_dimension, Limits::default().max_dimension);
        assert_eq!(c.analysis.model.as_deref(), Some("m"));
        assert_eq!(c.analysis.fallback, crate::model_choice::Fallback::Auto);
        let c: Config = toml::from_str("[analysis]\nfallback = [\"se\", \"other\"]\n").unwrap();
        assert_eq!(c.analysis.fallback, crate::model_choice::Fallback::Models(vec!["se".into(), "other".into()]));
        assert_eq!(c.analysis.threads.intra_op, 2);
        assert!(c.analysis.enabled);
        assert_eq!(c.storage, StorageConfig::default());
        let c: Config = toml::from_str("[storage]\nmin_free_bytes = 4096\n").unwrap();
        assert_eq!(c.storage.min_free_bytes, 4096);
    }

    #[test]
    fn material_calibrations_parse_in_order() {
        let c: Config = toml::from_str(
            "[web]\ndecoded_cache_mib = 64\n\
             [[web.materials]]\nname = \"tube\"\nmodel = \"HX-160\"\norganic = [1.35, 0]\nmixed = [1.9, 0]\n\
             inorganic = [3.0, -0.05]\n\
             [[web.materials]]\nname = \"linac\"\npeak_kv = 9000\nlow_kv = 6000\nheavy_above = 7.5\n\
             organic = [1.26, 0.001]\nmixed = [1.23, 0]\ninorganic = [1.18, -0.004]\n",
        )
        .unwrap();
        assert_eq!(c.web.decoded_cache_mib, 64);
        let names: Vec<&str> = c.web.materials.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["tube", "linac"]);
        assert_eq!(c.web.materials[1].inorganic, crate::material::Ratio(1.18, -0.004));
        assert_eq!((c.web.materials[1].air_below, c.web.materials[1].heavy_above), (0.05, 7.5));
        let e = toml::from_str::<Config>("[[web.materials]]\nname = \"x\"\norganic = [1.3, 0]\n").unwrap_err();
        assert!(e.to_string().contains("mixed"), "{e}");
    }

    #[test]
    fn contradicting_timeouts_are_refused() {
        assert!(Limits::default().check().is_ok());
        let l = Limits { idle_timeout: Duration::from_secs(30), ..Limits::default() };
        assert!(l.check().unwrap_err().to_string().contains("idle_timeout (30s) must be longer"));
        let l = Limits { max_uploads_per_identity: 0, ..Limits::default() };
        assert!(l.check().unwrap_err().to_string().contains("max_uploads_per_identity"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = toml::from_str::<Config>("listn = \"x\"").unwrap_err().to_string();
        assert!(e.contains("listn"), "{e}");
    }
}
