//! Decoded pyramid levels of the planes being viewed, kept in memory so
//! that panning and zooming an open scan reads tiles from memory instead of
//! decoding the stored plane again for each block of tiles.
//!
//! A plane's [`Levels`] are decoded in one pass over its rows: the first
//! kept level as box averages of the source pixels (exactly what
//! [`super::tiles::block_samples`] gives for it), each level above from the
//! one below (2x2 averages, rounded). Full resolution (level 0) is not kept
//! unless it is the only level: it is three quarters of a plane's pyramid,
//! and its tiles are rendered a band at a time as before. A very large plane
//! keeps fewer levels: the lowest from which the levels up to the top take
//! at most an eighth of the budget ([`Pyramids::first_kept`]).
//!
//! [`Pyramids`] is the bounded least-recently-used table of them, keyed by
//! scan and plane, within a byte budget (`[web] decoded_cache_mib`), with
//! its size, decodes and evictions as metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ndarray::{Array2, s};
use niix_inference::decode::{DecodeLimits, decode_rows};
use niix_inference::pipeline::PlaneInput;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::tiles::{TILE, top_level};
use crate::error::{Error, Result};

/// The kept pyramid levels of one plane, `first` up to the top.
#[derive(Debug)]
pub struct Levels {
    first: u32,
    levels: Vec<Array2<u16>>,
}

/// Samples of one level's pixels: `(height, width)` of a `width x height`
/// plane at `level`.
fn level_dim(width: u32, height: u32, level: u32) -> (usize, usize) {
    let step = 1u64 << level;
    (u64::from(height).div_ceil(step) as usize, u64::from(width).div_ceil(step) as usize)
}

/// Bytes of levels `first..=top` of a `width x height` plane.
fn bytes_from(width: u32, height: u32, first: u32) -> u64 {
    (first..=top_level(width, height))
        .map(|l| {
            let (h, w) = level_dim(width, height, l);
            (h * w * 2) as u64
        })
        .sum()
}

impl Levels {
    /// Decodes `plane` once, keeping levels `first` and up.
    pub fn decode(plane: &mut PlaneInput, first: u32) -> Result<Levels> {
        let (width, height) = (plane.width, plane.height);
        let top = top_level(width, height);
        if first > top {
            return Err(Error::Internal(format!("level {first} above the top level {top}")));
        }
        let step = 1usize << first;
        let (out_h, out_w) = level_dim(width, height, first);
        let mut level = Array2::<u16>::zeros((out_h, out_w));
        let mut sums = vec![0u64; out_w];
        let mut rows_in = 0u64;
        let decoded =
            decode_rows(&mut plane.reader, plane.encoding, width, height, &DecodeLimits::default(), |row, s| {
                let samples = &s[..width as usize];
                if step == 1 {
                    for (sum, &v) in sums.iter_mut().zip(samples) {
                        *sum += u64::from(v);
                    }
                } else {
                    for (sum, chunk) in sums.iter_mut().zip(samples.chunks(step)) {
                        *sum += chunk.iter().map(|&v| u64::from(v)).sum::<u64>();
                    }
                }
                rows_in += 1;
                if (row as usize + 1).is_multiple_of(step) || row + 1 == height {
                    let oy = row as usize / step;
                    for (ox, (out, sum)) in level.row_mut(oy).iter_mut().zip(sums.iter_mut()).enumerate() {
                        let cols = step.min(width as usize - ox * step) as u64;
                        *out = (*sum / (cols * rows_in)) as u16;
                        *sum = 0;
                    }
                    rows_in = 0;
                }
                Ok(())
            });
        decoded.map_err(|e| Error::Internal(format!("decoding plane {}: {e}", plane.kind)))?;
        let mut levels = vec![level];
        for _ in first..top {
            let below = levels.last().expect("at least the first level");
            levels.push(halve(below));
        }
        Ok(Levels { first, levels })
    }

