//! What a client may send and how long it may take: the limits every
//! service holds scans, uploads and connections to (the `[limits]` section
//! of the configuration). Plain data with no I/O, below the services that
//! enforce it and the configuration that reads it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Limits on what a client may send. Exceeding one gives RESOURCE_EXHAUSTED.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most image planes in one scan.
    pub max_planes: u32,
    /// Largest plane, in bytes as sent.
    pub max_plane_bytes: u64,
    /// Largest scan, all planes together, in bytes as sent.
    pub max_scan_bytes: u64,
    /// Most pixels in one plane (width x height).
    pub max_plane_pixels: u64,
    /// Largest width or height.
    pub max_dimension: u32,
    /// Largest encoded ScanHeader, in bytes.
    pub max_header_bytes: usize,
    /// Most uploads streaming at once; more get RESOURCE_EXHAUSTED.
    pub max_concurrent_uploads: usize,
    /// Most uploads one identity (one scanner's token) streams at once, so
    /// that one client cannot take every upload slot; more get
    /// RESOURCE_EXHAUSTED.
    pub max_uploads_per_identity: usize,
    /// An upload that sends nothing (no header, no chunk) for this long is
    /// cut with DEADLINE_EXCEEDED; the bytes received stay resumable.
    #[serde(with = "humantime_serde_compat")]
    pub upload_stall_timeout: Duration,
    /// Most connections open at once, gRPC and metrics together. Past it, a
    /// new connection closes the oldest one that never sent a byte (else the
    /// one silent longest, if silent for a second); when all are talking the
    /// new one is refused. Keep it well under the process's file-handle limit.
    pub max_connections: usize,
    /// A connection (gRPC or metrics) that sends no byte within this long of
    /// being accepted is closed (a silent TCP or unfinished TLS handshake).
    #[serde(with = "humantime_serde_compat")]
    pub handshake_timeout: Duration,
    /// A connection that sends no byte for this long is closed. Live gRPC
    /// clients answer the server's HTTP/2 keepalive pings, which count, so
    /// this must be longer than `keepalive_interval` + `keepalive_timeout`.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// How often the server pings a gRPC connection that sent nothing.
    #[serde(with = "humantime_serde_compat")]
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    #[serde(with = "humantime_serde_compat")]
    pub keepalive_timeout: Duration,
    /// Unfinished uploads untouched for this long are deleted.
    #[serde(with = "humantime_serde_compat")]
    pub staging_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_planes: 8,
            max_plane_bytes: 4 << 30,
            max_scan_bytes: 16 << 30,
            max_plane_pixels: 1 << 30,
            max_dimension: 1 << 17,
            max_header_bytes: 64 << 10,
            max_concurrent_uploads: 64,
            max_uploads_per_identity: 8,
            upload_stall_timeout: Duration::from_secs(60),
            max_connections: 512,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            staging_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl Limits {
    /// Refuses limits that contradict each other or switch a protection off.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_concurrent_uploads > 0 && self.max_uploads_per_identity > 0,
            "limits.max_concurrent_uploads and limits.max_uploads_per_identity must be at least 1"
        );
        anyhow::ensure!(self.max_connections > 0, "limits.max_connections must be at least 1");
        for (name, d) in [
            ("upload_stall_timeout", self.upload_stall_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("idle_timeout", self.idle_timeout),
            ("keepalive_interval", self.keepalive_interval),
            ("keepalive_timeout", self.keepalive_timeout),
        ] {
            anyhow::ensure!(!d.is_zero(), "limits.{name} must be longer than 0s");
        }
        anyhow::ensure!(
            self.idle_timeout > self.keepalive_interval + self.keepalive_timeout,
            "limits.idle_timeout ({}) must be longer than keepalive_interval + keepalive_timeout ({}), \
             or live clients waiting for events would be cut",
            humantime::format_duration(self.idle_timeout),
            humantime::format_duration(self.keepalive_interval + self.keepalive_timeout)
        );
        Ok(())
    }
}

/// Durations in the configuration, written as humantime (`"90s"`, `"1h 30m"`).
pub(crate) mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}
