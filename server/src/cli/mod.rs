//! The `niix` command line: `serve`, `push`, `scans`.

mod args;
mod audit;
mod doctor;
mod findings;
mod materials;
mod model;
mod officer;
pub mod partner;
mod push;
mod scans;
mod serve;
mod synth;

use clap::{Parser, Subcommand};

pub use args::{ServerArg, enum_word};

/// niix: exchange of non-intrusive inspection scans.
#[derive(Debug, Parser)]
#[command(name = "niix", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the niix server.
    Serve(serve::ServeArgs),
    /// Push a scan (16-bit TIFF, PNG or raw planes) to a server.
    Push(Box<push::PushArgs>),
    /// List the scans stored on a server.
    Scans(scans::ScansArgs),
    /// Show a scan's analysis: decision, score, regions, model.
    Findings(findings::FindingsArgs),
    /// Write a PNG of a scan with its findings drawn on it.
    Overlay(officer::OverlayArgs),
    /// Record an officer's verdict on a scan (and its regions).
    Adjudicate(officer::AdjudicateArgs),
    /// Print new analyses and adjudications as they happen.
    Watch(officer::WatchArgs),
    /// Write a report as a DICOS Threat Detection Report (.dcs).
    ExportTdr(officer::ExportTdrArgs),
    /// Verify or read the hash-chained audit log of a data directory.
    Audit(audit::AuditArgs),
    /// Bearer tokens for callers.
    #[command(subcommand)]
    Token(TokenCommand),
    /// This administration's signing keys for result packages.
    #[command(subcommand)]
    Keys(partner::KeysCommand),
    /// Check a result package's signature offline.
    Verify(partner::VerifyArgs),
    /// What a partner administration runs.
    #[command(subcommand)]
    Partner(partner::PartnerCommand),
    /// Generate synthetic dual-energy cargo scans with ground truth.
    Synth(synth::SynthArgs),
    /// Fit models to a site's scans.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Dual-energy material calibrations of scanners (the console's colouring).
    #[command(subcommand)]
    Materials(materials::MaterialsCommand),
    /// Detection figures of a model on a labelled set (`niix synth` output).
    Eval(model::EvalArgs),
    /// Check a deployment (ONNX Runtime, models, data directory, config,
    /// TLS, tokens) and say what to fix.
    Doctor(doctor::DoctorArgs),
}

/// `niix token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a new bearer token and print its [[auth.tokens]] entry.
    New(TokenArgs),
}

/// Arguments of `niix token new`.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// Who will present the token, e.g. scanner-nlrtm-03.
    #[arg(long)]
    pub identity: String,
    /// Its role.
    #[arg(long, value_enum)]
    pub role: RoleArg,
}

/// Roles as the CLI spells them.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RoleArg {
    /// Pushes scans.
    Scanner,
    /// Queries, views and adjudicates.
    Officer,
    /// A partner administration.
    Partner,
    /// Everything.
    Admin,
}

fn new_token(args: TokenArgs) -> anyhow::Result<()> {
    use crate::auth::Role;
    let role = match args.role {
        RoleArg::Scanner => Role::Scanner,
        RoleArg::Officer => Role::Officer,
        RoleArg::Partner => Role::Partner,
        RoleArg::Admin => Role::Admin,
    };
    let token = format!("niix_{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    println!("# give this token to {} (it is shown once; the server keeps only its hash):", args.identity);
    println!("#   {token}");
    println!("[[auth.tokens]]");
    println!("identity = {:?}", args.identity);
    println!("role = {:?}", role.name());
    println!("sha256 = {:?}", crate::auth::token_hash(&token));
    Ok(())
}

impl Cli {
    /// Runs the chosen command.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Serve(a) => serve::run(a).await,
            Command::Push(a) => push::run(*a).await,
            Command::Scans(a) => scans::run(a).await,
            Command::Findings(a) => findings::run(a).await,
            Command::Overlay(a) => officer::overlay(a).await,
            Command::Adjudicate(a) => officer::adjudicate(a).await,
            Command::Watch(a) => officer::watch(a).await,
            Command::ExportTdr(a) => officer::export_tdr(a).await,
            Command::Audit(a) => audit::run(a),
            Command::Token(TokenCommand::New(a)) => new_token(a),
            Command::Keys(c) => partner::keys_command(c),
            Command::Verify(a) => partner::verify(a),
            Command::Partner(partner::PartnerCommand::Pull(a)) => partner::pull(a).await,
            Command::Synth(a) => synth::run(a),
            Command::Model(model::ModelCommand::Fit(a)) => model::fit(a),
            Command::Eval(a) => model::eval(a),
            Command::Doctor(a) => doctor::run(a),
            Command::Materials(materials::MaterialsCommand::Calibrate(a)) => materials::calibrate(a),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
