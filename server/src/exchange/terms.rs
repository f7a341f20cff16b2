//! The terms this administration exchanges under: the `[exchange]`
//! section (who it is, its key, its agreements, whose packages it accepts),
//! the sizes of exchange messages, and how packages are named. Plain data,
//! read by the feed, the inbox and the outbox alike.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::agreement::Agreement;

/// Largest exchange message this server sends or a puller accepts (a
/// package with downsampled planes, or a chunk).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Default largest `Receive` message: a package (header at most 64 KiB,
/// reports, an overlay PNG 1024 px wide, up to 8 downsampled planes 512 px
/// wide) or a 1 MiB plane chunk. See docs/exchange.md.
pub const DEFAULT_MAX_RECEIVE_MESSAGE_BYTES: usize = 16 << 20;
/// Default number of `Receive` streams one issuer may have open at once.
pub const DEFAULT_MAX_RECEIVES_PER_ISSUER: usize = 2;
/// Plane bytes per `PlaneChunk`.
pub const CHUNK_BYTES: usize = 1 << 20;

/// The `[exchange]` section of the configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ExchangeConfig {
    /// This administration's id in packages, e.g. "NL".
    pub administration: String,
    /// The Ed25519 signing key (`niix keys init`).
    pub signing_key: Option<PathBuf>,
    /// One entry per partner this administration shares with.
    pub agreements: Vec<Agreement>,
    /// Partner administrations whose pushed packages are accepted.
    pub issuers: Vec<Issuer>,
    /// Largest message an issuer may send to `Receive`, in bytes; a larger
    /// one is refused (RESOURCE_EXHAUSTED) from its length prefix, before
    /// its bytes are read.
    pub max_receive_message_bytes: usize,
    /// `Receive` streams one issuer may have open at once; more get
    /// RESOURCE_EXHAUSTED (its outbox retries).
    pub max_receives_per_issuer: usize,
}

impl Default for ExchangeConfig {
    fn default() -> Self {
        ExchangeConfig {
            administration: String::new(),
            signing_key: None,
            agreements: Vec::new(),
            issuers: Vec::new(),
            max_receive_message_bytes: DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
            max_receives_per_issuer: DEFAULT_MAX_RECEIVES_PER_ISSUER,
        }
    }
}

/// A partner administration allowed to push packages here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Issuer {
    /// Its id, as in its packages and as its caller identity here (an
    /// `[auth]` token or certificate with role partner).
    pub administration: String,
    /// Its public key (hex, from its `niix keys show`).
    pub public_key: String,
}

/// Package id of a partner's package at a sequence.
pub fn package_id(issuer: &str, recipient: &str, sequence: u64) -> String {
    format!("{issuer}.{recipient}.{sequence}")
}
