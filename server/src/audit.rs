//! The hash-chained audit log, and the one place where every RPC's outcome
//! is counted, logged, audited and turned into a gRPC reply.
//!
//! Each record carries the SHA-256 of the one before, so editing, deleting or
//! reordering any record breaks the chain at that point: [`verify`] finds the
//! first broken record.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::store::{AuditEntry, MetadataStore, StoreResult};

/// `prev_sha256` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The SHA-256 of a record: over its sequence number, every field (each
/// length-prefixed, so no two records encode alike) and the previous hash.
pub fn record_hash(seq: u64, e: &AuditEntry, prev_sha256: &str) -> String {
    let at = e.at.duration_since(UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
    let mut h = Sha256::new();
    h.update(b"niix-audit-v1");
    h.update(seq.to_be_bytes());
    h.update(at.to_be_bytes());
    for field in [&e.identity, &e.role, &e.action, &e.object, &e.outcome] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    h.update(prev_sha256.as_bytes());
    hex::encode(h.finalize())
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit record {seq} is broken: {reason}")]
pub struct ChainBreak {
    /// The first record that does not verify.
    pub seq: u64,
    /// Why.
    pub reason: String,
}

/// Checks the whole chain; returns the number of records.
pub fn verify(store: &dyn MetadataStore) -> StoreResult<std::result::Result<u64, ChainBreak>> {
    let mut prev = GENESIS.to_string();
    let mut expected = 1u64;
    loop {
        let batch = store.audit_records(expected - 1, 1000)?;
        if batch.is_empty() {
            return Ok(Ok(expected - 1));
        }
        for r in batch {
            let broken = |reason: String| Ok(Err(ChainBreak { seq: expected, reason }));
            if r.seq != expected {
                return broken(format!("the next record is numbered {}: records are missing", r.seq));
            }
            if r.prev_sha256 != prev {
                return broken("it does not follow the record before (deleted, inserted or reordered)".into());
            }
            if record_hash(r.seq, &r.entry, &r.prev_sha256) != r.sha256 {
                return broken("its content does not match its hash (edited)".into());
            }
            prev = r.sha256;
            expected += 1;
        }
    }
}

/// Longest field of an audit record, in bytes; longer values (a path or an
/// id an attacker chose) are cut to this and end in [`TRUNCATED`].
pub const MAX_FIELD_BYTES: usize = 256;
/// The end of a field that was cut to [`MAX_FIELD_BYTES`].
pub const TRUNCATED: &str = "...[truncated]";

/// `value` cut to at most [`MAX_FIELD_BYTES`] bytes at a character
/// boundary, marked with [`TRUNCATED`] when it was cut.
pub fn bounded(value: &str) -> String {
    if value.len() <= MAX_FIELD_BYTES {
        return value.to_string();
    }
    let mut end = MAX_FIELD_BYTES - TRUNCATED.len();
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{TRUNCATED}", &value[..end])
}

/// A signed statement of the chain's head: "record `seq` has hash
/// `sha256`". Kept off the server's host, it lets [`check_checkpoint`] tell
/// a log that was cut short, or edited and re-chained from a deleted record
/// onwards (which [`verify`] alone cannot see), from the log that was signed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// Always [`CHECKPOINT_FORMAT`].
    pub format: String,
    /// The administration whose log it is (may be empty).
    pub administration: String,
    /// The newest record covered.
    pub seq: u64,
    /// That record's hash.
    pub sha256: String,
    /// When it was signed, microseconds since the Unix epoch.
    pub signed_at_us: u64,
    /// The signer's Ed25519 public key, hex.
    pub public_key: String,
    /// Ed25519 signature over [`Checkpoint::message`], hex.
    pub signature: String,
}

/// `format` of a checkpoint file.
pub const CHECKPOINT_FORMAT: &str = "niix-audit-checkpoint-v1";

impl Checkpoint {
    /// The bytes the signature covers.
    pub fn message(&self) -> Vec<u8> {
        format!("{}\n{}\n{}\n{}\n{}", self.format, self.administration, self.seq, self.sha256, self.signed_at_us)
            .into_bytes()
    }
}

/// How a log differs from a checkpoint of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointMismatch {
    /// Records the checkpoint covers are gone.
    #[error(
        "the log was truncated: the checkpoint covers {covered} records, the log now holds {held} \
         (records {first_missing}..={covered} were deleted)",
        first_missing = held + 1
    )]
    Truncated {
        /// Records the checkpoint covers.
        covered: u64,
        /// Records in the log.
        held: u64,
    },
    /// The record at the checkpoint's position has another hash.
    #[error(
        "record {seq} no longer has the hash the checkpoint signed ({signed}, now {found}): records at or before \
         it were deleted, edited or inserted and the chain was re-computed"
    )]
    Rechained {
        /// The checkpoint's record.
        seq: u64,
        /// The hash signed.
        signed: String,
        /// The hash in the log.
        found: String,
    },
}

