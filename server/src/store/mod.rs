//! Storage behind two traits: [`MetadataStore`] (scan records, unfinished
//! uploads) and [`BlobStore`] (plane bytes, content-addressed by SHA-256).
//!
//! The embedded defaults are [`SqliteMetadata`] and [`FsBlobs`]; a
//! PostgreSQL or S3 implementation plugs in behind the same traits without
//! touching the services. Both traits are synchronous: services call them
//! from the blocking pool.

mod fs;
mod sqlite;

use std::io::{Read, Seek, Write};
use std::time::SystemTime;

pub use fs::FsBlobs;
use niix_proto::v1::{ScanHeader, ScanStatus, ThreatReport};
pub use sqlite::SqliteMetadata;

/// A storage failure. Services report it as INTERNAL.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File-system failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Database failure.
    #[error("metadata database: {0}")]
    Database(#[from] rusqlite::Error),
    /// Stored data that cannot be read back.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// Stored data that no longer matches its digest or its seal in the
    /// audit chain: changed outside niix. Services refuse to send it.
    #[error("stored data was altered: {0}")]
    Tampered(String),
}

impl StoreError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io { context: context.into(), source }
    }
}

/// Result of storage calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// Digest and size of one stored plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaneDigest {
    /// Lowercase hex SHA-256 of the plane bytes.
    pub sha256: String,
    /// Number of bytes.
    pub byte_length: u64,
    /// 1: the plane as scanned. n > 1: a partner's share of the plane
    /// averaged over n x n blocks, stored as a 16-bit PNG.
    pub downsampled: u32,
}

impl PlaneDigest {
    /// A plane as scanned.
    pub fn full(sha256: String, byte_length: u64) -> Self {
        PlaneDigest { sha256, byte_length, downsampled: 1 }
    }
}

/// A complete, durable scan.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanRecord {
    /// Canonical hyphenated UUID.
    pub scan_id: String,
    /// The header as pushed (descriptors' `sha256` filled with the real digests).
    pub header: ScanHeader,
    /// Per plane, in order.
    pub planes: Vec<PlaneDigest>,
    /// SHA-256 of the normalised header: with the planes' digests, it tells
    /// a duplicate push from a different scan under the same id.
    pub header_sha256: String,
    /// Where the scan is in its lifecycle.
    pub status: ScanStatus,
    /// When the server committed it.
    pub received_at: SystemTime,
    /// Decision of the latest MACHINE report (`AlarmDecision` value, 0 if none).
    pub decision: i32,
    /// Score of the latest MACHINE report.
    pub score: Option<f32>,
    /// Empty for this administration's scans; the issuing administration's
    /// id for a scan received from a partner.
    pub origin: String,
}

impl ScanRecord {
    /// The scan time the listing orders by: the scanner's, else the receipt's.
    pub fn sort_time(&self) -> SystemTime {
        self.header
            .metadata
            .as_ref()
            .and_then(|m| m.scan_time.as_ref())
            .map(|t| {
                std::time::UNIX_EPOCH
                    + std::time::Duration::new(t.seconds.max(0) as u64, t.nanos.clamp(0, 999_999_999) as u32)
            })
            .unwrap_or(self.received_at)
    }
}

/// An upload that has started and not yet completed.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingUpload {
    /// Canonical hyphenated UUID.
    pub scan_id: String,
    /// The header of the first attempt; a resume must send the same one.
    pub header: ScanHeader,
    /// SHA-256 of the normalised header.
    pub header_sha256: String,
    /// When the first attempt started.
    pub started_at: SystemTime,
}

/// What [`MetadataStore::commit_scan`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum CommitOutcome {
    /// The scan is now stored.
    Committed,
    /// A scan with that id was already stored; here it is.
    Existing(Box<ScanRecord>),
}

/// Which scans [`MetadataStore::list_scans`] returns, newest scan time first.
#[derive(Debug, Clone, Default)]
pub struct ScanQuery {
    /// At most this many.
    pub limit: usize,
    /// Only scans strictly after this (scan time, scan_id) position in the order.
    pub before: Option<(SystemTime, String)>,
    /// Only this site.
    pub site_id: Option<String>,
    /// Only sites these scope entries cover (see [`crate::scope::covers`]).
    pub sites: Option<Vec<String>>,
    /// Only this lane.
    pub lane_id: Option<String>,
    /// Only this status.
    pub status: Option<ScanStatus>,
    /// Only scans received at or after this time.
    pub received_after: Option<SystemTime>,
    /// Only scans scanned at or after this time.
    pub scan_time_from: Option<SystemTime>,
    /// Only scans scanned before this time.
    pub scan_time_to: Option<SystemTime>,
    /// Only this decision of the latest MACHINE report (`AlarmDecision` value).
    pub decision: Option<i32>,
    /// Only scans whose latest MACHINE score is at least this.
    pub min_score: Option<f32>,
    /// Only scans with this container number.
    pub container_number: Option<String>,
    /// Only scans with this declaration reference value.
    pub declaration_reference: Option<String>,
    /// Only scans with this vehicle plate, as [`plate_key`] writes it.
    pub vehicle_plate: Option<String>,
}

