//! [`MetadataStore`] in an embedded SQLite database (WAL, synchronous=FULL).
//!
//! The schema is versioned with `PRAGMA user_version`; [`MIGRATIONS`] are
//! applied in order at open, each in its own transaction.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use niix_proto::v1::{ReportType, ScanHeader, ScanStatus, ThreatReport};
use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    AuditEntry, AuditRecord, CommitOutcome, MetadataStore, OutboxState, PendingUpload, PlaneDigest, ReceiveOutcome,
    ReceivedPackage, ScanQuery, ScanRecord, StoreError, StoreResult, StoredEvent, plate_key,
};

/// Schema migrations, oldest first. Never edit one that has shipped: append.
const MIGRATIONS: &[&str] = &[
    // 1: scans, their planes, unfinished uploads.
    "CREATE TABLE scans (
        scan_id        TEXT PRIMARY KEY,
        site_id        TEXT NOT NULL,
        lane_id        TEXT NOT NULL,
        scan_time_us   INTEGER,
        conveyance     INTEGER NOT NULL,
        status         INTEGER NOT NULL,
        received_at_us INTEGER NOT NULL,
        header_sha256  TEXT NOT NULL,
        header         BLOB NOT NULL
    ) STRICT;
    CREATE INDEX scans_by_received ON scans (received_at_us DESC, scan_id DESC);
    CREATE INDEX scans_by_site ON scans (site_id, received_at_us DESC, scan_id DESC);
    CREATE TABLE planes (
        scan_id     TEXT NOT NULL REFERENCES scans (scan_id) ON DELETE CASCADE,
        idx         INTEGER NOT NULL,
        sha256      TEXT NOT NULL,
        byte_length INTEGER NOT NULL,
        PRIMARY KEY (scan_id, idx)
    ) STRICT;
    CREATE INDEX planes_by_digest ON planes (sha256);
    CREATE TABLE uploads (
        scan_id       TEXT PRIMARY KEY,
        header_sha256 TEXT NOT NULL,
        header        BLOB NOT NULL,
        started_at_us INTEGER NOT NULL
    ) STRICT;",
    // 2: threat detection reports; the analysis queue is the scans' status.
    "CREATE TABLE reports (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        scan_id       TEXT NOT NULL REFERENCES scans (scan_id) ON DELETE CASCADE,
        report_type   INTEGER NOT NULL,
        created_at_us INTEGER NOT NULL,
        report        BLOB NOT NULL
    ) STRICT;
    CREATE INDEX reports_by_scan ON reports (scan_id, seq);
    CREATE INDEX scans_by_status ON scans (status, received_at_us, scan_id);",
    // 3: officer queries (ordered by scan time), the latest machine decision,
    // container and declaration look-ups, and the event log the watch reads.
    "ALTER TABLE scans ADD COLUMN decision INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE scans ADD COLUMN score REAL;
    UPDATE scans SET scan_time_us = received_at_us WHERE scan_time_us IS NULL;
    CREATE INDEX scans_by_time ON scans (scan_time_us DESC, scan_id DESC);
    CREATE INDEX scans_by_site_time ON scans (site_id, scan_time_us DESC, scan_id DESC);
    CREATE INDEX scans_by_lane_time ON scans (lane_id, scan_time_us DESC, scan_id DESC);
    CREATE INDEX scans_by_decision_time ON scans (decision, scan_time_us DESC, scan_id DESC);
    CREATE TABLE scan_containers (
        number  TEXT NOT NULL,
        scan_id TEXT NOT NULL REFERENCES scans (scan_id) ON DELETE CASCADE,
        PRIMARY KEY (number, scan_id)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE scan_declarations (
        reference TEXT NOT NULL,
        scan_id   TEXT NOT NULL REFERENCES scans (scan_id) ON DELETE CASCADE,
        PRIMARY KEY (reference, scan_id)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE events (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        scan_id       TEXT NOT NULL REFERENCES scans (scan_id) ON DELETE CASCADE,
        report_seq    INTEGER NOT NULL REFERENCES reports (seq),
        created_at_us INTEGER NOT NULL
    ) STRICT;",
    // 4: the hash-chained audit log (append-only; see audit.rs).
    "CREATE TABLE audit (
        seq         INTEGER PRIMARY KEY,
        at_us       INTEGER NOT NULL,
        identity    TEXT NOT NULL,
        role        TEXT NOT NULL,
        action      TEXT NOT NULL,
        object      TEXT NOT NULL,
        outcome     TEXT NOT NULL,
        prev_sha256 TEXT NOT NULL,
        sha256      TEXT NOT NULL
    ) STRICT;",
    // 5: federation: scans received from partner administrations (their
    // origin, planes held downsampled), the packages received, and the
    // per-partner outbox cursor of packages pushed.
    "ALTER TABLE scans ADD COLUMN origin TEXT NOT NULL DEFAULT '';
    ALTER TABLE planes ADD COLUMN downsampled INTEGER NOT NULL DEFAULT 1;
    CREATE TABLE received_packages (
        package_id     TEXT PRIMARY KEY,
        issuer         TEXT NOT NULL,
        sequence       INTEGER NOT NULL,
        scan_id        TEXT NOT NULL REFERENCES scans (scan_id) ON DELETE CASCADE,
        package_sha256 TEXT NOT NULL,
        received_at_us INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX received_by_scan ON received_packages (scan_id);
    CREATE TABLE outbox (
        partner       TEXT PRIMARY KEY,
        delivered_seq INTEGER NOT NULL,
        attempts      INTEGER NOT NULL,
        last_error    TEXT NOT NULL,
        updated_at_us INTEGER NOT NULL
    ) STRICT;",
    // 6: seals: reports and scans (header and plane digests) are recorded in
    // the audit chain as they are stored (see `seal_report`, `seal_scan`);
    // this index finds an object's seal. Rows stored before are sealed by
    // the migration.
    "CREATE INDEX audit_by_object ON audit (object, seq);",
    // 7: officers find a scan by its vehicle plate (letters and digits,
    // upper case: `plate_key`); scans stored before are indexed by the
    // migration.
    "CREATE TABLE scan_plates (
        plate   TEXT NOT NULL,
        scan_id TEXT NOT NULL REFERENCES scans (scan_id) ON DELETE CASCADE,
        PRIMARY KEY (plate, scan_id)
    ) STRICT, WITHOUT ROWID;",
];

/// Identity and role of the records the server writes about itself.
const SYSTEM: (&str, &str) = ("niix", "system");
/// Action of the record that seals a stored report.
pub const SEAL_REPORT: &str = "SealReport";
/// Action of the record that seals a scan's header and plane digests.
pub const SEAL_SCAN: &str = "SealScan";

