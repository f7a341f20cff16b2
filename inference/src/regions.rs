//! From a thresholded anomaly map to regions: 8-connected components.

use ndarray::ArrayView2;

/// A connected area of the map at or above the threshold, in image pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    /// 1-based, in order of decreasing maximum score.
    pub id: u32,
    /// Left edge in pixels.
    pub x: u32,
    /// Top edge in pixels.
    pub y: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Area in pixels (cells x stride²).
    pub area: u64,
    /// Highest normalised score inside.
    pub max_score: f32,
    /// Mean normalised score inside.
    pub mean_score: f32,
}

fn find(parent: &mut [u32], mut x: u32) -> u32 {
    while parent[x as usize] != x {
        parent[x as usize] = parent[parent[x as usize] as usize];
        x = parent[x as usize];
    }
    x
}

/// What is known of one provisional label: its cells' bounding box (map
/// cells, inclusive), count, highest and summed score.
#[derive(Clone, Copy)]
struct Acc {
    y0: usize,
    x0: usize,
    y1: usize,
    x1: usize,
    cells: u64,
    max: f32,
    sum: f64,
}

impl Acc {
    fn new(y: usize, x: usize) -> Acc {
        Acc { y0: y, x0: x, y1: y, x1: x, cells: 0, max: f32::NEG_INFINITY, sum: 0.0 }
    }

    fn add(&mut self, y: usize, x: usize, v: f32) {
        self.y1 = y;
        self.x0 = self.x0.min(x);
        self.x1 = self.x1.max(x);
        self.cells += 1;
        self.max = self.max.max(v);
        self.sum += f64::from(v);
    }

    fn merge(&mut self, o: &Acc) {
        self.y0 = self.y0.min(o.y0);
        self.x0 = self.x0.min(o.x0);
        self.y1 = self.y1.max(o.y1);
        self.x1 = self.x1.max(o.x1);
        self.cells += o.cells;
        self.max = self.max.max(o.max);
        self.sum += o.sum;
    }
}

/// Whether any of `row` is marked: not below `threshold` (a NaN cell is).
fn any_marked(row: &[f32], threshold: f32) -> bool {
    // `v >= threshold || v.is_nan()`, the complement of `v < threshold`.
    row.chunks(64).any(|c| c.iter().fold(false, |a, &v| a | (v >= threshold) | v.is_nan()))
}

