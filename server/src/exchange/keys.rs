//! The issuing administration's Ed25519 key pair, and signing and
//! verifying result packages with it.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use niix_proto::v1::{PackageContent, ResultPackage};
use prost::Message;

use crate::audit::{CHECKPOINT_FORMAT, Checkpoint};

/// File names of the key pair inside a key directory.
pub const PRIVATE_KEY_FILE: &str = "niix-ed25519.key";
/// The public key, to give to partners.
pub const PUBLIC_KEY_FILE: &str = "niix-ed25519.pub";

/// Why a package does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The key given is not an Ed25519 public key.
    #[error("the public key must be 64 hex digits (32 bytes): {0}")]
    BadKey(String),
    /// The package was signed by another key.
    #[error("the package is signed by key {found}, not by the expected {expected}")]
    WrongSigner {
        /// Key in the package.
        found: String,
        /// Key given.
        expected: String,
    },
    /// The signature does not match the content.
    #[error("the signature does not match the content: the package was altered or forged")]
    BadSignature,
    /// The bytes are not a package.
    #[error("not a niix result package: {0}")]
    Malformed(String),
}

/// Makes a new key pair in `dir`; refuses to overwrite one.
pub fn init(dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    std::fs::create_dir_all(dir)?;
    let private = dir.join(PRIVATE_KEY_FILE);
    anyhow::ensure!(!private.exists(), "{} exists already: keys are never overwritten", private.display());
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness for a key: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    write_private(&private, &hex::encode(seed))?;
    let public = hex::encode(key.verifying_key().to_bytes());
    std::fs::write(dir.join(PUBLIC_KEY_FILE), format!("{public}\n"))?;
    Ok((private, public))
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(())
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, format!("{text}\n"))?;
    Ok(())
}

/// Loads the signing key from a file written by [`init`].
pub fn load(path: &Path) -> anyhow::Result<SigningKey> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!("cannot read signing key {}: {e} (make one with `niix keys init`)", path.display())
    })?;
    let bytes = hex::decode(text.trim()).map_err(|_| anyhow::anyhow!("{} is not a hex key", path.display()))?;
    let seed: [u8; 32] = bytes.try_into().map_err(|_| anyhow::anyhow!("{} is not a 32-byte key", path.display()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The public key of a signing key, lowercase hex.
pub fn public_hex(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().to_bytes())
}

/// Signs the canonical encoding of `content`.
pub fn sign(key: &SigningKey, content: &PackageContent) -> ResultPackage {
    let bytes = content.encode_to_vec();
    let signature = key.sign(&bytes);
    ResultPackage { content: bytes, signature: signature.to_bytes().to_vec(), signer_public_key: public_hex(key) }
}

/// Signs a checkpoint of the audit chain's head (record `seq`, hash `sha256`).
pub fn sign_checkpoint(key: &SigningKey, administration: &str, seq: u64, sha256: &str) -> Checkpoint {
    let signed_at_us =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
    let mut cp = Checkpoint {
        format: CHECKPOINT_FORMAT.into(),
        administration: administration.into(),
        seq,
        sha256: sha256.into(),
        signed_at_us,
        public_key: public_hex(key),
        signature: String::new(),
    };
    cp.signature = hex::encode(key.sign(&cp.message()).to_bytes());
    cp
}

/// Checks a checkpoint's signature, against `expected_public_hex` when given
/// (else against the key it names, which only proves it was not altered).
pub fn verify_checkpoint(cp: &Checkpoint, expected_public_hex: Option<&str>) -> Result<(), VerifyError> {
    if cp.format != CHECKPOINT_FORMAT {
        return Err(VerifyError::Malformed(format!("not a {CHECKPOINT_FORMAT} file (format {:?})", cp.format)));
    }
    let (named, key) = parse_public(&cp.public_key)?;
    if let Some(expected) = expected_public_hex {
        let (expected, _) = parse_public(expected)?;
        if expected != named {
            return Err(VerifyError::WrongSigner { found: named, expected });
        }
    }
    let sig: [u8; 64] = hex::decode(&cp.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| VerifyError::Malformed("the signature is not 64 hex bytes".into()))?;
    key.verify(&cp.message(), &Signature::from_bytes(&sig)).map_err(|_| VerifyError::BadSignature)
}

/// Parses a public key given as hex; returns it normalised and decoded.
pub fn parse_public(public_key_hex: &str) -> Result<(String, VerifyingKey), VerifyError> {
    let hex_key = public_key_hex.trim().to_ascii_lowercase();
    let bytes: [u8; 32] = hex::decode(&hex_key)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| VerifyError::BadKey(hex_key.clone()))?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|e| VerifyError::BadKey(e.to_string()))?;
    Ok((hex_key, key))
}

