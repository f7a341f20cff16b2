//! [`BlobStore`] on the local file system.
//!
//! Layout under the root: `staging/<scan_id>/plane-<n>` while an upload
//! runs, `blobs/<2 hex>/<64 hex>` once a plane is complete. A plane becomes a
//! blob by fsync + rename + fsync of the directory, so a crash leaves either
//! the old state or the new one.
//!
//! While a plane is staged, its written bytes are synced in the background
//! every 16 MiB, so the disk writes them while more arrive and the sync that
//! ends the plane only waits for the last stretch. A failed background sync
//! fails that final sync: the plane is never reported durable after one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::thread::JoinHandle;

use super::{BlobStore, ReadSeek, StagedWriter, StoreError, StoreResult};

/// Blobs in a local directory.
#[derive(Debug, Clone)]
pub struct FsBlobs {
    root: PathBuf,
}

impl FsBlobs {
    /// Opens (creating if needed) a blob store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> StoreResult<Self> {
        let root = root.into();
        for dir in [root.join("blobs"), root.join("staging")] {
            fs::create_dir_all(&dir).map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
        }
        Ok(FsBlobs { root })
    }

    fn staging_dir(&self, scan_id: &str) -> PathBuf {
        self.root.join("staging").join(scan_id)
    }

    fn staged_path(&self, scan_id: &str, plane: u32) -> PathBuf {
        self.staging_dir(scan_id).join(format!("plane-{plane}"))
    }

    /// Where a blob with this digest lives.
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        let prefix = sha256.get(..2).unwrap_or("xx");
        self.root.join("blobs").join(prefix).join(sha256)
    }
}

fn sync_dir(dir: &Path) -> StoreResult<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(format!("syncing directory {}", dir.display()), e))
}

fn check_digest(sha256: &str) -> StoreResult<()> {
    if sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!("not a SHA-256 digest: {sha256:?}")))
    }
}

/// Bytes appended to a staged plane between two background syncs.
const SYNC_EVERY: u64 = 16 << 20;

struct StagedFile {
    file: File,
    path: PathBuf,
    /// Bytes written since the last background sync was requested.
    unsynced: u64,
    /// Started once the first [`SYNC_EVERY`] bytes are written.
    syncer: Option<Syncer>,
}

impl StagedFile {
    fn wrote(&mut self, n: usize) -> io::Result<()> {
        self.unsynced += n as u64;
        if self.unsynced < SYNC_EVERY {
            return Ok(());
        }
        self.unsynced = 0;
        let syncer = match &mut self.syncer {
            Some(s) => s,
            None => self.syncer.insert(Syncer::start(&self.file)?),
        };
        syncer.request()
    }
}

/// A thread that syncs a staged file's data whenever asked, on its own file
/// handle, so the writer never waits for the disk before the plane's end.
struct Syncer {
    wake: SyncSender<()>,
    thread: JoinHandle<io::Result<()>>,
}

impl Syncer {
    fn start(file: &File) -> io::Result<Syncer> {
        let file = file.try_clone()?;
        // One pending request is enough: a sync covers every byte written before it starts.
        let (wake, requests) = mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new().name("niix-stage-sync".into()).spawn(move || {
            while requests.recv().is_ok() {
                file.sync_data()?;
            }
            Ok(())
        })?;
        Ok(Syncer { wake, thread })
    }

    /// Asks for a sync; a no-op when one is already pending. A background
    /// sync that failed shows here (the thread has stopped) or in [`Syncer::stop`].
    fn request(&self) -> io::Result<()> {
        match self.wake.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) => Ok(()),
            Err(TrySendError::Disconnected(())) => {
                Err(io::Error::other("the background sync of the staged file failed"))
            }
        }
    }

    /// Waits for the background syncs to end; the first failure, if any.
    fn stop(self) -> io::Result<()> {
        drop(self.wake);
        self.thread.join().unwrap_or_else(|_| Err(io::Error::other("the background sync thread panicked")))
    }
}