/// Checks that the log still holds the head a checkpoint signed (the
/// signature itself is checked by `exchange::keys::verify_checkpoint`).
pub fn check_checkpoint(
    store: &dyn MetadataStore,
    cp: &Checkpoint,
) -> StoreResult<std::result::Result<(), CheckpointMismatch>> {
    if cp.seq == 0 {
        return Ok(Ok(()));
    }
    let record = store.audit_records(cp.seq - 1, 1)?.into_iter().next();
    match record {
        Some(r) if r.seq == cp.seq && r.sha256 == cp.sha256 => Ok(Ok(())),
        Some(r) if r.seq == cp.seq => {
            Ok(Err(CheckpointMismatch::Rechained { seq: cp.seq, signed: cp.sha256.clone(), found: r.sha256 }))
        }
        _ => {
            let held = store.audit_tail(1)?.first().map(|r| r.seq).unwrap_or(0);
            Ok(Err(CheckpointMismatch::Truncated { covered: cp.seq, held }))
        }
    }
}

/// Every scan's header, plane digests and reports against their seals in
/// the chain; the problems found (empty if none).
pub fn verify_seals(store: &dyn MetadataStore) -> StoreResult<Vec<String>> {
    let mut problems = Vec::new();
    for id in store.scan_ids()? {
        match store.verify_scan(&id) {
            Ok(_) => {}
            Err(crate::store::StoreError::Tampered(why)) => problems.push(why),
            Err(e) => return Err(e),
        }
    }
    Ok(problems)
}

/// Who is calling, as far as the server knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Identity from the auth configuration, or `local@<peer>`.
    pub identity: String,
    /// Role name.
    pub role: String,
}

impl Caller {
    /// The caller of a request: set by authentication, else the local
    /// workstation (loopback without auth configured).
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        if let Some(c) = request.extensions().get::<Caller>() {
            return c.clone();
        }
        let peer = request.remote_addr().map(|a: SocketAddr| a.ip().to_string()).unwrap_or_else(|| "?".into());
        Caller { identity: format!("local@{peer}"), role: "admin".into() }
    }
}

/// Most records one group commit writes; callers beyond wait for the next.
pub const MAX_GROUP: usize = 1024;

/// A record waiting for the writer, and the caller waiting for its commit.
struct Pending {
    entry: AuditEntry,
    done: tokio::sync::oneshot::Sender<std::result::Result<(), String>>,
}

/// The one thread that writes audit records, in groups: it takes every
/// record queued while the previous group was being made durable, appends
/// them in arrival order in one transaction (one fsync), then answers each
/// caller. The chain order is the commit order. A group that cannot be
/// committed is rolled back whole and every caller in it gets the error.
fn write_groups(store: Arc<dyn MetadataStore>, queue: std::sync::mpsc::Receiver<Pending>, metrics: Metrics) {
    while let Ok(first) = queue.recv() {
        let mut entries = vec![first.entry];
        let mut waiting = vec![first.done];
        while entries.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(p) => {
                    entries.push(p.entry);
                    waiting.push(p.done);
                }
                Err(_) => break,
            }
        }
        let outcome = store.append_audit_group(&entries).map(drop).map_err(|e| e.to_string());
        metrics.audit_group_commits.inc();
        for done in waiting {
            // A caller that went away (its request was cancelled) needs no answer.
            let _ = done.send(outcome.clone());
        }
    }
}

/// Counts, logs and audits every RPC outcome, and maps it to a reply.
#[derive(Clone)]
pub struct Gate {
    metrics: Metrics,
    queue: std::sync::mpsc::Sender<Pending>,
}

impl Gate {
    /// Creates the gate and starts its audit writer thread (which ends when
    /// the last clone of the gate is dropped).
    pub fn new(metrics: Metrics, store: Arc<dyn MetadataStore>) -> Self {
        let (queue, records) = std::sync::mpsc::channel();
        let counted = metrics.clone();
        std::thread::Builder::new()
            .name("niix-audit".into())
            .spawn(move || write_groups(store, records, counted))
            .expect("cannot start the audit writer thread");
        Gate { metrics, queue }
    }

    /// The metrics the gate counts into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Appends one record and waits until it is durable (committed with the
    /// group of records queued at the same time). A record that cannot be
    /// written (a full disk, a failing database) is an error the caller must
    /// not ignore: no audited action succeeds without its record.
    pub async fn audit(&self, caller: &Caller, action: &str, object: &str, outcome: &str) -> Result<()> {
        let entry = AuditEntry {
            at: SystemTime::now(),
            identity: bounded(&caller.identity),
            role: bounded(&caller.role),
            action: bounded(action),
            object: bounded(object),
            outcome: bounded(outcome),
        };
        let (done, committed) = tokio::sync::oneshot::channel();
        let result = match self.queue.send(Pending { entry, done }) {
            Ok(()) => committed.await.unwrap_or_else(|_| Err("the audit writer stopped".into())),
            Err(_) => Err("the audit writer stopped".into()),
        };
        result.map_err(|e| {
            tracing::error!(error = %e, action, "could not write the audit log");
            self.metrics.audit_failed.inc();
            Error::Unavailable(format!(
                "the server cannot write its audit log ({e}), and answers nothing it cannot audit: \
                 retry later; operators: free space on the data directory's disk"
            ))
        })
    }