/// Checks a package against the issuer's public key (hex) and returns its
/// content. Needs no server.
pub fn verify(package: &ResultPackage, public_key_hex: &str) -> Result<PackageContent, VerifyError> {
    let (expected, key) = parse_public(public_key_hex)?;
    if package.signer_public_key != expected {
        return Err(VerifyError::WrongSigner { found: package.signer_public_key.clone(), expected });
    }
    let sig: [u8; 64] = package
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| VerifyError::Malformed("signature is not 64 bytes".into()))?;
    key.verify(&package.content, &Signature::from_bytes(&sig)).map_err(|_| VerifyError::BadSignature)?;
    PackageContent::decode(package.content.as_slice()).map_err(|e| VerifyError::Malformed(e.to_string()))
}

/// Reads a checkpoint file written by [`write_checkpoint`].
pub fn read_checkpoint(path: &std::path::Path) -> anyhow::Result<Checkpoint> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not a niix audit checkpoint: {e}", path.display()))
}

/// Signs the head of `store`'s chain and writes it to `output` atomically
/// (`niix audit checkpoint`, and the server's periodic checkpoint).
pub fn write_checkpoint(
    store: &dyn crate::store::MetadataStore,
    key: &SigningKey,
    administration: &str,
    output: &std::path::Path,
) -> anyhow::Result<Checkpoint> {
    let head = store.audit_tail(1)?.into_iter().next();
    let (seq, sha256) = head.map(|r| (r.seq, r.sha256)).unwrap_or((0, crate::audit::GENESIS.to_string()));
    let cp = sign_checkpoint(key, administration, seq, &sha256);
    let tmp = output.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&cp)? + "\n")
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, output).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", output.display()))?;
    Ok(cp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_package_verifies_and_any_change_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = init(dir.path()).unwrap();
        assert!(init(dir.path()).is_err(), "never overwrites");
        let key = load(&private).unwrap();
        assert_eq!(public_hex(&key), public);
        let content =
            PackageContent { package_id: "p1".into(), issuer: "NL".into(), sequence: 7, ..Default::default() };
        let pkg = sign(&key, &content);
        assert_eq!(verify(&pkg, &public).unwrap(), content);

        let mut altered = pkg.clone();
        let last = altered.content.len() - 1;
        altered.content[last] ^= 1;
        assert_eq!(verify(&altered, &public).unwrap_err(), VerifyError::BadSignature);

        let other_dir = tempfile::tempdir().unwrap();
        let (_, other_public) = init(other_dir.path()).unwrap();
        assert!(matches!(verify(&pkg, &other_public), Err(VerifyError::WrongSigner { .. })));
        let mut forged = pkg.clone();
        forged.signer_public_key = other_public.clone();
        assert_eq!(verify(&forged, &other_public).unwrap_err(), VerifyError::BadSignature);
        assert!(matches!(verify(&pkg, "xyz"), Err(VerifyError::BadKey(_))));
    }

    #[test]
    fn a_signed_checkpoint_verifies_and_any_change_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = init(dir.path()).unwrap();
        let key = load(&private).unwrap();
        let cp = sign_checkpoint(&key, "NL", 42, &"ab".repeat(32));
        verify_checkpoint(&cp, Some(&public)).unwrap();
        verify_checkpoint(&cp, None).unwrap();
        let moved = Checkpoint { seq: 41, ..cp.clone() };
        assert_eq!(verify_checkpoint(&moved, None).unwrap_err(), VerifyError::BadSignature);
        let other_dir = tempfile::tempdir().unwrap();
        let (other_private, other_public) = init(other_dir.path()).unwrap();
        assert!(matches!(verify_checkpoint(&cp, Some(&other_public)), Err(VerifyError::WrongSigner { .. })));
        // Re-signed by someone else's key: valid on its own, refused when the key is pinned.
        let forged = sign_checkpoint(&load(&other_private).unwrap(), "NL", 41, &"cd".repeat(32));
        assert!(matches!(verify_checkpoint(&forged, Some(&public)), Err(VerifyError::WrongSigner { .. })));
    }
}
