//! The conveyance's own structure (end walls, corner posts, floor, chassis),
//! learned position by position from registered normal scans.
//!
//! A memory bank compares patches wherever they are, which suits cargo (it
//! can stand anywhere) but not the conveyance: a steel block inside a corner
//! post or the floor adds little that a patch model can tell from the post
//! itself. The structure, though, sits at the same place in every scan of a
//! kind once the scans are registered. This model keeps, for each block of
//! `block x block` pixels of the model's first channel, the highest value
//! any normal scan showed there, but only where the position never varied
//! (dense in every scan, its spread across scans below `max_spread`):
//! where cargo can stand, it says nothing. A scan's excess over that limit,
//! the smallest over each 2x2 group of blocks (so one noisy block does not
//! count), raises the anomaly map (`[structure]` in `docs/models.md`).
//!
//! Cargo stowed against an end wall overlaps the corner posts in the image
//! and so exceeds the limit there although nothing is hidden. Such cargo
//! runs on into the hold for its whole length, where its density can be
//! read against the lightest normal scan; that density is discounted from
//! the excess of the structure it runs into (`reach`). A steel block
//! inside a post reaches the hold by a few centimetres at most.
//!
//! Registration shifts a scan along both axes so that its row and column
//! profiles (mean attenuation per image row and column) line up with the
//! reference profiles kept from the fit: trailers differ in deck height,
//! scanners in where the conveyance enters the frame.

use ndarray::{Array2, ArrayView2};

use crate::manifest::StructureSpec;
use crate::orientation::LengthAxis;

/// A fitted structure model.
#[derive(Debug, Clone, PartialEq)]
pub struct Structure {
    /// Block side in pixels.
    pub block: usize,
    /// Largest shift searched when registering, pixels.
    pub max_shift: usize,
    /// Mean of each image row of the reference scan.
    pub row_profile: Vec<f32>,
    /// Mean of each image column of the reference scan.
    pub col_profile: Vec<f32>,
    /// Per block, the highest normal value; infinite where the position is
    /// not fixed structure.
    pub limit: Array2<f32>,
    /// Per block, the lowest normal value: the empty conveyance, against
    /// which the density of cargo in the hold is read.
    pub floor: Array2<f32>,
    /// Blocks searched along the length for the cargo that runs on into
    /// a structure block (`StructureSpec::reach`).
    pub reach: usize,
    /// The axis the conveyance's length runs along: the model's
    /// (`[input] length_along`), in whose frame every scan is registered.
    pub length_along: LengthAxis,
    /// Excess that is still ignored (`StructureSpec::margin`).
    pub margin: f32,
    /// Map units added per unit of excess beyond the margin (`StructureSpec::weight`).
    pub weight: f32,
}

/// Why a structure file does not fit its manifest.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("structure file: {0}")]
pub struct StructureError(pub String);

/// The row and column profiles of a plane, gathered row by row (so an
/// analysis can gather them while the rows stream past, off the path after
/// ONNX Runtime): each row summed in f64 in order, each column's f64 sum
/// taken over the rows in order.
#[derive(Debug, Clone)]
pub struct ProfileSums {
    rows: Vec<f32>,
    cols: Vec<f64>,
}

impl ProfileSums {
    /// For a plane `width` columns wide.
    pub fn new(width: usize) -> ProfileSums {
        ProfileSums { rows: Vec::new(), cols: vec![0f64; width] }
    }

    /// Adds the next row.
    pub fn add_row(&mut self, row: &[f32]) {
        let mut sum = 0f64;
        for (c, v) in self.cols.iter_mut().zip(row) {
            sum += f64::from(*v);
            *c += f64::from(*v);
        }
        self.rows.push((sum / self.cols.len().max(1) as f64) as f32);
    }

    /// The mean of each row and of each column.
    pub fn finish(self) -> (Vec<f32>, Vec<f32>) {
        let h = self.rows.len().max(1) as f64;
        (self.rows, self.cols.into_iter().map(|c| (c / h) as f32).collect())
    }
}

