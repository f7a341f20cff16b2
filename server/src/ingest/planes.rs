//! Per-plane work of a push: hashing and staging chunks off the async
//! runtime, and checking a complete plane against its descriptor.

use std::io::Write;
use std::sync::Arc;

use niix_inference::decode::{DecodeError, DecodeLimits, Encoding, decode_rows};
use niix_proto::v1::PlaneDescriptor;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::digest::hash_from;
use crate::error::{Error, Result};
use crate::store::{BlobStore, StagedWriter};

/// Chunks in flight between the network and each of the hasher and the
/// writer, per upload (the two queues share the chunks).
const CHUNKS_IN_FLIGHT: usize = 8;

/// A chunk shared by the hasher and the writer: a slice of the receive
/// buffer, reference-counted (no copy).
type Chunk = prost::bytes::Bytes;

/// One blocking thread fed through a bounded channel.
struct Stage<T> {
    tx: mpsc::Sender<Chunk>,
    task: JoinHandle<Result<T>>,
}

impl<T: Send + 'static> Stage<T> {
    fn spawn<F>(work: F) -> Self
    where
        F: FnOnce(mpsc::Receiver<Chunk>) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        Stage { tx, task: tokio::task::spawn_blocking(move || work(rx)) }
    }

    async fn send(&self, chunk: Chunk, what: &str) -> Result<()> {
        if self.tx.send(chunk).await.is_err() {
            // The thread stopped early: its error is reported by finish().
            return Err(Error::Internal(format!("plane {what} stopped")));
        }
        Ok(())
    }
}

/// Receives one plane's chunks; hashes them on one blocking thread and
/// (unless hash-only) appends them to the staging area on another, so
/// hashing and writing overlap.
pub struct PlaneSink {
    hasher: Stage<String>,
    writer: Option<Stage<()>>,
}

impl PlaneSink {
    /// A sink that stages the bytes. With `resume`, the bytes already staged
    /// are hashed first so the digest covers the whole plane; the writer
    /// appends only once they are read.
    pub fn staged(blobs: Arc<dyn BlobStore>, scan_id: &str, plane: u32, resume: bool) -> Self {
        let id = scan_id.to_string();
        // Dropped by the hasher once it has read what was staged before this push.
        let (reread, reread_done) = std::sync::mpsc::sync_channel::<()>(0);
        let staged = resume.then(|| (blobs.clone(), id.clone()));
        let hasher = Stage::spawn(move |rx| {
            let mut hasher = Sha256::new();
            if let Some((blobs, id)) = staged {
                let reader = blobs.read_staged(&id, plane)?;
                hash_from(&mut hasher, reader)
                    .map_err(|e| Error::Internal(format!("re-reading staged plane {plane}: {e}")))?;
            }
            drop(reread);
            hash_rest(hasher, rx)
        });
        let writer = Stage::spawn(move |rx| {
            // Returns when the hasher is past the staged bytes (or failed: finish reports why).
            let _ = reread_done.recv();
            let mut writer: Option<Box<dyn StagedWriter>> = None;
            let result = consume(rx, |buf| {
                let w = match &mut writer {
                    Some(w) => w,
                    None => writer.insert(blobs.append_staged(&id, plane)?),
                };
                w.write_all(buf).map_err(|e| Error::Internal(format!("writing staged plane {plane}: {e}")))
            });
            // Whatever happened, make the bytes written so far durable for a resume.
            if let Some(w) = &mut writer {
                w.sync()?;
            }
            result
        });
        PlaneSink { hasher, writer: Some(writer) }
    }

    /// A sink that only hashes (to compare a repeated push with the stored scan).
    pub fn hash_only() -> Self {
        PlaneSink { hasher: Stage::spawn(|rx| hash_rest(Sha256::new(), rx)), writer: None }
    }

    /// Hands a chunk to the writer and the hasher (waits while either is behind).
    pub async fn send(&self, chunk: Chunk) -> Result<()> {
        if let Some(writer) = &self.writer {
            writer.send(chunk.clone(), "writer").await?;
        }
        self.hasher.send(chunk, "hasher").await
    }

    /// Waits for every chunk to be hashed, written and synced; returns the hex SHA-256.
    pub async fn finish(self) -> Result<String> {
        let PlaneSink { hasher, writer } = self;
        // Close both channels before waiting, so neither thread waits for the other.
        drop(hasher.tx);
        let writer = writer.map(|w| {
            drop(w.tx);
            w.task
        });
        let digest = hasher.task.await.map_err(|e| Error::Internal(format!("plane hasher failed: {e}")));
        if let Some(task) = writer {
            // A writer failure is the root cause of any "hasher stopped" or "writer stopped" error.
            task.await.map_err(|e| Error::Internal(format!("plane writer failed: {e}")))??;
        }
        digest?
    }
}

