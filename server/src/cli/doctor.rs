//! `niix doctor`: checks a deployment before (or while) it serves, and says
//! what to fix.
//!
//! Each check prints one line `OK`, `WARN` or `FAIL` with what it found, and
//! for WARN and FAIL a `fix:` line. The command fails (exit code 1) when any
//! check fails. It reads the same configuration as `niix serve` (file, then
//! `--data`/`--models`), never changes the store, and writes only a probe
//! file it removes again into the data directory.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use niix_inference::repository::Repository;

use crate::config::{Config, TlsConfig};

/// Free space below which the data directory check fails.
const FREE_FAIL_BYTES: u64 = 1 << 30;
/// Free space below which it warns: about 200 dual-energy 2048x6144 scans.
const FREE_WARN_BYTES: u64 = 10 << 30;

/// Arguments of `niix doctor`; the same sources as `niix serve`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// TOML configuration file (see docs/operations.md).
    #[arg(long, env = "NIIX_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory of the embedded store.
    #[arg(long, env = "NIIX_DATA")]
    pub data: Option<PathBuf>,
    /// Model repository directory (default: `models`, or the bundled
    /// `fixtures/models` when `models` does not exist).
    #[arg(long, env = "NIIX_MODELS")]
    pub models: Option<PathBuf>,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        })
    }
}

/// One finding of one check.
struct Outcome {
    level: Level,
    check: &'static str,
    found: String,
    fix: Option<String>,
}

/// The findings so far.
#[derive(Default)]
struct Report(Vec<Outcome>);

impl Report {
    fn ok(&mut self, check: &'static str, found: impl Into<String>) {
        self.0.push(Outcome { level: Level::Ok, check, found: found.into(), fix: None });
    }

    fn warn(&mut self, check: &'static str, found: impl Into<String>, fix: impl Into<String>) {
        self.0.push(Outcome { level: Level::Warn, check, found: found.into(), fix: Some(fix.into()) });
    }

    fn fail(&mut self, check: &'static str, found: impl Into<String>, fix: impl Into<String>) {
        self.0.push(Outcome { level: Level::Fail, check, found: found.into(), fix: Some(fix.into()) });
    }

    fn print(&self) {
        for o in &self.0 {
            println!("{:<4}  {:<8}  {}", o.level, o.check, o.found);
            if let Some(fix) = &o.fix {
                println!("{:<4}  {:<8}  fix: {fix}", "", "");
            }
        }
    }

    fn failed(&self) -> usize {
        self.0.iter().filter(|o| o.level == Level::Fail).count()
    }
}

/// Runs every check, prints them, and fails when one failed.
pub fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let mut report = Report::default();
    if let Some(config) = config(&args, &mut report) {
        bind(&config, &mut report);
        auth(&config, &mut report);
        tls(&config, &mut report);
        signing_key(&config, &mut report);
        data_dir(&config.data_dir, &mut report);
        analysis(&config, &mut report);
    }
    report.print();
    let failed = report.failed();
    anyhow::ensure!(failed == 0, "{failed} of {} checks failed; see the fix: lines above", report.0.len());
    Ok(())
}

/// Reads the configuration as `niix serve` would.
fn config(args: &DoctorArgs, report: &mut Report) -> Option<Config> {
    let mut config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            report.fail("config", format!("{e:#}"), "correct the file (every key is listed in docs/operations.md)");
            return None;
        }
    };
    match &config.source {
        Some((path, sha256)) => report.ok("config", format!("{} (sha256 {})", path.display(), &sha256[..12])),
        None => report.ok("config", "no config file: defaults and flags"),
    }
    if let Some(d) = &args.data {
        config.data_dir = d.clone();
    }
    if let Some(m) = &args.models {
        config.models_dir = m.clone();
    }
    Some(config)
}

fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// The listen addresses against the authentication and TLS rules.
fn bind(config: &Config, report: &mut Report) {
    let listen = config.listen;
    let authenticated = config.auth.enabled();
    if crate::server::check_bind_policy(listen, config.insecure, authenticated).is_err() {
        report.fail(
            "bind",
            format!("{listen} is reachable from the network but no caller must authenticate: `niix serve` refuses it"),
            "add [[auth.tokens]] (`niix token new`), listen on 127.0.0.1, or set insecure = true on a network you \
             trust (docs/operations.md)",
        );
    } else if is_loopback(listen) {
        report.ok("bind", format!("{listen} (loopback: only this machine can connect)"));
    } else if !authenticated {
        report.warn(
            "bind",
            format!("{listen} with insecure = true: anyone who reaches it may push, read and adjudicate scans"),
            "configure [[auth.tokens]] or client certificates, or bind to 127.0.0.1",
        );
    } else if config.tls.is_none() && !config.auth.tokens.is_empty() {
        report.warn(
            "bind",
            format!("{listen} without TLS: bearer tokens and scans cross the network in clear text"),
            "configure [tls] cert and key (docs/operations.md)",
        );
    } else {
        report.ok("bind", format!("{listen} with authentication"));
    }
    match config.metrics_listen {
        Some(m) if !is_loopback(m) => report.warn(
            "metrics",
            format!("/metrics on {m}: the endpoint has no authentication"),
            "bind metrics_listen to 127.0.0.1 and let the Prometheus host scrape through a tunnel or proxy",
        ),
        Some(m) => report.ok("metrics", format!("/metrics on {m}")),
        None => report.ok("metrics", "/metrics disabled"),
    }
}

/// Tokens and certificate identities.
fn auth(config: &Config, report: &mut Report) {
    let a = &config.auth;
    if let Err(e) = crate::auth::Authenticator::new(a) {
        report.fail("auth", format!("{e:#}"), "make entries with `niix token new --identity ID --role ROLE`");
        return;
    }
    let mut identities: Vec<&str> = a.tokens.iter().map(|t| t.identity.as_str()).collect();
    identities.extend(a.certificates.iter().map(|c| c.identity.as_str()));
    if let Some(blank) = identities.iter().find(|i| i.trim().is_empty()) {
        report.fail(
            "auth",
            format!("an [auth] entry has the identity {blank:?}: the audit log could not say who called"),
            "give every token and certificate an identity, e.g. scanner-nlrtm-03",
        );
        return;
    }
    if !a.certificates.is_empty() && config.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
        report.warn(
            "auth",
            format!(
                "{} [[auth.certificates]] but no [tls] client_ca: no client can present them",
                a.certificates.len()
            ),
            "set [tls] client_ca to the CA that issued the partners' certificates",
        );
    } else if a.enabled() {
        report.ok("auth", format!("{} tokens, {} certificates", a.tokens.len(), a.certificates.len()));
    } else {
        report.ok("auth", "no tokens or certificates: every caller that reaches the port is admin");
    }
}

/// The TLS files: readable, PEM, and the key belongs to the certificate.
fn tls(config: &Config, report: &mut Report) {
    let Some(t) = &config.tls else {
        report.ok("tls", "not configured (plain gRPC)");
        return;
    };
    match check_tls(t) {
        Ok(found) => report.ok("tls", found),
        Err((found, fix)) => report.fail("tls", found, fix),
    }
}

/// What [`tls`] reports: what was found, or what is wrong and its fix.
fn check_tls(t: &TlsConfig) -> Result<String, (String, String)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |p: &Path| {
        std::fs::read(p)
            .map_err(|e| (format!("cannot read {}: {e}", p.display()), "fix the path or its permissions".into()))
    };
    let certs = |p: &Path| -> Result<Vec<CertificateDer<'static>>, (String, String)> {
        let bytes = read(p)?;
        let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes).collect::<Result<_, _>>().unwrap_or_default();
        if certs.is_empty() {
            return Err((
                format!("{} holds no PEM certificate", p.display()),
                "give a PEM file (BEGIN CERTIFICATE)".into(),
            ));
        }
        Ok(certs)
    };
    let chain = certs(&t.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read(&t.key)?).map_err(|e| {
        (
            format!("{} holds no PEM private key ({e})", t.key.display()),
            "give the key as PEM (BEGIN PRIVATE KEY)".into(),
        )
    })?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain.clone(), key, &provider).map_err(|e| {
        (
            format!("the key {} does not belong to the certificate {} ({e})", t.key.display(), t.cert.display()),
            "configure the key the certificate was issued for".into(),
        )
    })?;
    let mut found = format!("{} ({} certificates) and its key", t.cert.display(), chain.len());
    if let Some(ca) = &t.client_ca {
        let n = certs(ca)?.len();
        found.push_str(&format!("; client CA {} ({n} certificates)", ca.display()));
    }
    Ok(found)
}