/// Mean of each row and of each column of `plane`.
pub fn profiles(plane: ArrayView2<'_, f32>) -> (Vec<f32>, Vec<f32>) {
    let mut sums = ProfileSums::new(plane.ncols());
    for row in plane.outer_iter() {
        match row.as_slice() {
            Some(r) => sums.add_row(r),
            None => sums.add_row(&row.to_vec()),
        }
    }
    sums.finish()
}

/// The shift `s` (|s| <= `max`) for which `profile[i + s]` best matches
/// `reference[i]`: the largest correlation of their first differences, so
/// edges (an end wall, the deck) count and overall density does not.
pub fn best_shift(profile: &[f32], reference: &[f32], max: usize) -> isize {
    let n = profile.len().min(reference.len());
    if n < 3 {
        return 0;
    }
    let diff = |p: &[f32]| p[..n].windows(2).map(|w| w[1] - w[0]).collect::<Vec<f32>>();
    let (g, r) = (diff(profile), diff(reference));
    let max = max.min(g.len() - 1) as isize;
    let mut best = (f64::NEG_INFINITY, 0isize);
    for s in -max..=max {
        let c: f64 = (0..g.len() as isize)
            .filter_map(|i| {
                let j = i + s;
                (j >= 0 && (j as usize) < g.len()).then(|| f64::from(g[j as usize]) * f64::from(r[i as usize]))
            })
            .sum();
        // Ties go to the smaller shift.
        if c > best.0 || (c == best.0 && s.abs() < best.1.abs()) {
            best = (c, s);
        }
    }
    best.1
}

/// Block means of `plane` shifted by `(dy, dx)` (edge pixels repeat):
/// block `(by, bx)` averages pixels `by * block + dy ..` and `bx * block + dx ..`.
/// Each block row of a pixel row is summed in order, times `1 / block²`, and
/// added to the block's mean row after row.
pub fn blocks(plane: ArrayView2<'_, f32>, block: usize, (dy, dx): (isize, isize)) -> Array2<f32> {
    let (h, w) = plane.dim();
    let (bh, bw) = (h / block, w / block);
    let clamp = |v: isize, n: usize| v.clamp(0, n as isize - 1) as usize;
    let mut out = Array2::<f32>::zeros((bh, bw));
    let scale = 1.0 / (block * block) as f32;
    // The shifted row, edge pixels repeated: a copy of the part inside the
    // plane between the repeats, then contiguous sums.
    let mut shifted = vec![0f32; bw * block];
    let inside_from = (-dx).clamp(0, (bw * block) as isize) as usize;
    let inside_to = (w as isize - dx).clamp(inside_from as isize, (bw * block) as isize) as usize;
    for y in 0..bh * block {
        let row = plane.row(clamp(y as isize + dy, h));
        let row = row.as_slice().map_or_else(|| std::borrow::Cow::Owned(row.to_vec()), std::borrow::Cow::Borrowed);
        for (x, s) in shifted[..inside_from].iter_mut().enumerate() {
            *s = row[clamp(x as isize + dx, w)];
        }
        if inside_to > inside_from {
            let start = (inside_from as isize + dx) as usize;
            shifted[inside_from..inside_to].copy_from_slice(&row[start..start + inside_to - inside_from]);
        }
        for (x, s) in shifted[inside_to..].iter_mut().enumerate() {
            *s = row[clamp((inside_to + x) as isize + dx, w)];
        }
        let mut acc = out.row_mut(y / block);
        for (a, chunk) in acc.iter_mut().zip(shifted.chunks_exact(block)) {
            *a += chunk.iter().sum::<f32>() * scale;
        }
    }
    out
}

/// The registered blocks of a scan's first channel, against reference
/// profiles: the blocks and the shift `(dy, dx)` found.
pub fn register(
    plane: ArrayView2<'_, f32>,
    row_profile: &[f32],
    col_profile: &[f32],
    block: usize,
    max_shift: usize,
) -> (Array2<f32>, (isize, isize)) {
    register_profiled(plane, profiles(plane), row_profile, col_profile, block, max_shift)
}

/// [`register`] with the plane's own profiles already taken ([`ProfileSums`]).
pub fn register_profiled(
    plane: ArrayView2<'_, f32>,
    (rows, cols): (Vec<f32>, Vec<f32>),
    row_profile: &[f32],
    col_profile: &[f32],
    block: usize,
    max_shift: usize,
) -> (Array2<f32>, (isize, isize)) {
    let shift = (best_shift(&rows, row_profile, max_shift), best_shift(&cols, col_profile, max_shift));
    (blocks(plane, block, shift), shift)
}