/// Work a migration needs beyond SQL, run in the same transaction. Work on
/// every stored scan or report goes through [`in_batches`], so a migration
/// holds one batch of rows in memory, not the table.
fn after_migration(tx: &rusqlite::Transaction<'_>, version: usize) -> StoreResult<()> {
    if version == 3 {
        // Index the container numbers and declarations of scans stored before.
        in_batches(tx, "scans", &["scan_id", "header"], scan_header, |(id, header)| {
            index_lookups(tx, &id, &decode_header(&header)?)
        })?;
        // The latest machine decision of scans analysed before (reports in
        // the order they were stored: the last one wins).
        in_batches(tx, "reports", &["scan_id", "report"], scan_header, |(id, bytes)| {
            let report = ThreatReport::decode(bytes.as_slice())
                .map_err(|e| StoreError::Corrupt(format!("stored report: {e}")))?;
            if report.r#type == ReportType::Machine as i32 {
                tx.execute(
                    "UPDATE scans SET decision = ?1, score = ?2 WHERE scan_id = ?3",
                    params![report.decision, f64::from(report.score), id],
                )?;
            }
            Ok(())
        })?;
    }
    if version == 6 {
        in_batches(
            tx,
            "scans",
            &["scan_id"],
            |r| r.get::<_, String>(0),
            |id| {
                let scan = scan_in(tx, &id)?.ok_or_else(|| StoreError::Corrupt(format!("scan {id} vanished")))?;
                seal_scan(tx, &scan)
            },
        )?;
        in_batches(
            tx,
            "reports",
            &["seq", "scan_id", "report"],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?)),
            |(seq, id, bytes)| seal_report(tx, &id, seq, &bytes),
        )?;
    }
    if version == 7 {
        in_batches(tx, "scans", &["scan_id", "header"], scan_header, |(id, header)| {
            index_plate(tx, &id, &decode_header(&header)?)
        })?;
    }
    Ok(())
}

/// Rows a migration reads into memory at once ([`in_batches`]).
const MIGRATION_BATCH: usize = 256;

/// A `(text, blob)` row: a scan id and its encoded header (or report).
fn scan_header(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, Vec<u8>)> {
    Ok((r.get(0)?, r.get(1)?))
}

/// Calls `each` on every row of `table` in rowid order, reading
/// [`MIGRATION_BATCH`] rows at a time (by rowid, so `each` may write to the
/// table): `row` maps the `columns` (indexes 0.. in that order). Returns
/// how many batches were read.
fn in_batches<T>(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    columns: &[&str],
    row: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    mut each: impl FnMut(T) -> StoreResult<()>,
) -> StoreResult<usize> {
    let rowid = columns.len();
    let sql = format!("SELECT {}, rowid FROM {table} WHERE rowid > ?1 ORDER BY rowid LIMIT ?2", columns.join(", "));
    let mut stmt = tx.prepare(&sql)?;
    let (mut after, mut batches) = (i64::MIN, 0);
    loop {
        let batch: Vec<(i64, T)> = stmt
            .query_map(params![after, MIGRATION_BATCH as i64], |r| Ok((r.get(rowid)?, row(r)?)))?
            .collect::<Result<_, _>>()?;
        let (len, last) = (batch.len(), batch.last().map(|(id, _)| *id));
        batches += 1;
        for (_, t) in batch {
            each(t)?;
        }
        match last {
            Some(last) if len == MIGRATION_BATCH => after = last,
            _ => return Ok(batches),
        }
    }
}

/// Rows that let officers find a scan by container number or declaration.
fn index_lookups(tx: &rusqlite::Transaction<'_>, scan_id: &str, header: &ScanHeader) -> StoreResult<()> {
    let meta = header.metadata.clone().unwrap_or_default();
    for n in &meta.container_numbers {
        tx.execute("INSERT OR IGNORE INTO scan_containers (number, scan_id) VALUES (?1, ?2)", params![n, scan_id])?;
    }
    for d in &meta.declarations {
        tx.execute(
            "INSERT OR IGNORE INTO scan_declarations (reference, scan_id) VALUES (?1, ?2)",
            params![d.value, scan_id],
        )?;
    }
    Ok(())
}

/// The row that lets officers find a scan by its vehicle plate (schema 7 on).
fn index_plate(tx: &rusqlite::Transaction<'_>, scan_id: &str, header: &ScanHeader) -> StoreResult<()> {
    let plate = plate_key(header.metadata.as_ref().map(|m| m.vehicle_plate.as_str()).unwrap_or_default());
    if !plate.is_empty() {
        tx.execute("INSERT OR IGNORE INTO scan_plates (plate, scan_id) VALUES (?1, ?2)", params![plate, scan_id])?;
    }
    Ok(())
}

/// Read-only connections kept beside the writer: in WAL mode readers do not
/// block each other or the writer, so queries from many officers run in
/// parallel.
/// The scan with this id, read inside a transaction.
fn scan_in(tx: &rusqlite::Transaction<'_>, scan_id: &str) -> StoreResult<Option<ScanRecord>> {
    let row = tx
        .query_row(&format!("SELECT {SCAN_COLUMNS} FROM scans WHERE scan_id = ?1"), [scan_id], raw_scan)
        .optional()?;
    row.map(|r| SqliteMetadata::row_to_record(tx, r)).transpose()
}

/// Inserts a new scan row with its planes and look-up rows.
fn insert_scan(tx: &rusqlite::Transaction<'_>, scan: &ScanRecord) -> StoreResult<()> {
    let meta = scan.header.metadata.clone().unwrap_or_default();
    tx.execute(
        "INSERT INTO scans (scan_id, site_id, lane_id, scan_time_us, conveyance, status, received_at_us, header_sha256,
                            header, decision, score, origin)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            scan.scan_id,
            meta.site_id,
            meta.lane_id,
            micros(scan.sort_time()),
            meta.conveyance,
            scan.status as i32,
            micros(scan.received_at),
            scan.header_sha256,
            scan.header.encode_to_vec(),
            scan.decision,
            scan.score.map(f64::from),
            scan.origin,
        ],
    )?;
    insert_planes(tx, scan)?;
    seal_scan(tx, scan)?;
    index_lookups(tx, &scan.scan_id, &scan.header)?;
    index_plate(tx, &scan.scan_id, &scan.header)
}

fn insert_planes(tx: &rusqlite::Transaction<'_>, scan: &ScanRecord) -> StoreResult<()> {
    for (i, p) in scan.planes.iter().enumerate() {
        tx.execute(
            "INSERT INTO planes (scan_id, idx, sha256, byte_length, downsampled) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![scan.scan_id, i as i64, p.sha256, p.byte_length as i64, p.downsampled],
        )?;
    }
    Ok(())
}

/// The object of a report's seal.
fn report_object(scan_id: &str, report_seq: i64) -> String {
    format!("{scan_id} report {report_seq}")
}

/// The outcome a seal records: the digest of what it seals.
fn seal_outcome(sha256: &str) -> String {
    format!("sha256={sha256}")
}

/// The digest a scan's seal covers: its stored header and every plane's
/// digest, length and sampling, in order.
pub fn scan_seal_digest(scan: &ScanRecord) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"niix-scan-seal-v1");
    let header = scan.header.encode_to_vec();
    h.update((header.len() as u64).to_be_bytes());
    h.update(&header);
    h.update(scan.origin.as_bytes());
    h.update([0]);
    for p in &scan.planes {
        h.update(p.sha256.as_bytes());
        h.update(p.byte_length.to_be_bytes());
        h.update(p.downsampled.to_be_bytes());
    }
    hex::encode(h.finalize())
}

/// Records what a stored report is in the audit chain.
fn seal_report(tx: &rusqlite::Transaction<'_>, scan_id: &str, report_seq: i64, bytes: &[u8]) -> StoreResult<()> {
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(bytes));
    append_audit_in(tx, &system_entry(SEAL_REPORT, report_object(scan_id, report_seq), seal_outcome(&digest)))?;
    Ok(())
}

/// Records a stored scan's header and plane digests in the audit chain.
fn seal_scan(tx: &rusqlite::Transaction<'_>, scan: &ScanRecord) -> StoreResult<()> {
    let entry = system_entry(SEAL_SCAN, scan.scan_id.clone(), seal_outcome(&scan_seal_digest(scan)));
    append_audit_in(tx, &entry)?;
    Ok(())
}

