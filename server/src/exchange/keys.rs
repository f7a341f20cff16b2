//! The issuing administration's Ed25519 key pair, and signing and
//! verifying result packages with it.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use niix_proto::v1::{PackageContent, ResultPackage};
use prost::Message;

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
}
