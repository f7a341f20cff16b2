#!/usr/bin/env python3
r"""Reference Python pipeline: niix's scan analysis, written the way a customs
data team would write it with Pillow + numpy + onnxruntime.

It is the baseline of the benchmark figure "speedup_vs_python" (Python
seconds / niix seconds on the same scan). It does exactly what niix's Rust
tensor core does, with the same model, the same tiles and the same
post-processing, so its findings equal niix's (see check_equal.py):

  stage            what                                                  mirrors (Rust)
  ---------------  ----------------------------------------------------  -------------------------------------------
  manifest         read model.toml, defaults as niix                     inference/src/manifest.rs
  model            ONNX Runtime session, trial run on a blank tile to    inference/src/model.rs (Model::load, run)
                   learn the map stride
  select planes    per input channel the first plane kind that the scan  inference/src/pipeline.rs (select_planes)
                   has, of the channel's "a|b|c" alternatives
  decode           TIFF/PNG, 8- or 16-bit grey -> uint16 (8-bit widened  inference/src/decode.rs, pipeline.rs
                   as is, not rescaled), full resolution, never resized  (decode_plane)
  transform        65536-entry float32 lookup table per channel          pipeline.rs (lookup_table, transform)
                   (neg_log | ratio | raw, clip, mean/std) -> [C, H, W]
  tile             tile x tile tiles overlapping by >= overlap; the      inference/src/tiling.rs (Axis, Grid),
                   last one pulled back to the edge; outside the image   pipeline.rs (fill_tile)
                   padded with the transformed value of air (i0)
  infer            `batch` tiles per ONNX Runtime call, row-major order  pipeline.rs (infer_map), model.rs (run)
  stitch           each tile writes only the map cells it owns (overlap  tiling.rs (owned), pipeline.rs (stitch_tile)
                   split at its midpoint); background_weight x the map's
                   background_quantile off every cell if the weight is > 0;
                   score = clamp((v - score_min)
                   / (score_max - score_min), 0, 1)
  post-process     cells >= threshold -> 8-connected regions; drop those  inference/src/regions.rs (find_regions),
                   under min_region_area pixels; boxes in pixels clipped  pipeline.rs (analyze)
                   to the image; sort by max score desc, then (y, x);
                   scan score = max of the map; ALARM iff a region        server/src/analysis.rs (machine_report)
                   remains, else CLEAR

Differences that are deliberate and do not change results:
  * No producer thread: niix fills the next batch on a second thread while
    ONNX Runtime runs the current one; here batches are filled in the same
    loop (what a plain script does). The "tile" timing is therefore on the
    critical path here and overlapped in niix.
  * Scores are normalised once on the stitched raw map instead of per tile
    (same float32 arithmetic per cell, so bit-identical).
  * Connected components: numpy has no labelling function and this baseline
    is Pillow + numpy + onnxruntime only (no scipy), so components are found on
    horizontal runs of anomalous cells (vectorised run detection, run
    adjacency via searchsorted, union-find by vectorised root hooking). With
    scipy one would call scipy.ndimage.label(mask, np.ones((3, 3))).

ONNX Runtime threads as niix's defaults: intra_op = number of cores,
inter_op = 1 (inference/src/runtime.rs, Threads::default).

"seconds" is the wall time of one analysis from the plane files on disk to the
findings: decode included; interpreter start, imports and the model session
load (niix loads models once at start) excluded. With --repeat N the whole
analysis runs N times and "seconds" is the best, "seconds_mean" the mean.

Usage:
  pipeline.py --model fixtures/models/demo-local-contrast/1 \
      --plane high.tif [--plane low.tif] [--repeat N] [--json]
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

import numpy as np
from PIL import Image

HIGH_THREAT_SCORE = 0.9  # server/src/analysis.rs: HIGH_THREAT at max score >= 0.9
PLANE_KINDS = ("single_energy", "high_energy", "low_energy", "z_effective", "backscatter")
F32 = np.float32


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
        )

    def channel_kinds(self, c: int) -> list[str]:
        """Plane kinds that may feed channel c, in preference order."""
        return [k.strip() for k in self.channels[c].split("|")]

    def normalisation(self, c: int) -> tuple[float, float]:
        """(mean, std) of channel c: none -> (0, 1); one value -> every channel."""
        pick = lambda v, default: default if not v else (v[0] if len(v) == 1 else v[c])  # noqa: E731
        return pick(self.mean, 0.0), pick(self.std, 1.0)


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
        (out,) = self.session.run([self.manifest.output_name], {self.manifest.input_name: batch})
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
    rows, cols = score.shape
    mask = ~(score < F32(threshold))  # niix skips cells `< threshold`: a NaN cell would count as anomalous
    if not mask.any():
        return []
    # 1. Horizontal runs of anomalous cells. Pad each row with a False column on
    #    both sides so runs never cross rows in the flattened array.
    W = cols + 2
    padded = np.zeros((rows, W), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded.ravel())
    starts = np.flatnonzero(edges == 1) + 1  # flat index (padded) of the first cell
    ends = np.flatnonzero(edges == -1) + 1  # one past the last cell
    ry, rx0 = np.divmod(starts, W)
    rx0 = rx0 - 1  # map column of the first cell
    rx1 = ends - ry * W - 1  # one past the last map column
    n = len(starts)

    # 2. Runs touching 8-connectedly in consecutive rows: run a (row y-1) and b
    #    (row y) touch iff a.x0 <= b.x1 and b.x0 <= a.x1 (x1 exclusive). Runs are
    #    sorted by (row, x), so the candidates of b are a contiguous range found
    #    by searchsorted on keys row * W + x.
    key_start, key_end = ry * W + rx0, ry * W + rx1
    lo = np.searchsorted(key_end, (ry - 1) * W + rx0, side="left")
    hi = np.searchsorted(key_start, (ry - 1) * W + rx1, side="right")
    count = np.maximum(hi - lo, 0)
    b = np.repeat(np.arange(n), count)
    a = np.repeat(lo, count) + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))

    # 3. Union-find over runs: hook the larger root under the smaller, then
    #    compress paths, until every touching pair shares a root.
    parent = np.arange(n)
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(ra[differ], rb[differ]), np.minimum(ra[differ], rb[differ]))
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    roots, comp = np.unique(parent, return_inverse=True)
    k = len(roots)

    # 4. Per-run then per-component statistics.
    length = rx1 - rx0
    values = score[mask]  # row-major: the runs' cells, run after run
    offsets = np.cumsum(length) - length
    run_max = np.maximum.reduceat(values, offsets)
    run_sum = np.add.reduceat(values.astype(np.float64), offsets)  # niix sums in f64
    cells = np.bincount(comp, weights=length, minlength=k).astype(np.int64)
    total = np.bincount(comp, weights=run_sum, minlength=k)
    vmax = np.full(k, -np.inf, F32)
    np.maximum.at(vmax, comp, run_max)
    y0 = np.full(k, rows, np.int64)
    np.minimum.at(y0, comp, ry)
    y1 = np.full(k, -1, np.int64)
    np.maximum.at(y1, comp, ry)
    x0 = np.full(k, cols, np.int64)
    np.minimum.at(x0, comp, rx0)
    x1 = np.full(k, -1, np.int64)
    np.maximum.at(x1, comp, rx1 - 1)

    # 5. Keep regions of at least min_area pixels (cells x stride^2); boxes in
    #    pixels clipped to the image; highest max score first, then (y, x).
    area = cells * stride * stride
    keep = np.flatnonzero(area >= min_area)
    px, py = x0[keep] * stride, y0[keep] * stride
    pw = np.minimum((x1[keep] + 1) * stride, width) - px
    ph = np.minimum((y1[keep] + 1) * stride, height) - py
    mean = (total[keep] / cells[keep]).astype(F32)
    order = np.lexsort((px, py, -vmax[keep].astype(np.float64)))
    return [
        {
            "id": i + 1,
            "x": int(px[j]),
            "y": int(py[j]),
            "width": int(pw[j]),
            "height": int(ph[j]),
            "area_px": int(area[keep][j]),
            "score": float(vmax[keep][j]),
            "max_score": float(vmax[keep][j]),
            "mean_score": float(mean[j]),
        }
        for i, j in enumerate(order)
    ]


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

    t0 = time.perf_counter()
    decoded = {i: decode_plane(planes[i][1]) for i in dict.fromkeys(chosen)}  # each chosen plane once
    sizes = {decoded[i].shape for i in chosen}
    if len(sizes) > 1:
        raise SystemExit(f"planes differ in size ({sizes}); a model needs co-registered planes")
    timings["decode"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tables = [lookup_table(m, c) for c in range(len(chosen))]
    inp = transform([decoded[i] for i in chosen], tables)
    pad = air_pad(m, tables)
    del decoded
    timings["transform"] = time.perf_counter() - t0

    _, h, w = inp.shape
    tiles, map_shape = grid(h, w, m.tile, m.overlap, stride)
    raw = np.empty(map_shape, F32)
    batch_size = min(m.batch, len(tiles))  # niix: the last batch may be smaller
    timings["tile"] = timings["infer"] = timings["stitch"] = 0.0
    for g in range(0, len(tiles), batch_size):
        group = tiles[g:g + batch_size]
        t0 = time.perf_counter()
        batch = fill_batch(inp, group, m.tile, pad)
        t1 = time.perf_counter()
        maps = model.run(batch)
        t2 = time.perf_counter()
        stitch(raw, maps, group, stride)
        t3 = time.perf_counter()
        timings["tile"] += t1 - t0
        timings["infer"] += t2 - t1
        timings["stitch"] += t3 - t2
    del inp

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
    for _ in range(max(1, a.repeat)):
        result, score_map = analyze(model, planes)
        runs.append(result)
    if a.save_map:
        np.save(a.save_map, score_map)
    seconds = [r["timings"]["total"] for r in runs]
    out = dict(runs[int(np.argmin(seconds))])
    out["seconds"] = min(seconds)
    out["seconds_mean"] = sum(seconds) / len(seconds)
    out["seconds_all"] = seconds
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