impl Structure {
    /// Reads a fitted model: `row_profile`, `col_profile`, `limit` and
    /// `floor` concatenated, float32 little-endian, for `spec.height x
    /// spec.width` scans whose length runs along `length_along`.
    pub fn from_bytes(spec: &StructureSpec, length_along: LengthAxis, raw: &[u8]) -> Result<Structure, StructureError> {
        let (h, w, b) = (spec.height, spec.width, spec.block);
        let (bh, bw) = (h / b, w / b);
        let want = (h + w + 2 * bh * bw) * 4;
        if raw.len() != want {
            return Err(StructureError(format!(
                "holds {} bytes; {h}x{w} scans in {b}-pixel blocks need {want} (a file from before the floor was kept needs a refit with `niix model fit`)",
                raw.len()
            )));
        }
        let values: Vec<f32> = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let (profiles, blocks) = values.split_at(h + w);
        let (limit, floor) = blocks.split_at(bh * bw);
        Ok(Structure {
            block: b,
            max_shift: spec.max_shift,
            row_profile: profiles[..h].to_vec(),
            col_profile: profiles[h..].to_vec(),
            limit: Array2::from_shape_vec((bh, bw), limit.to_vec()).expect("length checked"),
            floor: Array2::from_shape_vec((bh, bw), floor.to_vec()).expect("length checked"),
            reach: spec.reach,
            length_along,
            margin: spec.margin,
            weight: spec.weight,
        })
    }

