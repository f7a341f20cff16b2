//! What an analyst sees: a plane windowed to 8 bits, downsampled, with the
//! anomaly map as a translucent heat layer and the regions boxed and
//! labelled.
//!
//! A stored plane is read row by row ([`render_plane`]): once for the
//! automatic window's histogram, once to window and box-average the rows
//! into the output image. Memory is the output image, whatever the plane's
//! size.

use std::io::{Seek, SeekFrom};

use ndarray::Array2;
use niix_inference::decode::{DecodeLimits, decode_rows};
use niix_inference::pipeline::PlaneInput;
use niix_proto::v1::Region;

use crate::error::{Error, Result};

/// Colour of region boxes and labels (pure green, drawn last).
pub const BOX_COLOUR: [u8; 3] = [0, 255, 0];
/// Default largest width of an overlay.
pub const DEFAULT_MAX_WIDTH: u32 = 1600;
/// Scores below this are not painted on the heat layer.
const HEAT_FLOOR: f32 = 0.2;

/// Choices of the viewer.
#[derive(Debug, Clone, Copy)]
pub struct OverlayOptions {
    /// Largest output width (aspect ratio kept; never enlarged).
    pub max_width: u32,
    /// Display window in raw values; `None` = 0.5th..99.5th percentile.
    pub window: Option<(u16, u16)>,
    /// Paint the anomaly map.
    pub heat: bool,
    /// Draw region boxes and labels.
    pub boxes: bool,
}

/// A rendered overlay.
#[derive(Debug, Clone)]
pub struct Overlay {
    /// PNG bytes (RGB, 8 bits).
    pub png: Vec<u8>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The window used.
    pub window: (u16, u16),
}

/// The 0.5th and 99.5th percentiles of the plane.
pub fn auto_window(plane: &Array2<u16>) -> (u16, u16) {
    let mut hist = vec![0u64; 65536];
    for &v in plane {
        hist[v as usize] += 1;
    }
    window_of(&hist)
}

/// The 0.5th and 99.5th percentiles of a histogram of 16-bit samples.
pub(crate) fn window_of(hist: &[u64]) -> (u16, u16) {
    let n: u64 = hist.iter().sum();
    let pick = |q: f64| {
        let target = ((n as f64) * q) as u64;
        let mut acc = 0;
        for (v, c) in hist.iter().enumerate() {
            acc += c;
            if acc > target {
                return v as u16;
            }
        }
        u16::MAX
    };
    let (lo, hi) = (pick(0.005), pick(0.995));
    if hi > lo { (lo, hi) } else { (lo.saturating_sub(1), lo.saturating_add(1).max(1)) }
}

/// Box-averages windowed rows of a `w x h` plane into an `ow x oh` image,
/// a row at a time: source row `y` falls in output row `y * oh / h`, column
/// `x` in output column `x * ow / w`.
struct BoxDown {
    w: usize,
    h: usize,
    ow: usize,
    oh: usize,
    /// Output column of each source column.
    col: Vec<u32>,
    /// Source columns in each output column.
    per_col: Vec<u32>,
    /// Sums of the output row being built, and its source rows so far.
    sums: Vec<u32>,
    rows: u32,
    current: usize,
    out: Vec<u8>,
}

impl BoxDown {
    fn new((w, h): (usize, usize), (ow, oh): (usize, usize)) -> BoxDown {
        let col: Vec<u32> = (0..w).map(|x| (x * ow / w) as u32).collect();
        let mut per_col = vec![0u32; ow];
        for &c in &col {
            per_col[c as usize] += 1;
        }
        BoxDown { w, h, ow, oh, col, per_col, sums: vec![0; ow], rows: 0, current: 0, out: vec![0; ow * oh] }
    }

    fn flush(&mut self) {
        if self.rows == 0 {
            return;
        }
        let dst = &mut self.out[self.current * self.ow..(self.current + 1) * self.ow];
        for ((d, s), n) in dst.iter_mut().zip(&mut self.sums).zip(&self.per_col) {
            let n = n * self.rows;
            *d = ((*s + n / 2) / n.max(1)) as u8;
            *s = 0;
        }
        self.rows = 0;
    }

    fn push(&mut self, y: usize, grey: &[u8]) {
        let target = y * self.oh / self.h;
        if target != self.current {
            self.flush();
            self.current = target;
        }
        for (&g, &c) in grey.iter().zip(&self.col).take(self.w) {
            self.sums[c as usize] += u32::from(g);
        }
        self.rows += 1;
    }

