//! Parallel `Exchange.GetPackage` on one large scan: the peak resident memory
//! and the time of a `niix serve` child while `--parallel` partners fetch the
//! same `findings_planes` package at once (the package's downsampled planes
//! are rendered then), and again once it is rendered. Prints `name: value`
//! lines.
//!
//! ```text
//! cargo build --release -p niix-server && \
//!   cargo run --release -p niix-benches --bin package_fetch -- --width 16384 --height 4096
//! ```
//!
//! `NIIX_BIN` chooses the server binary (default `target/release/niix`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use niix::auth::token_hash;
use niix::client::{PlaneHints, PushOptions, Quiet, authed, connect, push_files};
use niix_benches::{Serve, scan_header, synth_planes};
use niix_proto::v1::exchange_client::ExchangeClient;
use niix_proto::v1::findings_client::FindingsClient;
use niix_proto::v1::{AdjudicateRequest, GetPackageRequest, PlaneKind};

/// Parallel GetPackage on one large dual-energy scan.
#[derive(Debug, Parser)]
#[command(name = "package_fetch")]
struct Args {
    /// Scan width in pixels.
    #[arg(long, default_value_t = 8192)]
    width: u32,
    /// Scan height in pixels.
    #[arg(long, default_value_t = 4096)]
    height: u32,
    /// GetPackage calls at once.
    #[arg(long, default_value_t = 6)]
    parallel: usize,
    /// Working directory (default: a temporary one, removed at the end).
    #[arg(long)]
    work: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    let tmp = tempfile::tempdir().unwrap();
    let work = args.work.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let (key, _) = niix::exchange::keys::init(&work.join("keys")).unwrap();
    let config = format!(
        "[analysis]\nenabled = false\n\
         [[auth.tokens]]\nidentity = \"scanner\"\nrole = \"scanner\"\nsha256 = \"{}\"\n\
         [[auth.tokens]]\nidentity = \"officer\"\nrole = \"officer\"\nsha256 = \"{}\"\n\
         [[auth.tokens]]\nidentity = \"DE\"\nrole = \"partner\"\nsha256 = \"{}\"\n\
         [exchange]\nadministration = \"NL\"\nsigning_key = {:?}\n\
         [[exchange.agreements]]\nname = \"NL-DE\"\npartner = \"DE\"\ncontent = \"findings_planes\"\n\
         operator_reports = true\n",
        token_hash("t-scan"),
        token_hash("t-officer"),
        token_hash("t-de"),
        key,
    );
    let serve = Serve::start(&work.join("data"), &config, &[]);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let channel = connect(&serve.url).await.unwrap();
        let options = niix_synth::Options { width: args.width, height: args.height, ..Default::default() };
        let (high, low) = synth_planes(&work, 0x9ac4, 1, &options);
        let hints = PlaneHints { pixel_spacing_mm: (3.0, 3.0), ..Default::default() };
        let header = scan_header(&[(&high, PlaneKind::HighEnergy), (&low, PlaneKind::LowEnergy)], &hints);
        let push = PushOptions { retries: 0, ..Default::default() };
        let scanner = authed(channel.clone(), Some("t-scan")).unwrap();
        let receipt = push_files(scanner, header, vec![high, low], &push, Arc::new(Quiet)).await.unwrap();
        // An officer's verdict is the scan's only event: package NL.DE.1.
        FindingsClient::new(authed(channel.clone(), Some("t-officer")).unwrap())
            .adjudicate(AdjudicateRequest {
                scan_id: receipt.scan_id.clone(),
                verdict: 1,
                officer_id: "NL-1".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let before = serve.memory_mib("VmRSS");
        // Peak resident memory from here on.
        std::fs::write(format!("/proc/{}/clear_refs", serve.pid()), "5").unwrap();
        let de = authed(channel, Some("t-de")).unwrap();
        let round = || {
            let calls: Vec<_> = (0..args.parallel)
                .map(|_| {
                    let mut c = ExchangeClient::new(de.clone()).max_decoding_message_size(64 << 20);
                    tokio::spawn(async move {
                        c.get_package(GetPackageRequest { package_id: "NL.DE.1".into() }).await.unwrap().into_inner()
                    })
                })
                .collect();
            async move {
                let start = Instant::now();
                let mut size = 0;
                for c in calls {
                    size = c.await.unwrap().content.len();
                }
                (start.elapsed().as_secs_f64(), size)
            }
        };
        let (cold, size) = round().await;
        let peak = serve.memory_mib("VmHWM");
        let (warm, _) = round().await;
        println!("scan: {}x{} dual-energy", args.width, args.height);
        println!("get_package_parallel: {}", args.parallel);
        println!("package_bytes: {size}");
        println!("serve_rss_before_mib: {before:.0}");
        println!("get_package_peak_rss_mib: {peak:.0}");
        println!("get_package_first_round_seconds: {cold:.2}");
        println!("get_package_rendered_round_seconds: {warm:.3}");
    });
}
