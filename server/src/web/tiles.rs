//! The console's tile pyramid: 256x256 PNG tiles of a stored 16-bit plane,
//! rendered on demand and kept in a bounded cache.
//!
//! Level 0 is full resolution; each level above halves both sides (box
//! average of `2^level x 2^level` source pixels), up to the level where the
//! whole plane fits one tile. The levels the console keeps decoded
//! ([`super::pyramid`]) are cut from memory; the others are rendered by
//! streaming the plane's rows through
//! `niix_inference::decode::decode_rows_from` and keeping only the sums of
//! the tile's own output pixels, so memory per tile is bounded by the tile
//! (and one decoded row or strip), never the plane; decoding starts at the
//! strip holding the tile's first row (raw and TIFF planes; PNG and DICOS
//! from the top) and stops after its last.
//!
//! Display is done on the server, chosen by query parameters (see
//! docs/protocol.md): the window (`wl`..`wh`, default the plane's 0.5th to
//! 99.5th percentile, computed on the top tile), `gamma`, `invert`, and
//! `material=1`, which colours a dual-energy scan from its high- and
//! low-energy planes under the scanner's material calibration
//! ([`Calibration::classify`]: organic orange, mixed green, inorganic blue,
//! impenetrable black, air white), each plane relative to its own air level,
//! taken as the top of the plane's automatic window. Tiles are 8-bit: a
//! browser draws 8-bit images, and each window change is a new request,
//! answered from the cache when seen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ndarray::Array2;
use niix_inference::decode::{DecodeLimits, decode_rows_from};
use niix_inference::decode_shared::DecodeError;
use niix_proto::v1::PlaneKind;

use crate::error::{Error, Result};
use crate::store::ScanRecord;

/// Side of a tile, in output pixels.
pub const TILE: u32 = 256;
/// Bytes of rendered tiles the cache keeps.
pub const CACHE_BYTES: usize = 64 << 20;
/// What a sink returns to stop decoding after the tile's last row.
const DONE: &str = "tile complete";

/// How to draw one tile.
#[derive(Debug, Clone, PartialEq)]
pub struct TileSpec {
    /// Plane index within the scan.
    pub plane: usize,
    /// Pyramid level (0 = full resolution).
    pub level: u32,
    /// Tile column.
    pub x: u32,
    /// Tile row.
    pub y: u32,
    /// Display window; `None`: the plane's automatic window.
    pub window: Option<(u16, u16)>,
    /// Display gamma (1 = linear).
    pub gamma: f32,
    /// Dense objects bright instead of dark.
    pub invert: bool,
    /// Dual-energy material colouring.
    pub material: bool,
    /// Edge enhancement ([`enhance_edges`]).
    pub edge: bool,
}

impl TileSpec {
    fn key(&self, scan_id: &str) -> String {
        format!("{scan_id}/{self:?}")
    }
}

/// The highest pyramid level of a `width x height` plane (one tile).
pub fn top_level(width: u32, height: u32) -> u32 {
    let mut level = 0;
    while (width.max(height) >> level) > TILE {
        level += 1;
    }
    level
}

/// Source pixels a tile covers, and its output size.
struct Grid {
    x0: u64,
    y0: u64,
    step: u64,
    out_w: usize,
    out_h: usize,
}

fn grid(width: u32, height: u32, level: u32, x: u32, y: u32, (cols, rows): (u32, u32)) -> Result<Grid> {
    let top = top_level(width, height);
    if level > top {
        return Err(Error::InvalidArgument(format!("level {level} does not exist; this plane has levels 0..={top}")));
    }
    let step = 1u64 << level;
    let span = u64::from(TILE) * step;
    let (x0, y0) = (u64::from(x) * span, u64::from(y) * span);
    if x0 >= u64::from(width) || y0 >= u64::from(height) {
        return Err(Error::NotFound(format!("tile {x},{y} of level {level} lies outside the {width}x{height} plane")));
    }
    let out_w = (u64::from(width) - x0).div_ceil(step).min(u64::from(TILE) * u64::from(cols.max(1))) as usize;
    let out_h = (u64::from(height) - y0).div_ceil(step).min(u64::from(TILE) * u64::from(rows.max(1))) as usize;
    Ok(Grid { x0, y0, step, out_w, out_h })
}

/// A tile's column and row, or a block's columns and rows.
pub type Cell = (u32, u32);

