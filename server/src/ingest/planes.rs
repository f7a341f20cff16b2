//! Per-plane work of a push: hashing and staging chunks off the async
//! runtime, and checking a complete plane against its descriptor.

use std::io::{self, Write};
use std::sync::Arc;

use niix_inference::decode::{DecodeError, DecodeLimits, Encoding, decode_rows};
use niix_proto::v1::PlaneDescriptor;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::digest::HashingWriter;
use crate::error::{Error, Result};
use crate::store::{BlobStore, StagedWriter};

/// Chunks in flight between the network and the disk, per upload.
const CHUNKS_IN_FLIGHT: usize = 4;

/// Receives one plane's chunks, hashes them and (unless hash-only) appends
/// them to the staging area, on a blocking thread.
pub struct PlaneSink {
    tx: mpsc::Sender<Vec<u8>>,
    task: JoinHandle<Result<String>>,
}

impl PlaneSink {
    /// A sink that stages the bytes. With `resume`, the bytes already staged
    /// are hashed first so the digest covers the whole plane.
    pub fn staged(blobs: Arc<dyn BlobStore>, scan_id: &str, plane: u32, resume: bool) -> Self {
        let id = scan_id.to_string();
        Self::spawn(move |rx| {
            let mut hasher = Sha256::new();
            if resume {
                let mut staged = blobs.read_staged(&id, plane)?;
                io::copy(&mut staged, &mut HashingWriter(&mut hasher))
                    .map_err(|e| Error::Internal(format!("re-reading staged plane {plane}: {e}")))?;
            }
            let mut writer: Option<Box<dyn StagedWriter>> = None;
            let result = consume(rx, &mut hasher, |buf| {
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
            result.map(|()| hex::encode(hasher.finalize()))
        })
    }

    /// A sink that only hashes (to compare a repeated push with the stored scan).
    pub fn hash_only() -> Self {
        Self::spawn(|rx| {
            let mut hasher = Sha256::new();
            consume(rx, &mut hasher, |_| Ok(()))?;
            Ok(hex::encode(hasher.finalize()))
        })
    }

    fn spawn<F>(work: F) -> Self
    where
        F: FnOnce(mpsc::Receiver<Vec<u8>>) -> Result<String> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        PlaneSink { tx, task: tokio::task::spawn_blocking(move || work(rx)) }
    }

    /// Hands a chunk to the writer (waits while the writer is behind).
    pub async fn send(&self, chunk: Vec<u8>) -> Result<()> {
        if self.tx.send(chunk).await.is_err() {
            // The writer stopped early: its error is reported by finish().
            return Err(Error::Internal("plane writer stopped".into()));
        }
        Ok(())
    }

    /// Waits for every chunk to be written and synced; returns the hex SHA-256.
    pub async fn finish(self) -> Result<String> {
        drop(self.tx);
        self.task.await.map_err(|e| Error::Internal(format!("plane writer failed: {e}")))?
    }
}

fn consume(
    mut rx: mpsc::Receiver<Vec<u8>>,
    hasher: &mut Sha256,
    mut write: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    while let Some(buf) = rx.blocking_recv() {
        hasher.update(&buf);
        write(&buf)?;
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
