//! Image content of packages, rendered once and kept.
//!
//! Building a package may decode the scan's planes: for the downsampled
//! planes (`findings_planes`), the overlay (`findings_overlay`), and the
//! pixel-only copy of each plane that a full-planes agreement sends instead
//! of the file the scanner pushed ([`pixel_plane`]). [`Renderings`] makes each
//! rendering once per key while it is cached: callers asking for a key being
//! rendered wait for that result, and at most [`RENDER_PERMITS`] renderings
//! run at once. Parallel fetches of one large scan therefore cost one decode,
//! and fetches of many scans at most [`RENDER_PERMITS`] decodes at a time.
//! Pixel-only planes are kept in the blob store (content-addressed); the
//! cache holds their digests, the downsampled planes and the overlays, up to
//! [`CACHE_BYTES`] (oldest dropped first). After a restart a rendering is made
//! again once; a pixel-only plane then has the same digest as before.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use niix_inference::decode::{DecodeLimits, decode_rows};
use niix_proto::v1::{PlaneDescriptor, PlaneEncoding, PlaneImage, RenderOverlayRequest};
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use sha2::{Digest, Sha256};

use super::images;
use crate::error::{Error, Result};
use crate::findings::render_scan;
use crate::store::{BlobStore, MetadataStore, PlaneDigest, ScanRecord};

/// Renderings running at once (each decodes planes).
pub const RENDER_PERMITS: usize = 2;
/// Cached downsampled planes and overlays, in bytes.
pub const CACHE_BYTES: usize = 64 << 20;

/// What is rendered, and from what.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// Every plane of a scan, downsampled to at most `max_width` pixels.
    PlaneImages {
        /// The scan.
        scan_id: String,
        /// The agreement's `plane_width`.
        max_width: u32,
    },
    /// The overlay of one plane with the scan's reports at the time.
    Overlay {
        /// The scan.
        scan_id: String,
        /// The plane drawn.
        plane_index: u32,
        /// SHA-256 of the reports drawn.
        reports: String,
    },
    /// The pixel-only copy of a stored plane.
    PixelPlane {
        /// SHA-256 of the stored plane.
        sha256: String,
    },
}

/// A rendering.
#[derive(Debug, Clone)]
pub enum Rendering {
    /// Downsampled planes, in plane order.
    PlaneImages(Vec<PlaneImage>),
    /// An overlay PNG.
    Overlay(Vec<u8>),
    /// A pixel-only plane in the blob store.
    PixelPlane(PlaneDigest),
}

impl Rendering {
    fn bytes(&self) -> usize {
        match self {
            Rendering::PlaneImages(v) => v.iter().map(|i| i.png.len() + 32).sum(),
            Rendering::Overlay(v) => v.len(),
            Rendering::PixelPlane(d) => d.sha256.len() + 16,
        }
    }
}

type Slot = Arc<Mutex<Option<Rendering>>>;

#[derive(Default)]
struct Cache {
    slots: HashMap<Key, Slot>,
    kept: VecDeque<(Key, usize)>,
    bytes: usize,
}

/// Renderings made once, at most [`RENDER_PERMITS`] at a time.
pub struct Renderings {
    cache: Mutex<Cache>,
    running: Mutex<usize>,
    freed: Condvar,
    renders: Counter,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Renderings {
    /// Counts each rendering made in `renders`.
    pub fn new(renders: Counter) -> Self {
        Renderings { cache: Mutex::default(), running: Mutex::new(0), freed: Condvar::new(), renders }
    }

    /// The rendering of `key`: cached, or made by `render` (blocking).
    pub fn get(&self, key: Key, render: impl FnOnce() -> Result<Rendering>) -> Result<Rendering> {
        let slot = lock(&self.cache).slots.entry(key.clone()).or_default().clone();
        // Held while rendering: a second caller of the same key waits here.
        let mut value = lock(&slot);
        if let Some(v) = value.as_ref() {
            return Ok(v.clone());
        }
        let made = {
            let _permit = self.permit();
            render()
        };
        self.renders.inc();
        let mut cache = lock(&self.cache);
        match made {
            Ok(v) => {
                *value = Some(v.clone());
                let size = v.bytes();
                cache.kept.push_back((key, size));
                cache.bytes += size;
                while cache.bytes > CACHE_BYTES && cache.kept.len() > 1 {
                    let (old, size) = cache.kept.pop_front().expect("more than one kept");
                    cache.bytes -= size;
                    cache.slots.remove(&old);
                }
                Ok(v)
            }
            Err(e) => {
                // Not kept: the next caller tries again.
                if cache.slots.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                    cache.slots.remove(&key);
                }
                Err(e)
            }
        }
    }

