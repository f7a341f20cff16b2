//! ModelInfer throughput of the Open Inference Protocol: a release `niix
//! serve` child with the demo model, loaded by tritonclient (PyPI) from
//! `oip_load.py`. Prints `name: value` lines (inferences/s, p50/p90/p99).
//!
//! ```text
//! cargo build --release -p niix-server && \
//!   cargo run --release -p niix-benches --bin oip_load -- --clients 2 --seconds 20
//! ```
//!
//! `NIIX_BIN` chooses the server binary (default `target/release/niix`);
//! `NIIX_PYTHON` the Python with tritonclient (default `.niix/venv`).

use std::path::PathBuf;
use std::process::Command;

use clap::Parser;
use niix_benches::{Serve, fixtures, workspace};

/// ModelInfer load with tritonclient.
#[derive(Debug, Parser)]
#[command(name = "oip_load")]
struct Args {
    /// Scan width in pixels.
    #[arg(long, default_value_t = 1024)]
    width: u32,
    /// Scan height in pixels.
    #[arg(long, default_value_t = 2048)]
    height: u32,
    /// Clients sending at once.
    #[arg(long, default_value_t = 2)]
    clients: usize,
    /// How long the load runs, seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u32,
}

fn main() {
    let args = Args::parse();
    let tmp = tempfile::tempdir().unwrap();
    let config = format!(
        "models_dir = {:?}\n[analysis]\nmodel = \"demo-local-contrast\"\nworkers = {}\n",
        fixtures().join("models"),
        args.clients
    );
    let serve = Serve::start(&tmp.path().join("data"), &config, &[]);
    let python =
        std::env::var_os("NIIX_PYTHON").map(PathBuf::from).unwrap_or_else(|| workspace().join(".niix/venv/bin/python"));
    let target = serve.url.trim_start_matches("http://").to_string();
    let status = Command::new(python)
        .arg(workspace().join("benches/oip_load.py"))
        .args([&target, "demo-local-contrast"])
        .args([args.width, args.height].map(|v| v.to_string()))
        .args([args.clients.to_string(), args.seconds.to_string()])
        .status()
        .expect("running benches/oip_load.py (make pyenv installs tritonclient)");
    drop(serve);
    std::process::exit(status.code().unwrap_or(1));
}
