//! The analysis of one scan: decode -> intensity transform -> tiles ->
//! batches -> ONNX Runtime -> stitch -> threshold -> regions.
//!
//! The whole scan is analysed at full resolution, tile by tile; it is never
//! resized to the model's input (that would erase a 50-pixel object in a
//! 6000-pixel scan). [`analyze`] streams: each plane is decoded on its own
//! thread into rows, a tiler thread puts each row through its channels'
//! lookup tables once, into a ring of one tile row per channel, and fills
//! the next batch by copying rows out of it while ONNX Runtime runs the
//! current one; each tile's map is copied straight into the scan's map as it
//! comes out, and one pass over the map normalises it and finds its highest
//! raw value and score. Memory is bounded by a tile row and the map (at map
//! resolution), not by the scan. Each stage is a public function so
//! benchmarks can time it alone.
//!
//! A scan whose conveyance runs along the other image axis than the model's
//! (`[input] length_along`) is analysed in the model's frame: each plane is
//! transposed as it is decoded ([`crate::orientation`]), and the map and
//! regions are transposed back at the end.

use std::io::{Read, Seek};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use ndarray::{Array2, Array3, Array4, ArrayView3, s};

use crate::decode::{DecodeError, DecodeLimits, Encoding, PlaneInfo, decode_rows};
use crate::manifest::{Manifest, TransformKind};
use crate::model::Model;
use crate::orientation::{self, LengthAxis};
use crate::regions::{Region, find_regions};
use crate::structure::ProfileSums;
use crate::tiling::{Grid, Tile};

/// Bytes of one plane that can be read from any position.
pub trait PlaneReader: Read + Seek + Send {}
impl<T: Read + Seek + Send> PlaneReader for T {}

/// One plane of a scan, as the pipeline needs it.
pub struct PlaneInput {
    /// Lowercase plane kind (`high_energy`, `low_energy`, `single_energy`, ...).
    pub kind: String,
    /// How the bytes are encoded.
    pub encoding: Encoding,
    /// Pixels per row.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// The bytes.
    pub reader: Box<dyn PlaneReader>,
}

/// Why a scan could not be analysed. The server records it as an ABORT.
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    /// The scan lacks a plane the model needs.
    #[error("the model needs a {wanted} plane for input channel {channel}; the scan has {have:?}")]
    MissingPlane {
        /// Kinds acceptable for the channel.
        wanted: String,
        /// Channel index.
        channel: usize,
        /// Kinds the scan has.
        have: Vec<String>,
    },
    /// Planes feeding one model differ in size.
    #[error("planes differ in size ({0}); a model needs co-registered planes")]
    SizeMismatch(String),
    /// A plane could not be decoded.
    #[error("decoding a {kind} plane: {source}")]
    Decode {
        /// Plane kind.
        kind: String,
        /// Decoder error.
        source: DecodeError,
    },
    /// The scan's anomaly map would be larger than the analysis allows.
    #[error("{0}")]
    TooLarge(String),
    /// ONNX Runtime failed.
    #[error("ONNX Runtime: {0}")]
    Runtime(#[from] ort::Error),
}

/// Time spent in each stage.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Reading and decoding plane bytes, one thread per plane; in
    /// [`analyze`] the slowest plane's wall time, overlapped with inference
    /// (it includes waiting for the tiler to take rows).
    pub decode: Duration,
    /// Intensity transform into the channel tensor, when timed on its own
    /// ([`transform`]); zero in [`analyze`], where it is part of `tile`.
    pub transform: Duration,
    /// Copying tiles into batches out of the transformed bands (on the tiler
    /// thread, overlapped; the transform itself, as rows enter the bands, is
    /// not in it).
    pub tile: Duration,
    /// ONNX Runtime.
    pub infer: Duration,
    /// Placing tile maps into the scan map, with score normalisation.
    pub stitch: Duration,
    /// Thresholding and connected components.
    pub postprocess: Duration,
    /// Wall time of the whole analysis.
    pub total: Duration,
}

/// The result of analysing one scan.
#[derive(Debug, Clone)]
pub struct Analysis {
    /// Highest normalised score anywhere, 0..1.
    pub score: f32,
    /// Highest raw map value, before normalisation (for ranking scans, e.g.
    /// ROC curves, where the normalised score saturates at 1).
    pub raw_score: f32,
    /// True when at least one region passed the threshold and minimum area.
    pub alarm: bool,
    /// Regions, highest score first.
    pub regions: Vec<Region>,
    /// Normalised score map, one cell per `stride` pixels, in the scan's
    /// own frame (row-major, standard layout).
    pub map: Array2<f32>,
    /// Pixels per map cell.
    pub stride: usize,
    /// For each input channel, the index of the plane that fed it; regions
    /// are in the coordinates of the first.
    pub planes: Vec<usize>,
    /// True when the scan's length ran along the other axis than the
    /// model's, so it was analysed transposed (the map and regions above
    /// are back in the scan's own frame).
    pub transposed: bool,
    /// Stage timings.
    pub timings: Timings,
}