    fn permit(&self) -> Permit<'_> {
        let mut running = lock(&self.running);
        while *running >= RENDER_PERMITS {
            running = self.freed.wait(running).unwrap_or_else(|p| p.into_inner());
        }
        *running += 1;
        Permit(self)
    }
}

struct Permit<'a>(&'a Renderings);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *lock(&self.0.running) -= 1;
        self.0.freed.notify_one();
    }
}

/// Package content, each piece rendered once through the cache.
impl Renderings {
    /// The overlay of `plane_index` with the scan's reports, rendered once.
    pub fn overlay(
        &self,
        meta: &dyn MetadataStore,
        blobs: &dyn BlobStore,
        record: &ScanRecord,
        plane_index: u32,
    ) -> Result<Vec<u8>> {
        let all = meta.reports(&record.scan_id)?;
        let mut hasher = Sha256::new();
        all.iter().for_each(|r| hasher.update(r.encode_length_delimited_to_vec()));
        let drawn = hex::encode(hasher.finalize());
        let key = Key::Overlay { scan_id: record.scan_id.clone(), plane_index, reports: drawn };
        let rendered = self.get(key, || {
            let req = RenderOverlayRequest {
                scan_id: record.scan_id.clone(),
                plane_index,
                max_width: 1024,
                ..Default::default()
            };
            Ok(Rendering::Overlay(render_scan(blobs, record, &all, &req)?.png))
        })?;
        match rendered {
            Rendering::Overlay(png) => Ok(png),
            other => Err(Error::Internal(format!("overlay cache holds {other:?}"))),
        }
    }

    /// Every plane downsampled to at most `max_width`, rendered once.
    pub fn plane_images(&self, blobs: &dyn BlobStore, record: &ScanRecord, max_width: u32) -> Result<Vec<PlaneImage>> {
        let key = Key::PlaneImages { scan_id: record.scan_id.clone(), max_width };
        let rendered = self.get(key, || Ok(Rendering::PlaneImages(images::plane_images(blobs, record, max_width)?)))?;
        match rendered {
            Rendering::PlaneImages(v) => Ok(v),
            other => Err(Error::Internal(format!("plane image cache holds {other:?}"))),
        }
    }

    /// The pixel-only copy of plane `index`, in the blob store, made once.
    pub fn pixel_plane(&self, blobs: &dyn BlobStore, record: &ScanRecord, index: usize) -> Result<PlaneDigest> {
        let sha256 = record.planes.get(index).map(|p| p.sha256.clone()).unwrap_or_default();
        let rendered =
            self.get(Key::PixelPlane { sha256 }, || Ok(Rendering::PixelPlane(pixel_plane(blobs, record, index)?)))?;
        match rendered {
            Rendering::PixelPlane(d) => Ok(d),
            other => Err(Error::Internal(format!("pixel plane cache holds {other:?}"))),
        }
    }
}

/// The descriptor of what a full-planes partner receives for plane `d`:
/// row-major little-endian u16 samples, nothing else, with `sent`'s digest.
pub fn pixel_descriptor(d: &PlaneDescriptor, sent: &PlaneDigest) -> PlaneDescriptor {
    PlaneDescriptor {
        encoding: PlaneEncoding::RawU16le as i32,
        byte_length: sent.byte_length,
        sha256: sent.sha256.clone(),
        ..d.clone()
    }
}

