#!/usr/bin/env python3
"""Writes a 16-bit dual-energy test scan (high + low TIFF) for comparing the
Python baseline (pipeline.py) with niix.

Two scenes:

  container (default)  fixtures/samples/make_samples.py's container scene
                       (corrugated walls, floor cross-members, door frames,
                       pallets of cartons, dense blocks), vectorised with numpy
                       and laid out for any size, with Poisson-like noise. It
                       makes the demo model raise regions (ALARM), so boxes,
                       areas and scores get compared, not only a CLEAR.
  bench                the exact scene of benches/lib.rs `cargo_plane`, the
                       one `benches/pipeline_stages.rs` times (mostly CLEAR
                       with the demo model).

The container's length runs along the longer image axis. Deterministic for a
given --seed. TIFFs are uncompressed, Pillow's default strips.

Usage: make_scan.py OUT_DIR [--width 2048] [--height 6144] [--scene container|bench] [--seed 6346]
       writes OUT_DIR/high.tif and OUT_DIR/low.tif
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

I0 = 60000.0


def bench_plane(w: int, h: int, low: bool) -> np.ndarray:
    """benches/lib.rs `cargo_plane`, integer for integer (u32 wrap-around included)."""
    i = np.arange(w * h, dtype=np.uint64)
    x, y = i % w, i // w
    wall = 2000 * ((x // 7) % 2 == 0).astype(np.int64)
    block = ((x // 300 + y // 500) % 7 == 0).astype(np.int64) * 18000
    noise = ((i * 2654435761) & 0xFFFFFFFF) >> 22  # u32 wrapping_mul, then >> 22
    v = np.maximum(40000 - (wall + block), 0) + noise.astype(np.int64)
    if low:
        v = v * 3 // 5
    return np.minimum(v, 65535).astype(np.uint16).reshape(h, w)


def container_thickness(length: int, depth: int, rng: np.random.Generator):
    """(steel mm, organic mm) over a length x depth side view, as in make_samples.py."""
    steel = np.zeros((depth, length), np.float64)
    organic = np.zeros_like(steel)
    margin = max(60, length // 25)
    x0, x1, y0, y1 = margin, length - margin, max(60, depth // 8), depth - max(40, depth // 12)
    xs = np.arange(length)
    steel[y0:y1, x0:x1] += 4.0 + 1.5 * np.sin(xs[x0:x1] / 6.0)  # corrugated side walls
    for x in range(x0, x1, 48):  # floor cross-members
        steel[y1 - 14:y1, x:min(x + 6, length)] += 30.0
    steel[y0:y1, x0:x0 + 10] += 40.0  # door frames
    steel[y0:y1, x1 - 10:x1] += 40.0
    px = x0 + 30
    yy, xx = np.mgrid[0:depth, 0:length]
    checker = 250.0 + 60.0 * ((xx // 25 + yy // 25) % 2)
    while px < x1 - 200:  # pallets of cartons
        w, h = int(rng.integers(120, 201)), int(rng.integers(depth // 3, (2 * depth) // 3))
        organic[y1 - 14 - h:y1 - 14, px:px + w] += checker[y1 - 14 - h:y1 - 14, px:px + w]
        px += w + int(rng.integers(20, 61))
    # Dense blocks among the cartons (what the demo model flags), various sizes.
    for k, (bw, bh, mm) in enumerate([(45, 40, 90.0), (20, 20, 60.0), (80, 30, 45.0), (12, 60, 120.0)]):
        cx = x0 + (k + 1) * (x1 - x0) // 5
        cy = y0 + (k % 2 + 1) * (y1 - y0) // 3
        steel[cy:cy + bh, cx:cx + bw] += mm
    return steel, organic


def container_planes(w: int, h: int, seed: int):
    rng = np.random.default_rng(seed)
    length, depth = max(w, h), min(w, h)
    steel, organic = container_thickness(length, depth, rng)
    if h > w:  # the container's length runs down the image
        steel, organic = steel.T, organic.T
    out = {}
    # Linear attenuation (1/mm) of steel and organic material, high and low energy.
    for name, (mu_s, mu_o) in {"high": (0.025, 0.0020), "low": (0.045, 0.0045)}.items():
        i = I0 * np.exp(-mu_s * steel - mu_o * organic)
        i += rng.standard_normal(i.shape) * np.sqrt(np.maximum(i, 1.0))  # Poisson-like noise
        out[name] = np.clip(i, 1, 65535).astype(np.uint16)
    return out["high"], out["low"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--height", type=int, default=6144)
    ap.add_argument("--scene", choices=["container", "bench"], default="container")
    ap.add_argument("--seed", type=int, default=6346)
    a = ap.parse_args()
    if a.scene == "bench":
        high, low = bench_plane(a.width, a.height, False), bench_plane(a.width, a.height, True)
    else:
        high, low = container_planes(a.width, a.height, a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, px in (("high", high), ("low", low)):
        path = a.out / f"{name}.tif"
        Image.fromarray(px).save(path)  # mode I;16, uncompressed
        print(f"wrote {path} ({px.shape[1]}x{px.shape[0]}, 16-bit)")


if __name__ == "__main__":
    main()