/// The key that signs result packages, when configured.
fn signing_key(config: &Config, report: &mut Report) {
    let Some(path) = &config.exchange.signing_key else { return };
    match crate::exchange::keys::load(path) {
        Ok(key) => {
            report.ok("signing", format!("{} (public key {})", path.display(), crate::exchange::keys::public_hex(&key)))
        }
        Err(e) => report.fail(
            "signing",
            format!("{e:#}"),
            "make a key pair with `niix keys init` and set [exchange] signing_key",
        ),
    }
}

/// The data directory: writable, with free space.
fn data_dir(dir: &Path, report: &mut Report) {
    let existing = dir.ancestors().find(|a| a.is_dir() || a.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let existing = if existing.as_os_str().is_empty() { Path::new(".") } else { existing };
    let probe = existing.join(format!(".niix-doctor-{}", std::process::id()));
    let written = std::fs::write(&probe, b"niix doctor").and_then(|()| std::fs::File::open(&probe)?.sync_all());
    let _ = std::fs::remove_file(&probe);
    if let Err(e) = written {
        report.fail(
            "data",
            format!("cannot write in {}: {e}", existing.display()),
            "give the user niix runs as write access, or choose another --data",
        );
        return;
    }
    let what = if existing == dir {
        format!("{} writable", dir.display())
    } else {
        format!("{} (created at start)", dir.display())
    };
    match free_bytes(existing) {
        Ok(free) if free < FREE_FAIL_BYTES => report.fail(
            "data",
            format!("{what}, {} free", gib(free)),
            "free space or move --data to a larger volume: a scan is stored whole before it is analysed",
        ),
        Ok(free) if free < FREE_WARN_BYTES => report.warn(
            "data",
            format!("{what}, only {} free (about 200 dual-energy container scans fit in 10 GiB)", gib(free)),
            "free space or move --data to a larger volume",
        ),
        Ok(free) => report.ok("data", format!("{what}, {} free", gib(free))),
        Err(e) => {
            report.warn("data", format!("{what}; free space unknown: {e}"), "check the volume's free space by hand")
        }
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Bytes an unprivileged process may still write on the volume of `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `s` is a writable statvfs that
    // statvfs(3) fills on success.
    let rc = unsafe { libc::statvfs(path.as_ptr(), s.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `s`.
    let s = unsafe { s.assume_init() };
    // fsblkcnt_t and c_ulong are 32 bits wide on some targets.
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(s.f_bavail) * u64::from(s.f_frsize))
}

/// ONNX Runtime and the model repository.
fn analysis(config: &Config, report: &mut Report) {
    let a = &config.analysis;
    if !a.enabled {
        report.warn("runtime", "[analysis] enabled = false: scans are stored, never analysed", "set enabled = true");
        return;
    }
    match niix_inference::runtime::environment() {
        Ok(_) => {
            let at = niix_inference::runtime::locate().map(|p| p.display().to_string()).unwrap_or_default();
            report.ok("runtime", format!("ONNX Runtime {} loaded from {at}", niix_inference::runtime::ORT_VERSION));
        }
        Err(e) => {
            report.fail("runtime", format!("{e}"), "run `make onnxruntime`, or set ORT_DYLIB_PATH to the library");
            return;
        }
    }
    let dir = &config.models_dir;
    if !dir.is_dir() {
        report.fail(
            "models",
            format!("model repository {} does not exist", dir.display()),
            "pass --models (the bundled ones are in fixtures/models) or set models_dir",
        );
        return;
    }
    let repo = Repository::new(dir, a.threads);
    let loaded = repo.reload();
    for (path, why) in &loaded.refused {
        report.warn("models", format!("{} refused: {why}", path.display()), "repair or remove that version");
    }
    let serving: Vec<String> = repo.serving().iter().map(|m| format!("{} v{}", m.name, m.version)).collect();
    let analyses = match &a.model {
        Some(name) => repo.get(name).map(|m| m.name.clone()).ok_or_else(|| format!("the configured model {name:?}")),
        None => repo.serving().first().map(|m| m.name.clone()).ok_or_else(|| "any model".to_string()),
    };
    match analyses {
        Ok(name) => {
            report.ok("models", format!("{}: {}; scans are analysed by {name}", dir.display(), serving.join(", ")))
        }
        Err(wanted) => report.fail(
            "models",
            format!("{} serves no version of {wanted}: scans would queue unanalysed", dir.display()),
            "add a model version (<name>/<version>/model.toml and model.onnx; see docs/models.md) or point --models at \
             fixtures/models",
        ),
    }
}
