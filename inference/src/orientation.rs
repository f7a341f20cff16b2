//! Which image axis the conveyance's length runs along, and the transpose
//! that brings a scan into a model's frame.
//!
//! A model is made for one orientation (`[input] length_along`, default
//! `y`: the conveyance's length down the rows, as `niix synth --family
//! trailer` writes and the shipped models know). A scan says its own
//! (`ScanMetadata.orientation`, `NAME.json`'s `"orientation"`) or gets the
//! default: the longer image side is the length, and a square scan takes the
//! model's axis. When the two differ, the model input is transposed as the
//! planes are decoded, so everything downstream (tiling, features, the
//! structure model, threat image projection in the fit) runs in the model's
//! frame; the analysis maps the anomaly map and the regions back at the end.

use serde::{Deserialize, Serialize};

/// The image axis along which the conveyance's length runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LengthAxis {
    /// Along x: the length runs across the columns (a wide image).
    X,
    /// Along y: the length runs down the rows (a tall image).
    #[default]
    Y,
}

impl LengthAxis {
    /// True for [`LengthAxis::Y`] (for `skip_serializing_if`).
    pub fn is_y(&self) -> bool {
        *self == LengthAxis::Y
    }

    /// A scan's length axis: the one it states, else its longer side, else
    /// (a square scan) the model's.
    pub fn of_scan(stated: Option<LengthAxis>, (height, width): (usize, usize), model: LengthAxis) -> LengthAxis {
        match stated {
            Some(axis) => axis,
            None if width > height => LengthAxis::X,
            None if height > width => LengthAxis::Y,
            None => model,
        }
    }
}

/// Side of the square blocks the transposes copy in, so that both the
/// rows read and the rows written stay in the cache.
pub const BLOCK: usize = 64;

/// Transposes `rows` rows of `src` (each `width` long) into columns
/// `first..first + rows` of `dst` (`width` rows of `dst_width`), each value
/// through `f`, in [`BLOCK`]-wide column blocks: row `r`, column `x` of
/// `src` goes to row `x`, column `first + r` of `dst`. A plane arrives in
/// strips of up to [`BLOCK`] rows as it is decoded.
pub fn transpose_strip<T: Copy, U>(
    src: &[T],
    width: usize,
    first: usize,
    dst: &mut [U],
    dst_width: usize,
    f: impl Fn(T) -> U,
) {
    let rows = src.len() / width.max(1);
    assert!(first + rows <= dst_width && dst.len() >= width * dst_width, "the strip fits the destination");
    // Per block of columns, the strip's part (at most BLOCK x BLOCK values)
    // stays in the cache while each column is gathered into one contiguous
    // run of a destination row.
    for x0 in (0..width).step_by(BLOCK) {
        let x1 = (x0 + BLOCK).min(width);
        for x in x0..x1 {
            let out = &mut dst[x * dst_width + first..x * dst_width + first + rows];
            for (o, row) in out.iter_mut().zip(src.chunks_exact(width)) {
                *o = f(row[x]);
            }
        }
    }
}

/// `src` (`height` rows of `width`) transposed: `width` rows of `height`,
/// in [`BLOCK`] x [`BLOCK`] blocks.
pub fn transpose<T: Copy + Default>(src: &[T], height: usize, width: usize) -> Vec<T> {
    assert_eq!(src.len(), height * width, "a {height}x{width} plane");
    let mut out = vec![T::default(); src.len()];
    for y0 in (0..height).step_by(BLOCK) {
        let y1 = (y0 + BLOCK).min(height);
        transpose_strip(&src[y0 * width..y1 * width], width, y0, &mut out, height, |v| v);
    }
    out
}

/// A 2-D array transposed into standard (row-major) layout.
pub fn transposed(a: &ndarray::Array2<f32>) -> ndarray::Array2<f32> {
    let (h, w) = a.dim();
    let data = match a.as_slice() {
        Some(s) => transpose(s, h, w),
        None => transpose(&a.iter().copied().collect::<Vec<f32>>(), h, w),
    };
    ndarray::Array2::from_shape_vec((w, h), data).expect("w x h values")
}

