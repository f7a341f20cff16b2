//! The exchange commands: `keys`, `verify` (offline) and `partner pull`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use niix_proto::v1::exchange_client::ExchangeClient;
use niix_proto::v1::{GetPlaneRequest, ResultPackage, SubscribeRequest};
use prost::Message;
use tokio_stream::StreamExt;

use super::ServerArg;
use crate::client::StatusError;
use crate::exchange::keys;

/// `niix keys` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Make this administration's Ed25519 signing key pair.
    Init {
        /// Directory for the key files.
        #[arg(long, default_value = "keys")]
        dir: PathBuf,
    },
    /// Print the public key to give to partners.
    Show {
        /// Directory of the key files.
        #[arg(long, default_value = "keys")]
        dir: PathBuf,
    },
}

/// Arguments of `niix verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// A package file (`.niixpkg`).
    pub package: PathBuf,
    /// The issuing administration's public key (hex, from `niix keys show`).
    #[arg(long)]
    pub key: String,
}

/// `niix partner` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PartnerCommand {
    /// Fetch, verify and save the packages this partner is entitled to.
    Pull(PullArgs),
}

/// Arguments of `niix partner pull`.
#[derive(Debug, clap::Args)]
pub struct PullArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Where to save packages (and the cursor, in `.cursor`).
    #[arg(long)]
    pub out: PathBuf,
    /// The issuer's public key; every package is verified before it is saved.
    #[arg(long)]
    pub key: String,
    /// Keep waiting for new packages instead of stopping when caught up.
    #[arg(long)]
    pub follow: bool,
}

/// `niix keys`.
pub fn keys_command(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Init { dir } => {
            let (private, public) = keys::init(&dir)?;
            println!("signing key: {} (keep it secret; set [exchange] signing_key to it)", private.display());
            println!("public key:  {public}");
        }
        KeysCommand::Show { dir } => {
            let key = keys::load(&dir.join(keys::PRIVATE_KEY_FILE))?;
            println!("{}", keys::public_hex(&key));
        }
    }
    Ok(())
}

/// `niix verify`: checks a package with no server, and the plane files
/// saved beside it (`<package>.plane<i>`) against the signed digests.
pub fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.package)?;
    let pkg = ResultPackage::decode(bytes.as_slice()).map_err(|e| anyhow::anyhow!("not a niix result package: {e}"))?;
    let content = keys::verify(&pkg, &args.key)?;
    let mut planes = 0;
    for (i, d) in content.planes.iter().enumerate() {
        let path = plane_path(&args.package, i);
        if path.exists() {
            let sha = crate::digest::sha256_hex(std::fs::File::open(&path)?)?;
            anyhow::ensure!(sha == d.sha256, "{}: SHA-256 {sha} is not the signed {}", path.display(), d.sha256);
            planes += 1;
        }
    }
    println!(
        "valid: package {} from {} to {} (sequence {}, scan {}, agreement {}){}",
        content.package_id,
        content.issuer,
        content.recipient,
        content.sequence,
        content.scan_id,
        content.agreement,
        if planes > 0 { format!("; {planes} plane file(s) match") } else { String::new() }
    );
    Ok(())
}

/// Where `partner pull` saves plane `i` of a package file.
pub fn plane_path(package: &Path, i: usize) -> PathBuf {
    let mut name = package.as_os_str().to_owned();
    name.push(format!(".plane{i}"));
    PathBuf::from(name)
}

/// `niix partner pull`.
pub async fn pull(args: PullArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let cursor_file = args.out.join(".cursor");
    let mut cursor: u64 = std::fs::read_to_string(&cursor_file).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    let mut client =
        ExchangeClient::new(args.server.connect().await?).max_decoding_message_size(crate::exchange::MAX_MESSAGE_BYTES);
    let mut stream = client.subscribe(SubscribeRequest { cursor }).await.map_err(StatusError)?.into_inner();
    let mut saved = 0;
    loop {
        let next = if args.follow {
            stream.next().await
        } else {
            match tokio::time::timeout(Duration::from_secs(2), stream.next()).await {
                Ok(n) => n,
                Err(_) => break, // caught up
            }
        };
        let Some(item) = next else { break };
        let pkg = item.map_err(StatusError)?;
        let content = keys::verify(&pkg, &args.key)?;
        let path = args.out.join(format!("{:012}-{}.niixpkg", content.sequence, content.package_id));
        if content.full_planes {
            // Planes first: the package file appears only once they are complete.
            for (i, d) in content.planes.iter().enumerate() {
                fetch_plane(&mut client, &content.package_id, i, &d.sha256, &plane_path(&path, i)).await?;
            }
        }
        let tmp = path.with_extension("part");
        std::fs::write(&tmp, pkg.encode_to_vec())?;
        std::fs::rename(&tmp, &path)?;
        cursor = content.sequence;
        std::fs::write(&cursor_file, format!("{cursor}\n"))?;
        saved += 1;
        println!("{}", path.display());
    }
    eprintln!("{saved} packages saved and verified; cursor {cursor}");
    Ok(())
}

/// Downloads one plane (resuming a partial download) and checks its digest.
async fn fetch_plane(
    client: &mut ExchangeClient<crate::client::Authed>,
    package_id: &str,
    index: usize,
    sha256: &str,
    path: &Path,
) -> anyhow::Result<()> {
    use std::io::Write;
    if path.exists() && crate::digest::sha256_hex(std::fs::File::open(path)?)? == sha256 {
        return Ok(());
    }
    let partial = path.with_extension("part");
    let offset = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    let req = GetPlaneRequest { package_id: package_id.into(), plane_index: index as u32, offset };
    let mut chunks = client.get_plane(req).await.map_err(StatusError)?.into_inner();
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&partial)?;
    while let Some(chunk) = chunks.next().await {
        file.write_all(&chunk.map_err(StatusError)?.data)?;
    }
    file.sync_all()?;
    let got = crate::digest::sha256_hex(std::fs::File::open(&partial)?)?;
    if got != sha256 {
        std::fs::remove_file(&partial)?;
        anyhow::bail!("plane {index} of {package_id}: SHA-256 {got} is not the signed {sha256}; run the pull again");
    }
    std::fs::rename(&partial, path)?;
    Ok(())
}