/// A vehicle plate as the store indexes and compares it: its letters and
/// digits, upper case ("ab-123 c" and "AB-123-C" are both `AB123C`).
pub fn plate_key(plate: &str) -> String {
    plate.chars().filter(|c| c.is_alphanumeric()).flat_map(char::to_uppercase).collect()
}

/// One audited action, before it is chained.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// When.
    pub at: SystemTime,
    /// Who (an identity from the auth configuration, or `local@<peer>`).
    pub identity: String,
    /// In which role.
    pub role: String,
    /// What: the RPC or command, e.g. `PushScan`.
    pub action: String,
    /// On what: a scan id, a package id, a config file; empty if none.
    pub object: String,
    /// `OK` or the gRPC status code name of the refusal.
    pub outcome: String,
}

/// A chained audit record.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// Position in the log, from 1, without gaps.
    pub seq: u64,
    /// The action.
    pub entry: AuditEntry,
    /// SHA-256 of the previous record (64 zeros for the first).
    pub prev_sha256: String,
    /// SHA-256 of this record: see `audit::record_hash`.
    pub sha256: String,
}

/// A verified package received from a partner administration.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedPackage {
    /// Its id (`<issuer>.<recipient>.<sequence>`).
    pub package_id: String,
    /// The issuing administration.
    pub issuer: String,
    /// Its sequence in the issuer's feed.
    pub sequence: u64,
    /// The scan it is about.
    pub scan_id: String,
    /// SHA-256 of the encoded signed package, kept in the blob store.
    pub package_sha256: String,
}

/// What [`MetadataStore::receive_package`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum ReceiveOutcome {
    /// Stored now.
    Stored,
    /// The same package was stored before; nothing changed.
    Duplicate,
    /// It contradicts what is stored (why); nothing changed.
    Conflict(String),
}

/// Where pushing packages to one partner stands.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboxState {
    /// Every entitled package up to this event sequence was acknowledged.
    pub delivered: u64,
    /// Failed attempts since the last delivery.
    pub attempts: u32,
    /// The last failure, empty after a delivery.
    pub last_error: String,
}

/// A stored report, as the findings watch delivers it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Position in the event log (the watch cursor).
    pub seq: u64,
    /// The scan.
    pub scan_id: String,
    /// Its site.
    pub site_id: String,
    /// Its status now.
    pub status: ScanStatus,
    /// The report stored.
    pub report: ThreatReport,
    /// When.
    pub at: SystemTime,
}

/// Scan metadata and upload bookkeeping.
pub trait MetadataStore: Send + Sync + 'static {
    /// Stores a complete scan and forgets its pending upload, atomically.
    fn commit_scan(&self, scan: &ScanRecord) -> StoreResult<CommitOutcome>;
    /// One scan by id.
    fn get_scan(&self, scan_id: &str) -> StoreResult<Option<ScanRecord>>;
    /// Scans matching `query`, newest first.
    fn list_scans(&self, query: &ScanQuery) -> StoreResult<Vec<ScanRecord>>;
    /// Records the start of an upload (no-op if already recorded).
    fn put_upload(&self, upload: &PendingUpload) -> StoreResult<()>;
    /// An unfinished upload by id.
    fn get_upload(&self, scan_id: &str) -> StoreResult<Option<PendingUpload>>;
    /// Forgets an unfinished upload; true if there was one.
    fn delete_upload(&self, scan_id: &str) -> StoreResult<bool>;
    /// Unfinished uploads started before `cutoff`.
    fn uploads_started_before(&self, cutoff: SystemTime) -> StoreResult<Vec<String>>;
    /// Marks the oldest QUEUED scan ANALYZING and returns its id, atomically
    /// (two workers never take the same scan).
    fn claim_next_queued(&self) -> StoreResult<Option<String>>;
    /// Puts scans left ANALYZING (by a crash or shutdown) back in the queue;
    /// returns how many.
    fn requeue_interrupted(&self) -> StoreResult<usize>;
    /// How many scans have this status.
    fn count_status(&self, status: ScanStatus) -> StoreResult<u64>;
    /// Appends a report to a scan (and sets the scan's status, if given),
    /// atomically, and logs it as an event. Reports are never changed or
    /// removed. Returns the event's sequence number.
    fn add_report(&self, scan_id: &str, report: &ThreatReport, status: Option<ScanStatus>) -> StoreResult<u64>;
    /// Events after `cursor`, oldest first, at most `limit`, optionally of one site.
    fn events_after(&self, cursor: u64, site_id: Option<&str>, limit: usize) -> StoreResult<Vec<StoredEvent>>;
    /// Sequence number of the newest event (0 if none).
    fn last_event(&self) -> StoreResult<u64>;
    /// Appends to the audit log, chaining the record to the one before.
    fn append_audit(&self, entry: &AuditEntry) -> StoreResult<AuditRecord>;
    /// Appends records in this order in one transaction made durable once
    /// (group commit): all are stored or, on an error, none.
    fn append_audit_group(&self, entries: &[AuditEntry]) -> StoreResult<Vec<AuditRecord>>;
    /// A scan whose header, plane digests and reports all match their seals
    /// in the audit chain; `Tampered` naming the first that does not.
    fn verify_scan(&self, scan_id: &str) -> StoreResult<ScanRecord>;
    /// Every scan id, in the order stored.
    fn scan_ids(&self) -> StoreResult<Vec<String>>;
    /// Audit records after `seq`, in order, at most `limit`.
    fn audit_records(&self, after_seq: u64, limit: usize) -> StoreResult<Vec<AuditRecord>>;
    /// The newest `n` audit records, oldest first.
    fn audit_tail(&self, n: usize) -> StoreResult<Vec<AuditRecord>>;
    /// A scan's reports, oldest first.
    fn reports(&self, scan_id: &str) -> StoreResult<Vec<ThreatReport>>;
    /// Stores a verified partner package atomically: creates the foreign
    /// `scan` on its first package (or adds its planes if it had none),
    /// appends `reports` as events, and remembers the package id, so a
    /// package delivered twice changes nothing.
    fn receive_package(
        &self,
        package: &ReceivedPackage,
        scan: &ScanRecord,
        reports: &[ThreatReport],
    ) -> StoreResult<ReceiveOutcome>;
    /// The packages received about a scan.
    fn received_packages(&self, scan_id: &str) -> StoreResult<Vec<ReceivedPackage>>;
    /// Where pushing to `partner` stands (all zero if never pushed).
    fn outbox(&self, partner: &str) -> StoreResult<OutboxState>;
    /// Records that `partner` acknowledged everything up to event `seq`.
    fn outbox_delivered(&self, partner: &str, seq: u64) -> StoreResult<()>;
    /// Records a failed push; returns the failed attempts since the last delivery.
    fn outbox_failed(&self, partner: &str, error: &str) -> StoreResult<u32>;
}