    fn finish(mut self) -> Vec<u8> {
        self.flush();
        self.out
    }
}

/// Renders a stored plane, decoded row by row (twice when the window is
/// automatic), with its anomaly map and regions (see [`render`]).
pub fn render_plane(
    input: &mut PlaneInput,
    map: Option<(&Array2<u8>, u32)>,
    regions: &[Region],
    options: &OverlayOptions,
) -> Result<Overlay> {
    let (w, h, encoding, kind) = (input.width, input.height, input.encoding, input.kind.clone());
    let reader = &mut input.reader;
    let mut read = |sink: &mut dyn FnMut(usize, &[u16])| -> Result<()> {
        let bad = |e: String| Error::Internal(format!("decoding the {kind} plane: {e}"));
        reader.seek(SeekFrom::Start(0)).map_err(|e| bad(e.to_string()))?;
        decode_rows(&mut *reader, encoding, w, h, &DecodeLimits::default(), |y, row| {
            sink(y as usize, row);
            Ok(())
        })
        .map(|_| ())
        .map_err(|e| bad(e.to_string()))
    };
    render_rows((h as usize, w as usize), &mut read, map, regions, options)
}

/// Renders a plane held in memory (see [`render_rows`]).
pub fn render(
    plane: &Array2<u16>,
    map: Option<(&Array2<u8>, u32)>,
    regions: &[Region],
    options: &OverlayOptions,
) -> Result<Overlay> {
    let mut read = |sink: &mut dyn FnMut(usize, &[u16])| -> Result<()> {
        for (y, row) in plane.rows().into_iter().enumerate() {
            match row.as_slice() {
                Some(samples) => sink(y, samples),
                None => sink(y, &row.to_vec()),
            }
        }
        Ok(())
    };
    render_rows(plane.dim(), &mut read, map, regions, options)
}

/// 3x5 glyphs for labels: digits, '.', '#'. Each row is 3 bits, MSB left.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '#' => [5, 7, 5, 7, 5],
        _ => [0; 5],
    }
}

struct Canvas {
    rgb: Vec<u8>,
    w: usize,
    h: usize,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, thick: i64, c: [u8; 3]) {
        for t in 0..thick {
            for x in x0..=x1 {
                self.set(x, y0 + t, c);
                self.set(x, y1 - t, c);
            }
            for y in y0..=y1 {
                self.set(x0 + t, y, c);
                self.set(x1 - t, y, c);
            }
        }
    }

    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            let ox = x + k as i64 * 4 * scale;
            // Dark backing so the label reads on any background.
            for yy in -1..6 * scale {
                for xx in -1..4 * scale {
                    self.set(ox + xx, y + yy, [0, 0, 0]);
                }
            }
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                self.set(ox + col * scale + dx, y + row as i64 * scale + dy, c);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A plane read row by row: each call hands every `(row, samples)` to the
/// sink, top to bottom.
pub type ReadRows<'a> = dyn FnMut(&mut dyn FnMut(usize, &[u16])) -> Result<()> + 'a;

