//! SHA-256 helpers shared by the server and the CLI.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

/// A [`Write`] that feeds a hasher, for `io::copy`.
pub struct HashingWriter<'a>(pub &'a mut Sha256);

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Lowercase hex SHA-256 of everything `reader` yields.
pub fn sha256_hex(mut reader: impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(&mut reader, &mut HashingWriter(&mut hasher))?;
    Ok(hex::encode(hasher.finalize()))
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