/// Re-hashes a stored plane; `Tampered` if its bytes no longer match the
/// digest recorded when it was stored.
pub fn check_plane(blobs: &dyn BlobStore, scan_id: &str, index: usize, plane: &PlaneDigest) -> StoreResult<()> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let n = crate::digest::hash_from(&mut hasher, blobs.open(&plane.sha256)?)
        .map_err(|e| StoreError::io(format!("re-reading plane {index} of scan {scan_id}"), e))?;
    let got = hex::encode(hasher.finalize());
    if got != plane.sha256 || n != plane.byte_length {
        return Err(StoreError::Tampered(format!(
            "the stored bytes of plane {index} of scan {scan_id} ({n} bytes, sha256 {got}) differ from the {} bytes \
             with sha256 {} received",
            plane.byte_length, plane.sha256
        )));
    }
    Ok(())
}

/// Bytes that can be read from any position.
pub trait ReadSeek: Read + Seek + Send {}
impl<T: Read + Seek + Send> ReadSeek for T {}

/// An append-only handle on the staged bytes of one plane.
pub trait StagedWriter: Write + Send {
    /// Makes everything written so far durable.
    fn sync(&mut self) -> StoreResult<()>;
}

/// Plane bytes: staged while an upload runs, then content-addressed.
pub trait BlobStore: Send + Sync + 'static {
    /// Bytes held so far for one plane of an unfinished upload (0 if none).
    fn staged_len(&self, scan_id: &str, plane: u32) -> StoreResult<u64>;
    /// Opens a plane of an unfinished upload for appending, creating it if needed.
    fn append_staged(&self, scan_id: &str, plane: u32) -> StoreResult<Box<dyn StagedWriter>>;
    /// Reads the staged bytes of a plane (for validation or re-hashing).
    fn read_staged(&self, scan_id: &str, plane: u32) -> StoreResult<Box<dyn ReadSeek>>;
    /// Makes a staged plane durable under its digest. Idempotent: content that
    /// is already stored is not written twice.
    fn promote(&self, scan_id: &str, plane: u32, sha256: &str) -> StoreResult<()>;
    /// Deletes everything staged for an upload.
    fn discard_staged(&self, scan_id: &str) -> StoreResult<()>;
    /// Ids of uploads with staged bytes.
    fn staged_uploads(&self) -> StoreResult<Vec<String>>;
    /// Opens a stored blob.
    fn open(&self, sha256: &str) -> StoreResult<Box<dyn ReadSeek>>;
    /// Size of a stored blob, if present.
    fn blob_len(&self, sha256: &str) -> StoreResult<Option<u64>>;
    /// Stores small bytes (e.g. an anomaly map) durably; returns their digest.
    fn put_blob(&self, bytes: &[u8]) -> StoreResult<String>;
    /// Bytes still free for new data where the blobs live, if the store can
    /// tell (`None` for a store without a local disk).
    fn free_bytes(&self) -> StoreResult<Option<u64>>;
}