/// Feeds every chunk still to come to `hasher` (which may have seen staged
/// bytes already); the hex digest of it all.
fn hash_rest(mut hasher: Sha256, rx: mpsc::Receiver<Chunk>) -> Result<String> {
    consume(rx, |buf| {
        hasher.update(buf);
        Ok(())
    })?;
    Ok(hex::encode(hasher.finalize()))
}

fn consume(mut rx: mpsc::Receiver<Chunk>, mut each: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
    while let Some(buf) = rx.blocking_recv() {
        each(&buf)?;
    }
    Ok(())
}

/// Checks that a complete staged plane is what its descriptor says: a
/// decodable image of the declared size and bit depth.
pub fn check_plane_bytes(blobs: &dyn BlobStore, scan_id: &str, plane: u32, d: &PlaneDescriptor) -> Result<()> {
    let encoding = match crate::header::decoder_encoding(d.encoding) {
        // Size already checked; any u16 is valid.
        Some(Encoding::RawU16Le) if d.bits_stored >= 16 => return Ok(()),
        Some(e) => e,
        None => return Err(Error::InvalidArgument(format!("plane {plane}: unsupported encoding {}", d.encoding))),
    };
    let reader = blobs.read_staged(scan_id, plane)?;
    let ceiling: u32 = 1 << d.bits_stored;
    let info = decode_rows(reader, encoding, d.width, d.height, &DecodeLimits::default(), |y, row| {
        match row.iter().position(|&v| u32::from(v) >= ceiling) {
            Some(x) => {
                Err(format!("sample {} at row {y}, column {x} does not fit in bits_stored = {}", row[x], d.bits_stored))
            }
            None => Ok(()),
        }
    })
    .map_err(|e| match e {
        DecodeError::TooLarge(m) => Error::ResourceExhausted(format!("plane {plane}: {m}")),
        DecodeError::Io(io) => Error::Internal(format!("plane {plane}: reading staged bytes: {io}")),
        other => Error::InvalidArgument(format!("plane {plane}: {other}")),
    })?;
    if u32::from(info.bits_per_sample) < d.bits_stored {
        return Err(Error::InvalidArgument(format!(
            "plane {plane}: the file has {}-bit samples but bits_stored says {}",
            info.bits_per_sample, d.bits_stored
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::Arc;

    use sha2::{Digest, Sha256};

    use super::PlaneSink;
    use crate::store::{BlobStore, FsBlobs};

    const ID: &str = "0c0c0c0c-0000-4000-8000-000000000001";

    fn store() -> (tempfile::TempDir, Arc<dyn BlobStore>) {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Arc::new(FsBlobs::open(dir.path()).unwrap());
        (dir, blobs)
    }

    fn sha256(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[tokio::test]
    async fn a_resumed_plane_hashes_the_staged_bytes_before_the_new_ones() {
        let (_dir, blobs) = store();
        let first = PlaneSink::staged(blobs.clone(), ID, 0, false);
        first.send(b"hello ".to_vec().into()).await.unwrap();
        assert_eq!(first.finish().await.unwrap(), sha256(b"hello "));

        let resumed = PlaneSink::staged(blobs.clone(), ID, 0, true);
        for piece in [&b"wor"[..], b"ld"] {
            resumed.send(piece.to_vec().into()).await.unwrap();
        }
        assert_eq!(resumed.finish().await.unwrap(), sha256(b"hello world"));
        let mut staged = String::new();
        blobs.read_staged(ID, 0).unwrap().read_to_string(&mut staged).unwrap();
        assert_eq!(staged, "hello world");
    }

    #[tokio::test]
    async fn a_hash_only_sink_stages_nothing() {
        let (_dir, blobs) = store();
        let sink = PlaneSink::hash_only();
        sink.send(b"hello".to_vec().into()).await.unwrap();
        assert_eq!(sink.finish().await.unwrap(), sha256(b"hello"));
        assert!(blobs.staged_uploads().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_writer_failure_is_what_finish_reports() {
        let (dir, blobs) = store();
        // A file where the upload's staging directory should go: the writer cannot open the plane.
        std::fs::write(dir.path().join("staging").join(ID), b"in the way").unwrap();
        let sink = PlaneSink::staged(blobs, ID, 0, false);
        let mut sent = 0;
        while sent < 64 && sink.send(vec![7u8; 1024].into()).await.is_ok() {
            sent += 1;
        }
        let err = sink.finish().await.unwrap_err();
        assert!(err.to_string().contains("staging"), "{err}");
    }
}
