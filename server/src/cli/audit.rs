//! `niix audit verify`, `niix audit checkpoint` and `niix audit tail`: read
//! the audit log of a data directory directly (on the server's host; safe
//! while it runs).

use std::path::PathBuf;

use serde_json::json;

use crate::audit;
use crate::exchange::keys;
use crate::store::{MetadataStore, SqliteMetadata};

/// Arguments of `niix audit`.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: AuditCommand,
}

/// `niix audit` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Recompute the hash chain and check every stored scan and report
    /// against its seal; report what is broken (exit 1).
    Verify {
        /// Data directory of the server.
        #[arg(long, env = "NIIX_DATA", default_value = "data")]
        data: PathBuf,
        /// A checkpoint from `niix audit checkpoint`: the log must still hold
        /// the head it signed (catches truncation and re-chaining).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// The administration's public key (hex, or a `.pub` file) the
        /// checkpoint must be signed with.
        #[arg(long, requires = "checkpoint")]
        public_key: Option<String>,
    },
    /// Sign the chain's head with the administration's key and write it as
    /// a checkpoint file (keep it off this host).
    Checkpoint {
        /// Data directory of the server.
        #[arg(long, env = "NIIX_DATA", default_value = "data")]
        data: PathBuf,
        /// The signing key (`niix keys init`).
        #[arg(long)]
        key: PathBuf,
        /// This administration's id, recorded in the checkpoint.
        #[arg(long, default_value = "")]
        administration: String,
        /// Where to write it.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Show the newest records.
    Tail {
        /// Data directory of the server.
        #[arg(long, env = "NIIX_DATA", default_value = "data")]
        data: PathBuf,
        /// How many.
        #[arg(short, long, default_value_t = 20)]
        n: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

fn open(data: &std::path::Path) -> anyhow::Result<SqliteMetadata> {
    let db = data.join("niix.db");
    anyhow::ensure!(db.exists(), "no niix database in {} (give the server's --data)", data.display());
    Ok(SqliteMetadata::open(&db)?)
}

/// Runs `niix audit`.
pub fn run(args: AuditArgs) -> anyhow::Result<()> {
    match args.command {
        AuditCommand::Verify { data, checkpoint, public_key } => {
            let store = open(&data)?;
            let n = audit::verify(&store)?.map_err(|b| {
                anyhow::anyhow!("{b}; see docs/operations.md (\"A broken audit log\") for how to recover")
            })?;
            let problems = audit::verify_seals(&store)?;
            if !problems.is_empty() {
                for p in &problems {
                    eprintln!("altered: {p}");
                }
                anyhow::bail!("{} stored scans or reports differ from their seals in the audit log", problems.len());
            }
            if let Some(path) = checkpoint {
                let cp = keys::read_checkpoint(&path)?;
                let pinned = public_key.map(|k| read_public(&k)).transpose()?;
                keys::verify_checkpoint(&cp, pinned.as_deref())
                    .map_err(|e| anyhow::anyhow!("checkpoint {}: {e}", path.display()))?;
                audit::check_checkpoint(&store, &cp)?
                    .map_err(|m| anyhow::anyhow!("audit log does not match checkpoint {}: {m}", path.display()))?;
                println!("audit log intact: {n} records, seals match, checkpoint of record {} matches", cp.seq);
            } else {
                println!("audit log intact: {n} records, seals match");
            }
            Ok(())
        }
        AuditCommand::Checkpoint { data, key, administration, output } => {
            let store = open(&data)?;
            let key = keys::load(&key)?;
            audit::verify(&store)?.map_err(|b| anyhow::anyhow!("refusing to sign a broken log: {b}"))?;
            let cp = keys::write_checkpoint(&store, &key, &administration, &output)?;
            println!("checkpoint of record {} ({}) written to {}", cp.seq, cp.sha256, output.display());
            Ok(())
        }
        AuditCommand::Tail { data, n, json } => {
            let store = open(&data)?;
            for r in store.audit_tail(n)? {
                let at = humantime::format_rfc3339_millis(r.entry.at).to_string();
                if json {
                    println!(
                        "{}",
                        json!({"seq": r.seq, "at": at, "identity": r.entry.identity, "role": r.entry.role,
                               "action": r.entry.action, "object": r.entry.object, "outcome": r.entry.outcome,
                               "sha256": r.sha256, "prev_sha256": r.prev_sha256})
                    );
                } else {
                    println!(
                        "{:>8}  {at}  {:<24} {:<8} {:<16} {:<38} {}",
                        r.seq, r.entry.identity, r.entry.role, r.entry.action, r.entry.object, r.entry.outcome
                    );
                }
            }
            Ok(())
        }
    }
}

/// A public key given as hex or as the path of a `.pub` file.
fn read_public(given: &str) -> anyhow::Result<String> {
    let path = std::path::Path::new(given);
    if path.exists() {
        return Ok(std::fs::read_to_string(path)?.trim().to_string());
    }
    Ok(given.to_string())
}