/// Picks, for each input channel, the index of the plane that feeds it.
pub fn select_planes(manifest: &Manifest, kinds: &[&str]) -> Result<Vec<usize>, AnalysisError> {
    (0..manifest.input.channels.len())
        .map(|c| {
            let wanted = manifest.channel_kinds(c);
            wanted.iter().find_map(|w| kinds.iter().position(|k| k == w)).ok_or_else(|| AnalysisError::MissingPlane {
                wanted: manifest.input.channels[c].clone(),
                channel: c,
                have: kinds.iter().map(|k| k.to_string()).collect(),
            })
        })
        .collect()
}

/// Decodes a whole plane into a `height x width` array.
pub fn decode_plane(plane: &mut PlaneInput) -> Result<Array2<u16>, AnalysisError> {
    let (w, h) = (plane.width as usize, plane.height as usize);
    let mut out = Array2::<u16>::zeros((h, w));
    let flat = out.as_slice_mut().expect("a fresh array is contiguous");
    decode_rows(&mut plane.reader, plane.encoding, plane.width, plane.height, &DecodeLimits::default(), |y, row| {
        flat[y as usize * w..(y as usize + 1) * w].copy_from_slice(row);
        Ok(())
    })
    .map_err(|source| AnalysisError::Decode { kind: plane.kind.clone(), source })?;
    Ok(out)
}

/// The intensity transform of one channel as a 65536-entry lookup table:
/// 16-bit input makes every transform a single indexed load.
pub fn lookup_table(manifest: &Manifest, channel: usize) -> Vec<f32> {
    let t = &manifest.transform;
    let (mean, std) = manifest.normalisation(channel);
    (0..=u16::MAX)
        .map(|v| {
            let v = f32::from(v);
            let mut x = match t.kind {
                TransformKind::NegLog => -(v.max(1.0) / t.i0).ln(),
                TransformKind::Ratio => v / t.i0,
                TransformKind::Raw => v,
            };
            if let Some([lo, hi]) = t.clip {
                x = x.clamp(lo, hi);
            }
            (x - mean) / std
        })
        .collect()
}

/// A channel's lookup table as a fixed-size array, so that indexing it with a
/// 16-bit sample needs no bounds check.
fn lut(table: &[f32]) -> &[f32; 65536] {
    table.try_into().expect("a lookup table has 65536 entries")
}

/// `dst[i] = table[src[i]]`: the intensity transform of one run of samples.
#[inline]
fn apply_lut(dst: &mut [f32], src: &[u16], table: &[f32; 65536]) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = table[usize::from(v)];
    }
}

/// Applies each channel's table to its plane: `[channels, height, width]`.
pub fn transform(planes: &[&Array2<u16>], tables: &[Vec<f32>]) -> Array3<f32> {
    let (h, w) = planes[0].dim();
    let mut out = Array3::<f32>::zeros((planes.len(), h, w));
    for (c, (plane, table)) in planes.iter().zip(tables).enumerate() {
        let src = plane.as_slice().expect("decoded planes are contiguous");
        let mut dst = out.slice_mut(s![c, .., ..]);
        apply_lut(dst.as_slice_mut().expect("a channel of a fresh array is contiguous"), src, lut(table));
    }
    out
}

/// Copies `tile` into slot `slot` of `batch`; parts outside the image are
/// filled with each channel's `pad` value (the transformed value of air).
pub fn fill_tile(batch: &mut Array4<f32>, slot: usize, input: ArrayView3<'_, f32>, tile: &Tile, pad: &[f32]) {
    let (_, h, w) = input.dim();
    let side = batch.shape()[2];
    let y1 = (tile.y + side).min(h);
    let x1 = (tile.x + side).min(w);
    let (rows, cols) = (y1 - tile.y, x1 - tile.x);
    for (c, &p) in pad.iter().enumerate() {
        let mut dst = batch.slice_mut(s![slot, c, .., ..]);
        if rows < side || cols < side {
            dst.fill(p);
        }
        dst.slice_mut(s![..rows, ..cols]).assign(&input.slice(s![c, tile.y..y1, tile.x..x1]));
    }
}

/// Writes the owned part of one tile's raw map (`side x side` values,
/// row-major) into the scan map: a copy of each owned row, straight into the
/// map.
pub fn stitch_tile(map: &mut Array2<f32>, tile: &Tile, side: usize, stride: usize, raw: &[f32]) {
    let (ty, tx) = (tile.y / stride, tile.x / stride);
    let (c0, c1) = tile.own_cols;
    let map_w = map.ncols();
    let map = map.as_slice_mut().expect("the scan map is contiguous");
    for my in tile.own_rows.0..tile.own_rows.1 {
        let from = (my - ty) * side;
        map[my * map_w + c0..my * map_w + c1].copy_from_slice(&raw[from + c0 - tx..from + c1 - tx]);
    }
}