    /// Audits the outcome of `action` on `object` by `caller` and turns it
    /// into a gRPC reply. When the record cannot be written, the reply is
    /// UNAVAILABLE whatever the outcome was: nothing is answered unaudited.
    pub async fn reply<T>(
        &self,
        caller: &Caller,
        action: &str,
        object: &str,
        result: Result<T>,
    ) -> std::result::Result<tonic::Response<T>, tonic::Status> {
        let outcome = match &result {
            Ok(_) => "OK".to_string(),
            Err(e) => format!("{:?}", e.code()),
        };
        let result = match self.audit(caller, action, object, &outcome).await {
            Ok(()) => result,
            Err(unaudited) => Err(unaudited),
        };
        result.map(tonic::Response::new).map_err(|e| {
            self.metrics.error(action, e.code());
            tracing::warn!(rpc = action, identity = %caller.identity, code = ?e.code(), error = %e, "request refused");
            e.into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteMetadata;

    fn entry(i: u32) -> AuditEntry {
        AuditEntry {
            at: UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000 + u64::from(i)),
            identity: format!("officer-{i}"),
            role: "officer".into(),
            action: "GetScan".into(),
            object: format!("scan-{i}"),
            outcome: "OK".into(),
        }
    }

    fn chain(dir: &std::path::Path) -> SqliteMetadata {
        let db = SqliteMetadata::open(&dir.join("niix.db")).unwrap();
        for i in 0..6 {
            db.append_audit(&entry(i)).unwrap();
        }
        db
    }

    fn tamper(dir: &std::path::Path, sql: &str) {
        rusqlite::Connection::open(dir.join("niix.db")).unwrap().execute_batch(sql).unwrap();
    }

    #[test]
    fn long_fields_are_cut_and_marked() {
        assert_eq!(bounded("GetScan"), "GetScan");
        let exact = "a".repeat(MAX_FIELD_BYTES);
        assert_eq!(bounded(&exact), exact);
        let cut = bounded(&"\u{e9}".repeat(6000));
        assert!(cut.len() <= MAX_FIELD_BYTES && cut.ends_with(TRUNCATED), "{cut}");
        assert!(cut.trim_end_matches(TRUNCATED).chars().all(|c| c == '\u{e9}'));
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let db = chain(dir.path());
        assert_eq!(verify(&db).unwrap(), Ok(6));
        let tail = db.audit_tail(2).unwrap();
        assert_eq!(tail.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![5, 6]);
        assert_eq!(tail[1].prev_sha256, tail[0].sha256);
    }

    #[test]
    fn an_edited_record_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let db = chain(dir.path());
        tamper(dir.path(), "UPDATE audit SET outcome = 'PermissionDenied' WHERE seq = 4");
        let b = verify(&db).unwrap().unwrap_err();
        assert_eq!(b.seq, 4);
        assert!(b.reason.contains("edited"), "{b}");
    }

    #[test]
    fn an_edit_that_also_rehashes_breaks_the_next_link() {
        let dir = tempfile::tempdir().unwrap();
        let db = chain(dir.path());
        let mut e = entry(2);
        e.identity = "someone-else".into();
        let prev: String = rusqlite::Connection::open(dir.path().join("niix.db"))
            .unwrap()
            .query_row("SELECT prev_sha256 FROM audit WHERE seq = 3", [], |r| r.get(0))
            .unwrap();
        let forged = record_hash(3, &e, &prev);
        tamper(dir.path(), &format!("UPDATE audit SET identity = 'someone-else', sha256 = '{forged}' WHERE seq = 3"));
        assert_eq!(verify(&db).unwrap().unwrap_err().seq, 4);
    }

    #[test]
    fn a_deleted_record_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let db = chain(dir.path());
        tamper(dir.path(), "DELETE FROM audit WHERE seq = 3");
        let b = verify(&db).unwrap().unwrap_err();
        assert_eq!(b.seq, 3);
        assert!(b.reason.contains("missing"), "{b}");
        // Deleting the newest record cannot be told from the log alone, but
        // renumbering to hide a deletion breaks the links.
        let dir = tempfile::tempdir().unwrap();
        let db = chain(dir.path());
        tamper(dir.path(), "DELETE FROM audit WHERE seq = 2; UPDATE audit SET seq = seq - 1 WHERE seq > 2");
        assert_eq!(verify(&db).unwrap().unwrap_err().seq, 2);
    }

    #[test]
    fn reordered_records_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let db = chain(dir.path());
        tamper(
            dir.path(),
            "UPDATE audit SET seq = 100 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 5; UPDATE audit SET seq = 5 WHERE seq = 100",
        );
        assert_eq!(verify(&db).unwrap().unwrap_err().seq, 2);
    }
}