/// Output pixels of a pyramid level up to which the whole level is rendered
/// in one pass over the plane (12 bytes each while summing): at the zoom of
/// a whole-scan view every tile of the level is asked for at once, and each
/// pass reads the plane from its top.
pub const WHOLE_LEVEL_PIXELS: u64 = 1 << 20;
/// Tile columns of one row rendered together below that.
pub const BAND: u32 = 8;

/// The block of tiles rendered together with tile (`x`, `y`) of `level` of
/// a `width x height` plane: its first column and row and its columns and
/// rows. The whole level when it is small ([`WHOLE_LEVEL_PIXELS`]), else
/// the [`BAND`] tiles of the tile's row around it.
pub fn block_of(width: u32, height: u32, level: u32, x: u32, y: u32) -> (Cell, Cell) {
    let step = 1u64.checked_shl(level).unwrap_or(u64::MAX);
    let (w, h) = (u64::from(width).div_ceil(step), u64::from(height).div_ceil(step));
    if w * h <= WHOLE_LEVEL_PIXELS {
        let tiles = |n: u64| n.div_ceil(u64::from(TILE)) as u32;
        ((0, 0), (tiles(w), tiles(h)))
    } else {
        ((x / BAND * BAND, y), (BAND, 1))
    }
}

/// The tile's 16-bit samples (box averages), read by rows from `plane`.
pub fn tile_samples(
    plane: &mut niix_inference::pipeline::PlaneInput,
    level: u32,
    x: u32,
    y: u32,
) -> Result<Array2<u16>> {
    block_samples(plane, level, (x, y), (1, 1))
}

/// The samples of `count` neighbouring tiles of one tile row, from tile
/// column `x` on (fewer at the plane's edge), in one pass over the rows.
pub fn band_samples(
    plane: &mut niix_inference::pipeline::PlaneInput,
    level: u32,
    x: u32,
    y: u32,
    count: u32,
) -> Result<Array2<u16>> {
    block_samples(plane, level, (x, y), (count, 1))
}

/// The samples of a block of `cols x rows` tiles from tile (`x`, `y`) on
/// (fewer at the plane's edges), in one pass over the rows: the viewer asks
/// for the neighbours next, and a plane's rows are read from its top
/// whichever tile is wanted. Split with [`split_block`].
pub fn block_samples(
    plane: &mut niix_inference::pipeline::PlaneInput,
    level: u32,
    (x, y): (u32, u32),
    shape: (u32, u32),
) -> Result<Array2<u16>> {
    let g = grid(plane.width, plane.height, level, x, y, shape)?;
    let mut sums = vec![0u64; g.out_w * g.out_h];
    let mut counts = vec![0u32; g.out_w * g.out_h];
    let y_end = (g.y0 + g.step * g.out_h as u64).min(u64::from(plane.height));
    let x_end = (g.x0 + g.step * g.out_w as u64).min(u64::from(plane.width)) as usize;
    // Raw planes and TIFF strips are read from the block's first row on.
    let decoded = decode_rows_from(
        &mut plane.reader,
        plane.encoding,
        plane.width,
        plane.height,
        &DecodeLimits::default(),
        g.y0 as u32,
        |row, s| {
            let row = u64::from(row);
            if row < g.y0 {
                return Ok(());
            }
            if row >= y_end {
                return Err(DONE.into());
            }
            let oy = ((row - g.y0) / g.step) as usize;
            let base = oy * g.out_w;
            let (sums, counts) = (&mut sums[base..base + g.out_w], &mut counts[base..base + g.out_w]);
            let samples = &s[g.x0 as usize..x_end];
            if g.step == 1 {
                for ((sum, count), &v) in sums.iter_mut().zip(counts.iter_mut()).zip(samples) {
                    *sum += u64::from(v);
                    *count += 1;
                }
            } else {
                for ((sum, count), chunk) in sums.iter_mut().zip(counts.iter_mut()).zip(samples.chunks(g.step as usize))
                {
                    *sum += chunk.iter().map(|&v| u64::from(v)).sum::<u64>();
                    *count += chunk.len() as u32;
                }
            }
            if row + 1 == y_end { Err(DONE.into()) } else { Ok(()) }
        },
    );
    match decoded {
        Ok(_) => {}
        Err(DecodeError::Sink(m)) if m == DONE => {}
        Err(e) => return Err(Error::Internal(format!("decoding plane {}: {e}", plane.kind))),
    }
    let samples = sums.iter().zip(&counts).map(|(s, c)| (s / u64::from((*c).max(1))) as u16).collect();
    Array2::from_shape_vec((g.out_h, g.out_w), samples).map_err(|e| Error::Internal(format!("tile shape: {e}")))
}