/// Largest of `values` as `fold(init, f32::max)` gives it (NaN ignored),
/// over eight lanes so that the compiler can vectorise it.
fn max_of(values: &[f32], init: f32) -> f32 {
    let mut lanes = [init; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    rest.iter().chain(&lanes).copied().fold(init, f32::max)
}

/// Normalises a raw map in place as [`normalise`] does, in the same pass
/// finding its highest raw value and its highest score (from 0):
/// `(raw_max, score)`.
fn normalise_with_max(map: &mut Array2<f32>, lo: f32, hi: f32) -> (f32, f32) {
    let scale = 1.0 / (hi - lo);
    let cells = map.as_slice_mut().expect("the scan map is contiguous");
    let (mut raw, mut score) = (f32::NEG_INFINITY, 0.0f32);
    for block in cells.chunks_mut(4096) {
        raw = max_of(block, raw);
        for v in block.iter_mut() {
            *v = ((*v - lo) * scale).clamp(0.0, 1.0);
        }
        score = max_of(block, score);
    }
    (raw, score)
}

/// Takes `weight` times the scan's background level (the `quantile` of its
/// cells) off every cell of a raw map; returns the level.
pub fn subtract_background(map: &mut Array2<f32>, quantile: f32, weight: f32) -> f32 {
    if weight == 0.0 {
        return 0.0;
    }
    let mut cells: Vec<f32> = map.iter().copied().filter(|v| v.is_finite()).collect();
    if cells.is_empty() {
        return 0.0;
    }
    let last = cells.len() - 1;
    let at = ((last as f32 * quantile).round() as usize).min(last);
    let level = *cells.select_nth_unstable_by(at, f32::total_cmp).1;
    let cut = weight * level;
    map.mapv_inplace(|v| v - cut);
    level
}

/// Raw map values to 0..1 scores: `clamp((v - lo) / (hi - lo), 0, 1)`, in place.
pub fn normalise(map: &mut Array2<f32>, lo: f32, hi: f32) {
    normalise_with_max(map, lo, hi);
}

/// Mean over a `side x side` window around each cell (cells outside the map
/// do not count), by running sums along rows then columns.
pub fn smooth(map: &Array2<f32>, side: usize) -> Array2<f32> {
    let r = side / 2;
    if r == 0 {
        return map.clone();
    }
    let box_1d = |line: &[f32], out: &mut [f32]| {
        let n = line.len();
        let mut prefix = vec![0f64; n + 1];
        for (i, v) in line.iter().enumerate() {
            prefix[i + 1] = prefix[i] + f64::from(*v);
        }
        for (i, o) in out.iter_mut().enumerate() {
            let (a, b) = (i.saturating_sub(r), (i + r + 1).min(n));
            *o = ((prefix[b] - prefix[a]) / (b - a) as f64) as f32;
        }
    };
    let (h, w) = map.dim();
    let mut rows = Array2::<f32>::zeros((h, w));
    for (src, mut dst) in map.rows().into_iter().zip(rows.rows_mut()) {
        let line: Vec<f32> = src.to_vec();
        let mut out = vec![0f32; w];
        box_1d(&line, &mut out);
        dst.assign(&ndarray::ArrayView1::from(&out));
    }
    let mut both = Array2::<f32>::zeros((h, w));
    for (src, mut dst) in rows.columns().into_iter().zip(both.columns_mut()) {
        let line: Vec<f32> = src.to_vec();
        let mut out = vec![0f32; h];
        box_1d(&line, &mut out);
        dst.assign(&ndarray::ArrayView1::from(&out));
    }
    both
}

struct Batch {
    data: Array4<f32>,
    tiles: Vec<Tile>,
}

/// Rows a plane's decoder hands to the tiler at a time.
const ROWS_PER_CHUNK: usize = 32;

/// Most cells an anomaly map may have (128 MiB of f32). Everything else the
/// analysis holds is bounded by one tile row; the map, at one cell per
/// `stride` pixels, is what grows with the scan, so a model whose map is
/// at full resolution can only analyse scans up to this many pixels.
pub const MAX_MAP_CELLS: usize = 32 << 20;

/// Consecutive decoded rows of one plane, `first` onwards.
struct RowChunk {
    first: usize,
    samples: Vec<u16>,
}

/// The rows of one plane the current tile row needs, `[top, top + filled)`,
/// already transformed for each channel the plane feeds: a ring of `cap`
/// rows per channel (row `y` at `y % cap`), so that each sample goes through
/// its lookup table once however many tiles overlap it, moving down a tile
/// row copies nothing, and a tile is filled by copying rows out of it.
struct Band<'a> {
    rx: Receiver<RowChunk>,
    /// Chunks' buffers go back to the decoder once copied, so it does not
    /// allocate (and fault in) a fresh one for every 32 rows.
    recycle: SyncSender<Vec<u16>>,
    /// A chunk partly copied into the band, and how many rows of it are.
    pending: Option<(RowChunk, usize)>,
    /// Per channel fed (in channel order), its rows and its lookup table.
    rings: Vec<(Vec<f32>, &'a [f32; 65536])>,
    cap: usize,
    top: usize,
    filled: usize,
}

impl Band<'_> {
    /// Moves the band down to start at row `top` and fills it to `bottom`
    /// (exclusive). Rows the band had already read are kept; each new row of
    /// the band's first channel is also handed to `each`. False when the
    /// decoder stopped early (its error is reported by its thread).
    fn advance(&mut self, top: usize, bottom: usize, w: usize, mut each: impl FnMut(usize, &[f32])) -> bool {
        let drop = (top - self.top).min(self.filled);
        (self.top, self.filled) = (top, self.filled - drop);
        while self.top + self.filled < bottom {
            let (chunk, used) = match self.pending.take() {
                Some(p) => p,
                None => match self.rx.recv() {
                    Ok(chunk) => (chunk, 0),
                    Err(_) => return false,
                },
            };
            let rows = chunk.samples.len() / w;
            // Rows of the chunk above the band (skipped by a tile step
            // larger than a tile: not with the grids manifests allow).
            let skip = (self.top + self.filled).saturating_sub(chunk.first).max(used);
            let take = (rows - skip.min(rows)).min(bottom - self.top - self.filled);
            for r in skip..skip + take {
                let src = &chunk.samples[r * w..(r + 1) * w];
                let y = chunk.first + r;
                let at = (y % self.cap) * w;
                for (ring, table) in &mut self.rings {
                    apply_lut(&mut ring[at..at + w], src, table);
                }
                each(y, &self.rings[0].0[at..at + w]);
                self.filled += 1;
            }
            if skip + take < rows {
                self.pending = Some((chunk, skip + take));
            } else {
                let _ = self.recycle.try_send(chunk.samples);
            }
        }
        true
    }

    /// Transformed row `y` (which the band holds) of its `k`-th channel.
    fn row(&self, k: usize, y: usize, w: usize) -> &[f32] {
        let at = (y % self.cap) * w;
        &self.rings[k].0[at..at + w]
    }
}

