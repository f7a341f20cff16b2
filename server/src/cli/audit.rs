//! `niix audit verify` and `niix audit tail`: read the audit log of a data
//! directory directly (on the server's host; safe while it runs).

use std::path::PathBuf;

use serde_json::json;

use crate::audit;
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
    /// Recompute the hash chain; report the first broken record (exit 1).
    Verify {
        /// Data directory of the server.
        #[arg(long, env = "NIIX_DATA", default_value = "data")]
        data: PathBuf,
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
        AuditCommand::Verify { data } => {
            let store = open(&data)?;
            match audit::verify(&store)? {
                Ok(n) => {
                    println!("audit log intact: {n} records");
                    Ok(())
                }
                Err(b) => anyhow::bail!("{b}"),
            }
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