    /// The file `from_bytes` reads.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.row_profile
            .iter()
            .chain(&self.col_profile)
            .chain(self.limit.iter())
            .chain(self.floor.iter())
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    /// Per block of registered values `v`, the density of the cargo that
    /// runs on into it from the hold. From a structure block, the first
    /// non-structure block within `reach` blocks along the length is
    /// found on either side; the cargo must then run on for `reach`
    /// blocks, and its density is the smallest over them (value above the
    /// floor). The larger side counts; 0 where no hold is that close. The
    /// smallest, because a steel block hidden in a post may itself reach a
    /// little into the hold, while cargo stowed against the wall runs on
    /// for its whole length.
    fn cargo_running_on(&self, v: &Array2<f32>) -> Array2<f32> {
        // Read along the model's length axis (a short, tall van's length
        // runs along its shorter side): make it axis 0.
        let along_rows = self.length_along == LengthAxis::Y;
        fn orient(a: &Array2<f32>, along_rows: bool) -> ArrayView2<'_, f32> {
            if along_rows { a.view() } else { a.t() }
        }
        let (v, limit, floor) =
            (orient(v, along_rows), orient(&self.limit, along_rows), orient(&self.floor, along_rows));
        let (n, reach) = (v.nrows() as isize, self.reach as isize);
        let hold = |y: isize, x: usize| (0..n).contains(&y) && !limit[[y as usize, x]].is_finite();
        let cargo =
            |y: isize, x: usize| if hold(y, x) { (v[[y as usize, x]] - floor[[y as usize, x]]).max(0.0) } else { 0.0 };
        let out = Array2::from_shape_fn(v.dim(), |(y, x)| {
            if reach == 0 || !limit[[y, x]].is_finite() {
                return 0.0;
            }
            let y = y as isize;
            [-1isize, 1]
                .into_iter()
                .filter_map(|dir| {
                    let first = (1..=reach).find(|k| hold(y + dir * k, x))?;
                    Some((first..first + reach).map(|k| cargo(y + dir * k, x)).fold(f32::INFINITY, f32::min))
                })
                .fold(0.0, f32::max)
        });
        if along_rows { out } else { out.reversed_axes() }
    }

    /// Scan height and width this model was fitted for.
    pub fn size(&self) -> (usize, usize) {
        (self.row_profile.len(), self.col_profile.len())
    }

    /// Per block, how far the registered scan exceeds the normal limit
    /// beyond the density of cargo running on into it (0 where it does
    /// not, or where the position is not fixed structure), the smallest
    /// over each 2x2 group; and the shift used.
    pub fn excess(&self, plane: ArrayView2<'_, f32>) -> (Array2<f32>, (isize, isize)) {
        self.excess_profiled(plane, profiles(plane))
    }

    /// [`Structure::excess`] with the plane's profiles already taken.
    pub fn excess_profiled(
        &self,
        plane: ArrayView2<'_, f32>,
        profiles: (Vec<f32>, Vec<f32>),
    ) -> (Array2<f32>, (isize, isize)) {
        let (v, shift) =
            register_profiled(plane, profiles, &self.row_profile, &self.col_profile, self.block, self.max_shift);
        let cargo = self.cargo_running_on(&v);
        let e = Array2::from_shape_fn(v.dim(), |i| (v[i] - self.limit[i] - cargo[i]).max(0.0));
        let (bh, bw) = e.dim();
        let out = Array2::from_shape_fn((bh, bw), |(y, x)| {
            let (y1, x1) = ((y + 1).min(bh - 1), (x + 1).min(bw - 1));
            e[[y, x]].min(e[[y1, x]]).min(e[[y, x1]]).min(e[[y1, x1]])
        });
        (out, shift)
    }

    /// Adds `weight x max(0, excess - margin)` to each cell of `map` (one
    /// cell per `stride` pixels), the largest over the blocks the cell
    /// holds, back in the scan's own frame. Returns the largest excess.
    pub fn raise(&self, map: &mut Array2<f32>, stride: usize, plane: ArrayView2<'_, f32>) -> f32 {
        self.raise_profiled(map, stride, plane, profiles(plane))
    }

    /// [`Structure::raise`] with the plane's profiles already taken
    /// ([`ProfileSums`], gathered while the analysis streamed the rows).
    pub fn raise_profiled(
        &self,
        map: &mut Array2<f32>,
        stride: usize,
        plane: ArrayView2<'_, f32>,
        profiles: (Vec<f32>, Vec<f32>),
    ) -> f32 {
        let (excess, (dy, dx)) = self.excess_profiled(plane, profiles);
        let (mh, mw) = map.dim();
        let mut add = Array2::<f32>::zeros((mh, mw));
        let mut top = 0f32;
        let half = (self.block / 2) as isize;
        for ((by, bx), e) in excess.indexed_iter() {
            top = top.max(*e);
            let lift = self.weight * (e - self.margin).max(0.0);
            if lift <= 0.0 {
                continue;
            }
            let y = (by * self.block) as isize + dy + half;
            let x = (bx * self.block) as isize + dx + half;
            let cy = (y.max(0) as usize / stride).min(mh - 1);
            let cx = (x.max(0) as usize / stride).min(mw - 1);
            add[[cy, cx]] = add[[cy, cx]].max(lift);
        }
        *map += &add;
        top
    }
}

/// Gathers registered normal scans into a structure model.
#[derive(Debug)]
pub struct StructureFit {
    block: usize,
    max_shift: usize,
    row_profile: Vec<f32>,
    col_profile: Vec<f32>,
    count: usize,
    sum: Array2<f64>,
    sum_sq: Array2<f64>,
    min: Array2<f32>,
    max: Array2<f32>,
}

impl StructureFit {
    /// Starts from the first normal scan's first channel, whose profiles
    /// become the reference every later scan is registered against.
    pub fn new(first: ArrayView2<'_, f32>, block: usize, max_shift: usize) -> StructureFit {
        let (row_profile, col_profile) = profiles(first);
        let (h, w) = first.dim();
        let dim = (h / block, w / block);
        let mut fit = StructureFit {
            block,
            max_shift,
            row_profile,
            col_profile,
            count: 0,
            sum: Array2::zeros(dim),
            sum_sq: Array2::zeros(dim),
            min: Array2::from_elem(dim, f32::INFINITY),
            max: Array2::from_elem(dim, f32::NEG_INFINITY),
        };
        fit.add(first).expect("the first scan has the reference size");
        fit
    }