fn system_entry(action: &str, object: String, outcome: String) -> AuditEntry {
    AuditEntry {
        at: SystemTime::now(),
        identity: SYSTEM.0.into(),
        role: SYSTEM.1.into(),
        action: action.into(),
        object,
        outcome,
    }
}

/// The newest seal of `object`, checked against its own hash (a seal edited
/// in place is no seal). `Tampered` if there is none or it was edited.
fn seal_of(conn: &Connection, action: &str, object: &str) -> StoreResult<String> {
    let record = conn
        .prepare_cached(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit WHERE object = ?1 AND action = ?2 ORDER BY seq DESC LIMIT 1"
        ))?
        .query_row(params![object, action], audit_row)
        .optional()?
        .ok_or_else(|| {
            StoreError::Tampered(format!("{object} has no seal in the audit log: it was not stored by niix"))
        })?;
    if crate::audit::record_hash(record.seq, &record.entry, &record.prev_sha256) != record.sha256 {
        return Err(StoreError::Tampered(format!("the seal of {object} (audit record {}) was edited", record.seq)));
    }
    record
        .entry
        .outcome
        .strip_prefix("sha256=")
        .map(str::to_string)
        .ok_or_else(|| StoreError::Tampered(format!("the seal of {object} (audit record {}) is malformed", record.seq)))
}

/// Appends a report (and its event), updating the scan's status and latest
/// machine decision; returns the event's sequence number.
fn insert_report(
    tx: &rusqlite::Transaction<'_>,
    scan_id: &str,
    report: &ThreatReport,
    status: Option<ScanStatus>,
) -> StoreResult<u64> {
    let now = micros(SystemTime::now());
    tx.execute(
        "INSERT INTO reports (scan_id, report_type, created_at_us, report) VALUES (?1, ?2, ?3, ?4)",
        params![scan_id, report.r#type, now, report.encode_to_vec()],
    )?;
    let report_seq = tx.last_insert_rowid();
    seal_report(tx, scan_id, report_seq, &report.encode_to_vec())?;
    if let Some(status) = status {
        tx.execute("UPDATE scans SET status = ?1 WHERE scan_id = ?2", params![status as i32, scan_id])?;
    }
    if report.r#type == ReportType::Machine as i32 {
        tx.execute(
            "UPDATE scans SET decision = ?1, score = ?2 WHERE scan_id = ?3",
            params![report.decision, f64::from(report.score), scan_id],
        )?;
    }
    tx.execute(
        "INSERT INTO events (scan_id, report_seq, created_at_us) VALUES (?1, ?2, ?3)",
        params![scan_id, report_seq, now],
    )?;
    Ok(tx.last_insert_rowid() as u64)
}

const READERS: usize = 4;

/// Scan metadata in SQLite.
pub struct SqliteMetadata {
    conn: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: std::sync::atomic::AtomicUsize,
}

fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

fn from_micros(us: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us.max(0) as u64)
}

fn decode_header(bytes: &[u8]) -> StoreResult<ScanHeader> {
    ScanHeader::decode(bytes).map_err(|e| StoreError::Corrupt(format!("stored scan header: {e}")))
}