/// The pixel-only copy of plane `index` of a stored scan: its samples as
/// RAW_U16LE, without anything else the pushed file carried (TIFF tags, PNG
/// text chunks, DICOS attributes such as the operator or the container).
/// A RAW_U16LE plane is pixels only already and is its own copy; any other
/// is decoded row by row into a new blob.
pub fn pixel_plane(blobs: &dyn BlobStore, record: &ScanRecord, index: usize) -> Result<PlaneDigest> {
    let (Some(d), Some(stored)) = (record.header.planes.get(index), record.planes.get(index)) else {
        return Err(Error::NotFound(format!("plane {index} of scan {} is not stored", record.scan_id)));
    };
    let encoding = crate::header::decoder_encoding(d.encoding)
        .ok_or_else(|| Error::Internal(format!("stored plane with encoding {}", d.encoding)))?;
    if encoding == niix_inference::decode::Encoding::RawU16Le {
        return Ok(PlaneDigest::full(stored.sha256.clone(), stored.byte_length));
    }
    let staging = format!("render-{}", uuid::Uuid::new_v4().hyphenated());
    let result = write_pixels(blobs, &staging, d, &stored.sha256, encoding);
    let _ = blobs.discard_staged(&staging);
    result
}

fn write_pixels(
    blobs: &dyn BlobStore,
    staging: &str,
    d: &PlaneDescriptor,
    sha256: &str,
    encoding: niix_inference::decode::Encoding,
) -> Result<PlaneDigest> {
    let mut out = blobs.append_staged(staging, 0)?;
    let mut hasher = Sha256::new();
    let mut length = 0u64;
    let mut buf = Vec::with_capacity(d.width as usize * 2);
    decode_rows(blobs.open(sha256)?, encoding, d.width, d.height, &DecodeLimits::default(), |_, row| {
        buf.clear();
        buf.extend(row.iter().flat_map(|v| v.to_le_bytes()));
        hasher.update(&buf);
        length += buf.len() as u64;
        out.write_all(&buf).map_err(|e| format!("writing the pixel-only plane: {e}"))
    })
    .map_err(|e| Error::Internal(format!("decoding stored plane {sha256}: {e}")))?;
    out.flush().map_err(|e| Error::Internal(format!("writing the pixel-only plane: {e}")))?;
    out.sync()?;
    drop(out);
    let digest = hex::encode(hasher.finalize());
    blobs.promote(staging, 0, &digest)?;
    Ok(PlaneDigest::full(digest, length))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn a_key_is_rendered_once_and_parallel_callers_share_it() {
        let renders = Counter::default();
        let r = Arc::new(Renderings::new(renders.clone()));
        let calls = Arc::new(AtomicUsize::new(0));
        let key = Key::Overlay { scan_id: "s".into(), plane_index: 0, reports: "r".into() };
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (r, calls, key) = (r.clone(), calls.clone(), key.clone());
                std::thread::spawn(move || {
                    r.get(key, || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        Ok(Rendering::Overlay(vec![1, 2, 3]))
                    })
                    .unwrap()
                })
            })
            .collect();
        for t in threads {
            assert!(matches!(t.join().unwrap(), Rendering::Overlay(v) if v == [1, 2, 3]));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(renders.get(), 1);
    }

    #[test]
    fn a_failed_rendering_is_tried_again() {
        let r = Renderings::new(Counter::default());
        let key = Key::PixelPlane { sha256: "x".into() };
        assert!(r.get(key.clone(), || Err(Error::Internal("disk".into()))).is_err());
        assert!(r.get(key, || Ok(Rendering::Overlay(vec![]))).is_ok());
    }

    #[test]
    fn no_more_than_the_permits_render_at_once() {
        let r = Arc::new(Renderings::new(Counter::default()));
        let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let threads: Vec<_> = (0..6)
            .map(|i| {
                let (r, now, peak) = (r.clone(), now.clone(), peak.clone());
                std::thread::spawn(move || {
                    r.get(Key::PixelPlane { sha256: i.to_string() }, || {
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(n, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(30));
                        now.fetch_sub(1, Ordering::SeqCst);
                        Ok(Rendering::Overlay(vec![]))
                    })
                    .unwrap()
                })
            })
            .collect();
        threads.into_iter().for_each(|t| drop(t.join().unwrap()));
        assert!(peak.load(Ordering::SeqCst) <= RENDER_PERMITS);
    }
}
