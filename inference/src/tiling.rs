//! The tile grid over a scan and the stitching rule.
//!
//! Tiles are `tile` pixels square and overlap their neighbours by at least
//! `overlap` pixels; the last tile of a row or column is pulled back so it
//! ends at (or within one map stride past) the image edge, and a scan smaller
//! than a tile gets one padded tile. Everything is counted in *map units*:
//! the model's output has one value per `stride` pixels.
//!
//! Stitching rule: where two tiles overlap, each map cell belongs to the tile
//! whose edge is farther away, i.e. the overlap is split at its midpoint.
//! Tile edges, where convolutions see padding, are therefore never used
//! except at the image border, and every map cell is written exactly once.

/// Tiles along one axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Axis {
    /// Start of each tile, in map units (pixels = units x stride).
    pub starts: Vec<usize>,
    /// Map cells each tile owns after stitching: `[from, to)` in map units.
    pub owned: Vec<(usize, usize)>,
    /// Length of the axis in map units (ceil(pixels / stride)).
    pub map_len: usize,
}

impl Axis {
    /// The tiles over `len` pixels. `tile` and `overlap` are in pixels and
    /// must be multiples of `stride` and `2 * stride` (the manifest checks).
    pub fn new(len: usize, tile: usize, overlap: usize, stride: usize) -> Axis {
        let map_len = len.div_ceil(stride);
        let tile_m = tile / stride;
        if len <= tile {
            return Axis { starts: vec![0], owned: vec![(0, map_len)], map_len };
        }
        let step = (tile - overlap) / stride;
        let last = (len - tile).div_ceil(stride);
        let mut starts = vec![0];
        while starts[starts.len() - 1] * stride + tile < len {
            let next = (starts[starts.len() - 1] + step).min(last);
            starts.push(next);
        }
        let mut owned = Vec::with_capacity(starts.len());
        for k in 0..starts.len() {
            let from = if k == 0 { 0 } else { (starts[k - 1] + tile_m + starts[k]) / 2 };
            let to = if k + 1 == starts.len() { map_len } else { (starts[k] + tile_m + starts[k + 1]) / 2 };
            owned.push((from, to));
        }
        Axis { starts, owned, map_len }
    }
}

/// The tile grid over a whole plane, rows x columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grid {
    /// Tiles down the image.
    pub rows: Axis,
    /// Tiles across the image.
    pub cols: Axis,
    /// Tile side in pixels.
    pub tile: usize,
    /// Pixels per map cell.
    pub stride: usize,
}

/// One tile of a [`Grid`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    /// Top-left pixel (may be at most stride-1 pixels short of the edge).
    pub y: usize,
    /// Top-left pixel.
    pub x: usize,
    /// Map rows this tile owns, relative to the map (absolute).
    pub own_rows: (usize, usize),
    /// Map columns this tile owns (absolute).
    pub own_cols: (usize, usize),
}

impl Grid {
    /// The grid over a `height x width` plane.
    pub fn new(height: usize, width: usize, tile: usize, overlap: usize, stride: usize) -> Grid {
        Grid {
            rows: Axis::new(height, tile, overlap, stride),
            cols: Axis::new(width, tile, overlap, stride),
            tile,
            stride,
        }
    }

    /// Every tile, row-major.
    pub fn tiles(&self) -> Vec<Tile> {
        let mut out = Vec::with_capacity(self.rows.starts.len() * self.cols.starts.len());
        for (r, &ys) in self.rows.starts.iter().enumerate() {
            for (c, &xs) in self.cols.starts.iter().enumerate() {
                out.push(Tile {
                    y: ys * self.stride,
                    x: xs * self.stride,
                    own_rows: self.rows.owned[r],
                    own_cols: self.cols.owned[c],
                });
            }
        }
        out
    }

    /// Map size (rows, columns).
    pub fn map_shape(&self) -> (usize, usize) {
        (self.rows.map_len, self.cols.map_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(len: usize, tile: usize, overlap: usize, stride: usize) {
        let a = Axis::new(len, tile, overlap, stride);
        let tile_m = tile / stride;
        let mut covered = vec![0u32; a.map_len];
        for (k, &(from, to)) in a.owned.iter().enumerate() {
            assert!(from <= to, "{len} {tile} {overlap} {stride}: {a:?}");
            let start = a.starts[k];
            assert!(from >= start && to <= start + tile_m, "tile {k} owns cells it does not cover: {a:?}");
            for c in &mut covered[from..to] {
                *c += 1;
            }
            if k > 0 {
                assert!(start > a.starts[k - 1], "tiles advance");
                let gap = a.starts[k - 1] * stride + tile - start * stride;
                assert!(gap >= overlap || k + 1 == a.starts.len(), "overlap kept: {a:?}");
            }
        }
        assert!(covered.iter().all(|&c| c == 1), "{len} {tile} {overlap} {stride}: {covered:?}");
        let last = *a.starts.last().unwrap() * stride;
        assert!(last + tile >= len, "the last tile reaches the edge");
        if len > tile {
            assert!(last + tile < len + stride, "the last tile overruns by less than a stride");
        }
    }

    #[test]
    fn every_map_cell_is_owned_by_exactly_one_tile() {
        for len in [1, 7, 63, 64, 65, 100, 255, 256, 257, 500, 1000, 2048, 6144, 6145] {
            for (tile, overlap, stride) in
                [(64, 0, 1), (64, 16, 1), (64, 16, 8), (256, 32, 1), (256, 64, 16), (32, 30, 1)]
            {
                check(len, tile, overlap, stride);
            }
        }
    }

    #[test]
    fn small_scans_get_one_tile() {
        let g = Grid::new(10, 20, 64, 16, 1);
        assert_eq!(g.tiles().len(), 1);
        assert_eq!(g.map_shape(), (10, 20));
    }

    #[test]
    fn interior_boundaries_split_the_overlap_in_the_middle() {
        let a = Axis::new(200, 64, 16, 1);
        assert_eq!(a.starts[..3], [0, 48, 96]);
        // Tiles 0 and 1 overlap on [48, 64): the boundary is 56.
        assert_eq!(a.owned[0], (0, 56));
        assert_eq!(a.owned[1], (56, 104));
    }
}