impl SqliteMetadata {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let conn = Connection::open(path)?;
        let mut db = Self::init(conn)?;
        for _ in 0..READERS {
            let reader = Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            reader.busy_timeout(Duration::from_secs(5))?;
            db.readers.push(Mutex::new(reader));
        }
        Ok(db)
    }

    /// An in-memory database, for tools and tests that need no persistence.
    pub fn in_memory() -> StoreResult<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> StoreResult<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(SqliteMetadata { conn: Mutex::new(conn), readers: Vec::new(), next_reader: Default::default() })
    }

    /// A connection for queries: a free reader if there is one, else the
    /// next in turn (or the writer, for an in-memory database).
    fn read(&self) -> std::sync::MutexGuard<'_, Connection> {
        if self.readers.is_empty() {
            return self.lock();
        }
        for r in &self.readers {
            if let Ok(guard) = r.try_lock() {
                return guard;
            }
        }
        let i = self.next_reader.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.readers.len();
        self.readers[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The schema version in force.
    pub fn schema_version(&self) -> StoreResult<u32> {
        Ok(self.lock().pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (transactions roll back), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn planes_of(conn: &Connection, scan_id: &str) -> StoreResult<Vec<PlaneDigest>> {
        let mut stmt =
            conn.prepare_cached("SELECT sha256, byte_length, downsampled FROM planes WHERE scan_id = ?1 ORDER BY idx")?;
        let rows = stmt.query_map([scan_id], |r| {
            Ok(PlaneDigest { sha256: r.get(0)?, byte_length: r.get::<_, i64>(1)? as u64, downsampled: r.get(2)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn row_to_record(conn: &Connection, row: RawScan) -> StoreResult<ScanRecord> {
        let planes = Self::planes_of(conn, &row.scan_id)?;
        Ok(ScanRecord {
            header: decode_header(&row.header)?,
            planes,
            header_sha256: row.header_sha256,
            status: ScanStatus::try_from(row.status).unwrap_or(ScanStatus::Unspecified),
            received_at: from_micros(row.received_at_us),
            decision: row.decision,
            score: row.score.map(|s| s as f32),
            scan_id: row.scan_id,
            origin: row.origin,
        })
    }
}

struct RawScan {
    scan_id: String,
    status: i32,
    received_at_us: i64,
    header_sha256: String,
    header: Vec<u8>,
    decision: i32,
    score: Option<f64>,
    origin: String,
}

const SCAN_COLUMNS: &str = "scan_id, status, received_at_us, header_sha256, header, decision, score, origin";

fn raw_scan(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawScan> {
    Ok(RawScan {
        scan_id: r.get(0)?,
        status: r.get(1)?,
        received_at_us: r.get(2)?,
        header_sha256: r.get(3)?,
        header: r.get(4)?,
        decision: r.get(5)?,
        score: r.get(6)?,
        origin: r.get(7)?,
    })
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let current: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current as usize > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "database schema version {current} is newer than this niix understands ({}); upgrade niix",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        after_migration(&tx, i + 1)?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "applied metadata schema migration");
    }
    Ok(())
}

const AUDIT_COLUMNS: &str = "seq, at_us, identity, role, action, object, outcome, prev_sha256, sha256";

fn audit_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRecord> {
    Ok(AuditRecord {
        seq: r.get::<_, i64>(0)? as u64,
        entry: AuditEntry {
            at: from_micros(r.get(1)?),
            identity: r.get(2)?,
            role: r.get(3)?,
            action: r.get(4)?,
            object: r.get(5)?,
            outcome: r.get(6)?,
        },
        prev_sha256: r.get(7)?,
        sha256: r.get(8)?,
    })
}

/// Appends one record to the chain inside `tx`.
fn append_audit_in(tx: &rusqlite::Transaction<'_>, entry: &AuditEntry) -> StoreResult<AuditRecord> {
    let last: Option<(i64, String)> = tx
        .query_row("SELECT seq, sha256 FROM audit ORDER BY seq DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (prev_seq, prev_sha256) = last.unwrap_or((0, crate::audit::GENESIS.to_string()));
    let seq = prev_seq as u64 + 1;
    // Times are kept to the microsecond, as stored, so the hash re-computes.
    let entry = AuditEntry { at: from_micros(micros(entry.at)), ..entry.clone() };
    let sha256 = crate::audit::record_hash(seq, &entry, &prev_sha256);
    tx.execute(
        &format!("INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
        params![
            seq as i64,
            micros(entry.at),
            entry.identity,
            entry.role,
            entry.action,
            entry.object,
            entry.outcome,
            prev_sha256,
            sha256
        ],
    )?;
    Ok(AuditRecord { seq, entry, prev_sha256, sha256 })
}

/// The `WHERE` clause (one `?`: the value) keeping the scans that have
/// `value` in the look-up table `table` (container numbers, declarations).
/// A value of few scans is looked up and its scans sorted (`IN`); a value of
/// many scans (a container seen at every lane) is checked row by row while
/// the scans are walked newest first, which stops after `limit` matches
/// instead of sorting every one (`EXISTS`). The switch is where both cost
/// about the same, `matches^2 = limit * scans`, so either way a page reads
/// at most about `sqrt(limit * scans)` rows.
fn lookup_filter(conn: &Connection, table: &str, column: &str, value: &str, limit: usize) -> StoreResult<String> {
    let scans: i64 = conn.prepare_cached("SELECT ifnull(max(rowid), 0) FROM scans")?.query_row([], |r| r.get(0))?;
    let many = ((limit.max(1) as f64) * (scans.max(0) as f64)).sqrt().ceil() as i64;
    let matches: i64 = conn
        .prepare_cached(&format!("SELECT count(*) FROM (SELECT 1 FROM {table} WHERE {column} = ?1 LIMIT ?2)"))?
        .query_row(params![value, many + 1], |r| r.get(0))?;
    Ok(if matches > many {
        format!("EXISTS (SELECT 1 FROM {table} l WHERE l.{column} = ? AND l.scan_id = scans.scan_id)")
    } else {
        format!("scan_id IN (SELECT scan_id FROM {table} WHERE {column} = ?)")
    })
}

impl MetadataStore for SqliteMetadata {
    fn append_audit(&self, entry: &AuditEntry) -> StoreResult<AuditRecord> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let record = append_audit_in(&tx, entry)?;
        tx.commit()?;
        Ok(record)
    }

    fn append_audit_group(&self, entries: &[AuditEntry]) -> StoreResult<Vec<AuditRecord>> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let records = entries.iter().map(|e| append_audit_in(&tx, e)).collect::<StoreResult<Vec<_>>>()?;
        tx.commit()?;
        Ok(records)
    }

    fn verify_scan(&self, scan_id: &str) -> StoreResult<ScanRecord> {
        let conn = self.read();
        let row = conn
            .query_row(&format!("SELECT {SCAN_COLUMNS} FROM scans WHERE scan_id = ?1"), [scan_id], raw_scan)
            .optional()?
            .ok_or_else(|| StoreError::Tampered(format!("scan {scan_id} is gone")))?;
        let scan = Self::row_to_record(&conn, row)?;
        if seal_of(&conn, SEAL_SCAN, scan_id)? != scan_seal_digest(&scan) {
            return Err(StoreError::Tampered(format!(
                "the stored header or plane digests of scan {scan_id} differ from what was sealed when it was stored"
            )));
        }
        let rows: Vec<(i64, Vec<u8>)> = conn
            .prepare_cached("SELECT seq, report FROM reports WHERE scan_id = ?1 ORDER BY seq")?
            .query_map([scan_id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (seq, bytes) in rows {
            use sha2::Digest;
            let object = report_object(scan_id, seq);
            if seal_of(&conn, SEAL_REPORT, &object)? != hex::encode(sha2::Sha256::digest(&bytes)) {
                return Err(StoreError::Tampered(format!(
                    "{object} differs from what was sealed when it was stored (edited in the database)"
                )));
            }
        }
        Ok(scan)
    }

    fn scan_ids(&self) -> StoreResult<Vec<String>> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached("SELECT scan_id FROM scans ORDER BY rowid")?;
        let ids = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(ids)
    }

    fn audit_records(&self, after_seq: u64, limit: usize) -> StoreResult<Vec<AuditRecord>> {
        let conn = self.read();
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2"))?;
        let rows = stmt.query_map(params![after_seq as i64, limit as i64], audit_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn audit_tail(&self, n: usize) -> StoreResult<Vec<AuditRecord>> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {AUDIT_COLUMNS} FROM (SELECT * FROM audit ORDER BY seq DESC LIMIT ?1) ORDER BY seq"
        ))?;
        let rows = stmt.query_map(params![n as i64], audit_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn claim_next_queued(&self) -> StoreResult<Option<String>> {
        let id = self
            .lock()
            .query_row(
                "UPDATE scans SET status = ?1 WHERE scan_id = (
                     SELECT scan_id FROM scans WHERE status = ?2 ORDER BY received_at_us, scan_id LIMIT 1)
                 RETURNING scan_id",
                params![ScanStatus::Analyzing as i32, ScanStatus::Queued as i32],
                |r| r.get(0),
            )
            .optional()?;
        Ok(id)
    }

    fn requeue_interrupted(&self) -> StoreResult<usize> {
        Ok(self.lock().execute(
            "UPDATE scans SET status = ?1 WHERE status = ?2",
            params![ScanStatus::Queued as i32, ScanStatus::Analyzing as i32],
        )?)
    }

    fn count_status(&self, status: ScanStatus) -> StoreResult<u64> {
        let n: i64 =
            self.read().query_row("SELECT count(*) FROM scans WHERE status = ?1", [status as i32], |r| r.get(0))?;
        Ok(n as u64)
    }

    fn add_report(&self, scan_id: &str, report: &ThreatReport, status: Option<ScanStatus>) -> StoreResult<u64> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let known: Option<i64> =
            tx.query_row("SELECT 1 FROM scans WHERE scan_id = ?1", [scan_id], |r| r.get(0)).optional()?;
        if known.is_none() {
            return Err(StoreError::Corrupt(format!("report for unknown scan {scan_id}")));
        }
        let seq = insert_report(&tx, scan_id, report, status)?;
        tx.commit()?;
        Ok(seq)
    }

    fn events_after(&self, cursor: u64, site_id: Option<&str>, limit: usize) -> StoreResult<Vec<StoredEvent>> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT e.seq, e.scan_id, s.site_id, s.status, r.report, e.created_at_us
             FROM events e JOIN scans s ON s.scan_id = e.scan_id JOIN reports r ON r.seq = e.report_seq
             WHERE e.seq > ?1 AND (?2 IS NULL OR s.site_id = ?2)
             ORDER BY e.seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![cursor as i64, site_id, limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i32>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, scan_id, site_id, status, report, at) = row?;
            out.push(StoredEvent {
                seq: seq as u64,
                scan_id,
                site_id,
                status: ScanStatus::try_from(status).unwrap_or(ScanStatus::Unspecified),
                report: ThreatReport::decode(report.as_slice())
                    .map_err(|e| StoreError::Corrupt(format!("stored report: {e}")))?,
                at: from_micros(at),
            });
        }
        Ok(out)
    }

    fn last_event(&self) -> StoreResult<u64> {
        let n: i64 = self.read().query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    fn reports(&self, scan_id: &str) -> StoreResult<Vec<ThreatReport>> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached("SELECT report FROM reports WHERE scan_id = ?1 ORDER BY seq")?;
        let blobs: Vec<Vec<u8>> = stmt.query_map([scan_id], |r| r.get(0))?.collect::<Result<_, _>>()?;
        blobs
            .iter()
            .map(|b| ThreatReport::decode(b.as_slice()).map_err(|e| StoreError::Corrupt(format!("stored report: {e}"))))
            .collect()
    }

    fn commit_scan(&self, scan: &ScanRecord) -> StoreResult<CommitOutcome> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        if let Some(existing) = scan_in(&tx, &scan.scan_id)? {
            return Ok(CommitOutcome::Existing(Box::new(existing)));
        }
        insert_scan(&tx, scan)?;
        tx.execute("DELETE FROM uploads WHERE scan_id = ?1", [&scan.scan_id])?;
        tx.commit()?;
        Ok(CommitOutcome::Committed)
    }

    fn receive_package(
        &self,
        package: &ReceivedPackage,
        scan: &ScanRecord,
        reports: &[ThreatReport],
    ) -> StoreResult<ReceiveOutcome> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let seen: Option<String> = tx
            .query_row(
                "SELECT package_sha256 FROM received_packages WHERE package_id = ?1",
                [&package.package_id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(sha) = seen {
            return Ok(match sha == package.package_sha256 {
                true => ReceiveOutcome::Duplicate,
                false => ReceiveOutcome::Conflict(format!(
                    "package {} was received before with different content",
                    package.package_id
                )),
            });
        }
        match scan_in(&tx, &scan.scan_id)? {
            Some(existing) if existing.origin != scan.origin => {
                let whose = if existing.origin.is_empty() { "this administration" } else { &existing.origin };
                return Ok(ReceiveOutcome::Conflict(format!(
                    "scan id {} is already taken by a scan of {whose}",
                    scan.scan_id
                )));
            }
            Some(existing) if existing.planes.is_empty() && !scan.planes.is_empty() => {
                insert_planes(&tx, scan)?;
                let updated =
                    scan_in(&tx, &scan.scan_id)?.ok_or_else(|| StoreError::Corrupt("scan vanished".into()))?;
                seal_scan(&tx, &updated)?;
            }
            Some(_) => {}
            None => insert_scan(&tx, scan)?,
        }
        for report in reports {
            insert_report(&tx, &scan.scan_id, report, None)?;
        }
        tx.execute(
            "INSERT INTO received_packages (package_id, issuer, sequence, scan_id, package_sha256, received_at_us)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                package.package_id,
                package.issuer,
                package.sequence as i64,
                scan.scan_id,
                package.package_sha256,
                micros(SystemTime::now())
            ],
        )?;
        tx.commit()?;
        Ok(ReceiveOutcome::Stored)
    }

    fn received_packages(&self, scan_id: &str) -> StoreResult<Vec<ReceivedPackage>> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT package_id, issuer, sequence, scan_id, package_sha256 FROM received_packages
             WHERE scan_id = ?1 ORDER BY issuer, sequence",
        )?;
        let rows = stmt.query_map([scan_id], |r| {
            Ok(ReceivedPackage {
                package_id: r.get(0)?,
                issuer: r.get(1)?,
                sequence: r.get::<_, i64>(2)? as u64,
                scan_id: r.get(3)?,
                package_sha256: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn outbox(&self, partner: &str) -> StoreResult<OutboxState> {
        let row = self
            .read()
            .query_row("SELECT delivered_seq, attempts, last_error FROM outbox WHERE partner = ?1", [partner], |r| {
                Ok(OutboxState { delivered: r.get::<_, i64>(0)? as u64, attempts: r.get(1)?, last_error: r.get(2)? })
            })
            .optional()?;
        Ok(row.unwrap_or_default())
    }

    fn outbox_delivered(&self, partner: &str, seq: u64) -> StoreResult<()> {
        self.lock().execute(
            "INSERT INTO outbox (partner, delivered_seq, attempts, last_error, updated_at_us) VALUES (?1, ?2, 0, '', ?3)
             ON CONFLICT (partner) DO UPDATE SET delivered_seq = max(delivered_seq, ?2), attempts = 0,
                 last_error = '', updated_at_us = ?3",
            params![partner, seq as i64, micros(SystemTime::now())],
        )?;
        Ok(())
    }

    fn outbox_failed(&self, partner: &str, error: &str) -> StoreResult<u32> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO outbox (partner, delivered_seq, attempts, last_error, updated_at_us) VALUES (?1, 0, 1, ?2, ?3)
             ON CONFLICT (partner) DO UPDATE SET attempts = attempts + 1, last_error = ?2, updated_at_us = ?3",
            params![partner, error, micros(SystemTime::now())],
        )?;
        Ok(conn.query_row("SELECT attempts FROM outbox WHERE partner = ?1", [partner], |r| r.get(0))?)
    }

    fn get_scan(&self, scan_id: &str) -> StoreResult<Option<ScanRecord>> {
        let conn = self.read();
        let row = conn
            .query_row(&format!("SELECT {SCAN_COLUMNS} FROM scans WHERE scan_id = ?1"), [scan_id], raw_scan)
            .optional()?;
        row.map(|r| Self::row_to_record(&conn, r)).transpose()
    }

    fn list_scans(&self, q: &ScanQuery) -> StoreResult<Vec<ScanRecord>> {
        use rusqlite::types::Value;
        let conn = self.read();
        let mut sql = format!("SELECT {SCAN_COLUMNS} FROM scans WHERE 1=1");
        let mut args: Vec<Value> = Vec::new();
        let mut filter = |clause: &str, values: Vec<Value>| {
            sql.push_str(" AND ");
            sql.push_str(clause);
            args.extend(values);
        };
        if let Some((at, id)) = &q.before {
            filter("(scan_time_us, scan_id) < (?, ?)", vec![micros(*at).into(), id.clone().into()]);
        }
        if let Some(site) = &q.site_id {
            filter("site_id = ?", vec![site.clone().into()]);
        }
        if let Some(sites) = &q.sites {
            // The same rule as `scope::covers`: the site itself or `<site>-...`.
            let mut clause = Vec::new();
            let mut values: Vec<Value> = Vec::new();
            for s in sites {
                clause.push("site_id = ? OR substr(site_id, 1, ?) = ?");
                let prefix = format!("{s}-");
                values.extend([s.clone().into(), (prefix.chars().count() as i64).into(), prefix.into()]);
            }
            let clause = if clause.is_empty() { "0".to_string() } else { format!("({})", clause.join(" OR ")) };
            filter(&clause, values);
        }
        if let Some(lane) = &q.lane_id {
            filter("lane_id = ?", vec![lane.clone().into()]);
        }
        if let Some(status) = q.status {
            filter("status = ?", vec![i64::from(status as i32).into()]);
        }
        if let Some(after) = q.received_after {
            filter("received_at_us >= ?", vec![micros(after).into()]);
        }
        if let Some(from) = q.scan_time_from {
            filter("scan_time_us >= ?", vec![micros(from).into()]);
        }
        if let Some(to) = q.scan_time_to {
            filter("scan_time_us < ?", vec![micros(to).into()]);
        }
        if let Some(d) = q.decision {
            filter("decision = ?", vec![i64::from(d).into()]);
        }
        if let Some(s) = q.min_score {
            filter("score >= ?", vec![f64::from(s).into()]);
        }
        if let Some(n) = &q.container_number {
            filter(&lookup_filter(&conn, "scan_containers", "number", n, q.limit)?, vec![n.clone().into()]);
        }
        if let Some(r) = &q.declaration_reference {
            filter(&lookup_filter(&conn, "scan_declarations", "reference", r, q.limit)?, vec![r.clone().into()]);
        }
        if let Some(p) = &q.vehicle_plate {
            filter(&lookup_filter(&conn, "scan_plates", "plate", p, q.limit)?, vec![p.clone().into()]);
        }
        sql.push_str(" ORDER BY scan_time_us DESC, scan_id DESC LIMIT ?");
        args.push((q.limit as i64).into());
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows: Vec<RawScan> =
            stmt.query_map(rusqlite::params_from_iter(args), raw_scan)?.collect::<Result<_, _>>()?;
        rows.into_iter().map(|r| Self::row_to_record(&conn, r)).collect()
    }

    fn put_upload(&self, u: &PendingUpload) -> StoreResult<()> {
        self.lock().execute(
            "INSERT INTO uploads (scan_id, header_sha256, header, started_at_us) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (scan_id) DO NOTHING",
            params![u.scan_id, u.header_sha256, u.header.encode_to_vec(), micros(u.started_at)],
        )?;
        Ok(())
    }

    fn get_upload(&self, scan_id: &str) -> StoreResult<Option<PendingUpload>> {
        let conn = self.read();
        let row = conn
            .query_row("SELECT header_sha256, header, started_at_us FROM uploads WHERE scan_id = ?1", [scan_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, i64>(2)?))
            })
            .optional()?;
        row.map(|(header_sha256, header, started)| {
            Ok(PendingUpload {
                scan_id: scan_id.to_string(),
                header: decode_header(&header)?,
                header_sha256,
                started_at: from_micros(started),
            })
        })
        .transpose()
    }

    fn delete_upload(&self, scan_id: &str) -> StoreResult<bool> {
        Ok(self.lock().execute("DELETE FROM uploads WHERE scan_id = ?1", [scan_id])? > 0)
    }

    fn uploads_started_before(&self, cutoff: SystemTime) -> StoreResult<Vec<String>> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached("SELECT scan_id FROM uploads WHERE started_at_us < ?1")?;
        let ids = stmt.query_map([micros(cutoff)], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use niix_proto::v1::ScanMetadata;

    use super::*;

    fn record(id: &str, site: &str, at_us: i64) -> ScanRecord {
        ScanRecord {
            scan_id: id.into(),
            header: ScanHeader {
                scan_id: id.into(),
                metadata: Some(ScanMetadata { site_id: site.into(), ..Default::default() }),
                planes: vec![],
            },
            planes: vec![PlaneDigest::full("ab".repeat(32), 7)],
            header_sha256: "cd".repeat(32),
            status: ScanStatus::Received,
            received_at: from_micros(at_us),
            decision: 0,
            score: None,
            origin: String::new(),
        }
    }

    #[test]
    fn migrations_reach_the_latest_version_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let db = SqliteMetadata::open(&path).unwrap();
        assert_eq!(db.schema_version().unwrap() as usize, MIGRATIONS.len());
        db.commit_scan(&record("a", "S1", 1)).unwrap();
        drop(db);
        let db = SqliteMetadata::open(&path).unwrap();
        assert_eq!(db.get_scan("a").unwrap().unwrap(), record("a", "S1", 1));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let err = SqliteMetadata::open(&path).err().unwrap().to_string();
        assert!(err.contains("newer than this niix"), "{err}");
    }

    #[test]
    fn commit_is_idempotent_and_clears_the_upload() {
        let db = SqliteMetadata::in_memory().unwrap();
        let r = record("a", "S1", 5);
        db.put_upload(&PendingUpload {
            scan_id: "a".into(),
            header: r.header.clone(),
            header_sha256: r.header_sha256.clone(),
            started_at: from_micros(1),
        })
        .unwrap();
        assert!(db.get_upload("a").unwrap().is_some());
        assert_eq!(db.commit_scan(&r).unwrap(), CommitOutcome::Committed);
        assert!(db.get_upload("a").unwrap().is_none());
        let mut other = record("a", "S2", 9);
        other.header_sha256 = "ef".repeat(32);
        assert_eq!(db.commit_scan(&other).unwrap(), CommitOutcome::Existing(Box::new(r)));
    }

    #[test]
    fn listing_pages_newest_first_with_filters() {
        let db = SqliteMetadata::in_memory().unwrap();
        for i in 0..10 {
            db.commit_scan(&record(&format!("s{i}"), if i % 2 == 0 { "EVEN" } else { "ODD" }, i)).unwrap();
        }
        let mut seen = Vec::new();
        let mut q = ScanQuery { limit: 3, ..Default::default() };
        loop {
            let page = db.list_scans(&q).unwrap();
            if page.is_empty() {
                break;
            }
            let last = page.last().unwrap();
            q.before = Some((last.received_at, last.scan_id.clone()));
            seen.extend(page.into_iter().map(|r| r.scan_id));
        }
        let expected: Vec<String> = (0..10).rev().map(|i| format!("s{i}")).collect();
        assert_eq!(seen, expected);

        let odd = db
            .list_scans(&ScanQuery {
                limit: 100,
                site_id: Some("ODD".into()),
                received_after: Some(from_micros(4)),
                ..Default::default()
            })
            .unwrap();
        let ids: Vec<_> = odd.iter().map(|r| r.scan_id.as_str()).collect();
        assert_eq!(ids, ["s9", "s7", "s5"]);
    }

    #[test]
    fn a_container_of_many_scans_and_one_of_few_page_alike() {
        let db = SqliteMetadata::in_memory().unwrap();
        for i in 0..40 {
            let mut r = record(&format!("s{i:02}"), "NLRTM", i);
            let mut numbers = vec!["CSQU3054383".to_string()];
            if i % 20 == 3 {
                numbers.push("MSCU1234565".into());
            }
            r.header.metadata.as_mut().unwrap().container_numbers = numbers;
            db.commit_scan(&r).unwrap();
        }
        // 40 matches of 40 scans, 3 per page: checked while walking (EXISTS); 2 matches: looked up (IN).
        let conn = db.read();
        assert!(lookup_filter(&conn, "scan_containers", "number", "CSQU3054383", 3).unwrap().starts_with("EXISTS"));
        assert!(lookup_filter(&conn, "scan_containers", "number", "MSCU1234565", 3).unwrap().starts_with("scan_id IN"));
        drop(conn);
        for (number, expected) in [("CSQU3054383", (0..40).rev().collect::<Vec<_>>()), ("MSCU1234565", vec![23, 3])] {
            let mut q = ScanQuery { limit: 3, container_number: Some(number.into()), ..Default::default() };
            let mut seen = Vec::new();
            loop {
                let page = db.list_scans(&q).unwrap();
                let Some(last) = page.last() else { break };
                q.before = Some((last.received_at, last.scan_id.clone()));
                seen.extend(page.into_iter().map(|r| r.scan_id));
            }
            let expected: Vec<String> = expected.iter().map(|i| format!("s{i:02}")).collect();
            assert_eq!(seen, expected, "{number}");
        }
    }

    #[test]
    fn scans_are_found_by_plate_whatever_its_case_spaces_and_dashes() {
        let db = SqliteMetadata::in_memory().unwrap();
        for (i, plate) in ["AB-123-C", "ab 123 c", "XY-999-Z", ""].iter().enumerate() {
            let mut r = record(&format!("s{i}"), "NLRTM", i as i64);
            r.header.metadata.as_mut().unwrap().vehicle_plate = plate.to_string();
            db.commit_scan(&r).unwrap();
        }
        let found = |plate: &str| {
            let q = ScanQuery { limit: 10, vehicle_plate: Some(plate_key(plate)), ..Default::default() };
            db.list_scans(&q).unwrap().into_iter().map(|r| r.scan_id).collect::<Vec<_>>()
        };
        assert_eq!(found("ab123C"), ["s1", "s0"]);
        assert_eq!(found("XY 999 Z"), ["s2"]);
        assert!(found("AB-123").is_empty());
    }

    #[test]
    fn listing_by_site_scope_takes_each_site_and_the_sites_under_it() {
        let db = SqliteMetadata::in_memory().unwrap();
        for (i, site) in ["NLRTM", "NLRTM-01", "NLRTMX", "BEANR-02", "BEANR-01"].iter().enumerate() {
            db.commit_scan(&record(&format!("s{i}"), site, i as i64)).unwrap();
        }
        let listed = |sites: Vec<&str>| {
            let q = ScanQuery {
                limit: 100,
                sites: Some(sites.into_iter().map(String::from).collect()),
                ..Default::default()
            };
            let mut ids: Vec<String> = db.list_scans(&q).unwrap().into_iter().map(|r| r.scan_id).collect();
            ids.sort();
            ids
        };
        assert_eq!(listed(vec!["NLRTM"]), ["s0", "s1"]);
        assert_eq!(listed(vec!["NLRTM", "BEANR-02"]), ["s0", "s1", "s3"]);
        assert!(listed(vec![]).is_empty());
    }

    #[test]
    fn the_queue_hands_out_each_scan_once_oldest_first() {
        let db = SqliteMetadata::in_memory().unwrap();
        for (id, at) in [("b", 2), ("a", 1), ("c", 3)] {
            let mut r = record(id, "S", at);
            r.status = ScanStatus::Queued;
            db.commit_scan(&r).unwrap();
        }
        assert_eq!(db.count_status(ScanStatus::Queued).unwrap(), 3);
        assert_eq!(db.claim_next_queued().unwrap().as_deref(), Some("a"));
        assert_eq!(db.claim_next_queued().unwrap().as_deref(), Some("b"));
        assert_eq!(db.count_status(ScanStatus::Analyzing).unwrap(), 2);
        assert_eq!(db.requeue_interrupted().unwrap(), 2);
        assert_eq!(db.claim_next_queued().unwrap().as_deref(), Some("a"));

        let report = ThreatReport { score: 0.7, r#type: 1, ..Default::default() };
        assert_eq!(db.add_report("a", &report, Some(ScanStatus::Analyzed)).unwrap(), 1);
        assert_eq!(db.get_scan("a").unwrap().unwrap().status, ScanStatus::Analyzed);
        assert_eq!(db.reports("a").unwrap(), vec![report]);
        assert!(db.add_report("zzz", &ThreatReport::default(), Some(ScanStatus::Analyzed)).is_err());
        let events = db.events_after(0, None, 10).unwrap();
        assert_eq!((events.len(), events[0].seq, events[0].report.score), (1, 1, 0.7));
        assert_eq!(db.get_scan("a").unwrap().unwrap().score, Some(0.7));
        assert!(db.events_after(1, None, 10).unwrap().is_empty());
        assert!(db.events_after(0, Some("other"), 10).unwrap().is_empty());
        assert_eq!(db.last_event().unwrap(), 1);
        assert_eq!(db.claim_next_queued().unwrap().as_deref(), Some("b"));
        assert_eq!(db.claim_next_queued().unwrap().as_deref(), Some("c"));
        assert_eq!(db.claim_next_queued().unwrap(), None);
    }

    #[test]
    fn a_received_package_is_stored_once_with_its_foreign_scan() {
        let db = SqliteMetadata::in_memory().unwrap();
        let mut scan = record("f", "NLRTM", 5);
        scan.origin = "NL".into();
        scan.planes[0].downsampled = 4;
        let pkg = |id: &str, sha: &str| ReceivedPackage {
            package_id: id.into(),
            issuer: "NL".into(),
            sequence: 1,
            scan_id: "f".into(),
            package_sha256: sha.into(),
        };
        let machine = ThreatReport { r#type: ReportType::Machine as i32, decision: 2, ..Default::default() };
        assert_eq!(
            db.receive_package(&pkg("NL.DE.1", "aa"), &scan, std::slice::from_ref(&machine)).unwrap(),
            ReceiveOutcome::Stored
        );
        assert_eq!(
            db.receive_package(&pkg("NL.DE.1", "aa"), &scan, std::slice::from_ref(&machine)).unwrap(),
            ReceiveOutcome::Duplicate
        );
        assert!(matches!(
            db.receive_package(&pkg("NL.DE.1", "bb"), &scan, std::slice::from_ref(&machine)).unwrap(),
            ReceiveOutcome::Conflict(_)
        ));
        // A later package about the same scan adds its report to it.
        let operator = ThreatReport { r#type: ReportType::Operator as i32, ..Default::default() };
        assert_eq!(db.receive_package(&pkg("NL.DE.2", "cc"), &scan, &[operator]).unwrap(), ReceiveOutcome::Stored);
        let stored = db.get_scan("f").unwrap().unwrap();
        assert_eq!((stored.origin.as_str(), stored.decision, stored.planes[0].downsampled), ("NL", 2, 4));
        assert_eq!(db.reports("f").unwrap().len(), 2);
        assert_eq!(db.received_packages("f").unwrap().len(), 2);
        // A scan id of this administration cannot be taken over by a partner's package.
        db.commit_scan(&record("own", "S", 1)).unwrap();
        let takeover = ScanRecord { scan_id: "own".into(), ..scan.clone() };
        let third = ReceivedPackage { scan_id: "own".into(), ..pkg("NL.DE.3", "dd") };
        assert!(matches!(db.receive_package(&third, &takeover, &[]).unwrap(), ReceiveOutcome::Conflict(_)));
        assert!(db.reports("own").unwrap().is_empty());
    }

    #[test]
    fn reports_and_scans_are_sealed_and_an_edit_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let db = SqliteMetadata::open(&path).unwrap();
        db.commit_scan(&record("a", "S1", 1)).unwrap();
        let alarm = ThreatReport { r#type: ReportType::Machine as i32, decision: 2, ..Default::default() };
        db.add_report("a", &alarm, Some(ScanStatus::Analyzed)).unwrap();
        assert_eq!(db.verify_scan("a").unwrap().scan_id, "a");
        assert!(crate::audit::verify(&db).unwrap().is_ok(), "seals are ordinary chained records");

        let clear = ThreatReport { decision: 1, ..alarm.clone() };
        let edit = |sql: &str, blob: Vec<u8>| Connection::open(&path).unwrap().execute(sql, [blob]).unwrap();
        edit("UPDATE reports SET report = ?1", clear.encode_to_vec());
        let err = db.verify_scan("a").unwrap_err().to_string();
        assert!(err.contains("a report 1") && err.contains("edited"), "{err}");
        edit("UPDATE reports SET report = ?1", alarm.encode_to_vec());
        db.verify_scan("a").unwrap();
        edit("UPDATE planes SET sha256 = hex(?1)", b"x".to_vec());
        let err = db.verify_scan("a").unwrap_err().to_string();
        assert!(err.contains("plane digests of scan a"), "{err}");
    }

    #[test]
    fn the_seal_migration_seals_what_was_stored_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let db = SqliteMetadata::open(&path).unwrap();
        let mut a = record("a", "S1", 1);
        a.header.metadata.as_mut().unwrap().vehicle_plate = "AB-12-C".into();
        db.commit_scan(&a).unwrap();
        db.add_report("a", &ThreatReport::default(), None).unwrap();
        drop(db);
        // Back to schema 5, as a database of the previous release: no seals,
        // no plate index.
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "DROP INDEX audit_by_object; DELETE FROM audit; DROP TABLE scan_plates; PRAGMA user_version = 5;",
            )
            .unwrap();
        let db = SqliteMetadata::open(&path).unwrap();
        assert_eq!(db.schema_version().unwrap() as usize, MIGRATIONS.len());
        db.verify_scan("a").unwrap();
        assert_eq!(db.audit_records(0, 10).unwrap().len(), 2, "one scan seal, one report seal");
        let q = ScanQuery { limit: 10, vehicle_plate: Some("AB12C".into()), ..Default::default() };
        assert_eq!(db.list_scans(&q).unwrap().len(), 1, "the plate migration indexes scans stored before");
    }

    #[test]
    fn migrations_from_schema_2_index_and_seal_every_row_a_batch_at_a_time() {
        use niix_proto::v1::DeclarationReference;
        // A database of a release at schema 2, with more scans and reports
        // than several migration batches hold.
        let n = 3 * MIGRATION_BATCH + 17;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let mut conn = Connection::open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        tx.execute_batch(&format!("{}\n{}\nPRAGMA user_version = 2;", MIGRATIONS[0], MIGRATIONS[1])).unwrap();
        for i in 0..n {
            let id = format!("scan-{i:04}");
            let meta = ScanMetadata {
                site_id: "S1".into(),
                vehicle_plate: format!("ab-{i}"),
                container_numbers: vec![format!("C{i}")],
                declarations: vec![DeclarationReference { value: format!("MRN{i}"), ..Default::default() }],
                ..Default::default()
            };
            let header = ScanHeader { scan_id: id.clone(), metadata: Some(meta), planes: vec![] };
            tx.execute(
                "INSERT INTO scans (scan_id, site_id, lane_id, conveyance, status, received_at_us, header_sha256, header)
                 VALUES (?1, 'S1', '', 0, 4, ?2, ?3, ?4)",
                params![id, i as i64, "cd".repeat(32), header.encode_to_vec()],
            )
            .unwrap();
            // Two machine reports each: the later decision stands.
            for decision in [1, 2 + (i % 2) as i32] {
                let report = ThreatReport {
                    r#type: ReportType::Machine as i32,
                    decision,
                    score: i as f32,
                    ..Default::default()
                };
                tx.execute(
                    "INSERT INTO reports (scan_id, report_type, created_at_us, report) VALUES (?1, 1, 0, ?2)",
                    params![id, report.encode_to_vec()],
                )
                .unwrap();
            }
        }
        tx.commit().unwrap();
        drop(conn);

        let db = SqliteMetadata::open(&path).unwrap();
        assert_eq!(db.schema_version().unwrap() as usize, MIGRATIONS.len());
        let conn = db.lock();
        let count = |sql: &str| -> usize { conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap() as usize };
        assert_eq!(count("SELECT count(*) FROM scan_containers"), n);
        assert_eq!(count("SELECT count(*) FROM scan_declarations"), n);
        assert_eq!(count("SELECT count(*) FROM scan_plates"), n);
        assert_eq!(count("SELECT count(*) FROM scans WHERE decision = 3"), n / 2);
        assert_eq!(count("SELECT count(*) FROM scans WHERE decision = 2"), n - n / 2);
        assert_eq!(count(&format!("SELECT count(*) FROM audit WHERE action = '{SEAL_SCAN}'")), n);
        assert_eq!(count(&format!("SELECT count(*) FROM audit WHERE action = '{SEAL_REPORT}'")), 2 * n);
        drop(conn);
        let last = format!("scan-{:04}", n - 1);
        let q = ScanQuery { limit: 10, vehicle_plate: Some(plate_key(&format!("AB {}", n - 1))), ..Default::default() };
        assert_eq!(db.list_scans(&q).unwrap()[0].scan_id, last);
        let q = ScanQuery { limit: 10, container_number: Some(format!("C{}", n - 1)), ..Default::default() };
        assert_eq!(db.list_scans(&q).unwrap()[0].scan_id, last);
        db.verify_scan(&last).unwrap();
        db.verify_scan("scan-0000").unwrap();
    }

    #[test]
    fn in_batches_visits_every_row_once_in_order_a_batch_at_a_time() {
        let mut conn = Connection::open_in_memory().unwrap();
        let tx = conn.transaction().unwrap();
        tx.execute_batch("CREATE TABLE t (v INTEGER NOT NULL)").unwrap();
        let n = 2 * MIGRATION_BATCH + 1;
        for v in 0..n {
            tx.execute("INSERT INTO t (v) VALUES (?1)", [v as i64]).unwrap();
        }
        // Rows deleted in between leave gaps in the rowids.
        tx.execute("DELETE FROM t WHERE v % 7 = 3", []).unwrap();
        let mut seen = Vec::new();
        let batches = in_batches(
            &tx,
            "t",
            &["v"],
            |r| r.get::<_, i64>(0),
            |v| {
                // Writing to the table being walked is allowed (rows are re-read by rowid).
                tx.execute("UPDATE t SET v = v + 1000000 WHERE v = ?1", [v])?;
                seen.push(v);
                Ok(())
            },
        )
        .unwrap();
        let want: Vec<i64> = (0..n as i64).filter(|v| v % 7 != 3).collect();
        assert_eq!(seen, want);
        assert_eq!(batches, want.len().div_ceil(MIGRATION_BATCH));
        let empty = in_batches(&tx, "t", &["v"], |r| r.get::<_, i64>(0), |_| Ok(()));
        assert!(empty.is_ok());
        tx.execute("DELETE FROM t", []).unwrap();
        assert_eq!(in_batches(&tx, "t", &["v"], |r| r.get::<_, i64>(0), |_| panic!("no rows")).unwrap(), 1);
    }

    #[test]
    fn the_outbox_cursor_only_moves_forward() {
        let db = SqliteMetadata::in_memory().unwrap();
        assert_eq!(db.outbox("DE").unwrap(), OutboxState::default());
        assert_eq!(db.outbox_failed("DE", "down").unwrap(), 1);
        assert_eq!(db.outbox_failed("DE", "still down").unwrap(), 2);
        assert_eq!(db.outbox("DE").unwrap().last_error, "still down");
        db.outbox_delivered("DE", 7).unwrap();
        db.outbox_delivered("DE", 3).unwrap();
        assert_eq!(db.outbox("DE").unwrap(), OutboxState { delivered: 7, attempts: 0, last_error: String::new() });
        assert_eq!(db.outbox("FR").unwrap().delivered, 0);
    }

    #[test]
    fn stale_uploads_are_found() {
        let db = SqliteMetadata::in_memory().unwrap();
        let header = ScanHeader::default();
        for (id, at) in [("old", 10), ("new", 1000)] {
            db.put_upload(&PendingUpload {
                scan_id: id.into(),
                header: header.clone(),
                header_sha256: String::new(),
                started_at: from_micros(at),
            })
            .unwrap();
        }
        assert_eq!(db.uploads_started_before(from_micros(500)).unwrap(), vec!["old".to_string()]);
        assert!(db.delete_upload("old").unwrap());
        assert!(!db.delete_upload("old").unwrap());
    }
}