/// How each input channel is made from the decoded planes.
struct Channels<'a> {
    /// The band (distinct chosen plane) feeding each channel, and the
    /// channel's place among that band's channels.
    band_of: &'a [(usize, usize)],
    /// Each channel's padding value (the transformed value of air).
    pad: &'a [f32],
}

/// Copies `tile` into slot `slot` of `batch` from the bands holding its
/// rows, already transformed; parts outside the image get the channel's
/// padding. The same values [`fill_tile`] copies from a transformed scan.
fn fill_tile_from_bands(
    batch: &mut Array4<f32>,
    slot: usize,
    bands: &[Band<'_>],
    channels: &Channels<'_>,
    tile: &Tile,
    (h, w): (usize, usize),
) {
    let side = batch.shape()[2];
    let (rows, cols) = ((tile.y + side).min(h) - tile.y, (tile.x + side).min(w) - tile.x);
    for (c, &(b, k)) in channels.band_of.iter().enumerate() {
        let band = &bands[b];
        let mut dst = batch.slice_mut(s![slot, c, .., ..]);
        if rows < side || cols < side {
            dst.fill(channels.pad[c]);
        }
        let dst = dst.as_slice_mut().expect("a batch slot is contiguous");
        for r in 0..rows {
            dst[r * side..r * side + cols].copy_from_slice(&band.row(k, tile.y + r, w)[tile.x..tile.x + cols]);
        }
    }
}

/// The stitched raw map of a scan.
struct Streamed {
    map: Array2<f32>,
    /// The transformed first channel and its profiles, when asked for.
    first: Option<(Array2<f32>, ProfileSums)>,
}

/// What the tiler thread gives back.
struct Tiled {
    /// Time spent filling batches.
    spent: Duration,
    /// The transformed first channel, kept whole only for a structure
    /// model, with its row and column profiles.
    first: Option<(Array2<f32>, ProfileSums)>,
    /// False when a decoder stopped before its last row.
    complete: bool,
}

/// The model's frame of a scan: its size (height, width) and whether it is
/// the scan transposed.
#[derive(Debug, Clone, Copy)]
struct Frame {
    size: (usize, usize),
    transposed: bool,
}

/// Decodes the chosen planes on one thread each, tiles their rows as they
/// arrive (one tile row, plus what the next shares with it, held at a time)
/// on another, and runs the model over the batches as they fill; returns
/// the stitched raw map and, when `keep_first`, the transformed first
/// channel, in the model's frame (`frame`: each plane decoded whole and
/// transposed before its rows go on, when it is the scan transposed).
fn infer_streaming(
    model: &Model,
    planes: &mut [PlaneInput],
    chosen: &[usize],
    (tables, pad): (&[Vec<f32>], &[f32]),
    Frame { size: (h, w), transposed }: Frame,
    keep_first: bool,
    timings: &mut Timings,
) -> Result<Streamed, AnalysisError> {
    let m = &model.manifest;
    let side = m.input.tile;
    let grid = Grid::new(h, w, side, m.input.overlap, model.stride);
    let tiles = grid.tiles();
    let mut map = Array2::<f32>::zeros(grid.map_shape());
    let batch_size = m.input.batch.min(tiles.len());
    let map_side = side / model.stride;
    let channels = chosen.len();
    let step_rows = side - m.input.overlap;
    // The distinct planes, in channel order, and the band feeding each
    // channel with the channel's place among the band's channels.
    let mut used: Vec<usize> = Vec::new();
    let mut fed: Vec<Vec<usize>> = Vec::new();
    let band_of: Vec<(usize, usize)> = chosen
        .iter()
        .enumerate()
        .map(|(c, &p)| {
            let b = used.iter().position(|&u| u == p).unwrap_or_else(|| {
                used.push(p);
                fed.push(Vec::new());
                used.len() - 1
            });
            fed[b].push(c);
            (b, fed[b].len() - 1)
        })
        .collect();

    std::thread::scope(|scope| {
        let mut decoders = Vec::new();
        let mut bands = Vec::new();
        let mut picked: Vec<Option<&mut PlaneInput>> = planes.iter_mut().map(Some).collect();
        for (&p, fed) in used.iter().zip(&fed) {
            let plane = picked[p].take().expect("each plane once");
            // Room for the rows of one tile step, so decoding the next tile
            // row overlaps with ONNX Runtime running this one.
            let capacity = step_rows.div_ceil(ROWS_PER_CHUNK).max(2);
            let (tx, rx) = sync_channel::<RowChunk>(capacity);
            let (recycle, reuse) = sync_channel::<Vec<u16>>(capacity + 2);
            let cap = side.min(h);
            bands.push(Band {
                rx,
                recycle,
                pending: None,
                rings: fed.iter().map(|&c| (vec![0f32; cap * w], lut(&tables[c]))).collect(),
                cap,
                top: 0,
                filled: 0,
            });
            decoders.push(scope.spawn(move || {
                let t0 = Instant::now();
                let (pw, ph) = (plane.width, plane.height);
                let buffer = || {
                    reuse
                        .try_recv()
                        .map(|mut v| {
                            v.clear();
                            v
                        })
                        .unwrap_or_else(|_| Vec::with_capacity(ROWS_PER_CHUNK * w))
                };
                let stopped = || "the analysis stopped".to_string();
                let decoded = if transposed {
                    // The model frame's first row needs the scan's last: the
                    // plane is decoded whole, 16 bits a sample, transposed
                    // strip by strip as it arrives, then sent on by rows.
                    let mut whole = vec![0u16; pw as usize * ph as usize];
                    decode_in_strips(&mut plane.reader, plane.encoding, pw, ph, |strip, first| {
                        orientation::transpose_strip(strip, pw as usize, first, &mut whole, ph as usize, |v| v)
                    })
                    .and_then(|info| {
                        for (k, rows) in whole.chunks(ROWS_PER_CHUNK * w).enumerate() {
                            let mut samples = buffer();
                            samples.extend_from_slice(rows);
                            tx.send(RowChunk { first: k * ROWS_PER_CHUNK, samples })
                                .map_err(|_| DecodeError::Sink(stopped()))?;
                        }
                        Ok(info)
                    })
                } else {
                    let mut chunk = RowChunk { first: 0, samples: buffer() };
                    decode_rows(&mut plane.reader, plane.encoding, pw, ph, &DecodeLimits::default(), |y, row| {
                        chunk.samples.extend_from_slice(row);
                        if chunk.samples.len() == ROWS_PER_CHUNK * w || y as usize + 1 == h {
                            let next = RowChunk { first: y as usize + 1, samples: buffer() };
                            tx.send(std::mem::replace(&mut chunk, next)).map_err(|_| stopped())?;
                        }
                        Ok(())
                    })
                };
                (
                    decoded.map(|_| ()).map_err(|source| AnalysisError::Decode { kind: plane.kind.clone(), source }),
                    t0.elapsed(),
                )
            }));
        }

        let (full_tx, full_rx): (SyncSender<Batch>, Receiver<Batch>) = sync_channel(1);
        let (empty_tx, empty_rx) = sync_channel::<Array4<f32>>(2);
        for _ in 0..2 {
            empty_tx.send(Array4::<f32>::zeros((batch_size, channels, side, side))).expect("capacity 2");
        }
        let tiles_ref = &tiles;
        let channels = Channels { band_of: &band_of, pad };
        let tiler = scope.spawn(move || {
            let mut spent = Duration::ZERO;
            let mut first = keep_first.then(|| (Array2::<f32>::zeros((h, w)), ProfileSums::new(w)));
            let mut current: Option<(Array4<f32>, Vec<Tile>)> = None;
            let mut done = 0;
            // Tiles are row-major and batches take them in that order, so a
            // batch may span the end of one tile row and the next: each tile
            // is copied into its slot while its rows are in the bands.
            for row in tiles_ref.chunk_by(|a, b| a.y == b.y) {
                let top = row[0].y;
                let bottom = (top + side).min(h);
                for (b, band) in bands.iter_mut().enumerate() {
                    // Channel 0 is the first channel of its band.
                    let ok = match first.as_mut().filter(|_| channels.band_of[0].0 == b) {
                        Some((first, sums)) => band.advance(top, bottom, w, |y, src| {
                            let mut dst = first.row_mut(y);
                            dst.as_slice_mut().expect("rows of a fresh array are contiguous").copy_from_slice(src);
                            sums.add_row(src);
                        }),
                        None => band.advance(top, bottom, w, |_, _| {}),
                    };
                    if !ok {
                        return Tiled { spent, first: None, complete: false };
                    }
                }
                let t0 = Instant::now();
                for tile in row {
                    if current.is_none() {
                        let Ok(data) = empty_rx.recv() else { return Tiled { spent, first: None, complete: true } };
                        current = Some((data, Vec::with_capacity(batch_size)));
                    }
                    let (data, group) = current.as_mut().expect("a batch is being filled");
                    fill_tile_from_bands(data, group.len(), &bands, &channels, tile, (h, w));
                    group.push(*tile);
                    done += 1;
                    if group.len() == batch_size || done == tiles_ref.len() {
                        let (data, tiles) = current.take().expect("a batch is being filled");
                        if full_tx.send(Batch { data, tiles }).is_err() {
                            return Tiled { spent, first: None, complete: true };
                        }
                    }
                }
                spent += t0.elapsed();
            }
            // Let the decoders finish the rows no tile needed (a last tile
            // pulled back by less than a stride) so they end cleanly.
            for band in &mut bands {
                while band.rx.recv().is_ok() {}
            }
            Tiled { spent, first, complete: true }
        });

        let mut result = Ok(());
        for batch in full_rx.iter() {
            let n = batch.tiles.len();
            let t0 = Instant::now();
            let mut stitch = Duration::ZERO;
            let view = batch.data.slice(s![..n, .., .., ..]);
            let owned;
            let run_input = if n == batch.data.shape()[0] {
                &batch.data
            } else {
                owned = view.to_owned();
                &owned
            };
            let ran = model.run(run_input, |i, raw| {
                let t1 = Instant::now();
                stitch_tile(&mut map, &batch.tiles[i], map_side, model.stride, raw);
                stitch += t1.elapsed();
            });
            timings.infer += t0.elapsed() - stitch;
            timings.stitch += stitch;
            if let Err(e) = ran {
                result = Err(AnalysisError::Runtime(e));
                break;
            }
            let _ = empty_tx.send(batch.data);
        }
        drop(full_rx);
        drop(empty_tx);
        let tiled = tiler.join().expect("the tiler panicked");
        timings.tile += tiled.spent;
        // A decoder's own error is the cause of anything else going wrong.
        for decoder in decoders {
            let (decoded, spent) = decoder.join().expect("a plane decoder panicked");
            timings.decode = timings.decode.max(spent);
            match decoded {
                Err(AnalysisError::Decode { source: DecodeError::Sink(_), .. }) => {}
                Err(e) => return Err(e),
                Ok(()) => {}
            }
        }
        result?;
        if !tiled.complete {
            return Err(AnalysisError::Decode {
                kind: "plane".into(),
                source: DecodeError::Malformed { encoding: "plane", detail: "its decoder stopped early".into() },
            });
        }
        Ok(tiled.first)
    })
    .map(|first| Streamed { map, first })
}

/// A scan turned into model input, in the model's frame.
pub struct ModelInput {
    /// `[channels, height, width]`, transformed; transposed from the scan
    /// when `transposed`.
    pub data: Array3<f32>,
    /// Per channel, the transformed value of air (tile padding).
    pub pad: Vec<f32>,
    /// For each channel, the index of the plane that fed it.
    pub planes: Vec<usize>,
    /// Height and width of `data`: the scan's own, swapped when `transposed`.
    pub size: (usize, usize),
    /// True when the scan's length runs along the other axis than the
    /// model's, so `data` is the scan transposed.
    pub transposed: bool,
}

/// Decodes each chosen plane on its own thread and writes it, row by row,
/// through its channel's lookup table into `data` (`[channels, h, w]`).
/// Decode and transform are one pass over the bytes, and the planes of a
/// dual-energy scan are decoded side by side. With `transpose`, `data` is
/// `[channels, w, h]` and each strip of [`orientation::BLOCK`] decoded rows
/// is transposed into it through the table.
fn decode_transformed(
    planes: &mut [PlaneInput],
    chosen: &[usize],
    tables: &[Vec<f32>],
    data: &mut Array3<f32>,
    transpose: bool,
) -> Result<(), AnalysisError> {
    let mut channels: Vec<_> = data.outer_iter_mut().map(Some).collect();
    std::thread::scope(|scope| {
        let mut workers = Vec::new();
        for (i, plane) in planes.iter_mut().enumerate() {
            // The channels this plane feeds (usually one), with their tables.
            let mut outputs: Vec<_> = (0..chosen.len())
                .filter(|&c| chosen[c] == i)
                .map(|c| (channels[c].take().expect("each channel once"), &tables[c]))
                .collect();
            if outputs.is_empty() {
                continue;
            }
            workers.push(scope.spawn(move || {
                let (w, h) = (plane.width, plane.height);
                let decoded = if transpose {
                    // Each strip of rows into columns of every channel the plane feeds.
                    decode_in_strips(&mut plane.reader, plane.encoding, w, h, |strip, first| {
                        for (channel, table) in &mut outputs {
                            let dst = channel.as_slice_mut().expect("a channel of a fresh array is contiguous");
                            let table = lut(table);
                            orientation::transpose_strip(strip, w as usize, first, dst, h as usize, |v| {
                                table[usize::from(v)]
                            });
                        }
                    })
                } else {
                    decode_rows(&mut plane.reader, plane.encoding, w, h, &DecodeLimits::default(), |y, row| {
                        for (channel, table) in &mut outputs {
                            let mut dst = channel.row_mut(y as usize);
                            apply_lut(
                                dst.as_slice_mut().expect("rows of a fresh array are contiguous"),
                                row,
                                lut(table),
                            );
                        }
                        Ok(())
                    })
                };
                decoded.map_err(|source| AnalysisError::Decode { kind: plane.kind.clone(), source })?;
                Ok(())
            }));
        }
        workers.into_iter().try_for_each(|w| w.join().expect("a plane decoder panicked"))
    })
}

/// Decodes a `width x height` plane and hands it on in strips of rows as
/// [`orientation::Strips`] gathers them (`strip(rows, first_row)`), the last
/// strip possibly short: what a transpose into the model's frame reads.
fn decode_in_strips<R: std::io::Read + std::io::Seek>(
    reader: R,
    encoding: Encoding,
    width: u32,
    height: u32,
    mut strip: impl FnMut(&[u16], usize),
) -> Result<PlaneInfo, DecodeError> {
    let mut strips = orientation::Strips::new(width as usize);
    let info = decode_rows(reader, encoding, width, height, &DecodeLimits::default(), |_, row| {
        strips.push(row, &mut strip);
        Ok(())
    })?;
    strips.finish(&mut strip);
    Ok(info)
}

/// The planes feeding each input channel, checked to be the same size;
/// returns them and the size (height, width).
fn chosen_planes(m: &Manifest, planes: &[PlaneInput]) -> Result<(Vec<usize>, (usize, usize)), AnalysisError> {
    let kinds: Vec<&str> = planes.iter().map(|p| p.kind.as_str()).collect();
    let chosen = select_planes(m, &kinds)?;
    let sizes: Vec<(u32, u32)> = chosen.iter().map(|&i| (planes[i].width, planes[i].height)).collect();
    if sizes.iter().any(|s| *s != sizes[0]) {
        let text = chosen.iter().zip(&sizes).map(|(&i, (w, h))| format!("{} {w}x{h}", kinds[i])).collect::<Vec<_>>();
        return Err(AnalysisError::SizeMismatch(text.join(", ")));
    }
    Ok((chosen, (sizes[0].1 as usize, sizes[0].0 as usize)))
}

/// Each channel's lookup table and padding value (the transformed value of air).
fn tables_and_pad(m: &Manifest, channels: usize) -> (Vec<Vec<f32>>, Vec<f32>) {
    let tables: Vec<Vec<f32>> = (0..channels).map(|c| lookup_table(m, c)).collect();
    let air = (m.transform.i0.round() as usize).min(u16::MAX as usize);
    let pad = tables.iter().map(|t| t[air]).collect();
    (tables, pad)
}

/// Picks, decodes and transforms the planes a manifest asks for, whole
/// (for fitting and benchmarks; [`analyze`] streams instead), with the
/// scan's length axis from its shape ([`LengthAxis::of_scan`]).
pub fn model_input(
    m: &Manifest,
    planes: &mut [PlaneInput],
    timings: &mut Timings,
) -> Result<ModelInput, AnalysisError> {
    model_input_oriented(m, planes, None, timings)
}

/// [`model_input`] of a scan that may state its length axis: transposed
/// into the model's frame as it is decoded when its axis is not the model's.
pub fn model_input_oriented(
    m: &Manifest,
    planes: &mut [PlaneInput],
    stated: Option<LengthAxis>,
    timings: &mut Timings,
) -> Result<ModelInput, AnalysisError> {
    let (chosen, (h, w)) = chosen_planes(m, planes)?;
    let transposed = needs_transpose(m, stated, (h, w));
    let size = if transposed { (w, h) } else { (h, w) };
    let t0 = Instant::now();
    let (tables, pad) = tables_and_pad(m, chosen.len());
    let mut data = Array3::<f32>::zeros((chosen.len(), size.0, size.1));
    decode_transformed(planes, &chosen, &tables, &mut data, transposed)?;
    timings.decode = t0.elapsed();
    timings.transform = Duration::ZERO;
    Ok(ModelInput { data, pad, planes: chosen, size, transposed })
}

/// Whether a `height x width` scan stating `stated` (or not) runs along the
/// other axis than the model, so that its input must be transposed.
pub fn needs_transpose(m: &Manifest, stated: Option<LengthAxis>, size: (usize, usize)) -> bool {
    let model = m.input.length_along;
    LengthAxis::of_scan(stated, size, model) != model
}

/// Analyses one scan with one model, streaming: memory is bounded by one
/// tile row of each channel, transformed (plus the 16-bit rows of the
/// next tile step, decoded ahead while ONNX Runtime runs) and the anomaly map,
/// not by the scan (a structure model also keeps the transformed first
/// channel of scans of its fitted size). The scan's length axis comes from
/// its shape ([`LengthAxis::of_scan`]).
pub fn analyze(model: &Model, planes: Vec<PlaneInput>) -> Result<Analysis, AnalysisError> {
    analyze_oriented(model, planes, None)
}

/// [`analyze`] of a scan that may state its length axis. A scan whose
/// length runs along the other axis than the model's is analysed in the
/// model's frame (each plane decoded whole, 16 bits a sample, and
/// transposed as it is decoded) and its map and regions are transposed
/// back: the result is in the scan's own frame either way.
pub fn analyze_oriented(
    model: &Model,
    mut planes: Vec<PlaneInput>,
    stated: Option<LengthAxis>,
) -> Result<Analysis, AnalysisError> {
    let start = Instant::now();
    let mut timings = Timings::default();
    let m = &model.manifest;
    let (chosen, scan_size) = chosen_planes(m, &planes)?;
    let transposed = needs_transpose(m, stated, scan_size);
    // The model's frame.
    let (h, w) = if transposed { (scan_size.1, scan_size.0) } else { scan_size };
    let (mh, mw) = Grid::new(h, w, m.input.tile, m.input.overlap, model.stride).map_shape();
    if mh * mw > MAX_MAP_CELLS {
        // Named in the scan's own frame.
        let ((sh, sw), (mh, mw)) = (scan_size, if transposed { (mw, mh) } else { (mh, mw) });
        return Err(AnalysisError::TooLarge(format!(
            "a {sw}x{sh} scan needs an anomaly map of {mw}x{mh} cells with model {} ({} pixels per cell); \
             the analysis holds at most {MAX_MAP_CELLS} cells: use a model with a coarser map for scans this large",
            model.name, model.stride
        )));
    }
    let (tables, pad) = tables_and_pad(m, chosen.len());
    let keep_first = model.structure.as_ref().is_some_and(|s| s.size() == (h, w));
    let frame = Frame { size: (h, w), transposed };
    let Streamed { mut map, mut first } =
        infer_streaming(model, &mut planes, &chosen, (&tables, &pad), frame, keep_first, &mut timings)?;
    drop(planes);
    let t0 = Instant::now();
    if let (Some(structure), Some((first, sums))) = (&model.structure, first.take()) {
        structure.raise_profiled(&mut map, model.stride, first.view(), sums.finish());
    }
    drop(first);
    if m.decision.smooth > 1 {
        map = smooth(&map, m.decision.smooth);
    }
    if m.decision.background_weight > 0.0 {
        let d = &m.decision;
        subtract_background(&mut map, d.background_quantile, d.background_weight);
    }
    // The raw score is the highest cell before normalisation (after the
    // background is taken off: the same as the highest before, less the cut).
    let (raw_score, score) = normalise_with_max(&mut map, m.decision.score_min, m.decision.score_max);
    timings.stitch += t0.elapsed();

    let t0 = Instant::now();
    let mut regions = find_regions(map.view(), m.decision.threshold, model.stride, m.decision.min_region_area, (h, w));
    if transposed {
        // Back into the scan's own frame.
        map = orientation::transposed(&map);
        for r in &mut regions {
            (r.x, r.y, r.width, r.height) = (r.y, r.x, r.height, r.width);
        }
    }
    timings.postprocess = t0.elapsed();
    timings.total = start.elapsed();
    Ok(Analysis {
        score,
        raw_score,
        alarm: !regions.is_empty(),
        regions,
        map,
        stride: model.stride,
        planes: chosen,
        transposed,
        timings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_undoes_normalise_up_to_the_clamp() {
        let m = crate::manifest::Manifest::parse(crate::manifest::tests::DEMO).unwrap();
        let d = &m.decision;
        let mut map = Array2::from_shape_vec((1, 5), vec![-1.0, 0.0, 0.7, 2.0, 3.5]).unwrap();
        normalise(&mut map, d.score_min, d.score_max);
        let back: Vec<f32> = map.iter().map(|v| d.raw(*v)).collect();
        // Within score_min..score_max exactly back; outside it, at the bound.
        assert_eq!(back, vec![0.0, 0.0, 0.7, 2.0, 2.0]);
    }

    #[test]
    fn the_background_level_is_the_quantile_of_the_cells() {
        let mut map = Array2::from_shape_fn((10, 10), |(y, x)| (y * 10 + x) as f32);
        assert_eq!(subtract_background(&mut map, 0.5, 0.5), 50.0);
        assert_eq!(map[[0, 0]], -25.0);
        assert_eq!(map[[9, 9]], 74.0);
        let mut same = map.clone();
        assert_eq!(subtract_background(&mut same, 0.5, 0.0), 0.0, "weight 0 leaves the map alone");
        assert_eq!(same, map);
    }

    #[test]
    fn one_object_that_stands_out_outranks_cargo_that_is_unusual_all_over() {
        // A hold of varied machinery: every cell far from the memory bank.
        let mut busy = Array2::from_elem((10, 10), 10.0f32);
        busy[[3, 3]] = 14.0;
        // Plain cargo with one dense block in it.
        let mut plain = Array2::from_elem((10, 10), 2.0f32);
        plain[[5, 5]] = 12.0;
        assert!(busy.iter().copied().fold(0.0, f32::max) > plain.iter().copied().fold(0.0, f32::max));
        subtract_background(&mut busy, 0.9, 0.5);
        subtract_background(&mut plain, 0.9, 0.5);
        let top = |m: &Array2<f32>| m.iter().copied().fold(f32::MIN, f32::max);
        assert_eq!((top(&busy), top(&plain)), (9.0, 11.0));
    }
}
