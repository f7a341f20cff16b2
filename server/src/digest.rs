//! SHA-256 helpers shared by the server and the CLI.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

/// Bytes read per call when hashing a file: large reads keep the system-call
/// count low next to the hashing itself (`io::copy` reads 8 KiB at a time).
const READ_BYTES: usize = 1 << 20;

/// Feeds everything `reader` yields to `hasher`; returns the byte count.
pub fn hash_from(hasher: &mut Sha256, mut reader: impl Read) -> io::Result<u64> {
    let mut buf = vec![0u8; READ_BYTES];
    let mut total = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// Lowercase hex SHA-256 of everything `reader` yields.
pub fn sha256_hex(reader: impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    hash_from(&mut hasher, reader)?;
    Ok(hex::encode(hasher.finalize()))
}

/// True for a lowercase hex SHA-256.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_the_known_digest_of_hello() {
        assert_eq!(
            super::sha256_hex(&b"hello"[..]).unwrap(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }
}