/// Labels cells `>= threshold` into 8-connected regions, drops those smaller
/// than `min_area` pixels, and converts to pixel coordinates clipped to
/// `width x height`. `stride` is pixels per map cell.
///
/// One pass over the map, row by row: each marked cell takes the label of a
/// marked neighbour above or to the left (labels that meet are joined in a
/// union-find) and adds itself to its label's box, count and sums; only the
/// labels of the previous row are kept, so memory grows with the labels,
/// not with the map. Rows with no marked cell are skipped at once.
pub fn find_regions(
    map: ArrayView2<'_, f32>,
    threshold: f32,
    stride: usize,
    min_area: u64,
    (height, width): (usize, usize),
) -> Vec<Region> {
    let cols = map.ncols();
    let (mut prev, mut cur) = (vec![0u32; cols], vec![0u32; cols]);
    let mut prev_marked = false;
    let mut parent: Vec<u32> = vec![0];
    let mut acc: Vec<Acc> = vec![Acc::new(0, 0)];
    for (y, row) in map.rows().into_iter().enumerate() {
        let row = row.as_slice().map_or_else(|| std::borrow::Cow::Owned(row.to_vec()), std::borrow::Cow::Borrowed);
        if !any_marked(&row, threshold) {
            if prev_marked {
                prev.fill(0);
                prev_marked = false;
            }
            continue;
        }
        let mut skip_to = 0;
        for x in 0..cols {
            if x % 16 == 0 && !any_marked(&row[x..(x + 16).min(cols)], threshold) {
                // 16 cells at once where none is marked (most of a map).
                cur[x..(x + 16).min(cols)].fill(0);
                skip_to = x + 16;
            }
            if x < skip_to {
                continue;
            }
            let v = row[x];
            if v < threshold {
                cur[x] = 0;
                continue;
            }
            let mut neighbours = [0u32; 4];
            let mut n = 0;
            for l in [
                if x > 0 { cur[x - 1] } else { 0 },
                if x > 0 { prev[x - 1] } else { 0 },
                prev[x],
                if x + 1 < cols { prev[x + 1] } else { 0 },
            ] {
                if l != 0 {
                    neighbours[n] = l;
                    n += 1;
                }
            }
            let label = if n == 0 {
                parent.push(parent.len() as u32);
                acc.push(Acc::new(y, x));
                (parent.len() - 1) as u32
            } else {
                let root = neighbours[..n].iter().map(|&l| find(&mut parent, l)).min().unwrap_or(0);
                for &l in &neighbours[..n] {
                    let r = find(&mut parent, l);
                    parent[r as usize] = root;
                }
                root
            };
            cur[x] = label;
            acc[label as usize].add(y, x, v);
        }
        std::mem::swap(&mut prev, &mut cur);
        prev_marked = true;
    }
    // Each label's figures into its root's, in label order.
    for l in 1..parent.len() {
        let r = find(&mut parent, l as u32) as usize;
        if r != l {
            let a = acc[l];
            acc[r].merge(&a);
        }
    }
    let s = stride as u64;
    let mut out: Vec<Region> = (1..parent.len())
        .filter(|&l| parent[l] as usize == l)
        .map(|l| acc[l])
        .filter(|a| a.cells * s * s >= min_area)
        .map(|a| {
            let y = a.y0 * stride;
            let x = a.x0 * stride;
            let y_end = ((a.y1 + 1) * stride).min(height);
            let x_end = ((a.x1 + 1) * stride).min(width);
            Region {
                id: 0,
                x: x as u32,
                y: y as u32,
                width: (x_end - x) as u32,
                height: (y_end - y) as u32,
                area: a.cells * s * s,
                max_score: a.max,
                mean_score: (a.sum / a.cells as f64) as f32,
            }
        })
        .collect();
    out.sort_by(|a, b| b.max_score.total_cmp(&a.max_score).then((a.y, a.x).cmp(&(b.y, b.x))));
    for (i, r) in out.iter_mut().enumerate() {
        r.id = i as u32 + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;

    use super::*;

    #[test]
    fn diagonal_cells_join_and_separate_blobs_stay_apart() {
        let mut m = Array2::<f32>::zeros((10, 12));
        m[[1, 1]] = 0.9;
        m[[2, 2]] = 0.7; // diagonal neighbour: same region
        for y in 6..9 {
            for x in 7..11 {
                m[[y, x]] = 0.6;
            }
        }
        m[[0, 11]] = 0.55; // one cell, dropped by min_area
        let r = find_regions(m.view(), 0.5, 1, 2, (10, 12));
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].id, r[0].x, r[0].y, r[0].width, r[0].height, r[0].area), (1, 1, 1, 2, 2, 2));
        assert!((r[0].mean_score - 0.8).abs() < 1e-6);
        assert_eq!((r[1].x, r[1].y, r[1].width, r[1].height, r[1].area), (7, 6, 4, 3, 12));
    }

    #[test]
    fn u_shapes_merge_into_one_region() {
        let mut m = Array2::<f32>::zeros((5, 5));
        for y in 0..5 {
            m[[y, 0]] = 1.0;
            m[[y, 4]] = 1.0;
        }
        for x in 0..5 {
            m[[4, x]] = 1.0;
        }
        let r = find_regions(m.view(), 0.5, 1, 0, (5, 5));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].area, 13);
    }

    /// Regions by flood fill, the plain way: what the one-pass labelling must find.
    fn flood_fill(m: &Array2<f32>, threshold: f32) -> Vec<(u32, u32, u32, u32, u64, f32)> {
        let (h, w) = m.dim();
        let mut seen = Array2::from_elem((h, w), false);
        let mut out = Vec::new();
        for (y0, x0) in (0..h).flat_map(|y| (0..w).map(move |x| (y, x))) {
            if seen[[y0, x0]] || m[[y0, x0]] < threshold {
                continue;
            }
            seen[[y0, x0]] = true;
            let (mut stack, mut cells, mut top) = (vec![(y0, x0)], 0u64, f32::NEG_INFINITY);
            let (mut ya, mut xa, mut yb, mut xb) = (y0, x0, y0, x0);
            while let Some((y, x)) = stack.pop() {
                cells += 1;
                top = top.max(m[[y, x]]);
                (ya, xa, yb, xb) = (ya.min(y), xa.min(x), yb.max(y), xb.max(x));
                for (dy, dx) in [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)] {
                    let (ny, nx) = (y as isize + dy, x as isize + dx);
                    if ny < 0 || nx < 0 || ny >= h as isize || nx >= w as isize {
                        continue;
                    }
                    let (ny, nx) = (ny as usize, nx as usize);
                    if !seen[[ny, nx]] && m[[ny, nx]] >= threshold {
                        seen[[ny, nx]] = true;
                        stack.push((ny, nx));
                    }
                }
            }
            out.push((xa as u32, ya as u32, (xb - xa + 1) as u32, (yb - ya + 1) as u32, cells, top));
        }
        out.sort_by(|a, b| b.5.total_cmp(&a.5).then((a.1, a.0).cmp(&(b.1, b.0))));
        out
    }

    #[test]
    fn one_pass_labelling_finds_what_a_flood_fill_finds() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..40 {
            let (h, w) = (7 + round % 13, 5 + (round * 7) % 29);
            // Blobs, spirals and stray cells: random cells over a rising density.
            let m = Array2::from_shape_fn((h, w), |(y, x)| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let noise = (seed >> 40) as f32 / (1u64 << 24) as f32;
                noise * (0.4 + 0.4 * ((x + y + round) % 5) as f32 / 4.0)
                    + if (x * y + round) % 11 == 0 { 0.5 } else { 0.0 }
            });
            let got: Vec<_> = find_regions(m.view(), 0.5, 1, 0, (h, w))
                .iter()
                .map(|r| (r.x, r.y, r.width, r.height, r.area, r.max_score))
                .collect();
            assert_eq!(got, flood_fill(&m, 0.5), "round {round}: {m:?}");
        }
    }

    #[test]
    fn stride_scales_boxes_and_clips_at_the_edge() {
        let mut m = Array2::<f32>::zeros((4, 4));
        m[[3, 3]] = 1.0;
        let r = find_regions(m.view(), 0.5, 8, 0, (30, 29));
        assert_eq!((r[0].x, r[0].y, r[0].width, r[0].height, r[0].area), (24, 24, 5, 6, 64));
    }
}
