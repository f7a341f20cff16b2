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

/// Labels cells `>= threshold` into 8-connected regions, drops those smaller
/// than `min_area` pixels, and converts to pixel coordinates clipped to
/// `width x height`. `stride` is pixels per map cell.
pub fn find_regions(
    map: ArrayView2<'_, f32>,
    threshold: f32,
    stride: usize,
    min_area: u64,
    (height, width): (usize, usize),
) -> Vec<Region> {
    let (rows, cols) = map.dim();
    let mut labels = vec![0u32; rows * cols];
    let mut parent: Vec<u32> = vec![0];
    // The cells at or over the threshold, in row order: usually a few out of
    // millions, so the second pass visits only them.
    let mut marked: Vec<(usize, usize, f32)> = Vec::new();
    for (y, row) in map.rows().into_iter().enumerate() {
        let row = row.as_slice().map_or_else(|| std::borrow::Cow::Owned(row.to_vec()), std::borrow::Cow::Borrowed);
        for (x, &v) in row.iter().enumerate() {
            if v < threshold {
                continue;
            }
            marked.push((y, x, v));
            let mut neighbours = [0u32; 4];
            let mut n = 0;
            let mut see = |yy: usize, xx: usize| {
                let l = labels[yy * cols + xx];
                if l != 0 {
                    neighbours[n] = l;
                    n += 1;
                }
            };
            if x > 0 {
                see(y, x - 1);
            }
            if y > 0 {
                see(y - 1, x);
                if x > 0 {
                    see(y - 1, x - 1);
                }
                if x + 1 < cols {
                    see(y - 1, x + 1);
                }
            }
            let label = if n == 0 {
                parent.push(parent.len() as u32);
                (parent.len() - 1) as u32
            } else {
                let root = neighbours[..n].iter().map(|&l| find(&mut parent, l)).min().unwrap_or(0);
                for &l in &neighbours[..n] {
                    let r = find(&mut parent, l);
                    parent[r as usize] = root;
                }
                root
            };
            labels[y * cols + x] = label;
        }
    }
    struct Acc {
        y0: usize,
        x0: usize,
        y1: usize,
        x1: usize,
        cells: u64,
        max: f32,
        sum: f64,
    }
    let mut acc: std::collections::HashMap<u32, Acc> = std::collections::HashMap::new();
    for (y, x, v) in marked {
        let root = find(&mut parent, labels[y * cols + x]);
        let a = acc.entry(root).or_insert(Acc { y0: y, x0: x, y1: y, x1: x, cells: 0, max: v, sum: 0.0 });
        a.y0 = a.y0.min(y);
        a.x0 = a.x0.min(x);
        a.y1 = a.y1.max(y);
        a.x1 = a.x1.max(x);
        a.cells += 1;
        a.max = a.max.max(v);
        a.sum += f64::from(v);
    }
    let s = stride as u64;
    let mut out: Vec<Region> = acc
        .into_values()
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

    #[test]
    fn stride_scales_boxes_and_clips_at_the_edge() {
        let mut m = Array2::<f32>::zeros((4, 4));
        m[[3, 3]] = 1.0;
        let r = find_regions(m.view(), 0.5, 8, 0, (30, 29));
        assert_eq!((r[0].x, r[0].y, r[0].width, r[0].height, r[0].area), (24, 24, 5, 6, 64));
    }
}
