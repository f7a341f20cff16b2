//! `niix serve`.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::Config;
use crate::server;

/// Arguments of `niix serve`; flags override the config file.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file (see docs/operations.md).
    #[arg(long, env = "NIIX_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "NIIX_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Prometheus /metrics listen address.
    #[arg(long, env = "NIIX_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Officer console (HTTP) listen address (default 127.0.0.1:8080).
    #[arg(long, env = "NIIX_WEB_LISTEN")]
    pub web_listen: Option<SocketAddr>,
    /// Data directory of the embedded store.
    #[arg(long, env = "NIIX_DATA")]
    pub data: Option<PathBuf>,
    /// Model repository directory (default: `models`, or the bundled
    /// `fixtures/models` when `models` does not exist).
    #[arg(long, env = "NIIX_MODELS")]
    pub models: Option<PathBuf>,
    /// Which model of the repository analyses scans (default: the only one,
    /// or the first by name).
    #[arg(long, env = "NIIX_MODEL")]
    pub model: Option<String>,
    /// Which model analyses a scan the analysis model cannot read (e.g. a
    /// single-energy scan and a dual-energy model): `auto` (default: the
    /// serving non-demo models that can, dual-energy first), `none` (the scan
    /// fails), or model names separated by commas, tried in order.
    #[arg(long, env = "NIIX_FALLBACK")]
    pub fallback: Option<crate::model_choice::Fallback>,
    /// Accept unauthenticated clients on a non-loopback address.
    #[arg(long)]
    pub insecure: bool,
}

impl ServeArgs {
    /// The effective configuration.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut c = Config::load(self.config.as_deref())?;
        if let Some(l) = self.listen {
            c.listen = l;
        }
        if let Some(m) = self.metrics_listen {
            c.metrics_listen = Some(m);
        }
        if let Some(w) = self.web_listen {
            c.web.listen = Some(w);
        }
        if let Some(d) = &self.data {
            c.data_dir = d.clone();
        }
        if let Some(m) = &self.models {
            c.models_dir = m.clone();
        }
        if let Some(m) = &self.model {
            c.analysis.model = Some(m.clone());
        }
        if let Some(f) = &self.fallback {
            c.analysis.fallback = f.clone();
        }
        c.insecure |= self.insecure;
        Ok(c)
    }
}

/// Runs the server until SIGINT/SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    let running = server::start(config).await?;
    eprintln!("niix listening on {} (metrics: {:?}); Ctrl-C to stop", running.addr, running.metrics_addr);
    if let Some(web) = running.web_addr {
        match &running.console_token {
            Some(token) => eprintln!(
                "officer console: {scheme}://{web}/  sign in with the token {token} \
                 (no tokens are configured: it signs you in as this workstation; a new one at each start)"
            ),
            None => eprintln!("officer console: {scheme}://{web}/  sign in with your officer token"),
        }
    }
    server::termination().await;
    tracing::info!("shutting down");
    running.shutdown().await
}
