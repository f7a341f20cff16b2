#!/usr/bin/env python3
"""Checks that the Python baseline (pipeline.py --json) found what niix found
on the same scan; exits 1 with the differences if not, 0 if they agree.

Usage: check_equal.py NIIX.json PYTHON.json [--score-tol 1e-5] [--box-tol 0]
                      [--niix-map MAP.png --python-map MAP.npy]

NIIX.json is `niix findings SCAN_ID --json` (or `niix push --wait --json`,
whose "findings" member is used). Compared:

  * decision (ALARM / CLEAR, case-insensitive): exactly;
  * scan score, and each region's max and mean score: |a - b| <= --score-tol,
    default 1e-5. Why that: both sides compute the same float32 operations
    in the same order on the same ONNX Runtime version, so scores are
    normally bit-identical; 1e-5 (about 80 float32 ulps at 1.0) leaves room
    for 1-ulp differences in log() between libm and numpy in the lookup
    table, multiplied through the model's averaging, and for the order of
    the f64 sum behind a region's mean score, while any real difference in
    tiling, stitching or normalisation moves scores by far more;
  * regions: the same number, matched one to one by box; each box edge
    (x, y, x + width, y + height) within --box-tol pixels, default 0
    (exact), and the same area when --box-tol is 0. A cell whose score sits
    within float rounding of the threshold could flip and move an edge by one
    map cell: should that ever happen, rerun with --box-tol equal to the map
    stride (1 for the bundled model) and look at the reported scores;
  * region order (niix: highest max score first, then top, then left): a
    different order is reported as a difference only when the scores that
    decide it differ by more than --score-tol;
  * optionally the whole score map, every cell: niix builds that keep the
    anomaly map store it as an 8-bit grey PNG blob (server/src/overlay.rs,
    encode_map_png: round(clamp(s, 0, 1) * 255)) in DATA/blobs/; give it
    with --niix-map and pipeline.py's --save-map output with --python-map.
    The Python map is quantised the same way and must be identical, except
    that a cell may differ by one level where the unquantised score is within
    --score-tol of a rounding boundary.
"""

import argparse
import json
import sys

import numpy as np


def load(path: str) -> dict:
    with open(path) as f:
        d = json.load(f)
    return d.get("findings", d)  # `niix push --wait --json` wraps the findings


def edges(r: dict) -> tuple[int, int, int, int]:
    return r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"]


def max_score(r: dict) -> float:
    return float(r["max_score"] if "max_score" in r else r["score"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("niix")
    ap.add_argument("python")
    ap.add_argument("--score-tol", type=float, default=1e-5)
    ap.add_argument("--box-tol", type=int, default=0)
    ap.add_argument("--niix-map", help="niix's stored anomaly map (8-bit grey PNG blob)")
    ap.add_argument("--python-map", help="pipeline.py --save-map output (.npy)")
    a = ap.parse_args()
    nx, py = load(a.niix), load(a.python)
    problems = []

    if nx.get("aborted"):
        problems.append(f"niix aborted the analysis: {nx.get('abort_reason')}")
    if str(nx["decision"]).upper() != str(py["decision"]).upper():
        problems.append(f"decision: niix {nx['decision']}, python {py['decision']}")
    if abs(float(nx["score"]) - float(py["score"])) > a.score_tol:
        problems.append(f"scan score: niix {nx['score']!r}, python {py['score']!r} (tolerance {a.score_tol})")

    nr, pr = nx.get("regions", []), py.get("regions", [])
    if len(nr) != len(pr):
        problems.append(f"region count: niix {len(nr)}, python {len(pr)}")
    unmatched = list(range(len(pr)))
    pairs = []
    for i, r in enumerate(nr):
        e = edges(r)
        best = min(unmatched, key=lambda j: max(abs(u - v) for u, v in zip(e, edges(pr[j]))), default=None)
        if best is None or max(abs(u - v) for u, v in zip(e, edges(pr[best]))) > a.box_tol:
            problems.append(f"niix region {i + 1} {r['width']}x{r['height']} at ({r['x']}, {r['y']}) "
                            f"has no python region within {a.box_tol} px")
            continue
        unmatched.remove(best)
        pairs.append((i, best))
        p = pr[best]
        where = f"region at ({r['x']}, {r['y']}) {r['width']}x{r['height']}"
        if a.box_tol == 0 and int(r["area_px"]) != int(p["area_px"]):
            problems.append(f"{where}: area niix {r['area_px']}, python {p['area_px']}")
        for what, u, v in (("max score", max_score(r), max_score(p)),
                           ("mean score", float(r["mean_score"]), float(p["mean_score"]))):
            if abs(u - v) > a.score_tol:
                problems.append(f"{where}: {what} niix {u!r}, python {v!r} (tolerance {a.score_tol})")
    for j in unmatched:
        p = pr[j]
        problems.append(f"python region {j + 1} {p['width']}x{p['height']} at ({p['x']}, {p['y']}) not in niix")

    # Order: niix position i holds python position j; a swap matters only if
    # the sort keys (max score desc, y, x) are not within tolerance of a tie.
    for (i1, j1), (i2, j2) in zip(pairs, pairs[1:]):
        if j1 > j2 and abs(max_score(nr[i1]) - max_score(nr[i2])) > a.score_tol:
            problems.append(f"region order differs around niix regions {i1 + 1} and {i2 + 1}")

    map_note = ""
    if a.niix_map and a.python_map:
        from PIL import Image

        with Image.open(a.niix_map) as im:
            q_niix = np.asarray(im.convert("L")).astype(np.int16)
        s = np.clip(np.load(a.python_map), np.float32(0), np.float32(1))
        x = (s * np.float32(255)).astype(np.float64)  # f32 product as in Rust, then round half away from 0
        q_py = np.floor(x + 0.5).astype(np.int16)
        if q_niix.shape != q_py.shape:
            problems.append(f"score map shape: niix {q_niix.shape}, python {q_py.shape}")
        else:
            d = np.abs(q_niix - q_py)
            near = np.abs(x - np.floor(x) - 0.5) <= a.score_tol * 255  # within tolerance of a rounding boundary
            bad = (d > 1) | ((d == 1) & ~near)
            if bad.any():
                ys, xs = np.nonzero(bad)
                problems.append(f"score map: {bad.sum()} of {d.size} cells differ (first at row {ys[0]}, "
                                f"column {xs[0]}: niix {q_niix[ys[0], xs[0]]}/255, python {x[ys[0], xs[0]]:.4f}/255)")
            map_note = f"; score maps identical at 8 bits in {np.count_nonzero(d == 0)} of {d.size} cells"
    elif a.niix_map or a.python_map:
        problems.append("give both --niix-map and --python-map")

    if problems:
        print(f"DIFFERENT: {len(problems)} difference(s) between niix ({a.niix}) and python ({a.python}):")
        for p in problems:
            print("  - " + p)
        return 1
    diff = max([abs(float(nx["score"]) - float(py["score"]))] +
               [max(abs(max_score(nr[i]) - max_score(pr[j])), abs(float(nr[i]["mean_score"]) - float(pr[j]["mean_score"])))
                for i, j in pairs])
    print(f"EQUAL: decision {str(nx['decision']).upper()}, score {float(nx['score']):.6f}, {len(nr)} regions "
          f"(boxes within {a.box_tol} px, largest score difference {diff:.3g} <= {a.score_tol}){map_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