/// A band of [`band_samples`] cut into its tiles, left to right.
pub fn split_band(band: &Array2<u16>) -> Vec<Array2<u16>> {
    split_block(band).into_iter().map(|(_, t)| t).collect()
}

/// A block of [`block_samples`] cut into its tiles, row by row, each with
/// its column and row within the block.
pub fn split_block(block: &Array2<u16>) -> Vec<(Cell, Array2<u16>)> {
    let (h, w) = block.dim();
    let t = TILE as usize;
    let mut out = Vec::new();
    for j in 0..h.div_ceil(t) {
        for i in 0..w.div_ceil(t) {
            let tile = block.slice(ndarray::s![j * t..((j + 1) * t).min(h), i * t..((i + 1) * t).min(w)]).to_owned();
            out.push(((i as u32, j as u32), tile));
        }
    }
    out
}

/// Edge enhancement: adds the sample's difference from its four
/// neighbours' mean (a Laplacian sharpening; the tile's border repeats).
pub fn enhance_edges(samples: &Array2<u16>) -> Array2<u16> {
    let (h, w) = samples.dim();
    Array2::from_shape_fn((h, w), |(y, x)| {
        let at = |yy: usize, xx: usize| i32::from(samples[[yy.min(h - 1), xx.min(w - 1)]]);
        let v = at(y, x);
        let around = at(y.saturating_sub(1), x) + at(y + 1, x) + at(y, x.saturating_sub(1)) + at(y, x + 1);
        (5 * v - around).clamp(0, 65535) as u16
    })
}

/// Grey level 0..=1 of a sample under a window, gamma and inversion.
/// Without inversion dense matter (low transmission) is dark.
fn grey(v: u16, (lo, hi): (u16, u16), gamma: f32, invert: bool) -> f32 {
    let t = ((f32::from(v) - f32::from(lo)) / f32::from(hi.saturating_sub(lo).max(1))).clamp(0.0, 1.0);
    let t = if gamma == 1.0 { t } else { t.powf(1.0 / gamma) };
    if invert { 1.0 - t } else { t }
}

pub use crate::material::{AIR_ATTENUATION, Calibration, HEAVY_ATTENUATION, Material};

/// Side of the box over which attenuations are averaged before classifying
/// (the ratio of two noisy attenuations is noisier still: at level 0 a single
/// pixel's R scatters by about 0.01, as much as the classes lie apart).
const MATERIAL_SMOOTHING: usize = 5;

/// `ln(v)` of every 16-bit sample (`v` at least 1), computed once: a
/// tile's attenuations are then one subtraction per sample.
fn ln_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| (0..=u16::MAX).map(|v| f32::from(v.max(1)).ln()).collect())
}

/// Attenuation `ln(air / v)` of each sample (`v` at least 1).
fn attenuation(samples: &Array2<u16>, air: u16) -> Array2<f32> {
    let ln = ln_table();
    let ln_air = f32::from(air.max(2)).ln();
    samples.mapv(|v| (ln_air - ln[usize::from(v)]).max(0.0))
}

/// The mean over a `side x side` box around each value (clamped at the
/// edges), by running sums along rows, then down columns.
fn box_mean(a: &Array2<f32>, side: usize) -> Array2<f32> {
    let r = side / 2;
    let (h, w) = a.dim();
    let span = |k: usize, n: usize| (k.saturating_sub(r), (k + r + 1).min(n));
    // Along rows.
    let mut along = Array2::<f32>::zeros((h, w));
    let mut prefix = vec![0f64; w + 1];
    for (row, mut dst) in a.rows().into_iter().zip(along.rows_mut()) {
        for (k, &v) in row.iter().enumerate() {
            prefix[k + 1] = prefix[k] + f64::from(v);
        }
        for (k, d) in dst.iter_mut().enumerate() {
            let (lo, hi) = span(k, w);
            *d = ((prefix[hi] - prefix[lo]) / (hi - lo) as f64) as f32;
        }
    }
    // Down columns: prefix sums row by row, so memory is read in order.
    let mut down = vec![0f64; (h + 1) * w];
    for (y, row) in along.rows().into_iter().enumerate() {
        let (above, below) = down.split_at_mut((y + 1) * w);
        for ((d, &p), &v) in below[..w].iter_mut().zip(&above[y * w..]).zip(row) {
            *d = p + f64::from(v);
        }
    }
    Array2::from_shape_fn((h, w), |(y, x)| {
        let (lo, hi) = span(y, h);
        ((down[hi * w + x] - down[lo * w + x]) / (hi - lo) as f64) as f32
    })
}

