#!/usr/bin/env bash
# Runs niix and the Python baseline on the same 2048x6144 16-bit dual-energy
# scan with the same model, checks that their findings agree (check_equal.py:
# scores within 1e-4, identical boxes) and prints
# both analysis times; the ratio only when they agree. Starts its own `niix serve` on a scratch data directory and
# stops it (by its pid) on exit. Builds nothing: uses an existing binary.
#
# Usage: benches/baselines/compare.sh [SCAN_DIR] [PORT]
#   SCAN_DIR  holds high.tif + low.tif; made by make_scan.py if missing
#             (default /tmp/niix-pybase/scan)
#   PORT      gRPC port of the scratch server; PORT+1 serves its metrics
#             (default 50991)
# Environment: MODEL (default cargo-patchcore, the shipped model; or
# demo-local-contrast), NIIX (default target/release/niix), PY (default
# .niix/venv/bin/python), REPEAT (analyses on each side, best kept; default
# 10: the Python pipeline runs REPEAT times in one process, the same scan is
# pushed to niix REPEAT times under fresh scan ids),
# ORT_DYLIB_PATH (default .niix/onnxruntime/libonnxruntime.so.1.31.1).
set -euo pipefail
shopt -s nullglob

root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
NIIX="${NIIX:-target/release/niix}"
PY="${PY:-.niix/venv/bin/python}"
REPEAT="${REPEAT:-10}"
MODEL="${MODEL:-cargo-patchcore}"
scan="${1:-/tmp/niix-pybase/scan}"
port="${2:-50991}"
server="http://127.0.0.1:$port"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$root/.niix/onnxruntime/libonnxruntime.so.1.31.1}"

[ -f "$scan/high.tif" ] && [ -f "$scan/low.tif" ] || "$PY" benches/baselines/make_scan.py "$scan"

work="$(mktemp -d /tmp/niix-pybase.XXXXXX)"
"$NIIX" serve --models fixtures/models --model "$MODEL" --data "$work/data" --listen "127.0.0.1:$port" \
  --metrics-listen "127.0.0.1:$((port + 1))" >"$work/serve.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work/data"' EXIT
for _ in $(seq 100); do
  "$NIIX" scans --server "$server" --limit 1 >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
  sleep 0.2
done

"$NIIX" push --server "$server" --wait --json "$scan/high.tif" --low-energy "$scan/low.tif" >"$work/push.json"
id="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["scan_id"])' "$work/push.json")"
"$NIIX" findings --server "$server" "$id" --json >"$work/niix.json"
for i in $(seq 2 "$REPEAT"); do  # more analyses of the same planes, for niix's best time
  "$NIIX" push --server "$server" --wait --json --scan-id "$("$PY" -c 'import uuid; print(uuid.uuid4())')" \
    "$scan/high.tif" --low-energy "$scan/low.tif" >"$work/push-$i.json"
done

"$PY" benches/baselines/pipeline.py --model "fixtures/models/$MODEL/1" \
  --plane "$scan/high.tif" --plane "$scan/low.tif" --repeat "$REPEAT" --json >"$work/python.json"

if ! "$PY" benches/baselines/check_equal.py "$work/niix.json" "$work/python.json" --score-tol 1e-4; then
  echo "REFUSED: niix and the Python baseline differ on $MODEL; no speedup is printed" >&2
  exit 1
fi
"$PY" - "$work/python.json" "$work/niix.json" "$work"/push-*.json <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
n = [json.load(open(f)) for f in sys.argv[2:]]
n = [d.get("findings", d)["processing_seconds"] for d in n]
best = min(n)
print(f"niix   processing_seconds {best:.3f} s (best of {len(n)}; mean {sum(n) / len(n):.3f} s; as the server records it)")
print(f"python seconds            {p['seconds']:.3f} s (best of {p['repeat']}; mean {p['seconds_mean']:.3f} s)")
print("python stages (ms):       " + ", ".join(f"{k} {v * 1000:.0f}" for k, v in p["timings"].items()))
print(f"speedup_vs_python         {p['seconds'] / best:.2f} (best / best)")
PY
echo "JSON files in $work (the scratch data directory is removed)"