impl Write for StagedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.wrote(n)?;
        Ok(n)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all(buf)?;
        self.wrote(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl StagedWriter for StagedFile {
    fn sync(&mut self) -> StoreResult<()> {
        let context = || format!("syncing {}", self.path.display());
        if let Some(syncer) = self.syncer.take() {
            syncer.stop().map_err(|e| StoreError::io(context(), e))?;
        }
        self.unsynced = 0;
        self.file.sync_data().map_err(|e| StoreError::io(context(), e))
    }
}

impl BlobStore for FsBlobs {
    fn staged_len(&self, scan_id: &str, plane: u32) -> StoreResult<u64> {
        match fs::metadata(self.staged_path(scan_id, plane)) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(StoreError::io("reading staged plane size", e)),
        }
    }

    fn append_staged(&self, scan_id: &str, plane: u32) -> StoreResult<Box<dyn StagedWriter>> {
        let dir = self.staging_dir(scan_id);
        let fresh = !dir.exists();
        fs::create_dir_all(&dir).map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
        if fresh {
            sync_dir(&self.root.join("staging"))?;
        }
        let path = self.staged_path(scan_id, plane);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?;
        Ok(Box::new(StagedFile { file, path, unsynced: 0, syncer: None }))
    }

    fn read_staged(&self, scan_id: &str, plane: u32) -> StoreResult<Box<dyn ReadSeek>> {
        let path = self.staged_path(scan_id, plane);
        let file = File::open(&path).map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?;
        Ok(Box::new(file))
    }

    fn promote(&self, scan_id: &str, plane: u32, sha256: &str) -> StoreResult<()> {
        check_digest(sha256)?;
        let staged = self.staged_path(scan_id, plane);
        let target = self.blob_path(sha256);
        if target.exists() {
            // Same content is already stored (content addressing deduplicates).
            return Ok(());
        }
        File::open(&staged)
            .and_then(|f| f.sync_all())
            .map_err(|e| StoreError::io(format!("syncing {}", staged.display()), e))?;
        let parent = target.parent().expect("blob path has a parent");
        if !parent.exists() {
            fs::create_dir_all(parent).map_err(|e| StoreError::io(format!("creating {}", parent.display()), e))?;
            sync_dir(&self.root.join("blobs"))?;
        }
        // Hard-link rather than rename: the staged copy stays until the scan's
        // metadata is committed, so a failure in between can still resume.
        match fs::hard_link(&staged, &target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StoreError::io(format!("storing blob {}", target.display()), e)),
        }
        sync_dir(parent)
    }

    fn discard_staged(&self, scan_id: &str) -> StoreResult<()> {
        let dir = self.staging_dir(scan_id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(format!("removing {}", dir.display()), e)),
        }
    }

    fn staged_uploads(&self) -> StoreResult<Vec<String>> {
        let dir = self.root.join("staging");
        let entries = fs::read_dir(&dir).map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("listing staging", e))?;
            if let Some(name) = entry.file_name().to_str()
                && !name.starts_with('.')
            {
                ids.push(name.to_string());
            }
        }
        Ok(ids)
    }

    fn open(&self, sha256: &str) -> StoreResult<Box<dyn ReadSeek>> {
        check_digest(sha256)?;
        let path = self.blob_path(sha256);
        let file = File::open(&path).map_err(|e| StoreError::io(format!("opening blob {}", path.display()), e))?;
        Ok(Box::new(file))
    }

    fn put_blob(&self, bytes: &[u8]) -> StoreResult<String> {
        use sha2::Digest;
        let sha256 = hex::encode(sha2::Sha256::digest(bytes));
        let target = self.blob_path(&sha256);
        if target.exists() {
            return Ok(sha256);
        }
        let tmp = self.root.join("staging").join(format!(".put-{sha256}-{}", std::process::id()));
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        };
        write().map_err(|e| StoreError::io(format!("writing {}", tmp.display()), e))?;
        let parent = target.parent().expect("blob path has a parent");
        fs::create_dir_all(parent).map_err(|e| StoreError::io(format!("creating {}", parent.display()), e))?;
        fs::rename(&tmp, &target).map_err(|e| StoreError::io(format!("storing blob {}", target.display()), e))?;
        sync_dir(parent)?;
        Ok(sha256)
    }

    fn free_bytes(&self) -> StoreResult<Option<u64>> {
        let st = rustix::fs::statvfs(&self.root)
            .map_err(|e| StoreError::io(format!("reading free space of {}", self.root.display()), e.into()))?;
        Ok(Some(st.f_bavail.saturating_mul(st.f_frsize)))
    }

    fn blob_len(&self, sha256: &str) -> StoreResult<Option<u64>> {
        check_digest(sha256)?;
        match fs::metadata(self.blob_path(sha256)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("reading blob size", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    const DIGEST: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn staged_bytes_append_and_promote_to_a_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobs::open(dir.path()).unwrap();
        let id = "0b0b0b0b-0000-4000-8000-000000000001";
        assert_eq!(store.staged_len(id, 0).unwrap(), 0);
        store.append_staged(id, 0).unwrap().write_all(b"he").unwrap();
        let mut w = store.append_staged(id, 0).unwrap();
        w.write_all(b"llo").unwrap();
        w.sync().unwrap();
        assert_eq!(store.staged_len(id, 0).unwrap(), 5);
        assert_eq!(store.staged_uploads().unwrap(), vec![id.to_string()]);

        assert_eq!(store.blob_len(DIGEST).unwrap(), None);
        store.promote(id, 0, DIGEST).unwrap();
        store.promote(id, 0, DIGEST).unwrap();
        store.discard_staged(id).unwrap();
        assert!(store.staged_uploads().unwrap().is_empty());

        let mut text = String::new();
        store.open(DIGEST).unwrap().read_to_string(&mut text).unwrap();
        assert_eq!(text, "hello");
        assert_eq!(store.blob_len(DIGEST).unwrap(), Some(5));
        assert_eq!(store.put_blob(b"hello").unwrap(), DIGEST);
        let other = store.put_blob(b"map").unwrap();
        assert_eq!(store.blob_len(&other).unwrap(), Some(3));
    }

    #[test]
    fn large_staged_planes_sync_in_the_background_and_keep_every_byte() {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobs::open(dir.path()).unwrap();
        let id = "0b0b0b0b-0000-4000-8000-000000000002";
        let piece: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let pieces = 2 * SYNC_EVERY as usize / piece.len() + 3;
        let mut expected = sha2::Sha256::new();
        let mut w = store.append_staged(id, 0).unwrap();
        for i in 0..pieces {
            if i % 2 == 0 {
                w.write_all(&piece).unwrap();
            } else {
                // Short writes count too.
                let n = w.write(&piece).unwrap();
                w.write_all(&piece[n..]).unwrap();
            }
            expected.update(&piece);
        }
        w.sync().unwrap();
        w.write_all(b"tail").unwrap();
        w.sync().unwrap();
        expected.update(b"tail");
        assert_eq!(store.staged_len(id, 0).unwrap(), (pieces * piece.len() + 4) as u64);
        let digest = crate::digest::sha256_hex(store.read_staged(id, 0).unwrap()).unwrap();
        assert_eq!(digest, hex::encode(expected.finalize()));
    }

    #[test]
    fn digests_cannot_escape_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobs::open(dir.path()).unwrap();
        assert!(matches!(store.open("../../etc/passwd"), Err(StoreError::Corrupt(_))));
    }
}