/// The material class of each sample of a high/low energy pair under a
/// scanner's calibration, given the planes' unattenuated (air) levels,
/// after averaging the attenuations over [`MATERIAL_SMOOTHING`] pixels.
pub fn material_classes(
    high: &Array2<u16>,
    low: &Array2<u16>,
    air_high: u16,
    air_low: u16,
    calibration: &Calibration,
) -> Array2<Material> {
    let ph = box_mean(&attenuation(high, air_high), MATERIAL_SMOOTHING);
    let pl = box_mean(&attenuation(low, air_low), MATERIAL_SMOOTHING);
    ndarray::Zip::from(&ph).and(&pl).map_collect(|&h, &l| calibration.classify(h, l))
}

/// Encodes an 8-bit image as PNG.
fn png(width: usize, height: usize, colour: png::ColorType, data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
    enc.set_color(colour);
    enc.set_depth(png::BitDepth::Eight);
    // fdeflate: the default (zlib-style) deflate took three quarters of a
    // tile's time, for tiles a few percent smaller.
    enc.set_compression(png::Compression::Fast);
    let bad = |e: png::EncodingError| Error::Internal(format!("encoding a tile: {e}"));
    enc.write_header().map_err(bad)?.write_image_data(data).map_err(bad)?;
    Ok(out)
}

/// Draws grey samples as a PNG.
pub fn grey_png(samples: &Array2<u16>, window: (u16, u16), gamma: f32, invert: bool) -> Result<Vec<u8>> {
    let (h, w) = samples.dim();
    let data: Vec<u8> = samples.iter().map(|&v| (grey(v, window, gamma, invert) * 255.0).round() as u8).collect();
    png(w, h, png::ColorType::Grayscale, &data)
}

/// How a dual-energy pair is coloured: the scanner's calibration and the
/// planes' unattenuated (air) levels, high then low.
#[derive(Debug, Clone, Copy)]
pub struct Colouring<'a> {
    /// The scanner's material calibration.
    pub calibration: &'a Calibration,
    /// Air levels of the high- and low-energy planes.
    pub air: (u16, u16),
}

/// Draws a dual-energy pair in material colours ([`material_classes`]),
/// shaded by the grey level of `shade` (the high-energy samples, perhaps
/// edge-enhanced) under the window, as a PNG.
pub fn material_png(
    high: &Array2<u16>,
    low: &Array2<u16>,
    shade: &Array2<u16>,
    colouring: Colouring<'_>,
    window: (u16, u16),
    gamma: f32,
    invert: bool,
) -> Result<Vec<u8>> {
    let (h, w) = high.dim();
    let classes = material_classes(high, low, colouring.air.0, colouring.air.1, colouring.calibration);
    let mut data = Vec::with_capacity(w * h * 3);
    for (&hv, class) in shade.iter().zip(&classes) {
        let shade = 0.35 + 0.65 * grey(hv, window, gamma, invert);
        data.extend(class.colour().map(|c| (f32::from(c) * shade).round() as u8));
    }
    png(w, h, png::ColorType::Rgb, &data)
}

/// An 8-bit anomaly map as an RGBA heat layer: transparent below a tenth of
/// the scale, then yellow to red, more opaque with the score.
pub fn heat_png(map: &Array2<u8>) -> Result<Vec<u8>> {
    let (h, w) = map.dim();
    let mut data = Vec::with_capacity(w * h * 4);
    for &v in map {
        let t = f32::from(v) / 255.0;
        if t < 0.1 {
            data.extend([0, 0, 0, 0]);
        } else {
            data.extend([255, (230.0 * (1.0 - t)) as u8, 0, (80.0 + 175.0 * t) as u8]);
        }
    }
    png(w, h, png::ColorType::Rgba, &data)
}

/// Indexes of the high- and low-energy planes of a dual-energy scan.
pub fn dual_energy(record: &ScanRecord) -> Option<(usize, usize)> {
    let find = |k: PlaneKind| record.header.planes.iter().position(|p| p.kind == k as i32);
    Some((find(PlaneKind::HighEnergy)?, find(PlaneKind::LowEnergy)?))
}