/// Collects decoded rows into strips of [`BLOCK`] rows and hands each full
/// strip on (with the index of its first row), so that a plane is
/// transposed as it is decoded, holding one strip of source rows:
/// `strips.push(row, |strip, first| transpose_strip(strip, width, first, ..))`.
pub struct Strips<T> {
    width: usize,
    first: usize,
    strip: Vec<T>,
}

impl<T: Copy> Strips<T> {
    /// For rows `width` samples long.
    pub fn new(width: usize) -> Strips<T> {
        Strips { width, first: 0, strip: Vec::with_capacity(BLOCK * width) }
    }

    /// Adds the next row; a strip that is then full goes to `full`.
    pub fn push(&mut self, row: &[T], full: impl FnOnce(&[T], usize)) {
        self.strip.extend_from_slice(row);
        if self.strip.len() >= BLOCK * self.width {
            self.finish(full);
        }
    }

    /// Hands the rows still held (if any) to `full`.
    pub fn finish(&mut self, full: impl FnOnce(&[T], usize)) {
        if self.strip.is_empty() {
            return;
        }
        full(&self.strip, self.first);
        self.first += self.strip.len() / self.width.max(1);
        self.strip.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transpose_twice_is_the_original_and_each_value_lands_on_the_mirrored_place() {
        // Sizes that are and are not multiples of the block, and a single row.
        for (h, w) in [(1, 1), (1, 200), (64, 64), (130, 67), (257, 1024), (3, 700)] {
            let src: Vec<u16> = (0..h * w).map(|i| (i * 7919 % 65521) as u16).collect();
            let t = transpose(&src, h, w);
            for y in 0..h {
                for x in 0..w {
                    assert_eq!(t[x * h + y], src[y * w + x], "{h}x{w} at ({y}, {x})");
                }
            }
            assert_eq!(transpose(&t, w, h), src, "{h}x{w} round trip");
        }
    }

    #[test]
    fn rows_fed_one_at_a_time_transpose_as_the_whole_plane_does() {
        let (h, w) = (150, 90);
        let src: Vec<u16> = (0..h * w).map(|i| (i % 4099) as u16).collect();
        let mut dst = vec![0f32; h * w];
        let mut strips = Strips::new(w);
        let mut into =
            |strip: &[u16], first: usize| transpose_strip(strip, w, first, &mut dst, h, |v| f32::from(v) * 0.5);
        for row in src.chunks_exact(w) {
            strips.push(row, &mut into);
        }
        strips.finish(&mut into);
        let whole: Vec<f32> = transpose(&src, h, w).into_iter().map(|v| f32::from(v) * 0.5).collect();
        assert_eq!(dst, whole);
    }

    #[test]
    fn an_array_transposes_into_standard_layout() {
        let a = ndarray::Array2::from_shape_fn((5, 3), |(y, x)| (y * 10 + x) as f32);
        let t = transposed(&a);
        assert_eq!(t, a.t());
        assert!(t.is_standard_layout());
        assert_eq!(transposed(&t), a);
        assert_eq!(transposed(&a.t().to_owned()), a, "a non-standard view reads in logical order");
    }

    #[test]
    fn a_scan_says_its_axis_or_its_longer_side_does() {
        use LengthAxis::{X, Y};
        assert_eq!(LengthAxis::of_scan(Some(X), (6144, 2048), Y), X, "stated wins over the shape");
        assert_eq!(LengthAxis::of_scan(None, (1280, 5760), Y), X);
        assert_eq!(LengthAxis::of_scan(None, (6144, 2048), X), Y);
        assert_eq!(LengthAxis::of_scan(None, (512, 512), X), X, "a square scan takes the model's axis");
        assert_eq!(LengthAxis::of_scan(None, (512, 512), Y), Y);
    }
}