    /// The lowest level kept.
    pub fn first(&self) -> u32 {
        self.first
    }

    /// The top level (the whole plane in one tile).
    pub fn top(&self) -> &Array2<u16> {
        self.levels.last().expect("at least one level")
    }

    /// The samples of tile (`x`, `y`) of `level`, or `None` when the level
    /// is not kept or the tile lies outside it.
    pub fn tile(&self, level: u32, x: u32, y: u32) -> Option<Array2<u16>> {
        let l = self.levels.get(level.checked_sub(self.first)? as usize)?;
        let (h, w) = l.dim();
        let t = TILE as usize;
        let (x0, y0) = (x as usize * t, y as usize * t);
        if x0 >= w || y0 >= h {
            return None;
        }
        Some(l.slice(s![y0..(y0 + t).min(h), x0..(x0 + t).min(w)]).to_owned())
    }

    /// Bytes of samples held.
    pub fn bytes(&self) -> usize {
        self.levels.iter().map(|l| l.len() * 2).sum()
    }
}

/// The next level up: each sample the rounded mean of the (up to) 2x2
/// samples below it.
fn halve(below: &Array2<u16>) -> Array2<u16> {
    let (h, w) = below.dim();
    Array2::from_shape_fn((h.div_ceil(2), w.div_ceil(2)), |(y, x)| {
        let (mut sum, mut n) = (0u32, 0u32);
        for yy in 2 * y..(2 * y + 2).min(h) {
            for xx in 2 * x..(2 * x + 2).min(w) {
                sum += u32::from(below[[yy, xx]]);
                n += 1;
            }
        }
        ((sum + n / 2) / n) as u16
    })
}

/// The decoded levels of the planes being viewed, least recently used out
/// first beyond the byte budget.
#[derive(Debug)]
pub struct Pyramids {
    budget: usize,
    inner: Mutex<Inner>,
    held: Gauge,
    decodes: Counter,
    evictions: Counter,
}

#[derive(Debug, Default)]
struct Inner {
    planes: HashMap<String, (Arc<Levels>, u64)>,
    bytes: usize,
    tick: u64,
}

/// What the table reports: bytes held (a gauge), planes decoded into it and
/// planes evicted from it (counters).
#[derive(Debug, Clone, Default)]
pub struct PyramidMetrics {
    /// Bytes of decoded levels held.
    pub held: Gauge,
    /// Planes decoded into the table.
    pub decodes: Counter,
    /// Planes evicted from the table to stay within its budget.
    pub evictions: Counter,
}

impl Pyramids {
    /// An empty table of at most `budget` bytes (0: keep nothing).
    pub fn new(budget: usize, metrics: PyramidMetrics) -> Self {
        Pyramids {
            budget,
            inner: Mutex::default(),
            held: metrics.held,
            decodes: metrics.decodes,
            evictions: metrics.evictions,
        }
    }

    /// The lowest level kept of a `width x height` plane: level 1 and up (or
    /// level 0 of a plane that has no other), or higher when those take more
    /// than an eighth of the budget; `None` when not even the top level fits.
    pub fn first_kept(&self, width: u32, height: u32) -> Option<u32> {
        let top = top_level(width, height);
        (top.min(1)..=top).find(|&l| bytes_from(width, height, l) <= (self.budget / 8) as u64)
    }

    /// The kept levels of plane `key`, marked as just used.
    pub fn get(&self, key: &str) -> Option<Arc<Levels>> {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        c.tick += 1;
        let tick = c.tick;
        let entry = c.planes.get_mut(key)?;
        entry.1 = tick;
        Some(entry.0.clone())
    }