/// A bounded least-recently-used cache of rendered tiles and plane windows,
/// and the blocks being rendered (so that the tiles of one block asked for
/// at once are rendered once: the later requests wait for the first).
#[derive(Debug, Default)]
pub struct TileCache {
    inner: Mutex<CacheInner>,
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Debug, Default)]
struct CacheInner {
    tiles: HashMap<String, (Arc<Vec<u8>>, u64)>,
    windows: HashMap<String, (u16, u16)>,
    bytes: usize,
    tick: u64,
}

/// Most plane windows remembered (each a few bytes).
const MAX_WINDOWS: usize = 4096;

impl TileCache {
    /// The cached tile, marked as just used.
    pub fn get(&self, scan_id: &str, spec: &TileSpec) -> Option<Arc<Vec<u8>>> {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        c.tick += 1;
        let tick = c.tick;
        let entry = c.tiles.get_mut(&spec.key(scan_id))?;
        entry.1 = tick;
        Some(entry.0.clone())
    }

    /// Keeps a rendered tile, evicting the least recently used beyond
    /// [`CACHE_BYTES`].
    pub fn put(&self, scan_id: &str, spec: &TileSpec, png: Arc<Vec<u8>>) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        c.tick += 1;
        let tick = c.tick;
        c.bytes += png.len();
        if let Some((old, _)) = c.tiles.insert(spec.key(scan_id), (png, tick)) {
            c.bytes -= old.len();
        }
        while c.bytes > CACHE_BYTES {
            let Some(oldest) = c.tiles.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| k.clone()) else { break };
            if let Some((gone, _)) = c.tiles.remove(&oldest) {
                c.bytes -= gone.len();
            }
        }
    }

    /// The lock of the render of block `key` (see [`block_of`]): hold it
    /// while checking the cache and rendering. The table forgets the lock
    /// when the last [`Flight`] of the block is dropped, whether the render
    /// finished or its request went away, so the table holds only blocks
    /// being rendered or waited for.
    pub fn flight(&self, key: &str) -> Flight<'_> {
        let lock = self.flights.lock().unwrap_or_else(|p| p.into_inner()).entry(key.to_string()).or_default().clone();
        Flight { cache: self, key: key.to_string(), lock }
    }

    /// Bytes of tiles held.
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    /// The remembered automatic window of a plane.
    pub fn window(&self, scan_id: &str, plane: usize) -> Option<(u16, u16)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).windows.get(&format!("{scan_id}/{plane}")).copied()
    }

    /// Remembers a plane's automatic window.
    pub fn put_window(&self, scan_id: &str, plane: usize, window: (u16, u16)) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if c.windows.len() >= MAX_WINDOWS {
            c.windows.clear();
        }
        c.windows.insert(format!("{scan_id}/{plane}"), window);
    }
}