    /// Adds one normal scan; refuses a scan of another size, whose
    /// positions cannot be compared. Returns the shift found.
    pub fn add(&mut self, plane: ArrayView2<'_, f32>) -> Result<(isize, isize), StructureError> {
        let want = (self.row_profile.len(), self.col_profile.len());
        if plane.dim() != want {
            return Err(StructureError(format!(
                "a {}x{} scan among {}x{} ones: the structure model compares positions, so fit it on scans of one size",
                plane.dim().0,
                plane.dim().1,
                want.0,
                want.1
            )));
        }
        let (v, shift) = register(plane, &self.row_profile, &self.col_profile, self.block, self.max_shift);
        self.count += 1;
        ndarray::Zip::from(&mut self.sum).and(&mut self.sum_sq).and(&mut self.min).and(&mut self.max).and(&v).for_each(
            |s, q, lo, hi, &x| {
                *s += f64::from(x);
                *q += f64::from(x) * f64::from(x);
                *lo = lo.min(x);
                *hi = hi.max(x);
            },
        );
        Ok(shift)
    }

    /// Scans added so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The model: the normal maximum at blocks dense in every scan (minimum
    /// at least `spec.min_density`) whose spread (standard deviation) stays
    /// below `spec.max_spread`; no limit elsewhere. It scores with the
    /// spec's `reach`, `margin` and `weight`, reading cargo that runs on
    /// along `length_along`.
    pub fn finish(self, spec: &StructureSpec, length_along: LengthAxis) -> Structure {
        let (min_density, max_spread) = (spec.min_density, spec.max_spread);
        let n = self.count.max(1) as f64;
        let limit = Array2::from_shape_fn(self.sum.dim(), |i| {
            let mean = self.sum[i] / n;
            let spread = (self.sum_sq[i] / n - mean * mean).max(0.0).sqrt();
            if self.min[i] >= min_density && spread < f64::from(max_spread) { self.max[i] } else { f32::INFINITY }
        });
        Structure {
            block: self.block,
            max_shift: self.max_shift,
            row_profile: self.row_profile,
            col_profile: self.col_profile,
            limit,
            floor: self.min,
            reach: spec.reach,
            length_along,
            margin: spec.margin,
            weight: spec.weight,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec the tests fit and score with: structure at least 1.0
    /// dense with spread below 0.05; margin 0.5, weight 2, reach 4 blocks.
    fn spec() -> StructureSpec {
        StructureSpec {
            file: Some("s.f32".into()),
            height: 64,
            width: 48,
            block: 4,
            max_shift: 8,
            min_scans: 2,
            min_density: 1.0,
            max_spread: 0.05,
            margin: 0.5,
            weight: 2.0,
            reach: 4,
        }
    }

    /// A 64x48 "conveyance" whose contents sit `deck` rows down: a dense
    /// post at columns 8..16 (rows 0..40 of the conveyance) and cargo of
    /// varying density beside it.
    fn scan(deck: usize, cargo: f32) -> Array2<f32> {
        Array2::from_shape_fn((64, 48), |(y, x)| {
            let Some(y) = y.checked_sub(deck) else { return 0.1 };
            let post = if (8..16).contains(&x) && y < 40 { 2.0 } else { 0.0 };
            let load = if (24..40).contains(&x) && (10..30).contains(&y) { cargo } else { 0.0 };
            0.1 + post + load
        })
    }

    #[test]
    fn block_means_of_a_shifted_plane_repeat_the_edges_bit_for_bit() {
        let plane = Array2::from_shape_fn((37, 29), |(y, x)| ((y * 31 + x * 17) % 23) as f32 * 0.37 + 0.01 * x as f32);
        let (h, w) = plane.dim();
        for shift in [(0, 0), (3, -5), (-7, 4), (40, -40), (-40, 40), (2, 28), (-1, -29)] {
            let got = blocks(plane.view(), 4, shift);
            // Pixel by pixel, in the same order of sums.
            let px =
                |y: isize, x: isize| plane[[y.clamp(0, h as isize - 1) as usize, x.clamp(0, w as isize - 1) as usize]];
            let want = Array2::from_shape_fn((h / 4, w / 4), |(by, bx)| {
                let mut acc = 0f32;
                for y in by * 4..by * 4 + 4 {
                    let row: f32 = (bx * 4..bx * 4 + 4).map(|x| px(y as isize + shift.0, x as isize + shift.1)).sum();
                    acc += row * (1.0 / 16.0);
                }
                acc
            });
            assert_eq!(got, want, "shift {shift:?}");
        }
    }

    #[test]
    fn the_shift_that_lines_profiles_up_is_found() {
        let reference: Vec<f32> = (0..40).map(|i| if (10..20).contains(&i) { 1.0 } else { 0.0 }).collect();
        let moved: Vec<f32> = (0..40).map(|i| if (13..23).contains(&i) { 1.0 } else { 0.0 }).collect();
        assert_eq!(best_shift(&moved, &reference, 8), 3);
        assert_eq!(best_shift(&reference, &moved, 8), -3);
        assert_eq!(best_shift(&reference, &reference, 8), 0);
    }

    #[test]
    fn blocks_average_the_shifted_pixels() {
        let plane = Array2::from_shape_fn((8, 8), |(y, x)| (y * 8 + x) as f32);
        let b = blocks(plane.view(), 4, (0, 0));
        assert_eq!(b[[0, 0]], (0..4).flat_map(|y| (0..4).map(move |x| (y * 8 + x) as f32)).sum::<f32>() / 16.0);
        let shifted = blocks(plane.view(), 4, (4, 4));
        assert_eq!(shifted[[0, 0]], b[[1, 1]]);
        // Past the edge the last pixel repeats.
        assert_eq!(blocks(plane.view(), 4, (8, 0))[[0, 0]], 7.0 * 8.0 + 1.5);
    }

    #[test]
    fn an_object_in_the_wall_stands_out_and_cargo_does_not() {
        let mut fit = StructureFit::new(scan(4, 0.5).view(), 4, 8);
        for (deck, cargo) in [(2, 1.0), (6, 0.2), (4, 2.0), (3, 0.0)] {
            fit.add(scan(deck, cargo).view()).unwrap();
        }
        assert_eq!(fit.count(), 5);
        let model = fit.finish(&spec(), LengthAxis::Y);
        assert!(model.limit.iter().any(|v| v.is_finite()), "the post is structure");
        assert!(model.limit.slice(ndarray::s![.., 5..10]).iter().all(|v| v.is_infinite()), "the hold is not");

        // Unusual cargo (denser than any normal scan's) adds nothing.
        let (e, _) = model.excess(scan(5, 4.0).view());
        assert_eq!(e.iter().copied().fold(0.0, f32::max), 0.0);
        // A block of steel inside the post, 12x8 pixels, on a shifted deck.
        let mut hidden = scan(1, 0.5);
        hidden.slice_mut(ndarray::s![29..41, 8..16]).map_inplace(|v| *v += 1.5);
        let (e, (dy, _)) = model.excess(hidden.view());
        assert_eq!(dy, -3, "registered on the deck");
        let top = e.iter().copied().fold(0.0, f32::max);
        assert!((top - 1.5).abs() < 1e-4, "excess {top}");

        let mut map = Array2::<f32>::zeros((8, 6));
        let raised = model.raise(&mut map, 8, hidden.view());
        assert!((raised - 1.5).abs() < 1e-4);
        let (cell, value) = map.indexed_iter().fold(((0, 0), 0.0), |a, (i, v)| if *v > a.1 { (i, *v) } else { a });
        assert!((value - 2.0).abs() < 1e-4, "weight x (excess - margin), got {value}");
        assert_eq!(cell.1, 1, "the post's column of cells");
        assert!((3..=4).contains(&cell.0), "rows 29..41 are cells 3 to 5, got {}", cell.0);
    }

    #[test]
    fn the_file_round_trips_and_a_wrong_size_is_refused() {
        let spec = spec();
        let model = StructureFit::new(scan(4, 0.5).view(), 4, 8).finish(&spec, LengthAxis::Y);
        let bytes = model.to_bytes();
        let back = Structure::from_bytes(&spec, LengthAxis::Y, &bytes).unwrap();
        assert_eq!(back, model);
        assert_eq!(back.to_bytes(), bytes);
        assert!(Structure::from_bytes(&spec, LengthAxis::Y, &bytes[4..]).is_err());
        let mut fit = StructureFit::new(scan(4, 0.5).view(), 4, 8);
        assert!(fit.add(Array2::zeros((32, 48)).view()).is_err());
    }

    /// A 96x32 conveyance seen along its length (rows): hold in rows
    /// 0..80, a dense end wall in rows 80..96. Cargo of `density` fills
    /// rows `from..to`, columns 8..24.
    fn end_wall(from: usize, to: usize, density: f32) -> Array2<f32> {
        Array2::from_shape_fn((96, 32), |(y, x)| {
            let wall = if y >= 80 { 2.0 } else { 0.0 };
            let load = if (from..to).contains(&y) && (8..24).contains(&x) { density } else { 0.0 };
            0.1 + wall + load
        })
    }

    #[test]
    fn cargo_stowed_against_the_wall_is_not_an_excess_but_steel_inside_it_is() {
        // Normal loads stop short of the wall.
        let mut fit = StructureFit::new(end_wall(10, 60, 0.5).view(), 4, 0);
        for (to, density) in [(70, 1.0), (40, 0.3), (76, 0.8), (0, 0.0)] {
            fit.add(end_wall(10, to, density).view()).unwrap();
        }
        let model = fit.finish(&spec(), LengthAxis::Y);
        assert!(model.limit.slice(ndarray::s![20.., ..]).iter().all(|v| v.is_finite()), "the wall is structure");
        let top = |scan: &Array2<f32>| model.excess(scan.view()).0.iter().copied().fold(0.0, f32::max);

        // A pallet 1.5 dense that runs 8 rows into the wall: the wall
        // blocks it overlaps exceed the limit by 1.5, the hold beside
        // them carries the same 1.5.
        assert_eq!(top(&end_wall(50, 88, 1.5)), 0.0);

        // Steel inside the wall with the hold beside it empty...
        let mut hidden = end_wall(10, 60, 0.5);
        hidden.slice_mut(ndarray::s![84..92, 8..24]).map_inplace(|v| *v += 1.5);
        assert!((top(&hidden) - 1.5).abs() < 1e-4, "excess {}", top(&hidden));
        // ... reaching a little into the hold (it does not run on) ...
        let mut reaching = end_wall(10, 60, 0.5);
        reaching.slice_mut(ndarray::s![72..92, 8..24]).map_inplace(|v| *v += 1.5);
        assert!((top(&reaching) - 1.5).abs() < 1e-4, "excess {}", top(&reaching));
        // ... and beside cargo that stops short of it.
        let mut near = end_wall(30, 68, 0.5);
        near.slice_mut(ndarray::s![84..92, 8..24]).map_inplace(|v| *v += 1.5);
        assert!((top(&near) - 1.5).abs() < 1e-4, "excess {}", top(&near));

        // Without the discount, the pallet would have counted.
        let strict = Structure { reach: 0, ..model.clone() };
        let (e, _) = strict.excess(end_wall(50, 88, 1.5).view());
        assert!((e.iter().copied().fold(0.0, f32::max) - 1.5).abs() < 1e-4);

        // A model whose scans run along their columns reads the hold along them.
        let wide = |a: Array2<f32>| a.reversed_axes().as_standard_layout().to_owned();
        let mut fit = StructureFit::new(wide(end_wall(10, 60, 0.5)).view(), 4, 0);
        for (to, density) in [(70, 1.0), (40, 0.3), (76, 0.8), (0, 0.0)] {
            fit.add(wide(end_wall(10, to, density)).view()).unwrap();
        }
        let model = fit.finish(&spec(), LengthAxis::X);
        let top = |model: &Structure, scan: Array2<f32>| {
            model.excess(wide(scan).view()).0.iter().copied().fold(0.0, f32::max)
        };
        assert_eq!(top(&model, end_wall(50, 88, 1.5)), 0.0);
        assert!((top(&model, reaching.clone()) - 1.5).abs() < 1e-4);
        // The axis is the model's, not the scan's longer side: read across
        // the length, the wall has no hold beside it and the pallet counts.
        let across = Structure { length_along: LengthAxis::Y, ..model.clone() };
        assert!((top(&across, end_wall(50, 88, 1.5)) - 1.5).abs() < 1e-4);
    }
}