    /// Keeps a plane's decoded levels, evicting the least recently used
    /// beyond the budget.
    pub fn put(&self, key: &str, levels: Arc<Levels>) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        c.tick += 1;
        let tick = c.tick;
        c.bytes += levels.bytes();
        if let Some((old, _)) = c.planes.insert(key.to_string(), (levels, tick)) {
            c.bytes -= old.bytes();
        }
        self.decodes.inc();
        while c.bytes > self.budget {
            let Some(oldest) = c.planes.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| k.clone()) else { break };
            if let Some((gone, _)) = c.planes.remove(&oldest) {
                c.bytes -= gone.bytes();
                self.evictions.inc();
            }
        }
        self.held.set(c.bytes as i64);
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::tiles::tile_samples;
    use niix_inference::decode::Encoding;

    fn plane(width: u32, height: u32) -> PlaneInput {
        let bytes: Vec<u8> = (0..width * height)
            .flat_map(|i| ((i % width) as u16 * 7 + (i / width) as u16 * 3 + (i % 13) as u16 * 100).to_le_bytes())
            .collect();
        PlaneInput {
            kind: "high_energy".into(),
            encoding: Encoding::RawU16Le,
            width,
            height,
            reader: Box::new(std::io::Cursor::new(bytes)),
        }
    }

    #[test]
    fn the_first_level_is_the_streamed_tiles_and_those_above_are_close() {
        // 1100x700: levels 0..=3, ragged edges at every level.
        let (w, h) = (1100, 700);
        let levels = Levels::decode(&mut plane(w, h), 1).unwrap();
        assert_eq!((levels.first(), levels.top().dim()), (1, (88, 138)));
        for (x, y) in [(0, 0), (2, 1), (1, 0)] {
            assert_eq!(levels.tile(1, x, y).unwrap(), tile_samples(&mut plane(w, h), 1, x, y).unwrap(), "{x},{y}");
        }
        for level in [2, 3] {
            let kept = levels.tile(level, 0, 0).unwrap();
            let streamed = tile_samples(&mut plane(w, h), level, 0, 0).unwrap();
            assert_eq!(kept.dim(), streamed.dim());
            let off = kept.iter().zip(&streamed).map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs()).max().unwrap();
            assert!(off <= 2, "level {level}: {off}");
        }
        assert!(levels.tile(0, 0, 0).is_none(), "level 0 is not kept");
        assert!(levels.tile(1, 3, 0).is_none(), "outside");
        assert!(levels.tile(4, 0, 0).is_none(), "above the top");
        // A plane of one tile keeps its only level.
        let one = Levels::decode(&mut plane(64, 32), 0).unwrap();
        assert_eq!(one.tile(0, 0, 0).unwrap(), tile_samples(&mut plane(64, 32), 0, 0, 0).unwrap());
    }

    #[test]
    fn the_table_stays_within_its_budget_and_counts() {
        let metrics = PyramidMetrics::default();
        // Levels 1.. of a 2048x6144 plane: 8 MiB. An eighth of 80 MiB holds them.
        let table = Pyramids::new(80 << 20, metrics.clone());
        assert_eq!(table.first_kept(2048, 6144), Some(1));
        assert_eq!(table.first_kept(16384, 32768), Some(4), "levels 4.. of the largest scans: 5.3 MiB");
        assert_eq!(table.first_kept(64, 32), Some(0));
        assert_eq!(Pyramids::new(0, PyramidMetrics::default()).first_kept(64, 32), None);
        let levels = Arc::new(Levels::decode(&mut plane(1100, 700), 1).unwrap());
        let each = levels.bytes();
        let fit = (80 << 20) / each;
        for i in 0..fit + 3 {
            table.put(&format!("s{i}/0"), levels.clone());
            table.get("s0/0"); // kept recent
        }
        assert!(table.bytes() <= 80 << 20);
        assert_eq!(metrics.held.get() as usize, table.bytes());
        assert_eq!((metrics.decodes.get(), metrics.evictions.get()), ((fit + 3) as u64, 3));
        assert!(table.get("s0/0").is_some());
        assert!(table.get("s1/0").is_none(), "the least recently used went first");
        assert!(table.get(&format!("s{}/0", fit + 2)).is_some());
    }
}