/// One request's share of a block's render lock ([`TileCache::flight`]).
pub struct Flight<'a> {
    cache: &'a TileCache,
    key: String,
    /// The lock itself: render while holding it.
    pub lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut flights = self.cache.flights.lock().unwrap_or_else(|p| p.into_inner());
        // Held by the table and by this flight: nobody else waits.
        if Arc::strong_count(&self.lock) <= 2 {
            flights.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_lock_is_forgotten_when_its_last_request_goes_away() {
        let cache = TileCache::default();
        let (a, b) = (cache.flight("s/1"), cache.flight("s/1"));
        assert!(Arc::ptr_eq(&a.lock, &b.lock), "requests for one block share its lock");
        drop(a);
        assert_eq!(cache.flights.lock().unwrap().len(), 1, "still waited for");
        // A request dropped before its render finished (client gone) lands too.
        drop(b);
        assert!(cache.flights.lock().unwrap().is_empty());
    }
    use niix_inference::decode::Encoding;
    use niix_inference::pipeline::PlaneInput;

    fn raw_plane(width: u32, height: u32) -> PlaneInput {
        let bytes: Vec<u8> =
            (0..width * height).flat_map(|i| ((i % width) as u16 * 10 + (i / width) as u16).to_le_bytes()).collect();
        PlaneInput {
            kind: "high_energy".into(),
            encoding: Encoding::RawU16Le,
            width,
            height,
            reader: Box::new(std::io::Cursor::new(bytes)),
        }
    }

    #[test]
    fn levels_tiles_and_box_averages() {
        assert_eq!(top_level(256, 256), 0);
        assert_eq!(top_level(2048, 6144), 5);
        assert_eq!(top_level(16384, 32768), 7);
        // Level 0, tile (1,0) of a 300x20 plane: columns 256..300.
        let t = tile_samples(&mut raw_plane(300, 20), 0, 1, 0).unwrap();
        assert_eq!(t.dim(), (20, 44));
        assert_eq!(t[[3, 0]], 2560 + 3);
        // Level 1: 2x2 averages; pixel (0,0) averages x 0..2, y 0..2.
        let t = tile_samples(&mut raw_plane(300, 20), 1, 0, 0).unwrap();
        assert_eq!(t.dim(), (10, 150));
        assert_eq!(t[[0, 0]], (10 + 1 + 11) / 4);
        // A band of two tiles is the two tiles.
        let band = split_band(&band_samples(&mut raw_plane(600, 20), 0, 0, 0, 8).unwrap());
        assert_eq!(band.len(), 3);
        assert_eq!(band[1], tile_samples(&mut raw_plane(600, 20), 0, 1, 0).unwrap());
        assert_eq!(band[2].dim(), (20, 88));
        // A block of 2x2 tiles is the four tiles.
        let block = split_block(&block_samples(&mut raw_plane(600, 300), 0, (1, 0), (2, 2)).unwrap());
        assert_eq!(block.len(), 4);
        assert_eq!(block[3].0, (1, 1));
        assert_eq!(block[3].1, tile_samples(&mut raw_plane(600, 300), 0, 2, 1).unwrap());
        assert_eq!(block_of(2048, 6144, 2, 1, 4), ((0, 0), (2, 6)), "512x1536: the whole level");
        assert_eq!(block_of(2048, 6144, 0, 3, 9), ((0, 9), (BAND, 1)), "level 0: a band");
        let e = tile_samples(&mut raw_plane(300, 20), 0, 2, 0).unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        let e = tile_samples(&mut raw_plane(300, 20), 3, 0, 0).unwrap_err();
        assert!(e.to_string().contains("levels 0..=1"), "{e}");
    }

    #[test]
    fn box_means_clamp_at_the_edges() {
        let a = Array2::from_shape_fn((4, 6), |(y, x)| (y * 6 + x) as f32);
        let m = box_mean(&a, 3);
        // Inside: the mean of the 3x3 around (1, 1) is its own value (a linear ramp).
        assert!((m[[1, 1]] - 7.0).abs() < 1e-5);
        // Corner: the mean of the 2x2 at (0, 0): (0 + 1 + 6 + 7) / 4.
        assert!((m[[0, 0]] - 3.5).abs() < 1e-5, "{}", m[[0, 0]]);
        assert!((m[[3, 5]] - (16.0 + 17.0 + 22.0 + 23.0) / 4.0).abs() < 1e-5);
    }

    #[test]
    fn edges_are_steepened_and_flat_areas_kept() {
        let step = Array2::from_shape_fn((3, 4), |(_, x)| if x < 2 { 1000u16 } else { 2000 });
        let e = enhance_edges(&step);
        assert_eq!(e[[1, 0]], 1000);
        assert_eq!((e[[1, 1]], e[[1, 2]]), (0, 3000));
        assert_eq!(e[[1, 3]], 2000);
    }

    #[test]
    fn material_classes_take_each_planes_own_air_level() {
        use niix_synth::physics::{HIGH, LOW, transmission};
        let (air_h, air_l) = (60000u16, 34000u16);
        let counts = |air: u16, s| (f64::from(air) * transmission(s, 0.0, 40.0, 0.0)) as u16;
        let high = Array2::from_elem((8, 8), counts(air_h, HIGH));
        let low = Array2::from_elem((8, 8), counts(air_l, LOW));
        let classes = material_classes(&high, &low, air_h, air_l, &Calibration::builtin());
        assert!(classes.iter().all(|&m| m == Material::Organic));
    }

    #[test]
    fn the_cache_stays_within_its_budget() {
        let cache = TileCache::default();
        let spec = |x| TileSpec {
            plane: 0,
            level: 0,
            x,
            y: 0,
            window: None,
            gamma: 1.0,
            invert: false,
            material: false,
            edge: false,
        };
        let tile = Arc::new(vec![0u8; 1 << 20]);
        for x in 0..100 {
            cache.put("s", &spec(x), tile.clone());
            cache.get("s", &spec(0)); // keeps tile 0 recent
        }
        assert!(cache.bytes() <= CACHE_BYTES);
        assert!(cache.get("s", &spec(0)).is_some());
        assert!(cache.get("s", &spec(1)).is_none());
        assert!(cache.get("s", &spec(99)).is_some());
    }
}
