#!/usr/bin/env python3
r"""Reference Python pipeline: niix's scan analysis, written the way a customs
data team would write it with Pillow + numpy + scipy.ndimage + onnxruntime.

It is the baseline of the benchmark figure "speedup_vs_python" (Python
seconds / niix seconds on the same scan and model: the demo model and the
shipped cargo-patchcore). It does exactly what niix's Rust
tensor core does, with the same model, the same tiles and the same
post-processing, so its findings equal niix's (see check_equal.py):

  stage            what                                                  mirrors (Rust)
  ---------------  ----------------------------------------------------  -------------------------------------------
  manifest         read model.toml, defaults as niix                     inference/src/manifest.rs
  model            ONNX Runtime session, trial run on a blank tile to    inference/src/model.rs (Model::load, run)
                   learn the map stride; [[constants]] inputs (a memory
                   bank) fed with every batch
  select planes    per input channel the first plane kind that the scan  inference/src/pipeline.rs (select_planes)
                   has, of the channel's "a|b|c" alternatives
  decode           TIFF/PNG, 8- or 16-bit grey -> uint16 (8-bit widened  inference/src/decode.rs, pipeline.rs
                   as is, not rescaled), full resolution, never resized; (decode_plane)
                   one thread per plane, as niix
  transform        65536-entry float32 lookup table per channel          pipeline.rs (lookup_table, transform)
                   (neg_log | ratio | raw, clip, mean/std) -> [C, H, W],
                   on the plane's decode thread
  tile             tile x tile tiles overlapping by >= overlap; the      inference/src/tiling.rs (Axis, Grid),
                   last one pulled back to the edge; outside the image   pipeline.rs (fill_tile)
                   padded with the transformed value of air (i0)
  infer            `batch` tiles per ONNX Runtime call, row-major order; pipeline.rs (infer_streaming), model.rs (run)
                   a second thread fills the next batch meanwhile
  structure        models with a [structure] file, on scans of its size: structure.rs (Structure::raise)
                   register the first channel by row/column profiles,
                   8x8 block means, excess over the normal limit beyond
                   the cargo running on from the hold, raise the map
  stitch           each tile writes only the map cells it owns (overlap  tiling.rs (owned), pipeline.rs (stitch_tile)
                   split at its midpoint); background_weight x the map's
                   background_quantile off every cell if the weight is > 0;
                   score = clamp((v - score_min)
                   / (score_max - score_min), 0, 1)
  post-process     cells >= threshold -> 8-connected regions             inference/src/regions.rs (find_regions),
                   (scipy.ndimage.label); drop those
                   under min_region_area pixels; boxes in pixels clipped  pipeline.rs (analyze)
                   to the image; sort by max score desc, then (y, x);
                   scan score = max of the map; ALARM iff a region        server/src/analysis.rs (machine_report)
                   remains, else CLEAR

Differences that are deliberate and do not change results:
  * niix streams: it decodes and tiles rows as they are read, so ONNX Runtime
    starts before the planes are decoded. Here the planes are decoded whole
    (on two threads), then a second thread fills the next batch while ONNX
    Runtime runs the current one (niix's tiler thread does the same); "tile"
    is the time spent waiting for a filled batch.
  * Scores are normalised once on the stitched raw map instead of per tile
    (same float32 arithmetic per cell, so bit-identical).
  * Sums whose order numpy chooses (row profiles, the registration's
    correlations) may differ from niix's in the last bit; scores agree far
    inside check_equal.py's tolerance. Block means and region statistics are
    summed in niix's order.
  * decision.smooth > 1 (a map box filter) is not mirrored: the baseline
    refuses such a model rather than time something else.

ONNX Runtime threads as niix's defaults: intra_op = number of cores,
inter_op = 1 (inference/src/runtime.rs, Threads::default).

"seconds" is the wall time of one analysis from the plane files on disk to the
findings: decode included; interpreter start, imports and the model session
load (niix loads models once at start) excluded. With --repeat N the whole
analysis runs N times and "seconds" is the best, "seconds_mean" the mean.

Usage:
  pipeline.py --model fixtures/models/cargo-patchcore/1 \
      --plane high.tif [--plane low.tif] [--repeat N] [--json] [--save-map MAP.npy]
A plane is FILE or KIND=FILE. Without kinds, as `niix push`: one plane is
single_energy; two are high_energy then low_energy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from scipy import ndimage

HIGH_THREAT_SCORE = 0.9  # server/src/analysis.rs: HIGH_THREAT at max score >= 0.9
PLANE_KINDS = ("single_energy", "high_energy", "low_energy", "z_effective", "backscatter")
F32 = np.float32
POOL = ThreadPoolExecutor(2)  # plane decoders, then the batch filler


# --------------------------------------------------------------------------
# Manifest (inference/src/manifest.rs): the fields the analysis uses, with
# niix's defaults. niix's full validation (unknown keys, ranges) is not
# repeated; the bundled manifest passes it.
# --------------------------------------------------------------------------
@dataclass
class Manifest:
    input_name: str
    channels: list[str]
    tile: int
    overlap: int
    batch: int
    kind: str  # neg_log | ratio | raw
    i0: float
    clip: tuple[float, float] | None
    mean: list[float]
    std: list[float]
    output_name: str
    score_min: float
    score_max: float
    threshold: float
    min_region_area: int
    category: str
    background_weight: float
    background_quantile: float
    smooth: int
    constants: list[tuple[str, str, list[int]]]  # (input name, file, shape)
    structure: dict | None  # [structure] with niix's defaults, when the model has one

    @staticmethod
    def load(model_dir: Path) -> "Manifest":
        m = tomllib.loads((model_dir / "model.toml").read_text())
        inp, tr, out, dec = m["input"], m["transform"], m["output"], m["decision"]
        clip = tr.get("clip")
        return Manifest(
            input_name=inp["name"],
            channels=list(inp["channels"]),
            tile=int(inp["tile"]),
            overlap=int(inp["overlap"]),
            batch=int(inp.get("batch", 4)),
            kind=tr["kind"],
            i0=float(tr.get("i0", 65535.0)),
            clip=(float(clip[0]), float(clip[1])) if clip else None,
            mean=[float(v) for v in tr.get("mean", [])],
            std=[float(v) for v in tr.get("std", [])],
            output_name=out["name"],
            score_min=float(dec["score_min"]),
            score_max=float(dec["score_max"]),
            threshold=float(dec["threshold"]),
            min_region_area=int(dec.get("min_region_area", 0)),
            category=dec.get("category", "ANOMALY"),
            background_weight=float(dec.get("background_weight", 0.0)),
            background_quantile=float(dec.get("background_quantile", 0.99)),
            smooth=int(dec.get("smooth", 1)),
            constants=[(c["name"], c["file"], [int(d) for d in c["shape"]]) for c in m.get("constants", [])],
            structure=(
                {"block": 8, "max_shift": 48, "reach": 12, **m["structure"]} if "structure" in m else None
            ),
        )

    def channel_kinds(self, c: int) -> list[str]:
        """Plane kinds that may feed channel c, in preference order."""
        return [k.strip() for k in self.channels[c].split("|")]

    def normalisation(self, c: int) -> tuple[float, float]:
        """(mean, std) of channel c: none -> (0, 1); one value -> every channel."""
        pick = lambda v, default: default if not v else (v[0] if len(v) == 1 else v[c])  # noqa: E731
        return pick(self.mean, 0.0), pick(self.std, 1.0)


# --------------------------------------------------------------------------
# Structure model (inference/src/structure.rs): the conveyance's own
# structure, per 8x8 block of the first channel, raising the map where a
# registered scan exceeds the normal limit there.
# --------------------------------------------------------------------------
class Structure:
    def __init__(self, model_dir: Path, spec: dict):
        h, w, b = int(spec["height"]), int(spec["width"]), int(spec["block"])
        bh, bw = h // b, w // b
        v = np.fromfile(model_dir / spec["file"], dtype="<f4")
        if v.size != h + w + 2 * bh * bw:
            raise SystemExit(f"{spec['file']}: {v.size} values; {h}x{w} scans in {b}-pixel blocks need {h + w + 2 * bh * bw}")
        self.block, self.max_shift, self.reach = b, int(spec["max_shift"]), int(spec["reach"])
        self.margin, self.weight = F32(spec["margin"]), F32(spec["weight"])
        self.row_profile, self.col_profile = v[:h], v[h:h + w]
        self.limit = v[h + w:h + w + bh * bw].reshape(bh, bw)
        self.floor = v[h + w + bh * bw:].reshape(bh, bw)

    def size(self) -> tuple[int, int]:
        return len(self.row_profile), len(self.col_profile)

    @staticmethod
    def profiles(plane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean of each row and each column, summed in float64."""
        rows = (plane.sum(axis=1, dtype=np.float64) / plane.shape[1]).astype(F32)
        cols = (plane.sum(axis=0, dtype=np.float64) / plane.shape[0]).astype(F32)
        return rows, cols

    @staticmethod
    def best_shift(profile: np.ndarray, reference: np.ndarray, max_shift: int) -> int:
        """The shift s (|s| <= max) with the largest correlation of first
        differences of profile[i + s] and reference[i]; ties to the smaller |s|."""
        n = min(len(profile), len(reference))
        if n < 3:
            return 0
        g = np.diff(profile[:n]).astype(np.float64)
        r = np.diff(reference[:n]).astype(np.float64)
        m = min(max_shift, len(g) - 1)
        best = (-math.inf, 0)
        for s in range(-m, m + 1):
            c = float(np.dot(g[max(s, 0):len(g) + min(s, 0)], r[max(-s, 0):len(r) - max(s, 0)]))
            if c > best[0] or (c == best[0] and abs(s) < abs(best[1])):
                best = (c, s)
        return best[1]

    def blocks(self, plane: np.ndarray, dy: int, dx: int) -> np.ndarray:
        """Block means of the plane shifted by (dy, dx), edge pixels repeated;
        summed in niix's order (8 pixels of a row, times 1/64, rows in turn)."""
        h, w = plane.shape
        b = self.block
        bh, bw = h // b, w // b
        ys = np.clip(np.arange(bh * b) + dy, 0, h - 1)
        xs = np.clip(np.arange(bw * b) + dx, 0, w - 1)
        px = np.take(plane[ys], xs, axis=1).reshape(bh * b, bw, b)
        row_sums = px[:, :, 0].copy()
        for k in range(1, b):
            row_sums += px[:, :, k]
        row_sums *= F32(1.0 / (b * b))
        row_sums = row_sums.reshape(bh, b, bw)
        out = np.zeros((bh, bw), F32)
        for k in range(b):
            out += row_sums[:, k, :]
        return out

    def cargo_running_on(self, v: np.ndarray) -> np.ndarray:
        """Per structure block, the density of the cargo that runs on into it
        from the hold along the length (structure.rs, cargo_running_on)."""
        along_rows = v.shape[0] >= v.shape[1]
        v, limit, floor = (v, self.limit, self.floor) if along_rows else (v.T, self.limit.T, self.floor.T)
        n, reach = v.shape[0], self.reach
        out = np.zeros(v.shape, F32)
        if reach == 0:
            return out if along_rows else out.T
        pad = 2 * reach + 1
        hold = np.zeros((n + 2 * pad, v.shape[1]), bool)
        hold[pad:pad + n] = ~np.isfinite(limit)
        cargo = np.zeros(hold.shape, F32)
        cargo[pad:pad + n] = np.where(hold[pad:pad + n], np.maximum(v - floor, F32(0)), F32(0))
        at = lambda a, off: a[pad + off:pad + off + n]  # noqa: E731  rows y + off
        for d in (-1, 1):
            # Smallest over `reach` rows from each row on, in direction d.
            window = cargo.copy()
            for j in range(1, reach):
                window[pad:pad + n] = np.minimum(window[pad:pad + n], at(cargo, d * j))
            found = np.zeros(v.shape, bool)
            side = np.zeros(v.shape, F32)
            for k in range(1, reach + 1):
                first = at(hold, d * k) & ~found
                side[first] = at(window, d * k)[first]
                found |= first
            out = np.maximum(out, np.where(found, side, F32(0)))
        out[~np.isfinite(limit)] = 0  # only structure blocks
        return out if along_rows else out.T

    def raise_map(self, score_map: np.ndarray, stride: int, plane: np.ndarray) -> None:
        rows, cols = self.profiles(plane)
        dy = self.best_shift(rows, self.row_profile, self.max_shift)
        dx = self.best_shift(cols, self.col_profile, self.max_shift)
        v = self.blocks(plane, dy, dx)
        cargo = self.cargo_running_on(v)
        e = np.maximum(v - self.limit - cargo, F32(0))
        ep = np.pad(e, ((0, 1), (0, 1)), mode="edge")
        e = np.minimum(np.minimum(ep[:-1, :-1], ep[1:, :-1]), np.minimum(ep[:-1, 1:], ep[1:, 1:]))
        lift = self.weight * np.maximum(e - self.margin, F32(0))
        by, bx = np.nonzero(lift > 0)
        if by.size == 0:
            return
        mh, mw = score_map.shape
        half = self.block // 2
        cy = np.minimum(np.maximum(by * self.block + dy + half, 0) // stride, mh - 1)
        cx = np.minimum(np.maximum(bx * self.block + dx + half, 0) // stride, mw - 1)
        add = np.zeros_like(score_map)
        np.maximum.at(add, (cy, cx), lift[by, bx])
        score_map += add


# --------------------------------------------------------------------------
# Model (inference/src/model.rs)
# --------------------------------------------------------------------------
class Model:
    def __init__(self, model_dir: Path, intra_op: int | None = None):
        import onnxruntime as ort  # here, so the tiling and manifest code import without it

        self.manifest = m = Manifest.load(model_dir)
        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op or len(os.sched_getaffinity(0))  # niix: available_parallelism
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
        # Constant inputs (a memory bank), fed with every batch as niix does.
        self.constants = {
            name: np.fromfile(model_dir / file, dtype="<f4").reshape(shape) for name, file, shape in m.constants
        }
        if m.smooth > 1:
            raise SystemExit(f"decision.smooth {m.smooth}: this baseline does not mirror niix's map smoothing")
        st = m.structure
        self.structure = Structure(model_dir, st) if st is not None and st.get("file") else None
        # niix runs the model once on a blank tile to learn the map stride.
        blank = np.zeros((1, len(m.channels), m.tile, m.tile), F32)
        h, w = self.run(blank).shape[1:]
        if h != w or m.tile % h:
            raise SystemExit(f"a {m.tile}x{m.tile} tile gives a {h}x{w} map; the side must divide the tile")
        self.stride = m.tile // h
        if m.overlap % (2 * self.stride):
            raise SystemExit(f"input.overlap {m.overlap} must be a multiple of twice the map stride {self.stride}")

    def run(self, batch: np.ndarray) -> np.ndarray:
        """One ONNX Runtime call: [n, C, tile, tile] -> maps [n, h, w]."""
        (out,) = self.session.run([self.manifest.output_name], {self.manifest.input_name: batch, **self.constants})
        return out.reshape(out.shape[0], out.shape[-2], out.shape[-1])  # [n,1,h,w] or [n,h,w]


# --------------------------------------------------------------------------
# Plane selection (pipeline.rs select_planes) and decode (decode.rs)
# --------------------------------------------------------------------------
def select_planes(m: Manifest, kinds: list[str]) -> list[int]:
    chosen = []
    for c in range(len(m.channels)):
        idx = next((kinds.index(k) for k in m.channel_kinds(c) if k in kinds), None)
        if idx is None:
            raise SystemExit(f"the model needs a {m.channels[c]} plane for input channel {c}; the scan has {kinds}")
        chosen.append(idx)
    return chosen


def decode_plane(path: Path) -> np.ndarray:
    """A single-channel grey TIFF or PNG, 8 or 16 bits, as a uint16 [H, W] array.
    8-bit samples are widened as they are (v -> v), like niix."""
    with Image.open(path) as im:
        if im.mode not in ("I;16", "I;16B", "I;16L", "I", "L"):
            raise SystemExit(f"{path}: {im.mode} image; planes are single-channel grey, 8 or 16 bits")
        return np.asarray(im).astype(np.uint16, copy=False)


# --------------------------------------------------------------------------
# Intensity transform (pipeline.rs lookup_table, transform)
# --------------------------------------------------------------------------
def lookup_table(m: Manifest, c: int) -> np.ndarray:
    """The transform of every 16-bit value, float32 arithmetic as niix.

    The logarithm is taken in float64 and rounded to float32: niix's f32::ln
    is glibc's logf, which is within 1 ulp and almost always correctly
    rounded; numpy's float32 log (SIMD) differs from it by 1 ulp on ~22% of
    the 65536 entries, float64-then-round on ~0.75%. Either is far inside
    check_equal.py's tolerance; with float64 the 8-bit score maps niix
    stores were identical cell for cell on every test scan, with numpy's
    float32 log 3 cells in 12.6 million differed by one level."""
    v = np.arange(65536, dtype=F32)
    i0 = F32(m.i0)
    if m.kind == "neg_log":
        q = np.maximum(v, F32(1)) / i0  # float32 division, as niix
        x = (-np.log(q.astype(np.float64))).astype(F32)
    elif m.kind == "ratio":
        x = v / i0
    else:  # raw
        x = v
    if m.clip is not None:
        x = np.clip(x, F32(m.clip[0]), F32(m.clip[1]))
    mean, std = m.normalisation(c)
    return ((x - F32(mean)) / F32(std)).astype(F32)


def transform(planes: list[np.ndarray], tables: list[np.ndarray]) -> np.ndarray:
    """[C, H, W] float32: each channel's table indexed by its plane's values."""
    h, w = planes[0].shape
    out = np.empty((len(planes), h, w), F32)
    for c, (plane, table) in enumerate(zip(planes, tables)):
        out[c] = table[plane]  # fancy indexing: one gather per pixel
    return out


# --------------------------------------------------------------------------
# Tiling (tiling.rs). Everything in map units (one map cell = stride pixels).
# --------------------------------------------------------------------------
def axis(length: int, tile: int, overlap: int, stride: int):
    """Tile starts along one axis (map units), the [from, to) map cells each
    tile owns (overlaps split at their midpoint), and the axis' map length."""
    map_len = -(-length // stride)
    tile_m = tile // stride
    if length <= tile:
        return [0], [(0, map_len)], map_len
    step = (tile - overlap) // stride
    last = -(-(length - tile) // stride)
    starts = [0]
    while starts[-1] * stride + tile < length:
        starts.append(min(starts[-1] + step, last))
    owned = []
    for k, s in enumerate(starts):
        lo = 0 if k == 0 else (starts[k - 1] + tile_m + s) // 2
        hi = map_len if k + 1 == len(starts) else (s + tile_m + starts[k + 1]) // 2
        owned.append((lo, hi))
    return starts, owned, map_len


def grid(h: int, w: int, tile: int, overlap: int, stride: int):
    """Every tile, row-major: (y px, x px, (row from, to), (col from, to)); map shape."""
    rs, ro, rows = axis(h, tile, overlap, stride)
    cs, co, cols = axis(w, tile, overlap, stride)
    tiles = [(ys * stride, xs * stride, ro[r], co[c]) for r, ys in enumerate(rs) for c, xs in enumerate(cs)]
    return tiles, (rows, cols)


def fill_batch(inp: np.ndarray, group, tile: int, pad: np.ndarray) -> np.ndarray:
    """Copies tiles into a fresh [n, C, tile, tile] batch; outside the image = pad (air)."""
    c, h, w = inp.shape
    batch = np.empty((len(group), c, tile, tile), F32)
    for slot, (y, x, _, _) in enumerate(group):
        rows, cols = min(tile, h - y), min(tile, w - x)
        if rows < tile or cols < tile:
            batch[slot] = pad[:, None, None]
        batch[slot, :, :rows, :cols] = inp[:, y:y + rows, x:x + cols]
    return batch


def air_pad(m: Manifest, tables: list[np.ndarray]) -> np.ndarray:
    """Each channel's transformed value of air (i0): what pads a tile past the image edge."""
    air = min(math.floor(m.i0 + 0.5), 65535)  # Rust f32::round: half away from zero
    return np.array([t[air] for t in tables], F32)


def stitch(dest, tile_maps, group, stride: int) -> None:
    """The stitching rule: each tile writes the map cells it owns into dest
    [..., rows, cols] (numpy or torch; leading axes, e.g. channels, as they are)."""
    for tile_map, (y, x, (r0, r1), (c0, c1)) in zip(tile_maps, group):
        ty, tx = y // stride, x // stride
        dest[..., r0:r1, c0:c1] = tile_map[..., r0 - ty:r1 - ty, c0 - tx:c1 - tx]


# --------------------------------------------------------------------------
# Regions (regions.rs find_regions): 8-connected components of cells >= threshold
# --------------------------------------------------------------------------
def find_regions(score: np.ndarray, threshold: float, stride: int, min_area: int, height: int, width: int):
    mask = ~(score < F32(threshold))  # niix skips cells `< threshold`: a NaN cell would count as anomalous
    labels, k = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if k == 0:
        return []
    lab = labels[mask]  # row-major, as niix visits the cells
    values = score[mask]
    cells = np.bincount(lab, minlength=k + 1)[1:]
    total = np.bincount(lab, weights=values.astype(np.float64), minlength=k + 1)[1:]  # f64, in niix's order
    vmax = np.full(k + 1, -np.inf, F32)
    np.maximum.at(vmax, lab, values)
    vmax = vmax[1:]
    boxes = ndimage.find_objects(labels)
    area = cells * stride * stride
    found = []
    for i in np.flatnonzero(area >= min_area):
        ys, xs = boxes[i]
        x, y = xs.start * stride, ys.start * stride
        found.append({
            "x": x,
            "y": y,
            "width": min(xs.stop * stride, width) - x,
            "height": min(ys.stop * stride, height) - y,
            "area_px": int(area[i]),
            "score": float(vmax[i]),
            "max_score": float(vmax[i]),
            "mean_score": float(F32(total[i] / cells[i])),
        })
    found.sort(key=lambda r: (-r["max_score"], r["y"], r["x"]))
    return [{"id": i + 1, **r} for i, r in enumerate(found)]


# --------------------------------------------------------------------------
# The whole analysis (pipeline.rs analyze)
# --------------------------------------------------------------------------
def analyze(model: Model, planes: list[tuple[str, Path]]) -> tuple[dict, np.ndarray]:
    """The findings of one scan, and its normalised score map (one cell per stride pixels)."""
    t_start = time.perf_counter()
    timings = {}
    m, stride = model.manifest, model.stride
    kinds = [k for k, _ in planes]
    chosen = select_planes(m, kinds)

    # Decode and transform: one thread per plane, as niix (Pillow's decoder and
    # numpy's gather release the GIL).
    t0 = time.perf_counter()
    tables = [lookup_table(m, c) for c in range(len(chosen))]
    pad = air_pad(m, tables)
    sizes = {Image.open(planes[i][1]).size for i in chosen}
    if len(sizes) > 1:
        raise SystemExit(f"planes differ in size ({sizes}); a model needs co-registered planes")
    (w, h), = sizes
    inp = np.empty((len(chosen), h, w), F32)

    def decode_transform(i: int) -> None:
        plane = decode_plane(planes[i][1])
        for c in (c for c in range(len(chosen)) if chosen[c] == i):
            np.take(tables[c], plane, out=inp[c])

    list(POOL.map(decode_transform, dict.fromkeys(chosen)))  # each chosen plane once
    timings["decode"] = time.perf_counter() - t0  # includes the transform, as niix's
    timings["transform"] = 0.0

    # Tiles: a second thread fills the next batch while ONNX Runtime runs this
    # one (niix's tiler thread), so only the wait for a batch is on the path.
    tiles, map_shape = grid(h, w, m.tile, m.overlap, stride)
    raw = np.empty(map_shape, F32)
    batch_size = min(m.batch, len(tiles))  # niix: the last batch may be smaller
    groups = [tiles[g:g + batch_size] for g in range(0, len(tiles), batch_size)]
    timings["tile"] = timings["infer"] = timings["stitch"] = 0.0
    ahead = POOL.submit(fill_batch, inp, groups[0], m.tile, pad)
    for n, group in enumerate(groups):
        t0 = time.perf_counter()
        batch = ahead.result()
        if n + 1 < len(groups):
            ahead = POOL.submit(fill_batch, inp, groups[n + 1], m.tile, pad)
        t1 = time.perf_counter()
        maps = model.run(batch)
        t2 = time.perf_counter()
        stitch(raw, maps, group, stride)
        t3 = time.perf_counter()
        timings["tile"] += t1 - t0  # waiting for the filler only
        timings["infer"] += t2 - t1
        timings["stitch"] += t3 - t2
    first = inp[0] if model.structure is not None and model.structure.size() == (h, w) else None
    del inp

    t0 = time.perf_counter()
    if first is not None:
        model.structure.raise_map(raw, stride, first)
    del first
    timings["structure"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if m.background_weight > 0:
        # subtract_background: the quantile of the finite cells, nearest rank.
        cells = raw[np.isfinite(raw)]
        last = cells.size - 1
        at = min(int(np.floor(F32(last) * F32(m.background_quantile) + 0.5)), last)
        level = np.partition(cells, at)[at]
        raw -= F32(m.background_weight) * level
    lo, hi = F32(m.score_min), F32(m.score_max)
    score = raw  # stitch_tile's normalisation, in place: clamp((v - lo) * (1 / (hi - lo)), 0, 1)
    score -= lo
    score *= F32(1) / (hi - lo)
    np.clip(score, F32(0), F32(1), out=score)
    timings["stitch"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    regions = find_regions(score, m.threshold, stride, m.min_region_area, h, w)
    scan_score = float(np.fmax.reduce(score, axis=None, initial=0.0))  # niix: fold(0.0, f32::max), NaN ignored
    timings["postprocess"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    for r in regions:
        r["threat_category"] = m.category
        r["assessment_flag"] = "HIGH_THREAT" if r["max_score"] >= HIGH_THREAT_SCORE else "THREAT"
    return {
        "score": scan_score,
        "decision": "ALARM" if regions else "CLEAR",
        "regions": regions,
        "plane_index": chosen[0],
        "width": w,
        "height": h,
        "stride": stride,
        "tiles": len(tiles),
        "timings": timings,
    }, score


def parse_planes(args: list[str]) -> list[tuple[str, Path]]:
    planes = []
    for a in args:
        kind, sep, path = a.partition("=")
        if sep and kind in PLANE_KINDS:
            planes.append((kind, Path(path)))
        else:
            planes.append(("", Path(a)))
    if all(k == "" for k, _ in planes):  # as `niix push`: FILE [--low-energy FILE]
        defaults = ["single_energy"] if len(planes) == 1 else ["high_energy", "low_energy"]
        if len(planes) > 2:
            raise SystemExit("more than two planes: name their kinds, KIND=FILE")
        planes = [(k, p) for k, (_, p) in zip(defaults, planes)]
    elif any(k == "" for k, _ in planes):
        raise SystemExit("name every plane's kind (KIND=FILE) or none")
    return planes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="model version directory (model.onnx + model.toml)")
    ap.add_argument("--plane", action="append", required=True, help="FILE or KIND=FILE; repeat for each plane")
    ap.add_argument("--repeat", type=int, default=1, help="analyses to run; seconds = the best")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: cores)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--save-map", type=Path, help="write the score map as .npy (float32), for check_equal.py --python-map")
    a = ap.parse_args()
    planes = parse_planes(a.plane)
    import onnxruntime as ort  # before the model-load timing, as niix loads its library at start

    t0 = time.perf_counter()
    model = Model(a.model, a.threads)
    load_seconds = time.perf_counter() - t0

    runs = []
    cpu = []  # process CPU seconds (every thread: ONNX Runtime's too) per analysis
    for _ in range(max(1, a.repeat)):
        c0 = time.process_time()
        result, score_map = analyze(model, planes)
        cpu.append(time.process_time() - c0)
        runs.append(result)
    if a.save_map:
        np.save(a.save_map, score_map)
    seconds = [r["timings"]["total"] for r in runs]
    out = dict(runs[int(np.argmin(seconds))])
    out["seconds"] = min(seconds)
    out["seconds_mean"] = sum(seconds) / len(seconds)
    out["seconds_all"] = seconds
    out["cpu_seconds_mean"] = sum(cpu) / len(cpu)
    out["repeat"] = len(runs)
    out["model_load_seconds"] = load_seconds
    out["onnxruntime"] = ort.__version__
    out["numpy"] = np.__version__
    out["intra_op_threads"] = model.session.get_session_options().intra_op_num_threads
    if a.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        print(f"{out['decision']}  score {out['score']:.4f}  {len(out['regions'])} regions  "
              f"{out['seconds'] * 1000:.0f} ms (best of {len(runs)})")
        for r in out["regions"]:
            print(f"  #{r['id']}: x {r['x']} y {r['y']} {r['width']}x{r['height']} px, "
                  f"area {r['area_px']}, max {r['max_score']:.4f}, mean {r['mean_score']:.4f}")
        print("  " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in out["timings"].items()))


if __name__ == "__main__":
    main()