/// Renders a `(height, width)` plane, read through `read`, with its anomaly
/// map (`map`, one cell per `stride` pixels, 0..255) and regions.
pub fn render_rows(
    (h, w): (usize, usize),
    read: &mut ReadRows<'_>,
    map: Option<(&Array2<u8>, u32)>,
    regions: &[Region],
    options: &OverlayOptions,
) -> Result<Overlay> {
    let window = match options.window.filter(|(lo, hi)| hi > lo) {
        Some(window) => window,
        None => {
            let mut hist = vec![0u64; 65536];
            read(&mut |_, row| {
                for &v in row {
                    hist[v as usize] += 1;
                }
            })?;
            window_of(&hist)
        }
    };
    let (lo, hi) = (f32::from(window.0), f32::from(window.1));
    let lut: Vec<u8> =
        (0..=u16::MAX).map(|v| (((f32::from(v) - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0).round() as u8).collect();

    let max_width = if options.max_width == 0 { DEFAULT_MAX_WIDTH } else { options.max_width };
    let out_w = (w as u32).min(max_width).max(1);
    let out_h = ((h as f64 * f64::from(out_w) / w as f64).round() as u32).clamp(1, h.max(1) as u32);
    let mut down = BoxDown::new((w, h), (out_w as usize, out_h as usize));
    let mut grey = vec![0u8; w];
    read(&mut |y, row| {
        for (g, &v) in grey.iter_mut().zip(row) {
            *g = lut[v as usize];
        }
        down.push(y, &grey);
    })?;
    let small = down.finish();
    let (ow, oh) = (out_w as usize, out_h as usize);
    let mut canvas = Canvas { rgb: small.iter().flat_map(|&g| [g, g, g]).collect(), w: ow, h: oh };
    let sx = w as f64 / ow as f64;
    let sy = h as f64 / oh as f64;

    if options.heat
        && let Some((map, stride)) = map
    {
        let (mh, mw) = map.dim();
        let stride = f64::from(stride.max(1));
        for y in 0..oh {
            let my = (((y as f64 + 0.5) * sy / stride) as usize).min(mh.saturating_sub(1));
            for x in 0..ow {
                let mx = (((x as f64 + 0.5) * sx / stride) as usize).min(mw.saturating_sub(1));
                let s = f32::from(map[[my, mx]]) / 255.0;
                if s < HEAT_FLOOR {
                    continue;
                }
                // Red for the floor, towards yellow at 1; more opaque when higher.
                let alpha = 0.25 + 0.45 * (s - HEAT_FLOOR) / (1.0 - HEAT_FLOOR);
                let heat = [255.0, 255.0 * (s - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0];
                let i = (y * ow + x) * 3;
                for (px, h) in canvas.rgb[i..i + 3].iter_mut().zip(heat) {
                    *px = (f32::from(*px) * (1.0 - alpha) + h * alpha).round() as u8;
                }
            }
        }
    }

    if options.boxes {
        let scale = if ow >= 800 { 2 } else { 1 };
        for r in regions {
            let x0 = (f64::from(r.x) / sx).floor() as i64;
            let y0 = (f64::from(r.y) / sy).floor() as i64;
            let x1 = ((f64::from(r.x + r.width) / sx).ceil() as i64 - 1).max(x0);
            let y1 = ((f64::from(r.y + r.height) / sy).ceil() as i64 - 1).max(y0);
            canvas.rect(x0, y0, x1, y1, 2, BOX_COLOUR);
            let label = format!("#{} {:.2}", r.id, r.max_score).replace(' ', "");
            let ly = if y0 >= 7 * scale { y0 - 7 * scale } else { y1 + 3 };
            canvas.text(x0, ly, &label, scale, BOX_COLOUR);
        }
    }

    let mut png_bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut png_bytes, out_w, out_h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fast);
    let mut writer = enc.write_header().map_err(|e| Error::Internal(format!("overlay PNG: {e}")))?;
    writer.write_image_data(&canvas.rgb).map_err(|e| Error::Internal(format!("overlay PNG: {e}")))?;
    writer.finish().map_err(|e| Error::Internal(format!("overlay PNG: {e}")))?;
    Ok(Overlay { png: png_bytes, width: out_w, height: out_h, window })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_ignores_outliers() {
        let mut p = Array2::<u16>::from_elem((100, 100), 1000);
        for (i, v) in p.iter_mut().enumerate() {
            *v = 1000 + (i % 1000) as u16;
        }
        p[[0, 0]] = 0;
        p[[0, 1]] = 65535;
        let (lo, hi) = auto_window(&p);
        assert!((1000..1010).contains(&lo) && (1990..2000).contains(&hi), "{lo} {hi}");
    }

    #[test]
    fn rows_are_box_averaged_into_the_output() {
        // 8x4 samples 0..255 with an identity window, drawn 4 wide: each
        // output pixel is the rounded mean of a 2x2 block.
        let plane = Array2::from_shape_fn((4, 8), |(y, x)| (y * 50 + x * 7 + (x * y) % 3) as u16);
        let options = OverlayOptions { max_width: 4, window: Some((0, 255)), heat: false, boxes: false };
        let o = render(&plane, None, &[], &options).unwrap();
        assert_eq!((o.width, o.height), (4, 2));
        let mut reader = png::Decoder::new(std::io::Cursor::new(o.png)).read_info().unwrap();
        let mut rgb = vec![0u8; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut rgb).unwrap();
        for (oy, ox) in [(0, 0), (1, 3), (0, 2)] {
            let sum: u32 = (0..2)
                .flat_map(|dy| (0..2).map(move |dx| (dy, dx)))
                .map(|(dy, dx)| u32::from(plane[[oy * 2 + dy, ox * 2 + dx]]))
                .sum();
            assert_eq!(u32::from(rgb[(oy * 4 + ox) * 3]), (sum + 2) / 4, "pixel {ox},{oy}");
        }
    }
}
